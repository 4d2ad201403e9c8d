//! The agent's side of cluster mode: what it applies from etcd, and the checks a change to
//! etcd passes here first.
use std::{collections::HashMap, net::IpAddr};

use tracing::warn;

use super::Agent;
use crate::{
    catalog::Catalog,
    cluster::{self, Cluster, Update},
    control::admit::admit_watched,
    error::{Result, invalid},
    model::LookupRecord,
    translate::Attached,
    txn::{Journal, Links, Pending},
    {store::Store, tables::Change},
};

/// The local store as cluster mode writes it: etcd's keys as applied, and the revision.
struct ClusterJournal<'a> {
    store: &'a Store,
    updates: &'a [Update],
    full: bool,
    revision: i64,
}

impl Journal for ClusterJournal<'_> {
    fn prepare(
        &self,
        _changes: &[Change],
        _stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Box<dyn Pending + '_>> {
        Ok(Box::new(self.store.prepare_cluster(
            self.updates,
            self.full,
            self.revision,
        )?))
    }
}

impl Agent {
    /// Cluster mode: etcd, and how far this host follows it.
    pub fn cluster(&self) -> Option<Cluster> {
        self.cluster.clone()
    }

    /// At start in cluster mode: the records last applied from etcd, from the local store, so
    /// the agent starts (and forwards) from there whether etcd answers or not.
    pub(super) fn load_cluster_cache(
        catalog: &mut Catalog,
        store: &Store,
        cluster: &Cluster,
        uplink: &str,
    ) -> Result<()> {
        let (_, cached) = store.cluster_cache()?;
        let updates: Vec<Update> = cached.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let (from, changes, mut left_out) = cluster::changes_of(&updates, &cluster.host);
        catalog.reserve(changes.len());
        for (j, change) in changes.into_iter().enumerate() {
            let refused = match change {
                Change::PutLookup { record } => port_refusal(&record, uplink)
                    .map(invalid)
                    .map_or_else(|| admit_watched(catalog, &record), Err)
                    .map(|()| {
                        catalog.insert(record);
                    }),
                Change::PutRoute { route } => catalog.check_route(&route).map(|()| {
                    catalog.routes_mut().insert(route);
                }),
                Change::PutAcl { rule } => rule.validate().map(|()| {
                    catalog.acls_mut().insert(rule);
                }),
                _ => Ok(()),
            };
            if let Err(e) = refused {
                left_out.push((from[j], e.to_string()));
            }
        }
        for (i, why) in &left_out {
            warn!(key = %String::from_utf8_lossy(&updates[*i].0), "etcd record left out: {why}");
        }
        cluster.loaded(&updates, &left_out);
        Ok(())
    }

