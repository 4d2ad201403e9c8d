//! The Prometheus endpoint (`/metrics` on `metrics_addr`, `OpenMetrics` text): the datapath's
//! counters and per-VSID traffic, read from the maps at scrape time (per-CPU values summed
//! then, never copied on a timer), map pressure, what the agent holds, API requests and
//! reconciles. Names are `nv_*`; per-VSID series carry `vsid`, drops `reason` and `direction`,
//! map series `map`.
use std::{collections::BTreeMap, fmt::Write as _};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use nv_common::{Counter, VsidStats, VsidStatsKey};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter as PromCounter},
        family::Family,
        gauge::ConstGauge,
    },
    registry::Registry,
};

/// What one scrape reports, taken from the agent and its maps at once.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub version: String,
    pub programs: String,
    pub counters: Vec<(Counter, u64)>,
    pub vsids: Vec<(VsidStatsKey, VsidStats)>,
    /// Per map: entries (where the agent knows them) and capacity.
    pub maps: Vec<MapUse>,
    pub providers: usize,
    pub lookups: usize,
    /// Customer routes by routing domain.
    pub routes: BTreeMap<String, usize>,
    /// Each routing domain's name by its number in the datapath.
    pub domains: BTreeMap<u32, String>,
    /// Routed packets by domain number (read at scrape time).
    pub routed: Vec<(u32, u64)>,
    /// What the DHCP server counted (read at scrape time).
    pub dhcp: crate::dhcp::counts::CountsNow,
    /// Attached ports by (kind, running).
    pub ports: BTreeMap<(String, bool), usize>,
    pub ports_missing: usize,
    pub ports_without_record: usize,
    pub reconciles: u64,
    pub repaired: u64,
    /// Times a VM port was set down because it could not be filtered.
    pub ports_set_down: u64,
    /// Connections each listener closed at once because it served its most.
    pub refused: Vec<(&'static str, u64)>,
    pub cluster: Option<crate::cluster::Status>,
    /// ACL rules (id, VSID), and this host's VMs with ACLs (their port) and flow budget.
    pub acl_rules: Vec<(u32, u32)>,
    pub acl_ports: Vec<(crate::tables::acls::Vm, String)>,
    pub acl_budget: u32,
    /// Read at scrape time: each rule's meters by direction, and live flows per VM.
    pub acl_meters: Vec<(nv_common::acl::AclMeterKey, nv_common::acl::AclMeter)>,
    pub acl_flows: std::collections::HashMap<crate::tables::acls::Vm, u64>,
}

/// What a scrape reads as it is now, beside what the agent published.
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub counters: Vec<(Counter, u64)>,
    pub vsids: Vec<(VsidStatsKey, VsidStats)>,
    pub routed: Vec<(u32, u64)>,
    /// Connections each listener closed at once because it served its most.
    pub refused: Vec<(&'static str, u64)>,
    pub dhcp: crate::dhcp::counts::CountsNow,
    pub acl_meters: Vec<(nv_common::acl::AclMeterKey, nv_common::acl::AclMeter)>,
    pub acl_flows: std::collections::HashMap<crate::tables::acls::Vm, u64>,
}

#[derive(Clone, Debug)]
pub struct MapUse {
    pub map: &'static str,
    pub entries: Option<u64>,
    pub capacity: u32,
}

/// Where a datapath counter belongs: a drop (its reason and where the frame was going), or a
/// forwarding event.
pub fn classify(c: Counter) -> Option<(&'static str, &'static str)> {
    let name = c.name();
    let reason = name.strip_prefix("drop_")?;
    let direction = if reason.starts_with("vm_") {
        "from_vm"
    } else if reason.starts_with("uplink_") {
        "from_uplink"
    } else {
        "to_vm"
    };
    Some((reason, direction))
}

pub fn direction_name(dir: u8) -> &'static str {
    if dir == VsidStatsKey::RX { "rx" } else { "tx" }
}

pub fn method_name(method: u8) -> &'static str {
    match method {
        VsidStatsKey::ENCAP => "encap",
        VsidStatsKey::REWRITE => "rewrite",
        _ => "local",
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one family of series, each with its labels and value.
fn family<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, T)>,
) -> std::fmt::Result
where
    T: Copy + prometheus_client::encoding::EncodeGaugeValue,
    T: prometheus_client::encoding::EncodeCounterValue,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    let series: Vec<(Labels, T)> = series.into_iter().collect();
    if let [(labels, value)] = series.as_slice()
        && labels.is_empty()
    {
        // One series without labels: `name value`, not `name{} value`.
        return encode_value(metric, kind, *value);
    }
    for (labels, value) in &series {
        encode_value(metric.encode_family(labels)?, kind, *value)?;
    }
    Ok(())
}

