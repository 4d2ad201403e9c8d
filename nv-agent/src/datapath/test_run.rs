//! Running programs with `BPF_PROG_TEST_RUN`: program tests, benchmarks and `nvctl trace`.
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use nv_common::{RedirectTrace, program_names};

use super::{Datapath, Programs, dp_err, program};
use crate::error::{NvError, Result};

/// `struct __sk_buff` as `BPF_PROG_TEST_RUN` takes it: 192 bytes, `ifindex` at offset 40
/// (include/uapi/linux/bpf.h); every other field we pass stays zero.
const SK_BUFF_SIZE: usize = 192;

const SK_BUFF_IFINDEX: usize = 40;

const SK_BUFF_MARK: usize = 8;

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug, Clone)]
pub struct TestRunOutcome {
    pub ret: u32,
    pub data: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
    /// Where the frame was redirected, for programs loaded as [`Programs::Tracing`].
    pub redirect: Option<RedirectTrace>,
}

impl Datapath {
    /// Loads the do-nothing programs, so a benchmark can measure its floor in the same run.
    pub fn load_floors(&mut self) -> Result<()> {
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::NOOP_XDP)?;
        xdp.load().map_err(|e| dp_err("load no-op XDP", e))?;
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::NOOP_TC)?;
        tc.load().map_err(|e| dp_err("load no-op TC", e))
    }

    /// Runs a program once or `repeat` times on `data` with `BPF_PROG_TEST_RUN`, for program
    /// tests and benchmarks. For TC programs `ifindex` becomes the skb's device (it must exist
    /// in the calling thread's network namespace). XDP output starts with the metadata.
    pub fn test_run(
        &self,
        prog: &str,
        data: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        self.test_run_marked(prog, data, ifindex, 0, repeat)
    }

    /// As [`Datapath::test_run`], with the skb's mark (TC programs).
    pub fn test_run_marked(
        &self,
        prog: &str,
        data: &[u8],
        ifindex: Option<u32>,
        mark: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        let program = self
            .ebpf
            .program(prog)
            .ok_or_else(|| NvError::datapath(format!("program {prog} missing from the object")))?;
        let mut out = vec![0u8; data.len() + 256];
        if self.programs == Programs::Tracing {
            self.set_redirect_trace(RedirectTrace::default())?;
        }
        let mut ctx = [0u8; SK_BUFF_SIZE];
        ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4]
            .copy_from_slice(&ifindex.unwrap_or(0).to_ne_bytes());
        ctx[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let result = match program {
            aya::programs::Program::Xdp(p) => p.test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            }),
            aya::programs::Program::SchedClassifier(p) => p.test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                ctx_in: ifindex.map(|_| &ctx[..]),
                repeat,
                ..TestRunOptions::default()
            }),
            _ => return Err(NvError::datapath(format!("{prog} cannot be test-run"))),
        }
        .map_err(|e| dp_err(format!("test run {prog}"), e))?;
        out.truncate(result.data_size_out as usize);
        let redirect = match self.programs {
            Programs::Tracing => Some(self.redirect_trace()?).filter(|r| r.how != 0),
            _ => None,
        };
        Ok(TestRunOutcome {
            ret: result.return_value,
            data: out,
            duration: result.duration,
            redirect,
        })
    }

    fn set_redirect_trace(&self, value: RedirectTrace) -> Result<()> {
        let Some(trace) = &self.trace else {
            return Err(NvError::datapath("not a tracing copy"));
        };
        let mut map = trace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.set(0, value, 0)
            .map_err(|e| dp_err("reset trace map", e))
    }

    fn redirect_trace(&self) -> Result<RedirectTrace> {
        let Some(trace) = &self.trace else {
            return Err(NvError::datapath("not a tracing copy"));
        };
        let map = trace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&0, 0).map_err(|e| dp_err("read trace map", e))
    }
}
