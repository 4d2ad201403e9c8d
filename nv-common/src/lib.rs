//! Types shared by nv's eBPF programs and its agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so the layout the verifier sees
//! is the one userspace writes; sizes are asserted at compile time. Addresses in map values are
//! 16 bytes wide (IPv4 as IPv4-mapped IPv6), ready for IPv6. Addresses in map keys are not:
//! a hash lookup's cost grows with its key (measured here: 15 ns with a 20-byte key, 4 ns with
//! a 4-byte one, and decapsulation makes two), so the keyed maps are per address family, as
//! Cilium's are. These are the IPv4 ones; IPv6 customers and underlay will add their own.
#![no_std]

pub mod acl;
pub mod counters;
pub mod flow;
pub mod monitor;
pub mod routing;
pub mod slow_path;
pub mod wire;

pub use counters::Counter;
pub use monitor::{MonitorEvent, VsidStats, VsidStatsKey, VsidTraffic};

/// The skb mark on what the datapath sends from an IPv6 PA it owns: the uplink's egress
/// program lets only such packets leave from one ("nv" and 6). A host process cannot set a
/// mark without `CAP_NET_ADMIN`.
pub const DATAPATH_SENT_MARK: u32 = 0x6e76_0006;

/// Lowest valid Virtual Subnet ID; 0x000000-0x000FFF are reserved by RFC 7637.
pub const VSID_MIN: u32 = 0x1000;
/// Highest valid Virtual Subnet ID; 0xFFFFFF is reserved by RFC 7637.
pub const VSID_MAX: u32 = 0xFF_FFFE;

