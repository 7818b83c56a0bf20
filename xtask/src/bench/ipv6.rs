//! `cargo xtask bench-ipv6`: new connections per second through an IPv6
//! cluster IP next to the IPv4 one, on the same topology in the same run
//! (issue #22's target: IPv6 at least 0.97 × IPv4), beside direct pod
//! access and kube-proxy-shaped iptables and nftables rules of each family
//! (ip6tables, `table ip6`); the BPF program's cost per packet of each
//! family (#22: an IPv6 conntrack hit within 20 ns of IPv4's); then the
//! agent's memory and programming time at 10 000 Services, IPv4-only and
//! dual-stack. Writes bench/results/ipv6.md.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_agent::model::Family;
use lb_tests::{
    servers::{http_get, BackendServers},
    topology::{backend_ip, backend_ip6, Agent, ScratchDir, Topology, VIP, VIP6},
};

use super::{
    load, peers, percentile, process_usage, restore, tune_client, BenchConfig, Mode, Service,
};

const PREFIX: &str = "lb6b";
const PIN_DIR: &str = "/sys/fs/bpf/lb6b-bench";
const ENDPOINTS: usize = 10;
/// Services of the memory figure.
const SCALE: usize = 10_000;

/// One family's runs: connections/s by mode (`Mode::ALL`'s order).
#[derive(Default)]
struct Figures {
    conns: [Vec<f64>; 4],
    rss_mib: Vec<f64>,
    errors: u64,
}

/// The agent at `SCALE` Services of one shape.
struct AtScale {
    shape: &'static str,
    frontends: usize,
    rss_mib: f64,
    program_s: f64,
}

pub fn run(agent_bin: &Path, config: &BenchConfig) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let started = Instant::now();
    let mut figures = [Figures::default(), Figures::default()];
    // Interleaved, run by run: a drift of the machine shows in every mode.
    for run in 0..config.runs {
        for (family, figures) in [Family::V4, Family::V6].into_iter().zip(figures.iter_mut()) {
            for (m, mode) in Mode::ALL.into_iter().enumerate() {
                eprintln!(
                    "[bench-ipv6] {family:?} {}, run {}/{}",
                    mode.name(),
                    run + 1,
                    config.runs
                );
                let conns = one_run(family, mode, config, figures)
                    .with_context(|| format!("{family:?}, {}, run {}", mode.name(), run + 1))?;
                figures.conns[m].push(conns);
            }
        }
    }
    eprintln!("[bench-ipv6] per-packet cost");
    let costs = super::report::per_packet_costs(config.runs)?;
    let mut scale = Vec::new();
    for dual in [false, true] {
        eprintln!("[bench-ipv6] {SCALE} Services, dual-stack {dual}");
        scale.push(at_scale(dual).with_context(|| format!("{SCALE} Services, dual {dual}"))?);
    }
    let text = markdown(config, &figures, &costs, &scale, started.elapsed());
    crate::results::publish("ipv6.md", &text)?;
    println!("{text}");
    Ok(())
}

/// The one Service of a run: TCP 80 → the 10 pods of `family`.
fn service(family: Family) -> Service {
    let (vip, pods): (IpAddr, Vec<IpAddr>) = match family {
        Family::V4 => (
            VIP.into(),
            (0..ENDPOINTS).map(|i| backend_ip(i).into()).collect(),
        ),
        Family::V6 => (
            VIP6.into(),
            (0..ENDPOINTS).map(|i| backend_ip6(i).into()).collect(),
        ),
    };
    Service {
        vip,
        port: 80,
        endpoints: pods.into_iter().map(|p| (p, 8080)).collect(),
    }
}

