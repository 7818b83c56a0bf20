//! IPv6 datapath tests: crafted packets through the real tc programs (the
//! IPv4 programs hand IPv6 packets to the IPv6 ones by tail call) with
//! BPF_PROG_TEST_RUN; exact output bytes, checksums from scratch,
//! counters, conntrack.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lb_agent::datapath::loader::{FamilyCidrs, Globals};
use lb_common::{
    config::NodeConfig,
    ct::{CT_DIR_FORWARD, CT_SEEN_REPLY, CT_SNAT},
    hash::{flow_hash, fold_ipv6, select_slot},
    stats::Stat,
};
use lb_tests::{
    datapath::Harness,
    packet::{
        assert_frame, icmp6_error, icmp6_error_quoting, Packet, Packet6, NEXTHDR_DEST, NEXTHDR_HOP,
        TCP_ACK, TCP_SYN,
    },
    require_root,
};

const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_SHOT: u32 = 2;

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

/// With the new-flow program missing from the program array (an agent
/// that failed to fill it), a new flow is dropped and counted as that,
/// not as a full conntrack table; a flow already tracked is unaffected.
#[test]
fn a_new_ipv6_flow_whose_program_is_missing_is_dropped_as_a_failed_tail_call() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let tracked = Packet6::tcp(client(40000), vip(80), TCP_SYN);
    assert_eq!(h.run(&tracked.build()).verdict, TCX_NEXT);
    {
        let map = h
            .ebpf
            .map_mut(lb_common::family6::PROGRAMS6_MAP)
            .expect("the program array");
        let mut array = aya::maps::ProgramArray::try_from(map).unwrap();
        array.clear_index(&lb_common::family6::NEW_FLOW).unwrap();
    }
    let syn = Packet6::tcp(client(40001), vip(80), TCP_SYN);
    let out = h.run(&syn.build());
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(h.counter(Stat::DropTailCall), 1);
    assert_eq!(h.counter(Stat::DropCtFull), 0);
    let ack = Packet6::tcp(client(40000), vip(80), TCP_ACK);
    assert_eq!(h.run(&ack.build()).verdict, TCX_NEXT, "the tracked flow");
    assert_eq!(h.counter(Stat::DnatCtHit), 1);
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
    // The later fragment, at ingress and egress: no first fragment seen.
    assert_eq!(h.counter(Stat::PassNotService), 3);
    assert_eq!(h.counter(Stat::PassFragmentUntracked), 2);
    assert_eq!(h.counter(Stat::DnatNew), 0);
    assert!(h.conntrack6().is_empty());
}

/// IPv6 hosts fragment what they send (routers never do): a UDP datagram
/// its sender fragmented (a large DNS answer, Kerberos, RADIUS) and its
/// fragmented answer. The first fragment is translated by its flow, the
/// later ones (no ports) follow it, the same addresses. Compared byte for
/// byte with the translated datagram fragmented the same way, so the
/// first fragment's UDP checksum is checked against one computed from
/// scratch over the whole datagram.
#[test]
fn a_fragmented_udp_datagram_and_its_fragmented_answer_over_ipv6_are_translated_with_exact_bytes() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let query = Packet6::udp(client(40002), vip(53), &payload);
    let backend = at(expected_backend(client(40002), vip(53), 17), 5353);
    const ID: u32 = 0x1234_5678;
    let expected = query.clone().to(backend).fragments(1448, ID);
    let fragments = query.fragments(1448, ID);
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

    let answer = query
        .clone()
        .to(backend)
        .reply(0)
        .with_payload(&payload[..2000]);
    const ANSWER_ID: u32 = 0x0bad_cafe;
    let expected = answer.clone().from(vip(53)).fragments(1448, ANSWER_ID);
    let answer_fragments = answer.fragments(1448, ANSWER_ID);
    for (i, (fragment, expected)) in answer_fragments.iter().zip(&expected).enumerate() {
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
    let later = &answer_fragments[1];
    assert_eq!(&h.run(later).frame, later);

    // A later fragment of a datagram never seen (or ahead of its first
    // fragment), fragments not for a service, and a TCP fragment (no
    // sender fragments TCP: it is not tracked) pass untouched.
    let unseen = &query.fragments(1448, ID + 1)[1];
    let out = h.run(unseen);
    assert_eq!((out.verdict, &out.frame), (TCX_NEXT, unseen));
    let elsewhere = query.clone().to(at(BACKENDS[0], 53));
    for fragment in elsewhere.fragments(1448, ID + 2) {
        let out = h.run(&fragment);
        assert_eq!((out.verdict, &out.frame), (TCX_NEXT, &fragment));
    }
    let tcp = Packet6::tcp(client(40003), vip(80), TCP_SYN).with_payload(&payload);
    for fragment in tcp.fragments(1448, ID + 3) {
        let out = h.run(&fragment);
        assert_eq!((out.verdict, &out.frame), (TCX_NEXT, &fragment), "TCP");
    }
    assert_eq!(h.counter(Stat::PassFragmentUntracked), 4);
    assert_eq!(h.counter(Stat::DnatNew), 1, "the query's flow only");
    assert_eq!(h.counter(Stat::DropFragment), 0);
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
        let expected = icmp6_error(&frame, VIP6, CLIENT, 1, 4, 0);
        assert_frame(&out.frame, &expected, "port unreachable");
    }
    assert_eq!(h.counter(Stat::RejectNoBackend), 2);
    assert!(h.conntrack6().is_empty(), "no flow recorded");
}