/// Names of the maps, as the eBPF object declares them and userspace pins them.
pub mod map_names {
    pub const LOOKUPS: &str = "NV_LOOKUPS";
    pub const PORTS: &str = "NV_PORTS";
    pub const LOCAL_PAS: &str = "NV_LOCAL_PAS";
    /// This host's IPv6 provider addresses, keyed by the 16-byte address.
    pub const LOCAL_PAS6: &str = "NV_LOCAL_PAS6";
    pub const CONFIG: &str = "NV_CONFIG";
    pub const COUNTERS: &str = "NV_COUNTERS";
    pub const REWRITE_PAS: &str = "NV_REWRITE_PAS";
    pub const NEXTHOPS: &str = "NV_NEXTHOPS";
    /// Next hops the agent resolved for remote IPv4 PAs ([`crate::UnderlayHop`]), and until
    /// when they are good (`CLOCK_MONOTONIC` ns, as `bpf_ktime_get_ns` reads it; index 0).
    pub const UNDERLAY_HOPS: &str = "NV_UNDERLAY_HOPS";
    pub const UNDERLAY_ALIVE: &str = "NV_UNDERLAY_ALIVE";
    pub const NEXTHOPS6: &str = "NV_NEXTHOPS6";
    /// IPv6 rewrite PAs ([`crate::RewritePa`]), keyed by the 16-byte address.
    pub const REWRITE_PAS6: &str = "NV_REWRITE_PAS6";
    pub const HOSTED_VSIDS: &str = "NV_HOSTED_VSIDS";
    pub const ICMP_BUCKET: &str = "NV_ICMP_BUCKET";
    /// Traffic per VSID, direction and method ([`crate::VsidStats`]).
    pub const VSID_STATS: &str = "NV_VSID_STATS";
    /// Events for `nvctl monitor` ([`crate::MonitorEvent`]).
    pub const MONITOR: &str = "NV_MONITOR";
    /// Per CPU: forwarded packets since the last sampled one.
    pub const MONITOR_SAMPLE: &str = "NV_MONITOR_SAMPLE";
    /// The distributed router ([`crate::routing`]).
    pub const VSID_ROUTING: &str = "NV_VSID_ROUTING";
    pub const ROUTES: &str = "NV_ROUTES";
    pub const GATEWAYS: &str = "NV_GATEWAYS";
    pub const ROUTES6: &str = "NV_ROUTES6";
    pub const GATEWAYS6: &str = "NV_GATEWAYS6";
    /// IPv6 customer addresses ([`crate::LookupKey6`]).
    pub const LOOKUPS6: &str = "NV_LOOKUPS6";
    /// Routed packets per routing domain, per CPU.
    pub const ROUTED_STATS: &str = "NV_ROUTED_STATS";
    /// Frames for the agent ([`crate::slow_path`]), and each VM port's budget of them.
    pub const SLOW_PATH: &str = "NV_SLOW_PATH";
    pub const SLOW_BUCKET: &str = "NV_SLOW_BUCKET";
    /// Not pinned: each loaded copy of the programs has its own ([`RedirectTrace`]).
    pub const TRACE_REDIRECT: &str = "NV_TRACE_REDIRECT";
    /// Port ACLs ([`crate::acl`]): rule sets, meters, tracked connections; the last deny
    /// (not pinned: each loaded copy has its own).
    pub const ACL_SETS: &str = "NV_ACL_SETS";
    pub const ACL_METERS: &str = "NV_ACL_METERS";
    pub const ACL_FLOWS: &str = "NV_ACL_FLOWS";
    pub const ACL_DENIED: &str = "NV_ACL_DENIED";
    pub const ALL: [&str; 29] = [
        LOOKUPS,
        PORTS,
        LOCAL_PAS,
        CONFIG,
        COUNTERS,
        REWRITE_PAS,
        NEXTHOPS,
        HOSTED_VSIDS,
        ICMP_BUCKET,
        VSID_STATS,
        MONITOR,
        MONITOR_SAMPLE,
        VSID_ROUTING,
        ROUTES,
        GATEWAYS,
        ROUTED_STATS,
        SLOW_PATH,
        SLOW_BUCKET,
        LOOKUPS6,
        ROUTES6,
        GATEWAYS6,
        LOCAL_PAS6,
        NEXTHOPS6,
        REWRITE_PAS6,
        ACL_SETS,
        ACL_METERS,
        ACL_FLOWS,
        UNDERLAY_HOPS,
        UNDERLAY_ALIVE,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// TC ingress on a VM port: traffic leaving a VM.
    pub const FROM_VM: &str = "nv_from_vm";
    /// XDP on the uplink: NVGRE validation and decapsulation.
    pub const UPLINK_XDP: &str = "nv_uplink_xdp";
    /// TC ingress on the uplink: hands decapsulated frames to their VM port.
    pub const UPLINK_TC: &str = "nv_uplink_tc";
    /// TC egress on the uplink: nothing from a PA the datapath owns but what it sends.
    pub const UPLINK_EGRESS: &str = "nv_uplink_egress";
    /// TC ingress on the bounce device's peer: a VM's tunnel super-packet, segmented.
    pub const FROM_BOUNCE: &str = "nv_from_bounce";
    /// Do-nothing programs: the benchmark's floors.
    pub const NOOP_XDP: &str = "nv_noop_xdp";
    pub const NOOP_TC: &str = "nv_noop_tc";
}

/// Per-CPU token bucket of the ICMP errors the datapath sends to a VM port (as Linux's
/// `icmp_msgs_per_sec` and `icmp_msgs_burst`): a VM flooding oversize packets gets a bounded
/// number of answers, and the rest is dropped and counted; other VMs keep their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IcmpBucket {
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    pub tokens: u64,
}

impl IcmpBucket {
    /// Answers per second and CPU, and the burst allowed.
    pub const PER_SEC: u64 = 1000;
    pub const BURST: u64 = 50;
}

/// Default size of the lookup map; the agent's `max_lookups` overrides it at load time.
pub const DEFAULT_MAX_LOOKUPS: u32 = 1 << 20;
pub const MAX_PORTS: u32 = 65_536;
pub const MAX_LOCAL_PAS: u32 = 4_096;
/// VSIDs with a VM on this host.
pub const MAX_HOSTED_VSIDS: u32 = 65_536;
/// Rewrite records, local and remote (one PA each).
pub const MAX_REWRITE_PAS: u32 = 65_536;

