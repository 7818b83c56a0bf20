//! Everything that touches the kernel: the embedded eBPF object, loading and
//! pinning, typed map access, and attaching to interfaces.

pub mod attach;
pub mod batch;
pub mod cgroup;
pub mod cleanup;
pub mod conntrack;
pub mod counters;
pub mod fill;
pub mod loader;
pub mod maps;
pub mod migrate;
pub mod offline;
pub mod udp_reset;

/// Whether a map error says the key is not there: `KeyNotFound` from a
/// lookup or an iteration, ENOENT from a delete's syscall. For a delete, and
/// for an entry a program removed mid-walk, that is the wanted outcome.
pub fn is_missing(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A delete's outcome: whether it removed an entry. One already gone is
/// success (another writer, or a program, removed it first).
pub fn removed(result: Result<(), aya::maps::MapError>) -> Result<bool, aya::maps::MapError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if is_missing(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The `lb-ebpf` object built by build.rs.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The tc classifiers in the object: DNAT at ingress (the external variant
/// on uplinks also SNATs and answers SNATed flows), reverse NAT at egress.
pub const INGRESS_PROGRAM: &str = "lb_ingress";
pub const INGRESS_EXTERNAL_PROGRAM: &str = "lb_ingress_external";
pub const EGRESS_PROGRAM: &str = "lb_egress";

/// The cgroup sock program of socket LB that deletes a closing socket's
/// reverse entries, and its attach point.
pub const SOCK_RELEASE_PROGRAM: (&str, &str) = ("lb_sock_release", "sock_release");

/// The cgroup sock_addr programs of socket LB, by attach point (the `6`
/// hooks serve dual-stack sockets' IPv4-mapped addresses).
pub const SOCK_PROGRAMS: [(&str, &str); 8] = [
    ("lb_connect4", "connect4"),
    ("lb_sendmsg4", "sendmsg4"),
    ("lb_recvmsg4", "recvmsg4"),
    ("lb_getpeername4", "getpeername4"),
    ("lb_connect6", "connect6"),
    ("lb_sendmsg6", "sendmsg6"),
    ("lb_recvmsg6", "recvmsg6"),
    ("lb_getpeername6", "getpeername6"),
];
