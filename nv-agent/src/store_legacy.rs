//! The store of earlier nv agents: a snapshot (`state.json`) plus a journal of changes
//! (`journal.jsonl`). Read once, when an agent finds it and no database yet, to migrate it into
//! the database ([`crate::store`]); never written.
use std::{fs, path::Path};

use serde::Deserialize;

use crate::{
    error::{NvError, Result},
    tables::Change,
    tables::State,
};

pub const SNAPSHOT: &str = "state.json";
pub const JOURNAL: &str = "journal.jsonl";
const FORMAT_VERSION: u32 = 1;

#[derive(Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    state: State,
}

fn store_err(what: &str, path: &Path, e: impl Into<crate::error::StoreSource>) -> NvError {
    NvError::store_by(format!("{what} {}", path.display()), e)
}

/// Whether `dir` holds a store of this kind.
pub fn exists(dir: &Path) -> bool {
    dir.join(SNAPSHOT).exists() || dir.join(JOURNAL).exists()
}

/// Reads the store in `dir`: the snapshot, and the changes since. A cut last journal line
/// (a crash mid-write, never acknowledged) is ignored.
pub fn read(dir: &Path) -> Result<(State, Vec<Change>)> {
    {
        let path = dir.join(SNAPSHOT);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes)
                    .map_err(|e| store_err("unreadable:", &path, e))?;
                if disk.version != FORMAT_VERSION {
                    return Err(NvError::store(format!(
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
            tracing::warn!("ignoring the cut last line of {}", jpath.display());
        }
        Ok((state, changes))
    }
}
