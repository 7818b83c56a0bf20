//! One Service and its EndpointSlices → its frontends, each with its
//! backends (or the errors that stop it): ports, policies, addresses,
//! endpoints, limits.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
};

use super::{LbAlgorithm, Limits, NodeContext};
use crate::{
    model::error::{InputError, InputErrorKind},
    model::{Family, FrontendKind, FrontendSpec, L4Addr, Proto, ServiceName},
    source::objects::Sourced,
    source::view::{
        EndpointAddress, ProtocolText, ServiceSpecView, ServiceView, SliceView,
        SERVICE_PROXY_NAME_LABEL,
    },
};

/// Where an error is: the file and the object, for every error about it.
pub(super) struct ErrCtx {
    pub(super) file: Option<PathBuf>,
    pub(super) object: String,
}

impl ErrCtx {
    pub(super) fn error(&self, kind: InputErrorKind, field: &str, message: &str) -> InputError {
        InputError {
            kind,
            file: self.file.clone(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

pub(super) fn service_frontends(
    service: &Sourced<ServiceView>,
    name: &ServiceName,
    slices: &[&Sourced<SliceView>],
    limits: Limits,
    node: &NodeContext,
) -> (Vec<(L4Addr, FrontendSpec)>, Vec<InputError>) {
    let ctx = ErrCtx {
        file: service.file.clone(),
        object: format!("Service {name}"),
    };
    if service.object.other_proxy {
        tracing::debug!(service = %name, "skipped: {SERVICE_PROXY_NAME_LABEL} is set");
        return (Vec::new(), Vec::new());
    }
    let Some(spec) = &service.object.spec else {
        return (
            Vec::new(),
            vec![ctx.error(InputErrorKind::InvalidField, "spec", "missing")],
        );
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return (Vec::new(), Vec::new());
    }
    let mut errors = Vec::new();
    let vips = match cluster_ips(spec, &ctx) {
        Ok(vips) => vips,
        Err(errors) => return (Vec::new(), errors),
    };
    if vips.is_empty() {
        return (Vec::new(), errors); // headless
    }

    let policy = match Policy::of(spec, &ctx) {
        Ok(policy) => policy,
        Err(e) => return (Vec::new(), vec![e]),
    };
    if let Some(Err(m)) = spec.health_check_node_port.map(valid_port) {
        return (
            Vec::new(),
            vec![ctx.error(InputErrorKind::InvalidField, "spec.healthCheckNodePort", &m)],
        );
    }
    // Each family's frontends take that family's endpoints (an IPv4 and an
    // IPv6 EndpointSlice of one Service are separate objects).
    let families: Vec<Family> = Family::BOTH
        .into_iter()
        .filter(|f| vips.iter().any(|v| Family::of(*v) == *f))
        .collect();
    let external = match external_addresses(spec, limits.external_ips, &families, &ctx, &mut errors)
    {
        Ok(external) => external,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let ports = service_ports(spec, &ctx, &mut errors);
    let here = Here {
        node: node.name.as_deref(),
        zone: node.zone.as_deref(),
    };
    let mut served = Vec::with_capacity(ports.len() * families.len());
    for port in &ports {
        for &family in &families {
            let endpoints = port_backends(slices, &port.name, port.proto, family, &mut errors);
            // Each port's two slot lists, once: a `Local` frontend's can be
            // longer than the cluster's by this node's terminating endpoints.
            let slots = Slots {
                cluster: endpoints.slots(here, false),
                local: endpoints.slots(here, true),
            };
            match port_table_size(port, slots.most(), limits, &ctx) {
                Ok(size) => served.push((port, family, slots, size)),
                Err(e) => errors.push(e),
            }
        }
    }
    let frontend_counts = served
        .iter()
        .map(|(port, family, slots, _)| {
            let n = frontend_addresses(&vips, port, *family, node, &external).count();
            (n, n * (1 + slots.most()))
        })
        .fold((0, 0), |(f, s), (n, slots)| (f + n, s + slots));
    if let Err(e) = within_budget(frontend_counts, limits, &ctx) {
        errors.push(e);
        return (Vec::new(), errors);
    }
    let mut frontends = Vec::new();
    for (port, family, Slots { cluster, local }, maglev_table_size) in served {
        let addresses = frontend_addresses(&vips, port, family, node, &external);
        // NodeLocal DNSCache's address is IPv4.
        let redirect = node
            .local_redirects
            .get(&(name.clone(), port.port))
            .filter(|_| family == Family::V4);
        for (kind, addr, frontend_port) in addresses {
            let (backends, local_count) = match redirect {
                Some(to) if kind == FrontendKind::ClusterIp => (
                    vec![L4Addr {
                        addr: IpAddr::V4(*to),
                        port: port.port,
                        proto: port.proto,
                    }],
                    1,
                ),
                _ if policy.is_local(kind) => local.clone(),
                _ => cluster.clone(),
            };
            // One local listener: no Maglev table to spread it over.
            let maglev_table_size = match redirect {
                Some(_) if kind == FrontendKind::ClusterIp => 0,
                _ => maglev_table_size,
            };
            let frontend = L4Addr {
                addr,
                port: frontend_port,
                proto: port.proto,
            };
            let spec = FrontendSpec {
                service: name.clone(),
                port_name: port.name.clone(),
                kind,
                backends,
                local_count,
                policy_flags: policy.flags(kind),
                affinity_timeout_s: policy.affinity_timeout_s,
                // The frontend's family's (none of it: nobody is admitted).
                source_ranges: match (&policy.source_ranges, kind) {
                    (Some(ranges), FrontendKind::LoadBalancer) => ranges
                        .iter()
                        .filter(|r| r.addr().is_ipv6() == addr.is_ipv6())
                        .copied()
                        .collect(),
                    _ => Vec::new(),
                },
                maglev_table_size,
            };
            frontends.push((frontend, spec));
        }
    }
    (frontends, errors)
}

/// The Service's usable ports; each unusable one is an error in `errors`.
fn service_ports(
    spec: &ServiceSpecView,
    ctx: &ErrCtx,
    errors: &mut Vec<InputError>,
) -> Vec<ServicePort> {
    let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = match parse_proto(port.protocol.as_ref().map(ProtocolText::as_str)) {
            Ok(Some(p)) => p,
            Ok(None) => {
                // Refused, counted and reported like any input lb cannot
                // program: the rest of the Service applies.
                errors.push(ctx.error(
                    InputErrorKind::Skipped,
                    &field("protocol"),
                    "SCTP is not supported by lb's datapath; port skipped",
                ));
                continue;
            }
            Err(m) => {
                errors.push(ctx.error(InputErrorKind::InvalidField, &field("protocol"), &m));
                continue;
            }
        };
        let node_port = match port.node_port.filter(|_| has_node_ports).map(valid_port) {
            Some(Ok(p)) => Some(p),
            Some(Err(m)) => {
                errors.push(ctx.error(InputErrorKind::InvalidField, &field("nodePort"), &m));
                continue;
            }
            None => None, // allocateLoadBalancerNodePorts: false, or not a NodePort type
        };
        match valid_port(port.port) {
            Ok(p) => {
                if let Some(j) = ports.iter().position(|q| q.port == p && q.proto == proto) {
                    errors.push(ctx.error(
                        InputErrorKind::Conflict,
                        &field("port"),
                        &format!("{p}/{proto} is also spec.ports[{j}]"),
                    ));
                    continue;
                }
                ports.push(ServicePort {
                    name: port.name.clone().unwrap_or_default(),
                    port: p,
                    proto,
                    node_port,
                })
            }
            Err(m) => errors.push(ctx.error(InputErrorKind::InvalidField, &field("port"), &m)),
        }
    }
    ports
}

/// Whether a port's `endpoints` fit the limits, and its Maglev table size
/// (0: `--lb-algorithm random`, or no endpoints).
fn port_table_size(
    port: &ServicePort,
    endpoints: usize,
    limits: Limits,
    ctx: &ErrCtx,
) -> Result<u32, InputError> {
    if endpoints > limits.max_backends_per_service {
        return Err(ctx.error(
            InputErrorKind::OverLimit,
            "spec.ports",
            &format!(
                "port {:?} has {} endpoints, more than --max-backends-per-service {}",
                port.name, endpoints, limits.max_backends_per_service
            ),
        ));
    }
    Ok(match limits.lb_algorithm {
        LbAlgorithm::Maglev { table_size } if endpoints > 0 => {
            let size = table_size.unwrap_or_else(|| crate::model::maglev::auto_size(endpoints));
            if size as usize <= endpoints {
                return Err(ctx.error(
                    InputErrorKind::OverLimit,
                    "spec.ports",
                    &format!(
                        "port {:?} has {} endpoints, as many as --maglev-table-size {size} has entries",
                        port.name,
                        endpoints
                    ),
                ));
            }
            size
        }
        _ => 0,
    })
}

/// Whether a Service's `(frontends, slots)` fit its budget: past it, the
/// Service would take the node-wide ids and slots other Services need.
fn within_budget(
    (frontends, slots): (usize, usize),
    limits: Limits,
    ctx: &ErrCtx,
) -> Result<(), InputError> {
    let over = |message: String| ctx.error(InputErrorKind::OverLimit, "spec.ports", &message);
    if frontends > limits.max_frontends_per_service {
        return Err(over(format!(
            "{frontends} frontends (ports × cluster, node-port, external and load-balancer addresses), more than --max-frontends-per-service {}",
            limits.max_frontends_per_service
        )));
    }
    if slots > limits.max_slots_per_service {
        return Err(over(format!(
            "{slots} service-map slots (each frontend's, and one per backend of each), more than --max-slots-per-service {}",
            limits.max_slots_per_service
        )));
    }
    Ok(())
}

/// Where a port is served in one family: its cluster IP, its node port on
/// each node address, and each external address of that family.
fn frontend_addresses<'a>(
    vips: &'a [IpAddr],
    port: &'a ServicePort,
    family: Family,
    node: &'a NodeContext,
    external: &'a [(FrontendKind, IpAddr)],
) -> impl Iterator<Item = (FrontendKind, IpAddr, u16)> + 'a {
    let of_family = move |a: &IpAddr| Family::of(*a) == family;
    vips.iter()
        .filter(move |vip| of_family(vip))
        .map(|vip| (FrontendKind::ClusterIp, *vip, port.port))
        .chain(port.node_port.into_iter().flat_map(move |np| {
            node.nodeport_addresses
                .iter()
                .filter(move |a| of_family(a))
                .map(move |a| (FrontendKind::NodePort, *a, np))
        }))
        .chain(
            external
                .iter()
                .filter(move |(_, a)| of_family(a))
                .map(|(kind, a)| (*kind, *a, port.port)),
        )
}

/// One usable port of a Service.
struct ServicePort {
    name: String,
    port: u16,
    proto: Proto,
    node_port: Option<u16>,
}

/// A Service's traffic policies and affinity.
struct Policy {
    external_local: bool,
    internal_local: bool,
    affinity_timeout_s: Option<u32>,
    /// `loadBalancerSourceRanges`, when set (either family).
    source_ranges: Option<Vec<ipnet::IpNet>>,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 h).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API's upper bound for it (1 day).
const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

impl Policy {
    fn of(spec: &ServiceSpecView, ctx: &ErrCtx) -> Result<Self, InputError> {
        let local = |field: &str, value: &Option<String>| match value.as_deref() {
            None | Some("Cluster") => Ok(false),
            Some("Local") => Ok(true),
            Some(other) => Err(ctx.error(
                InputErrorKind::InvalidField,
                field,
                &format!("unknown policy {other:?} (expected Cluster or Local)"),
            )),
        };
        let affinity_timeout_s = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => match spec.affinity_timeout_s {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) => match u32::try_from(t) {
                    Ok(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Some(t),
                    _ => {
                        return Err(ctx.error(
                            InputErrorKind::InvalidField,
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            &format!("{t} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"),
                        ))
                    }
                },
            },
            Some(other) => {
                return Err(ctx.error(
                    InputErrorKind::InvalidField,
                    "spec.sessionAffinity",
                    &format!("unknown affinity {other:?} (expected None or ClientIP)"),
                ))
            }
        };
        let mut source_ranges = None;
        for (i, text) in spec.load_balancer_source_ranges.iter().enumerate() {
            let ranges = source_ranges.get_or_insert_with(Vec::new);
            match text.trim().parse::<ipnet::IpNet>() {
                Ok(net) => ranges.push(net.trunc()),
                Err(_) => {
                    return Err(ctx.error(
                        InputErrorKind::InvalidField,
                        &format!("spec.loadBalancerSourceRanges[{i}]"),
                        &format!("{text:?} is not a CIDR"),
                    ))
                }
            }
        }
        Ok(Self {
            source_ranges,
            external_local: local("spec.externalTrafficPolicy", &spec.external_traffic_policy)?,
            internal_local: local("spec.internalTrafficPolicy", &spec.internal_traffic_policy)?,
            affinity_timeout_s,
        })
    }

    /// Whether a frontend of `kind` is served by this node's endpoints only.
    fn is_local(&self, kind: FrontendKind) -> bool {
        if kind.is_external() {
            self.external_local
        } else {
            self.internal_local
        }
    }

    /// The policy flags of a frontend of `kind`: externalTrafficPolicy
    /// governs the external kinds, internalTrafficPolicy the cluster IPs.
    fn flags(&self, kind: FrontendKind) -> u16 {
        use lb_common::svc::{SVC_FLAG_AFFINITY, SVC_FLAG_EXTERNAL_LOCAL, SVC_FLAG_INTERNAL_LOCAL};
        let mut flags = 0;
        if kind.is_external() && self.external_local {
            flags |= SVC_FLAG_EXTERNAL_LOCAL;
        }
        if !kind.is_external() && self.internal_local {
            flags |= SVC_FLAG_INTERNAL_LOCAL;
        }
        if self.affinity_timeout_s.is_some() {
            flags |= SVC_FLAG_AFFINITY;
        }
        if kind == FrontendKind::LoadBalancer && self.source_ranges.is_some() {
            flags |= lb_common::svc::SVC_FLAG_SOURCE_RANGES;
        }
        flags
    }
}

/// `spec.externalIPs` and, for type LoadBalancer, the load balancer's
/// ingress IPs (not those with `ipMode: Proxy`: the load balancer proxies
/// those itself and sends to the node ports).
fn external_addresses(
    spec: &ServiceSpecView,
    external_ips: bool,
    families: &[Family],
    ctx: &ErrCtx,
    skipped: &mut Vec<InputError>,
) -> Result<Vec<(FrontendKind, IpAddr)>, InputError> {
    // In order, once each (a set beside the list: a Service may list
    // tens of thousands).
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let mut add = |kind, field: String, text: &str| match text.parse::<IpAddr>() {
        Ok(ip) if usable_ip(ip) && !ip.is_loopback() => {
            if !families.contains(&Family::of(ip)) {
                // kube-proxy's proxier of that family has no cluster IP of
                // the Service to serve it with. Reported, not an error of
                // the Service: its other addresses apply.
                skipped.push(ctx.error(
                    InputErrorKind::Skipped,
                    &field,
                    &format!("{ip}: the Service has no cluster IP of its family (spec.ipFamilies); not programmed"),
                ));
            } else if seen.insert((kind, ip)) {
                found.push((kind, ip));
            }
            Ok(())
        }
        _ => Err(ctx.error(
            InputErrorKind::InvalidField,
            &field,
            &format!("{text:?} is not a usable IP address"),
        )),
    };
    let listed = if external_ips {
        &spec.external_ips[..]
    } else {
        &[]
    };
    for (i, ip) in listed.iter().enumerate() {
        add(
            FrontendKind::ExternalIp,
            format!("spec.externalIPs[{i}]"),
            ip,
        )?;
    }
    if spec.type_.as_deref() == Some("LoadBalancer") {
        for (i, (ip, mode)) in spec.load_balancer_ingress.iter().enumerate() {
            if let (Some(ip), false) = (ip, mode.as_deref() == Some("Proxy")) {
                add(
                    FrontendKind::LoadBalancer,
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    ip,
                )?;
            }
        }
    }
    Ok(found)
}

/// Why a proxy must not send traffic to endpoint `a`, if it must not: the
/// addresses the API server's validation refuses for endpoints (a manifest
/// directory has no API server to refuse them).
fn endpoint_refusal(a: IpAddr) -> Option<&'static str> {
    match a {
        IpAddr::V4(a) if !usable(a) => Some("is not a usable IPv4 address"),
        IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => {
            Some("is not a usable IPv6 address")
        }
        a if a.is_loopback() => Some("is a loopback address (it would reach the node itself)"),
        // 169.254.169.254 behind a node port would hand outsiders the
        // cloud metadata service, with the node's identity.
        IpAddr::V4(a) if a.is_link_local() => {
            Some("is link-local (169.254.0.0/16: a node's own services, such as cloud metadata)")
        }
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            Some("is link-local (fe80::/10: not routable to a pod)")
        }
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("is an IPv4-mapped IPv6 address (list it in an IPv4 slice)")
        }
        _ => None,
    }
}

