//! Reverse-NAT map: rev-NAT id → the frontend a reply must appear to come from.
//!
//! Conntrack entries carry the rewrite address themselves (one lookup per
//! reply, and replies survive a service edit); this map names each frontend
//! by id for `lb-agent inspect` and `bpftool`, and is written before slot 0 so
//! a frontend is never visible without it.

use crate::user_pod;

pub const REVNAT_MAP: &str = "lb_revnat_v2";

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<RevNat>() == 8 && core::mem::align_of::<RevNat>() == 4);

user_pod!(RevNat);
