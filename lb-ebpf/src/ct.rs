//! Connection tracking: one lifecycle for both entries of a flow.
//!
//! Values are copied out right after each lookup and written back whole:
//! an entry can be deleted (agent GC, UDP flush) between two helper calls.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    backend::Backend,
    config::NodeConfig,
    ct::{
        is_closing, CtKey, CtTimeouts, CtValue, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FIN_FORWARD,
        CT_FIN_REPLY, CT_REFRESH_NS, CT_RST, CT_SEEN_REPLY, CT_SNAT,
    },
    ipv4,
    stats::Stat,
    svc::SvcKey,
};

use crate::{
    maps::{CONNTRACK, SERVICES},
    parse::Packet,
    stats::count,
};

/// Per-state timeouts; the agent overrides them at load time.
#[unsafe(no_mangle)]
static CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

#[inline(always)]
fn timeouts() -> CtTimeouts {
    // SAFETY: a read-only global; volatile so the agent's value is used,
    // not the compile-time default.
    unsafe { core::ptr::read_volatile(&CT_TIMEOUTS) }
}

#[inline(always)]
fn get(key: &CtKey) -> Option<CtValue> {
    // SAFETY: the pointer is valid for this program run (RCU); copied at once.
    CONNTRACK.get_ptr(key).map(|v| unsafe { *v })
}

/// The other entry of `value`'s flow, if it exists. Both entries of a flow
/// carry its `flow_id`; a peer key held by a newer flow is not ours.
#[inline(always)]
fn peer_of(key: &CtKey, value: &CtValue) -> Option<(CtKey, CtValue)> {
    let peer_key = key.peer_key(value);
    get(&peer_key)
        .filter(|p| p.same_flow(value))
        .map(|p| (peer_key, p))
}

/// The clock of `CtValue::expires_ns`: CLOCK_MONOTONIC_COARSE. A tick's
/// resolution (1–10 ms) is plenty for timeouts of seconds, and it costs a
/// fraction of the precise clock (about 35 ns less a packet, measured).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() }
}

/// The entry for `key` and the time it was judged at, if its flow is alive:
/// this entry is unexpired, or the other direction is (a one-way stream
/// keeps its idle return path). The clock is read only on a hit: most
/// packets at egress are not replies of a tracked flow.
#[inline(always)]
pub fn lookup_flow(key: &CtKey) -> Option<(CtValue, u64)> {
    let value = get(key)?;
    let now = now();
    if !value.is_expired(now) {
        return Some((value, now));
    }
    let (_, peer) = peer_of(key, &value)?;
    if peer.is_expired(now) {
        None
    } else {
        Some((value, now))
    }
}

/// State the packet adds to its flow.
#[inline(always)]
fn flags_of(pkt: &Packet, dir: u8) -> u8 {
    let mut flags = if dir == CT_DIR_REPLY {
        CT_SEEN_REPLY
    } else {
        0
    };
    if pkt.is_tcp_rst() {
        flags |= CT_RST;
    }
    if pkt.is_tcp_fin() {
        flags |= if dir == CT_DIR_FORWARD {
            CT_FIN_FORWARD
        } else {
            CT_FIN_REPLY
        };
    }
    flags
}

/// A new SYN on a tuple whose connection is over starts a new flow, so a
/// reused client port gets a current backend, not the old connection's.
#[inline(always)]
pub fn is_reopened(value: &CtValue, pkt: &Packet) -> bool {
    pkt.is_tcp_syn() && is_closing(value.flags)
}

