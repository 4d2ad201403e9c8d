//! The uplink's neighbour responder for the IPv6 rewrite PAs the datapath owns
//! ([`LocalPa::OWNED`]), as `uplink_arp` is for IPv4's: those addresses are never on the
//! uplink, so the host's stack neither answers for them nor lets a host process bind them; the
//! underlay still finds them, here, at the uplink's MAC.
use aya_ebpf::programs::TcContext;
use nv_common::{
    Counter, LocalPa,
    wire::{ETH_HLEN, IPPROTO_ICMPV6, IPV6_HLEN, ND_NEIGHBOR_ADVERT, ND_NEIGHBOR_SOLICIT},
};

use crate::{
    maps::LOCAL_PAS6,
    nd,
    packet::{Ipv6Hdr, read_at, view_at},
};

/// Whether the IPv6 packet at `l3` of `[data, end)` is a neighbour solicitation (on the link,
/// right after the IPv6 header) from a unicast address for an owned PA.
#[inline(always)]
pub fn is_solicitation_for_owned(data: usize, end: usize, ip: &Ipv6Hdr, l3: usize) -> bool {
    if ip.next != IPPROTO_ICMPV6 || ip.hop_limit != 255 || ip.src == [0; 16] {
        return false;
    }
    let Some(head) = read_at::<[u8; 4]>(data, end, l3 + IPV6_HLEN) else {
        return false;
    };
    if head[0] != ND_NEIGHBOR_SOLICIT || head[1] != 0 {
        return false;
    }
    read_at::<[u8; 16]>(data, end, l3 + IPV6_HLEN + 8).is_some_and(|target| {
        // SAFETY: read-only use of a value the agent replaces whole.
        unsafe { LOCAL_PAS6.get(target) }.is_some_and(LocalPa::is_owned)
    })
}

/// Whether the IPv6 packet at `l3` is a neighbour solicitation or advertisement on the link
/// (hop limit 255, right after the IPv6 header).
#[inline(always)]
pub fn is_discovery(data: usize, end: usize, ip: &Ipv6Hdr, l3: usize) -> bool {
    ip.next == IPPROTO_ICMPV6
        && ip.hop_limit == 255
        && read_at::<[u8; 4]>(data, end, l3 + IPV6_HLEN)
            .is_some_and(|h| h[0] == ND_NEIGHBOR_SOLICIT || h[0] == ND_NEIGHBOR_ADVERT)
}

/// Whether the discovery message at `l3` ([`is_discovery`]) is an advertisement of its own
/// source address: what `answer` sends for an owned PA.
#[inline(always)]
pub fn advertises_itself(data: usize, end: usize, ip: &Ipv6Hdr, l3: usize) -> bool {
    read_at::<[u8; 4]>(data, end, l3 + IPV6_HLEN).is_some_and(|h| h[0] == ND_NEIGHBOR_ADVERT)
        && read_at::<[u8; 16]>(data, end, l3 + IPV6_HLEN + 8) == Some(ip.src)
}

/// Turns the solicitation into its advertisement in place: the owned PA is at `mac` (the
/// uplink's). The caller sends it back out of the uplink.
#[inline(always)]
pub fn answer(ctx: &TcContext, mac: [u8; 6]) -> Result<(), Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip: &Ipv6Hdr = view_at(data, end, ETH_HLEN).ok_or(Counter::DropUplinkMalformed)?;
    let asker = ip.src;
    let asker_mac: [u8; 6] = read_at(data, end, 6).ok_or(Counter::DropUplinkMalformed)?;
    let target: [u8; 16] =
        read_at(data, end, ETH_HLEN + IPV6_HLEN + 8).ok_or(Counter::DropUplinkMalformed)?;
    nd::advertise(
        ctx,
        asker_mac,
        mac,
        &asker,
        &target,
        nd::NA_SOLICITED_OVERRIDE,
    )
}
