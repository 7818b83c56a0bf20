//! End to end on two nodes (`lb_tests::cluster`): NodePort, LoadBalancer
//! and external IPs reached by real TCP/UDP clients outside the cluster,
//! the traffic policies, and bad input. Named after the upstream
//! `[sig-network] Services` e2e cases they mirror.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use lb_tests::{
    cluster::{web_service, Cluster, CLIENT_IPS, NODE_IPS, NODE_NAMES, POD_IPS},
    require_root,
    servers::{http_get, http_get_from, udp_query, BackendServers},
    topology::Agent,
    wait_until,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);

/// Service `shop/web` (TCP 80 → 8080, UDP 53 → 5353; node ports 30080 and
/// 30053 where the type has them) and its slice: `pod-a` on node-a and
/// `pod-b` on node-b, or the pods listed in `pods` (indexes).
fn web(type_: &str, spec: &str, status: &str, pods: &[usize]) -> String {
    let endpoints: Vec<(Ipv4Addr, &str)> =
        pods.iter().map(|i| (POD_IPS[*i], NODE_NAMES[*i])).collect();
    web_service(type_, CLUSTER_IP, spec, status, &endpoints)
}

/// `backend NAME client IP:PORT` → (NAME, IP).
fn parse_answer(body: &str) -> (String, Ipv4Addr) {
    let words: Vec<&str> = body.split_whitespace().collect();
    assert!(
        words.len() == 4 && words[0] == "backend" && words[2] == "client",
        "unexpected answer {body:?}"
    );
    let ip = words[3]
        .rsplit_once(':')
        .and_then(|(ip, _)| ip.parse().ok())
        .unwrap_or_else(|| panic!("no client address in {body:?}"));
    (words[1].to_owned(), ip)
}

/// `n` HTTP requests from client `c` to `addr`: each answer's (backend, client address seen).
fn requests(cluster: &Cluster, c: usize, addr: SocketAddrV4, n: usize) -> Vec<(String, Ipv4Addr)> {
    cluster.clients[c].run(|| {
        (0..n)
            .map(|i| {
                let body = http_get(addr)
                    .unwrap_or_else(|e| panic!("request {i} to {addr} from client {c}: {e}"));
                parse_answer(&body)
            })
            .collect()
    })
}

fn node_port(node: usize, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IPS[node], port)
}

/// The connection attempt fails (refused, or dropped until the timeout).
fn unreachable(cluster: &Cluster, c: usize, addr: SocketAddrV4) -> bool {
    cluster.clients[c].run(|| http_get(addr).is_err())
}

#[test]
fn should_be_able_to_create_a_functioning_nodeport_service() {
    require_root();
    let mut cluster = Cluster::new("np1", &web("NodePort", "", "", &[0, 1])).unwrap();
    cluster
        .wait_for_maps("the node ports", |m| {
            m.port_count("30080/TCP") == Some(2) && m.port_count("30053/UDP") == Some(2)
        })
        .unwrap();
    for node in [0usize, 1] {
        let answers = requests(&cluster, 0, node_port(node, 30080), 40);
        for (backend, seen) in &answers {
            // externalTrafficPolicy Cluster: the node's own pod sees the
            // client; the other node's pod sees this node (SNAT), so its
            // answer comes back through this node.
            let local = if node == 0 { "pod-a" } else { "pod-b" };
            let expected = if backend == local {
                CLIENT_IPS[0]
            } else {
                NODE_IPS[node]
            };
            assert_eq!(*seen, expected, "{backend} via node {node}");
        }
        for pod in ["pod-a", "pod-b"] {
            assert!(
                answers.iter().any(|(b, _)| b == pod),
                "{pod} never answered through node {node}: {answers:?}"
            );
        }
        // UDP: every answer comes from the node port the client asked.
        let answers: Vec<(String, std::net::SocketAddr)> = cluster.clients[0].run(|| {
            (0..30)
                .map(|_| udp_query(node_port(node, 30053)).expect("UDP answer"))
                .collect()
        });
        for pod in ["pod-a", "pod-b"] {
            assert!(
                answers.iter().any(|(a, _)| a.starts_with(pod)),
                "{pod} never answered UDP through node {node}"
            );
        }
        assert!(answers
            .iter()
            .all(|(_, from)| *from == node_port(node, 30053).into()));
    }
}

#[test]
fn should_preserve_source_ip_for_etp_local() {
    require_root();
    let mut cluster = Cluster::new(
        "np2",
        &web("NodePort", "externalTrafficPolicy: Local", "", &[0, 1]),
    )
    .unwrap();
    cluster
        .wait_for_maps("the node ports", |m| {
            m.port_local("30080/TCP") == Some((2, 1))
        })
        .unwrap();
    for (node, pod) in [(0, "pod-a"), (1, "pod-b")] {
        for (backend, seen) in requests(&cluster, 1, node_port(node, 30080), 20) {
            assert_eq!(backend, pod, "only the node's own endpoint");
            assert_eq!(seen, CLIENT_IPS[1], "the client's own address");
        }
    }
    // Pods still reach the cluster IP on every endpoint.
    let seen: Vec<String> = cluster.client_pods[0].run(|| {
        (0..30)
            .map(|_| parse_answer(&http_get(SocketAddrV4::new(CLUSTER_IP, 80)).unwrap()).0)
            .collect()
    });
    assert!(seen.iter().any(|b| b == "pod-b") && seen.iter().any(|b| b == "pod-a"));

    // Node-b loses its endpoint: its node port drops external traffic,
    // node-a's still serves.
    cluster
        .set_manifest(&web("NodePort", "externalTrafficPolicy: Local", "", &[0]))
        .unwrap();
    cluster
        .wait_for_maps("one endpoint", |m| m.port_count("30080/TCP") == Some(1))
        .unwrap();
    assert!(unreachable(&cluster, 1, node_port(1, 30080)));
    for (backend, _) in requests(&cluster, 1, node_port(0, 30080), 5) {
        assert_eq!(backend, "pod-a");
    }
}

#[test]
fn should_be_able_to_change_the_type_from_clusterip_to_nodeport() {
    require_root();
    let mut cluster = Cluster::new("np3", &web("ClusterIP", "", "", &[0, 1])).unwrap();
    cluster
        .wait_for_maps("the cluster IP", |m| m.port_count("80/TCP") == Some(2))
        .unwrap();
    assert!(
        unreachable(&cluster, 0, node_port(0, 30080)),
        "no node port yet"
    );

    cluster
        .set_manifest(&web("NodePort", "", "", &[0, 1]))
        .unwrap();
    cluster
        .wait_for_maps("the node port", |m| m.port_count("30080/TCP") == Some(2))
        .unwrap();
    assert_eq!(requests(&cluster, 0, node_port(0, 30080), 3).len(), 3);

    // The node port moves: the old one stops, the new one serves.
    cluster
        .set_manifest(
            &web("NodePort", "", "", &[0, 1]).replace("nodePort: 30080", "nodePort: 30081"),
        )
        .unwrap();
    cluster
        .wait_for_maps("the new node port", |m| {
            m.port_count("30081/TCP") == Some(2) && m.on_port("30080/TCP").next().is_none()
        })
        .unwrap();
    assert_eq!(requests(&cluster, 0, node_port(1, 30081), 3).len(), 3);
    assert!(unreachable(&cluster, 0, node_port(1, 30080)));

    // And back (upstream: "should be able to change the type from NodePort to ClusterIP").
    cluster
        .set_manifest(&web("ClusterIP", "", "", &[0, 1]))
        .unwrap();
    cluster
        .wait_for_maps("no node port", |m| {
            m.on_port("30080/TCP")
                .chain(m.on_port("30053/UDP"))
                .next()
                .is_none()
        })
        .unwrap();
    assert!(unreachable(&cluster, 0, node_port(0, 30080)));
}

