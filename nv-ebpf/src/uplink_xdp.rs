//! XDP on the uplink. NVGRE for a local provider address is validated, and a frame for a VM on
//! this host is stripped of its outer headers and passed up with metadata naming the VM port;
//! `uplink_tc` delivers it. Everything that is not NVGRE for us passes untouched, so the host's
//! own traffic keeps working. Drops are counted, never `XDP_ABORTED`.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use nv_common::{
    Counter, DeliverMeta, LookupKey, RestoreMeta, RewritePa, mapped_v4, v4_mapped,
    wire::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_TEB, GRE_FLAGS_NVGRE, GRE_HLEN,
        IPPROTO_GRE,
    },
};

use crate::{
    counters::count,
    maps::{LOCAL_PAS, LOOKUPS, REWRITE_PAS},
    packet::{EthHdr, GreHdr, Ipv4Hdr, ptr_at, read_at},
};

pub fn run(ctx: &XdpContext) -> u32 {
    match try_run(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn pass() -> Result<u32, Counter> {
    count(Counter::UplinkPassed);
    Ok(XDP_PASS)
}

fn try_run(ctx: &XdpContext) -> Result<u32, Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(eth) = read_at::<EthHdr>(data, end, 0) else {
        return pass();
    };
    if eth.proto() != ETH_P_IP {
        return pass();
    }
    let Some(ip) = read_at::<Ipv4Hdr>(data, end, ETH_HLEN) else {
        return pass();
    };
    let hlen = ip.hlen();
    if ip.ver_ihl >> 4 != 4 || hlen < 20 {
        return pass();
    }
    // SAFETY: presence check only.
    if unsafe { LOCAL_PAS.get(&v4_mapped(ip.dst)) }.is_none() {
        return pass();
    }
    // A PA dedicated to a local VM carries only that VM's IP-rewrite traffic.
    // SAFETY: read-only use of a value the agent replaces whole.
    if let Some(dst) = unsafe { REWRITE_PAS.get(&v4_mapped(ip.dst)) }
        && dst.ifindex != 0
    {
        return rewrite_in(ctx, &ip, dst);
    }
    if ip.proto != IPPROTO_GRE {
        return pass();
    }
    let gre_off = ETH_HLEN + hlen;
    let gre: GreHdr = read_at(data, end, gre_off).ok_or(Counter::DropUplinkMalformed)?;
    if u16::from_be_bytes(gre.proto) != ETH_P_TEB {
        // GRE for another user of this address (not NVGRE): not ours to judge.
        return pass();
    }
    if u16::from_be_bytes(gre.flags) != GRE_FLAGS_NVGRE {
        return Err(Counter::DropUplinkGreFlags);
    }
    if ip.is_fragment() {
        return Err(Counter::DropUplinkFragment);
    }
    let key: [u8; 4] = read_at(data, end, gre_off + 4).ok_or(Counter::DropUplinkMalformed)?;
    let vsid = u32::from_be_bytes(key) >> 8;

    let inner = gre_off + GRE_HLEN;
    let inner_eth: EthHdr = read_at(data, end, inner).ok_or(Counter::DropUplinkMalformed)?;
    match inner_eth.proto() {
        ETH_P_IP => {}
        ETH_P_8021Q | ETH_P_8021AD => return Err(Counter::DropUplinkInnerVlan),
        _ => return Err(Counter::DropUplinkInnerNotIp),
    }
    let inner_ip: Ipv4Hdr =
        read_at(data, end, inner + ETH_HLEN).ok_or(Counter::DropUplinkMalformed)?;
    let lookup = LookupKey {
        vsid,
        ca: v4_mapped(inner_ip.dst),
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    let dst = unsafe { LOOKUPS.get(&lookup) }.ok_or(Counter::DropUplinkUnknownDst)?;
    if dst.ifindex == 0 {
        return Err(Counter::DropUplinkNotLocal);
    }
    let port = dst.ifindex;

    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "< 100"
    )]
    let strip = inner as i32;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "8 bytes"
    )]
    let meta_len = core::mem::size_of::<DeliverMeta>() as i32;
    // SAFETY: helpers on the program's own context; pointers are re-derived after each.
    unsafe {
        if bpf_xdp_adjust_head(ctx.ctx, strip) != 0 || bpf_xdp_adjust_meta(ctx.ctx, -meta_len) != 0
        {
            return Err(Counter::DropUplinkDecapFailed);
        }
    }
    let meta = ptr_at::<DeliverMeta>(ctx.metadata(), ctx.data(), 0)
        .ok_or(Counter::DropUplinkDecapFailed)?;
    // SAFETY: bounds-checked against the start of the frame just above.
    unsafe {
        meta.write_unaligned(DeliverMeta {
            magic: DeliverMeta::MAGIC,
            ifindex: port,
        });
    }
    count(Counter::UplinkDecap);
    Ok(XDP_PASS)
}

/// An IP-rewrite packet for a local VM: the source PA must be the dedicated PA of a CA in the
/// same VSID. The uplink TC program restores the addresses with checksum helpers XDP lacks.
fn rewrite_in(ctx: &XdpContext, ip: &Ipv4Hdr, dst: &RewritePa) -> Result<u32, Counter> {
    // SAFETY: read-only use of a value the agent replaces whole.
    let src = unsafe { REWRITE_PAS.get(&v4_mapped(ip.src)) }
        .ok_or(Counter::DropUplinkRewriteUnknownSrc)?;
    if src.vsid != dst.vsid {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    }
    let (Some(src_ca), Some(dst_ca)) = (mapped_v4(&src.ca), mapped_v4(&dst.ca)) else {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    };
    let meta = RestoreMeta {
        magic: RestoreMeta::MAGIC,
        ifindex: dst.ifindex,
        src_ca,
        dst_ca,
        src_mac: src.mac,
        dst_mac: dst.mac,
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "28 bytes"
    )]
    let meta_len = core::mem::size_of::<RestoreMeta>() as i32;
    // SAFETY: helper on the program's own context; pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -meta_len) } != 0 {
        return Err(Counter::DropUplinkDecapFailed);
    }
    let at = ptr_at::<RestoreMeta>(ctx.metadata(), ctx.data(), 0)
        .ok_or(Counter::DropUplinkDecapFailed)?;
    // SAFETY: bounds-checked against the start of the frame just above.
    unsafe { at.write_unaligned(meta) };
    Ok(XDP_PASS)
}
