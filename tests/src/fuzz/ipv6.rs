//! The fuzzer's IPv6 properties: what leaves a VM's port is a neighbour advertisement for a
//! record of its own VSID, or its own packet (from its own address, never a router's message)
//! to a record of its VSID, by NVGRE or into a VM here; what the uplink delivers is NVGRE of a
//! VSID for a VM here, from the PA and MAC of the source's record. An independent reading of
//! the frames, not the datapath's code.
use std::collections::HashMap;

use anyhow::{Context as _, bail, ensure};
use nv_common::{DeliverMeta6, LookupKey6, LookupValue, RedirectTrace, v4_mapped};

use super::{Known, VmRun, back_to, ensure_to_uplink, into_vm, ipv4, nvgre_parts};

pub type Records = HashMap<LookupKey6, LookupValue>;

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
        ensure!(
            is_ipv6(out) && out.get(20) == Some(&58) && out.get(54) == Some(&136),
            "answered an IPv6 frame with something other than an advertisement"
        );
        let target = addr(out, 62);
        let rec = record(known, vsid, target)
            .with_context(|| format!("advertised {target:02x?}, no record of VSID {vsid}"))?;
        ensure!(
            out.get(6..12) == Some(&rec.mac[..]) && out.get(0..6) == Some(&mac[..]),
            "advertisement's MACs {:02x?}",
            out.get(0..12)
        );
        ensure!(rec.ifindex != port, "advertised the VM's own address to it");
        return Ok(());
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
    let to = record(known, vsid, dst)
        .with_context(|| format!("sent to {dst:02x?}, no record of VSID {vsid}"))?;
    if out.len() == input.len() + 42 && out.get(23) == Some(&47) {
        let (key_vsid, inner) = nvgre_parts(out).context("bad NVGRE out")?;
        ensure!(
            key_vsid == vsid && inner == input,
            "NVGRE of VSID {key_vsid} for a VM of VSID {vsid}, or the frame changed"
        );
        let (outer_src, outer_dst) = ipv4(out, 14).context("no outer IPv4")?;
        ensure!(
            to.ifindex == 0 && v4_mapped(outer_dst) == to.pa && outer_src != outer_dst,
            "NVGRE to {outer_dst:?} for a record at {:02x?} (port {})",
            to.pa,
            to.ifindex
        );
        return ensure_to_uplink(known, redirect);
    }
    ensure!(!bounced, "a bounced IPv6 segment left by other than NVGRE");
    ensure!(
        out == input && to.ifindex != 0 && redirect == Some(into_vm(to.ifindex)),
        "IPv6 delivered as {redirect:?}, the record says port {}",
        to.ifindex
    );
    Ok(())
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
    let (outer_src, _) = ipv4(input, 14).context("no outer IPv4")?;
    let from = record(known, vsid, addr(inner, 22)).context("from no record")?;
    ensure!(
        from.pa == v4_mapped(outer_src)
            && from.ifindex == 0
            && inner.get(6..12) == Some(&from.mac[..]),
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
    input.get(23) == Some(&47)
        && nvgre_parts(input).is_some_and(|(_, inner)| out == inner && is_ipv6(inner))
}

/// 1 for a VM's IPv6 frame that was `redirected` other than as a neighbour advertisement.
pub fn forwarded(redirected: bool, input: &[u8], out: &[u8]) -> u64 {
    u64::from(redirected && is_ipv6(input) && out.get(54) != Some(&136))
}
