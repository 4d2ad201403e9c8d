//! Customer routes: each routing domain's subnets (on-link routes, one VSID each) and the
//! routes that leave them through a next hop, a CA of a VSID of the domain. Shared by every
//! host (in etcd under [`ETCD_PREFIX`] in cluster mode); stored as JSON in the CLI's fields.
//!
//! [`RouteIndex`] keeps the rules between routes, and between routes and lookup records: a
//! VSID belongs to one domain, a domain's subnets do not overlap, a prefix has one route per
//! metric, a next hop lies in a subnet of its VSID, and a gateway is no record's CA.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use nv_common::routing::{
    GatewayKey, GatewayKey6, RouteHop, RouteHop6, RouteKey as DpRouteKey, RouteKey6, VsidRouting,
    domain_id,
};

use super::Table;
use crate::{
    error::{NvError, Result, invalid},
    model::{Rdid, RouteKey, RouteRecord, Subnet},
};

pub struct Routes;

/// Where routes live in etcd.
pub const ETCD_PREFIX: &str = "/nv/v1/routes/";

impl Table for Routes {
    const NAME: &'static str = "routes";
    const STORE: &'static str = "routes_v1";
    const ETCD_PREFIX: Option<&'static str> = Some(ETCD_PREFIX);
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("RDID", "rdid"),
        ("VSID", "vsid"),
        ("PREFIX", "prefix"),
        ("NEXTHOP", "nexthop"),
        ("METRIC", "metric"),
        ("GATEWAY", "gateway"),
    ];
    type Row = RouteRecord;
    type Key = RouteKey;

    fn key(row: &RouteRecord) -> RouteKey {
        row.key()
    }

    fn validate(row: &RouteRecord) -> Result<()> {
        row.validate()
    }

    fn store_key(key: &RouteKey) -> Vec<u8> {
        format!("{}/{}/{}", key.0, key.1, key.2).into_bytes()
    }

    fn encode(row: &RouteRecord) -> Vec<u8> {
        serde_json::to_vec(row).unwrap_or_default()
    }

    fn decode(_key: &[u8], value: &[u8]) -> std::result::Result<RouteRecord, String> {
        serde_json::from_slice(value).map_err(|e| {
            format!(
                "a value does not parse ({e}): {}",
                String::from_utf8_lossy(value)
            )
        })
    }
}

/// A route's key in etcd (the prefix's '/' written '_', so that a key has a fixed depth).
pub fn etcd_key(key: &RouteKey) -> String {
    format!(
        "{ETCD_PREFIX}{}/{}_{}/{}",
        key.0, key.1.addr, key.1.len, key.2
    )
}

/// What the datapath holds for the routes: each routed VSID's domain, each domain's routes
/// (the lowest metric of each prefix) and its subnets' gateways ([`nv_common::routing`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteEntries {
    pub vsids: HashMap<u32, VsidRouting>,
    /// By (trie prefix length, key).
    pub routes: HashMap<(u32, DpRouteKey), RouteHop>,
    pub gateways: HashMap<GatewayKey, u32>,
    /// IPv6's, in maps of their own: IPv4 keeps its short keys.
    pub routes6: HashMap<(u32, RouteKey6), RouteHop6>,
    pub gateways6: HashMap<GatewayKey6, u32>,
}

/// The datapath's number of a routing domain.
pub fn domain_number(rdid: &Rdid) -> u32 {
    domain_id(rdid.as_str().as_bytes())
}

