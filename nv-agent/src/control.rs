//! The one command path, for a host alone and for many. A change to lookup records is admitted
//! by one function against one set of rules ([`admit`]), then recorded: alone, in this host's
//! store through the transaction path ([`crate::txn::Tables::apply`]); in cluster mode, in
//! etcd, whence every host's watch brings it back to the same transaction path
//! ([`apply_watched`]). The two modes differ only in where a change is recorded and where
//! changes come from; the API's handlers do not know which runs.
use std::net::IpAddr;

use tracing::warn;

use crate::{
    api::types::MoveRequest,
    cluster::{Batch, Cluster},
    error::Result,
    model::LookupRecord,
    shared::{Guard, Shared},
};

pub mod acls;
pub mod admit;
pub mod routes;

use admit::{Admitted, Proposal};

/// What a change recorded: how many records, and the record itself when it was one (a large
/// import's are not kept: they cost a copy and the memory of the table again).
pub struct Recorded {
    pub count: usize,
    pub one: Option<LookupRecord>,
}

impl Recorded {
    fn of(mut records: Vec<LookupRecord>) -> Recorded {
        Recorded {
            count: records.len(),
            one: (records.len() == 1).then(|| records.remove(0)),
        }
    }

    /// The one record of a change of one.
    pub fn record(self) -> Result<LookupRecord> {
        self.one
            .ok_or_else(|| crate::error::NvError::store("a change of one recorded no record"))
    }
}

/// Adds records (an add is an import of one), all or none.
pub async fn add(shared: &Shared, records: Vec<LookupRecord>) -> Result<Recorded> {
    let agent = shared.lock().await;
    let admitted = admit::admit(Proposal::Add(records), &agent.view())?;
    match shared.cluster() {
        None => record_here(agent, admitted).await,
        Some(cluster) => {
            let admitted = checked_for_etcd(agent, admitted).await?;
            let revision = cluster.records().create(&admitted.records).await?;
            applied(cluster, revision, admitted.records).await
        }
    }
}

/// A record's new PA, port and host, in one change (a VM migrated).
pub async fn move_to(shared: &Shared, m: MoveRequest) -> Result<LookupRecord> {
    let moved = |mut r: LookupRecord| {
        r.pa = m.pa;
        r.port.clone_from(&m.port);
        r.host.clone_from(&m.host);
        r
    };
    match shared.cluster() {
        None => {
            let agent = shared.lock().await;
            let record = moved(agent.lookup(m.vsid, m.ca)?);
            let admitted = admit::admit(Proposal::Replace(record), &agent.view())?;
            record_here(agent, admitted).await?.record()
        }
        Some(cluster) => {
            let records = cluster.records();
            let (current, at) = records.current(m.vsid, m.ca).await?;
            let agent = shared.lock().await;
            let admitted = admit::admit(Proposal::Replace(moved(current)), &agent.view())?;
            let admitted = checked_for_etcd(agent, admitted).await?;
            let revision = records.replace(&admitted.records[0], at).await?;
            applied(cluster, revision, admitted.records).await?.record()
        }
    }
}

/// Takes a record away.
pub async fn delete(shared: &Shared, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
    match shared.cluster() {
        None => shared.lock().await.remove_lookup(vsid, ca).await,
        Some(cluster) => {
            // As this host applied etcd: another host's answer is the same.
            shared.lock().await.catalog().check_del(&(vsid, ca))?;
            let records = cluster.records();
            let (current, at) = records.current(vsid, ca).await?;
            let revision = records.remove(vsid, ca, at).await?;
            cluster.wait_applied(revision).await;
            Ok(current)
        }
    }
}

/// Every record (of one VSID, or all), in (VSID, CA) order, as they are recorded: alone,
/// this host's; in cluster mode, etcd's as applied here, each with the host of its port.
pub async fn list(shared: &Shared, vsid: Option<u32>) -> Result<Vec<LookupRecord>> {
    let agent = shared.lock().await;
    match shared.cluster() {
        None => Ok(agent.lookups(vsid)),
        Some(_) => agent.cluster_lookups(vsid),
    }
}

/// Alone: this host's ports checked, then the records applied and stored.
async fn record_here(mut agent: Guard<'_>, admitted: Admitted) -> Result<Recorded> {
    let links = agent.own_ports(&admitted).await?;
    agent.apply_admitted(admitted, links).await
}

/// Cluster mode: the rules between records against what this host applied of etcd, and the
/// ports of this host's own VMs; other hosts check theirs when they apply the records.
async fn checked_for_etcd(agent: Guard<'_>, admitted: Admitted) -> Result<Admitted> {
    admitted.check_all(agent.catalog())?;
    agent.own_ports(&admitted).await?;
    Ok(admitted)
}

/// Waits (a while) until this host applied `revision`, so nvctl answers once its datapath has
/// the change.
async fn applied(cluster: &Cluster, revision: i64, records: Vec<LookupRecord>) -> Result<Recorded> {
    cluster.wait_applied(revision).await;
    Ok(Recorded::of(records))
}

/// Applies what etcd's watch hands over, batch by batch, through the transaction path, for as
/// long as the watcher runs (cluster mode).
pub async fn apply_watched(shared: Shared, mut batches: tokio::sync::mpsc::Receiver<Batch>) {
    while let Some(batch) = batches.recv().await {
        let done = shared
            .lock()
            .await
            .apply_cluster(batch.updates, batch.full, batch.revision)
            .await;
        if let Err(e) = &done {
            warn!(
                "applying what etcd said: {}; following again from the revision applied last",
                crate::error::one_line(e)
            );
        }
        let _ = batch.done.send(done);
    }
}

/// Follows etcd (cluster mode): the watcher hands over what changes, and it is applied here.
pub fn follow(shared: &Shared) {
    if let Some(cluster) = shared.cluster().cloned() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(crate::cluster::follow(cluster, tx));
        tokio::spawn(apply_watched(shared.clone(), rx));
    }
}
