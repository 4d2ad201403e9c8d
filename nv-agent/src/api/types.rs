//! The API's requests and answers beside the records themselves ([`crate::model`]), in serde
//! types the agent serves and nvctl reads: neither side writes or reads JSON by hand.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use crate::{
    agent::{PortStatus, Status},
    cluster::Status as ClusterStatus,
    model::{LookupRecord, Provider, ProviderState, Rdid, RouteRecord, Subnet},
    trace::{Outcome as TraceOutcome, Request as TraceRequest},
};

/// A record's move to another host or port: HNV migration, one change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub vsid: u32,
    pub ca: IpAddr,
    pub pa: IpAddr,
    #[serde(default)]
    pub port: Option<String>,
    /// Cluster mode: the host of the new port [default: this host].
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct CounterValue {
    pub counter: String,
    pub packets: u64,
}

/// A VSID's traffic in one direction by one method (`nvctl stats --vsid`).
#[derive(Serialize, Deserialize)]
pub struct VsidTraffic {
    pub vsid: u32,
    /// `tx` (sent by a VM here) or `rx` (delivered to one).
    pub direction: String,
    /// `encap`, `rewrite`, or `local` (VM to VM on this host).
    pub method: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What an import added.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Imported {
    pub imported: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debug {
    /// The datapath's debug events (aya-log), logged by the agent under `nv_datapath`.
    pub datapath: bool,
}

/// Every refusal and failure: one line an operator reads (400 invalid, 404, 409 conflict,
/// 503 unavailable, 500).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}