#[test]
fn should_be_able_to_create_loadbalancer_service_without_nodeport_and_change_it() {
    require_root();
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}");
    let spec = format!("allocateLoadBalancerNodePorts: false\n  externalIPs: [\"{EXTERNAL_IP}\"]");
    let yaml = web("LoadBalancer", &spec, &status, &[0, 1]).replace(", nodePort: 30080", "");
    let mut cluster = Cluster::new("np4", &yaml).unwrap();
    cluster
        .wait_for_maps("the load balancer IP", |m| {
            m.count(&format!("{LB_IP}:80/TCP")) == Some(2)
                && m.count(&format!("{EXTERNAL_IP}:80/TCP")) == Some(2)
        })
        .unwrap();
    // The clients route 198.19.0.0/16 to node-a, as a load balancer would.
    for addr in [LB_IP, EXTERNAL_IP] {
        let answers = requests(&cluster, 0, SocketAddrV4::new(addr, 80), 30);
        for pod in ["pod-a", "pod-b"] {
            assert!(answers.iter().any(|(b, _)| b == pod), "{pod} via {addr}");
        }
    }
    assert!(
        unreachable(&cluster, 0, node_port(0, 30080)),
        "no node port allocated"
    );

    // The Service gets its node port.
    cluster
        .set_manifest(&web("LoadBalancer", "", &status, &[0, 1]))
        .unwrap();
    cluster
        .wait_for_maps("the node port", |m| m.port_count("30080/TCP") == Some(2))
        .unwrap();
    assert_eq!(requests(&cluster, 0, node_port(1, 30080), 3).len(), 3);
    assert!(
        wait_until(std::time::Duration::from_secs(5), || unreachable(
            &cluster,
            0,
            SocketAddrV4::new(EXTERNAL_IP, 80)
        )),
        "the external IP was removed"
    );
}

/// Maglev's promise across nodes: whichever node a flow's packets reach
/// (an ECMP router may move it), they pick the same backend. The clients'
/// route to the load balancer IP moves from node-a to node-b between two
/// rounds of the same flows. (With `random`, the nodes' local-first slot
/// orders make them disagree on every flow here: verified.)
#[test]
fn maglev_nodes_agree_on_the_backend_of_each_flow_to_a_load_balancer_ip() {
    require_root();
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}");
    let mut cluster = Cluster::without_agents("np13").unwrap();
    cluster
        .start_agents(
            &web("LoadBalancer", "", &status, &[0, 1]),
            &["--lb-algorithm", "maglev"],
        )
        .unwrap();
    cluster
        .wait_for_maps("the load balancer IP and its Maglev table", |m| {
            m.count(&format!("{LB_IP}:80/TCP")) == Some(2)
                && m.frontend(&format!("{LB_IP}:80/TCP"))
                    .unwrap()
                    .maglev_table_size
                    .is_some()
        })
        .unwrap();
    let round = |cluster: &Cluster| -> Vec<String> {
        cluster.clients[0].run(|| {
            (0..24)
                .map(|i| {
                    let from = SocketAddrV4::new(CLIENT_IPS[0], 33_000 + i);
                    let body = http_get_from(from, SocketAddrV4::new(LB_IP, 80))
                        .unwrap_or_else(|e| panic!("flow from {from}: {e}"));
                    parse_answer(&body).0
                })
                .collect()
        })
    };
    let via_a = round(&cluster);
    for pod in ["pod-a", "pod-b"] {
        assert!(via_a.iter().any(|b| b == pod), "{pod}: {via_a:?}");
    }
    cluster.clients[0]
        .ip(&[
            "route",
            "replace",
            "198.19.0.0/16",
            "via",
            &NODE_IPS[1].to_string(),
        ])
        .unwrap();
    let via_b = round(&cluster);
    assert_eq!(
        via_a, via_b,
        "each flow's backend, via node-a and via node-b"
    );
}

/// A hostNetwork endpoint (a backend at a node's own address, as the
/// `kubernetes` Service on a control-plane node) behind a node port.
/// Through node-a, its own node: the DNATed flow is delivered locally and
/// the answer leaves by the uplink, whose egress program reverse-NATs it.
/// Through node-b: SNATed to node-b and routed to node-a.
#[test]
fn should_reach_a_host_network_endpoint_through_a_node_port() {
    require_root();
    let mut cluster = Cluster::without_agents("np14").unwrap();
    let _host = BackendServers::start(&cluster.nodes[0], "host-a", 8080, 5353).unwrap();
    let endpoints = [(NODE_IPS[0], NODE_NAMES[0])];
    cluster
        .start_agents(
            &web_service("NodePort", CLUSTER_IP, "", "", &endpoints),
            &[],
        )
        .unwrap();
    cluster
        .wait_for_maps("the node port", |m| m.port_count("30080/TCP") == Some(1))
        .unwrap();
    for node in [0, 1] {
        let answers = requests(&cluster, 0, node_port(node, 30080), 3);
        assert!(
            answers.iter().all(|(b, _)| b == "host-a"),
            "via node {node}: {answers:?}"
        );
        let (answer, from) = cluster.clients[0]
            .run(|| udp_query(node_port(node, 30053)))
            .unwrap_or_else(|e| panic!("UDP via node {node}: {e}"));
        assert!(answer.starts_with("host-a "), "{answer}");
        assert_eq!(
            from,
            node_port(node, 30053).into(),
            "answered from the node port"
        );
    }
    // The local case is the one a missing egress hook on the uplink would break.
    let (_, seen) = requests(&cluster, 0, node_port(0, 30080), 1)[0].clone();
    assert_eq!(seen, CLIENT_IPS[0], "node-a delivers locally, without SNAT");
}

