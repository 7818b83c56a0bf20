//! Control-plane behaviour without root: write order, idempotence, last good
//! state on bad input, full maps, restart from existing maps.

use std::{fs, net::IpAddr};

use lb_agent::{
    datapath::{maps::MapWriteError, offline::fake::FakeMaps},
    desired::{self, Desired, Limits},
    model::error::InputErrorKind,
    reconcile::Reconciler,
    source::manifest::{self, ManifestDir},
};

const LIMITS: Limits = Limits {
    max_backends_per_service: 16,
    lb_algorithm: lb_agent::desired::LbAlgorithm::Random,
    ..Limits::DEFAULT
};

fn service(name: &str, vip: &str, backends: &[&str]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| format!("- addresses: [{b}]\n"))
        .collect();
    let endpoints = if endpoints.is_empty() {
        " []\n".into()
    } else {
        format!("\n{endpoints}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: t\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:{endpoints}---\n"
    )
}

const MAGLEV: Limits = Limits {
    lb_algorithm: lb_agent::desired::LbAlgorithm::Maglev { table_size: None },
    ..LIMITS
};

fn desired_of(yaml: &str) -> Desired {
    desired_with(yaml, LIMITS)
}

fn desired_with(yaml: &str, limits: Limits) -> Desired {
    let (objects, errors) = manifest::parse_str(yaml, None).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    desired::compute(&objects, limits, Default::default()).0
}

fn reconciler() -> Reconciler<FakeMaps> {
    Reconciler::restore(FakeMaps::new(1024, 1024), 1024).unwrap()
}

fn take_log(r: &mut Reconciler<FakeMaps>) -> Vec<String> {
    std::mem::take(&mut r.maps_mut().log)
}

#[test]
fn growing_writes_backends_then_slots_then_revnat_then_count() {
    let mut r = reconciler();
    r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2"],
    )));
    assert_eq!(
        take_log(&mut r),
        [
            "put backend 1 198.18.0.1:8080/TCP",
            "put backend 2 198.18.0.2:8080/TCP",
            "put slot 198.19.0.1:80/TCP#1 backend=1 remote",
            "put slot 198.19.0.1:80/TCP#2 backend=2 remote",
            "put revnat 1 198.19.0.1:80/TCP",
            "put slot 198.19.0.1:80/TCP#0 count=2 local=0 flags=0x1",
        ]
    );
    r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2", "198.18.0.3"],
    )));
    assert_eq!(
        take_log(&mut r),
        [
            "put backend 3 198.18.0.3:8080/TCP",
            "put slot 198.19.0.1:80/TCP#3 backend=3 remote",
            "put slot 198.19.0.1:80/TCP#0 count=3 local=0 flags=0x1"
        ]
    );
}

#[test]
fn shrinking_writes_count_first_then_deletes_tail_then_backends() {
    let mut r = reconciler();
    r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2", "198.18.0.3"],
    )));
    take_log(&mut r);
    r.apply(&desired_of(&service("a", "198.19.0.1", &["198.18.0.2"])));
    assert_eq!(
        take_log(&mut r),
        [
            "put slot 198.19.0.1:80/TCP#0 count=1 local=0 flags=0x1",
            "put slot 198.19.0.1:80/TCP#1 backend=2 remote",
            "del slot 198.19.0.1:80/TCP#2",
            "del slot 198.19.0.1:80/TCP#3",
            "del backend 1",
            "del backend 3",
        ]
    );
}

#[test]
fn removing_a_service_deletes_its_frontend_slot_first() {
    let mut r = reconciler();
    r.apply(&desired_of(
        &(service("a", "198.19.0.1", &["198.18.0.1"])
            + &service("b", "198.19.0.2", &["198.18.0.1"])),
    ));
    take_log(&mut r);
    let report = r.apply(&desired_of(&service("b", "198.19.0.2", &["198.18.0.1"])));
    assert_eq!((report.removed, report.unchanged), (1, 1));
    // The backend is shared with b, so it stays.
    assert_eq!(
        take_log(&mut r),
        [
            "del slot 198.19.0.1:80/TCP#0",
            "del slot 198.19.0.1:80/TCP#1",
            "del revnat 1"
        ]
    );
}

#[test]
fn unchanged_input_writes_nothing() {
    let mut r = reconciler();
    let desired = desired_of(&service("a", "198.19.0.1", &["198.18.0.1", "198.18.0.2"]));
    r.apply(&desired);
    take_log(&mut r);
    let report = r.apply(&desired);
    assert_eq!(report.unchanged, 1);
    assert!(take_log(&mut r).is_empty());
}

