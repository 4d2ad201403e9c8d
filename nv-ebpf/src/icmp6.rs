//! ICMPv6 errors a VM is sent, as `pmtu` sends IPv4's: "packet too big" for a packet that
//! would not fit the uplink once encapsulated (RFC 8201: the VM's TCP lowers its segment size),
//! and the router's time exceeded and destination unreachable. The offending packet becomes the
//! answer (its first bytes quoted), out of the port it came in on, within the port's budget of
//! answers, shared with IPv4's.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_csum_diff, bpf_skb_change_tail},
    programs::TcContext,
};
use nv_common::{
    IcmpBucket, PortInfo,
    wire::{ETH_HLEN, ETH_P_IPV6, IPPROTO_ICMPV6, IPV6_HLEN},
};

use crate::{
    maps::ICMP_BUCKET,
    packet::{EthHdr, Ipv6Hdr, csum_fold, ptr_at, read_at},
};

/// Bytes of the offending packet an answer quotes: its IPv6 header and the start of what it
/// carries (TCP's ports and sequence number among them). A multiple of 4 for the checksum
/// helper; a shorter packet is padded with zeros (its own payload length still tells).
const QUOTE: usize = 128;
const ICMP_HLEN: usize = 8;

/// The smallest MTU IPv6 allows (RFC 8200): nv never asks a VM for less.
pub const IPV6_MIN_MTU: u32 = 1280;

/// ICMPv6 types and codes the datapath sends (RFC 4443).
pub const DEST_UNREACH_NO_ROUTE: [u8; 2] = [1, 0];
pub const DEST_UNREACH_ADDRESS: [u8; 2] = [1, 3];
pub const PACKET_TOO_BIG: [u8; 2] = [2, 0];
pub const TIME_EXCEEDED: [u8; 2] = [3, 0];

/// What the answer says and whom it is from.
pub struct Icmp6Error {
    pub src: [u8; 16],
    pub kind_code: [u8; 2],
    /// The MTU the VM must use ("packet too big"), else zero.
    pub mtu: u32,
}

#[repr(C)]
struct Answer {
    eth: EthHdr,
    ip: Ipv6Hdr,
    kind: u8,
    code: u8,
    csum: [u8; 2],
    mtu: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<Answer>() == ETH_HLEN + IPV6_HLEN + ICMP_HLEN);

/// `error` back to the VM behind `port` from `from_mac`, out of the port the packet came in
/// on; `None` when it must not be answered (an error about an error, the port's budget spent).
#[inline(always)]
pub fn answer(
    ctx: &TcContext,
    port: &PortInfo,
    from_mac: [u8; 6],
    error: &Icmp6Error,
) -> Option<i32> {
    if build(ctx, port, from_mac, error) != 0 {
        return None;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    Some(crate::redirect::egress(unsafe { (*ctx.skb.skb).ifindex }))
}

/// Turns the packet into the answer: 0, or 1 when it must not be answered.
// Out of line, returning a scalar: its own stack frame, apart from the forwarding path's.
#[inline(never)]
fn build(ctx: &TcContext, port: &PortInfo, from_mac: [u8; 6], error: &Icmp6Error) -> u32 {
    let Some(ip) = read_at::<Ipv6Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) else {
        return 1;
    };
    // Never an error about an error (RFC 4443 2.4 e): ICMPv6 types below 128.
    let is_error = ip.next == IPPROTO_ICMPV6
        && read_at::<[u8; 4]>(ctx.data(), ctx.data_end(), ETH_HLEN + IPV6_HLEN)
            .is_none_or(|h| h[0] < 128);
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if is_error
        || !crate::budget::take(
            &ICMP_BUCKET,
            ifindex,
            IcmpBucket::PER_SEC,
            IcmpBucket::BURST,
        )
    {
        return 1;
    }
    // SAFETY: helper on the program's own skb: trims it to the quote, or pads it with zeros.
    #[expect(clippy::cast_possible_truncation, reason = "142 bytes")]
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE) as u32, 0) } != 0 {
        return 1;
    }
    #[expect(clippy::cast_possible_wrap, reason = "48 bytes")]
    let room = (IPV6_HLEN + ICMP_HLEN) as i32;
    if ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).is_err() {
        return 1;
    }
    let Some(quote) =
        ptr_at::<[u8; QUOTE]>(ctx.data(), ctx.data_end(), ETH_HLEN + IPV6_HLEN + ICMP_HLEN)
    else {
        return 1;
    };
    // SAFETY: helper reading the bounds-checked quote; no "from" buffer.
    #[expect(clippy::cast_possible_truncation, reason = "128 bytes")]
    let quoted = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote.cast::<u32>(),
            QUOTE as u32,
            0,
        )
    };
    let Some(a) = ptr_at::<Answer>(ctx.data(), ctx.data_end(), 0) else {
        return 1;
    };
    // SAFETY: bounds-checked just above (the helper call ended earlier views' life); every
    // field is a byte array (alignment 1).
    let a = unsafe { &mut *a };
    a.eth = EthHdr {
        dst: port.mac,
        src: from_mac,
        proto: ETH_P_IPV6.to_be_bytes(),
    };
    #[expect(clippy::cast_possible_truncation, reason = "136 bytes")]
    let payload = (ICMP_HLEN + QUOTE) as u16;
    a.ip = Ipv6Hdr {
        ver_tc_flow: [0x60, 0, 0, 0],
        payload_len: payload.to_be_bytes(),
        next: IPPROTO_ICMPV6,
        hop_limit: 64,
        src: error.src,
        // The VM's own address: the offending packet's source (checked against its record).
        dst: ip.src,
    };
    a.kind = error.kind_code[0];
    a.code = error.kind_code[1];
    a.csum = [0; 2];
    a.mtu = error.mtu.to_be_bytes();
    // The quote's sum (native-order words, as the helper adds them), the pseudo-header and
    // the ICMPv6 header the same way: a ones-complement sum is byte-order independent.
    #[expect(clippy::cast_sign_loss, reason = "a 32-bit sum")]
    let mut sum = u64::from(quoted as u32);
    let mut i = 0;
    while i < 16 {
        sum += u64::from(u16::from_ne_bytes([a.ip.src[i], a.ip.src[i + 1]]));
        sum += u64::from(u16::from_ne_bytes([a.ip.dst[i], a.ip.dst[i + 1]]));
        i += 2;
    }
    sum += u64::from(u16::from_ne_bytes(payload.to_be_bytes()));
    sum += u64::from(u16::from_ne_bytes([0, IPPROTO_ICMPV6]));
    sum += u64::from(u16::from_ne_bytes(error.kind_code));
    sum += u64::from(u16::from_ne_bytes([a.mtu[0], a.mtu[1]]));
    sum += u64::from(u16::from_ne_bytes([a.mtu[2], a.mtu[3]]));
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 32 bits")]
    let csum = csum_fold(((sum & 0xffff_ffff) + (sum >> 32)) as u32);
    a.csum = csum.to_ne_bytes();
    0
}
