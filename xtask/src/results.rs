//! Bench results: each bench command writes its report to `bench/results/`
//! and the same tables into its section of `docs/performance.md`, so the
//! docs show only figures a command produced.

use std::path::PathBuf;

use anyhow::{bail, Context as _};

/// The reports, each with its section in the docs page.
pub const REPORTS: [&str; 6] = [
    "bench.md",
    "ipv6.md",
    "packet-rate.md",
    "k8s-latency.md",
    "soak.md",
    "upkeep.md",
];

fn results_dir() -> PathBuf {
    crate::workspace_root().join("bench/results")
}

fn docs_page() -> PathBuf {
    crate::workspace_root().join("docs/performance.md")
}

/// Writes report `name` and refreshes the docs page from all reports.
pub fn publish(name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    refresh_docs()?;
    Ok(path)
}

/// Rewrites each report's section of the docs page from the report file.
pub fn refresh_docs() -> anyhow::Result<()> {
    let page = docs_page();
    let text = std::fs::read_to_string(&page)?;
    let refreshed = with_reports(&text, |name| {
        std::fs::read_to_string(results_dir().join(name)).ok()
    })?;
    if refreshed != text {
        std::fs::write(&page, refreshed)?;
    }
    Ok(())
}

/// `page` with each report's section replaced by `report(name)` (a missing
/// report leaves its section as it is).
pub fn with_reports(page: &str, report: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let mut out = page.to_string();
    for name in REPORTS {
        let begin = format!("<!-- results:{name} (written by cargo xtask; do not edit) -->\n");
        let end = format!("<!-- /results:{name} -->");
        let (Some(b), Some(e)) = (out.find(&begin), out.find(&end)) else {
            bail!("docs/performance.md has no section markers for {name}");
        };
        let Some(report) = report(name) else { continue };
        let body = section(&report);
        out.replace_range(b + begin.len()..e, &body);
    }
    Ok(out)
}

/// A report as a section of the page: its title dropped (the page has its
/// own heading), headings one level down, links from `docs/`.
fn section(report: &str) -> String {
    let mut out = String::new();
    for (i, line) in report.lines().enumerate() {
        if i == 0 && line.starts_with("# ") {
            continue;
        }
        let line = if line.starts_with('#') {
            format!("#{line}")
        } else {
            line.replace("](connections.svg)", "](../bench/results/connections.svg)")
        };
        out.push_str(&line);
        out.push('\n');
    }
    out.trim_start_matches('\n').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_performance_page_shows_the_reports_as_written() {
        let page = std::fs::read_to_string(docs_page()).unwrap();
        let expected = with_reports(&page, |name| {
            Some(std::fs::read_to_string(results_dir().join(name)).unwrap())
        })
        .unwrap();
        assert!(
            page == expected,
            "docs/performance.md is out of date with bench/results: run `cargo xtask docs`"
        );
    }

    #[test]
    fn a_section_drops_the_title_and_demotes_headings() {
        let report = "# Title\n\nintro ![c](connections.svg)\n\n## Table\n\n| a |\n";
        assert_eq!(
            section(report),
            "intro ![c](../bench/results/connections.svg)\n\n### Table\n\n| a |\n"
        );
    }
}
