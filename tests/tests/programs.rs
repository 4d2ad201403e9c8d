//! Program tests: each datapath program run with `BPF_PROG_TEST_RUN` on frames built with
//! etherparse, against maps filled as the agent fills them. Expected bytes are built
//! independently of the datapath (etherparse computes headers and checksums).
use std::path::PathBuf;

use anyhow::{Context as _, ensure};
use etherparse::{IpNumber, Ipv4Header, Ipv4HeaderSlice, PacketBuilder};
use nv_agent::datapath::{Datapath, Desired};
use nv_common::{
    DatapathConfig, DeliverMeta, LocalPa, LookupKey, LookupValue, Method, PortInfo, RestoreMeta,
    RewritePa,
    flow::flow_id_v4,
    program_names::{FROM_VM, UPLINK_TC, UPLINK_XDP},
    v4_mapped,
};
use nv_tests::{
    netns::Netns,
    sys::{require_root, unique_prefix},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const RED: u32 = 5001;
const BLUE: u32 = 6001;
const LOCAL_PA: [u8; 4] = [198, 18, 0, 1];
const REMOTE_PA: [u8; 4] = [198, 18, 0, 2];
const GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x02];
const RED1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const BLUE1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const RED3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];
const RED2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
const BLUE2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
const CA1: [u8; 4] = [10, 0, 0, 1];
const CA2: [u8; 4] = [10, 0, 0, 2];
const CA3: [u8; 4] = [10, 0, 0, 3];
const GREEN: u32 = 7001;
const GREEN1_PA: [u8; 4] = [198, 18, 1, 1];
const GREEN2_PA: [u8; 4] = [198, 18, 1, 2];
const OTHER_PA: [u8; 4] = [198, 18, 1, 9];
const GREEN_GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x03];
const GREEN1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 7];
const GREEN2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 7];

/// A host in a namespace with an uplink (PA 198.18.0.1, the remote PA's neighbour known) and
/// three VM ports: RED-1 (10.0.0.1), BLUE-1 (10.0.0.1) and RED-3 (10.0.0.3). RED-2 and BLUE-2
/// (10.0.0.2) are remote. The test thread runs inside the namespace.
struct Host {
    dp: Datapath,
    ns: Netns,
    pin: PathBuf,
    uplink_mac: [u8; 6],
    red1: u32,
    blue1: u32,
    green1: u32,
    desired: Desired,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = nv_agent::datapath::purge(&self.pin);
    }
}

