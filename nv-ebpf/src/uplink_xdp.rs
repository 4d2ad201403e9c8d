//! XDP on the uplink (the default decapsulation hook): frames `uplink_rx` classifies as NVGRE
//! for a VM here are stripped of their outer headers, IP-rewrite packets for a VM here are
//! described; both go up with metadata naming the VM port, and `uplink_tc` delivers them.
//! Everything else passes untouched, ARP requests for the rewrite PAs the datapath owns
//! included: `uplink_tc` answers them (`XDP_TX` on a veth uplink whose peer runs no XDP
//! program loses the frame). Drops are counted, never `XDP_ABORTED`.
use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use nv_common::{Counter, DeliverMeta, DeliverMeta6};

use crate::{
    counters::count,
    maps::CONFIG,
    packet::ptr_at,
    uplink_rx::{Verdict, classify},
};

pub fn run(ctx: &XdpContext) -> u32 {
    match try_run(ctx) {
        Ok(action) => action,
        Err(reason) => crate::monitor::drop_xdp(ctx, reason),
    }
}

fn try_run(ctx: &XdpContext) -> Result<u32, Counter> {
    let Some(config) = CONFIG.get(0) else {
        return Ok(XDP_PASS);
    };
    // A tag the NIC took out of the frame is out of XDP's sight; `uplink_tc` drops tenant
    // traffic that arrives with one.
    match classify(config, ctx.data(), ctx.data_end(), false)? {
        Verdict::Pass | Verdict::ArpRequest => Ok(XDP_PASS),
        Verdict::Nvgre {
            strip,
            port,
            vsid,
            ca,
            mac,
            v6,
            ..
        } => {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_possible_wrap,
                reason = "< 100"
            )]
            let strip = strip as i32;
            // SAFETY: helper on the program's own context; pointers are re-derived after it.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip) } != 0 {
                return Err(Counter::DropUplinkDecapFailed);
            }
            if v6 {
                write_meta(
                    ctx,
                    DeliverMeta6 {
                        magic: DeliverMeta6::MAGIC,
                        ifindex: port,
                        vsid,
                        mac,
                        _pad: [0; 2],
                    },
                )?;
            } else {
                write_meta(
                    ctx,
                    DeliverMeta {
                        magic: DeliverMeta::MAGIC,
                        ifindex: port,
                        vsid,
                        ca,
                    },
                )?;
            }
            count(Counter::UplinkDecap);
            Ok(XDP_PASS)
        }
        Verdict::Rewrite(meta) => {
            write_meta(ctx, meta)?;
            Ok(XDP_PASS)
        }
        // More than XDP's 32 bytes of metadata would say: TC classifies these again.
        Verdict::Rewrite6 { .. } | Verdict::NdRequest => {
            write_meta(
                ctx,
                DeliverMeta {
                    magic: DeliverMeta::CLASSIFY,
                    ifindex: 0,
                    vsid: 0,
                    ca: [0; 4],
                },
            )?;
            Ok(XDP_PASS)
        }
    }
}

/// Puts `meta` in front of the frame, where `uplink_tc` finds it.
#[inline(always)]
fn write_meta<T>(ctx: &XdpContext, meta: T) -> Result<(), Counter> {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "<= 32 bytes"
    )]
    let len = core::mem::size_of::<T>() as i32;
    // SAFETY: helper on the program's own context; pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        return Err(Counter::DropUplinkDecapFailed);
    }
    let at = ptr_at::<T>(ctx.metadata(), ctx.data(), 0).ok_or(Counter::DropUplinkDecapFailed)?;
    // SAFETY: bounds-checked against the start of the frame just above.
    unsafe { at.write_unaligned(meta) };
    Ok(())
}
