//! NVGRE encapsulation (RFC 7637) and the hand-off to the underlay.
//!
//! The frame grows by 42 bytes right after its Ethernet header; the original Ethernet header is
//! copied to become the inner one, and the outer Ethernet, IPv4 and GRE headers are written in
//! front of it in one store. The encapsulation flags tell the kernel where the inner headers
//! are, so GSO super-packets are segmented correctly (each segment keeps its own outer header).
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_GRE,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    bpf_f_adj_room_encap_l2,
    programs::TcContext,
};
use nv_common::{
    Counter, LookupValue, PortInfo,
    flow::{flow_id_v4, flow_id_v6},
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_P_TEB, GRE_FLAGS_NVGRE, IPPROTO_GRE, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_DF, NVGRE_V4_OVERHEAD, OUTER_TTL, nvgre_key,
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

// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn nvgre(
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
        // IPv6 underlay has its own issue; the agent refuses such records today.
        return Err(Counter::DropVmMethod);
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

    #[expect(clippy::cast_possible_wrap, reason = "42 fits")]
    let grow = NVGRE_V4_OVERHEAD as i32;
    let mut flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
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
        if gso {
            return Err(Counter::DropVmNestedGso);
        }
        // Without the encapsulation flags the skb would still say IPv6 under the outer IPv4,
        // and the kernel's next hop would be looked up as IPv6 on the GRE header's bytes.
        if v6 {
            return Err(Counter::DropVmTranslateFailed);
        }
        ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| Counter::DropVmTranslateFailed)?;
    }
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
