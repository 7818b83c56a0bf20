//! End to end: the lb-agent binary in a node namespace, real TCP/UDP clients
//! and servers in pod namespaces, veth pairs, addresses in 198.18.0.0/15.
//! Everything a test creates is removed on drop, also when it fails.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::PathBuf,
};

use lb_tests::{
    require_root,
    servers::{http_get, udp_query, BackendServers, EchoConnection, IO_TIMEOUT},
    topology::{backend_ip, web_manifest, Agent, ScratchDir, Topology, CLIENT_IP, VIP},
    wait_until,
};

const PORTS: (u16, u16) = (8080, 5353);

struct Setup {
    agent: Agent,
    manifests: ScratchDir,
    _servers: Vec<BackendServers>,
    topology: Topology,
}

/// A topology with `n` backends running servers, and an agent programming `manifest`.
fn setup(prefix: &str, n: usize, manifest: &str) -> Setup {
    setup_with(prefix, n, manifest, &[])
}

/// One backend behind the VIP, programmed.
fn serving_one_backend(prefix: &str) -> Setup {
    let mut s = setup(prefix, 1, &web_manifest(&ready(&[backend_ip(0)])));
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    s
}

fn setup_with(prefix: &str, n: usize, manifest: &str, agent_args: &[&str]) -> Setup {
    require_root();
    let topology = Topology::new(prefix, n).expect("topology");
    let servers = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new(&format!("{prefix}-manifests")).expect("scratch dir");
    manifests.write("web.yaml", manifest).expect("manifest");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{prefix}-test"));
    let log = manifests.0.join("agent.log"); // not a manifest: ignored by the agent
    let agent = Agent::start(
        &topology.node,
        &manifests.0,
        &topology.interface_pattern(),
        &pin_dir,
        &log,
        agent_args,
    )
    .expect("agent");
    Setup {
        agent,
        manifests,
        _servers: servers,
        topology,
    }
}

impl Setup {
    /// Rewrites the manifest to serve exactly `backends`; waits until
    /// `frontend` (`ADDR:PORT/PROTO`) has exactly those.
    fn set_backends(&mut self, backends: &[Ipv4Addr], frontend: &str) {
        self.manifests
            .write("web.yaml", &web_manifest(&ready(backends)))
            .unwrap();
        let want: BTreeSet<Ipv4Addr> = backends.iter().copied().collect();
        self.agent
            .wait_for_maps(frontend, |m| {
                m.backends(frontend).into_iter().collect::<BTreeSet<_>>() == want
            })
            .unwrap();
    }

    /// Starts the next agent on the same pins (the previous one has exited
    /// or been killed, leaving them), logging to `log_name`.
    fn restart_agent(&mut self, log_name: &str) {
        self.restart_agent_with(log_name, &[]);
    }

    fn restart_agent_with(&mut self, log_name: &str, args: &[&str]) {
        self.agent.cleanup_pins = false;
        let pin_dir = self.agent.pin_dir.clone();
        self.agent = Agent::start(
            &self.topology.node,
            &self.manifests.0,
            &self.topology.interface_pattern(),
            &pin_dir,
            &self.manifests.0.join(log_name),
            args,
        )
        .unwrap();
    }
}

/// `backends` without backend number `index`.
fn all_but(backends: &[Ipv4Addr], index: usize) -> Vec<Ipv4Addr> {
    backends
        .iter()
        .copied()
        .filter(|b| *b != backend_ip(index))
        .collect()
}

fn ready(ips: &[Ipv4Addr]) -> Vec<(Ipv4Addr, bool)> {
    ips.iter().map(|ip| (*ip, true)).collect()
}

