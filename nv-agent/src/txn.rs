//! Transactions: one change set applied to catalog, maps and store as a whole, or not at all.
//!
//! Every change the agent makes goes through [`Tables::apply`]: the changes are checked and
//! applied to the catalog one by one (each checked against the ones before it), the map writes
//! they need are worked out from the records before and after ([`crate::translate`]) and made in
//! order (new entries before stale ones, so a record being replaced never disappears), and last
//! the change is committed to the [`Journal`]. A failure at any step undoes the steps before it:
//! the writes made so far are undone in reverse with the values they replaced, and the catalog
//! is put back. The store is written last, so it never needs undoing: a crash before the commit
//! leaves maps ahead of the store, and the next start's reconcile takes them back.
//!
//! Nothing here touches the kernel: [`Maps`] and [`Journal`] are the seams. The agent plugs in
//! the datapath and the local database; the unit tests plug in maps that fail on the write they
//! are told to; a cluster store plugs in where the journal is.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use nv_common::{
    DatapathConfig, LocalPa, LookupKey, LookupValue, PortInfo, RewritePa, V4,
    acl::{AclMeterKey, AclSet, AclSetKey},
    routing::{GatewayKey, GatewayKey6, RouteHop, RouteHop6, RouteKey, RouteKey6, VsidRouting},
};

use crate::{
    catalog::Catalog,
    error::{NvError, Result},
    model::LookupRecord,
    ports::PortTracker,
    tables::{Change, acls, routes},
    translate::{self, Attached},
};

/// Where a change becomes durable: the local database, or a cluster store.
pub trait Journal: Sync {
    /// Writes `changes` as one transaction that is not durable until committed, and is
    /// dropped (aborted) otherwise. May give up early, with an error, once `stop` is set.
    fn prepare(&self, changes: &[Change], stop: &AtomicBool) -> Result<Box<dyn Pending + '_>>;
}

/// A journal transaction written and not committed.
pub trait Pending: Send {
    /// Makes the transaction durable; on error none of it is.
    fn commit(self: Box<Self>) -> Result<()>;
}

impl Journal for crate::store::Store {
    fn prepare(&self, changes: &[Change], stop: &AtomicBool) -> Result<Box<dyn Pending + '_>> {
        Ok(Box::new(crate::store::Store::prepare(self, changes, stop)?))
    }
}

impl Pending for crate::store::Pending {
    fn commit(self: Box<Self>) -> Result<()> {
        crate::store::Pending::commit(*self)
    }
}

/// One write into the datapath: an entry put (`Some`) or removed (`None`), the config, or the
/// from-VM program put on a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// The from-VM program on the port of that name (it stays while the device exists).
    Filter(String),
    Port(u32, Option<PortInfo>),
    Hosted(u32, Option<u32>),
    /// A rewrite PA's entry, by its 16-byte form (the map of its family).
    Rewrite(nv_common::Addr, Option<RewritePa>),
    Lookup(LookupKey, Option<LookupValue>),
    Lookup6(nv_common::LookupKey6, Option<LookupValue>),
    LocalPa(V4, Option<LocalPa>),
    LocalPa6(nv_common::Addr, Option<LocalPa>),
    /// The distributed router's entries ([`crate::tables::routes::RouteEntries`]).
    VsidRouting(u32, Option<VsidRouting>),
    Route((u32, RouteKey), Option<RouteHop>),
    Gateway(GatewayKey, Option<u32>),
    Route6((u32, RouteKey6), Option<RouteHop6>),
    Gateway6(GatewayKey6, Option<u32>),
    /// Boxed: the config is 128 bytes of filter, and an import makes a million writes.
    Config(Box<DatapathConfig>),
    /// A VM's ACL rules of one direction ([`crate::tables::acls::AclEntries`]), 86 KB.
    AclSet(AclSetKey, Option<Box<AclSet>>),
    /// A VM's flow sets: made (empty, where missing: flows a restart finds stay) up to the
    /// count, or all taken away.
    AclFlows(acls::Vm, Option<u32>),
    /// A rule's meter in one direction: made (at zero, where missing) or taken away.
    AclMeter(AclMeterKey, bool),
}

impl Write {
    /// The write that empties the slot this one writes (entries only).
    fn emptied(&self) -> Option<Write> {
        Some(match self {
            Write::Port(i, _) => Write::Port(*i, None),
            Write::Hosted(v, _) => Write::Hosted(*v, None),
            Write::Rewrite(pa, _) => Write::Rewrite(*pa, None),
            Write::Lookup(k, _) => Write::Lookup(*k, None),
            Write::Lookup6(k, _) => Write::Lookup6(*k, None),
            Write::LocalPa(pa, _) => Write::LocalPa(*pa, None),
            Write::LocalPa6(pa, _) => Write::LocalPa6(*pa, None),
            Write::VsidRouting(v, _) => Write::VsidRouting(*v, None),
            Write::Route(k, _) => Write::Route(*k, None),
            Write::Gateway(k, _) => Write::Gateway(*k, None),
            Write::Route6(k, _) => Write::Route6(*k, None),
            Write::Gateway6(k, _) => Write::Gateway6(*k, None),
            Write::AclSet(k, _) => Write::AclSet(*k, None),
            Write::AclFlows(k, _) => Write::AclFlows(*k, None),
            Write::AclMeter(k, _) => Write::AclMeter(*k, false),
            Write::Filter(_) | Write::Config(_) => return None,
        })
    }
}

