//! The fuzzer's IPv6 properties: what leaves a VM's port is a neighbour advertisement for a
//! record of its own VSID, or its own packet (from its own address, never a router's message)
//! to a record of its VSID, by NVGRE or into a VM here; what the uplink delivers is NVGRE of a
//! VSID for a VM here, from the PA and MAC of the source's record. An independent reading of
//! the frames, not the datapath's code.
use std::collections::HashMap;

use anyhow::{Context as _, bail, ensure};
use nv_common::{DeliverMeta, DeliverMeta6, LookupKey6, LookupValue, Method, RedirectTrace};

use super::{
    Known, VmRun, back_to, check_outer, encapsulated, ensure_to_uplink, into_vm, nvgre_parts, outer,
};

/// An answer back into the VM's port: a neighbour advertisement for a record of its VSID or
/// the router, the router's echo reply, or an `ICMPv6` error to the VM's own address.
fn check_answer(known: &Known, run: &VmRun) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        out,
        ..
    } = *run;
    ensure!(
        is_ipv6(out) && out.get(20) == Some(&58) && out.get(0..6) == Some(&mac[..]),
        "answered an IPv6 frame with something other than ICMPv6 to the VM"
    );
    let own = |a: Option<[u8; 16]>| record(known, vsid, a).is_some_and(|r| r.ifindex == port);
    match out.get(54).copied() {
        Some(136) => {
            let target = addr(out, 62);
            if let Some(rec) = record(known, vsid, target) {
                ensure!(
                    out.get(6..12) == Some(&rec.mac[..]),
                    "advertisement's MAC {:02x?}",
                    out.get(6..12)
                );
                ensure!(rec.ifindex != port, "advertised the VM's own address to it");
                return Ok(());
            }
            let target = target.context("no target")?;
            ensure!(
                known.router_address(vsid, target, false)
                    && out.get(6..12) == Some(&ROUTER_MAC[..])
                    && out.get(58).is_some_and(|f| f & 0x80 != 0),
                "advertised {target:02x?} for VSID {vsid}: no record, not the router's"
            );
        }
        Some(129) => ensure!(
            addr(out, 22).is_some_and(|a| known.router_address(vsid, a, true))
                && own(addr(out, 38))
                && out.get(6..12) == Some(&ROUTER_MAC[..]),
            "an echo reply not from the router to the VM's own address"
        ),
        Some(1 | 3) => ensure!(
            addr(out, 22).is_some_and(|a| known
                .gateways6
                .contains_key(&(known.domains.get(&vsid).copied().unwrap_or(0), a)))
                && own(addr(out, 38))
                && out.get(6..12) == Some(&ROUTER_MAC[..]),
            "the router's error not from a gateway of the VM's domain to its own address"
        ),
        Some(2) => ensure!(
            own(addr(out, 38)),
            "packet too big not to the VM's own address"
        ),
        other => bail!("answered with ICMPv6 type {other:?}"),
    }
    Ok(())
}

pub type Records = HashMap<LookupKey6, LookupValue>;

/// An IPv6 subnet of a routing domain: `prefix`/`len` is VSID `vsid`'s.
pub struct Subnet6 {
    pub domain: u32,
    pub prefix: [u8; 16],
    pub len: u32,
    pub vsid: u32,
}

impl Subnet6 {
    fn covers(&self, addr: [u8; 16]) -> bool {
        let mask = u128::MAX.checked_shl(128 - self.len).unwrap_or(0);
        u128::from_be_bytes(addr) & mask == u128::from_be_bytes(self.prefix)
    }
}

const ROUTER_MAC: [u8; 6] = nv_common::routing::DEFAULT_ROUTER_MAC;

impl Known {
    /// The VSID the subnet of `vsid`'s domain holding `addr` belongs to.
    fn subnet_of(&self, vsid: u32, addr: [u8; 16]) -> Option<u32> {
        let domain = self.domains.get(&vsid)?;
        self.routes6
            .iter()
            .filter(|s| s.domain == *domain && s.covers(addr))
            .max_by_key(|s| s.len)
            .map(|s| s.vsid)
    }

