//! Loads the embedded object, sizes and pins its maps, opens pinned maps.

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use ipnet::IpNet;
use lb_common::{
    affinity::{AFFINITY6_MAP, AFFINITY_MAP, AFFINITY_MATCH_MAP},
    backend::{BACKEND6_MAP, BACKEND_MAP},
    cidrs::{Cidrs, Cidrs6},
    config::{NodeConfig, CONFIG6_MAP, CONFIG_MAP},
    ct::{CtTimeouts, CT6_MAP, CT6_NEW_MAP, CT_MAP, CT_NEW_MAP},
    family6::{PROGRAMS6_MAP, PROGRAM_NAMES},
    icmp::IcmpLimit,
    maglev::MAGLEV_MAP,
    revnat::{REVNAT6_MAP, REVNAT_MAP},
    sock::{SOCK_REVNAT6_MAP, SOCK_REVNAT_LRU_MAP, SOCK_REVNAT_MAP},
    source_range::{SOURCE_RANGE6_MAP, SOURCE_RANGE_MAP},
    stats::{STATS_MAP, STAT_COUNT},
    svc::{SVC6_MAP, SVC_MAP},
    MAP_LAYOUT_VERSION,
};

use super::{
    conntrack::Conntrack,
    maps::{Capacity, FamilyMaps, KernelMaps, SourceRangeMaps},
    udp_reset::UdpResetter,
    EBPF_OBJECT, EGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM, SOCK_PROGRAMS,
    SOCK_RELEASE_PROGRAM,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
pub const ALL_MAPS: [&str; 22] = [
    MAGLEV_MAP,
    SOCK_REVNAT_MAP,
    SOURCE_RANGE_MAP,
    SVC_MAP,
    BACKEND_MAP,
    REVNAT_MAP,
    CT_MAP,
    CT_NEW_MAP,
    STATS_MAP,
    CONFIG_MAP,
    AFFINITY_MAP,
    AFFINITY_MATCH_MAP,
    SVC6_MAP,
    BACKEND6_MAP,
    REVNAT6_MAP,
    CT6_MAP,
    CT6_NEW_MAP,
    CONFIG6_MAP,
    AFFINITY6_MAP,
    SOURCE_RANGE6_MAP,
    SOCK_REVNAT6_MAP,
    // Pinned so it keeps its programs while the agent restarts (a program
    // array is emptied when its last user reference goes).
    PROGRAMS6_MAP,
];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this agent was built with AYA_BUILD_SKIP=1: it embeds no datapath to load")]
    NotEmbedded,
    #[error("pin directory {0}: {1}")]
    PinDir(PathBuf, String),
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("loading the tc programs: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("loading program {name}: {source}")]
    ProgramLoad {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "pin directory {dir} holds maps of map layout v{found} ({names}); this agent uses v{MAP_LAYOUT_VERSION}. \
         Stop the old agent, then remove them (`lb-agent cleanup --pin-dir {dir}`, or rm -r {dir}) and start again: \
         established connections through the old datapath are reset"
    )]
    OtherLayout {
        dir: String,
        found: String,
        names: String,
    },
    #[error("map {0}: {1}")]
    Map(&'static str, String),
}

#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub service_slots: u32,
    pub backends: u32,
    /// Assured flows' table (two entries a flow).
    pub conntrack: u32,
    /// The table of flows not yet assured (an LRU; two entries a flow).
    pub conntrack_new: u32,
    /// Session affinity entries (clients × affinity frontends).
    pub affinity: u32,
    /// `loadBalancerSourceRanges` prefixes over all load balancer IPs.
    pub source_ranges: u32,
    /// Maglev table chunks (256 entries, 1 KiB each) over all frontends.
    pub maglev_chunks: u32,
    /// Socket LB reverse entries (one per open socket and backend it was
    /// pointed at).
    pub socket_entries: u32,
}

