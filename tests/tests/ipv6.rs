//! IPv6 customer addresses in the datapath with `BPF_PROG_TEST_RUN`: neighbour solicitations
//! answered from the records (never across tenants), the router guard (advertisements,
//! redirects, `DHCPv6` server messages, also behind extension headers), the source check, local
//! delivery and NVGRE out; NVGRE in on both decapsulation hooks with the sender's PA and MAC
//! checked. Each refusal beside a frame that passes. Frames are built and checked with
//! etherparse. RED-1 (`fd00::1`) and RED-3 (`fd00::3`) are here, RED-2 (`fd00::2`) and BLUE-2
//! (`fd00::2`, in BLUE) remote.
use anyhow::{Context as _, ensure};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use nv_common::{
    DatapathConfig,
    program_names::{FROM_VM, UPLINK_TC, UPLINK_XDP},
};
use nv_tests::fixture::*;

fn ipv6_host() -> anyhow::Result<Host> {
    let mut h = host(true)?;
    h.add_ipv6()?;
    Ok(h)
}

/// `fe80::/64` with the `EUI-64` of `mac`.
fn link_local(mac: [u8; 6]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..2].copy_from_slice(&[0xfe, 0x80]);
    a[8..].copy_from_slice(&[
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]);
    a
}

/// An `ICMPv6` message of `kind` from RED-1 to `fd00::2`, its header at the end of `ext`
/// extension headers (each 8 bytes, hop-by-hop then destination options).
fn icmp6_behind(kind: u8, ext: usize) -> Vec<u8> {
    let icmp = [kind, 0, 0, 0, 0, 0, 0, 0];
    let mut payload = Vec::new();
    for i in 0..ext {
        let next = if i + 1 == ext { 58 } else { 60 };
        payload.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    payload.extend_from_slice(&icmp);
    let first = if ext == 0 { 58 } else { 0 };
    let mut frame = Vec::new();
    frame.extend_from_slice(&RED2_MAC);
    frame.extend_from_slice(&RED1_MAC);
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&[first, 255]);
    frame.extend_from_slice(&CA6_1);
    frame.extend_from_slice(&CA6_2);
    frame.extend_from_slice(&payload);
    // Later extension headers after the first are destination options (60).
    frame
}

#[test]
fn neighbour_solicitations_are_answered_from_the_records_of_the_vm_s_own_vsid() -> anyhow::Result<()>
{
    let h = ipv6_host()?;
    for src in [CA6_1, link_local(RED1_MAC)] {
        let ns = solicitation(RED1_MAC, src, CA6_2);
        let out = h.expect(FROM_VM, &ns, Some(h.red1), TC_ACT_REDIRECT, "vm_nd_replied")?;
        let p = SlicedPacket::from_ethernet(&out)?;
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
            anyhow::bail!("no Ethernet");
        };
        ensure!(
            eth.destination() == RED1_MAC && eth.source() == RED2_MAC,
            "NA MACs {:02x?}",
            &out[..12]
        );
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            anyhow::bail!("no IPv6");
        };
        let (s, d) = (ip.header().source(), ip.header().destination());
        ensure!(
            s == CA6_2 && d == src && ip.header().hop_limit() == 255,
            "NA addresses"
        );
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            anyhow::bail!("no ICMPv6");
        };
        ensure!(icmp.is_checksum_valid(s, d), "NA checksum");
        let body = icmp.slice();
        ensure!(
            body[0] == 136
                && body[4] == 0x60
                && body[8..24] == CA6_2
                && body[24..26] == [2, 1]
                && body[26..32] == RED2_MAC,
            "NA body {body:02x?}"
        );
    }
    // BLUE-1 asks for the same address: BLUE-2's MAC, never RED-2's.
    let ns = solicitation(BLUE1_MAC, link_local(BLUE1_MAC), CA6_2);
    let out = h.expect(
        FROM_VM,
        &ns,
        Some(h.blue1),
        TC_ACT_REDIRECT,
        "vm_nd_replied",
    )?;
    ensure!(
        out[6..12] == BLUE2_MAC,
        "BLUE-1 was told {:02x?}",
        &out[6..12]
    );
    // An address no record has, duplicate address detection and its own address: unanswered.
    for (target, src) in [
        ([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9], CA6_1),
        (CA6_2, [0; 16]),
        (CA6_1, CA6_1),
    ] {
        let ns = solicitation(RED1_MAC, src, target);
        h.expect(
            FROM_VM,
            &ns,
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_nd_unanswered",
        )?;
    }
    // BLUE has no `fd00::3`: RED-3's address stays RED's.
    let ns = solicitation(BLUE1_MAC, link_local(BLUE1_MAC), CA6_3);
    h.expect(
        FROM_VM,
        &ns,
        Some(h.blue1),
        TC_ACT_SHOT,
        "drop_vm_nd_unanswered",
    )?;
    // Asking from another VM's address.
    let ns = solicitation(RED1_MAC, CA6_3, CA6_2);
    h.expect(
        FROM_VM,
        &ns,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_ip",
    )?;
    Ok(())
}

