//! The NVGRE FlowID: 8 bits of entropy from the inner flow, so that underlay ECMP spreads a
//! tenant's flows while every packet of one flow takes one path.

/// Hashes an inner IPv4 flow (addresses, protocol, and for TCP/UDP the two ports as they sit on
/// the wire) into a FlowID. Deterministic across hosts, so both directions' choices are
/// reproducible in tests.
#[inline(always)]
#[must_use]
pub fn flow_id_v4(src: [u8; 4], dst: [u8; 4], proto: u8, ports: u32) -> u8 {
    let mut h = u32::from_be_bytes(src) ^ u32::from_be_bytes(dst).rotate_left(16);
    h ^= ports.wrapping_mul(0x9e37_79b1) ^ u32::from(proto);
    // murmur3 finaliser: every input bit reaches the low byte.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the FlowID is the low byte by design"
    )]
    let id = h as u8;
    id
}

/// The FlowID of an IPv6 flow: its addresses folded to 32 bits each, then as IPv4's.
#[inline(always)]
#[must_use]
pub fn flow_id_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, ports: u32) -> u8 {
    let fold = |a: &[u8; 16]| {
        let w = |i: usize| u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        (w(0) ^ w(4) ^ w(8) ^ w(12)).to_be_bytes()
    };
    flow_id_v4(fold(src), fold(dst), proto, ports)
}
