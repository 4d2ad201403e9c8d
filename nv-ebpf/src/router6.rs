//! The distributed router for IPv6, as `router` is for IPv4: a VM of a routed VSID sends to
//! the router's MAC (its default router's, from the advertisements the agent sends, or its
//! gateway's, from neighbour discovery); the longest IPv6 prefix of its domain names the VSID
//! and the VM to hand the packet to. The router speaks from each subnet's gateway address and
//! from its link-local address (the EUI-64 of its MAC), the same in every routed VSID.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use nv_common::{
    Counter, LookupKey6, LookupValue, PortInfo,
    routing::{GatewayKey6, RouteHop6, RouteKey, RouteKey6, router_link_local},
    wire::{ETH_HLEN, IPV6_HLEN},
};

use crate::{
    counters::count,
    icmp6::{self, Icmp6Error},
    maps::{GATEWAYS6, LOOKUPS6, ROUTES6},
    packet::{EthHdr, Ipv6Hdr, csum_fold, ptr_at},
    router::{count_in, domain, mac},
};

/// ICMPv6 echo request and reply (RFC 4443).
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;

/// The route of domain `rdid` whose prefix holds `addr` most closely.
#[inline(always)]
fn route_to(rdid: u32, addr: [u8; 16]) -> Option<&'static RouteHop6> {
    let key = Key::new(
        RouteKey::prefix_len(128),
        RouteKey6 {
            rdid: rdid.to_be_bytes(),
            addr,
        },
    );
    ROUTES6.get(&key)
}

/// Where `dst` goes in domain `rdid`: the VSID it lives in and the CA of the VM to hand it
/// to (`dst` itself on-link, else the route's next hop).
#[inline(always)]
pub fn lookup(rdid: u32, dst: [u8; 16]) -> Option<(u32, [u8; 16])> {
    let hop = route_to(rdid, dst)?;
    Some((hop.vsid, if hop.on_link() { dst } else { hop.nexthop }))
}

/// The record of the VM an inner source `ca` of NVGRE arriving in `vsid` comes from, routed
/// by its host: a CA of another subnet of the same domain. (IPv6 next hops do not answer for
/// the world behind them: a VM sends IPv6 from its own address only.)
// Out of line: its own stack frame, apart from the uplink programs'.
#[inline(never)]
pub fn routed_sender(vsid: u32, ca: &[u8; 16]) -> Option<&'static LookupValue> {
    let (from, target) = lookup(domain(vsid)?, *ca)?;
    if from == vsid || target != *ca {
        return None;
    }
    // SAFETY: read-only use of a value the agent replaces whole.
    unsafe {
        LOOKUPS6.get(LookupKey6 {
            vsid: from,
            ca: *ca,
        })
    }
}

/// Whether `addr` is the router's in `vsid` (neighbour discovery for it is the router's to
/// answer): a gateway of a subnet of `vsid`, or the router's link-local address.
#[inline(always)]
pub fn answers_for(vsid: u32, addr: &[u8; 16]) -> bool {
    let Some(rdid) = domain(vsid) else {
        return false;
    };
    if is_link_local_of(addr, mac()) {
        return true;
    }
    let key = GatewayKey6 { rdid, addr: *addr };
    // SAFETY: read-only use of a value the agent replaces whole.
    unsafe { GATEWAYS6.get(key) }.is_some_and(|v| *v == vsid)
}

/// Whether `addr` is a gateway of domain `rdid` or the router's link-local address (echo to
/// it is the router's to answer).
#[inline(always)]
pub fn is_gateway_in(rdid: u32, addr: &[u8; 16]) -> bool {
    let key = GatewayKey6 { rdid, addr: *addr };
    // SAFETY: presence check only.
    is_link_local_of(addr, mac()) || unsafe { GATEWAYS6.get(key) }.is_some()
}

/// Whether `addr` is [`router_link_local`] of `mac`, compared in two words rather than built
/// (16 bytes less of the small BPF stack).
#[inline(always)]
fn is_link_local_of(addr: &[u8; 16], mac: [u8; 6]) -> bool {
    let want = router_link_local(mac);
    let word = |a: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    word(addr, 0) == word(&want, 0) && word(addr, 8) == word(&want, 8)
}

