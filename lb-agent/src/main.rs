use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_agent::{
    cli::dump,
    cli::explain,
    cli::inspect,
    datapath::loader::{FamilyCidrs, MapSizes, DEFAULT_PIN_DIR},
    desired::{self, Limits},
    reconcile::Reconciler,
    serve::{self, RunConfig, SourceConfig},
    source::manifest,
};
use lb_common::{
    backend::DEFAULT_MAX_BACKENDS, ct::DEFAULT_MAX_CT_ENTRIES, svc::DEFAULT_MAX_SVC_ENTRIES,
};

/// `0.1.0 (REVISION)`: the commit the binary was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LB_REVISION"), ")");

/// eBPF Kubernetes service load balancer (kube-proxy replacement).
#[derive(Parser)]
#[command(version = VERSION)]
struct Cli {
    /// Log lines as text, or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum InspectWhat {
    /// Frontends with their Service, type, policies and backend slots.
    Services,
    /// Backends with the frontends and Services using them.
    Backends,
    /// Tracked flows: client, frontend, backend, SNAT, state.
    Conntrack,
    /// Per-reason datapath counters, summed over CPUs.
    Stats,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach it, and program it from manifests or the API server until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Print what the pinned maps hold: services (default), backends,
    /// conntrack or stats.
    Inspect(InspectArgs),
    /// How a Service name or address is served: the DNS answer, the
    /// frontend and its backends, the backend the datapath picks for
    /// --client (the real program on a synthetic packet, no state written),
    /// and the live flows.
    Explain(ExplainArgs),
    /// Validate manifests and print the maps they would produce (no kernel
    /// access). Exits non-zero whenever `run` with the same limits would not
    /// program everything.
    Check(CheckArgs),
    /// Take the datapath out (kube-proxy's `--cleanup`): release every link
    /// pinned under --pin-dir (detaching its program) and remove every map
    /// pin and the directory. Run it after the agent has stopped. Exits
    /// non-zero if anything could not be removed, or if the directory holds
    /// entries lb did not make (those are left alone).
    Cleanup(CleanupArgs),
}

#[derive(clap::Args)]
struct CleanupArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(clap::Args)]
struct InspectArgs {
    #[command(subcommand)]
    what: Option<InspectWhat>,
    #[arg(long, global = true, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Only this Service's frontends, backends or flows (NAMESPACE/NAME).
    #[arg(long, global = true)]
    service: Option<String>,
    /// Only frontends, backends or flows with this backend address.
    #[arg(long, global = true)]
    backend: Option<std::net::IpAddr>,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// NAME.NAMESPACE[.svc[.cluster.local]][:PORT], VIP[:PORT] or NODEIP:NODEPORT.
    target: String,
    /// The client to show the pick for: IP, IPv4:PORT or [IPv6]:PORT (port
    /// 40000 by default). Once per family: a dual-stack Service's frontends
    /// each get the pick of their family's client.
    #[arg(long)]
    client: Vec<String>,
    /// The Services and EndpointSlices (for headless and ExternalName
    /// names, endpoint conditions and nodes), from files.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// ... or from the API server, with this kubeconfig (as `run`).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// ... or the API server at this address (as `run --api-server`).
    #[arg(long, visible_alias = "master", env = "LB_API_SERVER")]
    api_server: Option<String>,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(clap::Args)]
struct CheckArgs {
    #[arg(long)]
    manifests: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    /// As `run --max-service-slots`.
    #[arg(long, default_value_t = DEFAULT_MAX_SVC_ENTRIES)]
    max_service_slots: u32,
    /// As `run --max-backends`.
    #[arg(long, default_value_t = DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// The node to check for (node-local policies).
    #[arg(long)]
    node_name: Option<String>,
    /// The node's zone (topology hints), as `run --node-zone`.
    #[arg(long)]
    node_zone: Option<String>,
    /// Node addresses to show node ports on (either family).
    #[arg(long, value_delimiter = ',')]
    node_address: Vec<std::net::IpAddr>,
}

