//! Session affinity (`sessionAffinity: ClientIP`).
//!
//! - `lb_affinity_v4`, `lb_affinity6_v4` (LRU, one per family): client
//!   address + frontend (rev-NAT id) → the backend its last new connection
//!   went to, and when. Written by the datapath; an LRU, because it is a
//!   cache: losing an entry only loses the stickiness of an idle client.
//! - `lb_aff_match_v4`: (backend id, frontend) pairs the agent keeps for
//!   every current backend of an affinity frontend. A remembered backend is
//!   used only while its pair exists, so a client never follows affinity to
//!   a backend that left the Service. One map for both families: backend
//!   and rev-NAT ids are one space across them.

use crate::{user_pod, Ipv4, Ipv6};

pub const AFFINITY_MAP: &str = "lb_affinity_v4";
pub const AFFINITY6_MAP: &str = "lb_affinity6_v4";
pub const AFFINITY_MATCH_MAP: &str = "lb_aff_match_v4";
pub const DEFAULT_MAX_AFFINITY_ENTRIES: u32 = 65_536;

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey<A = Ipv4> {
    /// The client: its address (`AFFINITY_CLIENT_ADDR`), or for socket LB,
    /// which runs before the socket has an address, its network namespace
    /// (`AFFINITY_CLIENT_NETNS`: the netns cookie, folded; IPv4 keys only).
    pub client: A,
    pub rev_nat_id: u16,
    pub client_kind: u16,
}

pub const AFFINITY_CLIENT_ADDR: u16 = 0;
pub const AFFINITY_CLIENT_NETNS: u16 = 1;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// Monotonic time of the client's last new connection.
    pub last_used_ns: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub _pad: u16,
}

/// `AffinityMatch` values: where the backend runs, for the node-local
/// policies and SNAT (a remembered backend has no slot number).
pub const AFFINITY_BACKEND_REMOTE: u8 = 0;
pub const AFFINITY_BACKEND_LOCAL: u8 = 1;

impl<A> AffinityKey<A> {
    /// A client known by its address (the tc path).
    #[inline(always)]
    pub const fn new(client_addr: A, rev_nat_id: u16) -> Self {
        Self {
            client: client_addr,
            rev_nat_id,
            client_kind: AFFINITY_CLIENT_ADDR,
        }
    }
}

impl AffinityKey {
    /// A client known by its network namespace (socket LB).
    #[inline(always)]
    pub const fn for_netns(netns_cookie: u64, rev_nat_id: u16) -> Self {
        Self {
            client: ((netns_cookie ^ (netns_cookie >> 32)) as u32).to_ne_bytes(),
            rev_nat_id,
            client_kind: AFFINITY_CLIENT_NETNS,
        }
    }
}

impl AffinityMatchKey {
    #[inline(always)]
    pub const fn new(backend_id: u32, rev_nat_id: u16) -> Self {
        Self {
            backend_id,
            rev_nat_id,
            _pad: 0,
        }
    }
}

const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityKey<Ipv6>>() == 20);
const _: () = assert!(
    core::mem::size_of::<AffinityValue>() == 16 && core::mem::align_of::<AffinityValue>() == 8
);
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 8);

user_pod!(
    AffinityKey,
    AffinityKey<Ipv6>,
    AffinityValue,
    AffinityMatchKey
);