/// The host's namespace: uplink with both local PAs and the remote PAs' neighbours known,
/// and the VM ports.
fn host_namespace(forwarding: bool) -> anyhow::Result<Netns> {
    require_root()?;
    let ns = Netns::new(&unique_prefix("p"))?;
    ns.ip(&[
        "link", "add", "uplink0", "type", "veth", "peer", "name", "peer0",
    ])?;
    ns.ip(&["link", "set", "uplink0", "up"])?;
    ns.ip(&["link", "set", "peer0", "up"])?;
    for port in ["red1", "blue1", "red3", "green1"] {
        let peer = format!("{port}p");
        ns.ip(&["link", "add", port, "type", "veth", "peer", "name", &peer])?;
        ns.ip(&["link", "set", port, "up"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
    }
    for (local, remote, mac) in [
        ("198.18.0.1/15", "198.18.0.2", "02:aa:00:00:00:02"),
        ("198.18.1.1/15", "198.18.1.2", "02:aa:00:00:00:03"),
    ] {
        ns.ip(&["addr", "add", local, "dev", "uplink0"])?;
        ns.ip(&[
            "neigh",
            "replace",
            remote,
            "lladdr",
            mac,
            "dev",
            "uplink0",
            "nud",
            "permanent",
        ])?;
    }
    if forwarding {
        ns.exec("sysctl", &["-qw", "net.ipv4.conf.uplink0.forwarding=1"])?;
    }
    Ok(ns)
}

/// The maps as the agent would fill them for the VMs of `host_namespace`.
fn host_maps(ns: &Netns) -> anyhow::Result<Desired> {
    let (uplink, red1, blue1, red3, green1) = (
        ns.ifindex("uplink0")?,
        ns.ifindex("red1")?,
        ns.ifindex("blue1")?,
        ns.ifindex("red3")?,
        ns.ifindex("green1")?,
    );
    let port = |vsid, ca, mac| PortInfo {
        vsid,
        ca: v4_mapped(ca),
        pa: v4_mapped(LOCAL_PA),
        mac,
        method: 0,
        _pad: 0,
    };
    let lookup = |pa, mac, ifindex| LookupValue {
        pa: v4_mapped(pa),
        mac,
        method: 0,
        _pad: 0,
        ifindex,
    };
    let rewrite = |pa, mac, ifindex| LookupValue {
        method: Method::Rewrite as u8,
        ..lookup(pa, mac, ifindex)
    };
    let dedicated = |vsid, ca, mac, ifindex| RewritePa {
        vsid,
        ca: v4_mapped(ca),
        mac,
        _pad: [0; 2],
        ifindex,
    };
    let key = |vsid, ca| LookupKey {
        vsid,
        ca: v4_mapped(ca),
    };
    let mut d = Desired {
        config: DatapathConfig {
            uplink_ifindex: uplink,
            ..DatapathConfig::default()
        },
        ..Desired::default()
    };
    for pa in [LOCAL_PA, GREEN1_PA] {
        d.local_pas
            .insert(v4_mapped(pa), LocalPa { ifindex: uplink });
    }
    d.ports.insert(red1, port(RED, CA1, RED1_MAC));
    d.ports.insert(blue1, port(BLUE, CA1, BLUE1_MAC));
    d.ports.insert(red3, port(RED, CA3, RED3_MAC));
    d.lookups
        .insert(key(RED, CA1), lookup(LOCAL_PA, RED1_MAC, red1));
    d.lookups
        .insert(key(BLUE, CA1), lookup(LOCAL_PA, BLUE1_MAC, blue1));
    d.lookups
        .insert(key(RED, CA3), lookup(LOCAL_PA, RED3_MAC, red3));
    d.lookups
        .insert(key(RED, CA2), lookup(REMOTE_PA, RED2_MAC, 0));
    d.lookups
        .insert(key(BLUE, CA2), lookup(REMOTE_PA, BLUE2_MAC, 0));
    // GREEN uses IP rewrite: GREEN-1 (10.0.0.1, here, PA 198.18.1.1) and GREEN-2 (10.0.0.2,
    // remote, PA 198.18.1.2).
    let green_port = PortInfo {
        pa: v4_mapped(GREEN1_PA),
        method: Method::Rewrite as u8,
        ..port(GREEN, CA1, GREEN1_MAC)
    };
    d.ports.insert(green1, green_port);
    d.lookups
        .insert(key(GREEN, CA1), rewrite(GREEN1_PA, GREEN1_MAC, green1));
    d.lookups
        .insert(key(GREEN, CA2), rewrite(GREEN2_PA, GREEN2_MAC, 0));
    d.rewrite_pas.insert(
        v4_mapped(GREEN1_PA),
        dedicated(GREEN, CA1, GREEN1_MAC, green1),
    );
    d.rewrite_pas
        .insert(v4_mapped(GREEN2_PA), dedicated(GREEN, CA2, GREEN2_MAC, 0));
    // A rewrite PA of another VSID, to prove sources are checked within the VSID.
    d.rewrite_pas
        .insert(v4_mapped(OTHER_PA), dedicated(7002, CA2, GREEN2_MAC, 0));
    Ok(d)
}

fn host(forwarding: bool) -> anyhow::Result<Host> {
    let ns = host_namespace(forwarding)?;
    ns.enter_current_thread()?;
    let pin = PathBuf::from(format!("/sys/fs/bpf/{}", ns.name));
    let mut dp = Datapath::load(&pin, 1024)?;
    let desired = host_maps(&ns)?;
    dp.sync(&desired)?;
    let (uplink_mac, red1, blue1, green1) = (
        ns.mac("uplink0")?,
        ns.ifindex("red1")?,
        ns.ifindex("blue1")?,
        ns.ifindex("green1")?,
    );
    Ok(Host {
        dp,
        ns,
        pin,
        uplink_mac,
        red1,
        blue1,
        green1,
        desired,
    })
}

impl Host {
    /// Points RED's record for 10.0.0.2 at another method, as a disagreeing host might.
    fn set_red2_method(&mut self, method: Method) -> anyhow::Result<()> {
        let key = LookupKey {
            vsid: RED,
            ca: v4_mapped(CA2),
        };
        self.desired
            .lookups
            .get_mut(&key)
            .context("RED-2 record")?
            .method = method as u8;
        self.dp.sync(&self.desired)?;
        Ok(())
    }

    fn counter(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self
            .dp
            .counters()?
            .into_iter()
            .find(|(c, _)| c.name() == name)
            .with_context(|| format!("counter {name}"))?
            .1)
    }

    /// Runs `prog`, and checks it returned `ret` and counted one `counter`.
    fn expect(
        &self,
        prog: &str,
        frame: &[u8],
        ifindex: Option<u32>,
        ret: u32,
        counter: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let before = self.counter(counter)?;
        let out = self.dp.test_run(prog, frame, ifindex, 1)?;
        ensure!(
            out.ret == ret,
            "{prog}: returned {}, expected {ret}",
            out.ret
        );
        let after = self.counter(counter)?;
        ensure!(
            after == before + 1,
            "{prog}: counter {counter} went {before} -> {after}, expected +1"
        );
        Ok(out.data)
    }
}

fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(40000, 7001);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build frame");
    out
}