/// What one Service may ask for, and how backends are picked (the same for
/// `run` and `check`).
#[derive(clap::Args)]
struct LimitArgs {
    /// Most endpoints one service port may have.
    #[arg(long, default_value_t = Limits::DEFAULT.max_backends_per_service)]
    max_backends_per_service: usize,
    /// Most frontends one Service may have (ports × cluster IPs, node
    /// addresses for node ports, external and LB IPs); each takes one of
    /// the node's 65 535 reverse-NAT ids. A Service past it is an input
    /// error and keeps its last good state.
    #[arg(long, default_value_t = Limits::DEFAULT.max_frontends_per_service)]
    max_frontends_per_service: usize,
    /// Most service-map slots one Service may use (one per frontend, plus
    /// one per backend of each), so it cannot fill `--max-service-slots`.
    #[arg(long, default_value_t = Limits::DEFAULT.max_slots_per_service)]
    max_slots_per_service: usize,
    /// How a new flow's backend is picked: `random` (by flow hash among the
    /// frontend's backends), or `maglev` (Maglev consistent hashing: every
    /// node picks the same backend for a flow, and removing one of N
    /// backends moves about 1/N of the flows that lost their conntrack
    /// entry). Flows limited to local backends (traffic policy `Local`)
    /// and socket LB pick at random either way.
    #[arg(long, value_enum, default_value_t = LbAlgorithmArg::Random)]
    lb_algorithm: LbAlgorithmArg,
    /// Maglev table size M per frontend: `auto` (the smallest offered prime
    /// ≥ 100 × the frontend's backends) or one of 251, 509, 1021, 2039,
    /// 4093, 8191, 16381, 32749, 65521, 131071.
    #[arg(long, default_value = "auto")]
    maglev_table_size: String,
    /// Program Services' `spec.externalIPs` (deprecated in Kubernetes 1.36,
    /// KEP-5707: any user who may create a Service can claim any address
    /// with it, CVE-2020-8554). `false` leaves them out; an external IP that
    /// is another Service's cluster IP is refused either way.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    external_ips: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DetectLocalMode {
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "NodeCIDR")]
    NodeCidr,
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SocketLbArg {
    #[value(alias = "false")]
    Off,
    HostNetwork,
    #[value(alias = "true")]
    All,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LbAlgorithmArg {
    Random,
    Maglev,
}

impl LimitArgs {
    fn limits(&self) -> anyhow::Result<Limits> {
        let limits = Limits::new(
            self.max_backends_per_service,
            self.max_frontends_per_service,
            self.max_slots_per_service,
        )
        .map_err(anyhow::Error::msg)?;
        let table_size = lb_agent::model::maglev::parse_size(&self.maglev_table_size)
            .map_err(anyhow::Error::msg)?;
        Ok(limits
            .with_lb_algorithm(match self.lb_algorithm {
                LbAlgorithmArg::Random => desired::LbAlgorithm::Random,
                LbAlgorithmArg::Maglev => desired::LbAlgorithm::Maglev { table_size },
            })
            .with_external_ips(self.external_ips))
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// kube-proxy's configuration file (KubeProxyConfiguration,
    /// kubeproxy.config.k8s.io/v1alpha1, e.g. kubeadm's `config.conf`): the
    /// fields lb supports set the flags of the same meaning (flags given here
    /// win), the others are warned about by name, unknown ones refused.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of Service and EndpointSlice YAML files, re-read on change.
    /// Without it, the agent watches the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server (default: KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's real address (`https://HOST:PORT`), overriding the
    /// kubeconfig's or in-cluster one (kube-proxy's `--master`). A
    /// host-network agent must not reach the API server through the
    /// `kubernetes` ClusterIP it serves itself. Set but empty is an error.
    #[arg(
        long,
        visible_alias = "master",
        env = "LB_API_SERVER",
        conflicts_with = "manifests"
    )]
    api_server: Option<String>,
    /// This node's name: endpoints whose `nodeName` matches are local (the
    /// node-local traffic policies). Default: the host name, as kube-proxy.
    #[arg(long, visible_alias = "hostname-override", env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone, for topology hints (`hints.forZones`): endpoints
    /// hinted for it are preferred, as kube-proxy prefers them. In API mode
    /// the Node's `topology.kubernetes.io/zone` label wins once read.
    #[arg(long)]
    node_zone: Option<String>,
    /// Interfaces facing outside the cluster: traffic arriving there is
    /// external (externalTrafficPolicy applies, and flows to another node's
    /// backend are SNATed). Names, globs or `@uplink`; attached like
    /// `--interfaces`.
    #[arg(long, value_delimiter = ',', default_value = "@uplink")]
    external_interfaces: Vec<String>,
    /// The cluster's service CIDRs (the API server's flag of the same name):
    /// a TCP or UDP packet to an address there that no frontend holds (an
    /// unallocated cluster IP, or a port its Service does not have) is
    /// answered with ICMP port unreachable, as nftables kube-proxy rejects
    /// it, instead of following the default route (ICMPv6 port unreachable
    /// for IPv6). At most 4 prefixes per family.
    #[arg(long, value_delimiter = ',')]
    service_cluster_ip_range: Vec<ipnet::IpNet>,
    /// The cluster's pod CIDRs (kube-proxy's flag). Traffic arriving at an
    /// external interface for a cluster IP whose backend is on another node
    /// is masqueraded to the node (as kube-proxy masquerades traffic from
    /// outside the cluster CIDR), so its answer comes back this way; sources
    /// in these prefixes are the cluster's and keep their address. Default:
    /// none, every such source is outside. At most 4 prefixes per family.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// How traffic from the cluster is told apart (kube-proxy's flag):
    /// `ClusterCIDR` by `--cluster-cidr`; `NodeCIDR`, `BridgeInterface` and
    /// `InterfaceNamePrefix` by the interface it arrives on — this node's
    /// pods never arrive at an external interface, so every source there
    /// is outside and `--cluster-cidr` is not used.
    #[arg(long, value_enum, default_value_t = DetectLocalMode::ClusterCidr)]
    detect_local_mode: DetectLocalMode,
    /// Node ports are served on the node addresses in these CIDRs, of
    /// either family (kube-proxy's flag). Default: the addresses of the
    /// external interfaces (IPv6 link-local ones aside).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// Serve a Service's port at its cluster IPs on this node by a local
    /// listener, while its address is on one of the node's interfaces (else
    /// by the Service's endpoints): `NAMESPACE/NAME:PORT=ADDRESS`, TCP and
    /// UDP, repeatable. For NodeLocal DNSCache:
    /// `kube-system/kube-dns:53=169.254.20.10`.
    #[arg(long, value_delimiter = ',')]
    local_redirect: Vec<lb_agent::desired::local_redirect::LocalRedirect>,
    /// The node addresses external flows to other nodes' backends (and
    /// hairpin flows) are SNATed to, at most one per family. Default, per
    /// family: the first external interface's first address of it.
    #[arg(long, value_delimiter = ',')]
    snat_address: Vec<std::net::IpAddr>,
    /// Source ports for SNAT; must lie outside net.ipv4.ip_local_port_range
    /// (the default sits below it and below the usual node-port range).
    #[arg(long, default_value = "1024-29999", value_parser = lb_agent::serve::node::parse_port_range)]
    snat_port_range: std::ops::RangeInclusive<u16>,
    /// Serve /healthz, /readyz and /livez here (kube-proxy's flag; cloud
    /// load balancers check /healthz on it); empty: off.
    #[arg(long, visible_alias = "health-addr", default_value = "", value_parser = parse_bind_address)]
    healthz_bind_address: BindAddress,
    /// Serve the same endpoints here too, for the kubelet's probes: a port
    /// kube-proxy never holds, so the probes reach this agent while both run
    /// during a migration (kube-proxy has 10256, and no /readyz); empty: off.
    #[arg(long, default_value = "", value_parser = parse_bind_address)]
    probe_bind_address: BindAddress,
    /// Serve Prometheus metrics (/metrics) here; empty: off. kube-proxy's
    /// flag and default.
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind_address)]
    metrics_bind_address: BindAddress,
    /// Exit when the health or metrics address cannot be bound (kube-proxy's
    /// flag). Off: the failure is logged and the bind retried every 2 s, so
    /// the agent runs beside a kube-proxy that holds the ports.
    #[arg(long)]
    bind_address_hard_fail: bool,
    /// Datapath debug events (each new flow and its backend, each drop)
    /// into the log, target `datapath`. Off: pruned from the loaded program.
    #[arg(long)]
    datapath_log: bool,
    /// Interfaces to attach to: names or globs, comma separated (e.g.
    /// `veth*,eth0`); `@uplink` stands for the interface(s) of the IPv4
    /// default route(s), `@pods` for pods' interfaces (veths whose peer is in
    /// another network namespace, whatever the CNI names them). Devices
    /// without an Ethernet header (IPIP, WireGuard, TUN) are never attached.
    #[arg(long, value_delimiter = ',', required = true)]
    interfaces: Vec<String>,
    /// Connect-time load balancing (cgroup sock_addr programs) for the
    /// processes under --cgroup-path. `host-network`: only sockets of the
    /// agent's own network namespace — node processes and hostNetwork pods,
    /// whose packets pass no tc ingress hook; pods with their own
    /// namespaces keep the tc path. `all` (or `true`): pods too, translated
    /// once at connect. `off` (or `false`).
    #[arg(long, value_enum, default_value_t = SocketLbArg::Off)]
    socket_lb: SocketLbArg,
    /// The cgroup v2 whose processes get socket LB. Default: the cgroup2
    /// root (found in /proc/mounts), i.e. every process on the node.
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// bpffs directory for the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Size of the services map (one entry per frontend plus one per backend slot).
    #[arg(long, default_value_t = DEFAULT_MAX_SVC_ENTRIES)]
    max_service_slots: u32,
    /// Size of the backends map.
    #[arg(long, default_value_t = DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Size of the table of assured flows (two entries per flow; nothing is
    /// evicted from it: while it is full, flows that become assured stay in
    /// the table of new flows, counted).
    #[arg(long, default_value_t = DEFAULT_MAX_CT_ENTRIES)]
    max_conntrack: u32,
    /// Size of the table of flows not yet assured (two entries per flow;
    /// the least recently used gives way, so a flood of handshakes that
    /// never complete cannot keep new flows out).
    #[arg(long, default_value_t = lb_common::ct::DEFAULT_MAX_CT_NEW_ENTRIES)]
    max_conntrack_new: u32,
    /// Size of the session affinity table (clients × affinity frontends;
    /// the least recently used entry gives way).
    #[arg(long, default_value_t = lb_common::affinity::DEFAULT_MAX_AFFINITY_ENTRIES)]
    max_affinity: u32,
    /// Size of the `loadBalancerSourceRanges` table (prefixes over all
    /// load balancer IPs).
    #[arg(long, default_value_t = lb_common::source_range::DEFAULT_MAX_SOURCE_RANGES)]
    max_source_ranges: u32,
    #[command(flatten)]
    limits: LimitArgs,
    /// Size of the Maglev tables' map, in chunks of 256 entries (1 KiB);
    /// a table of M entries takes ⌈M/256⌉, two while it is replaced.
    #[arg(long, default_value_t = lb_common::maglev::DEFAULT_MAX_MAGLEV_CHUNKS)]
    max_maglev_chunks: u32,
    /// Size of the socket LB reverse table (one entry per open socket and
    /// backend it was pointed at; never evicted: an entry leaves with its
    /// socket, and while the table is full new sockets are left to the tc
    /// path, counted as `sock_untranslated`).
    #[arg(long, default_value_t = lb_common::sock::DEFAULT_MAX_SOCK_REVNAT)]
    max_socket_entries: u32,
    /// On exit, leave the program attached and the maps pinned.
    #[arg(long)]
    keep_datapath: bool,
    /// Idle timeout of an established TCP connection: lb's conntrack, and
    /// the node's netfilter conntrack (which lb's traffic passes too), as
    /// kube-proxy's flag and default.
    #[arg(long, default_value = "24h0m0s", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// netfilter: the conntrack table holds this many entries per CPU
    /// (kube-proxy's flag and default; 0: leave the size alone). Only raised.
    #[arg(long, default_value_t = 32768)]
    conntrack_max_per_core: u64,
    /// netfilter: ... and at least this many.
    #[arg(long, default_value_t = 131072)]
    conntrack_min: u64,
    /// netfilter: how long a TCP connection in CLOSE_WAIT is kept (0: leave).
    #[arg(long, default_value = "1h0m0s", value_parser = parse_duration_or_zero)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// netfilter: mark only out-of-window RST segments INVALID.
    #[arg(long)]
    conntrack_tcp_be_liberal: bool,
    /// netfilter: idle timeout of an assured UDP stream (0: leave).
    #[arg(long, default_value = "0", value_parser = parse_duration_or_zero)]
    conntrack_udp_timeout_stream: Duration,
    /// Where the netfilter conntrack sysctls are: the agent's own
    /// /proc/sys/net/netfilter, or a host mount of it (a container's /proc/sys
    /// is read-only).
    #[arg(long, default_value = lb_agent::serve::nf_conntrack::SYSCTL_DIR)]
    conntrack_sysctl_dir: PathBuf,
    /// Conntrack: how long a TCP connection may wait for the backend's answer.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    conntrack_tcp_timeout_opening: Duration,
    /// Conntrack: how long a TCP connection lingers after RST or FINs both ways.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    conntrack_tcp_timeout_closing: Duration,
    /// Conntrack: how long a closed SNATed TCP flow keeps its SNAT port (at
    /// least the backends' TIME_WAIT, 60 s on Linux, or a new flow may land
    /// on a tuple the backend still holds and stall on a SYN retransmit).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    conntrack_tcp_timeout_snat_closing: Duration,
    /// Conntrack: idle timeout of a UDP flow.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// ICMP errors the datapath sends (port unreachable for a Service
    /// without endpoints, fragmentation needed), per second and per CPU
    /// (the kernel's `icmp_msgs_per_sec` for its own); past it, the packet
    /// is dropped unanswered (`drop_icmp_rate_limited`). 0: no limit.
    #[arg(long, default_value_t = lb_common::icmp::IcmpLimit::DEFAULT.per_sec)]
    icmp_errors_per_second: u32,
    /// How many ICMP errors a CPU may send at once after a quiet spell (the
    /// kernel's `icmp_msgs_burst`).
    #[arg(long, default_value_t = lb_common::icmp::IcmpLimit::DEFAULT.burst)]
    icmp_errors_burst: u32,
    /// `/healthz` fails while a change seen at the source has waited longer
    /// than this for its map update (kube-proxy's health timeout).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    health_timeout: Duration,
    /// How often the agent frees expired conntrack flows.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    conntrack_gc_interval: Duration,
    /// How often to rescan manifests and interfaces when file or link events
    /// are unavailable (with them, a rescan every 30 s only backs them up).
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
}

