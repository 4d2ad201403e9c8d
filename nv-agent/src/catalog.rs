//! The agent's records in memory, with the indexes that keep every placement rule O(1) per
//! record, so a million records load, validate and change without scanning the table.
//!
//! A host holds every record of the VSIDs it hosts, millions on a big one, so a record costs
//! what it must and no more: (VSID, CA) → PA, MAC and method in 20 bytes; the few records with
//! a port or a name keep them beside the table. Records come out as [`LookupRecord`]s, built on
//! demand. IPv6 customer addresses have a table of their own ([`V6`]): NVGRE only, and a VM
//! here has its IPv4 record on the same port (its port's map entry is the IPv4 record's).
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    error::{NvError, Result, invalid},
    model::{LookupRecord, Mac, Method, ProviderState, RouteRecord},
    tables::{State, acls::AclIndex, routes::RouteIndex},
};

/// (VSID, CA): a lookup record's identity.
pub type Key = (u32, IpAddr);

/// (VSID, IPv4 CA) as the table keys it.
type Key4 = (u32, [u8; 4]);

/// (VSID, IPv6 CA).
type Key6 = (u32, [u8; 16]);

/// The IPv6 records: few next to the IPv4 ones, kept whole.
#[derive(Clone, Default)]
struct V6 {
    records: Map<Key6, LookupRecord>,
    by_port: Map<Box<str>, Key6>,
    by_mac: Map<(u32, [u8; 6]), Key6>,
    /// The method of a VSID's IPv6 records, and how many it has.
    by_vsid: Map<u32, (Method, u32)>,
}

/// The tables hash with foldhash: `SipHash` cost as much as the rest of an import's checks.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A record without its key, port and name: 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rec {
    /// The IPv4 PA, or (`Rec::PA6`) the index of an IPv6 one in `Catalog::pa6`: IPv4 customer
    /// addresses over an IPv6 underlay keep the 12-byte record.
    pa: [u8; 4],
    mac: [u8; 6],
    /// `Rec::REWRITE`, `Rec::PA6`.
    flags: u8,
}

impl Rec {
    const REWRITE: u8 = 1;
    const PA6: u8 = 2;

    fn rewrite(self) -> bool {
        self.flags & Rec::REWRITE != 0
    }
}

/// Who uses a provider address.
#[derive(Clone, Debug, Default)]
struct PaUse {
    records: u32,
    /// The rewrite record it is dedicated to, if any (IPv4's, or IPv6's).
    rewrite: Option<Key4>,
    rewrite6: Option<Key6>,
    /// Records with a port (this host's VMs) using it.
    local: u32,
}

/// The method a VSID uses and how many records it has.
#[derive(Clone, Debug)]
struct VsidUse {
    method: Method,
    records: u32,
}

#[derive(Clone, Default)]
pub struct Catalog {
    providers: Vec<ProviderState>,
    routes: RouteIndex,
    acls: AclIndex,
    records: Map<Key4, Rec>,
    ports: Map<Key4, Box<str>>,
    names: Map<Key4, Box<str>>,
    by_port: Map<Box<str>, Key4>,
    /// (VSID, MAC) → the CA that has it.
    by_mac: Map<(u32, [u8; 6]), [u8; 4]>,
    by_pa: Map<IpAddr, PaUse>,
    by_vsid: Map<u32, VsidUse>,
    v6: V6,
    /// The IPv6 PAs IPv4 records have named, by index (few: one per host, never dropped).
    pa6: Vec<Ipv6Addr>,
    pa6_index: Map<Ipv6Addr, u32>,
}

pub fn describe(r: &LookupRecord) -> String {
    match &r.name {
        Some(n) => format!("VSID {} CA {} ({n})", r.vsid, r.ca),
        None => format!("VSID {} CA {}", r.vsid, r.ca),
    }
}

fn v4(ip: IpAddr) -> Option<[u8; 4]> {
    match ip {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(_) => None,
    }
}

/// Two records of one VM that both use IP rewrite: each has a PA of its own (of its family).
fn both_rewrite(a: Method, b: Method) -> bool {
    a == Method::Rewrite && b == Method::Rewrite
}

fn key4(key: &Key) -> Option<Key4> {
    Some((key.0, v4(key.1)?))
}

fn key6(key: &Key) -> Option<Key6> {
    match key.1 {
        IpAddr::V6(a) => Some((key.0, a.octets())),
        IpAddr::V4(_) => None,
    }
}

fn ipv4_only(r: &LookupRecord) -> Result<Key4> {
    match v4(r.ca) {
        Some(ca) => Ok((r.vsid, ca)),
        None => Err(invalid(format!("{}: not an IPv4 record", describe(r)))),
    }
}

impl Catalog {
    /// Builds the catalog from stored state; a store that breaks a rule is reported, not
    /// silently repaired.
    pub fn from_state(state: State) -> Result<Catalog> {
        let routes = RouteIndex::from_rows(state.routes)
            .map_err(|e| NvError::store(crate::error::one_line(&e)))?;
        let acls = AclIndex::from_rows(state.acls)?;
        let mut c = Catalog {
            providers: state.providers,
            routes,
            acls,
            ..Catalog::default()
        };
        c.reserve(state.lookups.len());
        for r in state.lookups {
            r.validate().and_then(|()| c.check(&r, None)).map_err(|e| {
                NvError::store(format!(
                    "stored record {} is inconsistent: {e}",
                    describe(&r)
                ))
            })?;
            c.insert(r);
        }
        Ok(c)
    }

