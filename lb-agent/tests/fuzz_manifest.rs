//! The manifest → desired state → map writes path, fuzzed with proptest:
//! real manifests (the demo's and the golden cases') mutated line by line
//! and value by value, and arbitrary text. Nothing panics; every problem is
//! a clear error (it names the object, a field when the kind is about one,
//! and says what is wrong); and what is written to the maps is consistent.

use lb_agent::{
    datapath::offline::fake::FakeMaps,
    desired::{self, Limits, NodeContext},
    model::error::InputErrorKind,
    reconcile::Reconciler,
    source::manifest,
};
use proptest::prelude::*;

fn corpus() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut texts =
        vec![std::fs::read_to_string(root.join("../deploy/examples/demo.yaml")).unwrap()];
    for entry in std::fs::read_dir(root.join("testdata")).unwrap().flatten() {
        let path = entry.path();
        for file in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let p = file.path();
            if p.extension().is_some_and(|e| e == "yaml") {
                texts.push(std::fs::read_to_string(p).unwrap());
            }
        }
        if path.extension().is_some_and(|e| e == "yaml") {
            texts.push(std::fs::read_to_string(&path).unwrap());
        }
    }
    texts
}

/// Values that break fields in interesting ways.
const JUNK: &[&str] = &[
    "",
    "0",
    "-1",
    "65535",
    "65536",
    "4294967296",
    "1e9",
    "abc",
    "None",
    "null",
    "~",
    "true",
    "[]",
    "{}",
    "[1, 2]",
    "198.19.0.300",
    "198.19.0.10",
    "::1",
    "0.0.0.0",
    "255.255.255.255",
    "198.19.0.10/32",
    "UDP",
    "SCTP",
    "tcp",
    "LoadBalancer",
    "ExternalName",
    "Local",
    "ClientIP",
    "\"\"",
    "'x'",
    "é",
    "\u{0}",
    "-",
    "a-b",
    "998877665544332211",
    "*",
    "&a",
    "!!binary AAAA",
];

#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the value after `key: ` on line `line` with a junk value.
    Value {
        line: usize,
        junk: usize,
    },
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    /// Cut the text at this character.
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0..JUNK.len()).prop_map(|(line, junk)| Mutation::Value { line, junk }),
        1 => any::<usize>().prop_map(Mutation::DeleteLine),
        1 => any::<usize>().prop_map(Mutation::DuplicateLine),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if lines.is_empty() {
        return text.to_owned();
    }
    let n = lines.len();
    match m {
        Mutation::Value { line, junk } => {
            let l = &mut lines[line % n];
            if let Some(at) = l.find(": ") {
                l.truncate(at + 2);
                l.push_str(JUNK[*junk]);
            } else if let Some(at) = l.find("- ") {
                l.truncate(at + 2);
                l.push_str(JUNK[*junk]);
            }
        }
        Mutation::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::Truncate(at) => {
            let text = lines.join("\n");
            let cut = text
                .char_indices()
                .nth(at % text.chars().count().max(1))
                .map_or(0, |(i, _)| i);
            return text[..cut].to_owned();
        }
    }
    lines.join("\n") + "\n"
}

/// Parses, computes and writes `text`: never panics, every error is clear.
fn check_text(text: &str) -> Result<(), TestCaseError> {
    let (objects, mut errors) = match manifest::parse_str(text, None) {
        Ok(parsed) => parsed,
        Err(whole_file) => (Default::default(), vec![whole_file]),
    };
    let (desired, computed) = desired::compute(
        &objects,
        Limits {
            max_backends_per_service: 8,
            lb_algorithm: lb_agent::desired::LbAlgorithm::Random,
            ..Limits::DEFAULT
        },
        NodeContext {
            name: Some("node-1".into()),
            nodeport_addresses: vec!["198.18.0.2".parse().unwrap()],
            zone: None,
            ..Default::default()
        },
    );
    errors.extend(computed);
    for e in &errors {
        let shown = e.to_string();
        prop_assert!(!e.object.is_empty(), "no object named: {shown}");
        prop_assert!(!e.message.trim().is_empty(), "no message: {shown}");
        if e.kind == InputErrorKind::InvalidField {
            prop_assert!(
                !e.field.is_empty(),
                "an invalid field without its path: {shown}"
            );
        }
    }
    // What is desired programs without write errors into maps big enough,
    // in an order no packet sees half of.
    let mut reconciler = Reconciler::restore(FakeMaps::new(65_536, 65_536), 65_536).unwrap();
    let report = reconciler.apply(&desired);
    prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
    prop_assert!(
        reconciler.maps().violations.is_empty(),
        "{:?}",
        reconciler.maps().violations
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_manifests_never_panic_and_every_rejection_is_clear(
        which in any::<usize>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let texts = corpus();
        let mut text = texts[which % texts.len()].clone();
        for m in &mutations {
            text = apply(&text, m);
        }
        check_text(&text)?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        check_text(&text)?;
    }
}
