//! Connection tracking: an LRU hash keyed by the 5-tuple as seen on the wire.
//!
//! A new flow to a frontend creates two entries:
//! - forward: `client → VIP` (dir `CT_DIR_FORWARD`) with the backend address,
//! - reply: `backend → client` (dir `CT_DIR_REPLY`) with the VIP address.
//!
//! Both carry the rewrite address directly, so an established flow keeps its
//! backend even after the backend leaves the service, and replies need one
//! lookup.

use crate::user_pod;

pub const CT_MAP: &str = "lb_ct_v1";
pub const DEFAULT_MAX_CT_ENTRIES: u32 = 262_144;

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// `CtValue::flags`: a FIN or RST was seen; the entry ages out quickly.
pub const CT_FLAG_CLOSING: u32 = 1 << 0;

/// Lifetimes after the last packet. Expired entries count as misses.
pub const CT_TIMEOUT_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 60 * 1_000_000_000;
/// `last_seen_ns` is refreshed at most this often, to spare a map write per packet.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Forward: backend address/port (new destination). Reply: VIP/port (new source).
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    pub rev_nat_id: u16,
    pub backend_id: u32,
    pub flags: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
}

impl CtValue {
    pub const fn timeout_ns(&self, proto: u8) -> u64 {
        if proto != crate::IPPROTO_TCP {
            CT_TIMEOUT_UDP_NS
        } else if self.flags & CT_FLAG_CLOSING != 0 {
            CT_TIMEOUT_TCP_CLOSING_NS
        } else {
            CT_TIMEOUT_TCP_NS
        }
    }

    pub const fn is_expired(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.timeout_ns(proto)
    }
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 16 && core::mem::align_of::<CtKey>() == 4);
const _: () =
    assert!(core::mem::size_of::<CtValue>() == 32 && core::mem::align_of::<CtValue>() == 8);

user_pod!(CtKey, CtValue);
