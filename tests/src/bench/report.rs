//! The benchmark's table, JSON and chart, and its goals, each a ratio or a difference against a
//! baseline measured in the same run.
use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::{acls, cluster, control, e2e, pressure, programs, quantile, routing};

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub name: String,
    /// The median of `runs` where there are repetitions.
    pub measured: f64,
    /// One value per repetition (empty for a single measure); a goal over repetitions is met
    /// only when every one of them meets it.
    pub runs: Vec<f64>,
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub smoke: bool,
    pub programs: Vec<programs::Cost>,
    pub overheads: Vec<programs::Overhead>,
    pub e2e: Vec<e2e::Result>,
    /// nv and the peer with a million records, traffic to 100k of them against traffic to one.
    #[serde(default)]
    pub pressure: Vec<pressure::Row>,
    /// A routed packet against a same-subnet one, with 10 and 10,000 routes.
    pub routing: Vec<routing::Row>,
    /// A VM's path with port ACLs against the same path without, in one run.
    #[serde(default)]
    pub acls: Vec<acls::Row>,
    pub control: control::Result,
    pub cluster: cluster::Result,
    pub goals: Vec<Goal>,
}

/// The lifecycle issue's scale goals, at a million records.
fn control_goals(c: &control::Result) -> Vec<Goal> {
    if c.imported < 1_000_000 {
        return Vec::new();
    }
    let per_record = c.agent_bytes_per_record + c.map_bytes_per_entry;
    vec![
        Goal {
            name: "import of 1M records, nvctl until forwarding (s)".into(),
            measured: c.import_seconds,
            runs: Vec::new(),
            target: "<= 2".into(),
            met: c.import_seconds <= 2.0,
        },
        Goal {
            name: "agent RSS + lookup map per record (B)".into(),
            measured: per_record,
            runs: Vec::new(),
            target: "<= 200".into(),
            met: per_record <= 200.0,
        },
    ]
}

/// The issue's goals, evaluated on this run.
pub fn goals(
    e2e: &[e2e::Result],
    control: &control::Result,
    cluster: &cluster::Result,
) -> Vec<Goal> {
    let mut goals = control_goals(control);
    if cluster.moves >= 100 {
        goals.push(Goal {
            name: "cluster: move to the last of 3 agents' maps, p99 (ms)".into(),
            measured: cluster.move_p99_ms,
            runs: Vec::new(),
            target: "<= 100".into(),
            met: cluster.move_p99_ms <= 100.0,
        });
        goals.push(Goal {
            name: "cluster: pings lost per migration / in its window".into(),
            measured: cluster.lost_per_migration / cluster.window_pings_per_migration.max(1.0),
            runs: Vec::new(),
            target: "<= 1".into(),
            met: cluster.lost_per_migration <= cluster.window_pings_per_migration + 1.0,
        });
    }
    goals.extend(peer_goals(e2e));
    goals
}

/// The ratio of `a` to `b` in each repetition.
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

/// nv against the Cilium-style peer, each repetition's ratio (both measured in it, in turns):
/// nv as shipped (decapsulating on TC) and on XDP, and nv routed with port ACLs.
fn peer_goals(e2e: &[e2e::Result]) -> Vec<Goal> {
    let by = |c: &str| e2e.iter().find(|r| r.config == c);
    let Some(peer) = by("cilium-peer") else {
        return Vec::new();
    };
    let mut goals = Vec::new();
    let mut goal = |name: String, runs: Vec<f64>, at_least: bool, target: f64| {
        let met = !runs.is_empty()
            && runs
                .iter()
                .all(|&r| if at_least { r >= target } else { r <= target });
        goals.push(Goal {
            name,
            measured: quantile(&mut runs.clone(), 0.5),
            runs,
            target: format!("{} {target}", if at_least { ">=" } else { "<=" }),
            met,
        });
    };
    // nv as shipped; the other configurations' ratios are in the end-to-end lines.
    if let Some(nv) = by("nv-encap-tc") {
        let how = "NVGRE, TC (shipped)";
        goal(
            format!("nv {how} / peer, 64 B pps"),
            ratios(&nv.pps_runs, &peer.pps_runs),
            true,
            1.3,
        );
        goal(
            format!("nv {how} / peer, TCP"),
            ratios(&nv.tcp_runs, &peer.tcp_runs),
            true,
            1.05,
        );
        goal(
            format!("nv {how} / peer, CPU per packet"),
            ratios(&nv.cpu_ns_runs, &peer.cpu_ns_runs),
            false,
            0.75,
        );
    }
    if let Some(nv) = by("nv-routes-acls") {
        goal(
            "nv routed, 10 routes + 10 stateful rules / peer, 64 B pps".into(),
            ratios(&nv.pps_runs, &peer.pps_runs),
            true,
            1.2,
        );
    }
    goals
}

