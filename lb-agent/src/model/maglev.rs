//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, §3.4), filled here and read
//! by the datapath at `flow_hash % M` (see `lb_common::maglev`).
//!
//! Each backend's preference list is a permutation of the M entries
//! derived from its address alone, and backends take turns claiming their
//! next preferred free entry. So every node builds the same table from the
//! same backends (whatever their order or ids there), each backend gets
//! ⌊M/N⌋ or ⌈M/N⌉ entries, and removing one of N backends moves its own
//! entries and only a few others.

use crate::model::L4Addr;

/// The table sizes offered: primes, each about twice the one before.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071,
];

/// The smallest offered size ≥ 100 × `backends` (the paper's M ≫ N, which
/// keeps the disruption of a change near its ideal), or the largest.
pub fn auto_size(backends: usize) -> u32 {
    let wanted = (backends as u64).saturating_mul(100);
    TABLE_SIZES
        .into_iter()
        .find(|m| u64::from(*m) >= wanted)
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

/// `value` as a size from `TABLE_SIZES`, or why not.
pub fn parse_size(value: &str) -> Result<Option<u32>, String> {
    if value == "auto" {
        return Ok(None);
    }
    match value.parse::<u32>() {
        Ok(m) if TABLE_SIZES.contains(&m) => Ok(Some(m)),
        _ => Err(format!(
            "--maglev-table-size {value}: must be `auto` or one of {TABLE_SIZES:?}"
        )),
    }
}

/// The murmur3 64-bit finalizer: a fixed, well-mixed function, the same on
/// every node and in every release.
const fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A backend's identity for the permutation: address, port and protocol.
fn identity(backend: &L4Addr) -> u64 {
    let addr = match backend.addr {
        std::net::IpAddr::V4(a) => u64::from(u32::from(a)),
        // Folded: identities only need to differ, and the hashes mix them.
        std::net::IpAddr::V6(a) => {
            let bits = u128::from(a);
            (bits as u64) ^ ((bits >> 64) as u64)
        }
    };
    addr << 24 | u64::from(backend.port) << 8 | u64::from(backend.proto.number())
}

/// For each of the `size` entries, the index in `backends` of the backend
/// it leads to. `size` must be a prime greater than the number of backends
/// (an empty list gives an empty table).
pub fn populate(backends: &[L4Addr], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    if backends.is_empty() || m <= backends.len() as u64 {
        return Vec::new();
    }
    // Turns are taken in the order of the identities, not of `backends`
    // (local-first, different on every node).
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|i| identity(&backends[*i]));
    let permutations: Vec<(u64, u64)> = order
        .iter()
        .map(|i| {
            let id = identity(&backends[*i]);
            let offset = mix64(id ^ 0x9e37_79b9_7f4a_7c15) % m;
            let skip = mix64(id ^ 0xc2b2_ae3d_27d4_eb4f) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (turn, (offset, skip)) in permutations.iter().enumerate() {
            // A permutation of 0..m (m prime, 0 < skip < m): a free entry
            // comes before `next` reaches m.
            loop {
                let entry = ((offset + next[turn] * skip) % m) as usize;
                next[turn] += 1;
                if table[entry] == u32::MAX {
                    table[entry] = order[turn] as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn backends(n: u8) -> Vec<L4Addr> {
        (0..n)
            .map(|i| L4Addr {
                addr: std::net::Ipv4Addr::new(198, 18, 10 + i / 200, 2 + i % 200).into(),
                port: 8080,
                proto: Proto::Tcp,
            })
            .collect()
    }

    /// The backend each entry leads to, by address.
    fn by_addr(list: &[L4Addr], table: &[u32]) -> Vec<L4Addr> {
        table.iter().map(|i| list[*i as usize]).collect()
    }

    #[test]
    fn every_backend_gets_its_share_to_within_one_entry() {
        for (n, m) in [(3u8, 509u32), (10, 1_021), (100, 16_381), (7, 251)] {
            let table = populate(&backends(n), m);
            assert_eq!(table.len(), m as usize);
            let mut counts = vec![0u32; usize::from(n)];
            for i in &table {
                counts[*i as usize] += 1;
            }
            let (lo, hi) = (m / u32::from(n), m.div_ceil(u32::from(n)));
            assert!(
                counts.iter().all(|c| (lo..=hi).contains(c)),
                "N={n} M={m}: {counts:?}"
            );
        }
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_nth_of_the_entries() {
        for n in [5u8, 10, 20] {
            let m = auto_size(usize::from(n));
            let all = backends(n);
            let before = by_addr(&all, &populate(&all, m));
            let gone = all[3];
            let rest: Vec<L4Addr> = all.iter().copied().filter(|b| *b != gone).collect();
            let after = by_addr(&rest, &populate(&rest, m));
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let of_survivors = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| **a != gone && a != b)
                .count();
            let fraction = moved as f64 / f64::from(m);
            let ideal = 1.0 / f64::from(n);
            // The removed backend's entries must move; Maglev moves few others.
            assert!(
                fraction >= ideal * 0.95 && fraction <= ideal * 1.5,
                "N={n}: {moved} of {m} entries moved ({fraction:.3}, ideal {ideal:.3})"
            );
            assert!(
                (of_survivors as f64) < 0.5 * ideal * f64::from(m),
                "N={n}: {of_survivors} entries of surviving backends moved"
            );
        }
    }

    #[test]
    fn the_table_depends_on_the_backends_not_their_order() {
        let list = backends(12);
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(
            by_addr(&list, &populate(&list, 1_021)),
            by_addr(&reversed, &populate(&reversed, 1_021))
        );
        // And it is fixed across releases: a change would move flows on upgrade.
        let first: Vec<u32> = populate(&backends(3), 251)[..8].to_vec();
        assert_eq!(first, GOLDEN_FIRST_ENTRIES);
    }

    const GOLDEN_FIRST_ENTRIES: [u32; 8] = [0, 1, 0, 2, 1, 0, 0, 1];

    #[test]
    fn sizes_follow_the_backend_count_and_are_validated() {
        assert_eq!(auto_size(1), 251);
        assert_eq!(auto_size(3), 509);
        assert_eq!(auto_size(100), 16_381);
        assert_eq!(auto_size(100_000), 131_071);
        assert_eq!(parse_size("auto"), Ok(None));
        assert_eq!(parse_size("16381"), Ok(Some(16_381)));
        assert!(parse_size("1000").unwrap_err().contains("16381"));
        assert!(populate(&backends(3), 0).is_empty());
        assert!(populate(&[], 251).is_empty());
    }
}