/// A list of writes stopped by a failure: how many went in before it, and why.
#[derive(Debug)]
pub struct Stopped {
    pub done: usize,
    pub error: NvError,
}

/// The datapath as the transaction path writes it.
pub trait Maps {
    /// Makes `writes` in order, stopping at the first that fails.
    fn write_all(&mut self, writes: &[Write]) -> std::result::Result<(), Stopped>;
}

/// A change set checked and applied to the catalog, with the map writes it needs.
struct Planned {
    plan: Plan,
    undo: Vec<Undo>,
    /// Where the ports the set touched are now (`None`: missing, or no record's).
    ports: HashMap<String, Option<Attached>>,
    config: DatapathConfig,
    /// Changes left out (lenient checks): their index, why.
    skipped: Vec<(usize, NvError)>,
}

/// The aggregates a change set may change, before it: the hosted VSIDs (local records
/// changed), the router's entries (routes changed), the ACL entries and port entries (local
/// records or rules changed).
struct Aggregates {
    hosted: Option<HashMap<u32, u32>>,
    routes: Option<routes::RouteEntries>,
    acls: Option<(acls::AclEntries, HashMap<u32, PortInfo>)>,
}

/// A caller's check of one change, with the changes before it applied.
type CheckFn<'a> = dyn FnMut(&Catalog, &Change) -> Result<()> + 'a;

/// How a change set's changes are checked.
enum Checks<'a> {
    /// By the caller; the first refusal refuses the whole set.
    Strict(Box<CheckFn<'a>>),
    /// Each record on its own ([`LookupRecord::validate`], the catalog's rules); a refused one
    /// is left out (and its key's record, if any, removed).
    Lenient,
}

impl Checks<'_> {
    fn check(&mut self, catalog: &Catalog, change: &Change) -> Result<()> {
        match self {
            Checks::Strict(check) => check(catalog, change),
            Checks::Lenient => match change {
                Change::PutLookup { record } => {
                    crate::control::admit::admit_watched(catalog, record)
                }
                Change::PutRoute { route } => catalog.check_route(route),
                Change::PutAcl { rule } => rule.validate(),
                _ => Ok(()),
            },
        }
    }
}

/// Change sets at least this big are written into the journal alongside (an import).
const ALONGSIDE: usize = 4096;

/// The VM ports that exist now, by name, as the caller found them (veth or tap devices).
pub type Links = HashMap<String, Attached>;

#[cfg(test)]
mod tests;

/// What the agent holds besides the store: the catalog, the ports it filters and the config
/// map's contents.
#[derive(Clone)]
pub struct Tables {
    pub catalog: Catalog,
    pub ports: PortTracker,
    /// The config map without the rewrite-PA filter: uplink, MTU, hook, bounce pair.
    pub base: DatapathConfig,
    /// What the config map holds.
    pub config: DatapathConfig,
}

/// What an applied change set did beyond the maps.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Ports that got the from-VM program now (a new VM port: give it the VM MTU).
    pub filtered: Vec<String>,
    /// Ports no record names any more; they stay filtered, their frames dropped.
    pub released: Vec<String>,
}

/// The writes of a change set, each with how to undo it.
#[derive(Default)]
struct Plan {
    writes: Vec<Write>,
    /// Per write: [`KEEP`] (a filter: it stays, and its port becomes one without a record),
    /// [`EMPTY`] (the slot was empty: empty it again), or the index of the write in `restores`
    /// that puts back what was there. An import's million puts need no restores.
    undo: Vec<u32>,
    restores: Vec<Write>,
    /// Ports filtered by this plan, at their ifindex.
    filtered: Vec<(String, u32)>,
}

const KEEP: u32 = u32::MAX;
const EMPTY: u32 = u32::MAX - 1;

impl Plan {
    fn push(&mut self, write: Write, undo: Write) {
        let empties = undo.emptied().is_some_and(|e| e == undo);
        self.writes.push(write);
        if empties {
            self.undo.push(EMPTY);
        } else {
            self.undo
                .push(u32::try_from(self.restores.len()).expect("fewer restores than writes"));
            self.restores.push(undo);
        }
    }

    fn filter(&mut self, port: &str, ifindex: u32) {
        if !self.filtered.iter().any(|(p, _)| p == port) {
            self.writes.push(Write::Filter(port.to_owned()));
            self.undo.push(KEEP);
            self.filtered.push((port.to_owned(), ifindex));
        }
    }

