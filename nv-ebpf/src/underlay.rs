//! The hand-off of a translated packet to the underlay: MTU check, next hop from the FIB,
//! redirect to the uplink. Shared by NVGRE encapsulation and IP rewrite.
use core::{ffi::c_void, mem::size_of, ptr};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_fib_lookup,
    },
    helpers::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_jiffies64, bpf_redirect,
        bpf_redirect_neigh,
    },
    programs::TcContext,
};
use nv_common::{Counter, NextHop};

use crate::maps::{CONFIG, NEXTHOPS};

const AF_INET: u8 = 2;

/// The uplink's ifindex, or a counted drop when the agent has not configured it.
#[inline(always)]
pub fn uplink() -> Result<u32, Counter> {
    match CONFIG.get(0).map_or(0, |c| c.uplink_ifindex) {
        0 => Err(Counter::DropVmNoUnderlayRoute),
        ifindex => Ok(ifindex),
    }
}

/// Sends the packet (its IPv4 header already between provider addresses) out of the uplink.
/// Inlined: BPF calls take at most five arguments.
#[inline(always)]
pub fn transmit(
    ctx: &TcContext,
    uplink: u32,
    src_pa: [u8; 4],
    dst_pa: [u8; 4],
    l4_protocol: u8,
) -> Result<i32, Counter> {
    // The frame (and, for GSO, each of its segments) must fit the uplink's MTU.
    let mut mtu_len = 0u32;
    // SAFETY: helper on the program's own skb with a stack out-parameter.
    let mtu_rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast::<c_void>(),
            uplink,
            &raw mut mtu_len,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    if mtu_rc != 0 {
        return Err(Counter::DropVmTooBig);
    }

    // The FIB costs more than the rest of encapsulation together: its answer for this PA is
    // cached for NextHop::TTL_JIFFIES (jiffies: far cheaper to read than the clock).
    let key = u32::from_ne_bytes(dst_pa);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: read-only use of a value replaced whole.
    if let Some(nh) = unsafe { NEXTHOPS.get(&key) }
        && nh.expires > now
    {
        let (ifindex, mut macs) = (nh.ifindex, [0u8; 12]);
        macs[..6].copy_from_slice(&nh.dmac);
        macs[6..].copy_from_slice(&nh.smac);
        ctx.store(0, &macs, 0)
            .map_err(|_| Counter::DropVmTranslateFailed)?;
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(ifindex, 0) } as i32);
    }

    // SAFETY: zeroed bindgen struct of plain integers.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = l4_protocol;
    fib.ifindex = uplink;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src_pa);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst_pa);
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
        reason = "return codes are small and non-negative"
    )]
    let rc = rc as u32;
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        ctx.store(0, &macs, 0)
            .map_err(|_| Counter::DropVmTranslateFailed)?;
        let nh = NextHop {
            ifindex: fib.ifindex,
            smac: fib.smac,
            dmac: fib.dmac,
            expires: now + NextHop::TTL_JIFFIES,
        };
        let _ = NEXTHOPS.insert(&key, &nh, 0);
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32);
    }
    if rc != BPF_FIB_LKUP_RET_NO_NEIGH && rc != BPF_FIB_LKUP_RET_FWD_DISABLED {
        return Err(Counter::DropVmNoUnderlayRoute);
    }
    // Neighbour not resolved yet, or the FIB helper refused because the host does not forward
    // on the uplink (it checks that even for output lookups): the kernel routes the packet
    // itself, resolves the neighbour and queues the packet meanwhile.
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect_neigh(uplink, ptr::null_mut(), 0, 0) } as i32)
}
