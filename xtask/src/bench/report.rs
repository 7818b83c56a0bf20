//! In-process measurements (BPF per-packet cost, map write time) and the
//! markdown + SVG report.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use lb_agent::{
    datapath::{
        loader::{self, MapSizes},
        EGRESS_PROGRAM,
    },
    desired::{self, Limits},
    reconcile::Reconciler,
    source::manifest,
};
use lb_tests::{
    datapath::Harness,
    packet::{Packet, Packet6, TCP_ACK, TCP_SYN},
    topology::{backend_ip6, web_manifest, web_manifest6, CLIENT_IP, CLIENT_IP6, VIP, VIP6},
};

use super::{peers, BenchConfig, Mode, Sample, Service};

pub type Figure = (f64, f64, f64); // median, min, max

pub fn stats(v: &[f64]) -> Figure {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// ns/packet through the tc program with BPF_PROG_TEST_RUN: the kernel's
/// own timing of single runs (repeat 1, so every run sees an unmodified
/// packet), median over `PER_PACKET_RUNS` runs, one figure per batch.
/// The rows `bench-ipv6` sets side by side.
pub const FIRST_PACKET: &str =
    "first packet of a flow (service lookup, backend pick, 2 conntrack inserts, DNAT)";
pub const CT_HIT: &str = "conntrack hit (established flow, assured, DNAT)";
pub const FIRST_PACKET6: &str = "IPv6: first packet of a flow (as IPv4's, plus two tail calls: to the IPv6 program, to its new-flow program)";
pub const FLOOR: &str = "ARP frame (one load, pass): the measurement's floor";
pub const NOT_SERVICE: &str = "not a service (service lookup, pass)";
pub const NOT_SERVICE6: &str = "IPv6: not a service (one tail call, service lookup, pass)";
/// lb_ingress6 run by itself: the IPv6 conntrack hit without the IPv4
/// program's parse and tail call in front of it.
pub const CT_HIT6_DIRECT: &str =
    "IPv6: conntrack hit, `lb_ingress6` entered directly (no IPv4 program, no tail call)";
const INGRESS6_PROGRAM: &str =
    lb_common::family6::PROGRAM_NAMES[lb_common::family6::INGRESS as usize];
pub const CT_HIT6: &str = "IPv6: conntrack hit (established flow, assured, DNAT; one tail call)";

pub fn per_packet_costs(runs: usize) -> anyhow::Result<Vec<(&'static str, Vec<f64>)>> {
    const PER_PACKET_RUNS: u16 = 20_000;
    // Room for every flow the batches create (two entries each): a full
    // table would time the drop path instead.
    let table_size = 2 * (runs as u32 + 1) * u32::from(PER_PACKET_RUNS) + 64;
    let manifest = web_manifest(
        &(0..10)
            .map(|i| (Ipv4Addr::new(198, 18, 10 + i, 2), true))
            .collect::<Vec<_>>(),
    );
    let mut h = Harness::with_conntrack_tables(table_size, table_size);
    h.apply_yaml(&manifest);
    // The same Service with `--lb-algorithm maglev`.
    let mut maglev = Harness::with_conntrack_tables(table_size, table_size);
    maglev.lb_algorithm = lb_agent::desired::LbAlgorithm::Maglev { table_size: None };
    maglev.apply_yaml(&manifest);
    let vip = SocketAddrV4::new(VIP, 80);
    // An established flow (assured: in the table lookups try first), and
    // one that has sent only its SYN (not yet assured: found second).
    let established = SocketAddrV4::new(CLIENT_IP, 40000);
    h.run(&Packet::tcp(established, vip, TCP_SYN).build());
    let (_, forward) = h
        .conntrack()
        .into_iter()
        .find(|(k, _)| k.sport == established.port() && k.dir == lb_common::ct::CT_DIR_FORWARD)
        .ok_or_else(|| anyhow::anyhow!("no flow for the established client"))?;
    let backend = SocketAddrV4::new(forward.dst_addr.into(), forward.dst_port);
    let at_backend = Packet::tcp(established, backend, TCP_SYN);
    h.run_egress(&at_backend.reply(TCP_SYN | TCP_ACK).build());
    h.run(&Packet::tcp(established, vip, TCP_ACK).build());
    h.run_egress(&at_backend.reply(TCP_ACK).with_payload(b"ok").build());
    let opening = SocketAddrV4::new(CLIENT_IP, 40001);
    h.run(&Packet::tcp(opening, vip, TCP_SYN).build());
    let in_table = |name, port| {
        h.conntrack_table(name)
            .iter()
            .any(|(k, _)| k.dir == lb_common::ct::CT_DIR_FORWARD && k.sport == port)
    };
    anyhow::ensure!(
        in_table(lb_common::ct::CT_MAP, established.port())
            && in_table(lb_common::ct::CT_NEW_MAP, opening.port()),
        "each timed flow is in the table its row names"
    );
    // The same Service over IPv6, with an established (assured) flow.
    let mut h6 = Harness::with_conntrack_tables(table_size, table_size);
    h6.apply_yaml(&web_manifest6(
        &(0..10).map(backend_ip6).collect::<Vec<_>>(),
    ));
    let vip6 = SocketAddrV6::new(VIP6, 80, 0, 0);
    let established6 = SocketAddrV6::new(CLIENT_IP6, 40000, 0, 0);
    h6.run(&Packet6::tcp(established6, vip6, TCP_SYN).build());
    let (_, forward6) = h6
        .conntrack6()
        .into_iter()
        .find(|(k, _)| k.sport == established6.port() && k.dir == lb_common::ct::CT_DIR_FORWARD)
        .ok_or_else(|| anyhow::anyhow!("no IPv6 flow for the established client"))?;
    let backend6 = SocketAddrV6::new(forward6.dst_addr.into(), forward6.dst_port, 0, 0);
    let at_backend6 = Packet6::tcp(established6, backend6, TCP_SYN);
    h6.run_egress(&at_backend6.reply(TCP_SYN | TCP_ACK).build());
    h6.run(&Packet6::tcp(established6, vip6, TCP_ACK).build());
    h6.run_egress(&at_backend6.reply(TCP_ACK).with_payload(b"ok").build());
    anyhow::ensure!(
        h6.conntrack6().iter().any(
            |(k, v)| k.sport == established6.port() && v.flags & lb_common::ct::CT_ASSURED != 0
        ),
        "the timed IPv6 flow is assured"
    );
    let ack6 = Packet6::tcp(established6, vip6, TCP_ACK).build();
    let other6 = Packet6::tcp(
        established6,
        SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1), 80, 0, 0),
        TCP_SYN,
    )
    .build();
    let mut new_flow6 = Vec::new();
    let mut ct_hit6 = Vec::new();
    let mut ct_hit6_direct = Vec::new();
    let mut not_service6 = Vec::new();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut new_flow = Vec::new();
    let mut new_flow_maglev = Vec::new();
    let mut ct_hit = Vec::new();
    let mut ct_hit_new = Vec::new();
    let mut not_service = Vec::new();
    let mut not_reply = Vec::new();
    let mut floor = Vec::new();
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 46]);
    let ack = Packet::tcp(established, vip, TCP_ACK).build();
    let opening_ack = Packet::tcp(opening, vip, TCP_ACK).build();
    let other = Packet::tcp(
        established,
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 1), 80),
        TCP_SYN,
    )
    .build();
    for batch in 0..runs {
        // A new source address per batch and port per run: each SYN is a new flow.
        let client = Ipv4Addr::new(198, 18, 2, batch as u8 + 1);
        let syns: Vec<Vec<u8>> = (0..PER_PACKET_RUNS)
            .map(|p| Packet::tcp(SocketAddrV4::new(client, 1024 + p), vip, TCP_SYN).build())
            .collect();
        new_flow.push(median(
            syns.iter()
                .map(|f| h.run_timed(f).1.as_nanos() as f64)
                .collect(),
        ));
        new_flow_maglev.push(median(
            syns.iter()
                .map(|f| maglev.run_timed(f).1.as_nanos() as f64)
                .collect(),
        ));
        ct_hit.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h.run_timed(&ack).1.as_nanos() as f64)
                .collect(),
        ));
        ct_hit_new.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h.run_timed(&opening_ack).1.as_nanos() as f64)
                .collect(),
        ));
        not_service.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h.run_timed(&other).1.as_nanos() as f64)
                .collect(),
        ));
        not_reply.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h.run_program(EGRESS_PROGRAM, &other).1.as_nanos() as f64)
                .collect(),
        ));
        floor.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h.run_timed(&arp).1.as_nanos() as f64)
                .collect(),
        ));
        let client6 = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, batch as u16 + 1);
        let syns6: Vec<Vec<u8>> = (0..PER_PACKET_RUNS)
            .map(|p| {
                let from = SocketAddrV6::new(client6, 1024 + p, 0, 0);
                Packet6::tcp(from, vip6, TCP_SYN).build()
            })
            .collect();
        new_flow6.push(median(
            syns6
                .iter()
                .map(|f| h6.run_timed(f).1.as_nanos() as f64)
                .collect(),
        ));
        ct_hit6.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h6.run_timed(&ack6).1.as_nanos() as f64)
                .collect(),
        ));
        ct_hit6_direct.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h6.run_program(INGRESS6_PROGRAM, &ack6).1.as_nanos() as f64)
                .collect(),
        ));
        not_service6.push(median(
            (0..PER_PACKET_RUNS)
                .map(|_| h6.run_timed(&other6).1.as_nanos() as f64)
                .collect(),
        ));
    }
    Ok(vec![
        (FIRST_PACKET, new_flow),
        (
            "first packet, `--lb-algorithm maglev` (a table lookup instead of the slot's)",
            new_flow_maglev,
        ),
        (CT_HIT, ct_hit),
        (
            "conntrack hit, flow not yet assured (the assured table missed first)",
            ct_hit_new,
        ),
        (NOT_SERVICE, not_service),
        (
            "egress, not a reply (both conntrack tables missed, pass)",
            not_reply,
        ),
        (FLOOR, floor),
        (FIRST_PACKET6, new_flow6),
        (CT_HIT6, ct_hit6),
        (CT_HIT6_DIRECT, ct_hit6_direct),
        (NOT_SERVICE6, not_service6),
    ])
}