fn usable(ip: Ipv4Addr) -> bool {
    !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()
}

fn usable_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => usable(v4),
        IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast(),
    }
}

/// A port's usable endpoints over every slice: the ready ones and the
/// serving-terminating ones, the nodes they run on and their topology hints.
#[derive(Debug, Default)]
struct PortEndpoints {
    ready: BTreeSet<L4Addr>,
    terminating: BTreeSet<L4Addr>,
    nodes: BTreeMap<L4Addr, Arc<str>>,
    zone_hints: BTreeMap<L4Addr, Vec<Arc<str>>>,
    node_hints: BTreeMap<L4Addr, Vec<Arc<str>>>,
}

/// A port's frontends' slots and local counts: for `Cluster` and for
/// `Local` policies.
struct Slots {
    cluster: (Vec<L4Addr>, usize),
    local: (Vec<L4Addr>, usize),
}

impl Slots {
    /// The most slots a frontend of the port takes (for the limits).
    fn most(&self) -> usize {
        self.cluster.0.len().max(self.local.0.len())
    }
}

/// Which hinted endpoints this node keeps to (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every endpoint: no usable hints.
    All,
    /// `trafficDistribution: PreferSameNode`: those hinted for this node.
    SameNode,
    /// `PreferSameZone` / `PreferClose` / topology-mode Auto: those hinted
    /// for this node's zone.
    SameZone,
}

