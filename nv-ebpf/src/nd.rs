//! The IPv6 neighbour responder: a VM's solicitation for an IPv6 CA of its VSID is answered from
//! the lookup records, as ARP is for IPv4, so nothing is flooded and no MAC is ever learned.
//! Also what an IPv6 source of a VM may be: one of its own records, or (for neighbour discovery,
//! answered here) a link-local address.
use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use nv_common::{
    Counter, LookupKey6, PortInfo,
    wire::{ETH_HLEN, ETH_P_IPV6, IPPROTO_ICMPV6, IPV6_HLEN, ND_NEIGHBOR_ADVERT},
};

use crate::{
    counters::count,
    maps::LOOKUPS6,
    packet::{EthHdr, Ipv6Hdr, csum_fold, ptr_at, read_at, view_at},
};

/// A neighbour advertisement with the target's link-layer address (RFC 4861 4.4).
#[repr(C)]
struct NdAdvert {
    kind: u8,
    code: u8,
    csum: [u8; 2],
    flags: [u8; 4],
    target: [u8; 16],
    opt_type: u8,
    opt_len: u8,
    opt_mac: [u8; 6],
}

#[repr(C)]
struct Answer {
    eth: EthHdr,
    ip: Ipv6Hdr,
    nd: NdAdvert,
}

const ND_LEN: usize = core::mem::size_of::<NdAdvert>();
const _: () = assert!(ND_LEN == 32);
const _: () = assert!(core::mem::size_of::<Answer>() == ETH_HLEN + IPV6_HLEN + ND_LEN);

/// Solicited and override (RFC 4861 4.4): the answer for a neighbour the VM asked about.
pub const NA_SOLICITED_OVERRIDE: [u8; 4] = [0x60, 0, 0, 0];
/// The same from a router.
const NA_ROUTER_SOLICITED_OVERRIDE: [u8; 4] = [0xe0, 0, 0, 0];
/// The target link-layer address option, one 8-byte unit.
const OPT_TARGET_LLADDR: u8 = 2;

/// Whether `src` is an IPv6 source the VM behind `ifindex` may send from: a record of its own.
#[inline(always)]
pub fn is_own(port: &PortInfo, ifindex: u32, src: &[u8; 16]) -> bool {
    let key = LookupKey6 {
        vsid: port.vsid,
        ca: *src,
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    unsafe { LOOKUPS6.get(key) }.is_some_and(|r| r.ifindex == ifindex && r.mac == port.mac)
}

fn is_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// Answers the neighbour solicitation whose ICMPv6 header starts at `l4`, sent by the VM
/// behind `ifindex`, out of the same port.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn answer(ctx: &TcContext, port: &PortInfo, ifindex: u32, l4: usize) -> Result<i32, Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip: &Ipv6Hdr = view_at(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    // On the link only (RFC 4861 7.1.1: hop limit 255), right after the IPv6 header.
    if l4 != ETH_HLEN + IPV6_HLEN || ip.hop_limit != 255 {
        return Err(Counter::DropVmNdUnanswered);
    }
    let (asker, code) = (ip.src, read_at::<u8>(data, end, ETH_HLEN + IPV6_HLEN + 1));
    if code != Some(0) {
        return Err(Counter::DropVmNdUnanswered);
    }
    // Duplicate address detection: nothing to say (the VM's address is its record's).
    if asker == [0; 16] {
        return Err(Counter::DropVmNdUnanswered);
    }
    if !is_link_local(&asker) && !is_own(port, ifindex, &asker) {
        return Err(Counter::DropVmSpoofedIp);
    }
    let target: [u8; 16] =
        read_at(data, end, ETH_HLEN + IPV6_HLEN + 8).ok_or(Counter::DropVmMalformed)?;
    let found = neighbour(port, ifindex, &target);
    if found == UNANSWERED {
        return Err(Counter::DropVmNdUnanswered);
    }
    let mac = u64::to_be_bytes(found);
    let mac = [mac[2], mac[3], mac[4], mac[5], mac[6], mac[7]];
    let flags = if found & ROUTER != 0 {
        NA_ROUTER_SOLICITED_OVERRIDE
    } else {
        NA_SOLICITED_OVERRIDE
    };
    advertise(ctx, port.mac, mac, &asker, &target, flags)?;
    count(Counter::VmNdReplied);
    Ok(crate::redirect::egress(ifindex))
}

