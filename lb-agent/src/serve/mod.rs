//! `lb-agent run`: load and pin the datapath, attach to interfaces, and keep
//! the maps in sync with the source — a directory of manifests or the API
//! server — until SIGINT/SIGTERM. Both sources feed the same path:
//! objects → `desired::compute` → `Reconciler::apply`.

mod agent;
pub mod health;
mod iptables_legacy;
pub mod kube_proxy;
pub mod metrics;
pub mod nf_conntrack;
pub mod node;
pub mod service_health;
mod upkeep;

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context as _};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    datapath::{attach, attach::Attacher, loader, loader::MapSizes},
    desired::{DesiredState, Limits, NodeContext},
    reconcile::Reconciler,
    serve::{
        agent::{Agent, Datapath, Inputs, Status},
        health::Health,
        metrics::{ErrorKind, Metrics},
        node::NodeSettings,
        service_health::ServiceHealthServers,
        upkeep::{Upkeep, UpkeepTables},
    },
    source::{
        k8s::ApiSource, manifest::ManifestDir, rest_client::RestClientMetrics, store::ObjectStore,
        watch,
    },
};

pub enum SourceConfig {
    Manifests(PathBuf),
    Api {
        kubeconfig: Option<PathBuf>,
        api_server: Option<String>,
    },
}

pub struct RunConfig {
    pub source: SourceConfig,
    /// Socket LB at this cgroup (`None`: off).
    pub socket_lb: Option<PathBuf>,
    pub interfaces: Vec<String>,
    /// Interfaces facing outside the cluster (a subset or more of `interfaces`).
    pub external_interfaces: Vec<String>,
    pub node: NodeSettings,
    pub pin_dir: PathBuf,
    pub sizes: MapSizes,
    pub limits: Limits,
    pub keep_datapath: bool,
    pub poll_interval: Duration,
    /// Serve /healthz, /readyz and /livez here (`None`: off).
    pub health_addr: Option<SocketAddr>,
    /// The same, for the kubelet's probes, on a port kube-proxy never holds.
    pub probe_addr: Option<SocketAddr>,
    /// Serve Prometheus metrics here (`None`: off).
    pub metrics_addr: Option<SocketAddr>,
    /// A health or metrics address that cannot be bound ends the start
    /// (kube-proxy's `--bind-address-hard-fail`); otherwise it is retried.
    pub bind_hard_fail: bool,
    /// Datapath debug events (aya-log) into the agent's log.
    pub datapath_log: bool,
    /// Conntrack timeouts and the ICMP rate limit, set at load.
    pub globals: crate::datapath::loader::Globals,
    pub conntrack_gc_interval: Duration,
    /// `/healthz` fails while a seen change waits longer than this.
    pub health_timeout: Duration,
    /// The node's netfilter conntrack, sized at start as kube-proxy does.
    pub nf_conntrack: nf_conntrack::NfConntrack,
    pub nf_sysctl_dir: PathBuf,
}

const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How often a health or metrics address that could not be bound is tried.
const BIND_RETRY: Duration = Duration::from_secs(2);
/// How often, at most, the programmed-state metrics are recounted: counting
/// walks every frontend, which a stream of single changes must not pay each.
const FILL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the node is searched for kube-proxy's rules.
const KUBE_PROXY_CHECK: Duration = Duration::from_secs(30);
/// With file and link events, a full rescan only backs them up.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

enum Source {
    Files(ManifestDir),
    Api(ApiSource),
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let trigger = Arc::new(Notify::new());
    let rest_client = RestClientMetrics::default();
    let (source, client) = open_source(&config.source, &trigger, &rest_client).await?;
    let attacher = attacher(&config).await?;
    let health = Health::new(config.health_timeout);
    let node_zone = NodeZone::default();
    if let Some(client) = client {
        let follow = follow_node(
            client,
            config.node.name.to_string(),
            health.clone(),
            (node_zone.clone(), trigger.clone()),
        );
        tokio::spawn(follow);
    }
    for (addr, flag) in [
        (config.health_addr, "--healthz-bind-address"),
        (config.probe_addr, "--probe-bind-address"),
    ] {
        let Some(addr) = addr else { continue };
        let health = health.clone();
        serve_on(addr, flag, config.bind_hard_fail, move |l| {
            info!(%addr, "serving /healthz, /readyz and /livez");
            health::serve(l, health)
        })
        .await?;
    }

