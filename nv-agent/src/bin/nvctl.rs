//! nvctl: see `nvctl --help`.
use std::process::ExitCode;
use std::{fmt::Write as _, io::Write as _};

use clap::{CommandFactory as _, Parser as _};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use hyper::Method;
use nv_agent::model::LookupRecord;
use nv_agent::{
    cli::{Cli, Command, ExportFormat, LookupCmd, ManPage, Output, ProviderCmd},
    client::call,
};
use serde_json::{Value, json};

fn lookups_path(vsid: Option<u32>) -> String {
    match vsid {
        Some(v) => format!("/v1/lookups?vsid={v}"),
        None => "/v1/lookups".to_owned(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other nvctl error; `--help` has the rest.
            let rendered = e.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("{} (see --help)", line.trim());
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Columns of each listing: (header, JSON field).
const PROVIDER_COLUMNS: &[(&str, &str)] = &[("PA", "pa"), ("DEV", "dev")];
const LOOKUP_COLUMNS: &[(&str, &str)] = &[
    ("VSID", "vsid"),
    ("CA", "ca"),
    ("PA", "pa"),
    ("MAC", "mac"),
    ("METHOD", "method"),
    ("PORT", "port"),
    ("NAME", "name"),
    ("HOST", "host"),
];
const IMPORT_COLUMNS: &[(&str, &str)] = &[("IMPORTED", "imported")];
const STATS_COLUMNS: &[(&str, &str)] = &[("COUNTER", "counter"), ("PACKETS", "packets")];
const DEBUG_COLUMNS: &[(&str, &str)] = &[("DATAPATH DEBUG EVENTS", "datapath")];
const VSID_STATS_COLUMNS: &[(&str, &str)] = &[
    ("VSID", "vsid"),
    ("DIRECTION", "direction"),
    ("METHOD", "method"),
    ("PACKETS", "packets"),
    ("BYTES", "bytes"),
];

/// `nvctl lookup import`: sends the file as it is; the agent parses and checks every record,
/// then applies them all or none. On a terminal a spinner says which is going on.
async fn import(socket: &std::path::Path, file: &std::path::Path) -> anyhow::Result<Value> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let p = indicatif::ProgressBar::new_spinner();
        p.enable_steady_tick(std::time::Duration::from_millis(100));
        p
    });
    let say = |what: String| {
        if let Some(p) = &progress {
            p.set_message(what);
        }
    };
    say(format!("reading {}", file.display()));
    let (text, format) = nv_agent::import::load(file)?;
    say(format!(
        "sending {} ({} MB) to the agent, which checks every record and applies them all or none",
        file.display(),
        text.len() >> 20
    ));
    let answer = nv_agent::client::call_raw(
        socket,
        Method::POST,
        "/v1/lookups/import",
        format.content_type(),
        bytes::Bytes::from(text),
    )
    .await;
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    answer.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// The commands that print something other than a table or JSON of one API answer.
async fn run_other(cli: &Cli) -> Option<anyhow::Result<()>> {
    let mut out = std::io::stdout().lock();
    Some(match &cli.command {
        Command::Lookup(LookupCmd::Export { format, vsid }) => {
            async {
                let value = call(&cli.socket, Method::GET, &lookups_path(*vsid), None).await?;
                let records: Vec<LookupRecord> = serde_json::from_value(value)?;
                match format {
                    ExportFormat::Json => nv_agent::import::write_json(&records, &mut out),
                    ExportFormat::Csv => nv_agent::import::write_csv(&records, &mut out),
                }
            }
            .await
        }
        Command::Monitor {
            vsid,
            reason,
            port,
            sample,
            count,
        } => {
            let mut query = Vec::new();
            if let Some(v) = vsid {
                query.push(format!("vsid={v}"));
            }
            for (key, value) in [("reason", reason), ("port", port)] {
                if let Some(v) = value {
                    query.push(format!("{key}={}", url_escape(v)));
                }
            }
            if let Some(s) = sample {
                query.push(format!("sample={s}"));
            }
            let path = format!("/v1/monitor?{}", query.join("&"));
            let mut seen = 0u64;
            let json = cli.output == Output::Json;
            nv_agent::client::stream(&cli.socket, &path, |line| {
                if json {
                    writeln!(out, "{line}")?;
                } else {
                    let e: nv_agent::monitor::Event = serde_json::from_str(line)?;
                    writeln!(out, "{}", e.line())?;
                }
                out.flush()?;
                seen += 1;
                Ok(count.is_none_or(|c| seen < c))
            })
            .await
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "nvctl", &mut out);
            Ok(())
        }
        Command::Man { page } => {
            // nv-agent is a system daemon: section 8.
            let man = match page {
                ManPage::Nvctl => clap_mangen::Man::new(Cli::command()),
                ManPage::NvAgent => {
                    clap_mangen::Man::new(nv_agent::config::AgentArgs::command()).section("8")
                }
            };
            man.render(&mut out).map_err(Into::into)
        }
        _ => return None,
    })
}

