//! NVGRE over an IPv6 underlay. Each host has an IPv4 PA (198.18.0.N) and an IPv6 PA
//! (`2001:2::N`) at once: RED rides the IPv6 one, BLUE the IPv4 one, both dual-stack with the same
//! addresses (10.0.0.N and `fd00::N`). On a 1500-byte underlay, on the XDP hook and (agents
//! restarted) the TC hook: pings and TCP (content compared) in both families, tshark decoding
//! RED's NVGRE over IPv6 with its VSID and no customer address outside GRE, BLUE's over IPv4,
//! BLUE never seeing RED's payload, path MTU naming 62 bytes of overhead for RED and 42 for BLUE,
//! and the uplink's checks against forged NVGRE over IPv6 (spoofed PA, another tenant over the
//! wrong PA family, not our MAC, a fragment), beside a forged frame that is delivered.
use std::{thread, time::Duration};

use anyhow::{Context as _, ensure};
use nv_tests::{
    capture::{self, Capture},
    testbed::{BLUE_VSID, RED_VSID, TwoHosts, delta, ipv6_of, monitor_events, tcp_transfer},
};

const PYTHON: &str = "/usr/bin/python3";

fn pa6(host: usize) -> String {
    format!("2001:2::{}", host + 1)
}

/// Both PAs on each host; every VM's IPv4 and IPv6 record on both hosts (RED over its host's
/// IPv6 PA, BLUE over its IPv4 one); the IPv6 addresses in the VMs.
fn configure(bed: &TwoHosts) -> anyhow::Result<()> {
    for (i, h) in bed.hosts.iter().enumerate() {
        h.add_provider(&h.pa)?;
        h.add_provider(&pa6(i))?;
    }
    for (i, h) in bed.hosts.iter().enumerate() {
        for vm in &bed.vms {
            let pa = if vm.vsid == RED_VSID {
                pa6(vm.host)
            } else {
                bed.hosts[vm.host].pa.clone()
            };
            let vsid = vm.vsid.to_string();
            for ca in [vm.ca.clone(), ipv6_of(&vm.ca)] {
                let mut args = vec![
                    "lookup", "add", "--vsid", &vsid, "--ca", &ca, "--pa", &pa, "--mac", &vm.mac,
                    "--name", &vm.name,
                ];
                if vm.host == i {
                    args.extend(["--port", &vm.port]);
                }
                h.nvctl(&args)?;
            }
        }
    }
    for vm in &bed.vms {
        vm.add_ipv6(&ipv6_of(&vm.ca))?;
    }
    Ok(())
}

/// GREEN (VSID 7001) is dual-stack by IP rewrite, with RED's and BLUE's very addresses: GREEN-N
/// has `10.0.0.N` behind its own IPv4 rewrite PA `198.18.1.N` and `fd00::N` behind its own IPv6
/// rewrite PA `2001:2::1:N`.
const GREEN_VSID: &str = "7001";

fn green_pas(host: usize) -> (String, String) {
    (
        format!("198.18.1.{}", host + 1),
        format!("2001:2::1:{}", host + 1),
    )
}

