//! `lb-agent run`: load and pin the datapath, attach to interfaces, and keep
//! the maps in sync with the source — a directory of manifests or the API
//! server — until SIGINT/SIGTERM. Both sources feed the same path:
//! objects → `desired::compute` → `Reconciler::apply`.

pub mod health;
pub mod metrics;
pub mod node;
pub mod service_health;

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context as _};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::Notify,
};
use tracing::{error, info, warn};

use crate::{
    datapath::{
        attach,
        attach::Attacher,
        conntrack::{monotonic_ns, Conntrack},
        loader,
        loader::MapSizes,
        maps::KernelMaps,
        udp_reset::UdpResetter,
    },
    desired::{DesiredState, Limits, NodeContext},
    model::error::InputError,
    reconcile::Reconciler,
    serve::health::Health,
    serve::metrics::{ErrorKind, FlowRemoval, Metrics},
    serve::node::NodeSettings,
    serve::service_health::ServiceHealthServers,
    source::k8s::ApiSource,
    source::manifest::ManifestDir,
    source::store::ObjectStore,
    source::watch,
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
    pub health_addr: Option<SocketAddr>,
    /// Serve Prometheus metrics here (`None`: off).
    pub metrics_addr: Option<SocketAddr>,
    /// Datapath debug events (aya-log) into the agent's log.
    pub datapath_log: bool,
    pub timeouts: lb_common::ct::CtTimeouts,
    pub conntrack_gc_interval: Duration,
    /// `/healthz` fails while a seen change waits longer than this.
    pub health_timeout: Duration,
}

const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How often, at most, the programmed-state metrics are recounted: counting
/// walks every frontend, which a stream of single changes must not pay each.
const FILL_INTERVAL: Duration = Duration::from_secs(1);
/// With file and link events, a full rescan only backs them up.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

