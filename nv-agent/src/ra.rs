//! Router advertisements (RFC 4861) for the VMs of routed VSIDs: the agent sends each VM with
//! an IPv6 record in a subnet its router's advertisement, from the router's link-local address
//! and MAC, periodically and when the VM solicits one (the datapath hands solicitations over
//! on the slow path). A VM learns its default router, its prefix and the MTU it must use with
//! no configuration. The prefix carries the autonomous flag only where the record's CA is the
//! address SLAAC gives the VM's MAC; otherwise the managed flag says the address is `DHCPv6`'s.
//! This file is the protocol, pure; the slow-path server sends.
use std::{net::Ipv6Addr, time::Duration};

use etherparse::{LaxSlicedPacket, TransportSlice};
use nv_common::routing::router_link_local;

/// How often every VM is advertised to without asking (RFC 4861's `MaxRtrAdvInterval` is
/// 600 s by default; a VM that missed one learns its router sooner).
pub const INTERVAL: Duration = Duration::from_mins(1);

/// Seconds a VM keeps the router as its default without another advertisement (3 × 600).
const ROUTER_LIFETIME: u16 = 1800;
/// Seconds the prefix stays valid and preferred (RFC 4861's defaults).
const VALID_LIFETIME: u32 = 2_592_000;
const PREFERRED_LIFETIME: u32 = 604_800;

const ROUTER_SOLICITATION: u8 = 133;

/// All-nodes: where advertisements go (each frame to one VM's MAC only).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// What one VM is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub vm_mac: [u8; 6],
    pub router_mac: [u8; 6],
    /// The VM's subnet.
    pub prefix: Ipv6Addr,
    pub len: u8,
    /// The VM's address is SLAAC's: the autonomous flag, else the managed flag.
    pub slaac: bool,
    pub mtu: u32,
}

/// The address SLAAC gives `mac` in the /64 `prefix` (its modified EUI-64).
pub fn slaac_address(prefix: Ipv6Addr, mac: [u8; 6]) -> Ipv6Addr {
    let mut a = prefix.octets();
    a[8..].copy_from_slice(&router_link_local(mac)[8..]);
    Ipv6Addr::from(a)
}

/// Whether `frame` is a router solicitation a VM may send (RFC 4861 6.1.1: hop limit 255,
/// code 0, from an unspecified or link-local source).
pub fn is_solicitation(frame: &[u8]) -> bool {
    let Ok(p) = LaxSlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let Some(etherparse::LaxNetSlice::Ipv6(ip)) = &p.net else {
        return false;
    };
    let h = ip.header();
    let src = h.source_addr();
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        return false;
    };
    h.hop_limit() == 255
        && (src.is_unspecified() || src.is_unicast_link_local())
        // By number: etherparse's slices decode no router solicitation.
        && (icmp.type_u8(), icmp.code_u8()) == (ROUTER_SOLICITATION, 0)
}

/// The advertisement as a whole Ethernet frame to the VM.
pub fn frame(a: &Advert) -> Vec<u8> {
    let src = Ipv6Addr::from(router_link_local(a.router_mac));
    let mut icmp = vec![
        134,
        0,
        0,
        0,
        // Cur hop limit; M (managed address configuration), O clear.
        64,
        if a.slaac { 0 } else { 0x80 },
    ];
    icmp.extend_from_slice(&ROUTER_LIFETIME.to_be_bytes());
    // Reachable time, retransmission timer: unspecified.
    icmp.extend_from_slice(&[0; 8]);
    // Source link-layer address.
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&a.router_mac);
    // MTU.
    icmp.extend_from_slice(&[5, 1, 0, 0]);
    icmp.extend_from_slice(&a.mtu.to_be_bytes());
    // Prefix information: on-link, and autonomous where SLAAC gives the record's address.
    icmp.extend_from_slice(&[3, 4, a.len, if a.slaac { 0xc0 } else { 0x80 }]);
    icmp.extend_from_slice(&VALID_LIFETIME.to_be_bytes());
    icmp.extend_from_slice(&PREFERRED_LIFETIME.to_be_bytes());
    icmp.extend_from_slice(&[0; 4]);
    icmp.extend_from_slice(&a.prefix.octets());
    let sum = checksum(src, ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&a.vm_mac);
    f.extend_from_slice(&a.router_mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(icmp.len()).unwrap_or(0).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The `ICMPv6` checksum of `msg` (its checksum field zero) between `src` and `dst`.
fn checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = sum as u16;
    !folded
}

#[cfg(test)]
mod tests {
    use etherparse::{Icmpv6Type, SlicedPacket};

    use super::*;

    const VM: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const ROUTER: [u8; 6] = nv_common::routing::DEFAULT_ROUTER_MAC;

    #[test]
    fn an_advertisement_is_what_a_vm_expects() {
        let a = Advert {
            vm_mac: VM,
            router_mac: ROUTER,
            prefix: "fd00:1::".parse().unwrap(),
            len: 64,
            slaac: true,
            mtu: 1458,
        };
        let f = frame(&a);
        // etherparse checks the lengths and (below) the checksum independently.
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not IPv6")
        };
        assert_eq!(ip.header().hop_limit(), 255);
        assert_eq!(
            ip.header().source_addr().to_string(),
            "fe80::6e:76ff:fe00:1"
        );
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not ICMPv6")
        };
        let payload = ip.payload().payload;
        assert_eq!(
            icmp.header()
                .icmp_type
                .calc_checksum(
                    ip.header().source(),
                    ip.header().destination(),
                    &payload[8..]
                )
                .unwrap(),
            icmp.checksum()
        );
        assert_eq!(
            payload[5], 0,
            "no managed flag where SLAAC gives the address"
        );
        // The prefix option: length 64, on-link and autonomous.
        assert_eq!(&payload[32..36], &[3, 4, 64, 0xc0]);
        assert_eq!(&payload[24..32], &[5, 1, 0, 0, 0, 0, 0x05, 0xb2]);
        let managed = frame(&Advert { slaac: false, ..a });
        assert_eq!((managed[14 + 40 + 5], managed[14 + 40 + 35]), (0x80, 0x80));
        assert_eq!(
            slaac_address("fd00:1::".parse().unwrap(), VM).to_string(),
            "fd00:1::5054:ff:fe12:3456"
        );
    }

    #[test]
    fn only_a_link_local_solicitation_on_the_link_is_one() {
        let rs = |src: Ipv6Addr, hop: u8, kind: u8| {
            let b = etherparse::PacketBuilder::ethernet2(VM, [0x33, 0x33, 0, 0, 0, 2])
                .ipv6(
                    src.octets(),
                    [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                    hop,
                )
                .icmpv6(Icmpv6Type::Unknown {
                    type_u8: kind,
                    code_u8: 0,
                    bytes5to8: [0; 4],
                });
            let mut f = Vec::new();
            b.write(&mut f, &[]).unwrap();
            f
        };
        let ll: Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
        assert!(is_solicitation(&rs(ll, 255, 133)));
        assert!(is_solicitation(&rs(Ipv6Addr::UNSPECIFIED, 255, 133)));
        assert!(!is_solicitation(&rs(ll, 64, 133)));
        assert!(!is_solicitation(&rs(ll, 255, 135)));
        assert!(!is_solicitation(&rs("fd00::1".parse().unwrap(), 255, 133)));
        assert!(!is_solicitation(&[0u8; 20]));
    }
}
