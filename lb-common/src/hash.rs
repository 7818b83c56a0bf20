//! Flow hash used to pick a backend slot for a new flow.
//!
//! Shared so tests (and `explain`-style tools) can predict the slot the kernel
//! picks for a given 5-tuple. Inputs are the wire-order values.

/// murmur3's 32-bit finaliser: cheap, no loops, good avalanche.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
pub const fn flow_hash(
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let mut h = fmix32(saddr_be ^ 0x9e37_79b9);
    h = fmix32(h ^ daddr_be);
    h = fmix32(h ^ ((sport_be as u32) << 16 | dport_be as u32));
    fmix32(h ^ proto as u32)
}

/// An IPv6 address as `flow_hash` takes it: its four 32-bit words (each
/// read as a native `u32` of wire-order bytes, as an IPv4 address is) xored.
#[inline(always)]
pub const fn fold_ipv6(addr: &crate::Ipv6) -> u32 {
    let mut folded = 0;
    let mut i = 0;
    while i < 16 {
        folded ^= u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        i += 4;
    }
    folded
}

/// The slot hash of a socket (socket LB, where no source port exists yet
/// at connect or sendto): one socket keeps one backend — an unconnected
/// UDP socket's every `sendto` (QUIC, DTLS) — and sockets spread over the
/// backends (Fibonacci hashing: cookies are a counter).
#[inline(always)]
pub const fn socket_hash(cookie: u64) -> u32 {
    (cookie.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32
}

/// Slot (1..=count) for a flow; `count` must be non-zero.
#[inline(always)]
pub const fn select_slot(hash: u32, count: u16) -> u16 {
    (hash % count as u32) as u16 + 1
}
