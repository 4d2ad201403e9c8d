//! The store: the agent's source of truth under `state_dir`, in an embedded database (redb,
//! `nv.redb`): every change is one transaction, durable (fsynced) before nvctl gets its answer,
//! and atomic, so a crash leaves the state before it or after it, never between. Lookup records
//! are keyed by (VSID, CA), provider addresses by PA; a lookup record's value is its other
//! fields in a compact binary form, a provider's is JSON in the CLI's field names. The BPF maps are the store's cache. A store of an earlier agent (snapshot
//! plus journal) is migrated on first start and its files kept as `*.migrated`.
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};

use crate::{
    error::{NvError, Result, StoreSource},
    model::LookupRecord,
    store_legacy,
    tables::{Acls, Change, Lookups, Providers, Routes, State, Table},
};

const FILE: &str = "nv.redb";
/// The catalog holds every record and the store is read once at start: a small cache does.
const STORE_CACHE: usize = 4 << 20;
/// A table's rows, in the form its module says ([`Table::STORE`]).
type Rows = TableDefinition<'static, &'static [u8], &'static [u8]>;

const fn rows<T: Table>() -> Rows {
    TableDefinition::new(T::STORE)
}
/// Cluster mode: what this agent last applied of etcd, key by key as etcd has it (the record's
/// JSON), so it starts, and forwards, from there while etcd is away.
const CLUSTER: TableDefinition<&[u8], &[u8]> = TableDefinition::new("cluster_v1");
/// Cluster mode: the etcd revision `CLUSTER` holds.
const CLUSTER_META: TableDefinition<&str, i64> = TableDefinition::new("cluster_meta_v1");
/// Lookup records as JSON, as agents before the compact form stored them: migrated on open.
const LOOKUPS_JSON: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lookups_v1");

pub struct Store {
    db: Database,
    path: PathBuf,
    /// The files of an earlier agent's store, migrated by the first [`Store::snapshot`].
    legacy: Option<PathBuf>,
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
        let txn = self.db.begin_read().map_err(|e| damaged(&self.path, e))?;
        Ok(State {
            lookups: self.read_rows::<Lookups>(&txn)?,
            providers: self.read_rows::<Providers>(&txn)?,
            routes: self.read_rows::<Routes>(&txn)?,
            acls: self.read_rows::<Acls>(&txn)?,
        })
    }

    /// Every row of table `T`.
    fn read_rows<T: Table>(&self, txn: &redb::ReadTransaction) -> Result<Vec<T::Row>> {
        let err = |e: StoreSource| damaged(&self.path, e);
        let t = match txn.open_table(rows::<T>()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.into())),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| err(e.into()))? {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            out.push(T::decode(k.value(), v.value()).map_err(|e| {
                damaged_content(
                    &self.path,
                    &format!("a row of {} does not parse ({e})", T::NAME),
                )
            })?);
        }
        Ok(out)
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
            let mut new = txn
                .open_table(rows::<Lookups>())
                .map_err(|e| err(e.into()))?;
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
                put_row::<Lookups>(&mut new, &r).map_err(err)?;
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
            // The tables written so far, open (an import writes a million rows into one).
            let mut open: Vec<(&str, Open<'_>)> = Vec::new();
            for (i, c) in changes.iter().enumerate() {
                if i % 4096 == 0 && stop.load(Ordering::Relaxed) {
                    return Err(NvError::store("the change was refused; not stored"));
                }
                let w = c.store_write();
                let at = if let Some(at) = open.iter().position(|(name, _)| *name == w.table) {
                    at
                } else {
                    let t = txn
                        .open_table(TableDefinition::new(w.table))
                        .map_err(|e| err(e.into()))?;
                    open.push((w.table, t));
                    open.len() - 1
                };
                let t = &mut open[at].1;
                match &w.value {
                    Some(v) => t.insert(w.key.as_slice(), v.as_slice()).map(drop),
                    None => t.remove(w.key.as_slice()).map(drop),
                }
                .map_err(|e| err(e.into()))?;
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
        for table in [
            rows::<Lookups>(),
            LOOKUPS_JSON,
            rows::<Providers>(),
            rows::<Routes>(),
            rows::<Acls>(),
        ] {
            txn.delete_table(table).map_err(|e| err(e.into()))?;
        }
        {
            let mut lookups = txn
                .open_table(rows::<Lookups>())
                .map_err(|e| err(e.into()))?;
            for r in &state.lookups {
                put_row::<Lookups>(&mut lookups, r).map_err(err)?;
            }
            let mut providers = txn
                .open_table(rows::<Providers>())
                .map_err(|e| err(e.into()))?;
            for p in &state.providers {
                put_row::<Providers>(&mut providers, p).map_err(err)?;
            }
            let mut routes = txn
                .open_table(rows::<Routes>())
                .map_err(|e| err(e.into()))?;
            for r in &state.routes {
                put_row::<Routes>(&mut routes, r).map_err(err)?;
            }
            let mut acls = txn.open_table(rows::<Acls>()).map_err(|e| err(e.into()))?;
            for r in &state.acls {
                put_row::<Acls>(&mut acls, r).map_err(err)?;
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

type Open<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

/// A row of table `T` under its key.
fn put_row<T: Table>(t: &mut Open<'_>, row: &T::Row) -> std::result::Result<(), StoreSource> {
    t.insert(
        T::store_key(&T::key(row)).as_slice(),
        T::encode(row).as_slice(),
    )?;
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
    use crate::model::{Mac, Method};

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

    fn route(prefix: &str) -> crate::model::RouteRecord {
        crate::model::RouteRecord {
            rdid: "contoso".parse().unwrap(),
            vsid: 5001,
            prefix: prefix.parse().unwrap(),
            nexthop: crate::model::ON_LINK,
            metric: 0,
            gateway: None,
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
                Change::PutRoute {
                    route: route("10.1.0.0/24"),
                },
                Change::PutRoute {
                    route: route("10.2.0.0/24"),
                },
                Change::del_route(route("10.1.0.0/24").key()),
            ])
            .unwrap();
        drop(store);
        let (mut store, state, _) = Store::open(dir.path()).unwrap();
        assert_eq!(state.lookups, vec![record("10.0.0.2")]);
        assert_eq!(state.routes, vec![route("10.2.0.0/24")]);
        let snap = State {
            providers: vec![],
            lookups: vec![record("10.0.0.7")],
            routes: vec![route("10.3.0.0/24")],
            acls: vec![],
        };
        store.snapshot(&snap).unwrap();
        drop(store);
        let (_, state, changes) = Store::open(dir.path()).unwrap();
        assert_eq!((state, changes.len()), (snap, 0));
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
                t.insert(Lookups::store_key(&r.key()).as_slice(), v.as_slice())
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
            ..State::default()
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