    fn append(&mut self, other: Plan) {
        let base = u32::try_from(self.restores.len()).expect("fewer restores than writes");
        self.writes.extend(other.writes);
        self.undo.extend(
            other
                .undo
                .into_iter()
                .map(|u| if u >= EMPTY { u } else { u + base }),
        );
        self.restores.extend(other.restores);
        self.filtered.extend(other.filtered);
    }

    /// Undoes the first `done` writes, last first. A failure here leaves maps the next
    /// reconcile repairs; it is logged, and the caller reports the first failure.
    fn undo(&self, maps: &mut dyn Maps, done: usize) {
        let undo: Vec<Write> = (0..done)
            .rev()
            .filter_map(|i| match self.undo[i] {
                KEEP => None,
                EMPTY => self.writes[i].emptied(),
                r => Some(self.restores[r as usize].clone()),
            })
            .collect();
        if let Err(Stopped { error, .. }) = maps.write_all(&undo) {
            tracing::error!(
                "undoing a change in the maps failed too ({error}); the next reconcile repairs them"
            );
        }
    }

    /// The ports this plan filtered among its first `done` writes (filters come first).
    fn filtered_by(&self, done: usize) -> &[(String, u32)] {
        &self.filtered[..self.filtered.len().min(done)]
    }
}

/// Where each port is for this change set: the tracker's view with the set's own changes on
/// top (`None`: no record's port, or missing).
struct PortView<'a> {
    tracker: &'a PortTracker,
    now: HashMap<String, Option<Attached>>,
}

impl PortView<'_> {
    fn at(&self, port: &str) -> Option<Attached> {
        match self.now.get(port) {
            Some(at) => *at,
            None => self.tracker.get(port),
        }
    }
}

/// The map entries of `r` with its port where `ports` says, as `catalog` holds the port's
/// other record.
fn entries_of(r: &LookupRecord, ports: &PortView, catalog: &Catalog) -> translate::Entries {
    let at = r.port.as_deref().and_then(|p| ports.at(p));
    translate::entries(r, at, catalog.port_flags_of(r))
}

/// The write of a lookup entry, in the map of its address family.
fn lookup_write(k: translate::MapKey, v: Option<LookupValue>) -> Write {
    match k {
        translate::MapKey::V4(k) => Write::Lookup(k, v),
        translate::MapKey::V6(k) => Write::Lookup6(k, v),
    }
}

/// The port a record left (`old`'s, not `new`'s): no longer the VM's in `view`, unless the
/// VM's other record is still on it (a dual-stack VM losing its IPv4 record).
fn port_left<'a>(
    catalog: &Catalog,
    view: &mut PortView,
    old: Option<&'a LookupRecord>,
    new: Option<&LookupRecord>,
) -> Option<&'a String> {
    let left = old
        .and_then(|o| o.port.as_ref())
        .filter(|p| new.and_then(|n| n.port.as_ref()) != Some(*p));
    if let Some(port) = left
        && catalog.by_port(port).is_none()
    {
        view.now.insert(port.clone(), None);
    }
    left
}

/// The IPv6 record of a VM on `port`, if it has one.
fn ipv6_on(catalog: &Catalog, port: &str) -> Option<LookupRecord> {
    catalog.on_port(port).into_iter().find(|r| r.ca.is_ipv6())
}

/// An IPv4 record joining an IPv6-only VM's port takes the port's entry over: undone, the
/// entry is the IPv6 record's again (a write of what it holds, undone last).
fn ipv6_entry_held(
    plan: &mut Plan,
    catalog: &Catalog,
    view: &PortView,
    old: Option<&LookupRecord>,
    new: Option<&LookupRecord>,
) {
    let Some(port) = new
        .filter(|n| n.ca.is_ipv4())
        .and_then(|n| n.port.as_deref())
        .filter(|p| old.and_then(|o| o.port.as_deref()) != Some(*p))
    else {
        return;
    };
    if let Some(v6) = ipv6_on(catalog, port) {
        let e = translate::entries(&v6, view.at(port), Some(catalog.acl_flags_of(&v6)));
        if let Some(p) = e.port {
            let held = Write::Port(e.value.ifindex, Some(p));
            plan.push(held.clone(), held);
        }
    }
}

/// An IPv4 record left a port its VM's IPv6 record stays on (a delete the etcd watch took,
/// or a move): the port's entry becomes the IPv6 record's.
fn ipv6_entry_taken(
    plan: &mut Plan,
    catalog: &Catalog,
    view: &PortView,
    old: Option<&LookupRecord>,
    left: Option<&String>,
) {
    if let Some(port) = left
        && old.is_some_and(|o| o.ca.is_ipv4())
        && let Some(v6) = ipv6_on(catalog, port)
    {
        let at = view.at(port);
        let (before, after) = (
            translate::entries(&v6, at, None),
            translate::entries(&v6, at, catalog.port_flags_of(&v6)),
        );
        record_writes(plan, Some(&before), Some(&after));
    }
}

