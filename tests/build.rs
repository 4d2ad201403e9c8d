//! Builds the benchmark's peer (nv-bench-ebpf) as nv-agent's build script builds nv's datapath,
//! and places it in `OUT_DIR` for `include_bytes_aligned!`.
include!("../nv-agent/build_tools.rs");

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../nv-agent/build_tools.rs");
    ebpf_tools_on_path()?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nv-bench-ebpf",
            root_dir: "../nv-bench-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
