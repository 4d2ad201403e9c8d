//! The agent's listeners (the API socket, `/metrics`) served with limits, so that no client
//! (a local user opening connections and sending nothing, say) can take the descriptors the
//! agent needs to filter VM ports: at most `cap` connections at once, the rest closed as
//! they come; a connection must send its request's headers within `header_timeout` of
//! opening, or of its last answer (hyper's header-read timer runs whenever a connection
//! waits for a request), or it is closed. A response being streamed (`nvctl monitor`) is
//! not waiting for a request, so no timer cuts it.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Semaphore,
};

/// How one listener is served.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are closed as they are accepted.
    pub cap: usize,
    /// How long a connection may take to send a request's headers (idle connections too).
    pub header_timeout: Duration,
}

/// Connections a listener refused because it was at its cap, and closed for sending no
/// request in time: what `nvctl status` and the metrics report.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    pub over_cap: Arc<AtomicU64>,
}

impl Refusals {
    pub fn over_cap(&self) -> u64 {
        self.over_cap.load(Ordering::Relaxed)
    }
}

/// Something that accepts connections: a Unix or a TCP listener.
pub trait Accept: Send + 'static {
    type Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Conn> {
        tokio::net::UnixListener::accept(self).await.map(|(c, _)| c)
    }
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Conn> {
        tokio::net::TcpListener::accept(self).await.map(|(c, _)| c)
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes; connections being
/// served then finish their request.
pub async fn serve<L: Accept>(
    what: &'static str,
    listener: L,
    app: axum::Router,
    limits: Limits,
    refusals: Refusals,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.cap));
    let mut last_warned: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => return,
            c = listener.accept() => c,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors (or another transient error): the connection waits in
                // the kernel's queue; try again shortly rather than spin.
                tracing::warn!("{what}: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.over_cap.fetch_add(1, Ordering::Relaxed);
            if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    "{what}: {} connections open, the most it serves; closing new ones",
                    limits.cap
                );
                last_warned = Some(tokio::time::Instant::now());
            }
            drop(conn);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let served = http.serve_connection(TokioIo::new(conn), service).await;
            if let Err(e) = served
                && !e.is_incomplete_message()
            {
                tracing::debug!("{what}: connection ended: {e}");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Whether the server closed `c` (reads end) within `within`.
    async fn closed(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(within, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_and_idle_ones_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let refusals = Refusals::default();
        let limits = Limits {
            cap: 4,
            header_timeout: Duration::from_millis(300),
        };
        tokio::spawn(serve(
            "test",
            listener,
            app,
            limits,
            refusals.clone(),
            std::future::pending(),
        ));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The cap is taken: a fifth is closed at once, and counted.
        let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut fifth, Duration::from_millis(200)).await);
        assert_eq!(refusals.over_cap(), 1);
        // The four sent nothing: each is closed once its time to send a request is up.
        for c in &mut held {
            assert!(closed(c, Duration::from_secs(2)).await);
        }
        // Their slots are free again; a request is answered, and the connection, idle after
        // its answer, is closed in turn.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
        assert!(closed(&mut c, Duration::from_secs(2)).await);
        assert_eq!(refusals.over_cap(), 1);
    }
}
