//! Desired frontends → map writes, in two steps kept apart:
//!
//! - `plan` (pure) diffs the desired state against what the agent knows the
//!   maps hold and returns the ordered writes (`Op`s);
//! - `apply` performs them one by one and updates that knowledge after each
//!   write that succeeded — so after a failure it is still exact, and the
//!   next plan (the retry) starts from what really is in the maps.
//!
//! Write order per frontend, so no packet sees a half-written service:
//! backends → slots 1..N → reverse NAT → slot 0 (count) last; when the count
//! shrinks (judged against the count slot 0 really holds), slot 0 first,
//! then the tail slots are deleted. Removed frontends lose slot 0 first.
//! A Maglev frontend's new table is written into its other table before
//! slot 0 switches to it; the old one is deleted after.
//! Backends no slot refers to are deleted last. When one write of a frontend
//! fails, its later writes are skipped (they depend on the earlier ones).

pub mod ids;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

use ipnet::Ipv4Net;
use lb_common::{
    maglev::MAGLEV_REMOTE,
    svc::{SvcValue, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV, SVC_FLAG_MAGLEV_TABLE_1},
};

use crate::{
    datapath::{
        maps::{LbMaps, MapWriteError},
        udp_reset::LeftBackend,
    },
    desired::{Changes, Desired},
    model::{FrontendKind, L4Addr, Proto, ServiceName},
    reconcile::ids::IdAllocator,
};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        backend: L4Addr,
    },
    PutSlot {
        frontend: L4Addr,
        slot: u16,
        backend_id: u32,
    },
    PutRevNat {
        frontend: L4Addr,
        id: u16,
        owner: ServiceName,
    },
    /// Slot 0 (`backend_id` 0): publishes `head.count` slots.
    PutCount {
        frontend: L4Addr,
        head: SvcValue,
    },
    /// Slot 0 is the frontend itself.
    DeleteSlot {
        frontend: L4Addr,
        slot: u16,
    },
    DeleteRevNat {
        id: u16,
    },
    DeleteBackend {
        id: u32,
    },
    /// Session affinity may lead to `backend_id` from this frontend.
    PutAffinityMatch {
        frontend: L4Addr,
        rev_nat_id: u16,
        backend_id: u32,
        local: bool,
    },
    /// Clients in `range` may open flows to this frontend.
    PutSourceRange {
        frontend: L4Addr,
        rev_nat_id: u16,
        range: Ipv4Net,
    },
    /// `frontend` is `None` for an entry no frontend owns.
    DeleteSourceRange {
        frontend: Option<L4Addr>,
        rev_nat_id: u16,
        range: Ipv4Net,
    },
    /// `frontend` is `None` for an entry no frontend owns.
    DeleteAffinityMatch {
        frontend: Option<L4Addr>,
        rev_nat_id: u16,
        backend_id: u32,
    },
    /// Fills Maglev table `table` (0 or 1) of the frontend.
    PutMaglev {
        frontend: L4Addr,
        rev_nat_id: u16,
        table: u16,
        entries: Arc<[u32]>,
    },
    /// `frontend` is `None` for a table no frontend owns.
    DeleteMaglev {
        frontend: Option<L4Addr>,
        rev_nat_id: u16,
        table: u16,
        chunks: u32,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutBackend { id, backend } => write!(f, "put backend {id} {backend}"),
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => write!(f, "put slot {frontend}#{slot} backend={backend_id}"),
            Op::PutRevNat {
                frontend,
                id,
                owner,
            } => write!(f, "put revnat {id} {frontend} {owner}"),
            Op::PutCount { frontend, head } => write!(
                f,
                "put slot {frontend}#0 count={} local={} flags={:#x}",
                head.count, head.local_count, head.flags
            ),
            Op::DeleteSlot { frontend, slot } => write!(f, "del slot {frontend}#{slot}"),
            Op::DeleteRevNat { id } => write!(f, "del revnat {id}"),
            Op::DeleteBackend { id } => write!(f, "del backend {id}"),
            Op::PutAffinityMatch {
                rev_nat_id,
                backend_id,
                local,
                ..
            } => write!(
                f,
                "put affinity match {rev_nat_id}/{backend_id} local={local}"
            ),
            Op::DeleteAffinityMatch {
                rev_nat_id,
                backend_id,
                ..
            } => write!(f, "del affinity match {rev_nat_id}/{backend_id}"),
            Op::PutSourceRange {
                rev_nat_id, range, ..
            } => write!(f, "put source range {rev_nat_id}/{range}"),
            Op::DeleteSourceRange {
                rev_nat_id, range, ..
            } => write!(f, "del source range {rev_nat_id}/{range}"),
            Op::PutMaglev {
                rev_nat_id,
                table,
                entries,
                ..
            } => write!(
                f,
                "put maglev {rev_nat_id}/{table} entries={}",
                entries.len()
            ),
            Op::DeleteMaglev {
                rev_nat_id, table, ..
            } => write!(f, "del maglev {rev_nat_id}/{table}"),
        }
    }
}