/// Writes turning one record's entries `old` into `new`: puts first (port, rewrite, lookup),
/// then removals (lookup, rewrite, port), each with its undo.
fn record_writes(
    plan: &mut Plan,
    old: Option<&translate::Entries>,
    new: Option<&translate::Entries>,
) {
    let port = |e: &translate::Entries| e.port.map(|p| (e.value.ifindex, p));
    let (old_port, new_port) = (old.and_then(port), new.and_then(port));
    let (old_rw, new_rw) = (old.and_then(|e| e.rewrite), new.and_then(|e| e.rewrite));
    let (old_lk, new_lk) = (old.map(|e| (e.key, e.value)), new.map(|e| (e.key, e.value)));
    if let Some((i, p)) = new_port
        && new_port != old_port
    {
        let before = old_port.filter(|(o, _)| *o == i).map(|(_, p)| p);
        plan.push(Write::Port(i, Some(p)), Write::Port(i, before));
    }
    if let Some((pa, v)) = new_rw
        && new_rw != old_rw
    {
        let before = old_rw.filter(|(o, _)| *o == pa).map(|(_, v)| v);
        plan.push(Write::Rewrite(pa, Some(v)), Write::Rewrite(pa, before));
    }
    if let Some((k, v)) = new_lk
        && new_lk != old_lk
    {
        let before = old_lk.filter(|(o, _)| *o == k).map(|(_, v)| v);
        plan.push(lookup_write(k, Some(v)), lookup_write(k, before));
    }
    if let Some((k, v)) = old_lk
        && new_lk.is_none_or(|(n, _)| n != k)
    {
        plan.push(lookup_write(k, None), lookup_write(k, Some(v)));
    }
    if let Some((pa, v)) = old_rw
        && new_rw.is_none_or(|(n, _)| n != pa)
    {
        plan.push(Write::Rewrite(pa, None), Write::Rewrite(pa, Some(v)));
    }
    if let Some((i, p)) = old_port
        && new_port.is_none_or(|(n, _)| n != i)
    {
        plan.push(Write::Port(i, None), Write::Port(i, Some(p)));
    }
}

/// How to put the catalog back after one change: mostly by removing what an import added,
/// so a million of them stay small.
enum Undo {
    Remove(u32, std::net::IpAddr),
    Change(Box<Change>),
}

impl From<Change> for Undo {
    fn from(c: Change) -> Undo {
        match c {
            Change::DelLookup { vsid, ca } => Undo::Remove(vsid, ca),
            other => Undo::Change(Box::new(other)),
        }
    }
}

/// Applies one change to the catalog; returns the change that undoes it.
fn apply_to_catalog(catalog: &mut Catalog, change: &Change) -> Change {
    match change {
        Change::PutLookup { record } => match catalog.insert(record.clone()) {
            Some(old) => Change::PutLookup { record: old },
            None => Change::DelLookup {
                vsid: record.vsid,
                ca: record.ca,
            },
        },
        Change::DelLookup { vsid, ca } => match catalog.remove(&(*vsid, *ca)) {
            Some(old) => Change::PutLookup { record: old },
            // Nothing was there: putting nothing back.
            None => Change::DelLookup {
                vsid: *vsid,
                ca: *ca,
            },
        },
        Change::PutProvider { provider } => {
            let providers = catalog.providers_mut();
            let old = providers
                .iter()
                .position(|p| p.pa.addr == provider.pa.addr)
                .map(|i| providers.remove(i));
            providers.push(provider.clone());
            match old {
                Some(old) => Change::PutProvider { provider: old },
                None => Change::DelProvider {
                    pa: provider.pa.addr,
                },
            }
        }
        Change::DelProvider { pa } => {
            let providers = catalog.providers_mut();
            match providers.iter().position(|p| p.pa.addr == *pa) {
                Some(i) => Change::PutProvider {
                    provider: providers.remove(i),
                },
                None => Change::DelProvider { pa: *pa },
            }
        }
        Change::PutRoute { route } => match catalog.routes_mut().insert(route.clone()) {
            Some(old) => Change::PutRoute { route: old },
            None => Change::del_route(route.key()),
        },
        Change::DelRoute {
            rdid,
            prefix,
            nexthop,
        } => {
            let key = (rdid.clone(), *prefix, *nexthop);
            match catalog.routes_mut().remove(&key) {
                Some(old) => Change::PutRoute { route: old },
                None => Change::del_route(key),
            }
        }
        Change::PutAcl { rule } => match catalog.acls_mut().insert(rule.clone()) {
            Some(old) => Change::PutAcl { rule: old },
            None => Change::DelAcl { id: rule.id },
        },
        Change::DelAcl { id } => match catalog.acls_mut().remove(*id) {
            Some(old) => Change::PutAcl { rule: old },
            None => Change::DelAcl { id: *id },
        },
    }
}