fn main() -> std::process::ExitCode {
    let (args, warnings) = match with_config_file(std::env::args_os().collect()) {
        Ok(merged) => merged,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One JSON object per line, span fields included (log collectors).
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
    for warning in warnings {
        tracing::warn!("--config: {warning}");
    }
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `run --config FILE`: the command line with the flags the file stands for
/// (the command line's own win), and the file's warnings.
fn with_config_file(
    args: Vec<std::ffi::OsString>,
) -> Result<(Vec<std::ffi::OsString>, Vec<String>), lb_agent::kube_proxy_config::ConfigError> {
    let Some(run) = args.iter().position(|a| a == "run") else {
        return Ok((args, Vec::new()));
    };
    let path = args[run + 1..].iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        if a == "--config" {
            args.get(run + 2 + i).map(PathBuf::from)
        } else {
            a.strip_prefix("--config=").map(PathBuf::from)
        }
    });
    let Some(path) = path else {
        return Ok((args, Vec::new()));
    };
    let config = lb_agent::kube_proxy_config::read(&path)?;
    let command = <Cli as clap::CommandFactory>::command();
    let run_args = command
        .find_subcommand("run")
        .map(|c| c.get_arguments().cloned().collect::<Vec<_>>());
    let given_after_run = &args[run + 1..];
    let has = |name: &str| given_after_run.iter().any(|a| a == name);
    let given = |flag: &str| {
        // A file's kubeconfig does not apply to manifests.
        if flag == "--kubeconfig" && has("--manifests") {
            return true;
        }
        let long = flag.trim_start_matches("--");
        let mut names = vec![long.to_owned()];
        if let Some(arg) = run_args
            .iter()
            .flatten()
            .find(|a| a.get_long() == Some(long))
        {
            names.extend(
                arg.get_all_aliases()
                    .into_iter()
                    .flatten()
                    .map(str::to_owned),
            );
        }
        given_after_run.iter().filter_map(|a| a.to_str()).any(|a| {
            names
                .iter()
                .any(|n| a == format!("--{n}") || a.starts_with(&format!("--{n}=")))
        })
    };
    let merged = lb_agent::kube_proxy_config::merge(args.clone(), &config, given);
    Ok((merged, config.warnings))
}

