//! The store: the agent's source of truth under `state_dir`, in an embedded database (redb,
//! `nv.redb`): every change is one transaction, durable (fsynced) before nvctl gets its answer,
//! and atomic, so a crash leaves the state before it or after it, never between. Lookup records
//! are keyed by (VSID, CA), provider addresses by PA; a lookup record's value is its other
//! fields in a compact binary form, a provider's is JSON in the CLI's field names. The BPF maps are the store's cache. A store of an earlier agent (snapshot
//! plus journal) is migrated on first start and its files kept as `*.migrated`.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    error::{NvError, Result, StoreSource},
    model::{LookupRecord, Mac, Method, ProviderState},
    store_legacy,
};

const FILE: &str = "nv.redb";
/// The catalog holds every record and the store is read once at start: a small cache does.
const STORE_CACHE: usize = 4 << 20;
/// Lookup records, their values in [`encode_lookup`]'s compact form (an import of a million
/// spent a third of its time writing them as JSON).
const LOOKUPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lookups_v2");
/// Cluster mode: what this agent last applied of etcd, key by key as etcd has it (the record's
/// JSON), so it starts, and forwards, from there while etcd is away.
const CLUSTER: TableDefinition<&[u8], &[u8]> = TableDefinition::new("cluster_v1");
/// Cluster mode: the etcd revision `CLUSTER` holds.
const CLUSTER_META: TableDefinition<&str, i64> = TableDefinition::new("cluster_meta_v1");
/// Lookup records as JSON, as agents before the compact form stored them: migrated on open.
const LOOKUPS_JSON: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lookups_v1");
const PROVIDERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("providers_v1");

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub providers: Vec<ProviderState>,
    pub lookups: Vec<LookupRecord>,
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    PutLookup { record: LookupRecord },
    DelLookup { vsid: u32, ca: IpAddr },
    PutProvider { provider: ProviderState },
    DelProvider { pa: IpAddr },
}

pub struct Store {
    db: Database,
    path: PathBuf,
    /// The files of an earlier agent's store, migrated by the first [`Store::snapshot`].
    legacy: Option<PathBuf>,
}

/// (VSID, CA) as bytes that sort as the catalog does: VSID big-endian, then the address
/// family and its bytes.
fn lookup_key(vsid: u32, ca: IpAddr) -> Vec<u8> {
    let mut k = vsid.to_be_bytes().to_vec();
    put_addr(&mut k, ca);
    k
}

fn pa_key(pa: IpAddr) -> Vec<u8> {
    pa.to_string().into_bytes()
}

