//! Port ACLs: a VM port's rules for what it sends (checked before anything is forwarded) and
//! for what it receives (checked at delivery, after decapsulation or restore, from a VM on
//! this host alike). Only ports whose entry says they have rules come here, so a port without
//! any pays one branch.
//!
//! A connection a stateful allow admitted is in the port's flow table, and its packets in
//! both directions pass on it without the rules; the agent takes out the flows a changed rule
//! set no longer admits. Otherwise the rules are read in order (highest weight first, deny
//! first at equal weight) and the first that matches decides; none matching allows.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_ktime_get_coarse_ns, bpf_loop, bpf_skb_load_bytes},
    programs::TcContext,
};
use nv_common::{
    Counter, PortInfo,
    acl::{
        AclFlowKey, AclMeter, AclMeterKey, AclRule, AclSet, AclSetKey, AclTuple, DIR_OUT,
        FLOW_WAYS, MAX_SET_RULES,
    },
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
        IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP,
    },
};

use crate::maps::{ACL_DENIED, ACL_FLOWS, ACL_METERS, ACL_SCRATCH, ACL_SETS, AclScratch};

/// A flow's last-seen time is written at most this often: its cache line is not bounced
/// between CPUs on every packet.
const SEEN_EVERY_NS: u64 = 1_000_000_000;

/// What the rules of the VM port whose entry is `port` say about the frame in `skb` going `dir`
/// ([`DIR_IN`]: delivered to the VM; [`DIR_OUT`]: sent by it): 0 to let it pass, 1 to drop
/// it.
///
/// A global function (exported, C calling convention): the verifier checks it once, on its
/// own, not again at each of the delivery paths that call it. It takes the caller's port entry
/// (a struct of plain integers: to the verifier, memory of its size, or null) rather than
/// looking it up again.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn nv_acl_check(skb: *mut __sk_buff, port: *const PortInfo, dir: u32) -> u32 {
    let ctx = &TcContext::new(skb);
    const DENIED: u32 = 1;
    // The tuple and the map keys live in a per-CPU scratch value, off this frame: the
    // delivery paths' frames and this one share the 512 bytes of a call chain.
    let Some(s) = ACL_SCRATCH.get_ptr_mut(0) else {
        return DENIED;
    };
    // SAFETY: this CPU's scratch value, used by this program run alone.
    let s = unsafe { &mut *s };
    // SAFETY: the caller's entry of the port (a map value the agent replaces whole), or null.
    let Some(port) = (unsafe { port.as_ref() }) else {
        return DENIED;
    };
    s.set = AclSetKey {
        vsid: port.vsid,
        dir,
        ca: port.ca,
    };
    // SAFETY: as above.
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the key stays in the scratch value, off the stack"
    )]
    let Some(set) = (unsafe { ACL_SETS.get(&s.set) }) else {
        // The port's entry names rules its set does not hold yet (or any more): the port's
        // entry is written after its sets and taken away before them, so this is a port
        // being re-created. Nothing the rules would refuse may pass meanwhile.
        return DENIED;
    };
    s.t = AclTuple::default();
    match tuple(ctx, dir, &mut s.t, &mut s.ip4) {
        // Not IP: ARP and the like are answered or dropped before any rule.
        NOT_IP => return 0,
        TUPLE => {}
        // IP whose protocol or ports cannot be read (cut short, or behind more extension
        // headers than are walked): what the rules would say is unknown, so it does not pass.
        _ => return DENIED,
    }
    let len = u64::from(ctx.len());
    s.flow = AclFlowKey {
        vsid: s.set.vsid,
        set: s.t.flow_set(set.flow_sets),
        ca: s.set.ca,
    };
    let now = if set.flow_sets != 0 {
        // SAFETY: a helper without arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let (rule, opened) = established(&s.flow, &s.t, dir, now);
        if rule != 0 {
            // Metered under the direction of the rule that admitted the connection.
            meter(s, rule, opened, len);
            return 0;
        }
        now
    } else {
        0
    };
    let mut scan = Scan {
        set,
        len: set.len,
        found: NONE,
    };
    // The rules in a loop the kernel runs (`bpf_loop`): its body is verified once, where an
    // open loop of a thousand rules is verified a thousand times at every caller.
    #[expect(clippy::cast_possible_truncation, reason = "MAX_SET_RULES fits")]
    // SAFETY: `scan_rule` takes what it is given here; `scan` outlives the call.
    unsafe {
        bpf_loop(
            MAX_SET_RULES as u32,
            scan_rule as *mut c_void,
            (&raw mut scan).cast(),
            0,
        );
    }
    let Some(rule) = set.rules.get(scan.found as usize) else {
        return 0;
    };
    meter(s, rule.id, dir, len);
    if !rule.allows() {
        if let Some(last) = ACL_DENIED.get_ptr_mut(0) {
            // SAFETY: this CPU's slot, read by the monitor's report of this drop.
            unsafe { *last = rule.id };
        }
        return DENIED;
    }
    if rule.is_stateful() && s.t.trackable() {
        if set.flow_sets == 0 {
            crate::counters::count(Counter::AclFlowUntracked);
        } else {
            track(&s.flow, &s.t, rule, dir, now);
        }
    }
    0
}

