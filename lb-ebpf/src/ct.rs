//! Connection tracking: one lifecycle for both entries of a flow, in two
//! tables (see `lb_common::ct`): a flow begins in `CT_NEW` and moves to
//! `CONNTRACK` when assured. Lookups try the assured table first: the bulk
//! of packets belong to assured flows and pay one lookup.
//!
//! Values are copied out right after each lookup: an entry can be deleted
//! (agent GC, UDP flush, LRU eviction) between two helper calls. A state
//! change is written into the entry in place (another CPU's FIN or RST
//! stays); an entry gone meanwhile is written back whole.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext, EbpfContext};
use lb_common::{
    backend::Backend,
    config::NodeConfig,
    ct::{
        is_closing, CtKey, CtTimeouts, CtValue, CT_ASSURED, CT_DIR_FORWARD, CT_DIR_REPLY,
        CT_FIN_FORWARD, CT_FIN_REPLY, CT_REFRESH_NS, CT_RST, CT_SEEN_REPLY, CT_SNAT,
    },
    stats::Stat,
    svc::SvcKey,
};

use crate::{family::Family, parse::Packet, stats::count};

/// Per-state timeouts; the agent overrides them at load time.
#[unsafe(no_mangle)]
static CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

#[inline(always)]
fn timeouts() -> CtTimeouts {
    // SAFETY: a read-only global; volatile so the agent's value is used,
    // not the compile-time default.
    unsafe { core::ptr::read_volatile(&CT_TIMEOUTS) }
}

/// `reclaim` in one table (`CONNTRACK` or `CT_NEW`): whether the flow
/// holding `reply_key` was expired and is now removed.
macro_rules! reclaim_in {
    ($table:expr, $reply_key:expr, $now:expr) => {{
        // SAFETY: the pointer is valid for this program run; copied at once.
        match $table.get_ptr($reply_key).map(|v| unsafe { *v }) {
            Some(old) if old.is_expired($now) => {
                let peer_key = $reply_key.peer_key(&old);
                // SAFETY: as above.
                let peer = $table
                    .get_ptr(&peer_key)
                    .map(|p| unsafe { *p })
                    .filter(|p| p.same_flow(&old));
                if peer.is_none_or(|p| p.is_expired($now)) && $table.remove($reply_key).is_ok() {
                    if peer.is_some() {
                        let _ = $table.remove(&peer_key);
                    }
                    true
                } else {
                    false
                }
            }
            _ => false,
        }
    }};
}

/// Copies the entry for `key` into `out`, from whichever table holds it;
/// `CT_ASSURED` says which (an entry an older program wrote may lack the
/// flag: the table decides). Whether there was one. Into the caller's
/// value, not returned: an `Option` of an IPv6 entry is one more 72-byte
/// copy on the 512-byte stack.
#[inline(always)]
fn get<A: Family>(key: &CtKey<A>, out: &mut CtValue<A>) -> bool {
    if let Some(v) = A::conntrack().get_ptr(key) {
        // SAFETY: the pointer is valid for this program run (RCU); copied at once.
        *out = unsafe { *v };
        out.flags |= CT_ASSURED;
        return true;
    }
    match A::ct_new().get_ptr(key) {
        Some(v) => {
            // SAFETY: as above.
            *out = unsafe { *v };
            true
        }
        None => false,
    }
}

/// `get` of the other entry of `value`'s flow, at `peer_key`, into `peer`.
/// Both entries of a flow carry its `flow_id`; a peer key held by a newer
/// flow is not ours.
#[inline(always)]
fn get_peer<A: Family>(peer_key: &CtKey<A>, value: &CtValue<A>, peer: &mut CtValue<A>) -> bool {
    get(peer_key, peer) && peer.same_flow(value)
}