/// node-a's uplink address: its node ports and SNAT address.
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);
const NODE6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 3);
/// A client on the LAN.
const LAN_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x100);
/// A pod on node-b (BACKENDS[1] is in its pod prefix 2001:db8:11::/64).
const REMOTE_BACKEND: Ipv6Addr = BACKENDS[1];
const SNAT_PORTS: (u16, u16) = (1024, 29999);
const NODE_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// `web` over IPv6 as a NodePort Service (TCP 80 → 8080 at 30080) with
/// one endpoint, on node-b.
fn nodeport_manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP6}
  clusterIPs: [{VIP6}]
  ipFamilies: [IPv6]
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-v6, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: ["{REMOTE_BACKEND}"]
  nodeName: node-b
"#
    )
}

/// node-a's namespace with its IPv6 routes (the datapath routes SNATed
/// packets itself): the LAN 2001:db8:18::/64 on a veth standing in for
/// the uplink, node-b's pods 2001:db8:11::/64 via node-b (neighbour
/// known; the client's is not, left to `bpf_redirect_neigh`), `mtu` on
/// that route; and a datapath programmed for node-a with
/// `nodeport_manifest`, SNATing to `NODE6`.
struct Node6 {
    ns: lb_tests::netns::NetNs,
    h: Harness,
}

impl Node6 {
    fn new(name: &str, mtu: Option<u16>) -> Self {
        Self::with_globals(name, mtu, &Globals::DEFAULT)
    }

    fn with_globals(name: &str, mtu: Option<u16>, globals: &Globals) -> Self {
        require_root();
        let ns = lb_tests::netns::NetNs::new(&format!("dp6-{name}")).unwrap();
        let ip = |args: &[&str]| ns.ip(args).unwrap();
        ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "lan0",
        ]);
        ip(&["link", "set", "eth0", "address", &mac_text(NODE_A_MAC)]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["link", "set", "eth0", "up"]);
        ip(&["link", "set", "lan0", "up"]);
        let b = NODE6_B.to_string();
        ip(&[
            "-6",
            "neigh",
            "add",
            &b,
            "lladdr",
            &mac_text(NODE_B_MAC),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        let mut route = vec!["-6", "route", "add", "2001:db8:11::/64", "via", &b];
        let mtu = mtu.map(|m| m.to_string());
        if let Some(mtu) = &mtu {
            route.extend(["mtu", "lock", mtu]);
        }
        ip(&route);
        ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let mut h = Harness::with_globals(globals);
        h.node = lb_agent::desired::NodeContext {
            name: Some("node-a".into()),
            nodeport_addresses: vec![NODE6.into()],
            ..Default::default()
        };
        h.set_node_config6(NodeConfig {
            snat_addr: NODE6.octets(),
            snat_port_first: SNAT_PORTS.0,
            snat_port_last: SNAT_PORTS.1,
        });
        h.apply_yaml(&nodeport_manifest());
        Self { ns, h }
    }

    fn external(&self, frame: &[u8]) -> lb_tests::datapath::RunResult {
        let h = &self.h;
        self.ns.run(|| h.run_external(frame))
    }

    /// The SNAT port of the flow from `client`.
    fn snat_port_of(&self, client: SocketAddrV6) -> u16 {
        let flows = self.h.conntrack6();
        let (_, forward) = flows
            .iter()
            .find(|(k, v)| {
                k.dir == CT_DIR_FORWARD && k.sport == client.port() && v.flags & CT_SNAT != 0
            })
            .expect("a SNATed forward entry");
        forward.src_port
    }
}

