//! Numeric id allocation for backends and reverse-NAT entries.

use std::collections::BTreeSet;

/// Hands out the lowest released id first, then fresh ones up to `max`.
#[derive(Clone, Debug)]
pub struct IdAllocator {
    max: u32,
    next: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    /// Ids are `1..=max` (0 means "none" in the maps); `used` are the ids
    /// found in the maps at start-up.
    pub fn restore(max: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(1, |last| last + 1);
        let free = (1..next).filter(|id| !used.contains(id)).collect();
        Self { max, next, free }
    }

    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next > self.max {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }

    /// Marks `id` as used (an id a plan allocated on a copy of this allocator).
    pub fn take(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    pub fn release(&mut self, id: u32) {
        if id != 0 && id < self.next {
            self.free.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_released_ids_and_stops_at_max() {
        let mut ids = IdAllocator::restore(3, []);
        assert_eq!(
            (
                ids.allocate(),
                ids.allocate(),
                ids.allocate(),
                ids.allocate()
            ),
            (Some(1), Some(2), Some(3), None)
        );
        ids.release(2);
        assert_eq!(ids.allocate(), Some(2));
        let mut restored = IdAllocator::restore(10, [2, 5]);
        assert_eq!(
            (
                restored.allocate(),
                restored.allocate(),
                restored.allocate()
            ),
            (Some(1), Some(3), Some(4))
        );
        assert_eq!(restored.allocate(), Some(6));
        let mut planned = restored.clone();
        assert_eq!(planned.allocate(), Some(7));
        restored.take(9);
        assert_eq!(
            (
                restored.allocate(),
                restored.allocate(),
                restored.allocate()
            ),
            (Some(7), Some(8), Some(10))
        );
    }
}