    /// Whether `addr` is the router's to a VM of `vsid`: a gateway of `vsid`'s subnets (for
    /// neighbour discovery, `any_subnet` false) or of its domain (echo), or the router's
    /// link-local address in a routed VSID.
    fn router_address(&self, vsid: u32, addr: [u8; 16], any_subnet: bool) -> bool {
        let Some(domain) = self.domains.get(&vsid) else {
            return false;
        };
        addr == nv_common::routing::router_link_local(ROUTER_MAC)
            || self
                .gateways6
                .get(&(*domain, addr))
                .is_some_and(|v| any_subnet || *v == vsid)
    }
}

pub fn is_ipv6(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x86, 0xdd][..])
}

fn addr(frame: &[u8], at: usize) -> Option<[u8; 16]> {
    frame.get(at..at + 16)?.try_into().ok()
}

fn record(known: &Known, vsid: u32, ca: Option<[u8; 16]>) -> Option<&LookupValue> {
    known.v6.get(&LookupKey6 { vsid, ca: ca? })
}

/// The upper-layer protocol and its first bytes, walking the extension headers RFC 8200 names
/// (as many as there are); `None` for a later fragment or a frame cut short.
fn upper_layer(frame: &[u8]) -> Option<(u8, &[u8])> {
    let mut next = *frame.get(20)?;
    let mut at = 54;
    loop {
        match next {
            0 | 43 | 60 => {
                let h = frame.get(at..at + 2)?;
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
            }
            51 => {
                let h = frame.get(at..at + 2)?;
                next = h[0];
                at += (usize::from(h[1]) + 2) * 4;
            }
            44 => {
                let h = frame.get(at..at + 4)?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = h[0];
                at += 8;
            }
            _ => return Some((next, frame.get(at..)?)),
        }
    }
}

/// A VM's IPv6 frame that was redirected (`run.ret` is a redirect); `bounced`: a segment back
/// from the bounce pair, which may only leave by NVGRE.
pub fn check_from_vm(known: &Known, run: &VmRun, bounced: bool) -> anyhow::Result<()> {
    let VmRun {
        port,
        vsid,
        mac,
        input,
        out,
        redirect,
        ..
    } = *run;
    if !bounced && redirect == Some(back_to(port)) {
        return check_answer(known, run);
    }
    let (src, dst) = (addr(input, 22), addr(input, 38));
    ensure!(
        record(known, vsid, src).is_some_and(|r| r.ifindex == port && r.mac == mac),
        "VSID {vsid} port {port} sent from {src:02x?}, not its own address"
    );
    match upper_layer(input) {
        Some((58, [kind, ..])) => ensure!(
            ![133, 134, 135, 136, 137].contains(kind),
            "ICMPv6 type {kind} (neighbour discovery) crossed"
        ),
        Some((17, [0x02, 0x23, ..])) => bail!("a DHCPv6 server's message crossed"),
        _ => {}
    }
    // To the router's MAC in a routed VSID: the destination's subnet's VSID, readdressed
    // by the router (its MAC to the record's, hop limit - 1).
    let routed =
        !bounced && input.get(0..6) == Some(&ROUTER_MAC[..]) && known.domains.contains_key(&vsid);
    let to_vsid = if routed {
        let dst = dst.context("no destination")?;
        known
            .subnet_of(vsid, dst)
            .with_context(|| format!("routed to {dst:02x?}, in no subnet of the domain"))?
    } else {
        vsid
    };
    let to = record(known, to_vsid, dst)
        .with_context(|| format!("sent to {dst:02x?}, no record of VSID {to_vsid}"))?;
    let expected = if routed {
        let mut e = input.to_vec();
        e[0..6].copy_from_slice(&to.mac);
        e[6..12].copy_from_slice(&ROUTER_MAC);
        e[21] = input[21]
            .checked_sub(1)
            .context("routed with hop limit 0")?;
        e
    } else {
        input.to_vec()
    };
    if encapsulated(input, out) {
        let (key_vsid, inner) = nvgre_parts(out).context("bad NVGRE out")?;
        ensure!(
            key_vsid == to_vsid && inner == expected.as_slice(),
            "NVGRE of VSID {key_vsid} for a VM of VSID {to_vsid}, or the frame is not the one \
             expected"
        );
        check_outer(known, run.port, out)?;
        let (outer_src, outer_dst, _) = outer(out).context("no outer header")?;
        ensure!(
            to.ifindex == 0 && outer_dst == to.pa && outer_src != outer_dst,
            "NVGRE to {outer_dst:?} for a record at {:02x?} (port {})",
            to.pa,
            to.ifindex
        );
        return ensure_to_uplink(known, redirect);
    }
    ensure!(!bounced, "a bounced IPv6 segment left by other than NVGRE");
    if to.method == Method::Rewrite as u8 {
        ensure!(!routed, "an IPv6 packet routed by rewrite");
        return check_rewritten(known, run, to);
    }
    ensure!(
        out == expected.as_slice() && to.ifindex != 0 && redirect == Some(into_vm(to.ifindex)),
        "IPv6 delivered as {redirect:?}, the record says port {}",
        to.ifindex
    );
    Ok(())
}

