//! Customer routes (HNV's `New-NetVirtualizationCustomerRoute`): a tenant's routing domain,
//! its subnets (on-link routes) and the next hops that lead elsewhere.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{FromStrVisitor, validate_vsid};
use crate::error::{NvError, Result, invalid};

/// A routing domain's ID: HNV's RDID (a GUID), or any name of at most 64 characters of
/// `[A-Za-z0-9._:-]`, kept lowercased so that a GUID written either way is one domain.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rdid(String);

impl Rdid {
    pub const MAX_LEN: usize = 64;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Rdid {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if s.is_empty() || s.len() > Rdid::MAX_LEN || !s.chars().all(ok) {
            return Err(invalid(format!(
                "invalid routing domain '{}': an RDID is 1-{} characters of letters, digits, \
                 '.', '_', ':' and '-' (a name, or a GUID)",
                s.escape_debug(),
                Rdid::MAX_LEN
            )));
        }
        Ok(Rdid(s.to_ascii_lowercase()))
    }
}

impl fmt::Display for Rdid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Rdid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rdid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Rdid>(std::marker::PhantomData))
    }
}

/// An IPv4 or IPv6 prefix with no host bits set, written `10.1.0.0/16` or `fd00:1::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    pub addr: IpAddr,
    pub len: u8,
}

/// An address as a 128-bit number and its family's width (32 or 128).
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

fn from_bits(n: u128, width: u8) -> IpAddr {
    if width == 32 {
        #[expect(clippy::cast_possible_truncation, reason = "an IPv4 address's 32 bits")]
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

impl Subnet {
    /// The prefix's mask within its family's width.
    fn mask_bits(&self) -> u128 {
        let width = bits(self.addr).1;
        let ones = u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0);
        ones >> (128 - u32::from(width))
    }

    /// The netmask of an IPv4 prefix (DHCP's option 1).
    pub fn v4_mask(&self) -> Option<Ipv4Addr> {
        #[expect(clippy::cast_possible_truncation, reason = "an IPv4 mask's 32 bits")]
        self.addr
            .is_ipv4()
            .then(|| Ipv4Addr::from(self.mask_bits() as u32))
    }

    /// Whether `ip`, of the same family, lies in the prefix.
    pub fn contains(&self, ip: impl Into<IpAddr>) -> bool {
        let (n, width) = bits(ip.into());
        let (net, mine) = bits(self.addr);
        width == mine && n & self.mask_bits() == net
    }

    /// Whether the two share an address (one holds the other).
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The subnet's last address (IPv4's broadcast).
    pub fn last(&self) -> IpAddr {
        let (net, width) = bits(self.addr);
        let all = u128::MAX >> (128 - u32::from(width));
        from_bits(net | (all & !self.mask_bits()), width)
    }

    /// The address `n` after the subnet's first.
    pub fn nth(&self, n: u128) -> IpAddr {
        let (net, width) = bits(self.addr);
        from_bits(net.wrapping_add(n), width)
    }

    /// The prefix's IPv4 network address, if it is IPv4.
    pub fn v4(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

impl FromStr for Subnet {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            invalid(format!(
                "invalid prefix '{}': expected ADDRESS/LENGTH, e.g. 10.1.0.0/16 or fd00:1::/64",
                s.escape_debug()
            ))
        };
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let width = bits(addr).1;
        let len: u8 = len.parse().ok().filter(|l| *l <= width).ok_or_else(bad)?;
        let subnet = Subnet { addr, len };
        let network = from_bits(bits(addr).0 & subnet.mask_bits(), width);
        if network != addr {
            return Err(invalid(format!(
                "prefix {s} has host bits set: did you mean {network}/{len}?"
            )));
        }
        Ok(subnet)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Subnet>(std::marker::PhantomData))
    }
}

/// The next hop of an on-link IPv4 route: the prefix is the VSID's subnet (`::` for IPv6).
pub const ON_LINK: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// A customer route: in routing domain `rdid`, `prefix` is reached through `nexthop`, a CA of
/// `vsid` (or, with next hop 0.0.0.0 or `::`, `prefix` is `vsid`'s subnet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRecord {
    pub rdid: Rdid,
    pub vsid: u32,
    pub prefix: Subnet,
    pub nexthop: IpAddr,
    #[serde(default)]
    pub metric: u32,
    /// An on-link route's gateway: the distributed router's address in the subnet (its first
    /// address when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

/// What names a route: its domain, prefix and next hop.
pub type RouteKey = (Rdid, Subnet, IpAddr);

impl RouteRecord {
    pub fn key(&self) -> RouteKey {
        (self.rdid.clone(), self.prefix, self.nexthop)
    }

    pub fn on_link(&self) -> bool {
        self.nexthop.is_unspecified()
    }

    /// An on-link route's gateway address, given or the subnet's first.
    pub fn gateway_addr(&self) -> Option<IpAddr> {
        self.on_link()
            .then(|| self.gateway.unwrap_or_else(|| self.prefix.nth(1)))
    }

