//! `cargo xtask bench`: nv measured against a baseline run in the same invocation.
//! - `programs`: ns per packet of each datapath path with `BPF_PROG_TEST_RUN`, against do-nothing
//!   programs (the floor), with 1K and 1M lookup records.
//! - `e2e`: the two-host topology for nv (NVGRE, rewrite, and routed with port ACLs), the
//!   Cilium-style peer (`peer`), the kernel's VXLAN over a bridge and plain routed veth (the
//!   ceiling), measured in turns over repetitions: 64-byte UDP pps, TCP throughput, RTT, CPU per
//!   delivered packet at a fixed rate and two flows on two cores (`load`).
//! - `pressure`: nv and the peer with a million records and traffic to 100k of them, against
//!   traffic to one, on the same bed.
//! - `acls`: a VM's path with 0, 10 and 1,000 port ACL rules, stateless and stateful,
//!   against the same path without, program cost and end to end.
//! - `cluster`: cluster mode: a change from one host to every host's datapath against the same
//!   change alone, a VM's migration, a million records in etcd.
//! - `control`: how long `nvctl lookup add` takes until the record is in the datapath; an import
//!   of a million records against the same entries written straight into a BPF map (`mapfill`).
pub mod acls;
pub mod baseline;
pub mod cluster;
pub mod control;
pub mod e2e;
pub mod load;
pub mod mapfill;
pub mod peer;
pub mod pressure;
pub mod programs;
pub mod report;
pub mod routing;
pub mod sink;

/// How much to measure: `smoke` runs everything with tiny counts so the benchmark cannot rot.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub smoke: bool,
}

impl Scale {
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        if self.smoke { smoke } else { full }
    }
}

/// The `q`-quantile (0..=1) of `samples` (sorted in place).
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index into a short list"
    )]
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}
