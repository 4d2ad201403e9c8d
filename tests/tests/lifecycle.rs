//! The agent as systemd runs it: readiness told only once it forwards and serves, a unit file
//! systemd accepts, and a default config whose every key the agent takes.
use std::{os::unix::net::UnixDatagram, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use nv_tests::{sys::bin, testbed::TwoHosts};

/// The next notification the agent sent to `sock`, as its lines.
fn notification(sock: &UnixDatagram) -> anyhow::Result<Vec<String>> {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .context("no notification from the agent in 20 s")?;
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn the_agent_tells_systemd_it_is_ready_once_it_forwards_and_serves() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("rd")?;
    bed.configure()?;
    let path = bed.tmp_dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let records = bed.hosts[0]
        .nvctl_json(&["lookup", "list"])?
        .as_array()
        .map_or(0, Vec::len);
    ensure!(records > 0, "the bed has no records");
    let ports = bed.hosts[0].nvctl_json(&["status"])?["ports"]
        .as_array()
        .map_or(0, Vec::len);

    bed.hosts[0].stop_agent();
    let notify = path.to_str().context("utf-8 path")?;
    bed.hosts[0].start_agent_with_env(&[("NOTIFY_SOCKET", notify)])?;
    let ready = notification(&sock)?;
    ensure!(
        ready.iter().any(|l| l == "READY=1"),
        "first notification is not READY=1: {ready:?}"
    );
    let status =
        format!("STATUS=forwarding on uplink0: {records} lookup records, {ports} ports attached");
    ensure!(
        ready.contains(&status),
        "READY without `{status}`: {ready:?}"
    );
    // Ready means whole: the API answers and the store's records forward.
    let listed = bed.hosts[0]
        .nvctl_json(&["lookup", "list"])?
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        listed == records,
        "{listed} records listed at READY, {records} stored"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "not forwarding at READY"
    );
    bed.hosts[0].stop_agent();
    let stopping = notification(&sock)?;
    ensure!(
        stopping.iter().any(|l| l == "STOPPING=1"),
        "no STOPPING=1 on SIGTERM: {stopping:?}"
    );
    // Without NOTIFY_SOCKET the agent sends nothing (and starts as before).
    bed.hosts[0].start_agent()?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    ensure!(
        notification(&sock).is_err(),
        "an agent without NOTIFY_SOCKET notified"
    );
    Ok(())
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir()?;
    // systemd checks that ExecStart's binary and the Documentation= man pages exist: point
    // them at this build's, as `cargo xtask install` would put them in place.
    let agent = bin("nv-agent")?;
    let unit = std::fs::read_to_string(root.join("dist/nv-agent.service"))?.replace(
        "ExecStart=/usr/local/sbin/nv-agent",
        &format!("ExecStart={}", agent.display()),
    );
    ensure!(
        unit.contains(&agent.display().to_string()),
        "ExecStart not where install puts it"
    );
    let unit_path = dir.path().join("nv-agent.service");
    std::fs::write(&unit_path, unit)?;
    let nvctl = bin("nvctl")?;
    for (section, page, args) in [
        ("man1", "nvctl.1", &["man", "nvctl"]),
        ("man8", "nv-agent.8", &["man", "nv-agent"]),
    ] {
        let out = Command::new(&nvctl).args(args).output()?;
        ensure!(out.status.success(), "nvctl {args:?} failed");
        std::fs::create_dir_all(dir.path().join("man").join(section))?;
        std::fs::write(dir.path().join("man").join(section).join(page), out.stdout)?;
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .context("run systemd-analyze (package systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The positive control: the same check refuses a unit with a mistake in it.
    std::fs::write(
        &unit_path,
        std::fs::read_to_string(&unit_path)?.replace("Type=notify", "Type=notifyy"),
    )?;
    let bad = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .env("MANPATH", dir.path().join("man"))
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&bad.stderr).trim().is_empty(),
        "systemd-analyze accepted Type=notifyy"
    );
    Ok(())
}

