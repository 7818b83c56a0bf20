//! Upgrading the agent across a map layout change. The previous layout's
//! maps (v3) are written here byte for byte as a v3 agent pinned them (with
//! bpftool, as an operator could); the agent must adopt them: a flow only
//! the old conntrack table knew keeps its backend, and the old pins go.
//! A layout it cannot migrate is refused before anything is attached.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_agent::datapath::migrate::Migration;
use lb_common::ct::{CtKey, CtValue, CT_MAP, CT_RST, CT_SEEN_REPLY};
use lb_tests::{
    netns::NetNs,
    require_root,
    servers::{http_get_from, BackendServers, EchoConnection},
    topology::{
        backend_ip, backend_ip6, service_manifest6, web_manifest, Agent, ScratchDir, Topology,
        CLIENT_IP, VIP, VIP6,
    },
    wait_until,
};

/// A pin directory removed whole on drop (declared before the agent, so it
/// goes after it), whatever a failed test left in it.
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pin dir");
        Self(dir)
    }

    /// Pins a new map, as `bpftool map create` does.
    fn create(&self, name: &str, kind: &str, key: usize, value: usize, entries: u32, flags: u32) {
        bpftool(&[
            "map",
            "create",
            &self.0.join(name).display().to_string(),
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
            "entries",
            &entries.to_string(),
            "name",
            name,
            "flags",
            &flags.to_string(),
        ]);
    }

    fn update(&self, name: &str, key: &[u8], value: &[u8]) {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
        let mut args = vec!["map".to_owned(), "update".into(), "pinned".into()];
        args.push(self.0.join(name).display().to_string());
        args.extend(["key".into(), "hex".into()]);
        args.extend(hex(key));
        args.extend(["value".into(), "hex".into()]);
        args.extend(hex(value));
        bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    fn pins_ending(&self, suffix: &str) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(suffix))
            .collect()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bpftool(args: &[&str]) {
    lb_tests::process::stdout_of(Command::new("bpftool").args(args));
}

/// The byte image of v3 entries: addresses and ports in network order,
/// every other integer native.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn addr(mut self, ip: Ipv4Addr) -> Self {
        self.0.extend(ip.octets());
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.0.extend(port.to_be_bytes());
        self
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend(v.to_ne_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_ne_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_ne_bytes());
        self
    }
    fn zeros(mut self, n: usize) -> Self {
        self.0.extend(std::iter::repeat_n(0, n));
        self
    }
}

/// A v3 datapath as a v3 agent left it: `VIP:80/TCP` → `backend`:8080
/// (backend id 1, rev-NAT id 1), one established flow from
/// `CLIENT_IP:client_port` to it, and the counters map.
fn pin_v3_datapath(pins: &PinDir, backend: Ipv4Addr, client_port: u16) {
    const NO_PREALLOC: u32 = 1;
    pins.create("lb_svc_v3", "hash", 12, 16, 1024, 0);
    pins.create("lb_backend_v3", "hash", 4, 8, 1024, 0);
    pins.create("lb_revnat_v3", "hash", 2, 136, 1024, NO_PREALLOC);
    pins.create("lb_ct_v3", "hash", 16, 40, 1024, NO_PREALLOC);
    pins.create("lb_stats_v3", "percpu_array", 4, 8, 25, 0);

    let frontend = |slot: u16| {
        Bytes::default()
            .addr(VIP)
            .port(80)
            .u16(slot)
            .u8(6)
            .zeros(3)
            .0
    };
    // Slot 0: count 1, rev-NAT id 1, flags SVC_FLAG_CLUSTER_IP.
    let slot0 = Bytes::default().u32(0).u16(1).u16(1).u16(0).u16(1).u32(0).0;
    pins.update("lb_svc_v3", &frontend(0), &slot0);
    pins.update(
        "lb_svc_v3",
        &frontend(1),
        &Bytes::default().u32(1).zeros(12).0,
    );
    let backend_value = Bytes::default().addr(backend).port(8080).u8(6).u8(0).0;
    pins.update("lb_backend_v3", &Bytes::default().u32(1).0, &backend_value);
    let mut owner = b"demo/web".to_vec();
    owner.resize(128, 0);
    let revnat = Bytes::default().addr(VIP).port(80).u8(6).u8(0).0;
    pins.update(
        "lb_revnat_v3",
        &Bytes::default().u16(1).0,
        &[revnat, owner].concat(),
    );

    let now = lb_agent::datapath::conntrack::monotonic_ns();
    for (key, value) in v3_flow(backend, client_port, CT_SEEN_REPLY, now, now + HOUR_NS) {
        pins.update("lb_ct_v3", &key, &value);
    }
}

