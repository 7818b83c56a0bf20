//! Services map: one entry per frontend slot.
//!
//! Slot 0 of a frontend (VIP, port, protocol) carries the number of backends
//! and the reverse-NAT id; slots `1..=count` each carry one backend id. The
//! agent writes slots before slot 0 when growing and slot 0 first when
//! shrinking, so a packet never selects a slot that is not written yet.

use crate::{user_pod, Ipv4, Ipv6};

pub const SVC_MAP: &str = "lb_svc_v4";
/// IPv6 frontends, the same slots (`SvcKey<Ipv6>`).
pub const SVC6_MAP: &str = "lb_svc6_v4";
pub const DEFAULT_MAX_SVC_ENTRIES: u32 = 262_144;
/// Most backends one frontend may have (slots are `u16`, slot 0 is the frontend).
pub const MAX_BACKENDS_PER_SVC: u32 = 65_534;

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey<A = Ipv4> {
    pub addr: A,
    /// Host order.
    pub port: u16,
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
    /// Slot 0: slots 1..=local_count hold the backends on this node (the
    /// node-local traffic policies pick among these).
    pub local_count: u16,
    /// Slot 0: `SVC_FLAG_*`. Slots 1..=count: `SLOT_FLAG_*`.
    pub flags: u16,
    /// Slot 0: session affinity timeout (seconds) when `SVC_FLAG_AFFINITY`.
    pub affinity_timeout_s: u32,
    /// Slot 0 with `SVC_FLAG_MAGLEV`: the size M (a prime) of the frontend's
    /// Maglev lookup table in `lb_maglev_v4`.
    pub maglev_table_size: u32,
}

/// `SvcValue::flags`: the frontend's kind (one of these four)…
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 2;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 3;
/// …and its policies. `externalTrafficPolicy: Local`: traffic arriving on an
/// external interface uses the local slots only, without SNAT.
pub const SVC_FLAG_EXTERNAL_LOCAL: u16 = 1 << 4;
/// `internalTrafficPolicy: Local` (cluster IPs): the local slots only.
pub const SVC_FLAG_INTERNAL_LOCAL: u16 = 1 << 5;
/// `sessionAffinity: ClientIP`.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 6;
/// `loadBalancerSourceRanges` apply (checked in the source-range map).
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 7;
/// New flows pick their backend in the frontend's Maglev table
/// (`--lb-algorithm maglev`), except those limited to local backends.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 8;
/// Which of the frontend's two Maglev tables is current: set, table 1.
/// The agent fills the other one, then flips this bit with the rest of
/// slot 0, so no packet sees a half-written table.
pub const SVC_FLAG_MAGLEV_TABLE_1: u16 = 1 << 9;

/// A slot's `flags`: where its backend runs. A packet judges the slot by
/// what it holds, not by its place: while the local count grows, slot
/// `local_count + 1` holds a local backend before slot 0 says so, and an
/// external flow SNATed to a local pod would break for its lifetime. A slot
/// with neither flag (written by an agent before them) is judged by place.
pub const SLOT_FLAG_LOCAL: u16 = 1 << 0;
pub const SLOT_FLAG_REMOTE: u16 = 1 << 1;

/// A slot's role as logged and shown: `local`, `remote`, or `unplaced`
/// (neither flag: judged by its place).
pub const fn slot_role(flags: u16) -> &'static str {
    if flags & SLOT_FLAG_REMOTE != 0 {
        "remote"
    } else if flags & SLOT_FLAG_LOCAL != 0 {
        "local"
    } else {
        "unplaced"
    }
}

/// Kinds reached from outside the cluster (subject to `externalTrafficPolicy`).
pub const SVC_FLAGS_EXTERNAL: u16 =
    SVC_FLAG_NODE_PORT | SVC_FLAG_LOAD_BALANCER | SVC_FLAG_EXTERNAL_IP;

impl<A> SvcKey<A> {
    pub const fn new(addr: A, port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            slot,
            proto,
            _pad: [0; 3],
        }
    }
}

impl SvcValue {
    /// Slot `slot`'s value: whether its backend runs on another node, given
    /// the frontend's published `local_count`.
    #[inline(always)]
    pub const fn slot_is_remote(&self, slot: u16, local_count: u16) -> bool {
        if self.flags & SLOT_FLAG_REMOTE != 0 {
            true
        } else if self.flags & SLOT_FLAG_LOCAL != 0 {
            false
        } else {
            slot > local_count
        }
    }
}

const _: () = assert!(core::mem::size_of::<SvcKey>() == 12 && core::mem::align_of::<SvcKey>() == 4);
const _: () = assert!(
    core::mem::size_of::<SvcKey<Ipv6>>() == 24 && core::mem::align_of::<SvcKey<Ipv6>>() == 4
);
const _: () =
    assert!(core::mem::size_of::<SvcValue>() == 20 && core::mem::align_of::<SvcValue>() == 4);

user_pod!(SvcKey, SvcKey<Ipv6>, SvcValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_judged_by_its_role_and_without_one_by_its_place() {
        let slot = |flags| SvcValue {
            flags,
            ..SvcValue::default()
        };
        // Slot 2 of a frontend publishing one local slot.
        assert!(!slot(SLOT_FLAG_LOCAL).slot_is_remote(2, 1));
        assert!(slot(SLOT_FLAG_REMOTE).slot_is_remote(1, 1));
        assert!(slot(0).slot_is_remote(2, 1));
        assert!(!slot(0).slot_is_remote(1, 1));
        assert_eq!(
            [0, SLOT_FLAG_LOCAL, SLOT_FLAG_REMOTE].map(slot_role),
            ["unplaced", "local", "remote"]
        );
    }
}
