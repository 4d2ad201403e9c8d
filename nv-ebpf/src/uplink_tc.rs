//! TC ingress on the uplink: frames `uplink_xdp` prepared carry metadata naming their VM port.
//! NVGRE frames arrive decapsulated and go straight into the VM's namespace; IP-rewrite packets
//! get their customer addresses and Ethernet header back first (checksum helpers live here, not
//! in XDP). `XDP_REDIRECT` into a veth whose peer has no XDP program loses frames (DESIGN.md);
//! `bpf_redirect_peer` from here does not. Frames without our metadata pass untouched.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect_peer,
    programs::TcContext,
};
use nv_common::{Counter, DeliverMeta, RestoreMeta, wire::ETH_HLEN};

use crate::{
    counters::count,
    packet::{Ipv4Hdr, PACKET_HOST, read_at},
    rewrite,
};

pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let meta_start = unsafe { (*ctx.skb.skb).data_meta } as usize;
    let Some(head) = read_at::<DeliverMeta>(meta_start, ctx.data(), 0) else {
        return TC_ACT_OK as i32;
    };
    match head.magic {
        DeliverMeta::MAGIC => deliver(
            ctx,
            head.ifindex,
            Counter::UplinkDelivered,
            Counter::DropUplinkDeliver,
        ),
        RestoreMeta::MAGIC => {
            let Some(meta) = read_at::<RestoreMeta>(meta_start, ctx.data(), 0) else {
                return TC_ACT_OK as i32;
            };
            if restore(ctx, &meta).is_err() {
                count(Counter::DropUplinkRewriteFailed);
                return TC_ACT_SHOT as i32;
            }
            deliver(
                ctx,
                meta.ifindex,
                Counter::UplinkRewriteDelivered,
                Counter::DropUplinkDeliver,
            )
        }
        _ => TC_ACT_OK as i32,
    }
}

/// Puts the customer's addresses and Ethernet header back on an IP-rewrite packet.
fn restore(ctx: &TcContext, meta: &RestoreMeta) -> Result<(), ()> {
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).map_err(|_| ())?;
    rewrite::replace_addresses(ctx, &ip, meta.src_ca, meta.dst_ca)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&meta.dst_mac);
    macs[6..].copy_from_slice(&meta.src_mac);
    ctx.store(0, &macs, 0).map_err(|_| ())
}

fn deliver(ctx: &TcContext, ifindex: u32, ok: Counter, failed: Counter) -> i32 {
    // The frame was classified against the uplink's MAC (other host); the VM must see it as
    // addressed to it, and redirect_peer does not classify again.
    let _ = ctx.change_type(PACKET_HOST);
    // SAFETY: plain helper call; the kernel checks the target device.
    let action = unsafe { bpf_redirect_peer(ifindex, 0) };
    count(if action == i64::from(TC_ACT_REDIRECT) {
        ok
    } else {
        failed
    });
    action as i32
}