/// A 16-byte address: IPv6, or IPv4 mapped into IPv6 (`::ffff:a.b.c.d`).
pub type Addr = [u8; 16];

/// IPv4 address in network byte order mapped into the 16-byte form.
#[inline(always)]
#[must_use]
pub const fn v4_mapped(v4: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// The IPv4 part of an IPv4-mapped address, or `None` for a real IPv6 address.
#[inline(always)]
#[must_use]
pub fn mapped_v4(a: &Addr) -> Option<[u8; 4]> {
    if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
        Some([a[12], a[13], a[14], a[15]])
    } else {
        None
    }
}

/// An IPv4 address in network byte order, as map keys hold it.
pub type V4 = [u8; 4];

/// Key of the lookup map: an IPv4 customer address within its virtual subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LookupKey {
    pub vsid: u32,
    pub ca: V4,
}

/// Key of the IPv6 lookup map: an IPv6 customer address within its virtual subnet. A map of
/// its own, so IPv4 keeps its 8-byte key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LookupKey6 {
    pub vsid: u32,
    pub ca: Addr,
}

/// IPv6 lookup records a host holds at most.
pub const MAX_LOOKUPS6: u32 = 65_536;

/// How packets to a customer address are translated.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Encap = 0,
    Rewrite = 1,
}

/// Value of the lookup map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupValue {
    /// Provider address of the host the customer address lives on.
    pub pa: Addr,
    pub mac: [u8; 6],
    /// A [`Method`] as `u8`.
    pub method: u8,
    pub _pad: u8,
    /// The VM port on this host, or 0 when the customer address is on another host.
    pub ifindex: u32,
}

/// Value of the ports map, keyed by the port's ifindex: who sits behind the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub vsid: u32,
    pub ca: Addr,
    /// The local provider address that carries this VM's traffic (outer source on encap).
    pub pa: Addr,
    pub mac: [u8; 6],
    /// The VM's own [`Method`]: with `Rewrite`, `pa` is dedicated to it and it may send by
    /// rewrite.
    pub method: u8,
    /// `PortInfo::TAP`, `PortInfo::DOWN`: how to deliver into the port, and whether it can
    /// take a frame now. 0 (a veth that is up) is what entries written before these bits
    /// existed hold.
    pub flags: u8,
}

impl PortInfo {
    /// A tap: its transmit is the guest's receive, so delivery is a redirect to its egress.
    /// Without the bit the port is a veth, delivered to with `bpf_redirect_peer`.
    pub const TAP: u8 = 1;
    /// Not running (admin down, or no carrier: a tap no QEMU holds, a veth whose VM end is
    /// down). The kernel would free a frame redirected there without a trace, so the
    /// datapath drops it with its own reason instead.
    pub const DOWN: u8 = 2;
    /// The port has rules for what it receives ([`acl`]): delivery checks them.
    pub const ACL_IN: u8 = 4;
    /// The port has rules for what it sends: checked before anything is forwarded.
    pub const ACL_OUT: u8 = 8;

    #[inline(always)]
    #[must_use]
    pub const fn is_tap(&self) -> bool {
        self.flags & Self::TAP != 0
    }

    #[inline(always)]
    #[must_use]
    pub const fn is_down(&self) -> bool {
        self.flags & Self::DOWN != 0
    }
}

/// The `ifindex` of a lookup record whose VM port is missing: no device has it (ifindexes are
/// positive `int`s), so delivery finds no port entry and drops the frame as `DropPortGone`,
/// while the record still says "this CA lives here" (nothing else may answer for it).
pub const IFINDEX_GONE: u32 = u32::MAX;

/// Value of the rewrite map, keyed by an IPv4 PA ([`V4`]) dedicated to one CA (IP rewrite records, local and
/// remote): whose PA it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewritePa {
    pub vsid: u32,
    pub ca: Addr,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The VM port on this host, or 0 when the CA is on another host.
    pub ifindex: u32,
}

