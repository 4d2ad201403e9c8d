//! The maps' contents: what the agent writes (in batches), syncs and repairs, and what
//! observation reads (counters, per-VSID traffic, the lookup map).
use std::{
    collections::HashMap,
    hash::Hash,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use nv_common::{
    Counter, DatapathConfig, LocalPa, LookupKey, LookupValue, PortInfo, RewritePa, UnderlayHop, V4,
    VsidStats, VsidStatsKey, VsidTraffic,
    acl::{AclFlowKey, AclFlowSet, AclMeter, AclMeterKey},
    map_names,
};

use super::{Datapath, Repair, acl, batch, dp_err, map};
use crate::{
    error::{NvError, Result},
    txn::{Maps, Stopped, Write},
};

/// Everything the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub config: DatapathConfig,
    pub lookups: HashMap<LookupKey, LookupValue>,
    pub lookups6: HashMap<nv_common::LookupKey6, LookupValue>,
    pub ports: HashMap<u32, PortInfo>,
    pub local_pas: HashMap<V4, LocalPa>,
    pub local_pas6: HashMap<nv_common::Addr, LocalPa>,
    /// Rewrite PAs of either family, by their 16-byte form.
    pub rewrite_pas: HashMap<nv_common::Addr, RewritePa>,
    /// VSIDs with a VM on this host, and how many ports each has.
    pub hosted_vsids: HashMap<u32, u32>,
    pub routing: crate::tables::routes::RouteEntries,
    pub acls: crate::tables::acls::AclEntries,
}

/// The IPv4 rewrite PAs' entries, keyed as their map is.
fn rewrite4(all: &HashMap<nv_common::Addr, RewritePa>) -> HashMap<V4, RewritePa> {
    all.iter()
        .filter_map(|(pa, v)| Some((nv_common::mapped_v4(pa)?, *v)))
        .collect()
}

/// The IPv6 rewrite PAs' entries.
fn rewrite6(all: &HashMap<nv_common::Addr, RewritePa>) -> HashMap<nv_common::Addr, RewritePa> {
    all.iter()
        .filter(|(pa, _)| nv_common::mapped_v4(pa).is_none())
        .map(|(pa, v)| (*pa, *v))
        .collect()
}

/// Every counter, summed over all CPUs.
fn read_counters<T: std::borrow::Borrow<MapData>>(
    arr: &PerCpuArray<T, u64>,
) -> Result<Vec<(Counter, u64)>> {
    Counter::ALL
        .iter()
        .map(|c| {
            let values = arr
                .get(&(*c as u32), 0)
                .map_err(|e| dp_err("read counter", e))?;
            Ok((*c, values.iter().sum()))
        })
        .collect()
}

/// Traffic per VSID, direction and method, summed over all CPUs.
fn read_vsid_stats<T: std::borrow::Borrow<MapData>>(
    map: &aya::maps::PerCpuHashMap<T, u32, VsidTraffic>,
) -> Result<Vec<(VsidStatsKey, VsidStats)>> {
    let mut out = Vec::new();
    for entry in map {
        let (vsid, per_cpu) = entry.map_err(|e| dp_err("read the per-VSID map", e))?;
        for dir in [VsidStatsKey::TX, VsidStatsKey::RX] {
            for method in [
                VsidStatsKey::ENCAP,
                VsidStatsKey::REWRITE,
                VsidStatsKey::LOCAL,
            ] {
                let slot = VsidStatsKey::slot(dir, method);
                let sum = per_cpu.iter().fold(VsidStats::default(), |a, v| VsidStats {
                    packets: a.packets + v.by[slot].packets,
                    bytes: a.bytes + v.by[slot].bytes,
                });
                if sum.packets > 0 {
                    out.push((VsidStatsKey::new(vsid, dir, method), sum));
                }
            }
        }
    }
    Ok(out)
}

