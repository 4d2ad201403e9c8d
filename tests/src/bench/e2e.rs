//! End to end on the two-host topology, one bed per configuration, all built first and then
//! measured in turns, repetition after repetition, so the machine's noise falls on every
//! configuration alike: nv (NVGRE and IP rewrite, decapsulating on XDP and on TC; NVGRE routed
//! through 10 routes with 10 stateful rules on each VM), the Cilium-style peer
//! ([`super::peer`]), the kernel's VXLAN over a bridge (what operators use today) and plain
//! routed veth (no tunnel at all: the ceiling).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Scale, load, peer, quantile};
use crate::{
    sys::{bin, run},
    testbed::{RED_VSID, TapVm, Translation, TwoHosts, Vm},
};

#[derive(Clone, Debug, Serialize)]
pub struct Result {
    pub config: String,
    /// Medians over the repetitions of the `_runs` below.
    /// 64-byte UDP packets per second delivered into the receiving VM (its eth0 rx counter),
    /// ending at its NIC ([`super::sink`]).
    pub pps: f64,
    pub tcp_gbps: f64,
    /// CPU time (the sender's, in whose context veth runs the softirq work, and ksoftirqd's)
    /// per packet delivered, at a fixed offered rate below every configuration's top, ns:
    /// ending at the receiving VM's NIC, and (`cpu_socket_ns`) in a socket there.
    pub cpu_ns: f64,
    pub cpu_socket_ns: f64,
    /// Two floods from senders on two CPUs, packets delivered a second.
    pub two_flow_pps: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// For nv on TC: the same 64-byte flood into a tap port on host2 that a process reads, as
    /// QEMU does, measured in the same bed right after the veth one (frames read per second).
    pub tap_pps: Option<f64>,
    /// The same flood into the veth VM's socket, read by a process (the tap's comparison).
    pub veth_read_pps: Option<f64>,
    pub pps_runs: Vec<f64>,
    pub tcp_runs: Vec<f64>,
    pub cpu_ns_runs: Vec<f64>,
    pub cpu_socket_ns_runs: Vec<f64>,
    /// The share of the fixed rate's frames delivered, per repetition.
    pub delivered_runs: Vec<f64>,
    pub two_flow_runs: Vec<f64>,
}

/// nv with decapsulation on XDP (`-xdp`) and on TC (`-tc`, as shipped), DESIGN.md's two
/// delivery candidates; nv routed with port ACLs; then the peer, the baseline and the ceiling.
pub const CONFIGS: [&str; 8] = [
    "nv-encap-xdp",
    "nv-encap-tc",
    "nv-rewrite-xdp",
    "nv-rewrite-tc",
    "nv-routes-acls",
    "cilium-peer",
    "vxlan-bridge",
    "routed-veth",
];

/// The fixed offered rate of the CPU measure, 64-byte frames a second: below every
/// configuration's top rate on this machine (the slowest, VXLAN over a bridge, tops well above).
const FIXED_RATE: f64 = 100_000.0;

/// One configuration's bed, and where its flood goes.
struct Setup {
    config: &'static str,
    bed: TwoHosts,
    _peer: Option<peer::Peer>,
    from: &'static str,
    to: &'static str,
    dst: &'static str,
}

/// What to measure end to end.
#[derive(Default)]
pub struct Options<'a> {
    /// Only these of [`CONFIGS`] (all without).
    pub configs: Option<Vec<&'a str>>,
    /// Where to write a CPU profile of each configuration's fixed-rate flood, if anywhere.
    pub profile: Option<PathBuf>,
}

/// Refuses a configuration [`CONFIGS`] does not name, before anything is measured.
pub fn check_configs(wanted: &[&str]) -> anyhow::Result<()> {
    if let Some(unknown) = wanted.iter().find(|c| !CONFIGS.contains(c)) {
        bail!(
            "--configs: no configuration '{unknown}' (there are {})",
            CONFIGS.join(", ")
        );
    }
    Ok(())
}

