//! Cluster mode as the operator: nvctl writes lookup records to etcd itself, under the
//! operator's certificate (hosts' identities may only read them and write their own key).
//! A change is admitted by the same function as an agent's ([`crate::control::admit`]),
//! against the records etcd holds as a host without their VMs sees them: the checks that need
//! a host's own ports and provider addresses stay with that host, which leaves a bad record
//! out and reports it. It is written through the etcd writer as a compare-and-write
//! ([`crate::etcd_records`]); when an agent runs here, nvctl answers once it has applied it.
use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;

use super::{args::EtcdArgs, client::Client};
use crate::{
    api::types::{ClusterStatus, MoveRequest},
    catalog::Catalog,
    control::{
        admit::{Proposal, View, admit, admit_watched},
        routes::{admit_add, admit_del},
    },
    error::{invalid, one_line},
    etcd_access::{self, EtcdAccess, TlsFiles},
    etcd_records::EtcdRecords,
    etcd_writer::EtcdWriter,
    model::{LookupRecord, Rdid, RouteKey, RouteRecord, Subnet, acl::AclRule},
    tables::{
        Table,
        acls::{self, AclIndex, Acls},
        lookups::{Lookups, etcd_key, local_view, parse_etcd_key, placed},
        routes::{self, RouteIndex, Routes},
    },
};

/// The host the operator's view is of: none (no host's name is empty), so records are seen
/// without their ports.
const NO_HOST: &str = "";
/// How long nvctl waits for the agent here to apply what it wrote.
const APPLIED_WAIT: Duration = Duration::from_secs(10);

/// nvctl as the operator, given etcd's endpoints and the operator's certificate.
pub struct Operator<'a> {
    writer: EtcdWriter,
    /// Said with a member that cannot be reached: without a certificate of its own, nvctl
    /// may be refused at the handshake by an etcd that asks for one.
    unreached_hint: Option<&'static str>,
    /// The agent of this host, if one runs: it names the host a `--port` is on, and says
    /// when it has applied a change.
    agent: &'a Client,
}

/// The records etcd holds, and what it holds besides.
pub struct Held {
    pub revision: i64,
    /// Every record that parses, in (VSID, CA) order.
    pub records: Vec<LookupRecord>,
    /// Keys under the records' prefix that are no record (every host leaves them out).
    pub bad: usize,
}

impl<'a> Operator<'a> {
    /// The operator's access to etcd, if `--etcd-endpoints` is given.
    pub fn from_args(args: &EtcdArgs, agent: &'a Client) -> anyhow::Result<Option<Operator<'a>>> {
        let files = TlsFiles {
            ca: args.etcd_ca_file.clone(),
            cert: args.etcd_cert_file.clone(),
            key: args.etcd_key_file.clone(),
        };
        let Some(endpoints) = &args.etcd_endpoints else {
            if files != TlsFiles::default() {
                anyhow::bail!(
                    "--etcd-ca-file, --etcd-cert-file and --etcd-key-file are for writing to \
                     etcd as the operator: give --etcd-endpoints too (or NV_ETCD_ENDPOINTS)"
                );
            }
            return Ok(None);
        };
        let access = EtcdAccess::new(
            etcd_access::split_endpoints(endpoints),
            &files,
            &etcd_access::FLAGS,
        )?;
        Ok(Some(Operator {
            writer: EtcdWriter::new(access.endpoints.clone(), access.connect_options()),
            unreached_hint: (access.tls && !access.authenticated).then_some(
                "; etcd may ask for a client certificate: give the operator's \
                 (--etcd-cert-file, --etcd-key-file)",
            ),
            agent,
        }))
    }

    /// An error of etcd's as nvctl says it: one line, each cause once.
    fn said(&self, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
        let mut line = one_line(e);
        if let Some(hint) = self.unreached_hint
            && (line.contains("unreachable") || line.contains("no member answered"))
        {
            line.push_str(hint);
        }
        anyhow::anyhow!(line)
    }

    fn records(&self) -> EtcdRecords<'_> {
        EtcdRecords {
            writer: &self.writer,
            meanwhile: None,
        }
    }

    /// Every record etcd holds.
    pub async fn held(&self) -> anyhow::Result<Held> {
        let (revision, mut records, bad) = self.rows::<Lookups>(parse_etcd_key).await?;
        records.sort_by_key(LookupRecord::key);
        Ok(Held {
            revision,
            records,
            bad,
        })
    }

    /// Every row of table `T` etcd holds that parses under its own key (`parse_key` reads
    /// the key), the revision read at, and how many keys under the table's prefix are none.
    async fn rows<T: Table>(
        &self,
        parse_key: fn(&[u8]) -> Option<T::Key>,
    ) -> anyhow::Result<(i64, Vec<T::Row>, usize)>
    where
        T::Key: PartialEq,
    {
        let prefix = T::ETCD_PREFIX.context("a table etcd does not share")?;
        let (revision, kvs) = self.writer.range(prefix).await.map_err(|e| {
            let unreached = matches!(e, crate::etcd_writer::EtcdError::Unreachable(_));
            self.said(&e).context(if unreached {
                "etcd is unreachable".to_owned()
            } else {
                format!("cannot read the {} from etcd", T::NAME)
            })
        })?;
        let mut rows = Vec::with_capacity(kvs.len());
        let mut bad = 0;
        for (k, v) in kvs {
            let parsed = parse_key(&k).and_then(|key| {
                serde_json::from_slice::<T::Row>(&v)
                    .ok()
                    .filter(|r| T::key(r) == key)
            });
            match parsed {
                Some(r) => rows.push(r),
                None => bad += 1,
            }
        }
        Ok((revision, rows, bad))
    }