/// One value of a counter or a gauge.
fn encode_value<T>(
    m: prometheus_client::encoding::MetricEncoder,
    kind: MetricType,
    value: T,
) -> std::fmt::Result
where
    T: prometheus_client::encoding::EncodeGaugeValue
        + prometheus_client::encoding::EncodeCounterValue,
{
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(m),
        _ => ConstGauge::new(value).encode(m),
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        self.encode_datapath(&mut e)?;
        self.encode_agent(&mut e)
    }
}

impl Snapshot {
    /// What the agent published, with the datapath's counters and per-VSID traffic as they
    /// are now and the listeners' refusals.
    #[must_use]
    pub fn complete(mut self, live: Live) -> Snapshot {
        for m in &mut self.maps {
            if m.map == nv_common::map_names::VSID_STATS {
                m.entries = Some(live.vsids.len() as u64);
            }
        }
        self.counters = live.counters;
        self.vsids = live.vsids;
        self.routed = live.routed;
        self.refused = live.refused;
        self.dhcp = live.dhcp;
        self.acl_meters = live.acl_meters;
        self.acl_flows = live.acl_flows;
        self
    }

    /// Each ACL rule's meters, and each VM's tracked connections against its budget.
    fn encode_acls(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let vsid_of: std::collections::HashMap<u32, u32> = self.acl_rules.iter().copied().collect();
        let meters = || {
            self.acl_meters.iter().filter_map(|(k, m)| {
                let vsid = vsid_of.get(&k.rule)?;
                let dir = if k.dir == nv_common::acl::DIR_IN {
                    "in"
                } else {
                    "out"
                };
                let labels = vec![
                    ("rule", k.rule.to_string()),
                    ("vsid", vsid.to_string()),
                    ("direction", dir.to_owned()),
                ];
                Some((labels, *m))
            })
        };
        family(
            e,
            "nv_acl_packets",
            "Packets each ACL rule decided on this host (its connections' included), by direction.",
            MetricType::Counter,
            meters().map(|(l, m)| (l, m.packets)),
        )?;
        family(
            e,
            "nv_acl_bytes",
            "Bytes (Ethernet header included) each ACL rule decided on this host, by direction.",
            MetricType::Counter,
            meters().map(|(l, m)| (l, m.bytes)),
        )?;
        family(
            e,
            "nv_acl_flows",
            "Connections stateful ACL rules track for each VM port now.",
            MetricType::Gauge,
            self.acl_ports.iter().map(|(vm, port)| {
                let n = self.acl_flows.get(vm).copied().unwrap_or(0);
                (vec![("port", port.clone())], n)
            }),
        )?;
        family(
            e,
            "nv_acl_flow_budget",
            "Connections stateful ACL rules may track per VM port (acl_max_flows).",
            MetricType::Gauge,
            self.acl_ports
                .iter()
                .map(|(_, port)| (vec![("port", port.clone())], u64::from(self.acl_budget))),
        )
    }