pub fn run_all(scale: Scale, options: &Options) -> anyhow::Result<Vec<Result>> {
    if let Some(wanted) = &options.configs {
        check_configs(wanted)?;
    }
    let beds = CONFIGS
        .iter()
        .filter(|c| options.configs.as_ref().is_none_or(|w| w.contains(c)))
        .map(|c| build(c))
        .collect::<anyhow::Result<Vec<Setup>>>()?;
    if let Some(dir) = &options.profile {
        for b in &beds {
            profile(b, scale, dir)?;
        }
    }
    let mut results: Vec<Result> = beds
        .iter()
        .map(|b| first(b, scale))
        .collect::<anyhow::Result<_>>()?;
    for rep in 0..scale.pick(3, 2) {
        for (b, r) in beds.iter().zip(&mut results) {
            eprintln!("bench: end to end, repetition {}, {}", rep + 1, b.config);
            repetition(b, r, scale)?;
        }
    }
    for r in &mut results {
        r.pps = quantile(&mut r.pps_runs.clone(), 0.5);
        r.tcp_gbps = quantile(&mut r.tcp_runs.clone(), 0.5);
        r.cpu_ns = quantile(&mut r.cpu_ns_runs.clone(), 0.5);
        r.cpu_socket_ns = quantile(&mut r.cpu_socket_ns_runs.clone(), 0.5);
        r.two_flow_pps = quantile(&mut r.two_flow_runs.clone(), 0.5);
    }
    Ok(results)
}

fn build(config: &'static str) -> anyhow::Result<Setup> {
    let (from, mut to, mut dst, mut peer) = ("RED-1", "RED-2", "10.0.0.2", None);
    let bed = match config.split_once('-').map(|(_, rest)| rest.split_once('-')) {
        _ if config == "nv-routes-acls" => {
            let mut bed = TwoHosts::build("bp")?;
            bed.add_vm("RED-B", 7002, "10.1.0.5", "02:00:00:00:07:05", "redb", 1)?;
            bed.configure()?;
            super::routing::add_routes(&bed, 10)?;
            super::acls::add_rules(
                &bed,
                10,
                true,
                &[
                    (
                        0,
                        RED_VSID,
                        "10.0.0.1",
                        nv_agent::model::acl::Direction::Out,
                    ),
                    (1, 7002, "10.1.0.5", nv_agent::model::acl::Direction::In),
                ],
            )?;
            (to, dst) = ("RED-B", "10.1.0.5");
            bed
        }
        Some(Some((method, hook))) if config.starts_with("nv-") => {
            let bed = TwoHosts::build_with("bn", &["--decap-hook", hook])?;
            bed.configure_with(if method == "rewrite" {
                Translation::Rewrite
            } else {
                Translation::Encap
            })?;
            bed
        }
        _ => match config {
            "cilium-peer" => {
                let bed = TwoHosts::build_bare("bc")?;
                peer = Some(peer::install(&bed, 0)?);
                bed
            }
            "vxlan-bridge" => {
                let bed = TwoHosts::build_bare("bx")?;
                vxlan_bridge(&bed)?;
                bed
            }
            "routed-veth" => {
                let bed = TwoHosts::build_bare("br")?;
                routed(&bed)?;
                bed
            }
            other => bail!("unknown configuration {other}"),
        },
    };
    Ok(Setup {
        config,
        bed,
        _peer: peer,
        from,
        to,
        dst,
    })
}

