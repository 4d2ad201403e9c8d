//! nvctl's side of the API: a typed client over the agent's unix socket (HTTP/1.1), whose
//! requests and answers are the API's own serde types.
use crate::model::acl::{AclListed, AclRule};
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use crate::{
    api::types::{
        CounterValue, Debug, ErrorAnswer, Imported, LookupRecord, MoveRequest, Provider,
        ProviderState, Rdid, RouteRecord, Status, Subnet, TraceOutcome, TraceRequest, VsidTraffic,
    },
    import::Format,
};

/// The agent behind a socket.
pub struct Client {
    socket: PathBuf,
}

/// The body of a request: none, a serde value as JSON, or bytes of a content type.
enum Body<'a> {
    None,
    Json(Vec<u8>),
    Raw(&'a str, Bytes),
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether an agent listens here (its socket exists).
    pub fn present(&self) -> bool {
        self.socket.exists()
    }

    pub async fn providers(&self) -> anyhow::Result<Vec<ProviderState>> {
        self.get("/v1/providers").await
    }

    pub async fn add_provider(&self, p: &Provider) -> anyhow::Result<ProviderState> {
        self.send(Method::POST, "/v1/providers", p).await
    }

    pub async fn delete_provider(&self, pa: IpAddr) -> anyhow::Result<ProviderState> {
        self.call(
            Method::DELETE,
            &format!("/v1/providers?pa={pa}"),
            Body::None,
        )
        .await
    }

    /// Records in (VSID, CA) order, of one VSID or all.
    pub async fn lookups(&self, vsid: Option<u32>) -> anyhow::Result<Vec<LookupRecord>> {
        match vsid {
            Some(v) => self.get(&format!("/v1/lookups?vsid={v}")).await,
            None => self.get("/v1/lookups").await,
        }
    }

    pub async fn add_lookup(&self, r: &LookupRecord) -> anyhow::Result<LookupRecord> {
        self.send(Method::POST, "/v1/lookups", r).await
    }

    pub async fn move_lookup(&self, m: &MoveRequest) -> anyhow::Result<LookupRecord> {
        self.send(Method::POST, "/v1/lookups/move", m).await
    }

    pub async fn delete_lookup(&self, vsid: u32, ca: IpAddr) -> anyhow::Result<LookupRecord> {
        self.call(
            Method::DELETE,
            &format!("/v1/lookups?vsid={vsid}&ca={ca}"),
            Body::None,
        )
        .await
    }

    /// An import file as it is: the agent parses and checks every record.
    pub async fn import(&self, text: Vec<u8>, format: Format) -> anyhow::Result<Imported> {
        self.call(
            Method::POST,
            "/v1/lookups/import",
            Body::Raw(format.content_type(), Bytes::from(text)),
        )
        .await
    }

    /// Routes in (domain, prefix, next hop) order, of one domain or all.
    pub async fn routes(&self, rdid: Option<&Rdid>) -> anyhow::Result<Vec<RouteRecord>> {
        match rdid {
            Some(d) => self.get(&format!("/v1/routes?rdid={d}")).await,
            None => self.get("/v1/routes").await,
        }
    }

    pub async fn add_route(&self, r: &RouteRecord) -> anyhow::Result<RouteRecord> {
        self.send(Method::POST, "/v1/routes", r).await
    }

    pub async fn delete_routes(
        &self,
        rdid: &Rdid,
        prefix: Subnet,
        nexthop: Option<std::net::IpAddr>,
    ) -> anyhow::Result<Vec<RouteRecord>> {
        let via = nexthop.map(|n| format!("&nexthop={n}")).unwrap_or_default();
        self.call(
            Method::DELETE,
            &format!("/v1/routes?rdid={rdid}&prefix={prefix}{via}"),
            Body::None,
        )
        .await
    }

    pub async fn import_routes(&self, routes: &[RouteRecord]) -> anyhow::Result<Imported> {
        self.send(Method::POST, "/v1/routes/import", &routes).await
    }

    /// ACL rules in id order, of one VSID or all, with their meters.
    pub async fn acls(&self, vsid: Option<u32>) -> anyhow::Result<Vec<AclListed>> {
        match vsid {
            Some(v) => self.get(&format!("/v1/acls?vsid={v}")).await,
            None => self.get("/v1/acls").await,
        }
    }

    pub async fn add_acl(&self, r: &AclRule) -> anyhow::Result<AclRule> {
        self.send(Method::POST, "/v1/acls", r).await
    }

    pub async fn delete_acl(&self, query: &str) -> anyhow::Result<AclRule> {
        self.call(Method::DELETE, &format!("/v1/acls?{query}"), Body::None)
            .await
    }

    pub async fn import_acls(&self, rules: &[AclRule]) -> anyhow::Result<Imported> {
        self.send(Method::POST, "/v1/acls/import", &rules).await
    }

    pub async fn counters(&self) -> anyhow::Result<Vec<CounterValue>> {
        self.get("/v1/stats").await
    }

    pub async fn vsid_traffic(&self, vsid: u32) -> anyhow::Result<Vec<VsidTraffic>> {
        self.get(&format!("/v1/stats?vsid={vsid}")).await
    }

    pub async fn status(&self) -> anyhow::Result<Status> {
        self.get("/v1/status").await
    }

    pub async fn debug(&self, on: bool) -> anyhow::Result<Debug> {
        self.send(Method::PUT, "/v1/debug", &Debug { datapath: on })
            .await
    }

    pub async fn trace(&self, req: &TraceRequest) -> anyhow::Result<TraceOutcome> {
        self.send(Method::POST, "/v1/trace", req).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(Method::GET, path, Body::None).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call(method, path, Body::Json(serde_json::to_vec(body)?))
            .await
    }

    /// Sends one request; the answer as `T`, or the agent's one-line error.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Body<'_>,
    ) -> anyhow::Result<T> {
        let (content_type, body) = match body {
            Body::None => ("application/json", Bytes::new()),
            Body::Json(b) => ("application/json", Bytes::from(b)),
            Body::Raw(t, b) => (t, b),
        };
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "nv-agent")
            .header("content-type", content_type)
            .body(Full::new(body))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            anyhow::bail!("{}", refusal(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("nv-agent answered {status} with a body nvctl does not read: {e}")
        })
    }

    /// Sends a GET whose answer is a stream of lines (`/v1/monitor`) and hands each line to
    /// `on_line` until it returns `false` or the agent ends the stream.
    pub async fn stream(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", "nv-agent")
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            anyhow::bail!("{}", refusal(status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if !on_line(String::from_utf8_lossy(&line[..end]).as_ref())? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A connection to the agent's socket, ready for a request.
    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach nv-agent at {}: {e} (is nv-agent running? set --socket or NV_SOCKET)",
                self.socket.display()
            )
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// What nvctl says of an answer that is not a success.
fn refusal(status: StatusCode, body: &[u8]) -> String {
    let said = serde_json::from_slice::<ErrorAnswer>(body)
        .map_or_else(|_| format!("nv-agent answered {status}"), |r| r.error);
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        format!("nv-agent failed: {said}")
    } else {
        said
    }
}
