//! Socket LB end to end: client processes placed in a test cgroup (never
//! the machine's root cgroup) in a pod or the node's namespace; the agent's
//! cgroup programs attached to that cgroup only. Real TCP and UDP.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use lb_common::stats::Stat;
use lb_tests::{
    cgroup::TestCgroup,
    netns::NetNs,
    require_root,
    servers::{BackendServers, EchoConnection},
    topology::{
        backend_ip, service_manifest6, web_manifest, Agent, ScratchDir, Topology, CLIENT_IP, VIP,
        VIP6,
    },
    wait_until,
};

/// The hooks socket LB attaches: four sock_addr ones and sock_release.
const SOCKET_LB_LINKS: usize = lb_agent::datapath::SOCK_PROGRAMS.len() + 1;

struct Setup {
    agent: Agent,
    _manifests: ScratchDir,
    _servers: Vec<BackendServers>,
    topology: Topology,
    /// Dropped last: its programs are detached with the agent.
    cgroup: TestCgroup,
}

/// `n` backends serving, the agent with socket LB at a test cgroup.
fn setup(prefix: &str, n: usize, ready: &[usize], socket_lb: bool) -> Setup {
    setup_with(prefix, n, ready, mode(socket_lb), |m| m, &[])
}

/// `--socket-lb`'s value for on (every namespace) or off.
fn mode(socket_lb: bool) -> &'static str {
    if socket_lb {
        "all"
    } else {
        "off"
    }
}

/// `setup`, with the manifest passed through `edit` first and `args` for
/// the agent.
fn setup_with(
    prefix: &str,
    n: usize,
    ready: &[usize],
    socket_lb: &str,
    edit: impl Fn(String) -> String,
    args: &[&str],
) -> Setup {
    require_root();
    let cgroup = TestCgroup::new(prefix).expect("cgroup");
    let topology = Topology::new(prefix, n).expect("topology");
    let servers = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new(&format!("{prefix}-manifests")).expect("scratch dir");
    let backends: Vec<(Ipv4Addr, bool)> = ready.iter().map(|i| (backend_ip(*i), true)).collect();
    manifests
        .write("web.yaml", &edit(web_manifest(&backends)))
        .expect("manifest");
    let cgroup_path = cgroup.path.to_string_lossy().into_owned();
    let flag = format!("--socket-lb={socket_lb}");
    let mut agent_args = vec![flag.as_str(), "--cgroup-path", &cgroup_path];
    agent_args.extend_from_slice(args);
    let mut agent = Agent::start(
        &topology.node,
        &manifests.0,
        &topology.interface_pattern(),
        &PathBuf::from(format!("/sys/fs/bpf/{prefix}-test")),
        &manifests.0.join("agent.log"),
        &agent_args,
    )
    .expect("agent");
    agent
        .wait_for_maps("the service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(ready.len())
        })
        .expect("programmed");
    Setup {
        agent,
        _manifests: manifests,
        _servers: servers,
        topology,
        cgroup,
    }
}

