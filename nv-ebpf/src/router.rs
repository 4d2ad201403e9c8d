//! The distributed router: every host routes its own VMs' packets between the subnets of
//! their routing domain, with no gateway VM in the path. A VM of a routed VSID addresses the
//! router's MAC (its gateway's, from ARP); the longest prefix of its domain names the VSID the
//! destination lives in and the VM to send to (the destination, or a route's next hop). The
//! receiving host takes an inner source of another VSID only from a subnet of the same domain
//! ([`source_of`]). VSIDs without a domain never meet any of this.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use nv_common::{
    Counter, PortInfo,
    routing::{GatewayKey, RouteHop, RouteKey},
    wire::{ETH_HLEN, IPPROTO_ICMP},
};

use crate::{
    counters::count,
    maps::{GATEWAYS, ROUTED_STATS, ROUTES, VSID_ROUTING},
    packet::{EthHdr, Ipv4Hdr, csum_fold, ptr_at},
    pmtu::{self, IcmpError},
};

/// The router's MAC, the same on every host (config `router_mac`, set by the loader).
#[unsafe(no_mangle)]
static NV_ROUTER_MAC: [u8; 6] = nv_common::routing::DEFAULT_ROUTER_MAC;

#[inline(always)]
pub fn mac() -> [u8; 6] {
    // SAFETY: a global the loader sets; read as it is, never written.
    unsafe { core::ptr::read_volatile(&raw const NV_ROUTER_MAC) }
}

/// The number of `vsid`'s routing domain, if it has one.
#[inline(always)]
pub fn domain(vsid: u32) -> Option<u32> {
    // SAFETY: read-only use of a value the agent replaces whole.
    unsafe { VSID_ROUTING.get(vsid) }.map(|r| r.rdid)
}

/// The domain a VM's frame to `dst_mac` is routed in: sent to the router's MAC from a VSID of
/// a routing domain, and never a bounced segment (whose frame the router already
/// readdressed). `None`: the destination is a CA of the VM's own VSID.
#[inline(always)]
pub fn routed_in(port: &PortInfo, dst_mac: &[u8; 6], bounced: bool) -> Option<u32> {
    if !bounced && *dst_mac == mac() {
        domain(port.vsid)
    } else {
        None
    }
}

/// The route of domain `rdid` whose prefix holds `addr` most closely.
#[inline(always)]
fn route_to(rdid: u32, addr: [u8; 4]) -> Option<&'static RouteHop> {
    let key = Key::new(
        RouteKey::prefix_len(32),
        RouteKey {
            rdid: rdid.to_be_bytes(),
            addr,
        },
    );
    ROUTES.get(&key)
}

/// Where `dst` goes in domain `rdid`: the VSID it lives in and the CA of the VM to hand it
/// to (`dst` itself on-link, else the route's next hop).
#[inline(always)]
pub fn lookup(rdid: u32, dst: [u8; 4]) -> Option<(u32, [u8; 4])> {
    let hop = route_to(rdid, dst)?;
    Some((hop.vsid, if hop.on_link() { dst } else { hop.nexthop }))
}

/// The gateway of the subnet of domain `rdid` that holds `ca` (a VM's own address).
#[inline(always)]
fn gateway_for(rdid: u32, ca: [u8; 4]) -> Option<[u8; 4]> {
    let hop = route_to(rdid, ca)?;
    (hop.on_link() && hop.gateway != [0; 4]).then_some(hop.gateway)
}

/// ICMP `kind`/`code` back to the VM behind `port`, from the gateway of its subnet in domain
/// `rdid` and the router's MAC; `unanswered` when it must not be answered.
#[inline(always)]
pub fn icmp_error(
    ctx: &TcContext,
    port: &PortInfo,
    rdid: u32,
    kind_code: [u8; 2],
    unanswered: Counter,
) -> Result<i32, Counter> {
    let ca = crate::packet::v4_of(&port.ca).ok_or(unanswered)?;
    let gateway = gateway_for(rdid, ca).ok_or(unanswered)?;
    let error = IcmpError {
        src: gateway,
        kind: kind_code[0],
        code: kind_code[1],
        mtu: [0; 2],
    };
    let action = pmtu::answer(ctx, port, mac(), error).ok_or(unanswered)?;
    count(Counter::VmIcmpFromRouter);
    Ok(action)
}

/// ICMP time exceeded in transit.
pub const TIME_EXCEEDED: [u8; 2] = [11, 0];
/// ICMP destination unreachable: no route (net), no VM at its end (host).
pub const NET_UNREACHABLE: [u8; 2] = [3, 0];
pub const HOST_UNREACHABLE: [u8; 2] = [3, 1];

