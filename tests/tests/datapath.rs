//! Datapath tests: crafted packets through the real tc program with
//! BPF_PROG_TEST_RUN; exact output bytes, checksums, counters, conntrack.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::datapath::loader::FamilyCidrs;
use lb_common::{
    ct::{
        CtKey, CtTimeouts, CtValue, CT_ASSURED, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FIN_FORWARD,
        CT_FIN_REPLY, CT_MAP, CT_NEW_MAP, CT_RST, CT_SEEN_REPLY,
    },
    hash::{flow_hash, select_slot},
    stats::Stat,
};
use lb_tests::{
    datapath::Harness,
    packet::{assert_frame, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    require_root,
    topology::web_manifest,
};

/// TCX_NEXT (TC_ACT_UNSPEC, -1): continue with the next program or filter.
const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

use lb_tests::topology::{CLIENT_IP as CLIENT, VIP};
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 10, 2),
    Ipv4Addr::new(198, 18, 11, 2),
    Ipv4Addr::new(198, 18, 12, 2),
];

/// The `web` service (TCP 80 → 8080, UDP 53 → 5353) with every backend ready.
fn manifest(backends: &[Ipv4Addr]) -> String {
    let ready: Vec<(Ipv4Addr, bool)> = backends.iter().map(|b| (*b, true)).collect();
    web_manifest(&ready)
}

fn vip(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP, port)
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

/// The backend the kernel must pick for a new flow (sorted backend order = slot order).
fn expected_backend(
    backends: &[Ipv4Addr],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
) -> Ipv4Addr {
    let hash = flow_hash(
        u32::from(*src.ip()).to_be(),
        u32::from(*dst.ip()).to_be(),
        src.port().to_be(),
        dst.port().to_be(),
        proto,
    );
    let mut sorted = backends.to_vec();
    sorted.sort();
    sorted[usize::from(select_slot(hash, sorted.len() as u16)) - 1]
}

/// A client port whose flow hashes to `backend`.
fn port_for(backend: Ipv4Addr, backends: &[Ipv4Addr], dst: SocketAddrV4, proto: u8) -> u16 {
    (40000..41000)
        .find(|p| expected_backend(backends, client(*p), dst, proto) == backend)
        .expect("a port for every backend")
}

/// A connection through the VIP from `from` to `backend`: handshake, then
/// FINs both ways.
fn close_with_fins(h: &Harness, from: SocketAddrV4, backend: SocketAddrV4) {
    h.run(&Packet::tcp(from, vip(80), TCP_SYN).build());
    let at_backend = Packet::tcp(from, backend, TCP_SYN);
    h.run_egress(&at_backend.reply(TCP_SYN | TCP_ACK).build());
    h.run(&Packet::tcp(from, vip(80), TCP_ACK | TCP_FIN).build());
    h.run_egress(&at_backend.reply(TCP_ACK | TCP_FIN).build());
}

#[test]
fn tcp_syn_is_dnated_to_each_backend_with_exact_bytes() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    for backend in BACKENDS {
        let port = port_for(backend, &BACKENDS, vip(80), 6);
        let syn = Packet::tcp(client(port), vip(80), TCP_SYN).with_payload(b"hello");
        let out = h.run(&syn.build());
        assert_eq!(out.verdict, TCX_NEXT);
        let expected = syn.clone().to(SocketAddrV4::new(backend, 8080)).build();
        assert_frame(&out.frame, &expected, &format!("SYN to {backend}"));
    }
    assert_eq!(h.counter(Stat::DnatNew), 3);
}

#[test]
fn reply_from_backend_is_reverse_nated_to_the_vip() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let syn = Packet::tcp(client(41234), vip(80), TCP_SYN);
    let dnated = h.run(&syn.build());
    let backend = expected_backend(&BACKENDS, client(41234), vip(80), 6);

    // The backend answers the translated packet.
    let from_backend = syn
        .clone()
        .to(SocketAddrV4::new(backend, 8080))
        .reply(TCP_SYN | TCP_ACK)
        .with_payload(b"world");
    let out = h.run_egress(&from_backend.build());
    assert_eq!(out.verdict, TCX_NEXT);
    let expected = from_backend.clone().from(vip(80)).build();
    assert_frame(&out.frame, &expected, "SYN-ACK back to the client");
    assert_eq!(h.counter(Stat::RevNat), 1);
    assert_ne!(dnated.frame, syn.build());

    // Both conntrack entries exist with the right rewrite addresses.
    let ct = h.conntrack();
    let forward = ct
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .expect("forward entry")
        .1;
    let reply = ct
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_REPLY)
        .expect("reply entry")
        .1;
    assert_eq!(forward.dst_addr, backend.octets());
    assert_eq!(forward.dst_port, 8080);
    assert_eq!(
        (Ipv4Addr::from(forward.src_addr), forward.src_port),
        (CLIENT, 41234),
        "not SNATed"
    );
    assert_eq!(reply.src_addr, VIP.octets());
    assert_eq!(reply.src_port, 80);
    assert_eq!(reply.dst_addr, CLIENT.octets());
}

#[test]
fn udp_is_dnated_and_reverse_nated_with_checksums() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let query = Packet::udp(client(5000), vip(53), b"query payload, odd length");
    let backend = expected_backend(&BACKENDS, client(5000), vip(53), 17);
    let out = h.run(&query.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(
        &out.frame,
        &query.clone().to(SocketAddrV4::new(backend, 5353)).build(),
        "UDP query",
    );

    let answer = query
        .clone()
        .to(SocketAddrV4::new(backend, 5353))
        .reply(0)
        .with_payload(b"answer");
    let out = h.run_egress(&answer.build());
    assert_frame(
        &out.frame,
        &answer.clone().from(vip(53)).build(),
        "UDP answer",
    );
}

#[test]
fn udp_zero_checksum_stays_zero() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let mut query = Packet::udp(client(5001), vip(53), b"no checksum");
    query.udp_no_checksum = true;
    let backend = expected_backend(&BACKENDS, client(5001), vip(53), 17);
    let out = h.run(&query.build());
    let expected = query.clone().to(SocketAddrV4::new(backend, 5353)).build();
    assert_frame(&out.frame, &expected, "UDP without checksum");
    assert_eq!(&out.frame[40..42], &[0, 0], "UDP checksum must stay zero");
}

