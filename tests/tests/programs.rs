//! Program tests: each datapath program run with `BPF_PROG_TEST_RUN` on frames built with
//! etherparse, against maps filled as the agent fills them. Expected bytes are built
//! independently of the datapath (etherparse computes headers and checksums).
use anyhow::{Context as _, ensure};
use etherparse::PacketBuilder;
use nv_common::{
    DatapathConfig, DeliverMeta, Method, RedirectTrace, RestoreMeta,
    flow::flow_id_v4,
    program_names::{FROM_VM, UPLINK_TC, UPLINK_XDP},
};
use nv_tests::fixture::*;

#[test]
fn encapsulation_is_byte_exact() -> anyhow::Result<()> {
    let mut h = host(true)?;
    // DSCP EF with ECN bits set, as the tenant wrote them. The outer DSCP follows host policy
    // (default: zero; a fixed codepoint; the tenant's own only with `copy`); ECN never crosses.
    let inner = with_tos(
        udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"hello nvgre"),
        (46 << 2) | 1,
    );
    let key = (RED << 8) | u32::from(udp_flow_id(CA1, CA2));
    for (policy, outer_dscp) in [(0, 0), (10, 10), (DatapathConfig::DSCP_COPY, 46)] {
        h.desired.config.underlay_dscp = policy;
        h.dp.set_config(h.desired.config)?;
        let out = h.expect(
            FROM_VM,
            &inner,
            Some(h.red1),
            TC_ACT_REDIRECT,
            "vm_tx_encap",
        )?;
        let expected = nvgre(
            h.uplink_mac,
            GATEWAY_MAC,
            LOCAL_PA,
            REMOTE_PA,
            key,
            outer_dscp,
            &inner,
        );
        ensure!(
            out == expected,
            "encap (policy {policy}) differs:\n got {out:02x?}\nwant {expected:02x?}"
        );
    }
    h.desired.config.underlay_dscp = 0;
    h.dp.set_config(h.desired.config)?;

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

/// ICMP "fragmentation needed" for `offender` (a frame RED-1 sent to RED-2) naming `mtu`, as
/// etherparse builds it: from RED-2 (the address written to), quoting the first 68 bytes of
/// the IPv4 packet, TOS 0xc0 and no DF as Linux sends its errors.
fn frag_needed_answer(offender: &[u8], mtu: u16) -> anyhow::Result<Vec<u8>> {
    use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
    let quote = &offender[14..14 + 68];
    let builder = PacketBuilder::ethernet2(RED2_MAC, RED1_MAC)
        .ipv4(CA2, CA1, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        ));
    let mut out = Vec::new();
    builder.write(&mut out, quote)?;
    let (mut ip, _) = etherparse::Ipv4Header::from_slice(&out[14..])?;
    ip.dscp = etherparse::IpDscp::try_new(0x30)?;
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let mut header = Vec::new();
    ip.write(&mut header)?;
    out[14..34].copy_from_slice(&header);
    Ok(out)
}

#[test]
fn frames_too_big_for_the_uplink_are_answered_with_frag_needed_with_or_without_a_cached_next_hop()
-> anyhow::Result<()> {
    let h = host(true)?;
    // The uplink's MTU is 1500. A 1500-byte IPv4 packet is 1542 bytes once encapsulated; one
    // of 1458 bytes is exactly 1500.
    let big = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[7u8; 1472]);
    let fits = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[7u8; 1430]);
    let answer = frag_needed_answer(&big, 1458)?;
    // Nothing cached yet: answered with the MTU the VM must use, back out of its own port.
    let out = h.expect(
        FROM_VM,
        &big,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_frag_needed",
    )?;
    ensure!(
        out == answer,
        "ICMP answer differs:\n got {out:02x?}\nwant {answer:02x?}"
    );
    // The largest frame that fits goes out, and caches the next hop and the route's MTU ...
    let out = h.expect(FROM_VM, &fits, Some(h.red1), TC_ACT_REDIRECT, "vm_tx_encap")?;
    ensure!(
        out.len() == 14 + 1500,
        "encapsulated to {} bytes",
        out.len()
    );
    h.expect(FROM_VM, &fits, Some(h.red1), TC_ACT_REDIRECT, "vm_tx_encap")?;
    // ... which must not let a bigger one through.
    let out = h.expect(
        FROM_VM,
        &big,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_frag_needed",
    )?;
    ensure!(out == answer, "second ICMP answer differs: {out:02x?}");
    // DF clear: nv never fragments, so the same answer (a Linux sender then fragments).
    let mut no_df = big.clone();
    no_df[20] &= !0x40;
    let (mut ip, _) = etherparse::Ipv4Header::from_slice(&no_df[14..])?;
    ip.header_checksum = ip.calc_header_checksum();
    let mut header = Vec::new();
    ip.write(&mut header)?;
    no_df[14..34].copy_from_slice(&header);
    let out = h.expect(
        FROM_VM,
        &no_df,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_frag_needed",
    )?;
    ensure!(
        out == frag_needed_answer(&no_df, 1458)?,
        "DF-clear answer differs"
    );
    Ok(())
}

