//! nv-agent: see `nv-agent --help`.
use std::os::unix::fs::PermissionsExt as _;

use anyhow::Context as _;
use clap::Parser as _;
use nv_agent::{
    agent::Agent,
    api,
    config::{AgentArgs, Config},
    datapath, listener,
    shared::Shared,
};
use tokio::{
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};
use tracing::info;

/// Members of this group (where it exists) may use the API socket besides root.
const API_GROUP: &str = "nv";

/// The gid of `name`, or `None` when there is no such group.
fn group_id(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns NULL or a pointer to a static entry; read at once.
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: checked for NULL.
    (!entry.is_null()).then(|| unsafe { (*entry).gr_gid })
}

/// How often the agent looks at every VM port even without a link event: a backstop for
/// events lost to a netlink socket overrun.
const PORT_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);
/// How often it tries again to filter a VM port it had to set down.
const UNFILTERED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The API socket: nvctl's requests, monitors and imports (each has limits of its own
/// inside), well under the descriptors the agent may open.
const API_LIMITS: listener::Limits = listener::Limits {
    cap: 128,
    header_timeout: std::time::Duration::from_secs(10),
};
/// `/metrics`: a Prometheus server or two, and someone's curl.
const METRICS_LIMITS: listener::Limits = listener::Limits {
    cap: 16,
    header_timeout: std::time::Duration::from_secs(10),
};

/// Raises the soft limit of open descriptors to the hard one (systemd gives services 1024
/// soft, and the unit sets `LimitNOFILE`): the agent's listeners are capped far below it,
/// and attaching programs to VM ports needs descriptors of its own.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                tracing::warn!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = AgentArgs::parse();
    raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = Config::resolve(&args)?;
    if args.purge {
        datapath::purge(&config.pin_path)?;
        nv_agent::netlink::Netlink::connect()?
            .del_bounce_pair()
            .await?;
        info!(
            "removed every pin under {}; the store in {} is kept",
            config.pin_path.display(),
            config.state_dir.display()
        );
        return Ok(());
    }
    let mut agent = Agent::start(&config).await?;
    let socket = &config.api_socket;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => info!("removed stale socket {}", socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot remove stale socket {}", socket.display()));
        }
    }
    // Created 0660 from the start (no window with wider permissions): root and, where it
    // exists, the `nv` group may configure; nobody else.
    // SAFETY: umask only changes this process's file creation mask; restored right after.
    let old_mask = unsafe { libc::umask(0o117) };
    let bound = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener = bound.with_context(|| format!("cannot listen on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions of {}", socket.display()))?;
    if let Some(gid) = group_id(API_GROUP) {
        std::os::unix::fs::chown(socket, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {API_GROUP}", socket.display()))?;
    }
    info!("serving nvctl on {}", socket.display());
    let metrics = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on metrics_addr {} for Prometheus (another agent there? set \
                 metrics_addr)",
                config.metrics_addr
            )
        })?;
    info!(
        "serving Prometheus on http://{}/metrics",
        config.metrics_addr
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let hub = agent.hub();
    let slow_path = agent.take_slow_path()?;
    let agent = Shared::new(agent)?;
    nv_agent::dhcp::server::spawn(agent.clone(), slow_path)
        .context("cannot start the DHCP server (a packet socket)")?;
    if let Some(every) = config.reconcile_interval {
        spawn_reconciler(agent.clone(), every);
    }
    spawn_port_watcher(agent.clone())?;
    nv_agent::underlay_hops::follow(&agent)
        .context("cannot follow the host's routes and neighbours")?;
    nv_agent::control::follow(&agent);
    if let Some(cluster) = agent.cluster().cloned() {
        // Ready once caught up with etcd; if etcd does not answer, from what was applied last.
        if !cluster.wait_synced(std::time::Duration::from_secs(5)).await {
            tracing::warn!(
                "etcd did not answer: ready with the records applied up to revision {}",
                cluster.revision()
            );
        }
    }
    let api_metrics = nv_agent::metrics::ApiMetrics::default();
    let refused = [listener::Refusals::default(), listener::Refusals::default()];
    serve_metrics(metrics, agent.clone(), api_metrics.clone(), refused.clone());
    notify_ready(&agent.published().status);
    listener::serve(
        "the API socket",
        listener,
        api::router(agent, api_metrics),
        API_LIMITS,
        refused[0].clone(),
        async move {
            shutdown.await;
            hub.stop();
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        },
    )
    .await;
    let _ = std::fs::remove_file(socket);
    info!("stopped; forwarding continues from the pinned programs and maps");
    Ok(())
}

