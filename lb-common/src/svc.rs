//! Services map: one entry per frontend slot.
//!
//! Slot 0 of a frontend (VIP, port, protocol) carries the number of backends
//! and the reverse-NAT id; slots `1..=count` each carry one backend id. The
//! agent writes slots before slot 0 when growing and slot 0 first when
//! shrinking, so a packet never selects a slot that is not written yet.

use crate::user_pod;

pub const SVC_MAP: &str = "lb_svc_v2";
pub const DEFAULT_MAX_SVC_ENTRIES: u32 = 262_144;
/// Most backends one frontend may have (slots are `u16`, slot 0 is the frontend).
pub const MAX_BACKENDS_PER_SVC: u32 = 65_534;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr_be: u32,
    pub port_be: u16,
    /// 0 = the frontend itself; 1..=count = backend slots.
    pub slot: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    /// Slots 1..=count: the backend id. Slot 0: unused (0).
    pub backend_id: u32,
    /// Slot 0: number of backend slots. A frontend with count 0 rejects new flows.
    pub count: u16,
    /// Slot 0: id of the reverse-NAT entry (the frontend's VIP:port).
    pub rev_nat_id: u16,
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// `SvcValue::flags`: service kinds (more to come with NodePort/LoadBalancer).
pub const SVC_FLAG_CLUSTER_IP: u8 = 1 << 0;

impl SvcKey {
    pub const fn new(addr_be: u32, port_be: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr_be,
            port_be,
            slot,
            proto,
            _pad: [0; 3],
        }
    }
}

const _: () = assert!(core::mem::size_of::<SvcKey>() == 12 && core::mem::align_of::<SvcKey>() == 4);
const _: () =
    assert!(core::mem::size_of::<SvcValue>() == 12 && core::mem::align_of::<SvcValue>() == 4);

user_pod!(SvcKey, SvcValue);