/// An ICMP error the client raises about a reply of an external, SNATed
/// flow — port unreachable, its socket is gone — reaches the backend in
/// the backend's terms: node-a's uplink finds the flow from the quoted
/// reply, rewrites the outer and the quoted headers to the SNATed tuple and
/// routes the error to the pod on node-b, whose connected socket then
/// reports ECONNREFUSED (it would time out if the error were lost).
#[test]
fn an_icmp_error_from_the_client_reaches_a_snated_backend() {
    require_root();
    // The UDP port's target is 5354, where this test's own socket answers.
    let yaml = web("NodePort", "", "", &[1])
        .replace("targetPort: 5353", "targetPort: 5354")
        .replace("port: 5353, protocol: UDP", "port: 5354, protocol: UDP");
    let mut cluster = Cluster::new("np12", &yaml).unwrap();
    cluster
        .wait_for_maps("the UDP node port", |m| {
            m.port_count("30053/UDP") == Some(1)
        })
        .unwrap();
    let timeout = Some(std::time::Duration::from_secs(2));
    let backend = cluster.pods[1]
        .run(|| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5354)))
        .unwrap();
    backend.set_read_timeout(timeout).unwrap();
    let client = cluster.clients[0]
        .run(|| std::net::UdpSocket::bind((CLIENT_IPS[0], 0)))
        .unwrap();
    client.send_to(b"question", node_port(0, 30053)).unwrap();
    let mut buf = [0u8; 64];
    let (_, peer) = backend.recv_from(&mut buf).expect("the question");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(NODE_IPS[0]),
        "SNATed to node-a"
    );
    backend.connect(peer).unwrap();
    // The client gives up: its kernel answers port unreachable.
    drop(client);
    // A process another test thread forks at this moment holds a copy of
    // the client's socket until it execs: an answer in that window still
    // finds the socket. So the answer is repeated (a few times, well within
    // the kernel's ICMP rate limit); a lost translation loses every error.
    let mut errors = Vec::new();
    for _ in 0..3 {
        backend.send(b"late answer").unwrap();
        let err = backend
            .recv(&mut buf)
            .expect_err("only the client could answer, and its socket is gone");
        if err.kind() == std::io::ErrorKind::ConnectionRefused {
            return;
        }
        errors.push(err.kind());
    }
    panic!("no port unreachable reached the backend: {errors:?}");
}

/// The reverse: the backend on node-b has no socket on the target port and
/// answers the SNATed datagram with port unreachable, to node-a's SNAT
/// address. node-a's uplink translates it to come from the node port (its
/// own address, a martian to its input path) and routes it to the client,
/// whose connected socket reports ECONNREFUSED — as it would talking to the
/// pod directly — instead of waiting out its timeout.
#[test]
fn a_port_unreachable_from_a_remote_backend_reaches_the_client_of_a_node_port() {
    require_root();
    // Nothing listens on UDP 5354 in pod-b.
    let yaml = web("NodePort", "", "", &[1])
        .replace("targetPort: 5353", "targetPort: 5354")
        .replace("port: 5353, protocol: UDP", "port: 5354, protocol: UDP");
    let mut cluster = Cluster::new("np13", &yaml).unwrap();
    cluster
        .wait_for_maps("the UDP node port", |m| {
            m.port_count("30053/UDP") == Some(1)
        })
        .unwrap();
    let client = cluster.clients[0]
        .run(|| std::net::UdpSocket::bind((CLIENT_IPS[0], 0)))
        .unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    client.connect(node_port(0, 30053)).unwrap();
    let mut buf = [0u8; 64];
    client.send(b"question").unwrap();
    let err = client
        .recv(&mut buf)
        .expect_err("nothing answers on the pod's port");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the pod's port unreachable reached the client"
    );
    assert!(counter(&cluster, 0, "icmp_translated") >= 1);
}

/// Node ports are served on the external interface's addresses as they
/// are now: an address added to node-a's uplink serves the node port (a
/// real connection), and once removed its frontend leaves the maps; the
/// agent follows the kernel's address (and route) events, no restart.
#[test]
fn node_ports_follow_the_addresses_of_the_external_interface() {
    require_root();
    let mut cluster = Cluster::new("np16", &web("NodePort", "", "", &[0, 1])).unwrap();
    let added = Ipv4Addr::new(198, 18, 0, 12);
    let frontend = format!("{added}:30080/TCP");
    cluster.agents[0]
        .wait_for_maps("the node port", |m| m.port_count("30080/TCP") == Some(2))
        .unwrap();
    assert!(
        !lb_agent::cli::inspect::services(&cluster.agents[0].pin_dir)
            .unwrap()
            .contains(&frontend),
        "not a node address yet"
    );
    let address = format!("{added}/24");
    cluster.nodes[0]
        .ip(&["addr", "add", &address, "dev", "eth0"])
        .unwrap();
    cluster.agents[0]
        .wait_for_maps("the node port on the added address", |m| {
            m.count(&frontend) == Some(2)
        })
        .unwrap();
    let answers = requests(&cluster, 0, SocketAddrV4::new(added, 30080), 4);
    assert_eq!(answers.len(), 4);
    cluster.nodes[0]
        .ip(&["addr", "del", &address, "dev", "eth0"])
        .unwrap();
    cluster.agents[0]
        .wait_for_maps("the node port off the removed address", |m| {
            m.frontend(&frontend).is_none()
                && m.frontend(&format!("{}:30080/TCP", NODE_IPS[0])).is_some()
        })
        .unwrap();
}

#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() {
    require_root();
    let mut cluster = Cluster::new(
        "np5",
        &web("ClusterIP", "internalTrafficPolicy: Local", "", &[0, 1]),
    )
    .unwrap();
    cluster
        .wait_for_maps("the cluster IP", |m| m.port_local("80/TCP") == Some((2, 1)))
        .unwrap();
    let vip = SocketAddrV4::new(CLUSTER_IP, 80);
    for (i, pod) in [(0, "pod-a"), (1, "pod-b")] {
        let seen: Vec<String> = cluster.client_pods[i].run(|| {
            (0..20)
                .map(|_| parse_answer(&http_get(vip).unwrap()).0)
                .collect()
        });
        assert!(seen.iter().all(|b| b == pod), "{pod}'s node: {seen:?}");
    }
    // No local endpoint on node-a: its pods' connections are dropped.
    cluster
        .set_manifest(&web("ClusterIP", "internalTrafficPolicy: Local", "", &[1]))
        .unwrap();
    cluster
        .wait_for_maps("one endpoint", |m| m.port_count("80/TCP") == Some(1))
        .unwrap();
    assert!(cluster.client_pods[0].run(|| http_get(vip).is_err()));
    assert!(cluster.client_pods[1].run(|| http_get(vip).is_ok()));
}

