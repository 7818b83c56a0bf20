//! Datapath tests for traffic from outside the node (the external ingress
//! program on uplinks): node ports, SNAT to other nodes' backends and its
//! reverse, the node-local traffic policies. Crafted packets through the
//! real programs with BPF_PROG_TEST_RUN, exact bytes and checksums.
//!
//! SNATed packets are routed by the program itself (FIB lookup, then
//! `bpf_redirect_neigh`), so the runs happen inside a namespace that has
//! the node's routes: `198.18.0.2/24` on the LAN, the other node's pods
//! `198.18.11.0/24` via `198.18.0.3`.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::{
    datapath::{loader::FamilyCidrs, maps::LbMaps},
    model::{L4Addr, Proto},
};
use lb_common::{
    config::NodeConfig,
    ct::{CtKey, CtValue, CT_ASSURED, CT_DIR_FORWARD, CT_DIR_REPLY, CT_SNAT},
    hash::{flow_hash, select_slot},
    stats::Stat,
    svc::SvcValue,
};
use lb_tests::{
    datapath::{Harness, RunResult},
    netns::NetNs,
    packet::{assert_frame, checksum, icmp_error, Packet, TCP_ACK, TCP_SYN},
    require_root,
};

const TCX_NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 5);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const SNAT_PORTS: (u16, u16) = (1024, 29999);

/// Service `web`: NodePort (TCP 80 → 8080 at 30080, UDP 53 → 5353 at
/// 30053) with the given endpoints as (address, node).
fn manifest(policies: &str, endpoints: &[(Ipv4Addr, &str)]) -> String {
    lb_tests::cluster::web_service("NodePort", CLUSTER_IP, policies, "", endpoints)
}

/// The node's namespace (routes for the redirect) and a datapath
/// programmed for node `node-a` with `yaml`.
struct Node {
    ns: NetNs,
    h: Harness,
}

impl Node {
    fn new(name: &str, yaml: &str) -> Self {
        Self::with_globals(name, yaml, &lb_agent::datapath::loader::Globals::DEFAULT)
    }

    fn with_globals(name: &str, yaml: &str, globals: &lb_agent::datapath::loader::Globals) -> Self {
        require_root();
        let ns = NetNs::new(&format!("dpx-{name}")).unwrap();
        // A veth pair stands in for the uplink (no dummy driver everywhere).
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "lan0",
        ])
        .unwrap();
        ns.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "address", &mac_text(NODE_A_MAC)])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        ns.ip(&["link", "set", "lan0", "up"]).unwrap();
        // node-b's neighbour entry is known (MACs written by the program);
        // the client's is not (left to bpf_redirect_neigh).
        ns.ip(&[
            "neigh",
            "add",
            "198.18.0.3",
            "lladdr",
            &mac_text(NODE_B_MAC),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
        .unwrap();
        ns.ip(&["route", "add", "198.18.11.0/24", "via", "198.18.0.3"])
            .unwrap();
        // A pod interface: this node's pods 198.18.10.0/24, the backend's
        // neighbour entry known.
        ns.ip(&[
            "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
        ])
        .unwrap();
        ns.ip(&["addr", "add", "198.18.10.1/24", "dev", "pod0"])
            .unwrap();
        ns.ip(&["link", "set", "pod0", "address", &mac_text(POD_GATEWAY_MAC)])
            .unwrap();
        for dev in ["pod0", "pod0p"] {
            ns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        ns.ip(&[
            "neigh",
            "add",
            &LOCAL_BACKEND.to_string(),
            "lladdr",
            &mac_text(LOCAL_BACKEND_MAC),
            "dev",
            "pod0",
            "nud",
            "permanent",
        ])
        .unwrap();
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let mut h = Harness::with_globals(globals);
        h.node = lb_agent::desired::NodeContext {
            name: Some("node-a".into()),
            nodeport_addresses: vec![NODE_IP.into()],
            zone: None,
            ..Default::default()
        };
        h.set_node_config(NodeConfig {
            snat_addr: NODE_IP.octets(),
            snat_port_first: SNAT_PORTS.0,
            snat_port_last: SNAT_PORTS.1,
        });
        h.apply_yaml(yaml);
        Self { ns, h }
    }

    /// Through the uplink's ingress program, inside the node's namespace.
    fn external(&self, frame: &[u8]) -> RunResult {
        let h = &self.h;
        self.ns.run(|| h.run_external(frame))
    }

    /// Through a pod interface's ingress program.
    fn internal(&self, frame: &[u8]) -> RunResult {
        let h = &self.h;
        self.ns.run(|| h.run(frame))
    }

    fn forward_entry(&self, client: SocketAddrV4, frontend: SocketAddrV4) -> CtValue {
        let key = CtKey::new(
            client.ip().octets(),
            client.port(),
            frontend.ip().octets(),
            frontend.port(),
            6,
            CT_DIR_FORWARD,
        );
        let proto_key = |p| CtKey { proto: p, ..key };
        self.h
            .conntrack()
            .into_iter()
            .find(|(k, _)| *k == proto_key(6) || *k == proto_key(17))
            .map(|(_, v)| v)
            .expect("forward conntrack entry")
    }
}

fn node_port(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE_IP, port)
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, port)
}

