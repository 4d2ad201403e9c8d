//! `nvctl lookup`: lookup records, through this host's agent, or (cluster mode, given etcd's
//! endpoints and the operator's certificate) in etcd itself.
use super::{
    args::{EtcdArgs, ExportFormat, LookupCmd, Output},
    client::Client,
    operator::Operator,
    render,
};
use crate::{
    api::types::{Imported, LookupRecord, MoveRequest},
    import,
    tables::{Table as _, lookups::Lookups},
};

const IMPORTED: render::Columns = &[("IMPORTED", "imported")];

pub async fn execute(
    agent: &Client,
    etcd: &EtcdArgs,
    cmd: &LookupCmd,
    output: Output,
) -> anyhow::Result<()> {
    let operator = Operator::from_args(etcd, agent)?;
    let columns = Lookups::COLUMNS;
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
            let record = LookupRecord {
                vsid: *vsid,
                ca: *ca,
                pa: *pa,
                mac: *mac,
                method: *method,
                port: port.clone(),
                name: name.clone(),
                host: host.clone(),
            };
            let added = match &operator {
                Some(op) => op.add(vec![record]).await?.remove(0),
                None => agent.add_lookup(&record).await?,
            };
            render::one(output, &added, columns)
        }
        LookupCmd::Del { vsid, ca } => {
            let deleted = match &operator {
                Some(op) => op.delete(*vsid, *ca).await?,
                None => agent.delete_lookup(*vsid, *ca).await?,
            };
            render::one(output, &deleted, columns)
        }
        LookupCmd::Move {
            vsid,
            ca,
            pa,
            port,
            host,
        } => {
            let m = MoveRequest {
                vsid: *vsid,
                ca: *ca,
                pa: *pa,
                port: port.clone(),
                host: host.clone(),
            };
            let moved = match &operator {
                Some(op) => op.move_to(&m).await?,
                None => agent.move_lookup(&m).await?,
            };
            render::one(output, &moved, columns)
        }
        LookupCmd::List { vsid } => render::rows(
            output,
            &list(agent, operator.as_ref(), *vsid).await?,
            columns,
        ),
        LookupCmd::Export { format, vsid } => {
            let records = list(agent, operator.as_ref(), *vsid).await?;
            let mut out = std::io::stdout().lock();
            match format {
                ExportFormat::Json => import::write_json(&records, &mut out),
                ExportFormat::Csv => import::write_csv(&records, &mut out),
            }
        }
        LookupCmd::Import { file } => {
            let imported = import_file(agent, operator.as_ref(), file).await?;
            render::one(output, &imported, IMPORTED)
        }
    }
}

/// The records of one VSID or all, in (VSID, CA) order: as etcd holds them (the operator), or
/// as this host's agent applied them.
async fn list(
    agent: &Client,
    operator: Option<&Operator<'_>>,
    vsid: Option<u32>,
) -> anyhow::Result<Vec<LookupRecord>> {
    let Some(op) = operator else {
        return agent.lookups(vsid).await;
    };
    let held = op.held().await?;
    if held.bad > 0 {
        eprintln!(
            "warning: {} key(s) under etcd's records are no record (every host leaves them \
             out; `nvctl status` on a host names them)",
            held.bad
        );
    }
    Ok(held
        .records
        .into_iter()
        .filter(|r| vsid.is_none_or(|v| r.vsid == v))
        .collect())
}

/// `nvctl lookup import`: the agent parses and checks every record of the file as it is sent
/// (the operator: nvctl parses, etcd takes them in one transaction), then all or none are
/// applied. On a terminal a spinner says which is going on.
async fn import_file(
    agent: &Client,
    operator: Option<&Operator<'_>>,
    file: &std::path::Path,
) -> anyhow::Result<Imported> {
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
    let (text, format) = import::load(file)?;
    let answer = match operator {
        None => {
            say(format!(
                "sending {} ({} MB) to the agent, which checks every record and applies them \
                 all or none",
                file.display(),
                text.len() >> 20
            ));
            agent.import(text, format).await
        }
        Some(op) => {
            let records = import::parse(&text, format).map_err(|e| anyhow::anyhow!(e))?;
            say(format!(
                "checking {} records against etcd's and writing them all or none",
                records.len()
            ));
            op.add(records)
                .await
                .map(|r| Imported { imported: r.len() })
        }
    };
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    answer.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}