/// This node as the endpoint choice sees it.
#[derive(Clone, Copy)]
struct Here<'a> {
    node: Option<&'a str>,
    zone: Option<&'a str>,
}

impl PortEndpoints {
    fn hinted(hints: &BTreeMap<L4Addr, Vec<Arc<str>>>, b: &L4Addr, name: Option<&str>) -> bool {
        name.is_some_and(|name| hints.get(b).is_some_and(|h| h.iter().any(|n| &**n == name)))
    }

    /// kube-proxy's topology mode (`topologyModeFromHints`): same node when
    /// every ready endpoint has node hints and one is for this node; else
    /// same zone when every ready endpoint has zone hints and one is for
    /// this zone; else all. Hints that would leave this node nothing are
    /// ignored, so the fallback is to every endpoint, never to none.
    fn topology(&self, here: Here) -> Topology {
        let all_have = |hints: &BTreeMap<L4Addr, Vec<Arc<str>>>| {
            !self.ready.is_empty() && self.ready.iter().all(|b| hints.contains_key(b))
        };
        let any_for = |hints, name| self.ready.iter().any(|b| Self::hinted(hints, b, name));
        if all_have(&self.node_hints) && any_for(&self.node_hints, here.node) {
            Topology::SameNode
        } else if all_have(&self.zone_hints) && any_for(&self.zone_hints, here.zone) {
            Topology::SameZone
        } else {
            Topology::All
        }
    }