/// Writes that turn the hosted-VSID map from `before` into `after`: growth first (in
/// `grow`), shrinkage last (in `shrink`).
fn hosted_writes(
    before: &HashMap<u32, u32>,
    after: &HashMap<u32, u32>,
    grow: &mut Plan,
    shrink: &mut Plan,
) {
    for (vsid, n) in after {
        let was = before.get(vsid).copied();
        if was != Some(*n) {
            let plan = if was.is_some_and(|w| w > *n) {
                &mut *shrink
            } else {
                &mut *grow
            };
            plan.push(Write::Hosted(*vsid, Some(*n)), Write::Hosted(*vsid, was));
        }
    }
    for (vsid, n) in before {
        if !after.contains_key(vsid) {
            shrink.push(Write::Hosted(*vsid, None), Write::Hosted(*vsid, Some(*n)));
        }
    }
}

impl Tables {
    pub fn new(catalog: Catalog, base: DatapathConfig) -> Tables {
        Tables {
            catalog,
            ports: PortTracker::default(),
            base,
            config: base,
        }
    }

    /// The config map as the catalog wants it.
    pub fn wanted_config(&self) -> DatapathConfig {
        translate::config(&self.base, &self.catalog)
    }

    /// Applies `changes` to catalog, maps and journal, all or nothing. `check` sees each change
    /// before it is applied, with the changes before it applied. Ports named by the changes'
    /// records are where `links` says (missing when absent).
    ///
    /// A big change set (an import) is written into the journal on a second thread while it is
    /// checked and mapped here, and committed only once the maps hold it.
    pub fn apply(
        &mut self,
        journal: &dyn Journal,
        maps: &mut dyn Maps,
        links: &Links,
        changes: &[Change],
        check: impl FnMut(&Catalog, &Change) -> Result<()>,
    ) -> Result<Applied> {
        self.apply_with(
            journal,
            maps,
            links,
            changes,
            Checks::Strict(Box::new(check)),
        )
        .map(|(applied, _)| applied)
    }

    /// As [`Tables::apply`] for changes that come from a shared store (cluster mode), where a
    /// record that breaks a rule must not stop the others: each is checked on its own
    /// ([`LookupRecord::validate`] and the catalog's rules) and left out if refused, and the
    /// record its key held before goes (the store says something else now). Returns what was
    /// applied and what was left out (the change's index, why).
    pub fn apply_lenient(
        &mut self,
        journal: &dyn Journal,
        maps: &mut dyn Maps,
        links: &Links,
        changes: &[Change],
    ) -> Result<(Applied, Vec<(usize, NvError)>)> {
        self.apply_with(journal, maps, links, changes, Checks::Lenient)
    }

