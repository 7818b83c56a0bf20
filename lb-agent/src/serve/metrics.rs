//! Prometheus metrics at `--metrics-bind-address` (kube-proxy's flag and
//! default, 127.0.0.1:10249), in the Prometheus text format: lb's own under
//! `lb_` (kube-proxy's names where the meaning is the same), and what the
//! dashboards built for kube-proxy read under kube-proxy's own names —
//! `kubeproxy_sync_proxy_rules_*`, `kubeproxy_network_programming_duration_seconds`
//! (from the EndpointSlice's trigger time, as kube-proxy measures it),
//! client-go's `rest_client_*` and the `process_*` collector's.
//!
//! The agent loop sets the values as it works; the datapath's per-reason
//! counters are read from the per-CPU map at each scrape. Fill of the maps
//! the datapath writes (conntrack, affinity, the socket reverse map) is
//! counted by the conntrack GC pass, so a scrape never walks a large map.

use std::{
    fmt,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};

use crate::{
    datapath::counters::{self, CounterMap},
    model::{Family as IpFamily, FrontendKind},
    reconcile::MapFill,
    source::rest_client::RestClientMetrics,
};

type Label = [(&'static str, &'static str); 1];

/// What went wrong, for `lb_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading the manifests or the API server.
    Source,
    /// A map write failed (retried).
    DatapathWrite,
    ConntrackGc,
    ConntrackFlush,
    UdpSocketReset,
    Interfaces,
    NodeConfig,
    HealthCheckServer,
    /// Writing a netfilter conntrack sysctl.
    NodeSysctl,
}

impl ErrorKind {
    const ALL: [ErrorKind; 9] = [
        Self::Source,
        Self::DatapathWrite,
        Self::ConntrackGc,
        Self::ConntrackFlush,
        Self::UdpSocketReset,
        Self::Interfaces,
        Self::NodeConfig,
        Self::HealthCheckServer,
        Self::NodeSysctl,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::DatapathWrite => "datapath_write",
            Self::ConntrackGc => "conntrack_gc",
            Self::ConntrackFlush => "conntrack_flush",
            Self::UdpSocketReset => "udp_socket_reset",
            Self::Interfaces => "interfaces",
            Self::NodeConfig => "node_config",
            Self::HealthCheckServer => "health_check_server",
            Self::NodeSysctl => "node_sysctl",
        }
    }
}

/// Why conntrack flows were removed by the agent.
#[derive(Clone, Copy, Debug)]
pub enum FlowRemoval {
    /// Both directions idle past their timeout (the GC).
    Expired,
    /// A UDP backend left its service (the flush).
    BackendLeft,
}

impl FlowRemoval {
    fn label(self) -> &'static str {
        match self {
            FlowRemoval::Expired => "expired",
            FlowRemoval::BackendLeft => "backend_left",
        }
    }
}

/// The agent's metrics; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    sync_duration: Histogram,
    programming_latency: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    services: Gauge,
    frontends: Family<[(&'static str, &'static str); 2], Gauge>,
    endpoints: Family<Label, Gauge>,
    invalid_services: Gauge,
    errors: Family<Label, Counter>,
    map_entries: Family<Label, Gauge>,
    map_capacity: Family<Label, Gauge>,
    map_fill: Family<Label, Gauge<f64, AtomicU64>>,
    conntrack_entries: Gauge,
    flows_removed: Family<Label, Counter>,
    udp_sockets_reset: Counter,
    kube_proxy_rules: Family<Label, Gauge>,
    /// kube-proxy's network programming latency: from the EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` to written.
    trigger_to_programmed: Histogram,
}