/// Writes an entry into the table its state belongs to.
#[inline(always)]
fn put<A: Family>(key: &CtKey<A>, value: &CtValue<A>, flags: u64) -> Result<(), i32> {
    if value.flags & CT_ASSURED != 0 {
        A::conntrack().insert(key, value, flags)
    } else {
        A::ct_new().insert(key, value, flags)
    }
}

/// Removes an entry from the table its state says it is in.
#[inline(always)]
fn remove<A: Family>(key: &CtKey<A>, value: &CtValue<A>) -> Result<(), i32> {
    if value.flags & CT_ASSURED != 0 {
        A::conntrack().remove(key)
    } else {
        A::ct_new().remove(key)
    }
}

/// The clock of `CtValue::expires_ns`: CLOCK_MONOTONIC_COARSE. A tick's
/// resolution (1–10 ms) is plenty for timeouts of seconds, and it costs a
/// fraction of the precise clock (about 35 ns less a packet, measured).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() }
}

/// The entry for `key` copied into `out`, the time it was judged at, and
/// whether its flow is alive: this entry is unexpired, or the other
/// direction is (a one-way stream keeps its idle return path). The clock is
/// read only on a hit: most packets at egress are not replies of a tracked
/// flow.
#[inline(always)]
pub fn lookup<A: Family>(key: &CtKey<A>, out: &mut CtValue<A>) -> Option<(u64, bool)> {
    if !get(key, out) {
        return None;
    }
    let now = now();
    if !out.is_expired(now) {
        return Some((now, true));
    }
    let Some((_, peer)) = A::ct_scratch() else {
        return Some((now, false));
    };
    // SAFETY: this CPU's scratch entry, used by one function at a time.
    let peer = unsafe { &mut *peer };
    let alive = get_peer(&key.peer_key(out), out, peer) && !peer.is_expired(now);
    Some((now, alive))
}

/// `lookup` for a live flow: the time it was judged at.
#[inline(always)]
pub fn lookup_live<A: Family>(key: &CtKey<A>, out: &mut CtValue<A>) -> Option<u64> {
    match lookup(key, out) {
        Some((now, true)) => Some(now),
        _ => None,
    }
}

