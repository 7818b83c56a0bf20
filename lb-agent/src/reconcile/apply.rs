//! The other half: a plan's `Op`s performed in order, each recorded as
//! it succeeds; a frontend's later writes are skipped after a failure.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::svc::SvcValue;

use super::{
    maglev_backend_ids, ApplyError, BackendEntry, FrontendPlan, Op, Plan, Reconciler, Report,
    Written,
};
use crate::{
    datapath::{
        maps::{LbMaps, MapWriteError},
        udp_reset::LeftBackend,
    },
    desired::{Changes, Desired},
    model::L4Addr,
};

impl<M: LbMaps> Reconciler<M> {
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

    pub(super) fn run(&mut self, plan: Plan) -> Report {
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
            match self.run_frontend(fp, &failed_backends) {
                Ok(()) => {
                    match (&fp.service, fp.is_new) {
                        (None, _) => report.removed += 1,
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
                Err(error) => {
                    // Its backends stay for the retry.
                    needed.extend(fp.slot_backends());
                    report.errors.push(error);
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

    /// One frontend's writes, in order, stopping at the first that fails
    /// (or before any, when a backend it needs could not be written).
    fn run_frontend(
        &mut self,
        fp: &FrontendPlan,
        failed_backends: &BTreeMap<u32, (String, MapWriteError)>,
    ) -> Result<(), ApplyError> {
        let target = match &fp.service {
            Some(s) => format!("Service {s} frontend {}", fp.frontend),
            None => format!("removing frontend {}", fp.frontend),
        };
        if let Some((op, e)) = fp.slot_backends().find_map(|id| failed_backends.get(&id)) {
            return Err(ApplyError {
                target,
                op: Some(op.clone()),
                error: e.clone(),
            });
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
        let mut rest = &fp.ops[..];
        while let Some(first) = rest.first() {
            // A run of slot writes goes to the kernel together, in order.
            let slots = slot_run(rest);
            let (done, result) = match (first, slots.len()) {
                (Op::PutSlot { frontend, .. }, run) if run > 1 => {
                    (run, self.execute_slots(*frontend, &slots, &rest[..run]))
                }
                _ => (1, self.execute(first).map_err(|e| (first, e))),
            };
            if let Err((op, error)) = result {
                return Err(ApplyError {
                    target,
                    op: Some(op.to_string()),
                    error,
                });
            }
            rest = &rest[done..];
        }
        if fp.service.is_none() {
            self.written.remove(&fp.frontend);
        }
        Ok(())
    }

    /// Writes `slots` of `frontend` in one batch — `ops` are their
    /// `PutSlot`s, index for index — and records those that succeeded; on
    /// failure, the op that failed.
    fn execute_slots<'a>(
        &mut self,
        frontend: L4Addr,
        slots: &[(u16, SvcValue)],
        ops: &'a [Op],
    ) -> Result<(), (&'a Op, MapWriteError)> {
        let result = self.maps.put_slots(frontend, slots);
        let written = result.as_ref().map_or_else(|(n, _)| *n, |()| ops.len());
        for op in &ops[..written] {
            self.record(op);
        }
        result.map_err(|(n, e)| (&ops[n], e))
    }

    /// Performs one write and, once it succeeded, records it.
    pub(super) fn execute(&mut self, op: &Op) -> Result<(), MapWriteError> {
        write(&mut self.maps, op)?;
        self.record(op);
        Ok(())
    }

    /// What a successful write changed in what the reconciler knows.
    fn record(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, backend } => {
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
                flags,
            } => {
                let old = self
                    .entry(*frontend)
                    .slots
                    .insert(*slot, *backend_id, *flags);
                if old != Some(*backend_id) {
                    self.add_ref(*backend_id);
                    if let Some(old) = old {
                        self.drop_ref(old);
                    }
                }
            }
            Op::PutRevNat {
                frontend, owner, ..
            } => {
                let w = self.entry(*frontend);
                w.service = Some(owner.clone());
                w.revnat_written = true;
            }
            Op::PutCount { frontend, head } => self.entry(*frontend).head = Some(*head),
            Op::DeleteSlot { frontend, slot } => {
                let w = self.entry(*frontend);
                if *slot == 0 {
                    w.head = None;
                } else if let Some(old) = w.slots.remove(*slot) {
                    self.drop_ref(old);
                }
            }
            Op::DeleteRevNat { id } => {
                self.orphan_revnat.remove(id);
                self.rev_nat_ids.release(u32::from(*id));
            }
            Op::PutAffinityMatch {
                frontend,
                backend_id,
                local,
                ..
            } => {
                self.entry(*frontend).affinity.insert(*backend_id, *local);
            }
            Op::DeleteAffinityMatch {
                frontend,
                rev_nat_id,
                backend_id,
            } => match frontend.and_then(|f| self.written.get_mut(&f)) {
                Some(w) => {
                    w.affinity.remove(backend_id);
                }
                None => {
                    self.orphan_affinity.remove(&(*rev_nat_id, *backend_id));
                }
            },
            Op::PutSourceRange {
                frontend, range, ..
            } => {
                self.entry(*frontend).source_ranges.insert(*range);
            }
            Op::DeleteSourceRange {
                frontend,
                rev_nat_id,
                range,
            } => match frontend.and_then(|f| self.written.get_mut(&f)) {
                Some(w) => {
                    w.source_ranges.remove(range);
                }
                None => {
                    self.orphan_ranges.remove(&(*rev_nat_id, *range));
                }
            },
            Op::PutMaglev {
                frontend,
                table,
                entries,
                ..
            } => {
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
                ..
            } => match frontend.and_then(|f| self.written.get_mut(&f)) {
                Some(w) => {
                    let old = w.maglev[usize::from(*table)].take();
                    old.iter()
                        .flat_map(|t| maglev_backend_ids(t))
                        .for_each(|id| self.drop_ref(id));
                }
                None => {
                    self.orphan_maglev.remove(&(*rev_nat_id, *table));
                }
            },
            Op::DeleteBackend { id } => {
                self.unreferenced.remove(id);
                if let Some(entry) = self.backend_entries.remove(id) {
                    if self.backends.get(&entry.addr) == Some(id) {
                        self.backends.remove(&entry.addr);
                    }
                }
                self.backend_ids.release(*id);
            }
        }
    }

    pub(super) fn add_ref(&mut self, id: u32) {
        if let Some(entry) = self.backend_entries.get_mut(&id) {
            entry.refs += 1;
            self.unreferenced.remove(&id);
        }
    }

    pub(super) fn drop_ref(&mut self, id: u32) {
        if let Some(entry) = self.backend_entries.get_mut(&id) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                self.unreferenced.insert(id);
            }
        }
    }

    pub(super) fn entry(&mut self, frontend: L4Addr) -> &mut Written {
        self.written.entry(frontend).or_default()
    }
}

/// The leading run of `ops` that write slots of one frontend, as the
/// values to write.
fn slot_run(ops: &[Op]) -> Vec<(u16, SvcValue)> {
    let first = match ops.first() {
        Some(Op::PutSlot { frontend, .. }) => *frontend,
        _ => return Vec::new(),
    };
    ops.iter()
        .map_while(|op| match op {
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
                flags,
            } if *frontend == first => Some((*slot, slot_value(*backend_id, *flags))),
            _ => None,
        })
        .collect()
}

