//! Conntrack upkeep from userspace: the GC that frees expired flows (the
//! assured table is not an LRU, so nothing else does; the table of new
//! flows is, but a quiet node would keep its dead flows), and the UDP flush
//! when a backend leaves a service. Both remove a flow's two entries
//! together, from whichever table holds each.
//!
//! Deletion order per flow: the reply entry, then the forward entry, each
//! only if it is still the entry that was judged (same `flow_id`). A
//! packet that recreates the flow in between gets a fresh forward entry
//! that is not touched, or — in the worst case — loses its forward entry
//! and is recreated by its next packet on the same (hash-picked) backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError},
    Pod,
};
use lb_common::{
    ct::{CtKey, CtValue, CT_ASSURED, CT_DIR_FORWARD},
    Ipv4,
};

use super::maps::Wire;
use crate::model::{L4Addr, Proto};

/// A family's address as its conntrack tables hold it (`Ipv4`, `Ipv6`):
/// each family has its own two tables, swept the same way.
pub trait CtAddr: Wire + Ord + Default + std::fmt::Debug + 'static {}
impl<A: Wire + Ord + Default + std::fmt::Debug + 'static> CtAddr for A {}

/// One flow's two keys and the `flow_id` that identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowRef<A = Ipv4> {
    pub forward: CtKey<A>,
    pub reply: CtKey<A>,
    pub flow_id: u32,
}

impl<A: CtAddr> FlowRef<A> {
    pub fn of(key: &CtKey<A>, value: &CtValue<A>) -> Self {
        let peer = key.peer_key(value);
        let (forward, reply) = if key.dir == CT_DIR_FORWARD {
            (*key, peer)
        } else {
            (peer, *key)
        };
        Self {
            forward,
            reply,
            flow_id: value.flow_id,
        }
    }

    /// The service frontend the flow was addressed to.
    pub fn frontend(&self) -> Option<L4Addr> {
        Some(L4Addr {
            addr: self.forward.daddr.ip(),
            port: self.forward.dport,
            proto: Proto::from_number(self.forward.proto)?,
        })
    }
}

/// A flow is over when the entry is expired and its peer is too (or gone).
/// `peer` is whatever the peer key holds: an entry of a newer flow (another
/// `flow_id`) does not count.
pub fn flow_is_expired<A>(value: &CtValue<A>, peer: Option<&CtValue<A>>, now_ns: u64) -> bool {
    value.is_expired(now_ns)
        && peer
            .filter(|p| p.same_flow(value))
            .is_none_or(|p| p.is_expired(now_ns))
}

/// Whether a UDP flush takes the flow of this entry: UDP, to a frontend
/// and backend id the service no longer pairs.
pub fn flush_wants<A: CtAddr>(
    flow: &FlowRef<A>,
    value: &CtValue<A>,
    removed: &BTreeSet<(L4Addr, u32)>,
) -> bool {
    flow.frontend()
        .is_some_and(|f| f.proto == Proto::Udp && removed.contains(&(f, value.backend_id)))
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Entries the sweep left in the assured table (two per flow).
    pub assured: usize,
    /// Entries the sweep left in the table of new flows.
    pub new: usize,
    pub flows_removed: usize,
}

/// The pinned conntrack tables of one family: assured flows, and flows
/// not yet assured.
pub struct Conntrack<A = Ipv4> {
    assured: HashMap<MapData, CtKey<A>, CtValue<A>>,
    new: HashMap<MapData, CtKey<A>, CtValue<A>>,
    /// The same tables, for batch reads.
    assured_fd: OwnedFd,
    new_fd: OwnedFd,
    /// The assured table's size as created (the table that can fill; a
    /// pinned one keeps its size whatever the flags say now).
    pub capacity: u32,
}

/// Both tables read as the datapath sees them: an assured entry shadows a
/// new one on the same key (left by a CPU that updated a flow another was
/// assuring), and carries `CT_ASSURED` whoever wrote it.
pub struct Snapshot<A = Ipv4> {
    pub entries: BTreeMap<CtKey<A>, CtValue<A>>,
    /// Entries in each table.
    pub assured: usize,
    pub new: usize,
    /// Keys of new-table entries an assured entry shadows.
    pub shadowed: Vec<CtKey<A>>,
}

type Entries<'a, A> = Box<dyn Iterator<Item = Result<(CtKey<A>, CtValue<A>), MapError>> + 'a>;

impl<A: CtAddr> Snapshot<A> {
    /// The entries of the table of new flows and of the assured table.
    pub fn of(new: Entries<'_, A>, assured: Entries<'_, A>) -> Result<Self, MapError> {
        let mut entries: BTreeMap<CtKey<A>, CtValue<A>> = new.collect::<Result<_, _>>()?;
        let new = entries.len();
        let (mut count, mut shadowed) = (0, Vec::new());
        for item in assured {
            let (key, mut value) = item?;
            value.flags |= CT_ASSURED;
            if entries.insert(key, value).is_some() {
                shadowed.push(key);
            }
            count += 1;
        }
        Ok(Self {
            entries,
            assured: count,
            new,
            shadowed,
        })
    }
}

