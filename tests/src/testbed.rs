//! The two-host topology of the foundation tests and the demo:
//!
//! ```text
//!  [RED-1 10.0.0.1] [BLUE-1 10.0.0.1]          [RED-2 10.0.0.2] [BLUE-2 10.0.0.2]
//!        red1           blue1                        red2           blue2
//!   host1 (agent, PA 198.18.0.1) --uplink0--[br0 underlay]--uplink0-- host2 (agent, PA 198.18.0.2)
//! ```
//! RED is VSID 5001, BLUE is VSID 6001: the same customer addresses, isolated by VSID.
use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::{
    netns::Netns,
    sys::{bin, require_root, run, unique_prefix},
};

pub const RED_VSID: u32 = 5001;
pub const BLUE_VSID: u32 = 6001;
/// Jumbo underlay, so 1500-byte VM frames fit after the 42 bytes of NVGRE.
pub const UNDERLAY_MTU: &str = "9000";

/// How RED's traffic crosses the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    Encap,
    Rewrite,
}

/// The rewrite PA of the RED VM on the host whose PA is `host_pa` (198.18.0.N -> 198.18.1.N).
pub fn rewrite_pa(host_pa: &str) -> String {
    host_pa.replacen("198.18.0.", "198.18.1.", 1)
}

/// One tenant VM: a namespace with `eth0` behind a veth port on its host.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub vsid: u32,
    pub ca: String,
    pub mac: String,
    /// Port name on the host side.
    pub port: String,
    /// Index into `TwoHosts::hosts` of the host the VM runs on now.
    pub host: usize,
    pub ns: Netns,
}

impl Vm {
    /// Gives the VM's `eth0` the IPv6 address `ca`/64, without duplicate address detection
    /// (nv answers none: the address is usable at once).
    pub fn add_ipv6(&self, ca: &str) -> anyhow::Result<()> {
        let addr = format!("{ca}/64");
        self.ns
            .ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"])?;
        Ok(())
    }
}

/// A VM that is a real guest (QEMU) behind a tap port.
#[derive(Debug)]
pub struct TapVm {
    pub name: &'static str,
    /// Index into `TwoHosts::hosts`.
    pub host: usize,
    pub vsid: u32,
    pub ca: &'static str,
    pub mac: &'static str,
    /// The tap's name on its host.
    pub port: &'static str,
    /// With IP rewrite: the guest's own PA (added to its host as a provider address);
    /// otherwise NVGRE to its host's PA.
    pub rewrite_pa: Option<&'static str>,
}

/// A running agent, killed (by its pid) on drop.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Reaped already (killed by a test): its pid may be another process's by now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling the child we spawned, by its pid, not reaped yet.
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub pa: String,
    pub ns: Netns,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub pin_path: PathBuf,
    pub log: PathBuf,
    pub agent: Option<AgentProcess>,
    /// Extra flags for this host's agent.
    pub agent_args: Vec<String>,
    /// Another build of nv-agent to run (an upgrade); `None`: the workspace's.
    pub agent_bin: Option<PathBuf>,
    /// The agent's open-file limits (soft, hard) as it starts, as systemd would set them;
    /// `None`: the test's own.
    pub agent_nofile: Option<(u64, u64)>,
    /// nvctl's environment on this host: in a cluster over TLS, the operator's etcd
    /// settings (`NV_ETCD_*`), and nvctl then runs in the host's namespace to reach etcd.
    pub nvctl_env: Vec<(String, String)>,
}

