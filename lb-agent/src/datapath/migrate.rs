//! Upgrade from the previous map layout (v3) without losing connections.
//!
//! v3 stored addresses and ports as network-order integers; v4 stores
//! addresses as their bytes and ports in host order (see `lb_common`). The
//! old pins stay in use by the old run's programs until this run releases
//! their links, so the copy happens in two stages:
//!
//! 1. `adopt`, right after this run's maps are created: the service state
//!    (only into empty maps: a v4 datapath already programmed is newer),
//!    and the flows, affinity and socket entries. The reconciler then
//!    adopts the service state as after any restart, ids included.
//! 2. `finish`, when this run is attached and programmed: the flows the old
//!    programs created or updated meanwhile (they run first on each hook
//!    until then), once before and once after the old links are released,
//!    then the old pins are removed. Counters (`lb_stats`) start again
//!    from zero.
//!
//! Flows go into free keys; a key holding the same flow takes the v3
//! entry's state (`copy_conntrack`); another flow there is this run's and
//! newer. Affinity and socket entries only into free keys.

use std::path::{Path, PathBuf};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData, MapError},
    Pod,
};
use lb_common::{
    affinity::{AffinityKey, AffinityMatchKey, AffinityValue, AFFINITY_MAP, AFFINITY_MATCH_MAP},
    backend::{Backend, BACKEND_MAP},
    ct::{CtKey, CtValue, CT_MAP},
    revnat::{RevNat, OWNER_LEN, REVNAT_MAP},
    sock::{SockRevNatKey, SockRevNatValue, SOCK_REVNAT_MAP},
    source_range::{SourceRangeKey, SOURCE_RANGE_MAP},
    svc::{SvcKey, SvcValue, SVC_MAP},
};

/// The layout this agent migrates from.
pub const PREVIOUS_LAYOUT: u32 = 3;

/// The v3 maps this module reads, with their v4 counterparts. `lb_stats_v3`
/// and `lb_config_v3` are not copied (counters restart; the agent rewrites
/// the node config) but are removed with the rest.
const SERVICE_STATE: [(&str, &str); 5] = [
    ("lb_svc_v3", SVC_MAP),
    ("lb_backend_v3", BACKEND_MAP),
    ("lb_revnat_v3", REVNAT_MAP),
    ("lb_aff_match_v3", AFFINITY_MATCH_MAP),
    ("lb_src_range_v3", SOURCE_RANGE_MAP),
];
const FLOW_STATE: [(&str, &str); 3] = [
    ("lb_ct_v3", CT_MAP),
    ("lb_affinity_v3", AFFINITY_MAP),
    ("lb_sock_rnat_v3", SOCK_REVNAT_MAP),
];
const NOT_COPIED: [&str; 2] = ["lb_stats_v3", "lb_config_v3"];