/// A cached underlay next hop for a provider address: the datapath's own cache of
/// `bpf_fib_lookup`, which costs more than the rest of encapsulation together. A per-CPU array
/// of [`NextHop::SLOTS`] entries, each PA in slot [`NextHop::slot`]: an array read costs a
/// fraction of a hash lookup, and two PAs sharing a slot only cost each other FIB lookups.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The PA this entry is for (IPv4, network order; 0: empty).
    pub pa: u32,
    /// 0: the host does not forward on the uplink, so the FIB helper refuses and the kernel
    /// routes the packet (`bpf_redirect_neigh`); remembered, so the refusal is not asked for
    /// again with every packet.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The route's MTU: a frame that is not GSO and fits needs no MTU helper.
    pub mtu: u32,
    /// `bpf_jiffies64` after which the entry is looked up again.
    pub expires: u64,
}

impl NextHop {
    /// How long a cached next hop is trusted: a changed neighbour or MTU is followed within
    /// this many jiffies (50 to 200 ms at the usual 250 to 1000 Hz).
    pub const TTL_JIFFIES: u64 = 50;
    pub const SLOTS: u32 = 1024;

    /// The slot of `pa` (IPv4, network order, as a native `u32`).
    #[inline(always)]
    #[must_use]
    pub fn slot(pa: u32) -> u32 {
        pa.wrapping_mul(0x9e37_79b1) >> 22
    }
}

/// Where the uplink sends a remote IPv4 PA's packets, as the agent resolved it from the host's
/// routes and neighbours (keyed by the PA in network order, as a native `u32`): for hosts that
/// do not forward on the uplink, where the FIB helper refuses. Without an entry the kernel
/// routes each packet (`bpf_redirect_neigh`). Out of the uplink, from its MAC (the config's):
/// the entry holds only the neighbour's MAC. The agent follows route and neighbour changes; the
/// datapath caches an entry as it caches the FIB's answers ([`NextHop::TTL_JIFFIES`]), and
/// uses none while [`UNDERLAY_ALIVE`](map_names::UNDERLAY_ALIVE) has run out.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnderlayHop {
    pub dmac: [u8; 6],
    pub _pad: [u8; 2],
}

/// How long the agent's underlay hops stay good after it last looked at the host's routes and
/// neighbours, ns: while no agent follows them (stopped, or between two builds for longer than
/// that), the kernel routes the packets again.
pub const UNDERLAY_LIFETIME_NS: u64 = 10_000_000_000;

/// Remote PAs the agent resolves next hops for (hosts of the underlay).
pub const MAX_UNDERLAY_HOPS: u32 = 65_536;

/// [`NextHop`] for an IPv6 PA: the same cache, with the 16-byte address (a table of its own,
/// so IPv4's entries stay 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop6 {
    /// The PA this entry is for (all zero: empty).
    pub pa: Addr,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub mtu: u32,
    pub _pad: u32,
    pub expires: u64,
}

impl NextHop6 {
    pub const SLOTS: u32 = 256;

    /// The slot of `pa`: its last word, hashed (hosts of one underlay share the prefix).
    #[inline(always)]
    #[must_use]
    pub fn slot(pa: &Addr) -> u32 {
        u32::from_ne_bytes([pa[12], pa[13], pa[14], pa[15]]).wrapping_mul(0x9e37_79b1) >> 24
    }
}

/// Value of the local provider address map (keyed by an IPv4 PA, [`V4`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPa {
    /// The interface that holds the address (the uplink).
    pub ifindex: u32,
    /// `LocalPa::OWNED`.
    pub flags: u32,
    /// Only in the layout-probe build: a field this version's map does not have.
    #[cfg(feature = "layout-probe")]
    pub probe: u32,
}

impl LocalPa {
    /// A rewrite PA: the datapath's, never the host's. The address is not on the uplink (no
    /// host process can bind it); the datapath answers ARP for it and hands what arrives for
    /// it to its VM, or drops it.
    pub const OWNED: u32 = 1;