#[test]
fn restart_adopts_existing_maps_without_rewriting() {
    let mut first = reconciler();
    let desired = desired_of(
        &(service("a", "198.19.0.1", &["198.18.0.1", "198.18.0.2"])
            + &service("b", "198.19.0.2", &[])),
    );
    first.apply(&desired);
    let mut maps = FakeMaps::new(1024, 1024);
    maps.state = first.maps().state.clone();
    let mut second = Reconciler::restore(maps, 1024).unwrap();
    let report = second.apply(&desired);
    assert_eq!(report.unchanged, 2);
    assert!(
        take_log(&mut second).is_empty(),
        "a restarted agent must not disturb a correct datapath"
    );
    // New ids do not collide with restored ones.
    second.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2", "198.18.0.9"],
    )));
    assert!(take_log(&mut second).contains(&"put backend 3 198.18.0.9:8080/TCP".to_string()));
}

#[test]
fn invalid_update_keeps_the_service_last_good_state() {
    let mut r = reconciler();
    r.apply(&desired_of(&service("a", "198.19.0.1", &["198.18.0.1"])));
    let before = r.maps().state.clone();
    take_log(&mut r);
    // The service's port becomes invalid: it is reported, and its frontend stays.
    let broken = service("a", "198.19.0.1", &["198.18.0.1"]).replace("port: 80,", "port: 0,");
    let (objects, _) = manifest::parse_str(&broken, None).unwrap();
    let (desired, errors) = desired::compute(&objects, LIMITS, Default::default());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .contains("spec.ports[0].port: 0 is out of range"),
        "{}",
        errors[0]
    );
    let report = r.apply(&desired);
    assert_eq!((report.kept, report.removed), (1, 0));
    assert_eq!(r.maps().state, before);
    assert!(take_log(&mut r).is_empty());
}

#[test]
fn full_backend_map_is_reported_and_leaves_the_old_state() {
    let mut r = Reconciler::restore(FakeMaps::new(1024, 2), 1024).unwrap();
    r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2"],
    )));
    let before = r.maps().state.clone();
    let report = r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2", "198.18.0.3"],
    )));
    assert_eq!(report.errors.len(), 1);
    assert!(
        matches!(
            report.errors[0].error,
            MapWriteError::Full { map, capacity: 2, flag: "--max-backends" }
                if map == lb_common::backend::BACKEND_MAP
        ),
        "{:?}",
        report.errors
    );
    assert_eq!(
        report.errors[0].target,
        "Service t/a frontend 198.19.0.1:80/TCP"
    );
    assert_eq!(r.maps().state, before, "datapath keeps its last good state");
    // Removing the extra endpoint again converges without errors.
    let report = r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2"],
    )));
    assert!(report.errors.is_empty());
}

