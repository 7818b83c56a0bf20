//! The agent recomputes only the Services a change touches; the result must
//! always equal a computation over everything. Random edits of a directory of
//! small manifests (with duplicate names, shared VIPs, invalid fields and
//! objects that do not parse) check that after every step.

use std::path::PathBuf;

use lb_agent::{
    datapath::offline::fake::FakeMaps,
    desired::{self, DesiredState, Limits},
    reconcile::Reconciler,
    source::manifest,
    source::objects::Objects,
    source::store::ObjectStore,
};

const LIMITS: Limits = Limits {
    max_backends_per_service: 3,
    lb_algorithm: lb_agent::desired::LbAlgorithm::Random,
    ..Limits::DEFAULT
};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn random_file(rng: &mut Rng) -> String {
    let name = format!("svc{}", rng.next(6));
    let vip = format!("198.19.0.{}", 1 + rng.next(4));
    let port = [80, 81, 0][rng.next(3) as usize];
    let port_value = if rng.next(10) == 0 {
        "eighty".to_string() // does not parse
    } else {
        port.to_string()
    };
    let slice_owner = if rng.next(4) == 0 {
        format!("svc{}", rng.next(6))
    } else {
        name.clone()
    };
    let endpoints: String = (0..rng.next(5))
        .map(|_| match rng.next(8) {
            0 => "- addresses: [not-an-ip]\n".to_string(),
            n => format!("- addresses: [198.18.0.{n}]\n"),
        })
        .collect();
    let endpoints = if endpoints.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{endpoints}")
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: {port_value}, targetPort: 8080}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: t\n  labels: {{kubernetes.io/service-name: {slice_owner}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:{endpoints}",
        rng.next(3)
    )
}

fn parse(file: usize, text: &str) -> Objects {
    let path = PathBuf::from(format!("f{file}.yaml"));
    manifest::parse_str(text, Some(&path)).expect("YAML").0
}

#[test]
fn incremental_updates_equal_a_full_computation() {
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let files = 8;
        let mut contents: Vec<Objects> = vec![Objects::default(); files];
        let mut store = ObjectStore::default();
        let mut state = DesiredState::new(LIMITS, Default::default());
        let fresh = || Reconciler::restore(FakeMaps::new(4096, 4096), 4096).unwrap();
        let (mut incremental, mut full) = (fresh(), fresh());
        for step in 0..60 {
            let file = rng.next(files as u64) as usize;
            let new = if rng.next(6) == 0 {
                Objects::default() // the file is deleted
            } else {
                parse(file, &random_file(&mut rng))
            };
            let mut dirty = store.remove(&contents[file]);
            dirty.extend(store.add(&new));
            contents[file] = new;
            let changes = state.update(&store, &dirty);

            let mut all = Objects::default();
            for objects in &contents {
                all.extend(objects);
            }
            let (expected, expected_errors) = desired::compute(&all, LIMITS, Default::default());
            assert_eq!(state.desired(), &expected, "seed {seed} step {step}");
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            assert_eq!(
                sorted(state.errors().iter().map(ToString::to_string).collect()),
                sorted(expected_errors.iter().map(ToString::to_string).collect()),
                "seed {seed} step {step}"
            );
            // The maps written change by change equal the maps written from
            // the whole desired state each time.
            let report = incremental.apply_changes(state.desired(), &changes);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            full.apply(&expected);
            assert_eq!(
                content(&incremental),
                content(&full),
                "seed {seed} step {step}"
            );
            assert!(incremental.maps().violations.is_empty());
            // Every frontend that differs from before is reported as changed
            // (checked loosely: the changed set covers the dirty Services' frontends).
            for (frontend, spec) in &expected.frontends {
                if dirty.contains(&spec.service) && !changes.all {
                    assert!(
                        changes.frontends.contains(frontend),
                        "seed {seed} step {step}"
                    );
                }
            }
        }
    }
}

/// The maps' meaning, independent of id numbering: each slot's backend
/// address, each frontend's count and owner, and the backends present.
fn content(r: &Reconciler<FakeMaps>) -> (Vec<String>, Vec<String>) {
    let state = &r.maps().state;
    let slots = state
        .slots
        .iter()
        .map(|((f, slot), v)| match *slot {
            0 => format!(
                "{f}#0 count={} owner={:?}",
                v.count,
                state
                    .revnat
                    .get(&v.rev_nat_id)
                    .and_then(|e| e.owner.clone())
            ),
            s => format!("{f}#{s} {}", state.backends[&v.backend_id]),
        })
        .collect();
    let mut backends: Vec<String> = state.backends.values().map(ToString::to_string).collect();
    backends.sort();
    (slots, backends)
}
