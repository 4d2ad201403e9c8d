//! Cluster mode's adapter: lookup records live in etcd, the cluster's source of truth, under
//! `/nv/v1/lookups/VSID/CA` as JSON in the CLI's field names (with `host`, the host whose VM
//! port a record binds). The watcher here follows `/nv/v1/` from the revision this agent last
//! applied and hands what changed, batch by batch, to whoever applies it (the control path:
//! the same admission and transaction path as a host alone, leniently: a value that does not
//! parse or breaks a rule is left out and reported, and never stops the rest); it knows
//! nothing of the agent. What was applied, and the revision, are cached in the local store, so
//! an agent starts, and the datapath forwards, from there while etcd is away. Writes go
//! through [`crate::etcd_records`], as transactions that compare before they write.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, EventType, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    error::{NvError, Result},
    etcd_access::EtcdAccess,
    etcd_records::EtcdRecords,
    etcd_writer::EtcdWriter,
    model::LookupRecord,
    tables::{
        Change, acls,
        lookups::{ETCD_PREFIX, local_view, parse_etcd_key},
        routes,
    },
};

/// Whether `key` is a row of a table etcd shares (lookup records, routes, ACL rules); the
/// hosts' own
/// keys are not.
fn table_key(key: &[u8]) -> bool {
    key.starts_with(ETCD_PREFIX.as_bytes())
        || key.starts_with(routes::ETCD_PREFIX.as_bytes())
        || key.starts_with(acls::ETCD_PREFIX.as_bytes())
}

/// Everything nv keeps in etcd, watched by every agent.
const WATCHED: &str = "/nv/v1/";
/// Each agent's own key, written when it connects (what it had applied): its event tells the
/// agent it has seen everything before.
const HOSTS: &str = "/nv/v1/hosts/";
/// How long a change waits for this agent to have applied it, before nvctl gets its answer.
const APPLIED_WAIT: Duration = Duration::from_secs(5);
/// Bad records named in `nvctl status` (all are counted).
const BAD_SHOWN: usize = 20;

/// What `nvctl status` says of cluster mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub host: String,
    pub endpoints: Vec<String>,
    /// Watching etcd now.
    pub connected: bool,
    /// The etcd revision this agent has applied.
    pub revision: i64,
    /// Why it is not connected, or what went wrong last.
    pub last_error: Option<String>,
    /// Records in etcd this agent leaves out (they do not parse or break a rule).
    pub bad_records: usize,
    /// Some of them, with why.
    pub bad: Vec<String>,
    /// Changes applied from etcd, and full resynchronisations (first start, compaction).
    pub events: u64,
    pub resyncs: u64,
}

/// One key as etcd has it (`None`: deleted).
pub type Update = (Vec<u8>, Option<Vec<u8>>);

/// The agent's link to etcd, shared by the watcher and the API.
#[derive(Clone)]
pub struct Cluster {
    pub host: String,
    pub endpoints: Vec<String>,
    /// How the watcher connects (TLS and this host's certificate, or plain).
    options: ConnectOptions,
    /// Writes (and the reads they depend on), a member at a time, retried on the next.
    writer: Arc<EtcdWriter>,
    /// The member the watcher follows now.
    watching: Arc<Mutex<Option<String>>>,
    applied: Arc<watch::Sender<i64>>,
    status: Arc<Mutex<Status>>,
    /// Keys left out, with why.
    bad: Arc<Mutex<HashMap<Vec<u8>, String>>>,
    /// Caught up with etcd since it was last connected.
    synced: Arc<watch::Sender<bool>>,
    /// A write found the watcher's member dead: the watcher moves to the next one now, not
    /// when its keep-alive notices.
    kick: Arc<tokio::sync::Notify>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Puts the keys left out into the status: how many, and some of them with why.
fn publish_bad(bad: &HashMap<Vec<u8>, String>, s: &mut Status) {
    s.bad_records = bad.len();
    s.bad = bad
        .iter()
        .take(BAD_SHOWN)
        .map(|(k, why)| format!("{}: {why}", String::from_utf8_lossy(k)))
        .collect();
    s.bad.sort();
}

fn etcd_err(what: &str, e: etcd_client::Error) -> NvError {
    NvError::cluster_by(what, crate::error::EtcdSource::Client(e))
}

impl Cluster {
    pub fn new(host: String, access: &EtcdAccess, revision: i64) -> Cluster {
        let endpoints = access.endpoints.clone();
        let writer = Arc::new(EtcdWriter::new(endpoints.clone(), access.connect_options()));
        let watching: Arc<Mutex<Option<String>>> = Arc::default();
        let kick: Arc<tokio::sync::Notify> = Arc::default();
        {
            let (watching, kick) = (watching.clone(), kick.clone());
            writer.on_member_failed(move |endpoint| {
                if lock(&watching).as_deref() == Some(endpoint) {
                    kick.notify_one();
                }
            });
        }
        Cluster {
            status: Arc::new(Mutex::new(Status {
                host: host.clone(),
                endpoints: endpoints.clone(),
                revision,
                ..Status::default()
            })),
            host,
            endpoints,
            options: access.connect_options(),
            writer,
            watching,
            applied: Arc::new(watch::channel(revision).0),
            bad: Arc::default(),
            synced: Arc::new(watch::channel(false).0),
            kick,
        }
    }