/// GREEN-1 on host 1, GREEN-2 on host 2; the rewrite PAs on their hosts; every GREEN record on
/// both hosts.
fn add_green(bed: &mut TwoHosts) -> anyhow::Result<()> {
    for host in 0..2 {
        let mac = format!("02:00:00:00:0{}:07", host + 1);
        let name = format!("GREEN-{}", host + 1);
        let ca = format!("10.0.0.{}", host + 1);
        bed.add_vm(&name, 7001, &ca, &mac, &format!("green{}", host + 1), host)?;
        let (pa4, pa6) = green_pas(host);
        bed.hosts[host].add_provider(&pa4)?;
        bed.hosts[host].add_provider(&pa6)?;
    }
    for (i, h) in bed.hosts.iter().enumerate() {
        for host in 0..2 {
            let mac = format!("02:00:00:00:0{}:07", host + 1);
            let name = format!("GREEN-{}", host + 1);
            let port = format!("green{}", host + 1);
            let (pa4, pa6) = green_pas(host);
            for (ca, pa) in [
                (format!("10.0.0.{}", host + 1), pa4),
                (format!("fd00::{}", host + 1), pa6),
            ] {
                let mut args = vec![
                    "lookup", "add", "--vsid", GREEN_VSID, "--ca", &ca, "--pa", &pa, "--mac", &mac,
                    "--method", "rewrite", "--name", &name,
                ];
                if host == i {
                    args.extend(["--port", &port]);
                }
                h.nvctl(&args)?;
            }
        }
    }
    for host in 0..2 {
        let vm = bed.vm(&format!("GREEN-{}", host + 1));
        vm.add_ipv6(&format!("fd00::{}", host + 1))?;
        // Full checksums from the VM, so tshark can check them on the underlay.
        vm.ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
    }
    Ok(())
}

/// GREEN-1 reaches GREEN-2 by IPv6 and IPv4, ping and TCP (content compared); on the underlay
/// GREEN's IPv6 is plain IPv6 between the two IPv6 rewrite PAs (no GRE, no customer address,
/// TCP and `ICMPv6` checksums valid per tshark); each host answered neighbour discovery for its
/// rewrite PA, which is on no device of the host.
fn green_crosses_by_ipv6_rewrite(bed: &TwoHosts, hook: &str) -> anyhow::Result<()> {
    let file = bed.tmp_dir().join(format!("u6-green-{hook}.pcap"));
    let cap = Capture::start(&bed.underlay, "br0", &file, 120)?;
    let red2 = Capture::start(
        &bed.vm("RED-2").ns,
        "eth0",
        &bed.tmp_dir().join(format!("u6-red2-{hook}.pcap")),
        120,
    )?;
    for dst in ["fd00::2", "10.0.0.2"] {
        let before: Vec<_> = bed
            .hosts
            .iter()
            .map(nv_tests::testbed::Host::counters)
            .collect::<Result<_, _>>()?;
        let got = bed.ping_with("GREEN-1", dst, 3, &["-p", "c7"])?;
        if got != 3 {
            for (h, b) in bed.hosts.iter().zip(&before) {
                let after = h.counters()?;
                let moved: Vec<String> = after
                    .iter()
                    .filter(|(k, v)| b.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k} +{}", v - b.get(k).copied().unwrap_or(0)))
                    .collect();
                eprintln!("{}: {moved:?}", h.name);
            }
        }
        ensure!(got == 3, "{hook}: GREEN-1 -> {dst}: {got} of 3 answered");
    }
    // RED-2 has GREEN-2's addresses: it sees RED's pings (the control), never GREEN's.
    let got = bed.ping_with("RED-1", "fd00::2", 3, &["-p", "a5"])?;
    ensure!(got == 3, "{hook}: RED-1 -> fd00::2: {got} of 3");
    let seen = capture::frames(&red2.stop()?)?;
    let with = |b: u8| nv_tests::capture::with_pattern(&seen, b);
    ensure!(
        with(0xc7) == 0 && with(0xa5) >= 3,
        "{hook}: RED-2 saw {} of GREEN's frames and {} of RED's",
        with(0xc7),
        with(0xa5)
    );
    let (sent, received) = tcp_transfer(bed.vm("GREEN-2"), bed.vm("GREEN-1"), "fd00::2", 1 << 20)?;
    ensure!(
        sent.starts_with(&format!("{} ", 1 << 20)) && sent == received,
        "{hook}: GREEN TCP over IPv6 rewrite: sent {sent}, received {received}"
    );
    let packets = capture::decode6(&cap.stop()?)?;
    let pas = [green_pas(0).1, green_pas(1).1];
    let (mut rewritten, mut checked) = (0, 0);
    for p in &packets {
        let (Some(src), Some(dst)) = (p.ipv6_src.first(), p.ipv6_dst.first()) else {
            continue;
        };
        ensure!(
            !src.starts_with("fd00:") && !dst.starts_with("fd00:"),
            "{hook}: GREEN's customer address on the underlay: {p:?}"
        );
        if !(pas.contains(src) && pas.contains(dst)) {
            continue;
        }
        ensure!(
            p.ipv6_src.len() == 1 && p.gre_key.is_none() && p.ip_src.is_empty(),
            "{hook}: between GREEN's rewrite PAs, not one plain IPv6 header: {p:?}"
        );
        rewritten += 1;
        if let Some(status) = p.l4_checksum_status {
            ensure!(status == 1, "{hook}: checksum not valid per tshark: {p:?}");
            checked += 1;
        }
    }
    ensure!(
        rewritten >= 100 && checked >= 100,
        "{hook}: {rewritten} rewritten IPv6 packets, {checked} checksums checked"
    );
    for (i, h) in bed.hosts.iter().enumerate() {
        let on_uplink = h.ns.ip(&["-6", "addr", "show", "dev", "uplink0"])?;
        let (_, pa6) = green_pas(i);
        ensure!(
            !on_uplink.contains(&format!("{pa6}/")),
            "{hook}: host {} still has its rewrite PA {pa6}: {on_uplink}",
            i + 1
        );
    }
    Ok(())
}

