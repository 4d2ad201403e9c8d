//! The agent: the host around the transaction path. It resolves what needs the host (links,
//! addresses, the bounce pair) and hands every change to [`Tables::apply`] (see `txn`), which
//! applies it to catalog, maps and store as a whole or not at all. Start-up and the periodic
//! reconcile compare the whole table with the maps; changes touch only their own entries.
use std::{collections::HashMap, net::IpAddr};

use nv_common::{DatapathConfig, PortInfo, wire::NVGRE_V4_OVERHEAD};
use tracing::{info, warn};

use crate::{
    catalog::{Catalog, describe},
    config::{Config, DecapHook},
    datapath::Datapath,
    error::{NvError, Result, invalid},
    model::{LookupRecord, Provider, ProviderState, validate_ifname},
    netlink::{LinkInfo, LinkKind, Netlink},
    store::{Change, Store},
    translate::{self, Attached},
    txn::{Applied, Links, Tables},
};

mod cluster_ops;

pub struct Agent {
    uplink: String,
    uplink_ifindex: u32,
    uplink_mac: [u8; 6],
    decap_hook: DecapHook,
    max_lookups: u32,
    store: Store,
    tables: Tables,
    datapath: Datapath,
    netlink: Netlink,
    uplink_mtu: u32,
    /// The configured VM MTU; `None`: derived from the uplink's.
    vm_mtu: Option<u32>,
    underlay_dscp: crate::config::DscpPolicy,
    /// Reconciliations of the maps against the store, and the entries they had to repair.
    reconciles: u64,
    repaired: u64,
    /// The bounce pair's ifindexes (both 0: none, a VM tunnel's super-packets are dropped).
    bounce: (u32, u32),
    /// `nvctl monitor`: the datapath's events and who watches them.
    hub: crate::monitor::Hub,
    pin_path: std::path::PathBuf,
    /// `nvctl trace`'s copy of the programs, loaded at the first trace.
    tracer: Option<Datapath>,
    /// The datapath logs its debug events (`nvctl debug on`).
    debug_events: bool,
    /// Cluster mode: lookup records come from etcd.
    cluster: Option<crate::cluster::Cluster>,
    /// This host's name (`host_name`): alone, the only host a record may name.
    host_name: String,
    /// The maps' capacities, by name (fixed once loaded).
    capacities: Vec<(&'static str, u32)>,
    /// VM ports nv set down because it could not filter them, by name (their ifindex), and
    /// how many times a port was set down so.
    unfiltered: HashMap<String, u32>,
    ports_set_down: u64,
    fd_reserve: FdReserve,
}

/// The shortest prefix a provider address may have (IPv4): the underlay of the README's
/// examples is 198.18.0.0/15.
const MIN_PROVIDER_PREFIX: u8 = 15;

/// Descriptors held for the moment the agent runs out: attaching the filter to a VM port
/// needs a few, and a port it cannot filter must be set down.
#[derive(Default)]
struct FdReserve(Vec<std::fs::File>);

impl FdReserve {
    const SIZE: usize = 16;

