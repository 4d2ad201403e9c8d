//! IPv6 from a VM (TC ingress on its port, after `from_vm`'s identity checks): neighbour
//! solicitations answered from the records (`nd`), router advertisements, redirects and DHCPv6
//! server messages refused (only nv speaks as the router), the source checked against the VM's
//! own records, then delivery to a VM of the VSID on this host or NVGRE to its host. IPv6
//! customer addresses cross by NVGRE only: the agent refuses IPv6 records that ask for IP
//! rewrite.
use aya_ebpf::programs::TcContext;
use nv_common::{
    Counter, LookupKey6, Method, PortInfo, VsidStatsKey as Stats,
    wire::{
        DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT, ETH_HLEN, IPPROTO_AH, IPPROTO_DSTOPTS,
        IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPPROTO_TCP,
        IPPROTO_UDP, IPV6_HLEN, ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT, ND_REDIRECT,
        ND_ROUTER_ADVERT, ND_ROUTER_SOLICIT,
    },
};

use crate::{
    deliver,
    encap::{self, Inner},
    icmp6,
    maps::LOOKUPS6,
    monitor::sent,
    nd,
    packet::{EthHdr, Ipv6Hdr, pull, view_at},
    pmtu, router, router6,
};

/// Linear bytes for the IPv6 header, a few extension headers and the upper-layer header.
const PULL_LEN: u32 = 256;

/// Extension headers walked to find what a packet carries.
const MAX_EXT: usize = 4;

/// Multicast listener queries, reports and done (RFC 2710, 3810).
const MLD: [u8; 4] = [130, 131, 132, 143];

/// The upper-layer protocol of the packet whose first header after IPv6 is `next`, and where
/// it starts; a later fragment carries none (`IPPROTO_FRAGMENT`). Read with the load helper:
/// the offsets depend on the packet, which the verifier cannot follow into direct reads.
// Out of line: its own stack frame, and one copy of the loop for the verifier.
#[inline(never)]
fn upper_layer(ctx: &TcContext, first: u8) -> Result<(u8, usize), Counter> {
    let (mut next, mut off) = (first, ETH_HLEN + IPV6_HLEN);
    for _ in 0..MAX_EXT {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h: [u8; 2] = ctx.load(off).map_err(|_| Counter::DropVmIpv6Ext)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            // Walked too: an advertisement behind it is still an advertisement.
            IPPROTO_AH => {
                let h: [u8; 2] = ctx.load(off).map_err(|_| Counter::DropVmIpv6Ext)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let h: [u8; 4] = ctx.load(off).map_err(|_| Counter::DropVmIpv6Ext)?;
                off += 8;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Ok((IPPROTO_FRAGMENT, off));
                }
                next = h[0];
            }
            _ => return Ok((next, off)),
        }
    }
    Err(Counter::DropVmIpv6Ext)
}

/// What [`screen`] says of a packet: forward it, answer it (a neighbour solicitation), or
/// drop it under the counter of that number.
const PASS: u32 = u32::MAX;
const SOLICIT: u32 = u32::MAX - 1;
const ROUTER_SOLICIT: u32 = u32::MAX - 2;
const DHCP6_REQUEST: u32 = u32::MAX - 3;

