//! Isolation against the host's own users, the NIC's offloads and ordinary operations: a
//! rewrite record deleted while a peer still names its PA, a local user binding a VM's PA,
//! priority-tagged frames from the underlay, a VM's checksum offload state under IP rewrite,
//! descriptors exhausted by a local user, provider addresses that are not the host's to take,
//! ports that are not a VM's, and a guest's TSO super-packets. Each hole beside a positive
//! control that shows the path works.
use std::{
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nv_tests::{
    capture::{self, Capture},
    netns::Netns,
    testbed::{Host, RED_VSID, TapVm, Translation, TwoHosts, delta},
};

const PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/host_probe.py");
/// Debian's python3 (the first on PATH may not have what the scripts import).
const PYTHON: &str = "/usr/bin/python3";

/// The probe script in `ns`, as root or (with `nobody`) as an unprivileged user.
fn probe_cmd(ns: &Netns, nobody: bool, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]);
    if nobody {
        cmd.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]);
    }
    cmd.args([PYTHON, PROBE]).args(args);
    cmd
}

fn probe(ns: &Netns, nobody: bool, args: &[&str]) -> anyhow::Result<String> {
    let out: Output = probe_cmd(ns, nobody, args).output()?;
    ensure!(
        out.status.success(),
        "host_probe.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A probe running in the background (a listener), killed by its pid if still there on drop.
struct Background {
    child: Option<Child>,
    /// What it printed after its first line, once it ended.
    rest: std::sync::mpsc::Receiver<String>,
}

impl Background {
    /// Starts it and waits for its first line (it is listening).
    fn start(ns: &Netns, nobody: bool, args: &[&str]) -> anyhow::Result<Background> {
        let mut child = probe_cmd(ns, nobody, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut reader = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut first = String::new();
        std::io::BufRead::read_line(&mut reader, &mut first)?;
        ensure!(!first.is_empty(), "host_probe.py {args:?} said nothing");
        let (tx, rest) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut reader, &mut out);
            let _ = tx.send(out);
        });
        Ok(Background {
            child: Some(child),
            rest,
        })
    }

    /// Waits for it to end (it is bounded) and returns what it printed after its first line.
    fn finish(mut self) -> anyhow::Result<String> {
        if let Some(mut c) = self.child.take() {
            c.wait()?;
        }
        Ok(self
            .rest
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (up to `secs`) for `ok`.
fn wait_for(
    what: &str,
    secs: u64,
    mut ok: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if ok()? {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(secs) {
            bail!("not within {secs} s: {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The counters that moved from `before` to `after`, and by how much.
fn moved(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> String {
    let mut out: Vec<String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k} +{}", v - before.get(k).copied().unwrap_or(0)))
        .collect();
    out.sort();
    out.join(", ")
}

/// Restarts both agents with the decapsulation hook `hook`.
fn use_hook(bed: &mut TwoHosts, hook: &str) -> anyhow::Result<()> {
    for h in &mut bed.hosts {
        h.stop_agent();
        h.agent_args = vec!["--decap-hook".into(), hook.into()];
        h.start_agent()?;
    }
    Ok(())
}

#[test]
fn a_local_user_cannot_speak_with_a_vms_rewrite_pa() -> anyhow::Result<()> {
    let bed = TwoHosts::build("rwpa")?;
    bed.configure_with(Translation::Rewrite)?;
    let (h1, h2) = (&bed.hosts[0], &bed.hosts[1]);
    let red2 = &bed.vm("RED-2").ns;

    // A local user cannot speak with RED-1's rewrite PA (bind, or IP_FREEBIND); with the
    // host's own PA it can, and the other host hears it: the positive control.
    let at_red2 = Background::start(red2, false, &["listen", "9", "4"])?;
    let at_host2 = Background::start(&h2.ns, false, &["listen", "9", "4"])?;
    let tried = probe(&h1.ns, true, &["speak", "198.18.1.1", "198.18.1.2", "9"])?;
    ensure!(
        !tried.contains("sent"),
        "a local user sent with RED-1's rewrite PA: {tried}"
    );
    let control = probe(&h1.ns, true, &["speak", "198.18.0.1", "198.18.0.2", "9"])?;
    ensure!(control.contains("bind sent"), "control: {control}");
    let (heard_red2, heard_host2) = (at_red2.finish()?, at_host2.finish()?);
    ensure!(
        !heard_red2.contains("nv-local-user"),
        "RED-2 heard a local user of host 1 as RED-1: {heard_red2}"
    );
    ensure!(
        heard_host2.contains("from 198.18.0.1: nv-local-user"),
        "control: host 2 did not hear host 1's PA: {heard_host2}"
    );

    // How: the rewrite PA is not the host's, the datapath answers for it.
    let addrs = h1.ns.ip(&["-4", "addr", "show", "dev", "uplink0"])?;
    ensure!(
        addrs.contains("198.18.0.1/") && !addrs.contains("198.18.1.1/"),
        "host 1's uplink should carry its own PA and not RED-1's rewrite PA: {addrs}"
    );
    Ok(())
}

#[test]
fn a_rewrite_record_deleted_while_a_peer_names_its_pa_never_opens_the_host() -> anyhow::Result<()> {
    let bed = TwoHosts::build("rwdel")?;
    bed.configure_with(Translation::Rewrite)?;
    let (h1, h2) = (&bed.hosts[0], &bed.hosts[1]);
    let red2 = &bed.vm("RED-2").ns;
    ensure!(bed.ping("RED-2", "10.0.0.1", 3)? == 3, "RED-2 -> RED-1");
    // RED-1's record deleted on its own host while host 2 still names its PA: host 1's stack
    // answers nothing for it, ping or TCP; its own PA still serves (control).
    h1.nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.1"])?;
    let service = Background::start(&h1.ns, false, &["serve", "7", "8"])?;
    let before = h1.counters()?;
    ensure!(
        bed.ping("RED-2", "10.0.0.1", 3)? == 0,
        "host 1 answered RED-2's pings to a deleted record's PA"
    );
    let tcp = probe(red2, false, &["connect", "10.0.0.1", "7"])?;
    ensure!(
        tcp.contains("failed"),
        "RED-2 opened a TCP session on host 1 through a deleted record's PA: {tcp}"
    );
    let control = probe(&h2.ns, false, &["connect", "198.18.0.1", "7"])?;
    ensure!(
        control.contains("connected"),
        "control: host 1's service: {control}"
    );
    let after = h1.counters()?;
    ensure!(
        delta(&before, &after, "drop_uplink_rewrite_no_vm") >= 3,
        "host 1 did not count what arrived for the deleted record's PA"
    );
    // The provider deleted too: the PA is gone, and traffic from RED-2's PA is still not the
    // host's.
    h1.nvctl(&["provider", "del", "--pa", "198.18.1.1"])?;
    let before = h1.counters()?;
    ensure!(
        bed.ping("RED-2", "10.0.0.1", 3)? == 0,
        "answered after the provider went"
    );
    let tcp = probe(red2, false, &["connect", "10.0.0.1", "7"])?;
    ensure!(tcp.contains("failed"), "TCP after the provider went: {tcp}");
    let after = h1.counters()?;
    ensure!(
        delta(&before, &after, "drop_uplink_from_rewrite_pa") >= 1,
        "host 1 did not count traffic from RED-2's rewrite PA"
    );
    drop(service);
    Ok(())
}

/// Sends SYNs from a stranger on the underlay (198.18.9.9) to RED-1's rewrite PA, priority
/// tagged (802.1ad and 802.1Q, VID 0) and with one 802.1Q VID-0 tag, and untagged to host 1's
/// own PA (the control: its stack answers with a reset).
const TAGGED_SYNS: &str = r#"
import sys
from scapy.all import Dot1AD, Dot1Q, Ether, IP, TCP, sendp
iface, dst_mac = sys.argv[1], sys.argv[2]
syn = lambda dst: IP(src="198.18.9.9", dst=dst) / TCP(sport=40000, dport=22, flags="S")
for f in [
    Ether(dst=dst_mac) / Dot1AD(vlan=0) / Dot1Q(vlan=0) / syn("198.18.1.1"),
    Ether(dst=dst_mac) / Dot1Q(vlan=0) / syn("198.18.1.1"),
    Ether(dst=dst_mac) / syn("198.18.0.1"),
]:
    sendp(f, iface=iface, verbose=False)
"#;

#[test]
fn priority_tagged_frames_to_a_rewrite_pa_are_dropped_on_both_hooks() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("vlan")?;
    bed.configure_with(Translation::Rewrite)?;
    bed.underlay
        .ip(&["addr", "add", "198.18.9.9/15", "dev", "br0"])?;
    let mac = bed.hosts[0].ns.mac("uplink0")?;
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    for hook in ["tc", "xdp"] {
        use_hook(&mut bed, hook)?;
        let h1 = &bed.hosts[0];
        let before = h1.counters()?;
        let file = bed.tmp_dir().join(format!("vlan-{hook}.pcap"));
        let cap = Capture::start(&bed.underlay, "br0", &file, 30)?;
        bed.underlay
            .exec(PYTHON, &["-c", TAGGED_SYNS, "br0", &mac])?;
        thread::sleep(Duration::from_millis(500));
        let packets = capture::decode(&cap.stop()?)?;
        let from = |src: &str| {
            packets
                .iter()
                .filter(|p| p.ip_src.first().is_some_and(|s| s == src))
                .count()
        };
        ensure!(
            from("198.18.1.1") == 0,
            "{hook}: host 1 answered a tagged SYN to RED-1's rewrite PA"
        );
        ensure!(
            from("198.18.0.1") >= 1,
            "{hook}: control: host 1's stack did not answer the untagged SYN to its own PA"
        );
        let after = h1.counters()?;
        ensure!(
            delta(&before, &after, "drop_uplink_vlan") == 2,
            "{hook}: the two tagged SYNs were not dropped as drop_uplink_vlan"
        );
    }
    Ok(())
}

#[test]
fn a_vms_checksum_offload_state_never_writes_into_rewritten_headers() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build("csum")?;
    bed.configure_with(Translation::Rewrite)?;
    for hook in ["tc", "xdp"] {
        use_hook(&mut bed, hook)?;
        // The checksum is completed in software on the uplink, after nv.
        bed.hosts[0]
            .ns
            .exec("ethtool", &["-K", "uplink0", "tx", "off"])?;
        let h1 = &bed.hosts[0];
        let before = h1.counters()?;
        let listener = Background::start(&bed.vm("RED-2").ns, false, &["listen", "9", "4"])?;
        let file = bed.tmp_dir().join(format!("csum-{hook}.pcap"));
        // On host 1's uplink: what leaves it, its checksums completed.
        let cap = Capture::start(&bed.hosts[0].ns, "uplink0", &file, 30)?;
        let red1 = &bed.vm("RED-1").ns;
        for kind in ["own", "ip"] {
            probe(
                red1,
                false,
                &[
                    "vnet",
                    "eth0",
                    kind,
                    "02:00:00:00:01:01",
                    "02:00:00:00:02:01",
                    "10.0.0.1",
                    "10.0.0.2",
                ],
            )?;
        }
        let packets = capture::decode(&cap.stop()?)?;
        let heard = listener.finish()?;
        let from_red1: Vec<_> = packets
            .iter()
            .filter(|p| p.ip_src.first().is_some_and(|s| s == "198.18.1.1"))
            .collect();
        ensure!(
            from_red1
                .iter()
                .all(|p| p.ip_dst.first().is_some_and(|d| d == "198.18.1.2")),
            "{hook}: RED-1's checksum offsets rewrote a provider address: {from_red1:?}"
        );
        ensure!(
            from_red1.iter().any(|p| p.l4_checksum_status == Some(1)),
            "{hook}: control: no UDP with a checksum completed right: {from_red1:?}"
        );
        ensure!(
            heard.contains("nv-vnet-own") && !heard.contains("nv-vnet-ip"),
            "{hook}: RED-2 heard: {heard}"
        );
        let after = h1.counters()?;
        ensure!(
            delta(&before, &after, "drop_vm_csum_offload") == 1,
            "{hook}: the frame with offsets into the IPv4 header was not counted (host 1: {}; \
             underlay: {packets:?})",
            moved(&before, &after)
        );
    }
    Ok(())
}

/// The IPv6 link-local address of `port` on `host` (what a VM behind it could reach).
fn link_local(host: &Host, port: &str) -> anyhow::Result<String> {
    let out = host
        .ns
        .ip(&["-6", "addr", "show", "dev", port, "scope", "link"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned)
        .with_context(|| format!("no link-local address on {port}: {out}"))
}

/// Whether RED-1 gets an answer from its host's side of the port (it must not: filtered).
fn host_answers_red1(bed: &TwoHosts) -> anyhow::Result<bool> {
    let Ok(addr) = link_local(&bed.hosts[0], "red1") else {
        return Ok(false);
    };
    let out = bed.vm("RED-1").ns.exec_output(
        "ping",
        &[
            "-6",
            "-c",
            "2",
            "-i",
            "0.3",
            "-w",
            "3",
            &format!("{addr}%eth0"),
        ],
    )?;
    Ok(out.status.success())
}

#[test]
fn a_local_user_exhausting_descriptors_never_leaves_a_vm_port_open() -> anyhow::Result<()> {
    let mut bed = TwoHosts::build_bare("fds")?;
    // As systemd starts a service: 1024 descriptors unless raised, 4096 at most.
    for h in &mut bed.hosts {
        h.agent_nofile = Some((1024, 4096));
        h.start_agent()?;
    }
    bed.configure()?;
    ensure!(bed.ping("RED-1", "10.0.0.2", 3)? == 3, "RED-1 -> RED-2");

    // 1500 idle connections to /metrics from an unprivileged user.
    let idle = Background::start(
        &bed.hosts[0].ns,
        true,
        &["idle", "127.0.0.1", "9469", "1500", "30"],
    )?;
    // RED-1's port re-created meanwhile (the VM restarted): filtered, never open to the host.
    bed.rehome("RED-1", 0)?;
    ensure!(
        !host_answers_red1(&bed)?,
        "host 1 answered RED-1 on its re-created port: the port is not filtered"
    );
    let status = bed.hosts[0].nvctl_json(&["status"])?;
    ensure!(status["lookups"] == 4, "status during the flood: {status}");
    wait_for("RED-1 forwarded again", 20, || {
        Ok(bed.ping("RED-1", "10.0.0.2", 1)? == 1)
    })?;
    drop(idle);
    // The listener held its cap and closed the rest as they came.
    let metrics = bed.hosts[0]
        .ns
        .exec("curl", &["-sf", "http://127.0.0.1:9469/metrics"])?;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nv_connections_refused_total{listener=\"metrics\"} "))
        .and_then(|v| v.trim().parse().ok())
        .context("no nv_connections_refused_total for the metrics listener")?;
    ensure!(
        refused > 1000,
        "the metrics listener refused only {refused} of 1500"
    );

    // No descriptor left at all: a port re-created now cannot be filtered, so it is set down
    // (closed to the host), and set up once it can be.
    let pid = bed.hosts[0]
        .agent
        .as_ref()
        .context("host 1's agent")?
        .pid()
        .to_string();
    // The soft limit only: raising a hard limit again needs a privilege the machine may lack.
    let limit =
        |n: &str| nv_tests::sys::run("prlimit", &[&format!("--nofile={n}:4096"), "--pid", &pid]);
    limit("3")?;
    bed.rehome("RED-1", 0)?;
    let down = || -> anyhow::Result<bool> {
        let out = bed.hosts[0].ns.ip(&["-o", "link", "show", "red1"])?;
        Ok(!out.contains(",UP") && !out.contains("<UP"))
    };
    let waited = wait_for("red1 set down", 10, down);
    let open = host_answers_red1(&bed);
    limit("4096")?;
    waited?;
    ensure!(
        !open?,
        "host 1 answered RED-1 on a port it could not filter"
    );
    wait_for("red1 filtered and up again", 20, || {
        Ok(!down()? && bed.ping("RED-1", "10.0.0.2", 1)? == 1)
    })?;
    ensure!(
        !host_answers_red1(&bed)?,
        "host 1 answered RED-1 once its port was up again"
    );
    let metrics = bed.hosts[0]
        .ns
        .exec("curl", &["-sf", "http://127.0.0.1:9469/metrics"])?;
    ensure!(
        metrics.lines().any(|l| l == "nv_ports_set_down_total 1"),
        "the port set down is not counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("set_down"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        bed.hosts[0].agent_log().contains("setting it down"),
        "the agent did not say why it set red1 down"
    );
    Ok(())
}

#[test]
fn provider_addresses_must_be_the_hosts_to_give() -> anyhow::Result<()> {
    let bed = TwoHosts::build("prov")?;
    let h1 = &bed.hosts[0];
    h1.expect_refused(
        &[
            "provider",
            "add",
            "--pa",
            "198.18.5.1/1",
            "--dev",
            "uplink0",
        ],
        "shorter than /15",
    )?;
    h1.add_provider("198.18.0.1")?;
    // Another host's PA, named by a record of a VM there.
    h1.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.2",
        "--pa",
        "198.18.0.2",
        "--mac",
        "02:00:00:00:02:01",
    ])?;
    h1.expect_refused(
        &[
            "provider",
            "add",
            "--pa",
            "198.18.0.2/15",
            "--dev",
            "uplink0",
        ],
        "another host's",
    )?;
    // The host's own address on another device.
    h1.ns.ip(&["addr", "add", "198.18.77.1/32", "dev", "lo"])?;
    h1.expect_refused(
        &[
            "provider",
            "add",
            "--pa",
            "198.18.77.1/15",
            "--dev",
            "uplink0",
        ],
        "an address of lo",
    )?;
    // An address the uplink had before nv: NVGRE may use it, rewrite may not.
    h1.ns
        .ip(&["addr", "add", "198.18.1.1/15", "dev", "uplink0"])?;
    h1.add_provider("198.18.1.1")?;
    h1.expect_refused(
        &[
            "lookup",
            "add",
            "--vsid",
            "7001",
            "--ca",
            "10.0.0.1",
            "--pa",
            "198.18.1.1",
            "--mac",
            "02:00:00:00:01:01",
            "--method",
            "rewrite",
            "--port",
            "red1",
        ],
        "before nv added it",
    )?;
    // The control: an address nv adds serves a rewrite VM.
    h1.add_provider("198.18.1.11")?;
    h1.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "7001",
        "--ca",
        "10.0.0.1",
        "--pa",
        "198.18.1.11",
        "--mac",
        "02:00:00:00:01:01",
        "--method",
        "rewrite",
        "--port",
        "red1",
    ])?;

    Ok(())
}

#[test]
fn only_a_vms_own_device_can_be_its_port() -> anyhow::Result<()> {
    let bed = TwoHosts::build("port")?;
    let h1 = &bed.hosts[0];
    h1.add_provider("198.18.0.1")?;
    // Ports that are not a VM's: a veth whose other end is in the host's own namespace, and
    // one enslaved to a bridge.
    h1.ns
        .ip(&["link", "add", "ct9", "type", "veth", "peer", "name", "ct9p"])?;
    let add_on = |port: &'static str| {
        vec![
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            "10.0.0.9",
            "--pa",
            "198.18.0.1",
            "--mac",
            "02:00:00:00:01:09",
            "--port",
            port,
        ]
    };
    h1.expect_refused(&add_on("ct9"), "in this host's own namespace")?;
    let vm9 = Netns::new(&format!("{}-vm9", bed.prefix))?;
    h1.ns.ip(&[
        "link", "add", "vm9", "type", "veth", "peer", "name", "eth0", "netns", &vm9.name,
    ])?;
    h1.ns.ip(&["link", "add", "br9", "type", "bridge"])?;
    h1.ns.ip(&["link", "set", "vm9", "master", "br9"])?;
    h1.expect_refused(&add_on("vm9"), "enslaved")?;
    h1.ns.ip(&["link", "set", "vm9", "nomaster"])?;
    h1.nvctl(&add_on("vm9"))?;
    Ok(())
}