/// The writes for one frontend, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub frontend: L4Addr,
    /// The desired owner; `None` when the frontend is being removed.
    pub service: Option<ServiceName>,
    pub rev_nat_id: u16,
    pub is_new: bool,
    pub ops: Vec<Op>,
    /// UDP backends this frontend stops using (their flows get flushed,
    /// their connected sockets reset): id and address.
    pub udp_removed: Vec<(u32, L4Addr)>,
}

/// Everything one pass writes: new backends, then each frontend's writes.
/// Unreferenced backends are planned after these ran (`plan_prune`).
#[derive(Debug, Default)]
pub struct Plan {
    pub backends: Vec<Op>,
    pub frontends: Vec<FrontendPlan>,
    /// Reverse-NAT entries no frontend uses (left by an interrupted agent).
    pub orphans: Vec<Op>,
    pub unchanged: usize,
    pub kept: usize,
    /// Frontends left out: no id was free for them (the map is full).
    pub skipped: Vec<(ServiceName, L4Addr, MapWriteError)>,
}

/// Entries in the maps the reconciler writes, and what they serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    /// Services owning at least one frontend.
    pub services: usize,
    pub frontends: BTreeMap<FrontendKind, usize>,
    pub service_entries: usize,
    pub backends: usize,
    pub revnat: usize,
    pub affinity_matches: usize,
    pub source_ranges: usize,
    pub maglev_chunks: usize,
}

/// A backend in the map and how many slots refer to it.
#[derive(Clone, Copy, Debug)]
struct BackendEntry {
    addr: L4Addr,
    refs: u32,
}

/// What the maps hold for one frontend, as far as this agent wrote or read.
#[derive(Clone, Debug, Default)]
struct Written {
    /// The owner stored with the reverse-NAT entry (`None`: unknown).
    service: Option<ServiceName>,
    rev_nat_id: Option<u16>,
    /// The reverse-NAT entry holds this frontend and `service`.
    revnat_written: bool,
    /// Slot 0, if it exists.
    head: Option<SvcValue>,
    /// Slots 1.. → backend id.
    slots: Slots,
    /// Affinity match entries: backend id → runs on this node.
    affinity: BTreeMap<u32, bool>,
    /// Source-range entries.
    source_ranges: BTreeSet<Ipv4Net>,
    /// What Maglev tables 0 and 1 hold (a table read back at restore is
    /// padded to whole chunks).
    maglev: [Option<Arc<[u32]>>; 2],
}

impl Written {
    /// The published Maglev table, when it is the one `head` over `ids`
    /// would get: the table is a function of the backends (their ids in
    /// slot order), the local count and the size, so an unchanged frontend
    /// is not filled again on every pass.
    fn live_maglev_table(&self, ids: &[u32], head: &SvcValue) -> Option<Arc<[u32]>> {
        let live = self.head.filter(|h| {
            h.flags & SVC_FLAG_MAGLEV != 0
                && h.maglev_table_size == head.maglev_table_size
                && h.local_count == head.local_count
                && h.count == head.count
        })?;
        if !self.slots.ids().eq(ids.iter().copied()) {
            return None;
        }
        let table = self.maglev[usize::from(maglev_table(&live))].as_ref()?;
        let size = head.maglev_table_size as usize;
        // A table read back at restore is whole chunks, longer than its size.
        match table.len() {
            len if len == size => Some(Arc::clone(table)),
            len if len > size => Some(Arc::from(&table[..size])),
            _ => None,
        }
    }
}

/// A write that failed, and what it was for.
#[derive(Clone, Debug)]
pub struct ApplyError {
    /// e.g. `Service shop/web frontend 198.19.0.10:80/TCP`.
    pub target: String,
    pub op: Option<String>,
    pub error: MapWriteError,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Some(op) => write!(f, "{}: {op}: {}", self.target, self.error),
            None => write!(f, "{}: {}", self.target, self.error),
        }
    }
}

/// Slots 1.. → backend id, as a dense vector (slot `n` at index `n - 1`,
/// 0 where a slot is not written: backend ids start at 1). Slots are dense
/// in practice, and a vector is a fifth of an ordered map's size.
#[derive(Clone, Debug, Default)]
struct Slots(Vec<u32>);

impl Slots {
    fn get(&self, slot: u16) -> Option<u32> {
        self.0
            .get(usize::from(slot).checked_sub(1)?)
            .copied()
            .filter(|id| *id != 0)
    }

    /// Writes `slot`; returns the id it held.
    fn insert(&mut self, slot: u16, id: u32) -> Option<u32> {
        let index = usize::from(slot) - 1;
        if self.0.len() <= index {
            self.0.resize(index + 1, 0);
        }
        let old = std::mem::replace(&mut self.0[index], id);
        (old != 0).then_some(old)
    }

    /// Clears `slot`; returns the id it held.
    fn remove(&mut self, slot: u16) -> Option<u32> {
        let index = usize::from(slot).checked_sub(1)?;
        let old = std::mem::replace(self.0.get_mut(index)?, 0);
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
        (old != 0).then_some(old)
    }

    /// The written slots' numbers.
    fn numbers(&self) -> impl Iterator<Item = u16> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != 0)
            .map(|(i, _)| i as u16 + 1)
    }

    /// The backend ids the written slots hold.
    fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied().filter(|id| *id != 0)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub kept: usize,
    pub errors: Vec<ApplyError>,
    /// Backends UDP frontends no longer use: their conntrack flows are to be
    /// flushed and their connected sockets reset, so clients move to a live
    /// backend.
    pub udp_backends_removed: Vec<LeftBackend>,
}

