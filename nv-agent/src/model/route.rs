//! Customer routes (HNV's `New-NetVirtualizationCustomerRoute`): a tenant's routing domain,
//! its subnets (on-link routes) and the next hops that lead elsewhere.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
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

/// An IPv4 prefix with no host bits set, written `10.1.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Subnet {
    pub fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two share an address (one holds the other).
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// The subnet's broadcast address (its last).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
}

impl FromStr for Subnet {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            invalid(format!(
                "invalid prefix '{}': expected an IPv4 ADDRESS/LENGTH, e.g. 10.1.0.0/16",
                s.escape_debug()
            ))
        };
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let IpAddr::V4(addr) = addr else {
            return Err(invalid(format!(
                "prefix {s} is IPv6: this datapath routes IPv4 customer addresses only"
            )));
        };
        let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
        let subnet = Subnet { addr, len };
        let network = Ipv4Addr::from(u32::from(addr) & subnet.mask());
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

/// The next hop of an on-link route: the prefix is the VSID's subnet.
pub const ON_LINK: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

/// A customer route: in routing domain `rdid`, `prefix` is reached through `nexthop`, a CA of
/// `vsid` (or, with next hop 0.0.0.0, `prefix` is `vsid`'s subnet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRecord {
    pub rdid: Rdid,
    pub vsid: u32,
    pub prefix: Subnet,
    pub nexthop: Ipv4Addr,
    #[serde(default)]
    pub metric: u32,
    /// An on-link route's gateway: the distributed router's address in the subnet (its first
    /// address when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
}

/// What names a route: its domain, prefix and next hop.
pub type RouteKey = (Rdid, Subnet, Ipv4Addr);

impl RouteRecord {
    pub fn key(&self) -> RouteKey {
        (self.rdid.clone(), self.prefix, self.nexthop)
    }

    pub fn on_link(&self) -> bool {
        self.nexthop == ON_LINK
    }

    /// An on-link route's gateway address, given or the subnet's first.
    pub fn gateway_addr(&self) -> Option<Ipv4Addr> {
        self.on_link().then(|| {
            self.gateway
                .unwrap_or_else(|| Ipv4Addr::from(u32::from(self.prefix.addr) + 1))
        })
    }

    /// Checks the route on its own (not against other routes or records).
    pub fn validate(&self) -> Result<()> {
        validate_vsid(self.vsid)?;
        let p = self.prefix;
        if self.on_link() {
            if p.len > 30 {
                return Err(invalid(format!(
                    "on-link prefix {p} is too small for a subnet: its gateway and a VM need \
                     a /30 or larger"
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
                "--gateway belongs to an on-link route (--nexthop 0.0.0.0): it is the \
                 subnet's router address",
            ));
        }
        let n = self.nexthop;
        if n.is_multicast() || n.is_broadcast() || n.is_loopback() {
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
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(192, 0, 2, 1)) && all.overlaps(&s));
        let e = "10.1.0.1/16".parse::<Subnet>().unwrap_err().to_string();
        assert!(e.contains("did you mean 10.1.0.0/16"), "{e}");
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/64", "x/8"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_route_keeps_its_own_rules() {
        let on_link =
            route(r#"{"rdid":"t1","vsid":5001,"prefix":"10.1.0.0/24","nexthop":"0.0.0.0"}"#);
        on_link.validate().unwrap();
        assert_eq!(on_link.gateway_addr(), Some(Ipv4Addr::new(10, 1, 0, 1)));
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
