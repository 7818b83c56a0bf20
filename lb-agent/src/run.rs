//! `lb-agent run`: load and pin the datapath, attach to interfaces, and keep
//! the maps in sync with the source — a directory of manifests or the API
//! server — until SIGINT/SIGTERM. Both sources feed the same path:
//! objects → `desired::compute` → `Reconciler::apply`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

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
    },
    desired::{self, Desired, Limits},
    dirwatch::DirWatch,
    error::InputError,
    health,
    k8s::ApiSource,
    manifest::ManifestDir,
    objects::Objects,
    reconcile::Reconciler,
};

pub enum SourceConfig {
    Manifests(PathBuf),
    Api { kubeconfig: Option<PathBuf> },
}

pub struct RunConfig {
    pub source: SourceConfig,
    pub interfaces: Vec<String>,
    pub pin_dir: PathBuf,
    pub sizes: MapSizes,
    pub limits: Limits,
    pub keep_datapath: bool,
    pub poll_interval: Duration,
    pub node_name: Option<String>,
    pub health_addr: Option<SocketAddr>,
    pub timeouts: lb_common::ct::CtTimeouts,
    pub conntrack_gc_interval: Duration,
}

const RETRY_INTERVAL: Duration = Duration::from_secs(2);

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
        SourceConfig::Api { kubeconfig } => {
            let client = crate::k8s::client(kubeconfig.as_deref())
                .await
                .context("connecting to the API server")?;
            Source::Api(ApiSource::start(client, trigger.clone()))
        }
    };
    let attacher = Attacher::new(
        config.interfaces.clone(),
        Some(config.pin_dir.join("links")),
    );
    check_interface_patterns(&attacher, &config.interfaces)?;
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-addr {addr}"))?;
        tokio::spawn(health::serve(listener, ready.clone()));
        info!(%addr, "serving /healthz");
    }

    let pin_dir = config.pin_dir.clone();
    let mut ebpf = loader::load(Some(&pin_dir), config.sizes, &config.timeouts)
        .context("loading the datapath")?;
    let maps = loader::kernel_maps(&mut ebpf, config.sizes)?;
    let conntrack = loader::conntrack(&mut ebpf, config.sizes)?;
    let reconciler =
        Reconciler::restore(maps, config.sizes.backends).context("reading the pinned maps")?;
    info!(pin_dir = %pin_dir.display(), node = ?config.node_name, "datapath loaded");

    let mut agent = Agent {
        config,
        ebpf,
        attacher,
        reconciler,
        conntrack,
        source,
        trigger,
        ready,
        desired: None,
        reported: BTreeSet::new(),
    };
    let result = agent.serve().await;
    agent.shutdown();
    result
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
        .filter(|p| !p.contains(['*', '?']))
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
            "--interfaces: pattern(s) {} match no interface (have: {})",
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
    source: Source,
    trigger: Arc<Notify>,
    ready: Arc<AtomicBool>,
    desired: Option<Desired>,
    reported: BTreeSet<String>,
}

