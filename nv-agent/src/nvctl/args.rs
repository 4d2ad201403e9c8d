//! nvctl's command line: the flags are the contract operators script against (DESIGN.md).
use std::{net::IpAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::model::{Mac, Method, Prefixed, Rdid, Subnet};

/// nvctl: configure nv network virtualization on this host.
///
/// Tenants keep their customer addresses (CA); hosts talk over provider addresses (PA).
/// A lookup record maps (VSID, CA) to the PA of the host the VM runs on.
///
/// Example, host 1 of two, tenant RED in VSID 5001:
///   nvctl provider add --pa 198.18.0.1/15 --dev uplink0
///   nvctl lookup add --vsid 5001 --ca 10.0.0.1 --pa 198.18.0.1 --mac 02:00:00:00:00:01 --port red1 --name RED-1
///   nvctl lookup add --vsid 5001 --ca 10.0.0.2 --pa 198.18.0.2 --mac 02:00:00:00:00:02 --name RED-2
#[derive(Debug, Parser)]
#[command(name = "nvctl", version, verbatim_doc_comment)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        env = "NV_SOCKET",
        default_value = "/run/nv/nv.sock"
    )]
    pub socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Cluster mode as the operator: lookup records are written to etcd directly, under the
/// operator's certificate (hosts' certificates may not write them). `lookup add`, `del`,
/// `move`, `import`, `list` and `export` then work on etcd; when an agent runs here, a change
/// is answered once it has applied it. Without these, every command goes to this host's agent.
#[derive(Debug, Default, clap::Args)]
#[command(next_help_heading = "Cluster mode, as the operator")]
pub struct EtcdArgs {
    /// etcd's client URLs, comma-separated (https:// with the files below). Given, `lookup`,
    /// `route` and `acl` commands work on etcd itself, as the operator; when an agent runs
    /// here, a change is answered once it has applied it.
    #[arg(long, global = true, env = "NV_ETCD_ENDPOINTS", value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// The CA certificate (PEM) that signed etcd's certificates.
    #[arg(long, global = true, env = "NV_ETCD_CA_FILE", value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// The operator's client certificate (PEM; CN nv-admin in the README's layout).
    #[arg(long, global = true, env = "NV_ETCD_CERT_FILE", value_name = "FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The key (PEM) of --etcd-cert-file.
    #[arg(long, global = true, env = "NV_ETCD_KEY_FILE", value_name = "FILE")]
    pub etcd_key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Provider addresses of this host (the underlay addresses tenants' traffic rides on).
    #[command(subcommand)]
    Provider(ProviderCmd),
    /// Lookup records: where each customer address lives, and how to reach it.
    #[command(subcommand)]
    Lookup(LookupCmd),
    /// Customer routes (HNV's): a tenant's routing domain, its subnets, and where traffic
    /// for other prefixes goes.
    ///
    /// A routing domain (--rdid, a name or a GUID) holds a tenant's virtual subnets; each VSID
    /// belongs to one domain. A route with --nexthop 0.0.0.0 makes its prefix the VSID's
    /// subnet (its gateway, the distributed router's address, is the first address unless
    /// --gateway says otherwise); another next hop is a VM of that VSID (a gateway or
    /// appliance) that traffic for the prefix goes to. Longest prefix wins, then the lower
    /// metric.
    ///
    /// Examples:
    ///   nvctl route add --rdid contoso --vsid 5001 --prefix 10.1.0.0/24 --nexthop 0.0.0.0
    ///   nvctl route add --rdid contoso --vsid 5002 --prefix 10.2.0.0/24 --nexthop 0.0.0.0
    ///   nvctl route add --rdid contoso --vsid 5001 --prefix 0.0.0.0/0 --nexthop 10.1.0.254
    ///   nvctl route list --rdid contoso
    #[command(subcommand, verbatim_doc_comment)]
    Route(RouteCmd),
    /// Port ACLs: what a VM may send and receive.
    ///
    /// A rule is on one VM (--vsid and --ca, its lookup record; it covers both the VM's
    /// address families) or on every VM of a VSID (--vsid alone). The highest --weight that
    /// matches decides, deny first at equal weight; a packet no rule matches passes. A
    /// --stateful allow also admits the answers of the connections it allowed (TCP, UDP,
    /// ICMP echo) until they are idle for --idle-timeout. Outbound rules are checked on the
    /// sender's host before translation, inbound ones on the receiver's at delivery.
    ///
    /// Examples (a web server that may only answer, and open connections out):
    ///   nvctl acl add --vsid 5001 --ca 10.0.0.2 --direction in --action deny --weight 1
    ///   nvctl acl add --vsid 5001 --ca 10.0.0.2 --direction in --action allow \
    ///       --protocol tcp --local-port 443 --weight 10 --name web
    ///   nvctl acl add --vsid 5001 --ca 10.0.0.2 --direction out --action allow \
    ///       --protocol tcp --stateful --weight 10
    ///   nvctl acl list --vsid 5001
    ///   nvctl acl del --name web
    #[command(subcommand, verbatim_doc_comment)]
    Acl(AclCmd),
    /// Datapath counters: packets forwarded, and packets dropped by reason. With --vsid, that
    /// virtual subnet's traffic instead: frames and bytes its VMs here sent (tx) and got (rx),
    /// by method (encap, rewrite, or local for VM to VM on this host).
    Stats {
        /// Only this VSID's traffic.
        #[arg(long)]
        vsid: Option<u32>,
    },
    /// The agent: its uplink and the MTU VMs must use, its ports (veth or tap, running or
    /// not) and records.
    Status,
    /// Where one packet goes and why (a dry run: nothing is sent, nothing counted).
    ///
    /// The packet is built from what you give (or taken from a capture) and run through a copy
    /// of the loaded programs against the live records (`BPF_PROG_TEST_RUN`); the verdict, the
    /// records that decided, the port it leaves by and the frame that leaves are printed.
    ///
    /// Examples:
    ///   nvctl trace --port red1 --dst 10.0.0.2 --proto tcp --dport 443
    ///   nvctl trace --from-uplink --vsid 5001 --src 10.0.0.2 --dst 10.0.0.1
    ///   nvctl trace --port red1 --pcap red1.pcap
    #[command(verbatim_doc_comment)]
    Trace(TraceArgs),
    /// Turn the datapath's debug events on or off: while on, every drop is logged by the
    /// agent (target `nv_datapath`: `journalctl -u nv-agent`); off, they cost nothing measurable.
    Debug {
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Watch the datapath live: every drop with its reason, VSID, port and addresses, and with
    /// --sample one in N forwarded packets; one line each (JSON lines with -o json), until
    /// Ctrl-C or --count events. The datapath reports only while a monitor runs.
    ///
    /// Example, why RED-1's packets do not arrive:
    ///   nvctl monitor --port red1
    Monitor(MonitorArgs),
    /// Print a shell completion script, e.g. `nvctl completions bash >
    /// /usr/share/bash-completion/completions/nvctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff), of nvctl or of nv-agent, e.g. `nvctl man | man -l -`.
    Man {
        #[arg(value_enum, default_value_t = ManPage::Nvctl)]
        page: ManPage,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ManPage {
    Nvctl,
    NvAgent,
}

/// What `nvctl lookup export` writes: the formats `nvctl lookup import` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Json,
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum ProviderCmd {
    /// Add a provider address; the agent puts it on the device if it is not there yet.
    Add {
        /// Address and prefix length, e.g. 198.18.0.1/15.
        #[arg(long, value_parser = parse::<Prefixed>)]
        pa: Prefixed,
        /// Device that holds it [default: the agent's uplink].
        #[arg(long)]
        dev: Option<String>,
    },
    /// Delete a provider address (refused while local lookup records use it).
    Del {
        /// The address, with or without its prefix length.
        #[arg(long, value_parser = parse_addr)]
        pa: IpAddr,
    },
    /// List provider addresses.
    List,
}

#[derive(Debug, Subcommand)]
pub enum LookupCmd {
    /// Add a lookup record. With --port the VM is on this host, behind that port.
    Add {
        /// Virtual Subnet ID, 4096-16777214.
        #[arg(long)]
        vsid: u32,
        /// Customer address: the VM's own IP. An IPv6 one joins the VM's IPv4 record (same
        /// VSID, MAC, PA and port) and crosses by NVGRE.
        #[arg(long)]
        ca: IpAddr,
        /// Provider address of the host the VM runs on.
        #[arg(long)]
        pa: IpAddr,
        /// The VM's MAC address, e.g. 02:00:00:00:00:01.
        #[arg(long, value_parser = parse::<Mac>)]
        mac: Mac,
        /// Translation method.
        #[arg(long, value_enum, default_value_t = Method::Encap)]
        method: Method,
        /// The VM's port (veth or tap) on this host; omit for a VM on another host.
        #[arg(long)]
        port: Option<String>,
        /// Free-text name of the VM.
        #[arg(long)]
        name: Option<String>,
        /// Cluster mode: the host whose port --port is [default: this host's agent's
        /// `host_name`].
        #[arg(long, requires = "port")]
        host: Option<String>,
    },
    /// Delete a lookup record.
    Del {
        #[arg(long)]
        vsid: u32,
        #[arg(long)]
        ca: IpAddr,
    },
    /// Move a record to another host or port in one change (VM migration); its CA is kept.
    Move {
        #[arg(long)]
        vsid: u32,
        #[arg(long)]
        ca: IpAddr,
        /// The new provider address.
        #[arg(long)]
        pa: IpAddr,
        /// The new port on this host; omit when the VM now runs on another host.
        #[arg(long)]
        port: Option<String>,
        /// Cluster mode: the host of the new port [default: this host's agent's `host_name`];
        /// typed on any host, every host follows.
        #[arg(long, requires = "port")]
        host: Option<String>,
    },
    /// List lookup records, in (VSID, CA) order.
    List {
        /// Only the records of this VSID.
        #[arg(long)]
        vsid: Option<u32>,
    },
    /// Write lookup records to standard output in the import format, in (VSID, CA) order:
    /// `nvctl lookup export > records.json` and `nvctl lookup import records.json` on another
    /// agent round-trip byte for byte.
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
        /// Only the records of this VSID.
        #[arg(long)]
        vsid: Option<u32>,
    },
    /// Add many lookup records at once, all or none: a JSON list, or CSV with a header line,
    /// both using the flag names (vsid,ca,pa,mac,method,port,name; method, port and name may be
    /// left out or empty). FILE `-` reads standard input.
    Import { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum RouteCmd {
    /// Add a route. Refused when it would put a VSID in two domains, overlap another subnet
    /// of the domain, repeat a prefix's metric, or name a next hop outside its VSID's subnets.
    Add {
        /// Routing domain: a name or GUID, up to 64 of [A-Za-z0-9._:-] (kept lowercased).
        #[arg(long, value_parser = parse::<Rdid>)]
        rdid: Rdid,
        /// The virtual subnet the prefix (on-link) or the next hop lives in.
        #[arg(long)]
        vsid: u32,
        /// Destination prefix, e.g. 10.2.0.0/16, 0.0.0.0/0 or `fd00:2::/64` (IPv6: NVGRE VSIDs).
        #[arg(long, value_parser = parse::<Subnet>)]
        prefix: Subnet,
        /// 0.0.0.0 (IPv6: `::`): the prefix is the VSID's subnet (on-link); otherwise a CA of
        /// the VSID that traffic for the prefix is forwarded to, of the prefix's family.
        #[arg(long)]
        nexthop: IpAddr,
        /// Among routes to the same prefix, the lower wins.
        #[arg(long, default_value_t = 0)]
        metric: u32,
        /// On-link routes: the subnet's router address [default: its first address, e.g.
        /// 10.1.0.1 or `fd00:1::1`]. On an IPv6 subnet the router also speaks from its
        /// link-local address, the default router its advertisements give.
        #[arg(long)]
        gateway: Option<IpAddr>,
    },
    /// Delete the routes of a domain to a prefix (only the one through --nexthop, if given).
    Del {
        #[arg(long, value_parser = parse::<Rdid>)]
        rdid: Rdid,
        #[arg(long, value_parser = parse::<Subnet>)]
        prefix: Subnet,
        #[arg(long)]
        nexthop: Option<IpAddr>,
    },
    /// List routes, in (domain, prefix, next hop) order.
    List {
        /// Only this domain's routes.
        #[arg(long, value_parser = parse::<Rdid>)]
        rdid: Option<Rdid>,
    },
    /// Write routes to standard output as a JSON list, the import format.
    Export {
        #[arg(long, value_parser = parse::<Rdid>)]
        rdid: Option<Rdid>,
    },
    /// Add many routes at once, all or none, from a JSON list of routes in the flag names
    /// (rdid, vsid, prefix, nexthop, metric, gateway; the last two may be left out). FILE `-`
    /// reads standard input.
    Import { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum AclCmd {
    /// Add a rule; nv gives it an id.
    Add(Box<AclAdd>),
    /// Delete a rule, by --id or by --name (when only one rule has it).
    Del {
        /// The rule's id, as `nvctl acl list` shows it.
        #[arg(long, conflicts_with = "name", required_unless_present = "name")]
        id: Option<u32>,
        /// The rule's name; refused when more than one rule has it (delete by --id then).
        #[arg(long)]
        name: Option<String>,
    },
    /// List rules in id order, with the packets and bytes each decided on this host.
    List {
        /// Only this VSID's rules.
        #[arg(long)]
        vsid: Option<u32>,
    },
    /// Write rules to standard output as a JSON list, the import format.
    Export {
        /// Only this VSID's rules.
        #[arg(long)]
        vsid: Option<u32>,
    },
    /// Add many rules at once, all or none, from a JSON list of rules in the flag names
    /// (ids are nv's: those in the file are left out). FILE `-` reads standard input.
    Import { file: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct AclAdd {
    /// The VSID of the VM (with --ca) or of every VM the rule covers.
    #[arg(long)]
    pub vsid: u32,
    /// The VM's lookup record; without it the rule covers every VM of the VSID.
    #[arg(long)]
    pub ca: Option<IpAddr>,
    /// What the VM receives (in), sends (out), or both.
    #[arg(long, value_enum)]
    pub direction: crate::model::acl::Direction,
    #[arg(long, value_enum)]
    pub action: crate::model::acl::Action,
    /// The other end's prefix (e.g. 10.0.0.0/8, `::/0`); its family is the rule's.
    #[arg(long, value_parser = parse::<Subnet>)]
    pub remote: Option<Subnet>,
    /// The VM's own prefix.
    #[arg(long, value_parser = parse::<Subnet>)]
    pub local: Option<Subnet>,
    /// tcp, udp, icmp, icmpv6 or a protocol number [default: any].
    #[arg(long, value_parser = parse::<crate::model::acl::Protocol>)]
    pub protocol: Option<crate::model::acl::Protocol>,
    /// The other end's port or range (N or N-M; with tcp or udp).
    #[arg(long, value_parser = parse::<crate::model::acl::PortRange>)]
    pub remote_port: Option<crate::model::acl::PortRange>,
    /// The VM's port or range.
    #[arg(long, value_parser = parse::<crate::model::acl::PortRange>)]
    pub local_port: Option<crate::model::acl::PortRange>,
    /// 1-65535: the highest weight that matches decides.
    #[arg(long)]
    pub weight: u16,
    /// Also admit the answers of the connections this allow lets through.
    #[arg(long)]
    pub stateful: bool,
    /// Seconds a stateful connection lives without a packet.
    #[arg(long, default_value_t = crate::model::acl::DEFAULT_IDLE_TIMEOUT)]
    pub idle_timeout: u32,
    /// A name to find the rule by.
    #[arg(long)]
    pub name: Option<String>,
}

fn parse<T: std::str::FromStr<Err = crate::error::NvError>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: crate::error::NvError| e.to_string())
}

fn parse_addr(s: &str) -> Result<IpAddr, String> {
    let addr = s.split_once('/').map_or(s, |(a, _)| a);
    addr.parse()
        .map_err(|_| format!("invalid IP address '{s}'"))
}

/// `nvctl trace`: the packet to trace.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// A packet the VM behind this port sends.
    #[arg(
        long,
        conflicts_with = "from_uplink",
        required_unless_present = "from_uplink"
    )]
    pub port: Option<String>,
    /// A packet arriving on the uplink from the host of --src (NVGRE, or IP rewrite when
    /// the destination's record says so).
    #[arg(long, requires = "vsid")]
    pub from_uplink: bool,
    /// With --from-uplink: the virtual subnet.
    #[arg(long)]
    pub vsid: Option<u32>,
    /// Source customer address [default: the port's record of the destination's family].
    #[arg(long)]
    pub src: Option<std::net::IpAddr>,
    /// Destination customer address, IPv4 or IPv6.
    #[arg(long, required_unless_present = "pcap")]
    pub dst: Option<std::net::IpAddr>,
    #[arg(long, value_enum)]
    pub proto: Option<crate::trace::Proto>,
    /// Destination port (TCP, UDP) or echo id (ICMP).
    #[arg(long)]
    pub dport: Option<u16>,
    #[arg(long)]
    pub sport: Option<u16>,
    /// Trace the first frame of this capture (pcap, Ethernet; `tcpdump -w`) instead.
    #[arg(long, conflicts_with_all = ["dst", "src", "proto", "dport", "sport"])]
    pub pcap: Option<PathBuf>,
}

/// `nvctl monitor`: which events to watch.
#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    /// Only this VSID's events.
    #[arg(long)]
    pub vsid: Option<u32>,
    /// Only drops for this reason (as `nvctl stats` names them, with or without drop_).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only what this port (a VM's, or the uplink) sent or was sent.
    #[arg(long)]
    pub port: Option<String>,
    /// Also one in N forwarded packets.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: Option<u32>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}
