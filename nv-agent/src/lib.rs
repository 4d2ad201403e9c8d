//! nv's host agent as a library: the daemon (`nv-agent`) and the CLI (`nvctl`) are thin
//! binaries over these modules.
pub mod agent;
pub mod api;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod control;
pub mod datapath;
pub mod dhcp;
pub mod error;
pub mod etcd_access;
pub mod etcd_records;
pub mod etcd_writer;
pub mod import;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod netlink;
pub mod nvctl;
pub mod ports;
pub mod ra;
pub mod shared;
pub mod store;
mod store_legacy;
pub mod tables;
pub mod trace;
pub mod translate;
pub mod txn;
pub mod underlay_hops;

/// The eBPF object built from nv-ebpf by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nv"));

/// A fingerprint of the eBPF object this agent loads (FNV-1a of its bytes): two agents with
/// the same one run the same datapath. Computed once: the object is megabytes, and status
/// (published after every change) names it.
pub fn programs_version() -> String {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION
        .get_or_init(|| {
            let hash = EBPF_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            format!("{hash:016x}")
        })
        .clone()
}
