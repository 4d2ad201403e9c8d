//! Loading the programs onto the maps pinned under the pin path: bpffs, pins, map layouts
//! and their migration, and purging.
use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapType, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use nv_common::{
    Counter, DatapathConfig, IcmpBucket, LocalPa, LookupKey, LookupValue, NextHop, PortInfo,
    RewritePa, TRACE_GLOBAL, V4, VsidTraffic, map_names, program_names,
};
use tracing::info;

use super::{Datapath, DatapathLog, Programs, dp_err, program, skb_btf};
use crate::error::{NvError, Result};

/// This kernel's `struct sk_buff` offsets for the checksum-offload check, read once.
fn skb_offsets() -> skb_btf::SkbOffsets {
    static OFFSETS: std::sync::OnceLock<skb_btf::SkbOffsets> = std::sync::OnceLock::new();
    *OFFSETS.get_or_init(|| {
        skb_btf::skb_offsets(Path::new(skb_btf::VMLINUX)).unwrap_or_else(|e| {
            tracing::error!(
                "the kernel's BTF does not say where the checksum offload state of a packet is \
                 ({e}): VMs' packets to be sent by IP rewrite are all dropped \
                 (drop_vm_csum_offload); NVGRE is not affected"
            );
            skb_btf::SkbOffsets::default()
        })
    })
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf when `pin_path` is not on a bpffs yet.
pub fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let mut probe = pin_path.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(root) {
        return Err(NvError::datapath(format!(
            "pin path {} is not on a bpffs; mount one there or use a path under /sys/fs/bpf",
            pin_path.display()
        )));
    }
    if is_bpffs(root) {
        return Ok(());
    }
    info!("mounting bpffs at /sys/fs/bpf");
    let c = |s: &str| CString::new(s).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c("bpf").as_ptr(),
            c("/sys/fs/bpf").as_ptr(),
            c("bpf").as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(dp_err(
            "mount bpffs at /sys/fs/bpf",
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

/// Removes every pin under `pin_path` (links first, so programs detach), then the directory.
pub fn purge(pin_path: &Path) -> Result<()> {
    for sub in ["links", "maps", "migrating", "trace"] {
        let dir = pin_path.join(sub);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(dp_err(format!("remove {}", dir.display()), e)),
        }
    }
    match fs::remove_dir(pin_path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(dp_err(format!("remove {}", pin_path.display()), e)),
    }
}

/// Each pinned map's layout in this build: name, type, key and value sizes, and the entry count
/// where it is fixed.
#[expect(
    clippy::too_many_lines,
    reason = "one entry per map, formatted one field a line"
)]
fn layouts(max_lookups: u32) -> [(&'static str, MapType, usize, usize, Option<u32>); 29] {
    use std::mem::size_of;

    use aya::maps::MapType::{
        Array as A, Hash as H, PerCpuArray as P, PerCpuHash as PH, RingBuf as R,
    };
    use nv_common::{
        acl,
        monitor::{MAX_VSID_STATS, MONITOR_RING_BYTES},
    };
    // Name, type, key and value sizes, and the entry count where it is fixed.
    use nv_common::routing::{
        GatewayKey, GatewayKey6, MAX_GATEWAYS, MAX_ROUTED_VSIDS, MAX_ROUTES, RouteHop, RouteHop6,
        RouteKey, RouteKey6, VsidRouting,
    };
    [
        (
            map_names::LOOKUPS,
            H,
            size_of::<LookupKey>(),
            size_of::<LookupValue>(),
            Some(max_lookups),
        ),
        (map_names::PORTS, H, 4, size_of::<PortInfo>(), None),
        (
            map_names::LOCAL_PAS,
            H,
            size_of::<V4>(),
            size_of::<LocalPa>(),
            None,
        ),
        (
            map_names::CONFIG,
            A,
            4,
            size_of::<DatapathConfig>(),
            Some(1),
        ),
        (map_names::COUNTERS, P, 4, 8, Some(Counter::SLOTS)),
        (
            map_names::REWRITE_PAS,
            H,
            size_of::<V4>(),
            size_of::<RewritePa>(),
            None,
        ),
        (
            map_names::NEXTHOPS,
            P,
            4,
            size_of::<NextHop>(),
            Some(NextHop::SLOTS),
        ),
        (
            map_names::NEXTHOPS6,
            P,
            4,
            size_of::<nv_common::NextHop6>(),
            Some(nv_common::NextHop6::SLOTS),
        ),
        (
            map_names::UNDERLAY_HOPS,
            H,
            4,
            size_of::<nv_common::UnderlayHop>(),
            Some(nv_common::MAX_UNDERLAY_HOPS),
        ),
        (map_names::UNDERLAY_ALIVE, MapType::Array, 4, 8, Some(1)),
        (map_names::LOCAL_PAS6, H, 16, size_of::<LocalPa>(), None),
        (map_names::REWRITE_PAS6, H, 16, size_of::<RewritePa>(), None),
        (map_names::HOSTED_VSIDS, H, 4, 4, None),
        (
            map_names::ICMP_BUCKET,
            aya::maps::MapType::LruPerCpuHash,
            4,
            size_of::<IcmpBucket>(),
            Some(nv_common::MAX_PORTS),
        ),
        (
            map_names::VSID_STATS,
            PH,
            4,
            size_of::<VsidTraffic>(),
            Some(MAX_VSID_STATS),
        ),
        (map_names::MONITOR, R, 0, 0, Some(MONITOR_RING_BYTES)),
        (map_names::MONITOR_SAMPLE, P, 4, 4, Some(1)),
        (
            map_names::VSID_ROUTING,
            H,
            4,
            size_of::<VsidRouting>(),
            Some(MAX_ROUTED_VSIDS),
        ),
        (
            map_names::ROUTES,
            MapType::LpmTrie,
            4 + size_of::<RouteKey>(),
            size_of::<RouteHop>(),
            Some(MAX_ROUTES),
        ),
        (
            map_names::GATEWAYS,
            H,
            size_of::<GatewayKey>(),
            4,
            Some(MAX_GATEWAYS),
        ),
        (map_names::ROUTED_STATS, PH, 4, 8, Some(MAX_ROUTED_VSIDS)),
        (
            map_names::SLOW_PATH,
            R,
            0,
            0,
            Some(nv_common::slow_path::SLOW_RING_BYTES),
        ),
        (
            map_names::SLOW_BUCKET,
            aya::maps::MapType::LruPerCpuHash,
            4,
            size_of::<IcmpBucket>(),
            Some(nv_common::MAX_PORTS),
        ),
        (
            map_names::LOOKUPS6,
            H,
            size_of::<nv_common::LookupKey6>(),
            size_of::<LookupValue>(),
            Some(nv_common::MAX_LOOKUPS6),
        ),
        (
            map_names::ROUTES6,
            MapType::LpmTrie,
            4 + size_of::<RouteKey6>(),
            size_of::<RouteHop6>(),
            Some(MAX_ROUTES),
        ),
        (
            map_names::GATEWAYS6,
            H,
            size_of::<GatewayKey6>(),
            4,
            Some(MAX_GATEWAYS),
        ),
        (
            map_names::ACL_SETS,
            H,
            size_of::<acl::AclSetKey>(),
            size_of::<acl::AclSet>(),
            Some(acl::MAX_ACL_SETS),
        ),
        (
            map_names::ACL_METERS,
            PH,
            size_of::<acl::AclMeterKey>(),
            size_of::<acl::AclMeter>(),
            Some(acl::MAX_ACL_METERS),
        ),
        (
            map_names::ACL_FLOWS,
            H,
            size_of::<acl::AclFlowKey>(),
            size_of::<acl::AclFlowSet>(),
            Some(acl::MAX_FLOW_SETS),
        ),
    ]
}

/// The maps pinned by an nv whose layout (type, key and value sizes, entries) differs from
/// this build's, or the lookup map at another `max_lookups`: reusing them would fail in the
/// verifier, or worse, be read with the wrong layout. They are migrated instead
/// ([`Datapath::load`]).
fn stale_layouts(maps_dir: &Path, max_lookups: u32) -> Result<Vec<(&'static str, String)>> {
    let expected = layouts(max_lookups);
    let mut stale = Vec::new();
    for (name, kind, key, value, entries) in expected {
        let pin = maps_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info = MapData::from_pin(&pin)
            .and_then(|m| m.info())
            .map_err(|e| dp_err(format!("read pinned map {}", pin.display()), e))?;
        let found = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let same = found.0 == Some(kind)
            && usize::try_from(found.1).is_ok_and(|k| k == key)
            && usize::try_from(found.2).is_ok_and(|v| v == value)
            && entries.is_none_or(|e| e == found.3);
        if !same {
            let (t, k, v, n) = found;
            stale.push((
                name,
                format!(
                    "pinned as {t:?}, key {k} bytes, value {v} bytes, {n} entries; this build \
                     uses {kind:?}, key {key}, value {value}{}",
                    entries
                        .map(|e| format!(", {e} entries"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    Ok(stale)
}

/// Copies per-CPU counter values from the old counter map pinned at `old` into this build's:
/// discriminants are stable, so slot N is the same counter in both.
fn carry_counters(ebpf: &mut Ebpf, old: &Path) -> Result<()> {
    let old = MapData::from_pin(old).map_err(|e| dp_err("open the old counter map", e))?;
    let Ok(old) = PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(old)) else {
        info!("the old counter map holds no 8-byte counters; counters start from zero");
        return Ok(());
    };
    let new = ebpf
        .map_mut(map_names::COUNTERS)
        .ok_or_else(|| NvError::datapath("counter map missing"))?;
    let mut new: PerCpuArray<_, u64> =
        PerCpuArray::try_from(new).map_err(|e| dp_err("counter map", e))?;
    for slot in 0..old.len().min(new.len()) {
        let values = old
            .get(&slot, 0)
            .map_err(|e| dp_err("read an old counter", e))?;
        new.set(slot, values, 0)
            .map_err(|e| dp_err("carry a counter over", e))?;
    }
    Ok(())
}

/// Puts the pins of `names` back from `aside` (a migration that could not load).
fn restore_pins(aside: &Path, maps_dir: &Path, names: &[&str]) {
    for name in names {
        let _ = fs::rename(aside.join(name), maps_dir.join(name));
    }
}

/// Loads (verifies) the forwarding programs of `ebpf`: the TC ones and the uplink's XDP one.
/// The router's MAC every copy of the programs this process loads is built with.
static ROUTER_MAC: std::sync::OnceLock<[u8; 6]> = std::sync::OnceLock::new();

/// Sets the router's MAC (the agent's `router_mac`) before the first load; later calls
/// change nothing.
pub fn set_router_mac(mac: [u8; 6]) {
    let _ = ROUTER_MAC.set(mac);
}

pub fn router_mac() -> &'static [u8; 6] {
    ROUTER_MAC.get_or_init(|| nv_common::routing::DEFAULT_ROUTER_MAC)
}

fn load_programs_of(ebpf: &mut Ebpf) -> Result<()> {
    for name in [
        program_names::FROM_VM,
        program_names::UPLINK_TC,
        program_names::UPLINK_EGRESS,
        program_names::FROM_BOUNCE,
    ] {
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        prog.load().map_err(|e| dp_err(format!("load {name}"), e))?;
    }
    let xdp: &mut Xdp = program(ebpf, program_names::UPLINK_XDP)?;
    xdp.load()
        .map_err(|e| dp_err(format!("load {}", program_names::UPLINK_XDP), e))
}

impl Datapath {
    /// Loads the programs, reusing the maps pinned under `pin_path` when they exist.
    pub fn load(pin_path: &Path, max_lookups: u32) -> Result<Datapath> {
        Self::load_programs(pin_path, max_lookups, Programs::Forwarding)
    }

    /// As [`Datapath::load`], choosing the copy of the programs.
    ///
    /// Maps pinned with another layout (an older or newer nv, another `max_lookups`) are
    /// migrated without stopping forwarding: their pins are moved aside (the attached programs
    /// keep using those maps), this build's maps are created and pinned in their place, the
    /// counters are carried over, and the agent fills the rest from its store before it swaps
    /// the programs (`bpf_link_update`) and drops the old maps ([`Datapath::finish_migration`]).
    pub fn load_programs(
        pin_path: &Path,
        max_lookups: u32,
        programs: Programs,
    ) -> Result<Datapath> {
        Self::load_object(pin_path, max_lookups, programs, crate::EBPF_OBJECT)
    }

    /// As [`Datapath::load_programs`], from another build's eBPF object (the benchmark's
    /// parent tree, on this tree's maps where their layouts agree).
    pub fn load_object(
        pin_path: &Path,
        max_lookups: u32,
        programs: Programs,
        object: &[u8],
    ) -> Result<Datapath> {
        ensure_bpffs(pin_path)?;
        let maps_dir = pin_path.join("maps");
        let links_dir = pin_path.join("links");
        let aside = pin_path.join("migrating");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(|e| dp_err(format!("create {}", dir.display()), e))?;
        }
        let stale = stale_layouts(&maps_dir, max_lookups)?;
        let migrating: Vec<&'static str> = stale.iter().map(|(n, _)| *n).collect();
        if !stale.is_empty() {
            fs::create_dir_all(&aside)
                .map_err(|e| dp_err(format!("create {}", aside.display()), e))?;
        }
        for (name, why) in &stale {
            info!("migrating map {name} ({why}); forwarding continues on the old one meanwhile");
            // Left by a migration that stopped half-way: the programs attached hold that map
            // if they still use it, so its pin can go.
            let _ = fs::remove_file(aside.join(name));
            fs::rename(maps_dir.join(name), aside.join(name))
                .map_err(|e| dp_err(format!("move the pin of {name} aside"), e))?;
        }
        // Maps this load creates (first start, or migrated): filling them is no repair.
        let fresh: Vec<&'static str> = map_names::ALL
            .into_iter()
            .filter(|n| !maps_dir.join(n).exists())
            .collect();
        let trace = u32::from(programs == Programs::Tracing);
        let vsid_counts = u32::from(programs != Programs::WithoutVsidCounts);
        let monitor = u32::from(programs != Programs::WithoutMonitor);
        let skb = skb_offsets();
        let loaded = EbpfLoader::new()
            .override_global(TRACE_GLOBAL, &trace, true)
            .override_global("NV_COUNT_VSIDS", &vsid_counts, true)
            .override_global("NV_MONITORING", &monitor, true)
            .override_global("NV_ROUTER_MAC", router_mac(), true)
            .override_global("NV_SKB_HEAD", &skb.head, true)
            .override_global("NV_SKB_CSUM", &skb.csum, true)
            .override_global("NV_SKB_IP_SUMMED", &skb.ip_summed, true)
            .override_global("NV_SKB_IP_SUMMED_SHIFT", &skb.ip_summed_shift, true)
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(map_names::LOOKUPS, max_lookups)
            .load(object)
            .map_err(|e| dp_err("load eBPF object", e));
        let mut ebpf = match loaded {
            Ok(ebpf) => ebpf,
            Err(e) => {
                restore_pins(&aside, &maps_dir, &migrating);
                return Err(e);
            }
        };
        if migrating.contains(&map_names::COUNTERS) {
            carry_counters(&mut ebpf, &aside.join(map_names::COUNTERS))?;
        }
        load_programs_of(&mut ebpf)?;
        let trace = match programs {
            Programs::Tracing => {
                let map = ebpf.take_map(map_names::TRACE_REDIRECT).ok_or_else(|| {
                    NvError::datapath(format!("{} missing", map_names::TRACE_REDIRECT))
                })?;
                let map = Array::try_from(map).map_err(|e| dp_err("trace map", e))?;
                Some(std::sync::Mutex::new(map))
            }
            _ => None,
        };
        let log = match programs {
            Programs::Forwarding => Some(
                aya_log::EbpfLogger::init_with_logger(&mut ebpf, DatapathLog)
                    .map_err(|e| dp_err("the datapath's debug events", e))?,
            ),
            _ => None,
        };
        Ok(Datapath {
            ebpf,
            links_dir,
            programs,
            aside,
            migrating,
            fresh,
            trace,
            log,
        })
    }

    /// A tracing copy of the programs on the live maps of the agent at `pin_path`, for
    /// `nvctl trace`: it reads the maps that say where packets go (records, ports, config) and
    /// writes maps of its own (counters, next-hop cache, ICMP budget, per-VSID traffic, the
    /// monitor's, ACL flows and meters), so a trace changes nothing that forwards or is
    /// reported. Never attached.
    pub fn load_tracer(pin_path: &Path, max_lookups: u32) -> Result<Datapath> {
        const OWN: [&str; 12] = [
            map_names::COUNTERS,
            map_names::NEXTHOPS,
            map_names::NEXTHOPS6,
            map_names::ICMP_BUCKET,
            map_names::VSID_STATS,
            map_names::MONITOR,
            map_names::MONITOR_SAMPLE,
            map_names::ROUTED_STATS,
            map_names::SLOW_PATH,
            map_names::SLOW_BUCKET,
            // A traced stateful allow tracks nothing live, and a traced packet is metered
            // nowhere.
            map_names::ACL_FLOWS,
            map_names::ACL_METERS,
        ];
        let maps_dir = pin_path.join("maps");
        let own = pin_path.join("trace");
        let _ = fs::remove_dir_all(&own);
        fs::create_dir_all(&own).map_err(|e| dp_err(format!("create {}", own.display()), e))?;
        let (on, off) = (1u32, 0u32);
        let own_pins: Vec<PathBuf> = OWN.iter().map(|n| own.join(n)).collect();
        // The skb's layout as the forwarding copy has it: without it, rewrite's checksum
        // offload check fails closed, and every traced rewrite would read as a drop.
        let skb = skb_offsets();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(TRACE_GLOBAL, &on, true)
            .override_global("NV_COUNT_VSIDS", &on, true)
            .override_global("NV_MONITORING", &off, true)
            .override_global("NV_ROUTER_MAC", router_mac(), true)
            .override_global("NV_SKB_HEAD", &skb.head, true)
            .override_global("NV_SKB_CSUM", &skb.csum, true)
            .override_global("NV_SKB_IP_SUMMED", &skb.ip_summed, true)
            .override_global("NV_SKB_IP_SUMMED_SHIFT", &skb.ip_summed_shift, true)
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(map_names::LOOKUPS, max_lookups);
        for (name, pin) in OWN.iter().zip(&own_pins) {
            loader.map_pin_path(name, pin.as_path());
        }
        let result = loader.load(crate::EBPF_OBJECT);
        // Its own maps live as long as it does; their pins are not needed.
        let _ = fs::remove_dir_all(&own);
        let mut ebpf = result.map_err(|e| dp_err("load the tracing copy", e))?;
        load_programs_of(&mut ebpf)?;
        let map = ebpf
            .take_map(map_names::TRACE_REDIRECT)
            .ok_or_else(|| NvError::datapath(format!("{} missing", map_names::TRACE_REDIRECT)))?;
        let map = Array::try_from(map).map_err(|e| dp_err("trace map", e))?;
        Ok(Datapath {
            ebpf,
            links_dir: pin_path.join("links"),
            programs: Programs::Tracing,
            aside: pin_path.join("migrating"),
            migrating: Vec::new(),
            fresh: Vec::new(),
            trace: Some(std::sync::Mutex::new(map)),
            log: None,
        })
    }

    /// Drops the maps a migration replaced, once every program is swapped for this build's
    /// (the caller has synced and attached everything).
    pub fn finish_migration(&mut self) -> Result<()> {
        for name in std::mem::take(&mut self.migrating) {
            match fs::remove_file(self.aside.join(name)) {
                Ok(()) => info!("map {name} migrated; the old one is released"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(dp_err(format!("remove the old pin of {name}"), e)),
            }
        }
        let _ = fs::remove_dir(&self.aside);
        Ok(())
    }

    /// The maps this load created: none was pinned, or one of another layout was.
    pub fn fresh_maps(&self) -> &[&'static str] {
        &self.fresh
    }
}
