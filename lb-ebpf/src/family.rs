//! IPv4 and IPv6 run one service path, generic over the family's address
//! type (`lb_common::Ipv4`, `Ipv6`): this trait gives each family's maps
//! and what the path needs to know of an address. What only one family has
//! is the business of the module that has it (`nat::Rewrite`, the
//! program's `Edges`).

use lb_common::{Ipv4, Ipv6};

use aya_ebpf::cty::c_void;
use lb_common::{config::NodeConfig, ct::CtValue};

use crate::{
    cidrs, host_socket,
    maps::{
        AffinityMap, BackendMap, CtMap, CtNewMap, ServiceMap, SourceRangeMap, AFFINITY, AFFINITY6,
        BACKENDS, BACKENDS6, CONFIG, CONFIG6, CONNTRACK, CONNTRACK6, CT_NEW, CT_NEW6, CT_SCRATCH,
        CT_SCRATCH6, SERVICES, SERVICES6, SOURCE_RANGES, SOURCE_RANGES6,
    },
};

pub trait Family: Copy + PartialEq + Default + 'static {
    /// An address's length in bits (a whole address as an LPM prefix).
    const BITS: u32;
    fn services() -> &'static ServiceMap<Self>;
    fn backends() -> &'static BackendMap<Self>;
    /// Assured flows, and flows not yet assured (see `ct`).
    fn conntrack() -> &'static CtMap<Self>;
    fn ct_new() -> &'static CtNewMap<Self>;
    fn affinity() -> &'static AffinityMap<Self>;
    fn source_ranges() -> &'static SourceRangeMap<Self>;
    /// The node's SNAT address and ports for this family.
    fn config() -> Option<&'static NodeConfig<Self>>;
    /// This CPU's two scratch entries (see `maps::CT_SCRATCH`): an entry
    /// being updated and its flow's other entry. `None` never happens.
    fn ct_scratch() -> Option<(*mut CtValue<Self>, *mut CtValue<Self>)>;
    /// The address folded to 32 bits, as the flow hash takes it (an IPv4
    /// address is its own: slots stay where they were).
    fn fold(&self) -> u32;
    /// Backend `id` is still in the backends map at `addr` (a forward
    /// entry's destination).
    fn backend_at(id: u32, addr: &Self) -> bool;
    /// Equality, as the BPF backend can compile it: rustc compares a
    /// 16-byte array as one 128-bit integer, whose 16-byte-aligned stack
    /// copies crash LLVM's BPF memcpy expansion. Use this, never `==`, on
    /// addresses and on keys that hold them.
    fn same(&self, other: &Self) -> bool;
    fn is_unspecified(&self) -> bool;
    /// In `--service-cluster-ip-range`, `--cluster-cidr` (see `cidrs`).
    fn in_service_cidrs(&self) -> bool;
    fn in_cluster_cidrs(&self) -> bool;
    /// Whether a socket of the node takes `proto` from `saddr` to `daddr`
    /// (`ports` = `sport << 16 | dport`, see `host_socket`).
    fn host_receives(ctx: *mut c_void, proto: u8, saddr: &Self, daddr: &Self, ports: u32) -> bool;
}

/// `backend_at` for IPv4: a BPF function of its own, taking scalars:
/// inlined, or given a pointer to the entry, it doubled the paths the
/// verifier walks after it (the external program: 261 k instructions
/// instead of 141 k).
#[inline(never)]
fn backend_at_v4(id: u32, addr: u32) -> bool {
    // SAFETY: the pointer is valid for this program run; copied at once.
    BACKENDS
        .get_ptr(&id)
        .is_some_and(|b| u32::from_ne_bytes(unsafe { (*b).addr }) == addr)
}

/// `in_service_cidrs` (`CLUSTER` false) and `in_cluster_cidrs` for IPv6:
/// a BPF function of its own: inlined, its unrolled compares took stack
/// slots of the new-flow programs, which debug events leave none to spare.
#[inline(never)]
fn in_cidrs6<const CLUSTER: bool>(addr: &Ipv6) -> bool {
    let cidrs = if CLUSTER {
        &cidrs::CLUSTER_CIDRS6
    } else {
        &cidrs::SERVICE_CIDRS6
    };
    cidrs.contains(addr)
}