impl Metrics {
    /// `stats`: the datapath's per-CPU counters (`None`: not exported).
    pub fn new(stats: Option<CounterMap>, rest_client: &RestClientMetrics) -> Self {
        let mut registry = Registry::default();
        // 1 ms .. ≈ 65 s, as kube-proxy's sync histogram spans.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            sync_duration,
            programming_latency,
            last_sync: Gauge::default(),
            services: Gauge::default(),
            frontends: Family::default(),
            endpoints: Family::default(),
            invalid_services: Gauge::default(),
            errors: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_fill: Family::default(),
            conntrack_entries: Gauge::default(),
            flows_removed: Family::default(),
            udp_sockets_reset: Counter::default(),
            kube_proxy_rules: Family::default(),
            trigger_to_programmed: Histogram::new(programming_buckets()),
        };
        let m = &metrics;
        registry.register(
            "lb_sync_proxy_rules_duration_seconds",
            "Time of one pass writing desired state into the BPF maps",
            m.sync_duration.clone(),
        );
        registry.register(
            "lb_network_programming_duration_seconds",
            "From a change seen at the source (watch event, file event) to the datapath written",
            m.programming_latency.clone(),
        );
        registry.register(
            "lb_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last pass that wrote everything",
            m.last_sync.clone(),
        );
        registry.register(
            "lb_services",
            "Services with at least one frontend programmed",
            m.services.clone(),
        );
        registry.register(
            "lb_frontends",
            "Frontends programmed, by type and IP family",
            m.frontends.clone(),
        );
        registry.register(
            "lb_endpoints",
            "Backends (address, port, protocol) programmed, by IP family",
            m.endpoints.clone(),
        );
        registry.register(
            "lb_invalid_services",
            "Services whose input is invalid (kept in their last good state or skipped)",
            m.invalid_services.clone(),
        );
        registry.register("lb_errors", "Errors, by kind", m.errors.clone());
        registry.register(
            "lb_map_entries",
            "Entries in each BPF map (maps the datapath writes: as of the last conntrack GC pass)",
            m.map_entries.clone(),
        );
        registry.register(
            "lb_map_capacity",
            "max_entries of each BPF map",
            m.map_capacity.clone(),
        );
        registry.register(
            "lb_map_fill_ratio",
            "lb_map_entries / lb_map_capacity",
            m.map_fill.clone(),
        );
        registry.register(
            "lb_conntrack_entries",
            "Conntrack entries (two per flow), as of the last GC pass",
            m.conntrack_entries.clone(),
        );
        registry.register(
            "lb_conntrack_flows_removed",
            "Conntrack flows removed by the agent, by reason",
            m.flows_removed.clone(),
        );
        registry.register(
            "lb_udp_sockets_reset",
            "Connected UDP sockets reset because their backend left (socket LB)",
            m.udp_sockets_reset.clone(),
        );
        registry.register(
            "lb_kube_proxy_rules",
            "kube-proxy's state found on the node, by mode: iptables chains, nftables tables, \
             the IPVS device (expected while kube-proxy runs; leftovers once it is gone)",
            m.kube_proxy_rules.clone(),
        );
        // kube-proxy's names, for the dashboards and alerts built on them.
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "As lb_sync_proxy_rules_duration_seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "As lb_sync_proxy_rules_last_timestamp_seconds",
            m.last_sync.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time (the Pod or Service change behind it) \
             to the datapath written",
            m.trigger_to_programmed.clone(),
        );
        registry.register(
            "rest_client_requests",
            "API server requests, by status code, host and method",
            rest_client.requests.clone(),
        );
        registry.register(
            "rest_client_request_duration_seconds",
            "API server request latency (to the response headers), by host and verb",
            rest_client.duration.clone(),
        );
        let build = Family::<[(&'static str, &'static str); 2], Gauge>::default();
        build
            .get_or_create(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", crate::REVISION),
            ])
            .set(1);
        registry.register(
            "lb_build_info",
            "The agent's version and source revision",
            build,
        );
        registry.register_collector(Box::new(ProcessCollector));
        // Every series exists from the start, at 0: a rate over a series
        // that appears with its first error would miss that error.
        for kind in ErrorKind::ALL {
            let _ = m.errors.get_or_create(&[("kind", kind.label())]);
        }
        for why in [FlowRemoval::Expired, FlowRemoval::BackendLeft] {
            let _ = m.flows_removed.get_or_create(&[("reason", why.label())]);
        }
        if let Some(stats) = stats {
            registry.register_collector(Box::new(DatapathCounters(Mutex::new(stats))));
        }
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    pub fn sync_done(&self, seconds: f64) {
        self.sync_duration.observe(seconds);
    }

    /// Everything seen so far is written; `waited` since the oldest change.
    pub fn programmed(&self, waited: Option<std::time::Duration>) {
        if let Some(waited) = waited {
            self.programming_latency.observe(waited.as_secs_f64());
        }
        let now = jiff::Timestamp::now().as_duration().as_secs_f64();
        self.last_sync.set(now);
    }

    /// EndpointSlice changes with these trigger times are in the datapath.
    pub fn slices_programmed(&self, triggers: &[jiff::Timestamp]) {
        let now = jiff::Timestamp::now();
        for trigger in triggers {
            // A clock skewed between nodes can put a trigger in the future.
            let seconds = now.duration_since(*trigger).as_secs_f64().max(0.0);
            self.trigger_to_programmed.observe(seconds);
        }
    }

    /// The programmed state: Services, frontends by type and family,
    /// backends by family.
    pub fn programmed_state(&self, fill: &MapFill) {
        self.services.set(fill.services as i64);
        for family in IpFamily::BOTH {
            let ip_family = ("ip_family", family.name());
            for kind in FrontendKind::ALL {
                let count = fill.frontends.get(&(kind, family)).copied().unwrap_or(0);
                self.frontends
                    .get_or_create(&[("type", kind.name()), ip_family])
                    .set(count as i64);
            }
            self.endpoints
                .get_or_create(&[ip_family])
                .set(fill.family(family).backends as i64);
        }
    }

    pub fn invalid_services(&self, count: usize) {
        self.invalid_services.set(count as i64);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&[("kind", kind.label())]).inc();
    }

    pub fn map_fill(&self, map: &'static str, entries: u64, capacity: u32) {
        let label = [("map", map)];
        self.map_entries.get_or_create(&label).set(entries as i64);
        self.map_capacity
            .get_or_create(&label)
            .set(i64::from(capacity));
        self.map_fill
            .get_or_create(&label)
            .set(entries as f64 / f64::from(capacity.max(1)));
    }

    pub fn conntrack_entries(&self, entries: usize) {
        self.conntrack_entries.set(entries as i64);
    }

    pub fn flows_removed(&self, why: FlowRemoval, flows: usize) {
        self.flows_removed
            .get_or_create(&[("reason", why.label())])
            .inc_by(flows as u64);
    }

    pub fn udp_sockets_reset(&self, sockets: usize) {
        self.udp_sockets_reset.inc_by(sockets as u64);
    }

    pub fn kube_proxy_rules(&self, found: &super::kube_proxy::Found) {
        for (mode, count) in [
            ("iptables", found.iptables_chains.len()),
            ("iptables-legacy", found.legacy_chains.len()),
            ("nftables", found.nftables_tables.len()),
            ("ipvs", usize::from(found.ipvs_device)),
        ] {
            self.kube_proxy_rules
                .get_or_create(&[("mode", mode)])
                .set(count as i64);
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// kube-proxy's network programming buckets: 0.25 s, 0.5 s, each second to
/// a minute, then coarser to 5 minutes.
fn programming_buckets() -> impl Iterator<Item = f64> {
    [0.25, 0.5]
        .into_iter()
        .chain((1..60).map(f64::from))
        .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
        .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)))
}

