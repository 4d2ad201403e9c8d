//! The command path of customer routes, for a host alone and for many. A change is admitted
//! against the other routes and the records ([`admit_add`], [`admit_del`]), then recorded:
//! alone, in this host's store through the transaction path; in cluster mode, in etcd, whence
//! every host's watch brings it back to the same path.
use std::net::IpAddr;

use crate::{
    catalog::{Catalog, describe},
    error::{NvError, Result, invalid},
    model::{Rdid, RouteKey, RouteRecord, Subnet},
    shared::Shared,
    tables::routes::{self, RouteIndex},
};

/// Checks new routes against `catalog`'s routes and records, subnets first, each with the
/// ones before it: the rules `Tables::apply` keeps, checked before a write to etcd.
pub fn admit_add(catalog: &Catalog, new: Vec<RouteRecord>) -> Result<Vec<RouteRecord>> {
    let n = new.len();
    // Numbered as given (errors name the route of the file), checked subnets first.
    let mut numbered: Vec<(usize, RouteRecord)> = new.into_iter().enumerate().collect();
    numbered.sort_by_key(|(_, r)| !r.on_link());
    let mut scratch: RouteIndex = catalog.routes().clone();
    let record_at = |vsid: u32, ca: IpAddr| catalog.get(&(vsid, ca)).map(|r| describe(&r));
    for (i, r) in &numbered {
        let checked = match scratch.get(&r.key()) {
            Some(existing) => Err(NvError::Conflict(format!(
                "route {} already exists; delete it first",
                routes::show(existing)
            ))),
            None => scratch.put_checked(r, &record_at),
        };
        checked.map_err(|e| {
            if n > 1 {
                invalid(format!("route {} ({}): {e}", i + 1, routes::show(r)))
            } else {
                e
            }
        })?;
    }
    Ok(numbered.into_iter().map(|(_, r)| r).collect())
}

/// The routes of `rdid` to `prefix` (through `nexthop` only, if given) in `index`, checked
/// for deletion.
pub fn admit_del(
    index: &RouteIndex,
    rdid: &Rdid,
    prefix: Subnet,
    nexthop: Option<IpAddr>,
) -> Result<Vec<RouteRecord>> {
    let gone = index.matching(rdid, prefix, nexthop);
    if gone.is_empty() {
        return Err(NvError::NotFound(match nexthop {
            Some(n) => format!("no route of {rdid} to {prefix} via {n}"),
            None => format!("no route of {rdid} to {prefix}"),
        }));
    }
    let mut scratch = index.clone();
    for r in &gone {
        scratch.check_del(&r.key())?;
        scratch.remove(&r.key());
    }
    Ok(gone)
}

/// Adds routes (an add is an import of one), all or none.
pub async fn add(shared: &Shared, routes: Vec<RouteRecord>) -> Result<usize> {
    match shared.cluster() {
        None => shared.lock().await.add_routes(routes).await,
        Some(cluster) => {
            let admitted = admit_add(shared.lock().await.catalog(), routes)?;
            let revision = cluster.records().create_routes(&admitted).await?;
            cluster.wait_applied(revision).await;
            Ok(admitted.len())
        }
    }
}

/// Takes away the routes of `rdid` to `prefix` (through `nexthop` only, if given).
pub async fn delete(
    shared: &Shared,
    rdid: &Rdid,
    prefix: Subnet,
    nexthop: Option<IpAddr>,
) -> Result<Vec<RouteRecord>> {
    match shared.cluster() {
        None => {
            shared
                .lock()
                .await
                .remove_routes(rdid, prefix, nexthop)
                .await
        }
        Some(cluster) => {
            let gone = admit_del(
                shared.lock().await.catalog().routes(),
                rdid,
                prefix,
                nexthop,
            )?;
            let keys: Vec<RouteKey> = gone.iter().map(RouteRecord::key).collect();
            let revision = cluster.records().remove_routes(&keys).await?;
            cluster.wait_applied(revision).await;
            Ok(gone)
        }
    }
}

/// The routes in (domain, prefix, next hop) order, of one domain or all: alone, this host's;
/// in cluster mode, etcd's as applied here.
pub async fn list(shared: &Shared, rdid: Option<&Rdid>) -> Vec<RouteRecord> {
    shared.lock().await.routes(rdid)
}