/// `s` for a URL's query: letters, digits and `_.-` as they are, the rest %-escaped.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The columns of a lookup command's answer.
fn lookup_columns(cmd: &LookupCmd) -> &'static [(&'static str, &'static str)] {
    match cmd {
        LookupCmd::Import { .. } => IMPORT_COLUMNS,
        _ => LOOKUP_COLUMNS,
    }
}

/// `nvctl lookup ...`: the agent's answer.
async fn lookup(s: &std::path::Path, cmd: &LookupCmd) -> anyhow::Result<Value> {
    match cmd {
        LookupCmd::Add {
            vsid,
            ca,
            pa,
            mac,
            method,
            port,
            name,
            host,
        } => {
            let body = json!({ "vsid": vsid, "ca": ca, "pa": pa, "mac": mac, "method": method, "port": port, "name": name, "host": host });
            call(s, Method::POST, "/v1/lookups", Some(&body)).await
        }
        LookupCmd::Del { vsid, ca } => {
            call(
                s,
                Method::DELETE,
                &format!("/v1/lookups?vsid={vsid}&ca={ca}"),
                None,
            )
            .await
        }
        LookupCmd::Move {
            vsid,
            ca,
            pa,
            port,
            host,
        } => {
            let body = json!({ "vsid": vsid, "ca": ca, "pa": pa, "port": port, "host": host });
            call(s, Method::POST, "/v1/lookups/move", Some(&body)).await
        }
        LookupCmd::Import { file } => import(s, file).await,
        LookupCmd::List { vsid } => call(s, Method::GET, &lookups_path(*vsid), None).await,
        LookupCmd::Export { .. } => unreachable!("run_other"),
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(done) = run_other(cli).await {
        return done;
    }
    let s = &cli.socket;
    let (value, columns) = match &cli.command {
        Command::Provider(ProviderCmd::Add { pa, dev }) => (
            call(
                s,
                Method::POST,
                "/v1/providers",
                Some(&json!({ "pa": pa, "dev": dev })),
            )
            .await?,
            PROVIDER_COLUMNS,
        ),
        Command::Provider(ProviderCmd::Del { pa }) => (
            call(s, Method::DELETE, &format!("/v1/providers?pa={pa}"), None).await?,
            PROVIDER_COLUMNS,
        ),
        Command::Provider(ProviderCmd::List) => (
            call(s, Method::GET, "/v1/providers", None).await?,
            PROVIDER_COLUMNS,
        ),
        Command::Lookup(cmd) => (lookup(s, cmd).await?, lookup_columns(cmd)),
        Command::Stats { vsid: None } => (
            call(s, Method::GET, "/v1/stats", None).await?,
            STATS_COLUMNS,
        ),
        Command::Stats { vsid: Some(vsid) } => (
            call(s, Method::GET, &format!("/v1/stats?vsid={vsid}"), None).await?,
            VSID_STATS_COLUMNS,
        ),
        Command::Monitor { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("run_other")
        }
        Command::Trace { .. } => return trace(cli).await,
        Command::Debug { state } => (
            call(
                s,
                Method::PUT,
                "/v1/debug",
                Some(&json!({ "datapath": *state == nv_agent::cli::OnOff::On })),
            )
            .await?,
            DEBUG_COLUMNS,
        ),
        Command::Status => {
            let value = call(s, Method::GET, "/v1/status", None).await?;
            match cli.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
                Output::Table => println!("{}", status_table(&value)),
            }
            return Ok(());
        }
    };
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => println!("{}", table(&value, columns)),
    }
    Ok(())
}

fn table(value: &Value, columns: &[(&str, &str)]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(columns.iter().map(|(h, _)| *h));
    let rows: Vec<&Value> = match value {
        Value::Array(rows) => rows.iter().collect(),
        other => vec![other],
    };
    for row in rows {
        t.add_row(columns.iter().map(|(_, field)| match row.get(field) {
            None | Some(Value::Null) => "-".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }));
    }
    t
}

