//! `cargo xtask upkeep`: the agent at a production conntrack size. The
//! assured table is filled with `FLOWS` flows (two entries each), half of
//! them expired, and the release agent started on it with a short GC
//! interval; `/healthz` is asked every few milliseconds through several GC
//! passes. Reports each pass's time, the health check's latency (median,
//! p99, worst) and the agent's peak RSS to bench/results/upkeep.md. Not a
//! test: a repeatable measurement.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::HashMap;
use lb_agent::datapath::{conntrack::monotonic_ns, loader};
use lb_common::ct::{CtKey, CtValue, CT_ASSURED, CT_DIR_FORWARD, CT_MAP, CT_SEEN_REPLY};
use lb_tests::{
    netns::NetNs,
    topology::{backend_ip, web_manifest, Agent, ScratchDir, VIP},
};

const PIN_DIR: &str = "/sys/fs/bpf/lb-upkeep";
/// One million flows: two million entries.
const FLOWS: u32 = 1_000_000;
const TABLE: u32 = 4_194_304;
const GC_INTERVAL: Duration = Duration::from_secs(8);
const PASSES: usize = 3;
const HEALTH: &str = "127.0.0.1:10256";
const ASK_EVERY: Duration = Duration::from_millis(5);

pub fn run(agent_binary: &Path) -> anyhow::Result<()> {
    // SAFETY: single-threaded here; read by the agent helper. Passes with
    // nothing to free are logged at debug.
    unsafe {
        std::env::set_var("LB_AGENT_BIN", agent_binary);
        std::env::set_var("RUST_LOG", "info,lb_agent::serve::upkeep=debug");
    }
    let node = NetNs::new("lb-upkeep-node")?;
    let manifests = ScratchDir::new("lb-upkeep-manifests")?;
    manifests.write("web.yaml", &web_manifest(&[(backend_ip(0), true)]))?;
    let _ = std::fs::remove_dir_all(PIN_DIR);
    let filled = Instant::now();
    fill_conntrack(Path::new(PIN_DIR))?;
    println!("{} entries written in {:.1?}", 2 * FLOWS, filled.elapsed());

    let table = TABLE.to_string();
    let gc = format!("{}s", GC_INTERVAL.as_secs());
    let mut agent = Agent::start(
        &node,
        &manifests.0,
        "lo",
        &PathBuf::from(PIN_DIR),
        &manifests.0.join("agent.log"),
        &[
            "--max-conntrack",
            &table,
            "--conntrack-gc-interval",
            &gc,
            "--health-addr",
            HEALTH,
            "--metrics-bind-address",
            "",
        ],
    )?;
    let pid = agent.pid().context("agent pid")?;
    // Asked from the first programmed state on: loading the datapath holds
    // the serving thread (the verifier), before any GC.
    let synced = Instant::now() + Duration::from_secs(60);
    while !agent.log_text().contains("applied") {
        anyhow::ensure!(
            Instant::now() < synced,
            "the agent never programmed its services"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let health: SocketAddr = HEALTH.parse()?;
    let passes_done = || gc_passes(&agent.log_text()).len() >= PASSES;
    let latencies = node.run(|| ask_health(health, passes_done))?;
    let memory = (
        crate::bench::status_kib(pid, "VmHWM")?,
        crate::bench::status_kib(pid, "VmRSS")?,
    );
    let passes = gc_passes(&agent.log_text());
    agent.stop()?;

    let report = report(&latencies, &passes, memory);
    print!("{report}");
    let path = crate::results::publish("upkeep.md", &report)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Creates the pinned datapath and writes `FLOWS` assured flows into it,
/// the even ones expired.
fn fill_conntrack(pin_dir: &Path) -> anyhow::Result<()> {
    let sizes = loader::MapSizes {
        conntrack: TABLE,
        ..loader::MapSizes::default()
    };
    let mut ebpf = loader::load(Some(pin_dir), sizes, &loader::Globals::DEFAULT)?;
    let mut table: HashMap<_, CtKey, CtValue> =
        ebpf.take_map(CT_MAP).context("conntrack map")?.try_into()?;
    let now = monotonic_ns();
    let (past, later) = (now - 1, now + 3_600 * 1_000_000_000);
    for n in 0..FLOWS {
        let host = 0x0001_0000 + (n >> 6); // inside 198.18.0.0/15
        let client = [198, 18 + (host >> 16) as u8, (host >> 8) as u8, host as u8];
        let port = 10_000 + (n & 63) as u16;
        let key = CtKey::new(client, port, VIP.octets(), 80, 6, CT_DIR_FORWARD);
        let forward = CtValue {
            src_addr: client,
            src_port: port,
            dst_addr: backend_ip(0).octets(),
            dst_port: 8080,
            backend_id: 1,
            flow_id: n + 1,
            flags: CT_ASSURED | CT_SEEN_REPLY,
            created_ns: 1,
            expires_ns: if n % 2 == 0 { past } else { later },
            ..CtValue::default()
        };
        table.insert(key, forward, 0)?;
        table.insert(key.peer_key(&forward), key.peer_value(&forward), 0)?;
    }
    Ok(())
}

/// Asks `/healthz` every `ASK_EVERY` until `done` (at most a few minutes);
/// each answer's latency (a failed ask counts as the time it took).
fn ask_health(addr: SocketAddr, done: impl Fn() -> bool) -> anyhow::Result<Vec<Duration>> {
    let until = Instant::now() + Duration::from_secs(300);
    let mut latencies = Vec::new();
    while !done() {
        anyhow::ensure!(
            Instant::now() < until,
            "{PASSES} GC passes did not happen in time"
        );
        let asked = Instant::now();
        let answered = (|| -> std::io::Result<()> {
            let mut stream = TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply)?;
            Ok(())
        })();
        latencies.push(asked.elapsed());
        if let Err(e) = answered {
            eprintln!("/healthz: {e}");
        }
        std::thread::sleep(ASK_EVERY.saturating_sub(asked.elapsed()));
    }
    Ok(latencies)
}

/// (seconds, freed flows, entries left) of each GC pass the agent logged.
fn gc_passes(log: &str) -> Vec<(f64, u64, u64)> {
    let field = |line: &str, name: &str| -> Option<f64> {
        let rest = &line[line.find(&format!(" {name}="))? + name.len() + 2..];
        rest.split(|c: char| c.is_whitespace() || c == ',')
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|l| l.contains("conntrack gc"))
        .filter_map(|l| {
            Some((
                field(l, "seconds")?,
                field(l, "freed_flows")? as u64,
                field(l, "entries")? as u64,
            ))
        })
        .collect()
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// `memory`: (peak, end) RSS in KiB.
fn report(latencies: &[Duration], passes: &[(f64, u64, u64)], memory: (f64, f64)) -> String {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let mut out = String::from("# Upkeep at production size\n\n");
    let _ = writeln!(
        out,
        "Conntrack: {} flows ({} entries, half expired) in a table of {TABLE}; \
         GC every {} s; `/healthz` asked every {} ms from the first programmed \
         state through {PASSES} GC passes (release build, `cargo xtask upkeep`).\n",
        FLOWS,
        2 * FLOWS,
        GC_INTERVAL.as_secs(),
        ASK_EVERY.as_millis()
    );
    out.push_str("| GC pass | seconds | flows freed | entries left |\n|---|---|---|---|\n");
    for (i, (seconds, freed, left)) in passes.iter().enumerate() {
        let _ = writeln!(out, "| {} | {seconds:.2} | {freed} | {left} |", i + 1);
    }
    out.push_str(
        "\n| `/healthz` | asks | median ms | p99 ms | worst ms |\n|---|---|---|---|---|\n",
    );
    if !sorted.is_empty() {
        let _ = writeln!(
            out,
            "| during the run | {} | {} | {} | {} |",
            sorted.len(),
            ms(quantile(&sorted, 0.5)),
            ms(quantile(&sorted, 0.99)),
            ms(*sorted.last().unwrap())
        );
    }
    let _ = writeln!(
        out,
        "\nAgent memory: peak RSS (VmHWM) {:.0} MiB, RSS at the end {:.0} MiB.",
        memory.0 / 1024.0,
        memory.1 / 1024.0
    );
    out
}