/// This tree's programs against another revision's (`nv-bench --baseline-bin`), as a table.
pub fn against_table(rows: &[programs::Overhead]) -> String {
    let mut s = String::new();
    side_by_side(
        &mut s,
        "this tree's programs against another revision's, IPv4 paths (64 B, 1K records, same maps, in turns)",
        ["against", "tree ns", "base ns"],
        rows,
    );
    s
}

/// The features' costs, each against a copy of the programs without it.
fn overheads(s: &mut String, overheads: &[programs::Overhead]) {
    side_by_side(
        s,
        "what a feature costs, against a copy of the programs without it (64 B, 1K records, same run)",
        ["feature", "with ns", "w/o ns"],
        overheads,
    );
}

/// Rows of programs measured against other programs on the same maps, under `heading`.
fn side_by_side(s: &mut String, heading: &str, names: [&str; 3], rows: &[programs::Overhead]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n{heading}");
    let _ = writeln!(
        s,
        "{:<38} {:<20} {:>9} {:>9} {:>7}",
        names[0], "path", names[1], names[2], "ratio"
    );
    for o in rows {
        let _ = writeln!(
            s,
            "{:<38} {:<20} {:>9.1} {:>9.1} {:>7.3}  ({})",
            o.feature, o.path, o.with_ns, o.without_ns, o.ratio, o.how
        );
    }
}

/// The cluster-mode figures.
fn control_lines(s: &mut String, c: &control::Result) {
    let _ = writeln!(
        s,
        "\ncontrol plane: {} adds, nvctl start to record in the map p50 {:.2} ms, p99 {:.2} ms (in the map when nvctl returned: {}/{})",
        c.adds, c.add_to_datapath_p50_ms, c.add_to_datapath_p99_ms, c.present_on_return, c.adds
    );
    let _ = writeln!(
        s,
        "import of {} records: {:.2} s, {:.1} x the same entries written straight into a BPF map ({:.2} s batched, {:.2} s one call each); agent memory {:.0} B/record; lookup map {:.0} B/entry; add on that table p50 {:.2} ms, p99 {:.2} ms",
        c.imported,
        c.import_seconds,
        c.import_seconds / c.map_fill_batched_seconds,
        c.map_fill_batched_seconds,
        c.map_fill_single_seconds,
        c.agent_bytes_per_record,
        c.map_bytes_per_entry,
        c.add_on_big_table_p50_ms,
        c.add_on_big_table_p99_ms
    );
    let _ = writeln!(
        s,
        "a VM's port re-created until the agent has filtered it (upper bound, includes `ip`): p50 {:.2} ms, p99 {:.2} ms; still unfiltered once `ip` was done: p50 {:.2} ms, p99 {:.2} ms",
        c.port_filtered_p50_ms,
        c.port_filtered_p99_ms,
        c.port_filtered_after_ip_p50_ms,
        c.port_filtered_after_ip_p99_ms
    );
}

