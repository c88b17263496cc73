//! `--report DIR`: the HTML page, opened in headless Chromium, renders every chart.

use std::path::{Path, PathBuf};
use std::process::Command;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Debian's `chromium` (installed by `scripts/test`), or `$TIDEPOOL_CHROMIUM`. A missing
/// browser fails the test: it is a prerequisite, not an optional extra.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("TIDEPOOL_CHROMIUM") {
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "headless Chromium is needed to check the HTML report: run scripts/test (it installs \
         Debian's chromium package) or set TIDEPOOL_CHROMIUM"
    );
}

/// The DOM after the page's scripts ran.
fn rendered_dom(page: &Path) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn the_report_page_renders_every_chart_in_chromium() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "backtest",
            "--events",
            "100000",
            "--quiet",
            "--variant",
            "plain=uniform",
            "--variant",
            "hard=dns:16",
            "--variant",
            "popular=,model=mostpop",
            "--variant",
            "mix=,model=ensemble,components=plain+popular",
            "--report",
            "rep",
        ])
        .current_dir(dir.path())
        .output()
        .expect("tidepool runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = dir.path().join("rep/report.html");
    assert!(
        text(&out.stderr).contains("report: "),
        "{}",
        text(&out.stderr)
    );
    let html = std::fs::read_to_string(&page).expect("report.html written");
    // Self-contained: nothing is fetched (the SVG namespace is a name, not a fetch).
    for reference in ["src=", "href=", "url(", "@import"] {
        assert!(!html.contains(reference), "the page references {reference}");
    }
    for name in ["plain", "hard", "popular", "mix"] {
        assert!(
            html.contains(&format!("<td>{name}</td>")),
            "{name} in the table"
        );
        assert!(
            html.contains(&format!("\n{name}\n</text>")),
            "{name} in a legend"
        );
    }
    assert!(dir.path().join("rep/heap.svg").is_file());
    assert!(
        html.contains("ensemble mixing weights"),
        "the weights chart"
    );
    assert!(
        html.contains("\nmix: popular\n</text>"),
        "a weight line per component"
    );

    let dom = rendered_dom(&page);
    assert!(
        dom.contains("data-ok=\"5\" data-total=\"5\""),
        "not every chart rendered: {}",
        dom.lines()
            .find(|l| l.contains("render-check"))
            .unwrap_or("no render check in the DOM")
    );
}