/// Prefixes given to `flag` as the datapath holds them.
/// The IPv4 prefixes of a dual-stack flag; each IPv6 one is warned about
/// (the datapath's load-time prefixes are IPv4 for now).
fn cidrs(flag: &str, nets: &[ipnet::IpNet]) -> anyhow::Result<FamilyCidrs> {
    FamilyCidrs::new(nets).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// A duration in Go's syntax (`90s`, `24h0m0s`), more than zero.
fn parse_duration(text: &str) -> Result<Duration, String> {
    match lb_agent::duration::parse(text) {
        Ok(d) if d.is_zero() => Err(format!("{text:?}: must be more than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration in Go's syntax; `0` leaves the setting as it is.
fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    lb_agent::duration::parse(text).map_err(|e| e.to_string())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let config = args.config()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(serve::run(config))
        }
        Command::Inspect(args) => args.run(),
        Command::Explain(args) => args.run(),
        Command::Check(args) => args.run(),
        Command::Cleanup(args) => args.run(),
    }
}

impl RunArgs {
    /// What `run` is asked to do, checked.
    fn config(self) -> anyhow::Result<RunConfig> {
        let limits = self.limits.limits()?;
        let source = match self.manifests {
            Some(dir) => SourceConfig::Manifests(dir),
            None => SourceConfig::Api {
                kubeconfig: self.kubeconfig,
                api_server: match self.api_server {
                    // An empty value is a forgotten setting (the DaemonSet's
                    // placeholder): falling back to the in-cluster address
                    // would lean on the ClusterIP the agent itself serves.
                    Some(url) if url.trim().is_empty() => anyhow::bail!(
                        "--api-server (--master, env LB_API_SERVER) is set but empty: \
                         set it to the API server's real address (https://HOST:PORT, \
                         as in the nodes' kubeconfig), or unset it to use the kubeconfig's"
                    ),
                    url => url,
                },
            },
        };
        lb_agent::serve::node::check_snat_ports(&self.snat_port_range)
            .map_err(anyhow::Error::msg)?;
        for v6 in [false, true] {
            let of_family: Vec<_> = self
                .snat_address
                .iter()
                .filter(|a| a.is_ipv6() == v6)
                .collect();
            anyhow::ensure!(
                of_family.len() <= 1,
                "--snat-address {of_family:?}: at most one address per family"
            );
        }
        let icmp_limit =
            lb_common::icmp::IcmpLimit::new(self.icmp_errors_per_second, self.icmp_errors_burst)
                .map_err(anyhow::Error::msg)?;
        let node_name = match self.node_name.filter(|n| !n.is_empty()) {
            Some(name) => name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .map_err(|e| anyhow::anyhow!("reading the host name ({e}): set --node-name"))?,
        };
        let socket_lb = if self.socket_lb != SocketLbArg::Off {
            Some(match self.cgroup_path {
                Some(path) => path,
                None => lb_agent::datapath::cgroup::cgroup2_mount()
                    .map_err(|e| anyhow::anyhow!("--socket-lb: finding the cgroup2 root: {e}"))?,
            })
        } else {
            None
        };
        let service_cidrs = cidrs("--service-cluster-ip-range", &self.service_cluster_ip_range)?;
        let cluster_cidrs = match self.detect_local_mode {
            DetectLocalMode::ClusterCidr => cidrs("--cluster-cidr", &self.cluster_cidr)?,
            _ => FamilyCidrs::NONE,
        };
        let socket_lb_netns = match self.socket_lb {
            SocketLbArg::HostNetwork => {
                lb_agent::datapath::cgroup::own_netns_cookie().map_err(|e| {
                    anyhow::anyhow!(
                        "--socket-lb=host-network: this network namespace's cookie: {e}"
                    )
                })?
            }
            SocketLbArg::Off | SocketLbArg::All => 0,
        };
        Ok(RunConfig {
            socket_lb,
            source,
            external_interfaces: self.external_interfaces,
            node: lb_agent::serve::node::NodeSettings {
                name: node_name.into(),
                nodeport_cidrs: self.nodeport_addresses,
                snat_addresses: self.snat_address,
                snat_ports: self.snat_port_range,
                zone: self.node_zone.filter(|z| !z.is_empty()).map(Into::into),
                local_redirects: self.local_redirect,
            },
            health_addr: self.healthz_bind_address.0,
            probe_addr: self.probe_bind_address.0,
            metrics_addr: self.metrics_bind_address.0,
            bind_hard_fail: self.bind_address_hard_fail,
            datapath_log: self.datapath_log,
            interfaces: self.interfaces,
            pin_dir: self.pin_dir,
            sizes: MapSizes {
                service_slots: self.max_service_slots,
                backends: self.max_backends,
                conntrack: self.max_conntrack,
                conntrack_new: self.max_conntrack_new,
                affinity: self.max_affinity,
                source_ranges: self.max_source_ranges,
                maglev_chunks: self.max_maglev_chunks,
                socket_entries: self.max_socket_entries,
            },
            limits,
            keep_datapath: self.keep_datapath,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            globals: lb_agent::datapath::loader::Globals {
                timeouts: lb_common::ct::CtTimeouts {
                    tcp_opening_ns: nanos(self.conntrack_tcp_timeout_opening),
                    tcp_established_ns: nanos(self.conntrack_tcp_timeout_established),
                    tcp_closing_ns: nanos(self.conntrack_tcp_timeout_closing),
                    udp_ns: nanos(self.conntrack_udp_timeout),
                    tcp_snat_closing_ns: nanos(self.conntrack_tcp_timeout_snat_closing),
                },
                icmp_limit,
                socket_lb_netns,
                service_cidrs,
                cluster_cidrs,
            },
            conntrack_gc_interval: self.conntrack_gc_interval,
            health_timeout: self.health_timeout,
            nf_conntrack: lb_agent::serve::nf_conntrack::NfConntrack {
                max_per_core: self.conntrack_max_per_core,
                min: self.conntrack_min,
                tcp_established: self.conntrack_tcp_timeout_established.as_secs(),
                tcp_close_wait: self.conntrack_tcp_timeout_close_wait.as_secs(),
                tcp_be_liberal: self.conntrack_tcp_be_liberal,
                udp_stream: self.conntrack_udp_timeout_stream.as_secs(),
            },
            nf_sysctl_dir: self.conntrack_sysctl_dir,
        })
    }
}

impl InspectArgs {
    fn run(self) -> anyhow::Result<()> {
        let InspectArgs {
            what,
            pin_dir,
            json,
            service,
            backend,
        } = self;
        let filter = inspect::Filter { service, backend };
        print!(
            "{}",
            inspect_text(
                what.unwrap_or(InspectWhat::Services),
                &pin_dir,
                json,
                &filter
            )?
        );
        Ok(())
    }
}

impl ExplainArgs {
    fn run(self) -> anyhow::Result<()> {
        let ExplainArgs {
            target,
            client,
            manifests,
            kubeconfig,
            api_server,
            json,
            pin_dir,
        } = self;
        let target: explain::Target = target.parse()?;
        let clients = explain::parse_clients(&client)?;
        let api_server = api_server.filter(|a| !a.trim().is_empty());
        let objects = match manifests {
            None if kubeconfig.is_some() || api_server.is_some() => {
                let namespace = match &target {
                    explain::Target::Name { namespace, .. } => Some(namespace.clone()),
                    _ => None,
                };
                let objects = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(async {
                        let metrics = lb_agent::source::rest_client::RestClientMetrics::default();
                        let api = lb_agent::source::k8s::client(
                            kubeconfig.as_deref(),
                            api_server.as_deref(),
                            &metrics,
                        )
                        .await?;
                        lb_agent::source::k8s::list_objects(api, namespace.as_deref()).await
                    })
                    .context("reading Services and EndpointSlices from the API server")?;
                Some(lb_agent::source::store::ObjectStore::from_objects(&objects))
            }
            None => None,
            Some(dir) => {
                let mut dir = manifest::ManifestDir::new(&dir);
                if let Some(changes) = dir.poll()? {
                    for e in &changes.errors {
                        eprintln!("warning: {e}");
                    }
                }
                Some(lb_agent::source::store::ObjectStore::from_objects(
                    &dir.objects(),
                ))
            }
        };
        let sources = explain::Sources {
            pin_dir: &pin_dir,
            objects: objects.as_ref(),
        };
        let explanation = explain::explain(&target, &clients, &sources)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&explanation)?);
        } else {
            print!("{}", explain::text(&explanation));
        }
        Ok(())
    }
}