#[test]
fn frag_needed_follows_the_agents_uplink_mtu_and_never_answers_an_error() -> anyhow::Result<()> {
    let mut h = host(true)?;
    // The agent says the uplink's MTU is 1400: a 1400-byte packet no longer fits.
    h.desired.config.uplink_mtu = 1400;
    h.dp.set_config(h.desired.config)?;
    let big = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[7u8; 1400 - 28]);
    let out = h.expect(
        FROM_VM,
        &big,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_frag_needed",
    )?;
    ensure!(out == frag_needed_answer(&big, 1358)?, "answer differs");
    // An oversize ICMP error is not answered with another one (RFC 1122): dropped, counted.
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(RED1_MAC, RED2_MAC)
        .ipv4(CA1, CA2, 64)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut frame, &[0u8; 1400])?;
    h.expect(
        FROM_VM,
        &frame,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_too_big",
    )?;
    // An echo request is answered.
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(RED1_MAC, RED2_MAC)
        .ipv4(CA1, CA2, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, &[0u8; 1400])?;
    h.expect(
        FROM_VM,
        &ping,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_frag_needed",
    )?;
    Ok(())
}

#[test]
fn frag_needed_answers_are_rate_limited_and_the_rest_counted() -> anyhow::Result<()> {
    let h = host(true)?;
    // One CPU, so one token bucket: at most its burst plus what it earns meanwhile.
    pin_to_one_cpu()?;
    let big = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[7u8; 1472]);
    let (answered_before, dropped_before) = (
        h.counter("vm_icmp_frag_needed")?,
        h.counter("drop_vm_too_big")?,
    );
    let start = std::time::Instant::now();
    let sent = 400u64;
    for _ in 0..sent {
        let out = h.dp.test_run(FROM_VM, &big, Some(h.red1), 1)?;
        ensure!(
            out.ret == TC_ACT_REDIRECT || out.ret == TC_ACT_SHOT,
            "verdict {}",
            out.ret
        );
    }
    let elapsed_ms = u64::try_from(start.elapsed().as_millis())?;
    let answered = h.counter("vm_icmp_frag_needed")? - answered_before;
    let dropped = h.counter("drop_vm_too_big")? - dropped_before;
    ensure!(
        answered + dropped == sent,
        "{answered} answered + {dropped} dropped != {sent}"
    );
    let most =
        nv_common::IcmpBucket::BURST + (elapsed_ms + 1) * nv_common::IcmpBucket::PER_SEC / 1000;
    ensure!(
        (nv_common::IcmpBucket::BURST..=most).contains(&answered),
        "{answered} answers in {elapsed_ms} ms: the bucket allows {} to {most}",
        nv_common::IcmpBucket::BURST
    );
    // RED-1 spent its budget, not BLUE-1's: each VM port has its own. (With one bucket for
    // all, these would find it empty, earning one answer a millisecond.)
    let blue_big = udp_frame(BLUE1_MAC, BLUE2_MAC, CA1, CA2, &[7u8; 1472]);
    for i in 0..5 {
        let out = h.dp.test_run(FROM_VM, &blue_big, Some(h.blue1), 1)?;
        ensure!(
            out.ret == TC_ACT_REDIRECT,
            "BLUE-1's oversize packet {i} was not answered (verdict {}): RED-1 spent its budget",
            out.ret
        );
    }
    Ok(())
}

