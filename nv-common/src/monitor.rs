//! What the datapath reports beyond its counters: traffic per VSID (Prometheus, `nvctl stats
//! --vsid`) and events on a ring buffer (`nvctl monitor`).
use crate::Addr;

/// A VSID's traffic in one direction by one method: how the agent reports the per-VSID map,
/// whose key is the VSID and whose value ([`VsidTraffic`]) holds every such pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VsidStatsKey {
    pub vsid: u32,
    /// [`VsidStatsKey::TX`] (sent by a VM here) or [`VsidStatsKey::RX`] (delivered to one).
    pub dir: u8,
    /// [`VsidStatsKey::ENCAP`], [`VsidStatsKey::REWRITE`] or [`VsidStatsKey::LOCAL`] (VM to VM
    /// on this host).
    pub method: u8,
    pub _pad: [u8; 2],
}

impl VsidStatsKey {
    pub const TX: u8 = 0;
    pub const RX: u8 = 1;
    pub const ENCAP: u8 = 0;
    pub const REWRITE: u8 = 1;
    pub const LOCAL: u8 = 2;

    #[inline(always)]
    #[must_use]
    pub const fn new(vsid: u32, dir: u8, method: u8) -> VsidStatsKey {
        VsidStatsKey {
            vsid,
            dir,
            method,
            _pad: [0; 2],
        }
    }

    /// Where (`dir`, `method`) sits in [`VsidTraffic::by`].
    #[inline(always)]
    #[must_use]
    pub const fn slot(dir: u8, method: u8) -> usize {
        (dir as usize) * 3 + method as usize
    }
}

/// Value of the per-VSID traffic map (per CPU), keyed by VSID: one lookup counts a packet,
/// and VM-to-VM delivery its sending and its receiving both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsidTraffic {
    /// By [`VsidStatsKey::slot`]: tx then rx, each encap, rewrite, local.
    pub by: [VsidStats; 6],
}

/// Value of the per-VSID traffic map (per CPU): customer frames and their bytes, Ethernet
/// header included, as the VM sent or got them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsidStats {
    pub packets: u64,
    pub bytes: u64,
}

/// One event on the monitor ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// [`MonitorEvent::DROP`] or [`MonitorEvent::FORWARD`] (a sampled forwarded packet).
    pub kind: u8,
    /// The [`crate::Counter`] it was counted under: the drop reason, or how it was forwarded.
    pub counter: u8,
    /// IP protocol (IPv6: next header) of the (inner) packet, 0 when it is not IP.
    pub proto: u8,
    pub _pad: u8,
    /// The VM port it came from (or was delivered to), or the uplink.
    pub ifindex: u32,
    /// The VSID: the port's, or the GRE key's on the uplink; 0 when not known.
    pub vsid: u32,
    /// Bytes of the frame as the program saw it.
    pub len: u32,
    /// (Inner) IP source and destination, IPv4 mapped into IPv6; zero when not IP.
    pub src: Addr,
    pub dst: Addr,
    /// (Inner) Ethernet addresses.
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The ACL rule that denied it (`DropVmAclDenied`, `DropAclInDenied`), 0 otherwise.
    pub rule: u32,
}

impl MonitorEvent {
    pub const DROP: u8 = 1;
    pub const FORWARD: u8 = 2;
}

/// The monitor's ring buffer, in bytes (a power of two, a multiple of the page size).
pub const MONITOR_RING_BYTES: u32 = 1 << 20;
/// Entries of the per-VSID traffic map: VSIDs that had traffic here.
pub const MAX_VSID_STATS: u32 = 65_536;

const _: () = {
    assert!(core::mem::size_of::<VsidStatsKey>() == 8);
    assert!(core::mem::size_of::<VsidStats>() == 16);
    assert!(core::mem::size_of::<VsidTraffic>() == 96);
    assert!(core::mem::size_of::<MonitorEvent>() == 64);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::VsidStatsKey {}
    unsafe impl aya::Pod for super::VsidStats {}
    unsafe impl aya::Pod for super::VsidTraffic {}
    unsafe impl aya::Pod for super::MonitorEvent {}
}
