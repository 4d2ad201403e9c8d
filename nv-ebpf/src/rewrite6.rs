//! IP rewrite of IPv6 customer addresses over IPv6 provider addresses: as IPv4's (`rewrite`),
//! one PA dedicated to each CA, the addresses replaced in place and back, no header added.
//! IPv6 has no header checksum; the upper layer's covers the addresses (its pseudo-header), so
//! it is fixed incrementally with the kernel's helper, which respects the skb's checksum
//! state. Only packets whose TCP, UDP or ICMPv6 header follows the IPv6 header are rewritten
//! (`from_vm6` sends nothing else this way): those are the ones restored exactly.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use nv_common::{
    Addr, Counter, LookupValue, Method, RewritePa,
    wire::{ETH_HLEN, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HLEN},
};

use crate::{
    packet::{EthHdr, ptr_at, read_at, v4_of, write_at},
    underlay::{self, Hop},
};

/// Where the addresses sit: after version, class, label, length, next header and hop limit.
const ADDRS: usize = ETH_HLEN + 8;

/// Replaces the IPv6 source and destination with `src` and `dst` (in map values: the helpers
/// read them where they are, nothing is copied to the small BPF stack) and fixes the checksum
/// of the upper layer `proto` (right after the IPv6 header).
#[inline(always)]
fn replace(ctx: &TcContext, proto: u8, src: &Addr, dst: &Addr) -> Result<(), ()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ADDRS + 32 > end {
        return Err(());
    }
    let old = (data + ADDRS) as *mut u32;
    // The ones-complement difference of the 32 bytes, by the kernel's own sum.
    // SAFETY: 32 bytes of the packet, bounds-checked above; 16 bytes of each map value.
    let diff = unsafe {
        let d = bpf_csum_diff(old, 16, src.as_ptr().cast_mut().cast(), 16, 0);
        bpf_csum_diff(old.add(4), 16, dst.as_ptr().cast_mut().cast(), 16, d as u32)
    };
    if diff < 0 {
        return Err(());
    }
    // IPv6 has no header checksum to absorb the change: a CHECKSUM_COMPLETE skb's sum is
    // moved by the store, and back by the checksum's own change below.
    let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
    ctx.store(ADDRS, src, recompute).map_err(|_| ())?;
    ctx.store(ADDRS + 16, dst, recompute).map_err(|_| ())?;
    let (off, flags) = match proto {
        IPPROTO_TCP => (16, 0),
        IPPROTO_UDP => (6, u64::from(BPF_F_MARK_MANGLED_0)),
        IPPROTO_ICMPV6 => (2, 0),
        _ => return Err(()),
    };
    // Field size 0: `to` is a checksum difference.
    #[expect(clippy::cast_sign_loss, reason = "checked non-negative")]
    let diff = diff as u64;
    ctx.l4_csum_replace(
        ETH_HLEN + IPV6_HLEN + off,
        0,
        diff,
        u64::from(BPF_F_PSEUDO_HDR) | flags,
    )
    .map_err(|_| ())
}

/// From a VM whose IPv6 record is `from` to one whose record `dst` says rewrite: the source
/// CA becomes the sender's dedicated PA, the destination CA the destination's, then out to
/// the underlay. `info`: the upper-layer protocol and, above it, the traffic class.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn send(
    ctx: &TcContext,
    from: &LookupValue,
    dst: &LookupValue,
    info: u32,
) -> Result<i32, Counter> {
    if from.method != Method::Rewrite as u8 {
        return Err(Counter::DropVmNoRewritePa);
    }
    if v4_of(&from.pa).is_some() || v4_of(&dst.pa).is_some() {
        return Err(Counter::DropVmUnderlayFamily);
    }
    let [proto, tclass, _, _] = info.to_le_bytes();
    // The checksum the kernel or NIC completes after us must be inside the VM's own L4 data.
    crate::csum_offload::check(ctx, ETH_HLEN + IPV6_HLEN)?;
    let config = underlay::config()?;
    // ECN stays the tenant's: the transport's end-to-end marks ride in this very header.
    let (uplink, tos) = (
        config.uplink_ifindex,
        config.underlay_tos(tclass) | (tclass & 0x03),
    );
    replace(ctx, proto, &from.pa, &dst.pa).map_err(|()| Counter::DropVmTranslateFailed)?;
    if tos != tclass {
        let first: [u8; 2] =
            read_at(ctx.data(), ctx.data_end(), ETH_HLEN).ok_or(Counter::DropVmTranslateFailed)?;
        let class = [0x60 | (tos >> 4), (tos << 4) | (first[1] & 0x0f)];
        if !write_at(ctx.data(), ctx.data_end(), ETH_HLEN, class) {
            return Err(Counter::DropVmTranslateFailed);
        }
    }
    let hop = underlay::next_hop6(ctx, uplink, &from.pa, &dst.pa)?;
    if let Hop::Direct { dmac, smac, .. } = &hop {
        let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0)
            .ok_or(Counter::DropVmTranslateFailed)?;
        // SAFETY: bounds-checked; byte arrays only (alignment 1).
        unsafe {
            (*eth).dst = *dmac;
            (*eth).src = *smac;
        }
    }
    // From a PA the datapath owns: the uplink's egress lets it by its mark alone.
    ctx.set_mark(crate::uplink_egress::SENT_MARK);
    Ok(underlay::send(uplink, &hop))
}

/// Puts the customer's addresses and Ethernet header back on an IPv6 rewrite packet from the
/// VM of `from` to the VM of `to`.
#[inline(always)]
pub fn restore(ctx: &TcContext, from: &RewritePa, to: &RewritePa) -> Result<(), ()> {
    crate::packet::pull(ctx, (ETH_HLEN + IPV6_HLEN + 20) as u32);
    let proto: u8 = read_at(ctx.data(), ctx.data_end(), ETH_HLEN + 6).ok_or(())?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&to.mac);
    macs[6..].copy_from_slice(&from.mac);
    if !write_at(ctx.data(), ctx.data_end(), 0, macs) {
        return Err(());
    }
    replace(ctx, proto, &from.ca, &to.ca)
}
