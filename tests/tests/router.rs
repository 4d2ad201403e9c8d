//! The distributed router's program paths with `BPF_PROG_TEST_RUN`: routing between two
//! subnets of a domain, gateways answering, TTL, and the receiving host's check of a routed
//! source, each refusal beside a frame that passes. RED (5001) and RED-B (7003, 10.1.0.5,
//! remote) are contoso's; BLUE (6001) and BLUE-B (8003, 10.1.0.5, remote) fabrikam's, with
//! the same prefixes. Expected headers are checked with etherparse.
use anyhow::{Context as _, ensure};
use etherparse::{Ipv4HeaderSlice, SlicedPacket, TransportSlice};
use nv_common::program_names::{FROM_VM, UPLINK_TC, UPLINK_XDP};
use nv_tests::fixture::*;

/// The fixture's host with contoso's and fabrikam's subnets and their remote VMs.
fn routed_host() -> anyhow::Result<Host> {
    let mut h = host(true)?;
    h.add_domains()?;
    Ok(h)
}

fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    frame[22] = ttl;
    let mut ip = Ipv4HeaderSlice::from_slice(&frame[14..])
        .expect("ipv4")
        .to_header();
    ip.header_checksum = ip.calc_header_checksum();
    frame[14..34].copy_from_slice(&ip.to_bytes());
    frame
}

#[test]
fn a_vm_is_routed_within_its_domain_only() -> anyhow::Result<()> {
    let mut h = routed_host()?;
    for (from, mac, port, vsid, peer_mac) in [
        ("RED-1", RED1_MAC, h.red1, RED_B, RED_B_MAC),
        ("BLUE-1", BLUE1_MAC, h.blue1, BLUE_B, BLUE_B_MAC),
    ] {
        let frame = udp_frame(mac, ROUTER_MAC, CA1, CA_B, b"routed");
        let out = h.expect(FROM_VM, &frame, Some(port), TC_ACT_REDIRECT, "vm_routed")?;
        let key = u32::from_be_bytes(out[38..42].try_into()?);
        ensure!(
            key >> 8 == vsid,
            "{from}: NVGRE key {key:#x}, expected VSID {vsid}"
        );
        // The inner frame: from the router to the destination, TTL 63, checksum valid.
        let inner = &out[42..];
        ensure!(
            inner[..6] == peer_mac && inner[6..12] == ROUTER_MAC,
            "{from}: inner MACs {:02x?}",
            &inner[..12]
        );
        let ip = Ipv4HeaderSlice::from_slice(&inner[14..])?.to_header();
        ensure!(ip.time_to_live == 63, "{from}: TTL {}", ip.time_to_live);
        ensure!(
            ip.header_checksum == ip.calc_header_checksum(),
            "{from}: inner IPv4 checksum"
        );
    }
    // TTL 1 expires: time exceeded, from RED's gateway. TTL 2 crosses.
    let frame = udp_frame(RED1_MAC, ROUTER_MAC, CA1, CA_B, b"x");
    let expired = with_ttl(frame.clone(), 1);
    let out = h.expect(
        FROM_VM,
        &expired,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_from_router",
    )?;
    router_error(&out, RED1_MAC, GATEWAY_A, [11, 0], &expired)?;
    h.expect(
        FROM_VM,
        &with_ttl(frame, 2),
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_routed",
    )?;
    // No route: net unreachable, from the gateway. fabrikam has no 10.2.0.0/24: contoso's
    // subnet stays out of its reach, and BLUE-1 hears so from its own gateway.
    let nowhere = udp_frame(RED1_MAC, ROUTER_MAC, CA1, [10, 9, 9, 9], b"x");
    let out = h.expect(
        FROM_VM,
        &nowhere,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_from_router",
    )?;
    router_error(&out, RED1_MAC, GATEWAY_A, [3, 0], &nowhere)?;
    let other = udp_frame(BLUE1_MAC, ROUTER_MAC, CA1, CA_C, b"x");
    let out = h.expect(
        FROM_VM,
        &other,
        Some(h.blue1),
        TC_ACT_REDIRECT,
        "vm_icmp_from_router",
    )?;
    router_error(&out, BLUE1_MAC, GATEWAY_A, [3, 0], &other)?;
    // A route with no VM at its end: host unreachable.
    let nobody = udp_frame(RED1_MAC, ROUTER_MAC, CA1, [10, 1, 0, 99], b"x");
    let out = h.expect(
        FROM_VM,
        &nobody,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_from_router",
    )?;
    router_error(&out, RED1_MAC, GATEWAY_A, [3, 1], &nobody)?;
    // Never an error about an error: an ICMP error to the router is dropped.
    let mut error = Vec::new();
    etherparse::PacketBuilder::ethernet2(RED1_MAC, ROUTER_MAC)
        .ipv4(CA1, [10, 9, 9, 9], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ))
        .write(&mut error, &[0; 28])?;
    h.expect(
        FROM_VM,
        &error,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_no_route",
    )?;
    // A VSID in no domain (GREEN, taken out of greenland here) is not routed at all: to the
    // router's MAC is to an address of its own VSID, as before routes existed.
    h.desired.routing.vsids.remove(&GREEN);
    h.dp.sync(&h.desired)?;
    let green = udp_frame(GREEN1_MAC, ROUTER_MAC, CA1, CA_B, b"x");
    h.expect(
        FROM_VM,
        &green,
        Some(h.green1),
        TC_ACT_SHOT,
        "drop_vm_unknown_dst",
    )?;
    Ok(())
}

