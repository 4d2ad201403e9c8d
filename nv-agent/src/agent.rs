//! The agent: the host around the transaction path. It resolves what needs the host (links,
//! addresses, the bounce pair) and hands every change to [`Tables::apply`] (see `txn`), which
//! applies it to catalog, maps and store as a whole or not at all. Start-up and the periodic
//! reconcile compare the whole table with the maps; changes touch only their own entries.
use std::collections::HashMap;

use nv_common::{DatapathConfig, wire::nvgre_overhead};
use tracing::{info, warn};

use crate::{
    catalog::{Catalog, describe},
    config::{Config, DecapHook},
    datapath::Datapath,
    error::{NvError, Result, invalid},
    netlink::{LinkInfo, Netlink},
    translate::{self, Attached},
    txn::{Applied, Links, Tables},
    {store::Store, tables::Change},
};

mod acls;
mod cluster_ops;
mod dhcp;
mod observe;
mod records;
mod routes;
mod underlay_hops;
mod uplink;
mod vm_ports;

pub use observe::{PortStatus, Published, Status};
use vm_ports::FdReserve;

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
        Change::PutRoute { route } => {
            catalog.routes_mut().insert(route);
        }
        Change::DelRoute {
            rdid,
            prefix,
            nexthop,
        } => {
            catalog.routes_mut().remove(&(rdid, prefix, nexthop));
        }
        Change::PutAcl { rule } => {
            catalog.acls_mut().insert(rule);
        }
        Change::DelAcl { id } => {
            catalog.acls_mut().remove(id);
        }
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
        let cluster = config.etcd()?.map(|access| {
            let (revision, _) = store.cluster_cache().unwrap_or_default();
            crate::cluster::Cluster::new(config.host_name.clone(), &access, revision)
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
        catalog.acls_mut().max_flows = config.acl_max_flows;
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
        crate::datapath::set_router_mac(config.router_mac.0);
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
        // Connections an earlier run tracked that the rules no longer admit (it may have
        // stopped between a change and its cut).
        agent.cut_flows();
        // A store of an agent before rewrite PAs were the datapath's.
        agent.take_rewrite_pas().await?;
        agent.datapath.finish_migration()?;
        agent.capacities = agent.datapath.capacities();
        Ok(agent)
    }

    /// The config map without the rewrite-PA filter: the uplink, its MTU, MAC and hook, the
    /// DSCP policy and the bounce pair.
    pub(super) fn base_config(&self) -> DatapathConfig {
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

    /// Rewrites the config map after the uplink or the bounce pair changed.
    pub(super) fn update_config(&mut self) -> Result<()> {
        self.tables.base = self.base_config();
        self.tables.sync_config(&mut self.datapath)
    }

    /// The MTU VMs with an IPv4 PA must use: configured, or what fits the uplink after NVGRE.
    pub(super) fn vm_mtu(&self) -> u32 {
        self.vm_mtu_over(std::net::Ipv4Addr::UNSPECIFIED.into())
    }

    /// The MTU a VM whose PA is `pa` must use: configured, or what fits the uplink after
    /// NVGRE over `pa`'s family (20 bytes less over IPv6).
    pub(super) fn vm_mtu_over(&self, pa: std::net::IpAddr) -> u32 {
        self.vm_mtu.unwrap_or_else(|| {
            let overhead = nvgre_overhead(&crate::translate::addr16(pa));
            #[expect(clippy::cast_possible_truncation, reason = "42 or 62")]
            self.uplink_mtu.saturating_sub(overhead as u32)
        })
    }

    /// Brings links, addresses and maps in line with the store: adds what is missing, removes
    /// what is stale, never flushes.
    pub(super) async fn reconcile(&mut self) -> Result<()> {
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

    pub(super) async fn require_link(&self, name: &str, what: &str) -> Result<LinkInfo> {
        self.netlink.link(name).await?.ok_or_else(|| {
            invalid(format!(
                "unknown {what} '{name}': no such interface on this host"
            ))
        })
    }

    /// Counts and logs what a sync of the maps had to repair (`when`: at start, or by the
    /// periodic reconcile).
    pub(super) fn note_repairs(&mut self, when: &str, repairs: &[(&str, crate::datapath::Repair)]) {
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

    /// Applies `changes` through the transaction path, with the ports in `links`, and gives
    /// the ports it filtered the VM MTU.
    pub(super) async fn apply(
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
}
