//! Port ACL rules, as `nvctl acl add` takes them: on one VM (`vsid` and `ca`, its lookup
//! record) or on every VM of a VSID (`vsid` alone); the highest weight that matches decides,
//! deny first at equal weight, and a packet no rule matches passes.
use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Subnet;
use crate::error::{NvError, Result, invalid};

/// Which way a rule looks: what the VM receives, what it sends, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
    Both,
}

impl Direction {
    /// Whether the rule applies to packets going `dir` ([`nv_common::acl::DIR_IN`], `DIR_OUT`).
    pub fn covers(self, dir: u32) -> bool {
        match self {
            Direction::Both => true,
            Direction::In => dir == nv_common::acl::DIR_IN,
            Direction::Out => dir == nv_common::acl::DIR_OUT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// An IP protocol: `tcp`, `udp`, `icmp`, `icmpv6` or a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const ICMP: Protocol = Protocol(1);
    pub const ICMPV6: Protocol = Protocol(58);

    fn has_ports(self) -> bool {
        self == Protocol::TCP || self == Protocol::UDP
    }
}

impl FromStr for Protocol {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::TCP,
            "udp" => Protocol::UDP,
            "icmp" => Protocol::ICMP,
            "icmpv6" => Protocol::ICMPV6,
            n => Protocol(n.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                invalid(format!(
                    "invalid protocol '{s}': expected tcp, udp, icmp, icmpv6 or a number 1-255"
                ))
            })?),
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Protocol::TCP => f.write_str("tcp"),
            Protocol::UDP => f.write_str("udp"),
            Protocol::ICMP => f.write_str("icmp"),
            Protocol::ICMPV6 => f.write_str("icmpv6"),
            Protocol(n) => write!(f, "{n}"),
        }
    }
}

/// A port or an inclusive range of them: `80` or `1024-65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange(pub u16, pub u16);

impl FromStr for PortRange {
    type Err = NvError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            invalid(format!(
                "invalid port '{s}': expected a port 0-65535 or a range like 1024-65535"
            ))
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (lo.trim(), hi.trim()),
            None => (s.trim(), s.trim()),
        };
        let (lo, hi): (u16, u16) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        if lo > hi {
            return Err(invalid(format!(
                "invalid port range '{s}': the first port is above the last"
            )));
        }
        Ok(PortRange(lo, hi))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}-{}", self.0, self.1)
        }
    }
}

macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                // A number is a protocol or a port as well as its string.
                let v = serde_json::Value::deserialize(d)?;
                let s = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    other => {
                        return Err(serde::de::Error::custom(format!("unexpected {other}")));
                    }
                };
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(Protocol);
serde_as_string!(PortRange);

/// Seconds a connection a stateful rule admitted lives without a packet, unless the rule says.
pub const DEFAULT_IDLE_TIMEOUT: u32 = 300;
/// The longest idle timeout a rule may ask for (a day).
pub const MAX_IDLE_TIMEOUT: u32 = 86_400;

/// One ACL rule. `id` is nv's (0 in a rule to be added: the agent numbers it). Every field
/// is written, `null` where a rule has none (`nvctl acl list -o json` gives them all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRule {
    #[serde(default)]
    pub id: u32,
    #[serde(default)]
    pub name: Option<String>,
    pub vsid: u32,
    /// The VM's record; `None`: every VM of the VSID.
    #[serde(default)]
    pub ca: Option<IpAddr>,
    pub direction: Direction,
    pub action: Action,
    #[serde(default)]
    pub remote: Option<Subnet>,
    #[serde(default)]
    pub local: Option<Subnet>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub remote_port: Option<PortRange>,
    #[serde(default)]
    pub local_port: Option<PortRange>,
    pub weight: u16,
    #[serde(default)]
    pub stateful: bool,
    /// Seconds; only for stateful rules.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u32,
}

fn default_idle_timeout() -> u32 {
    DEFAULT_IDLE_TIMEOUT
}

impl AclRule {
    /// The rules a rule keeps on its own.
    pub fn validate(&self) -> Result<()> {
        if !(nv_common::VSID_MIN..=nv_common::VSID_MAX).contains(&self.vsid) {
            return Err(invalid(format!(
                "invalid VSID {}: must be between {} and {}",
                self.vsid,
                nv_common::VSID_MIN,
                nv_common::VSID_MAX
            )));
        }
        if self.weight == 0 {
            return Err(invalid("invalid weight 0: weights are 1-65535"));
        }
        if let Some(name) = &self.name {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(invalid(format!(
                    "invalid name '{name}': 1-64 letters, digits, '-', '_' or '.'"
                )));
            }
            if name.parse::<u32>().is_ok() {
                return Err(invalid(format!(
                    "invalid name '{name}': a name may not be a number (ids are)"
                )));
            }
        }
        if let (Some(r), Some(l)) = (&self.remote, &self.local)
            && r.addr.is_ipv4() != l.addr.is_ipv4()
        {
            return Err(invalid(
                "--remote and --local are of different address families: a rule's prefixes pick one",
            ));
        }
        if let Some(p) = self.protocol {
            let family = self.family();
            if (p == Protocol::ICMP && family == 6) || (p == Protocol::ICMPV6 && family == 4) {
                return Err(invalid(format!(
                    "protocol {p} does not go with IPv{family} prefixes"
                )));
            }
        }
        if (self.remote_port.is_some() || self.local_port.is_some())
            && !self.protocol.is_some_and(Protocol::has_ports)
        {
            return Err(invalid(
                "ports need --protocol tcp or udp: other protocols have none",
            ));
        }
        if self.stateful && self.action == Action::Deny {
            return Err(invalid(
                "--stateful goes with --action allow: it admits the answers of what it allows",
            ));
        }
        if self.idle_timeout == 0 || self.idle_timeout > MAX_IDLE_TIMEOUT {
            return Err(invalid(format!(
                "invalid idle timeout {}: 1-{MAX_IDLE_TIMEOUT} seconds",
                self.idle_timeout
            )));
        }
        Ok(())
    }

    /// The address family its prefixes pick: 4, 6, or 0 (any).
    pub fn family(&self) -> u8 {
        match self.remote.as_ref().or(self.local.as_ref()) {
            Some(s) if s.addr.is_ipv4() => 4,
            Some(_) => 6,
            None => 0,
        }
    }

    /// Precedence in a rule set: higher weight first, deny first at equal weight, then the
    /// older rule (a total order, the same on every host).
    pub fn precedence(&self) -> (std::cmp::Reverse<u16>, u8, u32) {
        (
            std::cmp::Reverse(self.weight),
            u8::from(self.action == Action::Allow),
            self.id,
        )
    }

    /// What the rule is attached to, for messages: `VSID 5001` or `10.0.0.1 in VSID 5001`.
    pub fn target(&self) -> String {
        match self.ca {
            Some(ca) => format!("{ca} in VSID {}", self.vsid),
            None => format!("VSID {}", self.vsid),
        }
    }
}

/// A rule as `nvctl acl list` shows it: with what it decided on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclListed {
    #[serde(flatten)]
    pub rule: AclRule,
    pub packets: u64,
    pub bytes: u64,
}