impl CheckArgs {
    /// The same path as `run`, into in-memory maps of the given sizes.
    fn run(self) -> anyhow::Result<()> {
        let CheckArgs {
            manifests,
            limits,
            max_service_slots,
            max_backends,
            node_name,
            node_zone,
            node_address,
        } = self;
        let limits = limits.limits()?;
        let mut dir = manifest::ManifestDir::new(&manifests);
        let mut errors = dir.poll()?.unwrap_or_default().errors;
        let objects = dir.objects();
        let node = desired::NodeContext {
            name: node_name.map(Into::into),
            nodeport_addresses: node_address,
            zone: node_zone.map(Into::into),
            ..Default::default()
        };
        let (desired, more) = desired::compute(&objects, limits, node);
        errors.extend(more);
        let mut reconciler = Reconciler::restore(
            lb_agent::datapath::offline::fake::FakeMaps::without_order_checks(
                max_service_slots as usize,
                max_backends as usize,
            ),
            max_backends,
        )?;
        let report = reconciler.apply(&desired);
        print!("{}", dump::services(&reconciler.maps().state));
        for e in &errors {
            eprintln!("invalid: {e}");
        }
        for e in &report.errors {
            eprintln!("not programmed: {e}");
        }
        anyhow::ensure!(
            errors.is_empty() && report.errors.is_empty(),
            "{} input problem(s) and {} map problem(s) in {}: `run` would not program everything",
            errors.len(),
            report.errors.len(),
            manifests.display()
        );
        Ok(())
    }
}