    /// The build, the datapath's counters and the per-VSID traffic.
    fn encode_datapath(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        // A gauge of 1 with the facts as labels (the classic `_info` idiom): promtool and
        // Prometheus's classic text format have no info type.
        family(
            e,
            "nv_build_info",
            "The agent's version and the fingerprint of the eBPF programs it loads.",
            MetricType::Gauge,
            [(
                vec![
                    ("version", self.version.clone()),
                    ("programs", self.programs.clone()),
                ],
                1u64,
            )],
        )?;
        let (drops, events): (Vec<_>, Vec<_>) = self
            .counters
            .iter()
            .partition(|(c, _)| classify(*c).is_some());
        family(
            e,
            "nv_drops",
            "Frames the datapath dropped, by reason and by where they came from or went.",
            MetricType::Counter,
            drops.iter().filter_map(|(c, n)| {
                let (reason, direction) = classify(*c)?;
                Some((
                    vec![
                        ("reason", reason.to_owned()),
                        ("direction", direction.into()),
                    ],
                    *n,
                ))
            }),
        )?;
        family(
            e,
            "nv_datapath_packets",
            "Frames the datapath forwarded or answered, by what it did.",
            MetricType::Counter,
            events
                .iter()
                .map(|(c, n)| (vec![("event", c.name().to_owned())], *n)),
        )?;
        for (name, help, value) in [
            (
                "nv_vsid_packets",
                "Customer frames sent (tx) by or delivered (rx) to this host's VMs, by VSID and method.",
                (|s: &VsidStats| s.packets) as fn(&VsidStats) -> u64,
            ),
            (
                "nv_vsid_bytes",
                "Bytes of those frames, Ethernet header included.",
                |s: &VsidStats| s.bytes,
            ),
        ] {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                self.vsids.iter().map(|(k, s)| {
                    (
                        vec![
                            ("vsid", k.vsid.to_string()),
                            ("direction", direction_name(k.dir).into()),
                            ("method", method_name(k.method).into()),
                        ],
                        value(s),
                    )
                }),
            )?;
        }
        Ok(())
    }

    /// Map pressure and what the agent holds.
    fn encode_agent(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        family(
            e,
            "nv_map_entries",
            "Entries in each BPF map the agent fills.",
            MetricType::Gauge,
            self.maps
                .iter()
                .filter_map(|m| Some((vec![("map", m.map.to_owned())], m.entries?))),
        )?;
        family(
            e,
            "nv_map_capacity",
            "Capacity (max_entries; bytes for the ring buffer) of each BPF map.",
            MetricType::Gauge,
            self.maps
                .iter()
                .map(|m| (vec![("map", m.map.to_owned())], u64::from(m.capacity))),
        )?;
        family(
            e,
            "nv_ports",
            "VM ports the agent filters for a record, by kind and whether they run.",
            MetricType::Gauge,
            self.ports.iter().map(|((kind, running), n)| {
                (
                    vec![
                        ("kind", kind.clone()),
                        ("state", if *running { "running" } else { "down" }.into()),
                    ],
                    *n as u64,
                )
            }),
        )?;
        family(
            e,
            "nv_routes",
            "Customer routes, by routing domain.",
            MetricType::Gauge,
            self.routes
                .iter()
                .map(|(rdid, n)| (vec![("rdid", rdid.clone())], *n as u64)),
        )?;
        self.encode_routed_and_dhcp(e)?;
        self.encode_acls(e)?;
        for (name, help, value) in [
            (
                "nv_ports_missing",
                "Records whose VM port does not exist now.",
                self.ports_missing as u64,
            ),
            (
                "nv_ports_without_record",
                "Ports still filtered whose record went (every frame they send is dropped).",
                self.ports_without_record as u64,
            ),
            (
                "nv_provider_addresses",
                "Provider addresses of this host.",
                self.providers as u64,
            ),
            ("nv_lookup_records", "Lookup records.", self.lookups as u64),
        ] {
            family(e, name, help, MetricType::Gauge, [(Labels::new(), value)])?;
        }
        self.encode_cluster(e)?;
        self.encode_agent_counters(e)
    }

    /// Cluster mode's state.
    fn encode_cluster(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(c) = &self.cluster {
            for (name, help, value) in [
                (
                    "nv_cluster_connected",
                    "1 while the agent follows etcd (cluster mode); 0 while it forwards from what it applied last.",
                    u64::from(c.connected),
                ),
                (
                    "nv_cluster_revision",
                    "The etcd revision the agent has applied.",
                    u64::try_from(c.revision).unwrap_or(0),
                ),
                (
                    "nv_cluster_bad_records",
                    "Records in etcd the agent leaves out (they do not parse or break a rule).",
                    c.bad_records as u64,
                ),
            ] {
                family(e, name, help, MetricType::Gauge, [(Labels::new(), value)])?;
            }
            for (name, help, value) in [
                ("nv_cluster_events", "Changes applied from etcd.", c.events),
                (
                    "nv_cluster_resyncs",
                    "Full resynchronisations with etcd (first start, compaction).",
                    c.resyncs,
                ),
            ] {
                family(e, name, help, MetricType::Counter, [(Labels::new(), value)])?;
            }
        }
        Ok(())
    }

    /// What the distributed router forwarded and the DHCP server answered.
    fn encode_routed_and_dhcp(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        family(
            e,
            "nv_routed_packets",
            "Packets the distributed router forwarded on this host, by routing domain.",
            MetricType::Counter,
            self.routed.iter().filter_map(|(number, n)| {
                let rdid = self.domains.get(number)?;
                Some((vec![("rdid", rdid.clone())], *n))
            }),
        )?;
        for (name, help, label, values) in [
            (
                "nv_dhcp_requests",
                "DHCP requests of VMs the agent read, by message type.",
                "type",
                &self.dhcp.requests,
            ),
            (
                "nv_dhcp_replies",
                "DHCP answers the agent wrote into VM ports, by message type.",
                "type",
                &self.dhcp.replies,
            ),
            (
                "nv_dhcp_unanswered",
                "DHCP frames of VMs the agent did not answer, by reason.",
                "reason",
                &self.dhcp.unanswered,
            ),
            (
                "nv_dhcp6_requests",
                "DHCPv6 messages of VMs the agent read, by message type.",
                "type",
                &self.dhcp.requests6,
            ),
            (
                "nv_dhcp6_replies",
                "DHCPv6 answers the agent wrote into VM ports, by message type.",
                "type",
                &self.dhcp.replies6,
            ),
            (
                "nv_router_adverts",
                "IPv6 router advertisements the agent wrote into VM ports, solicited or periodic.",
                "why",
                &self.dhcp.adverts,
            ),
        ] {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                values
                    .iter()
                    .map(|(v, n)| (vec![(label, (*v).to_owned())], *n)),
            )?;
        }
        Ok(())
    }

    /// What the agent counted: reconciles, ports set down, connections refused.
    fn encode_agent_counters(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        for (name, help, value) in [
            (
                "nv_reconciles",
                "Comparisons of every map with the store (at start and periodically).",
                self.reconciles,
            ),
            (
                "nv_reconcile_repairs",
                "Map entries those comparisons had to write or remove (drift).",
                self.repaired,
            ),
            (
                "nv_ports_set_down",
                "Times a VM port was set down because the agent could not filter it (it is set up once filtered).",
                self.ports_set_down,
            ),
        ] {
            family(e, name, help, MetricType::Counter, [(Labels::new(), value)])?;
        }
        family(
            e,
            "nv_connections_refused",
            "Connections a listener closed at once because it served as many as it may.",
            MetricType::Counter,
            self.refused
                .iter()
                .map(|(listener, n)| (vec![("listener", (*listener).to_owned())], *n)),
        )?;
        Ok(())
    }
}

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub path: String,
    pub status: String,
}

