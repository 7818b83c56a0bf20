//! Everything that touches the kernel: the embedded eBPF object, loading and
//! pinning, typed map access, and attaching to interfaces.

pub mod attach;
pub mod fake;
pub mod loader;
pub mod maps;

/// The `lb-ebpf` object built by build.rs.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Name of the tc classifier in the object.
pub const PROGRAM_NAME: &str = "lb_ingress";
