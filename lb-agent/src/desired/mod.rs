//! Kubernetes objects → desired frontends, with kube-proxy's semantics:
//! - headless (`clusterIP: None`), ExternalName and services labelled
//!   `service.kubernetes.io/service-proxy-name` get nothing;
//! - endpoints come from the EndpointSlices labelled
//!   `kubernetes.io/service-name`, matched to a service port by port name and
//!   protocol (the slice carries the resolved target port, so named target
//!   ports work);
//! - ready endpoints are used; when none is ready, serving-and-terminating ones
//!   are (graceful termination); otherwise the frontend has no backends and
//!   the datapath rejects new flows;
//! - only IPv4 (single-stack for now; IPv6 addresses are skipped, not errors).
//!
//! A service with an error keeps its last good datapath state (see
//! `Desired::keep`), the rest still applies; a bad endpoint or an unusable
//! slice port is reported and skipped without holding back its service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    model::error::{InputError, InputErrorKind},
    model::{FrontendKind, FrontendSpec, L4Addr, Proto, ServiceName},
    source::objects::{Objects, Sourced},
    source::store::{ObjectStore, ServiceInput},
    source::view::{
        EndpointAddress, ProtocolText, ServiceSpecView, ServiceView, SliceView,
        SERVICE_PROXY_NAME_LABEL,
    },
};

/// Limits on what one Service may ask for, and how backends are chosen.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_backends_per_service: usize,
    pub lb_algorithm: LbAlgorithm,
}

/// How a new flow's backend is chosen (`--lb-algorithm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// A slot by flow hash modulo the backend count.
    #[default]
    Random,
    /// The frontend's Maglev table; its size fixed, or (`None`) chosen per
    /// frontend from its backend count (`maglev::auto_size`).
    Maglev { table_size: Option<u32> },
}

impl Limits {
    /// Validated against the map fields: a frontend's slots are numbered
    /// with 16 bits and slot 0 is the frontend, so more would wrap.
    pub fn new(max_backends_per_service: usize) -> Result<Self, String> {
        let most = lb_common::svc::MAX_BACKENDS_PER_SVC as usize;
        if max_backends_per_service == 0 || max_backends_per_service > most {
            return Err(format!(
                "--max-backends-per-service {max_backends_per_service}: must be 1-{most} (slot numbers are 16-bit)"
            ));
        }
        Ok(Self {
            max_backends_per_service,
            lb_algorithm: LbAlgorithm::Random,
        })
    }

    pub fn with_lb_algorithm(self, lb_algorithm: LbAlgorithm) -> Self {
        Self {
            lb_algorithm,
            ..self
        }
    }
}

/// This node, as the node-dependent parts of the desired state see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// `--node-name`: endpoints whose `nodeName` matches are local.
    pub name: Option<Arc<str>>,
    /// The addresses node ports are served on (`--nodeport-addresses`).
    pub nodeport_addresses: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the per-Service results (one copy of each spec).
    pub frontends: BTreeMap<L4Addr, Arc<FrontendSpec>>,
    /// Services whose input had errors: their applied state is left as is.
    pub keep: BTreeSet<ServiceName>,
    /// `healthCheckNodePort` of each `externalTrafficPolicy: Local` load
    /// balancer, and how many of its endpoints run on this node.
    pub health_checks: BTreeMap<ServiceName, HealthCheck>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub local_endpoints: usize,
}

/// Everything at once (for `check`, tests and benches): the same code the
/// agent runs incrementally, over every Service.
pub fn compute(objects: &Objects, limits: Limits, node: NodeContext) -> (Desired, Vec<InputError>) {
    let store = ObjectStore::from_objects(objects);
    let mut state = DesiredState::new(limits, node);
    state.update(&store, &store.names());
    (state.desired().clone(), state.errors())
}

/// What one Service contributes.
#[derive(Clone, Debug, Default)]
struct ServiceResult {
    /// Where the Service was defined (for errors about it).
    file: Option<std::path::PathBuf>,
    frontends: BTreeMap<L4Addr, Arc<FrontendSpec>>,
    errors: Vec<InputError>,
    /// An error that keeps the Service at its last good state.
    blocking: bool,
    health_check: Option<HealthCheck>,
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// What an update changed, for the reconciler to look at (and nothing else).
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub frontends: BTreeSet<L4Addr>,
    pub services: BTreeSet<ServiceName>,
    /// Anything may have changed (a conflict was re-resolved): check all.
    pub all: bool,
}

