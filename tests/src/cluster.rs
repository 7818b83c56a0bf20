//! Two nodes on one kernel: each node a network namespace running its own
//! agent (own `--pin-dir`, own `--node-name`), a pod on each, a routed pod
//! network between the nodes, and external clients on the LAN. Addresses in
//! 198.18.0.0/15 (nodes, pods, clients) and 198.19.0.0/16 (service IPs).
//!
//! ```text
//!   client 198.18.0.100 ─┐                 ┌─ node-a eth0 198.18.0.2 ┬─ pod a 198.18.10.2 (server)
//!   client 198.18.0.101 ─┤ LAN bridge (lan) │                          └─ client pod 198.18.20.2
//!                        └─────────────────┴─ node-b eth0 198.18.0.3 ┬─ pod b 198.18.11.2 (server)
//!                                                                      └─ client pod 198.18.21.2
//! ```
//!
//! The client pods are not endpoints: whatever backend a test's service
//! has, they reach it from outside it.
//!
//! Each node routes the other's pod subnet via the other's LAN address and
//! has a default route on `eth0` (its uplink, the agent's `@uplink`). The
//! clients reach the service IPs (198.19.0.0/16) via node-a and know no pod
//! routes: an answer straight from a pod on node-b would not reach them.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use crate::{
    apiserver::{Forwarder, TestApiServer},
    netns::NetNs,
    servers::BackendServers,
    topology::{Agent, ScratchDir, Source},
};

pub const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)];
pub const POD_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 10, 2), Ipv4Addr::new(198, 18, 11, 2)];
pub const CLIENT_POD_IPS: [Ipv4Addr; 2] =
    [Ipv4Addr::new(198, 18, 20, 2), Ipv4Addr::new(198, 18, 21, 2)];
pub const CLIENT_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 18, 0, 100),
    Ipv4Addr::new(198, 18, 0, 101),
];
pub const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];

/// `Cluster::add_ipv6`'s addresses: each as its IPv4 one in
/// 2001:db8::/32, the third group the IPv4 address's third byte (LAN
/// 2001:db8:18::/64, pods 2001:db8:10::/64 and 2001:db8:11::/64, client
/// pods 2001:db8:20::/64 and 2001:db8:21::/64); service IPs in
/// 2001:db8:ffff::/48, routed by the clients via node-a.
pub const NODE_IPS6: [Ipv6Addr; 2] = [v6(0x18, 2), v6(0x18, 3)];
pub const POD_IPS6: [Ipv6Addr; 2] = [v6(0x10, 2), v6(0x11, 2)];
pub const CLIENT_POD_IPS6: [Ipv6Addr; 2] = [v6(0x20, 2), v6(0x21, 2)];
pub const CLIENT_IPS6: [Ipv6Addr; 2] = [v6(0x18, 0x100), v6(0x18, 0x101)];
pub const SERVICE_PREFIX6: &str = "2001:db8:ffff::/48";

const fn v6(subnet: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, subnet, 0, 0, 0, 0, host)
}

pub struct Cluster {
    pub prefix: String,
    pub lan: NetNs,
    pub nodes: [NetNs; 2],
    pub pods: [NetNs; 2],
    /// A pod on each node that only connects (never an endpoint).
    pub client_pods: [NetNs; 2],
    pub clients: [NetNs; 2],
    pub manifests: ScratchDir,
    pub agents: Vec<Agent>,
    /// API mode: one API server (on the LAN namespace's loopback) and its
    /// forwarders into each node.
    pub api: Option<(TestApiServer, Vec<Forwarder>)>,
    servers: Vec<BackendServers>,
}

impl Cluster {
    /// Builds the network, starts a server in each pod (HTTP 8080, UDP 5353,
    /// named `pod-a` / `pod-b`), writes `manifest` and starts both agents.
    pub fn new(prefix: &str, manifest: &str) -> anyhow::Result<Self> {
        let mut cluster = Self::without_agents(prefix)?;
        cluster.start_agents(manifest, &[])?;
        Ok(cluster)
    }

    /// Writes `manifest` and starts both agents (with `extra` flags).
    pub fn start_agents(&mut self, manifest: &str, extra: &[&str]) -> anyhow::Result<()> {
        self.manifests.write("cluster.yaml", manifest)?;
        for i in 0..2 {
            let agent = self.start_agent(i, Source::Manifests(&self.manifests.0), extra)?;
            self.agents.push(agent);
        }
        Ok(())
    }

