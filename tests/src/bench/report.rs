//! The benchmark's table, JSON and chart, and its goals, each a ratio or a difference against a
//! baseline measured in the same run.
use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use super::{
    acls, cluster, control, e2e,
    programs::{self, Cost},
    routing,
};

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub name: String,
    pub measured: f64,
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub smoke: bool,
    pub programs: Vec<Cost>,
    pub overheads: Vec<programs::Overhead>,
    pub e2e: Vec<e2e::Result>,
    /// A routed packet against a same-subnet one, with 10 and 10,000 routes.
    pub routing: Vec<routing::Row>,
    /// A VM's path with port ACLs against the same path without, in one run.
    #[serde(default)]
    pub acls: Vec<acls::Row>,
    pub control: control::Result,
    pub cluster: cluster::Result,
    pub goals: Vec<Goal>,
}

fn cost<'a>(programs: &'a [Cost], path: &str, size: usize, records: u32) -> Option<&'a Cost> {
    programs
        .iter()
        .find(|c| c.path == path && c.frame_bytes == size && c.records == records)
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
            target: "<= 2".into(),
            met: c.import_seconds <= 2.0,
        },
        Goal {
            name: "agent RSS + lookup map per record (B)".into(),
            measured: per_record,
            target: "<= 200".into(),
            met: per_record <= 200.0,
        },
    ]
}

