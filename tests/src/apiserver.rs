//! A real Kubernetes API server for tests: etcd plus lb-apiserver (the real
//! k8s.io/apiserver library, see tests/apiserver/), both on the loopback of
//! the node namespace where the agent runs. Built and cached by
//! tests/apiserver/build.sh; stopped (by PID) on drop.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use kube::{Client, Config};

use crate::{netns::NetNs, process::terminate, topology::ScratchDir};

pub fn binaries_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("LB_APISERVER_BIN_DIR")
            .unwrap_or_else(|_| "/var/cache/lb-apiserver/bin".into()),
    );
    assert!(
        dir.join("lb-apiserver").exists() && dir.join("etcd").exists(),
        "{}: test API server not built: run tests/apiserver/build.sh (cargo xtask test does)",
        dir.display()
    );
    dir
}

pub struct TestApiServer {
    netns_path: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    pub dir: ScratchDir,
    pub port: u16,
    etcd_port: u16,
    pub kubeconfig: PathBuf,
}

impl TestApiServer {
    /// Starts etcd and the API server on the loopback of `ns`.
    pub fn start(ns: &NetNs, name: &str) -> anyhow::Result<Self> {
        let bins = binaries_dir();
        let dir = ScratchDir::new(&format!("{name}-apiserver"))?;
        let (port, etcd_port) = (6443, 2379);
        let kubeconfig = dir.0.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\n\
                 users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n"
            ),
        )?;
        let etcd = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(bins.join("etcd"))
            .arg("--data-dir")
            .arg(dir.0.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
            ])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .args([
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("etcd.log"))?)
            .spawn()
            .context("starting etcd")?;
        let mut server = Self {
            netns_path: ns.path(),
            etcd: Some(etcd),
            apiserver: None,
            dir,
            port,
            etcd_port,
            kubeconfig,
        };
        server.wait_etcd(ns)?;
        server.start_apiserver(ns)?;
        Ok(server)
    }

    fn wait_etcd(&self, ns: &NetNs) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if ns
                .run(|| etcd_call(self.etcd_port, "GET", "/health", ""))
                .is_ok_and(|r| r.contains("true"))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "etcd did not become healthy:\n{}",
            std::fs::read_to_string(self.dir.0.join("etcd.log")).unwrap_or_default()
        )
    }

    pub fn start_apiserver(&mut self, ns: &NetNs) -> anyhow::Result<()> {
        let child = self.spawn_apiserver(self.port)?;
        self.apiserver = Some(child);
        self.wait_ready(ns, self.port)
    }

    fn spawn_apiserver(&self, port: u16) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.0.join("apiserver.log"))?;
        Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path.display()))
            .arg(binaries_dir().join("lb-apiserver"))
            .args([
                "--etcd",
                &format!("http://127.0.0.1:{}", self.etcd_port),
                "--port",
                &port.to_string(),
            ])
            .arg("--cert-dir")
            .arg(self.dir.0.join(format!("certs-{port}")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lb-apiserver")
    }

    fn wait_ready(&self, ns: &NetNs, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .with_client_on(ns, port, |client| async move {
                    client
                        .apiserver_version()
                        .await
                        .map_err(anyhow::Error::from)
                })
                .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "lb-apiserver on port {port} did not become ready:\n{}",
            self.log()
        )
    }

    /// Runs `f` against a second API server on the same etcd, started for the
    /// call: writes the agent's server (`port`) never streams to the agent.
    pub fn with_side_server<T: Send, F, Fut>(&self, ns: &NetNs, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Client) -> Fut + Send,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let port = self.port + 1;
        let mut child = self.spawn_apiserver(port)?;
        let result = self
            .wait_ready(ns, port)
            .and_then(|()| self.with_client_on(ns, port, f));
        let _ = child.kill();
        let _ = child.wait();
        result
    }

    /// Kills the API server (a crash: no graceful drain of open watches).
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("apiserver.log")).unwrap_or_default()
    }

    /// Runs `f` with a client inside the namespace (the server is on its loopback).
    pub fn with_client<T: Send, F, Fut>(&self, ns: &NetNs, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Client) -> Fut + Send,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        self.with_client_on(ns, self.port, f)
    }

    fn with_client_on<T: Send, F, Fut>(&self, ns: &NetNs, port: u16, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Client) -> Fut + Send,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let kubeconfig = self.kubeconfig.clone();
        let server = format!("https://127.0.0.1:{port}");
        ns.run(move || {
            // A current-thread runtime: every socket is created on this thread, in the namespace.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
                let mut config = Config::from_custom_kubeconfig(kc, &Default::default()).await?;
                config.cluster_url = server.parse()?;
                f(Client::try_from(config)?).await
            })
        })
    }

    /// Compacts etcd's history up to now: older resourceVersions become `410 Gone`.
    pub fn compact(&self, ns: &NetNs) -> anyhow::Result<u64> {
        let port = self.etcd_port;
        ns.run(|| {
            let range = etcd_call(port, "POST", "/v3/kv/range", r#"{"key":"AA=="}"#)?;
            let value: serde_json::Value = serde_json::from_str(&range)?;
            let revision: u64 = value["header"]["revision"]
                .as_str()
                .context("etcd revision")?
                .parse()?;
            etcd_call(
                port,
                "POST",
                "/v3/kv/compaction",
                &format!(r#"{{"revision":"{revision}","physical":true}}"#),
            )?;
            Ok(revision)
        })
    }
}

/// One HTTP/1.0 request to etcd's JSON gateway.
fn etcd_call(port: u16, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path}: {head}");
    }
    Ok(body.to_owned())
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut etcd) = self.etcd.take() {
            let _ = terminate(&mut etcd, Duration::from_secs(10));
        }
    }
}