    #[must_use]
    pub const fn new(ifindex: u32, flags: u32) -> LocalPa {
        LocalPa {
            ifindex,
            flags,
            #[cfg(feature = "layout-probe")]
            probe: 0,
        }
    }

    #[inline(always)]
    #[must_use]
    pub const fn is_owned(&self) -> bool {
        self.flags & Self::OWNED != 0
    }
}

/// The single entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Underlay interface: encapsulated frames leave through it.
    pub uplink_ifindex: u32,
    /// `DatapathConfig::*` bits.
    pub flags: u32,
    /// The rewrite PAs of the VMs on this host and every other PA the datapath owns
    /// ([`LocalPa::OWNED`]), as a one-hash Bloom filter: the bit
    /// [`DatapathConfig::rewrite_filter_slot`] names is set for each. Every packet on the
    /// uplink must be asked "is your destination a rewrite PA of this host?"; a clear bit
    /// answers "no" with this array read instead of a hash lookup, so host traffic passes
    /// almost free. A set bit may be a collision: the maps have the last word.
    pub rewrite_filter: [u32; DatapathConfig::REWRITE_FILTER_WORDS],
    /// The uplink's MTU, followed by the agent: a VM's packet that would not fit once
    /// translated is answered with ICMP "fragmentation needed" (0: not known yet; the datapath
    /// then asks the kernel).
    pub uplink_mtu: u32,
    /// The DSCP of what leaves for the underlay: `DatapathConfig::DSCP_COPY` (the tenant's own),
    /// or a fixed codepoint 0..=63 (0, best effort, is the default: a tenant must not pick its
    /// treatment on the underlay).
    pub underlay_dscp: u32,
    /// The uplink's MAC: NVGRE must be addressed to it (all zero: not known yet, not checked).
    pub uplink_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Where a super-packet of a VM's own tunnel goes to be segmented by the kernel before
    /// NVGRE (a veth end with `gso_max_segs` 1), and the ifindex of its peer, on whose ingress
    /// the segments come back to `nv_from_bounce` (0: no such device; such packets are dropped).
    pub bounce_ifindex: u32,
    pub bounce_peer: u32,
    /// `DatapathConfig::MONITOR_DROPS` while an `nvctl monitor` runs: every drop is reported
    /// on the monitor ring buffer. 0 otherwise, and nothing is paid for it.
    pub monitor: u32,
    /// While a monitor asks for them, one forwarded packet in this many is reported too (0:
    /// none).
    pub monitor_sample: u32,
}

impl DatapathConfig {
    /// Decapsulate and restore on the uplink's TC hook (no XDP program attached).
    pub const TC_DECAP: u32 = 2;
    /// `underlay_dscp`: the outer header (NVGRE) or the rewritten one carries the DSCP the
    /// tenant wrote.
    pub const DSCP_COPY: u32 = 0x100;
    /// 1024 bits: a host with 100 rewrite VMs sends about one host packet in ten to the map.
    pub const REWRITE_FILTER_WORDS: usize = 32;
    /// `monitor`: report drops.
    pub const MONITOR_DROPS: u32 = 1;
    /// `flags`: the datapath logs its debug events (aya-log), turned on at run time with
    /// `nvctl debug on`.
    pub const DEBUG_EVENTS: u32 = 4;

    /// Where `pa` (IPv4, network order) sits in `rewrite_filter`: (word, bit mask). A
    /// multiplicative hash: one multiply and a shift in the datapath.
    #[inline(always)]
    #[must_use]
    pub fn rewrite_filter_slot(pa: [u8; 4]) -> (usize, u32) {
        let h = u32::from_be_bytes(pa).wrapping_mul(0x9e37_79b1) >> 22;
        ((h >> 5) as usize, 1 << (h & 31))
    }

