//! The only module that touches aya: loads the eBPF object, pins maps and program links under
//! the pin path, attaches programs, and keeps the maps equal to what the store says.
//!
//! Pins make forwarding independent of the agent process: maps are reused by name on load,
//! links are replaced atomically (`bpf_link_update`) rather than detached and re-attached.
use std::{
    collections::HashMap,
    ffi::CString,
    fmt::Write as _,
    fs,
    hash::Hash,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, MapType, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use nv_common::{
    Counter, DatapathConfig, IcmpBucket, LocalPa, LookupKey, LookupValue, NextHop, PortInfo,
    RedirectTrace, RewritePa, TRACE_GLOBAL, V4, VsidStats, VsidStatsKey, VsidTraffic, map_names,
    program_names,
};
use tracing::{debug, info};

use crate::{
    config::DecapHook,
    error::{NvError, Result},
    txn::{Maps, Stopped, Write},
};

pub mod batch;
pub mod skb_btf;

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

/// Verifier logs run to thousands of lines; the reason is at the end.
const MAX_ERROR_CHARS: usize = 2000;

fn dp_err(what: impl std::fmt::Display, e: impl std::error::Error) -> NvError {
    let mut msg = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    if msg.len() > MAX_ERROR_CHARS {
        let cut = msg.len() - MAX_ERROR_CHARS;
        let cut = (cut..msg.len())
            .find(|i| msg.is_char_boundary(*i))
            .unwrap_or(cut);
        msg = format!("{what}: ...{}", &msg[cut..]);
    }
    NvError::Datapath(msg)
}

/// Everything the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub config: DatapathConfig,
    pub lookups: HashMap<LookupKey, LookupValue>,
    pub ports: HashMap<u32, PortInfo>,
    pub local_pas: HashMap<V4, LocalPa>,
    pub rewrite_pas: HashMap<V4, RewritePa>,
    /// VSIDs with a VM on this host, and how many ports each has.
    pub hosted_vsids: HashMap<u32, u32>,
}

/// Which copy of the programs to load. Both share the pinned maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    /// What forwards: nothing recorded, nothing paid for it.
    Forwarding,
    /// For tests and packet traces: every redirect records its target
    /// ([`TestRunOutcome::redirect`]). Never attached.
    Tracing,
    /// The benchmark's baselines, never attached: the forwarding copy without per-VSID
    /// counting, and without the monitor's checks, so what each costs is measured in one run.
    WithoutVsidCounts,
    WithoutMonitor,
}

pub struct Datapath {
    ebpf: Ebpf,
    links_dir: PathBuf,
    programs: Programs,
    /// Where the pins of migrated maps wait until the programs are swapped.
    aside: PathBuf,
    migrating: Vec<&'static str>,
    fresh: Vec<&'static str>,
    /// The tracing copy's redirect record, taken out of `ebpf` so it can be written through
    /// `&self` (the loaded programs keep the map alive).
    trace: Option<std::sync::Mutex<Array<MapData, RedirectTrace>>>,
    /// The forwarding copy's debug events (aya-log), until the agent takes them to read.
    log: Option<aya_log::EbpfLogger<DatapathLog>>,
}

/// Where the datapath's debug events (aya-log) go: the agent's log, at info level under the
/// target `nv_datapath`, since they only come once an operator turned them on.
pub struct DatapathLog;

