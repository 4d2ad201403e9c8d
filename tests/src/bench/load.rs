//! Floods that measure more than the top rate of one sender: the CPU time a delivered packet
//! costs at a fixed offered rate (meaningful when the receiver, not the datapath, bounds pps),
//! and two flows from senders on two CPUs.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::e2e::rx_packets;
use crate::{sys::bin, testbed::Vm};

/// The CPU time of every `ksoftirqd` thread (the softirq work the kernel defers from where it
/// was raised), ns, from `/proc/PID/stat` (10 ms resolution).
fn ksoftirqd_ns() -> anyhow::Result<f64> {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let is_ksoftirqd =
            std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.starts_with("ksoftirqd/"));
        if !is_ksoftirqd {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat"))?;
        // After the command's closing parenthesis: state is field 3, utime and stime 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks: f64 = fields.get(11..13).map_or(Ok(0.0), |f| {
            f.iter().map(|x| x.parse::<f64>()).sum::<Result<f64, _>>()
        })?;
        // USER_HZ is 100 on Linux whatever the kernel's HZ.
        total += ticks * 1e7;
    }
    Ok(total)
}

/// A socket on `to` for `seconds` that the frames end in: `mode` `udp-sink` reads them (as the
/// pps measure's), `udp-hold` does not.
fn sink(to: &Vm, mode: &str, seconds: f64) -> anyhow::Result<std::process::Child> {
    let tool = bin("nv-transfer")?;
    Ok(Command::new("ip")
        .args(["netns", "exec", &to.ns.name])
        .arg(tool)
        .args([mode, "0.0.0.0:47003", "--seconds"])
        .arg(format!("{}", seconds + 2.0))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// A 64-byte flood from `from` to `dst` on CPU `cpu` (bounded by `seconds`), at `rate` frames
/// a second if given.
fn flood(
    from: &Vm,
    dst: &str,
    seconds: f64,
    cpu: u32,
    rate: Option<f64>,
) -> anyhow::Result<Command> {
    let tool = bin("nv-transfer")?;
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &from.ns.name,
        "taskset",
        "-c",
        &cpu.to_string(),
    ])
    .arg(tool)
    .args(["frame-flood", &format!("{dst}:47003"), "--seconds"])
    .arg(seconds.to_string())
    .args(["--size", "18"])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(r) = rate {
        c.args(["--rate", &r.to_string()]);
    }
    Ok(c)
}

/// At `rate` 64-byte frames a second for `seconds`: (CPU ns per delivered packet, share of
/// the offered frames delivered). The CPU time is the sending process's (the scheduler's exact
/// run time: with veth ports the softirq work of a frame's whole way runs in the sender's
/// context) and the `ksoftirqd` threads' (work deferred). `/proc/stat`'s tick samples alias with
/// a paced sender's sleeps and were off by up to 10x. The frames end in a socket nobody reads:
/// a reader's wake-up per datagram (a fifth of the sending CPU's time in the pps measure, the
/// same for every datapath) is the application's cost, not the datapath's.
pub fn cpu_per_packet(
    from: &Vm,
    to: &Vm,
    dst: &str,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let mut sink = sink(to, "udp-hold", seconds)?;
    std::thread::sleep(Duration::from_millis(300));
    let (before, softirq_before) = (rx_packets(to)?, ksoftirqd_ns()?);
    let out = flood(from, dst, seconds, 0, Some(rate))?.output()?;
    // The last frames land within a few ms.
    std::thread::sleep(Duration::from_millis(100));
    let (after, softirq_after) = (rx_packets(to)?, ksoftirqd_ns()?);
    let _ = sink.kill();
    let _ = sink.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("flood output without {name}: {text}"))?
            .trim()
            .parse()
            .context("flood output")
    };
    let (sent, cpu) = (field("sent ")?, field("cpu_ns ")?);
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    let delivered = (after - before) as f64;
    anyhow::ensure!(delivered > 0.0, "no frame of the fixed-rate flood arrived");
    let busy = cpu + (softirq_after - softirq_before);
    Ok((busy / delivered, delivered / sent.max(1.0)))
}

/// Two floods at once, from senders pinned to CPU 0 and CPU 1 (two flows: each sender's own
/// source port), for `seconds`: packets delivered a second.
pub fn two_flows(from: &Vm, to: &Vm, dst: &str, seconds: f64) -> anyhow::Result<f64> {
    let mut sink = sink(to, "udp-sink", seconds)?;
    std::thread::sleep(Duration::from_millis(200));
    let (before, start) = (rx_packets(to)?, Instant::now());
    let floods =
        [0, 1].map(|cpu| flood(from, dst, seconds, cpu, None).and_then(|mut c| Ok(c.spawn()?)));
    // Every flood that started is waited for, even when the other could not start.
    let mut ok = true;
    for f in floods {
        ok &= match f {
            Ok(child) => child.wait_with_output()?.status.success(),
            Err(_) => false,
        };
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    let after = rx_packets(to)?;
    let _ = sink.kill();
    let _ = sink.wait();
    anyhow::ensure!(ok, "a flood of the two failed");
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    Ok((after - before) as f64 / elapsed)
}