/// Records the packet on its flow: a state change (answer, FIN, RST) is
/// written to both entries with the new state's timeout; otherwise this
/// entry's expiry moves forward at most once per `CT_REFRESH_NS`, and then
/// the other entry is checked and rebuilt if it went missing.
#[inline(always)]
pub fn update(key: &CtKey, value: &CtValue, pkt: &Packet, now: u64) {
    let flags = value.flags | flags_of(pkt, key.dir);
    let timeout = timeouts().for_state(key.proto, flags);
    let expires_ns = now + timeout;
    let changed = flags != value.flags;
    if !changed && value.expires_ns + CT_REFRESH_NS > expires_ns {
        return;
    }
    let updated = CtValue {
        flags,
        expires_ns,
        ..*value
    };
    // Written whole (BPF_ANY): also restores an entry removed meanwhile.
    let _ = CONNTRACK.insert(key, &updated, 0);
    match peer_of(key, &updated) {
        Some((peer_key, peer)) if changed => {
            let peer = CtValue {
                flags,
                expires_ns: if peer.expires_ns > expires_ns && !is_closing(flags) {
                    peer.expires_ns
                } else {
                    expires_ns
                },
                ..peer
            };
            let _ = CONNTRACK.insert(&peer_key, &peer, 0);
        }
        Some(_) => {}
        None => {
            // Only into a free slot: a newer flow's entry there stays.
            if CONNTRACK
                .insert(
                    &key.peer_key(&updated),
                    &key.peer_value(&updated),
                    BPF_NOEXIST as u64,
                )
                .is_ok()
            {
                count(Stat::CtRecreated);
            }
        }
    }
}

/// The forward entry of a new flow to `backend` (not SNATed: the source stays).
#[inline(always)]
pub fn new_forward(
    pkt: &Packet,
    backend: &Backend,
    backend_id: u32,
    rev_nat_id: u16,
    now: u64,
) -> CtValue {
    let flags = flags_of(pkt, CT_DIR_FORWARD);
    CtValue {
        src_addr: ipv4(pkt.saddr_be),
        dst_addr: backend.addr,
        src_port: u16::from_be(pkt.sport_be),
        dst_port: backend.port,
        rev_nat_id,
        flags,
        _pad: 0,
        backend_id,
        // Random, not the clock: two flows on one tuple created within a
        // tick of the coarse clock (a port reused right after an RST) must
        // differ, and the precise clock costs ≈ 35 ns.
        // SAFETY: a helper without arguments.
        flow_id: unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() },
        created_ns: now,
        expires_ns: now + timeouts().for_state(pkt.proto, flags),
    }
}

pub enum CreateError {
    /// The table is full.
    Full,
    /// The reply tuple is another flow's (only with `BPF_NOEXIST`).
    Taken,
}

const EEXIST: i32 = 17;

/// Records a new flow: the reply entry first, so the backend's first answer
/// always finds it, then the forward entry. If the forward entry cannot be
/// written (table full), the reply entry is removed again: no half flows.
/// `reply_flags` `BPF_NOEXIST` claims the reply tuple only if it is free.
#[inline(always)]
pub fn create(pkt: &Packet, forward: &CtValue, reply_flags: u64) -> Result<(), CreateError> {
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let reply_key = forward_key.peer_key(forward);
    if let Err(e) = CONNTRACK.insert(&reply_key, &forward_key.peer_value(forward), reply_flags) {
        return Err(if e == -EEXIST {
            CreateError::Taken
        } else {
            CreateError::Full
        });
    }
    if CONNTRACK.insert(&forward_key, forward, 0).is_err() {
        let _ = CONNTRACK.remove(&reply_key);
        return Err(CreateError::Full);
    }
    Ok(())
}

/// SNAT ports tried per new flow.
const SNAT_TRIES: u32 = 32;

