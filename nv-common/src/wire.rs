//! Wire constants of NVGRE (RFC 7637) and the protocols around it.

pub const ETH_HLEN: usize = 14;
pub const ETH_ALEN: usize = 6;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Transparent Ethernet Bridging: the GRE protocol type of NVGRE.
pub const ETH_P_TEB: u16 = 0x6558;

pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers a VM's packet may carry before its upper-layer header.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
/// The authentication header (RFC 4302): its length counts 4-byte words, less 2.
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// ICMPv6 neighbour discovery (RFC 4861) and multicast listener messages.
pub const ND_ROUTER_SOLICIT: u8 = 133;
pub const ND_ROUTER_ADVERT: u8 = 134;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
pub const ND_REDIRECT: u8 = 137;
/// DHCPv6's UDP ports (RFC 8415).
pub const DHCPV6_CLIENT_PORT: u16 = 546;
pub const DHCPV6_SERVER_PORT: u16 = 547;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_GRE: u8 = 47;
/// DHCPv4's UDP ports (RFC 2131).
pub const DHCP_SERVER_PORT: u16 = 67;
pub const DHCP_CLIENT_PORT: u16 = 68;
/// Don't Fragment, in the IPv4 flags/fragment-offset field.
pub const IPV4_DF: u16 = 0x4000;
/// More Fragments and the offset: any of these set means a fragment.
pub const IPV4_FRAG_MASK: u16 = 0x3fff;

pub const GRE_HLEN: usize = 8;
/// GRE flags and version of NVGRE: K=1, C=0, S=0, version 0.
pub const GRE_FLAGS_NVGRE: u16 = 0x2000;
pub const GRE_FLAG_C: u16 = 0x8000;
pub const GRE_FLAG_K: u16 = 0x2000;
pub const GRE_FLAG_S: u16 = 0x1000;

/// Outer Ethernet + IPv4 + GRE (the inner Ethernet header is the customer's).
pub const NVGRE_V4_OVERHEAD: usize = ETH_HLEN + IPV4_HLEN + GRE_HLEN;
/// Outer Ethernet + IPv6 + GRE: NVGRE over an IPv6 underlay.
pub const NVGRE_V6_OVERHEAD: usize = ETH_HLEN + IPV6_HLEN + GRE_HLEN;

/// What NVGRE adds in front of a customer's IP packet from a VM whose provider address is
/// `pa` (16-byte form): IPv4 and IPv6 underlays differ by 20 bytes.
#[must_use]
pub fn nvgre_overhead(pa: &crate::Addr) -> usize {
    if crate::mapped_v4(pa).is_some() {
        NVGRE_V4_OVERHEAD
    } else {
        NVGRE_V6_OVERHEAD
    }
}
pub const OUTER_TTL: u8 = 64;

pub const ARP_HLEN: usize = 28;
pub const ARPOP_REQUEST: u16 = 1;
pub const ARPOP_REPLY: u16 = 2;
pub const ARPHRD_ETHER: u16 = 1;

/// GRE key of NVGRE: the 24-bit VSID followed by the 8-bit FlowID.
#[inline(always)]
#[must_use]
pub const fn nvgre_key(vsid: u32, flow_id: u8) -> u32 {
    (vsid << 8) | flow_id as u32
}

/// ICMP "destination unreachable", code "fragmentation needed and DF set" (RFC 792, 1191).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// How much of the offending packet an ICMP error from the datapath quotes: the longest IPv4
/// header and the 8 bytes RFC 792 asks for (RFC 1812 allows more, never less).
pub const ICMP_QUOTE: usize = 68;
/// The smallest MTU an IPv4 host must accept (RFC 791); no answer names less.
pub const IPV4_MIN_MTU: u32 = 68;
