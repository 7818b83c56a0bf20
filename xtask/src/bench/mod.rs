//! `cargo xtask bench`: lb against what users would otherwise run, in one
//! run, on the same namespace topology: direct pod access (the floor),
//! kube-proxy-shaped iptables and nftables rules, and lb. Writes
//! bench/results/bench.md and bench/results/connections.svg.

pub mod ipv6;
mod load;
mod nodeport;
pub mod packet_rate;
mod peers;
mod report;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_tests::{
    servers::http_get,
    topology::{backend_ip, Agent, ScratchDir, Topology},
};

/// The value at quantile `p` (0..=1) of sorted samples; default when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    match sorted.len() {
        0 => T::default(),
        n => sorted[((n - 1) as f64 * p).round() as usize],
    }
}

/// One service as every mode programs it.
#[derive(Clone)]
/// A Service of one family: its cluster IP and endpoints.
pub struct Service {
    pub vip: IpAddr,
    pub port: u16,
    pub endpoints: Vec<(IpAddr, u16)>,
}

pub struct BenchConfig {
    pub scales: Vec<usize>,
    pub runs: usize,
    pub duration: Duration,
    pub threads: usize,
    pub bulk_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Direct,
    Iptables,
    Nftables,
    Lb,
    /// lb with socket LB: the client's connections translated at connect.
    LbSocket,
}

impl Mode {
    /// lb (tc path) and what users would otherwise run.
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Iptables, Mode::Nftables, Mode::Lb];
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Lb => "lb",
            Mode::LbSocket => "lb socket LB",
        }
    }
}

const ENDPOINTS: usize = 10;
const PREFIX: &str = "lbb";
const PIN_DIR: &str = "/sys/fs/bpf/lbb-bench";

/// N services × 10 endpoints. The target (the last one) points at the 10
/// real pods; the others at distinct addresses nothing answers on.
pub fn services(n: usize) -> Vec<Service> {
    (0..n)
        .map(|i| {
            let endpoints = if i + 1 == n {
                (0..ENDPOINTS)
                    .map(|j| (backend_ip(j).into(), 8080))
                    .collect()
            } else {
                (0..ENDPOINTS)
                    .map(|j| {
                        let k = (i * ENDPOINTS + j) as u32;
                        (
                            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + k % 32768)
                                .into(),
                            8080 + (k / 32768) as u16,
                        )
                    })
                    .collect()
            };
            Service {
                vip: peers::vip(i).into(),
                port: 80,
                endpoints,
            }
        })
        .collect()
}

/// Results of one mode at one scale, one entry per run.
#[derive(Default)]
pub struct Sample {
    pub conns_per_s: Vec<f64>,
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub gbit_s: Vec<f64>,
    pub program_s: Vec<f64>,
    pub errors: u64,
    pub rss_mib: Vec<f64>,
    pub cpu_s: Vec<f64>,
    /// Packet rate (`packet_rate`): forwarded packets/s, CPU seconds per
    /// million forwarded, offered packets/s.
    pub pps: Vec<f64>,
    pub cpu_s_per_mpkt: Vec<f64>,
    pub offered_pps: Vec<f64>,
}

pub fn run(agent_bin: &Path, config: &BenchConfig) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let started = Instant::now();
    let per_packet = report::per_packet_costs(config.runs)?;
    let mut results: Vec<(usize, Mode, Sample)> = Vec::new();
    let mut map_writes = Vec::new();
    for &scale in &config.scales {
        let services = services(scale);
        map_writes.push((scale, report::map_write_times(&services, config.runs)?));
        let modes = [Mode::ALL.as_slice(), &[Mode::LbSocket]].concat();
        for (mode, sample) in every_mode(
            &format!("{scale} services"),
            &modes,
            config,
            |mode, sample| one_run(mode, &services, config, sample),
        )? {
            results.push((scale, mode, sample));
        }
    }
    // NodePort to the other node's pod at the smallest and largest scale.
    let mut node_ports = Vec::new();
    let mut np_scales = vec![
        config.scales[0],
        *config.scales.last().context("no scales")?,
    ];
    np_scales.dedup();
    for scale in np_scales {
        node_ports.push((scale, nodeport::measure(scale, config)?));
    }
    // Packets per second through a node port, at the largest scale.
    let pps_scale = *config.scales.last().context("no scales")?;
    let rates = packet_rate::measure(pps_scale, config)?;
    crate::results::publish(
        "packet-rate.md",
        &packet_rate::markdown(pps_scale, config, &rates),
    )?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&out)?;
    let text = report::markdown(
        config,
        &results,
        &node_ports,
        &map_writes,
        &per_packet,
        started.elapsed(),
    );
    std::fs::write(out.join("connections.svg"), report::svg(config, &results))?;
    crate::results::publish("bench.md", &text)?;
    println!("{text}");
    Ok(())
}