pub struct Reconciler<M> {
    maps: M,
    written: BTreeMap<L4Addr, Written>,
    /// Every backend entry in the map.
    backend_entries: BTreeMap<u32, BackendEntry>,
    /// The id used for each backend address (one per address).
    backends: BTreeMap<L4Addr, u32>,
    backend_ids: IdAllocator,
    max_backends: u32,
    rev_nat_ids: IdAllocator,
    /// Reverse-NAT entries present in the map that no frontend owns.
    orphan_revnat: BTreeSet<u16>,
    /// Affinity match entries present in the map that no frontend owns.
    orphan_affinity: BTreeSet<(u16, u32)>,
    /// Source-range entries present in the map that no frontend owns.
    orphan_ranges: BTreeSet<(u16, Ipv4Net)>,
    /// Maglev tables present in the map that no frontend owns, and their
    /// chunks.
    orphan_maglev: BTreeMap<(u16, u16), u32>,
    /// The ids no slot refers to (by the entries' reference counts):
    /// pruning costs what changed, not every backend.
    unreferenced: BTreeSet<u32>,
    /// True after a pass with failed writes, until one succeeds.
    pending: bool,
}

const MAX_REV_NAT_ID: u32 = u16::MAX as u32;

impl<M: LbMaps> Reconciler<M> {
    /// Starts from what the maps already hold: a restarted agent keeps
    /// serving, reuses ids, and knows each frontend's owner.
    pub fn restore(maps: M, max_backend_id: u32) -> Result<Self, MapWriteError> {
        let snapshot = maps.snapshot()?;
        let mut written: BTreeMap<L4Addr, Written> = BTreeMap::new();
        for ((frontend, slot), value) in &snapshot.slots {
            let w = written.entry(*frontend).or_default();
            if *slot == 0 {
                w.head = Some(*value);
                w.rev_nat_id = Some(value.rev_nat_id);
            } else {
                w.slots.insert(*slot, value.backend_id);
            }
        }
        let mut orphan_revnat = BTreeSet::new();
        for (id, entry) in &snapshot.revnat {
            match written.get_mut(&entry.frontend) {
                Some(w) if w.rev_nat_id.is_none_or(|r| r == *id) => {
                    w.rev_nat_id = Some(*id);
                    w.service = entry.owner.clone();
                    w.revnat_written = entry.owner.is_some();
                }
                _ => {
                    orphan_revnat.insert(*id);
                }
            }
        }
        let by_rev_nat: BTreeMap<u16, L4Addr> = written
            .iter()
            .filter_map(|(f, w)| Some((w.rev_nat_id?, *f)))
            .collect();
        let mut orphan_affinity = BTreeSet::new();
        for ((rev_nat_id, backend_id), local) in &snapshot.affinity_match {
            match by_rev_nat.get(rev_nat_id).and_then(|f| written.get_mut(f)) {
                Some(w) => {
                    w.affinity.insert(*backend_id, *local);
                }
                None => {
                    orphan_affinity.insert((*rev_nat_id, *backend_id));
                }
            }
        }
        let mut orphan_ranges = BTreeSet::new();
        for (rev_nat_id, range) in &snapshot.source_ranges {
            match by_rev_nat.get(rev_nat_id).and_then(|f| written.get_mut(f)) {
                Some(w) => {
                    w.source_ranges.insert(*range);
                }
                None => {
                    orphan_ranges.insert((*rev_nat_id, *range));
                }
            }
        }
        let mut orphan_maglev = BTreeMap::new();
        for ((rev_nat_id, table), entries) in &snapshot.maglev {
            match by_rev_nat.get(rev_nat_id).and_then(|f| written.get_mut(f)) {
                Some(w) if *table < 2 => {
                    w.maglev[usize::from(*table)] = Some(entries.as_slice().into());
                }
                _ => {
                    orphan_maglev.insert(
                        (*rev_nat_id, *table),
                        crate::datapath::maps::maglev_chunks(entries.len()),
                    );
                }
            }
        }
        let mut backends = BTreeMap::new();
        for (id, addr) in &snapshot.backends {
            backends.entry(*addr).or_insert(*id);
        }
        // Ids a slot names are taken even when their backend is missing, so
        // a new backend never inherits a dangling slot's references.
        let backend_ids = IdAllocator::restore(
            max_backend_id,
            snapshot
                .backends
                .keys()
                .copied()
                .chain(written.values().flat_map(|w| w.slots.ids())),
        );
        let rev_nat_ids = IdAllocator::restore(
            MAX_REV_NAT_ID,
            snapshot
                .revnat
                .keys()
                .map(|id| u32::from(*id))
                .chain(written.values().filter_map(|w| w.rev_nat_id).map(u32::from)),
        );
        let mut backend_entries: BTreeMap<u32, BackendEntry> = snapshot
            .backends
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    BackendEntry {
                        addr: *addr,
                        refs: 0,
                    },
                )
            })
            .collect();
        // Slots and Maglev tables refer to backends: a backend is pruned
        // only when neither does.
        let table_ids = written
            .values()
            .flat_map(|w| w.maglev.iter().flatten())
            .flat_map(|t| maglev_backend_ids(t));
        for id in written
            .values()
            .flat_map(|w| w.slots.ids())
            .chain(table_ids)
        {
            if let Some(entry) = backend_entries.get_mut(&id) {
                entry.refs += 1;
            }
        }
        let unreferenced = backend_entries
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        Ok(Self {
            maps,
            written,
            unreferenced,
            backend_entries,
            backends,
            backend_ids,
            max_backends: max_backend_id,
            rev_nat_ids,
            orphan_revnat,
            orphan_affinity,
            orphan_ranges,
            orphan_maglev,
            pending: false,
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// True while writes of the last pass are still to be retried.
    pub fn needs_retry(&self) -> bool {
        self.pending
    }

    /// How many entries this agent's maps hold, as far as it wrote or read
    /// them, and what they serve.
    pub fn fill(&self) -> MapFill {
        let services: BTreeSet<&ServiceName> = self
            .written
            .values()
            .filter_map(|w| w.service.as_ref())
            .collect();
        let mut fill = MapFill {
            services: services.len(),
            backends: self.backend_entries.len(),
            revnat: self.orphan_revnat.len(),
            affinity_matches: self.orphan_affinity.len(),
            source_ranges: self.orphan_ranges.len(),
            maglev_chunks: self.orphan_maglev.values().map(|c| *c as usize).sum(),
            ..MapFill::default()
        };
        for w in self.written.values() {
            fill.service_entries += usize::from(w.head.is_some()) + w.slots.numbers().count();
            if let Some(kind) = w.head.and_then(|h| FrontendKind::of_flags(h.flags)) {
                *fill.frontends.entry(kind).or_default() += 1;
            }
            fill.revnat += usize::from(w.rev_nat_id.is_some());
            fill.affinity_matches += w.affinity.len();
            fill.source_ranges += w.source_ranges.len();
            fill.maglev_chunks += w
                .maglev
                .iter()
                .flatten()
                .map(|t| crate::datapath::maps::maglev_chunks(t.len()) as usize)
                .sum::<usize>();
        }
        fill
    }

    /// The writes that bring the maps to `desired` (pure: nothing is written,
    /// ids are allocated on copies).
    pub fn plan(&self, desired: &Desired) -> Plan {
        self.plan_scope(desired, None)
    }

    /// The frontends a change can affect: those it names, and those written
    /// for the Services it touched (a Service's old frontends may be gone).
    fn scope(&self, changes: &Changes) -> BTreeSet<L4Addr> {
        let mut scope = changes.frontends.clone();
        if !changes.services.is_empty() {
            scope.extend(
                self.written
                    .iter()
                    .filter(|(_, w)| {
                        w.service
                            .as_ref()
                            .is_some_and(|s| changes.services.contains(s))
                    })
                    .map(|(f, _)| *f),
            );
        }
        scope
    }

    /// Like `plan`, limited to the frontends in `scope` (all with `None`).
    fn plan_scope(&self, desired: &Desired, scope: Option<&BTreeSet<L4Addr>>) -> Plan {
        let mut plan = Plan::default();
        let mut backend_ids = self.backend_ids.clone();
        let mut rev_nat_ids = self.rev_nat_ids.clone();
        let mut new_backends: BTreeMap<L4Addr, u32> = BTreeMap::new();
        let written: Box<dyn Iterator<Item = (&L4Addr, &Written)>> = match scope {
            None => Box::new(self.written.iter()),
            Some(scope) => Box::new(scope.iter().filter_map(|f| self.written.get_key_value(f))),
        };
        let wanted: Box<
            dyn Iterator<Item = (&L4Addr, &std::sync::Arc<crate::model::FrontendSpec>)>,
        > = match scope {
            None => Box::new(desired.frontends.iter()),
            Some(scope) => Box::new(
                scope
                    .iter()
                    .filter_map(|f| desired.frontends.get_key_value(f)),
            ),
        };

        // Removals first: they free room in the maps for what comes next.
        for (frontend, w) in written {
            if desired.frontends.contains_key(frontend) {
                continue;
            }
            if w.service.as_ref().is_some_and(|s| desired.keep.contains(s)) {
                plan.kept += 1;
                continue;
            }
            let mut ops = vec![Op::DeleteSlot {
                frontend: *frontend,
                slot: 0,
            }];
            ops.extend(w.slots.numbers().map(|slot| Op::DeleteSlot {
                frontend: *frontend,
                slot,
            }));
            ops.extend(w.affinity.keys().map(|backend_id| Op::DeleteAffinityMatch {
                frontend: Some(*frontend),
                rev_nat_id: w.rev_nat_id.unwrap_or(0),
                backend_id: *backend_id,
            }));
            ops.extend(w.source_ranges.iter().map(|range| Op::DeleteSourceRange {
                frontend: Some(*frontend),
                rev_nat_id: w.rev_nat_id.unwrap_or(0),
                range: *range,
            }));
            ops.extend(delete_maglev_tables(*frontend, w, [0, 1]));
            if let Some(id) = w.rev_nat_id {
                ops.push(Op::DeleteRevNat { id });
            }
            plan.frontends.push(FrontendPlan {
                frontend: *frontend,
                service: None,
                rev_nat_id: w.rev_nat_id.unwrap_or(0),
                is_new: false,
                ops,
                udp_removed: self.udp_backends(*frontend, w.slots.ids()),
            });
        }

        for (frontend, spec) in wanted {
            let current = self.written.get(frontend);
            let ids = self.plan_ids(
                spec,
                current,
                &mut backend_ids,
                &mut rev_nat_ids,
                &mut new_backends,
                &mut plan.backends,
            );
            let (ids, rev_nat_id) = match ids {
                Ok(ids) => ids,
                Err(e) => {
                    plan.skipped.push((spec.service.clone(), *frontend, e));
                    continue;
                }
            };
            let empty = Written::default();
            let head = SvcValue {
                backend_id: 0,
                count: ids.len() as u16,
                local_count: spec.local_count as u16,
                rev_nat_id,
                flags: spec.flags(),
                affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
                maglev_table_size: spec.maglev_table_size,
            };
            let maglev = (spec.maglev_table_size > 0).then(|| {
                current
                    .and_then(|w| w.live_maglev_table(&ids, &head))
                    .unwrap_or_else(|| maglev_entries(spec, &ids))
            });
            let ops = plan_frontend(
                *frontend,
                current.unwrap_or(&empty),
                head,
                &spec.service,
                &ids,
                &spec.source_ranges,
                maglev,
            );
            if ops.is_empty() {
                plan.unchanged += 1;
                continue;
            }
            let old = current.map(|w| w.slots.ids().collect::<BTreeSet<_>>());
            plan.frontends.push(FrontendPlan {
                frontend: *frontend,
                service: Some(spec.service.clone()),
                rev_nat_id,
                is_new: current.is_none(),
                ops,
                udp_removed: self.udp_backends(
                    *frontend,
                    old.unwrap_or_default()
                        .into_iter()
                        .filter(|id| !ids.contains(id)),
                ),
            });
        }
        if scope.is_none() {
            plan.orphans =
                self.orphan_affinity
                    .iter()
                    .map(|(rev_nat_id, backend_id)| Op::DeleteAffinityMatch {
                        frontend: None,
                        rev_nat_id: *rev_nat_id,
                        backend_id: *backend_id,
                    })
                    .chain(self.orphan_ranges.iter().map(|(rev_nat_id, range)| {
                        Op::DeleteSourceRange {
                            frontend: None,
                            rev_nat_id: *rev_nat_id,
                            range: *range,
                        }
                    }))
                    .chain(
                        self.orphan_maglev
                            .iter()
                            .map(|((rev_nat_id, table), chunks)| Op::DeleteMaglev {
                                frontend: None,
                                rev_nat_id: *rev_nat_id,
                                table: *table,
                                chunks: *chunks,
                            }),
                    )
                    .chain(
                        self.orphan_revnat
                            .iter()
                            .map(|id| Op::DeleteRevNat { id: *id }),
                    )
                    .collect();
        }
        plan
    }

    /// Backend ids (new ones planned as `PutBackend`) and the reverse-NAT id
    /// for one frontend, allocated on the plan's copies of the allocators.
    /// The ids and addresses of a UDP frontend's backends among `ids`.
    fn udp_backends(&self, frontend: L4Addr, ids: impl Iterator<Item = u32>) -> Vec<(u32, L4Addr)> {
        if frontend.proto != Proto::Udp {
            return Vec::new();
        }
        ids.collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|id| Some((id, self.backend_entries.get(&id)?.addr)))
            .collect()
    }

    fn plan_ids(
        &self,
        spec: &crate::model::FrontendSpec,
        current: Option<&Written>,
        backend_ids: &mut IdAllocator,
        rev_nat_ids: &mut IdAllocator,
        new_backends: &mut BTreeMap<L4Addr, u32>,
        puts: &mut Vec<Op>,
    ) -> Result<(Vec<u32>, u16), MapWriteError> {
        let mut ids = Vec::with_capacity(spec.backends.len());
        for backend in &spec.backends {
            if let Some(id) = self.backends.get(backend).or(new_backends.get(backend)) {
                ids.push(*id);
                continue;
            }
            let id = backend_ids.allocate().ok_or(MapWriteError::Full {
                map: lb_common::backend::BACKEND_MAP,
                capacity: self.max_backends,
                flag: "--max-backends",
            })?;
            new_backends.insert(*backend, id);
            puts.push(Op::PutBackend {
                id,
                backend: *backend,
            });
            ids.push(id);
        }
        let rev_nat_id = match current.and_then(|w| w.rev_nat_id) {
            Some(id) => id,
            None => rev_nat_ids
                .allocate()
                .map(|id| id as u16)
                .ok_or(MapWriteError::Full {
                    map: lb_common::revnat::REVNAT_MAP,
                    capacity: MAX_REV_NAT_ID,
                    flag: "(65535 frontends at most)",
                })?,
        };
        Ok((ids, rev_nat_id))
    }

    /// Backend entries no slot refers to, except those a failed frontend
    /// still needs for its retry (pure).
    pub fn plan_prune(&self, needed: &BTreeSet<u32>) -> Vec<Op> {
        self.unreferenced
            .difference(needed)
            .map(|id| Op::DeleteBackend { id: *id })
            .collect()
    }

    /// Brings every frontend to `desired`.
    pub fn apply(&mut self, desired: &Desired) -> Report {
        let plan = self.plan(desired);
        self.run(plan)
    }

    /// Brings the frontends `changes` can affect to `desired`: the work is
    /// proportional to the change. After a failed pass, everything is
    /// checked again (`apply`).
    pub fn apply_changes(&mut self, desired: &Desired, changes: &Changes) -> Report {
        if self.pending || changes.all {
            return self.apply(desired);
        }
        let plan = self.plan_scope(desired, Some(&self.scope(changes)));
        self.run(plan)
    }

    fn run(&mut self, plan: Plan) -> Report {
        let mut report = Report::default();
        let mut needed = BTreeSet::new();
        for (service, frontend, e) in &plan.skipped {
            report.errors.push(ApplyError {
                target: format!("Service {service} frontend {frontend}"),
                op: None,
                error: e.clone(),
            });
        }
        report.unchanged = plan.unchanged;
        report.kept = plan.kept;
        // A failed backend write is reported by the frontends that need it.
        let mut failed_backends = BTreeMap::new();
        for op in &plan.backends {
            if let (Err(e), Op::PutBackend { id, .. }) = (self.execute(op), op) {
                failed_backends.insert(*id, (op.to_string(), e));
            }
        }
        for fp in &plan.frontends {
            let what = match &fp.service {
                Some(s) => format!("Service {s} frontend {}", fp.frontend),
                None => format!("removing frontend {}", fp.frontend),
            };
            let failed_backend = fp.ops.iter().find_map(|op| match op {
                Op::PutSlot { backend_id, .. } => failed_backends.get(backend_id),
                _ => None,
            });
            if let Some((op, e)) = failed_backend {
                needed.extend(fp.ops.iter().filter_map(|op| match op {
                    Op::PutSlot { backend_id, .. } => Some(*backend_id),
                    _ => None,
                }));
                report.errors.push(ApplyError {
                    target: what,
                    op: Some(op.clone()),
                    error: e.clone(),
                });
                continue;
            }
            if fp.is_new {
                self.rev_nat_ids.take(u32::from(fp.rev_nat_id));
                self.written.insert(
                    fp.frontend,
                    Written {
                        rev_nat_id: Some(fp.rev_nat_id),
                        ..Written::default()
                    },
                );
            }
            match fp
                .ops
                .iter()
                .try_for_each(|op| self.execute(op).map_err(|e| (op.to_string(), e)))
            {
                Ok(()) => {
                    match (&fp.service, fp.is_new) {
                        (None, _) => {
                            self.written.remove(&fp.frontend);
                            report.removed += 1;
                        }
                        (Some(_), true) => report.added += 1,
                        (Some(_), false) => report.updated += 1,
                    }
                    report
                        .udp_backends_removed
                        .extend(
                            fp.udp_removed
                                .iter()
                                .map(|&(backend_id, backend)| LeftBackend {
                                    frontend: fp.frontend,
                                    backend_id,
                                    backend,
                                }),
                        );
                }
                Err((op, error)) => {
                    needed.extend(fp.ops.iter().filter_map(|op| match op {
                        Op::PutSlot { backend_id, .. } => Some(*backend_id),
                        _ => None,
                    }));
                    report.errors.push(ApplyError {
                        target: what,
                        op: Some(op),
                        error,
                    })
                }
            }
        }
        for op in plan.orphans.iter().chain(&self.plan_prune(&needed)) {
            if let Err(error) = self.execute(op) {
                report.errors.push(ApplyError {
                    target: "cleanup".into(),
                    op: Some(op.to_string()),
                    error,
                });
            }
        }
        self.pending = !report.errors.is_empty();
        report
    }

    /// Performs one write and records its effect.
    fn execute(&mut self, op: &Op) -> Result<(), MapWriteError> {
        match op {
            Op::PutBackend { id, backend } => {
                self.maps.put_backend(*id, *backend)?;
                self.backend_ids.take(*id);
                let entry = self.backend_entries.entry(*id).or_insert(BackendEntry {
                    addr: *backend,
                    refs: 0,
                });
                entry.addr = *backend;
                if entry.refs == 0 {
                    self.unreferenced.insert(*id);
                }
                self.backends.insert(*backend, *id);
            }
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
            } => {
                let value = SvcValue {
                    backend_id: *backend_id,
                    ..SvcValue::default()
                };
                self.maps.put_slot(*frontend, *slot, value)?;
                let old = self.entry(*frontend).slots.insert(*slot, *backend_id);
                if old != Some(*backend_id) {
                    self.add_ref(*backend_id);
                    if let Some(old) = old {
                        self.drop_ref(old);
                    }
                }
            }
            Op::PutRevNat {
                frontend,
                id,
                owner,
            } => {
                self.maps.put_revnat(*id, *frontend, owner)?;
                let w = self.entry(*frontend);
                w.service = Some(owner.clone());
                w.revnat_written = true;
            }
            Op::PutCount { frontend, head } => {
                self.maps.put_slot(*frontend, 0, *head)?;
                self.entry(*frontend).head = Some(*head);
            }
            Op::DeleteSlot { frontend, slot } => {
                self.maps.delete_slot(*frontend, *slot)?;
                let w = self.entry(*frontend);
                if *slot == 0 {
                    w.head = None;
                } else if let Some(old) = w.slots.remove(*slot) {
                    self.drop_ref(old);
                }
            }
            Op::DeleteRevNat { id } => {
                self.maps.delete_revnat(*id)?;
                self.orphan_revnat.remove(id);
                self.rev_nat_ids.release(u32::from(*id));
            }
            Op::PutAffinityMatch {
                frontend,
                rev_nat_id,
                backend_id,
                local,
            } => {
                self.maps
                    .put_affinity_match(*rev_nat_id, *backend_id, *local)?;
                self.entry(*frontend).affinity.insert(*backend_id, *local);
            }
            Op::DeleteAffinityMatch {
                frontend,
                rev_nat_id,
                backend_id,
            } => {
                self.maps.delete_affinity_match(*rev_nat_id, *backend_id)?;
                match frontend.and_then(|f| self.written.get_mut(&f)) {
                    Some(w) => {
                        w.affinity.remove(backend_id);
                    }
                    None => {
                        self.orphan_affinity.remove(&(*rev_nat_id, *backend_id));
                    }
                }
            }
            Op::PutSourceRange {
                frontend,
                rev_nat_id,
                range,
            } => {
                self.maps.put_source_range(*rev_nat_id, *range)?;
                self.entry(*frontend).source_ranges.insert(*range);
            }
            Op::DeleteSourceRange {
                frontend,
                rev_nat_id,
                range,
            } => {
                self.maps.delete_source_range(*rev_nat_id, *range)?;
                match frontend.and_then(|f| self.written.get_mut(&f)) {
                    Some(w) => {
                        w.source_ranges.remove(range);
                    }
                    None => {
                        self.orphan_ranges.remove(&(*rev_nat_id, *range));
                    }
                }
            }
            Op::PutMaglev {
                frontend,
                rev_nat_id,
                table,
                entries,
            } => {
                self.maps.put_maglev_table(*rev_nat_id, *table, entries)?;
                let old =
                    self.entry(*frontend).maglev[usize::from(*table)].replace(entries.clone());
                maglev_backend_ids(entries).for_each(|id| self.add_ref(id));
                old.iter()
                    .flat_map(|t| maglev_backend_ids(t))
                    .for_each(|id| self.drop_ref(id));
            }
            Op::DeleteMaglev {
                frontend,
                rev_nat_id,
                table,
                chunks,
            } => {
                self.maps
                    .delete_maglev_table(*rev_nat_id, *table, *chunks)?;
                match frontend.and_then(|f| self.written.get_mut(&f)) {
                    Some(w) => {
                        let old = w.maglev[usize::from(*table)].take();
                        old.iter()
                            .flat_map(|t| maglev_backend_ids(t))
                            .for_each(|id| self.drop_ref(id));
                    }
                    None => {
                        self.orphan_maglev.remove(&(*rev_nat_id, *table));
                    }
                }
            }
            Op::DeleteBackend { id } => {
                self.maps.delete_backend(*id)?;
                self.unreferenced.remove(id);
                if let Some(entry) = self.backend_entries.remove(id) {
                    if self.backends.get(&entry.addr) == Some(id) {
                        self.backends.remove(&entry.addr);
                    }
                }
                self.backend_ids.release(*id);
            }
        }
        Ok(())
    }

    fn add_ref(&mut self, id: u32) {
        if let Some(entry) = self.backend_entries.get_mut(&id) {
            entry.refs += 1;
            self.unreferenced.remove(&id);
        }
    }

    fn drop_ref(&mut self, id: u32) {
        if let Some(entry) = self.backend_entries.get_mut(&id) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                self.unreferenced.insert(id);
            }
        }
    }

    fn entry(&mut self, frontend: L4Addr) -> &mut Written {
        self.written.entry(frontend).or_default()
    }
}

