//! Connect-time load balancing (cgroup sock_addr programs): a socket that
//! connects or sends to a frontend is pointed at a backend once, in the
//! syscall, and its peer address is shown as the frontend again on
//! `getpeername` and `recvmsg`. The reverse map remembers, per socket, the
//! backends it was pointed at and the frontends they stood for.
//!
//! Entries are never evicted — one pod opening sockets by the hundred
//! thousand must not make another's DNS answers come from a pod address —
//! and leave with their socket: the `sock_release` hook deletes a socket's
//! slots. A socket has `SOCK_SLOTS` of them, chosen by backend, so the
//! hook knows every key without a per-socket index; a socket that needs a
//! taken slot, or finds the map full, is left to the tc path. A socket
//! pointed at an IPv6 backend has its entries in the IPv6 map (same keys).

use crate::{user_pod, Ipv4, Ipv6};

pub const SOCK_REVNAT_MAP: &str = "lb_sock_rev_v4";
pub const SOCK_REVNAT6_MAP: &str = "lb_sock_rev6_v4";
/// The map before entries were slotted (an LRU keyed by backend): removed
/// at load, its entries with it.
pub const SOCK_REVNAT_LRU_MAP: &str = "lb_sock_rnat_v4";
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 262_144;
/// Reverse entries one socket can hold: a power of two.
pub const SOCK_SLOTS: u32 = 4;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie`: the socket, for as long as it lives (never
    /// reused until reboot).
    pub cookie: u64,
    /// `sock_slot` of the backend.
    pub slot: u32,
    pub _pad: u32,
}

impl SockRevNatKey {
    /// The key of a socket's entry for a backend.
    #[inline(always)]
    pub const fn new(cookie: u64, backend_addr: Ipv4, backend_port: u16) -> Self {
        Self::of_slot(cookie, sock_slot(backend_addr, backend_port))
    }

    /// The key of a socket's entry for an IPv6 backend (its address folded
    /// as the flow hash folds it).
    #[inline(always)]
    pub const fn new6(cookie: u64, backend_addr: &Ipv6, backend_port: u16) -> Self {
        let folded = crate::hash::fold_ipv6(backend_addr).to_ne_bytes();
        Self::of_slot(cookie, sock_slot(folded, backend_port))
    }

    /// The key of a socket's `slot` (the release hook clears them all).
    #[inline(always)]
    pub const fn of_slot(cookie: u64, slot: u32) -> Self {
        Self {
            cookie,
            slot,
            _pad: 0,
        }
    }
}

/// The slot of a socket's entry for a backend: the same on every hook,
/// since `recvmsg` knows only the backend.
#[inline(always)]
pub const fn sock_slot(addr: Ipv4, port: u16) -> u32 {
    let a = u32::from_be_bytes(addr);
    let h = (a ^ (a >> 16) ^ (port as u32)).wrapping_mul(0x9e37_79b1);
    (h >> 28) & (SOCK_SLOTS - 1)
}

/// `A`: the family's address type (`Ipv4`, `Ipv6`).
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue<A = Ipv4> {
    pub backend_addr: A,
    /// Host order.
    pub backend_port: u16,
    /// Host order.
    pub frontend_port: u16,
    pub frontend_addr: A,
    pub rev_nat_id: u16,
    pub _pad: u16,
}

const _: () = assert!(
    core::mem::size_of::<SockRevNatKey>() == 16 && core::mem::align_of::<SockRevNatKey>() == 8
);
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevNatValue<Ipv6>>() == 40);
const _: () = assert!(SOCK_SLOTS.is_power_of_two() && SOCK_SLOTS <= 16);

user_pod!(SockRevNatKey, SockRevNatValue, SockRevNatValue<Ipv6>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_spread_over_every_slot() {
        let mut seen = [0u32; SOCK_SLOTS as usize];
        for last in 0..=255u8 {
            seen[sock_slot([198, 18, 1, last], 8080) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 32), "{seen:?}");
        assert_ne!(
            sock_slot([198, 18, 1, 2], 53),
            sock_slot([198, 18, 1, 3], 53)
        );
    }
}
