//! What the agent shows of itself: status, metrics, the monitor's clients, debug events and
//! packet traces.
use std::collections::HashMap;

use nv_common::PortInfo;
use tracing::{info, warn};

use super::Agent;
use crate::{
    config::DecapHook,
    datapath::Datapath,
    error::{NvError, Result, invalid},
    translate::{self},
};

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
    /// Customer routes, of every routing domain.
    #[serde(default)]
    pub routes: usize,
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

impl Agent {
    pub(super) fn watchers(&self) -> std::sync::MutexGuard<'_, crate::monitor::Watchers> {
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

    /// The slow path's ring buffer, once, for the DHCP server.
    pub fn take_slow_path(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        self.datapath.take_slow_path()
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
            routes: self.tables.catalog.routes().len(),
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
    pub(super) fn metrics_base(&self) -> crate::metrics::Snapshot {
        use nv_common::map_names as m;
        let status = self.status();
        let catalog = &self.tables.catalog;
        let known = |map: &str| -> Option<u64> {
            let n = match map {
                m::LOOKUPS => catalog.len() - catalog.ipv6_records(),
                m::LOOKUPS6 => catalog.ipv6_records(),
                m::PORTS => self.tables.ports.len(),
                m::LOCAL_PAS | m::LOCAL_PAS6 => catalog
                    .providers()
                    .iter()
                    .filter(|p| p.pa.addr.is_ipv4() == (map == m::LOCAL_PAS))
                    .count(),
                m::REWRITE_PAS => catalog.rewrite_records(),
                m::REWRITE_PAS6 => catalog.rewrite6_records(),
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
            routes: catalog.routes().by_domain(),
            domains: catalog
                .routes()
                .by_domain()
                .into_keys()
                .filter_map(|rdid| {
                    let parsed: crate::model::Rdid = rdid.parse().ok()?;
                    Some((crate::tables::routes::domain_number(&parsed), rdid))
                })
                .collect(),
            ports,
            ports_missing: status.ports_missing.len(),
            ports_without_record: status.ports_without_record.len(),
            reconciles: self.reconciles,
            repaired: self.repaired,
            ports_set_down: self.ports_set_down,
            refused: Vec::new(),
            cluster: self.cluster.as_ref().map(crate::cluster::Cluster::status),
            routed: Vec::new(),
            dhcp: crate::dhcp::counts::CountsNow::default(),
            acl_rules: catalog
                .acls()
                .list(None)
                .iter()
                .map(|r| (r.id, r.vsid))
                .collect(),
            acl_ports: crate::tables::acls::vm_ports(
                catalog.acls(),
                &translate::local_vms(catalog),
            ),
            acl_budget: catalog.acls().max_flows,
            acl_meters: Vec::new(),
            acl_flows: std::collections::HashMap::new(),
        }
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
        let tracer = self.tracer.as_mut().expect("loaded above");
        tracer.clear_acl_denied()?;
        let before = tracer.counters()?;
        let run = tracer.test_run(built.program, &built.frame, built.ifindex, 1)?;
        let rule = tracer.acl_denied()?;
        let counted: Vec<&'static str> = tracer
            .counters()?
            .iter()
            .zip(&before)
            .filter(|((_, after), (_, was))| after > was)
            .map(|((c, _), _)| c.name())
            .collect();
        let mut out = crate::trace::outcome(built, &run, &counted, &self.port_names(), req);
        if rule != 0 && out.verdict == "drop" {
            out.rule = Some(rule);
            out.why = format!("{} (ACL rule {rule})", out.why);
        }
        Ok(out)
    }
}