#[test]
fn a_vm_sends_ipv6_only_from_its_own_address_and_never_as_a_router() -> anyhow::Result<()> {
    let h = ipv6_host()?;
    // To RED-2: NVGRE in RED's VSID, the customer's frame unchanged inside.
    let frame = udp6(RED1_MAC, RED2_MAC, CA6_1, CA6_2, (40000, 7));
    let out = h.expect(
        FROM_VM,
        &frame,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_encap",
    )?;
    let key = u32::from_be_bytes(out[38..42].try_into()?);
    ensure!(key >> 8 == RED, "NVGRE key {key:#x}");
    ensure!(
        out[26..30] == LOCAL_PA && out[30..34] == REMOTE_PA,
        "outer PAs"
    );
    ensure!(out[42..] == frame[..], "the inner frame changed");
    // To RED-3, on this host.
    let red3 = h.ns.ifindex("red3")?;
    let frame = udp6(RED1_MAC, RED3_MAC, CA6_1, CA6_3, (40000, 7));
    h.expect(
        FROM_VM,
        &frame,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_local",
    )?;
    let _ = red3;
    // Another VM's address, a link-local one, or none as the source.
    for src in [CA6_3, link_local(RED1_MAC), [0; 16]] {
        let frame = udp6(RED1_MAC, RED2_MAC, src, CA6_2, (40000, 7));
        h.expect(
            FROM_VM,
            &frame,
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_spoofed_ip",
        )?;
    }
    // BLUE-1 has no IPv6 record: it cannot send from RED-1's address.
    let frame = udp6(BLUE1_MAC, BLUE2_MAC, CA6_1, CA6_2, (40000, 7));
    h.expect(
        FROM_VM,
        &frame,
        Some(h.blue1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_ip",
    )?;
    // Router advertisements and redirects, bare or behind extension headers; a `DHCPv6`
    // server's answer.
    for (kind, ext) in [(134, 0), (137, 0), (134, 1), (134, 3)] {
        h.expect(
            FROM_VM,
            &icmp6_behind(kind, ext),
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_router_guard",
        )
        .with_context(|| format!("ICMPv6 type {kind} behind {ext} headers"))?;
    }
    // DHCPv6 server messages: from the server's port, or to a client's from any.
    for ports in [(547, 546), (40000, 546), (547, 40000)] {
        let reply = udp6(RED1_MAC, RED2_MAC, CA6_1, CA6_2, ports);
        h.expect(
            FROM_VM,
            &reply,
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_router_guard",
        )
        .with_context(|| format!("UDP {ports:?}"))?;
    }
    // A payload length that ends before the upper-layer header: what follows would be
    // screened while the real header came in a later fragment.
    let mut short = icmp6_behind(134, 1);
    short[18..20].copy_from_slice(&8u16.to_be_bytes());
    h.expect(
        FROM_VM,
        &short,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_malformed",
    )?;
    // More extension headers than nv walks.
    h.expect(
        FROM_VM,
        &icmp6_behind(128, 5),
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_ipv6_ext",
    )?;
    // An echo request behind one header crosses (the positive control).
    h.expect(
        FROM_VM,
        &icmp6_behind(128, 1),
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_tx_encap",
    )?;
    // Router solicitations and unsolicited advertisements are not flooded.
    for kind in [133, 136] {
        h.expect(
            FROM_VM,
            &icmp6_behind(kind, 0),
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_nd_unanswered",
        )?;
    }
    Ok(())
}

#[test]
fn an_advertisement_behind_an_authentication_header_is_still_one() -> anyhow::Result<()> {
    let h = ipv6_host()?;
    // Behind an authentication header (12 bytes: its length counts words less 2): an
    // advertisement all the same; an echo request crosses (the positive control).
    for (kind, counter, ret) in [
        (134, "drop_vm_router_guard", TC_ACT_SHOT),
        (128, "vm_tx_encap", TC_ACT_REDIRECT),
    ] {
        let mut ah = icmp6_behind(kind, 0);
        ah[20] = 51;
        let icmp = ah.split_off(54);
        ah.extend_from_slice(&[58, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        ah.extend_from_slice(&icmp);
        let len = u16::try_from(ah.len() - 54)?;
        ah[18..20].copy_from_slice(&len.to_be_bytes());
        h.expect(FROM_VM, &ah, Some(h.red1), ret, counter)
            .with_context(|| format!("ICMPv6 type {kind} behind AH"))?;
    }
    Ok(())
}

#[test]
fn ipv6_in_nvgre_is_delivered_on_either_hook_only_from_its_sender_s_pa_and_mac()
-> anyhow::Result<()> {
    let mut h = ipv6_host()?;
    let inner = udp6(RED2_MAC, RED1_MAC, CA6_2, CA6_1, (7, 40000));
    let uplink_mac = h.uplink_mac;
    let packet = |pa: [u8; 4], vsid: u32, inner: &[u8]| {
        nvgre(GATEWAY_MAC, uplink_mac, pa, LOCAL_PA, vsid << 8, 0, inner)
    };
    // XDP: decapsulated, with the VM named in the metadata for TC.
    let good = packet(REMOTE_PA, RED, &inner);
    let out = h.expect(UPLINK_XDP, &good, None, XDP_PASS, "uplink_decap")?;
    ensure!(
        u32::from_ne_bytes(out[..4].try_into()?) == nv_common::DeliverMeta6::MAGIC
            && u32::from_ne_bytes(out[4..8].try_into()?) == h.red1
            && out[12..18] == RED1_MAC,
        "XDP metadata {:02x?}",
        &out[..20]
    );
    ensure!(out[20..] == inner[..], "the inner frame changed");
    let spoofed_mac = udp6(BLUE2_MAC, RED1_MAC, CA6_2, CA6_1, (7, 40000));
    let spoofed_src = udp6(RED2_MAC, RED1_MAC, CA6_3, CA6_1, (7, 40000));
    let refusals = |h: &Host, prog: &str, drop: u32| -> anyhow::Result<()> {
        h.expect(
            prog,
            &packet(REMOTE_PA, RED, &spoofed_mac),
            None,
            drop,
            "drop_uplink_spoofed_mac",
        )?;
        h.expect(
            // RED-3's address, which lives here, not behind the remote PA.
            prog,
            &packet(REMOTE_PA, RED, &spoofed_src),
            None,
            drop,
            "drop_uplink_spoofed_pa",
        )?;
        h.expect(
            prog,
            &packet(OTHER_PA, RED, &inner),
            None,
            drop,
            "drop_uplink_spoofed_pa",
        )?;
        // BLUE's VSID with RED's addresses: BLUE has no VM at `fd00::1`.
        h.expect(
            prog,
            &packet(REMOTE_PA, BLUE, &inner),
            None,
            drop,
            "drop_uplink_unknown_dst",
        )?;
        Ok(())
    };
    refusals(&h, UPLINK_XDP, XDP_DROP)?;
    // A router's or a neighbour's message from another host: hosts answer their own VMs.
    let mut advert = icmp6_behind(134, 0);
    advert[..12].copy_from_slice(&[RED1_MAC, RED2_MAC].concat());
    advert[22..38].copy_from_slice(&CA6_2);
    advert[38..54].copy_from_slice(&CA6_1);
    h.expect(
        UPLINK_XDP,
        &packet(REMOTE_PA, RED, &advert),
        None,
        XDP_DROP,
        "drop_uplink_router_guard",
    )?;
    // TC decapsulation: delivered into RED-1's port.
    h.set_flags(DatapathConfig::TC_DECAP)?;
    h.expect(UPLINK_TC, &good, None, TC_ACT_REDIRECT, "uplink_delivered")?;
    refusals(&h, UPLINK_TC, TC_ACT_SHOT)
}

/// An `ICMPv6` echo request from RED-1 to `dst`, to the router's MAC.
fn echo6(dst: [u8; 16]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(RED1_MAC, ROUTER_MAC)
        .ipv6(CA6_1, dst, 64)
        .icmpv6_echo_request(7, 1);
    let mut out = Vec::new();
    b.write(&mut out, b"ping6").expect("build echo");
    out
}

/// Checks `out` is `ICMPv6` `kind_code` to RED-1 from `src` (Ethernet `from_mac`), naming `mtu`,
/// quoting the start of `offender`, its checksum right (etherparse's).
fn icmp6_error(
    out: &[u8],
    src: [u8; 16],
    from_mac: [u8; 6],
    kind_code: [u8; 2],
    mtu: u32,
    offender: &[u8],
) -> anyhow::Result<()> {
    let p = SlicedPacket::from_ethernet(out)?;
    let (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) = (&p.net, &p.transport)
    else {
        anyhow::bail!("no ICMPv6 in {out:02x?}");
    };
    let (s, d) = (ip.header().source(), ip.header().destination());
    ensure!(
        s == src && d == CA6_1 && out[..6] == RED1_MAC && out[6..12] == from_mac,
        "ICMPv6 error addresses: {:02x?}",
        &out[..54]
    );
    let body = icmp.slice();
    ensure!(
        body[..2] == kind_code && body[4..8] == mtu.to_be_bytes(),
        "ICMPv6 header {:02x?}",
        &body[..8]
    );
    ensure!(icmp.is_checksum_valid(s, d), "ICMPv6 error checksum");
    let quoted = offender.len().min(14 + 128) - 14;
    ensure!(
        body[8..8 + quoted] == offender[14..14 + quoted],
        "the quote is not the offending packet's start: {:02x?} vs {:02x?}",
        &body[8..8 + quoted],
        &offender[14..14 + quoted]
    );
    Ok(())
}

/// A router solicitation from RED-1's link-local address.
fn router_solicitation() -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(RED1_MAC, [0x33, 0x33, 0, 0, 0, 2])
        .ipv6(
            link_local(RED1_MAC),
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::RouterSolicitation);
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("build RS");
    out
}

#[test]
fn the_router_answers_for_its_ipv6_addresses_and_routes_between_ipv6_subnets() -> anyhow::Result<()>
{
    let mut h = ipv6_host()?;
    let router_ll = nv_common::routing::router_link_local(ROUTER_MAC);
    // Before routes: nobody answers for the router, nobody takes solicitations.
    let ns = solicitation(RED1_MAC, link_local(RED1_MAC), router_ll);
    let unanswered = "drop_vm_nd_unanswered";
    h.expect(FROM_VM, &ns, Some(h.red1), TC_ACT_SHOT, unanswered)?;
    let rs = router_solicitation();
    h.expect(FROM_VM, &rs, Some(h.red1), TC_ACT_SHOT, unanswered)?;
    // A DHCPv6 client's solicit: any packet where nv is no router (its link-local source is
    // no record's), the agent's where it is.
    let all_servers = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2];
    let solicit = udp6(
        RED1_MAC,
        [0x33, 0x33, 0, 1, 0, 2],
        link_local(RED1_MAC),
        all_servers,
        (546, 547),
    );
    h.expect(
        FROM_VM,
        &solicit,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_ip",
    )?;
    h.add_domains()?;
    h.add_ipv6_routes()?;
    // Its link-local address and the subnet's gateway: the router's MAC, flagged a router.
    for target in [router_ll, GATEWAY6_A] {
        let ns = solicitation(RED1_MAC, link_local(RED1_MAC), target);
        let out = h.expect(FROM_VM, &ns, Some(h.red1), TC_ACT_REDIRECT, "vm_nd_replied")?;
        let body = &out[14 + 40..];
        ensure!(
            out[6..12] == ROUTER_MAC && body[4] == 0xe0 && body[26..32] == ROUTER_MAC,
            "NA for {target:02x?}: {body:02x?}"
        );
    }
    // RED-B's gateway is not RED's to ask for.
    let other = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let ns = solicitation(RED1_MAC, link_local(RED1_MAC), other);
    h.expect(FROM_VM, &ns, Some(h.red1), TC_ACT_SHOT, unanswered)?;
    // A solicitation goes to the agent, within the port's budget; so does DHCPv6.
    h.expect(FROM_VM, &rs, Some(h.red1), TC_ACT_SHOT, "vm_dhcp_to_agent")?;
    h.expect(
        FROM_VM,
        &solicit,
        Some(h.red1),
        TC_ACT_SHOT,
        "vm_dhcp_to_agent",
    )?;
    // Echo to the gateway: answered back into the port, from the gateway.
    let out = h.expect(
        FROM_VM,
        &echo6(GATEWAY6_A),
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_gateway_replied",
    )?;
    let p = SlicedPacket::from_ethernet(&out)?;
    let (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) = (&p.net, &p.transport)
    else {
        anyhow::bail!("no ICMPv6 in {out:02x?}");
    };
    let (s, d) = (ip.header().source(), ip.header().destination());
    ensure!(s == GATEWAY6_A && d == CA6_1, "echo reply addresses");
    ensure!(
        icmp.slice()[0] == 129 && icmp.is_checksum_valid(s, d) && out[..6] == RED1_MAC,
        "echo reply {out:02x?}"
    );
    // To RED-B's subnet: NVGRE in RED-B's VSID, from the router to RED-B, hop limit - 1.
    let frame = udp6(RED1_MAC, ROUTER_MAC, CA6_1, CA6_B, (40000, 7));
    let out = h.expect(FROM_VM, &frame, Some(h.red1), TC_ACT_REDIRECT, "vm_routed")?;
    let key = u32::from_be_bytes(out[38..42].try_into()?);
    ensure!(key >> 8 == RED_B, "NVGRE key {key:#x}");
    ensure!(
        out[42..48] == RED_B_MAC && out[48..54] == ROUTER_MAC && out[42 + 14 + 7] == 63,
        "routed inner frame {:02x?}",
        &out[42..42 + 22]
    );
    // Hop limit 1, no route, no VM at the address: the router answers from RED's gateway.
    let mut last_hop = frame.clone();
    last_hop[14 + 7] = 1;
    let nowhere = [0xfd, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let lost = udp6(RED1_MAC, ROUTER_MAC, CA6_1, nowhere, (40000, 7));
    let mut vacant = CA6_B;
    vacant[15] = 6;
    let empty = udp6(RED1_MAC, ROUTER_MAC, CA6_1, vacant, (40000, 7));
    for (offender, kind, code) in [(&last_hop, 3, 0), (&lost, 1, 0), (&empty, 1, 3)] {
        let out = h.expect(
            FROM_VM,
            offender,
            Some(h.red1),
            TC_ACT_REDIRECT,
            "vm_icmp_from_router",
        )?;
        icmp6_error(&out, GATEWAY6_A, ROUTER_MAC, [kind, code], 0, offender)?;
    }
    routed_ipv6_comes_in_from_the_router_s_mac(&h, nowhere)
}

/// NVGRE from RED-B's host with RED-B's IPv6 source in RED's VSID: routed there, so taken
/// from the router's MAC only; from RED-B's own MAC, or from `nowhere` (no subnet of the
/// domain), refused.
fn routed_ipv6_comes_in_from_the_router_s_mac(h: &Host, nowhere: [u8; 16]) -> anyhow::Result<()> {
    // In from RED-B's host: routed there, so from the router's MAC; from RED-B's own MAC,
    // or from an address of no subnet of the domain, refused.
    let uplink_mac = h.uplink_mac;
    let packet = |inner: &[u8]| {
        nvgre(
            GATEWAY_MAC,
            uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            inner,
        )
    };
    let routed = udp6(ROUTER_MAC, RED1_MAC, CA6_B, CA6_1, (7, 40000));
    h.expect(UPLINK_XDP, &packet(&routed), None, XDP_PASS, "uplink_decap")?;
    let own_mac = udp6(RED_B_MAC, RED1_MAC, CA6_B, CA6_1, (7, 40000));
    let spoofed = "drop_uplink_spoofed_mac";
    h.expect(UPLINK_XDP, &packet(&own_mac), None, XDP_DROP, spoofed)?;
    let stranger = udp6(ROUTER_MAC, RED1_MAC, nowhere, CA6_1, (7, 40000));
    let pa = "drop_uplink_spoofed_pa";
    h.expect(UPLINK_XDP, &packet(&stranger), None, XDP_DROP, pa)?;
    Ok(())
}

#[test]
fn ipv6_too_big_for_the_uplink_is_answered_with_packet_too_big() -> anyhow::Result<()> {
    let mut h = ipv6_host()?;
    // The uplink's MTU is 1500: 1458 bytes of IPv6 fit once encapsulated, 1459 do not.
    let fits = udp6_sized(CA6_2, RED2_MAC, 1458 - 48);
    let big = udp6_sized(CA6_2, RED2_MAC, 1459 - 48);
    h.expect(FROM_VM, &fits, Some(h.red1), TC_ACT_REDIRECT, "vm_tx_encap")?;
    let out = h.expect(
        FROM_VM,
        &big,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_packet_too_big",
    )?;
    // From the address the VM wrote to, with the MAC it wrote to.
    icmp6_error(&out, CA6_2, RED2_MAC, [2, 0], 1458, &big)?;
    // Routed: from the destination's address and the router's MAC.
    h.add_domains()?;
    h.add_ipv6_routes()?;
    let routed = udp6_sized(CA6_B, ROUTER_MAC, 1459 - 48);
    let out = h.expect(
        FROM_VM,
        &routed,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_packet_too_big",
    )?;
    icmp6_error(&out, CA6_B, ROUTER_MAC, [2, 0], 1458, &routed)?;
    // Never an error about an error.
    let mut error = big.clone();
    error[14 + 6] = 58;
    error[14 + 40] = 1;
    h.expect(
        FROM_VM,
        &error,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_too_big",
    )?;
    Ok(())
}

/// A UDP packet from RED-1 to `dst` (Ethernet `dst_mac`) with `payload` bytes of UDP payload.
fn udp6_sized(dst: [u8; 16], dst_mac: [u8; 6], payload: usize) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(RED1_MAC, dst_mac)
        .ipv6(CA6_1, dst, 64)
        .udp(40000, 7);
    let mut out = Vec::new();
    b.write(&mut out, &vec![0x5a; payload]).expect("build UDP");
    out
}

/// What tshark sees on the underlay while `traffic` runs: (GRE key, inner IPv6 source) of
/// every NVGRE packet carrying IPv6, and how many packets show a customer's IPv6 address
/// outside GRE.
fn underlay_ipv6(
    bed: &nv_tests::testbed::TwoHosts,
    tag: &str,
    traffic: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<(u32, String)>, usize)> {
    let file = bed.tmp_dir().join(format!("{tag}.pcap"));
    let cap = nv_tests::capture::Capture::start(&bed.underlay, "br0", &file, 60)?;
    traffic()?;
    let file = cap.stop()?;
    let file = file.to_str().context("utf-8 path")?;
    let fields = |filter: &str, fields: &[&str]| -> anyhow::Result<Vec<String>> {
        let mut args = vec![
            "-r",
            file,
            "-Y",
            filter,
            "-T",
            "fields",
            "-E",
            "separator=|",
        ];
        for f in fields {
            args.extend(["-e", f]);
        }
        Ok(nv_tests::sys::run("tshark", &args)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect())
    };
    let tunnelled = fields("gre && ipv6", &["gre.key", "ipv6.src"])?
        .iter()
        .filter_map(|l| {
            let (key, src) = l.split_once('|')?;
            let key = u32::from_str_radix(key.trim_start_matches("0x"), 16).ok()?;
            Some((key, src.to_owned()))
        })
        .collect();
    let outside = fields("ipv6.addr == fd00::/16 && !gre", &["frame.number"])?.len();
    Ok((tunnelled, outside))
}

/// What the agent refuses, in one line each: IPv6 by rewrite, a second IPv6 record for a
/// port, and the IPv4 record of a VM whose IPv6 record is still on its port; and what it
/// lists.
fn what_the_agent_refuses(h1: &nv_tests::testbed::Host) -> anyhow::Result<()> {
    h1.expect_refused(
        &[
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            "fd00::7",
            "--pa",
            "198.18.0.9",
            "--mac",
            "02:00:00:00:00:77",
            "--method",
            "rewrite",
        ],
        "NVGRE",
    )?;
    h1.expect_refused(
        &[
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            "fd00::8",
            "--pa",
            "198.18.0.1",
            "--mac",
            "02:00:00:00:01:01",
            "--port",
            "red1",
        ],
        "already has the IPv6 record",
    )?;
    h1.expect_refused(
        &["lookup", "del", "--vsid", "5001", "--ca", "10.0.0.1"],
        "delete that first",
    )?;
    let listed = h1.nvctl_json(&["lookup", "list", "--vsid", "5001"])?;
    ensure!(
        listed.as_array().is_some_and(|l| l
            .iter()
            .any(|r| r["ca"] == "fd00::1" && r["port"] == "red1")),
        "lookup list lacks RED-1's IPv6 record: {listed}"
    );
    Ok(())
}

/// Two tenants with the same IPv6 addresses on two hosts, NVGRE over the IPv4 underlay, on the
/// TC hook and (agents restarted) on XDP: RED-1 reaches RED-2 and BLUE-1 BLUE-2 by ping6
/// (neighbour discovery answered by each host), tshark sees NVGRE with each tenant's VSID
/// carrying the customer's IPv6 and no customer address outside GRE, and BLUE-2 never sees
/// RED's payload while it sees BLUE's (the positive control).
#[test]
fn dual_stack_tenants_with_the_same_ipv6_addresses_cross_hosts_isolated_on_either_hook()
-> anyhow::Result<()> {
    use nv_tests::testbed::{BLUE_VSID, RED_VSID, TwoHosts};
    let mut bed = TwoHosts::build_with("v6", &["--decap-hook", "tc"])?;
    bed.configure()?;
    bed.add_ipv6_records()?;
    what_the_agent_refuses(&bed.hosts[0])?;
    for hook in ["tc", "xdp"] {
        if hook == "xdp" {
            for h in &mut bed.hosts {
                h.stop_agent();
                h.agent_args = vec!["--decap-hook".into(), "xdp".into()];
                h.start_agent()?;
            }
        }
        let blue2 = bed.vm("BLUE-2");
        let watch = nv_tests::capture::Capture::start(
            &blue2.ns,
            "eth0",
            &bed.tmp_dir().join(format!("blue2-{hook}.pcap")),
            60,
        )?;
        let (tunnelled, outside) = underlay_ipv6(&bed, &format!("v6-{hook}"), || {
            for (vm, pattern) in [("RED-1", "a5"), ("BLUE-1", "b6")] {
                let got = bed.ping_with(vm, "fd00::2", 3, &["-p", pattern, "-s", "1200"])?;
                ensure!(got == 3, "{hook}: {vm} -> fd00::2: {got} of 3 answered");
            }
            Ok(())
        })?;
        let seen = nv_tests::capture::frames(&watch.stop()?)?;
        let with = |b: u8| nv_tests::capture::with_pattern(&seen, b);
        ensure!(
            with(0xa5) == 0 && with(0xb6) >= 3,
            "{hook}: BLUE-2 saw {} of RED's frames and {} of BLUE's",
            with(0xa5),
            with(0xb6)
        );
        ensure!(
            outside == 0,
            "{hook}: {outside} packets with a customer address outside GRE"
        );
        for vsid in [RED_VSID, BLUE_VSID] {
            let n = tunnelled.iter().filter(|(k, _)| k >> 8 == vsid).count();
            ensure!(
                n >= 6,
                "{hook}: {n} NVGRE packets of VSID {vsid} carrying IPv6: {tunnelled:?}"
            );
        }
        ensure!(
            tunnelled.iter().all(|(_, src)| src.starts_with("fd00::")),
            "{hook}: inner sources {tunnelled:?}"
        );
    }
    an_ipv6_only_vm_reaches_its_tenant_and_sends_no_ipv4(&mut bed)
}

/// RED-6 has an IPv6 record only (`fd00::6`, its port's entry is that record's): it reaches
/// RED-2 across hosts by IPv6, and nothing it sends by IPv4 crosses (the IPv4 address its
/// namespace still holds is no record's). Its port later takes an IPv4 record of the same VM.
fn an_ipv6_only_vm_reaches_its_tenant_and_sends_no_ipv4(
    bed: &mut nv_tests::testbed::TwoHosts,
) -> anyhow::Result<()> {
    let mac = "02:00:00:00:01:06";
    bed.add_vm(
        "RED-6",
        nv_tests::testbed::RED_VSID,
        "10.0.0.6",
        mac,
        "red6",
        0,
    )?;
    // RED-6's record of `ca` on both hosts, its port on host 1.
    let record = |bed: &nv_tests::testbed::TwoHosts, ca: &str| -> anyhow::Result<()> {
        for (i, h) in bed.hosts.iter().enumerate() {
            let mut args = vec![
                "lookup",
                "add",
                "--vsid",
                "5001",
                "--ca",
                ca,
                "--pa",
                &bed.hosts[0].pa,
                "--mac",
                mac,
                "--name",
                "RED-6",
            ];
            if i == 0 {
                args.extend(["--port", "red6"]);
            }
            h.nvctl(&args)?;
        }
        Ok(())
    };
    record(bed, "fd00::6")?;
    bed.vm("RED-6").add_ipv6("fd00::6")?;
    ensure!(
        bed.ping("RED-6", "fd00::2", 3)? == 3,
        "RED-6 -> RED-2 by IPv6"
    );
    let before = bed.hosts[0].counters()?;
    ensure!(
        bed.ping("RED-6", "10.0.0.2", 3)? == 0,
        "RED-6 reached RED-2 by IPv4"
    );
    let after = bed.hosts[0].counters()?;
    let refused: u64 = ["drop_vm_spoofed_ip", "drop_vm_spoofed_arp"]
        .iter()
        .map(|c| nv_tests::testbed::delta(&before, &after, c))
        .sum();
    ensure!(refused >= 1, "RED-6's IPv4 was not refused as spoofed");
    // The same VM takes an IPv4 address: the port's entry becomes that record's.
    record(bed, "10.0.0.6")?;
    ensure!(
        bed.ping("RED-6", "10.0.0.2", 3)? == 3,
        "RED-6 -> RED-2 by IPv4, now recorded"
    );
    ensure!(
        bed.ping("RED-6", "fd00::2", 3)? == 3,
        "RED-6 -> RED-2 by IPv6, still"
    );
    Ok(())
}