impl<A: CtAddr> Conntrack<A>
where
    CtKey<A>: Pod,
    CtValue<A>: Pod,
{
    pub fn new(assured: Map, new: Map) -> Result<Self, MapError> {
        let capacity = match &assured {
            Map::HashMap(data) => data.info()?.max_entries(),
            _ => 0, // refused just below
        };
        let (assured_fd, new_fd) = (super::batch::dup_fd(&assured)?, super::batch::dup_fd(&new)?);
        Ok(Self {
            assured: HashMap::try_from(assured)?,
            new: HashMap::try_from(new)?,
            assured_fd,
            new_fd,
            capacity,
        })
    }

    /// The entry at `key` as the datapath would find it: the assured table
    /// first.
    pub fn get(&self, key: &CtKey<A>) -> Option<CtValue<A>> {
        match self.assured.get(key, 0) {
            Ok(mut value) => {
                value.flags |= CT_ASSURED;
                Some(value)
            }
            Err(_) => self.new.get(key, 0).ok(),
        }
    }

    /// Every entry of both tables (an assured one wins a shared key).
    pub fn entries(&self) -> Result<BTreeMap<CtKey<A>, CtValue<A>>, MapError> {
        Ok(self.snapshot()?.entries)
    }

    fn snapshot(&self) -> Result<Snapshot<A>, MapError> {
        Snapshot::of(Box::new(self.new.iter()), Box::new(self.assured.iter()))
    }

    /// Frees flows whose entries have both expired, and expired new-table
    /// entries an assured one shadows. Streams both tables, a batch at a
    /// time: memory stays a batch's whatever the table holds, and each
    /// entry is judged against its peer as the datapath finds it then.
    pub fn gc(&mut self, now_ns: u64) -> Result<Sweep, MapError> {
        self.sweep(|conntrack, key, value, in_new| {
            if !value.is_expired(now_ns) {
                return Verdict::Keep;
            }
            if in_new && conntrack.assured.get(key, 0).is_ok() {
                return Verdict::Shadowed;
            }
            let peer = conntrack.get(&key.peer_key(value));
            if flow_is_expired(value, peer.as_ref(), now_ns) {
                Verdict::RemoveFlow
            } else {
                Verdict::Keep
            }
        })
    }

    /// Removes the UDP flows of backends that left their frontend.
    pub fn flush_udp(&mut self, removed: &BTreeSet<(L4Addr, u32)>) -> Result<Sweep, MapError> {
        if removed.is_empty() {
            return Ok(Sweep::default());
        }
        self.sweep(|_, key, value, _| {
            if flush_wants(&FlowRef::of(key, value), value, removed) {
                Verdict::RemoveFlow
            } else {
                Verdict::Keep
            }
        })
    }

    /// Walks the assured table, then the new one, and carries out what
    /// `judge` says of each entry (told whether it is in the new table)
    /// after each batch. Deleting between batches is safe: the walk's
    /// cursor is a bucket, not a key.
    fn sweep(
        &mut self,
        mut judge: impl FnMut(&Self, &CtKey<A>, &CtValue<A>, bool) -> Verdict,
    ) -> Result<Sweep, MapError> {
        let mut sweep = Sweep::default();
        let mut flows = Vec::new();
        let mut shadowed = Vec::new();
        for in_new in [false, true] {
            let fd = if in_new {
                &self.new_fd
            } else {
                &self.assured_fd
            };
            let fd = fd.try_clone().map_err(|io_error| aya::sys::SyscallError {
                call: "dup",
                io_error,
            })?;
            let mut batches = super::batch::Batches::<CtKey<A>, CtValue<A>>::new(fd.as_fd());
            let kept = if in_new {
                &mut sweep.new
            } else {
                &mut sweep.assured
            };
            while let Some((keys, values)) = batches.next_batch()? {
                for (key, value) in keys.iter().zip(values) {
                    match judge(self, key, value, in_new) {
                        Verdict::Keep => *kept += 1,
                        Verdict::Shadowed => shadowed.push(*key),
                        Verdict::RemoveFlow => flows.push(FlowRef::of(key, value)),
                    }
                }
                for key in shadowed.drain(..) {
                    super::removed(self.new.remove(&key))?;
                }
                for flow in flows.drain(..) {
                    sweep.flows_removed += usize::from(self.remove_flow(&flow)?);
                }
            }
        }
        Ok(sweep)
    }

    /// Removes a flow's entries, reply first, each from the table that
    /// holds it (the assured one first, as the datapath looks) and only
    /// while it is still that flow's. A stale copy under an assured entry
    /// is left to its own expiry.
    fn remove_flow(&mut self, flow: &FlowRef<A>) -> Result<bool, MapError> {
        let mut removed_any = false;
        for key in [flow.reply, flow.forward] {
            for table in [&mut self.assured, &mut self.new] {
                match table.get(&key, 0) {
                    Ok(v) if v.flow_id == flow.flow_id => {
                        removed_any |= super::removed(table.remove(&key))?;
                        break;
                    }
                    _ => {} // not here, or already another flow on this tuple
                }
            }
        }
        Ok(removed_any)
    }
}

