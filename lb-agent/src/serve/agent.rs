//! The running agent: what it reads (`Inputs`), the kernel objects it
//! drives (`Datapath`), what it reports (`Status`), and the event loop that
//! wakes for one `Wake` at a time and brings the datapath in line.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::Notify,
};
use tracing::{error, info, warn};

use super::{
    metrics::{ErrorKind, Metrics},
    service_health::ServiceHealthServers,
    upkeep::Upkeep,
    RunConfig, Source, SourceConfig, FILL_INTERVAL, RESCAN_INTERVAL, RETRY_INTERVAL,
};
use crate::{
    datapath::{attach::Attacher, cleanup, loader, maps::KernelMaps, migrate::Migration},
    desired::{DesiredState, HealthCheck},
    model::{error::InputError, Family, ServiceName},
    reconcile::Reconciler,
    serve::health::Health,
    source::{store::ObjectStore, watch},
};

/// What the agent reads and what it computed from it.
pub(super) struct Inputs {
    pub source: Source,
    /// Nudged by watch events (API) or file events (manifests).
    pub trigger: Arc<Notify>,
    /// Every object the source holds, by Service.
    pub store: ObjectStore,
    /// The desired state, updated per changed Service.
    pub state: DesiredState,
    /// Problems in the manifest files themselves (not YAML, empty, …).
    pub file_errors: Vec<InputError>,
    /// Manifest files a watch reported changed, and whether the next pass
    /// scans the whole directory instead.
    pub changed_paths: watch::SharedPaths,
    pub full_scan: bool,
    /// Services recomputed since freed heap was last handed back.
    pub recomputed_since_trim: usize,
    /// This node's zone from its Node object (API mode), once seen.
    pub node_zone: super::NodeZone,
}

/// The kernel side: the loaded object, its attachments and its maps.
pub(super) struct Datapath {
    pub ebpf: aya::Ebpf,
    pub attacher: Attacher,
    pub reconciler: Reconciler<KernelMaps>,
    /// Conntrack GC, UDP flushes and socket resets, off this thread.
    pub upkeep: Upkeep,
    /// `max_entries` of each pinned map.
    pub capacities: std::collections::BTreeMap<&'static str, u32>,
    /// A map layout v3 datapath being taken over (until this run is attached
    /// and programmed).
    pub migration: Option<Migration>,
    pub config_map: loader::ConfigMap,
    /// What the config map holds (`None`: not written by this run yet).
    pub node_config: Option<crate::datapath::loader::NodeConfigs>,
}

/// What the agent tells others: health, metrics, health-check servers.
pub(super) struct Status {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// When the oldest change not yet written was seen.
    pub change_seen: Option<std::time::Instant>,
    /// Trigger times of the EndpointSlice changes not yet written.
    pub triggers: Vec<jiff::Timestamp>,
    /// The links' kinds as last read (`@pods`, non-Ethernet devices).
    pub link_kinds: crate::source::watch::LinkKinds,
    /// The maps changed since the programmed-state metrics were counted.
    pub fill_due: bool,
    /// The maps were programmed from a complete view of the source.
    pub synced: bool,
    /// The input problems already logged (each is logged once).
    pub reported: BTreeSet<String>,
    pub service_health: ServiceHealthServers,
    /// The health checks being served and the addresses they are served on.
    pub served_checks: Option<(BTreeMap<ServiceName, HealthCheck>, Vec<std::net::IpAddr>)>,
}

pub(super) struct Agent {
    pub config: RunConfig,
    pub inputs: Inputs,
    pub datapath: Datapath,
    pub status: Status,
}

/// Why the loop woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// The first pass: read everything.
    Start,
    /// A watch or file event: the source changed.
    SourceChanged,
    /// A link, address or route event.
    Links,
    /// The periodic rescan backing the events up.
    Rescan,
    /// A failed pass is due for a retry.
    Retry,
    /// The programmed-state metrics are due for a recount.
    Fill,
}

