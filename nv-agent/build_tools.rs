// Shared by nv-agent's and nv-tests' build scripts (`include!`): both build eBPF with aya-build.

/// Puts the tool directory that `cargo xtask setup` fills (bpf-linker; outside target/, so
/// `cargo clean` does not rebuild it) first on PATH, and quiets the eBPF crate's own cargo: it
/// reports every crate it compiles, and aya-build shows each of its lines as a warning of the
/// package, hundreds of lines on a first build. Quiet, it still reports errors and warnings of
/// the code.
fn ebpf_tools_on_path() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NV_TOOLS_DIR");
    let tools = std::env::var_os("NV_TOOLS_DIR").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nv"),
        std::path::PathBuf::from,
    );
    let mut paths = vec![tools.join("bin")];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PATH", std::env::join_paths(paths)?) };
    // SAFETY: as above.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    Ok(())
}