enum Source {
    Files(ManifestDir),
    Api(ApiSource),
}

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let trigger = Arc::new(Notify::new());
    let source = match &config.source {
        SourceConfig::Manifests(dir) => {
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            Source::Files(ManifestDir::new(dir))
        }
        SourceConfig::Api {
            kubeconfig,
            api_server,
        } => {
            let client = crate::source::k8s::client(kubeconfig.as_deref(), api_server.as_deref())
                .await
                .context("connecting to the API server")?;
            Source::Api(ApiSource::start(client, trigger.clone()))
        }
    };
    let mut attacher = Attacher::new(
        config.interfaces.clone(),
        config.external_interfaces.clone(),
        Some(config.pin_dir.join("links")),
    );
    if attacher.wants_uplinks() {
        attacher.set_uplinks(
            watch::default_route_interfaces()
                .await
                .context("--interfaces @uplink: reading the default routes")?,
        );
    }
    let patterns: Vec<String> = config
        .interfaces
        .iter()
        .chain(&config.external_interfaces)
        .cloned()
        .collect();
    check_interface_patterns(&attacher, &patterns)?;
    let health = Health::new(config.health_timeout);
    if let Some(addr) = config.health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-addr {addr}"))?;
        tokio::spawn(health::serve(listener, health.clone()));
        info!(%addr, "serving /healthz and /readyz");
    }

    let pin_dir = config.pin_dir.clone();
    let mut unpin_on_failure = UnpinOnFailure::new(&pin_dir);
    let mut ebpf = loader::load_with_log(
        Some(&pin_dir),
        config.sizes,
        &config.timeouts,
        config.datapath_log,
    )
    .context("loading the datapath")?;
    let migration = crate::datapath::migrate::Migration::pending(&pin_dir);
    if let Some(migration) = &migration {
        let copied = migration
            .adopt()
            .context("migrating the pinned datapath from map layout v3")?;
        info!(
            ?copied,
            "adopting a datapath of map layout v3: copied into v4; the old maps go once this run is attached and programmed"
        );
    }
    if config.datapath_log {
        loader::forward_debug_events(&mut ebpf).context("--datapath-log")?;
        info!("datapath debug events on (target `datapath`)");
    }
    let maps = loader::kernel_maps(&mut ebpf, config.sizes)?;
    let mut conntrack = loader::conntrack(&mut ebpf, config.sizes)?;
    let capacities =
        crate::datapath::fill::capacities(&pin_dir).context("reading the pinned maps' sizes")?;
    // The table as pinned, which may predate the flag.
    conntrack.capacity = capacities
        .get(lb_common::ct::CT_MAP)
        .copied()
        .unwrap_or(conntrack.capacity);
    let config_map = loader::ConfigMap::take(&mut ebpf)?;
    let udp_resetter = loader::udp_resetter(&mut ebpf)?;
    let stats = crate::datapath::counters::open(&pin_dir)?;
    let metrics = Metrics::new(Some(stats));
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-bind-address {addr}"))?;
        tokio::spawn(crate::serve::metrics::serve(listener, metrics.clone()));
        info!(%addr, "serving /metrics");
    }
    let reconciler =
        Reconciler::restore(maps, config.sizes.backends).context("reading the pinned maps")?;
    info!(pin_dir = %pin_dir.display(), node = %config.node.name, "datapath loaded");

    let config_limits = config.limits;
    let node_context = NodeContext {
        name: Some(config.node.name.clone()),
        nodeport_addresses: Vec::new(),
    };
    let mut agent = Agent {
        config,
        ebpf,
        attacher,
        reconciler,
        conntrack,
        capacities,
        migration,
        udp_resetter,
        metrics,
        change_seen: None,
        fill_due: true,
        source,
        trigger,
        service_health: ServiceHealthServers::new(health.clone()),
        health,
        store: ObjectStore::default(),
        state: DesiredState::new(config_limits, node_context),
        config_map,
        node_config: None,
        served_checks: None,
        file_errors: Vec::new(),
        synced: false,
        changed_paths: watch::SharedPaths::default(),
        full_scan: true,
        recomputed_since_trim: 0,
        reported: BTreeSet::new(),
    };
    // From here, shutdown decides what stays pinned.
    unpin_on_failure.disarm();
    let result = agent.serve().await;
    agent.shutdown();
    result
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
            loader::unpin_all(self.pin_dir);
            warn!(pin_dir = %self.pin_dir.display(), "start failed: the pins it created are removed");
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
        .filter(|p| !p.contains(['*', '?']) && *p != attach::UPLINK)
        .collect();
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

/// Parsing a large input peaks far above the steady state; hand the freed
/// heap back to the kernel so the agent's RSS reflects what it keeps.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free glibc heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}

struct Agent {
    config: RunConfig,
    ebpf: aya::Ebpf,
    attacher: Attacher,
    reconciler: Reconciler<KernelMaps>,
    conntrack: Conntrack,
    /// `max_entries` of each pinned map.
    capacities: std::collections::BTreeMap<&'static str, u32>,
    /// A map layout v3 datapath being taken over (until this run is attached
    /// and programmed).
    migration: Option<crate::datapath::migrate::Migration>,
    udp_resetter: UdpResetter,
    metrics: Metrics,
    /// When the oldest change not yet written was seen.
    change_seen: Option<std::time::Instant>,
    /// The maps changed since the programmed-state metrics were counted.
    fill_due: bool,
    source: Source,
    /// Nudged by watch events (API) or file events (manifests).
    trigger: Arc<Notify>,
    health: Arc<Health>,
    /// Every object the source holds, by Service.
    store: ObjectStore,
    /// The desired state, updated per changed Service.
    state: DesiredState,
    /// Problems in the manifest files themselves (not YAML, empty, …).
    file_errors: Vec<InputError>,
    /// The maps were programmed from a complete view of the source.
    synced: bool,
    /// Manifest files a watch reported changed, and whether the next pass
    /// scans the whole directory instead.
    changed_paths: watch::SharedPaths,
    full_scan: bool,
    recomputed_since_trim: usize,
    reported: BTreeSet<String>,
    config_map: loader::ConfigMap,
    /// What the config map holds (`None`: not written by this run yet).
    node_config: Option<lb_common::config::NodeConfig>,
    service_health: ServiceHealthServers,
    /// The health checks being served and the addresses they are served on.
    served_checks: Option<(
        std::collections::BTreeMap<crate::model::ServiceName, crate::desired::HealthCheck>,
        Vec<std::net::Ipv4Addr>,
    )>,
}

