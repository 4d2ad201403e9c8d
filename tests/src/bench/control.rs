//! Control plane: `nvctl lookup add` (a new process each time, as an operator's script runs it)
//! until the record is in the datapath's lookup map, read back from the pinned map.
use std::{net::Ipv4Addr, time::Instant};

use anyhow::ensure;
use nv_agent::datapath::LookupView;
use nv_common::{LookupKey, v4_mapped};
use serde::Serialize;

use super::{Scale, quantile};
use crate::testbed::TwoHosts;

#[derive(Clone, Debug, Serialize)]
pub struct Result {
    pub adds: u32,
    /// From starting `nvctl lookup add` to finding the record in the map, ms.
    pub add_to_datapath_p50_ms: f64,
    pub add_to_datapath_p99_ms: f64,
    /// Records found in the map the moment nvctl returned (the agent answers after the update).
    pub present_on_return: u32,
}

pub fn run(scale: Scale) -> anyhow::Result<Result> {
    let adds: u32 = scale.pick(1000, 20);
    let bed = TwoHosts::build("bc")?;
    bed.configure()?;
    let h = &bed.hosts[0];
    let view = LookupView::open(&h.pin_path)?;
    let mut samples = Vec::new();
    let mut present_on_return = 0;
    for i in 0..adds {
        let [_, _, a, b] = i.to_be_bytes();
        let ca = Ipv4Addr::new(10, 1, a, b);
        let mac = format!("02:01:00:00:{a:02x}:{b:02x}");
        let start = Instant::now();
        h.nvctl(&[
            "lookup",
            "add",
            "--vsid",
            "5001",
            "--ca",
            &ca.to_string(),
            "--pa",
            "198.18.0.2",
            "--mac",
            &mac,
        ])?;
        let key = LookupKey {
            vsid: 5001,
            ca: v4_mapped(ca.octets()),
        };
        let mut present = view.get(&key).is_some();
        if present {
            present_on_return += 1;
        }
        while !present {
            present = view.get(&key).is_some();
            ensure!(
                start.elapsed().as_secs() < 10,
                "record {ca} not in the datapath 10 s after the add"
            );
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Result {
        adds,
        add_to_datapath_p50_ms: quantile(&mut samples, 0.5),
        add_to_datapath_p99_ms: quantile(&mut samples, 0.99),
        present_on_return,
    })
}
