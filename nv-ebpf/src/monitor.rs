//! What the datapath reports besides its counters, and the one way every drop goes: counted
//! under its reason and, while an `nvctl monitor` runs, reported on the ring buffer with what
//! can be read of the frame (VSID, port, addresses). Forwarded packets are counted per VSID,
//! direction and method, and one in `monitor_sample` is reported while a monitor asks for it.
//! With no monitor the cost is a branch on a config word the program has read anyway.
use core::ptr;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, TC_ACT_SHOT, xdp_action::XDP_DROP},
    programs::{TcContext, XdpContext},
};
use nv_common::{
    Counter, DatapathConfig, MonitorEvent, VsidStatsKey, VsidTraffic, v4_mapped,
    wire::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, GRE_HLEN, IPPROTO_GRE, IPV6_HLEN},
};

use crate::{
    counters::count,
    maps::{CONFIG, MONITOR, MONITOR_SAMPLE, PORTS, VSID_STATS},
    packet::{EthHdr, Ipv4Hdr, Ipv6Hdr, read_at, view_at},
};

/// Set to 0 by the loader for the benchmark's copy without per-VSID counting, so its cost is
/// measured against the same paths without it.
#[unsafe(no_mangle)]
static NV_COUNT_VSIDS: u32 = 1;

/// Set to 0 by the loader for the benchmark's copy without the monitor's and the debug events'
/// checks, so their cost with both off is measured against none at all.
#[unsafe(no_mangle)]
static NV_MONITORING: u32 = 1;

/// Whether this copy has the monitor at all (a constant the verifier knows).
#[inline(always)]
fn has_monitor() -> bool {
    // SAFETY: a volatile read of a global the loader fills in; the verifier knows its value.
    unsafe { ptr::read_volatile(&NV_MONITORING) != 0 }
}

/// A frame forwarded for `vsid` by `method` ([`VsidStatsKey`]'s), `len` bytes as the VM sent
/// or gets it: sent by a VM here (`tx`), delivered to one (`rx`), or both (VM to VM).
#[inline(always)]
pub fn traffic(vsid: u32, method: u8, tx: bool, rx: bool, len: u32) {
    // SAFETY: a volatile read of a global the loader fills in; the verifier knows its value.
    if unsafe { ptr::read_volatile(&NV_COUNT_VSIDS) } == 0 {
        return;
    }
    let (t, r) = (
        VsidStatsKey::slot(VsidStatsKey::TX, method),
        VsidStatsKey::slot(VsidStatsKey::RX, method),
    );
    if let Some(v) = VSID_STATS.get_ptr_mut(vsid) {
        // SAFETY: this CPU's value, written only by this CPU while the program runs.
        let by = unsafe { &mut (*v).by };
        for (slot, yes) in [(t, tx), (r, rx)] {
            if yes && let Some(s) = by.get_mut(slot) {
                s.packets += 1;
                s.bytes += u64::from(len);
            }
        }
        return;
    }
    first_traffic(
        vsid,
        u32::from(method),
        u32::from(tx) | u32::from(rx) << 1,
        len,
    );
}

/// A VSID's first counted frame on this host: its entry is made (out of line, off the hot
/// path). A full map leaves the frame uncounted here; its host-wide counter still counts it.
// The entry is inserted empty from read-only data, then counted in place: no 96-byte value
// on the stack of a call chain that runs deep (the uplink's delivery).
#[inline(never)]
fn first_traffic(vsid: u32, method: u32, dirs: u32, len: u32) {
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by reference the value stays in read-only data, off the stack"
    )]
    let _ = VSID_STATS.insert(vsid, &NO_TRAFFIC, u64::from(BPF_NOEXIST));
    let Some(v) = VSID_STATS.get_ptr_mut(vsid) else {
        return;
    };
    // SAFETY: this CPU's value, written only by this CPU while the program runs.
    let by = unsafe { &mut (*v).by };
    for (dir, bit) in [(VsidStatsKey::TX, 1), (VsidStatsKey::RX, 2)] {
        #[expect(clippy::cast_possible_truncation, reason = "a method, < 3")]
        let slot = VsidStatsKey::slot(dir, method as u8);
        if dirs & bit != 0
            && let Some(s) = by.get_mut(slot)
        {
            s.packets += 1;
            s.bytes += u64::from(len);
        }
    }
}

