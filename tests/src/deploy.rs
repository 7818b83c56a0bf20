//! `deploy/daemonset.yaml` as tests run it: its container's capabilities,
//! arguments and environment, with only what the pod's mounts and the
//! kubelet would provide swapped for the test's own (the node's cgroup and
//! pin directory, the netfilter sysctls, the node name).

use std::path::Path;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};

/// The DaemonSet's container.
pub fn container() -> Container {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/daemonset.yaml");
    let ds: DaemonSet = yaml_serde::from_str(&text).expect("a DaemonSet");
    ds.spec.unwrap().template.spec.unwrap().containers.remove(0)
}

/// `capabilities.add`, after checking it drops ALL and is not privileged.
pub fn capabilities() -> Vec<String> {
    let security = container().security_context.expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    capabilities.add.expect("capabilities.add")
}

/// The container's arguments, with the mount paths pointed at this
/// node's: `--cgroup-path` (the host cgroup2 mount) at `cgroup`,
/// `--conntrack-sysctl-dir` (the host's netfilter sysctls) at the node's
/// own, and a `--pin-dir` of its own (nodes on one kernel share bpffs).
/// `interfaces` replaces `--interfaces` where given.
pub fn args(cgroup: &Path, pin_dir: &Path, interfaces: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = container()
        .args
        .expect("args")
        .into_iter()
        .map(|a| {
            if a.starts_with("--cgroup-path=") {
                format!("--cgroup-path={}", cgroup.display())
            } else if a.starts_with("--conntrack-sysctl-dir=") {
                "--conntrack-sysctl-dir=/proc/sys/net/netfilter".to_owned()
            } else if let (Some(_), Some(list)) = (a.strip_prefix("--interfaces="), interfaces) {
                format!("--interfaces={list}")
            } else {
                a
            }
        })
        .collect();
    args.push(format!("--pin-dir={}", pin_dir.display()));
    args
}

/// The container's environment: values as written, `LB_API_SERVER` as the
/// operator sets it, `NODE_NAME` as the kubelet fills it from
/// `spec.nodeName`; and `KUBECONFIG` standing in for the service account's
/// token the pod would have.
pub fn env(node_name: &str, api_server: &str, kubeconfig: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = container()
        .env
        .expect("env")
        .into_iter()
        .map(|e| {
            let value = match e.name.as_str() {
                "LB_API_SERVER" => api_server.to_owned(),
                _ if e.value_from.is_some() => {
                    let field = e.value_from.and_then(|v| v.field_ref).map(|f| f.field_path);
                    assert_eq!(field.as_deref(), Some("spec.nodeName"), "{}", e.name);
                    node_name.to_owned()
                }
                _ => e.value.unwrap_or_default(),
            };
            (e.name, value)
        })
        .collect();
    env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    env
}
