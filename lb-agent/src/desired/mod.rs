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
    sync::Arc,
};

mod frontends;
pub mod local_redirect;

use frontends::{service_frontends, valid_port, ErrCtx};

use crate::{
    model::error::{InputError, InputErrorKind},
    model::{FrontendKind, FrontendSpec, L4Addr, Proto, ServiceName},
    source::objects::{Objects, Sourced},
    source::store::{ObjectStore, ServiceInput},
    source::view::ServiceView,
};

/// Limits on what one Service may ask for, and how backends are chosen.
/// The budgets keep one Service from taking the node-wide tables (16-bit
/// reverse-NAT ids, the service map) that every other Service needs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_backends_per_service: usize,
    /// Frontends one Service may have: ports × (cluster IPs, node
    /// addresses for node ports, external and LB IPs). Each takes a
    /// reverse-NAT id, of which the node has 65 535.
    pub max_frontends_per_service: usize,
    /// Service-map slots one Service may use: each frontend takes one,
    /// plus one per backend.
    pub max_slots_per_service: usize,
    pub lb_algorithm: LbAlgorithm,
    /// Program `spec.externalIPs` (`--external-ips`; deprecated in
    /// Kubernetes 1.36, KEP-5707). Off, they are left out, as a future
    /// kube-proxy will.
    pub external_ips: bool,
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
    /// The flags' defaults: 64 Services at the frontend budget use the
    /// reverse-NAT ids up; 2 at the slot budget fill a default service map.
    pub const DEFAULT: Limits = Limits {
        max_backends_per_service: 4096,
        max_frontends_per_service: 1024,
        max_slots_per_service: 131_072,
        lb_algorithm: LbAlgorithm::Random,
        external_ips: true,
    };

    /// Validated against the map fields: a frontend's slots are numbered
    /// with 16 bits and slot 0 is the frontend, so more would wrap; a
    /// frontend takes one of 65 535 reverse-NAT ids.
    pub fn new(
        max_backends_per_service: usize,
        max_frontends_per_service: usize,
        max_slots_per_service: usize,
    ) -> Result<Self, String> {
        let most = lb_common::svc::MAX_BACKENDS_PER_SVC as usize;
        if max_backends_per_service == 0 || max_backends_per_service > most {
            return Err(format!(
                "--max-backends-per-service {max_backends_per_service}: must be 1-{most} (slot numbers are 16-bit)"
            ));
        }
        let ids = usize::from(u16::MAX);
        if max_frontends_per_service == 0 || max_frontends_per_service > ids {
            return Err(format!(
                "--max-frontends-per-service {max_frontends_per_service}: must be 1-{ids} (reverse-NAT ids are 16-bit)"
            ));
        }
        if max_slots_per_service < 2 {
            return Err(format!(
                "--max-slots-per-service {max_slots_per_service}: must be at least 2 (a frontend and one backend)"
            ));
        }
        Ok(Self {
            max_backends_per_service,
            max_frontends_per_service,
            max_slots_per_service,
            ..Self::DEFAULT
        })
    }

    pub fn with_lb_algorithm(self, lb_algorithm: LbAlgorithm) -> Self {
        Self {
            lb_algorithm,
            ..self
        }
    }

    pub fn with_external_ips(self, external_ips: bool) -> Self {
        Self {
            external_ips,
            ..self
        }
    }
}

/// This node, as the node-dependent parts of the desired state see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// `--node-name`: endpoints whose `nodeName` matches are local.
    pub name: Option<Arc<str>>,
    /// The addresses node ports are served on (`--nodeport-addresses`),
    /// of both families.
    pub nodeport_addresses: Vec<IpAddr>,
    /// This node's `topology.kubernetes.io/zone` (topology hints).
    pub zone: Option<Arc<str>>,
    /// The local redirects in force (`--local-redirect` whose address is on
    /// one of the node's interfaces): a Service's port → the address its
    /// cluster IPs are served at.
    pub local_redirects: BTreeMap<(ServiceName, u16), Ipv4Addr>,
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
    let local: BTreeSet<std::net::IpAddr> = frontends
        .iter()
        .flat_map(|(_, f)| f.backends[..f.local_count].iter().map(|b| b.addr))
        .collect();
    Some(HealthCheck {
        port,
        local_endpoints: local.len(),
    })
}
