//! Builds the eBPF object (nv-ebpf) with nightly and bpf-linker, as `cargo xtask setup` installs
//! them, and places it in `OUT_DIR` for `include_bytes_aligned!`.
include!("build_tools.rs");

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../nv-common/src");
    println!("cargo:rerun-if-changed=build_tools.rs");
    let probe = std::env::var_os("CARGO_FEATURE_LAYOUT_PROBE").is_some();
    ebpf_tools_on_path()?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nv-ebpf",
            root_dir: "../nv-ebpf",
            features: if probe { &["layout-probe"] } else { &[] },
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
