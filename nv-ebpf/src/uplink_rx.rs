//! What a frame arriving on the uplink is, decided the same way by the XDP hook and, when the
//! agent runs decapsulation on TC, by the TC hook: NVGRE for a VM here, IP rewrite for a VM
//! here, or not ours (passed untouched, so the host's own traffic keeps working). Malformed or
//! unknown tenant traffic is an `Err` carrying its drop reason.
use nv_common::{
    Counter, DatapathConfig, LookupKey, RestoreMeta, RewritePa,
    wire::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_TEB, GRE_FLAGS_NVGRE, GRE_HLEN,
        IPPROTO_GRE, IPPROTO_ICMP, IPV4_HLEN,
    },
};

use crate::{
    maps::{HOSTED_VSIDS, LOCAL_PAS, LOOKUPS, REWRITE_PAS},
    packet::{EthHdr, GreHdr, Ipv4Hdr, read_at, v4_of, view_at},
};

pub enum Verdict {
    /// Not tenant traffic for this host.
    Pass,
    /// NVGRE for the VM behind `port`, whose PA is `pa`; the customer's frame starts `strip`
    /// bytes in.
    Nvgre {
        strip: usize,
        port: u32,
        pa: [u8; 4],
        vsid: u32,
        ca: [u8; 4],
    },
    /// IP rewrite for a VM here: how to restore it.
    Rewrite(RestoreMeta),
}

/// Classifies the frame in `[data, end)` under `config`.
#[inline(always)]
pub fn classify(config: &DatapathConfig, data: usize, end: usize) -> Result<Verdict, Counter> {
    let Some(eth) = view_at::<EthHdr>(data, end, 0) else {
        return Ok(Verdict::Pass);
    };
    if eth.proto() != ETH_P_IP {
        return Ok(Verdict::Pass);
    }
    let Some(ip) = view_at::<Ipv4Hdr>(data, end, ETH_HLEN) else {
        return Ok(Verdict::Pass);
    };
    let hlen = ip.hlen();
    if ip.ver_ihl >> 4 != 4 || hlen < 20 {
        return Ok(Verdict::Pass);
    }
    // A PA dedicated to a local VM carries only that VM's IP-rewrite traffic, whatever its
    // protocol. The filter keeps the lookup off every other packet, host traffic first.
    if config.may_be_rewrite_pa(ip.dst) {
        // SAFETY: read-only use of a value the agent replaces whole.
        if let Some(dst) = unsafe { REWRITE_PAS.get(ip.dst) }
            && dst.ifindex != 0
        {
            return rewrite(ip, dst);
        }
    }
    if ip.proto != IPPROTO_GRE {
        return Ok(Verdict::Pass);
    }
    // GRE to an address that is not one of our PAs belongs to some other user of the host:
    // not ours to judge. Asked only when the answer matters (a drop, or a destination record
    // whose PA is not the outer destination), so a valid packet pays no lookup for it.
    let ours = || {
        // SAFETY: presence check only.
        unsafe { LOCAL_PAS.get(ip.dst) }.is_some()
    };
    match nvgre(config, data, end, ip, hlen) {
        Ok(Verdict::Nvgre { pa, .. }) if pa != ip.dst && !ours() => Ok(Verdict::Pass),
        Ok(v) => Ok(v),
        Err(_) if !ours() => Ok(Verdict::Pass),
        Err(reason) => Err(reason),
    }
}

