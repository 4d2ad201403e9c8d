//! Fuzzing the datapath with `BPF_PROG_TEST_RUN`: random and mutated frames (valid NVGRE, ARP,
//! IPv4 TCP/UDP and IP-rewrite packets as seeds) through every program, against the maps of
//! `fixture::host`, with two properties checked on every frame:
//! - no verdict outside the program's contract (never `XDP_ABORTED`), and every drop counted
//!   under a reason (the drop counters grow by exactly the number of drops);
//! - every frame that comes out goes to the port of the VSID and CA it belongs to, and to no
//!   other: NVGRE only to the VM whose (VSID, CA) the key and inner destination name, a VM's frame
//!   only inside its own VSID. On TC paths the port is the one the program redirected to, as
//!   the tracing copy of the programs records it ([`RedirectTrace`]), and how it was redirected
//!   (into a veth's peer, out of the uplink, back out of the sending VM's own port).
mod ipv6;

use std::{collections::HashMap, mem::size_of};

use anyhow::{bail, ensure};
use nv_common::{
    DatapathConfig, DeliverMeta, DeliverMeta6, LookupKey, RedirectTrace, RestoreMeta,
    program_names::{FROM_BOUNCE, FROM_VM, UPLINK_TC, UPLINK_XDP},
    v4_mapped,
};

use crate::fixture::{
    AMBER, AMBER1_MAC, AMBER2_MAC, AMBER3_MAC, BLUE1_MAC, BLUE2_MAC, CA_B, CA_GB, CA1, CA2, CA3,
    CA6_1, CA6_2, CA6_3, CA6_B, GATEWAY_A, GATEWAY_MAC, GATEWAY6_A, GREEN_B, GREEN_B_PA,
    GREEN_GATEWAY_MAC, GREEN1_MAC, GREEN1_PA, GREEN2_MAC, GREEN2_PA, Host, LOCAL_PA, LOCAL_PA6,
    LOCAL_RW6, OTHER_RW6, RED, RED1_MAC, RED2_MAC, RED3_MAC, REMOTE_PA, REMOTE_PA6, REMOTE_RW6,
    ROUTER_MAC, TEAL, TEAL1_MAC, TEAL2_MAC, arp_frame, dhcp_discover, green_packets, host, nvgre,
    nvgre6, solicitation, udp_frame, udp6,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// xorshift64*: deterministic, so a failure names the seed that reproduces it.
struct Rng(u64);

impl Rng {
    /// splitmix64 of the seed: every seed its own stream, never the all-zero state.
    fn of_seed(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        #[expect(clippy::cast_possible_truncation, reason = "modulo a usize")]
        let r = (self.next() % n as u64) as usize;
        r
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// IPv6: a neighbour solicitation, a packet to a VM there and to one here, a router
/// advertisement, and NVGRE carrying IPv6 in.
fn ipv6_seeds(h: &Host) -> Vec<Vec<u8>> {
    let udp = |src_mac, dst_mac, src, dst| udp6(src_mac, dst_mac, src, dst, (40000, 7));
    let ns = solicitation(RED1_MAC, CA6_1, CA6_2);
    let mut ra = Vec::new();
    etherparse::PacketBuilder::ethernet2(RED1_MAC, [0x33, 0x33, 0, 0, 0, 1])
        .ipv6(
            CA6_1,
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 134,
            code_u8: 0,
            bytes5to8: [64, 0, 7, 8],
        })
        .write(&mut ra, &[0; 8])
        .expect("build RA");
    vec![
        ns,
        ra,
        udp(RED1_MAC, RED2_MAC, CA6_1, CA6_2),
        udp(RED1_MAC, RED3_MAC, CA6_1, CA6_3),
        udp(BLUE1_MAC, BLUE2_MAC, CA6_1, CA6_2),
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &udp(RED2_MAC, RED1_MAC, CA6_2, CA6_1),
        ),
    ]
    .into_iter()
    .chain(ipv6_router_seeds(h))
    .collect()
}

/// IPv6 and the router: a routed packet, one whose hop limit ends at the router, an echo to
/// a gateway, solicitations for the router's addresses, a router solicitation, a `DHCPv6`
/// solicit, a packet too big for the uplink, and a routed packet arriving by NVGRE.
fn ipv6_router_seeds(h: &Host) -> Vec<Vec<u8>> {
    let udp = |src_mac, dst_mac, src, dst| udp6(src_mac, dst_mac, src, dst, (40000, 7));
    let routed = udp(RED1_MAC, ROUTER_MAC, CA6_1, CA6_B);
    let mut last_hop = routed.clone();
    last_hop[21] = 1;
    let mut echo = Vec::new();
    etherparse::PacketBuilder::ethernet2(RED1_MAC, ROUTER_MAC)
        .ipv6(CA6_1, GATEWAY6_A, 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .expect("build echo");
    let router_ll = nv_common::routing::router_link_local(ROUTER_MAC);
    let mut rs = Vec::new();
    etherparse::PacketBuilder::ethernet2(RED1_MAC, [0x33, 0x33, 0, 0, 0, 2])
        .ipv6(
            CA6_1,
            [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::RouterSolicitation)
        .write(&mut rs, &[])
        .expect("build RS");
    let solicit = udp6(
        RED1_MAC,
        [0x33, 0x33, 0, 1, 0, 2],
        CA6_1,
        [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2],
        (546, 547),
    );
    let mut big = Vec::new();
    etherparse::PacketBuilder::ethernet2(RED1_MAC, RED2_MAC)
        .ipv6(CA6_1, CA6_2, 64)
        .udp(40000, 7)
        .write(&mut big, &[0x5a; 1460])
        .expect("build big");
    vec![
        routed,
        last_hop,
        echo,
        solicitation(RED1_MAC, CA6_1, router_ll),
        solicitation(RED1_MAC, CA6_1, GATEWAY6_A),
        rs,
        solicit,
        big,
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            RED << 8,
            0,
            &udp(ROUTER_MAC, RED1_MAC, CA6_B, CA6_1),
        ),
    ]
}

fn seeds(h: &Host) -> Vec<Vec<u8>> {
    let to_red1 = udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"seed payload");
    let mut seeds = vec![
        udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, b"seed payload"),
        // Too big for the uplink once encapsulated: answered with ICMP fragmentation needed.
        udp_frame(RED1_MAC, RED2_MAC, CA1, CA2, &[0x5a; 1472]),
        udp_frame(RED1_MAC, RED3_MAC, CA1, CA3, b"seed"),
        udp_frame(BLUE1_MAC, BLUE2_MAC, CA1, CA2, b"seed"),
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            (RED << 8) | 3,
            0,
            &to_red1,
        ),
        nvgre(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            6001 << 8,
            0,
            &udp_frame(BLUE2_MAC, BLUE1_MAC, CA2, CA1, b"s"),
        ),
        udp_frame(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA,
            LOCAL_PA,
            b"host traffic",
        ),
    ];
    seeds.push(arp_frame(RED1_MAC, 1, RED1_MAC, CA1, CA2));
    // The router: across subnets, to a gateway (ARP and echo), and a routed source arriving.
    seeds.push(udp_frame(RED1_MAC, ROUTER_MAC, CA1, CA_B, b"routed"));
    seeds.push(udp_frame(BLUE1_MAC, ROUTER_MAC, CA1, CA_B, b"routed"));
    seeds.push(udp_frame(RED1_MAC, ROUTER_MAC, CA1, CA3, b"routed here"));
    seeds.push(udp_frame(
        GREEN1_MAC,
        ROUTER_MAC,
        CA1,
        CA_GB,
        b"routed by rewrite",
    ));
    seeds.push(udp_frame(
        GREEN_GATEWAY_MAC,
        h.uplink_mac,
        GREEN_B_PA,
        GREEN1_PA,
        b"routed rewrite in",
    ));
    seeds.push(arp_frame(RED1_MAC, 1, RED1_MAC, CA1, GATEWAY_A));
    // A DHCP discover: handed to the agent (the slow path), never forwarded.
    seeds.push(dhcp_discover(RED1_MAC, [0; 4], [255; 4]));
    seeds.extend(ipv6_seeds(h));
    seeds.extend(ipv6_underlay_seeds(h));
    let echo = etherparse::PacketBuilder::ethernet2(RED1_MAC, ROUTER_MAC)
        .ipv4(CA1, GATEWAY_A, 64)
        .icmpv4_echo_request(1, 1);
    let mut ping = Vec::new();
    echo.write(&mut ping, b"seed").expect("build echo");
    seeds.push(ping);
    seeds.push(nvgre(
        GATEWAY_MAC,
        h.uplink_mac,
        REMOTE_PA,
        LOCAL_PA,
        RED << 8,
        0,
        &udp_frame(ROUTER_MAC, RED1_MAC, CA_B, CA1, b"routed in"),
    ));
    // The underlay asking for a rewrite PA the datapath owns, and for the host's own.
    seeds.push(arp_frame(GATEWAY_MAC, 1, GATEWAY_MAC, REMOTE_PA, GREEN1_PA));
    seeds.push(arp_frame(GATEWAY_MAC, 1, GATEWAY_MAC, REMOTE_PA, LOCAL_PA));
    seeds.extend(
        green_packets(GREEN1_MAC, GREEN2_MAC, CA1, CA2)
            .into_iter()
            .map(|(_, f)| f),
    );
    seeds.extend(
        green_packets(GREEN_GATEWAY_MAC, h.uplink_mac, GREEN2_PA, GREEN1_PA)
            .into_iter()
            .map(|(_, f)| f),
    );
    seeds
}

