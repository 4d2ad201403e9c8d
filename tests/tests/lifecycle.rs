//! The agent as systemd runs it: readiness told only once it forwards and serves, a unit file
//! systemd accepts, and a default config whose every key the agent takes.
use std::{os::unix::net::UnixDatagram, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use nv_tests::{
    sys::bin,
    testbed::{PingStream, TwoHosts},
};

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
    let records = bed.hosts[0].listed()?;
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
    let listed = bed.hosts[0].listed()?;
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
    // The README shows this unit, whole, and no other.
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let dist = std::fs::read_to_string(root.join("dist/nv-agent.service"))?;
    ensure!(
        readme.contains(&format!("```ini\n{dist}```")) && readme.matches("[Service]").count() == 1,
        "README.md must show dist/nv-agent.service as its one systemd unit"
    );
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
            let [_, hi, a, b] = i.to_be_bytes();
            let x = 20 + hi;
            let name = if i % 3 == 0 {
                format!(r#","name":"vm {i}, \"web\"""#)
            } else {
                String::new()
            };
            format!(
                r#"{{"vsid":{vsid},"ca":"10.{x}.{a}.{b}","pa":"198.18.0.9","mac":"02:20:00:{hi:02x}:{a:02x}:{b:02x}"{name}}}"#
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
        if format == "csv" {
            // On a terminal (script(1) gives it one) the import says what it is doing.
            let cmd = format!(
                "{} --socket {} lookup import {}",
                bin("nvctl")?.display(),
                two.socket.display(),
                moved.display()
            );
            let out = Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .output()
                .context("run script (package bsdutils)")?;
            let shown = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success()
                    && shown.contains(&format!("sending {}", moved.display()))
                    && shown.contains("checks every record"),
                "import on a terminal: {shown}"
            );
        } else {
            two.nvctl(&["lookup", "import", moved.to_str().context("utf-8")?])?;
        }
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

/// What bpftool says of the map pinned at `pin`.
fn map_show(pin: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&nv_tests::sys::run(
        "bpftool",
        &[
            "-j",
            "map",
            "show",
            "pinned",
            pin.to_str().context("utf-8")?,
        ],
    )?)?)
}

fn pinned_entries(pin: &std::path::Path) -> anyhow::Result<u64> {
    map_show(pin)?["max_entries"]
        .as_u64()
        .context("max_entries")
}