const HOUR_NS: u64 = 3600 * 1_000_000_000;

/// The v3 entries (key, value) of the flow `CLIENT_IP:client_port` →
/// `VIP:80` at `backend:8080`, with these flags, creation time (v3's flow
/// identity, the same in both) and expiry.
fn v3_flow(
    backend: Ipv4Addr,
    client_port: u16,
    flags: u8,
    created_ns: u64,
    expires_ns: u64,
) -> [(Vec<u8>, Vec<u8>); 2] {
    let ct_key = |saddr, sport, daddr, dport, dir| {
        Bytes::default()
            .addr(saddr)
            .addr(daddr)
            .port(sport)
            .port(dport)
            .u8(6)
            .u8(dir)
            .zeros(2)
            .0
    };
    let ct_value = |src, sport, dst, dport| {
        Bytes::default()
            .addr(src)
            .addr(dst)
            .port(sport)
            .port(dport)
            .u16(1) // rev-NAT id
            .u8(flags)
            .u8(0)
            .u32(1) // backend id
            .u32(0)
            .u64(created_ns)
            .u64(expires_ns)
            .0
    };
    [
        (
            ct_key(CLIENT_IP, client_port, VIP, 80, 0),
            ct_value(CLIENT_IP, client_port, backend, 8080),
        ),
        (
            ct_key(backend, 8080, CLIENT_IP, client_port, 1),
            ct_value(VIP, 80, CLIENT_IP, client_port),
        ),
    ]
}

fn backend_name(body: &str) -> String {
    body.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

/// The backend a new flow gets (slot order is the sorted backends).
fn fresh_pick(backends: &[Ipv4Addr], src: SocketAddrV4, dst: SocketAddrV4) -> Ipv4Addr {
    use lb_common::hash::{flow_hash, select_slot};
    let hash = flow_hash(
        u32::from(*src.ip()).to_be(),
        u32::from(*dst.ip()).to_be(),
        src.port().to_be(),
        dst.port().to_be(),
        6,
    );
    let mut sorted = backends.to_vec();
    sorted.sort();
    sorted[usize::from(select_slot(hash, sorted.len() as u16)) - 1]
}

#[test]
fn upgrade_from_map_layout_v3_keeps_a_flow_only_the_old_table_knew() {
    require_root();
    let current = [backend_ip(0), backend_ip(1), backend_ip(2)];
    // A client port a fresh pick would send elsewhere than backend 2: only
    // the migrated entry takes it there.
    let vip = SocketAddrV4::new(VIP, 80);
    let from = |port| SocketAddrV4::new(CLIENT_IP, port);
    let client_port = (40_000..41_000)
        .find(|p| fresh_pick(&current, from(*p), vip) != backend_ip(2))
        .expect("a port");
    let topology = Topology::new("lbup", 3).expect("topology");
    let _servers: Vec<BackendServers> = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new("lbup-manifests").expect("scratch dir");
    // The Service has backends 0, 1 and 2; the old datapath's flow went to 2.
    let ready: Vec<(Ipv4Addr, bool)> = current.iter().map(|b| (*b, true)).collect();
    manifests.write("web.yaml", &web_manifest(&ready)).unwrap();
    let pins = PinDir::new("lbup-test");
    pin_v3_datapath(&pins, backend_ip(2), client_port);

    let mut agent = Agent::start(
        &topology.node,
        &manifests.0,
        &topology.interface_pattern(),
        &pins.0,
        &manifests.0.join("agent.log"),
        &[],
    )
    .expect("agent");
    agent
        .wait_for_maps("the Service's current backends", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(3)
        })
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || pins
            .pins_ending("_v3")
            .is_empty()),
        "the v3 pins stay: {:?}\n{}",
        pins.pins_ending("_v3"),
        agent.log_text()
    );

    // The old flow's next connection (a SYN on its established tuple, its
    // backend still there) reaches that backend, not a fresh pick, and the
    // answers come back from the VIP.
    let connect = || {
        topology
            .client
            .run(|| http_get_from(from(client_port), vip))
    };
    let body = connect().expect("the migrated flow");
    assert_eq!(backend_name(&body), "be2", "{body}");
    // Once that connection has closed, the tuple's next connection is a
    // new flow: the fresh pick.
    let body = connect().expect("a new flow on the tuple");
    let fresh = fresh_pick(&current, from(client_port), vip);
    let index = current.iter().position(|b| *b == fresh).unwrap();
    assert_eq!(backend_name(&body), format!("be{index}"), "{body}");
}

