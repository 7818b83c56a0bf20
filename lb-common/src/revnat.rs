//! Reverse-NAT map: rev-NAT id → the frontend a reply must appear to come
//! from, and the Service that owns it.
//!
//! Conntrack entries carry the rewrite address themselves (one lookup per
//! reply, and replies survive a service edit); this map names each frontend
//! by id for `lb-agent inspect` and `bpftool`, and is written before slot 0 so
//! a frontend is never visible without it. The owner lets a restarted agent
//! keep a broken Service's frontends (last good state) instead of deleting
//! them as unknown.

use crate::{user_pod, Ipv4, Ipv6};

pub const REVNAT_MAP: &str = "lb_revnat_v4";
/// IPv6 frontends' names. Rev-NAT ids are one space across both maps.
pub const REVNAT6_MAP: &str = "lb_revnat6_v4";

/// `namespace/name` fits: both are DNS labels of at most 63 bytes.
pub const OWNER_LEN: usize = 128;

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RevNat<A = Ipv4> {
    pub addr: A,
    /// Host order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    /// The owning Service as `namespace/name`, NUL-padded.
    pub owner: [u8; OWNER_LEN],
}

impl<A: Default> Default for RevNat<A> {
    fn default() -> Self {
        Self {
            addr: A::default(),
            port: 0,
            proto: 0,
            _pad: 0,
            owner: [0; OWNER_LEN],
        }
    }
}

const _: () =
    assert!(core::mem::size_of::<RevNat>() == 136 && core::mem::align_of::<RevNat>() == 4);

const _: () = assert!(
    core::mem::size_of::<RevNat<Ipv6>>() == 148 && core::mem::align_of::<RevNat<Ipv6>>() == 4
);

user_pod!(RevNat, RevNat<Ipv6>);