impl Store {
    /// Opens the store in `dir` (created when missing): the state, and the changes of an
    /// earlier agent's journal still to apply on top of it (then [`Store::needs_snapshot`]).
    pub fn open(dir: &Path) -> Result<(Store, State, Vec<Change>)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| NvError::store_by(format!("cannot create {}", dir.display()), e))?;
        let path = dir.join(FILE);
        let fresh = !path.exists();
        // redb caches up to 1 GiB by default; the catalog already holds every record in
        // memory, and the store is read once at start, so a small cache is enough.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE)
            .create(&path)
            .map_err(|e| damaged(&path, e))?;
        let mut store = Store {
            db,
            path,
            legacy: None,
        };
        if fresh && store_legacy::exists(dir) {
            let (state, changes) = store_legacy::read(dir)?;
            tracing::info!(
                "migrating the store in {} into {}: {} records, {} journal changes",
                dir.display(),
                store.path.display(),
                state.lookups.len(),
                changes.len()
            );
            store.legacy = Some(dir.to_owned());
            return Ok((store, state, changes));
        }
        store.migrate_json_records()?;
        let state = store.read()?;
        Ok((store, state, Vec::new()))
    }

    /// The database file, and its size in bytes.
    pub fn file(&self) -> (&Path, u64) {
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        (&self.path, size)
    }

    /// Whether the state `open` returned must be written whole ([`Store::snapshot`]): it came
    /// from an earlier agent's store.
    pub fn needs_snapshot(&self) -> bool {
        self.legacy.is_some()
    }

    fn read(&self) -> Result<State> {
        let err = |e: StoreSource| damaged(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let mut state = State::default();
        for (table, is_lookup) in [(LOOKUPS, true), (PROVIDERS, false)] {
            let t = match txn.open_table(table) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(err(e.into())),
            };
            for row in t.iter().map_err(|e| err(e.into()))? {
                let (k, v) = row.map_err(|e| err(e.into()))?;
                let bad = |e: &dyn std::fmt::Display| {
                    damaged_content(
                        &self.path,
                        &format!(
                            "a value does not parse ({e}): {}",
                            String::from_utf8_lossy(v.value())
                        ),
                    )
                };
                if is_lookup {
                    state
                        .lookups
                        .push(decode_lookup(k.value(), v.value()).map_err(|e| {
                            damaged_content(&self.path, &format!("a record does not parse ({e})"))
                        })?);
                } else {
                    state
                        .providers
                        .push(serde_json::from_slice(v.value()).map_err(|e| bad(&e))?);
                }
            }
        }
        Ok(state)
    }

    /// Rewrites the JSON lookup records of an earlier agent in the compact form, in one
    /// transaction: the store holds one form or the other, never both.
    fn migrate_json_records(&self) -> Result<()> {
        let err = |e: StoreSource| damaged(&self.path, e);
        let read = self.db.begin_read().map_err(|e| err(e.into()))?;
        match read.open_table(LOOKUPS_JSON) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(err(e.into())),
            Ok(_) => drop(read),
        }
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        let moved = {
            let old = match txn.open_table(LOOKUPS_JSON) {
                Ok(t) => t,
                Err(e) => return Err(err(e.into())),
            };
            let mut new = txn.open_table(LOOKUPS).map_err(|e| err(e.into()))?;
            let mut moved = 0;
            for row in old.iter().map_err(|e| err(e.into()))? {
                let (_, v) = row.map_err(|e| err(e.into()))?;
                let r: LookupRecord = serde_json::from_slice(v.value()).map_err(|e| {
                    damaged_content(
                        &self.path,
                        &format!(
                            "a value does not parse ({e}): {}",
                            String::from_utf8_lossy(v.value())
                        ),
                    )
                })?;
                put_lookup(&mut new, &r).map_err(err)?;
                moved += 1;
            }
            moved
        };
        txn.delete_table(LOOKUPS_JSON).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        if moved > 0 {
            tracing::info!(
                "{moved} lookup records in {} rewritten in compact form",
                self.path.display()
            );
        }
        Ok(())
    }

    fn write_err(&self, e: impl Into<StoreSource>) -> NvError {
        NvError::store_by(format!("cannot write {}", self.path.display()), e)
    }

    /// Cluster mode: the etcd revision last applied, and every key and value as of it.
    pub fn cluster_cache(&self) -> Result<(i64, Vec<KeyValue>)> {
        let err = |e: StoreSource| damaged(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let revision = match txn.open_table(CLUSTER_META) {
            Ok(t) => t
                .get("revision")
                .map_err(|e| err(e.into()))?
                .map_or(0, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(err(e.into())),
        };
        let mut kvs = Vec::new();
        match txn.open_table(CLUSTER) {
            Ok(t) => {
                for row in t.iter().map_err(|e| err(e.into()))? {
                    let (k, v) = row.map_err(|e| err(e.into()))?;
                    kvs.push((k.value().to_vec(), v.value().to_vec()));
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(err(e.into())),
        }
        Ok((revision, kvs))
    }

    /// Cluster mode: the values of `keys` as cached (absent ones left out).
    pub fn cluster_values(&self, keys: &[Vec<u8>]) -> Result<Vec<KeyValue>> {
        let err = |e: StoreSource| damaged(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = match txn.open_table(CLUSTER) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for k in keys {
            if let Some(v) = t.get(k.as_slice()).map_err(|e| err(e.into()))? {
                out.push((k.clone(), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// Cluster mode: writes etcd's keys (`None`: deleted) as of `revision` into a transaction
    /// committed with [`Pending::commit`]; `full` replaces every key held before.
    pub fn prepare_cluster(
        &self,
        updates: &[(Vec<u8>, Option<Vec<u8>>)],
        full: bool,
        revision: i64,
    ) -> Result<Pending> {
        let err = |e: StoreSource| self.write_err(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        if full {
            txn.delete_table(CLUSTER).map_err(|e| err(e.into()))?;
        }
        {
            let mut kv = txn.open_table(CLUSTER).map_err(|e| err(e.into()))?;
            for (k, v) in updates {
                match v {
                    Some(v) => kv.insert(k.as_slice(), v.as_slice()).map(drop),
                    None => kv.remove(k.as_slice()).map(drop),
                }
                .map_err(|e| err(e.into()))?;
            }
            let mut meta = txn.open_table(CLUSTER_META).map_err(|e| err(e.into()))?;
            meta.insert("revision", revision)
                .map_err(|e| err(e.into()))?;
        }
        Ok(Pending {
            txn,
            path: self.path.clone(),
        })
    }

    /// Records `changes` in one transaction, durable when this returns; on error none is.
    pub fn append(&mut self, changes: &[Change]) -> Result<()> {
        self.prepare(changes, &AtomicBool::new(false))?.commit()
    }

    /// Writes `changes` into a transaction that becomes durable with [`Pending::commit`] and
    /// is aborted when dropped; gives up once `stop` is set.
    pub fn prepare(&self, changes: &[Change], stop: &AtomicBool) -> Result<Pending> {
        let err = |e: StoreSource| self.write_err(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut lookups = txn.open_table(LOOKUPS).map_err(|e| err(e.into()))?;
            let mut providers = txn.open_table(PROVIDERS).map_err(|e| err(e.into()))?;
            for (i, c) in changes.iter().enumerate() {
                if i % 4096 == 0 && stop.load(Ordering::Relaxed) {
                    return Err(NvError::store("the change was refused; not stored"));
                }
                match c {
                    Change::PutLookup { record } => {
                        put_lookup(&mut lookups, record).map_err(err)?;
                    }
                    Change::DelLookup { vsid, ca } => {
                        lookups
                            .remove(lookup_key(*vsid, *ca).as_slice())
                            .map_err(|e| err(e.into()))?;
                    }
                    Change::PutProvider { provider } => {
                        put_provider(&mut providers, provider).map_err(err)?;
                    }
                    Change::DelProvider { pa } => {
                        providers
                            .remove(pa_key(*pa).as_slice())
                            .map_err(|e| err(e.into()))?;
                    }
                }
            }
        }
        Ok(Pending {
            txn,
            path: self.path.clone(),
        })
    }

    /// Replaces the whole stored state with `state`, in one transaction.
    pub fn snapshot(&mut self, state: &State) -> Result<()> {
        let err = |e: StoreSource| self.write_err(e);
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        for table in [LOOKUPS, LOOKUPS_JSON, PROVIDERS] {
            txn.delete_table(table).map_err(|e| err(e.into()))?;
        }
        {
            let mut lookups = txn.open_table(LOOKUPS).map_err(|e| err(e.into()))?;
            for r in &state.lookups {
                put_lookup(&mut lookups, r).map_err(err)?;
            }
            let mut providers = txn.open_table(PROVIDERS).map_err(|e| err(e.into()))?;
            for p in &state.providers {
                put_provider(&mut providers, p).map_err(err)?;
            }
        }
        txn.commit().map_err(|e| err(e.into()))?;
        if let Some(dir) = self.legacy.take() {
            for name in [store_legacy::SNAPSHOT, store_legacy::JOURNAL] {
                let old = dir.join(name);
                if old.exists() {
                    let kept = dir.join(format!("{name}.migrated"));
                    std::fs::rename(&old, &kept).map_err(|e| {
                        NvError::store_by(format!("cannot move {} aside", old.display()), e)
                    })?;
                }
            }
            tracing::info!("store migrated into {}", self.path.display());
        }
        Ok(())
    }
}

/// A key and its value, as etcd has them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A transaction of [`Store::prepare`], written and not committed.
pub struct Pending {
    txn: redb::WriteTransaction,
    path: PathBuf,
}

impl Pending {
    /// Makes the transaction durable (fsynced) when this returns; on error none of it is.
    pub fn commit(self) -> Result<()> {
        self.txn
            .commit()
            .map_err(|e| NvError::store_by(format!("cannot write {}", self.path.display()), e))
    }
}

type Table<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

/// A lookup record under its (VSID, CA) key; the error as text, for the caller to name the file.
fn put_lookup(t: &mut Table, r: &LookupRecord) -> std::result::Result<(), StoreSource> {
    t.insert(
        lookup_key(r.vsid, r.ca).as_slice(),
        encode_lookup(r).as_slice(),
    )?;
    Ok(())
}

/// The form of [`encode_lookup`]'s values: a first byte that changes with it.
const LOOKUP_FORM: u8 = 1;

/// An address as its family (4 or 6) and its bytes.
fn put_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend(a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend(a.octets());
        }
    }
}

/// A lookup record's value (its key holds VSID and CA): form, PA (family and bytes), MAC,
/// method, port (length and bytes, 0: none), name (16-bit length plus one, 0: none).
fn encode_lookup(r: &LookupRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.push(LOOKUP_FORM);
    put_addr(&mut v, r.pa);
    v.extend(r.mac.0);
    v.push(match r.method {
        Method::Encap => 0,
        Method::Rewrite => 1,
    });
    let port = r.port.as_deref().unwrap_or_default().as_bytes();
    v.push(u8::try_from(port.len()).unwrap_or(u8::MAX));
    v.extend(&port[..port.len().min(255)]);
    match &r.name {
        None => v.extend(0u16.to_be_bytes()),
        Some(n) => {
            let n = &n.as_bytes()[..n.len().min(usize::from(u16::MAX) - 1)];
            v.extend(u16::try_from(n.len() + 1).unwrap_or(u16::MAX).to_be_bytes());
            v.extend(n);
        }
    }
    v
}

/// Reads what [`lookup_key`] and [`encode_lookup`] wrote.
fn decode_lookup(key: &[u8], value: &[u8]) -> std::result::Result<LookupRecord, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("value cut short".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn addr(&mut self) -> std::result::Result<IpAddr, String> {
            match self.take(1)?[0] {
                4 => Ok(IpAddr::from(
                    <[u8; 4]>::try_from(self.take(4)?).unwrap_or_default(),
                )),
                6 => Ok(IpAddr::from(
                    <[u8; 16]>::try_from(self.take(16)?).unwrap_or_default(),
                )),
                f => Err(format!("address family {f}")),
            }
        }
        fn text(&mut self, n: usize) -> std::result::Result<String, String> {
            String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
        }
    }
    let mut k = Reader(key);
    let vsid = u32::from_be_bytes(k.take(4)?.try_into().unwrap_or_default());
    let ca = k.addr()?;
    let mut v = Reader(value);
    let form = v.take(1)?[0];
    if form != LOOKUP_FORM {
        return Err(format!("form {form}, this agent reads {LOOKUP_FORM}"));
    }
    let pa = v.addr()?;
    let mac = Mac(v.take(6)?.try_into().unwrap_or_default());
    let method = match v.take(1)?[0] {
        0 => Method::Encap,
        1 => Method::Rewrite,
        m => return Err(format!("method {m}")),
    };
    let port = match usize::from(v.take(1)?[0]) {
        0 => None,
        n => Some(v.text(n)?),
    };
    let name = match u16::from_be_bytes(v.take(2)?.try_into().unwrap_or_default()) {
        0 => None,
        n => Some(v.text(usize::from(n) - 1)?),
    };
    if !v.0.is_empty() || !k.0.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(LookupRecord {
        vsid,
        ca,
        pa,
        mac,
        method,
        port,
        name,
        host: None,
    })
}

fn put_provider(t: &mut Table, p: &ProviderState) -> std::result::Result<(), StoreSource> {
    let v = serde_json::to_vec(p)?;
    t.insert(pa_key(p.pa.addr).as_slice(), v.as_slice())?;
    Ok(())
}

/// What to do about a store that cannot be read.
const RECOVERY: &str = "forwarding continues from the pinned maps; restore the file from a \
                        backup, or move it away and start the agent with an empty store, then \
                        re-import the records (`nvctl lookup import`)";

/// The one error for a store that cannot be read: which file, how to recover, and why.
fn damaged(path: &Path, e: impl Into<StoreSource>) -> NvError {
    NvError::store_by(
        format!("store {} cannot be read ({RECOVERY})", path.display()),
        e,
    )
}

/// As [`damaged`], for what is wrong with the content itself.
fn damaged_content(path: &Path, why: &str) -> NvError {
    NvError::store(format!(
        "store {} cannot be read ({RECOVERY}): {why}",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ca: &str) -> LookupRecord {
        LookupRecord {
            vsid: 5001,
            ca: ca.parse().unwrap(),
            pa: "198.18.0.2".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 9, 9]),
            method: Method::Encap,
            port: None,
            name: Some("X".into()),
            host: None,
        }
    }

    #[test]
    fn changes_survive_reopen_and_a_snapshot_replaces_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, state, changes) = Store::open(dir.path()).unwrap();
        assert_eq!((state, changes.len()), (State::default(), 0));
        store
            .append(&[
                Change::PutLookup {
                    record: record("10.0.0.1"),
                },
                Change::PutLookup {
                    record: record("10.0.0.2"),
                },
                Change::DelLookup {
                    vsid: 5001,
                    ca: "10.0.0.1".parse().unwrap(),
                },
            ])
            .unwrap();
        drop(store);
        let (mut store, state, _) = Store::open(dir.path()).unwrap();
        assert_eq!(state.lookups, vec![record("10.0.0.2")]);
        let snap = State {
            providers: vec![],
            lookups: vec![record("10.0.0.7")],
        };
        store.snapshot(&snap).unwrap();
        drop(store);
        let (_, state, changes) = Store::open(dir.path()).unwrap();
        assert_eq!((state, changes.len()), (snap, 0));
    }

    #[test]
    fn records_round_trip_through_the_compact_form() {
        let mut all = vec![record("10.0.0.1")];
        let mut r = record("10.0.0.2");
        r.port = Some("red1".into());
        r.name = Some("RED-2 \u{e9}".into());
        r.method = Method::Rewrite;
        all.push(r);
        let mut r = record("10.0.0.3");
        r.name = Some(String::new());
        all.push(r);
        for r in all {
            let back = decode_lookup(&lookup_key(r.vsid, r.ca), &encode_lookup(&r)).unwrap();
            assert_eq!(back, r);
        }
        let v = encode_lookup(&record("10.0.0.1"));
        let k = lookup_key(5001, "10.0.0.1".parse().unwrap());
        assert!(decode_lookup(&k, &v[..v.len() - 1]).is_err());
        let mut other = v.clone();
        other[0] = 9;
        assert!(decode_lookup(&k, &other).unwrap_err().contains("form 9"));
    }

    #[test]
    fn json_records_of_an_earlier_agent_are_rewritten_compact() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(LOOKUPS_JSON).unwrap();
                let r = record("10.0.0.1");
                let v = serde_json::to_vec(&r).unwrap();
                t.insert(lookup_key(r.vsid, r.ca).as_slice(), v.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let (_, state, _) = Store::open(dir.path()).unwrap();
        assert_eq!(state.lookups, vec![record("10.0.0.1")]);
        let (store, state, _) = Store::open(dir.path()).unwrap();
        assert_eq!(state.lookups, vec![record("10.0.0.1")]);
        let txn = store.db.begin_read().unwrap();
        assert!(
            txn.open_table(LOOKUPS_JSON).is_err(),
            "the JSON table is gone"
        );
    }

    #[test]
    fn an_earlier_agents_store_is_migrated_once_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("state.json"),
            format!(
                r#"{{"version":1,"providers":[],"lookups":[{}]}}"#,
                serde_json::to_string(&record("10.0.0.1")).unwrap()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("journal.jsonl"),
            format!(
                "{}\n{{\"op\":\"put_look",
                serde_json::to_string(&Change::PutLookup {
                    record: record("10.0.0.2")
                })
                .unwrap()
            ),
        )
        .unwrap();
        let (mut store, state, changes) = Store::open(dir.path()).unwrap();
        assert!(store.needs_snapshot());
        assert_eq!(state.lookups, vec![record("10.0.0.1")]);
        assert_eq!(changes.len(), 1, "the cut last line is ignored");
        let both = State {
            providers: vec![],
            lookups: vec![record("10.0.0.1"), record("10.0.0.2")],
        };
        store.snapshot(&both).unwrap();
        assert!(!store.needs_snapshot());
        drop(store);
        assert!(dir.path().join("state.json.migrated").exists());
        assert!(!dir.path().join("state.json").exists());
        let (store, state, changes) = Store::open(dir.path()).unwrap();
        assert!(!store.needs_snapshot());
        assert_eq!((state, changes.len()), (both, 0));
    }

    #[test]
    fn a_damaged_store_is_one_error_naming_the_file_and_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _, _) = Store::open(dir.path()).unwrap();
        store
            .append(&[Change::PutLookup {
                record: record("10.0.0.1"),
            }])
            .unwrap();
        drop(store);
        let path = dir.path().join(FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        for damage in ["truncated", "overwritten"] {
            let mut bytes = std::fs::read(&path).unwrap();
            if damage == "truncated" {
                bytes.truncate(usize::try_from(len / 3).unwrap());
            } else {
                bytes.iter_mut().take(4096).for_each(|b| *b = 0x5a);
            }
            let copy = tempfile::tempdir().unwrap();
            std::fs::write(copy.path().join(FILE), &bytes).unwrap();
            let err = Store::open(copy.path()).err().unwrap().to_string();
            assert!(
                err.contains(&copy.path().join(FILE).display().to_string())
                    && err.contains("nvctl lookup import"),
                "{damage}: {err}"
            );
        }
    }
}