/// The datapath's counters and per-VSID traffic, read from their pinned maps by whoever
/// reports them (`/metrics`, `nvctl stats`) without the agent.
pub struct CounterReader {
    counters: PerCpuArray<MapData, u64>,
    vsids: aya::maps::PerCpuHashMap<MapData, u32, VsidTraffic>,
    routed: aya::maps::PerCpuHashMap<MapData, u32, u64>,
    acl_meters: aya::maps::PerCpuHashMap<MapData, AclMeterKey, AclMeter>,
    acl_flows: BpfHashMap<MapData, AclFlowKey, AclFlowSet>,
}

impl CounterReader {
    pub fn open(pin_path: &Path) -> Result<CounterReader> {
        let open = |name: &str| {
            MapData::from_pin(pin_path.join("maps").join(name))
                .map_err(|e| dp_err(format!("open the pinned map {name}"), e))
        };
        Ok(CounterReader {
            counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(
                map_names::COUNTERS,
            )?))
            .map_err(|e| dp_err("counter map", e))?,
            vsids: aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open(
                map_names::VSID_STATS,
            )?))
            .map_err(|e| dp_err("per-VSID map", e))?,
            routed: aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open(
                map_names::ROUTED_STATS,
            )?))
            .map_err(|e| dp_err("routed-packets map", e))?,
            acl_meters: aya::maps::PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(open(
                map_names::ACL_METERS,
            )?))
            .map_err(|e| dp_err("ACL meter map", e))?,
            acl_flows: BpfHashMap::try_from(aya::maps::Map::HashMap(open(map_names::ACL_FLOWS)?))
                .map_err(|e| dp_err("ACL flow map", e))?,
        })
    }

    /// Each ACL rule's packets and bytes by direction.
    pub fn acl_meters(&self) -> Result<HashMap<AclMeterKey, AclMeter>> {
        acl::read_meters(&self.acl_meters)
    }

    /// Live tracked connections per VM.
    pub fn acl_flows(&self) -> Result<HashMap<crate::tables::acls::Vm, u64>> {
        acl::read_flows(&self.acl_flows)
    }

    /// Routed packets by routing domain number, summed over all CPUs.
    pub fn routed(&self) -> Result<Vec<(u32, u64)>> {
        self.routed
            .iter()
            .map(|entry| {
                let (domain, per_cpu) =
                    entry.map_err(|e| dp_err("read the routed-packets map", e))?;
                Ok((domain, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        read_counters(&self.counters)
    }

    /// Traffic of one VSID or all, in (VSID, direction, method) order.
    pub fn vsid_stats(&self, vsid: Option<u32>) -> Result<Vec<(VsidStatsKey, VsidStats)>> {
        let mut all = read_vsid_stats(&self.vsids)?;
        all.retain(|(k, _)| vsid.is_none_or(|v| k.vsid == v));
        all.sort_by_key(|(k, _)| (k.vsid, k.dir, k.method));
        Ok(all)
    }
}

/// A read-only view of a running agent's pinned lookup map, for benchmarks and diagnostics.
pub struct LookupView(BpfHashMap<MapData, LookupKey, LookupValue>);

impl LookupView {
    pub fn open(pin_path: &Path) -> Result<LookupView> {
        let path = pin_path.join("maps").join(map_names::LOOKUPS);
        let data =
            MapData::from_pin(&path).map_err(|e| dp_err(format!("open {}", path.display()), e))?;
        let map = BpfHashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|e| dp_err("lookup map", e))?;
        Ok(LookupView(map))
    }

    pub fn get(&self, key: &LookupKey) -> Option<LookupValue> {
        self.0.get(key, 0).ok()
    }
}

fn put_entry<K: Pod, V: Pod>(ebpf: &mut Ebpf, name: &str, k: &K, v: &V) -> Result<()> {
    let mut m: BpfHashMap<&mut MapData, K, V> = map(ebpf, name)?;
    m.insert(k, v, 0)
        .map_err(|e| dp_err(format!("update {name}"), e))
}

fn del_entry<K: Pod, V: Pod>(ebpf: &mut Ebpf, name: &str, k: &K) -> Result<()> {
    let mut m: BpfHashMap<&mut MapData, K, V> = map(ebpf, name)?;
    match m.remove(k) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(dp_err(format!("delete from {name}"), e)),
    }
}

/// Puts `v` under `k`, or removes `k` (absent already is fine).
pub(super) fn set_entry<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    k: &K,
    v: Option<&V>,
) -> Result<()> {
    match v {
        Some(v) => put_entry(ebpf, name, k, v),
        None => del_entry::<K, V>(ebpf, name, k),
    }
}

