//! Golden tests: testdata/<case>/input.yaml → (maps dump, errors), compared to
//! expected.dump and expected.errors. `UPDATE_GOLDEN=1 cargo test` rewrites them.

use std::{fs, path::Path};

use lb_agent::{
    cli::dump,
    datapath::offline::fake::FakeMaps,
    desired::{self, Limits},
    reconcile::Reconciler,
    source::manifest,
};

fn run_case(dir: &Path) -> (String, String) {
    let text = fs::read_to_string(dir.join("input.yaml")).unwrap();
    let (objects, mut errors) =
        manifest::parse_str(&text, Some(Path::new("input.yaml"))).expect("YAML");
    let (desired, more) = desired::compute(
        &objects,
        Limits {
            max_backends_per_service: 4,
            lb_algorithm: lb_agent::desired::LbAlgorithm::Random,
            ..Limits::DEFAULT
        },
        // The node the cases are computed for: endpoints on node-a are local.
        desired::NodeContext {
            name: Some("node-a".into()),
            nodeport_addresses: vec!["198.18.0.2".parse().unwrap(), "198.18.0.3".parse().unwrap()],
            zone: Some("zone-a".into()),
            ..Default::default()
        },
    );
    errors.extend(more);
    let mut reconciler = Reconciler::restore(FakeMaps::new(1 << 20, 1 << 20), 1 << 20).unwrap();
    let report = reconciler.apply(&desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let errors: String = errors.iter().map(|e| format!("{e}\n")).collect();
    (dump::services(&reconciler.maps().state), errors)
}

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut cases = 0;
    for entry in fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let (dump, errors) = run_case(&dir);
        for (name, actual) in [("expected.dump", dump), ("expected.errors", errors)] {
            let path = dir.join(name);
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                fs::write(&path, &actual).unwrap();
            }
            let expected = fs::read_to_string(&path)
                .unwrap_or_else(|_| panic!("{} missing (UPDATE_GOLDEN=1)", path.display()));
            assert_eq!(actual, expected, "{} differs", path.display());
        }
        cases += 1;
    }
    assert!(cases >= 8, "golden cases not found in {}", root.display());
}
