//! `nvctl monitor`: the datapath's events, read from its ring buffer and handed to every
//! client that watches, each through its own filter. The datapath writes events only while a
//! monitor runs (the config says so), so with none attached it pays a branch and nothing more.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{MapData, RingBuf};
use nv_common::{Counter, MonitorEvent};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::broadcast};

/// Events a slow client may lag behind before it is told how many it missed.
const BACKLOG: usize = 4096;

/// One event as `nvctl monitor` prints it (JSON lines with `-o json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `drop`, `forward` (a sampled forwarded packet), or `lost` (events this client missed).
    pub kind: String,
    /// For a drop its reason (the counter without `drop_`); for a forward, how.
    pub reason: String,
    pub vsid: u32,
    /// The VM port (or the uplink) by name, when the agent knows it.
    pub port: Option<String>,
    pub ifindex: u32,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// `icmp`, `icmpv6`, `tcp`, `udp`, `gre` or the IP protocol (IPv6 next header) number.
    pub proto: Option<String>,
    pub src_mac: String,
    pub dst_mac: String,
    pub len: u32,
    /// For `lost`: how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// For an ACL's deny: the rule's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
}

fn mac(m: [u8; 6]) -> String {
    crate::model::Mac(m).to_string()
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        47 => "gre".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

impl Event {
    /// A datapath event; `names` gives ports their names.
    pub fn of(e: &MonitorEvent, names: &HashMap<u32, String>) -> Event {
        let counter = Counter::ALL.get(usize::from(e.counter)).copied();
        let name = counter.map_or("unknown", Counter::name);
        let ip = |a: [u8; 16]| {
            (a != [0; 16])
                .then(|| nv_common::mapped_v4(&a).map_or_else(|| IpAddr::from(a), IpAddr::from))
        };
        Event {
            kind: if e.kind == MonitorEvent::DROP {
                "drop"
            } else {
                "forward"
            }
            .into(),
            reason: name.strip_prefix("drop_").unwrap_or(name).to_owned(),
            vsid: e.vsid,
            port: names.get(&e.ifindex).cloned(),
            ifindex: e.ifindex,
            src: ip(e.src),
            dst: ip(e.dst),
            proto: (e.proto != 0).then(|| proto_name(e.proto)),
            src_mac: mac(e.src_mac),
            dst_mac: mac(e.dst_mac),
            len: e.len,
            lost: None,
            rule: (e.rule != 0).then_some(e.rule),
        }
    }

    /// One line for a terminal.
    pub fn line(&self) -> String {
        if self.kind == "lost" {
            return format!(
                "lost     {} events (the monitor fell behind)",
                self.lost.unwrap_or(0)
            );
        }
        let port = self
            .port
            .clone()
            .unwrap_or_else(|| format!("ifindex {}", self.ifindex));
        let addr = |a: Option<IpAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
        let rule = self.rule.map(|r| format!(" rule {r}")).unwrap_or_default();
        format!(
            "{:<8} {:<28} vsid {:<8} {:<12} {} > {} {} {} > {} {} B{rule}",
            self.kind,
            self.reason,
            self.vsid,
            port,
            addr(self.src),
            addr(self.dst),
            self.proto.as_deref().unwrap_or("-"),
            self.src_mac,
            self.dst_mac,
            self.len
        )
    }
}

/// What one client wants to see.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub vsid: Option<u32>,
    /// A drop reason, with or without `drop_`.
    pub reason: Option<String>,
    /// A port's name.
    pub port: Option<String>,
    /// One in this many forwarded packets too (0 or absent: drops only).
    pub sample: Option<u32>,
}

impl Filter {
    fn reason(&self) -> Option<&str> {
        self.reason
            .as_deref()
            .map(|r| r.strip_prefix("drop_").unwrap_or(r))
    }

    /// Whether `e` passes (`ifindex`: the filter's port, resolved).
    pub fn wants(&self, e: &Event, ifindex: Option<u32>) -> bool {
        (e.kind == "drop" || self.sample.unwrap_or(0) > 0)
            && self.vsid.is_none_or(|v| e.vsid == v)
            && self.reason().is_none_or(|r| e.reason == r)
            && ifindex.is_none_or(|i| e.ifindex == i)
    }
}

/// A client's registration with the hub.
pub struct Watching {
    pub hub: Hub,
    pub id: u64,
    /// The ports nv filters (and the uplink), by ifindex.
    pub names: HashMap<u32, String>,
    /// The filter's port, resolved.
    pub port: Option<u32>,
}

/// The clients watching, and the sampling each asked for.
#[derive(Default)]
pub struct Watchers {
    next: u64,
    samples: HashMap<u64, u32>,
}