/// Puts or deletes the entry of one prefix of the route trie `name`.
fn set_route<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    (len, key): (u32, K),
    v: Option<&V>,
) -> Result<()> {
    let mut m: LpmTrie<&mut MapData, K, V> = map(ebpf, name)?;
    let k = LpmKey::new(len, key);
    match v {
        Some(v) => m
            .insert(&k, v, 0)
            .map_err(|e| dp_err(format!("update {name}"), e)),
        None => match m.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(dp_err(format!("delete from {name}"), e)),
        },
    }
}

/// Makes the route trie `name` hold exactly `desired`.
fn sync_routes<K, V>(ebpf: &mut Ebpf, name: &str, desired: &HashMap<(u32, K), V>) -> Result<Repair>
where
    K: Pod + Eq + Hash,
    V: Pod + PartialEq,
{
    let present: HashMap<(u32, K), V> = {
        let m: LpmTrie<&mut MapData, K, V> = map(ebpf, name)?;
        let mut present = HashMap::new();
        for entry in &m {
            let (k, v) = entry.map_err(|e| dp_err(format!("iterate {name}"), e))?;
            present.insert((k.prefix_len(), k.data()), v);
        }
        present
    };
    let mut repair = Repair::default();
    for (k, v) in desired {
        if present.get(k) != Some(v) {
            set_route(ebpf, name, *k, Some(v))?;
            repair.written += 1;
        }
    }
    for k in present.keys() {
        if !desired.contains_key(k) {
            set_route::<K, V>(ebpf, name, *k, None)?;
            repair.removed += 1;
        }
    }
    Ok(repair)
}

/// Lookup entries per `BPF_MAP_UPDATE_BATCH` call (copied into one buffer each).
const BATCH: usize = 16_384;

/// Fewer lookup puts in a row than this go one by one.
const BATCH_MIN: usize = 64;

impl Maps for Datapath {
    fn write_all(&mut self, writes: &[Write]) -> std::result::Result<(), Stopped> {
        let mut i = 0;
        while i < writes.len() {
            let run = writes[i..]
                .iter()
                .take_while(|w| matches!(w, Write::Lookup(_, Some(_))))
                .count();
            if run >= BATCH_MIN {
                self.put_lookups(&writes[i..i + run])
                    .map_err(|(n, error)| Stopped { done: i + n, error })?;
                i += run;
                continue;
            }
            self.write(&writes[i])
                .map_err(|error| Stopped { done: i, error })?;
            i += 1;
        }
        Ok(())
    }
}

fn sync_hash<K, V>(ebpf: &mut Ebpf, name: &str, desired: &HashMap<K, V>) -> Result<Repair>
where
    K: Pod + Eq + Hash,
    V: Pod + PartialEq,
{
    let mut m: BpfHashMap<&mut MapData, K, V> = map(ebpf, name)?;
    let mut present = HashMap::new();
    for entry in &m {
        let (k, v) = entry.map_err(|e| dp_err(format!("iterate {name}"), e))?;
        present.insert(k, v);
    }
    let mut repair = Repair::default();
    for (k, v) in desired {
        if present.get(k) != Some(v) {
            m.insert(k, v, 0)
                .map_err(|e| dp_err(format!("update {name}"), e))?;
            repair.written += 1;
        }
    }
    for k in present.keys() {
        if !desired.contains_key(k) {
            match m.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(dp_err(format!("delete from {name}"), e)),
            }
            repair.removed += 1;
        }
    }
    Ok(repair)
}

