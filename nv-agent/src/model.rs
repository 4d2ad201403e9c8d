//! What the operator configures: provider addresses and lookup records, with their validation.
//! Field names are the CLI flag names, so JSON and import files read like the commands.
use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{NvError, Result, invalid};

pub mod acl;
mod route;

pub use route::{ON_LINK, Rdid, RouteKey, RouteRecord, Subnet};

/// A MAC address, written `02:00:00:00:00:01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            invalid(format!(
                "invalid MAC address '{s}': expected six hex pairs like 02:00:00:00:00:01"
            ))
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Mac>(std::marker::PhantomData))
    }
}

/// Parses a string field with `FromStr` without copying it first (an import has a million).
struct FromStrVisitor<T>(std::marker::PhantomData<T>);

impl<T: FromStr<Err = NvError>> serde::de::Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        s.parse().map_err(E::custom)
    }
}

/// Translation method of a lookup record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// NVGRE encapsulation: the VSID rides in the GRE key.
    #[default]
    Encap,
    /// IP address rewrite: one PA dedicated to each CA.
    Rewrite,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Encap => "encap",
            Method::Rewrite => "rewrite",
        })
    }
}

/// An address with its prefix length, written `198.18.0.1/15`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefixed {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Prefixed {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s.split_once('/').ok_or_else(|| {
            invalid(format!(
                "invalid provider address '{s}': expected ADDRESS/PREFIX, e.g. 198.18.0.1/15"
            ))
        })?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| invalid(format!("invalid IP address '{addr}' in '{s}'")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
            invalid(format!(
                "invalid prefix length '{len}' in '{s}': expected 0-{max}"
            ))
        })?;
        Ok(Prefixed { addr, len })
    }
}

impl fmt::Display for Prefixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Prefixed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefixed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Prefixed>(std::marker::PhantomData))
    }
}

/// A provider address of this host (HNV's `New-NetVirtualizationProviderAddress`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub pa: Prefixed,
    /// The interface that holds it; the agent's uplink when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// What the agent remembers about a provider address beyond what the operator gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderState {
    pub pa: Prefixed,
    /// The interface that holds it, resolved.
    pub dev: String,
    /// Whether the agent added the address to the interface (and so removes it on delete).
    pub added_address: bool,
    /// A rewrite PA: a local VM's IP-rewrite record uses it (or did, since the provider was
    /// added). The datapath owns it: it is taken off the interface, so no host process can
    /// use it, and the datapath answers ARP for it and hands what arrives to its VM or drops
    /// it, until the provider is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rewrite: bool,
}

/// A lookup record (HNV's `New-NetVirtualizationLookupRecord`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupRecord {
    pub vsid: u32,
    pub ca: IpAddr,
    pub pa: IpAddr,
    pub mac: Mac,
    #[serde(default)]
    pub method: Method,
    /// The VM's port on this host; absent when the CA lives on another host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Free text: the VM's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Cluster mode: the host whose VM port this is (with `port`); absent for a VM no nv host
    /// attaches. Alone, nv does not keep it: every port is this host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Checks a Virtual Subnet ID against RFC 7637's reserved ranges.
pub fn validate_vsid(vsid: u32) -> Result<()> {
    if (nv_common::VSID_MIN..=nv_common::VSID_MAX).contains(&vsid) {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid VSID {vsid}: valid VSIDs are {}-{} (0-4095 and 16777215 are reserved)",
            nv_common::VSID_MIN,
            nv_common::VSID_MAX
        )))
    }
}

/// Checks that an interface name is one the kernel would accept.
pub fn validate_ifname(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ' ', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(invalid(format!(
            "invalid {what} '{name}': an interface name has 1-15 characters, no '/' or spaces"
        )));
    }
    Ok(())
}

impl LookupRecord {
    /// Checks the record on its own (not against other records).
    pub fn validate(&self) -> Result<()> {
        validate_vsid(self.vsid)?;
        // A VM's link-local address is its own (derived from its MAC), never a record; an
        // IPv4-mapped one is IPv4's.
        if let IpAddr::V6(a) = self.ca
            && (a.is_unicast_link_local() || a.to_ipv4_mapped().is_some() || a.is_loopback())
        {
            return Err(invalid(format!(
                "customer address {} is link-local, loopback or IPv4-mapped: give the VM's \
                 global or unique local IPv6 address",
                self.ca
            )));
        }
        // An IPv6 PA is a routable address of the underlay: its link-local ones are not, and
        // an IPv4-mapped one is IPv4's.
        if let IpAddr::V6(a) = self.pa
            && (a.is_unicast_link_local() || a.to_ipv4_mapped().is_some())
        {
            return Err(invalid(format!(
                "provider address {} is link-local or IPv4-mapped: give the host's global or \
                 unique local IPv6 address on the underlay",
                self.pa
            )));
        }
        if self.ca.is_unspecified()
            || self.ca.is_multicast()
            || self.ca == IpAddr::from([255, 255, 255, 255])
        {
            return Err(invalid(format!(
                "customer address {} is not a unicast address",
                self.ca
            )));
        }
        if self.pa.is_unspecified() || self.pa.is_multicast() || self.pa.is_loopback() {
            return Err(invalid(format!(
                "provider address {} is not a usable unicast address",
                self.pa
            )));
        }
        if self.mac.0[0] & 1 != 0 || self.mac.0 == [0; 6] {
            return Err(invalid(format!(
                "MAC address {} is not a unicast address",
                self.mac
            )));
        }
        if let Some(port) = &self.port {
            validate_ifname("port", port)?;
        }
        if let Some(name) = &self.name
            && (name.len() > 256 || name.chars().any(char::is_control))
        {
            return Err(invalid("name must be at most 256 printable characters"));
        }
        if let Some(host) = &self.host
            && (host.is_empty()
                || host.len() > 253
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_'))
        {
            return Err(invalid(format!(
                "host '{host}' is not a host name (letters, digits, '-', '.', '_')"
            )));
        }
        Ok(())
    }

    pub fn key(&self) -> (u32, IpAddr) {
        (self.vsid, self.ca)
    }
}
