//! `cargo xtask mutants`: shows that the tests guard each isolation check of the datapath. In a
//! scratch copy of the tree, each check in turn is patched out (its condition made false, or
//! its drop turned into a pass), the tests that should notice are run, and a table says which
//! failed. A check whose removal no test notices is guarded by nothing: the command fails.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};

/// One isolation check: where it is, what it becomes with the check removed, which tests must
/// notice (test targets of nv-tests; program tests and the fuzzer unless the check needs a
/// real device state that `BPF_PROG_TEST_RUN` cannot give).
struct Mutation {
    name: &'static str,
    file: &'static str,
    check: &'static str,
    removed: &'static str,
    tests: &'static [&'static str],
}

const PROGRAMS: &[&str] = &["programs", "fuzz"];

const MUTATIONS: &[Mutation] = &[
    Mutation {
        name: "VM source MAC is its port's",
        file: "nv-ebpf/src/from_vm.rs",
        check: "if eth.src != port.mac {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "VM source IPv4 is its port's CA",
        file: "nv-ebpf/src/from_vm.rs",
        check: "if appliance && !router::speaks_for(port.vsid, own, ip.src) {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "ARP sender fields are the port's",
        file: "nv-ebpf/src/arp.rs",
        check: "if arp.sha != port.mac || (v4_mapped(arp.spa) != port.ca && arp.spa != [0; 4]) {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "VLAN tag the kernel moved out of a VM's frame refused",
        file: "nv-ebpf/src/from_vm.rs",
        check: "if unsafe { (*skb).vlan_present } != 0 {",
        removed: "if false {",
        tests: &["attacks"],
    },
    Mutation {
        name: "VLAN tag in a VM's frame refused",
        file: "nv-ebpf/src/from_vm.rs",
        check: "ETH_P_8021Q | ETH_P_8021AD => Err(Counter::DropVmVlan),",
        removed: "",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no super-packet of a VM's own tunnel under NVGRE",
        file: "nv-ebpf/src/encap.rs",
        check: "        if unsafe { (*ctx.skb.skb).gso_size } != 0 {\n            return Err(Counter::DropVmNestedGso);",
        removed: "        if false {\n            return Err(Counter::DropVmNestedGso);",
        // Only the kernel's segmentation of a real super-packet shows it.
        tests: &["two_hosts"],
    },
    Mutation {
        name: "no ARP answer from the bounce pair",
        file: "nv-ebpf/src/from_vm.rs",
        check: "ETH_P_ARP if !bounced => arp::reply(ctx, port),",
        removed: "ETH_P_ARP => arp::reply(ctx, port),",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no ICMP answer from the bounce pair",
        file: "nv-ebpf/src/from_vm.rs",
        check: "        if bounced {\n            // An answer would leave by the bounce device",
        removed: "        if false {\n            // An answer would leave by the bounce device",
        tests: PROGRAMS,
    },
    Mutation {
        name: "segments back from the bounce pair only leave by NVGRE",
        file: "nv-ebpf/src/from_vm.rs",
        check: "if bounced && (dst.ifindex != 0 || dst.method != Method::Encap as u8) {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no IPv4 options by rewrite",
        file: "nv-ebpf/src/from_vm.rs",
        check: "if overhead == 0 && hlen != 20 {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "too big for the uplink answered, not sent",
        file: "nv-ebpf/src/pmtu.rs",
        check: "if mtu == 0 || l3_len + overhead <= mtu {",
        removed: "if true {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "delivery only to the VM's own port",
        file: "nv-ebpf/src/deliver.rs",
        check: "if port.vsid != vsid || crate::packet::v4_of(&port.ca) != Some(ca) {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "into a tap by its egress (the guest's receive)",
        file: "nv-ebpf/src/deliver.rs",
        check: "Ok(if port.is_tap() {",
        removed: "Ok(if false {",
        // Only a real guest behind a real tap tells a frame handed to it from one freed.
        tests: &["guests"],
    },
    Mutation {
        name: "no delivery to a port that is down",
        file: "nv-ebpf/src/deliver.rs",
        check: "if port.is_down() {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "NVGRE flags are NVGRE's",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if u16::from_be_bytes(gre.flags) != GRE_FLAGS_NVGRE {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no outer fragments",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if ip.is_fragment() {\n        return Err(Counter::DropUplinkFragment);",
        removed: "if false {\n        return Err(Counter::DropUplinkFragment);",
        tests: PROGRAMS,
    },
    Mutation {
        name: "NVGRE addressed to the uplink's MAC",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "seen promiscuously.\n    to_our_mac(config, data, end)?;",
        removed: "seen promiscuously.",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no tagged inner frame",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "ETH_P_8021Q | ETH_P_8021AD => return Err(Counter::DropUplinkInnerVlan),",
        removed: "",
        tests: PROGRAMS,
    },
    Mutation {
        name: "inner IPv4 header a VM would take",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "return Err(Counter::DropUplinkInnerMalformed);",
        removed: "",
        tests: PROGRAMS,
    },
    Mutation {
        name: "NVGRE only to a VM here",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if dst.ifindex == 0 {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "NVGRE from the PA recorded for its source",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if !ip.sent_from(&src.pa) {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "NVGRE with the MAC recorded for its source",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if inner_eth.src != mac && (inner_eth.src != router::mac() || router::domain(vsid).is_none())",
        removed: "if false",
        tests: PROGRAMS,
    },
    Mutation {
        name: "rewrite source PA of the same VSID",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "let src_mac = if src.vsid == dst.vsid {",
        removed: "let src_mac = if true {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "a routed rewrite source lives in a subnet of the same domain",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "} else if router::source_of(dst.vsid, src_ca) == Some(src.vsid) {",
        removed: "} else if true {",
        tests: &["programs", "fuzz", "router"],
    },
    Mutation {
        name: "rewrite addressed to the uplink's MAC",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "as NVGRE must be.\n    to_our_mac(config, data, end)?;",
        removed: "as NVGRE must be.",
        tests: PROGRAMS,
    },
    Mutation {
        name: "NVGRE only to the PA its destination's record names",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "                Err(Counter::DropUplinkWrongPa)",
        removed: "                nvgre(config, data, end, ip, gre_off)",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no NVGRE speaking for a VM of this host",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "own, forged.\n    if src.ifindex != 0 {",
        removed: "own, forged.\n    if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "no rewrite speaking for a VM of this host",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "never leaves the host.\n    if src.ifindex != 0 {",
        removed: "never leaves the host.\n    if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "nothing tagged for nv on the uplink",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "    if is_tenant_traffic_tagged(config, data, end, proto) {",
        removed: "    if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "a tag the kernel took out of an uplink frame is seen",
        file: "nv-ebpf/src/uplink_tc.rs",
        check: "let tagged = unsafe { (*ctx.skb.skb).vlan_present } != 0;",
        removed: "let tagged = false;",
        // Only the kernel's own untagging on receive sets it.
        tests: &["host_isolation"],
    },
    Mutation {
        name: "a rewrite PA whose VM went stays the datapath's",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if unsafe { LOCAL_PAS.get(ip.dst) }.is_some_and(nv_common::LocalPa::is_owned) {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "nothing from a rewrite PA reaches the host",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if unsafe { REWRITE_PAS.get(self.src) }.is_some() {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "nothing to another host's rewrite PA reaches the host",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if unsafe { REWRITE_PAS.get(self.dst) }.is_some() {",
        removed: "if false {",
        tests: PROGRAMS,
    },
    Mutation {
        name: "ARP answered only for the datapath's own PAs",
        file: "nv-ebpf/src/uplink_arp.rs",
        check: "&& unsafe { LOCAL_PAS.get(arp.tpa) }.is_some_and(LocalPa::is_owned)",
        removed: "&& unsafe { LOCAL_PAS.get(arp.tpa) }.is_some()",
        tests: PROGRAMS,
    },
    Mutation {
        name: "a VM's checksum offsets checked before rewrite",
        file: "nv-ebpf/src/rewrite.rs",
        check: "crate::csum_offload::check(ctx, ETH_HLEN + usize::from(ip.hlen))?;",
        removed: "",
        // BPF_PROG_TEST_RUN cannot hand a program a CHECKSUM_PARTIAL packet.
        tests: &["host_isolation"],
    },
    Mutation {
        name: "ICMP answers budgeted per VM port",
        file: "nv-ebpf/src/pmtu.rs",
        check: "let port_ifindex = unsafe { (*ctx.skb.skb).ifindex };",
        removed: "let port_ifindex = 0u32;",
        tests: PROGRAMS,
    },
    Mutation {
        name: "a guest's super-packet known by its segment size",
        file: "nv-ebpf/src/encap.rs",
        check: "    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;\n    // A GSO super-packet's IPv4",
        removed: "    let gso = unsafe { (*ctx.skb.skb).gso_segs } > 1;\n    // A GSO super-packet's IPv4",
        // A tap's super-packet has no segment count; BPF_PROG_TEST_RUN cannot make one.
        tests: &["host_isolation"],
    },
    Mutation {
        name: "rewrite PAs leave the host's uplink",
        file: "nv-agent/src/agent/uplink.rs",
        check: "            self.release_address(p).await?;",
        removed: "",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "no rewrite PA on an address the host had",
        file: "nv-agent/src/catalog.rs",
        check: "Some(p) if r.method == Method::Rewrite && !p.added_address && !p.rewrite => {",
        removed: "Some(p) if false && p.rewrite => {",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "provider prefix at least /15",
        file: "nv-agent/src/agent/uplink.rs",
        check: "if p.pa.len < min {",
        removed: "if false {",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "no provider address another host's records name",
        file: "nv-agent/src/agent/uplink.rs",
        check: "if remote > 0 {",
        removed: "if false {",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "no provider address of another device",
        file: "nv-agent/src/agent/uplink.rs",
        check: "if let Some(other) = self.netlink.holder_of(p.pa.addr, link.index).await? {",
        removed: "if let Some(other) = None::<String> {",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "no VM port enslaved to a bridge",
        file: "nv-agent/src/netlink.rs",
        check: "if self.master != 0 {",
        removed: "if false {",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "no VM port whose veth peer is the host's",
        file: "nv-agent/src/netlink.rs",
        check: "if self.kind == LinkKind::Veth && !self.peer_elsewhere {",
        removed: "if false {",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "a port that cannot be filtered is set down",
        file: "nv-agent/src/agent/vm_ports.rs",
        check: "return self.set_down(&link, &e).await;",
        removed: "return Err(e);",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "listeners serve a capped number of connections",
        file: "nv-agent/src/listener.rs",
        check: "let slots = Arc::new(Semaphore::new(limits.cap));",
        removed: "let slots = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));",
        tests: &["host_isolation"],
    },
    Mutation {
        name: "only VSIDs of a routing domain are routed",
        file: "nv-ebpf/src/router.rs",
        check: "        domain(port.vsid)\n",
        removed: "        Some(domain(port.vsid).unwrap_or(0))\n",
        tests: &["router"],
    },
    Mutation {
        name: "a routed packet rides in its destination's VSID",
        file: "nv-ebpf/src/from_vm.rs",
        check: "        from.vsid = vsid;\n",
        removed: "",
        tests: &["router"],
    },
    Mutation {
        name: "TTL 1 expires at the router",
        file: "nv-ebpf/src/from_vm.rs",
        check: "if ip.ttl <= 1 {",
        removed: "if false {",
        tests: &["router"],
    },
    Mutation {
        name: "ARP for a gateway only from its own subnet",
        file: "nv-ebpf/src/router.rs",
        check: ".is_some_and(|v| *v == vsid)",
        removed: ".is_some()",
        tests: &["router"],
    },
    Mutation {
        name: "a routed source comes from the router's MAC",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "(src, if from == vsid { src.mac } else { router::mac() })",
        removed: "(src, inner_eth.src)",
        tests: &["router"],
    },
    Mutation {
        name: "only a route's next hop speaks for the world behind it",
        file: "nv-ebpf/src/router.rs",
        check: ".is_some_and(|hop| !hop.on_link() && hop.vsid == vsid && hop.nexthop == own)",
        removed: ".is_some_and(|hop| !hop.on_link())",
        tests: &["router"],
    },
    Mutation {
        name: "the router's MAC as a source only in a routed VSID",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "(inner_eth.src != router::mac() || router::domain(vsid).is_none())",
        removed: "(inner_eth.src != router::mac())",
        tests: PROGRAMS,
    },
    Mutation {
        name: "DHCP goes to the agent only from a VSID with a subnet",
        file: "nv-ebpf/src/dhcp.rs",
        check: "let routed = router::domain(port.vsid).is_some();",
        removed: "let routed = port.vsid != 0;",
        tests: &["router"],
    },
    Mutation {
        name: "a VM's DHCP requests spend its port's budget",
        file: "nv-ebpf/src/dhcp.rs",
        check: "if !budget::take(&SLOW_BUCKET, ifindex, SLOW_PER_SEC, SLOW_BURST) {",
        removed: "if ifindex == 0 {",
        tests: &["router"],
    },
    Mutation {
        name: "a DHCP request handed to the agent goes no further",
        file: "nv-ebpf/src/dhcp.rs",
        check: "    Ok(TC_ACT_SHOT)",
        removed: "    Ok(aya_ebpf::bindings::TC_ACT_OK as i32)",
        tests: &["router"],
    },
    Mutation {
        name: "a VM sends IPv6 only from its own records",
        file: "nv-ebpf/src/from_vm6.rs",
        check: "if !nd::is_own(port, ifindex, &ip.src) {",
        removed: "if ip.src == [0; 16] {",
        tests: &["ipv6", "fuzz"],
    },
    Mutation {
        name: "no VM sends router advertisements",
        file: "nv-ebpf/src/from_vm6.rs",
        check: "ND_ROUTER_ADVERT | ND_REDIRECT => drop(Counter::DropVmRouterGuard),",
        removed: "ND_REDIRECT => drop(Counter::DropVmRouterGuard),",
        tests: &["ipv6", "fuzz"],
    },
    Mutation {
        name: "a VM's own IPv6 address is not advertised to it",
        file: "nv-ebpf/src/nd.rs",
        check: "Some(record) if record.ifindex == ifindex => UNANSWERED,",
        removed: "Some(record) if record.ifindex == u32::MAX => UNANSWERED,",
        tests: &["ipv6", "fuzz"],
    },
    Mutation {
        name: "IPv6 in NVGRE comes with its source's recorded MAC",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if *mac != recorded && (*mac != router::mac() || router::domain(vsid).is_none()) {",
        removed: "if *mac == [0; 6] {",
        tests: &["ipv6", "fuzz"],
    },
    Mutation {
        name: "TC decapsulation says IPv6 for an IPv6 frame",
        file: "nv-ebpf/src/uplink_tc.rs",
        check: "if v6 {\n        BPF_F_ADJ_ROOM_DECAP_L3_IPV6\n",
        removed: "if v6 {\n        BPF_F_ADJ_ROOM_DECAP_L3_IPV4\n",
        tests: &["ipv6"],
    },
    Mutation {
        name: "the router answers neighbour discovery only for its addresses in the VM's VSID",
        file: "nv-ebpf/src/router6.rs",
        check: "unsafe { GATEWAYS6.get(key) }.is_some_and(|v| *v == vsid)",
        removed: "unsafe { GATEWAYS6.get(key) }.is_some()",
        tests: &["ipv6"],
    },
    Mutation {
        name: "router solicitations go to the agent only from a routed VSID",
        file: "nv-ebpf/src/from_vm6.rs",
        check: "ROUTER_SOLICIT if router::domain(port.vsid).is_some() => {",
        removed: "ROUTER_SOLICIT if port.vsid != 0 => {",
        tests: &["ipv6"],
    },
    Mutation {
        name: "IPv6 too big for the uplink answered, not sent",
        file: "nv-ebpf/src/pmtu.rs",
        check: "let fits = mtu == 0 || l3_len + overhead <= mtu;",
        removed: "let fits = true;",
        tests: &["ipv6"],
    },
    Mutation {
        name: "no ICMPv6 error answers an error",
        file: "nv-ebpf/src/icmp6.rs",
        check: "let is_error = ip.next == IPPROTO_ICMPV6",
        removed: "let is_error = ip.next == 0 && ip.next == IPPROTO_ICMPV6",
        tests: &["ipv6"],
    },
    Mutation {
        name: "IPv6 rewrite: no host process sends from a rewrite PA",
        file: "nv-ebpf/src/uplink_egress.rs",
        check: "if unsafe { LOCAL_PAS6.get(ip.src) }.is_some_and(LocalPa::is_owned) {",
        removed: "if false {",
        tests: &["underlay6"],
    },
    Mutation {
        name: "IPv6 rewrite: no router talk arrives by it",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "    if router_talk(data, end, ip.next, ETH_HLEN + IPV6_HLEN) {",
        removed: "    if false {",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 rewrite: from a rewrite PA only its own advertisement reaches the host",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "            && !crate::uplink_nd::advertises_itself(data, end, ip, l3)",
        removed: "            && false",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 underlay: an IPv4-mapped outer address is no IPv4 PA",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "    *pa == *addr && v4_of(pa).is_none()",
        removed: "    *pa == *addr",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 rewrite: taken only from a rewrite PA of the same VSID",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if src.vsid != dst.vsid {",
        removed: "if src.vsid == 0 {",
        tests: &["rewrite6", "fuzz"],
    },
    Mutation {
        name: "IPv6 rewrite: only what it restores exactly leaves by it",
        file: "nv-ebpf/src/from_vm6.rs",
        check: "if l4 != ETH_HLEN + IPV6_HLEN || !matches!(",
        removed: "if l4 == 0 || !matches!(",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 rewrite: the uplink answers solicitations for owned PAs only",
        file: "nv-ebpf/src/uplink_nd.rs",
        check: "unsafe { LOCAL_PAS6.get(target) }.is_some_and(LocalPa::is_owned)",
        removed: "unsafe { LOCAL_PAS6.get(target) }.is_some()",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 rewrite: nothing from a rewrite PA reaches the host",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if unsafe { REWRITE_PAS6.get(self.src) }.is_some() {",
        removed: "if false {",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 rewrite: the checksum follows both addresses",
        file: "nv-ebpf/src/rewrite6.rs",
        check: "        bpf_csum_diff(old.add(4), 16, dst.as_ptr().cast_mut().cast(), 16, d as u32)\n",
        removed: "        d\n",
        tests: &["rewrite6"],
    },
    Mutation {
        name: "IPv6 underlay: NVGRE over IPv6 comes from its sender's recorded PA",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "        names_pa(&self.src, pa)\n",
        removed: "        true\n",
        tests: &["underlay6", "fuzz"],
    },
    Mutation {
        name: "IPv6 underlay: a fragment of NVGRE over IPv6 to our PA is dropped",
        file: "nv-ebpf/src/uplink_rx.rs",
        check: "if carries_gre && ip.to_us() {",
        removed: "if carries_gre && ip.to_us() && ip.next == 0 {",
        tests: &["underlay6"],
    },
    Mutation {
        name: "IPv6 underlay: a VM whose PA is IPv6 never sends to an IPv4 PA",
        file: "nv-ebpf/src/encap.rs",
        check: "    if v4_of(&dst.pa).is_some() {\n        return Err(Counter::DropVmUnderlayFamily);",
        removed: "    if false {\n        return Err(Counter::DropVmUnderlayFamily);",
        tests: &["underlay6", "fuzz"],
    },
    Mutation {
        name: "IPv6 underlay: TC decapsulation says IPv4 for an IPv4 frame from it",
        file: "nv-ebpf/src/uplink_tc.rs",
        check: "    } else {\n        BPF_F_ADJ_ROOM_DECAP_L3_IPV4\n",
        removed: "    } else {\n        0\n",
        tests: &["underlay6"],
    },
    Mutation {
        name: "ACL: rules see the upper layer behind IPv6 extension headers",
        file: "nv-ebpf/src/acl.rs",
        check: "let (proto, l4) = upper_layer6(ctx, t.proto)?;",
        removed: "let (proto, l4) = (t.proto, ETH_HLEN + 40);",
        tests: &["acl_programs"],
    },
    Mutation {
        name: "ACL: a VM's inbound rules are checked at delivery",
        file: "nv-ebpf/src/deliver.rs",
        check: "    crate::acl::admits(ctx, port, nv_common::acl::DIR_IN)?;",
        removed: "    let _ = nv_common::acl::DIR_IN;",
        tests: &["acl_programs"],
    },
    Mutation {
        name: "ACL: a VM's outbound rules are checked before forwarding",
        file: "nv-ebpf/src/from_vm.rs",
        check: "        acl::admits(ctx, port, DIR_OUT)?;",
        removed: "        let _ = (acl::admits, DIR_OUT);",
        tests: &["acl_programs"],
    },
    Mutation {
        name: "ACL: a stateful allow admits its connections' answers",
        file: "nv-ebpf/src/acl.rs",
        check: "let (rule, opened) = established(&s.flow, &s.t, dir, now);",
        removed: "let (rule, opened) = (0, dir);",
        tests: &["acl"],
    },
    Mutation {
        name: "ACL: a VM's flows spread over its whole budget",
        file: "nv-ebpf/src/acl.rs",
        check: "        set: s.t.flow_set(set.flow_sets),",
        removed: "        set: 0,",
        tests: &["acl"],
    },
    Mutation {
        name: "ACL: deny wins at equal weight",
        file: "nv-agent/src/model/acl.rs",
        check: "u8::from(self.action == Action::Allow),",
        removed: "u8::from(self.action == Action::Deny),",
        tests: &["acl"],
    },
    Mutation {
        name: "ACL: of ICMP only echoes belong to a tracked connection",
        file: "nv-ebpf/src/acl.rs",
        check: "if (t.proto == IPPROTO_ICMP || t.proto == IPPROTO_ICMPV6) && t.echo == 0 {",
        removed: "if (t.proto == IPPROTO_ICMP || t.proto == IPPROTO_ICMPV6) && t.echo == 9 {",
        tests: &["acl_programs"],
    },
    Mutation {
        name: "a host that does not forward keeps the kernel's hop once cached",
        file: "nv-ebpf/src/underlay.rs",
        check: "        if nh.pa == dst_pa && nh.expires > now {\n            check_cached_mtu(ctx, uplink, nh.mtu)?;\n            // Written out here: a helper returning the hop would return it through the stack.\n            if nh.ifindex == 0 {",
        removed: "        if nh.pa == dst_pa && nh.expires > now {\n            check_cached_mtu(ctx, uplink, nh.mtu)?;\n            // Written out here: a helper returning the hop would return it through the stack.\n            if nh.ifindex == 9 {",
        tests: &["programs"],
    },
    Mutation {
        name: "a host that does not forward sends to the agent's underlay hop",
        file: "nv-ebpf/src/underlay.rs",
        check: "&& let Some(hop) = unsafe { UNDERLAY_HOPS.get(dst_pa) }",
        removed: "&& let Some(hop) = unsafe { UNDERLAY_HOPS.get(dst_pa.wrapping_add(1)) }",
        tests: &["programs"],
    },
    Mutation {
        name: "underlay hops the agent no longer renews are not used",
        file: "nv-ebpf/src/underlay.rs",
        check: "&& alive > unsafe { bpf_ktime_get_ns() }",
        removed: "&& alive > 0",
        tests: &["programs"],
    },
    Mutation {
        name: "a stale neighbour of an underlay hop is probed",
        file: "nv-agent/src/underlay_hops.rs",
        check: "            self.mark_used(uplink, next).await;",
        removed: "            let _ = next;",
        tests: &["two_hosts"],
    },
];

pub fn run(only: Option<&str>) -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = root.join("target/mutants/src");
    copy_tree(&root, &scratch)?;
    let mut rows = Vec::new();
    for m in MUTATIONS
        .iter()
        .filter(|m| only.is_none_or(|o| m.name.contains(o)))
    {
        let path = scratch.join(m.file);
        let original = fs::read_to_string(&path)?;
        ensure!(
            original.matches(m.check).count() == 1,
            "{}: the check `{}` is not in {} exactly once (the table needs updating)",
            m.name,
            m.check,
            m.file
        );
        fs::write(&path, original.replacen(m.check, m.removed, 1))?;
        let start = Instant::now();
        let caught = tests_fail(&scratch, m.tests);
        fs::write(&path, &original)?;
        let caught = caught?;
        println!(
            "{:<56} {:<8} {:>4.0} s  ({})",
            m.name,
            if caught { "caught" } else { "MISSED" },
            start.elapsed().as_secs_f64(),
            m.tests.join(", ")
        );
        rows.push((m.name, caught));
    }
    let missed: Vec<&str> = rows.iter().filter(|r| !r.1).map(|r| r.0).collect();
    println!(
        "mutants: {} caught, {} missed",
        rows.len() - missed.len(),
        missed.len()
    );
    if !missed.is_empty() {
        bail!("no test notices the removal of: {}", missed.join("; "));
    }
    Ok(())
}

/// The tracked files of the tree, copied afresh into `to` (its build directory is kept).
fn copy_tree(root: &Path, to: &Path) -> anyhow::Result<()> {
    let listed = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .context("run git ls-files")?;
    ensure!(listed.status.success(), "git ls-files failed");
    let _ = fs::remove_dir_all(to);
    for file in listed.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let rel = Path::new(std::str::from_utf8(file)?);
        let dst = to.join(rel);
        if let Some(dir) = dst.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(root.join(rel), &dst).with_context(|| format!("copy {}", rel.display()))?;
    }
    Ok(())
}

/// Whether the test targets fail in the scratch tree (a build failure is an error, not a
/// catch: the mutation must compile).
fn tests_fail(scratch: &Path, tests: &[&str]) -> anyhow::Result<bool> {
    let target = scratch.join("../target");
    let path = crate::setup::path_with_tools()?;
    let cargo = |args: &[&str]| {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.args(args)
            .current_dir(scratch)
            .env("CARGO_TARGET_DIR", &target)
            .env("PATH", &path);
        c
    };
    let mut test = vec!["test", "--quiet", "-p", "nv-tests"];
    for t in tests {
        test.extend(["--test", t]);
    }
    let mut build_tests = test.clone();
    build_tests.push("--no-run");
    // The integration tests run the agent binary of this build.
    for args in [
        &["build", "--quiet", "-p", "nv-agent", "--bins"][..],
        &build_tests,
    ] {
        let built = cargo(args).output().context("build the mutated tree")?;
        if !built.status.success() {
            bail!(
                "the mutated tree does not build: {}",
                String::from_utf8_lossy(&built.stderr)
            );
        }
    }
    let ran = cargo(&test)
        .env("NV_BIN_DIR", target.join("debug"))
        .output()
        .context("run the tests")?;
    Ok(!ran.status.success())
}

#[cfg(test)]
mod tests {
    use super::MUTATIONS;

    /// The table follows the code: every check it removes is where it says, once (a check
    /// that moved would make `cargo xtask mutants` stop at it).
    #[test]
    fn every_check_is_in_its_file_once() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let lost: Vec<String> = MUTATIONS
            .iter()
            .filter(|m| {
                std::fs::read_to_string(root.join(m.file))
                    .map_or(true, |text| text.matches(m.check).count() != 1)
            })
            .map(|m| format!("{} ({})", m.name, m.file))
            .collect();
        assert!(lost.is_empty(), "checks not found once: {lost:#?}");
    }
}