/// Forwarding never stops: a stream of 20,000 pings between two VMs on two hosts loses none
/// while both agents are killed (SIGKILL) and started again, then replaced by agents whose
/// maps have another layout: a lookup map of another size (`--max-lookups`) and a counter map
/// left by an older nv (64 slots, put in place of the pin with bpftool); then by another build
/// (nv-common's `layout-probe`: an extra field in the local-PA map's value and one more
/// counter), and back. Each new agent migrates the maps while the old programs forward, swaps
/// the programs, and carries the counters over.
#[test]
fn forwarding_never_stops_across_agent_kills_and_a_map_migration() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("up")?;
    bed.configure()?;
    let stream = PingStream::start(&bed, "RED-1", "10.0.0.2", 20_000, "0.001")?;
    std::thread::sleep(Duration::from_secs(1));
    for h in &mut bed.hosts {
        h.kill_agent();
    }
    std::thread::sleep(Duration::from_millis(500));
    for h in &mut bed.hosts {
        h.start_agent()?;
    }
    std::thread::sleep(Duration::from_secs(1));

    // An older nv's counter map on host 1, with a count in slot 0 (vm_tx_encap).
    let h1 = &mut bed.hosts[0];
    h1.stop_agent();
    let counters = h1.pin_path.join("maps/NV_COUNTERS");
    std::fs::remove_file(&counters)?;
    let pin = counters.to_str().context("utf-8")?;
    nv_tests::sys::run(
        "bpftool",
        &[
            "map",
            "create",
            pin,
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "64",
            "name",
            "NV_COUNTERS",
        ],
    )?;
    nv_tests::sys::run(
        "bpftool",
        &[
            "map", "update", "pinned", pin, "key", "0", "0", "0", "0", "value", "0x40", "0x42",
            "0x0f", "0", "0", "0", "0", "0",
        ],
    )?;
    // 1,000,000 (0x0f4240) on every CPU.
    let old_count = 1_000_000 * u64::try_from(std::thread::available_parallelism()?.get())?;
    for h in &mut bed.hosts {
        h.stop_agent();
        h.agent_args.extend(["--max-lookups".into(), "4096".into()]);
        h.start_agent()?;
    }
    let mut logs: Vec<(&str, String, String)> = bed
        .hosts
        .iter()
        .map(|h| ("max_lookups", h.name.clone(), h.agent_log()))
        .collect();
    logs.extend(swap_builds(&mut bed)?);
    let (sent, received) = stream.finish()?;
    ensure!(
        sent == 20_000 && received == 20_000,
        "{received} of {sent} pings answered across kills, migrations and two builds"
    );
    for (which, name, log) in &logs {
        let map = if *which == "max_lookups" {
            "NV_LOOKUPS"
        } else {
            "NV_LOCAL_PAS"
        };
        ensure!(
            log.contains(&format!("migrating map {map}"))
                && log.contains(&format!("map {map} migrated")),
            "{name}, {which}: no migration of {map} in the log: {log}"
        );
    }
    for h in &bed.hosts {
        ensure!(
            pinned_entries(&h.pin_path.join("maps/NV_LOOKUPS"))? == 4096,
            "{}: the lookup map has not the new size",
            h.name
        );
        ensure!(
            !h.pin_path.join("migrating").exists(),
            "{}: old pins left behind",
            h.name
        );
    }
    let h1 = &bed.hosts[0];
    ensure!(
        pinned_entries(&h1.pin_path.join("maps/NV_COUNTERS"))?
            == u64::from(nv_common::Counter::SLOTS),
        "the counter map was not migrated"
    );
    let encap = h1.counters()?.get("vm_tx_encap").copied().unwrap_or(0);
    ensure!(
        encap >= old_count,
        "vm_tx_encap {encap}: the old map's {old_count} were not carried over"
    );
    ensure!(h1.listed()? > 0, "records lost");
    Ok(())
}

/// Replaces both agents by another build, whose local-PA map has an extra field and which has
/// one more counter, then by this build again; each agent's log, by which swap it was.
fn swap_builds(bed: &mut TwoHosts) -> anyhow::Result<Vec<(&'static str, String, String)>> {
    let probe = nv_tests::sys::probe_agent()?;
    let mut logs = Vec::new();
    for build in [Some(probe), None] {
        for h in &mut bed.hosts {
            h.stop_agent();
            h.agent_bin.clone_from(&build);
            h.start_agent()?;
        }
        let which = if build.is_some() { "probe" } else { "back" };
        for h in &bed.hosts {
            logs.push((which, h.name.clone(), h.agent_log()));
            let probe_counter = h.counters()?.contains_key("layout_probe");
            ensure!(
                probe_counter == build.is_some(),
                "{}: the layout_probe counter is {} after the {which} upgrade",
                h.name,
                if probe_counter { "there" } else { "missing" }
            );
        }
    }
    Ok(logs)
}

/// `bpftool map ... pinned NV_LOOKUPS` on `h`, with `args` after the map.
fn lookup_map(h: &nv_tests::testbed::Host, verb: &str, args: &[&str]) -> anyhow::Result<String> {
    let pin = h.pin_path.join("maps/NV_LOOKUPS");
    let mut all = vec!["map", verb, "pinned", pin.to_str().context("utf-8")?];
    all.extend_from_slice(args);
    nv_tests::sys::run("bpftool", &all)
}

/// RED's entry for 10.0.0.2 (VSID 5001), as the map's key bytes.
const RED2_KEY: [&str; 9] = ["hex", "89", "13", "00", "00", "0a", "00", "00", "02"];
/// An entry no record has: VSID 5001, 10.0.0.99.
const STRAY_KEY: [&str; 9] = ["hex", "89", "13", "00", "00", "0a", "00", "00", "63"];

fn drift(h: &nv_tests::testbed::Host) -> anyhow::Result<()> {
    let mut del = vec!["key"];
    del.extend(RED2_KEY);
    lookup_map(h, "delete", &del)?;
    let mut add = vec!["key"];
    add.extend(STRAY_KEY);
    add.push("value");
    add.push("hex");
    add.extend(["00"; 28]);
    lookup_map(h, "update", &add)?;
    Ok(())
}