/// 1 for an IPv6 frame that went by IP rewrite: a VM's, readdressed and `redirected`; or on
/// the uplink, handed from XDP to TC, or redirected whole (restored, or answered).
pub fn rewritten(redirected: bool, input: &[u8], out: &[u8]) -> u64 {
    let marked = out.get(..4) == Some(&DeliverMeta::CLASSIFY.to_ne_bytes()[..]);
    let readdressed = redirected
        && is_ipv6(input)
        && outer(input).is_none()
        && outer(out).is_none()
        && addr(out, 22).is_some()
        && addr(out, 22) != addr(input, 22);
    u64::from(marked || readdressed)
}

/// Where the checksum of the upper layer `next` sits in it (TCP, UDP, `ICMPv6`).
fn checksum_at(next: u8) -> Option<usize> {
    match next {
        6 => Some(16),
        17 => Some(6),
        58 => Some(2),
        _ => None,
    }
}

/// Whether the upper layer's checksum of an IPv6 frame without extension headers is valid
/// (RFC 8200 8.1: the pseudo-header and the segment sum to all ones).
fn checksum_ok(frame: &[u8]) -> bool {
    let (Some(ip), Some(segment)) = (frame.get(14..54), frame.get(54..)) else {
        return false;
    };
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let Some(segment) = segment.get(..payload) else {
        return false;
    };
    let mut sum: u64 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            sum += (u64::from(pair[0]) << 8) | pair.get(1).map_or(0, |lo| u64::from(*lo));
        }
    };
    add(&ip[8..40]);
    add(&u32::try_from(segment.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, ip[6]]);
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// `a` and `b` are the same frame but for their IPv6 addresses, traffic class, the upper
/// layer's checksum and (`macs`) their Ethernet addresses.
fn same_but_addresses(a: &[u8], b: &[u8], macs: bool) -> bool {
    let Some(at) = a.get(20).copied().and_then(checksum_at) else {
        return false;
    };
    let skip = |i: usize| {
        (macs && i < 12)
            || (22..54).contains(&i)
            || i == 14
            || i == 15
            || i == 54 + at
            || i == 55 + at
    };
    a.len() == b.len()
        && a.get(15).map(|x| x & 0x0f) == b.get(15).map(|x| x & 0x0f)
        && a.iter()
            .zip(b)
            .enumerate()
            .all(|(i, (x, y))| skip(i) || x == y)
}