/// Parsing a large input peaks far above the steady state; hand the freed
/// heap back to the kernel so the agent's RSS reflects what it keeps.
fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free glibc heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}

impl Agent {
    /// Event-driven: work happens when something changed (a watch or file
    /// event, a link event, a retry or GC due), not on a timer.
    pub async fn serve(&mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        // Attach first (empty maps pass everything), then program: once the
        // maps show a service, every matching interface already serves it.
        self.sync_interfaces().await?;
        self.attach_socket_lb()?;
        let dir_watch = self.watch_manifests();
        let links = Arc::new(Notify::new());
        let link_events =
            match watch::watch_links(links.clone(), self.datapath.attacher.wants_uplinks()) {
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
            link_events && (dir_watch.is_some() || matches!(self.inputs.source, Source::Api(_)));
        let mut rescan = tokio::time::interval(if watched {
            RESCAN_INTERVAL.max(self.config.poll_interval)
        } else {
            self.config.poll_interval
        });
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        let mut fill = tokio::time::interval(FILL_INTERVAL);
        for timer in [&mut rescan, &mut retry, &mut fill] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut released_links = false;
        let mut wake = Wake::Start;
        loop {
            self.handle(wake).await;
            if !released_links && self.status.synced {
                // This run's links are attached and its maps programmed:
                // drop the links a previous run left pinned.
                released_links = true;
                let released = self.release_previous_run();
                if !released.is_empty() {
                    info!(links = ?released, "released links pinned by a previous run");
                }
            }
            wake = tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM"); return Ok(()); }
                _ = sigint.recv() => { info!("SIGINT"); return Ok(()); }
                _ = self.inputs.trigger.notified() => Wake::SourceChanged,
                _ = links.notified() => Wake::Links,
                _ = rescan.tick() => Wake::Rescan,
                _ = retry.tick(), if self.datapath.reconciler.needs_retry() => Wake::Retry,
                _ = fill.tick(), if self.status.fill_due => Wake::Fill,
            };
        }
    }

    /// Does what `wake` calls for, then records what the pass achieved.
    async fn handle(&mut self, wake: Wake) {
        match wake {
            Wake::SourceChanged => {
                self.status.health.change_seen();
                self.status
                    .change_seen
                    .get_or_insert_with(std::time::Instant::now);
            }
            Wake::Rescan => {
                self.inputs.full_scan = true;
                if std::mem::take(&mut self.inputs.recomputed_since_trim) > 0 {
                    release_freed_memory(); // what the last changes left behind
                }
            }
            Wake::Fill => {
                self.status.fill_due = false;
                self.report_programmed();
            }
            Wake::Start | Wake::Links | Wake::Retry => {}
        }
        // Interfaces before objects: a pod's interface exists before its
        // endpoint is listed, so by the time the maps send traffic to it,
        // the interface reverse-NATs its replies.
        if matches!(wake, Wake::Links | Wake::Rescan) {
            if let Err(e) = self.sync_interfaces().await {
                self.status.metrics.error(ErrorKind::Interfaces);
                error!("listing interfaces: {e:#}");
            }
        }
        let api = matches!(self.inputs.source, Source::Api(_));
        let read_source = match wake {
            Wake::Start | Wake::SourceChanged => true,
            // The API source is watched; a rescan re-reads files only.
            Wake::Rescan => !api,
            _ => false,
        };
        if read_source {
            if let Err(e) = self.sync_source() {
                self.status.metrics.error(ErrorKind::Source);
                error!("reading {}: {e:#}", self.source_name());
            }
        } else if wake == Wake::Retry && self.datapath.reconciler.needs_retry() {
            self.retry();
        }
        if self.status.synced && !self.datapath.reconciler.needs_retry() {
            self.status.health.synced();
            // A change that needed no write is in the maps already.
            self.status.change_seen = None;
            let triggers = std::mem::take(&mut self.status.triggers);
            self.status.metrics.slices_programmed(&triggers);
        }
    }

