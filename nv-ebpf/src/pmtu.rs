//! Path MTU: a VM's packet that would not fit the uplink once translated is answered with ICMP
//! "fragmentation needed" naming the MTU the VM must use (RFC 1191), built here from the packet
//! itself and sent back out of the VM's port, so TCP path MTU discovery works through nv. nv
//! never fragments: packets with DF clear are answered the same way (as OVN does), and a Linux
//! sender then fragments to the MTU named. Answers come out of a per-CPU token bucket of each
//! VM port; beyond it the packet is a counted drop.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_check_mtu, bpf_csum_diff, bpf_skb_change_tail},
    programs::TcContext,
};
use nv_common::{
    Counter, DatapathConfig, IcmpBucket, PortInfo,
    wire::{
        ETH_HLEN, ETH_P_IP, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_QUOTE, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV4_MIN_MTU, OUTER_TTL,
    },
};

use crate::{
    maps::ICMP_BUCKET,
    packet::{EthHdr, Ipv4Hdr, ptr_at, read_at, v4_of},
};

/// What the answer needs of the offending packet, read before anything changes it.
#[derive(Clone, Copy)]
pub struct Offender {
    /// The MTU the VM must use on this path.
    pub mtu: u32,
    /// The address the packet was for: the answer comes from it.
    pub dst: [u8; 4],
}

/// `Ok` when the packet (its IPv4 header at `ip`) still fits the uplink with `overhead` more
/// bytes: every segment of a GSO packet, or the packet itself. Otherwise the MTU the VM must use.
#[inline(always)]
pub fn fits(
    ctx: &TcContext,
    config: &DatapathConfig,
    ip: &Ipv4Hdr,
    overhead: u32,
) -> Result<(), Offender> {
    let mtu = uplink_mtu(ctx, config);
    // SAFETY: the context pointer is valid for the whole program run.
    let (gso_segs, gso_size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    #[expect(clippy::cast_possible_truncation, reason = "at most 60")]
    let hlen = ip.hlen() as u32;
    let l3_len = if gso_segs > 1 || gso_size != 0 {
        // The largest segment: headers and one gso_size of payload.
        let l4 = match ip.proto {
            IPPROTO_TCP => read_at::<u8>(ctx.data(), ctx.data_end(), ETH_HLEN + hlen as usize + 12)
                .map_or(60, |doff| u32::from(doff >> 4) * 4),
            IPPROTO_UDP => 8,
            _ => 0,
        };
        hlen + l4 + gso_size
    } else {
        ctx.len() - ETH_HLEN as u32
    };
    if mtu == 0 || l3_len + overhead <= mtu {
        Ok(())
    } else {
        Err(Offender {
            mtu: mtu.saturating_sub(overhead),
            dst: ip.dst,
        })
    }
}

/// For an IPv6 packet whose upper-layer header (`proto`) starts at `l4`: 0 when it still fits
/// the uplink with `overhead` more bytes (every segment of a GSO packet, or the packet
/// itself); otherwise the MTU the VM must use. A scalar: it is read by the caller's caller.
#[inline(always)]
pub fn too_big6(
    ctx: &TcContext,
    config: &DatapathConfig,
    proto: u8,
    l4: usize,
    overhead: u32,
) -> u32 {
    let mtu = uplink_mtu(ctx, config);
    // SAFETY: the context pointer is valid for the whole program run.
    let (gso_segs, gso_size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    #[expect(clippy::cast_possible_truncation, reason = "within the pulled headers")]
    let headers = (l4 - ETH_HLEN) as u32;
    let l3_len = if gso_segs > 1 || gso_size != 0 {
        // The largest segment: headers and one gso_size of payload. Read as a word: the
        // offset depends on the packet.
        let l4_hlen = match proto {
            IPPROTO_TCP => ctx
                .load::<[u8; 4]>(l4 + 12)
                .map_or(60, |w| u32::from(w[0] >> 4) * 4),
            IPPROTO_UDP => 8,
            _ => 0,
        };
        headers + l4_hlen + gso_size
    } else {
        ctx.len() - ETH_HLEN as u32
    };
    let fits = mtu == 0 || l3_len + overhead <= mtu;
    if fits {
        0
    } else {
        mtu.saturating_sub(overhead).max(1)
    }
}

/// The uplink's MTU: as the agent last saw it, or (before it said) the device's own.
#[inline(always)]
fn uplink_mtu(ctx: &TcContext, config: &DatapathConfig) -> u32 {
    match config.uplink_mtu {
        0 => {
            let mut mtu = 0u32;
            // SAFETY: helper on the program's own skb with a stack out-parameter; it writes
            // the device's MTU whatever the verdict.
            let _ = unsafe {
                bpf_check_mtu(
                    ctx.skb.skb.cast::<c_void>(),
                    config.uplink_ifindex,
                    &raw mut mtu,
                    0,
                    0,
                )
            };
            mtu
        }
        mtu => mtu,
    }
}

/// Takes one answer from the budget of the VM port `ifindex` on this CPU: one VM flooding
/// oversize packets spends its own answers, never another VM's.
#[inline(always)]
fn may_answer(ifindex: u32) -> bool {
    crate::budget::take(
        &ICMP_BUCKET,
        ifindex,
        IcmpBucket::PER_SEC,
        IcmpBucket::BURST,
    )
}

/// An ICMP error the datapath sends a VM: from `src`, of `kind` and `code`, with `mtu` in
/// the header's last two bytes (zero but for "fragmentation needed"). Eight bytes: one
/// register of a BPF call.
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub src: [u8; 4],
    pub kind: u8,
    pub code: u8,
    pub mtu: [u8; 2],
}

/// ICMP "fragmentation needed" back to the VM behind `port`, from the address it wrote to
/// (Ethernet source `from_mac`, the MAC that address answers ARP with). The packet becomes
/// the answer: trimmed to the quote, 28 bytes of IPv4 and ICMP header put in front of it.
#[inline(always)]
pub fn frag_needed(
    ctx: &TcContext,
    port: &PortInfo,
    from_mac: [u8; 6],
    offender: Offender,
) -> Result<i32, Counter> {
    if offender.mtu < IPV4_MIN_MTU {
        return Err(Counter::DropVmTooBig);
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "below the uplink's u16 MTU"
    )]
    let error = IcmpError {
        src: offender.dst,
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        mtu: (offender.mtu as u16).to_be_bytes(),
    };
    answer(ctx, port, from_mac, error).ok_or(Counter::DropVmTooBig)
}

