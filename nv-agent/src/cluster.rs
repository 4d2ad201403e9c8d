//! Cluster mode: lookup records live in etcd, the cluster's source of truth, under
//! `/nv/v1/lookups/VSID/CA` as JSON in the CLI's field names (with `host`, the host whose VM
//! port a record binds). Every agent watches the prefix from the revision it last applied and
//! applies what changed through the transaction path ([`crate::txn::Tables::apply_lenient`]:
//! a value that does not parse or breaks a rule is left out and reported, never applied, and
//! never stops the rest). What it applied, and the revision, are cached in the local store, so
//! an agent starts, and the datapath forwards, from there while etcd is away. `nvctl` writes go
//! through the agent into etcd as transactions that compare before they write: a change made
//! meanwhile by another host is refused, never lost.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    api::Shared,
    error::{NvError, Result, invalid},
    etcd_writer::{EtcdError, EtcdWriter, Expect, KeyWrite},
    model::LookupRecord,
    tables::lookups::{ETCD_PREFIX, etcd_key, local_view, parse_etcd_key, placed},
};

/// Everything nv keeps in etcd, watched by every agent.
const WATCHED: &str = "/nv/v1/";
/// Each agent's own key, written when it connects (what it had applied): its event tells the
/// agent it has seen everything before.
const HOSTS: &str = "/nv/v1/hosts/";
/// Keys read a request at a time in a full resynchronisation.
const PAGE: i64 = 10_000;
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

/// How every connection to etcd is made (the watcher's and the writer's).
fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
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
    pub fn new(host: String, endpoints: Vec<String>, revision: i64) -> Cluster {
        let writer = Arc::new(EtcdWriter::new(endpoints.clone(), connect_options()));
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
    async fn wait_applied(&self, revision: i64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(APPLIED_WAIT, rx.wait_for(|r| *r >= revision))
            .await
            .is_err()
        {
            warn!("revision {revision} is in etcd but not applied here after {APPLIED_WAIT:?}");
        }
    }

    /// Writes `writes` to etcd (see [`EtcdWriter::write`]); refused (`Conflict`) when its
    /// comparisons fail: another host changed the same records meanwhile. Waits until this
    /// agent applied it.
    async fn commit(&self, writes: &[KeyWrite], what: &str) -> Result<()> {
        let revision = self.writer.write(writes).await.map_err(|e| match e {
            EtcdError::Conflict => NvError::Conflict(format!(
                "{what} changed in etcd meanwhile (another host's nvctl?); nothing was \
                 written: list the records and try again"
            )),
            EtcdError::Refused(why) if why.contains("too many operations") => {
                NvError::cluster(format!(
                    "etcd refused the transaction ({why}): an import is one transaction, so \
                     etcd's --max-txn-ops must hold it; split the file or raise it"
                ))
            }
            e => self.unavailable(e),
        })?;
        self.wait_applied(revision).await;
        Ok(())
    }

    /// A request etcd did not carry out, with what forwarding does meanwhile.
    fn unavailable(&self, e: EtcdError) -> NvError {
        let what = match e {
            EtcdError::Unreachable(_) => format!(
                "etcd is unreachable; forwarding continues from the records applied up to \
                 revision {}, and changes wait until it is back",
                self.revision()
            ),
            _ => "the change was not made".to_owned(),
        };
        NvError::cluster_by(what, e)
    }

    /// The record etcd holds for (`vsid`, `ca`), and its revision.
    async fn current(&self, vsid: u32, ca: IpAddr) -> Result<(LookupRecord, i64)> {
        let key = etcd_key(vsid, ca);
        let held = self
            .writer
            .get(&key)
            .await
            .map_err(|e| self.unavailable(e))?
            .ok_or_else(|| {
                NvError::NotFound(format!("no lookup record for VSID {vsid} CA {ca}"))
            })?;
        let record: LookupRecord = serde_json::from_slice(&held.value)
            .map_err(|e| invalid(format!("{key} in etcd does not parse: {e}")))?;
        Ok((record, held.mod_revision))
    }
}

/// A record placed on its host, and valid on its own.
fn placed_valid(r: LookupRecord, me: &str) -> Result<LookupRecord> {
    let r = placed(r, me)?;
    r.validate()?;
    Ok(r)
}

fn json(r: &LookupRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| invalid(format!("cannot encode the record: {e}")))
}

/// `nvctl lookup add` in cluster mode.
pub async fn add(shared: &Shared, cluster: &Cluster, r: LookupRecord) -> Result<LookupRecord> {
    let r = placed_valid(r, &cluster.host)?;
    shared.lock().await.check_cluster(&[&r], false).await?;
    let write = KeyWrite {
        key: etcd_key(r.vsid, r.ca),
        expect: Expect::Absent,
        value: Some(json(&r)?),
    };
    cluster
        .commit(&[write], &format!("VSID {} CA {}", r.vsid, r.ca))
        .await?;
    info!(vsid = r.vsid, ca = %r.ca, "added lookup record to etcd");
    Ok(r)
}

/// `nvctl lookup move` in cluster mode: the record's PA, port and host, compared against
/// the revision read.
pub async fn move_to(
    shared: &Shared,
    cluster: &Cluster,
    m: crate::agent::MoveRequest,
) -> Result<LookupRecord> {
    let (old, revision) = cluster.current(m.vsid, m.ca).await?;
    let mut moved = old;
    moved.pa = m.pa;
    moved.port = m.port;
    moved.host = m.host;
    let moved = placed_valid(moved, &cluster.host)?;
    shared.lock().await.check_cluster(&[&moved], true).await?;
    let write = KeyWrite {
        key: etcd_key(m.vsid, m.ca),
        expect: Expect::At(revision),
        value: Some(json(&moved)?),
    };
    cluster
        .commit(&[write], &format!("VSID {} CA {}", m.vsid, m.ca))
        .await?;
    info!(vsid = m.vsid, ca = %m.ca, pa = %m.pa, host = ?moved.host, "moved lookup record in etcd");
    Ok(moved)
}

