//! The hand-off of a translated packet to the underlay: MTU check, next hop from the FIB,
//! redirect to the uplink. Shared by NVGRE encapsulation and IP rewrite.
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_fib_lookup,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_jiffies64, bpf_ktime_get_ns},
    programs::TcContext,
};
use nv_common::{Addr, Counter, DatapathConfig, NextHop, NextHop6, wire::ETH_HLEN};

use crate::{
    maps::{CONFIG, NEXTHOPS, NEXTHOPS6, UNDERLAY_ALIVE, UNDERLAY_HOPS},
    packet::{EthHdr, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The datapath's config once the agent has named the uplink, or a counted drop before.
#[inline(always)]
pub fn config() -> Result<&'static DatapathConfig, Counter> {
    match CONFIG.get(0) {
        Some(c) if c.uplink_ifindex != 0 => Ok(c),
        _ => Err(Counter::DropVmNoUnderlayRoute),
    }
}

/// Where a packet for a PA goes next.
pub enum Hop {
    /// Straight out of `ifindex`, with these destination and source MACs.
    Direct {
        ifindex: u32,
        dmac: [u8; 6],
        smac: [u8; 6],
    },
    /// The neighbour is not resolved yet (or the host does not forward on the uplink): the
    /// kernel routes the packet, resolves the neighbour and writes the Ethernet header.
    Kernel,
}

/// Sends the packet (its IPv4 header already between provider addresses) out of the uplink.
/// Addresses are IPv4 in network order, as one register each.
/// Inlined: BPF calls take at most five arguments.
#[inline(always)]
pub fn transmit(
    ctx: &TcContext,
    uplink: u32,
    src_pa: u32,
    dst_pa: u32,
    l4_protocol: u8,
) -> Result<i32, Counter> {
    let hop = next_hop(ctx, uplink, src_pa, dst_pa, l4_protocol)?;
    if let Hop::Direct { dmac, smac, .. } = &hop {
        let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0)
            .ok_or(Counter::DropVmTranslateFailed)?;
        // SAFETY: bounds-checked; byte arrays only (alignment 1).
        unsafe {
            (*eth).dst = *dmac;
            (*eth).src = *smac;
        }
    }
    Ok(send(uplink, &hop))
}

/// Hands the packet, its Ethernet header written for `hop`, to the underlay.
#[inline(always)]
pub fn send(uplink: u32, hop: &Hop) -> i32 {
    match hop {
        Hop::Direct { ifindex, .. } => crate::redirect::egress(*ifindex),
        Hop::Kernel => crate::redirect::neigh(uplink),
    }
}

/// Checks that the packet (translated, but for its Ethernet addresses) fits the uplink, and
/// finds its next hop. Inlined: BPF calls take at most five arguments.
#[inline(always)]
pub fn next_hop(
    ctx: &TcContext,
    uplink: u32,
    src_pa: u32,
    dst_pa: u32,
    l4_protocol: u8,
) -> Result<Hop, Counter> {
    let slot = NextHop::slot(dst_pa);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_jiffies64() };
    if let Some(nh) = NEXTHOPS.get_ptr(slot) {
        // SAFETY: this CPU's slot; only this CPU writes it, and not while we run.
        let nh = unsafe { &*nh };
        if nh.pa == dst_pa && nh.expires > now {
            check_cached_mtu(ctx, uplink, nh.mtu)?;
            // Written out here: a helper returning the hop would return it through the stack.
            if nh.ifindex == 0 {
                return Ok(Hop::Kernel);
            }
            return Ok(Hop::Direct {
                ifindex: nh.ifindex,
                dmac: nh.dmac,
                smac: nh.smac,
            });
        }
    }
    check_mtu(ctx, uplink)?;
    match ask_fib(ctx, uplink, src_pa, dst_pa, l4_protocol) {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let nh = NEXTHOPS.get(slot).ok_or(Counter::DropVmNoUnderlayRoute)?;
            Ok(Hop::Direct {
                ifindex: nh.ifindex,
                dmac: nh.dmac,
                smac: nh.smac,
            })
        }
        // The FIB helper also refuses when the host does not forward on the uplink (it checks
        // that even for output lookups).
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FWD_DISABLED => Ok(Hop::Kernel),
        _ => Err(Counter::DropVmNoUnderlayRoute),
    }
}

