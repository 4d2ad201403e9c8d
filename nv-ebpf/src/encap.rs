//! NVGRE encapsulation (RFC 7637) and the hand-off to the underlay.
//!
//! The frame grows by 42 bytes right after its Ethernet header; the original Ethernet header is
//! copied to become the inner one, and the outer Ethernet, IPv4 and GRE headers are written in
//! front of it in one store. The encapsulation flags tell the kernel where the inner headers
//! are, so GSO super-packets are segmented correctly (each segment keeps its own outer header).
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    bpf_f_adj_room_encap_l2,
    programs::TcContext,
};
use nv_common::{
    Counter, LookupValue, PortInfo,
    flow::flow_id_v4,
    mapped_v4,
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_P_TEB, GRE_FLAGS_NVGRE, IPPROTO_GRE, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_DF, NVGRE_V4_OVERHEAD, OUTER_TTL, nvgre_key,
    },
};

use crate::{
    packet::{Ipv4Hdr, ipv4_header_checksum, read_at},
    underlay,
};

/// The FlowID of the inner packet: its addresses, protocol and, for unfragmented TCP/UDP, the
/// ports.
#[inline(always)]
fn flow_id(ctx: &TcContext, ip: &Ipv4Hdr) -> u8 {
    let ports = if (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP) && !ip.is_fragment() {
        read_at::<[u8; 4]>(ctx.data(), ctx.data_end(), ETH_HLEN + ip.hlen())
            .map_or(0, u32::from_be_bytes)
    } else {
        0
    };
    flow_id_v4(ip.src, ip.dst, ip.proto, ports)
}

/// Outer Ethernet, outer IPv4, GRE, inner Ethernet.
const HDRS_LEN: usize = NVGRE_V4_OVERHEAD + ETH_HLEN;

// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn nvgre(
    ctx: &TcContext,
    src: &PortInfo,
    dst: &LookupValue,
    ip: &Ipv4Hdr,
) -> Result<i32, Counter> {
    let vsid = src.vsid;
    let inner_tos = ip.tos;
    let flow_id = flow_id(ctx, ip);
    let (Some(outer_src), Some(outer_dst)) = (mapped_v4(&src.pa), mapped_v4(&dst.pa)) else {
        // IPv6 underlay has its own issue; the agent refuses such records today.
        return Err(Counter::DropVmMethod);
    };
    let uplink = underlay::uplink()?;

    let mut hdrs = [0u8; HDRS_LEN];
    let inner_eth: [u8; ETH_HLEN] = ctx.load(0).map_err(|_| Counter::DropVmMalformed)?;
    hdrs[NVGRE_V4_OVERHEAD..].copy_from_slice(&inner_eth);
    // Outer IPv4 carries itself, GRE and the whole inner frame (its Ethernet header included).
    let outer_ip_len = ctx.len() as usize + NVGRE_V4_OVERHEAD - ETH_HLEN;
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_segs } > 1;
    // A GSO super-packet's IPv4 length is rewritten per segment; anything else must fit.
    if outer_ip_len > usize::from(u16::MAX) && !gso {
        return Err(Counter::DropVmTooBig);
    }

    #[expect(clippy::cast_possible_wrap, reason = "42 fits")]
    let grow = NVGRE_V4_OVERHEAD as i32;
    let flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_GRE)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        | bpf_f_adj_room_encap_l2(ETH_HLEN as u64);
    ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Counter::DropVmTranslateFailed)?;

    // Outer Ethernet: addresses come from the FIB (underlay::transmit).
    hdrs[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    // Outer IPv4: DSCP copied from the inner packet, ECN not, DF set, TTL 64.
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = inner_tos & 0xfc;
    #[expect(clippy::cast_possible_truncation, reason = "clamped to u16::MAX")]
    let tot_len = if outer_ip_len > usize::from(u16::MAX) {
        u16::MAX
    } else {
        outer_ip_len as u16
    };
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_GRE;
    ip[12..16].copy_from_slice(&outer_src);
    ip[16..20].copy_from_slice(&outer_dst);
    let csum = ipv4_header_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    hdrs[ETH_HLEN..ETH_HLEN + 20].copy_from_slice(&ip);
    // GRE: K=1 only, Transparent Ethernet Bridging, key = VSID << 8 | FlowID.
    let gre = ETH_HLEN + 20;
    hdrs[gre..gre + 2].copy_from_slice(&GRE_FLAGS_NVGRE.to_be_bytes());
    hdrs[gre + 2..gre + 4].copy_from_slice(&ETH_P_TEB.to_be_bytes());
    hdrs[gre + 4..gre + 8].copy_from_slice(&nvgre_key(vsid, flow_id).to_be_bytes());

    ctx.store(0, &hdrs, 0)
        .map_err(|_| Counter::DropVmTranslateFailed)?;
    underlay::transmit(ctx, uplink, outer_src, outer_dst, IPPROTO_GRE)
}
