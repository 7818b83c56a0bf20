//! Backends map: backend id → pod address and target port.

use crate::{user_pod, Ipv4, Ipv6};

pub const BACKEND_MAP: &str = "lb_backend_v4";
/// IPv6 backends. Ids are one space across both maps.
pub const BACKEND6_MAP: &str = "lb_backend6_v4";
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = Ipv4> {
    pub addr: A,
    /// Host order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

const _: () =
    assert!(core::mem::size_of::<Backend>() == 8 && core::mem::align_of::<Backend>() == 4);

const _: () = assert!(
    core::mem::size_of::<Backend<Ipv6>>() == 20 && core::mem::align_of::<Backend<Ipv6>>() == 4
);

user_pod!(Backend, Backend<Ipv6>);
