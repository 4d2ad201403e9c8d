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

use crate::{
    agent::{Agent, MoveRequest},
    error::NvError,
    model::{LookupRecord, Provider},
};

/// Request bodies are small records; anything bigger is refused before parsing.
const MAX_BODY: usize = 64 * 1024;
/// An import carries a table: a million records are about 150 MB of JSON.
const MAX_IMPORT_BODY: usize = 512 * 1024 * 1024;

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
            post(import_lookups).layer(DefaultBodyLimit::max(MAX_IMPORT_BODY)),
        )
        .route("/v1/stats", get(stats))
        .route("/v1/status", get(status))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
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
    let added = a.lock().await.add_provider(p).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn del_provider(
    State(a): State<Shared>,
    q: Result<Query<ProviderQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(a.lock().await.del_provider(q.pa).await?))
}

async fn list_lookups(State(a): State<Shared>) -> impl IntoResponse {
    Json(a.lock().await.lookups())
}

async fn add_lookup(
    State(a): State<Shared>,
    body: Result<Json<LookupRecord>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(r) = body?;
    let added = a.lock().await.add_lookup(r).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn del_lookup(
    State(a): State<Shared>,
    q: Result<Query<LookupQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    Ok(Json(a.lock().await.del_lookup(q.vsid, q.ca).await?))
}

async fn move_lookup(
    State(a): State<Shared>,
    body: Result<Json<MoveRequest>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(m) = body?;
    Ok(Json(a.lock().await.move_lookup(m).await?))
}

async fn import_lookups(
    State(a): State<Shared>,
    body: Result<Json<Vec<LookupRecord>>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(records) = body?;
    let imported = a.lock().await.import_lookups(records).await?;
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