static NO_TRAFFIC: VsidTraffic = VsidTraffic {
    by: [nv_common::VsidStats {
        packets: 0,
        bytes: 0,
    }; 6],
};

/// A frame forwarded (`how`: the counter it was counted under): reports one in
/// `monitor_sample` while a monitor asks for samples.
#[inline(always)]
pub fn forwarded(data: usize, end: usize, how: Counter, ifindex: u32, vsid: u32, len: u32) {
    if !has_monitor() {
        return;
    }
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if config.monitor_sample == 0 {
        return;
    }
    let Some(seen) = MONITOR_SAMPLE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, written only by this CPU while the program runs.
    let n = unsafe { *seen } + 1;
    if n < config.monitor_sample {
        // SAFETY: as above.
        unsafe { *seen = n };
        return;
    }
    // SAFETY: as above.
    unsafe { *seen = 0 };
    report(
        data,
        end,
        what(MonitorEvent::FORWARD, how),
        ids(ifindex, vsid),
        len,
    );
}

/// Whether the datapath logs its debug events now (`nvctl debug on`).
#[inline(always)]
pub fn debugging() -> bool {
    has_monitor()
        && CONFIG
            .get(0)
            .is_some_and(|c| c.flags & DatapathConfig::DEBUG_EVENTS != 0)
}

/// A debug event for a drop, through aya-log. Out of line: off the hot paths.
#[inline(never)]
fn log_drop<C: EbpfContext>(ctx: &C, reason: Counter, ifindex: u32, vsid: u32) {
    aya_log_ebpf::debug!(
        ctx,
        "drop {}: ifindex {} vsid {}",
        reason.name(),
        ifindex,
        vsid
    );
}

/// Drops a frame from the VM port `ifindex` (TC): counted, and reported while a monitor runs.
pub fn drop_from_vm(ctx: &TcContext, reason: Counter, ifindex: u32) -> i32 {
    count(reason);
    let (debug, monitor) = (debugging(), monitoring());
    if !debug && !monitor {
        return TC_ACT_SHOT;
    }
    // SAFETY: read-only use of a value the agent replaces whole.
    let vsid = unsafe { PORTS.get(ifindex) }.map_or(0, |p| p.vsid);
    if debug {
        log_drop(ctx, reason, ifindex, vsid);
    }
    if monitor {
        let (what, ids) = (what(MonitorEvent::DROP, reason), ids(ifindex, vsid));
        report(ctx.data(), ctx.data_end(), what, ids, ctx.len());
    }
    TC_ACT_SHOT
}

/// Drops a frame on the uplink's TC hook (`vsid`: the VM's it was for, 0 when not known yet):
/// counted, and reported while a monitor runs.
pub fn drop_on_uplink(ctx: &TcContext, reason: Counter, vsid: u32) -> i32 {
    count(reason);
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if debugging() {
        log_drop(ctx, reason, ifindex, vsid);
    }
    if monitoring() {
        let (what, ids) = (what(MonitorEvent::DROP, reason), ids(ifindex, vsid));
        report(ctx.data(), ctx.data_end(), what, ids, ctx.len());
    }
    TC_ACT_SHOT
}

/// Drops a frame on the uplink's XDP hook: counted, and reported while a monitor runs.
pub fn drop_xdp(ctx: &XdpContext, reason: Counter) -> u32 {
    count(reason);
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    if debugging() {
        log_drop(ctx, reason, ifindex, 0);
    }
    if monitoring() {
        let (data, end) = (ctx.data(), ctx.data_end());
        #[expect(clippy::cast_possible_truncation, reason = "a frame")]
        let len = (end - data) as u32;
        report(
            data,
            end,
            what(MonitorEvent::DROP, reason),
            ids(ifindex, 0),
            len,
        );
    }
    XDP_DROP
}