fn cluster_lines(s: &mut String, k: &cluster::Result) {
    // Nothing measured: the part failed, and the run says so at its end.
    if k.moves == 0 {
        return;
    }
    let _ = writeln!(
        s,
        "\ncluster mode (3 hosts, 3-member etcd): {} moves typed on host 1 until the last agent's map holds them p50 {:.1} ms, p99 {:.1} ms; the same move on one host alone p50 {:.1} ms, p99 {:.1} ms ({:.1}x at p50)",
        k.moves,
        k.move_p50_ms,
        k.move_p99_ms,
        k.alone_p50_ms,
        k.alone_p99_ms,
        k.move_p50_ms / k.alone_p50_ms
    );
    let _ = writeln!(
        s,
        "{} VM migrations under a 10 ms ping stream: {:.1} pings lost each, in a window (port re-created until every host followed) of {:.1} pings",
        k.migrations, k.lost_per_migration, k.window_pings_per_migration
    );
    let _ = writeln!(
        s,
        "{} records in etcd: a fresh agent ready with all of them in {:.1} s; one change then: {} event applied, {} full reads; the operator's nvctl took {:.2} s for it (it admits against every record)",
        k.records,
        k.load_seconds,
        k.events_for_one_change,
        k.resyncs_for_one_change,
        k.operator_change_seconds
    );
}

pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nprogram cost (BPF_PROG_TEST_RUN, median of single runs; repeat-run mean where the packet is unchanged)"
    );
    let _ = writeln!(
        s,
        "{:<26} {:>6} {:>9} {:>10} {:>10} {:>12}",
        "path", "bytes", "records", "single ns", "repeat ns", "above floor"
    );
    for c in &r.programs {
        let repeat = c
            .repeat_ns
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            "{:<26} {:>6} {:>9} {:>10.1} {:>10} {:>12.1}",
            c.path, c.frame_bytes, c.records, c.single_ns, repeat, c.above_floor_ns
        );
    }
    overheads(&mut s, &r.overheads);
    e2e_lines(&mut s, &r.e2e);
    pressure_lines(&mut s, &r.pressure);
    routing_lines(&mut s, &r.routing);
    acl_lines(&mut s, &r.acls);
    let c = &r.control;
    if c.adds > 0 {
        control_lines(&mut s, c);
    }
    cluster_lines(&mut s, &r.cluster);
    let _ = writeln!(s, "\ngoals");
    for g in &r.goals {
        let runs = if g.runs.is_empty() {
            String::new()
        } else {
            format!(" ({} of {} runs)", spread(&g.runs, 2), g.runs.len())
        };
        let _ = writeln!(
            s,
            "{:<4} {:<58} {:>7.2}{runs:<22} target {}",
            if g.met { "met" } else { "MISS" },
            g.name,
            g.measured,
            g.target
        );
    }
    s
}

/// `runs`' lowest and highest, as "lo-hi" with `digits` decimals.
fn spread(runs: &[f64], digits: usize) -> String {
    let lo = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = runs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if runs.is_empty() {
        "-".to_owned()
    } else {
        format!("{lo:.digits$}-{hi:.digits$}")
    }
}

