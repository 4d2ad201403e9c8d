//! The agent's HTTP API on a unix socket: JSON bodies, versioned paths. `nvctl` is its client.
//!
//! | method | path                 | body / query       |
//! |--------|----------------------|--------------------|
//! | GET    | /v1/providers        |                    |
//! | POST   | /v1/providers        | `{pa, dev?}`       |
//! | DELETE | /v1/providers        | `?pa=ADDR`         |
//! | GET    | /v1/lookups          | `?vsid=N` (optional) |
//! | POST   | /v1/lookups          | a lookup record    |
//! | DELETE | /v1/lookups          | `?vsid=N&ca=ADDR`  |
//! | POST   | /v1/lookups/move     | `{vsid, ca, pa, port?}` |
//! | POST   | /v1/lookups/import   | a JSON list of lookup records, or CSV (`text/csv`); all or none |
//! | GET    | /v1/routes           | `?rdid=ID` (optional) |
//! | POST   | /v1/routes           | a route            |
//! | DELETE | /v1/routes           | `?rdid=ID&prefix=CIDR&nexthop=ADDR` (`nexthop` optional) |
//! | POST   | /v1/routes/import    | a JSON list of routes; all or none |
//! | GET    | /v1/acls             | `?vsid=N` (optional): rules with their meters |
//! | POST   | /v1/acls             | a rule (its `id` is nv's); answers it numbered |
//! | DELETE | /v1/acls             | `?id=N` or `?name=TEXT` |
//! | POST   | /v1/acls/import      | a JSON list of rules; all or none |
//! | GET    | /v1/stats            | `?vsid=N`: that VSID's traffic instead of the counters |
//! | GET    | /v1/status           |                    |
//! | POST   | /v1/trace            | a packet to trace (`nvctl trace`) |
//! | PUT    | /v1/debug            | `{"datapath": true}`: the datapath's debug events on or off |
//! | GET    | /v1/monitor          | `?vsid=&reason=&port=&sample=`: events as JSON lines, until the client leaves |
//!
//! Errors are `{"error": "one line"}` with 400 (invalid), 404, 409 (conflict), 503 (too many
//! imports waiting) or 500.
use std::{net::IpAddr, sync::Arc};

use axum::{
    Extension, Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Query, Request, State, rejection::JsonRejection},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::limit::ConcurrencyLimitLayer;

use self::types::{CounterValue, Debug, ErrorAnswer, Imported, MoveRequest, VsidTraffic};
use crate::{
    control,
    error::NvError,
    import::{self, Format},
    model::{LookupRecord, Provider, Rdid, RouteRecord, Subnet},
};

/// Request bodies are small records; anything bigger is refused before parsing.
const MAX_BODY: usize = 64 * 1024;
/// An import carries a table: a million records are about 150 MB of JSON.
const MAX_IMPORT_BODY: usize = 512 * 1024 * 1024;
/// A routes import: 100,000 routes are about 10 MB of JSON (an ACL rules import too).
const MAX_ROUTES_BODY: usize = 16 * 1024 * 1024;
/// Imports read, parsed and applied at once: each may hold a table's worth of memory, so more
/// wait their turn (unread) instead of exhausting the host.
const IMPORTS_AT_ONCE: usize = 1;
/// Imports that may wait for their turn; more are refused at once (503), so that waiting
/// imports never hold every connection the agent serves.
const IMPORTS_WAITING: usize = 4;
/// Requests other than imports served at once; the rest wait for a slot before their bodies
/// are read. Imports do not count: a queue of them never keeps `nvctl status` waiting for
/// more than the import that is running.
const REQUESTS_AT_ONCE: usize = 32;

pub mod types;
mod watch;

pub use crate::shared::Shared;

pub struct ApiError(StatusCode, String);

