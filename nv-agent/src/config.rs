//! Agent configuration: an optional TOML file whose every key is also a flag; flags win.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Parser;
use serde::Deserialize;

use crate::{
    error::{Result, invalid},
    model::Mac,
};

/// nv host agent: loads the datapath, keeps it in step with its store, serves nvctl.
///
/// Every key of the config file is also a flag (`state_dir` is `--state-dir`); flags win.
/// Forwarding keeps running while the agent is stopped: maps and program links stay pinned
/// under the pin path, and a restarted agent picks them up.
#[derive(Debug, Parser, Default)]
#[command(name = "nv-agent", version)]
pub struct AgentArgs {
    /// TOML config file (optional).
    #[arg(long, env = "NV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Underlay interface: NVGRE leaves and arrives here [required, flag or file].
    #[arg(long)]
    pub uplink: Option<String>,
    /// Directory of the store, the source of truth [default: /var/lib/nv].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Unix socket nvctl talks to [default: /run/nv/nv.sock].
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/nv].
    #[arg(long)]
    pub pin_path: Option<PathBuf>,
    /// Address and port where Prometheus scrapes `/metrics` [default: 127.0.0.1:9469].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Capacity of the lookup map [default: 1048576].
    #[arg(long)]
    pub max_lookups: Option<u32>,
    /// Connections stateful ACL rules track per VM, at most: a VM opening more evicts its own
    /// oldest, never another VM's [default: 2048; 56 bytes each, made when the VM gets a
    /// stateful rule].
    #[arg(long)]
    pub acl_max_flows: Option<u32>,
    /// Where NVGRE is decapsulated and IP rewrite undone on the uplink: `tc` keeps GSO
    /// super-packets whole (on a veth uplink an XDP program forces per-segment receive, which
    /// halved TCP throughput in `cargo xtask bench`); `xdp` drops bad underlay traffic before
    /// the kernel allocates for it [default: tc].
    #[arg(long, value_enum)]
    pub decap_hook: Option<DecapHook>,
    /// MTU of the VMs' NICs, shown by `nvctl status` and set on the tap ports the agent
    /// attaches (libvirt mirrors it, QEMU's `host_mtu` tells the guest; a veth's VM end is the
    /// VM's to set). A VM that sends more than fits the uplink anyway is answered with ICMP
    /// "fragmentation needed"
    /// [default: the uplink's MTU minus the 42 bytes of NVGRE, followed as it changes].
    #[arg(long, value_parser = clap::value_parser!(u32).range(68..=65_535))]
    pub vm_mtu: Option<u32>,
    /// DSCP of tenant traffic on the underlay: `zero` (best effort), a codepoint 0-63, or
    /// `copy` (the DSCP the tenant wrote: only where tenants are trusted to pick their
    /// treatment on the physical network) [default: zero].
    #[arg(long)]
    pub underlay_dscp: Option<DscpPolicy>,
    /// The distributed router's MAC: what VMs of routed subnets reach their gateway at. The
    /// same on every host (a VM keeps it in its ARP cache when it migrates)
    /// [default: 02:6e:76:00:00:01].
    #[arg(long, value_parser = parse_mac)]
    pub router_mac: Option<Mac>,
    /// Seconds between reconciliations of the maps against the store: an entry deleted or
    /// added behind the agent's back (bpftool, another program) is repaired and logged; 0
    /// only at start [default: 60].
    #[arg(long)]
    pub reconcile_interval: Option<u64>,
    /// Cluster mode: etcd's client URLs, comma-separated (e.g.
    /// `https://10.1.0.1:2379,https://10.1.0.2:2379,https://10.1.0.3:2379`). Lookup records
    /// then live in etcd under /nv/v1/, shared by every host; provider addresses stay this
    /// host's. `http://` is for a test cluster: use TLS and the three files below, so that
    /// this host can only write its own key [default: none].
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
    /// Cluster mode over TLS: the CA certificate (PEM) that signed etcd's certificates.
    #[arg(long)]
    pub etcd_ca_file: Option<PathBuf>,
    /// Cluster mode over TLS: this host's client certificate (PEM), whose CN is its
    /// `host_name`; etcd's roles let it read `/nv/v1/` and write `/nv/v1/hosts/HOST_NAME` only.
    #[arg(long)]
    pub etcd_cert_file: Option<PathBuf>,
    /// Cluster mode over TLS: the key (PEM) of --etcd-cert-file.
    #[arg(long)]
    pub etcd_key_file: Option<PathBuf>,
    /// This host's name in cluster mode: a record's `host` names the host whose VM port it
    /// binds [default: the hostname].
    #[arg(long)]
    pub host_name: Option<String>,
    /// Detach every program, remove every pin under the pin path, and exit (decommissioning).
    /// The store is kept.
    #[arg(long)]
    pub purge: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    uplink: Option<String>,
    state_dir: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    pin_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    max_lookups: Option<u32>,
    acl_max_flows: Option<u32>,
    decap_hook: Option<DecapHook>,
    vm_mtu: Option<u32>,
    underlay_dscp: Option<DscpPolicy>,
    router_mac: Option<Mac>,
    reconcile_interval: Option<u64>,
    etcd_endpoints: Option<String>,
    etcd_ca_file: Option<PathBuf>,
    etcd_cert_file: Option<PathBuf>,
    etcd_key_file: Option<PathBuf>,
    host_name: Option<String>,
}