    /// The filter's key of an IPv6 rewrite PA: its words folded into one (the filter is
    /// shared with IPv4's; a collision only costs a lookup).
    #[inline(always)]
    #[must_use]
    pub fn filter_key6(pa: &Addr) -> [u8; 4] {
        let mut k = [0u8; 4];
        let mut i = 0;
        while i < 16 {
            k[i % 4] ^= pa[i];
            i += 1;
        }
        k
    }

    pub fn add_rewrite_pa(&mut self, pa: [u8; 4]) {
        let (word, bit) = Self::rewrite_filter_slot(pa);
        if let Some(w) = self.rewrite_filter.get_mut(word) {
            *w |= bit;
        }
    }

    /// The TOS byte for the underlay, given the tenant's: its DSCP per policy, ECN never
    /// (congestion marks are the underlay's own).
    #[inline(always)]
    #[must_use]
    pub const fn underlay_tos(&self, tenant_tos: u8) -> u8 {
        if self.underlay_dscp == Self::DSCP_COPY {
            tenant_tos & 0xfc
        } else {
            ((self.underlay_dscp & 0x3f) as u8) << 2
        }
    }

    /// False means `pa` is certainly not a local VM's rewrite PA.
    #[inline(always)]
    #[must_use]
    pub fn may_be_rewrite_pa(&self, pa: [u8; 4]) -> bool {
        let (word, bit) = Self::rewrite_filter_slot(pa);
        self.rewrite_filter.get(word).is_some_and(|w| w & bit != 0)
    }
}

/// XDP metadata in front of a decapsulated frame, read by the uplink TC program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliverMeta {
    /// [`DeliverMeta::MAGIC`], so frames the XDP program did not touch are never redirected.
    pub magic: u32,
    /// The VM port to deliver to.
    pub ifindex: u32,
    /// The VM the frame is for: delivery checks the port is still its.
    pub vsid: u32,
    pub ca: [u8; 4],
}

impl DeliverMeta {
    pub const MAGIC: u32 = 0x6e76_6d31; // "nvm1"
    /// Only the magic counts: XDP classified the frame as one TC must handle whole (an IPv6
    /// rewrite packet to restore, a neighbour solicitation for an owned PA to answer), whose
    /// description would not fit XDP's 32 bytes of metadata; TC classifies it again.
    pub const CLASSIFY: u32 = 0x6e76_6331; // "nvc1"
}

/// XDP metadata in front of a decapsulated IPv6 frame: the VM is named by its VSID and MAC
/// (its port entry holds its IPv4 address only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliverMeta6 {
    /// [`DeliverMeta6::MAGIC`].
    pub magic: u32,
    pub ifindex: u32,
    pub vsid: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl DeliverMeta6 {
    pub const MAGIC: u32 = 0x6e76_6d36; // "nvm6"
}

/// XDP metadata in front of an IP-rewrite packet for a local VM: what the uplink TC program
/// needs to restore the customer's packet (XDP has no checksum helpers that respect the skb's
/// checksum state, TC does).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreMeta {
    /// [`RestoreMeta::MAGIC`].
    pub magic: u32,
    /// The VM port to deliver to.
    pub ifindex: u32,
    /// The VSID of the VM behind it: delivery checks the port is still that VM's.
    pub vsid: u32,
    /// Customer addresses (IPv4) that replace the provider addresses.
    pub src_ca: [u8; 4],
    pub dst_ca: [u8; 4],
    /// Ethernet addresses the VM sees: the sender VM's and its own.
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Where the last redirect of a program run went, recorded only by programs loaded with the
/// [`TRACE_GLOBAL`] switch on (tests and packet traces, never the forwarding copy: with the
/// switch off the verifier removes the recording as dead code).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectTrace {
    pub ifindex: u32,
    /// [`RedirectTrace::EGRESS`], [`RedirectTrace::PEER`] or [`RedirectTrace::NEIGH`].
    pub how: u32,
}

