//! The agent against a real API server (k8s.io/apiserver + etcd, on the node
//! namespace's loopback): objects written through the API reach the datapath
//! and real traffic; updates, deletes, API-server restarts, compaction (410 →
//! relist) and a burst of 1 000 services converge.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Instant,
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Service;
use kube::{api::DeleteParams, Api};
use lb_tests::{
    apiserver::{apply, TestApiServer},
    netns::NetNs,
    require_root,
    servers::http_get,
    topology::{backend_ip, web_manifest, Agent, Source, Topology, VIP},
};

struct Cluster {
    agent: Agent,
    api: TestApiServer,
    topology: Topology,
}

fn start(prefix: &str, backends: usize) -> Cluster {
    start_with(prefix, backends, &[])
}

fn start_with(prefix: &str, backends: usize, extra: &[&str]) -> Cluster {
    require_root();
    let topology = Topology::new(prefix, backends).expect("topology");
    let api = TestApiServer::start(&topology.node, prefix).expect("API server");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{prefix}-test"));
    let log = api.dir.0.join("agent.log");
    let agent = Agent::start_with(
        &topology.node,
        Source::Kubeconfig(&api.kubeconfig),
        &topology.interface_pattern(),
        &pin_dir,
        &log,
        &[&["--health-addr", "127.0.0.1:10256"], extra].concat(),
    )
    .expect("agent");
    Cluster {
        agent,
        api,
        topology,
    }
}

impl Cluster {
    fn apply(&self, yaml: &str) {
        let yaml = yaml.to_owned();
        self.api
            .with_client(&self.topology.node, |c| apply(c, yaml))
            .expect("apply");
    }

    fn delete_service(&self, name: &str) {
        let name = name.to_owned();
        self.api
            .with_client(&self.topology.node, |c| async move {
                Api::<Service>::namespaced(c, "demo")
                    .delete(&name, &DeleteParams::default())
                    .await?;
                Ok(())
            })
            .expect("delete");
    }
}

fn ready(n: usize) -> Vec<(Ipv4Addr, bool)> {
    (0..n).map(|i| (backend_ip(i), true)).collect()
}

fn healthz(node: &NetNs) -> String {
    node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:10256").ok()?;
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out.lines().next().unwrap_or_default().to_owned())
    })
    .unwrap_or_default()
}

#[test]
fn api_objects_are_programmed_updated_and_deleted() {
    let mut c = start("lbk1", 3);
    let _servers = c.topology.serve_backends("be").unwrap();
    c.apply(&web_manifest(&ready(3)));
    // Another proxy's service is filtered out by the label selector.
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: theirs\n  namespace: demo\n  labels: {service.kubernetes.io/service-proxy-name: other}\n\
         spec:\n  clusterIP: 198.19.0.99\n  ports: [{port: 80}]\n",
    );
    let maps = c
        .agent
        .wait_for_maps("3 backends from the API", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(3)
        })
        .unwrap();
    assert!(
        !maps.has_address("198.19.0.99".parse::<std::net::Ipv4Addr>().unwrap()),
        "{}",
        maps.text
    );
    assert!(
        healthz(&c.topology.node).contains("200"),
        "healthy after the first sync"
    );
    let body = c
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("traffic through the VIP");
    assert!(body.starts_with("backend be"), "{body}");

    c.apply(&web_manifest(&ready(1)));
    c.agent
        .wait_for_maps("scaled down to 1", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    c.apply(&web_manifest(&ready(2)));
    c.agent
        .wait_for_maps("scaled up to 2", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();

    // The service's port changes: the old frontend goes, the new one serves.
    c.apply(&web_manifest(&ready(2)).replace("port: 80,", "port: 8081,"));
    let maps = c
        .agent
        .wait_for_maps("port 80 → 8081", |m| {
            m.count(&format!("{VIP}:8081/TCP")) == Some(2)
                && m.frontend(&format!("{VIP}:80/TCP")).is_none()
        })
        .unwrap();
    assert!(
        maps.frontend(&format!("{VIP}:53/UDP")).is_some(),
        "{}",
        maps.text
    );
    c.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 8081)))
        .expect("new port serves");

    c.delete_service("web");
    c.agent
        .wait_for_maps("service deleted", |m| !m.has_address(VIP))
        .unwrap();
}