/// node-a to node-b, from the SNAT port to the pod.
fn snated(packet: &Packet6, snat_port: u16) -> Packet6 {
    Packet6 {
        src_mac: NODE_A_MAC,
        dst_mac: NODE_B_MAC,
        ..hop(packet
            .clone()
            .from(at(NODE6, snat_port))
            .to(at(REMOTE_BACKEND, 8080)))
    }
}

/// Forwarded by the datapath itself: one hop less.
fn hop(packet: Packet6) -> Packet6 {
    Packet6 {
        hop_limit: packet.hop_limit - 1,
        ..packet
    }
}

#[test]
fn an_ipv6_node_port_to_a_remote_backend_is_snated_both_ways_with_exact_bytes() {
    let node = Node6::new("snat", None);
    let client = at(LAN_CLIENT, 40000);
    let node_port = at(NODE6, 30080);
    let syn = Packet6::tcp(client, node_port, TCP_SYN).with_payload(b"hello");
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed by the datapath");

    let flows = node.h.conntrack6();
    let (_, forward) = flows
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD)
        .expect("a forward entry");
    assert_ne!(forward.flags & CT_SNAT, 0, "SNATed");
    assert_eq!(forward.src_addr, NODE6.octets());
    let snat_port = forward.src_port;
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat_port));
    let at_backend = snated(&syn, snat_port);
    assert_frame(
        &out.frame,
        &at_backend.build(),
        "SYN to the other node's pod",
    );

    // The pod answers the node; the answer leaves from the node port.
    let answer = at_backend.reply(TCP_SYN | TCP_ACK).with_payload(b"world");
    let answer = Packet6 {
        hop_limit: 64,
        ..answer
    };
    let out = node.external(&answer.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let to_client = hop(answer.clone().from(node_port).to(client));
    assert_frame(&out.frame, &to_client.build(), "SYN-ACK back to the client");

    let ack = Packet6::tcp(client, node_port, TCP_ACK);
    let out = node.external(&ack.build());
    assert_frame(&out.frame, &snated(&ack, snat_port).build(), "ACK");
    assert_eq!(
        (
            node.h.counter(Stat::DnatNew),
            node.h.counter(Stat::SnatNew),
            node.h.counter(Stat::DnatCtHit),
            node.h.counter(Stat::RevSnat)
        ),
        (1, 1, 1, 1)
    );
}

/// IPv6 routers never fragment: a SNATed packet too big for the way to
/// the backend is answered with packet too big from the node port, with
/// the route's MTU, so the client's path-MTU discovery works through the
/// node; one that fits then goes through.
#[test]
fn a_routed_ipv6_packet_too_big_for_the_way_out_is_answered_packet_too_big() {
    let node = Node6::new("ptb", Some(1280));
    let client = at(LAN_CLIENT, 40001);
    let node_port = at(NODE6, 30080);
    let big = Packet6::tcp(client, node_port, TCP_SYN).with_payload(&[7; 1300]);
    let frame = big.build();
    let out = node.external(&frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "answered back out");
    let expected = icmp6_error(&frame, NODE6, LAN_CLIENT, 2, 0, 1280);
    assert_frame(&out.frame, &expected, "packet too big");
    assert_eq!(node.h.counter(Stat::IcmpFragNeeded), 1);

    let fits = Packet6::tcp(client, node_port, TCP_SYN).with_payload(&[7; 1000]);
    let out = node.external(&fits.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let snat_port = node.snat_port_of(client);
    assert_frame(
        &out.frame,
        &snated(&fits, snat_port).build(),
        "SYN that fits, to node-b",
    );
}

/// A service CIDR routed into the cluster, over IPv6: at the uplink, a new
/// flow to a cluster IP whose backend is on another node is SNATed to the
/// node (a source outside the cluster CIDR); a source in `--cluster-cidr`
/// keeps its address, DNAT only, through the stack.
#[test]
fn an_ipv6_cluster_ip_reached_from_outside_the_cluster_cidr_is_snated() {
    let client = at(LAN_CLIENT, 40002);
    let syn = Packet6::tcp(client, vip(80), TCP_SYN);
    let node = Node6::new("cip-out", None);
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed by the datapath");
    let snat_port = node.snat_port_of(client);
    assert_frame(
        &out.frame,
        &snated(&syn, snat_port).build(),
        "SNATed to the other node's pod",
    );
    drop(node);

    let globals = Globals {
        cluster_cidrs: FamilyCidrs::new(&["2001:db8:18::/64".parse().unwrap()]).unwrap(),
        ..Globals::DEFAULT
    };
    let node = Node6::with_globals("cip-in", None, &globals);
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT, "through the stack");
    let dnat_only = syn.clone().to(at(REMOTE_BACKEND, 8080)).build();
    assert_frame(&out.frame, &dnat_only, "DNAT only");
    assert_eq!(node.h.counter(Stat::SnatNew), 0);
}

