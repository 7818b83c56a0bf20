//! End to end over both families: the lb-agent binary in a node namespace,
//! real TCP/UDP clients and servers in pod namespaces with an IPv4 and an
//! IPv6 address each (IPv6 in 2001:db8::/32 only). Named after upstream's
//! `[Feature:IPv6DualStack]` cases (test/e2e/network/dual_stack.go).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    path::PathBuf,
};

use lb_tests::{
    cluster::{
        web_service, Cluster, CLIENT_IPS6, CLIENT_POD_IPS6, NODE_IPS6, NODE_NAMES, POD_IPS6,
    },
    netns::NetNs,
    require_root,
    servers::{http_get, udp_query, BackendServers},
    topology::{
        agent_json, backend_ip, backend_ip6, Agent, ScratchDir, Topology, CLIENT_IP, CLIENT_IP6,
        VIP, VIP6,
    },
};

/// The agent's metrics, at its default address (kube-proxy's).
const METRICS: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 10249);

struct Setup {
    agent: Agent,
    manifests: ScratchDir,
    _servers: Vec<BackendServers>,
    topology: Topology,
}

/// `n` backend pods with both families, servers on both, and an agent
/// programming `manifest`.
fn setup(prefix: &str, n: usize, manifest: &str) -> Setup {
    require_root();
    let topology = Topology::new(prefix, n).expect("topology");
    topology.add_ipv6().expect("IPv6 addresses");
    let mut servers = topology.serve_backends("be").expect("IPv4 servers");
    for (i, ns) in topology.backends.iter().enumerate() {
        let six = BackendServers::start_on(ns, backend_ip6(i), &format!("be{i}"), 8080, 5353);
        servers.push(six.expect("IPv6 servers"));
    }
    let manifests = ScratchDir::new(&format!("{prefix}-manifests")).expect("scratch dir");
    manifests.write("web.yaml", manifest).expect("manifest");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{prefix}-test"));
    let log = manifests.0.join("agent.log");
    let agent = Agent::start(
        &topology.node,
        &manifests.0,
        &topology.interface_pattern(),
        &pin_dir,
        &log,
        &[],
    )
    .expect("agent");
    Setup {
        agent,
        manifests,
        _servers: servers,
        topology,
    }
}

/// The `web` Service with `cluster_ips` (primary first), its IPv4 slice
/// listing backends `v4` and its IPv6 slice backends `v6` (by index).
fn manifest(cluster_ips: &[IpAddr], v4: &[usize], v6: &[usize]) -> String {
    let family = |ip: &IpAddr| if ip.is_ipv6() { "IPv6" } else { "IPv4" };
    let ips: Vec<String> = cluster_ips.iter().map(ToString::to_string).collect();
    let families: Vec<&str> = cluster_ips.iter().map(family).collect();
    let policy = if cluster_ips.len() == 2 {
        "PreferDualStack"
    } else {
        "SingleStack"
    };
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: "{primary}"
  clusterIPs: [{ips}]
  ipFamilies: [{families}]
  ipFamilyPolicy: {policy}
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: echo, port: 53, targetPort: 5353, protocol: UDP}}
"#,
        primary = ips[0],
        ips = ips
            .iter()
            .map(|ip| format!("\"{ip}\""))
            .collect::<Vec<_>>()
            .join(", "),
        families = families.join(", "),
    );
    let endpoints = |addresses: Vec<String>| -> String {
        if addresses.is_empty() {
            return " []\n".into();
        }
        let mut text = String::from("\n");
        for a in addresses {
            text += &format!("- addresses: [\"{a}\"]\n");
        }
        text
    };
    for (name, address_type, addresses) in [
        (
            "web-v4",
            "IPv4",
            v4.iter().map(|i| backend_ip(*i).to_string()).collect(),
        ),
        (
            "web-v6",
            "IPv6",
            v6.iter().map(|i| backend_ip6(*i).to_string()).collect(),
        ),
    ] {
        yaml += &format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: {address_type}
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: echo, port: 5353, protocol: UDP}}
endpoints:{}"#,
            endpoints(addresses)
        );
    }
    yaml
}

fn dual() -> Vec<IpAddr> {
    vec![VIP.into(), VIP6.into()]
}

/// `ADDR:PORT/PROTO` as `inspect` names a frontend.
fn frontend(vip: IpAddr, port: u16, proto: &str) -> String {
    SocketAddr::new(vip, port).to_string() + "/" + proto
}

