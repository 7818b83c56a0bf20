//! Typed access to the service maps behind one trait, with the kernel
//! implementation here and an in-memory one in `fake`. This is the only place
//! that converts between the agent's types (`model`) and the map layout
//! (`lb_common`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, Map, MapData, MapError,
    },
    Pod,
};
use ipnet::IpNet;
use lb_common::{
    affinity::{AffinityMatchKey, AFFINITY_BACKEND_LOCAL, AFFINITY_BACKEND_REMOTE},
    backend::{Backend, BACKEND6_MAP, BACKEND_MAP},
    maglev::{MaglevChunk, MaglevKey, MAGLEV_CHUNK, MAGLEV_MAP},
    revnat::{RevNat, OWNER_LEN, REVNAT6_MAP, REVNAT_MAP},
    source_range::{SourceRangeKey, SOURCE_RANGE6_MAP, SOURCE_RANGE_ID_BITS, SOURCE_RANGE_MAP},
    svc::{SvcKey, SvcValue, SVC6_MAP, SVC_MAP},
    Ipv6,
};

use crate::model::{L4Addr, Proto, ServiceName};

/// The trie key of one client prefix of one frontend.
fn range_key<A>(rev_nat_id: u16, addr: A, prefix_len: u8) -> Key<SourceRangeKey<A>>
where
    SourceRangeKey<A>: Pod,
{
    Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(prefix_len),
        SourceRangeKey::new(rev_nat_id, addr),
    )
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("map {map} is full ({capacity} entries): raise {flag}")]
    Full {
        map: &'static str,
        capacity: u32,
        flag: &'static str,
    },
    #[error("{op} on map {map}: {source}")]
    Syscall {
        op: &'static str,
        map: &'static str,
        source: std::sync::Arc<std::io::Error>,
    },
}

/// A reverse-NAT entry: the frontend and the Service that owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevNatEntry {
    pub frontend: L4Addr,
    /// `None` when the stored name is empty or unreadable.
    pub owner: Option<ServiceName>,
}

/// The service maps as the agent reads them back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub slots: BTreeMap<(L4Addr, u16), SvcValue>,
    pub backends: BTreeMap<u32, L4Addr>,
    pub revnat: BTreeMap<u16, RevNatEntry>,
    /// (rev-NAT id, backend id) → the backend runs on this node.
    pub affinity_match: BTreeMap<(u16, u32), bool>,
    /// (rev-NAT id, client prefix) pairs of `loadBalancerSourceRanges`.
    pub source_ranges: std::collections::BTreeSet<(u16, IpNet)>,
    /// (rev-NAT id, table) → the Maglev table's entries, its chunks in
    /// order (a missing chunk reads as zeros).
    pub maglev: BTreeMap<(u16, u16), Vec<u32>>,
}

/// Writes the agent performs, one entry at a time, in the order it chooses.
pub trait LbMaps {
    fn put_backend(&mut self, id: u32, backend: L4Addr) -> Result<(), MapWriteError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError>;
    fn put_slot(
        &mut self,
        frontend: L4Addr,
        slot: u16,
        value: SvcValue,
    ) -> Result<(), MapWriteError>;
    /// Writes a frontend's slots in the order given (one syscall where the
    /// kernel batches); on failure, how many were written, and the error.
    fn put_slots(
        &mut self,
        frontend: L4Addr,
        slots: &[(u16, SvcValue)],
    ) -> Result<(), (usize, MapWriteError)> {
        for (written, &(slot, value)) in slots.iter().enumerate() {
            self.put_slot(frontend, slot, value)
                .map_err(|e| (written, e))?;
        }
        Ok(())
    }
    fn delete_slot(&mut self, frontend: L4Addr, slot: u16) -> Result<(), MapWriteError>;
    fn put_revnat(
        &mut self,
        id: u16,
        frontend: L4Addr,
        owner: &ServiceName,
    ) -> Result<(), MapWriteError>;
    fn delete_revnat(&mut self, id: u16) -> Result<(), MapWriteError>;
    fn put_affinity_match(
        &mut self,
        rev_nat_id: u16,
        backend_id: u32,
        local: bool,
    ) -> Result<(), MapWriteError>;
    fn delete_affinity_match(
        &mut self,
        rev_nat_id: u16,
        backend_id: u32,
    ) -> Result<(), MapWriteError>;
    fn put_source_range(&mut self, rev_nat_id: u16, range: IpNet) -> Result<(), MapWriteError>;
    fn delete_source_range(&mut self, rev_nat_id: u16, range: IpNet) -> Result<(), MapWriteError>;
    /// Writes Maglev table `table` (0 or 1) of a frontend whole, chunk by
    /// chunk (the last one padded with zeros).
    fn put_maglev_table(
        &mut self,
        rev_nat_id: u16,
        table: u16,
        entries: &[u32],
    ) -> Result<(), MapWriteError>;
    /// Deletes a Maglev table's first `chunks` chunks.
    fn delete_maglev_table(
        &mut self,
        rev_nat_id: u16,
        table: u16,
        chunks: u32,
    ) -> Result<(), MapWriteError>;
    fn snapshot(&self) -> Result<Snapshot, MapWriteError>;
}