    fn refill(&mut self) {
        while self.0.len() < Self::SIZE {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.0.push(f),
                Err(_) => return,
            }
        }
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What observation reads: the agent's state as of the last change.
#[derive(Clone, Debug)]
pub struct Published {
    pub status: Status,
    /// Everything `/metrics` reports but the datapath's counters.
    pub metrics: crate::metrics::Snapshot,
}

/// What `nvctl status` shows.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub version: String,
    /// The eBPF object's fingerprint ([`crate::programs_version`]).
    #[serde(default)]
    pub programs: String,
    /// The store's database file and its size.
    #[serde(default)]
    pub store: String,
    #[serde(default)]
    pub store_bytes: u64,
    pub uplink: String,
    pub uplink_mtu: u32,
    /// The MTU VMs must use (set on the ports the agent attaches).
    pub vm_mtu: u32,
    pub decap_hook: String,
    /// DSCP of tenant traffic on the underlay: zero, copy or a codepoint.
    pub underlay_dscp: String,
    pub providers: usize,
    pub lookups: usize,
    /// Ports attached, by kind: veth and tap, running or not.
    pub ports: Vec<PortStatus>,
    /// Local records whose port does not exist now.
    pub ports_missing: Vec<String>,
    /// Ports no record names any more, still filtered: every frame they send is dropped.
    #[serde(default)]
    pub ports_without_record: Vec<String>,
    /// Reconciliations of the maps against the store since the agent started, and the entries
    /// they repaired (drift: changed behind the agent's back).
    #[serde(default)]
    pub reconciles: u64,
    #[serde(default)]
    pub repaired: u64,
    /// `nvctl monitor` clients watching now.
    #[serde(default)]
    pub monitors: usize,
    /// Whether the datapath logs its debug events (`nvctl debug on`).
    #[serde(default)]
    pub debug_events: bool,
    /// Cluster mode: etcd, and how far this host follows it.
    #[serde(default)]
    pub cluster: Option<crate::cluster::Status>,
    /// VM ports nv set down because it could not filter them (out of descriptors, say); it
    /// tries again every second and sets them up once filtered.
    #[serde(default)]
    pub ports_set_down: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PortStatus {
    pub port: String,
    pub kind: String,
    pub ifindex: u32,
    pub running: bool,
}

/// A record's move to another host or port: HNV migration, one change.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub vsid: u32,
    pub ca: IpAddr,
    pub pa: IpAddr,
    #[serde(default)]
    pub port: Option<String>,
    /// Cluster mode: the host of the new port [default: this host].
    #[serde(default)]
    pub host: Option<String>,
}

fn apply_legacy(catalog: &mut Catalog, change: Change) {
    match change {
        Change::PutLookup { record } => {
            catalog.insert(record);
        }
        Change::DelLookup { vsid, ca } => {
            catalog.remove(&(vsid, ca));
        }
        Change::PutProvider { provider } => {
            let providers = catalog.providers_mut();
            providers.retain(|p| p.pa.addr != provider.pa.addr);
            providers.push(provider);
        }
        Change::DelProvider { pa } => catalog.providers_mut().retain(|p| p.pa.addr != pa),
    }
}

impl Agent {
    /// Opens the store, loads the datapath (reusing pins) and reconciles the maps with the store.
    pub async fn start(config: &Config) -> Result<Agent> {
        let uplink = config.uplink.clone().ok_or_else(|| {
            invalid("no uplink configured: pass --uplink IFNAME or set uplink in the config file")
        })?;
        let netlink = Netlink::connect()?;
        let Some(link) = netlink.link(&uplink).await? else {
            return Err(invalid(format!(
                "uplink '{uplink}' does not exist on this host"
            )));
        };
        let (mut store, mut state, changes) = Store::open(&config.state_dir)?;
        let cluster = (!config.etcd_endpoints.is_empty()).then(|| {
            let (revision, _) = store.cluster_cache().unwrap_or_default();
            crate::cluster::Cluster::new(
                config.host_name.clone(),
                config.etcd_endpoints.clone(),
                revision,
            )
        });
        if cluster.is_some() && !state.lookups.is_empty() {
            warn!(
                "{} lookup records of this host's own store are not used in cluster mode: the \
                 records are etcd's (nvctl lookup import puts them there)",
                state.lookups.len()
            );
            state.lookups.clear();
        }
        let mut catalog = Catalog::from_state(state)?;
        if let Some(c) = &cluster {
            Self::load_cluster_cache(&mut catalog, &store, c, &uplink)?;
        }
        if !changes.is_empty() || store.needs_snapshot() {
            for c in changes {
                apply_legacy(&mut catalog, c);
            }
            store.snapshot(&catalog.to_state())?;
        }
        // Before any pin is touched: a smaller lookup map could not hold the store.
        if catalog.len() > usize::try_from(config.max_lookups).unwrap_or(usize::MAX) {
            return Err(invalid(format!(
                "the store holds {} lookup records, more than max_lookups ({}): raise \
                 max_lookups; forwarding continues from the pinned maps meanwhile",
                catalog.len(),
                config.max_lookups
            )));
        }
        let datapath = Datapath::load(&config.pin_path, config.max_lookups)?;
        let mut agent = Agent {
            uplink,
            uplink_ifindex: link.index,
            uplink_mac: link.mac,
            decap_hook: config.decap_hook,
            max_lookups: config.max_lookups,
            store,
            tables: Tables::new(catalog, DatapathConfig::default()),
            datapath,
            netlink,
            uplink_mtu: link.mtu,
            vm_mtu: config.vm_mtu,
            underlay_dscp: config.underlay_dscp,
            reconciles: 0,
            repaired: 0,
            bounce: (0, 0),
            hub: crate::monitor::Hub::default(),
            pin_path: config.pin_path.clone(),
            tracer: None,
            debug_events: false,
            cluster,
            host_name: config.host_name.clone(),
            capacities: Vec::new(),
            unfiltered: HashMap::new(),
            ports_set_down: 0,
            fd_reserve: FdReserve::default(),
        };
        agent.fd_reserve.refill();
        if let Some(log) = agent.datapath.take_log() {
            crate::monitor::spawn_log_reader(log)
                .map_err(|e| NvError::datapath_by("the datapath's debug events", e))?;
        }
        let ring = agent.datapath.take_monitor()?;
        agent
            .hub
            .spawn_reader(ring)
            .map_err(|e| NvError::datapath_by("the monitor's ring buffer", e))?;
        agent.tables.base = agent.base_config();
        if let Err(e) = agent.make_bounce().await {
            warn!(
                "no bounce pair ({e}): super-packets of VMs' own tunnels will be dropped as drop_vm_nested_gso"
            );
        }
        agent.tables.base = agent.base_config();
        agent.reconcile().await?;
        // A store of an agent before rewrite PAs were the datapath's.
        agent.take_rewrite_pas().await?;
        agent.datapath.finish_migration()?;
        agent.capacities = agent.datapath.capacities();
        Ok(agent)
    }

    /// The config map without the rewrite-PA filter: the uplink, its MTU, MAC and hook, the
    /// DSCP policy and the bounce pair.
    fn base_config(&self) -> DatapathConfig {
        DatapathConfig {
            uplink_ifindex: self.uplink_ifindex,
            flags: if self.decap_hook == DecapHook::Tc {
                DatapathConfig::TC_DECAP
            } else {
                0
            } | if self.debug_events {
                DatapathConfig::DEBUG_EVENTS
            } else {
                0
            },
            uplink_mtu: self.uplink_mtu,
            underlay_dscp: self.underlay_dscp.0,
            uplink_mac: self.uplink_mac,
            bounce_ifindex: self.bounce.0,
            bounce_peer: self.bounce.1,
            monitor: if self.watchers().is_empty() {
                0
            } else {
                DatapathConfig::MONITOR_DROPS
            },
            monitor_sample: self.watchers().sample(),
            ..DatapathConfig::default()
        }
    }

