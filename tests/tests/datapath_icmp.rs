//! ICMP errors about translated flows, through the real programs with
//! BPF_PROG_TEST_RUN: each output frame byte for byte against the error the
//! receiver would get had there been no translation (checksums computed
//! from scratch), in both directions.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    hash::{flow_hash, select_slot},
    stats::Stat,
};
use lb_tests::{
    datapath::Harness,
    packet::{assert_frame, icmp_error, Packet, TCP_ACK, TCP_SYN},
    require_root,
    topology::{web_manifest, CLIENT_IP as CLIENT, VIP},
};

const TCX_NEXT: u32 = u32::MAX;
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 10, 2), Ipv4Addr::new(198, 18, 11, 2)];
/// A router on the way (between node and backend, or node and client).
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 1);
const DEST_UNREACH: u8 = 3;
const PORT_UNREACH: u8 = 3;
const FRAG_NEEDED: u8 = 4;
const TIME_EXCEEDED: u8 = 11;

fn setup() -> Harness {
    let mut h = Harness::new();
    let ready: Vec<(Ipv4Addr, bool)> = BACKENDS.iter().map(|b| (*b, true)).collect();
    h.apply_yaml(&web_manifest(&ready));
    h
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

/// The backend the program picks for `client → VIP:port`.
fn backend_of(src: SocketAddrV4, port: u16, proto: u8, backend_port: u16) -> SocketAddrV4 {
    let hash = flow_hash(
        u32::from(*src.ip()).to_be(),
        u32::from(VIP).to_be(),
        src.port().to_be(),
        port.to_be(),
        proto,
    );
    let slot = usize::from(select_slot(hash, BACKENDS.len() as u16)) - 1;
    SocketAddrV4::new(BACKENDS[slot], backend_port)
}

/// A TCP flow through the VIP, its handshake seen both ways.
fn tcp_flow(h: &Harness, from: SocketAddrV4) -> (Packet, SocketAddrV4) {
    let syn = Packet::tcp(from, SocketAddrV4::new(VIP, 80), TCP_SYN);
    assert_eq!(h.run(&syn.build()).verdict, TCX_NEXT);
    let backend = backend_of(from, 80, 6, 8080);
    let at_backend = syn.clone().to(backend);
    h.run_egress(&at_backend.reply(TCP_SYN | TCP_ACK).build());
    (
        Packet::tcp(from, SocketAddrV4::new(VIP, 80), TCP_ACK).with_payload(&[7; 1400]),
        backend,
    )
}

#[test]
fn frag_needed_on_the_backend_path_reaches_the_client_about_the_vip() {
    require_root();
    let h = setup();
    let (segment, backend) = tcp_flow(&h, client(41000));
    // A 1440-byte segment to the backend was too big for a router's link.
    let at_backend = segment.clone().to(backend);
    let error = icmp_error(
        ROUTER,
        CLIENT,
        DEST_UNREACH,
        FRAG_NEEDED,
        1280,
        &at_backend,
        Some(128),
    );
    let out = h.run_egress(&error);
    assert_eq!(out.verdict, TCX_NEXT);
    let expected = icmp_error(
        ROUTER,
        CLIENT,
        DEST_UNREACH,
        FRAG_NEEDED,
        1280,
        &segment,
        Some(128),
    );
    assert_frame(
        &out.frame,
        &expected,
        "frag needed, quoted segment client → VIP",
    );
    assert_eq!(h.counter(Stat::IcmpTranslated), 1);
}

#[test]
fn port_unreachable_from_the_backend_itself_comes_from_the_vip() {
    require_root();
    let h = setup();
    let query = Packet::udp(client(41001), SocketAddrV4::new(VIP, 53), b"who");
    h.run(&query.build());
    let backend = backend_of(client(41001), 53, 17, 5353);
    let at_backend = query.clone().to(backend);
    // The backend has no socket on the port: it answers with the error.
    let error = icmp_error(
        *backend.ip(),
        CLIENT,
        DEST_UNREACH,
        PORT_UNREACH,
        0,
        &at_backend,
        None,
    );
    let out = h.run_egress(&error);
    let expected = icmp_error(VIP, CLIENT, DEST_UNREACH, PORT_UNREACH, 0, &query, None);
    assert_frame(
        &out.frame,
        &expected,
        "port unreachable from the VIP about client → VIP",
    );
}

#[test]
fn time_exceeded_quoting_only_eight_bytes_is_translated_without_the_tcp_checksum() {
    require_root();
    let h = setup();
    let (segment, backend) = tcp_flow(&h, client(41002));
    let at_backend = segment.clone().to(backend);
    // RFC 792 routers quote the IP header and 8 bytes: no TCP checksum.
    let error = icmp_error(ROUTER, CLIENT, TIME_EXCEEDED, 0, 0, &at_backend, Some(8));
    let out = h.run_egress(&error);
    let expected = icmp_error(ROUTER, CLIENT, TIME_EXCEEDED, 0, 0, &segment, Some(8));
    assert_frame(&out.frame, &expected, "time exceeded, 8 bytes quoted");
}

#[test]
fn an_error_from_the_client_side_about_a_reply_reaches_the_backend() {
    require_root();
    let h = setup();
    let (segment, backend) = tcp_flow(&h, client(41003));
    // The backend's reply, as the client saw it (from the VIP), was too big
    // for a link on the client's side.
    let reply_seen = segment.reply(TCP_ACK).with_payload(&[9; 1400]);
    let error = icmp_error(
        ROUTER,
        VIP,
        DEST_UNREACH,
        FRAG_NEEDED,
        1280,
        &reply_seen,
        Some(64),
    );
    let out = h.run(&error);
    assert_eq!(out.verdict, TCX_NEXT);
    // The backend knows its reply as backend → client.
    let reply_sent = reply_seen.clone().from(backend);
    let expected = icmp_error(
        ROUTER,
        *backend.ip(),
        DEST_UNREACH,
        FRAG_NEEDED,
        1280,
        &reply_sent,
        Some(64),
    );
    assert_frame(
        &out.frame,
        &expected,
        "frag needed to the backend about backend → client",
    );
    assert_eq!(h.counter(Stat::IcmpTranslated), 1);
}

#[test]
fn errors_about_untracked_packets_pass_untouched() {
    require_root();
    let h = setup();
    let other = Packet::tcp(client(41004), SocketAddrV4::new(BACKENDS[0], 8080), TCP_SYN);
    let error = icmp_error(ROUTER, CLIENT, DEST_UNREACH, PORT_UNREACH, 0, &other, None);
    assert_eq!(h.run_egress(&error).frame, error);
    let to_vip = icmp_error(
        ROUTER,
        VIP,
        DEST_UNREACH,
        PORT_UNREACH,
        0,
        &other.reply(0),
        None,
    );
    assert_eq!(h.run(&to_vip).frame, to_vip);
    assert_eq!(h.counter(Stat::IcmpTranslated), 0);
}