#[test]
fn two_services_claiming_one_node_port_leave_the_first_serving() {
    require_root();
    let first = web("NodePort", "", "", &[0, 1]).replacen(
        "namespace: shop}",
        "namespace: shop, creationTimestamp: \"2026-01-01T00:00:00Z\"}",
        1,
    );
    let second = r#"apiVersion: v1
kind: Service
metadata: {name: aaa-later, namespace: shop, creationTimestamp: "2026-06-01T00:00:00Z"}
spec:
  type: NodePort
  clusterIP: 198.19.0.20
  ports:
  - {name: http, port: 80, nodePort: 30080, protocol: TCP}
"#;
    let yaml = format!("{first}---\n{second}");
    let mut cluster = Cluster::new("np6", &yaml).unwrap();
    cluster
        .wait_for_maps("the first service", |m| {
            m.port_local("30080/TCP") == Some((2, 1))
                && m.port_all("30080/TCP", |f| f.service.as_deref() == Some("shop/web"))
        })
        .unwrap();
    let answers = requests(&cluster, 0, node_port(0, 30080), 10);
    assert!(answers.iter().all(|(b, _)| b.starts_with("pod-")));

    // `check` refuses the input and names both Services.
    let out = std::process::Command::new(lb_tests::topology::agent_binary())
        .args(["check", "--manifests"])
        .arg(&cluster.manifests.0)
        .args(["--node-name", "node-a", "--node-address", "198.18.0.2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Service shop/aaa-later: spec.ports[].nodePort: NodePort 198.18.0.2:30080/TCP is already used by Service shop/web"),
        "{stderr}"
    );
}

#[test]
fn should_be_able_to_switch_session_affinity_for_nodeport_service() {
    require_root();
    // Upstream also has "should have session affinity work for NodePort
    // service"; this covers it and the switch both ways.
    let mut cluster = Cluster::new(
        "np7",
        &web("NodePort", "sessionAffinity: ClientIP", "", &[0, 1]),
    )
    .unwrap();
    cluster
        .wait_for_maps("affinity", |m| {
            m.port_all("30080/TCP", |f| f.affinity_timeout_s == Some(10800))
        })
        .unwrap();
    let answers = requests(&cluster, 0, node_port(0, 30080), 20);
    assert!(
        answers.iter().all(|(b, _)| *b == answers[0].0),
        "one backend for the client: {answers:?}"
    );
    cluster
        .set_manifest(&web("NodePort", "sessionAffinity: None", "", &[0, 1]))
        .unwrap();
    cluster
        .wait_for_maps("no affinity", |m| {
            m.port_count("30080/TCP") == Some(2)
                && m.frontends.iter().all(|f| f.affinity_timeout_s.is_none())
        })
        .unwrap();
    let answers = requests(&cluster, 0, node_port(0, 30080), 30);
    for pod in ["pod-a", "pod-b"] {
        assert!(
            answers.iter().any(|(b, _)| b == pod),
            "{pod} without affinity"
        );
    }
    cluster
        .set_manifest(&web("NodePort", "sessionAffinity: ClientIP", "", &[0, 1]))
        .unwrap();
    cluster
        .wait_for_maps("affinity again", |m| {
            m.port_all("30080/TCP", |f| f.affinity_timeout_s.is_some())
        })
        .unwrap();
    let answers = requests(&cluster, 1, node_port(0, 30080), 20);
    assert!(
        answers.iter().all(|(b, _)| *b == answers[0].0),
        "{answers:?}"
    );
}

#[test]
fn should_only_allow_access_from_service_loadbalancer_source_ranges() {
    require_root();
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}");
    let ranges = format!("loadBalancerSourceRanges: [\"{}/32\"]", CLIENT_IPS[0]);
    let mut cluster = Cluster::new("np8", &web("LoadBalancer", &ranges, &status, &[0, 1])).unwrap();
    cluster
        .wait_for_maps("the ranges", |m| {
            m.frontend(&format!("{LB_IP}:80/TCP"))
                .is_some_and(|f| f.source_ranges == ["198.18.0.100/32"])
        })
        .unwrap();
    let lb = SocketAddrV4::new(LB_IP, 80);
    assert_eq!(requests(&cluster, 0, lb, 5).len(), 5, "inside the ranges");
    assert!(unreachable(&cluster, 1, lb), "outside the ranges: dropped");
    // Opened to the second client too.
    let both = format!(
        "loadBalancerSourceRanges: [\"{}/32\", \"{}/31\"]",
        CLIENT_IPS[0], CLIENT_IPS[1]
    );
    cluster
        .set_manifest(&web("LoadBalancer", &both, &status, &[0, 1]))
        .unwrap();
    cluster
        .wait_for_maps("both ranges", |m| {
            m.frontend(&format!("{LB_IP}:80/TCP"))
                .is_some_and(|f| f.source_ranges.contains(&"198.18.0.100/31".to_string()))
        })
        .unwrap();
    assert_eq!(requests(&cluster, 1, lb, 5).len(), 5);
}

/// GET http://ADDR/healthz: (status code, JSON body); `None` while
/// nothing listens.
fn health_check(cluster: &Cluster, addr: SocketAddrV4) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    cluster.clients[0].run(|| {
        let mut s =
            std::net::TcpStream::connect_timeout(&addr.into(), std::time::Duration::from_secs(3))
                .ok()?;
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        Some((
            code,
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}")),
        ))
    })
}

#[test]
fn should_serve_health_check_node_port_for_etp_local_load_balancers() {
    require_root();
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}");
    let spec = "externalTrafficPolicy: Local\n  healthCheckNodePort: 32000";
    let mut cluster = Cluster::new("np9", &web("LoadBalancer", spec, &status, &[0])).unwrap();
    cluster
        .wait_for_maps("the service", |m| m.port_count("30080/TCP") == Some(1))
        .unwrap();
    let check = |node| {
        let addr = node_port(node, 32000);
        let mut last = None;
        // The server starts right after the maps are written.
        wait_until(std::time::Duration::from_secs(5), || {
            last = health_check(&cluster, addr);
            last.is_some()
        });
        last.unwrap_or_else(|| panic!("nothing serves {addr}"))
    };
    let (code, body) = check(0);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["namespace"], "shop");
    assert_eq!(body["service"]["name"], "web");
    let (code, body) = check(1);
    assert_eq!(code, 503, "node-b has no endpoint: {body}");
    assert_eq!(body["localEndpoints"], 0);

    // The endpoint moves to node-b: the answers follow.
    cluster
        .set_manifest(&web("LoadBalancer", spec, &status, &[1]))
        .unwrap();
    assert!(wait_until(std::time::Duration::from_secs(10), || {
        health_check(&cluster, node_port(1, 32000)).is_some_and(|(c, _)| c == 200)
            && health_check(&cluster, node_port(0, 32000)).is_some_and(|(c, _)| c == 503)
    }));
}