/// The Maglev table of a frontend: each entry's backend id, flagged
/// `MAGLEV_REMOTE` when the backend runs on another node.
fn maglev_entries(spec: &crate::model::FrontendSpec, ids: &[u32]) -> Arc<[u32]> {
    crate::model::maglev::populate(&spec.backends, spec.maglev_table_size)
        .into_iter()
        .map(|i| {
            let i = i as usize;
            ids[i]
                | if i >= spec.local_count {
                    MAGLEV_REMOTE
                } else {
                    0
                }
        })
        .collect()
}

/// The distinct backend ids a Maglev table leads to.
fn maglev_backend_ids(table: &[u32]) -> impl Iterator<Item = u32> {
    table
        .iter()
        .map(|e| e & !MAGLEV_REMOTE)
        .filter(|id| *id != 0)
        .collect::<BTreeSet<u32>>()
        .into_iter()
}

/// Which Maglev table a head names.
fn maglev_table(head: &SvcValue) -> u16 {
    u16::from(head.flags & SVC_FLAG_MAGLEV_TABLE_1 != 0)
}

/// Deletes those of `tables` the frontend has.
fn delete_maglev_tables(
    frontend: L4Addr,
    current: &Written,
    tables: impl IntoIterator<Item = u16>,
) -> Vec<Op> {
    tables
        .into_iter()
        .filter_map(|table| {
            let entries = current.maglev[usize::from(table)].as_ref()?;
            Some(Op::DeleteMaglev {
                frontend: Some(frontend),
                rev_nat_id: current.rev_nat_id?,
                table,
                chunks: crate::datapath::maps::maglev_chunks(entries.len()),
            })
        })
        .collect()
}

