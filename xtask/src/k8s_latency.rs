//! `cargo xtask k8s-latency`: at each scale (N services × 10 endpoints), the
//! time from one EndpointSlice change to the agent's map update, the agent's
//! CPU while idle and its memory — through a real API server, and in
//! manifest mode with one file per service. A report, not a test.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};

use crate::bench::{percentile, process_usage};
use aya::maps::{HashMap, MapData};
use lb_agent::{
    datapath::{loader::open_pinned, maps::svc_key},
    model::{L4Addr, Proto},
};
use lb_common::svc::{SvcKey, SvcValue, SVC_MAP};
use lb_tests::{
    apiserver::TestApiServer,
    topology::{backend_ip, web_manifest, Agent, ScratchDir, Source, Topology, VIP},
};

const ENDPOINTS: usize = 10;
const IDLE: Duration = Duration::from_secs(10);

/// One scale's figures.
struct Row {
    mode: &'static str,
    services: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    idle_cpu: f64,
    rss_mib: f64,
    programmed_after: Duration,
    /// The write's own round trip (API server alone: patch sent → answered), p50 / p99.
    source_rtt: Option<(Duration, Duration)>,
    /// A fresh agent started with every object already at the API server:
    /// start → all programmed, and its peak RSS (MiB).
    cold_start: Option<(Duration, f64)>,
}

pub fn run(
    agent_bin: &Path,
    changes: usize,
    scales: &[usize],
    sources: &[String],
) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    for source in sources {
        anyhow::ensure!(
            ["api", "manifests"].contains(&source.as_str()),
            "--sources {source}: expected api or manifests"
        );
    }
    let mut rows = Vec::new();
    for &n in scales {
        if sources.iter().any(|s| s == "api") {
            rows.push(api_mode(n, changes)?);
        }
        if sources.iter().any(|s| s == "manifests") {
            rows.push(manifest_mode(n, changes)?);
        }
    }
    let mut text = format!(
        "# EndpointSlice change → datapath, idle cost, memory\n\n\
         N services × {ENDPOINTS} endpoints (plus the measured `web` service). Latency: {changes} changes of one \
         EndpointSlice (1 ↔ 2 endpoints), from sending it (a server-side-apply patch at lb-apiserver, k8s.io/apiserver + \
         etcd on loopback; or rewriting the service's own file) to the agent's map showing the new count. Idle CPU: the \
         agent's user+system time over {IDLE:?} with nothing changing. Agent: `{}`.\n\n\
         | source | services | programmed after | change → map p50 | p99 | max | of which the write's round trip p50 / p99 | idle CPU | RSS | cold start → programmed | its peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        agent_bin.display()
    );
    for r in &rows {
        let rtt = r.source_rtt.map_or("—".to_string(), |(p50, p99)| {
            format!("{p50:.2?} / {p99:.2?}")
        });
        let (cold, cold_rss) = r.cold_start.map_or(("—".into(), "—".into()), |(t, rss)| {
            (format!("{t:.1?}"), format!("{rss:.0} MiB"))
        });
        let _ = writeln!(
            text,
            "| {} | {} | {:.1?} | {:.2?} | {:.2?} | {:.2?} | {rtt} | {:.2} % | {:.0} MiB | {cold} | {cold_rss} |",
            r.mode,
            r.services,
            r.programmed_after,
            r.p50,
            r.p99,
            r.max,
            r.idle_cpu * 100.0,
            r.rss_mib
        );
    }
    let _ = writeln!(
        text,
        "\nProgrammed after: from the agent's start, while the objects are written (API server: \
         the writes' pace, 32 at a time) or already there (manifests). Cold start: a second agent, on \
         fresh pins, started once every object is at the API server.\n\n\
         Targets: p99 < 10 ms at 10 000 services; RSS < 64 MiB in API mode at 10 000; cold start \
         < 5 s at 100 000."
    );
    crate::results::publish("k8s-latency.md", &text)?;
    println!("{text}");
    Ok(())
}

/// Service `i` of the filler set: its own VIP and endpoints (pod addresses
/// from 198.18.32.0 up, reused past 57 000) on 20 nodes.
fn filler(i: usize) -> String {
    let base = u32::from(Ipv4Addr::new(198, 18, 32, 0));
    let endpoints: Vec<(Ipv4Addr, bool)> = (0..ENDPOINTS)
        .map(|j| {
            (
                Ipv4Addr::from(base + ((i * ENDPOINTS + j) % 57_344) as u32),
                true,
            )
        })
        .collect();
    // Each endpoint on one of 20 nodes, as EndpointSlices say in a cluster.
    let mut node = i * ENDPOINTS;
    let manifest = web_manifest(&endpoints)
        .lines()
        .map(|line| {
            if line.starts_with("- addresses:") {
                node += 1;
                format!("{line}\n  nodeName: node-{}\n", node % 20)
            } else {
                format!("{line}\n")
            }
        })
        .collect::<String>();
    manifest
        .replace("name: web-1", &format!("name: svc{i}-1"))
        .replace("name: web", &format!("name: svc{i}"))
        .replace("service-name: web", &format!("service-name: svc{i}"))
        .replace(
            &VIP.to_string(),
            &format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250),
        )
}

