//! The deploy manifests as kustomize renders them (`kubectl kustomize`,
//! as `kubectl apply -k` would): the base is the files as they are, and
//! each overlay changes exactly what it says. Unprivileged.

use std::{fs, path::Path};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::PodSpec};
use k8s_openapi::serde::Deserialize as _;
use yaml_serde::Value;

/// `deploy/base/FILE`'s documents.
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

fn rendered_daemonset(dir: &str) -> PodSpec {
    let docs = lb_tests::deploy::render(dir);
    let ds = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .unwrap();
    let ds: DaemonSet = yaml_serde::from_value(ds.clone()).unwrap();
    ds.spec.unwrap().template.spec.unwrap()
}

#[test]
fn the_base_renders_as_the_files_and_each_overlay_changes_what_it_says() {
    let mut files = documents("rbac.yaml");
    files.extend(documents("daemonset.yaml"));
    let mut base = lb_tests::deploy::render("base");
    let kind_name = |v: &Value| format!("{:?}/{:?}", v["kind"], v["metadata"]["name"]);
    files.sort_by_key(kind_name);
    base.sort_by_key(kind_name);
    assert_eq!(base, files, "deploy/base is the files as they are");

    let shipped = rendered_daemonset("base");
    let args = |pod: &PodSpec| pod.containers[0].args.clone().unwrap();
    let env_names = |pod: &PodSpec| -> Vec<String> {
        pod.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect()
    };

    // kubeadm: kube-proxy's ConfigMap mounted and read; no LB_API_SERVER.
    let kubeadm = rendered_daemonset("overlays/kubeadm");
    let mut expected = args(&shipped);
    expected.push("--config=/var/lib/kube-proxy/config.conf".into());
    assert_eq!(args(&kubeadm), expected);
    assert!(!env_names(&kubeadm).contains(&"LB_API_SERVER".to_owned()));
    assert!(env_names(&shipped).contains(&"LB_API_SERVER".to_owned()));
    let volume = kubeadm
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "kube-proxy")
        .unwrap();
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("kube-proxy")
    );
    assert!(kubeadm.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == "kube-proxy" && m.mount_path == "/var/lib/kube-proxy"));

    // socket-lb-all: the mode, hostPID and SYS_ADMIN together, nothing else.
    let all = rendered_daemonset("overlays/socket-lb-all");
    let expected: Vec<String> = args(&shipped)
        .into_iter()
        .map(|a| {
            if a == "--socket-lb=host-network" {
                "--socket-lb=all".into()
            } else {
                a
            }
        })
        .collect();
    assert_eq!(args(&all), expected);
    assert_eq!(all.host_pid, Some(true));
    let caps = all.containers[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
}