#[test]
fn api_nodeport_and_etp_changes_reach_both_nodes() {
    require_root();
    let mut cluster = Cluster::with_api_server("npa").unwrap();
    cluster.apply(&web("NodePort", "", "", &[0, 1])).unwrap();
    cluster
        .wait_for_maps("the node ports", |m| m.port_count("30080/TCP") == Some(2))
        .unwrap();
    for node in [0usize, 1] {
        let answers = requests(&cluster, 0, node_port(node, 30080), 30);
        for pod in ["pod-a", "pod-b"] {
            assert!(
                answers.iter().any(|(b, _)| b == pod),
                "{pod} via node {node}"
            );
        }
    }
    // externalTrafficPolicy flips to Local through the API: each node keeps
    // to its own pod and the client's address.
    cluster
        .apply(&web(
            "NodePort",
            "externalTrafficPolicy: Local",
            "",
            &[0, 1],
        ))
        .unwrap();
    cluster
        .wait_for_maps("ETP Local", |m| {
            m.port_all("30080/TCP", |f| f.external_traffic_policy_local)
        })
        .unwrap();
    for (node, pod) in [(0, "pod-a"), (1, "pod-b")] {
        for (backend, seen) in requests(&cluster, 0, node_port(node, 30080), 10) {
            assert_eq!((backend.as_str(), seen), (pod, CLIENT_IPS[0]));
        }
    }
}

/// 1 MB from client 0 through `addr` to a backend's sink, bounded.
fn transfer_1mb(cluster: &Cluster, addr: SocketAddrV4) -> std::io::Result<String> {
    cluster.clients[0].run(|| lb_tests::servers::bounded_sink_transfer(addr, 1 << 20))
}

fn counter(cluster: &Cluster, node: usize, name: &str) -> u64 {
    lb_agent::cli::inspect::counters(&cluster.agents[node].pin_dir)
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

/// Sets an `IPPROTO_IP` socket option of type int.
fn set_ip_option(socket: &std::net::UdpSocket, option: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket and an int option of the right size.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "setsockopt {option}");
}

/// The path MTU a connected socket knows (`IP_MTU`).
fn path_mtu(socket: &std::net::UdpSocket) -> libc::c_int {
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, an int buffer and its length.
    let got = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(got, 0, "getsockopt IP_MTU");
    mtu
}

/// node-a's route to node-b's pods allows 1280 bytes: a locked route MTU,
/// which forwarding honours (as the kernel's does).
fn narrow_the_way_to_node_b(cluster: &Cluster) {
    cluster.nodes[0]
        .ip(&[
            "route",
            "replace",
            "198.18.11.0/24",
            "via",
            "198.18.0.3",
            "mtu",
            "lock",
            "1280",
        ])
        .unwrap();
}

/// Path-MTU discovery through a node port whose only endpoint is on the
/// other node, so the flow is DNATed, SNATed and routed by node-a's
/// program. node-a's route to node-b's pods allows 1280 bytes (a locked
/// route MTU, which forwarding honours, as the kernel's does): the program
/// finds the packet too big for the way out and answers "fragmentation
/// needed" itself, in the client's terms (from the node port).
#[test]
fn pmtu_discovery_through_a_nodeport_when_the_routed_way_out_is_narrower() {
    require_root();
    let mut cluster = Cluster::new("np10", &web("NodePort", "", "", &[1])).unwrap();
    cluster
        .wait_for_maps("the node port", |m| m.port_count("30080/TCP") == Some(1))
        .unwrap();
    narrow_the_way_to_node_b(&cluster);
    let received = transfer_1mb(&cluster, node_port(0, 30080))
        .expect("the 1 MB transfer through the node port completes");
    assert_eq!(received, (1 << 20).to_string());
    assert!(counter(&cluster, 0, "icmp_frag_needed") >= 1);
    let route = cluster.clients[0].route_get(NODE_IPS[0]);
    assert!(
        route.contains("mtu 1280"),
        "client's route to node-a: {route}"
    );
}

