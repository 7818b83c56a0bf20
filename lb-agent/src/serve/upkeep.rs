//! Conntrack and socket upkeep on a thread of its own. The agent serves
//! health, metrics and watches from one thread; a GC pass over a table of
//! millions of flows, or a socket reset that enters every network
//! namespace of the node, takes seconds there — long enough for a liveness
//! probe to fail and the kubelet to restart a healthy agent. This thread
//! owns the conntrack tables and the socket LB reverse map; the serving
//! thread sends it the flushes and resets a reconcile calls for, in order,
//! and it runs the periodic GC and the reset retries itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use super::metrics::{ErrorKind, FlowRemoval, Metrics};
use crate::{
    datapath::{
        conntrack::{monotonic_ns, Conntrack},
        udp_reset::{LeftBackend, UdpResetError, UdpResetter},
    },
    model::L4Addr,
};

/// What the thread works on and reports to.
pub struct UpkeepTables {
    pub conntrack: Conntrack,
    pub conntrack6: Conntrack<lb_common::Ipv6>,
    pub udp_resetter: UdpResetter,
    pub metrics: Metrics,
    /// `max_entries` of each pinned map, for the fill gauges.
    pub capacities: BTreeMap<&'static str, u32>,
    pub pin_dir: PathBuf,
    pub gc_interval: Duration,
    /// How soon a socket reset that missed a namespace is tried again.
    pub retry_interval: Duration,
}

enum Job {
    /// Backends that left their UDP frontends: their conntrack flows are
    /// flushed, then their connected sockets reset.
    BackendsLeft(Vec<LeftBackend>),
    /// Socket LB is off: its reverse entries go.
    ForgetSockets,
    Stop,
}

/// The upkeep thread; dropping this stops it (after the job at hand).
pub struct Upkeep {
    jobs: mpsc::Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

impl Upkeep {
    pub fn start(tables: UpkeepTables) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lb-upkeep".into())
            .spawn(move || tables.serve(&queue))?;
        Ok(Self {
            jobs,
            thread: Some(thread),
        })
    }

    pub fn backends_left(&self, left: Vec<LeftBackend>) {
        self.send(Job::BackendsLeft(left));
    }

    pub fn forget_sockets(&self) {
        self.send(Job::ForgetSockets);
    }

    fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            error!("the upkeep thread has stopped: conntrack GC, UDP flushes and socket resets no longer run");
        }
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        let _ = self.jobs.send(Job::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl UpkeepTables {
    fn serve(mut self, queue: &mpsc::Receiver<Job>) {
        // Not at start: nothing has expired yet.
        let mut next_gc = Instant::now() + self.gc_interval;
        let mut next_retry: Option<Instant> = None;
        loop {
            let due = next_retry.map_or(next_gc, |retry| retry.min(next_gc));
            match queue.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(Job::BackendsLeft(left)) => {
                    self.flush_udp(&left);
                    self.reset_udp_sockets(&left);
                }
                Ok(Job::ForgetSockets) => self.forget_sockets(),
                Ok(Job::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if now >= next_gc {
                self.collect_conntrack();
                next_gc = Instant::now() + self.gc_interval;
            }
            if next_retry.is_some_and(|retry| now >= retry) {
                next_retry = None;
                self.reset_udp_sockets(&[]);
            }
            if next_retry.is_none() && self.udp_resetter.has_pending() {
                next_retry = Some(Instant::now() + self.retry_interval);
            }
        }
    }

    fn report_fill(&self, map: &'static str, entries: u64) {
        let capacity = self.capacities.get(map).copied().unwrap_or(0);
        self.metrics.map_fill(map, entries, capacity);
    }

    /// Frees flows whose both directions have expired, and reports the fill
    /// of the tables the datapath writes.
    fn collect_conntrack(&mut self) {
        match crate::datapath::fill::datapath_tables(&self.pin_dir) {
            Ok(tables) => {
                for (map, entries) in tables {
                    self.report_fill(map, entries);
                }
            }
            Err(e) => warn!("counting the datapath's tables: {e}"),
        }
        let started = Instant::now();
        let now = monotonic_ns();
        let swept = [
            (
                self.conntrack.gc(now),
                self.conntrack.capacity,
                (lb_common::ct::CT_MAP, lb_common::ct::CT_NEW_MAP),
            ),
            (
                self.conntrack6.gc(now),
                self.conntrack6.capacity,
                (lb_common::ct::CT6_MAP, lb_common::ct::CT6_NEW_MAP),
            ),
        ];
        let mut entries = 0;
        for (result, capacity, tables) in swept {
            match result {
                Ok(sweep) => {
                    entries += sweep.assured + sweep.new;
                    self.report_sweep(&sweep, capacity, tables, started);
                }
                Err(e) => {
                    self.metrics.error(ErrorKind::ConntrackGc);
                    error!("conntrack gc of {}: {e}", tables.0)
                }
            }
        }
        self.metrics.conntrack_entries(entries);
    }

    /// One family's GC pass: fill gauges, removals, and a log line.
    fn report_sweep(
        &mut self,
        sweep: &crate::datapath::conntrack::Sweep,
        capacity: u32,
        (assured_map, new_map): (&'static str, &'static str),
        started: Instant,
    ) {
        self.report_fill(assured_map, sweep.assured as u64);
        self.report_fill(new_map, sweep.new as u64);
        self.metrics
            .flows_removed(FlowRemoval::Expired, sweep.flows_removed);
        let fill = sweep.assured as f64 / f64::from(capacity.max(1));
        let entries = sweep.assured;
        let seconds = started.elapsed().as_secs_f64();
        if fill >= 0.9 {
            // The table of new flows is an LRU and always admits;
            // only assured flows can run out of room.
            warn!(table = assured_map, entries, capacity, freed_flows = sweep.flows_removed, seconds,
                "assured conntrack table {:.0}% full: flows that become assured stay evictable while it is full (raise --max-conntrack)",
                fill * 100.0);
        } else if sweep.flows_removed == 0 {
            debug!(
                table = assured_map,
                entries,
                new_entries = sweep.new,
                capacity,
                freed_flows = 0,
                seconds,
                "conntrack gc"
            );
        } else {
            info!(
                table = assured_map,
                entries,
                new_entries = sweep.new,
                capacity,
                freed_flows = sweep.flows_removed,
                seconds,
                "conntrack gc"
            );
        }
    }

    fn flush_udp(&mut self, left: &[LeftBackend]) {
        let removed: BTreeSet<(L4Addr, u32)> = left
            .iter()
            .map(|left| (left.frontend, left.backend_id))
            .collect();
        let flushed = self.conntrack.flush_udp(&removed).and_then(|v4| {
            let v6 = self.conntrack6.flush_udp(&removed)?;
            Ok(crate::datapath::conntrack::Sweep {
                flows_removed: v4.flows_removed + v6.flows_removed,
                ..v4
            })
        });
        match flushed {
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
    }

    /// Socket LB translated connected UDP sockets once, at connect: no flow
    /// to flush, the sockets themselves are reset (with those of an earlier
    /// pass that missed a namespace).
    fn reset_udp_sockets(&mut self, left: &[LeftBackend]) {
        match self.udp_resetter.reset(left) {
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
                if let UdpResetError::SomeNamespaces { reset, .. } = &e {
                    self.metrics.udp_sockets_reset(*reset);
                }
                self.metrics.error(ErrorKind::UdpSocketReset);
                error!("resetting connected UDP sockets: {e}")
            }
        }
    }

    fn forget_sockets(&mut self) {
        // No hook reads the reverse entries any more, and none deletes
        // them when their sockets close.
        match self.udp_resetter.forget_sockets() {
            Ok(0) => {}
            Ok(n) => info!("socket LB is off: {n} reverse entries of earlier sockets removed"),
            Err(e) => {
                self.metrics.error(ErrorKind::DatapathWrite);
                error!("removing the socket LB reverse entries: {e}");
            }
        }
    }
}
