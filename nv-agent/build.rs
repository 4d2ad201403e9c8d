//! Builds the eBPF object (nv-ebpf) with nightly and bpf-linker, as `cargo xtask setup` installs
//! them, and places it in `OUT_DIR` for `include_bytes_aligned!`.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../nv-common/src");
    println!("cargo:rerun-if-env-changed=NV_TOOLS_DIR");
    let probe = env::var_os("CARGO_FEATURE_LAYOUT_PROBE").is_some();
    // bpf-linker lives outside target/ (see xtask setup) so `cargo clean` does not rebuild it.
    let tools = env::var_os("NV_TOOLS_DIR").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cache/nv"),
        PathBuf::from,
    );
    let mut paths = vec![tools.join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    // The eBPF crate's own cargo reports every crate it compiles, and aya-build shows each of
    // its lines as a warning of this package: hundreds of lines on a first build. Quiet, it
    // still reports errors and warnings of the code.
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
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
