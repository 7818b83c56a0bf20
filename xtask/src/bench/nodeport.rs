//! NodePort from an external client to a backend on the other node, on the
//! two-node topology of the tests (`lb_tests::cluster`): new TCP
//! connections per second and latency through node-a's node port to pod-b
//! on node-b, against direct pod access and kube-proxy-shaped iptables and
//! nftables NodePort rules (masqueraded, as kube-proxy does for
//! `externalTrafficPolicy: Cluster`).

use std::{fmt::Write as _, net::SocketAddrV4};

use anyhow::Context as _;
use lb_tests::{
    cluster::{Cluster, NODE_IPS, POD_IPS},
    servers::http_get,
};

use super::{load, restore, BenchConfig, Mode, Sample, Service};

const PREFIX: &str = "lbn";
/// Node ports come from the default range, 30000-32767: the last
/// `NODE_PORT_SERVICES` services are NodePort (30000 + j), the others
/// ClusterIP, as a large cluster's would be.
const FIRST_NODE_PORT: u16 = 30000;
const NODE_PORT_SERVICES: usize = 2000;

/// N NodePort services; the last one's only endpoint is pod-b (on node-b),
/// the others have 10 endpoints nothing answers on.
pub fn services(n: usize) -> Vec<Service> {
    let mut services = super::services(n);
    if let Some(target) = services.last_mut() {
        target.endpoints = vec![(POD_IPS[1].into(), 8080)];
    }
    services
}

/// Service `i`'s node port among `n`, if it is a NodePort service.
fn node_port(i: usize, n: usize) -> Option<u16> {
    let first = n.saturating_sub(NODE_PORT_SERVICES);
    (i >= first).then(|| FIRST_NODE_PORT + (i - first) as u16)
}

/// Runs every mode `config.runs` times at `scale` services.
pub fn measure(scale: usize, config: &BenchConfig) -> anyhow::Result<Vec<(Mode, Sample)>> {
    let services = services(scale);
    super::every_mode(
        &format!("NodePort, {scale} services"),
        &Mode::ALL,
        config,
        |mode, sample| one_run(mode, &services, config, sample),
    )
}

fn one_run(
    mode: Mode,
    services: &[Service],
    config: &BenchConfig,
    sample: &mut Sample,
) -> anyhow::Result<()> {
    let mut cluster = Cluster::without_agents(PREFIX)?;
    super::tune_client(&cluster.clients[0])?;
    let target = program(mode, &mut cluster, services, Proto::Tcp)?;
    let client = &cluster.clients[0];
    client
        .run(|| http_get(target))
        .with_context(|| format!("no answer from {target}"))?;
    let conns = load::connections(client, &[target.into()], config.threads, config.duration);
    sample.conns_per_s.push(conns.per_second);
    sample.p50_ms.push(conns.p50.as_secs_f64() * 1e3);
    sample.p99_ms.push(conns.p99.as_secs_f64() * 1e3);
    sample.errors += conns.errors;
    Ok(())
}

/// The services' protocol (each has one port).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Programs `mode` on `cluster` for `services` (lb: starts both agents);
/// the address the client reaches the target through.
pub fn program(
    mode: Mode,
    cluster: &mut Cluster,
    services: &[Service],
    proto: Proto,
) -> anyhow::Result<SocketAddrV4> {
    let n = services.len();
    let target_port = node_port(n - 1, n).context("the target is a NodePort service")?;
    let via_node_a = SocketAddrV4::new(NODE_IPS[0], target_port);
    let scratch = lb_tests::topology::ScratchDir::new("lbn-bench")?;
    let udp = |rules: String| match proto {
        Proto::Tcp => rules,
        Proto::Udp => rules
            .replace("-p tcp -m tcp", "-p udp -m udp")
            .replace(" tcp . ", " udp . ")
            .replace("l4proto tcp", "l4proto udp"),
    };
    let target = match mode {
        Mode::Direct => {
            // The client routes to pod-b through node-b: one hop, no NAT.
            cluster.clients[0].ip(&[
                "route",
                "add",
                "198.18.11.0/24",
                "via",
                &NODE_IPS[1].to_string(),
            ])?;
            SocketAddrV4::new(POD_IPS[1], 8080)
        }
        Mode::Iptables => {
            let rules = scratch.0.join("iptables.rules");
            std::fs::write(&rules, udp(iptables_rules(services)))?;
            restore(&cluster.nodes[0].name, &["iptables-legacy-restore"], &rules)?;
            via_node_a
        }
        Mode::Nftables => {
            let rules = scratch.0.join("nftables.nft");
            std::fs::write(&rules, udp(nftables_rules(services)))?;
            restore(&cluster.nodes[0].name, &["nft", "-f"], &rules)?;
            via_node_a
        }
        Mode::Lb | Mode::LbSocket => {
            let (manifest, name) = match proto {
                Proto::Tcp => (manifest(services), "TCP"),
                Proto::Udp => (
                    manifest(services)
                        .replace("targetPort: http", "protocol: UDP, targetPort: http")
                        .replace("port: 8080}", "port: 8080, protocol: UDP}"),
                    "UDP",
                ),
            };
            cluster.start_agents(&manifest, &[])?;
            // Each node serves the port on its own address.
            let port = format!("{target_port}/{name}");
            cluster.wait_for_maps("the bench node ports", |m| m.port_count(&port) == Some(1))?;
            via_node_a
        }
    };
    Ok(target)
}