/// Seconds per run: (parse + compute, map writes).
pub type MapWriteTimes = (Vec<f64>, Vec<f64>);

/// (parse + compute, map writes) seconds for all services, on private maps.
pub fn map_write_times(services: &[Service], runs: usize) -> anyhow::Result<MapWriteTimes> {
    let yaml = peers::manifest(services);
    let n = services.len() as u32;
    let sizes = MapSizes {
        service_slots: n * 11 + 64,
        backends: n * 10 + 64,
        conntrack: 4096,
        ..MapSizes::default()
    };
    let (mut compute, mut writes) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut ebpf = loader::load(None, sizes, &loader::Globals::DEFAULT)?;
        let mut reconciler =
            Reconciler::restore(loader::kernel_maps(&mut ebpf, sizes)?, sizes.backends)?;
        let started = Instant::now();
        let (objects, _) = manifest::parse_str(&yaml, None).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (desired, errors) = desired::compute(
            &objects,
            Limits {
                max_backends_per_service: 64,
                lb_algorithm: lb_agent::desired::LbAlgorithm::Random,
                ..Limits::DEFAULT
            },
            Default::default(),
        );
        anyhow::ensure!(errors.is_empty(), "{errors:?}");
        compute.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let report = reconciler.apply(&desired);
        anyhow::ensure!(report.errors.is_empty(), "{:?}", report.errors);
        writes.push(started.elapsed().as_secs_f64());
    }
    Ok((compute, writes))
}