#[test]
fn malformed_file_keeps_its_last_good_content() {
    let dir = std::env::temp_dir().join(format!("lb-manifest-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a.yaml");
    fs::write(&file, service("a", "198.19.0.1", &["198.18.0.1"])).unwrap();
    fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let mut manifests = ManifestDir::new(&dir);
    let errors = manifests.poll().unwrap().expect("first read").errors;
    let objects = manifests.objects();
    assert!(errors.is_empty());
    assert_eq!(objects.services.len(), 1);
    assert!(manifests.poll().unwrap().is_none(), "no change, no reload");

    fs::write(&file, "apiVersion: v1\nkind: Service\n  bad: [indent").unwrap();
    let errors = manifests.poll().unwrap().expect("changed").errors;
    let objects = manifests.objects();
    assert_eq!(objects.services.len(), 1, "last good content kept");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].kind, InputErrorKind::InvalidYaml);
    assert_eq!(errors[0].file.as_deref(), Some(file.as_path()));

    // Rewritten in place: truncated first. Empty is "not yet", not "delete all".
    fs::write(&file, "").unwrap();
    let errors = manifests.poll().unwrap().expect("changed").errors;
    let objects = manifests.objects();
    assert_eq!(objects.services.len(), 1, "last good content kept");
    assert_eq!(
        errors.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [InputErrorKind::EmptyFile]
    );
    fs::write(&file, service("a", "198.19.0.1", &["198.18.0.2"])).unwrap();
    let errors = manifests.poll().unwrap().expect("changed").errors;
    let objects = manifests.objects();
    assert!(errors.is_empty());
    assert_eq!(
        objects.slices[0].object.endpoints[0]
            .address
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("198.18.0.2")
    );

    fs::remove_file(&file).unwrap();
    manifests.poll().unwrap().expect("file removed");
    let objects = manifests.objects();
    assert!(
        objects.services.is_empty(),
        "a deleted file's objects go away"
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// A dual-stack Service's frontends: one per cluster IP, each with its own
/// family's endpoints (its IPv4 and IPv6 EndpointSlices are separate).
#[test]
fn a_dual_stack_service_has_a_frontend_per_family_with_that_familys_endpoints() {
    let yaml = service("a", "198.19.0.1", &["198.18.0.1"]).replace(
        "clusterIP: 198.19.0.1",
        "clusterIP: 198.19.0.1\n  clusterIPs: [198.19.0.1, \"2001:db8::1\"]",
    ) + "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: a-v6
  namespace: t
  labels: {kubernetes.io/service-name: a}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
  - addresses: [\"2001:db8:1::5\"]
";
    let desired = desired_of(&yaml);
    let frontends: Vec<(IpAddr, Vec<IpAddr>)> = desired
        .frontends
        .iter()
        .map(|(f, spec)| (f.addr, spec.backends.iter().map(|b| b.addr).collect()))
        .collect();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        frontends,
        [
            (ip("198.19.0.1"), vec![ip("198.18.0.1")]),
            (ip("2001:db8::1"), vec![ip("2001:db8:1::5")]),
        ]
    );
}

/// An IPv6-only LoadBalancer Service is served at every IPv6 frontend it
/// has (cluster IP, node port on the node's IPv6 address, external and
/// load-balancer IPs) with its IPv6 endpoints, ClientIP affinity on each
/// and its IPv6 source ranges at the load-balancer IP; an IPv6 slice's
/// unusable endpoints are refused one by one, naming the field; an address
/// of a family the Service lacks is reported; two cluster IPs of one
/// family are an error.
#[test]
fn ipv6_input_lb_cannot_serve_is_reported_by_field() {
    let yaml = r#"apiVersion: v1
kind: Service
metadata: {name: a, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: "2001:db8::1"
  clusterIPs: ["2001:db8::1"]
  externalIPs: ["2001:db8::99", "198.19.0.99"]
  sessionAffinity: ClientIP
  loadBalancerSourceRanges: ["2001:db8:77::/48"]
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status:
  loadBalancer: {ingress: [{ip: "2001:db8::98"}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, namespace: t, labels: {kubernetes.io/service-name: a}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- addresses: ["2001:db8:1::5"]
- addresses: ["fe80::1"]
- addresses: ["::1"]
- addresses: ["::ffff:198.18.0.1"]
- addresses: ["198.18.0.2"]
"#;
    let (objects, errors) = manifest::parse_str(yaml, None).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let limits = Limits {
        external_ips: true,
        ..LIMITS
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let node = desired::NodeContext {
        nodeport_addresses: vec![ip("198.18.0.2"), ip("2001:db8:18::2")],
        ..Default::default()
    };
    let (desired, errors) = desired::compute(&objects, limits, node.clone());
    let fields: Vec<(&str, InputErrorKind)> =
        errors.iter().map(|e| (e.field.as_str(), e.kind)).collect();
    for field in [
        "spec.externalIPs[1]",
        "endpoints[1].addresses[0]",
        "endpoints[2].addresses[0]",
        "endpoints[3].addresses[0]",
        "endpoints[4].addresses[0]",
    ] {
        assert!(
            fields.contains(&(field, InputErrorKind::Skipped)),
            "{field} not reported as skipped: {errors:#?}"
        );
    }
    assert_eq!(errors.len(), 5, "{errors:#?}");
    let frontends: Vec<(IpAddr, u16)> =
        desired.frontends.keys().map(|f| (f.addr, f.port)).collect();
    assert_eq!(
        frontends,
        [
            (ip("2001:db8::1"), 80),
            (ip("2001:db8::98"), 80),
            (ip("2001:db8::99"), 80),
            (ip("2001:db8:18::2"), 30080),
        ],
        "every IPv6 frontend, none of IPv4"
    );
    for (addr, frontend) in &desired.frontends {
        let backends: Vec<IpAddr> = frontend.backends.iter().map(|b| b.addr).collect();
        assert_eq!(backends, [ip("2001:db8:1::5")]);
        assert_eq!(frontend.affinity_timeout_s, Some(10_800), "{addr:?}");
        let ranged = addr.addr == ip("2001:db8::98");
        let ranges: Vec<String> = frontend
            .source_ranges
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(ranges.is_empty(), !ranged, "{addr:?}");
        if ranged {
            assert_eq!(ranges, ["2001:db8:77::/48"]);
            assert_ne!(frontend.flags() & lb_common::svc::SVC_FLAG_SOURCE_RANGES, 0);
        }
    }

    let two_v6 = yaml.replace(
        r#"clusterIPs: ["2001:db8::1"]"#,
        r#"clusterIPs: ["2001:db8::1", "2001:db8::2"]"#,
    );
    let (objects, _) = manifest::parse_str(&two_v6, None).unwrap();
    let (desired, errors) = desired::compute(&objects, limits, Default::default());
    assert!(desired.frontends.is_empty());
    assert!(
        errors
            .iter()
            .any(|e| e.field == "spec.clusterIPs[1]" && e.kind == InputErrorKind::InvalidField),
        "{errors:#?}"
    );
}

/// An endpoint's `nodeName` decides whether it is local: this node's
/// backends come first and are counted, each part sorted.
#[test]
fn endpoints_on_this_node_come_first() {
    let desired = desired_on_node_a(&placed_service(
        false,
        &[
            ("198.18.0.1", "node-b"),
            ("198.18.0.2", "node-a"),
            ("198.18.0.3", "node-b"),
            ("198.18.0.4", "node-a"),
        ],
    ));
    let spec = desired.frontends.values().next().unwrap();
    let order: Vec<String> = spec.backends.iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(
        order,
        ["198.18.0.2", "198.18.0.4", "198.18.0.1", "198.18.0.3"]
    );
    assert_eq!(spec.local_count, 2);
}

/// Every transition between these backend sets, with the write number `k`
/// failing once: no state a packet can see ever publishes a count whose
/// slots or backends are not written, and the retry converges.
#[test]
fn a_failed_write_at_any_point_keeps_the_order_and_the_retry_converges() {
    failed_writes_converge(LIMITS);
}

#[test]
fn a_failed_write_at_any_point_keeps_a_maglev_table_whole_and_the_retry_converges() {
    failed_writes_converge(MAGLEV);
}

fn failed_writes_converge(limits: Limits) {
    let desired_of = |yaml: &str| desired_with(yaml, limits);
    let sets: [&[&str]; 4] = [
        &["198.18.0.1", "198.18.0.2"],
        &["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"],
        &["198.18.0.3"],
        &[],
    ];
    for from in sets {
        for to in sets {
            for k in 0..16 {
                let mut r = reconciler();
                r.apply(&desired_of(&service("a", "198.19.0.1", from)));
                let target = desired_of(&service("a", "198.19.0.1", to));
                let mut expected = reconciler();
                expected.apply(&target);
                r.maps_mut().fail_attempt = Some(k + r.maps().log.len());
                let failed = r.apply(&target);
                if failed.errors.is_empty() {
                    continue; // fewer than k+1 writes
                }
                assert!(r.needs_retry());
                let retry = r.apply(&target);
                assert!(
                    retry.errors.is_empty(),
                    "{from:?} → {to:?}, write {k}: {retry:?}"
                );
                assert!(!r.needs_retry());
                assert_eq!(
                    r.maps().violations,
                    Vec::<String>::new(),
                    "{from:?} → {to:?}, write {k} failed"
                );
                // Same frontends and slots as a clean run (ids may differ).
                let backends = |r: &Reconciler<FakeMaps>| -> Vec<String> {
                    let state = &r.maps().state;
                    state
                        .slots
                        .iter()
                        .map(|((f, slot), v)| match *slot {
                            0 => format!("{f}#0 count={}", v.count),
                            s => format!("{f}#{s} {}", state.backends[&v.backend_id]),
                        })
                        .collect()
                };
                assert_eq!(
                    backends(&r),
                    backends(&expected),
                    "{from:?} → {to:?}, write {k}"
                );
                assert_eq!(
                    r.maps().state.backends.len(),
                    expected.maps().state.backends.len()
                );
                assert_eq!(r.apply(&target).unchanged, 1, "converged");
            }
        }
    }
}

#[test]
fn retry_after_a_failed_slot_write_publishes_the_count_last() {
    let mut r = reconciler();
    r.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2"],
    )));
    take_log(&mut r);
    let grown = desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"],
    ));
    r.maps_mut().fail_matching = Some("#4 ".into());
    let report = r.apply(&grown);
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(
        take_log(&mut r),
        [
            "put backend 3 198.18.0.3:8080/TCP",
            "put backend 4 198.18.0.4:8080/TCP",
            "put slot 198.19.0.1:80/TCP#3 backend=3 remote",
        ],
        "stopped at the failed slot, count not published"
    );
    r.maps_mut().fail_matching = None;
    r.apply(&grown);
    assert_eq!(
        take_log(&mut r),
        [
            "put slot 198.19.0.1:80/TCP#4 backend=4 remote",
            "put slot 198.19.0.1:80/TCP#0 count=4 local=0 flags=0x1",
        ],
        "the retry writes only what is missing, count last"
    );
    assert!(r.maps().violations.is_empty(), "{:?}", r.maps().violations);
}

