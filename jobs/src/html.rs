//! The `--report DIR` page: one self-contained HTML file (charts inlined as SVG, no
//! scripts or styles fetched from anywhere) with quality over event time per variant,
//! training loss, ensembles' mixing weights, throughput over wall time, and the live heap
//! with its GC cycles.
//!
//! A small inline script checks, once the page has loaded, that every chart was laid
//! out with a size and drawn marks, and writes the count into `#render-check`; the
//! headless-Chromium test reads it back from the rendered DOM.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use tidepool_operators::BacktestReport;

use crate::plot::{heap_chart, line_chart};

/// Progress over wall time: `(seconds since start, events trained)`.
pub type Throughput = Vec<(f64, u64)>;

/// Writes `dir/report.html` (and `dir/heap.svg`, the heap chart on its own) and returns
/// the page's path.
pub fn write_report(
    dir: &Path,
    report: &BacktestReport,
    source: &str,
    throughput: &[(f64, u64)],
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let heap = heap_chart(&report.gc)?;
    std::fs::write(dir.join("heap.svg"), &heap)
        .with_context(|| format!("writing {}", dir.join("heap.svg").display()))?;
    let k = report.protocol.k;
    let origin = report
        .variants
        .iter()
        .flat_map(|v| v.windows.first())
        .map(|w| w.start_ms)
        .min()
        .unwrap_or(0);
    let day = 86_400_000.0;
    let per_window = |f: &dyn Fn(&tidepool_pipeline::Quality) -> Option<f64>| {
        report
            .variants
            .iter()
            .map(|v| {
                let points = v
                    .windows
                    .iter()
                    .filter_map(|w| {
                        let mid = (w.start_ms + w.end_ms) as f64 / 2.0;
                        f(&w.quality).map(|y| ((mid - origin as f64) / day, y))
                    })
                    .collect();
                (v.name.clone(), points)
            })
            .collect::<Vec<_>>()
    };
    let since =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(origin.max(0) as u64));
    let x_desc = format!("event time (days since {since})");
    let recall = line_chart(
        &format!("recall@{k} per metrics window"),
        &x_desc,
        &format!("recall@{k}"),
        &per_window(&|q| (q.scored > 0).then(|| q.recall())),
    )?;
    let loss = line_chart(
        "training loss per pair, per metrics window",
        &x_desc,
        "loss",
        &per_window(&|q| (q.pairs > 0).then(|| q.loss())),
    )?;
    // Ensembles: each component's mixing weight over event time.
    let weight_lines: Vec<(String, Vec<(f64, f64)>)> = report
        .variants
        .iter()
        .filter(|v| v.weights.is_some())
        .flat_map(|v| {
            v.components.iter().enumerate().map(move |(c, name)| {
                let points = v
                    .windows
                    .iter()
                    .filter_map(|w| {
                        let mid = (w.start_ms + w.end_ms) as f64 / 2.0;
                        let y = *w.weights.as_ref()?.get(c)?;
                        Some(((mid - origin as f64) / day, y))
                    })
                    .collect();
                (format!("{}: {name}", v.name), points)
            })
        })
        .collect();
    let weights = if weight_lines.is_empty() {
        None
    } else {
        Some(line_chart(
            "ensemble mixing weights per metrics window",
            &x_desc,
            "weight",
            &weight_lines,
        )?)
    };
    let rate = throughput_points(throughput);
    let speed = line_chart(
        "throughput",
        "wall time (s)",
        "events/s",
        &[("events trained per second".to_string(), rate)],
    )?;

    let mut html = String::new();
    let title = format!("tidepool report: {}", escape(source));
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n"
    );
    let _ = writeln!(
        html,
        "<p>{} events in {:.2} s on {} process(es) x {} worker(s); warm-up {} events, every {} later event scored; {} dead letters, {} reordered.</p>",
        report.events,
        report.seconds,
        report.processes,
        report.config.workers,
        report.protocol.warmup,
        report.protocol.eval_every,
        report.dead_letters,
        report.reordered
    );
    let _ = writeln!(
        html,
        "<table><tr><th>variant</th><th>model</th><th>sampler</th><th>events</th><th>scored</th><th>recall@{k}</th><th>ndcg@{k}</th><th>mrr</th><th>loss</th></tr>"
    );
    for v in &report.variants {
        let q = &v.total;
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td></tr>",
            escape(&v.name),
            v.model.kind.name(),
            escape(&v.model.sampler),
            q.events,
            q.scored,
            q.recall(),
            q.ndcg(),
            q.mrr(),
            q.loss()
        );
    }
    html.push_str("</table>\n");
    let mut figures = vec![
        (
            "Prequential quality over event time, one line per variant.",
            &recall,
        ),
        ("Training loss over event time.", &loss),
    ];
    if let Some(w) = &weights {
        figures.push((
            "Each ensemble's mean weight per component over event time (learned online).",
            w,
        ));
    }
    for (caption, svg) in figures.into_iter().chain([
        ("Events trained per second over wall time.", &speed),
        (
            "Live heap over wall time; each GC cycle is a drop from the heap before to the heap after, coloured by trigger.",
            &heap,
        ),
    ]) {
        let _ = writeln!(
            html,
            "<figure>{}<figcaption>{caption}</figcaption></figure>",
            strip_prolog(svg)
        );
    }
    let _ = write!(
        html,
        "<p id=\"render-check\">plots not checked (scripts disabled)</p>\n<script>{CHECK}</script>\n</body></html>\n"
    );
    let path = dir.join("report.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Events per second over a sliding window (2 s, or a fiftieth of the run if longer),
/// evaluated every half second: progress moves a round at a time, so rates between
/// neighbouring samples would jump between zero and a round's burst.
fn throughput_points(samples: &[(f64, u64)]) -> Vec<(f64, f64)> {
    let Some(&(t_end, _)) = samples.last() else {
        return Vec::new();
    };
    let window = (t_end / 50.0).max(2.0);
    let mut out = Vec::new();
    let mut next = 0.0;
    let mut start = 0;
    for &(t, n) in samples {
        if t < next {
            continue;
        }
        next = t + 0.5;
        while samples[start].0 < t - window {
            start += 1;
        }
        let (t0, n0) = samples[start];
        if t - t0 >= window * 0.5 {
            out.push((t, n.saturating_sub(n0) as f64 / (t - t0)));
        }
    }
    out
}

/// An SVG document minus its XML prolog, for inlining into HTML.
fn strip_prolog(svg: &str) -> &str {
    svg.find("<svg").map_or(svg, |i| &svg[i..])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}figure{margin:2em 0}figcaption{color:#555}\
svg{max-width:100%;height:auto}";

/// Counts the charts that were laid out with a real size and hold drawn marks.
const CHECK: &str = "window.addEventListener('load',function(){\
var figs=document.querySelectorAll('figure svg'),ok=0;\
figs.forEach(function(svg){var b=svg.getBoundingClientRect();\
var marks=svg.querySelectorAll('polyline,path,line,circle,rect').length;\
if(b.width>200&&b.height>100&&marks>5){ok++;}});\
var el=document.getElementById('render-check');\
el.textContent='plots rendered: '+ok+' of '+figs.length;\
el.setAttribute('data-ok',ok);el.setAttribute('data-total',figs.length);});";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_a_rate_over_a_sliding_window() {
        // A round of 1000 events every second, sampled every 100 ms.
        let samples: Vec<(f64, u64)> = (0..=100)
            .map(|i| (i as f64 / 10.0, (i / 10) as u64 * 1000))
            .collect();
        let p = throughput_points(&samples);
        assert!(p.len() >= 15, "{p:?}");
        // Over two seconds the steps average out to about 1000/s.
        for &(t, rate) in &p {
            assert!((500.0..=1500.0).contains(&rate), "{t}: {rate}");
        }
        assert!(throughput_points(&[]).is_empty());
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(escape("<a&b>\""), "&lt;a&amp;b&gt;&quot;");
    }
}
