//! Cluster mode: how fast a change typed on one host reaches every host's datapath (against
//! the same change on one host alone, in the same run), what a VM's migration costs its
//! traffic, and a million records in etcd: a fresh agent's load until ready, and what one
//! change then costs an agent.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nv_agent::datapath::LookupView;
use nv_common::LookupKey;
use serde::Serialize;

use super::{Scale, quantile};
use crate::testbed::{Host, TwoHosts};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Result {
    pub moves: u32,
    /// From starting `nvctl lookup move` on host 1 to the last of 3 agents' maps holding it.
    pub move_p50_ms: f64,
    pub move_p99_ms: f64,
    /// The same move on one host alone (no etcd), until its map holds it: the baseline.
    pub alone_p50_ms: f64,
    pub alone_p99_ms: f64,
    pub migrations: u32,
    /// Pings (every 10 ms) lost per migration of a VM between hosts, and the window in which
    /// it had no port (its re-creation) plus the time until every host followed, in pings.
    pub lost_per_migration: f64,
    pub window_pings_per_migration: f64,
    /// Records put in etcd, and how long a fresh agent took from start until it answered,
    /// every record in its map.
    pub records: u32,
    pub load_seconds: f64,
    /// What one change then made the other agents apply (events) and read again (resyncs).
    pub events_for_one_change: u64,
    pub resyncs_for_one_change: u64,
    /// That change, typed by the operator: nvctl reads etcd's records to admit it against
    /// them, writes it, and waits for host 1's agent; s.
    pub operator_change_seconds: f64,
}

/// The PA (last byte) `h`'s map has for VSID 7001 `ca`.
fn pa_of(view: &LookupView, ca: [u8; 4]) -> Option<u8> {
    view.get(&LookupKey { vsid: 7001, ca }).map(|v| v.pa[15])
}

