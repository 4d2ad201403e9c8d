//! `nvctl stats`: the datapath's counters, or one VSID's traffic.
use super::{args::Output, client::Client, render};

const COUNTERS: render::Columns = &[("COUNTER", "counter"), ("PACKETS", "packets")];
const TRAFFIC: render::Columns = &[
    ("VSID", "vsid"),
    ("DIRECTION", "direction"),
    ("METHOD", "method"),
    ("PACKETS", "packets"),
    ("BYTES", "bytes"),
];

pub async fn execute(agent: &Client, vsid: Option<u32>, output: Output) -> anyhow::Result<()> {
    match vsid {
        None => render::rows(output, &agent.counters().await?, COUNTERS),
        Some(v) => render::rows(output, &agent.vsid_traffic(v).await?, TRAFFIC),
    }
}
