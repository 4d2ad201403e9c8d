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
    Counter, LookupValue, PortInfo, mapped_v4,
    wire::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{packet::Ipv4Hdr, underlay};

/// Offsets in the IPv4 header.
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;
/// Offsets of the checksum in the TCP and UDP headers.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// Replaces the IPv4 source and destination and fixes the IPv4 and, for the first (or only)
/// fragment, the TCP/UDP pseudo-header checksums. ICMP has no pseudo-header.
pub fn replace_addresses(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<(), ()> {
    let l4 = ETH_HLEN + ip.hlen();
    let first_fragment = u16::from_be_bytes(ip.frag) & 0x1fff == 0;
    let l4_csum = match ip.proto {
        IPPROTO_TCP if first_fragment => Some((l4 + TCP_CSUM, 0)),
        IPPROTO_UDP if first_fragment => Some((l4 + UDP_CSUM, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    };
    for (old, new, at) in [(ip.src, src, IP_SRC), (ip.dst, dst, IP_DST)] {
        let (from, to) = (
            u64::from(u32::from_ne_bytes(old)),
            u64::from(u32::from_ne_bytes(new)),
        );
        ctx.l3_csum_replace(IP_CSUM, from, to, 4).map_err(|_| ())?;
        if let Some((off, flags)) = l4_csum {
            ctx.l4_csum_replace(off, from, to, u64::from(BPF_F_PSEUDO_HDR) | flags | 4)
                .map_err(|_| ())?;
        }
        ctx.store(at, &new, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// From a VM to a destination whose record says rewrite: source CA becomes the VM's own
/// (dedicated) PA, destination CA the destination's PA, then out to the underlay.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn send(
    ctx: &TcContext,
    port: &PortInfo,
    dst: &LookupValue,
    ip: &Ipv4Hdr,
) -> Result<i32, Counter> {
    if port.method != nv_common::Method::Rewrite as u8 {
        return Err(Counter::DropVmNoRewritePa);
    }
    let (Some(src_pa), Some(dst_pa)) = (mapped_v4(&port.pa), mapped_v4(&dst.pa)) else {
        return Err(Counter::DropVmMethod);
    };
    let uplink = underlay::uplink()?;
    replace_addresses(ctx, ip, src_pa, dst_pa).map_err(|()| Counter::DropVmTranslateFailed)?;
    underlay::transmit(ctx, uplink, src_pa, dst_pa, ip.proto)
}
