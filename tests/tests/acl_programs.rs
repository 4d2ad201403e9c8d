//! Port ACLs in the datapath with `BPF_PROG_TEST_RUN`: a rule sees what a VM sends and gets,
//! IPv4 and IPv6, the upper layer behind IPv6 extension headers included (a TCP segment
//! behind a hop-by-hop header is TCP to the VM's stack), and each deny is metered under its
//! rule. Each refusal beside a frame that passes. RED-1 (10.0.0.1, `fd00::1`) sends to
//! RED-3 (10.0.0.3, `fd00::3`) on the same host.
use anyhow::{Context as _, ensure};
use etherparse::PacketBuilder;
use nv_agent::{
    model::acl::{AclRule, Action, Direction, PortRange, Protocol},
    tables::acls::{compile, empty_set},
};
use nv_common::{
    PortInfo,
    acl::{AclMeterKey, AclSetKey, DIR_IN, DIR_OUT},
    program_names::FROM_VM,
    v4_mapped,
};
use nv_tests::fixture::{
    self, CA1, CA3, CA6_1, CA6_3, RED, RED1_MAC, RED3_MAC, TC_ACT_REDIRECT, TC_ACT_SHOT,
};

fn rule(id: u32, dir: Direction, proto: Protocol, port: Option<u16>) -> AclRule {
    AclRule {
        id,
        name: None,
        vsid: RED,
        ca: None,
        direction: dir,
        action: Action::Deny,
        remote: None,
        local: None,
        protocol: Some(proto),
        remote_port: port.map(|p| PortRange(p, p)),
        local_port: None,
        weight: 10,
        stateful: false,
        idle_timeout: 300,
    }
}

/// A TCP segment to `port` from RED-1 to RED-3 over IPv4.
fn tcp4(port: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(RED1_MAC, RED3_MAC)
        .ipv4(CA1, CA3, 64)
        .tcp(40000, port, 1, 1000);
    let mut out = Vec::new();
    b.write(&mut out, b"acl").expect("build TCP");
    out
}

/// The same over IPv6, behind a hop-by-hop options header (eight bytes of padding).
fn tcp6_behind_hop_by_hop(port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
    let payload = hbh.len() + tcp.len();
    let mut f = Vec::new();
    f.extend_from_slice(&RED3_MAC);
    f.extend_from_slice(&RED1_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(payload).expect("short").to_be_bytes());
    f.extend_from_slice(&[0, 64]);
    f.extend_from_slice(&CA6_1);
    f.extend_from_slice(&CA6_3);
    f.extend_from_slice(&hbh);
    f.extend_from_slice(&tcp);
    f
}

fn udp4() -> Vec<u8> {
    fixture::udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, b"acl")
}

