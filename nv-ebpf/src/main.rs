//! nv's datapath. One concern per file:
//! - `acl`: port ACLs: rules, connection tracking and meters of a VM's port
//! - `from_vm`: TC ingress on VM ports (traffic leaving a VM): identity, ARP, forwarding
//! - `from_vm6`: IPv6 from a VM: router guard, source check, delivery or NVGRE
//! - `arp`: the ARP responder that answers VMs from the lookup records
//! - `nd`: the IPv6 neighbour responder, answering VMs from the lookup records
//! - `encap`: NVGRE encapsulation
//! - `rewrite`: IP rewrite (customer addresses to provider addresses and back)
//! - `csum_offload`: a VM's checksum offload state, checked before IP rewrite
//! - `underlay`: MTU check, next hop from the FIB, redirect to the uplink
//! - `pmtu`: ICMP "fragmentation needed" for VM packets too big for the uplink
//! - `icmp6`: ICMPv6 errors to VMs: packet too big, and the router's time exceeded and
//!   unreachable
//! - `router`: the distributed router: routes between the subnets of a routing domain
//! - `router6`: the distributed router for IPv6
//! - `dhcp`: DHCP requests of VMs, handed to the agent (the slow path)
//! - `budget`: token buckets per VM port, for what a VM may make the datapath do
//! - `redirect`: every redirect, recorded in copies loaded for tests and traces
//! - `deliver`: delivery into a VM port (veth or tap), known to be the VM's and running
//! - `monitor`: every drop (counted, and reported while `nvctl monitor` runs), traffic per VSID
//! - `uplink_xdp`: XDP on the uplink: NVGRE validation and decapsulation
//! - `uplink_tc`: TC ingress on the uplink: hands decapsulated frames to VM ports
//! - `uplink_rx`: what a frame on the uplink is (shared by both uplink hooks)
//! - `uplink_arp`: ARP answers for the rewrite PAs the datapath owns
#![no_std]
#![no_main]

mod acl;
mod arp;
mod budget;
mod counters;
mod csum_offload;
mod deliver;
mod dhcp;
mod encap;
mod from_vm;
mod from_vm6;
mod icmp6;
mod maps;
mod monitor;
mod nd;
mod packet;
mod pmtu;
mod redirect;
mod rewrite;
mod rewrite6;
mod router;
mod router6;
mod underlay;
mod uplink_arp;
mod uplink_egress;
mod uplink_nd;
mod uplink_rx;
mod uplink_tc;
mod uplink_xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[classifier]
pub fn nv_from_vm(ctx: TcContext) -> i32 {
    from_vm::run(&ctx)
}

/// TC ingress on the bounce device's peer: a VM's tunnel super-packet, segmented.
#[classifier]
pub fn nv_from_bounce(ctx: TcContext) -> i32 {
    from_vm::run_bounced(&ctx)
}

#[xdp(frags)]
pub fn nv_uplink_xdp(ctx: XdpContext) -> u32 {
    uplink_xdp::run(&ctx)
}

#[classifier]
pub fn nv_uplink_tc(ctx: TcContext) -> i32 {
    uplink_tc::run(&ctx)
}

#[classifier]
pub fn nv_uplink_egress(ctx: TcContext) -> i32 {
    uplink_egress::run(&ctx)
}

/// The floor for benchmarks: an XDP program that does nothing, measured in the same run.
#[xdp]
pub fn nv_noop_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// The floor for benchmarks: a TC program that does nothing, measured in the same run.
#[classifier]
pub fn nv_noop_tc(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_fib_lookup and bpf_redirect_neigh are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