    /// Adds records, all or none (an add is an import of one).
    pub async fn add(&self, records: Vec<LookupRecord>) -> anyhow::Result<Vec<LookupRecord>> {
        let here = self.here().await;
        let records = records
            .into_iter()
            .map(|r| self.place(r, here.as_ref()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let catalog = self.catalog().await?;
        let admitted = admit(Proposal::Add(records), &view(&catalog))?;
        admitted.check_all(&catalog)?;
        let revision = self
            .records()
            .create(&admitted.records)
            .await
            .map_err(|e| self.said(&e))?;
        self.applied_here(here.as_ref(), revision, &record_keys(&admitted.records))
            .await?;
        Ok(admitted.records)
    }

    /// A record's new PA, port and host, in one change (a VM migrated).
    pub async fn move_to(&self, m: &MoveRequest) -> anyhow::Result<LookupRecord> {
        let here = self.here().await;
        let (mut record, at) = self
            .records()
            .current(m.vsid, m.ca)
            .await
            .map_err(|e| self.said(&e))?;
        record.pa = m.pa;
        record.port.clone_from(&m.port);
        record.host.clone_from(&m.host);
        let record = self.place(record, here.as_ref())?;
        let catalog = self.catalog().await?;
        let mut admitted = admit(Proposal::Replace(record), &view(&catalog))?;
        admitted.check_all(&catalog)?;
        let revision = self
            .records()
            .replace(&admitted.records[0], at)
            .await
            .map_err(|e| self.said(&e))?;
        self.applied_here(here.as_ref(), revision, &record_keys(&admitted.records))
            .await?;
        Ok(admitted.records.remove(0))
    }

    /// Takes a record away.
    pub async fn delete(&self, vsid: u32, ca: IpAddr) -> anyhow::Result<LookupRecord> {
        // A VM's IPv4 record stays while its IPv6 record does, as on a host alone.
        self.catalog().await?.check_del(&(vsid, ca))?;
        let here = self.here().await;
        let (record, at) = self
            .records()
            .current(vsid, ca)
            .await
            .map_err(|e| self.said(&e))?;
        let revision = self
            .records()
            .remove(vsid, ca, at)
            .await
            .map_err(|e| self.said(&e))?;
        self.applied_here(here.as_ref(), revision, &[]).await?;
        Ok(record)
    }

    /// The records as the rules between them see them: as a host without their VMs does,
    /// each admitted as the watch admits it (a record every host leaves out is left out).
    async fn catalog(&self) -> anyhow::Result<Catalog> {
        let held = self.held().await?;
        let mut catalog = Catalog::default();
        catalog.reserve(held.records.len());
        for r in held.records {
            let seen = local_view(&r, NO_HOST);
            if admit_watched(&catalog, &seen).is_ok() {
                catalog.insert(seen);
            }
        }
        Ok(catalog)
    }

    /// The cluster status of the agent here, if one runs in cluster mode.
    async fn here(&self) -> Option<ClusterStatus> {
        if !self.agent.present() {
            return None;
        }
        self.agent.status().await.ok()?.cluster
    }

    /// A record's host: the one it names, or (with a port) the host whose agent runs here.
    fn place(&self, r: LookupRecord, here: Option<&ClusterStatus>) -> anyhow::Result<LookupRecord> {
        if r.port.is_some() && r.host.is_none() && here.is_none() {
            anyhow::bail!(
                "--host is needed with --port: nvctl writes to etcd as the operator, and no \
                 agent in cluster mode at {} says which host this is",
                self.agent.socket().display()
            );
        }
        Ok(placed(r, here.map_or(NO_HOST, |c| c.host.as_str()))?)
    }

    /// Every route etcd holds that parses, and how many keys under the routes are none.
    pub async fn held_routes(&self) -> anyhow::Result<(Vec<RouteRecord>, usize)> {
        let (_, held, bad) = self.rows::<Routes>(routes::parse_etcd_key).await?;
        Ok((held, bad))
    }

    /// Adds routes, all or none, admitted against the routes and records etcd holds.
    pub async fn add_routes(&self, new: Vec<RouteRecord>) -> anyhow::Result<usize> {
        let here = self.here().await;
        let mut catalog = self.catalog().await?;
        let (held, _) = self.held_routes().await?;
        *catalog.routes_mut() = RouteIndex::lenient(held);
        let admitted = admit_add(&catalog, new)?;
        let revision = self
            .records()
            .create_routes(&admitted)
            .await
            .map_err(|e| self.said(&e))?;
        let keys: Vec<(String, String)> = admitted
            .iter()
            .map(|r| {
                (
                    routes::etcd_key(&r.key()),
                    format!("route {}", routes::show(r)),
                )
            })
            .collect();
        self.applied_here(here.as_ref(), revision, &keys).await?;
        Ok(admitted.len())
    }

    /// Takes away the routes of `rdid` to `prefix` (through `nexthop` only, if given).
    pub async fn delete_routes(
        &self,
        rdid: &Rdid,
        prefix: Subnet,
        nexthop: Option<IpAddr>,
    ) -> anyhow::Result<Vec<RouteRecord>> {
        let here = self.here().await;
        let (held, _) = self.held_routes().await?;
        let gone = admit_del(&RouteIndex::lenient(held), rdid, prefix, nexthop)?;
        let keys: Vec<RouteKey> = gone.iter().map(RouteRecord::key).collect();
        let revision = self
            .records()
            .remove_routes(&keys)
            .await
            .map_err(|e| self.said(&e))?;
        self.applied_here(here.as_ref(), revision, &[]).await?;
        Ok(gone)
    }

    /// Every ACL rule etcd holds that parses, in id order, and how many keys under the rules
    /// are none.
    pub async fn held_acls(&self) -> anyhow::Result<(AclIndex, usize)> {
        let (_, held, bad) = self.rows::<Acls>(acls::parse_etcd_key).await?;
        Ok((AclIndex::lenient(held), bad))
    }

    /// Adds ACL rules, all or none, numbered after etcd's and checked against its records.
    pub async fn add_acls(&self, new: Vec<AclRule>) -> anyhow::Result<Vec<AclRule>> {
        let here = self.here().await;
        let catalog = self.catalog().await?;
        let (held, _) = self.held_acls().await?;
        let admitted = crate::control::acls::admit_add(
            &held,
            |v, ca| Some(vec![catalog.get(&(v, ca))?.ca]),
            new,
        )?;
        let revision = self
            .records()
            .create_acls(&admitted)
            .await
            .map_err(|e| self.said(&e))?;
        let keys: Vec<(String, String)> = admitted
            .iter()
            .map(|r| (acls::etcd_key(r.id), format!("ACL rule {}", r.id)))
            .collect();
        self.applied_here(here.as_ref(), revision, &keys).await?;
        Ok(admitted)
    }

    /// Takes an ACL rule away, as etcd holds it now.
    pub async fn delete_acl(
        &self,
        name: &crate::control::acls::AclName,
    ) -> anyhow::Result<AclRule> {
        let here = self.here().await;
        let (held, _) = self.held_acls().await?;
        let rule = crate::control::acls::pick(&held, name)?;
        let key = acls::etcd_key(rule.id);
        let at = self
            .writer
            .get(&key)
            .await
            .map_err(|e| self.said(&e))?
            .with_context(|| format!("ACL rule {} went from etcd meanwhile", rule.id))?
            .mod_revision;
        let revision = self
            .records()
            .remove_acl(rule.id, at)
            .await
            .map_err(|e| self.said(&e))?;
        self.applied_here(here.as_ref(), revision, &[]).await?;
        Ok(rule)
    }

    /// Waits until the agent here has applied `revision` (when one runs); a row it left out
    /// (`keys`: each etcd key, and the row as an error names it) is an error that says why.
    async fn applied_here(
        &self,
        here: Option<&ClusterStatus>,
        revision: i64,
        keys: &[(String, String)],
    ) -> anyhow::Result<()> {
        let Some(here) = here else { return Ok(()) };
        let started = std::time::Instant::now();
        let cluster = loop {
            let status = self.agent.status().await?;
            let cluster = status.cluster.context("the agent here left cluster mode")?;
            if cluster.revision >= revision {
                break cluster;
            }
            if started.elapsed() > APPLIED_WAIT {
                eprintln!(
                    "warning: written to etcd at revision {revision}; host {} has not applied \
                     it in {} s (it is at revision {}{})",
                    here.host,
                    APPLIED_WAIT.as_secs(),
                    cluster.revision,
                    cluster
                        .last_error
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for (key, row) in keys {
            let key = format!("{key}: ");
            if let Some(why) = cluster.bad.iter().find_map(|b| b.strip_prefix(&key)) {
                return Err(invalid(format!(
                    "written to etcd at revision {revision}, but host {} leaves {row} out: \
                     {why}",
                    cluster.host
                ))
                .into());
            }
        }
        Ok(())
    }
}

/// Lookup records' etcd keys, with the records as errors name them.
fn record_keys(records: &[LookupRecord]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| {
            (
                etcd_key(r.vsid, r.ca),
                format!("VSID {} CA {}", r.vsid, r.ca),
            )
        })
        .collect()
}

/// What the operator admits against: etcd's records as no host sees them, with room for all
/// (each host's table is its own: a host whose table is full leaves records out and says so).
fn view(catalog: &Catalog) -> View<'_> {
    View {
        catalog,
        host: NO_HOST,
        cluster: true,
        max_lookups: u32::MAX,
    }
}
