//! Fragments of service flows, both families. Only a datagram's first
//! fragment carries its ports: it is translated by its flow like any
//! packet, and the translation it got is recorded under the datagram's
//! identity (source, destination, identification, protocol), as the first
//! fragment arrived. Later fragments follow the record: the same addresses,
//! rewritten in the IP header only (the transport checksum, in the first
//! fragment, covers the whole datagram and was updated there). An LRU per
//! family the datapath alone uses, not pinned: a datagram is over in
//! milliseconds.

use crate::{user_pod, Ipv4, Ipv6};

pub const FRAG_MAP: &str = "lb_frag_v4";
pub const FRAG6_MAP: &str = "lb_frag6_v4";
pub const DEFAULT_MAX_FRAG_ENTRIES: u32 = 8192;

/// A record is followed this long after its first fragment: a datagram's
/// fragments arrive together, and a later datagram that reuses the IP id
/// (IPv4's wraps after 65 536 between one pair) is not taken for it.
pub const FRAG_LIFETIME_NS: u64 = 5_000_000_000;

/// `FragValue::flags`: the flow is SNATed, its packets routed by the
/// program (the fragments too).
pub const FRAG_ROUTED: u8 = 1 << 0;

pub const FRAG_AT_INGRESS: u8 = 0;
pub const FRAG_AT_EGRESS: u8 = 1;

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FragKey<A = Ipv4> {
    pub saddr: A,
    pub daddr: A,
    /// The datagram's identification, host order: IPv4's 16-bit header
    /// field, IPv6's 32-bit fragment header field.
    pub id: u32,
    /// The transport protocol (IPv6: the fragment header's next header).
    pub proto: u8,
    /// Where the first fragment was translated: `FRAG_AT_INGRESS` or
    /// `FRAG_AT_EGRESS`. A reply translated at an uplink's egress is not
    /// translated again at the pod interface's ingress it passed first (its
    /// new source, a node address, would be a martian there).
    pub hook: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct FragValue<A = Ipv4> {
    /// The addresses the datagram's fragments leave with, adjacent as in
    /// the IP header (IPv6: one store writes both).
    pub src_addr: A,
    pub dst_addr: A,
    pub flags: u8,
    pub _pad: [u8; 7],
    /// CLOCK_MONOTONIC_COARSE time after which the record is not followed.
    pub expires_ns: u64,
}

impl<A> FragValue<A> {
    /// Source and destination, from the value's start.
    pub const ADDRESSES_LEN: usize = 2 * core::mem::size_of::<A>();
}

const _: () =
    assert!(core::mem::size_of::<FragKey>() == 16 && core::mem::align_of::<FragKey>() == 4);
const _: () = assert!(core::mem::size_of::<FragKey<Ipv6>>() == 40);
const _: () =
    assert!(core::mem::size_of::<FragValue>() == 24 && core::mem::align_of::<FragValue>() == 8);
const _: () = assert!(core::mem::size_of::<FragValue<Ipv6>>() == 48);

user_pod!(FragKey, FragKey<Ipv6>, FragValue, FragValue<Ipv6>);