impl Setup {
    /// The pinned cgroup links.
    fn cgroup_pins(&self) -> Vec<String> {
        std::fs::read_dir(self.agent.pin_dir.join("links"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("cgroup-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts the next agent on the pins of the current one, which must
    /// have been killed (pins left behind). With socket LB, waits until its
    /// links are attached and the old run's released.
    fn start_next_agent(&mut self, socket_lb: bool) {
        let old_pins = self.cgroup_pins();
        self.agent.cleanup_pins = false;
        let cgroup_path = self.cgroup.path.to_string_lossy().into_owned();
        let flag = format!("--socket-lb={socket_lb}");
        self.agent = Agent::start(
            &self.topology.node,
            &self._manifests.0,
            &self.topology.interface_pattern(),
            &self.agent.pin_dir,
            &self._manifests.0.join("agent-next.log"),
            &[&flag, "--cgroup-path", &cgroup_path],
        )
        .unwrap();
        if !socket_lb {
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while {
            let pins = self.cgroup_pins();
            pins.len() != SOCKET_LB_LINKS || pins.iter().any(|p| old_pins.contains(p))
        } {
            assert!(
                std::time::Instant::now() < deadline,
                "socket LB links not replaced: {:?}\n{}",
                self.cgroup_pins(),
                self.agent.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Entries in the socket LB reverse table.
    fn socket_entries(&self) -> u64 {
        lb_agent::datapath::fill::datapath_tables(&self.agent.pin_dir)
            .unwrap()
            .into_iter()
            .find(|(name, _)| *name == lb_common::sock::SOCK_REVNAT_MAP)
            .unwrap()
            .1
    }

    fn counter(&self, stat: Stat) -> u64 {
        lb_agent::cli::inspect::counters(&self.agent.pin_dir)
            .unwrap()
            .into_iter()
            .find(|(name, _)| *name == lb_common::stats::STAT_NAMES[stat as usize])
            .unwrap()
            .1
    }
}

/// A client process in the test cgroup, spoken to line by line; it ends
/// at EOF on its stdin, when this is dropped.
struct Conversation {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Conversation {
    fn start(s: &Setup, ns: &NetNs, code: &str) -> Self {
        let mut child = s.cgroup.spawn_python(ns, code).unwrap();
        Self {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    /// Sends one line, returns the next line the client prints.
    fn say(&mut self, line: &str) -> String {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
        self.hear()
    }

    fn hear(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

use lb_tests::cgroup::TCP_CLIENT;

#[test]
fn socket_lb_translates_connect_and_getpeername_shows_the_vip() {
    let s = setup("lbsk1", 2, &[0, 1], true);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let out = s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap();
        let (peer, answer) = out.split_once('|').unwrap();
        assert_eq!(peer, format!("{VIP}:80"), "getpeername shows the VIP");
        assert!(answer.starts_with("backend be"), "{answer}");
        seen.insert(answer.split_whitespace().nth(1).unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "both backends: {seen:?}");
    assert_eq!(s.counter(Stat::SockTranslated), 12);
    assert_eq!(
        s.socket_entries(),
        0,
        "each closed socket took its reverse entry along"
    );
    assert_eq!(
        s.counter(Stat::DnatNew),
        0,
        "translated once, at the socket: the tc path saw no VIP"
    );
}

#[test]
fn socket_lb_unconnected_udp_answers_come_from_the_vip_and_one_backend() {
    let s = setup("lbsk2", 2, &[0, 1], true);
    let code = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
for i in range(20):
    s.sendto(b"q", ("198.19.0.10", 53))
    data, sender = s.recvfrom(2048)
    print("%s:%d %s" % (sender[0], sender[1], data.decode()))
"#;
    let out = s.cgroup.python(&s.topology.client, code).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20, "{out}");
    let vip = format!("{VIP}:53");
    let mut client_ports = BTreeSet::new();
    let mut backends = BTreeSet::new();
    for line in lines {
        // "SENDER NAME client CLIENT": recvfrom's sender, then the answer.
        let words: Vec<&str> = line.split(' ').collect();
        let [sender, name, "client", client] = words[..] else {
            panic!("unexpected answer: {line}");
        };
        assert_eq!(sender, vip, "recvfrom shows the VIP: {line}");
        assert!(["be0", "be1"].contains(&name), "a backend answered: {line}");
        backends.insert(name);
        let client: SocketAddrV4 = client.parse().unwrap();
        assert_eq!(*client.ip(), CLIENT_IP, "no SNAT: {line}");
        client_ports.insert(client.port());
    }
    assert_eq!(client_ports.len(), 1, "one socket: {out}");
    // A datagram protocol's session (QUIC, DTLS) lives on one socket: its
    // every sendto must reach the same backend.
    assert_eq!(backends.len(), 1, "one socket, one backend: {out}");
    assert_eq!(
        s.counter(Stat::SockTranslated),
        20,
        "each sendto translated"
    );
    assert_eq!(s.counter(Stat::DnatNew), 0);
    assert!(s.counter(Stat::SockRevNat) >= 20);
}

#[test]
fn socket_lb_refuses_a_service_without_endpoints_at_once() {
    let s = setup("lbsk3", 1, &[], true);
    // Refused by the program, not a timeout: a connect that waited would
    // raise socket.timeout instead.
    let code = r#"
import socket
try:
    socket.create_connection(("198.19.0.10", 80), timeout=3)
    print("connected")
except ConnectionRefusedError:
    print("refused")
"#;
    let out = s.cgroup.python(&s.topology.client, code).unwrap();
    assert_eq!(out, "refused");
    assert_eq!(s.counter(Stat::SockRefused), 1);
}

#[test]
fn socket_lb_hairpin_a_pod_reaching_its_own_service_lands_on_itself() {
    let s = setup("lbsk4", 1, &[0], true);
    let out = s
        .cgroup
        .python(&s.topology.backends[0], TCP_CLIENT)
        .unwrap();
    let (peer, answer) = out.split_once('|').unwrap();
    assert_eq!(peer, format!("{VIP}:80"));
    assert!(answer.starts_with("backend be0"), "{answer}");
}

#[test]
fn socket_lb_serves_node_processes() {
    let s = setup("lbsk5", 1, &[0], true);
    // The node's own namespace: no tc hook sees this connection's packets.
    let out = s.cgroup.python(&s.topology.node, TCP_CLIENT).unwrap();
    let (peer, answer) = out.split_once('|').unwrap();
    assert_eq!(peer, format!("{VIP}:80"));
    assert!(answer.starts_with("backend be0"), "{answer}");
}

/// Upstream "Networking Granular Checks: Services should function for
/// node-Service: http" and "…: udp", with the DaemonSet's setting
/// (`--socket-lb=host-network`): a node process reaches the ClusterIP over
/// TCP and connected UDP, translated at its socket; a pod in its own
/// namespace in the same cgroup is left to the tc path. When the node
/// socket's UDP backend leaves, the socket is reset in the agent's own
/// namespace (no other is searched).
#[test]
fn socket_lb_host_network_serves_node_service_http_and_udp_and_leaves_pods_to_tc() {
    let mut s = setup_with("lbsk14", 2, &[0, 1], "host-network", |m| m, &[]);
    let out = s.cgroup.python(&s.topology.node, TCP_CLIENT).unwrap();
    let (peer, answer) = out.split_once('|').unwrap();
    assert_eq!(peer, format!("{VIP}:80"));
    assert!(answer.starts_with("backend be"), "{answer}");
    assert_eq!(s.counter(Stat::SockTranslated), 1, "the node's socket");

    let out = s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap();
    assert!(out.starts_with(&format!("{VIP}:80|backend be")), "{out}");
    assert_eq!(s.counter(Stat::SockTranslated), 1, "not the pod's");
    assert_eq!(s.counter(Stat::DnatNew), 1, "the pod's went the tc way");

    let mut client = Conversation::start(&s, &s.topology.node, CONNECTED_UDP_CLIENT);
    let mut ask = || client.say("q");
    let first = ask();
    assert!(first.starts_with("answer be"), "{first}");
    assert_eq!(s.socket_entries(), 1, "the node's UDP socket");
    let (other, answers) = move_to_the_other_backend(&mut s, &mut ask, &first);
    assert_moved_by_reset(&s, other, &answers);
}

#[test]
fn socket_lb_off_leaves_the_tc_path_serving() {
    let s = setup("lbsk6", 1, &[0], false);
    let out = s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap();
    assert!(out.starts_with(&format!("{VIP}:80|backend be0")), "{out}");
    assert_eq!(s.counter(Stat::SockTranslated), 0);
    assert_eq!(s.counter(Stat::DnatNew), 1, "translated per packet at tc");
}

#[test]
fn socket_lb_keeps_client_ip_affinity_per_network_namespace() {
    let s = setup_with(
        "lbsk7",
        3,
        &[0, 1, 2],
        "all",
        |m| {
            m.replacen(
                "  clusterIP:",
                "  sessionAffinity: ClientIP\n  clusterIP:",
                1,
            )
        },
        &[],
    );
    let answers: Vec<String> = (0..8)
        .map(|_| s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap())
        .collect();
    let backend = |a: &String| a.split_whitespace().nth(1).unwrap().to_owned();
    assert!(
        answers.iter().all(|a| backend(a) == backend(&answers[0])),
        "one backend for the pod: {answers:?}"
    );
    assert_eq!(s.counter(Stat::SockTranslated), 8);
}

#[test]
fn socket_lb_survives_a_killed_agent_and_the_next_one_adopts_it() {
    let mut s = setup("lbsk8", 2, &[0, 1], true);
    s.agent.kill().unwrap();
    // No agent: the pinned cgroup links keep translating.
    let out = s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap();
    assert!(out.starts_with(&format!("{VIP}:80|backend be")), "{out}");

    // The next agent attaches its own links, then releases the old ones.
    assert_eq!(
        s.cgroup_pins().len(),
        SOCKET_LB_LINKS,
        "the killed agent's links stay pinned"
    );
    // Every hook, all of the new run: the old links are released.
    s.start_next_agent(true);
    let before = s.counter(Stat::SockTranslated);
    let out = s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap();
    assert!(out.starts_with(&format!("{VIP}:80|backend be")), "{out}");
    assert_eq!(
        s.counter(Stat::SockTranslated),
        before + 1,
        "translated once: one set of programs attached"
    );
}

/// A UDP client that keeps one connected socket, as DNS clients do: each
/// stdin line is one question; on an error it reports it and reconnects.
const CONNECTED_UDP_CLIENT: &str = r#"
import errno, socket, sys
def connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.3)
    s.connect(("198.19.0.10", 53))
    return s
s = connect()
for _ in sys.stdin:
    try:
        s.send(b"who")
        print("answer " + s.recv(2048).decode().split()[0], flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except OSError as e:
        print("reset " + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
        s.close()
        s = connect()
"#;

/// Mirrors the upstream e2e "[sig-network] Conntrack should be able to
/// preserve UDP traffic when server pod cycles for a ClusterIP service",
/// with the socket translated at connect: no conntrack flow exists to
/// flush, so the socket itself is reset and the client reconnects.
#[test]
fn socket_lb_connected_udp_socket_moves_off_a_removed_backend() {
    let mut s = setup("lbsk9", 2, &[0, 1], true);
    let mut client = Conversation::start(&s, &s.topology.client, CONNECTED_UDP_CLIENT);
    let mut ask = || client.say("q");
    let first = ask();
    assert!(first.starts_with("answer be"), "{first}");
    assert_eq!(ask(), first, "one socket, one backend");
    let (other, answers) = move_to_the_other_backend(&mut s, &mut ask, &first);
    assert_moved_by_reset(&s, other, &answers);
    assert_eq!(s.counter(Stat::DnatNew), 0, "the tc path saw no VIP");
}

/// The connected socket moved by being reset: a reset among the
/// `answers`, and the last from backend `other`.
fn assert_moved_by_reset(s: &Setup, other: usize, answers: &[String]) {
    assert_eq!(
        answers.last().map(String::as_str),
        Some(format!("answer be{other}").as_str()),
        "the socket still talks to the removed backend: {answers:?}\n{}",
        s.agent.log_text()
    );
    // Reset by the agent: the next send finds the socket disconnected
    // (EDESTADDRREQ), or a waiting receive gets the abort (ECONNABORTED).
    assert!(
        answers
            .iter()
            .any(|a| a == "reset ECONNABORTED" || a == "reset EDESTADDRREQ"),
        "no reset: {answers:?}\n{}",
        s.agent.log_text()
    );
}

/// Of two backends, leaves the Service only the one `first` did not come
/// from, then asks until the connected socket answers from that one. The
/// removed pod still runs and would answer: only a reset socket moves.
/// Returns the remaining backend and the answers on the way.
fn move_to_the_other_backend(
    s: &mut Setup,
    ask: &mut impl FnMut() -> String,
    first: &str,
) -> (usize, Vec<String>) {
    let only = |other| web_manifest(&[(backend_ip(other), true)]);
    move_to_the_other_backend_of(s, ask, first, &format!("{VIP}:53/UDP"), only)
}

/// `move_to_the_other_backend` for the UDP frontend `udp` (as `inspect`
/// names it), `only(i)` being the manifest that leaves it backend `i`.
fn move_to_the_other_backend_of(
    s: &mut Setup,
    ask: &mut impl FnMut() -> String,
    first: &str,
    udp: &str,
    only: impl Fn(usize) -> String,
) -> (usize, Vec<String>) {
    let index: usize = first.trim_start_matches("answer be").parse().unwrap();
    let other = 1 - index;
    s._manifests.write("web.yaml", &only(other)).unwrap();
    s.agent
        .wait_for_maps("one UDP backend", |m| m.count(udp) == Some(1))
        .unwrap();
    let deadline = std::time::Instant::now() + lb_tests::EVENT_TIMEOUT;
    let mut answers = Vec::new();
    while std::time::Instant::now() < deadline {
        answers.push(ask());
        if answers.last().unwrap() == &format!("answer be{other}") {
            break;
        }
    }
    (other, answers)
}

/// Turning socket LB on does not move connections the tc path carries:
/// they were connected before the cgroup programs existed and keep their
/// conntrack entries; new connections are translated at the socket.
#[test]
fn socket_lb_turned_on_leaves_existing_connections_on_the_tc_path() {
    let mut s = setup("lbsk10", 2, &[0, 1], false);
    let mut conn = s
        .topology
        .client
        .run(|| EchoConnection::open(SocketAddrV4::new(VIP, 80)))
        .expect("connect");
    let backend = conn.ask().unwrap();
    assert_eq!(s.counter(Stat::DnatNew), 1, "translated at tc");
    s.agent.kill().unwrap(); // pins stay: the next agent adopts them
    s.start_next_agent(true);

    for _ in 0..3 {
        assert_eq!(
            conn.ask().unwrap(),
            backend,
            "the old connection keeps its backend"
        );
    }
    let out = s.cgroup.python(&s.topology.client, TCP_CLIENT).unwrap();
    assert!(out.starts_with(&format!("{VIP}:80|backend be")), "{out}");
    assert_eq!(
        s.counter(Stat::SockTranslated),
        1,
        "the new one at the socket"
    );
    assert_eq!(s.counter(Stat::DnatNew), 1, "no new flow at tc");
    assert!(
        s.counter(Stat::DnatCtHit) > 0,
        "the old one through tc conntrack"
    );
}

/// A connected UDP client kept open: each stdin line sends one question
/// and prints the sender `recvfrom` reports.
const ASKING_UDP_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("198.19.0.10", 53))
for _ in sys.stdin:
    s.send(b"who")
    data, sender = s.recvfrom(2048)
    print("%s:%d" % sender, flush=True)
"#;

/// A pod that opens `HOARD` connected UDP sockets and keeps them:
/// it prints how many answers came from the VIP, waits for a line, closes
/// them all, and asks once more on a new socket.
const SOCKET_HOARDER: &str = r#"
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
def ask():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(("198.19.0.10", 53))
    s.send(b"who")
    _, sender = s.recvfrom(2048)
    return s, sender == ("198.19.0.10", 53)
held = [ask() for _ in range(HOARD)]
print("from the vip %d of %d" % (sum(v for _, v in held), len(held)), flush=True)
sys.stdin.readline()
for s, _ in held:
    s.close()
s, from_vip = ask()
print("after close from the vip %s" % from_vip, flush=True)
"#;

/// Socket LB's reverse entries are the sockets' own: a pod holding more
/// sockets than the table has room for neither evicts a node process's
/// entry (its DNS answers keep coming from the VIP) nor loses service (its
/// extra sockets go the tc way); once it closes them, they are gone.
#[test]
fn socket_lb_one_pods_sockets_cannot_evict_anothers_reverse_entries() {
    // Room for a thousand; a hoard half as big again.
    const TABLE: u64 = 1024;
    const HOARD: u64 = 1536;
    let table = TABLE.to_string();
    let s = setup_with(
        "lbsk11",
        1,
        &[0],
        "all",
        |m| m,
        &["--max-socket-entries", &table],
    );
    let mut node_client = Conversation::start(&s, &s.topology.node, ASKING_UDP_CLIENT);
    let mut node_asks = || node_client.say("q");
    let vip = format!("{VIP}:53");
    assert_eq!(node_asks(), vip);
    assert_eq!(s.socket_entries(), 1);

    let mut hoarder = Conversation::start(
        &s,
        &s.topology.client,
        &SOCKET_HOARDER.replace("HOARD", &HOARD.to_string()),
    );
    assert_eq!(
        hoarder.hear(),
        format!("from the vip {HOARD} of {HOARD}"),
        "the pod is served"
    );
    assert_eq!(s.socket_entries(), TABLE, "the table is full");
    let untranslated = s.counter(Stat::SockUntranslated);
    assert_eq!(
        untranslated,
        HOARD - (TABLE - 1),
        "the sockets past the table's room went the tc way"
    );
    assert_eq!(s.counter(Stat::DnatNew), untranslated);

    assert_eq!(
        node_asks(),
        vip,
        "the node process's entry outlived the pod's hoard"
    );

    assert_eq!(hoarder.say(""), "after close from the vip True");
    drop(hoarder); // its last socket closes with it
    assert_eq!(
        s.counter(Stat::SockUntranslated),
        untranslated,
        "the new socket found room: the closed ones' entries had gone"
    );
    assert_eq!(s.socket_entries(), 1, "only the node process's");
}

/// Turned off, socket LB leaves no reverse entries behind: no hook reads
/// them and none deletes them when their sockets close. A socket connected
/// while it was on keeps its backend.
#[test]
fn socket_lb_turned_off_forgets_the_reverse_entries() {
    let mut s = setup("lbsk12", 1, &[0], true);
    let mut client = Conversation::start(&s, &s.topology.client, ASKING_UDP_CLIENT);
    assert_eq!(client.say("q"), format!("{VIP}:53"));
    assert_eq!(s.socket_entries(), 1);

    s.agent.kill().unwrap();
    s.start_next_agent(false);
    assert!(
        wait_until(lb_tests::EVENT_TIMEOUT, || s.socket_entries() == 0),
        "{} reverse entries left\n{}",
        s.socket_entries(),
        s.agent.log_text()
    );
    assert!(
        s.cgroup_pins().is_empty(),
        "the socket LB links are released"
    );
    assert_eq!(
        client.say("q"),
        format!("{}:5353", backend_ip(0)),
        "the socket keeps its backend, shown as it is"
    );
}

/// The programs attached to a cgroup, by name (bpftool's view, as an
/// operator would check).
fn cgroup_programs(cgroup: &std::path::Path) -> Vec<String> {
    let out = lb_tests::process::stdout_of(
        std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(cgroup)
            .arg("--json"),
    );
    let programs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    programs
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The TCX programs on every interface of `ns`.
fn tc_programs(ns: &NetNs) -> Vec<(String, String)> {
    use aya::programs::{tc::SchedClassifier, TcAttachType};
    ns.run(|| {
        let mut found = Vec::new();
        for (dev, _) in lb_agent::datapath::attach::interfaces().unwrap() {
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                let Ok((_, programs)) = SchedClassifier::query_tcx(&dev, hook) else {
                    continue;
                };
                for p in programs {
                    found.push((dev.clone(), p.name_as_str().unwrap_or_default().to_owned()));
                }
            }
        }
        found
    })
}

/// `lb-agent cleanup` (kube-proxy's `--cleanup`) takes out a datapath a
/// stopped agent kept (`--keep-datapath`): every tc and cgroup program
/// detached, every pin and the directory removed, and a second run finds
/// nothing. An entry lb did not make is left alone, named, and the run
/// exits non-zero.
#[test]
fn cleanup_detaches_every_program_and_removes_every_pin() {
    let mut s = setup_with("lbsk13", 1, &[0], "all", |m| m, &["--keep-datapath"]);
    s.agent.stop().unwrap();
    s.agent.cleanup_pins = false;
    let pin_dir = s.agent.pin_dir.clone();
    let tc_before = tc_programs(&s.topology.node);
    assert!(
        tc_before.len() >= 4 && tc_before.iter().all(|(_, p)| p.starts_with("lb_")),
        "the kept datapath: {tc_before:?}"
    );
    assert_eq!(cgroup_programs(&s.cgroup.path).len(), SOCKET_LB_LINKS);
    let body = s
        .topology
        .client
        .run(|| lb_tests::servers::http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap();
    assert!(body.starts_with("backend be0"), "still served: {body}");

    // Someone else's pin in the directory.
    let foreign = pin_dir.join("not-lbs");
    lb_tests::process::stdout_of(std::process::Command::new("bpftool").args([
        "map",
        "create",
        &foreign.to_string_lossy(),
        "type",
        "array",
        "key",
        "4",
        "value",
        "4",
        "entries",
        "1",
        "name",
        "not_lbs",
    ]));
    let cleanup = || {
        std::process::Command::new(lb_tests::topology::agent_binary())
            .arg("cleanup")
            .arg("--pin-dir")
            .arg(&pin_dir)
            .output()
            .unwrap()
    };
    let out = cleanup();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "left alone (not made by lb): {}",
            foreign.display()
        )),
        "{stderr}"
    );
    assert!(foreign.exists(), "left alone");
    let detached = stdout
        .lines()
        .filter(|l| l.starts_with("detached: "))
        .count();
    assert_eq!(detached, tc_before.len() + SOCKET_LB_LINKS, "{stdout}");
    assert_eq!(tc_programs(&s.topology.node), [], "no tc program left");
    assert_eq!(cgroup_programs(&s.cgroup.path), Vec::<String>::new());
    let maps = stdout
        .lines()
        .filter(|l| l.starts_with("removed map: "))
        .count();
    assert_eq!(maps, lb_agent::datapath::loader::ALL_MAPS.len(), "{stdout}");
    assert_eq!(
        std::fs::read_dir(&pin_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&foreign),
        "only the foreign pin is left"
    );

    std::fs::remove_file(&foreign).unwrap();
    let out = cleanup();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("nothing to clean up"), "{stdout}");
    assert!(!pin_dir.exists(), "the directory is removed");
}

/// A dual-stack socket (AF_INET6, as Java and Node.js open them) reaches
/// an IPv4 cluster IP through its IPv4-mapped address: TCP connect and
/// unconnected UDP are translated at the socket like IPv4 ones (the tc path
/// sees no VIP), `getpeername` and `recvfrom` show the mapped VIP.
#[test]
fn socket_lb_dual_stack_sockets_reach_an_ipv4_service_through_its_mapped_address() {
    let s = setup("lbsk15", 2, &[0, 1], true);
    let tcp = TCP_CLIENT.replace("(\"198.19.0.10\", 80)", "(\"::ffff:198.19.0.10\", 80)");
    assert!(tcp.contains("::ffff:"), "{tcp}");
    let out = s.cgroup.python(&s.topology.client, &tcp).unwrap();
    let (peer, answer) = out.split_once('|').unwrap();
    assert_eq!(
        peer, "::ffff:198.19.0.10:80",
        "getpeername shows the mapped VIP"
    );
    assert!(answer.starts_with("backend be"), "{answer}");
    let udp = r#"
import socket
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(3)
for i in range(3):
    u.sendto(b"q", ("::ffff:198.19.0.10", 53))
    data, sender = u.recvfrom(2048)
    print("%s %d %s" % (sender[0], sender[1], data.decode().split()[0]))
"#;
    let out = s.cgroup.python(&s.topology.client, udp).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for line in lines {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[..2], ["::ffff:198.19.0.10", "53"], "{out}");
        assert!(["be0", "be1"].contains(&words[2]), "{out}");
    }
    assert_eq!(s.counter(Stat::SockTranslated), 4);
    assert_eq!(s.counter(Stat::DnatNew), 0, "translated at the socket");
}

/// The connected-UDP reset works for a dual-stack socket too: its
/// backend leaves, the agent finds it among the AF_INET6 sockets by its
/// mapped peer and resets it, and the client reconnects to the other.
#[test]
fn socket_lb_a_dual_stack_connected_udp_socket_moves_off_a_removed_backend() {
    let mut s = setup("lbsk16", 2, &[0, 1], true);
    let code = CONNECTED_UDP_CLIENT
        .replace("socket.AF_INET,", "socket.AF_INET6,")
        .replace("(\"198.19.0.10\", 53)", "(\"::ffff:198.19.0.10\", 53)");
    assert!(code.contains("AF_INET6") && code.contains("::ffff:"));
    let mut client = Conversation::start(&s, &s.topology.client, &code);
    let mut ask = || client.say("q");
    let first = ask();
    assert!(first.starts_with("answer be"), "{first}");
    let (other, answers) = move_to_the_other_backend(&mut s, &mut ask, &first);
    assert_moved_by_reset(&s, other, &answers);
    assert_eq!(s.counter(Stat::DnatNew), 0);
}

/// With `--service-cluster-ip-range`, a node process connecting to an
/// address there that no Service holds is refused at connect, as pods'
/// packets are at tc (nftables kube-proxy rejects both); a held one is
/// translated.
#[test]
fn socket_lb_refuses_a_node_process_connecting_to_an_unallocated_cluster_ip() {
    let s = setup_with(
        "lbsk17",
        1,
        &[0],
        "host-network",
        |m| m,
        &["--service-cluster-ip-range", "198.19.0.0/16"],
    );
    let code = r#"
import socket
for addr in ["198.19.0.99", "198.19.0.10"]:
    try:
        socket.create_connection((addr, 80), timeout=3).close()
        print(addr, "connected")
    except ConnectionRefusedError:
        print(addr, "refused")
"#;
    let out = s.cgroup.python(&s.topology.node, code).unwrap();
    assert_eq!(out, "198.19.0.99 refused\n198.19.0.10 connected", "{out}");
    assert_eq!(s.counter(Stat::SockRefused), 1);
    assert_eq!(s.counter(Stat::SockTranslated), 1);
}

/// `web6`: an IPv6-only Service at `VIP6` (TCP 80 → 8080, UDP 53 → 5353)
/// with the IPv6 addresses of backends `ready`, and `gone6`, one without
/// endpoints at `VIP6 + 1`.
fn ipv6_services(ready: &[usize]) -> String {
    let ready: Vec<_> = ready
        .iter()
        .map(|i| lb_tests::topology::backend_ip6(*i))
        .collect();
    let gone = std::net::Ipv6Addr::from(u128::from(VIP6) + 1);
    format!(
        "---\n{}\n---\n{}",
        service_manifest6("web6", VIP6, &ready),
        service_manifest6("gone6", gone, &[])
    )
}

/// `setup` with both backends, socket LB on, and also `ipv6_services`
/// with both backends' IPv6 servers (kept by the caller).
fn setup_ipv6(prefix: &str) -> (Setup, Vec<BackendServers>) {
    let mut s = setup_with(
        prefix,
        2,
        &[0, 1],
        "all",
        |m| m + &ipv6_services(&[0, 1]),
        &[],
    );
    s.topology.add_ipv6().expect("IPv6 addresses");
    let servers6 = (0..2)
        .map(|i| {
            let (ns, addr) = (&s.topology.backends[i], lb_tests::topology::backend_ip6(i));
            BackendServers::start_on(ns, addr, &format!("be{i}"), 8080, 5353).expect("servers")
        })
        .collect();
    s.agent
        .wait_for_maps("the IPv6 service", |m| {
            m.count(&format!("[{VIP6}]:80/TCP")) == Some(2)
        })
        .unwrap();
    (s, servers6)
}

/// An IPv6 socket reaches an IPv6 cluster IP through socket LB: TCP
/// connect is translated at the socket (the tc path sees no VIP),
/// `getpeername` shows the VIP, every backend is reached, each closed
/// socket takes its reverse entry along; unconnected UDP answers come from
/// the VIP (`recvfrom`); a Service without endpoints refuses the connect.
#[test]
fn socket_lb_ipv6_sockets_reach_an_ipv6_service_and_see_its_cluster_ip() {
    let (s, _servers6) = setup_ipv6("lbsk18");
    let tcp = TCP_CLIENT.replace(
        "socket.create_connection((\"198.19.0.10\", 80)",
        &format!("socket.create_connection((\"{VIP6}\", 80)"),
    );
    assert!(tcp.contains(&VIP6.to_string()), "{tcp}");
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let out = s.cgroup.python(&s.topology.client, &tcp).unwrap();
        let (peer, answer) = out.split_once('|').unwrap();
        assert_eq!(peer, format!("{VIP6}:80"), "getpeername shows the VIP");
        assert!(answer.starts_with("backend be"), "{answer}");
        seen.insert(answer.split_whitespace().nth(1).unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "both backends: {seen:?}");
    let entries6 = || {
        lb_agent::datapath::fill::datapath_tables(&s.agent.pin_dir)
            .unwrap()
            .into_iter()
            .find(|(name, _)| *name == lb_common::sock::SOCK_REVNAT6_MAP)
            .unwrap()
            .1
    };
    assert_eq!(entries6(), 0, "each closed socket took its entry along");

    let udp = format!(
        r#"
import socket
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(3)
for i in range(3):
    u.sendto(b"q", ("{VIP6}", 53))
    data, sender = u.recvfrom(2048)
    print("%s %d %s" % (sender[0], sender[1], data.decode().split()[0]))
try:
    socket.create_connection(("{gone}", 80), timeout=3).close()
    print("gone6 connected")
except ConnectionRefusedError:
    print("gone6 refused")
"#,
        gone = std::net::Ipv6Addr::from(u128::from(VIP6) + 1)
    );
    let out = s.cgroup.python(&s.topology.client, &udp).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for line in &lines[..3] {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[..2], [VIP6.to_string().as_str(), "53"], "{out}");
        assert!(["be0", "be1"].contains(&words[2]), "{out}");
    }
    assert_eq!(lines[3], "gone6 refused", "{out}");
    assert_eq!(s.counter(Stat::SockTranslated), 12 + 3);
    assert_eq!(s.counter(Stat::SockRefused), 1);
    assert_eq!(s.counter(Stat::DnatNew), 0, "translated at the socket");
}

/// The connected-UDP reset for an IPv6 socket: its backend leaves the IPv6
/// Service, the agent finds the socket by its IPv6 peer and resets it, and
/// the client reconnects to the other backend.
#[test]
fn socket_lb_an_ipv6_connected_udp_socket_moves_off_a_removed_backend() {
    let (mut s, _servers6) = setup_ipv6("lbsk19");
    let code = CONNECTED_UDP_CLIENT
        .replace("socket.AF_INET,", "socket.AF_INET6,")
        .replace("(\"198.19.0.10\", 53)", &format!("(\"{VIP6}\", 53)"));
    assert!(code.contains("AF_INET6") && code.contains(&VIP6.to_string()));
    let mut client = Conversation::start(&s, &s.topology.client, &code);
    let mut ask = || client.say("q");
    let first = ask();
    assert!(first.starts_with("answer be"), "{first}");
    let v4 = web_manifest(&[(backend_ip(0), true), (backend_ip(1), true)]);
    let only = |other| v4.clone() + &ipv6_services(&[other]);
    let udp = format!("[{VIP6}]:53/UDP");
    let (other, answers) = move_to_the_other_backend_of(&mut s, &mut ask, &first, &udp, only);
    assert_moved_by_reset(&s, other, &answers);
    assert_eq!(s.counter(Stat::DnatNew), 0, "the tc path saw no VIP");
}

/// `web` (as `web_manifest` writes it) made dual-stack: `VIP6` as its
/// second cluster IP, an IPv6 slice with both backends' IPv6 addresses.
fn dual_stack_web(manifest: String) -> String {
    let families = format!(
        "  clusterIP: {VIP}\n  clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  \
         ipFamilyPolicy: PreferDualStack\n"
    );
    let dual = manifest.replacen(&format!("  clusterIP: {VIP}\n"), &families, 1);
    assert_ne!(dual, manifest, "web's clusterIP line");
    let endpoints: String = (0..2)
        .map(|i| {
            format!(
                "- addresses: [\"{}\"]\n",
                lb_tests::topology::backend_ip6(i)
            )
        })
        .collect();
    format!(
        "{dual}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: web-v6\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv6\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n\
         - {{name: echo, port: 5353, protocol: UDP}}\nendpoints:\n{endpoints}"
    )
}

/// dual_stack.go "should function for node-Service: http" and "…: udp",
/// with the DaemonSet's setting (`--socket-lb=host-network`): a node
/// process reaches both cluster IPs of a dual-stack Service over TCP and
/// UDP, translated at its socket (`getpeername` and `recvfrom` show the
/// cluster IP), every backend of each family answering.
#[test]
fn socket_lb_host_network_serves_a_dual_stack_node_service_http_and_udp() {
    let mut s = setup_with("lbsk21", 2, &[0, 1], "host-network", dual_stack_web, &[]);
    s.topology.add_ipv6().expect("IPv6 addresses");
    let _servers6: Vec<BackendServers> = (0..2)
        .map(|i| {
            let (ns, addr) = (&s.topology.backends[i], lb_tests::topology::backend_ip6(i));
            BackendServers::start_on(ns, addr, &format!("be{i}"), 8080, 5353).expect("servers")
        })
        .collect();
    s.agent
        .wait_for_maps("both families", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(2)
                && m.count(&format!("[{VIP6}]:80/TCP")) == Some(2)
        })
        .unwrap();
    for vip in [VIP.to_string(), VIP6.to_string()] {
        let tcp = TCP_CLIENT.replace(
            "socket.create_connection((\"198.19.0.10\", 80)",
            &format!("socket.create_connection((\"{vip}\", 80)"),
        );
        let mut seen = BTreeSet::new();
        for _ in 0..12 {
            let out = s.cgroup.python(&s.topology.node, &tcp).unwrap();
            let (peer, answer) = out.split_once('|').unwrap();
            assert_eq!(
                peer,
                format!("{vip}:80"),
                "getpeername shows the cluster IP"
            );
            assert!(answer.starts_with("backend be"), "{answer}");
            seen.insert(answer.split_whitespace().nth(1).unwrap().to_owned());
        }
        assert_eq!(seen.len(), 2, "both backends at {vip}: {seen:?}");
        let family = if vip.contains(':') {
            "AF_INET6"
        } else {
            "AF_INET"
        };
        let udp = format!(
            r#"
import socket
u = socket.socket(socket.{family}, socket.SOCK_DGRAM)
u.settimeout(3)
for i in range(6):
    u.sendto(b"q", ("{vip}", 53))
    data, sender = u.recvfrom(2048)
    print("%s %d %s" % (sender[0], sender[1], data.decode().split()[0]))
"#
        );
        let out = s.cgroup.python(&s.topology.node, &udp).unwrap();
        let mut answered = BTreeSet::new();
        for line in out.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words[..2], [vip.as_str(), "53"], "{out}");
            answered.insert(words[2].to_owned());
        }
        assert_eq!(out.lines().count(), 6, "{out}");
        assert!(answered.iter().all(|b| b == "be0" || b == "be1"), "{out}");
    }
    assert_eq!(s.counter(Stat::SockTranslated), 2 * (12 + 6));
    assert_eq!(s.counter(Stat::DnatNew), 0, "translated at the socket");
}
