//! `loadBalancerSourceRanges`: an LPM trie of (frontend, client prefix).
//! A new flow to a frontend flagged `SVC_FLAG_SOURCE_RANGES` is dropped
//! unless its source falls in one of the frontend's prefixes.

use crate::{user_pod, Ipv4};

pub const SOURCE_RANGE_MAP: &str = "lb_src_range_v4";
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;

/// The key's data, compared most significant byte first: the frontend's
/// rev-NAT id (big-endian, always matched whole), then the client address.
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub rev_nat_id_be: u16,
    pub _pad: u16,
    pub addr: Ipv4,
}

/// Bits of the key before the address: rev-NAT id and padding.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

impl SourceRangeKey {
    #[inline(always)]
    pub const fn new(rev_nat_id: u16, addr: Ipv4) -> Self {
        Self {
            rev_nat_id_be: rev_nat_id.to_be(),
            _pad: 0,
            addr,
        }
    }
}

const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);

user_pod!(SourceRangeKey);
