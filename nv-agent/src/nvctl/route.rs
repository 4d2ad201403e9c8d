//! `nvctl route`: customer routes, through this host's agent.
use super::{
    args::{Output, RouteCmd},
    client::Client,
    render,
};
use crate::{
    api::types::{Imported, RouteRecord},
    import,
    tables::{Table as _, routes::Routes},
};

const IMPORTED: render::Columns = &[("IMPORTED", "imported")];

pub async fn execute(agent: &Client, cmd: &RouteCmd, output: Output) -> anyhow::Result<()> {
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
            let added = agent.add_route(&route).await?;
            render::one(output, &shown(output, added), columns)
        }
        RouteCmd::Del {
            rdid,
            prefix,
            nexthop,
        } => {
            let deleted = agent.delete_routes(rdid, *prefix, *nexthop).await?;
            render::rows(output, &deleted, columns)
        }
        RouteCmd::List { rdid } => {
            let routes = agent.routes(rdid.as_ref()).await?;
            let routes: Vec<RouteRecord> = routes.into_iter().map(|r| shown(output, r)).collect();
            render::rows(output, &routes, columns)
        }
        RouteCmd::Export { rdid } => {
            let routes = agent.routes(rdid.as_ref()).await?;
            import::write_json(&routes, &mut std::io::stdout().lock())
        }
        RouteCmd::Import { file } => {
            let (text, _) = import::load(file)?;
            let routes: Vec<RouteRecord> = serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a JSON list of routes: {e}", file.display())
            })?;
            let imported: Imported = agent
                .import_routes(&routes)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            render::one(output, &imported, IMPORTED)
        }
    }
}

/// A route as a table shows it: an on-link route with the gateway it has (given or not).
fn shown(output: Output, mut r: RouteRecord) -> RouteRecord {
    if output == Output::Table {
        r.gateway = r.gateway_addr();
    }
    r
}