impl Family for Ipv4 {
    const BITS: u32 = 32;
    #[inline(always)]
    fn affinity() -> &'static AffinityMap<Self> {
        &AFFINITY
    }
    #[inline(always)]
    fn source_ranges() -> &'static SourceRangeMap<Self> {
        &SOURCE_RANGES
    }
    #[inline(always)]
    fn in_service_cidrs(&self) -> bool {
        cidrs::SERVICE_CIDRS.contains(self)
    }
    #[inline(always)]
    fn in_cluster_cidrs(&self) -> bool {
        cidrs::CLUSTER_CIDRS.contains(self)
    }
    #[inline(always)]
    fn services() -> &'static ServiceMap<Self> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static BackendMap<Self> {
        &BACKENDS
    }
    #[inline(always)]
    fn conntrack() -> &'static CtMap<Self> {
        &CONNTRACK
    }
    #[inline(always)]
    fn ct_new() -> &'static CtNewMap<Self> {
        &CT_NEW
    }
    #[inline(always)]
    fn ct_scratch() -> Option<(*mut CtValue<Self>, *mut CtValue<Self>)> {
        Some((CT_SCRATCH.get_ptr_mut(0)?, CT_SCRATCH.get_ptr_mut(1)?))
    }
    #[inline(always)]
    fn fold(&self) -> u32 {
        u32::from_ne_bytes(*self)
    }
    #[inline(always)]
    fn backend_at(id: u32, addr: &Self) -> bool {
        backend_at_v4(id, u32::from_ne_bytes(*addr))
    }
    #[inline(always)]
    fn config() -> Option<&'static NodeConfig<Self>> {
        CONFIG.get(0)
    }
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        self == other
    }
    #[inline(always)]
    fn is_unspecified(&self) -> bool {
        u32::from_ne_bytes(*self) == 0
    }
    #[inline(always)]
    fn host_receives(ctx: *mut c_void, proto: u8, saddr: &Self, daddr: &Self, ports: u32) -> bool {
        let (saddr, daddr) = (u32::from_ne_bytes(*saddr), u32::from_ne_bytes(*daddr));
        host_socket::receives(ctx, proto, saddr, daddr, ports)
    }
}

impl Family for Ipv6 {
    const BITS: u32 = 128;
    #[inline(always)]
    fn affinity() -> &'static AffinityMap<Self> {
        &AFFINITY6
    }
    #[inline(always)]
    fn source_ranges() -> &'static SourceRangeMap<Self> {
        &SOURCE_RANGES6
    }
    #[inline(always)]
    fn in_service_cidrs(&self) -> bool {
        in_cidrs6::<false>(self)
    }
    #[inline(always)]
    fn in_cluster_cidrs(&self) -> bool {
        in_cidrs6::<true>(self)
    }
    #[inline(always)]
    fn services() -> &'static ServiceMap<Self> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static BackendMap<Self> {
        &BACKENDS6
    }
    #[inline(always)]
    fn conntrack() -> &'static CtMap<Self> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn ct_new() -> &'static CtNewMap<Self> {
        &CT_NEW6
    }
    #[inline(always)]
    fn ct_scratch() -> Option<(*mut CtValue<Self>, *mut CtValue<Self>)> {
        Some((CT_SCRATCH6.get_ptr_mut(0)?, CT_SCRATCH6.get_ptr_mut(1)?))
    }
    #[inline(always)]
    fn fold(&self) -> u32 {
        lb_common::hash::fold_ipv6(self)
    }
    #[inline(always)]
    fn backend_at(id: u32, addr: &Self) -> bool {
        // SAFETY: as `backend_at_v4`.
        BACKENDS6
            .get_ptr(&id)
            .is_some_and(|b| unsafe { &(*b).addr }.same(addr))
    }
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        // Words xored and or-ed: no chain of compares for LLVM to merge
        // back into one wide compare.
        let word = |a: &Self, i: usize| {
            // SAFETY: i < 4: inside the array; unaligned reads.
            unsafe { core::ptr::read_unaligned((a.as_ptr() as *const u32).add(i)) }
        };
        let mut diff = 0;
        for i in 0..4 {
            diff |= word(self, i) ^ word(other, i);
        }
        diff == 0
    }
    #[inline(always)]
    fn config() -> Option<&'static NodeConfig<Self>> {
        CONFIG6.get(0)
    }
    #[inline(always)]
    fn is_unspecified(&self) -> bool {
        self.same(&[0; 16])
    }
    #[inline(always)]
    fn host_receives(ctx: *mut c_void, proto: u8, saddr: &Self, daddr: &Self, ports: u32) -> bool {
        host_socket::receives6(ctx, proto, saddr, daddr, ports)
    }
}