/// Sets the IPv4 TOS byte of a frame and fixes its header checksum (etherparse computes it).
fn with_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
    let mut h = Ipv4HeaderSlice::from_slice(&frame[14..])
        .expect("ipv4")
        .to_header();
    h.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("dscp");
    h.ecn = etherparse::IpEcn::try_new(tos & 3).expect("ecn");
    h.header_checksum = h.calc_header_checksum();
    frame[14..34].copy_from_slice(&h.to_bytes());
    frame
}

/// The NVGRE frame RFC 7637 specifies around `inner`, built with etherparse.
fn nvgre(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    key: u32,
    dscp: u8,
    inner: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(
        u16::try_from(8 + inner.len()).expect("fits"),
        64,
        IpNumber(47),
        src,
        dst,
    )
    .expect("ipv4");
    ip.dont_fragment = true;
    ip.dscp = etherparse::IpDscp::try_new(dscp).expect("dscp");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&0x2000u16.to_be_bytes());
    out.extend_from_slice(&0x6558u16.to_be_bytes());
    out.extend_from_slice(&key.to_be_bytes());
    out.extend_from_slice(inner);
    out
}

fn udp_flow_id(src: [u8; 4], dst: [u8; 4]) -> u8 {
    flow_id_v4(src, dst, 17, (40000u32 << 16) | 0x1b59)
}

#[test]
fn encapsulation_is_byte_exact() -> anyhow::Result<()> {
    let h = host(true)?;
    // DSCP EF with ECN bits set: DSCP is copied to the outer header, ECN is not.
    let inner = with_tos(
        udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"hello nvgre"),
        (46 << 2) | 1,
    );
    let out = h.expect(
        FROM_VM,
        &inner,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_encap",
    )?;
    let key = (RED << 8) | u32::from(udp_flow_id(CA1, CA2));
    let expected = nvgre(
        h.uplink_mac,
        GATEWAY_MAC,
        LOCAL_PA,
        REMOTE_PA,
        key,
        46,
        &inner,
    );
    ensure!(
        out == expected,
        "encap differs:\n got {out:02x?}\nwant {expected:02x?}"
    );

    // BLUE's frame with the same addresses gets BLUE's VSID.
    let inner = udp_frame(BLUE1_MAC, BLUE2_MAC, CA1, CA2, b"hello blue");
    let out = h.expect(
        FROM_VM,
        &inner,
        Some(h.blue1),
        TC_ACT_REDIRECT,
        "vm_tx_encap",
    )?;
    let key = (BLUE << 8) | u32::from(udp_flow_id(CA1, CA2));
    ensure!(
        out == nvgre(
            h.uplink_mac,
            GATEWAY_MAC,
            LOCAL_PA,
            REMOTE_PA,
            key,
            0,
            &inner
        ),
        "BLUE encap differs: {out:02x?}"
    );
    Ok(())
}

#[test]
fn encapsulation_without_host_forwarding_leaves_l2_to_the_kernel() -> anyhow::Result<()> {
    // bpf_fib_lookup refuses when the host does not forward on the uplink; the frame is then
    // handed to bpf_redirect_neigh, which writes the Ethernet addresses itself.
    let h = host(false)?;
    let inner = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"x");
    let out = h.expect(
        FROM_VM,
        &inner,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_encap",
    )?;
    let key = (RED << 8) | u32::from(udp_flow_id(CA1, CA2));
    let expected = nvgre([0; 6], [0; 6], LOCAL_PA, REMOTE_PA, key, 0, &inner);
    ensure!(
        out[12..] == expected[12..],
        "encap differs beyond the MACs: {out:02x?}"
    );
    Ok(())
}