impl RedirectTrace {
    /// `bpf_redirect` to the device's egress (the uplink, a tap, or back out of a VM's port).
    pub const EGRESS: u32 = 1;
    /// `bpf_redirect_peer`: into the namespace behind a veth.
    pub const PEER: u32 = 2;
    /// `bpf_redirect_neigh`: to the uplink, the kernel resolving the next hop.
    pub const NEIGH: u32 = 3;
}

/// The name of the read-only global that turns [`RedirectTrace`] recording on at load time.
pub const TRACE_GLOBAL: &str = "NV_TRACE";

impl RestoreMeta {
    pub const MAGIC: u32 = 0x6e76_7231; // "nvr1"
}

const _: () = {
    assert!(core::mem::size_of::<LookupKey>() == 8);
    assert!(core::mem::size_of::<LookupValue>() == 28);
    assert!(core::mem::size_of::<PortInfo>() == 44);
    #[cfg(not(feature = "layout-probe"))]
    assert!(core::mem::size_of::<LocalPa>() == 8);
    assert!(core::mem::size_of::<DatapathConfig>() == 168);
    assert!(core::mem::size_of::<DeliverMeta>() == 16);
    assert!(core::mem::size_of::<DeliverMeta6>() == 20);
    assert!(core::mem::size_of::<LookupKey6>() == 20);
    assert!(core::mem::size_of::<RestoreMeta>() == 32);
    assert!(core::mem::size_of::<RewritePa>() == 32);
    // The datapath reads the addresses in map values word by word (nv-ebpf `packet::v4_of`):
    // each sits 4-aligned in a 4-aligned value.
    assert!(core::mem::align_of::<LookupValue>() >= 4);
    assert!(core::mem::offset_of!(LookupValue, pa) % 4 == 0);
    assert!(core::mem::align_of::<PortInfo>() >= 4);
    assert!(core::mem::offset_of!(PortInfo, ca) % 4 == 0);
    assert!(core::mem::offset_of!(PortInfo, pa) % 4 == 0);
    assert!(core::mem::align_of::<RewritePa>() >= 4);
    assert!(core::mem::offset_of!(RewritePa, ca) % 4 == 0);
    assert!(core::mem::size_of::<NextHop>() == 32);
    assert!(core::mem::size_of::<NextHop6>() == 48);
    assert!(core::mem::size_of::<UnderlayHop>() == 8);
    assert!(core::mem::size_of::<IcmpBucket>() == 16);
    assert!(core::mem::size_of::<RedirectTrace>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have no
    // implicit padding (sizes asserted above), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::LookupKey {}
    unsafe impl aya::Pod for super::LookupKey6 {}
    unsafe impl aya::Pod for super::LookupValue {}
    unsafe impl aya::Pod for super::PortInfo {}
    unsafe impl aya::Pod for super::LocalPa {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::RewritePa {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::NextHop6 {}
    // SAFETY: plain `repr(C)` data, its padding explicit (6 + 2 bytes).
    unsafe impl aya::Pod for super::UnderlayHop {}
    unsafe impl aya::Pod for super::IcmpBucket {}
    unsafe impl aya::Pod for super::RedirectTrace {}
}

#[cfg(test)]
mod tests {
    use super::DatapathConfig;

    #[test]
    fn the_rewrite_filter_knows_every_pa_added_and_few_others() {
        let mut c = DatapathConfig::default();
        let pas: [[u8; 4]; 100] = core::array::from_fn(|i| [198, 18, 2, i as u8]);
        for pa in pas {
            c.add_rewrite_pa(pa);
        }
        assert!(pas.iter().all(|pa| c.may_be_rewrite_pa(*pa)));
        // Host addresses elsewhere in the underlay: a 1024-bit filter with 100 PAs lets about
        // one in ten through to the map.
        let through = (0..=255u8)
            .filter(|i| c.may_be_rewrite_pa([198, 18, 0, *i]))
            .count();
        assert!(
            through < 64,
            "{through} of 256 host addresses hit the filter"
        );
        assert!(!DatapathConfig::default().may_be_rewrite_pa([198, 18, 2, 1]));
    }
}
