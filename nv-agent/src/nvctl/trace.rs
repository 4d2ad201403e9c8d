//! `nvctl trace`: where one packet goes and why.
use std::fmt::Write as _;

use super::{
    args::{Output, TraceArgs},
    client::Client,
};
use crate::trace::{Outcome, Request, first_pcap_frame, to_hex};

pub async fn execute(agent: &Client, args: &TraceArgs, output: Output) -> anyhow::Result<()> {
    let frame = match &args.pcap {
        Some(file) => {
            let bytes = std::fs::read(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let frame =
                first_pcap_frame(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            Some(to_hex(&frame))
        }
        None => None,
    };
    let req = Request {
        port: args.port.clone(),
        from_uplink: args.from_uplink,
        vsid: args.vsid,
        src: args.src,
        dst: args.dst,
        proto: args.proto,
        sport: args.sport,
        dport: args.dport,
        frame,
    };
    let outcome = agent.trace(&req).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&outcome)?),
        Output::Table => print!("{}", text(&outcome)),
    }
    Ok(())
}

/// A trace as an operator reads it: the packet, the records, the verdict, what leaves.
fn text(t: &Outcome) -> String {
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