/// Header offsets worth aiming at: Ethernet type, IPv4 version/IHL, protocol, addresses, GRE
/// flags, protocol and key, inner Ethernet type and addresses.
const HOT: [usize; 14] = [
    12,
    13,
    14,
    23,
    26,
    30,
    34,
    35,
    36,
    38,
    41,
    54,
    56 + 12,
    56 + 16,
];

/// `BPF_PROG_TEST_RUN` itself refuses frames shorter than Ethernet, or than the IPv4/IPv6
/// header their type announces; such frames are padded with random bytes (the programs still
/// meet every truncation beyond those headers).
fn runnable(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    while f.len() < 14 {
        f.push(rng.byte());
    }
    let need = match f.get(12..14) {
        Some([0x08, 0x00]) => 34,
        Some([0x86, 0xdd]) => 54,
        _ => 14,
    };
    while f.len() < need {
        f.push(rng.byte());
    }
    f
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut f = seed.to_vec();
    match rng.below(6) {
        0 => {
            // Entirely random.
            let len = 14 + rng.below(200);
            f = (0..len).map(|_| rng.byte()).collect();
        }
        1 => {
            let cut = rng.below(f.len().max(1));
            f.truncate(cut.max(1));
        }
        2 => {
            let extra = rng.below(64);
            f.extend((0..extra).map(|_| rng.byte()));
        }
        _ => {
            for _ in 0..=rng.below(4) {
                let at = if rng.below(2) == 0 {
                    HOT[rng.below(HOT.len())]
                } else {
                    rng.below(f.len().max(1))
                };
                if at < f.len() {
                    f[at] = rng.byte();
                }
            }
        }
    }
    f
}

/// Where each (VSID, CA) of the fixture lives: its port ifindex (0 when remote).
/// The PA and MAC each record says its CA sends from: what NVGRE delivered for it must carry.
fn sources_by_record(h: &Host) -> HashMap<LookupKey, ([u8; 16], [u8; 6])> {
    h.desired
        .lookups
        .iter()
        .map(|(k, v)| (*k, (v.pa, v.mac)))
        .collect()
}