/// Whether `addr` is the gateway of a subnet of `vsid` (ARP for it is the router's).
#[inline(always)]
pub fn is_gateway_of(vsid: u32, addr: [u8; 4]) -> bool {
    let Some(rdid) = domain(vsid) else {
        return false;
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    unsafe { GATEWAYS.get(GatewayKey { rdid, addr }) }.is_some_and(|v| *v == vsid)
}

/// Whether `addr` is a gateway of domain `rdid` (echo to it is the router's to answer).
#[inline(always)]
pub fn is_gateway_in(rdid: u32, addr: [u8; 4]) -> bool {
    // SAFETY: presence check only.
    unsafe { GATEWAYS.get(GatewayKey { rdid, addr }) }.is_some()
}

/// The VSID an inner source `ca` of a routed packet arriving in `vsid` lives in: a subnet of
/// the same domain (on-link routes only; IP rewrite restores no other address exactly).
#[inline(always)]
pub fn source_of(vsid: u32, ca: [u8; 4]) -> Option<u32> {
    let rdid = domain(vsid)?;
    match lookup(rdid, ca)? {
        (v, target) if target == ca => Some(v),
        _ => None,
    }
}

/// The VM an inner source `ca` of NVGRE arriving in `vsid` may come from, as (VSID, CA): a
/// CA of a subnet of the same domain, or the next hop of the domain's route that covers `ca`
/// (an appliance answering for the world behind it).
#[inline(always)]
pub fn sender_of(vsid: u32, ca: [u8; 4]) -> Option<(u32, [u8; 4])> {
    lookup(domain(vsid)?, ca)
}

/// The next hop, in `vsid` itself, of the route of `vsid`'s domain that covers `dst` (an
/// address of the world behind an appliance of this VSID).
#[inline(always)]
pub fn next_hop_for(vsid: u32, dst: [u8; 4]) -> Option<[u8; 4]> {
    match lookup(domain(vsid)?, dst)? {
        (v, target) if v == vsid && target != dst => Some(target),
        _ => None,
    }
}

/// Whether the VM (`vsid`, `own`) may send from `src`, an address not its own: it is the
/// next hop, in its own VSID, of the route of its domain that covers `src`.
#[inline(always)]
pub fn speaks_for(vsid: u32, own: [u8; 4], src: [u8; 4]) -> bool {
    let Some(rdid) = domain(vsid) else {
        return false;
    };
    route_to(rdid, src).is_some_and(|hop| !hop.on_link() && hop.vsid == vsid && hop.nexthop == own)
}

/// Decrements the TTL of a packet about to be routed, and readdresses its frame: from the
/// router to `dst_mac`. The TTL must be above 1 (the caller checked).
#[inline(always)]
pub fn hop(ctx: &TcContext, rdid: u32, dst_mac: [u8; 6]) -> Result<(), Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: both pointers were bounds-checked just above; byte arrays only.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    eth.dst = dst_mac;
    eth.src = mac();
    // RFC 1624: HC' = ~(~HC + ~m + m'), m the 16-bit word of TTL and protocol.
    let old = u32::from(u16::from_be_bytes([ip.ttl, ip.proto]));
    ip.ttl -= 1;
    let new = u32::from(u16::from_be_bytes([ip.ttl, ip.proto]));
    let sum = u32::from(!u16::from_be_bytes(ip.csum)) + (!old & 0xffff) + new;
    ip.csum = csum_fold(sum).to_be_bytes();
    count(Counter::VmRouted);
    count_in(rdid);
    Ok(())
}

/// An echo request to a gateway, answered by the router back into the VM's port.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn echo(ctx: &TcContext, port: &PortInfo) -> Result<i32, Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: both pointers were bounds-checked just above; byte arrays only.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    // An option-less, unfragmented echo request: anything else to a gateway is dropped.
    if ip.proto != IPPROTO_ICMP || ip.hlen() != 20 || ip.is_fragment() {
        return Err(Counter::DropVmNoRoute);
    }
    let icmp = ptr_at::<[u8; 4]>(data, end, ETH_HLEN + 20).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: bounds-checked just above.
    let icmp = unsafe { &mut *icmp };
    if icmp[0] != 8 || icmp[1] != 0 {
        return Err(Counter::DropVmNoRoute);
    }
    // Type 8 becomes 0: the checksum word's sum drops by 0x0800.
    icmp[0] = 0;
    let sum = u32::from(!u16::from_be_bytes([icmp[2], icmp[3]])) + (!0x0800u32 & 0xffff);
    let csum = csum_fold(sum).to_be_bytes();
    icmp[2] = csum[0];
    icmp[3] = csum[1];
    core::mem::swap(&mut ip.dst, &mut ip.src);
    ip.ttl = 64;
    ip.csum = ip.checksum().to_be_bytes();
    eth.dst = port.mac;
    eth.src = mac();
    count(Counter::VmGatewayReplied);
    // Egress of the port the request came in on (never a bounced segment's).
    // SAFETY: the context pointer is valid for the whole program run.
    Ok(crate::redirect::egress(unsafe { (*ctx.skb.skb).ifindex }))
}

/// One more packet routed in domain `rdid`, on this CPU.
#[inline(always)]
pub fn count_in(rdid: u32) {
    match ROUTED_STATS.get_ptr_mut(rdid) {
        // SAFETY: this CPU's value; only this CPU writes it, and not while we run.
        Some(n) => unsafe { *n += 1 },
        None => {
            // Full (more domains than routed VSIDs cannot be): the packet is routed uncounted.
            let _ = ROUTED_STATS.insert(rdid, 1u64, 0);
        }
    }
}