fn backend_of(body: &str) -> String {
    body.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn tcp_and_udp_clients_reach_every_backend_through_the_vip() {
    let backends: Vec<Ipv4Addr> = (0..3).map(backend_ip).collect();
    let mut s = setup("lbt1", 3, &web_manifest(&ready(&backends)));
    s.agent
        .wait_for_maps("3 TCP backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(3)
        })
        .unwrap();

    let (tcp_seen, udp_seen) = s.topology.client.run(|| {
        let mut tcp_seen = BTreeSet::new();
        let mut udp_seen = BTreeSet::new();
        for _ in 0..60 {
            let body = http_get(SocketAddrV4::new(VIP, 80)).expect("HTTP through the VIP");
            // The backend saw the real client address: no SNAT.
            assert!(
                body.contains(&format!("client {CLIENT_IP}:")),
                "backend saw {body:?}"
            );
            tcp_seen.insert(backend_of(&body));
            let (answer, from) =
                udp_query(SocketAddrV4::new(VIP, 53)).expect("UDP through the VIP");
            assert_eq!(
                from,
                SocketAddr::from((VIP, 53)),
                "UDP answers must come from the VIP"
            );
            udp_seen.insert(
                answer
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        (tcp_seen, udp_seen)
    });
    let all: BTreeSet<String> = ["be0", "be1", "be2"].map(String::from).into();
    assert_eq!(tcp_seen, all, "every backend answers TCP");
    assert_eq!(udp_seen, all, "every backend answers UDP");
    let counters = lb_agent::cli::inspect::counters(&s.agent.pin_dir).unwrap();
    let get = |name: &str| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    // Every TCP connection is a new flow (a reused port reopens its tuple);
    // a UDP socket that reuses a port within the UDP timeout is a conntrack
    // hit. Each request and its answer crossed the datapath.
    assert!(get("dnat_new") >= 60, "{counters:?}");
    assert!(
        get("dnat_new") + get("dnat_ct_hit") >= 60 * 4 + 60 && get("rev_nat") >= 60 * 3 + 60,
        "{counters:?}"
    );
    for drop in [
        "drop_backend_missing",
        "drop_ct_full",
        "drop_rewrite",
        "pass_malformed",
    ] {
        assert_eq!(get(drop), 0, "{drop}: {counters:?}");
    }
}

#[test]
fn removing_a_backend_moves_new_connections_but_keeps_established_ones() {
    let backends: Vec<Ipv4Addr> = (0..3).map(backend_ip).collect();
    let mut s = setup("lbt2", 3, &web_manifest(&ready(&backends)));
    s.agent
        .wait_for_maps("3 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(3)
        })
        .unwrap();

    let mut established = s
        .topology
        .client
        .run(|| EchoConnection::open(SocketAddrV4::new(VIP, 80)))
        .expect("connect");
    let kept = established.ask().expect("echo");
    let kept_index: usize = kept.trim_start_matches("be").parse().unwrap();

    s.set_backends(&all_but(&backends, kept_index), &format!("{VIP}:80/TCP"));

    let seen: BTreeSet<String> = s.topology.client.run(|| {
        (0..40)
            .map(|_| backend_of(&http_get(SocketAddrV4::new(VIP, 80)).expect("new connection")))
            .collect()
    });
    assert!(
        !seen.contains(&kept),
        "new connections must avoid the removed backend {kept}: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        2,
        "new connections use both remaining backends: {seen:?}"
    );
    for _ in 0..3 {
        assert_eq!(
            established
                .ask()
                .expect("established connection still works"),
            kept
        );
    }
}

/// A TCP connection and a connected UDP socket to the VIP are refused by
/// an ICMP port unreachable, not left to time out.
fn refused_at_once(client: &lb_tests::netns::NetNs) {
    client.run(|| {
        let started = std::time::Instant::now();
        let err = std::net::TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), IO_TIMEOUT)
            .expect_err("no backend");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "TCP: {err}");
        assert!(started.elapsed() < IO_TIMEOUT, "refused, not timed out");

        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        udp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        udp.connect((VIP, 53)).unwrap();
        udp.send(b"anyone?").unwrap();
        let err = udp.recv(&mut [0u8; 64]).expect_err("no backend");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "UDP: {err}");
    });
}

#[test]
fn service_without_ready_endpoints_refuses_connections_at_once() {
    let not_ready = vec![(backend_ip(0), false)];
    let mut s = setup("lbt3", 1, &web_manifest(&not_ready));
    s.agent
        .wait_for_maps("service with no backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(0)
        })
        .unwrap();

    refused_at_once(&s.topology.client);

    // Once an endpoint becomes ready, the same service serves.
    s.manifests
        .write("web.yaml", &web_manifest(&[(backend_ip(0), true)]))
        .unwrap();
    s.agent
        .wait_for_maps("one ready backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let body = s
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("served after becoming ready");
    assert_eq!(backend_of(&body), "be0");
}

/// The same over a node link that computes no checksums (`tx off`, as on
/// a VM NIC without offload). The client's SYN and datagram arrive with
/// their transport checksum still owed (CHECKSUM_PARTIAL, from its socket
/// over the veth); the answers are built in those packets, so the kernel
/// computes the owed checksum as they leave, over the answer: unless the
/// answer neutralises it, it lands on the quoted header's TTL and protocol,
/// the client drops the error as corrupt and the connection times out.
#[test]
fn service_without_endpoints_refuses_at_once_over_a_link_without_checksum_offload() {
    let mut s = setup("lbt24", 1, &web_manifest(&[(backend_ip(0), false)]));
    s.topology.node.tx_checksum_off("lbt24-c").unwrap();
    s.agent
        .wait_for_maps("service with no backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(0)
        })
        .unwrap();
    refused_at_once(&s.topology.client);
}

#[test]
fn interfaces_that_appear_later_are_attached() {
    let mut s = setup("lbt4", 1, &web_manifest(&ready(&[backend_ip(0)])));
    s.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    // A new pod (and its veth on the node) after the agent started.
    let i = s.topology.add_backend().unwrap();
    let _servers = BackendServers::start(&s.topology.backends[i], "be1", PORTS.0, PORTS.1).unwrap();
    s.manifests
        .write("web.yaml", &web_manifest(&ready(&[backend_ip(i)])))
        .unwrap();
    s.agent
        .wait_for_maps("the new backend", |m| {
            m.backends(&format!("{VIP}:80/TCP")) == [backend_ip(i)]
        })
        .unwrap();
    // Replies from the new pod are reverse-NATed only if its interface got the program.
    let (answer, from) = s
        .topology
        .client
        .run(|| udp_query(SocketAddrV4::new(VIP, 53)))
        .expect("UDP via the new pod");
    assert!(answer.starts_with("be1"), "{answer}");
    assert_eq!(from, SocketAddr::from((VIP, 53)));
}

