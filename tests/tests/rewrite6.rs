//! IP rewrite of IPv6 customer addresses over IPv6 PAs, program by program with
//! `BPF_PROG_TEST_RUN`: TEAL-1 (`fd00::1`, here, PA `2001:2::1:1`) and TEAL-2 (`fd00::2`,
//! remote, `2001:2::1:2`). Out: the VM's own PA and the destination's, the checksum valid;
//! only what rewrite restores exactly. In: restored on TC, handed from XDP to TC; from no other
//! than a rewrite PA of the VSID on another host; host traffic from a rewrite PA dropped,
//! neighbour discovery for an owned PA answered. Frames built with etherparse; checksums
//! verified by summing the pseudo-header and segment (RFC 8200 8.1). Each refusal beside a
//! frame that passes.
use anyhow::{Context as _, ensure};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket};
use nv_common::{
    DatapathConfig, DeliverMeta,
    program_names::{FROM_VM, UPLINK_TC, UPLINK_XDP},
};
use nv_tests::fixture::*;

fn teal_host() -> anyhow::Result<(Host, u32)> {
    let mut h = host(true)?;
    h.add_ipv6_underlay()?;
    let teal1 = h.add_ipv6_rewrite()?;
    Ok((h, teal1))
}

/// The IPv6 addresses of an Ethernet frame, and its upper-layer protocol.
fn ipv6_of(frame: &[u8]) -> anyhow::Result<([u8; 16], [u8; 16], u8)> {
    let p = SlicedPacket::from_ethernet(frame)?;
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        anyhow::bail!("not IPv6: {frame:02x?}");
    };
    let h = ip.header();
    Ok((h.source(), h.destination(), h.next_header().0))
}

/// Whether the upper-layer checksum of the IPv6 frame (no extension headers) is valid: the
/// pseudo-header and the whole segment sum to 0xffff.
fn checksum_ok(frame: &[u8]) -> bool {
    let (Some(ip), Some(segment)) = (frame.get(14..54), frame.get(54..)) else {
        return false;
    };
    let mut sum: u64 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            sum += hi | pair.get(1).map_or(0, |lo| u64::from(*lo));
        }
    };
    add(&ip[8..40]);
    add(&u32::try_from(segment.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, ip[6]]);
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

fn tcp6(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, 64)
        .tcp(40001, 80, 7, 1024);
    let mut out = Vec::new();
    b.write(&mut out, b"tcp over rewrite").expect("build TCP");
    out
}

fn echo6(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, 64)
        .icmpv6_echo_request(9, 1);
    let mut out = Vec::new();
    b.write(&mut out, b"ping6").expect("build echo");
    out
}

/// `frame` with an 8-byte hop-by-hop options header in front of its upper layer.
fn with_hop_by_hop(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    let next = out[20];
    out[20] = 0;
    let len = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&frame[54..]);
    out
}

#[test]
fn a_vm_s_ipv6_leaves_from_its_own_rewrite_pa_with_valid_checksums() -> anyhow::Result<()> {
    let (h, teal1) = teal_host()?;
    for (kind, frame) in [
        ("udp", udp6(TEAL1_MAC, TEAL2_MAC, CA6_1, CA6_2, (40000, 7))),
        ("tcp", tcp6(TEAL1_MAC, TEAL2_MAC, CA6_1, CA6_2)),
        ("icmpv6", echo6(TEAL1_MAC, TEAL2_MAC, CA6_1, CA6_2)),
    ] {
        let out = h.expect(
            FROM_VM,
            &frame,
            Some(teal1),
            TC_ACT_REDIRECT,
            "vm_tx_rewrite",
        )?;
        let (src, dst, _) = ipv6_of(&out)?;
        ensure!(
            src == LOCAL_RW6 && dst == REMOTE_RW6,
            "{kind}: rewritten to {src:02x?} -> {dst:02x?}"
        );
        ensure!(out.len() == frame.len(), "{kind}: size changed");
        ensure!(
            checksum_ok(&out),
            "{kind}: checksum not valid after rewrite"
        );
        ensure!(checksum_ok(&frame), "{kind}: the control frame's checksum");
    }
    // What rewrite could not restore exactly stays home, counted.
    let hbh = with_hop_by_hop(&udp6(TEAL1_MAC, TEAL2_MAC, CA6_1, CA6_2, (40000, 7)));
    h.expect(
        FROM_VM,
        &hbh,
        Some(teal1),
        TC_ACT_SHOT,
        "drop_vm_rewrite_ipv6",
    )?;
    Ok(())
}

