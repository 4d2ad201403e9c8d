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
use std::collections::HashMap;

use nv_common::{DatapathConfig, LocalPa, LookupKey, LookupValue, PortInfo, RewritePa, V4};

use crate::{
    catalog::Catalog,
    error::{NvError, Result},
    model::LookupRecord,
    ports::PortTracker,
    store::Change,
    translate::{self, Attached},
};

/// Where a change becomes durable: the local database, or a cluster store.
pub trait Journal {
    /// Records `changes` in one transaction, durable when this returns; on error none is.
    fn commit(&mut self, changes: &[Change]) -> Result<()>;
}

impl Journal for crate::store::Store {
    fn commit(&mut self, changes: &[Change]) -> Result<()> {
        self.append(changes)
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
    Rewrite(V4, Option<RewritePa>),
    Lookup(LookupKey, Option<LookupValue>),
    LocalPa(V4, Option<LocalPa>),
    Config(DatapathConfig),
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

/// The writes of a change set, each with the write that undoes it (none for a filter: it
/// stays, and its port becomes one without a record).
#[derive(Default)]
struct Plan {
    writes: Vec<Write>,
    undo: Vec<Option<Write>>,
    /// Ports filtered by this plan, at their ifindex.
    filtered: Vec<(String, u32)>,
}

impl Plan {
    fn push(&mut self, write: Write, undo: Write) {
        self.writes.push(write);
        self.undo.push(Some(undo));
    }

    fn filter(&mut self, port: &str, ifindex: u32) {
        if !self.filtered.iter().any(|(p, _)| p == port) {
            self.writes.push(Write::Filter(port.to_owned()));
            self.undo.push(None);
            self.filtered.push((port.to_owned(), ifindex));
        }
    }

    fn append(&mut self, other: Plan) {
        self.writes.extend(other.writes);
        self.undo.extend(other.undo);
        self.filtered.extend(other.filtered);
    }

    /// Undoes the first `done` writes, last first. A failure here leaves maps the next
    /// reconcile repairs; it is logged, and the caller reports the first failure.
    fn undo(&self, maps: &mut dyn Maps, done: usize) {
        let undo: Vec<Write> = self.undo[..done].iter().rev().flatten().cloned().collect();
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

/// The map entries of `r` with its port where `ports` says.
fn entries_of(r: &LookupRecord, ports: &PortView) -> translate::Entries {
    translate::entries(r, r.port.as_deref().and_then(|p| ports.at(p)))
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
        plan.push(Write::Lookup(k, Some(v)), Write::Lookup(k, before));
    }
    if let Some((k, v)) = old_lk
        && new_lk.is_none_or(|(n, _)| n != k)
    {
        plan.push(Write::Lookup(k, None), Write::Lookup(k, Some(v)));
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
    pub fn apply(
        &mut self,
        journal: &mut dyn Journal,
        maps: &mut dyn Maps,
        links: &Links,
        changes: &[Change],
        mut check: impl FnMut(&Catalog, &Change) -> Result<()>,
    ) -> Result<Applied> {
        let local_before = self.has_local(changes);
        let hosted_before = local_before.then(|| translate::hosted_vsids(&self.catalog));
        let mut undo_catalog: Vec<Change> = Vec::new();
        let mut view = PortView {
            tracker: &self.ports,
            now: HashMap::new(),
        };
        let mut filters = Plan::default();
        let mut records = Plan::default();
        let mut failed = None;
        for change in changes {
            if let Err(e) = check(&self.catalog, change) {
                failed = Some(e);
                break;
            }
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
            let old_entries = old.as_ref().map(|o| entries_of(o, &view));
            if let Some(port) = old.as_ref().and_then(|o| o.port.as_ref())
                && new.and_then(|n| n.port.as_ref()) != Some(port)
            {
                view.now.insert(port.clone(), None);
            }
            if let Some(port) = new.and_then(|n| n.port.as_ref()) {
                let at = links.get(port).copied();
                if let Some(at) = at
                    && view.tracker.needs_filter(port, at.ifindex)
                {
                    filters.filter(port, at.ifindex);
                }
                view.now.insert(port.clone(), at);
            }
            let new_entries = new.map(|n| entries_of(n, &view));
            record_writes(&mut records, old_entries.as_ref(), new_entries.as_ref());
            if let Some((w, u)) = local_pa_write(change, &undo, self.base.uplink_ifindex) {
                records.push(w, u);
            }
            undo_catalog.push(undo);
        }
        let now = view.now;
        if let Some(e) = failed {
            self.undo_catalog(&undo_catalog);
            return Err(e);
        }
        // Aggregates: the hosted-VSID counts and the uplink's rewrite-PA filter.
        let mut grow = Plan::default();
        let mut shrink = Plan::default();
        if let Some(before) = &hosted_before {
            let after = translate::hosted_vsids(&self.catalog);
            hosted_writes(before, &after, &mut grow, &mut shrink);
        }
        let config = self.wanted_config();
        if config != self.config {
            shrink.push(Write::Config(config), Write::Config(self.config));
        }
        let mut plan = filters;
        for p in [grow, records, shrink] {
            plan.append(p);
        }
        let done = match maps.write_all(&plan.writes) {
            Ok(()) => journal.commit(changes).map_err(|e| (plan.writes.len(), e)),
            Err(Stopped { done, error }) => Err((done, error)),
        };
        if let Err((done, error)) = done {
            tracing::warn!("rolling the change back: {error}");
            plan.undo(maps, done);
            self.undo_catalog(&undo_catalog);
            self.ports.adopt_filtered(plan.filtered_by(done));
            return Err(error);
        }
        self.config = config;
        Ok(self.settle_ports(now, links, plan.filtered))
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
        let Some(record) = self.catalog.by_port(port) else {
            return Ok(false);
        };
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
        let old = translate::entries(&record, before);
        let new = translate::entries(&record, link);
        record_writes(&mut plan, Some(&old), Some(&new));
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
            maps.write_all(&[Write::Config(config)])
                .map_err(|s| s.error)?;
            self.config = config;
        }
        Ok(())
    }

    fn has_local(&self, changes: &[Change]) -> bool {
        changes.iter().any(|c| match c {
            Change::PutLookup { record } => {
                record.port.is_some()
                    || self
                        .catalog
                        .get(&record.key())
                        .is_some_and(|o| o.port.is_some())
            }
            Change::DelLookup { vsid, ca } => self
                .catalog
                .get(&(*vsid, *ca))
                .is_some_and(|o| o.port.is_some()),
            _ => false,
        })
    }

    fn undo_catalog(&mut self, undo: &[Change]) {
        for change in undo.iter().rev() {
            apply_to_catalog(&mut self.catalog, change);
        }
        if undo.len() > 1 << 16 {
            self.catalog.shrink();
        }
    }
}

/// The local-PA write of a provider change, with its undo (`undo`: the change that undoes it).
fn local_pa_write(change: &Change, undo: &Change, uplink_ifindex: u32) -> Option<(Write, Write)> {
    let entry = |c: &Change| {
        matches!(c, Change::PutProvider { .. }).then_some(LocalPa {
            ifindex: uplink_ifindex,
        })
    };
    let pa = match change {
        Change::PutProvider { provider } => provider.pa.addr,
        Change::DelProvider { pa } => *pa,
        _ => return None,
    };
    let pa = translate::key_v4(pa);
    Some((
        Write::LocalPa(pa, entry(change)),
        Write::LocalPa(pa, entry(undo)),
    ))
}