/// The messages only nv may send or answer, by the upper-layer protocol `proto` at `l4`.
// Out of line, returning a scalar: its own stack frame, and a BPF subprogram cannot hand back
// an aggregate.
#[inline(never)]
fn screen(ctx: &TcContext, proto: u8, l4: usize, bounced: bool) -> u32 {
    let drop = |c: Counter| c as u32;
    if proto == IPPROTO_ICMPV6 {
        let Ok(kind) = ctx.load::<u8>(l4) else {
            return drop(Counter::DropVmMalformed);
        };
        return match kind {
            ND_NEIGHBOR_SOLICIT if !bounced => SOLICIT,
            ND_ROUTER_SOLICIT if !bounced => ROUTER_SOLICIT,
            ND_ROUTER_ADVERT | ND_REDIRECT => drop(Counter::DropVmRouterGuard),
            ND_ROUTER_SOLICIT | ND_NEIGHBOR_SOLICIT | ND_NEIGHBOR_ADVERT => {
                drop(Counter::DropVmNdUnanswered)
            }
            k if MLD.contains(&k) => drop(Counter::DropVmNdUnanswered),
            _ => PASS,
        };
    }
    if proto == IPPROTO_UDP {
        let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
            return drop(Counter::DropVmMalformed);
        };
        let (src, dst) = (
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        );
        // A server's message: from the server's port, or to a client's from any.
        if src == DHCPV6_SERVER_PORT || dst == DHCPV6_CLIENT_PORT {
            return drop(Counter::DropVmRouterGuard);
        }
        // A client's: the agent's to answer where nv is the router.
        if src == DHCPV6_CLIENT_PORT && dst == DHCPV6_SERVER_PORT && !bounced {
            return DHCP6_REQUEST;
        }
    }
    PASS
}

/// ICMPv6 "packet too big" back to the VM behind `port`, naming `mtu`: from the packet's
/// destination and `from_mac`, the MAC the VM sent to.
#[inline(always)]
fn too_big(ctx: &TcContext, port: &PortInfo, from_mac: [u8; 6], mtu: u32) -> Result<i32, Counter> {
    match answer_too_big(ctx, port, from_mac, mtu) {
        UNANSWERED => Err(Counter::DropVmTooBig),
        action => {
            crate::counters::count(Counter::VmIcmpPacketTooBig);
            #[expect(clippy::cast_possible_wrap, reason = "a TC action")]
            Ok(action as i32)
        }
    }
}

const UNANSWERED: u32 = u32::MAX;

// Out of line, returning a scalar: its own stack frame, apart from the forwarding path's (a
// BPF subprogram cannot hand back an aggregate).
#[inline(never)]
fn answer_too_big(ctx: &TcContext, port: &PortInfo, from_mac: [u8; 6], mtu: u32) -> u32 {
    let Ok(dst) = ctx.load::<[u8; 16]>(ETH_HLEN + 24) else {
        return UNANSWERED;
    };
    let error = icmp6::Icmp6Error {
        src: dst,
        kind_code: icmp6::PACKET_TOO_BIG,
        mtu,
    };
    #[expect(clippy::cast_sign_loss, reason = "a TC action")]
    icmp6::answer(ctx, port, from_mac, &error).map_or(UNANSWERED, |a| a as u32)
}

/// Everything IPv6 a VM sends: what [`inspect`] says of it decides, and the neighbour
/// responder and forwarding each run in a frame of their own (the BPF stack is 512 bytes for
/// a whole chain of calls).
#[inline(always)]
pub fn run(ctx: &TcContext, port: &PortInfo, ifindex: u32, bounced: bool) -> Result<i32, Counter> {
    match inspect(ctx, bounced) {
        PASS => forward(ctx, port, ifindex, bounced),
        // Only right after the IPv6 header (`inspect` saw to it).
        SOLICIT => nd::answer(ctx, port, ifindex, ETH_HLEN + IPV6_HLEN),
        // The agent advertises the router of a routed VSID; elsewhere there is none.
        ROUTER_SOLICIT if router::domain(port.vsid).is_some() => {
            crate::dhcp::hand_over(ctx, ifindex)
        }
        ROUTER_SOLICIT => Err(Counter::DropVmNdUnanswered),
        // The agent serves DHCPv6 in a routed VSID; elsewhere the request is any packet.
        DHCP6_REQUEST if router::domain(port.vsid).is_some() => {
            crate::dhcp::hand_over(ctx, ifindex)
        }
        DHCP6_REQUEST => forward(ctx, port, ifindex, bounced),
        drop => Err(crate::counters::numbered(drop, Counter::DropVmMalformed)),
    }
}

