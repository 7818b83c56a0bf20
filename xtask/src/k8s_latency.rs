//! `cargo xtask k8s-latency`: time from an EndpointSlice write at a real API
//! server to the agent's map update, over many changes (a report, not a test).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::bench::percentile;
use aya::maps::{HashMap, MapData};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use lb_agent::{
    datapath::{loader::open_pinned, maps::svc_key},
    model::{L4Addr, Proto},
};
use lb_common::svc::{SvcKey, SvcValue, SVC_MAP};
use lb_tests::{
    apiserver::TestApiServer,
    topology::{backend_ip, web_manifest, Agent, Source, Topology, VIP},
};

pub fn run(agent_bin: &Path, changes: usize) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let topology = Topology::new("lbl", 0)?;
    let api = TestApiServer::start(&topology.node, "lbl")?;
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbl-latency");
    let mut agent = Agent::start_with(
        &topology.node,
        Source::Kubeconfig(&api.kubeconfig),
        &topology.interface_pattern(),
        &pin_dir,
        &api.dir.0.join("agent.log"),
        &[],
    )?;

    let manifest = |n: usize| {
        web_manifest(
            &(0..n)
                .map(|i| (backend_ip(i), true))
                .collect::<Vec<(Ipv4Addr, bool)>>(),
        )
    };
    let (objects, _) = lb_agent::manifest::parse_typed(&manifest(1), None)?;
    let service = objects.services[0].object.clone();
    api.with_client(&topology.node, |client| async move {
        let params = PatchParams::apply("lb-latency").force();
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client, "demo")
            .patch("web", &params, &Patch::Apply(&service))
            .await?;
        Ok(())
    })?;
    // Slices alternating between 1 and 2 endpoints.
    let slices: Vec<EndpointSlice> = [1, 2]
        .iter()
        .map(|n| {
            lb_agent::manifest::parse_typed(&manifest(*n), None)
                .map(|(o, _)| o.slices[0].object.clone())
        })
        .collect::<Result<_, _>>()?;

    let svc: HashMap<MapData, SvcKey, SvcValue> = {
        agent.wait_for_maps("the service", |m| m.contains(&format!("{VIP}:80/TCP")))?;
        open_pinned(&pin_dir, SVC_MAP)?.try_into()?
    };
    let key = svc_key(
        L4Addr {
            addr: VIP,
            port: 80,
            proto: Proto::Tcp,
        },
        0,
    );

    let (to_map, write_rtt) = api.with_client(&topology.node, move |client| async move {
        let slices_api = Api::<EndpointSlice>::namespaced(client, "demo");
        let params = PatchParams::apply("lb-latency").force();
        let (mut to_map, mut write_rtt) = (Vec::new(), Vec::new());
        for i in 0..changes + 10 {
            let slice = &slices[(i + 1) % 2];
            let expected = ((i + 1) % 2 + 1) as u16;
            let started = Instant::now();
            slices_api
                .patch("web-1", &params, &Patch::Apply(slice))
                .await?;
            let acked = started.elapsed();
            let deadline = started + Duration::from_secs(10);
            while svc.get(&key, 0).map(|v| v.count).unwrap_or(0) != expected {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "change {i} never reached the map"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
            if i >= 10 {
                // The first changes warm up connections and caches.
                to_map.push(started.elapsed());
                write_rtt.push(acked);
            }
        }
        Ok((to_map, write_rtt))
    })?;
    drop(agent);

    let report = |mut v: Vec<Duration>| {
        v.sort();
        (
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            percentile(&v, 1.0),
        )
    };
    let (p50, p99, max) = report(to_map);
    let (w50, w99, _) = report(write_rtt);
    let text = format!(
        "# EndpointSlice change → datapath\n\n{changes} server-side-apply patches of one EndpointSlice (1 ↔ 2 endpoints) at lb-apiserver \
         (k8s.io/apiserver + etcd, loopback), measured from sending the patch to the agent's map showing the new count.\n\n\
         | measure | p50 | p99 | max |\n|---|---|---|---|\n| patch sent → map updated | {p50:.2?} | {p99:.2?} | {max:.2?} |\n\
         | patch round trip (API server alone) | {w50:.2?} | {w99:.2?} | |\n\nAgent: `{}`. Target: p99 < 20 ms.\n",
        agent_bin.display()
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("k8s-latency.md"), &text).context("writing the report")?;
    println!("{text}");
    Ok(())
}
