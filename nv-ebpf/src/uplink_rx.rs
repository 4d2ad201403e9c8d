//! What a frame arriving on the uplink is, decided the same way by the XDP hook and, when the
//! agent runs decapsulation on TC, by the TC hook: NVGRE for a VM here, IP rewrite for a VM
//! here, an ARP request for a rewrite PA the datapath owns, or not ours (passed untouched, so
//! the host's own traffic keeps working). Malformed or unknown tenant traffic is an `Err`
//! carrying its drop reason, and so is anything to or from a rewrite PA that is not a local
//! VM's rewrite traffic: those addresses are the datapath's, never the host's.
//!
//! Frames are classified after their VLAN tags: the one the kernel moved into the skb's
//! metadata (`tagged`) and up to two still in the frame. nv's underlay is untagged, so tenant
//! traffic that arrives tagged is dropped; the kernel would strip a priority tag (VID 0) after
//! the hook and hand the packet to the host's stack.
use nv_common::{
    Addr, Counter, DatapathConfig, LookupKey, LookupKey6, LookupValue, RestoreMeta, RewritePa,
    wire::{
        DHCPV6_CLIENT_PORT, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6,
        ETH_P_TEB, GRE_FLAGS_NVGRE, GRE_HLEN, IPPROTO_FRAGMENT, IPPROTO_GRE, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, ND_REDIRECT, ND_ROUTER_SOLICIT,
    },
};

use crate::{
    maps::{HOSTED_VSIDS, LOCAL_PAS, LOCAL_PAS6, LOOKUPS, LOOKUPS6, REWRITE_PAS, REWRITE_PAS6},
    packet::{EthHdr, GreHdr, Ipv4Hdr, Ipv6Hdr, read_at, v4_of, view_at},
    router,
};

pub enum Verdict {
    /// Not tenant traffic for this host.
    Pass,
    /// NVGRE for the VM behind `port`; the customer's frame starts `strip`
    /// bytes in. The VM is named by its IPv4 `ca`, or (`v6`: an IPv6 frame) by its `mac`.
    Nvgre {
        strip: usize,
        port: u32,
        /// The outer destination is the PA of the VM the frame is for.
        at_pa: bool,
        vsid: u32,
        ca: [u8; 4],
        mac: [u8; 6],
        v6: bool,
    },
    /// IP rewrite for a VM here: how to restore it.
    Rewrite(RestoreMeta),
    /// IPv6 rewrite from the VM of `from` (another host's) to the VM of `to` (here).
    Rewrite6 {
        from: &'static RewritePa,
        to: &'static RewritePa,
    },
    /// A neighbour solicitation for an IPv6 PA the datapath owns: answer it (`uplink_nd`).
    NdRequest,
    /// An ARP request for a PA the datapath owns: answer it (`uplink_arp`).
    ArpRequest,
}

/// VLAN tags looked through in the frame: 802.1ad and 802.1Q, as a priority-tagged or
/// double-tagged frame has them.
const TAGS: usize = 2;

/// Classifies the frame in `[data, end)` under `config`; `tagged`: the kernel took a VLAN
/// tag out of the frame into the skb's metadata.
#[inline(always)]
pub fn classify(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    tagged: bool,
) -> Result<Verdict, Counter> {
    let Some(eth) = view_at::<EthHdr>(data, end, 0) else {
        return Ok(Verdict::Pass);
    };
    let proto = eth.proto();
    if !tagged && proto == ETH_P_IP {
        return classify_ipv4(config, data, end, ETH_HLEN);
    }
    if !tagged && proto == ETH_P_IPV6 {
        return classify_ipv6(config, data, end, ETH_HLEN);
    }
    if !tagged && proto == ETH_P_ARP {
        return Ok(if crate::uplink_arp::is_request_for_owned(data, end) {
            Verdict::ArpRequest
        } else {
            Verdict::Pass
        });
    }
    if is_tenant_traffic_tagged(config, data, end, proto) {
        return Err(Counter::DropUplinkVlan);
    }
    Ok(Verdict::Pass)
}

