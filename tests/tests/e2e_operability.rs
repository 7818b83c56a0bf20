//! Operability end to end: the agent's Prometheus metrics scraped and
//! parsed, and `inspect --json` read back, each checked against the
//! programmed state, traffic and changes.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_tests::{
    metrics::{scrape, scrape_until, Scrape},
    require_root,
    servers::{http_get, http_get_from},
    topology::{agent_json, backend_ip, web_manifest, Agent, ScratchDir, Topology, VIP},
};

const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10249);

/// `pods` backend pods serving, manifest files written, the agent started
/// with `flags`; removed on drop.
struct Setup {
    agent: Agent,
    manifests: ScratchDir,
    _servers: Vec<lb_tests::servers::BackendServers>,
    topology: Topology,
}

fn setup(prefix: &str, pods: usize, files: &[(&str, &str)], flags: &[&str]) -> Setup {
    require_root();
    let topology = Topology::new(prefix, pods).expect("topology");
    let servers = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new(&format!("{prefix}-manifests")).expect("scratch dir");
    for (name, text) in files {
        manifests.write(name, text).unwrap();
    }
    let agent = Agent::start(
        &topology.node,
        &manifests.0,
        &topology.interface_pattern(),
        &PathBuf::from(format!("/sys/fs/bpf/{prefix}-test")),
        &manifests.0.join("agent.log"),
        flags,
    )
    .expect("agent");
    Setup {
        agent,
        manifests,
        _servers: servers,
        topology,
    }
}

