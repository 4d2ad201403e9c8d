//! What the underlay must look like, checked on captures decoded by tshark.
use anyhow::ensure;

use crate::{
    capture::{self, Capture, Decoded},
    testbed::TwoHosts,
};

/// Captures the underlay bridge while `traffic` runs and decodes it.
pub fn underlay_during(
    bed: &TwoHosts,
    tag: &str,
    traffic: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Decoded>> {
    let file = bed.tmp_dir().join(format!("{tag}.pcap"));
    let cap = Capture::start(&bed.underlay, "br0", &file, 120)?;
    traffic()?;
    capture::decode(&cap.stop()?)
}

/// No customer address may appear outside a tunnel; returns the packets whose outermost
/// addresses are both in `pas` (the rest is the namespaces' own control traffic, like IGMP).
fn between<'a>(
    tag: &str,
    packets: &'a [Decoded],
    pas: &[&str],
) -> anyhow::Result<Vec<&'a Decoded>> {
    let mut out = Vec::new();
    for p in packets {
        let (Some(src), Some(dst)) = (p.ip_src.first(), p.ip_dst.first()) else {
            continue;
        };
        ensure!(
            !src.starts_with("10.") && !dst.starts_with("10."),
            "{tag}: a customer address on the underlay: {p:?}"
        );
        if pas.contains(&src.as_str()) && pas.contains(&dst.as_str()) {
            out.push(p);
        }
    }
    Ok(out)
}

/// During `traffic`, every IPv4 packet between the hosts' PAs is NVGRE keyed with `vsid`
/// with customer addresses inside; returns how many there were.
pub fn underlay_is_nvgre(
    bed: &TwoHosts,
    tag: &str,
    vsid: u32,
    traffic: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let packets = underlay_during(bed, tag, traffic)?;
    let tunnelled = between(tag, &packets, &["198.18.0.1", "198.18.0.2"])?;
    for p in &tunnelled {
        ensure!(
            p.gre_key.is_some(),
            "{tag}: non-NVGRE packet between the PAs: {p:?}"
        );
        ensure!(
            p.gre_proto == Some(0x6558),
            "{tag}: GRE protocol is not TEB: {p:?}"
        );
        let key = p.gre_key.unwrap_or(0);
        ensure!(
            key >> 8 == vsid,
            "{tag}: VSID {} in the GRE key, expected {vsid}: {p:?}",
            key >> 8
        );
        ensure!(
            p.ip_src.len() == 2 && p.ip_dst.len() == 2,
            "{tag}: expected outer and inner IPv4: {p:?}"
        );
        ensure!(
            p.ip_src[1].starts_with("10.0.0.") && p.ip_dst[1].starts_with("10.0.0."),
            "{tag}: inner addresses: {p:?}"
        );
        ensure!(
            p.ip_checksum_ok.first() == Some(&true),
            "{tag}: outer IPv4 checksum not valid per tshark: {p:?}"
        );
    }
    Ok(tunnelled.len())
}

/// `from` pings 10.0.0.2 five times: every ping is answered and the 10 packets ride the
/// underlay as NVGRE keyed with `vsid`.
pub fn pings_over_nvgre(bed: &TwoHosts, from: &str, vsid: u32) -> anyhow::Result<()> {
    let seen = underlay_is_nvgre(bed, &format!("{from}-ping"), vsid, || {
        ensure!(
            bed.ping(from, "10.0.0.2", 5)? == 5,
            "{from} -> 10.0.0.2 lost pings"
        );
        Ok(())
    })?;
    ensure!(
        seen >= 10,
        "expected 5 requests and 5 replies of {from} on the underlay, saw {seen}"
    );
    Ok(())
}

/// During `traffic`, every packet between the rewrite PAs is plain IPv4 (no GRE, one IPv4
/// header) with a valid header checksum, and, when `l4_checksums` (the senders compute full
/// checksums), valid TCP/UDP checksums; returns how many there were.
pub fn underlay_is_rewrite(
    bed: &TwoHosts,
    tag: &str,
    pas: [&str; 2],
    l4_checksums: bool,
    traffic: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let packets = underlay_during(bed, tag, traffic)?;
    let plain = between(tag, &packets, &pas)?;
    for p in &plain {
        ensure!(
            p.gre_key.is_none() && !p.protocols.contains("gre"),
            "{tag}: GRE between rewrite PAs: {p:?}"
        );
        ensure!(
            p.ip_src.len() == 1,
            "{tag}: more than one IPv4 header: {p:?}"
        );
        ensure!(
            p.ip_checksum_ok.first() == Some(&true),
            "{tag}: IPv4 checksum not valid per tshark: {p:?}"
        );
        if l4_checksums && let Some(status) = p.l4_checksum_status {
            ensure!(
                status == 1,
                "{tag}: TCP/UDP checksum not valid per tshark: {p:?}"
            );
        }
    }
    Ok(plain.len())
}

/// Isolation seen from inside a VM: while `from` pings 10.0.0.2, `watcher` (another tenant's
/// VM that has the same address) captures its `eth0`. A ping from `control` (the watcher's own
/// tenant) runs in the same capture, to prove it sees traffic at all. Returns (frames from
/// `from` the watcher saw, which must be none; frames from `control`).
pub fn frames_seen_by(
    bed: &TwoHosts,
    watcher: &str,
    from: &str,
    control: &str,
) -> anyhow::Result<(usize, usize)> {
    frames_from(bed, &bed.vm(watcher).ns, "eth0", "10.0.0.2", from, control)
}

/// Frames from VMs `from` and `control` (by source MAC) a capture on `iface` in `ns` sees
/// while each of them pings `dst` three times, all of which must be answered: (from `from`,
/// from `control`).
pub fn frames_from(
    bed: &TwoHosts,
    ns: &crate::netns::Netns,
    iface: &str,
    dst: &str,
    from: &str,
    control: &str,
) -> anyhow::Result<(usize, usize)> {
    let file = bed
        .tmp_dir()
        .join(format!("{}-{iface}-watch.pcap", ns.name));
    let cap = Capture::start(ns, iface, &file, 30)?;
    for vm in [from, control] {
        ensure!(bed.ping(vm, dst, 3)? == 3, "{vm} -> {dst} lost pings");
    }
    let frames = capture::frames(&cap.stop()?)?;
    let count = |name: &str| -> anyhow::Result<usize> {
        let mac: nv_agent::model::Mac = bed.vm(name).mac.parse()?;
        Ok(frames
            .iter()
            .filter(|f| f.len() >= 12 && f[6..12] == mac.0)
            .count())
    };
    Ok((count(from)?, count(control)?))
}