/// Whether a frame that carries VLAN tags (or none, and is neither IPv4 nor ARP) holds an
/// IPv4 packet nv would take, or drop, were it untagged: tenant traffic, never tagged.
// Out of line, returning a scalar: a BPF subprogram cannot hand back an aggregate.
#[inline(never)]
fn is_tenant_traffic_tagged(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    mut proto: u16,
) -> bool {
    let mut l3 = ETH_HLEN;
    for _ in 0..TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let Some(tag) = read_at::<[u8; 4]>(data, end, l3) else {
            return false;
        };
        proto = u16::from_be_bytes([tag[2], tag[3]]);
        l3 += 4;
    }
    let verdict = match proto {
        ETH_P_IP => classify_ipv4(config, data, end, l3),
        ETH_P_IPV6 => classify_ipv6(config, data, end, l3),
        _ => return false,
    };
    !matches!(verdict, Ok(Verdict::Pass))
}

/// The IPv4 packet at `l3`.
#[inline(always)]
fn classify_ipv4(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    l3: usize,
) -> Result<Verdict, Counter> {
    let Some(ip) = view_at::<Ipv4Hdr>(data, end, l3) else {
        return Ok(Verdict::Pass);
    };
    let hlen = ip.hlen();
    if ip.ver_ihl >> 4 != 4 || hlen < 20 {
        return Ok(Verdict::Pass);
    }
    // A rewrite PA of this host carries only its VM's IP-rewrite traffic, whatever its
    // protocol. The filter keeps the lookup off every other packet, host traffic first.
    if config.may_be_rewrite_pa(ip.dst) {
        // SAFETY: read-only use of a value the agent replaces whole.
        if let Some(dst) = unsafe { REWRITE_PAS.get(ip.dst) } {
            if dst.ifindex != 0 {
                return rewrite(config, data, end, ip, dst);
            }
            // Another host's VM's: never this host's to take.
            return Err(Counter::DropUplinkRewriteNoVm);
        }
        // SAFETY: read-only use of a value the agent replaces whole.
        if unsafe { LOCAL_PAS.get(ip.dst) }.is_some_and(nv_common::LocalPa::is_owned) {
            // Its record was deleted or moved away; the address stays the datapath's.
            return Err(Counter::DropUplinkRewriteNoVm);
        }
    }
    if ip.proto == IPPROTO_GRE {
        return classify_gre(config, data, end, ip, l3 + hlen);
    }
    ip.not_ours()
}

/// The IPv6 packet at `l3`: NVGRE over an IPv6 underlay, or not ours. The outer header must
/// be plain: GRE right after it. A fragment of GRE to one of our PAs is dropped, as an IPv4
/// one is; any other extension header means the host's own traffic (or none of ours).
#[inline(always)]
fn classify_ipv6(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    l3: usize,
) -> Result<Verdict, Counter> {
    let Some(ip) = view_at::<Ipv6Hdr>(data, end, l3) else {
        return Ok(Verdict::Pass);
    };
    if ip.version() != 6 {
        return Ok(Verdict::Pass);
    }
    if crate::uplink_nd::is_solicitation_for_owned(data, end, ip, l3) {
        return Ok(Verdict::NdRequest);
    }
    // An IPv6 rewrite PA of this host carries only its VM's rewrite traffic, as IPv4's does.
    if config.may_be_rewrite_pa(DatapathConfig::filter_key6(&ip.dst)) {
        // SAFETY: read-only use of a value the agent replaces whole.
        if let Some(dst) = unsafe { REWRITE_PAS6.get(ip.dst) } {
            if dst.ifindex != 0 {
                return rewrite6(config, data, end, ip, dst);
            }
            return Err(Counter::DropUplinkRewriteNoVm);
        }
        // SAFETY: as above.
        if unsafe { LOCAL_PAS6.get(ip.dst) }.is_some_and(nv_common::LocalPa::is_owned) {
            return Err(Counter::DropUplinkRewriteNoVm);
        }
    }
    // Neighbour discovery on the link, also from an owned PA (`uplink_nd` answering for it,
    // on another host): the host's stack resolves the underlay's next hops with it.
    if crate::uplink_nd::is_discovery(data, end, ip, l3) {
        // From a rewrite PA, only another host's datapath answering for it: an
        // advertisement of itself. Anything else from it is no host's to take.
        // SAFETY: presence check only.
        if unsafe { REWRITE_PAS6.get(ip.src) }.is_some()
            && !crate::uplink_nd::advertises_itself(data, end, ip, l3)
        {
            return Err(Counter::DropUplinkFromRewritePa);
        }
        return Ok(Verdict::Pass);
    }
    match ip.next {
        IPPROTO_GRE => classify_gre(config, data, end, ip, l3 + IPV6_HLEN),
        IPPROTO_FRAGMENT => {
            let carries_gre =
                read_at::<[u8; 4]>(data, end, l3 + IPV6_HLEN).is_some_and(|h| h[0] == IPPROTO_GRE);
            if carries_gre && ip.to_us() {
                Err(Counter::DropUplinkFragment)
            } else {
                ip.not_ours()
            }
        }
        _ => ip.not_ours(),
    }
}