/// `out` is ICMP `kind_code` to the VM (`mac`, 10.0.0.1) from `gateway` and the router's
/// MAC, quoting what the VM sent (`sent`), checksums valid per etherparse.
fn router_error(
    out: &[u8],
    mac: [u8; 6],
    gateway: [u8; 4],
    kind_code: [u8; 2],
    sent: &[u8],
) -> anyhow::Result<()> {
    ensure!(
        out[..6] == mac && out[6..12] == ROUTER_MAC,
        "ICMP error's MACs {:02x?}",
        &out[..12]
    );
    let ip = Ipv4HeaderSlice::from_slice(&out[14..])?.to_header();
    ensure!(
        ip.source == gateway && ip.destination == CA1 && ip.protocol.0 == 1,
        "ICMP error {ip:?}"
    );
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "IPv4 checksum"
    );
    let icmp = &out[34..];
    ensure!(icmp[..2] == kind_code, "ICMP {:?}", &icmp[..2]);
    let p = SlicedPacket::from_ethernet(out)?;
    let Some(TransportSlice::Icmpv4(slice)) = &p.transport else {
        anyhow::bail!("not ICMP: {out:02x?}");
    };
    ensure!(
        slice.checksum() == slice.header().icmp_type.calc_checksum(slice.payload()),
        "ICMP checksum"
    );
    // The quote: what the VM sent from its IPv4 header on, padded to 68 bytes with zeros.
    let quote = &icmp[8..];
    let sent = &sent[14..];
    let n = sent.len().min(quote.len());
    ensure!(
        quote[..n] == sent[..n] && quote[n..].iter().all(|b| *b == 0),
        "quote {quote:02x?}"
    );
    Ok(())
}

#[test]
fn gateways_answer_arp_in_their_subnet_and_echo_in_their_domain() -> anyhow::Result<()> {
    let h = routed_host()?;
    let arp = arp_frame(RED1_MAC, 1, RED1_MAC, CA1, GATEWAY_A);
    let out = h.expect(
        FROM_VM,
        &arp,
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_gateway_replied",
    )?;
    ensure!(
        out[..6] == RED1_MAC && out[6..12] == ROUTER_MAC && out[22..28] == ROUTER_MAC,
        "ARP reply {out:02x?}"
    );
    // The gateway of another subnet is not on this one's link.
    let far = arp_frame(RED1_MAC, 1, RED1_MAC, CA1, [10, 1, 0, 1]);
    h.expect(FROM_VM, &far, Some(h.red1), TC_ACT_SHOT, "drop_vm_arp")?;
    // Echo to either gateway of the domain comes back from it, checksums valid.
    for gateway in [GATEWAY_A, [10, 1, 0, 1]] {
        let b = etherparse::PacketBuilder::ethernet2(RED1_MAC, ROUTER_MAC)
            .ipv4(CA1, gateway, 64)
            .icmpv4_echo_request(7, 1);
        let mut frame = Vec::new();
        b.write(&mut frame, b"ping the router")?;
        let out = h.expect(
            FROM_VM,
            &frame,
            Some(h.red1),
            TC_ACT_REDIRECT,
            "vm_gateway_replied",
        )?;
        let p = SlicedPacket::from_ethernet(&out)?;
        let ip = p
            .net
            .as_ref()
            .and_then(|n| n.ipv4_ref())
            .context("IPv4")?
            .header();
        ensure!(
            ip.source() == gateway && ip.destination() == CA1,
            "echo reply addresses"
        );
        ensure!(ip.to_header().header_checksum == ip.to_header().calc_header_checksum());
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
            anyhow::bail!("not ICMP: {out:02x?}");
        };
        ensure!(
            icmp.icmp_type()
                == etherparse::Icmpv4Type::EchoReply(etherparse::IcmpEchoHeader { id: 7, seq: 1 }),
            "ICMP type {:?}",
            icmp.icmp_type()
        );
        ensure!(
            icmp.checksum() == icmp.header().icmp_type.calc_checksum(icmp.payload()),
            "ICMP checksum"
        );
    }
    Ok(())
}

