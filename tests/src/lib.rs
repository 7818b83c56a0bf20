//! Privileged test support: packet builder, BPF_PROG_TEST_RUN harness,
//! network-namespace topology with real servers. Shared by the tests and
//! `cargo xtask demo`.

pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod datapath;
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
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).expect("CPU 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).expect("affinity");
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