/// Chunks a Maglev table of `entries` entries takes.
pub fn maglev_chunks(entries: usize) -> u32 {
    entries.div_ceil(MAGLEV_CHUNK as usize) as u32
}

// --- layout conversions -----------------------------------------------------
// Each family's keys and values are the same layout over its address type
// (`lb_common::Ipv4`, `Ipv6`); `Wire` converts an address either way.

/// An address as a family's maps hold it.
pub trait Wire: Copy {
    fn ip(self) -> IpAddr;
}

impl Wire for [u8; 4] {
    fn ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self))
    }
}

impl Wire for Ipv6 {
    fn ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
}

pub fn svc_key(frontend: L4Addr, slot: u16) -> SvcKey {
    SvcKey::new(
        v4_octets(frontend.addr),
        frontend.port,
        frontend.proto.number(),
        slot,
    )
}

pub fn svc6_key(frontend: L4Addr, slot: u16) -> SvcKey<Ipv6> {
    SvcKey::new(
        v6_octets(frontend.addr),
        frontend.port,
        frontend.proto.number(),
        slot,
    )
}

/// The IPv4 map form of an address the caller knows is IPv4 (an IPv6 one,
/// a bug, becomes 0.0.0.0, which no packet carries).
fn v4_octets(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4],
    }
}

fn v6_octets(addr: IpAddr) -> Ipv6 {
    match addr {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn l4<A: Wire>(addr: A, port: u16, proto: u8) -> Option<L4Addr> {
    Some(L4Addr {
        addr: addr.ip(),
        port,
        proto: Proto::from_number(proto)?,
    })
}

pub fn frontend_of<A: Wire>(key: &SvcKey<A>) -> Option<(L4Addr, u16)> {
    Some((l4(key.addr, key.port, key.proto)?, key.slot))
}

pub fn backend_value(backend: L4Addr) -> Backend {
    Backend {
        addr: v4_octets(backend.addr),
        port: backend.port,
        proto: backend.proto.number(),
        flags: 0,
    }
}

pub fn backend6_value(backend: L4Addr) -> Backend<Ipv6> {
    Backend {
        addr: v6_octets(backend.addr),
        port: backend.port,
        proto: backend.proto.number(),
        flags: 0,
    }
}

pub fn backend_of<A: Wire>(value: &Backend<A>) -> Option<L4Addr> {
    l4(value.addr, value.port, value.proto)
}

/// The reverse-NAT entry of `frontend` in its family's layout.
pub fn revnat_value<A: Default>(addr: A, frontend: L4Addr, owner: &ServiceName) -> RevNat<A> {
    let mut value = RevNat {
        addr,
        port: frontend.port,
        proto: frontend.proto.number(),
        ..RevNat::default()
    };
    let name = owner.to_string();
    // Kubernetes names are at most 63 bytes each; a longer one is cut (and
    // then not recognised after a restart, which only loses last-good-state).
    let n = name.len().min(OWNER_LEN - 1);
    value.owner[..n].copy_from_slice(&name.as_bytes()[..n]);
    value
}

pub fn revnat_of<A: Wire>(value: &RevNat<A>) -> Option<RevNatEntry> {
    let end = value
        .owner
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(OWNER_LEN);
    let owner = std::str::from_utf8(&value.owner[..end])
        .ok()
        .and_then(|s| s.split_once('/'))
        .map(|(namespace, name)| ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        });
    Some(RevNatEntry {
        frontend: l4(value.addr, value.port, value.proto)?,
        owner,
    })
}

// --- kernel maps --------------------------------------------------------------

/// The service maps of a loaded (or pinned) datapath.
pub struct KernelMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    /// The service map again, for batch writes.
    svc_fd: std::os::fd::OwnedFd,
    backends: HashMap<MapData, u32, Backend>,
    revnat: HashMap<MapData, u16, RevNat>,
    /// The IPv6 frontends' maps (backend and rev-NAT ids are one space
    /// across both families).
    svc6: HashMap<MapData, SvcKey<Ipv6>, SvcValue>,
    svc6_fd: std::os::fd::OwnedFd,
    backends6: HashMap<MapData, u32, Backend<Ipv6>>,
    revnat6: HashMap<MapData, u16, RevNat<Ipv6>>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    source_ranges6: LpmTrie<MapData, SourceRangeKey<Ipv6>, u8>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    maglev_limit: Limit,
    svc_limit: Limit,
    range_limit: Limit,
    range6_limit: Limit,
    backend_limit: Limit,
    revnat_limit: Limit,
    svc6_limit: Limit,
    backend6_limit: Limit,
    revnat6_limit: Limit,
}

