//! NVGRE encapsulation (RFC 7637) and the hand-off to the underlay.
//!
//! The frame grows by 42 bytes right after its Ethernet header; the original Ethernet header is
//! copied to become the inner one, and the outer Ethernet, IPv4 and GRE headers are written in
//! front of it in one store. The encapsulation flags tell the kernel where the inner headers
//! are, so GSO super-packets are segmented correctly (each segment keeps its own outer header).
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
        BPF_F_ADJ_ROOM_ENCAP_L4_GRE, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    bpf_f_adj_room_encap_l2,
    helpers::bpf_get_hash_recalc,
    programs::TcContext,
};
use nv_common::{
    Counter, LookupValue, PortInfo,
    flow::{flow_id_v4, flow_id_v6},
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ETH_P_TEB, GRE_FLAGS_NVGRE, GRE_HLEN, IPPROTO_GRE,
        IPPROTO_TCP, IPPROTO_UDP, IPV4_DF, NVGRE_V4_OVERHEAD, NVGRE_V6_OVERHEAD, OUTER_TTL,
        nvgre_key,
    },
};

use crate::{
    packet::{EthHdr, Ipv4Hdr, Ipv6Hdr, ptr_at, read_at, v4_of},
    underlay::{self, Hop},
};

/// What encapsulation needs of the customer's IPv4 header, read by the caller: no view into
/// the packet may be alive while the packet changes. The TOS byte, the FlowID and whether the
/// packet is UDP GSO in one register (BPF calls take five, the result's out-pointer counting
/// as one).
#[derive(Clone, Copy)]
pub struct Inner(u32);

impl Inner {
    #[inline(always)]
    pub fn of(ctx: &TcContext, ip: &Ipv4Hdr) -> Self {
        // SAFETY: the context pointer is valid for the whole program run.
        let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
        let udp_gso = u8::from(gso && ip.proto == IPPROTO_UDP);
        Self(u32::from_be_bytes([ip.tos, flow_id(ctx, ip), udp_gso, 0]))
    }

    /// The same of an IPv6 packet whose upper-layer protocol `proto` starts at `l4`.
    // Out of line, returning a scalar: its own stack frame.
    #[inline(never)]
    pub fn of6(ctx: &TcContext, ip: &Ipv6Hdr, proto: u8, l4: usize) -> Self {
        // SAFETY: the context pointer is valid for the whole program run.
        let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
        let udp_gso = u8::from(gso && proto == IPPROTO_UDP);
        let ports = if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            // The load helper: `l4` depends on the packet's extension headers.
            ctx.load::<[u8; 4]>(l4).map_or(0, u32::from_be_bytes)
        } else {
            0
        };
        let flow = flow_id_v6(&ip.src, &ip.dst, proto, ports);
        Self(u32::from_be_bytes([ip.traffic_class(), flow, udp_gso, 1]))
    }

    #[inline(always)]
    fn tos(self) -> u8 {
        self.0.to_be_bytes()[0]
    }

    #[inline(always)]
    fn flow_id(self) -> u8 {
        self.0.to_be_bytes()[1]
    }

    /// An IPv6 packet ([`Inner::of6`]).
    #[inline(always)]
    fn v6(self) -> bool {
        self.0.to_be_bytes()[3] != 0
    }

    /// UDP segmentation offload (QUIC's `UDP_SEGMENT`): `gso_size` delimits the datagrams.
    #[inline(always)]
    fn udp_gso(self) -> bool {
        self.0.to_be_bytes()[2] != 0
    }
}

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

/// What NVGRE adds in front of a packet from the VM behind `port`: its PA's family decides.
#[inline(always)]
pub fn overhead(port: &PortInfo) -> u32 {
    if v4_of(&port.pa).is_some() {
        NVGRE_V4_OVERHEAD as u32
    } else {
        NVGRE_V6_OVERHEAD as u32
    }
}

/// NVGRE from the VM behind `src` to the host of `dst`, over the underlay of their PAs.
#[inline(always)]
pub fn nvgre(
    ctx: &TcContext,
    src: &PortInfo,
    dst: &LookupValue,
    inner: Inner,
) -> Result<i32, Counter> {
    // Each family's path in a frame of its own, called from here: one frame deep, not two.
    // The sender's PA picks it; each refuses a destination of the other family.
    if v4_of(&src.pa).is_some() {
        over_ipv4(ctx, src, dst, inner)
    } else {
        over_ipv6(ctx, src, dst, inner)
    }
}

// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
fn over_ipv4(
    ctx: &TcContext,
    src: &PortInfo,
    dst: &LookupValue,
    inner: Inner,
) -> Result<i32, Counter> {
    let (vsid, inner_tos, flow_id, udp_gso, v6) = (
        src.vsid,
        inner.tos(),
        inner.flow_id(),
        inner.udp_gso(),
        inner.v6(),
    );
    let (Some(outer_src), Some(outer_dst)) = (v4_of(&src.pa), v4_of(&dst.pa)) else {
        return Err(Counter::DropVmUnderlayFamily);
    };
    let (outer_src, outer_dst) = (u32::from_ne_bytes(outer_src), u32::from_ne_bytes(outer_dst));
    // Read again rather than passed: BPF calls take five arguments, the result's pointer one.
    let config = underlay::config()?;
    let (uplink, outer_tos) = (config.uplink_ifindex, config.underlay_tos(inner_tos));

    // Outer IPv4 carries itself, GRE and the whole inner frame (its Ethernet header included).
    let outer_ip_len = ctx.len() as usize + NVGRE_V4_OVERHEAD - ETH_HLEN;
    // A super-packet says so by its segment size: a guest's (from a tap, or a packet socket's
    // virtio header) has no segment count yet, the kernel computes it later.
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    // A GSO super-packet's IPv4 length is rewritten per segment; anything else must fit.
    if outer_ip_len > usize::from(u16::MAX) && !gso {
        return Err(Counter::DropVmTooBig);
    }
    grow(ctx, NVGRE_V4_OVERHEAD, false, udp_gso, v6)?;
    let hop = underlay::next_hop(ctx, uplink, outer_src, outer_dst, IPPROTO_GRE)?;

    // The headers are written in place (the room just made is linear), field by field: no
    // copy of them on the BPF stack, which is small (bytes held across a helper call are
    // spilled one 8-byte slot each).
    let h =
        ptr_at::<Headers>(ctx.data(), ctx.data_end(), 0).ok_or(Counter::DropVmTranslateFailed)?;
    // SAFETY: bounds-checked above; every field is a byte array (alignment 1).
    let h = unsafe { &mut *h };
    // The room went in after the customer's Ethernet header, which becomes the inner one.
    h.inner_eth = h.outer_eth;
    // Outer Ethernet: addresses from the next hop (the kernel writes them for Hop::Kernel).
    if let Hop::Direct { dmac, smac, .. } = &hop {
        h.outer_eth.dst = *dmac;
        h.outer_eth.src = *smac;
    }
    h.outer_eth.proto = ETH_P_IP.to_be_bytes();
    // Outer IPv4: DSCP by host policy, ECN not copied, DF set, TTL 64.
    #[expect(clippy::cast_possible_truncation, reason = "clamped to u16::MAX")]
    let tot_len = if outer_ip_len > usize::from(u16::MAX) {
        u16::MAX
    } else {
        outer_ip_len as u16
    };
    h.outer_ip = Ipv4Hdr {
        ver_ihl: 0x45,
        tos: outer_tos,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        frag: IPV4_DF.to_be_bytes(),
        ttl: OUTER_TTL,
        proto: IPPROTO_GRE,
        csum: [0; 2],
        src: outer_src.to_ne_bytes(),
        dst: outer_dst.to_ne_bytes(),
    };
    h.outer_ip.csum = h.outer_ip.checksum().to_be_bytes();
    // GRE: K=1 only, Transparent Ethernet Bridging, key = VSID << 8 | FlowID.
    h.gre = GreKeyHdr {
        flags: GRE_FLAGS_NVGRE.to_be_bytes(),
        proto: ETH_P_TEB.to_be_bytes(),
        key: nvgre_key(vsid, flow_id).to_be_bytes(),
    };
    Ok(underlay::send(uplink, &hop))
}

/// Opens `overhead` bytes after the Ethernet header for the outer headers of an underlay of
/// the family `outer_v6` says, telling the kernel where the inner headers are (GSO segments
/// each get their own outer header). `inner_v6`: the customer's packet is IPv6.
#[inline(always)]
fn grow(
    ctx: &TcContext,
    overhead: usize,
    outer_v6: bool,
    udp_gso: bool,
    inner_v6: bool,
) -> Result<(), Counter> {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "< 100"
    )]
    let grow = overhead as i32;
    let l3 = if outer_v6 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    };
    let mut flags = u64::from(l3)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_GRE)
        | u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH)
        | bpf_f_adj_room_encap_l2(ETH_HLEN as u64);
    // A UDP GSO packet's gso_size is its datagrams' size, not a segment budget the kernel may
    // shrink: it keeps it (and refuses to grow the packet otherwise). The outer headers come
    // on top of each datagram, which `pmtu::fits` checked against the uplink.
    if udp_gso {
        flags |= u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    }
    if ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, flags).is_err() {
        // The kernel marks an skb it already carries a tunnel in (the VM runs VXLAN, GRE or
        // IPIP of its own, with checksum offload) and refuses a second tunnel's offload
        // bookkeeping for it. A packet that is not a GSO super-packet needs none: its inner
        // checksum offset stays where it was (the room opens after the Ethernet header), and
        // the outer headers are written whole below. A super-packet would be segmented by
        // the VM's tunnel's offsets, under our headers: garbage on the wire.
        // SAFETY: the context pointer is valid for the whole program run.
        if unsafe { (*ctx.skb.skb).gso_size } != 0 {
            return Err(Counter::DropVmNestedGso);
        }
        // Without the encapsulation flags the skb would still name the inner family under an
        // outer header of the other, and the kernel's next hop would be looked up in the
        // wrong family on the outer header's bytes.
        if inner_v6 != outer_v6 {
            return Err(Counter::DropVmTranslateFailed);
        }
        ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| Counter::DropVmTranslateFailed)?;
    }
    Ok(())
}