#[test]
fn restart_keeps_a_broken_services_last_good_state() {
    let mut first = reconciler();
    first.apply(&desired_of(
        &(service("a", "198.19.0.1", &["198.18.0.1"])
            + &service("b", "198.19.0.2", &["198.18.0.2"])),
    ));
    let before = first.maps().state.clone();
    // The agent restarts while Service a is broken.
    let mut maps = FakeMaps::new(1024, 1024);
    maps.state = before.clone();
    let mut second = Reconciler::restore(maps, 1024).unwrap();
    let broken = service("a", "198.19.0.1", &["198.18.0.1"]).replace("port: 80,", "port: 0,")
        + &service("b", "198.19.0.2", &["198.18.0.2"]);
    let (objects, _) = manifest::parse_str(&broken, None).unwrap();
    let (desired, errors) = desired::compute(&objects, LIMITS, Default::default());
    assert_eq!(errors.len(), 1);
    let report = second.apply(&desired);
    assert_eq!((report.kept, report.removed, report.unchanged), (1, 0, 1));
    assert_eq!(
        second.maps().state,
        before,
        "a's frontend survives the restart"
    );
}

#[test]
fn restart_removes_entries_an_interrupted_agent_left_behind() {
    let mut first = reconciler();
    first.apply(&desired_of(&service("a", "198.19.0.1", &["198.18.0.1"])));
    // Killed while adding b: its backend, slot and reverse NAT are written,
    // its slot 0 is not.
    first.maps_mut().fail_matching = Some("198.19.0.2:80/TCP#0".into());
    first.apply(&desired_of(
        &(service("a", "198.19.0.1", &["198.18.0.1"])
            + &service("b", "198.19.0.2", &["198.18.0.7"])),
    ));
    let mut maps = FakeMaps::new(1024, 1024);
    maps.state = first.maps().state.clone();
    assert_eq!(maps.state.revnat.len(), 2);
    let mut second = Reconciler::restore(maps, 1024).unwrap();
    let report = second.apply(&desired_of(&service("a", "198.19.0.1", &["198.18.0.1"])));
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        take_log(&mut second),
        [
            "del slot 198.19.0.2:80/TCP#0",
            "del slot 198.19.0.2:80/TCP#1",
            "del revnat 2",
            "del backend 2",
        ]
    );
    let state = &second.maps().state;
    assert_eq!(
        (state.revnat.len(), state.backends.len()),
        (1, 1),
        "no leaked ids"
    );
}