impl Datapath {
    /// Makes the maps hold exactly `desired`: new and changed entries first, stale ones last,
    /// so a record being replaced never disappears in between.
    /// Makes every map the agent owns hold exactly `desired`, and says what it had to write
    /// or remove to get there (nothing, unless something changed the maps behind the agent's
    /// back, or they are new).
    pub fn sync(&mut self, desired: &Desired) -> Result<Vec<(&'static str, Repair)>> {
        let mut repairs = Vec::new();
        let config: Array<&mut MapData, DatapathConfig> = map(&mut self.ebpf, map_names::CONFIG)?;
        if config.get(&0, 0).ok() != Some(desired.config) {
            self.set_config(desired.config)?;
            repairs.push((
                map_names::CONFIG,
                Repair {
                    written: 1,
                    removed: 0,
                },
            ));
        }
        let ebpf = &mut self.ebpf;
        for (name, repair) in [
            (
                map_names::LOCAL_PAS,
                sync_hash(ebpf, map_names::LOCAL_PAS, &desired.local_pas)?,
            ),
            (
                map_names::LOCAL_PAS6,
                sync_hash(ebpf, map_names::LOCAL_PAS6, &desired.local_pas6)?,
            ),
            (
                map_names::PORTS,
                sync_hash(ebpf, map_names::PORTS, &desired.ports)?,
            ),
            (
                map_names::LOOKUPS,
                sync_hash(ebpf, map_names::LOOKUPS, &desired.lookups)?,
            ),
            (
                map_names::LOOKUPS6,
                sync_hash(ebpf, map_names::LOOKUPS6, &desired.lookups6)?,
            ),
            (
                map_names::REWRITE_PAS,
                sync_hash(
                    ebpf,
                    map_names::REWRITE_PAS,
                    &rewrite4(&desired.rewrite_pas),
                )?,
            ),
            (
                map_names::REWRITE_PAS6,
                sync_hash(
                    ebpf,
                    map_names::REWRITE_PAS6,
                    &rewrite6(&desired.rewrite_pas),
                )?,
            ),
            (
                map_names::HOSTED_VSIDS,
                sync_hash(ebpf, map_names::HOSTED_VSIDS, &desired.hosted_vsids)?,
            ),
            // The trie and gateways before the VSIDs that use them.
            (
                map_names::ROUTES,
                sync_routes(ebpf, map_names::ROUTES, &desired.routing.routes)?,
            ),
            (
                map_names::GATEWAYS,
                sync_hash(ebpf, map_names::GATEWAYS, &desired.routing.gateways)?,
            ),
            (
                map_names::ROUTES6,
                sync_routes(ebpf, map_names::ROUTES6, &desired.routing.routes6)?,
            ),
            (
                map_names::GATEWAYS6,
                sync_hash(ebpf, map_names::GATEWAYS6, &desired.routing.gateways6)?,
            ),
            (
                map_names::VSID_ROUTING,
                sync_hash(ebpf, map_names::VSID_ROUTING, &desired.routing.vsids)?,
            ),
            // Sets, flow sets and meters before the port entries name them: the ports were
            // synced above with what the store says, a restart's usual nothing-to-do.
            (
                map_names::ACL_SETS,
                acl::sync_sets(ebpf, &desired.acls.sets)?,
            ),
            (
                map_names::ACL_FLOWS,
                acl::sync_flows(ebpf, &desired.acls.flows)?,
            ),
            (
                map_names::ACL_METERS,
                acl::sync_meters(ebpf, &desired.acls.meters)?,
            ),
        ] {
            if repair != Repair::default() {
                repairs.push((name, repair));
            }
        }
        Ok(repairs)
    }

