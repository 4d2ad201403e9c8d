//! What the distributed router costs: a routed packet against a same-subnet packet in the
//! same run, with 10 and 10,000 routes in the domain. Program cost with `BPF_PROG_TEST_RUN`
//! (the fixture's host: RED-1 to RED-2 by NVGRE, and RED-1 routed to RED-B by NVGRE), and end
//! to end on the two-host bed (RED-1 to RED-2, and RED-1 to RED-B in contoso's other subnet,
//! decapsulated on XDP), each pair measured back to back.
use serde::Serialize;

use super::{
    Scale,
    e2e::{rtt, tcp},
    quantile,
};
use crate::{
    fixture::{CA_B, CA1, CA2, Programs, RED1_MAC, RED2_MAC, ROUTER_MAC, host_with, udp_frame},
    testbed::{RED_VSID, TwoHosts},
};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Routes in the domain.
    pub routes: u32,
    /// `same subnet` or `routed`.
    pub path: String,
    /// Median of single `BPF_PROG_TEST_RUN`s of the VM-side program, 64-byte frame, ns.
    pub program_ns: f64,
    /// End to end: 64-byte packets per second, TCP, RTT median.
    pub pps: f64,
    pub tcp_gbps: f64,
    pub rtt_p50_us: f64,
}

const ROUTE_COUNTS: [u32; 2] = [10, 10_000];

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let programs = std::thread::spawn(move || program_costs(scale))
        .join()
        .map_err(|_| anyhow::anyhow!("routing program benchmark panicked"))??;
    let mut rows = Vec::new();
    for (i, routes) in ROUTE_COUNTS.into_iter().enumerate() {
        let [same, routed] = programs[i];
        let e2e = end_to_end(routes, scale)?;
        for (path, program_ns, (pps, tcp_gbps, rtt_p50_us)) in
            [("same subnet", same, e2e[0]), ("routed", routed, e2e[1])]
        {
            rows.push(Row {
                routes,
                path: path.into(),
                program_ns,
                pps,
                tcp_gbps,
                rtt_p50_us,
            });
        }
    }
    Ok(rows)
}

/// Per route count: [same subnet, routed] program cost, ns.
fn program_costs(scale: Scale) -> anyhow::Result<Vec<[f64; 2]>> {
    let singles = scale.pick(50_000, 500);
    let mut out = Vec::new();
    for routes in ROUTE_COUNTS {
        let mut h = host_with(true, 1_000, Programs::Forwarding)?;
        // contoso has 5 routes in the fixture; the rest are added to it.
        h.add_domains_with(routes.saturating_sub(5))?;
        let payload = [0u8; 22];
        let same = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &payload);
        let routed = udp_frame(RED1_MAC, ROUTER_MAC, CA1, CA_B, &payload);
        h.expect(
            nv_common::program_names::FROM_VM,
            &same,
            Some(h.red1),
            crate::fixture::TC_ACT_REDIRECT,
            "vm_tx_encap",
        )?;
        h.expect(
            nv_common::program_names::FROM_VM,
            &routed,
            Some(h.red1),
            crate::fixture::TC_ACT_REDIRECT,
            "vm_routed",
        )?;
        // Taking turns, so the machine's noise falls on both alike.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..singles {
            for (frame, samples) in [(&same, &mut a), (&routed, &mut b)] {
                let run =
                    h.dp.test_run(nv_common::program_names::FROM_VM, frame, Some(h.red1), 1)?;
                #[expect(clippy::cast_precision_loss, reason = "nanoseconds of one run")]
                samples.push(run.duration.as_nanos() as f64);
            }
        }
        out.push([quantile(&mut a, 0.5), quantile(&mut b, 0.5)]);
    }
    Ok(out)
}

/// [same subnet, routed]: (pps, TCP Gb/s, RTT p50 µs) on a bed whose domain has `routes`.
fn end_to_end(routes: u32, scale: Scale) -> anyhow::Result<[(f64, f64, f64); 2]> {
    let mut bed = TwoHosts::build_with("bq", &["--decap-hook", "xdp"])?;
    bed.add_vm("RED-B", 7002, "10.1.0.5", "02:00:00:00:07:05", "redb", 1)?;
    bed.configure()?;
    add_routes(&bed, routes)?;
    for dst in ["10.0.0.2", "10.1.0.5"] {
        anyhow::ensure!(
            (0..10).any(|_| bed.ping("RED-1", dst, 1).unwrap_or(0) == 1),
            "{routes} routes: RED-1 cannot reach {dst}"
        );
    }
    let seconds = scale.pick(5.0, 0.5);
    let red1 = bed.vm("RED-1");
    let mut out = [(0.0, 0.0, 0.0); 2];
    for (i, (vm, dst)) in [("RED-2", "10.0.0.2"), ("RED-B", "10.1.0.5")]
        .into_iter()
        .enumerate()
    {
        let to = bed.vm(vm);
        let (p50, _) = rtt(red1, dst, scale.pick(300, 20))?;
        out[i] = (
            super::load::delivered_pps(red1, to, dst, seconds, &[0])?,
            tcp(red1, to, dst, scale.pick(5, 1))?,
            p50,
        );
    }
    Ok(out)
}

/// Routes RED (10.0.0.0/24, gateway 10.0.0.254) and VSID 7002 (10.1.0.0/24, RED-B's) in one
/// domain, with `routes` routes in all on every host (the rest to 100.64.x.0/24 via RED-B),
/// and default routes in RED-1 and RED-B through the router.
pub(super) fn add_routes(bed: &TwoHosts, routes: u32) -> anyhow::Result<()> {
    let route = |vsid: u32, prefix: String, nexthop: &str, gateway: Option<&str>| {
        serde_json::json!({
            "rdid": "contoso", "vsid": vsid, "prefix": prefix, "nexthop": nexthop,
            "gateway": gateway,
        })
    };
    let mut table = vec![
        route(
            RED_VSID,
            "10.0.0.0/24".into(),
            "0.0.0.0",
            Some("10.0.0.254"),
        ),
        route(7002, "10.1.0.0/24".into(), "0.0.0.0", None),
    ];
    for i in 0..routes.saturating_sub(2) {
        let prefix = std::net::Ipv4Addr::from(0x6440_0000u32 + (i << 8));
        table.push(route(7002, format!("{prefix}/24"), "10.1.0.5", None));
    }
    let file = bed.tmp_dir().join("bench-routes.json");
    std::fs::write(&file, serde_json::to_vec(&table)?)?;
    for h in &bed.hosts {
        h.nvctl(&["route", "import", &file.to_string_lossy()])?;
    }
    bed.vm("RED-1")
        .ns
        .ip(&["route", "add", "default", "via", "10.0.0.254"])?;
    bed.vm("RED-B")
        .ns
        .ip(&["route", "add", "default", "via", "10.1.0.1"])?;
    Ok(())
}