#[test]
fn sigterm_detaches_and_unpins() {
    let mut s = setup("lbt5", 1, &web_manifest(&ready(&[backend_ip(0)])));
    s.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("served while the agent runs");
    let status = s.agent.stop().unwrap();
    assert!(
        status.success(),
        "clean exit: {status}\n{}",
        s.agent.log_text()
    );
    assert!(!s.agent.pin_dir.exists(), "pins removed on exit");
    // Without the program the VIP is just an unroutable address.
    let result = s
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)));
    assert!(
        result.is_err(),
        "VIP must not answer after the agent detached: {result:?}"
    );
}

#[test]
fn bad_interface_pattern_is_a_clear_error() {
    require_root();
    let topology = Topology::new("lbt6", 0).unwrap();
    let manifests = ScratchDir::new("lbt6-manifests").unwrap();
    let log = manifests.0.join("agent.log");
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbt6-test");
    let mut agent =
        Agent::start(&topology.node, &manifests.0, "nosuch*", &pin_dir, &log, &[]).unwrap();
    let err = agent
        .wait_for_maps("never", |_| false)
        .expect_err("agent must exit");
    assert!(
        err.to_string()
            .contains("--external-interfaces: pattern(s) nosuch*, @uplink match no interface"),
        "{err}"
    );
    assert!(!pin_dir.exists(), "nothing pinned on a start-up error");
}

/// A restart asking for other table sizes keeps the pinned tables (and
/// their flows) and warns for each, in both families: resizing needs the
/// pins removed.
#[test]
fn a_restart_with_other_table_sizes_keeps_the_pinned_tables_and_warns() {
    let backends = [backend_ip(0)];
    let mut s = setup_with(
        "lbt14",
        1,
        &web_manifest(&ready(&backends)),
        &["--keep-datapath", "--max-conntrack", "4096"],
    );
    s.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    assert!(s.agent.stop().unwrap().success());
    s.restart_agent_with(
        "agent2.log",
        &["--log-format", "json", "--max-conntrack", "8192"],
    );
    // The pins already serve: the new agent's pass is what to wait for.
    lb_tests::wait_until(lb_tests::EVENT_TIMEOUT, || {
        s.agent.log_event("applied").is_some()
    });
    let pin_dir = s.agent.pin_dir.clone();
    for map in [lb_common::ct::CT_MAP, lb_common::ct::CT6_MAP] {
        let pinned = aya::maps::MapData::from_pin(pin_dir.join(map)).unwrap();
        assert_eq!(pinned.info().unwrap().max_entries(), 4096, "{map} kept");
        let warned = s
            .agent
            .log_events()
            .into_iter()
            .any(|e| e["map"] == map && e["pinned"] == 4096 && e["wanted"] == 8192);
        assert!(warned, "no warning for {map}:\n{}", s.agent.log_text());
    }
}

#[test]
fn keep_datapath_survives_an_agent_restart() {
    let backends: Vec<Ipv4Addr> = (0..2).map(backend_ip).collect();
    let mut s = setup_with(
        "lbt7",
        2,
        &web_manifest(&ready(&backends)),
        &["--keep-datapath"],
    );
    s.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let mut conn = s
        .topology
        .client
        .run(|| EchoConnection::open(SocketAddrV4::new(VIP, 80)))
        .expect("connect");
    let backend = conn.ask().unwrap();
    let status = s.agent.stop().unwrap();
    assert!(status.success(), "{}", s.agent.log_text());

    // No agent runs now; the datapath keeps serving established and new flows.
    let pin_dir = s.agent.pin_dir.clone();
    assert!(
        pin_dir.join(lb_common::svc::SVC_MAP).exists(),
        "maps stay pinned"
    );
    assert_eq!(
        conn.ask().expect("established flow without an agent"),
        backend
    );
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("new flow without an agent");

    // A new agent adopts the pinned maps without rewriting them, replaces the
    // pinned links with its own, and the connection survives it all.
    s.restart_agent_with("agent2.log", &["--log-format", "json"]);
    s.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let released = "released links pinned by a previous run";
    // After the new agent has loaded (the verifier's walk takes seconds on
    // a busy machine) and programmed: an agent's time, not a packet's.
    wait_until(lb_tests::EVENT_TIMEOUT, || {
        s.agent.log_event(released).is_some()
    });
    let log = s.agent.log_text();
    let first = s.agent.log_event("applied").expect("an applied pass");
    let counts = ["added", "updated", "removed", "unchanged"].map(|k| first[k].as_u64());
    assert_eq!(
        counts,
        [Some(0), Some(0), Some(0), Some(2)],
        "restart must adopt, not rewrite:\n{log}"
    );
    assert!(s.agent.log_event(released).is_some(), "{log}");
    assert_eq!(
        conn.ask().expect("established flow across the restart"),
        backend
    );
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("new flow after the restart");
    let status = s.agent.stop().unwrap();
    assert!(status.success());
    assert!(
        !pin_dir.exists(),
        "an agent without --keep-datapath cleans up on exit"
    );
    assert!(
        s.topology
            .client
            .run(|| http_get(SocketAddrV4::new(VIP, 80)))
            .is_err(),
        "and detaches"
    );
}

#[test]
fn manifest_edits_apply_without_waiting_for_the_poll() {
    // Polling once a minute: only the directory watch can apply the edit
    // within wait_for_maps' 15 s.
    let mut s = setup_with(
        "lbt8",
        2,
        &web_manifest(&ready(&[backend_ip(0)])),
        &["--poll-interval-ms", "60000"],
    );
    s.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    s.manifests
        .write(
            "web.yaml",
            &web_manifest(&ready(&[backend_ip(0), backend_ip(1)])),
        )
        .unwrap();
    s.agent
        .wait_for_maps("2 backends after the edit", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
}

/// Runs a command inside the namespace, returning its stdout.
fn in_ns(ns: &lb_tests::netns::NetNs, args: &[&str]) -> String {
    lb_tests::process::stdout_of(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args),
    )
}