impl Agent {
    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        // Attach first (empty maps pass everything), then program: once the
        // maps show a service, every matching interface already serves it.
        self.sync_interfaces()?;
        self.trigger.notify_one();
        let dir_watch = match &self.config.source {
            SourceConfig::Manifests(dir) => match DirWatch::new(dir) {
                Ok(watch) => Some(watch),
                Err(e) => {
                    warn!(
                        "inotify on {}: {e}; polling every {:?} only",
                        dir.display(),
                        self.config.poll_interval
                    );
                    None
                }
            },
            SourceConfig::Api { .. } => None,
        };
        let mut released_links = false;
        let mut last_retry = Instant::now();
        let mut last_gc = Instant::now();
        loop {
            // Interfaces before objects each round: a pod's interface exists
            // before its endpoint is listed, so by the time the maps send
            // traffic to it, the interface reverse-NATs its replies.
            if let Err(e) = self.sync_interfaces() {
                error!("listing interfaces: {e:#}");
            }
            if let Err(e) = self.sync_source() {
                error!("reading {}: {e:#}", self.source_name());
            }
            if self.reconciler.needs_retry() && last_retry.elapsed() >= RETRY_INTERVAL {
                last_retry = Instant::now();
                if let Some(desired) = self.desired.clone() {
                    self.apply(&desired);
                }
            }
            if !released_links && self.desired.is_some() {
                // This run's links are attached and its maps programmed:
                // drop the links a previous run left pinned.
                released_links = true;
                let released = self.attacher.release_previous();
                if !released.is_empty() {
                    info!(links = ?released, "released links pinned by a previous run");
                }
            }
            if last_gc.elapsed() >= self.config.conntrack_gc_interval {
                last_gc = Instant::now();
                self.collect_conntrack();
            }
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM"); return Ok(()); }
                _ = sigint.recv() => { info!("SIGINT"); return Ok(()); }
                _ = self.trigger.notified(), if matches!(self.source, Source::Api(_)) => {}
                Ok(()) = async { dir_watch.as_ref().expect("guarded").changed().await }, if dir_watch.is_some() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    fn source_name(&self) -> String {
        match &self.config.source {
            SourceConfig::Manifests(dir) => dir.display().to_string(),
            SourceConfig::Api { .. } => "the API server".into(),
        }
    }

    /// Reconciles if the source changed (files) or has news (API).
    fn sync_source(&mut self) -> anyhow::Result<()> {
        let (objects, errors) = match &mut self.source {
            Source::Files(dir) => match dir.poll()? {
                Some(found) => found,
                None => return Ok(()),
            },
            // Never act before both lists are complete: a partial store would
            // look like deleted services.
            Source::Api(api) if !api.is_ready() => return Ok(()),
            Source::Api(api) => (api.objects(), Vec::new()),
        };
        self.reconcile(&objects, errors);
        Ok(())
    }

    fn reconcile(&mut self, objects: &Objects, mut errors: Vec<InputError>) {
        let (desired, desired_errors) = desired::compute(objects, self.config.limits);
        errors.extend(desired_errors);
        // Report each distinct problem once, not on every pass.
        let current: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for problem in current.difference(&self.reported) {
            warn!("invalid input, skipped: {problem}");
        }
        self.reported = current;
        if self.desired.as_ref() == Some(&desired) && !self.reconciler.needs_retry() {
            return;
        }
        self.apply(&desired);
        self.desired = Some(desired);
        self.ready.store(true, Ordering::Relaxed);
        release_freed_memory();
    }

    fn apply(&mut self, desired: &Desired) {
        let report = self.reconciler.apply(desired);
        info!(
            frontends = desired.frontends.len(),
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
            let removed = report.udp_backends_removed.iter().copied().collect();
            match self.conntrack.flush_udp(&removed) {
                Ok(sweep) => info!(
                    flows = sweep.flows_removed,
                    "flushed UDP conntrack of backends that left their service"
                ),
                Err(e) => error!("flushing UDP conntrack: {e}"),
            }
        }
    }

    /// Frees flows whose both directions have expired, and reports the fill.
    fn collect_conntrack(&mut self) {
        let capacity = self.conntrack.capacity;
        match self.conntrack.gc(monotonic_ns()) {
            Ok(sweep) => {
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
            Err(e) => error!("conntrack gc: {e}"),
        }
    }

    fn sync_interfaces(&mut self) -> anyhow::Result<()> {
        let changes = self.attacher.sync(&mut self.ebpf)?;
        for name in &changes.attached {
            info!(interface = %name, "attached tc ingress and egress");
        }
        for name in &changes.gone {
            info!(interface = %name, "interface gone");
        }
        for e in &changes.errors {
            warn!("{e}");
        }
        Ok(())
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
