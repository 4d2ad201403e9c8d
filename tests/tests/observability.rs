//! Observability with real clients: a real Prometheus scrapes both agents, and after known
//! traffic its query API returns the per-VSID, drop, map and API figures; promtool checks the
//! exposition and the alert rules.
use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};
use nv_tests::{
    prometheus::Prometheus,
    testbed::{TwoHosts, monitor_events},
};

/// Bytes of one `ping` echo as the VM sends it: Ethernet 14, IPv4 20, ICMP 8, data 56.
const PING_FRAME: f64 = 98.0;
const HOSTS: [&str; 2] = ["198.18.0.1:9469", "198.18.0.2:9469"];

/// An instant query's one value on `host` (0 when the series does not exist yet).
fn value(p: &Prometheus, metric: &str, host: &str, labels: &str) -> anyhow::Result<f64> {
    let q = format!("sum({metric}{{instance=\"{host}\"{labels}}}) or vector(0)");
    let got = p.query(&q)?;
    got.first().map(|(_, v)| *v).context("no sample")
}

/// The metrics text of the agent at `target`, fetched from the underlay.
fn scrape(bed: &TwoHosts, target: &str) -> anyhow::Result<String> {
    bed.underlay.exec(
        "curl",
        &[
            "-sf",
            "--max-time",
            "5",
            &format!("http://{target}/metrics"),
        ],
    )
}

#[test]
fn prometheus_sees_per_vsid_traffic_drops_maps_and_api_requests() -> anyhow::Result<()> {
    let bed = TwoHosts::build_with("pm", &["--metrics-addr", "0.0.0.0:9469"])?;
    bed.configure()?;
    // The underlay gets an address of its own, so Prometheus there reaches both agents.
    bed.underlay
        .ip(&["addr", "add", "198.18.255.254/15", "dev", "br0"])?;
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/nv-alerts.yml");
    let targets: Vec<String> = HOSTS.iter().map(|h| (*h).to_owned()).collect();
    let prom = Prometheus::start(
        &bed.underlay,
        &bed.tmp_dir().join("prometheus"),
        "127.0.0.1:9090",
        &targets,
        &[&rules],
    )?;
    // Both agents scraped, with the records configure added: the baseline is after that.
    for h in HOSTS {
        prom.wait_for(&format!("nv_lookup_records{{instance=\"{h}\"}}"), |v| {
            (v - 4.0).abs() < 0.5
        })?;
    }
    known_traffic_is_counted(&bed, &prom)?;
    the_agents_state_is_reported(&prom)?;
    promtool_reads_the_exposition(&bed)
}

