//! Backend choice by the frontend's Maglev table (see `lb_common::maglev`).

use lb_common::{
    maglev::{MaglevKey, MAGLEV_CHUNK, MAGLEV_REMOTE},
    svc::{SvcValue, SVC_FLAG_MAGLEV_TABLE_1},
};

use crate::maps::MAGLEV;

/// The backend id at entry `hash % M` of the current table, and whether it
/// runs on another node; `None` when the table is missing (agent mid-update
/// or bug).
#[inline(always)]
pub fn pick(svc: &SvcValue, hash: u32) -> Option<(u32, bool)> {
    let size = svc.maglev_table_size;
    if size == 0 {
        return None;
    }
    let index = hash % size;
    let table = u16::from(svc.flags & SVC_FLAG_MAGLEV_TABLE_1 != 0);
    let key = MaglevKey::new(svc.rev_nat_id, table, index / MAGLEV_CHUNK);
    let chunk = MAGLEV.get_ptr(&key)?;
    // SAFETY: the pointer is valid for this program run; one entry is read,
    // at an offset below the chunk's length.
    let entry = unsafe {
        (*chunk)
            .entries
            .get((index % MAGLEV_CHUNK) as usize)
            .copied()?
    };
    let id = entry & !MAGLEV_REMOTE;
    (id != 0).then_some((id, entry & MAGLEV_REMOTE != 0))
}