    /// Checks the route on its own (not against other routes or records).
    pub fn validate(&self) -> Result<()> {
        validate_vsid(self.vsid)?;
        let p = self.prefix;
        if self.nexthop.is_ipv4() != p.addr.is_ipv4() {
            let on_link = if p.addr.is_ipv4() { "0.0.0.0" } else { "::" };
            return Err(invalid(format!(
                "next hop {} is not of {p}'s address family: give an address of it (on-link: \
                 --nexthop {on_link})",
                self.nexthop
            )));
        }
        if self.on_link() {
            // An IPv6 subnet of global or unique-local unicast addresses: its gateway and its
            // VMs' addresses are VMs' and the router's, answered by neighbour discovery.
            if let IpAddr::V6(a) = p.addr
                && (p.len < 8
                    || a.is_multicast()
                    || a.is_unicast_link_local()
                    || a.is_loopback()
                    || a.to_ipv4_mapped().is_some())
            {
                return Err(invalid(format!(
                    "{p} is no unicast subnet: an IPv6 subnet lies in global or unique-local \
                     unicast addresses (e.g. fd00:1::/64)"
                )));
            }
            let most = bits(p.addr).1 - 2;
            if p.len > most {
                return Err(invalid(format!(
                    "on-link prefix {p} is too small for a subnet: its gateway and a VM need \
                     a /{most} or larger"
                )));
            }
            if let Some(g) = self.gateway
                && (!p.contains(g) || g == p.addr || g == p.last())
            {
                return Err(invalid(format!(
                    "--gateway {g} is not a host address of {p}"
                )));
            }
            return Ok(());
        }
        if self.gateway.is_some() {
            return Err(invalid(
                "--gateway belongs to an on-link route (--nexthop 0.0.0.0 or ::): it is the \
                 subnet's router address",
            ));
        }
        let n = self.nexthop;
        let unicast = match n {
            IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_loopback()),
            IpAddr::V6(a) => {
                !(a.is_multicast() || a.is_loopback() || a.is_unicast_link_local())
                    && a.to_ipv4_mapped().is_none()
            }
        };
        if !unicast {
            return Err(invalid(format!(
                "next hop {n} is not a unicast customer address"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(s: &str) -> RouteRecord {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn ids_and_prefixes_are_read_strictly() {
        let guid: Rdid = "A1B2C3D4-0000-4000-8000-00000000000A".parse().unwrap();
        assert_eq!(guid.as_str(), "a1b2c3d4-0000-4000-8000-00000000000a");
        for bad in ["", "a b", "x/y", &"a".repeat(65), "é"] {
            assert!(bad.parse::<Rdid>().is_err(), "{bad}");
        }
        let s: Subnet = "10.1.0.0/16".parse().unwrap();
        assert!(s.contains(Ipv4Addr::new(10, 1, 255, 1)));
        assert!(!s.contains(Ipv4Addr::new(10, 2, 0, 1)));
        assert_eq!(s.last(), Ipv4Addr::new(10, 1, 255, 255));
        assert_eq!(s.v4_mask(), Some(Ipv4Addr::new(255, 255, 0, 0)));
        let v6: Subnet = "fd00:1::/64".parse().unwrap();
        assert!(v6.contains("fd00:1::ff".parse::<Ipv6Addr>().unwrap()));
        assert!(!v6.contains("fd00:2::1".parse::<Ipv6Addr>().unwrap()));
        assert!(!v6.contains(Ipv4Addr::new(10, 1, 0, 1)) && !v6.overlaps(&s));
        assert_eq!(v6.nth(1), "fd00:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.v4_mask(), None);
        let e = "fd00:1::1/64".parse::<Subnet>().unwrap_err().to_string();
        assert!(e.contains("did you mean fd00:1::/64"), "{e}");
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(192, 0, 2, 1)) && all.overlaps(&s));
        let e = "10.1.0.1/16".parse::<Subnet>().unwrap_err().to_string();
        assert!(e.contains("did you mean 10.1.0.0/16"), "{e}");
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "x/8"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_route_keeps_its_own_rules() {
        let on_link =
            route(r#"{"rdid":"t1","vsid":5001,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0"}"#);
        on_link.validate().unwrap();
        assert_eq!(
            on_link.gateway_addr(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)))
        );
        let on_link6 = route(r#"{"rdid":"t1","vsid":5001,"prefix":"fd00:1::/64","nexthop":"::"}"#);
        on_link6.validate().unwrap();
        assert_eq!(on_link6.gateway_addr(), Some("fd00:1::1".parse().unwrap()));
        let via = route(
            r#"{"rdid":"t1","vsid":5001,"prefix":"0.0.0.0/0","nexthop":"10.1.0.254","metric":5}"#,
        );
        via.validate().unwrap();
        assert_eq!(via.gateway_addr(), None);
        for (bad, says) in [
            (
                r#"{"rdid":"t1","vsid":1,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0"}"#,
                "VSID",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"10.1.0.0/31","nexthop":"0.0.0.0"}"#,
                "/30",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0","gateway":"10.1.0.255"}"#,
                "--gateway",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"10.2.0.0/24","nexthop":"10.1.0.9","gateway":"10.2.0.1"}"#,
                "--gateway",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"10.2.0.0/24","nexthop":"224.0.0.1"}"#,
                "unicast",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"fd00:1::/64","nexthop":"0.0.0.0"}"#,
                "--nexthop ::",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"fd00:1::/127","nexthop":"::"}"#,
                "/126",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"fd00:2::/64","nexthop":"fe80::1"}"#,
                "unicast",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"fe80::/64","nexthop":"::"}"#,
                "no unicast subnet",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"::/0","nexthop":"::"}"#,
                "no unicast subnet",
            ),
            (
                r#"{"rdid":"t1","vsid":5001,"prefix":"ff00::/8","nexthop":"::"}"#,
                "no unicast subnet",
            ),
        ] {
            let e = route(bad).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(
            serde_json::from_str::<RouteRecord>(
                r#"{"rdid":"t1","vsid":5001,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0","x":1}"#
            )
            .is_err()
        );
    }
}