/// End to end: medians over the repetitions, with their spread.
fn e2e_lines(s: &mut String, e2e: &[e2e::Result]) {
    if e2e.is_empty() {
        return;
    }
    let reps = e2e.first().map_or(0, |e| e.pps_runs.len());
    let _ = writeln!(
        s,
        "\nend to end, RED-1 -> RED-2 (nv-routes-acls: to RED-B through the router), medians of {reps} repetitions taken in turns (lowest-highest)"
    );
    let _ = writeln!(
        s,
        "{:<15} {:>9} {:<15} {:>6} {:<11} {:>7} {:<11} {:>6} {:>8} {:>9} {:>8} {:>8}",
        "config",
        "64B kpps",
        "",
        "TCP",
        "Gb/s",
        "CPU ns",
        "per packet",
        "deliv",
        "CPU sock",
        "2 flows",
        "RTT p50",
        "RTT p99"
    );
    for e in e2e {
        let kpps: Vec<f64> = e.pps_runs.iter().map(|p| p / 1e3).collect();
        let _ = writeln!(
            s,
            "{:<15} {:>9.0} {:<15} {:>6.2} {:<11} {:>7.0} {:<11} {:>5.0}% {:>8.0} {:>9.0} {:>8.1} {:>8.1}",
            e.config,
            e.pps / 1e3,
            format!("({})", spread(&kpps, 0)),
            e.tcp_gbps,
            format!("({})", spread(&e.tcp_runs, 2)),
            e.cpu_ns,
            format!("({})", spread(&e.cpu_ns_runs, 0)),
            quantile(&mut e.delivered_runs.clone(), 0.5) * 100.0,
            e.cpu_socket_ns,
            e.two_flow_pps / 1e3,
            e.rtt_p50_us,
            e.rtt_p99_us
        );
    }
    let _ = writeln!(
        s,
        "(delivered: counted by the receiving VM's eth0, the frames ending there (the VM's stack is the same for every datapath); kpps: 64-byte frames delivered a second from one sender; CPU: the sender's and ksoftirqd's busy time per packet delivered at a fixed 100k frames a second, deliv the share delivered; CPU sock: the same into a socket nobody reads; 2 flows: kpps from senders on two CPUs; RTT in us)"
    );
    against_peer(s, e2e);
    above_ceiling(s, e2e);
    for e in e2e {
        if let (Some(tap), Some(veth)) = (e.tap_pps, e.veth_read_pps) {
            let _ = writeln!(
                s,
                "{} into a tap read by a process (as QEMU does): {:.0} kpps, {:.2} of a veth VM's socket read by a process ({:.0} kpps)",
                e.config,
                tap / 1e3,
                tap / veth,
                veth / 1e3
            );
        }
    }
}

/// Every configuration's ratios to the peer, each repetition's.
fn against_peer(s: &mut String, e2e: &[e2e::Result]) {
    if let Some(peer) = e2e.iter().find(|r| r.config == "cilium-peer") {
        let _ = writeln!(
            s,
            "against the peer, each repetition's ratio (median, lowest-highest): pps, TCP, CPU per packet, 2 flows, CPU per packet into a socket"
        );
        for e in e2e.iter().filter(|e| e.config != peer.config) {
            let mut line = format!("{:<15}", e.config);
            for (a, b) in [
                (&e.pps_runs, &peer.pps_runs),
                (&e.tcp_runs, &peer.tcp_runs),
                (&e.cpu_ns_runs, &peer.cpu_ns_runs),
                (&e.two_flow_runs, &peer.two_flow_runs),
                (&e.cpu_socket_ns_runs, &peer.cpu_socket_ns_runs),
            ] {
                let r = ratios(a, b);
                let _ = write!(
                    line,
                    " {:>5.2} ({:<9})",
                    quantile(&mut r.clone(), 0.5),
                    spread(&r, 2)
                );
            }
            let _ = writeln!(s, "{line}");
        }
    }
}

/// CPU per packet above routed veth: the tunnel's own cost.
fn above_ceiling(s: &mut String, e2e: &[e2e::Result]) {
    if let Some(ceiling) = e2e.iter().find(|r| r.config == "routed-veth") {
        // What every configuration pays alike (the sender's syscall, the veth pairs, the
        // receiving stack) is what routed veth pays; the rest is the tunnel's own.
        let _ = writeln!(
            s,
            "CPU per packet above routed veth (no tunnel), each repetition's: the tunnel's own cost"
        );
        for e in e2e.iter().filter(|e| e.config != ceiling.config) {
            let above: Vec<f64> = e
                .cpu_ns_runs
                .iter()
                .zip(&ceiling.cpu_ns_runs)
                .map(|(a, b)| a - b)
                .collect();
            let _ = writeln!(
                s,
                "{:<15} {:>6.0} ns ({})",
                e.config,
                quantile(&mut above.clone(), 0.5),
                spread(&above, 0)
            );
        }
    }
}