fn hash_of(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> u32 {
    flow_hash(
        u32::from(*src.ip()).to_be(),
        u32::from(*dst.ip()).to_be(),
        src.port().to_be(),
        dst.port().to_be(),
        proto,
    )
}

/// Client ports whose new flows to `dst` take slot `slot` of `choices`.
fn ports_for_slot(
    dst: SocketAddrV4,
    proto: u8,
    slot: u16,
    choices: u16,
) -> impl Iterator<Item = u16> {
    (40000..42000).filter(move |p| select_slot(hash_of(client(*p), dst, proto), choices) == slot)
}

/// A client port whose new flow to `dst` takes slot `slot` of `choices`.
fn port_for_slot(dst: SocketAddrV4, proto: u8, slot: u16, choices: u16) -> u16 {
    ports_for_slot(dst, proto, slot, choices)
        .next()
        .expect("a port for every slot")
}

/// A SYN from client port `cport` to node port 30080 goes through the
/// node's stack to the local backend, DNAT only (client address kept).
fn syn_reaches_the_local_backend_unsnated(node: &Node, cport: u16) -> Packet {
    let syn = Packet::tcp(client(cport), node_port(30080), TCP_SYN);
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT, "through the node's stack to the pod");
    let local = SocketAddrV4::new(LOCAL_BACKEND, 8080);
    assert_frame(&out.frame, &syn.clone().to(local).build(), "DNAT only");
    assert_eq!(node.h.counter(Stat::SnatNew), 0);
    syn
}

/// The SNAT port a flow got, checked to lie in the configured range.
fn snat_port_of(node: &Node, client: SocketAddrV4, frontend: SocketAddrV4) -> u16 {
    let entry = node.forward_entry(client, frontend);
    assert_ne!(entry.flags & CT_SNAT, 0, "SNATed");
    assert_eq!(entry.src_addr, NODE_IP.octets());
    let port = entry.src_port;
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port),
        "{port} outside {SNAT_PORTS:?}"
    );
    port
}

/// Rewrites the node config to SNAT into `first..=last` only.
fn snat_ports(node: &mut Node, first: u16, last: u16) {
    node.h.set_node_config(NodeConfig {
        snat_addr: NODE_IP.octets(),
        snat_port_first: first,
        snat_port_last: last,
    });
}

/// A conntrack reply entry holding SNAT port `port` towards the remote
/// backend, expiring at `expires_ns`.
fn hold_port(node: &mut Node, port: u16, flags: u8, expires_ns: u64) {
    let key = CtKey::new(
        REMOTE_BACKEND.octets(),
        8080,
        NODE_IP.octets(),
        port,
        6,
        CT_DIR_REPLY,
    );
    node.h.set_conntrack(
        &key,
        Some(CtValue {
            flags,
            expires_ns,
            ..CtValue::default()
        }),
    );
}

/// Forwarded by the datapath itself: one hop, as the kernel would count it.
fn hop(mut packet: Packet) -> Packet {
    packet.ttl -= 1;
    packet
}

const NODE_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];
const POD_GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x1];
const LOCAL_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x2];

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Forwarded to node-b, whose neighbour entry is known: one hop, and the
/// Ethernet header from node-a's uplink to node-b.
fn to_node_b(packet: Packet) -> Packet {
    Packet {
        src_mac: NODE_A_MAC,
        dst_mac: NODE_B_MAC,
        ..hop(packet)
    }
}

const BOTH: [(Ipv4Addr, &str); 2] = [(LOCAL_BACKEND, "node-a"), (REMOTE_BACKEND, "node-b")];

