//! `lb-agent check` exits non-zero whenever `run` would not program
//! everything: input problems, full maps, limits past the map fields.

use std::{path::PathBuf, process::Command};

fn manifests(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-check-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web.yaml"), yaml).unwrap();
    dir
}

fn web(endpoints: &[&str]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|e| format!("- addresses: [\"{e}\"]\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

/// (success, stdout, stderr)
fn check(dir: &PathBuf, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .arg("check")
        .arg("--manifests")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    std::fs::remove_dir_all(dir).ok();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_input_passes_and_prints_the_maps() {
    let dir = manifests("ok", &web(&["198.18.0.1", "198.18.0.2"]));
    let (ok, stdout, stderr) = check(&dir, &[]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with(
            "198.19.0.10:80/TCP count=2 local=0 revnat=1 service=shop/web ClusterIP\n"
        ),
        "{stdout}"
    );
}

#[test]
fn a_full_map_fails_and_names_the_flag() {
    let dir = manifests("full", &web(&["198.18.0.1", "198.18.0.2", "198.18.0.3"]));
    let (ok, _, stderr) = check(&dir, &["--max-backends", "2"]);
    assert!(!ok);
    assert!(
        stderr.contains("not programmed: Service shop/web frontend 198.19.0.10:80/TCP: map")
            && stderr.contains("is full (2 entries): raise --max-backends"),
        "{stderr}"
    );
}

#[test]
fn a_skipped_endpoint_fails_although_the_rest_would_apply() {
    let dir = manifests("skip", &web(&["198.18.0.1", "not-an-ip"]));
    let (ok, stdout, stderr) = check(&dir, &[]);
    assert!(!ok);
    assert!(
        stdout.contains("count=1"),
        "the good endpoint is programmed: {stdout}"
    );
    assert!(stderr.contains("endpoints[1].addresses[0]"), "{stderr}");
}

#[test]
fn limits_past_the_slot_field_are_refused() {
    let dir = manifests("limit", &web(&["198.18.0.1"]));
    let (ok, _, stderr) = check(&dir, &["--max-backends-per-service", "70000"]);
    assert!(!ok);
    assert!(
        stderr.contains("--max-backends-per-service 70000: must be 1-65534"),
        "{stderr}"
    );
}