/// A delivered NVGRE frame speaks for its inner source only as its record allows: from the
/// PA and with the MAC recorded for (VSID, inner source CA); or, routed, for a CA of another
/// VSID of the same routing domain, from its PA and the router's MAC.
fn check_nvgre_source(known: &Known, input: &[u8], vsid: u32, inner: &[u8]) -> anyhow::Result<()> {
    let (outer_src, _, _) = outer(input).ok_or_else(|| anyhow::anyhow!("not NVGRE"))?;
    let (inner_src, _) = ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("no inner IPv4"))?;
    let recorded = known.sources.get(&LookupKey {
        vsid,
        ca: inner_src,
    });
    // Its own MAC, or the router's when its host routed it within this VSID (a routed VSID).
    let routed_here =
        known.domains.contains_key(&vsid) && inner.get(6..12) == Some(&ROUTER_MAC[..]);
    if recorded.is_some_and(|(pa, mac)| {
        *pa == outer_src && (inner.get(6..12) == Some(&mac[..]) || routed_here)
    }) {
        return Ok(());
    }
    let routed = known.sources.iter().any(|(k, (pa, _))| {
        k.ca == inner_src
            && k.vsid != vsid
            && known.same_domain(k.vsid, vsid)
            && *pa == outer_src
            && inner.get(6..12) == Some(&ROUTER_MAC[..])
    });
    // Or a next hop of the domain answering for the world behind it: from its PA, and from
    // the router's MAC (its own, when it is of this VSID).
    let domain = known.domains.get(&vsid);
    let from_appliance = known.appliances.iter().any(|a| {
        let (d, v, ca) = (&a.domain, &a.vsid, &a.ca);
        let inside = a.covers(inner_src);
        let mac = if *v == vsid {
            known
                .sources
                .get(&LookupKey { vsid: *v, ca: *ca })
                .map(|s| s.1)
        } else {
            Some(ROUTER_MAC)
        };
        domain == Some(d)
            && inside
            && known
                .sources
                .get(&LookupKey { vsid: *v, ca: *ca })
                .is_some_and(|(pa, _)| *pa == outer_src)
            && mac.is_some_and(|m| inner.get(6..12) == Some(&m[..]))
    });
    let routed = routed || from_appliance;
    ensure!(
        routed,
        "delivered VSID {vsid} from {inner_src:?} via {outer_src:?}, its record says {recorded:?}"
    );
    Ok(())
}

fn ports_by_record(h: &Host) -> HashMap<LookupKey, u32> {
    h.desired
        .lookups
        .iter()
        .map(|(k, v)| (*k, v.ifindex))
        .collect()
}

fn ipv4(frame: &[u8], at: usize) -> Option<([u8; 4], [u8; 4])> {
    let ip = frame.get(at..at + 20)?;
    Some((ip[12..16].try_into().ok()?, ip[16..20].try_into().ok()?))
}

/// The outer header of a frame carrying GRE, IPv4 or IPv6 (GRE right after it): its source
/// and destination (16-byte form, IPv4 mapped) and where GRE starts.
fn outer(frame: &[u8]) -> Option<([u8; 16], [u8; 16], usize)> {
    match frame.get(12..14)? {
        [0x08, 0x00] if frame.get(23) == Some(&47) => {
            let (src, dst) = ipv4(frame, 14)?;
            let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
            Some((v4_mapped(src), v4_mapped(dst), 14 + ihl))
        }
        [0x86, 0xdd] if frame.get(20) == Some(&47) => Some((
            frame.get(22..38)?.try_into().ok()?,
            frame.get(38..54)?.try_into().ok()?,
            54,
        )),
        _ => None,
    }
}

/// Whether `out` is `input` in NVGRE: grown by exactly the outer headers of its family.
fn encapsulated(input: &[u8], out: &[u8]) -> bool {
    outer(out).is_some_and(|(_, _, gre)| out.len() == input.len() + gre + 8)
}

/// The VSID and inner frame of an NVGRE input, as the fuzzer's own reading of RFC 7637.
fn nvgre_parts(frame: &[u8]) -> Option<(u32, &[u8])> {
    let (_, _, gre) = outer(frame)?;
    let key = u32::from_be_bytes(frame.get(gre + 4..gre + 8)?.try_into().ok()?);
    Some((key >> 8, frame.get(gre + 8..)?))
}

fn drops(h: &Host) -> anyhow::Result<u64> {
    Ok(h.dp
        .counters()?
        .iter()
        .filter(|(c, _)| c.name().starts_with("drop_"))
        .map(|(_, n)| n)
        .sum())
}

/// Checks the properties of one uplink run; `input` went in, `out`/`ret` came out.
/// What the records say: the port of each CA here, and where each CA sends from.
struct Known {
    ports: HashMap<LookupKey, u32>,
    sources: HashMap<LookupKey, ([u8; 16], [u8; 6])>,
    /// Each VM port's PA (16-byte form): its family is the underlay it sends on.
    port_pas: HashMap<u32, [u8; 16]>,
    uplink: u32,
    uplink_mac: [u8; 6],
    /// The provider addresses the datapath owns (answers ARP for).
    owned: Vec<[u8; 4]>,
    /// Each routed VSID's domain, and each domain's gateways (with their subnet's VSID).
    domains: HashMap<u32, u32>,
    gateways: HashMap<(u32, [u8; 4]), u32>,
    /// Routes through a next hop.
    appliances: Vec<Appliance>,
    /// The IPv6 records, and the IPv6 subnets and gateways of the domains.
    v6: ipv6::Records,
    /// The IPv6 rewrite PAs, and the IPv6 PAs the datapath owns (answers solicitations for).
    rewrite6: HashMap<[u8; 16], nv_common::RewritePa>,
    owned6: Vec<[u8; 16]>,
    routes6: Vec<ipv6::Subnet6>,
    gateways6: HashMap<(u32, [u8; 16]), u32>,
}

/// A route through a next hop: in `domain`, `prefix`/`len` is behind the VM (`vsid`, `ca`).
struct Appliance {
    domain: u32,
    prefix: [u8; 4],
    len: u32,
    vsid: u32,
    ca: [u8; 4],
}

impl Appliance {
    fn covers(&self, addr: [u8; 4]) -> bool {
        let mask = u32::MAX.checked_shl(32 - self.len).unwrap_or(0);
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.prefix)
    }
}

impl Known {
    /// Where NVGRE of `vsid` for `dst` is delivered: the VM of that address, or the next hop
    /// (of this VSID) of the world behind it; (its CA, its port: 0 when remote).
    fn delivered_to(&self, vsid: u32, dst: [u8; 4]) -> Option<([u8; 4], u32)> {
        if let Some(port) = self.ports.get(&LookupKey { vsid, ca: dst }) {
            return Some((dst, *port));
        }
        let domain = self.domains.get(&vsid)?;
        self.appliances
            .iter()
            .filter(|a| a.domain == *domain && a.vsid == vsid && a.covers(dst))
            .max_by_key(|a| a.len)
            .and_then(|a| {
                self.ports
                    .get(&LookupKey { vsid, ca: a.ca })
                    .map(|p| (a.ca, *p))
            })
    }