#[test]
fn nodeport_to_a_remote_backend_is_snated_both_ways_with_exact_bytes() {
    let node = Node::new("snat", &manifest("", &BOTH));
    // Local backends take slot 1, the remote one slot 2.
    let cport = port_for_slot(node_port(30080), 6, 2, 2);
    let syn = Packet::tcp(client(cport), node_port(30080), TCP_SYN).with_payload(b"hello");
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed by the datapath");

    let snat_port = snat_port_of(&node, client(cport), node_port(30080));
    let remote = SocketAddrV4::new(REMOTE_BACKEND, 8080);
    let at_backend = to_node_b(syn.clone().from(node_port(snat_port)).to(remote));
    assert_frame(
        &out.frame,
        &at_backend.build(),
        "SYN to the other node's pod",
    );

    // The pod answers the node; the answer leaves from the node port to the client.
    let answer = at_backend.reply(TCP_SYN | TCP_ACK).with_payload(b"world");
    let answer = Packet { ttl: 64, ..answer };
    let out = node.external(&answer.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let to_client = hop(answer.clone().from(node_port(30080)).to(client(cport)));
    assert_frame(&out.frame, &to_client.build(), "SYN-ACK back to the client");

    // The rest of the connection follows the same entries.
    let ack = Packet::tcp(client(cport), node_port(30080), TCP_ACK);
    let out = node.external(&ack.build());
    assert_frame(
        &out.frame,
        &to_node_b(ack.clone().from(node_port(snat_port)).to(remote)).build(),
        "ACK",
    );
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

/// A TCP super-packet to a node port whose backend is on another node:
/// the MTU check must judge each segment, as the device will send them,
/// also when the driver left the segment count 0 (virtio-net, xen).
#[test]
fn a_gso_super_packet_is_checked_per_segment_on_the_snat_path() {
    let node = Node::new("gso", &manifest("", &BOTH));
    // Client ports whose flows go to the remote backend (slot 2 of 2).
    let mut ports =
        (40000..41000).filter(|p| select_slot(hash_of(client(*p), node_port(30080), 6), 2) == 2);
    let payload = vec![0x61u8; 2 * 1400];
    let mut frame = || {
        let port = ports.next().expect("a port for the remote slot");
        Packet::tcp(client(port), node_port(30080), TCP_ACK)
            .with_payload(&payload)
            .build()
    };
    let too_big = |out: &RunResult| {
        out.verdict == TC_ACT_REDIRECT && out.frame[23] == 1 && out.frame[34..36] == [3, 4]
    };
    let routed = |out: &RunResult| {
        out.verdict == TC_ACT_REDIRECT
            && out.frame[..6] == NODE_B_MAC
            && out.frame[30..34] == REMOTE_BACKEND.octets()
    };
    // Without GSO, 2 840 bytes with DF do not fit the uplink's 1 500.
    let out = node.external(&frame());
    assert!(too_big(&out), "{:02x?}", &out.frame[..40]);

    // As two 1 400-byte segments (1 440 bytes each), with the count as
    // the driver leaves it (0) or as the stack fills it in (2): routed.
    for count in [0, 2] {
        let frame = frame();
        let out = node.ns.run(|| node.h.run_external_gso(&frame, 1400, count));
        assert!(routed(&out), "gso_segs {count}: {:02x?}", &out.frame[..40]);
    }
    assert_eq!(node.h.counter(Stat::IcmpFragNeeded), 1);

    // Segments that do not fit (1 510 bytes) are still answered as too big.
    let frame = frame();
    let out = node.ns.run(|| node.h.run_external_gso(&frame, 1470, 0));
    assert!(too_big(&out), "{:02x?}", &out.frame[..40]);
    assert_eq!(node.h.counter(Stat::IcmpFragNeeded), 2);
}

#[test]
fn udp_nodeport_to_a_remote_backend_is_snated_with_checksums() {
    let node = Node::new("udp", &manifest("", &BOTH));
    let cport = port_for_slot(node_port(30053), 17, 2, 2);
    let query = Packet::udp(client(cport), node_port(30053), b"query, odd length");
    let out = node.external(&query.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let snat_port = snat_port_of(&node, client(cport), node_port(30053));
    let remote = SocketAddrV4::new(REMOTE_BACKEND, 5353);
    let at_backend = to_node_b(query.clone().from(node_port(snat_port)).to(remote));
    assert_frame(&out.frame, &at_backend.build(), "UDP query");

    let answer = Packet {
        ttl: 64,
        ..at_backend.reply(0).with_payload(b"answer")
    };
    let out = node.external(&answer.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out.frame,
        &hop(answer.clone().from(node_port(30053)).to(client(cport))).build(),
        "UDP answer",
    );
}

/// The other node's pod has no socket on the port and answers the SNATed
/// query with port unreachable, from its own address to node-a's SNAT
/// port. Translated, the error comes from the node port — node-a's own
/// address — so the stack would drop it as a martian: the program routes it
/// to the client, as it does the flow's answers.
/// A fragmented datagram to a node port whose backend is on another node:
/// every fragment is SNATed and routed to node-b by the program, the later
/// ones by the first one's record; the backend's fragmented answer comes
/// back to the client the same way. Exact bytes.
#[test]
fn a_fragmented_udp_datagram_through_a_snated_node_port_is_routed_both_ways() {
    let node = Node::new("ufrag", &manifest("", &BOTH));
    let cport = port_for_slot(node_port(30053), 17, 2, 2);
    let payload: Vec<u8> = (0..2500u32).map(|i| (i % 253) as u8).collect();
    let mut query = Packet::udp(client(cport), node_port(30053), &payload);
    query.frag = 0;
    let pieces = query.fragments(1472);
    let out = node.external(&pieces[0]);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let snat_port = snat_port_of(&node, client(cport), node_port(30053));
    let remote = SocketAddrV4::new(REMOTE_BACKEND, 5353);
    let at_backend = to_node_b(query.clone().from(node_port(snat_port)).to(remote));
    let expected = at_backend.fragments(1472);
    assert_frame(&out.frame, &expected[0], "first fragment");
    let out = node.external(&pieces[1]);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(&out.frame, &expected[1], "later fragment");

    let answer = Packet {
        ttl: 64,
        id: 0x5151,
        ..at_backend.reply(0).with_payload(&payload[..2000])
    };
    let expected = hop(answer.clone().from(node_port(30053)).to(client(cport))).fragments(1472);
    for (i, piece) in answer.fragments(1472).iter().enumerate() {
        let out = node.external(piece);
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "answer fragment {i}");
        assert_frame(&out.frame, &expected[i], &format!("answer fragment {i}"));
    }
    assert_eq!(
        (
            node.h.counter(Stat::SnatNew),
            node.h.counter(Stat::RevSnat),
            node.h.counter(Stat::FragTranslated)
        ),
        (1, 1, 2)
    );
}

#[test]
fn port_unreachable_from_a_remote_backend_is_routed_to_the_client_of_a_node_port() {
    let node = Node::new("unreach", &manifest("", &BOTH));
    let cport = port_for_slot(node_port(30053), 17, 2, 2);
    let query = Packet::udp(client(cport), node_port(30053), b"query");
    node.external(&query.build());
    let snat_port = snat_port_of(&node, client(cport), node_port(30053));
    let at_backend = query
        .clone()
        .from(node_port(snat_port))
        .to(SocketAddrV4::new(REMOTE_BACKEND, 5353));
    let error = icmp_error(REMOTE_BACKEND, NODE_IP, 3, 3, 0, &at_backend, None);
    let out = node.external(&error);
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed by the datapath");
    let mut expected = icmp_error(NODE_IP, CLIENT_IP, 3, 3, 0, &query, None);
    // One hop: TTL 64 → 63, the header checksum anew.
    expected[22] -= 1;
    expected[24..26].fill(0);
    let ip_csum = checksum(&expected[14..34], 0);
    expected[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    assert_frame(
        &out.frame,
        &expected,
        "port unreachable from the node port about client → node port",
    );
    assert_eq!(node.h.counter(Stat::IcmpTranslated), 1);
}

/// Two sends on one socket from two CPUs at once, through a node port to
/// another node's backend: each CPU picks a SNAT port, and the one that
/// writes the forward entry second adopts the other's and drops its own
/// reply entry. Both packets leave from one port; no orphan entry holds a
/// second port. Some rounds must race for the test to count.
#[test]
fn a_snated_flow_created_on_two_cpus_at_once_holds_one_port() {
    const ROUNDS: u16 = 1000;
    let node = Node::new("race", &manifest("", &[(REMOTE_BACKEND, "node-b")]));
    let query = |round: u32| Packet::udp(client(20000 + round as u16), node_port(30053), b"query");
    let sent = [(); 2].map(|_| std::sync::Mutex::new(vec![Vec::new(); ROUNDS.into()]));
    node.ns.run(|| {
        lb_tests::on_two_cpus(ROUNDS.into(), |round, cpu| {
            let out = node.h.run_external(&query(round).build());
            sent[cpu].lock().unwrap()[round as usize] = out.frame;
        })
    });
    let [on_0, on_1] = sent.map(|s| s.into_inner().unwrap());
    let ct = node.h.conntrack();
    let replies: Vec<_> = ct.iter().filter(|(k, _)| k.dir == CT_DIR_REPLY).collect();
    for round in 0..u32::from(ROUNDS) {
        let from = client(20000 + round as u16);
        let (_, forward) = ct
            .iter()
            .find(|(k, _)| k.dir == CT_DIR_FORWARD && k.sport == from.port())
            .expect("the forward entry");
        let held: Vec<_> = replies
            .iter()
            .filter(|(_, v)| v.dst_port == from.port())
            .collect();
        assert_eq!(
            held.len(),
            1,
            "round {round}: SNAT ports held for one flow: {:?}",
            held.iter().map(|(k, _)| k.dport).collect::<Vec<_>>()
        );
        let (reply_key, reply) = held[0];
        assert!(reply_key.dport == forward.src_port && forward.same_flow(reply));
        let at_backend = to_node_b(
            query(round)
                .from(node_port(forward.src_port))
                .to(SocketAddrV4::new(REMOTE_BACKEND, 5353)),
        )
        .build();
        assert_frame(
            &on_0[round as usize],
            &at_backend,
            "the query sent on CPU 0",
        );
        assert_frame(
            &on_1[round as usize],
            &at_backend,
            "the query sent on CPU 1",
        );
    }
    let raced = node.h.counter(Stat::CtCreateRaced);
    eprintln!("{raced} of {ROUNDS} rounds raced to create their flow");
    assert!(raced > 0, "no round raced: nothing was tested");
}

#[test]
fn nodeport_to_a_local_backend_keeps_the_client_address() {
    let node = Node::new("local", &manifest("", &BOTH));
    let syn =
        syn_reaches_the_local_backend_unsnated(&node, port_for_slot(node_port(30080), 6, 1, 2));
    let local = SocketAddrV4::new(LOCAL_BACKEND, 8080);

    // The pod's answer is reverse-NATed on its way out of the uplink.
    let answer = syn.clone().to(local).reply(TCP_SYN | TCP_ACK);
    let out = node.h.run_egress(&answer.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(
        &out.frame,
        &answer.clone().from(node_port(30080)).build(),
        "answer from the node port",
    );
}

/// While this node's local count grows, a slot holds its new local
/// backend before slot 0 counts it (the agent writes slots first; here
/// slot 0 is set back to count no local slot). The packet judges the
/// backend by the slot's own role: an external flow to it keeps its client
/// address rather than being SNATed to a local pod. A slot without a role
/// (written by an agent before roles) is still judged by its place.
#[test]
fn a_local_backend_above_the_published_local_count_is_not_snated() {
    let mut node = Node::new("grow", &manifest("", &BOTH));
    let frontend = L4Addr {
        addr: NODE_IP.into(),
        port: 30080,
        proto: Proto::Tcp,
    };
    let maps = node.h.reconciler.maps_mut();
    let head = maps.snapshot().unwrap().slots[&(frontend, 0)];
    assert_eq!((head.count, head.local_count), (2, 1));
    maps.put_slot(
        frontend,
        0,
        SvcValue {
            local_count: 0,
            ..head
        },
    )
    .unwrap();
    syn_reaches_the_local_backend_unsnated(&node, port_for_slot(node_port(30080), 6, 1, 2));

    // Slots without a role, slot 0 whole again: judged by place.
    let maps = node.h.reconciler.maps_mut();
    let slots = maps.snapshot().unwrap().slots;
    for slot in [0, 1, 2] {
        let value = slots[&(frontend, slot)];
        let value = match slot {
            0 => head,
            _ => SvcValue { flags: 0, ..value },
        };
        maps.put_slot(frontend, slot, value).unwrap();
    }
    // Slot 1, within the local count: DNAT only (a port not used above).
    let slot_1 = ports_for_slot(node_port(30080), 6, 1, 2).nth(1).unwrap();
    syn_reaches_the_local_backend_unsnated(&node, slot_1);
    let syn = Packet::tcp(
        client(port_for_slot(node_port(30080), 6, 2, 2)),
        node_port(30080),
        TCP_SYN,
    );
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_REDIRECT);
    assert_eq!(node.h.counter(Stat::SnatNew), 1, "slot 2, past it: SNATed");
}

#[test]
fn etp_local_uses_only_local_endpoints_and_keeps_the_source() {
    let node = Node::new("etplocal", &manifest("externalTrafficPolicy: Local", &BOTH));
    for cport in 40000..40020 {
        let syn = Packet::tcp(client(cport), node_port(30080), TCP_SYN);
        let out = node.external(&syn.build());
        assert_eq!(out.verdict, TCX_NEXT);
        assert_frame(
            &out.frame,
            &syn.clone()
                .to(SocketAddrV4::new(LOCAL_BACKEND, 8080))
                .build(),
            "to the local endpoint, client address kept",
        );
    }
    assert_eq!(node.h.counter(Stat::SnatNew), 0);

    // A pod reaching the same node port is not external: every endpoint.
    let to_remote = (40000..41000)
        .map(|p| SocketAddrV4::new(POD_IP, p))
        .find(|src| select_slot(hash_of(*src, node_port(30080), 6), 2) == 2)
        .unwrap();
    let syn = Packet::tcp(to_remote, node_port(30080), TCP_SYN);
    let out = node.internal(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(
        &out.frame,
        &syn.clone()
            .to(SocketAddrV4::new(REMOTE_BACKEND, 8080))
            .build(),
        "pod to node port: any endpoint, no SNAT",
    );
}

#[test]
fn etp_local_without_a_local_endpoint_drops_external_traffic() {
    let node = Node::new(
        "etpnone",
        &manifest(
            "externalTrafficPolicy: Local",
            &[(REMOTE_BACKEND, "node-b")],
        ),
    );
    let syn = Packet::tcp(client(40000), node_port(30080), TCP_SYN);
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_SHOT);
    assert_eq!(node.h.counter(Stat::DropNoLocalBackend), 1);
    // The cluster IP still reaches every endpoint.
    let syn = Packet::tcp(
        SocketAddrV4::new(POD_IP, 40000),
        SocketAddrV4::new(CLUSTER_IP, 80),
        TCP_SYN,
    );
    let out = node.internal(&syn.build());
    assert_frame(
        &out.frame,
        &syn.clone()
            .to(SocketAddrV4::new(REMOTE_BACKEND, 8080))
            .build(),
        "cluster IP to the remote endpoint",
    );
}

#[test]
fn itp_local_drops_cluster_ip_traffic_without_a_local_endpoint() {
    let node = Node::new(
        "itplocal",
        &manifest(
            "internalTrafficPolicy: Local",
            &[(REMOTE_BACKEND, "node-b")],
        ),
    );
    let syn = Packet::tcp(
        SocketAddrV4::new(POD_IP, 40000),
        SocketAddrV4::new(CLUSTER_IP, 80),
        TCP_SYN,
    );
    assert_eq!(node.internal(&syn.build()).verdict, TC_ACT_SHOT);
    assert_eq!(node.h.counter(Stat::DropNoLocalBackend), 1);
    // externalTrafficPolicy stays Cluster: the node port still serves (SNATed).
    let syn = Packet::tcp(client(40000), node_port(30080), TCP_SYN);
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_REDIRECT);
}

#[test]
fn a_snat_port_in_use_is_skipped_and_exhaustion_is_counted() {
    let mut node = Node::new("ports", &manifest("", &[(REMOTE_BACKEND, "node-b")]));
    let remote = SocketAddrV4::new(REMOTE_BACKEND, 8080);
    // Two ports, one held by a live assured flow: every new flow (recorded
    // in the other table) gets the other.
    snat_ports(&mut node, 20000, 20001);
    hold_port(&mut node, 20000, CT_SNAT | CT_ASSURED, u64::MAX);
    let syn = Packet::tcp(client(40000), node_port(30080), TCP_SYN);
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out.frame,
        &to_node_b(syn.clone().from(node_port(20001)).to(remote)).build(),
        "the free port",
    );

    // Both held (one by that new flow, not yet assured): the next new flow
    // is dropped and counted, never sent with a colliding tuple.
    let syn = Packet::tcp(client(40001), node_port(30080), TCP_SYN);
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_SHOT);
    assert_eq!(node.h.counter(Stat::DropSnatExhausted), 1);

    // No SNAT address at all: the same.
    node.h.set_node_config(NodeConfig::default());
    let syn = Packet::tcp(client(40002), node_port(30080), TCP_SYN);
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_SHOT);
    assert_eq!(node.h.counter(Stat::DropSnatExhausted), 2);
}