/// Serves `/metrics` for Prometheus: what the agent published at its last change, and the
/// datapath's counters read at each scrape (never waiting for a change that runs).
/// `refused`: the API socket's and this listener's refusals.
fn serve_metrics(
    listener: tokio::net::TcpListener,
    agent: Shared,
    api_metrics: nv_agent::metrics::ApiMetrics,
    refused: [listener::Refusals; 2],
) {
    use nv_agent::metrics;
    let own = refused[1].clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let format = metrics::Format::accepted(
                headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let reader = agent.counters();
            let live = || -> nv_agent::error::Result<metrics::Live> {
                Ok(metrics::Live {
                    counters: reader.counters()?,
                    vsids: reader.vsid_stats(None)?,
                    routed: reader.routed()?,
                    refused: vec![
                        ("api", refused[0].over_cap()),
                        ("metrics", refused[1].over_cap()),
                    ],
                    dhcp: agent.dhcp_counts().read(),
                    acl_meters: reader.acl_meters()?.into_iter().collect(),
                    acl_flows: reader.acl_flows()?,
                })
            };
            let snapshot = live()
                .map(|live| agent.published().metrics.complete(live))
                .map_err(|e| e.to_string());
            metrics::response(
                snapshot.and_then(|s| metrics::encode(s, &api_metrics).map_err(|e| e.to_string())),
                format,
            )
        }),
    );
    tokio::spawn(listener::serve(
        "the metrics endpoint",
        listener,
        app,
        METRICS_LIMITS,
        own,
        std::future::pending(),
    ));
}

/// Repairs drift between the maps and the store every `every`.
fn spawn_reconciler(agent: Shared, every: std::time::Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = agent.lock().await.reconcile_maps() {
                tracing::warn!("reconciling the maps: {}", nv_agent::error::one_line(&e));
            }
        }
    });
}

/// VMs start, stop and restart on their own schedule: follows their ports as the kernel
/// announces them, and looks at all of them now and then.
fn spawn_port_watcher(watched: Shared) -> anyhow::Result<()> {
    let mut events = Some(nv_agent::netlink::link_events()?);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PORT_REFRESH);
        let mut retry = tokio::time::interval(UNFILTERED_RETRY);
        loop {
            enum Wake {
                Event(Option<nv_agent::netlink::LinkEvent>),
                Refresh,
                Retry,
            }
            let wake = tokio::select! {
                e = nv_agent::netlink::next_or_never(&mut events) => Wake::Event(e),
                _ = tick.tick() => Wake::Refresh,
                _ = retry.tick() => Wake::Retry,
            };
            let done = match wake {
                Wake::Event(Some(e)) => watched.lock().await.link_changed(&e.name, e.index).await,
                Wake::Event(None) => {
                    tracing::warn!("link events stopped; looking at ports every {PORT_REFRESH:?}");
                    events = None;
                    Ok(())
                }
                Wake::Refresh => watched.lock().await.refresh().await,
                Wake::Retry => {
                    let mut agent = watched.lock().await;
                    if agent.has_unfiltered() {
                        agent.retry_unfiltered().await
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(e) = done {
                tracing::warn!("following ports: {}", nv_agent::error::one_line(&e));
            }
        }
    });
    Ok(())
}

/// Tells systemd (Type=notify) the agent is ready: called only once the programs are
/// attached, the maps equal the store, ports are followed and the API listens. Without
/// `NOTIFY_SOCKET` it does nothing.
fn notify_ready(status: &nv_agent::agent::Status) {
    let summary = format!(
        "forwarding on {}: {} lookup records, {} ports attached",
        status.uplink,
        status.lookups,
        status.ports.len()
    );
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&summary),
        ],
    ) {
        tracing::warn!("cannot tell systemd the agent is ready: {e}");
    }
    info!("ready: {summary}");
}
