//! Bounds-checked header access. Headers are byte arrays, so there is no alignment to get wrong
//! and byte order is explicit at every read.
use core::mem::size_of;

/// `skb->pkt_type` of a frame addressed to this host (uapi `PACKET_HOST`).
pub const PACKET_HOST: u32 = 0;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

impl EthHdr {
    #[inline(always)]
    pub fn proto(&self) -> u16 {
        u16::from_be_bytes(self.proto)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub csum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    /// Header length in bytes, from IHL; 0..=60.
    #[inline(always)]
    pub fn hlen(&self) -> usize {
        usize::from(self.ver_ihl & 0x0f) * 4
    }

    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag) & nv_common::wire::IPV4_FRAG_MASK != 0
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GreHdr {
    pub flags: [u8; 2],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArpEth {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub op: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// A pointer to a `T` at `offset` from `start`, or `None` when it would cross `end`.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, offset: usize) -> Option<*mut T> {
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads a `T` at `offset`, bounds-checked.
#[inline(always)]
pub fn read_at<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside [start, end).
    ptr_at::<T>(start, end, offset).map(|p| unsafe { p.read_unaligned() })
}

/// The Internet checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header_checksum(hdr: &[u8; 20]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}
