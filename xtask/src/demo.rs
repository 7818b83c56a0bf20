//! `cargo xtask demo`: the whole product on one machine, in namespaces.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
};

use anyhow::Context as _;
use lb_tests::{
    servers::{http_get, udp_query, EchoConnection},
    topology::{Agent, ScratchDir, Topology, VIP},
};

/// The example manifest the demo programs (also used by build-and-load).
pub const MANIFEST: &str = include_str!("../../deploy/examples/demo.yaml");
const PIN_DIR: &str = "/sys/fs/bpf/lb-demo";

fn step(text: &str) {
    println!("\n== {text}");
}

pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    step("topology: client pod 198.18.1.2 → node (lb-agent) → backend pods 198.18.{10,11,12}.2");
    let topology = Topology::new("lbd", 3)?;
    let servers = topology.serve_backends("pod-")?;
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
        m.contains(&format!("{VIP}:80/TCP count=3"))
    })?;
    println!("lb-agent running in namespace lbd-node, attached to lbd-*, maps pinned in {PIN_DIR}");

    step(&format!("services (lb-agent inspect --pin-dir {PIN_DIR})"));
    print!("{}", lb_agent::inspect::services(Path::new(PIN_DIR))?);

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

    step("scale down: pod-1 leaves the EndpointSlice while a connection to it is open");
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
        m.contains(&format!("{VIP}:80/TCP count=2"))
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
    let table = lb_agent::inspect::conntrack(pin_dir)?;
    let rows: Vec<&str> = table.lines().collect();
    for line in rows.iter().take(7) {
        println!("  {line}");
    }
    if rows.len() > 7 {
        println!("  ...\n  {}", rows[rows.len() - 1]);
    }
    step("per-reason packet counters (lb-agent inspect stats)");
    for line in lb_agent::inspect::stats(pin_dir)?.lines() {
        println!("  {line}");
    }

    step("cleanup: SIGTERM to the agent (detach, unpin), delete namespaces");
    let status = agent.stop()?;
    println!("  lb-agent exited: {status}");
    drop(conn);
    drop(servers);
    drop(topology);
    println!("\ndemo done");
    Ok(())
}
