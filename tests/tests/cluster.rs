//! Cluster mode: three hosts whose agents follow a real etcd (three members, started and
//! stopped by the tests), tenant traffic across them.
use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nv_agent::datapath::LookupView;
use nv_common::LookupKey;
use nv_tests::{
    etcd::Etcd,
    testbed::{Host, TwoHosts},
};

/// What `h`'s datapath holds for RED's (VSID 5001) `ca`: its PA's last byte and whether the
/// port is here.
fn red_entry(h: &Host, last: u8) -> anyhow::Result<Option<(u8, bool)>> {
    let view = LookupView::open(&h.pin_path)?;
    Ok(view
        .get(&LookupKey {
            vsid: 5001,
            ca: [10, 0, 0, last],
        })
        .map(|v| (v.pa[15], v.ifindex != 0)))
}

/// Waits (up to 10 s) until `ok` holds on every host.
fn converge(
    bed: &TwoHosts,
    what: &str,
    ok: impl Fn(usize, &Host) -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for (i, h) in bed.hosts.iter().enumerate() {
            all &= ok(i, h)?;
        }
        if all {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("not converged in 10 s: {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A bounded ping stream from a VM, in the background.
fn ping_stream(
    bed: &TwoHosts,
    from: &str,
    dst: &str,
    count: u32,
    interval: &str,
) -> anyhow::Result<Child> {
    Ok(Command::new("ip")
        .args(["netns", "exec", &bed.vm(from).ns.name])
        .args(["timeout", "60", "ping", "-q", "-i", interval, "-W", "1"])
        .args(["-c", &count.to_string(), dst])
        .stdout(Stdio::piped())
        .spawn()?)
}

/// (sent, received) of a finished ping stream.
fn ping_result(child: Child) -> anyhow::Result<(u32, u32)> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary in {text}"))?;
    let field = |suffix: &str| -> anyhow::Result<u32> {
        Ok(summary
            .split(',')
            .find_map(|p| p.trim().strip_suffix(suffix))
            .with_context(|| format!("no '{suffix}' in {summary}"))?
            .trim()
            .parse()?)
    };
    Ok((field(" packets transmitted")?, field(" received")?))
}

fn cluster_status(h: &Host) -> anyhow::Result<serde_json::Value> {
    Ok(h.nvctl_json(&["status"])?["cluster"].clone())
}

fn bed() -> anyhow::Result<(TwoHosts, Etcd)> {
    let (bed, etcd) = TwoHosts::build_cluster("cl", 3, 3)?;
    bed.configure_cluster()?;
    // Every host holds every record, its own VMs' with their port.
    converge(&bed, "the records configured on host 1", |i, h| {
        Ok(red_entry(h, 1)?.map(|(_, here)| here) == Some(i == 0)
            && red_entry(h, 2)?.map(|(_, here)| here) == Some(i == 1))
    })?;
    Ok((bed, etcd))
}

#[test]
fn records_written_on_one_host_reach_every_host_and_a_vm_migrates() -> anyhow::Result<()> {
    let (mut bed, _etcd) = bed()?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 3)? == 3, "RED-1 -> RED-2");
    ensure!(bed.ping("BLUE-2", "10.0.0.1", 3)? == 3, "BLUE-2 -> BLUE-1");
    // nvctl on every host lists the same records, with the hosts of their ports.
    for h in &bed.hosts {
        let listed = h.nvctl_json(&["lookup", "list", "--vsid", "5001"])?;
        ensure!(
            listed[1]["host"] == "host2" && listed[1]["port"] == "red2",
            "{}: {listed}",
            h.name
        );
        let s = cluster_status(h)?;
        ensure!(
            s["connected"] == true && s["bad_records"] == 0,
            "{}: {s}",
            h.name
        );
    }

    // RED-2 migrates from host 2 to host 3 while RED-1 pings it every 10 ms; the move is
    // typed on host 1.
    let stream = ping_stream(&bed, "RED-1", "10.0.0.2", 500, "0.01")?;
    thread::sleep(Duration::from_millis(1500));
    let moved_at = Instant::now();
    bed.rehome("RED-2", 2)?;
    bed.hosts[0].nvctl(&[
        "lookup",
        "move",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.2",
        "--pa",
        "198.18.0.3",
        "--port",
        "red2",
        "--host",
        "host3",
    ])?;
    let after_nvctl = converge(&bed, "RED-2 on host 3", |i, h| {
        Ok(red_entry(h, 2)? == Some((3, i == 2)))
    })?;
    println!(
        "every host followed the move {} ms after its port was re-created, {} ms after nvctl \
         returned",
        moved_at.elapsed().as_millis(),
        after_nvctl.as_millis()
    );
    let (sent, received) = ping_result(stream)?;
    println!("{received} of {sent} pings answered across the migration");
    ensure!(
        sent == 500 && received >= 450,
        "{received} of {sent} answered across the migration"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 3)? == 3,
        "RED-1 -> RED-2 on host 3"
    );
    // Host 2 keeps nothing of RED-2 but the record.
    let status = bed.hosts[1].nvctl_json(&["status"])?;
    ensure!(
        status["ports"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["port"] != "red2")),
        "host 2 still has red2: {status}"
    );
    Ok(())
}
