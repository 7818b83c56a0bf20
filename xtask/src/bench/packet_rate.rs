//! Packets per second through a node port, measured at the backend: on the
//! two-node topology, a generator on the external client sends UDP to
//! node-a's node port, whose only endpoint is pod-b on node-b, so every
//! packet is DNATed and SNATed at node-a (lb: tc at the uplink; the peers:
//! kube-proxy-shaped iptables and nftables rules with masquerade). The
//! packets come from 64 client ports, each a flow of its own.
//!
//! There is no pktgen module here: the generator is an XDP program run
//! with BPF_PROG_TEST_RUN in live-frames mode on the client's interface,
//! which sends each repeat of the frame out of it for real, from the
//! calling thread, pinned to one CPU. Live frames recycle their pages, and
//! the receiving side rewrites the packet in them (the node's NAT), so the
//! program writes the frame's headers again on every repeat — one program
//! per flow, the headers its constants — and returns `XDP_TX`. The
//! forwarding work follows on that CPU (veth delivers in the sender's
//! softirq), so the rate is one core's: the figure is packets arriving at
//! pod-b's interface per second, and the CPU time of the whole machine
//! (both cores, from /proc/stat) per million of them.

use std::{
    net::SocketAddrV4,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_tests::{
    cluster::{Cluster, CLIENT_IPS, NODE_IPS},
    netns::NetNs,
};

use super::{nodeport, BenchConfig, Mode, Sample};

/// Client ports the frames come from (one frame and generator each, sent
/// in turn).
const FLOWS: u16 = 64;
const FIRST_CLIENT_PORT: u16 = 40000;
/// Frames sent per test run (one frame repeated), and per batch inside it.
const REPEAT: u32 = 4096;
const BATCH: u32 = 64;
const PAYLOAD: usize = 18; // a 64-byte Ethernet frame

/// Every peer mode, lb and direct access, `config.runs` times each, at
/// `scale` services.
pub fn measure(scale: usize, config: &BenchConfig) -> anyhow::Result<Vec<(Mode, Sample)>> {
    let services = nodeport::services(scale);
    super::every_mode(
        &format!("packet rate, {scale} services"),
        &Mode::ALL,
        config,
        |mode, sample| {
            let mut cluster = Cluster::without_agents(PREFIX)?;
            let target = nodeport::program(mode, &mut cluster, &services, nodeport::Proto::Udp)?;
            one_run(&cluster, target, config.duration, sample)
        },
    )
}

const PREFIX: &str = "lbp";

/// Sends to `target` (node-a's node port; for direct, pod-b by way of
/// node-b) for `duration`.
fn one_run(
    cluster: &Cluster,
    target: SocketAddrV4,
    duration: Duration,
    sample: &mut Sample,
) -> anyhow::Result<()> {
    let client = &cluster.clients[0];
    let lan_port = format!("{PREFIX}-c0");
    // veth hands XDP_TX frames to its peer's NAPI, which GRO turns on.
    run_in(&cluster.lan, &["ethtool", "-K", &lan_port, "gro", "on"])?;
    let via = usize::from(*target.ip() != NODE_IPS[0]);
    let node_mac = mac(&cluster.nodes[via], "eth0")?;
    let client_mac = mac(client, "eth0")?;
    let flows: Vec<(Vec<u8>, Generator)> = (0..FLOWS)
        .map(|i| {
            let frame = udp_frame(client_mac, node_mac, FIRST_CLIENT_PORT + i, target);
            Generator::load(&frame).map(|g| (frame, g))
        })
        .collect::<anyhow::Result<_>>()?;
    let ifindex = client.run(|| interface_index("eth0"))?;
    let rx = || rx_packets(&cluster.pods[1]);
    // Warm up: every flow's first packet creates its state.
    client.run(|| -> anyhow::Result<()> {
        pin_to_cpu(0)?;
        for (frame, generator) in &flows {
            generator.send(ifindex, frame, 1)?;
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let (rx_before, cpu_before) = (rx()?, cpu_busy_s()?);
    let started = Instant::now();
    let sent = client.run(|| -> anyhow::Result<u64> {
        pin_to_cpu(0)?;
        let mut sent = 0u64;
        let mut i = 0;
        while started.elapsed() < duration {
            let (frame, generator) = &flows[i % flows.len()];
            generator.send(ifindex, frame, REPEAT)?;
            sent += u64::from(REPEAT);
            i += 1;
        }
        Ok(sent)
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    // Let the last batches drain before counting.
    std::thread::sleep(Duration::from_millis(100));
    let (rx_after, cpu_after) = (rx()?, cpu_busy_s()?);
    let arrived = rx_after.saturating_sub(rx_before) as f64;
    if arrived < 1.0 {
        bail!("no packet reached pod-b (sent {sent})");
    }
    sample.pps.push(arrived / elapsed);
    sample
        .cpu_s_per_mpkt
        .push((cpu_after - cpu_before) / arrived * 1e6);
    sample.offered_pps.push(sent as f64 / elapsed);
    Ok(())
}

/// A minimal UDP datagram from the client to `to`, IPv4 checksum
/// computed, UDP checksum 0 ("none").
fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], sport: u16, to: SocketAddrV4) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + PAYLOAD) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&CLIENT_IPS[0].octets());
    ip.extend_from_slice(&to.ip().octets());
    let csum = lb_tests::packet::checksum(&ip, 0);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&to.port().to_be_bytes());
    f.extend_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0x61; PAYLOAD]);
    f
}