#[test]
fn a_routed_source_is_taken_only_from_a_subnet_of_the_same_domain() -> anyhow::Result<()> {
    let mut h = routed_host()?;
    for flags in [0, nv_common::DatapathConfig::TC_DECAP] {
        h.set_flags(flags)?;
        let (program, pass, drop) = if flags == 0 {
            (UPLINK_XDP, XDP_PASS, XDP_DROP)
        } else {
            (UPLINK_TC, TC_ACT_REDIRECT, TC_ACT_SHOT)
        };
        let from = |src_mac, src, vsid| {
            let inner = udp_frame(src_mac, RED1_MAC, src, CA1, b"x");
            nvgre(
                GATEWAY_MAC,
                h.uplink_mac,
                REMOTE_PA,
                LOCAL_PA,
                vsid << 8,
                0,
                &inner,
            )
        };
        // RED-B to RED-1, routed by RED-B's host: from the router's MAC, in RED's VSID.
        h.expect(
            program,
            &from(ROUTER_MAC, CA_B, RED),
            None,
            pass,
            "uplink_decap",
        )?;
        // RED-2 (RED's own VSID) from the router's MAC: routed within the VSID by its host
        // (to a next hop of it, or on-link through the router).
        h.expect(
            program,
            &from(ROUTER_MAC, CA2, RED),
            None,
            pass,
            "uplink_decap",
        )?;
        // The same with RED-B's own MAC: a routed packet comes from the router.
        h.expect(
            program,
            &from(RED_B_MAC, CA_B, RED),
            None,
            drop,
            "drop_uplink_spoofed_mac",
        )?;
        // Under BLUE's VSID, contoso's 10.2.0.7 is no source: fabrikam has no such subnet.
        h.expect(
            program,
            &from(ROUTER_MAC, CA_C, BLUE),
            None,
            drop,
            "drop_uplink_spoofed_pa",
        )?;
    }
    Ok(())
}

