//! The test and demo network: a client pod, the node, and backend pods, each
//! in its own namespace, joined by veth pairs to the node (addresses in
//! 198.18.0.0/15 only). The agent runs in the node namespace.
//!
//! ```text
//!  client 198.18.1.2 ──veth── node (lb-agent, tc ingress+egress on P-*) ──veth── backend i 198.18.(10+i).2
//! ```

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{maps::Maps, netns::NetNs, servers::BackendServers};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// With `Topology::add_ipv6` (documentation range 2001:db8::/32 only).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);

/// Names the datapath does not hold: a headless Service `db.demo` (one
/// ready endpoint 198.18.2.7, one not ready) and an ExternalName
/// `mail.demo` → mail.example.org.
pub const HEADLESS_AND_EXTERNAL_NAME: &str = r#"apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: demo
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: ["198.18.2.7"]
  conditions: {ready: true}
  nodeName: node-a
- addresses: ["198.18.2.8"]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: mail, namespace: demo}
spec:
  type: ExternalName
  externalName: mail.example.org
"#;

pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 10 + i as u8, 2)
}

/// Backend `i`'s IPv6 address (with `Topology::add_ipv6`).
pub fn backend_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x10 + i as u16, 0, 0, 0, 0, 2)
}

pub struct Topology {
    pub prefix: String,
    pub node: NetNs,
    pub client: NetNs,
    pub backends: Vec<NetNs>,
}

