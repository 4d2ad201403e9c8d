//! The agent's operations. A change is validated against the catalog (O(1) per record, see
//! `catalog`), written to the store's journal, then applied to the maps entry by entry; if the
//! datapath refuses, the store, catalog and maps are put back, so a change is applied whole or
//! not at all. Only start-up compares the whole table with the maps.
use std::{collections::HashMap, net::IpAddr};

use nv_common::{
    DatapathConfig, IFINDEX_GONE, LocalPa, LookupKey, LookupValue, PortInfo, RewritePa, V4,
    v4_mapped, wire::NVGRE_V4_OVERHEAD,
};
use tracing::{info, warn};

use crate::{
    catalog::{Catalog, Key, describe},
    config::{Config, DecapHook},
    datapath::{Datapath, Desired},
    error::{NvError, Result, invalid},
    model::{LookupRecord, Method, Provider, ProviderState, validate_ifname},
    netlink::{LinkInfo, LinkKind, Netlink},
    store::{Change, Store},
};

pub struct Agent {
    uplink: String,
    uplink_ifindex: u32,
    uplink_mac: [u8; 6],
    decap_hook: DecapHook,
    max_lookups: u32,
    store: Store,
    catalog: Catalog,
    datapath: Datapath,
    netlink: Netlink,
    /// Ports with the from-VM program attached, as they were then. A record whose port is
    /// missing stays in the maps with `IFINDEX_GONE`, so what is sent to it is dropped as
    /// such, until the port appears.
    attached: HashMap<String, Attached>,
    /// Ports nv attached that no record names any more (deleted or moved away while the VM
    /// runs), by ifindex: their filter stays, with no port entry, so every frame they send is
    /// dropped and counted, until the device goes.
    orphans: HashMap<String, u32>,
    /// What the config map holds.
    config: DatapathConfig,
    uplink_mtu: u32,
    /// The configured VM MTU; `None`: derived from the uplink's.
    vm_mtu: Option<u32>,
    underlay_dscp: crate::config::DscpPolicy,
    /// Reconciliations of the maps against the store, and the entries they had to repair.
    reconciles: u64,
    repaired: u64,
    /// The bounce pair's ifindexes (both 0: none, a VM tunnel's super-packets are dropped).
    bounce: (u32, u32),
}

/// A port as the agent attached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attached {
    ifindex: u32,
    /// `PortInfo::flags` as written.
    flags: u8,
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
}

fn addr16(ip: IpAddr) -> nv_common::Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn datapath_method(m: Method) -> nv_common::Method {
    match m {
        Method::Encap => nv_common::Method::Encap,
        Method::Rewrite => nv_common::Method::Rewrite,
    }
}

/// The IPv4 form of an address in a map key. IPv6 customer and provider addresses are refused
/// before they get here (model.rs), and the datapath has no IPv6 maps yet.
fn key_v4(ip: IpAddr) -> V4 {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or([0; 4], |v4| v4.octets()),
    }
}

fn lookup_key(key: &Key) -> LookupKey {
    LookupKey {
        vsid: key.0,
        ca: key_v4(key.1),
    }
}

/// The datapath's flags of a VM port.
fn port_flags(link: &LinkInfo) -> u8 {
    let mut flags = 0;
    if link.kind == LinkKind::Tap {
        flags |= PortInfo::TAP;
    }
    if !link.running {
        flags |= PortInfo::DOWN;
    }
    flags
}

/// The map entries of one record whose port (if any) is `at` (ifindex, flags); a record
/// whose port is missing points at `IFINDEX_GONE`.
struct Entries {
    key: LookupKey,
    value: LookupValue,
    port: Option<PortInfo>,
    rewrite: Option<(V4, RewritePa)>,
}

