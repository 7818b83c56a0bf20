//! `lb-agent run`: load and pin the datapath, attach to interfaces, and keep
//! the maps in sync with a directory of manifests until SIGINT/SIGTERM.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    datapath::{attach, attach::Attacher, loader, loader::MapSizes},
    desired::{self, Desired, Limits},
    manifest::ManifestDir,
    reconcile::Reconciler,
};

pub struct RunConfig {
    pub manifests: PathBuf,
    pub interfaces: Vec<String>,
    pub pin_dir: PathBuf,
    pub sizes: MapSizes,
    pub limits: Limits,
    pub keep_datapath: bool,
    pub poll_interval: Duration,
}

const RETRY_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    if !config.manifests.is_dir() {
        bail!("--manifests {}: not a directory", config.manifests.display());
    }
    let attacher = Attacher::new(config.interfaces.clone());
    let unmatched = attacher.unmatched_patterns().context("listing interfaces")?;
    if !unmatched.is_empty() {
        let names: Vec<String> = attach::interfaces()?.into_iter().map(|(n, _)| n).collect();
        bail!("--interfaces: pattern(s) {} match no interface (have: {})", unmatched.join(", "), names.join(", "));
    }

    let pin_dir = config.pin_dir.clone();
    let mut ebpf = loader::load(Some(&pin_dir), config.sizes).context("loading the datapath")?;
    let maps = loader::kernel_maps(&mut ebpf, config.sizes)?;
    let reconciler = Reconciler::restore(maps, config.sizes.backends).context("reading the pinned maps")?;
    info!(pin_dir = %pin_dir.display(), "datapath loaded");

    let mut agent = Agent { config, ebpf, attacher, reconciler, manifests: None, desired: None, reported: BTreeSet::new() };
    let result = agent.serve().await;
    agent.shutdown();
    result
}

struct Agent {
    config: RunConfig,
    ebpf: aya::Ebpf,
    attacher: Attacher,
    reconciler: Reconciler<crate::datapath::maps::KernelMaps>,
    manifests: Option<ManifestDir>,
    desired: Option<Desired>,
    reported: BTreeSet<String>,
}

impl Agent {
    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        self.manifests = Some(ManifestDir::new(&self.config.manifests));
        // Attach first (empty maps pass everything), then program: once the
        // maps show a service, every matching interface already serves it.
        self.sync_interfaces()?;
        self.sync_manifests()?;
        let released = attach::release_pinned_links(&self.config.pin_dir.join("links"));
        if !released.is_empty() {
            info!(interfaces = ?released, "released links pinned by a previous run");
        }
        let mut last_retry = Instant::now();
        loop {
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM"); return Ok(()); }
                _ = sigint.recv() => { info!("SIGINT"); return Ok(()); }
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
            // Interfaces first: a pod's interface exists before its endpoint
            // is listed, so by the time the maps send traffic to it the
            // interface carries the program that reverse-NATs its replies.
            if let Err(e) = self.sync_interfaces() {
                error!("listing interfaces: {e:#}");
            }
            if let Err(e) = self.sync_manifests() {
                error!("reading manifests: {e:#}");
            }
            if self.reconciler.needs_retry() && last_retry.elapsed() >= RETRY_INTERVAL {
                last_retry = Instant::now();
                if let Some(desired) = self.desired.clone() {
                    self.apply(&desired);
                }
            }
        }
    }

    fn sync_manifests(&mut self) -> anyhow::Result<()> {
        let dir = self.manifests.as_mut().context("manifests not opened")?;
        let Some((objects, mut errors)) = dir.poll().with_context(|| format!("reading {}", self.config.manifests.display()))? else {
            return Ok(());
        };
        let (desired, desired_errors) = desired::compute(&objects, self.config.limits);
        errors.extend(desired_errors);
        // Report each distinct problem once, not on every poll.
        let current: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for problem in current.difference(&self.reported) {
            warn!("invalid input, skipped: {problem}");
        }
        self.reported = current;
        self.apply(&desired);
        self.desired = Some(desired);
        Ok(())
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
    }

    fn sync_interfaces(&mut self) -> anyhow::Result<()> {
        let program = loader::program(&mut self.ebpf)?;
        let changes = self.attacher.sync(program)?;
        for name in &changes.attached {
            info!(interface = %name, "attached tc ingress");
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
            for e in self.attacher.pin_all(&pin_dir.join("links")) {
                error!("{e}");
            }
            info!(pin_dir = %pin_dir.display(), "exiting; datapath kept (links and maps pinned)");
        } else {
            // Dropping the links detaches the program; removing the pins frees the maps.
            let interfaces: Vec<String> = self.attacher.attached().map(str::to_owned).collect();
            self.attacher = Attacher::new(Vec::new());
            loader::unpin_all(pin_dir);
            info!(?interfaces, "exiting; datapath detached and unpinned");
        }
    }
}
