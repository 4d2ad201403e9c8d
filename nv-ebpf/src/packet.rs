//! Bounds-checked header access. Headers are byte arrays, so there is no alignment to get wrong
//! and byte order is explicit at every read.
use core::mem::size_of;

use aya_ebpf::programs::TcContext;

/// `skb->pkt_type` of a frame addressed to this host (uapi `PACKET_HOST`).
const PACKET_HOST: u32 = 0;

/// Makes the first `want` bytes (or the whole frame, if shorter) linear, calling the helper
/// only when they are not already: receive paths usually have the headers linear.
#[inline(always)]
pub fn pull(ctx: &TcContext, want: u32) {
    let len = ctx.len();
    let want = if len < want { len } else { want };
    if ctx.data() + (want as usize) > ctx.data_end() {
        let _ = ctx.pull_data(want);
    }
}

/// Marks the frame as addressed to this host; the helper only when it is not already.
#[inline(always)]
pub fn set_host(ctx: &TcContext) {
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        let _ = ctx.change_type(PACKET_HOST);
    }
}

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

    /// The header checksum of this option-less header, its own checksum field taken as zero.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let w = |b: [u8; 2]| u32::from(u16::from_be_bytes(b));
        let sum = w([self.ver_ihl, self.tos])
            + w(self.tot_len)
            + w(self.id)
            + w(self.frag)
            + w([self.ttl, self.proto])
            + w([self.src[0], self.src[1]])
            + w([self.src[2], self.src[3]])
            + w([self.dst[0], self.dst[1]])
            + w([self.dst[2], self.dst[3]]);
        csum_fold(sum)
    }

    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag) & nv_common::wire::IPV4_FRAG_MASK != 0
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub ver_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Ipv6Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.ver_tc_flow[0] >> 4
    }

    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        (self.ver_tc_flow[0] << 4) | (self.ver_tc_flow[1] >> 4)
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

/// A view of the `T` at `offset`, bounds-checked, without copying it: a header read with
/// `read_at` is copied byte by byte (alignment 1) onto the stack, which costs more than the
/// parsing. `T` must be made of byte arrays. A helper call that may move the packet ends the
/// view's life; the verifier refuses a program that uses it after that.
#[inline(always)]
pub fn view_at<'a, T>(start: usize, end: usize, offset: usize) -> Option<&'a T> {
    // SAFETY: ptr_at checked that the whole T lies inside [start, end); alignment is 1.
    ptr_at::<T>(start, end, offset).map(|p| unsafe { &*p })
}

/// Reads a `T` at `offset`, bounds-checked.
#[inline(always)]
pub fn read_at<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside [start, end).
    ptr_at::<T>(start, end, offset).map(|p| unsafe { p.read_unaligned() })
}

/// A 32-bit ones-complement sum folded to 16 bits and complemented: a checksum field (the
/// kernel's `csum_fold`).
#[inline(always)]
pub fn csum_fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// Writes `value` at `offset`, bounds-checked; `false` when it would cross `end`. On TC, a
/// direct write costs far less than `bpf_skb_store_bytes` (the verifier unclones the skb once,
/// in the program's prologue).
#[inline(always)]
pub fn write_at<T: Copy>(start: usize, end: usize, offset: usize, value: T) -> bool {
    match ptr_at::<T>(start, end, offset) {
        // SAFETY: ptr_at checked that the whole T lies inside [start, end).
        Some(p) => {
            unsafe { p.write_unaligned(value) };
            true
        }
        None => false,
    }
}

/// The IPv4 address in an IPv4-mapped [`nv_common::Addr`] held in a map value, or `None`
/// for any other address. Word by word: `nv_common::mapped_v4` goes byte by byte (an `Addr`
/// alone has alignment 1), which costs a dozen loads and branches per check.
///
/// Only for the `Addr` fields of map values: nv-common asserts at compile time that they sit
/// at 4-aligned offsets of 4-aligned structs, and map values are 8-aligned.
#[inline(always)]
pub fn v4_of(a: &nv_common::Addr) -> Option<[u8; 4]> {
    // SAFETY: see above: the address is 4-aligned, and [u32; 4] has the same size.
    let w = unsafe { &*core::ptr::from_ref(a).cast::<[u32; 4]>() };
    if w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(w[3].to_ne_bytes())
    } else {
        None
    }
}