#[test]
fn ip_options_are_skipped_when_rewriting() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let mut syn = Packet::tcp(client(42000), vip(80), TCP_SYN);
    syn.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let backend = expected_backend(&BACKENDS, client(42000), vip(80), 6);
    let out = h.run(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(
        &out.frame,
        &syn.clone().to(SocketAddrV4::new(backend, 8080)).build(),
        "SYN with IP options",
    );
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let other_ip = Packet::tcp(
        client(40000),
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 1), 80),
        TCP_SYN,
    )
    .build();
    let other_port = Packet::tcp(client(40000), vip(81), TCP_SYN).build();
    let wrong_proto = Packet::udp(client(40000), vip(80), b"udp to a tcp port").build();
    let mut icmp = Packet::udp(client(40000), vip(80), b"icmp echo").build();
    icmp[23] = 1; // protocol ICMP (checksum no longer matters: must pass as is)
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let v6 = |a: &str, port| std::net::SocketAddrV6::new(a.parse().unwrap(), port, 0, 0);
    let ipv6 =
        lb_tests::packet::Packet6::tcp(v6("2001:db8::2", 40000), v6("2001:db8::10", 80), TCP_SYN)
            .build();
    for (name, frame) in [
        ("other IP", &other_ip),
        ("other port", &other_port),
        ("UDP to TCP port", &wrong_proto),
        ("ICMP", &icmp),
        ("ARP", &arp),
        ("IPv6", &ipv6),
    ] {
        let out = h.run(frame);
        assert_eq!(out.verdict, TCX_NEXT, "{name}");
        assert_eq!(&out.frame, frame, "{name} must pass untouched");
    }
    assert_eq!(h.counter(Stat::PassNotService), 6);
    assert_eq!(h.counter(Stat::DnatNew), 0);
    assert!(h.conntrack().is_empty());
}

#[test]
fn truncated_and_malformed_packets_are_never_rewritten() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let good = Packet::tcp(client(40001), vip(80), TCP_SYN)
        .with_payload(b"data")
        .build();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("cut inside the TCP header", good[..14 + 20 + 10].to_vec()));
    // (BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than 20 bytes of IP.)
    let mut long_ihl = good[..14 + 24].to_vec();
    long_ihl[14] = 0x4f; // IHL 15: 60 bytes of header claimed, 24 present
    long_ihl[16..18].copy_from_slice(&24u16.to_be_bytes());
    cases.push(("IP options cut by the end of the frame", long_ihl));
    let mut short_tot = good.clone();
    short_tot[16..18].copy_from_slice(&30u16.to_be_bytes()); // IP says 30 bytes: no room for TCP
    cases.push(("total length shorter than the TCP header", short_tot));
    let mut long_tot = good.clone();
    long_tot[16..18].copy_from_slice(&1400u16.to_be_bytes());
    cases.push(("total length past the end of the frame", long_tot));
    let mut small_ihl = good.clone();
    small_ihl[14] = 0x44;
    cases.push(("IHL below 5", small_ihl));
    let mut v6_in_v4 = good.clone();
    v6_in_v4[14] = 0x65;
    cases.push(("version 6 under ethertype IPv4", v6_in_v4));
    let mut bad_doff = good.clone();
    bad_doff[14 + 20 + 12] = 0x40; // data offset 4 words
    cases.push(("TCP data offset below 5", bad_doff));
    let mut short_udp = Packet::udp(client(40001), vip(53), b"x").build();
    short_udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push(("UDP length below 8", short_udp));
    for (name, frame) in &cases {
        let out = h.run(frame);
        assert_eq!(out.verdict, TCX_NEXT, "{name}");
        assert_eq!(&out.frame, frame, "{name}: must not be rewritten");
    }
    assert_eq!(h.counter(Stat::PassMalformed), cases.len() as u64);
    assert!(h.conntrack().is_empty(), "no state for malformed packets");
}

/// A UDP datagram fragmented by its sender (a large DNS query without
/// EDNS limits, Kerberos, RADIUS) and its fragmented answer: the first
/// fragment is translated by its flow, the later ones (no ports) follow
/// it, the same addresses, IP header only. Compared byte for byte with the
/// translated datagram fragmented the same way, so the first fragment's
/// UDP checksum is checked against one computed from scratch over the
/// whole datagram.
#[test]
fn a_fragmented_udp_datagram_and_its_fragmented_answer_are_translated_with_exact_bytes() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut query = Packet::udp(client(40002), vip(53), &payload);
    query.frag = 0; // DF clear: the sender fragments
    let backend = SocketAddrV4::new(
        expected_backend(&BACKENDS, client(40002), vip(53), 17),
        5353,
    );
    let expected = query.clone().to(backend).fragments(1480);
    let fragments = query.fragments(1480);
    assert_eq!(fragments.len(), 3);
    for (i, (fragment, expected)) in fragments.iter().zip(&expected).enumerate() {
        let out = h.run(fragment);
        assert_eq!(out.verdict, TCX_NEXT, "fragment {i}");
        assert_frame(&out.frame, expected, &format!("query fragment {i}"));
    }
    assert_eq!(
        (h.counter(Stat::DnatNew), h.counter(Stat::FragTranslated)),
        (1, 2)
    );

    let mut answer = query
        .clone()
        .to(backend)
        .reply(0)
        .with_payload(&payload[..2000]);
    answer.id = 0x4321;
    let expected = answer.clone().from(vip(53)).fragments(1480);
    for (i, (fragment, expected)) in answer.fragments(1480).iter().zip(&expected).enumerate() {
        let out = h.run_egress(fragment);
        assert_eq!(out.verdict, TCX_NEXT, "answer fragment {i}");
        assert_frame(&out.frame, expected, &format!("answer fragment {i}"));
    }
    assert_eq!(
        (h.counter(Stat::RevNat), h.counter(Stat::FragTranslated)),
        (1, 3)
    );
    // Recorded at egress: the answer's later fragment is left alone at an
    // ingress it passes first.
    let later = &answer.fragments(1480)[1];
    assert_eq!(&h.run(later).frame, later);

    // A later fragment of a datagram never seen (or ahead of its first
    // fragment), and fragments not for a service, pass untouched.
    let mut unseen = query.clone();
    unseen.id = 0x7777;
    let later = &unseen.fragments(1480)[1];
    let out = h.run(later);
    assert_eq!((out.verdict, &out.frame), (TCX_NEXT, later));
    let elsewhere = query
        .clone()
        .to(SocketAddrV4::new(Ipv4Addr::new(198, 18, 99, 1), 53));
    for fragment in elsewhere.fragments(1480) {
        let out = h.run(&fragment);
        assert_eq!((out.verdict, &out.frame), (TCX_NEXT, &fragment));
    }
    assert_eq!(h.counter(Stat::PassFragmentUntracked), 4);
    assert_eq!(h.counter(Stat::DropFragment), 0);
}

#[test]
fn conntrack_keeps_backend_after_backend_set_changes() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let chosen = BACKENDS[1];
    let port = port_for(chosen, &BACKENDS, vip(80), 6);
    let syn = Packet::tcp(client(port), vip(80), TCP_SYN);
    assert_frame(
        &h.run(&syn.build()).frame,
        &syn.clone().to(SocketAddrV4::new(chosen, 8080)).build(),
        "SYN",
    );

    // The chosen backend leaves the service.
    let remaining = [BACKENDS[0], BACKENDS[2]];
    h.apply_yaml(&manifest(&remaining));

    let ack = Packet::tcp(client(port), vip(80), TCP_ACK).with_payload(b"GET /");
    let out = h.run(&ack.build());
    assert_frame(
        &out.frame,
        &ack.clone().to(SocketAddrV4::new(chosen, 8080)).build(),
        "established flow keeps its backend",
    );
    assert_eq!(h.counter(Stat::DnatCtHit), 1);
    let reply = ack
        .clone()
        .to(SocketAddrV4::new(chosen, 8080))
        .reply(TCP_ACK);
    assert_frame(
        &h.run_egress(&reply.build()).frame,
        &reply.clone().from(vip(80)).build(),
        "its replies are still reverse-NATed",
    );

    // New flows only go to current backends.
    for p in 43000..43100 {
        let out = h.run(&Packet::tcp(client(p), vip(80), TCP_SYN).build());
        let dst = Ipv4Addr::new(out.frame[30], out.frame[31], out.frame[32], out.frame[33]);
        assert!(
            remaining.contains(&dst),
            "new flow from port {p} went to {dst}"
        );
    }
}

