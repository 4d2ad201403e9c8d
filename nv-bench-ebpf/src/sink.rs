//! The bench's sink: TC ingress on a receiving VM's eth0, where the flood's datagrams (UDP to
//! port 47003) end once the device has counted them. A datapath's work ends at the VM's NIC;
//! what the VM's own stack does with a datagram is the same for every datapath and would only
//! dilute the difference between them. Everything else (ARP, neighbour probes, TCP) passes, so
//! the bed keeps working while the sink is attached.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// The bench's flood port.
const FLOOD_PORT: u16 = 47003;

#[classifier]
pub fn sink_drop(ctx: TcContext) -> i32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    // Ethernet, an IPv4 header without options, and the UDP ports.
    if data + ETH_LEN + 20 + 4 > end {
        return TC_ACT_OK;
    }
    // SAFETY: every read below is within the bounds checked above.
    let (proto, ihl_version, l4, dport) = unsafe {
        (
            u16::from_be(*((data + 12) as *const u16)),
            *((data + ETH_LEN) as *const u8),
            *((data + ETH_LEN + 9) as *const u8),
            u16::from_be(*((data + ETH_LEN + 22) as *const u16)),
        )
    };
    if proto == ETH_P_IP && ihl_version == 0x45 && l4 == IPPROTO_UDP && dport == FLOOD_PORT {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