impl Topology {
    /// `prefix` names everything (≤ 8 characters: interface names are `PREFIX-b12`).
    pub fn new(prefix: &str, backends: usize) -> anyhow::Result<Self> {
        assert!(prefix.len() <= 8, "prefix too long for interface names");
        let node = NetNs::new(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let client = NetNs::new(&format!("{prefix}-client"))?;
        let mut topology = Self {
            prefix: prefix.to_owned(),
            node,
            client,
            backends: Vec::new(),
        };
        topology.link(
            &topology.client,
            &format!("{}-c", topology.prefix),
            Ipv4Addr::new(198, 18, 1, 1),
            CLIENT_IP,
        )?;
        for _ in 0..backends {
            topology.add_backend()?;
        }
        Ok(topology)
    }

    /// Adds backend pod number `backends.len()`; returns its index.
    pub fn add_backend(&mut self) -> anyhow::Result<usize> {
        let i = self.backends.len();
        let ns = NetNs::new(&format!("{}-be{i}", self.prefix))?;
        let ip = backend_ip(i);
        let gateway = Ipv4Addr::new(198, 18, 10 + i as u8, 1);
        self.link(&ns, &format!("{}-b{i}", self.prefix), gateway, ip)?;
        self.backends.push(ns);
        Ok(i)
    }

    /// Starts HTTP (8080) and UDP (5353) servers in every backend pod, named
    /// `{name_prefix}{i}`.
    pub fn serve_backends(&self, name_prefix: &str) -> anyhow::Result<Vec<BackendServers>> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, ns)| BackendServers::start(ns, &format!("{name_prefix}{i}"), 8080, 5353))
            .collect()
    }

    /// Gives the client and every backend an IPv6 address too (a /64 per
    /// link, the node's end `::1`, without duplicate address detection so
    /// it is usable at once), and lets the node forward IPv6.
    pub fn add_ipv6(&self) -> anyhow::Result<()> {
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let gateway = |a: Ipv6Addr| {
            let s = a.segments();
            Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 1)
        };
        let links = std::iter::once((&self.client, format!("{}-c", self.prefix), CLIENT_IP6))
            .chain(
                self.backends
                    .iter()
                    .enumerate()
                    .map(|(i, ns)| (ns, format!("{}-b{i}", self.prefix), backend_ip6(i))),
            );
        for (pod, node_if, ip) in links {
            let gw = gateway(ip);
            self.node
                .ip(&["addr", "add", &format!("{gw}/64"), "dev", &node_if, "nodad"])?;
            pod.ip(&["addr", "add", &format!("{ip}/64"), "dev", "eth0", "nodad"])?;
            pod.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])?;
        }
        // The links' link-local addresses are still tentative (duplicate
        // address detection, ≈ 1–2 s after a link comes up): a first
        // connection meanwhile loses its SYN to neighbour discovery and
        // waits a second for the retransmit. A node's links are long up;
        // wait for that here, as a test or bench must not measure it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let namespaces = std::iter::once(&self.node)
            .chain(std::iter::once(&self.client))
            .chain(&self.backends);
        for ns in namespaces {
            while ns.has_tentative_ipv6()? {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "{}: IPv6 addresses still tentative after 10 s",
                    ns.name
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The interface pattern the agent attaches to in the node namespace.
    pub fn interface_pattern(&self) -> String {
        format!("{}-*", self.prefix)
    }

    /// A veth pair: `node_if` (gateway address) in the node, `eth0` in `pod`.
    fn link(
        &self,
        pod: &NetNs,
        node_if: &str,
        gateway: Ipv4Addr,
        pod_ip: Ipv4Addr,
    ) -> anyhow::Result<()> {
        self.node.ip(&[
            "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ])?;
        self.node
            .ip(&["addr", "add", &format!("{gateway}/24"), "dev", node_if])?;
        self.node.ip(&["link", "set", node_if, "up"])?;
        self.node
            .sysctl(&format!("net.ipv4.conf.{node_if}.rp_filter"), "0")?;
        pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        Ok(())
    }
}

/// The lb-agent binary built by `cargo xtask` (or named by `LB_AGENT_BIN`).
pub fn agent_binary() -> PathBuf {
    let path = std::env::var_os("LB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"));
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// `lb-agent COMMAND ARGS --json --pin-dir PIN_DIR`, its output parsed
/// (the command must succeed).
pub fn agent_json(pin_dir: &Path, command: &str, args: &[&str]) -> serde_json::Value {
    let out = crate::process::stdout_of(
        std::process::Command::new(agent_binary())
            .arg(command)
            .args(args)
            .args(["--json", "--pin-dir"])
            .arg(pin_dir),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lb-agent {command}: {e}: {out}"))
}

/// Where the agent reads Services and EndpointSlices from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Manifests(&'a Path),
    Kubeconfig(&'a Path),
}

/// An `lb-agent run` process in the node namespace; stopped on drop.
pub struct Agent {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    /// Remove the pins on drop (off when a test hands them to the next agent).
    pub cleanup_pins: bool,
}

impl Agent {
    pub fn start(
        node: &NetNs,
        manifests: &Path,
        interfaces: &str,
        pin_dir: &Path,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with(
            node,
            Source::Manifests(manifests),
            interfaces,
            pin_dir,
            log,
            extra,
        )
    }

    pub fn start_with(
        node: &NetNs,
        source: Source<'_>,
        interfaces: &str,
        pin_dir: &Path,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(node, &[], source, interfaces, pin_dir, log, extra)
    }

    /// `lb-agent ARGS` as a deployment runs it: exactly `args` and `env`
    /// (nothing added), as root with only `capabilities`, in `node`.
    pub fn start_deployed(
        node: &NetNs,
        capabilities: &[String],
        args: &[String],
        env: &[(String, String)],
        pin_dir: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut command = Self::command(node, &setpriv(capabilities), log)?;
        command.args(args).env_clear().envs(env.iter().cloned());
        Self::launch(command, pin_dir, log)
    }

    fn spawn(
        node: &NetNs,
        wrapper: &[String],
        source: Source<'_>,
        interfaces: &str,
        pin_dir: &Path,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (flag, path) = match source {
            Source::Manifests(dir) => ("--manifests", dir),
            Source::Kubeconfig(file) => ("--kubeconfig", file),
        };
        let mut command = Self::command(node, wrapper, log)?;
        command
            .args(["run", flag])
            .arg(path)
            .args(["--interfaces", interfaces, "--pin-dir"])
            .arg(pin_dir)
            .args(if extra.contains(&"--poll-interval-ms") {
                &[][..]
            } else {
                &["--poll-interval-ms", "50"][..]
            })
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        Self::launch(command, pin_dir, log)
    }

    /// The agent binary in `node` behind `wrapper`, its log to `log`.
    fn command(node: &NetNs, wrapper: &[String], log: &Path) -> anyhow::Result<Command> {
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // nsenter, not `ip netns exec`: the latter remounts /sys and hides the host bpffs.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", node.path().display()))
            .args(wrapper)
            .arg(agent_binary())
            .stdout(Stdio::null())
            .stderr(log_file);
        Ok(command)
    }

    fn launch(mut command: Command, pin_dir: &Path, log: &Path) -> anyhow::Result<Self> {
        let child = command.spawn().context("starting lb-agent")?;
        Ok(Self {
            child: Some(child),
            pin_dir: pin_dir.to_owned(),
            log: log.to_owned(),
            cleanup_pins: true,
        })
    }

    /// The agent's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The events of an agent started with `--log-format json`, in order,
    /// each with `message` and its fields at the top.
    pub fn log_events(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|e| e["fields"].clone())
            .collect()
    }

    /// The first event whose message is `message`, if logged yet.
    pub fn log_event(&self, message: &str) -> Option<serde_json::Value> {
        self.log_events()
            .into_iter()
            .find(|e| e["message"] == message)
    }

    /// Waits until the programmed maps satisfy `ready`; returns them.
    pub fn wait_for_maps(
        &mut self,
        what: &str,
        ready: impl Fn(&Maps) -> bool,
    ) -> anyhow::Result<Maps> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "lb-agent exited ({status}) while waiting for {what}:\n{}",
                        self.log_text()
                    );
                }
            }
            if let Ok(maps) = Maps::read(&self.pin_dir) {
                if ready(&maps) {
                    return Ok(maps);
                }
                if Instant::now() > deadline {
                    bail!(
                        "timed out waiting for {what}; maps:\n{}\nagent log:\n{}",
                        maps.text,
                        self.log_text()
                    );
                }
            } else if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; maps not pinned; agent log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `within` for the agent to exit on its own; its status.
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("agent already stopped")
        };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// SIGKILL (a crash, an OOM kill): no cleanup runs.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped")
        };
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped")
        };
        crate::process::terminate(&mut child, Duration::from_secs(10))?
            .ok_or_else(|| anyhow::anyhow!("lb-agent ignored SIGTERM for 10 s"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        if !self.cleanup_pins {
            return;
        }
        lb_agent::datapath::cleanup::remove_datapath(&self.pin_dir);
    }
}

