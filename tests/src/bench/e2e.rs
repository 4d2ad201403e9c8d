//! End to end on the two-host topology, RED-1 to RED-2, one configuration after another in the
//! same run: nv encap, nv rewrite, the kernel's VXLAN over a bridge (the baseline operators use
//! today) and plain routed veth (no tunnel at all: the ceiling).
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Scale, quantile};
use crate::{
    sys::{bin, run},
    testbed::{RED_VSID, TapVm, Translation, TwoHosts, Vm},
};

#[derive(Clone, Debug, Serialize)]
pub struct Result {
    pub config: String,
    /// 64-byte UDP packets per second delivered into the receiving VM (its eth0 rx counter).
    pub pps: f64,
    pub tcp_gbps: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// For nv on TC: the same 64-byte flood into a tap port on host2 that a process reads, as
    /// QEMU does, measured in the same bed right after the veth one (frames read per second).
    pub tap_pps: Option<f64>,
}

/// nv with decapsulation on XDP (`-xdp`) and on TC (`-tc`), DESIGN.md's two delivery
/// candidates, then the baseline and the ceiling.
pub const CONFIGS: [&str; 6] = [
    "nv-encap-xdp",
    "nv-encap-tc",
    "nv-rewrite-xdp",
    "nv-rewrite-tc",
    "vxlan-bridge",
    "routed-veth",
];

pub fn run_all(scale: Scale) -> anyhow::Result<Vec<Result>> {
    CONFIGS.iter().map(|c| run_one(c, scale)).collect()
}

fn run_one(config: &str, scale: Scale) -> anyhow::Result<Result> {
    let bed = match config.split_once('-').map(|(_, rest)| rest.split_once('-')) {
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
    let (red1, red2) = (bed.vm("RED-1"), bed.vm("RED-2"));
    // Warm up ARP and neighbours so no measurement pays for them (bounded: 10 tries).
    let mut answered = false;
    for _ in 0..10 {
        if bed.ping("RED-1", "10.0.0.2", 1)? == 1 {
            answered = true;
            break;
        }
    }
    if !answered {
        bail!("{config}: RED-1 cannot reach RED-2");
    }
    let (p50, p99) = rtt(red1, "10.0.0.2", scale.pick(500, 20))?;
    let seconds = scale.pick(5.0, 0.5);
    let pps = pps(red1, red2, "10.0.0.2", seconds)?;
    let tap_pps = if config == "nv-encap-tc" {
        Some(tap_pps(&bed, seconds)?)
    } else {
        None
    };
    Ok(Result {
        config: config.to_owned(),
        pps,
        tcp_gbps: tcp(red1, red2, "10.0.0.2", scale.pick(10, 1))?,
        rtt_p50_us: p50,
        rtt_p99_us: p99,
        tap_pps,
    })
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

pub(super) fn rx_packets(vm: &Vm) -> anyhow::Result<u64> {
    Ok(vm
        .ns
        .exec("cat", &["/sys/class/net/eth0/statistics/rx_packets"])?
        .trim()
        .parse()?)
}

/// 64-byte frames (18 bytes of UDP payload, sent as raw frames so the sender's own UDP stack
/// does not bound the result) from RED-1 as fast as one sender can, for `seconds`; counted as
/// they arrive on RED-2's eth0 (at `dst`).
pub(super) fn pps(red1: &Vm, red2: &Vm, dst: &str, seconds: f64) -> anyhow::Result<f64> {
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?;
    let sink_seconds = format!("{}", seconds + 2.0);
    let mut sink = Command::new("ip")
        .args([
            "netns",
            "exec",
            &red2.ns.name,
            tool,
            "udp-sink",
            "0.0.0.0:47003",
            "--seconds",
            &sink_seconds,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = rx_packets(red2)?;
    let start = std::time::Instant::now();
    let flood = run(
        "ip",
        &[
            "netns",
            "exec",
            &red1.ns.name,
            tool,
            "frame-flood",
            &format!("{dst}:47003"),
            "--seconds",
            &seconds.to_string(),
            "--size",
            "18",
        ],
    );
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last packets land before reading the counter.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = rx_packets(red2)?;
    let _ = sink.kill();
    let _ = sink.wait();
    flood?;
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    Ok((after - before) as f64 / elapsed)
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
    let flood = run(
        "ip",
        &[
            "netns",
            "exec",
            &bed.vm("RED-1").ns.name,
            tool,
            "frame-flood",
            &format!("{}:47003", tap.ca),
            "--seconds",
            &seconds.to_string(),
            "--size",
            "18",
        ],
    );
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

/// iperf3, one TCP stream, `seconds` long; the receiver's throughput.
pub(super) fn tcp(red1: &Vm, red2: &Vm, dst: &str, seconds: u32) -> anyhow::Result<f64> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &red2.ns.name,
            "timeout",
            &(seconds + 20).to_string(),
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
            "iperf3",
            "-c",
            dst,
            "-p",
            "47004",
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    );
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_str(&out?)?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received")?;
    Ok(bps / 1e9)
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
