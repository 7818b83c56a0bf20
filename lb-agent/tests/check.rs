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

/// A Service of one port on its cluster IP and `external_ips` external IPs.
fn huge(external_ips: usize) -> String {
    let ips: Vec<String> = (0..external_ips)
        .map(|i| format!("198.19.{}.{}", 40 + i / 256, i % 256))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: huge, namespace: shop}}\nspec:\n  clusterIP: 198.19.1.1\n  externalIPs: [{}]\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: huge-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: huge}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n- addresses: [198.18.0.9]\n",
        ips.join(", ")
    )
}

#[test]
fn a_service_with_50_000_frontends_is_refused_by_its_budget_and_the_rest_programs() {
    let with_huge = || {
        let dir = manifests("huge", &web(&["198.18.0.1"]));
        std::fs::write(dir.join("huge.yaml"), huge(50_000)).unwrap();
        dir
    };
    let (ok, stdout, stderr) = check(&with_huge(), &[]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "Service shop/huge: spec.ports: 50001 frontends (ports × cluster, node-port, external and load-balancer addresses), more than --max-frontends-per-service 1024"
        ),
        "{stderr}"
    );
    assert!(stdout.contains("198.19.0.10:80/TCP count=1"), "{stdout}");
    assert!(!stdout.contains("198.19.1.1:80/TCP"), "{stdout}");

    // With the budget raised, it fits the node's reverse-NAT ids.
    let (ok, stdout, stderr) = check(&with_huge(), &["--max-frontends-per-service", "65535"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("198.19.235.79:80/TCP count=1"), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains(" count=")).count(),
        50_002,
        "every frontend of both Services"
    );
}

#[test]
fn a_service_past_its_slot_budget_is_refused() {
    let dir = manifests("slots", &web(&["198.18.0.1", "198.18.0.2", "198.18.0.3"]));
    let (ok, stdout, stderr) = check(&dir, &["--max-slots-per-service", "3"]);
    assert!(!ok);
    assert!(
        stderr.contains("Service shop/web: spec.ports: 4 service-map slots (each frontend's, and one per backend of each), more than --max-slots-per-service 3"),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn budgets_past_the_map_fields_are_refused() {
    for (flag, value, message) in [
        (
            "--max-frontends-per-service",
            "65536",
            "must be 1-65535 (reverse-NAT ids are 16-bit)",
        ),
        ("--max-frontends-per-service", "0", "must be 1-65535"),
        ("--max-slots-per-service", "1", "must be at least 2"),
    ] {
        let dir = manifests(&format!("budget{value}"), &web(&["198.18.0.1"]));
        let (ok, _, stderr) = check(&dir, &[flag, value]);
        assert!(!ok);
        assert!(
            stderr.contains(&format!("{flag} {value}: {message}")),
            "{stderr}"
        );
    }
}

/// `--external-ips=false` (KEP-5707: spec.externalIPs deprecated) leaves a
/// Service's external IPs out and the rest of it in; on by default.
#[test]
fn external_ips_are_programmed_unless_switched_off() {
    let yaml = web(&["198.18.10.2"]).replace(
        "  clusterIP: 198.19.0.10\n",
        "  clusterIP: 198.19.0.10\n  externalIPs: [198.19.2.1]\n",
    );
    let (ok, out, err) = check(&manifests("extip-on", &yaml), &[]);
    assert!(ok, "{err}");
    assert!(out.contains("198.19.2.1:80/TCP"), "{out}");
    let (ok, out, err) = check(&manifests("extip-off", &yaml), &["--external-ips=false"]);
    assert!(ok, "{err}");
    assert!(!out.contains("198.19.2.1"), "{out}");
    assert!(out.contains("198.19.0.10:80/TCP"), "{out}");
}

/// SCTP (lb's datapath has none yet) is refused by name and counted: the
/// Service's other ports apply, and `check` says `run` would not program
/// everything.
#[test]
fn an_sctp_port_is_refused_by_name_and_the_rest_applies() {
    let yaml = web(&["198.18.10.2"]).replace(
        "  ports: [{port: 80, targetPort: 8080}]\n",
        "  ports: [{name: http, port: 80, targetPort: 8080}, {name: sig, port: 3868, protocol: SCTP}]\n",
    ).replace("ports: [{port: 8080}]", "ports: [{name: http, port: 8080}, {name: sig, port: 3868, protocol: SCTP}]");
    let (ok, out, err) = check(&manifests("sctp", &yaml), &[]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("Service shop/web: spec.ports[1].protocol: SCTP is not supported"),
        "{err}"
    );
    assert!(out.contains("198.19.0.10:80/TCP count=1"), "{out}");
}
