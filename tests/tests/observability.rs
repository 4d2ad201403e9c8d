//! Observability with real clients: a real Prometheus scrapes both agents, and after known
//! traffic its query API returns the per-VSID, drop, map and API figures; promtool checks the
//! exposition and the alert rules.
use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};
use nv_tests::{prometheus::Prometheus, testbed::TwoHosts};

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
