//! Program cost with `BPF_PROG_TEST_RUN`, JIT on. The kernel reuses one packet across the
//! repetitions of a run, so a program that changes its packet (encap, decap, rewrite) would be
//! measured on its own output from the second repetition on; those paths are measured as the
//! median of many single runs instead. Every path is measured that way, floors included, so
//! "above the floor" compares like with like; paths that leave the packet alone are also
//! measured with one run of `repeat` repetitions.
use anyhow::Context as _;
use nv_common::{
    DatapathConfig,
    program_names::{FROM_VM, NOOP_TC, NOOP_XDP, UPLINK_TC, UPLINK_XDP},
};
use serde::Serialize;

use super::{Scale, quantile};
use crate::fixture::{
    BLUE2_MAC, CA1, CA2, CA3, GATEWAY_MAC, GREEN_GATEWAY_MAC, GREEN1_MAC, GREEN1_PA, GREEN2_MAC,
    GREEN2_PA, Host, LOCAL_PA, Programs, RED, RED1_MAC, RED2_MAC, RED3_MAC, REMOTE_PA, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, host_with, nvgre, udp_frame,
};

#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub path: String,
    pub program: String,
    pub frame_bytes: usize,
    pub records: u32,
    /// Median of single runs, ns.
    pub single_ns: f64,
    /// Mean over one run of `repeat` repetitions, ns, for paths that leave the packet alone.
    pub repeat_ns: Option<f64>,
    pub repeat: u32,
    /// `single_ns` minus the floor of the same hook measured the same way.
    pub above_floor_ns: f64,
    /// `repeat_ns` minus the repeat-run floor: the steadier figure, where there is one.
    pub above_floor_repeat_ns: Option<f64>,
}

/// What a feature of the forwarding copy costs on one path: the same path, same run, measured
/// on a copy of the programs without it.
#[derive(Clone, Debug, Serialize)]
pub struct Overhead {
    pub feature: String,
    pub path: String,
    pub frame_bytes: usize,
    /// ns per packet with the feature (the forwarding copy) and without.
    pub with_ns: f64,
    pub without_ns: f64,
    /// `with_ns / without_ns`.
    pub ratio: f64,
    /// `single` (median of single runs) or `repeat` (mean of one long run).
    pub how: String,
}

struct Path {
    name: &'static str,
    program: &'static str,
    frame: Vec<u8>,
    ifindex: Option<u32>,
    /// The program leaves the packet as it found it, so repetitions are meaningful.
    idempotent: bool,
    floor: &'static str,
    /// Datapath flags (`DatapathConfig::*`) in force while measuring.
    flags: u32,
}

#[expect(
    clippy::too_many_lines,
    reason = "one entry per path, formatted one argument a line"
)]
fn paths(h: &Host, size: usize) -> Vec<Path> {
    let payload = vec![0u8; size.saturating_sub(42)];
    let to_red2 = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &payload);
    let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, &payload);
    let path = |name, program, frame, ifindex, idempotent, floor| Path {
        name,
        program,
        frame,
        ifindex,
        idempotent,
        floor,
        flags: 0,
    };
    let tc = DatapathConfig::TC_DECAP;
    let nvgre_to_red1 = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        RED << 8,
        0,
        &to_red1,
    );
    let rewrite_to_green1 = udp_frame(
        GREEN_GATEWAY_MAC,
        h.uplink_mac,
        GREEN2_PA,
        GREEN1_PA,
        &payload,
    );
    let host_udp = udp_frame(GATEWAY_MAC, h.uplink_mac, REMOTE_PA, LOCAL_PA, &payload);
    vec![
        Path {
            flags: tc,
            ..path(
                "decap_tc",
                UPLINK_TC,
                nvgre_to_red1.clone(),
                None,
                false,
                "floor_tc",
            )
        },
        Path {
            flags: tc,
            ..path(
                "rewrite_in_tc",
                UPLINK_TC,
                rewrite_to_green1.clone(),
                None,
                false,
                "floor_tc",
            )
        },
        path(
            "floor_xdp",
            NOOP_XDP,
            to_red1.clone(),
            None,
            true,
            "floor_xdp",
        ),
        path(
            "floor_tc",
            NOOP_TC,
            to_red2.clone(),
            Some(h.red1),
            true,
            "floor_tc",
        ),
        path(
            "encap",
            FROM_VM,
            to_red2.clone(),
            Some(h.red1),
            false,
            "floor_tc",
        ),
        path(
            "local_vm_to_vm",
            FROM_VM,
            udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, &payload),
            Some(h.red1),
            true,
            "floor_tc",
        ),
        path(
            "rewrite_out",
            FROM_VM,
            udp_frame(GREEN1_MAC, GREEN2_MAC, CA1, CA2, &payload),
            Some(h.green1),
            false,
            "floor_tc",
        ),
        path(
            "drop_vm_unknown_dst",
            FROM_VM,
            udp_frame(RED1_MAC, BLUE2_MAC, CA1, [10, 0, 0, 99], &payload),
            Some(h.red1),
            true,
            "floor_tc",
        ),
        path(
            "decap",
            UPLINK_XDP,
            nvgre(
                GATEWAY_MAC,
                h.uplink_mac,
                REMOTE_PA,
                LOCAL_PA,
                RED << 8,
                0,
                &to_red1,
            ),
            None,
            false,
            "floor_xdp",
        ),
        path(
            "rewrite_in",
            UPLINK_XDP,
            udp_frame(
                GREEN_GATEWAY_MAC,
                h.uplink_mac,
                GREEN2_PA,
                GREEN1_PA,
                &payload,
            ),
            None,
            false,
            "floor_xdp",
        ),
        path(
            "drop_uplink_unknown_vsid",
            UPLINK_XDP,
            nvgre(
                GATEWAY_MAC,
                h.uplink_mac,
                REMOTE_PA,
                LOCAL_PA,
                7777 << 8,
                0,
                &to_red1,
            ),
            None,
            true,
            "floor_xdp",
        ),
        path(
            "pass_host_traffic",
            UPLINK_XDP,
            host_udp.clone(),
            None,
            true,
            "floor_xdp",
        ),
        Path {
            flags: tc,
            ..path(
                "pass_host_traffic_tc",
                UPLINK_TC,
                host_udp,
                None,
                true,
                "floor_tc",
            )
        },
    ]
}