#[test]
fn a_vm_of_a_rewrite_vsid_is_routed_by_rewrite() -> anyhow::Result<()> {
    let mut h = routed_host()?;
    // GREEN-1 to GREEN-B: its own PA to GREEN-B's, TTL one less, checksums valid.
    let frame = udp_frame(GREEN1_MAC, ROUTER_MAC, CA1, CA_GB, b"routed by rewrite");
    let out = h.expect(
        FROM_VM,
        &frame,
        Some(h.green1),
        TC_ACT_REDIRECT,
        "vm_tx_rewrite",
    )?;
    let ip = Ipv4HeaderSlice::from_slice(&out[14..])?.to_header();
    ensure!(
        ip.source == GREEN1_PA && ip.destination == GREEN_B_PA && ip.time_to_live == 63,
        "routed rewrite header {ip:?}"
    );
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "IPv4 checksum"
    );
    let p = SlicedPacket::from_ethernet(&out)?;
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        anyhow::bail!("not UDP: {out:02x?}");
    };
    ensure!(
        udp.checksum() == udp.to_header().calc_checksum_ipv4(&ip, udp.payload())?,
        "UDP checksum over the PAs"
    );
    // Back from GREEN-B's host: restored as from the router, for GREEN-1.
    h.set_flags(nv_common::DatapathConfig::TC_DECAP)?;
    let back = udp_frame(
        GREEN_GATEWAY_MAC,
        h.uplink_mac,
        GREEN_B_PA,
        GREEN1_PA,
        b"back",
    );
    let out = h.expect(
        UPLINK_TC,
        &back,
        None,
        TC_ACT_REDIRECT,
        "uplink_rewrite_delivered",
    )?;
    let ip = Ipv4HeaderSlice::from_slice(&out[14..])?.to_header();
    ensure!(
        out[..6] == GREEN1_MAC
            && out[6..12] == ROUTER_MAC
            && ip.source == CA_GB
            && ip.destination == CA1,
        "restored {:02x?} {ip:?}",
        &out[..12]
    );
    // A rewrite PA of a VSID in no domain (OTHER_PA, VSID 7002) stays refused.
    let other = udp_frame(GREEN_GATEWAY_MAC, h.uplink_mac, OTHER_PA, GREEN1_PA, b"x");
    h.expect(
        UPLINK_TC,
        &other,
        None,
        TC_ACT_SHOT,
        "drop_uplink_rewrite_unknown_src",
    )?;
    // Rewrite restores a VM's own address only: 203.0.113.0/24, behind GREEN-B, is not
    // reached through it by rewrite.
    h.set_flags(0)?;
    h.expect(
        FROM_VM,
        &udp_frame(GREEN1_MAC, ROUTER_MAC, CA1, [203, 0, 113, 1], b"x"),
        Some(h.green1),
        TC_ACT_SHOT,
        "drop_vm_routed_rewrite",
    )?;
    // RED (NVGRE) routed to a rewrite destination: RED-1 has no rewrite PA of its own.
    h.expect(
        FROM_VM,
        &udp_frame(RED1_MAC, ROUTER_MAC, CA1, CA_GB, b"x"),
        Some(h.red1),
        TC_ACT_REDIRECT,
        "vm_icmp_from_router",
    )?;
    Ok(())
}

#[test]
fn a_next_hop_speaks_for_the_world_behind_it_and_no_one_else() -> anyhow::Result<()> {
    let h = routed_host()?;
    let red3 = h.ns.ifindex("red3")?;
    // RED-3 is the next hop of 198.51.100.0/24: its answers from there are routed.
    let from_world = udp_frame(RED3_MAC, ROUTER_MAC, [198, 51, 100, 7], CA_B, b"world");
    let out = h.expect(
        FROM_VM,
        &from_world,
        Some(red3),
        TC_ACT_REDIRECT,
        "vm_routed",
    )?;
    ensure!(
        u32::from_be_bytes(out[38..42].try_into()?) >> 8 == RED_B,
        "an appliance's answer rides in its destination's VSID"
    );
    // RED-1 is no next hop of it; fabrikam has no such route.
    let forged = udp_frame(RED1_MAC, ROUTER_MAC, [198, 51, 100, 7], CA_B, b"forged");
    h.expect(
        FROM_VM,
        &forged,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_ip",
    )?;
    let forged = udp_frame(BLUE1_MAC, ROUTER_MAC, [198, 51, 100, 7], CA_B, b"forged");
    h.expect(
        FROM_VM,
        &forged,
        Some(h.blue1),
        TC_ACT_SHOT,
        "drop_vm_spoofed_ip",
    )?;
    // Arriving: 192.0.2.9 is behind RED-B (remote): taken from RED-B's PA, as routed.
    let mut h = h;
    for flags in [0, nv_common::DatapathConfig::TC_DECAP] {
        h.set_flags(flags)?;
        let (program, pass, drop) = if flags == 0 {
            (UPLINK_XDP, XDP_PASS, XDP_DROP)
        } else {
            (UPLINK_TC, TC_ACT_REDIRECT, TC_ACT_SHOT)
        };
        let from = |outer: [u8; 4], vsid: u32| {
            let inner = udp_frame(ROUTER_MAC, RED1_MAC, [192, 0, 2, 9], CA1, b"x");
            nvgre(
                GATEWAY_MAC,
                h.uplink_mac,
                outer,
                LOCAL_PA,
                vsid << 8,
                0,
                &inner,
            )
        };
        h.expect(program, &from(REMOTE_PA, RED), None, pass, "uplink_decap")?;
        // RED-B to the world behind RED-3: delivered to RED-3, this host's next hop for it.
        let inner = udp_frame(ROUTER_MAC, RED3_MAC, CA_B, [198, 51, 100, 7], b"x");
        let to_world = nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &inner,
        );
        let out = h.expect(program, &to_world, None, pass, "uplink_decap")?;
        if flags == 0 {
            ensure!(
                out[4..8] == red3.to_ne_bytes() && out[12..16] == CA3,
                "XDP hands the world's packet to RED-3: {:02x?}",
                &out[..16]
            );
        }
        h.expect(
            program,
            &from([198, 18, 0, 9], RED),
            None,
            drop,
            "drop_uplink_spoofed_pa",
        )?;
        h.expect(
            program,
            &from(REMOTE_PA, BLUE),
            None,
            drop,
            "drop_uplink_spoofed_pa",
        )?;
    }
    Ok(())
}