#[test]
fn rules_see_the_upper_layer_and_meter_their_denies() -> anyhow::Result<()> {
    let mut h = fixture::host(false)?;
    h.add_ipv6()?;
    let red3 = h.ns.ifindex("red3")?;
    // RED-1 may not send TCP to port 22; RED-3 takes no UDP. Both VMs' rules, as the agent
    // compiles them, with their ports' entries saying so.
    // RED-1 also sends anything else statefully, and takes nothing in but its answers.
    let mut out = empty_set();
    out.len = 2;
    out.flow_sets = 16;
    out.rules[0] = compile(&rule(7, Direction::Out, Protocol::TCP, Some(22)));
    let mut any_out = rule(9, Direction::Out, Protocol(0), None);
    (any_out.protocol, any_out.action, any_out.stateful) = (None, Action::Allow, true);
    out.rules[1] = compile(&any_out);
    let mut deny_in = empty_set();
    deny_in.len = 1;
    deny_in.flow_sets = 16;
    let mut all_in = rule(10, Direction::In, Protocol(0), None);
    all_in.protocol = None;
    deny_in.rules[0] = compile(&all_in);
    let mut inbound = empty_set();
    inbound.len = 1;
    inbound.rules[0] = compile(&rule(8, Direction::In, Protocol::UDP, None));
    let key = |dir, ca| AclSetKey {
        vsid: RED,
        dir,
        ca: v4_mapped(ca),
    };
    h.desired.acls.sets.insert(key(DIR_OUT, CA1), out);
    h.desired.acls.sets.insert(key(DIR_IN, CA1), deny_in);
    h.desired.acls.flows.insert((RED, v4_mapped(CA1)), 16);
    h.desired.acls.sets.insert(key(DIR_IN, CA3), inbound);
    for (k, dir) in [(7, DIR_OUT), (8, DIR_IN)] {
        h.desired.acls.meters.insert(AclMeterKey { rule: k, dir });
    }
    for (port, f) in [
        (h.red1, PortInfo::ACL_OUT | PortInfo::ACL_IN),
        (red3, PortInfo::ACL_IN),
    ] {
        if let Some(p) = h.desired.ports.get_mut(&port) {
            p.flags |= f;
        }
    }
    h.dp.sync(&h.desired)?;

    let red1 = Some(h.red1);
    h.expect(FROM_VM, &tcp4(22), red1, TC_ACT_SHOT, "drop_vm_acl_denied")?;
    h.expect(FROM_VM, &tcp4(80), red1, TC_ACT_REDIRECT, "vm_tx_local")?;
    // Behind a hop-by-hop header it is still TCP to port 22.
    let hidden = tcp6_behind_hop_by_hop(22);
    h.expect(FROM_VM, &hidden, red1, TC_ACT_SHOT, "drop_vm_acl_denied")?;
    let other = tcp6_behind_hop_by_hop(80);
    h.expect(FROM_VM, &other, red1, TC_ACT_REDIRECT, "vm_tx_local")?;
    // RED-3's inbound rule, at delivery from a VM on the same host.
    h.expect(FROM_VM, &udp4(), red1, TC_ACT_SHOT, "drop_acl_in_denied")?;

    // RED-1's ping is tracked: RED-3's echo reply comes in on it, but no other ICMP with the
    // same identifier (a timestamp request), which meets RED-1's deny.
    let icmp = |reply: bool| {
        let b = PacketBuilder::ethernet2(
            if reply { RED3_MAC } else { RED1_MAC },
            if reply { RED1_MAC } else { RED3_MAC },
        );
        let b = if reply {
            b.ipv4(CA3, CA1, 64).icmpv4_echo_reply(0x1234, 1)
        } else {
            b.ipv4(CA1, CA3, 64).icmpv4_echo_request(0x1234, 1)
        };
        let mut f = Vec::new();
        b.write(&mut f, b"ping").expect("build ICMP");
        f
    };
    let red3_port = Some(red3);
    h.expect(FROM_VM, &icmp(false), red1, TC_ACT_REDIRECT, "vm_tx_local")?;
    h.expect(
        FROM_VM,
        &icmp(true),
        red3_port,
        TC_ACT_REDIRECT,
        "vm_tx_local",
    )?;
    let mut timestamp = icmp(true);
    timestamp[14 + 20] = 13;
    h.expect(
        FROM_VM,
        &timestamp,
        red3_port,
        TC_ACT_SHOT,
        "drop_acl_in_denied",
    )?;

    let meters = h.dp.acl_meters()?;
    let sent = |rule, dir| meters.get(&AclMeterKey { rule, dir }).copied();
    let (out, inb) = (sent(7, DIR_OUT), sent(8, DIR_IN));
    let (tcp4_len, tcp6_len, udp_len) = (tcp4(22).len(), hidden.len(), udp4().len());
    ensure!(
        out.is_some_and(|m| m.packets == 2 && m.bytes == (tcp4_len + tcp6_len) as u64),
        "rule 7 metered its two denies: {out:?}"
    );
    ensure!(
        inb.is_some_and(|m| m.packets == 1 && m.bytes == udp_len as u64),
        "rule 8 metered its deny: {inb:?}"
    );
    Ok(())
}

/// A UDP datagram from RED-3 back to RED-1 (an answer to `udp4`: its ports swapped).
fn udp4_back() -> Vec<u8> {
    let b = PacketBuilder::ethernet2(RED3_MAC, RED1_MAC)
        .ipv4(CA3, CA1, 64)
        .udp(7001, 40000);
    let mut out = Vec::new();
    b.write(&mut out, b"acl").expect("build UDP");
    out
}

