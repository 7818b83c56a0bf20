//! `cargo xtask demo`: the whole product on one machine, in namespaces.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
};

use anyhow::Context as _;
use lb_tests::{
    servers::{http_get, udp_query, BackendServers, EchoConnection},
    topology::{backend_ip, backend_ip6, Agent, ScratchDir, Topology, CLIENT_IP6, VIP, VIP6},
};

use crate::cluster_dns::{exec_in, records, DnsServer, PodResolvConf};

/// The example manifest the demo programs (also used by build-and-load).
pub const MANIFEST: &str = include_str!("../../deploy/examples/demo.yaml");
const PIN_DIR: &str = "/sys/fs/bpf/lb-demo";

fn step(text: &str) {
    println!("\n== {text}");
}

pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    step("topology: client pod 198.18.1.2, 2001:db8:1::2 → node (lb-agent) → backend pods 198.18.{10,11,12}.2, 2001:db8:{10,11,12}::2, DNS pods 198.18.{13,14}.2");
    let mut topology = Topology::new("lbd", 3)?;
    let mut servers = topology.serve_backends("pod-")?;
    let dns_pods = [topology.add_backend()?, topology.add_backend()?];
    topology.add_ipv6()?;
    for i in 0..3 {
        let ns = &topology.backends[i];
        servers.push(BackendServers::start_on(
            ns,
            backend_ip6(i),
            &format!("pod-{i}"),
            8080,
            5353,
        )?);
    }
    let scratch = ScratchDir::new("lb-demo")?;
    scratch.write("demo.yaml", MANIFEST)?;
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let mut agent = Agent::start(
        &topology.node,
        &scratch.0,
        &topology.interface_pattern(),
        Path::new(PIN_DIR),
        &scratch.0.join("agent.log"),
        &[],
    )?;
    agent.wait_for_maps("the demo services", |m| {
        m.count(&format!("{VIP}:80/TCP")) == Some(3)
            && m.count(&format!("[{VIP6}]:80/TCP")) == Some(3)
    })?;
    println!("lb-agent running in namespace lbd-node, attached to lbd-*, maps pinned in {PIN_DIR}");

    step(&format!("services (lb-agent inspect --pin-dir {PIN_DIR})"));
    print!("{}", lb_agent::cli::inspect::services(Path::new(PIN_DIR))?);

    let _dns = cluster_dns(&topology, &dns_pods, &scratch)?;

    step(&format!(
        "HTTP: 9 new connections to http://{VIP}:80 from the client pod"
    ));
    topology.client.run(|| -> anyhow::Result<()> {
        for i in 1..=9 {
            let body = http_get(SocketAddrV4::new(VIP, 80)).context("HTTP through the VIP")?;
            println!("  request {i}: {body}");
        }
        Ok(())
    })?;

    step(&format!(
        "UDP: 6 datagrams to {VIP}:53; answers come back from the VIP"
    ));
    topology.client.run(|| -> anyhow::Result<()> {
        for i in 1..=6 {
            let (answer, from) =
                udp_query(SocketAddrV4::new(VIP, 53)).context("UDP through the VIP")?;
            println!("  datagram {i}: answered by {answer}, source {from}");
        }
        Ok(())
    })?;

    step(&format!(
        "dual stack: web has an IPv6 cluster IP too; HTTP and UDP to [{VIP6}] from the client pod's {CLIENT_IP6}"
    ));
    topology.client.run(|| -> anyhow::Result<()> {
        for i in 1..=6 {
            let body =
                http_get(SocketAddr::from((VIP6, 80))).context("HTTP through the IPv6 VIP")?;
            println!("  request {i}: {body}");
            anyhow::ensure!(
                body.contains(&format!("client [{CLIENT_IP6}]:")),
                "the pod sees the client's own IPv6 address: {body}"
            );
        }
        for i in 1..=3 {
            let (answer, from) =
                udp_query(SocketAddr::from((VIP6, 53))).context("UDP through the IPv6 VIP")?;
            println!("  datagram {i}: answered by {answer}, source {from}");
            anyhow::ensure!(from == SocketAddr::from((VIP6, 53)), "answer from {from}");
        }
        Ok(())
    })?;

    step("scale down: pod-1 leaves the IPv4 EndpointSlice while a connection to it is open");
    let mut conn = topology.client.run(|| {
        (0..20).find_map(|_| {
            let mut c = EchoConnection::open(SocketAddrV4::new(VIP, 80)).ok()?;
            (c.ask().ok()? == "pod-1").then_some(c)
        })
    });
    let without_pod1 = MANIFEST.replace(
        "- addresses: [198.18.11.2]\n  conditions: {ready: true",
        "- addresses: [198.18.11.2]\n  conditions: {ready: false",
    );
    scratch.write("demo.yaml", &without_pod1)?;
    agent.wait_for_maps("two backends", |m| {
        m.count(&format!("{VIP}:80/TCP")) == Some(2)
    })?;
    topology.client.run(|| -> anyhow::Result<()> {
        for i in 1..=6 {
            println!(
                "  new connection {i}: {}",
                http_get(SocketAddrV4::new(VIP, 80))?
            );
        }
        Ok(())
    })?;
    if let Some(conn) = conn.as_mut() {
        println!(
            "  established connection to pod-1 still answered by: {}",
            conn.ask()?
        );
    }

    step("a service with no ready endpoint (starting, 198.19.0.11:80) refuses at once");
    let refused = topology.client.run(|| {
        std::net::TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::new(198, 19, 0, 11), 80)),
            std::time::Duration::from_secs(3),
        )
    });
    match refused {
        Err(e) => println!("  connect: {e}"),
        Ok(_) => anyhow::bail!("expected the connection to be refused"),
    }

    step("conntrack (lb-agent inspect conntrack), first rows");
    let pin_dir = Path::new(PIN_DIR);
    let table = lb_agent::cli::inspect::conntrack(pin_dir)?;
    let rows: Vec<&str> = table.lines().collect();
    for line in rows.iter().take(7) {
        println!("  {line}");
    }
    if rows.len() > 7 {
        println!("  ...\n  {}", rows[rows.len() - 1]);
    }
    step("per-reason packet counters (lb-agent inspect stats)");
    for line in lb_agent::cli::inspect::stats(pin_dir)?.lines() {
        println!("  {line}");
    }

    step("lb-agent explain web.demo:80 --client 198.18.1.2:41000 --client [2001:db8:1::2]:41000 --manifests DIR: the whole chain, both families");
    let explained = std::process::Command::new(agent_bin)
        .args([
            "explain",
            "web.demo:80",
            "--client",
            "198.18.1.2:41000",
            "--client",
            "[2001:db8:1::2]:41000",
            "--pin-dir",
            PIN_DIR,
        ])
        .arg("--manifests")
        .arg(&scratch.0)
        .output()?;
    anyhow::ensure!(
        explained.status.success(),
        "explain failed: {}",
        String::from_utf8_lossy(&explained.stderr)
    );
    print!("{}", String::from_utf8_lossy(&explained.stdout));

    step("cleanup: SIGTERM to the agent (detach, unpin), delete namespaces");
    let status = agent.stop()?;
    println!("  lb-agent exited: {status}");
    drop(conn);
    drop(servers);
    drop(topology);
    println!("\ndemo done");
    Ok(())
}