/// The backends that answered `rounds` HTTP GETs and UDP queries to `vip`,
/// checking each saw the client's own address and each UDP answer came
/// from the cluster IP.
fn reached(s: &Setup, vip: IpAddr, rounds: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let client: IpAddr = if vip.is_ipv6() {
        CLIENT_IP6.into()
    } else {
        CLIENT_IP.into()
    };
    s.topology.client.run(|| {
        let (mut tcp, mut udp) = (BTreeSet::new(), BTreeSet::new());
        for _ in 0..rounds {
            let body = http_get(SocketAddr::new(vip, 80)).expect("HTTP through the cluster IP");
            let seen = SocketAddr::new(client, 0).to_string();
            let seen = seen.trim_end_matches(":0");
            assert!(
                body.contains(&format!("client {seen}:")),
                "backend saw {body:?}"
            );
            tcp.insert(
                body.split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned(),
            );
            let (answer, from) = udp_query(SocketAddr::new(vip, 53)).expect("UDP");
            assert_eq!(
                from,
                SocketAddr::new(vip, 53),
                "UDP answers come from the cluster IP"
            );
            udp.insert(
                answer
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        (tcp, udp)
    })
}

fn names(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("be{i}")).collect()
}

/// dual_stack.go "should function for pod-Service: http" and "…: udp":
/// a pod reaches a dual-stack Service on both cluster IPs, TCP and UDP,
/// every backend of each family, with its own address seen.
#[test]
fn should_function_for_pod_service_http_and_udp() {
    let mut s = setup("lbd1", 2, &manifest(&dual(), &[0, 1], &[0, 1]));
    s.agent
        .wait_for_maps("both families", |m| {
            m.count(&frontend(VIP.into(), 80, "TCP")) == Some(2)
                && m.count(&frontend(VIP6.into(), 80, "TCP")) == Some(2)
                && m.count(&frontend(VIP6.into(), 53, "UDP")) == Some(2)
        })
        .unwrap();
    for vip in dual() {
        let (tcp, udp) = reached(&s, vip, 30);
        assert_eq!(tcp, names(2), "every backend answers TCP at {vip}");
        assert_eq!(udp, names(2), "every backend answers UDP at {vip}");
    }
    // `inspect conntrack` shows both families' flows.
    let snapshot = lb_agent::cli::inspect::snapshot(&s.agent.pin_dir).unwrap();
    let filter = Default::default();
    let flows = lb_agent::cli::inspect::flows(&s.agent.pin_dir, &snapshot, &filter).unwrap();
    for vip in dual() {
        let at = SocketAddr::new(vip, 80).to_string();
        let flow = flows.iter().find(|f| f.frontend == at);
        let flow = flow.unwrap_or_else(|| panic!("no flow to {at}: {flows:#?}"));
        assert_eq!(flow.service.as_deref(), Some("demo/web"), "{flow:?}");
    }
    // The metrics count each family's frontends and backends, each in
    // its family's maps: two ClusterIP frontends (TCP 80, UDP 53), two
    // pods × two ports; slot 0 and two slots per frontend.
    let metrics = lb_tests::metrics::scrape_until(&s.topology.node, METRICS, |m| {
        m.samples.get(r#"lb_endpoints{ip_family="IPv6"}"#) == Some(&4.0)
    });
    for family in ["IPv4", "IPv6"] {
        let series = format!(r#"lb_frontends{{type="ClusterIP",ip_family="{family}"}}"#);
        assert_eq!(metrics.get(&series), 2.0, "{series}");
        let series = format!(r#"lb_endpoints{{ip_family="{family}"}}"#);
        assert_eq!(metrics.get(&series), 4.0, "{series}");
    }
    for map in ["lb_svc_v4", "lb_svc6_v4"] {
        let series = format!(r#"lb_map_entries{{map="{map}"}}"#);
        assert_eq!(metrics.get(&series), 6.0, "{series}");
    }
    for map in ["lb_backend_v4", "lb_backend6_v4"] {
        let series = format!(r#"lb_map_entries{{map="{map}"}}"#);
        assert_eq!(metrics.get(&series), 4.0, "{series}");
    }
    let counters = lb_agent::cli::inspect::counters(&s.agent.pin_dir).unwrap();
    let get = |name: &str| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    for drop in [
        "drop_backend_missing",
        "drop_ct_full",
        "drop_rewrite",
        "pass_malformed",
    ] {
        assert_eq!(get(drop), 0, "{drop}: {counters:?}");
    }
}

/// dual_stack.go "should function for client IP based session affinity:
/// http" and "…: udp": with `sessionAffinity: ClientIP` on a dual-stack
/// Service, every connection and every datagram (each from a new source
/// port) of a client goes to the one backend its first went to, on each
/// family's cluster IP; without it, they spread over every backend.
#[test]
fn should_function_for_client_ip_based_session_affinity_http_and_udp() {
    let affinity =
        |yaml: String| yaml.replace("  ports:\n", "  sessionAffinity: ClientIP\n  ports:\n");
    let mut s = setup(
        "lbd9",
        3,
        &affinity(manifest(&dual(), &[0, 1, 2], &[0, 1, 2])),
    );
    s.agent
        .wait_for_maps("affinity on both families", |m| {
            dual().into_iter().all(|vip| {
                m.frontend(&frontend(vip, 80, "TCP"))
                    .is_some_and(|f| f.affinity_timeout_s == Some(10_800) && f.backends.len() == 3)
                    && m.frontend(&frontend(vip, 53, "UDP"))
                        .is_some_and(|f| f.affinity_timeout_s == Some(10_800))
            })
        })
        .unwrap();
    for vip in dual() {
        let (tcp, udp) = reached(&s, vip, 20);
        assert_eq!(
            tcp.len(),
            1,
            "one backend for every connection at {vip}: {tcp:?}"
        );
        assert_eq!(
            udp.len(),
            1,
            "one backend for every datagram at {vip}: {udp:?}"
        );
    }
    // Without affinity the same client reaches them all.
    s.manifests
        .write("web.yaml", &manifest(&dual(), &[0, 1, 2], &[0, 1, 2]))
        .unwrap();
    s.agent
        .wait_for_maps("no affinity", |m| {
            m.frontends.iter().all(|f| f.affinity_timeout_s.is_none())
        })
        .unwrap();
    for vip in dual() {
        let (tcp, _) = reached(&s, vip, 40);
        assert_eq!(tcp, names(3), "every backend at {vip} without affinity");
    }
}

/// dual_stack.go "should create service with ipv6,v4 cluster ip": IPv6
/// first (the primary family), IPv4 second; both are served.
#[test]
fn should_create_service_with_ipv6_v4_cluster_ip() {
    let ips: Vec<IpAddr> = vec![VIP6.into(), VIP.into()];
    let mut s = setup("lbd2", 1, &manifest(&ips, &[0], &[0]));
    let maps = s
        .agent
        .wait_for_maps("both cluster IPs", |m| {
            ips.iter()
                .all(|ip| m.count(&frontend(*ip, 80, "TCP")) == Some(1))
        })
        .unwrap();
    assert_eq!(
        maps.all_backends(&frontend(VIP6.into(), 80, "TCP")),
        [IpAddr::from(backend_ip6(0))],
        "{}",
        maps.text
    );
    for vip in ips {
        assert_eq!(reached(&s, vip, 3).0, names(1), "{vip}");
    }
}

/// dual_stack.go "should update endpoints": the IPv6 slice loses a backend
/// and gains it back; new connections follow, the IPv4 frontend keeps its
/// own backends throughout.
#[test]
fn should_update_endpoints() {
    let mut s = setup("lbd3", 2, &manifest(&dual(), &[0, 1], &[0, 1]));
    let v6 = frontend(VIP6.into(), 80, "TCP");
    s.agent
        .wait_for_maps("2 IPv6 backends", |m| m.count(&v6) == Some(2))
        .unwrap();
    s.manifests
        .write("web.yaml", &manifest(&dual(), &[0, 1], &[1]))
        .unwrap();
    s.agent
        .wait_for_maps("1 IPv6 backend", |m| {
            m.all_backends(&v6) == [IpAddr::from(backend_ip6(1))]
        })
        .unwrap();
    assert_eq!(reached(&s, VIP6.into(), 10).0, ["be1".to_owned()].into());
    assert_eq!(reached(&s, VIP.into(), 20).0, names(2), "IPv4 untouched");
    s.manifests
        .write("web.yaml", &manifest(&dual(), &[0, 1], &[0, 1]))
        .unwrap();
    s.agent
        .wait_for_maps("2 IPv6 backends again", |m| m.count(&v6) == Some(2))
        .unwrap();
    assert_eq!(reached(&s, VIP6.into(), 30).0, names(2));
}

/// A Service's families change live (`PreferDualStack` → `SingleStack`
/// IPv4 → `PreferDualStack`): only the IPv6 frontends go and come back; an
/// IPv4 connection open meanwhile keeps working.
#[test]
fn a_service_dropping_and_regaining_ipv6_changes_only_its_ipv6_frontends() {
    let mut s = setup("lbd4", 1, &manifest(&dual(), &[0], &[0]));
    let (v4, v6) = (
        frontend(VIP.into(), 80, "TCP"),
        frontend(VIP6.into(), 80, "TCP"),
    );
    s.agent
        .wait_for_maps("both", |m| {
            m.count(&v4) == Some(1) && m.count(&v6) == Some(1)
        })
        .unwrap();
    let mut open = s
        .topology
        .client
        .run(|| lb_tests::servers::EchoConnection::open(std::net::SocketAddrV4::new(VIP, 80)))
        .expect("IPv4 connection");
    assert!(open.ask().unwrap().starts_with("be0"));
    s.manifests
        .write("web.yaml", &manifest(&[VIP.into()], &[0], &[0]))
        .unwrap();
    let maps = s
        .agent
        .wait_for_maps("IPv4 only", |m| m.count(&v6).is_none())
        .unwrap();
    assert_eq!(maps.count(&v4), Some(1), "{}", maps.text);
    assert!(
        open.ask().unwrap().starts_with("be0"),
        "the IPv4 connection lives on"
    );
    s.manifests
        .write("web.yaml", &manifest(&dual(), &[0], &[0]))
        .unwrap();
    s.agent
        .wait_for_maps("IPv6 back", |m| m.count(&v6) == Some(1))
        .unwrap();
    assert_eq!(reached(&s, VIP6.into(), 3).0, names(1));
    assert!(open.ask().unwrap().starts_with("be0"));
}

/// service.go "should be rejected when no endpoints exist", over IPv6: a
/// TCP connect to the IPv6 cluster IP is refused at once (ICMPv6 port
/// unreachable), a connected UDP socket's next receive fails the same way.
/// Local sockets over a veth hand the datapath packets whose checksum is
/// still owed: the answer must come out intact anyway.
#[test]
fn should_be_rejected_when_no_ipv6_endpoints_exist() {
    let mut s = setup("lbd5", 1, &manifest(&dual(), &[0], &[]));
    s.agent
        .wait_for_maps("an IPv6 frontend without backends", |m| {
            m.count(&frontend(VIP6.into(), 80, "TCP")) == Some(0)
        })
        .unwrap();
    let (tcp, udp) = s.topology.client.run(|| {
        let tcp = std::net::TcpStream::connect_timeout(
            &SocketAddr::new(VIP6.into(), 80),
            lb_tests::servers::IO_TIMEOUT,
        )
        .map(|_| ())
        .map_err(|e| e.kind());
        let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
        socket
            .set_read_timeout(Some(lb_tests::servers::IO_TIMEOUT))
            .unwrap();
        socket.connect(SocketAddr::new(VIP6.into(), 53)).unwrap();
        socket.send(b"query").unwrap();
        let mut buf = [0u8; 64];
        let udp = socket.recv(&mut buf).map(|_| ()).map_err(|e| e.kind());
        (tcp, udp)
    });
    // Refused, not timed out (`TimedOut`).
    assert_eq!(tcp, Err(std::io::ErrorKind::ConnectionRefused));
    assert_eq!(udp, Err(std::io::ErrorKind::ConnectionRefused));
    // The IPv4 cluster IP still serves its endpoint.
    assert_eq!(reached(&s, VIP.into(), 2).0, names(1));
}

const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 1, 0, 0, 0, 1);
const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 2, 0, 0, 0, 1);

/// The two-node cluster (`lb_tests::cluster`) with IPv6 everywhere, both
/// agents programming the IPv6-only Service `shop/web` of type `type_`
/// with endpoints `pods` (indexes: pod-a on node-a, pod-b on node-b).
fn cluster6(prefix: &str, type_: &str, spec: &str, status: &str, pods: &[usize]) -> Cluster {
    require_root();
    let endpoints: Vec<(Ipv6Addr, &str)> = pods
        .iter()
        .map(|i| (POD_IPS6[*i], NODE_NAMES[*i]))
        .collect();
    let mut cluster = Cluster::without_agents(prefix).expect("cluster");
    cluster.add_ipv6().expect("IPv6 addresses");
    cluster
        .start_agents(
            &web_service(type_, CLUSTER_IP6, spec, status, &endpoints),
            &[],
        )
        .expect("agents");
    cluster
}

/// `n` HTTP requests from `client` to `addr`: each answer's (backend,
/// client address seen).
fn requests6(client: &NetNs, addr: SocketAddrV6, n: usize) -> Vec<(String, IpAddr)> {
    client.run(|| {
        (0..n)
            .map(|i| {
                let body = http_get(addr).unwrap_or_else(|e| panic!("request {i} to {addr}: {e}"));
                let words: Vec<&str> = body.split_whitespace().collect();
                assert!(
                    words.len() == 4 && words[0] == "backend" && words[2] == "client",
                    "unexpected answer {body:?}"
                );
                let seen: SocketAddr = words[3].parse().expect("the client's address");
                (words[1].to_owned(), seen.ip())
            })
            .collect()
    })
}

fn node_port6(node: usize, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(NODE_IPS6[node], port, 0, 0)
}

/// Services' "should be able to create a functioning NodePort service",
/// over IPv6 on two nodes: an external client reaches the node port of
/// either node, TCP and UDP, and every endpoint answers. The node's own
/// pod sees the client; the other node's pod sees the node (SNAT to its
/// IPv6 address), so its answer comes back through the node. UDP answers
/// come from the node port asked.
#[test]
fn should_be_able_to_create_a_functioning_nodeport_service_over_ipv6() {
    let mut cluster = cluster6("lbd6", "NodePort", "", "", &[0, 1]);
    let name = |port: u16, node: usize, proto: &str| frontend(NODE_IPS6[node].into(), port, proto);
    cluster
        .wait_for_maps("the IPv6 node ports", |m| {
            m.count(&name(30080, 0, "TCP"))
                .or(m.count(&name(30080, 1, "TCP")))
                == Some(2)
        })
        .unwrap();
    for node in [0usize, 1] {
        let answers = requests6(&cluster.clients[0], node_port6(node, 30080), 40);
        let local = ["pod-a", "pod-b"][node];
        for (backend, seen) in &answers {
            let expected: IpAddr = if backend == local {
                CLIENT_IPS6[0].into()
            } else {
                NODE_IPS6[node].into()
            };
            assert_eq!(*seen, expected, "{backend} via node {node}");
        }
        for pod in ["pod-a", "pod-b"] {
            assert!(
                answers.iter().any(|(b, _)| b == pod),
                "{pod} never answered through node {node}: {answers:?}"
            );
        }
        let answers: Vec<(String, SocketAddr)> = cluster.clients[0].run(|| {
            (0..30)
                .map(|_| udp_query(node_port6(node, 30053)).expect("UDP answer"))
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
            .all(|(_, from)| *from == node_port6(node, 30053).into()));
    }
}

/// Services' "should preserve source IP for externalTrafficPolicy:
/// Local", over IPv6 at a load-balancer IP and an external IP: the
/// clients route the service prefix via node-a, whose only local endpoint
/// answers every request and sees the client's own address; with
/// externalTrafficPolicy Cluster the other node's pod answers too, from
/// behind node-a's SNAT address.
#[test]
fn should_preserve_source_ip_for_etp_local_at_ipv6_load_balancer_and_external_ips() {
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: \"{LB_IP6}\"}}]}}}}");
    let spec = |policy: &str| {
        format!("externalTrafficPolicy: {policy}\n  externalIPs: [\"{EXTERNAL_IP6}\"]")
    };
    let mut cluster = cluster6("lbd7", "LoadBalancer", &spec("Local"), &status, &[0, 1]);
    let lb = frontend(LB_IP6.into(), 80, "TCP");
    let external = frontend(EXTERNAL_IP6.into(), 80, "TCP");
    cluster
        .wait_for_maps("the IPv6 external frontends", |m| {
            m.count(&lb) == Some(2) && m.count(&external) == Some(2)
        })
        .unwrap();
    for addr in [LB_IP6, EXTERNAL_IP6] {
        for (backend, seen) in requests6(&cluster.clients[1], SocketAddrV6::new(addr, 80, 0, 0), 20)
        {
            assert_eq!(backend, "pod-a", "only node-a's own endpoint, at {addr}");
            assert_eq!(
                seen,
                IpAddr::from(CLIENT_IPS6[1]),
                "the client's own address"
            );
        }
    }

    let endpoints = [(POD_IPS6[0], NODE_NAMES[0]), (POD_IPS6[1], NODE_NAMES[1])];
    cluster
        .set_manifest(&web_service(
            "LoadBalancer",
            CLUSTER_IP6,
            &spec("Cluster"),
            &status,
            &endpoints,
        ))
        .unwrap();
    cluster
        .wait_for_maps("externalTrafficPolicy Cluster", |m| {
            m.frontend(&lb)
                .is_some_and(|f| !f.external_traffic_policy_local)
        })
        .unwrap();
    let answers = requests6(&cluster.clients[1], SocketAddrV6::new(LB_IP6, 80, 0, 0), 40);
    assert!(
        answers.contains(&("pod-b".to_owned(), NODE_IPS6[0].into())),
        "{answers:?}"
    );
    assert!(
        answers.contains(&("pod-a".to_owned(), CLIENT_IPS6[1].into())),
        "{answers:?}"
    );
}

/// Services' "should allow pods to hairpin back to themselves through
/// services", over IPv6: a pod reaches itself through the cluster IP and
/// through its node's node port, SNATed to the node's IPv6 address (else
/// its answer would go to itself, not back through the frontend); another
/// pod on the node keeps its own address.
#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_ipv6_services() {
    let mut cluster = cluster6("lbd8", "NodePort", "", "", &[0]);
    let vip = frontend(CLUSTER_IP6.into(), 80, "TCP");
    cluster
        .wait_for_maps("one endpoint", |m| m.count(&vip) == Some(1))
        .unwrap();
    for addr in [
        SocketAddrV6::new(CLUSTER_IP6, 80, 0, 0),
        node_port6(0, 30080),
    ] {
        let answers = requests6(&cluster.pods[0], addr, 3);
        for answer in answers {
            assert_eq!(answer, ("pod-a".to_owned(), NODE_IPS6[0].into()), "{addr}");
        }
    }
    let udp = SocketAddrV6::new(CLUSTER_IP6, 53, 0, 0);
    let (answer, from) = cluster.pods[0].run(|| udp_query(udp)).expect("UDP hairpin");
    assert!(
        answer.starts_with(&format!("pod-a client [{}]:", NODE_IPS6[0])),
        "{answer}"
    );
    assert_eq!(from, udp.into());
    let answers = requests6(
        &cluster.client_pods[0],
        SocketAddrV6::new(CLUSTER_IP6, 80, 0, 0),
        3,
    );
    for answer in answers {
        assert_eq!(answer, ("pod-a".to_owned(), CLIENT_POD_IPS6[0].into()));
    }
}

/// A UDP datagram too big for the links (4 000 bytes: the sender's stack
/// fragments it, as IPv6 hosts do and routers never) and its 6 000-byte
/// answer (fragmented by the backend's stack), over IPv6: from a pod to a
/// cluster IP whose endpoint is on the other node, and from a client
/// outside to a node port whose endpoint is on the other node (SNATed,
/// every fragment routed by the program). Whole both ways.
#[test]
fn udp_datagrams_fragmented_by_their_ipv6_senders_reach_the_backend_and_the_client_whole() {
    let mut cluster = cluster6("lbdf", "NodePort", "", "", &[1]);
    cluster
        .wait_for_maps("the IPv6 node port", |m| {
            let at = |node: usize| frontend(NODE_IPS6[node].into(), 30053, "UDP");
            m.count(&at(0)).or(m.count(&at(1))) == Some(1)
        })
        .unwrap();
    let query_sized = |ns: &NetNs, to: SocketAddrV6| {
        ns.run(|| lb_tests::servers::udp_query_sized(to.into(), 4000, 6000))
            .unwrap_or_else(|e| panic!("to {to}: {e}"))
    };
    let vip = SocketAddrV6::new(CLUSTER_IP6, 53, 0, 0);
    let (line, len, from) = query_sized(&cluster.client_pods[0], vip);
    assert_eq!(len, 6000, "{line}");
    assert!(
        line.starts_with(&format!("pod-b client [{}]:", CLIENT_POD_IPS6[0]))
            && line.ends_with(" got 4000"),
        "{line}"
    );
    assert_eq!(from, vip.into());

    let (line, len, from) = query_sized(&cluster.clients[0], node_port6(0, 30053));
    assert_eq!(len, 6000, "{line}");
    assert!(
        line.starts_with(&format!("pod-b client [{}]:", NODE_IPS6[0]))
            && line.ends_with(" got 4000"),
        "{line}"
    );
    assert_eq!(from, node_port6(0, 30053).into());
    // Query and answer are three and five fragments: two and four follow
    // their first, on each of the two flows.
    let counters = lb_agent::cli::inspect::counters(&cluster.agents[0].pin_dir).unwrap();
    let translated = counters.iter().find(|(n, _)| *n == "frag_translated");
    assert_eq!(translated.map(|(_, v)| *v), Some(12));
}

/// Services' "should only allow access from service loadbalancer source
/// ranges", over IPv6: the load-balancer IP admits the client in its
/// range (answers from both nodes' pods) and drops the other's packets,
/// counted on node-a; the range opened to both, both get through.
#[test]
fn should_only_allow_access_from_ipv6_load_balancer_source_ranges() {
    let status = format!("status: {{loadBalancer: {{ingress: [{{ip: \"{LB_IP6}\"}}]}}}}");
    let ranges = |list: &str| format!("loadBalancerSourceRanges: [{list}]");
    let first = ranges(&format!("\"{}/128\"", CLIENT_IPS6[0]));
    let mut cluster = cluster6("lbda", "LoadBalancer", &first, &status, &[0, 1]);
    let lb = frontend(LB_IP6.into(), 80, "TCP");
    let admitted = format!("{}/128", CLIENT_IPS6[0]);
    cluster
        .wait_for_maps("the range", |m| {
            m.frontend(&lb)
                .is_some_and(|f| f.source_ranges == [admitted.clone()])
        })
        .unwrap();
    let addr = SocketAddrV6::new(LB_IP6, 80, 0, 0);
    let answers = requests6(&cluster.clients[0], addr, 20);
    assert_eq!(answers.len(), 20, "inside the range");
    let dropped = || {
        let counters = lb_agent::cli::inspect::counters(&cluster.agents[0].pin_dir).unwrap();
        counters
            .iter()
            .find(|(n, _)| *n == "drop_source_range")
            .unwrap()
            .1
    };
    let before = dropped();
    let refused = cluster.clients[1].run(|| http_get(addr).is_err());
    assert!(refused, "outside the range: no answer");
    assert!(dropped() > before, "dropped by the range check at node-a");

    let both = ranges(&format!(
        "\"{}/128\", \"{}/127\"",
        CLIENT_IPS6[0], CLIENT_IPS6[1]
    ));
    let endpoints = [(POD_IPS6[0], NODE_NAMES[0]), (POD_IPS6[1], NODE_NAMES[1])];
    cluster
        .set_manifest(&web_service(
            "LoadBalancer",
            CLUSTER_IP6,
            &both,
            &status,
            &endpoints,
        ))
        .unwrap();
    cluster
        .wait_for_maps("both ranges", |m| {
            m.frontend(&lb).is_some_and(|f| f.source_ranges.len() == 2)
        })
        .unwrap();
    assert_eq!(requests6(&cluster.clients[1], addr, 5).len(), 5);
}

/// `explain` on a dual-stack Service: the name answers an A and an AAAA
/// record (a headless dual-stack Service: its ready pods of both
/// families), and with a client of each family (`--client` twice) each
/// family's frontend gets the pick of its client — the backend a real
/// connection from that client and port then gets.
#[test]
fn explain_answers_a_and_aaaa_and_picks_what_each_familys_connection_gets() {
    let headless = format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: demo}}
spec:
  clusterIP: None
  clusterIPs: [None]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports: [{{name: pg, port: 5432}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-v4, namespace: demo, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv4
ports: [{{name: pg, port: 5432, protocol: TCP}}]
endpoints:
- addresses: ["{}"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: db-v6, namespace: demo, labels: {{kubernetes.io/service-name: db}}}}
addressType: IPv6
ports: [{{name: pg, port: 5432, protocol: TCP}}]
endpoints:
- addresses: ["{}"]
- addresses: ["{}"]
  conditions: {{ready: false}}
"#,
        backend_ip(0),
        backend_ip6(0),
        backend_ip6(1),
    );
    let web = manifest(&dual(), &[0, 1, 2], &[0, 1, 2]);
    let mut s = setup("lbdx", 3, &(web + &headless));
    s.agent
        .wait_for_maps("both families", |m| {
            m.count(&frontend(VIP.into(), 80, "TCP")) == Some(3)
                && m.count(&frontend(VIP6.into(), 80, "TCP")) == Some(3)
        })
        .unwrap();
    let pins = s.agent.pin_dir.clone();
    let dir = s.manifests.0.to_string_lossy().into_owned();
    let record = |kind: &str, value: String| serde_json::json!({"type": kind, "value": value});

    let mut seen = BTreeSet::new();
    for port in 41000..41006 {
        let clients: [SocketAddr; 2] = [(CLIENT_IP, port).into(), (CLIENT_IP6, port).into()];
        let e = agent_json(
            &pins,
            "explain",
            &[
                "web.demo:http",
                "--client",
                &clients[0].to_string(),
                "--client",
                &clients[1].to_string(),
                "--manifests",
                &dir,
            ],
        );
        assert_eq!(
            e["dns"]["records"],
            serde_json::json!([
                record("A", VIP.to_string()),
                record("AAAA", VIP6.to_string())
            ])
        );
        let frontends = e["frontends"].as_array().unwrap();
        assert_eq!(frontends.len(), 2, "the http port of each family: {e:#}");
        for (client, vip) in clients.into_iter().zip(dual()) {
            let f = frontends
                .iter()
                .find(|f| f["frontend"] == frontend(vip, 80, "TCP"))
                .unwrap_or_else(|| panic!("no frontend at {vip}: {e:#}"));
            assert_eq!(f["pick"]["client"], client.to_string());
            let program = if vip.is_ipv6() {
                "lb_ingress6"
            } else {
                "lb_ingress"
            };
            assert_eq!(f["pick"]["program"], program);
            // The endpoints of the frontend's own family, all in its slots.
            let endpoints = f["endpoints"].as_array().unwrap();
            assert_eq!(endpoints.len(), 3, "{f:#}");
            assert!(
                endpoints.iter().all(|e| e["in_datapath"] == true
                    && e["address"]
                        .as_str()
                        .is_some_and(|a| a.contains(':') == vip.is_ipv6())),
                "{f:#}"
            );
            assert_eq!(
                f["pick"]["events"],
                serde_json::json!(["dnat_new"]),
                "{f:#}"
            );
            let picked = f["pick"]["backend"].as_str().unwrap().to_owned();
            let body = s
                .topology
                .client
                .run(|| lb_tests::servers::http_get_from(client, SocketAddr::new(vip, 80)))
                .expect("HTTP from a fixed port");
            let index: usize = body
                .split_whitespace()
                .nth(1)
                .and_then(|name| name.trim_start_matches("be").parse().ok())
                .unwrap_or_else(|| panic!("answer {body:?}"));
            let backend: IpAddr = if vip.is_ipv6() {
                backend_ip6(index).into()
            } else {
                backend_ip(index).into()
            };
            assert_eq!(
                picked,
                SocketAddr::new(backend, 8080).to_string(),
                "{client}: explain said {picked}, the connection got {body}"
            );
            seen.insert(picked);
        }
    }
    assert!(
        seen.iter().filter(|b| b.starts_with('[')).count() > 1,
        "the IPv6 picks spread over backends: {seen:?}"
    );

    // An address query for the IPv6 cluster IP, bracketed with its port.
    let e = agent_json(&pins, "explain", &[&format!("[{VIP6}]:80")]);
    assert_eq!(
        e["frontends"][0]["frontend"],
        frontend(VIP6.into(), 80, "TCP")
    );
    assert_eq!(e["dns"], serde_json::Value::Null);

    let db = agent_json(&pins, "explain", &["db.demo", "--manifests", &dir]);
    assert_eq!(
        db["dns"]["records"],
        serde_json::json!([
            record("A", backend_ip(0).to_string()),
            record("AAAA", backend_ip6(0).to_string())
        ]),
        "the ready pods of each family"
    );
}

/// dual_stack.go "should function for endpoint-Service: http" and "…:
/// udp", over IPv6 on two nodes: an endpoint of the Service (pod-a)
/// reaches its cluster IP and every endpoint answers — pod-a itself
/// through the hairpin (seeing node-a's IPv6 SNAT address), pod-b on the
/// other node seeing pod-a's own address; UDP answers come from the
/// cluster IP.
#[test]
fn should_function_for_endpoint_service_http_and_udp_over_ipv6() {
    let mut cluster = cluster6("lbdb", "ClusterIP", "", "", &[0, 1]);
    let vip = frontend(CLUSTER_IP6.into(), 80, "TCP");
    cluster
        .wait_for_maps("both endpoints", |m| m.count(&vip) == Some(2))
        .unwrap();
    let answers = requests6(
        &cluster.pods[0],
        SocketAddrV6::new(CLUSTER_IP6, 80, 0, 0),
        40,
    );
    for (backend, seen) in &answers {
        let expected: IpAddr = if backend == "pod-a" {
            NODE_IPS6[0].into()
        } else {
            POD_IPS6[0].into()
        };
        assert_eq!(*seen, expected, "{backend}");
    }
    let udp = SocketAddrV6::new(CLUSTER_IP6, 53, 0, 0);
    let datagrams: Vec<(String, SocketAddr)> = cluster.pods[0].run(|| {
        (0..30)
            .map(|_| udp_query(udp).expect("UDP answer"))
            .collect()
    });
    for pod in ["pod-a", "pod-b"] {
        assert!(
            answers.iter().any(|(b, _)| b == pod),
            "{pod} never answered TCP: {answers:?}"
        );
        assert!(
            datagrams.iter().any(|(a, _)| a.starts_with(pod)),
            "{pod} never answered UDP: {datagrams:?}"
        );
    }
    assert!(datagrams.iter().all(|(_, from)| *from == udp.into()));
}

/// dual_stack.go "should be able to handle large requests: http" and
/// "…: udp": through each cluster IP of a dual-stack Service, a 4 MiB
/// upload arrives whole (the sink counts it) and a 3 000-byte UDP query
/// (fragmented by the sender) gets its 3 000-byte answer (fragmented by
/// the backend) from the cluster IP.
#[test]
fn should_be_able_to_handle_large_requests_http_and_udp() {
    let mut s = setup("lbdc", 2, &manifest(&dual(), &[0, 1], &[0, 1]));
    s.agent
        .wait_for_maps("both families", |m| {
            m.count(&frontend(VIP.into(), 80, "TCP")) == Some(2)
                && m.count(&frontend(VIP6.into(), 53, "UDP")) == Some(2)
        })
        .unwrap();
    for vip in dual() {
        s.topology
            .client
            .run(|| lb_tests::servers::sink_transfer(SocketAddr::new(vip, 80), 4 << 20))
            .unwrap_or_else(|e| panic!("4 MiB to {vip}: {e}"));
        for i in 0..4 {
            let (answer, len, from) = s
                .topology
                .client
                .run(|| lb_tests::servers::udp_query_sized(SocketAddr::new(vip, 53), 3000, 3000))
                .unwrap_or_else(|e| panic!("large UDP query {i} to {vip}: {e}"));
            assert_eq!(len, 3000, "{answer}");
            assert!(answer.starts_with("be"), "{answer}");
            assert_eq!(from, SocketAddr::new(vip, 53));
        }
    }
}

/// dual_stack.go "should function for service endpoints using
/// hostNetwork", over IPv6 on two nodes: the Service's endpoints are the
/// nodes' own IPv6 addresses (hostNetwork pods); a pod on node-a reaches
/// both through the cluster IP — node-a's delivered locally, node-b's
/// routed — each seeing the pod's own address, UDP answers from the
/// cluster IP.
#[test]
fn should_function_for_service_endpoints_using_host_network_over_ipv6() {
    require_root();
    let endpoints = [(NODE_IPS6[0], NODE_NAMES[0]), (NODE_IPS6[1], NODE_NAMES[1])];
    let mut cluster = Cluster::without_agents("lbdd").expect("cluster");
    cluster.add_ipv6().expect("IPv6 addresses");
    let _host_servers: Vec<BackendServers> = (0..2)
        .map(|i| {
            let name = ["node-a", "node-b"][i];
            BackendServers::start_on(&cluster.nodes[i], NODE_IPS6[i], name, 8080, 5353)
                .expect("servers on the node")
        })
        .collect();
    cluster
        .start_agents(
            &web_service("ClusterIP", CLUSTER_IP6, "", "", &endpoints),
            &[],
        )
        .expect("agents");
    let vip = frontend(CLUSTER_IP6.into(), 80, "TCP");
    cluster
        .wait_for_maps("both node endpoints", |m| m.count(&vip) == Some(2))
        .unwrap();
    let client = &cluster.client_pods[0];
    let answers = requests6(client, SocketAddrV6::new(CLUSTER_IP6, 80, 0, 0), 30);
    let udp = SocketAddrV6::new(CLUSTER_IP6, 53, 0, 0);
    let datagrams: Vec<(String, SocketAddr)> =
        client.run(|| (0..30).map(|_| udp_query(udp).expect("UDP")).collect());
    for node in ["node-a", "node-b"] {
        assert!(
            answers.iter().any(|(b, _)| b == node),
            "{node} never answered TCP: {answers:?}"
        );
        assert!(
            datagrams.iter().any(|(a, _)| a.starts_with(node)),
            "{node} never answered UDP: {datagrams:?}"
        );
    }
    let own: IpAddr = CLIENT_POD_IPS6[0].into();
    assert!(answers.iter().all(|(_, seen)| *seen == own), "{answers:?}");
    assert!(datagrams.iter().all(|(_, from)| *from == udp.into()));
}

/// Path-MTU discovery through an IPv6 cluster IP (routers never fragment
/// IPv6: without it a transfer stalls). The backend's link is narrower
/// (1280, IPv6's minimum) than the client's and the backend's own (1500),
/// so the node answers full-size segments with Packet Too Big quoting the
/// packet as it forwarded it (to the backend); translated at the client's
/// interface, it reaches the client's socket (to the cluster IP), whose
/// route learns the MTU, and the transfer completes in smaller segments.
#[test]
fn pmtu_discovery_through_an_ipv6_cluster_ip_completes_a_1mb_transfer() {
    let mut s = setup("lbde", 1, &manifest(&[VIP6.into()], &[], &[0]));
    s.agent
        .wait_for_maps("the IPv6 Service", |m| {
            m.count(&frontend(VIP6.into(), 80, "TCP")) == Some(1)
        })
        .unwrap();
    s.topology
        .node
        .ip(&["link", "set", "lbde-b0", "mtu", "1280"])
        .unwrap();
    let bytes = 1 << 20;
    let received = s
        .topology
        .client
        .run(|| lb_tests::servers::bounded_sink_transfer(SocketAddr::from((VIP6, 80)), bytes))
        .expect("the 1 MB transfer through the IPv6 cluster IP completes");
    assert_eq!(received, bytes.to_string());
    let counters = lb_agent::cli::inspect::counters(&s.agent.pin_dir).unwrap();
    let translated = counters
        .iter()
        .find(|(n, _)| *n == "icmp_translated")
        .unwrap()
        .1;
    assert!(
        translated >= 1,
        "no ICMPv6 error was translated: {counters:?}"
    );
    let route = s.topology.client.route_get(VIP6);
    assert!(
        route.contains("mtu 1280"),
        "client's route to the cluster IP: {route}"
    );
}