    fn watchers(&self) -> std::sync::MutexGuard<'_, crate::monitor::Watchers> {
        self.hub
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A client starts watching the datapath's events: the datapath reports drops (and
    /// samples, if asked) from now on.
    #[tracing::instrument(skip_all, fields(vsid = ?filter.vsid, reason = ?filter.reason, port = ?filter.port, sample = ?filter.sample))]
    pub fn watch(&mut self, filter: &crate::monitor::Filter) -> Result<crate::monitor::Watching> {
        if let Some(vsid) = filter.vsid {
            crate::model::validate_vsid(vsid)?;
        }
        if let Some(reason) = &filter.reason {
            let r = reason.strip_prefix("drop_").unwrap_or(reason);
            let known = nv_common::Counter::ALL.iter().any(|c| {
                let n = c.name();
                n.strip_prefix("drop_").unwrap_or(n) == r
            });
            if !known {
                return Err(invalid(format!(
                    "unknown reason '{reason}': `nvctl stats` lists them (drop_<reason>)"
                )));
            }
        }
        let names = self.port_names();
        let port = match &filter.port {
            Some(p) => Some(
                names
                    .iter()
                    .find(|(_, n)| *n == p)
                    .map(|(i, _)| *i)
                    .ok_or_else(|| {
                        NvError::NotFound(format!("no port '{p}' is filtered by nv here"))
                    })?,
            ),
            None => None,
        };
        let id = self.watchers().add(filter.sample.unwrap_or(0));
        self.update_config()?;
        Ok(crate::monitor::Watching {
            hub: self.hub.clone(),
            id,
            names,
            port,
        })
    }

    /// Turns the datapath's debug events on or off (`nvctl debug`): they are logged under
    /// `nv_datapath` while on; off, they cost a branch.
    pub fn set_debug(&mut self, on: bool) -> Result<bool> {
        if self.debug_events != on {
            self.debug_events = on;
            self.update_config()?;
            info!(
                "datapath debug events {}",
                if on {
                    "on: logged under nv_datapath"
                } else {
                    "off"
                }
            );
        }
        Ok(self.debug_events)
    }

    /// The datapath's sampling of forwarded packets now (0: none).
    pub fn monitor_sample(&self) -> u32 {
        self.watchers().sample()
    }

    /// The monitor's hub (to end its clients' streams when the agent stops).
    pub fn hub(&self) -> crate::monitor::Hub {
        self.hub.clone()
    }

    /// A client stopped watching; with none left, the datapath stops reporting.
    pub fn unwatch(&mut self, id: u64) {
        self.watchers().remove(id);
        if let Err(e) = self.update_config() {
            warn!("turning the monitor off: {}", crate::error::one_line(&e));
        }
    }

    /// The ports nv filters and the uplink, by ifindex.
    pub fn port_names(&self) -> HashMap<u32, String> {
        let mut names: HashMap<u32, String> = self
            .tables
            .ports
            .attached()
            .map(|(p, a)| (a.ifindex, p.clone()))
            .chain(self.tables.ports.orphans().map(|(p, i)| (*i, p.clone())))
            .collect();
        names.insert(self.uplink_ifindex, self.uplink.clone());
        names
    }

    /// Rewrites the config map after the uplink or the bounce pair changed.
    fn update_config(&mut self) -> Result<()> {
        self.tables.base = self.base_config();
        self.tables.sync_config(&mut self.datapath)
    }

    /// The MTU VMs must use: configured, or what fits the uplink after NVGRE.
    fn vm_mtu(&self) -> u32 {
        self.vm_mtu.unwrap_or_else(|| {
            #[expect(clippy::cast_possible_truncation, reason = "42")]
            let overhead = NVGRE_V4_OVERHEAD as u32;
            self.uplink_mtu.saturating_sub(overhead)
        })
    }

    /// Brings links, addresses and maps in line with the store: adds what is missing, removes
    /// what is stale, never flushes.
    async fn reconcile(&mut self) -> Result<()> {
        for p in self.tables.catalog.providers().to_vec() {
            let link = self.require_link(&p.dev, "provider device").await?;
            if p.rewrite {
                self.release_address(&p).await?;
                continue;
            }
            if !self.netlink.has_address(link.index, p.pa.addr).await? {
                warn!(
                    "provider address {} was missing from {}; adding it",
                    p.pa, p.dev
                );
                self.netlink
                    .add_address(link.index, p.pa.addr, p.pa.len)
                    .await?;
            }
        }
        // The ports that exist now; a record whose port is missing points at IFINDEX_GONE.
        let mut ports = HashMap::new();
        for r in self.tables.catalog.local() {
            let port = r.port.clone().unwrap_or_default();
            if let Some(link) = self.port_link(&port).await? {
                ports.insert(port, link);
            } else {
                warn!(
                    "port {port} of {} is missing; what is sent to it is dropped until it appears",
                    describe(&r)
                );
            }
        }
        // Maps first, programs second: after a migration the maps are new and empty, and
        // the programs that replace the running ones must find them full.
        let desired = translate::desired(
            &self.tables.catalog,
            |p| ports.get(p).map(Attached::of),
            &self.tables.base,
        );
        let mut repairs = self.datapath.sync(&desired)?;
        let fresh = self.datapath.fresh_maps().to_vec();
        repairs.retain(|(map, r)| {
            let filled = fresh.contains(map);
            if filled {
                info!("filled {map}: {} entries", r.written);
            }
            !filled
        });
        self.note_repairs("at start", &repairs);
        self.tables.config = desired.config;
        self.datapath.attach_uplink(&self.uplink, self.decap_hook)?;
        for link in ports.values() {
            if self.tables.ports.needs_filter(&link.name, link.index) {
                if let Err(e) = self.datapath.attach_port(&link.name) {
                    self.set_down(link, &e).await?;
                    continue;
                }
                self.set_port_mtu(link).await;
            }
            self.tables.ports.attach(&link.name, Attached::of(link));
        }
        if self.decap_hook == DecapHook::Tc {
            self.datapath.detach_uplink_xdp()?;
        }
        for stale in self.datapath.attached_ports()? {
            if ports.contains_key(&stale) {
                continue;
            }
            // Filtered before this start: it stays so while its device exists, whatever it
            // has become.
            if let Some(link) = self.netlink.link(&stale).await? {
                self.datapath.attach_port(&stale)?;
                info!("port {stale} has no record; it stays filtered, its frames dropped");
                self.tables.ports.orphan(&stale, link.index);
            } else {
                info!("detaching port {stale}: its device is gone");
                self.datapath.detach_port(&stale)?;
            }
        }
        info!(
            "reconciled: {} providers, {} lookup records, {} ports",
            self.tables.catalog.providers().len(),
            self.tables.catalog.len(),
            self.tables.ports.len()
        );
        Ok(())
    }

