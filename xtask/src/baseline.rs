//! `cargo xtask bench --baseline REV`: the release binaries of another revision, built in a
//! git worktree of their own under target/baseline/, so the benchmark can run them beside
//! this tree's in one invocation (these machines are shared and noisy: only a ratio measured
//! side by side means something).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The directory of REV's release `nv-agent` and `nvctl`, built if need be.
pub fn build(rev: &str) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sha = git(
        &root,
        &["rev-parse", "--verify", &format!("{rev}^{{commit}}")],
    )
    .with_context(|| format!("'{rev}' is not a revision of this repository"))?;
    let short = &sha[..12];
    let tree = root.join("target/baseline").join(short);
    if !tree.join("Cargo.toml").exists() {
        std::fs::create_dir_all(tree.parent().context("parent")?)?;
        // A worktree left by an interrupted run is in git's list but not on disk.
        git(&root, &["worktree", "prune"])?;
        git(
            &root,
            &[
                "worktree",
                "add",
                "--detach",
                &tree.display().to_string(),
                &sha,
            ],
        )?;
    }
    println!(
        "baseline {rev} ({short}): building its release binaries in {}",
        tree.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&tree)
        .args(["build", "--release", "--quiet", "-p", "nv-agent", "--bins"])
        .env("PATH", crate::setup::path_with_tools()?)
        .env("CARGO_TARGET_DIR", tree.join("target"))
        .status()
        .context("run cargo build for the baseline")?;
    if !status.success() {
        bail!("the baseline {rev} ({short}) does not build ({status})");
    }
    Ok(tree.join("target/release"))
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .context("run git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