/// The ICMP port unreachable `from` answers `packet` (built as `input`)
/// with, byte for byte: back to the sender, the original IP header and 8
/// bytes quoted.
fn port_unreachable(packet: &Packet, input: &[u8], from: Ipv4Addr) -> Vec<u8> {
    let mut expected = Vec::new();
    expected.extend_from_slice(&packet.src_mac); // back to the client
    expected.extend_from_slice(&packet.dst_mac);
    expected.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&CLIENT.octets());
    let c = lb_tests::packet::checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    expected.extend_from_slice(&ip);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&input[14..14 + 28]); // original IP header + 8 bytes
    let c = lb_tests::packet::checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    expected.extend_from_slice(&icmp);
    expected
}

/// nftables kube-proxy rejects a packet to an address of the service CIDR
/// that no Service holds, where it would otherwise follow the default
/// route: an unallocated cluster IP, and an allocated one on a port its
/// Service does not have, get ICMP port unreachable from that address;
/// outside the CIDRs, and without them, packets pass as before.
#[test]
fn an_address_in_the_service_cidr_no_frontend_holds_is_rejected() {
    require_root();
    let cidrs = FamilyCidrs::new(&["198.19.0.0/24".parse().unwrap()]).unwrap();
    let mut h = Harness::with_globals(&lb_agent::datapath::loader::Globals {
        service_cidrs: cidrs,
        ..lb_agent::datapath::loader::Globals::DEFAULT
    });
    h.apply_yaml(&manifest(&[BACKENDS[0]]));
    let unallocated = Ipv4Addr::new(198, 19, 0, 99);
    for (to, port) in [(unallocated, 80), (VIP, 8443)] {
        let syn = Packet::tcp(client(40010), SocketAddrV4::new(to, port), TCP_SYN);
        let input = syn.build();
        let out = h.run(&input);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{to}:{port} answered");
        assert_frame(
            &out.frame,
            &port_unreachable(&syn, &input, to),
            "ICMP port unreachable",
        );
    }
    assert_eq!(h.counter(Stat::RejectServiceCidr), 2);
    let elsewhere = Packet::tcp(client(40011), "198.19.5.5:80".parse().unwrap(), TCP_SYN).build();
    assert_eq!(h.run(&elsewhere).verdict, TCX_NEXT, "outside the CIDR");
    let served = h.run(&Packet::tcp(client(40012), vip(80), TCP_SYN).build());
    assert_eq!(
        served.verdict, TCX_NEXT,
        "a frontend's packet is translated and passed on"
    );
    assert_eq!(h.counter(Stat::DnatNew), 1);

    let mut without = Harness::new();
    without.apply_yaml(&manifest(&[BACKENDS[0]]));
    let stray = Packet::tcp(client(40013), SocketAddrV4::new(unallocated, 80), TCP_SYN).build();
    assert_eq!(
        without.run(&stray).verdict,
        TCX_NEXT,
        "no CIDRs given: passed"
    );
}

#[test]
fn service_without_backends_answers_icmp_port_unreachable() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&[]));
    let syn =
        Packet::tcp(client(40003), vip(80), TCP_SYN).with_payload(b"payload beyond the quote");
    let input = syn.build();
    let out = h.run(&input);
    assert_eq!(
        out.verdict, TC_ACT_REDIRECT,
        "sent back out the ingress interface"
    );
    assert_eq!(h.counter(Stat::RejectNoBackend), 1);

    let expected = port_unreachable(&syn, &input, VIP);
    assert_frame(&out.frame, &expected, "ICMP port unreachable");
    assert!(h.conntrack().is_empty(), "a rejected flow leaves no state");

    let query = Packet::udp(client(40004), vip(53), b"q");
    assert_eq!(
        h.run(&query.build()).verdict,
        TC_ACT_REDIRECT,
        "UDP is rejected too"
    );
}

/// A spoofed flood at a frontend without endpoints must not be reflected
/// at line rate: past the bucket (here 3 at once, 1 a second), a packet is
/// dropped unanswered and counted; flows to endpoints are not limited.
#[test]
fn icmp_errors_past_the_rate_limit_are_dropped_unanswered() {
    require_root();
    lb_tests::pin_to_cpu0(); // one CPU's bucket
    let mut h = Harness::with_icmp_limit(lb_common::icmp::IcmpLimit {
        per_sec: 1,
        burst: 3,
    });
    h.apply_yaml(&manifest(&[]));
    let verdicts: Vec<u32> = (0..20)
        .map(|i| {
            let query = if i % 2 == 0 {
                Packet::udp(client(41000 + i), vip(53), b"q")
            } else {
                Packet::tcp(client(41000 + i), vip(80), TCP_SYN)
            };
            h.run(&query.build()).verdict
        })
        .collect();
    let answered = verdicts.iter().filter(|v| **v == TC_ACT_REDIRECT).count() as u64;
    // 3 at once, and one more only if a second passed during the 20 runs.
    assert!((3..=4).contains(&answered), "{verdicts:?}");
    assert!(
        verdicts[..3].iter().all(|v| *v == TC_ACT_REDIRECT),
        "the burst first: {verdicts:?}"
    );
    assert!(
        verdicts
            .iter()
            .all(|v| *v == TC_ACT_REDIRECT || *v == TC_ACT_SHOT),
        "{verdicts:?}"
    );
    assert_eq!(h.counter(Stat::RejectNoBackend), answered);
    assert_eq!(h.counter(Stat::DropIcmpRateLimited), 20 - answered);
    assert!(h.conntrack().is_empty(), "no state for any of them");

    // With endpoints, the same traffic is translated, however empty the bucket.
    h.apply_yaml(&manifest(&BACKENDS));
    let syn = Packet::tcp(client(41100), vip(80), TCP_SYN);
    let out = h.run(&syn.build());
    let backend = expected_backend(&BACKENDS, client(41100), vip(80), 6);
    assert_frame(
        &out.frame,
        &syn.clone().to(SocketAddrV4::new(backend, 8080)).build(),
        "translated",
    );
}