#[test]
fn metrics_follow_programmed_state_traffic_and_changes() {
    let both = [(backend_ip(0), true), (backend_ip(1), true)];
    // The default address (kube-proxy's), in the node's namespace.
    let mut s = setup(
        "lbm1",
        2,
        &[("web.yaml", &web_manifest(&both))],
        &["--conntrack-gc-interval", "1s"],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let node = &s.topology.node;
    // The programmed-state gauges are recounted at most once a second.
    let first = scrape_until(node, METRICS, |m| {
        m.samples.get(r#"lb_endpoints{ip_family="IPv4"}"#) == Some(&4.0)
    });

    for (name, kind) in [
        ("lb_sync_proxy_rules_duration_seconds", "histogram"),
        ("lb_network_programming_duration_seconds", "histogram"),
        ("lb_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        ("lb_services", "gauge"),
        ("lb_frontends", "gauge"),
        ("lb_endpoints", "gauge"),
        ("lb_map_entries", "gauge"),
        ("lb_map_capacity", "gauge"),
        ("lb_map_fill_ratio", "gauge"),
        ("lb_conntrack_entries", "gauge"),
        ("lb_datapath_events_total", "counter"),
        ("lb_errors_total", "counter"),
        ("lb_conntrack_flows_removed_total", "counter"),
        ("lb_udp_sockets_reset_total", "counter"),
        ("lb_kube_proxy_rules", "gauge"),
    ] {
        assert_eq!(
            first.types.get(name).map(String::as_str),
            Some(kind),
            "type of {name}: {:?}",
            first.types
        );
    }
    // No kube-proxy on this node: none of its rules (checked once at start).
    let found = scrape_until(node, METRICS, |m| {
        m.samples
            .contains_key(r#"lb_kube_proxy_rules{mode="iptables"}"#)
    });
    for mode in ["iptables", "iptables-legacy", "nftables", "ipvs"] {
        let series = format!(r#"lb_kube_proxy_rules{{mode="{mode}"}}"#);
        assert_eq!(found.get(&series), 0.0, "{series}");
    }
    // One Service, two ClusterIP frontends (TCP 80, UDP 53), two pods ×
    // two ports; slot 0 and two slots per frontend.
    assert_eq!(first.get("lb_services"), 1.0);
    let frontends = |kind: &str, family: &str| {
        first.get(&format!(
            r#"lb_frontends{{type="{kind}",ip_family="{family}"}}"#
        ))
    };
    assert_eq!(frontends("ClusterIP", "IPv4"), 2.0);
    assert_eq!(frontends("NodePort", "IPv4"), 0.0);
    assert_eq!(frontends("ClusterIP", "IPv6"), 0.0);
    assert_eq!(first.get(r#"lb_endpoints{ip_family="IPv6"}"#), 0.0);
    assert_eq!(first.get(r#"lb_map_entries{map="lb_svc6_v4"}"#), 0.0);
    assert_eq!(first.get(r#"lb_map_entries{map="lb_svc_v4"}"#), 6.0);
    assert_eq!(first.get(r#"lb_map_entries{map="lb_backend_v4"}"#), 4.0);
    assert_eq!(
        first.get(r#"lb_map_fill_ratio{map="lb_svc_v4"}"#),
        6.0 / first.get(r#"lb_map_capacity{map="lb_svc_v4"}"#)
    );
    assert_eq!(
        first.get(r#"lb_datapath_events_total{event="dnat_new"}"#),
        0.0
    );
    assert!(first.get("lb_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    let syncs = first.get("lb_sync_proxy_rules_duration_seconds_count");
    assert!(syncs >= 1.0);
    // Every error kind is listed, at 0 here.
    let errors: Vec<(&String, &f64)> = first
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("lb_errors_total{"))
        .collect();
    assert!(errors.len() >= 8, "{errors:?}");
    assert!(errors.iter().all(|(_, v)| **v == 0.0), "{errors:?}");

    // Traffic moves the datapath counters.
    for _ in 0..3 {
        let body = s
            .topology
            .client
            .run(|| http_get(SocketAddrV4::new(VIP, 80)))
            .unwrap();
        assert!(body.starts_with("backend be"), "{body}");
    }
    let after_traffic = scrape(node, METRICS).unwrap();
    assert_eq!(
        after_traffic.get(r#"lb_datapath_events_total{event="dnat_new"}"#),
        3.0
    );
    // The GC pass counts the conntrack table: 3 flows, two entries each,
    // closing but not yet expired.
    let counted = scrape_until(node, METRICS, |m| {
        m.samples.get("lb_conntrack_entries") == Some(&6.0)
    });
    assert_eq!(counted.get("lb_conntrack_entries"), 6.0);
    assert_eq!(counted.get(r#"lb_map_entries{map="lb_ct_v4"}"#), 6.0);

    // A change: one pod leaves. The state gauges follow; one more sync and
    // one more programming-latency observation.
    s.manifests
        .write("web.yaml", &web_manifest(&both[..1]))
        .unwrap();
    s.agent
        .wait_for_maps("one backend", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let changed: Scrape = scrape_until(node, METRICS, |m| {
        m.samples.get(r#"lb_endpoints{ip_family="IPv4"}"#) == Some(&2.0)
    });
    assert_eq!(changed.get(r#"lb_map_entries{map="lb_svc_v4"}"#), 4.0);
    assert!(changed.get("lb_sync_proxy_rules_duration_seconds_count") > syncs);
    assert!(
        changed.get("lb_network_programming_duration_seconds_count")
            > first.get("lb_network_programming_duration_seconds_count")
    );
}

#[test]
fn metrics_bind_address_empty_turns_metrics_off_and_a_bad_one_is_refused() {
    let mut s = setup(
        "lbm2",
        1,
        &[("web.yaml", &web_manifest(&[(backend_ip(0), true)]))],
        &["--metrics-bind-address", ""],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let refused = scrape(&s.topology.node, METRICS).unwrap_err();
    assert!(
        refused
            .chain()
            .any(|e| e.downcast_ref::<std::io::Error>().map(|e| e.kind())
                == Some(std::io::ErrorKind::ConnectionRefused)),
        "{refused:#}"
    );
    drop(s.agent);

    let out = std::process::Command::new(lb_tests::topology::agent_binary())
        .args(["run", "--manifests"])
        .arg(&s.manifests.0)
        .args(["--interfaces", "lo", "--metrics-bind-address", "localhost"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--metrics-bind-address") && stderr.contains("is not ADDRESS:PORT"),
        "{stderr}"
    );
}

#[test]
fn inspect_json_matches_the_programmed_state_and_filters() {
    let two = [(backend_ip(0), true), (backend_ip(1), true)];
    // A second Service on the third pod.
    let db = web_manifest(&[(backend_ip(2), true)])
        .replace("name: web", "name: db")
        .replace("web-1", "db-1")
        .replace("service-name: web", "service-name: db")
        .replace(&VIP.to_string(), "198.19.0.11");
    let mut s = setup(
        "lbm3",
        3,
        &[("web.yaml", &web_manifest(&two)), ("db.yaml", &db)],
        &[],
    );
    s.agent
        .wait_for_maps("both services", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2) && m.count("198.19.0.11:80/TCP") == Some(1)
        })
        .unwrap();
    let pins = s.agent.pin_dir.clone();

    let services = agent_json(&pins, "inspect", &["services"]);
    let services = services.as_array().unwrap();
    assert_eq!(services.len(), 4, "{services:#?}");
    let web_tcp = services
        .iter()
        .find(|f| f["frontend"] == format!("{VIP}:80/TCP"))
        .unwrap();
    assert_eq!(web_tcp["service"], "demo/web");
    assert_eq!(web_tcp["type"], "ClusterIP");
    assert_eq!(web_tcp["protocol"], "TCP");
    let mut addresses: Vec<String> = web_tcp["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]))
        .collect();
    addresses.sort();
    assert_eq!(
        addresses,
        vec![
            format!("{}:8080", backend_ip(0)),
            format!("{}:8080", backend_ip(1))
        ]
    );

    // Filters: by Service, by backend address.
    let db = agent_json(&pins, "inspect", &["services", "--service", "demo/db"]);
    let db: Vec<&str> = db
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["frontend"].as_str().unwrap())
        .collect();
    assert_eq!(db, vec!["198.19.0.11:53/UDP", "198.19.0.11:80/TCP"]);
    let on_pod1 = agent_json(
        &pins,
        "inspect",
        &["services", "--backend", &backend_ip(1).to_string()],
    );
    assert!(on_pod1
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["service"] == "demo/web"));
    assert_eq!(on_pod1.as_array().unwrap().len(), 2);

    let backends = agent_json(&pins, "inspect", &["backends", "--service", "demo/web"]);
    let backends = backends.as_array().unwrap();
    assert_eq!(backends.len(), 4, "2 pods × TCP and UDP: {backends:#?}");
    assert!(backends
        .iter()
        .all(|b| b["services"] == serde_json::json!(["demo/web"])));

    for _ in 0..2 {
        s.topology
            .client
            .run(|| http_get(SocketAddrV4::new(VIP, 80)))
            .unwrap();
    }
    let flows = agent_json(&pins, "inspect", &["conntrack", "--service", "demo/web"]);
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 2, "{flows:#?}");
    for flow in flows {
        assert!(flow["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", lb_tests::topology::CLIENT_IP)));
        assert_eq!(flow["frontend"], format!("{VIP}:80"));
        let backend = flow["backend"].as_str().unwrap();
        assert!(
            backend == format!("{}:8080", backend_ip(0))
                || backend == format!("{}:8080", backend_ip(1)),
            "{backend}"
        );
        assert_eq!(flow["snat"], serde_json::Value::Null);
    }
    assert!(
        agent_json(&pins, "inspect", &["conntrack", "--service", "demo/db"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let stats = agent_json(&pins, "inspect", &["stats"]);
    assert_eq!(stats["dnat_new"], 2);
}

/// A TCP connection to VIP:80 from `CLIENT_IP:port`; the backend's name.
fn http_from_port(port: u16) -> String {
    let body = http_get_from(
        SocketAddrV4::new(lb_tests::topology::CLIENT_IP, port),
        SocketAddrV4::new(VIP, 80),
    )
    .expect("HTTP from a fixed port");
    body.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn explain_picks_the_backend_a_real_connection_gets_and_resolves_like_cluster_dns() {
    let three: Vec<(Ipv4Addr, bool)> = (0..3).map(|i| (backend_ip(i), true)).collect();
    let dns = lb_tests::topology::HEADLESS_AND_EXTERNAL_NAME;
    let mut s = setup(
        "lbm4",
        3,
        &[("web.yaml", &web_manifest(&three)), ("dns.yaml", dns)],
        &[],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(3)
        })
        .unwrap();
    let pins = s.agent.pin_dir.clone();
    let dir = s.manifests.0.to_string_lossy().into_owned();

    // The name resolves to the VIP; the pick for each client port is the
    // backend a real connection from that port then gets.
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41008 {
        let client = format!("{}:{port}", lb_tests::topology::CLIENT_IP);
        let e = agent_json(
            &pins,
            "explain",
            &[
                "web.demo.svc.cluster.local:http",
                "--client",
                &client,
                "--manifests",
                &dir,
            ],
        );
        assert_eq!(
            e["dns"]["records"],
            serde_json::json!([{"type": "A", "value": VIP.to_string()}])
        );
        let frontends = e["frontends"].as_array().unwrap();
        assert_eq!(frontends.len(), 1, "the http port only: {frontends:#?}");
        let f = &frontends[0];
        assert_eq!(f["frontend"], format!("{VIP}:80/TCP"));
        assert_eq!(f["service"], "demo/web");
        assert_eq!(f["endpoints"].as_array().unwrap().len(), 3);
        assert_eq!(f["pick"]["verdict"], "pass");
        assert_eq!(f["pick"]["events"], serde_json::json!(["dnat_new"]));
        let picked = f["pick"]["backend"].as_str().unwrap().to_owned();
        let got = s.topology.client.run(|| http_from_port(port));
        let index: usize = got.trim_start_matches("be").parse().unwrap();
        assert_eq!(
            picked,
            format!("{}:8080", backend_ip(index)),
            "client port {port}: explain said {picked}, the connection got {got}"
        );
        seen.insert(picked);
    }
    assert!(seen.len() > 1, "the picks spread over backends: {seen:?}");
    // Explain writes nothing: a pick for a port no connection used leaves
    // the live flows at the 8 real connections.
    let unused = format!("{}:42999", lb_tests::topology::CLIENT_IP);
    let e = agent_json(
        &pins,
        "explain",
        &[&format!("{VIP}:80"), "--client", &unused],
    );
    assert_eq!(
        e["frontends"][0]["pick"]["events"],
        serde_json::json!(["dnat_new"])
    );
    let flows = e["conntrack"].as_array().unwrap();
    assert_eq!(flows.len(), 8, "{flows:#?}");
    assert!(flows.iter().all(|f| f["client"] != unused.as_str()));
    assert_eq!(e["dns"], serde_json::Value::Null);

    // Headless: the ready pods' addresses; ExternalName: the alias.
    let db = agent_json(&pins, "explain", &["db.demo", "--manifests", &dir]);
    assert_eq!(
        db["dns"]["records"],
        serde_json::json!([{"type": "A", "value": "198.18.2.7"}])
    );
    assert!(db["frontends"].as_array().unwrap().is_empty());
    let mail = agent_json(&pins, "explain", &["mail.demo", "--manifests", &dir]);
    assert_eq!(
        mail["dns"]["records"],
        serde_json::json!([{"type": "CNAME", "value": "mail.example.org"}])
    );

    // Unknown names are errors that say why.
    let out = std::process::Command::new(lb_tests::topology::agent_binary())
        .args(["explain", "db.demo", "--pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("demo/db: no such Service in the maps") && stderr.contains("--manifests"),
        "{stderr}"
    );
}

/// `--log-format json` writes one JSON object per line, each reconcile pass
/// in a span with its counts; `--datapath-log` adds the datapath's own
/// events (aya-log): each new flow with its client, frontend and backend.
#[test]
fn json_logs_carry_reconcile_spans_and_datapath_events() {
    let mut s = setup(
        "lbm5",
        1,
        &[("web.yaml", &web_manifest(&[(backend_ip(0), true)]))],
        &["--log-format", "json", "--datapath-log"],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let body = s
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    assert!(body.starts_with("backend be0"), "{body}");

    let wanted_flow = format!("{}:", lb_tests::topology::CLIENT_IP);
    let wanted_backend = format!("backend {}:8080", backend_ip(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<serde_json::Value> = loop {
        let lines: Vec<serde_json::Value> = s
            .agent
            .log_text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect();
        let seen = lines.iter().any(|l| l["target"] == "datapath");
        if seen || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let applied = lines
        .iter()
        .find(|l| l["fields"]["message"] == "applied")
        .expect("an applied line");
    assert_eq!(applied["span"]["name"], "reconcile");
    assert_eq!(applied["span"]["scope"], "all");
    assert_eq!(applied["span"]["added"], 2, "{applied}");
    assert_eq!(applied["span"]["errors"], 0, "{applied}");
    let event = lines
        .iter()
        .find(|l| l["target"] == "datapath")
        .expect("a datapath event");
    let message = event["fields"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("new flow ")
            && message.contains(&wanted_flow)
            && message.contains(&format!("-> {VIP}:80 -> "))
            && message.contains(&wanted_backend),
        "{message}"
    );
}

/// A full assured table under load: flows that become assured meanwhile
/// stay in the table of new flows and keep working, counted; established
/// ones keep working; the fill shows in the metrics and the agent's
/// warning names the flag to raise.
#[test]
fn a_full_assured_conntrack_table_keeps_new_flows_working_and_says_which_flag_to_raise() {
    use lb_tests::servers::EchoConnection;
    let mut s = setup(
        "lbm6",
        2,
        &[(
            "web.yaml",
            &web_manifest(&[(backend_ip(0), true), (backend_ip(1), true)]),
        )],
        // Room for 4 assured flows (two entries each).
        &[
            "--max-conntrack",
            "8",
            "--conntrack-gc-interval",
            "1s",
            "--log-format",
            "json",
        ],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
        })
        .unwrap();
    let vip = SocketAddrV4::new(VIP, 80);
    let ask = |conn: &mut EchoConnection| conn.ask().map(|name| name.starts_with("be"));
    let mut open: Vec<EchoConnection> = (0..4)
        .map(|_| s.topology.client.run(|| EchoConnection::open(vip)).unwrap())
        .collect();
    for conn in &mut open {
        assert!(ask(conn).unwrap(), "a first answer (it assures the flow)");
    }
    let mut fifth = s.topology.client.run(|| EchoConnection::open(vip)).unwrap();
    assert!(
        ask(&mut fifth).unwrap(),
        "a fifth flow, past the assured table's room"
    );
    assert!(ask(&mut fifth).unwrap());
    for conn in &mut open {
        assert!(ask(conn).unwrap(), "an established flow stopped");
    }
    let counters = lb_agent::cli::inspect::counters(&s.agent.pin_dir).unwrap();
    let count = |name: &str| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    assert!(count("ct_assured_full") >= 1, "{counters:?}");
    assert_eq!(count("drop_ct_full"), 0, "{counters:?}");
    let full = scrape_until(&s.topology.node, METRICS, |m| {
        m.samples.get(r#"lb_map_fill_ratio{map="lb_ct_v4"}"#) >= Some(&1.0)
    });
    assert_eq!(full.get(r#"lb_map_fill_ratio{map="lb_ct_v4"}"#), 1.0);
    assert!(full.get(r#"lb_datapath_events_total{event="ct_assured_full"}"#) >= 1.0);
    let warning = s.agent.log_events().into_iter().find(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("assured conntrack table"))
    });
    let warning = warning.expect("the fill warning");
    let message = warning["message"].as_str().unwrap();
    assert!(
        message.contains("100% full") && message.contains("--max-conntrack"),
        "{message}"
    );
    assert_eq!(warning["capacity"], 8);
}

/// A spoofed SYN flood at a VIP, 20 times the size of the table of new
/// flows, from sources that never complete a handshake: an established
/// connection keeps working, and new TCP connections and UDP queries (the
/// shape of DNS) through the VIP keep being admitted while it lasts.
#[test]
fn a_spoofed_syn_flood_keeps_neither_new_connections_nor_dns_out() {
    use lb_tests::{
        flood::Flood,
        servers::{udp_query, EchoConnection},
    };
    let mut s = setup(
        "lbm9",
        2,
        &[(
            "web.yaml",
            &web_manifest(&[(backend_ip(0), true), (backend_ip(1), true)]),
        )],
        &["--max-conntrack", "1024", "--max-conntrack-new", "16384"],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
                && m.count(&format!("{VIP}:53/UDP")) == Some(2)
        })
        .unwrap();
    let (vip, dns) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53));
    let mut established = s.topology.client.run(|| EchoConnection::open(vip)).unwrap();
    assert!(established.ask().unwrap().starts_with("be"));

    // Sources on the client's LAN that do not exist: the backends' SYN-ACKs
    // go unanswered, as a spoofed flood's do.
    let flood = Flood::syn(&s.topology.client, vip, Ipv4Addr::new(198, 18, 1, 100), 150);
    // Flows the table holds. At the ≈ 80 000 SYN/s one sender reaches here,
    // a new flow keeps its entries ≈ 100 ms: room for a slow handshake on a
    // loaded machine.
    let table = 16384 / 2;
    assert!(
        lb_tests::wait_until(Duration::from_secs(30), || flood.sent() >= 2 * table),
        "the flood runs"
    );
    let mut failures = Vec::new();
    for i in 0..20 {
        let tcp = s
            .topology
            .client
            .run(|| EchoConnection::open(vip).and_then(|mut c| c.ask()));
        let udp = s.topology.client.run(|| udp_query(dns));
        for (what, result) in [("TCP", tcp.map(|_| ())), ("UDP", udp.map(|_| ()))] {
            if let Err(e) = result {
                failures.push(format!("{what} #{i}: {e}"));
            }
        }
    }
    assert!(
        lb_tests::wait_until(Duration::from_secs(120), || flood.sent() >= 20 * table),
        "the flood reached 20 times the table"
    );
    let sent = flood.stop().expect("the flood's sender");
    assert!(
        failures.is_empty(),
        "during a flood of {sent} SYNs: {failures:?}"
    );
    assert!(
        established.ask().unwrap().starts_with("be"),
        "the established connection"
    );
    let counters = lb_agent::cli::inspect::counters(&s.agent.pin_dir).unwrap();
    let count = |name: &str| counters.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_eq!(count("drop_ct_full"), 0, "{counters:?}");
    // Not every SYN sent is a new flow here: a few are lost on a loaded
    // machine's veth backlog, a few reuse a live flow's tuple.
    assert!(
        count("dnat_new") >= 10 * table,
        "the flood went through the datapath, many times the table: {counters:?}"
    );
}

/// A migration from kube-proxy runs both side by side for a while: another
/// process holds the health and metrics ports (kube-proxy's 10256 and
/// 10249). The agent still programs the datapath, answers the kubelet's
/// probes on the probe port meanwhile (the DaemonSet's), retries the binds,
/// and serves both once they are free; with `--bind-address-hard-fail` a
/// held port ends the start instead, naming the flag (kube-proxy's
/// semantics).
#[test]
fn held_health_and_metrics_ports_are_retried_and_taken_once_free() {
    require_root();
    let topology = Topology::new("lbm7", 1).expect("topology");
    let _servers = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new("lbm7-manifests").expect("scratch dir");
    manifests
        .write("web.yaml", &web_manifest(&[(backend_ip(0), true)]))
        .unwrap();
    let (health, probe) = ("127.0.0.1:10256", "127.0.0.1:10266");
    let hold = || {
        topology.node.run(|| {
            [health, "127.0.0.1:10249"].map(|a| std::net::TcpListener::bind(a).expect("hold"))
        })
    };
    let held = hold();
    // kube-proxy's rules as its modes leave them (iptables-nft chains, the
    // nftables table, the IPVS device), and a kubelet chain that is not
    // kube-proxy's. The namespace goes with the test, and they with it.
    let node_ns = format!("--net={}", topology.node.path().display());
    for command in [
        "iptables -t nat -N KUBE-SERVICES",
        "iptables -t nat -N KUBE-SVC-ERIFXISQEP7F7OF4",
        "iptables -t filter -N KUBE-FIREWALL",
        // And legacy iptables' (x_tables), in both families.
        "iptables-legacy -t nat -N KUBE-NODEPORTS",
        "iptables-legacy -t filter -N KUBE-FIREWALL",
        "ip6tables-legacy -t filter -N KUBE-FORWARD",
        "nft add table ip kube-proxy",
        // kube-proxy makes a dummy device; this kernel has no dummy module.
        "ip link add kube-ipvs0 type veth peer name kube-ipvs0-p",
    ] {
        let mut args = vec!["nsenter", &node_ns];
        args.extend(command.split(' '));
        lb_tests::netns::sh(&args).unwrap();
    }
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbm7-test");
    let mut agent = Agent::start(
        &topology.node,
        &manifests.0,
        &topology.interface_pattern(),
        &pin_dir,
        &manifests.0.join("agent.log"),
        &[
            "--healthz-bind-address",
            health,
            "--probe-bind-address",
            probe,
        ],
    )
    .expect("agent");
    agent
        .wait_for_maps("the service despite the held ports", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    // The kubelet's probes reach this agent, not the port's holder.
    let ready = lb_tests::servers::wait_for_status(&topology.node, probe, "/readyz", 200);
    assert_eq!(
        ready,
        Ok(()),
        "/readyz on the probe port\n{}",
        agent.log_text()
    );
    assert_eq!(
        lb_tests::servers::get_status(&topology.node, probe, "/livez").ok(),
        Some(200)
    );
    let body = topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    assert!(body.starts_with("backend be0"), "{body}");

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        match scrape(&topology.node, METRICS) {
            Ok(scrape) => break scrape,
            Err(e) if Instant::now() > deadline => {
                panic!("metrics never served: {e:#}\n{}", agent.log_text())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(served.get("lb_services"), 1.0);
    for (mode, found) in [
        ("iptables", 2.0),
        ("iptables-legacy", 2.0),
        ("nftables", 1.0),
        ("ipvs", 1.0),
    ] {
        let series = format!(r#"lb_kube_proxy_rules{{mode="{mode}"}}"#);
        assert_eq!(served.get(&series), found, "{series}");
    }
    assert_eq!(
        lb_tests::servers::wait_for_status(&topology.node, health, "/healthz", 200),
        Ok(()),
        "/healthz served once free"
    );
    drop(agent);

    // Held again, with the hard-fail flag: the start ends, naming the flag.
    let _held = hold();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", topology.node.path().display()))
        .arg(lb_tests::topology::agent_binary())
        .args(["run", "--manifests"])
        .arg(&manifests.0)
        .args(["--interfaces", "lo", "--pin-dir"])
        .arg(&pin_dir)
        .args(["--healthz-bind-address", health, "--bind-address-hard-fail"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("--healthz-bind-address {health}")) && stderr.contains("in use"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// kube-proxy sizes the node's netfilter conntrack, and lb's traffic still
/// passes it: the agent sets the same sysctls from kube-proxy's flags (Go
/// durations, as kube-proxy writes them). In a node namespace the table
/// size is the host's and read-only, so the raise asked for is refused:
/// reported (`lb_errors_total{kind="node_sysctl"}`), and the node is
/// served anyway.
#[test]
fn netfilter_conntrack_is_set_from_kube_proxys_flags_and_a_refused_write_is_reported() {
    let sysctl = |ns: &lb_tests::netns::NetNs, name: &str| -> u64 {
        ns.run(|| std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // The test runs in the host's namespace.
    let host_max: u64 = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let wanted_min = (host_max * 2).to_string();
    let mut s = setup(
        "lbm10",
        1,
        &[("web.yaml", &web_manifest(&[(backend_ip(0), true)]))],
        &[
            "--conntrack-tcp-timeout-established",
            "2h0m0s",
            "--conntrack-tcp-timeout-close-wait",
            "30m",
            "--conntrack-min",
            &wanted_min,
        ],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let node = &s.topology.node;
    let reported = scrape_until(node, METRICS, |m| {
        m.samples.get(r#"lb_errors_total{kind="node_sysctl"}"#) == Some(&1.0)
    });
    assert_eq!(
        reported.get(r#"lb_errors_total{kind="node_sysctl"}"#),
        1.0,
        "the table size, read-only here\n{}",
        s.agent.log_text()
    );
    assert_eq!(sysctl(node, "nf_conntrack_tcp_timeout_established"), 7200);
    assert_eq!(sysctl(node, "nf_conntrack_tcp_timeout_close_wait"), 1800);
    assert_eq!(sysctl(node, "nf_conntrack_max"), host_max, "unchanged");
    let body = s
        .topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    assert!(body.starts_with("backend be0"), "{body}");
}

/// `run --config` with kube-proxy's own configuration file: the fields lb
/// supports take effect (the metrics port, netfilter's CLOSE_WAIT timeout,
/// the health port, given as kube-proxy writes them: an address without
/// its port, a Go duration); a field KubeProxyConfiguration does not have
/// stops the start, naming it.
#[test]
fn a_kube_proxy_configuration_file_takes_effect_and_an_unknown_field_is_refused() {
    let scratch = ScratchDir::new("lbm11-config").unwrap();
    let config = scratch.0.join("config.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         metricsBindAddress: 127.0.0.1:10300\nhealthzBindAddress: 127.0.0.1\n\
         conntrack: {tcpCloseWaitTimeout: 20m0s}\niptables: {masqueradeAll: true}\nmode: nftables\n",
    )
    .unwrap();
    let config_arg = config.to_string_lossy().into_owned();
    let mut s = setup(
        "lbm11",
        1,
        &[("web.yaml", &web_manifest(&[(backend_ip(0), true)]))],
        &["--config", &config_arg],
    );
    s.agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let node = &s.topology.node;
    let metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10300);
    // The programmed-state gauges are recounted at most once a second.
    let served = scrape_until(node, metrics, |m| {
        m.samples.get("lb_services") == Some(&1.0)
    });
    assert_eq!(served.get("lb_services"), 1.0);
    assert!(scrape(node, METRICS).is_err(), "not on the default port");
    let close_wait = node
        .run(|| {
            std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait")
        })
        .unwrap();
    assert_eq!(close_wait.trim(), "1200");
    let healthz = node.run(|| std::net::TcpStream::connect("127.0.0.1:10256"));
    assert!(
        healthz.is_ok(),
        "kube-proxy's default health port: {healthz:?}"
    );
    drop(s);

    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmetricBindAddress: 127.0.0.1:10300\n",
    )
    .unwrap();
    let out = std::process::Command::new(lb_tests::topology::agent_binary())
        .args([
            "run",
            "--interfaces",
            "lo",
            "--manifests",
            "/nonexistent",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("metricBindAddress: no such field in KubeProxyConfiguration"),
        "{stderr}"
    );
}
