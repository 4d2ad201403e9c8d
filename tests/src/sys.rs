//! Running the independent tools the tests lean on (`ip`, `tcpdump`, `tshark`, `ping`).
use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// Fails loudly unless running as root: namespaces, bpffs and program loading need it.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this test needs root (network namespaces, bpffs, BPF programs): run `cargo xtask test` as root"
        );
    }
    Ok(())
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = output(program, args)?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn output(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program} (is it installed? `cargo xtask setup` installs it)")
    })
}

/// Binaries used instead of `NV_BIN_DIR`'s (the benchmark's baseline, in turns with the tree).
static BIN_DIR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// From now on, nv's binaries are `dir`'s (`None`: `NV_BIN_DIR`'s again).
pub fn use_bin_dir(dir: Option<PathBuf>) {
    *BIN_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = dir;
}

/// Where the workspace's binaries are: `NV_BIN_DIR`, or target/debug of this workspace.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = BIN_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
    {
        return dir;
    }
    std::env::var_os("NV_BIN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
        PathBuf::from,
    )
}

/// Path of a workspace binary; fails loudly when it was not built.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace first (`cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// The nv-agent built with the `layout-probe` feature (maps of another layout, one more
/// counter), which `cargo xtask test` builds for the upgrade test.
pub fn probe_agent() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/layout-probe/nv-agent");
    if !path.exists() {
        bail!(
            "{} is missing: `cargo xtask test` builds it (cargo build -p nv-agent --features layout-probe)",
            path.display()
        );
    }
    Ok(path)
}

/// A short prefix unique to this process and call, for namespace and pin names.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "nv{tag}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
