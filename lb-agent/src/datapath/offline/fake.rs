//! In-memory `LbMaps` with capacities and a log of every write, so the
//! control plane (including write order and full maps) tests without root.

use std::collections::BTreeMap;

use crate::datapath::maps::{LbMaps, MapWriteError, RevNatEntry, Snapshot};
use crate::model::{L4Addr, ServiceName};
use lb_common::svc::{SvcValue, SVC_FLAG_MAGLEV, SVC_FLAG_MAGLEV_TABLE_1};

#[derive(Debug)]
pub struct FakeMaps {
    pub state: Snapshot,
    pub max_slots: usize,
    pub max_backends: usize,
    /// Every write, in order, as `op target`.
    pub log: Vec<String>,
    /// Writes whose log line contains this fail (an I/O error), to test
    /// what a failed write leaves behind and how it is retried.
    pub fail_matching: Option<String>,
    /// The write attempt with this number (0-based) fails, once.
    pub fail_attempt: Option<usize>,
    attempts: usize,
    /// States a packet could have seen that break the write-order promise:
    /// a published count whose slots or backends are not all written, or a
    /// published slot judged on the wrong node (see `placement`).
    pub violations: Vec<String>,
    /// Where backends run (address → on this node), when a test says so. A
    /// published slot a packet judges otherwise (`SvcValue::slot_is_remote`)
    /// is a violation: an external flow would be SNATed to a local pod, or
    /// sent to another node's pod without SNAT.
    pub placement: BTreeMap<std::net::IpAddr, bool>,
    /// Whether each write is followed by that check (a walk of every
    /// frontend: quadratic over a large apply, so `check` goes without).
    order_checks: bool,
}

impl FakeMaps {
    pub fn new(max_slots: usize, max_backends: usize) -> Self {
        Self {
            state: Snapshot::default(),
            max_slots,
            max_backends,
            log: Vec::new(),
            fail_matching: None,
            fail_attempt: None,
            attempts: 0,
            violations: Vec::new(),
            placement: BTreeMap::new(),
            order_checks: true,
        }
    }

    /// Maps that only hold and size what is written (for `lb-agent check`,
    /// whose input may be a production-sized cluster).
    pub fn without_order_checks(max_slots: usize, max_backends: usize) -> Self {
        Self {
            order_checks: false,
            ..Self::new(max_slots, max_backends)
        }
    }

    /// Checks what a packet may see after each write: every frontend with
    /// a slot 0 has slots 1..=count, each naming an existing backend, and
    /// its current Maglev table, if it has one, is whole and names existing
    /// backends.
    fn check(&mut self, after: &str) {
        if !self.order_checks {
            return;
        }
        for ((frontend, slot), value) in &self.state.slots {
            if *slot != 0 {
                continue;
            }
            if value.flags & SVC_FLAG_MAGLEV != 0 {
                let table = u16::from(value.flags & SVC_FLAG_MAGLEV_TABLE_1 != 0);
                let entries = self.state.maglev.get(&(value.rev_nat_id, table));
                let whole = entries.is_some_and(|e| {
                    e.len() >= value.maglev_table_size as usize
                        && e[..value.maglev_table_size as usize].iter().all(|id| {
                            self.state
                                .backends
                                .contains_key(&(id & !lb_common::maglev::MAGLEV_REMOTE))
                        })
                });
                if !whole {
                    self.violations.push(format!(
                        "after `{after}`: {frontend} publishes Maglev table {table} of {} entries, missing or dangling",
                        value.maglev_table_size
                    ));
                }
            }
            if value.local_count > value.count {
                self.violations.push(format!(
                    "after `{after}`: {frontend} publishes {} local slots of {}",
                    value.local_count, value.count
                ));
            }
            for s in 1..=value.count {
                let slot = self.state.slots.get(&(*frontend, s));
                let backend = slot.and_then(|v| self.state.backends.get(&v.backend_id));
                let (Some(slot), Some(backend)) = (slot, backend) else {
                    self.violations.push(format!(
                        "after `{after}`: {frontend} publishes {} slots but slot {s} is missing or dangling",
                        value.count
                    ));
                    continue;
                };
                let remote = slot.slot_is_remote(s, value.local_count);
                let local = self.placement.get(&backend.addr);
                if local.is_some_and(|local| *local == remote) {
                    self.violations.push(format!(
                        "after `{after}`: {frontend} slot {s} holds {backend}, judged {} (local count {})",
                        if remote { "remote" } else { "local" },
                        value.local_count
                    ));
                }
            }
        }
    }

    /// Logs the write, or fails it if it matches `fail_matching`.
    fn record(&mut self, line: String) -> Result<(), MapWriteError> {
        let attempt = self.attempts;
        self.attempts += 1;
        let fail_now = self.fail_attempt == Some(attempt);
        if fail_now {
            self.fail_attempt = None;
        }
        if fail_now
            || self
                .fail_matching
                .as_ref()
                .is_some_and(|m| line.contains(m.as_str()))
        {
            return Err(MapWriteError::Syscall {
                op: "write",
                map: "fake",
                source: std::io::Error::other(format!("injected failure: {line}")).into(),
            });
        }
        self.log.push(line);
        Ok(())
    }
}