/// The issue's goals, evaluated on this run.
pub fn goals(
    programs: &[Cost],
    e2e: &[e2e::Result],
    control: &control::Result,
    cluster: &cluster::Result,
) -> Vec<Goal> {
    let mut goals = control_goals(control);
    if cluster.moves >= 100 {
        goals.push(Goal {
            name: "cluster: move to the last of 3 agents' maps, p99 (ms)".into(),
            measured: cluster.move_p99_ms,
            target: "<= 100".into(),
            met: cluster.move_p99_ms <= 100.0,
        });
        goals.push(Goal {
            name: "cluster: pings lost per migration / in its window".into(),
            measured: cluster.lost_per_migration / cluster.window_pings_per_migration.max(1.0),
            target: "<= 1".into(),
            met: cluster.lost_per_migration <= cluster.window_pings_per_migration + 1.0,
        });
    }
    let max_records = programs.iter().map(|c| c.records).max().unwrap_or(0);
    for size in [64, 1500] {
        for (path, limit) in [
            ("decap", 25.0),
            ("decap_tc", 25.0),
            ("encap", 50.0),
            ("rewrite_out", 50.0),
            ("pass_host_traffic", 5.0),
            ("pass_host_traffic_tc", 5.0),
        ] {
            if let Some(c) = cost(programs, path, size, 1000) {
                // Repeat runs where the packet allows them (steadier), single runs otherwise.
                let (measured, how) = c
                    .above_floor_repeat_ns
                    .map_or((c.above_floor_ns, "single"), |r| (r, "repeat"));
                goals.push(Goal {
                    name: format!("{path} above floor, {size} B, 1K records (ns, {how})"),
                    measured,
                    target: format!("<= {limit}"),
                    met: measured <= limit,
                });
            }
        }
        for path in [
            "encap",
            "decap",
            "rewrite_out",
            "rewrite_in",
            "pass_host_traffic",
        ] {
            if let (Some(small), Some(big)) = (
                cost(programs, path, size, 1000),
                cost(programs, path, size, max_records),
            ) {
                let ratio = big.single_ns / small.single_ns;
                goals.push(Goal {
                    name: format!("{path} {size} B, {max_records} / 1K records"),
                    measured: ratio,
                    target: "<= 1.3".into(),
                    met: ratio <= 1.3,
                });
            }
        }
    }
    let by = |c: &str| e2e.iter().find(|r| r.config == c);
    for hook in ["xdp", "tc"] {
        let (encap, rewrite) = (
            by(&format!("nv-encap-{hook}")),
            by(&format!("nv-rewrite-{hook}")),
        );
        if let (Some(base), Some(encap), Some(rewrite)) = (by("vxlan-bridge"), encap, rewrite) {
            for (name, measured, target) in [
                ("encap / VXLAN pps", encap.pps / base.pps, 1.5),
                ("encap / VXLAN TCP", encap.tcp_gbps / base.tcp_gbps, 1.0),
                ("rewrite / VXLAN TCP", rewrite.tcp_gbps / base.tcp_gbps, 1.2),
            ] {
                goals.push(Goal {
                    name: format!("nv {name}, decap on {hook}"),
                    measured,
                    target: format!(">= {target}"),
                    met: measured >= target,
                });
            }
        }
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
fn cluster_lines(s: &mut String, k: &cluster::Result) {
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
    let _ = writeln!(s, "\nend to end, RED-1 -> RED-2 (same run)");
    let _ = writeln!(
        s,
        "{:<14} {:>12} {:>10} {:>10} {:>10}",
        "config", "64B pps", "TCP Gb/s", "RTT p50us", "RTT p99us"
    );
    for e in &r.e2e {
        let _ = writeln!(
            s,
            "{:<14} {:>12.0} {:>10.2} {:>10.1} {:>10.1}",
            e.config, e.pps, e.tcp_gbps, e.rtt_p50_us, e.rtt_p99_us
        );
    }
    for e in &r.e2e {
        if let Some(tap) = e.tap_pps {
            let _ = writeln!(
                s,
                "{:<14} {:>12.0}   into a tap read by a process (as QEMU does): {:.2} of the veth rate",
                format!("{}", e.config.replace("nv-encap-tc", "  tap")),
                tap,
                tap / e.pps
            );
        }
    }
    routing_lines(&mut s, &r.routing);
    acl_lines(&mut s, &r.acls);
    let c = &r.control;
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
    cluster_lines(&mut s, &r.cluster);
    let _ = writeln!(s, "\ngoals");
    for g in &r.goals {
        let _ = writeln!(
            s,
            "{:<4} {:<48} {:>9.2} (target {})",
            if g.met { "met" } else { "MISS" },
            g.name,
            g.measured,
            g.target
        );
    }
    s
}

/// Port ACLs' cost: each configuration against the same path without rules, same run.
fn acl_lines(s: &mut String, rows: &[acls::Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nport ACLs: RED-1's outbound and its peer's inbound rules (the allow last), against the same path without, same run"
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

/// A bar chart of the end-to-end results, one panel per measure, as SVG.
pub fn chart(e2e: &[e2e::Result]) -> String {
    type Measure = fn(&e2e::Result) -> f64;
    let panels: [(&str, Measure); 4] = [
        ("64-byte UDP, Mpps", |r| r.pps / 1e6),
        ("TCP, Gbit/s", |r| r.tcp_gbps),
        ("RTT p50, us", |r| r.rtt_p50_us),
        ("RTT p99, us", |r| r.rtt_p99_us),
    ];
    let colors = [
        "#1f77b4", "#aec7e8", "#2ca02c", "#98df8a", "#7f7f7f", "#ff7f0e",
    ];
    let (pw, ph) = (420.0, 260.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        pw * 4.0,
        ph + 60.0
    );
    svg.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (p, (title, value)) in panels.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "four panels")]
        let x0 = p as f64 * pw;
        let max = e2e.iter().map(value).fold(0.0_f64, f64::max).max(1e-9);
        let _ = write!(
            svg,
            r#"<text x="{}" y="20" text-anchor="middle" font-weight="bold">{title}</text>"#,
            x0 + pw / 2.0
        );
        for (i, r) in e2e.iter().enumerate() {
            #[expect(clippy::cast_precision_loss, reason = "four bars")]
            let bx = x0 + 20.0 + i as f64 * 66.0;
            let h = value(r) / max * (ph - 60.0);
            let y = ph - h;
            let _ = write!(
                svg,
                r#"<rect x="{bx}" y="{y}" width="54" height="{h}" fill="{}"/><text x="{}" y="{}" text-anchor="middle">{:.2}</text><text x="{}" y="{}" text-anchor="middle" font-size="9">{}</text>"#,
                colors[i % colors.len()],
                bx + 27.0,
                y - 4.0,
                value(r),
                bx + 27.0,
                ph + 16.0,
                r.config
            );
        }
    }
    let _ = write!(
        svg,
        r#"<text x="10" y="{}" font-size="11">nv encap and rewrite (decapsulating on XDP and on TC), kernel VXLAN over a bridge (baseline) and routed veth (ceiling), measured in one run on the two-host namespace topology.</text></svg>"#,
        ph + 48.0
    );
    svg
}

pub fn write(r: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    std::fs::write(dir.join("e2e.svg"), chart(&r.e2e))?;
    Ok(())
}