/// Hash and cache pressure: traffic to 100k of a million records against traffic to one.
fn pressure_lines(s: &mut String, rows: &[pressure::Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nhash and cache pressure: frames a second leaving host 1 to one destination and to many in turns, same bed (lowest-highest)"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<13} {} records: to 1 {:.0} kpps ({}), to {} {:.0} kpps ({}): {:.3} of one",
            r.config,
            r.records,
            r.one_pps / 1e3,
            spread(&r.one_runs.iter().map(|p| p / 1e3).collect::<Vec<_>>(), 0),
            r.flows,
            r.spread_pps / 1e3,
            spread(
                &r.spread_runs.iter().map(|p| p / 1e3).collect::<Vec<_>>(),
                0
            ),
            r.spread_pps / r.one_pps
        );
    }
    if let [nv, peer] = rows {
        let _ = writeln!(
            s,
            "nv / peer under pressure: {:.3} (to one: {:.3})",
            nv.spread_pps / peer.spread_pps,
            nv.one_pps / peer.one_pps
        );
    }
}

/// Port ACLs' cost: each configuration against the same path without rules, same run.
fn acl_lines(s: &mut String, rows: &[acls::Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nport ACLs: RED-1's outbound and its peer's inbound rules (the allow last), against the same path without, same run (0 rules: the same path twice, the noise floor)"
    );
    let _ = writeln!(
        s,
        "{:>6} {:<9} {:>11} {:>9} {:>12} {:>9} {:>10} {:>8}",
        "rules", "kind", "program ns", "x", "64B pps", "x", "TCP Gb/s", "x"
    );
    for r in rows {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.3}", a / b)
            } else {
                "-".to_owned()
            }
        };
        let _ = writeln!(
            s,
            "{:>6} {:<9} {:>11.1} {:>9} {:>12.0} {:>9} {:>10.2} {:>8}",
            r.rules,
            if r.stateful { "stateful" } else { "stateless" },
            r.program_ns,
            ratio(r.program_ns, r.program_without_ns),
            r.pps,
            ratio(r.pps, r.pps_without),
            r.tcp_gbps,
            ratio(r.tcp_gbps, r.tcp_without_gbps),
        );
    }
}

/// The router's cost: each routed row beside the same-subnet row of its route count.
fn routing_lines(s: &mut String, rows: &[routing::Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nthe distributed router: routed (RED-1 -> RED-B, another subnet) against same subnet (RED-1 -> RED-2), NVGRE, XDP decap, same run"
    );
    let _ = writeln!(
        s,
        "{:>7} {:<12} {:>10} {:>12} {:>10} {:>10}   routed / same subnet",
        "routes", "path", "program ns", "64B pps", "TCP Gb/s", "RTT p50us"
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.routes == r.routes && b.path == "same subnet");
        let ratios = match base {
            Some(b) if r.path == "routed" => format!(
                "program {:.2}x, pps {:.2}x, TCP {:.2}x",
                r.program_ns / b.program_ns,
                r.pps / b.pps,
                r.tcp_gbps / b.tcp_gbps
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{:>7} {:<12} {:>10.1} {:>12.0} {:>10.2} {:>10.1}   {ratios}",
            r.routes, r.path, r.program_ns, r.pps, r.tcp_gbps, r.rtt_p50_us
        );
    }
}