/// What each path must do, checked once before it is timed, so a benchmark never times some
/// other path (a drop, say) by mistake: its verdict and the counter it bumps, if any.
fn expected(path: &str) -> (u32, Option<&'static str>) {
    match path {
        "decap_tc" => (TC_ACT_REDIRECT, Some("uplink_decap")),
        "rewrite_in_tc" => (TC_ACT_REDIRECT, Some("uplink_rewrite_delivered")),
        "encap" => (TC_ACT_REDIRECT, Some("vm_tx_encap")),
        "local_vm_to_vm" => (TC_ACT_REDIRECT, Some("vm_tx_local")),
        "rewrite_out" => (TC_ACT_REDIRECT, Some("vm_tx_rewrite")),
        "drop_vm_unknown_dst" => (TC_ACT_SHOT, Some("drop_vm_unknown_dst")),
        "decap" => (XDP_PASS, Some("uplink_decap")),
        "drop_uplink_unknown_vsid" => (XDP_DROP, Some("drop_uplink_vsid_not_hosted")),
        "floor_tc" | "pass_host_traffic_tc" => (TC_ACT_OK, None),
        _ => (XDP_PASS, None),
    }
}

fn check(h: &Host, p: &Path) -> anyhow::Result<()> {
    match expected(p.name) {
        (verdict, Some(counter)) => h
            .expect(p.program, &p.frame, p.ifindex, verdict, counter)
            .map(|_| ()),
        (verdict, None) => {
            let out = h.dp.test_run(p.program, &p.frame, p.ifindex, 1)?;
            anyhow::ensure!(
                out.ret == verdict,
                "{}: returned {}, expected {verdict}",
                p.name,
                out.ret
            );
            Ok(())
        }
    }
    .with_context(|| format!("bench path {} ({} bytes)", p.name, p.frame.len()))
}

fn single_runs(h: &Host, p: &Path, n: u32) -> anyhow::Result<f64> {
    let mut samples = Vec::with_capacity(n as usize);
    for _ in 0..n {
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds of one run")]
        samples.push(
            h.dp.test_run(p.program, &p.frame, p.ifindex, 1)?
                .duration
                .as_nanos() as f64,
        );
    }
    Ok(quantile(&mut samples, 0.5))
}