#[test]
fn a_node_port_inside_the_snat_range_is_never_a_snat_port() {
    let mut node = Node::new("overlap", &manifest("", &[(REMOTE_BACKEND, "node-b")]));
    // The range holds the Service's own node port and one other port.
    snat_ports(&mut node, 30080, 30081);
    for cport in 40000..40008 {
        let syn = Packet::tcp(client(cport), node_port(30080), TCP_SYN);
        node.external(&syn.build());
    }
    // Only 30081 was free: the first flow got it, the others found no port.
    assert_eq!(node.h.counter(Stat::SnatNew), 1);
    let entry = node.forward_entry(client(40000), node_port(30080));
    assert_eq!(entry.src_port, 30081);
    assert_eq!(node.h.counter(Stat::DropSnatExhausted), 7);
    // The answer on 30081 reaches its client.
    let answer = Packet::tcp(
        SocketAddrV4::new(REMOTE_BACKEND, 8080),
        node_port(30081),
        TCP_SYN | TCP_ACK,
    );
    let out = node.external(&answer.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(node.h.counter(Stat::RevSnat), 1);
}

/// Ports node processes listen on sit inside the SNAT range (the kubelet's
/// 10250, the API server's 6443, node exporter's 9100): a port on which a
/// node socket would take the flow's answers is never a SNAT port, TCP or
/// UDP, and is used again once the socket is gone.
#[test]
fn a_port_a_node_socket_is_bound_to_is_never_a_snat_port() {
    let mut node = Node::new("sockets", &manifest("", &[(REMOTE_BACKEND, "node-b")]));
    snat_ports(&mut node, 10250, 10251);
    let bound = (NODE_IP, 10250);
    let (kubelet, udp) = node.ns.run(|| {
        (
            std::net::TcpListener::bind(bound).unwrap(),
            std::net::UdpSocket::bind(bound).unwrap(),
        )
    });
    for (proto, frontend) in [(6, node_port(30080)), (17, node_port(30053))] {
        let packet = |cport| match proto {
            6 => Packet::tcp(client(cport), frontend, TCP_SYN),
            _ => Packet::udp(client(cport), frontend, b"query"),
        };
        let exhausted = node.h.counter(Stat::DropSnatExhausted);
        for cport in 40000..40004 {
            node.external(&packet(cport).build());
        }
        // Only 10251 was free of sockets: the first flow got it, the
        // others (to the same backend port) found no port.
        assert_eq!(
            snat_port_of(&node, client(40000), frontend),
            10251,
            "protocol {proto}"
        );
        assert_eq!(
            node.h.counter(Stat::DropSnatExhausted) - exhausted,
            3,
            "protocol {proto}"
        );
    }
    drop((kubelet, udp));
    // Closed, the port is free again. A process another test thread forks
    // at that moment holds a copy of the socket until it execs: a new flow
    // may find it still bound for that instant, so new clients try again.
    let mut cport = 40010;
    let freed = lb_tests::wait_until(lb_tests::EVENT_TIMEOUT, || {
        cport += 1;
        let syn = Packet::tcp(client(cport), node_port(30080), TCP_SYN);
        node.external(&syn.build()).verdict == TC_ACT_REDIRECT
    });
    assert!(freed, "no flow got the freed port");
    assert_eq!(snat_port_of(&node, client(cport), node_port(30080)), 10250);
}

#[test]
fn untracked_packets_to_the_snat_ports_pass_untouched() {
    let node = Node::new("untracked", &manifest("", &BOTH));
    let stray = Packet::tcp(
        SocketAddrV4::new(REMOTE_BACKEND, 8080),
        node_port(62000),
        TCP_ACK,
    );
    let out = node.external(&stray.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(&out.frame, &stray.build(), "untouched");
    assert_eq!(node.h.counter(Stat::RevSnat), 0);
}

#[test]
fn client_ip_affinity_returns_to_the_backend_while_it_is_current() {
    use lb_common::affinity::{AffinityKey, AFFINITY_MAP};
    let three = [
        (LOCAL_BACKEND, "node-a"),
        (REMOTE_BACKEND, "node-b"),
        (Ipv4Addr::new(198, 18, 11, 3), "node-b"),
    ];
    let policy =
        "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}";
    let mut node = Node::new("affinity", &manifest(policy, &three));
    let vip = SocketAddrV4::new(CLUSTER_IP, 80);
    let pod = |port| SocketAddrV4::new(POD_IP, port);
    let backend_of =
        |out: &RunResult| Ipv4Addr::new(out.frame[30], out.frame[31], out.frame[32], out.frame[33]);
    let first = backend_of(&node.internal(&Packet::tcp(pod(40000), vip, TCP_SYN).build()));
    for port in 40001..40030 {
        let out = node.internal(&Packet::tcp(pod(port), vip, TCP_SYN).build());
        assert_eq!(
            backend_of(&out),
            first,
            "port {port} follows the client's affinity"
        );
    }
    // Another client is balanced on its own.
    let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 10, 6), 40000);
    node.internal(&Packet::tcp(other, vip, TCP_SYN).build());

    // The timeout passed since the client's last connection: hashing again.
    let key = AffinityKey::new(POD_IP.octets(), {
        let flows = node.h.conntrack();
        flows
            .iter()
            .find(|(k, _)| k.dir == CT_DIR_FORWARD)
            .unwrap()
            .1
            .rev_nat_id
    });
    node.h.age_affinity(AFFINITY_MAP, key, 31_000_000_000);
    let port = (41000..42000)
        .find(|p| {
            let slot = select_slot(hash_of(pod(*p), vip, 6), 3);
            // slot order: the local backend, then the remote ones sorted
            let by_slot = [three[0].0, three[1].0, three[2].0];
            by_slot[usize::from(slot) - 1] != first
        })
        .unwrap();
    let out = node.internal(&Packet::tcp(pod(port), vip, TCP_SYN).build());
    let second = backend_of(&out);
    assert_ne!(second, first, "expired affinity no longer applies");
    // …and the new choice is remembered.
    let out = node.internal(&Packet::tcp(pod(port + 1000), vip, TCP_SYN).build());
    assert_eq!(backend_of(&out), second);

    // The remembered backend leaves the Service: never chosen again.
    let remaining: Vec<(Ipv4Addr, &str)> = three
        .iter()
        .copied()
        .filter(|(b, _)| *b != second)
        .collect();
    node.h.apply_yaml(&manifest(policy, &remaining));
    for port in 43000..43020 {
        let out = node.internal(&Packet::tcp(pod(port), vip, TCP_SYN).build());
        assert_eq!(out.verdict, TCX_NEXT);
        assert!(
            remaining.iter().any(|(b, _)| *b == backend_of(&out)),
            "port {port}: to a current backend"
        );
    }
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let lb = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 1), 80);
    let yaml = manifest(
        "loadBalancerSourceRanges: [\"198.18.0.96/30\", \"198.18.0.100/32\"]",
        &[(LOCAL_BACKEND, "node-a")],
    )
    .replace("type: NodePort", "type: LoadBalancer");
    let yaml = yaml.replacen(
        "\n---\n",
        "\nstatus: {loadBalancer: {ingress: [{ip: 198.19.1.1}]}}\n---\n",
        1,
    );
    let mut node = Node::new("ranges", &yaml);
    for (client_ip, admitted) in [
        (CLIENT_IP, true),                       // 198.18.0.100/32
        (Ipv4Addr::new(198, 18, 0, 97), true),   // in 198.18.0.96/30
        (Ipv4Addr::new(198, 18, 0, 101), false), // outside both
        (Ipv4Addr::new(198, 18, 1, 100), false),
    ] {
        let syn = Packet::tcp(SocketAddrV4::new(client_ip, 40000), lb, TCP_SYN);
        let out = node.external(&syn.build());
        if admitted {
            assert_eq!(out.verdict, TCX_NEXT, "{client_ip} admitted");
            assert_frame(
                &out.frame,
                &syn.clone()
                    .to(SocketAddrV4::new(LOCAL_BACKEND, 8080))
                    .build(),
                "DNAT",
            );
        } else {
            assert_eq!(out.verdict, TC_ACT_SHOT, "{client_ip} dropped");
        }
    }
    assert_eq!(node.h.counter(Stat::DropSourceRange), 2);
    // The node port of the same Service is not restricted (as kube-proxy).
    let syn = Packet::tcp(
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 101), 40000),
        node_port(30080),
        TCP_SYN,
    );
    assert_eq!(node.external(&syn.build()).verdict, TCX_NEXT);

    // Ranges removed: everyone is admitted again.
    node.h.apply_yaml(&yaml.replace(
        "loadBalancerSourceRanges: [\"198.18.0.96/30\", \"198.18.0.100/32\"]",
        "",
    ));
    let syn = Packet::tcp(
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 101), 40001),
        lb,
        TCP_SYN,
    );
    assert_eq!(node.external(&syn.build()).verdict, TCX_NEXT);
}

