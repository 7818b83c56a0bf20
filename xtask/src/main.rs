//! Project tasks that cargo alone cannot do: privileged tests, the demo,
//! loading on this host.

mod bench;
mod cluster_dns;
mod demo;
mod image;
mod k8s_latency;
mod results;
mod soak;
mod upkeep;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the agent (with the eBPF object embedded).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent on this host: attach to IFACE and program
    /// it from DIR (default: the demo's example manifest). Ctrl-C detaches.
    BuildAndLoad {
        #[arg(long, value_delimiter = ',', required = true)]
        iface: Vec<String>,
        #[arg(long)]
        manifests: Option<PathBuf>,
    },
    /// Namespace demo: client, node and three backend pods; real requests through the VIP.
    Demo,
    /// The container image (buildah, no base image): the release agent and
    /// its shared libraries; checked by running it inside the image's root.
    Image,
    /// lb vs kube-proxy-shaped iptables and nftables rules (writes bench/results/).
    Bench {
        /// Service counts to measure at.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
        scales: Vec<usize>,
        /// Runs per figure (median, min, max).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds of short-connection load per run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// New connections per second through an IPv6 cluster IP next to the
    /// IPv4 one, and direct pod access of each family (writes
    /// bench/results/ipv6.md; also part of `bench`).
    BenchIpv6 {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds of short-connection load per run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// Packets per second through a node port, lb (tc) vs kube-proxy-shaped
    /// iptables and nftables, sent by an XDP live-frames generator (writes
    /// bench/results/packet-rate.md).
    PacketRate {
        /// Services programmed (the last is the target).
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds each run sends for.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Measure EndpointSlice change → map update at a real API server (writes bench/results/k8s-latency.md).
    K8sLatency {
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Service counts to measure at (each × 10 endpoints).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10_000])]
        scales: Vec<usize>,
        /// Sources to measure: `api`, `manifests` or both.
        #[arg(long, value_delimiter = ',', default_values_t = ["api".to_string(), "manifests".to_string()])]
        sources: Vec<String>,
    },
    /// Restarts, churn and a spoofed SYN flood under load: SIGKILL ×5 and
    /// SIGTERM with --keep-datapath while TCP and UDP flow through a VIP
    /// (writes bench/results/soak.md).
    Soak,
    /// The agent at a production conntrack size: GC passes over two million
    /// entries while /healthz is asked (writes bench/results/upkeep.md).
    Upkeep,
    /// Rewrite docs/performance.md's figures from bench/results/.
    Docs,
    /// Unprivileged tests, then (as root) datapath and end-to-end tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
}

