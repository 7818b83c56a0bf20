//! Every manifest under deploy/ parses as the k8s-openapi object it claims to
//! be, and the DaemonSet asks for what the agent needs and no more.

use std::{fs, path::Path};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize as _;
use yaml_serde::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/base")
        .join(file);
    let text = fs::read_to_string(&path).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    yaml_serde::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:?}"))
}

#[test]
fn rbac_grants_only_reads_of_services_endpointslices_and_nodes() {
    let docs = documents("rbac.yaml");
    let mut kinds = Vec::new();
    for doc in &docs {
        match doc["kind"].as_str().unwrap() {
            "ServiceAccount" => drop(typed::<ServiceAccount>(doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc)),
            "ClusterRole" => {
                let role: ClusterRole = typed(doc);
                for rule in role.rules.unwrap() {
                    assert_eq!(rule.verbs, ["get", "list", "watch"]);
                    let resources = rule.resources.unwrap();
                    assert!(
                        resources == ["services"]
                            || resources == ["endpointslices"]
                            || resources == ["nodes"],
                        "{resources:?}"
                    );
                }
            }
            other => panic!("unexpected kind {other}"),
        }
        kinds.push(doc["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        kinds,
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
    );
}

#[test]
fn daemonset_is_unprivileged_with_the_needed_capabilities_and_probes() {
    let docs = documents("daemonset.yaml");
    assert_eq!(docs.len(), 1);
    let ds: DaemonSet = typed(&docs[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-agent"));
    let container = &pod.containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref().unwrap(),
        ["BPF", "NET_ADMIN", "PERFMON"]
    );
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
    // The probes use the probe port, which kube-proxy never holds: beside
    // kube-proxy (a migration) 10256 answers kube-proxy's /healthz, and it
    // has no /readyz.
    let args = container.args.as_ref().unwrap();
    assert!(args
        .iter()
        .any(|a| a == "--healthz-bind-address=0.0.0.0:10256"));
    let probe_port = args
        .iter()
        .find_map(|a| a.strip_prefix("--probe-bind-address=127.0.0.1:"))
        .expect("a probe port on the loopback")
        .parse::<i32>()
        .unwrap();
    assert!(
        ![10249, 10256].contains(&probe_port),
        "{probe_port} is kube-proxy's"
    );
    for (probe, path) in [
        (&container.startup_probe, "/livez"),
        (&container.liveness_probe, "/livez"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(probe_port)
        );
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    }
    // No interface name that a node may lack: the uplink by route, the rest by glob.
    let interfaces = args
        .iter()
        .find_map(|a| a.strip_prefix("--interfaces="))
        .unwrap();
    for pattern in interfaces.split(',') {
        assert!(
            pattern == "@uplink" || pattern == "@pods" || pattern.ends_with('*'),
            "{pattern} must exist on every node"
        );
    }
    for overlay in ["@pods", "vxlan*", "genev*", "flannel*"] {
        assert!(interfaces.split(',').any(|p| p == overlay), "{overlay}");
    }
    // Socket LB for host-network clients, at the host's cgroup2 root as
    // mounted: no hostPID, no SYS_ADMIN (only the host namespace's sockets).
    assert!(args.iter().any(|a| a == "--socket-lb=host-network"));
    let cgroup_path = args
        .iter()
        .find_map(|a| a.strip_prefix("--cgroup-path="))
        .expect("--cgroup-path");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == cgroup_path)
        .expect("the cgroup path is a mount");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/cgroup")
    );
    assert_ne!(pod.host_pid, Some(true));
    let env = container.env.as_ref().unwrap();
    assert!(env.iter().any(|e| e.name == "LB_API_SERVER"));
    assert!(pod.volumes.unwrap().iter().any(|v| v
        .host_path
        .as_ref()
        .is_some_and(|h| h.path == "/sys/fs/bpf")));
}

#[test]
fn example_manifests_are_valid_input() {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/demo.yaml"),
    )
    .unwrap();
    let (objects, errors) = lb_agent::source::manifest::parse_str(&text, None).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let (desired, errors) = lb_agent::desired::compute(
        &objects,
        lb_agent::desired::Limits {
            max_backends_per_service: 16,
            lb_algorithm: lb_agent::desired::LbAlgorithm::Random,
            ..lb_agent::desired::Limits::DEFAULT
        },
        Default::default(),
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        desired.frontends.len(),
        7,
        "web ×2 per family (dual-stack), starting, kube-dns ×2 (headless: none)"
    );
    let ipv6 = desired
        .frontends
        .keys()
        .filter(|f| f.addr.is_ipv6())
        .count();
    assert_eq!(ipv6, 2, "web's IPv6 cluster IP, TCP 80 and UDP 53");
}
