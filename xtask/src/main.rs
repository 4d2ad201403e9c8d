//! `cargo xtask setup|test|demo`: the commands a fresh machine needs (see README.md).
mod baseline;
mod install;
mod mutants;
mod setup;

use std::{
    io::{BufRead as _, BufReader},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nv project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (Debian packages, nightly rust-src, bpf-linker, bpffs).
    /// Idempotent; seconds when everything is there.
    Setup,
    /// Set up, then run every check and test: fmt, clippy, unit, program and integration tests.
    Test {
        /// Run the tests this many times in a row (after one build, without fmt and clippy)
        /// and close with how often each test failed: for hunting flaky tests.
        #[arg(long, value_name = "N")]
        repeat: Option<u32>,
        /// Extra arguments for `cargo test` (e.g. a test name filter, or `--test cluster`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then measure nv against the kernel's VXLAN in one run (release build); prints a
    /// table, writes target/bench/results.json and target/bench/e2e.svg.
    Bench {
        /// Tiny counts: checks the benchmark works (part of `cargo xtask test`).
        #[arg(long)]
        smoke: bool,
        /// Also measure another revision's agent and nvctl (built in a worktree under
        /// target/baseline/) beside this tree's, in turns, on the control plane (a million-record
        /// import, its memory, one change's latency): prints each figure's ratio, tree over
        /// baseline, and writes target/bench/baseline.json. E.g. `--baseline HEAD~1`.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
        /// With --baseline: turns of each (the median is compared).
        #[arg(long, default_value_t = 3, requires = "baseline")]
        rounds: u32,
        /// Measure one part only: programs, e2e, pressure, routing, acls, control or cluster.
        #[arg(long, value_name = "PART")]
        only: Option<String>,
        /// End to end: measure only these configurations, comma-separated (e.g.
        /// `nv-encap-tc,cilium-peer,routed-veth`); the goals that need one left out are not shown.
        #[arg(long, value_name = "LIST")]
        configs: Option<String>,
        /// End to end: also record where the CPU time goes (`perf record -a`) during one extra
        /// fixed-rate flood per configuration, not counted in any figure; writes
        /// target/bench/perf/CONFIG.data and prints each one's busiest functions.
        #[arg(long)]
        profile: bool,
    },
    /// Set up, then fuzz every datapath program with random and mutated frames (a short run
    /// is part of `cargo xtask test`).
    Fuzz {
        /// How many frames (each runs through a VM-port program and an uplink program).
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed of the frame generator [default: the time]; a failure prints the one it used.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Set up, then show that the tests guard every isolation check: each is patched out in
    /// turn in a scratch copy (target/mutants), and the tests that must notice are run. Prints
    /// a table; fails when a removal goes unnoticed. About 15 s a check once built.
    Mutants {
        /// Only the checks whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, then install nv on this host (release build): nv-agent, nvctl, the systemd unit,
    /// /etc/nv/agent.toml (kept if it exists), man pages, bash completion, the `nv` group.
    Install {
        /// Where binaries and man pages go (`sbin/`, `bin/`, `share/`).
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        /// Root of the tree to install into, for packaging or a test [default: /].
        #[arg(long, default_value = "/")]
        destdir: std::path::PathBuf,
    },
    /// Set up, then run the two-host demo: RED and BLUE tenants with the same addresses.
    Demo {
        /// Leave the hosts and agents running for exploring (prints how to remove them).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { repeat, args } => {
            setup::run()?;
            require_root("the tests load BPF programs and create network namespaces")?;
            if repeat.is_none() {
                cargo(&["fmt", "--all", "--", "--check"])
                    .context("code is not formatted: run `cargo fmt --all`")?;
                cargo(&["clippy", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
                clippy_ebpf()?;
            }
            layout_probe()?;
            cargo(&["build", "--quiet"])?;
            // Every test binary runs even after one failed: one run names every failure.
            let mut test = vec!["test", "--no-fail-fast"];
            test.extend(args.iter().map(String::as_str));
            match repeat {
                None => run_suite(&test, args.is_empty()).map(drop),
                Some(n) => repeat_suite(&test, args.is_empty(), n),
            }
        }
        Task::Fuzz { packets, seed } => {
            setup::run()?;
            require_root("fuzzing loads BPF programs and creates a network namespace")?;
            let packets = packets.to_string();
            let seed = seed.map(|s| s.to_string());
            let mut args = vec!["--packets", &packets];
            if let Some(seed) = &seed {
                args.extend(["--seed", seed]);
            }
            run_tool("nv-fuzz", Build::Release, &args)
        }
        Task::Bench {
            smoke,
            baseline,
            rounds,
            only,
            configs,
            profile,
        } => {
            setup::run()?;
            require_root("the benchmark loads BPF programs and creates network namespaces")?;
            let baseline_bin = baseline.as_deref().map(baseline::build).transpose()?;
            cargo(&["build", "--release", "--quiet"])?;
            let rounds = rounds.to_string();
            let mut args: Vec<&str> = Vec::new();
            if smoke {
                args.push("--smoke");
            }
            if let Some(part) = &only {
                args.extend(["--only", part]);
            }
            if let Some(list) = &configs {
                args.extend(["--configs", list]);
            }
            if profile {
                args.push("--profile");
            }
            let baseline_dir = baseline_bin.map(|b| b.display().to_string());
            if let (Some(dir), Some(rev)) = (&baseline_dir, &baseline) {
                args.extend([
                    "--baseline-bin",
                    dir,
                    "--baseline-rev",
                    rev,
                    "--rounds",
                    &rounds,
                ]);
            }
            let args = &args[..];
            // The agent and nvctl measured are the release builds.
            // SAFETY: single-threaded at this point.
            unsafe { std::env::set_var("NV_BIN_DIR", "target/release") };
            run_tool("nv-bench", Build::Release, args)
        }
        Task::Mutants { only } => {
            setup::run()?;
            require_root("the tests load BPF programs and create network namespaces")?;
            mutants::run(only.as_deref())
        }
        Task::Install { prefix, destdir } => {
            setup::run()?;
            install::run(&install::Options { prefix, destdir })
        }
        Task::Demo { keep } => {
            setup::run()?;
            require_root("the demo loads BPF programs and creates network namespaces")?;
            cargo(&["build", "--quiet"])?;
            run_tool(
                "nv-demo",
                Build::Debug,
                if keep { &["--keep"] } else { &[] },
            )
        }
    }
}

/// Builds the nv-agent whose maps have another layout and one more counter (nv-common's
/// `layout-probe` feature) into target/layout-probe, for the upgrade test. It shares the
/// workspace's target directory (only nv-common, nv-agent and the eBPF object differ), so the
/// normal build that follows only links again.
fn layout_probe() -> anyhow::Result<()> {
    cargo(&[
        "build",
        "--quiet",
        "-p",
        "nv-agent",
        "--bin",
        "nv-agent",
        "--features",
        "layout-probe",
    ])?;
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let dir = target.join("layout-probe");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(target.join("debug/nv-agent"), dir.join("nv-agent"))
        .context("copy the layout-probe nv-agent")?;
    Ok(())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    let uid = String::from_utf8(Command::new("id").arg("-u").output()?.stdout)?;
    if uid.trim() != "0" {
        bail!("run this as root: {why}");
    }
    Ok(())
}

/// One run of the suite: the benchmark's smoke run (with `smoke`), then `cargo test` with
/// `test`'s arguments. Returns the tests that failed, as `binary: test`.
fn run_suite(test: &[&str], smoke: bool) -> anyhow::Result<Vec<String>> {
    if smoke {
        // The benchmark is not a test, but it must not rot: a smoke run with tiny
        // counts (its figures mean nothing; `cargo xtask bench` measures).
        println!("benchmark smoke run (tiny counts, not measurements):");
        run_tool(
            "nv-bench",
            Build::Debug,
            &["--smoke", "--out", "target/bench-smoke"],
        )?;
    }
    cargo_test(test)
}

/// Runs the suite `n` times in a row, whatever fails, then says how often each test failed;
/// an error if any did.
fn repeat_suite(test: &[&str], smoke: bool, n: u32) -> anyhow::Result<()> {
    let mut failures = std::collections::BTreeMap::<String, Vec<u32>>::new();
    let started = std::time::Instant::now();
    for run in 1..=n {
        println!("=== repetition {run} of {n} ===");
        match run_suite(test, smoke) {
            Ok(_) => {}
            Err(e) => match e.downcast::<Failed>() {
                Ok(Failed(tests)) => {
                    for t in tests {
                        failures.entry(t).or_default().push(run);
                    }
                }
                Err(e) => {
                    failures
                        .entry(format!("(the run itself: {e:#})"))
                        .or_default()
                        .push(run);
                }
            },
        }
    }
    println!(
        "=== {n} repetitions in {} s: {} ===",
        started.elapsed().as_secs(),
        if failures.is_empty() {
            "every test passed every time".to_owned()
        } else {
            format!("{} tests failed at least once", failures.len())
        }
    );
    for (t, runs) in &failures {
        println!("  {t}: failed {} of {n} (runs {runs:?})", runs.len());
    }
    if !failures.is_empty() {
        bail!("{} tests failed at least once in {n} runs", failures.len());
    }
    Ok(())
}

/// `cargo test` failed; these tests (`binary: test`) failed in it.
#[derive(Debug)]
struct Failed(Vec<String>);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failed: {}", self.0.join(", "))
    }
}

impl std::error::Error for Failed {}

/// Runs `cargo test`, echoing its output, and closes with one summary line over all test
/// binaries (`tests: N passed, N failed`). Returns the tests that failed (`binary: test`),
/// as the error [`Failed`] when any did.
fn cargo_test(args: &[&str]) -> anyhow::Result<Vec<String>> {
    // cargo says which test binary runs on stderr, the tests report on stdout: one pipe for
    // both keeps them in order.
    let (output, input) = std::io::pipe().context("a pipe for cargo test's output")?;
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .env("PATH", setup::path_with_tools()?)
        .stdout(input.try_clone()?)
        .stderr(input)
        .spawn()
        .context("run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut failures = Vec::new();
    let mut binary = String::new();
    for line in BufReader::new(output).lines() {
        let line = line?;
        println!("{line}");
        if let Some(running) = line.trim().strip_prefix("Running ") {
            // `Running tests/cluster.rs (target/debug/deps/cluster-...)`
            running
                .split(' ')
                .next()
                .unwrap_or(running)
                .clone_into(&mut binary);
        }
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            failures.push(format!("{binary}: {name}"));
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !failures.is_empty() {
        return Err(Failed(failures).into());
    }
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(failures)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    Debug,
    Release,
}

/// Runs one of the test bed's binaries (demo, bench, fuzz) with `args`.
fn run_tool(bin: &str, build: Build, args: &[&str]) -> anyhow::Result<()> {
    let mut run = vec!["run", "--quiet", "--package", "nv-tests", "--bin", bin];
    if build == Build::Release {
        run.push("--release");
    }
    run.push("--");
    run.extend_from_slice(args);
    cargo(&run)
}

/// Runs cargo with the tool directory on PATH (bpf-linker for the eBPF build).
/// Clippy on the eBPF crates (nv's and the benchmark's peer), which build only for BPF with
/// nightly (DESIGN.md), so the workspace's clippy leaves them out.
fn clippy_ebpf() -> anyhow::Result<()> {
    let args = [
        "+nightly",
        "clippy",
        "--quiet",
        "-p",
        "nv-ebpf",
        "-p",
        "nv-bench-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ];
    let status = Command::new("cargo")
        .args(args)
        .env("PATH", setup::path_with_tools()?)
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("run cargo +nightly clippy on the eBPF crates")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .env("PATH", setup::path_with_tools()?)
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