    /// Whether `a` and `b` are VSIDs of one routing domain.
    fn same_domain(&self, a: u32, b: u32) -> bool {
        self.domains
            .get(&a)
            .is_some_and(|d| self.domains.get(&b) == Some(d))
    }

    /// A routed packet from a VM of `vsid` may reach (`to`, `ca`) only in its own domain,
    /// and only a CA with a record there.
    fn may_route(&self, vsid: u32, to: u32, ca: [u8; 4]) -> bool {
        self.same_domain(vsid, to) && self.ports.contains_key(&LookupKey { vsid: to, ca })
    }
}

impl Known {
    fn of(h: &Host) -> anyhow::Result<Known> {
        Ok(Known {
            v6: h.desired.lookups6.clone(),
            rewrite6: h
                .desired
                .rewrite_pas
                .iter()
                .filter(|(pa, _)| nv_common::mapped_v4(pa).is_none())
                .map(|(pa, v)| (*pa, *v))
                .collect(),
            owned6: h
                .desired
                .local_pas6
                .iter()
                .filter(|(_, v)| v.is_owned())
                .map(|(pa, _)| *pa)
                .collect(),
            routes6: h
                .desired
                .routing
                .routes6
                .iter()
                .filter(|(_, hop)| hop.on_link())
                .map(|((len, k), hop)| ipv6::Subnet6 {
                    domain: u32::from_be_bytes(k.rdid),
                    prefix: k.addr,
                    len: len - 32,
                    vsid: hop.vsid,
                })
                .collect(),
            gateways6: h
                .desired
                .routing
                .gateways6
                .iter()
                .map(|(k, v)| ((k.rdid, k.addr), *v))
                .collect(),
            ports: ports_by_record(h),
            sources: sources_by_record(h),
            port_pas: h.desired.ports.iter().map(|(i, p)| (*i, p.pa)).collect(),
            uplink: h.ns.ifindex("uplink0")?,
            uplink_mac: h.uplink_mac,
            owned: h
                .desired
                .local_pas
                .iter()
                .filter(|(_, v)| v.is_owned())
                .map(|(pa, _)| *pa)
                .collect(),
            domains: h
                .desired
                .routing
                .vsids
                .iter()
                .map(|(v, r)| (*v, r.rdid))
                .collect(),
            gateways: h
                .desired
                .routing
                .gateways
                .iter()
                .map(|(k, v)| ((k.rdid, k.addr), *v))
                .collect(),
            appliances: h
                .desired
                .routing
                .routes
                .iter()
                .filter(|(_, hop)| !hop.on_link())
                .map(|((len, k), hop)| Appliance {
                    domain: u32::from_be_bytes(k.rdid),
                    prefix: k.addr,
                    len: len - 32,
                    vsid: hop.vsid,
                    ca: hop.nexthop,
                })
                .collect(),
        })
    }
}

/// The fixture's VM ports are veths: delivery into one is a redirect to its peer.
fn into_vm(port: u32) -> RedirectTrace {
    RedirectTrace {
        ifindex: port,
        how: RedirectTrace::PEER,
    }
}

/// Back out of the port a frame came in on: the VM's receive.
fn back_to(port: u32) -> RedirectTrace {
    RedirectTrace {
        ifindex: port,
        how: RedirectTrace::EGRESS,
    }
}

fn ensure_to_uplink(known: &Known, redirect: Option<RedirectTrace>) -> anyhow::Result<()> {
    ensure!(
        redirect.is_some_and(|r| r.ifindex == known.uplink
            && [RedirectTrace::EGRESS, RedirectTrace::NEIGH].contains(&r.how)),
        "underlay frame redirected as {redirect:?}, not out of the uplink {}",
        known.uplink
    );
    Ok(())
}

#[expect(
    clippy::too_many_arguments,
    reason = "one run's input, verdict and output"
)]
fn check_uplink(
    known: &Known,
    hook: &str,
    input: &[u8],
    ret: u32,
    out: &[u8],
    redirect: Option<RedirectTrace>,
    drop: u32,
    pass: u32,
) -> anyhow::Result<()> {
    if ret == drop {
        return Ok(());
    }
    let records = &known.ports;
    if hook == UPLINK_TC && ret == TC_ACT_REDIRECT && input.get(12..14) == Some(&[8, 6][..]) {
        return check_arp_answer(known, input, out, redirect);
    }
    let redirected = hook == UPLINK_TC && ret == TC_ACT_REDIRECT;
    ensure!(ret == pass || redirected, "{hook}: verdict {ret}");
    let meta_len = size_of::<DeliverMeta>();
    if hook == UPLINK_XDP
        && out.len() >= meta_len
        && u32::from_ne_bytes(out[..4].try_into()?) == DeliverMeta::MAGIC
    {
        let port = u32::from_ne_bytes(out[4..8].try_into()?);
        let (vsid, inner) = nvgre_parts(input)
            .ok_or_else(|| anyhow::anyhow!("delivered a frame that is not NVGRE"))?;
        ensure!(
            out[meta_len..] == *inner,
            "decapsulated frame differs from the inner frame"
        );
        let (_, dst) =
            ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("delivered a frame without IPv4"))?;
        let to = known.delivered_to(vsid, dst);
        ensure!(
            to.is_some_and(|(ca, owner)| owner == port
                && port != 0
                && u32::from_ne_bytes(out[8..12].try_into().unwrap_or_default()) == vsid
                && out[12..16] == ca),
            "VSID {vsid} {dst:?} delivered to port {port} (metadata {:02x?}), its records say {to:?}",
            &out[8..16]
        );
        return check_nvgre_source(known, input, vsid, inner);
    }
    if hook == UPLINK_XDP
        && let Some(checked) = ipv6::delivered_by_xdp(known, input, out)
    {
        return checked;
    }
    if let Some(checked) = ipv6::rewrite_in(known, input, out, redirect) {
        return checked;
    }
    if hook == UPLINK_XDP
        && out.len() >= 28
        && u32::from_ne_bytes(out[..4].try_into()?) == RestoreMeta::MAGIC
    {
        let port = u32::from_ne_bytes(out[4..8].try_into()?);
        let (_, dst_pa) = ipv4(input, 14).ok_or_else(|| anyhow::anyhow!("restore without IPv4"))?;
        ensure!(
            dst_pa == GREEN1_PA && port != 0,
            "rewrite delivered for {dst_pa:?} to {port}"
        );
        return Ok(());
    }
    if redirected {
        // TC decapsulated or restored it: what remains is a customer frame for a VM here.
        if ipv6::decapsulated(input, out) {
            ipv6::check_delivered(known, input, redirect.map_or(0, |r| r.ifindex), redirect)?;
        } else if let Some((vsid, inner)) = nvgre_parts(input)
            && out == inner
        {
            let (_, dst) =
                ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("delivered a frame without IPv4"))?;
            let owner = known.delivered_to(vsid, dst).map(|(_, p)| p);
            ensure!(
                owner.is_some_and(|p| p != 0),
                "TC delivered VSID {vsid} {dst:?}, which is no VM here"
            );
            ensure!(
                redirect == owner.map(into_vm),
                "TC delivered VSID {vsid} {dst:?} as {redirect:?}, its record says port {owner:?}"
            );
            check_nvgre_source(known, input, vsid, inner)?;
        } else {
            // A restored IP-rewrite packet: GREEN-1 is the only rewrite VM here.
            let (_, dst) =
                ipv4(out, 14).ok_or_else(|| anyhow::anyhow!("redirected a frame without IPv4"))?;
            ensure!(
                dst == CA1 && out.get(0..6) == Some(&GREEN1_MAC[..]),
                "restored packet for {dst:?} to {:02x?}",
                out.get(0..6)
            );
            let green1 = records
                .get(&LookupKey {
                    vsid: 7001,
                    ca: CA1,
                })
                .copied();
            ensure!(
                redirect == green1.map(into_vm),
                "restored packet for GREEN-1 (port {green1:?}) redirected as {redirect:?}"
            );
        }
        return Ok(());
    }
    // Passed: untouched, and nowhere else.
    ensure!(out == input, "{hook} passed a modified frame");
    ensure!(
        redirect.is_none(),
        "{hook} passed a frame it redirected: {redirect:?}"
    );
    Ok(())
}

