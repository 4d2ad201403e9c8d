//! Hash and cache pressure: nv and the Cilium-style peer with a million remote records (1M
//! lookup records; 1M ipcache entries), RED-1 flooding 100k of them in turns, against the same
//! flood to one of them, on the same bed in the same run. What is measured is the sending
//! host's path (lookup, encapsulation, redirect): frames per second that leave host 1 on the
//! underlay. The underlay drops them before host 2, whose drops of unknown destinations would
//! otherwise share the CPU and measure something else.
use std::fmt::Write as _;

use anyhow::Context as _;
use serde::Serialize;

use super::{Scale, peer, quantile};
use crate::testbed::{RED_VSID, TwoHosts};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub config: String,
    pub records: u32,
    pub flows: u32,
    /// Frames a second leaving host 1, to one destination and to `flows` in turns, per
    /// repetition (taken in turns), and their medians.
    pub one_runs: Vec<f64>,
    pub spread_runs: Vec<f64>,
    pub one_pps: f64,
    pub spread_pps: f64,
}

/// The first of the remote addresses: 10.64.0.0/12 holds 2^20.
const FIRST: &str = "10.64.0.0";

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let (records, flows) = scale.pick((1_000_000u32, 100_000u32), (2000, 500));
    let mut rows = Vec::new();
    for config in ["nv-encap-tc", "cilium-peer"] {
        let (bed, _peer) = if config == "cilium-peer" {
            let bed = TwoHosts::build_bare("pc")?;
            let p = peer::install(&bed, records)?;
            bed.vm("RED-1").ns.ip(&[
                "neigh",
                "replace",
                FIRST,
                "lladdr",
                peer::TUNNEL_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
            (bed, Some(p))
        } else {
            let max = (records + 1000).to_string();
            let bed = TwoHosts::build_with("pn", &["--max-lookups", &max])?;
            bed.configure()?;
            import(&bed, records)?;
            (bed, None)
        };
        let red1 = bed.vm("RED-1");
        red1.ns
            .ip(&["route", "add", "10.64.0.0/12", "dev", "eth0"])?;
        // nv answers RED-1's ARP for the first address from its record; the echo dies on host 2.
        let _ = bed.ping("RED-1", FIRST, 1)?;
        drop_before_host2(&bed)?;
        let (mut one_runs, mut spread_runs) = (Vec::new(), Vec::new());
        for _ in 0..scale.pick(3, 1) {
            for (spread, runs) in [(1, &mut one_runs), (flows, &mut spread_runs)] {
                runs.push(leaving_host1(&bed, spread, scale.pick(3.0, 0.3))?);
            }
        }
        rows.push(Row {
            config: config.to_owned(),
            records,
            flows,
            one_pps: quantile(&mut one_runs.clone(), 0.5),
            spread_pps: quantile(&mut spread_runs.clone(), 0.5),
            one_runs,
            spread_runs,
        });
    }
    Ok(rows)
}

/// `records` remote records of RED, 10.64.0.0 onwards, on host 2, into host 1's agent.
fn import(bed: &TwoHosts, records: u32) -> anyhow::Result<()> {
    let mut csv = String::from("vsid,ca,pa,mac\n");
    let host2 = &bed.hosts[1].pa;
    for n in 0..records {
        let ca = std::net::Ipv4Addr::from(0x0a40_0000 + n);
        let [_, a, b, c] = n.to_be_bytes();
        let _ = writeln!(
            csv,
            "{RED_VSID},{ca},{host2},02:0a:{a:02x}:{b:02x}:{c:02x}:01"
        );
    }
    let file = bed.tmp_dir().join("pressure.csv");
    std::fs::write(&file, csv)?;
    let out = bed.hosts[0].nvctl_json(&["lookup", "import", file.to_str().context("path")?])?;
    anyhow::ensure!(out["imported"] == records, "import answered {out}");
    Ok(())
}

/// Host 2 leaves the underlay's bridge, which then drops what host 1 sends it (this kernel has
/// no TC classifier but BPF to filter with); host 1 keeps host 2's address as a permanent
/// neighbour, so nothing waits on ARP.
fn drop_before_host2(bed: &TwoHosts) -> anyhow::Result<()> {
    let mac = bed.hosts[1]
        .ns
        .exec("cat", &["/sys/class/net/uplink0/address"])?;
    bed.hosts[0].ns.ip(&[
        "neigh",
        "replace",
        &bed.hosts[1].pa,
        "lladdr",
        mac.trim(),
        "dev",
        "uplink0",
        "nud",
        "permanent",
    ])?;
    bed.underlay.ip(&["link", "set", "ul2", "nomaster"])?;
    Ok(())
}

/// RED-1 floods `spread` addresses from [`FIRST`] on in turns for `seconds`: frames a second
/// that reached the underlay from host 1.
fn leaving_host1(bed: &TwoHosts, spread: u32, seconds: f64) -> anyhow::Result<f64> {
    let count = || -> anyhow::Result<u64> {
        Ok(bed
            .underlay
            .exec("cat", &["/sys/class/net/ul1/statistics/rx_packets"])?
            .trim()
            .parse()?)
    };
    let before = count()?;
    let start = std::time::Instant::now();
    super::load::Flood::new(bed.vm("RED-1"), FIRST, seconds)
        .spread(spread)
        .run()?;
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(std::time::Duration::from_millis(100));
    #[expect(clippy::cast_precision_loss, reason = "frame counts")]
    Ok((count()? - before) as f64 / elapsed)
}