#[test]
fn drift_behind_the_agents_back_is_repaired_at_start_and_periodically() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build_with("dr", &["--reconcile-interval", "1"])?;
    bed.configure()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "no traffic to begin with"
    );

    // While the agent is stopped, bpftool deletes RED-2's entry and adds a stray one: RED-1
    // loses RED-2 (the drift matters), and the agent repairs both when it starts.
    bed.hosts[0].stop_agent();
    drift(&bed.hosts[0])?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 0,
        "the deleted entry did not matter"
    );
    bed.hosts[0].start_agent()?;
    let log = bed.hosts[0].agent_log();
    ensure!(
        log.contains("repaired NV_LOOKUPS at start: 1 entries written, 1 removed"),
        "no repair at start in the log: {log}"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "not repaired at start"
    );

    // While it runs: the periodic reconcile (every second here) repairs the same drift.
    drift(&bed.hosts[0])?;
    let mut repaired = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        if bed.hosts[0]
            .agent_log()
            .contains("repaired NV_LOOKUPS by the periodic reconcile: 1 entries written, 1 removed")
        {
            repaired = true;
            break;
        }
    }
    ensure!(
        repaired,
        "no periodic repair in 10 s: {}",
        bed.hosts[0].agent_log()
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "not repaired by the periodic reconcile"
    );
    let mut stray = vec!["key"];
    stray.extend(STRAY_KEY);
    ensure!(
        lookup_map(&bed.hosts[0], "lookup", &stray).is_err(),
        "the stray entry is still in the map"
    );
    let status = bed.hosts[0].nvctl_json(&["status"])?;
    ensure!(
        status["repaired"].as_u64() == Some(4) && status["reconciles"].as_u64() >= Some(2),
        "status does not count the repairs: {status}"
    );
    ensure!(
        status["programs"].as_str().is_some_and(|p| p.len() == 16)
            && status["store"]
                .as_str()
                .is_some_and(|p| p.ends_with("/nv.redb"))
            && status["store_bytes"].as_u64() > Some(0),
        "status lacks the programs' fingerprint or the store: {status}"
    );
    Ok(())
}

