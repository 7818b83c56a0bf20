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
    error::{InputError, InputErrorKind},
    model::{FrontendSpec, L4Addr, Proto, ServiceName},
    objects::{Objects, Sourced},
    store::{ObjectStore, ServiceInput},
    view::{
        EndpointAddress, ProtocolText, ServiceSpecView, ServiceView, SliceView,
        SERVICE_PROXY_NAME_LABEL,
    },
};

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_backends_per_service: usize,
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
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the per-Service results (one copy of each spec).
    pub frontends: BTreeMap<L4Addr, Arc<FrontendSpec>>,
    /// Services whose input had errors: their applied state is left as is.
    pub keep: BTreeSet<ServiceName>,
}

/// Everything at once (for `check`, tests and benches): the same code the
/// agent runs incrementally, over every Service.
pub fn compute(objects: &Objects, limits: Limits) -> (Desired, Vec<InputError>) {
    let store = ObjectStore::from_objects(objects);
    let mut state = DesiredState::new(limits);
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
    results: BTreeMap<ServiceName, ServiceResult>,
    desired: Desired,
    /// Services that lost a frontend to another: the error they get.
    conflicts: BTreeMap<ServiceName, InputError>,
    /// Services that won such a conflict.
    winners: BTreeSet<ServiceName>,
}

impl DesiredState {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            results: BTreeMap::new(),
            desired: Desired::default(),
            conflicts: BTreeMap::new(),
            winners: BTreeSet::new(),
        }
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
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
            let result = service_result(name, &store.input(name), self.limits);
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
            for frontend in result.frontends.keys() {
                let held_elsewhere =
                    self.desired.frontends.get(frontend).is_some_and(|spec| {
                        spec.service != *name && !dirty.contains(&spec.service)
                    });
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
                    changes.frontends.extend(r.frontends.keys().copied());
                    self.desired
                        .frontends
                        .extend(r.frontends.iter().map(|(f, s)| (*f, s.clone())));
                }
                None => {}
            }
        }
        changes
    }

    /// Rebuilds the desired state from every cached result, in Service name
    /// order: of two Services claiming a frontend, the first keeps it and the
    /// second keeps its last good state.
    fn merge_all(&mut self) {
        self.desired = Desired::default();
        self.conflicts.clear();
        self.winners.clear();
        for (name, result) in &self.results {
            if result.blocking {
                self.desired.keep.insert(name.clone());
                continue;
            }
            let taken = result.frontends.keys().find_map(|f| {
                self.desired
                    .frontends
                    .get(f)
                    .map(|other| (*f, other.service.clone()))
            });
            if let Some((frontend, other)) = taken {
                self.conflicts.insert(
                    name.clone(),
                    InputError {
                        kind: InputErrorKind::Conflict,
                        file: result.file.clone(),
                        object: format!("Service {name}"),
                        field: "spec.ports".into(),
                        message: format!("frontend {frontend} is already used by Service {other}"),
                    },
                );
                self.winners.insert(other);
                self.desired.keep.insert(name.clone());
                continue;
            }
            self.desired
                .frontends
                .extend(result.frontends.iter().map(|(f, s)| (*f, s.clone())));
        }
    }
}

/// One Service's frontends and problems from its input.
fn service_result(name: &ServiceName, input: &ServiceInput<'_>, limits: Limits) -> ServiceResult {
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
    let (frontends, problems) = service_frontends(first, name, &input.slices, limits);
    result.blocking = problems.iter().any(|e| e.kind.keeps_last_good());
    // Slice problems are found once per service port: report each once.
    let mut seen = BTreeSet::new();
    result
        .errors
        .extend(problems.into_iter().filter(|e| seen.insert(e.to_string())));
    if !result.blocking {
        result.frontends = frontends
            .into_iter()
            .map(|(f, spec)| (f, Arc::new(spec)))
            .collect();
    }
    result
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
    let mut ports: Vec<(String, u16, Proto)> = Vec::new();
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
        match valid_port(port.port) {
            Ok(p) => {
                if let Some(j) = ports.iter().position(|(_, q, r)| *q == p && *r == proto) {
                    errors.push(ctx.error(
                        InputErrorKind::Conflict,
                        &field("port"),
                        &format!("{p}/{proto} is also spec.ports[{j}]"),
                    ));
                    continue;
                }
                ports.push((port.name.clone().unwrap_or_default(), p, proto))
            }
            Err(m) => errors.push(ctx.error(InputErrorKind::InvalidField, &field("port"), &m)),
        }
    }

    let mut frontends = Vec::new();
    for (port_name, port, proto) in ports {
        let (backends, nodes) = port_backends(slices, &port_name, proto, &mut errors);
        match (backends, nodes) {
            (backends, _) if backends.len() > limits.max_backends_per_service => {
                errors.push(ctx.error(
                    InputErrorKind::OverLimit,
                    "spec.ports",
                    &format!(
                    "port {port_name:?} has {} endpoints, more than --max-backends-per-service {}",
                    backends.len(),
                    limits.max_backends_per_service
                ),
                ))
            }
            (backends, nodes) => {
                for vip in &vips {
                    let frontend = L4Addr {
                        addr: *vip,
                        port,
                        proto,
                    };
                    let spec = FrontendSpec {
                        service: name.clone(),
                        port_name: port_name.clone(),
                        backends: backends.clone(),
                        nodes: nodes.clone(),
                    };
                    frontends.push((frontend, spec));
                }
            }
        }
    }
    (frontends, errors)
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