#[inline(always)]
fn monitoring() -> bool {
    has_monitor()
        && CONFIG
            .get(0)
            .is_some_and(|c| c.monitor & DatapathConfig::MONITOR_DROPS != 0)
}

/// An event's kind and counter, in one argument (BPF functions take five).
#[inline(always)]
fn what(kind: u8, counter: Counter) -> u32 {
    u32::from(kind) | (counter as u32) << 8
}

/// An event's ifindex and VSID, in one argument.
#[inline(always)]
fn ids(ifindex: u32, vsid: u32) -> u64 {
    u64::from(ifindex) | u64::from(vsid) << 32
}

/// Writes an event on the ring buffer with what can be read of the frame: its Ethernet and
/// IPv4 addresses, or for NVGRE the inner ones and the VSID from the GRE key. Out of line: the
/// programs' hot paths do not carry its instructions.
#[inline(never)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "unpacking what() and ids()"
)]
fn report(data: usize, end: usize, what: u32, ids: u64, len: u32) {
    let mut e = MonitorEvent {
        kind: what as u8,
        counter: (what >> 8) as u8,
        ifindex: ids as u32,
        vsid: (ids >> 32) as u32,
        len,
        ..MonitorEvent::default()
    };
    if e.counter == Counter::DropVmAclDenied as u8 || e.counter == Counter::DropAclInDenied as u8 {
        e.rule = crate::maps::ACL_DENIED.get(0).copied().unwrap_or(0);
    }
    // NVGRE: the VSID from the key, and the customer's frame inside.
    let gre = read_frame(data, end, 0, &mut e);
    if gre != 0
        && let Some(key) = read_at::<[u8; 4]>(data, end, gre + 4)
    {
        e.vsid = u32::from_be_bytes(key) >> 8;
        read_frame(data, end, gre + GRE_HLEN, &mut e);
    }
    let _ = MONITOR.output::<MonitorEvent>(&e, 0);
}

/// Fills `e` with the addresses of the Ethernet frame at `at` and of its IPv4 or IPv6 packet;
/// returns where its GRE header starts when it carries GRE (0 otherwise).
#[inline(always)]
fn read_frame(data: usize, end: usize, at: usize, e: &mut MonitorEvent) -> usize {
    let Some(eth) = view_at::<EthHdr>(data, end, at) else {
        return 0;
    };
    e.src_mac = eth.src;
    e.dst_mac = eth.dst;
    let l3 = at + ETH_HLEN;
    match eth.proto() {
        ETH_P_IP => {
            if let Some(ip) = view_at::<Ipv4Hdr>(data, end, l3) {
                e.src = v4_mapped(ip.src);
                e.dst = v4_mapped(ip.dst);
                e.proto = ip.proto;
                if ip.proto == IPPROTO_GRE {
                    return l3 + ip.hlen();
                }
            }
        }
        ETH_P_IPV6 => {
            if let Some(ip) = view_at::<Ipv6Hdr>(data, end, l3) {
                e.src = ip.src;
                e.dst = ip.dst;
                e.proto = ip.next;
                if ip.next == IPPROTO_GRE {
                    return l3 + IPV6_HLEN;
                }
            }
        }
        _ => {}
    }
    0
}

/// A frame the VM sent went out (`how`: its counter; `method`: [`nv_common::VsidStatsKey`]'s): counted for its
/// VSID, and sampled for a monitor.
#[inline(always)]
pub fn sent(
    ctx: &aya_ebpf::programs::TcContext,
    how: Counter,
    port: &nv_common::PortInfo,
    ifindex: u32,
    method: u8,
    len: u32,
) {
    crate::counters::count(how);
    traffic(
        port.vsid,
        method,
        true,
        method == nv_common::VsidStatsKey::LOCAL,
        len,
    );
    forwarded(ctx.data(), ctx.data_end(), how, ifindex, port.vsid, len);
}
