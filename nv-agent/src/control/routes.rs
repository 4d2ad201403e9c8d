//! The command path of customer routes. On a host alone they are checked against the other
//! routes and the records, then applied and stored through the transaction path. Cluster
//! mode does not distribute them through etcd yet, so it refuses them rather than keep them
//! on one host of many.
use std::net::Ipv4Addr;

use crate::{
    error::{Result, invalid},
    model::{Rdid, RouteRecord, Subnet},
    shared::Shared,
};

fn alone(shared: &Shared) -> Result<()> {
    match shared.cluster() {
        None => Ok(()),
        Some(_) => Err(invalid(
            "customer routes are not distributed through etcd yet: in cluster mode nv keeps \
             lookup records only (routes work on a host whose agent runs without \
             etcd_endpoints)",
        )),
    }
}

/// Adds routes (an add is an import of one), all or none.
pub async fn add(shared: &Shared, routes: Vec<RouteRecord>) -> Result<usize> {
    alone(shared)?;
    shared.lock().await.add_routes(routes).await
}

/// Takes away the routes of `rdid` to `prefix` (through `nexthop` only, if given).
pub async fn delete(
    shared: &Shared,
    rdid: &Rdid,
    prefix: Subnet,
    nexthop: Option<Ipv4Addr>,
) -> Result<Vec<RouteRecord>> {
    alone(shared)?;
    shared
        .lock()
        .await
        .remove_routes(rdid, prefix, nexthop)
        .await
}

/// The routes in (domain, prefix, next hop) order, of one domain or all.
pub async fn list(shared: &Shared, rdid: Option<&Rdid>) -> Vec<RouteRecord> {
    shared.lock().await.routes(rdid)
}