/// Between the agent's two migration stages the old programs still run
/// first and go on updating the v3 entries of flows the first stage
/// copied. The second brings those copies up to date: a flow the client
/// reset meanwhile is closing in the new table too, with its short expiry,
/// not established for another hour.
#[test]
fn a_flow_the_old_programs_close_during_the_handover_is_closed_after_it() {
    require_root();
    let pins = PinDir::new("lbup-refresh");
    pin_v3_datapath(&pins, backend_ip(2), 40_100);
    let _datapath = lb_agent::datapath::loader::load(
        Some(&pins.0),
        lb_agent::datapath::loader::MapSizes::default(),
        &lb_agent::datapath::loader::Globals::DEFAULT,
    )
    .expect("the v4 datapath, pinned beside the v3 one");
    let migration = Migration::pending(&pins.0).expect("v3 pins");
    let adopted = migration.adopt().expect("stage 1");
    assert_eq!(adopted.flows, 2);

    // The old program sees the client's RST on the flow.
    let now = lb_agent::datapath::conntrack::monotonic_ns();
    let closing = now + 10 * 1_000_000_000;
    let created = read_v4_flow(&pins)[0].1.created_ns;
    for (key, value) in v3_flow(
        backend_ip(2),
        40_100,
        CT_SEEN_REPLY | CT_RST,
        created,
        closing,
    ) {
        pins.update("lb_ct_v3", &key, &value);
    }
    let ((), finished) = migration.finish(|| ());
    let finished = finished.expect("stage 2");
    assert_eq!((finished.flows, finished.flows_refreshed), (0, 2));
    for (key, value) in read_v4_flow(&pins) {
        assert_eq!(value.flags, CT_SEEN_REPLY | CT_RST, "{key:?}");
        assert_eq!(value.expires_ns, closing, "{key:?}");
    }
    assert!(pins.pins_ending("_v3").is_empty(), "the v3 pins go");
}

/// The flow's two entries in the new conntrack table.
fn read_v4_flow(pins: &PinDir) -> Vec<(CtKey, CtValue)> {
    let data = MapData::from_pin(pins.0.join(CT_MAP)).expect("v4 conntrack pin");
    let map: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::HashMap(data)).expect("a hash map");
    let entries: Vec<(CtKey, CtValue)> = map.iter().map(|e| e.expect("entry")).collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    entries
}