    /// The network and an API server reachable in each node at
    /// https://127.0.0.1:6443 (as on a control-plane node); no agent yet.
    pub fn with_api_server_only(prefix: &str) -> anyhow::Result<Self> {
        let mut cluster = Self::without_agents(prefix)?;
        let api = TestApiServer::start(&cluster.lan, prefix)?;
        let forwarders = cluster
            .nodes
            .iter()
            .map(|node| Forwarder::start(&cluster.lan, node, api.port))
            .collect::<anyhow::Result<Vec<_>>>()?;
        cluster.api = Some((api, forwarders));
        Ok(cluster)
    }

    /// The same network with both agents watching one API server.
    pub fn with_api_server(prefix: &str) -> anyhow::Result<Self> {
        let mut cluster = Self::with_api_server_only(prefix)?;
        let kubeconfig = cluster
            .api
            .as_ref()
            .map(|(api, _)| api.kubeconfig.clone())
            .unwrap_or_default();
        for i in 0..2 {
            let agent = cluster.start_agent(i, Source::Kubeconfig(&kubeconfig), &[])?;
            cluster.agents.push(agent);
        }
        Ok(cluster)
    }

    /// Applies a manifest through the API server (API mode).
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let (api, _) = self
            .api
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not in API mode"))?;
        let yaml = yaml.to_owned();
        api.with_client(&self.lan, |c| crate::apiserver::apply(c, yaml))
    }

    /// The network, the pods and their servers; no agent yet.
    pub fn without_agents(prefix: &str) -> anyhow::Result<Self> {
        assert!(prefix.len() <= 6, "prefix too long for interface names");
        let ns = |name: &str| NetNs::new(&format!("{prefix}-{name}"));
        let lan = ns("lan")?;
        let nodes = [ns("node-a")?, ns("node-b")?];
        let pods = [ns("pod-a")?, ns("pod-b")?];
        let client_pods = [ns("cpod-a")?, ns("cpod-b")?];
        let clients = [ns("client1")?, ns("client2")?];
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        let on_lan = |peer: &NetNs, port: &str, addr: Ipv4Addr| -> anyhow::Result<()> {
            let lan_end = format!("{prefix}-{port}");
            lan.ip(&[
                "link", "add", &lan_end, "type", "veth", "peer", "name", "eth0", "netns",
                &peer.name,
            ])?;
            lan.ip(&["link", "set", &lan_end, "master", "br0", "up"])?;
            peer.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            peer.ip(&["link", "set", "eth0", "up"])?;
            Ok(())
        };
        for (i, node) in nodes.iter().enumerate() {
            on_lan(node, &format!("n{i}"), NODE_IPS[i])?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            node.ip(&[
                "route",
                "add",
                "default",
                "via",
                "198.18.0.1",
                "dev",
                "eth0",
                "onlink",
            ])?;
            let other = 1 - i;
            for (pod, name, subnet, addr) in [
                (&pods[i], "p", 10, POD_IPS[i]),
                (&client_pods[i], "q", 20, CLIENT_POD_IPS[i]),
            ] {
                add_pod(
                    node,
                    pod,
                    &format!("{prefix}-{name}{i}"),
                    subnet + i as u8,
                    addr,
                )?;
                node.ip(&[
                    "route",
                    "add",
                    &format!("198.18.{}.0/24", subnet + other as u8),
                    "via",
                    &NODE_IPS[other].to_string(),
                ])?;
            }
        }
        for (i, client) in clients.iter().enumerate() {
            on_lan(client, &format!("c{i}"), CLIENT_IPS[i])?;
            client.ip(&[
                "route",
                "add",
                "198.19.0.0/16",
                "via",
                &NODE_IPS[0].to_string(),
            ])?;
        }
        let servers = vec![
            BackendServers::start(&pods[0], "pod-a", 8080, 5353)?,
            BackendServers::start(&pods[1], "pod-b", 8080, 5353)?,
        ];
        let manifests = ScratchDir::new(&format!("lb-{prefix}-manifests"))?;
        Ok(Self {
            prefix: prefix.to_owned(),
            lan,
            nodes,
            pods,
            client_pods,
            clients,
            manifests,
            agents: Vec::new(),
            api: None,
            servers,
        })
    }

    /// Gives every namespace its IPv6 address too (`NODE_IPS6` and the
    /// rest, no duplicate address detection), the same routes, and servers
    /// in the pods on their IPv6 addresses, named as the IPv4 ones. Before
    /// the agents start: they take the node's addresses as they find them.
    pub fn add_ipv6(&mut self) -> anyhow::Result<()> {
        let add = |ns: &NetNs, addr: Ipv6Addr, dev: &str| {
            ns.ip(&["addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"])
        };
        let gateway = |a: Ipv6Addr| {
            let s = a.segments();
            Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 1)
        };
        for (i, node) in self.nodes.iter().enumerate() {
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            add(node, NODE_IPS6[i], "eth0")?;
            let other = 1 - i;
            for (pod, name, addr, remote) in [
                (&self.pods[i], "p", POD_IPS6[i], POD_IPS6[other]),
                (
                    &self.client_pods[i],
                    "q",
                    CLIENT_POD_IPS6[i],
                    CLIENT_POD_IPS6[other],
                ),
            ] {
                let gw = gateway(addr);
                add(node, gw, &format!("{}-{name}{i}", self.prefix))?;
                add(pod, addr, "eth0")?;
                pod.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])?;
                node.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("{}/64", gateway(remote)),
                    "via",
                    &NODE_IPS6[other].to_string(),
                ])?;
            }
        }
        for (i, client) in self.clients.iter().enumerate() {
            add(client, CLIENT_IPS6[i], "eth0")?;
            client.ip(&[
                "-6",
                "route",
                "add",
                SERVICE_PREFIX6,
                "via",
                &NODE_IPS6[0].to_string(),
            ])?;
        }
        for (i, name) in ["pod-a", "pod-b"].into_iter().enumerate() {
            let servers = BackendServers::start_on(&self.pods[i], POD_IPS6[i], name, 8080, 5353)?;
            self.servers.push(servers);
        }
        Ok(())
    }

    fn start_agent(&self, i: usize, source: Source<'_>, extra: &[&str]) -> anyhow::Result<Agent> {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-test-{}-{}-{}",
            self.prefix,
            NODE_NAMES[i],
            std::process::id()
        ));
        let log = std::env::temp_dir().join(format!(
            "lb-{}-{}-{}.log",
            self.prefix,
            NODE_NAMES[i],
            std::process::id()
        ));
        Agent::start_with(
            &self.nodes[i],
            source,
            &format!("{}-*", self.prefix),
            &pin_dir,
            &log,
            &[&["--node-name", NODE_NAMES[i]], extra].concat(),
        )
    }

    /// Replaces the manifest both agents read.
    pub fn set_manifest(&self, manifest: &str) -> anyhow::Result<()> {
        self.manifests.write("cluster.yaml", manifest)
    }

    /// Waits until both agents' maps satisfy `ready`.
    pub fn wait_for_maps(
        &mut self,
        what: &str,
        ready: impl Fn(&crate::maps::Maps) -> bool,
    ) -> anyhow::Result<()> {
        for agent in &mut self.agents {
            agent.wait_for_maps(what, &ready)?;
        }
        Ok(())
    }
}