/// kube-proxy's iptables mode for NodePort services: after the cluster IP
/// rules, `KUBE-SERVICES` sends local destinations to `KUBE-NODEPORTS`, one
/// `--dport` rule per service (a linear scan), → `KUBE-EXT-*` (mark for
/// masquerade) → the service chain; `KUBE-POSTROUTING` masquerades marked
/// packets.
fn iptables_rules(services: &[Service]) -> String {
    let mut r = super::peers::iptables_rules(services);
    r.truncate(r.len() - "COMMIT\n".len());
    let n = services.len();
    let chains: Vec<String> = (0..n)
        .filter(|i| node_port(*i, n).is_some())
        .map(|i| format!(":KUBE-EXT-{i:06} - [0:0]"))
        .collect();
    let _ = writeln!(
        r,
        ":POSTROUTING ACCEPT [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n{}",
        chains.join("\n")
    );
    r.push_str("-A POSTROUTING -j KUBE-POSTROUTING\n");
    r.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    r.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    r.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    r.push_str("-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n");
    r.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    let n = services.len();
    for (i, port) in (0..n).filter_map(|i| Some((i, node_port(i, n)?))) {
        let _ = writeln!(
            r,
            "-A KUBE-NODEPORTS -p tcp -m tcp --dport {port} -j KUBE-EXT-{i:06}"
        );
        let _ = writeln!(r, "-A KUBE-EXT-{i:06} -j KUBE-MARK-MASQ");
        let _ = writeln!(r, "-A KUBE-EXT-{i:06} -j KUBE-SVC-{i:06}");
    }
    r.push_str("COMMIT\n");
    r
}

/// kube-proxy's nftables mode: a `service-nodeports` verdict map for local
/// destinations, `external-*` chains marking for masquerade, and a
/// masquerading postrouting chain.
fn nftables_rules(services: &[Service]) -> String {
    let mut map =
        String::from("  map service-nodeports {\n    type inet_proto . inet_service : verdict\n    elements = {\n");
    let n = services.len();
    for (i, port) in (0..n).filter_map(|i| Some((i, node_port(i, n)?))) {
        let _ = writeln!(map, "      tcp . {port} : goto external-{i:06},");
    }
    map.push_str("    }\n  }\n  chain services {\n");
    // kube-proxy checks node ports in the same `services` chain, after the
    // cluster IPs.
    let mut r = super::peers::nftables_rules(services)
        .replacen("  chain services {\n", &map, 1)
        .replacen(
            "vmap @service-ips\n",
            "vmap @service-ips\n    fib daddr type local meta l4proto . th dport vmap @service-nodeports\n",
            1,
        );
    r.truncate(r.rfind('}').expect("table end"));
    r.push_str("  chain mark-for-masquerade {\n    meta mark set meta mark or 0x4000\n  }\n");
    r.push_str("  chain masquerading {\n    type nat hook postrouting priority srcnat; policy accept;\n    meta mark and 0x4000 == 0 return\n    meta mark set meta mark xor 0x4000\n    masquerade fully-random\n  }\n");
    for i in (0..n).filter(|i| node_port(*i, n).is_some()) {
        let _ = writeln!(
            r,
            "  chain external-{i:06} {{\n    jump mark-for-masquerade\n    goto service-{i:06}\n  }}"
        );
    }
    r.push_str("}\n");
    r
}

/// The same services for lb, the target's endpoint on node-b.
fn manifest(services: &[Service]) -> String {
    let mut r = String::new();
    let n = services.len();
    for (i, svc) in services.iter().enumerate() {
        let (type_, node_port) = match node_port(i, n) {
            Some(port) => ("NodePort", format!(", nodePort: {port}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = write!(
            r,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: bench}}\nspec:\n  type: {type_}\n  clusterIP: {}\n  \
             ports: [{{name: http, port: {}, targetPort: http{node_port}}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: svc{i}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n",
            svc.vip,
            svc.port,
        );
        for (ip, _) in &svc.endpoints {
            let node = if *ip == POD_IPS[1] {
                "node-b"
            } else {
                "elsewhere"
            };
            let _ = writeln!(r, "- {{addresses: [\"{ip}\"], nodeName: {node}}}");
        }
        r.push_str("---\n");
    }
    r
}