/// An IPv6 packet a VM sent to a VM reached by IP rewrite: from the sender's own rewrite PA
/// to the destination's, the rest unchanged but for the checksum, which is valid exactly when
/// the VM's was; out of the uplink.
fn check_rewritten(known: &Known, run: &VmRun, to: &LookupValue) -> anyhow::Result<()> {
    let (input, out) = (run.input, run.out);
    let from = record(known, run.vsid, addr(input, 22)).context("no sender record")?;
    ensure!(
        from.method == Method::Rewrite as u8 && to.ifindex == 0,
        "rewrite from a VM without its own rewrite PA, or to a VM here"
    );
    ensure!(
        addr(out, 22) == Some(from.pa) && addr(out, 38) == Some(to.pa),
        "rewritten to {:02x?} -> {:02x?}, the records say {:02x?} -> {:02x?}",
        addr(out, 22),
        addr(out, 38),
        from.pa,
        to.pa
    );
    ensure!(
        same_but_addresses(input, out, true),
        "rewrite changed more than the addresses, class and checksum"
    );
    ensure!(
        checksum_ok(input) == checksum_ok(out),
        "the checksum's validity changed in rewrite"
    );
    ensure_to_uplink(known, run.redirect)
}

/// What the uplink made of an IPv6 frame that is not NVGRE: handed from XDP to TC whole
/// (`out` behind a classify marker), an owned PA's neighbour advertisement, or an IPv6
/// rewrite packet restored for its VM. `None`: none of those.
pub fn rewrite_in(
    known: &Known,
    input: &[u8],
    out: &[u8],
    redirect: Option<RedirectTrace>,
) -> Option<anyhow::Result<()>> {
    let meta = std::mem::size_of::<DeliverMeta>();
    if out.get(..4) == Some(&DeliverMeta::CLASSIFY.to_ne_bytes()[..]) {
        return Some((|| {
            ensure!(
                out.get(meta..) == Some(input),
                "XDP changed a frame it handed to TC"
            );
            ensure!(
                solicits_owned(known, input) || restorable(known, input).is_some(),
                "XDP handed TC a frame that is neither a solicitation for an owned PA nor \
                 rewrite for a VM here"
            );
            Ok(())
        })());
    }
    if !is_ipv6(input) || outer(input).is_some() || redirect.is_none() {
        return None;
    }
    Some((|| {
        if redirect == Some(back_to(known.uplink)) {
            ensure!(
                solicits_owned(known, input),
                "answered a solicitation for no owned PA"
            );
            ensure!(
                out.get(54) == Some(&136)
                    && out.get(6..12) == Some(&known.uplink_mac[..])
                    && out.get(62..78) == input.get(62..78)
                    && addr(out, 22) == addr(input, 62)
                    && checksum_ok(out),
                "the answer is not the owned PA's advertisement from the uplink's MAC"
            );
            return Ok(());
        }
        let (from, to) =
            restorable(known, input).context("restored a frame that is not rewrite")?;
        ensure!(
            addr(out, 22) == Some(from.ca)
                && addr(out, 38) == Some(to.ca)
                && out.get(0..6) == Some(&to.mac[..])
                && out.get(6..12) == Some(&from.mac[..]),
            "restored to {:02x?} -> {:02x?}",
            addr(out, 22),
            addr(out, 38)
        );
        ensure!(
            same_but_addresses(input, out, true) && checksum_ok(input) == checksum_ok(out),
            "restore changed more than the addresses and the checksum, or broke it"
        );
        ensure!(
            redirect == Some(into_vm(to.ifindex)),
            "restored for port {} as {redirect:?}",
            to.ifindex
        );
        Ok(())
    })())
}

/// A neighbour solicitation (on the link) for a PA the datapath owns.
fn solicits_owned(known: &Known, input: &[u8]) -> bool {
    is_ipv6(input)
        && input.get(20) == Some(&58)
        && input.get(21) == Some(&255)
        && input.get(54) == Some(&135)
        && addr(input, 62).is_some_and(|t| known.owned6.contains(&t))
}

/// The rewrite PAs of an IPv6 rewrite packet for a VM here: from a rewrite PA of the same
/// VSID on another host, to the uplink's MAC.
fn restorable<'a>(
    known: &'a Known,
    input: &[u8],
) -> Option<(&'a nv_common::RewritePa, &'a nv_common::RewritePa)> {
    let to = known.rewrite6.get(&addr(input, 38)?)?;
    let from = known.rewrite6.get(&addr(input, 22)?)?;
    (to.ifindex != 0
        && from.ifindex == 0
        && from.vsid == to.vsid
        && input.get(0..6) == Some(&known.uplink_mac[..]))
    .then_some((from, to))
}

