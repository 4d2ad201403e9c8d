//! `nvctl status`: the agent as it published itself at its last change.
use comfy_table::Table;

use super::{args::Output, client::Client, render::new_table};
use crate::api::types::{ClusterStatus, Status};

pub async fn execute(agent: &Client, output: Output) -> anyhow::Result<()> {
    let status = agent.status().await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => println!("{}", table(&status)),
    }
    Ok(())
}

/// One line a fact, ports one line each.
fn table(s: &Status) -> Table {
    let mut t = new_table(["", ""]);
    let mut row = |fact: &str, value: String| {
        t.add_row([fact.to_owned(), value]);
    };
    row("agent version", s.version.clone());
    row("programs", s.programs.clone());
    row(
        "store",
        format!("{} ({} KiB)", s.store, s.store_bytes >> 10),
    );
    row("uplink", format!("{} (MTU {})", s.uplink, s.uplink_mtu));
    row("VM MTU to use", s.vm_mtu.to_string());
    row("decap hook", s.decap_hook.clone());
    row("underlay DSCP", s.underlay_dscp.clone());
    row("provider addresses", s.providers.to_string());
    row("lookup records", s.lookups.to_string());
    if let Some(c) = &s.cluster {
        row("cluster", cluster(c));
    }
    row(
        "watching",
        format!(
            "{} monitors; datapath debug events {}",
            s.monitors,
            if s.debug_events { "on" } else { "off" }
        ),
    );
    row(
        "reconciled",
        format!("{} times, {} entries repaired", s.reconciles, s.repaired),
    );
    for p in &s.ports {
        let state = if p.running { "running" } else { "down" };
        row(
            &format!("port {}", p.port),
            format!("{}, ifindex {}, {state}", p.kind, p.ifindex),
        );
    }
    for p in &s.ports_missing {
        row(
            &format!("port {p}"),
            "missing: traffic to its VM is dropped".to_owned(),
        );
    }
    for p in &s.ports_without_record {
        row(
            &format!("port {p}"),
            "no record: still filtered, every frame it sends is dropped".to_owned(),
        );
    }
    for p in &s.ports_set_down {
        row(
            &format!("port {p}"),
            "set down: nv could not filter it yet, and tries again every second".to_owned(),
        );
    }
    t
}

fn cluster(c: &ClusterStatus) -> String {
    format!(
        "host {}, etcd {}: {} at revision {}; {} records left out{}",
        c.host,
        c.endpoints.join(","),
        if c.connected {
            "connected"
        } else {
            "NOT CONNECTED, forwarding from what was applied"
        },
        c.revision,
        c.bad_records,
        c.last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    )
}
