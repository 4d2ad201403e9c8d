//! Bad input never crashes the agent, corrupts the store or half-applies a change: malformed
//! API requests, config files and import files each get a clear error, the agent keeps
//! running, and the store stays byte for byte as it was. Together with the nvctl cases in
//! `two_hosts` and `rewrite` this covers well over 50 malformed inputs. Also: who may talk to
//! the API socket.
use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::MetadataExt as _, net::UnixStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use nv_tests::{
    sys::bin,
    testbed::{Host, TwoHosts},
};

/// Sends raw bytes to the API socket and returns (status, body).
fn raw(socket: &Path, request: &[u8]) -> anyhow::Result<(u16, String)> {
    raw_waiting(socket, request, Duration::from_secs(10))
}

/// As [`raw`], waiting up to `wait` for the answer. An answer given before the whole request
/// was taken (a refusal) still counts: the agent closes its end then, and writing fails.
fn raw_waiting(socket: &Path, request: &[u8], wait: Duration) -> anyhow::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(wait))?;
    if let Err(e) = s.write_all(request)
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e.into());
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn request(method: &str, path: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: nv\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const RECORD: &str = r#""vsid":5001,"ca":"10.0.0.9","pa":"198.18.0.2","mac":"02:00:00:00:09:09""#;

/// A good route, for the bad ones made from it.
const ROUTE: &str = r#"{"rdid":"contoso","vsid":5001,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0"}"#;

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn malformed_api_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let bed = TwoHosts::build("a")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    let long_name = format!(r#"{{{RECORD},"name":"{}"}}"#, "x".repeat(100_000));
    let cases: Vec<(&str, &str, &str, String)> = vec![
        ("POST", "/v1/lookups", "application/json", "{".into()),
        ("POST", "/v1/lookups", "application/json", "[]".into()),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!(
                "{{{}}}",
                RECORD.replace(r#""vsid":5001"#, r#""vsid":"5001""#)
            ),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!(r#"{{{RECORD},"evil":1}}"#),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            r#"{"vsid":5001,"ca":"10.0.0.9","pa":"198.18.0.2"}"#.into(),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!("{{{}}}", RECORD.replace("5001", "-1")),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!("{{{}}}", RECORD.replace("5001", "1099511627776")),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!("{{{}}}", RECORD.replace("10.0.0.9", "10.0.0.256")),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!(
                "{{{}}}",
                RECORD.replace("02:00:00:00:09:09", "zz:zz:zz:zz:zz:zz")
            ),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!(r#"{{{RECORD},"method":"nat"}}"#),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!(r#"{{{RECORD},"port":"../../etc"}}"#),
        ),
        (
            "POST",
            "/v1/lookups",
            "application/json",
            format!(r#"{{{RECORD},"name":"a\u0001b"}}"#),
        ),
        ("POST", "/v1/lookups", "application/json", long_name),
        ("POST", "/v1/lookups", "text/plain", format!("{{{RECORD}}}")),
        (
            "DELETE",
            "/v1/lookups?vsid=abc&ca=10.0.0.1",
            "application/json",
            String::new(),
        ),
        ("DELETE", "/v1/lookups", "application/json", String::new()),
        (
            "POST",
            "/v1/providers",
            "application/json",
            r#"{"pa":"198.18.0.9"}"#.into(),
        ),
        (
            "POST",
            "/v1/providers",
            "application/json",
            r#"{"pa":"198.18.0.9/40"}"#.into(),
        ),
        (
            "POST",
            "/v1/providers",
            "application/json",
            r#"{"pa":"fe80::9/64"}"#.into(),
        ),
        (
            "POST",
            "/v1/lookups/move",
            "application/json",
            r#"{"vsid":5001,"ca":"10.0.0.99","pa":"198.18.0.2"}"#.into(),
        ),
        ("GET", "/v2/lookups", "application/json", String::new()),
        (
            "PUT",
            "/v1/lookups",
            "application/json",
            format!("{{{RECORD}}}"),
        ),
        (
            "POST",
            "/v1/lookups/import",
            "application/json",
            r#"[{"vsid":1}]"#.into(),
        ),
        (
            "POST",
            "/v1/lookups/import",
            "application/json",
            format!("[{{{RECORD}}},{{{}}}]", RECORD.replace("5001", "12")),
        ),
        // Routes: malformed, of bad fields, or a file with one bad route among good ones.
        ("POST", "/v1/routes", "application/json", "{".into()),
        (
            "POST",
            "/v1/routes",
            "application/json",
            ROUTE.replace("10.1.0.0/24", "10.1.0.1/24"),
        ),
        (
            "POST",
            "/v1/routes",
            "application/json",
            ROUTE.replace("contoso", "con toso"),
        ),
        (
            "POST",
            "/v1/routes",
            "application/json",
            ROUTE.replace("contoso", &"c".repeat(65)),
        ),
        (
            "POST",
            "/v1/routes",
            "application/json",
            ROUTE.replace("10.1.0.0/24", "fd00::/64"),
        ),
        (
            "POST",
            "/v1/routes",
            "application/json",
            ROUTE.replace("0.0.0.0\"", "10.9.0.1\""),
        ),
        (
            "POST",
            "/v1/routes",
            "application/json",
            ROUTE.replace('}', r#","evil":1}"#),
        ),
        (
            "DELETE",
            "/v1/routes?rdid=contoso&prefix=10.1.0.0/24",
            "application/json",
            String::new(),
        ),
        (
            "DELETE",
            "/v1/routes?rdid=contoso",
            "application/json",
            String::new(),
        ),
        (
            "GET",
            "/v1/routes?rdid=a%20b",
            "application/json",
            String::new(),
        ),
        (
            "POST",
            "/v1/routes/import",
            "application/json",
            format!("[{ROUTE},{}]", ROUTE.replace("5001", "12")),
        ),
    ];
    let before = h.store_files()?;
    for (method, path, content_type, body) in &cases {
        let shown = &body[..body.len().min(80)];
        let (status, answer) = raw(&h.socket, &request(method, path, content_type, body))
            .with_context(|| format!("{method} {path} {shown}"))?;
        ensure!(
            (400..500).contains(&status),
            "{method} {path} {shown}: status {status}, body {answer}"
        );
        ensure!(
            h.store_files()? == before,
            "{method} {path} {shown}: changed the store"
        );
    }
    // Not even HTTP.
    let (status, _) = raw(&h.socket, b"GARBAGE\r\n\r\n")?;
    ensure!(status == 400, "garbage got {status}");
    // Our own handlers explain themselves in one JSON line.
    let (_, answer) = raw(
        &h.socket,
        &request(
            "POST",
            "/v1/lookups",
            "application/json",
            &format!(r#"{{{RECORD},"method":"nat"}}"#),
        ),
    )?;
    let json: serde_json::Value =
        serde_json::from_str(&answer).with_context(|| format!("not JSON: {answer}"))?;
    ensure!(
        json["error"].as_str().is_some_and(|e| !e.contains('\n')),
        "error body: {answer}"
    );
    // Still serving, still forwarding; the good route goes in (positive control).
    ensure!(
        h.nvctl_json(&["lookup", "list"])?.as_array().map(Vec::len) == Some(4)
            && h.nvctl_json(&["route", "list"])?.as_array().map(Vec::len) == Some(0),
        "records or routes changed"
    );
    let (status, answer) = raw(
        &h.socket,
        &request("POST", "/v1/routes", "application/json", ROUTE),
    )?;
    ensure!(status == 201, "the good route: {status} {answer}");
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "forwarding broken after bad requests"
    );
    Ok(())
}

/// Runs nv-agent with `config` in host1's namespace; it must exit non-zero within 20 s
/// with one line that mentions `expect`.
fn agent_refuses(
    bed: &TwoHosts,
    h: &Host,
    name: &str,
    config: &str,
    expect: &str,
) -> anyhow::Result<()> {
    let dir = bed.tmp_dir().join(format!("cfg-{name}"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("agent.toml");
    std::fs::write(&file, config)?;
    let out = Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net={}", h.ns.path()))
        .arg(bin("nv-agent")?)
        .arg("--config")
        .arg(if name == "missing-file" {
            dir.join("nope.toml")
        } else {
            file
        })
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .arg("--pin-path")
        .arg(format!("/sys/fs/bpf/{}-{name}", bed.prefix))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    ensure!(
        code.is_some_and(|c| c != 0 && c != 124),
        "{name}: exit {code:?} (124 is a hang): {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    ensure!(
        lines.len() == 1 && lines[0].contains(expect),
        "{name}: expected one error line mentioning '{expect}': {stderr}"
    );
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-{name}", bed.prefix));
    ensure!(!pins.exists(), "{name}: left pins behind");
    Ok(())
}

/// Config files the agent refuses, and what its one line says.
const BAD_CONFIGS: &[(&str, &str, &str)] = &[
    ("wrong-type", "uplink = 5\n", "invalid type"),
    ("unknown-key", "uplinks = \"uplink0\"\n", "unknown field"),
    (
        "zero-lookups",
        "uplink = \"uplink0\"\nmax_lookups = 0\n",
        "out of range",
    ),
    (
        "negative-lookups",
        "uplink = \"uplink0\"\nmax_lookups = -5\n",
        "max_lookups",
    ),
    (
        "bad-metrics",
        "uplink = \"uplink0\"\nmetrics_addr = \"not an address\"\n",
        "metrics_addr",
    ),
    (
        "bad-hook",
        "uplink = \"uplink0\"\ndecap_hook = \"ebpf\"\n",
        "unknown variant",
    ),
    ("not-toml", "[[[\n", "config"),
    ("bad-ifname", "uplink = \"a/b\"\n", "invalid uplink"),
    ("missing-file", "", "cannot read config"),
    ("no-such-uplink", "uplink = \"nosuch9\"\n", "does not exist"),
    (
        "no-uplink",
        "state_dir = \"/tmp/x\"\n",
        "no uplink configured",
    ),
    (
        "etcd-tls-without-ca",
        "uplink = \"uplink0\"\netcd_endpoints = \"https://198.18.255.254:2379\"\n",
        "etcd_ca_file is needed with https:// endpoints",
    ),
    (
        "etcd-tls-files-over-http",
        "uplink = \"uplink0\"\netcd_endpoints = \"http://198.18.255.254:2379\"\netcd_ca_file = \"/etc/hostname\"\n",
        "etcd_ca_file is for https:// endpoints",
    ),
    (
        "etcd-ca-not-pem",
        "uplink = \"uplink0\"\netcd_endpoints = \"https://198.18.255.254:2379\"\netcd_ca_file = \"/etc/hostname\"\n",
        "holds no PEM CERTIFICATE",
    ),
    (
        "etcd-cert-without-key",
        "uplink = \"uplink0\"\netcd_endpoints = \"https://198.18.255.254:2379\"\netcd_ca_file = \"/etc/hostname\"\netcd_cert_file = \"/etc/hostname\"\n",
        "without etcd_key_file",
    ),
    (
        "etcd-files-alone",
        "uplink = \"uplink0\"\netcd_cert_file = \"/etc/hostname\"\n",
        "etcd_endpoints is not set",
    ),
];

#[test]
fn malformed_config_and_import_files_are_refused() -> anyhow::Result<()> {
    let bed = TwoHosts::build("c")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    let before = h.store_files()?;
    for (name, config, expect) in BAD_CONFIGS {
        agent_refuses(&bed, h, name, config, expect)?;
    }
    let file = |name: &str, text: &str| -> anyhow::Result<String> {
        let p = bed.tmp_dir().join(name);
        std::fs::write(&p, text)?;
        Ok(p.to_string_lossy().into_owned())
    };
    let imports = [
        (file("empty.csv", "")?, "holds no records"),
        (file("header.csv", "vsid,ca,pa,mac\n")?, "holds no records"),
        (
            file(
                "bad-ip.csv",
                "vsid,ca,pa,mac\n5001,10.0.0.300,198.18.0.2,02:00:00:00:09:09\n",
            )?,
            "line 2",
        ),
        (
            file("no-mac.csv", "vsid,ca,pa\n5001,10.0.0.9,198.18.0.2\n")?,
            "mac",
        ),
        (
            file("object.json", r#"{"vsid":5001}"#)?,
            "not a list of records",
        ),
        (
            file("dup.json", &format!("[{{{RECORD}}},{{{RECORD}}}]"))?,
            "already exists",
        ),
        (
            file(
                "mixed.csv",
                "vsid,ca,pa,mac,method\n5001,10.0.0.9,198.18.0.77,02:00:00:00:09:09,rewrite\n",
            )?,
            "one method",
        ),
        (
            file("nofile", "")?.replace("nofile", "does-not-exist.csv"),
            "cannot read",
        ),
    ];
    for (path, expect) in &imports {
        h.expect_refused(&["lookup", "import", path], expect)?;
    }
    ensure!(
        h.store_files()? == before,
        "a refused config or import changed the running agent's store"
    );
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "forwarding broken");
    Ok(())
}

#[test]
fn the_api_socket_admits_root_and_its_group_only() -> anyhow::Result<()> {
    let bed = TwoHosts::build("s")?;
    let h = &bed.hosts[0];
    let meta = std::fs::metadata(&h.socket)?;
    ensure!(
        meta.mode() & 0o777 == 0o660,
        "socket mode {:o}",
        meta.mode() & 0o777
    );
    let as_nobody = |groups: &str| -> anyhow::Result<std::process::Output> {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534"]);
        if groups.is_empty() {
            cmd.arg("--clear-groups");
        } else {
            cmd.arg(format!("--groups={groups}"));
        }
        Ok(cmd
            .arg(bin("nvctl")?)
            .arg("--socket")
            .arg(&h.socket)
            .args(["lookup", "list"])
            .output()?)
    };
    let refused = as_nobody("")?;
    let err = String::from_utf8_lossy(&refused.stderr);
    if refused.status.success() || !err.contains("Permission denied") {
        bail!("a user outside the socket's group got in: {err}");
    }
    // The socket's group (nv where it exists, else root's) is let in.
    let member = as_nobody(&meta.gid().to_string())?;
    ensure!(
        member.status.success(),
        "a member of the socket's group was refused: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    Ok(())
}

/// Entries of a host's pinned lookup map, as bpftool dumps it.
fn lookup_entries(h: &Host) -> anyhow::Result<usize> {
    let dump = h.map_dump("NV_LOOKUPS")?;
    Ok(dump.as_array().context("a list of entries")?.len())
}

/// An import of 3000 records of VSID `vsid` as one request.
fn import_request(vsid: u32) -> Vec<u8> {
    import_of(vsid, 3000)
}

/// An import of `n` records of VSID `vsid` as one request.
fn import_of(vsid: u32, n: u32) -> Vec<u8> {
    let records: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"vsid":{vsid},"ca":"10.{}.{}.{}","pa":"198.18.0.2","mac":"02:09:00:{:02x}:{:02x}:{:02x}"}}"#,
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff,
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            )
        })
        .collect();
    request(
        "POST",
        "/v1/lookups/import",
        "application/json",
        &format!("[{}]", records.join(",")),
    )
}

#[test]
fn clients_that_hang_up_mid_change_leave_store_and_maps_agreeing() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("hu")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    // The positive control: over a connection that stays, an import is applied whole.
    let (code, body) = raw(&h.socket, &import_request(6999))?;
    ensure!(code == 201, "the full import answered {code}: {body}");
    let mut expected = h.listed()?;
    ensure!(
        lookup_entries(h)? == expected,
        "the full import is not all in the map"
    );
    // The client gone after sending the whole body (at once, or some milliseconds into the
    // change), after half of it, or mid-way through the request line. Whatever the connection did, the agent ends in the old state
    // or the new one (a whole body may still be refused unread, but a change once begun runs
    // to its end), store and maps agreeing.
    let mut applied = 0;
    let rounds = [
        (1.0f64, 0u64),
        (0.5, 0),
        (1.0, 5),
        (0.01, 0),
        (1.0, 15),
        (1.0, 30),
        (1.0, 60),
    ];
    for (round, (cut, linger_ms)) in (0u32..).zip(rounds) {
        let req = import_request(7000 + round);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a prefix of a short request"
        )]
        let sent = (req.len() as f64 * cut) as usize;
        let mut s = UnixStream::connect(&h.socket)?;
        s.write_all(&req[..sent])?;
        std::thread::sleep(Duration::from_millis(linger_ms));
        drop(s);
        let states = if cut >= 1.0 {
            vec![expected, expected + 3000]
        } else {
            vec![expected]
        };
        // Settled: the same on both sides twice in a row, 5 s at most.
        let mut settled = None;
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            let now = h.listed()?;
            if states.contains(&now) && lookup_entries(h)? == now {
                std::thread::sleep(Duration::from_millis(200));
                if h.listed()? == now && lookup_entries(h)? == now {
                    settled = Some(now);
                    break;
                }
            }
        }
        let Some(now) = settled else {
            bail!(
                "round {round} (cut at {cut}, gone after {linger_ms} ms): {} records listed, {} in the map, expected one of {states:?}",
                h.listed()?,
                lookup_entries(h)?
            );
        };
        applied += usize::from(now != expected);
        expected = now;
    }
    println!("{applied} of 5 whole-body imports whose client hung up were applied");
    // And the store agrees: a restarted agent lists the same.
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent()?;
    let after = bed.hosts[0].listed()?;
    ensure!(
        after == expected,
        "after a restart: {after} records, expected {expected}"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "forwarding stopped after the hang-ups"
    );
    Ok(())
}