/// An object that no longer parses into its Kubernetes type (a wrong field
/// type, an unknown apiVersion, a bad condition) keeps its Service's state.
#[test]
fn objects_that_stop_parsing_keep_their_services_last_good_state() {
    let good = service("a", "198.19.0.1", &["198.18.0.1"]);
    let cases = [
        ("wrong type", good.replace("port: 80,", "port: eighty,")),
        (
            "unknown apiVersion",
            good.replacen("apiVersion: v1\n", "apiVersion: v2\n", 1),
        ),
        (
            "bad slice condition",
            good.replace(
                "- addresses: [198.18.0.1]",
                "- addresses: [198.18.0.1]\n  conditions: {ready: maybe}",
            ),
        ),
    ];
    for (what, broken) in cases {
        let mut r = reconciler();
        r.apply(&desired_of(&good));
        let before = r.maps().state.clone();
        take_log(&mut r);
        let (objects, errors) = manifest::parse_str(&broken, None).unwrap();
        assert_eq!(errors.len(), 1, "{what}: {errors:?}");
        assert!(
            matches!(
                errors[0].kind,
                InputErrorKind::Schema | InputErrorKind::UnsupportedObject
            ),
            "{what}: {:?}",
            errors[0]
        );
        let (desired, _) = desired::compute(&objects, LIMITS, Default::default());
        let report = r.apply(&desired);
        assert_eq!((report.kept, report.removed), (1, 0), "{what}");
        assert_eq!(r.maps().state, before, "{what}");
    }
}

#[test]
fn duplicate_ports_are_an_error_not_last_wins() {
    let yaml = service("a", "198.19.0.1", &["198.18.0.1"]).replace(
        "ports: [{port: 80, targetPort: 8080}]",
        "ports: [{name: x, port: 80, targetPort: 8080}, {name: y, port: 80, targetPort: 9090}]",
    );
    let (objects, _) = manifest::parse_str(&yaml, None).unwrap();
    let (desired, errors) = desired::compute(&objects, LIMITS, Default::default());
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].kind, InputErrorKind::Conflict);
    assert_eq!(errors[0].field, "spec.ports[1].port");
    assert!(desired.frontends.is_empty());
    assert_eq!(desired.keep.len(), 1);
}