#[test]
fn a_legacy_tc_filter_after_lb_still_sees_every_packet() {
    let mut s = setup("lbt9", 1, &web_manifest(&ready(&[backend_ip(0)])));
    s.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let direct = SocketAddrV4::new(backend_ip(0), PORTS.1);
    let client = &s.topology.client;
    client
        .run(|| udp_query(direct))
        .expect("direct UDP before the filter");
    // A legacy tc filter on the client's node interface, behind lb's TCX
    // programs: it steals UDP to port 5353 into a sink device (this kernel
    // has u32 and mirred; gact's plain "drop" may be missing).
    let node = &s.topology.node;
    let dev = format!("{}-c", s.topology.prefix);
    let sink = format!("{}sink", s.topology.prefix);
    node.ip(&[
        "link",
        "add",
        &sink,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{sink}p"),
    ])
    .unwrap();
    node.ip(&["link", "set", &sink, "up"]).unwrap();
    in_ns(node, &["tc", "qdisc", "add", "dev", &dev, "clsact"]);
    in_ns(
        node,
        &[
            "tc", "filter", "add", "dev", &dev, "ingress", "protocol", "ip", "u32", "match", "ip",
            "protocol", "17", "0xff", "match", "ip", "dport", "5353", "0xffff", "action", "mirred",
            "egress", "redirect", "dev", &sink,
        ],
    );
    let err = client
        .run(|| udp_query(direct))
        .expect_err("the filter must see (and drop) non-service traffic");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    // Translated packets continue down the chain too, as client → backend.
    let err = client
        .run(|| udp_query(SocketAddrV4::new(VIP, 53)))
        .expect_err("the filter sees the translated packet");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    // TCP is not matched by the filter and still flows.
    client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("TCP through the VIP");
}

#[test]
fn service_connections_survive_a_forward_chain_that_drops_invalid_conntrack() {
    let backends: Vec<Ipv4Addr> = (0..2).map(backend_ip).collect();
    let s = setup("lbt10", 2, &web_manifest(&ready(&backends)));
    let node = &s.topology.node;
    // What kube-proxy's KUBE-FORWARD, firewalld and many CNIs install.
    in_ns(node, &["nft", "add", "table", "ip", "lbtest"]);
    in_ns(
        node,
        &[
            "nft",
            "add chain ip lbtest forward_check { type filter hook forward priority 0; policy accept; }",
        ],
    );
    in_ns(
        node,
        &[
            "nft",
            "add",
            "rule",
            "ip",
            "lbtest",
            "forward_check",
            "ct",
            "state",
            "invalid",
            "counter",
            "drop",
        ],
    );
    let mut agent = s.agent;
    agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    s.topology.client.run(|| {
        for i in 0..20 {
            http_get(SocketAddrV4::new(VIP, 80))
                .unwrap_or_else(|e| panic!("TCP connection {i} through the VIP: {e}"));
            let (_, from) = udp_query(SocketAddrV4::new(VIP, 53)).expect("UDP through the VIP");
            assert_eq!(from, SocketAddr::from((VIP, 53)));
        }
    });
    let chain = in_ns(
        node,
        &["nft", "list", "chain", "ip", "lbtest", "forward_check"],
    );
    assert!(
        chain.contains("ct state invalid counter packets 0 bytes 0 drop"),
        "netfilter saw service packets as invalid:\n{chain}"
    );
}

/// Mirrors the upstream e2e "[sig-network] Conntrack should be able to
/// preserve UDP traffic when server pod cycles for a ClusterIP service": a
/// client keeping one UDP socket moves to a live backend when its backend
/// leaves the service.
#[test]
fn udp_client_moves_off_a_backend_that_left_the_service() {
    let backends: Vec<Ipv4Addr> = (0..2).map(backend_ip).collect();
    let mut s = setup("lbt11", 2, &web_manifest(&ready(&backends)));
    s.agent
        .wait_for_maps("2 UDP backends", |m| {
            m.count(&format!("{VIP}:53/UDP")) == Some(2)
        })
        .unwrap();
    let socket = s.topology.client.run(|| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        socket.connect((VIP, 53)).unwrap();
        socket
    });
    let ask = |socket: &UdpSocket| -> Option<String> {
        socket.send(b"who").ok()?;
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).ok()?;
        Some(backend_of_udp(&buf[..n]))
    };
    let first = ask(&socket).expect("first answer");
    assert_eq!(
        ask(&socket).as_deref(),
        Some(first.as_str()),
        "one flow, one backend"
    );
    let index: usize = first.trim_start_matches("be").parse().unwrap();
    s.set_backends(&all_but(&backends, index), &format!("{VIP}:53/UDP"));
    // The removed pod still runs and would answer: only a flushed flow moves.
    let deadline = std::time::Instant::now() + lb_tests::EVENT_TIMEOUT;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = ask(&socket);
        if last.as_deref().is_some_and(|b| b != first) {
            break;
        }
    }
    let moved = last.expect("answers keep coming");
    assert_ne!(
        moved, first,
        "the UDP flow still goes to the removed backend"
    );
    let want = format!("be{}", 1 - index);
    assert_eq!(moved, want);
}

