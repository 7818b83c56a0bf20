//! In-memory `LbMaps` with capacities and a log of every write, so the
//! control plane (including write order and full maps) tests without root.

use super::maps::{LbMaps, MapWriteError, Snapshot};
use crate::model::L4Addr;
use lb_common::svc::SvcValue;

#[derive(Debug)]
pub struct FakeMaps {
    pub state: Snapshot,
    pub max_slots: usize,
    pub max_backends: usize,
    /// Every write, in order, as `op target`.
    pub log: Vec<String>,
}

impl FakeMaps {
    pub fn new(max_slots: usize, max_backends: usize) -> Self {
        Self {
            state: Snapshot::default(),
            max_slots,
            max_backends,
            log: Vec::new(),
        }
    }
}

impl LbMaps for FakeMaps {
    fn put_backend(&mut self, id: u32, backend: L4Addr) -> Result<(), MapWriteError> {
        if !self.state.backends.contains_key(&id) && self.state.backends.len() >= self.max_backends
        {
            return Err(MapWriteError::Full {
                map: "lb_backend_v1",
                capacity: self.max_backends as u32,
                flag: "--max-backends",
            });
        }
        self.log.push(format!("put backend {id} {backend}"));
        self.state.backends.insert(id, backend);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
        self.log.push(format!("del backend {id}"));
        self.state.backends.remove(&id);
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
                map: "lb_svc_v1",
                capacity: self.max_slots as u32,
                flag: "--max-service-slots",
            });
        }
        if slot == 0 {
            self.log
                .push(format!("put slot {frontend}#0 count={}", value.count));
        } else {
            self.log.push(format!(
                "put slot {frontend}#{slot} backend={}",
                value.backend_id
            ));
        }
        self.state.slots.insert((frontend, slot), value);
        Ok(())
    }

    fn delete_slot(&mut self, frontend: L4Addr, slot: u16) -> Result<(), MapWriteError> {
        self.log.push(format!("del slot {frontend}#{slot}"));
        self.state.slots.remove(&(frontend, slot));
        Ok(())
    }

    fn put_revnat(&mut self, id: u16, frontend: L4Addr) -> Result<(), MapWriteError> {
        self.log.push(format!("put revnat {id} {frontend}"));
        self.state.revnat.insert(id, frontend);
        Ok(())
    }

    fn delete_revnat(&mut self, id: u16) -> Result<(), MapWriteError> {
        self.log.push(format!("del revnat {id}"));
        self.state.revnat.remove(&id);
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot, MapWriteError> {
        Ok(self.state.clone())
    }
}