#[test]
fn an_expired_flows_snat_port_is_taken_back_but_a_closed_one_waits() {
    use lb_common::ct::CT_RST;
    let mut node = Node::new("reclaim", &manifest("", &[(REMOTE_BACKEND, "node-b")]));
    snat_ports(&mut node, 20000, 20000);
    // The only port belongs to a connection that was reset: the backend may
    // still hold the tuple in TIME_WAIT, so the port is not taken back.
    hold_port(&mut node, 20000, CT_SNAT | CT_RST | CT_ASSURED, u64::MAX);
    let syn = Packet::tcp(client(40000), node_port(30080), TCP_SYN);
    assert_eq!(node.external(&syn.build()).verdict, TC_ACT_SHOT);
    assert_eq!(node.h.counter(Stat::CtReclaimed), 0);
    assert_eq!(node.h.counter(Stat::DropSnatExhausted), 1);

    // Its flow expired (the GC has not run yet): the port is taken back.
    hold_port(&mut node, 20000, CT_SNAT | CT_RST | CT_ASSURED, 1);
    let syn = Packet::tcp(client(40001), node_port(30080), TCP_SYN);
    let out = node.external(&syn.build());
    let remote = SocketAddrV4::new(REMOTE_BACKEND, 8080);
    assert_frame(
        &out.frame,
        &to_node_b(syn.clone().from(node_port(20000)).to(remote)).build(),
        "the reclaimed port",
    );
    assert_eq!(node.h.counter(Stat::CtReclaimed), 1);

    // Taken back from either table: the flow just made is not yet assured;
    // expired, its port goes to the next one too.
    let holder = node.h.conntrack();
    let (reply_key, _) = holder
        .iter()
        .find(|(k, _)| k.dir == CT_DIR_REPLY && k.dport == 20000)
        .expect("the new flow holds the port");
    assert_eq!(
        node.h
            .conntrack_table(lb_common::ct::CT_NEW_MAP)
            .iter()
            .filter(|(k, _)| k == reply_key)
            .count(),
        1
    );
    hold_port(&mut node, 20000, CT_SNAT, 1);
    let syn = Packet::tcp(client(40002), node_port(30080), TCP_SYN);
    assert_frame(
        &node.external(&syn.build()).frame,
        &to_node_b(syn.clone().from(node_port(20000)).to(remote)).build(),
        "the port reclaimed from the table of new flows",
    );
    assert_eq!(node.h.counter(Stat::CtReclaimed), 2);
}