/// `BPF_NOEXIST`: write only into a free key.
const NOEXIST: u64 = 1;
/// `BPF_EXIST`: write only over an entry.
const EXIST: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("opening pinned map {map} ({path}): {source}")]
    Open {
        map: &'static str,
        path: PathBuf,
        source: MapError,
    },
    #[error("pinned map {map}: {reason}")]
    Shape { map: &'static str, reason: String },
    #[error("reading map {map}: {source}")]
    Read { map: &'static str, source: MapError },
    #[error("writing map {map}: {source}")]
    Write { map: &'static str, source: MapError },
    #[error("removing {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Entries copied (and, per map, left out because the v4 key was taken or
/// the v4 map was full).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub service_entries: usize,
    pub flows: usize,
    /// Flows copied before whose v3 entries the old programs updated since:
    /// their state brought up to date.
    pub flows_refreshed: usize,
    pub affinity: usize,
    pub sockets: usize,
    pub skipped: usize,
}

/// A v3 datapath pinned in `pin_dir`, to migrate.
#[derive(Debug)]
pub struct Migration {
    pin_dir: PathBuf,
}

impl Migration {
    /// The v3 datapath in `pin_dir`, if its pins are there.
    pub fn pending(pin_dir: &Path) -> Option<Self> {
        previous_names()
            .any(|name| pin_dir.join(name).exists())
            .then(|| Self {
                pin_dir: pin_dir.to_owned(),
            })
    }

    /// Stage 1, after this run's maps are pinned and before the reconciler
    /// reads them.
    pub fn adopt(&self) -> Result<Copied, MigrateError> {
        let mut copied = Copied::default();
        if self.v4_services_empty()? {
            copied.service_entries += self.copy::<v3::SvcKey, v3::SvcValue, SvcKey, SvcValue>(
                SERVICE_STATE[0],
                0,
                |k, v| (k.into(), v.into()),
                &mut copied.skipped,
            )?;
            copied.service_entries += self.copy::<u32, v3::Backend, u32, Backend>(
                SERVICE_STATE[1],
                0,
                |k, v| (k, v.into()),
                &mut copied.skipped,
            )?;
            copied.service_entries += self.copy::<u16, v3::RevNat, u16, RevNat>(
                SERVICE_STATE[2],
                0,
                |k, v| (k, v.into()),
                &mut copied.skipped,
            )?;
            copied.service_entries += self.copy::<AffinityMatchKey, u8, AffinityMatchKey, u8>(
                SERVICE_STATE[3],
                0,
                |k, v| (k, v),
                &mut copied.skipped,
            )?;
            copied.service_entries += self.copy_source_ranges(&mut copied.skipped)?;
        }
        self.copy_flows(&mut copied)?;
        Ok(copied)
    }

    /// Stage 2, once this run is attached and programmed: `release` drops
    /// the old run's links (its programs stop; it runs whatever happens);
    /// the flows they created are copied before and after, then the v3
    /// pins are removed.
    pub fn finish<R>(&self, release: impl FnOnce() -> R) -> (R, Result<Copied, MigrateError>) {
        let mut copied = Copied::default();
        let before = self.copy_flows(&mut copied);
        let released = release();
        let result = before
            .and_then(|()| self.copy_flows(&mut copied))
            .and_then(|()| unpin_previous(&self.pin_dir))
            .map(|()| copied);
        (released, result)
    }

    fn copy_flows(&self, copied: &mut Copied) -> Result<(), MigrateError> {
        self.copy_conntrack(copied)?;
        copied.affinity += self
            .copy::<v3::AffinityKey, AffinityValue, AffinityKey, AffinityValue>(
                FLOW_STATE[1],
                NOEXIST,
                |k, v| (k.into(), v),
                &mut copied.skipped,
            )?;
        copied.sockets += self
            .copy::<v3::SockRevNatKey, v3::SockRevNatValue, SockRevNatKey, SockRevNatValue>(
                FLOW_STATE[2],
                NOEXIST,
                socket_entry,
                &mut copied.skipped,
            )?;
        Ok(())
    }

    /// The conntrack entries. A free key gets the v3 entry. A key holding
    /// the same flow — copied by an earlier stage, while the old programs
    /// went on updating the v3 entry (a refresh, a FIN, an RST) — takes the
    /// v3 state: its flags added, the later expiry. A key holding another
    /// flow (this run's) keeps it. (The read and the write are two calls:
    /// a datapath update between them can be lost, a refresh at most.)
    fn copy_conntrack(&self, copied: &mut Copied) -> Result<(), MigrateError> {
        let (from, to) = FLOW_STATE[0];
        if !self.pin_dir.join(from).exists() {
            return Ok(());
        }
        let entries = read_hash::<v3::CtKey, v3::CtValue>(self.open_map(from)?, from)?;
        let mut target = open_hash::<CtKey, CtValue>(self.open_map(to)?, to)?;
        for (key, value) in entries {
            let (key, value): (CtKey, CtValue) = (key.into(), value.into());
            let (write, flags, count) = match target.get(&key, 0) {
                Ok(held) if !held.same_flow(&value) => {
                    copied.skipped += 1;
                    continue;
                }
                Ok(held) => match merge_flow_state(held, value) {
                    merged if merged == held => continue,
                    // Only where the entry still is: one the GC removed
                    // meanwhile stays removed.
                    merged => (merged, EXIST, &mut copied.flows_refreshed),
                },
                Err(e) if super::is_missing(&e) => (value, NOEXIST, &mut copied.flows),
                Err(source) => return Err(MigrateError::Read { map: to, source }),
            };
            match target.insert(key, write, flags) {
                Ok(()) => *count += 1,
                Err(e) if taken_or_full(&e) || super::is_missing(&e) => copied.skipped += 1,
                Err(source) => return Err(MigrateError::Write { map: to, source }),
            }
        }
        Ok(())
    }

    fn v4_services_empty(&self) -> Result<bool, MigrateError> {
        let map: HashMap<MapData, SvcKey, SvcValue> = self.open(SVC_MAP)?;
        Ok(map.keys().next().is_none())
    }

    /// Copies every entry of a hash map (plain or LRU) of the v3 shape
    /// `(K3, V3)` into its v4 counterpart, converted. A missing v3 pin
    /// copies nothing.
    fn copy<K3: Pod, V3: Pod, K: Pod, V: Pod>(
        &self,
        (from, to): (&'static str, &'static str),
        flags: u64,
        convert: impl Fn(K3, V3) -> (K, V),
        skipped: &mut usize,
    ) -> Result<usize, MigrateError> {
        if !self.pin_dir.join(from).exists() {
            return Ok(0);
        }
        let entries = read_hash::<K3, V3>(self.open_map(from)?, from)?;
        let mut target = open_hash::<K, V>(self.open_map(to)?, to)?;
        let mut n = 0;
        for (k, v) in entries {
            let (k, v) = convert(k, v);
            match target.insert(k, v, flags) {
                Ok(()) => n += 1,
                Err(e) if taken_or_full(&e) => *skipped += 1,
                Err(source) => return Err(MigrateError::Write { map: to, source }),
            }
        }
        Ok(n)
    }

    fn copy_source_ranges(&self, skipped: &mut usize) -> Result<usize, MigrateError> {
        let (from, to) = SERVICE_STATE[4];
        if !self.pin_dir.join(from).exists() {
            return Ok(0);
        }
        let old: LpmTrie<MapData, v3::SourceRangeKey, u8> = self.open(from)?;
        let entries: Vec<(Key<v3::SourceRangeKey>, u8)> = old
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| MigrateError::Read { map: from, source })?;
        let mut new: LpmTrie<MapData, SourceRangeKey, u8> = self.open(to)?;
        let mut n = 0;
        for (key, value) in entries {
            let key = Key::new(key.prefix_len(), key.data().into());
            match new.insert(&key, value, 0) {
                Ok(()) => n += 1,
                Err(e) if taken_or_full(&e) => *skipped += 1,
                Err(source) => return Err(MigrateError::Write { map: to, source }),
            }
        }
        Ok(n)
    }

    fn open_map(&self, name: &'static str) -> Result<Map, MigrateError> {
        let path = self.pin_dir.join(name);
        let shape = |reason: String| MigrateError::Shape { map: name, reason };
        let data = MapData::from_pin(&path).map_err(|source| MigrateError::Open {
            map: name,
            path: path.clone(),
            source,
        })?;
        Map::from_map_data(data).map_err(|e| shape(e.to_string()))
    }

    fn open<T: TryFrom<Map, Error = MapError>>(
        &self,
        name: &'static str,
    ) -> Result<T, MigrateError> {
        T::try_from(self.open_map(name)?).map_err(|e| MigrateError::Shape {
            map: name,
            reason: e.to_string(),
        })
    }
}

/// The key is this run's already (EEXIST), or the v4 map is full (E2BIG,
/// or ENOMEM for a map that is not preallocated): that entry is left out.
fn taken_or_full(e: &MapError) -> bool {
    let MapError::SyscallError(e) = e else {
        return false;
    };
    matches!(
        e.io_error.raw_os_error(),
        Some(libc::EEXIST | libc::E2BIG | libc::ENOMEM)
    )
}

/// A flow's entry as copied before (`held`) brought up to the v3 entry's
/// state (`current`): flags only add (an answer, a FIN, an RST, assured);
/// a state the v3 entry reached brings its expiry (a closed flow's is
/// short), otherwise the later expiry holds.
fn merge_flow_state(held: CtValue, current: CtValue) -> CtValue {
    let flags = held.flags | current.flags;
    let expires_ns = if flags != held.flags {
        current.expires_ns
    } else {
        held.expires_ns.max(current.expires_ns)
    };
    CtValue {
        flags,
        expires_ns,
        ..held
    }
}

/// Removes the previous layout's pins from `pin_dir` (after a migration,
/// or when the agent unpins everything on exit before finishing one).
pub fn unpin_previous(pin_dir: &Path) -> Result<(), MigrateError> {
    for name in previous_names() {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(MigrateError::Unpin { path, source }),
        }
    }
    Ok(())
}

