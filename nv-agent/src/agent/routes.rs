//! Customer routes changed through the API on a host of its own: admitted against the other
//! routes and the records ([`crate::control::routes`]), then applied and stored, all or none.
use std::{collections::HashMap, net::IpAddr};

use tracing::info;

use super::Agent;
use crate::{
    control::routes::{admit_add, admit_del},
    error::Result,
    model::{Rdid, RouteRecord, Subnet},
    tables::{Change, routes::show},
};

impl Agent {
    /// Adds routes (an add is an import of one), subnets first, so that a file's order does
    /// not matter (an export lists a default route before the subnet of its next hop); all or
    /// none.
    #[tracing::instrument(skip_all, fields(routes = routes.len()))]
    pub async fn add_routes(&mut self, routes: Vec<RouteRecord>) -> Result<usize> {
        let admitted = admit_add(&self.tables.catalog, routes)?;
        let n = admitted.len();
        let changes: Vec<Change> = admitted
            .into_iter()
            .map(|route| Change::PutRoute { route })
            .collect();
        self.apply(&changes, &HashMap::new(), |c, change| match change {
            Change::PutRoute { route } => c.check_route(route),
            _ => Ok(()),
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
        nexthop: Option<IpAddr>,
    ) -> Result<Vec<RouteRecord>> {
        let removed = admit_del(self.tables.catalog.routes(), rdid, prefix, nexthop)?;
        let changes: Vec<Change> = removed.iter().map(|r| Change::del_route(r.key())).collect();
        self.apply(&changes, &HashMap::new(), |_, _| Ok(())).await?;
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