/// The same on an uplink that computes no checksums (`tx off` on node-a's
/// eth0, as on a VM NIC without offload): the clients' packets arrive with
/// their transport checksum still owed, so it is computed as node-a sends —
/// over the SNATed packets to node-b, and over the "fragmentation needed"
/// built in a too-big packet, where it would land on the quoted header
/// (TCP) or the MTU field (UDP) unless the answer neutralises it. TCP: the
/// transfer completes; UDP with DF: the client's socket learns 1280.
#[test]
fn pmtu_discovery_through_a_nodeport_over_an_uplink_without_checksum_offload() {
    require_root();
    let mut cluster = Cluster::new("np17", &web("NodePort", "", "", &[1])).unwrap();
    cluster
        .wait_for_maps("the node ports", |m| {
            m.port_count("30080/TCP") == Some(1) && m.port_count("30053/UDP") == Some(1)
        })
        .unwrap();
    narrow_the_way_to_node_b(&cluster);
    cluster.nodes[0].tx_checksum_off("eth0").unwrap();
    let received = transfer_1mb(&cluster, node_port(0, 30080))
        .expect("the 1 MB transfer through the node port completes");
    assert_eq!(received, (1 << 20).to_string());

    let client = cluster.clients[1]
        .run(|| std::net::UdpSocket::bind((CLIENT_IPS[1], 0)))
        .unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    set_ip_option(&client, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
    client.connect(node_port(0, 30053)).unwrap();
    client.send(b"small").unwrap();
    assert!(
        client.recv(&mut [0u8; 64]).is_ok(),
        "a datagram that fits is answered"
    );
    client.send(&[b'x'; 1400]).unwrap();
    let err = client
        .recv(&mut [0u8; 64])
        .expect_err("too big for the way out");
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    assert_eq!(path_mtu(&client), 1280);
}

/// The documented limit of the SNAT path: a datagram too big for the way
/// out *without* DF is not fragmented by the program (kernel forwarding
/// would): it is dropped and counted, and smaller ones still pass.
#[test]
fn a_too_big_datagram_without_df_through_a_snated_node_port_is_dropped_and_counted() {
    require_root();
    let mut cluster = Cluster::new("np15", &web("NodePort", "", "", &[1])).unwrap();
    cluster
        .wait_for_maps("the node port", |m| m.port_count("30053/UDP") == Some(1))
        .unwrap();
    narrow_the_way_to_node_b(&cluster);
    let client = cluster.clients[0]
        .run(|| std::net::UdpSocket::bind((CLIENT_IPS[0], 0)))
        .unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    // DF off: the client's kernel sends it whole (its link takes 1500).
    set_ip_option(&client, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
    let mut buf = [0u8; 2048];
    let mut ask = |size: usize| -> std::io::Result<usize> {
        client.send_to(&vec![b'x'; size], node_port(0, 30053))?;
        client.recv(&mut buf)
    };
    let before = counter(&cluster, 0, "drop_redirect");
    assert!(ask(1000).is_ok(), "a datagram that fits is answered");
    assert!(
        ask(1400).is_err(),
        "1 428 bytes on a 1 280 way out, no DF: no answer"
    );
    assert_eq!(counter(&cluster, 0, "drop_redirect"), before + 1);
}

/// The same, with the narrow link behind node-b (its pod's): node-b raises
/// "fragmentation needed" to node-a's SNAT address, quoting the SNATed
/// packet; node-a's uplink translates it back to the client's terms.
#[test]
fn pmtu_discovery_through_a_nodeport_when_the_pod_link_on_the_other_node_is_narrower() {
    require_root();
    let mut cluster = Cluster::new("np11", &web("NodePort", "", "", &[1])).unwrap();
    cluster
        .wait_for_maps("the node port", |m| m.port_count("30080/TCP") == Some(1))
        .unwrap();
    cluster.nodes[1]
        .ip(&["link", "set", "np11-p1", "mtu", "1280"])
        .unwrap();
    let received = transfer_1mb(&cluster, node_port(0, 30080))
        .expect("the 1 MB transfer through the node port completes");
    assert_eq!(received, (1 << 20).to_string());
    assert!(counter(&cluster, 0, "icmp_translated") >= 1);
}

/// The shipped DaemonSet on the two-node cluster: each agent runs with
/// exactly its arguments, environment and capabilities (only what the pod's
/// mounts and the kubelet provide is the test's: the node's cgroup, pin
/// directory and netfilter sysctls, the node name, `LB_API_SERVER` set as
/// the README says, a kubeconfig for the service account's token), against
/// the API server. The kubelet's probes find each agent ready; a pod, an
/// external client through a node port and a node process (socket LB for
/// host-network clients) all reach the Service.
#[test]
fn the_shipped_daemonset_serves_pods_external_clients_and_node_processes() {
    let deployment = lb_tests::deploy::Deployment::rendered("base");
    serve_as_deployed("npd", deployment, |api| Access::Env(api.kubeconfig.clone()));
}

/// The kubeadm overlay: no `LB_API_SERVER`; the agent reads kube-proxy's
/// own ConfigMap (`config.conf`, and the `kubeconfig.conf` it names with
/// the real API server address), as kube-proxy does.
#[test]
fn the_kubeadm_overlay_reaches_the_api_server_through_kube_proxys_kubeconfig() {
    let deployment = lb_tests::deploy::Deployment::rendered("overlays/kubeadm");
    assert!(
        deployment
            .env("n", "x", None)
            .iter()
            .all(|(k, _)| k != "LB_API_SERVER"),
        "the overlay leaves LB_API_SERVER out"
    );
    let scratch = lb_tests::topology::ScratchDir::new("npk-kube-proxy").unwrap();
    let config = scratch.0.join("config.conf");
    serve_as_deployed("npk", deployment.with_path("--config", &config), |api| {
        // kubeadm's ConfigMap, as mounted at /var/lib/kube-proxy.
        std::fs::copy(&api.kubeconfig, scratch.0.join("kubeconfig.conf")).unwrap();
        std::fs::write(
            &config,
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                 clientConnection: {{kubeconfig: {}}}\nmode: \"\"\n",
                scratch.0.join("kubeconfig.conf").display()
            ),
        )
        .unwrap();
        Access::ConfigFile
    });
}

/// The socket-lb-all overlay (hostPID, SYS_ADMIN, `--socket-lb=all`) serves
/// the same clients with its own capabilities.
#[test]
fn the_socket_lb_all_overlay_serves_pods_external_clients_and_node_processes() {
    let deployment = lb_tests::deploy::Deployment::rendered("overlays/socket-lb-all");
    assert!(deployment.capabilities().contains(&"SYS_ADMIN".to_owned()));
    serve_as_deployed("nps", deployment, |api| Access::Env(api.kubeconfig.clone()));
}

/// How a deployed agent finds the API server.
enum Access {
    /// `LB_API_SERVER`, and a kubeconfig in `KUBECONFIG` for the token.
    Env(PathBuf),
    /// The deployment's own configuration file names a kubeconfig.
    ConfigFile,
}

/// Runs `deployment` on both nodes against the API server (`access` set up
/// once it runs), then: each readiness probe answers; a pod, an external
/// client through a node port and a node process reach the Service.
fn serve_as_deployed(
    prefix: &str,
    deployment: lb_tests::deploy::Deployment,
    access: impl FnOnce(&lb_tests::apiserver::TestApiServer) -> Access,
) {
    require_root();
    // Dropped after the cluster: its agents' programs come off first.
    let cgroups = [0, 1].map(|i| {
        lb_tests::cgroup::TestCgroup::new(&format!("{prefix}-{}", NODE_NAMES[i])).unwrap()
    });
    let mut cluster = Cluster::with_api_server_only(prefix).unwrap();
    let access = access(&cluster.api.as_ref().unwrap().0);
    for i in 0..2 {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-test-{prefix}-{}", NODE_NAMES[i]));
        let args = deployment.args(&cgroups[i].path, &pin_dir, None);
        let env = match &access {
            Access::Env(kubeconfig) => {
                deployment.env(NODE_NAMES[i], "https://127.0.0.1:6443", Some(kubeconfig))
            }
            Access::ConfigFile => deployment.env(NODE_NAMES[i], "", None),
        };
        let log = cluster
            .manifests
            .0
            .join(format!("agent-{}.log", NODE_NAMES[i]));
        let agent = Agent::start_deployed(
            &cluster.nodes[i],
            &deployment.capabilities(),
            &args,
            &env,
            &pin_dir,
            &log,
        )
        .unwrap();
        cluster.agents.push(agent);
    }
    cluster.apply(&web("NodePort", "", "", &[0, 1])).unwrap();
    cluster
        .wait_for_maps("the node ports", |m| m.port_count("30080/TCP") == Some(2))
        .unwrap();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let ready = lb_tests::servers::wait_for_status(node, "127.0.0.1:10266", "/readyz", 200);
        assert_eq!(ready, Ok(()), "{}'s readiness probe", NODE_NAMES[i]);
    }
    let from_pod = cluster.client_pods[0]
        .run(|| http_get(SocketAddrV4::new(CLUSTER_IP, 80)))
        .unwrap();
    assert!(from_pod.starts_with("backend pod-"), "{from_pod}");
    let external = requests(&cluster, 0, node_port(1, 30080), 4);
    assert!(
        external.iter().all(|(b, _)| b.starts_with("pod-")),
        "{external:?}"
    );
    let from_node = cgroups[1]
        .python(&cluster.nodes[1], lb_tests::cgroup::TCP_CLIENT)
        .unwrap_or_else(|e| panic!("a node process: {e}\n{}", cluster.agents[1].log_text()));
    assert!(
        from_node.starts_with(&format!("{CLUSTER_IP}:80|backend pod-")),
        "{from_node}"
    );
    drop(cluster);
}