/// What [`scan_rule`] reads and finds (the tuple: in the scratch value).
struct Scan<'a> {
    set: &'a AclSet,
    len: u32,
    /// The index of the first rule that matches, or [`NONE`].
    found: u32,
}

const NONE: u32 = u32::MAX;

/// `bpf_loop`'s body: rule `i` of the set, 1 (stop) at the first that matches or the end.
unsafe extern "C" fn scan_rule(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `check` hands its own `Scan` over, for the loop's duration.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    if i >= scan.len {
        return 1;
    }
    // Masked behind a barrier, as `counters::numbered` is: the compiler may check the bound
    // on one register and index with another, which the verifier then sees unbounded.
    const _: () = assert!(MAX_SET_RULES.is_power_of_two());
    #[expect(clippy::cast_possible_truncation, reason = "MAX_SET_RULES fits")]
    let at = core::hint::black_box(i) & (MAX_SET_RULES as u32 - 1);
    let Some(rule) = scan.set.rules.get(at as usize) else {
        return 1;
    };
    // SAFETY: this CPU's scratch value, filled by `nv_acl_check` before the loop.
    let Some(t) = ACL_SCRATCH.get(0) else {
        return 1;
    };
    if rule.matches(&t.t) {
        scan.found = i;
        return 1;
    }
    0
}

/// What [`tuple`] made of a frame.
const NOT_IP: u32 = 0;
const TUPLE: u32 = 1;
const UNKNOWN: u32 = 2;

/// Fills `t` with the packet's tuple from the VM's side: [`TUPLE`], [`NOT_IP`], or
/// [`UNKNOWN`] for IP whose protocol or ports cannot be read.
#[inline(always)]
fn tuple(ctx: &TcContext, dir: u32, t: &mut AclTuple, ip4: &mut [u8; 20]) -> u32 {
    match parse(ctx, dir, t, ip4) {
        Some(true) => TUPLE,
        Some(false) => NOT_IP,
        None => UNKNOWN,
    }
}