/// One flow's generator: writes the frame's first `HEADER` bytes, then
/// `XDP_TX`. Loaded with raw `bpf(2)` calls (no object file).
struct Generator {
    prog: OwnedFd,
}

/// Bytes the generator rewrites: Ethernet, IPv4 and UDP headers (42) and
/// the start of the payload, in six 8-byte stores.
const HEADER: usize = 48;

/// One eBPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// `frame[..HEADER]` written at the packet's start, then `XDP_TX`; a
/// shorter packet is dropped.
fn generator_program(frame: &[u8]) -> Vec<u64> {
    const LDXW: u8 = 0x61;
    const MOV64_X: u8 = 0xbf;
    const MOV64_K: u8 = 0xb7;
    const ADD64_K: u8 = 0x07;
    const JGT_X: u8 = 0x2d;
    const LDDW: u8 = 0x18;
    const STXDW: u8 = 0x7b;
    const EXIT: u8 = 0x95;
    let mut p = vec![
        insn(LDXW, 2, 1, 0, 0), // r2 = ctx->data
        insn(LDXW, 3, 1, 4, 0), // r3 = ctx->data_end
        insn(MOV64_X, 4, 2, 0, 0),
        insn(ADD64_K, 4, 0, 0, HEADER as i32),
        insn(JGT_X, 4, 3, 20, 0), // past data_end: drop
    ];
    for (i, word) in frame[..HEADER].chunks(8).enumerate() {
        let v = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        p.push(insn(LDDW, 5, 0, 0, v as u32 as i32));
        p.push(insn(0, 0, 0, 0, (v >> 32) as u32 as i32));
        p.push(insn(STXDW, 2, 5, (i * 8) as i16, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 3)); // XDP_TX
    p.push(insn(EXIT, 0, 0, 0, 0));
    p.push(insn(MOV64_K, 0, 0, 0, 1)); // XDP_DROP
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as test runs take it.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a bpf_attr prefix of the command's layout, valid
    // for the call; the kernel reads (and writes back) at most its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

impl Generator {
    fn load(frame: &[u8]) -> anyhow::Result<Self> {
        let insns = generator_program(frame);
        let license = b"GPL\0";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: *b"lb_bench_gen\0\0\0\0",
            ..ProgLoadAttr::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the XDP generator")?;
        // SAFETY: a new descriptor the kernel just gave this process.
        Ok(Self {
            prog: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// Sends `frame` `repeat` times out of interface `ifindex` (of the
    /// calling thread's network namespace).
    fn send(&self, ifindex: u32, frame: &[u8], repeat: u32) -> anyhow::Result<()> {
        let mut ctx = XdpMd {
            data_end: frame.len() as u32,
            ingress_ifindex: ifindex,
            ..XdpMd::default()
        };
        let mut attr = TestRunAttr {
            prog_fd: self.prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_in: &mut ctx as *mut XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: BATCH,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN (live frames)")?;
        Ok(())
    }
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("pinning the generator");
        }
    }
    Ok(())
}

fn interface_index(name: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()).context("if_nametoindex"),
        i => Ok(i),
    }
}

/// Runs a command inside `ns` (`ip netns exec`, which also gives it the
/// namespace's /sys).
fn run_in(ns: &NetNs, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "{} in {}: {}",
            args.join(" "),
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn mac(ns: &NetNs, dev: &str) -> anyhow::Result<[u8; 6]> {
    let text = run_in(ns, &["cat", &format!("/sys/class/net/{dev}/address")])?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text:?}"))
}

fn rx_packets(ns: &NetNs) -> anyhow::Result<u64> {
    run_in(ns, &["cat", "/sys/class/net/eth0/statistics/rx_packets"])?
        .parse()
        .context("rx_packets")
}

/// Busy CPU seconds of the whole machine so far (every state but idle and
/// iowait), from /proc/stat.
fn cpu_busy_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let busy: u64 = ticks
        .iter()
        .enumerate()
        // idle, iowait, and guest time (already in user)
        .filter(|(i, _)| ![3, 4, 8, 9].contains(i))
        .map(|(_, t)| *t)
        .sum();
    // SAFETY: a plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy as f64 / hz)
}

/// The report: each mode's rate and cost, and lb's ratios to the peers.
pub fn markdown(scale: usize, config: &BenchConfig, results: &[(Mode, Sample)]) -> String {
    use std::fmt::Write as _;
    let stats = super::report::stats;
    let pps_of = |mode: Mode| {
        results
            .iter()
            .find(|(m, _)| *m == mode)
            .map_or(f64::NAN, |(_, s)| stats(&s.pps).0)
    };
    let mut out = String::from("# Packet rate through a node port\n\n");
    let _ = writeln!(
        out,
        "UDP from the external client to node-a's node port, whose only endpoint is pod-b on node-b \
         (DNAT + SNAT at node-a), {} client ports, 64-byte frames sent by an XDP program in \
         BPF_PROG_TEST_RUN live-frames mode on one CPU; {scale} services; {} runs of {:.0} s each, \
         median [min–max]. Forwarded: packets arriving at pod-b's interface per second (one core: the \
         forwarding runs in the sender's softirq). CPU: busy seconds of the whole machine (run it idle) per million \
         forwarded.\n",
        FLOWS,
        config.runs,
        config.duration.as_secs_f64()
    );
    out.push_str("| mode | forwarded packets/s | CPU s per million | offered packets/s |\n|---|---|---|---|\n");
    for (mode, sample) in results {
        let (p, p_lo, p_hi) = stats(&sample.pps);
        let (c, c_lo, c_hi) = stats(&sample.cpu_s_per_mpkt);
        let (o, _, _) = stats(&sample.offered_pps);
        let _ = writeln!(
            out,
            "| {} | {p:.0} [{p_lo:.0}–{p_hi:.0}] | {c:.2} [{c_lo:.2}–{c_hi:.2}] | {o:.0} |",
            mode.name()
        );
    }
    let lb = pps_of(Mode::Lb);
    let _ = writeln!(
        out,
        "\nlb (tc) / nftables: {:.2}; lb (tc) / iptables: {:.2}; lb (tc) / direct: {:.2}. \
         `direct` sends to pod-b by way of node-b: no NAT, one hop fewer (the floor). \
         Offered equals forwarded when the generator's core is the limit: every hop runs \
         on it, so these rates are of the whole path, not node-a's forwarding alone.",
        lb / pps_of(Mode::Nftables),
        lb / pps_of(Mode::Iptables),
        lb / pps_of(Mode::Direct)
    );
    out
}