/// The IPv6 packet's header and where its upper-layer header starts, checked: `Ok` of
/// (protocol, offset), else why it is dropped.
#[inline(always)]
fn headers(ctx: &TcContext) -> Result<(u8, usize), Counter> {
    let ip: &Ipv6Hdr =
        view_at(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    if ip.version() != 6 {
        return Err(Counter::DropVmMalformed);
    }
    let (proto, l4) = upper_layer(ctx, ip.next)?;
    // The upper-layer header lies within the payload the IPv6 header claims: bytes past it
    // would be screened while the real header came in a later fragment.
    let payload_end = ETH_HLEN + IPV6_HLEN + usize::from(u16::from_be_bytes(ip.payload_len));
    if proto != IPPROTO_FRAGMENT && l4 + 8 > payload_end {
        return Err(Counter::DropVmMalformed);
    }
    Ok((proto, l4))
}

/// To a VM reached by IP rewrite: only what rewrite restores exactly (TCP, UDP or ICMPv6
/// right after the IPv6 header), from the sender's own IPv6 rewrite record.
#[inline(always)]
fn rewrite_out(
    ctx: &TcContext,
    port: &PortInfo,
    ifindex: u32,
    dst: &nv_common::LookupValue,
    proto: u8,
    l4: usize,
    len: u32,
) -> Result<i32, Counter> {
    if l4 != ETH_HLEN + IPV6_HLEN || !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6) {
        return Err(Counter::DropVmRewriteIpv6);
    }
    let config = crate::underlay::config()?;
    let mtu = pmtu::too_big6(ctx, config, proto, l4, 0);
    if mtu != 0 {
        if mtu < icmp6::IPV6_MIN_MTU {
            return Err(Counter::DropVmTooBig);
        }
        return too_big(ctx, port, dst.mac, mtu);
    }
    let ip: &Ipv6Hdr =
        view_at(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    let key = LookupKey6 {
        vsid: port.vsid,
        ca: ip.src,
    };
    let info = u32::from_le_bytes([proto, ip.traffic_class(), 0, 0]);
    // SAFETY: read-only use of a value the agent replaces whole.
    let from = unsafe { LOOKUPS6.get(key) }.ok_or(Counter::DropVmNoRewritePa)?;
    let action = crate::rewrite6::send(ctx, from, dst, info)?;
    sent(
        ctx,
        Counter::VmTxRewrite,
        port,
        ifindex,
        Stats::REWRITE,
        len,
    );
    Ok(action)
}

/// What the IPv6 packet is: [`screen`]'s verdict.
// Out of line, returning a scalar: its own stack frame.
#[inline(never)]
fn inspect(ctx: &TcContext, bounced: bool) -> u32 {
    pull(ctx, PULL_LEN);
    match headers(ctx) {
        Ok((proto, l4)) => match screen(ctx, proto, l4, bounced) {
            // On the link only (RFC 4861 7.1.1), right after the IPv6 header.
            SOLICIT if l4 != ETH_HLEN + IPV6_HLEN => Counter::DropVmNdUnanswered as u32,
            verdict => verdict,
        },
        Err(c) => c as u32,
    }
}

/// A packet [`inspect`] passed.
// Out of line: its own stack frame, apart from the IPv4 path's.
#[inline(never)]
fn forward(ctx: &TcContext, port: &PortInfo, ifindex: u32, bounced: bool) -> Result<i32, Counter> {
    // Walked again rather than handed over by `inspect`: a packed verdict indexed the counter
    // table in a form the verifier could not bound, and a sixth argument is one too many. One
    // more call per packet; no extension headers is one comparison.
    let (proto, l4) = headers(ctx)?;
    let ip: &Ipv6Hdr =
        view_at(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    if !nd::is_own(port, ifindex, &ip.src) {
        return Err(Counter::DropVmSpoofedIp);
    }
    // As for IPv4: the port's rules, after the identity checks and before anything else
    // (not again for the segments).
    if !bounced {
        crate::acl::admits(ctx, port, nv_common::acl::DIR_OUT)?;
    }
    let len = ctx.len();
    let ip: &Ipv6Hdr =
        view_at(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    let eth: &EthHdr = view_at(ctx.data(), ctx.data_end(), 0).ok_or(Counter::DropVmMalformed)?;
    let rdid = router::routed_in(port, &eth.dst, bounced);
    let (vsid, target) = match rdid {
        Some(rdid) => {
            if router6::is_gateway_in(rdid, &ip.dst) {
                return router6::echo(ctx, port, proto, l4);
            }
            if ip.hop_limit <= 1 {
                let expired = Counter::DropVmTtlExceeded;
                return router6::icmp_error(ctx, port, rdid, icmp6::TIME_EXCEEDED, expired);
            }
            let Some(hop) = router6::lookup(rdid, ip.dst) else {
                let why = icmp6::DEST_UNREACH_NO_ROUTE;
                return router6::icmp_error(ctx, port, rdid, why, Counter::DropVmNoRoute);
            };
            hop
        }
        None => (port.vsid, ip.dst),
    };
    let key = LookupKey6 { vsid, ca: target };
    // SAFETY: read-only use of a value the agent replaces whole.
    let Some(dst) = (unsafe { LOOKUPS6.get(key) }) else {
        let Some(rdid) = rdid else {
            return Err(Counter::DropVmUnknownDst);
        };
        let why = icmp6::DEST_UNREACH_ADDRESS;
        return router6::icmp_error(ctx, port, rdid, why, Counter::DropVmNoRoute);
    };
    if bounced && (dst.ifindex != 0 || dst.method != Method::Encap as u8) {
        return Err(Counter::DropVmTranslateFailed);
    }
    let inner = Inner::of6(ctx, ip, proto, l4);
    if dst.ifindex != 0 {
        if let Some(rdid) = rdid {
            router6::hop(ctx, rdid, dst.mac)?;
        }
        let action = deliver::to_vm6(ctx, dst.ifindex, vsid, dst.mac)?;
        sent(ctx, Counter::VmTxLocal, port, ifindex, Stats::LOCAL, len);
        return Ok(action);
    }
    if dst.method == Method::Rewrite as u8 {
        if rdid.is_some() {
            return Err(Counter::DropVmRoutedRewrite);
        }
        return rewrite_out(ctx, port, ifindex, dst, proto, l4, len);
    }
    if dst.method != Method::Encap as u8 {
        return Err(Counter::DropVmMethod);
    }
    let config = crate::underlay::config()?;
    let mtu = pmtu::too_big6(ctx, config, proto, l4, encap::overhead(port));
    if mtu != 0 {
        // An answer would leave by the bounce device, not the VM's port; and IPv6 never asks
        // for less than its minimum.
        if bounced || mtu < icmp6::IPV6_MIN_MTU {
            return Err(Counter::DropVmTooBig);
        }
        let from = if rdid.is_some() {
            router::mac()
        } else {
            dst.mac
        };
        return too_big(ctx, port, from, mtu);
    }
    // A routed packet rides in its destination's VSID, as for IPv4.
    let mut from = *port;
    if let Some(rdid) = rdid {
        router6::hop(ctx, rdid, dst.mac)?;
        from.vsid = vsid;
    }
    let bounce = config.bounce_ifindex;
    let action = match encap::nvgre(ctx, &from, dst, inner) {
        // A routed super-packet of the VM's own tunnel: its segments would come back as from
        // the router, not the VM.
        Err(Counter::DropVmNestedGso) if rdid.is_some() => return Err(Counter::DropVmNestedGso),
        // A super-packet of the VM's own tunnel: segmented by the kernel on the bounce
        // device's transmit, each segment back through `run_bounced`.
        Err(Counter::DropVmNestedGso) if !bounced && bounce != 0 => {
            ctx.set_mark(ifindex);
            crate::counters::count(Counter::VmTxSegmented);
            return Ok(crate::redirect::egress(bounce));
        }
        other => other?,
    };
    sent(ctx, Counter::VmTxEncap, port, ifindex, Stats::ENCAP, len);
    Ok(action)
}