/// [`next_hop`] for an IPv6 PA, from its own cache.
#[inline(always)]
pub fn next_hop6(
    ctx: &TcContext,
    uplink: u32,
    src_pa: &Addr,
    dst_pa: &Addr,
) -> Result<Hop, Counter> {
    let slot = NextHop6::slot(dst_pa);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_jiffies64() };
    if let Some(nh) = NEXTHOPS6.get_ptr(slot) {
        // SAFETY: this CPU's slot; only this CPU writes it, and not while we run.
        let nh = unsafe { &*nh };
        if nh.pa == *dst_pa && nh.expires > now {
            check_cached_mtu(ctx, uplink, nh.mtu)?;
            // Written out here: a helper returning the hop would return it through the stack.
            if nh.ifindex == 0 {
                return Ok(Hop::Kernel);
            }
            return Ok(Hop::Direct {
                ifindex: nh.ifindex,
                dmac: nh.dmac,
                smac: nh.smac,
            });
        }
    }
    check_mtu(ctx, uplink)?;
    match ask_fib6(ctx, uplink, src_pa, dst_pa) {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let nh = NEXTHOPS6.get(slot).ok_or(Counter::DropVmNoUnderlayRoute)?;
            Ok(Hop::Direct {
                ifindex: nh.ifindex,
                dmac: nh.dmac,
                smac: nh.smac,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH | BPF_FIB_LKUP_RET_FWD_DISABLED => Ok(Hop::Kernel),
        _ => Err(Counter::DropVmNoUnderlayRoute),
    }
}

/// A frame sent to a cached hop: checked by the MTU helper unless it is no GSO super-packet
/// and fits the cached route MTU (0 for the kernel's hop: every frame is checked).
#[inline(always)]
fn check_cached_mtu(ctx: &TcContext, uplink: u32, mtu: u32) -> Result<(), Counter> {
    // A guest's super-packet has no segment count yet: its segment size says GSO.
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if gso || ctx.len() > mtu + ETH_HLEN as u32 {
        check_mtu(ctx, uplink)?;
    }
    Ok(())
}

/// The frame (and, for GSO, each of its segments) must fit the uplink's MTU.
#[inline(always)]
fn check_mtu(ctx: &TcContext, uplink: u32) -> Result<(), Counter> {
    let mut mtu_len = 0u32;
    // SAFETY: helper on the program's own skb with a stack out-parameter.
    let rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast::<c_void>(),
            uplink,
            &raw mut mtu_len,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Counter::DropVmTooBig)
    }
}