    /// Makes the underlay-hop map hold `hops` (by IPv4 PA in network order) and nothing else,
    /// writing only what differs, then has them good until `alive` (`CLOCK_MONOTONIC` ns): how
    /// many entries were new, changed or removed.
    pub fn set_underlay_hops(
        &mut self,
        hops: &HashMap<u32, UnderlayHop>,
        alive: u64,
    ) -> Result<usize> {
        let mut m: BpfHashMap<&mut MapData, u32, UnderlayHop> =
            map(&mut self.ebpf, map_names::UNDERLAY_HOPS)?;
        let mut now = HashMap::new();
        for entry in &m {
            let (pa, hop) = entry.map_err(|e| dp_err("read NV_UNDERLAY_HOPS", e))?;
            now.insert(pa, hop);
        }
        let mut changed = 0;
        for pa in now.keys().filter(|pa| !hops.contains_key(pa)) {
            match m.remove(pa) {
                Ok(()) | Err(MapError::KeyNotFound) => changed += 1,
                Err(e) => return Err(dp_err("delete from NV_UNDERLAY_HOPS", e)),
            }
        }
        for (pa, hop) in hops.iter().filter(|(pa, hop)| now.get(pa) != Some(hop)) {
            m.insert(pa, hop, 0)
                .map_err(|e| dp_err("update NV_UNDERLAY_HOPS", e))?;
            changed += 1;
        }
        let mut a: Array<&mut MapData, u64> = map(&mut self.ebpf, map_names::UNDERLAY_ALIVE)?;
        a.set(0, alive, 0)
            .map_err(|e| dp_err("update NV_UNDERLAY_ALIVE", e))?;
        Ok(changed)
    }

    pub fn put_port(&mut self, ifindex: u32, p: &PortInfo) -> Result<()> {
        put_entry(&mut self.ebpf, map_names::PORTS, &ifindex, p)
    }

    /// Makes one write of the transaction path.
    fn write(&mut self, w: &Write) -> Result<()> {
        let ebpf = &mut self.ebpf;
        match w {
            Write::Filter(port) => self.attach_port(port),
            Write::Port(i, v) => set_entry(ebpf, map_names::PORTS, i, v.as_ref()),
            Write::Hosted(vsid, n) => set_entry(ebpf, map_names::HOSTED_VSIDS, vsid, n.as_ref()),
            Write::Rewrite(pa, v) => match nv_common::mapped_v4(pa) {
                Some(v4) => set_entry(ebpf, map_names::REWRITE_PAS, &v4, v.as_ref()),
                None => set_entry(ebpf, map_names::REWRITE_PAS6, pa, v.as_ref()),
            },
            Write::Lookup(k, v) => set_entry(ebpf, map_names::LOOKUPS, k, v.as_ref()),
            Write::Lookup6(k, v) => set_entry(ebpf, map_names::LOOKUPS6, k, v.as_ref()),
            Write::LocalPa(pa, v) => set_entry(ebpf, map_names::LOCAL_PAS, pa, v.as_ref()),
            Write::LocalPa6(pa, v) => set_entry(ebpf, map_names::LOCAL_PAS6, pa, v.as_ref()),
            Write::VsidRouting(vsid, v) => {
                set_entry(ebpf, map_names::VSID_ROUTING, vsid, v.as_ref())
            }
            Write::Route(k, v) => set_route(ebpf, map_names::ROUTES, *k, v.as_ref()),
            Write::Gateway(k, v) => set_entry(ebpf, map_names::GATEWAYS, k, v.as_ref()),
            Write::Route6(k, v) => set_route(ebpf, map_names::ROUTES6, *k, v.as_ref()),
            Write::Gateway6(k, v) => set_entry(ebpf, map_names::GATEWAYS6, k, v.as_ref()),
            Write::Config(c) => self.set_config(**c),
            Write::AclSet(k, v) => set_entry(ebpf, map_names::ACL_SETS, k, v.as_deref()),
            Write::AclFlows(vm, n) => acl::set_flows(ebpf, *vm, *n),
            Write::AclMeter(k, on) => acl::set_meter(ebpf, *k, *on),
        }
    }

