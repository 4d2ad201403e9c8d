//! `cargo xtask install`: puts nv on a host the way systemd runs it: binaries, the unit, the
//! commented default config (never over an existing one), man pages, bash completion and the
//! `nv` group whose members may use nvctl.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

pub struct Options {
    pub prefix: PathBuf,
    pub destdir: PathBuf,
}

fn under(destdir: &Path, path: &Path) -> PathBuf {
    destdir.join(path.strip_prefix("/").unwrap_or(path))
}

fn put(dst: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // Written aside and renamed: a running agent's binary is replaced, not truncated.
    let tmp = dst.with_extension("nv-new");
    fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, dst).with_context(|| format!("install {}", dst.display()))?;
    println!("  {}", dst.display());
    Ok(())
}

/// What `nvctl args` prints (a man page, a completion script).
fn output_of(bin: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    Ok(crate::setup::output(Command::new(bin).args(args))?.into_bytes())
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    crate::cargo(&["build", "--release", "--quiet", "-p", "nv-agent", "--bins"])?;
    let release = root.join("target/release");
    let (agent, nvctl) = (release.join("nv-agent"), release.join("nvctl"));
    let d = &o.destdir;
    let prefix = &o.prefix;
    println!("installing into {}:", d.display());
    let sbin = prefix.join("sbin/nv-agent");
    put(&under(d, &sbin), &fs::read(&agent)?, 0o755)?;
    put(
        &under(d, &prefix.join("bin/nvctl")),
        &fs::read(&nvctl)?,
        0o755,
    )?;
    let unit = fs::read_to_string(root.join("dist/nv-agent.service"))?.replace(
        "ExecStart=/usr/local/sbin/nv-agent",
        &format!("ExecStart={}", sbin.display()),
    );
    put(
        &under(d, Path::new("/etc/systemd/system/nv-agent.service")),
        unit.as_bytes(),
        0o644,
    )?;
    let config = under(d, Path::new("/etc/nv/agent.toml"));
    if config.exists() {
        println!("  {} kept (it exists)", config.display());
    } else {
        put(&config, &fs::read(root.join("dist/agent.toml"))?, 0o640)?;
    }
    let man = prefix.join("share/man");
    put(
        &under(d, &man.join("man1/nvctl.1")),
        &output_of(&nvctl, &["man", "nvctl"])?,
        0o644,
    )?;
    put(
        &under(d, &man.join("man8/nv-agent.8")),
        &output_of(&nvctl, &["man", "nv-agent"])?,
        0o644,
    )?;
    put(
        &under(d, &prefix.join("share/bash-completion/completions/nvctl")),
        &output_of(&nvctl, &["completions", "bash"])?,
        0o644,
    )?;
    if d == Path::new("/") {
        let known = Command::new("getent").args(["group", "nv"]).output()?;
        if known.status.success() {
            println!("  group nv exists");
        } else {
            let made = Command::new("groupadd").args(["--system", "nv"]).status()?;
            if !made.success() {
                bail!("groupadd --system nv failed ({made})");
            }
            println!("  group nv created: its members may use nvctl");
        }
        println!(
            "next: set `uplink` in /etc/nv/agent.toml, then `systemctl daemon-reload && systemctl enable --now nv-agent`"
        );
    } else {
        println!("  (group nv not created: --destdir is not /)");
    }
    Ok(())
}
