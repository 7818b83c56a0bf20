//! The deploy manifests as tests run them: `deploy/base` or an overlay,
//! rendered by `kubectl kustomize` as an operator's `kubectl apply -k`
//! would, and its DaemonSet's container run with its capabilities,
//! arguments and environment — only what the pod's mounts and the kubelet
//! provide swapped for the test's own (the node's cgroup and pin
//! directory, the netfilter sysctls, files mounted from ConfigMaps, the
//! node name).

use std::path::{Path, PathBuf};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};

/// A rendered kustomization of `deploy/`.
pub struct Deployment {
    pub daemonset: DaemonSet,
    /// `--flag=value` arguments whose value is a path inside the pod,
    /// replaced by the test's.
    paths: Vec<(String, PathBuf)>,
}

/// `kubectl kustomize deploy/DIR`: each document of the output.
pub fn render(dir: &str) -> Vec<yaml_serde::Value> {
    use k8s_openapi::serde::Deserialize as _;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(dir);
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("kubectl (with kustomize) on PATH");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| yaml_serde::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

impl Deployment {
    /// `deploy/DIR` (`base`, `overlays/NAME`), rendered.
    pub fn rendered(dir: &str) -> Self {
        let daemonset = render(dir)
            .into_iter()
            .find(|d| d["kind"].as_str() == Some("DaemonSet"))
            .expect("a DaemonSet");
        Self {
            daemonset: yaml_serde::from_value(daemonset).expect("a DaemonSet"),
            paths: Vec::new(),
        }
    }

    /// The value of `--flag=…` replaced by `path` (a file or directory the
    /// pod would have mounted).
    pub fn with_path(mut self, flag: &str, path: &Path) -> Self {
        self.paths.push((flag.to_owned(), path.to_owned()));
        self
    }

    pub fn container(&self) -> Container {
        let spec = self.daemonset.spec.clone().unwrap().template.spec.unwrap();
        spec.containers.into_iter().next().expect("a container")
    }

    /// `capabilities.add`, after checking it drops ALL and is not privileged.
    pub fn capabilities(&self) -> Vec<String> {
        let security = self.container().security_context.expect("securityContext");
        assert_ne!(security.privileged, Some(true));
        let capabilities = security.capabilities.expect("capabilities");
        assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        capabilities.add.expect("capabilities.add")
    }

    /// The container's arguments, with the mount paths pointed at this
    /// node's: `--cgroup-path` (the host cgroup2 mount) at `cgroup`,
    /// `--conntrack-sysctl-dir` (the host's netfilter sysctls) at the
    /// node's own, the `with_path` ones, and a `--pin-dir` of its own
    /// (nodes on one kernel share bpffs). `interfaces` replaces
    /// `--interfaces` where given.
    pub fn args(&self, cgroup: &Path, pin_dir: &Path, interfaces: Option<&str>) -> Vec<String> {
        let mut paths = self.paths.clone();
        paths.push(("--cgroup-path".into(), cgroup.to_owned()));
        paths.push((
            "--conntrack-sysctl-dir".into(),
            "/proc/sys/net/netfilter".into(),
        ));
        let mut args: Vec<String> = self
            .container()
            .args
            .expect("args")
            .into_iter()
            .map(|a| {
                let flag = a.split_once('=').map(|(f, _)| f).unwrap_or(&a);
                if let Some((flag, path)) = paths.iter().find(|(f, _)| f == flag) {
                    format!("{flag}={}", path.display())
                } else if let (Some(_), Some(list)) = (a.strip_prefix("--interfaces="), interfaces)
                {
                    format!("--interfaces={list}")
                } else {
                    a
                }
            })
            .collect();
        args.push(format!("--pin-dir={}", pin_dir.display()));
        args
    }

    /// The container's environment: values as written, `LB_API_SERVER` (if
    /// there) as the operator sets it, `NODE_NAME` as the kubelet fills it
    /// from `spec.nodeName`; and `KUBECONFIG`, if given, standing in for the
    /// service account's token the pod would have.
    pub fn env(
        &self,
        node_name: &str,
        api_server: &str,
        kubeconfig: Option<&Path>,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .container()
            .env
            .unwrap_or_default()
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
        if let Some(kubeconfig) = kubeconfig {
            env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        }
        env
    }
}
