//! Load generators run inside the client namespace: short connections
//! (connect, HTTP GET, read to close) from several threads for a fixed time,
//! and one long bulk transfer.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{netns::NetNs, servers::http_get};

pub struct ConnResult {
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub errors: u64,
}

/// Short connections to `targets` (round-robin per thread) for `duration`.
pub fn connections(
    client: &NetNs,
    targets: &[SocketAddr],
    threads: usize,
    duration: Duration,
) -> ConnResult {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, targets) = (stop.clone(), targets.to_vec());
            client.spawn(move || {
                let (mut latencies, mut errors, mut k) = (Vec::with_capacity(1 << 16), 0u64, t);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match http_get(targets[k % targets.len()]) {
                        Ok(body) if body.starts_with("backend ") => {
                            latencies.push(started.elapsed())
                        }
                        _ => errors += 1,
                    }
                    k += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.join().expect("load thread");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort();
    let pick = |p: f64| super::percentile(&all, p);
    ConnResult {
        per_second: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
        errors,
    }
}

/// One connection carrying `bytes`; returns Gbit/s.
pub fn throughput(client: &NetNs, target: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let elapsed = client.run(|| lb_tests::servers::sink_transfer(target, bytes))?;
    Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}
