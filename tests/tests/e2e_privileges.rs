//! Least privilege: the capabilities `deploy/base/daemonset.yaml` grants are
//! enough to serve, and each one is needed. The agent runs as root whose
//! bounding set holds exactly those capabilities (as in a container that
//! drops ALL and adds them), with the DaemonSet's own arguments, in a node
//! namespace with a real client, pod and node process.

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use lb_tests::{
    cgroup::TestCgroup,
    require_root,
    servers::http_get,
    topology::{backend_ip, web_manifest, Agent, ScratchDir, Topology, VIP},
};

#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    require_root();
    let deployment = lb_tests::deploy::Deployment::rendered("base");
    let granted = deployment.capabilities();
    let cgroup = TestCgroup::new("lbcap").expect("cgroup");
    let topology = Topology::new("lbcap", 1).expect("topology");
    let _servers = topology.serve_backends("be").expect("servers");
    let manifests = ScratchDir::new("lbcap-manifests").expect("scratch dir");
    manifests
        .write("web.yaml", &web_manifest(&[(backend_ip(0), true)]))
        .unwrap();
    let pin_dir = PathBuf::from("/sys/fs/bpf/lbcap-test");
    // The DaemonSet's arguments, reading manifests instead of an API server.
    let mut args = deployment.args(&cgroup.path, &pin_dir, Some(&topology.interface_pattern()));
    args.push(format!("--manifests={}", manifests.0.display()));
    let start = |capabilities: &[String], log: &str| {
        Agent::start_deployed(
            &topology.node,
            capabilities,
            &args,
            &[("RUST_LOG".into(), "info".into())],
            &pin_dir,
            &manifests.0.join(log),
        )
        .expect("agent")
    };

    // Without one of them, the agent cannot load or attach: it exits.
    for (i, missing) in granted.iter().enumerate() {
        let fewer: Vec<String> = granted
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, c)| c.clone())
            .collect();
        let mut agent = start(&fewer, &format!("without-{missing}.log"));
        let status = agent.wait_exit(Duration::from_secs(15)).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "without {missing} the agent still runs ({status:?}): the DaemonSet need not grant it\n{}",
            agent.log_text()
        );
        // It found no pins, so it leaves none (not even maps pinned before
        // the kernel refused a program).
        let left: Vec<_> = std::fs::read_dir(&pin_dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "without {missing}, left pinned: {left:?}");
    }

    // With all of them, it serves.
    let mut agent = start(&granted, "agent.log");
    agent
        .wait_for_maps("the Service", |m| {
            m.count(&format!("{VIP}:80/TCP")) == Some(1)
        })
        .unwrap();
    let body = topology
        .client
        .run(|| http_get(SocketAddrV4::new(VIP, 80)))
        .unwrap_or_else(|e| panic!("HTTP through the VIP: {e}\n{}", agent.log_text()));
    assert!(body.starts_with("backend be0 "), "{body}");
    // A host-network client reaches the ClusterIP with the shipped settings
    // (kube-proxy gone: nothing else translates for the node's processes).
    // A node process: the host's network namespace, as a hostNetwork pod.
    let answer = cgroup
        .python(&topology.node, lb_tests::cgroup::TCP_CLIENT)
        .unwrap_or_else(|e| panic!("a node process to the VIP: {e}\n{}", agent.log_text()));
    assert!(
        answer.starts_with(&format!("{VIP}:80|backend be0 ")),
        "{answer}"
    );
    drop(agent);
}