/// A rewritten packet from `src` to `dst`, as the underlay brings it to `dst_mac`.
fn inbound(src: [u8; 16], dst: [u8; 16], dst_mac: [u8; 6]) -> Vec<u8> {
    udp6(GATEWAY_MAC, dst_mac, src, dst, (40000, 7))
}

#[test]
fn ipv6_rewrite_is_restored_for_its_vm_only_from_its_vsid_s_pas() -> anyhow::Result<()> {
    let (mut h, teal1) = teal_host()?;
    let mac = h.uplink_mac;
    // XDP hands the packet to TC whole, marked; TC restores it.
    let frame = inbound(REMOTE_RW6, LOCAL_RW6, mac);
    let out = h.dp.test_run(UPLINK_XDP, &frame, None, 1)?;
    ensure!(
        out.ret == XDP_PASS
            && out.data.get(..4) == Some(&DeliverMeta::CLASSIFY.to_ne_bytes()[..])
            && out.data.ends_with(&frame),
        "XDP: returned {} with {:02x?}",
        out.ret,
        out.data.get(..4)
    );
    h.set_flags(DatapathConfig::TC_DECAP)?;
    let out = h.expect(
        UPLINK_TC,
        &frame,
        None,
        TC_ACT_REDIRECT,
        "uplink_rewrite_delivered",
    )?;
    let (src, dst, _) = ipv6_of(&out)?;
    ensure!(
        src == CA6_2 && dst == CA6_1 && out[..6] == TEAL1_MAC && out[6..12] == TEAL2_MAC,
        "restored to {src:02x?} -> {dst:02x?}, MACs {:02x?}",
        &out[..12]
    );
    ensure!(checksum_ok(&out), "checksum not valid after restore");
    let trace = h.dp.test_run(UPLINK_TC, &frame, None, 1)?.redirect;
    ensure!(
        trace.is_some_and(|t| t.ifindex == teal1),
        "restored packet redirected as {trace:?}, TEAL-1 is {teal1}"
    );
    // From a rewrite PA of another VSID, from no rewrite PA, an underlay router's ICMPv6
    // about it, from a VM of this host, not to our MAC.
    let icmp = {
        let mut f = echo6(
            GATEWAY_MAC,
            mac,
            [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99],
            LOCAL_RW6,
        );
        f[54] = 1; // destination unreachable
        f
    };
    for (what, frame, counter) in [
        (
            "another VSID's PA",
            inbound(OTHER_RW6, LOCAL_RW6, mac),
            "drop_uplink_rewrite_unknown_src",
        ),
        (
            "no rewrite PA",
            inbound(REMOTE_PA6, LOCAL_RW6, mac),
            "drop_uplink_rewrite_unknown_src",
        ),
        (
            "an underlay router's ICMPv6",
            icmp,
            "drop_uplink_rewrite_icmp",
        ),
        (
            "this host's own VM",
            inbound(LOCAL_RW6, LOCAL_RW6, mac),
            "drop_uplink_own_source",
        ),
        (
            "another MAC",
            inbound(REMOTE_RW6, LOCAL_RW6, [2, 0, 0x5e, 0, 0x53, 1]),
            "drop_uplink_not_our_mac",
        ),
        (
            "the host, from a rewrite PA",
            inbound(REMOTE_RW6, LOCAL_PA6, mac),
            "drop_uplink_from_rewrite_pa",
        ),
    ] {
        h.expect(UPLINK_TC, &frame, None, TC_ACT_SHOT, counter)
            .with_context(|| what.to_owned())?;
    }
    Ok(())
}

