//! The only module that touches aya: loads the eBPF object, pins maps and program links under
//! the pin path, attaches programs, and keeps the maps equal to what the store says.
//!
//! Pins make forwarding independent of the agent process: maps are reused by name on load,
//! links are replaced atomically (`bpf_link_update`) rather than detached and re-attached.
use std::path::PathBuf;

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use nv_common::RedirectTrace;

use crate::error::{NvError, Result};

mod acl;
mod attach;
pub mod batch;
mod maps;
mod pins;
pub mod skb_btf;
mod test_run;

pub use maps::{CounterReader, Desired, LookupView};
pub use pins::{ensure_bpffs, purge, router_mac, set_router_mac};
pub use test_run::TestRunOutcome;

/// What a sync wrote into one map and removed from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    pub written: usize,
    pub removed: usize,
}

/// The map `name` of `ebpf`, as the kind `T`.
fn map<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.map_mut(name)
        .ok_or_else(|| NvError::datapath(format!("map {name} missing from the object")))?
        .try_into()
        .map_err(|e| dp_err(format!("map {name}"), e))
}

/// `clock` now, in ns: the clocks the datapath reads (`CLOCK_MONOTONIC` is `bpf_ktime_get_ns`'s,
/// `CLOCK_MONOTONIC_COARSE` `bpf_ktime_get_coarse_ns`'s).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: fills the timespec we own.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// A datapath error: what failed, caused by `e` (aya's, the system's).
fn dp_err(what: impl Into<String>, e: impl Into<crate::error::DatapathSource>) -> NvError {
    NvError::datapath_by(what, e)
}

/// Which copy of the programs to load. Both share the pinned maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    /// What forwards: nothing recorded, nothing paid for it.
    Forwarding,
    /// For tests and packet traces: every redirect records its target
    /// ([`TestRunOutcome::redirect`]). Never attached.
    Tracing,
    /// The benchmark's baselines, never attached: the forwarding copy without per-VSID
    /// counting, and without the monitor's checks, so what each costs is measured in one run.
    WithoutVsidCounts,
    WithoutMonitor,
}

pub struct Datapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
    programs: Programs,
    /// Where the pins of migrated maps wait until the programs are swapped.
    aside: PathBuf,
    migrating: Vec<&'static str>,
    fresh: Vec<&'static str>,
    /// The tracing copy's redirect record, taken out of `ebpf` so it can be written through
    /// `&self` (the loaded programs keep the map alive).
    trace: Option<std::sync::Mutex<Array<MapData, RedirectTrace>>>,
    /// The forwarding copy's debug events (aya-log), until the agent takes them to read.
    log: Option<aya_log::EbpfLogger<DatapathLog>>,
}

/// Where the datapath's debug events (aya-log) go: the agent's log, at info level under the
/// target `nv_datapath`, since they only come once an operator turned them on.
pub struct DatapathLog;

impl log::Log for DatapathLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        tracing::info!(target: "nv_datapath", "{}", record.args());
    }

    fn flush(&self) {}
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| NvError::datapath(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| dp_err(format!("program {name}"), e))
}

impl Datapath {
    /// The datapath's debug events, for the task that logs them.
    pub fn take_log(&mut self) -> Option<aya_log::EbpfLogger<DatapathLog>> {
        self.log.take()
    }
}