/// Keeps the calling thread on the CPU it is on (per-CPU maps then behave as one).
fn pin_to_one_cpu() -> anyhow::Result<()> {
    // SAFETY: plain syscalls on the calling thread with a zeroed, then filled, CPU set.
    unsafe {
        let cpu = libc::sched_getcpu();
        ensure!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(usize::try_from(cpu)?, &mut set);
        ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[test]
fn delivery_checks_the_port_is_the_vms_and_running() -> anyhow::Result<()> {
    let mut h = host(true)?;
    let local = udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, b"to red-3");
    let inner = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"to red-1");
    let decap = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        RED << 8,
        0,
        &inner,
    );
    let red3 = h.ns.ifindex("red3")?;
    let run = |h: &Host, reason: &str| -> anyhow::Result<()> {
        let ret = if reason.starts_with("drop") {
            TC_ACT_SHOT
        } else {
            TC_ACT_REDIRECT
        };
        h.expect(
            FROM_VM,
            &local,
            Some(h.red1),
            ret,
            if ret == TC_ACT_SHOT {
                reason
            } else {
                "vm_tx_local"
            },
        )?;
        let uplink = h.ns.ifindex("uplink0")?;
        h.expect(
            UPLINK_TC,
            &decap,
            Some(uplink),
            ret,
            if ret == TC_ACT_SHOT {
                reason
            } else {
                "uplink_delivered"
            },
        )?;
        Ok(())
    };
    h.desired.config.flags |= DatapathConfig::TC_DECAP;
    h.dp.set_config(h.desired.config)?;
    // Both ports up and theirs: delivered, counted as such.
    run(&h, "delivered")?;
    // Down (a tap no QEMU holds, a veth whose VM end is down): dropped with that reason.
    for (ifindex, ca) in [(red3, CA3), (h.red1, CA1)] {
        let mut p = h.desired.ports[&ifindex];
        assert_eq!(nv_common::v4_mapped(ca), p.ca);
        p.flags |= nv_common::PortInfo::DOWN;
        h.desired.ports.insert(ifindex, p);
    }
    h.dp.sync(&h.desired)?;
    run(&h, "drop_port_down")?;
    // Gone (no port entry under the ifindex the record names, as while a port is re-created):
    // dropped as such, not counted delivered.
    h.desired.ports.remove(&red3);
    let red1_port = h.desired.ports.remove(&h.red1).context("red1 port")?;
    h.dp.sync(&h.desired)?;
    h.dp.put_port(
        h.red1,
        &nv_common::PortInfo {
            flags: 0,
            ..red1_port
        },
    )?;
    // (RED-1 itself must still send: its own port entry is back.)
    h.expect(FROM_VM, &local, Some(h.red1), TC_ACT_SHOT, "drop_port_gone")?;
    // The ifindex now belongs to another VM (BLUE-1's identity under RED-1's ifindex): gone.
    h.dp.put_port(
        h.red1,
        &nv_common::PortInfo {
            vsid: BLUE,
            mac: BLUE1_MAC,
            flags: 0,
            ..red1_port
        },
    )?;
    let uplink = h.ns.ifindex("uplink0")?;
    h.expect(
        UPLINK_TC,
        &decap,
        Some(uplink),
        TC_ACT_SHOT,
        "drop_port_gone",
    )?;
    // A record whose port is missing points at IFINDEX_GONE.
    let mut missing = h.desired.lookups[&nv_common::LookupKey { vsid: RED, ca: CA1 }];
    missing.ifindex = nv_common::IFINDEX_GONE;
    h.desired
        .lookups
        .insert(nv_common::LookupKey { vsid: RED, ca: CA1 }, missing);
    h.desired.ports.insert(h.red1, red1_port);
    h.dp.sync(&h.desired)?;
    h.expect(
        UPLINK_TC,
        &decap,
        Some(uplink),
        TC_ACT_SHOT,
        "drop_port_gone",
    )?;
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
    // The refusal is remembered per CPU (not asked for with every frame): the frames after
    // the first still go to the kernel's hop, never to a cached neighbour of none.
    let uplink = h.ns.ifindex("uplink0")?;
    for n in 0..3 {
        let run = h.dp.test_run(FROM_VM, &inner, Some(h.red1), 1)?;
        ensure!(
            run.redirect
                == Some(RedirectTrace {
                    ifindex: uplink,
                    how: RedirectTrace::NEIGH,
                }),
            "frame {n} after the first redirected as {:?}",
            run.redirect
        );
        ensure!(
            run.data[12..] == expected[12..],
            "frame {n} after the first: {:02x?}",
            run.data
        );
    }
    Ok(())
}

#[test]
fn without_host_forwarding_the_agents_underlay_hop_is_used_while_it_is_there() -> anyhow::Result<()>
{
    // The agent's hop for the remote PA (its route and neighbour, resolved over netlink): the
    // frame goes straight out of the uplink with the hop's MACs, not to the kernel's routing.
    let mut h = host(false)?;
    let uplink = h.ns.ifindex("uplink0")?;
    let dmac = [0x02, 0, 0, 0, 0x99, 0x01];
    let hop = nv_common::UnderlayHop { dmac, _pad: [0; 2] };
    let pa = u32::from_ne_bytes(REMOTE_PA);
    let hops = std::collections::HashMap::from([(pa, hop)]);
    h.dp.set_underlay_hops(&hops, u64::MAX)?;
    let inner = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"x");
    let key = (RED << 8) | u32::from(udp_flow_id(CA1, CA2));
    let expected = nvgre(h.uplink_mac, dmac, LOCAL_PA, REMOTE_PA, key, 0, &inner);
    for n in 0..4 {
        let run = h.dp.test_run(FROM_VM, &inner, Some(h.red1), 1)?;
        ensure!(
            run.redirect
                == Some(RedirectTrace {
                    ifindex: uplink,
                    how: RedirectTrace::EGRESS,
                })
                && run.data == expected,
            "frame {n} with the agent's hop: {:?}, {:02x?}",
            run.redirect,
            run.data
        );
    }
    // Taken away (its neighbour went), or left behind by an agent that no longer renews the
    // hops: once this CPU's cache of it has expired (50 jiffies), the kernel routes the frames
    // again.
    // (1 s: 50 jiffies at HZ 100 are half a second.)
    for (why, then, alive) in [
        ("taken away", std::collections::HashMap::new(), u64::MAX),
        ("run out", hops.clone(), 1),
    ] {
        h.dp.set_underlay_hops(&hops, u64::MAX)?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let run = h.dp.test_run(FROM_VM, &inner, Some(h.red1), 1)?;
        ensure!(
            run.redirect.is_some_and(|r| r.how == RedirectTrace::EGRESS),
            "with the hop again: {:?}",
            run.redirect
        );
        h.dp.set_underlay_hops(&then, alive)?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let run = h.dp.test_run(FROM_VM, &inner, Some(h.red1), 1)?;
        ensure!(
            run.redirect
                == Some(RedirectTrace {
                    ifindex: uplink,
                    how: RedirectTrace::NEIGH,
                }),
            "with the hop {why}: {:?}",
            run.redirect
        );
    }
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
    expected.extend_from_slice(&RED.to_ne_bytes());
    expected.extend_from_slice(&CA1);
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
        out[4..8] == h.blue1.to_ne_bytes() && out[16..] == inner[..],
        "BLUE decap differs: {out:02x?}"
    );
    Ok(())
}