    /// Waits until this agent has caught up with etcd, or `patience` passed without etcd
    /// answering (then it goes on from what it applied last). True when caught up.
    pub async fn wait_synced(&self, patience: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        let started = tokio::time::Instant::now();
        loop {
            if *synced.borrow_and_update() {
                return true;
            }
            // Keep waiting while etcd answers (a big first load takes a while).
            if started.elapsed() > patience && !self.status().connected {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), synced.changed()).await;
        }
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// The keys left out now.
    pub fn left_out(&self) -> Vec<Vec<u8>> {
        lock(&self.bad).keys().cloned().collect()
    }

    /// The revision this agent has applied.
    pub fn revision(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Notes what the agent loaded from its store at start: the keys left out (the revision
    /// was known already). Not a change from etcd, nor a resynchronisation.
    pub fn loaded(&self, updates: &[Update], left_out: &[(usize, String)]) {
        let mut bad = lock(&self.bad);
        for (i, why) in left_out {
            if let Some((k, _)) = updates.get(*i) {
                bad.insert(k.clone(), why.clone());
            }
        }
        publish_bad(&bad, &mut lock(&self.status));
    }

    /// Notes what a batch applied: its revision, the keys left out and those that are fine
    /// now.
    pub fn applied(
        &self,
        revision: i64,
        updates: &[Update],
        left_out: &[(usize, String)],
        full: bool,
    ) {
        {
            let mut bad = lock(&self.bad);
            if full {
                bad.clear();
            }
            for (k, _) in updates {
                bad.remove(k);
            }
            for (i, why) in left_out {
                if let Some((k, _)) = updates.get(*i) {
                    bad.insert(k.clone(), why.clone());
                }
            }
            let mut s = lock(&self.status);
            publish_bad(&bad, &mut s);
            s.revision = revision;
            s.events += updates.len() as u64;
            if full {
                s.resyncs += 1;
            }
        }
        self.applied.send_replace(revision);
    }

    /// The watcher follows `endpoint` now (`None`: no member, `error` says why).
    fn connected(&self, endpoint: Option<&str>, error: Option<String>) {
        let up = endpoint.is_some();
        if !up {
            self.synced.send_replace(false);
        }
        *lock(&self.watching) = endpoint.map(str::to_owned);
        let mut s = lock(&self.status);
        if s.connected != up {
            if up {
                info!(endpoints = ?self.endpoints, "etcd connected; following from revision {}", s.revision);
            } else {
                warn!(
                    "etcd unreachable ({}); forwarding continues from revision {}",
                    error.as_deref().unwrap_or("?"),
                    s.revision
                );
            }
        }
        s.connected = up;
        if error.is_some() {
            s.last_error = error;
        }
    }

    /// Waits (a while) until this agent has applied `revision`, so nvctl answers once the
    /// change is in this host's datapath.
    pub async fn wait_applied(&self, revision: i64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(APPLIED_WAIT, rx.wait_for(|r| *r >= revision))
            .await
            .is_err()
        {
            warn!("revision {revision} is in etcd but not applied here after {APPLIED_WAIT:?}");
        }
    }

    /// Lookup records in etcd, written with this host's identity.
    pub fn records(&self) -> EtcdRecords<'_> {
        EtcdRecords {
            writer: &self.writer,
            meanwhile: Some(format!(
                "forwarding continues from the records applied up to revision {}, and changes \
                 wait until it is back",
                self.revision()
            )),
        }
    }
}

/// What the watcher hands over: etcd's keys as of `revision` (`full`: all of them, anything
/// else goes), and where to say whether they went in.
pub struct Batch {
    pub updates: Vec<Update>,
    pub full: bool,
    pub revision: i64,
    pub done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// Hands `updates` over and waits until they are applied (an error ends the session: the next
/// one starts from the revision applied last).
async fn hand_over(
    batches: &tokio::sync::mpsc::Sender<Batch>,
    updates: Vec<Update>,
    full: bool,
    revision: i64,
) -> Result<()> {
    let (done, applied) = tokio::sync::oneshot::channel();
    batches
        .send(Batch {
            updates,
            full,
            revision,
            done,
        })
        .await
        .map_err(|_| NvError::cluster("nobody applies what etcd says any more"))?;
    applied
        .await
        .map_err(|_| NvError::cluster("the batch was dropped unapplied"))?
}

/// Every row of the shared tables at one revision.
async fn snapshot(client: &mut Client) -> Result<(i64, Vec<Update>)> {
    let (revision, kvs) = crate::etcd_writer::read_prefix(client, WATCHED)
        .await
        .map_err(|e| etcd_err("read the records from etcd", e))?;
    Ok((
        revision,
        kvs.into_iter()
            .filter(|(k, _)| table_key(k))
            .map(|(k, v)| (k, Some(v)))
            .collect(),
    ))
}

/// Follows etcd for as long as the agent runs: connects (again and again while it is away),
/// resynchronises in full when it must (first start, a revision compacted away), then applies
/// what changes as it comes.
pub async fn follow(cluster: Cluster, batches: tokio::sync::mpsc::Sender<Batch>) {
    let mut backoff = Duration::from_millis(200);
    // One member at a time, the next one when it fails: a member that went away is left at
    // once, not found again by chance.
    let mut member = 0;
    loop {
        let endpoint = &cluster.endpoints[member % cluster.endpoints.len()];
        let ended = session(&cluster, &batches, endpoint).await;
        let why = match ended {
            Ok(()) => format!("{endpoint}: the watch ended"),
            Err(e) => format!("{endpoint}: {e}"),
        };
        let was_connected = cluster.status().connected;
        cluster.connected(None, Some(why));
        member += 1;
        if was_connected {
            backoff = Duration::from_millis(100);
        } else if member % cluster.endpoints.len() == 0 {
            // Every member tried: wait before the next round.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(3));
        }
    }
}

async fn session(
    cluster: &Cluster,
    batches: &tokio::sync::mpsc::Sender<Batch>,
    endpoint: &str,
) -> Result<()> {
    let mut client = Client::connect([endpoint], Some(cluster.options.clone()))
        .await
        .map_err(|e| etcd_err("connect", e))?;
    // Connecting is lazy: only an answer says the member is there. Then this agent counts as
    // connected, even while a first load takes its time.
    let fence_key = format!("{HOSTS}{}", cluster.host);
    tokio::time::timeout(Duration::from_secs(2), client.get(fence_key.clone(), None))
        .await
        .map_err(|_| NvError::cluster("no answer in 2 s"))?
        .map_err(|e| etcd_err("connect", e))?;
    cluster.connected(Some(endpoint), None);
    let mut revision = cluster.revision();
    if revision == 0 {
        revision = resync(batches, &mut client).await?;
    }
    loop {
        let mut stream = client
            .watch(
                WATCHED,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(|e| etcd_err("watch", e))?;
        // A write of this host's own key, behind everything it missed: its event comes after
        // every earlier one, so once it is here this agent is caught up.
        let fence = client
            .put(
                fence_key.clone(),
                format!(r#"{{"host":"{}","applied":{revision}}}"#, cluster.host),
                None,
            )
            .await
            .map_err(|e| etcd_err("write this host's key", e))?
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        cluster.connected(Some(endpoint), None);
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = cluster.kick.notified() => {
                    return Err(NvError::cluster("a request to this member failed"));
                }
            };
            let Some(resp) = message.map_err(|e| etcd_err("watch", e))? else {
                return Ok(());
            };
            if resp.compact_revision() > 0 {
                // What this agent missed was compacted away: read everything again.
                warn!(
                    "revision {revision} was compacted in etcd (at {}); resynchronising in full",
                    resp.compact_revision()
                );
                revision = resync(batches, &mut client).await?;
                break;
            }
            if resp.canceled() {
                return Err(NvError::cluster(format!(
                    "etcd ended the watch: {}",
                    resp.cancel_reason()
                )));
            }
            if resp.events().is_empty() {
                continue;
            }
            // Last write wins within a response, as in etcd.
            let mut batch: Vec<Update> = Vec::with_capacity(resp.events().len());
            let mut at: HashMap<Vec<u8>, usize> = HashMap::new();
            let mut fenced = false;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                revision = revision.max(kv.mod_revision());
                if !table_key(kv.key()) {
                    fenced |= kv.key() == fence_key.as_bytes() && kv.mod_revision() >= fence;
                    continue;
                }
                let value = (ev.event_type() == EventType::Put).then(|| kv.value().to_vec());
                if let Some(i) = at.get(kv.key()) {
                    batch[*i].1 = value;
                } else {
                    at.insert(kv.key().to_vec(), batch.len());
                    batch.push((kv.key().to_vec(), value));
                }
            }
            hand_over(batches, batch, false, revision).await?;
            if fenced {
                cluster.synced.send_replace(true);
            }
        }
    }
}

/// Reads every record at one revision and makes this host hold exactly those.
async fn resync(batches: &tokio::sync::mpsc::Sender<Batch>, client: &mut Client) -> Result<i64> {
    let started = std::time::Instant::now();
    let (revision, all) = snapshot(client).await?;
    let n = all.len();
    hand_over(batches, all, true, revision).await?;
    info!(
        records = n,
        revision,
        "resynchronised with etcd in {} ms",
        started.elapsed().as_millis()
    );
    Ok(revision)
}

/// What a batch of etcd's keys means for this host: the changes to apply (each with the
/// index of its update), and the updates left out already (index, why). A value that does not
/// parse takes its key's record away: it is not what etcd says any more.
pub fn changes_of(updates: &[Update], me: &str) -> (Vec<usize>, Vec<Change>, Vec<(usize, String)>) {
    let mut from = Vec::with_capacity(updates.len());
    let mut changes = Vec::with_capacity(updates.len());
    let mut left_out = Vec::new();
    for (i, (k, v)) in updates.iter().enumerate() {
        let change = if k.starts_with(routes::ETCD_PREFIX.as_bytes()) {
            route_change(k, v.as_deref())
        } else if k.starts_with(acls::ETCD_PREFIX.as_bytes()) {
            acl_change(k, v.as_deref())
        } else {
            lookup_change(k, v.as_deref(), me)
        };
        match change {
            Meaning::Row(c) => {
                from.push(i);
                changes.push(c);
            }
            Meaning::LeftOut(why, None) => left_out.push((i, why)),
            Meaning::LeftOut(why, Some(c)) => {
                left_out.push((i, why));
                from.push(i);
                changes.push(c);
            }
        }
    }
    // Deletions, then records, then subnets, then the routes through them: a set checked one
    // by one in that order keeps what a set written in any order keeps (a subnet resized, a
    // VSID moved to another domain, a record at a former gateway).
    let rank = |c: &Change| match c {
        Change::DelLookup { .. } | Change::DelRoute { .. } | Change::DelAcl { .. } => 0,
        Change::PutRoute { route } if route.on_link() => 2,
        Change::PutRoute { .. } => 3,
        Change::PutAcl { .. } => 4,
        _ => 1,
    };
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by_key(|&j| rank(&changes[j]));
    let from = order.iter().map(|&j| from[j]).collect();
    let mut slots: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    let changes = order.iter().filter_map(|&j| slots[j].take()).collect();
    (from, changes, left_out)
}

/// What one of etcd's keys means here: a change of its row, or a key left out (why, and what
/// that does to the row it names: `None`, it names none).
enum Meaning {
    Row(Change),
    LeftOut(String, Option<Change>),
}

/// A lookup record's key: its record, as this host applies it. A value that does not parse
/// takes its key's record away: it is not what etcd says any more.
fn lookup_change(k: &[u8], v: Option<&[u8]>, me: &str) -> Meaning {
    let Some((vsid, ca)) = parse_etcd_key(k) else {
        return Meaning::LeftOut("not a lookup record's key".to_owned(), None);
    };
    let gone = Change::DelLookup { vsid, ca };
    let Some(v) = v else {
        return Meaning::Row(gone);
    };
    match serde_json::from_slice::<LookupRecord>(v) {
        Ok(r) if r.key() == (vsid, ca) => Meaning::Row(Change::PutLookup {
            record: local_view(&r, me),
        }),
        Ok(r) => Meaning::LeftOut(
            format!("its value is the record of VSID {} CA {}", r.vsid, r.ca),
            Some(gone),
        ),
        Err(e) => Meaning::LeftOut(format!("does not parse: {e}"), Some(gone)),
    }
}

/// A route's key: its route.
fn route_change(k: &[u8], v: Option<&[u8]>) -> Meaning {
    let Some(key) = routes::parse_etcd_key(k) else {
        return Meaning::LeftOut("not a route's key".to_owned(), None);
    };
    let gone = Change::del_route(key.clone());
    let Some(v) = v else {
        return Meaning::Row(gone);
    };
    match serde_json::from_slice::<crate::model::RouteRecord>(v) {
        Ok(r) if r.key() == key => Meaning::Row(Change::PutRoute { route: r }),
        Ok(r) => Meaning::LeftOut(
            format!("its value is the route {}", routes::show(&r)),
            Some(gone),
        ),
        Err(e) => Meaning::LeftOut(format!("does not parse: {e}"), Some(gone)),
    }
}

/// An ACL rule's key: its rule.
fn acl_change(k: &[u8], v: Option<&[u8]>) -> Meaning {
    let Some(id) = acls::parse_etcd_key(k) else {
        return Meaning::LeftOut("not an ACL rule's key".to_owned(), None);
    };
    let gone = Change::DelAcl { id };
    let Some(v) = v else {
        return Meaning::Row(gone);
    };
    match serde_json::from_slice::<crate::model::acl::AclRule>(v) {
        Ok(r) if r.id == id => Meaning::Row(Change::PutAcl { rule: r }),
        Ok(r) => Meaning::LeftOut(format!("its value is ACL rule {}", r.id), Some(gone)),
        Err(e) => Meaning::LeftOut(format!("does not parse: {e}"), Some(gone)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deletions go first, then records, subnets and next-hop routes, whatever order etcd's
    /// keys came in: a subnet resized in one batch is not refused as overlapping itself.
    #[test]
    fn a_batch_applies_deletions_then_records_subnets_and_next_hops() {
        let route = |prefix: &str, nexthop: &str| {
            let r: crate::model::RouteRecord = serde_json::from_value(serde_json::json!({
                "rdid": "contoso", "vsid": 5001, "prefix": prefix, "nexthop": nexthop,
            }))
            .unwrap();
            (
                routes::etcd_key(&r.key()).into_bytes(),
                Some(serde_json::to_vec(&r).unwrap()),
            )
        };
        let record =
            br#"{"vsid":5001,"ca":"10.1.0.9","pa":"198.18.0.2","mac":"02:00:00:00:00:09"}"#;
        let updates: Vec<Update> = vec![
            route("0.0.0.0/0", "10.1.0.9"),
            route("10.1.0.0/23", "0.0.0.0"),
            (
                b"/nv/v1/lookups/5001/10.1.0.9".to_vec(),
                Some(record.to_vec()),
            ),
            (route("10.1.0.0/24", "0.0.0.0").0, None),
        ];
        let (from, changes, left_out) = changes_of(&updates, "h1");
        assert!(left_out.is_empty(), "{left_out:?}");
        assert_eq!(from, vec![3, 2, 1, 0]);
        assert!(matches!(changes[0], Change::DelRoute { .. }));
        assert!(matches!(changes[1], Change::PutLookup { .. }));
        assert!(matches!(&changes[2], Change::PutRoute { route } if route.on_link()));
        assert!(matches!(&changes[3], Change::PutRoute { route } if !route.on_link()));
    }
}