/// What DSCP tenant traffic gets on the underlay, as the datapath's config holds it: a fixed
/// codepoint, or `DatapathConfig::DSCP_COPY`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DscpPolicy(pub u32);

impl std::str::FromStr for DscpPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "copy" => Ok(DscpPolicy(nv_common::DatapathConfig::DSCP_COPY)),
            "zero" => Ok(DscpPolicy(0)),
            n => match n.parse::<u32>() {
                Ok(v) if v <= 63 => Ok(DscpPolicy(v)),
                _ => Err(format!(
                    "underlay_dscp '{s}' is not copy, zero or a DSCP codepoint 0-63"
                )),
            },
        }
    }
}

impl std::fmt::Display for DscpPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            nv_common::DatapathConfig::DSCP_COPY => f.write_str("copy"),
            0 => f.write_str("zero"),
            v => write!(f, "{v}"),
        }
    }
}

impl<'de> Deserialize<'de> for DscpPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Number(u32),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Name(s) => s,
            Raw::Number(n) => n.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The uplink hook that decapsulates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecapHook {
    Xdp,
    #[default]
    Tc,
}

/// The resolved configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub uplink: Option<String>,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub pin_path: PathBuf,
    pub metrics_addr: SocketAddr,
    pub max_lookups: u32,
    pub acl_max_flows: u32,
    pub decap_hook: DecapHook,
    /// `None`: derived from the uplink's MTU.
    pub vm_mtu: Option<u32>,
    pub underlay_dscp: DscpPolicy,
    pub router_mac: Mac,
    /// `None`: reconciled only at start.
    pub reconcile_interval: Option<std::time::Duration>,
    /// Cluster mode's etcd endpoints (empty: not in cluster mode).
    pub etcd_endpoints: Vec<String>,
    /// And the files of this host's TLS identity.
    pub etcd_tls: crate::etcd_access::TlsFiles,
    pub host_name: String,
}

fn parse_mac(s: &str) -> std::result::Result<Mac, String> {
    s.parse().map_err(|e: crate::error::NvError| e.to_string())
}