    fn apply_with(
        &mut self,
        journal: &dyn Journal,
        maps: &mut dyn Maps,
        links: &Links,
        changes: &[Change],
        checks: Checks,
    ) -> Result<(Applied, Vec<(usize, NvError)>)> {
        let started = std::time::Instant::now();
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let early = (changes.len() >= ALONGSIDE)
                .then(|| scope.spawn(|| journal.prepare(changes, &stop)));
            let stopped = |e: NvError| {
                stop.store(true, Ordering::Relaxed);
                e
            };
            let planned = self.plan(links, changes, checks).map_err(stopped)?;
            let plan_ms = started.elapsed().as_millis();
            let written = maps
                .write_all(&planned.plan.writes)
                .map_err(|Stopped { done, error }| (done, stopped(error)));
            let map_ms = started.elapsed().as_millis();
            let done = planned.plan.writes.len();
            let stored = written.and_then(|()| {
                let pending = match early {
                    Some(thread) => thread
                        .join()
                        .unwrap_or_else(|_| Err(NvError::store("the store's writer panicked"))),
                    None => journal.prepare(changes, &stop),
                };
                pending.and_then(Pending::commit).map_err(|e| (done, e))
            });
            tracing::debug!(
                changes = changes.len(),
                writes = done,
                "change set: checked and planned in {plan_ms} ms, mapped by {map_ms} ms, \
                 stored by {} ms",
                started.elapsed().as_millis()
            );
            if let Err((done, error)) = stored {
                tracing::warn!("rolling the change back: {error}");
                planned.plan.undo(maps, done);
                self.undo_catalog(&planned.undo);
                self.ports.adopt_filtered(planned.plan.filtered_by(done));
                return Err(error);
            }
            self.config = planned.config;
            let applied = self.settle_ports(planned.ports, links, planned.plan.filtered);
            Ok((applied, planned.skipped))
        })
    }

    /// Checks `changes` and applies them to the catalog, working out the map writes they
    /// need; a refused change puts the catalog back and is the error.
    fn plan(&mut self, links: &Links, changes: &[Change], mut checks: Checks) -> Result<Planned> {
        let mut skipped = Vec::new();
        let before = self.aggregates(changes);
        let mut undo_catalog: Vec<Undo> = Vec::with_capacity(changes.len());
        self.catalog.reserve(changes.len());
        let mut view = PortView {
            tracker: &self.ports,
            now: HashMap::new(),
        };
        let mut filters = Plan::default();
        let mut records = Plan::default();
        let mut failed = None;
        for (i, change) in changes.iter().enumerate() {
            let substitute;
            let change = match checks.check(&self.catalog, change) {
                Ok(()) => change,
                Err(e) if matches!(checks, Checks::Strict(_)) => {
                    failed = Some(e);
                    break;
                }
                Err(e) => {
                    skipped.push((i, e));
                    match taken_away(&self.catalog, change) {
                        Some(del) => {
                            substitute = del;
                            &substitute
                        }
                        None => continue,
                    }
                }
            };
            let old = match change {
                Change::PutLookup { record } => self.catalog.get(&record.key()),
                Change::DelLookup { vsid, ca } => self.catalog.get(&(*vsid, *ca)),
                _ => None,
            };
            let undo = apply_to_catalog(&mut self.catalog, change);
            let new = match change {
                Change::PutLookup { record } => Some(record),
                _ => None,
            };
            let old_entries = old.as_ref().map(|o| entries_of(o, &view, &self.catalog));
            let left = port_left(&self.catalog, &mut view, old.as_ref(), new);
            if let Some(port) = new.and_then(|n| n.port.as_ref()) {
                let at = links.get(port).copied();
                if let Some(at) = at
                    && view.tracker.needs_filter(port, at.ifindex)
                {
                    filters.filter(port, at.ifindex);
                }
                view.now.insert(port.clone(), at);
            }
            let new_entries = new.map(|n| entries_of(n, &view, &self.catalog));
            ipv6_entry_held(&mut records, &self.catalog, &view, old.as_ref(), new);
            record_writes(&mut records, old_entries.as_ref(), new_entries.as_ref());
            ipv6_entry_taken(&mut records, &self.catalog, &view, old.as_ref(), left);
            if let Some((w, u)) = local_pa_write(change, &undo, self.base.uplink_ifindex) {
                records.push(w, u);
            }
            undo_catalog.push(undo.into());
        }
        let ports = view.now;
        if let Some(e) = failed {
            self.undo_catalog(&undo_catalog);
            return Err(e);
        }
        // Aggregates: the hosted-VSID counts and the uplink's rewrite-PA filter.
        let mut grow = Plan::default();
        let mut shrink = Plan::default();
        self.aggregate_writes(&before, &ports, [&mut grow, &mut records, &mut shrink]);
        let config = self.wanted_config();
        if config != self.config {
            shrink.push(
                Write::Config(Box::new(config)),
                Write::Config(Box::new(self.config)),
            );
        }
        let mut plan = filters;
        for p in [grow, records, shrink] {
            plan.append(p);
        }
        Ok(Planned {
            plan,
            undo: undo_catalog,
            ports,
            config,
            skipped,
        })
    }

    /// After a change set went in: the ports it touched are attached for their record, missing,
    /// or (no record names them any more) kept filtered without one.
    fn settle_ports(
        &mut self,
        now: HashMap<String, Option<Attached>>,
        links: &Links,
        filtered: Vec<(String, u32)>,
    ) -> Applied {
        let mut applied = Applied {
            filtered: filtered.into_iter().map(|(p, _)| p).collect(),
            released: Vec::new(),
        };
        for (port, at) in now {
            match (self.catalog.by_port(&port).is_some(), at) {
                (true, Some(at)) => self.ports.attach(&port, at),
                (true, None) => {
                    self.ports.forget(&port);
                }
                (false, _) => {
                    if self.ports.release(&port).is_some() {
                        applied.released.push(port);
                    } else if let Some(at) = links.get(&port)
                        && applied.filtered.contains(&port)
                    {
                        // Filtered for a record the same change set took away again.
                        self.ports.orphan(&port, at.ifindex);
                        applied.released.push(port);
                    }
                }
            }
        }
        applied
    }

    /// Follows a port whose device changed (appeared, went down or up, vanished, re-created):
    /// its record's entries move to where it is now. No journal: the records did not change.
    pub fn relink(
        &mut self,
        maps: &mut dyn Maps,
        port: &str,
        link: Option<Attached>,
    ) -> Result<bool> {
        let records = self.catalog.on_port(port);
        if records.is_empty() {
            return Ok(false);
        }
        let before = self.ports.get(port);
        if before == link {
            return Ok(false);
        }
        let mut plan = Plan::default();
        if let Some(at) = link
            && self.ports.needs_filter(port, at.ifindex)
        {
            plan.filter(port, at.ifindex);
        }
        // The VM's IPv4 record and its IPv6 one alike follow the port; the port's entry is the
        // IPv4 record's, or the IPv6 one's when it has no other.
        let has_v4 = records.iter().any(|r| r.ca.is_ipv4());
        for record in &records {
            let port_entry =
                (record.ca.is_ipv4() || !has_v4).then(|| self.catalog.acl_flags_of(record));
            let old = translate::entries(record, before, port_entry);
            let new = translate::entries(record, link, port_entry);
            record_writes(&mut plan, Some(&old), Some(&new));
        }
        if let Err(Stopped { done, error }) = maps.write_all(&plan.writes) {
            plan.undo(maps, done);
            self.ports.adopt_filtered(plan.filtered_by(done));
            return Err(error);
        }
        match link {
            Some(at) => self.ports.attach(port, at),
            None => {
                self.ports.forget(port);
            }
        }
        Ok(true)
    }

    /// Rewrites the config map if the base or the catalog changed what it must hold.
    pub fn sync_config(&mut self, maps: &mut dyn Maps) -> Result<()> {
        let config = self.wanted_config();
        if config != self.config {
            maps.write_all(&[Write::Config(Box::new(config))])
                .map_err(|s| s.error)?;
            self.config = config;
        }
        Ok(())
    }

    /// What the aggregates `changes` may change are before them.
    fn aggregates(&self, changes: &[Change]) -> Aggregates {
        let local = self.has_local(changes);
        Aggregates {
            hosted: local.then(|| translate::hosted_vsids(&self.catalog)),
            routes: changes
                .iter()
                .any(Change::is_route)
                .then(|| routes::entries(self.catalog.routes())),
            acls: (local || changes.iter().any(Change::is_acl)).then(|| {
                (
                    translate::acl_entries(&self.catalog),
                    self.acl_ports(&self.ports),
                )
            }),
        }
    }

    /// The writes that turn the aggregates `before` into what the catalog now wants.
    fn aggregate_writes(
        &self,
        before: &Aggregates,
        ports: &HashMap<String, Option<Attached>>,
        [grow, records, shrink]: [&mut Plan; 3],
    ) {
        if let Some(before) = &before.hosted {
            let after = translate::hosted_vsids(&self.catalog);
            hosted_writes(before, &after, grow, shrink);
        }
        if let Some(before) = &before.routes {
            let after = routes::entries(self.catalog.routes());
            route_writes(before, &after, grow, shrink);
        }
        if let Some(before) = &before.acls {
            self.acl_plan(before, ports, [grow, records, shrink]);
        }
    }

    /// The ACL writes of a change set: sets, flow sets and meters in `grow` and `shrink`, and
    /// (in `records`) the entries of ports whose VM's rules changed direction, after the sets
    /// they name are there and before the sets they no longer name go.
    fn acl_plan(
        &self,
        (before, ports_before): &(acls::AclEntries, HashMap<u32, PortInfo>),
        ports: &HashMap<String, Option<Attached>>,
        [grow, records, shrink]: [&mut Plan; 3],
    ) {
        let after = translate::acl_entries(&self.catalog);
        acl_writes(before, &after, grow, shrink);
        let view = PortView {
            tracker: &self.ports,
            now: ports.clone(),
        };
        for (ifindex, now) in self.acl_ports_in(&view) {
            let was = ports_before.get(&ifindex).copied();
            if was != Some(now) {
                records.push(Write::Port(ifindex, Some(now)), Write::Port(ifindex, was));
            }
        }
    }

    /// The port entries of this host's VMs as they are where `tracker` says, by ifindex.
    fn acl_ports(&self, tracker: &PortTracker) -> HashMap<u32, PortInfo> {
        self.acl_ports_in(&PortView {
            tracker,
            now: HashMap::new(),
        })
    }

    fn acl_ports_in(&self, view: &PortView) -> HashMap<u32, PortInfo> {
        let mut out = HashMap::new();
        for port in self.catalog.ports() {
            for r in self.catalog.on_port(port) {
                let e = translate::entries(&r, view.at(port), self.catalog.port_flags_of(&r));
                if let Some(p) = e.port {
                    out.insert(e.value.ifindex, p);
                }
            }
        }
        out
    }

    fn has_local(&self, changes: &[Change]) -> bool {
        changes.iter().any(|c| match c {
            Change::PutLookup { record } => {
                record.port.is_some() || self.catalog.is_local(&record.key())
            }
            Change::DelLookup { vsid, ca } => self.catalog.is_local(&(*vsid, *ca)),
            _ => false,
        })
    }

    fn undo_catalog(&mut self, undo: &[Undo]) {
        for u in undo.iter().rev() {
            match u {
                Undo::Remove(vsid, ca) => {
                    self.catalog.remove(&(*vsid, *ca));
                }
                Undo::Change(change) => {
                    apply_to_catalog(&mut self.catalog, change);
                }
            }
        }
        if undo.len() > 1 << 16 {
            self.catalog.shrink();
        }
    }
}

