//! Session affinity: a new connection from a client goes to the backend
//! its previous one went to, while that backend is still a current backend
//! of the frontend (its match entry exists) and the timeout has not passed
//! since the client's last new connection.

use lb_common::{
    affinity::{AffinityKey, AffinityMatchKey, AffinityValue, AFFINITY_BACKEND_LOCAL},
    svc::SvcValue,
};

use crate::{family::Family, maps::AFFINITY_MATCH};

const NS_PER_S: u64 = 1_000_000_000;

/// The client's remembered backend and whether it runs on another node.
#[inline(always)]
pub fn remembered<A: Family>(
    key: &AffinityKey<A>,
    svc: &SvcValue,
    local_only: bool,
    now: u64,
) -> Option<(u32, bool)> {
    // SAFETY: copied at once (the LRU may recycle the element).
    let last = unsafe { *A::affinity().get_ptr(key)? };
    if now.saturating_sub(last.last_used_ns) > u64::from(svc.affinity_timeout_s) * NS_PER_S {
        return None;
    }
    let placement = unsafe {
        *AFFINITY_MATCH.get_ptr(&AffinityMatchKey::new(last.backend_id, svc.rev_nat_id))?
    };
    let remote = placement != AFFINITY_BACKEND_LOCAL;
    if local_only && remote {
        return None;
    }
    Some((last.backend_id, remote))
}

/// Records the client's new connection (its timeout starts again).
#[inline(always)]
pub fn remember<A: Family>(key: &AffinityKey<A>, backend_id: u32, now: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = A::affinity().insert(key, &value, 0);
}
