//! TC egress on the uplink: nothing leaves from a provider address the datapath owns (an IP
//! rewrite PA) but what the datapath itself sends. The agent takes such an address off the
//! uplink, which stops a host process from sending from it over IPv4 (the kernel checks the
//! source is local); over IPv6 a socket with `IPV6_FREEBIND` (no privilege needed) still may,
//! and another host would take it as the VM's. The datapath marks what it sends from an
//! owned PA ([`SENT_MARK`]); a process cannot set a mark without `CAP_NET_ADMIN`.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use nv_common::{
    Counter, LocalPa,
    wire::{ETH_HLEN, ETH_P_IPV6},
};

use crate::{
    maps::LOCAL_PAS6,
    packet::{Ipv6Hdr, read_at, view_at},
};

/// The mark on what the datapath sends from an owned IPv6 PA.
pub const SENT_MARK: u32 = nv_common::DATAPATH_SENT_MARK;

pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).mark } == SENT_MARK {
        return TC_ACT_OK;
    }
    if read_at::<[u8; 2]>(ctx.data(), ctx.data_end(), 12) != Some(ETH_P_IPV6.to_be_bytes()) {
        return TC_ACT_OK;
    }
    let Some(ip) = view_at::<Ipv6Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) else {
        return TC_ACT_OK;
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    if unsafe { LOCAL_PAS6.get(ip.src) }.is_some_and(LocalPa::is_owned) {
        return crate::monitor::drop_on_uplink(ctx, Counter::DropHostFromRewritePa, 0);
    }
    TC_ACT_OK
}