/// What the uplink sent back: only the answer to an ARP request for a rewrite PA the datapath
/// owns, from the uplink's MAC, out of the uplink.
fn check_arp_answer(
    known: &Known,
    input: &[u8],
    out: &[u8],
    redirect: Option<RedirectTrace>,
) -> anyhow::Result<()> {
    ensure!(
        input.len() >= 42 && input[12..14] == [8, 6] && input[20..22] == [0, 1],
        "sent back a frame that is no ARP request: {input:02x?}"
    );
    let asked: [u8; 4] = input[38..42].try_into()?;
    ensure!(
        known.owned.contains(&asked),
        "answered ARP for {asked:?}, no PA the datapath owns"
    );
    // To the sender hardware address, as Linux answers.
    let mut reply = input[22..28].to_vec();
    reply.extend_from_slice(&known.uplink_mac);
    reply.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&known.uplink_mac);
    reply.extend_from_slice(&asked);
    reply.extend_from_slice(&input[22..28]);
    reply.extend_from_slice(&input[28..32]);
    ensure!(
        out.get(..42) == Some(&reply[..]) && out.get(42..) == input.get(42..),
        "answered ARP with {out:02x?}"
    );
    ensure_to_uplink(known, redirect)
}

/// One run of a program that takes what a VM sends: on `port`, the port of (`vsid`, `mac`),
/// `input` in, verdict `ret`, `out` out, redirected as `redirect`.
#[derive(Clone, Copy)]
struct VmRun<'a> {
    port: u32,
    vsid: u32,
    mac: [u8; 6],
    input: &'a [u8],
    ret: u32,
    out: &'a [u8],
    redirect: Option<RedirectTrace>,
}

/// What left for the underlay as NVGRE: exactly the VM's frame of VSID `vsid`, to a CA of that
/// VSID, out of the uplink.
/// NVGRE a VM's frame left in comes from its port's PA, over that PA's family, to another PA.
fn check_outer(known: &Known, port: u32, out: &[u8]) -> anyhow::Result<()> {
    let (src, dst, _) = outer(out).ok_or_else(|| anyhow::anyhow!("bad NVGRE out"))?;
    let own = known.port_pas.get(&port);
    ensure!(
        own == Some(&src) && src != dst,
        "NVGRE from port {port} with outer source {src:02x?} to {dst:02x?}, its PA is {own:02x?}"
    );
    Ok(())
}

fn check_nvgre_out(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        input,
        out,
        redirect,
        ..
    } = *run;
    let (key_vsid, inner) = nvgre_parts(out).ok_or_else(|| anyhow::anyhow!("bad NVGRE out"))?;
    check_outer(known, port, out)?;
    let (_, dst) = ipv4(inner, 14).ok_or_else(|| anyhow::anyhow!("no inner IPv4"))?;
    if inner == input {
        ensure!(
            key_vsid == vsid,
            "port of VSID {vsid} encapsulated into VSID {key_vsid}"
        );
        ensure!(
            known.ports.contains_key(&LookupKey { vsid, ca: dst }),
            "sent to {dst:?}, no CA of VSID {vsid}"
        );
    } else {
        check_routed(known, vsid, key_vsid, input, inner)?;
    }
    ensure_to_uplink(known, redirect)
}

/// A frame the router forwarded (`out`, the customer's frame as it leaves) for what a VM of
/// `vsid` sent (`input`): within the VM's domain, to a CA recorded in `to`, readdressed from
/// the router to that CA's MAC, TTL one less, nothing else changed.
fn check_routed(known: &Known, vsid: u32, to: u32, input: &[u8], out: &[u8]) -> anyhow::Result<()> {
    let (_, dst) = ipv4(out, 14).ok_or_else(|| anyhow::anyhow!("no routed IPv4"))?;
    ensure!(
        input.get(0..6) == Some(&ROUTER_MAC[..]),
        "changed a frame not sent to the router"
    );
    ensure!(
        known.may_route(vsid, to, dst),
        "routed from VSID {vsid} to VSID {to} {dst:?}"
    );
    let mac = known
        .sources
        .get(&LookupKey { vsid: to, ca: dst })
        .map(|(_, mac)| *mac);
    ensure!(
        out.get(0..6) == mac.as_ref().map(|m| &m[..]) && out.get(6..12) == Some(&ROUTER_MAC[..]),
        "routed frame's MACs {:02x?}",
        out.get(0..12)
    );
    ensure!(
        out.len() == input.len()
            && out.get(12..22) == input.get(12..22)
            && out.get(26..) == input.get(26..)
            && out.get(22).copied() == input.get(22).map(|t| t.wrapping_sub(1)),
        "routed frame differs beyond MACs, TTL and checksum"
    );
    Ok(())
}