/// The previous layout's (v3) map names.
pub(crate) fn previous_names() -> impl Iterator<Item = &'static str> {
    SERVICE_STATE
        .iter()
        .chain(&FLOW_STATE)
        .map(|(v3, _)| *v3)
        .chain(NOT_COPIED)
}

/// A hash map, plain or LRU (aya's `HashMap` opens both).
fn open_hash<K: Pod, V: Pod>(
    map: Map,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, MigrateError> {
    HashMap::try_from(map).map_err(|e| MigrateError::Shape {
        map: name,
        reason: e.to_string(),
    })
}

/// Every entry, read whole before any write (the map is live: entries a
/// program deletes meanwhile are skipped).
fn read_hash<K: Pod, V: Pod>(map: Map, name: &'static str) -> Result<Vec<(K, V)>, MigrateError> {
    let read = |source| MigrateError::Read { map: name, source };
    let entries: Vec<Result<(K, V), MapError>> = open_hash::<K, V>(map, name)?.iter().collect();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        match entry {
            Ok(kv) => out.push(kv),
            Err(e) if super::is_missing(&e) => {}
            Err(e) => return Err(read(e)),
        }
    }
    Ok(out)
}

/// The v3 layout, as pinned by agents before this one: network-order
/// integers for addresses and ports. Read only.
pub mod v3 {
    use lb_common::revnat::OWNER_LEN;

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct SvcKey {
        pub addr_be: u32,
        pub port_be: u16,
        pub slot: u16,
        pub proto: u8,
        pub _pad: [u8; 3],
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct SvcValue {
        pub backend_id: u32,
        pub count: u16,
        pub rev_nat_id: u16,
        pub local_count: u16,
        pub flags: u16,
        pub affinity_timeout_s: u32,
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct Backend {
        pub addr_be: u32,
        pub port_be: u16,
        pub proto: u8,
        pub flags: u8,
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug)]
    pub struct RevNat {
        pub addr_be: u32,
        pub port_be: u16,
        pub proto: u8,
        pub _pad: u8,
        pub owner: [u8; OWNER_LEN],
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct CtKey {
        pub saddr_be: u32,
        pub daddr_be: u32,
        pub sport_be: u16,
        pub dport_be: u16,
        pub proto: u8,
        pub dir: u8,
        pub _pad: [u8; 2],
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct CtValue {
        pub src_addr_be: u32,
        pub dst_addr_be: u32,
        pub src_port_be: u16,
        pub dst_port_be: u16,
        pub rev_nat_id: u16,
        pub flags: u8,
        pub _pad: u8,
        pub backend_id: u32,
        pub _pad2: u32,
        pub created_ns: u64,
        pub expires_ns: u64,
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct AffinityKey {
        pub client: u32,
        pub rev_nat_id: u16,
        pub client_kind: u16,
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct SourceRangeKey {
        pub rev_nat_id_be: u16,
        pub _pad: u16,
        pub addr_be: u32,
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct SockRevNatKey {
        pub cookie: u64,
        pub backend_addr_be: u32,
        pub backend_port_be: u16,
        pub _pad: u16,
    }

    #[repr(C)]
    #[derive(Copy, Clone, Debug, Default)]
    pub struct SockRevNatValue {
        pub frontend_addr_be: u32,
        pub frontend_port_be: u16,
        pub rev_nat_id: u16,
    }

    const _: () = {
        use core::mem::size_of;
        assert!(size_of::<SvcKey>() == 12 && size_of::<Backend>() == 8);
        assert!(size_of::<SvcValue>() == 16);
        assert!(size_of::<RevNat>() == 136 && size_of::<CtKey>() == 16);
        assert!(size_of::<CtValue>() == 40 && size_of::<AffinityKey>() == 8);
        assert!(size_of::<SourceRangeKey>() == 8 && size_of::<SockRevNatKey>() == 16);
        assert!(size_of::<SockRevNatValue>() == 8);
    };

    // SAFETY: repr(C), integer fields only, no implicit padding (asserted).
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
}

/// A v3 address (network-order integer as read natively) as v4 bytes.
fn addr(be: u32) -> [u8; 4] {
    be.to_ne_bytes()
}

impl From<v3::SvcKey> for SvcKey {
    fn from(k: v3::SvcKey) -> Self {
        SvcKey::new(addr(k.addr_be), u16::from_be(k.port_be), k.proto, k.slot)
    }
}

impl From<v3::SvcValue> for SvcValue {
    fn from(v: v3::SvcValue) -> Self {
        SvcValue {
            backend_id: v.backend_id,
            count: v.count,
            rev_nat_id: v.rev_nat_id,
            local_count: v.local_count,
            flags: v.flags,
            affinity_timeout_s: v.affinity_timeout_s,
            maglev_table_size: 0, // v3 had no Maglev
        }
    }
}

impl From<v3::Backend> for Backend {
    fn from(b: v3::Backend) -> Self {
        Backend {
            addr: addr(b.addr_be),
            port: u16::from_be(b.port_be),
            proto: b.proto,
            flags: b.flags,
        }
    }
}

impl From<v3::RevNat> for RevNat {
    fn from(r: v3::RevNat) -> Self {
        let mut owner = [0; OWNER_LEN];
        owner.copy_from_slice(&r.owner);
        RevNat {
            addr: addr(r.addr_be),
            port: u16::from_be(r.port_be),
            proto: r.proto,
            _pad: 0,
            owner,
        }
    }
}

impl From<v3::CtKey> for CtKey {
    fn from(k: v3::CtKey) -> Self {
        CtKey::new(
            addr(k.saddr_be),
            u16::from_be(k.sport_be),
            addr(k.daddr_be),
            u16::from_be(k.dport_be),
            k.proto,
            k.dir,
        )
    }
}

impl From<v3::CtValue> for CtValue {
    fn from(v: v3::CtValue) -> Self {
        CtValue {
            src_addr: addr(v.src_addr_be),
            dst_addr: addr(v.dst_addr_be),
            src_port: u16::from_be(v.src_port_be),
            dst_port: u16::from_be(v.dst_port_be),
            rev_nat_id: v.rev_nat_id,
            flags: v.flags,
            _pad: 0,
            backend_id: v.backend_id,
            // v3 told a flow's entries apart by `created_ns` (the same in
            // both): the id derives from it.
            flow_id: (v.created_ns ^ (v.created_ns >> 32)) as u32,
            created_ns: v.created_ns,
            expires_ns: v.expires_ns,
        }
    }
}

impl From<v3::AffinityKey> for AffinityKey {
    fn from(k: v3::AffinityKey) -> Self {
        AffinityKey {
            client: addr(k.client),
            rev_nat_id: k.rev_nat_id,
            client_kind: k.client_kind,
        }
    }
}

impl From<v3::SourceRangeKey> for SourceRangeKey {
    fn from(k: v3::SourceRangeKey) -> Self {
        SourceRangeKey::new(u16::from_be(k.rev_nat_id_be), addr(k.addr_be))
    }
}

/// A v3 socket entry, keyed by backend, as the slotted v4 one.
fn socket_entry(k: v3::SockRevNatKey, v: v3::SockRevNatValue) -> (SockRevNatKey, SockRevNatValue) {
    let (backend_addr, backend_port) = (addr(k.backend_addr_be), u16::from_be(k.backend_port_be));
    (
        SockRevNatKey::new(k.cookie, backend_addr, backend_port),
        SockRevNatValue {
            backend_addr,
            backend_port,
            frontend_port: u16::from_be(v.frontend_port_be),
            frontend_addr: addr(v.frontend_addr_be),
            rev_nat_id: v.rev_nat_id,
            _pad: 0,
        },
    )
}

#[cfg(test)]
mod tests {
    use lb_common::ct::{CT_RST, CT_SEEN_REPLY};

    use super::*;

    /// 198.19.0.10 and port 80 as a v3 map held them (network order, read
    /// natively on this little- or big-endian host).
    const VIP_BE: u32 = u32::from_ne_bytes([198, 19, 0, 10]);
    const HTTP_BE: u16 = u16::from_ne_bytes([0, 80]);

    #[test]
    fn v3_tuples_become_v4_bytes_and_host_order_ports() {
        let client_be = u32::from_ne_bytes([198, 18, 1, 2]);
        let backend_be = u32::from_ne_bytes([198, 18, 10, 2]);
        let key = CtKey::from(v3::CtKey {
            saddr_be: client_be,
            daddr_be: VIP_BE,
            sport_be: u16::from_ne_bytes([0x9c, 0x40]), // 40000
            dport_be: HTTP_BE,
            proto: 6,
            dir: 0,
            _pad: [0; 2],
        });
        assert_eq!(
            key,
            CtKey::new([198, 18, 1, 2], 40000, [198, 19, 0, 10], 80, 6, 0)
        );
        let value = CtValue::from(v3::CtValue {
            src_addr_be: client_be,
            dst_addr_be: backend_be,
            src_port_be: u16::from_ne_bytes([0x9c, 0x40]),
            dst_port_be: u16::from_ne_bytes([0x1f, 0x90]), // 8080
            rev_nat_id: 7,
            flags: 1,
            backend_id: 9,
            created_ns: 5,
            expires_ns: 50,
            ..Default::default()
        });
        assert_eq!(
            (value.dst_addr, value.dst_port, value.src_port),
            ([198, 18, 10, 2], 8080, 40000)
        );
        assert_eq!(
            (
                value.rev_nat_id,
                value.flags,
                value.backend_id,
                value.created_ns,
                value.expires_ns,
                value.flow_id
            ),
            (7, 1, 9, 5, 50, 5),
            "the flow id derives from v3's shared created_ns"
        );
        // The pair still rebuilds itself in v4 terms.
        assert_eq!(
            key.peer_key(&value),
            CtKey::new([198, 18, 10, 2], 8080, [198, 18, 1, 2], 40000, 6, 1)
        );
    }

    #[test]
    fn a_flow_copied_before_takes_the_state_its_v3_entry_reached_since() {
        let held = CtValue {
            flags: CT_SEEN_REPLY,
            flow_id: 7,
            expires_ns: 6_000,
            ..CtValue::default()
        };
        // Refreshed by the old program: the later expiry, flags as they were.
        let refreshed = CtValue {
            expires_ns: 9_000,
            ..held
        };
        assert_eq!(merge_flow_state(held, refreshed), refreshed);
        // Closed meanwhile: its flags and its (shorter) closing expiry.
        let closed = CtValue {
            flags: CT_SEEN_REPLY | CT_RST,
            expires_ns: 100,
            ..held
        };
        assert_eq!(merge_flow_state(held, closed), closed);
        // Nothing new (this run refreshed it itself): unchanged.
        let stale = CtValue {
            expires_ns: 10,
            ..held
        };
        assert_eq!(merge_flow_state(held, stale), held);
    }

    #[test]
    fn v3_service_state_converts_field_by_field() {
        let svc = SvcKey::from(v3::SvcKey {
            addr_be: VIP_BE,
            port_be: HTTP_BE,
            slot: 2,
            proto: 17,
            _pad: [0; 3],
        });
        assert_eq!(svc, SvcKey::new([198, 19, 0, 10], 80, 17, 2));
        let mut owner = [0u8; OWNER_LEN];
        owner[..8].copy_from_slice(b"shop/web");
        let revnat = RevNat::from(v3::RevNat {
            addr_be: VIP_BE,
            port_be: HTTP_BE,
            proto: 6,
            _pad: 0,
            owner,
        });
        assert_eq!(
            (revnat.addr, revnat.port, revnat.owner),
            ([198, 19, 0, 10], 80, owner)
        );
        let range = SourceRangeKey::from(v3::SourceRangeKey {
            rev_nat_id_be: 5u16.to_be(),
            _pad: 0,
            addr_be: u32::from_ne_bytes([198, 18, 0, 0]),
        });
        assert_eq!(range, SourceRangeKey::new(5, [198, 18, 0, 0]));
        let (key, value) = socket_entry(
            v3::SockRevNatKey {
                cookie: 42,
                backend_addr_be: u32::from_ne_bytes([198, 18, 1, 2]),
                backend_port_be: 8080u16.to_be(),
                _pad: 0,
            },
            v3::SockRevNatValue {
                frontend_addr_be: VIP_BE,
                frontend_port_be: HTTP_BE,
                rev_nat_id: 7,
            },
        );
        assert_eq!(key, SockRevNatKey::new(42, [198, 18, 1, 2], 8080));
        assert_eq!(
            value,
            SockRevNatValue {
                backend_addr: [198, 18, 1, 2],
                backend_port: 8080,
                frontend_port: 80,
                frontend_addr: [198, 19, 0, 10],
                rev_nat_id: 7,
                _pad: 0,
            }
        );
    }
}
