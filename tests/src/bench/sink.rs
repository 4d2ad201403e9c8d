//! Where the bench's floods end: nv-bench-ebpf's `sink_drop` on TC ingress of the receiving VM's
//! eth0, after the device has counted the frame (the count every flood measure reads). The VM's
//! own UDP stack and a reader's wake-up per datagram are the same for every datapath; the pps
//! measure once spent a fifth of its CPU there (perf), diluting the differences it measures.
use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType},
};

use crate::testbed::Vm;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sink"));

/// The sink on a VM's eth0, detached when dropped (a TCX link of the program it holds).
pub struct NicSink {
    _ebpf: Ebpf,
}

impl NicSink {
    pub fn attach(vm: &Vm) -> anyhow::Result<NicSink> {
        let ebpf = crate::netns::on_thread_in(vm.ns.path(), || {
            let mut ebpf = Ebpf::load(OBJECT).context("load the sink's object")?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut("sink_drop")
                .context("program sink_drop")?
                .try_into()?;
            prog.load().context("load sink_drop")?;
            prog.attach("eth0", TcAttachType::Ingress)
                .context("attach sink_drop to eth0")?;
            Ok(ebpf)
        })?;
        Ok(NicSink { _ebpf: ebpf })
    }
}
