//! IPv6 datapath tests: crafted packets through the real tc programs (the
//! IPv4 programs hand IPv6 packets to the IPv6 ones by tail call) with
//! BPF_PROG_TEST_RUN; exact output bytes, checksums from scratch,
//! counters, conntrack.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lb_common::{
    ct::{CT_DIR_FORWARD, CT_SEEN_REPLY},
    hash::{flow_hash, fold_ipv6, select_slot},
    stats::Stat,
};
use lb_tests::{
    datapath::Harness,
    packet::{
        assert_frame, checksum, pseudo_sum6, Packet, Packet6, NEXTHDR_DEST, NEXTHDR_HOP, TCP_ACK,
        TCP_SYN,
    },
    require_root,
};

const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
const BACKENDS: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0x2001, 0xdb8, 0x11, 0, 0, 0, 0, 2),
];
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);

/// `web` over IPv6 (TCP 80 → 8080, UDP 53 → 5353); `dual` also gives it
/// an IPv4 cluster IP with one IPv4 endpoint.
fn manifest(dual: bool) -> String {
    let (ips, families) = if dual {
        (format!("[{VIP6}, {VIP4}]"), "[IPv6, IPv4]")
    } else {
        (format!("[{VIP6}]"), "[IPv6]")
    };
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP6}
  clusterIPs: {ips}
  ipFamilies: {families}
  ipFamilyPolicy: {policy}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- addresses: ["{b0}"]
- addresses: ["{b1}"]
"#,
        policy = if dual {
            "RequireDualStack"
        } else {
            "SingleStack"
        },
        b0 = BACKENDS[0],
        b1 = BACKENDS[1],
    );
    if dual {
        yaml += &format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v4, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- addresses: ["{BACKEND4}"]
"#
        );
    }
    yaml
}

fn vip(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(VIP6, port, 0, 0)
}

fn client(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(CLIENT, port, 0, 0)
}

fn at(addr: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(addr, port, 0, 0)
}

/// The backend a new flow must get: the datapath's hash over the folded
/// addresses, slots in address order.
fn expected_backend(src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> Ipv6Addr {
    let hash = flow_hash(
        fold_ipv6(&src.ip().octets()),
        fold_ipv6(&dst.ip().octets()),
        src.port().to_be(),
        dst.port().to_be(),
        proto,
    );
    let mut sorted = BACKENDS.to_vec();
    sorted.sort();
    sorted[usize::from(select_slot(hash, sorted.len() as u16)) - 1]
}

fn port_for(backend: Ipv6Addr, proto: u8) -> u16 {
    (40000..41000)
        .find(|p| expected_backend(client(*p), vip(80), proto) == backend)
        .expect("a port for every backend")
}

#[test]
fn tcp_syn_to_an_ipv6_cluster_ip_is_dnated_to_each_backend_with_exact_bytes() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    for backend in BACKENDS {
        let port = port_for(backend, 6);
        let syn = Packet6::tcp(client(port), vip(80), TCP_SYN).with_payload(b"hello");
        let out = h.run(&syn.build());
        assert_eq!(out.verdict, TCX_NEXT);
        let expected = syn.clone().to(at(backend, 8080)).build();
        assert_frame(&out.frame, &expected, &format!("SYN to {backend}"));
    }
    assert_eq!(h.counter(Stat::DnatNew), 2);
}

/// The same connection both ways: the backend's answer leaves as the
/// cluster IP's, later packets of the flow hit its conntrack entries.
#[test]
fn an_ipv6_flow_is_tracked_and_its_replies_reverse_natted_with_exact_bytes() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let syn = Packet6::tcp(client(41000), vip(80), TCP_SYN);
    let backend = at(expected_backend(client(41000), vip(80), 6), 8080);
    let out = h.run(&syn.build());
    assert_frame(&out.frame, &syn.clone().to(backend).build(), "SYN");

    let syn_ack = syn.clone().to(backend).reply(TCP_SYN | TCP_ACK);
    let out = h.run_egress(&syn_ack.build());
    assert_eq!(out.verdict, TCX_NEXT);
    let expected = syn_ack.clone().from(vip(80)).build();
    assert_frame(&out.frame, &expected, "SYN-ACK back from the cluster IP");

    let ack = Packet6::tcp(client(41000), vip(80), TCP_ACK).with_payload(b"GET /");
    let out = h.run(&ack.build());
    assert_frame(&out.frame, &ack.clone().to(backend).build(), "ACK");
    assert_eq!(
        [Stat::DnatNew, Stat::RevNat, Stat::DnatCtHit].map(|s| h.counter(s)),
        [1, 1, 1]
    );
    let entries = h.conntrack6();
    assert_eq!(entries.len(), 2, "a flow's two entries");
    let (_, forward) = entries
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .expect("forward entry");
    assert_eq!(
        (forward.dst_addr, forward.dst_port),
        (backend.ip().octets(), 8080)
    );
    assert_ne!(forward.flags & CT_SEEN_REPLY, 0, "the answer was seen");
    assert!(h.conntrack().is_empty(), "nothing in the IPv4 tables");
}