/// Sends three datagrams from `src` (port 47002) to `dst` (port 47003), the socket bound with
/// `IPV6_FREEBIND` (78): no privilege needed, and the kernel lets IPv6 leave from an address
/// that is not the host's.
const FREEBIND_SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 78, 1)
s.bind((sys.argv[1], 47002))
for _ in range(3):
    s.sendto(b"not from the VM", (sys.argv[2], 47003))
"#;

/// A local unprivileged user on host 1 sends from GREEN-1's IPv6 rewrite PA (off the uplink,
/// bound with `IPV6_FREEBIND`) to GREEN-2's: host 2 would take it as GREEN-1's, so the uplink's
/// egress drops it. GREEN-1's own three datagrams arrive beside (the control).
fn a_local_user_cannot_send_from_an_ipv6_rewrite_pa(bed: &TwoHosts) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    let sink = std::process::Command::new("ip")
        .args(["netns", "exec", &bed.vm("GREEN-2").ns.name])
        .arg(nv_tests::sys::bin("nv-transfer")?)
        .args(["udp-sink", "[::]:47003", "--seconds", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    thread::sleep(Duration::from_millis(300));
    let before = h1.counters()?;
    let (pa1, pa2) = (green_pas(0).1, green_pas(1).1);
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &h1.ns.name])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args([PYTHON, "-c", FREEBIND_SEND, &pa1, &pa2])
        .output()?;
    ensure!(
        out.status.success(),
        "the unprivileged sender failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    thread::sleep(Duration::from_millis(500));
    bed.vm("GREEN-1").ns.exec(
        PYTHON,
        &[
            "-c",
            "import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             for _ in range(3): s.sendto(b'from GREEN-1', ('fd00::2', 47003))",
        ],
    )?;
    let got = sink.wait_with_output()?;
    let received = String::from_utf8_lossy(&got.stdout).trim().to_owned();
    let dropped = delta(&before, &h1.counters()?, "drop_host_from_rewrite_pa");
    ensure!(
        received == "received 3" && dropped >= 1,
        "GREEN-2 {received} (3 from GREEN-1 expected, none from the host user); the uplink's \
         egress dropped {dropped} of the user's"
    );
    Ok(())
}

