//! What the reconciler knows the maps hold, per frontend: every
//! successful write is recorded here, so a retry starts from the truth.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ipnet::IpNet;
use lb_common::svc::{SvcValue, SVC_FLAG_MAGLEV};

use super::maglev_table;
use crate::model::{L4Addr, ServiceName};

/// A backend in the map and how many slots refer to it.
#[derive(Clone, Copy, Debug)]
pub(super) struct BackendEntry {
    pub(super) addr: L4Addr,
    pub(super) refs: u32,
}

/// What the maps hold for one frontend, as far as this agent wrote or read.
#[derive(Clone, Debug, Default)]
pub(super) struct Written {
    /// The owner stored with the reverse-NAT entry (`None`: unknown).
    pub(super) service: Option<ServiceName>,
    pub(super) rev_nat_id: Option<u16>,
    /// The reverse-NAT entry holds this frontend and `service`.
    pub(super) revnat_written: bool,
    /// Slot 0, if it exists.
    pub(super) head: Option<SvcValue>,
    /// Slots 1.. → backend id and role.
    pub(super) slots: Slots,
    /// Affinity match entries: backend id → runs on this node.
    pub(super) affinity: BTreeMap<u32, bool>,
    /// Source-range entries.
    pub(super) source_ranges: BTreeSet<IpNet>,
    /// What Maglev tables 0 and 1 hold (a table read back at restore is
    /// padded to whole chunks).
    pub(super) maglev: [Option<Arc<[u32]>>; 2],
}

impl Written {
    /// The published Maglev table, when it is the one `head` over `ids`
    /// would get: the table is a function of the backends (their ids in
    /// slot order), the local count and the size, so an unchanged frontend
    /// is not filled again on every pass.
    pub(super) fn live_maglev_table(&self, ids: &[u32], head: &SvcValue) -> Option<Arc<[u32]>> {
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

/// Slots 1.. → (backend id, `SLOT_FLAG_*`), as a dense vector (slot `n`
/// at index `n - 1`, id 0 where a slot is not written: backend ids start at
/// 1). Slots are dense in practice, and a vector is a fifth of an ordered
/// map's size.
#[derive(Clone, Debug, Default)]
pub(super) struct Slots(Vec<(u32, u16)>);

impl Slots {
    pub(super) fn get(&self, slot: u16) -> Option<(u32, u16)> {
        self.0
            .get(usize::from(slot).checked_sub(1)?)
            .copied()
            .filter(|(id, _)| *id != 0)
    }

    /// Writes `slot`; returns the id it held.
    pub(super) fn insert(&mut self, slot: u16, id: u32, flags: u16) -> Option<u32> {
        let index = usize::from(slot) - 1;
        if self.0.len() <= index {
            self.0.resize(index + 1, (0, 0));
        }
        let (old, _) = std::mem::replace(&mut self.0[index], (id, flags));
        (old != 0).then_some(old)
    }

    /// Clears `slot`; returns the id it held.
    pub(super) fn remove(&mut self, slot: u16) -> Option<u32> {
        let index = usize::from(slot).checked_sub(1)?;
        let (old, _) = std::mem::take(self.0.get_mut(index)?);
        while self.0.last().is_some_and(|(id, _)| *id == 0) {
            self.0.pop();
        }
        (old != 0).then_some(old)
    }

    /// The written slots' numbers.
    pub(super) fn numbers(&self) -> impl Iterator<Item = u16> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, (id, _))| *id != 0)
            .map(|(i, _)| i as u16 + 1)
    }

    /// The backend ids the written slots hold.
    pub(super) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|(id, _)| *id).filter(|id| *id != 0)
    }
}
