//! The agent's operations. Each change is validated against the whole state first, then
//! committed to the store, then applied to the datapath; if the datapath refuses, the store and
//! maps are put back, so a change is applied whole or not at all.
use std::{collections::HashMap, net::IpAddr};

use nv_common::{DatapathConfig, LocalPa, LookupKey, LookupValue, PortInfo, RewritePa, v4_mapped};
use tracing::{info, warn};

use crate::{
    config::{Config, DecapHook},
    datapath::{Datapath, Desired},
    error::{NvError, Result, invalid},
    model::{LookupRecord, Method, Provider, ProviderState, validate_ifname},
    netlink::Netlink,
    store::{State, Store},
};

pub struct Agent {
    uplink: String,
    decap_hook: DecapHook,
    max_lookups: u32,
    store: Store,
    datapath: Datapath,
    netlink: Netlink,
    /// What the maps hold now.
    applied: Desired,
    /// Ports with the from-VM program attached, and the ifindex they had then.
    attached: HashMap<String, u32>,
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

fn describe(r: &LookupRecord) -> String {
    match &r.name {
        Some(n) => format!("VSID {} CA {} ({n})", r.vsid, r.ca),
        None => format!("VSID {} CA {}", r.vsid, r.ca),
    }
}

impl Agent {
    /// Opens the store, loads the datapath (reusing pins) and reconciles the maps with the store.
    pub async fn start(config: &Config) -> Result<Agent> {
        let uplink = config.uplink.clone().ok_or_else(|| {
            invalid("no uplink configured: pass --uplink IFNAME or set uplink in the config file")
        })?;
        let netlink = Netlink::connect()?;
        if netlink.link(&uplink).await?.is_none() {
            return Err(invalid(format!(
                "uplink '{uplink}' does not exist on this host"
            )));
        }
        let store = Store::open(&config.state_dir)?;
        let datapath = Datapath::load(&config.pin_path, config.max_lookups)?;
        let mut agent = Agent {
            uplink,
            decap_hook: config.decap_hook,
            max_lookups: config.max_lookups,
            store,
            datapath,
            netlink,
            applied: Desired::default(),
            attached: HashMap::new(),
        };
        agent.reconcile().await?;
        Ok(agent)
    }