    /// Puts lookup entries with `BPF_MAP_UPDATE_BATCH`, a chunk per system call; on failure,
    /// how many went in before it.
    fn put_lookups(&mut self, entries: &[Write]) -> std::result::Result<(), (usize, NvError)> {
        let fd = {
            let map = self.ebpf.map(map_names::LOOKUPS).ok_or_else(|| {
                (
                    0,
                    NvError::datapath(format!("map {} missing", map_names::LOOKUPS)),
                )
            })?;
            let aya::maps::Map::HashMap(data) = map else {
                return Err((0, NvError::datapath("lookup map is not a hash")));
            };
            data.fd().as_fd().as_raw_fd()
        };
        let mut done = 0;
        for chunk in entries.chunks(BATCH) {
            let (keys, values): (Vec<LookupKey>, Vec<LookupValue>) = chunk
                .iter()
                .filter_map(|w| match w {
                    Write::Lookup(k, Some(v)) => Some((*k, *v)),
                    _ => None,
                })
                .unzip();
            debug_assert_eq!(keys.len(), chunk.len());
            let n = batch::update(fd, &keys, &values)
                .map_err(|(n, e)| (done + n, dp_err("update NV_LOOKUPS", e)))?;
            done += n;
        }
        Ok(())
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        let mut m: Array<&mut MapData, DatapathConfig> = map(&mut self.ebpf, map_names::CONFIG)?;
        m.set(0, config, 0).map_err(|e| dp_err("write config", e))
    }

    /// Counter totals over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let m = self
            .ebpf
            .map(map_names::COUNTERS)
            .ok_or_else(|| NvError::datapath("counter map missing"))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(m).map_err(|e| dp_err("counter map", e))?;
        read_counters(&arr)
    }

    /// The monitor's ring buffer, for the one reader that hands its events out.
    pub fn take_monitor(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_names::MONITOR)
            .ok_or_else(|| NvError::datapath("the monitor's ring buffer is missing"))?;
        aya::maps::RingBuf::try_from(map).map_err(|e| dp_err("the monitor's ring buffer", e))
    }

    /// The slow path's ring buffer, for the DHCP server.
    pub fn take_slow_path(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_names::SLOW_PATH)
            .ok_or_else(|| NvError::datapath("the slow path's ring buffer is missing"))?;
        aya::maps::RingBuf::try_from(map).map_err(|e| dp_err("the slow path's ring buffer", e))
    }

    /// Traffic per VSID, direction and method, summed over all CPUs.
    pub fn vsid_stats(&self) -> Result<Vec<(VsidStatsKey, VsidStats)>> {
        let m = self
            .ebpf
            .map(map_names::VSID_STATS)
            .ok_or_else(|| NvError::datapath("per-VSID map missing"))?;
        let map: aya::maps::PerCpuHashMap<&MapData, u32, VsidTraffic> =
            aya::maps::PerCpuHashMap::try_from(m).map_err(|e| dp_err("per-VSID map", e))?;
        read_vsid_stats(&map)
    }

    /// The capacity (`max_entries`) of each map this build uses, by name.
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        map_names::ALL
            .iter()
            .filter_map(|name| {
                let info = match self.ebpf.map(name)? {
                    aya::maps::Map::HashMap(d)
                    | aya::maps::Map::PerCpuHashMap(d)
                    | aya::maps::Map::PerCpuLruHashMap(d)
                    | aya::maps::Map::Array(d)
                    | aya::maps::Map::PerCpuArray(d)
                    | aya::maps::Map::RingBuf(d) => d.info().ok()?,
                    _ => return None,
                };
                Some((*name, info.max_entries()))
            })
            .collect()
    }
}