/// The ordered writes that turn `current` into `ids` behind `frontend`.
/// A count (or local count) that shrinks is published first, at the
/// smaller of old and new, so no packet picks a slot while it is rewritten
/// for another role; the final head goes last, after its slots. A changed
/// Maglev table is written into the table the head does not name, the
/// head then switches to it, and the old table goes.
#[allow(clippy::too_many_arguments)]
fn plan_frontend(
    frontend: L4Addr,
    current: &Written,
    mut target: SvcValue,
    owner: &ServiceName,
    ids: &[u32],
    source_ranges: &[Ipv4Net],
    maglev: Option<Arc<[u32]>>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let holds = |table: u16, entries: &[u32]| {
        current.maglev[usize::from(table)]
            .as_ref()
            .is_some_and(|held| held.len() >= entries.len() && held[..entries.len()] == *entries)
    };
    let live_table = current
        .head
        .filter(|h| h.flags & SVC_FLAG_MAGLEV != 0)
        .map(|h| maglev_table(&h));
    let maglev_write = maglev.map(|entries| {
        let table = match live_table {
            Some(t) if holds(t, &entries) => t,
            Some(t) => 1 - t,
            None => 0,
        };
        if table == 1 {
            target.flags |= SVC_FLAG_MAGLEV_TABLE_1;
        }
        (table, entries)
    });
    // Affinity may lead only to current backends: a leaving backend's match
    // goes first, an arriving one's after its slot.
    let affinity: BTreeMap<u32, bool> = if target.flags & SVC_FLAG_AFFINITY != 0 {
        ids.iter()
            .enumerate()
            .map(|(i, id)| (*id, i < usize::from(target.local_count)))
            .collect()
    } else {
        BTreeMap::new()
    };
    ops.extend(
        current
            .affinity
            .keys()
            .filter(|id| !affinity.contains_key(id))
            .map(|id| Op::DeleteAffinityMatch {
                frontend: Some(frontend),
                rev_nat_id: target.rev_nat_id,
                backend_id: *id,
            }),
    );
    let mut published = current.head;
    if let Some(head) = current.head {
        if target.count < head.count || target.local_count < head.local_count {
            // Otherwise as published: its Maglev table stays until the end.
            let interim = SvcValue {
                count: target.count.min(head.count),
                local_count: target.local_count.min(head.local_count),
                ..head
            };
            ops.push(Op::PutCount {
                frontend,
                head: interim,
            });
            published = Some(interim);
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let slot = i as u16 + 1;
        if current.slots.get(slot) != Some(*id) {
            ops.push(Op::PutSlot {
                frontend,
                slot,
                backend_id: *id,
            });
        }
    }
    ops.extend(
        affinity
            .iter()
            .filter(|(id, local)| current.affinity.get(id) != Some(local))
            .map(|(id, local)| Op::PutAffinityMatch {
                frontend,
                rev_nat_id: target.rev_nat_id,
                backend_id: *id,
                local: *local,
            }),
    );
    let revnat_current = current.revnat_written
        && current.rev_nat_id == Some(target.rev_nat_id)
        && current.service.as_ref() == Some(owner);
    if !revnat_current {
        ops.push(Op::PutRevNat {
            frontend,
            id: target.rev_nat_id,
            owner: owner.clone(),
        });
    }
    // Ranges admit clients: new ones before the head that may start
    // checking them, old ones after it.
    let ranges: BTreeSet<Ipv4Net> = source_ranges.iter().copied().collect();
    ops.extend(
        ranges
            .difference(&current.source_ranges)
            .map(|range| Op::PutSourceRange {
                frontend,
                rev_nat_id: target.rev_nat_id,
                range: *range,
            }),
    );
    let kept_table = match &maglev_write {
        Some((table, entries)) => {
            if !holds(*table, entries) {
                ops.push(Op::PutMaglev {
                    frontend,
                    rev_nat_id: target.rev_nat_id,
                    table: *table,
                    entries: entries.clone(),
                });
            }
            Some(*table)
        }
        None => None,
    };
    if published != Some(target) {
        ops.push(Op::PutCount {
            frontend,
            head: target,
        });
    }
    ops.extend(delete_maglev_tables(
        frontend,
        current,
        [0, 1].into_iter().filter(|t| Some(*t) != kept_table),
    ));
    ops.extend(
        current
            .source_ranges
            .difference(&ranges)
            .map(|range| Op::DeleteSourceRange {
                frontend: Some(frontend),
                rev_nat_id: target.rev_nat_id,
                range: *range,
            }),
    );
    ops.extend(
        current
            .slots
            .numbers()
            .filter(|slot| *slot > target.count)
            .map(|slot| Op::DeleteSlot { frontend, slot }),
    );
    ops
}
