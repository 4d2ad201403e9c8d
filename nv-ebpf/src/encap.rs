//! NVGRE encapsulation (RFC 7637) and the hand-off to the underlay.
//!
//! The frame grows by 42 bytes right after its Ethernet header; the original Ethernet header is
//! copied to become the inner one, and the outer Ethernet, IPv4 and GRE headers are written in
//! front of it in one store. The encapsulation flags tell the kernel where the inner headers
//! are, so GSO super-packets are segmented correctly (each segment keeps its own outer header).
use core::{ffi::c_void, mem::size_of, ptr};

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LOOKUP_OUTPUT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    bpf_f_adj_room_encap_l2,
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use nv_common::{
    Counter, LookupValue, PortInfo, mapped_v4,
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_P_TEB, GRE_FLAGS_NVGRE, IPPROTO_GRE, IPV4_DF, NVGRE_V4_OVERHEAD,
        OUTER_TTL, nvgre_key,
    },
};

use crate::{maps::CONFIG, packet::ipv4_header_checksum};

const AF_INET: u8 = 2;
/// Outer Ethernet, outer IPv4, GRE, inner Ethernet.
const HDRS_LEN: usize = NVGRE_V4_OVERHEAD + ETH_HLEN;

pub fn nvgre(
    ctx: &TcContext,
    src: &PortInfo,
    dst: &LookupValue,
    vsid: u32,
    inner_tos: u8,
    flow_id: u8,
) -> Result<i32, Counter> {
    let (Some(outer_src), Some(outer_dst)) = (mapped_v4(&src.pa), mapped_v4(&dst.pa)) else {
        // IPv6 underlay has its own issue; the agent refuses such records today.
        return Err(Counter::DropVmMethod);
    };
    let uplink = CONFIG.get(0).map_or(0, |c| c.uplink_ifindex);
    if uplink == 0 {
        return Err(Counter::DropVmNoUnderlayRoute);
    }

    let mut hdrs = [0u8; HDRS_LEN];
    ctx.load_bytes(0, &mut hdrs[NVGRE_V4_OVERHEAD..])
        .map_err(|_| Counter::DropVmMalformed)?;
    let inner_len = ctx.len() as usize - ETH_HLEN;
    let outer_len = inner_len + NVGRE_V4_OVERHEAD;
    if outer_len > usize::from(u16::MAX) {
        return Err(Counter::DropVmTooBig);
    }

    #[expect(clippy::cast_possible_wrap, reason = "42 fits")]
    let grow = NVGRE_V4_OVERHEAD as i32;
    let flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_GRE)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        | bpf_f_adj_room_encap_l2(ETH_HLEN as u64);
    ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Counter::DropVmEncapFailed)?;

    // Outer Ethernet: addresses come from the FIB below.
    hdrs[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    // Outer IPv4: DSCP copied from the inner packet, ECN not, DF set, TTL 64.
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = inner_tos & 0xfc;
    #[expect(clippy::cast_possible_truncation, reason = "checked against u16::MAX above")]
    let tot_len = (outer_len - ETH_HLEN) as u16;
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

    // SAFETY: zeroed bindgen struct of plain integers.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_GRE;
    fib.ifindex = uplink;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(outer_src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(outer_dst);
    // tot_len 0: the kernel checks the grown skb itself against the egress MTU, GSO-aware.
    // SAFETY: helper with a stack struct of the size we pass.
    #[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "64 bytes")]
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast::<c_void>(),
            &raw mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    #[expect(clippy::cast_sign_loss, reason = "return codes are small and non-negative")]
    let rc = rc as u32;
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        hdrs[0..6].copy_from_slice(&fib.dmac);
        hdrs[6..12].copy_from_slice(&fib.smac);
    } else if rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Err(if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
            Counter::DropVmTooBig
        } else {
            Counter::DropVmNoUnderlayRoute
        });
    }
    ctx.store(0, &hdrs, 0).map_err(|_| Counter::DropVmEncapFailed)?;

    // SAFETY: plain helper calls.
    let action = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        unsafe { bpf_redirect(fib.ifindex, 0) }
    } else {
        // The neighbour is not resolved yet: let the kernel resolve it and queue the packet.
        unsafe { bpf_redirect_neigh(fib.ifindex, ptr::null_mut(), 0, 0) }
    };
    Ok(action as i32)
}