#[test]
fn a_map_layout_it_cannot_migrate_is_refused_before_anything_is_attached() {
    require_root();
    let node = NetNs::new("lbup2-node").expect("netns");
    let manifests = ScratchDir::new("lbup2-manifests").expect("scratch dir");
    manifests.write("web.yaml", &web_manifest(&[])).unwrap();
    let pins = PinDir::new("lbup2-test");
    pins.create("lb_svc_v2", "hash", 12, 16, 16, 0);

    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg(lb_tests::topology::agent_binary())
        .args(["run", "--manifests"])
        .arg(&manifests.0)
        .args([
            "--interfaces",
            "lo",
            "--metrics-bind-address",
            "",
            "--pin-dir",
        ])
        .arg(&pins.0)
        .output()
        .expect("lb-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    // The message names what it found and the command that recovers.
    for needle in ["lb_svc_v2", &format!("rm -r {}", pins.0.display())] {
        assert!(stderr.contains(needle), "no {needle:?} in: {stderr}");
    }
    assert_eq!(
        pins.pins_ending("_v2"),
        ["lb_svc_v2"],
        "the old pin is kept"
    );
    assert!(
        pins.pins_ending("_v4").is_empty() && !Path::new(&pins.0.join("links")).exists(),
        "nothing created or attached"
    );
}

/// The socket LB reverse map of map layout v4 before its entries were
/// slotted (an LRU, `lb_sock_rnat_v4`) goes at load: nothing reads it, and
/// nothing would delete its entries.
#[test]
fn the_unslotted_socket_lb_map_is_removed_at_load() {
    require_root();
    let pins = PinDir::new("lbup-unslotted");
    pins.create(
        lb_common::sock::SOCK_REVNAT_LRU_MAP,
        "lru_hash",
        16,
        8,
        64,
        0,
    );
    let _datapath = lb_agent::datapath::loader::load(
        Some(&pins.0),
        lb_agent::datapath::loader::MapSizes::default(),
        &lb_agent::datapath::loader::Globals::DEFAULT,
    )
    .expect("the datapath");
    assert!(!pins.0.join(lb_common::sock::SOCK_REVNAT_LRU_MAP).exists());
    assert!(pins.0.join(lb_common::sock::SOCK_REVNAT_MAP).exists());
}

/// An agent from before IPv6 pinned the IPv4 maps alone, in today's layout
/// (no IPv4 map changed with IPv6: its state is in maps of its own, so the
/// layout version stays v4). A new agent upgrades in place: it adopts those
/// pins as at any restart (nothing rewritten), an established connection
/// keeps its backend through the handover, and the IPv6 maps are created
/// beside them to serve IPv6 cluster IPs.
#[test]
fn upgrade_from_an_agent_without_ipv6_maps_keeps_its_flows_in_place() {
    require_root();
    let topology = Topology::new("lbuq", 2).expect("topology");
    topology.add_ipv6().expect("IPv6 addresses");
    let mut servers: Vec<BackendServers> = topology.serve_backends("be").expect("servers");
    for (i, ns) in topology.backends.iter().enumerate() {
        let six = BackendServers::start_on(ns, backend_ip6(i), &format!("be{i}"), 8080, 5353);
        servers.push(six.expect("IPv6 servers"));
    }
    let manifests = ScratchDir::new("lbuq-manifests").expect("scratch dir");
    let ready = [(backend_ip(0), true), (backend_ip(1), true)];
    manifests.write("web.yaml", &web_manifest(&ready)).unwrap();
    let pins = PinDir::new("lbuq-test");
    let start = |log: &str| {
        Agent::start(
            &topology.node,
            &manifests.0,
            &topology.interface_pattern(),
            &pins.0,
            &manifests.0.join(log),
            &["--keep-datapath", "--log-format", "json"],
        )
        .expect("agent")
    };
    let mut old = start("old.log");
    old.wait_for_maps("the IPv4 Service", |m| {
        m.count(&format!("{VIP}:80/TCP")) == Some(2)
    })
    .unwrap();
    let mut conn = topology
        .client
        .run(|| EchoConnection::open(SocketAddrV4::new(VIP, 80)))
        .expect("connect");
    let backend = conn.ask().unwrap();
    assert!(old.stop().unwrap().success(), "{}", old.log_text());

    // What an agent without IPv6 leaves: the same IPv4 pins, no IPv6 map.
    let ipv6_maps = pins.pins_ending("6_v4");
    assert!(ipv6_maps.len() >= 10, "{ipv6_maps:?}");
    for name in &ipv6_maps {
        std::fs::remove_file(pins.0.join(name)).unwrap();
    }
    assert!(pins.0.join(CT_MAP).exists());
    assert_eq!(conn.ask().expect("served by the pinned programs"), backend);
    // `inspect` of this version says whose pins these are.
    for what in ["services", "conntrack"] {
        let out = Command::new(lb_tests::topology::agent_binary())
            .args(["inspect", what, "--pin-dir"])
            .arg(&pins.0)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("pinned by an lb-agent without IPv6 maps"),
            "inspect {what}: {stderr}"
        );
    }

    // The new agent, with an IPv6 Service beside the IPv4 one.
    manifests
        .write(
            "web6.yaml",
            &service_manifest6("web6", VIP6, &[backend_ip6(0), backend_ip6(1)]),
        )
        .unwrap();
    let mut new = start("new.log");
    new.wait_for_maps("both Services", |m| {
        m.count(&format!("{VIP}:80/TCP")) == Some(2)
            && m.count(&format!("[{VIP6}]:80/TCP")) == Some(2)
    })
    .unwrap();
    let released = "released links pinned by a previous run";
    wait_until(lb_tests::EVENT_TIMEOUT, || {
        new.log_event(released).is_some()
    });
    let first = new.log_event("applied").expect("an applied pass");
    let counts = ["added", "updated", "removed", "unchanged"].map(|k| first[k].as_u64());
    assert_eq!(
        counts,
        [Some(2), Some(0), Some(0), Some(2)],
        "the IPv4 frontends adopted, the IPv6 ones added:\n{}",
        new.log_text()
    );
    assert_eq!(
        conn.ask().expect("the established flow across the upgrade"),
        backend
    );
    let mut missing: Vec<&String> = ipv6_maps
        .iter()
        .filter(|name| !pins.0.join(name).exists())
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "IPv6 maps not pinned again: {missing:?}"
    );
    let body = topology
        .client
        .run(|| lb_tests::servers::http_get(std::net::SocketAddr::from((VIP6, 80))))
        .expect("the IPv6 Service");
    assert!(body.starts_with("backend be"), "{body}");
    drop(conn);
    drop(servers);
}