/// Per-VSID packets and bytes, and drops by reason, grow by exactly what known traffic sent.
fn known_traffic_is_counted(bed: &TwoHosts, prom: &Prometheus) -> anyhow::Result<()> {
    let (h1, h2) = (HOSTS[0], HOSTS[1]);
    let red = ",vsid=\"5001\"";
    let blue = ",vsid=\"6001\"";
    // (metric, host, labels, growth expected)
    let series = [
        (
            "nv_vsid_packets_total",
            h1,
            format!("{red},direction=\"tx\",method=\"encap\""),
            20.0,
        ),
        (
            "nv_vsid_bytes_total",
            h1,
            format!("{red},direction=\"tx\",method=\"encap\""),
            20.0 * PING_FRAME,
        ),
        (
            "nv_vsid_packets_total",
            h2,
            format!("{red},direction=\"rx\",method=\"encap\""),
            20.0,
        ),
        (
            "nv_vsid_packets_total",
            h1,
            format!("{red},direction=\"rx\",method=\"encap\""),
            20.0,
        ),
        (
            "nv_vsid_packets_total",
            h1,
            format!("{blue},direction=\"tx\",method=\"encap\""),
            7.0,
        ),
        (
            "nv_vsid_bytes_total",
            h2,
            format!("{blue},direction=\"rx\",method=\"encap\""),
            7.0 * PING_FRAME,
        ),
        (
            "nv_drops_total",
            h1,
            ",reason=\"vm_unknown_dst\",direction=\"from_vm\"".to_owned(),
            5.0,
        ),
    ];
    let before: Vec<f64> = series
        .iter()
        .map(|(m, h, l, _)| value(prom, m, h, l))
        .collect::<anyhow::Result<_>>()?;
    // 20 echoes RED-1 -> RED-2, 7 BLUE-1 -> BLUE-2, and 5 frames from RED-1 to a customer
    // address no record has (its MAC given by hand, so no ARP is needed).
    ensure!(bed.ping("RED-1", "10.0.0.2", 20)? == 20, "RED pings");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 7)? == 7, "BLUE pings");
    bed.vm("RED-1").ns.ip(&[
        "neigh",
        "replace",
        "10.0.0.99",
        "lladdr",
        "02:00:00:00:09:99",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let _ = bed.ping("RED-1", "10.0.0.99", 5)?;
    for ((metric, host, labels, want), base) in series.iter().zip(&before) {
        let q = format!("sum({metric}{{instance=\"{host}\"{labels}}}) or vector(0)");
        let got = prom.wait_for(&q, |v| v - base >= *want)?;
        ensure!(
            (got - base - want).abs() < 0.5,
            "{metric}{{{host}{labels}}} grew by {} after the traffic, expected {want}",
            got - base
        );
    }
    Ok(())
}

/// Map pressure, ports, records, API requests and the build, as the agents report them; the
/// alert rules loaded, none firing on healthy hosts.
fn the_agents_state_is_reported(prom: &Prometheus) -> anyhow::Result<()> {
    let (h1, h2) = (HOSTS[0], HOSTS[1]);
    for (q, want) in [
        (
            format!("nv_map_entries{{instance=\"{h1}\",map=\"NV_LOOKUPS\"}}"),
            4.0,
        ),
        (
            format!("nv_map_capacity{{instance=\"{h1}\",map=\"NV_LOOKUPS\"}}"),
            1_048_576.0,
        ),
        (
            format!("nv_map_entries{{instance=\"{h1}\",map=\"NV_PORTS\"}}"),
            2.0,
        ),
        (
            format!("nv_ports{{instance=\"{h2}\",kind=\"veth\",state=\"running\"}}"),
            2.0,
        ),
        (format!("nv_provider_addresses{{instance=\"{h2}\"}}"), 1.0),
        (
            format!(
                "nv_api_requests_total{{instance=\"{h1}\",method=\"POST\",path=\"/v1/lookups\",status=\"201\"}}"
            ),
            4.0,
        ),
        (
            format!(
                "count(nv_build_info{{version=\"{}\"}})",
                env!("CARGO_PKG_VERSION")
            ),
            2.0,
        ),
        (format!("nv_reconciles_total{{instance=\"{h1}\"}}"), 1.0),
    ] {
        let got = prom.wait_for(&q, |_| true)?;
        ensure!((got - want).abs() < 0.5, "{q} = {got}, expected {want}");
    }
    let rules_api: serde_json::Value = serde_json::from_str(&prom.get("/api/v1/rules")?)?;
    let loaded = rules_api["data"]["groups"].as_array().map_or(0, |g| {
        g.iter()
            .map(|g| g["rules"].as_array().map_or(0, Vec::len))
            .sum()
    });
    ensure!(loaded >= 5, "{loaded} alert rules loaded: {rules_api}");
    let firing = prom.query("ALERTS{alertstate=\"firing\"}")?;
    ensure!(
        firing.is_empty(),
        "alerts firing on healthy hosts: {firing:?}"
    );
    Ok(())
}

/// `promtool check metrics` reads each agent's exposition without an error or a warning.
fn promtool_reads_the_exposition(bed: &TwoHosts) -> anyhow::Result<()> {
    for target in HOSTS {
        let text = scrape(bed, target)?;
        ensure!(
            text.contains("nv_vsid_packets_total"),
            "scrape of {target}: {text}"
        );
        let mut check = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run promtool")?;
        std::io::Write::write_all(check.stdin.as_mut().context("stdin")?, text.as_bytes())?;
        let out = check.wait_with_output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics on {target}: {said}"
        );
    }
    Ok(())
}

