//! `GET /v1/monitor`: the datapath's events as JSON lines, for as long as the client stays.
//! Each client has its own filter; the datapath reports only while at least one watches.
use std::{collections::HashMap, convert::Infallible, time::Instant};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, ApiResult, Shared};
use crate::monitor::{Event, Filter};

/// Monitors that may run at once; each holds a connection for as long as it watches.
pub const WATCHERS_AT_ONCE: usize = 16;

/// The client's registration: dropped with its stream, which turns the datapath's reporting
/// off once nobody watches.
struct Watch {
    agent: Shared,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let (agent, id) = (self.agent.clone(), self.id);
        tokio::spawn(async move { agent.lock().await.unwatch(id) });
    }
}

/// What a client's stream carries from one event to the next.
struct Stream {
    rx: tokio::sync::broadcast::Receiver<nv_common::MonitorEvent>,
    stop: tokio::sync::watch::Receiver<bool>,
    watch: Watch,
    filter: Filter,
    port: Option<u32>,
    names: HashMap<u32, String>,
    named_at: Instant,
    /// Forwarded samples seen, to pass one in `filter.sample / datapath's`.
    samples: u64,
}

impl Stream {
    /// The next line for the client, or `None` when the agent stops.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let e = tokio::select! {
                e = self.rx.recv() => e,
                _ = self.stop.changed() => return None,
            };
            let e = match e {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    return Some(Event {
                        kind: "lost".into(),
                        lost: Some(n),
                        ..Event::of(&nv_common::MonitorEvent::default(), &HashMap::new())
                    });
                }
                Err(RecvError::Closed) => return None,
            };
            if !self.names.contains_key(&e.ifindex) && self.named_at.elapsed().as_secs() >= 1 {
                self.names = self.watch.agent.lock().await.port_names();
                self.named_at = Instant::now();
            }
            let event = Event::of(&e, &self.names);
            if !self.filter.wants(&event, self.port) {
                continue;
            }
            if event.kind == "forward" {
                self.samples += 1;
                let dp = self.watch.agent.lock().await.monitor_sample().max(1);
                let every = u64::from((self.filter.sample.unwrap_or(1) / dp).max(1));
                if !self.samples.is_multiple_of(every) {
                    continue;
                }
            }
            return Some(event);
        }
    }
}

pub async fn monitor(
    State(a): State<Shared>,
    q: Result<Query<Filter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(filter) = q.map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
    let w = a.lock().await.watch(&filter)?;
    let stream = Stream {
        rx: w.hub.subscribe(),
        stop: w.hub.stopping(),
        watch: Watch {
            agent: a.clone(),
            id: w.id,
        },
        filter,
        port: w.port,
        names: w.names,
        named_at: Instant::now(),
        samples: 0,
    };
    let lines = futures::stream::unfold(stream, |mut s| async move {
        let e = s.next().await?;
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, Infallible>(Bytes::from(line)), s))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}