#[test]
fn apiserver_restart_and_compaction_force_a_relist() {
    let mut c = start("lbk2", 2);
    let _servers = c.topology.serve_backends("be").unwrap();
    c.apply(&web_manifest(&ready(2)));
    c.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();

    // The agent's API server goes down; the datapath keeps serving.
    c.api.stop_apiserver();
    c.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("served with the API server down");

    // Meanwhile the world changes through another API server on the same etcd,
    // and etcd compacts its history: the agent's resourceVersion is gone.
    let (web, other) = (
        web_manifest(&ready(1)),
        web_manifest(&ready(1))
            .replace("name: web", "name: other")
            .replace("198.19.0.10", "198.19.0.20"),
    );
    c.api
        .with_side_server(&c.topology.node, |client| async move {
            apply(client.clone(), web).await?;
            apply(client, other).await
        })
        .expect("changes while the agent's server is down");
    c.api.compact(&c.topology.node).expect("compact");
    c.api
        .start_apiserver(&c.topology.node)
        .expect("API server back");

    // Resuming the watch gets 410 Expired; the watcher re-lists and the agent converges.
    let maps = c
        .agent
        .wait_for_maps("state after relist", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1) && m.count("198.19.0.20:80/TCP") == Some(1)
        })
        .unwrap();
    assert_eq!(
        maps.backends(&format!("{VIP}:80/TCP")),
        ["198.18.10.2".parse::<std::net::Ipv4Addr>().unwrap()],
        "{}",
        maps.text
    );
    let log = c.agent.log_text();
    assert!(
        log.contains("Expired"),
        "the agent's watch expired and re-listed:\n{log}"
    );
}

#[test]
fn a_burst_of_1000_services_is_programmed() {
    let mut c = start("lbk3", 1);
    let started = Instant::now();
    c.api
        .with_client(&c.topology.node, |client| async move {
            futures::stream::iter(0..1000u32)
                .map(|i| {
                    let yaml = web_manifest(&[(backend_ip(0), true)])
                        .replace("name: web-1", &format!("name: svc{i}-1"))
                        .replace("name: web", &format!("name: svc{i}"))
                        .replace("service-name: web", &format!("service-name: svc{i}"))
                        .replace(
                            "198.19.0.10",
                            &format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250),
                        );
                    apply(client.clone(), yaml)
                })
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await?;
            Ok(())
        })
        .expect("create 1000 services");
    let created = started.elapsed();
    let maps = c
        .agent
        .wait_for_maps("2000 frontends", |m| {
            m.frontends.iter().filter(|f| f.backends.len() == 1).count() == 2000
        })
        .unwrap();
    eprintln!(
        "1000 services (2000 frontends): created in {created:?}, programmed after {:?}",
        started.elapsed()
    );
    // `maps` was read while the agent was still writing: a hash map walked
    // during inserts may miss entries. Now that all are programmed, a fresh
    // read must be complete and consistent.
    drop(maps);
    let maps = lb_tests::maps::Maps::read(&c.agent.pin_dir).unwrap();
    assert_eq!(maps.frontends.len(), 2000, "{}", maps.text);
    for f in &maps.frontends {
        // Each slot names a backend the backends map holds, and the frontend
        // its own Service.
        assert_eq!(f.backends.len(), 1, "{}: {:?}", f.frontend, f.backends);
        assert!(
            f.backends[0].address.is_some(),
            "{}: backend missing",
            f.frontend
        );
        assert!(f.service.is_some(), "{}: reverse NAT missing", f.frontend);
    }
}

