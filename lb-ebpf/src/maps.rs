//! Every map of the datapath, in one place. Sizes here are defaults; the agent
//! overrides `max_entries` at load time from its flags.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    affinity::{AffinityKey, AffinityMatchKey, AffinityValue},
    backend::Backend,
    config::NodeConfig,
    ct::{CtKey, CtValue},
    frag::{FragKey, FragValue, DEFAULT_MAX_FRAG_ENTRIES},
    icmp::IcmpBucket,
    maglev::{MaglevChunk, MaglevKey},
    revnat::RevNat,
    sock::{SockRevNatKey, SockRevNatValue},
    source_range::SourceRangeKey,
    stats::STAT_COUNT,
    svc::{SvcKey, SvcValue},
    Ipv4, Ipv6,
};

/// Each family's service path has its own maps of one shape (`Family`
/// picks them).
pub type ServiceMap<A> = HashMap<SvcKey<A>, SvcValue, 262_144>;
pub type BackendMap<A> = HashMap<u32, Backend<A>, 262_144>;
pub type CtMap<A> = HashMap<CtKey<A>, CtValue<A>, 262_144, { BPF_F_NO_PREALLOC as usize }>;
pub type CtNewMap<A> = LruHashMap<CtKey<A>, CtValue<A>, 65_536>;

#[btf_map(name = "lb_svc_v4")]
pub static SERVICES: ServiceMap<Ipv4> = HashMap::new();

#[btf_map(name = "lb_svc6_v4")]
pub static SERVICES6: ServiceMap<Ipv6> = HashMap::new();

#[btf_map(name = "lb_backend_v4")]
pub static BACKENDS: BackendMap<Ipv4> = HashMap::new();

#[btf_map(name = "lb_backend6_v4")]
pub static BACKENDS6: BackendMap<Ipv6> = HashMap::new();

/// Written by the agent for operators and inspect; the datapath never reads it
/// (conntrack carries the reply address).
#[btf_map(name = "lb_revnat_v4")]
pub static REVNAT: HashMap<u16, RevNat, 65_536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

#[btf_map(name = "lb_revnat6_v4")]
pub static REVNAT6: HashMap<u16, RevNat<Ipv6>, 65_536, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Assured flows. A plain hash, not an LRU: an assured flow is never
/// evicted to make room (a full table leaves new flows in `CT_NEW`,
/// counted); the agent's GC frees expired flows. Not preallocated, so an
/// element deleted during a program run is not recycled under it.
#[btf_map(name = "lb_ct_v4")]
pub static CONNTRACK: CtMap<Ipv4> = HashMap::new();

#[btf_map(name = "lb_ct6_v4")]
pub static CONNTRACK6: CtMap<Ipv6> = HashMap::new();

/// Flows not yet assured. An LRU: a flood of flows that never complete
/// evicts its own kind, and a new flow is always admitted. (LRU maps are
/// preallocated: values are copied out right after each lookup.)
#[btf_map(name = "lb_ct_new_v4")]
pub static CT_NEW: CtNewMap<Ipv4> = LruHashMap::new();

#[btf_map(name = "lb_ct_new6_v4")]
pub static CT_NEW6: CtNewMap<Ipv6> = LruHashMap::new();

#[btf_map(name = "lb_stats_v4")]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// One entry: the node's SNAT address and port range (see `NodeConfig`).
#[btf_map(name = "lb_config_v4")]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

#[btf_map(name = "lb_config6_v4")]
pub static CONFIG6: Array<NodeConfig<Ipv6>, 1> = Array::new();

pub type AffinityMap<A> = LruHashMap<AffinityKey<A>, AffinityValue, 65_536>;
pub type SourceRangeMap<A> = LpmTrie<SourceRangeKey<A>, u8, 16_384, { BPF_F_NO_PREALLOC as usize }>;

/// Session affinity: client + frontend → last backend (see `lb_common::affinity`).
#[btf_map(name = "lb_affinity_v4")]
pub static AFFINITY: AffinityMap<Ipv4> = LruHashMap::new();

#[btf_map(name = "lb_affinity6_v4")]
pub static AFFINITY6: AffinityMap<Ipv6> = LruHashMap::new();