    pub fn to_state(&self) -> State {
        State {
            providers: self.providers.clone(),
            lookups: self.lookups(None),
            routes: self.routes.list(None),
            acls: self.acls.list(None),
        }
    }

    pub fn acls(&self) -> &AclIndex {
        &self.acls
    }

    pub fn acls_mut(&mut self) -> &mut AclIndex {
        &mut self.acls
    }

    /// The port entry `r` writes, if it writes it ([`Catalog::port_entry_of`]): the ACL flags
    /// of its VM.
    pub fn port_flags_of(&self, r: &LookupRecord) -> Option<u8> {
        self.port_entry_of(r).then(|| self.acl_flags_of(r))
    }

    /// The ACL flags of the port entry of `r`'s VM.
    pub fn acl_flags_of(&self, r: &LookupRecord) -> u8 {
        if self.acls.is_empty() {
            return 0;
        }
        let vm = r
            .port
            .as_deref()
            .map_or_else(|| vec![r.clone()], |p| self.on_port(p));
        self.acls.port_flags(&vm)
    }

    pub fn routes(&self) -> &RouteIndex {
        &self.routes
    }

    pub fn routes_mut(&mut self) -> &mut RouteIndex {
        &mut self.routes
    }

    /// Checks a route on its own and against the other routes and the records.
    pub fn check_route(&self, r: &RouteRecord) -> Result<()> {
        r.validate()?;
        self.routes
            .check_put(r, &|vsid, ca| self.get(&(vsid, ca)).map(|r| describe(&r)))
    }

    pub fn providers(&self) -> &[ProviderState] {
        &self.providers
    }

    pub fn providers_mut(&mut self) -> &mut Vec<ProviderState> {
        &mut self.providers
    }

    pub fn is_local_pa(&self, pa: IpAddr) -> bool {
        self.providers.iter().any(|p| p.pa.addr == pa)
    }

    /// The PA of an IPv4 record.
    fn pa_of(&self, r: Rec) -> IpAddr {
        if r.flags & Rec::PA6 == 0 {
            return IpAddr::V4(Ipv4Addr::from(r.pa));
        }
        let i = u32::from_le_bytes(r.pa) as usize;
        IpAddr::V6(self.pa6.get(i).copied().unwrap_or(Ipv6Addr::UNSPECIFIED))
    }

    /// How an IPv4 record holds `pa`: the address, or an IPv6 PA's index (`Rec::PA6`).
    fn pa_slot(&mut self, pa: IpAddr) -> ([u8; 4], u8) {
        match pa {
            IpAddr::V4(a) => (a.octets(), 0),
            IpAddr::V6(a) => {
                let next = u32::try_from(self.pa6.len()).unwrap_or(u32::MAX);
                let i = *self.pa6_index.entry(a).or_insert(next);
                if i == next {
                    self.pa6.push(a);
                }
                (i.to_le_bytes(), Rec::PA6)
            }
        }
    }

    fn record(&self, k: Key4, r: Rec) -> LookupRecord {
        LookupRecord {
            vsid: k.0,
            ca: IpAddr::V4(Ipv4Addr::from(k.1)),
            pa: self.pa_of(r),
            mac: Mac(r.mac),
            method: if r.rewrite() {
                Method::Rewrite
            } else {
                Method::Encap
            },
            port: self.ports.get(&k).map(ToString::to_string),
            name: self.names.get(&k).map(ToString::to_string),
            host: None,
        }
    }