/// A pod namespace on `node`: a veth `node_if` whose node end is the pod's
/// gateway `198.18.SUBNET.1/24`.
fn add_pod(
    node: &NetNs,
    pod: &NetNs,
    node_if: &str,
    subnet: u8,
    addr: Ipv4Addr,
) -> anyhow::Result<()> {
    let gateway = Ipv4Addr::new(198, 18, subnet, 1);
    node.ip(&[
        "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ])?;
    node.ip(&["addr", "add", &format!("{gateway}/24"), "dev", node_if])?;
    node.ip(&["link", "set", node_if, "up"])?;
    pod.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (they detach from the nodes' interfaces), then the
        // API server, then the namespaces go with their fields.
        self.agents.clear();
        self.api = None;
    }
}

/// Service `shop/web` of type `type_` (TCP 80 → 8080 at node port 30080,
/// UDP 53 → 5353 at 30053; the node ports where the type has them), with
/// `spec` lines added to its spec, an optional `status` block, and its
/// slice's endpoints as (address, node name): IPv4, or IPv6 (an
/// IPv6-only Service) with an IPv6 cluster IP.
pub fn web_service<A: Into<std::net::IpAddr> + Copy + std::fmt::Display>(
    type_: &str,
    cluster_ip: A,
    spec: &str,
    status: &str,
    endpoints: &[(A, &str)],
) -> String {
    let (family, address_type) = if cluster_ip.into().is_ipv6() {
        ("IPv6", "IPv6")
    } else {
        ("IPv4", "IPv4")
    };
    let mut list: String = endpoints
        .iter()
        .map(|(addr, node)| format!("\n- {{addresses: [\"{addr}\"], nodeName: {node}}}"))
        .collect();
    if list.is_empty() {
        list = " []".into();
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: {type_}
  clusterIP: "{cluster_ip}"
  ipFamilies: [{family}]
  {spec}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}
  - {{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}
{status}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: {address_type}
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:{list}
"#
    )
}