/// What a configuration measures once: reachability, RTT, and for nv on TC the tap.
fn first(b: &Setup, scale: Scale) -> anyhow::Result<Result> {
    warm(b)?;
    let (p50, p99) = rtt(b.bed.vm(b.from), b.dst, scale.pick(500, 20))?;
    let (tap_pps, veth_read_pps) = if b.config == "nv-encap-tc" {
        let seconds = scale.pick(4.0, 0.3);
        let (from, to) = (b.bed.vm(b.from), b.bed.vm(b.to));
        (
            Some(tap_pps(&b.bed, seconds)?),
            Some(load::delivered_pps_to(
                from,
                to,
                b.dst,
                seconds,
                &[0],
                load::End::Reader,
            )?),
        )
    } else {
        (None, None)
    };
    Ok(Result {
        config: b.config.to_owned(),
        pps: 0.0,
        tcp_gbps: 0.0,
        cpu_ns: 0.0,
        cpu_socket_ns: 0.0,
        two_flow_pps: 0.0,
        rtt_p50_us: p50,
        rtt_p99_us: p99,
        tap_pps,
        veth_read_pps,
        pps_runs: Vec::new(),
        tcp_runs: Vec::new(),
        cpu_ns_runs: Vec::new(),
        cpu_socket_ns_runs: Vec::new(),
        delivered_runs: Vec::new(),
        two_flow_runs: Vec::new(),
    })
}

/// What an idle CPU runs, as `perf report` names it.
const IDLE: [&str; 5] = [
    "pv_native_safe_halt",
    "native_safe_halt",
    "default_idle",
    "poll_idle",
    "acpi_idle_do_entry",
];

