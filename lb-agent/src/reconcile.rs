//! Applies desired frontends to the maps, diffing against what the maps hold.
//!
//! Write order per frontend, so no packet sees a half-written service:
//! backends → slots 1..N → reverse NAT → slot 0 (count) last; when shrinking,
//! slot 0 first, then the tail slots are deleted. Removed frontends lose slot
//! 0 first. Backends no slot refers to are deleted last. Bookkeeping changes
//! only after the writes succeed, so a failed apply is retried idempotently.

use std::collections::BTreeMap;

use lb_common::svc::{SvcValue, SVC_FLAG_CLUSTER_IP};

use crate::{
    datapath::maps::{LbMaps, MapWriteError},
    desired::Desired,
    ids::IdAllocator,
    model::{L4Addr, Proto, ServiceName},
};

/// What the agent knows it wrote for one frontend.
/// `backend_ids` are in slot order when `clean`; otherwise every id the
/// frontend's slots may refer to.
#[derive(Clone, Debug)]
struct AppliedFrontend {
    /// `None` for frontends restored from pinned maps.
    service: Option<ServiceName>,
    rev_nat_id: u16,
    backend_ids: Vec<u32>,
    /// Highest slot that may exist in the map (to clean up after failures).
    slot_high_water: u16,
    /// False after a failed write: rewrite everything next time.
    clean: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub kept: usize,
    pub errors: Vec<String>,
    /// (UDP frontend, backend id) pairs the frontend no longer uses: their
    /// conntrack flows are to be flushed so clients move to a live backend.
    pub udp_backends_removed: Vec<(L4Addr, u32)>,
}

pub struct Reconciler<M> {
    maps: M,
    applied: BTreeMap<L4Addr, AppliedFrontend>,
    backends: BTreeMap<L4Addr, u32>,
    backend_ids: IdAllocator,
    max_backends: u32,
    rev_nat_ids: IdAllocator,
}

const MAX_REV_NAT_ID: u32 = u16::MAX as u32;