impl log::Log for DatapathLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        tracing::info!(target: "nv_datapath", "{}", record.args());
    }

    fn flush(&self) {}
}

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
        return Err(NvError::Datapath(format!(
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

/// The maps pinned by an nv whose layout (type, key and value sizes, entries) differs from
/// this build's, or the lookup map at another `max_lookups`: reusing them would fail in the
/// verifier, or worse, be read with the wrong layout. They are migrated instead
/// ([`Datapath::load`]).
fn stale_layouts(maps_dir: &Path, max_lookups: u32) -> Result<Vec<(&'static str, String)>> {
    use std::mem::size_of;

    use aya::maps::MapType::{
        Array as A, Hash as H, PerCpuArray as P, PerCpuHash as PH, RingBuf as R,
    };
    use nv_common::monitor::{MAX_VSID_STATS, MONITOR_RING_BYTES};
    // Name, type, key and value sizes, and the entry count where it is fixed.
    let expected: [(&str, MapType, usize, usize, Option<u32>); 12] = [
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
    ];
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
        })
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
        .ok_or_else(|| NvError::Datapath("counter map missing".into()))?;
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
fn load_programs_of(ebpf: &mut Ebpf) -> Result<()> {
    for name in [
        program_names::FROM_VM,
        program_names::UPLINK_TC,
        program_names::FROM_BOUNCE,
    ] {
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        prog.load().map_err(|e| dp_err(format!("load {name}"), e))?;
    }
    let xdp: &mut Xdp = program(ebpf, program_names::UPLINK_XDP)?;
    xdp.load()
        .map_err(|e| dp_err(format!("load {}", program_names::UPLINK_XDP), e))
}

fn port_link_name(ifname: &str) -> String {
    format!("port-{ifname}")
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
            .override_global("NV_SKB_HEAD", &skb.head, true)
            .override_global("NV_SKB_CSUM", &skb.csum, true)
            .override_global("NV_SKB_IP_SUMMED", &skb.ip_summed, true)
            .override_global("NV_SKB_IP_SUMMED_SHIFT", &skb.ip_summed_shift, true)
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(map_names::LOOKUPS, max_lookups)
            .load(crate::EBPF_OBJECT)
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
                    NvError::Datapath(format!("{} missing", map_names::TRACE_REDIRECT))
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
    /// monitor's), so a trace changes nothing that forwards or is reported. Never attached.
    pub fn load_tracer(pin_path: &Path, max_lookups: u32) -> Result<Datapath> {
        const OWN: [&str; 6] = [
            map_names::COUNTERS,
            map_names::NEXTHOPS,
            map_names::ICMP_BUCKET,
            map_names::VSID_STATS,
            map_names::MONITOR,
            map_names::MONITOR_SAMPLE,
        ];
        let maps_dir = pin_path.join("maps");
        let own = pin_path.join("trace");
        let _ = fs::remove_dir_all(&own);
        fs::create_dir_all(&own).map_err(|e| dp_err(format!("create {}", own.display()), e))?;
        let (on, off) = (1u32, 0u32);
        let own_pins: Vec<PathBuf> = OWN.iter().map(|n| own.join(n)).collect();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(TRACE_GLOBAL, &on, true)
            .override_global("NV_COUNT_VSIDS", &on, true)
            .override_global("NV_MONITORING", &off, true)
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
            .ok_or_else(|| NvError::Datapath(format!("{} missing", map_names::TRACE_REDIRECT)))?;
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

    /// Loads the do-nothing programs, so a benchmark can measure its floor in the same run.
    pub fn load_floors(&mut self) -> Result<()> {
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::NOOP_XDP)?;
        xdp.load().map_err(|e| dp_err("load no-op XDP", e))?;
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_names::NOOP_TC)?;
        tc.load().map_err(|e| dp_err("load no-op TC", e))
    }

    /// Attaches TC ingress, and XDP unless decapsulation runs on TC, to the uplink, replacing
    /// earlier links in place.
    pub fn attach_uplink(&mut self, ifname: &str, hook: DecapHook) -> Result<()> {
        self.attach_tc(program_names::UPLINK_TC, ifname, "uplink-tc")?;
        if hook == DecapHook::Xdp {
            self.attach_uplink_xdp(ifname)?;
        }
        Ok(())
    }

    /// Detaches the uplink's XDP program, if any (after switching to TC decapsulation; call it
    /// once the maps say so, so no frame falls between the two).
    pub fn detach_uplink_xdp(&mut self) -> Result<()> {
        let pin = self.links_dir.join("uplink-xdp");
        match fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(dp_err(format!("remove {}", pin.display()), e)),
        }
    }

    fn attach_uplink_xdp(&mut self, ifname: &str) -> Result<()> {
        let xdp_pin = self.links_dir.join("uplink-xdp");
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::UPLINK_XDP)?;
        let replaced = match PinnedLink::from_pin(&xdp_pin) {
            Ok(old) => XdpLink::try_from(FdLink::from(old))
                .map_err(|e| dp_err("open pinned XDP link", e))
                .and_then(|link| {
                    xdp.attach_to_link(link)
                        .map_err(|e| dp_err("replace XDP program", e))
                }),
            Err(e) => Err(dp_err("no pinned XDP link", e)),
        };
        if let Err(e) = replaced {
            debug!("attaching XDP to {ifname} afresh ({e})");
            let _ = fs::remove_file(&xdp_pin);
            let id = xdp
                .attach(ifname, XdpMode::default())
                .map_err(|e| dp_err(format!("attach XDP to {ifname}"), e))?;
            let link = FdLink::try_from(xdp.take_link(id).map_err(|e| dp_err("take XDP link", e))?)
                .map_err(|e| dp_err("XDP link is not an fd link", e))?;
            link.pin(&xdp_pin)
                .map_err(|e| dp_err(format!("pin {}", xdp_pin.display()), e))?;
        }
        Ok(())
    }

    /// Attaches the from-VM program to a VM port's ingress.
    /// Attaches the program that takes back a VM tunnel's segmented super-packets.
    pub fn attach_bounce(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(program_names::FROM_BOUNCE, ifname, "bounce")
    }

    pub fn attach_port(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(program_names::FROM_VM, ifname, &port_link_name(ifname))
    }

    /// Detaches the from-VM program from a port by removing its link's pin.
    pub fn detach_port(&mut self, ifname: &str) -> Result<()> {
        let pin = self.links_dir.join(port_link_name(ifname));
        match fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(dp_err(format!("remove {}", pin.display()), e)),
        }
    }

    /// Ports that have a pinned link (from this run or an earlier one).
    pub fn attached_ports(&self) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.links_dir)
            .map_err(|e| dp_err(format!("read {}", self.links_dir.display()), e))?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("port-").map(str::to_owned))
            })
            .collect())
    }

    fn attach_tc(&mut self, prog_name: &str, ifname: &str, link_name: &str) -> Result<()> {
        let pin = self.links_dir.join(link_name);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, prog_name)?;
        let replaced = match PinnedLink::from_pin(&pin) {
            Ok(old) => SchedClassifierLink::try_from(FdLink::from(old))
                .map_err(|e| dp_err("open pinned TC link", e))
                .and_then(|link| {
                    prog.attach_to_link(link)
                        .map_err(|e| dp_err("replace TC program", e))
                }),
            Err(e) => Err(dp_err("no pinned TC link", e)),
        };
        if let Err(e) = replaced {
            debug!("attaching {prog_name} to {ifname} afresh ({e})");
            let _ = fs::remove_file(&pin);
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| dp_err(format!("attach {prog_name} to {ifname}"), e))?;
            let link = FdLink::try_from(prog.take_link(id).map_err(|e| dp_err("take TC link", e))?)
                .map_err(|e| dp_err("TC link is not an fd link", e))?;
            link.pin(&pin)
                .map_err(|e| dp_err(format!("pin {}", pin.display()), e))?;
        }
        Ok(())
    }

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
                map_names::PORTS,
                sync_hash(ebpf, map_names::PORTS, &desired.ports)?,
            ),
            (
                map_names::LOOKUPS,
                sync_hash(ebpf, map_names::LOOKUPS, &desired.lookups)?,
            ),
            (
                map_names::REWRITE_PAS,
                sync_hash(ebpf, map_names::REWRITE_PAS, &desired.rewrite_pas)?,
            ),
            (
                map_names::HOSTED_VSIDS,
                sync_hash(ebpf, map_names::HOSTED_VSIDS, &desired.hosted_vsids)?,
            ),
        ] {
            if repair != Repair::default() {
                repairs.push((name, repair));
            }
        }
        Ok(repairs)
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
            Write::Rewrite(pa, v) => set_entry(ebpf, map_names::REWRITE_PAS, pa, v.as_ref()),
            Write::Lookup(k, v) => set_entry(ebpf, map_names::LOOKUPS, k, v.as_ref()),
            Write::LocalPa(pa, v) => set_entry(ebpf, map_names::LOCAL_PAS, pa, v.as_ref()),
            Write::Config(c) => self.set_config(**c),
        }
    }

    /// Puts lookup entries with `BPF_MAP_UPDATE_BATCH`, a chunk per system call; on failure,
    /// how many went in before it.
    fn put_lookups(&mut self, entries: &[Write]) -> std::result::Result<(), (usize, NvError)> {
        let fd = {
            let map = self.ebpf.map(map_names::LOOKUPS).ok_or_else(|| {
                (
                    0,
                    NvError::Datapath(format!("map {} missing", map_names::LOOKUPS)),
                )
            })?;
            let aya::maps::Map::HashMap(data) = map else {
                return Err((0, NvError::Datapath("lookup map is not a hash".into())));
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
            .ok_or_else(|| NvError::Datapath("counter map missing".into()))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(m).map_err(|e| dp_err("counter map", e))?;
        read_counters(&arr)
    }

    /// The datapath's debug events, for the task that logs them.
    pub fn take_log(&mut self) -> Option<aya_log::EbpfLogger<DatapathLog>> {
        self.log.take()
    }

    /// The monitor's ring buffer, for the one reader that hands its events out.
    pub fn take_monitor(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_names::MONITOR)
            .ok_or_else(|| NvError::Datapath("the monitor's ring buffer is missing".into()))?;
        aya::maps::RingBuf::try_from(map).map_err(|e| dp_err("the monitor's ring buffer", e))
    }

    /// Traffic per VSID, direction and method, summed over all CPUs.
    pub fn vsid_stats(&self) -> Result<Vec<(VsidStatsKey, VsidStats)>> {
        let m = self
            .ebpf
            .map(map_names::VSID_STATS)
            .ok_or_else(|| NvError::Datapath("per-VSID map missing".into()))?;
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

    /// Runs a program once or `repeat` times on `data` with `BPF_PROG_TEST_RUN`, for program
    /// tests and benchmarks. For TC programs `ifindex` becomes the skb's device (it must exist
    /// in the calling thread's network namespace). XDP output starts with the metadata.
    pub fn test_run(
        &self,
        prog: &str,
        data: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        self.test_run_marked(prog, data, ifindex, 0, repeat)
    }

    /// As [`Datapath::test_run`], with the skb's mark (TC programs).
    pub fn test_run_marked(
        &self,
        prog: &str,
        data: &[u8],
        ifindex: Option<u32>,
        mark: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        let program = self
            .ebpf
            .program(prog)
            .ok_or_else(|| NvError::Datapath(format!("program {prog} missing from the object")))?;
        let mut out = vec![0u8; data.len() + 256];
        if self.programs == Programs::Tracing {
            self.set_redirect_trace(RedirectTrace::default())?;
        }
        let mut ctx = [0u8; SK_BUFF_SIZE];
        ctx[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4]
            .copy_from_slice(&ifindex.unwrap_or(0).to_ne_bytes());
        ctx[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let result = match program {
            aya::programs::Program::Xdp(p) => p.test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            }),
            aya::programs::Program::SchedClassifier(p) => p.test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                ctx_in: ifindex.map(|_| &ctx[..]),
                repeat,
                ..TestRunOptions::default()
            }),
            _ => return Err(NvError::Datapath(format!("{prog} cannot be test-run"))),
        }
        .map_err(|e| dp_err(format!("test run {prog}"), e))?;
        out.truncate(result.data_size_out as usize);
        let redirect = match self.programs {
            Programs::Tracing => Some(self.redirect_trace()?).filter(|r| r.how != 0),
            _ => None,
        };
        Ok(TestRunOutcome {
            ret: result.return_value,
            data: out,
            duration: result.duration,
            redirect,
        })
    }

    fn set_redirect_trace(&self, value: RedirectTrace) -> Result<()> {
        let Some(trace) = &self.trace else {
            return Err(NvError::Datapath("not a tracing copy".into()));
        };
        let mut map = trace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.set(0, value, 0)
            .map_err(|e| dp_err("reset trace map", e))
    }

    fn redirect_trace(&self) -> Result<RedirectTrace> {
        let Some(trace) = &self.trace else {
            return Err(NvError::Datapath("not a tracing copy".into()));
        };
        let map = trace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&0, 0).map_err(|e| dp_err("read trace map", e))
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

/// `struct __sk_buff` as `BPF_PROG_TEST_RUN` takes it: 192 bytes, `ifindex` at offset 40
/// (include/uapi/linux/bpf.h); every other field we pass stays zero.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_IFINDEX: usize = 40;
const SK_BUFF_MARK: usize = 8;

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug, Clone)]
pub struct TestRunOutcome {
    pub ret: u32,
    pub data: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
    /// Where the frame was redirected, for programs loaded as [`Programs::Tracing`].
    pub redirect: Option<RedirectTrace>,
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| NvError::Datapath(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e| dp_err(format!("program {name}"), e))
}

fn map<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    ebpf.map_mut(name)
        .ok_or_else(|| NvError::Datapath(format!("map {name} missing from the object")))?
        .try_into()
        .map_err(|e| dp_err(format!("map {name}"), e))
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
fn set_entry<K: Pod, V: Pod>(ebpf: &mut Ebpf, name: &str, k: &K, v: Option<&V>) -> Result<()> {
    match v {
        Some(v) => put_entry(ebpf, name, k, v),
        None => del_entry::<K, V>(ebpf, name, k),
    }
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

/// What a sync wrote into one map and removed from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repair {
    pub written: usize,
    pub removed: usize,
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
