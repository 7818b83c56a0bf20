//! `cargo xtask soak`: restarts and churn under load. Long-lived TCP
//! connections, a steady stream of new TCP connections and UDP
//! request/response run through a VIP while the agent is killed with
//! SIGKILL and restarted five times, then stopped with SIGTERM
//! (`--keep-datapath`) and started again; then while endpoints change
//! 1 000 times a second for 60 s; then under a spoofed SYN flood. Every
//! failure is counted; the figures go
//! to bench/results/soak.md. Not a test: a repeatable measurement.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use lb_tests::{
    apiserver::{apply, TestApiServer},
    servers::{http_get, EchoConnection},
    topology::{backend_ip, web_manifest, Agent, ScratchDir, Source, Topology, VIP},
};

const PIN_DIR: &str = "/sys/fs/bpf/lb-soak";
const KILLS: usize = 5;
const LONG_LIVED: usize = 4;

const FLOOD_TIME: Duration = Duration::from_secs(20);
const CHURN_RATE: f64 = 1000.0;
const CHURN_TIME: Duration = Duration::from_secs(60);

/// `web` with pods 0-2 ready and pod 3 ready or not.
fn web(pod3_ready: bool) -> String {
    let mut pods: Vec<(Ipv4Addr, bool)> = (0..3).map(|i| (backend_ip(i), true)).collect();
    pods.push((backend_ip(3), pod3_ready));
    web_manifest(&pods)
}

/// Another Service with 50 endpoints (no pods behind them: nothing sends
/// to it); change `n` flips the readiness of endpoint `n % 50`.
fn churn_manifest(n: u64) -> String {
    let endpoints: String = (0..50u64)
        .map(|i| {
            let ready = !(n > 0 && i == n % 50 && (n / 50).is_multiple_of(2));
            format!(
                "- addresses: [\"198.18.50.{}\"]\n  conditions: {{ready: {ready}}}\n",
                i + 1
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: churn, namespace: demo}}
spec:
  clusterIP: 198.19.0.20
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: churn-1
  namespace: demo
  labels: {{kubernetes.io/service-name: churn}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"#
    )
}

/// What the maps serve — each frontend's backend addresses — and how many
/// backend entries they hold (ids and slot order may differ after a churn).
fn programmed() -> anyhow::Result<(BTreeMap<String, Vec<String>>, usize)> {
    let snapshot = lb_agent::cli::inspect::snapshot(Path::new(PIN_DIR))?;
    let frontends = lb_agent::cli::inspect::frontends(&snapshot, &Default::default())
        .into_iter()
        .map(|f| {
            let mut backends: Vec<String> = f
                .backends
                .iter()
                .map(|b| format!("{:?}:{:?}", b.address, b.port))
                .collect();
            backends.sort();
            (f.frontend, backends)
        })
        .collect();
    Ok((frontends, snapshot.backends.len()))
}

/// The counts at one moment.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    new_ok: u64,
    new_failed: u64,
    new_timed_out: u64,
    new_refused: u64,
    new_reset: u64,
    long_asks: u64,
    long_failed: u64,
    udp_answered: u64,
    udp_retried: u64,
    udp_lost: u64,
}

type Pick = fn(&Snapshot) -> u64;

impl Snapshot {
    const ROWS: [(&'static str, Pick); 10] = [
        ("new TCP connections answered", |s| s.new_ok),
        ("new TCP connections failed", |s| s.new_failed),
        ("… of them timed out (connect or answer)", |s| {
            s.new_timed_out
        }),
        ("… refused (ECONNREFUSED)", |s| s.new_refused),
        ("… reset (ECONNRESET, EPIPE)", |s| s.new_reset),
        ("questions on long-lived connections", |s| s.long_asks),
        ("long-lived connections broken (reset or timed out)", |s| {
            s.long_failed
        }),
        ("UDP requests answered", |s| s.udp_answered),
        ("UDP retries (the client's own)", |s| s.udp_retried),
        ("UDP requests lost beyond the client's retries", |s| {
            s.udp_lost
        }),
    ];
}

#[derive(Default)]
struct Counts {
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    new_timed_out: AtomicU64,
    new_refused: AtomicU64,
    new_reset: AtomicU64,
    long_asks: AtomicU64,
    long_failed: AtomicU64,
    udp_answered: AtomicU64,
    udp_retried: AtomicU64,
    udp_lost: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> Snapshot {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            new_ok: c(&self.new_ok),
            new_failed: c(&self.new_failed),
            new_timed_out: c(&self.new_timed_out),
            new_refused: c(&self.new_refused),
            new_reset: c(&self.new_reset),
            long_asks: c(&self.long_asks),
            long_failed: c(&self.long_failed),
            udp_answered: c(&self.udp_answered),
            udp_retried: c(&self.udp_retried),
            udp_lost: c(&self.udp_lost),
        }
    }
}

pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let topology = Topology::new("lbsoak", 4)?;
    let _servers = topology.serve_backends("pod-")?;
    let scratch = ScratchDir::new("lb-soak")?;
    scratch.write("web.yaml", &web(true))?;
    scratch.write("churn.yaml", &churn_manifest(0))?;
    let start = |log: &str| {
        Agent::start(
            &topology.node,
            &scratch.0,
            &topology.interface_pattern(),
            Path::new(PIN_DIR),
            &scratch.0.join(log),
            &["--keep-datapath"],
        )
    };
    let mut agent = start("agent-0.log")?;
    agent.wait_for_maps("the services", |m| {
        m.count(&format!("{VIP}:80/TCP")) == Some(4) && m.frontend("198.19.0.20:80/TCP").is_some()
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let vip = |port| SocketAddrV4::new(VIP, port);
    let mut load = Vec::new();
    // Long-lived connections: one question every 20 ms each.
    for _ in 0..LONG_LIVED {
        let (stop, counts) = (stop.clone(), counts.clone());
        load.push(topology.client.spawn(move || {
            let Ok(mut conn) = EchoConnection::open(vip(80)) else {
                counts.long_failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                counts.long_asks.fetch_add(1, Ordering::Relaxed);
                if conn.ask().is_err() {
                    counts.long_failed.fetch_add(1, Ordering::Relaxed);
                    return; // a broken connection stays broken
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // New connections, back to back.
    {
        let (stop, counts) = (stop.clone(), counts.clone());
        load.push(topology.client.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let result = http_get(vip(80));
                if result
                    .as_ref()
                    .is_ok_and(|body| body.starts_with("backend "))
                {
                    counts.new_ok.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                counts.new_failed.fetch_add(1, Ordering::Relaxed);
                use std::io::ErrorKind::*;
                let kind = match result.as_ref().map_err(std::io::Error::kind) {
                    Err(TimedOut | WouldBlock) => Some(&counts.new_timed_out),
                    Err(ConnectionRefused) => Some(&counts.new_refused),
                    Err(ConnectionReset | BrokenPipe) => Some(&counts.new_reset),
                    _ => None, // another error, or a wrong answer
                };
                if let Some(kind) = kind {
                    kind.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // UDP request/response, as a resolver does: up to 3 tries, 200 ms each.
    {
        let (stop, counts) = (stop.clone(), counts.clone());
        load.push(topology.client.spawn(move || {
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                return;
            };
            let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let answered = (0..3).any(|attempt| {
                    if attempt > 0 {
                        counts.udp_retried.fetch_add(1, Ordering::Relaxed);
                    }
                    socket.send_to(b"who", vip(53)).is_ok() && socket.recv_from(&mut buf).is_ok()
                });
                if answered {
                    &counts.udp_answered
                } else {
                    &counts.udp_lost
                }
                .fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }

    std::thread::sleep(Duration::from_secs(2));
    let mut restarts = Vec::new();
    for i in 1..=KILLS + 1 {
        let how = if i <= KILLS {
            "SIGKILL"
        } else {
            "SIGTERM --keep-datapath"
        };
        if i <= KILLS {
            agent.kill()?;
        } else {
            let status = agent.stop()?;
            anyhow::ensure!(status.success(), "agent exited {status}");
        }
        agent.cleanup_pins = false;
        std::thread::sleep(Duration::from_millis(500)); // no agent at all for a while
        let started = Instant::now();
        agent = start(&format!("agent-{i}.log"))?;
        // Ready when it has released the previous run's links (its own
        // are attached and the maps programmed by then).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent
            .log_text()
            .contains("released links pinned by a previous run")
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "agent {i} never took over:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        restarts.push((how, started.elapsed()));
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after_restarts = counts.snapshot();

    // Churn: endpoint changes at CHURN_RATE a second through the manifest
    // directory, while the load above keeps running against `web`, whose
    // three stable endpoints stay (its fourth flips ready / not ready).
    let maps_before = programmed()?;
    let pid = agent.pid().ok_or_else(|| anyhow::anyhow!("agent pid"))?;
    let (rss_before, cpu_before) = crate::bench::process_usage(pid)?;
    let churn_started = Instant::now();
    let mut changes = 0u64;
    let mut peak_rss = rss_before;
    while churn_started.elapsed() < CHURN_TIME {
        let due = churn_started + Duration::from_secs_f64(changes as f64 / CHURN_RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if changes.is_multiple_of(2) {
            scratch.write("web.yaml", &web(changes.is_multiple_of(4)))?;
        } else {
            scratch.write("churn.yaml", &churn_manifest(changes))?;
        }
        changes += 1;
        if changes.is_multiple_of(1000) {
            peak_rss = peak_rss.max(crate::bench::process_usage(pid)?.0);
        }
    }
    let churn_took = churn_started.elapsed();
    let (_, cpu_after) = crate::bench::process_usage(pid)?;
    // Back to the starting content; then the maps must be what they were.
    scratch.write("web.yaml", &web(true))?;
    scratch.write("churn.yaml", &churn_manifest(0))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while programmed()? != maps_before {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the maps did not return to their state before the churn"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (rss_after, _) = crate::bench::process_usage(pid)?;
    let after_churn = counts.snapshot();
    // The agent hands freed heap back on its next rescan (every 30 s).
    std::thread::sleep(Duration::from_secs(33));
    let (rss_settled, _) = crate::bench::process_usage(pid)?;

    // The same churn through the API server: an agent watching it takes
    // over the pins, then EndpointSlices are patched (32 in flight) for
    // CHURN_TIME, as fast as the test API server takes them.
    let api = TestApiServer::start(&topology.node, "lbsoak")?;
    api.with_client(&topology.node, |client| async move {
        apply(client.clone(), web(true)).await?;
        apply(client, churn_manifest(0)).await
    })?;
    agent.kill()?;
    agent.cleanup_pins = false;
    agent = Agent::start_with(
        &topology.node,
        Source::Kubeconfig(&api.kubeconfig),
        &topology.interface_pattern(),
        Path::new(PIN_DIR),
        &scratch.0.join("agent-api.log"),
        &["--keep-datapath"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent
        .log_text()
        .contains("released links pinned by a previous run")
        || programmed()? != maps_before
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the API-mode agent never took over:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_manifest_churn = counts.snapshot();
    let api_pid = agent.pid().ok_or_else(|| anyhow::anyhow!("agent pid"))?;
    let (api_rss_before, api_cpu_before) = crate::bench::process_usage(api_pid)?;
    let slice_of = |yaml: String| -> anyhow::Result<EndpointSlice> {
        let (objects, _) = lb_agent::source::manifest::parse_typed(&yaml, None)?;
        Ok(objects.slices[0].object.clone())
    };
    let web_slices = [slice_of(web(true))?, slice_of(web(false))?];
    let churn_slices = (0..100u64)
        .map(|n| slice_of(churn_manifest(n)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (api_changes, api_took) = api.with_client(&topology.node, move |client| async move {
        let params = PatchParams::apply("lb-soak").force();
        let slices = Api::<EndpointSlice>::namespaced(client, "demo");
        let started = Instant::now();
        let done = futures::stream::iter(0u64..)
            .take_while(|_| futures::future::ready(started.elapsed() < CHURN_TIME))
            .map(|i| {
                let (slices, params) = (&slices, &params);
                let slice = if i.is_multiple_of(2) {
                    &web_slices[(i / 2 % 2) as usize]
                } else {
                    &churn_slices[(i % 100) as usize]
                };
                async move {
                    let name = slice.metadata.name.clone().unwrap_or_default();
                    slices.patch(&name, params, &Patch::Apply(slice)).await
                }
            })
            .buffer_unordered(32)
            .try_fold(0u64, |n, _| futures::future::ready(Ok(n + 1)))
            .await?;
        Ok((done, started.elapsed()))
    })?;
    let (api_rss_peak, api_cpu_after) = crate::bench::process_usage(api_pid)?;
    api.with_client(&topology.node, |client| async move {
        apply(client.clone(), web(true)).await?;
        apply(client, churn_manifest(0)).await
    })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while programmed()? != maps_before {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the maps did not return to their state before the API churn"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let after_api_churn = counts.snapshot();

    // A spoofed SYN flood at the VIP, from 150 addresses on the client's
    // LAN that do not exist (the backends' SYN-ACKs go unanswered), as
    // fast as one sender thread goes, while the load keeps running; the
    // agent has its default conntrack sizes.
    let flood = lb_tests::flood::Flood::syn(
        &topology.client,
        vip(80),
        Ipv4Addr::new(198, 18, 1, 100),
        150,
    );
    let flood_started = Instant::now();
    std::thread::sleep(FLOOD_TIME);
    let flood_sent = flood.stop()?;
    let flood_took = flood_started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after_flood = counts.snapshot();
    let flood_drops = lb_agent::cli::inspect::counters(Path::new(PIN_DIR))?
        .into_iter()
        .find(|(name, _)| *name == "drop_ct_full")
        .map_or(0, |(_, n)| n);
    stop.store(true, Ordering::Relaxed);
    for handle in load {
        let _ = handle.join();
    }
    agent.cleanup_pins = true;
    drop(agent);

    let mut report = String::from("# Restarts and churn under load (`cargo xtask soak`)\n\n");
    let _ = writeln!(
        report,
        "Through {VIP} (3 stable backends) from a client pod: {LONG_LIVED} long-lived TCP connections \
         asking every 20 ms, new TCP connections back to back, UDP request/response (3 tries of \
         200 ms, as a resolver).\n\n\
         1. Restarts: the agent killed with SIGKILL and restarted {KILLS} times, then stopped with \
         SIGTERM (`--keep-datapath`) and started again, with 0.5 s without any agent each time.\n\
         2. Churn: {changes} endpoint changes in {:.1} s ({:.0}/s) through the manifest directory \
         (atomic rewrites): `web`'s fourth endpoint flipping ready / not ready, and one of the 50 \
         endpoints of another Service per write; the load keeps running.\n",
        churn_took.as_secs_f64(),
        changes as f64 / churn_took.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "3. The same churn through the API server (k8s.io/apiserver with etcd, `cargo xtask soak` \
         starts it): an agent watching it took over the pins, then EndpointSlices were patched, 32 \
         in flight, as fast as the test API server took them: {api_changes} changes in {:.1} s \
         ({:.0}/s).\n",
        api_took.as_secs_f64(),
        api_changes as f64 / api_took.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "4. SYN flood: {flood_sent} spoofed SYNs in {:.1} s ({:.0} a second, one sender thread) at \
         {VIP}:80 from 150 addresses on the client's LAN that do not exist, so no handshake \
         completes; the agent has its default conntrack sizes ({} assured, {} new entries). New \
         flows refused for want of conntrack room meanwhile (`drop_ct_full`): {flood_drops}.\n",
        flood_took.as_secs_f64(),
        flood_sent as f64 / flood_took.as_secs_f64(),
        lb_common::ct::DEFAULT_MAX_CT_ENTRIES,
        lb_common::ct::DEFAULT_MAX_CT_NEW_ENTRIES,
    );
    let _ = writeln!(
        report,
        "| what | restarts | churn (manifests) | churn (API server) | SYN flood |\n|---|---|---|---|---|"
    );
    for (what, pick) in Snapshot::ROWS {
        let _ = writeln!(
            report,
            "| {what} | {} | {} | {} | {} |",
            pick(&after_restarts),
            pick(&after_churn) - pick(&after_restarts),
            pick(&after_api_churn) - pick(&after_manifest_churn),
            pick(&after_flood) - pick(&after_api_churn)
        );
    }
    let _ = writeln!(
        report,
        "\nAgent during the churn: {:.0} % of one CPU ({:.2} s CPU in {:.1} s); RSS {rss_before:.1} MiB \
         before, {peak_rss:.1} MiB at most during, {rss_after:.1} MiB 2 s after, {rss_settled:.1} MiB 35 s after. Back on the starting \
         manifests after the churn, the maps serve what they served before it, with as many backend \
         entries.",
        (cpu_after - cpu_before) / churn_took.as_secs_f64() * 100.0,
        cpu_after - cpu_before,
        churn_took.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "\nAgent during the API churn: {:.0} % of one CPU; RSS {api_rss_before:.1} MiB before, \
         {api_rss_peak:.1} MiB at its end. Back on the starting objects, the maps serve what they \
         served before.",
        (api_cpu_after - api_cpu_before) / api_took.as_secs_f64() * 100.0
    );
    let _ = writeln!(
        report,
        "\n| restart | agent start → previous run's links released |\n|---|---|"
    );
    for (how, took) in &restarts {
        let _ = writeln!(report, "| {how} | {:.2} s |", took.as_secs_f64());
    }
    print!("{report}");
    let out = crate::results::publish("soak.md", &report)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}