impl MapSizes {
    pub fn capacity(&self) -> Capacity {
        Capacity {
            services: self.service_slots,
            backends: self.backends,
            revnat: u16::MAX as u32 + 1,
            source_ranges: self.source_ranges,
            maglev_chunks: self.maglev_chunks,
        }
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            service_slots: lb_common::svc::DEFAULT_MAX_SVC_ENTRIES,
            backends: lb_common::backend::DEFAULT_MAX_BACKENDS,
            conntrack: lb_common::ct::DEFAULT_MAX_CT_ENTRIES,
            conntrack_new: lb_common::ct::DEFAULT_MAX_CT_NEW_ENTRIES,
            affinity: lb_common::affinity::DEFAULT_MAX_AFFINITY_ENTRIES,
            source_ranges: lb_common::source_range::DEFAULT_MAX_SOURCE_RANGES,
            maglev_chunks: lb_common::maglev::DEFAULT_MAX_MAGLEV_CHUNKS,
            socket_entries: lb_common::sock::DEFAULT_MAX_SOCK_REVNAT,
        }
    }
}

/// What the programs read as load-time globals (read-only: changing one
/// takes a reload, which each agent start does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Globals {
    pub timeouts: CtTimeouts,
    pub icmp_limit: IcmpLimit,
    /// Socket LB translates only sockets of the network namespace with this
    /// cookie (the node's: host-network clients); 0: every namespace's.
    pub socket_lb_netns: u64,
    /// `--service-cluster-ip-range`: packets there that no frontend holds
    /// are rejected.
    pub service_cidrs: FamilyCidrs,
    /// `--cluster-cidr`: sources there arriving at an uplink are the
    /// cluster's (not masqueraded on their way to a cluster IP).
    pub cluster_cidrs: FamilyCidrs,
}

/// One CIDR list as the two families' globals hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyCidrs {
    pub v4: Cidrs,
    pub v6: Cidrs6,
}

/// More prefixes of one family than the datapath holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("more than {max} {family} prefixes", max = lb_common::cidrs::MAX_CIDRS)]
pub struct TooManyCidrs {
    pub family: &'static str,
}

impl FamilyCidrs {
    pub const NONE: Self = Self {
        v4: Cidrs::NONE,
        v6: Cidrs6::NONE,
    };

    /// The prefixes, each family's in its own global (host bits dropped).
    pub fn new(nets: &[IpNet]) -> Result<Self, TooManyCidrs> {
        fn push<const W: usize>(
            cidrs: &mut Cidrs<W>,
            family: &'static str,
            addr: &[u8],
            mask: &[u8],
        ) -> Result<(), TooManyCidrs> {
            let i = cidrs.count as usize;
            if i == lb_common::cidrs::MAX_CIDRS {
                return Err(TooManyCidrs { family });
            }
            cidrs.addr[i] = lb_common::cidrs::words(addr);
            cidrs.mask[i] = lb_common::cidrs::words(mask);
            cidrs.count += 1;
            Ok(())
        }
        let mut out = Self::NONE;
        for net in nets {
            match net.trunc() {
                IpNet::V4(n) => push(
                    &mut out.v4,
                    "IPv4",
                    &n.network().octets(),
                    &n.netmask().octets(),
                )?,
                IpNet::V6(n) => push(
                    &mut out.v6,
                    "IPv6",
                    &n.network().octets(),
                    &n.netmask().octets(),
                )?,
            }
        }
        Ok(out)
    }
}

impl Globals {
    pub const DEFAULT: Self = Self {
        timeouts: CtTimeouts::DEFAULT,
        icmp_limit: IcmpLimit::DEFAULT,
        socket_lb_netns: 0,
        service_cidrs: FamilyCidrs::NONE,
        cluster_cidrs: FamilyCidrs::NONE,
    };
}

/// Loads the datapath. With `pin_dir`, maps already pinned there are reused
/// (a restarted agent keeps its services and connections); missing ones are
/// created and pinned. Without it, maps are private (tests).
pub fn load(pin_dir: Option<&Path>, sizes: MapSizes, globals: &Globals) -> Result<Ebpf, LoadError> {
    load_with_log(pin_dir, sizes, globals, false)
}