/// Writes that turn the router's entries `before` into `after`: puts in `grow` (the trie and
/// gateways before the VSIDs that use them), removals in `shrink` (the VSIDs first).
fn route_writes(
    before: &routes::RouteEntries,
    after: &routes::RouteEntries,
    grow: &mut Plan,
    shrink: &mut Plan,
) {
    puts(&before.routes, &after.routes, grow, Write::Route);
    puts(&before.gateways, &after.gateways, grow, Write::Gateway);
    puts(&before.routes6, &after.routes6, grow, Write::Route6);
    puts(&before.gateways6, &after.gateways6, grow, Write::Gateway6);
    puts(&before.vsids, &after.vsids, grow, Write::VsidRouting);
    removals(&before.vsids, &after.vsids, shrink, Write::VsidRouting);
    removals(&before.routes, &after.routes, shrink, Write::Route);
    removals(&before.gateways, &after.gateways, shrink, Write::Gateway);
    removals(&before.routes6, &after.routes6, shrink, Write::Route6);
    removals(&before.gateways6, &after.gateways6, shrink, Write::Gateway6);
}

/// Writes that turn the ACL entries `before` into `after`: new sets, flow sets and meters in
/// `grow`, those that go in `shrink`.
fn acl_writes(
    before: &acls::AclEntries,
    after: &acls::AclEntries,
    grow: &mut Plan,
    shrink: &mut Plan,
) {
    // Flow sets and meters before the sets whose rules use them.
    for (vm, n) in &after.flows {
        let was = before.flows.get(vm).copied();
        if was != Some(*n) {
            grow.push(Write::AclFlows(*vm, Some(*n)), Write::AclFlows(*vm, was));
        }
    }
    for k in after.meters.difference(&before.meters) {
        grow.push(Write::AclMeter(*k, true), Write::AclMeter(*k, false));
    }
    for (k, v) in &after.sets {
        let was = before.sets.get(k);
        if was != Some(v) {
            grow.push(
                Write::AclSet(*k, Some(v.clone())),
                Write::AclSet(*k, was.cloned()),
            );
        }
    }
    for (k, v) in &before.sets {
        if !after.sets.contains_key(k) {
            shrink.push(Write::AclSet(*k, None), Write::AclSet(*k, Some(v.clone())));
        }
    }
    for (vm, n) in &before.flows {
        if !after.flows.contains_key(vm) {
            shrink.push(Write::AclFlows(*vm, None), Write::AclFlows(*vm, Some(*n)));
        }
    }
    for k in before.meters.difference(&after.meters) {
        shrink.push(Write::AclMeter(*k, false), Write::AclMeter(*k, true));
    }
}