// Fields are loaded straight into `t`: whole headers would make this frame, on top of the
// IPv6 forwarding path's, too big for the 512 bytes of a call chain.
#[inline(always)]
fn parse(ctx: &TcContext, dir: u32, t: &mut AclTuple, ip4: &mut [u8; 20]) -> Option<bool> {
    let out = dir == DIR_OUT;
    let proto: [u8; 2] = ctx.load(ETH_HLEN - 2).ok()?;
    let l4 = match u16::from_be_bytes(proto) {
        ETH_P_IP => {
            // The fixed header in one helper call: version and length, (at 6) fragment, TTL
            // and protocol, (at 12) the addresses.
            load_bytes(ctx, ETH_HLEN, ip4)?;
            t.family = 4;
            t.proto = ip4[9];
            let word =
                |at: usize| u32::from_ne_bytes([ip4[at], ip4[at + 1], ip4[at + 2], ip4[at + 3]]);
            let (local, remote) = if out {
                (word(12), word(16))
            } else {
                (word(16), word(12))
            };
            (t.local[2], t.remote[2]) = (V4_MAPPED, V4_MAPPED);
            (t.local[3], t.remote[3]) = (local, remote);
            // A later fragment has no ports: it meets the rules with none.
            if u16::from_be_bytes([ip4[6], ip4[7]]) & 0x1fff == 0 {
                ETH_HLEN + usize::from(ip4[0] & 0x0f) * 4
            } else {
                0
            }
        }
        ETH_P_IPV6 => {
            t.family = 6;
            t.proto = ctx.load(ETH_HLEN + 6).ok()?;
            let (local, remote) = if out { (8, 24) } else { (24, 8) };
            load_into(ctx, ETH_HLEN + local, &mut t.local)?;
            load_into(ctx, ETH_HLEN + remote, &mut t.remote)?;
            // The rules see the upper-layer protocol behind any extension headers (a TCP
            // segment behind a hop-by-hop header is still TCP to the VM's stack).
            let (proto, l4) = upper_layer6(ctx, t.proto)?;
            t.proto = proto;
            l4
        }
        _ => return Some(false),
    };
    if l4 == 0 {
        return Some(true);
    }
    match t.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: [u8; 4] = ctx.load(l4).ok()?;
            let (sport, dport) = (
                u16::from_be_bytes([ports[0], ports[1]]),
                u16::from_be_bytes([ports[2], ports[3]]),
            );
            (t.lport, t.rport) = if out { (sport, dport) } else { (dport, sport) };
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let icmp: [u8; 6] = ctx.load(l4).ok()?;
            t.echo = match (t.proto, icmp[0]) {
                (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => AclTuple::ECHO_REQUEST,
                (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => AclTuple::ECHO_REPLY,
                _ => 0,
            };
            // An echo's identifier is its connection's port, on the VM's side.
            t.lport = u16::from_be_bytes([icmp[4], icmp[5]]);
        }
        _ => {}
    }
    Some(true)
}

/// The upper-layer protocol behind the IPv6 extension headers of the packet whose first
/// next header is `first`, and where it starts (0: a later fragment, which carries no ports);
/// `None` when a header cannot be read or there are more than four.
#[inline(always)]
fn upper_layer6(ctx: &TcContext, first: u8) -> Option<(u8, usize)> {
    let (mut next, mut off) = (first, ETH_HLEN + 40);
    for _ in 0..4 {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h: [u8; 2] = ctx.load(off).ok()?;
                next = h[0];
                (usize::from(h[1]) + 1) * 8
            }
            IPPROTO_AH => {
                let h: [u8; 2] = ctx.load(off).ok()?;
                next = h[0];
                (usize::from(h[1]) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let h: [u8; 4] = ctx.load(off).ok()?;
                next = h[0];
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Some((next, 0));
                }
                8
            }
            _ => return Some((next, off)),
        };
        off += len;
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => None,
        _ => Some((next, off)),
    }
}

/// `N` bytes of the packet at `offset` into `dst` (memory off the stack, such as the scratch
/// value).
#[inline(always)]
fn load_bytes<const N: usize>(ctx: &TcContext, offset: usize, dst: &mut [u8; N]) -> Option<()> {
    load_raw(ctx, offset, dst.as_mut_ptr().cast(), N)
}

/// The `N` words at `offset` straight into `dst`, with no copy on the stack.
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, offset: usize, dst: &mut [u32; N]) -> Option<()> {
    load_raw(ctx, offset, dst.as_mut_ptr().cast(), N * 4)
}