/// `load`, with the datapath's debug events on or off. Off, the level is a
/// read-only 0 the verifier sees, so the logging branches are pruned from
/// the loaded program: no cost per packet.
pub fn load_with_log(
    pin_dir: Option<&Path>,
    sizes: MapSizes,
    globals: &Globals,
    debug_events: bool,
) -> Result<Ebpf, LoadError> {
    let log_level: u8 = if debug_events {
        aya_log::Level::Debug as u8
    } else {
        0
    };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(aya_log::LEVEL, &log_level, true)
        .map_max_entries(SVC_MAP, sizes.service_slots)
        .map_max_entries(SVC6_MAP, sizes.service_slots)
        .map_max_entries(BACKEND_MAP, sizes.backends)
        .map_max_entries(BACKEND6_MAP, sizes.backends)
        .map_max_entries(CT_MAP, sizes.conntrack)
        .map_max_entries(CT6_MAP, sizes.conntrack)
        .map_max_entries(CT_NEW_MAP, sizes.conntrack_new)
        .map_max_entries(CT6_NEW_MAP, sizes.conntrack_new)
        .map_max_entries(AFFINITY_MAP, sizes.affinity)
        .map_max_entries(AFFINITY6_MAP, sizes.affinity)
        .map_max_entries(AFFINITY_MATCH_MAP, sizes.service_slots)
        .map_max_entries(SOURCE_RANGE_MAP, sizes.source_ranges)
        .map_max_entries(SOURCE_RANGE6_MAP, sizes.source_ranges)
        .map_max_entries(MAGLEV_MAP, sizes.maglev_chunks)
        .map_max_entries(SOCK_REVNAT_MAP, sizes.socket_entries)
        .map_max_entries(SOCK_REVNAT6_MAP, sizes.socket_entries)
        .override_global("CT_TIMEOUTS", &globals.timeouts, true)
        .override_global("ICMP_LIMIT", &globals.icmp_limit, true)
        .override_global("SOCK_LB_NETNS", &globals.socket_lb_netns, true)
        .override_global("SERVICE_CIDRS", &globals.service_cidrs.v4, true)
        .override_global("SERVICE_CIDRS6", &globals.service_cidrs.v6, true)
        .override_global("CLUSTER_CIDRS", &globals.cluster_cidrs.v4, true)
        .override_global("CLUSTER_CIDRS6", &globals.cluster_cidrs.v6, true);
    if let Some(dir) = pin_dir {
        ensure_bpffs_dir(dir)?;
        refuse_other_layouts(dir)?;
        replace_short_pin(dir, STATS_MAP, STAT_COUNT)?;
        replace_short_pin(dir, PROGRAMS6_MAP, lb_common::family6::PROGRAMS)?;
        remove_unslotted_socket_entries(dir)?;
        for name in ALL_MAPS {
            loader.map_pin_path(name, Cow::Owned(dir.join(name)));
        }
    }
    if EBPF_OBJECT.is_empty() {
        return Err(LoadError::NotEmbedded);
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    if let Some(dir) = pin_dir {
        // Whoever can open a pin can rewrite the datapath: root only.
        for name in ALL_MAPS {
            restrict(&dir.join(name), PIN_MODE).map_err(|e| LoadError::PinDir(dir.into(), e))?;
        }
    }
    for name in [INGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, EGRESS_PROGRAM]
        .into_iter()
        .chain(PROGRAM_NAMES)
    {
        let tc = program(&mut ebpf, name)?;
        retry_interrupted(|| tc.load())
            .map_err(|source| LoadError::ProgramLoad { name, source })?;
    }
    fill_programs6(&mut ebpf)?;
    for (name, _) in SOCK_PROGRAMS {
        let sock = program_as::<aya::programs::CgroupSockAddr>(&mut ebpf, name)?;
        retry_interrupted(|| sock.load())
            .map_err(|source| LoadError::ProgramLoad { name, source })?;
    }
    let release = program_as::<aya::programs::CgroupSock>(&mut ebpf, SOCK_RELEASE_PROGRAM.0)?;
    retry_interrupted(|| release.load())?;
    if pin_dir.is_some() {
        warn_on_resized_pins(&ebpf, sizes);
    }
    Ok(ebpf)
}

/// Puts the IPv6 programs into the program array the IPv4 ones tail-call
/// into (`lb_common::family6`). A pinned array from the previous agent is
/// overwritten index by index: a packet meanwhile enters the old program
/// or the new one.
fn fill_programs6(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let mut fds = Vec::new();
    for name in PROGRAM_NAMES {
        let fd = program(ebpf, name)?.fd()?;
        fds.push(
            fd.try_clone()
                .map_err(|e| LoadError::Map(PROGRAMS6_MAP, e.to_string()))?,
        );
    }
    let error = |e: aya::maps::MapError| LoadError::Map(PROGRAMS6_MAP, e.to_string());
    let map = ebpf
        .map_mut(PROGRAMS6_MAP)
        .ok_or_else(|| LoadError::Map(PROGRAMS6_MAP, "missing from the object".into()))?;
    let mut array = aya::maps::ProgramArray::try_from(map).map_err(error)?;
    for (index, fd) in (0u32..).zip(&fds) {
        array.set(index, fd, 0).map_err(error)?;
    }
    Ok(())
}

/// The verifier gives up with EAGAIN when a signal is pending on the
/// loading thread (any handled signal: a child's exit, a SIGTERM being
/// delivered); the load itself was fine. libbpf retries five times, and so
/// do we — aya does not.
fn retry_interrupted(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// Pinned maps are reused as they are: a size flag that changed since they
/// were created has no effect until the pins are removed. Say so.
fn warn_on_resized_pins(ebpf: &Ebpf, sizes: MapSizes) {
    let sized: [(&[&'static str], &str, u32); 8] = [
        (
            &[SVC_MAP, SVC6_MAP],
            "--max-service-slots",
            sizes.service_slots,
        ),
        (
            &[BACKEND_MAP, BACKEND6_MAP],
            "--max-backends",
            sizes.backends,
        ),
        (&[CT_MAP, CT6_MAP], "--max-conntrack", sizes.conntrack),
        (
            &[CT_NEW_MAP, CT6_NEW_MAP],
            "--max-conntrack-new",
            sizes.conntrack_new,
        ),
        (
            &[AFFINITY_MAP, AFFINITY6_MAP],
            "--max-affinity",
            sizes.affinity,
        ),
        (
            &[SOURCE_RANGE_MAP, SOURCE_RANGE6_MAP],
            "--max-source-ranges",
            sizes.source_ranges,
        ),
        (&[MAGLEV_MAP], "--max-maglev-chunks", sizes.maglev_chunks),
        (
            &[SOCK_REVNAT_MAP, SOCK_REVNAT6_MAP],
            "--max-socket-entries",
            sizes.socket_entries,
        ),
    ];
    for (names, flag, wanted) in sized {
        for &name in names {
            let data = match ebpf.map(name) {
                Some(
                    Map::HashMap(data)
                    | Map::LruHashMap(data)
                    | Map::LpmTrie(data)
                    | Map::Array(data),
                ) => data,
                _ => continue,
            };
            if let Ok(info) = data.info() {
                if info.max_entries() != wanted {
                    tracing::warn!(
                        map = name,
                        pinned = info.max_entries(),
                        wanted,
                        "pinned map {name} has {} entries, {flag} asks for {wanted}: keeping the pinned map \
                         (stop the agent without --keep-datapath, or remove the pins, to resize)",
                        info.max_entries()
                    );
                }
            }
        }
    }
}

pub fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    program_as(ebpf, name)
}

/// A program of the object as its type `P`.
pub fn program_as<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::Map("-", format!("program {name} missing from the object")))?;
    Ok(program.try_into()?)
}

/// A pinned map this datapath needs larger (counters added since the
/// counter map was made; programs added to the IPv6 program array) is
/// replaced: counters start again from zero, and a running old program
/// keeps its own map. Reused as is otherwise.
fn replace_short_pin(dir: &Path, name: &'static str, wanted: u32) -> Result<(), LoadError> {
    let path = dir.join(name);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(()); // not pinned yet
    };
    let entries = data
        .info()
        .map_err(|e| LoadError::Map(name, e.to_string()))?
        .max_entries();
    if entries < wanted {
        tracing::info!(
            "pinned map {name} has {entries} entries, this datapath needs {wanted}: replacing it"
        );
        std::fs::remove_file(&path)
            .map_err(|e| LoadError::Map(name, format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// The socket LB reverse map was an LRU keyed by backend before its
/// entries were slotted (see `lb_common::sock`): its pin goes. Sockets it
/// translated keep their backend; `getpeername` and `recvmsg` show the
/// backend's address for the rest of their life.
fn remove_unslotted_socket_entries(dir: &Path) -> Result<(), LoadError> {
    let path = dir.join(SOCK_REVNAT_LRU_MAP);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(
                "removed {}: socket LB reverse entries are slotted now",
                path.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LoadError::Map(
            SOCK_REVNAT_LRU_MAP,
            format!("{}: {e}", path.display()),
        )),
    }
}

/// A pinned map of another layout version would be silently ignored (its
/// name differs) while its old program keeps running: refuse instead, with
/// the way out. The previous version is migrated (`migrate`).
fn refuse_other_layouts(dir: &Path) -> Result<(), LoadError> {
    let ours = format!("_v{MAP_LAYOUT_VERSION}");
    let migrated = format!("_v{}", super::migrate::PREVIOUS_LAYOUT);
    let mut found = std::collections::BTreeSet::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((_, version)) = name.strip_prefix("lb_").and_then(|n| n.rsplit_once("_v")) else {
            continue;
        };
        if !name.ends_with(&ours) && !name.ends_with(&migrated) && version.parse::<u32>().is_ok() {
            found.insert(version.to_owned());
            names.push(name);
        }
    }
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    Err(LoadError::OtherLayout {
        dir: dir.display().to_string(),
        found: found.into_iter().collect::<Vec<_>>().join(", v"),
        names: names.join(", "),
    })
}

/// Takes the service maps out of a loaded datapath for the reconciler.
pub fn kernel_maps(ebpf: &mut Ebpf, sizes: MapSizes) -> Result<KernelMaps, LoadError> {
    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .ok_or_else(|| LoadError::Map(name, "missing from the object".into()))
    };
    let maps4 = FamilyMaps {
        svc: take(SVC_MAP)?,
        backends: take(BACKEND_MAP)?,
        revnat: take(REVNAT_MAP)?,
    };
    let maps6 = FamilyMaps {
        svc: take(SVC6_MAP)?,
        backends: take(BACKEND6_MAP)?,
        revnat: take(REVNAT6_MAP)?,
    };
    let affinity_match = take(AFFINITY_MATCH_MAP)?;
    let source_ranges = SourceRangeMaps {
        v4: take(SOURCE_RANGE_MAP)?,
        v6: take(SOURCE_RANGE6_MAP)?,
    };
    KernelMaps::new(
        maps4,
        maps6,
        affinity_match,
        source_ranges,
        take(MAGLEV_MAP)?,
        sizes.capacity(),
    )
    .map_err(|e| LoadError::Map(SVC_MAP, e.to_string()))
}

/// Takes the conntrack tables out of a loaded datapath for the GC.
pub fn conntrack(ebpf: &mut Ebpf) -> Result<Conntrack, LoadError> {
    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .ok_or_else(|| LoadError::Map(name, "missing from the object".into()))
    };
    let (assured, new) = (take(CT_MAP)?, take(CT_NEW_MAP)?);
    Conntrack::new(assured, new).map_err(|e| LoadError::Map(CT_MAP, e.to_string()))
}