/// The writes (with their undos) that put what `after` has and `before` has not, or not so.
fn puts<K: Copy + Eq + std::hash::Hash, V: Copy + PartialEq>(
    before: &HashMap<K, V>,
    after: &HashMap<K, V>,
    plan: &mut Plan,
    write: fn(K, Option<V>) -> Write,
) {
    for (k, v) in after {
        let was = before.get(k).copied();
        if was != Some(*v) {
            plan.push(write(*k, Some(*v)), write(*k, was));
        }
    }
}

/// The writes (with their undos) that remove what `before` has and `after` has not.
fn removals<K: Copy + Eq + std::hash::Hash, V: Copy>(
    before: &HashMap<K, V>,
    after: &HashMap<K, V>,
    plan: &mut Plan,
    write: fn(K, Option<V>) -> Write,
) {
    for (k, v) in before {
        if !after.contains_key(k) {
            plan.push(write(*k, None), write(*k, Some(*v)));
        }
    }
}

/// A refused put from a shared store takes away what its key held: the store says something
/// else now.
fn taken_away(catalog: &Catalog, change: &Change) -> Option<Change> {
    match change {
        Change::PutLookup { record } if catalog.contains(&record.key()) => {
            Some(Change::DelLookup {
                vsid: record.vsid,
                ca: record.ca,
            })
        }
        Change::PutRoute { route } if catalog.routes().get(&route.key()).is_some() => {
            Some(Change::del_route(route.key()))
        }
        Change::PutAcl { rule } if catalog.acls().get(rule.id).is_some() => {
            Some(Change::DelAcl { id: rule.id })
        }
        _ => None,
    }
}

/// The local-PA write of a provider change, with its undo (`undo`: the change that undoes it).
fn local_pa_write(change: &Change, undo: &Change, uplink_ifindex: u32) -> Option<(Write, Write)> {
    let entry = |c: &Change| match c {
        Change::PutProvider { provider } => {
            Some(crate::tables::providers::local_pa(provider, uplink_ifindex))
        }
        _ => None,
    };
    let pa = match change {
        Change::PutProvider { provider } => provider.pa.addr,
        Change::DelProvider { pa } => *pa,
        _ => return None,
    };
    Some(match pa {
        IpAddr::V4(v4) => (
            Write::LocalPa(v4.octets(), entry(change)),
            Write::LocalPa(v4.octets(), entry(undo)),
        ),
        IpAddr::V6(v6) => (
            Write::LocalPa6(v6.octets(), entry(change)),
            Write::LocalPa6(v6.octets(), entry(undo)),
        ),
    })
}