/// What a sweep does with one entry.
enum Verdict {
    Keep,
    /// An expired new-table entry under an assured one: only it goes.
    Shadowed,
    /// The entry's flow goes, both entries.
    RemoveFlow,
}

/// CLOCK_MONOTONIC_COARSE, the datapath's clock (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::ct::CT_DIR_REPLY;

    const SEC: u64 = 1_000_000_000;

    fn flow(
        cport: u16,
        vport: u16,
        proto: u8,
        backend_id: u32,
        expires: (u64, u64),
    ) -> [(CtKey, CtValue); 2] {
        let (client, vip) = ([198, 18, 1, 2], [198, 19, 0, 10]);
        let backend = [198, 18, 10, 2 + backend_id as u8];
        let fkey = CtKey::new(client, cport, vip, vport, proto, CT_DIR_FORWARD);
        let fval = CtValue {
            src_addr: client,
            src_port: cport,
            dst_addr: backend,
            dst_port: 8080,
            backend_id,
            flow_id: 1,
            created_ns: 1,
            expires_ns: expires.0,
            ..CtValue::default()
        };
        let rkey = fkey.peer_key(&fval);
        let rval = CtValue {
            expires_ns: expires.1,
            ..fkey.peer_value(&fval)
        };
        [(fkey, fval), (rkey, rval)]
    }

    #[test]
    fn gc_frees_a_flow_only_when_both_directions_expired() {
        let now = 100 * SEC;
        let mut entries = BTreeMap::new();
        entries.extend(flow(1000, 80, 6, 1, (now - 1, now - 1))); // both idle: free
        entries.extend(flow(1001, 80, 6, 1, (now - 1, now + 5 * SEC))); // replies still flow
        entries.extend(flow(1002, 80, 6, 1, (now + 5 * SEC, now - 1))); // requests still flow
        entries.extend(flow(1003, 80, 6, 1, (now + 1, now + 1))); // live
        let mut orphan = flow(1004, 80, 6, 1, (now - 1, 0));
        orphan[1].0.dir = CT_DIR_REPLY; // keep the shape; drop the reply entry below
        entries.insert(orphan[0].0, orphan[0].1); // forward only, expired: free

        // The sweep's judgement of each entry, against its peer's.
        let planned: BTreeSet<FlowRef> = entries
            .iter()
            .filter(|(k, v)| flow_is_expired(v, entries.get(&k.peer_key(v)), now))
            .map(|(k, v)| FlowRef::of(k, v))
            .collect();
        let ports: Vec<u16> = planned.iter().map(|f| f.forward.sport).collect();
        assert_eq!(ports, vec![1000, 1004]);
        let both = planned.iter().find(|f| f.forward.sport == 1000).unwrap();
        assert_eq!(both.reply.dir, CT_DIR_REPLY);
        assert!(
            entries.contains_key(&both.reply),
            "the reply key is the real entry's"
        );
    }

    #[test]
    fn udp_flush_takes_only_the_removed_backends_flows_of_that_frontend() {
        let mut entries = BTreeMap::new();
        entries.extend(flow(2000, 53, 17, 1, (u64::MAX, u64::MAX))); // removed pair
        entries.extend(flow(2001, 53, 17, 2, (u64::MAX, u64::MAX))); // other backend
        entries.extend(flow(2002, 54, 17, 1, (u64::MAX, u64::MAX))); // other frontend
        entries.extend(flow(2003, 53, 6, 1, (u64::MAX, u64::MAX))); // TCP drains
        let frontend = L4Addr {
            addr: std::net::Ipv4Addr::new(198, 19, 0, 10).into(),
            port: 53,
            proto: Proto::Udp,
        };
        let removed = BTreeSet::from([(frontend, 1)]);
        let planned: BTreeSet<FlowRef> = entries
            .iter()
            .map(|(k, v)| (FlowRef::of(k, v), v))
            .filter(|(flow, v)| flush_wants(flow, v, &removed))
            .map(|(flow, _)| flow)
            .collect();
        assert_eq!(planned.len(), 1, "{planned:?}");
        let flow = planned.first().unwrap();
        assert_eq!(flow.forward.sport, 2000);
        assert!(entries.contains_key(&flow.forward) && entries.contains_key(&flow.reply));
    }
}