/// From a rewrite PA: no router's message reaches a VM, and only an advertisement of that PA
/// itself (another host's datapath answering for it) reaches the host.
#[test]
fn from_a_rewrite_pa_no_router_talk_and_only_its_own_advertisement() -> anyhow::Result<()> {
    let (mut h, _) = teal_host()?;
    h.set_flags(DatapathConfig::TC_DECAP)?;
    let mac = h.uplink_mac;
    // A router's message by rewrite is no host's to send (a forger's).
    let mut ra = echo6(GATEWAY_MAC, mac, REMOTE_RW6, LOCAL_RW6);
    ra[54] = 134;
    h.expect(
        UPLINK_TC,
        &ra,
        None,
        TC_ACT_SHOT,
        "drop_uplink_router_guard",
    )?;
    // From a rewrite PA, neighbour discovery passes to the host only as another host's
    // datapath sends it: an advertisement of that PA itself.
    let mut na = solicitation(GATEWAY_MAC, REMOTE_RW6, REMOTE_RW6);
    na[54] = 136;
    let out = h.dp.test_run(UPLINK_TC, &na, None, 1)?;
    ensure!(
        out.ret == TC_ACT_OK && out.data == na,
        "a rewrite PA's advertisement of itself: {}",
        out.ret
    );
    let ns = solicitation(GATEWAY_MAC, REMOTE_RW6, LOCAL_PA6);
    h.expect(
        UPLINK_TC,
        &ns,
        None,
        TC_ACT_SHOT,
        "drop_uplink_from_rewrite_pa",
    )?;
    Ok(())
}

/// An outer IPv6 header naming IPv4 PAs (IPv4-mapped) is never NVGRE between them: RED-2's
/// record is behind the IPv4 PA 198.18.0.2; the same frame over real IPv4 is delivered.
#[test]
fn ipv4_mapped_outer_addresses_are_no_ipv4_pa() -> anyhow::Result<()> {
    let (h, _) = teal_host()?;
    let inner = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"mapped");
    let key = RED << 8;
    let mapped = nvgre6(
        GATEWAY_MAC,
        h.uplink_mac,
        nv_common::v4_mapped(REMOTE_PA),
        nv_common::v4_mapped(LOCAL_PA),
        key,
        &inner,
    );
    let out = h.dp.test_run(UPLINK_XDP, &mapped, None, 1)?;
    ensure!(
        out.ret == XDP_PASS && out.data == mapped,
        "NVGRE over IPv4-mapped IPv6 was taken: {} {:02x?}",
        out.ret,
        out.data.get(..4)
    );
    let real = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        key,
        0,
        &inner,
    );
    let out = h.dp.test_run(UPLINK_XDP, &real, None, 1)?;
    ensure!(
        out.data.get(..4) == Some(&DeliverMeta::MAGIC.to_ne_bytes()[..]),
        "control: the same over IPv4 was not delivered"
    );
    Ok(())
}

#[test]
fn the_uplink_answers_neighbour_discovery_for_an_owned_ipv6_pa_only() -> anyhow::Result<()> {
    let (mut h, _) = teal_host()?;
    h.set_flags(DatapathConfig::TC_DECAP)?;
    let ns = solicitation(GATEWAY_MAC, REMOTE_PA6, LOCAL_RW6);
    let out = h.expect(UPLINK_TC, &ns, None, TC_ACT_REDIRECT, "uplink_nd_replied")?;
    let (src, dst, next) = ipv6_of(&out)?;
    ensure!(
        src == LOCAL_RW6 && dst == REMOTE_PA6 && next == 58,
        "advertisement {src:02x?} -> {dst:02x?} ({next})"
    );
    ensure!(
        out[..6] == GATEWAY_MAC && out[6..12] == h.uplink_mac,
        "advertisement MACs {:02x?}",
        &out[..12]
    );
    ensure!(
        out.get(54) == Some(&136) && out.get(62..78) == Some(&LOCAL_RW6[..]),
        "not an advertisement for the owned PA: {out:02x?}"
    );
    ensure!(
        out.get(78..80) == Some(&[2, 1][..]) && out.get(80..86) == Some(&h.uplink_mac[..]),
        "the advertisement does not name the uplink's MAC"
    );
    ensure!(checksum_ok(&out), "advertisement checksum");
    // On XDP it goes to TC, marked.
    h.set_flags(0)?;
    let out = h.dp.test_run(UPLINK_XDP, &ns, None, 1)?;
    ensure!(
        out.ret == XDP_PASS && out.data.get(..4) == Some(&DeliverMeta::CLASSIFY.to_ne_bytes()[..]),
        "XDP did not hand the solicitation to TC"
    );
    // The host's own PA is the host's to answer; a guess at an unknown address nobody's.
    for target in [
        LOCAL_PA6,
        [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x77],
    ] {
        let ns = solicitation(GATEWAY_MAC, REMOTE_PA6, target);
        let out = h.dp.test_run(UPLINK_XDP, &ns, None, 1)?;
        ensure!(
            out.ret == XDP_PASS && out.data == ns,
            "a solicitation for {target:02x?} was touched"
        );
    }
    Ok(())
}