#[test]
fn flow_ids_spread_flows_and_stay_put_per_flow() -> anyhow::Result<()> {
    let h = host(true)?;
    let mut ids = std::collections::HashSet::new();
    for sport in 0..64u16 {
        let b = PacketBuilder::ethernet2(RED1_MAC, RED2_MAC)
            .ipv4(CA1, CA2, 64)
            .tcp(30000 + sport, 80, 1, 1000);
        let mut frame = Vec::new();
        b.write(&mut frame, b"")?;
        let a = h.dp.test_run(FROM_VM, &frame, Some(h.red1), 1)?;
        let b = h.dp.test_run(FROM_VM, &frame, Some(h.red1), 1)?;
        ensure!(a.data[41] == b.data[41], "one flow got two FlowIDs");
        ensure!(
            a.data[41] == flow_id_v4(CA1, CA2, 6, (u32::from(30000 + sport) << 16) | 0x50),
            "FlowID not the flow's hash"
        );
        ids.insert(a.data[41]);
    }
    ensure!(
        ids.len() >= 32,
        "64 flows got only {} distinct FlowIDs",
        ids.len()
    );
    Ok(())
}

#[test]
fn decapsulation_restores_the_frame_exactly() -> anyhow::Result<()> {
    let h = host(true)?;
    let inner = with_tos(udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"to red-1"), 0x2e);
    let frame = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        (RED << 8) | 0x5a,
        0,
        &inner,
    );
    let out = h.expect(UPLINK_XDP, &frame, None, XDP_PASS, "uplink_decap")?;
    // Output: the metadata naming the VM port, then the customer's frame unchanged.
    let mut expected = DeliverMeta::MAGIC.to_ne_bytes().to_vec();
    expected.extend_from_slice(&h.red1.to_ne_bytes());
    expected.extend_from_slice(&inner);
    ensure!(
        out == expected,
        "decap differs:\n got {out:02x?}\nwant {expected:02x?}"
    );

    // The same addresses in BLUE's VSID go to BLUE-1's port.
    let inner = udp_frame(BLUE2_MAC, BLUE1_MAC, CA2, CA1, b"to blue-1");
    let frame = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        BLUE << 8,
        0,
        &inner,
    );
    let out = h.expect(UPLINK_XDP, &frame, None, XDP_PASS, "uplink_decap")?;
    ensure!(
        out[4..8] == h.blue1.to_ne_bytes() && out[8..] == inner[..],
        "BLUE decap differs: {out:02x?}"
    );
    Ok(())
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one case per drop reason, in sequence"
)]
fn uplink_drops_bad_nvgre_with_its_reason_and_passes_the_rest_untouched() -> anyhow::Result<()> {
    let h = host(true)?;
    let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"payload");
    let ours = |key: u32| {
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            key,
            0,
            &to_red1,
        )
    };

    h.expect(
        UPLINK_XDP,
        &ours(7777 << 8),
        None,
        XDP_DROP,
        "drop_uplink_unknown_dst",
    )?;
    let unknown_ca = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        RED << 8,
        0,
        &udp_frame(RED2_MAC, RED1_MAC, CA2, [10, 0, 0, 99], b"x"),
    );
    h.expect(
        UPLINK_XDP,
        &unknown_ca,
        None,
        XDP_DROP,
        "drop_uplink_unknown_dst",
    )?;
    let remote_ca = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        RED << 8,
        0,
        &udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"x"),
    );
    h.expect(
        UPLINK_XDP,
        &remote_ca,
        None,
        XDP_DROP,
        "drop_uplink_not_local",
    )?;

    for (flags, what) in [
        (0xa000u16, "C bit"),
        (0x3000, "S bit"),
        (0x0000, "no K bit"),
        (0x2001, "version 1"),
    ] {
        let mut f = ours(RED << 8);
        f[34..36].copy_from_slice(&flags.to_be_bytes());
        h.expect(UPLINK_XDP, &f, None, XDP_DROP, "drop_uplink_gre_flags")
            .with_context(|| what)?;
    }
    let mut tagged = ours(RED << 8);
    tagged[54..56].copy_from_slice(&0x8100u16.to_be_bytes());
    h.expect(
        UPLINK_XDP,
        &tagged,
        None,
        XDP_DROP,
        "drop_uplink_inner_vlan",
    )?;
    for cut in [40, 50, 60] {
        h.expect(
            UPLINK_XDP,
            &ours(RED << 8)[..cut],
            None,
            XDP_DROP,
            "drop_uplink_malformed",
        )
        .with_context(|| format!("truncated to {cut}"))?;
    }

    // Not NVGRE for us: passed, bytes untouched.
    let mut other_pa = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        [198, 18, 0, 9],
        RED << 8,
        0,
        &to_red1,
    );
    let mut other_proto = ours(RED << 8);
    other_proto[36..38].copy_from_slice(&0x0800u16.to_be_bytes());
    let host_udp = udp_frame(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        b"host traffic",
    );
    let runt = ours(RED << 8)[..20].to_vec();
    for (frame, what) in [
        (&mut other_pa, "non-local PA"),
        (&mut other_proto, "GRE of another protocol"),
        (&mut host_udp.clone(), "host UDP"),
        (&mut runt.clone(), "runt"),
    ] {
        let out = h
            .expect(UPLINK_XDP, frame, None, XDP_PASS, "uplink_passed")
            .with_context(|| what)?;
        ensure!(out == *frame, "{what}: passed frame was modified");
    }
    // The uplink's TC program leaves frames without our metadata alone.
    let out = h.dp.test_run(UPLINK_TC, &host_udp, None, 1)?;
    ensure!(
        out.ret == TC_ACT_OK && out.data == host_udp,
        "uplink TC touched host traffic"
    );
    Ok(())
}