/// The map entries of every route in `index`.
pub fn entries(index: &RouteIndex) -> RouteEntries {
    let mut e = RouteEntries::default();
    for r in index.routes.values() {
        let rdid = domain_number(&r.rdid);
        e.vsids.insert(r.vsid, VsidRouting { rdid });
        // The lowest metric of a prefix; the key's order breaks no tie (metrics differ).
        let best = index
            .matching(&r.rdid, r.prefix, None)
            .into_iter()
            .min_by_key(|o| o.metric);
        let best = best.as_ref().is_some_and(|b| b.key() == r.key());
        let len = DpRouteKey::prefix_len(r.prefix.len);
        let rdid_be = rdid.to_be_bytes();
        match (r.prefix.addr, r.nexthop, r.gateway_addr()) {
            (IpAddr::V4(addr), IpAddr::V4(nexthop), gateway) => {
                let gateway = gateway.and_then(|g| v4(g).map(|g| g.octets()));
                if best {
                    let hop = RouteHop {
                        vsid: r.vsid,
                        nexthop: nexthop.octets(),
                        gateway: gateway.unwrap_or([0; 4]),
                    };
                    let key = DpRouteKey {
                        rdid: rdid_be,
                        addr: addr.octets(),
                    };
                    e.routes.insert((len, key), hop);
                }
                if let Some(addr) = gateway {
                    e.gateways.insert(GatewayKey { rdid, addr }, r.vsid);
                }
            }
            (IpAddr::V6(addr), IpAddr::V6(nexthop), gateway) => {
                let gateway = gateway.and_then(|g| v6(g).map(|g| g.octets()));
                if best {
                    let hop = RouteHop6 {
                        vsid: r.vsid,
                        nexthop: nexthop.octets(),
                        gateway: gateway.unwrap_or([0; 16]),
                    };
                    let key = RouteKey6 {
                        rdid: rdid_be,
                        addr: addr.octets(),
                    };
                    e.routes6.insert((len, key), hop);
                }
                if let Some(addr) = gateway {
                    e.gateways6.insert(GatewayKey6 { rdid, addr }, r.vsid);
                }
            }
            // Refused by validation: a route's addresses are of one family.
            _ => {}
        }
    }
    e
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

fn v6(ip: IpAddr) -> Option<std::net::Ipv6Addr> {
    match ip {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    }
}

/// The route key of an etcd key under [`ETCD_PREFIX`] (`RDID/ADDR_LEN/NEXTHOP`).
pub fn parse_etcd_key(key: &[u8]) -> Option<RouteKey> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(ETCD_PREFIX)?;
    let mut parts = rest.split('/');
    let (rdid, prefix, nexthop) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let prefix: Subnet = prefix.replacen('_', "/", 1).parse().ok()?;
    let rdid: Rdid = rdid.parse().ok()?;
    // A key names its domain as it is kept: lowercased.
    (rdid.as_str() == rest.split('/').next()?).then_some(())?;
    Some((rdid, prefix, nexthop.parse().ok()?))
}

/// Subnets before the routes that lead through them: the order in which a set of routes can
/// be checked one by one, whatever order it came in.
pub fn on_link_first(routes: &mut [RouteRecord]) {
    routes.sort_by_key(|r| !r.on_link());
}

/// Every route, with what the rules between them look up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteIndex {
    routes: BTreeMap<RouteKey, RouteRecord>,
    /// Each VSID's domain, and how many routes name it.
    domains: HashMap<u32, (Rdid, usize)>,
}

/// The rows of one VSID's subnets' gateways, for the lookup records' rules.
pub struct Gateway<'a> {
    pub addr: IpAddr,
    pub route: &'a RouteRecord,
}

impl RouteIndex {
    /// The index of stored routes, whose order is the store's: subnets are put in first,
    /// so that a next hop's subnet is there when its route is checked.
    pub fn from_rows(mut rows: Vec<RouteRecord>) -> Result<RouteIndex> {
        on_link_first(&mut rows);
        let mut index = RouteIndex::default();
        for r in rows {
            index
                .put_checked(&r, &|_, _| None)
                .map_err(|e| invalid(format!("stored route {} is inconsistent: {e}", show(&r))))?;
        }
        Ok(index)
    }

    /// The index of the routes that keep the rules, each checked as the watch checks it
    /// (subnets first); the rest left out.
    pub fn lenient(mut rows: Vec<RouteRecord>) -> RouteIndex {
        on_link_first(&mut rows);
        let mut index = RouteIndex::default();
        for r in rows {
            // Refused: left out, as the watch leaves it out.
            let _ = index.put_checked(&r, &|_, _| None);
        }
        index
    }