const DNS_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 53);

/// Cluster DNS in two pods behind the kube-dns ClusterIP; the client pod
/// resolves names through it (glibc, its resolv.conf as the kubelet writes
/// it) and connects by name. Returns what must live until the end.
fn cluster_dns(
    topology: &Topology,
    pods: &[usize],
    scratch: &ScratchDir,
) -> anyhow::Result<(Vec<DnsServer>, PodResolvConf)> {
    step("cluster DNS: dnsmasq in pods lbd-be3, lbd-be4 behind kube-dns 198.19.0.53 (UDP and TCP 53), records generated from the manifests");
    let (objects, _) = lb_agent::source::manifest::parse_str(MANIFEST, None)?;
    let config = scratch.0.join("dns-records.conf");
    std::fs::write(&config, records(&objects))?;
    let servers = pods
        .iter()
        .map(|i| {
            DnsServer::start(
                &topology.backends[*i],
                backend_ip(*i),
                &config,
                &scratch.0.join(format!("dnsmasq-{i}.log")),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let resolv = PodResolvConf::write(&topology.client, DNS_VIP, "demo")?;
    let client = &topology.client;
    println!("  client resolv.conf: nameserver {DNS_VIP}, search demo.svc.cluster.local svc.cluster.local cluster.local, ndots:5");
    // Both families' cluster IPs (a dual-stack pod's resolver asks for A
    // and AAAA).
    let addresses = |answer: &str| -> Vec<String> {
        let mut seen: Vec<String> = answer
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let want = vec![VIP.to_string(), VIP6.to_string()];
    for (how, env) in [
        ("UDP", &[][..]),
        ("TCP, use-vc", &[("RES_OPTIONS", "use-vc")][..]),
    ] {
        let answer = addresses(&exec_in(client, env, &["getent", "ahosts", "web"])?);
        println!(
            "  getent ahosts web ({how}):{:pad$}{}",
            "",
            answer.join(", "),
            pad = 14 - how.len()
        );
        anyhow::ensure!(answer == want, "web resolved to {answer:?}, not {want:?}");
    }
    let srv = exec_in(
        client,
        &[],
        &[
            "dig",
            "+short",
            "SRV",
            "_http._tcp.web.demo.svc.cluster.local",
        ],
    )?;
    println!("  SRV _http._tcp.web.demo:           {srv}");
    anyhow::ensure!(
        srv.ends_with("80 web.demo.svc.cluster.local."),
        "SRV answer: {srv}"
    );
    let headless = exec_in(client, &[], &["getent", "ahostsv4", "web-pods"])?;
    let pod_ips: std::collections::BTreeSet<&str> = headless
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    println!(
        "  getent ahostsv4 web-pods (headless): {}",
        pod_ips.iter().copied().collect::<Vec<_>>().join(", ")
    );
    anyhow::ensure!(pod_ips.len() == 3, "headless answer: {headless}");
    for i in 1..=3 {
        let body = exec_in(
            client,
            &[],
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "http://web.demo.svc.cluster.local/",
            ],
        )?;
        println!("  curl http://web.demo.svc.cluster.local/ #{i}: {body}");
        anyhow::ensure!(body.starts_with("backend pod-"), "by name: {body}");
    }
    // The queries went through lb: its conntrack holds them.
    let snapshot = lb_agent::cli::inspect::snapshot(Path::new(PIN_DIR))?;
    let flows = lb_agent::cli::inspect::flows(
        Path::new(PIN_DIR),
        &snapshot,
        &lb_agent::cli::inspect::Filter {
            service: Some("kube-system/kube-dns".into()),
            backend: None,
        },
    )?;
    let by_proto = |p: &str| flows.iter().filter(|f| f.protocol == p).count();
    println!(
        "  lb conntrack for kube-system/kube-dns: {} UDP and {} TCP flows, to {}",
        by_proto("UDP"),
        by_proto("TCP"),
        flows
            .iter()
            .map(|f| f.backend.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    );
    anyhow::ensure!(
        by_proto("UDP") > 0 && by_proto("TCP") > 0,
        "DNS did not pass through lb"
    );
    Ok((servers, resolv))
}
