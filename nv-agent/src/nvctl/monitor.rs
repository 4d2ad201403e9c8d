//! `nvctl monitor`: the datapath's events, live, one line each.
use std::io::Write as _;

use super::{
    args::{MonitorArgs, Output},
    client::Client,
};

pub async fn execute(agent: &Client, args: &MonitorArgs, output: Output) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(v) = args.vsid {
        query.push(format!("vsid={v}"));
    }
    for (key, value) in [("reason", &args.reason), ("port", &args.port)] {
        if let Some(v) = value {
            query.push(format!("{key}={}", url_escape(v)));
        }
    }
    if let Some(s) = args.sample {
        query.push(format!("sample={s}"));
    }
    let path = format!("/v1/monitor?{}", query.join("&"));
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    agent
        .stream(&path, |line| {
            match output {
                Output::Json => writeln!(out, "{line}")?,
                Output::Table => {
                    let e: crate::monitor::Event = serde_json::from_str(line)?;
                    writeln!(out, "{}", e.line())?;
                }
            }
            out.flush()?;
            seen += 1;
            Ok(args.count.is_none_or(|c| seen < c))
        })
        .await
}

/// `s` for a URL's query: letters, digits and `_.-` as they are, the rest %-escaped.
pub(super) fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