    /// Gives a tap port the VM MTU: its host side is what libvirt mirrors and QEMU's
    /// `host_mtu` tells a virtio guest, and a tap takes the guest's frames whatever its MTU.
    /// A veth is left alone: its VM end is in the VM's namespace, which rtnetlink cannot
    /// address for a change, and a host end smaller than the VM's would make the kernel drop
    /// the VM's bigger frames before nv sees them. Best effort either way: a VM that sends
    /// more than fits is answered with ICMP "fragmentation needed".
    async fn set_port_mtu(&self, link: &LinkInfo) {
        let mtu = self.vm_mtu();
        if link.kind != LinkKind::Tap || link.mtu == mtu {
            return;
        }
        if let Err(e) = self.netlink.set_mtu(link.index, mtu).await {
            warn!(
                "port {}: cannot set MTU {mtu}: {}",
                link.name,
                crate::error::one_line(&e)
            );
        }
    }

    /// The port called `name` if it exists and can be a VM port; anything else is treated
    /// as missing, and said so.
    async fn port_link(&self, name: &str) -> Result<Option<LinkInfo>> {
        match self.netlink.link(name).await? {
            Some(link) => match link.vm_port_refusal() {
                None => Ok(Some(link)),
                Some(why) => {
                    warn!("{why}; not attaching it");
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    /// Looks at every port again: a backstop for link events lost to a socket overrun.
    pub async fn refresh(&mut self) -> Result<()> {
        let ports: Vec<String> = self.tables.catalog.ports().map(str::to_owned).collect();
        for port in ports {
            self.refresh_port(&port).await?;
        }
        let orphans: Vec<(String, u32)> = self
            .tables
            .ports
            .orphans()
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (port, ifindex) in orphans {
            self.refresh_orphans(&port, ifindex).await?;
        }
        self.try_take_rewrite_pas().await;
        self.refresh_uplink().await
    }

    /// Follows a link event: the uplink's MTU, or a VM port that appeared, went down or up,
    /// vanished or was re-created.
    pub async fn link_changed(&mut self, name: &str, index: u32) -> Result<()> {
        if name == self.uplink {
            return self.refresh_uplink().await;
        }
        if crate::netlink::is_bounce(name) {
            return self.refresh_bounce().await;
        }
        if self.tables.catalog.by_port(name).is_some() {
            self.refresh_port(name).await?;
        }
        self.refresh_orphans(name, index).await?;
        // A port renamed away keeps its ifindex: the port of that name is gone.
        let renamed: Vec<String> = self
            .tables
            .ports
            .attached()
            .filter(|(port, a)| a.ifindex == index && port.as_str() != name)
            .map(|(port, _)| port.clone())
            .collect();
        for port in renamed {
            self.refresh_port(&port).await?;
        }
        Ok(())
    }

    /// The bounce pair deleted or replaced behind the agent's back: out of the config first
    /// (super-packets are dropped and counted meanwhile), then made again.
    async fn refresh_bounce(&mut self) -> Result<()> {
        let now = match (
            self.netlink.link(crate::netlink::BOUNCE).await?,
            self.netlink.link(crate::netlink::BOUNCE_PEER).await?,
        ) {
            (Some(a), Some(b)) => (a.index, b.index),
            _ => (0, 0),
        };
        if now == self.bounce && now.0 != 0 {
            return Ok(());
        }
        self.bounce = (0, 0);
        self.update_config()?;
        self.make_bounce().await?;
        self.update_config()?;
        info!("bounce pair {} ready again", crate::netlink::BOUNCE);
        Ok(())
    }

    /// Makes the bounce pair and puts its program on: only then may the config name it, so
    /// segments never reach a device without a program on it.
    async fn make_bounce(&mut self) -> Result<()> {
        let pair = self.netlink.bounce_pair().await?;
        self.datapath.attach_bounce(crate::netlink::BOUNCE_PEER)?;
        self.bounce = pair;
        Ok(())
    }

    /// Lets go of orphaned ports whose device is gone or was replaced (a new device of that
    /// name is not nv's).
    async fn refresh_orphans(&mut self, name: &str, index: u32) -> Result<()> {
        let touched: Vec<(String, u32)> = self
            .tables
            .ports
            .orphans()
            .filter(|(port, i)| port.as_str() == name || **i == index)
            .map(|(port, i)| (port.clone(), *i))
            .collect();
        for (port, ifindex) in touched {
            if self.netlink.link(&port).await?.map(|l| l.index) != Some(ifindex) {
                info!("port {port} (no record) is gone; releasing its filter");
                self.datapath.detach_port(&port)?;
                self.tables.ports.drop_orphan(&port);
            }
        }
        Ok(())
    }

    /// Follows the uplink's MTU: into the config map, and onto the ports when the VM MTU is
    /// derived from it.
    async fn refresh_uplink(&mut self) -> Result<()> {
        let link = self.require_link(&self.uplink.clone(), "uplink").await?;
        if link.mac != self.uplink_mac {
            info!("uplink {} MAC is now {:02x?}", self.uplink, link.mac);
            self.uplink_mac = link.mac;
            self.update_config()?;
        }
        if link.mtu == self.uplink_mtu {
            return Ok(());
        }
        info!(
            "uplink {} MTU changed from {} to {}",
            self.uplink, self.uplink_mtu, link.mtu
        );
        self.uplink_mtu = link.mtu;
        self.update_config()?;
        if self.vm_mtu.is_none() {
            let ports: Vec<String> = self
                .tables
                .ports
                .attached()
                .map(|(p, _)| p.clone())
                .collect();
            for port in ports {
                if let Some(link) = self.port_link(&port).await? {
                    self.set_port_mtu(&link).await;
                }
            }
        }
        Ok(())
    }

    /// Brings one VM port's map entries in line with its device.
    async fn refresh_port(&mut self, port: &str) -> Result<()> {
        let Some(record) = self.tables.catalog.by_port(port) else {
            return Ok(());
        };
        let link = self.port_link(port).await?;
        let before = self.tables.ports.get(port);
        let now = link.as_ref().map(Attached::of);
        if now == before {
            return Ok(());
        }
        info!(
            "port {port} of {} changed ({before:?} -> {now:?}); updating the datapath",
            describe(&record)
        );
        let filtered = before.is_none_or(|b| now.is_some_and(|n| n.ifindex != b.ifindex));
        let mut relinked = self.tables.relink(&mut self.datapath, port, now);
        if relinked.is_err() && !self.fd_reserve.is_empty() {
            // Perhaps out of descriptors: the reserve is for this.
            self.fd_reserve.clear();
            relinked = self.tables.relink(&mut self.datapath, port, now);
        }
        let Some(link) = link else {
            self.unfiltered.remove(port);
            return relinked.map(drop);
        };
        if let Err(e) = relinked {
            // A VM port nv cannot filter must not stay open to the host.
            return self.set_down(&link, &e).await;
        }
        if filtered {
            self.set_port_mtu(&link).await;
        }
        if self.unfiltered.remove(port) == Some(link.index) {
            info!("port {port} is filtered now; setting it up again");
            self.netlink.set_up(link.index, true).await?;
        }
        self.fd_reserve.refill();
        Ok(())
    }

    /// Sets a VM port that cannot be filtered down, through the netlink socket the agent
    /// holds (no new descriptor needed), and keeps it to try again.
    async fn set_down(&mut self, link: &LinkInfo, why: &NvError) -> Result<()> {
        if self.unfiltered.get(&link.name) != Some(&link.index) {
            self.ports_set_down += 1;
            tracing::error!(
                port = %link.name,
                "cannot filter port {} ({why}); setting it down until it can be",
                link.name
            );
        }
        self.unfiltered.insert(link.name.clone(), link.index);
        self.netlink.set_up(link.index, false).await
    }

    /// Whether a port nv set down waits to be filtered.
    pub fn has_unfiltered(&self) -> bool {
        !self.unfiltered.is_empty()
    }

    /// Tries again to filter the ports nv set down.
    pub async fn retry_unfiltered(&mut self) -> Result<()> {
        self.fd_reserve.refill();
        let ports: Vec<String> = self.unfiltered.keys().cloned().collect();
        for port in ports {
            self.refresh_port(&port).await?;
        }
        Ok(())
    }

    async fn require_link(&self, name: &str, what: &str) -> Result<LinkInfo> {
        self.netlink.link(name).await?.ok_or_else(|| {
            invalid(format!(
                "unknown {what} '{name}': no such interface on this host"
            ))
        })
    }

    /// Counts and logs what a sync of the maps had to repair (`when`: at start, or by the
    /// periodic reconcile).
    fn note_repairs(&mut self, when: &str, repairs: &[(&str, crate::datapath::Repair)]) {
        self.reconciles += 1;
        for (map, r) in repairs {
            self.repaired += u64::try_from(r.written + r.removed).unwrap_or(u64::MAX);
            warn!(
                map = *map,
                written = r.written,
                removed = r.removed,
                "repaired {map} {when}: {} entries written, {} removed, to match the store",
                r.written,
                r.removed
            );
        }
    }

    /// Compares every map the agent owns with the store and repairs what differs (an entry
    /// deleted or added behind the agent's back, by bpftool or another program): the
    /// periodic reconcile.
    pub fn reconcile_maps(&mut self) -> Result<()> {
        let desired = translate::desired(
            &self.tables.catalog,
            |p| self.tables.ports.get(p),
            &self.tables.base,
        );
        let repairs = self.datapath.sync(&desired)?;
        self.tables.config = desired.config;
        self.note_repairs("by the periodic reconcile", &repairs);
        Ok(())
    }

    pub fn status(&self) -> Status {
        let mut ports: Vec<PortStatus> = self
            .tables
            .ports
            .attached()
            .map(|(port, a)| PortStatus {
                port: port.clone(),
                kind: if a.flags & PortInfo::TAP != 0 {
                    "tap"
                } else {
                    "veth"
                }
                .into(),
                ifindex: a.ifindex,
                running: a.flags & PortInfo::DOWN == 0,
            })
            .collect();
        ports.sort_by(|a, b| a.port.cmp(&b.port));
        let mut ports_missing: Vec<String> = self
            .tables
            .catalog
            .ports()
            .filter(|p| !self.tables.ports.is_attached(p))
            .map(str::to_owned)
            .collect();
        ports_missing.sort();
        let mut ports_without_record: Vec<String> = self
            .tables
            .ports
            .orphans()
            .map(|(p, _)| p.clone())
            .collect();
        ports_without_record.sort();
        let (store_file, store_bytes) = self.store.file();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            programs: crate::programs_version(),
            store: store_file.display().to_string(),
            store_bytes,
            uplink: self.uplink.clone(),
            uplink_mtu: self.uplink_mtu,
            vm_mtu: self.vm_mtu(),
            decap_hook: format!("{:?}", self.decap_hook).to_lowercase(),
            underlay_dscp: self.underlay_dscp.to_string(),
            providers: self.tables.catalog.providers().len(),
            lookups: self.tables.catalog.len(),
            ports,
            ports_missing,
            ports_without_record,
            reconciles: self.reconciles,
            repaired: self.repaired,
            monitors: self.watchers().len(),
            debug_events: self.debug_events,
            cluster: self.cluster.as_ref().map(crate::cluster::Cluster::status),
            ports_set_down: {
                let mut down: Vec<String> = self.unfiltered.keys().cloned().collect();
                down.sort();
                down
            },
        }
    }

    pub fn providers(&self) -> Vec<ProviderState> {
        self.tables.catalog.providers().to_vec()
    }

    /// The records in (VSID, CA) order, of one VSID or all.
    pub fn lookups(&self, vsid: Option<u32>) -> Vec<LookupRecord> {
        self.tables.catalog.lookups(vsid)
    }

    /// A reader of the datapath's counters that needs no lock of the agent.
    pub fn counter_reader(&self) -> Result<crate::datapath::CounterReader> {
        crate::datapath::CounterReader::open(&self.pin_path)
    }

    /// What observation reads until the next change.
    pub fn published(&self) -> Published {
        Published {
            status: self.status(),
            metrics: self.metrics_base(),
        }
    }

    /// What a Prometheus scrape reports but the datapath's counters and per-VSID traffic,
    /// which the scrape reads from their maps ([`crate::metrics::Snapshot::complete`]).
    fn metrics_base(&self) -> crate::metrics::Snapshot {
        use nv_common::map_names as m;
        let status = self.status();
        let catalog = &self.tables.catalog;
        let known = |map: &str| -> Option<u64> {
            let n = match map {
                m::LOOKUPS => catalog.len(),
                m::PORTS => self.tables.ports.len(),
                m::LOCAL_PAS => catalog.providers().len(),
                m::REWRITE_PAS => catalog.rewrite_records(),
                m::HOSTED_VSIDS => translate::hosted_vsids(catalog).len(),
                _ => return None,
            };
            Some(n as u64)
        };
        let mut ports = std::collections::BTreeMap::new();
        for p in &status.ports {
            *ports.entry((p.kind.clone(), p.running)).or_default() += 1;
        }
        crate::metrics::Snapshot {
            version: status.version,
            programs: status.programs,
            counters: Vec::new(),
            maps: self
                .capacities
                .iter()
                .map(|(map, capacity)| crate::metrics::MapUse {
                    map,
                    entries: known(map),
                    capacity: *capacity,
                })
                .collect(),
            vsids: Vec::new(),
            providers: status.providers,
            lookups: status.lookups,
            ports,
            ports_missing: status.ports_missing.len(),
            ports_without_record: status.ports_without_record.len(),
            reconciles: self.reconciles,
            repaired: self.repaired,
            ports_set_down: self.ports_set_down,
            refused: Vec::new(),
            cluster: self.cluster.as_ref().map(crate::cluster::Cluster::status),
        }
    }

    /// Applies `changes` through the transaction path, with the ports in `links`, and gives
    /// the ports it filtered the VM MTU.
    async fn apply(
        &mut self,
        changes: &[Change],
        links: &HashMap<String, LinkInfo>,
        check: impl FnMut(&Catalog, &Change) -> Result<()>,
    ) -> Result<Applied> {
        let at: Links = links
            .iter()
            .map(|(p, l)| (p.clone(), Attached::of(l)))
            .collect();
        let applied = self
            .tables
            .apply(&self.store, &mut self.datapath, &at, changes, check)?;
        for port in &applied.filtered {
            if let Some(link) = links.get(port) {
                self.set_port_mtu(link).await;
            }
        }
        for port in &applied.released {
            info!("port {port} has no record now; it stays filtered, its frames dropped");
        }
        self.try_take_rewrite_pas().await;
        Ok(applied)
    }

    /// Rewrite PAs belong to the datapath: a provider address that a local VM's rewrite record
    /// uses becomes the datapath's (answered and filtered by it, in the maps first) and leaves
    /// the uplink, so no host process can bind it and the host's stack never answers for it,
    /// until the provider is deleted.
    pub(crate) async fn take_rewrite_pas(&mut self) -> Result<()> {
        let taken: Vec<ProviderState> = self
            .tables
            .catalog
            .providers()
            .iter()
            .filter(|p| !p.rewrite && self.tables.catalog.is_local_rewrite_pa(p.pa.addr))
            .map(|p| ProviderState {
                rewrite: true,
                ..p.clone()
            })
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        let changes: Vec<Change> = taken
            .iter()
            .map(|p| Change::PutProvider {
                provider: p.clone(),
            })
            .collect();
        self.tables.apply(
            &self.store,
            &mut self.datapath,
            &Links::default(),
            &changes,
            |_, _| Ok(()),
        )?;
        for p in &taken {
            info!(
                "provider address {} is a rewrite PA now: the datapath's, off {}",
                p.pa, p.dev
            );
            self.release_address(p).await?;
        }
        Ok(())
    }

    /// [`Agent::take_rewrite_pas`] after a change that went in: what fails is tried again at
    /// the next change and every look at the ports.
    pub(crate) async fn try_take_rewrite_pas(&mut self) {
        if let Err(e) = self.take_rewrite_pas().await {
            tracing::error!(
                "taking rewrite PAs off the host: {}; trying again shortly",
                crate::error::one_line(&e)
            );
        }
    }

    /// Takes a rewrite PA off its device, where the host's stack would answer for it.
    async fn release_address(&self, p: &ProviderState) -> Result<()> {
        if let Some(link) = self.netlink.link(&p.dev).await?
            && self.netlink.has_address(link.index, p.pa.addr).await?
        {
            info!(
                "taking rewrite PA {} off {}: the datapath answers for it",
                p.pa, p.dev
            );
            self.netlink.del_address(link.index, p.pa.addr).await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(pa = %p.pa, dev = ?p.dev))]
    pub async fn add_provider(&mut self, p: Provider) -> Result<ProviderState> {
        if !p.pa.addr.is_ipv4() {
            return Err(invalid(format!(
                "provider address {} is IPv6: the IPv6 underlay is not supported yet",
                p.pa
            )));
        }
        if p.pa.addr.is_unspecified()
            || p.pa.addr.is_multicast()
            || p.pa.addr.is_loopback()
            || p.pa.len == 0
        {
            return Err(invalid(format!(
                "provider address {} is not a usable unicast address with a prefix",
                p.pa
            )));
        }
        // The prefix becomes a route on the underlay: a short one would make much of the
        // Internet on-link there.
        if p.pa.len < MIN_PROVIDER_PREFIX {
            return Err(invalid(format!(
                "provider address {}: a prefix shorter than /{MIN_PROVIDER_PREFIX} would make \
                 that much address space on-link on the underlay; give the provider network's \
                 own prefix",
                p.pa
            )));
        }
        let remote = self.tables.catalog.remote_users_of(p.pa.addr);
        if remote > 0 {
            return Err(NvError::Conflict(format!(
                "provider address {} is another host's: {remote} lookup record(s) name it as \
                 the PA of a VM elsewhere; move or delete them first",
                p.pa.addr
            )));
        }
        let dev = p.dev.clone().unwrap_or_else(|| self.uplink.clone());
        validate_ifname("device", &dev)?;
        if dev != self.uplink {
            return Err(invalid(format!(
                "provider addresses go on the uplink ({}), not on '{dev}'",
                self.uplink
            )));
        }
        if let Some(existing) = self
            .tables
            .catalog
            .providers()
            .iter()
            .find(|e| e.pa.addr == p.pa.addr)
        {
            return Err(NvError::Conflict(format!(
                "provider address {} already exists on {}",
                existing.pa, existing.dev
            )));
        }
        let link = self.require_link(&dev, "device").await?;
        if let Some(other) = self.netlink.holder_of(p.pa.addr, link.index).await? {
            return Err(invalid(format!(
                "{} is an address of {other} on this host (the host's own): a provider \
                 address lives on the uplink ({dev}) alone",
                p.pa.addr
            )));
        }
        let present = self.netlink.has_address(link.index, p.pa.addr).await?;
        let state = ProviderState {
            pa: p.pa,
            dev,
            added_address: !present,
            rewrite: false,
        };
        if !present {
            self.netlink
                .add_address(link.index, p.pa.addr, p.pa.len)
                .await?;
        }
        let change = Change::PutProvider {
            provider: state.clone(),
        };
        if let Err(e) = self.apply(&[change], &HashMap::new(), |_, _| Ok(())).await {
            if !present {
                let _ = self.netlink.del_address(link.index, p.pa.addr).await;
            }
            return Err(e);
        }
        info!("added provider address {} on {}", state.pa, state.dev);
        if let Err(e) = self.retry_left_out().await {
            warn!(
                "trying the records left out again: {}",
                crate::error::one_line(&e)
            );
        }
        Ok(state)
    }

    #[tracing::instrument(skip(self))]
    pub async fn del_provider(&mut self, pa: IpAddr) -> Result<ProviderState> {
        let Some(removed) = self
            .tables
            .catalog
            .providers()
            .iter()
            .find(|p| p.pa.addr == pa)
            .cloned()
        else {
            return Err(NvError::NotFound(format!("no provider address {pa}")));
        };
        let users = self.tables.catalog.local_users_of(pa);
        if users > 0 {
            return Err(NvError::Conflict(format!(
                "provider address {pa} is used by {users} local lookup record(s); delete or move them first"
            )));
        }
        self.apply(
            &[Change::DelProvider { pa }],
            &HashMap::new(),
            |_, _| Ok(()),
        )
        .await?;
        // A rewrite PA left the host when the datapath took it.
        if removed.added_address
            && !removed.rewrite
            && let Some(link) = self.netlink.link(&removed.dev).await?
        {
            self.netlink.del_address(link.index, pa).await?;
        }
        info!("deleted provider address {}", removed.pa);
        if let Err(e) = self.retry_left_out().await {
            warn!(
                "trying the records left out again: {}",
                crate::error::one_line(&e)
            );
        }
        Ok(removed)
    }

    /// Checks what needs the host itself: the port exists, is a veth or tap, carries no host
    /// address and is not the uplink or nv's own. Returns the port's link.
    async fn check_port(&self, r: &LookupRecord) -> Result<Option<LinkInfo>> {
        let Some(port) = &r.port else {
            return Ok(None);
        };
        if let Some(why) = cluster_ops::port_refusal(r, &self.uplink) {
            return Err(invalid(why));
        }
        let link = self.require_link(port, "port").await?;
        self.check_vm_link(&link).await?;
        Ok(Some(link))
    }

    /// Whether the device `link` can be a VM's port: a veth (its other end elsewhere) or a
    /// tap, of no bridge, carrying no address of the host's.
    async fn check_vm_link(&self, link: &LinkInfo) -> Result<()> {
        let port = &link.name;
        if let Some(why) = link.vm_port_refusal() {
            return Err(invalid(why));
        }
        // A device the host itself talks through is not a VM's port.
        if let Some(addr) = self.netlink.routable_addresses(link.index).await?.first() {
            return Err(invalid(format!(
                "port '{port}' carries the host address {addr}: a VM's port carries none"
            )));
        }
        Ok(())
    }

    /// Alone (not in cluster mode), a record's VM port is this host's: naming another host
    /// needs cluster mode.
    fn own_host(&self, mut r: LookupRecord) -> Result<LookupRecord> {
        match r.host.take() {
            Some(h) if h != self.host_name => Err(invalid(format!(
                "host '{h}' is not this host ({}): records name other hosts in cluster mode \
                 only (etcd_endpoints)",
                self.host_name
            ))),
            _ => Ok(r),
        }
    }

    fn check_capacity(&self, adding: usize) -> Result<()> {
        let len = self.tables.catalog.len();
        if len + adding > usize::try_from(self.max_lookups).unwrap_or(usize::MAX) {
            return Err(NvError::Conflict(format!(
                "lookup table full: {len} entries of {}, {adding} more asked for; raise max_lookups",
                self.max_lookups
            )));
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(vsid = r.vsid, ca = %r.ca, pa = %r.pa, port = ?r.port))]
    pub async fn add_lookup(&mut self, r: LookupRecord) -> Result<LookupRecord> {
        let r = self.own_host(r)?;
        r.validate()?;
        self.tables.catalog.check(&r, None)?;
        self.check_capacity(1)?;
        let links = self.check_port(&r).await?.map(|l| (l.name.clone(), l));
        let change = Change::PutLookup { record: r.clone() };
        self.apply(&[change], &links.into_iter().collect(), |c, _| {
            c.check(&r, None)
        })
        .await?;
        info!("added lookup record {}", describe(&r));
        Ok(r)
    }

    /// Adds many records as one change: each is checked against the table and the ones before
    /// it, then all are mapped and stored, or none.
    #[tracing::instrument(skip_all, fields(records = records.len()))]
    pub async fn import_lookups(&mut self, records: Vec<LookupRecord>) -> Result<usize> {
        let started = std::time::Instant::now();
        let records = records
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                self.own_host(r)
                    .map_err(|e| invalid(format!("record {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>>>()?;
        self.check_capacity(records.len())?;
        let mut links = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            let link = match r.validate() {
                Ok(()) => self.check_port(r).await,
                Err(e) => Err(e),
            };
            match link {
                Ok(Some(link)) => {
                    links.insert(link.name.clone(), link);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(invalid(format!("record {} ({}): {e}", i + 1, describe(r))));
                }
            }
        }
        let n = records.len();
        let checked = started.elapsed();
        let changes: Vec<Change> = records
            .into_iter()
            .map(|record| Change::PutLookup { record })
            .collect();
        let mut i = 0;
        let applied = self
            .apply(&changes, &links, |c, change| {
                i += 1;
                match change {
                    Change::PutLookup { record } => c
                        .check(record, None)
                        .map_err(|e| invalid(format!("record {i} ({}): {e}", describe(record)))),
                    _ => Ok(()),
                }
            })
            .await;
        drop(changes);
        if n >= 4096 {
            // The request's records and the plan were a few hundred bytes a record; give the
            // pages back rather than keep them as the agent's for the next import.
            // SAFETY: malloc_trim only releases free memory of this process's heap.
            unsafe { libc::malloc_trim(0) };
        }
        applied?;
        info!(
            records = n,
            "imported {n} lookup records in {} ms ({} ms checking them on their own)",
            started.elapsed().as_millis(),
            checked.as_millis()
        );
        Ok(n)
    }

    #[tracing::instrument(skip(self))]
    pub async fn del_lookup(&mut self, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
        let Some(removed) = self.tables.catalog.get(&(vsid, ca)) else {
            return Err(NvError::NotFound(format!(
                "no lookup record for VSID {vsid} CA {ca}"
            )));
        };
        self.apply(
            &[Change::DelLookup { vsid, ca }],
            &HashMap::new(),
            |_, _| Ok(()),
        )
        .await?;
        info!("deleted lookup record {}", describe(&removed));
        Ok(removed)
    }

    /// Replaces a record's PA and port in one change (migration).
    #[tracing::instrument(skip_all, fields(vsid = m.vsid, ca = %m.ca, pa = %m.pa, port = ?m.port))]
    pub async fn move_lookup(&mut self, m: MoveRequest) -> Result<LookupRecord> {
        let key = (m.vsid, m.ca);
        let Some(old) = self.tables.catalog.get(&key) else {
            return Err(NvError::NotFound(format!(
                "no lookup record for VSID {} CA {}",
                m.vsid, m.ca
            )));
        };
        let mut moved = old;
        moved.pa = m.pa;
        moved.port = m.port;
        moved.host = m.host;
        let moved = self.own_host(moved)?;
        moved.validate()?;
        self.tables.catalog.check(&moved, Some(&key))?;
        let links = self.check_port(&moved).await?.map(|l| (l.name.clone(), l));
        let change = Change::PutLookup {
            record: moved.clone(),
        };
        self.apply(&[change], &links.into_iter().collect(), |c, _| {
            c.check(&moved, Some(&key))
        })
        .await?;
        info!(
            "moved lookup record {} to PA {}",
            describe(&moved),
            moved.pa
        );
        Ok(moved)
    }

    /// Runs one packet through a tracing copy of the programs on the live maps (`nvctl
    /// trace`): what it is, which records decided, where it went, and what left.
    #[tracing::instrument(skip_all, fields(port = ?req.port, from_uplink = req.from_uplink, dst = ?req.dst))]
    pub fn trace(&mut self, req: &crate::trace::Request) -> Result<crate::trace::Outcome> {
        let host = crate::trace::Host {
            tables: &self.tables,
            uplink: &self.uplink,
            uplink_ifindex: self.uplink_ifindex,
            uplink_mac: self.uplink_mac,
            xdp: self.decap_hook == DecapHook::Xdp,
        };
        let built = crate::trace::build(&host, req)?;
        if self.tracer.is_none() {
            self.tracer = Some(Datapath::load_tracer(&self.pin_path, self.max_lookups)?);
        }
        let tracer = self.tracer.as_ref().expect("loaded above");
        let before = tracer.counters()?;
        let run = tracer.test_run(built.program, &built.frame, built.ifindex, 1)?;
        let counted: Vec<&'static str> = tracer
            .counters()?
            .iter()
            .zip(&before)
            .filter(|((_, after), (_, was))| after > was)
            .map(|((c, _), _)| c.name())
            .collect();
        Ok(crate::trace::outcome(
            built,
            &run,
            &counted,
            &self.port_names(),
            req,
        ))
    }
}
