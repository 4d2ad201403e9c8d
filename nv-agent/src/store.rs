//! The store: the agent's source of truth under `state_dir`, in an embedded database (redb,
//! `nv.redb`): every change is one transaction, durable (fsynced) before nvctl gets its answer,
//! and atomic, so a crash leaves the state before it or after it, never between. Lookup records
//! are keyed by (VSID, CA), provider addresses by PA; values are the records as JSON, in the
//! CLI's field names. The BPF maps are the store's cache. A store of an earlier agent (snapshot
//! plus journal) is migrated on first start and its files kept as `*.migrated`.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    error::{NvError, Result},
    model::{LookupRecord, ProviderState},
    store_legacy,
};

const FILE: &str = "nv.redb";
const STORE_CACHE: usize = 16 << 20;
const LOOKUPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("lookups_v1");
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
    match ca {
        IpAddr::V4(a) => {
            k.push(4);
            k.extend(a.octets());
        }
        IpAddr::V6(a) => {
            k.push(6);
            k.extend(a.octets());
        }
    }
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
            .map_err(|e| NvError::Store(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let fresh = !path.exists();
        // redb caches up to 1 GiB by default; the catalog already holds every record in
        // memory, and the store is read once at start, so a small cache is enough.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE)
            .create(&path)
            .map_err(|e| damaged(&path, &e))?;
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
        let err = |e: &dyn std::fmt::Display| damaged(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| err(&e))?;
        let mut state = State::default();
        for (table, is_lookup) in [(LOOKUPS, true), (PROVIDERS, false)] {
            let t = match txn.open_table(table) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(err(&e)),
            };
            for row in t.iter().map_err(|e| err(&e))? {
                let (_, v) = row.map_err(|e| err(&e))?;
                let bad = |e: serde_json::Error| {
                    err(&format!(
                        "a value does not parse ({e}): {}",
                        String::from_utf8_lossy(v.value())
                    ))
                };
                if is_lookup {
                    state
                        .lookups
                        .push(serde_json::from_slice(v.value()).map_err(bad)?);
                } else {
                    state
                        .providers
                        .push(serde_json::from_slice(v.value()).map_err(bad)?);
                }
            }
        }
        Ok(state)
    }

    fn write_err(&self, e: &dyn std::fmt::Display) -> NvError {
        NvError::Store(format!("cannot write {}: {e}", self.path.display()))
    }

    /// Records `changes` in one transaction, durable when this returns; on error none is.
    pub fn append(&mut self, changes: &[Change]) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| self.write_err(e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        {
            let mut lookups = txn.open_table(LOOKUPS).map_err(|e| err(&e))?;
            let mut providers = txn.open_table(PROVIDERS).map_err(|e| err(&e))?;
            for c in changes {
                match c {
                    Change::PutLookup { record } => {
                        put_lookup(&mut lookups, record).map_err(|e| err(&e))?;
                    }
                    Change::DelLookup { vsid, ca } => {
                        lookups
                            .remove(lookup_key(*vsid, *ca).as_slice())
                            .map_err(|e| err(&e))?;
                    }
                    Change::PutProvider { provider } => {
                        put_provider(&mut providers, provider).map_err(|e| err(&e))?;
                    }
                    Change::DelProvider { pa } => {
                        providers
                            .remove(pa_key(*pa).as_slice())
                            .map_err(|e| err(&e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| err(&e))
    }

    /// Replaces the whole stored state with `state`, in one transaction.
    pub fn snapshot(&mut self, state: &State) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| self.write_err(e);
        let txn = self.db.begin_write().map_err(|e| err(&e))?;
        for table in [LOOKUPS, PROVIDERS] {
            txn.delete_table(table).map_err(|e| err(&e))?;
        }
        {
            let mut lookups = txn.open_table(LOOKUPS).map_err(|e| err(&e))?;
            for r in &state.lookups {
                put_lookup(&mut lookups, r).map_err(|e| err(&e))?;
            }
            let mut providers = txn.open_table(PROVIDERS).map_err(|e| err(&e))?;
            for p in &state.providers {
                put_provider(&mut providers, p).map_err(|e| err(&e))?;
            }
        }
        txn.commit().map_err(|e| err(&e))?;
        if let Some(dir) = self.legacy.take() {
            for name in [store_legacy::SNAPSHOT, store_legacy::JOURNAL] {
                let old = dir.join(name);
                if old.exists() {
                    let kept = dir.join(format!("{name}.migrated"));
                    std::fs::rename(&old, &kept).map_err(|e| {
                        NvError::Store(format!("cannot move {} aside: {e}", old.display()))
                    })?;
                }
            }
            tracing::info!("store migrated into {}", self.path.display());
        }
        Ok(())
    }
}

type Table<'t> = redb::Table<'t, &'static [u8], &'static [u8]>;

/// A lookup record under its (VSID, CA) key; the error as text, for the caller to name the file.
fn put_lookup(t: &mut Table, r: &LookupRecord) -> std::result::Result<(), String> {
    let v = serde_json::to_vec(r).map_err(|e| e.to_string())?;
    t.insert(lookup_key(r.vsid, r.ca).as_slice(), v.as_slice())
        .map(drop)
        .map_err(|e| e.to_string())
}

fn put_provider(t: &mut Table, p: &ProviderState) -> std::result::Result<(), String> {
    let v = serde_json::to_vec(p).map_err(|e| e.to_string())?;
    t.insert(pa_key(p.pa.addr).as_slice(), v.as_slice())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The one error for a store that cannot be read: which file, and how to recover.
fn damaged(path: &Path, e: &dyn std::fmt::Display) -> NvError {
    NvError::Store(format!(
        "store {} cannot be read ({e}). Forwarding continues from the pinned maps. Restore the \
         file from a backup, or move it away and start the agent with an empty store, then \
         re-import the records (`nvctl lookup import`)",
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
