//! The datapath's event counters (`lb_common::stats`): a per-CPU array
//! with one slot per event, summed over CPUs when read.

use std::path::Path;

use aya::maps::{MapData, MapError, PerCpuArray};
use lb_common::stats::{STATS_MAP, STAT_COUNT, STAT_NAMES};

use super::loader::{open_pinned, LoadError};

pub type CounterMap = PerCpuArray<MapData, u64>;

/// The pinned counter map in `pin_dir`.
pub fn open(pin_dir: &Path) -> Result<CounterMap, LoadError> {
    PerCpuArray::try_from(open_pinned(pin_dir, STATS_MAP)?)
        .map_err(|e| LoadError::Map(STATS_MAP, e.to_string()))
}

/// Each counter, summed over CPUs, by name.
pub fn sum(map: &CounterMap) -> Result<Vec<(&'static str, u64)>, MapError> {
    (0..STAT_COUNT)
        .map(|i| Ok((STAT_NAMES[i as usize], map.get(&i, 0)?.iter().sum())))
        .collect()
}