/// A backend pod that dies without a FIN or RST reaching the client leaves
/// its flow's entries established: the flow's other packets keep their
/// backend, but a new SYN on the tuple picks a current one, instead of
/// being sent (with its retransmits keeping the entries alive) to the
/// address of a pod that is gone.
#[test]
fn a_syn_on_an_established_flow_whose_backend_left_picks_a_current_backend() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let chosen = BACKENDS[2];
    let port = port_for(chosen, &BACKENDS, vip(80), 6);
    let (backend, at_backend) = establish(&h, client(port));
    assert_eq!(*backend.ip(), chosen);
    h.run(&Packet::tcp(client(port), vip(80), TCP_ACK).build());
    h.run_egress(&at_backend.reply(TCP_ACK).with_payload(b"ok").build());
    let remaining = [BACKENDS[0], BACKENDS[1]];
    h.apply_yaml(&manifest(&remaining));

    // The established flow's packets still go where they went.
    let ack = Packet::tcp(client(port), vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "an established flow keeps its backend",
    );
    // A SYN on the tuple is a new connection: a current backend.
    let syn = Packet::tcp(client(port), vip(80), TCP_SYN);
    let expected = expected_backend(&remaining, client(port), vip(80), 6);
    assert_frame(
        &h.run(&syn.build()).frame,
        &syn.clone().to(SocketAddrV4::new(expected, 8080)).build(),
        "the SYN after the backend left",
    );
    assert_eq!(h.counter(Stat::DnatNew), 2, "a new flow");
    let reply = syn
        .clone()
        .to(SocketAddrV4::new(expected, 8080))
        .reply(TCP_SYN | TCP_ACK);
    assert_frame(
        &h.run_egress(&reply.build()).frame,
        &reply.clone().from(vip(80)).build(),
        "its answer is reverse-NATed from the VIP",
    );

    // While its backend is still there, a SYN on an established tuple
    // keeps it (a retransmitted SYN of a slow handshake, say).
    let port = port_for(BACKENDS[0], &remaining, vip(80), 6);
    h.run(&Packet::tcp(client(port), vip(80), TCP_SYN).build());
    let syn = Packet::tcp(client(port), vip(80), TCP_SYN);
    assert_frame(
        &h.run(&syn.build()).frame,
        &syn.clone().to(SocketAddrV4::new(BACKENDS[0], 8080)).build(),
        "a retransmitted SYN",
    );
    assert_eq!(h.counter(Stat::DnatNew), 3);
}

#[test]
fn syn_reusing_a_closed_flows_tuple_picks_a_current_backend() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let chosen = BACKENDS[2];
    let port = port_for(chosen, &BACKENDS, vip(80), 6);
    close_with_fins(&h, client(port), SocketAddrV4::new(chosen, 8080));
    let remaining = [BACKENDS[0], BACKENDS[1]];
    h.apply_yaml(&manifest(&remaining));

    let syn = Packet::tcp(client(port), vip(80), TCP_SYN);
    let out = h.run(&syn.build());
    let expected = expected_backend(&remaining, client(port), vip(80), 6);
    assert_frame(
        &out.frame,
        &syn.clone().to(SocketAddrV4::new(expected, 8080)).build(),
        "reopened flow",
    );
    assert_eq!(h.counter(Stat::DnatNew), 2);
}

#[test]
fn direct_connection_reusing_a_service_flows_port_is_not_reverse_nated() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let chosen = BACKENDS[0];
    let port = port_for(chosen, &BACKENDS, vip(80), 6);
    let backend = SocketAddrV4::new(chosen, 8080);
    // A connection through the VIP, closed.
    close_with_fins(&h, client(port), backend);
    let rev_nat_before = h.counter(Stat::RevNat);
    // The client then connects to the pod directly from the same port.
    let direct = Packet::tcp(client(port), backend, TCP_SYN);
    let out = h.run(&direct.build());
    assert_eq!(out.frame, direct.build(), "a direct SYN passes untouched");
    let syn_ack = direct.reply(TCP_SYN | TCP_ACK);
    let out = h.run_egress(&syn_ack.build());
    assert_eq!(
        out.frame,
        syn_ack.build(),
        "the pod's answer keeps its own source, not the VIP"
    );
    assert_eq!(h.counter(Stat::RevNat), rev_nat_before);
}

// --- conntrack lifecycle -----------------------------------------------------

/// The flow's (forward, reply) entries.
fn flow_entries(h: &Harness, from: SocketAddrV4) -> ((CtKey, CtValue), (CtKey, CtValue)) {
    let ct = h.conntrack();
    let forward = *ct
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD && k.sport == from.port())
        .expect("forward entry");
    let reply = *ct
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_REPLY && k.dport == from.port())
        .expect("reply entry");
    (forward, reply)
}

/// A UDP query from `from` to the VIP's port 53 and its backend's answer,
/// both run: the query, the answer as the backend sent it, and the backend.
fn answered_query(h: &Harness, from: SocketAddrV4) -> (Packet, Packet, SocketAddrV4) {
    let query = Packet::udp(from, vip(53), b"query");
    h.run(&query.build());
    let ((_, forward), _) = flow_entries(h, from);
    let backend = SocketAddrV4::new(Ipv4Addr::from(forward.dst_addr), forward.dst_port);
    let answer = query.clone().to(backend).reply(0).with_payload(b"answer");
    h.run_egress(&answer.build());
    (query, answer, backend)
}

/// A handshake through the VIP from `from`: the SYN (ingress) and the
/// backend's SYN-ACK (egress). Returns the backend and the packet as it
/// reaches the backend (whose `reply` is the backend's side).
fn establish(h: &Harness, from: SocketAddrV4) -> (SocketAddrV4, Packet) {
    let backend = SocketAddrV4::new(expected_backend(&BACKENDS, from, vip(80), 6), 8080);
    h.run(&Packet::tcp(from, vip(80), TCP_SYN).build());
    let at_backend = Packet::tcp(from, backend, TCP_SYN);
    h.run_egress(&at_backend.reply(TCP_SYN | TCP_ACK).build());
    (backend, at_backend)
}

fn now_ns() -> u64 {
    lb_agent::datapath::conntrack::monotonic_ns()
}

/// Which table holds `key`'s entry: "assured", "new", or "none".
fn table_of(h: &Harness, key: &CtKey) -> &'static str {
    let holds = |name| h.conntrack_table(name).iter().any(|(k, _)| k == key);
    match (holds(CT_MAP), holds(CT_NEW_MAP)) {
        (true, false) => "assured",
        (false, true) => "new",
        (false, false) => "none",
        (true, true) => "both",
    }
}

/// A client's whole handshake through the VIP, then the backend's first
/// data: the flow is assured. Returns the backend.
fn assured_flow(h: &Harness, from: SocketAddrV4) -> SocketAddrV4 {
    let (backend, at_backend) = establish(h, from);
    h.run(&Packet::tcp(from, vip(80), TCP_ACK).build());
    h.run_egress(&at_backend.reply(TCP_ACK).with_payload(b"hello").build());
    backend
}