/// Recomputes the checksum of the 20-byte IPv4 header at offset 14, whatever the header says
/// (etherparse refuses to parse some of the broken ones).
fn reset_ipv4_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let mut sum: u32 = frame[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let csum = !(sum as u16);
    frame[24..26].copy_from_slice(&csum.to_be_bytes());
}

#[test]
fn vlan_tags_still_in_a_vms_frame_are_refused() -> anyhow::Result<()> {
    // BPF_PROG_TEST_RUN leaves tags in the frame (the kernel's receive path would have moved
    // the first out): 802.1Q, 802.1ad, stacked.
    let h = host(true)?;
    let frame = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"tagged");
    for tags in [
        &[0x81u8, 0x00, 0x00, 0x64][..],
        &[0x88, 0xa8, 0x00, 0xc8, 0x81, 0x00, 0x00, 0x64],
        &[0x81, 0x00, 0x01, 0x2c, 0x81, 0x00, 0x00, 0x64],
    ] {
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(tags);
        tagged.extend_from_slice(&frame[12..]);
        h.expect(FROM_VM, &tagged, Some(h.red1), TC_ACT_SHOT, "drop_vm_vlan")
            .with_context(|| format!("tags {tags:02x?}"))?;
    }
    // The positive control: untagged, it is sent.
    h.expect(
        FROM_VM,
        &frame,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_encap",
    )?;
    Ok(())
}

