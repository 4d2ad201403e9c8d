//! TC ingress on a VM port: everything a VM sends enters here. The port identifies the VSID;
//! frames are answered (ARP), delivered to a VM on this host, encapsulated to another host, or
//! dropped with a counted reason. Nothing from a VM reaches the host stack.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, programs::TcContext};
use nv_common::{
    Counter, LookupKey, Method, PortInfo, VsidStatsKey as Stats,
    acl::DIR_OUT,
    wire::{ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
};

use crate::{
    acl, arp,
    counters::count,
    deliver, dhcp, encap,
    maps::{LOOKUPS, PORTS},
    monitor,
    packet::{EthHdr, Ipv4Hdr, pull, v4_of, view_at},
    pmtu, rewrite, router, underlay,
};

/// Enough linear bytes for Ethernet, an IPv4 header with options and the L4 ports.
/// Enough for an ICMP answer's quote too (`pmtu`).
const PULL_LEN: u32 = (ETH_HLEN + 60 + 4 + 4) as u32;

pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match try_run_on(ctx, ifindex, false) {
        Ok(action) => action,
        Err(reason) => monitor::drop_from_vm(ctx, reason, ifindex),
    }
}

/// The segments of a VM's tunnel super-packet, back from the bounce device
/// ([`DatapathConfig::bounce_ifindex`](nv_common::DatapathConfig)): each goes through the same
/// checks as what the VM sends, as from the port its mark names, and may only leave by NVGRE.
pub fn run_bounced(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let port = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(0);
    match try_run_on(ctx, port, true) {
        Ok(action) => action,
        Err(reason) => monitor::drop_from_vm(ctx, reason, port),
    }
}