/// One measurement; the connections per second.
fn one_run(
    family: Family,
    mode: Mode,
    config: &BenchConfig,
    out: &mut Figures,
) -> anyhow::Result<f64> {
    let topology = Topology::new(PREFIX, ENDPOINTS)?;
    tune_client(&topology.client)?;
    let _servers = match family {
        Family::V4 => topology.serve_backends("pod-")?,
        Family::V6 => {
            topology.add_ipv6()?;
            (0..ENDPOINTS)
                .map(|i| {
                    let ns = &topology.backends[i];
                    BackendServers::start_on(ns, backend_ip6(i), &format!("pod-{i}"), 8080, 5353)
                })
                .collect::<anyhow::Result<_>>()?
        }
    };
    let svc = service(family);
    let vip = SocketAddr::new(svc.vip, svc.port);
    let services = [svc];
    let scratch = ScratchDir::new("lb6b-bench")?;
    let mut agent = None;
    let targets: Vec<SocketAddr> = match mode {
        Mode::Direct => services[0]
            .endpoints
            .iter()
            .map(|(ip, port)| SocketAddr::new(*ip, *port))
            .collect(),
        Mode::Iptables => {
            let rules = scratch.0.join("iptables.rules");
            std::fs::write(&rules, peers::iptables_rules(&services))?;
            let restore_tool = match family {
                Family::V4 => "iptables-legacy-restore",
                Family::V6 => "ip6tables-legacy-restore",
            };
            restore(&topology.node.name, &[restore_tool], &rules)?;
            vec![vip]
        }
        Mode::Nftables => {
            let rules = scratch.0.join("nftables.nft");
            std::fs::write(&rules, peers::nftables_rules(&services))?;
            restore(&topology.node.name, &["nft", "-f"], &rules)?;
            vec![vip]
        }
        Mode::Lb | Mode::LbSocket => {
            scratch.write("services.yaml", &peers::manifest(&services))?;
            let mut a = start_agent(&topology, &scratch)?;
            let key = format!("{vip}/TCP");
            a.wait_for_maps("the bench service", |m| m.count(&key) == Some(ENDPOINTS))?;
            agent = Some(a);
            vec![vip]
        }
    };
    // The path must work before it is measured.
    let probe = targets[0];
    topology
        .client
        .run(|| http_get(probe))
        .with_context(|| format!("no answer from {probe}"))?;
    let conns = load::connections(&topology.client, &targets, config.threads, config.duration);
    out.errors += conns.errors;
    if let Some(mut agent) = agent {
        let (rss, _) = process_usage(agent.pid().context("agent pid")?)?;
        out.rss_mib.push(rss);
        let status = agent.stop()?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
    }
    Ok(conns.per_second)
}

/// The agent on `topology`'s node, reading `scratch`.
fn start_agent(topology: &Topology, scratch: &ScratchDir) -> anyhow::Result<Agent> {
    Agent::start(
        &topology.node,
        &scratch.0,
        &topology.interface_pattern(),
        Path::new(PIN_DIR),
        &scratch.0.join("agent.log"),
        &[],
    )
}

/// `SCALE` Services of one port and two endpoints per family, IPv4-only or
/// dual-stack: the agent's resident memory once all are programmed, and
/// the time from its start to that.
fn at_scale(dual: bool) -> anyhow::Result<AtScale> {
    let topology = Topology::new(PREFIX, 1)?;
    let scratch = ScratchDir::new("lb6b-scale")?;
    scratch.write("services.yaml", &scale_manifest(dual))?;
    let started = Instant::now();
    let mut agent = start_agent(&topology, &scratch)?;
    let last = SCALE - 1;
    let keys = [
        format!("{}:80/TCP", peers::vip(last)),
        format!("[{}]:80/TCP", scale_vip6(last)),
    ];
    let families = if dual { 2 } else { 1 };
    agent.wait_for_maps("every Service", |m| {
        keys[..families].iter().all(|k| m.count(k) == Some(2))
    })?;
    let program_s = started.elapsed().as_secs_f64();
    let (rss_mib, _) = process_usage(agent.pid().context("agent pid")?)?;
    let status = agent.stop()?;
    anyhow::ensure!(status.success(), "agent exited with {status}");
    Ok(AtScale {
        shape: if dual { "dual-stack" } else { "IPv4-only" },
        frontends: SCALE * families,
        rss_mib,
        program_s,
    })
}

/// Service i's IPv6 cluster IP, in 2001:db8:ffff::/64.
fn scale_vip6(i: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 1, i as u16)
}

fn scale_manifest(dual: bool) -> String {
    let mut r = String::new();
    for i in 0..SCALE {
        let v4 = peers::vip(i);
        let (a, b) = (i / 250, i % 250);
        let (ips, families) = if dual {
            (format!("[\"{v4}\", \"{}\"]", scale_vip6(i)), "[IPv4, IPv6]")
        } else {
            (format!("[\"{v4}\"]"), "[IPv4]")
        };
        let _ = write!(
            r,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: bench}}\nspec:\n  \
             clusterIP: \"{v4}\"\n  clusterIPs: {ips}\n  ipFamilies: {families}\n  \
             ipFamilyPolicy: {}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc{i}-v4, \
             namespace: bench, labels: {{kubernetes.io/service-name: svc{i}}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [\"198.18.{}.{}\"]\n\
             - addresses: [\"198.18.{}.{}\"]\n---\n",
            if dual { "PreferDualStack" } else { "SingleStack" },
            128 + a,
            1 + b,
            168 + a,
            1 + b,
        );
        if dual {
            let _ = write!(
                r,
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc{i}-v6, \
                 namespace: bench, labels: {{kubernetes.io/service-name: svc{i}}}}}\naddressType: IPv6\n\
                 ports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [\"2001:db8:80::{:x}\"]\n\
                 - addresses: [\"2001:db8:81::{:x}\"]\n---\n",
                i + 1,
                i + 1,
            );
        }
    }
    r
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

fn cell(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!("{:.0} [{min:.0}–{max:.0}]", median(values))
}

