//! The map ABI as the kernel sees it: field offsets (our alignchecker) and
//! a stable flow hash (a change would move flows after an upgrade).

use std::mem::offset_of;

use lb_common::{backend::Backend, ct::*, hash::*, revnat::RevNat, svc::*};

#[test]
fn field_offsets_match_the_documented_layout() {
    assert_eq!(
        (
            offset_of!(SvcKey, addr),
            offset_of!(SvcKey, port),
            offset_of!(SvcKey, slot),
            offset_of!(SvcKey, proto)
        ),
        (0, 4, 6, 8)
    );
    assert_eq!(
        (
            offset_of!(SvcValue, backend_id),
            offset_of!(SvcValue, count),
            offset_of!(SvcValue, rev_nat_id),
            offset_of!(SvcValue, local_count),
            offset_of!(SvcValue, flags),
            offset_of!(SvcValue, affinity_timeout_s)
        ),
        (0, 4, 6, 8, 10, 12)
    );
    assert_eq!(
        (
            offset_of!(Backend, addr),
            offset_of!(Backend, port),
            offset_of!(Backend, proto)
        ),
        (0, 4, 6)
    );
    assert_eq!(
        (
            offset_of!(RevNat, addr),
            offset_of!(RevNat, port),
            offset_of!(RevNat, proto)
        ),
        (0, 4, 6)
    );
    assert_eq!(
        (
            offset_of!(CtKey, saddr),
            offset_of!(CtKey, daddr),
            offset_of!(CtKey, sport),
            offset_of!(CtKey, dport),
            offset_of!(CtKey, proto),
            offset_of!(CtKey, dir)
        ),
        (0, 4, 8, 10, 12, 13)
    );
    assert_eq!(
        (
            offset_of!(CtValue, src_addr),
            offset_of!(CtValue, dst_addr),
            offset_of!(CtValue, src_port),
            offset_of!(CtValue, dst_port),
            offset_of!(CtValue, rev_nat_id),
            offset_of!(CtValue, flags),
            offset_of!(CtValue, backend_id),
            offset_of!(CtValue, flow_id),
            offset_of!(CtValue, created_ns),
            offset_of!(CtValue, expires_ns)
        ),
        (0, 4, 8, 10, 12, 14, 16, 20, 24, 32)
    );
}

#[test]
fn flow_hash_is_stable_and_spreads() {
    // A golden value: changing the hash moves flows to other backends
    // whenever conntrack entries are lost (agent upgrade, LRU eviction).
    assert_eq!(
        flow_hash(0x0201_12c6, 0x0a00_13c6, 0x3930, 0x5000, 6),
        0xf90b3fba
    );
    let mut counts = [0u32; 3];
    for port in 0..3000u16 {
        counts[usize::from(select_slot(
            flow_hash(1, 2, port.to_be(), 80u16.to_be(), 6),
            3,
        )) - 1] += 1;
    }
    assert!(
        counts.iter().all(|c| (800..1200).contains(c)),
        "uneven spread {counts:?}"
    );
}

#[test]
fn socket_hash_is_per_socket_and_spreads_consecutive_cookies() {
    assert_eq!(socket_hash(4242), socket_hash(4242));
    for count in [2u16, 3, 10] {
        let mut counts = vec![0u32; usize::from(count)];
        for cookie in 1000..4000u64 {
            counts[usize::from(select_slot(socket_hash(cookie), count)) - 1] += 1;
        }
        let even = 3000 / u32::from(count);
        assert!(
            counts.iter().all(|c| c.abs_diff(even) < even / 5),
            "uneven spread over {count}: {counts:?}"
        );
    }
}

#[test]
fn conntrack_state_picks_the_timeout() {
    let t = CtTimeouts::DEFAULT;
    assert_eq!(t.for_state(6, 0), t.tcp_opening_ns, "SYN sent, no answer");
    assert_eq!(
        t.for_state(6, CT_SEEN_REPLY),
        t.tcp_opening_ns,
        "answered, not yet assured: a spoofed handshake stays cheap"
    );
    let open = CT_SEEN_REPLY | CT_ASSURED;
    assert_eq!(t.for_state(6, open), t.tcp_established_ns);
    assert_eq!(
        t.for_state(6, open | CT_FIN_FORWARD),
        t.tcp_established_ns,
        "half-closed stays open"
    );
    assert_eq!(
        t.for_state(6, open | CT_FIN_FORWARD | CT_FIN_REPLY),
        t.tcp_closing_ns
    );
    assert_eq!(t.for_state(6, CT_RST), t.tcp_closing_ns);
    assert_eq!(
        t.for_state(6, CT_RST | CT_SNAT),
        t.tcp_snat_closing_ns,
        "a SNAT port outlives the backend's TIME_WAIT"
    );
    assert_eq!(t.for_state(6, open | CT_SNAT), t.tcp_established_ns);
    assert_eq!(t.for_state(17, 0), t.udp_ns);
    assert_eq!(t.for_state(17, CT_SEEN_REPLY), t.udp_ns);
    let v: CtValue = CtValue {
        expires_ns: 1_000,
        ..CtValue::default()
    };
    assert!(!v.is_expired(999) && v.is_expired(1_000));
}