/// What the API counts between scrapes.
#[derive(Clone, Debug, Default)]
pub struct ApiMetrics {
    pub requests: Family<RequestLabels, PromCounter>,
}

/// Counts each API request by method, route and status (middleware).
pub async fn count_requests(State(m): State<ApiMetrics>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!("api", %method, %path);
    let response = tracing::Instrument::instrument(next.run(req), span).await;
    m.requests
        .get_or_create(&RequestLabels {
            method,
            path,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// The `OpenMetrics` text of `snapshot` and the API's counts.
pub fn encode(snapshot: Snapshot, api: &ApiMetrics) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    registry.register(
        "nv_api_requests",
        "Requests to the agent's API (nvctl), by method, route and status.",
        api.requests.clone(),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The exposition formats a scrape may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `OpenMetrics` text, which Prometheus asks for.
    OpenMetrics,
    /// Prometheus's classic text format (0.0.4), for clients that do not ask for `OpenMetrics`
    /// (curl, `promtool check metrics`).
    Classic,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn accepted(accept: Option<&str>) -> Format {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// `OpenMetrics` text in the classic format: a counter family's HELP and TYPE name its samples
/// (`_total`), and there is no `# EOF` or `# UNIT`.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|head| {
            let rest = line.strip_prefix(head)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{head}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A scrape's answer in `format`.
pub fn response(body: Result<String, String>, format: Format) -> Response {
    match body {
        Ok(text) => {
            let text = match format {
                Format::OpenMetrics => text,
                Format::Classic => to_classic(&text),
            };
            (
                [(axum::http::header::CONTENT_TYPE, format.content_type())],
                text,
            )
                .into_response()
        }
        Err(e) => {
            let mut text = String::new();
            let _ = write!(text, "cannot read the datapath's statistics: {e}");
            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, text).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counter_families_by_their_samples() {
        let om = "# HELP nv_drops Frames dropped.\n# TYPE nv_drops counter\nnv_drops_total{reason=\"x\"} 3\n# HELP nv_lookup_records Records.\n# TYPE nv_lookup_records gauge\nnv_lookup_records 4\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP nv_drops_total Frames dropped.\n# TYPE nv_drops_total counter\nnv_drops_total{reason=\"x\"} 3\n# HELP nv_lookup_records Records.\n# TYPE nv_lookup_records gauge\nnv_lookup_records 4\n"
        );
    }

    #[test]
    fn a_scrape_reports_drops_by_reason_and_direction_and_vsids_by_label() {
        let snapshot = Snapshot {
            version: "1".into(),
            counters: vec![(Counter::DropVmSpoofedIp, 3), (Counter::VmTxEncap, 9)],
            vsids: vec![(
                VsidStatsKey::new(5001, VsidStatsKey::RX, VsidStatsKey::REWRITE),
                VsidStats {
                    packets: 2,
                    bytes: 196,
                },
            )],
            ..Snapshot::default()
        };
        let text = encode(snapshot, &ApiMetrics::default()).unwrap();
        for line in [
            "nv_drops_total{reason=\"vm_spoofed_ip\",direction=\"from_vm\"} 3",
            "nv_datapath_packets_total{event=\"vm_tx_encap\"} 9",
            "nv_vsid_bytes_total{vsid=\"5001\",direction=\"rx\",method=\"rewrite\"} 196",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
    }
}
