//! The map writes a plan is made of, one `Op` each.

use std::{fmt, sync::Arc};

use ipnet::IpNet;
use lb_common::svc::{slot_role, SvcValue};

use crate::model::{L4Addr, ServiceName};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        backend: L4Addr,
    },
    /// `flags`: the backend's role, `SLOT_FLAG_LOCAL` or `SLOT_FLAG_REMOTE`.
    PutSlot {
        frontend: L4Addr,
        slot: u16,
        backend_id: u32,
        flags: u16,
    },
    PutRevNat {
        frontend: L4Addr,
        id: u16,
        owner: ServiceName,
    },
    /// Slot 0 (`backend_id` 0): publishes `head.count` slots.
    PutCount {
        frontend: L4Addr,
        head: SvcValue,
    },
    /// Slot 0 is the frontend itself.
    DeleteSlot {
        frontend: L4Addr,
        slot: u16,
    },
    DeleteRevNat {
        id: u16,
    },
    DeleteBackend {
        id: u32,
    },
    /// Session affinity may lead to `backend_id` from this frontend.
    PutAffinityMatch {
        frontend: L4Addr,
        rev_nat_id: u16,
        backend_id: u32,
        local: bool,
    },
    /// Clients in `range` may open flows to this frontend.
    PutSourceRange {
        frontend: L4Addr,
        rev_nat_id: u16,
        range: IpNet,
    },
    /// `frontend` is `None` for an entry no frontend owns.
    DeleteSourceRange {
        frontend: Option<L4Addr>,
        rev_nat_id: u16,
        range: IpNet,
    },
    /// `frontend` is `None` for an entry no frontend owns.
    DeleteAffinityMatch {
        frontend: Option<L4Addr>,
        rev_nat_id: u16,
        backend_id: u32,
    },
    /// Fills Maglev table `table` (0 or 1) of the frontend.
    PutMaglev {
        frontend: L4Addr,
        rev_nat_id: u16,
        table: u16,
        entries: Arc<[u32]>,
    },
    /// `frontend` is `None` for a table no frontend owns.
    DeleteMaglev {
        frontend: Option<L4Addr>,
        rev_nat_id: u16,
        table: u16,
        chunks: u32,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::PutBackend { id, backend } => write!(f, "put backend {id} {backend}"),
            Op::PutSlot {
                frontend,
                slot,
                backend_id,
                flags,
            } => write!(
                f,
                "put slot {frontend}#{slot} backend={backend_id} {}",
                slot_role(*flags)
            ),
            Op::PutRevNat {
                frontend,
                id,
                owner,
            } => write!(f, "put revnat {id} {frontend} {owner}"),
            Op::PutCount { frontend, head } => write!(
                f,
                "put slot {frontend}#0 count={} local={} flags={:#x}",
                head.count, head.local_count, head.flags
            ),
            Op::DeleteSlot { frontend, slot } => write!(f, "del slot {frontend}#{slot}"),
            Op::DeleteRevNat { id } => write!(f, "del revnat {id}"),
            Op::DeleteBackend { id } => write!(f, "del backend {id}"),
            Op::PutAffinityMatch {
                rev_nat_id,
                backend_id,
                local,
                ..
            } => write!(
                f,
                "put affinity match {rev_nat_id}/{backend_id} local={local}"
            ),
            Op::DeleteAffinityMatch {
                rev_nat_id,
                backend_id,
                ..
            } => write!(f, "del affinity match {rev_nat_id}/{backend_id}"),
            Op::PutSourceRange {
                rev_nat_id, range, ..
            } => write!(f, "put source range {rev_nat_id}/{range}"),
            Op::DeleteSourceRange {
                rev_nat_id, range, ..
            } => write!(f, "del source range {rev_nat_id}/{range}"),
            Op::PutMaglev {
                rev_nat_id,
                table,
                entries,
                ..
            } => write!(
                f,
                "put maglev {rev_nat_id}/{table} entries={}",
                entries.len()
            ),
            Op::DeleteMaglev {
                rev_nat_id, table, ..
            } => write!(f, "del maglev {rev_nat_id}/{table}"),
        }
    }
}
