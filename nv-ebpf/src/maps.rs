//! The maps. All are pinned by name, so a restarted agent finds the same maps and forwarding
//! never stops; sizes of the big ones are overridden by the agent at load time.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use nv_common::{
    Counter, DEFAULT_MAX_LOOKUPS, DatapathConfig, IcmpBucket, LocalPa, LookupKey, LookupKey6,
    LookupValue, MAX_HOSTED_VSIDS, MAX_LOCAL_PAS, MAX_LOOKUPS6, MAX_PORTS, MAX_REWRITE_PAS,
    NextHop, PortInfo, RewritePa, V4, VsidTraffic,
    acl::{
        AclFlowKey, AclFlowSet, AclMeter, AclMeterKey, AclSet, AclSetKey, MAX_ACL_METERS,
        MAX_ACL_SETS, MAX_FLOW_SETS,
    },
    monitor::{MAX_VSID_STATS, MONITOR_RING_BYTES},
    routing::{
        GatewayKey, GatewayKey6, MAX_GATEWAYS, MAX_ROUTED_VSIDS, MAX_ROUTES, RouteHop, RouteHop6,
        RouteKey, RouteKey6, VsidRouting,
    },
    slow_path::SLOW_RING_BYTES,
};

#[map(name = "NV_LOOKUPS")]
pub static LOOKUPS: HashMap<LookupKey, LookupValue> = HashMap::pinned(DEFAULT_MAX_LOOKUPS, 0);

#[map(name = "NV_PORTS")]
pub static PORTS: HashMap<u32, PortInfo> = HashMap::pinned(MAX_PORTS, 0);

#[map(name = "NV_LOCAL_PAS")]
pub static LOCAL_PAS: HashMap<V4, LocalPa> = HashMap::pinned(MAX_LOCAL_PAS, 0);

/// IPv6 provider addresses: a map of their own, so IPv4's keeps its 4-byte key.
#[map(name = "NV_LOCAL_PAS6")]
pub static LOCAL_PAS6: HashMap<nv_common::Addr, LocalPa> = HashMap::pinned(MAX_LOCAL_PAS, 0);

#[map(name = "NV_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::pinned(1, 0);

#[map(name = "NV_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::SLOTS, 0);

#[map(name = "NV_REWRITE_PAS")]
pub static REWRITE_PAS: HashMap<V4, RewritePa> = HashMap::pinned(MAX_REWRITE_PAS, 0);

/// IPv6 rewrite PAs: a map of their own, so IPv4's keeps its 4-byte key.
#[map(name = "NV_REWRITE_PAS6")]
pub static REWRITE_PAS6: HashMap<nv_common::Addr, RewritePa> = HashMap::pinned(MAX_REWRITE_PAS, 0);

/// The underlay next hops of destination PAs, cached by the datapath ([`NextHop`]).
#[map(name = "NV_NEXTHOPS")]
pub static NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::pinned(NextHop::SLOTS, 0);

/// The agent's next hops for remote IPv4 PAs ([`nv_common::UnderlayHop`]).
#[map(name = "NV_UNDERLAY_HOPS")]
pub static UNDERLAY_HOPS: HashMap<u32, nv_common::UnderlayHop> =
    HashMap::pinned(nv_common::MAX_UNDERLAY_HOPS, 0);

#[map(name = "NV_UNDERLAY_ALIVE")]
pub static UNDERLAY_ALIVE: Array<u64> = Array::pinned(1, 0);

/// The same for IPv6 PAs.
#[map(name = "NV_NEXTHOPS6")]
pub static NEXTHOPS6: PerCpuArray<nv_common::NextHop6> =
    PerCpuArray::pinned(nv_common::NextHop6::SLOTS, 0);

/// VSIDs with a VM on this host (value: how many ports): NVGRE for any other VSID is refused
/// with its own reason.
#[map(name = "NV_HOSTED_VSIDS")]
pub static HOSTED_VSIDS: HashMap<u32, u32> = HashMap::pinned(MAX_HOSTED_VSIDS, 0);

/// The ICMP error budgets ([`IcmpBucket`]): one bucket per VM port (by ifindex) and CPU.
#[map(name = "NV_ICMP_BUCKET")]
pub static ICMP_BUCKET: LruPerCpuHashMap<u32, IcmpBucket> = LruPerCpuHashMap::pinned(MAX_PORTS, 0);

/// Traffic per VSID, direction and method, per CPU ([`VsidStats`]): what Prometheus scrapes.
#[map(name = "NV_VSID_STATS")]
pub static VSID_STATS: PerCpuHashMap<u32, VsidTraffic> = PerCpuHashMap::pinned(MAX_VSID_STATS, 0);