/// As nftables kube-proxy rejects it: a packet to an address of an IPv6
/// service CIDR that no Service holds (unallocated, or a port its Service
/// lacks) gets ICMPv6 port unreachable from that address; outside the
/// CIDR, packets pass as before.
#[test]
fn an_address_in_an_ipv6_service_cidr_no_frontend_holds_is_rejected() {
    require_root();
    let globals = Globals {
        service_cidrs: FamilyCidrs::new(&["2001:db8:ffff::/64".parse().unwrap()]).unwrap(),
        ..Globals::DEFAULT
    };
    let mut h = Harness::with_globals(&globals);
    h.apply_yaml(&manifest(false));
    let unallocated = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x99);
    for (to, port) in [(unallocated, 80), (VIP6, 8443)] {
        let frame = Packet6::tcp(client(40500), at(to, port), TCP_SYN).build();
        let out = h.run(&frame);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{to} port {port}: sent back");
        let expected = icmp6_error(&frame, to, CLIENT, 1, 4, 0);
        assert_frame(&out.frame, &expected, "port unreachable from the address");
    }
    let outside = Packet6::tcp(client(40501), at(BACKENDS[0], 80), TCP_SYN).build();
    let out = h.run(&outside);
    assert_eq!((out.verdict, &out.frame), (TCX_NEXT, &outside), "untouched");
    assert_eq!(h.counter(Stat::RejectServiceCidr), 2);
}

/// `web` over IPv6 with `policy` in its spec, both endpoints on node-a.
fn local_manifest(policy: &str) -> String {
    let mut yaml = manifest(false).replace("  ports:\n", &format!("  {policy}\n  ports:\n"));
    for backend in BACKENDS {
        let line = format!("- addresses: [\"{backend}\"]\n");
        yaml = yaml.replace(&line, &format!("{line}  nodeName: node-a\n"));
    }
    yaml
}

fn harness_on_node_a(yaml: &str) -> Harness {
    require_root();
    let mut h = Harness::new();
    h.node = lb_agent::desired::NodeContext {
        name: Some("node-a".into()),
        ..Default::default()
    };
    h.apply_yaml(yaml);
    h
}

/// The destination of a DNATed IPv6 frame.
fn dst_of(frame: &[u8]) -> Ipv6Addr {
    let bytes: [u8; 16] = frame[38..54].try_into().unwrap();
    bytes.into()
}