#[test]
fn vm_side_answers_arp_delivers_locally_and_drops_unknown() -> anyhow::Result<()> {
    let h = host(true)?;
    // ARP request from RED-1 for 10.0.0.2: answered with RED-2's MAC, back out of red1.
    let arp = {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&RED1_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&RED1_MAC);
        f.extend_from_slice(&CA1);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&CA2);
        f
    };
    let out = h.expect(
        FROM_VM,
        &arp,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_arp_replied",
    )?;
    let mut reply = Vec::new();
    reply.extend_from_slice(&RED1_MAC);
    reply.extend_from_slice(&RED2_MAC);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&RED2_MAC);
    reply.extend_from_slice(&CA2);
    reply.extend_from_slice(&RED1_MAC);
    reply.extend_from_slice(&CA1);
    ensure!(out == reply, "ARP reply differs: {out:02x?}");
    // BLUE-1 asking for the same address gets BLUE-2's MAC.
    let mut blue_arp = arp.clone();
    blue_arp[6..12].copy_from_slice(&BLUE1_MAC);
    blue_arp[22..28].copy_from_slice(&BLUE1_MAC);
    let out = h.expect(
        FROM_VM,
        &blue_arp,
        Some(h.blue1),
        TC_ACT_REDIRECT,
        "vm_arp_replied",
    )?;
    ensure!(
        out[22..28] == BLUE2_MAC,
        "BLUE got {:02x?} for 10.0.0.2",
        &out[22..28]
    );
    // ARP for an address nobody has in this VSID: dropped, nothing floods.
    let mut unknown = arp.clone();
    unknown[38..42].copy_from_slice(&[10, 0, 0, 77]);
    h.expect(FROM_VM, &unknown, Some(h.red1), TC_ACT_SHOT, "drop_vm_arp")?;

    // RED-1 to RED-3 on the same host: redirected, frame unchanged.
    let frame = udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, b"local");
    let out = h.expect(
        FROM_VM,
        &frame,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_local",
    )?;
    ensure!(out == frame, "local delivery modified the frame");
    // BLUE-1 to 10.0.0.3 exists only in RED: dropped as unknown, never crosses tenants.
    let frame = udp_frame(BLUE1_MAC, RED3_MAC, CA1, CA3, b"cross-tenant");
    h.expect(
        FROM_VM,
        &frame,
        Some(h.blue1),
        TC_ACT_SHOT,
        "drop_vm_unknown_dst",
    )?;
    // IPv6 and other non-IPv4 frames from a VM are dropped and counted.
    // (Long enough for BPF_PROG_TEST_RUN's own IPv6 header check.)
    let mut v6 = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[0; 64]);
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    h.expect(FROM_VM, &v6, Some(h.red1), TC_ACT_SHOT, "drop_vm_not_ip")?;
    // A frame from an interface that is not a VM port.
    let frame = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"x");
    h.expect(
        FROM_VM,
        &frame,
        Some(h.ns.ifindex("peer0")?),
        TC_ACT_SHOT,
        "drop_vm_unknown_port",
    )?;
    Ok(())
}