/// Asks the FIB for the next hop of `dst_pa` and, when it has one, caches it in this CPU's
/// slot. Out of line and only on a cache miss: the 64-byte lookup struct lives in its own
/// stack frame.
#[inline(never)]
fn ask_fib(ctx: &TcContext, uplink: u32, src_pa: u32, dst_pa: u32, l4_protocol: u8) -> u32 {
    // SAFETY: zeroed bindgen struct of plain integers.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = l4_protocol;
    fib.ifindex = uplink;
    fib.__bindgen_anon_3.ipv4_src = src_pa;
    fib.__bindgen_anon_4.ipv4_dst = dst_pa;
    // SAFETY: helper with a stack struct of the size we pass.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "64 bytes"
    )]
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast::<c_void>(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    #[expect(
        clippy::cast_sign_loss,
        clippy::cast_possible_truncation,
        reason = "return codes are small and non-negative"
    )]
    let rc = rc as u32;
    // A host that does not forward on the uplink: the hop the agent resolved from the host's
    // routes and neighbours, or else the kernel's hop; remembered either way, every frame's
    // MTU checked (an unresolved neighbour is asked for again next time).
    let mut found = rc == BPF_FIB_LKUP_RET_SUCCESS;
    if rc == BPF_FIB_LKUP_RET_FWD_DISABLED
        && let Some(&alive) = UNDERLAY_ALIVE.get(0)
        // SAFETY: plain helper call.
        && alive > unsafe { bpf_ktime_get_ns() }
        // SAFETY: map values are plain data the agent writes whole.
        && let Some(hop) = unsafe { UNDERLAY_HOPS.get(dst_pa) }
        && let Ok(c) = config()
    {
        fib.ifindex = uplink;
        fib.smac = c.uplink_mac;
        fib.dmac = hop.dmac;
        // The route's MTU is not known here: 0 has the helper check every frame.
        fib.__bindgen_anon_1.mtu_result = 0;
        found = true;
    }
    if found || rc == BPF_FIB_LKUP_RET_FWD_DISABLED {
        let Some(slot) = NEXTHOPS.get_ptr_mut(NextHop::slot(dst_pa)) else {
            return BPF_FIB_LKUP_RET_NO_NEIGH;
        };
        // SAFETY: this CPU's slot, written whole.
        unsafe {
            *slot = NextHop {
                pa: dst_pa,
                ifindex: if found { fib.ifindex } else { 0 },
                smac: fib.smac,
                dmac: fib.dmac,
                // SAFETY: union member the helper fills on success (0 for GSO: the helper
                // then checks every packet).
                mtu: if found {
                    u32::from(fib.__bindgen_anon_1.mtu_result)
                } else {
                    0
                },
                // SAFETY: plain helper call.
                expires: bpf_jiffies64() + NextHop::TTL_JIFFIES,
            };
        }
    }
    if found { BPF_FIB_LKUP_RET_SUCCESS } else { rc }
}

/// [`ask_fib`] for an IPv6 PA.
#[inline(never)]
fn ask_fib6(ctx: &TcContext, uplink: u32, src_pa: &Addr, dst_pa: &Addr) -> u32 {
    // SAFETY: zeroed bindgen struct of plain integers.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.l4_protocol = nv_common::wire::IPPROTO_GRE;
    fib.ifindex = uplink;
    // The helper reads the addresses as four network-order words.
    fib.__bindgen_anon_3.ipv6_src = words(src_pa);
    fib.__bindgen_anon_4.ipv6_dst = words(dst_pa);
    // SAFETY: helper with a stack struct of the size we pass.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "64 bytes"
    )]
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast::<c_void>(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    #[expect(
        clippy::cast_sign_loss,
        clippy::cast_possible_truncation,
        reason = "return codes are small and non-negative"
    )]
    let rc = rc as u32;
    // As in `ask_fib`.
    let found = rc == BPF_FIB_LKUP_RET_SUCCESS;
    if found || rc == BPF_FIB_LKUP_RET_FWD_DISABLED {
        let Some(slot) = NEXTHOPS6.get_ptr_mut(NextHop6::slot(dst_pa)) else {
            return BPF_FIB_LKUP_RET_NO_NEIGH;
        };
        // SAFETY: this CPU's slot, written whole.
        unsafe {
            *slot = NextHop6 {
                pa: *dst_pa,
                ifindex: if found { fib.ifindex } else { 0 },
                smac: fib.smac,
                dmac: fib.dmac,
                // SAFETY: union member the helper fills on success.
                mtu: if found {
                    u32::from(fib.__bindgen_anon_1.mtu_result)
                } else {
                    0
                },
                _pad: 0,
                // SAFETY: plain helper call.
                expires: bpf_jiffies64() + NextHop::TTL_JIFFIES,
            };
        }
    }
    rc
}

#[inline(always)]
fn words(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
