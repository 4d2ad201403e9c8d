//! Every redirect a program makes goes through here, so that a copy of the programs loaded for
//! tests or a packet trace can say where the frame went ([`RedirectTrace`]): the redirect
//! helpers keep their target in per-CPU kernel state that `BPF_PROG_TEST_RUN` does not report.
//! The forwarding copy is loaded with [`NV_TRACE`] at 0, a constant in a frozen read-only map,
//! so the verifier drops the recording as dead code and forwarding pays nothing for it.
use core::ptr;

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::map,
    maps::Array,
};
use nv_common::RedirectTrace;

/// Set to 1 by the loader for a tracing copy ([`nv_common::TRACE_GLOBAL`]).
#[unsafe(no_mangle)]
static NV_TRACE: u32 = 0;

#[map(name = "NV_TRACE_REDIRECT")]
static TRACE_REDIRECT: Array<RedirectTrace> = Array::with_max_entries(1, 0);

#[inline(always)]
fn record(ifindex: u32, how: u32) {
    // SAFETY: a volatile read of a global the loader fills in; the verifier knows its value.
    if unsafe { ptr::read_volatile(&NV_TRACE) } == 0 {
        return;
    }
    if let Some(slot) = TRACE_REDIRECT.get_ptr_mut(0) {
        // SAFETY: the map value pointer is valid for the program run.
        unsafe { *slot = RedirectTrace { ifindex, how } };
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "TC_ACT_REDIRECT or TC_ACT_SHOT"
)]
#[inline(always)]
fn action(ret: i64) -> i32 {
    ret as i32
}

/// To the egress of `ifindex`.
#[inline(always)]
pub fn egress(ifindex: u32) -> i32 {
    record(ifindex, RedirectTrace::EGRESS);
    // SAFETY: plain helper call.
    action(unsafe { bpf_redirect(ifindex, 0) })
}

/// Into the namespace behind the veth `ifindex`.
#[inline(always)]
pub fn peer(ifindex: u32) -> i32 {
    record(ifindex, RedirectTrace::PEER);
    // SAFETY: plain helper call.
    action(unsafe { bpf_redirect_peer(ifindex, 0) })
}

/// Out of `ifindex`, the kernel resolving the next hop's MAC.
#[inline(always)]
pub fn neigh(ifindex: u32) -> i32 {
    record(ifindex, RedirectTrace::NEIGH);
    // SAFETY: plain helper call; no next hop given, the kernel looks it up.
    action(unsafe { bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) })
}
