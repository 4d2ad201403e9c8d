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
    /// TLS with client certificates (and, once [`Etcd::enable_rbac`] ran, etcd's roles):
    /// etcdctl then speaks as root.
    pub pki: Option<Pki>,
}

/// A CA and the certificates of a test cluster, made with openssl (an independent tool):
/// etcd's server certificate for one address, and a client certificate per identity, whose
/// CN is its name (etcd's user with `--client-cert-auth`).
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A new CA in `dir`, etcd's certificate for `server_ip`, and one for each of `clients`.
    pub fn make(dir: &Path, server_ip: &str, clients: &[&str]) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let pki = Pki {
            dir: dir.to_owned(),
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        pki.openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &["-days", "2", "-subj", "/CN=nv-test-ca"],
            ]
            .concat(),
            "ca",
        )?;
        pki.sign(
            "etcd",
            &format!("serverAuth,clientAuth\nsubjectAltName=IP:{server_ip},IP:127.0.0.1"),
        )?;
        for c in clients {
            pki.sign(c, "clientAuth")?;
        }
        Ok(pki)
    }

    /// `openssl ARGS -keyout NAME.key -out NAME.pem` (or `.csr`) in the directory.
    fn openssl(&self, args: &[&str], name: &str) -> anyhow::Result<()> {
        let out_ext = if args.contains(&"-x509") {
            "pem"
        } else {
            "csr"
        };
        let out = Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .args([
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.{out_ext}"),
            ])
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A key and a certificate with CN `name`, signed by the CA, with `extensions` (lines of
    /// an extension file: key usage, names).
    fn sign(&self, name: &str, extensions: &str) -> anyhow::Result<()> {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        self.openssl(
            &[&["req"], &ec[..], &["-subj", &format!("/CN={name}")]].concat(),
            name,
        )?;
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext, format!("extendedKeyUsage={extensions}\n"))?;
        let out = Command::new("openssl")
            .current_dir(&self.dir)
            .args([
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
            ])
            .args(["-CAkey", "ca.key", "-CAcreateserial", "-days", "2"])
            .args([
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ])
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!(
                "openssl x509 {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}.pem"))
    }

    pub fn key(&self, who: &str) -> PathBuf {
        self.dir.join(format!("{who}.key"))
    }

    /// nvctl's (and etcdctl's) settings for speaking as `who` (`None`: no certificate).
    pub fn env(&self, endpoints: &str, who: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![
            ("NV_ETCD_ENDPOINTS".to_owned(), endpoints.to_owned()),
            (
                "NV_ETCD_CA_FILE".to_owned(),
                self.ca().display().to_string(),
            ),
        ];
        if let Some(who) = who {
            env.push((
                "NV_ETCD_CERT_FILE".to_owned(),
                self.cert(who).display().to_string(),
            ));
            env.push((
                "NV_ETCD_KEY_FILE".to_owned(),
                self.key(who).display().to_string(),
            ));
        }
        env
    }
}

impl Etcd {
    /// Starts `n` members in `ns`, all on `ip` (an address of that namespace), and waits until
    /// the cluster answers.
    pub fn start(ns: &Netns, dir: &Path, ip: &str, n: u16) -> anyhow::Result<Etcd> {
        Self::start_with(ns, dir, ip, n, None)
    }

    /// As [`Etcd::start`], over TLS with client certificates from `pki` (`None`: plain HTTP,
    /// as for a local test cluster).
    pub fn start_with(
        ns: &Netns,
        dir: &Path,
        ip: &str,
        n: u16,
        pki: Option<Pki>,
    ) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir)?;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://{ip}:{}", 22_379 + 2 * i),
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
            pki,
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
        let tls: Vec<String> = self.pki.as_ref().map_or_else(Vec::new, |p| {
            vec![
                format!("--cert-file={}", p.cert("etcd").display()),
                format!("--key-file={}", p.key("etcd").display()),
                format!("--trusted-ca-file={}", p.ca().display()),
                "--client-cert-auth".to_owned(),
            ]
        });
        let m = &mut self.members[i];
        std::fs::create_dir_all(&m.dir)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcd"])
            .args(&tls)
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

    /// `etcdctl ARGS` against the members that run, as root (with TLS); stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ctl_as(Some("root"), args)
    }

    /// `etcdctl` with `who`'s certificate (`None`: none; without TLS, ignored).
    fn etcdctl(&self, who: Option<&str>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "etcdctl"])
            .arg(format!("--endpoints={}", self.running()))
            .env("ETCDCTL_API", "3");
        if let Some(p) = &self.pki {
            cmd.arg(format!("--cacert={}", p.ca().display()));
            if let Some(who) = who {
                cmd.arg(format!("--cert={}", p.cert(who).display()))
                    .arg(format!("--key={}", p.key(who).display()));
            }
        }
        cmd
    }

    /// `etcdctl ARGS` as `who` (its certificate; `None`: none); stdout.
    pub fn ctl_as(&self, who: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .etcdctl(who)
            .args(["--command-timeout=5s", "--dial-timeout=2s"])
            .args(args)
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
        let mut child = self
            .etcdctl(Some("root"))
            .args(["--command-timeout=30s", "--dial-timeout=2s"])
            .args(args)
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

    /// etcd's users and roles for nv, by the README's script (`dist/etcd-rbac.sh`) as root:
    /// `hosts` read `/nv/v1/` and write their own key, nv-admin writes the records.
    pub fn enable_rbac(&self, hosts: &[&str]) -> anyhow::Result<String> {
        let p = self
            .pki
            .as_ref()
            .context("etcd's roles need TLS and client certificates")?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/etcd-rbac.sh");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh"])
            .arg(&script)
            .args(hosts)
            .env("ETCDCTL_ENDPOINTS", self.running())
            .env("ETCDCTL_CACERT", p.ca())
            .env("ETCDCTL_CERT", p.cert("root"))
            .env("ETCDCTL_KEY", p.key("root"))
            .output()
            .context("run dist/etcd-rbac.sh")?;
        if !out.status.success() {
            bail!(
                "dist/etcd-rbac.sh: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