#[test]
fn the_underlay_gets_no_more_trust_than_it_must() -> anyhow::Result<()> {
    let mut h = host(true)?;
    let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"payload");
    let nvgre_to = |dst_mac: [u8; 6], inner: &[u8]| {
        nvgre(
            GATEWAY_MAC,
            dst_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            inner,
        )
    };
    // A bad inner IPv4 header: checksum, version, header length, total length; each of the
    // last three with a good checksum, so each check is met on its own.
    let mut bad_csum = to_red1.clone();
    bad_csum[24] ^= 0xff;
    let mut bad_version = to_red1.clone();
    bad_version[14] = 0x65;
    let mut bad_ihl = to_red1.clone();
    bad_ihl[14] = 0x44;
    let mut bad_len = to_red1.clone();
    bad_len[16..18].copy_from_slice(&[0, 12]);
    for frame in [&mut bad_version, &mut bad_ihl, &mut bad_len] {
        reset_ipv4_checksum(frame);
    }
    // A first fragment (MF set): the encapsulator never fragments.
    let mut outer_fragment = nvgre_to(h.uplink_mac, &to_red1);
    outer_fragment[20] |= 0x20;
    reset_ipv4_checksum(&mut outer_fragment);
    // The outer IPv4 length does not even hold GRE and the inner headers.
    let mut short_outer = nvgre_to(h.uplink_mac, &to_red1);
    short_outer[16..18].copy_from_slice(&[0, 40]);
    short_outer[24..26].copy_from_slice(&[0, 0]);
    let outer = etherparse::Ipv4HeaderSlice::from_slice(&short_outer[14..])?.to_header();
    short_outer[24..26].copy_from_slice(&outer.calc_header_checksum().to_be_bytes());
    let cases = [
        (
            "broadcast",
            nvgre_to([0xff; 6], &to_red1),
            "drop_uplink_not_our_mac",
        ),
        (
            "another host's MAC",
            nvgre_to(GATEWAY_MAC, &to_red1),
            "drop_uplink_not_our_mac",
        ),
        (
            "inner checksum",
            nvgre_to(h.uplink_mac, &bad_csum),
            "drop_uplink_inner_malformed",
        ),
        (
            "inner version",
            nvgre_to(h.uplink_mac, &bad_version),
            "drop_uplink_inner_malformed",
        ),
        (
            "inner IHL",
            nvgre_to(h.uplink_mac, &bad_ihl),
            "drop_uplink_inner_malformed",
        ),
        (
            "inner length",
            nvgre_to(h.uplink_mac, &bad_len),
            "drop_uplink_inner_malformed",
        ),
        ("outer length", short_outer, "drop_uplink_malformed"),
        ("outer fragment", outer_fragment, "drop_uplink_fragment"),
    ];
    for (hook, drop) in [(UPLINK_XDP, XDP_DROP), (UPLINK_TC, TC_ACT_SHOT)] {
        if hook == UPLINK_TC {
            h.set_flags(DatapathConfig::TC_DECAP)?;
        }
        let uplink = if hook == UPLINK_TC {
            Some(h.ns.ifindex("uplink0")?)
        } else {
            None
        };
        for (what, frame, reason) in &cases {
            h.expect(hook, frame, uplink, drop, reason)
                .with_context(|| format!("{hook}: {what}"))?;
        }
        // The positive control: the same frame, well formed and to our MAC, is taken.
        let ok = nvgre_to(h.uplink_mac, &to_red1);
        let ret = h.dp.test_run(hook, &ok, uplink, 1)?.ret;
        ensure!(ret != drop, "{hook}: the well-formed frame was dropped");
    }
    // An underlay router's ICMP error about a packet from GREEN-1's rewrite PA: its own reason,
    // not spoofing, and never passed up.
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(GREEN_GATEWAY_MAC, h.uplink_mac)
        .ipv4([198, 18, 0, 254], GREEN1_PA, 64)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut icmp, &[0u8; 28])?;
    h.set_flags(0)?;
    h.expect(
        UPLINK_XDP,
        &icmp,
        None,
        XDP_DROP,
        "drop_uplink_rewrite_icmp",
    )?;
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
        "drop_uplink_vsid_not_hosted",
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
    // Malformed NVGRE is judged only when it is addressed to one of our PAs.
    let mut bad_flags_other_pa = other_pa.clone();
    bad_flags_other_pa[34..36].copy_from_slice(&0xa000u16.to_be_bytes());
    // Host traffic to an address that shares the rewrite-PA filter's bit with GREEN-1's PA:
    // the filter sends it to the map, which does not know it.
    let slot = DatapathConfig::rewrite_filter_slot(GREEN1_PA);
    let twin = (0..=u16::MAX)
        .map(|i| {
            let [a, b] = i.to_be_bytes();
            [198, 19, a, b]
        })
        .find(|a| DatapathConfig::rewrite_filter_slot(*a) == slot)
        .context("no address shares GREEN-1's filter bit")?;
    let mut to_twin = udp_frame(GATEWAY_MAC, h.uplink_mac, REMOTE_PA, twin, b"host traffic");
    for (frame, what) in [
        (&mut other_pa, "non-local PA"),
        (&mut bad_flags_other_pa, "bad GRE flags to a non-local PA"),
        (&mut other_proto, "GRE of another protocol"),
        (&mut host_udp.clone(), "host UDP"),
        (&mut to_twin, "host UDP through the filter's false positive"),
        (&mut runt.clone(), "runt"),
    ] {
        let out = h.dp.test_run(UPLINK_XDP, frame, None, 1)?;
        ensure!(out.ret == XDP_PASS, "{what}: returned {}", out.ret);
        ensure!(out.data == *frame, "{what}: passed frame was modified");
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
    let arp = arp_frame(RED1_MAC, 1, RED1_MAC, CA1, CA2);
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
    // An IPv4 packet labelled IPv6 is malformed; frames of other protocols are not IP.
    // (Long enough for BPF_PROG_TEST_RUN's own IPv6 header check.)
    let mut v6 = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[0; 64]);
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    h.expect(FROM_VM, &v6, Some(h.red1), TC_ACT_SHOT, "drop_vm_malformed")?;
    let mut other = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[0; 64]);
    other[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    h.expect(FROM_VM, &other, Some(h.red1), TC_ACT_SHOT, "drop_vm_not_ip")?;
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
fn rewrite_puts_the_host_dscp_on_the_tenants_header_and_keeps_its_ecn() -> anyhow::Result<()> {
    let mut h = host(true)?;
    for (policy, dscp) in [(0u32, 0u8), (10, 10), (DatapathConfig::DSCP_COPY, 46)] {
        h.desired.config.underlay_dscp = policy;
        h.dp.set_config(h.desired.config)?;
        let sent = green_packets(GREEN1_MAC, GREEN2_MAC, CA1, CA2);
        let wire = green_packets(h.uplink_mac, GREEN_GATEWAY_MAC, GREEN1_PA, GREEN2_PA);
        for ((kind, frame), (_, expected)) in sent.iter().zip(&wire) {
            let frame = with_tos(frame.clone(), (46 << 2) | 2);
            let expected = with_tos(expected.clone(), (dscp << 2) | 2);
            let out = h
                .expect(
                    FROM_VM,
                    &frame,
                    Some(h.green1),
                    TC_ACT_REDIRECT,
                    "vm_tx_rewrite",
                )
                .with_context(|| format!("{kind}, policy {policy}"))?;
            ensure!(
                out == expected,
                "{kind}, policy {policy}: rewrite differs:\n got {out:02x?}\nwant {expected:02x?}"
            );
        }
    }
    Ok(())
}

#[test]
fn ip_options_never_cross_the_underlay_by_rewrite() -> anyhow::Result<()> {
    let h = host(true)?;
    for (kind, frame) in green_packets(GREEN1_MAC, GREEN2_MAC, CA1, CA2) {
        // The same packet with four bytes of options (NOP, NOP, NOP, end): IHL 6.
        let mut with = frame[..34].to_vec();
        with.extend_from_slice(&[1, 1, 1, 0]);
        with.extend_from_slice(&frame[34..]);
        with[14] = 0x46;
        let len = u16::from_be_bytes([with[16], with[17]]) + 4;
        with[16..18].copy_from_slice(&len.to_be_bytes());
        with[24..26].copy_from_slice(&[0, 0]);
        let csum = etherparse::Ipv4HeaderSlice::from_slice(&with[14..])?
            .to_header()
            .calc_header_checksum();
        with[24..26].copy_from_slice(&csum.to_be_bytes());
        h.expect(
            FROM_VM,
            &with,
            Some(h.green1),
            TC_ACT_SHOT,
            "drop_vm_ip_options",
        )
        .with_context(|| kind)?;
        // The positive control: without options it is rewritten and sent.
        h.expect(
            FROM_VM,
            &frame,
            Some(h.green1),
            TC_ACT_REDIRECT,
            "vm_tx_rewrite",
        )
        .with_context(|| kind)?;
    }
    // By NVGRE, options ride inside the customer's packet, untouched.
    let mut with = udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"opts");
    with.splice(34..34, [1, 1, 1, 0]);
    with[14] = 0x46;
    let len = u16::from_be_bytes([with[16], with[17]]) + 4;
    with[16..18].copy_from_slice(&len.to_be_bytes());
    let out = h.expect(FROM_VM, &with, Some(h.red1), TC_ACT_REDIRECT, "vm_tx_encap")?;
    ensure!(out[42..] == with[..], "the encapsulated frame differs");
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
            vsid: GREEN,
            src_ca: CA2,
            dst_ca: CA1,
            src_mac: GREEN2_MAC,
            dst_mac: GREEN1_MAC,
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(&meta.magic.to_ne_bytes());
        expected.extend_from_slice(&meta.ifindex.to_ne_bytes());
        expected.extend_from_slice(&meta.vsid.to_ne_bytes());
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

#[test]
fn tc_decapsulation_restores_the_frame_exactly_and_drops_like_xdp() -> anyhow::Result<()> {
    let mut h = host(true)?;
    h.set_flags(DatapathConfig::TC_DECAP)?;
    let inner = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"to red-1 via tc");
    let frame = nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        (RED << 8) | 7,
        0,
        &inner,
    );
    let out = h.expect(UPLINK_TC, &frame, None, TC_ACT_REDIRECT, "uplink_decap")?;
    ensure!(
        out == inner,
        "TC decap differs:\n got {out:02x?}\nwant {inner:02x?}"
    );
    // IP rewrite restored on TC: the VM gets the packet GREEN-2 sent, addresses and MACs back.
    for (kind, frame) in green_packets(GREEN_GATEWAY_MAC, h.uplink_mac, GREEN2_PA, GREEN1_PA) {
        let out = h
            .expect(
                UPLINK_TC,
                &frame,
                None,
                TC_ACT_REDIRECT,
                "uplink_rewrite_delivered",
            )
            .with_context(|| kind)?;
        let (_, sent) = green_packets(GREEN2_MAC, GREEN1_MAC, CA2, CA1)
            .into_iter()
            .find(|(k, _)| *k == kind)
            .context("same kind")?;
        ensure!(
            out == sent,
            "{kind}: restore differs:\n got {out:02x?}\nwant {sent:02x?}"
        );
    }
    // Bad NVGRE is dropped with the same reasons as on XDP; host traffic passes untouched.
    h.expect(
        UPLINK_TC,
        &nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            7777 << 8,
            0,
            &inner,
        ),
        None,
        TC_ACT_SHOT,
        "drop_uplink_vsid_not_hosted",
    )?;
    let mut flags = frame.clone();
    flags[34..36].copy_from_slice(&0xa000u16.to_be_bytes());
    h.expect(
        UPLINK_TC,
        &flags,
        None,
        TC_ACT_SHOT,
        "drop_uplink_gre_flags",
    )?;
    let host_udp = udp_frame(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        b"host traffic",
    );
    let out = h.dp.test_run(UPLINK_TC, &host_udp, None, 1)?;
    ensure!(
        out.ret == TC_ACT_OK && out.data == host_udp,
        "TC touched host traffic"
    );
    Ok(())
}