/// An ARP reply back to the VM, about an address of its own VSID or its subnet's gateway.
fn check_vm_arp(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        out,
        redirect,
        ..
    } = *run;
    let records = &known.ports;
    // An ARP reply back to the VM, about an address of its own VSID.
    ensure!(
        out.get(0..6) == Some(&mac[..]),
        "ARP reply not addressed to the asking VM"
    );
    let spa: [u8; 4] = out
        .get(28..32)
        .ok_or_else(|| anyhow::anyhow!("short ARP"))?
        .try_into()?;
    let gateway = known
        .domains
        .get(&vsid)
        .is_some_and(|d| known.gateways.get(&(*d, spa)) == Some(&vsid));
    ensure!(
        records.contains_key(&LookupKey { vsid, ca: spa })
            || (gateway && out.get(22..28) == Some(&ROUTER_MAC[..])),
        "ARP answered for {spa:?} outside VSID {vsid}"
    );
    ensure!(
        redirect == Some(back_to(port)),
        "ARP reply to port {port} redirected as {redirect:?}"
    );
    Ok(())
}

/// An echo reply from a gateway (`src`) of the VM's domain, back to the VM (`dst`).
fn check_gateway_echo(
    known: &Known,
    run: &VmRun,
    src: [u8; 4],
    dst: [u8; 4],
) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        input,
        out,
        redirect,
        ..
    } = *run;
    let domain = known.domains.get(&vsid);
    ensure!(
        domain.is_some_and(|d| known.gateways.contains_key(&(*d, src))),
        "an answer from {src:?}, no gateway of VSID {vsid}'s domain"
    );
    ensure!(
        out.get(23) == Some(&1) && out.get(34) == Some(&0),
        "a gateway answered with something but an echo reply"
    );
    ensure!(
        ipv4(input, 14).is_some_and(|(from, to)| from == dst && to == src),
        "echo reply addresses {src:?} -> {dst:?}"
    );
    ensure!(
        redirect == Some(back_to(port)),
        "echo reply to port {port} redirected as {redirect:?}"
    );
    Ok(())
}

/// ICMP time exceeded or destination unreachable from the router (`src`): from the gateway
/// of the VM's own subnet, to the VM (`dst`), quoting what it sent (padded with zeros to 68
/// bytes).
fn check_router_error(
    known: &Known,
    run: &VmRun,
    src: [u8; 4],
    dst: [u8; 4],
) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        input,
        out,
        redirect,
        ..
    } = *run;
    let domain = known.domains.get(&vsid);
    ensure!(
        domain.is_some_and(|d| known.gateways.get(&(*d, src)) == Some(&vsid)),
        "router error from {src:?}, no gateway of VSID {vsid}'s subnets"
    );
    ensure!(
        out.get(0..6) == Some(&mac[..]) && ipv4(input, 14).is_some_and(|(from, _)| from == dst),
        "router error not to the sending VM"
    );
    let sent = input.get(14..).unwrap_or_default();
    let n = sent.len().min(68);
    ensure!(
        out.get(42..42 + n) == sent.get(..n)
            && out
                .get(42 + n..)
                .is_some_and(|pad| pad.iter().all(|b| *b == 0)),
        "router error does not quote what the VM sent"
    );
    ensure!(
        redirect == Some(back_to(port)),
        "router error to port {port} redirected as {redirect:?}"
    );
    Ok(())
}

/// Checks a from-VM run on `port`, the port of (`vsid`, `mac`).
fn check_from_vm(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        input,
        ret,
        out,
        redirect,
    } = *run;
    let records = &known.ports;
    match ret {
        TC_ACT_SHOT => return Ok(()),
        TC_ACT_REDIRECT => {}
        other => bail!("from-VM verdict {other}"),
    }
    ensure!(
        input.get(6..12) == Some(&mac[..]),
        "a frame with another source MAC got through"
    );
    if ipv6::is_ipv6(input) {
        return ipv6::check_from_vm(known, run, false);
    }
    if out.get(12..14) == Some(&[0x08, 0x06]) {
        return check_vm_arp(known, run);
    }
    // NVGRE grows the frame by exactly its 42 bytes (a rewritten frame keeps its size, even
    // when the customer's own protocol is GRE).
    if encapsulated(input, out) {
        return check_nvgre_out(known, run);
    }
    let (src, dst) =
        ipv4(out, 14).ok_or_else(|| anyhow::anyhow!("redirected a frame without IPv4"))?;
    // ICMP "fragmentation needed" back to the VM: from an address of its VSID, to the address
    // it sent from, quoting what it sent.
    if out.get(23) == Some(&1) && out.get(34..36) == Some(&[3, 4]) && out.len() == 14 + 96 {
        let (sent_from, sent_to) =
            ipv4(input, 14).ok_or_else(|| anyhow::anyhow!("answered a frame without IPv4"))?;
        ensure!(
            out.get(0..6) == Some(&mac[..]),
            "ICMP answer not addressed to the sending VM"
        );
        ensure!(
            src == sent_to && dst == sent_from,
            "ICMP answer {src:?} -> {dst:?} for {sent_from:?} -> {sent_to:?}"
        );
        ensure!(
            records.contains_key(&LookupKey { vsid, ca: src })
                || records
                    .keys()
                    .any(|k| k.ca == src && known.may_route(vsid, k.vsid, src)),
            "ICMP answer from {src:?}, no CA of VSID {vsid} or its domain"
        );
        ensure!(
            out.get(42..) == input.get(14..14 + 68),
            "ICMP answer does not quote what the VM sent"
        );
        ensure!(
            redirect == Some(back_to(port)),
            "ICMP answer to port {port} redirected as {redirect:?}"
        );
        return Ok(());
    }
    // ICMP time exceeded or destination unreachable from the router.
    if out.get(6..12) == Some(&ROUTER_MAC[..])
        && out.get(23) == Some(&1)
        && matches!(out.get(34..36), Some([11, 0] | [3, 0 | 1]))
        && out.len() == 14 + 96
    {
        return check_router_error(known, run, src, dst);
    }
    // An echo reply from a gateway of the VM's domain, back out of its port (a packet routed
    // to the VM's own address comes back into it, as from the router).
    if out.get(6..12) == Some(&ROUTER_MAC[..])
        && out.get(0..6) == Some(&mac[..])
        && run.redirect == Some(back_to(run.port))
    {
        return check_gateway_echo(known, run, src, dst);
    }
    // Routed to a VM of this host.
    if out != input && out.get(6..12) == Some(&ROUTER_MAC[..]) {
        let to = records
            .iter()
            .find(|(k, p)| k.ca == dst && **p != 0 && redirect == Some(into_vm(**p)))
            .map(|(k, _)| k.vsid)
            .ok_or_else(|| anyhow::anyhow!("routed to {dst:?} as {redirect:?}, no VM there"))?;
        return check_routed(known, vsid, to, input, out);
    }
    if out == input {
        let owner = records.get(&LookupKey { vsid, ca: dst }).copied();
        ensure!(
            owner.is_some_and(|p| p != 0),
            "delivered locally to {dst:?}, no VM of VSID {vsid} here"
        );
        ensure!(
            redirect == owner.map(into_vm),
            "delivered locally to {dst:?} as {redirect:?}, its record says port {owner:?}"
        );
        Ok(())
    } else {
        // IP rewrite: only GREEN's dedicated PAs may appear, and GREEN-B's when routed
        // (greenland holds both).
        let routed = input.get(0..6) == Some(&ROUTER_MAC[..]) && known.same_domain(vsid, GREEN_B);
        ensure!(
            src == GREEN1_PA && vsid == 7001 && (dst == GREEN2_PA || (routed && dst == GREEN_B_PA)),
            "rewrite from VSID {vsid}: {src:?} -> {dst:?}"
        );
        ensure_to_uplink(known, redirect)
    }
}