/// The agent's peak resident memory so far (`VmHWM`), in bytes.
fn peak_rss(h: &Host) -> anyhow::Result<u64> {
    let pid = h.agent.as_ref().context("agent not running")?.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

#[test]
fn many_large_imports_at_once_neither_exhaust_memory_nor_stall_the_agent() -> anyhow::Result<()> {
    let bed = TwoHosts::build("mi")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    stalled_imports_hold_no_slot_others_need(h)?;
    concurrent_imports_take_turns(h)?;
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "forwarding stopped during the imports"
    );
    Ok(())
}

fn stalled_imports_hold_no_slot_others_need(h: &Host) -> anyhow::Result<()> {
    // Forty clients start an import of 10 MB and stall after its first kilobyte, as a slow or
    // hostile client would. One is read, four wait their turn unread, the other 35 are refused
    // at once; none of them holds a slot that other requests need.
    let head = format!(
        "POST /v1/lookups/import HTTP/1.1\r\nhost: nv\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n[",
        10_000_000
    );
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let mut s = UnixStream::connect(&h.socket)?;
        // A refused one may be answered and closed before its kilobyte is written.
        for part in [head.as_bytes(), &[b' '; 1024]] {
            if let Err(e) = s.write_all(part)
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(e.into());
            }
        }
        stalled.push(s);
    }
    let (code, body) = raw(
        &h.socket,
        &request("GET", "/v1/status", "application/json", ""),
    )?;
    ensure!(
        code == 200,
        "status behind 40 stalled imports answered {code}: {body}"
    );
    h.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.9",
        "--pa",
        "198.18.0.2",
        "--mac",
        "02:00:00:00:09:09",
    ])?;
    let mut refused = 0;
    let mut silent = 0;
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 512];
        // A signal to this process (another test's child ending) may cut the wait short.
        let read = loop {
            match s.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        match read {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]);
                ensure!(
                    text.starts_with("HTTP/1.1 503") && text.contains("retry when one is done"),
                    "a stalled import was answered {text:?}"
                );
                refused += 1;
            }
            Ok(_) => bail!("a stalled import's connection was closed without an answer"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                silent += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    ensure!(
        refused == 35 && silent == 5,
        "of 40 stalled imports {refused} were refused and {silent} admitted; expected 35 and 5"
    );
    drop(stalled);
    Ok(())
}