#[test]
fn a_flow_stays_unassured_until_the_backend_confirms_the_handshake() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let from = client(44000);
    let backend = SocketAddrV4::new(expected_backend(&BACKENDS, from, vip(80), 6), 8080);
    let t = CtTimeouts::DEFAULT;
    let at_backend = Packet::tcp(from, backend, TCP_SYN);
    let syn = Packet::tcp(from, vip(80), TCP_SYN);
    let syn_ack = at_backend.reply(TCP_SYN | TCP_ACK);
    let steps = [
        ("SYN", syn.build(), true, 0),
        ("SYN-ACK", syn_ack.build(), false, CT_SEEN_REPLY),
        // A spoofed client can send this ACK blind: it assures nothing.
        (
            "client ACK",
            Packet::tcp(from, vip(80), TCP_ACK).build(),
            true,
            CT_SEEN_REPLY,
        ),
        // The SYN-ACK again (a retransmit): still nothing.
        ("SYN-ACK again", syn_ack.build(), false, CT_SEEN_REPLY),
    ];
    for (what, frame, ingress, flags) in steps {
        let out = if ingress {
            h.run(&frame)
        } else {
            h.run_egress(&frame)
        };
        assert_eq!(out.verdict, TCX_NEXT, "{what}: translated and passed on");
        let ((fk, fwd), (rk, rep)) = flow_entries(&h, from);
        assert_eq!((fwd.flags, rep.flags), (flags, flags), "after the {what}");
        assert_eq!(
            (table_of(&h, &fk), table_of(&h, &rk)),
            ("new", "new"),
            "after the {what}"
        );
        assert!(
            fwd.expires_ns <= now_ns() + t.tcp_opening_ns
                && rep.expires_ns <= now_ns() + t.tcp_opening_ns,
            "after the {what}: the opening timeout, not the established one"
        );
        assert!(fwd.same_flow(&rep) && fwd.created_ns == rep.created_ns);
    }
    assert_eq!(h.counter(Stat::CtAssured), 0);

    // The backend's first data: it accepted the handshake's last ACK.
    let before = now_ns();
    h.run_egress(&at_backend.reply(TCP_ACK).with_payload(b"220 ready").build());
    let ((fk, fwd), (rk, rep)) = flow_entries(&h, from);
    assert_eq!(
        (table_of(&h, &fk), table_of(&h, &rk)),
        ("assured", "assured"),
        "both entries moved"
    );
    assert_eq!(
        (fwd.flags, rep.flags),
        (CT_SEEN_REPLY | CT_ASSURED, CT_SEEN_REPLY | CT_ASSURED)
    );
    for (what, e) in [("forward", fwd), ("reply", rep)] {
        assert!(
            e.expires_ns >= before + t.tcp_established_ns
                && e.expires_ns <= now_ns() + t.tcp_established_ns,
            "{what}: established timeout once assured"
        );
    }
    assert_eq!(h.counter(Stat::CtAssured), 1);
    assert!(
        h.conntrack_table(CT_NEW_MAP).is_empty(),
        "nothing left behind"
    );
    // Both directions keep translating from the assured table.
    let ack = Packet::tcp(from, vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "request",
    );
    let reply = at_backend.reply(TCP_ACK);
    assert_frame(
        &h.run_egress(&reply.build()).frame,
        &reply.clone().from(vip(80)).build(),
        "reply",
    );
}

#[test]
fn an_answered_udp_flow_is_assured_once_still_in_use_two_seconds_on() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let from = client(45000);
    let (query, _, backend) = answered_query(&h, from);
    let ((fk, _), (rk, _)) = flow_entries(&h, from);
    // Answered, but a one-shot query and its answer stay cheap (DNS).
    h.run(&query.build());
    assert_eq!((table_of(&h, &fk), table_of(&h, &rk)), ("new", "new"));
    assert_eq!(flow_entries(&h, from).0 .1.flags, CT_SEEN_REPLY);
    // Age the flow by 3 s: the next datagram assures it.
    for (key, value) in [flow_entries(&h, from).0, flow_entries(&h, from).1] {
        let created_ns = value.created_ns - 3_000_000_000;
        h.set_conntrack(
            &key,
            Some(CtValue {
                created_ns,
                ..value
            }),
        );
    }
    assert_frame(
        &h.run(&query.build()).frame,
        &query.clone().to(backend).build(),
        "query",
    );
    assert_eq!(
        (table_of(&h, &fk), table_of(&h, &rk)),
        ("assured", "assured")
    );
    assert_eq!(h.counter(Stat::CtAssured), 1);
}

#[test]
fn syn_whose_flow_timed_out_unanswered_is_a_new_flow() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let chosen = BACKENDS[1];
    let port = port_for(chosen, &BACKENDS, vip(80), 6);
    h.run(&Packet::tcp(client(port), vip(80), TCP_SYN).build());
    // The opening timeout passes for both entries.
    let ((fk, fv), (rk, rv)) = flow_entries(&h, client(port));
    let past = now_ns() - 1;
    h.expire_at(&(fk, fv), past);
    h.expire_at(&(rk, rv), past);
    let remaining = [BACKENDS[0], BACKENDS[2]];
    h.apply_yaml(&manifest(&remaining));
    let syn = Packet::tcp(client(port), vip(80), TCP_SYN);
    let expected = expected_backend(&remaining, client(port), vip(80), 6);
    assert_frame(
        &h.run(&syn.build()).frame,
        &syn.clone().to(SocketAddrV4::new(expected, 8080)).build(),
        "SYN after the timeout",
    );
    assert_eq!(
        (h.counter(Stat::DnatNew), h.counter(Stat::DnatCtHit)),
        (2, 0)
    );
    // A late answer from the old backend belongs to no flow now.
    let late = Packet::tcp(client(port), SocketAddrV4::new(chosen, 8080), TCP_SYN).reply(TCP_ACK);
    assert_eq!(
        h.run_egress(&late.build()).frame,
        late.build(),
        "not reverse-NATed"
    );
}

/// An assured flow both of whose entries timed out is over, though the
/// agent's GC (every 30 s) has not removed it yet: a new datagram on its
/// tuple starts a new flow whose answer is reverse-NATed, and the old
/// entries do not shadow the new ones meanwhile.
#[test]
fn a_datagram_on_the_tuple_of_an_expired_assured_flow_is_a_new_flow_both_ways() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let from = client(45100);
    let (query, answer, backend) = answered_query(&h, from);
    let ((fk, fwd), (rk, rep)) = flow_entries(&h, from);
    // Assured, then idle past its timeout in both directions.
    let past = now_ns() - 1;
    for (key, value) in [(fk, fwd), (rk, rep)] {
        let flags = value.flags | CT_SEEN_REPLY | CT_ASSURED;
        h.set_conntrack(&key, None);
        h.set_conntrack(
            &key,
            Some(CtValue {
                flags,
                expires_ns: past,
                ..value
            }),
        );
    }
    assert_eq!(
        (table_of(&h, &fk), table_of(&h, &rk)),
        ("assured", "assured")
    );

    assert_frame(
        &h.run(&query.build()).frame,
        &query.clone().to(backend).build(),
        "the new query",
    );
    assert_frame(
        &h.run_egress(&answer.build()).frame,
        &answer.clone().from(vip(53)).build(),
        "its answer, from the VIP",
    );
    assert_eq!(
        (h.counter(Stat::DnatNew), h.counter(Stat::DnatCtHit)),
        (2, 0)
    );
    // The next query is a hit on the new flow, not a third new one.
    h.run(&query.build());
    assert_eq!(
        (h.counter(Stat::DnatNew), h.counter(Stat::DnatCtHit)),
        (2, 1)
    );
    let ((_, fwd), (_, rep)) = flow_entries(&h, from);
    assert!(fwd.same_flow(&rep) && !fwd.is_expired(now_ns()));
}

