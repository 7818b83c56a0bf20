//! Privileged test support: packet builder, BPF_PROG_TEST_RUN harness,
//! network-namespace topology with real servers. Shared by the tests and
//! `cargo xtask demo`.

pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod datapath;
pub mod deploy;
pub mod flood;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod packet;
pub mod process;
pub mod servers;
pub mod topology;

/// Fails the calling test unless running as root (tests must not silently skip).
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "privileged tests need root: run `cargo xtask test` as root"
    );
}

/// Keeps the calling thread on CPU 0: what per-CPU state sees (a token
/// bucket, say) must not move between CPUs mid-test.
pub fn pin_to_cpu0() {
    pin_to_cpu(0);
}

fn pin_to_cpu(cpu: usize) {
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(cpu).expect("CPU number");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu)
        .unwrap_or_else(|e| panic!("pinning to CPU {cpu} (the test needs two CPUs): {e}"));
}

/// Runs `f(round, cpu)` on CPUs 0 and 1 at once, for `rounds` rounds: one
/// thread pinned to each meets the other at a spin barrier before every
/// call, so the two calls overlap as two sends on one socket from two CPUs
/// do. (BPF_F_TEST_RUN_ON_CPU is for raw tracepoints only; a test run of a
/// tc program runs on the calling thread's CPU.) Threads inherit the
/// caller's network namespace.
pub fn on_two_cpus(rounds: u32, f: impl Fn(u32, usize) + Sync) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let started = [AtomicU32::new(0), AtomicU32::new(0)];
    std::thread::scope(|scope| {
        for cpu in 0..2 {
            let (f, started) = (&f, &started);
            scope.spawn(move || {
                pin_to_cpu(cpu);
                for round in 0..rounds {
                    started[cpu].store(round + 1, Ordering::Release);
                    while started[1 - cpu].load(Ordering::Acquire) <= round {
                        std::hint::spin_loop();
                    }
                    f(round, cpu);
                }
            });
        }
    });
}

/// How long a test waits for something the agent does in reaction to an
/// event (a flush, a reset): generous, since a wait ends when it happens.
pub const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Polls `done` every 20 ms for up to `within`; whether it came true.
pub fn wait_until(within: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}
