//! Control plane: `nvctl lookup add` (a new process each time, as an operator's script runs it)
//! until the record is in the datapath's lookup map, read back from the pinned map; the same on
//! a table of a million records; the time to import that million; the agent's memory per record.
use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, ensure};
use nv_agent::datapath::LookupView;
use nv_common::LookupKey;
use serde::Serialize;

use super::{Scale, quantile};
use crate::testbed::{Host, TwoHosts};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Result {
    pub adds: u32,
    /// From starting `nvctl lookup add` to finding the record in the map, ms (small table).
    pub add_to_datapath_p50_ms: f64,
    pub add_to_datapath_p99_ms: f64,
    /// Records found in the map the moment nvctl returned (the agent answers after the update).
    pub present_on_return: u32,
    /// Records imported with one `nvctl lookup import`.
    pub imported: u32,
    /// From starting `nvctl lookup import` to its return, every record in the map, s.
    pub import_seconds: f64,
    /// The floor, in the same run: the same entries written straight into a fresh BPF hash map
    /// of the same size, batched (as the agent writes them) and one system call each, s.
    pub map_fill_batched_seconds: f64,
    pub map_fill_single_seconds: f64,
    /// Agent resident memory grown by the import, bytes per record.
    pub agent_bytes_per_record: f64,
    /// Kernel memory of the lookup map (bpftool's memlock) over its capacity, bytes per entry.
    pub map_bytes_per_entry: f64,
    /// The add latency again, with the imported table in place.
    pub add_on_big_table_p50_ms: f64,
    pub add_on_big_table_p99_ms: f64,
    /// A VM's port deleted and re-created (a restarted VM), from starting to re-create it to
    /// its record naming the new port (the from-VM filter is attached before that), ms. An
    /// upper bound on the window in which the new port is not filtered: it includes `ip`
    /// creating and configuring the port.
    pub port_filtered_p50_ms: f64,
    pub port_filtered_p99_ms: f64,
    /// Of that, how long after `ip` was done the agent still had not followed, ms (0 when it
    /// had followed by then).
    pub port_filtered_after_ip_p50_ms: f64,
    pub port_filtered_after_ip_p99_ms: f64,
}

/// Adds `count` remote records in 10.<net>.x.y through nvctl; returns the latency samples (ms)
/// and how many were in the map when nvctl returned.
fn adds(h: &Host, view: &LookupView, net: u8, count: u32) -> anyhow::Result<(Vec<f64>, u32)> {
    let mut samples = Vec::new();
    let mut present_on_return = 0;
    for i in 0..count {
        let [_, _, a, b] = i.to_be_bytes();
        let ca = Ipv4Addr::new(10, net, a, b);
        let mac = format!("02:{net:02x}:00:00:{a:02x}:{b:02x}");
        let start = Instant::now();
        h.nvctl(&[
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            &ca.to_string(),
            "--pa",
            "198.18.0.2",
            "--mac",
            &mac,
        ])?;
        let key = LookupKey {
            vsid: 5001,
            ca: ca.octets(),
        };
        let mut present = view.get(&key).is_some();
        if present {
            present_on_return += 1;
        }
        while !present {
            present = view.get(&key).is_some();
            ensure!(
                start.elapsed().as_secs() < 10,
                "record {ca} not in the datapath 10 s after the add"
            );
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((samples, present_on_return))
}

fn rss_bytes(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024.0)
}

/// bpftool's memlock of the map named `name` owned by... any process: the newest such map.
fn map_memlock(name: &str) -> anyhow::Result<(f64, f64)> {
    let out = crate::sys::run("bpftool", &["-j", "map", "show"])?;
    let maps: serde_json::Value = serde_json::from_str(&out)?;
    let m = maps
        .as_array()
        .context("bpftool list")?
        .iter()
        .filter(|m| m["name"] == name)
        .max_by_key(|m| m["id"].as_u64().unwrap_or(0))
        .context("lookup map not found by bpftool")?;
    let memlock = m["bytes_memlock"].as_f64().context("bytes_memlock")?;
    let entries = m["max_entries"].as_f64().context("max_entries")?;
    Ok((memlock, entries))
}

/// Re-creates RED-1's port `count` times; the samples (ms) until the agent has followed, from
/// the start and from the moment `ip` was done.
fn port_windows(bed: &mut TwoHosts, count: u32) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let view = LookupView::open(&bed.hosts[0].pin_path)?;
    let key = LookupKey {
        vsid: 5001,
        ca: [10, 0, 0, 1],
    };
    let (mut samples, mut after_ip) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let old = view.get(&key).context("RED-1's record")?.ifindex;
        let start = Instant::now();
        bed.rehome("RED-1", 0)?;
        let ip_done = start.elapsed().as_secs_f64() * 1e3;
        // Bounded: 5 s.
        let followed = loop {
            let now = view.get(&key).context("RED-1's record")?.ifindex;
            if now != old && now != nv_common::IFINDEX_GONE {
                break true;
            }
            if start.elapsed().as_secs() >= 5 {
                break false;
            }
            std::thread::yield_now();
        };
        ensure!(followed, "the agent did not follow RED-1's new port in 5 s");
        let total = start.elapsed().as_secs_f64() * 1e3;
        samples.push(total);
        after_ip.push((total - ip_done).max(0.0));
    }
    Ok((samples, after_ip))
}