/// Upstream "should fallback to local terminating endpoints when there are
/// no ready endpoints with externalTrafficPolicy=Local": node-a's only pod
/// is terminating (still serving) while node-b's is ready. Node-a's node
/// port keeps serving new connections through its own terminating pod,
/// with the client's address kept; the ClusterIP keeps to the ready pod.
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_etp_local()
{
    require_root();
    let manifest = web("NodePort", "externalTrafficPolicy: Local", "", &[0, 1]).replace(
        &format!("- {{addresses: [\"{}\"], nodeName: node-a}}", POD_IPS[0]),
        &format!(
            "- {{addresses: [\"{}\"], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}",
            POD_IPS[0]
        ),
    );
    assert!(manifest.contains("terminating: true"), "{manifest}");
    let mut cluster = Cluster::new("np18", &manifest).unwrap();
    // Node-a's node port holds its terminating pod and node-b's; node-b's
    // only its own ready pod; the ClusterIP the ready pod on both.
    cluster
        .wait_for_maps("the service", |m| {
            m.count(&format!("{CLUSTER_IP}:80/TCP")) == Some(1)
                && m.port_count("30080/TCP").is_some()
        })
        .unwrap();
    for (backend, seen) in requests(&cluster, 1, node_port(0, 30080), 10) {
        assert_eq!(backend, "pod-a", "node-a's own terminating pod");
        assert_eq!(seen, CLIENT_IPS[1], "the client's own address");
    }
    for (backend, _) in requests(&cluster, 1, node_port(1, 30080), 5) {
        assert_eq!(backend, "pod-b");
    }
    let seen: Vec<String> = cluster.client_pods[0].run(|| {
        (0..10)
            .map(|_| parse_answer(&http_get(SocketAddrV4::new(CLUSTER_IP, 80)).unwrap()).0)
            .collect()
    });
    assert!(seen.iter().all(|b| b == "pod-b"), "ready only: {seen:?}");
}