/// Takes the IPv6 conntrack tables out of a loaded datapath for the GC.
pub fn conntrack6(ebpf: &mut Ebpf) -> Result<Conntrack<lb_common::Ipv6>, LoadError> {
    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .ok_or_else(|| LoadError::Map(name, "missing from the object".into()))
    };
    let (assured, new) = (take(CT6_MAP)?, take(CT6_NEW_MAP)?);
    Conntrack::new(assured, new).map_err(|e| LoadError::Map(CT6_MAP, e.to_string()))
}

/// Opens the pinned IPv6 conntrack tables (for `inspect`).
pub fn open_conntrack6(pin_dir: &Path) -> Result<Conntrack<lb_common::Ipv6>, LoadError> {
    let (assured, new) = (
        open_pinned(pin_dir, CT6_MAP)?,
        open_pinned(pin_dir, CT6_NEW_MAP)?,
    );
    Conntrack::new(assured, new).map_err(|e| LoadError::Map(CT6_MAP, e.to_string()))
}

/// Opens the pinned conntrack tables (for `inspect` and `explain`).
pub fn open_conntrack(pin_dir: &Path) -> Result<Conntrack, LoadError> {
    let (assured, new) = (
        open_pinned(pin_dir, CT_MAP)?,
        open_pinned(pin_dir, CT_NEW_MAP)?,
    );
    Conntrack::new(assured, new).map_err(|e| LoadError::Map(CT_MAP, e.to_string()))
}