/// Moves a remote record of VSID 7001 back and forth between two PAs `n` times through
/// `nvctl` on `writer`; the samples (ms) until every view in `views` holds the new PA.
fn moves(writer: &Host, views: &[LookupView], n: u32) -> anyhow::Result<Vec<f64>> {
    writer.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "7001",
        "--ca",
        "10.7.0.1",
        "--pa",
        "198.18.0.9",
        "--mac",
        "02:07:00:00:00:01",
    ])?;
    let mut samples = Vec::new();
    for i in 0..n {
        let pa = if i % 2 == 0 { 8 } else { 9 };
        let start = Instant::now();
        writer.nvctl(&[
            "lookup",
            "move",
            "--vsid",
            "7001",
            "--ca",
            "10.7.0.1",
            "--pa",
            &format!("198.18.0.{pa}"),
        ])?;
        loop {
            if views.iter().all(|v| pa_of(v, [10, 7, 0, 1]) == Some(pa)) {
                break;
            }
            ensure!(
                start.elapsed().as_secs() < 10,
                "move {i} not followed in 10 s"
            );
            std::thread::yield_now();
        }
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

/// Migrates RED-2 between hosts 2 and 3 `n` times while RED-1 pings it every 10 ms; (pings
/// lost, the windows in pings) per migration.
fn migrations(bed: &mut TwoHosts, n: u32) -> anyhow::Result<(f64, f64)> {
    let views: Vec<LookupView> = bed
        .hosts
        .iter()
        .map(|h| LookupView::open(&h.pin_path))
        .collect::<std::result::Result<_, _>>()?;
    let count = 300 * n + 200;
    let ping = crate::testbed::PingStream::start(bed, "RED-1", "10.0.0.2", count, "0.01")?;
    let mut window = Duration::ZERO;
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..n {
        let to = if i % 2 == 0 { 2 } else { 1 };
        let start = Instant::now();
        bed.rehome("RED-2", to)?;
        bed.hosts[0].nvctl(&[
            "lookup",
            "move",
            "--vsid",
            "5001",
            "--ca",
            "10.0.0.2",
            "--pa",
            &bed.hosts[to].pa,
            "--port",
            "red2",
            "--host",
            &bed.hosts[to].name,
        ])?;
        let last = u8::try_from(to + 1)?;
        loop {
            let followed = views.iter().enumerate().all(|(j, v)| {
                v.get(&LookupKey {
                    vsid: 5001,
                    ca: [10, 0, 0, 2],
                })
                .is_some_and(|e| e.pa[15] == last && (e.ifindex != 0) == (j == to))
            });
            if followed {
                break;
            }
            ensure!(start.elapsed().as_secs() < 10, "migration {i} not followed");
            std::thread::yield_now();
        }
        window += start.elapsed();
        std::thread::sleep(Duration::from_secs(2));
    }
    let (sent, received) = ping.finish()?;
    let lost = f64::from(sent - received);
    Ok((
        lost / f64::from(n),
        window.as_secs_f64() / 0.01 / f64::from(n),
    ))
}

/// Puts `n` records of VSID 9001 into etcd directly (etcdctl in batches of transactions),
/// as another host's nvctl would have.
fn fill_etcd(etcd: &crate::etcd::Etcd, n: u32) -> anyhow::Result<()> {
    let mut batch = String::new();
    let flush = |batch: &mut String| -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let script = format!("\n{batch}\n\n");
        etcd.ctl_stdin(&["txn"], &script)?;
        batch.clear();
        Ok(())
    };
    for i in 0..n {
        let [_, a, b, c] = i.to_be_bytes();
        let ca = format!("11.{a}.{b}.{c}");
        // etcdctl txn takes a value in double quotes, its own quotes escaped.
        let _ = writeln!(
            batch,
            r#"put /nv/v1/lookups/9001/{ca} "{{\"vsid\":9001,\"ca\":\"{ca}\",\"pa\":\"198.18.0.9\",\"mac\":\"02:09:{a:02x}:{b:02x}:{c:02x}:01\"}}""#
        );
        if (i + 1) % 10_000 == 0 {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)
}

pub fn run(scale: Scale) -> anyhow::Result<Result> {
    let n_moves = scale.pick(100, 4);
    // The baseline: one host alone.
    let alone = TwoHosts::build("ba")?;
    alone.configure()?;
    let mut base = moves(
        &alone.hosts[0],
        &[LookupView::open(&alone.hosts[0].pin_path)?],
        n_moves,
    )?;
    drop(alone);

    let records = scale.pick(1_000_000, 2000);
    let (mut bed, etcd) = TwoHosts::build_cluster("bk", 3, 3)?;
    bed.configure_cluster()?;
    let views: Vec<LookupView> = bed
        .hosts
        .iter()
        .map(|h| LookupView::open(&h.pin_path))
        .collect::<std::result::Result<_, _>>()?;
    let mut samples = moves(&bed.hosts[0], &views, n_moves)?;
    let n_migrations = scale.pick(10, 2);
    let (lost, window) = migrations(&mut bed, n_migrations)?;

    // A million records in etcd; host 3's agent starts afresh (empty store) and loads them.
    fill_etcd(&etcd, records)?;
    let h3 = &mut bed.hosts[2];
    h3.stop_agent();
    std::fs::remove_dir_all(&h3.state_dir)?;
    let _ = std::fs::remove_dir_all(&h3.pin_path);
    let max = (records + 1000).to_string();
    h3.agent_args.extend(["--max-lookups".into(), max.clone()]);
    let start = Instant::now();
    h3.start_agent()?;
    h3.nvctl(&["status"])?;
    let load = start.elapsed();
    let view = LookupView::open(&h3.pin_path)?;
    let [_, a, b, c] = (records - 1).to_be_bytes();
    ensure!(
        view.get(&LookupKey {
            vsid: 9001,
            ca: [11, a, b, c]
        })
        .is_some(),
        "the fresh agent was ready without the last record"
    );
    // One change: the others apply one event and read nothing again.
    let status = |h: &Host| -> anyhow::Result<(u64, u64)> {
        let c = h.nvctl_json(&["status"])?["cluster"].clone();
        Ok((
            c["events"].as_u64().context("events")?,
            c["resyncs"].as_u64().context("resyncs")?,
        ))
    };
    let before = status(&bed.hosts[2])?;
    let typed = Instant::now();
    bed.hosts[0].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "7001",
        "--ca",
        "10.7.0.1",
        "--pa",
        "198.18.0.7",
    ])?;
    let operator_change = typed.elapsed();
    let start = Instant::now();
    while pa_of(&LookupView::open(&bed.hosts[2].pin_path)?, [10, 7, 0, 1]) != Some(7) {
        ensure!(
            start.elapsed().as_secs() < 10,
            "the change did not reach host 3"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = status(&bed.hosts[2])?;
    Ok(Result {
        moves: n_moves,
        move_p50_ms: quantile(&mut samples, 0.5),
        move_p99_ms: quantile(&mut samples, 0.99),
        alone_p50_ms: quantile(&mut base, 0.5),
        alone_p99_ms: quantile(&mut base, 0.99),
        migrations: n_migrations,
        lost_per_migration: lost,
        window_pings_per_migration: window,
        records,
        load_seconds: load.as_secs_f64(),
        events_for_one_change: after.0 - before.0,
        resyncs_for_one_change: after.1 - before.1,
        operator_change_seconds: operator_change.as_secs_f64(),
    })
}