/// ClientIP affinity over IPv6 (upstream dual_stack.go "should function for
/// client IP based session affinity"): a client's new connections follow
/// its first one whatever their ports hash to, another client is balanced
/// on its own, an expired memory no longer applies, and a backend that
/// left the Service is never returned to.
#[test]
fn client_ip_affinity_over_ipv6_returns_to_the_backend_while_it_is_current() {
    use lb_common::affinity::{AffinityKey, AFFINITY6_MAP};
    let policy = "sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}";
    let mut h = harness_on_node_a(&local_manifest(policy));
    let first_port = port_for(BACKENDS[0], 6);
    let out = h.run(&Packet6::tcp(client(first_port), vip(80), TCP_SYN).build());
    assert_eq!(dst_of(&out.frame), BACKENDS[0]);
    let elsewhere = port_for(BACKENDS[1], 6);
    let syn = Packet6::tcp(client(elsewhere), vip(80), TCP_SYN);
    let out = h.run(&syn.build());
    let expected = syn.clone().to(at(BACKENDS[0], 8080)).build();
    assert_frame(
        &out.frame,
        &expected,
        "a port hashing to the other backend follows affinity",
    );

    // Other clients are balanced on their own: they reach both backends.
    let reached: std::collections::BTreeSet<Ipv6Addr> = (3..11)
        .map(|last| {
            let other = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, last);
            let out = h.run(&Packet6::tcp(at(other, 40600), vip(80), TCP_SYN).build());
            dst_of(&out.frame)
        })
        .collect();
    assert_eq!(reached.len(), 2, "clients spread over both backends");

    // The client's memory is its first flow's backend; once the timeout
    // has passed since its last connection, its flows are hashed again.
    let (_, first) = h
        .conntrack6()
        .into_iter()
        .find(|(k, _)| k.dir == CT_DIR_FORWARD && k.sport == first_port)
        .unwrap();
    let key = AffinityKey::new(CLIENT.octets(), first.rev_nat_id);
    let remembered = h.age_affinity(AFFINITY6_MAP, key, 31_000_000_000);
    assert_eq!(remembered.backend_id, first.backend_id);
    let again = (elsewhere + 1..45000)
        .find(|p| expected_backend(client(*p), vip(80), 6) == BACKENDS[1])
        .unwrap();
    let out = h.run(&Packet6::tcp(client(again), vip(80), TCP_SYN).build());
    assert_eq!(
        dst_of(&out.frame),
        BACKENDS[1],
        "expired affinity no longer applies"
    );

    // BACKENDS[1] (now remembered) leaves the Service: never chosen again.
    h.apply_yaml(&local_manifest(policy).replace(
        &format!("- addresses: [\"{}\"]\n  nodeName: node-a\n", BACKENDS[1]),
        "",
    ));
    for port in 46000..46010 {
        let out = h.run(&Packet6::tcp(client(port), vip(80), TCP_SYN).build());
        assert_eq!(
            dst_of(&out.frame),
            BACKENDS[0],
            "port {port}: to a current backend"
        );
    }
}

/// `loadBalancerSourceRanges` at an IPv6 load-balancer IP admit the
/// clients in its IPv6 prefixes only; with only IPv4 prefixes listed, it
/// admits nobody (its family has none); without ranges, everyone.
#[test]
fn ipv6_load_balancer_source_ranges_admit_only_their_clients() {
    let lb = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 1);
    let ranges = r#"loadBalancerSourceRanges: ["2001:db8:18::96/126", "2001:db8:18::100/128", "198.18.0.0/24"]"#;
    let yaml = |ranges: &str| {
        local_manifest(ranges)
            .replace("  clusterIP:", "  type: LoadBalancer\n  clusterIP:")
            .replacen(
                "\n---\n",
                &format!("\nstatus: {{loadBalancer: {{ingress: [{{ip: \"{lb}\"}}]}}}}\n---\n"),
                1,
            )
    };
    let mut h = harness_on_node_a(&yaml(ranges));
    let client_at = |last: u16| Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, last);
    for (client, admitted) in [
        (client_at(0x100), true),  // /128
        (client_at(0x97), true),   // in ::96/126
        (client_at(0x101), false), // outside both
        (Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0x100), false),
    ] {
        let syn = Packet6::tcp(at(client, 40000), at(lb, 80), TCP_SYN);
        let out = h.run_external(&syn.build());
        if admitted {
            assert_eq!(out.verdict, TCX_NEXT, "{client} admitted");
            assert_eq!(
                dst_of(&out.frame),
                expected_backend(at(client, 40000), at(lb, 80), 6)
            );
        } else {
            assert_eq!(out.verdict, TC_ACT_SHOT, "{client} dropped");
        }
    }
    assert_eq!(h.counter(Stat::DropSourceRange), 2);

    h.apply_yaml(&yaml(r#"loadBalancerSourceRanges: ["198.18.0.0/24"]"#));
    let syn = Packet6::tcp(at(client_at(0x100), 40001), at(lb, 80), TCP_SYN);
    assert_eq!(
        h.run_external(&syn.build()).verdict,
        TC_ACT_SHOT,
        "no IPv6 range: nobody"
    );

    h.apply_yaml(&yaml(""));
    let syn = Packet6::tcp(at(client_at(0x101), 40002), at(lb, 80), TCP_SYN);
    assert_eq!(
        h.run_external(&syn.build()).verdict,
        TCX_NEXT,
        "no ranges: everyone"
    );
    assert_eq!(h.counter(Stat::DropSourceRange), 3);
}

/// A router on the way (between node and backend, or node and client).
const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// What a packet too big quotes: as much as fits the minimum MTU.
const PTB_QUOTE: usize = 1280 - 40 - 8;

/// A TCP flow through the IPv6 cluster IP, its handshake seen both ways:
/// a full-sized segment of it, and its backend.
fn tcp_flow6(h: &Harness, from: SocketAddrV6) -> (Packet6, SocketAddrV6) {
    let syn = Packet6::tcp(from, vip(80), TCP_SYN);
    assert_eq!(h.run(&syn.build()).verdict, TCX_NEXT);
    let backend = at(expected_backend(from, vip(80), 6), 8080);
    h.run_egress(&syn.clone().to(backend).reply(TCP_SYN | TCP_ACK).build());
    let segment = Packet6::tcp(from, vip(80), TCP_ACK).with_payload(&[7; 1400]);
    (segment, backend)
}

/// PMTU over IPv6 (routers never fragment): a packet too big from a
/// router on the backend's path, about a segment DNATed to the backend,
/// reaches the client quoting the segment as the client sent it, to the
/// cluster IP — checksums (ICMPv6 with its pseudo-header, the quoted TCP)
/// from scratch.
#[test]
fn packet_too_big_on_the_backend_path_reaches_the_client_about_the_ipv6_cluster_ip() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let (segment, backend) = tcp_flow6(&h, client(42000));
    let at_backend = segment.clone().to(backend).build();
    let error = icmp6_error_quoting(
        &at_backend,
        PTB_QUOTE,
        ROUTER,
        CLIENT,
        ICMPV6_PACKET_TOO_BIG,
        0,
        1280,
    );
    let out = h.run_egress(&error);
    assert_eq!(out.verdict, TCX_NEXT);
    let expected = icmp6_error_quoting(
        &segment.build(),
        PTB_QUOTE,
        ROUTER,
        CLIENT,
        ICMPV6_PACKET_TOO_BIG,
        0,
        1280,
    );
    assert_frame(&out.frame, &expected, "packet too big about client → VIP");
    assert_eq!(h.counter(Stat::IcmpTranslated), 1);
}