impl LbMaps for FakeMaps {
    fn put_backend(&mut self, id: u32, backend: L4Addr) -> Result<(), MapWriteError> {
        if !self.state.backends.contains_key(&id) && self.state.backends.len() >= self.max_backends
        {
            return Err(MapWriteError::Full {
                map: lb_common::backend::BACKEND_MAP,
                capacity: self.max_backends as u32,
                flag: "--max-backends",
            });
        }
        self.record(format!("put backend {id} {backend}"))?;
        self.state.backends.insert(id, backend);
        self.check(&format!("put backend {id}"));
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.record(format!("del backend {id}"))?;
        self.state.backends.remove(&id);
        self.check(&format!("del backend {id}"));
        Ok(())
    }

    fn put_slot(
        &mut self,
        frontend: L4Addr,
        slot: u16,
        value: SvcValue,
    ) -> Result<(), MapWriteError> {
        if !self.state.slots.contains_key(&(frontend, slot))
            && self.state.slots.len() >= self.max_slots
        {
            return Err(MapWriteError::Full {
                map: lb_common::svc::SVC_MAP,
                capacity: self.max_slots as u32,
                flag: "--max-service-slots",
            });
        }
        if slot == 0 {
            self.record(format!(
                "put slot {frontend}#0 count={} local={} flags={:#x}",
                value.count, value.local_count, value.flags
            ))?;
        } else {
            self.record(format!(
                "put slot {frontend}#{slot} backend={} {}",
                value.backend_id,
                lb_common::svc::slot_role(value.flags)
            ))?;
        }
        self.state.slots.insert((frontend, slot), value);
        self.check(&format!("put slot {frontend}#{slot}"));
        Ok(())
    }

    fn delete_slot(&mut self, frontend: L4Addr, slot: u16) -> Result<(), MapWriteError> {
        self.record(format!("del slot {frontend}#{slot}"))?;
        self.state.slots.remove(&(frontend, slot));
        self.check(&format!("del slot {frontend}#{slot}"));
        Ok(())
    }

    fn put_revnat(
        &mut self,
        id: u16,
        frontend: L4Addr,
        owner: &ServiceName,
    ) -> Result<(), MapWriteError> {
        self.record(format!("put revnat {id} {frontend}"))?;
        self.state.revnat.insert(
            id,
            RevNatEntry {
                frontend,
                owner: Some(owner.clone()),
            },
        );
        Ok(())
    }

    fn delete_revnat(&mut self, id: u16) -> Result<(), MapWriteError> {
        self.record(format!("del revnat {id}"))?;
        self.state.revnat.remove(&id);
        Ok(())
    }

    fn put_affinity_match(
        &mut self,
        rev_nat_id: u16,
        backend_id: u32,
        local: bool,
    ) -> Result<(), MapWriteError> {
        self.record(format!(
            "put affinity match {rev_nat_id}/{backend_id} local={local}"
        ))?;
        self.state
            .affinity_match
            .insert((rev_nat_id, backend_id), local);
        Ok(())
    }

    fn delete_affinity_match(
        &mut self,
        rev_nat_id: u16,
        backend_id: u32,
    ) -> Result<(), MapWriteError> {
        self.record(format!("del affinity match {rev_nat_id}/{backend_id}"))?;
        self.state.affinity_match.remove(&(rev_nat_id, backend_id));
        Ok(())
    }

    fn put_source_range(
        &mut self,
        rev_nat_id: u16,
        range: ipnet::IpNet,
    ) -> Result<(), MapWriteError> {
        self.record(format!("put source range {rev_nat_id}/{range}"))?;
        self.state.source_ranges.insert((rev_nat_id, range));
        Ok(())
    }

    fn delete_source_range(
        &mut self,
        rev_nat_id: u16,
        range: ipnet::IpNet,
    ) -> Result<(), MapWriteError> {
        self.record(format!("del source range {rev_nat_id}/{range}"))?;
        self.state.source_ranges.remove(&(rev_nat_id, range));
        Ok(())
    }

    fn put_maglev_table(
        &mut self,
        rev_nat_id: u16,
        table: u16,
        entries: &[u32],
    ) -> Result<(), MapWriteError> {
        self.record(format!(
            "put maglev {rev_nat_id}/{table} entries={}",
            entries.len()
        ))?;
        let mut padded = entries.to_vec();
        padded.resize(
            crate::datapath::maps::maglev_chunks(entries.len()) as usize
                * lb_common::maglev::MAGLEV_CHUNK as usize,
            0,
        );
        self.state.maglev.insert((rev_nat_id, table), padded);
        self.check(&format!("put maglev {rev_nat_id}/{table}"));
        Ok(())
    }

    fn delete_maglev_table(
        &mut self,
        rev_nat_id: u16,
        table: u16,
        _chunks: u32,
    ) -> Result<(), MapWriteError> {
        self.record(format!("del maglev {rev_nat_id}/{table}"))?;
        self.state.maglev.remove(&(rev_nat_id, table));
        self.check(&format!("del maglev {rev_nat_id}/{table}"));
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot, MapWriteError> {
        Ok(self.state.clone())
    }
}