    /// kube-proxy's cluster endpoints (`CategorizeEndpoints`): the ready
    /// ones the topology keeps, else (none ready anywhere) the
    /// serving-terminating ones (KEP-1669).
    fn cluster(&self, here: Here) -> Vec<L4Addr> {
        let topology = self.topology(here);
        let ready: Vec<L4Addr> = self
            .ready
            .iter()
            .copied()
            .filter(|b| match topology {
                Topology::All => true,
                Topology::SameNode => Self::hinted(&self.node_hints, b, here.node),
                Topology::SameZone => Self::hinted(&self.zone_hints, b, here.zone),
            })
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.terminating.iter().copied().collect()
    }

    /// kube-proxy's local endpoints: this node's ready ones, else its
    /// serving-terminating ones, decided among this node's own.
    fn local(&self, here: Here) -> Vec<L4Addr> {
        let ready: Vec<L4Addr> = self
            .ready
            .iter()
            .copied()
            .filter(|b| self.is_on(b, here.node))
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        self.terminating
            .iter()
            .copied()
            .filter(|b| self.is_on(b, here.node))
            .collect()
    }

    fn is_on(&self, backend: &L4Addr, node: Option<&str>) -> bool {
        node.is_some() && self.nodes.get(backend).map(|n| &**n) == node
    }