/// Two sends on one socket from two CPUs at once (glibc's parallel A and
/// AAAA queries) make one flow: the CPU that writes the forward entry
/// second adopts the first one's, so both entries carry one identity and
/// both packets leave alike. Some rounds must race for the test to count.
#[test]
fn a_flow_created_on_two_cpus_at_once_is_one_flow() {
    require_root();
    const ROUNDS: u16 = 2000;
    let mut h = Harness::with_conntrack_tables(4096, 4 * u32::from(ROUNDS));
    h.apply_yaml(&manifest(&BACKENDS));
    let query = |round: u32| Packet::udp(client(20000 + round as u16), vip(53), b"query");
    let sent = [(); 2].map(|_| std::sync::Mutex::new(vec![Vec::new(); ROUNDS.into()]));
    lb_tests::on_two_cpus(ROUNDS.into(), |round, cpu| {
        let out = h.run(&query(round).build());
        sent[cpu].lock().unwrap()[round as usize] = out.frame;
    });
    let [on_0, on_1] = sent.map(|s| s.into_inner().unwrap());
    let ct = h.conntrack();
    let entry = |dir, port| {
        let of_port = |k: &CtKey| {
            if dir == CT_DIR_FORWARD {
                k.sport
            } else {
                k.dport
            }
        };
        ct.iter()
            .find(|(k, _)| k.dir == dir && of_port(k) == port)
            .map(|(_, v)| *v)
            .expect("both entries")
    };
    for round in 0..u32::from(ROUNDS) {
        let port = 20000 + round as u16;
        let (forward, reply) = (entry(CT_DIR_FORWARD, port), entry(CT_DIR_REPLY, port));
        assert!(
            forward.same_flow(&reply),
            "round {round}: the forward entry is flow {:#x}, the reply entry {:#x}",
            forward.flow_id,
            reply.flow_id
        );
        let backend = SocketAddrV4::new(Ipv4Addr::from(forward.dst_addr), forward.dst_port);
        let expected = query(round).to(backend).build();
        assert_frame(&on_0[round as usize], &expected, "the query sent on CPU 0");
        assert_frame(&on_1[round as usize], &expected, "the query sent on CPU 1");
    }
    let raced = h.counter(Stat::CtCreateRaced);
    eprintln!("{raced} of {ROUNDS} rounds raced to create their flow");
    assert!(raced > 0, "no round raced: nothing was tested");
    assert_eq!(
        h.conntrack().len(),
        2 * usize::from(ROUNDS),
        "two entries per flow"
    );
}

#[test]
fn an_idle_direction_lives_while_the_other_is_active() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let from = client(44100);
    let (backend, _) = establish(&h, from);
    // The client has been silent past its timeout (a server push stream);
    // the backend's direction is fresh.
    let ((fk, fv), _) = flow_entries(&h, from);
    h.expire_at(&(fk, fv), now_ns() - 1);
    let ack = Packet::tcp(from, vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "the quiet client's packet still belongs to its flow",
    );
    assert_eq!(
        (h.counter(Stat::DnatNew), h.counter(Stat::DnatCtHit)),
        (1, 1)
    );
    let ((_, fv), _) = flow_entries(&h, from);
    assert!(fv.expires_ns > now_ns(), "and its direction is refreshed");
}

#[test]
fn rst_from_either_side_closes_both_entries() {
    require_root();
    for backend_resets in [false, true] {
        let mut h = Harness::new();
        h.apply_yaml(&manifest(&BACKENDS));
        let from = client(44200);
        let (_, at_backend) = establish(&h, from);
        let before = now_ns();
        if backend_resets {
            let rst = at_backend.reply(TCP_RST | TCP_ACK);
            assert_frame(
                &h.run_egress(&rst.build()).frame,
                &rst.clone().from(vip(80)).build(),
                "the RST itself is reverse-NATed",
            );
        } else {
            h.run(&Packet::tcp(from, vip(80), TCP_RST).build());
        }
        let ((_, fwd), (_, rep)) = flow_entries(&h, from);
        let closing = CtTimeouts::DEFAULT.tcp_closing_ns;
        for (what, e) in [("forward", fwd), ("reply", rep)] {
            assert_eq!(
                e.flags,
                CT_SEEN_REPLY | CT_RST,
                "{what} (backend resets: {backend_resets})"
            );
            assert!(
                e.expires_ns >= before + closing && e.expires_ns <= now_ns() + closing,
                "{what}: closing timeout (backend resets: {backend_resets})"
            );
        }
        // The tuple is free for a new connection at once.
        h.run(&Packet::tcp(from, vip(80), TCP_SYN).build());
        assert_eq!(
            h.counter(Stat::DnatNew),
            2,
            "backend resets: {backend_resets}"
        );
    }
}

#[test]
fn fin_from_one_side_half_closes_and_fins_from_both_close() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let from = client(44300);
    let (_, at_backend) = establish(&h, from);
    h.run(&Packet::tcp(from, vip(80), TCP_ACK | TCP_FIN).build());
    let (_, (_, rep)) = flow_entries(&h, from);
    assert_eq!(
        rep.flags,
        CT_SEEN_REPLY | CT_FIN_FORWARD,
        "the reply entry learns the client's FIN"
    );
    let t = CtTimeouts::DEFAULT;
    assert!(
        rep.expires_ns > now_ns() + t.tcp_closing_ns,
        "half-closed: the backend may still send"
    );
    // A SYN retransmission on a half-closed tuple stays on its backend.
    let fin_back = at_backend.reply(TCP_ACK | TCP_FIN);
    h.run_egress(&fin_back.build());
    let ((_, fwd), (_, rep)) = flow_entries(&h, from);
    assert_eq!(fwd.flags, CT_SEEN_REPLY | CT_FIN_FORWARD | CT_FIN_REPLY);
    assert_eq!(rep.flags, fwd.flags);
    assert!(
        fwd.expires_ns <= now_ns() + t.tcp_closing_ns,
        "closed both ways: short timeout"
    );
}

#[test]
fn lost_reply_entry_is_rebuilt_from_the_forward_entry() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let from = client(44400);
    let (backend, _) = establish(&h, from);
    let ((fk, fv), (rk, rv)) = flow_entries(&h, from);
    // The reply entry is lost; the forward entry's refresh is due.
    h.set_conntrack(&rk, None);
    h.expire_at(&(fk, fv), fv.expires_ns - 2_000_000_000);
    let ack = Packet::tcp(from, vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "forward still DNATed",
    );
    assert_eq!(h.counter(Stat::CtRecreated), 1);
    let (_, (rk2, rv2)) = flow_entries(&h, from);
    assert_eq!(rk2, rk);
    assert_eq!(
        (
            rv2.src_addr,
            rv2.src_port,
            rv2.dst_addr,
            rv2.backend_id,
            rv2.rev_nat_id,
            rv2.flags,
            rv2.flow_id,
            rv2.created_ns
        ),
        (
            rv.src_addr,
            rv.src_port,
            rv.dst_addr,
            rv.backend_id,
            rv.rev_nat_id,
            rv.flags,
            rv.flow_id,
            rv.created_ns
        ),
        "rebuilt exactly"
    );
    let reply = Packet::tcp(from, backend, TCP_ACK)
        .reply(TCP_ACK)
        .with_payload(b"data");
    assert_frame(
        &h.run_egress(&reply.build()).frame,
        &reply.clone().from(vip(80)).build(),
        "the backend's replies are reverse-NATed again",
    );
    // And the other way round: a lost forward entry is rebuilt by a reply.
    let ((fk, _), (rk, rv)) = flow_entries(&h, from);
    h.set_conntrack(&fk, None);
    h.expire_at(&(rk, rv), rv.expires_ns - 2_000_000_000);
    h.run_egress(&reply.build());
    assert_eq!(h.counter(Stat::CtRecreated), 2);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "same backend",
    );
    assert_eq!(h.counter(Stat::DnatNew), 1, "no new flow was needed");
}

