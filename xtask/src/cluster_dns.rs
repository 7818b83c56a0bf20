//! The demo's cluster DNS: dnsmasq (a Debian package) in pod namespaces
//! behind the `kube-dns` ClusterIP, serving the records the Kubernetes DNS
//! specification (CoreDNS's `kubernetes` plugin) gives the same manifests:
//! - `SVC.NS.svc.cluster.local` A and AAAA → the cluster IPs of each
//!   family; for a headless Service A and AAAA → each ready endpoint's
//!   address; for ExternalName a CNAME;
//! - `_PORT._PROTO.SVC.NS.svc.cluster.local` SRV per named port → the
//!   Service name and port (headless: each endpoint's name and port).
//!
//! Names under cluster.local that no Service has are NXDOMAIN.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};
use lb_agent::{model::ServiceName, source::objects::Objects, source::store::ObjectStore};
use lb_tests::netns::NetNs;

const ZONE: &str = "svc.cluster.local";

/// dnsmasq configuration lines holding the records of `objects`.
pub fn records(objects: &Objects) -> String {
    let store = ObjectStore::from_objects(objects);
    let mut out = String::from("local=/cluster.local/\n");
    for service in store.services().map(|s| &s.object) {
        let Some(spec) = &service.spec else { continue };
        let name = format!("{}.{}.{ZONE}", service.name, service.namespace);
        if spec.type_.as_deref() == Some("ExternalName") {
            if let Some(target) = &spec.external_name {
                let _ = writeln!(out, "cname={name},{target}");
            }
            continue;
        }
        let headless = spec.cluster_ip.as_deref() == Some("None");
        let service_name = ServiceName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        };
        let ready: BTreeSet<IpAddr> = store
            .input(&service_name)
            .slices
            .iter()
            .flat_map(|s| &s.object.endpoints)
            .filter(|e| e.ready != Some(false))
            .filter_map(|e| e.address.as_ref()?.to_string().parse().ok())
            .collect();
        // A pod's own name: its address with dashes (CoreDNS's form).
        let pod_host = |ip: &IpAddr| format!("{}.{name}", ip.to_string().replace(['.', ':'], "-"));
        if headless {
            for ip in &ready {
                let _ = writeln!(out, "host-record={name},{ip}");
                let _ = writeln!(out, "host-record={},{ip}", pod_host(ip));
            }
        } else {
            // `clusterIPs` (both families), or the older `clusterIP` alone.
            let single = spec.cluster_ip.iter().cloned().collect::<Vec<_>>();
            let ips = spec.cluster_ips.as_ref().unwrap_or(&single);
            for ip in ips.iter().filter(|ip| ip.parse::<IpAddr>().is_ok()) {
                let _ = writeln!(out, "host-record={name},{ip}");
            }
        }
        for port in &spec.ports {
            let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let proto = port
                .protocol
                .as_ref()
                .map_or("tcp".to_owned(), |p| p.as_str().to_ascii_lowercase());
            let srv = format!("_{port_name}._{proto}.{name}");
            if headless {
                for ip in &ready {
                    let _ = writeln!(out, "srv-host={srv},{},{}", pod_host(ip), port.port);
                }
            } else {
                let _ = writeln!(out, "srv-host={srv},{name},{}", port.port);
            }
        }
    }
    out
}

/// dnsmasq on `listen`:53 (UDP and TCP) inside `ns`; killed on drop.
pub struct DnsServer {
    child: Child,
}

impl DnsServer {
    pub fn start(ns: &NetNs, listen: Ipv4Addr, records: &Path, log: &Path) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--port=53",
            ])
            .arg(format!("--listen-address={listen}"))
            .arg(format!("--conf-file={}", records.display()))
            .arg(format!("--log-facility={}", log.display()))
            .args(["--log-queries", "--pid-file=", "--user=root"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        let mut server = Self { child };
        // Ready when it answers on TCP 53.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !ns.run(|| {
            std::net::TcpStream::connect_timeout(
                &(listen, 53).into(),
                std::time::Duration::from_millis(100),
            )
            .is_ok()
        }) {
            if let Some(status) = server.child.try_wait()? {
                bail!("dnsmasq exited: {status} (see {})", log.display());
            }
            if std::time::Instant::now() > deadline {
                bail!("dnsmasq not listening on {listen}:53");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/etc/netns/NS/resolv.conf`, which `ip netns exec NS` mounts over
/// `/etc/resolv.conf`: the pod's resolver, as the kubelet writes it.
/// Removed on drop.
pub struct PodResolvConf {
    dir: PathBuf,
}

impl PodResolvConf {
    pub fn write(ns: &NetNs, nameserver: Ipv4Addr, namespace: &str) -> anyhow::Result<Self> {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {nameserver}\nsearch {namespace}.{ZONE} {ZONE} cluster.local\noptions ndots:5\n"
            ),
        )?;
        Ok(Self { dir })
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command` in `ns` through `ip netns exec` (so the pod's resolv.conf
/// applies), with `env`; its stdout, failing with its stderr.
pub fn exec_in(ns: &NetNs, env: &[(&str, &str)], command: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(command)
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running {}", command[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}{}",
            command.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_follow_the_kubernetes_dns_spec() {
        let (objects, errors) =
            lb_agent::source::manifest::parse_str(crate::demo::MANIFEST, None).unwrap();
        assert!(errors.is_empty());
        let text = records(&objects);
        for line in [
            "host-record=web.demo.svc.cluster.local,198.19.0.10",
            "host-record=web.demo.svc.cluster.local,2001:db8:ffff::10",
            "srv-host=_http._tcp.web.demo.svc.cluster.local,web.demo.svc.cluster.local,80",
            "srv-host=_echo._udp.web.demo.svc.cluster.local,web.demo.svc.cluster.local,53",
            "host-record=kube-dns.kube-system.svc.cluster.local,198.19.0.53",
            "host-record=web-pods.demo.svc.cluster.local,198.18.11.2",
            "srv-host=_http._tcp.web-pods.demo.svc.cluster.local,198-18-11-2.web-pods.demo.svc.cluster.local,8080",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
