//! Maglev lookup tables (`--lb-algorithm maglev`): per frontend, M entries
//! (M prime) of backend ids, filled by the agent with Maglev's permutation
//! (Eisenbud et al., NSDI 2016) from each backend's address, so every node
//! builds the same table for the same backends and removing one of N moves
//! about 1/N of the flows. A new flow takes entry `flow_hash % M`.
//!
//! A table is stored in chunks of `MAGLEV_CHUNK` entries keyed by
//! (rev-NAT id, table, chunk); each frontend has two tables (0 and 1) and
//! slot 0's `SVC_FLAG_MAGLEV_TABLE_1` says which one is current.

use crate::user_pod;

pub const MAGLEV_MAP: &str = "lb_maglev_v4";
/// Entries per chunk: a value is 1 KiB.
pub const MAGLEV_CHUNK: u32 = 256;
pub const DEFAULT_MAX_MAGLEV_CHUNKS: u32 = 65_536;
/// An entry's flag: the backend runs on another node (external flows to it
/// are SNATed). The rest of the entry is the backend id.
pub const MAGLEV_REMOTE: u32 = 1 << 31;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub rev_nat_id: u16,
    /// 0 or 1.
    pub table: u16,
    pub chunk: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    /// Backend id, with `MAGLEV_REMOTE`; 0 past the table's end.
    pub entries: [u32; MAGLEV_CHUNK as usize],
}

impl MaglevKey {
    #[inline(always)]
    pub const fn new(rev_nat_id: u16, table: u16, chunk: u32) -> Self {
        Self {
            rev_nat_id,
            table,
            chunk,
        }
    }
}

const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);
const _: () = assert!(core::mem::size_of::<MaglevChunk>() == 1024);

user_pod!(MaglevKey, MaglevChunk);