/// Map sizes for `n` services of two ports (a frontend each, eleven slots
/// each) with room to spare: the defaults hold about 12 000.
fn sized(n: usize) -> [String; 4] {
    let slots = ((n + 1) * 2 * 12).next_power_of_two().max(262_144);
    [
        "--max-service-slots".into(),
        slots.to_string(),
        "--max-backends".into(),
        "262144".into(),
    ]
}

fn web(n: usize) -> String {
    web_manifest(
        &(0..n)
            .map(|i| (backend_ip(i), true))
            .collect::<Vec<(Ipv4Addr, bool)>>(),
    )
}

async fn apply(client: Client, yaml: String) -> anyhow::Result<()> {
    let (objects, errors) =
        lb_agent::source::manifest::parse_typed(&yaml, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(errors.is_empty(), "{errors:?}");
    let params = PatchParams::apply("lb-latency").force();
    for s in objects.services {
        let name = s.object.metadata.name.clone().unwrap_or_default();
        Api::<Service>::namespaced(client.clone(), "demo")
            .patch(&name, &params, &Patch::Apply(&s.object))
            .await?;
    }
    for s in objects.slices {
        let name = s.object.metadata.name.clone().unwrap_or_default();
        Api::<EndpointSlice>::namespaced(client.clone(), "demo")
            .patch(&name, &params, &Patch::Apply(&s.object))
            .await?;
    }
    Ok(())
}

/// The map's slot 0 of `web`'s TCP frontend, and a way to read its count.
struct WebCount {
    map: HashMap<MapData, SvcKey, SvcValue>,
    key: SvcKey,
}

impl WebCount {
    fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            map: open_pinned(pin_dir, SVC_MAP)?.try_into()?,
            key: svc_key(
                L4Addr {
                    addr: VIP.into(),
                    port: 80,
                    proto: Proto::Tcp,
                },
                0,
            ),
        })
    }

    fn count(&self) -> u16 {
        self.map.get(&self.key, 0).map(|v| v.count).unwrap_or(0)
    }

    /// Waits for `expected`; the time from `started`.
    fn wait(&self, expected: u16, started: Instant) -> anyhow::Result<Duration> {
        let deadline = started + Duration::from_secs(30);
        while self.count() != expected {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the change never reached the map"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(started.elapsed())
    }
}

