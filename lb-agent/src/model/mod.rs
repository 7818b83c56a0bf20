//! The agent's view of what to program: frontends (VIP, port, protocol) and
//! the backends behind each, independent of where they came from.

pub mod error;
pub mod maglev;

use std::{fmt, net::IpAddr};

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

/// An address family: which cluster IPs, EndpointSlices (`addressType`),
/// frontends and maps go together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv6() {
            Family::V6
        } else {
            Family::V4
        }
    }

    /// As Kubernetes spells it (`ipFamilies`, an EndpointSlice's
    /// `addressType`); also the metrics' `ip_family` label.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// An address, port and protocol: a frontend (VIP) or a backend (pod), of
/// either family (the family picks the maps it is written to). A frontend's
/// backends are of its own family.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
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

/// How a frontend is reached: a Service's cluster IP, a node port on a node
/// address, a load balancer's IP, or one of `spec.externalIPs`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub const ALL: [FrontendKind; 4] = [
        FrontendKind::ClusterIp,
        FrontendKind::NodePort,
        FrontendKind::LoadBalancer,
        FrontendKind::ExternalIp,
    ];

    /// As Kubernetes names it (`ClusterIP`, …; `externalIP` for `spec.externalIPs`).
    pub const fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "externalIP",
        }
    }

    /// The kind a service map entry's flags name.
    pub fn of_flags(flags: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| flags & k.flag() != 0)
    }

    /// Reached from outside the cluster: `externalTrafficPolicy` applies.
    pub const fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }

    pub const fn flag(self) -> u16 {
        use lb_common::svc::*;
        match self {
            FrontendKind::ClusterIp => SVC_FLAG_CLUSTER_IP,
            FrontendKind::NodePort => SVC_FLAG_NODE_PORT,
            FrontendKind::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
            FrontendKind::ExternalIp => SVC_FLAG_EXTERNAL_IP,
        }
    }

    /// The Service field that asks for this frontend (for errors).
    pub const fn field(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "spec.clusterIP",
            FrontendKind::NodePort => "spec.ports[].nodePort",
            FrontendKind::LoadBalancer => "status.loadBalancer.ingress",
            FrontendKind::ExternalIp => "spec.externalIPs",
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one frontend should forward to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServiceName,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    pub kind: FrontendKind,
    /// This node's backends first, then the others; each part sorted,
    /// without duplicates. Empty: new flows are rejected.
    pub backends: Vec<L4Addr>,
    /// `backends[..local_count]` run on this node.
    pub local_count: usize,
    /// `SVC_FLAG_*` policies besides the kind (traffic policies, affinity).
    pub policy_flags: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// `loadBalancerSourceRanges` (load balancer IPs only; with
    /// `SVC_FLAG_SOURCE_RANGES` set, an empty list admits nobody).
    pub source_ranges: Vec<ipnet::IpNet>,
    /// The size of the frontend's Maglev table (`--lb-algorithm maglev`);
    /// 0: slots are picked by flow hash modulo their count.
    pub maglev_table_size: u32,
}

impl FrontendSpec {
    /// Slot 0's flags: the kind and the policies (the current Maglev
    /// table's bit is the reconciler's).
    pub fn flags(&self) -> u16 {
        let maglev = if self.maglev_table_size > 0 {
            lb_common::svc::SVC_FLAG_MAGLEV
        } else {
            0
        };
        self.kind.flag() | self.policy_flags | maglev
    }
}