/// The IPv6 comparison's load: as `bench`'s short connections.
fn bench_ipv6_config(runs: usize, seconds: f64) -> bench::BenchConfig {
    bench::BenchConfig {
        scales: vec![1],
        runs,
        duration: std::time::Duration::from_secs_f64(seconds),
        threads: 2,
        bulk_bytes: 0,
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// Runs `cargo test ...`, passing its output through, and returns the
/// (passed, failed) totals from its `test result:` lines.
fn cargo_test(args: &[&str]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cargo_command(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().context("cargo stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "cargo {} failed ({status}); {passed} passed, {failed} failed so far",
            args.join(" ")
        );
    }
    Ok((passed, failed))
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command(args).status().context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds lb-agent and returns the binary's path.
pub fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--quiet", "--package", "lb-agent"];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("lb-agent"))
}

/// Builds (or finds cached) the test API server and etcd.
fn build_apiserver() -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(workspace_root().join("tests/apiserver/build.sh"))
        .status()?;
    if !status.success() {
        bail!("building the test API server failed ({status})");
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF, network namespaces): run it as root");
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Task::Build { release } => {
            let path = build_agent(release)?;
            println!("{}", path.display());
        }
        Task::BuildAndLoad { iface, manifests } => {
            require_root("build-and-load")?;
            let agent = build_agent(true)?;
            let scratch;
            let manifests = match manifests {
                Some(dir) => dir,
                None => {
                    scratch = lb_tests::topology::ScratchDir::new("lb-build-and-load")?;
                    scratch.write("demo.yaml", demo::MANIFEST)?;
                    scratch.0.clone()
                }
            };
            let status = Command::new(agent)
                .args(["run", "--interfaces", &iface.join(","), "--manifests"])
                .arg(&manifests)
                .status()?;
            if !status.success() {
                bail!("lb-agent exited with {status}");
            }
        }
        Task::Image => {
            require_root("building the image")?;
            let agent = build_agent(true)?;
            image::run(&agent)?;
        }
        Task::Demo => {
            require_root("the demo")?;
            let agent = build_agent(false)?;
            demo::run(&agent)?;
        }
        Task::Bench {
            scales,
            runs,
            seconds,
        } => {
            require_root("bench")?;
            if cfg!(debug_assertions) {
                // The load generator runs in this process: measure with an optimised build.
                let scales: Vec<String> = scales.iter().map(ToString::to_string).collect();
                let (runs, seconds) = (runs.to_string(), seconds.to_string());
                return cargo(&[
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "xtask",
                    "--",
                    "bench",
                    "--scales",
                    &scales.join(","),
                    "--runs",
                    &runs,
                    "--seconds",
                    &seconds,
                ]);
            }
            let agent = build_agent(true)?;
            let config = bench::BenchConfig {
                scales,
                runs,
                duration: std::time::Duration::from_secs_f64(seconds),
                threads: 2,
                bulk_bytes: 256 << 20,
            };
            bench::run(&agent, &config)?;
            bench::ipv6::run(&agent, &bench_ipv6_config(runs, seconds))?;
        }
        Task::BenchIpv6 { runs, seconds } => {
            require_root("bench-ipv6")?;
            if cfg!(debug_assertions) {
                // The load generator runs in this process: measure with an optimised build.
                let (runs, seconds) = (runs.to_string(), seconds.to_string());
                return cargo(&[
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "xtask",
                    "--",
                    "bench-ipv6",
                    "--runs",
                    &runs,
                    "--seconds",
                    &seconds,
                ]);
            }
            let agent = build_agent(true)?;
            bench::ipv6::run(&agent, &bench_ipv6_config(runs, seconds))?;
        }
        Task::PacketRate {
            services,
            runs,
            seconds,
        } => {
            require_root("packet-rate")?;
            let agent = build_agent(true)?;
            // SAFETY: single-threaded here; read by topology::agent_binary.
            unsafe { std::env::set_var("LB_AGENT_BIN", &agent) };
            let config = bench::BenchConfig {
                scales: vec![services],
                runs,
                duration: std::time::Duration::from_secs_f64(seconds),
                threads: 1,
                bulk_bytes: 0,
            };
            let results = bench::packet_rate::measure(services, &config)?;
            let text = bench::packet_rate::markdown(services, &config, &results);
            results::publish("packet-rate.md", &text)?;
            println!("{text}");
        }
        Task::Soak => {
            require_root("soak")?;
            let agent = build_agent(false)?;
            build_apiserver()?;
            soak::run(&agent)?;
        }
        Task::Upkeep => {
            require_root("upkeep")?;
            let agent = build_agent(true)?;
            upkeep::run(&agent)?;
        }
        Task::K8sLatency {
            changes,
            scales,
            sources,
        } => {
            require_root("k8s-latency")?;
            let agent = build_agent(true)?;
            build_apiserver()?;
            k8s_latency::run(&agent, changes, &scales, &sources)?;
        }
        Task::Docs => results::refresh_docs()?,
        Task::Test { filter } => {
            let filter: Vec<&str> = filter.as_deref().into_iter().collect();
            let mut unprivileged = vec![
                "test",
                "--package",
                "lb-common",
                "--package",
                "lb-agent",
                "--package",
                "xtask",
                "--",
            ];
            unprivileged.extend(&filter);
            let (p1, f1) = cargo_test(&unprivileged)?;
            require_root("the datapath and end-to-end tests")?;
            let agent = build_agent(false)?;
            build_apiserver()?;
            // SAFETY: single-threaded at this point; the variable is read by the test binaries.
            unsafe { std::env::set_var("LB_AGENT_BIN", &agent) };
            let mut privileged = vec!["test", "--package", "lb-tests", "--"];
            privileged.extend(&filter);
            let (p2, f2) = cargo_test(&privileged)?;
            println!("\ntotal: {} passed, {} failed", p1 + p2, f1 + f2);
        }
    }
    Ok(())
}
