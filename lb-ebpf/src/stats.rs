use lb_common::stats::Stat;

use crate::maps::STATS;

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other writer, no atomics needed.
        unsafe { *counter += 1 };
    }
}