/// The backend itself answers a UDP query with port unreachable: the
/// client gets it from the cluster IP, about its query to the cluster IP
/// (the quoted UDP checksum updated).
#[test]
fn port_unreachable_from_the_ipv6_backend_itself_comes_from_the_cluster_ip() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let query = Packet6::udp(client(42001), vip(53), b"who");
    h.run(&query.build());
    let backend = at(expected_backend(client(42001), vip(53), 17), 5353);
    let at_backend = query.clone().to(backend).build();
    let error = icmp6_error_quoting(
        &at_backend,
        PTB_QUOTE,
        *backend.ip(),
        CLIENT,
        ICMPV6_DEST_UNREACH,
        ICMPV6_PORT_UNREACH,
        0,
    );
    let out = h.run_egress(&error);
    let expected = icmp6_error_quoting(
        &query.build(),
        PTB_QUOTE,
        VIP6,
        CLIENT,
        ICMPV6_DEST_UNREACH,
        ICMPV6_PORT_UNREACH,
        0,
    );
    assert_frame(&out.frame, &expected, "port unreachable from the VIP");
}

/// A quote too short to hold the TCP checksum (the IPv6 header and 8
/// bytes) is translated all the same, without it.
#[test]
fn an_icmpv6_error_quoting_eight_bytes_is_translated_without_the_tcp_checksum() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let (segment, backend) = tcp_flow6(&h, client(42002));
    let at_backend = segment.clone().to(backend).build();
    let error = icmp6_error(&at_backend, ROUTER, CLIENT, ICMPV6_TIME_EXCEEDED, 0, 0);
    let out = h.run_egress(&error);
    let expected = icmp6_error(&segment.build(), ROUTER, CLIENT, ICMPV6_TIME_EXCEEDED, 0, 0);
    assert_frame(&out.frame, &expected, "time exceeded, 8 bytes quoted");
}