impl Agent {
    /// Event-driven: work happens when something changed (a watch or file
    /// event, a link event, a retry or GC due), not on a timer.
    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        // Attach first (empty maps pass everything), then program: once the
        // maps show a service, every matching interface already serves it.
        self.sync_interfaces().await?;
        if let Some(cgroup) = self.config.socket_lb.clone() {
            let links = self.config.pin_dir.join("links");
            let attacher = &self.attacher;
            crate::datapath::cgroup::attach_socket_lb(&mut self.ebpf, &cgroup, &links, |hook| {
                attacher.pin_name("cgroup", hook)
            })
            .context("attaching socket LB")?;
            info!(cgroup = %cgroup.display(), "socket LB attached (connect4, sendmsg4, recvmsg4, getpeername4)");
        }
        let _dir_watch = match &self.config.source {
            SourceConfig::Manifests(dir) => {
                match watch::watch_dir(dir, self.changed_paths.clone(), self.trigger.clone()) {
                    Ok(watcher) => Some(watcher),
                    Err(e) => {
                        warn!(
                            "watching {}: {e}; polling every {:?} instead",
                            dir.display(),
                            self.config.poll_interval
                        );
                        None
                    }
                }
            }
            SourceConfig::Api { .. } => None,
        };
        let links = Arc::new(Notify::new());
        let link_events = match watch::watch_links(links.clone(), self.attacher.wants_uplinks()) {
            Ok(()) => true,
            Err(e) => {
                warn!(
                    "link events: {e}; polling interfaces every {:?} instead",
                    self.config.poll_interval
                );
                false
            }
        };
        let watched =
            link_events && (_dir_watch.is_some() || matches!(self.source, Source::Api(_)));
        let mut rescan = tokio::time::interval(if watched {
            RESCAN_INTERVAL.max(self.config.poll_interval)
        } else {
            self.config.poll_interval
        });
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        let mut gc = tokio::time::interval(self.config.conntrack_gc_interval);
        gc.reset(); // not at start: nothing has expired yet
        let mut fill = tokio::time::interval(FILL_INTERVAL);
        for timer in [&mut rescan, &mut retry, &mut gc, &mut fill] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut released_links = false;
        let (mut source_due, mut interfaces_due, mut retry_due) = (true, false, false);
        loop {
            // Interfaces before objects: a pod's interface exists before its
            // endpoint is listed, so by the time the maps send traffic to it,
            // the interface reverse-NATs its replies.
            if interfaces_due {
                if let Err(e) = self.sync_interfaces().await {
                    self.metrics.error(ErrorKind::Interfaces);
                    error!("listing interfaces: {e:#}");
                }
            }
            if source_due {
                if let Err(e) = self.sync_source() {
                    self.metrics.error(ErrorKind::Source);
                    error!("reading {}: {e:#}", self.source_name());
                }
            } else if retry_due && self.reconciler.needs_retry() {
                self.retry();
            }
            if self.synced && !self.reconciler.needs_retry() {
                self.health.synced();
                // A change that needed no write is in the maps already.
                self.change_seen = None;
            }
            if !released_links && self.synced {
                // This run's links are attached and its maps programmed:
                // drop the links a previous run left pinned.
                released_links = true;
                let released = self.release_previous_run();
                if !released.is_empty() {
                    info!(links = ?released, "released links pinned by a previous run");
                }
            }
            (source_due, interfaces_due, retry_due) = (false, false, false);
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM"); return Ok(()); }
                _ = sigint.recv() => { info!("SIGINT"); return Ok(()); }
                _ = self.trigger.notified() => {
                    self.health.change_seen();
                    self.change_seen.get_or_insert_with(std::time::Instant::now);
                    source_due = true;
                }
                _ = links.notified() => interfaces_due = true,
                _ = rescan.tick() => {
                    self.full_scan = true;
                    if std::mem::take(&mut self.recomputed_since_trim) > 0 {
                        release_freed_memory(); // what the last changes left behind
                    }
                    (source_due, interfaces_due) = (!matches!(self.source, Source::Api(_)), true);
                }
                _ = retry.tick(), if self.reconciler.needs_retry() => retry_due = true,
                _ = gc.tick() => self.collect_conntrack(),
                _ = fill.tick(), if self.fill_due => {
                    self.fill_due = false;
                    self.report_programmed();
                }
            }
        }
    }

    /// Drops the links a previous run left pinned; after an upgrade, also
    /// finishes the migration around it.
    fn release_previous_run(&mut self) -> Vec<String> {
        let attacher = &self.attacher;
        let Some(migration) = self.migration.take() else {
            return attacher.release_previous();
        };
        let (released, result) = migration.finish(|| attacher.release_previous());
        match result {
            Ok(copied) => info!(
                ?copied,
                "map layout v3 retired: flows its programs created meanwhile copied, its pins removed"
            ),
            Err(e) => {
                self.metrics.error(ErrorKind::DatapathWrite);
                error!("finishing the migration from map layout v3: {e}");
            }
        }
        released
    }

    fn source_name(&self) -> String {
        match &self.config.source {
            SourceConfig::Manifests(dir) => dir.display().to_string(),
            SourceConfig::Api { .. } => "the API server".into(),
        }
    }

    /// Brings the Services the source changed into the store, recomputes
    /// just those, and applies just what they changed.
    fn sync_source(&mut self) -> anyhow::Result<()> {
        let (paths, rescan) = watch::take(&self.changed_paths);
        let full_scan = rescan || std::mem::take(&mut self.full_scan) || !self.synced;
        let dirty = match &mut self.source {
            Source::Files(dir) => match if full_scan {
                dir.poll()?
            } else {
                dir.poll_paths(&paths)?
            } {
                Some(changes) => {
                    let mut dirty = self.store.remove(&changes.removed);
                    dirty.extend(self.store.add(&changes.added));
                    self.file_errors = changes.errors;
                    dirty
                }
                None => return Ok(()),
            },
            Source::Api(api) => {
                let dirty = api.drain(&mut self.store);
                // Never act before both lists are complete: a partial store
                // would look like deleted services.
                if !api.is_ready() {
                    return Ok(());
                }
                dirty
            }
        };
        if dirty.is_empty() && self.synced {
            return Ok(());
        }
        let changes = self.state.update(&self.store, &dirty);
        self.report_input_errors();
        let first = !self.synced;
        self.synced = true;
        self.program((!first).then_some(&changes));
        // Bursts (a relist, thousands of single events) leave freed heap
        // behind: hand it back once enough Services were recomputed.
        self.recomputed_since_trim += dirty.len();
        if changes.all || self.recomputed_since_trim > 1000 {
            self.recomputed_since_trim = 0;
            release_freed_memory();
        }
        Ok(())
    }

    /// Reports each distinct problem once, not on every pass.
    fn report_input_errors(&mut self) {
        let current: BTreeSet<String> = self
            .file_errors
            .iter()
            .chain(&self.state.errors())
            .map(ToString::to_string)
            .collect();
        for problem in current.difference(&self.reported) {
            warn!("invalid input, skipped: {problem}");
        }
        self.metrics.invalid_services(current.len());
        self.reported = current;
    }

    /// Retries everything after a failed pass.
    fn retry(&mut self) {
        self.program(None);
    }

    /// Writes the desired state into the maps: what `changes` touched, or
    /// everything.
    fn program(&mut self, changes: Option<&crate::desired::Changes>) {
        // Every log line of the pass carries the span and, once known, its counts.
        let span = tracing::info_span!(
            "reconcile",
            scope = if changes.is_some() { "changes" } else { "all" },
            services = changes.map_or(0, |c| c.services.len()),
            added = tracing::field::Empty,
            updated = tracing::field::Empty,
            removed = tracing::field::Empty,
            errors = tracing::field::Empty,
            seconds = tracing::field::Empty,
        );
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let report = match changes {
            Some(changes) => self.reconciler.apply_changes(self.state.desired(), changes),
            None => self.reconciler.apply(self.state.desired()),
        };
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.sync_done(seconds);
        span.record("added", report.added)
            .record("updated", report.updated)
            .record("removed", report.removed)
            .record("errors", report.errors.len())
            .record("seconds", seconds);
        if report.errors.is_empty() {
            self.metrics
                .programmed(self.change_seen.take().map(|seen| seen.elapsed()));
        } else {
            self.metrics.error(ErrorKind::DatapathWrite);
        }
        self.after_apply(report);
    }

    /// Serves the health checks of the desired state on the node addresses.
    fn sync_health_checks(&mut self) {
        let wanted = (
            self.state.desired().health_checks.clone(),
            self.state.node().nodeport_addresses.clone(),
        );
        if self.served_checks.as_ref() == Some(&wanted) {
            return;
        }
        for e in self.service_health.sync(&wanted.0, &wanted.1) {
            self.metrics.error(ErrorKind::HealthCheckServer);
            error!("{e}");
        }
        self.served_checks = Some(wanted);
    }

    fn after_apply(&mut self, report: crate::reconcile::Report) {
        self.sync_health_checks();
        self.fill_due = true;
        info!(
            frontends = self.state.desired().frontends.len(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            unchanged = report.unchanged,
            kept_last_good = report.kept,
            "applied"
        );
        for e in &report.errors {
            error!("datapath update failed (will retry): {e}");
        }
        if !report.udp_backends_removed.is_empty() {
            let removed = report
                .udp_backends_removed
                .iter()
                .map(|left| (left.frontend, left.backend_id))
                .collect();
            match self.conntrack.flush_udp(&removed) {
                Ok(sweep) => {
                    self.metrics
                        .flows_removed(FlowRemoval::BackendLeft, sweep.flows_removed);
                    info!(
                        flows = sweep.flows_removed,
                        "flushed UDP conntrack of backends that left their service"
                    )
                }
                Err(e) => {
                    self.metrics.error(ErrorKind::ConntrackFlush);
                    error!("flushing UDP conntrack: {e}")
                }
            }
            // Socket LB translated connected UDP sockets once, at connect:
            // no flow to flush, the sockets themselves are reset.
            match self.udp_resetter.reset(&report.udp_backends_removed) {
                Ok(resets) if resets.candidates > 0 => {
                    self.metrics.udp_sockets_reset(resets.sockets_reset);
                    info!(
                        sockets = resets.sockets_reset,
                        namespaces = resets.namespaces,
                        "reset connected UDP sockets of backends that left their service"
                    )
                }
                Ok(_) => {}
                Err(e) => {
                    self.metrics.error(ErrorKind::UdpSocketReset);
                    error!("resetting connected UDP sockets: {e}")
                }
            }
        }
    }

    /// Services, frontends and backends in the maps, and how full they are.
    fn report_programmed(&self) {
        let fill = self.reconciler.fill();
        self.metrics
            .programmed_state(fill.services, &fill.frontends, fill.backends);
        for (map, entries) in [
            (lb_common::svc::SVC_MAP, fill.service_entries),
            (lb_common::backend::BACKEND_MAP, fill.backends),
            (lb_common::revnat::REVNAT_MAP, fill.revnat),
            (
                lb_common::affinity::AFFINITY_MATCH_MAP,
                fill.affinity_matches,
            ),
            (
                lb_common::source_range::SOURCE_RANGE_MAP,
                fill.source_ranges,
            ),
            (lb_common::maglev::MAGLEV_MAP, fill.maglev_chunks),
        ] {
            self.report_fill(map, entries as u64);
        }
    }

    fn report_fill(&self, map: &'static str, entries: u64) {
        let capacity = self.capacities.get(map).copied().unwrap_or(0);
        self.metrics.map_fill(map, entries, capacity);
    }

    /// Frees flows whose both directions have expired, and reports the fill.
    fn collect_conntrack(&mut self) {
        let capacity = self.conntrack.capacity;
        match crate::datapath::fill::datapath_tables(&self.config.pin_dir) {
            Ok(tables) => {
                for (map, entries) in tables {
                    self.report_fill(map, entries);
                }
            }
            Err(e) => warn!("counting the datapath's tables: {e}"),
        }
        match self.conntrack.gc(monotonic_ns()) {
            Ok(sweep) => {
                self.metrics.conntrack_entries(sweep.entries);
                self.report_fill(lb_common::ct::CT_MAP, sweep.entries as u64);
                self.metrics
                    .flows_removed(FlowRemoval::Expired, sweep.flows_removed);
                let fill = sweep.entries as f64 / f64::from(capacity.max(1));
                let entries = sweep.entries;
                if fill >= 0.9 {
                    warn!(entries, capacity, freed_flows = sweep.flows_removed,
                        "conntrack table {:.0}% full: new flows are dropped when it is full (raise --max-conntrack)",
                        fill * 100.0);
                } else if sweep.flows_removed > 0 {
                    info!(
                        entries,
                        capacity,
                        freed_flows = sweep.flows_removed,
                        "conntrack gc"
                    );
                }
            }
            Err(e) => {
                self.metrics.error(ErrorKind::ConntrackGc);
                error!("conntrack gc: {e}")
            }
        }
    }

    async fn sync_interfaces(&mut self) -> anyhow::Result<()> {
        if self.attacher.wants_uplinks() {
            match watch::default_route_interfaces().await {
                Ok(uplinks) => self.attacher.set_uplinks(uplinks),
                Err(e) => warn!("reading the default routes for @uplink: {e}"),
            }
        }
        let changes = self.attacher.sync(&mut self.ebpf)?;
        for name in &changes.attached {
            info!(interface = %name, "attached tc ingress and egress");
        }
        match crate::serve::node::interface_addresses().await {
            Ok(addresses) => self.sync_node(&addresses),
            Err(e) => warn!("reading the node's addresses: {e}"),
        }
        for name in &changes.gone {
            info!(interface = %name, "interface gone");
        }
        for e in &changes.errors {
            warn!("{e}");
        }
        Ok(())
    }

    /// Follows the node's addresses: the node-port frontends and the SNAT
    /// address move with them.
    fn sync_node(&mut self, addresses: &[crate::serve::node::InterfaceAddress]) {
        let external = self.attacher.external_ifindexes();
        let (context, config) = self.config.node.resolve(addresses, &external);
        if self.node_config != Some(config) {
            match self.config_map.set(&config) {
                Ok(()) => {
                    let snat = std::net::Ipv4Addr::from(config.snat_addr);
                    if snat.is_unspecified() {
                        warn!("no SNAT address (no address on an external interface): external flows to other nodes' backends are dropped");
                    } else {
                        info!(%snat, ports = ?(config.snat_port_first..=config.snat_port_last), "SNAT for external flows to other nodes");
                    }
                    self.node_config = Some(config);
                }
                Err(e) => {
                    self.metrics.error(ErrorKind::NodeConfig);
                    error!("writing the node config: {e}")
                }
            }
        }
        if context != *self.state.node() {
            info!(addresses = ?context.nodeport_addresses, "node port addresses");
            if let Some(changes) = self.state.set_node(context, &self.store) {
                if self.synced {
                    self.report_input_errors();
                    self.program(Some(&changes));
                }
            }
        }
    }

    fn shutdown(&mut self) {
        let pin_dir = &self.config.pin_dir;
        if self.config.keep_datapath {
            // Links are pinned from the moment they are attached.
            info!(pin_dir = %pin_dir.display(), "exiting; datapath kept (links and maps pinned)");
        } else {
            let interfaces: Vec<String> = self.attacher.attached().map(str::to_owned).collect();
            self.attacher.detach_all();
            loader::unpin_all(pin_dir);
            info!(?interfaces, "exiting; datapath detached and unpinned");
        }
    }
}
