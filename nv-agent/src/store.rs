//! The store: the agent's source of truth under `state_dir`, crash-safe, and cheap per change
//! at any table size. A snapshot (`state.json`, replaced atomically: temporary file, fsync,
//! rename, fsync the directory) plus a journal of changes since (`journal.jsonl`, one JSON line
//! per change, fsynced before the agent answers). A crash can only cut the journal's last line,
//! which was never acknowledged; it is ignored. The journal is folded into a new snapshot when
//! it grows. The BPF maps are the store's cache.
use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{NvError, Result},
    model::{LookupRecord, ProviderState},
};

const SNAPSHOT: &str = "state.json";
const JOURNAL: &str = "journal.jsonl";
const FORMAT_VERSION: u32 = 1;
/// Journal lines after which the next change folds it into a snapshot.
const COMPACT_AFTER: usize = 100_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub providers: Vec<ProviderState>,
    pub lookups: Vec<LookupRecord>,
}

/// One change, as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    PutLookup { record: LookupRecord },
    DelLookup { vsid: u32, ca: IpAddr },
    PutProvider { provider: ProviderState },
    DelProvider { pa: IpAddr },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    state: State,
}

pub struct Store {
    dir: PathBuf,
    journal: File,
    journal_lines: usize,
}

fn store_err(what: &str, path: &Path, e: impl std::fmt::Display) -> NvError {
    NvError::Store(format!("{what} {}: {e}", path.display()))
}

impl Store {
    /// Opens the store in `dir` (created when missing): the snapshot, and the changes since.
    pub fn open(dir: &Path) -> Result<(Store, State, Vec<Change>)> {
        fs::create_dir_all(dir).map_err(|e| store_err("cannot create", dir, e))?;
        let path = dir.join(SNAPSHOT);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes)
                    .map_err(|e| store_err("unreadable:", &path, e))?;
                if disk.version != FORMAT_VERSION {
                    return Err(NvError::Store(format!(
                        "{} has format version {}, this agent reads version {FORMAT_VERSION}",
                        path.display(),
                        disk.version
                    )));
                }
                disk.state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(store_err("cannot read", &path, e)),
        };
        let jpath = dir.join(JOURNAL);
        let mut changes = Vec::new();
        let text = match fs::read(&jpath) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(store_err("cannot read", &jpath, e)),
        };
        // Only newline-terminated lines were fsynced and acknowledged; a crash can leave a cut
        // last line, which is dropped (and cut off, so the next change starts a clean line).
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for (i, line) in text[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            changes.push(
                serde_json::from_slice(line)
                    .map_err(|e| store_err(&format!("line {} unreadable in", i + 1), &jpath, e))?,
            );
        }
        if complete < text.len() {
            tracing::warn!("dropping the cut last line of {}", jpath.display());
            OpenOptions::new()
                .write(true)
                .open(&jpath)
                .and_then(|f| f.set_len(complete as u64).and_then(|()| f.sync_all()))
                .map_err(|e| store_err("cannot repair", &jpath, e))?;
        }
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jpath)
            .map_err(|e| store_err("cannot open", &jpath, e))?;
        let journal_lines = changes.len();
        Ok((
            Store {
                dir: dir.to_owned(),
                journal,
                journal_lines,
            },
            state,
            changes,
        ))
    }

    /// Records `changes` durably (one write, one fsync); on error nothing was acknowledged.
    pub fn append(&mut self, changes: &[Change]) -> Result<()> {
        let jpath = self.dir.join(JOURNAL);
        let mut buf = Vec::new();
        for c in changes {
            serde_json::to_writer(&mut buf, c).map_err(|e| NvError::Store(e.to_string()))?;
            buf.push(b'\n');
        }
        self.journal
            .write_all(&buf)
            .and_then(|()| self.journal.sync_data())
            .map_err(|e| store_err("cannot write", &jpath, e))?;
        self.journal_lines += changes.len();
        Ok(())
    }

    /// Whether the journal is long enough to fold into a snapshot.
    pub fn wants_snapshot(&self) -> bool {
        self.journal_lines >= COMPACT_AFTER
    }

    /// Replaces the snapshot with `state` and empties the journal.
    pub fn snapshot(&mut self, state: &State) -> Result<()> {
        let dir = self.dir.clone();
        let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
        let bytes = serde_json::to_vec(&OnDisk {
            version: FORMAT_VERSION,
            state: state.clone(),
        })
        .map_err(|e| NvError::Store(e.to_string()))?;
        let mut file = File::create(&tmp).map_err(|e| store_err("cannot create", &tmp, e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| store_err("cannot write", &tmp, e))?;
        fs::rename(&tmp, dir.join(SNAPSHOT))
            .map_err(|e| store_err("cannot replace", &dir.join(SNAPSHOT), e))?;
        // The snapshot holds every change now: the journal can start over.
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_all())
            .map_err(|e| store_err("cannot truncate", &dir.join(JOURNAL), e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| store_err("cannot sync", &dir, e))?;
        self.journal_lines = 0;
        Ok(())
    }
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
    fn changes_survive_reopen_and_snapshots_fold_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, state, changes) = Store::open(dir.path()).unwrap();
        assert_eq!((state, changes.len()), (State::default(), 0));
        let put = Change::PutLookup {
            record: record("10.0.0.1"),
        };
        let del = Change::DelLookup {
            vsid: 5001,
            ca: "10.0.0.1".parse().unwrap(),
        };
        store.append(&[put.clone(), del.clone()]).unwrap();
        drop(store);
        let (mut store, _, changes) = Store::open(dir.path()).unwrap();
        assert_eq!(changes, vec![put, del]);
        let snap = State {
            providers: vec![],
            lookups: vec![record("10.0.0.7")],
        };
        store.snapshot(&snap).unwrap();
        drop(store);
        let (_, state, changes) = Store::open(dir.path()).unwrap();
        assert_eq!((state, changes.len()), (snap, 0));
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn a_cut_last_line_is_ignored_but_a_corrupt_one_before_it_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _, _) = Store::open(dir.path()).unwrap();
        store
            .append(&[Change::PutLookup {
                record: record("10.0.0.1"),
            }])
            .unwrap();
        drop(store);
        let j = dir.path().join(JOURNAL);
        let mut text = fs::read_to_string(&j).unwrap();
        text.push_str("{\"op\":\"put_look");
        fs::write(&j, &text).unwrap();
        let (_, _, changes) = Store::open(dir.path()).unwrap();
        assert_eq!(changes.len(), 1);
        // The cut line was cut off: a new change starts a clean line.
        assert!(fs::read_to_string(&j).unwrap().ends_with("}\n"));
        fs::write(&j, format!("garbage\n{text}\n")).unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 1 unreadable"), "{err}");
    }

    #[test]
    fn corrupt_snapshot_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SNAPSHOT), b"{ not json").unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("unreadable"), "{err}");
    }
}