/// A fixed-rate flood of `b` (ending at the NIC) under `perf record -a`, counted nowhere:
/// writes `dir/CONFIG.data` and prints the functions that took most of the CPU time.
fn profile(b: &Setup, scale: Scale, dir: &Path) -> anyhow::Result<()> {
    warm(b)?;
    std::fs::create_dir_all(dir)?;
    let data = dir.join(format!("{}.data", b.config));
    let seconds = scale.pick(4.0, 0.3);
    let perf = Command::new("perf")
        .args(["record", "-a", "-q", "-o"])
        .arg(&data)
        .args(["--", "sleep"])
        .arg((seconds + 0.5).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("--profile needs perf (Debian: apt install linux-perf)")?;
    // perf has opened its counters before the flood starts.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let (from, to) = (b.bed.vm(b.from), b.bed.vm(b.to));
    let flood = load::cpu_per_packet(
        from,
        to,
        b.dst,
        (scale.pick(FIXED_RATE, FIXED_RATE / 10.0), seconds),
        load::End::Nic,
    );
    let recorded = perf.wait_with_output()?;
    flood?;
    anyhow::ensure!(
        recorded.status.success(),
        "perf record: {}",
        String::from_utf8_lossy(&recorded.stderr)
    );
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--sort",
            "sym",
            "--percent-limit",
            "0.1",
            "-i",
        ])
        .arg(&data)
        .stderr(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout);
    // "12.34%  [k] symbol" lines; the idle CPUs' halt is left out and the rest is shown as
    // shares of the busy time.
    let rows: Vec<(f64, &str)> = text
        .lines()
        .filter_map(|l| {
            let (share, symbol) = l.trim().split_once('%')?;
            Some((share.trim().parse().ok()?, symbol.trim()))
        })
        .filter(|(_, symbol)| !IDLE.iter().any(|idle| symbol.ends_with(idle)))
        .collect();
    let busy: f64 = rows.iter().map(|(share, _)| share).sum();
    println!(
        "\nwhere {}'s busy CPU time goes ({}):",
        b.config,
        data.display()
    );
    for (share, symbol) in rows.iter().take(25) {
        println!(
            "  {:5.1}%  {symbol}",
            share * 100.0 / busy.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

/// Neighbours and flows warm, so no measurement pays for them (bounded: 10 tries).
fn warm(b: &Setup) -> anyhow::Result<()> {
    for _ in 0..10 {
        if b.bed.ping(b.from, b.dst, 1)? == 1 {
            return Ok(());
        }
    }
    bail!("{}: {} cannot reach {}", b.config, b.from, b.dst)
}

/// One repetition's measures, appended to `r`.
fn repetition(b: &Setup, r: &mut Result, scale: Scale) -> anyhow::Result<()> {
    warm(b)?;
    let (from, to) = (b.bed.vm(b.from), b.bed.vm(b.to));
    let seconds = scale.pick(3.0, 0.3);
    r.pps_runs
        .push(load::delivered_pps(from, to, b.dst, seconds, &[0])?);
    r.tcp_runs.push(tcp_median(
        from,
        to,
        b.dst,
        scale.pick(3, 1),
        scale.pick(3, 1),
    )?);
    // Long enough for a few hundred thousand packets: ksoftirqd's time counts in 10 ms ticks.
    let fixed = (
        scale.pick(FIXED_RATE, FIXED_RATE / 10.0),
        scale.pick(4.0, 0.3),
    );
    let (cpu, delivered) = load::cpu_per_packet(from, to, b.dst, fixed, load::End::Nic)?;
    r.cpu_ns_runs.push(cpu);
    r.delivered_runs.push(delivered);
    let (cpu, _) = load::cpu_per_packet(from, to, b.dst, fixed, load::End::Socket)?;
    r.cpu_socket_ns_runs.push(cpu);
    r.two_flow_runs
        .push(load::delivered_pps(from, to, b.dst, seconds, &[0, 1])?);
    Ok(())
}

/// The kernel's VXLAN (VNI 5001) bridged with RED's port on each host.
fn vxlan_bridge(bed: &TwoHosts) -> anyhow::Result<()> {
    for (i, h) in bed.hosts.iter().enumerate() {
        let (local, remote) = (&h.pa, &bed.hosts[1 - i].pa);
        h.ns.ip(&["addr", "add", &format!("{local}/15"), "dev", "uplink0"])?;
        h.ns.ip(&[
            "link", "add", "vx5001", "type", "vxlan", "id", "5001", "local", local, "remote",
            remote, "dstport", "4789", "dev", "uplink0",
        ])?;
        h.ns.ip(&["link", "add", "brred", "type", "bridge"])?;
        for l in ["vx5001", &format!("red{}", i + 1)] {
            h.ns.ip(&["link", "set", l, "master", "brred"])?;
            h.ns.ip(&["link", "set", l, "up"])?;
        }
        h.ns.ip(&["link", "set", "brred", "up"])?;
    }
    Ok(())
}

/// No tunnel: each host routes the other VM's address to the other host and answers its own
/// VM's ARP by proxy.
fn routed(bed: &TwoHosts) -> anyhow::Result<()> {
    for (i, h) in bed.hosts.iter().enumerate() {
        let remote = &bed.hosts[1 - i];
        let port = format!("red{}", i + 1);
        h.ns.ip(&["addr", "add", &format!("{}/15", h.pa), "dev", "uplink0"])?;
        h.ns.ip(&[
            "route",
            "add",
            &format!("10.0.0.{}/32", i + 1),
            "dev",
            &port,
        ])?;
        h.ns.ip(&[
            "route",
            "add",
            &format!("10.0.0.{}/32", 2 - i),
            "via",
            &remote.pa,
        ])?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            (&format!("net.ipv4.conf.{port}.proxy_arp") as &str, "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            (&format!("net.ipv4.conf.{port}.rp_filter") as &str, "0"),
            ("net.ipv4.conf.uplink0.rp_filter", "0"),
            // Proxy ARP answers after a random delay by default; the VMs should not wait.
            (&format!("net.ipv4.neigh.{port}.proxy_delay") as &str, "0"),
        ] {
            h.ns.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        }
    }
    // The host asks for a VM's MAC from its underlay address; the VMs need a route back to it.
    for vm in &bed.vms {
        vm.ns.ip(&["route", "add", "default", "dev", "eth0"])?;
    }
    Ok(())
}

/// The flood of `pps`, from RED-1 into RED-T: a tap on host2 read by `nv-transfer tap-sink`
/// as QEMU reads its tap; frames read per second.
fn tap_pps(bed: &TwoHosts, seconds: f64) -> anyhow::Result<f64> {
    let tap = TapVm {
        name: "RED-T",
        host: 1,
        vsid: RED_VSID,
        ca: "10.0.0.22",
        mac: "02:00:00:00:02:22",
        port: "redt2",
        rewrite_pa: None,
    };
    bed.plug_tap(&tap)?;
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?;
    let sink = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.hosts[1].ns.name,
            tool,
            "tap-sink",
            tap.port,
        ])
        .args(["--seconds", &format!("{}", seconds + 2.0)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    // RED-1 learns RED-T's MAC from nv's ARP answer (nobody answers the ping itself).
    let _ = bed.ping("RED-1", tap.ca, 1)?;
    let start = std::time::Instant::now();
    let flood = load::Flood::new(bed.vm("RED-1"), tap.ca, seconds)
        .on_cpu(0)
        .run();
    let elapsed = start.elapsed().as_secs_f64();
    let out = sink.wait_with_output()?;
    flood?;
    let text = String::from_utf8_lossy(&out.stdout);
    let got: f64 = text
        .trim()
        .strip_prefix("received ")
        .with_context(|| {
            format!(
                "tap-sink said {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?
        .parse()?;
    Ok(got / elapsed)
}

/// [`tcp`] `n` times, one connection after another: the median. On these machines one
/// connection's level differs from the next one's by up to 15% whatever the datapath.
fn tcp_median(from: &Vm, to: &Vm, dst: &str, seconds: u32, n: u32) -> anyhow::Result<f64> {
    let mut each = (0..n)
        .map(|_| tcp(from, to, dst, seconds))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(quantile(&mut each, 0.5))
}

/// iperf3, one TCP stream: the median of its half-second throughputs over `seconds`, after a
/// first second left out. With the sender on CPU 0 and the receiver on CPU 1, the sender's
/// segments leave from both CPUs (those its ACKs release go out in the softirq on CPU 1), and
/// veth's per-CPU queues reorder them: the sender then takes a spurious loss and runs at half
/// speed for a second or two, at random moments, on nv, the peer and routed veth alike. A whole
/// run's mean mixed those in and a repetition read 20-45% low. The sender is pinned to CPU 0,
/// in whose context veth carries each segment all the way to the receiving socket, and the
/// receiver to CPU 1, as the scheduler would not always place them.
pub(super) fn tcp(red1: &Vm, red2: &Vm, dst: &str, seconds: u32) -> anyhow::Result<f64> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &red2.ns.name,
            "timeout",
            &(seconds + 20).to_string(),
            "taskset",
            "-c",
            "1",
            "iperf3",
            "-s",
            "-1",
            "-p",
            "47004",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            &red1.ns.name,
            "timeout",
            &(seconds + 15).to_string(),
            "taskset",
            "-c",
            "0",
            "iperf3",
            "-c",
            dst,
            "-p",
            "47004",
            "-t",
            &seconds.to_string(),
            // Warm-up: see above.
            "-O",
            "1",
            "-i",
            "0.5",
            "-J",
        ],
    );
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&out?)?;
    anyhow::ensure!(
        json["end"]["sum_received"]["bytes"]
            .as_f64()
            .is_some_and(|b| b > 0.0),
        "iperf3: nothing received: {json}"
    );
    let mut halves: Vec<f64> = json["intervals"]
        .as_array()
        .context("iperf3 JSON without intervals")?
        .iter()
        .filter(|i| !i["sum"]["omitted"].as_bool().unwrap_or(false))
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .collect();
    anyhow::ensure!(!halves.is_empty(), "iperf3 reported no interval");
    Ok(quantile(&mut halves, 0.5) / 1e9)
}

/// Round-trip times of `count` pings 2 ms apart, no other load: (p50, p99) in µs.
pub(super) fn rtt(red1: &Vm, dst: &str, count: u32) -> anyhow::Result<(f64, f64)> {
    let out = red1.ns.exec(
        "ping",
        &["-c", &count.to_string(), "-i", "0.002", "-W", "1", dst],
    )?;
    let mut samples: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if samples.len() < (count as usize) / 2 {
        bail!("only {} of {count} pings answered", samples.len());
    }
    Ok((quantile(&mut samples, 0.5), quantile(&mut samples, 0.99)))
}
