//! Node settings the datapath reads on its slow paths: a one-entry array
//! the agent rewrites when the node's addresses change (a load-time global
//! could not change without reloading the programs).

use crate::{user_pod, Ipv4};

pub const CONFIG_MAP: &str = "lb_config_v4";

#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node address external flows to other nodes' backends are SNATed
    /// to; 0.0.0.0 = none (such flows are dropped, counted as `drop_snat_exhausted`).
    pub snat_addr: Ipv4,
    /// SNAT source ports, host order, inclusive. Outside the node's
    /// `ip_local_port_range`, so they never collide with its own sockets.
    pub snat_port_first: u16,
    pub snat_port_last: u16,
}

impl NodeConfig {
    /// Whether a packet to `addr:port` may be the reply of a SNATed flow.
    #[inline(always)]
    pub fn is_snat_target(&self, addr: Ipv4, port: u16) -> bool {
        let snat = crate::wire(self.snat_addr);
        snat != 0
            && crate::wire(addr) == snat
            && port >= self.snat_port_first
            && port <= self.snat_port_last
    }
}

const _: () =
    assert!(core::mem::size_of::<NodeConfig>() == 8 && core::mem::align_of::<NodeConfig>() == 4);

user_pod!(NodeConfig);