#[test]
fn dual_stack_tenants_cross_an_ipv6_underlay_beside_an_ipv4_one_on_either_hook()
-> anyhow::Result<()> {
    let mut bed = TwoHosts::build_on("u6", &["--decap-hook", "xdp"], "1500")?;
    configure(&bed)?;
    add_green(&mut bed)?;
    what_the_agent_refuses(&bed)?;
    no_packet_crosses_between_underlay_families(&bed)?;
    let nd_before: u64 = bed
        .hosts
        .iter()
        .map(|h| {
            h.counters()
                .map(|c| c.get("uplink_nd_replied").copied().unwrap_or(0))
        })
        .sum::<anyhow::Result<u64>>()?;
    // The rewrite PAs are resolved once GREEN has spoken; then a host user tries one.
    ensure!(
        bed.ping("GREEN-1", "fd00::2", 1)? == 1,
        "GREEN-1 -> GREEN-2"
    );
    a_local_user_cannot_send_from_an_ipv6_rewrite_pa(&bed)?;
    for hook in ["xdp", "tc"] {
        if hook == "tc" {
            for h in &mut bed.hosts {
                h.stop_agent();
                h.agent_args = vec!["--decap-hook".into(), "tc".into()];
                h.start_agent()?;
            }
        }
        traffic_rides_its_tenant_s_underlay(&bed, hook)?;
        green_crosses_by_ipv6_rewrite(&bed, hook)?;
        if hook == "xdp" {
            let nd_after: u64 = bed
                .hosts
                .iter()
                .map(|h| {
                    h.counters()
                        .map(|c| c.get("uplink_nd_replied").copied().unwrap_or(0))
                })
                .sum::<anyhow::Result<u64>>()?;
            ensure!(
                nd_after > nd_before,
                "no neighbour solicitation for a rewrite PA was answered"
            );
        }
        path_mtu_names_each_underlay_s_overhead(&bed, hook)?;
        the_uplink_checks_hold_over_ipv6(&bed, hook)?;
    }
    the_monitor_names_ipv6_addresses(&bed)?;
    traces_follow_the_ipv6_underlay(&bed)
}

/// `nvctl trace` over the IPv6 underlay: RED-1's IPv6 leaves in NVGRE over IPv6 (tshark reads
/// the traced output: the PAs, RED's VSID, the customer's packet inside), RED's NVGRE over IPv6
/// from host 2 goes into RED-1, and GREEN's IPv6 leaves rewritten and comes in restored.
fn traces_follow_the_ipv6_underlay(bed: &TwoHosts) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    let trace = |args: &[&str]| {
        let mut all = vec!["trace"];
        all.extend_from_slice(args);
        h1.nvctl_json(&all)
    };
    let t = trace(&["--port", "red1", "--dst", "fd00::2"])?;
    ensure!(
        t["counter"] == "vm_tx_encap" && t["out_port"] == "uplink0",
        "{t}"
    );
    let hex = t["output_frame"].as_str().context("output frame")?;
    let frame: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    let file = bed.tmp_dir().join("u6-trace.pcap");
    capture::write_pcap(&file, &[frame])?;
    let p = capture::decode6(&file)?;
    let p = p.first().context("tshark read nothing")?;
    ensure!(
        p.ipv6_src == ["2001:2::1", "fd00::1"]
            && p.ipv6_dst == ["2001:2::2", "fd00::2"]
            && p.gre_key.map(|k| k >> 8) == Some(RED_VSID),
        "tshark of the traced output: {p:?}"
    );
    let t = trace(&[
        "--from-uplink",
        "--vsid",
        "5001",
        "--src",
        "10.0.0.2",
        "--dst",
        "10.0.0.1",
    ])?;
    ensure!(t["verdict"] == "redirect" && t["out_port"] == "red1", "{t}");
    let t = trace(&["--port", "green1", "--dst", "fd00::2"])?;
    ensure!(
        t["counter"] == "vm_tx_rewrite"
            && t["output"][1]
                .as_str()
                .unwrap_or("")
                .starts_with("IPv6 2001:2::1:1 > 2001:2::1:2"),
        "{t}"
    );
    let t = trace(&[
        "--from-uplink",
        "--vsid",
        "7001",
        "--src",
        "fd00::2",
        "--dst",
        "fd00::1",
    ])?;
    ensure!(
        t["out_port"] == "green1"
            && t["output"][1]
                .as_str()
                .unwrap_or("")
                .starts_with("IPv6 fd00::2 > fd00::1"),
        "{t}"
    );
    Ok(())
}