#[inline(always)]
fn load_raw(ctx: &TcContext, offset: usize, dst: *mut c_void, len: usize) -> Option<()> {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "offsets and lengths within a frame"
    )]
    // SAFETY: the callers pass `len` bytes of writable memory; the helper checks the packet's
    // bounds.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), offset as u32, dst, len as u32) };
    (rc == 0).then_some(())
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as loaded.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The rule of the live connection `t` belongs to (0: none) and the direction it was opened
/// in, refreshing its last-seen time.
#[inline(always)]
fn established(key: &AclFlowKey, t: &AclTuple, dir: u32, now: u64) -> (u32, u32) {
    // Of ICMP only echoes belong to a connection: an error or a timestamp request from a
    // pinged peer meets the rules.
    if (t.proto == IPPROTO_ICMP || t.proto == IPPROTO_ICMPV6) && t.echo == 0 {
        return (0, 0);
    }
    let Some(fs) = ACL_FLOWS.get_ptr_mut(key) else {
        return (0, 0);
    };
    for w in 0..FLOW_WAYS {
        // SAFETY: the map's value; other CPUs may write a way at once, which at worst loses
        // a flow (its next packet meets the rules again) or a last-seen time.
        let Some(f) = (unsafe { (*fs).ways.get_mut(w) }) else {
            break;
        };
        if !f.is(t) || f.expired(now) {
            continue;
        }
        // An echo's answer passes, not another request the other way.
        if t.echo != 0 && (t.echo == AclTuple::ECHO_REQUEST) != (u32::from(f.dir) == dir) {
            return (0, 0);
        }
        if now.wrapping_sub(f.seen_ns) > SEEN_EVERY_NS {
            f.seen_ns = now;
        }
        return (f.rule, u32::from(f.dir));
    }
    (0, 0)
}

/// Records the connection `t` the stateful `rule` admitted in the port's flow set `key`: in
/// a free or expired way, or over the oldest.
#[inline(always)]
fn track(key: &AclFlowKey, t: &AclTuple, rule: &AclRule, dir: u32, now: u64) {
    let Some(fs) = ACL_FLOWS.get_ptr_mut(key) else {
        crate::counters::count(Counter::AclFlowUntracked);
        return;
    };
    let mut pick = 0;
    let mut oldest = u64::MAX;
    for w in 0..FLOW_WAYS {
        // SAFETY: as in `established`.
        let Some(f) = (unsafe { (*fs).ways.get(w) }) else {
            break;
        };
        if f.valid == 0 || f.expired(now) {
            pick = w;
            break;
        }
        if f.seen_ns < oldest {
            oldest = f.seen_ns;
            pick = w;
        }
    }
    // SAFETY: as in `established`.
    if let Some(f) = unsafe { (*fs).ways.get_mut(pick) } {
        f.valid = 0;
        (f.local, f.remote) = (t.local, t.remote);
        (f.lport, f.rport, f.proto) = (t.lport, t.rport, t.proto);
        #[expect(clippy::cast_possible_truncation, reason = "DIR_IN or DIR_OUT")]
        let d = dir as u8;
        f.dir = d;
        (f.rule, f.idle_timeout, f.seen_ns) = (rule.id, rule.idle_timeout, now);
        f.valid = 1;
    }
}

/// Counts a packet of `len` bytes decided by `rule` going `dir`.
#[inline(always)]
fn meter(s: &mut AclScratch, rule: u32, dir: u32, len: u64) {
    s.meter = AclMeterKey { rule, dir };
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the key stays in the scratch value, off the stack"
    )]
    if let Some(m) = ACL_METERS.get_ptr_mut(&s.meter) {
        // SAFETY: this CPU's value, written only by this CPU while the program runs.
        let m: &mut AclMeter = unsafe { &mut *m };
        m.packets += 1;
        m.bytes += len;
    }
}

/// Whether the port `port` has rules for what goes `dir`; then [`nv_acl_check`] them.
#[inline(always)]
pub fn admits(ctx: &TcContext, port: &PortInfo, dir: u32) -> Result<(), Counter> {
    let (flag, denied) = if dir == DIR_OUT {
        (PortInfo::ACL_OUT, Counter::DropVmAclDenied)
    } else {
        (PortInfo::ACL_IN, Counter::DropAclInDenied)
    };
    if port.flags & flag == 0 || nv_acl_check(ctx.skb.skb, port, dir) == 0 {
        return Ok(());
    }
    // One counter per direction, known where this is inlined: the drop paths after it stay
    // as few for the verifier as they were.
    Err(denied)
}
