//! The pure half: desired state against what is written → ordered `Op`s.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;
use lb_common::svc::{
    SvcValue, SLOT_FLAG_LOCAL, SLOT_FLAG_REMOTE, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV,
    SVC_FLAG_MAGLEV_TABLE_1,
};

use super::{
    delete_maglev_tables, maglev_entries, maglev_table, Op, Reconciler, Written, MAX_REV_NAT_ID,
};
use crate::{
    datapath::maps::{LbMaps, MapWriteError},
    desired::{Changes, Desired},
    model::{FrontendSpec, L4Addr, Proto, ServiceName},
    reconcile::ids::IdAllocator,
};

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

/// The ordered writes that turn `current` into `ids` behind `frontend`.
/// A count (or local count) that shrinks is published first, at the
/// smaller of old and new, so no packet picks a slot while it is rewritten
/// for another role; the final head goes last, after its slots. A changed
/// Maglev table is written into the table the head does not name, the
/// head then switches to it, and the old table goes.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_frontend(
    frontend: L4Addr,
    current: &Written,
    mut target: SvcValue,
    owner: &ServiceName,
    ids: &[u32],
    source_ranges: &[IpNet],
    maglev: Option<Arc<[u32]>>,
) -> Vec<Op> {
    // One sequence on purpose: the order of these writes is what keeps a
    // packet from seeing a half-written frontend (see the module's doc).
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
        let flags = if slot <= target.local_count {
            SLOT_FLAG_LOCAL
        } else {
            SLOT_FLAG_REMOTE
        };
        if current.slots.get(slot) != Some((*id, flags)) {
            ops.push(Op::PutSlot {
                frontend,
                slot,
                backend_id: *id,
                flags,
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
    let ranges: BTreeSet<IpNet> = source_ranges.iter().copied().collect();
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

impl FrontendPlan {
    /// The backends its slot writes name.
    pub(super) fn slot_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.ops.iter().filter_map(|op| match op {
            Op::PutSlot { backend_id, .. } => Some(*backend_id),
            _ => None,
        })
    }
}

/// A plan's own copies of the id allocators, and the backends it adds.
struct Allocation {
    backend_ids: IdAllocator,
    rev_nat_ids: IdAllocator,
    new_backends: BTreeMap<L4Addr, u32>,
}

impl<M: LbMaps> Reconciler<M> {
    /// The writes that bring the maps to `desired` (pure: nothing is written,
    /// ids are allocated on copies).
    pub fn plan(&self, desired: &Desired) -> Plan {
        self.plan_scope(desired, None)
    }

    /// The frontends a change can affect: those it names, and those written
    /// for the Services it touched (a Service's old frontends may be gone).
    pub(super) fn scope(&self, changes: &Changes) -> BTreeSet<L4Addr> {
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
    pub(super) fn plan_scope(&self, desired: &Desired, scope: Option<&BTreeSet<L4Addr>>) -> Plan {
        let mut plan = Plan::default();
        let mut ids = Allocation {
            backend_ids: self.backend_ids.clone(),
            rev_nat_ids: self.rev_nat_ids.clone(),
            new_backends: BTreeMap::new(),
        };
        let written: Box<dyn Iterator<Item = (&L4Addr, &Written)>> = match scope {
            None => Box::new(self.written.iter()),
            Some(scope) => Box::new(scope.iter().filter_map(|f| self.written.get_key_value(f))),
        };
        let wanted: Box<dyn Iterator<Item = (&L4Addr, &Arc<FrontendSpec>)>> = match scope {
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
            plan.frontends.push(self.plan_removal(*frontend, w));
        }
        for (frontend, spec) in wanted {
            match self.plan_wanted(*frontend, spec, &mut ids, &mut plan.backends) {
                Ok(Some(frontend_plan)) => plan.frontends.push(frontend_plan),
                Ok(None) => plan.unchanged += 1,
                Err(e) => plan.skipped.push((spec.service.clone(), *frontend, e)),
            }
        }
        if scope.is_none() {
            plan.orphans = self.plan_orphans();
        }
        plan
    }

    /// A frontend no longer wanted: slot 0 first, then everything it owns.
    fn plan_removal(&self, frontend: L4Addr, w: &Written) -> FrontendPlan {
        let rev_nat_id = w.rev_nat_id.unwrap_or(0);
        let mut ops = vec![Op::DeleteSlot { frontend, slot: 0 }];
        ops.extend(
            w.slots
                .numbers()
                .map(|slot| Op::DeleteSlot { frontend, slot }),
        );
        ops.extend(w.affinity.keys().map(|backend_id| Op::DeleteAffinityMatch {
            frontend: Some(frontend),
            rev_nat_id,
            backend_id: *backend_id,
        }));
        ops.extend(w.source_ranges.iter().map(|range| Op::DeleteSourceRange {
            frontend: Some(frontend),
            rev_nat_id,
            range: *range,
        }));
        ops.extend(delete_maglev_tables(frontend, w, [0, 1]));
        if let Some(id) = w.rev_nat_id {
            ops.push(Op::DeleteRevNat { id });
        }
        FrontendPlan {
            frontend,
            service: None,
            rev_nat_id,
            is_new: false,
            ops,
            udp_removed: self.udp_backends(frontend, w.slots.ids()),
        }
    }

    /// A wanted frontend: its writes (`None` when the maps hold it already),
    /// with new backends planned into `puts`.
    fn plan_wanted(
        &self,
        frontend: L4Addr,
        spec: &FrontendSpec,
        ids: &mut Allocation,
        puts: &mut Vec<Op>,
    ) -> Result<Option<FrontendPlan>, MapWriteError> {
        let current = self.written.get(&frontend);
        let (backend_ids, rev_nat_id) = self.plan_ids(spec, current, ids, puts)?;
        let empty = Written::default();
        let head = SvcValue {
            backend_id: 0,
            count: backend_ids.len() as u16,
            local_count: spec.local_count as u16,
            rev_nat_id,
            flags: spec.flags(),
            affinity_timeout_s: spec.affinity_timeout_s.unwrap_or(0),
            maglev_table_size: spec.maglev_table_size,
        };
        let maglev = (spec.maglev_table_size > 0).then(|| {
            current
                .and_then(|w| w.live_maglev_table(&backend_ids, &head))
                .unwrap_or_else(|| maglev_entries(spec, &backend_ids))
        });
        let ops = plan_frontend(
            frontend,
            current.unwrap_or(&empty),
            head,
            &spec.service,
            &backend_ids,
            &spec.source_ranges,
            maglev,
        );
        if ops.is_empty() {
            return Ok(None);
        }
        let old = current.map(|w| w.slots.ids().collect::<BTreeSet<_>>());
        Ok(Some(FrontendPlan {
            frontend,
            service: Some(spec.service.clone()),
            rev_nat_id,
            is_new: current.is_none(),
            ops,
            udp_removed: self.udp_backends(
                frontend,
                old.unwrap_or_default()
                    .into_iter()
                    .filter(|id| !backend_ids.contains(id)),
            ),
        }))
    }

    /// Entries in the maps that no frontend owns (found at restore).
    fn plan_orphans(&self) -> Vec<Op> {
        let affinity =
            self.orphan_affinity
                .iter()
                .map(|(rev_nat_id, backend_id)| Op::DeleteAffinityMatch {
                    frontend: None,
                    rev_nat_id: *rev_nat_id,
                    backend_id: *backend_id,
                });
        let ranges = self
            .orphan_ranges
            .iter()
            .map(|(rev_nat_id, range)| Op::DeleteSourceRange {
                frontend: None,
                rev_nat_id: *rev_nat_id,
                range: *range,
            });
        let maglev = self
            .orphan_maglev
            .iter()
            .map(|((rev_nat_id, table), chunks)| Op::DeleteMaglev {
                frontend: None,
                rev_nat_id: *rev_nat_id,
                table: *table,
                chunks: *chunks,
            });
        let revnat = self
            .orphan_revnat
            .iter()
            .map(|id| Op::DeleteRevNat { id: *id });
        affinity.chain(ranges).chain(maglev).chain(revnat).collect()
    }

    /// The ids and addresses of a UDP frontend's backends among `ids`.
    pub(super) fn udp_backends(
        &self,
        frontend: L4Addr,
        ids: impl Iterator<Item = u32>,
    ) -> Vec<(u32, L4Addr)> {
        if frontend.proto != Proto::Udp {
            return Vec::new();
        }
        ids.collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|id| Some((id, self.backend_entries.get(&id)?.addr)))
            .collect()
    }

    /// Backend ids (new ones planned as `PutBackend`) and the reverse-NAT id
    /// for one frontend, allocated on the plan's copies of the allocators.
    fn plan_ids(
        &self,
        spec: &FrontendSpec,
        current: Option<&Written>,
        alloc: &mut Allocation,
        puts: &mut Vec<Op>,
    ) -> Result<(Vec<u32>, u16), MapWriteError> {
        let mut ids = Vec::with_capacity(spec.backends.len());
        for backend in &spec.backends {
            if let Some(id) = self
                .backends
                .get(backend)
                .or(alloc.new_backends.get(backend))
            {
                ids.push(*id);
                continue;
            }
            let id = alloc.backend_ids.allocate().ok_or(MapWriteError::Full {
                map: lb_common::backend::BACKEND_MAP,
                capacity: self.max_backends,
                flag: "--max-backends",
            })?;
            alloc.new_backends.insert(*backend, id);
            puts.push(Op::PutBackend {
                id,
                backend: *backend,
            });
            ids.push(id);
        }
        let rev_nat_id = match current.and_then(|w| w.rev_nat_id) {
            Some(id) => id,
            None => {
                alloc
                    .rev_nat_ids
                    .allocate()
                    .map(|id| id as u16)
                    .ok_or(MapWriteError::Full {
                        map: lb_common::revnat::REVNAT_MAP,
                        capacity: MAX_REV_NAT_ID,
                        flag: "(65535 frontends at most)",
                    })?
            }
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
}