/// NVGRE over an IPv6 underlay (RFC 7637 over IPv6): both provider addresses IPv6, the flow
/// label from the inner flow's hash so the underlay's ECMP spreads flows as it does the
/// hosts' own.
// Out of line: the IPv4 path keeps its frame, and this one gets its own.
#[inline(never)]
fn over_ipv6(
    ctx: &TcContext,
    src: &PortInfo,
    dst: &LookupValue,
    inner: Inner,
) -> Result<i32, Counter> {
    if v4_of(&dst.pa).is_some() {
        return Err(Counter::DropVmUnderlayFamily);
    }
    let (vsid, outer_src, outer_dst) = (src.vsid, src.pa, dst.pa);
    let config = underlay::config()?;
    let (uplink, tclass) = (config.uplink_ifindex, config.underlay_tos(inner.tos()));
    // The kernel's hash of the customer's flow, before the packet changes.
    // SAFETY: helper on the program's own skb.
    let label = unsafe { bpf_get_hash_recalc(ctx.skb.skb) } & 0x000f_ffff;
    // The payload: GRE and the whole inner frame (its Ethernet header included).
    let payload_len = ctx.len() as usize + GRE_HLEN;
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    // A GSO super-packet's payload length is rewritten per segment; anything else must fit.
    if payload_len > usize::from(u16::MAX) && !gso {
        return Err(Counter::DropVmTooBig);
    }
    grow(ctx, NVGRE_V6_OVERHEAD, true, inner.udp_gso(), inner.v6())?;
    let hop = underlay::next_hop6(ctx, uplink, &outer_src, &outer_dst)?;
    let h =
        ptr_at::<Headers6>(ctx.data(), ctx.data_end(), 0).ok_or(Counter::DropVmTranslateFailed)?;
    // SAFETY: bounds-checked above; every field is a byte array (alignment 1).
    let h = unsafe { &mut *h };
    h.inner_eth = h.outer_eth;
    if let Hop::Direct { dmac, smac, .. } = &hop {
        h.outer_eth.dst = *dmac;
        h.outer_eth.src = *smac;
    }
    h.outer_eth.proto = ETH_P_IPV6.to_be_bytes();
    #[expect(clippy::cast_possible_truncation, reason = "clamped to u16::MAX")]
    let payload_len = if payload_len > usize::from(u16::MAX) {
        u16::MAX
    } else {
        payload_len as u16
    };
    let label = label.to_be_bytes();
    h.outer_ip = Ipv6Hdr {
        ver_tc_flow: [
            0x60 | (tclass >> 4),
            (tclass << 4) | (label[1] & 0x0f),
            label[2],
            label[3],
        ],
        payload_len: payload_len.to_be_bytes(),
        next: IPPROTO_GRE,
        hop_limit: OUTER_TTL,
        src: outer_src,
        dst: outer_dst,
    };
    h.gre = GreKeyHdr {
        flags: GRE_FLAGS_NVGRE.to_be_bytes(),
        proto: ETH_P_TEB.to_be_bytes(),
        key: nvgre_key(vsid, inner.flow_id()).to_be_bytes(),
    };
    Ok(underlay::send(uplink, &hop))
}

/// What encapsulation over IPv6 puts in front of the customer's IP packet.
#[repr(C)]
struct Headers6 {
    outer_eth: EthHdr,
    outer_ip: Ipv6Hdr,
    gre: GreKeyHdr,
    inner_eth: EthHdr,
}

const _: () = assert!(core::mem::size_of::<Headers6>() == NVGRE_V6_OVERHEAD + ETH_HLEN);

/// What encapsulation puts in front of the customer's IP packet.
#[repr(C)]
struct Headers {
    outer_eth: EthHdr,
    outer_ip: Ipv4Hdr,
    gre: GreKeyHdr,
    inner_eth: EthHdr,
}

const _: () = assert!(core::mem::size_of::<Headers>() == NVGRE_V4_OVERHEAD + ETH_HLEN);

#[repr(C)]
struct GreKeyHdr {
    flags: [u8; 2],
    proto: [u8; 2],
    key: [u8; 4],
}