/// ICMPv6 `kind_code` back to the VM behind `port`, from the gateway of its subnet in domain
/// `rdid` and the router's MAC; `unanswered` when it must not be answered. The VM's address
/// is the packet's source (checked against its record).
#[inline(always)]
pub fn icmp_error(
    ctx: &TcContext,
    port: &PortInfo,
    rdid: u32,
    kind_code: [u8; 2],
    unanswered: Counter,
) -> Result<i32, Counter> {
    match answer_error(ctx, port, rdid, kind_code) {
        NOT_ANSWERED => Err(unanswered),
        action => {
            count(Counter::VmIcmpFromRouter);
            #[expect(clippy::cast_possible_wrap, reason = "a TC action")]
            Ok(action as i32)
        }
    }
}

const NOT_ANSWERED: u32 = u32::MAX;

// Out of line, returning a scalar: its own stack frame, apart from the forwarding path's.
#[inline(never)]
fn answer_error(ctx: &TcContext, port: &PortInfo, rdid: u32, kind_code: [u8; 2]) -> u32 {
    let Ok(vm_ca) = ctx.load::<[u8; 16]>(ETH_HLEN + 8) else {
        return NOT_ANSWERED;
    };
    let Some(hop) = route_to(rdid, vm_ca) else {
        return NOT_ANSWERED;
    };
    if !hop.on_link() || hop.gateway == [0; 16] {
        return NOT_ANSWERED;
    }
    let error = Icmp6Error {
        src: hop.gateway,
        kind_code,
        mtu: 0,
    };
    #[expect(clippy::cast_sign_loss, reason = "a TC action")]
    icmp6::answer(ctx, port, mac(), &error).map_or(NOT_ANSWERED, |a| a as u32)
}

/// Decrements the hop limit of a packet about to be routed, and readdresses its frame: from
/// the router to `dst_mac`. The hop limit must be above 1 (the caller checked). IPv6 has no
/// header checksum to mend.
#[inline(always)]
pub fn hop(ctx: &TcContext, rdid: u32, dst_mac: [u8; 6]) -> Result<(), Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    let ip = ptr_at::<Ipv6Hdr>(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: both pointers were bounds-checked just above; byte arrays only.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    eth.dst = dst_mac;
    eth.src = mac();
    ip.hop_limit -= 1;
    count(Counter::VmRouted);
    count_in(rdid);
    Ok(())
}

/// An ICMPv6 echo request to the router (`l4`: where its ICMPv6 header starts), answered back
/// into the VM's port. Anything else to the router is dropped.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn echo(ctx: &TcContext, port: &PortInfo, proto: u8, l4: usize) -> Result<i32, Counter> {
    // Right after the IPv6 header: extension headers would have to be echoed as they came.
    if proto != nv_common::wire::IPPROTO_ICMPV6 || l4 != ETH_HLEN + IPV6_HLEN {
        return Err(Counter::DropVmNoRoute);
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    let ip = ptr_at::<Ipv6Hdr>(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    let icmp =
        ptr_at::<[u8; 4]>(data, end, ETH_HLEN + IPV6_HLEN).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: the pointers were bounds-checked just above; byte arrays only.
    let (eth, ip, icmp) = unsafe { (&mut *eth, &mut *ip, &mut *icmp) };
    if icmp[0] != ECHO_REQUEST || icmp[1] != 0 {
        return Err(Counter::DropVmNoRoute);
    }
    // The type's word grows by 0x0100; the pseudo-header's addresses only swap places.
    icmp[0] = ECHO_REPLY;
    let old = u32::from(u16::from_be_bytes([ECHO_REQUEST, 0]));
    let new = u32::from(u16::from_be_bytes([ECHO_REPLY, 0]));
    let sum = u32::from(!u16::from_be_bytes([icmp[2], icmp[3]])) + (!old & 0xffff) + new;
    let csum = csum_fold(sum).to_be_bytes();
    icmp[2] = csum[0];
    icmp[3] = csum[1];
    core::mem::swap(&mut ip.dst, &mut ip.src);
    ip.hop_limit = 64;
    eth.dst = port.mac;
    eth.src = mac();
    count(Counter::VmGatewayReplied);
    // Egress of the port the request came in on (never a bounced segment's).
    // SAFETY: the context pointer is valid for the whole program run.
    Ok(crate::redirect::egress(unsafe { (*ctx.skb.skb).ifindex }))
}
