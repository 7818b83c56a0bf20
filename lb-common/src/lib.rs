//! Map ABI shared by the eBPF programs (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every key and value is `#[repr(C)]`, made of fixed-width integers only, with
//! explicit padding, and asserted for size and alignment. Addresses and ports
//! are stored exactly as they appear on the wire (network byte order, `_be`
//! suffix); the kernel never byte-swaps on the fast path, the agent converts at
//! one boundary (`lb_agent::datapath::maps`).
//!
//! Layout version: map names carry `_v3`. A layout change bumps the version so
//! a new agent never reads an old pinned map with the wrong shape.
#![no_std]

pub mod affinity;
pub mod backend;
pub mod config;
pub mod ct;
pub mod hash;
pub mod revnat;
pub mod sock;
pub mod source_range;
pub mod stats;
pub mod svc;

/// Version of the map layout; part of every map name.
pub const MAP_LAYOUT_VERSION: u32 = 3;

/// IANA protocol numbers, as in the IPv4 header.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;

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