    /// Brings links, addresses and maps in line with the store: adds what is missing, removes
    /// what is stale, never flushes.
    async fn reconcile(&mut self) -> Result<()> {
        let state = self.store.state().clone();
        for p in &state.providers {
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
        self.datapath.attach_uplink(&self.uplink, self.decap_hook)?;
        let (desired, ports) = self.desired(&state).await?;
        self.attach_ports(&ports)?;
        self.datapath.sync(&desired)?;
        self.applied = desired;
        if self.decap_hook == DecapHook::Tc {
            self.datapath.detach_uplink_xdp()?;
        }
        for stale in self.datapath.attached_ports()? {
            if !ports.contains_key(&stale) {
                info!("detaching stale port {stale}");
                self.datapath.detach_port(&stale)?;
            }
        }
        info!(
            "reconciled: {} providers, {} lookup records, {} ports",
            state.providers.len(),
            state.lookups.len(),
            self.attached.len()
        );
        Ok(())
    }

    /// Attaches the from-VM program to ports that are new or were re-created (new ifindex).
    fn attach_ports(&mut self, ports: &HashMap<String, u32>) -> Result<()> {
        for (name, ifindex) in ports {
            if self.attached.get(name) != Some(ifindex) {
                self.datapath.attach_port(name)?;
                self.attached.insert(name.clone(), *ifindex);
            }
        }
        Ok(())
    }

    /// Follows ports that appeared, disappeared or were re-created since the last change
    /// (a VM started late or restarted): called periodically.
    pub async fn refresh(&mut self) -> Result<()> {
        let state = self.store.state().clone();
        let (desired, ports) = self.desired(&state).await?;
        self.attached.retain(|name, _| ports.contains_key(name));
        self.attach_ports(&ports)?;
        if desired != self.applied {
            info!("ports changed; updating the datapath");
            self.datapath.sync(&desired)?;
            self.applied = desired;
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

    /// What the maps must hold for `state`, and the ports that exist now (name, ifindex).
    /// A record whose port is missing (VM not started yet, or gone) is left out of the maps
    /// until its port appears: traffic to it is dropped and counted, never sent elsewhere.
    async fn desired(&self, state: &State) -> Result<(Desired, HashMap<String, u32>)> {
        let uplink = self.require_link(&self.uplink, "uplink").await?;
        let mut d = Desired {
            config: DatapathConfig {
                uplink_ifindex: uplink.index,
                flags: if self.decap_hook == DecapHook::Tc {
                    DatapathConfig::TC_DECAP
                } else {
                    0
                } | if state.lookups.iter().any(|r| r.method == Method::Rewrite) {
                    DatapathConfig::HAS_REWRITE
                } else {
                    0
                },
                ..DatapathConfig::default()
            },
            ..Desired::default()
        };
        let mut ports = HashMap::new();
        for p in &state.providers {
            let Some(link) = self.netlink.link(&p.dev).await? else {
                warn!("provider device {} of {} is missing", p.dev, p.pa);
                continue;
            };
            d.local_pas.insert(
                addr16(p.pa.addr),
                LocalPa {
                    ifindex: link.index,
                },
            );
        }
        for r in &state.lookups {
            let ifindex = match &r.port {
                Some(port) => {
                    let Some(link) = self.netlink.link(port).await? else {
                        warn!(
                            "port {port} of {} is missing; its record waits for it",
                            describe(r)
                        );
                        continue;
                    };
                    ports.insert(port.clone(), link.index);
                    d.ports.insert(
                        link.index,
                        PortInfo {
                            vsid: r.vsid,
                            ca: addr16(r.ca),
                            pa: addr16(r.pa),
                            mac: r.mac.0,
                            method: datapath_method(r.method) as u8,
                            _pad: 0,
                        },
                    );
                    link.index
                }
                None => 0,
            };
            d.lookups.insert(
                LookupKey {
                    vsid: r.vsid,
                    ca: addr16(r.ca),
                },
                LookupValue {
                    pa: addr16(r.pa),
                    mac: r.mac.0,
                    method: datapath_method(r.method) as u8,
                    _pad: 0,
                    ifindex,
                },
            );
            if r.method == Method::Rewrite {
                d.rewrite_pas.insert(
                    addr16(r.pa),
                    RewritePa {
                        vsid: r.vsid,
                        ca: addr16(r.ca),
                        mac: r.mac.0,
                        _pad: [0; 2],
                        ifindex,
                    },
                );
            }
        }
        Ok((d, ports))
    }

    /// Commits `next` and applies it; on failure puts store and datapath back as they were.
    async fn apply(&mut self, next: State) -> Result<()> {
        let prev = self.store.state().clone();
        let (desired, ports) = self.desired(&next).await?;
        self.store.commit(next)?;
        let applied = match self.attach_ports(&ports) {
            Ok(()) => self.datapath.sync(&desired),
            Err(e) => Err(e),
        };
        if let Err(e) = applied {
            warn!("datapath refused the change, rolling back: {e}");
            self.store.commit(prev.clone())?;
            let (old, old_ports) = self.desired(&prev).await?;
            self.datapath.sync(&old)?;
            let added: Vec<String> = self
                .attached
                .keys()
                .filter(|p| !old_ports.contains_key(*p))
                .cloned()
                .collect();
            for port in added {
                self.datapath.detach_port(&port)?;
                self.attached.remove(&port);
            }
            return Err(e);
        }
        self.applied = desired;
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|p| !ports.contains_key(*p))
            .cloned()
            .collect();
        for port in gone {
            self.datapath.detach_port(&port)?;
            self.attached.remove(&port);
        }
        Ok(())
    }

    pub fn providers(&self) -> Vec<ProviderState> {
        self.store.state().providers.clone()
    }

    pub fn lookups(&self) -> Vec<LookupRecord> {
        self.store.state().lookups.clone()
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
        let mut next = self.store.state().clone();
        if let Some(existing) = next.providers.iter().find(|e| e.pa.addr == p.pa.addr) {
            return Err(NvError::Conflict(format!(
                "provider address {} already exists on {}",
                existing.pa, existing.dev
            )));
        }
        let link = self.require_link(&dev, "device").await?;
        let present = self.netlink.has_address(link.index, p.pa.addr).await?;
        if !present {
            self.netlink
                .add_address(link.index, p.pa.addr, p.pa.len)
                .await?;
        }
        let state = ProviderState {
            pa: p.pa,
            dev,
            added_address: !present,
        };
        next.providers.push(state.clone());
        if let Err(e) = self.apply(next).await {
            if !present {
                let _ = self.netlink.del_address(link.index, p.pa.addr).await;
            }
            return Err(e);
        }
        info!("added provider address {} on {}", state.pa, state.dev);
        Ok(state)
    }

    pub async fn del_provider(&mut self, pa: IpAddr) -> Result<ProviderState> {
        let mut next = self.store.state().clone();
        let idx = next
            .providers
            .iter()
            .position(|p| p.pa.addr == pa)
            .ok_or_else(|| NvError::NotFound(format!("no provider address {pa}")))?;
        let users = next
            .lookups
            .iter()
            .filter(|r| r.pa == pa && r.port.is_some())
            .count();
        if users > 0 {
            return Err(NvError::Conflict(format!(
                "provider address {pa} is used by {users} local lookup record(s); delete or move them first"
            )));
        }
        let removed = next.providers.remove(idx);
        self.apply(next).await?;
        if removed.added_address
            && let Some(link) = self.netlink.link(&removed.dev).await?
        {
            self.netlink.del_address(link.index, pa).await?;
        }
        info!("deleted provider address {}", removed.pa);
        Ok(removed)
    }

    /// Checks a record against the state it would join (the record itself already validated).
    async fn check_placement(&self, state: &State, r: &LookupRecord) -> Result<()> {
        let local_pa = state.providers.iter().any(|p| p.pa.addr == r.pa);
        match &r.port {
            Some(port) => {
                if *port == self.uplink {
                    return Err(invalid(format!(
                        "port '{port}' is the uplink, not a VM port"
                    )));
                }
                self.require_link(port, "port").await?;
                if !local_pa {
                    return Err(invalid(format!(
                        "PA {} is not a provider address of this host; a record with --port needs one (add it with `nvctl provider add`)",
                        r.pa
                    )));
                }
                if let Some(other) = state
                    .lookups
                    .iter()
                    .find(|o| o.port.as_deref() == Some(port) && o.key() != r.key())
                {
                    return Err(NvError::Conflict(format!(
                        "port '{port}' already belongs to {}",
                        describe(other)
                    )));
                }
            }
            None if local_pa => {
                return Err(invalid(format!(
                    "PA {} is a provider address of this host: give --port, the VM's port here",
                    r.pa
                )));
            }
            None => {}
        }
        // IP rewrite dedicates a PA to one CA: no other record, of either method, may share it.
        if let Some(other) = state.lookups.iter().find(|o| {
            o.pa == r.pa
                && o.key() != r.key()
                && (o.method == Method::Rewrite || r.method == Method::Rewrite)
        }) {
            return Err(NvError::Conflict(format!(
                "PA {} is already used by {}; a rewrite record needs a PA of its own",
                r.pa,
                describe(other)
            )));
        }
        // One method per VSID: a sender can only rewrite if it has a rewrite PA itself, so
        // mixing methods in a VSID would leave some pairs unable to talk.
        if let Some(other) = state
            .lookups
            .iter()
            .find(|o| o.vsid == r.vsid && o.method != r.method && o.key() != r.key())
        {
            return Err(NvError::Conflict(format!(
                "VSID {} uses method {} ({}); all records of a VSID use one method",
                r.vsid,
                other.method,
                describe(other)
            )));
        }
        if let Some(other) = state
            .lookups
            .iter()
            .find(|o| o.vsid == r.vsid && o.mac == r.mac && o.key() != r.key())
        {
            return Err(NvError::Conflict(format!(
                "MAC {} is already used by {}",
                r.mac,
                describe(other)
            )));
        }
        Ok(())
    }

    pub async fn add_lookup(&mut self, r: LookupRecord) -> Result<LookupRecord> {
        r.validate()?;
        let mut next = self.store.state().clone();
        if let Some(existing) = next.lookups.iter().find(|o| o.key() == r.key()) {
            return Err(NvError::Conflict(format!(
                "a lookup record for {} already exists; delete it first, or use `nvctl lookup move` to change its PA and port",
                describe(existing)
            )));
        }
        if next.lookups.len() >= usize::try_from(self.max_lookups).unwrap_or(usize::MAX) {
            return Err(NvError::Conflict(
                "the lookup table is full (max_lookups)".into(),
            ));
        }
        self.check_placement(&next, &r).await?;
        next.lookups.push(r.clone());
        self.apply(next).await?;
        info!("added lookup record {}", describe(&r));
        Ok(r)
    }

    pub async fn del_lookup(&mut self, vsid: u32, ca: IpAddr) -> Result<LookupRecord> {
        let mut next = self.store.state().clone();
        let idx = next
            .lookups
            .iter()
            .position(|o| o.key() == (vsid, ca))
            .ok_or_else(|| {
                NvError::NotFound(format!("no lookup record for VSID {vsid} CA {ca}"))
            })?;
        let removed = next.lookups.remove(idx);
        self.apply(next).await?;
        info!("deleted lookup record {}", describe(&removed));
        Ok(removed)
    }

    /// Replaces a record's PA and port in one change (migration).
    pub async fn move_lookup(&mut self, m: MoveRequest) -> Result<LookupRecord> {
        let mut next = self.store.state().clone();
        let idx = next
            .lookups
            .iter()
            .position(|o| o.key() == (m.vsid, m.ca))
            .ok_or_else(|| {
                NvError::NotFound(format!("no lookup record for VSID {} CA {}", m.vsid, m.ca))
            })?;
        let mut moved = next.lookups[idx].clone();
        moved.pa = m.pa;
        moved.port = m.port;
        moved.validate()?;
        self.check_placement(&next, &moved).await?;
        next.lookups[idx] = moved.clone();
        self.apply(next).await?;
        info!(
            "moved lookup record {} to PA {}",
            describe(&moved),
            moved.pa
        );
        Ok(moved)
    }
}