/// Upstream traffic_distribution.go "should route traffic to an endpoint in
/// the same zone when using PreferClose": the Nodes carry their zones (the
/// agents read their own Node's `topology.kubernetes.io/zone`), the slice
/// the EndpointSlice controller's hints. Each node's client pod reaches
/// only its zone's pod; without hints, both.
#[test]
fn should_route_traffic_to_an_endpoint_in_the_same_zone_when_using_prefer_close() {
    require_root();
    let mut cluster = Cluster::with_api_server("npz").unwrap();
    for (node, zone) in [("node-a", "zone-a"), ("node-b", "zone-b")] {
        cluster
            .apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels: {{topology.kubernetes.io/zone: {zone}}}\n"
            ))
            .unwrap();
    }
    let hinted = |hints: bool| {
        let manifest = web("ClusterIP", "trafficDistribution: PreferClose", "", &[0, 1]);
        if !hints {
            return manifest;
        }
        [(0, "zone-a"), (1, "zone-b")].iter().fold(manifest, |m, (i, zone)| {
            m.replace(
                &format!("- {{addresses: [\"{}\"], nodeName: {}}}", POD_IPS[*i], NODE_NAMES[*i]),
                &format!(
                    "- {{addresses: [\"{}\"], nodeName: {}, zone: {zone}, hints: {{forZones: [{{name: {zone}}}]}}}}",
                    POD_IPS[*i], NODE_NAMES[*i]
                ),
            )
        })
    };
    let manifest = hinted(true);
    assert!(manifest.contains("forZones"), "{manifest}");
    cluster.apply(&manifest).unwrap();
    cluster
        .wait_for_maps("one zonal backend a node", |m| {
            m.count(&format!("{CLUSTER_IP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let backends_seen_from = |cluster: &Cluster, i: usize| -> BTreeSet<String> {
        cluster.client_pods[i].run(|| {
            (0..12)
                .map(|_| parse_answer(&http_get(SocketAddrV4::new(CLUSTER_IP, 80)).unwrap()).0)
                .collect()
        })
    };
    assert_eq!(
        backends_seen_from(&cluster, 0),
        BTreeSet::from(["pod-a".to_owned()])
    );
    assert_eq!(
        backends_seen_from(&cluster, 1),
        BTreeSet::from(["pod-b".to_owned()])
    );

    cluster.apply(&hinted(false)).unwrap();
    cluster
        .wait_for_maps("both backends", |m| {
            m.count(&format!("{CLUSTER_IP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let both = BTreeSet::from(["pod-a".to_owned(), "pod-b".to_owned()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = BTreeSet::new();
    while seen != both && std::time::Instant::now() < deadline {
        seen.extend(backends_seen_from(&cluster, 0));
    }
    assert_eq!(seen, both, "no hints: every endpoint");
}

/// Upstream "Services should allow pods to hairpin back to themselves
/// through services": the only endpoint reaches its own Service — by
/// cluster IP and by its node's node port, TCP and UDP — and lands on
/// itself, seeing the node as its peer (SNAT: a packet from its own
/// address would be dropped), the answers from the frontend it asked.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    require_root();
    let mut cluster = Cluster::new("nph", &web("NodePort", "", "", &[0])).unwrap();
    cluster
        .wait_for_maps("one endpoint", |m| m.port_count("30080/TCP") == Some(1))
        .unwrap();
    for (tcp, udp) in [
        (
            SocketAddrV4::new(CLUSTER_IP, 80),
            SocketAddrV4::new(CLUSTER_IP, 53),
        ),
        (node_port(0, 30080), node_port(0, 30053)),
    ] {
        let body = cluster.pods[0]
            .run(|| http_get(tcp))
            .unwrap_or_else(|e| panic!("pod-a to {tcp}: {e}"));
        assert_eq!(
            parse_answer(&body),
            ("pod-a".to_owned(), NODE_IPS[0]),
            "{tcp}"
        );
        let (answer, from) = cluster.pods[0]
            .run(|| udp_query(udp))
            .unwrap_or_else(|e| panic!("pod-a to {udp}: {e}"));
        assert!(
            answer.starts_with(&format!("pod-a client {}:", NODE_IPS[0])),
            "{answer}"
        );
        assert_eq!(from, udp.into());
    }
    assert_eq!(counter(&cluster, 0, "snat_new"), 4, "each flow SNATed once");
    // Another pod on the node is not SNATed: the backend sees it.
    let body = cluster.client_pods[0]
        .run(|| http_get(SocketAddrV4::new(CLUSTER_IP, 80)))
        .unwrap();
    assert_eq!(
        parse_answer(&body),
        ("pod-a".to_owned(), lb_tests::cluster::CLIENT_POD_IPS[0])
    );
    assert_eq!(counter(&cluster, 0, "snat_new"), 4);
}

/// A service CIDR routed into the cluster (the clients route
/// 198.19.0.0/16 via node-a): a client outside the cluster reaches a
/// cluster IP whose only endpoint is on node-b. Masqueraded to node-a, as
/// kube-proxy masquerades sources outside the cluster CIDR, the answer
/// comes back through node-a from the cluster IP. With the clients'
/// network in `--cluster-cidr` the source is the cluster's and kept: the
/// pod answers the client straight from its own address (asymmetric, as
/// under kube-proxy).
#[test]
fn external_traffic_to_a_cluster_ip_is_masqueraded_unless_it_comes_from_the_cluster_cidr() {
    require_root();
    let manifest = web("ClusterIP", "", "", &[1]);
    let mut cluster = Cluster::without_agents("npx").unwrap();
    cluster
        .start_agents(
            &manifest,
            &["--cluster-cidr", "198.18.10.0/23,198.18.20.0/23"],
        )
        .unwrap();
    cluster
        .wait_for_maps("one endpoint", |m| m.port_count("80/TCP") == Some(1))
        .unwrap();
    let vip = SocketAddrV4::new(CLUSTER_IP, 80);
    let answers = requests(&cluster, 0, vip, 5);
    assert!(
        answers
            .iter()
            .all(|a| *a == ("pod-b".to_owned(), NODE_IPS[0])),
        "{answers:?}"
    );
    let dns = SocketAddrV4::new(CLUSTER_IP, 53);
    let (answer, from) = cluster.clients[0].run(|| udp_query(dns)).unwrap();
    assert!(
        answer.starts_with(&format!("pod-b client {}:", NODE_IPS[0])),
        "{answer}"
    );
    assert_eq!(from, dns.into());
    assert_eq!(counter(&cluster, 0, "snat_new"), 6);

    cluster.agents.clear();
    cluster
        .start_agents(&manifest, &["--cluster-cidr", "198.18.0.0/24"])
        .unwrap();
    cluster
        .wait_for_maps("one endpoint", |m| m.port_count("80/TCP") == Some(1))
        .unwrap();
    let (answer, from) = cluster.clients[0].run(|| udp_query(dns)).unwrap();
    assert!(
        answer.starts_with(&format!("pod-b client {}:", CLIENT_IPS[0])),
        "{answer}"
    );
    assert_eq!(
        from,
        SocketAddrV4::new(POD_IPS[1], 5353).into(),
        "straight from the pod"
    );
    assert_eq!(counter(&cluster, 0, "snat_new"), 0);
}

/// A UDP datagram too big for the links (4 000 bytes: the sender's stack
/// fragments it) and its 6 000-byte answer (fragmented by the backend's
/// stack), as large DNS answers without EDNS limits, Kerberos or RADIUS
/// are: from a pod to a cluster IP whose endpoint is on the other node,
/// and from a client outside to a node port whose endpoint is on the other
/// node (SNATed, every fragment routed by the program). Whole both ways.
#[test]
fn udp_datagrams_fragmented_by_their_senders_reach_the_backend_and_the_client_whole() {
    require_root();
    let mut cluster = Cluster::new("npf", &web("NodePort", "", "", &[1])).unwrap();
    cluster
        .wait_for_maps("one endpoint", |m| m.port_count("30053/UDP") == Some(1))
        .unwrap();
    let query_sized = |ns: &lb_tests::netns::NetNs, to: SocketAddrV4| {
        ns.run(|| lb_tests::servers::udp_query_sized(to.into(), 4000, 6000))
            .unwrap_or_else(|e| panic!("to {to}: {e}"))
    };
    let vip = SocketAddrV4::new(CLUSTER_IP, 53);
    let (line, len, from) = query_sized(&cluster.client_pods[0], vip);
    assert_eq!(len, 6000, "{line}");
    assert!(
        line.starts_with(&format!(
            "pod-b client {}:",
            lb_tests::cluster::CLIENT_POD_IPS[0]
        )) && line.ends_with(" got 4000"),
        "{line}"
    );
    assert_eq!(from, vip.into());

    let (line, len, from) = query_sized(&cluster.clients[0], node_port(0, 30053));
    assert_eq!(len, 6000, "{line}");
    assert!(
        line.starts_with(&format!("pod-b client {}:", NODE_IPS[0])) && line.ends_with(" got 4000"),
        "{line}"
    );
    assert_eq!(from, node_port(0, 30053).into());
    // Query and answer are three and five fragments: two and four follow
    // their first, on each of the two flows.
    assert_eq!(counter(&cluster, 0, "frag_translated"), 12);
}

/// NodeLocal DNSCache: with `--local-redirect shop/web:53=ADDRESS`, pods'
/// queries to the Service's cluster IP on port 53 are answered on their
/// own node by a node-local listener, while ADDRESS is on one of that
/// node's interfaces (node-local-dns binds it on its `nodelocaldns`
/// device), from the cluster IP they asked; a node without it, and the
/// Service's other ports, keep the Service's endpoints; the address gone,
/// the endpoints serve again.
#[test]
fn a_local_redirect_serves_a_services_dns_port_from_the_node_local_cache_while_it_runs() {
    require_root();
    const CACHE: Ipv4Addr = Ipv4Addr::new(198, 19, 53, 10);
    let manifest = web("ClusterIP", "", "", &[0, 1]);
    let mut cluster = Cluster::without_agents("npl").unwrap();
    cluster
        .start_agents(
            &manifest,
            &["--local-redirect", &format!("shop/web:53={CACHE}")],
        )
        .unwrap();
    let dns = SocketAddrV4::new(CLUSTER_IP, 53);
    let web_port = format!("{CLUSTER_IP}:80/TCP");
    let dns_port = format!("{CLUSTER_IP}:53/UDP");
    cluster
        .wait_for_maps("both endpoints", |m| m.count(&dns_port) == Some(2))
        .unwrap();
    let answered_by = |cluster: &Cluster, node: usize| -> BTreeSet<String> {
        cluster.client_pods[node].run(|| {
            (0..12)
                .map(|_| {
                    let (answer, from) = udp_query(dns).expect("a DNS answer");
                    assert_eq!(from, dns.into(), "from the cluster IP");
                    answer
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect()
        })
    };
    let pods = BTreeSet::from(["pod-a".to_owned(), "pod-b".to_owned()]);
    assert!(answered_by(&cluster, 0).is_subset(&pods), "no cache yet");

    cluster.nodes[0]
        .ip(&["addr", "add", &format!("{CACHE}/32"), "dev", "lo"])
        .unwrap();
    // node-local-dns binds its address: its answers come from it.
    let cache =
        BackendServers::start_on(&cluster.nodes[0], CACHE, "node-cache", 18053, 53).unwrap();
    let maps = cluster.agents[0]
        .wait_for_maps("the redirect", |m| m.backends(&dns_port) == [CACHE])
        .unwrap();
    assert_eq!(
        maps.count(&web_port),
        Some(2),
        "port 80 keeps its endpoints"
    );
    assert_eq!(
        answered_by(&cluster, 0),
        BTreeSet::from(["node-cache".to_owned()])
    );
    let (answer, _) = cluster.client_pods[0].run(|| udp_query(dns)).unwrap();
    assert!(
        answer.starts_with(&format!(
            "node-cache client {}:",
            lb_tests::cluster::CLIENT_POD_IPS[0]
        )),
        "{answer}"
    );
    assert!(
        answered_by(&cluster, 1).is_subset(&pods),
        "node-b has no cache"
    );

    drop(cache);
    cluster.nodes[0]
        .ip(&["addr", "del", &format!("{CACHE}/32"), "dev", "lo"])
        .unwrap();
    cluster.agents[0]
        .wait_for_maps("the endpoints again", |m| m.count(&dns_port) == Some(2))
        .unwrap();
    assert!(answered_by(&cluster, 0).is_subset(&pods));
}