fn one_run(
    mode: Mode,
    services: &[Service],
    config: &BenchConfig,
    sample: &mut Sample,
) -> anyhow::Result<()> {
    let topology = Topology::new(PREFIX, ENDPOINTS)?;
    tune_client(&topology.client)?;
    let _servers = topology.serve_backends("pod-")?;
    let scratch = ScratchDir::new("lbb-bench")?;
    // Socket LB: the bench's own process (its load threads) joins a cgroup
    // of its own for the run; the agent attaches there, never at the root.
    let cgroup = match mode {
        Mode::LbSocket => Some(lb_tests::cgroup::TestCgroup::new("bench")?),
        _ => None,
    };
    let _member = cgroup.as_ref().map(|c| c.join_self()).transpose()?;
    let target = services.last().context("no services")?;
    let vip = SocketAddr::new(target.vip, target.port);
    let mut agent = None;
    let started = Instant::now();
    let targets: Vec<SocketAddr> = match mode {
        Mode::Direct => (0..ENDPOINTS)
            .map(|i| SocketAddr::from((backend_ip(i), 8080)))
            .collect(),
        Mode::Iptables => {
            let rules = scratch.0.join("iptables.rules");
            std::fs::write(&rules, peers::iptables_rules(services))?;
            restore(&topology.node.name, &["iptables-legacy-restore"], &rules)?;
            vec![vip]
        }
        Mode::Nftables => {
            let rules = scratch.0.join("nftables.nft");
            std::fs::write(&rules, peers::nftables_rules(services))?;
            restore(&topology.node.name, &["nft", "-f"], &rules)?;
            vec![vip]
        }
        Mode::Lb | Mode::LbSocket => {
            scratch.write("services.yaml", &peers::manifest(services))?;
            let socket_lb = match (&cgroup, mode) {
                (Some(cgroup), Mode::LbSocket) => vec![
                    "--socket-lb=true".to_owned(),
                    "--cgroup-path".to_owned(),
                    cgroup.path.to_string_lossy().into_owned(),
                ],
                _ => Vec::new(),
            };
            let socket_lb: Vec<&str> = socket_lb.iter().map(String::as_str).collect();
            let mut a = Agent::start(
                &topology.node,
                &scratch.0,
                &topology.interface_pattern(),
                Path::new(PIN_DIR),
                &scratch.0.join("agent.log"),
                &socket_lb,
            )?;
            let target = format!("{vip}/TCP");
            a.wait_for_maps("the bench services", |m| {
                m.count(&target) == Some(ENDPOINTS)
            })?;
            agent = Some(a);
            vec![vip]
        }
    };
    if mode != Mode::Direct {
        sample.program_s.push(started.elapsed().as_secs_f64());
    }
    // The path must work before it is measured.
    let probe = targets[0];
    topology
        .client
        .run(|| http_get(probe))
        .with_context(|| format!("no answer from {probe}"))?;

    let conns = load::connections(&topology.client, &targets, config.threads, config.duration);
    sample.conns_per_s.push(conns.per_second);
    sample.p50_ms.push(conns.p50.as_secs_f64() * 1e3);
    sample.p99_ms.push(conns.p99.as_secs_f64() * 1e3);
    sample.errors += conns.errors;
    sample.gbit_s.push(load::throughput(
        &topology.client,
        targets[0],
        config.bulk_bytes,
    )?);

    if mode == Mode::LbSocket {
        // Measured what it claims: connections translated at the socket,
        // none by the tc path.
        let counters = lb_agent::cli::inspect::counters(Path::new(PIN_DIR))?;
        let get = |stat: lb_common::stats::Stat| {
            counters
                .iter()
                .find(|(n, _)| *n == lb_common::stats::STAT_NAMES[stat as usize])
                .map_or(0, |(_, v)| *v)
        };
        anyhow::ensure!(
            get(lb_common::stats::Stat::SockTranslated) > 0
                && get(lb_common::stats::Stat::DnatNew) == 0,
            "socket LB did not carry the connections"
        );
    }
    if let Some(agent) = agent.as_mut() {
        let (rss, cpu) = process_usage(agent.pid().context("agent pid")?)?;
        sample.rss_mib.push(rss);
        sample.cpu_s.push(cpu);
        let status = agent.stop()?;
        if !status.success() {
            bail!("agent exited with {status}:\n{}", agent.log_text());
        }
    }
    Ok(())
}

/// A load client opening thousands of short connections: a wide port range
/// and TIME_WAIT reuse, so it never waits for a free local port.
pub fn tune_client(client: &lb_tests::netns::NetNs) -> anyhow::Result<()> {
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")
}

/// Every mode, `config.runs` times each, through `run_once`.
pub fn every_mode(
    what: &str,
    modes: &[Mode],
    config: &BenchConfig,
    mut run_once: impl FnMut(Mode, &mut Sample) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<(Mode, Sample)>> {
    let mut out = Vec::new();
    for &mode in modes {
        let mut sample = Sample::default();
        for run in 0..config.runs {
            eprintln!(
                "[bench] {what}, {}, run {}/{}",
                mode.name(),
                run + 1,
                config.runs
            );
            run_once(mode, &mut sample).with_context(|| format!("{} at {what}", mode.name()))?;
        }
        out.push((mode, sample));
    }
    Ok(out)
}

/// Runs a rules loader in the node namespace, feeding it `file`.
pub fn restore(netns: &str, command: &[&str], file: &PathBuf) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(command);
    if command[0] == "nft" {
        cmd.arg(file);
    } else {
        cmd.stdin(std::fs::File::open(file)?);
    }
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("running {}", command[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            command[0],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Resident memory (MiB) and CPU time (s, user + system) of a process.
/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`, …).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} of process {pid}"))
}

pub fn process_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let rss_kib = status_kib(pid, "VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((rss_kib / 1024.0, ticks / hz))
}