    /// Applies etcd's keys (as of `revision`; `full`: all of them, anything else goes) through
    /// the transaction path, leaving out what does not parse or breaks a rule.
    pub async fn apply_cluster(
        &mut self,
        updates: Vec<Update>,
        full: bool,
        revision: i64,
    ) -> Result<()> {
        let Some(cluster) = self.cluster.clone() else {
            return Err(invalid("not in cluster mode"));
        };
        // A full read takes away what etcd no longer holds, before anything else goes in.
        let mut changes = Vec::new();
        if full {
            let keep: std::collections::HashSet<(u32, IpAddr)> = updates
                .iter()
                .filter_map(|(k, _)| crate::tables::lookups::parse_etcd_key(k))
                .collect();
            for r in self.tables.catalog.iter() {
                if !keep.contains(&r.key()) {
                    changes.push(Change::DelLookup {
                        vsid: r.vsid,
                        ca: r.ca,
                    });
                }
            }
            let keep: std::collections::HashSet<crate::model::RouteKey> = updates
                .iter()
                .filter_map(|(k, _)| crate::tables::routes::parse_etcd_key(k))
                .collect();
            for r in self.tables.catalog.routes().list(None) {
                if !keep.contains(&r.key()) {
                    changes.push(Change::del_route(r.key()));
                }
            }
            let keep: std::collections::HashSet<u32> = updates
                .iter()
                .filter_map(|(k, _)| crate::tables::acls::parse_etcd_key(k))
                .collect();
            for r in self.tables.catalog.acls().list(None) {
                if !keep.contains(&r.id) {
                    changes.push(Change::DelAcl { id: r.id });
                }
            }
        }
        let stale = changes.len();
        let (from, read, mut left_out) = cluster::changes_of(&updates, &cluster.host);
        changes.extend(read);
        // The update each change came from (none for the stale rows' deletions).
        let from = |j: usize| j.checked_sub(stale).and_then(|j| from.get(j)).copied();
        // This host's VM ports: a missing one is a VM not started yet; a device that cannot be
        // a VM's port leaves the record out.
        let mut links = HashMap::new();
        for (j, change) in changes.iter_mut().enumerate() {
            let Change::PutLookup { record } = change else {
                continue;
            };
            let Some(port) = record.port.clone() else {
                continue;
            };
            match self.port_for_cluster(record, &port).await {
                Ok(Some(link)) => {
                    links.insert(port, link);
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(i) = from(j) {
                        left_out.push((i, e.to_string()));
                    }
                    *change = Change::DelLookup {
                        vsid: record.vsid,
                        ca: record.ca,
                    };
                }
            }
        }
        let at: Links = links
            .iter()
            .map(|(p, l)| (p.clone(), Attached::of(l)))
            .collect();
        let journal = ClusterJournal {
            store: &self.store,
            updates: &updates,
            full,
            revision,
        };
        let (applied, skipped) =
            self.tables
                .apply_lenient(&journal, &mut self.datapath, &at, &changes)?;
        for (j, e) in skipped {
            if let Some(i) = from(j) {
                left_out.push((i, e.to_string()));
            }
        }
        for port in &applied.filtered {
            if let Some(link) = links.get(port) {
                self.set_port_mtu(link).await;
            }
        }
        self.try_take_rewrite_pas().await;
        if changes.iter().any(Change::is_acl) {
            self.cut_flows();
        }
        for (i, why) in &left_out {
            warn!(key = %String::from_utf8_lossy(&updates[*i].0), "etcd record left out: {why}");
        }
        cluster.applied(revision, &updates, &left_out, full);
        Ok(())
    }

    /// Tries the records left out again (this host's provider addresses changed: a record
    /// that named a PA not yet here may fit now).
    pub async fn retry_left_out(&mut self) -> Result<()> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(());
        };
        let keys = cluster.left_out();
        if keys.is_empty() {
            return Ok(());
        }
        let updates: Vec<Update> = self
            .store
            .cluster_values(&keys)?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        self.apply_cluster(updates, false, cluster.revision()).await
    }

    /// The link of a port this host's record in etcd names; `None` when it does not exist
    /// (yet); an error when the device cannot be a VM's port.
    async fn port_for_cluster(
        &self,
        record: &LookupRecord,
        port: &str,
    ) -> Result<Option<crate::netlink::LinkInfo>> {
        if let Some(why) = port_refusal(record, &self.uplink) {
            return Err(invalid(why));
        }
        let Some(link) = self.netlink.link(port).await? else {
            return Ok(None);
        };
        self.check_vm_link(&link).await?;
        Ok(Some(link))
    }

    /// Cluster mode: the records as etcd had them at the revision applied here (with their
    /// host), in (VSID, CA) order, of one VSID or all.
    pub fn cluster_lookups(&self, vsid: Option<u32>) -> Result<Vec<LookupRecord>> {
        let (_, cached) = self.store.cluster_cache()?;
        let mut out: Vec<LookupRecord> = cached
            .iter()
            .filter(|(k, _)| k.starts_with(crate::tables::lookups::ETCD_PREFIX.as_bytes()))
            .filter_map(|(_, v)| serde_json::from_slice::<LookupRecord>(v).ok())
            .filter(|r| vsid.is_none_or(|v| r.vsid == v))
            .collect();
        out.sort_by_key(LookupRecord::key);
        Ok(out)
    }
}

/// Why a record's port can never be a VM's on this host (`uplink`: the agent's), if so.
pub(super) fn port_refusal(record: &LookupRecord, uplink: &str) -> Option<String> {
    let port = record.port.as_deref()?;
    if port == uplink {
        return Some(format!("port '{port}' is the uplink, not a VM port"));
    }
    if crate::netlink::is_bounce(port) {
        return Some(format!(
            "port '{port}' is nv's own (it segments VMs' tunnel traffic), not a VM port"
        ));
    }
    None
}
