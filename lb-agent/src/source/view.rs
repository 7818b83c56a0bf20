//! The fields of Services and EndpointSlices the datapath depends on, taken
//! from the k8s-openapi objects once they have parsed. The agent keeps these
//! (a few dozen bytes an endpoint) rather than the full objects (hundreds),
//! which matters at tens of thousands of services.

use std::sync::Arc;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Set by the EndpointSlice controller on each slice it writes.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    /// Shared (`Arc<str>`): the agent's Service names point at these.
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy's.
    pub other_proxy: bool,
    /// `metadata.creationTimestamp`: of two Services claiming one frontend,
    /// the older keeps it (manifests without one sort first, by name).
    pub created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    pub spec: Option<ServiceSpecView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpecView {
    pub type_: Option<String>,
    pub cluster_ip: Option<String>,
    pub cluster_ips: Option<Vec<String>>,
    pub ports: Vec<ServicePortView>,
    pub external_ips: Vec<String>,
    /// `status.loadBalancer.ingress[]` as (ip, ipMode).
    pub load_balancer_ingress: Vec<(Option<String>, Option<String>)>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_s: Option<i32>,
    pub load_balancer_source_ranges: Vec<String>,
    pub health_check_node_port: Option<i32>,
    /// `spec.externalName` (type ExternalName: a DNS alias, no datapath).
    pub external_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortView {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<ProtocolText>,
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label.
    pub service_name: Option<Arc<str>>,
    pub address_type: String,
    pub ports: Vec<SlicePortView>,
    pub endpoints: Vec<EndpointView>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`: when the Pod or
    /// Service change behind this version happened (kube-proxy's network
    /// programming latency starts there).
    pub trigger_time: Option<jiff::Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortView {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<ProtocolText>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    /// `addresses[0]` (kube-proxy uses the first address only); `None` when empty.
    pub address: Option<EndpointAddress>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Interned: a cluster has few nodes and many endpoints.
    pub node_name: Option<Arc<str>>,
    /// `hints.forZones[].name` (topology-aware routing, PreferSameZone).
    pub zone_hints: Vec<Arc<str>>,
    /// `hints.forNodes[].name` (PreferSameNode).
    pub node_hints: Vec<Arc<str>>,
}

/// One shared string per node or zone name, process-wide (they are few
/// and long-lived; endpoints are many).
fn intern_node_name(name: &str) -> Arc<str> {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<Arc<str>>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = names.get(name) {
        return known.clone();
    }
    let name: Arc<str> = name.into();
    names.insert(name.clone());
    name
}

/// A port's protocol as written: the three known ones without an
/// allocation (four per Service and slice), anything else kept for the error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolText {
    Tcp,
    Udp,
    Sctp,
    Other(Box<str>),
}

impl From<&str> for ProtocolText {
    fn from(text: &str) -> Self {
        match text {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            "SCTP" => Self::Sctp,
            other => Self::Other(other.into()),
        }
    }
}

impl ProtocolText {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Other(text) => text,
        }
    }
}

/// An endpoint address: parsed at once (4 bytes, where the text took an
/// allocation: there are ten per Service and more), the text kept only when
/// it is not an IPv4 address, for the error that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(std::net::IpAddr),
    Other(Box<str>),
}

impl EndpointAddress {
    pub fn parse(text: &str) -> Self {
        match text.parse() {
            Ok(ip) => Self::Ip(ip),
            Err(_) => Self::Other(text.into()),
        }
    }
}

impl std::fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Other(text) => f.write_str(text),
        }
    }
}

impl From<&Service> for ServiceView {
    fn from(s: &Service) -> Self {
        let meta = &s.metadata;
        Self {
            namespace: meta.namespace.as_deref().unwrap_or("default").into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
            other_proxy: meta
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)),
            created: meta.creation_timestamp.clone(),
            spec: s.spec.as_ref().map(|spec| ServiceSpecView {
                type_: spec.type_.clone(),
                cluster_ip: spec.cluster_ip.clone(),
                cluster_ips: spec.cluster_ips.clone(),
                ports: spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| ServicePortView {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol.as_deref().map(ProtocolText::from),
                        node_port: p.node_port,
                    })
                    .collect(),
                external_ips: spec.external_ips.clone().unwrap_or_default(),
                external_name: spec.external_name.clone(),
                load_balancer_ingress: s
                    .status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|i| (i.ip.clone(), i.ip_mode.clone()))
                    .collect(),
                external_traffic_policy: spec.external_traffic_policy.clone(),
                internal_traffic_policy: spec.internal_traffic_policy.clone(),
                session_affinity: spec.session_affinity.clone(),
                affinity_timeout_s: spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds),
                load_balancer_source_ranges: spec
                    .load_balancer_source_ranges
                    .clone()
                    .unwrap_or_default(),
                health_check_node_port: spec.health_check_node_port,
            }),
        }
    }
}

impl From<&EndpointSlice> for SliceView {
    fn from(s: &EndpointSlice) -> Self {
        let meta = &s.metadata;
        Self {
            namespace: meta.namespace.as_deref().unwrap_or("default").into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
            service_name: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(|label| Arc::from(label.as_str())),
            address_type: s.address_type.clone(),
            ports: s
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortView {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.as_deref().map(ProtocolText::from),
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    address: e.addresses.first().map(|a| EndpointAddress::parse(a)),
                    ready: e.conditions.as_ref().and_then(|c| c.ready),
                    serving: e.conditions.as_ref().and_then(|c| c.serving),
                    terminating: e.conditions.as_ref().and_then(|c| c.terminating),
                    node_name: e.node_name.as_deref().map(intern_node_name),
                    zone_hints: e
                        .hints
                        .iter()
                        .flat_map(|h| h.for_zones.iter().flatten())
                        .map(|z| intern_node_name(&z.name))
                        .collect(),
                    node_hints: e
                        .hints
                        .iter()
                        .flat_map(|h| h.for_nodes.iter().flatten())
                        .map(|n| intern_node_name(&n.name))
                        .collect(),
                })
                .collect(),
            trigger_time: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .and_then(|t| t.parse().ok()),
        }
    }
}
