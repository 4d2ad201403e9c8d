//! nvctl's side of the API: HTTP/1.1 over the agent's unix socket.
use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// A connection to the agent's socket, ready for a request.
async fn connect(
    socket: &Path,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach nv-agent at {}: {e} (is nv-agent running? set --socket or NV_SOCKET)",
            socket.display()
        )
    })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request and returns the JSON answer, or the agent's one-line error.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    call_with(socket, method, path, body).await
}

/// As [`call`], with a body already encoded as JSON.
pub async fn call_with(
    socket: &Path,
    method: Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<Value> {
    call_raw(socket, method, path, "application/json", body).await
}

/// As [`call`], with a body of the given content type (an import file as it is).
pub async fn call_raw(
    socket: &Path,
    method: Method,
    path: &str,
    content_type: &str,
    body: Bytes,
) -> anyhow::Result<Value> {
    let mut sender = connect(socket).await?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "nv-agent")
        .header("content-type", content_type)
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("nv-agent answered {status} with a body that is not JSON: {e}")
        })?
    };
    if status.is_success() {
        return Ok(value);
    }
    let msg = value
        .get("error")
        .and_then(Value::as_str)
        .map_or_else(|| format!("nv-agent answered {status}"), str::to_owned);
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        anyhow::bail!("nv-agent failed: {msg}")
    }
    anyhow::bail!("{msg}")
}

/// Sends a GET whose answer is a stream of lines (`/v1/monitor`) and hands each line to
/// `on_line` until it returns `false` or the agent ends the stream.
pub async fn stream(
    socket: &Path,
    path: &str,
    mut on_line: impl FnMut(&str) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut sender = connect(socket).await?;
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
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| format!("nv-agent answered {status}"), str::to_owned);
        anyhow::bail!("{msg}");
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
