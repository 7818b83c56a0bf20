//! Starting from what the pinned maps already hold.

use std::collections::{BTreeMap, BTreeSet};

use super::{maglev_backend_ids, BackendEntry, Reconciler, Written, MAX_REV_NAT_ID};
use ipnet::IpNet;

use crate::{
    datapath::maps::{LbMaps, MapWriteError, Snapshot},
    model::L4Addr,
    reconcile::ids::IdAllocator,
};

impl<M: LbMaps> Reconciler<M> {
    /// Starts from what the maps already hold: a restarted agent keeps
    /// serving, reuses ids, and knows each frontend's owner.
    pub fn restore(maps: M, max_backend_id: u32) -> Result<Self, MapWriteError> {
        let snapshot = maps.snapshot()?;
        let (mut written, orphan_revnat) = frontends_of(&snapshot);
        let (orphan_affinity, orphan_ranges, orphan_maglev) = attach_owned(&snapshot, &mut written);
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
        let (backend_entries, unreferenced) = backend_refs(&snapshot, &written);
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
}

/// Each frontend's slots and reverse-NAT entry; the reverse-NAT entries no
/// frontend has.
fn frontends_of(snapshot: &Snapshot) -> (BTreeMap<L4Addr, Written>, BTreeSet<u16>) {
    let mut written: BTreeMap<L4Addr, Written> = BTreeMap::new();
    for ((frontend, slot), value) in &snapshot.slots {
        let w = written.entry(*frontend).or_default();
        if *slot == 0 {
            w.head = Some(*value);
            w.rev_nat_id = Some(value.rev_nat_id);
        } else {
            w.slots.insert(*slot, value.backend_id, value.flags);
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
    (written, orphan_revnat)
}

/// Affinity matches, source ranges and Maglev tables given to the frontend
/// whose reverse-NAT id they carry; those of none are orphans.
#[allow(clippy::type_complexity)]
fn attach_owned(
    snapshot: &Snapshot,
    written: &mut BTreeMap<L4Addr, Written>,
) -> (
    BTreeSet<(u16, u32)>,
    BTreeSet<(u16, IpNet)>,
    BTreeMap<(u16, u16), u32>,
) {
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
    (orphan_affinity, orphan_ranges, orphan_maglev)
}

/// Every backend entry with the number of slots and Maglev tables naming
/// it, and those no slot or table names.
fn backend_refs(
    snapshot: &Snapshot,
    written: &BTreeMap<L4Addr, Written>,
) -> (BTreeMap<u32, BackendEntry>, BTreeSet<u32>) {
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
    (backend_entries, unreferenced)
}