    /// Every record, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = LookupRecord> + '_ {
        self.records
            .iter()
            .map(|(k, r)| self.record(*k, *r))
            .chain(self.v6.records.values().cloned())
    }

    /// The records in (VSID, CA) order (a VSID's IPv4 records before its IPv6 ones, as the
    /// store orders them), of one VSID or all.
    pub fn lookups(&self, vsid: Option<u32>) -> Vec<LookupRecord> {
        let mut keys: Vec<Key4> = self
            .records
            .keys()
            .filter(|k| vsid.is_none_or(|v| k.0 == v))
            .copied()
            .collect();
        keys.sort_unstable();
        let mut out: Vec<LookupRecord> = keys
            .into_iter()
            .map(|k| self.record(k, self.records[&k]))
            .collect();
        if !self.v6.records.is_empty() {
            out.extend(
                self.v6
                    .records
                    .values()
                    .filter(|r| vsid.is_none_or(|v| r.vsid == v))
                    .cloned(),
            );
            out.sort_by_key(|r| (r.vsid, r.ca.is_ipv6(), r.ca));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.records.len() + self.v6.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.v6.records.is_empty()
    }

    pub fn contains(&self, key: &Key) -> bool {
        match key6(key) {
            Some(k) => self.v6.records.contains_key(&k),
            None => key4(key).is_some_and(|k| self.records.contains_key(&k)),
        }
    }

    pub fn get(&self, key: &Key) -> Option<LookupRecord> {
        if let Some(k) = key6(key) {
            return self.v6.records.get(&k).cloned();
        }
        let k = key4(key)?;
        self.records.get(&k).map(|r| self.record(k, *r))
    }

    /// The record whose VM is behind `port`: its IPv4 record (whose entry the port's is), or
    /// its IPv6 one.
    pub fn by_port(&self, port: &str) -> Option<LookupRecord> {
        self.by_port
            .get(port)
            .map(|k| self.record(*k, self.records[k]))
            .or_else(|| {
                self.v6
                    .by_port
                    .get(port)
                    .map(|k| self.v6.records[k].clone())
            })
    }

    /// Every record of the VM behind `port`: IPv4 first.
    pub fn on_port(&self, port: &str) -> Vec<LookupRecord> {
        let v4 = self
            .by_port
            .get(port)
            .map(|k| self.record(*k, self.records[k]));
        let v6 = self
            .v6
            .by_port
            .get(port)
            .map(|k| self.v6.records[k].clone());
        v4.into_iter().chain(v6).collect()
    }

    /// The ports of this host's records (an IPv6-only VM's among them).
    pub fn ports(&self) -> impl Iterator<Item = &str> {
        self.by_port.keys().map(AsRef::as_ref).chain(
            self.v6
                .by_port
                .keys()
                .filter(|p| !self.by_port.contains_key(*p))
                .map(AsRef::as_ref),
        )
    }

    /// The records with a port: this host's VMs.
    pub fn local(&self) -> impl Iterator<Item = LookupRecord> + '_ {
        self.ports
            .keys()
            .map(|k| self.record(*k, self.records[k]))
            .chain(self.v6.by_port.values().map(|k| self.v6.records[k].clone()))
    }

    /// How many records are IPv6 records (each has an entry in the IPv6 lookup map).
    pub fn ipv6_records(&self) -> usize {
        self.v6.records.len()
    }

    /// How many records are IP rewrite records (each has an entry in the rewrite-PA map).
    pub fn rewrite_records(&self) -> usize {
        self.by_pa.values().filter(|u| u.rewrite.is_some()).count()
    }

    /// How many IPv6 records are IP rewrite records (each has an entry in the IPv6
    /// rewrite-PA map).
    pub fn rewrite6_records(&self) -> usize {
        self.by_pa.values().filter(|u| u.rewrite6.is_some()).count()
    }

    /// The IPv4 PAs of other hosts that records name: where this host's packets go.
    pub fn remote_pas4(&self) -> Vec<Ipv4Addr> {
        self.by_pa
            .iter()
            .filter(|(pa, u)| u.records > u.local && !self.is_local_pa(**pa))
            .filter_map(|(pa, _)| match pa {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// How many records without a port (other hosts' VMs) use `pa`.
    pub fn remote_users_of(&self, pa: IpAddr) -> usize {
        self.by_pa
            .get(&pa)
            .map_or(0, |u| (u.records - u.local) as usize)
    }

    /// Whether a local VM's rewrite record uses `pa`.
    pub fn is_local_rewrite_pa(&self, pa: IpAddr) -> bool {
        self.by_pa.get(&pa).is_some_and(|u| {
            u.rewrite.is_some_and(|k| self.ports.contains_key(&k))
                || u.rewrite6
                    .and_then(|k| self.v6.records.get(&k))
                    .is_some_and(|r| r.port.is_some())
        })
    }

    /// How many records with a port use `pa` (local records make a provider address busy).
    pub fn local_users_of(&self, pa: IpAddr) -> usize {
        self.by_pa.get(&pa).map_or(0, |u| u.local as usize)
    }

    /// The record's PA among this host's providers: whether it is one (a local PA), and
    /// the rules of a rewrite PA.
    fn provider_use(&self, r: &LookupRecord) -> Result<bool> {
        let provider = self.providers.iter().find(|p| p.pa.addr == r.pa);
        match provider {
            // The datapath takes a rewrite PA from the host: not an address the host had
            // before nv (its management address, say), which it would lose.
            Some(p) if r.method == Method::Rewrite && !p.added_address && !p.rewrite => {
                return Err(invalid(format!(
                    "PA {} was on {} before nv added it (a host address): it can carry NVGRE, \
                     never IP rewrite, whose PAs the datapath takes from the host; give the VM \
                     an address of its own (`nvctl provider add`)",
                    r.pa, p.dev
                )));
            }
            Some(p) if r.method != Method::Rewrite && p.rewrite => {
                return Err(invalid(format!(
                    "PA {} is a rewrite PA (the datapath's, not on {}): a rewrite record's \
                     only; delete the provider and add it again to carry NVGRE",
                    r.pa, p.dev
                )));
            }
            _ => {}
        }
        Ok(provider.is_some())
    }

    /// Whether the port's map entry is `r`'s: its IPv4 record's, or (an IPv6-only VM) its IPv6
    /// record's when its port has no IPv4 record. The entry's address is the one IPv4's checks
    /// read; IPv6's read the IPv6 records.
    pub fn port_entry_of(&self, r: &LookupRecord) -> bool {
        r.ca.is_ipv4()
            || r.port
                .as_deref()
                .is_none_or(|p| !self.by_port.contains_key(p))
    }

    /// Whether the record of `key` may go: a VM's IPv4 record stays while its IPv6 record
    /// is on the same port (the port's entry is the IPv4 record's).
    pub fn check_del(&self, key: &Key) -> Result<()> {
        if key4(key).is_none() {
            return Ok(());
        }
        // By VSID and MAC, which the two records share: the same answer on every host, the
        // VM's own or not.
        let Some(r) = self.get(key) else {
            return Ok(());
        };
        if let Some(k6) = self.v6.by_mac.get(&(r.vsid, r.mac.0)) {
            return Err(NvError::Conflict(format!(
                "the VM of {} also has the IPv6 record {}: delete that first",
                describe(&r),
                describe(&self.v6.records[k6])
            )));
        }
        Ok(())
    }

    /// A VM here has a port and a PA of this host's; a VM elsewhere neither.
    fn placed(&self, r: &LookupRecord) -> Result<()> {
        match (&r.port, self.provider_use(r)?) {
            (Some(_), false) => Err(invalid(format!(
                "PA {} is not a provider address of this host; a record with --port needs one (add it with `nvctl provider add`)",
                r.pa
            ))),
            (None, true) => Err(invalid(format!(
                "PA {} is a provider address of this host: give --port, the VM's port here",
                r.pa
            ))),
            _ => Ok(()),
        }
    }

    /// A subnet's gateway is the distributed router's address, no VM's.
    fn not_a_gateway(&self, r: &LookupRecord) -> Result<()> {
        match self.routes.gateway_at(r.vsid, r.ca) {
            Some(g) => Err(NvError::Conflict(format!(
                "{} is the gateway of {} in VSID {} (routing domain {}), the distributed \
                 router's address: give the VM another CA, or the subnet another --gateway",
                g.addr, g.route.prefix, r.vsid, g.route.rdid
            ))),
            None => Ok(()),
        }
    }

    /// Checks the rules that involve other records. `replacing` is the key of a record `r`
    /// replaces (a move), which does not count against it.
    pub fn check(&self, r: &LookupRecord, replacing: Option<&Key>) -> Result<()> {
        self.not_a_gateway(r)?;
        if r.ca.is_ipv6() {
            return self.check6(r, replacing);
        }
        ipv4_only(r)?;
        // Rewrite swaps addresses in place: an IPv4 packet keeps an IPv4 header.
        if r.method == Method::Rewrite && r.pa.is_ipv6() {
            return Err(invalid(format!(
                "{}: IP rewrite of an IPv4 customer address needs an IPv4 PA; over an IPv6 \
                 underlay, use NVGRE (--method encap)",
                describe(r)
            )));
        }
        let pa = r.pa;
        let replacing = replacing.and_then(key4);
        let own = |k: &Key4| replacing.as_ref() == Some(k);
        if replacing.is_none()
            && self.contains(&r.key())
            && let Some(existing) = self.get(&r.key())
        {
            return Err(NvError::Conflict(format!(
                "a lookup record for {} already exists; delete it first, or use `nvctl lookup move` to change its PA and port",
                describe(&existing)
            )));
        }
        self.placed(r)?;
        if let Some(port) = &r.port
            && let Some(k) = self.by_port.get(port.as_str())
            && !own(k)
        {
            return Err(NvError::Conflict(format!(
                "port '{port}' already belongs to {}",
                self.name(*k)
            )));
        }
        // An IPv6-only VM taking an IPv4 address: the same VM, its VSID and MAC.
        if let Some(port) = &r.port
            && let Some(k6) = self.v6.by_port.get(port.as_str())
            && let Some(v6) = self.v6.records.get(k6)
            && (v6.vsid != r.vsid || v6.mac != r.mac)
        {
            return Err(invalid(format!(
                "port '{port}' is {} with MAC {}: its IPv4 record has the same VSID and MAC",
                describe(v6),
                v6.mac
            )));
        }
        // IP rewrite dedicates a PA to one CA: no other record, of either method, may share it.
        if let Some(u) = self.by_pa.get(&pa) {
            let replaced_here = replacing
                .and_then(|k| self.records.get(&k))
                .is_some_and(|o| self.pa_of(*o) == pa);
            let others = u.records - u32::from(replaced_here);
            let rewrite_other = u.rewrite.filter(|k| !own(k));
            if (r.method == Method::Rewrite && others > 0)
                || rewrite_other.is_some()
                || u.rewrite6.is_some()
            {
                let other = rewrite_other
                    .or_else(|| self.user_of(pa, replacing))
                    .map_or_else(|| "another record".to_owned(), |k| self.name(k));
                return Err(NvError::Conflict(format!(
                    "PA {} is already used by {other}; a rewrite record needs a PA of its own",
                    r.pa
                )));
            }
        }
        self.one_method4(r, replacing)?;
        if let Some(ca) = self.by_mac.get(&(r.vsid, r.mac.0))
            && !own(&(r.vsid, *ca))
        {
            return Err(NvError::Conflict(format!(
                "MAC {} is already used by {}",
                r.mac,
                self.name((r.vsid, *ca))
            )));
        }
        // The MAC of an IPv6 record of the VSID is that VM's: the same PA and port only (by
        // rewrite, a PA of each family, each its CA's own).
        if let Some(k) = self.v6.by_mac.get(&(r.vsid, r.mac.0))
            && let Some(other) = self.v6.records.get(k)
            && ((other.pa != r.pa && !both_rewrite(other.method, r.method)) || other.port != r.port)
        {
            return Err(NvError::Conflict(format!(
                "MAC {} is {}'s, a VM with another PA or port",
                r.mac,
                describe(other)
            )));
        }
        Ok(())
    }

    /// The rules of an IPv6 record: IP rewrite over an IPv6 PA of its own only; one method
    /// per VSID; a VM here keeps its IPv4 record on the same port, with the same VSID and
    /// MAC; a MAC is one VM's in its VSID.
    fn check6(&self, r: &LookupRecord, replacing: Option<&Key>) -> Result<()> {
        let Some(key) = key6(&r.key()) else {
            return Err(invalid("not an IPv6 record"));
        };
        let own = |k: &Key6| replacing.and_then(key6).as_ref() == Some(k);
        if r.method == Method::Rewrite && r.pa.is_ipv4() {
            return Err(invalid(format!(
                "{}: IP rewrite of an IPv6 customer address needs an IPv6 PA; over an IPv4 \
                 underlay, use NVGRE (--method encap)",
                describe(r)
            )));
        }
        if let Some(existing) = self.v6.records.get(&key)
            && !own(&key)
        {
            return Err(NvError::Conflict(format!(
                "a lookup record for {} already exists; delete it first",
                describe(existing)
            )));
        }
        self.one_method6(r, replacing)?;
        self.dedicated6(r, replacing)?;
        self.placed(r)?;
        if let Some(port) = &r.port {
            if let Some(k) = self.v6.by_port.get(port.as_str())
                && !own(k)
            {
                return Err(NvError::Conflict(format!(
                    "port '{port}' already has the IPv6 record {}",
                    describe(&self.v6.records[k])
                )));
            }
            // An IPv6-only VM's port has no IPv4 record; a dual-stack VM's is the same VM's.
            if let Some(v4) = self.by_port(port).filter(|v| v.ca.is_ipv4())
                && (v4.vsid != r.vsid || v4.mac != r.mac)
            {
                return Err(invalid(format!(
                    "port '{port}' is {} with MAC {}: its IPv6 record has the same VSID \
                         and MAC",
                    describe(&v4),
                    v4.mac
                )));
            }
        }
        if let Some(k) = self.v6.by_mac.get(&(r.vsid, r.mac.0))
            && !own(k)
        {
            return Err(NvError::Conflict(format!(
                "MAC {} is already used by {}",
                r.mac,
                describe(&self.v6.records[k])
            )));
        }
        // The MAC of an IPv4 record of the VSID is that VM's: the same PA (and port) only (by
        // rewrite, a PA of each family, each its CA's own).
        if let Some(ca) = self.by_mac.get(&(r.vsid, r.mac.0))
            && let Some(rec) = self.records.get(&(r.vsid, *ca))
            && ((self.pa_of(*rec) != r.pa && !(rec.rewrite() && r.method == Method::Rewrite))
                || self.ports.get(&(r.vsid, *ca)).map(AsRef::as_ref) != r.port.as_deref())
        {
            return Err(NvError::Conflict(format!(
                "MAC {} is {}'s, a VM with another PA or port",
                r.mac,
                self.name((r.vsid, *ca))
            )));
        }
        Ok(())
    }

    /// One method per VSID, across both families: a sender can only rewrite if it has a
    /// rewrite PA itself, so mixing methods in a VSID would leave some pairs unable to talk.
    /// The VSID's only record may change its own (a move).
    fn one_method4(&self, r: &LookupRecord, replacing: Option<Key4>) -> Result<()> {
        let own = |k: &Key4| replacing.as_ref() == Some(k);
        if let Some(v) = self.by_vsid.get(&r.vsid)
            && v.method != r.method
        {
            let replaced_alone = v.records == 1
                && replacing.is_some_and(|k| k.0 == r.vsid && self.records.contains_key(&k));
            if !replaced_alone {
                let example = self
                    .records
                    .keys()
                    .find(|k| k.0 == r.vsid && !own(k))
                    .map_or_else(|| "another record".to_owned(), |k| self.name(*k));
                return Err(NvError::Conflict(format!(
                    "VSID {} uses method {} ({example}); all records of a VSID use one method",
                    r.vsid, v.method
                )));
            }
        }
        if let Some((method, _)) = self.v6.by_vsid.get(&r.vsid)
            && *method != r.method
        {
            return Err(NvError::Conflict(format!(
                "VSID {} uses method {method} (its IPv6 records); all records of a VSID use one \
                 method",
                r.vsid
            )));
        }
        Ok(())
    }

    /// One method per VSID, across both families (the VSID's only IPv6 record may change
    /// its own).
    fn one_method6(&self, r: &LookupRecord, replacing: Option<&Key>) -> Result<()> {
        if let Some(v) = self.by_vsid.get(&r.vsid)
            && v.method != r.method
        {
            return Err(NvError::Conflict(format!(
                "VSID {} uses method {} (its IPv4 records); all records of a VSID use one method",
                r.vsid, v.method
            )));
        }
        if let Some((method, n)) = self.v6.by_vsid.get(&r.vsid)
            && *method != r.method
        {
            let replaced_alone = *n == 1
                && replacing
                    .and_then(key6)
                    .is_some_and(|k| k.0 == r.vsid && self.v6.records.contains_key(&k));
            if !replaced_alone {
                return Err(NvError::Conflict(format!(
                    "VSID {} uses method {method} (its IPv6 records); all records of a VSID use \
                     one method",
                    r.vsid
                )));
            }
        }
        Ok(())
    }

    /// IP rewrite dedicates a PA to one CA: no other record, of either method or family, may
    /// share it.
    fn dedicated6(&self, r: &LookupRecord, replacing: Option<&Key>) -> Result<()> {
        let Some(u) = self.by_pa.get(&r.pa) else {
            return Ok(());
        };
        let replaced_here = replacing
            .and_then(|k| self.get(k))
            .is_some_and(|o| o.pa == r.pa);
        let others = u.records - u32::from(replaced_here);
        let own = replacing.and_then(key6);
        let rewrite_other = u.rewrite.is_some() || u.rewrite6.is_some_and(|k| Some(k) != own);
        if (r.method == Method::Rewrite && others > 0) || rewrite_other {
            return Err(NvError::Conflict(format!(
                "PA {} is already used by another record; a rewrite record needs a PA of its own",
                r.pa
            )));
        }
        Ok(())
    }

    fn insert6(&mut self, key: Key6, r: LookupRecord) -> Option<LookupRecord> {
        let old = self.remove(&r.key());
        let v = self.v6.by_vsid.entry(r.vsid).or_insert((r.method, 0));
        v.1 += 1;
        if let Some(port) = &r.port {
            self.v6.by_port.insert(port.as_str().into(), key);
        }
        self.v6.by_mac.insert((r.vsid, r.mac.0), key);
        let u = self.by_pa.entry(r.pa).or_default();
        u.records += 1;
        u.local += u32::from(r.port.is_some());
        if r.method == Method::Rewrite {
            u.rewrite6 = Some(key);
        }
        self.v6.records.insert(key, r);
        old
    }

    fn remove6(&mut self, key: Key6) -> Option<LookupRecord> {
        let r = self.v6.records.remove(&key)?;
        if let Some(port) = &r.port {
            self.v6.by_port.remove(port.as_str());
        }
        self.v6.by_mac.remove(&(r.vsid, r.mac.0));
        if let Some(u) = self.by_pa.get_mut(&r.pa) {
            u.records -= 1;
            u.local -= u32::from(r.port.is_some());
            if u.rewrite6 == Some(key) {
                u.rewrite6 = None;
            }
            if u.records == 0 {
                self.by_pa.remove(&r.pa);
            }
        }
        if let Some(v) = self.v6.by_vsid.get_mut(&r.vsid) {
            v.1 -= 1;
            if v.1 == 0 {
                self.v6.by_vsid.remove(&r.vsid);
            }
        }
        Some(r)
    }

    /// A record using `pa` other than `not`, to name in an error (a scan: errors only).
    fn user_of(&self, pa: IpAddr, not: Option<Key4>) -> Option<Key4> {
        self.records
            .iter()
            .find(|(k, r)| self.pa_of(**r) == pa && Some(**k) != not)
            .map(|(k, _)| *k)
    }

    fn name(&self, k: Key4) -> String {
        match self.records.get(&k) {
            Some(r) => describe(&self.record(k, *r)),
            None => format!("VSID {} CA {}", k.0, Ipv4Addr::from(k.1)),
        }
    }

    /// Adds or replaces a record (its checks already passed) and returns the one it replaced.
    ///
    /// # Panics
    /// On an IPv6 address, which [`LookupRecord::validate`] and [`Catalog::check`] refuse.
    pub fn insert(&mut self, r: LookupRecord) -> Option<LookupRecord> {
        if let Some(key) = key6(&r.key()) {
            return self.insert6(key, r);
        }
        let key = ipv4_only(&r).expect("checked records have an IPv4 CA");
        let pa = r.pa;
        let old = self.remove(&r.key());
        let (pa_slot, pa_flags) = self.pa_slot(pa);
        let rewrite = r.method == Method::Rewrite;
        if let Some(port) = r.port {
            let port: Box<str> = port.into();
            self.by_port.insert(port.clone(), key);
            self.ports.insert(key, port);
            self.by_pa.entry(pa).or_default().local += 1;
        }
        if let Some(name) = r.name {
            self.names.insert(key, name.into());
        }
        self.by_mac.insert((r.vsid, r.mac.0), key.1);
        let u = self.by_pa.entry(pa).or_default();
        u.records += 1;
        if rewrite {
            u.rewrite = Some(key);
        }
        self.by_vsid
            .entry(r.vsid)
            .or_insert(VsidUse {
                method: r.method,
                records: 0,
            })
            .records += 1;
        self.records.insert(
            key,
            Rec {
                pa: pa_slot,
                mac: r.mac.0,
                flags: pa_flags | if rewrite { Rec::REWRITE } else { 0 },
            },
        );
        old
    }

    pub fn remove(&mut self, key: &Key) -> Option<LookupRecord> {
        if let Some(k) = key6(key) {
            return self.remove6(k);
        }
        let k = key4(key)?;
        let rec = *self.records.get(&k)?;
        let r = self.record(k, rec);
        let pa = r.pa;
        self.records.remove(&k);
        if let Some(port) = self.ports.remove(&k) {
            self.by_port.remove(&port);
            if let Some(u) = self.by_pa.get_mut(&pa) {
                u.local -= 1;
            }
        }
        self.names.remove(&k);
        self.by_mac.remove(&(k.0, rec.mac));
        if let Some(u) = self.by_pa.get_mut(&pa) {
            u.records -= 1;
            if u.rewrite == Some(k) {
                u.rewrite = None;
            }
            if u.records == 0 {
                self.by_pa.remove(&pa);
            }
        }
        if let Some(v) = self.by_vsid.get_mut(&k.0) {
            v.records -= 1;
            if v.records == 0 {
                self.by_vsid.remove(&k.0);
            }
        }
        Some(r)
    }

    /// Makes room for `more` records at once (an import), instead of growing step by step.
    pub fn reserve(&mut self, more: usize) {
        self.records.reserve(more);
        self.by_mac.reserve(more);
    }

    /// Whether the record `key` has a port here (a VM of this host).
    pub fn is_local(&self, key: &Key) -> bool {
        match key6(key) {
            Some(k) => self.v6.records.get(&k).is_some_and(|r| r.port.is_some()),
            None => key4(key).is_some_and(|k| self.ports.contains_key(&k)),
        }
    }

    /// Gives memory back after a big table shrank (a rolled-back import).
    pub fn shrink(&mut self) {
        self.records.shrink_to_fit();
        self.by_mac.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ca: &str, pa: &str, mac: u8) -> LookupRecord {
        LookupRecord {
            vsid: 5001,
            ca: ca.parse().unwrap(),
            pa: pa.parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, mac]),
            method: Method::Encap,
            port: None,
            name: None,
            host: None,
        }
    }

    #[test]
    fn records_come_back_as_they_went_in_and_in_order() {
        let mut c = Catalog::default();
        let mut b = record("10.0.0.2", "198.18.0.2", 2);
        b.name = Some("B".into());
        let a = record("10.0.0.1", "198.18.0.2", 1);
        for r in [b.clone(), a.clone()] {
            c.check(&r, None).unwrap();
            assert!(c.insert(r).is_none());
        }
        assert_eq!(c.lookups(None), vec![a.clone(), b.clone()]);
        assert_eq!(c.get(&b.key()), Some(b.clone()));
        assert_eq!(c.remove(&a.key()), Some(a));
        assert_eq!(c.lookups(Some(5001)), vec![b]);
        assert!(c.lookups(Some(6001)).is_empty());
    }

    #[test]
    fn rules_against_other_records() {
        let mut c = Catalog::default();
        let a = record("10.0.0.1", "198.18.0.2", 1);
        c.insert(a.clone());
        assert!(
            c.check(&a, None)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        let same_mac = record("10.0.0.9", "198.18.0.2", 1);
        assert!(
            c.check(&same_mac, None)
                .unwrap_err()
                .to_string()
                .contains("MAC")
        );
        let mut rewrite = record("10.0.0.3", "198.18.0.2", 3);
        rewrite.method = Method::Rewrite;
        let err = c.check(&rewrite, None).unwrap_err().to_string();
        assert!(
            err.contains("PA 198.18.0.2 is already used by VSID 5001 CA 10.0.0.1"),
            "{err}"
        );
        rewrite.pa = "198.18.1.3".parse().unwrap();
        let err = c.check(&rewrite, None).unwrap_err().to_string();
        assert!(
            err.contains("uses method encap (VSID 5001 CA 10.0.0.1)"),
            "{err}"
        );
        // The VSID's only record may change its own method (a move).
        let mut moved = a.clone();
        moved.method = Method::Rewrite;
        moved.pa = "198.18.1.1".parse().unwrap();
        c.check(&moved, Some(&a.key())).unwrap();
        // IPv4 over an IPv6 underlay: NVGRE, not rewrite.
        let mut rw6 = record("10.0.0.4", "198.18.0.2", 4);
        rw6.pa = "2001:db8::2".parse().unwrap();
        rw6.method = Method::Rewrite;
        let err = c.check(&rw6, None).unwrap_err().to_string();
        assert!(err.contains("needs an IPv4 PA"), "{err}");
    }

    #[test]
    fn ipv6_rewrite_dedicates_an_ipv6_pa_and_keeps_one_method_per_vsid() {
        let mut c = Catalog::default();
        let rw = |ca: &str, pa: &str, mac: u8| {
            let mut r = record(ca, pa, mac);
            r.method = Method::Rewrite;
            r
        };
        // A dual-stack VM by rewrite: a PA of each family, each its CA's own.
        let a4 = rw("10.0.0.1", "198.18.1.1", 1);
        let a6 = rw("fd00::1", "2001:2::1:1", 1);
        for r in [&a4, &a6] {
            c.check(r, None).unwrap();
            c.insert(r.clone());
        }
        assert_eq!(c.rewrite_records(), 1);
        assert_eq!(c.rewrite6_records(), 1);
        // Its IPv6 PA is its own: no other record of either method or family may use it.
        // (An NVGRE record in another VSID, so the VSID's method is not what refuses it.)
        for (ca, method, vsid) in [
            ("fd00::2", Method::Rewrite, 5001),
            ("fd00::2", Method::Encap, 5002),
            ("10.0.0.3", Method::Encap, 5002),
        ] {
            let mut r = rw(ca, "2001:2::1:1", 2);
            r.method = method;
            r.vsid = vsid;
            let err = c.check(&r, None).unwrap_err().to_string();
            assert!(err.contains("a PA of its own"), "{ca} {method}: {err}");
        }
        // One method per VSID, across families.
        let enc6 = record("fd00::4", "2001:2::4", 4);
        let err = c.check(&enc6, None).unwrap_err().to_string();
        assert!(err.contains("one method"), "{err}");
        // IPv6 rewrite over an IPv4 PA is refused.
        let err = c
            .check(&rw("fd00::5", "198.18.1.5", 5), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs an IPv6 PA"), "{err}");
        // Deleting the IPv6 record frees its PA.
        c.remove(&a6.key());
        assert_eq!(c.rewrite6_records(), 0);
        c.check(&rw("fd00::2", "2001:2::1:1", 2), None).unwrap();
    }

    #[test]
    fn ipv4_records_over_ipv6_pas_keep_their_pa() {
        let mut c = Catalog::default();
        let mut recs = Vec::new();
        for (i, pa) in ["2001:2::1", "198.18.0.2", "2001:2::2", "2001:2::1"]
            .iter()
            .enumerate()
        {
            let i = u8::try_from(i).unwrap() + 1;
            let mut r = record(&format!("10.0.0.{i}"), "198.18.0.2", i);
            r.pa = pa.parse().unwrap();
            c.check(&r, None).unwrap();
            c.insert(r.clone());
            recs.push(r);
        }
        for r in &recs {
            assert_eq!(c.get(&r.key()).as_ref(), Some(r));
        }
        assert_eq!(c.remote_users_of("2001:2::1".parse().unwrap()), 2);
        assert_eq!(c.remote_users_of("2001:2::2".parse().unwrap()), 1);
        assert_eq!(c.remote_users_of("198.18.0.2".parse().unwrap()), 1);
        // A VM's IPv6 record shares its IPv4 record's PA, whatever its family.
        let mut a6 = recs[0].clone();
        a6.ca = "fd00::1".parse().unwrap();
        c.check(&a6, None).unwrap();
        a6.pa = "2001:2::2".parse().unwrap();
        let err = c.check(&a6, None).unwrap_err().to_string();
        assert!(err.contains("another PA"), "{err}");
        c.remove(&recs[0].key());
        assert_eq!(c.remote_users_of("2001:2::1".parse().unwrap()), 1);
        assert_eq!(c.get(&recs[3].key()).map(|r| r.pa), Some(recs[3].pa));
    }

    #[test]
    fn an_ipv6_record_joins_its_vm_s_ipv4_record_by_nvgre_only() {
        let mut c = Catalog::default();
        let a = record("10.0.0.1", "198.18.0.2", 1);
        c.check(&a, None).unwrap();
        c.insert(a.clone());
        // The same VM's IPv6 address: same PA and MAC.
        let mut a6 = record("10.0.0.1", "198.18.0.2", 1);
        a6.ca = "fd00::1".parse().unwrap();
        c.check(&a6, None).unwrap();
        c.insert(a6.clone());
        assert_eq!(c.get(&a6.key()), Some(a6.clone()));
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookups(None), vec![a.clone(), a6.clone()]);
        // Again, by rewrite, or with another VM's MAC.
        let err = c.check(&a6, None).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let mut rw = a6.clone();
        rw.ca = "fd00::9".parse().unwrap();
        rw.mac = Mac([2, 0, 0, 0, 0, 9]);
        rw.method = Method::Rewrite;
        let err = c.check(&rw, None).unwrap_err().to_string();
        assert!(err.contains("NVGRE"), "{err}");
        let mut other = a6.clone();
        other.ca = "fd00::2".parse().unwrap();
        other.pa = "198.18.0.3".parse().unwrap();
        let err = c.check(&other, None).unwrap_err().to_string();
        assert!(err.contains("MAC"), "{err}");
        // A port with no IPv4 record.
        let mut here = a6.clone();
        here.ca = "fd00::3".parse().unwrap();
        here.mac = Mac([2, 0, 0, 0, 0, 3]);
        here.port = Some("vm3".into());
        let err = c.check(&here, None).unwrap_err().to_string();
        assert!(
            err.contains("provider address") || err.contains("IPv4 record"),
            "{err}"
        );
        assert_eq!(c.remove(&a6.key()), Some(a6));
        assert_eq!(c.lookups(None), vec![a]);
    }
}