impl Host {
    /// Starts this host's agent inside its namespace with `nsenter`, so its bpffs pins live in
    /// the real bpffs and survive its restart, and waits for its socket.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        self.start_agent_with_env(&[])
    }

    /// As `start_agent`, with more environment variables for the agent.
    pub fn start_agent_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let log = fs::File::create(&self.log)?;
        let _ = fs::remove_file(&self.socket);
        let mut cmd = Command::new("nsenter");
        if let Some((soft, hard)) = self.agent_nofile {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit only, in the child between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd
            .arg(format!("--net={}", self.ns.path()))
            .arg(match &self.agent_bin {
                Some(path) => path.clone(),
                None => bin("nv-agent")?,
            })
            .args(["--uplink", "uplink0"])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--api-socket")
            .arg(&self.socket)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(&self.agent_args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn nv-agent through nsenter")?;
        let mut agent = AgentProcess { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!(
                    "nv-agent on {} exited ({status}): {}",
                    self.name,
                    self.agent_log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nv-agent on {} did not open its socket in 20 s: {}",
                    self.name,
                    self.agent_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.agent = Some(agent);
        Ok(())
    }

    pub fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// SIGKILL, as a crash or the OOM killer would: no chance to clean up.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
    }

    /// Runs nvctl expecting a refusal: it fails with one line that mentions `expect`, and
    /// the store is byte for byte what it was.
    pub fn expect_refused(&self, args: &[&str], expect: &str) -> anyhow::Result<()> {
        let before = self.store_files()?;
        let err = match self.nvctl(args) {
            Ok(out) => bail!("nvctl {args:?} succeeded: {out}"),
            Err(e) => e.to_string(),
        };
        if !err.contains(expect) {
            bail!("nvctl {args:?}: expected an error mentioning '{expect}', got: {err}");
        }
        if err.trim().lines().count() != 1 {
            bail!("nvctl {args:?}: error is not one line: {err}");
        }
        if self.store_files()? != before {
            bail!("nvctl {args:?} changed the store");
        }
        Ok(())
    }

    /// Every file of this host's store, by name: to prove a refused change left it alone.
    pub fn store_files(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.state_dir)? {
            let entry = entry?;
            files.push((
                entry.file_name().to_string_lossy().into_owned(),
                fs::read(entry.path())?,
            ));
        }
        files.sort();
        Ok(files)
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `nvctl provider add` of `pa` (in 198.18.0.0/15, or an IPv6 PA in `2001:2::/64`) on the
    /// uplink.
    pub fn add_provider(&self, pa: &str) -> anyhow::Result<String> {
        let len = if pa.contains(':') { 64 } else { 15 };
        self.nvctl(&[
            "provider",
            "add",
            "--pa",
            &format!("{pa}/{len}"),
            "--dev",
            "uplink0",
        ])
    }

    /// Runs `nvctl -o json monitor ARGS` (with a `--count N` among them) on this host in the
    /// background, bounded to 30 s; [`monitor_events`] collects what it printed.
    pub fn monitor(&self, args: &[&str]) -> anyhow::Result<std::process::Child> {
        Ok(Command::new("timeout")
            .arg("30")
            .arg(bin("nvctl")?)
            .arg("--socket")
            .arg(&self.socket)
            .args(["-o", "json", "monitor"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Waits until `n` monitors watch on this host.
    pub fn monitors_become(&self, n: u64) -> anyhow::Result<()> {
        for _ in 0..100 {
            if self.nvctl_json(&["status"])?["monitors"].as_u64() == Some(n) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("{n} monitors never watched on {}", self.name)
    }

    /// Runs nvctl against this host's agent; `Err` carries nvctl's stderr.
    /// nvctl for this host: its agent's socket, and its environment.
    pub fn nvctl_command(&self) -> anyhow::Result<Command> {
        let mut cmd = if self.nvctl_env.is_empty() {
            Command::new(bin("nvctl")?)
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.ns.name]).arg(bin("nvctl")?);
            c
        };
        cmd.arg("--socket").arg(&self.socket);
        cmd.envs(self.nvctl_env.iter().map(|(k, v)| (k, v)));
        Ok(cmd)
    }

    /// `bpftool -j map dump` of the agent's pinned map `name` (e.g. `NV_LOOKUPS`): a JSON list
    /// of entries, keys and values as lists of hex bytes ([`dumped_bytes`]).
    pub fn map_dump(&self, name: &str) -> anyhow::Result<Value> {
        let pin = self.pin_path.join("maps").join(name);
        Ok(serde_json::from_str(&run(
            "bpftool",
            &[
                "-j",
                "map",
                "dump",
                "pinned",
                pin.to_str().context("utf-8 path")?,
            ],
        )?)?)
    }

    pub fn nvctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.nvctl_command()?.args(args).output()?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if said.contains("cannot reach nv-agent") {
                // Say why: the agent's own last words.
                let log = self.agent_log();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                bail!(
                    "{said}; the agent's log ends: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                );
            }
            bail!("{said}");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn nvctl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.nvctl(&all)?)?)
    }

    /// How many lookup records `nvctl lookup list` shows.
    pub fn listed(&self) -> anyhow::Result<usize> {
        Ok(self
            .nvctl_json(&["lookup", "list"])?
            .as_array()
            .context("lookup list is a list")?
            .len())
    }

    /// Datapath counters by name.
    pub fn counters(&self) -> anyhow::Result<HashMap<String, u64>> {
        let v = self.nvctl_json(&["stats"])?;
        let mut out = HashMap::new();
        for c in v.as_array().context("stats is a list")? {
            out.insert(
                c["counter"].as_str().context("counter name")?.to_owned(),
                c["packets"].as_u64().context("packets")?,
            );
        }
        Ok(out)
    }
}

/// The whole topology; everything is removed on drop.
pub struct TwoHosts {
    pub prefix: String,
    pub vms: Vec<Vm>,
    pub hosts: Vec<Host>,
    pub underlay: Netns,
    tmp: PathBuf,
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.stop_agent();
        }
        for h in &self.hosts {
            let _ = nv_agent::datapath::purge(&h.pin_path);
        }
        // VMs, then hosts, then the underlay: their namespaces (and links) go with the fields.
        self.vms.clear();
        self.hosts.clear();
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

fn vm_mac(host: usize, vsid: u32) -> String {
    format!(
        "02:00:00:00:0{}:0{}",
        host + 1,
        if vsid == RED_VSID { 1 } else { 2 }
    )
}

impl TwoHosts {
    /// Builds the namespaces and links and starts both agents; nothing is configured yet.
    pub fn build(tag: &str) -> anyhow::Result<TwoHosts> {
        Self::build_with(tag, &[])
    }

    /// As `build`, with extra flags for both agents (e.g. `--decap-hook tc`).
    pub fn build_with(tag: &str, agent_args: &[&str]) -> anyhow::Result<TwoHosts> {
        Self::build_on(tag, agent_args, UNDERLAY_MTU)
    }

    /// As `build_with`, on an underlay of MTU `underlay_mtu`.
    pub fn build_on(
        tag: &str,
        agent_args: &[&str],
        underlay_mtu: &str,
    ) -> anyhow::Result<TwoHosts> {
        let mut bed = Self::build_bare_on(tag, underlay_mtu)?;
        for h in &mut bed.hosts {
            h.agent_args = agent_args.iter().map(|a| (*a).to_owned()).collect();
            h.start_agent()?;
        }
        Ok(bed)
    }

    /// Builds the namespaces and links only: no agent, for the kernel's own baselines.
    pub fn build_bare(tag: &str) -> anyhow::Result<TwoHosts> {
        Self::build_bare_on(tag, UNDERLAY_MTU)
    }

    /// Cluster mode: `hosts` hosts (VMs on the first two), a `members`-member etcd in the
    /// underlay (at 198.18.255.254), each host an address of its own on the underlay to reach
    /// it (198.18.254.N, not a provider address), and agents following etcd as `hostN`.
    /// `hosts` hosts whose agents follow a real etcd of `members` members over TLS, each with
    /// a client certificate whose CN is its host name, under etcd's roles for nv (the
    /// README's `dist/etcd-rbac.sh`): hosts read the records, nvctl writes them as the
    /// operator (nv-admin), from any host's namespace.
    pub fn build_cluster(
        tag: &str,
        hosts: usize,
        members: u16,
    ) -> anyhow::Result<(TwoHosts, crate::etcd::Etcd)> {
        Self::build_cluster_with(tag, hosts, members, true)
    }

    /// As [`TwoHosts::build_cluster`]; `secure` false: plain HTTP, no roles (a local test
    /// cluster, where any host may write records through its agent).
    pub fn build_cluster_with(
        tag: &str,
        hosts: usize,
        members: u16,
        secure: bool,
    ) -> anyhow::Result<(TwoHosts, crate::etcd::Etcd)> {
        let mut bed = Self::build_hosts(tag, UNDERLAY_MTU, hosts)?;
        bed.underlay
            .ip(&["addr", "add", "198.18.255.254/15", "dev", "br0"])?;
        for (i, h) in bed.hosts.iter().enumerate() {
            h.ns.ip(&[
                "addr",
                "add",
                &format!("198.18.254.{}/15", i + 1),
                "dev",
                "uplink0",
            ])?;
        }
        let names: Vec<String> = bed.hosts.iter().map(|h| h.name.clone()).collect();
        let pki = if secure {
            let mut clients = vec!["root", "nv-admin", "stranger", "host10"];
            clients.extend(names.iter().map(String::as_str));
            Some(crate::etcd::Pki::make(
                &bed.tmp.join("pki"),
                "198.18.255.254",
                &clients,
            )?)
        } else {
            None
        };
        let etcd = crate::etcd::Etcd::start_with(
            &bed.underlay,
            &bed.tmp.join("etcd"),
            "198.18.255.254",
            members,
            pki,
        )?;
        if let Some(pki) = &etcd.pki {
            let mut rbac: Vec<&str> = names.iter().map(String::as_str).collect();
            // A host that is not in the bed, whose name extends host1's.
            rbac.push("host10");
            etcd.enable_rbac(&rbac)?;
            for h in &mut bed.hosts {
                h.nvctl_env = pki.env(&etcd.endpoints(), Some("nv-admin"));
            }
        }
        for h in &mut bed.hosts {
            h.agent_args = vec![
                "--etcd-endpoints".into(),
                etcd.endpoints(),
                "--host-name".into(),
                h.name.clone(),
            ];
            if let Some(pki) = &etcd.pki {
                for (flag, file) in [
                    ("--etcd-ca-file", pki.ca()),
                    ("--etcd-cert-file", pki.cert(&h.name)),
                    ("--etcd-key-file", pki.key(&h.name)),
                ] {
                    h.agent_args.push(flag.into());
                    h.agent_args.push(file.display().to_string());
                }
            }
            h.start_agent()?;
        }
        Ok((bed, etcd))
    }

    fn build_bare_on(tag: &str, underlay_mtu: &str) -> anyhow::Result<TwoHosts> {
        Self::build_hosts(tag, underlay_mtu, 2)
    }

    fn build_hosts(tag: &str, underlay_mtu: &str, hosts: usize) -> anyhow::Result<TwoHosts> {
        require_root()?;
        let prefix = unique_prefix(tag);
        let tmp = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&tmp)?;
        let underlay = Netns::new(&format!("{prefix}-ul"))?;
        let mut bed = TwoHosts {
            prefix: prefix.clone(),
            vms: Vec::new(),
            hosts: Vec::new(),
            underlay,
            tmp: tmp.clone(),
        };
        bed.underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        bed.underlay.ip(&["link", "set", "br0", "up"])?;
        // The underlay stands for a switch: bridged frames skip the host firewall's hooks
        // (br_netfilter, on by default where the module is loaded) as they would on a switch.
        for family in ["iptables", "ip6tables", "arptables"] {
            let key = format!("/proc/sys/net/bridge/bridge-nf-call-{family}");
            if std::path::Path::new(&key).exists() {
                bed.underlay.exec(
                    "sysctl",
                    &["-qw", &format!("net.bridge.bridge-nf-call-{family}=0")],
                )?;
            }
        }
        for i in 0..hosts {
            let name = format!("host{}", i + 1);
            let ns = Netns::new(&format!("{prefix}-h{}", i + 1))?;
            let ul = format!("ul{}", i + 1);
            bed.underlay.ip(&[
                "link", "add", &ul, "type", "veth", "peer", "name", "uplink0", "netns", &ns.name,
            ])?;
            bed.underlay.ip(&[
                "link",
                "set",
                &ul,
                "master",
                "br0",
                "mtu",
                underlay_mtu,
                "up",
            ])?;
            ns.ip(&["link", "set", "uplink0", "mtu", underlay_mtu, "up"])?;
            bed.hosts.push(Host {
                pa: format!("198.18.0.{}", i + 1),
                socket: tmp.join(format!("{name}.sock")),
                state_dir: tmp.join(format!("{name}-state")),
                pin_path: PathBuf::from(format!("/sys/fs/bpf/{prefix}-h{}", i + 1)),
                log: tmp.join(format!("{name}-agent.log")),
                name,
                ns,
                agent: None,
                agent_args: Vec::new(),
                agent_bin: None,
                agent_nofile: None,
                nvctl_env: Vec::new(),
            });
        }
        for host in 0..2 {
            for (tenant, vsid) in [("red", RED_VSID), ("blue", BLUE_VSID)] {
                let port = format!("{tenant}{}", host + 1);
                let vm = Vm {
                    name: format!("{}-{}", tenant.to_uppercase(), host + 1),
                    vsid,
                    ca: format!("10.0.0.{}", host + 1),
                    mac: vm_mac(host, vsid),
                    ns: Netns::new(&format!("{prefix}-{port}"))?,
                    port,
                    host,
                };
                bed.plug(&vm, host)?;
                bed.vms.push(vm);
            }
        }
        Ok(bed)
    }

    /// A VM more on `host` (VSID, CA, MAC, port as given), plugged and up; its records are the
    /// caller's.
    pub fn add_vm(
        &mut self,
        name: &str,
        vsid: u32,
        ca: &str,
        mac: &str,
        port: &str,
        host: usize,
    ) -> anyhow::Result<()> {
        let vm = Vm {
            name: name.to_owned(),
            vsid,
            ca: ca.to_owned(),
            mac: mac.to_owned(),
            ns: Netns::new(&format!("{}-{port}", self.prefix))?,
            port: port.to_owned(),
            host,
        };
        self.plug(&vm, host)?;
        self.vms.push(vm);
        Ok(())
    }

    /// Connects a VM's namespace to `host` with a fresh veth pair (VM side `eth0`).
    fn plug(&self, vm: &Vm, host: usize) -> anyhow::Result<()> {
        let h = &self.hosts[host].ns;
        h.ip(&[
            "link",
            "add",
            &vm.port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &vm.ns.name,
        ])?;
        h.ip(&["link", "set", &vm.port, "up"])?;
        vm.ns
            .ip(&["link", "set", "eth0", "address", &vm.mac, "up"])?;
        vm.ns
            .ip(&["addr", "add", &format!("{}/24", vm.ca), "dev", "eth0"])?;
        Ok(())
    }

    /// Cluster mode: every host's provider address, then every VM's record once, typed on
    /// host 1, naming the host of its port.
    pub fn configure_cluster(&self) -> anyhow::Result<()> {
        for h in &self.hosts {
            h.add_provider(&h.pa)?;
        }
        for vm in &self.vms {
            let host = &self.hosts[vm.host];
            self.hosts[0].nvctl(&[
                "lookup",
                "add",
                "--vsid",
                &vm.vsid.to_string(),
                "--ca",
                &vm.ca,
                "--pa",
                &host.pa,
                "--mac",
                &vm.mac,
                "--name",
                &vm.name,
                "--port",
                &vm.port,
                "--host",
                &host.name,
            ])?;
        }
        Ok(())
    }

    /// Configures both hosts through nvctl only: provider addresses, then every VM's record,
    /// local ones with their port.
    pub fn configure(&self) -> anyhow::Result<()> {
        self.configure_with(Translation::Encap)
    }

    /// As `configure`, with RED translated by `red`; BLUE always uses NVGRE. With IP rewrite
    /// every RED VM gets a PA of its own (198.18.1.N on host N), added as a provider address of
    /// its host.
    pub fn configure_with(&self, red: Translation) -> anyhow::Result<()> {
        for h in &self.hosts {
            h.add_provider(&h.pa)?;
            if red == Translation::Rewrite {
                h.add_provider(&rewrite_pa(&h.pa))?;
            }
        }
        for (i, h) in self.hosts.iter().enumerate() {
            for vm in &self.vms {
                let vsid = vm.vsid.to_string();
                let host_pa = &self.hosts[vm.host].pa;
                let (pa, method) = if vm.vsid == RED_VSID && red == Translation::Rewrite {
                    (rewrite_pa(host_pa), "rewrite")
                } else {
                    (host_pa.clone(), "encap")
                };
                let mut args = vec![
                    "lookup", "add", "--vsid", &vsid, "--ca", &vm.ca, "--pa", &pa, "--mac",
                    &vm.mac, "--method", method, "--name", &vm.name,
                ];
                if vm.host == i {
                    args.extend_from_slice(&["--port", &vm.port]);
                }
                h.nvctl(&args)?;
            }
        }
        Ok(())
    }

    /// Each VM's IPv6 record beside its IPv4 one, through nvctl on both hosts (`10.X.0.Y`
    /// becomes `fd00:X::Y`: RED-1 and BLUE-1 `fd00::1`, RED-2 and BLUE-2 `fd00::2`), and the
    /// address in the VM.
    pub fn add_ipv6_records(&self) -> anyhow::Result<()> {
        for (i, h) in self.hosts.iter().enumerate() {
            for vm in &self.vms {
                let ca = ipv6_of(&vm.ca);
                let vsid = vm.vsid.to_string();
                let pa = &self.hosts[vm.host].pa;
                let mut args = vec![
                    "lookup", "add", "--vsid", &vsid, "--ca", &ca, "--pa", pa, "--mac", &vm.mac,
                    "--method", "encap", "--name", &vm.name,
                ];
                if vm.host == i {
                    args.extend(["--port", &vm.port]);
                }
                h.nvctl(&args)?;
            }
        }
        for vm in &self.vms {
            vm.add_ipv6(&ipv6_of(&vm.ca))?;
        }
        Ok(())
    }

    /// Plugs a real guest's port: a tap on `host` (created as libvirt does before it starts
    /// QEMU), and the guest's record on both hosts through nvctl, with the port on its own.
    pub fn plug_tap(&self, tap: &TapVm) -> anyhow::Result<()> {
        crate::guest::create_tap(&self.hosts[tap.host].ns.name, tap.port)?;
        let home = &self.hosts[tap.host];
        let (pa, method) = match tap.rewrite_pa {
            Some(pa) => {
                home.add_provider(pa)?;
                (pa, "rewrite")
            }
            None => (home.pa.as_str(), "encap"),
        };
        let vsid = tap.vsid.to_string();
        for (i, h) in self.hosts.iter().enumerate() {
            let mut args = vec![
                "lookup", "add", "--vsid", &vsid, "--ca", tap.ca, "--pa", pa, "--mac", tap.mac,
                "--method", method, "--name", tap.name,
            ];
            if i == tap.host {
                args.extend(["--port", tap.port]);
            }
            h.nvctl(&args)?;
        }
        Ok(())
    }

    /// The IPv6 record of the guest behind `tap` (`ca`, NVGRE), beside its IPv4 one, on both
    /// hosts through nvctl.
    pub fn plug_tap_ipv6(&self, tap: &TapVm, ca: &str) -> anyhow::Result<()> {
        let vsid = tap.vsid.to_string();
        let pa = &self.hosts[tap.host].pa;
        for (i, h) in self.hosts.iter().enumerate() {
            let mut args = vec![
                "lookup", "add", "--vsid", &vsid, "--ca", ca, "--pa", pa, "--mac", tap.mac,
                "--method", "encap", "--name", tap.name,
            ];
            if i == tap.host {
                args.extend(["--port", tap.port]);
            }
            h.nvctl(&args)?;
        }
        Ok(())
    }

    /// How to boot the guest behind `tap` (its MTU the kernel's default unless `mtu`).
    pub fn guest_spec(&self, tap: &TapVm, mtu: Option<u32>) -> crate::guest::Spec {
        crate::guest::Spec {
            name: tap.name.into(),
            host_ns: self.hosts[tap.host].ns.name.clone(),
            tap: tap.port.into(),
            mac: tap.mac.into(),
            ip: format!("{}/24", tap.ca),
            mtu,
        }
    }

    pub fn vm(&self, name: &str) -> &Vm {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .expect("known VM name")
    }

    /// Pings `dst` from a VM: `count` echo requests, 0.2 s apart, 1 s wait; returns replies.
    pub fn ping(&self, from: &str, dst: &str, count: u32) -> anyhow::Result<u32> {
        self.ping_with(from, dst, count, &[])
    }

    /// As [`TwoHosts::ping`], with more of ping's options (`-p PATTERN`, `-t TTL`).
    pub fn ping_with(
        &self,
        from: &str,
        dst: &str,
        count: u32,
        options: &[&str],
    ) -> anyhow::Result<u32> {
        let count = count.to_string();
        let mut args = vec!["-c", &count, "-i", "0.2", "-W", "1", "-q"];
        args.extend_from_slice(options);
        args.push(dst);
        let out = self.vm(from).ns.exec_output("ping", &args)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let received = text
            .split(',')
            .find_map(|p| p.trim().strip_suffix(" received").map(str::to_owned))
            .with_context(|| format!("unexpected ping output: {text}"))?;
        Ok(received.trim().parse()?)
    }

    /// Migrates a VM to another host, or restarts it on the same one: its old port goes away,
    /// a new one appears on `to` (same MAC, same IP inside the VM). Records are the caller's.
    pub fn rehome(&mut self, name: &str, to: usize) -> anyhow::Result<()> {
        let idx = self
            .vms
            .iter()
            .position(|v| v.name == name)
            .context("known VM")?;
        let from = self.vms[idx].host;
        // The old port may be gone already (a test deleted it).
        let _ = self.hosts[from]
            .ns
            .ip(&["link", "del", &self.vms[idx].port]);
        self.plug(&self.vms[idx], to)?;
        self.vms[idx].host = to;
        Ok(())
    }

    pub fn tmp_dir(&self) -> &PathBuf {
        &self.tmp
    }
}

/// The bytes of a key or value in [`Host::map_dump`]'s JSON (`["0x0a", ...]`).
pub fn dumped_bytes(v: &Value) -> anyhow::Result<Vec<u8>> {
    v.as_array()
        .context("a list of bytes")?
        .iter()
        .map(|b| {
            let b = b.as_str().context("a byte as text")?;
            Ok(u8::from_str_radix(b.trim_start_matches("0x"), 16)?)
        })
        .collect()
}

/// Runs `nv-transfer` over TCP in two VMs (IPv4 or IPv6, as `dst` is): sends `bytes`
/// pseudo-random bytes and returns
/// ("BYTES SHA256" the client sent, the same for what the server received).
pub fn tcp_transfer(
    server: &Vm,
    client: &Vm,
    dst: &str,
    bytes: u64,
) -> anyhow::Result<(String, String)> {
    // An IPv6 destination: the server listens on IPv6, the client writes `[dst]:port`.
    let (listen, to) = if dst.contains(':') {
        ("[::]:47001", format!("[{dst}]:47001"))
    } else {
        ("0.0.0.0:47001", format!("{dst}:47001"))
    };
    transfer(
        server,
        client,
        &["tcp-serve", listen],
        &["tcp-send", &to, "--bytes", &bytes.to_string()],
    )
}

/// Runs `nv-transfer` over UDP: `count` datagrams of `size` bytes; returns ("COUNT SHA256"
/// sent, the same over the datagrams that arrived intact).
pub fn udp_transfer(
    server: &Vm,
    client: &Vm,
    dst: &str,
    count: u64,
    size: usize,
) -> anyhow::Result<(String, String)> {
    let count = count.to_string();
    transfer(
        server,
        client,
        &["udp-serve", "0.0.0.0:47002", "--count", &count],
        &[
            "udp-send",
            &format!("{dst}:47002"),
            "--count",
            &count,
            "--size",
            &size.to_string(),
        ],
    )
}

/// Starts the server side in `server`'s namespace, runs the client side in `client`'s, and
/// returns both sides' reports. Both are bounded by a 30 s timeout.
fn transfer(
    server: &Vm,
    client: &Vm,
    serve: &[&str],
    send: &[&str],
) -> anyhow::Result<(String, String)> {
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?;
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &server.ns.name, tool])
        .args(serve)
        .args(["--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Give the server a moment to bind (TCP clients retry; UDP datagrams would be lost).
    thread::sleep(Duration::from_millis(200));
    let mut args = vec!["netns", "exec", &client.ns.name, tool];
    args.extend_from_slice(send);
    args.extend_from_slice(&["--timeout", "30"]);
    let client_report = run("ip", &args);
    if client_report.is_err() {
        let _ = srv.kill();
    }
    let out = srv.wait_with_output()?;
    let client_line = client_report?;
    if !out.status.success() {
        bail!(
            "transfer server failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((
        client_line.trim().to_owned(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// Sends `bytes` pseudo-random bytes by TCP from `client`'s namespace to `dst` (ADDR:PORT),
/// where something else listens (a guest); returns "BYTES SHA256" of what was sent.
pub fn tcp_transfer_to(client: &Vm, dst: &str, bytes: u64) -> anyhow::Result<String> {
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?;
    let line = client.ns.exec(
        tool,
        &[
            "tcp-send",
            dst,
            "--bytes",
            &bytes.to_string(),
            "--timeout",
            "60",
        ],
    )?;
    Ok(line.trim().to_owned())
}

/// Listens on `port` in `server`'s namespace while `send` makes something else (a guest)
/// connect and send; returns "BYTES SHA256" of what arrived.
pub fn tcp_transfer_from(
    server: &Vm,
    port: u16,
    send: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let tool = bin("nv-transfer")?;
    let tool = tool.to_str().context("utf-8 path")?;
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &server.ns.name, tool])
        .args(["tcp-serve", &format!("0.0.0.0:{port}"), "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    thread::sleep(Duration::from_millis(200));
    if let Err(e) = send() {
        let _ = srv.kill();
        let _ = srv.wait();
        return Err(e);
    }
    let out = srv.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "transfer server failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// How much counter `name` grew between two readings of `Host::counters`.
#[expect(clippy::implicit_hasher, reason = "the maps `Host::counters` returns")]
pub fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// A bounded ping stream from a VM, running in the background.
pub struct PingStream(std::process::Child);

impl PingStream {
    /// `count` echo requests from `vm`'s namespace to `dst`, `interval` seconds apart (as
    /// ping takes it), 120 s at the most.
    pub fn start(
        bed: &TwoHosts,
        vm: &str,
        dst: &str,
        count: u32,
        interval: &str,
    ) -> anyhow::Result<PingStream> {
        Ok(PingStream(
            Command::new("ip")
                .args(["netns", "exec", &bed.vm(vm).ns.name])
                .args(["timeout", "120", "ping", "-q", "-i", interval, "-W", "2"])
                .args(["-c", &count.to_string(), dst])
                .stdout(std::process::Stdio::piped())
                .spawn()?,
        ))
    }

    /// (sent, received) once it ends.
    pub fn finish(self) -> anyhow::Result<(u32, u32)> {
        let out = self.0.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no ping summary in {text}"))?;
        let field = |suffix: &str| -> anyhow::Result<u32> {
            Ok(summary
                .split(',')
                .find_map(|p| p.trim().strip_suffix(suffix))
                .with_context(|| format!("no '{suffix}' in {summary}"))?
                .trim()
                .parse()?)
        };
        Ok((field(" packets transmitted")?, field(" received")?))
    }
}

/// The IPv6 address the beds give a VM of IPv4 address `10.X.0.Y`: `fd00:X::Y`.
pub fn ipv6_of(ca: &str) -> String {
    let o: Vec<&str> = ca.split('.').collect();
    match o.as_slice() {
        ["10", x, "0", y] if *x == "0" => format!("fd00::{y}"),
        ["10", x, "0", y] => format!("fd00:{x}::{y}"),
        _ => panic!("no IPv6 address for {ca}"),
    }
}

/// The JSON lines an `nvctl monitor` ([`Host::monitor`]) printed before it ended.
pub fn monitor_events(child: std::process::Child) -> anyhow::Result<Vec<Value>> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nvctl monitor: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}