    let pin_dir = config.pin_dir.clone();
    let mut unpin_on_failure = UnpinOnFailure::new(&pin_dir);
    // Off the serving thread: the watches list meanwhile, and the health
    // server answers, while the verifier runs.
    let (pin, sizes, globals, log, gc) = (
        config.pin_dir.clone(),
        config.sizes,
        config.globals,
        config.datapath_log,
        config.conntrack_gc_interval,
    );
    let (datapath, metrics) = tokio::task::spawn_blocking(move || {
        load_datapath(&pin, sizes, &globals, log, gc, attacher, &rest_client)
    })
    .await
    .context("loading the datapath")??;
    if let Some(addr) = config.metrics_addr {
        let metrics = metrics.clone();
        serve_on(
            addr,
            "--metrics-bind-address",
            config.bind_hard_fail,
            move |l| {
                info!(%addr, "serving /metrics");
                metrics::serve(l, metrics)
            },
        )
        .await?;
    }
    info!(pin_dir = %pin_dir.display(), node = %config.node.name, "datapath loaded");
    tokio::spawn(watch_kube_proxy(metrics.clone()));
    size_nf_conntrack(&config, &metrics);

    let node_context = NodeContext {
        name: Some(config.node.name.clone()),
        nodeport_addresses: Vec::new(),
        zone: config.node.zone.clone(),
        local_redirects: Default::default(),
    };
    let inputs = Inputs {
        source,
        trigger,
        store: ObjectStore::default(),
        state: DesiredState::new(config.limits, node_context),
        file_errors: Vec::new(),
        changed_paths: watch::SharedPaths::default(),
        full_scan: true,
        recomputed_since_trim: 0,
        node_zone,
    };
    let status = Status {
        metrics,
        health: health.clone(),
        change_seen: None,
        triggers: Vec::new(),
        link_kinds: Default::default(),
        fill_due: true,
        synced: false,
        reported: BTreeSet::new(),
        service_health: ServiceHealthServers::new(health),
        served_checks: None,
    };
    let mut agent = Agent {
        config,
        inputs,
        datapath,
        status,
    };
    // From here, shutdown decides what stays pinned.
    unpin_on_failure.disarm();
    let result = agent.serve().await;
    agent.shutdown();
    result
}

/// Serves `addr` with `serve` once it is bound. A failed bind ends the
/// start with `hard_fail`; otherwise it is logged and retried every
/// `BIND_RETRY` in the background, so the agent can run beside a
/// kube-proxy that holds the port during a migration and take the port
/// once it is free (kube-proxy's `--bind-address-hard-fail` semantics).
async fn serve_on<F, S>(
    addr: SocketAddr,
    flag: &'static str,
    hard_fail: bool,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> S + Send + 'static,
    S: std::future::Future<Output = ()> + Send + 'static,
{
    let error = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            tokio::spawn(serve(listener));
            return Ok(());
        }
        Err(e) if hard_fail => {
            return Err(e).with_context(|| format!("{flag} {addr} (--bind-address-hard-fail)"))
        }
        Err(e) => e,
    };
    warn!("{flag} {addr}: {error}; retrying every {BIND_RETRY:?} (is kube-proxy still running?)");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(BIND_RETRY).await;
            if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
                serve(listener).await;
                return;
            }
        }
    });
    Ok(())
}

/// Sets the node's netfilter conntrack sysctls; a failure is reported, not
/// fatal (the datapath does not depend on them).
fn size_nf_conntrack(config: &RunConfig, metrics: &Metrics) {
    let cpus = nf_conntrack::cpus();
    let (written, errors) = config.nf_conntrack.apply(&config.nf_sysctl_dir, cpus);
    for w in written {
        info!(
            sysctl = w.sysctl,
            from = w.from,
            to = w.to,
            "netfilter conntrack set"
        );
    }
    for e in errors {
        metrics.error(ErrorKind::NodeSysctl);
        warn!("netfilter conntrack not set: {e}");
    }
}