/// The alert rules shipped in dist/ pass promtool's checks and its unit tests: each alert
/// fires on the series it is for, after its `for`, and not on the others.
#[test]
fn the_alert_rules_fire_on_what_they_are_for() -> anyhow::Result<()> {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    for args in [
        ["check", "rules", "nv-alerts.yml"],
        ["test", "rules", "nv-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dist)
            .output()
            .context("run promtool (Debian's prometheus package)")?;
        ensure!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn nvctl_monitor_shows_each_drop_with_its_reason_vsid_port_and_addresses() -> anyhow::Result<()> {
    let bed = TwoHosts::build("mo")?;
    bed.configure()?;
    let h1 = &bed.hosts[0];
    // RED-1 sends from an address that is not its own (10.0.0.9), to RED-2 whose MAC it is
    // given: three spoofed echoes, each a drop for this monitor.
    let spoof = h1.monitor(&[
        "--port",
        "red1",
        "--reason",
        "vm_spoofed_ip",
        "--count",
        "3",
    ])?;
    // Another client: BLUE's events, every forwarded packet sampled too. BLUE-1 is kept from
    // IPv6 chatter (each a drop), so what it sees is its two echoes, out and back.
    bed.vm("BLUE-1").ns.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.eth0.disable_ipv6=1",
        ],
    )?;
    let blue = h1.monitor(&["--vsid", "6001", "--sample", "1", "--count", "4"])?;
    h1.monitors_become(2)?;
    let red1 = &bed.vm("RED-1").ns;
    red1.ip(&["addr", "add", "10.0.0.9/32", "dev", "eth0"])?;
    let red2_mac = bed.vm("RED-2").mac.clone();
    red1.ip(&[
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &red2_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let before = h1.counters()?;
    let _ = red1.exec_output(
        "ping",
        &[
            "-c", "3", "-i", "0.2", "-W", "1", "-I", "10.0.0.9", "10.0.0.2",
        ],
    )?;
    // The positive control on the same path: RED-1's own address still gets through.
    ensure!(bed.ping("RED-1", "10.0.0.2", 2)? == 2, "RED-1's own pings");
    ensure!(bed.ping("BLUE-1", "10.0.0.2", 2)? == 2, "BLUE pings");
    let dropped = nv_tests::testbed::delta(&before, &h1.counters()?, "drop_vm_spoofed_ip");
    ensure!(dropped == 3, "drop_vm_spoofed_ip counted {dropped}");

    let spoofed = monitor_events(spoof)?;
    ensure!(spoofed.len() == 3, "spoof monitor saw {spoofed:?}");
    for e in &spoofed {
        for (field, want) in [
            ("kind", "drop"),
            ("reason", "vm_spoofed_ip"),
            ("port", "red1"),
            ("src", "10.0.0.9"),
            ("dst", "10.0.0.2"),
            ("proto", "icmp"),
        ] {
            ensure!(e[field] == want, "{field} of {e}: expected {want}");
        }
        ensure!(e["vsid"] == 5001, "vsid of {e}");
    }
    let seen = monitor_events(blue)?;
    ensure!(seen.len() == 4, "BLUE monitor saw {seen:?}");
    ensure!(
        seen.iter().all(|e| e["vsid"] == 6001),
        "the BLUE monitor saw another VSID: {seen:?}"
    );
    for e in &seen {
        ensure!(
            e["kind"] == "forward"
                && e["proto"] == "icmp"
                && ["10.0.0.1", "10.0.0.2"].contains(&e["src"].as_str().unwrap_or("")),
            "a BLUE event that is not one of its echoes: {e}"
        );
    }
    // Both gone: the datapath stops reporting.
    h1.monitors_become(0)?;
    Ok(())
}

/// Spoofed echoes from RED-1 (its source 10.0.0.9, RED-2's MAC given by hand): `n` drops.
fn spoof(bed: &TwoHosts, n: u32) -> anyhow::Result<()> {
    let red1 = &bed.vm("RED-1").ns;
    red1.ip(&["addr", "replace", "10.0.0.9/32", "dev", "eth0"])?;
    let mac = bed.vm("RED-2").mac.clone();
    red1.ip(&[
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let count = n.to_string();
    red1.exec_output(
        "ping",
        &[
            "-c", &count, "-i", "0.2", "-W", "1", "-I", "10.0.0.9", "10.0.0.2",
        ],
    )?;
    Ok(())
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn datapath_debug_events_are_logged_only_while_on_and_the_agent_logs_what_it_does()
-> anyhow::Result<()> {
    let bed = TwoHosts::build("lg")?;
    bed.configure()?;
    let h1 = &bed.hosts[0];
    let event = "drop drop_vm_spoofed_ip: ifindex";
    // Off (the default): drops are counted, nothing is logged for them.
    spoof(&bed, 2)?;
    ensure!(lines_with(&h1.agent_log(), event) == 0, "logged while off");
    h1.nvctl(&["debug", "on"])?;
    ensure!(
        h1.nvctl_json(&["status"])?["debug_events"] == true,
        "status does not say debug events are on"
    );
    spoof(&bed, 3)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = h1.agent_log();
    let logged = lines_with(&log, event);
    ensure!(logged == 3, "{logged} debug events for 3 drops: {log}");
    ensure!(
        log.lines()
            .any(|l| l.contains(event) && l.contains("nv_datapath") && l.contains("vsid 5001")),
        "the events lack their target or VSID: {log}"
    );
    h1.nvctl(&["debug", "off"])?;
    spoof(&bed, 2)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    ensure!(
        lines_with(&h1.agent_log(), event) == 3,
        "logged after turning off"
    );

    // A configuration change is one line saying what changed; a refused request is logged
    // with its route and why.
    let log = h1.agent_log();
    ensure!(
        lines_with(&log, "added lookup record VSID 5001 CA 10.0.0.2 (RED-2)") == 1,
        "{log}"
    );
    let _ = h1.nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.77"]);
    let log = h1.agent_log();
    ensure!(
        log.lines().any(|l| l
            .contains("request refused: no lookup record for VSID 5001 CA 10.0.0.77")
            && l.contains("path=/v1/lookups")),
        "the refused request is not logged with its route: {log}"
    );
    Ok(())
}

#[test]
fn the_agent_honours_rust_log() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("rl")?;
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent_with_env(&[("RUST_LOG", "warn")])?;
    bed.configure()?;
    let quiet = bed.hosts[0].agent_log();
    ensure!(
        lines_with(&quiet, "added lookup record") == 0
            && lines_with(&bed.hosts[1].agent_log(), "added lookup record") == 4,
        "RUST_LOG=warn still logged changes, or the positive control (host 2) did not: {quiet}"
    );
    Ok(())
}
