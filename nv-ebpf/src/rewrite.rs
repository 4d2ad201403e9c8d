//! IP rewrite, HNV's second translation method: customer addresses are replaced by provider
//! addresses (one PA dedicated to each CA) and back, with no header added, so the frame keeps
//! its size and GSO/TSO keep working. Checksums are fixed incrementally with the kernel's
//! helpers, which respect the skb's checksum state (a partial TCP checksum of a TSO packet
//! stays consistent); a zero UDP checksum stays zero.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nv_common::{
    Counter, LookupValue, PortInfo,
    wire::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    packet::{Ipv4Hdr, csum_fold, v4_of, write_at},
    underlay,
};

/// Offsets of the checksum in the TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// The addresses, checksum included, as they follow the TTL and protocol in the IPv4 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Addresses {
    csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

/// What address replacement needs of the IPv4 header, copied out before the packet changes:
/// a view into the packet must not be alive while the packet is written.
#[derive(Clone, Copy)]
pub struct Ipv4Fields {
    src: [u8; 4],
    dst: [u8; 4],
    csum: [u8; 2],
    frag: [u8; 2],
    hlen: u8,
    proto: u8,
    ver_ihl: u8,
    tos: u8,
}

impl Ipv4Fields {
    #[inline(always)]
    pub fn of(ip: &Ipv4Hdr) -> Self {
        #[expect(clippy::cast_possible_truncation, reason = "at most 60")]
        let hlen = ip.hlen() as u8;
        Self {
            src: ip.src,
            dst: ip.dst,
            csum: ip.csum,
            frag: ip.frag,
            hlen,
            proto: ip.proto,
            ver_ihl: ip.ver_ihl,
            tos: ip.tos,
        }
    }
}

/// Replaces the IPv4 source and destination and fixes the IPv4 and, for the first (or only)
/// fragment, the TCP/UDP pseudo-header checksums. ICMP has no pseudo-header. One
/// ones-complement difference serves both checksums: the IPv4 header is written directly (its
/// sum stays 0xffff, so a CHECKSUM_COMPLETE skb's sum needs no change); the L4 checksum goes
/// through the helper, which knows the skb's checksum state (a TSO packet's partial checksum
/// changes differently from a complete one).
pub fn replace_addresses(
    ctx: &TcContext,
    ip: &Ipv4Fields,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<(), ()> {
    let word = |a: [u8; 4]| u64::from(u32::from_ne_bytes(a));
    let diff = fold32(
        (!word(ip.src) & 0xffff_ffff) + word(src) + (!word(ip.dst) & 0xffff_ffff) + word(dst),
    );
    // As the kernel's csum_fold(csum_add(diff, ~csum_unfold(sum))).
    let old = u64::from(!u32::from(u16::from_ne_bytes(ip.csum)));
    let csum = csum_fold(fold32(u64::from(diff) + old));
    let at = ETH_HLEN + 10;
    if !write_at(
        ctx.data(),
        ctx.data_end(),
        at,
        Addresses {
            csum: csum.to_ne_bytes(),
            src,
            dst,
        },
    ) {
        return Err(());
    }

    let l4 = ETH_HLEN + usize::from(ip.hlen);
    let first_fragment = u16::from_be_bytes(ip.frag) & 0x1fff == 0;
    let l4_csum = match ip.proto {
        IPPROTO_TCP if first_fragment => Some((l4 + TCP_CSUM, 0)),
        IPPROTO_UDP if first_fragment => Some((l4 + UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    };
    if let Some((off, flags)) = l4_csum {
        // Field size 0: `to` is a checksum difference.
        ctx.l4_csum_replace(off, 0, u64::from(diff), u64::from(BPF_F_PSEUDO_HDR) | flags)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// A 64-bit ones-complement sum folded to 32 bits.
#[inline(always)]
fn fold32(sum: u64) -> u32 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 32 bits")]
    let folded = sum as u32;
    folded
}

/// From a VM to a destination whose record says rewrite: source CA becomes the VM's own
/// (dedicated) PA, destination CA the destination's PA, then out to the underlay.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn send(
    ctx: &TcContext,
    port: &PortInfo,
    dst: &LookupValue,
    ip: &Ipv4Fields,
) -> Result<i32, Counter> {
    if port.method != nv_common::Method::Rewrite as u8 {
        return Err(Counter::DropVmNoRewritePa);
    }
    // The checksum the kernel or NIC completes after us must be inside the VM's own L4 data.
    crate::csum_offload::check(ctx, ETH_HLEN + usize::from(ip.hlen))?;
    let (Some(src_pa), Some(dst_pa)) = (v4_of(&port.pa), v4_of(&dst.pa)) else {
        return Err(Counter::DropVmMethod);
    };
    // Read again rather than passed: BPF calls take five arguments, the result's pointer one.
    let config = underlay::config()?;
    // ECN stays the tenant's: the transport's end-to-end marks ride in this very header.
    let (uplink, tos) = (
        config.uplink_ifindex,
        config.underlay_tos(ip.tos) | (ip.tos & 0x03),
    );
    replace_addresses(ctx, ip, src_pa, dst_pa).map_err(|()| Counter::DropVmTranslateFailed)?;
    // The tenant's own header crosses the underlay: its DSCP follows host policy too (the
    // receiver gets it as sent on the underlay).
    if tos != ip.tos {
        let word = |tos: u8| u64::from(u16::from_ne_bytes([ip.ver_ihl, tos]));
        ctx.l3_csum_replace(ETH_HLEN + 10, word(ip.tos), word(tos), 2)
            .map_err(|_| Counter::DropVmTranslateFailed)?;
        if !write_at(ctx.data(), ctx.data_end(), ETH_HLEN + 1, tos) {
            return Err(Counter::DropVmTranslateFailed);
        }
    }
    underlay::transmit(
        ctx,
        uplink,
        u32::from_ne_bytes(src_pa),
        u32::from_ne_bytes(dst_pa),
        ip.proto,
    )
}