/// The `process_*` metrics every Prometheus client library exports (the
/// dashboards' memory and CPU panels read them), from /proc at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        use prometheus_client::metrics::gauge::ConstGauge;
        // An unreadable /proc leaves the process metrics out of the scrape.
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let ticks = procfs::ticks_per_second() as f64;
        let mut gauge = |name: &str, help: &str, value: f64| -> Result<(), fmt::Error> {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)
        };
        let stat = me.stat().ok();
        if let Some(stat) = &stat {
            gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (stat.rss * procfs::page_size()) as f64,
            )?;
            gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.vsize as f64,
            )?;
            if let Ok(boot) = procfs::boot_time_secs() {
                gauge(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch in seconds",
                    boot as f64 + stat.starttime as f64 / ticks,
                )?;
            }
        }
        if let Ok(fds) = me.fd_count() {
            gauge(
                "process_open_fds",
                "Number of open file descriptors",
                fds as f64,
            )?;
        }
        if let Ok(limits) = me.limits() {
            if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                gauge(
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max as f64,
                )?;
            }
        }
        if let Some(stat) = &stat {
            let seconds = (stat.utime + stat.stime) as f64 / ticks;
            ConstCounter::new(seconds).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

/// The datapath's per-reason counters, summed over CPUs at each scrape:
/// `lb_datapath_events_total{event}`.
struct DatapathCounters(Mutex<CounterMap>);

impl fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCounters")
    }
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let values = {
            let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // An unreadable map shows no events rather than failing the scrape.
            counters::sum(&map).unwrap_or_default()
        };
        let mut family = encoder.encode_descriptor(
            "lb_datapath_events",
            "Datapath events by kind (translations, conntrack, drops), summed over CPUs",
            None,
            MetricType::Counter,
        )?;
        for (event, value) in values {
            let label = [("event", event)];
            ConstCounter::new(value).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// Serves `/metrics` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server: {e}");
    }
}