fn cell(f: Figure, digits: usize) -> String {
    format!("{:.d$} [{:.d$}–{:.d$}]", f.0, f.1, f.2, d = digits)
}

/// Connections/s of direct, iptables, nftables and lb, then lb's ratios to each.
fn conns_cells(d: Figure, i: Figure, n: Figure, l: Figure) -> String {
    format!(
        "{} | {} | {} | {} | {:.3} | {:.3} | {:.3}",
        cell(d, 0),
        cell(i, 0),
        cell(n, 0),
        cell(l, 0),
        l.0 / d.0,
        l.0 / i.0,
        l.0 / n.0
    )
}

fn find(results: &[(usize, Mode, Sample)], scale: usize, mode: Mode) -> &Sample {
    &results
        .iter()
        .find(|(s, m, _)| *s == scale && *m == mode)
        .expect("result")
        .2
}

pub fn markdown(
    config: &BenchConfig,
    results: &[(usize, Mode, Sample)],
    node_ports: &[(usize, Vec<(Mode, Sample)>)],
    map_writes: &[(usize, MapWriteTimes)],
    per_packet: &[(&'static str, Vec<f64>)],
    took: Duration,
) -> String {
    let mut r = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(r, "# lb vs kube-proxy-shaped iptables and nftables\n");
    let _ = writeln!(
        r,
        "One run of `cargo xtask bench` on Linux {} ({} CPUs); {} runs per figure, each the median [min–max]. \
         Topology: client pod → node → 10 backend pods, veth pairs in network namespaces. Each scale is N services × 10 endpoints; \
         the target is the last service programmed (worst case for linear rule chains). Short connections: {} client threads for {:?}, \
         each connection an HTTP/1.0 GET and close. Took {:.0?}.\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        config.runs,
        config.threads,
        config.duration,
        took
    );
    let _ = writeln!(r, "![new connections per second](connections.svg)\n");
    let _ = writeln!(r, "## New TCP connections per second\n");
    let _ = writeln!(r, "| services | direct | iptables | nftables | lb | lb / direct | lb / iptables | lb / nftables |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|");
    for &scale in &config.scales {
        let med = |m| stats(&find(results, scale, m).conns_per_s);
        let (d, i, n, l) = (
            med(Mode::Direct),
            med(Mode::Iptables),
            med(Mode::Nftables),
            med(Mode::Lb),
        );
        let _ = writeln!(r, "| {scale} | {} |", conns_cells(d, i, n, l));
    }
    let _ = writeln!(
        r,
        "\n## Pods → VIP with socket LB (translated once, at connect)\n"
    );
    let _ = writeln!(r, "The same client and services; the load generator's process joins a cgroup of its own where lb's \
        cgroup programs are attached (`--socket-lb=true --cgroup-path`), so its connections go straight to a backend \
        with no per-packet NAT.\n");
    let _ = writeln!(r, "| services | direct | lb (tc) | lb socket LB | socket LB / direct | socket LB / tc | p50 / p99 ms | one long connection Gbit/s (× direct) |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|");
    for &scale in &config.scales {
        let (d, t, k) = (
            find(results, scale, Mode::Direct),
            find(results, scale, Mode::Lb),
            find(results, scale, Mode::LbSocket),
        );
        let (dc, tc, kc) = (
            stats(&d.conns_per_s),
            stats(&t.conns_per_s),
            stats(&k.conns_per_s),
        );
        let (dg, kg) = (stats(&d.gbit_s), stats(&k.gbit_s));
        let _ = writeln!(
            r,
            "| {scale} | {} | {} | {} | {:.3} | {:.3} | {:.3} / {:.3} | {} ({:.3}) |",
            cell(dc, 0),
            cell(tc, 0),
            cell(kc, 0),
            kc.0 / dc.0,
            kc.0 / tc.0,
            stats(&k.p50_ms).0,
            stats(&k.p99_ms).0,
            cell(kg, 2),
            kg.0 / dg.0
        );
    }
    let _ = writeln!(r, "\n## Connection latency (ms, p50 / p99)\n");
    let _ = writeln!(
        r,
        "| services | direct | iptables | nftables | lb |\n|---|---|---|---|---|"
    );
    for &scale in &config.scales {
        let row: Vec<String> = Mode::ALL
            .iter()
            .map(|m| {
                let s = find(results, scale, *m);
                format!("{:.3} / {:.3}", stats(&s.p50_ms).0, stats(&s.p99_ms).0)
            })
            .collect();
        let _ = writeln!(r, "| {scale} | {} |", row.join(" | "));
    }
    let _ = writeln!(
        r,
        "\n## One long connection (Gbit/s, {} MiB)\n",
        config.bulk_bytes >> 20
    );
    let _ = writeln!(
        r,
        "| services | direct | iptables | nftables | lb |\n|---|---|---|---|---|"
    );
    for &scale in &config.scales {
        let row: Vec<String> = Mode::ALL
            .iter()
            .map(|m| cell(stats(&find(results, scale, *m).gbit_s), 2))
            .collect();
        let _ = writeln!(r, "| {scale} | {} |", row.join(" | "));
    }
    let _ = writeln!(
        r,
        "\n## NodePort: external client → node-a → pod on node-b\n"
    );
    let _ = writeln!(r, "Two nodes on one kernel (`lb_tests::cluster`): the client on the LAN opens short connections to node-a's \
        node port; the only endpoint runs on node-b, so every connection is DNATed and SNATed at node-a (lb: in the uplink's tc \
        ingress; iptables/nftables: kube-proxy's NodePort rules with masquerade). `direct` connects to the pod through node-b \
        (one hop fewer, no NAT). N services × 10 endpoints, the last 2 000 (or all) NodePort in the default range \
        30000-32767, the target last; lb SNATs from its default ports 1024-29999.\n");
    let _ = writeln!(r, "| services | direct | iptables | nftables | lb | lb / direct | lb / iptables | lb / nftables | p50 / p99 ms: direct, iptables, nftables, lb |");
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|");
    for (scale, modes) in node_ports {
        let get = |m: Mode| &modes.iter().find(|(x, _)| *x == m).expect("mode").1;
        let med = |m| stats(&get(m).conns_per_s);
        let (d, i, n, l) = (
            med(Mode::Direct),
            med(Mode::Iptables),
            med(Mode::Nftables),
            med(Mode::Lb),
        );
        let latency: Vec<String> = Mode::ALL
            .iter()
            .map(|m| {
                format!(
                    "{:.3} / {:.3}",
                    stats(&get(*m).p50_ms).0,
                    stats(&get(*m).p99_ms).0
                )
            })
            .collect();
        let _ = writeln!(
            r,
            "| {scale} | {} | {} |",
            conns_cells(d, i, n, l),
            latency.join(", ")
        );
    }
    let _ = writeln!(r, "\n## Time to program N services (s)\n");
    let _ = writeln!(r, "| services | iptables-restore | nft -f | lb agent: start → programmed | lb: parse + compute | lb: map writes |\n|---|---|---|---|---|---|");
    for (scale, (compute, writes)) in map_writes {
        let p = |m| cell(stats(&find(results, *scale, m).program_s), 3);
        let _ = writeln!(
            r,
            "| {scale} | {} | {} | {} | {} | {} |",
            p(Mode::Iptables),
            p(Mode::Nftables),
            p(Mode::Lb),
            cell(stats(compute), 3),
            cell(stats(writes), 3)
        );
    }
    let _ = writeln!(r, "\n\"start → programmed\" includes loading and verifying the BPF program, reading the manifest and the poll interval; \
        \"map writes\" is the reconciler's ordered writes alone, on private maps.\n");
    let _ = writeln!(r, "## BPF program cost per packet (ns)\n");
    let _ = writeln!(r, "| path | ns/packet |\n|---|---|");
    for (name, v) in per_packet {
        let _ = writeln!(r, "| {name} | {} |", cell(stats(v), 0));
    }
    let _ = writeln!(r, "\nThe kernel's own timing of single BPF_PROG_TEST_RUN runs (fresh packet each), median of 20 000 per batch; \
        it includes the timer's own overhead of a few tens of ns.\n");
    let _ = writeln!(r, "## Agent resources after programming\n");
    let _ = writeln!(
        r,
        "| services | RSS (MiB) | CPU time since start (s) |\n|---|---|---|"
    );
    for &scale in &config.scales {
        let s = find(results, scale, Mode::Lb);
        let _ = writeln!(
            r,
            "| {scale} | {} | {} |",
            cell(stats(&s.rss_mib), 1),
            cell(stats(&s.cpu_s), 2)
        );
    }
    let errors: u64 = results.iter().map(|(_, _, s)| s.errors).sum::<u64>()
        + node_ports
            .iter()
            .flat_map(|(_, m)| m.iter().map(|(_, s)| s.errors))
            .sum::<u64>();
    let _ = writeln!(
        r,
        "\nFailed requests during the connection runs, all modes: {errors}."
    );
    r
}

/// Grouped bars: connections/s per scale and mode, with min–max whiskers.
pub fn svg(config: &BenchConfig, results: &[(usize, Mode, Sample)]) -> String {
    let colors = ["#888888", "#d95f02", "#7570b3", "#1b9e77"];
    let max = results
        .iter()
        .map(|(_, _, s)| stats(&s.conns_per_s).2)
        .fold(1.0, f64::max)
        * 1.1;
    let (w, h, left, bottom, top) = (640.0, 360.0, 70.0, 50.0, 40.0);
    let group = (w - left - 20.0) / config.scales.len() as f64;
    let bar = group / 5.0;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / max);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(s, "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">New TCP connections per second (median, min–max)</text>", w / 2.0);
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>", w - 20.0, left - 6.0, y(v) + 4.0, y = y(v));
    }
    for (g, &scale) in config.scales.iter().enumerate() {
        let x0 = left + g as f64 * group + bar / 2.0;
        for (m, mode) in Mode::ALL.iter().enumerate() {
            let f = stats(&find(results, scale, *mode).conns_per_s);
            let x = x0 + m as f64 * bar;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                y(f.0),
                bar * 0.9,
                y(0.0) - y(f.0),
                colors[m]
            );
            let cx = x + bar * 0.45;
            let _ = writeln!(
                s,
                "<line x1=\"{cx:.1}\" x2=\"{cx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y(f.1),
                y(f.2)
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{scale} services</text>",
            x0 + bar * 2.0,
            h - bottom + 18.0
        );
    }
    for (m, mode) in Mode::ALL.iter().enumerate() {
        let x = left + m as f64 * 110.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>", h - 20.0, colors[m], x + 16.0, h - 10.0, mode.name());
    }
    s.push_str("</svg>\n");
    s
}