/// Checks a run of the bounce program on a segment marked with `port`, the port of (`vsid`,
/// `mac`) (`port` 0: unmarked, as the host's own frames on the bounce pair are): it may only
/// drop, or send NVGRE of that VSID out of the uplink; never answer, deliver or rewrite.
fn check_bounced(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        mac,
        input,
        ret,
        out,
        ..
    } = *run;
    match ret {
        TC_ACT_SHOT => return Ok(()),
        TC_ACT_REDIRECT => {}
        other => bail!("bounce verdict {other}"),
    }
    ensure!(port != 0, "an unmarked frame left the bounce program");
    ensure!(
        input.get(6..12) == Some(&mac[..]),
        "a bounced frame with another source MAC got through"
    );
    ensure!(
        encapsulated(input, out),
        "the bounce program sent something other than NVGRE"
    );
    if ipv6::is_ipv6(input) {
        return ipv6::check_from_vm(known, run, true);
    }
    check_nvgre_out(known, run)
}

/// What a fuzzing run saw: every category must be non-empty for the properties to mean much.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub runs: u64,
    pub dropped: u64,
    /// Segments the bounce program encapsulated.
    pub bounced: u64,
    /// Redirected by TC, or passed up by XDP with metadata for a VM.
    pub delivered: u64,
    /// Passed to the host untouched.
    pub passed: u64,
    /// Routed by the router, and answered by a gateway (ARP or echo).
    pub routed: u64,
    pub gateway_answers: u64,
    /// DHCP requests handed to the agent.
    pub dhcp: u64,
    /// IPv6 neighbour solicitations answered, and IPv6 frames of VMs forwarded or delivered.
    pub nd_answers: u64,
    pub ipv6_forwarded: u64,
    /// Of those, sent to the router's MAC and routed into another VSID's NVGRE.
    pub ipv6_routed: u64,
    /// NVGRE over the IPv6 underlay: sent by a VM, or delivered from the uplink.
    pub ipv6_underlay: u64,
    /// IPv6 by IP rewrite: rewritten from a VM, or handed over or restored on the uplink.
    pub ipv6_rewrite: u64,
}

/// 1 for a frame that crossed the IPv6 underlay: `out` of a VM in NVGRE over IPv6, or `input`
/// from the uplink in it, delivered.
fn over_ipv6(delivered: bool, input: &[u8], out: &[u8]) -> u64 {
    let v6 = |f: &[u8]| f.get(12..14) == Some(&[0x86, 0xdd][..]) && outer(f).is_some();
    u64::from(delivered && (v6(input) || v6(out)))
}

/// AMBER over the IPv6 underlay: AMBER-1's IPv4 and IPv6 to AMBER-2 (NVGRE over IPv6), to
/// AMBER-3 (behind an IPv4 PA: out of reach); NVGRE over IPv6 in, carrying either family, and
/// RED's (whose records are behind IPv4 PAs).
fn ipv6_underlay_seeds(h: &Host) -> Vec<Vec<u8>> {
    let to_amber1 = udp_frame(AMBER2_MAC, AMBER1_MAC, CA2, CA1, b"amber");
    let to_amber1_6 = udp6(AMBER2_MAC, AMBER1_MAC, CA6_2, CA6_1, (40000, 7));
    let in6 = |vsid: u32, inner: &[u8]| {
        nvgre6(
            GATEWAY_MAC,
            h.uplink_mac,
            REMOTE_PA6,
            LOCAL_PA6,
            vsid << 8,
            inner,
        )
    };
    vec![
        udp_frame(AMBER1_MAC, AMBER2_MAC, CA1, CA2, b"amber"),
        udp_frame(AMBER1_MAC, AMBER3_MAC, CA1, CA3, b"amber"),
        udp6(AMBER1_MAC, AMBER2_MAC, CA6_1, CA6_2, (40000, 7)),
        in6(AMBER, &to_amber1),
        in6(AMBER, &to_amber1_6),
        in6(RED, &udp_frame(RED2_MAC, RED1_MAC, CA2, CA1, b"red")),
        // TEAL by IPv6 rewrite: out, in, and a solicitation for TEAL-1's PA.
        udp6(TEAL1_MAC, TEAL2_MAC, CA6_1, CA6_2, (40000, 7)),
        udp6(GATEWAY_MAC, h.uplink_mac, REMOTE_RW6, LOCAL_RW6, (7, 40000)),
        udp6(GATEWAY_MAC, h.uplink_mac, OTHER_RW6, LOCAL_RW6, (7, 40000)),
        solicitation(GATEWAY_MAC, REMOTE_PA6, LOCAL_RW6),
    ]
}