/// Hairpin: the only endpoint reaches its own Service and lands on
/// itself. Its SYN comes back to it from the node's SNAT address (a packet
/// from its own address would be a martian to it), routed out of its
/// interface by the program; its answer, to the SNAT port, is matched at
/// that interface's ingress and leaves from the cluster IP. Exact bytes.
#[test]
fn a_pod_reaching_itself_through_its_service_is_snated_both_ways_with_exact_bytes() {
    let node = Node::new("hairpin", &manifest("", &[(LOCAL_BACKEND, "node-a")]));
    let pod = SocketAddrV4::new(LOCAL_BACKEND, 40000);
    let vip = SocketAddrV4::new(CLUSTER_IP, 80);
    let syn = Packet::tcp(pod, vip, TCP_SYN).with_payload(b"hello");
    let out = node.internal(&syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed back to the pod");
    let snat_port = snat_port_of(&node, pod, vip);
    let to_pod = |p: Packet| Packet {
        src_mac: POD_GATEWAY_MAC,
        dst_mac: LOCAL_BACKEND_MAC,
        ..hop(p)
    };
    let backend = SocketAddrV4::new(LOCAL_BACKEND, 8080);
    let at_pod = to_pod(syn.clone().from(node_port(snat_port)).to(backend));
    assert_frame(&out.frame, &at_pod.build(), "SYN from the node to itself");

    let answer = Packet {
        ttl: 64,
        ..at_pod.reply(TCP_SYN | TCP_ACK).with_payload(b"world")
    };
    let out = node.internal(&answer.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out.frame,
        &to_pod(answer.clone().from(vip).to(pod)).build(),
        "SYN-ACK from the cluster IP",
    );
    assert_eq!(
        (
            node.h.counter(Stat::DnatNew),
            node.h.counter(Stat::SnatNew),
            node.h.counter(Stat::RevSnat)
        ),
        (1, 1, 1)
    );
    // Another pod of the node is not SNATed: DNAT only, through the stack.
    let other = SocketAddrV4::new(POD_IP, 40001);
    let syn = Packet::tcp(other, vip, TCP_SYN);
    let out = node.internal(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT);
    assert_frame(&out.frame, &syn.clone().to(backend).build(), "DNAT only");
    assert_eq!(node.h.counter(Stat::SnatNew), 1);
}

/// A service CIDR routed into the cluster: at the uplink, a new flow to a
/// cluster IP whose backend is on another node is SNATed to the node (as
/// kube-proxy masquerades sources outside the cluster CIDR), both ways;
/// a source in `--cluster-cidr` keeps its address.
#[test]
fn a_cluster_ip_reached_from_outside_the_cluster_cidr_is_snated_both_ways() {
    let yaml = manifest("", &[(REMOTE_BACKEND, "node-b")]);
    let vip = SocketAddrV4::new(CLUSTER_IP, 80);
    let remote = SocketAddrV4::new(REMOTE_BACKEND, 8080);
    let node = Node::new("cip-out", &yaml);
    let syn = Packet::tcp(client(40000), vip, TCP_SYN);
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let snat_port = snat_port_of(&node, client(40000), vip);
    let at_backend = to_node_b(syn.clone().from(node_port(snat_port)).to(remote));
    assert_frame(
        &out.frame,
        &at_backend.build(),
        "SYN to the other node's pod",
    );
    let answer = Packet {
        ttl: 64,
        ..at_backend.reply(TCP_SYN | TCP_ACK)
    };
    let out = node.external(&answer.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out.frame,
        &hop(answer.clone().from(vip).to(client(40000))).build(),
        "SYN-ACK from the cluster IP",
    );
    drop(node);

    // The client is the cluster's.
    let cidrs = FamilyCidrs::new(&["198.18.0.0/24".parse().unwrap()]).unwrap();
    let globals = lb_agent::datapath::loader::Globals {
        cluster_cidrs: cidrs,
        ..lb_agent::datapath::loader::Globals::DEFAULT
    };
    let node = Node::with_globals("cip-in", &yaml, &globals);
    let out = node.external(&syn.build());
    assert_eq!(out.verdict, TCX_NEXT, "through the stack");
    assert_frame(&out.frame, &syn.clone().to(remote).build(), "DNAT only");
    assert_eq!(node.h.counter(Stat::SnatNew), 0);
}