/// NVGRE from the uplink whose inner frame is IPv6, delivered to `port` (`redirect`: how, for
/// TC; `None` for XDP, which hands over in metadata).
pub fn check_delivered(
    known: &Known,
    input: &[u8],
    port: u32,
    redirect: Option<RedirectTrace>,
) -> anyhow::Result<()> {
    let (vsid, inner) = nvgre_parts(input).context("delivered a frame that is not NVGRE")?;
    ensure!(is_ipv6(inner), "delivered IPv6 that is not");
    let to = record(known, vsid, addr(inner, 38)).context("delivered to no record")?;
    ensure!(
        to.ifindex == port && port != 0 && redirect.is_none_or(|r| r == into_vm(port)),
        "VSID {vsid} delivered to port {port} ({redirect:?}), its record says {}",
        to.ifindex
    );
    ensure!(
        !matches!((inner.get(20), inner.get(54)), (Some(58), Some(133..=137))),
        "neighbour discovery crossed between hosts"
    );
    let (outer_src, _, _) = outer(input).context("not NVGRE")?;
    // The source's record in this VSID; or, routed by its host, in another VSID of the same
    // domain, from the router's MAC.
    let src = addr(inner, 22);
    let (from, mac) = match record(known, vsid, src) {
        Some(r) => (r, r.mac),
        None => known
            .v6
            .iter()
            .find(|(k, _)| Some(k.ca) == src && k.vsid != vsid && known.same_domain(k.vsid, vsid))
            .map(|(_, r)| (r, ROUTER_MAC))
            .context("from no record of the VSID or its domain")?,
    };
    let router_here =
        known.domains.contains_key(&vsid) && inner.get(6..12) == Some(&ROUTER_MAC[..]);
    ensure!(
        from.pa == outer_src
            && from.ifindex == 0
            && (inner.get(6..12) == Some(&mac[..]) || router_here),
        "VSID {vsid} delivered from {outer_src:?} with MAC {:02x?}, the source's record says \
         {:02x?} {:02x?}",
        inner.get(6..12),
        from.pa,
        from.mac
    );
    Ok(())
}

/// What XDP handed up with IPv6 delivery metadata in front (`None`: no such metadata).
pub fn delivered_by_xdp(known: &Known, input: &[u8], out: &[u8]) -> Option<anyhow::Result<()>> {
    let meta = std::mem::size_of::<DeliverMeta6>();
    let word = |i: usize| Some(u32::from_ne_bytes(out.get(i..i + 4)?.try_into().ok()?));
    if word(0)? != DeliverMeta6::MAGIC || out.len() < meta {
        return None;
    }
    Some((|| {
        let (port, vsid) = (word(4).unwrap_or(0), word(8).unwrap_or(0));
        let (key_vsid, inner) =
            nvgre_parts(input).context("delivered a frame that is not NVGRE")?;
        ensure!(
            out[meta..] == *inner && vsid == key_vsid,
            "decapsulated IPv6 frame, or its VSID, differs"
        );
        check_delivered(known, input, port, None)
    })())
}

/// Whether `out` is the IPv6 frame the NVGRE packet `input` carried.
pub fn decapsulated(input: &[u8], out: &[u8]) -> bool {
    nvgre_parts(input).is_some_and(|(_, inner)| out == inner && is_ipv6(inner))
}

/// 1 for a VM's IPv6 frame that was `redirected` other than as a neighbour advertisement.
pub fn forwarded(redirected: bool, input: &[u8], out: &[u8]) -> u64 {
    u64::from(redirected && is_ipv6(input) && out.get(54) != Some(&136))
}

/// 1 for a VM's IPv6 frame to the router's MAC that left by NVGRE: routed.
pub fn routed(redirected: bool, input: &[u8], out: &[u8]) -> u64 {
    u64::from(
        redirected
            && is_ipv6(input)
            && input.get(0..6) == Some(&ROUTER_MAC[..])
            && encapsulated(input, out),
    )
}