    /// A frontend's slots, this node's first, and how many those are. The
    /// cluster's endpoints are chosen as above; with a `Local` policy, this
    /// node's are chosen among this node's own, as kube-proxy decides the
    /// terminating fallback per locality: a node whose local pods all
    /// terminate keeps serving through them while other nodes' are ready.
    fn slots(&self, here: Here, local_policy: bool) -> (Vec<L4Addr>, usize) {
        let cluster = self.cluster(here);
        let local = if local_policy {
            self.local(here)
        } else {
            cluster
                .iter()
                .copied()
                .filter(|b| self.is_on(b, here.node))
                .collect()
        };
        let count = local.len();
        let rest: Vec<L4Addr> = cluster.into_iter().filter(|b| !local.contains(b)).collect();
        (local.into_iter().chain(rest).collect(), count)
    }
}

/// The cluster IPs from `clusterIPs` (or `clusterIP`), of either family
/// (a dual-stack Service lists one of each, primary first); empty when
/// headless.
fn cluster_ips(spec: &ServiceSpecView, ctx: &ErrCtx) -> Result<Vec<IpAddr>, Vec<InputError>> {
    let (field, ips): (&str, Vec<String>) = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
        (_, Some(ip)) => ("spec.clusterIP", vec![ip.clone()]),
        _ => {
            return Err(vec![ctx.error(
                InputErrorKind::InvalidField,
                "spec.clusterIP",
                "missing (the agent does not allocate cluster IPs)",
            )])
        }
    };
    if ips.iter().any(|ip| ip == "None") {
        return Ok(Vec::new());
    }
    let mut vips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = if field == "spec.clusterIPs" {
            format!("{field}[{i}]")
        } else {
            field.into()
        };
        match ip.parse::<IpAddr>() {
            Ok(addr) if !usable_ip(addr) => {
                return Err(vec![ctx.error(
                    InputErrorKind::InvalidField,
                    &field,
                    &format!("{ip} is not a usable service address"),
                )]);
            }
            Ok(addr) if vips.iter().any(|v: &IpAddr| v.is_ipv6() == addr.is_ipv6()) => {
                return Err(vec![ctx.error(
                    InputErrorKind::InvalidField,
                    &field,
                    &format!("{ip}: a Service has at most one cluster IP of each family"),
                )]);
            }
            Ok(addr) => vips.push(addr),
            Err(_) => {
                return Err(vec![ctx.error(
                    InputErrorKind::InvalidField,
                    &field,
                    &format!("{ip:?} is not an IP address"),
                )])
            }
        }
    }
    Ok(vips)
}