/// `nvctl monitor` shows IPv6 as it shows IPv4: RED-1's pings from an address not its own
/// (`fd00::9`) as drops with their IPv6 addresses, and on host 2 RED's echoes, in from the IPv6
/// underlay, sampled with theirs; RED-1's own pings cross meanwhile (the control).
fn the_monitor_names_ipv6_addresses(bed: &TwoHosts) -> anyhow::Result<()> {
    let (h1, h2) = (&bed.hosts[0], &bed.hosts[1]);
    let spoof = h1.monitor(&[
        "--port",
        "red1",
        "--reason",
        "vm_spoofed_ip",
        "--count",
        "2",
    ])?;
    // Deliveries only: the VMs' own chatter (their router solicitations, say) are drops.
    let forwarded = h2.monitor(&[
        "--vsid",
        "5001",
        "--reason",
        "uplink_delivered",
        "--sample",
        "1",
        "--count",
        "2",
    ])?;
    h1.monitors_become(1)?;
    h2.monitors_become(1)?;
    let red1 = &bed.vm("RED-1").ns;
    red1.ip(&["-6", "addr", "add", "fd00::9/64", "dev", "eth0", "nodad"])?;
    red1.ip(&[
        "-6",
        "neigh",
        "replace",
        "fd00::2",
        "lladdr",
        &bed.vm("RED-2").mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    let _ = red1.exec_output(
        "ping",
        &[
            "-6", "-c", "2", "-i", "0.2", "-W", "1", "-I", "fd00::9", "fd00::2",
        ],
    )?;
    ensure!(
        bed.ping_with("RED-1", "fd00::2", 2, &["-I", "fd00::1"])? == 2,
        "RED-1's pings from its own address"
    );
    red1.ip(&["-6", "addr", "del", "fd00::9/64", "dev", "eth0"])?;
    let spoofed = monitor_events(spoof)?;
    ensure!(spoofed.len() == 2, "the drop monitor saw {spoofed:?}");
    for e in &spoofed {
        for (field, want) in [
            ("kind", "drop"),
            ("reason", "vm_spoofed_ip"),
            ("src", "fd00::9"),
            ("dst", "fd00::2"),
            ("proto", "icmpv6"),
        ] {
            ensure!(e[field] == want, "{field} of {e}: expected {want}");
        }
    }
    let seen = monitor_events(forwarded)?;
    ensure!(seen.len() == 2, "the sample monitor saw {seen:?}");
    for e in &seen {
        ensure!(
            e["kind"] == "forward"
                && e["vsid"] == 5001
                && e["proto"] == "icmpv6"
                && e["src"] == "fd00::1"
                && e["dst"] == "fd00::2",
            "a sampled RED event that is not one of its IPv6 echoes: {e}"
        );
    }
    Ok(())
}

/// Pings in both families from RED-1 and BLUE-1 (payload patterns a5 and b6) and TCP in both
/// families for RED, while the underlay and BLUE-2 are captured.
fn traffic_rides_its_tenant_s_underlay(bed: &TwoHosts, hook: &str) -> anyhow::Result<()> {
    let file = bed.tmp_dir().join(format!("u6-{hook}.pcap"));
    let cap = Capture::start(&bed.underlay, "br0", &file, 120)?;
    let blue2 = Capture::start(
        &bed.vm("BLUE-2").ns,
        "eth0",
        &bed.tmp_dir().join(format!("u6-blue2-{hook}.pcap")),
        120,
    )?;
    for (vm, pattern) in [("RED-1", "a5"), ("BLUE-1", "b6")] {
        for dst in ["10.0.0.2", "fd00::2"] {
            let got = bed.ping_with(vm, dst, 3, &["-p", pattern])?;
            ensure!(got == 3, "{hook}: {vm} -> {dst}: {got} of 3 answered");
        }
    }
    for dst in ["10.0.0.2", "fd00::2"] {
        let (sent, received) = tcp_transfer(bed.vm("RED-2"), bed.vm("RED-1"), dst, 1 << 20)?;
        ensure!(
            sent.starts_with(&format!("{} ", 1 << 20)) && sent == received,
            "{hook}: TCP to {dst}: sent {sent}, received {received}"
        );
    }
    let file = cap.stop()?;
    let seen = capture::frames(&blue2.stop()?)?;
    let with = |b: u8| nv_tests::capture::with_pattern(&seen, b);
    ensure!(
        with(0xa5) == 0 && with(0xb6) >= 6,
        "{hook}: BLUE-2 saw {} of RED's frames and {} of BLUE's",
        with(0xa5),
        with(0xb6)
    );

    // RED: NVGRE over IPv6 between the IPv6 PAs, its VSID in the key, a customer packet of
    // either family inside, and nothing of the customer's outside GRE.
    let v6 = capture::decode6(&file)?;
    let pas6 = [pa6(0), pa6(1)];
    let (mut red4, mut red6, mut labels) = (0, 0, std::collections::BTreeSet::new());
    // Packets whose outer header is IPv6 (BLUE's IPv6 customers ride IPv4).
    for p in v6
        .iter()
        .filter(|p| p.protocols.starts_with("eth:ethertype:ipv6"))
    {
        let outer = (p.ipv6_src.first(), p.ipv6_dst.first());
        let (Some(src), Some(dst)) = outer else {
            continue;
        };
        ensure!(
            !src.starts_with("fd00:") && !dst.starts_with("fd00:"),
            "{hook}: a customer IPv6 address outside GRE: {p:?}"
        );
        if !(pas6.contains(src) && pas6.contains(dst)) {
            continue;
        }
        // The hosts' own neighbour discovery for each other's PA.
        if p.gre_key.is_none() && p.protocols == "eth:ethertype:ipv6:icmpv6" {
            continue;
        }
        let key = p
            .gre_key
            .with_context(|| format!("{hook}: not NVGRE: {p:?}"))?;
        ensure!(
            key >> 8 == RED_VSID && p.gre_proto == Some(0x6558),
            "{hook}: GRE key {key:#x} / protocol {:?}, expected RED's VSID over TEB: {p:?}",
            p.gre_proto
        );
        if let Some(label) = p.flow_label {
            labels.insert(label);
        }
        match (p.ip_src.first(), p.ipv6_src.get(1)) {
            (Some(inner), None) if inner.starts_with("10.0.0.") => red4 += 1,
            (None, Some(inner)) if inner.starts_with("fd00::") => red6 += 1,
            _ => anyhow::bail!("{hook}: inner packet of RED: {p:?}"),
        }
    }
    ensure!(
        red4 >= 6 && red6 >= 6,
        "{hook}: RED over IPv6: {red4} IPv4 and {red6} IPv6 customer packets"
    );
    ensure!(
        labels.iter().filter(|l| **l != 0).count() >= 2,
        "{hook}: flow labels of RED's NVGRE: {labels:?} (one per flow expected)"
    );

    blue_rides_ipv4(&file, hook)
}

/// BLUE: NVGRE over IPv4 between the IPv4 PAs, never over IPv6.
fn blue_rides_ipv4(file: &std::path::Path, hook: &str) -> anyhow::Result<()> {
    let v4 = capture::decode(file)?;
    let mut blue = 0;
    for p in v4
        .iter()
        .filter(|p| p.protocols.starts_with("eth:ethertype:ip:"))
    {
        let (Some(src), Some(dst)) = (p.ip_src.first(), p.ip_dst.first()) else {
            continue;
        };
        ensure!(
            !src.starts_with("10.") && !dst.starts_with("10."),
            "{hook}: a customer IPv4 address outside GRE: {p:?}"
        );
        if src.starts_with("198.18.0.") && dst.starts_with("198.18.0.") {
            ensure!(
                p.gre_key.is_some_and(|k| k >> 8 == BLUE_VSID),
                "{hook}: between the IPv4 PAs, not BLUE's NVGRE: {p:?}"
            );
            blue += 1;
        }
    }
    ensure!(blue >= 12, "{hook}: {blue} of BLUE's packets over IPv4");
    Ok(())
}

/// On a 1500-byte underlay, a VM whose PA is IPv6 may send 1438-byte packets (62 bytes of
/// NVGRE over IPv6), one whose PA is IPv4 1458: the datapath answers the first byte more with
/// "fragmentation needed" or "packet too big" naming that MTU.
fn path_mtu_names_each_underlay_s_overhead(bed: &TwoHosts, hook: &str) -> anyhow::Result<()> {
    // (VM, destination, ICMP/IP header bytes, MTU)
    for (vm, dst, headers, mtu) in [
        ("RED-1", "10.0.0.2", 28, 1438),
        ("RED-1", "fd00::2", 48, 1438),
        ("BLUE-1", "10.0.0.2", 28, 1458),
        ("BLUE-1", "fd00::2", 48, 1458),
    ] {
        let fits = (mtu - headers).to_string();
        let got = bed.ping_with(vm, dst, 1, &["-M", "do", "-s", &fits])?;
        ensure!(got == 1, "{hook}: {vm} -> {dst}: {mtu} bytes did not cross");
        let over = (mtu - headers + 1).to_string();
        let out = bed.vm(vm).ns.exec_output(
            "ping",
            &[
                "-c", "2", "-i", "0.2", "-W", "1", "-M", "do", "-s", &over, dst,
            ],
        )?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            text.contains(&mtu.to_string()) && !text.contains(" 0% packet loss"),
            "{hook}: {vm} -> {dst}: {} bytes were not answered with MTU {mtu}: {text}",
            mtu + 1
        );
    }
    Ok(())
}

/// Forged NVGRE over IPv6 from the underlay to host 2 (RED-1 -> RED-2, ICMP echo with a c3
/// payload): the genuine one is delivered; a spoofed outer source, BLUE over IPv6 (its records
/// are behind IPv4 PAs), a frame not addressed to host 2's MAC and a fragment are dropped,
/// each under its counter.
const FORGE: &str = r#"
import sys
from scapy.all import Ether, IPv6, IPv6ExtHdrFragment, GRE, IP, ICMP, Raw, sendp
iface, mac, kind = sys.argv[1], sys.argv[2], sys.argv[3]
def nvgre(vsid, src_mac, dst_mac):
    inner = Ether(src=src_mac, dst=dst_mac) / IP(src="10.0.0.1", dst="10.0.0.2")
    inner = inner / ICMP(id=77, seq=1) / Raw(b"\xc3" * 64)
    return GRE(key_present=1, key=(vsid << 8) | 1, proto=0x6558) / inner
red = nvgre(5001, "02:00:00:00:01:01", "02:00:00:00:02:01")
blue = nvgre(6001, "02:00:00:00:01:02", "02:00:00:00:02:02")
outer = lambda src: IPv6(src=src, dst="2001:2::2")
frame = {
    "genuine": Ether(dst=mac) / outer("2001:2::1") / red,
    "spoofed": Ether(dst=mac) / outer("2001:2::9") / red,
    "family": Ether(dst=mac) / outer("2001:2::1") / blue,
    "mac": Ether(dst="02:00:5e:00:53:99") / outer("2001:2::1") / red,
    "fragment": Ether(dst=mac) / outer("2001:2::1") / IPv6ExtHdrFragment(nh=47, m=1, id=7) / red,
}[kind]
sendp(frame, iface=iface, verbose=False)
"#;

fn the_uplink_checks_hold_over_ipv6(bed: &TwoHosts, hook: &str) -> anyhow::Result<()> {
    let h2 = &bed.hosts[1];
    let mac = h2.ns.mac("uplink0")?;
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    for (kind, counter) in [
        ("genuine", "uplink_delivered"),
        ("spoofed", "drop_uplink_spoofed_pa"),
        ("family", "drop_uplink_spoofed_pa"),
        ("mac", "drop_uplink_not_our_mac"),
        ("fragment", "drop_uplink_fragment"),
    ] {
        let red2 = Capture::start(
            &bed.vm("RED-2").ns,
            "eth0",
            &bed.tmp_dir().join(format!("u6-forged-{kind}-{hook}.pcap")),
            30,
        )?;
        let before = h2.counters()?;
        bed.underlay
            .exec(PYTHON, &["-c", FORGE, "br0", &mac, kind])?;
        thread::sleep(Duration::from_millis(300));
        let after = h2.counters()?;
        let arrived = capture::frames(&red2.stop()?)?
            .iter()
            // Frames in (from RED-1's MAC), not RED-2's answer.
            .filter(|f| f.len() > 12 && f[6..12] == [2, 0, 0, 0, 1, 1])
            .filter(|f| capture::has_run(f, 0xc3, 32))
            .count();
        let counted = delta(&before, &after, counter);
        if kind == "genuine" {
            ensure!(
                arrived == 1 && counted >= 1,
                "{hook}: the genuine forged frame: {arrived} arrived at RED-2, {counter} +{counted}"
            );
        } else {
            ensure!(
                arrived == 0 && counted == 1,
                "{hook}: {kind}: {arrived} arrived at RED-2, {counter} +{counted}"
            );
        }
    }
    Ok(())
}

/// What an IPv6 underlay does not take: a link-local PA, IP rewrite of an IPv4 CA over an
/// IPv6 PA, and a VM's IPv6 record over another PA than its IPv4 record's.
fn what_the_agent_refuses(bed: &TwoHosts) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    h1.expect_refused(
        &["provider", "add", "--pa", "fe80::9/64", "--dev", "uplink0"],
        "link-local",
    )?;
    h1.expect_refused(
        &[
            "lookup",
            "add",
            "--vsid",
            "7001",
            "--ca",
            "10.9.0.1",
            "--pa",
            "2001:2::77",
            "--mac",
            "02:00:00:00:77:01",
            "--method",
            "rewrite",
        ],
        "needs an IPv4 PA",
    )?;
    h1.expect_refused(
        &[
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            "fd00::22",
            "--pa",
            "198.18.0.2",
            "--mac",
            "02:00:00:00:02:01",
        ],
        "MAC 02:00:00:00:02:01",
    )?;
    Ok(())
}

