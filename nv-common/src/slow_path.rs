//! The slow path: frames the datapath hands to the agent, which answers them into the VM's
//! port (DHCPv4 today), as OVN's controller does. Each VM port has its own budget, so one VM
//! asking as fast as it can never takes another VM's turn.

/// Bytes of a frame the agent sees at most: a DHCP request of any client fits (RFC 2131's
/// minimum message is 576 bytes of IP); a longer frame is cut, and a request's options past
/// the cut are not read.
pub const SLOW_FRAME_BYTES: usize = 1024;

/// Size of the slow-path ring buffer: about 60 frames in flight.
pub const SLOW_RING_BYTES: u32 = 64 * 1024;

/// Frames per second a VM port may hand over, per CPU, and its burst.
pub const SLOW_PER_SEC: u64 = 10;
pub const SLOW_BURST: u64 = 20;

/// One frame in the slow-path ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SlowFrame {
    /// The VM port the frame came from.
    pub ifindex: u32,
    /// Bytes of `bytes` that hold the frame (the frame may have been longer).
    pub len: u32,
    pub bytes: [u8; SLOW_FRAME_BYTES],
}

const _: () = assert!(core::mem::size_of::<SlowFrame>() == 8 + SLOW_FRAME_BYTES);