    /// Puts `r` in if it keeps its own rules and those between routes and records
    /// ([`RouteIndex::check_put`]); otherwise changes nothing and says why.
    pub fn put_checked(
        &mut self,
        r: &RouteRecord,
        record_at: &dyn Fn(u32, IpAddr) -> Option<String>,
    ) -> Result<()> {
        r.validate()?;
        self.check_put(r, record_at)?;
        self.insert(r.clone());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn get(&self, key: &RouteKey) -> Option<&RouteRecord> {
        self.routes.get(key)
    }

    /// How many routes each domain has.
    pub fn by_domain(&self) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for (rdid, _, _) in self.routes.keys() {
            *n.entry(rdid.to_string()).or_default() += 1;
        }
        n
    }

    /// The routes in (domain, prefix, next hop) order, of one domain or all.
    pub fn list(&self, rdid: Option<&Rdid>) -> Vec<RouteRecord> {
        self.routes
            .values()
            .filter(|r| rdid.is_none_or(|d| &r.rdid == d))
            .cloned()
            .collect()
    }

    /// The routes of `rdid` to `prefix` (through `nexthop` only, if given).
    pub fn matching(
        &self,
        rdid: &Rdid,
        prefix: Subnet,
        nexthop: Option<IpAddr>,
    ) -> Vec<RouteRecord> {
        let first = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        self.routes
            .range((rdid.clone(), prefix, first)..)
            .take_while(|((d, p, _), _)| d == rdid && *p == prefix)
            .filter(|((_, _, n), _)| nexthop.is_none_or(|want| *n == want))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// The domain `vsid` belongs to, if a route names it.
    pub fn domain_of(&self, vsid: u32) -> Option<&Rdid> {
        self.domains.get(&vsid).map(|(d, _)| d)
    }

    /// The gateway of the subnet of `vsid` that holds `ca`, if `ca` is that gateway.
    pub fn gateway_at(&self, vsid: u32, ca: IpAddr) -> Option<Gateway<'_>> {
        let rdid = self.domain_of(vsid)?;
        self.subnets(rdid)
            .filter(|r| r.vsid == vsid)
            .find_map(|r| (r.gateway_addr() == Some(ca)).then_some(Gateway { addr: ca, route: r }))
    }

