//! The agent's HTTP API on a unix socket: JSON bodies, versioned paths. `nvctl` is its client.
//!
//! | method | path                 | body / query       |
//! |--------|----------------------|--------------------|
//! | GET    | /v1/providers        |                    |
//! | POST   | /v1/providers        | `{pa, dev?}`       |
//! | DELETE | /v1/providers        | `?pa=ADDR`         |
//! | GET    | /v1/lookups          |                    |
//! | POST   | /v1/lookups          | a lookup record    |
//! | DELETE | /v1/lookups          | `?vsid=N&ca=ADDR`  |
//! | POST   | /v1/lookups/move     | `{vsid, ca, pa, port?}` |
//! | POST   | /v1/lookups/import   | a list of lookup records, all or none |
//! | GET    | /v1/stats            |                    |
//!
//! Errors are `{"error": "one line"}` with 400 (invalid), 404, 409 (conflict) or 500.
use std::{net::IpAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Query, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;
use tower::limit::ConcurrencyLimitLayer;

use crate::{
    agent::{Agent, MoveRequest},
    error::NvError,
    model::{LookupRecord, Provider},
};

/// Request bodies are small records; anything bigger is refused before parsing.
const MAX_BODY: usize = 64 * 1024;
/// An import carries a table: a million records are about 150 MB of JSON.
const MAX_IMPORT_BODY: usize = 512 * 1024 * 1024;
/// Imports read and parsed at once: each may hold a table's worth of memory, so more wait
/// their turn (unread) instead of exhausting the host.
const IMPORTS_AT_ONCE: usize = 1;
/// Requests served at once; the rest wait for a slot before their bodies are read.
const REQUESTS_AT_ONCE: usize = 32;

pub type Shared = Arc<Mutex<Agent>>;

pub struct ApiError(StatusCode, String);

impl From<NvError> for ApiError {
    fn from(e: NvError) -> Self {
        let status = match e {
            NvError::Invalid(_) => StatusCode::BAD_REQUEST,
            NvError::NotFound(_) => StatusCode::NOT_FOUND,
            NvError::Conflict(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

#[derive(Serialize, Deserialize)]
pub struct CounterValue {
    pub counter: String,
    pub packets: u64,
}

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

pub fn router(agent: Shared) -> Router {
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
            "/v1/lookups/import",
            post(import_lookups)
                .layer::<_, std::convert::Infallible>(DefaultBodyLimit::max(MAX_IMPORT_BODY))
                .layer::<_, std::convert::Infallible>(ConcurrencyLimitLayer::new(IMPORTS_AT_ONCE)),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/status", get(status))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(ConcurrencyLimitLayer::new(REQUESTS_AT_ONCE))
        .with_state(agent)
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

async fn status(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.lock().await.status())
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

async fn list_lookups(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.lock().await.lookups())
}

async fn add_lookup(
    State(a): State<Shared>,
    body: Result<Json<LookupRecord>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(r) = body?;
    let added = whole(async move { a.lock().await.add_lookup(r).await }).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn del_lookup(
    State(a): State<Shared>,
    q: Result<Query<LookupQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(
        whole(async move { a.lock().await.del_lookup(q.vsid, q.ca).await }).await?,
    ))
}

async fn move_lookup(
    State(a): State<Shared>,
    body: Result<Json<MoveRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(m) = body?;
    Ok(Json(
        whole(async move { a.lock().await.move_lookup(m).await }).await?,
    ))
}

async fn import_lookups(
    State(a): State<Shared>,
    body: Result<Json<Vec<LookupRecord>>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(records) = body?;
    let imported = whole(async move { a.lock().await.import_lookups(records).await }).await?;
    Ok((StatusCode::CREATED, Json(json!({ "imported": imported }))))
}

async fn stats(State(a): State<Shared>) -> ApiResult<impl IntoResponse> {
    let counters = a.lock().await.counters()?;
    Ok(Json(
        counters
            .into_iter()
            .map(|(c, packets)| CounterValue {
                counter: c.name().to_owned(),
                packets,
            })
            .collect::<Vec<_>>(),
    ))
}
