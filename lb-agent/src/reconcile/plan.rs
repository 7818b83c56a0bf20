//! The pure half: desired state against what is written → ordered `Op`s.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::Ipv4Net;
use lb_common::svc::{SvcValue, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV, SVC_FLAG_MAGLEV_TABLE_1};

use super::{
    delete_maglev_tables, maglev_entries, maglev_table, Op, Reconciler, Written, MAX_REV_NAT_ID,
};
use crate::{
    datapath::maps::{LbMaps, MapWriteError},
    desired::{Changes, Desired},
    model::{L4Addr, Proto, ServiceName},
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

    pub(super) fn plan_ids(
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
}
