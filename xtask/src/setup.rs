//! Installs what a fresh machine of this kind lacks, idempotently:
//! Debian packages for the tests and demo, nightly's rust-src, bpf-linker built against
//! nightly's own LLVM (kept outside target/ so `cargo clean` does not rebuild it), and bpffs.
use std::{
    env, ffi::OsString, fs, io::Write as _, os::unix::fs::symlink, path::PathBuf, process::Command,
};

use anyhow::{Context as _, bail};

/// Debian packages the tests and the demo use as independent tools.
const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    // The distributed router's ICMP errors, read as an operator reads them.
    "traceroute",
    "procps",
    "tcpdump",
    "tshark",
    "iperf3",
    "ethtool",
    "util-linux",
    "python3-scapy",
    "bpftool",
    // Real guests (tests and demo): QEMU, Debian's kernel with its virtio modules, busybox
    // for the initramfs, cpio to pack it.
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    "cpio",
    // A real DHCPv6 client (dhclient -6) for nv's DHCPv6 server: the guests' busybox has none.
    "isc-dhcp-client",
    // The unit file's check (systemd-analyze) and the man pages' (man -l).
    "systemd",
    "man-db",
    // A real Prometheus scrapes the agents in the tests (promtool checks metrics and alert
    // rules); curl asks its query API from inside the test's namespace.
    "prometheus",
    "curl",
    // Cluster mode: a real etcd (server and etcdctl) in the tests; the etcd client crate
    // compiles etcd's protocol with protoc and its well-known types.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    // nm: the test that nvctl links neither aya nor redb reads its symbols.
    "binutils",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_FEATURE: &str = "llvm-22";

/// Where nv's tools live: `NV_TOOLS_DIR`, else ~/.cache/nv.
pub fn tools_dir() -> PathBuf {
    env::var_os("NV_TOOLS_DIR").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/nv"),
        PathBuf::from,
    )
}

pub fn path_with_tools() -> anyhow::Result<OsString> {
    let mut paths = vec![tools_dir().join("bin")];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    Ok(env::join_paths(paths)?)
}

pub fn run() -> anyhow::Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the tools' own output goes; shown when a step fails.
fn log_path() -> PathBuf {
    tools_dir().join("setup.log")
}

/// Runs one step of setup: one line on the terminal, the tool's output in the log.
fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let log = log_path();
    fs::create_dir_all(tools_dir())?;
    eprintln!("setup: {what}");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    writeln!(file, "==== {what}: {cmd:?}")?;
    let st = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("run {cmd:?}"))?;
    if !st.success() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("  | {line}");
        }
        bail!(
            "setup: {what} failed ({st}); the whole output is in {}",
            log.display()
        );
    }
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map_or(true, |o| {
                    !String::from_utf8_lossy(&o.stdout).contains("install ok installed")
                })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(
        "updating the Debian package lists",
        Command::new("apt-get").arg("update").arg("-qq"),
    )?;
    step(
        &format!("installing Debian packages: {}", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed for the eBPF crate (rustup toolchain list)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step(
        "adding rust-src to nightly",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    let dir = tools_dir();
    let llvm = dir.join("llvm");
    let bin = dir.join("bin/bpf-linker");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.ends_with("-nightly"))
        .with_context(|| format!("no libLLVM.so.*-nightly in {}", lib.display()))?;
    // bpf-linker loads nightly's libLLVM through these links at run time.
    fs::create_dir_all(llvm.join("lib"))?;
    for name in ["libLLVM.so".to_owned(), libllvm.clone()] {
        let link = llvm.join("lib").join(&name);
        if fs::read_link(&link).ok() != Some(lib.join(&libllvm)) {
            let _ = fs::remove_file(&link);
            symlink(lib.join(&libllvm), &link)?;
        }
    }
    let works = Command::new(&bin).arg("--version").output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    });
    if works {
        return Ok(());
    }
    step(
        &format!(
            "building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (a minute or two, once)"
        ),
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                LLVM_FEATURE,
                "--force",
                "--root",
            ])
            .arg(&dir)
            .env("LLVM_PREFIX", &llvm),
    )
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    step(
        "mounting bpffs at /sys/fs/bpf",
        Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
    )
}