/// A DHCP request goes to the agent (the slow-path ring, whole, with its port) only from a VSID
/// with a subnet, within its port's budget, and is never forwarded. In a VSID without one a
/// discover is a counted drop, while a request from the VM's own address to a server of its
/// own VSID crosses as before.
#[test]
fn dhcp_goes_to_the_agent_only_from_a_vsid_with_a_subnet_and_within_a_budget() -> anyhow::Result<()>
{
    let discover = dhcp_discover(RED1_MAC, [0; 4], [255; 4]);
    {
        let h = host(true)?;
        h.expect(
            FROM_VM,
            &discover,
            Some(h.red1),
            TC_ACT_SHOT,
            "drop_vm_dhcp_no_subnet",
        )?;
        // Renewing with a server in its own VSID: an ordinary packet.
        let renew = dhcp_discover(RED1_MAC, CA1, CA2);
        h.expect(
            FROM_VM,
            &renew,
            Some(h.red1),
            TC_ACT_REDIRECT,
            "vm_tx_encap",
        )?;
        ensure!(
            h.counter("vm_dhcp_to_agent")? == 0,
            "handed over without a subnet"
        );
    }
    let mut h = routed_host()?;
    let mut ring = h.dp.take_slow_path()?;
    h.expect(
        FROM_VM,
        &discover,
        Some(h.red1),
        TC_ACT_SHOT,
        "vm_dhcp_to_agent",
    )?;
    let item = ring.next().context("nothing in the slow-path ring")?;
    ensure!(
        item.len() >= 8 + discover.len(),
        "ring entry of {} bytes",
        item.len()
    );
    let port = u32::from_ne_bytes(item[..4].try_into()?);
    let len = u32::from_ne_bytes(item[4..8].try_into()?) as usize;
    ensure!(
        port == h.red1 && len == discover.len() && item[8..8 + len] == discover[..],
        "ring entry: port {port} (RED-1 is {}), {len} bytes",
        h.red1
    );
    drop(item);
    // One VM asking as fast as it can spends its own budget (20 at once on a CPU), counted.
    let out = h.dp.test_run(FROM_VM, &discover, Some(h.red1), 100)?;
    ensure!(out.ret == TC_ACT_SHOT, "returned {}", out.ret);
    let (handed, over) = (
        h.counter("vm_dhcp_to_agent")?,
        h.counter("drop_vm_dhcp_over_budget")?,
    );
    ensure!(
        handed + over == 101 && handed <= 25 && over >= 76,
        "of 101 discovers: {handed} handed over, {over} over budget"
    );
    // In a VSID with a subnet nv is the DHCP server: a VM answering a client is refused.
    let mut offer = dhcp_discover(RED1_MAC, CA1, [255; 4]);
    offer[34..38].copy_from_slice(&[0, 67, 0, 68]);
    h.expect(
        FROM_VM,
        &offer,
        Some(h.red1),
        TC_ACT_SHOT,
        "drop_vm_router_guard",
    )?;
    // Another VM's budget is its own.
    h.expect(
        FROM_VM,
        &dhcp_discover(BLUE1_MAC, [0; 4], [255; 4]),
        Some(h.blue1),
        TC_ACT_SHOT,
        "vm_dhcp_to_agent",
    )?;
    Ok(())
}