#[test]
fn a_vm_speaks_only_with_its_own_identity() -> anyhow::Result<()> {
    let h = host(true)?;
    // From RED-1's port: another VM's MAC, or its own MAC with another address.
    let spoofed_mac = udp_frame(RED3_MAC, RED2_MAC, CA1, CA2, b"x");
    h.expect(
        FROM_VM,
        &spoofed_mac,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_mac",
    )?;
    let spoofed_ip = udp_frame(RED1_MAC, RED2_MAC, CA3, CA2, b"x");
    h.expect(
        FROM_VM,
        &spoofed_ip,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_ip",
    )?;
    // ARP poisoning: RED-1 claims 10.0.0.3 (RED-3's address), or speaks with RED-3's MAC.
    let arp = |sha, spa, tpa| arp_frame(RED1_MAC, 1, sha, spa, tpa);
    h.expect(
        FROM_VM,
        &arp(RED1_MAC, CA3, CA2),
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_arp",
    )?;
    h.expect(
        FROM_VM,
        &arp(RED3_MAC, CA1, CA2),
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_arp",
    )?;
    // Gratuitous ARP for its own address changes nothing and gets no answer.
    h.expect(
        FROM_VM,
        &arp(RED1_MAC, CA1, CA1),
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_arp",
    )?;
    // An address probe (sender 0.0.0.0) for another VM's address is answered.
    h.expect(
        FROM_VM,
        &arp(RED1_MAC, [0; 4], CA2),
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_arp_replied",
    )?;
    // Aiming at the host or the underlay: no record, nothing leaves.
    for dst in [LOCAL_PA, REMOTE_PA, [10, 0, 0, 254]] {
        let frame = udp_frame(RED1_MAC, RED2_MAC, CA1, dst, b"x");
        h.expect(
            FROM_VM,
            &frame,
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_unknown_dst",
        )
        .with_context(|| format!("to {dst:?}"))?;
    }
    Ok(())
}