/// One family's service, backend and reverse-NAT maps, for `KernelMaps::new`.
pub struct FamilyMaps {
    pub svc: Map,
    pub backends: Map,
    pub revnat: Map,
}

/// The two families' `loadBalancerSourceRanges` tries.
pub struct SourceRangeMaps {
    pub v4: Map,
    pub v6: Map,
}

/// A map's size and the flag that sets it, for errors that say what to raise.
#[derive(Clone, Copy, Debug)]
struct Limit {
    map: &'static str,
    capacity: u32,
    flag: &'static str,
}

/// Map sizes, for error messages that say which flag to raise.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub source_ranges: u32,
    pub services: u32,
    pub backends: u32,
    pub revnat: u32,
    pub maglev_chunks: u32,
}

impl KernelMaps {
    pub fn new(
        maps4: FamilyMaps,
        maps6: FamilyMaps,
        affinity_match: Map,
        source_ranges: SourceRangeMaps,
        maglev: Map,
        capacity: Capacity,
    ) -> Result<Self, MapError> {
        let FamilyMaps {
            svc,
            backends,
            revnat,
        } = maps4;
        Ok(Self {
            svc6_fd: super::batch::dup_fd(&maps6.svc)?,
            svc6: HashMap::try_from(maps6.svc)?,
            backends6: HashMap::try_from(maps6.backends)?,
            revnat6: HashMap::try_from(maps6.revnat)?,
            svc6_limit: Limit {
                map: SVC6_MAP,
                capacity: capacity.services,
                flag: "--max-service-slots",
            },
            backend6_limit: Limit {
                map: BACKEND6_MAP,
                capacity: capacity.backends,
                flag: "--max-backends",
            },
            revnat6_limit: Limit {
                map: REVNAT6_MAP,
                capacity: capacity.revnat,
                flag: "(65535 frontends at most)",
            },
            svc_fd: super::batch::dup_fd(&svc)?,
            svc: HashMap::try_from(svc)?,
            backends: HashMap::try_from(backends)?,
            revnat: HashMap::try_from(revnat)?,
            affinity_match: HashMap::try_from(affinity_match)?,
            source_ranges: LpmTrie::try_from(source_ranges.v4)?,
            source_ranges6: LpmTrie::try_from(source_ranges.v6)?,
            maglev: HashMap::try_from(maglev)?,
            maglev_limit: Limit {
                map: MAGLEV_MAP,
                capacity: capacity.maglev_chunks,
                flag: "--max-maglev-chunks",
            },
            range_limit: Limit {
                map: SOURCE_RANGE_MAP,
                capacity: capacity.source_ranges,
                flag: "--max-source-ranges",
            },
            range6_limit: Limit {
                map: SOURCE_RANGE6_MAP,
                capacity: capacity.source_ranges,
                flag: "--max-source-ranges",
            },
            svc_limit: Limit {
                map: SVC_MAP,
                capacity: capacity.services,
                flag: "--max-service-slots",
            },
            backend_limit: Limit {
                map: BACKEND_MAP,
                capacity: capacity.backends,
                flag: "--max-backends",
            },
            revnat_limit: Limit {
                map: REVNAT_MAP,
                capacity: capacity.revnat,
                flag: "(65535 frontends at most)",
            },
        })
    }
}