impl From<NvError> for ApiError {
    fn from(e: NvError) -> Self {
        let status = match e {
            NvError::Invalid(_) => StatusCode::BAD_REQUEST,
            NvError::NotFound(_) => StatusCode::NOT_FOUND,
            NvError::Conflict(_) => StatusCode::CONFLICT,
            NvError::Cluster { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, crate::error::one_line(&e))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::error!(status = self.0.as_u16(), "request failed: {}", self.1);
        } else {
            tracing::warn!(status = self.0.as_u16(), "request refused: {}", self.1);
        }
        (self.0, Json(ErrorAnswer { error: self.1 })).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderQuery {
    pa: IpAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupQuery {
    vsid: u32,
    ca: IpAddr,
}

/// An import's turn: held from before its body is read until its change has run to the end
/// (the change keeps it when the client hangs up), so parsed tables never pile up in memory.
#[derive(Clone)]
struct ImportTurn(#[expect(dead_code, reason = "held, never read")] Arc<[OwnedSemaphorePermit; 2]>);

struct ImportGate {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

async fn admit_import(
    State(gate): State<Arc<ImportGate>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Ok(admitted) = gate.admitted.clone().try_acquire_owned() else {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "an import is running and {IMPORTS_WAITING} more are waiting; retry when one is done"
            ),
        )
        .into_response();
    };
    let Ok(running) = gate.running.clone().acquire_owned().await else {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".into(),
        )
        .into_response();
    };
    req.extensions_mut()
        .insert(ImportTurn(Arc::new([admitted, running])));
    next.run(req).await
}

pub fn router(agent: Shared, metrics: crate::metrics::ApiMetrics) -> Router {
    let gate = Arc::new(ImportGate {
        admitted: Arc::new(Semaphore::new(IMPORTS_AT_ONCE + IMPORTS_WAITING)),
        running: Arc::new(Semaphore::new(IMPORTS_AT_ONCE)),
    });
    Router::new()
        .route(
            "/v1/providers",
            get(list_providers).post(add_provider).delete(del_provider),
        )
        .route(
            "/v1/lookups",
            get(list_lookups).post(add_lookup).delete(del_lookup),
        )
        .route("/v1/lookups/move", post(move_lookup))
        .route(
            "/v1/routes",
            get(list_routes).post(add_route).delete(del_routes),
        )
        .route("/v1/acls", get(list_acls).post(add_acl).delete(del_acl))
        .route("/v1/stats", get(stats))
        .route("/v1/trace", post(trace))
        .route("/v1/debug", axum::routing::put(debug))
        .route("/v1/status", get(status))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(ConcurrencyLimitLayer::new(REQUESTS_AT_ONCE))
        // Added after the layers above, so outside them: monitors stay connected, and
        // imports have their own limits.
        .route(
            "/v1/monitor",
            get(watch::monitor).layer(ConcurrencyLimitLayer::new(watch::WATCHERS_AT_ONCE)),
        )
        .route(
            "/v1/acls/import",
            post(import_acls)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(MAX_ROUTES_BODY))
                .layer(ConcurrencyLimitLayer::new(IMPORTS_AT_ONCE)),
        )
        .route(
            "/v1/routes/import",
            post(import_routes)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(MAX_ROUTES_BODY))
                .layer(ConcurrencyLimitLayer::new(IMPORTS_AT_ONCE)),
        )
        .route(
            "/v1/lookups/import",
            post(import_lookups)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(MAX_IMPORT_BODY))
                .layer(middleware::from_fn_with_state(gate, admit_import)),
        )
        .with_state(agent)
        .layer(middleware::from_fn_with_state(
            metrics,
            crate::metrics::count_requests,
        ))
}

/// Runs a change on a task of its own, to the end: a client that hangs up mid-request drops
/// the handler's future, which would otherwise stop the change between store, catalog and
/// maps. Its result is simply not delivered then.
async fn whole<T: Send + 'static>(
    change: impl Future<Output = crate::error::Result<T>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(change).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the change failed: {e}"),
        )),
    }
}

/// What the agent published at its last change: never waits for one that runs.
async fn status(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.published().status)
}

async fn list_providers(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.lock().await.providers())
}