/// `error` back to the VM behind `port`, from `from_mac`; `None` when it must not be answered
/// (an error about an error, a later fragment, the port's budget spent).
#[inline(always)]
pub fn answer(
    ctx: &TcContext,
    port: &PortInfo,
    from_mac: [u8; 6],
    error: IcmpError,
) -> Option<i32> {
    build_answer(ctx, port, from_mac, error)?;
    // Out of the port the packet came in on: its egress is the VM's receive, veth or tap.
    // SAFETY: the context pointer is valid for the whole program run.
    Some(crate::redirect::egress(unsafe { (*ctx.skb.skb).ifindex }))
}

/// Turns the packet into the answer, or says it must not be answered (then the caller drops
/// it under its reason). A packet shorter than the quote is padded with zeros to it.
// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit. It
// returns a scalar: a BPF subprogram cannot hand back an aggregate through its caller's stack.
#[inline(never)]
fn build_answer(
    ctx: &TcContext,
    port: &PortInfo,
    from_mac: [u8; 6],
    error: IcmpError,
) -> Option<()> {
    let ip: Ipv4Hdr = read_at(ctx.data(), ctx.data_end(), ETH_HLEN)?;
    // Never an error about an error (RFC 1122 3.2.2), nor about a later fragment.
    let later_fragment = u16::from_be_bytes(ip.frag) & 0x1fff != 0;
    let is_error = ip.proto == IPPROTO_ICMP
        && read_at::<u8>(ctx.data(), ctx.data_end(), ETH_HLEN + ip.hlen())
            .is_none_or(|t| !matches!(t, 0 | 8 | 13 | 14));
    let vm_ca = v4_of(&port.ca)?;
    // SAFETY: the context pointer is valid for the whole program run.
    let port_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if later_fragment || is_error || !may_answer(port_ifindex) {
        return None;
    }
    // SAFETY: helper on the program's own skb: trims it to the quote, or pads it with zeros.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ICMP_QUOTE) as u32, 0) } != 0 {
        return None;
    }
    #[expect(clippy::cast_possible_wrap, reason = "28 bytes")]
    let room = (IPV4_HLEN + ICMP_HLEN) as i32;
    ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).ok()?;

    let h = ptr_at::<Answer>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds-checked above; every field is a byte array (alignment 1).
    let h = unsafe { &mut *h };
    h.eth = EthHdr {
        dst: port.mac,
        src: from_mac,
        proto: ETH_P_IP.to_be_bytes(),
    };
    #[expect(clippy::cast_possible_truncation, reason = "96 bytes")]
    let tot_len = (IPV4_HLEN + ICMP_HLEN + ICMP_QUOTE) as u16;
    h.ip = Ipv4Hdr {
        ver_ihl: 0x45,
        // Internetwork control, as Linux sends its ICMP errors.
        tos: 0xc0,
        tot_len: tot_len.to_be_bytes(),
        id: [0; 2],
        frag: [0; 2],
        ttl: OUTER_TTL,
        proto: IPPROTO_ICMP,
        csum: [0; 2],
        src: error.src,
        dst: vm_ca,
    };
    h.ip.csum = h.ip.checksum().to_be_bytes();
    h.icmp = IcmpHdr {
        kind: error.kind,
        code: error.code,
        csum: [0; 2],
        unused: [0; 2],
        mtu: error.mtu,
    };
    let quote =
        ptr_at::<[u8; ICMP_QUOTE]>(ctx.data(), ctx.data_end(), ETH_HLEN + IPV4_HLEN + ICMP_HLEN)?;
    // SAFETY: helper reading the bounds-checked quote; no "from" buffer.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            quote.cast::<u32>(),
            ICMP_QUOTE as u32,
            0,
        )
    };
    let h = ptr_at::<Answer>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds-checked again: the helper call ended the earlier view's life.
    let h = unsafe { &mut *h };
    #[expect(
        clippy::cast_sign_loss,
        clippy::cast_possible_truncation,
        reason = "a 32-bit sum"
    )]
    // The helper sums the quote as native-order words; the header words join it the same
    // way (a ones-complement sum is byte-order independent, RFC 1071), and the result is
    // stored as it came.
    let sum = u64::from(sum as u32)
        + u64::from(u16::from_ne_bytes([error.kind, error.code]))
        + u64::from(u16::from_ne_bytes(error.mtu));
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 32 bits")]
    let csum = crate::packet::csum_fold(((sum & 0xffff_ffff) + (sum >> 32)) as u32);
    h.icmp.csum = csum.to_ne_bytes();
    Some(())
}

const ICMP_HLEN: usize = 8;

#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    csum: [u8; 2],
    unused: [u8; 2],
    mtu: [u8; 2],
}

/// What goes in front of the quote.
#[repr(C)]
struct Answer {
    eth: EthHdr,
    ip: Ipv4Hdr,
    icmp: IcmpHdr,
}

const _: () = assert!(core::mem::size_of::<Answer>() == ETH_HLEN + IPV4_HLEN + ICMP_HLEN);