/// The current backends of each affinity frontend, and where they run.
#[btf_map(name = "lb_aff_match_v4")]
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8, 262_144, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// `loadBalancerSourceRanges` per frontend (see `lb_common::source_range`).
#[btf_map(name = "lb_src_range_v4")]
pub static SOURCE_RANGES: SourceRangeMap<Ipv4> = LpmTrie::new();

#[btf_map(name = "lb_src_range6_v4")]
pub static SOURCE_RANGES6: SourceRangeMap<Ipv6> = LpmTrie::new();

/// Socket LB: per socket and backend slot, the backend and the frontend it
/// stood for (for getpeername and recvmsg). Not an LRU: an entry leaves
/// with its socket (`sock_release`), never for another's.
pub type SockRevMap<A> = HashMap<SockRevNatKey, SockRevNatValue<A>, 262_144>;

#[btf_map(name = "lb_sock_rev_v4")]
pub static SOCK_REVNAT: SockRevMap<Ipv4> = HashMap::new();

#[btf_map(name = "lb_sock_rev6_v4")]
pub static SOCK_REVNAT6: SockRevMap<Ipv6> = HashMap::new();

/// Maglev lookup tables, in 1 KiB chunks (see `lb_common::maglev`).
#[btf_map(name = "lb_maglev_v4")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk, 65_536, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Per-CPU scratch for `bpf_fib_lookup`'s parameters (64 bytes), kept off
/// the 512-byte stack. Not pinned: each loaded program has its own.
#[btf_map(name = "lb_fib_scratch")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

/// Per-CPU scratch for conntrack entries a packet works on besides its own
/// copy (0: the entry being updated, 1: its flow's other entry): kept off
/// the 512-byte stack, where IPv6's 64-byte entries did not fit. Not
/// pinned: each loaded program has its own.
#[btf_map(name = "lb_ct_scratch")]
pub static CT_SCRATCH: PerCpuArray<CtValue, 2> = PerCpuArray::new();

#[btf_map(name = "lb_ct_scratch6")]
pub static CT_SCRATCH6: PerCpuArray<CtValue<Ipv6>, 2> = PerCpuArray::new();

/// Per-CPU scratch for an IPv6 socket lookup's tuple (see `host_socket`).
/// Not pinned.
#[btf_map(name = "lb_sock_tuple_scratch")]
pub static SOCK_TUPLE_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_sock_tuple, 1> =
    PerCpuArray::new();

/// Per-CPU scratch for an ICMPv6 answer being built (see `reject`). Not
/// pinned.
#[btf_map(name = "lb_answer6_scratch")]
pub static ANSWER6_SCRATCH: PerCpuArray<crate::reject::Answer6, 1> = PerCpuArray::new();

/// Per-CPU token bucket for the ICMP errors the datapath sends (see
/// `lb_common::icmp`). Not pinned: a restarted agent's programs start with
/// a full burst.
#[btf_map(name = "lb_icmp_bucket")]
pub static ICMP_BUCKET: PerCpuArray<IcmpBucket, 1> = PerCpuArray::new();

/// Later fragments' translations, by datagram (see `lb_common::frag`). Not
/// pinned: a restarted agent's programs start empty, losing at most the
/// datagrams in flight.
pub type FragMap<A> = LruHashMap<FragKey<A>, FragValue<A>, { DEFAULT_MAX_FRAG_ENTRIES as usize }>;

#[btf_map(name = "lb_frag_v4")]
pub static FRAGS: FragMap<Ipv4> = LruHashMap::new();

#[btf_map(name = "lb_frag6_v4")]
pub static FRAGS6: FragMap<Ipv6> = LruHashMap::new();

/// Per-CPU scratch for a fragment record being keyed (see `frag`). Not
/// pinned.
#[btf_map(name = "lb_frag_scratch")]
pub static FRAG_SCRATCH: PerCpuArray<crate::frag::FragRecord<Ipv4>, 1> = PerCpuArray::new();

#[btf_map(name = "lb_frag_scratch6")]
pub static FRAG_SCRATCH6: PerCpuArray<crate::frag::FragRecord<Ipv6>, 1> = PerCpuArray::new();