fn parse_proto(protocol: Option<&str>) -> Result<Option<Proto>, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Some(Proto::Tcp)),
        "UDP" => Ok(Some(Proto::Udp)),
        "SCTP" => Ok(None),
        other => Err(format!(
            "unknown protocol {other:?} (expected TCP, UDP or SCTP)"
        )),
    }
}

pub(super) fn valid_port(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port} is out of range 1-65535"))
}

/// The backends for one service port, merged over every slice. Problems go
/// to `errors`: a bad endpoint or an unusable slice port is skipped
/// (`Skipped`); a bad target port of this service port holds the service
/// back (`InvalidField`).
fn port_backends(
    slices: &[&Sourced<SliceView>],
    port_name: &str,
    proto: Proto,
    family: Family,
    errors: &mut Vec<InputError>,
) -> PortEndpoints {
    let mut endpoints = PortEndpoints::default();
    for slice in slices {
        let object = &slice.object;
        let ctx = ErrCtx {
            file: slice.file.clone(),
            object: format!("EndpointSlice {}/{}", object.namespace, object.name),
        };
        if object.address_type != family.name() {
            continue; // another family's frontends use it (or FQDN: none)
        }
        let mut target = None;
        for (i, port) in object.ports.iter().enumerate() {
            let slice_proto = match parse_proto(port.protocol.as_ref().map(ProtocolText::as_str)) {
                Ok(p) => p,
                Err(m) => {
                    errors.push(ctx.error(
                        InputErrorKind::Skipped,
                        &format!("ports[{i}].protocol"),
                        &format!("{m}; port skipped"),
                    ));
                    continue;
                }
            };
            if port.name.as_deref().unwrap_or_default() != port_name || slice_proto != Some(proto) {
                continue;
            }
            match port.port.map(valid_port) {
                Some(Ok(p)) => target = Some(p),
                Some(Err(m)) => errors.push(ctx.error(
                    InputErrorKind::InvalidField,
                    &format!("ports[{i}].port"),
                    &m,
                )),
                None => errors.push(ctx.error(
                    InputErrorKind::InvalidField,
                    &format!("ports[{i}].port"),
                    "missing",
                )),
            }
        }
        let Some(target) = target else { continue };
        for (i, endpoint) in object.endpoints.iter().enumerate() {
            let Some(address) = &endpoint.address else {
                errors.push(ctx.error(
                    InputErrorKind::Skipped,
                    &format!("endpoints[{i}].addresses"),
                    "empty; endpoint skipped",
                ));
                continue;
            };
            let refusal = match address {
                EndpointAddress::Ip(a) if Family::of(*a) == family => endpoint_refusal(*a),
                _ => Some(match family {
                    Family::V4 => "is not a usable IPv4 address",
                    Family::V6 => "is not a usable IPv6 address",
                }),
            };
            let (EndpointAddress::Ip(addr), None) = (address, refusal) else {
                errors.push(ctx.error(
                    InputErrorKind::Skipped,
                    &format!("endpoints[{i}].addresses[0]"),
                    &format!(
                        "{:?} {}; endpoint skipped",
                        address.to_string(),
                        refusal.unwrap_or_default()
                    ),
                ));
                continue;
            };
            let addr = *addr;
            // Unset conditions mean ready/serving (API semantics); terminating defaults to false.
            let is_ready = endpoint.ready.unwrap_or(true);
            let is_serving = endpoint.serving.unwrap_or(is_ready);
            let is_terminating = endpoint.terminating.unwrap_or(false);
            let backend = L4Addr {
                addr,
                port: target,
                proto,
            };
            if let Some(node) = &endpoint.node_name {
                endpoints.nodes.insert(backend, node.clone());
            }
            if !endpoint.zone_hints.is_empty() {
                endpoints
                    .zone_hints
                    .insert(backend, endpoint.zone_hints.clone());
            }
            if !endpoint.node_hints.is_empty() {
                endpoints
                    .node_hints
                    .insert(backend, endpoint.node_hints.clone());
            }
            if is_ready {
                endpoints.ready.insert(backend);
            } else if is_serving && is_terminating {
                endpoints.terminating.insert(backend);
            }
        }
    }
    endpoints
}