/// Runs `frames` random and mutated frames from `seed` through every program.
pub fn run(frames: u64, seed: u64) -> anyhow::Result<Stats> {
    std::thread::spawn(move || fuzz(frames, seed))
        .join()
        .map_err(|_| anyhow::anyhow!("fuzzer panicked"))?
}

/// A VM port of the fuzzing host: its ifindex, VSID and MAC.
type VmPort = (u32, u32, [u8; 6]);

/// The fixture's host with everything it can hold: routing domains, IPv6 records and routes,
/// the IPv6 underlay and IPv6 rewrite; returns it and its VM ports (ifindex, VSID, MAC).
fn full_host() -> anyhow::Result<(Host, [VmPort; 5])> {
    let mut h = host(true)?;
    h.add_domains()?;
    h.add_ipv6()?;
    h.add_ipv6_routes()?;
    let amber1 = h.add_ipv6_underlay()?;
    let teal1 = h.add_ipv6_rewrite()?;
    let ports = [
        (h.red1, RED, RED1_MAC),
        (h.blue1, 6001, BLUE1_MAC),
        (h.green1, 7001, GREEN1_MAC),
        (amber1, AMBER, AMBER1_MAC),
        (teal1, TEAL, TEAL1_MAC),
    ];
    Ok((h, ports))
}

fn fuzz(frames: u64, seed: u64) -> anyhow::Result<Stats> {
    let (mut h, ports) = full_host()?;
    let known = Known::of(&h)?;
    let seeds = seeds(&h);
    let mut rng = Rng::of_seed(seed);
    let mut stats = Stats::default();
    for (phase, flags) in [0, DatapathConfig::TC_DECAP].into_iter().enumerate() {
        h.set_flags(flags)?;
        let before = drops(&h)? + h.counter("vm_dhcp_to_agent")?;
        let mut dropped = 0u64;
        for i in 0..frames / 2 {
            let pick = rng.below(seeds.len());
            let mutated = mutate(&mut rng, &seeds[pick]);
            let frame = runnable(&mut rng, mutated);
            let why = |e: anyhow::Error| {
                e.context(format!(
                    "seed {seed}, phase {phase}, frame {i}: {frame:02x?}"
                ))
            };
            let (port, vsid, mac) = ports[rng.below(ports.len())];
            let out =
                h.dp.test_run(FROM_VM, &frame, Some(port), 1)
                    .map_err(|e| why(e.into()))?;
            let run = VmRun {
                port,
                vsid,
                mac,
                input: &frame,
                ret: out.ret,
                out: &out.data,
                redirect: out.redirect,
            };
            check_from_vm(&known, &run).map_err(why)?;
            stats.ipv6_forwarded += ipv6::forwarded(out.ret == TC_ACT_REDIRECT, &frame, &out.data);
            stats.ipv6_routed += ipv6::routed(out.ret == TC_ACT_REDIRECT, &frame, &out.data);
            stats.ipv6_underlay += over_ipv6(out.ret == TC_ACT_REDIRECT, &frame, &out.data);
            stats.ipv6_rewrite += ipv6::rewritten(out.ret == TC_ACT_REDIRECT, &frame, &out.data);
            dropped += u64::from(out.ret == TC_ACT_SHOT);
            stats.delivered += u64::from(out.ret == TC_ACT_REDIRECT);
            // The same frame as a segment back from the bounce pair: marked with its port, or
            // (one in eight) unmarked.
            let mark = if rng.below(8) == 0 { 0 } else { port };
            let out =
                h.dp.test_run_marked(FROM_BOUNCE, &frame, Some(known.uplink), mark, 1)
                    .map_err(|e| why(e.into()))?;
            let run = VmRun {
                port: mark,
                vsid,
                mac,
                input: &frame,
                ret: out.ret,
                out: &out.data,
                redirect: out.redirect,
            };
            check_bounced(&known, &run).map_err(why)?;
            dropped += u64::from(out.ret == TC_ACT_SHOT);
            stats.bounced += u64::from(out.ret == TC_ACT_REDIRECT);
            let (hook, drop, pass) = if phase == 0 {
                (UPLINK_XDP, XDP_DROP, XDP_PASS)
            } else {
                (UPLINK_TC, TC_ACT_SHOT, TC_ACT_OK)
            };
            let out =
                h.dp.test_run(hook, &frame, None, 1)
                    .map_err(|e| why(e.into()))?;
            check_uplink(
                &known,
                hook,
                &frame,
                out.ret,
                &out.data,
                out.redirect,
                drop,
                pass,
            )
            .map_err(why)?;
            dropped += u64::from(out.ret == drop);
            let meta = out.data.len() >= 4
                && [DeliverMeta::MAGIC, DeliverMeta6::MAGIC, RestoreMeta::MAGIC]
                    .contains(&u32::from_ne_bytes(out.data[..4].try_into()?));
            if out.ret == TC_ACT_REDIRECT || (out.ret == XDP_PASS && hook == UPLINK_XDP && meta) {
                stats.delivered += 1;
                stats.ipv6_underlay += over_ipv6(true, &frame, &[]);
                stats.ipv6_rewrite += ipv6::rewritten(true, &frame, &out.data);
            } else if out.ret == pass {
                stats.passed += 1;
            }
            stats.runs += 3;
        }
        // Dropped here: under a reason, or handed to the agent.
        let counted = drops(&h)? + h.counter("vm_dhcp_to_agent")? - before;
        ensure!(
            counted == dropped,
            "phase {phase}: {dropped} drops but {counted} counted under a reason"
        );
        stats.dropped += dropped;
    }
    count_outcomes(&h, &mut stats)?;
    Ok(stats)
}

/// The outcomes the datapath counted itself: routed, gateway answers, DHCP handed over and
/// neighbour solicitations answered.
fn count_outcomes(h: &Host, stats: &mut Stats) -> anyhow::Result<()> {
    for (field, counter) in [
        (&mut stats.routed, "vm_routed"),
        (&mut stats.gateway_answers, "vm_gateway_replied"),
        (&mut stats.dhcp, "vm_dhcp_to_agent"),
        (&mut stats.nd_answers, "vm_nd_replied"),
    ] {
        *field = h.counter(counter)?;
    }
    Ok(())
}