#[test]
fn each_conntrack_entry_rebuilds_its_peer() {
    let (client, vip, backend) = ([198, 18, 1, 2], [198, 19, 0, 10], [198, 18, 10, 2]);
    let (cport, vport, bport) = (12345u16, 80u16, 8080u16);
    let forward_key = CtKey::new(client, cport, vip, vport, 6, CT_DIR_FORWARD);
    let forward = CtValue {
        src_addr: client,
        src_port: cport,
        dst_addr: backend,
        dst_port: bport,
        rev_nat_id: 7,
        backend_id: 9,
        flags: CT_SEEN_REPLY,
        created_ns: 5,
        expires_ns: 50,
        ..CtValue::default()
    };
    let reply_key = forward_key.peer_key(&forward);
    assert_eq!(
        reply_key,
        CtKey::new(backend, bport, client, cport, 6, CT_DIR_REPLY)
    );
    let reply = forward_key.peer_value(&forward);
    assert_eq!(
        (
            reply.src_addr,
            reply.src_port,
            reply.dst_addr,
            reply.dst_port
        ),
        (vip, vport, client, cport)
    );
    assert_eq!(
        (
            reply.rev_nat_id,
            reply.backend_id,
            reply.flags,
            reply.expires_ns
        ),
        (7, 9, CT_SEEN_REPLY, 50)
    );
    assert_eq!(reply_key.peer_key(&reply), forward_key);
    assert_eq!(reply_key.peer_value(&reply), forward);
}

#[test]
fn a_snat_flow_pairs_the_translated_tuples() {
    let (client, vip, backend, node) = (
        [198, 18, 1, 2],
        [198, 19, 0, 10],
        [198, 18, 10, 2],
        [198, 18, 0, 2],
    );
    let (cport, vport, bport, sport) = (12345u16, 80u16, 8080u16, 61518u16);
    let forward_key = CtKey::new(client, cport, vip, vport, 17, CT_DIR_FORWARD);
    let forward = CtValue {
        src_addr: node,
        src_port: sport,
        dst_addr: backend,
        dst_port: bport,
        flags: CT_SNAT,
        ..CtValue::default()
    };
    let reply_key = forward_key.peer_key(&forward);
    assert_eq!(
        reply_key,
        CtKey::new(backend, bport, node, sport, 17, CT_DIR_REPLY),
        "the backend answers the node"
    );
    let reply = forward_key.peer_value(&forward);
    assert_eq!(
        (
            reply.src_addr,
            reply.src_port,
            reply.dst_addr,
            reply.dst_port
        ),
        (vip, vport, client, cport),
        "the answer leaves from the frontend to the client"
    );
    assert_eq!(reply_key.peer_key(&reply), forward_key);
    assert_eq!(reply_key.peer_value(&reply), forward);
}

#[test]
fn snat_ports_are_the_inclusive_range_in_either_family() {
    let config = lb_common::config::NodeConfig::<lb_common::Ipv6> {
        snat_addr: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        snat_port_first: 61000,
        snat_port_last: 65000,
    };
    assert!(config.is_snat_port(61000));
    assert!(config.is_snat_port(65000));
    assert!(!config.is_snat_port(60999));
    assert!(!config.is_snat_port(65001));
    assert!(!lb_common::config::NodeConfig::<lb_common::Ipv4>::default().is_snat_port(1));
}

#[test]
fn every_map_name_carries_the_layout_version() {
    let suffix = format!("_v{}", lb_common::MAP_LAYOUT_VERSION);
    for name in [
        SVC_MAP,
        lb_common::backend::BACKEND_MAP,
        lb_common::revnat::REVNAT_MAP,
        CT_MAP,
        lb_common::stats::STATS_MAP,
        lb_common::config::CONFIG_MAP,
    ] {
        assert!(name.ends_with(&suffix), "{name} lacks {suffix}");
        assert!(
            name.len() < 16,
            "{name}: BPF object names are at most 15 bytes"
        );
    }
}

#[test]
fn a_flow_is_assured_by_the_backend_after_the_handshake_or_by_two_seconds_of_udp() {
    const SEC: u64 = 1_000_000_000;
    let entry = |flags| CtValue::<lb_common::Ipv4> {
        flags,
        created_ns: 10 * SEC,
        ..CtValue::default()
    };
    let (tcp, udp) = (6, 17);
    let now = 11 * SEC;
    let seen = CT_SEEN_REPLY;
    // TCP: the SYN-ACK (the first answer) does not; a client's ACK does not.
    assert!(!entry(0).assures(tcp, CT_DIR_REPLY, seen, true, now));
    assert!(!entry(seen).assures(tcp, CT_DIR_FORWARD, seen, false, now));
    assert!(
        !entry(seen).assures(tcp, CT_DIR_REPLY, seen, true, now),
        "SYN-ACK again"
    );
    assert!(
        !entry(seen).assures(tcp, CT_DIR_REPLY, seen | CT_RST, false, now),
        "RST"
    );
    assert!(
        entry(seen).assures(tcp, CT_DIR_REPLY, seen, false, now),
        "the backend's ACK"
    );
    assert!(!entry(seen | CT_ASSURED).assures(tcp, CT_DIR_REPLY, seen | CT_ASSURED, false, now));
    // UDP: answered and 2 s old, in either direction.
    assert!(
        !entry(0).assures(udp, CT_DIR_FORWARD, 0, false, 20 * SEC),
        "never answered"
    );
    assert!(
        !entry(seen).assures(udp, CT_DIR_FORWARD, seen, false, now),
        "1 s old"
    );
    assert!(entry(seen).assures(udp, CT_DIR_FORWARD, seen, false, 12 * SEC));
    assert!(
        entry(0).assures(udp, CT_DIR_REPLY, seen, false, 12 * SEC),
        "a late first answer"
    );
}