/// State the packet adds to its flow.
#[inline(always)]
fn flags_of<A>(pkt: &Packet<A>, dir: u8) -> u8 {
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
/// Over: closed, or its backend gone from the backends map (a pod that died
/// without a FIN or RST reaching the client leaves its entries established,
/// and the SYN's retransmits would keep them alive). Checked on SYNs only:
/// one lookup, on a packet that opens a connection anyway.
#[inline(always)]
pub fn is_reopened<A: Family>(value: &CtValue<A>, pkt: &Packet<A>) -> bool {
    pkt.is_tcp_syn()
        && (is_closing(value.flags) || !A::backend_at(value.backend_id, &value.dst_addr))
}

/// Records the packet on its flow: a state change (answer, FIN, RST,
/// assured) is written to both entries with the new state's timeout;
/// otherwise this entry's expiry moves forward at most once per
/// `CT_REFRESH_NS`, and then the other entry is checked and rebuilt if it
/// went missing. The updated entry and its peer are worked on in this
/// CPU's scratch (`Family::ct_scratch`), not on the stack; `value`, the
/// packet's copy, stays as looked up (the verifier walks what follows once,
/// not once per way through here).
#[inline(always)]
pub fn update<A: Family>(key: &CtKey<A>, value: &CtValue<A>, pkt: &Packet<A>, now: u64) {
    let mut flags = value.flags | flags_of(pkt, key.dir);
    if value.assures(key.proto, key.dir, flags, pkt.carries_syn(), now) {
        flags |= CT_ASSURED;
    }
    if flags == value.flags
        && value.expires_ns + CT_REFRESH_NS > now + timeouts().for_state(key.proto, flags)
    {
        return;
    }
    let Some((updated, peer)) = A::ct_scratch() else {
        return;
    };
    // SAFETY: this CPU's scratch entries, used by one function at a time.
    let (updated, peer) = unsafe { (&mut *updated, &mut *peer) };
    let peer_key = key.peer_key(value);
    *updated = *value;
    if !get_peer(&peer_key, value, peer) {
        // Assured only with both entries at hand: the peer key may hold
        // another flow's entry now, which a move would overwrite.
        if value.flags & CT_ASSURED == 0 {
            flags &= !CT_ASSURED;
        }
        updated.flags = flags;
        updated.expires_ns = now + timeouts().for_state(key.proto, flags);
        // Written whole (BPF_ANY): also restores an entry removed meanwhile.
        let _ = put(key, &*updated, 0);
        // Only into a free slot: a newer flow's entry there stays.
        *peer = key.peer_value(updated);
        if put(&peer_key, &*peer, BPF_NOEXIST as u64).is_ok() {
            count(Stat::CtRecreated);
        }
        return;
    }
    // Another CPU assured the flow between our lookups: follow it.
    flags |= peer.flags & CT_ASSURED;
    let peer_was_assured = peer.flags & CT_ASSURED != 0;
    let expires_ns = now + timeouts().for_state(key.proto, flags);
    updated.flags = flags;
    updated.expires_ns = expires_ns;
    // The peer keeps a later expiry of its own unless the flow is over.
    peer.flags = flags;
    if peer.expires_ns <= expires_ns || is_closing(flags) {
        peer.expires_ns = expires_ns;
    }
    if flags & CT_ASSURED != value.flags & CT_ASSURED {
        return promote(key, updated, &peer_key, peer, peer_was_assured);
    }
    if !set_state(key, key.proto, flags, expires_ns, now) {
        let _ = put(key, &*updated, 0);
    }
    if flags != value.flags {
        let _ = set_state(&peer_key, key.proto, flags, peer.expires_ns, now);
    }
}

/// Writes a flow's new state into the entry in place, not the whole value
/// copied at lookup: another CPU's FIN or RST written since stays (flags
/// are added), and then the expiry is the state's it ends with. Whether the
/// entry was there to write. A BPF function of its own (as `family::backend_at_v4`):
/// inlined at both writes it added 6 k to each program's verifier walk.
#[inline(never)]
fn set_state<A: Family>(key: &CtKey<A>, proto: u8, flags: u8, expires_ns: u64, now: u64) -> bool {
    let entry = if flags & CT_ASSURED != 0 {
        A::conntrack().get_ptr_mut(key)
    } else {
        A::ct_new().get_ptr_mut(key)
    };
    let Some(entry) = entry else {
        return false;
    };
    // SAFETY: the pointer is valid for this program run (RCU; a deleted
    // element of the non-preallocated assured table is not reused under
    // it). Not atomic (Rust's BPF target has no fetch-or): the window left
    // is this byte's load and store, no longer the whole program run.
    unsafe {
        let merged = (*entry).flags | flags;
        (*entry).flags = merged;
        (*entry).expires_ns = if merged == flags {
            expires_ns
        } else {
            now + timeouts().for_state(proto, merged)
        };
    }
    true
}

/// Moves a flow that just became assured into the assured table: the other
/// entry first, then this one (so either direction finds the flow there
/// from the first write on), then both out of the table of new flows. If
/// the assured table is full the flow stays where it is, with this packet's
/// state (counted), and its next packet tries again.
#[inline(always)]
fn promote<A: Family>(
    key: &CtKey<A>,
    updated: &mut CtValue<A>,
    peer_key: &CtKey<A>,
    peer: &mut CtValue<A>,
    peer_was_assured: bool,
) {
    if A::conntrack().insert(peer_key, &*peer, 0).is_err() {
        return stay_new(key, updated, peer_key, peer);
    }
    if A::conntrack().insert(key, &*updated, 0).is_err() {
        if !peer_was_assured {
            let _ = A::conntrack().remove(peer_key);
        }
        return stay_new(key, updated, peer_key, peer);
    }
    let _ = A::ct_new().remove(peer_key);
    let _ = A::ct_new().remove(key);
    count(Stat::CtAssured);
}

#[inline(always)]
fn stay_new<A: Family>(
    key: &CtKey<A>,
    updated: &mut CtValue<A>,
    peer_key: &CtKey<A>,
    peer: &mut CtValue<A>,
) {
    updated.flags &= !CT_ASSURED;
    peer.flags &= !CT_ASSURED;
    let _ = A::ct_new().insert(key, &*updated, 0);
    let _ = A::ct_new().insert(peer_key, &*peer, 0);
    count(Stat::CtAssuredFull);
}

/// The forward entry of a new flow to `backend` (not SNATed: the source stays).
#[inline(always)]
pub fn new_forward<A: Family>(
    pkt: &Packet<A>,
    backend: &Backend<A>,
    backend_id: u32,
    rev_nat_id: u16,
    now: u64,
) -> CtValue<A> {
    let flags = flags_of(pkt, CT_DIR_FORWARD);
    CtValue {
        src_addr: pkt.saddr,
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

/// How a new flow's entries were written.
pub enum Created {
    /// This packet's.
    New,
    /// The forward entry was there already (`adopt` settles it).
    Raced,
}

pub enum CreateError {
    /// The table could not take the entry (out of memory: the table of new
    /// flows evicts rather than fills).
    Full,
    /// The reply tuple is another flow's (only with `BPF_NOEXIST`).
    Taken,
}

const EEXIST: i32 = 17;

/// Records a new flow, in the table of new flows: the reply entry first, so
/// the backend's first answer always finds it, then the forward entry. If
/// the forward entry cannot be written, the reply entry is removed again:
/// no half flows. `reply_flags` `BPF_NOEXIST` claims the reply tuple only
/// if it is free in both tables (checked after the write, so a flow being
/// assured meanwhile — written there before it leaves here — is seen).
/// The forward entry is claimed too (`BPF_NOEXIST`): `Created::Raced` when
/// it was there already, this packet's reply entry still written.
#[inline(always)]
pub fn create<A: Family>(
    pkt: &Packet<A>,
    forward: &CtValue<A>,
    reply_flags: u64,
) -> Result<Created, CreateError> {
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let reply_key = forward_key.peer_key(forward);
    let new = A::ct_new();
    // The reply entry is built in scratch: on the stack, with the new-flow
    // program's and a log call's, IPv6 passed 512 bytes.
    let Some((_, reply)) = A::ct_scratch() else {
        return Err(CreateError::Full);
    };
    // SAFETY: this CPU's scratch entry, used by one function at a time.
    let reply = unsafe { &mut *reply };
    *reply = forward_key.peer_value(forward);
    if let Err(e) = new.insert(&reply_key, &*reply, reply_flags) {
        return Err(if e == -EEXIST {
            CreateError::Taken
        } else {
            CreateError::Full
        });
    }
    if reply_flags == BPF_NOEXIST as u64 && A::conntrack().get_ptr(&reply_key).is_some() {
        let _ = new.remove(&reply_key);
        return Err(CreateError::Taken);
    }
    match new.insert(&forward_key, forward, BPF_NOEXIST as u64) {
        Ok(()) => Ok(Created::New),
        Err(e) if e == -EEXIST => Ok(Created::Raced),
        Err(_) => {
            let _ = new.remove(&reply_key);
            Err(CreateError::Full)
        }
    }
}

/// The forward entry was there already: another CPU created the flow
/// between this packet's lookup and its write (two sends on one socket at
/// once, as glibc's parallel A and AAAA queries). Its flow wins and
/// `forward` becomes it; this packet's reply entry goes, or, on the
/// winner's reply tuple (same backend, not SNATed), is written back as the
/// winner's. An entry found expired (a flow over, not yet collected) is
/// replaced instead. Settled once, after the SNAT port tries: inside each
/// try it doubled the verifier's walk of the external program.
#[inline(always)]
pub fn adopt<A: Family>(pkt: &Packet<A>, forward: &mut CtValue<A>) {
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let Some((winner, reply)) = A::ct_scratch() else {
        return;
    };
    // SAFETY: this CPU's scratch entries, used by one function at a time.
    let (winner, reply) = unsafe { (&mut *winner, &mut *reply) };
    if !get(&forward_key, winner) || winner.is_expired(forward.created_ns) {
        let _ = A::ct_new().insert(&forward_key, &*forward, 0);
        return;
    }
    // Both reply keys are the forward key's translations reversed: equal
    // when the translations are.
    if !same_translation(winner, forward) {
        let _ = A::ct_new().remove(&forward_key.peer_key(forward));
    } else if winner.flags & CT_ASSURED == 0 {
        *reply = forward_key.peer_value(winner);
        let _ = A::ct_new().insert(&forward_key.peer_key(winner), &*reply, 0);
    }
    *forward = *winner;
    count(Stat::CtCreateRaced);
}

/// Both entries translate to the same tuple (by `Family::same`: see there
/// why not `==`).
#[inline(always)]
fn same_translation<A: Family>(a: &CtValue<A>, b: &CtValue<A>) -> bool {
    a.src_addr.same(&b.src_addr)
        && a.dst_addr.same(&b.dst_addr)
        && (a.src_port, a.dst_port) == (b.src_port, b.dst_port)
}

/// Retires a flow whose tuple a new connection reuses (`is_reopened`), so
/// the new flow's entries are not shadowed by the old ones in the assured
/// table. A SNATed flow's reply entry stays: it holds its SNAT port for the
/// backend's TIME_WAIT.
#[inline(always)]
pub fn retire<A: Family>(forward_key: &CtKey<A>, entry: &CtValue<A>) {
    let _ = remove(forward_key, entry);
    if entry.flags & CT_SNAT == 0 {
        let Some((_, reply)) = A::ct_scratch() else {
            return;
        };
        // SAFETY: as in `lookup`.
        let reply = unsafe { &mut *reply };
        let reply_key = forward_key.peer_key(entry);
        if get_peer(&reply_key, entry, reply) {
            let _ = remove(&reply_key, &*reply);
        }
    }
}

/// SNAT ports tried per new flow: first only free ones, then also ones an
/// expired flow holds. (Two loops, not one with a condition: the verifier
/// walks each try's paths once per try, and a reclaim in every try of one
/// loop doubles its work for the whole program.)
const SNAT_TRIES_FREE: u32 = 24;
const SNAT_TRIES_RECLAIM: u32 = 8;

/// Records a new flow SNATed to the node: the source port is claimed with
/// the reply tuple itself (`BPF_NOEXIST`), so two flows never share one,
/// even when CPUs race. Ports are tried at random; in the last tries, a
/// port of an expired flow the GC has not removed yet is taken back
/// (`reclaim`).
#[inline(always)]
pub fn create_snat<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    forward: &mut CtValue<A>,
    config: &NodeConfig<A>,
    now: u64,
) -> Result<Created, Stat> {
    if config.snat_addr.is_unspecified() || config.snat_port_last < config.snat_port_first {
        return Err(Stat::DropSnatExhausted);
    }
    let first = u32::from(config.snat_port_first);
    let span = u32::from(config.snat_port_last) - first + 1;
    forward.src_addr = config.snat_addr;
    forward.flags |= CT_SNAT;
    let mut i = 0;
    while i < SNAT_TRIES_FREE {
        if let Some(done) = try_snat_port(ctx, pkt, forward, first, span) {
            return done;
        }
        i += 1;
    }
    let forward_key = pkt.ct_key(CT_DIR_FORWARD);
    let mut i = 0;
    while i < SNAT_TRIES_RECLAIM {
        if let Some(done) = try_snat_port(ctx, pkt, forward, first, span) {
            return done;
        }
        if reclaim(&forward_key.peer_key(forward), now) {
            match create(pkt, forward, BPF_NOEXIST as u64) {
                Ok(created) => return Ok(created),
                Err(CreateError::Full) => return Err(Stat::DropCtFull),
                Err(CreateError::Taken) => {}
            }
        }
        i += 1;
    }
    Err(Stat::DropSnatExhausted)
}

/// One random port in `first..first + span`: `None` if it is taken (held by
/// a flow, another CPU claimed it first, a node port on the SNAT address,
/// whose packets are a frontend's, or a port a node socket would take the
/// flow's answers on), else the outcome.
#[inline(always)]
fn try_snat_port<A: Family>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    forward: &mut CtValue<A>,
    first: u32,
    span: u32,
) -> Option<Result<Created, Stat>> {
    // An independent random port each try: probes in a fixed stride
    // would follow the runs earlier flows already filled.
    // SAFETY: a helper without arguments.
    let port = first + unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } % span;
    forward.src_port = port as u16;
    let ports = u32::from(forward.dst_port) << 16 | port;
    let frontend = SvcKey::new(forward.src_addr, forward.src_port, pkt.proto, 0);
    if A::services().get_ptr(&frontend).is_some()
        || A::host_receives(
            ctx.as_ptr(),
            pkt.proto,
            &forward.dst_addr,
            &forward.src_addr,
            ports,
        )
    {
        return None;
    }
    match create(pkt, forward, BPF_NOEXIST as u64) {
        Ok(created) => Some(Ok(created)),
        Err(CreateError::Full) => Some(Err(Stat::DropCtFull)),
        Err(CreateError::Taken) => None,
    }
}

