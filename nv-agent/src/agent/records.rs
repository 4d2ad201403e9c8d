//! Lookup records changed through the API on a host of its own (cluster mode writes them
//! to etcd, whence they come back as changes to apply).
use std::{collections::HashMap, net::IpAddr};

use tracing::info;

use super::Agent;
use crate::{
    catalog::describe,
    control::admit::{Admitted, View, existing},
    error::{Result, invalid},
    model::{LookupRecord, ProviderState},
    netlink::LinkInfo,
    tables::Change,
};

impl Agent {
    /// What admission checks a change against, on this host.
    pub fn view(&self) -> View<'_> {
        View {
            catalog: &self.tables.catalog,
            host: &self.host_name,
            cluster: self.cluster.is_some(),
            max_lookups: self.max_lookups,
        }
    }

    /// The ports of admitted records that are this host's VMs', checked (a veth or tap that
    /// carries no host address, of no bridge, not the uplink), by name.
    pub async fn own_ports(&self, admitted: &Admitted) -> Result<HashMap<String, LinkInfo>> {
        let many = admitted.records.len() > 1;
        let mut links = HashMap::new();
        for (i, r) in admitted.records.iter().enumerate() {
            if r.port.is_none() {
                continue;
            }
            let view = admitted.local_view(r);
            match self.check_port(&view).await {
                Ok(Some(link)) => {
                    links.insert(link.name.clone(), link);
                }
                Ok(None) => {}
                Err(e) if many => {
                    return Err(invalid(format!("record {} ({}): {e}", i + 1, describe(r))));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(links)
    }

    /// Applies admitted records on this host alone (its store records them): each checked
    /// against the table with the ones before it, then all mapped and stored, or none.
    #[tracing::instrument(skip_all, fields(records = admitted.records.len()))]
    pub async fn apply_admitted(
        &mut self,
        mut admitted: Admitted,
        links: HashMap<String, LinkInfo>,
    ) -> Result<crate::control::Recorded> {
        let started = std::time::Instant::now();
        let n = admitted.records.len();
        let replaces = admitted.replaces();
        // A change of one answers with its record; an import's records move into the change
        // set (a million clones would cost time and the table's memory again).
        let one = (n == 1).then(|| admitted.records[0].clone());
        let changes: Vec<Change> = std::mem::take(&mut admitted.records)
            .into_iter()
            .map(|record| Change::PutLookup { record })
            .collect();
        let mut i = 0;
        let applied = self
            .apply(&changes, &links, |c, change| {
                i += 1;
                match change {
                    Change::PutLookup { record } => admitted.check(c, i - 1, record),
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
        match &one {
            Some(r) if replaces => {
                info!("moved lookup record {} to PA {}", describe(r), r.pa);
            }
            Some(r) => info!("added lookup record {}", describe(r)),
            None => info!(
                records = n,
                "imported {n} lookup records in {} ms",
                started.elapsed().as_millis()
            ),
        }
        Ok(crate::control::Recorded { count: n, one })
    }

    /// The record of (`vsid`, `ca`), or why there is none.
    pub fn lookup(&self, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
        existing(&self.tables.catalog, vsid, ca)
    }

    /// Takes the record of (`vsid`, `ca`) away, on this host alone.
    #[tracing::instrument(skip(self))]
    pub async fn remove_lookup(&mut self, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
        let removed = self.lookup(vsid, ca)?;
        self.tables.catalog.check_del(&(vsid, ca))?;
        self.apply(
            &[Change::DelLookup { vsid, ca }],
            &HashMap::new(),
            |_, _| Ok(()),
        )
        .await?;
        info!("deleted lookup record {}", describe(&removed));
        Ok(removed)
    }

    pub fn providers(&self) -> Vec<ProviderState> {
        self.tables.catalog.providers().to_vec()
    }

    /// The records in (VSID, CA) order, of one VSID or all.
    pub fn lookups(&self, vsid: Option<u32>) -> Vec<LookupRecord> {
        self.tables.catalog.lookups(vsid)
    }

    pub fn catalog(&self) -> &crate::catalog::Catalog {
        &self.tables.catalog
    }
}
