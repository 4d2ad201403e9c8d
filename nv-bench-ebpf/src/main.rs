//! The benchmark's peer: a minimal Cilium-style tunnel, to measure nv against the design most
//! operators would otherwise choose. As Cilium's `bpf_lxc` and `bpf_overlay` do, with nothing
//! of their policy or connection tracking (a lighter peer than Cilium itself):
//! - `peer_from_vm`, TC ingress on a VM's port: one hash lookup of the destination (Cilium's
//!   ipcache), `bpf_skb_set_tunnel_key` with the remote host and the VNI, and a redirect into
//!   the host's VXLAN device in collect_md mode, where the kernel adds the outer headers;
//! - `peer_from_overlay`, TC ingress on that VXLAN device: the tunnel key read (Cilium takes the
//!   sender's identity from it), one hash lookup of the destination endpoint, its MACs written,
//!   and `bpf_redirect_peer` into the VM's namespace.
//!
//! The bench fills the maps; nothing here is nv's.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_ZERO_CSUM_TX, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::{classifier, map},
    maps::{Array, HashMap},
    programs::TcContext,
};

/// Where a remote address lives: its host's underlay address (host byte order, as
/// `bpf_tunnel_key` takes it) and the VNI.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Remote {
    pub host: u32,
    pub vni: u32,
}

/// A local endpoint: the ifindex of its host-side veth, its MAC and the MAC it sees as the
/// router's.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub router_mac: [u8; 6],
}

/// Keyed by IPv4 address as it sits in the packet.
#[map(name = "PEER_REMOTES")]
static REMOTES: HashMap<u32, Remote> = HashMap::with_max_entries(1 << 20, 0);

#[map(name = "PEER_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::with_max_entries(1 << 16, 0);

/// Index 0: the VXLAN device's ifindex.
#[map(name = "PEER_TUNNEL_DEV")]
static TUNNEL_DEV: Array<u32> = Array::with_max_entries(1, 0);

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_DST: usize = ETH_LEN + 16;

/// The IPv4 destination of an Ethernet frame, read in place.
fn ipv4_dst(ctx: &TcContext) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + IPV4_DST + 4 > end {
        return None;
    }
    // SAFETY: bounds checked above against data_end.
    let proto = u16::from_be(unsafe { *((data + 12) as *const u16) });
    if proto != ETH_P_IP {
        return None;
    }
    // SAFETY: as above.
    Some(unsafe { *((data + IPV4_DST) as *const u32) })
}

#[classifier]
pub fn peer_from_vm(ctx: TcContext) -> i32 {
    let Some(dst) = ipv4_dst(&ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: map values are plain data.
    let Some(remote) = (unsafe { REMOTES.get(dst) }).copied() else {
        return TC_ACT_OK;
    };
    let Some(&dev) = TUNNEL_DEV.get(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: an all-zero tunnel key is valid; the fields set are its IPv4 ones.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = remote.vni;
    key.__bindgen_anon_1.remote_ipv4 = remote.host;
    key.tunnel_ttl = 64;
    // SAFETY: the key lives on this stack for the call; its size is the kernel's struct.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    if set != 0 {
        return TC_ACT_SHOT;
    }
    // SAFETY: a helper call with scalars.
    unsafe { bpf_redirect(dev, 0) as i32 }
}

#[classifier]
pub fn peer_from_overlay(ctx: TcContext) -> i32 {
    // SAFETY: as in `peer_from_vm`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: the key lives on this stack for the call.
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if got != 0 {
        return TC_ACT_SHOT;
    }
    let Some(dst) = ipv4_dst(&ctx) else {
        return TC_ACT_OK;
    };
    // SAFETY: map values are plain data.
    let Some(ep) = (unsafe { ENDPOINTS.get(dst) }).copied() else {
        return TC_ACT_SHOT;
    };
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > end {
        return TC_ACT_SHOT;
    }
    // SAFETY: the Ethernet header is within bounds (checked above).
    unsafe {
        *(data as *mut [u8; 6]) = ep.mac;
        *((data + 6) as *mut [u8; 6]) = ep.router_mac;
    }
    // SAFETY: a helper call with scalars.
    unsafe { bpf_redirect_peer(ep.ifindex, 0) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
