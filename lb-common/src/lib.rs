//! Map ABI shared by the eBPF programs (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every key and value is `#[repr(C)]`, made of fixed-width integers only, with
//! explicit padding, and asserted for size and alignment. The maps carry BTF,
//! and their fields are laid out to read well in `bpftool map dump`:
//! addresses are their four bytes in wire order (`[198,19,0,10]`, no byte
//! swap anywhere), ports and ids are host-order integers (`80`); the
//! datapath swaps a port's bytes where it meets the packet (one instruction).
//!
//! Layout version: map names carry `_v4`. A layout change bumps the version so
//! a new agent never reads an old pinned map with the wrong shape; the agent
//! migrates the one before it (`lb_agent::datapath::migrate`).
#![no_std]

pub mod affinity;
pub mod backend;
pub mod cidrs;
pub mod config;
pub mod ct;
pub mod family6;
pub mod frag;
pub mod hash;
pub mod icmp;
pub mod maglev;
pub mod revnat;
pub mod sock;
pub mod source_range;
pub mod stats;
pub mod svc;

/// Version of the map layout; part of every map name.
pub const MAP_LAYOUT_VERSION: u32 = 4;

/// An IPv4 address as its four bytes in wire order.
pub type Ipv4 = [u8; 4];

/// An IPv6 address as its sixteen bytes in wire order. Keys and values that
/// hold an address are generic over the family (`SvcKey<Ipv6>`), with
/// IPv4 the default: one layout, one map per family (`lb_svc_v4`,
/// `lb_svc6_v4`), so IPv4 keys stay as small as they were.
pub type Ipv6 = [u8; 16];

/// The address of a packet header field read as a native `u32` (wire order).
#[inline(always)]
pub const fn ipv4(wire: u32) -> Ipv4 {
    wire.to_ne_bytes()
}

/// The address as the packet header holds it, read as a native `u32`.
#[inline(always)]
pub const fn wire(addr: Ipv4) -> u32 {
    u32::from_ne_bytes(addr)
}

/// IANA protocol numbers, as in the IPv4 header and IPv6's next header.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Implements `aya::Pod` for map types on the userspace side only.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), integer fields only, no implicit padding (asserted).
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;
