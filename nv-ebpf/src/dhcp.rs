//! DHCP requests of VMs (the slow path): in a VSID with a subnet, each request goes to the
//! agent through the slow-path ring, within its port's budget, and the agent answers from the
//! VM's record into its port. Elsewhere nothing changes: a request from no address is dropped
//! (counted under its own reason), one from the VM's own address is forwarded as any packet.
use core::ffi::c_void;

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_skb_load_bytes, programs::TcContext};
use nv_common::{
    Counter, PortInfo,
    slow_path::{SLOW_BURST, SLOW_FRAME_BYTES, SLOW_PER_SEC, SlowFrame},
    wire::{DHCP_CLIENT_PORT, DHCP_SERVER_PORT, ETH_HLEN, IPPROTO_UDP},
};

use crate::{
    budget,
    counters::count,
    maps::{SLOW_BUCKET, SLOW_PATH},
    packet::{Ipv4Hdr, read_at},
    router,
};

/// What becomes of `ip`, sent by the VM behind `ifindex`, if it is a DHCP request; `None`
/// for any other packet.
#[inline(always)]
pub fn handle(
    ctx: &TcContext,
    port: &PortInfo,
    ifindex: u32,
    ip: &Ipv4Hdr,
) -> Option<Result<i32, Counter>> {
    if ip.proto != IPPROTO_UDP || ip.is_fragment() {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let ports: [u8; 4] = read_at(data, end, ETH_HLEN + ip.hlen())?;
    let [c0, c1] = DHCP_CLIENT_PORT.to_be_bytes();
    let [s0, s1] = DHCP_SERVER_PORT.to_be_bytes();
    let (request, to_client) = (ports == [c0, c1, s0, s1], ports[2..] == [c0, c1]);
    // Any other UDP pays no lookup for DHCP.
    if !request && !to_client {
        return None;
    }
    let routed = router::domain(port.vsid).is_some();
    // Where nv is the DHCP server, no VM answers a client in its place.
    if routed && to_client {
        return Some(Err(Counter::DropVmRouterGuard));
    }
    if !request {
        return None;
    }
    if routed {
        return Some(hand_over(ctx, ifindex));
    }
    // No subnet: as before routes, but counted as what it is.
    (ip.src == [0; 4]).then_some(Err(Counter::DropVmDhcpNoSubnet))
}

/// Copies the frame into the slow-path ring for the agent and drops it here (a DHCP request,
/// or an IPv6 router solicitation: the agent's to answer). The counters say DHCP for both.
#[inline(always)]
pub fn hand_over(ctx: &TcContext, ifindex: u32) -> Result<i32, Counter> {
    if !budget::take(&SLOW_BUCKET, ifindex, SLOW_PER_SEC, SLOW_BURST) {
        return Err(Counter::DropVmDhcpOverBudget);
    }
    let Some(mut entry) = SLOW_PATH.reserve::<SlowFrame>(0) else {
        return Err(Counter::DropVmDhcpRingFull);
    };
    #[expect(clippy::cast_possible_truncation, reason = "1024")]
    let most = SLOW_FRAME_BYTES as u32;
    let len = ctx.len();
    let n = if len > most { most } else { len };
    let frame = entry.as_mut_ptr();
    // SAFETY: `frame` is the reserved entry, ours until submitted or discarded; `n` is at
    // most the size of its `bytes`.
    let loaded = n > 0
        && unsafe {
            (*frame).ifindex = ifindex;
            (*frame).len = n;
            bpf_skb_load_bytes(
                ctx.skb.skb as *const c_void,
                0,
                (&raw mut (*frame).bytes).cast::<c_void>(),
                n,
            )
        } == 0;
    if !loaded {
        entry.discard(0);
        return Err(Counter::DropVmMalformed);
    }
    entry.submit(0);
    count(Counter::VmDhcpToAgent);
    Ok(TC_ACT_SHOT)
}