/// The outer IP header of NVGRE, IPv4 or IPv6: what the checks ask of it.
trait Outer {
    /// Bytes the header says follow it.
    fn carried(&self) -> usize;
    /// A fragment (IPv6 ones never get this far).
    fn is_fragment(&self) -> bool;
    /// The packet comes from `pa` (a record's, 16-byte form).
    fn sent_from(&self, pa: &Addr) -> bool;
    /// The packet is addressed to `pa`.
    fn sent_to(&self, pa: &Addr) -> bool;
    /// The destination is one of this host's PAs.
    fn to_us(&self) -> bool;
    /// What becomes of a packet that is not NVGRE for a VM here: host traffic passes;
    /// anything to or from a rewrite PA this host knows does not.
    fn not_ours(&self) -> Result<Verdict, Counter>;
}

impl Outer for Ipv4Hdr {
    #[inline(always)]
    fn carried(&self) -> usize {
        usize::from(u16::from_be_bytes(self.tot_len)).saturating_sub(self.hlen())
    }

    #[inline(always)]
    fn is_fragment(&self) -> bool {
        Ipv4Hdr::is_fragment(self)
    }

    #[inline(always)]
    fn sent_from(&self, pa: &Addr) -> bool {
        v4_of(pa) == Some(self.src)
    }

    #[inline(always)]
    fn sent_to(&self, pa: &Addr) -> bool {
        v4_of(pa) == Some(self.dst)
    }

    #[inline(always)]
    fn to_us(&self) -> bool {
        // SAFETY: presence check only.
        unsafe { LOCAL_PAS.get(self.dst) }.is_some()
    }

    #[inline(always)]
    fn not_ours(&self) -> Result<Verdict, Counter> {
        // SAFETY: presence checks only.
        if unsafe { REWRITE_PAS.get(self.src) }.is_some() {
            return Err(Counter::DropUplinkFromRewritePa);
        }
        // SAFETY: as above.
        if unsafe { REWRITE_PAS.get(self.dst) }.is_some() {
            return Err(Counter::DropUplinkRewriteNoVm);
        }
        Ok(Verdict::Pass)
    }
}

/// Whether the outer IPv6 address `addr` is the PA `pa`. An IPv4 PA is held IPv4-mapped: an
/// IPv6 header naming it is never its.
#[inline(always)]
fn names_pa(addr: &Addr, pa: &Addr) -> bool {
    *pa == *addr && v4_of(pa).is_none()
}

impl Outer for Ipv6Hdr {
    #[inline(always)]
    fn carried(&self) -> usize {
        usize::from(u16::from_be_bytes(self.payload_len))
    }

    #[inline(always)]
    fn is_fragment(&self) -> bool {
        false
    }

    #[inline(always)]
    fn sent_from(&self, pa: &Addr) -> bool {
        names_pa(&self.src, pa)
    }

    #[inline(always)]
    fn sent_to(&self, pa: &Addr) -> bool {
        names_pa(&self.dst, pa)
    }

    #[inline(always)]
    fn to_us(&self) -> bool {
        // SAFETY: presence check only.
        unsafe { LOCAL_PAS6.get(self.dst) }.is_some()
    }

    #[inline(always)]
    fn not_ours(&self) -> Result<Verdict, Counter> {
        // SAFETY: presence checks only.
        if unsafe { REWRITE_PAS6.get(self.src) }.is_some() {
            return Err(Counter::DropUplinkFromRewritePa);
        }
        // SAFETY: as above.
        if unsafe { REWRITE_PAS6.get(self.dst) }.is_some() {
            return Err(Counter::DropUplinkRewriteNoVm);
        }
        Ok(Verdict::Pass)
    }
}