#[test]
fn the_underlay_cannot_speak_for_a_tenant_it_does_not_host() -> anyhow::Result<()> {
    let mut h = host(true)?;
    for flags in [0, DatapathConfig::TC_DECAP] {
        h.set_flags(flags)?;
        let (program, drop) = if flags & DatapathConfig::TC_DECAP == 0 {
            (UPLINK_XDP, XDP_DROP)
        } else {
            (UPLINK_TC, TC_ACT_SHOT)
        };
        let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"x");
        // A valid VSID and inner frame, from a PA that is not RED-2's.
        let unknown_pa = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            [198, 18, 9, 9],
            LOCAL_PA,
            RED << 8,
            0,
            &to_red1,
        );
        h.expect(program, &unknown_pa, None, drop, "drop_uplink_spoofed_pa")?;
        // From RED-2's PA, but with an inner source that is no CA of RED.
        let stranger = udp_frame(RED2_MAC, RED1_MAC, [10, 0, 0, 66], CA1, b"x");
        let forged = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &stranger,
        );
        h.expect(program, &forged, None, drop, "drop_uplink_spoofed_pa")?;
        // RED-2's addresses from the router's MAC: RED is in no routing domain here.
        let routed = udp_frame(ROUTER_MAC, RED1_MAC, CA2, CA1, b"x");
        let forged = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &routed,
        );
        h.expect(program, &forged, None, drop, "drop_uplink_spoofed_mac")?;
        // RED-2's addresses with BLUE-2's MAC.
        let wrong_mac = udp_frame(BLUE2_MAC, RED1_MAC, CA2, CA1, b"x");
        let forged = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &wrong_mac,
        );
        h.expect(program, &forged, None, drop, "drop_uplink_spoofed_mac")?;
        // Another tenant's VSID aimed at RED-1's address reaches BLUE-1, never RED-1, and only
        // with BLUE-2's identity; RED-2's MAC under BLUE's VSID is refused.
        let under_blue = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            BLUE << 8,
            0,
            &to_red1,
        );
        h.expect(program, &under_blue, None, drop, "drop_uplink_spoofed_mac")?;
    }
    Ok(())
}

