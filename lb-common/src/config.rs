//! Node settings the datapath reads on its slow paths: a one-entry array
//! per family the agent rewrites when the node's addresses change (a
//! load-time global could not change without reloading the programs).

use crate::{user_pod, Ipv4, Ipv6};

pub const CONFIG_MAP: &str = "lb_config_v4";
pub const CONFIG6_MAP: &str = "lb_config6_v4";

/// `A`: the family's address type (`Ipv4`, `Ipv6`).
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig<A = Ipv4> {
    /// The node address external flows to other nodes' backends (and
    /// hairpin flows) are SNATed to; all zeros = none (such flows are
    /// dropped, counted as `drop_snat_exhausted`).
    pub snat_addr: A,
    /// SNAT source ports, host order, inclusive. Outside the node's
    /// `ip_local_port_range`, so they never collide with its own sockets.
    pub snat_port_first: u16,
    pub snat_port_last: u16,
}

impl<A> NodeConfig<A> {
    /// Whether `port` is a SNAT port.
    #[inline(always)]
    pub fn is_snat_port(&self, port: u16) -> bool {
        port >= self.snat_port_first && port <= self.snat_port_last
    }
}

const _: () =
    assert!(core::mem::size_of::<NodeConfig>() == 8 && core::mem::align_of::<NodeConfig>() == 4);
const _: () = assert!(core::mem::size_of::<NodeConfig<Ipv6>>() == 20);

user_pod!(NodeConfig, NodeConfig<Ipv6>);
