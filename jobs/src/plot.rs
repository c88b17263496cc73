//! Charts written into report directories, rendered with plotters' SVG backend (no
//! fonts or native libraries needed: text is left to the viewer).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use tidepool_pipeline::memory::collector::GcStats;

const MB: f64 = 1e6;

/// Writes [`heap_chart`] to `path`.
pub fn heap_svg(gc: &GcStats, path: &Path) -> anyhow::Result<()> {
    let svg = heap_chart(gc)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Lines over a shared x axis, one per named series, as an SVG document.
pub fn line_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<String> {
    let points = || series.iter().flat_map(|(_, s)| s.iter());
    let x_lo = points().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_hi = points().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (x_lo, x_hi) = if x_lo.is_finite() && x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (0.0, 1.0)
    };
    let y_hi = points().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 400)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(64)
                .build_cartesian_2d(x_lo..x_hi, 0.0..y_hi)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()?;
            for (i, (name, points)) in series.iter().enumerate() {
                let colour = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        colour.stroke_width(2),
                    ))?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow::anyhow!("drawing {title}: {e}"))?;
    }
    Ok(svg)
}

/// Live heap over wall time with every GC cycle marked: the sawtooth. Cycles are drawn
/// as a drop from the heap before to the heap after, coloured by trigger.
pub fn heap_chart(gc: &GcStats) -> anyhow::Result<String> {
    let samples: Vec<(f64, f64)> = gc
        .heap_samples
        .iter()
        .map(|&(t, b)| (t, b as f64 / MB))
        .collect();
    let t_max = samples
        .iter()
        .map(|s| s.0)
        .chain(gc.timeline.iter().map(|c| c.at_s))
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let h_max = samples
        .iter()
        .map(|s| s.1)
        .chain(gc.timeline.iter().map(|c| c.heap_before as f64 / MB))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let mut svg = String::new();
    let root = SVGBackend::with_string(&mut svg, (960, 480)).into_drawing_area();
    let draw =
        || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let title = format!(
                "live heap (MB) and {} GC cycles, gc_percent {}",
                gc.cycles_total,
                gc.config
                    .gc_percent
                    .map_or_else(|| "off".to_string(), |p| p.to_string())
            );
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0.0..t_max, 0.0..h_max)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc("MB")
                .draw()?;
            chart
                .draw_series(LineSeries::new(
                    samples.iter().copied(),
                    BLUE.stroke_width(2),
                ))?
                .label("live heap")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
            for (name, colour) in [
                ("ratio", RED),
                ("limit", MAGENTA),
                ("forced", GREEN),
                ("manual", BLACK),
            ] {
                let cycles: Vec<_> = gc.timeline.iter().filter(|c| c.trigger == name).collect();
                if cycles.is_empty() {
                    continue;
                }
                chart
                    .draw_series(cycles.iter().map(|c| {
                        PathElement::new(
                            vec![
                                (c.at_s, c.heap_before as f64 / MB),
                                (c.at_s, c.heap_after as f64 / MB),
                            ],
                            colour.stroke_width(2),
                        )
                    }))?
                    .label(format!("{name} cycle"))
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
                chart.draw_series(cycles.iter().map(|c| {
                    Circle::new((c.at_s, c.heap_after as f64 / MB), 3, colour.filled())
                }))?;
            }
            if let Some(limit) = gc.config.memory_limit {
                let l = limit as f64 / MB;
                if l <= h_max {
                    chart
                        .draw_series(LineSeries::new(
                            [(0.0, l), (t_max, l)],
                            BLACK.stroke_width(1),
                        ))?
                        .label("memory limit")
                        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
    draw().map_err(|e| anyhow::anyhow!("drawing the heap chart: {e}"))?;
    drop(root);
    Ok(svg)
}