fn markdown(
    config: &BenchConfig,
    figures: &[Figures; 2],
    costs: &[(&'static str, Vec<f64>)],
    scale: &[AtScale],
    took: Duration,
) -> String {
    let [v4, v6] = figures;
    let mut out = format!(
        "# IPv6 next to IPv4\n\n\
         One run of `cargo xtask bench-ipv6`; {runs} runs per figure, each the median \
         [min–max], the families and modes interleaved run by run. Topology: client pod → \
         node → 10 backend pods, one Service (TCP 80 → 10 endpoints) of one family per run; \
         iptables and nftables are kube-proxy's rules for it (`iptables-legacy-restore` / \
         `ip6tables-legacy-restore`, `table ip` / `table ip6`). Short connections: {threads} \
         client threads for {secs}s, each an HTTP/1.0 GET and close. Took {took:.0}s.\n\n\
         | family | direct | iptables | nftables | lb | lb / iptables | lb / nftables | agent RSS MiB |\n\
         |---|---|---|---|---|---|---|---|\n",
        runs = config.runs,
        threads = config.threads,
        secs = config.duration.as_secs_f64(),
        took = took.as_secs_f64(),
    );
    let [direct, ipt, nft, lb] = [0, 1, 2, 3];
    for (name, f) in [("IPv4", v4), ("IPv6", v6)] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {:.3} | {:.3} | {:.1} |",
            cell(&f.conns[direct]),
            cell(&f.conns[ipt]),
            cell(&f.conns[nft]),
            cell(&f.conns[lb]),
            median(&f.conns[lb]) / median(&f.conns[ipt]),
            median(&f.conns[lb]) / median(&f.conns[nft]),
            median(&f.rss_mib),
        );
    }
    let ratio = |m: usize| median(&v6.conns[m]) / median(&v4.conns[m]);
    let _ = writeln!(
        out,
        "\nIPv6 / IPv4, same mode: lb **{:.3}** (target ≥ 0.97: {}); direct {:.3} (the \
         kernel's own IPv6 path); iptables {:.3}; nftables {:.3}. Failed connections: {}.",
        ratio(lb),
        if ratio(lb) >= 0.97 { "met" } else { "missed" },
        ratio(direct),
        ratio(ipt),
        ratio(nft),
        v4.errors + v6.errors,
    );
    use super::report::{
        CT_HIT, CT_HIT6, CT_HIT6_DIRECT, FIRST_PACKET, FIRST_PACKET6, FLOOR, NOT_SERVICE,
        NOT_SERVICE6,
    };
    let cost = |label: &str| {
        costs
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, v)| v.as_slice())
    };
    let _ = write!(
        out,
        "\n## BPF program cost per packet (ns)\n\n\
         The kernel's own timing of BPF_PROG_TEST_RUN runs, as in bench.md (median of 20 000 \
         per batch, {runs} batches).\n\n\
         | path | IPv4 | IPv6 | IPv6 − IPv4 |\n|---|---|---|---|\n",
        runs = config.runs,
    );
    for (path, v4_label, v6_label) in [
        ("first packet of a flow", FIRST_PACKET, FIRST_PACKET6),
        ("conntrack hit (established, assured)", CT_HIT, CT_HIT6),
        (
            "conntrack hit, IPv6 program entered directly (no IPv4 parse, no tail call)",
            CT_HIT,
            CT_HIT6_DIRECT,
        ),
        ("not a service (lookup, pass)", NOT_SERVICE, NOT_SERVICE6),
    ] {
        if let (Some(a), Some(b)) = (cost(v4_label), cost(v6_label)) {
            let _ = writeln!(
                out,
                "| {path} | {} | {} | {:+.0} |",
                cell(a),
                cell(b),
                median(b) - median(a)
            );
        }
    }
    if let Some(floor) = cost(FLOOR) {
        let _ = writeln!(
            out,
            "| an ARP frame (one load, pass): the measurement's floor | {} | | |",
            cell(floor)
        );
    }
    if let (Some(a), Some(b)) = (cost(CT_HIT), cost(CT_HIT6)) {
        let gap = median(b) - median(a);
        let _ = writeln!(
            out,
            "\nIPv6 conntrack hit − IPv4's: {gap:+.0} ns (target within 20 ns: {}).",
            if gap <= 20.0 { "met" } else { "missed" }
        );
    }
    let _ = write!(
        out,
        "\n## {SCALE} Services\n\n\
         One port each, two endpoints per family; the agent from start to every Service \
         programmed (manifests), then its resident memory.\n\n\
         | Services | frontends | agent RSS MiB | start to programmed, s |\n|---|---|---|---|\n",
    );
    for s in scale {
        let _ = writeln!(
            out,
            "| {SCALE} {} | {} | {:.1} | {:.1} |",
            s.shape, s.frontends, s.rss_mib, s.program_s
        );
    }
    if let [v4only, dual] = scale {
        let _ = writeln!(
            out,
            "\nDual-stack / IPv4-only RSS: {:.2}.",
            dual.rss_mib / v4only.rss_mib
        );
    }
    out
}
