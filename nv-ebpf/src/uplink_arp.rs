//! The uplink's ARP responder for the rewrite PAs the datapath owns ([`LocalPa::OWNED`]).
//! Those addresses are never on the uplink, so the host's stack neither answers for them nor
//! lets a host process bind them; the underlay still finds them, here, at the uplink's MAC.
use nv_common::{
    LocalPa,
    wire::{ARPHRD_ETHER, ARPOP_REPLY, ARPOP_REQUEST, ETH_HLEN, ETH_P_IP},
};

use crate::{
    maps::LOCAL_PAS,
    packet::{ArpEth, EthHdr, ptr_at, view_at},
};

/// Whether the frame in `[data, end)` (Ethernet, untagged, ARP) asks for an owned PA.
#[inline(always)]
pub fn is_request_for_owned(data: usize, end: usize) -> bool {
    let Some(arp) = view_at::<ArpEth>(data, end, ETH_HLEN) else {
        return false;
    };
    u16::from_be_bytes(arp.htype) == ARPHRD_ETHER
        && u16::from_be_bytes(arp.ptype) == ETH_P_IP
        && arp.hlen == 6
        && arp.plen == 4
        && u16::from_be_bytes(arp.op) == ARPOP_REQUEST
        // SAFETY: read-only use of a value the agent replaces whole.
        && unsafe { LOCAL_PAS.get(arp.tpa) }.is_some_and(LocalPa::is_owned)
}

/// Turns the request in `[data, end)` into its reply in place: the owned PA is at `mac` (the
/// uplink's). The caller sends it back out of the uplink. False when the frame is too short.
#[inline(always)]
pub fn make_reply(data: usize, end: usize, mac: [u8; 6]) -> bool {
    let (Some(eth), Some(arp)) = (
        ptr_at::<EthHdr>(data, end, 0),
        ptr_at::<ArpEth>(data, end, ETH_HLEN),
    ) else {
        return false;
    };
    // SAFETY: both pointers were bounds-checked against `end` just above; byte arrays only.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    let (requester_mac, requester_ip, target_ip) = (arp.sha, arp.spa, arp.tpa);
    arp.op = ARPOP_REPLY.to_be_bytes();
    arp.sha = mac;
    arp.spa = target_ip;
    arp.tha = requester_mac;
    arp.tpa = requester_ip;
    eth.dst = requester_mac;
    eth.src = mac;
    true
}