fn entries(r: &LookupRecord, at: Option<Attached>) -> Entries {
    let method = datapath_method(r.method) as u8;
    let ifindex = match (&r.port, at) {
        (Some(_), Some(a)) => a.ifindex,
        (Some(_), None) => IFINDEX_GONE,
        (None, _) => 0,
    };
    Entries {
        key: lookup_key(&r.key()),
        value: LookupValue {
            pa: addr16(r.pa),
            mac: r.mac.0,
            method,
            _pad: 0,
            ifindex,
        },
        port: at.filter(|_| r.port.is_some()).map(|a| PortInfo {
            vsid: r.vsid,
            ca: addr16(r.ca),
            pa: addr16(r.pa),
            mac: r.mac.0,
            method,
            flags: a.flags,
        }),
        rewrite: (r.method == Method::Rewrite).then(|| {
            (
                key_v4(r.pa),
                RewritePa {
                    vsid: r.vsid,
                    ca: addr16(r.ca),
                    mac: r.mac.0,
                    _pad: [0; 2],
                    ifindex,
                },
            )
        }),
    }
}

fn apply_change(catalog: &mut Catalog, change: Change) {
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
        let (mut store, state, changes) = Store::open(&config.state_dir)?;
        let mut catalog = Catalog::from_state(state)?;
        if !changes.is_empty() || store.needs_snapshot() {
            for c in changes {
                apply_change(&mut catalog, c);
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
            catalog,
            datapath,
            netlink,
            attached: HashMap::new(),
            orphans: HashMap::new(),
            config: DatapathConfig::default(),
            uplink_mtu: link.mtu,
            vm_mtu: config.vm_mtu,
            underlay_dscp: config.underlay_dscp,
            reconciles: 0,
            repaired: 0,
            bounce: (0, 0),
        };
        if let Err(e) = agent.make_bounce().await {
            warn!(
                "no bounce pair ({e}): super-packets of VMs' own tunnels will be dropped as drop_vm_nested_gso"
            );
        }
        agent.reconcile().await?;
        agent.datapath.finish_migration()?;
        Ok(agent)
    }

    /// The config map: the uplink, its MTU and hook, and the rewrite PAs of the VMs of this
    /// host in the uplink's filter, whether their port exists now or not (traffic to a local
    /// VM's PA is its, or dropped: never the host's).
    fn datapath_config(&self) -> DatapathConfig {
        let mut config = DatapathConfig {
            uplink_ifindex: self.uplink_ifindex,
            flags: if self.decap_hook == DecapHook::Tc {
                DatapathConfig::TC_DECAP
            } else {
                0
            },
            uplink_mtu: self.uplink_mtu,
            underlay_dscp: self.underlay_dscp.0,
            uplink_mac: self.uplink_mac,
            bounce_ifindex: self.bounce.0,
            bounce_peer: self.bounce.1,
            ..DatapathConfig::default()
        };
        for port in self.catalog.ports() {
            if let Some(r) = self.catalog.by_port(port)
                && r.method == Method::Rewrite
                && let IpAddr::V4(pa) = r.pa
            {
                config.add_rewrite_pa(pa.octets());
            }
        }
        config
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
        for p in self.catalog.providers().to_vec() {
            let link = self.require_link(&p.dev, "provider device").await?;
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
        // Maps first, programs second: after a migration the maps are new and empty, and
        // the programs that replace the running ones must find them full.
        let (desired, ports) = self.desired().await?;
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
        self.config = desired.config;
        self.datapath.attach_uplink(&self.uplink, self.decap_hook)?;
        self.attach_ports(&ports).await?;
        if self.decap_hook == DecapHook::Tc {
            self.datapath.detach_uplink_xdp()?;
        }
        for stale in self.datapath.attached_ports()? {
            if ports.contains_key(&stale) {
                continue;
            }
            // Filtered before this start: it stays so while its device exists.
            if let Some(link) = self.port_link(&stale).await? {
                self.datapath.attach_port(&stale)?;
                info!("port {stale} has no record; it stays filtered, its frames dropped");
                self.orphans.insert(stale, link.index);
            } else {
                info!("detaching port {stale}: its device is gone");
                self.datapath.detach_port(&stale)?;
            }
        }
        info!(
            "reconciled: {} providers, {} lookup records, {} ports",
            self.catalog.providers().len(),
            self.catalog.len(),
            self.attached.len()
        );
        Ok(())
    }

    /// Attaches the from-VM program to ports that are new or were re-created (new ifindex).
    async fn attach_ports(&mut self, ports: &HashMap<String, LinkInfo>) -> Result<()> {
        for link in ports.values() {
            self.attach_port(link).await?;
        }
        Ok(())
    }

    /// Attaches the from-VM program to the port `link` unless it is attached at this ifindex
    /// already, and gives a new port the VM MTU.
    async fn attach_port(&mut self, link: &LinkInfo) -> Result<Attached> {
        let at = Attached {
            ifindex: link.index,
            flags: port_flags(link),
        };
        let before = self
            .attached
            .get(&link.name)
            .map(|a| a.ifindex)
            .or_else(|| self.orphans.remove(&link.name));
        if before != Some(link.index) {
            self.datapath.attach_port(&link.name)?;
            self.set_port_mtu(link).await;
        }
        self.attached.insert(link.name.clone(), at);
        Ok(at)
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
            warn!("port {}: cannot set MTU {mtu}: {e}", link.name);
        }
    }

    /// The port called `name` if it exists and can be a VM port (veth or tap); anything else
    /// is treated as missing, and said so.
    async fn port_link(&self, name: &str) -> Result<Option<LinkInfo>> {
        match self.netlink.link(name).await? {
            Some(link) if matches!(link.kind, LinkKind::Veth | LinkKind::Tap) => Ok(Some(link)),
            Some(link) => {
                warn!(
                    "port {name} is a {} device now, not a veth or tap; not attaching it",
                    link.kind
                );
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Looks at every port again: a backstop for link events lost to a socket overrun.
    pub async fn refresh(&mut self) -> Result<()> {
        let ports: Vec<String> = self.catalog.ports().cloned().collect();
        for port in ports {
            self.refresh_port(&port).await?;
        }
        let orphans: Vec<(String, u32)> =
            self.orphans.iter().map(|(p, i)| (p.clone(), *i)).collect();
        for (port, ifindex) in orphans {
            self.refresh_orphans(&port, ifindex).await?;
        }
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
        if self.catalog.by_port(name).is_some() {
            self.refresh_port(name).await?;
        }
        self.refresh_orphans(name, index).await?;
        // A port renamed away keeps its ifindex: the port of that name is gone.
        let renamed: Vec<String> = self
            .attached
            .iter()
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
            .orphans
            .iter()
            .filter(|(port, i)| port.as_str() == name || **i == index)
            .map(|(port, i)| (port.clone(), *i))
            .collect();
        for (port, ifindex) in touched {
            if self.netlink.link(&port).await?.map(|l| l.index) != Some(ifindex) {
                info!("port {port} (no record) is gone; releasing its filter");
                self.datapath.detach_port(&port)?;
                self.orphans.remove(&port);
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
            let ports: Vec<String> = self.attached.keys().cloned().collect();
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
        let Some(record) = self.catalog.by_port(port).cloned() else {
            return Ok(());
        };
        let link = self.port_link(port).await?;
        let before = self.attached.get(port).copied();
        let now = link.as_ref().map(|l| Attached {
            ifindex: l.index,
            flags: port_flags(l),
        });
        if now == before {
            return Ok(());
        }
        info!(
            "port {port} of {} changed ({before:?} -> {now:?}); updating the datapath",
            describe(&record)
        );
        if let Some(link) = &link {
            self.map_at(&record, Some(link)).await?;
        } else {
            self.attached.remove(port);
            self.map_at(&record, None).await?;
        }
        if let Some(old) = before
            && now.is_none_or(|n| n.ifindex != old.ifindex)
        {
            self.datapath.del_port(old.ifindex)?;
        }
        Ok(())
    }

    async fn require_link(&self, name: &str, what: &str) -> Result<crate::netlink::LinkInfo> {
        self.netlink.link(name).await?.ok_or_else(|| {
            invalid(format!(
                "unknown {what} '{name}': no such interface on this host"
            ))
        })
    }

    async fn local_pas(&self) -> Result<HashMap<V4, LocalPa>> {
        let mut out = HashMap::new();
        for p in self.catalog.providers() {
            let Some(link) = self.netlink.link(&p.dev).await? else {
                warn!("provider device {} of {} is missing", p.dev, p.pa);
                continue;
            };
            out.insert(
                key_v4(p.pa.addr),
                LocalPa {
                    ifindex: link.index,
                },
            );
        }
        Ok(out)
    }

    /// Everything the maps must hold, and the ports that exist now.
    async fn desired(&self) -> Result<(Desired, HashMap<String, LinkInfo>)> {
        let mut d = Desired {
            local_pas: self.local_pas().await?,
            ..Desired::default()
        };
        let mut ports = HashMap::new();
        for r in self.catalog.lookups() {
            let at = if let Some(port) = &r.port {
                let link = self.port_link(port).await?;
                if link.is_none() {
                    warn!(
                        "port {port} of {} is missing; what is sent to it is dropped until it appears",
                        describe(r)
                    );
                }
                link.map(|link| {
                    let at = Attached {
                        ifindex: link.index,
                        flags: port_flags(&link),
                    };
                    ports.insert(port.clone(), link);
                    at
                })
            } else {
                None
            };
            let e = entries(r, at);
            d.lookups.insert(e.key, e.value);
            if let Some(p) = e.port {
                d.ports.insert(e.value.ifindex, p);
            }
            if let Some((pa, v)) = e.rewrite {
                d.rewrite_pas.insert(pa, v);
            }
        }
        d.hosted_vsids = self.hosted_vsids();
        d.config = self.datapath_config();
        Ok((d, ports))
    }

    /// Puts one record's entries in the maps; a record whose port is missing points at
    /// `IFINDEX_GONE` until `refresh_port` sees the port.
    async fn map(&mut self, r: &LookupRecord) -> Result<()> {
        let link = match &r.port {
            Some(port) => self.port_link(port).await?,
            None => None,
        };
        self.map_at(r, link.as_ref()).await
    }

    async fn map_at(&mut self, r: &LookupRecord, link: Option<&LinkInfo>) -> Result<()> {
        let at = match link {
            Some(link) => Some(self.attach_port(link).await?),
            None => None,
        };
        let e = entries(r, at);
        if let Some(p) = &e.port {
            self.datapath.put_port(e.value.ifindex, p)?;
        }
        if r.port.is_some() {
            self.sync_hosted()?;
        }
        if let Some((pa, v)) = &e.rewrite {
            self.datapath.put_rewrite(pa, v)?;
        }
        self.datapath.put_lookup(&e.key, &e.value)?;
        if r.port.is_some() && e.rewrite.is_some() {
            self.update_config()?;
        }
        Ok(())
    }

    /// Takes out of the maps what `old` had and `new` (its replacement, if any) does not
    /// reuse, detaching a port no longer used.
    fn unmap_stale(&mut self, old: &LookupRecord, new: Option<&LookupRecord>) -> Result<()> {
        let e = entries(old, None);
        if new.is_none_or(|n| n.key() != old.key()) {
            self.datapath.del_lookup(&e.key)?;
        }
        if let Some((pa, _)) = &e.rewrite
            && new.is_none_or(|n| n.pa != old.pa || n.method != Method::Rewrite)
        {
            self.datapath.del_rewrite(pa)?;
        }
        if let Some(port) = &old.port
            && new.is_none_or(|n| n.port.as_ref() != Some(port))
        {
            if let Some(a) = self.attached.remove(port) {
                // Its VM may still run: the filter stays, and with no port entry every frame
                // it sends is dropped (a bare port would reach the host's stack).
                self.datapath.del_port(a.ifindex)?;
                info!("port {port} has no record now; it stays filtered, its frames dropped");
                self.orphans.insert(port.clone(), a.ifindex);
            }
            self.sync_hosted()?;
        }
        if old.port.is_some() && e.rewrite.is_some() {
            self.update_config()?;
        }
        Ok(())
    }

    /// After a rollback put the maps back to `desired`: the ports its records name are the
    /// attached ones again (their filters never left); others attached meanwhile are orphans.
    fn adopt(&mut self, ports: &HashMap<String, LinkInfo>) {
        let released: Vec<(String, u32)> = self
            .attached
            .iter()
            .filter(|(p, _)| !ports.contains_key(*p))
            .map(|(p, a)| (p.clone(), a.ifindex))
            .collect();
        for (port, ifindex) in released {
            // Attached for a record rolled back: filtered, no record, like any orphan.
            self.attached.remove(&port);
            self.orphans.insert(port, ifindex);
        }
        for (name, link) in ports {
            self.orphans.remove(name);
            self.attached.entry(name.clone()).or_insert(Attached {
                ifindex: link.index,
                flags: port_flags(link),
            });
        }
    }

    /// VSIDs with a VM on this host (whether its port exists now or not).
    fn hosted_vsids(&self) -> HashMap<u32, u32> {
        let mut hosted = HashMap::new();
        for port in self.catalog.ports() {
            if let Some(r) = self.catalog.by_port(port) {
                *hosted.entry(r.vsid).or_default() += 1;
            }
        }
        hosted
    }

    /// Rewrites the hosted-VSID map: only when ports came or went (it walks the ports).
    fn sync_hosted(&mut self) -> Result<()> {
        let hosted = self.hosted_vsids();
        self.datapath.sync_hosted_vsids(&hosted)
    }

    /// Rewrites the config map after a local VM's rewrite PA, or the uplink's MTU, changed.
    fn update_config(&mut self) -> Result<()> {
        let config = self.datapath_config();
        if config != self.config {
            self.datapath.set_config(config)?;
            self.config = config;
        }
        Ok(())
    }

    /// Replaces `old` by `new` in the maps, new entries first and stale ones last, so a record
    /// being replaced never disappears in between; on failure puts the catalog, the store and
    /// the maps back as they were and returns the error.
    async fn remap(
        &mut self,
        old: Option<&LookupRecord>,
        new: Option<&LookupRecord>,
    ) -> Result<()> {
        let applied = async {
            if let Some(n) = new {
                self.map(n).await?;
            }
            if let Some(o) = old {
                self.unmap_stale(o, new)?;
            }
            Ok::<(), NvError>(())
        }
        .await;
        if let Err(e) = applied {
            warn!("datapath refused the change, rolling back: {e}");
            let mut undo = Vec::new();
            if let Some(n) = new {
                self.catalog.remove(&n.key());
                undo.push(Change::DelLookup {
                    vsid: n.vsid,
                    ca: n.ca,
                });
            }
            if let Some(o) = old {
                self.catalog.insert(o.clone());
                undo.push(Change::PutLookup { record: o.clone() });
            }
            self.store.append(&undo)?;
            let (desired, ports) = self.desired().await?;
            self.datapath.sync(&desired)?;
            self.adopt(&ports);
            self.config = desired.config;
            return Err(e);
        }
        Ok(())
    }

    fn journal(&mut self, changes: &[Change]) -> Result<()> {
        self.store.append(changes)
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
    pub async fn reconcile_maps(&mut self) -> Result<()> {
        let (desired, _) = self.desired().await?;
        let repairs = self.datapath.sync(&desired)?;
        self.config = desired.config;
        self.note_repairs("by the periodic reconcile", &repairs);
        Ok(())
    }

    pub fn status(&self) -> Status {
        let mut ports: Vec<PortStatus> = self
            .attached
            .iter()
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
            .catalog
            .ports()
            .filter(|p| !self.attached.contains_key(*p))
            .cloned()
            .collect();
        ports_missing.sort();
        let mut ports_without_record: Vec<String> = self.orphans.keys().cloned().collect();
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
            providers: self.catalog.providers().len(),
            lookups: self.catalog.len(),
            ports,
            ports_missing,
            ports_without_record,
            reconciles: self.reconciles,
            repaired: self.repaired,
        }
    }

    pub fn providers(&self) -> Vec<ProviderState> {
        self.catalog.providers().to_vec()
    }

    /// The records in (VSID, CA) order, of one VSID or all.
    pub fn lookups(&self, vsid: Option<u32>) -> Vec<LookupRecord> {
        self.catalog
            .lookups()
            .filter(|r| vsid.is_none_or(|v| r.vsid == v))
            .cloned()
            .collect()
    }

    pub fn counters(&self) -> Result<Vec<(nv_common::Counter, u64)>> {
        self.datapath.counters()
    }

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
        let dev = p.dev.clone().unwrap_or_else(|| self.uplink.clone());
        validate_ifname("device", &dev)?;
        if dev != self.uplink {
            return Err(invalid(format!(
                "provider addresses go on the uplink ({}), not on '{dev}'",
                self.uplink
            )));
        }
        if let Some(existing) = self
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
        let present = self.netlink.has_address(link.index, p.pa.addr).await?;
        let state = ProviderState {
            pa: p.pa,
            dev,
            added_address: !present,
        };
        self.journal(&[Change::PutProvider {
            provider: state.clone(),
        }])?;
        self.catalog.providers_mut().push(state.clone());
        let applied = async {
            if !present {
                self.netlink
                    .add_address(link.index, p.pa.addr, p.pa.len)
                    .await?;
            }
            let local = self.local_pas().await?;
            self.datapath.sync_local_pas(&local)
        }
        .await;
        if let Err(e) = applied {
            self.catalog
                .providers_mut()
                .retain(|e| e.pa.addr != p.pa.addr);
            self.store
                .append(&[Change::DelProvider { pa: p.pa.addr }])?;
            if !present {
                let _ = self.netlink.del_address(link.index, p.pa.addr).await;
            }
            let local = self.local_pas().await?;
            self.datapath.sync_local_pas(&local)?;
            return Err(e);
        }
        info!("added provider address {} on {}", state.pa, state.dev);
        Ok(state)
    }

    pub async fn del_provider(&mut self, pa: IpAddr) -> Result<ProviderState> {
        let Some(removed) = self
            .catalog
            .providers()
            .iter()
            .find(|p| p.pa.addr == pa)
            .cloned()
        else {
            return Err(NvError::NotFound(format!("no provider address {pa}")));
        };
        let users = self.catalog.local_users_of(pa);
        if users > 0 {
            return Err(NvError::Conflict(format!(
                "provider address {pa} is used by {users} local lookup record(s); delete or move them first"
            )));
        }
        self.journal(&[Change::DelProvider { pa }])?;
        self.catalog.providers_mut().retain(|p| p.pa.addr != pa);
        let local = self.local_pas().await?;
        self.datapath.sync_local_pas(&local)?;
        if removed.added_address
            && let Some(link) = self.netlink.link(&removed.dev).await?
        {
            self.netlink.del_address(link.index, pa).await?;
        }
        info!("deleted provider address {}", removed.pa);
        Ok(removed)
    }

    /// Checks what needs the host itself: the port exists, and it is not the uplink.
    async fn check_port(&self, r: &LookupRecord) -> Result<()> {
        if let Some(port) = &r.port {
            if *port == self.uplink {
                return Err(invalid(format!(
                    "port '{port}' is the uplink, not a VM port"
                )));
            }
            if crate::netlink::is_bounce(port) {
                return Err(invalid(format!(
                    "port '{port}' is nv's own (it segments VMs' tunnel traffic), not a VM port"
                )));
            }
            let link = self.require_link(port, "port").await?;
            if !matches!(link.kind, LinkKind::Veth | LinkKind::Tap) {
                return Err(invalid(format!(
                    "port '{port}' is a {} device, not a veth or tap: only a VM's port can be one",
                    link.kind
                )));
            }
            // A device the host itself talks through is not a VM's port.
            if let Some(addr) = self.netlink.routable_addresses(link.index).await?.first() {
                return Err(invalid(format!(
                    "port '{port}' carries the host address {addr}: a VM's port carries none"
                )));
            }
        }
        Ok(())
    }

    fn check_capacity(&self, adding: usize) -> Result<()> {
        if self.catalog.len() + adding > usize::try_from(self.max_lookups).unwrap_or(usize::MAX) {
            return Err(NvError::Conflict(format!(
                "lookup table full: {} entries of {}, {adding} more asked for; raise max_lookups",
                self.catalog.len(),
                self.max_lookups
            )));
        }
        Ok(())
    }

    pub async fn add_lookup(&mut self, r: LookupRecord) -> Result<LookupRecord> {
        r.validate()?;
        self.catalog.check(&r, None)?;
        self.check_capacity(1)?;
        self.check_port(&r).await?;
        self.journal(&[Change::PutLookup { record: r.clone() }])?;
        self.catalog.insert(r.clone());
        self.remap(None, Some(&r)).await?;
        info!("added lookup record {}", describe(&r));
        Ok(r)
    }

    /// Adds many records as one change: all are checked (against the table and each other)
    /// before any is stored; then they are stored and mapped.
    pub async fn import_lookups(&mut self, records: Vec<LookupRecord>) -> Result<usize> {
        let started = std::time::Instant::now();
        self.check_capacity(records.len())?;
        let mut checked: Vec<Key> = Vec::with_capacity(records.len());
        let mut failure = None;
        for (i, r) in records.iter().enumerate() {
            let ok = match r.validate().and_then(|()| self.catalog.check(r, None)) {
                Ok(()) => self.check_port(r).await,
                Err(e) => Err(e),
            };
            if let Err(e) = ok {
                failure = Some(invalid(format!("record {} ({}): {e}", i + 1, describe(r))));
                break;
            }
            // Inserted as checked, so later records are checked against earlier ones.
            self.catalog.insert(r.clone());
            checked.push(r.key());
        }
        if let Some(e) = failure {
            for k in &checked {
                self.catalog.remove(k);
            }
            return Err(e);
        }
        let checked_at = started.elapsed();
        // One transaction, whatever the size: all of the import is stored, or none.
        let changes: Vec<Change> = records
            .iter()
            .map(|r| Change::PutLookup { record: r.clone() })
            .collect();
        let stored = self.store.append(&changes);
        if let Err(e) = stored {
            for k in &checked {
                self.catalog.remove(k);
            }
            return Err(e);
        }
        let stored_at = started.elapsed();
        for (i, r) in records.iter().enumerate() {
            if let Err(e) = self.map(r).await {
                warn!(
                    "datapath refused record {}, rolling the import back: {e}",
                    i + 1
                );
                for k in &checked {
                    self.catalog.remove(k);
                }
                let undo: Vec<Change> = checked
                    .iter()
                    .map(|(vsid, ca)| Change::DelLookup {
                        vsid: *vsid,
                        ca: *ca,
                    })
                    .collect();
                self.store.append(&undo)?;
                let (desired, ports) = self.desired().await?;
                self.datapath.sync(&desired)?;
                self.adopt(&ports);
                self.config = desired.config;
                return Err(e);
            }
        }
        info!(
            records = records.len(),
            "imported {} lookup records: checked in {} ms, stored by {} ms, all in the maps by {} ms",
            records.len(),
            checked_at.as_millis(),
            stored_at.as_millis(),
            started.elapsed().as_millis()
        );
        Ok(records.len())
    }

    pub async fn del_lookup(&mut self, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
        let key = (vsid, ca);
        if self.catalog.get(&key).is_none() {
            return Err(NvError::NotFound(format!(
                "no lookup record for VSID {vsid} CA {ca}"
            )));
        }
        self.journal(&[Change::DelLookup { vsid, ca }])?;
        let removed = self
            .catalog
            .remove(&key)
            .ok_or_else(|| NvError::NotFound("vanished".into()))?;
        self.remap(Some(&removed), None).await?;
        info!("deleted lookup record {}", describe(&removed));
        Ok(removed)
    }

    /// Replaces a record's PA and port in one change (migration).
    pub async fn move_lookup(&mut self, m: MoveRequest) -> Result<LookupRecord> {
        let key = (m.vsid, m.ca);
        let Some(old) = self.catalog.get(&key).cloned() else {
            return Err(NvError::NotFound(format!(
                "no lookup record for VSID {} CA {}",
                m.vsid, m.ca
            )));
        };
        let mut moved = old.clone();
        moved.pa = m.pa;
        moved.port = m.port;
        moved.validate()?;
        self.catalog.check(&moved, Some(&key))?;
        self.check_port(&moved).await?;
        self.journal(&[Change::PutLookup {
            record: moved.clone(),
        }])?;
        self.catalog.insert(moved.clone());
        self.remap(Some(&old), Some(&moved)).await?;
        info!(
            "moved lookup record {} to PA {}",
            describe(&moved),
            moved.pa
        );
        Ok(moved)
    }
}