/// Events for `nvctl monitor`, written only while the config says a monitor runs.
#[map(name = "NV_MONITOR")]
pub static MONITOR: RingBuf = RingBuf::pinned(MONITOR_RING_BYTES, 0);

/// Per CPU: forwarded packets since the last one sampled for the monitor.
#[map(name = "NV_MONITOR_SAMPLE")]
pub static MONITOR_SAMPLE: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

/// The routing domain of each routed VSID (a VSID without an entry is routed nowhere).
#[map(name = "NV_VSID_ROUTING")]
pub static VSID_ROUTING: HashMap<u32, VsidRouting> = HashMap::pinned(MAX_ROUTED_VSIDS, 0);

/// Every domain's routes, the best metric of each prefix: longest prefix wins.
#[map(name = "NV_ROUTES")]
pub static ROUTES: LpmTrie<RouteKey, RouteHop> = LpmTrie::pinned(MAX_ROUTES, 0);

/// Every subnet's gateway address, in its domain (value: the subnet's VSID).
#[map(name = "NV_GATEWAYS")]
pub static GATEWAYS: HashMap<GatewayKey, u32> = HashMap::pinned(MAX_GATEWAYS, 0);

/// Routed packets per routing domain (by its number), per CPU.
#[map(name = "NV_ROUTED_STATS")]
pub static ROUTED_STATS: PerCpuHashMap<u32, u64> = PerCpuHashMap::pinned(MAX_ROUTED_VSIDS, 0);

/// Frames for the agent to answer ([`nv_common::slow_path::SlowFrame`]).
#[map(name = "NV_SLOW_PATH")]
pub static SLOW_PATH: RingBuf = RingBuf::pinned(SLOW_RING_BYTES, 0);

/// Each VM port's budget of frames for the agent, per CPU.
#[map(name = "NV_SLOW_BUCKET")]
pub static SLOW_BUCKET: LruPerCpuHashMap<u32, IcmpBucket> = LruPerCpuHashMap::pinned(MAX_PORTS, 0);

/// IPv6 customer addresses: where each lives, as [`LOOKUPS`] for IPv4.
#[map(name = "NV_LOOKUPS6")]
pub static LOOKUPS6: HashMap<LookupKey6, LookupValue> = HashMap::pinned(MAX_LOOKUPS6, 0);

/// IPv6 routes and gateways, as [`ROUTES`] and [`GATEWAYS`] for IPv4.
#[map(name = "NV_ROUTES6")]
pub static ROUTES6: LpmTrie<RouteKey6, RouteHop6> = LpmTrie::pinned(MAX_ROUTES, 0);

#[map(name = "NV_GATEWAYS6")]
pub static GATEWAYS6: HashMap<GatewayKey6, u32> = HashMap::pinned(MAX_GATEWAYS, 0);

/// Each VM port's ACL rules of one direction ([`nv_common::acl::AclSet`]), allocated as
/// written: a port without rules has none.
#[map(name = "NV_ACL_SETS")]
pub static ACL_SETS: HashMap<AclSetKey, AclSet> = HashMap::pinned(MAX_ACL_SETS, NO_PREALLOC);

/// Packets and bytes each ACL rule decided, by direction, per CPU.
#[map(name = "NV_ACL_METERS")]
pub static ACL_METERS: PerCpuHashMap<AclMeterKey, AclMeter> =
    PerCpuHashMap::pinned(MAX_ACL_METERS, NO_PREALLOC);

/// The connections stateful ACL rules admitted: each port's flow sets, made by the agent.
#[map(name = "NV_ACL_FLOWS")]
pub static ACL_FLOWS: HashMap<AclFlowKey, AclFlowSet> = HashMap::pinned(MAX_FLOW_SETS, NO_PREALLOC);

/// Per CPU: the ACL rule behind the last deny, for the monitor's report of it (in the same
/// run) and a trace's. Not pinned: each loaded copy has its own.
#[map(name = "NV_ACL_DENIED")]
pub static ACL_DENIED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: the tuple of the packet the ACLs are looking at and its lookups' keys (off the
/// stack). Not pinned: a scratch value of each loaded copy.
#[map(name = "NV_ACL_SCRATCH")]
pub static ACL_SCRATCH: PerCpuArray<AclScratch> = PerCpuArray::with_max_entries(1, 0);

/// What the ACL check works on: the packet's tuple and the keys of its lookups.
#[repr(C)]
pub struct AclScratch {
    pub t: nv_common::acl::AclTuple,
    /// An IPv4 header's fixed 20 bytes, read in one helper call.
    pub ip4: [u8; 20],
    pub set: AclSetKey,
    pub flow: AclFlowKey,
    pub meter: AclMeterKey,
}

/// `BPF_F_NO_PREALLOC`: entries take memory as they are made.
const NO_PREALLOC: u32 = 1;