/// `nvctl lookup del` in cluster mode.
pub async fn delete(cluster: &Cluster, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
    let (old, revision) = cluster.current(vsid, ca).await?;
    let write = KeyWrite {
        key: etcd_key(vsid, ca),
        expect: Expect::At(revision),
        value: None,
    };
    cluster
        .commit(&[write], &format!("VSID {vsid} CA {ca}"))
        .await?;
    info!(vsid, ca = %ca, "deleted lookup record from etcd");
    Ok(old)
}

/// `nvctl lookup import` in cluster mode: one etcd transaction, every key new, all or none.
pub async fn import(
    shared: &Shared,
    cluster: &Cluster,
    records: Vec<LookupRecord>,
) -> Result<usize> {
    let records: Vec<LookupRecord> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            placed_valid(r, &cluster.host).map_err(|e| invalid(format!("record {}: {e}", i + 1)))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&LookupRecord> = records.iter().collect();
    shared.lock().await.check_cluster(&refs, false).await?;
    let writes = records
        .iter()
        .map(|r| {
            Ok(KeyWrite {
                key: etcd_key(r.vsid, r.ca),
                expect: Expect::Absent,
                value: Some(json(r)?),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    cluster.commit(&writes, "a record of the import").await?;
    info!(records = records.len(), "imported lookup records into etcd");
    Ok(records.len())
}

/// Every key under [`ETCD_PREFIX`] at one revision, a page at a time.
async fn snapshot(client: &mut Client) -> Result<(i64, Vec<Update>)> {
    let end = {
        let mut e = ETCD_PREFIX.as_bytes().to_vec();
        if let Some(last) = e.last_mut() {
            *last += 1;
        }
        e
    };
    let mut from = ETCD_PREFIX.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = client
            .get(from.clone(), Some(options))
            .await
            .map_err(|e| etcd_err("read the records from etcd", e))?;
        if revision == 0 {
            revision = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
        }
        for kv in resp.kvs() {
            out.push((kv.key().to_vec(), Some(kv.value().to_vec())));
        }
        match resp.kvs().last() {
            Some(kv) if resp.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => return Ok((revision, out)),
        }
    }
}

/// Follows etcd for as long as the agent runs: connects (again and again while it is away),
/// resynchronises in full when it must (first start, a revision compacted away), then applies
/// what changes as it comes.
pub async fn follow(shared: Shared, cluster: Cluster) {
    let mut backoff = Duration::from_millis(200);
    // One member at a time, the next one when it fails: a member that went away is left at
    // once, not found again by chance.
    let mut member = 0;
    loop {
        let endpoint = &cluster.endpoints[member % cluster.endpoints.len()];
        let ended = session(&shared, &cluster, endpoint).await;
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

async fn session(shared: &Shared, cluster: &Cluster, endpoint: &str) -> Result<()> {
    let mut client = Client::connect([endpoint], Some(connect_options()))
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
        revision = resync(shared, cluster, &mut client).await?;
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
                revision = resync(shared, cluster, &mut client).await?;
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
                if !kv.key().starts_with(ETCD_PREFIX.as_bytes()) {
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
            shared
                .lock()
                .await
                .apply_cluster(batch, false, revision)
                .await?;
            if fenced {
                cluster.synced.send_replace(true);
            }
        }
    }
}

/// Reads every record at one revision and makes this host hold exactly those.
async fn resync(shared: &Shared, cluster: &Cluster, client: &mut Client) -> Result<i64> {
    let started = std::time::Instant::now();
    let (revision, all) = snapshot(client).await?;
    let n = all.len();
    shared
        .lock()
        .await
        .apply_cluster(all, true, revision)
        .await?;
    info!(
        records = n,
        revision,
        "resynchronised with etcd in {} ms",
        started.elapsed().as_millis()
    );
    let _ = cluster;
    Ok(revision)
}

/// What a batch of etcd's keys means for this host: the changes to apply (each with the
/// index of its update), and the updates left out already (index, why). A value that does not
/// parse takes its key's record away: it is not what etcd says any more.
pub fn changes_of(
    updates: &[Update],
    me: &str,
) -> (Vec<usize>, Vec<crate::tables::Change>, Vec<(usize, String)>) {
    use crate::tables::Change;
    let mut from = Vec::with_capacity(updates.len());
    let mut changes = Vec::with_capacity(updates.len());
    let mut left_out = Vec::new();
    for (i, (k, v)) in updates.iter().enumerate() {
        let Some((vsid, ca)) = parse_etcd_key(k) else {
            left_out.push((i, "not a lookup record's key".to_owned()));
            continue;
        };
        let change = match v {
            None => Change::DelLookup { vsid, ca },
            Some(v) => match serde_json::from_slice::<LookupRecord>(v) {
                Ok(r) if r.key() == (vsid, ca) => Change::PutLookup {
                    record: local_view(&r, me),
                },
                Ok(r) => {
                    left_out.push((
                        i,
                        format!("its value is the record of VSID {} CA {}", r.vsid, r.ca),
                    ));
                    Change::DelLookup { vsid, ca }
                }
                Err(e) => {
                    left_out.push((i, format!("does not parse: {e}")));
                    Change::DelLookup { vsid, ca }
                }
            },
        };
        from.push(i);
        changes.push(change);
    }
    (from, changes, left_out)
}