#[test]
fn a_guests_tso_super_packet_crosses_by_nvgre() -> anyhow::Result<()> {
    let bed = TwoHosts::build("tso")?;
    bed.configure()?;
    let tap = TapVm {
        name: "RED-9",
        host: 0,
        vsid: RED_VSID,
        ca: "10.0.0.9",
        mac: "02:00:00:00:01:09",
        port: "tap9",
        rewrite_pa: None,
    };
    bed.plug_tap(&tap)?;
    let before = bed.hosts[0].counters()?;
    let file = bed.tmp_dir().join("tso.pcap");
    let cap = Capture::start(&bed.vm("RED-2").ns, "eth0", &file, 30)?;
    // A TSO super-packet of 65480 bytes of payload as virtio-net hands it over (a segment size,
    // no segment count yet): with the NVGRE header it is more than an IPv4 packet can say.
    probe(
        &bed.hosts[0].ns,
        false,
        &[
            "tso",
            "tap9",
            "02:00:00:00:01:09",
            "02:00:00:00:02:01",
            "10.0.0.9",
            "10.0.0.2",
            "65480",
        ],
    )?;
    // What RED-2 has received so far, read from the capture as it grows: TCP payload bytes
    // and small frames from RED-9.
    let received = || -> anyhow::Result<(u64, u64, String)> {
        let out = nv_tests::sys::run(
            "tshark",
            &[
                "-r",
                file.to_str().context("path")?,
                "-Y",
                "ip.src == 10.0.0.9 && !icmp",
                "-T",
                "fields",
                "-e",
                "tcp.len",
                "-e",
                "udp.length",
            ],
        )?;
        let (mut tcp, mut udp) = (0u64, 0u64);
        for line in out.lines() {
            let mut f = line.split('\t');
            tcp += f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            udp += u64::from(f.next().is_some_and(|v| !v.is_empty()));
        }
        Ok((tcp, udp, out))
    };
    let _ = wait_for("all of it at RED-2", 10, || {
        Ok(received().is_ok_and(|(tcp, udp, _)| tcp >= 65480 && udp >= 1))
    });
    cap.stop()?;
    let (tcp, udp, out) = received()?;
    let host1 = moved(&before, &bed.hosts[0].counters()?);
    ensure!(
        udp == 1,
        "control: the small frame did not arrive: {out} (host 1: {host1})"
    );
    ensure!(
        tcp == 65480,
        "RED-2 got {tcp} of the super-packet's 65480 bytes (host 1: {host1}): {out}"
    );
    Ok(())
}