/// Records a new flow SNATed to the node: the source port is claimed with
/// the reply tuple itself (`BPF_NOEXIST`), so two flows never share one,
/// even when CPUs race. Ports are tried at random; in the second half of
/// the tries, a port of an expired flow the GC has not removed yet
/// is taken back (`reclaim`).
#[inline(always)]
pub fn create_snat(
    pkt: &Packet,
    forward: &mut CtValue,
    config: &NodeConfig,
    now: u64,
) -> Result<(), Stat> {
    if lb_common::wire(config.snat_addr) == 0 || config.snat_port_last < config.snat_port_first {
        return Err(Stat::DropSnatExhausted);
    }
    let first = u32::from(config.snat_port_first);
    let span = u32::from(config.snat_port_last) - first + 1;
    forward.src_addr = config.snat_addr;
    forward.flags |= CT_SNAT;
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let mut i = 0;
    while i < SNAT_TRIES {
        // An independent random port each try: probes in a fixed stride
        // would follow the runs earlier flows already filled.
        // SAFETY: a helper without arguments.
        let port = first + unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } % span;
        forward.src_port = port as u16;
        // Not a node port on the SNAT address: its packets are a frontend's.
        let frontend = SvcKey::new(forward.src_addr, forward.src_port, pkt.proto, 0);
        if SERVICES.get_ptr(&frontend).is_some() {
            i += 1;
            continue;
        }
        // Held by a live flow, or another CPU took it first: the next one.
        // After half the tries, a port of an expired flow is taken back.
        match create(pkt, forward, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(()),
            Err(CreateError::Full) => return Err(Stat::DropCtFull),
            Err(CreateError::Taken) => {}
        }
        if i >= SNAT_TRIES / 2 && reclaim(&forward_key.peer_key(forward), now) {
            match create(pkt, forward, BPF_NOEXIST as u64) {
                Ok(()) => return Ok(()),
                Err(CreateError::Full) => return Err(Stat::DropCtFull),
                Err(CreateError::Taken) => {}
            }
        }
        i += 1;
    }
    Err(Stat::DropSnatExhausted)
}

/// Frees a SNAT reply tuple held by a flow whose entries have both expired
/// but that the agent's GC has not removed yet. (A closed TCP flow keeps its
/// port for `tcp_snat_closing_ns`, the backend's TIME_WAIT.) The delete
/// decides races: one CPU removes the entry, and only then may claim the
/// tuple with `BPF_NOEXIST`.
#[inline(always)]
fn reclaim(reply_key: &CtKey, now: u64) -> bool {
    let Some(old) = get(reply_key) else {
        return false;
    };
    let peer = peer_of(reply_key, &old);
    let expired = old.is_expired(now) && peer.is_none_or(|(_, p)| p.is_expired(now));
    if !expired || CONNTRACK.remove(reply_key).is_err() {
        return false;
    }
    if let Some((peer_key, _)) = peer {
        let _ = CONNTRACK.remove(&peer_key);
    }
    count(Stat::CtReclaimed);
    true
}

/// Whether the service flow behind a reply entry is still open: its forward
/// entry exists, the connection is not over, and it points at the replying
/// backend.
#[inline(always)]
pub fn forward_is_open(reply_key: &CtKey, reply: &CtValue, pkt: &Packet) -> bool {
    match get(&reply_key.peer_key(reply)) {
        Some(fwd) => {
            !is_closing(fwd.flags)
                && lb_common::wire(fwd.dst_addr) == pkt.saddr_be
                && fwd.dst_port.to_be() == pkt.sport_be
        }
        None => false,
    }
}

#[inline(always)]
pub fn forget(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}

impl Packet {
    /// The conntrack key of this packet's tuple.
    #[inline(always)]
    pub fn ct_key(&self, dir: u8) -> CtKey {
        CtKey::new(
            ipv4(self.saddr_be),
            u16::from_be(self.sport_be),
            ipv4(self.daddr_be),
            u16::from_be(self.dport_be),
            self.proto,
            dir,
        )
    }

    /// The key of the frontend (slot 0) or a slot this packet is addressed to.
    #[inline(always)]
    pub fn svc_key(&self, slot: u16) -> SvcKey {
        SvcKey::new(
            ipv4(self.daddr_be),
            u16::from_be(self.dport_be),
            self.proto,
            slot,
        )
    }
}