async fn scrape(State(metrics): State<Metrics>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(text) => (
            axum::http::StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding the metrics failed\n".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn values_appear_under_kube_proxy_style_names() {
        let m = Metrics::new(None, &RestClientMetrics::default());
        m.sync_done(0.003);
        m.error(ErrorKind::DatapathWrite);
        m.map_fill("lb_svc_v4", 25, 100);
        let mut fill = MapFill {
            services: 1,
            frontends: BTreeMap::from([
                ((FrontendKind::NodePort, IpFamily::V4), 2),
                ((FrontendKind::ClusterIp, IpFamily::V6), 1),
            ]),
            ..MapFill::default()
        };
        fill.families[IpFamily::V4 as usize].backends = 3;
        fill.families[IpFamily::V6 as usize].backends = 1;
        m.programmed_state(&fill);
        let text = m.encode().unwrap();
        for line in [
            "# TYPE lb_sync_proxy_rules_duration_seconds histogram",
            "lb_sync_proxy_rules_duration_seconds_count 1",
            "lb_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "lb_errors_total{kind=\"datapath_write\"} 1",
            "lb_errors_total{kind=\"conntrack_gc\"} 0",
            "lb_map_fill_ratio{map=\"lb_svc_v4\"} 0.25",
            "lb_frontends{type=\"NodePort\",ip_family=\"IPv4\"} 2",
            "lb_frontends{type=\"ClusterIP\",ip_family=\"IPv4\"} 0",
            "lb_frontends{type=\"ClusterIP\",ip_family=\"IPv6\"} 1",
            "lb_frontends{type=\"NodePort\",ip_family=\"IPv6\"} 0",
            "lb_endpoints{ip_family=\"IPv4\"} 3",
            "lb_endpoints{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn kube_proxys_programming_latency_counts_from_the_trigger_time() {
        let m = Metrics::new(None, &RestClientMetrics::default());
        let now = jiff::Timestamp::now();
        let ten_ago = now - jiff::SignedDuration::from_secs(10);
        let future = now + jiff::SignedDuration::from_secs(5);
        m.slices_programmed(&[ten_ago, future]);
        let text = m.encode().unwrap();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
        };
        assert_eq!(
            value("kubeproxy_network_programming_duration_seconds_count "),
            2.0
        );
        let sum = value("kubeproxy_network_programming_duration_seconds_sum ");
        assert!((10.0..11.0).contains(&sum), "10 s and a skewed 0: {sum}");
        assert_eq!(
            value("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} "),
            1.0,
            "the skewed one counts as 0"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(
            text.contains(&format!(
                "lb_build_info{{version=\"{}\",revision=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                crate::REVISION
            )),
            "{text}"
        );
    }
}
