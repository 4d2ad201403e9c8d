//! The distributed router's maps: which routing domain a VSID belongs to, each domain's
//! routes (an LPM trie keyed by domain, then prefix), and its subnets' gateway addresses.
//!
//! A domain is known to the datapath by a number, the FNV-1a hash of its RDID ([`domain_id`]):
//! the same on every host and across restarts, so no entry ever changes meaning. The agent
//! refuses a domain whose number another domain has.
use crate::V4;

/// The router's MAC unless the agent's config says otherwise: locally administered, "nv".
pub const DEFAULT_ROUTER_MAC: [u8; 6] = [0x02, 0x6e, 0x76, 0x00, 0x00, 0x01];

/// Routed VSIDs, routes and gateways a host holds at most (of each address family).
pub const MAX_ROUTED_VSIDS: u32 = 65_536;
pub const MAX_ROUTES: u32 = 65_536;
pub const MAX_GATEWAYS: u32 = 65_536;

/// Value of the VSID-routing map, keyed by VSID: the VSID belongs to domain `rdid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsidRouting {
    pub rdid: u32,
}

/// Key of the route trie: a domain's number and a prefix, both in network order, so the
/// trie's prefix length is 32 + the prefix's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey {
    pub rdid: [u8; 4],
    pub addr: V4,
}

impl RouteKey {
    /// The trie's prefix length of a route to `addr/len` in domain `rdid`.
    #[must_use]
    pub const fn prefix_len(len: u8) -> u32 {
        32 + len as u32
    }
}

/// Value of the route trie: the prefix lives in `vsid`, on-link (`nexthop` 0.0.0.0) or
/// behind the VM at `nexthop`. An on-link route's `gateway` is its subnet's router address,
/// the source of the router's ICMP errors to the subnet's VMs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteHop {
    pub vsid: u32,
    pub nexthop: V4,
    pub gateway: V4,
}

impl RouteHop {
    #[inline(always)]
    #[must_use]
    pub fn on_link(&self) -> bool {
        self.nexthop == [0; 4]
    }
}

/// Key of the gateway map: a subnet's gateway address in its domain. The value is the
/// subnet's VSID (ARP is answered only within it; echo from anywhere in the domain).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GatewayKey {
    pub rdid: u32,
    pub addr: V4,
}

/// Key of the IPv6 route trie: as [`RouteKey`], the trie's prefix length 32 + the prefix's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey6 {
    pub rdid: [u8; 4],
    pub addr: [u8; 16],
}

/// Value of the IPv6 route trie: as [`RouteHop`] (`nexthop` `::` on-link).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteHop6 {
    pub vsid: u32,
    pub nexthop: [u8; 16],
    pub gateway: [u8; 16],
}

impl RouteHop6 {
    #[inline(always)]
    #[must_use]
    pub fn on_link(&self) -> bool {
        self.nexthop == [0; 16]
    }
}

/// Key of the IPv6 gateway map, as [`GatewayKey`]. The router's link-local address
/// ([`router_link_local`]) is every routed VSID's too, without an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GatewayKey6 {
    pub rdid: u32,
    pub addr: [u8; 16],
}

/// The router's IPv6 link-local address: fe80::/64 with the modified EUI-64 of its MAC.
#[must_use]
pub const fn router_link_local(mac: [u8; 6]) -> [u8; 16] {
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// The datapath's number of a routing domain: FNV-1a of its RDID's bytes (never 0, which
/// means none).
#[must_use]
pub const fn domain_id(rdid: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < rdid.len() {
        h ^= rdid[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    if h == 0 { 1 } else { h }
}

const _: () = {
    assert!(core::mem::size_of::<VsidRouting>() == 4);
    assert!(core::mem::size_of::<RouteKey>() == 8);
    assert!(core::mem::size_of::<RouteHop>() == 12);
    assert!(core::mem::size_of::<GatewayKey>() == 8);
    assert!(core::mem::size_of::<RouteKey6>() == 20);
    assert!(core::mem::size_of::<RouteHop6>() == 36);
    assert!(core::mem::size_of::<GatewayKey6>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::VsidRouting {}
    unsafe impl aya::Pod for super::RouteKey {}
    unsafe impl aya::Pod for super::RouteHop {}
    unsafe impl aya::Pod for super::GatewayKey {}
    unsafe impl aya::Pod for super::RouteKey6 {}
    unsafe impl aya::Pod for super::RouteHop6 {}
    unsafe impl aya::Pod for super::GatewayKey6 {}
}