/// What arrived from the VM behind `ifindex` (`bounced`: segments from the bounce device).
#[inline(always)]
fn try_run_on(ctx: &TcContext, ifindex: u32, bounced: bool) -> Result<i32, Counter> {
    let skb = ctx.skb.skb;
    // SAFETY: values are only read; the agent replaces them whole.
    let port = unsafe { PORTS.get(ifindex) }.ok_or(Counter::DropVmUnknownPort)?;
    // A tag the kernel took out of the frame (the first on receive), or one still in it (the
    // next ones): refused, whatever its kind. Stripping one only uncovers the next, which the
    // kernel then moves out of the frame, and a tag that left with the packet would pick its
    // treatment on the underlay.
    // SAFETY: as above.
    if unsafe { (*skb).vlan_present } != 0 {
        return Err(Counter::DropVmVlan);
    }
    pull(ctx, PULL_LEN);

    let (data, end) = (ctx.data(), ctx.data_end());
    let eth: &EthHdr = view_at(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    // A VM is hostile until proven otherwise: it speaks only with the identity of its port.
    if eth.src != port.mac {
        return Err(Counter::DropVmSpoofedMac);
    }
    match eth.proto() {
        ETH_P_ARP if !bounced => arp::reply(ctx, port),
        ETH_P_IP => forward_ipv4(ctx, port, ifindex, bounced),
        ETH_P_IPV6 => crate::from_vm6::run(ctx, port, ifindex, bounced),
        ETH_P_8021Q | ETH_P_8021AD => Err(Counter::DropVmVlan),
        _ => Err(Counter::DropVmNotIp),
    }
}

fn forward_ipv4(
    ctx: &TcContext,
    port: &PortInfo,
    ifindex: u32,
    bounced: bool,
) -> Result<i32, Counter> {
    let len = ctx.len();
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip: &Ipv4Hdr = view_at(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    let hlen = ip.hlen();
    if ip.ver_ihl >> 4 != 4 || hlen < 20 {
        return Err(Counter::DropVmMalformed);
    }
    // Before the source check: a DHCP client asks from no address.
    if !bounced && let Some(answer) = dhcp::handle(ctx, port, ifindex, ip) {
        return answer;
    }
    // The VM's own address; or, for a route's next hop, an address of the world behind it.
    let own = v4_of(&port.ca).ok_or(Counter::DropVmSpoofedIp)?;
    let appliance = own != ip.src;
    if appliance && !router::speaks_for(port.vsid, own, ip.src) {
        return Err(Counter::DropVmSpoofedIp);
    }
    // The port's rules see what the VM sent, before any routing or translation; segments
    // back from the bounce device were checked as the super-packet they were.
    if !bounced {
        acl::admits(ctx, port, DIR_OUT)?;
    }
    let eth: &EthHdr = view_at(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    let rdid = router::routed_in(port, &eth.dst, bounced);
    let (vsid, target) = match rdid {
        Some(rdid) => {
            if router::is_gateway_in(rdid, ip.dst) {
                return router::echo(ctx, port);
            }
            if ip.ttl <= 1 {
                return router::icmp_error(
                    ctx,
                    port,
                    rdid,
                    router::TIME_EXCEEDED,
                    Counter::DropVmTtlExceeded,
                );
            }
            let Some(hop) = router::lookup(rdid, ip.dst) else {
                return router::icmp_error(
                    ctx,
                    port,
                    rdid,
                    router::NET_UNREACHABLE,
                    Counter::DropVmNoRoute,
                );
            };
            hop
        }
        None => (port.vsid, ip.dst),
    };
    let key = LookupKey { vsid, ca: target };
    // SAFETY: read-only use of a value the agent replaces whole.
    let Some(dst) = (unsafe { LOOKUPS.get(key) }) else {
        return match rdid {
            Some(rdid) => router::icmp_error(
                ctx,
                port,
                rdid,
                router::HOST_UNREACHABLE,
                Counter::DropVmNoRoute,
            ),
            None => Err(Counter::DropVmUnknownDst),
        };
    };
    if bounced && (dst.ifindex != 0 || dst.method != Method::Encap as u8) {
        // Only NVGRE sends a super-packet to the bounce device.
        return Err(Counter::DropVmTranslateFailed);
    }
    // Routed to a VM reached by IP rewrite: only a VM with a rewrite PA of its own sends so
    // (a domain may mix methods across its VSIDs); and rewrite restores a VM's own address
    // only: an appliance's answers for the world behind it cross by NVGRE.
    // Nor does it carry a packet for the world behind a next hop: it would arrive addressed
    // to the next hop itself.
    if dst.method == Method::Rewrite as u8
        && ((rdid.is_some() && (port.method != Method::Rewrite as u8 || target != ip.dst))
            || appliance)
    {
        return Err(Counter::DropVmRoutedRewrite);
    }
    if dst.ifindex != 0 {
        if let Some(rdid) = rdid {
            router::hop(ctx, rdid, dst.mac)?;
        }
        let action = deliver::to_vm(ctx, dst.ifindex, vsid, target)?;
        monitor::sent(ctx, Counter::VmTxLocal, port, ifindex, Stats::LOCAL, len);
        return Ok(action);
    }

    // The destination's record decides the method (README: "Translation methods").
    let overhead = match dst.method {
        m if m == Method::Rewrite as u8 => 0,
        m if m == Method::Encap as u8 => encap::overhead(port),
        _ => return Err(Counter::DropVmMethod),
    };
    if overhead == 0 && hlen != 20 {
        return Err(Counter::DropVmIpOptions);
    }
    let config = underlay::config()?;
    if let Err(offender) = pmtu::fits(ctx, config, ip, overhead) {
        if bounced {
            // An answer would leave by the bounce device, not the VM's port.
            return Err(Counter::DropVmTooBig);
        }
        // The answer comes from whom the VM sent to: the router, or the destination.
        let from = if rdid.is_some() {
            router::mac()
        } else {
            dst.mac
        };
        let action = pmtu::frag_needed(ctx, port, from, offender)?;
        count(Counter::VmIcmpFragNeeded);
        return Ok(action);
    }
    if overhead == 0 {
        let fields = if let Some(rdid) = rdid {
            router::hop(ctx, rdid, dst.mac)?;
            // The header as the router left it (TTL and checksum changed).
            let (data, end) = (ctx.data(), ctx.data_end());
            let ip: &Ipv4Hdr = view_at(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
            rewrite::Ipv4Fields::of(ip)
        } else {
            rewrite::Ipv4Fields::of(ip)
        };
        let action = rewrite::send(ctx, port, dst, &fields)?;
        monitor::sent(
            ctx,
            Counter::VmTxRewrite,
            port,
            ifindex,
            Stats::REWRITE,
            len,
        );
        return Ok(action);
    }
    let bounce = config.bounce_ifindex;
    let inner = encap::Inner::of(ctx, ip);
    // A routed packet rides in its destination's VSID, as HNV sends it.
    let mut from = *port;
    if let Some(rdid) = rdid {
        router::hop(ctx, rdid, dst.mac)?;
        from.vsid = vsid;
    }
    let action = match encap::nvgre(ctx, &from, dst, inner) {
        // A routed super-packet of the VM's own tunnel: its segments would come back as from
        // the router, not the VM.
        Err(Counter::DropVmNestedGso) if rdid.is_some() => return Err(Counter::DropVmNestedGso),
        // A super-packet of the VM's own tunnel: the kernel segments it on the bounce device's
        // transmit, and each segment comes back to `run_bounced`, marked with its port.
        Err(Counter::DropVmNestedGso) if !bounced && bounce != 0 => {
            ctx.set_mark(ifindex);
            count(Counter::VmTxSegmented);
            return Ok(crate::redirect::egress(bounce));
        }
        other => other?,
    };
    monitor::sent(ctx, Counter::VmTxEncap, port, ifindex, Stats::ENCAP, len);
    debug_assert!(action == TC_ACT_REDIRECT);
    Ok(action)
}
