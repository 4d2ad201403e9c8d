//! A VM's checksum offload state, checked before IP rewrite. A guest (through virtio-net, or a
//! packet socket's virtio header on a veth) hands the host a packet with CHECKSUM_PARTIAL and
//! a `csum_start`/`csum_offset` of its choosing; the checksum is completed later, after nv,
//! in software on an uplink without tx checksumming or by a NIC that takes the offsets as
//! given. Under NVGRE the offsets still point into the VM's own headers. Under IP rewrite the
//! IPv4 header is nv's (provider addresses, checksum), so a packet whose checksum would be
//! summed from, or written into, anything before its L4 header is refused: offsets into the
//! IPv4 header would write 16 bits of the tenant's choosing over the provider addresses.
//! From the L4 header on, the bytes are the VM's: its TCP or UDP checksum, or an inner one of
//! a tunnel it runs itself (VXLAN with checksum offload).
//!
//! `__sk_buff` shows none of this state, and aya 0.14 has neither kfuncs nor CO-RE: the
//! fields are read with `bpf_probe_read_kernel` at offsets the agent takes from the kernel's
//! BTF and passes as load-time globals. Without them (a kernel without BTF) every such packet
//! is refused: rewrite fails closed.
use core::ptr;

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TcContext};
use nv_common::Counter;

/// Offsets in `struct sk_buff` (bytes), filled in by the agent from BTF; 0: unknown.
/// `head`, with `data` right after it.
#[unsafe(no_mangle)]
static NV_SKB_HEAD: u32 = 0;
/// `csum_start`.
#[unsafe(no_mangle)]
static NV_SKB_CSUM: u32 = 0;
/// The byte that holds the 2-bit `ip_summed`, and the bit it starts at.
#[unsafe(no_mangle)]
static NV_SKB_IP_SUMMED: u32 = 0;
#[unsafe(no_mangle)]
static NV_SKB_IP_SUMMED_SHIFT: u32 = 0;

/// `ip_summed` of a packet whose checksum the stack or a device must still complete.
const CHECKSUM_PARTIAL: u8 = 3;

/// A global the loader filled in.
#[inline(always)]
fn global(g: &u32) -> usize {
    // SAFETY: a volatile read of a global the loader fills in; the verifier knows its value.
    unsafe { ptr::read_volatile(g) as usize }
}

/// `T` at `offset` bytes into the skb.
#[inline(always)]
fn field<T>(ctx: &TcContext, offset: usize) -> Result<T, Counter> {
    let skb = ctx.skb.skb.cast::<u8>();
    // SAFETY: the helper reads kernel memory safely (a fault is an error, not a crash); the
    // address is the skb the program runs on, at an offset from its BTF.
    unsafe { bpf_probe_read_kernel(skb.wrapping_add(offset).cast::<T>()) }
        .map_err(|_| Counter::DropVmCsumOffload)
}

/// `Ok` when the packet's checksum offload state is its own business: no checksum left to
/// complete, or one summed from (and so written into) its own L4 header or beyond (`l4_at`:
/// that header's offset from the Ethernet header).
#[inline(always)]
pub fn check(ctx: &TcContext, l4_at: usize) -> Result<(), Counter> {
    let (head_at, csum_at) = (global(&NV_SKB_HEAD), global(&NV_SKB_CSUM));
    if head_at == 0 || csum_at == 0 {
        return Err(Counter::DropVmCsumOffload);
    }
    let summed: u8 = field(ctx, global(&NV_SKB_IP_SUMMED))?;
    #[expect(clippy::cast_possible_truncation, reason = "a bit index below 8")]
    let shift = global(&NV_SKB_IP_SUMMED_SHIFT) as u8 & 7;
    if (summed >> shift) & 3 != CHECKSUM_PARTIAL {
        return Ok(());
    }
    let [head, data]: [u64; 2] = field(ctx, head_at)?;
    let start: u16 = field(ctx, csum_at)?;
    // At TC ingress the skb's data is its Ethernet header; `csum_start` counts from its head,
    // and the checksum is written `csum_offset` bytes further on.
    let l4 = data.wrapping_sub(head) + (l4_at as u64);
    if u64::from(start) < l4 {
        return Err(Counter::DropVmCsumOffload);
    }
    Ok(())
}
