//! Packets fuzzed through the real programs with BPF_PROG_TEST_RUN: random
//! and structured TCP/UDP/ICMP packets (IP options, fragments, truncated
//! headers, ICMP errors quoting other packets) and byte-level mutations of
//! them, through the pod-facing ingress, the uplink ingress and egress.
//! - every run succeeds (no verifier-visible fault, no helper error);
//! - a packet that has nothing to do with a service (addresses no
//!   frontend, backend or client uses) leaves every program unmodified;
//! - a well-formed packet the programs do rewrite leaves with valid
//!   IPv4 and transport (or ICMP) checksums.
//!
//! Deterministic (a fixed seed): a failure reproduces.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::datapath::{EGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM};
use lb_tests::{
    datapath::Harness,
    packet::{icmp_error, verify_checksums, Packet},
    require_root,
    topology::{web_manifest, CLIENT_IP, VIP},
};

const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 10, 2), Ipv4Addr::new(198, 18, 11, 2)];
/// Addresses no service, backend or client uses.
const STRANGERS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 200, 1),
    Ipv4Addr::new(198, 18, 200, 2),
    Ipv4Addr::new(198, 19, 200, 9),
];

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn address(rng: &mut Rng, strangers_only: bool) -> Ipv4Addr {
    if strangers_only {
        return rng.pick(&STRANGERS);
    }
    match rng.below(4) {
        0 => VIP,
        1 => rng.pick(&BACKENDS),
        2 => CLIENT_IP,
        _ => rng.pick(&STRANGERS),
    }
}

/// A well-formed TCP or UDP packet with random fields (valid checksums):
/// half of them (unless strangers only) shaped like service traffic — a
/// client to the VIP, or a backend's reply — so the rewrite paths run.
fn transport(rng: &mut Rng, strangers_only: bool) -> Packet {
    let port = |rng: &mut Rng| rng.pick(&[80u16, 53, 8080, 5353, 40000, 1, 65535]);
    let client_port = 40000 + rng.below(8) as u16;
    let tcp = rng.below(2) == 0;
    let (src, dst) = match (strangers_only, rng.below(4)) {
        (false, 0) => (
            SocketAddrV4::new(CLIENT_IP, client_port),
            SocketAddrV4::new(VIP, if tcp { 80 } else { 53 }),
        ),
        (false, 1) => (
            SocketAddrV4::new(rng.pick(&BACKENDS), if tcp { 8080 } else { 5353 }),
            SocketAddrV4::new(CLIENT_IP, client_port),
        ),
        _ => (
            SocketAddrV4::new(address(rng, strangers_only), port(rng)),
            SocketAddrV4::new(address(rng, strangers_only), port(rng)),
        ),
    };
    let payload: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
    let mut p = if tcp {
        Packet::tcp(src, dst, rng.next() as u8)
    } else {
        let mut p = Packet::udp(src, dst, &payload);
        p.udp_no_checksum = rng.below(4) == 0;
        p
    };
    p.payload = payload;
    p.ip_options = vec![1; 4 * rng.below(3) as usize]; // NOPs
    p.frag = rng.pick(&[0x4000u16, 0x4000, 0x4000, 0, 0x2000, 0x2010, 0x0008]);
    p.ttl = rng.pick(&[64u8, 64, 1, 0, 255]);
    p
}

/// A well-formed frame: transport, an ICMP error quoting one, or another protocol.
fn frame(rng: &mut Rng, strangers_only: bool) -> Vec<u8> {
    match rng.below(5) {
        0..=2 => transport(rng, strangers_only).build(),
        3 => {
            let quoted = transport(rng, strangers_only);
            let quote = rng.pick(&[None, Some(0), Some(4), Some(8), Some(20), Some(64)]);
            icmp_error(
                address(rng, strangers_only),
                address(rng, strangers_only),
                rng.pick(&[3u8, 11, 12, 0, 8, 5]),
                rng.below(16) as u8,
                rng.next() as u32,
                &quoted,
                quote,
            )
        }
        _ => {
            // Another IP protocol (GRE), or not IPv4 at all.
            let mut f = transport(rng, strangers_only).build();
            if rng.below(2) == 0 {
                f[23] = 47;
            } else {
                f[12..14].copy_from_slice(&[0x86, 0xdd]);
            }
            f
        }
    }
}

/// Byte-level damage: flips, truncation, length fields.
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 if !f.is_empty() => {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
            }
            1 => {
                // BPF_PROG_TEST_RUN takes no frame shorter than Ethernet.
                let len = rng.below(f.len() as u64 + 1) as usize;
                f.truncate(len.max(14));
            }
            2 if f.len() > 17 => f[16..18].copy_from_slice(&(rng.next() as u16).to_be_bytes()),
            _ if f.len() > 14 => f[14] = 0x40 | rng.below(16) as u8,
            _ => {}
        }
    }
    f
}

fn harness() -> Harness {
    let mut h = Harness::new();
    let ready: Vec<(Ipv4Addr, bool)> = BACKENDS.iter().map(|b| (*b, true)).collect();
    h.apply_yaml(&web_manifest(&ready));
    h
}

#[test]
fn fuzzed_packets_never_fault_leave_strangers_alone_and_keep_checksums_valid() {
    require_root();
    let h = harness();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut rewritten, mut runs, mut refused) = (0, 0, 0);
    for i in 0..6000 {
        let strangers_only = i % 3 == 0;
        let well_formed = rng.below(2) == 0;
        let mut f = frame(&mut rng, strangers_only);
        if !well_formed {
            f = mutate(&mut rng, f);
        }
        for name in [INGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, EGRESS_PROGRAM] {
            // The kernel refuses some inputs outright (an IPv4 frame too
            // short for its header): the program never ran.
            let Ok((out, _)) = h.try_run_program(name, &f) else {
                refused += 1;
                continue;
            };
            runs += 1;
            if out.frame == f {
                continue;
            }
            // Rejects are rebuilt packets: checked below like any rewrite.
            assert!(
                !strangers_only,
                "{name} modified a packet unrelated to any service:\nin  {f:02x?}\nout {:02x?}",
                out.frame
            );
            rewritten += 1;
            if well_formed {
                verify_checksums(&out.frame).unwrap_or_else(|e| {
                    panic!("{name}: {e}\nin  {f:02x?}\nout {:02x?}", out.frame)
                });
            }
        }
    }
    assert!(
        rewritten > 100,
        "the fuzzer reached the rewrite paths only {rewritten} times"
    );
    assert_eq!(runs + refused, 18_000);
    // Damaged IPv4 headers are refused by BPF_PROG_TEST_RUN itself; most
    // inputs must still reach the programs.
    assert!(
        runs > 14_000,
        "only {runs} runs; {refused} inputs refused by the kernel"
    );
    eprintln!("{runs} runs, {rewritten} rewritten, {refused} refused by the kernel");
}
