//! Connect-time load balancing (cgroup sock_addr programs): a socket that
//! connects or sends to a frontend is pointed at a backend once, in the
//! syscall, and its peer address is shown as the frontend again on
//! `getpeername` and `recvmsg`. The reverse map remembers, per socket and
//! backend, the frontend it stood for.

use crate::{user_pod, Ipv4};

pub const SOCK_REVNAT_MAP: &str = "lb_sock_rnat_v4";
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 262_144;

#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie`: the socket, for as long as it lives.
    pub cookie: u64,
    pub backend_addr: Ipv4,
    /// Host order.
    pub backend_port: u16,
    pub _pad: u16,
}

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue {
    pub frontend_addr: Ipv4,
    /// Host order.
    pub frontend_port: u16,
    pub rev_nat_id: u16,
}

const _: () = assert!(
    core::mem::size_of::<SockRevNatKey>() == 16 && core::mem::align_of::<SockRevNatKey>() == 8
);
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 8);

user_pod!(SockRevNatKey, SockRevNatValue);