/// The other way: a router on the client's side returns packet too big
/// about a reply (cluster IP → client) to the cluster IP; at ingress it
/// becomes an error to the backend about its own reply.
#[test]
fn packet_too_big_about_a_reply_reaches_the_ipv6_backend_about_its_own_packet() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let (segment, backend) = tcp_flow6(&h, client(42003));
    let from_backend = segment
        .clone()
        .to(backend)
        .reply(TCP_ACK)
        .with_payload(&[9; 1400]);
    let as_sent = from_backend.clone().from(vip(80));
    let error = icmp6_error_quoting(
        &as_sent.build(),
        PTB_QUOTE,
        ROUTER,
        VIP6,
        ICMPV6_PACKET_TOO_BIG,
        0,
        1280,
    );
    let out = h.run(&error);
    assert_eq!(out.verdict, TCX_NEXT);
    let expected = icmp6_error_quoting(
        &from_backend.build(),
        PTB_QUOTE,
        ROUTER,
        *backend.ip(),
        ICMPV6_PACKET_TOO_BIG,
        0,
        1280,
    );
    assert_frame(
        &out.frame,
        &expected,
        "packet too big about backend → client",
    );
}

/// Errors about no flow of ours pass as they came, both ways, and so does
/// one carrying an extension header before the ICMPv6 header.
#[test]
fn icmpv6_errors_about_other_traffic_pass_untouched() {
    require_root();
    let mut h = Harness::new();
    h.apply_yaml(&manifest(false));
    let (segment, backend) = tcp_flow6(&h, client(42004));
    let stranger = Packet6::tcp(client(42005), at(BACKENDS[0], 8080), TCP_ACK).build();
    let about_stranger = icmp6_error(&stranger, ROUTER, CLIENT, ICMPV6_DEST_UNREACH, 3, 0);
    let ours = icmp6_error(
        &segment.clone().to(backend).build(),
        ROUTER,
        CLIENT,
        3,
        0,
        0,
    );
    // The same error with a destination-options header before the ICMPv6
    // one (next header 60, 8 bytes of padding).
    let mut with_options = ours[..54].to_vec();
    with_options[20] = NEXTHDR_DEST;
    let payload = u16::from_be_bytes([ours[18], ours[19]]) + 8;
    with_options[18..20].copy_from_slice(&payload.to_be_bytes());
    with_options.extend_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
    with_options.extend_from_slice(&ours[54..]);
    for (name, frame) in [
        ("about another flow", &about_stranger),
        ("behind an extension header", &with_options),
    ] {
        let out = h.run_egress(frame);
        assert_eq!(
            (out.verdict, &out.frame),
            (TCX_NEXT, frame),
            "{name}: egress"
        );
        let out = h.run(frame);
        assert_eq!(
            (out.verdict, &out.frame),
            (TCX_NEXT, frame),
            "{name}: ingress"
        );
    }
    assert_eq!(h.counter(Stat::IcmpTranslated), 0);
}

/// PMTU through a SNATed IPv6 node port: a router between node-a and
/// node-b's pod returns packet too big to node-a's SNAT address about a
/// SNATed segment; node-a's uplink translates it into the client's terms
/// (about its segment to the node port, from the router, to the client)
/// and routes it back to the client itself.
#[test]
fn packet_too_big_about_a_snated_ipv6_flow_is_routed_back_to_the_client() {
    let node = Node6::new("ptb-snat", None);
    let client = at(LAN_CLIENT, 40003);
    let node_port = at(NODE6, 30080);
    let syn = Packet6::tcp(client, node_port, TCP_SYN);
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_REDIRECT);
    let snat_port = node.snat_port_of(client);
    let segment = Packet6::tcp(client, node_port, TCP_ACK).with_payload(&[7; 1400]);
    let at_backend = snated(&segment, snat_port);
    let error = icmp6_error_quoting(
        &at_backend.build(),
        PTB_QUOTE,
        ROUTER,
        NODE6,
        ICMPV6_PACKET_TOO_BIG,
        0,
        1280,
    );
    let out = node.external(&error);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed by the datapath");
    // The quote keeps the hop limit the router saw (node-a's hop taken).
    let as_sent = Packet6 {
        hop_limit: at_backend.hop_limit,
        ..segment.clone()
    };
    let mut expected = icmp6_error_quoting(
        &as_sent.build(),
        PTB_QUOTE,
        ROUTER,
        LAN_CLIENT,
        ICMPV6_PACKET_TOO_BIG,
        0,
        1280,
    );
    expected[21] -= 1; // the error's own hop, node-a forwarding it
                       // MACs from the FIB: node-a's uplink to the client (neighbour unknown:
                       // `bpf_redirect_neigh` fills them on the way out).
    assert_eq!(
        &out.frame[12..],
        &expected[12..],
        "packet too big to the client"
    );
    assert_eq!(node.h.counter(Stat::IcmpTranslated), 1);
}
