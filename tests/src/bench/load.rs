//! The bench's 64-byte floods (`nv-transfer frame-flood`, raw frames so the sender's own UDP
//! stack does not bound the result) and what they measure on a receiving VM: packets delivered
//! a second from one sender or from senders on several CPUs, and the CPU time a delivered
//! packet costs at a fixed offered rate (meaningful when the receiver, not the datapath, bounds
//! pps). Delivered means counted by the receiving VM's eth0; the frames end there
//! ([`NicSink`]) or in a socket nobody reads.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::sink::NicSink;
use crate::{sys::bin, testbed::Vm};

/// A flood from a VM to `dst` port 47003, bounded by its seconds.
pub struct Flood<'a> {
    from: &'a Vm,
    dst: String,
    seconds: f64,
    cpu: Option<u32>,
    rate: Option<f64>,
    spread: Option<u32>,
}

impl<'a> Flood<'a> {
    #[must_use]
    pub fn new(from: &'a Vm, dst: &str, seconds: f64) -> Flood<'a> {
        Flood {
            from,
            dst: dst.to_owned(),
            seconds,
            cpu: None,
            rate: None,
            spread: None,
        }
    }

    /// The sender pinned to `cpu`.
    #[must_use]
    pub fn on_cpu(self, cpu: u32) -> Self {
        Flood {
            cpu: Some(cpu),
            ..self
        }
    }

    /// At most `rate` frames a second.
    #[must_use]
    pub fn at_rate(self, rate: f64) -> Self {
        Flood {
            rate: Some(rate),
            ..self
        }
    }

    /// To `n` addresses from `dst`'s on, in turns.
    #[must_use]
    pub fn spread(self, n: u32) -> Self {
        Flood {
            spread: Some(n),
            ..self
        }
    }

    pub fn command(&self) -> anyhow::Result<Command> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.from.ns.name]);
        if let Some(cpu) = self.cpu {
            c.args(["taskset", "-c", &cpu.to_string()]);
        }
        c.arg(bin("nv-transfer")?)
            .args(["frame-flood", &format!("{}:47003", self.dst), "--seconds"])
            .arg(self.seconds.to_string())
            .args(["--size", "18"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = self.rate {
            c.args(["--rate", &r.to_string()]);
        }
        if let Some(n) = self.spread {
            c.args(["--spread", &n.to_string()]);
        }
        Ok(c)
    }

    /// Runs it to its end: (frames sent, the sender's CPU time in ns).
    pub fn run(&self) -> anyhow::Result<(f64, f64)> {
        let out = self.command()?.output()?;
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
        Ok((field("sent ")?, field("cpu_ns ")?))
    }
}

/// Where a flood's frames end on the receiving VM.
#[derive(Clone, Copy, Debug)]
pub enum End {
    /// Dropped at its NIC once counted: the datapath's work alone.
    Nic,
    /// In a socket nobody reads (the kernel drops what its full buffer cannot take): the VM's
    /// UDP stack too, as an application's socket would cost without its reads.
    Socket,
    /// Read by a process, datagram after datagram, as an application would.
    Reader,
}

/// What holds a flood's end in place; dropped, it goes.
enum Ending {
    Nic(#[expect(dead_code, reason = "held for its drop: the sink detaches")] NicSink),
    Process(std::process::Child),
}

impl Drop for Ending {
    fn drop(&mut self) {
        if let Ending::Process(p) = self {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Sets up `end` on `to` for a flood of `seconds`.
fn end_at(to: &Vm, end: End, seconds: f64) -> anyhow::Result<Ending> {
    let mode = match end {
        End::Nic => return Ok(Ending::Nic(NicSink::attach(to)?)),
        End::Socket => "udp-hold",
        End::Reader => "udp-sink",
    };
    let process = Command::new("ip")
        .args(["netns", "exec", &to.ns.name])
        .arg(bin("nv-transfer")?)
        .args([mode, "0.0.0.0:47003", "--seconds"])
        .arg(format!("{}", seconds + 2.0))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Bound before the flood starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Ending::Process(process))
}

/// Packets `vm`'s eth0 has received.
pub fn rx_packets(vm: &Vm) -> anyhow::Result<u64> {
    Ok(vm
        .ns
        .exec("cat", &["/sys/class/net/eth0/statistics/rx_packets"])?
        .trim()
        .parse()?)
}

/// Floods from senders pinned to `cpus` at once (one flow each: each sender's own source
/// port), as fast as each can for `seconds`: packets `to` received a second, ending at its NIC.
pub fn delivered_pps(
    from: &Vm,
    to: &Vm,
    dst: &str,
    seconds: f64,
    cpus: &[u32],
) -> anyhow::Result<f64> {
    delivered_pps_to(from, to, dst, seconds, cpus, End::Nic)
}

/// As [`delivered_pps`], the frames ending at `end`.
pub fn delivered_pps_to(
    from: &Vm,
    to: &Vm,
    dst: &str,
    seconds: f64,
    cpus: &[u32],
    end: End,
) -> anyhow::Result<f64> {
    let _end = end_at(to, end, seconds)?;
    let (before, start) = (rx_packets(to)?, Instant::now());
    let floods: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            Flood::new(from, dst, seconds)
                .on_cpu(cpu)
                .command()
                .and_then(|mut c| Ok(c.spawn()?))
        })
        .collect();
    // Every flood that started is waited for, even when another could not start.
    let mut failed = None;
    for f in floods {
        match f.map(std::process::Child::wait_with_output) {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => failed = Some(String::from_utf8_lossy(&out.stderr).into_owned()),
            Ok(Err(e)) => failed = Some(e.to_string()),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The last frames land within a few ms.
    std::thread::sleep(Duration::from_millis(100));
    let after = rx_packets(to)?;
    if let Some(why) = failed {
        anyhow::bail!("a flood failed: {why}");
    }
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    Ok((after - before) as f64 / elapsed)
}

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

/// At `rate` 64-byte frames a second for `seconds`: (CPU ns per delivered packet, share of
/// the offered frames delivered). The CPU time is the sending process's (the scheduler's exact
/// run time: with veth ports the softirq work of a frame's whole way runs in the sender's
/// context) and the `ksoftirqd` threads' (work deferred). `/proc/stat`'s tick samples alias with
/// a paced sender's sleeps and were off by up to 10x.
pub fn cpu_per_packet(
    from: &Vm,
    to: &Vm,
    dst: &str,
    (rate, seconds): (f64, f64),
    end: End,
) -> anyhow::Result<(f64, f64)> {
    let ending = end_at(to, end, seconds)?;
    let (before, softirq_before) = (rx_packets(to)?, ksoftirqd_ns()?);
    let flood = Flood::new(from, dst, seconds).on_cpu(0).at_rate(rate).run();
    // The last frames land within a few ms.
    std::thread::sleep(Duration::from_millis(100));
    let (after, softirq_after) = (rx_packets(to)?, ksoftirqd_ns()?);
    drop(ending);
    let (sent, cpu) = flood?;
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    let delivered = (after - before) as f64;
    anyhow::ensure!(delivered > 0.0, "no frame of the fixed-rate flood arrived");
    let busy = cpu + (softirq_after - softirq_before);
    Ok((busy / delivered, delivered / sent.max(1.0)))
}