    fn attach_socket_lb(&mut self) -> anyhow::Result<()> {
        let Some(cgroup) = self.config.socket_lb.clone() else {
            return Ok(());
        };
        let links = self.config.pin_dir.join(cleanup::LINK_DIR);
        let attacher = &self.datapath.attacher;
        crate::datapath::cgroup::attach_socket_lb(
            &mut self.datapath.ebpf,
            &cgroup,
            &links,
            |hook| attacher.pin_name("cgroup", hook),
        )
        .context("attaching socket LB")?;
        info!(cgroup = %cgroup.display(), "socket LB attached (connect, sendmsg, recvmsg, getpeername for IPv4 and IPv4-mapped IPv6; sock_release)");
        Ok(())
    }

    /// The manifest directory's file watch (`None`: API mode, or no
    /// inotify: the rescan polls instead).
    fn watch_manifests(&self) -> Option<notify::RecommendedWatcher> {
        let SourceConfig::Manifests(dir) = &self.config.source else {
            return None;
        };
        match watch::watch_dir(
            dir,
            self.inputs.changed_paths.clone(),
            self.inputs.trigger.clone(),
        ) {
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

    /// Drops the links a previous run left pinned; after an upgrade, also
    /// finishes the migration around it.
    fn release_previous_run(&mut self) -> Vec<String> {
        let released = self.release_previous_links();
        if self.config.socket_lb.is_none() {
            self.datapath.upkeep.forget_sockets();
        }
        released
    }

    fn release_previous_links(&mut self) -> Vec<String> {
        let attacher = &self.datapath.attacher;
        let Some(migration) = self.datapath.migration.take() else {
            return attacher.release_previous();
        };
        let (released, result) = migration.finish(|| attacher.release_previous());
        match result {
            Ok(copied) => info!(
                ?copied,
                "map layout v3 retired: flows its programs created meanwhile copied, its pins removed"
            ),
            Err(e) => {
                self.status.metrics.error(ErrorKind::DatapathWrite);
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
    /// A zone the Node object gave replaces `--node-zone`: every Service
    /// with topology hints is recomputed for it.
    fn sync_zone(&mut self) {
        let seen = self
            .inputs
            .node_zone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(zone) = seen.filter(|z| *z != self.config.node.zone) else {
            return;
        };
        info!(zone = ?zone.as_deref(), "node zone (topology hints)");
        self.config.node.zone = zone.clone();
        let context = crate::desired::NodeContext {
            zone,
            ..self.inputs.state.node().clone()
        };
        if let Some(changes) = self.inputs.state.set_node(context, &self.inputs.store) {
            if self.status.synced {
                self.report_input_errors();
                self.program(Some(&changes));
            }
        }
    }

    fn sync_source(&mut self) -> anyhow::Result<()> {
        self.sync_zone();
        let (paths, rescan) = watch::take(&self.inputs.changed_paths);
        let full_scan = rescan || std::mem::take(&mut self.inputs.full_scan) || !self.status.synced;
        let dirty = match &mut self.inputs.source {
            Source::Files(dir) => match if full_scan {
                dir.poll()?
            } else {
                dir.poll_paths(&paths)?
            } {
                Some(changes) => {
                    let mut dirty = self.inputs.store.remove(&changes.removed);
                    dirty.extend(self.inputs.store.add(&changes.added));
                    self.inputs.file_errors = changes.errors;
                    dirty
                }
                None => return Ok(()),
            },
            Source::Api(api) => {
                let dirty = api.drain(&mut self.inputs.store);
                self.status.triggers.extend(api.take_trigger_times());
                // Never act before both lists are complete: a partial store
                // would look like deleted services.
                if !api.is_ready() {
                    return Ok(());
                }
                dirty
            }
        };
        if dirty.is_empty() && self.status.synced {
            return Ok(());
        }
        let changes = self.inputs.state.update(&self.inputs.store, &dirty);
        self.report_input_errors();
        let first = !self.status.synced;
        self.status.synced = true;
        self.program((!first).then_some(&changes));
        // Bursts (a relist, thousands of single events) leave freed heap
        // behind: hand it back once enough Services were recomputed.
        self.inputs.recomputed_since_trim += dirty.len();
        if changes.all || self.inputs.recomputed_since_trim > 1000 {
            self.inputs.recomputed_since_trim = 0;
            release_freed_memory();
        }
        Ok(())
    }

    /// Reports each distinct problem once, not on every pass.
    fn report_input_errors(&mut self) {
        let current: BTreeSet<String> = self
            .inputs
            .file_errors
            .iter()
            .chain(&self.inputs.state.errors())
            .map(ToString::to_string)
            .collect();
        for problem in current.difference(&self.status.reported) {
            warn!("invalid input, skipped: {problem}");
        }
        self.status.metrics.invalid_services(current.len());
        self.status.reported = current;
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
            Some(changes) => self
                .datapath
                .reconciler
                .apply_changes(self.inputs.state.desired(), changes),
            None => self.datapath.reconciler.apply(self.inputs.state.desired()),
        };
        let seconds = started.elapsed().as_secs_f64();
        self.status.metrics.sync_done(seconds);
        span.record("added", report.added)
            .record("updated", report.updated)
            .record("removed", report.removed)
            .record("errors", report.errors.len())
            .record("seconds", seconds);
        if report.errors.is_empty() {
            self.status
                .metrics
                .programmed(self.status.change_seen.take().map(|seen| seen.elapsed()));
        } else {
            self.status.metrics.error(ErrorKind::DatapathWrite);
        }
        self.after_apply(report);
    }

    /// Serves the health checks of the desired state on the node addresses.
    fn sync_health_checks(&mut self) {
        let wanted = (
            self.inputs.state.desired().health_checks.clone(),
            self.inputs.state.node().nodeport_addresses.clone(),
        );
        if self.status.served_checks.as_ref() == Some(&wanted) {
            return;
        }
        for e in self.status.service_health.sync(&wanted.0, &wanted.1) {
            self.status.metrics.error(ErrorKind::HealthCheckServer);
            error!("{e}");
        }
        self.status.served_checks = Some(wanted);
    }

    fn after_apply(&mut self, report: crate::reconcile::Report) {
        self.sync_health_checks();
        self.status.fill_due = true;
        info!(
            frontends = self.inputs.state.desired().frontends.len(),
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
            self.datapath
                .upkeep
                .backends_left(report.udp_backends_removed);
        }
    }

    /// Services, frontends and backends in the maps, and how full they are.
    fn report_programmed(&self) {
        use lb_common::{backend, revnat, source_range, svc};
        let fill = self.datapath.reconciler.fill();
        self.status.metrics.programmed_state(&fill);
        let (v4, v6) = (fill.family(Family::V4), fill.family(Family::V6));
        for (map, entries) in [
            (svc::SVC_MAP, v4.service_entries),
            (svc::SVC6_MAP, v6.service_entries),
            (backend::BACKEND_MAP, v4.backends),
            (backend::BACKEND6_MAP, v6.backends),
            (revnat::REVNAT_MAP, v4.revnat),
            (revnat::REVNAT6_MAP, v6.revnat),
            (source_range::SOURCE_RANGE_MAP, v4.source_ranges),
            (source_range::SOURCE_RANGE6_MAP, v6.source_ranges),
            (
                lb_common::affinity::AFFINITY_MATCH_MAP,
                fill.affinity_matches,
            ),
            (lb_common::maglev::MAGLEV_MAP, fill.maglev_chunks),
        ] {
            self.report_fill(map, entries as u64);
        }
    }

    fn report_fill(&self, map: &'static str, entries: u64) {
        let capacity = self.datapath.capacities.get(map).copied().unwrap_or(0);
        self.status.metrics.map_fill(map, entries, capacity);
    }

    async fn sync_interfaces(&mut self) -> anyhow::Result<()> {
        if self.datapath.attacher.wants_uplinks() {
            match watch::default_route_interfaces().await {
                Ok(uplinks) => self.datapath.attacher.set_uplinks(uplinks),
                Err(e) => warn!("reading the default routes for @uplink: {e}"),
            }
        }
        match watch::link_kinds().await {
            Ok(kinds) => {
                if kinds != self.status.link_kinds {
                    self.datapath
                        .attacher
                        .set_link_kinds(kinds.pod_veths.clone(), kinds.not_ethernet.clone());
                    if kinds.not_ethernet != self.status.link_kinds.not_ethernet {
                        let skipped = self.datapath.attacher.not_ethernet_matches()?;
                        if !skipped.is_empty() {
                            warn!(
                                interfaces = ?skipped,
                                "matched, not attached: no Ethernet header (an IPIP, WireGuard or TUN device); \
                                 service traffic arriving there is not translated"
                            );
                        }
                    }
                    self.status.link_kinds = kinds;
                }
            }
            Err(e) => warn!("reading the links for @pods: {e}"),
        }
        let changes = self.datapath.attacher.sync(&mut self.datapath.ebpf)?;
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
        let external = self.datapath.attacher.external_ifindexes();
        let (context, config) = self.config.node.resolve(addresses, &external);
        if self.datapath.node_config != Some(config) {
            match self.datapath.config_map.set(&config) {
                Ok(()) => {
                    let snat = config.snat_addresses();
                    if snat.is_empty() {
                        warn!("no SNAT address (no address on an external interface): external flows to other nodes' backends are dropped");
                    } else {
                        info!(addresses = ?snat, ports = ?(config.v4.snat_port_first..=config.v4.snat_port_last), "SNAT for external flows to other nodes");
                    }
                    self.datapath.node_config = Some(config);
                }
                Err(e) => {
                    self.status.metrics.error(ErrorKind::NodeConfig);
                    error!("writing the node config: {e}")
                }
            }
        }
        if context != *self.inputs.state.node() {
            let before = self.inputs.state.node();
            if context.nodeport_addresses != before.nodeport_addresses {
                info!(addresses = ?context.nodeport_addresses, "node port addresses");
            }
            for redirect in &self.config.node.local_redirects {
                let key = (redirect.service.clone(), redirect.port);
                let (was, is) = (
                    before.local_redirects.contains_key(&key),
                    context.local_redirects.contains_key(&key),
                );
                if was != is {
                    info!(
                        service = %redirect.service,
                        port = redirect.port,
                        address = %redirect.address,
                        "local redirect {}",
                        if is { "in force: the address is on this node" } else { "off: the address left this node; the Service's endpoints serve" }
                    );
                }
            }
            if let Some(changes) = self.inputs.state.set_node(context, &self.inputs.store) {
                if self.status.synced {
                    self.report_input_errors();
                    self.program(Some(&changes));
                }
            }
        }
    }

    pub fn shutdown(&mut self) {
        let pin_dir = &self.config.pin_dir;
        if self.config.keep_datapath {
            // Links are pinned from the moment they are attached.
            info!(pin_dir = %pin_dir.display(), "exiting; datapath kept (links and maps pinned)");
        } else {
            let interfaces: Vec<String> = self
                .datapath
                .attacher
                .attached()
                .map(str::to_owned)
                .collect();
            self.datapath.attacher.detach_all();
            let removed = cleanup::remove_datapath(pin_dir);
            info!(?interfaces, "exiting; datapath detached and unpinned");
            warn_incomplete(&removed);
        }
    }
}

/// A cleanup that left something is worth a line: what, and why.
pub(super) fn warn_incomplete(removed: &cleanup::Removed) {
    if !removed.is_complete() {
        warn!(foreign = ?removed.foreign, errors = ?removed.errors, "pin directory not removed");
    }
}
