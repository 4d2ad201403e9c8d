//! Customer routes changed through the API on a host of its own: checked against the other
//! routes and the records, then applied and stored, all or none.
use std::{collections::HashMap, net::Ipv4Addr};

use tracing::info;

use super::Agent;
use crate::{
    error::{NvError, Result, invalid},
    model::{Rdid, RouteRecord, Subnet},
    tables::{Change, routes::show},
};

impl Agent {
    /// Adds routes (an add is an import of one), subnets first, so that a file's order does
    /// not matter (an export lists a default route before the subnet of its next hop): each
    /// checked with the ones before it applied; all or none. A route whose key exists is
    /// refused.
    #[tracing::instrument(skip_all, fields(routes = routes.len()))]
    pub async fn add_routes(&mut self, routes: Vec<RouteRecord>) -> Result<usize> {
        let n = routes.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| !routes[i].on_link());
        let changes: Vec<Change> = order
            .iter()
            .map(|&i| Change::PutRoute {
                route: routes[i].clone(),
            })
            .collect();
        let mut at = order.iter();
        self.apply(&changes, &HashMap::new(), |c, change| {
            let i = at.next().copied().unwrap_or_default();
            let Change::PutRoute { route } = change else {
                return Ok(());
            };
            let checked = match c.routes().get(&route.key()) {
                Some(existing) => Err(NvError::Conflict(format!(
                    "route {} already exists; delete it first",
                    show(existing)
                ))),
                None => c.check_route(route),
            };
            checked.map_err(|e| numbered(n, i + 1, route, e))
        })
        .await?;
        if let [Change::PutRoute { route }] = changes.as_slice() {
            info!("added route {}", show(route));
        } else {
            info!(routes = n, "imported {n} routes");
        }
        Ok(n)
    }

    /// Takes away the routes of `rdid` to `prefix` (through `nexthop` only, if given).
    #[tracing::instrument(skip(self))]
    pub async fn remove_routes(
        &mut self,
        rdid: &Rdid,
        prefix: Subnet,
        nexthop: Option<Ipv4Addr>,
    ) -> Result<Vec<RouteRecord>> {
        let removed = self.tables.catalog.routes().matching(rdid, prefix, nexthop);
        if removed.is_empty() {
            return Err(NvError::NotFound(match nexthop {
                Some(n) => format!("no route of {rdid} to {prefix} via {n}"),
                None => format!("no route of {rdid} to {prefix}"),
            }));
        }
        let changes: Vec<Change> = removed.iter().map(|r| Change::del_route(r.key())).collect();
        self.apply(&changes, &HashMap::new(), |c, change| match change {
            Change::DelRoute {
                rdid,
                prefix,
                nexthop,
            } => c.routes().check_del(&(rdid.clone(), *prefix, *nexthop)),
            _ => Ok(()),
        })
        .await?;
        for r in &removed {
            info!("deleted route {}", show(r));
        }
        Ok(removed)
    }

    /// The routes in (domain, prefix, next hop) order, of one domain or all.
    pub fn routes(&self, rdid: Option<&Rdid>) -> Vec<RouteRecord> {
        self.tables.catalog.routes().list(rdid)
    }
}

/// An error about the `i`th (from 1) of several routes says which.
fn numbered(n: usize, i: usize, r: &RouteRecord, e: NvError) -> NvError {
    if n > 1 {
        invalid(format!("route {i} ({}): {e}", show(r)))
    } else {
        e
    }
}