/// GRE: NVGRE for a VM here, or some other user's GRE (passed), or neither (dropped when it
/// is addressed to one of our PAs).
#[inline(always)]
fn classify_gre<O: Outer>(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    ip: &O,
    gre_off: usize,
) -> Result<Verdict, Counter> {
    // GRE to an address that is not one of our PAs belongs to some other user of the host:
    // not ours to judge. Asked only when the answer matters (a drop, or a destination record
    // whose PA is not the outer destination), so a valid packet pays no lookup for it.
    match nvgre(config, data, end, ip, gre_off) {
        // NVGRE goes only to the PA of the VM it is for.
        Ok(Verdict::Nvgre { at_pa: false, .. }) => {
            if ip.to_us() {
                Err(Counter::DropUplinkWrongPa)
            } else {
                ip.not_ours()
            }
        }
        Ok(Verdict::Pass) => ip.not_ours(),
        Ok(v) => Ok(v),
        Err(_) if !ip.to_us() => ip.not_ours(),
        Err(reason) => Err(reason),
    }
}

/// NVGRE, whoever it is addressed to: the caller decides whether the outer destination is ours.
#[inline(always)]
fn nvgre<O: Outer>(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    ip: &O,
    gre_off: usize,
) -> Result<Verdict, Counter> {
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
    to_our_mac(config, data, end)?;
    // The outer packet must at least hold what it claims to carry: GRE and an inner Ethernet
    // and IPv4 header.
    if ip.carried() < GRE_HLEN + ETH_HLEN + IPV4_HLEN {
        return Err(Counter::DropUplinkMalformed);
    }
    let key: [u8; 4] = read_at(data, end, gre_off + 4).ok_or(Counter::DropUplinkMalformed)?;
    let vsid = u32::from_be_bytes(key) >> 8;

    let inner = gre_off + GRE_HLEN;
    let inner_eth: &EthHdr = view_at(data, end, inner).ok_or(Counter::DropUplinkMalformed)?;
    match inner_eth.proto() {
        ETH_P_IP => {}
        ETH_P_IPV6 => return nvgre6(data, end, ip, vsid, inner, inner_eth),
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
    // The VM the inner destination names, or (routed to the world behind a next hop of
    // this VSID) that next hop: asked only when no VM has the address.
    let named = LookupKey {
        vsid,
        ca: inner_ip.dst,
    };
    // SAFETY: read-only use of values the agent replaces whole.
    let found = match unsafe { LOOKUPS.get(named) } {
        Some(dst) => Some((dst, named.ca)),
        None => router::next_hop_for(vsid, inner_ip.dst)
            .and_then(|ca| unsafe { LOOKUPS.get(LookupKey { vsid, ca }) }.map(|d| (d, ca))),
    };
    let (dst, dst_ca) = found.ok_or_else(|| unknown(vsid))?;
    for_a_vm_here(dst)?;
    // The sender must be a CA of this VSID, behind the PA and with the MAC its record says:
    // another host cannot speak for a tenant it does not host.
    let source = LookupKey {
        vsid,
        ca: inner_ip.src,
    };
    // Or, routed by the sender's host, a CA of another subnet of this VSID's routing domain
    // (never of another domain), from the router's MAC.
    // SAFETY: read-only use of a value the agent replaces whole.
    let (src, mac) = match unsafe { LOOKUPS.get(source) } {
        Some(src) => (src, src.mac),
        None => {
            // A subnet of the domain, or the next hop that answers for the world behind it.
            let (from, ca) =
                router::sender_of(vsid, inner_ip.src).ok_or(Counter::DropUplinkSpoofedPa)?;
            // SAFETY: as above.
            let src = unsafe { LOOKUPS.get(LookupKey { vsid: from, ca }) }
                .ok_or(Counter::DropUplinkSpoofedPa)?;
            // Routed from another VSID: from the router; a next hop of this VSID sending
            // directly: from its own MAC.
            (src, if from == vsid { src.mac } else { router::mac() })
        }
    };
    behind(src, ip)?;
    // The recorded MAC; or the router's, for a packet its sender's host routed within this
    // VSID (to a next hop of it, or to the router's MAC on-link): only in a routed VSID.
    if inner_eth.src != mac && (inner_eth.src != router::mac() || router::domain(vsid).is_none()) {
        return Err(Counter::DropUplinkSpoofedMac);
    }
    Ok(Verdict::Nvgre {
        strip: inner,
        port: dst.ifindex,
        at_pa: ip.sent_to(&dst.pa),
        vsid,
        ca: dst_ca,
        mac: dst.mac,
        v6: false,
    })
}

/// The IPv6 frame NVGRE carries at `inner` for VSID `vsid`: for a VM here, from a VM of the
/// VSID behind the outer source PA with the MAC its record says; or, routed by the sender's
/// host, from a VM of another subnet of the VSID's routing domain, with the router's MAC.
#[inline(always)]
fn nvgre6<O: Outer>(
    data: usize,
    end: usize,
    ip: &O,
    vsid: u32,
    inner: usize,
    inner_eth: &EthHdr,
) -> Result<Verdict, Counter> {
    if ip.carried() < GRE_HLEN + ETH_HLEN + IPV6_HLEN {
        return Err(Counter::DropUplinkMalformed);
    }
    let inner_ip: &Ipv6Hdr =
        view_at(data, end, inner + ETH_HLEN).ok_or(Counter::DropUplinkMalformed)?;
    // A header the VM's stack would take (its payload length is the VM's to check).
    (inner_ip.version() == 6)
        .then_some(())
        .ok_or(Counter::DropUplinkInnerMalformed)?;
    let named = LookupKey6 {
        vsid,
        ca: inner_ip.dst,
    };
    // SAFETY: read-only use of a value the agent replaces whole.
    let dst = unsafe { LOOKUPS6.get(named) }.ok_or_else(|| unknown(vsid))?;
    for_a_vm_here(dst)?;
    match sender6(ip, vsid, &inner_ip.src, &inner_eth.src) {
        SENDER_OK => {}
        drop => {
            return Err(crate::counters::numbered(
                drop,
                Counter::DropUplinkSpoofedPa,
            ));
        }
    }
    if router_talk(data, end, inner_ip.next, inner + ETH_HLEN + IPV6_HLEN) {
        return Err(Counter::DropUplinkRouterGuard);
    }
    Ok(Verdict::Nvgre {
        strip: inner,
        port: dst.ifindex,
        at_pa: ip.sent_to(&dst.pa),
        vsid,
        ca: [0; 4],
        mac: dst.mac,
        v6: true,
    })
}

/// Whether the IPv6 payload `next` at `l4` is neighbour discovery, a router's message or a
/// `DHCPv6` server's: hosts answer their own VMs, so such messages never cross between hosts.
#[inline(always)]
fn router_talk(data: usize, end: usize, next: u8, l4: usize) -> bool {
    match next {
        // Read as the header's first word: a single byte at a variable offset is checked
        // by the compiler in a form the verifier cannot follow.
        IPPROTO_ICMPV6 => read_at::<[u8; 4]>(data, end, l4)
            .is_some_and(|h| (ND_ROUTER_SOLICIT..=ND_REDIRECT).contains(&h[0])),
        IPPROTO_UDP => read_at::<[u8; 4]>(data, end, l4)
            .is_some_and(|p| u16::from_be_bytes([p[2], p[3]]) == DHCPV6_CLIENT_PORT),
        _ => false,
    }
}

/// What [`sender6`] says of a sender it takes; otherwise the number of the counter it drops
/// the packet under.
const SENDER_OK: u32 = u32::MAX;

/// Whether the IPv6 source `src` with MAC `mac`, in NVGRE of `vsid` from the outer source of
/// `ip`, is a VM of the VSID behind that PA with its recorded MAC; or, routed by its host, a
/// VM of another subnet of the VSID's domain with the router's MAC.
// Out of line, returning a scalar: its own stack frame, apart from the uplink programs' (their
// delivery path is deep).
#[inline(never)]
fn sender6<O: Outer>(ip: &O, vsid: u32, src: &[u8; 16], mac: &[u8; 6]) -> u32 {
    let key = LookupKey6 { vsid, ca: *src };
    // SAFETY: read-only use of a value the agent replaces whole.
    let (record, recorded) = match unsafe { LOOKUPS6.get(key) } {
        Some(r) => (r, r.mac),
        None => match crate::router6::routed_sender(vsid, src) {
            Some(r) => (r, router::mac()),
            None => return Counter::DropUplinkSpoofedPa as u32,
        },
    };
    if let Err(c) = behind(record, ip) {
        return c as u32;
    }
    // As for IPv4: the recorded MAC, or the router's in a routed VSID.
    if *mac != recorded && (*mac != router::mac() || router::domain(vsid).is_none()) {
        return Counter::DropUplinkSpoofedMac as u32;
    }
    SENDER_OK
}

/// Why NVGRE of `vsid` for an address no record of it has is dropped.
#[inline(always)]
fn unknown(vsid: u32) -> Counter {
    // SAFETY: presence check only.
    if unsafe { HOSTED_VSIDS.get(vsid) }.is_none() {
        Counter::DropUplinkVsidNotHosted
    } else {
        Counter::DropUplinkUnknownDst
    }
}

/// NVGRE is taken only for a VM of this host.
#[inline(always)]
fn for_a_vm_here(dst: &LookupValue) -> Result<(), Counter> {
    if dst.ifindex == 0 {
        return Err(Counter::DropUplinkNotLocal);
    }
    Ok(())
}

/// The sender's record puts it behind the outer source PA (`ip`), on another host.
#[inline(always)]
fn behind<O: Outer>(src: &LookupValue, ip: &O) -> Result<(), Counter> {
    if !ip.sent_from(&src.pa) {
        return Err(Counter::DropUplinkSpoofedPa);
    }
    // A VM of this host never sends through the underlay to come back here: its PA as the
    // outer source is this host's own, forged.
    if src.ifindex != 0 {
        return Err(Counter::DropUplinkOwnSource);
    }
    Ok(())
}

/// Tenant traffic is addressed to the uplink's own MAC: never a copy flooded to it, or one
/// seen in promiscuous mode.
#[inline(always)]
fn to_our_mac(config: &DatapathConfig, data: usize, end: usize) -> Result<(), Counter> {
    let eth: &EthHdr = view_at(data, end, 0).ok_or(Counter::DropUplinkMalformed)?;
    if config.uplink_mac != [0; 6] && eth.dst != config.uplink_mac {
        return Err(Counter::DropUplinkNotOurMac);
    }
    Ok(())
}

/// An IPv6 rewrite packet for the local VM of `dst`: from the dedicated PA of a CA of the same
/// VSID on another host (IPv6 rewrite is never routed), to the uplink's MAC.
#[inline(always)]
fn rewrite6(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    ip: &Ipv6Hdr,
    dst: &'static RewritePa,
) -> Result<Verdict, Counter> {
    // SAFETY: read-only use of a value the agent replaces whole.
    let Some(src) = (unsafe { REWRITE_PAS6.get(ip.src) }) else {
        // An underlay router's ICMPv6 error about something sent from this PA is not
        // spoofing, and it is not the tenant's either.
        return Err(if ip.next == IPPROTO_ICMPV6 {
            Counter::DropUplinkRewriteIcmp
        } else {
            Counter::DropUplinkRewriteUnknownSrc
        });
    };
    if src.vsid != dst.vsid {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    }
    if src.ifindex != 0 {
        return Err(Counter::DropUplinkOwnSource);
    }
    to_our_mac(config, data, end)?;
    // As in NVGRE: no host speaks for another's router (the sending datapath never
    // rewrites such a message; a forger would).
    if router_talk(data, end, ip.next, ETH_HLEN + IPV6_HLEN) {
        return Err(Counter::DropUplinkRouterGuard);
    }
    Ok(Verdict::Rewrite6 { from: src, to: dst })
}

/// An IP-rewrite packet for a local VM: the source PA must be the dedicated PA of a CA in the
/// same VSID on another host.
#[inline(always)]
fn rewrite(
    config: &DatapathConfig,
    data: usize,
    end: usize,
    ip: &Ipv4Hdr,
    dst: &RewritePa,
) -> Result<Verdict, Counter> {
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
    let (Some(src_ca), Some(dst_ca)) = (v4_of(&src.ca), v4_of(&dst.ca)) else {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    };
    // From a VM of the same VSID; or, routed by the sender's host, from a subnet of another
    // VSID of the same routing domain (never of another domain), as from the router.
    let src_mac = if src.vsid == dst.vsid {
        src.mac
    } else if router::source_of(dst.vsid, src_ca) == Some(src.vsid) {
        router::mac()
    } else {
        return Err(Counter::DropUplinkRewriteUnknownSrc);
    };
    // A local VM's rewrite traffic to another local VM never leaves the host.
    if src.ifindex != 0 {
        return Err(Counter::DropUplinkOwnSource);
    }
    // Addressed to the uplink's own MAC, as NVGRE must be.
    to_our_mac(config, data, end)?;
    Ok(Verdict::Rewrite(RestoreMeta {
        magic: RestoreMeta::MAGIC,
        ifindex: dst.ifindex,
        vsid: dst.vsid,
        src_ca,
        dst_ca,
        src_mac,
        dst_mac: dst.mac,
    }))
}
