//! The store: the agent's source of truth, one JSON document under `state_dir`, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so a crash leaves
//! either the old or the new state, never a mix. The BPF maps are its cache.
use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{NvError, Result},
    model::{LookupRecord, ProviderState},
};

const FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub providers: Vec<ProviderState>,
    pub lookups: Vec<LookupRecord>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    #[serde(flatten)]
    state: State,
}

pub struct Store {
    dir: PathBuf,
    state: State,
}

impl Store {
    /// Opens the store in `dir`, creating the directory when missing.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| NvError::Store(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(FILE);
        let state = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| {
                    NvError::Store(format!("{} is unreadable: {e}", path.display()))
                })?;
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
            Err(e) => {
                return Err(NvError::Store(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(Store {
            dir: dir.to_owned(),
            state,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Makes `state` the stored state; on error the stored state is unchanged.
    pub fn commit(&mut self, state: State) -> Result<()> {
        let err = |what: &str, e: std::io::Error| {
            NvError::Store(format!("{what} in {}: {e}", self.dir.display()))
        };
        let bytes = serde_json::to_vec_pretty(&OnDisk {
            version: FORMAT_VERSION,
            state: state.clone(),
        })
        .map_err(|e| NvError::Store(e.to_string()))?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let mut file = File::create(&tmp).map_err(|e| err("cannot create temporary file", e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| err("cannot write temporary file", e))?;
        fs::rename(&tmp, self.dir.join(FILE)).map_err(|e| err("cannot replace state file", e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("cannot sync directory", e))?;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mac, Method};

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.state(), &State::default());
        let mut state = State::default();
        state.lookups.push(LookupRecord {
            vsid: 5001,
            ca: "10.0.0.1".parse().unwrap(),
            pa: "198.18.0.1".parse().unwrap(),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            method: Method::Encap,
            port: Some("red1".into()),
            name: Some("RED-1".into()),
        });
        store.commit(state.clone()).unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.state(), &state);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{ not json").unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("unreadable"), "{err}");
    }
}