impl CleanupArgs {
    fn run(self) -> anyhow::Result<()> {
        let removed = lb_agent::datapath::cleanup::remove_datapath(&self.pin_dir);
        for link in &removed.links {
            println!("detached: {link}");
        }
        for map in &removed.maps {
            println!("removed map: {map}");
        }
        for path in &removed.foreign {
            eprintln!("left alone (not made by lb): {}", path.display());
        }
        for e in &removed.errors {
            eprintln!("could not remove: {e}");
        }
        anyhow::ensure!(
            removed.is_complete(),
            "{}: {} entries lb did not make and {} errors; the directory is kept",
            self.pin_dir.display(),
            removed.foreign.len(),
            removed.errors.len()
        );
        if removed.links.is_empty() && removed.maps.is_empty() {
            println!("{}: nothing to clean up", self.pin_dir.display());
        }
        Ok(())
    }
}

/// An address to serve on, or none (the empty string).
#[derive(Clone, Copy, Debug)]
struct BindAddress(Option<std::net::SocketAddr>);

fn parse_bind_address(text: &str) -> Result<BindAddress, String> {
    if text.is_empty() {
        return Ok(BindAddress(None));
    }
    text.parse().map(|a| BindAddress(Some(a))).map_err(|_| {
        format!("{text:?} is not ADDRESS:PORT (e.g. 127.0.0.1:10249), nor empty (off)")
    })
}

