//! Lookup records changed through the API on a host of its own (cluster mode writes them
//! to etcd, whence they come back as changes to apply).
use std::{collections::HashMap, net::IpAddr};

use tracing::info;

use super::Agent;
use crate::{
    catalog::describe,
    error::{NvError, Result, invalid},
    model::{LookupRecord, ProviderState},
    tables::Change,
};

/// A record's move to another host or port: HNV migration, one change.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub vsid: u32,
    pub ca: IpAddr,
    pub pa: IpAddr,
    #[serde(default)]
    pub port: Option<String>,
    /// Cluster mode: the host of the new port [default: this host].
    #[serde(default)]
    pub host: Option<String>,
}

impl Agent {
    /// Alone (not in cluster mode), a record's VM port is this host's: naming another host
    /// needs cluster mode.
    pub(super) fn own_host(&self, mut r: LookupRecord) -> Result<LookupRecord> {
        match r.host.take() {
            Some(h) if h != self.host_name => Err(invalid(format!(
                "host '{h}' is not this host ({}): records name other hosts in cluster mode \
                 only (etcd_endpoints)",
                self.host_name
            ))),
            _ => Ok(r),
        }
    }

    pub(super) fn check_capacity(&self, adding: usize) -> Result<()> {
        let len = self.tables.catalog.len();
        if len + adding > usize::try_from(self.max_lookups).unwrap_or(usize::MAX) {
            return Err(NvError::Conflict(format!(
                "lookup table full: {len} entries of {}, {adding} more asked for; raise max_lookups",
                self.max_lookups
            )));
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(vsid = r.vsid, ca = %r.ca, pa = %r.pa, port = ?r.port))]
    pub async fn add_lookup(&mut self, r: LookupRecord) -> Result<LookupRecord> {
        let r = self.own_host(r)?;
        r.validate()?;
        self.tables.catalog.check(&r, None)?;
        self.check_capacity(1)?;
        let links = self.check_port(&r).await?.map(|l| (l.name.clone(), l));
        let change = Change::PutLookup { record: r.clone() };
        self.apply(&[change], &links.into_iter().collect(), |c, _| {
            c.check(&r, None)
        })
        .await?;
        info!("added lookup record {}", describe(&r));
        Ok(r)
    }

    /// Adds many records as one change: each is checked against the table and the ones before
    /// it, then all are mapped and stored, or none.
    #[tracing::instrument(skip_all, fields(records = records.len()))]
    pub async fn import_lookups(&mut self, records: Vec<LookupRecord>) -> Result<usize> {
        let started = std::time::Instant::now();
        let records = records
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                self.own_host(r)
                    .map_err(|e| invalid(format!("record {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>>>()?;
        self.check_capacity(records.len())?;
        let mut links = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            let link = match r.validate() {
                Ok(()) => self.check_port(r).await,
                Err(e) => Err(e),
            };
            match link {
                Ok(Some(link)) => {
                    links.insert(link.name.clone(), link);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(invalid(format!("record {} ({}): {e}", i + 1, describe(r))));
                }
            }
        }
        let n = records.len();
        let checked = started.elapsed();
        let changes: Vec<Change> = records
            .into_iter()
            .map(|record| Change::PutLookup { record })
            .collect();
        let mut i = 0;
        let applied = self
            .apply(&changes, &links, |c, change| {
                i += 1;
                match change {
                    Change::PutLookup { record } => c
                        .check(record, None)
                        .map_err(|e| invalid(format!("record {i} ({}): {e}", describe(record)))),
                    _ => Ok(()),
                }
            })
            .await;
        drop(changes);
        if n >= 4096 {
            // The request's records and the plan were a few hundred bytes a record; give the
            // pages back rather than keep them as the agent's for the next import.
            // SAFETY: malloc_trim only releases free memory of this process's heap.
            unsafe { libc::malloc_trim(0) };
        }
        applied?;
        info!(
            records = n,
            "imported {n} lookup records in {} ms ({} ms checking them on their own)",
            started.elapsed().as_millis(),
            checked.as_millis()
        );
        Ok(n)
    }

    #[tracing::instrument(skip(self))]
    pub async fn del_lookup(&mut self, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
        let Some(removed) = self.tables.catalog.get(&(vsid, ca)) else {
            return Err(NvError::NotFound(format!(
                "no lookup record for VSID {vsid} CA {ca}"
            )));
        };
        self.apply(
            &[Change::DelLookup { vsid, ca }],
            &HashMap::new(),
            |_, _| Ok(()),
        )
        .await?;
        info!("deleted lookup record {}", describe(&removed));
        Ok(removed)
    }

    /// Replaces a record's PA and port in one change (migration).
    #[tracing::instrument(skip_all, fields(vsid = m.vsid, ca = %m.ca, pa = %m.pa, port = ?m.port))]
    pub async fn move_lookup(&mut self, m: MoveRequest) -> Result<LookupRecord> {
        let key = (m.vsid, m.ca);
        let Some(old) = self.tables.catalog.get(&key) else {
            return Err(NvError::NotFound(format!(
                "no lookup record for VSID {} CA {}",
                m.vsid, m.ca
            )));
        };
        let mut moved = old;
        moved.pa = m.pa;
        moved.port = m.port;
        moved.host = m.host;
        let moved = self.own_host(moved)?;
        moved.validate()?;
        self.tables.catalog.check(&moved, Some(&key))?;
        let links = self.check_port(&moved).await?.map(|l| (l.name.clone(), l));
        let change = Change::PutLookup {
            record: moved.clone(),
        };
        self.apply(&[change], &links.into_iter().collect(), |c, _| {
            c.check(&moved, Some(&key))
        })
        .await?;
        info!(
            "moved lookup record {} to PA {}",
            describe(&moved),
            moved.pa
        );
        Ok(moved)
    }

    pub fn providers(&self) -> Vec<ProviderState> {
        self.tables.catalog.providers().to_vec()
    }

    /// The records in (VSID, CA) order, of one VSID or all.
    pub fn lookups(&self, vsid: Option<u32>) -> Vec<LookupRecord> {
        self.tables.catalog.lookups(vsid)
    }
}