impl Watchers {
    pub fn add(&mut self, sample: u32) -> u64 {
        self.next += 1;
        self.samples.insert(self.next, sample);
        self.next
    }

    pub fn remove(&mut self, id: u64) {
        self.samples.remove(&id);
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The datapath's sampling: the finest any client asked for (0: none).
    pub fn sample(&self) -> u32 {
        self.samples
            .values()
            .copied()
            .filter(|s| *s > 0)
            .min()
            .unwrap_or(0)
    }
}

/// Events from the datapath to every watching client.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<MonitorEvent>,
    pub watchers: Arc<Mutex<Watchers>>,
    /// Events read from the ring buffer since the agent started.
    pub read: Arc<AtomicU64>,
    /// Set when the agent stops: every client's stream ends.
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            tx: broadcast::channel(BACKLOG).0,
            watchers: Arc::default(),
            read: Arc::default(),
            stop: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl Hub {
    /// Ends every client's stream (the agent is stopping).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<MonitorEvent> {
        self.tx.subscribe()
    }

    /// Reads the datapath's ring buffer as events arrive, for as long as the agent runs.
    pub fn spawn_reader(&self, ring: RingBuf<MapData>) -> std::io::Result<()> {
        // SAFETY: the AsyncFd owns the ring buffer, and with it the map's descriptor, which
        // stays open for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
        let tx = self.tx.clone();
        let read = self.read.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = ring.readable_mut().await else {
                    tracing::error!("the monitor's ring buffer cannot be read any more");
                    return;
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= std::mem::size_of::<MonitorEvent>() {
                        // SAFETY: the datapath writes whole MonitorEvents (repr(C), Pod);
                        // the length was checked; read unaligned.
                        let e = unsafe { item.as_ptr().cast::<MonitorEvent>().read_unaligned() };
                        read.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(e);
                    }
                }
                guard.clear_ready();
            }
        });
        Ok(())
    }
}

/// Logs the datapath's debug events (aya-log) as they arrive, for as long as the agent runs.
pub fn spawn_log_reader(
    logger: aya_log::EbpfLogger<crate::datapath::DatapathLog>,
) -> std::io::Result<()> {
    // SAFETY: the AsyncFd owns the logger, and with it the ring buffer's descriptor, which
    // stays open for as long as it is registered.
    let mut logger = unsafe { AsyncFd::register(logger) }.map_err(std::io::Error::from)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                tracing::error!("the datapath's debug events cannot be read any more");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_sampling() {
        let drop = Event::of(
            &MonitorEvent {
                kind: MonitorEvent::DROP,
                counter: Counter::DropVmSpoofedIp as u8,
                vsid: 5001,
                ifindex: 7,
                src: nv_common::v4_mapped([10, 0, 0, 9]),
                dst: nv_common::v4_mapped([10, 0, 0, 2]),
                proto: 1,
                ..MonitorEvent::default()
            },
            &HashMap::from([(7, "red1".to_owned())]),
        );
        let v6 = Event::of(
            &MonitorEvent {
                kind: MonitorEvent::DROP,
                counter: Counter::DropVmSpoofedIp as u8,
                src: "fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                dst: "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                proto: 58,
                ..MonitorEvent::default()
            },
            &HashMap::new(),
        );
        assert!(
            v6.line().contains("fd00::9 > fd00::2 icmpv6"),
            "{}",
            v6.line()
        );
        assert_eq!(drop.reason, "vm_spoofed_ip");
        assert_eq!(drop.port.as_deref(), Some("red1"));
        assert!(
            drop.line().contains("10.0.0.9 > 10.0.0.2 icmp"),
            "{}",
            drop.line()
        );
        let filter = |json: &str| serde_json::from_str::<Filter>(json).unwrap();
        assert!(filter("{}").wants(&drop, None));
        assert!(filter(r#"{"reason":"drop_vm_spoofed_ip","vsid":5001}"#).wants(&drop, Some(7)));
        assert!(!filter(r#"{"reason":"vm_spoofed_mac"}"#).wants(&drop, None));
        assert!(!filter(r#"{"vsid":6001}"#).wants(&drop, None));
        assert!(!filter("{}").wants(&drop, Some(8)));
        let mut fwd = drop.clone();
        fwd.kind = "forward".into();
        assert!(!filter("{}").wants(&fwd, None));
        assert!(filter(r#"{"sample":10}"#).wants(&fwd, None));
        let mut watchers = Watchers::default();
        let first = watchers.add(0);
        assert_eq!(watchers.sample(), 0);
        let second = watchers.add(100);
        watchers.add(10);
        assert_eq!(watchers.sample(), 10);
        watchers.remove(first);
        watchers.remove(second);
        assert!(!watchers.is_empty());
    }
}