fn concurrent_imports_take_turns(h: &Host) -> anyhow::Result<()> {
    // Hung up, the stalled imports free their turns: a whole import goes through (the
    // positive control).
    let before = h.listed()?;
    let base = peak_rss(h)?;
    let table = import_of(8000, 100_000);
    let mut answered = None;
    for _ in 0..50 {
        let (code, body) = raw(&h.socket, &table)?;
        if code != 503 {
            answered = Some((code, body));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = answered.context("imports still refused after their clients hung up")?;
    ensure!(
        code == 201,
        "a 100,000-record import answered {code}: {body}"
    );
    let one = peak_rss(h)?;

    // Twelve clients send the same 10 MB table at once: each is parsed in its turn and
    // refused (its records exist), or refused unread. Memory must not grow with their number.
    let answers: Vec<anyhow::Result<(u16, String)>> = std::thread::scope(|scope| {
        let jobs: Vec<_> = (0..12)
            .map(|_| scope.spawn(|| raw_waiting(&h.socket, &table, Duration::from_mins(2))))
            .collect();
        jobs.into_iter()
            .map(|j| j.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .collect()
    });
    let mut conflicts = 0;
    for a in answers {
        let (code, body) = a?;
        ensure!(
            (code == 400 && body.contains("already exists"))
                || (code == 503 && body.contains("retry when one is done")),
            "a concurrent import answered {code}: {body}"
        );
        conflicts += usize::from(code == 400);
    }
    let twelve = peak_rss(h)?;
    println!(
        "peak RSS: {} MiB before, {} MiB after one import, {} MiB after 12 at once ({conflicts} parsed and refused, the rest refused unread)",
        base >> 20,
        one >> 20,
        twelve >> 20
    );
    ensure!(conflicts >= 5, "only {conflicts} of 12 imports were read");
    ensure!(
        twelve - one <= one - base,
        "12 imports at once grew the agent by {} MiB, more than one whole import ({} MiB)",
        (twelve - one) >> 20,
        (one - base) >> 20
    );
    ensure!(h.listed()? == before + 100_000, "the table changed");
    Ok(())
}
