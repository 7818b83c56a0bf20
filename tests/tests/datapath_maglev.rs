//! `--lb-algorithm maglev` through the real ingress program
//! (BPF_PROG_TEST_RUN): the backend of a flow that lost its conntrack entry
//! moves only when its own backend left, and two nodes — with their own
//! backend ids and local-first slot orders — pick the same backend for a
//! flow. Each property is checked against `random` too, which lacks it, so
//! the tests cannot pass by accident.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_agent::desired::{LbAlgorithm, NodeContext};
use lb_tests::{
    datapath::Harness,
    packet::{Packet, TCP_SYN},
    require_root,
    topology::{CLIENT_IP, VIP},
};

const MAGLEV: LbAlgorithm = LbAlgorithm::Maglev { table_size: None };
const FLOWS: u16 = 2_000;

/// `web` (VIP:80 → 8080) with `backends`, each on the node named with it.
fn manifest(backends: &[(Ipv4Addr, &str)]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|(ip, node)| format!("- addresses: [\"{ip}\"]\n  nodeName: {node}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec:\n  clusterIP: {VIP}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{endpoints}"
    )
}

fn backends(n: u8) -> Vec<(Ipv4Addr, &'static str)> {
    (0..n)
        .map(|i| {
            let node = if i % 2 == 0 { "node-a" } else { "node-b" };
            (Ipv4Addr::new(198, 18, 20, 10 + i), node)
        })
        .collect()
}

fn harness(algorithm: LbAlgorithm, node: &str) -> Harness {
    require_root();
    let mut h = Harness::new();
    h.lb_algorithm = algorithm;
    h.node = NodeContext {
        name: Some(node.into()),
        ..NodeContext::default()
    };
    h
}

/// The backend each of `FLOWS` new flows (a SYN from client ports 20000..)
/// is sent to; conntrack is emptied first, as after its entries were lost.
fn picks(h: &mut Harness) -> Vec<Ipv4Addr> {
    for (key, _) in h.conntrack() {
        h.set_conntrack(&key, None);
    }
    (0..FLOWS)
        .map(|i| {
            let syn = Packet::tcp(
                SocketAddrV4::new(CLIENT_IP, 20_000 + i),
                SocketAddrV4::new(VIP, 80),
                TCP_SYN,
            );
            let out = h.run(&syn.build()).frame;
            Ipv4Addr::new(out[30], out[31], out[32], out[33])
        })
        .collect()
}

/// (flows moved, flows moved that were not on `gone`) between two runs.
fn moved(before: &[Ipv4Addr], after: &[Ipv4Addr], gone: Ipv4Addr) -> (usize, usize) {
    let pairs = || before.iter().zip(after).filter(|(b, a)| b != a);
    (
        pairs().count(),
        pairs().filter(|(b, _)| **b != gone).count(),
    )
}

#[test]
fn maglev_moves_the_removed_backends_flows_and_few_others() {
    let all = backends(10);
    let gone = all[3].0;
    let rest: Vec<_> = all.iter().copied().filter(|(ip, _)| *ip != gone).collect();
    let run = |algorithm| {
        let mut h = harness(algorithm, "node-a");
        h.apply_yaml(&manifest(&all));
        let before = picks(&mut h);
        h.apply_yaml(&manifest(&rest));
        let after = picks(&mut h);
        (before, after)
    };

    let (before, after) = run(MAGLEV);
    // The spread: every backend gets its share of the flows.
    for (ip, _) in &all {
        let n = before.iter().filter(|b| *b == ip).count();
        assert!((140..=260).contains(&n), "{ip}: {n} of {FLOWS} flows");
    }
    assert!(after.iter().all(|b| *b != gone));
    let (total, others) = moved(&before, &after, gone);
    let on_gone = before.iter().filter(|b| **b == gone).count();
    assert_eq!(
        total - others,
        on_gone,
        "every flow of the removed backend moved"
    );
    assert!(
        others * 100 < usize::from(FLOWS) * 5,
        "maglev moved {others} of {FLOWS} flows whose backend stayed"
    );

    // `random` (flow hash modulo the count) moves most of them.
    let (before, after) = run(LbAlgorithm::Random);
    let (_, others) = moved(&before, &after, gone);
    assert!(
        others * 2 > usize::from(FLOWS),
        "random moved only {others} of {FLOWS}"
    );
}

#[test]
fn two_nodes_pick_the_same_backend_for_a_flow_with_maglev() {
    let all = backends(7);
    let run = |algorithm| {
        let mut a = harness(algorithm, "node-a");
        let mut b = harness(algorithm, "node-b");
        // Node b learns the backends in another order (other ids).
        let mut reversed = all.clone();
        reversed.reverse();
        a.apply_yaml(&manifest(&all));
        b.apply_yaml(&manifest(&reversed));
        let (on_a, on_b) = (picks(&mut a), picks(&mut b));
        on_a.iter().zip(&on_b).filter(|(x, y)| x != y).count()
    };
    assert_eq!(run(MAGLEV), 0, "maglev: the nodes disagree on some flows");
    // Slots are local-first, so `random` picks differ between the nodes.
    let disagree = run(LbAlgorithm::Random);
    assert!(
        disagree * 2 > usize::from(FLOWS),
        "random: only {disagree} of {FLOWS} flows differ"
    );
}