/// Takes the socket LB reverse map out of a loaded datapath, for resetting
/// connected UDP sockets whose backend left.
/// The UDP resetter; with socket LB for host-network clients only
/// (`globals.socket_lb_netns`), it searches the agent's own namespace.
pub fn udp_resetter(ebpf: &mut Ebpf, globals: &Globals) -> Result<UdpResetter, LoadError> {
    let mut take = |name: &'static str| {
        ebpf.take_map(name)
            .ok_or_else(|| LoadError::Map(name, "missing from the object".into()))
    };
    let (map, map6) = (take(SOCK_REVNAT_MAP)?, take(SOCK_REVNAT6_MAP)?);
    let resetter =
        UdpResetter::new(map, map6).map_err(|e| LoadError::Map(SOCK_REVNAT_MAP, e.to_string()))?;
    Ok(resetter.own_namespace_only(globals.socket_lb_netns != 0))
}

/// The node settings map (SNAT address and ports), for the agent to keep current.
/// The datapath's node settings, one per family (`lb_config_v4`,
/// `lb_config6_v4`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfigs {
    pub v4: NodeConfig,
    pub v6: NodeConfig<lb_common::Ipv6>,
}

impl NodeConfigs {
    /// The SNAT addresses set, IPv4 first.
    pub fn snat_addresses(&self) -> Vec<std::net::IpAddr> {
        let v4 = std::net::Ipv4Addr::from(self.v4.snat_addr);
        let v6 = std::net::Ipv6Addr::from(self.v6.snat_addr);
        [std::net::IpAddr::V4(v4), std::net::IpAddr::V6(v6)]
            .into_iter()
            .filter(|a| !a.is_unspecified())
            .collect()
    }
}