/// `setpriv` keeping only `capabilities` (names as in a Pod's
/// `securityContext`) in the bounding set: root as in a container that
/// drops ALL and adds them.
fn setpriv(capabilities: &[String]) -> Vec<String> {
    let set: String = capabilities
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    vec![
        "setpriv".to_owned(),
        format!("--bounding-set=-all{set}"),
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ]
}

/// A scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    /// Writes a file atomically (write + rename), as an operator's tooling should.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.0.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.0.join(name))?;
        Ok(())
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `web_manifest` over IPv6: the Service at `VIP6`, one IPv6 slice.
pub fn web_manifest6(backends: &[Ipv6Addr]) -> String {
    service_manifest6("web", VIP6, backends)
}

/// An IPv6-only Service `name` at `vip` (TCP 80 → 8080, UDP 53 → 5353)
/// with one IPv6 slice of `backends` (none: a slice without endpoints).
pub fn service_manifest6(name: &str, vip: Ipv6Addr, backends: &[Ipv6Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n"))
        .collect();
    let endpoints = if endpoints.is_empty() {
        " []\n".to_owned()
    } else {
        format!("\n{endpoints}")
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  clusterIP: "{vip}"
  clusterIPs: ["{vip}"]
  ipFamilies: [IPv6]
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: echo, port: 53, targetPort: 5353, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-v6
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv6
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: echo, port: 5353, protocol: UDP}}
endpoints:{endpoints}"#
    )
}

/// Manifest for service `web` (TCP 80 → `http` 8080, UDP 53 → 5353) with the
/// given backends as (address, ready).
pub fn web_manifest(backends: &[(Ipv4Addr, bool)]) -> String {
    let mut endpoints = String::new();
    for (addr, ready) in backends {
        endpoints.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  conditions: {{ready: {ready}}}\n"
        ));
    }
    if endpoints.is_empty() {
        endpoints = "[]\n".into();
    } else {
        endpoints.insert(0, '\n');
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, targetPort: http, protocol: TCP}}
  - {{name: echo, port: 53, targetPort: 5353, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: echo, port: 5353, protocol: UDP}}
endpoints: {endpoints}"#
    )
}