impl KernelMaps {
    fn range_limit(&self, range: IpNet) -> Limit {
        match range {
            IpNet::V4(_) => self.range_limit,
            IpNet::V6(_) => self.range6_limit,
        }
    }
}

impl Limit {
    /// A failed `op`: "full" with the flag to raise, or the syscall's error.
    fn error(self, op: &'static str, err: MapError) -> MapWriteError {
        let io = match err {
            MapError::SyscallError(e) => e.io_error,
            other => std::io::Error::other(other.to_string()),
        };
        if matches!(io.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
            MapWriteError::Full {
                map: self.map,
                capacity: self.capacity,
                flag: self.flag,
            }
        } else {
            MapWriteError::Syscall {
                op,
                map: self.map,
                source: io.into(),
            }
        }
    }
}

/// Deleting an entry that is already gone is success: writes are idempotent.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    super::removed(result).map(|_| ())
}

impl LbMaps for KernelMaps {
    fn put_backend(&mut self, id: u32, backend: L4Addr) -> Result<(), MapWriteError> {
        if backend.addr.is_ipv6() {
            let limit = self.backend6_limit;
            return self
                .backends6
                .insert(id, backend6_value(backend), 0)
                .map_err(|e| limit.error("insert", e));
        }
        let limit = self.backend_limit;
        self.backends
            .insert(id, backend_value(backend), 0)
            .map_err(|e| limit.error("insert", e))
    }