/// This machine's hostname.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    #[expect(clippy::too_many_lines, reason = "one group of lines per setting")]
    pub fn resolve(args: &AgentArgs) -> Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let config = Config {
            uplink: args.uplink.clone().or(file.uplink),
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/nv".into()),
            api_socket: args
                .api_socket
                .clone()
                .or(file.api_socket)
                .unwrap_or_else(|| "/run/nv/nv.sock".into()),
            pin_path: args
                .pin_path
                .clone()
                .or(file.pin_path)
                .unwrap_or_else(|| "/sys/fs/bpf/nv".into()),
            metrics_addr: args
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9469))),
            max_lookups: args
                .max_lookups
                .or(file.max_lookups)
                .unwrap_or(nv_common::DEFAULT_MAX_LOOKUPS),
            acl_max_flows: args
                .acl_max_flows
                .or(file.acl_max_flows)
                .unwrap_or(nv_common::acl::DEFAULT_MAX_FLOWS),
            decap_hook: args.decap_hook.or(file.decap_hook).unwrap_or_default(),
            vm_mtu: args.vm_mtu.or(file.vm_mtu),
            underlay_dscp: args
                .underlay_dscp
                .or(file.underlay_dscp)
                .unwrap_or_default(),
            router_mac: args
                .router_mac
                .or(file.router_mac)
                .unwrap_or(Mac(nv_common::routing::DEFAULT_ROUTER_MAC)),
            reconcile_interval: Some(
                args.reconcile_interval
                    .or(file.reconcile_interval)
                    .unwrap_or(60),
            )
            .filter(|s| *s > 0)
            .map(std::time::Duration::from_secs),
            etcd_endpoints: args
                .etcd_endpoints
                .clone()
                .or(file.etcd_endpoints)
                .map(|e| crate::etcd_access::split_endpoints(&e))
                .unwrap_or_default(),
            // An empty path is no file, as an empty etcd_endpoints is no cluster.
            etcd_tls: crate::etcd_access::TlsFiles {
                ca: args.etcd_ca_file.clone().or(file.etcd_ca_file),
                cert: args.etcd_cert_file.clone().or(file.etcd_cert_file),
                key: args.etcd_key_file.clone().or(file.etcd_key_file),
            }
            .without_empty(),
            host_name: args
                .host_name
                .clone()
                .or(file.host_name)
                .unwrap_or_else(hostname),
        };
        config.etcd()?;
        if config.host_name.is_empty()
            || config.host_name.len() > 253
            || !config
                .host_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return Err(invalid(format!(
                "host_name '{}' is not a host name (letters, digits, '-', '.', '_')",
                config.host_name
            )));
        }
        if let Some(uplink) = &config.uplink {
            crate::model::validate_ifname("uplink", uplink)?;
        }
        if !(1..=1 << 26).contains(&config.max_lookups) {
            return Err(invalid(format!(
                "max_lookups {} is out of range 1-67108864",
                config.max_lookups
            )));
        }
        if !(4..=1 << 16).contains(&config.acl_max_flows) {
            return Err(invalid(format!(
                "acl_max_flows {} is out of range 4-65536",
                config.acl_max_flows
            )));
        }
        if let Some(mtu) = config.vm_mtu
            && !(68..=65_535).contains(&mtu)
        {
            return Err(invalid(format!("vm_mtu {mtu} is out of range 68-65535")));
        }
        if config.router_mac.0[0] & 1 != 0 || config.router_mac.0 == [0; 6] {
            return Err(invalid(format!(
                "router_mac {} is not a unicast MAC address",
                config.router_mac
            )));
        }
        Ok(config)
    }
}