/// The desired state, kept up to date one Service at a time: a change costs
/// the Services it touches, not all of them. Frontend conflicts between
/// Services (rare) fall back to a merge over every Service's cached result.
pub struct DesiredState {
    limits: Limits,
    node: NodeContext,
    results: BTreeMap<ServiceName, ServiceResult>,
    desired: Desired,
    /// Services that lost a frontend to another: the error they get.
    conflicts: BTreeMap<ServiceName, InputError>,
    /// Services that won such a conflict.
    winners: BTreeSet<ServiceName>,
}

impl DesiredState {
    pub fn new(limits: Limits, node: NodeContext) -> Self {
        Self {
            limits,
            node,
            results: BTreeMap::new(),
            desired: Desired::default(),
            conflicts: BTreeMap::new(),
            winners: BTreeSet::new(),
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// A new view of this node (its addresses changed): every Service is
    /// recomputed when it differs. `None` when nothing changed.
    pub fn set_node(&mut self, node: NodeContext, store: &ObjectStore) -> Option<Changes> {
        if node == self.node {
            return None;
        }
        self.node = node;
        Some(self.update(store, &store.names()))
    }

    /// Every current problem, by Service.
    pub fn errors(&self) -> Vec<InputError> {
        let mut errors: Vec<InputError> = self
            .results
            .values()
            .flat_map(|r| r.errors.iter().cloned())
            .collect();
        errors.extend(self.conflicts.values().cloned());
        errors
    }

    /// Recomputes the `dirty` Services from `store`.
    pub fn update(&mut self, store: &ObjectStore, dirty: &BTreeSet<ServiceName>) -> Changes {
        let mut changes = Changes {
            frontends: BTreeSet::new(),
            services: dirty.clone(),
            all: false,
        };
        let mut merge_all = false;
        let mut old = BTreeMap::new();
        for name in dirty {
            merge_all |= self.conflicts.contains_key(name) || self.winners.contains(name);
            let result = service_result(name, &store.input(name), self.limits, &self.node);
            let previous =
                if result.frontends.is_empty() && result.errors.is_empty() && !result.blocking {
                    self.results.remove(name)
                } else {
                    self.results.insert(name.clone(), result)
                };
            old.insert(name, previous.unwrap_or_default());
        }
        // A frontend claimed twice (by two dirty Services, or by one and a
        // Service that keeps it): resolve every claim in order.
        let mut claimed: BTreeMap<L4Addr, &ServiceName> = BTreeMap::new();
        for name in dirty {
            let Some(result) = self.results.get(name).filter(|r| !r.blocking) else {
                continue;
            };
            for (frontend, spec) in &result.frontends {
                let held_elsewhere = clash(&self.desired, name, frontend, spec)
                    .is_some_and(|(_, other)| !dirty.contains(&other));
                merge_all |= held_elsewhere || claimed.insert(*frontend, name).is_some();
            }
        }
        if merge_all {
            self.merge_all();
            changes.all = true;
            return changes;
        }
        for (name, previous) in old {
            for frontend in previous.frontends.keys() {
                if self
                    .desired
                    .frontends
                    .get(frontend)
                    .is_some_and(|s| s.service == *name)
                {
                    self.desired.frontends.remove(frontend);
                }
                changes.frontends.insert(*frontend);
            }
            self.desired.keep.remove(name);
            match self.results.get(name) {
                Some(r) if r.blocking => {
                    self.desired.keep.insert(name.clone());
                }
                Some(r) => {
                    match r.health_check {
                        Some(check) => self.desired.health_checks.insert(name.clone(), check),
                        None => self.desired.health_checks.remove(name),
                    };
                    changes.frontends.extend(r.frontends.keys().copied());
                    self.desired
                        .frontends
                        .extend(r.frontends.iter().map(|(f, s)| (*f, s.clone())));
                }
                None => {
                    self.desired.health_checks.remove(name);
                }
            }
        }
        changes
    }

    /// Rebuilds the desired state from every cached result. Of two Services
    /// claiming a frontend, the older (`creationTimestamp`, then name) keeps
    /// it — the same winner on every run — and the other keeps its last
    /// good state.
    fn merge_all(&mut self) {
        let mut order: Vec<(&ServiceName, &ServiceResult)> = self.results.iter().collect();
        order.sort_by(|a, b| (&a.1.created, a.0).cmp(&(&b.1.created, b.0)));
        let mut desired = Desired::default();
        let previous_checks = std::mem::take(&mut self.desired.health_checks);
        // A Service at its last good state keeps its health check as it was.
        let keep_check = |desired: &mut Desired, name: &ServiceName| {
            if let Some(check) = previous_checks.get(name) {
                desired.health_checks.insert(name.clone(), *check);
            }
        };
        self.conflicts.clear();
        self.winners.clear();
        for (name, result) in order {
            if result.blocking {
                desired.keep.insert(name.clone());
                keep_check(&mut desired, name);
                continue;
            }
            let taken = result
                .frontends
                .iter()
                .find_map(|(f, spec)| clash(&desired, name, f, spec).map(|c| (spec.kind, c)));
            if let Some((kind, (message, other))) = taken {
                self.conflicts.insert(
                    name.clone(),
                    InputError {
                        kind: InputErrorKind::Conflict,
                        file: result.file.clone(),
                        object: format!("Service {name}"),
                        field: kind.field().into(),
                        message,
                    },
                );
                self.winners.insert(other);
                desired.keep.insert(name.clone());
                keep_check(&mut desired, name);
                continue;
            }
            if let Some(check) = result.health_check {
                desired.health_checks.insert(name.clone(), check);
            }
            desired
                .frontends
                .extend(result.frontends.iter().map(|(f, s)| (*f, s.clone())));
        }
        self.desired = desired;
    }
}

/// Whether another Service in `desired` holds `frontend`, or the address of
/// an external frontend is another Service's cluster IP (or the reverse):
/// traffic to it would reach the wrong Service (the CVE-2020-8554 class).
/// Returns the message and the other Service.
fn clash(
    desired: &Desired,
    name: &ServiceName,
    frontend: &L4Addr,
    spec: &FrontendSpec,
) -> Option<(String, ServiceName)> {
    if let Some(other) = desired
        .frontends
        .get(frontend)
        .filter(|o| o.service != *name)
    {
        return Some((
            format!(
                "{} {frontend} is already used by Service {} ({})",
                spec.kind, other.service, other.kind
            ),
            other.service.clone(),
        ));
    }
    let same_address = L4Addr {
        addr: frontend.addr,
        port: 0,
        proto: Proto::Tcp,
    }..=L4Addr {
        addr: frontend.addr,
        port: u16::MAX,
        proto: Proto::Udp,
    };
    let is_cluster_ip = spec.kind == FrontendKind::ClusterIp;
    desired
        .frontends
        .range(same_address)
        .map(|(_, other)| other)
        .find(|other| {
            other.service != *name
                && other.kind != FrontendKind::NodePort
                && spec.kind != FrontendKind::NodePort
                && (other.kind == FrontendKind::ClusterIp) != is_cluster_ip
        })
        .map(|other| {
            (
                format!(
                    "{} {} is the {} of Service {}",
                    spec.kind, frontend.addr, other.kind, other.service
                ),
                other.service.clone(),
            )
        })
}

/// One Service's frontends and problems from its input.
fn service_result(
    name: &ServiceName,
    input: &ServiceInput<'_>,
    limits: Limits,
    node: &NodeContext,
) -> ServiceResult {
    let mut result = ServiceResult::default();
    if input.unparsed {
        // Part of its input did not parse (reported by the source): keep
        // what it had.
        result.blocking = true;
        return result;
    }
    let mut definitions: Vec<&Sourced<ServiceView>> = input.definitions.iter().collect();
    definitions.sort_by(|a, b| a.file.cmp(&b.file));
    let Some((first, others)) = definitions.split_first() else {
        return result; // slices without their Service: nothing to program
    };
    result.file = first.file.clone();
    result.created = first.object.created.clone();
    for other in others {
        let ctx = ErrCtx {
            file: other.file.clone(),
            object: format!("Service {name}"),
        };
        result.errors.push(ctx.error(
            InputErrorKind::Conflict,
            "metadata.name",
            "defined more than once; the first definition is used",
        ));
    }
    let (frontends, problems) = service_frontends(first, name, &input.slices, limits, node);
    result.blocking = problems.iter().any(|e| e.kind.keeps_last_good());
    // Slice problems are found once per service port: report each once.
    let mut seen = BTreeSet::new();
    result
        .errors
        .extend(problems.into_iter().filter(|e| seen.insert(e.to_string())));
    if !result.blocking {
        result.health_check = health_check(first, &frontends);
        result.frontends = frontends
            .into_iter()
            .map(|(f, spec)| (f, Arc::new(spec)))
            .collect();
    }
    result
}

/// A load balancer with `externalTrafficPolicy: Local` and a
/// `healthCheckNodePort` is health-checked per node: the count of its
/// distinct endpoints on this node.
fn health_check(
    service: &Sourced<ServiceView>,
    frontends: &[(L4Addr, FrontendSpec)],
) -> Option<HealthCheck> {
    let spec = service.object.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.external_traffic_policy.as_deref() != Some("Local")
    {
        return None;
    }
    let port = valid_port(spec.health_check_node_port?).ok()?;
    let local: BTreeSet<Ipv4Addr> = frontends
        .iter()
        .flat_map(|(_, f)| f.backends[..f.local_count].iter().map(|b| b.addr))
        .collect();
    Some(HealthCheck {
        port,
        local_endpoints: local.len(),
    })
}

struct ErrCtx {
    file: Option<PathBuf>,
    object: String,
}

impl ErrCtx {
    fn error(&self, kind: InputErrorKind, field: &str, message: &str) -> InputError {
        InputError {
            kind,
            file: self.file.clone(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn service_frontends(
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
    let vips = match cluster_ips(spec, &ctx) {
        Ok(vips) => vips,
        Err(errors) => return (Vec::new(), errors),
    };
    if vips.is_empty() {
        return (Vec::new(), Vec::new()); // headless, or IPv6-only
    }

    let mut errors = Vec::new();
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
    let external = match external_addresses(spec, &ctx) {
        Ok(external) => external,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = match parse_proto(port.protocol.as_ref().map(ProtocolText::as_str)) {
            Ok(Some(p)) => p,
            Ok(None) => {
                tracing::warn!(service = %name, port = i, "SCTP is not supported; port skipped");
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

    let mut frontends = Vec::new();
    for port in ports {
        let (backends, nodes) = port_backends(slices, &port.name, port.proto, &mut errors);
        if backends.len() > limits.max_backends_per_service {
            errors.push(ctx.error(
                InputErrorKind::OverLimit,
                "spec.ports",
                &format!(
                    "port {:?} has {} endpoints, more than --max-backends-per-service {}",
                    port.name,
                    backends.len(),
                    limits.max_backends_per_service
                ),
            ));
            continue;
        }
        let maglev_table_size = match limits.lb_algorithm {
            LbAlgorithm::Maglev { table_size } if !backends.is_empty() => {
                let size =
                    table_size.unwrap_or_else(|| crate::model::maglev::auto_size(backends.len()));
                if size as usize <= backends.len() {
                    errors.push(ctx.error(
                        InputErrorKind::OverLimit,
                        "spec.ports",
                        &format!(
                            "port {:?} has {} endpoints, as many as --maglev-table-size {size} has entries",
                            port.name,
                            backends.len()
                        ),
                    ));
                    continue;
                }
                size
            }
            _ => 0,
        };
        let (backends, local_count) = local_first(backends, nodes, node.name.as_deref());
        let addresses = vips
            .iter()
            .map(|vip| (FrontendKind::ClusterIp, *vip, port.port))
            .chain(
                port.node_port
                    .into_iter()
                    .flat_map(|np| node.nodeport_addresses.iter().map(move |a| (*a, np)))
                    .map(|(a, np)| (FrontendKind::NodePort, a, np)),
            )
            .chain(external.iter().map(|(kind, a)| (*kind, *a, port.port)));
        for (kind, addr, frontend_port) in addresses {
            let frontend = L4Addr {
                addr,
                port: frontend_port,
                proto: port.proto,
            };
            let spec = FrontendSpec {
                service: name.clone(),
                port_name: port.name.clone(),
                kind,
                backends: backends.clone(),
                local_count,
                policy_flags: policy.flags(kind),
                affinity_timeout_s: policy.affinity_timeout_s,
                source_ranges: match (&policy.source_ranges, kind) {
                    (Some(ranges), FrontendKind::LoadBalancer) => ranges.clone(),
                    _ => Vec::new(),
                },
                maglev_table_size,
            };
            frontends.push((frontend, spec));
        }
    }
    (frontends, errors)
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
    /// `loadBalancerSourceRanges`, when set (IPv4 prefixes only).
    source_ranges: Option<Vec<ipnet::Ipv4Net>>,
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
                Ok(ipnet::IpNet::V4(net)) => ranges.push(net.trunc()),
                Ok(ipnet::IpNet::V6(_)) => {} // IPv4 only
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
    ctx: &ErrCtx,
) -> Result<Vec<(FrontendKind, Ipv4Addr)>, InputError> {
    let mut found = Vec::new();
    let mut add = |kind, field: String, text: &str| match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) if usable(v4) => {
            if !found.contains(&(kind, v4)) {
                found.push((kind, v4));
            }
            Ok(())
        }
        Ok(IpAddr::V6(_)) => Ok(()), // IPv4 only
        _ => Err(ctx.error(
            InputErrorKind::InvalidField,
            &field,
            &format!("{text:?} is not a usable IPv4 address"),
        )),
    };
    for (i, ip) in spec.external_ips.iter().enumerate() {
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

fn usable(ip: Ipv4Addr) -> bool {
    !ip.is_unspecified() && !ip.is_broadcast() && !ip.is_multicast()
}

/// Reorders a port's backends so this node's come first (each part stays
/// sorted); returns them with their count.
fn local_first(
    backends: Vec<L4Addr>,
    nodes: Vec<Option<Arc<str>>>,
    this_node: Option<&str>,
) -> (Vec<L4Addr>, usize) {
    let is_local = |n: &Option<Arc<str>>| this_node.is_some() && n.as_deref() == this_node;
    let (local, remote): (Vec<_>, Vec<_>) = backends
        .into_iter()
        .zip(nodes)
        .partition(|(_, n)| is_local(n));
    let local_count = local.len();
    let backends = local.into_iter().chain(remote).map(|(b, _)| b).collect();
    (backends, local_count)
}

/// IPv4 cluster IPs from `clusterIPs` (or `clusterIP`); empty when headless.
fn cluster_ips(spec: &ServiceSpecView, ctx: &ErrCtx) -> Result<Vec<Ipv4Addr>, Vec<InputError>> {
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
            Ok(IpAddr::V4(v4)) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
                return Err(vec![ctx.error(
                    InputErrorKind::InvalidField,
                    &field,
                    &format!("{ip} is not a usable service address"),
                )]);
            }
            Ok(IpAddr::V4(v4)) => vips.push(v4),
            Ok(IpAddr::V6(_)) => {
                tracing::debug!(object = %ctx.object, %ip, "IPv6 cluster IP skipped (IPv4 only)")
            }
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

fn valid_port(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port} is out of range 1-65535"))
}

/// A port's backends (sorted) and the nodes they run on.
type PortBackends = (Vec<L4Addr>, Vec<Option<Arc<str>>>);

/// The backends for one service port, merged over every slice. Problems go
/// to `errors`: a bad endpoint or an unusable slice port is skipped
/// (`Skipped`); a bad target port of this service port holds the service
/// back (`InvalidField`).
fn port_backends(
    slices: &[&Sourced<SliceView>],
    port_name: &str,
    proto: Proto,
    errors: &mut Vec<InputError>,
) -> PortBackends {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    let mut nodes = BTreeMap::new();
    for slice in slices {
        let object = &slice.object;
        let ctx = ErrCtx {
            file: slice.file.clone(),
            object: format!("EndpointSlice {}/{}", object.namespace, object.name),
        };
        if object.address_type != "IPv4" {
            tracing::debug!(slice = %ctx.object, address_type = %object.address_type, "slice skipped (IPv4 only)");
            continue;
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
            let addr = match address {
                EndpointAddress::V4(a)
                    if !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() =>
                {
                    *a
                }
                _ => {
                    errors.push(ctx.error(
                        InputErrorKind::Skipped,
                        &format!("endpoints[{i}].addresses[0]"),
                        &format!(
                            "{:?} is not a usable IPv4 address; endpoint skipped",
                            address.to_string()
                        ),
                    ));
                    continue;
                }
            };
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
                nodes.insert(backend, node.clone());
            }
            if is_ready {
                ready.insert(backend);
            } else if is_serving && is_terminating {
                terminating.insert(backend);
            }
        }
    }
    let backends: Vec<L4Addr> = if ready.is_empty() { terminating } else { ready }
        .into_iter()
        .collect();
    let nodes = backends.iter().map(|b| nodes.remove(b)).collect();
    (backends, nodes)
}