/// A slot's value: its backend and role.
fn slot_value(backend_id: u32, flags: u16) -> SvcValue {
    SvcValue {
        backend_id,
        flags,
        ..SvcValue::default()
    }
}

/// The map write of one op.
fn write<M: LbMaps>(maps: &mut M, op: &Op) -> Result<(), MapWriteError> {
    match op {
        Op::PutBackend { id, backend } => maps.put_backend(*id, *backend),
        Op::PutSlot {
            frontend,
            slot,
            backend_id,
            flags,
        } => maps.put_slot(*frontend, *slot, slot_value(*backend_id, *flags)),
        Op::PutRevNat {
            frontend,
            id,
            owner,
        } => maps.put_revnat(*id, *frontend, owner),
        Op::PutCount { frontend, head } => maps.put_slot(*frontend, 0, *head),
        Op::DeleteSlot { frontend, slot } => maps.delete_slot(*frontend, *slot),
        Op::DeleteRevNat { id } => maps.delete_revnat(*id),
        Op::PutAffinityMatch {
            rev_nat_id,
            backend_id,
            local,
            ..
        } => maps.put_affinity_match(*rev_nat_id, *backend_id, *local),
        Op::DeleteAffinityMatch {
            rev_nat_id,
            backend_id,
            ..
        } => maps.delete_affinity_match(*rev_nat_id, *backend_id),
        Op::PutSourceRange {
            rev_nat_id, range, ..
        } => maps.put_source_range(*rev_nat_id, *range),
        Op::DeleteSourceRange {
            rev_nat_id, range, ..
        } => maps.delete_source_range(*rev_nat_id, *range),
        Op::PutMaglev {
            rev_nat_id,
            table,
            entries,
            ..
        } => maps.put_maglev_table(*rev_nat_id, *table, entries),
        Op::DeleteMaglev {
            rev_nat_id,
            table,
            chunks,
            ..
        } => maps.delete_maglev_table(*rev_nat_id, *table, *chunks),
        Op::DeleteBackend { id } => maps.delete_backend(*id),
    }
}