/// Server-side applies every object of a manifest.
pub async fn apply(client: Client, yaml: String) -> anyhow::Result<()> {
    use k8s_openapi::{
        api::{
            core::v1::{Node, Service},
            discovery::v1::EndpointSlice,
        },
        serde::Deserialize as _,
    };
    use kube::{
        api::{Patch, PatchParams},
        Api,
    };
    let (objects, errors) = lb_agent::source::manifest::parse_typed(&yaml, None)?;
    anyhow::ensure!(errors.is_empty(), "{errors:?}");
    let params = PatchParams::apply("lb-tests").force();
    // Nodes too; any other kind is a mistake in the test, not to be ignored.
    for doc in yaml_serde::Deserializer::from_str(&yaml) {
        let value = yaml_serde::Value::deserialize(doc)?;
        match value["kind"].as_str() {
            Some("Service" | "EndpointSlice") => {}
            Some("Node") => {
                let node: Node = yaml_serde::from_value(value)?;
                let name = node.metadata.name.clone().unwrap_or_default();
                Api::<Node>::all(client.clone())
                    .patch(&name, &params, &Patch::Apply(&node))
                    .await?;
            }
            None if value.is_null() => {}
            other => anyhow::bail!("apply: kind {other:?} is not served by the test API server"),
        }
    }
    for s in objects.services {
        let ns = s.object.metadata.namespace.clone().unwrap_or_default();
        let name = s.object.metadata.name.clone().unwrap_or_default();
        Api::<Service>::namespaced(client.clone(), &ns)
            .patch(&name, &params, &Patch::Apply(&s.object))
            .await?;
    }
    for s in objects.slices {
        let ns = s.object.metadata.namespace.clone().unwrap_or_default();
        let name = s.object.metadata.name.clone().unwrap_or_default();
        Api::<EndpointSlice>::namespaced(client.clone(), &ns)
            .patch(&name, &params, &Patch::Apply(&s.object))
            .await?;
    }
    Ok(())
}

/// Makes the API server (on the loopback of `server_ns`) reachable at the
/// same address on the loopback of `client_ns`: the test's stand-in for a
/// control plane the nodes reach over the network (the test server only
/// listens on 127.0.0.1). Stops when dropped.
pub struct Forwarder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(server_ns: &NetNs, client_ns: &NetNs, port: u16) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = client_ns.run(|| std::net::TcpListener::bind(("127.0.0.1", port)))?;
        listener.set_nonblocking(true)?;
        let server_path = server_ns.path();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            // Sockets keep the namespace they were made in: connect from a
            // thread inside the server's namespace.
            let file = std::fs::File::open(&server_path).expect("server namespace");
            nix::sched::setns(
                std::os::fd::AsFd::as_fd(&file),
                nix::sched::CloneFlags::CLONE_NEWNET,
            )
            .expect("setns");
            while !flag.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let _ = inbound.set_nonblocking(false);
                for (mut from, mut to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
