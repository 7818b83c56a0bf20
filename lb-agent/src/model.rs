//! The agent's view of what to program: frontends (VIP, port, protocol) and
//! the backends behind each, independent of where they came from.

use std::{fmt, net::Ipv4Addr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// An address, port and protocol: a frontend (VIP) or a backend (pod).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// `namespace/name` of a Service. Shared strings: the agent holds a
/// Service's name in several places (store, results, specs, write records),
/// and a clone is a reference count, not a copy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What one frontend should forward to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceName,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Sorted, without duplicates. Empty: new flows are rejected.
    pub backends: Vec<L4Addr>,
    /// The node each backend runs on (same index as `backends`), where the
    /// EndpointSlice says; for the node-local traffic policies.
    pub nodes: Vec<Option<std::sync::Arc<str>>>,
}
