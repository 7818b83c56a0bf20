//! `cargo xtask soak`: restarts under load. Long-lived TCP connections, a
//! steady stream of new TCP connections and UDP request/response run
//! through a VIP while the agent is killed with SIGKILL and restarted
//! five times, then stopped with SIGTERM (`--keep-datapath`) and started
//! again. Every failure is counted; the figures go to
//! bench/results/soak.md. Not a test: a repeatable measurement.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    servers::{http_get, EchoConnection},
    topology::{backend_ip, web_manifest, Agent, ScratchDir, Topology, VIP},
};

const PIN_DIR: &str = "/sys/fs/bpf/lb-soak";
const KILLS: usize = 5;
const LONG_LIVED: usize = 4;

#[derive(Default)]
struct Counts {
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    long_asks: AtomicU64,
    long_failed: AtomicU64,
    udp_answered: AtomicU64,
    udp_retried: AtomicU64,
    udp_lost: AtomicU64,
}

pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by topology::agent_binary.
    unsafe { std::env::set_var("LB_AGENT_BIN", agent_bin) };
    let topology = Topology::new("lbsoak", 3)?;
    let _servers = topology.serve_backends("pod-")?;
    let scratch = ScratchDir::new("lb-soak")?;
    let ready: Vec<(Ipv4Addr, bool)> = (0..3).map(|i| (backend_ip(i), true)).collect();
    scratch.write("web.yaml", &web_manifest(&ready))?;
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
    agent.wait_for_maps("the service", |m| {
        m.contains(&format!("{VIP}:80/TCP count=3"))
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
                match http_get(vip(80)) {
                    Ok(body) if body.starts_with("backend ") => &counts.new_ok,
                    _ => &counts.new_failed,
                }
                .fetch_add(1, Ordering::Relaxed);
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
    stop.store(true, Ordering::Relaxed);
    for handle in load {
        let _ = handle.join();
    }
    agent.cleanup_pins = true;
    drop(agent);

    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut report = String::from("# Restarts under load (`cargo xtask soak`)\n\n");
    let _ = writeln!(
        report,
        "Through {VIP} (3 backends) from a client pod: {LONG_LIVED} long-lived TCP connections asking every 20 ms, \
         new TCP connections back to back, UDP request/response (3 tries of 200 ms, as a resolver). \
         Meanwhile the agent was killed with SIGKILL and restarted {KILLS} times, then stopped with SIGTERM \
         (`--keep-datapath`) and started again, with 0.5 s without any agent each time.\n"
    );
    let _ = writeln!(report, "| what | count |\n|---|---|");
    for (what, n) in [
        ("new TCP connections answered", c(&counts.new_ok)),
        ("new TCP connections failed", c(&counts.new_failed)),
        ("questions on long-lived connections", c(&counts.long_asks)),
        (
            "long-lived connections broken (reset or timed out)",
            c(&counts.long_failed),
        ),
        ("UDP requests answered", c(&counts.udp_answered)),
        ("UDP retries (the client's own)", c(&counts.udp_retried)),
        (
            "UDP requests lost beyond the client's retries",
            c(&counts.udp_lost),
        ),
    ] {
        let _ = writeln!(report, "| {what} | {n} |");
    }
    let _ = writeln!(
        report,
        "\n| restart | agent start → previous run's links released |\n|---|---|"
    );
    for (how, took) in &restarts {
        let _ = writeln!(report, "| {how} | {:.2} s |", took.as_secs_f64());
    }
    print!("{report}");
    let out = crate::workspace_root().join("bench/results/soak.md");
    std::fs::write(&out, &report)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}