fn backend_of_udp(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_killed_agent_leaves_the_datapath_serving_and_the_next_one_adopts_it() {
    let backends: Vec<Ipv4Addr> = (0..2).map(backend_ip).collect();
    let mut s = setup("lbt12", 2, &web_manifest(&ready(&backends)));
    s.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let mut conn = s
        .topology
        .client
        .run(|| EchoConnection::open(SocketAddrV4::new(VIP, 80)))
        .expect("connect");
    let backend = conn.ask().unwrap();
    s.agent.kill().unwrap(); // no --keep-datapath, no cleanup: a crash
    s.agent.cleanup_pins = false;
    assert_eq!(
        conn.ask().expect("established flow after the crash"),
        backend
    );
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("new flow after the crash");

    let pin_dir = s.agent.pin_dir.clone();
    let links = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = links(&pin_dir);
    assert_eq!(
        before.len(),
        2 * 3,
        "ingress and egress on 3 interfaces: {before:?}"
    );
    s.restart_agent("agent2.log");
    s.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    // The old maps already hold both backends: the swap of links is what
    // says the new agent serves, after it loaded and verified every program
    // (24 of them since the IPv6 fragment programs: seconds on 2 cores).
    wait_until(std::time::Duration::from_secs(60), || {
        links(&pin_dir).iter().all(|l| !before.contains(l))
    });
    let after = links(&pin_dir);
    assert_eq!(after.len(), 6, "{after:?}");
    assert!(
        after.iter().all(|l| !before.contains(l)),
        "the crashed run's links are released once the new ones serve: {after:?}"
    );
    assert_eq!(
        conn.ask().expect("established flow across the restart"),
        backend
    );
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("new flow after the restart");
}

#[test]
fn a_service_broken_while_the_agent_was_down_keeps_serving_after_the_restart() {
    let backends: Vec<Ipv4Addr> = (0..2).map(backend_ip).collect();
    let mut s = setup("lbt13", 2, &web_manifest(&ready(&backends)));
    s.agent
        .wait_for_maps("2 backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    s.agent.kill().unwrap();
    s.agent.cleanup_pins = false;
    // Edited while no agent runs: the Service no longer parses.
    let broken = web_manifest(&ready(&backends)).replace("port: 80,", "port: eighty,");
    assert_ne!(broken, web_manifest(&ready(&backends)));
    s.manifests.write("web.yaml", &broken).unwrap();
    s.restart_agent("agent2.log");
    // The new agent has reconciled once it released the old links.
    wait_until(std::time::Duration::from_secs(15), || {
        s.agent.log_text().contains("released links")
    });
    let maps = s
        .agent
        .wait_for_maps("the kept service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let kept = maps.frontend(&format!("{VIP}:80/TCP")).unwrap();
    assert_eq!(kept.service.as_deref(), Some("demo/web"), "{}", maps.text);
    let seen: BTreeSet<String> = s.topology.client.run(|| {
        (0..20)
            .map(|_| backend_of(&http_get(SocketAddrV4::new(VIP, 80)).expect("still served")))
            .collect()
    });
    assert_eq!(seen.len(), 2, "{seen:?}");
    let log = s.agent.log_text();
    assert!(log.contains("released links"), "{log}");
}

/// GET `path` on the agent's health port in the node namespace: (status, body).
fn health_get(node: &lb_tests::netns::NetNs, path: &str) -> (u16, String) {
    node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:10256").expect("health port");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    })
}

#[test]
fn healthz_fails_while_a_change_cannot_reach_the_datapath_and_livez_stays_ok() {
    let mut s = setup_with(
        "lbt14",
        2,
        &web_manifest(&ready(&[backend_ip(0)])),
        &[
            "--max-backends",
            "2", // one per port: room for exactly one endpoint
            "--health-timeout",
            "1s",
            "--health-addr",
            "127.0.0.1:10256",
        ],
    );
    s.agent
        .wait_for_maps("1 backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let node = &s.topology.node;
    let wait_for = |want: u16| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (status, body) = health_get(node, "/healthz");
            if status == want || std::time::Instant::now() > deadline {
                return (status, body);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let (status, body) = wait_for(200);
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["lastUpdated"].is_string() && json["pendingSince"].is_null(),
        "{json}"
    );

    // A second endpoint does not fit in the backends map: the change waits.
    s.manifests
        .write(
            "web.yaml",
            &web_manifest(&ready(&[backend_ip(0), backend_ip(1)])),
        )
        .unwrap();
    let (status, body) = wait_for(503);
    assert_eq!(
        status, 503,
        "unhealthy once the change waited past the timeout: {body}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(json["pendingSince"].is_string(), "{json}");
    assert_eq!(
        health_get(node, "/readyz").0,
        200,
        "still ready: it did sync"
    );
    assert_eq!(
        health_get(node, "/livez").0,
        200,
        "alive: a restart would not make the change fit"
    );
    // The datapath kept serving its last good state meanwhile.
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("served");

    s.manifests
        .write("web.yaml", &web_manifest(&ready(&[backend_ip(0)])))
        .unwrap();
    let (status, body) = wait_for(200);
    assert_eq!(status, 200, "healthy again once the change is in: {body}");
}

/// A Service of `external_ips` external IPs from 198.19.40.0 up, one port,
/// one endpoint.
fn huge_manifest(external_ips: usize) -> String {
    let ips: Vec<String> = (0..external_ips)
        .map(|i| format!("\"198.19.{}.{}\"", 40 + i / 256, i % 256))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: huge, namespace: default}}\nspec:\n  clusterIP: 198.19.1.1\n  \
         externalIPs: [{}]\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: huge-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: huge}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
         endpoints:\n- addresses: [\"{}\"]\n",
        ips.join(", "),
        backend_ip(0)
    )
}

/// One Service with 50 001 frontends (more than half the node's 16-bit
/// reverse-NAT ids): past `--max-frontends-per-service`, it is refused as
/// that Service's input error — the others keep being served and updated,
/// and the node stays healthy (nothing waits for a retry). Within the
/// budget, it is programmed.
#[test]
fn a_service_past_its_frontend_budget_is_refused_and_the_node_stays_healthy() {
    let mut s = setup_with(
        "lbt16",
        2,
        &web_manifest(&ready(&[backend_ip(0)])),
        &["--health-timeout", "1s", "--health-addr", "127.0.0.1:10256"],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    s.manifests
        .write("huge.yaml", &huge_manifest(50_000))
        .unwrap();
    let node = &s.topology.node;
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);
    let invalid = || {
        lb_tests::metrics::scrape(node, metrics)
            .map(|m| m.get("lb_invalid_services"))
            .unwrap_or(-1.0)
    };
    assert!(
        wait_until(std::time::Duration::from_secs(30), || invalid() == 1.0),
        "the Service is reported invalid"
    );
    // A later change to another Service still goes through.
    s.manifests
        .write(
            "web.yaml",
            &web_manifest(&ready(&[backend_ip(0), backend_ip(1)])),
        )
        .unwrap();
    let maps = s
        .agent
        .wait_for_maps("web's second backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    assert!(
        !maps.has_address(Ipv4Addr::new(198, 19, 1, 1))
            && !maps.has_address(Ipv4Addr::new(198, 19, 40, 0)),
        "nothing of the refused Service is programmed"
    );
    std::thread::sleep(std::time::Duration::from_secs(2)); // past --health-timeout
    let (status, body) = health_get(node, "/healthz");
    assert_eq!(status, 200, "an input error leaves nothing pending: {body}");
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .expect("the other Service is served");

    // Within the budget, the same Service is programmed.
    s.manifests.write("huge.yaml", &huge_manifest(3)).unwrap();
    s.agent
        .wait_for_maps("the Service within its budget", |m| {
            m.count("198.19.1.1:80/TCP") == Some(1) && m.count("198.19.40.2:80/TCP") == Some(1)
        })
        .unwrap();
    assert!(wait_until(std::time::Duration::from_secs(10), || invalid() == 0.0));
    s.topology
        .client
        .run(|| http_get(SocketAddrV4::new(Ipv4Addr::new(198, 19, 40, 2), 80)))
        .expect("served at an external IP");
}

/// `--icmp-errors-per-second 1 --icmp-errors-burst 3`: of 12 UDP queries
/// sent at once to a Service without endpoints, 3 are refused (ICMP port
/// unreachable), the others go unanswered; about a second later, one more.
#[test]
fn icmp_errors_for_a_service_without_endpoints_are_rate_limited() {
    let mut s = setup_with(
        "lbt17",
        0,
        &web_manifest(&[]),
        &["--icmp-errors-per-second", "1", "--icmp-errors-burst", "3"],
    );
    s.agent
        .wait_for_maps("the service without endpoints", |m| {
            m.count(&format!("{VIP}:53/UDP")) == Some(0)
        })
        .unwrap();
    // Each query from its own connected socket: a refusal shows as
    // ECONNREFUSED on that socket.
    let refused = |queries: usize| -> usize {
        s.topology.client.run(|| {
            lb_tests::pin_to_cpu0(); // sent from one CPU: one bucket
            let sockets: Vec<UdpSocket> = (0..queries)
                .map(|_| {
                    let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                    udp.connect((VIP, 53)).unwrap();
                    udp
                })
                .collect();
            for udp in &sockets {
                udp.send(b"anyone?").unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            sockets
                .iter()
                .filter(|udp| {
                    udp.set_nonblocking(true).unwrap();
                    match udp.recv(&mut [0u8; 64]) {
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => true,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                        other => panic!("no backend, yet {other:?}"),
                    }
                })
                .count()
        })
    };
    assert_eq!(refused(12), 3, "the burst");
    let counters = lb_agent::cli::inspect::counters(&s.agent.pin_dir).unwrap();
    let count = |name: &str| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_eq!(count("reject_no_backend"), 3, "{counters:?}");
    assert_eq!(count("drop_icmp_rate_limited"), 9, "{counters:?}");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    // ≈ 1.3 s since the bucket was filled: one token (two only if the
    // machine stalled this test for most of a second).
    let later = refused(5);
    assert!((1..=2).contains(&later), "one token a second, got {later}");
}

#[test]
fn uplink_token_attaches_to_the_default_route_interface_and_follows_it() {
    require_root();
    let topology = Topology::new("lbt15", 0).unwrap();
    let node = &topology.node;
    node.ip(&[
        "link", "add", "lbt15up", "type", "veth", "peer", "name", "lbt15uq",
    ])
    .unwrap();
    for dev in ["lbt15up", "lbt15uq"] {
        node.ip(&["link", "set", dev, "up"]).unwrap();
    }
    node.ip(&["addr", "add", "198.18.200.1/24", "dev", "lbt15up"])
        .unwrap();
    node.ip(&["route", "add", "default", "via", "198.18.200.2"])
        .unwrap();
    let manifests = ScratchDir::new("lbt15-manifests").unwrap();
    manifests
        .write("web.yaml", &web_manifest(&ready(&[backend_ip(0)])))
        .unwrap();
    let log = manifests.0.join("agent.log");
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbt15-test");
    let mut agent = Agent::start(node, &manifests.0, "@uplink", &pin_dir, &log, &[]).unwrap();
    agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let attached = |dev: &str| -> usize {
        std::fs::read_dir(pin_dir.join("links"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{dev}-"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    let wait = |dev: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while attached(dev) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        attached(dev)
    };
    assert_eq!(wait("lbt15up"), 2, "ingress and egress on the uplink");
    assert_eq!(attached("lbt15-c"), 0, "nothing else");
    // The default route moves to another interface: it is attached too.
    node.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "198.18.1.2",
        "dev",
        "lbt15-c",
    ])
    .unwrap();
    assert_eq!(wait("lbt15-c"), 2, "{}", agent.log_text());
    assert_eq!(attached("lbt15up"), 2, "the old uplink stays attached");
}

/// The TCX programs on a node interface, in run order, ingress then
/// egress; names as the kernel keeps them (cut to 15 bytes).
fn tcx_programs(node: &lb_tests::netns::NetNs, dev: &str) -> [Vec<String>; 2] {
    use aya::programs::{tc::SchedClassifier, TcAttachType};
    node.run(|| {
        [TcAttachType::Ingress, TcAttachType::Egress].map(|hook| {
            let (_, programs) = SchedClassifier::query_tcx(dev, hook).unwrap();
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or_default().to_owned())
                .collect()
        })
    })
}

/// An attached interface that becomes the default route's (an external
/// interface by `@uplink`) changes role: its ingress program is replaced by
/// the external one, one program per hook afterwards, and a connection
/// through the VIP made before the change goes on (conntrack is kept; the
/// new programs are attached before the old ones come off).
#[test]
fn an_interface_that_becomes_the_uplink_switches_to_the_external_program() {
    let mut s = serving_one_backend("lbt23");
    let node = &s.topology.node;
    let programs = |ingress: &str| [vec![ingress.to_owned()], vec!["lb_egress".to_owned()]];
    assert_eq!(tcx_programs(node, "lbt23-c"), programs("lb_ingress"));
    let mut long_lived = s
        .topology
        .client
        .run(|| EchoConnection::open(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    let before = long_lived.ask().unwrap();
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        &CLIENT_IP.to_string(),
        "dev",
        "lbt23-c",
    ])
    .unwrap();
    // The old programs come off after the new ones are on.
    let switched = wait_until(std::time::Duration::from_secs(10), || {
        tcx_programs(node, "lbt23-c") == programs("lb_ingress_exte")
    });
    assert!(
        switched,
        "{:?}\n{}",
        tcx_programs(node, "lbt23-c"),
        s.agent.log_text()
    );
    assert_eq!(
        long_lived.ask().unwrap(),
        before,
        "the same connection, the same backend"
    );
    let answer = s
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    assert_eq!(backend_of(&answer), before);
    s.agent.stop().unwrap();
}

/// Path-MTU discovery through a ClusterIP: the backend's link is narrower
/// (1280) than the client's and the backend's own (1500), so the node
/// answers full-size segments with "fragmentation needed" quoting the
/// packet as it forwarded it (to the backend). Translated back at the
/// client's interface, the error reaches the client's socket (to the VIP)
/// and the transfer continues in smaller segments; untranslated, the
/// client's kernel would find no socket for it and the transfer would stall.
#[test]
fn pmtu_discovery_through_a_cluster_ip_completes_a_1mb_transfer() {
    let mut s = serving_one_backend("lbt20");
    s.topology
        .node
        .ip(&["link", "set", "lbt20-b0", "mtu", "1280"])
        .unwrap();
    let bytes = 1 << 20;
    let received = s
        .topology
        .client
        .run(|| lb_tests::servers::bounded_sink_transfer(SocketAddrV4::new(VIP, 80), bytes))
        .expect("the 1 MB transfer through the VIP completes");
    assert_eq!(received, bytes.to_string());
    let translated = lb_agent::cli::inspect::counters(&s.agent.pin_dir)
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == "icmp_translated")
        .unwrap()
        .1;
    assert!(translated >= 1, "no ICMP error was translated");
    // The client learned the path MTU for the VIP.
    let route = s.topology.client.route_get(VIP);
    assert!(
        route.contains("mtu 1280"),
        "client's route to the VIP: {route}"
    );
    s.agent.stop().unwrap();
}

/// A Service whose endpoint is the node itself — a hostNetwork pod, such as
/// the API server behind `default/kubernetes` on a control-plane node. The
/// flow is DNATed to a local address; the local server's answers leave
/// through the pod-facing interface, whose egress program reverse-NATs
/// them (TCP and UDP, from the client pod and from another pod).
#[test]
fn a_host_network_endpoint_on_this_node_serves_pods_through_the_vip() {
    let api_vip = Ipv4Addr::new(198, 19, 0, 1);
    let node_address = Ipv4Addr::new(198, 18, 1, 1); // the node, on the client's link
    let manifest = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  clusterIP: {api_vip}
  ports:
  - {{name: https, port: 443, targetPort: 6443, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 6053, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {{kubernetes.io/service-name: kubernetes}}
addressType: IPv4
ports:
- {{name: https, port: 6443, protocol: TCP}}
- {{name: dns, port: 6053, protocol: UDP}}
endpoints:
- addresses: ["{node_address}"]
  conditions: {{ready: true}}
"#
    );
    let mut s = setup("lbt21", 1, &manifest);
    let _on_node = BackendServers::start(&s.topology.node, "node", 6443, 6053).unwrap();
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{api_vip}:443/TCP")) == Some(1)
        })
        .unwrap();
    let https = SocketAddrV4::new(api_vip, 443);
    let body = s.topology.client.run(|| http_get(https)).unwrap();
    assert!(
        body.starts_with(&format!("backend node client {CLIENT_IP}:")),
        "{body}"
    );
    let body = s.topology.backends[0].run(|| http_get(https)).unwrap();
    assert!(
        body.starts_with(&format!("backend node client {}:", backend_ip(0))),
        "{body}"
    );
    let (answer, from) = s
        .topology
        .client
        .run(|| udp_query(SocketAddrV4::new(api_vip, 53)))
        .unwrap();
    assert!(answer.starts_with("node client"), "{answer}");
    assert_eq!(
        from,
        SocketAddr::from((api_vip, 53)),
        "the answer comes from the VIP"
    );
    s.agent.stop().unwrap();
}

