//! `loadBalancerSourceRanges`: an LPM trie of (frontend, client prefix) per
//! family. A new flow to a frontend flagged `SVC_FLAG_SOURCE_RANGES` is
//! dropped unless its source falls in one of the frontend's prefixes (of
//! the frontend's family: a family with no prefixes admits nobody).

use crate::{user_pod, Ipv4, Ipv6};

pub const SOURCE_RANGE_MAP: &str = "lb_src_range_v4";
pub const SOURCE_RANGE6_MAP: &str = "lb_src_range6_v4";
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;

/// The key's data, compared most significant byte first: the frontend's
/// rev-NAT id (big-endian, always matched whole), then the client address.
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey<A = Ipv4> {
    pub rev_nat_id_be: u16,
    pub _pad: u16,
    pub addr: A,
}

/// Bits of the key before the address: rev-NAT id and padding.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

impl<A> SourceRangeKey<A> {
    #[inline(always)]
    pub const fn new(rev_nat_id: u16, addr: A) -> Self {
        Self {
            rev_nat_id_be: rev_nat_id.to_be(),
            _pad: 0,
            addr,
        }
    }
}

const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);
const _: () = assert!(core::mem::size_of::<SourceRangeKey<Ipv6>>() == 20);

user_pod!(SourceRangeKey, SourceRangeKey<Ipv6>);