pub struct ConfigMap {
    v4: aya::maps::Array<MapData, NodeConfig>,
    v6: aya::maps::Array<MapData, NodeConfig<lb_common::Ipv6>>,
}

impl ConfigMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        fn array<V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<aya::maps::Array<MapData, V>, LoadError> {
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| LoadError::Map(name, "missing from the object".into()))?;
            aya::maps::Array::try_from(map).map_err(|e| LoadError::Map(name, e.to_string()))
        }
        Ok(Self {
            v4: array(ebpf, CONFIG_MAP)?,
            v6: array(ebpf, CONFIG6_MAP)?,
        })
    }

    /// Writes both families' settings, IPv6 first: its SNAT address is
    /// new, IPv4's may be in use.
    pub fn set(&mut self, config: &NodeConfigs) -> Result<(), LoadError> {
        self.v6
            .set(0, config.v6, 0)
            .map_err(|e| LoadError::Map(CONFIG6_MAP, e.to_string()))?;
        self.v4
            .set(0, config.v4, 0)
            .map_err(|e| LoadError::Map(CONFIG_MAP, e.to_string()))
    }
}

/// Opens one pinned map (for `inspect` and tests).
pub fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, LoadError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        LoadError::Map(
            name,
            format!("{}: {e} (is lb-agent running?)", path.display()),
        )
    })?;
    Map::from_map_data(data).map_err(|e| LoadError::Map(name, e.to_string()))
}

