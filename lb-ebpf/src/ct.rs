//! Connection tracking: lookups that honour timeouts, and flow creation.

use lb_common::ct::{CtKey, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_REFRESH_NS};

use crate::{maps::CONNTRACK, parse::Packet};

/// The entry for `key` unless it has expired (an expired entry is a miss and
/// is overwritten by the next new flow on the same tuple).
#[inline(always)]
pub fn lookup_live(key: &CtKey, proto: u8, now: u64) -> Option<*mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    if unsafe { (*entry).is_expired(proto, now) } {
        None
    } else {
        Some(entry)
    }
}

/// A new SYN on a tuple whose connection was closing starts a new flow, so a
/// reused client port gets a current backend, not the old connection's.
#[inline(always)]
pub fn is_reopened(entry: *mut CtValue, pkt: &Packet) -> bool {
    pkt.is_tcp_syn() && unsafe { (*entry).flags } & CT_FLAG_CLOSING != 0
}

/// Refreshes the entry's age (at most once per `CT_REFRESH_NS`) and notes TCP
/// teardown so the entry ages out quickly.
#[inline(always)]
pub fn touch(entry: *mut CtValue, pkt: &Packet, now: u64) {
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        if pkt.is_tcp_closing() && (*entry).flags & CT_FLAG_CLOSING == 0 {
            (*entry).flags |= CT_FLAG_CLOSING;
            (*entry).last_seen_ns = now;
        }
    }
}

/// Records a new flow: the reply entry first, so the backend's first answer
/// always finds it, then the forward entry.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    backend_addr_be: u32,
    backend_port_be: u16,
    backend_id: u32,
    rev_nat_id: u16,
    now: u64,
) -> Result<(), i32> {
    let flags = if pkt.is_tcp_closing() {
        CT_FLAG_CLOSING
    } else {
        0
    };
    let reply_key = CtKey {
        saddr_be: backend_addr_be,
        daddr_be: pkt.saddr_be,
        sport_be: backend_port_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let reply = CtValue {
        nat_addr_be: pkt.daddr_be,
        nat_port_be: pkt.dport_be,
        rev_nat_id,
        backend_id,
        flags,
        created_ns: now,
        last_seen_ns: now,
    };
    CONNTRACK.insert(&reply_key, &reply, 0)?;
    let forward_key = CtKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    let forward = CtValue {
        nat_addr_be: backend_addr_be,
        nat_port_be: backend_port_be,
        ..reply
    };
    CONNTRACK.insert(&forward_key, &forward, 0)
}

/// Whether the service flow behind a reply entry is still open: its forward
/// entry exists, is not closing, and points at the replying backend.
#[inline(always)]
pub fn forward_is_open(reply: *mut CtValue, pkt: &Packet) -> bool {
    let (vip, vport) = unsafe { ((*reply).nat_addr_be, (*reply).nat_port_be) };
    let key = CtKey {
        saddr_be: pkt.daddr_be,
        daddr_be: vip,
        sport_be: pkt.dport_be,
        dport_be: vport,
        proto: pkt.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    match CONNTRACK.get_ptr(&key) {
        Some(fwd) => unsafe {
            (*fwd).flags & CT_FLAG_CLOSING == 0
                && (*fwd).nat_addr_be == pkt.saddr_be
                && (*fwd).nat_port_be == pkt.sport_be
        },
        None => false,
    }
}

#[inline(always)]
pub fn forget(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}