/// A bar chart of the end-to-end results, one panel per measure (medians, with the lowest and
/// highest repetition as whiskers), as SVG.
pub fn chart(e2e: &[e2e::Result]) -> String {
    type Measure = fn(&e2e::Result) -> (f64, Vec<f64>);
    let panels: [(&str, Measure); 6] = [
        ("64-byte UDP, Mpps (one sender)", |r| {
            (r.pps / 1e6, r.pps_runs.iter().map(|x| x / 1e6).collect())
        }),
        ("TCP, Gbit/s", |r| (r.tcp_gbps, r.tcp_runs.clone())),
        ("CPU per delivered packet, ns (lower is better)", |r| {
            (r.cpu_ns, r.cpu_ns_runs.clone())
        }),
        ("64-byte UDP, Mpps, two senders on two CPUs", |r| {
            (
                r.two_flow_pps / 1e6,
                r.two_flow_runs.iter().map(|x| x / 1e6).collect(),
            )
        }),
        ("RTT p50, us", |r| (r.rtt_p50_us, Vec::new())),
        ("RTT p99, us", |r| (r.rtt_p99_us, Vec::new())),
    ];
    let colors = [
        "#1f77b4", "#aec7e8", "#2ca02c", "#98df8a", "#9467bd", "#d62728", "#7f7f7f", "#ff7f0e",
    ];
    let (pw, ph, bar) = (620.0, 300.0, 72.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        pw * 3.0,
        ph * 2.0 + 50.0
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (p, (title, measure)) in panels.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "six panels")]
        let (x0, y0) = ((p % 3) as f64 * pw, (p / 3) as f64 * ph);
        let values: Vec<(f64, Vec<f64>)> = e2e.iter().map(measure).collect();
        let max = values
            .iter()
            .flat_map(|(m, runs)| runs.iter().chain(std::iter::once(m)))
            .copied()
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{title}</text>"#,
            x0 + pw / 2.0,
            y0 + 20.0
        );
        let height = ph - 90.0;
        let base = y0 + ph - 40.0;
        for (i, (r, (value, runs))) in e2e.iter().zip(&values).enumerate() {
            #[expect(clippy::cast_precision_loss, reason = "eight bars")]
            let bx = x0 + 14.0 + i as f64 * bar;
            let h = value / max * height;
            let y = base - h;
            let _ = write!(
                svg,
                r#"<rect x="{bx}" y="{y}" width="{}" height="{h}" fill="{}"/><text x="{}" y="{}" text-anchor="middle">{value:.2}</text><text x="{}" y="{}" text-anchor="middle" font-size="9">{}</text>"#,
                bar - 12.0,
                colors[i % colors.len()],
                bx + (bar - 12.0) / 2.0,
                y - 6.0,
                bx + (bar - 12.0) / 2.0,
                base + 14.0,
                r.config
            );
            if let (Some(lo), Some(hi)) = (
                runs.iter().copied().reduce(f64::min),
                runs.iter().copied().reduce(f64::max),
            ) {
                let cx = bx + (bar - 12.0) / 2.0;
                let (ylo, yhi) = (base - lo / max * height, base - hi / max * height);
                let _ = write!(
                    svg,
                    r#"<line x1="{cx}" y1="{ylo}" x2="{cx}" y2="{yhi}" stroke="black"/><line x1="{}" y1="{ylo}" x2="{}" y2="{ylo}" stroke="black"/><line x1="{}" y1="{yhi}" x2="{}" y2="{yhi}" stroke="black"/>"#,
                    cx - 6.0,
                    cx + 6.0,
                    cx - 6.0,
                    cx + 6.0
                );
            }
        }
    }
    let _ = write!(
        svg,
        r#"<text x="10" y="{}" font-size="11">nv (NVGRE and IP rewrite, decapsulating on XDP and on TC; NVGRE routed with 10 routes and 10 stateful ACL rules per VM), the Cilium-style peer (eBPF + kernel VXLAN in collect_md mode), kernel VXLAN over a bridge and routed veth (the ceiling): one run, configurations in turns; bars are medians, whiskers the lowest and highest repetition.</text></svg>"#,
        ph * 2.0 + 30.0
    );
    svg
}

pub fn write(r: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(dir.join("e2e.svg"), chart(&r.e2e))?;
    Ok(())
}
