//! The ARP responder: a VM's request for a customer address of its own VSID is answered from the
//! lookup records (and for its subnet's gateway with the router's MAC), so nothing is flooded
//! and no MAC is ever learned.
use aya_ebpf::programs::TcContext;
use nv_common::{
    Counter, LookupKey, PortInfo, v4_mapped,
    wire::{ARPHRD_ETHER, ARPOP_REPLY, ARPOP_REQUEST, ETH_HLEN, ETH_P_IP},
};

use crate::{
    counters::count,
    maps::LOOKUPS,
    packet::{ArpEth, EthHdr, ptr_at},
    router,
};

// Out of line: its own stack frame keeps every path under the 512-byte BPF stack limit.
#[inline(never)]
pub fn reply(ctx: &TcContext, port: &PortInfo) -> Result<i32, Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, end, 0).ok_or(Counter::DropVmMalformed)?;
    let arp = ptr_at::<ArpEth>(data, end, ETH_HLEN).ok_or(Counter::DropVmMalformed)?;
    // SAFETY: both pointers were bounds-checked against data_end just above.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if u16::from_be_bytes(arp.htype) != ARPHRD_ETHER
        || u16::from_be_bytes(arp.ptype) != ETH_P_IP
        || arp.hlen != 6
        || arp.plen != 4
    {
        return Err(Counter::DropVmArp);
    }
    // The sender fields must be the port's own (0.0.0.0 is an address probe): nothing a VM
    // says about other addresses is believed, and nothing is learned from it anyway.
    if arp.sha != port.mac || (v4_mapped(arp.spa) != port.ca && arp.spa != [0; 4]) {
        return Err(Counter::DropVmSpoofedArp);
    }
    // Replies (the host answers every request itself) and anything but requests: dropped.
    if u16::from_be_bytes(arp.op) != ARPOP_REQUEST {
        return Err(Counter::DropVmArp);
    }
    // Gratuitous ARP and probes for its own address: nothing to answer.
    if v4_mapped(arp.tpa) == port.ca {
        return Err(Counter::DropVmArp);
    }
    let key = LookupKey {
        vsid: port.vsid,
        ca: arp.tpa,
    };
    // A VM of the VSID, or the gateway of the VM's subnet (the router's MAC).
    // SAFETY: read-only use of a value the agent replaces whole.
    let (mac, answered) = match unsafe { LOOKUPS.get(key) } {
        Some(target) => (target.mac, Counter::VmArpReplied),
        None if router::is_gateway_of(port.vsid, arp.tpa) => {
            (router::mac(), Counter::VmGatewayReplied)
        }
        None => return Err(Counter::DropVmArp),
    };

    // Turn the request into the reply in place and send it back out of the same port.
    let (requester_mac, requester_ip, target_ip) = (arp.sha, arp.spa, arp.tpa);
    arp.op = ARPOP_REPLY.to_be_bytes();
    arp.sha = mac;
    arp.spa = target_ip;
    arp.tha = requester_mac;
    arp.tpa = requester_ip;
    eth.dst = requester_mac;
    eth.src = mac;
    count(answered);
    // Egress of the port the request came in on.
    // SAFETY: the context pointer is valid for the whole program run.
    Ok(crate::redirect::egress(unsafe { (*ctx.skb.skb).ifindex }))
}