/// Whoever can open a pin can rewrite the datapath: the pin directory and
/// its links directory are 0700, every pin 0600 (root only; the bpffs
/// root itself is world-writable with the sticky bit).
#[test]
fn pins_and_their_directories_are_root_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut s = serving_one_backend("lbt22");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let pins = s.agent.pin_dir.clone();
    assert_eq!(mode(&pins), 0o700, "{}", pins.display());
    assert_eq!(mode(&pins.join("links")), 0o700);
    let mut files = 0;
    for dir in [pins.clone(), pins.join("links")] {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_file() {
                files += 1;
                assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
            }
        }
    }
    assert!(files >= 10, "maps and links pinned: {files}");
    s.agent.stop().unwrap();
}

/// Any CNI: `@pods` finds pods' interfaces by what they are — veths whose
/// peer is in another network namespace — not by name (here an EKS-style
/// `eni…` name, which no glob in a list of CNI prefixes would know), and
/// a device without an Ethernet header (a TUN device, as IPIP's tunl0 and
/// WireGuard's wg0 are) is left alone even when a glob matches it: the
/// programs parse Ethernet and would misread its packets.
#[test]
fn pods_interfaces_are_found_whatever_the_cni_names_them_and_l3_devices_are_left_alone() {
    require_root();
    let topology = Topology::new("lbt25", 1).expect("topology");
    let node = &topology.node;
    for args in [
        &["link", "set", "lbt25-b0", "down"][..],
        &["link", "set", "lbt25-b0", "name", "eni3f2a9b"],
        &["link", "set", "eni3f2a9b", "up"],
        &["tuntap", "add", "mode", "tun", "name", "lbt25-tun"],
        &["link", "set", "lbt25-tun", "up"],
    ] {
        node.ip(args).unwrap();
    }
    let _servers = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new("lbt25-manifests").unwrap();
    manifests
        .write("web.yaml", &web_manifest(&[(backend_ip(0), true)]))
        .unwrap();
    let mut agent = Agent::start(
        node,
        &manifests.0,
        "@pods,lbt25-t*",
        &PathBuf::from("/sys/fs/bpf/lbt25-test"),
        &manifests.0.join("agent.log"),
        &["--external-interfaces", "lbt25-none*"],
    )
    .unwrap();
    agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let attached = [vec!["lb_ingress".to_owned()], vec!["lb_egress".to_owned()]];
    let ready = wait_until(std::time::Duration::from_secs(10), || {
        tcx_programs(node, "eni3f2a9b") == attached && tcx_programs(node, "lbt25-c") == attached
    });
    assert!(
        ready,
        "{:?}\n{}",
        tcx_programs(node, "eni3f2a9b"),
        agent.log_text()
    );
    assert_eq!(
        tcx_programs(node, "lbt25-tun"),
        [Vec::<String>::new(), Vec::new()]
    );
    let body = topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_text()));
    assert!(body.starts_with("backend be0"), "{body}");
}

/// With `--service-cluster-ip-range`, a pod connecting to an address of
/// the service CIDR that no Service holds is refused at once (ICMP port
/// unreachable, as nftables kube-proxy rejects it) instead of its SYN
/// following the node's default route until the connect times out; the
/// Service's own address still serves.
#[test]
fn a_connection_to_an_unallocated_cluster_ip_is_refused_at_once() {
    let mut s = setup_with(
        "lbt26",
        1,
        &web_manifest(&ready(&[backend_ip(0)])),
        &["--service-cluster-ip-range", "198.19.0.0/16"],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let refused = s.topology.client.run(|| {
        std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([198, 19, 0, 99], 80)),
            std::time::Duration::from_secs(5),
        )
    });
    let error = refused.expect_err("no Service holds 198.19.0.99");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    let body = s
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    assert!(body.starts_with("backend be0"), "{body}");
}
