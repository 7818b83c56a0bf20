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

mod apply;
pub mod ids;
mod ops;
mod plan;
mod restore;
mod written;

pub use ops::Op;
pub use plan::{FrontendPlan, Plan};
use written::{BackendEntry, Written};

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::Arc,
};

use ipnet::IpNet;

use lb_common::{
    maglev::MAGLEV_REMOTE,
    svc::{SvcValue, SVC_FLAG_MAGLEV_TABLE_1},
};

use crate::{
    datapath::{
        maps::{LbMaps, MapWriteError},
        udp_reset::LeftBackend,
    },
    model::{Family, FrontendKind, L4Addr, ServiceName},
    reconcile::ids::IdAllocator,
};

/// Entries in the maps the reconciler writes, and what they serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    /// Services owning at least one frontend.
    pub services: usize,
    pub frontends: BTreeMap<(FrontendKind, Family), usize>,
    /// The maps of each family (`Family::V4` first).
    pub families: [FamilyFill; 2],
    /// The maps both families share.
    pub affinity_matches: usize,
    pub maglev_chunks: usize,
}

/// Entries in one family's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyFill {
    pub service_entries: usize,
    pub backends: usize,
    pub revnat: usize,
    pub source_ranges: usize,
}

impl MapFill {
    pub fn family(&self, family: Family) -> &FamilyFill {
        &self.families[family as usize]
    }

    fn family_mut(&mut self, family: Family) -> &mut FamilyFill {
        &mut self.families[family as usize]
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
    orphan_ranges: BTreeSet<(u16, IpNet)>,
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
            affinity_matches: self.orphan_affinity.len(),
            maglev_chunks: self.orphan_maglev.values().map(|c| *c as usize).sum(),
            ..MapFill::default()
        };
        for entry in self.backend_entries.values() {
            fill.family_mut(Family::of(entry.addr.addr)).backends += 1;
        }
        for (_, range) in &self.orphan_ranges {
            fill.family_mut(Family::of(range.addr())).source_ranges += 1;
        }
        // A reverse-NAT entry no frontend owns is deleted at the next pass;
        // its family is not kept: counted as IPv4.
        fill.family_mut(Family::V4).revnat += self.orphan_revnat.len();
        for (frontend, w) in &self.written {
            let family = Family::of(frontend.addr);
            if let Some(kind) = w.head.and_then(|h| FrontendKind::of_flags(h.flags)) {
                *fill.frontends.entry((kind, family)).or_default() += 1;
            }
            let own = fill.family_mut(family);
            own.service_entries += usize::from(w.head.is_some()) + w.slots.numbers().count();
            own.revnat += usize::from(w.rev_nat_id.is_some());
            own.source_ranges += w.source_ranges.len();
            fill.affinity_matches += w.affinity.len();
            fill.maglev_chunks += w
                .maglev
                .iter()
                .flatten()
                .map(|t| crate::datapath::maps::maglev_chunks(t.len()) as usize)
                .sum::<usize>();
        }
        fill
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