/// Looks for kube-proxy's rules now and every `KUBE_PROXY_CHECK`; says so
/// when what it finds changes.
async fn watch_kube_proxy(metrics: Metrics) {
    let mut last: Option<kube_proxy::Found> = None;
    loop {
        match tokio::task::spawn_blocking(kube_proxy::find).await {
            Ok(Ok(found)) => {
                metrics.kube_proxy_rules(&found);
                if last.as_ref() != Some(&found) {
                    if found.is_empty() {
                        if last.is_some() {
                            info!("kube-proxy's rules are gone from this node");
                        }
                    } else {
                        warn!(
                            iptables = ?found.iptables_chains.iter().chain(&found.legacy_chains).take(3).collect::<Vec<_>>(),
                            nftables = ?found.nftables_tables,
                            "kube-proxy's rules are on this node ({}): expected while kube-proxy runs; \
                             once it is removed, run `kube-proxy --cleanup` here, or they go on \
                             matching node processes' traffic to Services",
                            found.summary()
                        );
                    }
                    last = Some(found);
                }
            }
            Ok(Err(e)) => debug!("looking for kube-proxy's rules: {e}"),
            Err(e) => debug!("looking for kube-proxy's rules: {e}"),
        }
        tokio::time::sleep(KUBE_PROXY_CHECK).await;
    }
}

/// The source, and the API client (API mode) for the node's own object.
async fn open_source(
    config: &SourceConfig,
    trigger: &Arc<Notify>,
    rest_client: &RestClientMetrics,
) -> anyhow::Result<(Source, Option<kube::Client>)> {
    Ok(match config {
        SourceConfig::Manifests(dir) => {
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            (Source::Files(ManifestDir::new(dir)), None)
        }
        SourceConfig::Api {
            kubeconfig,
            api_server,
        } => {
            let client = crate::source::k8s::client(
                kubeconfig.as_deref(),
                api_server.as_deref(),
                rest_client,
            )
            .await
            .context("connecting to the API server")?;
            (
                Source::Api(ApiSource::start(client.clone(), trigger.clone())),
                Some(client),
            )
        }
    })
}

/// This node's zone as its Node object says (API mode), for the agent
/// loop: `None` until the object is seen.
pub(super) type NodeZone = Arc<std::sync::Mutex<Option<Option<Arc<str>>>>>;

/// `/healthz` follows whether this node is being drained (KEP-3836); its
/// zone goes to the agent loop (`zone`, and a nudge of `trigger`).
async fn follow_node(
    client: kube::Client,
    name: String,
    health: Arc<Health>,
    (zone, trigger): (NodeZone, Arc<Notify>),
) {
    let mut state = crate::source::node::watch_node(client, &name);
    let mut last: Option<crate::source::node::NodeFacts> = None;
    while state.changed().await.is_ok() {
        let Some(facts) = state.borrow_and_update().clone() else {
            continue;
        };
        if last.as_ref().map(|l| l.draining) != Some(facts.draining) {
            match facts.draining {
                Some(why) => {
                    warn!(node = %name, ?why, "the node is being drained: /healthz fails until it is not")
                }
                None => debug!(node = %name, "the node is eligible for traffic"),
            }
        }
        health.set_draining(facts.draining);
        if last.as_ref().map(|l| &l.zone) != Some(&facts.zone) {
            let seen = facts.zone.as_deref().map(Arc::<str>::from);
            *zone.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
            trigger.notify_one();
        }
        last = Some(facts);
    }
}

/// The attacher for `--interfaces` / `--external-interfaces`, its patterns
/// checked against the interfaces there are.
async fn attacher(config: &RunConfig) -> anyhow::Result<Attacher> {
    let mut attacher = Attacher::new(
        config.interfaces.clone(),
        config.external_interfaces.clone(),
        Some(config.pin_dir.join(crate::datapath::cleanup::LINK_DIR)),
    );
    if attacher.wants_uplinks() {
        attacher.set_uplinks(
            watch::default_route_interfaces()
                .await
                .context("--interfaces @uplink: reading the default routes")?,
        );
    }
    let kinds = watch::link_kinds()
        .await
        .context("--interfaces: reading the links")?;
    attacher.set_link_kinds(kinds.pod_veths, kinds.not_ethernet);
    let patterns: Vec<String> = config
        .interfaces
        .iter()
        .chain(&config.external_interfaces)
        .cloned()
        .collect();
    check_interface_patterns(&attacher, &patterns)?;
    Ok(attacher)
}