/// The kubernetes-mixin "Proxy" dashboard, pointed at the agent (a scrape
/// job named `kube-proxy` on its 10249), finds every series its queries
/// read: the sync and network programming histograms under kube-proxy's
/// names, client-go's request metrics by code and verb, the process
/// collector's memory and CPU. Network programming counts from the
/// EndpointSlice's trigger time, as kube-proxy does: a change stamped 3 s
/// before it was written shows at least 3 s.
#[test]
fn the_kube_proxy_dashboards_series_are_served() {
    let began = Instant::now();
    let mut c = start("lbk4", 2);
    c.apply(&web_manifest(&ready(1)));
    c.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    // Trigger times from before the agent started are not counted (as in
    // kube-proxy): stamp one from after.
    std::thread::sleep(
        (began + std::time::Duration::from_secs(5)).saturating_duration_since(Instant::now()),
    );
    let stamped = std::time::SystemTime::now() - std::time::Duration::from_secs(3);
    let trigger = k8s_openapi::jiff::Timestamp::try_from(stamped).unwrap();
    c.apply(&web_manifest(&ready(2)).replace(
        "  labels: {kubernetes.io/service-name: web}\n",
        &format!(
            "  labels: {{kubernetes.io/service-name: web}}\n  annotations: \
             {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}\n"
        ),
    ));
    c.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
    let programming = "kubeproxy_network_programming_duration_seconds";
    let scrape = lb_tests::metrics::scrape_until(&c.topology.node, metrics, |s| {
        s.samples.get(&format!("{programming}_count")) == Some(&1.0)
    });
    assert_eq!(
        scrape.get(&format!("{programming}_count")),
        1.0,
        "one stamped change"
    );
    let seconds = scrape.get(&format!("{programming}_sum"));
    assert!(
        (3.0..30.0).contains(&seconds),
        "from the trigger time: {seconds}"
    );
    // Each series a panel's query reads (their selectors aside).
    let has = |prefix: &str| scrape.samples.keys().any(|k| k.starts_with(prefix));
    for series in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_bucket{",
        "rest_client_requests_total{code=\"200\",",
        "rest_client_request_duration_seconds_bucket{",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(has(series), "{series} missing");
    }
    assert!(
        scrape.samples.keys().any(|k| k
            .starts_with("rest_client_request_duration_seconds_bucket{")
            && k.contains("verb=\"GET\"")),
        "GET latency, the dashboard's last panel"
    );
    assert!(scrape.get("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2.0);
}

/// `explain` on a node in API mode (`--kubeconfig`, as `run`) answers the
/// names the datapath does not hold — a headless Service's ready pods, an
/// ExternalName's alias — from the API server, as it does from manifests.
#[test]
fn explain_answers_headless_and_external_names_from_the_api_server() {
    let mut c = start("lbk5", 1);
    c.apply(&web_manifest(&ready(1)));
    c.apply(lb_tests::topology::HEADLESS_AND_EXTERNAL_NAME);
    c.agent
        .wait_for_maps("the web service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let explain = |name: &str| -> serde_json::Value {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", c.topology.node.path().display()))
            .arg(lb_tests::topology::agent_binary())
            .args(["explain", name, "--json", "--kubeconfig"])
            .arg(&c.api.kubeconfig)
            .arg("--pin-dir")
            .arg(&c.agent.pin_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let db = explain("db.demo");
    assert_eq!(
        db["dns"]["records"],
        serde_json::json!([{"type": "A", "value": "198.18.2.7"}]),
        "{db:#}"
    );
    let mail = explain("mail.demo");
    assert_eq!(
        mail["dns"]["records"],
        serde_json::json!([{"type": "CNAME", "value": "mail.example.org"}])
    );
    let web = explain("web.demo:80");
    assert_eq!(
        web["frontends"].as_array().map(Vec::len),
        Some(1),
        "{web:#}"
    );
}

/// KEP-3836: while this node is tainted for deletion by the cluster
/// autoscaler, `/healthz` fails (`nodeEligible: false`) so cloud load
/// balancers drain it first; `/livez` stays up and the datapath keeps
/// serving. Untainted, `/healthz` is healthy again.
#[test]
fn healthz_fails_while_the_node_is_tainted_for_deletion_and_livez_stays_up() {
    let mut c = start_with("lbk6", 1, &["--node-name", "lbk6-node"]);
    let _servers = c.topology.serve_backends("be").unwrap();
    let node = |taints: &str| {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: lbk6-node}}\nspec: {{taints: [{taints}]}}\n")
    };
    c.apply(&node(""));
    c.apply(&web_manifest(&ready(1)));
    c.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let ns = &c.topology.node;
    let health = "127.0.0.1:10256";
    let status = |path| lb_tests::servers::wait_for_status(ns, health, path, 200);
    assert_eq!(status("/healthz"), Ok(()), "an eligible node");

    c.apply(&node(
        "{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}",
    ));
    assert_eq!(
        lb_tests::servers::wait_for_status(ns, health, "/healthz", 503),
        Ok(()),
        "tainted for deletion\n{}",
        c.agent.log_text()
    );
    assert_eq!(
        lb_tests::servers::get_status(ns, health, "/livez").ok(),
        Some(200)
    );
    let body = c
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("still served");
    assert!(body.starts_with("backend be0"), "{body}");

    c.apply(&node(""));
    assert_eq!(status("/healthz"), Ok(()), "untainted");
}