    fn subnets<'a>(&'a self, rdid: &'a Rdid) -> impl Iterator<Item = &'a RouteRecord> + 'a {
        self.of_domain(rdid).filter(|r| r.on_link())
    }

    /// The route of `rdid` that takes `addr`, as the datapath picks it: the longest prefix
    /// that holds it, then the lowest metric.
    pub fn best<'a>(&'a self, rdid: &'a Rdid, addr: IpAddr) -> Option<&'a RouteRecord> {
        self.of_domain(rdid)
            .filter(|r| r.prefix.contains(addr))
            .min_by_key(|r| (std::cmp::Reverse(r.prefix.len), r.metric))
    }

    /// The routes of `rdid`, in (prefix, next hop) order, borrowed.
    pub fn of_domain<'a>(&'a self, rdid: &'a Rdid) -> impl Iterator<Item = &'a RouteRecord> + 'a {
        // The least key of the domain: IPv4 sorts before IPv6.
        let first = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let all = Subnet {
            addr: first,
            len: 0,
        };
        self.routes
            .range((rdid.clone(), all, first)..)
            .take_while(move |((d, _, _), _)| d == rdid)
            .map(|(_, r)| r)
    }

    /// The subnet of `vsid` that holds `addr`, if any.
    pub fn subnet_of(&self, vsid: u32, addr: IpAddr) -> Option<&RouteRecord> {
        let rdid = self.domain_of(vsid)?;
        self.subnets(rdid)
            .find(|r| r.vsid == vsid && r.prefix.contains(addr))
    }

    /// Checks a new route (or one replacing the route of its key) against the others, and
    /// against the lookup records: `record_at(vsid, ca)` names the record at that address.
    pub fn check_put(
        &self,
        r: &RouteRecord,
        record_at: &dyn Fn(u32, IpAddr) -> Option<String>,
    ) -> Result<()> {
        let key = r.key();
        if let Some((domain, _)) = self.domains.get(&r.vsid)
            && domain != &r.rdid
        {
            return Err(NvError::Conflict(format!(
                "VSID {} belongs to routing domain {domain}: a VSID belongs to one domain, so \
                 a route of {} cannot name it (delete {domain}'s routes of VSID {} first)",
                r.vsid, r.rdid, r.vsid
            )));
        }
        let number = domain_number(&r.rdid);
        if let Some((other, _)) = self
            .domains
            .values()
            .find(|(d, _)| d != &r.rdid && domain_number(d) == number)
        {
            return Err(NvError::Conflict(format!(
                "routing domain {} has the datapath's number of {other} ({number:#x}, a hash \
                 of the name): choose another RDID",
                r.rdid
            )));
        }
        if let Some(same) = self
            .matching(&r.rdid, r.prefix, None)
            .into_iter()
            .find(|o| o.metric == r.metric && o.key() != key)
        {
            return Err(NvError::Conflict(format!(
                "{} already has a route to {} with metric {} ({}): give another --metric, \
                 or delete that route first",
                r.rdid,
                r.prefix,
                r.metric,
                show(&same)
            )));
        }
        if r.on_link() {
            self.check_subnet(r, &key, record_at)
        } else {
            self.check_via(r)
        }
    }

    /// The rules of a subnet (an on-link route) among the domain's routes and the records.
    fn check_subnet(
        &self,
        r: &RouteRecord,
        key: &RouteKey,
        record_at: &dyn Fn(u32, IpAddr) -> Option<String>,
    ) -> Result<()> {
        if let Some(o) = self
            .subnets(&r.rdid)
            .find(|o| &o.key() != key && o.prefix.overlaps(&r.prefix))
        {
            return Err(NvError::Conflict(format!(
                "{} overlaps {} of VSID {} in {}: the subnets of one routing domain do \
                 not overlap",
                r.prefix, o.prefix, o.vsid, r.rdid
            )));
        }
        let gateway = r.gateway_addr().unwrap_or(r.nexthop);
        if let Some(name) = record_at(r.vsid, gateway) {
            return Err(NvError::Conflict(format!(
                "{gateway}, the gateway of {} in VSID {}, is the CA of {name}: choose \
                 another address with --gateway, or move that VM",
                r.prefix, r.vsid
            )));
        }
        if let Some(o) = self
            .routes
            .values()
            .find(|o| o.rdid == r.rdid && !o.on_link() && o.vsid == r.vsid && o.nexthop == gateway)
        {
            return Err(NvError::Conflict(format!(
                "{gateway} would be the gateway of {}, but it is the next hop of {}: \
                 choose another address with --gateway",
                r.prefix,
                show(o)
            )));
        }
        // A subnet's addresses are its VMs': no next hop may take some of them over.
        if let Some(o) = self
            .routes
            .values()
            .find(|o| o.rdid == r.rdid && !o.on_link() && within(o.prefix, r.prefix))
        {
            return Err(NvError::Conflict(format!(
                "{} would hold {} of {}: a subnet's addresses are its VMs', no next hop's \
                 (delete that route first)",
                r.prefix,
                o.prefix,
                show(o)
            )));
        }
        Ok(())
    }

    /// The rules of a route through a next hop.
    fn check_via(&self, r: &RouteRecord) -> Result<()> {
        if let Some(o) = self.subnets(&r.rdid).find(|o| within(r.prefix, o.prefix)) {
            return Err(NvError::Conflict(format!(
                "{} lies in {}, the subnet of VSID {}: a subnet's addresses are its VMs', \
                 no next hop's",
                r.prefix, o.prefix, o.vsid
            )));
        }
        let Some(subnet) = self
            .subnets(&r.rdid)
            .find(|o| o.vsid == r.vsid && o.prefix.contains(r.nexthop))
        else {
            return Err(invalid(format!(
                "next hop {} is in no subnet of VSID {} in {}: add that subnet first \
                 (nvctl route add --rdid {} --vsid {} --prefix CIDR --nexthop 0.0.0.0)",
                r.nexthop, r.vsid, r.rdid, r.rdid, r.vsid
            )));
        };
        if subnet.gateway_addr() == Some(r.nexthop) {
            return Err(invalid(format!(
                "next hop {} is the gateway of {}: a next hop is a VM's CA (a gateway or \
                 appliance with a lookup record)",
                r.nexthop, subnet.prefix
            )));
        }
        Ok(())
    }

    /// Checks that the route of `key` may go: no other route's next hop lies in it, if it is a
    /// subnet.
    pub fn check_del(&self, key: &RouteKey) -> Result<()> {
        let r = self
            .routes
            .get(key)
            .ok_or_else(|| NvError::NotFound(format!("no route {}", show_key(key))))?;
        if !r.on_link() {
            return Ok(());
        }
        if let Some(o) = self.routes.values().find(|o| {
            o.rdid == r.rdid && !o.on_link() && o.vsid == r.vsid && r.prefix.contains(o.nexthop)
        }) {
            return Err(NvError::Conflict(format!(
                "{} of VSID {} holds the next hop of {}: delete that route first",
                r.prefix,
                r.vsid,
                show(o)
            )));
        }
        Ok(())
    }

    /// Puts a route in (replacing the route of its key); returns the one replaced.
    pub fn insert(&mut self, r: RouteRecord) -> Option<RouteRecord> {
        let old = self.remove(&r.key());
        self.domains
            .entry(r.vsid)
            .or_insert_with(|| (r.rdid.clone(), 0))
            .1 += 1;
        self.routes.insert(r.key(), r);
        old
    }

    pub fn remove(&mut self, key: &RouteKey) -> Option<RouteRecord> {
        let old = self.routes.remove(key)?;
        if let Some((_, n)) = self.domains.get_mut(&old.vsid) {
            *n -= 1;
            if *n == 0 {
                self.domains.remove(&old.vsid);
            }
        }
        Some(old)
    }
}