/// RED-1's PA is IPv6; a record of its VSID behind an IPv4 PA (`10.0.0.9` at host 2's
/// 198.18.0.2) cannot be reached by any NVGRE header RED-1 may send: its packets are counted
/// drops, while RED-2 (behind an IPv6 PA) answers it (the control).
fn no_packet_crosses_between_underlay_families(bed: &TwoHosts) -> anyhow::Result<()> {
    let h1 = &bed.hosts[0];
    h1.nvctl(&[
        "lookup",
        "add",
        "--vsid",
        "5001",
        "--ca",
        "10.0.0.9",
        "--pa",
        "198.18.0.2",
        "--mac",
        "02:00:00:00:02:09",
    ])?;
    let before = h1.counters()?;
    ensure!(
        bed.ping("RED-1", "10.0.0.9", 2)? == 0,
        "RED-1 reached 10.0.0.9 over another underlay family"
    );
    let after = h1.counters()?;
    let dropped = delta(&before, &after, "drop_vm_underlay_family");
    ensure!(
        dropped == 2,
        "RED-1's 2 pings to an IPv4 PA: drop_vm_underlay_family +{dropped}"
    );
    ensure!(
        bed.ping("RED-1", "10.0.0.2", 2)? == 2,
        "control: RED-1 -> RED-2"
    );
    h1.nvctl(&["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.9"])?;
    Ok(())
}