async fn add_provider(
    State(a): State<Shared>,
    body: Result<Json<Provider>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(p) = body?;
    let added = whole(async move { a.lock().await.add_provider(p).await }).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn del_provider(
    State(a): State<Shared>,
    q: Result<Query<ProviderQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(
        whole(async move { a.lock().await.del_provider(q.pa).await }).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    vsid: Option<u32>,
}

/// Every record, in (VSID, CA) order; `?vsid=N`: that VSID's only.
async fn list_lookups(
    State(a): State<Shared>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(control::list(&a, q.vsid).await?))
}

async fn add_lookup(
    State(a): State<Shared>,
    body: Result<Json<LookupRecord>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(r) = body?;
    let added = whole(async move { control::add(&a, vec![r]).await?.record() }).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn del_lookup(
    State(a): State<Shared>,
    q: Result<Query<LookupQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(
        whole(async move { control::delete(&a, q.vsid, q.ca).await }).await?,
    ))
}

async fn move_lookup(
    State(a): State<Shared>,
    body: Result<Json<MoveRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(m) = body?;
    Ok(Json(
        whole(async move { control::move_to(&a, m).await }).await?,
    ))
}

/// An import: a JSON list of records, or CSV (`content-type: text/csv`) with a header line of
/// the field names, parsed here (on a thread of its own: a million records take a while) and
/// applied all or none.
async fn import_lookups(
    State(a): State<Shared>,
    Extension(turn): Extension<ImportTurn>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let format = match headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(t) if t.starts_with("text/csv") => Format::Csv,
        _ => Format::Json,
    };
    let records = tokio::task::spawn_blocking(move || import::parse(&body, format))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let imported = whole(async move {
        let _turn = turn;
        control::add(&a, records).await.map(|r| r.count)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(Imported { imported })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesQuery {
    rdid: Option<Rdid>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteQuery {
    rdid: Rdid,
    prefix: Subnet,
    nexthop: Option<std::net::IpAddr>,
}

/// Every route in (domain, prefix, next hop) order; `?rdid=ID`: that domain's only.
async fn list_routes(
    State(a): State<Shared>,
    q: Result<Query<RoutesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(control::routes::list(&a, q.rdid.as_ref()).await))
}

async fn add_route(
    State(a): State<Shared>,
    body: Result<Json<RouteRecord>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(r) = body?;
    let added = r.clone();
    whole(async move { control::routes::add(&a, vec![r]).await }).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn del_routes(
    State(a): State<Shared>,
    q: Result<Query<RouteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(
        whole(async move { control::routes::delete(&a, &q.rdid, q.prefix, q.nexthop).await })
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclsQuery {
    vsid: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclQuery {
    id: Option<u32>,
    name: Option<String>,
}

/// In cluster mode ACL rules are etcd's, written by the operator.
fn acls_alone(a: &Shared) -> ApiResult<()> {
    if a.cluster().is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "in cluster mode ACL rules live in etcd and are written by the operator: run nvctl \
             with --etcd-endpoints and the operator's certificate (--etcd-ca-file, \
             --etcd-cert-file, --etcd-key-file)"
                .into(),
        ));
    }
    Ok(())
}

/// Every rule in id order with its meters; `?vsid=N`: that VSID's only.
async fn list_acls(
    State(a): State<Shared>,
    q: Result<Query<AclsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(a.lock().await.acls(q.vsid)))
}

async fn add_acl(
    State(a): State<Shared>,
    body: Result<Json<crate::model::acl::AclRule>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(r) = body?;
    acls_alone(&a)?;
    let mut added = whole(async move { a.lock().await.add_acls(vec![r]).await }).await?;
    Ok((StatusCode::CREATED, Json(added.remove(0))))
}

async fn del_acl(
    State(a): State<Shared>,
    q: Result<Query<AclQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    acls_alone(&a)?;
    let name = match (q.id, q.name) {
        (Some(id), None) => crate::control::acls::AclName::Id(id),
        (None, Some(n)) => crate::control::acls::AclName::Name(n),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "name the rule by id or by name (one of them)".into(),
            ));
        }
    };
    Ok(Json(
        whole(async move { a.lock().await.remove_acl(name).await }).await?,
    ))
}

/// A JSON list of rules, numbered and applied all or none.
async fn import_acls(
    State(a): State<Shared>,
    body: Result<Json<Vec<crate::model::acl::AclRule>>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(rules) = body?;
    acls_alone(&a)?;
    let imported = whole(async move { a.lock().await.add_acls(rules).await })
        .await?
        .len();
    Ok((StatusCode::CREATED, Json(Imported { imported })))
}

/// A JSON list of routes, applied all or none.
async fn import_routes(
    State(a): State<Shared>,
    body: Result<Json<Vec<RouteRecord>>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(routes) = body?;
    let imported = whole(async move { control::routes::add(&a, routes).await }).await?;
    Ok((StatusCode::CREATED, Json(Imported { imported })))
}

async fn debug(
    State(a): State<Shared>,
    body: Result<Json<Debug>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(d) = body?;
    let on = whole(async move { a.lock().await.set_debug(d.datapath) }).await?;
    Ok(Json(Debug { datapath: on }))
}

/// Runs one packet through a tracing copy of the programs (`nvctl trace`).
async fn trace(
    State(a): State<Shared>,
    body: Result<Json<crate::trace::Request>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) = body?;
    Ok(Json(a.lock().await.trace(&req)?))
}

/// The datapath's counters; with `?vsid=N`, that VSID's traffic by direction and method.
async fn stats(
    State(a): State<Shared>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    let reader = a.counters();
    if let Some(vsid) = q.vsid {
        crate::model::validate_vsid(vsid)?;
        let traffic: Vec<VsidTraffic> = reader
            .vsid_stats(Some(vsid))?
            .into_iter()
            .map(|(k, s)| VsidTraffic {
                vsid: k.vsid,
                direction: crate::metrics::direction_name(k.dir).into(),
                method: crate::metrics::method_name(k.method).into(),
                packets: s.packets,
                bytes: s.bytes,
            })
            .collect();
        return Ok(Json(traffic).into_response());
    }
    let counters = reader.counters()?;
    Ok(Json(
        counters
            .into_iter()
            .map(|(c, packets)| CounterValue {
                counter: c.name().to_owned(),
                packets,
            })
            .collect::<Vec<_>>(),
    )
    .into_response())
}