#[test]
fn a_udp_query_and_its_answer_through_an_ipv6_cluster_ip_keep_valid_checksums() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let query = Packet6::udp(client(40053), vip(53), b"a query");
    let backend = at(expected_backend(client(40053), vip(53), 17), 5353);
    let out = h.run(&query.build());
    assert_frame(&out.frame, &query.clone().to(backend).build(), "query");
    let answer = query
        .clone()
        .to(backend)
        .reply(0)
        .with_payload(b"an answer");
    let out = h.run_egress(&answer.build());
    assert_frame(
        &out.frame,
        &answer.clone().from(vip(53)).build(),
        "answer from the cluster IP",
    );
}

/// Extension headers before the transport header are walked (hop-by-hop,
/// destination options) and carried through untouched.
#[test]
fn a_packet_with_extension_headers_is_walked_and_translated_with_them() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let syn = Packet6::tcp(client(40100), vip(80), TCP_SYN)
        .with_options(NEXTHDR_HOP, 1)
        .with_options(NEXTHDR_DEST, 2);
    let backend = at(expected_backend(client(40100), vip(80), 6), 8080);
    let out = h.run(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(
        &out.frame,
        &syn.clone().to(backend).build(),
        "SYN with options",
    );
}

/// What is not a service flow passes as it came: neighbour discovery, a
/// fragment, another address, and a chain of extension headers longer than
/// the walk, even to the cluster IP.
#[test]
fn ipv6_traffic_not_for_a_service_passes_untouched() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let mut neighbour_solicitation = Packet6::udp(client(1), vip(1), &[0; 20]).build();
    neighbour_solicitation[20] = 58; // next header ICMPv6
    neighbour_solicitation[54] = 135;
    let fragment = Packet6::udp(client(40200), vip(53), b"later piece")
        .with_fragment(8, false, 7)
        .build();
    let elsewhere = Packet6::tcp(client(40201), at(BACKENDS[0], 80), TCP_SYN).build();
    let mut too_deep = Packet6::tcp(client(40202), vip(80), TCP_SYN);
    for _ in 0..7 {
        too_deep = too_deep.with_options(NEXTHDR_DEST, 1);
    }
    let too_deep = too_deep.build();
    for (name, frame) in [
        ("neighbour solicitation", &neighbour_solicitation),
        ("later fragment", &fragment),
        ("not a frontend", &elsewhere),
        ("7 extension headers", &too_deep),
    ] {
        let out = h.run(frame);
        assert_eq!(out.verdict, TCX_NEXT, "{name}");
        assert_eq!(&out.frame, frame, "{name} must pass untouched");
        let out = h.run_egress(frame);
        assert_eq!(&out.frame, frame, "{name} must pass egress untouched");
    }
    assert_eq!(h.counter(Stat::PassNotService), 4);
    assert_eq!(h.counter(Stat::DnatNew), 0);
    assert!(h.conntrack6().is_empty());
}

/// A dual-stack Service: each cluster IP reaches its own family's
/// endpoints, each family's flow in its own tables.
#[test]
fn a_dual_stack_service_translates_each_family_to_its_own_endpoints() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(true));
    let syn6 = Packet6::tcp(client(40300), vip(80), TCP_SYN);
    let backend6 = at(expected_backend(client(40300), vip(80), 6), 8080);
    let out = h.run(&syn6.build());
    assert_frame(&out.frame, &syn6.clone().to(backend6).build(), "IPv6 SYN");
    let client4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 40300);
    let syn4 = Packet::tcp(client4, SocketAddrV4::new(VIP4, 80), TCP_SYN);
    let out = h.run(&syn4.build());
    let expected = syn4.clone().to(SocketAddrV4::new(BACKEND4, 8080)).build();
    assert_frame(&out.frame, &expected, "IPv4 SYN");
    assert_eq!(h.counter(Stat::DnatNew), 2);
    assert_eq!((h.conntrack6().len(), h.conntrack().len()), (2, 2));
}

/// No endpoints: a new flow is answered with ICMPv6 port unreachable from
/// the cluster IP (RFC 4443: the IPv6 header and what follows it, as much
/// as lb quotes: 8 bytes), sent back the way it came, so TCP is refused at
/// once and connected UDP gets ECONNREFUSED.
#[test]
fn a_new_flow_to_an_ipv6_frontend_without_endpoints_is_answered_port_unreachable() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false).replace(
        &format!(
            "endpoints:\n- addresses: [\"{}\"]\n- addresses: [\"{}\"]\n",
            BACKENDS[0], BACKENDS[1]
        ),
        "endpoints: []\n",
    ));
    for syn in [
        Packet6::tcp(client(40400), vip(80), TCP_SYN).with_payload(b"options"),
        Packet6::udp(client(40401), vip(53), b"a query"),
    ] {
        let frame = syn.build();
        let out = h.run(&frame);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "sent back out");
        let mut expected = Vec::new();
        expected.extend_from_slice(&frame[6..12]);
        expected.extend_from_slice(&frame[0..6]);
        expected.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 56, 58, 64]);
        expected.extend_from_slice(&VIP6.octets());
        expected.extend_from_slice(&CLIENT.octets());
        let mut icmp = vec![1, 4, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&frame[14..14 + 48]);
        let sum = checksum(&icmp, pseudo_sum6(&VIP6, &CLIENT, 58, icmp.len()));
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        expected.extend_from_slice(&icmp);
        assert_frame(&out.frame, &expected, "port unreachable");
    }
    assert_eq!(h.counter(Stat::RejectNoBackend), 2);
    assert!(h.conntrack6().is_empty(), "no flow recorded");
}