/// Frees a SNAT reply tuple held by a flow whose entries have both expired
/// but that the agent's GC has not removed yet. (A closed TCP flow keeps its
/// port for `tcp_snat_closing_ns`, the backend's TIME_WAIT.) The delete
/// decides races: one CPU removes the entry, and only then may claim the
/// tuple with `BPF_NOEXIST`. Each table on its own: a flow's entries are
/// in one table (a move writes both into the other before it removes
/// them), and the verifier's work for a try stays small.
#[inline(always)]
fn reclaim<A: Family>(reply_key: &CtKey<A>, now: u64) -> bool {
    let reclaimed =
        reclaim_in!(A::conntrack(), reply_key, now) || reclaim_in!(A::ct_new(), reply_key, now);
    if reclaimed {
        count(Stat::CtReclaimed);
    }
    reclaimed
}

/// Whether the service flow behind a reply entry is still open: its forward
/// entry exists, the connection is not over, and it points at the replying
/// backend.
#[inline(always)]
pub fn forward_is_open<A: Family>(
    reply_key: &CtKey<A>,
    reply: &CtValue<A>,
    pkt: &Packet<A>,
) -> bool {
    let mut fwd = CtValue::default();
    get(&reply_key.peer_key(reply), &mut fwd)
        && !is_closing(fwd.flags)
        && fwd.dst_addr.same(&pkt.saddr)
        && fwd.dst_port.to_be() == pkt.sport_be
}

/// Removes the entry at `key`, whichever table holds it.
#[inline(always)]
pub fn forget<A: Family>(key: &CtKey<A>) {
    let _ = A::conntrack().remove(key);
    let _ = A::ct_new().remove(key);
}

impl<A: Family> Packet<A> {
    /// The conntrack key of this packet's tuple.
    #[inline(always)]
    pub fn ct_key(&self, dir: u8) -> CtKey<A> {
        CtKey::new(
            self.saddr,
            u16::from_be(self.sport_be),
            self.daddr,
            u16::from_be(self.dport_be),
            self.proto,
            dir,
        )
    }

    /// The key of the frontend (slot 0) or a slot this packet is addressed to.
    #[inline(always)]
    pub fn svc_key(&self, slot: u16) -> SvcKey<A> {
        SvcKey::new(self.daddr, u16::from_be(self.dport_be), self.proto, slot)
    }
}