/// Whether `inner` equals `outer` or lies inside it.
fn within(inner: Subnet, outer: Subnet) -> bool {
    inner.len >= outer.len && outer.contains(inner.addr)
}

/// A route in one line: `t1 10.2.0.0/16 via 10.1.0.254 (VSID 5001, metric 0)`.
pub fn show(r: &RouteRecord) -> String {
    if r.on_link() {
        format!(
            "{} {} on-link (VSID {}, metric {})",
            r.rdid, r.prefix, r.vsid, r.metric
        )
    } else {
        format!(
            "{} {} via {} (VSID {}, metric {})",
            r.rdid, r.prefix, r.nexthop, r.vsid, r.metric
        )
    }
}

pub fn show_key(key: &RouteKey) -> String {
    if key.2.is_unspecified() {
        format!("{} {} on-link", key.0, key.1)
    } else {
        format!("{} {} via {}", key.0, key.1, key.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(rdid: &str, vsid: u32, prefix: &str, nexthop: &str, metric: u32) -> RouteRecord {
        RouteRecord {
            rdid: rdid.parse().unwrap(),
            vsid,
            prefix: prefix.parse().unwrap(),
            nexthop: nexthop.parse().unwrap(),
            metric,
            gateway: None,
        }
    }

    fn none(_: u32, _: IpAddr) -> Option<String> {
        None
    }

    fn index(rows: &[RouteRecord]) -> RouteIndex {
        // In reverse: the order of rows does not matter.
        RouteIndex::from_rows(rows.iter().rev().cloned().collect()).unwrap()
    }

    fn refused(i: &RouteIndex, r: &RouteRecord) -> String {
        i.check_put(r, &none).unwrap_err().to_string()
    }

    #[test]
    fn a_domain_has_its_vsids_and_subnets_to_itself() {
        let i = index(&[
            route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0),
            route("red", 5002, "10.2.0.0/24", "0.0.0.0", 0),
            // Another domain's prefixes may be the same.
            route("blue", 6001, "10.1.0.0/24", "0.0.0.0", 0),
        ]);
        assert_eq!(i.domain_of(5001).map(Rdid::as_str), Some("red"));
        let e = refused(&i, &route("blue", 5001, "10.9.0.0/24", "0.0.0.0", 0));
        assert!(e.contains("belongs to routing domain red"), "{e}");
        let e = refused(&i, &route("red", 5003, "10.1.0.128/25", "0.0.0.0", 0));
        assert!(e.contains("overlaps 10.1.0.0/24 of VSID 5001"), "{e}");
        // A route replacing the route of its key keeps no conflict with itself.
        let mut moved = route("red", 5002, "10.2.0.0/24", "0.0.0.0", 0);
        moved.metric = 3;
        i.check_put(&moved, &none).unwrap();
    }

    #[test]
    fn next_hops_live_in_a_subnet_of_their_vsid() {
        let mut i = index(&[route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0)]);
        let default = route("red", 5001, "0.0.0.0/0", "10.1.0.254", 0);
        i.check_put(&default, &none).unwrap();
        let stored = index(&[
            route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0),
            default.clone(),
        ]);
        assert_eq!(stored.len(), 2, "a default route stored before its subnet");
        let e = refused(&i, &route("red", 5001, "0.0.0.0/0", "10.3.0.254", 1));
        assert!(e.contains("in no subnet of VSID 5001"), "{e}");
        let e = refused(&i, &route("red", 5001, "0.0.0.0/0", "10.1.0.1", 1));
        assert!(e.contains("is the gateway"), "{e}");
        i.insert(default.clone());
        let e = refused(&i, &route("red", 5001, "0.0.0.0/0", "10.1.0.253", 0));
        assert!(e.contains("with metric 0"), "{e}");
        i.check_put(&route("red", 5001, "0.0.0.0/0", "10.1.0.253", 1), &none)
            .unwrap();
        // The subnet stays while a next hop is in it.
        let subnet = route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0).key();
        let e = i.check_del(&subnet).unwrap_err().to_string();
        assert!(e.contains("holds the next hop"), "{e}");
        i.remove(&default.key());
        i.check_del(&subnet).unwrap();
        assert_eq!(
            i.matching(
                &"red".parse().unwrap(),
                "10.1.0.0/24".parse().unwrap(),
                None
            )
            .len(),
            1
        );
    }

    #[test]
    fn etcd_keys_round_trip() {
        let r = route("contoso", 5001, "10.1.0.0/24", "0.0.0.0", 0);
        let key = etcd_key(&r.key());
        assert_eq!(key, "/nv/v1/routes/contoso/10.1.0.0_24/0.0.0.0");
        assert_eq!(parse_etcd_key(key.as_bytes()), Some(r.key()));
        for bad in [
            "/nv/v1/routes/Contoso/10.1.0.0_24/0.0.0.0",
            "/nv/v1/routes/contoso/10.1.0.1_24/0.0.0.0",
            "/nv/v1/routes/contoso/10.1.0.0_24",
            "/nv/v1/routes/contoso/10.1.0.0_24/0.0.0.0/x",
            "/nv/v1/lookups/5001/10.0.0.1",
        ] {
            assert_eq!(parse_etcd_key(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn no_next_hop_takes_over_a_subnets_addresses() {
        let mut i = index(&[
            route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0),
            route("red", 5002, "10.2.0.0/24", "0.0.0.0", 0),
        ]);
        for inside in ["10.1.0.5/32", "10.1.0.0/24", "10.1.0.128/25"] {
            let e = refused(&i, &route("red", 5002, inside, "10.2.0.9", 1));
            assert!(e.contains("lies in 10.1.0.0/24"), "{inside}: {e}");
        }
        // Around a subnet (a default route) is what next hops are for.
        let default = route("red", 5002, "0.0.0.0/0", "10.2.0.9", 0);
        i.check_put(&default, &none).unwrap();
        i.insert(default);
        // And a subnet may not come to hold a next hop's prefix.
        let via = route("red", 5002, "10.8.0.0/24", "10.2.0.9", 0);
        i.check_put(&via, &none).unwrap();
        i.insert(via);
        let e = refused(&i, &route("red", 5003, "10.8.0.0/16", "0.0.0.0", 0));
        assert!(e.contains("would hold 10.8.0.0/24"), "{e}");
    }

    #[test]
    fn a_gateway_is_no_records_address() {
        let i = RouteIndex::default();
        let at = |vsid: u32, ca: IpAddr| {
            (vsid == 5001 && ca == IpAddr::from([10, 1, 0, 1])).then(|| "VM a".to_owned())
        };
        let r = route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0);
        let e = i.check_put(&r, &at).unwrap_err().to_string();
        assert!(e.contains("--gateway") && e.contains("VM a"), "{e}");
        let mut elsewhere = r.clone();
        elsewhere.gateway = Some(IpAddr::from([10, 1, 0, 254]));
        i.check_put(&elsewhere, &at).unwrap();
        let mut i = i;
        i.insert(elsewhere);
        let g = i.gateway_at(5001, IpAddr::from([10, 1, 0, 254])).unwrap();
        assert_eq!(g.route.prefix.to_string(), "10.1.0.0/24");
        assert!(i.gateway_at(5001, IpAddr::from([10, 1, 0, 1])).is_none());
        assert!(i.gateway_at(5002, IpAddr::from([10, 1, 0, 254])).is_none());
    }

    #[test]
    fn ipv6_routes_keep_the_same_rules_in_maps_of_their_own() {
        let i = index(&[
            route("red", 5001, "10.1.0.0/24", "0.0.0.0", 0),
            route("red", 5001, "fd00:1::/64", "::", 0),
            route("red", 5002, "fd00:2::/64", "::", 0),
            route("red", 5002, "fd00:99::/48", "fd00:2::9", 0),
        ]);
        let e = refused(&i, &route("red", 5003, "fd00:1::/80", "::", 0));
        assert!(e.contains("overlaps fd00:1::/64 of VSID 5001"), "{e}");
        let e = refused(&i, &route("red", 5001, "::/0", "fd00:2::9", 0));
        assert!(e.contains("in no subnet of VSID 5001"), "{e}");
        // The families never meet: an IPv4 default route is no IPv6 one.
        i.check_put(&route("red", 5001, "0.0.0.0/0", "10.1.0.9", 0), &none)
            .unwrap();
        let red = "red".parse().unwrap();
        let best = i.best(&red, "fd00:99::5".parse().unwrap()).unwrap();
        assert_eq!(best.nexthop.to_string(), "fd00:2::9");
        assert!(i.best(&red, "10.9.0.1".parse().unwrap()).is_none());
        let e = entries(&i);
        assert_eq!((e.routes.len(), e.gateways.len()), (1, 1));
        assert_eq!((e.routes6.len(), e.gateways6.len()), (3, 2));
        let rdid = domain_number(&red).to_be_bytes();
        let subnet = RouteKey6 {
            rdid,
            addr: "fd00:1::".parse::<std::net::Ipv6Addr>().unwrap().octets(),
        };
        let hop = e.routes6[&(DpRouteKey::prefix_len(64), subnet)];
        assert!(hop.on_link() && hop.vsid == 5001);
        assert_eq!(
            std::net::Ipv6Addr::from(hop.gateway).to_string(),
            "fd00:1::1"
        );
        assert_eq!(
            i.gateway_at(5002, "fd00:2::1".parse().unwrap())
                .map(|g| g.route.prefix.to_string()),
            Some("fd00:2::/64".to_owned())
        );
    }
}