/// The uplink's terms (issue 21): NVGRE only to the PA its destination's record names, from
/// no VM of this host; rewrite only to our MAC; nothing tagged; nothing to or from a rewrite
/// PA but a local VM's rewrite traffic; ARP for the datapath's own rewrite PAs answered by
/// it. Each refusal beside the same frame, mended, that passes.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one case per check, each with its control"
)]
fn the_uplink_takes_tenant_traffic_only_on_its_terms() -> anyhow::Result<()> {
    let mut h = host(true)?;
    let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"payload");
    let red3_to_red1 = udp_frame(RED3_MAC, RED1_MAC, CA3, CA1, b"payload");
    let green = |src_mac, dst_mac, src, dst| {
        green_packets(src_mac, dst_mac, src, dst)
            .into_iter()
            .nth(1)
            .map(|(_, f)| f)
            .expect("a UDP packet")
    };
    for flags in [0, DatapathConfig::TC_DECAP] {
        h.set_flags(flags)?;
        let (prog, drop, pass, tc) = if flags == 0 {
            (UPLINK_XDP, XDP_DROP, XDP_PASS, false)
        } else {
            (UPLINK_TC, TC_ACT_SHOT, TC_ACT_OK, true)
        };
        let delivered = if tc { TC_ACT_REDIRECT } else { XDP_PASS };
        let run = |frame: &[u8]| h.dp.test_run(prog, frame, None, 1);
        let hook = if tc { "tc" } else { "xdp" };

        // NVGRE to another PA of this host than the one RED-1's record names.
        let to = |pa| {
            nvgre(
                GATEWAY_MAC,
                h.uplink_mac,
                REMOTE_PA,
                pa,
                RED << 8,
                0,
                &to_red1,
            )
        };
        ensure!(
            run(&to(LOCAL_PA))?.ret == delivered,
            "{hook}: NVGRE to RED-1's PA"
        );
        h.expect(prog, &to(SPARE_PA), None, drop, "drop_uplink_wrong_pa")
            .context(hook)?;

        // NVGRE whose outer source is this host's own PA, speaking for RED-3, a VM here.
        let own = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            LOCAL_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &red3_to_red1,
        );
        h.expect(prog, &own, None, drop, "drop_uplink_own_source")
            .context(hook)?;

        // IP rewrite not addressed to the uplink's MAC.
        let rewrite = |dst_mac| green(GREEN_GATEWAY_MAC, dst_mac, GREEN2_PA, GREEN1_PA);
        ensure!(
            run(&rewrite(h.uplink_mac))?.ret == delivered,
            "{hook}: rewrite to our MAC"
        );
        h.expect(
            prog,
            &rewrite([0x02, 0xbb, 0, 0, 0, 9]),
            None,
            drop,
            "drop_uplink_not_our_mac",
        )
        .context(hook)?;
        // IP rewrite from GREEN-1's own PA: a VM here, never behind the underlay.
        let from_self = green(GREEN_GATEWAY_MAC, h.uplink_mac, GREEN1_PA, GREEN1_PA);
        h.expect(prog, &from_self, None, drop, "drop_uplink_own_source")
            .context(hook)?;

        // Priority-tagged (VID 0) and double-tagged frames around traffic nv would take.
        let tag = |frame: &[u8], tags: &[u16]| {
            let mut f = frame[..12].to_vec();
            for tpid in tags {
                f.extend_from_slice(&tpid.to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
            f.extend_from_slice(&frame[12..]);
            f
        };
        for tags in [&[0x8100][..], &[0x88a8, 0x8100]] {
            for (what, frame) in [("NVGRE", to(LOCAL_PA)), ("rewrite", rewrite(h.uplink_mac))] {
                h.expect(prog, &tag(&frame, tags), None, drop, "drop_uplink_vlan")
                    .with_context(|| format!("{hook}: {what} tagged {tags:x?}"))?;
            }
            // The host's own tagged traffic passes.
            let host = udp_frame(GATEWAY_MAC, h.uplink_mac, REMOTE_PA, LOCAL_PA, b"host");
            ensure!(
                run(&tag(&host, tags))?.ret == pass,
                "{hook}: the host's tagged traffic"
            );
        }

        // Anything from a rewrite PA but its VM's rewrite traffic, and anything to a rewrite
        // PA whose VM is gone, is dropped; the host's own traffic passes.
        let host = udp_frame(GATEWAY_MAC, h.uplink_mac, [198, 18, 9, 9], LOCAL_PA, b"x");
        ensure!(run(&host)?.ret == pass, "{hook}: host traffic");
        let from_tenant = udp_frame(GATEWAY_MAC, h.uplink_mac, GREEN2_PA, LOCAL_PA, b"x");
        h.expect(
            prog,
            &from_tenant,
            None,
            drop,
            "drop_uplink_from_rewrite_pa",
        )
        .context(hook)?;
        let to_idle = green(GREEN_GATEWAY_MAC, h.uplink_mac, GREEN2_PA, IDLE_REWRITE_PA);
        h.expect(prog, &to_idle, None, drop, "drop_uplink_rewrite_no_vm")
            .context(hook)?;
        let to_remote = udp_frame(GATEWAY_MAC, h.uplink_mac, [198, 18, 9, 9], GREEN2_PA, b"x");
        h.expect(prog, &to_remote, None, drop, "drop_uplink_rewrite_no_vm")
            .context(hook)?;

        // ARP for a rewrite PA the datapath owns is answered with the uplink's MAC, back out
        // of the uplink, by the TC program on either hook (XDP passes it up); ARP for the
        // host's own PA is the host's.
        let ask = |tpa| arp_frame(GATEWAY_MAC, 1, GATEWAY_MAC, REMOTE_PA, tpa);
        if !tc {
            ensure!(
                run(&ask(GREEN1_PA))?.ret == XDP_PASS,
                "xdp: ARP passed up to TC"
            );
        }
        let mut reply = Vec::new();
        reply.extend_from_slice(&GATEWAY_MAC);
        reply.extend_from_slice(&h.uplink_mac);
        reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&h.uplink_mac);
        reply.extend_from_slice(&GREEN1_PA);
        reply.extend_from_slice(&GATEWAY_MAC);
        reply.extend_from_slice(&REMOTE_PA);
        let answered = h.expect(
            UPLINK_TC,
            &ask(GREEN1_PA),
            None,
            TC_ACT_REDIRECT,
            "uplink_arp_replied",
        )?;
        ensure!(answered == reply, "{hook}: ARP reply {answered:02x?}");
        ensure!(
            run(&ask(LOCAL_PA))?.ret == pass,
            "{hook}: ARP for the host's PA"
        );
    }
    Ok(())
}