/// Loads and pins the datapath (migrating a previous layout's pins), reads
/// back what the pinned maps hold, and starts its upkeep thread; the
/// metrics read the datapath's counters.
fn load_datapath(
    pin_dir: &std::path::Path,
    sizes: MapSizes,
    globals: &loader::Globals,
    datapath_log: bool,
    gc_interval: Duration,
    attacher: Attacher,
    rest_client: &RestClientMetrics,
) -> anyhow::Result<(Datapath, Metrics)> {
    let mut ebpf = loader::load_with_log(Some(pin_dir), sizes, globals, datapath_log)
        .context("loading the datapath")?;
    let migration = crate::datapath::migrate::Migration::pending(pin_dir);
    if let Some(migration) = &migration {
        let copied = migration
            .adopt()
            .context("migrating the pinned datapath from map layout v3")?;
        info!(
            ?copied,
            "adopting a datapath of map layout v3: copied into v4; the old maps go once this run is attached and programmed"
        );
    }
    if datapath_log {
        loader::forward_debug_events(&mut ebpf).context("--datapath-log")?;
        info!("datapath debug events on (target `datapath`)");
    }
    let maps = loader::kernel_maps(&mut ebpf, sizes)?;
    let conntrack = loader::conntrack(&mut ebpf)?;
    let conntrack6 = loader::conntrack6(&mut ebpf)?;
    let capacities =
        crate::datapath::fill::capacities(pin_dir).context("reading the pinned maps' sizes")?;
    let config_map = loader::ConfigMap::take(&mut ebpf)?;
    let udp_resetter = loader::udp_resetter(&mut ebpf, globals)?;
    let counters = crate::datapath::counters::open(pin_dir)?;
    let reconciler =
        Reconciler::restore(maps, sizes.backends).context("reading the pinned maps")?;
    let metrics = Metrics::new(Some(counters), rest_client);
    let upkeep = Upkeep::start(UpkeepTables {
        conntrack,
        conntrack6,
        udp_resetter,
        metrics: metrics.clone(),
        capacities: capacities.clone(),
        pin_dir: pin_dir.to_owned(),
        gc_interval,
        retry_interval: RETRY_INTERVAL,
    })
    .context("starting the upkeep thread")?;
    let datapath = Datapath {
        ebpf,
        attacher,
        reconciler,
        upkeep,
        capacities,
        migration,
        config_map,
        node_config: None,
    };
    Ok((datapath, metrics))
}

/// A start that fails before serving (a program the kernel refuses, a
/// metrics port in use) removes the pins it created, where it found none:
/// the node is left as it was. Pins it found (a running datapath, a
/// previous layout) are never touched.
struct UnpinOnFailure<'a> {
    pin_dir: &'a std::path::Path,
    armed: bool,
}

impl<'a> UnpinOnFailure<'a> {
    fn new(pin_dir: &'a std::path::Path) -> Self {
        let found_pins = std::fs::read_dir(pin_dir).is_ok_and(|mut d| d.next().is_some());
        Self {
            pin_dir,
            armed: !found_pins,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for UnpinOnFailure<'_> {
    fn drop(&mut self) {
        if self.armed {
            let removed = crate::datapath::cleanup::remove_datapath(self.pin_dir);
            warn!(pin_dir = %self.pin_dir.display(), "start failed: the pins it created are removed");
            agent::warn_incomplete(&removed);
        }
    }
}

/// A literal interface name must exist, and the patterns together must match
/// something; a glob matching nothing yet only warns (its interfaces may
/// appear later: pods start after the agent).
fn check_interface_patterns(attacher: &Attacher, patterns: &[String]) -> anyhow::Result<()> {
    let unmatched = attacher
        .unmatched_patterns()
        .context("listing interfaces")?;
    let have = || -> anyhow::Result<String> {
        Ok(attach::interfaces()?
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
            .join(", "))
    };
    let missing_literals: Vec<&String> = unmatched
        .iter()
        .filter(|p| !p.contains(['*', '?']) && *p != attach::UPLINK && *p != attach::PODS)
        .collect();
    let not_ethernet = attacher
        .not_ethernet_matches()
        .context("listing interfaces")?;
    if let Some(name) = missing_literals.iter().find(|p| not_ethernet.contains(p)) {
        bail!(
            "--interfaces: {name} has no Ethernet header (an IPIP, WireGuard or TUN device): \
             the tc programs cannot translate there"
        );
    }
    if !missing_literals.is_empty() {
        let names: Vec<&str> = missing_literals.iter().map(|s| s.as_str()).collect();
        bail!(
            "--interfaces: no interface named {} (have: {})",
            names.join(", "),
            have()?
        );
    }
    if unmatched.len() == patterns.len() {
        bail!(
            "--interfaces/--external-interfaces: pattern(s) {} match no interface (have: {})",
            unmatched.join(", "),
            have()?
        );
    }
    for pattern in &unmatched {
        warn!(%pattern, "--interfaces pattern matches no interface yet; it will attach when one appears");
    }
    Ok(())
}