/// Turns the frame into the advertisement to `asker` (at `to_mac`) that `target` is at
/// `mac`, with `flags`; the caller sends it.
#[inline(always)]
pub fn advertise(
    ctx: &TcContext,
    to_mac: [u8; 6],
    mac: [u8; 6],
    asker: &[u8; 16],
    target: &[u8; 16],
    flags: [u8; 4],
) -> Result<(), Counter> {
    #[expect(clippy::cast_possible_truncation, reason = "86 bytes")]
    let len = core::mem::size_of::<Answer>() as u32;
    // SAFETY: helper on the program's own context; pointers are derived again below.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(Counter::DropVmMalformed);
    }
    let a = ptr_at::<Answer>(ctx.data(), ctx.data_end(), 0).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: bounds-checked just above; every field is a byte array (alignment 1).
    let a = unsafe { &mut *a };
    a.eth.dst = to_mac;
    a.eth.src = mac;
    a.eth.proto = ETH_P_IPV6.to_be_bytes();
    #[expect(clippy::cast_possible_truncation, reason = "32 bytes")]
    let payload = (ND_LEN as u16).to_be_bytes();
    a.ip.ver_tc_flow = [0x60, 0, 0, 0];
    a.ip.payload_len = payload;
    a.ip.next = IPPROTO_ICMPV6;
    a.ip.hop_limit = 255;
    a.ip.src = *target;
    a.ip.dst = *asker;
    a.nd.kind = ND_NEIGHBOR_ADVERT;
    a.nd.code = 0;
    a.nd.flags = flags;
    a.nd.target = *target;
    a.nd.opt_type = OPT_TARGET_LLADDR;
    a.nd.opt_len = 1;
    a.nd.opt_mac = mac;
    a.nd.csum = [0; 2];
    a.nd.csum = checksum(a).to_be_bytes();
    Ok(())
}

/// [`neighbour`]'s answers: nobody to name; the router's MAC (flagged).
const UNANSWERED: u64 = u64::MAX;
const ROUTER: u64 = 1 << 48;

/// The MAC the VM behind `ifindex` is told for `target`, in the low 48 bits: a VM's of its
/// VSID, or the router's with [`ROUTER`] set (a VM keeps a default router only while it says
/// it routes, RFC 4861 7.2.5); [`UNANSWERED`] for its own address or one nobody has.
#[inline(always)]
fn neighbour(port: &PortInfo, ifindex: u32, target: &[u8; 16]) -> u64 {
    let mac = |m: [u8; 6]| u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]]);
    let key = LookupKey6 {
        vsid: port.vsid,
        ca: *target,
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    match unsafe { LOOKUPS6.get(key) } {
        // Its own address: nobody else has it.
        Some(record) if record.ifindex == ifindex => UNANSWERED,
        Some(record) => mac(record.mac),
        None if crate::router6::answers_for(port.vsid, target) => {
            mac(crate::router::mac()) | ROUTER
        }
        None => UNANSWERED,
    }
}

/// The ICMPv6 checksum of the advertisement as written (its checksum field zero): the
/// pseudo-header (addresses, length, next header) and the message, read in place so nothing
/// is copied to the small BPF stack.
#[inline(always)]
fn checksum(a: &Answer) -> u16 {
    // SAFETY: `Answer` is repr(C) of byte arrays, 86 bytes with no padding.
    let bytes: &[u8; core::mem::size_of::<Answer>()] = unsafe { &*(core::ptr::from_ref(a).cast()) };
    // Source and destination addresses, then the advertisement itself.
    let (addrs, message) = (ETH_HLEN + 8, ETH_HLEN + IPV6_HLEN);
    let mut sum = 0u32;
    let mut i = addrs;
    while i < message + ND_LEN {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    #[expect(clippy::cast_possible_truncation, reason = "32 bytes")]
    let len = ND_LEN as u32;
    csum_fold(sum + len + u32::from(IPPROTO_ICMPV6))
}