/// SIGKILL at 20 moments spread over a 100,000-record import (from before its request is read
/// to after it is answered): each time the agent starts again, with the records from before the
/// import or with all of them, never some, and store and maps agree.
#[test]
fn sigkill_during_a_large_import_leaves_the_old_state_or_the_new() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("ck")?;
    bed.configure()?;
    let file = bed.tmp_dir().join("big.json");
    std::fs::write(&file, remote_records(8300, 100_000))?;
    let file = file.to_str().context("utf-8")?.to_owned();
    let nvctl = bin("nvctl")?;
    let import = |h: &nv_tests::testbed::Host| {
        Command::new(&nvctl)
            .arg("--socket")
            .arg(&h.socket)
            .args(["lookup", "import", &file])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    // The configured store, to go back to before each trial.
    let saved = bed.tmp_dir().join("configured-state");
    bed.hosts[0].stop_agent();
    nv_tests::sys::run(
        "cp",
        &[
            "-a",
            bed.hosts[0].state_dir.to_str().context("utf-8")?,
            saved.to_str().context("utf-8")?,
        ],
    )?;
    bed.hosts[0].start_agent()?;
    // The positive control, and how long a whole import takes here.
    let before = bed.hosts[0].listed()?;
    let started = std::time::Instant::now();
    let out = Command::new(&nvctl)
        .arg("--socket")
        .arg(&bed.hosts[0].socket)
        .args(["lookup", "import", &file])
        .output()?;
    ensure!(
        out.status.success(),
        "the import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = started.elapsed();
    ensure!(bed.hosts[0].listed()? == before + 100_000, "not imported");
    let (mut old, mut new, mut cut) = (0, 0, 0);
    for trial in 0..20u32 {
        // Back to the configured store.
        let h = &mut bed.hosts[0];
        h.stop_agent();
        std::fs::remove_dir_all(&h.state_dir)?;
        nv_tests::sys::run(
            "cp",
            &[
                "-a",
                saved.to_str().context("utf-8")?,
                h.state_dir.to_str().context("utf-8")?,
            ],
        )?;
        h.start_agent()?;
        ensure!(
            h.listed()? == before,
            "trial {trial}: not back to the start"
        );
        let mut client = import(h)?;
        std::thread::sleep(whole.mul_f64(1.2 * (f64::from(trial) + 0.5) / 20.0));
        h.kill_agent();
        cut += usize::from(!client.wait()?.success());
        h.start_agent()?;
        let now = h.listed()?;
        if now == before {
            old += 1;
        } else if now == before + 100_000 {
            new += 1;
        } else {
            anyhow::bail!(
                "trial {trial}: {now} records after the kill, {before} before the import"
            );
        }
    }
    println!("20 kills: {old} left the old state, {new} the new; {cut} cut the import's request");
    ensure!(cut > 0, "no kill landed before the import was answered");
    let dump = bed.hosts[0].map_dump("NV_LOOKUPS")?;
    ensure!(
        dump.as_array().map_or(0, Vec::len) == bed.hosts[0].listed()?,
        "store and map disagree after the last kill"
    );
    Ok(())
}

#[test]
fn a_full_lookup_table_is_refused_with_the_way_out_and_nothing_changed() -> anyhow::Result<()> {
    let bed = TwoHosts::build_with("fu", &["--max-lookups", "8"])?;
    bed.configure()?;
    let h = &bed.hosts[0];
    let before = h.listed()?;
    ensure!(before < 8, "the bed already holds {before} records");
    let room = 8 - before;
    // An import one record too big: refused whole.
    let file = bed.tmp_dir().join("too-many.json");
    let n = u32::try_from(room + 1)?;
    std::fs::write(&file, remote_records(8400, n))?;
    let out = Command::new(bin("nvctl")?)
        .arg("--socket")
        .arg(&h.socket)
        .args(["lookup", "import", file.to_str().context("utf-8")?])
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && said.lines().count() == 1
            && said.contains(&format!("lookup table full: {before} entries of 8"))
            && said.contains("raise max_lookups"),
        "an import over max_lookups: {said}"
    );
    ensure!(
        h.listed()? == before,
        "the refused import changed the table"
    );
    // Filled to the last entry one by one (the positive control), then one more is refused.
    let file = bed.tmp_dir().join("fits.json");
    std::fs::write(&file, remote_records(8400, u32::try_from(room)?))?;
    h.nvctl(&["lookup", "import", file.to_str().context("utf-8")?])?;
    ensure!(h.listed()? == 8, "the table is not full");
    let err = h
        .nvctl(&[
            "lookup",
            "add",
            "--vsid",
            "8401",
            "--ca",
            "10.9.9.9",
            "--pa",
            "198.18.0.9",
            "--mac",
            "02:00:00:09:09:09",
        ])
        .err()
        .context("a record over max_lookups was accepted")?;
    ensure!(
        err.to_string()
            .contains("lookup table full: 8 entries of 8"),
        "{err}"
    );
    ensure!(h.listed()? == 8, "the refused add changed the table");
    // A restart with a lookup map too small for the store: refused before any pin is touched,
    // forwarding on; the old size starts again (the positive control).
    let mut bed = bed;
    let pin = bed.hosts[0].pin_path.join("maps/NV_LOOKUPS");
    let entries_before = map_show(&pin)?;
    bed.hosts[0].stop_agent();
    bed.hosts[0].agent_args = vec!["--max-lookups".into(), "4".into()];
    let refused = bed.hosts[0]
        .start_agent()
        .err()
        .context("an agent with max_lookups below the store's records started")?;
    ensure!(
        refused
            .to_string()
            .contains("the store holds 8 lookup records, more than max_lookups (4)"),
        "{refused}"
    );
    ensure!(
        map_show(&pin)? == entries_before,
        "the refused start changed the lookup map"
    );
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "forwarding stopped");
    bed.hosts[0].agent_args = vec!["--max-lookups".into(), "8".into()];
    bed.hosts[0].start_agent()?;
    ensure!(bed.hosts[0].listed()? == 8, "records lost");
    Ok(())
}
