//! Builds the benchmark's peer (nv-bench-ebpf) as nv-agent's build script builds nv's datapath,
//! and places it in `OUT_DIR` for `include_bytes_aligned!`.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NV_TOOLS_DIR");
    let tools = env::var_os("NV_TOOLS_DIR").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cache/nv"),
        PathBuf::from,
    );
    let mut paths = vec![tools.join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nv-bench-ebpf",
            root_dir: "../nv-bench-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
