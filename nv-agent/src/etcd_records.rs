//! Lookup records in etcd, as a writer changes them: read one with its revision, create new
//! ones, replace or remove one at the revision read, each a compare-and-write through the
//! etcd writer (a change made meanwhile by someone else is refused, never lost). The agent's
//! API uses it with the host's identity, nvctl with the operator's.
use std::net::IpAddr;

use crate::{
    error::{EtcdSource, NvError, Result, invalid},
    etcd_writer::{EtcdError, EtcdWriter, Expect, KeyWrite},
    model::{LookupRecord, RouteKey, RouteRecord},
    tables::{lookups::etcd_key, routes},
};

/// How a writer's refusals read, and what the writer's host does meanwhile.
pub struct EtcdRecords<'a> {
    pub writer: &'a EtcdWriter,
    /// What forwarding does while etcd is away, said when it is (an agent's view; none for
    /// nvctl).
    pub meanwhile: Option<String>,
}

impl EtcdRecords<'_> {
    /// The record etcd holds for (`vsid`, `ca`), and the revision it was last changed at.
    pub async fn current(&self, vsid: u32, ca: IpAddr) -> Result<(LookupRecord, i64)> {
        let key = etcd_key(vsid, ca);
        let held = self
            .writer
            .get(&key)
            .await
            .map_err(|e| self.refused(e, &key))?
            .ok_or_else(|| {
                NvError::NotFound(format!("no lookup record for VSID {vsid} CA {ca}"))
            })?;
        let record: LookupRecord = serde_json::from_slice(&held.value)
            .map_err(|e| invalid(format!("{key} in etcd does not parse: {e}")))?;
        Ok((record, held.mod_revision))
    }

    /// New records, every key absent, all in one transaction or none. The revision etcd
    /// holds them at.
    pub async fn create(&self, records: &[LookupRecord]) -> Result<i64> {
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
        let what = match records {
            [r] => format!("VSID {} CA {}", r.vsid, r.ca),
            _ => "a record of the import".to_owned(),
        };
        self.write(&writes, &what).await
    }

    /// `record` in place of its key's, unchanged since `revision`.
    pub async fn replace(&self, record: &LookupRecord, revision: i64) -> Result<i64> {
        let write = KeyWrite {
            key: etcd_key(record.vsid, record.ca),
            expect: Expect::At(revision),
            value: Some(json(record)?),
        };
        self.write(&[write], &format!("VSID {} CA {}", record.vsid, record.ca))
            .await
    }

    /// The record of (`vsid`, `ca`) removed, unchanged since `revision`.
    pub async fn remove(&self, vsid: u32, ca: IpAddr, revision: i64) -> Result<i64> {
        let write = KeyWrite {
            key: etcd_key(vsid, ca),
            expect: Expect::At(revision),
            value: None,
        };
        self.write(&[write], &format!("VSID {vsid} CA {ca}")).await
    }

    /// New routes, every key absent, all in one transaction or none.
    pub async fn create_routes(&self, routes: &[RouteRecord]) -> Result<i64> {
        let writes = routes
            .iter()
            .map(|r| {
                Ok(KeyWrite {
                    key: routes::etcd_key(&r.key()),
                    expect: Expect::Absent,
                    value: Some(
                        serde_json::to_vec(r)
                            .map_err(|e| invalid(format!("cannot encode the route: {e}")))?,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let what = match routes {
            [r] => format!("route {}", routes::show(r)),
            _ => "a route of the import".to_owned(),
        };
        self.write(&writes, &what).await
    }

    /// The routes of `keys` removed, each as etcd holds it now, in one transaction.
    pub async fn remove_routes(&self, keys: &[RouteKey]) -> Result<i64> {
        let mut writes = Vec::with_capacity(keys.len());
        for key in keys {
            let k = routes::etcd_key(key);
            let held = self
                .writer
                .get(&k)
                .await
                .map_err(|e| self.refused(e, &k))?
                .ok_or_else(|| NvError::NotFound(format!("no route {}", routes::show_key(key))))?;
            writes.push(KeyWrite {
                key: k,
                expect: Expect::At(held.mod_revision),
                value: None,
            });
        }
        self.write(&writes, "a route").await
    }

    /// New ACL rules under their ids, every key absent (another writer who took an id
    /// meanwhile makes it a conflict), all in one transaction or none.
    pub async fn create_acls(&self, rules: &[crate::model::acl::AclRule]) -> Result<i64> {
        let writes = rules
            .iter()
            .map(|r| {
                Ok(KeyWrite {
                    key: crate::tables::acls::etcd_key(r.id),
                    expect: Expect::Absent,
                    value: Some(
                        serde_json::to_vec(r)
                            .map_err(|e| invalid(format!("cannot encode the rule: {e}")))?,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(&writes, "an ACL rule").await
    }

    /// The ACL rule `id` removed, unchanged since `revision`.
    pub async fn remove_acl(&self, id: u32, revision: i64) -> Result<i64> {
        let write = KeyWrite {
            key: crate::tables::acls::etcd_key(id),
            expect: Expect::At(revision),
            value: None,
        };
        self.write(&[write], &format!("ACL rule {id}")).await
    }

    async fn write(&self, writes: &[KeyWrite], what: &str) -> Result<i64> {
        self.writer.write(writes).await.map_err(|e| match e {
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
            e => self.refused(e, what),
        })
    }

    /// A request etcd did not carry out, in words: unreachable (and what forwarding does
    /// meanwhile), or refused to this identity (and who may write).
    fn refused(&self, e: EtcdError, what: &str) -> NvError {
        let said = match &e {
            EtcdError::Unreachable(_) => format!(
                "etcd is unreachable{}",
                self.meanwhile
                    .as_deref()
                    .map(|m| format!("; {m}"))
                    .unwrap_or_default()
            ),
            EtcdError::Refused(why) if why.contains("permission denied") => {
                // The words say it all: etcd's own add nothing but "permission denied".
                return NvError::cluster(if self.meanwhile.is_some() {
                    format!(
                        "etcd refused {what} to this host's identity: records are written by \
                         the operator's; run nvctl with --etcd-endpoints and the operator's \
                         certificate (--etcd-ca-file, --etcd-cert-file, --etcd-key-file, or \
                         NV_ETCD_ENDPOINTS, NV_ETCD_CA_FILE, NV_ETCD_CERT_FILE, NV_ETCD_KEY_FILE)"
                    )
                } else {
                    format!(
                        "etcd refused {what} to the identity of --etcd-cert-file: records are \
                         written by the operator's (CN nv-admin in the README's layout)"
                    )
                });
            }
            _ => format!("{what} was not changed"),
        };
        NvError::cluster_by(said, EtcdSource::Write(e))
    }
}

fn json(r: &LookupRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| invalid(format!("cannot encode the record: {e}")))
}
