//! A real etcd (Debian's `etcd-server`), one member or three, started in a test's namespace
//! and stopped (by pid) when dropped; `etcdctl` from the same namespace.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
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

/// TCP proxies in front of etcd's members, in their namespace, that can lose one answer: once
/// armed, the first connection whose client has sent a marker (a record's key) often enough
/// (a transaction names its key in its comparison, its write and its read-back) has its
/// request passed on to etcd, which applies it, and every answer on it swallowed. Its client
/// never hears that its write was made: the partition a retried write must survive.
pub struct Proxies {
    pub urls: Vec<String>,
    arming: Arc<Mutex<Arming>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Arming {
    marker: Vec<u8>,
    times: usize,
    /// Bumped at each arming: connections count the marker from then on.
    generation: u64,
    /// A connection lost its answers for this arming.
    fired: bool,
}

impl Proxies {
    /// One proxy per member, listening on `ip` from `port` up (in `ns`).
    pub fn start(ns: &Netns, ip: &str, port: u16, members: &[Member]) -> anyhow::Result<Proxies> {
        let arming: Arc<Mutex<Arming>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut urls = Vec::new();
        let mut threads = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let listen = format!("{ip}:{}", port + u16::try_from(i)?);
            let upstream = m
                .client_url
                .strip_prefix("http://")
                .context("an http:// member")?
                .to_owned();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (ns_path, arming, stop) = (ns.path(), arming.clone(), stop.clone());
            let bind = listen.clone();
            threads.push(thread::spawn(move || {
                let listener = match listen_in(&ns_path, &bind) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut open: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    if let Ok(server) = TcpStream::connect(&upstream)
                        && let Ok(pair) = relay(client, server, &arming)
                    {
                        open.extend(pair);
                    }
                }
                for s in open {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }));
            ready_rx
                .recv()
                .context("a proxy thread")?
                .with_context(|| format!("a proxy's listener on {listen}"))?;
            urls.push(format!("http://{listen}"));
        }
        Ok(Proxies {
            urls,
            arming,
            stop,
            threads,
        })
    }

    /// The answers of the first connection whose client sends `marker` `times` times from now
    /// on are lost.
    pub fn lose_answer_to(&self, marker: &str, times: usize) {
        let mut a = self
            .arming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        a.marker = marker.as_bytes().to_vec();
        a.times = times;
        a.generation += 1;
        a.fired = false;
    }

    /// Whether an answer was lost since the last arming.
    pub fn fired(&self) -> bool {
        self.arming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fired
    }
}

fn listen_in(ns_path: &str, listen: &str) -> std::io::Result<TcpListener> {
    let f = std::fs::File::open(ns_path)?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let l = TcpListener::bind(listen)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Relays one connection both ways until either end closes; the answers stop once this
/// connection fires the arming.
fn relay(
    client: TcpStream,
    server: TcpStream,
    arming: &Arc<Mutex<Arming>>,
) -> std::io::Result<[TcpStream; 2]> {
    client.set_nonblocking(false)?;
    let swallow = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut c_out) = (client.try_clone()?, client.try_clone()?);
    let (mut s_in, mut s_out) = (server.try_clone()?, server.try_clone()?);
    {
        let (arming, swallow) = (arming.clone(), swallow.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut seen, mut generation) = (Vec::new(), 0);
            loop {
                let n = match c_in.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                {
                    let mut a = arming
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if a.generation != generation {
                        generation = a.generation;
                        seen.clear();
                    }
                    if !a.fired && !a.marker.is_empty() {
                        seen.extend_from_slice(&buf[..n]);
                        let count = seen
                            .windows(a.marker.len())
                            .filter(|w| *w == a.marker.as_slice())
                            .count();
                        if count >= a.times {
                            a.fired = true;
                            swallow.store(true, Ordering::Relaxed);
                        }
                    }
                }
                if s_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = s_out.shutdown(std::net::Shutdown::Both);
        });
    }
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match s_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if swallow.load(Ordering::Relaxed) {
                continue;
            }
            if c_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = c_out.shutdown(std::net::Shutdown::Both);
    });
    Ok([client, server])
}

impl Drop for Proxies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
