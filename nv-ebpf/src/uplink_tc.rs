//! TC ingress on the uplink: a frame that `uplink_xdp` decapsulated carries metadata naming its
//! VM port and is handed straight into the VM's namespace. `XDP_REDIRECT` into a veth whose peer
//! has no XDP program loses frames (DESIGN.md), `bpf_redirect_peer` from here does not.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_redirect_peer, programs::TcContext};
use nv_common::{Counter, DeliverMeta};

use crate::{
    counters::count,
    packet::{PACKET_HOST, read_at},
};

pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let meta_start = unsafe { (*ctx.skb.skb).data_meta } as usize;
    let Some(meta) = read_at::<DeliverMeta>(meta_start, ctx.data(), 0) else {
        return TC_ACT_OK as i32;
    };
    if meta.magic != DeliverMeta::MAGIC {
        return TC_ACT_OK as i32;
    }
    // The frame was classified against the uplink's MAC (other host); the VM must see it as
    // addressed to it, and redirect_peer does not classify again.
    let _ = ctx.change_type(PACKET_HOST);
    // SAFETY: plain helper call; the kernel checks the target device.
    let action = unsafe { bpf_redirect_peer(meta.ifindex, 0) };
    if action == i64::from(aya_ebpf::bindings::TC_ACT_REDIRECT) {
        count(Counter::UplinkDelivered);
    } else {
        count(Counter::DropUplinkDeliver);
    }
    action as i32
}