/// Records of `vsid` on a remote host (PA 198.18.0.9), names with the characters CSV quotes.
fn remote_records(vsid: u32, n: u32) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            let name = if i % 3 == 0 {
                format!(r#","name":"vm {i}, \"web\"""#)
            } else {
                String::new()
            };
            format!(
                r#"{{"vsid":{vsid},"ca":"10.20.{a}.{b}","pa":"198.18.0.9","mac":"02:20:00:00:{a:02x}:{b:02x}"{name}}}"#
            )
        })
        .collect();
    format!("[{}]", rows.join(","))
}

#[test]
fn lookup_export_and_import_round_trip_byte_for_byte() -> anyhow::Result<()> {
    let bed = TwoHosts::build("ex")?;
    bed.configure()?;
    let (one, two) = (&bed.hosts[0], &bed.hosts[1]);
    for (vsid, format) in [(8100u32, "json"), (8200, "csv")] {
        let file = bed.tmp_dir().join(format!("in-{vsid}.json"));
        std::fs::write(&file, remote_records(vsid, 500))?;
        one.nvctl(&["lookup", "import", file.to_str().context("utf-8")?])?;
        let listed = one.nvctl_json(&["lookup", "list", "--vsid", &vsid.to_string()])?;
        ensure!(
            listed.as_array().map_or(0, Vec::len) == 500
                && listed
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|r| r["vsid"] == vsid),
            "lookup list --vsid {vsid} is not exactly its 500 records"
        );
        let vs = vsid.to_string();
        let exported = one.nvctl(&["lookup", "export", "--format", format, "--vsid", &vs])?;
        let moved = bed.tmp_dir().join(format!("export-{vsid}.{format}"));
        std::fs::write(&moved, &exported)?;
        two.nvctl(&["lookup", "import", moved.to_str().context("utf-8")?])?;
        let again = two.nvctl(&["lookup", "export", "--format", format, "--vsid", &vs])?;
        ensure!(
            again == exported,
            "{format} export -> import -> export differs ({} vs {} bytes)",
            exported.len(),
            again.len()
        );
        ensure!(
            exported.lines().count() == if format == "json" { 502 } else { 501 },
            "{format} export is not one record a line"
        );
    }
    // The whole table too: both hosts' exports of the two VSIDs, read back as records, agree
    // with what was imported (an independent reading of the export: serde_json).
    let json: serde_json::Value =
        serde_json::from_str(&two.nvctl(&["lookup", "export", "--vsid", "8100"])?)?;
    let original: serde_json::Value = serde_json::from_str(&remote_records(8100, 500))?;
    let key = |v: &serde_json::Value| (v["ca"].as_str().map(str::to_owned), v["name"].to_string());
    let mut a: Vec<_> = json.as_array().into_iter().flatten().map(key).collect();
    let mut b: Vec<_> = original.as_array().into_iter().flatten().map(key).collect();
    a.sort();
    b.sort();
    ensure!(a == b, "the exported records are not the imported ones");
    Ok(())
}

#[test]
fn nvctl_prints_completions_and_man_pages() -> anyhow::Result<()> {
    let nvctl = bin("nvctl")?;
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&nvctl).args(args).output()?;
        ensure!(out.status.success(), "nvctl {args:?} failed");
        Ok(String::from_utf8(out.stdout)?)
    };
    let bash = run(&["completions", "bash"])?;
    ensure!(
        bash.contains("complete -F") && bash.contains("export") && bash.contains("--vsid"),
        "bash completion lacks nvctl's commands"
    );
    let zsh = run(&["completions", "zsh"])?;
    ensure!(
        zsh.starts_with("#compdef nvctl"),
        "zsh completion: {zsh:.40}"
    );
    // man(1) itself renders the pages: they are valid roff with the commands in them.
    for (page, expect) in [("nvctl", "lookup"), ("nv-agent", "--decap-hook")] {
        let roff = run(&["man", page])?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join(format!("{page}.roff"));
        std::fs::write(&file, roff)?;
        let shown = Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(&file)
            .env("MANWIDTH", "100")
            .output()
            .context("run man (package man-db)")?;
        let text = String::from_utf8_lossy(&shown.stdout);
        ensure!(
            shown.status.success() && text.contains(expect),
            "man -l {page}: {}",
            String::from_utf8_lossy(&shown.stderr)
        );
    }
    Ok(())
}