/// NVGRE, whoever it is addressed to: the caller decides whether the outer destination is ours.
#[inline(always)]
fn nvgre(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    ip: &Ipv4Hdr,
    hlen: usize,
) -> Result<Verdict, Counter> {
    let gre_off = ETH_HLEN + hlen;
    let gre: &GreHdr = view_at(data, end, gre_off).ok_or(Counter::DropUplinkMalformed)?;
    if u16::from_be_bytes(gre.proto) != ETH_P_TEB {
        // GRE for another user of this address (not NVGRE): not ours to judge.
        return Ok(Verdict::Pass);
    }
    if u16::from_be_bytes(gre.flags) != GRE_FLAGS_NVGRE {
        return Err(Counter::DropUplinkGreFlags);
    }
    if ip.is_fragment() {
        return Err(Counter::DropUplinkFragment);
    }
    // Unicast to this host's uplink: never a copy flooded to it, or one seen promiscuously.
    let outer_eth: &EthHdr = view_at(data, end, 0).ok_or(Counter::DropUplinkMalformed)?;
    if config.uplink_mac != [0; 6] && outer_eth.dst != config.uplink_mac {
        return Err(Counter::DropUplinkNotOurMac);
    }
    // The outer packet must at least hold what it claims to carry: GRE and an inner Ethernet
    // and IPv4 header.
    if usize::from(u16::from_be_bytes(ip.tot_len)) < hlen + GRE_HLEN + ETH_HLEN + IPV4_HLEN {
        return Err(Counter::DropUplinkMalformed);
    }
    let key: [u8; 4] = read_at(data, end, gre_off + 4).ok_or(Counter::DropUplinkMalformed)?;
    let vsid = u32::from_be_bytes(key) >> 8;

    let inner = gre_off + GRE_HLEN;
    let inner_eth: &EthHdr = view_at(data, end, inner).ok_or(Counter::DropUplinkMalformed)?;
    match inner_eth.proto() {
        ETH_P_IP => {}
        ETH_P_8021Q | ETH_P_8021AD => return Err(Counter::DropUplinkInnerVlan),
        _ => return Err(Counter::DropUplinkInnerNotIp),
    }
    let inner_ip: &Ipv4Hdr =
        view_at(data, end, inner + ETH_HLEN).ok_or(Counter::DropUplinkMalformed)?;
    // A header the VM's stack would take: version 4, a header length that holds the header,
    // a total length that holds the header, and (without options) a good checksum.
    let inner_hlen = inner_ip.hlen();
    if inner_ip.ver_ihl >> 4 != 4
        || inner_hlen < IPV4_HLEN
        || usize::from(u16::from_be_bytes(inner_ip.tot_len)) < inner_hlen
        || (inner_hlen == IPV4_HLEN && inner_ip.checksum() != u16::from_be_bytes(inner_ip.csum))
    {
        return Err(Counter::DropUplinkInnerMalformed);
    }
    let lookup = LookupKey {
        vsid,
        ca: inner_ip.dst,
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    let Some(dst) = (unsafe { LOOKUPS.get(lookup) }) else {
        // SAFETY: presence check only.
        return Err(if unsafe { HOSTED_VSIDS.get(vsid) }.is_none() {
            Counter::DropUplinkVsidNotHosted
        } else {
            Counter::DropUplinkUnknownDst
        });
    };
    if dst.ifindex == 0 {
        return Err(Counter::DropUplinkNotLocal);
    }
    // The sender must be a CA of this VSID, behind the PA and with the MAC its record says:
    // another host cannot speak for a tenant it does not host.
    let source = LookupKey {
        vsid,
        ca: inner_ip.src,
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    let src = unsafe { LOOKUPS.get(source) }.ok_or(Counter::DropUplinkSpoofedPa)?;
    if v4_of(&src.pa) != Some(ip.src) {
        return Err(Counter::DropUplinkSpoofedPa);
    }
    if inner_eth.src != src.mac {
        return Err(Counter::DropUplinkSpoofedMac);
    }
    Ok(Verdict::Nvgre {
        strip: inner,
        port: dst.ifindex,
        pa: v4_of(&dst.pa).unwrap_or_default(),
        vsid,
        ca: lookup.ca,
    })
}

/// An IP-rewrite packet for a local VM: the source PA must be the dedicated PA of a CA in the
/// same VSID.
#[inline(always)]
fn rewrite(ip: &Ipv4Hdr, dst: &RewritePa) -> Result<Verdict, Counter> {
    // SAFETY: read-only use of a value the agent replaces whole.
    let Some(src) = (unsafe { REWRITE_PAS.get(ip.src) }) else {
        // An underlay router's ICMP error about something sent from this PA is not spoofing,
        // and it is not the tenant's either.
        return Err(if ip.proto == IPPROTO_ICMP {
            Counter::DropUplinkRewriteIcmp
        } else {
            Counter::DropUplinkRewriteUnknownSrc
        });
    };
    if src.vsid != dst.vsid {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    }
    let (Some(src_ca), Some(dst_ca)) = (v4_of(&src.ca), v4_of(&dst.ca)) else {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    };
    Ok(Verdict::Rewrite(RestoreMeta {
        magic: RestoreMeta::MAGIC,
        ifindex: dst.ifindex,
        vsid: dst.vsid,
        src_ca,
        dst_ca,
        src_mac: src.mac,
        dst_mac: dst.mac,
    }))
}