#[test]
fn rules_match_protocol_numbers_icmpv6_local_prefixes_and_flows_expire_when_idle()
-> anyhow::Result<()> {
    let mut h = fixture::host(false)?;
    h.add_ipv6()?;
    let red3 = h.ns.ifindex("red3")?;
    // RED-1 out: ICMPv6 denied; GRE (protocol 47, by number) denied from RED-1's prefix; TCP
    // denied only from a local prefix that is not RED-1's; UDP allowed statefully for one idle second.
    // RED-1 in: nothing but answers.
    let mut out = empty_set();
    out.len = 4;
    out.flow_sets = 16;
    out.rules[0] = compile(&rule(21, Direction::Out, Protocol::ICMPV6, None));
    // By number, and from a local prefix that is RED-1's.
    let mut gre = rule(22, Direction::Out, Protocol(47), None);
    gre.local = Some("10.0.0.0/24".parse()?);
    out.rules[1] = compile(&gre);
    let mut elsewhere = rule(23, Direction::Out, Protocol::TCP, None);
    elsewhere.local = Some("10.9.0.0/16".parse()?);
    out.rules[2] = compile(&elsewhere);
    let mut udp = rule(24, Direction::Out, Protocol::UDP, None);
    (udp.action, udp.stateful, udp.idle_timeout, udp.weight) = (Action::Allow, true, 1, 5);
    out.rules[3] = compile(&udp);
    let mut deny_in = empty_set();
    deny_in.len = 1;
    deny_in.flow_sets = 16;
    let mut all_in = rule(25, Direction::In, Protocol(0), None);
    all_in.protocol = None;
    deny_in.rules[0] = compile(&all_in);
    let key = |dir| AclSetKey {
        vsid: RED,
        dir,
        ca: v4_mapped(CA1),
    };
    h.desired.acls.sets.insert(key(DIR_OUT), out);
    h.desired.acls.sets.insert(key(DIR_IN), deny_in);
    h.desired.acls.flows.insert((RED, v4_mapped(CA1)), 16);
    for rule in [21, 22] {
        h.desired
            .acls
            .meters
            .insert(AclMeterKey { rule, dir: DIR_OUT });
    }
    if let Some(p) = h.desired.ports.get_mut(&h.red1) {
        p.flags |= PortInfo::ACL_OUT | PortInfo::ACL_IN;
    }
    h.dp.sync(&h.desired)?;

    let red1 = Some(h.red1);
    let echo6 = {
        let b = PacketBuilder::ethernet2(RED1_MAC, RED3_MAC)
            .ipv6(CA6_1, CA6_3, 64)
            .icmpv6_echo_request(7, 1);
        let mut f = Vec::new();
        b.write(&mut f, b"ping")?;
        f
    };
    h.expect(FROM_VM, &echo6, red1, TC_ACT_SHOT, "drop_vm_acl_denied")
        .context("step 1")?;
    let echo4 = {
        let b = PacketBuilder::ethernet2(RED1_MAC, RED3_MAC)
            .ipv4(CA1, CA3, 64)
            .icmpv4_echo_request(7, 1);
        let mut f = Vec::new();
        b.write(&mut f, b"ping")?;
        f
    };
    h.expect(FROM_VM, &echo4, red1, TC_ACT_REDIRECT, "vm_tx_local")
        .context("step 2")?;
    let mut gre = tcp4(80);
    gre[14 + 9] = 47;
    // The IPv4 checksum is not what the rule reads; the protocol field is.
    h.expect(FROM_VM, &gre, red1, TC_ACT_SHOT, "drop_vm_acl_denied")
        .context("step 3")?;
    // Another protocol number passes: the deny above was rule 22's, not the protocol's.
    let mut esp = gre.clone();
    esp[14 + 9] = 50;
    h.expect(FROM_VM, &esp, red1, TC_ACT_REDIRECT, "vm_tx_local")
        .context("step 4")?;
    h.expect(FROM_VM, &tcp4(80), red1, TC_ACT_REDIRECT, "vm_tx_local")
        .context("step 5")?;
    let meters = h.dp.acl_meters()?;
    for rule in [21, 22] {
        let m = meters.get(&AclMeterKey { rule, dir: DIR_OUT });
        ensure!(
            m.is_some_and(|m| m.packets == 1),
            "rule {rule} denied one frame: {m:?}"
        );
    }

    // RED-1's UDP opens a flow: RED-3's answer comes in, until the flow has been idle for
    // longer than its second.
    let red3_port = Some(red3);
    h.expect(FROM_VM, &udp4(), red1, TC_ACT_REDIRECT, "vm_tx_local")
        .context("step 6")?;
    h.expect(
        FROM_VM,
        &udp4_back(),
        red3_port,
        TC_ACT_REDIRECT,
        "vm_tx_local",
    )
    .context("step 7")?;
    std::thread::sleep(std::time::Duration::from_millis(2500));
    h.expect(
        FROM_VM,
        &udp4_back(),
        red3_port,
        TC_ACT_SHOT,
        "drop_acl_in_denied",
    )
    .context("step 8")?;
    Ok(())
}