/// Pins and their directories are the datapath's control surface: only
/// their owner (root) may open them.
pub const PIN_MODE: u32 = 0o600;
pub const PIN_DIR_MODE: u32 = 0o700;

/// Sets `path`'s permission bits.
pub fn restrict(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {}: {e}", path.display()))
}

fn ensure_bpffs_dir(dir: &Path) -> Result<(), LoadError> {
    let err = |m: String| LoadError::PinDir(dir.to_path_buf(), m);
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    restrict(dir, PIN_DIR_MODE).map_err(err)?;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| err(e.to_string()))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    if stat.f_type as i64 != BPF_FS_MAGIC {
        return Err(err(
            "not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)".into(),
        ));
    }
    Ok(())
}

/// Forwards the datapath's debug events (aya-log records) into the agent's
/// log, target `datapath`, until the process ends.
pub fn forward_debug_events(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing)
        .map_err(|e| LoadError::Map("AYA_LOGS", e.to_string()))?;
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives,
    // and the AsyncFd owns the logger.
    let mut ready = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| LoadError::Map("AYA_LOGS", e.to_string()))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ready.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// aya-log hands records to a `log::Log`; the agent logs with tracing.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::info!(target: "datapath", "{}", record.args());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// Each family's prefixes land in its own global, host bits dropped,
    /// and the datapath's `contains` matches inside them only.
    #[test]
    fn cidrs_of_both_families_go_to_their_own_globals() {
        let cidrs = FamilyCidrs::new(&nets(&["198.19.0.7/16", "2001:db8:19::1/48"])).unwrap();
        assert_eq!((cidrs.v4.count, cidrs.v6.count), (1, 1));
        let v4 = |a: &str| a.parse::<std::net::Ipv4Addr>().unwrap().octets();
        let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert!(cidrs.v4.contains(&v4("198.19.255.1")));
        assert!(!cidrs.v4.contains(&v4("198.18.0.1")));
        assert!(cidrs.v6.contains(&v6("2001:db8:19:ffff::1")));
        assert!(!cidrs.v6.contains(&v6("2001:db8:18::1")));
        assert!(!cidrs.v6.contains(&v6("2001:db9:19::1")));
        assert!(!FamilyCidrs::NONE.v6.contains(&v6("2001:db8:19::1")));
    }

    #[test]
    fn more_than_four_prefixes_of_a_family_are_refused_naming_it() {
        let four_each = nets(&[
            "198.18.0.0/24",
            "198.18.1.0/24",
            "198.18.2.0/24",
            "198.18.3.0/24",
            "2001:db8:1::/48",
            "2001:db8:2::/48",
            "2001:db8:3::/48",
            "2001:db8:4::/48",
        ]);
        assert!(FamilyCidrs::new(&four_each).is_ok());
        let mut five_v6 = four_each.clone();
        five_v6.push("2001:db8:5::/48".parse().unwrap());
        let err = FamilyCidrs::new(&five_v6).unwrap_err();
        assert_eq!(err.to_string(), "more than 4 IPv6 prefixes");
    }
}