#[test]
fn a_syn_flood_evicts_only_unassured_flows_and_new_flows_keep_coming_in() {
    require_root();
    // Room for 8 assured and 32 new flows; the flood is 30 times that.
    let mut h = Harness::with_conntrack_tables(16, 64);
    h.apply_yaml(&manifest(&BACKENDS));
    let established = client(44500);
    let backend = assured_flow(&h, established);
    // Spoofed SYNs from 1 000 sources, each answered by its backend's
    // SYN-ACK (which goes nowhere: nobody completes the handshake).
    for i in 0..1000u16 {
        let spoofed = SocketAddrV4::new(
            Ipv4Addr::new(198, 18, 200 + (i / 250) as u8, (i % 250) as u8 + 1),
            1024 + i,
        );
        h.run(&Packet::tcp(spoofed, vip(80), TCP_SYN).build());
        let to = SocketAddrV4::new(expected_backend(&BACKENDS, spoofed, vip(80), 6), 8080);
        h.run_egress(
            &Packet::tcp(spoofed, to, TCP_SYN)
                .reply(TCP_SYN | TCP_ACK)
                .build(),
        );
    }
    assert_eq!(h.counter(Stat::DropCtFull), 0, "no new flow was refused");
    assert_eq!(
        h.counter(Stat::DnatNew),
        1001,
        "each spoofed SYN admitted as a new flow, 15 times the table's room"
    );
    assert!(h.conntrack_table(CT_NEW_MAP).len() <= 64);
    assert_eq!(
        h.conntrack_table(CT_MAP).len(),
        2,
        "only the assured flow there"
    );

    // The assured flow was not evicted: both ways translated, no new flow.
    let dnat_before = h.counter(Stat::DnatNew);
    let ack = Packet::tcp(established, vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "established flow",
    );
    let reply = Packet::tcp(established, backend, TCP_ACK).reply(TCP_ACK);
    assert_frame(
        &h.run_egress(&reply.build()).frame,
        &reply.clone().from(vip(80)).build(),
        "its reply",
    );
    assert_eq!(h.counter(Stat::DnatNew), dnat_before);

    // A legitimate client right after the flood: admitted and assured.
    let newcomer = client(44501);
    let backend = assured_flow(&h, newcomer);
    let ((fk, _), (rk, _)) = flow_entries(&h, newcomer);
    assert_eq!(
        (table_of(&h, &fk), table_of(&h, &rk)),
        ("assured", "assured")
    );
    let ack = Packet::tcp(newcomer, vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "newcomer",
    );
}

#[test]
fn a_full_assured_table_leaves_new_flows_working_and_evictable() {
    require_root();
    let mut h = Harness::with_conntrack_tables(4, 64); // two assured flows
    h.apply_yaml(&manifest(&BACKENDS));
    for port in [44600, 44601] {
        assured_flow(&h, client(port));
    }
    let third = client(44602);
    let backend = assured_flow(&h, third);
    assert!(h.counter(Stat::CtAssuredFull) >= 1);
    assert_eq!(h.counter(Stat::CtAssured), 2);
    let ((fk, fwd), (rk, rep)) = flow_entries(&h, third);
    assert_eq!(
        (table_of(&h, &fk), table_of(&h, &rk)),
        ("new", "new"),
        "no half flow in the full table"
    );
    assert_eq!((fwd.flags, rep.flags), (CT_SEEN_REPLY, CT_SEEN_REPLY));
    let ack = Packet::tcp(third, vip(80), TCP_ACK);
    assert_frame(
        &h.run(&ack.build()).frame,
        &ack.clone().to(backend).build(),
        "request",
    );
    let reply = Packet::tcp(third, backend, TCP_ACK).reply(TCP_ACK);
    assert_frame(
        &h.run_egress(&reply.build()).frame,
        &reply.clone().from(vip(80)).build(),
        "reply",
    );
    assert_eq!(h.counter(Stat::DropCtFull), 0);
}

#[test]
fn agent_gc_frees_expired_flows_and_keeps_live_ones() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    let (dead, half, live) = (client(44600), client(44601), client(44602));
    for from in [dead, half, live] {
        h.run(&Packet::tcp(from, vip(80), TCP_SYN).build());
    }
    let past = now_ns() - 1;
    let ((fk, fv), (rk, rv)) = flow_entries(&h, dead);
    h.expire_at(&(fk, fv), past);
    h.expire_at(&(rk, rv), past);
    let ((fk, fv), _) = flow_entries(&h, half);
    h.expire_at(&(fk, fv), past);
    let mut ct = h.agent_conntrack();
    let sweep = ct.gc(now_ns()).expect("gc");
    assert_eq!((sweep.assured, sweep.new, sweep.flows_removed), (0, 4, 1));
    let ports: std::collections::BTreeSet<u16> = ct
        .entries()
        .unwrap()
        .keys()
        .map(|k| {
            if k.dir == CT_DIR_FORWARD {
                k.sport
            } else {
                k.dport
            }
        })
        .collect();
    assert_eq!(
        ports,
        [half.port(), live.port()].into(),
        "both entries of the dead flow, nothing else"
    );
}

/// Flow `n`'s two entries as the datapath writes them: from client
/// 198.18.(n / 256).(n % 256) to the VIP, port 53, on backend id
/// `backend`, each entry expiring at its time of `expires`.
fn synthetic_flow(
    n: u32,
    proto: u8,
    backend: u32,
    flags: u8,
    expires: (u64, u64),
) -> [(CtKey, CtValue); 2] {
    let client = [198, 18, (n >> 8) as u8, n as u8];
    let key = CtKey::new(client, 40_000, VIP.octets(), 53, proto, CT_DIR_FORWARD);
    let forward = CtValue {
        src_addr: client,
        src_port: 40_000,
        dst_addr: BACKENDS[0].octets(),
        dst_port: 5353,
        backend_id: backend,
        flow_id: n + 1,
        flags,
        created_ns: 1,
        expires_ns: expires.0,
        ..CtValue::default()
    };
    let reply = CtValue {
        expires_ns: expires.1,
        ..key.peer_value(&forward)
    };
    [(key, forward), (key.peer_key(&forward), reply)]
}