/// `nvctl trace`: builds the request (reading a capture, if given) and prints the outcome.
async fn trace(cli: &Cli) -> anyhow::Result<()> {
    let Command::Trace {
        port,
        from_uplink,
        vsid,
        src,
        dst,
        proto,
        dport,
        sport,
        pcap,
    } = &cli.command
    else {
        unreachable!("called for trace")
    };
    let frame = match pcap {
        Some(file) => {
            let bytes = std::fs::read(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let frame = nv_agent::trace::first_pcap_frame(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            Some(nv_agent::trace::to_hex(&frame))
        }
        None => None,
    };
    let req = nv_agent::trace::Request {
        port: port.clone(),
        from_uplink: *from_uplink,
        vsid: *vsid,
        src: *src,
        dst: *dst,
        proto: *proto,
        sport: *sport,
        dport: *dport,
        frame,
    };
    let body = serde_json::to_value(&req)?;
    let value = call(&cli.socket, Method::POST, "/v1/trace", Some(&body)).await?;
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => {
            let out: nv_agent::trace::Outcome = serde_json::from_value(value)?;
            print!("{}", trace_text(&out));
        }
    }
    Ok(())
}

/// A trace as an operator reads it: the packet, the records, the verdict, what leaves.
fn trace_text(t: &nv_agent::trace::Outcome) -> String {
    let mut s = String::new();
    let mut section = |title: &str, lines: &[String]| {
        for (i, l) in lines.iter().enumerate() {
            let head = if i == 0 { title } else { "" };
            let _ = writeln!(s, "{head:<10}{l}");
        }
    };
    section("program", std::slice::from_ref(&t.program));
    section("packet", &t.input);
    section("records", &t.lookups);
    let mut verdict = t.verdict.clone();
    if let Some(c) = &t.counter {
        let _ = write!(verdict, " ({c})");
    }
    section("verdict", &[verdict, t.why.clone()]);
    if let (Some(port), Some(how)) = (&t.out_port, &t.out_how) {
        section("leaves", &[format!("by {port}, {how}")]);
    }
    section("output", &t.output);
    s
}

/// `nvctl status` as a table: one line a fact, ports one line each.
fn status_table(v: &Value) -> Table {
    let field = |name: &str| match &v[name] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["", ""]);
    t.add_row(["agent version".to_owned(), field("version")]);
    t.add_row(["programs".to_owned(), field("programs")]);
    t.add_row([
        "store".to_owned(),
        format!(
            "{} ({} KiB)",
            field("store"),
            v["store_bytes"].as_u64().unwrap_or(0) >> 10
        ),
    ]);
    t.add_row([
        "uplink".to_owned(),
        format!("{} (MTU {})", field("uplink"), field("uplink_mtu")),
    ]);
    t.add_row(["VM MTU to use".to_owned(), field("vm_mtu")]);
    t.add_row(["decap hook".to_owned(), field("decap_hook")]);
    t.add_row(["underlay DSCP".to_owned(), field("underlay_dscp")]);
    t.add_row(["provider addresses".to_owned(), field("providers")]);
    t.add_row(["lookup records".to_owned(), field("lookups")]);
    if let Some(c) = v["cluster"].as_object() {
        let s = |k: &str| c.get(k).map_or_else(String::new, ToString::to_string);
        t.add_row([
            "cluster".to_owned(),
            format!(
                "host {}, etcd {}: {} at revision {}; {} records left out{}",
                c.get("host").and_then(Value::as_str).unwrap_or("?"),
                c.get("endpoints")
                    .map_or_else(String::new, ToString::to_string),
                if c.get("connected").and_then(Value::as_bool) == Some(true) {
                    "connected"
                } else {
                    "NOT CONNECTED, forwarding from what was applied"
                },
                s("revision"),
                s("bad_records"),
                c.get("last_error")
                    .and_then(Value::as_str)
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            ),
        ]);
    }
    t.add_row([
        "watching".to_owned(),
        format!(
            "{} monitors; datapath debug events {}",
            field("monitors"),
            if v["debug_events"].as_bool() == Some(true) {
                "on"
            } else {
                "off"
            }
        ),
    ]);
    t.add_row([
        "reconciled".to_owned(),
        format!(
            "{} times, {} entries repaired",
            field("reconciles"),
            field("repaired")
        ),
    ]);
    for p in v["ports"].as_array().into_iter().flatten() {
        let state = if p["running"].as_bool() == Some(true) {
            "running"
        } else {
            "down"
        };
        t.add_row([
            format!("port {}", p["port"].as_str().unwrap_or("?")),
            format!(
                "{}, ifindex {}, {state}",
                p["kind"].as_str().unwrap_or("?"),
                p["ifindex"]
            ),
        ]);
    }
    for p in v["ports_missing"].as_array().into_iter().flatten() {
        t.add_row([
            format!("port {}", p.as_str().unwrap_or("?")),
            "missing: traffic to its VM is dropped".to_owned(),
        ]);
    }
    for p in v["ports_without_record"].as_array().into_iter().flatten() {
        t.add_row([
            format!("port {}", p.as_str().unwrap_or("?")),
            "no record: still filtered, every frame it sends is dropped".to_owned(),
        ]);
    }
    t
}