fn inspect_text(
    what: InspectWhat,
    pin_dir: &std::path::Path,
    json: bool,
    filter: &inspect::Filter,
) -> anyhow::Result<String> {
    let to_json = |value: serde_json::Value| -> anyhow::Result<String> {
        Ok(serde_json::to_string_pretty(&value)? + "\n")
    };
    match what {
        InspectWhat::Stats => {
            let counters = inspect::counters(pin_dir)?;
            if json {
                to_json(serde_json::Value::Object(
                    counters
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value.into()))
                        .collect(),
                ))
            } else {
                inspect::stats(pin_dir)
            }
        }
        InspectWhat::Services => {
            let snapshot = inspect::snapshot(pin_dir)?;
            if json {
                to_json(serde_json::to_value(inspect::frontends(&snapshot, filter))?)
            } else {
                inspect::services_text(&snapshot, filter)
            }
        }
        InspectWhat::Backends => {
            let backends = inspect::backends(&inspect::snapshot(pin_dir)?, filter);
            if json {
                to_json(serde_json::to_value(backends)?)
            } else {
                Ok(inspect::backends_text(&backends))
            }
        }
        InspectWhat::Conntrack => {
            let flows = inspect::flows(pin_dir, &inspect::snapshot(pin_dir)?, filter)?;
            if json {
                to_json(serde_json::to_value(flows)?)
            } else {
                Ok(inspect::flows_text(&flows))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> anyhow::Result<RunConfig> {
        let cli = Cli::try_parse_from(
            ["lb-agent", "run", "--interfaces=lo", "--node-name=n1"]
                .iter()
                .chain(args),
        )?;
        match cli.command {
            Command::Run(args) => args.config(),
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn a_kube_proxy_config_file_sets_flags_and_the_command_line_wins() {
        let file = std::env::temp_dir().join(format!("lb-config-{}.yaml", std::process::id()));
        std::fs::write(
            &file,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             hostnameOverride: from-file\nhealthzBindAddress: 127.0.0.1:9999\n\
             conntrack: {tcpEstablishedTimeout: 2h0m0s}\n",
        )
        .unwrap();
        let args = [
            "lb-agent",
            "run",
            "--interfaces=lo",
            "--health-addr",
            "127.0.0.1:10256",
        ]
        .iter()
        .map(Into::into)
        .chain(["--config".into(), file.clone().into_os_string()])
        .collect();
        let (merged, warnings) = with_config_file(args).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(warnings.is_empty());
        let cli = Cli::try_parse_from(merged).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("run")
        };
        let config = run.config().unwrap();
        assert_eq!(&*config.node.name, "from-file");
        assert_eq!(
            config.health_addr,
            Some("127.0.0.1:10256".parse().unwrap()),
            "--health-addr (an alias) wins"
        );
        assert_eq!(
            config.globals.timeouts.tcp_established_ns,
            2 * 3600 * 1_000_000_000
        );
        assert_eq!(config.nf_conntrack.tcp_established, 7200);
    }

    #[test]
    fn an_empty_api_server_is_an_error_naming_the_setting() {
        let e = run_config(&["--api-server="]).err().expect("an error");
        let text = format!("{e:#}");
        assert!(
            text.contains("LB_API_SERVER") && text.contains("empty"),
            "{text}"
        );
    }

    #[test]
    fn master_is_kube_proxys_name_for_the_api_server() {
        let config = run_config(&["--master=https://198.18.0.1:6443"]).unwrap();
        let SourceConfig::Api { api_server, .. } = config.source else {
            panic!("the API source")
        };
        assert_eq!(api_server.as_deref(), Some("https://198.18.0.1:6443"));
    }
}