/// The GC reads the tables a batch at a time and deletes between batches:
/// over a table many batches long it frees exactly the flows whose both
/// entries expired (a flow half alive stays, whole), and an expired
/// entry of the table of new flows under an assured one goes alone.
#[test]
fn agent_gc_streams_a_large_table_and_frees_exactly_the_dead_flows() {
    require_root();
    let mut h = Harness::with_conntrack_tables(65_536, 8_192);
    let now = now_ns();
    let (past, later) = (now - 1, now + 3_600 * 1_000_000_000);
    const FLOWS: u32 = 24_000; // 48 000 entries: a dozen batches
    for n in 0..FLOWS {
        let expires = match n % 3 {
            0 => (past, past),  // dead
            1 => (past, later), // answers still come: kept
            _ => (later, later),
        };
        for (key, value) in synthetic_flow(n, 6, 1, CT_ASSURED | CT_SEEN_REPLY, expires) {
            h.set_conntrack(&key, Some(value));
        }
    }
    // A stale copy in the new table of a live assured flow's entry.
    let [(shadowed, live), _] = synthetic_flow(2, 6, 1, CT_SEEN_REPLY, (past, past));
    h.set_conntrack(&shadowed, Some(live));
    let mut ct = h.agent_conntrack();
    let sweep = ct.gc(now).expect("gc");
    let kept = 2 * (FLOWS - FLOWS.div_ceil(3)) as usize;
    assert_eq!(
        (sweep.assured, sweep.new, sweep.flows_removed),
        (kept, 0, FLOWS.div_ceil(3) as usize)
    );
    let left = ct.entries().expect("read ct");
    assert_eq!(left.len(), kept, "the shadowed copy went too");
    assert!(
        left.values()
            .all(|v| (v.flow_id - 1) % 3 != 0 && v.flags & CT_ASSURED != 0),
        "only dead flows went"
    );
    assert_eq!(
        ct.get(&shadowed).map(|v| v.flow_id),
        Some(3),
        "its assured entry stayed"
    );
}

/// The UDP flush streams too: every flow of the backend that left, over
/// many batches, and nothing of the others.
#[test]
fn agent_udp_flush_streams_a_large_table() {
    require_root();
    let mut h = Harness::with_conntrack_tables(65_536, 8_192);
    let later = now_ns() + 3_600 * 1_000_000_000;
    const FLOWS: u32 = 20_000;
    for n in 0..FLOWS {
        let backend = 1 + n % 2;
        for (key, value) in synthetic_flow(n, 17, backend, CT_ASSURED, (later, later)) {
            h.set_conntrack(&key, Some(value));
        }
    }
    let mut ct = h.agent_conntrack();
    let frontend = lb_agent::model::L4Addr {
        addr: VIP.into(),
        port: 53,
        proto: lb_agent::model::Proto::Udp,
    };
    let sweep = ct.flush_udp(&[(frontend, 2)].into()).expect("flush");
    assert_eq!(
        (sweep.flows_removed, sweep.assured),
        ((FLOWS / 2) as usize, FLOWS as usize)
    );
    let left = ct.entries().expect("read ct");
    assert_eq!(left.len(), FLOWS as usize);
    assert!(left.values().all(|v| v.backend_id == 1));
}

/// A frontend's slots are written in one batch, in order: into a service
/// map with room for eight, twelve slots write the first eight and report
/// the ninth as "full" with the flag to raise.
#[test]
fn a_slot_batch_into_a_full_map_writes_in_order_and_names_the_flag() {
    use lb_agent::datapath::{
        loader,
        maps::{LbMaps as _, MapWriteError},
    };
    require_root();
    let sizes = loader::MapSizes {
        service_slots: 8,
        ..loader::MapSizes::default()
    };
    let mut ebpf = loader::load(None, sizes, &loader::Globals::DEFAULT).expect("load");
    let mut maps = loader::kernel_maps(&mut ebpf, sizes).expect("maps");
    let frontend = lb_agent::model::L4Addr {
        addr: VIP.into(),
        port: 80,
        proto: lb_agent::model::Proto::Tcp,
    };
    let slots: Vec<(u16, lb_common::svc::SvcValue)> = (1..=12)
        .map(|slot| {
            let value = lb_common::svc::SvcValue {
                backend_id: u32::from(slot),
                ..Default::default()
            };
            (slot, value)
        })
        .collect();
    match maps.put_slots(frontend, &slots) {
        Err((8, MapWriteError::Full { flag, .. })) => assert_eq!(flag, "--max-service-slots"),
        other => panic!("expected 8 written, then full: {other:?}"),
    }
    let snapshot = maps.snapshot().expect("read back");
    let written: Vec<u16> = snapshot.slots.keys().map(|(_, slot)| *slot).collect();
    assert_eq!(
        written,
        (1..=8).collect::<Vec<u16>>(),
        "the first eight, in order"
    );
}

#[test]
fn big_tcp_length_zero_on_a_small_packet_is_malformed() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(&BACKENDS));
    // Total length 0 means "BIG TCP" only on a packet past 64 KiB.
    let mut frame = Packet::tcp(client(44700), vip(80), TCP_ACK).build();
    frame[16..18].copy_from_slice(&[0, 0]);
    let out = h.run(&frame);
    assert_eq!((out.verdict, &out.frame), (TCX_NEXT, &frame));
    assert_eq!(h.counter(Stat::PassMalformed), 1);
}

/// Debug events cost nothing when off: the log level is a read-only 0 the
/// verifier sees, so the logging code is pruned from the loaded program.
#[test]
fn debug_events_off_are_pruned_from_the_loaded_program() {
    require_root();
    let sizes = lb_agent::datapath::loader::MapSizes::default();
    let translated = |debug_events: bool| -> u32 {
        let mut ebpf = lb_agent::datapath::loader::load_with_log(
            None,
            sizes,
            &lb_agent::datapath::loader::Globals::DEFAULT,
            debug_events,
        )
        .unwrap();
        let program =
            lb_agent::datapath::loader::program(&mut ebpf, lb_agent::datapath::INGRESS_PROGRAM)
                .unwrap();
        program.info().unwrap().size_translated().unwrap()
    };
    let (off, on) = (translated(false), translated(true));
    assert!(
        off < on,
        "with debug events off the program is {off} bytes, on {on}: nothing pruned"
    );
}

/// The verifier walks every path of a program and gives up at 1 000 000
/// instructions; a program near that fails to load after the next feature
/// (and takes seconds to load now). Each stays under half of it.
#[test]
fn every_program_verifies_well_inside_the_kernels_limit() {
    require_root();
    let sizes = lb_agent::datapath::loader::MapSizes::default();
    let mut ebpf = lb_agent::datapath::loader::load(
        None,
        sizes,
        &lb_agent::datapath::loader::Globals::DEFAULT,
    )
    .unwrap();
    for name in [
        lb_agent::datapath::INGRESS_PROGRAM,
        lb_agent::datapath::INGRESS_EXTERNAL_PROGRAM,
        lb_agent::datapath::EGRESS_PROGRAM,
    ]
    .into_iter()
    .chain(lb_common::family6::PROGRAM_NAMES)
    {
        let program = lb_agent::datapath::loader::program(&mut ebpf, name).unwrap();
        let verified = program.info().unwrap().verified_instruction_count();
        let verified = verified.expect("the kernel reports verified instructions");
        eprintln!("{name}: {verified} instructions verified");
        assert!(
            verified < 500_000,
            "{name}: {verified} instructions verified"
        );
    }
}
