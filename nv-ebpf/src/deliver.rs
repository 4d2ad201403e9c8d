//! Delivery into a VM port on this host, the one place every path ends that hands a frame to a
//! VM (NVGRE decapsulation, IP-rewrite restore, VM to VM). The port's map entry decides:
//! whether it is still the VM the frame is for (a port re-created, or a record whose port is
//! missing, has no entry under that ifindex), whether it can take a frame now, and how to hand
//! it over. The redirect helpers report success before the kernel looks the target up, and a
//! target that is down frees the frame without a trace: so a frame is counted delivered only
//! once the port is known to be the VM's and running, and otherwise dropped with its reason.
use aya_ebpf::programs::TcContext;
use nv_common::Counter;

use crate::{maps::PORTS, packet::set_host, redirect};

/// Hands the frame to the VM (`vsid`, `ca`: IPv4, network order) behind `ifindex`, or says why
/// it cannot.
#[inline(always)]
pub fn to_vm(ctx: &TcContext, ifindex: u32, vsid: u32, ca: [u8; 4]) -> Result<i32, Counter> {
    // SAFETY: read-only use of a value the agent replaces whole.
    let port = unsafe { PORTS.get(ifindex) }.ok_or(Counter::DropPortGone)?;
    if port.vsid != vsid || crate::packet::v4_of(&port.ca) != Some(ca) {
        return Err(Counter::DropPortGone);
    }
    hand_over(ctx, ifindex, port)
}

/// As [`to_vm`], for an IPv6 frame: the VM is named by its VSID and MAC (its IPv6 records
/// share its port's MAC; the port entry holds its IPv4 address).
#[inline(always)]
pub fn to_vm6(ctx: &TcContext, ifindex: u32, vsid: u32, mac: [u8; 6]) -> Result<i32, Counter> {
    // SAFETY: read-only use of a value the agent replaces whole.
    let port = unsafe { PORTS.get(ifindex) }.ok_or(Counter::DropPortGone)?;
    if port.vsid != vsid || port.mac != mac {
        return Err(Counter::DropPortGone);
    }
    hand_over(ctx, ifindex, port)
}

#[inline(always)]
fn hand_over(ctx: &TcContext, ifindex: u32, port: &nv_common::PortInfo) -> Result<i32, Counter> {
    if port.is_down() {
        return Err(Counter::DropPortDown);
    }
    // The port's rules for what it receives, whatever brought the frame.
    crate::acl::admits(ctx, port, nv_common::acl::DIR_IN)?;
    // The frame was classified against another MAC on the way in (the uplink's, or the
    // sending VM's port); the VM must see it as addressed to it, and neither redirect
    // classifies again.
    set_host(ctx);
    Ok(if port.is_tap() {
        // A tap's transmit is the guest's receive: redirect_peer only works for veth and
        // netkit, and into a tap it frees the frame.
        redirect::egress(ifindex)
    } else {
        redirect::peer(ifindex)
    })
}
