//! A real etcd (Debian's `etcd-server`), one member or three, started in a test's namespace
//! and stopped (by pid) when dropped; `etcdctl` from the same namespace.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

pub struct Member {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct Etcd {
    ns: String,
    pub members: Vec<Member>,
    initial: String,
    log_dir: PathBuf,
}

impl Etcd {
    /// Starts `n` members in `ns`, all on `ip` (an address of that namespace), and waits until
    /// the cluster answers.
    pub fn start(ns: &Netns, dir: &Path, ip: &str, n: u16) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir)?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://{ip}:{}", 22_379 + 2 * i),
                peer_url: format!("http://{ip}:{}", 22_380 + 2 * i),
                dir: dir.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            ns: ns.name.clone(),
            members,
            initial,
            log_dir: dir.to_owned(),
        };
        for i in 0..etcd.members.len() {
            etcd.start_member(i)?;
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// The client URLs, comma-separated, as `etcd_endpoints` takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` (again: its data directory is kept).
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.log_dir.join(format!("m{i}.log")))?;
        let m = &mut self.members[i];
        std::fs::create_dir_all(&m.dir)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcd"])
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.dir.display()))
            .arg(format!("--listen-client-urls={}", m.client_url))
            .arg(format!("--advertise-client-urls={}", m.client_url))
            .arg(format!("--listen-peer-urls={}", m.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer_url))
            .arg(format!("--initial-cluster={}", self.initial))
            .args([
                "--initial-cluster-state=new",
                "--initial-cluster-token=nv-test",
                "--max-txn-ops=20000",
                "--max-request-bytes=33554432",
                "--logger=zap",
                "--log-level=error",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd (Debian's etcd-server; `cargo xtask setup` installs it)")?;
        m.child = Some(child);
        Ok(())
    }

    /// Kills member `i` (SIGKILL, by its pid).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until a write and a read succeed through the members that run.
    pub fn wait_healthy(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ctl(&["put", "/nv-test/health", "ok"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = (0..self.members.len())
                    .map(|i| {
                        std::fs::read_to_string(self.log_dir.join(format!("m{i}.log")))
                            .unwrap_or_default()
                    })
                    .collect();
                bail!("etcd not healthy in 30 s: {logs}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The client URLs of the members that run, comma-separated.
    fn running(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl ARGS` against the members that run; stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let running = self.running();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcdctl"])
            .arg(format!("--endpoints={running}"))
            .args(["--command-timeout=5s", "--dial-timeout=2s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .context("run etcdctl (Debian's etcd-client)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `etcdctl ARGS` with `input` on its standard input (`txn`).
    pub fn ctl_stdin(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        let running = self.running();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcdctl"])
            .arg(format!("--endpoints={running}"))
            .args(["--command-timeout=30s", "--dial-timeout=2s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run etcdctl (Debian's etcd-client)")?;
        std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, input.as_bytes())?;
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || !said.starts_with("SUCCESS") {
            bail!(
                "etcdctl {}: {said} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(said)
    }

    /// The store's current revision.
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.ctl(&["get", "/nv-test/health", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"].as_i64().context("revision")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