/// Measures every path for 64- and 1500-byte frames with 1K and 1M extra lookup records, and
/// what per-VSID counting and the monitor's checks cost. Runs in its own thread: the fixture
/// moves that thread into its network namespace.
pub fn run(scale: Scale) -> anyhow::Result<(Vec<Cost>, Vec<Overhead>)> {
    std::thread::spawn(move || {
        let costs = measure(scale)?;
        let overheads = overheads(scale)?;
        Ok((costs, overheads))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("program benchmark panicked"))?
}

/// Per-VSID counting and the monitor's checks (no monitor attached), each against a copy of
/// the programs without it, on the paths that pay for them; each copy shares the host's maps
/// and is checked to take the path. A second forwarding copy is the control: its ratio is the
/// noise. The copies take turns, so the machine's noise falls on all alike.
fn overheads(scale: Scale) -> anyhow::Result<Vec<Overhead>> {
    let mut h = host_with(true, 1_000, Programs::Forwarding)?;
    h.ns.ip(&["link", "set", "uplink0", "mtu", "9000"])?;
    let copies = vec![
        (
            "control: the same programs".to_owned(),
            h.load_copy(Programs::Forwarding)?,
        ),
        (
            "per-VSID counting".to_owned(),
            h.load_copy(Programs::WithoutVsidCounts)?,
        ),
        (
            "monitor and debug-event checks, off".to_owned(),
            h.load_copy(Programs::WithoutMonitor)?,
        ),
    ];
    side_by_side(scale, &mut h, &copies)
}

/// This tree's programs against another build's (`object`, the eBPF ELF of revision `rev`)
/// on the IPv4 paths, on the same maps, in turns: what this tree's changes cost IPv4. A second
/// copy of this tree's programs is the control. Runs in its own thread (the fixture moves it
/// into its namespace).
pub fn against(scale: Scale, object: Vec<u8>, rev: String) -> anyhow::Result<Vec<Overhead>> {
    std::thread::spawn(move || {
        let mut h = host_with(true, 1_000, Programs::Forwarding)?;
        h.ns.ip(&["link", "set", "uplink0", "mtu", "9000"])?;
        let copies = vec![
            (
                "control: the same programs".to_owned(),
                h.load_copy(Programs::Forwarding)?,
            ),
            (format!("the tree of {rev}"), h.load_foreign(&object)?),
        ];
        side_by_side(scale, &mut h, &copies)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("program benchmark panicked"))?
}

/// The host's programs against each of `copies` (sharing its maps, each checked to take the
/// path), on the paths that matter, in turns so the machine's noise falls on all alike.
fn side_by_side(
    scale: Scale,
    h: &mut Host,
    copies: &[(String, nv_agent::datapath::Datapath)],
) -> anyhow::Result<Vec<Overhead>> {
    let rounds = 10;
    let singles = scale.pick(20_000, 100);
    let repeat = scale.pick(1_000_000, 1_000);
    let mut out = Vec::new();
    let wanted = [
        "encap",
        "decap_tc",
        "local_vm_to_vm",
        "rewrite_out",
        "drop_vm_unknown_dst",
    ];
    for p in paths(h, 64)
        .into_iter()
        .filter(|p| wanted.contains(&p.name))
    {
        if h.desired.config.flags != p.flags {
            h.set_flags(p.flags)?;
        }
        check(h, &p)?;
        for (feature, copy) in copies {
            let verdict = copy.test_run(p.program, &p.frame, p.ifindex, 1)?.ret;
            anyhow::ensure!(
                verdict == expected(p.name).0,
                "{}: the copy without {feature} returned {verdict}",
                p.name
            );
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); copies.len() + 1];
        for _ in 0..rounds {
            let all = std::iter::once(&h.dp).chain(copies.iter().map(|(_, c)| c));
            for (dp, samples) in all.zip(samples.iter_mut()) {
                let run = |n| dp.test_run(p.program, &p.frame, p.ifindex, n);
                #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
                if p.idempotent {
                    samples.push(run(repeat)?.duration.as_nanos() as f64);
                } else {
                    for _ in 0..singles / rounds {
                        samples.push(run(1)?.duration.as_nanos() as f64);
                    }
                }
            }
        }
        let with = quantile(&mut samples[0], 0.5);
        for ((feature, _), s) in copies.iter().zip(samples.iter_mut().skip(1)) {
            let without = quantile(s, 0.5);
            out.push(Overhead {
                feature: feature.clone(),
                path: p.name.to_owned(),
                frame_bytes: 64,
                with_ns: with,
                without_ns: without,
                ratio: with / without,
                how: if p.idempotent { "repeat" } else { "single" }.into(),
            });
        }
    }
    Ok(out)
}

fn measure(scale: Scale) -> anyhow::Result<Vec<Cost>> {
    let set = |h: &mut Host, flags: u32| -> anyhow::Result<()> {
        if h.desired.config.flags != flags {
            h.set_flags(flags)?;
        }
        Ok(())
    };
    let singles = scale.pick(100_000, 500);
    let repeat = scale.pick(1_000_000, 1_000);
    let mut out = Vec::new();
    for records in [1_000u32, scale.pick(1_000_000, 20_000)] {
        let mut h = host_with(true, records, Programs::Forwarding)?;
        // An underlay with room for the NVGRE header on 1500-byte frames, as the README asks
        // of operators: otherwise 1500-byte encapsulation is a drop (too big).
        h.ns.ip(&["link", "set", "uplink0", "mtu", "9000"])?;
        for size in [64usize, 1500] {
            let paths = paths(&h, size);
            let mut single = std::collections::HashMap::new();
            let mut repeated = std::collections::HashMap::new();
            for p in &paths {
                set(&mut h, p.flags)?;
                check(&h, p)?;
                single.insert(p.name, single_runs(&h, p, singles)?);
                if p.idempotent {
                    let run = h.dp.test_run(p.program, &p.frame, p.ifindex, repeat)?;
                    #[expect(clippy::cast_precision_loss, reason = "nanoseconds per run")]
                    repeated.insert(p.name, run.duration.as_nanos() as f64);
                }
            }
            for p in &paths {
                let repeat_ns = repeated.get(p.name).copied();
                out.push(Cost {
                    path: p.name.to_owned(),
                    program: p.program.to_owned(),
                    frame_bytes: size,
                    records,
                    single_ns: single[p.name],
                    repeat_ns,
                    repeat,
                    above_floor_ns: single[p.name] - single[p.floor],
                    above_floor_repeat_ns: repeat_ns.zip(repeated.get(p.floor)).map(|(r, f)| r - f),
                });
            }
        }
    }
    Ok(out)
}