impl<M: LbMaps> Reconciler<M> {
    /// Starts from what the maps already hold (a restarted agent keeps
    /// serving, and reuses ids so established state stays valid).
    pub fn restore(maps: M, max_backend_id: u32) -> Result<Self, MapWriteError> {
        let snapshot = maps.snapshot()?;
        let mut applied = BTreeMap::new();
        for ((frontend, slot), value) in &snapshot.slots {
            if *slot != 0 {
                continue;
            }
            let mut clean = snapshot.revnat.get(&value.rev_nat_id) == Some(frontend);
            let mut backend_ids = Vec::new();
            for s in 1..=value.count {
                match snapshot.slots.get(&(*frontend, s)) {
                    Some(v) if snapshot.backends.contains_key(&v.backend_id) => {
                        backend_ids.push(v.backend_id)
                    }
                    _ => clean = false,
                }
            }
            let high = snapshot
                .slots
                .range((*frontend, 0)..=(*frontend, u16::MAX))
                .next_back()
                .map_or(0, |((_, s), _)| *s);
            applied.insert(
                *frontend,
                AppliedFrontend {
                    service: None,
                    rev_nat_id: value.rev_nat_id,
                    backend_ids,
                    slot_high_water: high,
                    clean,
                },
            );
        }
        let mut backends = BTreeMap::new();
        for (id, addr) in &snapshot.backends {
            backends.entry(*addr).or_insert(*id);
        }
        let backend_ids = IdAllocator::restore(max_backend_id, snapshot.backends.keys().copied());
        let rev_nat_ids = IdAllocator::restore(
            MAX_REV_NAT_ID,
            snapshot
                .revnat
                .keys()
                .map(|id| u32::from(*id))
                .chain(applied.values().map(|a| u32::from(a.rev_nat_id))),
        );
        let mut reconciler = Self {
            maps,
            applied,
            backends,
            backend_ids,
            max_backends: max_backend_id,
            rev_nat_ids,
        };
        // Slots of frontends without slot 0, and second ids for one backend,
        // are unreachable leftovers of an interrupted agent.
        for (frontend, slot) in snapshot.slots.keys() {
            if !reconciler.applied.contains_key(frontend) {
                reconciler.maps.delete_slot(*frontend, *slot)?;
            }
        }
        for (id, backend) in &snapshot.backends {
            if reconciler.backends.get(backend) != Some(id) {
                reconciler.maps.delete_backend(*id)?;
                reconciler.backend_ids.release(*id);
            }
        }
        reconciler.prune_backends(&mut Vec::new());
        Ok(reconciler)
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// True while some frontend needs its writes retried.
    pub fn needs_retry(&self) -> bool {
        self.applied
            .values()
            .any(|a| !a.clean && a.service.is_some())
    }

    pub fn apply(&mut self, desired: &Desired) -> Report {
        let mut report = Report::default();
        let removed: Vec<L4Addr> = self
            .applied
            .iter()
            .filter(|(frontend, applied)| {
                !desired.frontends.contains_key(frontend)
                    && !applied
                        .service
                        .as_ref()
                        .is_some_and(|s| desired.keep.contains(s))
            })
            .map(|(frontend, _)| *frontend)
            .collect();
        // Removals first: they free room in the maps for what comes next.
        for frontend in removed {
            match self.remove_frontend(frontend, &mut report.udp_backends_removed) {
                Ok(()) => report.removed += 1,
                Err(e) => report
                    .errors
                    .push(format!("removing frontend {frontend}: {e}")),
            }
        }
        report.kept = self
            .applied
            .values()
            .filter(|a| a.service.as_ref().is_some_and(|s| desired.keep.contains(s)))
            .count();

        for (frontend, spec) in &desired.frontends {
            let existing = self.applied.get_mut(frontend);
            let ids: Option<Vec<u32>> = spec
                .backends
                .iter()
                .map(|b| self.backends.get(b).copied())
                .collect();
            if let Some(applied) = existing {
                if applied.clean && ids.as_ref() == Some(&applied.backend_ids) {
                    applied.service = Some(spec.service.clone());
                    report.unchanged += 1;
                    continue;
                }
            }
            let is_new = !self.applied.contains_key(frontend);
            match self.upsert_frontend(
                *frontend,
                &spec.service,
                &spec.backends,
                &mut report.udp_backends_removed,
            ) {
                Ok(()) if is_new => report.added += 1,
                Ok(()) => report.updated += 1,
                Err(e) => report
                    .errors
                    .push(format!("Service {} frontend {frontend}: {e}", spec.service)),
            }
        }
        self.prune_backends(&mut report.errors);
        report
    }

    fn backend_id(&mut self, backend: L4Addr) -> Result<u32, MapWriteError> {
        if let Some(id) = self.backends.get(&backend) {
            return Ok(*id);
        }
        let id = self.backend_ids.allocate().ok_or(MapWriteError::Full {
            map: lb_common::backend::BACKEND_MAP,
            capacity: self.max_backends,
            flag: "--max-backends",
        })?;
        if let Err(e) = self.maps.put_backend(id, backend) {
            self.backend_ids.release(id);
            return Err(e);
        }
        self.backends.insert(backend, id);
        Ok(id)
    }

    fn upsert_frontend(
        &mut self,
        frontend: L4Addr,
        service: &ServiceName,
        backends: &[L4Addr],
        udp_removed: &mut Vec<(L4Addr, u32)>,
    ) -> Result<(), MapWriteError> {
        let ids = backends
            .iter()
            .map(|b| self.backend_id(*b))
            .collect::<Result<Vec<u32>, _>>()?;
        let (rev_nat_id, old) = match self.applied.get(&frontend) {
            Some(applied) => (applied.rev_nat_id, Some(applied.clone())),
            None => {
                let id = self.rev_nat_ids.allocate().ok_or(MapWriteError::Full {
                    map: lb_common::revnat::REVNAT_MAP,
                    capacity: MAX_REV_NAT_ID,
                    flag: "(65535 frontends at most)",
                })?;
                (id as u16, None)
            }
        };
        let new_count = ids.len() as u16;
        let clean = old.as_ref().is_some_and(|o| o.clean);
        let old_ids = old
            .as_ref()
            .map(|o| o.backend_ids.clone())
            .unwrap_or_default();
        let high_water = old.as_ref().map_or(0, |o| o.slot_high_water).max(new_count);
        // Record intent first: if a write fails, the next apply rewrites it
        // all, and until then both old and new backends stay referenced.
        self.applied.insert(
            frontend,
            AppliedFrontend {
                service: Some(service.clone()),
                rev_nat_id,
                backend_ids: old_ids.iter().chain(&ids).copied().collect(),
                slot_high_water: high_water,
                clean: false,
            },
        );
        let master = SvcValue {
            backend_id: 0,
            count: new_count,
            rev_nat_id,
            flags: SVC_FLAG_CLUSTER_IP,
            _pad: [0; 3],
        };
        let shrinking = old.is_some() && (new_count as usize) < old_ids.len();
        if shrinking {
            self.maps.put_slot(frontend, 0, master)?;
        }
        for (i, id) in ids.iter().enumerate() {
            if !clean || old_ids.get(i) != Some(id) {
                let slot = SvcValue {
                    backend_id: *id,
                    ..SvcValue::default()
                };
                self.maps.put_slot(frontend, i as u16 + 1, slot)?;
            }
        }
        if !clean {
            self.maps.put_revnat(rev_nat_id, frontend)?;
        }
        if !shrinking {
            self.maps.put_slot(frontend, 0, master)?;
        }
        for slot in new_count + 1..=high_water {
            self.maps.delete_slot(frontend, slot)?;
        }
        if frontend.proto == Proto::Udp {
            udp_removed.extend(
                old_ids
                    .iter()
                    .filter(|id| !ids.contains(id))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .map(|id| (frontend, *id)),
            );
        }
        self.applied.insert(
            frontend,
            AppliedFrontend {
                service: Some(service.clone()),
                rev_nat_id,
                backend_ids: ids,
                slot_high_water: new_count,
                clean: true,
            },
        );
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        frontend: L4Addr,
        udp_removed: &mut Vec<(L4Addr, u32)>,
    ) -> Result<(), MapWriteError> {
        let Some(applied) = self.applied.get_mut(&frontend) else {
            return Ok(());
        };
        applied.clean = false;
        let (rev_nat_id, high_water) = (applied.rev_nat_id, applied.slot_high_water);
        self.maps.delete_slot(frontend, 0)?;
        for slot in 1..=high_water {
            self.maps.delete_slot(frontend, slot)?;
        }
        self.maps.delete_revnat(rev_nat_id)?;
        if let Some(applied) = self.applied.remove(&frontend) {
            if frontend.proto == Proto::Udp {
                let ids: std::collections::BTreeSet<u32> =
                    applied.backend_ids.into_iter().collect();
                udp_removed.extend(ids.into_iter().map(|id| (frontend, id)));
            }
        }
        self.rev_nat_ids.release(u32::from(rev_nat_id));
        Ok(())
    }

    /// Deletes backends that no frontend's slots refer to any more.
    fn prune_backends(&mut self, errors: &mut Vec<String>) {
        let referenced: std::collections::BTreeSet<u32> = self
            .applied
            .values()
            .flat_map(|a| a.backend_ids.iter().copied())
            .collect();
        let snapshot_ids: Vec<(L4Addr, u32)> = self
            .backends
            .iter()
            .filter(|(_, id)| !referenced.contains(id))
            .map(|(b, id)| (*b, *id))
            .collect();
        for (backend, id) in snapshot_ids {
            match self.maps.delete_backend(id) {
                Ok(()) => {
                    self.backends.remove(&backend);
                    self.backend_ids.release(id);
                }
                Err(e) => errors.push(format!("deleting backend {id} ({backend}): {e}")),
            }
        }
    }
}