/// One packet of each kind a VM sends, built by etherparse with correct checksums.
fn green_packets(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let eth = || PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src, dst, 61);
    let mut tcp = Vec::new();
    eth()
        .tcp(40000, 80, 0x0102_0304, 4096)
        .ack(77)
        .write(&mut tcp, b"tcp payload")
        .expect("tcp");
    out.push(("tcp", tcp));
    let mut udp = Vec::new();
    eth()
        .udp(40000, 7001)
        .write(&mut udp, b"udp payload")
        .expect("udp");
    out.push(("udp", udp.clone()));
    // UDP without a checksum (0): it must stay 0.
    let mut udp0 = udp;
    udp0[40..42].copy_from_slice(&[0, 0]);
    out.push(("udp-zero-checksum", udp0));
    let mut icmp = Vec::new();
    eth()
        .icmpv4_echo_request(9, 1)
        .write(&mut icmp, b"ping payload")
        .expect("icmp");
    out.push(("icmp", icmp));
    out
}

#[test]
fn rewrite_out_is_byte_exact_with_checksums_computed_independently() -> anyhow::Result<()> {
    let h = host(true)?;
    let sent = green_packets(GREEN1_MAC, GREEN2_MAC, CA1, CA2);
    // What the wire must carry: the same packets built afresh by etherparse between the PAs.
    let wire = green_packets(h.uplink_mac, GREEN_GATEWAY_MAC, GREEN1_PA, GREEN2_PA);
    for ((kind, frame), (_, expected)) in sent.iter().zip(&wire) {
        let out = h
            .expect(
                FROM_VM,
                frame,
                Some(h.green1),
                TC_ACT_REDIRECT,
                "vm_tx_rewrite",
            )
            .with_context(|| *kind)?;
        ensure!(
            out == *expected,
            "{kind}: rewrite differs:\n got {out:02x?}\nwant {expected:02x?}"
        );
    }
    Ok(())
}

#[test]
fn rewrite_in_is_validated_in_xdp_and_described_for_tc() -> anyhow::Result<()> {
    let h = host(true)?;
    for (kind, frame) in green_packets(GREEN_GATEWAY_MAC, h.uplink_mac, GREEN2_PA, GREEN1_PA) {
        let res = h.dp.test_run(UPLINK_XDP, &frame, None, 1)?;
        ensure!(res.ret == XDP_PASS, "{kind}: XDP returned {}", res.ret);
        // Metadata for the TC program: port, customer addresses, the VMs' MACs; frame as sent.
        let meta = RestoreMeta {
            magic: RestoreMeta::MAGIC,
            ifindex: h.green1,
            src_ca: CA2,
            dst_ca: CA1,
            src_mac: GREEN2_MAC,
            dst_mac: GREEN1_MAC,
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(&meta.magic.to_ne_bytes());
        expected.extend_from_slice(&meta.ifindex.to_ne_bytes());
        expected.extend_from_slice(&meta.src_ca);
        expected.extend_from_slice(&meta.dst_ca);
        expected.extend_from_slice(&meta.src_mac);
        expected.extend_from_slice(&meta.dst_mac);
        expected.extend_from_slice(&frame);
        ensure!(res.data == expected, "{kind}: got {:02x?}", res.data);
    }
    // From a PA that is no rewrite record's, or one of another VSID: dropped and counted.
    for src in [[198, 18, 7, 7], OTHER_PA, REMOTE_PA] {
        let (_, frame) = green_packets(GREEN_GATEWAY_MAC, h.uplink_mac, src, GREEN1_PA).remove(1);
        h.expect(
            UPLINK_XDP,
            &frame,
            None,
            XDP_DROP,
            "drop_uplink_rewrite_unknown_src",
        )
        .with_context(|| format!("source {src:?}"))?;
    }
    Ok(())
}

#[test]
fn a_vm_without_a_rewrite_pa_cannot_send_by_rewrite() -> anyhow::Result<()> {
    let h = host(true)?;
    // RED-1 (encap, shared PA) addressing GREEN-2's record is refused with its own reason.
    // (The agent keeps one method per VSID; this guards the datapath against remote records
    // that disagree.)
    let mut h = h;
    let frame = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"x");
    let before = h.counter("drop_vm_no_rewrite_pa")?;
    h.set_red2_method(Method::Rewrite)?;
    let out = h.dp.test_run(FROM_VM, &frame, Some(h.red1), 1)?;
    ensure!(out.ret == TC_ACT_SHOT, "returned {}", out.ret);
    ensure!(
        h.counter("drop_vm_no_rewrite_pa")? == before + 1,
        "not counted"
    );
    Ok(())
}
