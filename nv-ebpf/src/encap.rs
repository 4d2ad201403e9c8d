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
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_fib_lookup,
    },
    bpf_f_adj_room_encap_l2,
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
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
        .map_err(|_| Counter::DropVmEncapFailed)?;

    // Outer Ethernet: addresses come from the FIB below.
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

    // The grown frame (and, for GSO, each of its segments) must fit the uplink's MTU.
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

    // SAFETY: zeroed bindgen struct of plain integers.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_GRE;
    fib.ifindex = uplink;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(outer_src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(outer_dst);
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
        hdrs[0..6].copy_from_slice(&fib.dmac);
        hdrs[6..12].copy_from_slice(&fib.smac);
    } else if rc != BPF_FIB_LKUP_RET_NO_NEIGH && rc != BPF_FIB_LKUP_RET_FWD_DISABLED {
        return Err(Counter::DropVmNoUnderlayRoute);
    }
    ctx.store(0, &hdrs, 0)
        .map_err(|_| Counter::DropVmEncapFailed)?;

    // SAFETY: plain helper calls.
    let action = if rc == BPF_FIB_LKUP_RET_SUCCESS {
        unsafe { bpf_redirect(fib.ifindex, 0) }
    } else {
        // Neighbour not resolved yet, or the FIB helper refused because the host does not
        // forward on the uplink (it checks that even for output lookups): the kernel routes
        // the outer packet itself, resolves the neighbour and queues the packet meanwhile.
        unsafe { bpf_redirect_neigh(uplink, ptr::null_mut(), 0, 0) }
    };
    Ok(action as i32)
}
