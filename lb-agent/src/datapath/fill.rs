//! How big the pinned maps really are (a pinned map keeps the size it was
//! created with, whatever the flags say now), and how full the maps the
//! datapath itself writes are: the session affinity table and the socket
//! LB reverse map (conntrack is counted by its GC). Counting walks the
//! keys, so it runs with the GC pass, not per scrape.

use std::{collections::BTreeMap, os::fd::AsFd as _, path::Path};

use aya::{maps::MapData, Pod};
use lb_common::{
    affinity::{AffinityKey, AffinityValue, AFFINITY6_MAP, AFFINITY_MAP},
    sock::{SockRevNatKey, SockRevNatValue, SOCK_REVNAT6_MAP, SOCK_REVNAT_MAP},
    Ipv6,
};

use super::loader::LoadError;

/// `max_entries` of every pinned map, by name.
pub fn capacities(pin_dir: &Path) -> Result<BTreeMap<&'static str, u32>, LoadError> {
    super::loader::ALL_MAPS
        .into_iter()
        .map(|name| {
            let error = |e: aya::maps::MapError| LoadError::Map(name, e.to_string());
            let data = MapData::from_pin(pin_dir.join(name)).map_err(error)?;
            Ok((name, data.info().map_err(error)?.max_entries()))
        })
        .collect()
}

/// (map name, entries) of each table the datapath itself writes.
pub fn datapath_tables(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>, LoadError> {
    Ok(vec![
        count::<AffinityKey, AffinityValue>(pin_dir, AFFINITY_MAP)?,
        count::<AffinityKey<Ipv6>, AffinityValue>(pin_dir, AFFINITY6_MAP)?,
        count::<SockRevNatKey, SockRevNatValue>(pin_dir, SOCK_REVNAT_MAP)?,
        count::<SockRevNatKey, SockRevNatValue<Ipv6>>(pin_dir, SOCK_REVNAT6_MAP)?,
    ])
}

fn count<K: Pod + Default, V: Pod + Default>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<(&'static str, u64), LoadError> {
    let error = |e: aya::maps::MapError| LoadError::Map(name, e.to_string());
    let data = MapData::from_pin(pin_dir.join(name)).map_err(error)?;
    // A batch at a time: a few syscalls for a table of a million entries.
    let mut batches = super::batch::Batches::<K, V>::new(data.fd().as_fd());
    let mut entries = 0;
    while let Some((keys, _)) = batches.next_batch().map_err(error)? {
        entries += keys.len() as u64;
    }
    Ok((name, entries))
}