pub fn run(scale: Scale) -> anyhow::Result<Result> {
    let (small_adds, big): (u32, u32) = (scale.pick(1000, 20), scale.pick(1_000_000, 2000));
    let max = (big + small_adds * 2 + 100).to_string();
    let mut bed = TwoHosts::build_with("bc", &["--max-lookups", &max])?;
    bed.configure()?;
    // The agent says how long each phase of a change set took.
    bed.hosts[0].stop_agent();
    bed.hosts[0].start_agent_with_env(&[("RUST_LOG", "info,nv_agent::txn=debug")])?;
    let (mut windows, mut after_ip) = port_windows(&mut bed, scale.pick(50, 3))?;
    let h = &bed.hosts[0];
    let view = LookupView::open(&h.pin_path)?;
    let (mut small, present_on_return) = adds(h, &view, 1, small_adds)?;

    // A million remote records in one import file.
    let file = bed.tmp_dir().join("big.csv");
    let mut csv = String::from("vsid,ca,pa,mac\n");
    for i in 0..big {
        let [_, a, b, c] = i.to_be_bytes();
        let _ = writeln!(
            csv,
            "9001,11.{a}.{b}.{c},198.18.0.2,02:09:{a:02x}:{b:02x}:{c:02x}:01"
        );
    }
    std::fs::write(&file, csv)?;
    let (keys, values): (Vec<LookupKey>, Vec<nv_common::LookupValue>) = (0..big)
        .map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            let key = LookupKey {
                vsid: 9001,
                ca: [11, a, b, c],
            };
            let value = nv_common::LookupValue {
                pa: nv_common::v4_mapped([198, 18, 0, 2]),
                mac: [2, 9, a, b, c, 1],
                method: 0,
                _pad: 0,
                ifindex: 0,
            };
            (key, value)
        })
        .unzip();
    let (fill_single, fill_batched) =
        super::mapfill::fill(&keys, &values, max.parse().context("max")?)?;
    drop((keys, values));
    let pid = h.agent.as_ref().context("agent running")?.pid();
    let rss_before = rss_bytes(pid)?;
    let start = Instant::now();
    let out = h.nvctl_json(&["lookup", "import", file.to_str().context("utf-8 path")?])?;
    let import_seconds = start.elapsed().as_secs_f64();
    ensure!(out["imported"] == big, "import answered {out}");
    let last = big - 1;
    let [_, a, b, c] = last.to_be_bytes();
    ensure!(
        view.get(&LookupKey {
            vsid: 9001,
            ca: [11, a, b, c]
        })
        .is_some(),
        "last imported record not in the map"
    );
    let rss_after = rss_bytes(pid)?;
    for line in h
        .agent_log()
        .lines()
        .filter(|l| l.contains(&format!("changes={big}")) || l.contains(&format!("imported {big}")))
    {
        eprintln!("bench: agent: {line}");
    }
    let (memlock, entries) = map_memlock(nv_common::map_names::LOOKUPS)?;
    let (mut on_big, _) = adds(h, &view, 3, scale.pick(200, 10))?;
    Ok(Result {
        adds: small_adds,
        add_to_datapath_p50_ms: quantile(&mut small, 0.5),
        add_to_datapath_p99_ms: quantile(&mut small, 0.99),
        present_on_return,
        imported: big,
        import_seconds,
        map_fill_batched_seconds: fill_batched.as_secs_f64(),
        map_fill_single_seconds: fill_single.as_secs_f64(),
        agent_bytes_per_record: (rss_after - rss_before) / f64::from(big),
        map_bytes_per_entry: memlock / entries,
        add_on_big_table_p50_ms: quantile(&mut on_big, 0.5),
        add_on_big_table_p99_ms: quantile(&mut on_big, 0.99),
        port_filtered_p50_ms: quantile(&mut windows, 0.5),
        port_filtered_p99_ms: quantile(&mut windows, 0.99),
        port_filtered_after_ip_p50_ms: quantile(&mut after_ip, 0.5),
        port_filtered_after_ip_p99_ms: quantile(&mut after_ip, 0.99),
    })
}
