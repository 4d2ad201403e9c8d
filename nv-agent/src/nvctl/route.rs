//! `nvctl route`: customer routes, through this host's agent.
use super::{
    args::{EtcdArgs, Output, RouteCmd},
    client::Client,
    operator::Operator,
    render,
};
use crate::{
    api::types::{Imported, RouteRecord},
    import,
    tables::{Table as _, routes::Routes},
};

const IMPORTED: render::Columns = &[("IMPORTED", "imported")];

pub async fn execute(
    agent: &Client,
    etcd: &EtcdArgs,
    cmd: &RouteCmd,
    output: Output,
) -> anyhow::Result<()> {
    let operator = Operator::from_args(etcd, agent)?;
    let columns = Routes::COLUMNS;
    match cmd {
        RouteCmd::Add {
            rdid,
            vsid,
            prefix,
            nexthop,
            metric,
            gateway,
        } => {
            let route = RouteRecord {
                rdid: rdid.clone(),
                vsid: *vsid,
                prefix: *prefix,
                nexthop: *nexthop,
                metric: *metric,
                gateway: *gateway,
            };
            let added = match &operator {
                Some(op) => {
                    op.add_routes(vec![route.clone()]).await?;
                    route
                }
                None => agent.add_route(&route).await?,
            };
            render::one(output, &shown(output, added), columns)
        }
        RouteCmd::Del {
            rdid,
            prefix,
            nexthop,
        } => {
            let deleted = match &operator {
                Some(op) => op.delete_routes(rdid, *prefix, *nexthop).await?,
                None => agent.delete_routes(rdid, *prefix, *nexthop).await?,
            };
            render::rows(output, &deleted, columns)
        }
        RouteCmd::List { rdid } => {
            let routes = list(agent, operator.as_ref(), rdid.as_ref()).await?;
            let routes: Vec<RouteRecord> = routes.into_iter().map(|r| shown(output, r)).collect();
            render::rows(output, &routes, columns)
        }
        RouteCmd::Export { rdid } => {
            let routes = list(agent, operator.as_ref(), rdid.as_ref()).await?;
            import::write_json(&routes, &mut std::io::stdout().lock())
        }
        RouteCmd::Import { file } => {
            let (text, _) = import::load(file)?;
            let routes: Vec<RouteRecord> = serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a JSON list of routes: {e}", file.display())
            })?;
            let imported = match &operator {
                Some(op) => op
                    .add_routes(routes)
                    .await
                    .map(|imported| Imported { imported }),
                None => agent.import_routes(&routes).await,
            }
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            render::one(output, &imported, IMPORTED)
        }
    }
}

/// The routes of one domain or all, in (domain, prefix, next hop) order: as etcd holds them
/// (the operator), or as this host's agent applied them.
async fn list(
    agent: &Client,
    operator: Option<&Operator<'_>>,
    rdid: Option<&crate::model::Rdid>,
) -> anyhow::Result<Vec<RouteRecord>> {
    let Some(op) = operator else {
        return agent.routes(rdid).await;
    };
    let (held, bad) = op.held_routes().await?;
    if bad > 0 {
        eprintln!(
            "warning: {bad} key(s) under etcd's routes are no route (every host leaves them out)"
        );
    }
    let mut routes: Vec<RouteRecord> = held
        .into_iter()
        .filter(|r| rdid.is_none_or(|d| &r.rdid == d))
        .collect();
    routes.sort_by_key(RouteRecord::key);
    Ok(routes)
}

/// A route as a table shows it: an on-link route with the gateway it has (given or not).
fn shown(output: Output, mut r: RouteRecord) -> RouteRecord {
    if output == Output::Table {
        r.gateway = r.gateway_addr();
    }
    r
}