impl Config {
    /// How this host reaches etcd, in cluster mode (its files read now: a wrong one stops
    /// the agent at start, not at its first write).
    pub fn etcd(&self) -> Result<Option<crate::etcd_access::EtcdAccess>> {
        let t = &self.etcd_tls;
        if self.etcd_endpoints.is_empty() {
            if t.ca.is_some() || t.cert.is_some() || t.key.is_some() {
                return Err(invalid(
                    "etcd_ca_file, etcd_cert_file and etcd_key_file are for cluster mode: \
                     etcd_endpoints is not set",
                ));
            }
            return Ok(None);
        }
        crate::etcd_access::EtcdAccess::new(
            self.etcd_endpoints.clone(),
            t,
            &crate::etcd_access::CONFIG_KEYS,
        )
        .map(Some)
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(format!("cannot read config {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message names the problem; the line says where (and which key).
        let at = e.span().map_or_else(String::new, |span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let content = text.lines().nth(line - 1).unwrap_or("").trim();
            format!(" line {line} (`{content}`)")
        });
        invalid(format!(
            "config {}{at}: {}",
            path.display(),
            e.message().trim()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "uplink = \"eth9\"\nstate_dir = \"/tmp/x\"\nmax_lookups = 1024\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(path),
            uplink: Some("uplink0".into()),
            ..AgentArgs::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.uplink.as_deref(), Some("uplink0"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_lookups, 1024);
        assert_eq!(c.api_socket, PathBuf::from("/run/nv/nv.sock"));
        assert_eq!(c.pin_path, PathBuf::from("/sys/fs/bpf/nv"));
    }

    /// The shipped config (dist/agent.toml) names every key, and each commented value is the
    /// default, but for the two that have none (`uplink`, `vm_mtu`).
    #[test]
    fn the_default_config_names_every_key_with_its_default() {
        let shipped = include_str!("../../dist/agent.toml");
        let uncommented: String = shipped
            .lines()
            .filter_map(|l| l.strip_prefix('#').filter(|l| l.contains(" = ")))
            .fold(String::new(), |all, l| all + l + "\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, shipped).unwrap();
        let as_shipped = Config::resolve(&AgentArgs {
            config: Some(path.clone()),
            ..AgentArgs::default()
        })
        .unwrap();
        std::fs::write(&path, &uncommented).unwrap();
        let every = Config::resolve(&AgentArgs {
            config: Some(path),
            ..AgentArgs::default()
        })
        .unwrap();
        let keys = uncommented.lines().count();
        assert_eq!(
            keys, 17,
            "a key of FileConfig is missing from dist/agent.toml"
        );
        assert_eq!(as_shipped.uplink, None);
        assert_eq!(every.reconcile_interval, as_shipped.reconcile_interval);
        assert_eq!(every.state_dir, as_shipped.state_dir);
        assert_eq!(every.api_socket, as_shipped.api_socket);
        assert_eq!(every.pin_path, as_shipped.pin_path);
        assert_eq!(every.metrics_addr, as_shipped.metrics_addr);
        assert_eq!(every.max_lookups, as_shipped.max_lookups);
        assert_eq!(every.decap_hook, as_shipped.decap_hook);
        assert_eq!(every.underlay_dscp, as_shipped.underlay_dscp);
        assert_eq!(every.router_mac, as_shipped.router_mac);
    }

    #[test]
    fn underlay_dscp_is_copy_zero_or_a_codepoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        for (text, want) in [
            (
                "underlay_dscp = \"copy\"\n",
                Ok(nv_common::DatapathConfig::DSCP_COPY),
            ),
            ("underlay_dscp = \"zero\"\n", Ok(0)),
            ("underlay_dscp = 46\n", Ok(46)),
            ("", Ok(0)),
            (
                "underlay_dscp = 64\n",
                Err("not copy, zero or a DSCP codepoint"),
            ),
            (
                "underlay_dscp = \"ef\"\n",
                Err("not copy, zero or a DSCP codepoint"),
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let args = AgentArgs {
                config: Some(path.clone()),
                ..AgentArgs::default()
            };
            match (Config::resolve(&args), want) {
                (Ok(c), Ok(v)) => assert_eq!(c.underlay_dscp.0, v, "{text}"),
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "uplinkk = \"eth0\"\n").unwrap();
        let args = AgentArgs {
            config: Some(path),
            ..AgentArgs::default()
        };
        let err = Config::resolve(&args).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
