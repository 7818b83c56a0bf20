//! `cargo xtask bench-ipv6`: new connections per second through an IPv6
//! cluster IP next to the IPv4 one, on the same topology in the same run
//! (issue #22's target: IPv6 at least 0.97 × IPv4), with direct pod access
//! of each family as the floor, and the agent's memory for each. Writes
//! bench/results/ipv6.md. Not yet here: kube-proxy-shaped ip6tables and
//! nftables peers, larger scales.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    servers::{http_get, BackendServers},
    topology::{
        backend_ip, backend_ip6, web_manifest, web_manifest6, Agent, ScratchDir, Topology, VIP,
        VIP6,
    },
};

use super::{load, percentile, process_usage, tune_client, BenchConfig};

const PREFIX: &str = "lb6b";
const PIN_DIR: &str = "/sys/fs/bpf/lb6b-bench";
const ENDPOINTS: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    V4,
    V6,
}

#[derive(Default)]
struct Figures {
    direct: Vec<f64>,
    lb: Vec<f64>,
    rss_mib: Vec<f64>,
    errors: u64,
}

pub fn run(agent_bin: &Path, config: &BenchConfig) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let started = Instant::now();
    let mut figures = [Figures::default(), Figures::default()];
    // Interleaved, run by run: a drift of the machine shows in both.
    for run in 0..config.runs {
        for (family, figures) in [Family::V4, Family::V6].into_iter().zip(figures.iter_mut()) {
            for lb in [false, true] {
                eprintln!(
                    "[bench-ipv6] {family:?} {}, run {}/{}",
                    if lb { "lb" } else { "direct" },
                    run + 1,
                    config.runs
                );
                one_run(family, lb, config, figures)
                    .with_context(|| format!("{family:?}, lb {lb}, run {}", run + 1))?;
            }
        }
    }
    let text = markdown(config, &figures, started.elapsed());
    crate::results::publish("ipv6.md", &text)?;
    println!("{text}");
    Ok(())
}

fn one_run(
    family: Family,
    lb: bool,
    config: &BenchConfig,
    out: &mut Figures,
) -> anyhow::Result<()> {
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
    let (pods, vip): (Vec<SocketAddr>, SocketAddr) = match family {
        Family::V4 => (
            (0..ENDPOINTS)
                .map(|i| (backend_ip(i), 8080).into())
                .collect(),
            (VIP, 80).into(),
        ),
        Family::V6 => (
            (0..ENDPOINTS)
                .map(|i| (backend_ip6(i), 8080).into())
                .collect(),
            (VIP6, 80).into(),
        ),
    };
    let mut agent = None;
    let targets = if lb {
        let scratch = ScratchDir::new("lb6b-bench")?;
        let manifest = match family {
            Family::V4 => {
                let backends: Vec<_> = (0..ENDPOINTS).map(|i| (backend_ip(i), true)).collect();
                web_manifest(&backends)
            }
            Family::V6 => {
                let backends: Vec<_> = (0..ENDPOINTS).map(backend_ip6).collect();
                web_manifest6(&backends)
            }
        };
        scratch.write("services.yaml", &manifest)?;
        let mut a = Agent::start(
            &topology.node,
            &scratch.0,
            &topology.interface_pattern(),
            Path::new(PIN_DIR),
            &scratch.0.join("agent.log"),
            &[],
        )?;
        let key = format!("{vip}/TCP");
        a.wait_for_maps("the bench service", |m| m.count(&key) == Some(ENDPOINTS))?;
        agent = Some((a, scratch));
        vec![vip]
    } else {
        pods
    };
    // The path must work before it is measured.
    let probe = targets[0];
    topology
        .client
        .run(|| http_get(probe))
        .with_context(|| format!("no answer from {probe}"))?;
    let conns = load::connections(&topology.client, &targets, config.threads, config.duration);
    out.errors += conns.errors;
    if let Some((mut agent, _scratch)) = agent {
        out.lb.push(conns.per_second);
        let (rss, _) = process_usage(agent.pid().context("agent pid")?)?;
        out.rss_mib.push(rss);
        let status = agent.stop()?;
        anyhow::ensure!(status.success(), "agent exited with {status}");
    } else {
        out.direct.push(conns.per_second);
    }
    Ok(())
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

fn markdown(config: &BenchConfig, figures: &[Figures; 2], took: Duration) -> String {
    let [v4, v6] = figures;
    let mut out = format!(
        "# IPv6 next to IPv4\n\n\
         One run of `cargo xtask bench-ipv6`; {runs} runs per figure, each the median \
         [min–max], the families interleaved run by run. Topology: client pod → node → \
         10 backend pods, one Service (TCP 80 → 10 endpoints) of one family per run. Short \
         connections: {threads} client threads for {secs}s, each an HTTP/1.0 GET and close. \
         Took {took:.0}s.\n\n\
         | family | direct | lb | lb / direct | agent RSS MiB |\n|---|---|---|---|---|\n",
        runs = config.runs,
        threads = config.threads,
        secs = config.duration.as_secs_f64(),
        took = took.as_secs_f64(),
    );
    for (name, f) in [("IPv4", v4), ("IPv6", v6)] {
        out.push_str(&format!(
            "| {name} | {} | {} | {:.3} | {:.1} |\n",
            cell(&f.direct),
            cell(&f.lb),
            median(&f.lb) / median(&f.direct),
            median(&f.rss_mib),
        ));
    }
    let ratio = median(&v6.lb) / median(&v4.lb);
    let floor = median(&v6.direct) / median(&v4.direct);
    out.push_str(&format!(
        "\nlb IPv6 / lb IPv4: **{ratio:.3}** (target ≥ 0.97: {}); direct IPv6 / direct IPv4: \
         {floor:.3} (what the kernel's own IPv6 path costs). Failed connections: {}.\n",
        if ratio >= 0.97 { "met" } else { "missed" },
        v4.errors + v6.errors,
    ));
    out
}