    /// From both families' maps: an id is in one of them.
    fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
        let limit = self.backend_limit;
        ignore_missing(self.backends.remove(&id)).map_err(|e| limit.error("delete", e))?;
        let limit = self.backend6_limit;
        ignore_missing(self.backends6.remove(&id)).map_err(|e| limit.error("delete", e))
    }

    fn put_slot(
        &mut self,
        frontend: L4Addr,
        slot: u16,
        value: SvcValue,
    ) -> Result<(), MapWriteError> {
        if frontend.addr.is_ipv6() {
            let limit = self.svc6_limit;
            return self
                .svc6
                .insert(svc6_key(frontend, slot), value, 0)
                .map_err(|e| limit.error("insert", e));
        }
        let limit = self.svc_limit;
        self.svc
            .insert(svc_key(frontend, slot), value, 0)
            .map_err(|e| limit.error("insert", e))
    }

    fn put_slots(
        &mut self,
        frontend: L4Addr,
        slots: &[(u16, SvcValue)],
    ) -> Result<(), (usize, MapWriteError)> {
        use std::os::fd::AsFd as _;
        let values: Vec<SvcValue> = slots.iter().map(|&(_, value)| value).collect();
        let written = if frontend.addr.is_ipv6() {
            let keys: Vec<SvcKey<Ipv6>> = slots
                .iter()
                .map(|&(slot, _)| svc6_key(frontend, slot))
                .collect();
            super::batch::update_batch(self.svc6_fd.as_fd(), &keys, &values)
                .map_err(|e| (e, self.svc6_limit))
        } else {
            let keys: Vec<SvcKey> = slots
                .iter()
                .map(|&(slot, _)| svc_key(frontend, slot))
                .collect();
            super::batch::update_batch(self.svc_fd.as_fd(), &keys, &values)
                .map_err(|e| (e, self.svc_limit))
        };
        written.map_err(|((written, e), limit)| {
            let error = aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: e,
            };
            (written, limit.error("insert", error.into()))
        })
    }

    fn delete_slot(&mut self, frontend: L4Addr, slot: u16) -> Result<(), MapWriteError> {
        if frontend.addr.is_ipv6() {
            let limit = self.svc6_limit;
            return ignore_missing(self.svc6.remove(&svc6_key(frontend, slot)))
                .map_err(|e| limit.error("delete", e));
        }
        let limit = self.svc_limit;
        ignore_missing(self.svc.remove(&svc_key(frontend, slot)))
            .map_err(|e| limit.error("delete", e))
    }

    fn put_revnat(
        &mut self,
        id: u16,
        frontend: L4Addr,
        owner: &ServiceName,
    ) -> Result<(), MapWriteError> {
        if frontend.addr.is_ipv6() {
            let limit = self.revnat6_limit;
            let value = revnat_value(v6_octets(frontend.addr), frontend, owner);
            return self
                .revnat6
                .insert(id, value, 0)
                .map_err(|e| limit.error("insert", e));
        }
        let limit = self.revnat_limit;
        let value = revnat_value(v4_octets(frontend.addr), frontend, owner);
        self.revnat
            .insert(id, value, 0)
            .map_err(|e| limit.error("insert", e))
    }

    /// From both families' maps, as `delete_backend`.
    fn delete_revnat(&mut self, id: u16) -> Result<(), MapWriteError> {
        let limit = self.revnat_limit;
        ignore_missing(self.revnat.remove(&id)).map_err(|e| limit.error("delete", e))?;
        let limit = self.revnat6_limit;
        ignore_missing(self.revnat6.remove(&id)).map_err(|e| limit.error("delete", e))
    }

    fn put_affinity_match(
        &mut self,
        rev_nat_id: u16,
        backend_id: u32,
        local: bool,
    ) -> Result<(), MapWriteError> {
        // One entry per service slot at most: the map is sized like it.
        let limit = self.svc_limit;
        let value = if local {
            AFFINITY_BACKEND_LOCAL
        } else {
            AFFINITY_BACKEND_REMOTE
        };
        self.affinity_match
            .insert(AffinityMatchKey::new(backend_id, rev_nat_id), value, 0)
            .map_err(|e| limit.error("insert", e))
    }

    fn delete_affinity_match(
        &mut self,
        rev_nat_id: u16,
        backend_id: u32,
    ) -> Result<(), MapWriteError> {
        let limit = self.svc_limit;
        ignore_missing(
            self.affinity_match
                .remove(&AffinityMatchKey::new(backend_id, rev_nat_id)),
        )
        .map_err(|e| limit.error("delete", e))
    }

    fn put_source_range(&mut self, rev_nat_id: u16, range: IpNet) -> Result<(), MapWriteError> {
        let inserted = match range {
            IpNet::V4(net) => {
                let key = range_key(rev_nat_id, net.network().octets(), net.prefix_len());
                self.source_ranges.insert(&key, 1, 0)
            }
            IpNet::V6(net) => {
                let key = range_key(rev_nat_id, net.network().octets(), net.prefix_len());
                self.source_ranges6.insert(&key, 1, 0)
            }
        };
        let limit = self.range_limit(range);
        inserted.map_err(|e| limit.error("insert", e))
    }

    fn delete_source_range(&mut self, rev_nat_id: u16, range: IpNet) -> Result<(), MapWriteError> {
        let removed = match range {
            IpNet::V4(net) => {
                let key = range_key(rev_nat_id, net.network().octets(), net.prefix_len());
                self.source_ranges.remove(&key)
            }
            IpNet::V6(net) => {
                let key = range_key(rev_nat_id, net.network().octets(), net.prefix_len());
                self.source_ranges6.remove(&key)
            }
        };
        let limit = self.range_limit(range);
        ignore_missing(removed).map_err(|e| limit.error("delete", e))
    }

    fn put_maglev_table(
        &mut self,
        rev_nat_id: u16,
        table: u16,
        entries: &[u32],
    ) -> Result<(), MapWriteError> {
        let limit = self.maglev_limit;
        for (chunk, part) in entries.chunks(MAGLEV_CHUNK as usize).enumerate() {
            let mut value = MaglevChunk {
                entries: [0; MAGLEV_CHUNK as usize],
            };
            value.entries[..part.len()].copy_from_slice(part);
            self.maglev
                .insert(MaglevKey::new(rev_nat_id, table, chunk as u32), value, 0)
                .map_err(|e| limit.error("insert", e))?;
        }
        Ok(())
    }

    fn delete_maglev_table(
        &mut self,
        rev_nat_id: u16,
        table: u16,
        chunks: u32,
    ) -> Result<(), MapWriteError> {
        let limit = self.maglev_limit;
        for chunk in 0..chunks {
            ignore_missing(
                self.maglev
                    .remove(&MaglevKey::new(rev_nat_id, table, chunk)),
            )
            .map_err(|e| limit.error("delete", e))?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot, MapWriteError> {
        let read = |limit: Limit| move |e: MapError| limit.error("read", e);
        let mut snapshot = Snapshot::default();
        walk(&self.maglev, self.maglev_limit, |key, value| {
            let table = snapshot
                .maglev
                .entry((key.rev_nat_id, key.table))
                .or_default();
            let at = key.chunk as usize * MAGLEV_CHUNK as usize;
            if table.len() < at + MAGLEV_CHUNK as usize {
                table.resize(at + MAGLEV_CHUNK as usize, 0);
            }
            table[at..at + MAGLEV_CHUNK as usize].copy_from_slice(&value.entries);
        })?;
        walk(&self.svc, self.svc_limit, |key, value| {
            if let Some(at) = frontend_of(&key) {
                snapshot.slots.insert(at, value);
            }
        })?;
        walk(&self.svc6, self.svc6_limit, |key, value| {
            if let Some(at) = frontend_of(&key) {
                snapshot.slots.insert(at, value);
            }
        })?;
        walk(&self.backends, self.backend_limit, |id, value| {
            if let Some(backend) = backend_of(&value) {
                snapshot.backends.insert(id, backend);
            }
        })?;
        walk(&self.backends6, self.backend6_limit, |id, value| {
            if let Some(backend) = backend_of(&value) {
                snapshot.backends.insert(id, backend);
            }
        })?;
        walk(&self.revnat, self.revnat_limit, |id, value| {
            if let Some(entry) = revnat_of(&value) {
                snapshot.revnat.insert(id, entry);
            }
        })?;
        walk(&self.revnat6, self.revnat6_limit, |id, value| {
            if let Some(entry) = revnat_of(&value) {
                snapshot.revnat.insert(id, entry);
            }
        })?;
        for key in self.source_ranges.keys() {
            let key = key.map_err(read(self.range_limit))?;
            let (data, bits) = (key.data(), key.prefix_len() - SOURCE_RANGE_ID_BITS);
            if let Ok(range) = ipnet::Ipv4Net::new(data.addr.into(), bits as u8) {
                let id = u16::from_be(data.rev_nat_id_be);
                snapshot.source_ranges.insert((id, range.into()));
            }
        }
        for key in self.source_ranges6.keys() {
            let key = key.map_err(read(self.range6_limit))?;
            let (data, bits) = (key.data(), key.prefix_len() - SOURCE_RANGE_ID_BITS);
            if let Ok(range) = ipnet::Ipv6Net::new(data.addr.into(), bits as u8) {
                let id = u16::from_be(data.rev_nat_id_be);
                snapshot.source_ranges.insert((id, range.into()));
            }
        }
        walk(&self.affinity_match, self.svc_limit, |key, value| {
            snapshot.affinity_match.insert(
                (key.rev_nat_id, key.backend_id),
                value == AFFINITY_BACKEND_LOCAL,
            );
        })?;
        Ok(snapshot)
    }
}

/// Calls `each` with every entry of `map`; a failed read names the map.
fn walk<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    limit: Limit,
    mut each: impl FnMut(K, V),
) -> Result<(), MapWriteError> {
    for entry in map.iter() {
        let (key, value) = entry.map_err(|e| limit.error("read", e))?;
        each(key, value);
    }
    Ok(())
}