/// Waits until the maps hold `n` filler services plus `web` (counting slot-0
/// entries, a batch read at a time), then returns how long that took from
/// `started`.
fn wait_programmed(pin_dir: &Path, n: usize, started: Instant) -> anyhow::Result<Duration> {
    use std::os::fd::AsFd as _;
    let deadline = started + Duration::from_secs(600);
    let map = loop {
        // The agent pins its maps once it has connected and loaded.
        match open_pinned(pin_dir, SVC_MAP) {
            Ok(aya::maps::Map::HashMap(data)) => break data,
            Ok(_) => anyhow::bail!("{SVC_MAP} is not a hash map"),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let want = 2 * (n + 1); // TCP and UDP frontend each
    loop {
        let mut batches =
            lb_agent::datapath::batch::Batches::<SvcKey, SvcValue>::new(map.fd().as_fd());
        let mut frontends = 0;
        while let Some((keys, _)) = batches.next_batch()? {
            frontends += keys.iter().filter(|k| k.slot == 0).count();
        }
        if frontends >= want {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{frontends}/{want} frontends after 10 min"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU share over `IDLE` with nothing changing, and RSS (MiB).
fn idle_usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    std::thread::sleep(Duration::from_secs(2)); // let the last pass finish
    let (_, before) = process_usage(pid)?;
    std::thread::sleep(IDLE);
    let (rss, after) = process_usage(pid)?;
    Ok(((after - before) / IDLE.as_secs_f64(), rss))
}

fn summary(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    (percentile(v, 0.5), percentile(v, 0.99), percentile(v, 1.0))
}

fn api_mode(n: usize, changes: usize) -> anyhow::Result<Row> {
    let topology = Topology::new("lbl", 0)?;
    let api = TestApiServer::start(&topology.node, "lbl")?;
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbl-latency");
    let agent = Agent::start_with(
        &topology.node,
        Source::Kubeconfig(&api.kubeconfig),
        &topology.interface_pattern(),
        &pin_dir,
        &api.dir.0.join("agent.log"),
        &sized(n).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let started = Instant::now();
    api.with_client(&topology.node, |client| async move {
        futures::stream::iter(0..n)
            .map(|i| apply(client.clone(), filler(i)))
            .buffer_unordered(32)
            .try_collect::<Vec<()>>()
            .await?;
        apply(client, web(1)).await
    })?;
    let programmed_after = wait_programmed(&pin_dir, n, started)?;
    let web_count = WebCount::open(&pin_dir)?;
    let pid = agent.pid().context("agent pid")?;
    let (idle_cpu, rss_mib) = idle_usage(pid)?;

    let slices: Vec<EndpointSlice> = [1, 2]
        .iter()
        .map(|k| {
            lb_agent::source::manifest::parse_typed(&web(*k), None)
                .map(|(o, _)| o.slices[0].object.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<_, _>>()?;
    let (mut to_map, mut rtt) = api.with_client(&topology.node, move |client| async move {
        let slices_api = Api::<EndpointSlice>::namespaced(client, "demo");
        let params = PatchParams::apply("lb-latency").force();
        let (mut to_map, mut rtt) = (Vec::new(), Vec::new());
        for i in 0..changes + 10 {
            let slice = &slices[(i + 1) % 2];
            let expected = ((i + 1) % 2 + 1) as u16;
            let started = Instant::now();
            slices_api
                .patch("web-1", &params, &Patch::Apply(slice))
                .await?;
            let acked = started.elapsed();
            let took = web_count.wait(expected, started)?;
            if i >= 10 {
                // The first changes warm up connections and caches.
                to_map.push(took);
                rtt.push(acked);
            }
        }
        Ok((to_map, rtt))
    })?;
    drop(agent); // and its pins
    let cold_start = cold_start(&topology, &api, &pin_dir, n)?;
    let (p50, p99, max) = summary(&mut to_map);
    let (rtt50, rtt99, _) = summary(&mut rtt);
    Ok(Row {
        mode: "API server",
        services: n,
        p50,
        p99,
        max,
        idle_cpu,
        rss_mib,
        programmed_after,
        source_rtt: Some((rtt50, rtt99)),
        cold_start: Some(cold_start),
    })
}

/// A fresh agent on fresh pins, every object already at the API server:
/// start → all programmed, and its peak RSS (MiB).
fn cold_start(
    topology: &Topology,
    api: &TestApiServer,
    pin_dir: &Path,
    n: usize,
) -> anyhow::Result<(Duration, f64)> {
    let started = Instant::now();
    let agent = Agent::start_with(
        &topology.node,
        Source::Kubeconfig(&api.kubeconfig),
        &topology.interface_pattern(),
        pin_dir,
        &api.dir.0.join("agent-cold.log"),
        &sized(n).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let programmed = wait_programmed(pin_dir, n, started)?;
    let pid = agent.pid().context("agent pid")?;
    Ok((programmed, crate::bench::status_kib(pid, "VmHWM")? / 1024.0))
}

fn manifest_mode(n: usize, changes: usize) -> anyhow::Result<Row> {
    let topology = Topology::new("lbl", 0)?;
    let dir = ScratchDir::new("lbl-manifests")?;
    for i in 0..n {
        dir.write(&format!("svc{i}.yaml"), &filler(i))?;
    }
    dir.write("web.yaml", &web(1))?;
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbl-latency");
    let log = std::env::temp_dir().join("lbl-agent.log");
    let started = Instant::now();
    let agent = Agent::start(
        &topology.node,
        &dir.0,
        &topology.interface_pattern(),
        &pin_dir,
        &log,
        &sized(n).iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let programmed_after = wait_programmed(&pin_dir, n, started)?;
    let web_count = WebCount::open(&pin_dir)?;
    let pid = agent.pid().context("agent pid")?;
    let (idle_cpu, rss_mib) = idle_usage(pid)?;
    let mut to_map = Vec::new();
    for i in 0..changes + 10 {
        let expected = (i + 1) % 2 + 1;
        let started = Instant::now();
        // Written whole and renamed into place, as tools that edit manifests do.
        dir.write(".web.yaml.tmp", &web(expected))?;
        std::fs::rename(dir.0.join(".web.yaml.tmp"), dir.0.join("web.yaml"))?;
        let took = web_count.wait(expected as u16, started)?;
        if i >= 10 {
            to_map.push(took);
        }
    }
    drop(agent);
    let (p50, p99, max) = summary(&mut to_map);
    Ok(Row {
        mode: "manifests (a file per service)",
        services: n,
        p50,
        p99,
        max,
        idle_cpu,
        rss_mib,
        programmed_after,
        source_rtt: None,
        cold_start: None,
    })
}