#[test]
fn a_change_rereads_only_the_files_a_watch_named() {
    let dir = std::env::temp_dir().join(format!("lb-paths-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
    fs::write(&a, service("a", "198.19.0.1", &["198.18.0.1"])).unwrap();
    fs::write(&b, service("b", "198.19.0.2", &["198.18.0.2"])).unwrap();
    let mut manifests = ManifestDir::new(&dir);
    manifests.poll().unwrap().expect("first read");

    // b changes too, but only a is named: b is not read.
    fs::write(&a, service("a", "198.19.0.1", &["198.18.0.3"])).unwrap();
    fs::write(
        &b,
        service("b", "198.19.0.2", &["198.18.0.4", "198.18.0.5"]),
    )
    .unwrap();
    let changes = manifests
        .poll_paths(&[a.clone()].into())
        .unwrap()
        .expect("a changed");
    let names = |o: &lb_agent::source::objects::Objects| -> Vec<String> {
        o.services
            .iter()
            .map(|s| s.object.name.to_string())
            .collect()
    };
    assert_eq!(
        (names(&changes.removed), names(&changes.added)),
        (vec!["a".into()], vec!["a".into()])
    );
    assert!(
        manifests.poll_paths(&[a.clone()].into()).unwrap().is_none(),
        "unchanged since"
    );

    fs::remove_file(&a).unwrap();
    let changes = manifests
        .poll_paths(&[a.clone()].into())
        .unwrap()
        .expect("a deleted");
    assert_eq!(
        (names(&changes.removed), names(&changes.added)),
        (vec!["a".into()], vec![])
    );
    // A full scan still finds what no watch named.
    let changes = manifests.poll().unwrap().expect("b changed");
    assert_eq!(names(&changes.added), ["b"]);
    fs::remove_dir_all(&dir).unwrap();
}

/// `service` with ClientIP affinity and endpoints placed on nodes.
fn placed_service(affinity: bool, endpoints: &[(&str, &str)]) -> String {
    let list: String = endpoints
        .iter()
        .map(|(b, node)| format!("- {{addresses: [{b}], nodeName: {node}}}\n"))
        .collect();
    let affinity = if affinity {
        "  sessionAffinity: ClientIP\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: t}}\nspec:\n  clusterIP: 198.19.0.1\n{affinity}  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: a-1\n  namespace: t\n  labels: {{kubernetes.io/service-name: a}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{list}"
    )
}

fn desired_on_node_a(yaml: &str) -> Desired {
    let (objects, errors) = manifest::parse_str(yaml, None).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let node = desired::NodeContext {
        name: Some("node-a".into()),
        nodeport_addresses: Vec::new(),
        zone: None,
        ..Default::default()
    };
    desired::compute(&objects, LIMITS, node).0
}

#[test]
fn a_shrinking_local_count_is_published_before_its_slots_change_role() {
    let mut r = reconciler();
    r.apply(&desired_on_node_a(&placed_service(
        false,
        &[
            ("198.18.0.1", "node-a"),
            ("198.18.0.2", "node-a"),
            ("198.18.0.3", "node-b"),
        ],
    )));
    take_log(&mut r);
    // 198.18.0.2 moves to node-b: slot 2 changes from local to remote.
    r.apply(&desired_on_node_a(&placed_service(
        false,
        &[
            ("198.18.0.1", "node-a"),
            ("198.18.0.2", "node-b"),
            ("198.18.0.3", "node-b"),
            ("198.18.0.4", "node-b"),
        ],
    )));
    let log = take_log(&mut r);
    assert_eq!(
        log[..2],
        [
            "put backend 4 198.18.0.4:8080/TCP",
            "put slot 198.19.0.1:80/TCP#0 count=3 local=1 flags=0x1",
        ],
        "local slots shrink to the smaller count first: {log:?}"
    );
    assert_eq!(
        log.last().unwrap(),
        "put slot 198.19.0.1:80/TCP#0 count=4 local=1 flags=0x1"
    );
    assert!(r.maps().violations.is_empty(), "{:?}", r.maps().violations);
}

/// A backend arriving on this node takes a slot that held a remote one
/// while slot 0 still publishes the smaller local count: the slot says
/// where its backend runs, so no packet meanwhile judges the new local
/// backend remote (and SNATs an external flow to a local pod), nor a
/// remote one local.
#[test]
fn a_growing_local_count_never_shows_a_backend_on_the_wrong_node() {
    let mut r = reconciler();
    let before = [
        ("198.18.0.1", "node-a"),
        ("198.18.0.2", "node-b"),
        ("198.18.0.3", "node-b"),
    ];
    r.apply(&desired_on_node_a(&placed_service(false, &before)));
    let placement = &mut r.maps_mut().placement;
    for (addr, node) in before.iter().chain([&("198.18.0.4", "node-a")]) {
        placement.insert(addr.parse().unwrap(), *node == "node-a");
    }
    take_log(&mut r);
    let after = [before[0], ("198.18.0.4", "node-a"), before[1], before[2]];
    r.apply(&desired_on_node_a(&placed_service(false, &after)));
    assert!(r.maps().violations.is_empty(), "{:?}", r.maps().violations);
    let log = take_log(&mut r);
    let slot_2 = "put slot 198.19.0.1:80/TCP#2 backend=4 local";
    let head = "put slot 198.19.0.1:80/TCP#0 count=4 local=2 flags=0x1";
    let at = |line: &str| log.iter().position(|l| l == line);
    assert!(
        at(slot_2).is_some() && at(slot_2) < at(head),
        "the new local backend's slot, then the count: {log:?}"
    );
}

#[test]
fn affinity_matches_follow_the_current_backends() {
    let mut r = reconciler();
    let two = [("198.18.0.1", "node-a"), ("198.18.0.2", "node-b")];
    r.apply(&desired_on_node_a(&placed_service(true, &two)));
    let log = take_log(&mut r);
    let count_at = log.iter().position(|l| l.contains("#0 count=2")).unwrap();
    let matches: Vec<usize> = (0..log.len())
        .filter(|i| log[*i].starts_with("put affinity match"))
        .collect();
    assert_eq!(matches.len(), 2, "{log:?}");
    assert!(
        matches.iter().all(|i| *i < count_at),
        "before publishing: {log:?}"
    );
    assert!(log.contains(&"put affinity match 1/1 local=true".to_string()));
    assert!(log.contains(&"put affinity match 1/2 local=false".to_string()));

    // A backend leaves: its match goes before anything else.
    r.apply(&desired_on_node_a(&placed_service(true, &two[..1])));
    let log = take_log(&mut r);
    assert_eq!(log[0], "del affinity match 1/2", "{log:?}");

    // Affinity switched off: no match is left.
    r.apply(&desired_on_node_a(&placed_service(false, &two[..1])));
    let log = take_log(&mut r);
    assert_eq!(log[0], "del affinity match 1/1", "{log:?}");
    assert!(r.maps().state.affinity_match.is_empty());

    // A restart adopts the matches and writes nothing.
    r.apply(&desired_on_node_a(&placed_service(true, &two)));
    let maps = std::mem::replace(r.maps_mut(), FakeMaps::new(1024, 1024));
    let mut restarted = Reconciler::restore(maps, 1024).unwrap();
    take_log(&mut restarted);
    let report = restarted.apply(&desired_on_node_a(&placed_service(true, &two)));
    assert_eq!(take_log(&mut restarted), Vec::<String>::new(), "{report:?}");
}

#[test]
fn a_maglev_table_is_written_before_the_head_names_it_and_replaced_whole() {
    let mut r = reconciler();
    let two = desired_with(
        &service("a", "198.19.0.1", &["198.18.0.1", "198.18.0.2"]),
        MAGLEV,
    );
    r.apply(&two);
    assert_eq!(
        take_log(&mut r),
        [
            "put backend 1 198.18.0.1:8080/TCP",
            "put backend 2 198.18.0.2:8080/TCP",
            "put slot 198.19.0.1:80/TCP#1 backend=1 remote",
            "put slot 198.19.0.1:80/TCP#2 backend=2 remote",
            "put revnat 1 198.19.0.1:80/TCP",
            "put maglev 1/0 entries=251",
            "put slot 198.19.0.1:80/TCP#0 count=2 local=0 flags=0x101",
        ]
    );
    // Each entry names one of the two backends; neither runs on this node.
    let table = &r.maps().state.maglev[&(1, 0)];
    let remote = lb_common::maglev::MAGLEV_REMOTE;
    let shares = [1u32, 2].map(|id| table[..251].iter().filter(|e| **e == id | remote).count());
    assert_eq!(shares.iter().sum::<usize>(), 251);
    assert!(shares.iter().all(|n| (125..=126).contains(n)), "{shares:?}");

    let three = desired_with(
        &service(
            "a",
            "198.19.0.1",
            &["198.18.0.1", "198.18.0.2", "198.18.0.3"],
        ),
        MAGLEV,
    );
    r.apply(&three);
    assert_eq!(
        take_log(&mut r),
        [
            "put backend 3 198.18.0.3:8080/TCP",
            "put slot 198.19.0.1:80/TCP#3 backend=3 remote",
            "put maglev 1/1 entries=509",
            "put slot 198.19.0.1:80/TCP#0 count=3 local=0 flags=0x301",
            "del maglev 1/0",
        ],
        "the other table, then the switch, then the old table"
    );
    assert_eq!(r.maps().violations, Vec::<String>::new());
    assert_eq!(r.apply(&three).unchanged, 1);

    // A restarted agent reads the table back and rewrites nothing.
    let maps = std::mem::replace(r.maps_mut(), FakeMaps::new(1024, 1024));
    let mut restarted = Reconciler::restore(maps, 1024).unwrap();
    assert_eq!(restarted.apply(&three).unchanged, 1);
    assert!(take_log(&mut restarted).is_empty());

    // Back to random: the head stops naming a table, then it goes.
    restarted.apply(&desired_of(&service(
        "a",
        "198.19.0.1",
        &["198.18.0.1", "198.18.0.2", "198.18.0.3"],
    )));
    assert_eq!(
        take_log(&mut restarted),
        [
            "put slot 198.19.0.1:80/TCP#0 count=3 local=0 flags=0x1",
            "del maglev 1/1",
        ]
    );
    assert!(restarted.maps().state.maglev.is_empty());
}

#[test]
fn a_removed_maglev_frontend_loses_its_head_first_then_its_table() {
    let mut r = reconciler();
    r.apply(&desired_with(
        &service("a", "198.19.0.1", &["198.18.0.1"]),
        MAGLEV,
    ));
    take_log(&mut r);
    r.apply(&desired_with("", MAGLEV));
    assert_eq!(
        take_log(&mut r),
        [
            "del slot 198.19.0.1:80/TCP#0",
            "del slot 198.19.0.1:80/TCP#1",
            "del maglev 1/0",
            "del revnat 1",
            "del backend 1",
        ]
    );
    assert_eq!(r.maps().violations, Vec::<String>::new());
}

#[test]
fn a_fixed_maglev_table_smaller_than_the_backends_is_refused_for_that_service() {
    let limits = Limits {
        lb_algorithm: lb_agent::desired::LbAlgorithm::Maglev {
            table_size: Some(251),
        },
        max_backends_per_service: 300,
        ..Limits::DEFAULT
    };
    let backends: Vec<String> = (0..251)
        .map(|i| format!("198.18.{}.{}", i / 200, 1 + i % 200))
        .collect();
    let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
    let (objects, _) = manifest::parse_str(&service("big", "198.19.0.1", &refs), None).unwrap();
    let (desired, errors) = desired::compute(&objects, limits, Default::default());
    assert!(desired.frontends.is_empty());
    assert_eq!(errors.len(), 1, "{errors:?}");
    let message = errors[0].to_string();
    assert!(
        message.contains("t/big") && message.contains("--maglev-table-size 251"),
        "{message}"
    );
}

#[test]
fn a_service_grown_past_its_frontend_budget_keeps_its_last_good_state() {
    let limits = Limits {
        max_frontends_per_service: 2,
        ..LIMITS
    };
    let two = service("a", "198.19.0.1", &["198.18.0.1"])
        .replace("  ports:", "  externalIPs: [198.19.0.2]\n  ports:");
    let three = two.replace("[198.19.0.2]", "[198.19.0.2, 198.19.0.3]");
    let other = service("b", "198.19.0.9", &["198.18.0.9"]);
    let mut r = reconciler();
    assert!(r
        .apply(&desired_with(&format!("{two}{other}"), limits))
        .errors
        .is_empty());
    let before = r.maps().state.clone();

    let (objects, _) = manifest::parse_str(&format!("{three}{other}"), None).unwrap();
    let (desired, errors) = desired::compute(&objects, limits, Default::default());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, InputErrorKind::OverLimit);
    assert_eq!(
        errors[0].to_string(),
        "Service t/a: spec.ports: 3 frontends (ports × cluster, node-port, external and load-balancer addresses), more than --max-frontends-per-service 2"
    );
    let report = r.apply(&desired);
    assert!(report.errors.is_empty(), "nothing to retry");
    assert!(!r.needs_retry());
    assert_eq!((report.kept, report.removed), (2, 0), "both frontends kept");
    assert_eq!(r.maps().state, before);
}
