//! Turning a [`BacktestReport`] into what users read: the summary table, the summary
//! JSON, and the per-window metrics file.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{Field, Schema};
use serde_json::{json, Map, Value};
use tidepool_operators::{BacktestReport, VariantReport};
use tidepool_pipeline::metrics::{
    ndcg_key, recall_key, EVENTS, EVENTS_SCORED, MRR, TOTAL_SECONDS, TRAIN_EVENTS_PER_SEC,
};
use tidepool_pipeline::BufferPool;

fn variant_json(report: &BacktestReport, v: &VariantReport) -> Map<String, Value> {
    let k = report.protocol.k;
    let q = &v.total;
    let mut m = Map::new();
    m.insert("name".into(), json!(v.name));
    m.insert("model".into(), json!(v.model.kind.name()));
    m.insert(EVENTS.into(), json!(q.events));
    m.insert(EVENTS_SCORED.into(), json!(q.scored));
    m.insert(recall_key(k), json!(q.recall()));
    m.insert(ndcg_key(k), json!(q.ndcg()));
    m.insert(MRR.into(), json!(q.mrr()));
    m.insert("hits".into(), json!(q.hits));
    m.insert("loss".into(), json!(q.loss()));
    m.insert("train_pairs".into(), json!(q.pairs));
    if let Some(norm) = v.item_table_norm {
        m.insert("item_table_norm".into(), json!(norm));
    }
    if let Some(weights) = weights_json(&v.components, v.weights.as_deref()) {
        m.insert("weights".into(), weights);
    }
    m.insert("model_config".into(), json!(v.model));
    m
}

/// An ensemble's weights as `{component: weight}`.
fn weights_json(components: &[String], weights: Option<&[f64]>) -> Option<Value> {
    let weights = weights?;
    Some(Value::Object(
        components
            .iter()
            .zip(weights)
            .map(|(c, w)| (c.clone(), json!(w)))
            .collect(),
    ))
}

/// The `weights` cell of a window: the ensemble's mean weights as JSON, empty otherwise.
fn weights_cell(v: &VariantReport, w: &tidepool_operators::WindowReport) -> String {
    weights_json(&v.components, w.weights.as_deref())
        .map(|j| j.to_string())
        .unwrap_or_default()
}

/// The summary JSON: the first variant's metrics at the top level, every variant under
/// `variants`, run facts and the configuration used.
pub fn summary_json(report: &BacktestReport, source: &str) -> Value {
    let mut top = report
        .variants
        .first()
        .map(|v| variant_json(report, v))
        .unwrap_or_default();
    top.insert(EVENTS.into(), json!(report.events));
    top.insert(TRAIN_EVENTS_PER_SEC.into(), json!(report.events_per_sec()));
    top.insert(TOTAL_SECONDS.into(), json!(report.seconds));
    top.insert("source".into(), json!(source));
    top.insert("rows".into(), json!(report.rows));
    top.insert("processes".into(), json!(report.processes));
    if let Some(n) = report.popularity_window_events {
        top.insert("popularity_window_events".into(), json!(n));
    }
    top.insert("workers_per_process".into(), json!(report.config.workers));
    top.insert("dead_letters".into(), json!(report.dead_letters));
    top.insert("reordered".into(), json!(report.reordered));
    top.insert(
        "sampler_shortfalls".into(),
        json!(report.sampler_shortfalls),
    );
    top.insert("users".into(), json!(report.users));
    top.insert("items".into(), json!(report.items));
    if report.cooccurrence_bytes > 0 {
        top.insert(
            "cooccurrence_bytes".into(),
            json!(report.cooccurrence_bytes),
        );
    }
    if let Some(a) = &report.allocs {
        // Steady state only: see `AllocMeter`.
        top.insert("allocs_per_event".into(), json!(a.per_event()));
        top.insert("allocs".into(), json!(a));
    }
    top.insert("warmup_events".into(), json!(report.protocol.warmup));
    top.insert("tick_ms".into(), json!(report.tick_ms));
    top.insert("window_ms".into(), json!(report.protocol.window_ms));
    top.insert("config".into(), json!(report.config));
    top.insert(
        "variants".into(),
        Value::Array(
            report
                .variants
                .iter()
                .map(|v| Value::Object(variant_json(report, v)))
                .collect(),
        ),
    );
    Value::Object(top)
}

/// The human summary table.
pub fn summary_table(report: &BacktestReport) -> String {
    let k = report.protocol.k;
    let mut out = String::new();
    out.push_str(&format!(
        "{:<12} {:>10} {:>8} {:>10} {:>9} {:>8} {:>8} {:>12}\n",
        "variant",
        "events",
        "scored",
        format!("recall@{k}"),
        format!("ndcg@{k}"),
        "mrr",
        "loss",
        "events/s"
    ));
    for v in &report.variants {
        let q = &v.total;
        out.push_str(&format!(
            "{:<12} {:>10} {:>8} {:>10.6} {:>9.6} {:>8.5} {:>8.4} {:>12.0}\n",
            v.name,
            q.events,
            q.scored,
            q.recall(),
            q.ndcg(),
            q.mrr(),
            q.loss(),
            report.events_per_sec()
        ));
    }
    for v in report.variants.iter().filter(|v| v.weights.is_some()) {
        let weights = v
            .components
            .iter()
            .zip(v.weights.iter().flatten())
            .map(|(c, w)| format!("{c} {w:.4}"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "{} mixing weights (last window): {weights}\n",
            v.name
        ));
    }
    out.push_str(&format!(
        "{} events in {:.2}s on {}{} worker(s); warm-up {} events, every {} later event scored; {} dead letters, {} reordered\n",
        report.events,
        report.seconds,
        if report.processes > 1 {
            format!("{} processes x ", report.processes)
        } else {
            String::new()
        },
        report.config.workers,
        report.protocol.warmup,
        report.protocol.eval_every,
        report.dead_letters,
        report.reordered,
    ));
    out
}

const WINDOW_COLUMNS: [&str; 12] = [
    "variant",
    "window_start_ms",
    "window_end_ms",
    "events",
    "scored",
    "hits",
    "recall",
    "ndcg",
    "mrr",
    "train_pairs",
    "loss",
    "weights",
];

/// The per-window metrics of every variant as one record batch, the columns of
/// `--metrics-out` (what the Python package hands over as `Report.windows`).
pub fn windows_batch(report: &BacktestReport, pool: &BufferPool) -> anyhow::Result<RecordBatch> {
    let rows: Vec<(&VariantReport, &tidepool_operators::WindowReport)> = report
        .variants
        .iter()
        .flat_map(|v| v.windows.iter().map(move |w| (v, w)))
        .collect();
    // Numeric columns are built in the pool like every batch tidepool builds; the
    // variant names are a string column, built by arrow.
    let u = |f: &dyn Fn(&tidepool_pipeline::Quality) -> u64| -> ArrayRef {
        let mut v = pool.vec::<u64>(rows.len());
        rows.iter().for_each(|(_, w)| v.push(f(&w.quality)));
        Arc::new(UInt64Array::new(v.into_scalar(), None))
    };
    let x = |f: &dyn Fn(&tidepool_pipeline::Quality) -> f64| -> ArrayRef {
        let mut v = pool.vec::<f64>(rows.len());
        rows.iter().for_each(|(_, w)| v.push(f(&w.quality)));
        Arc::new(Float64Array::new(v.into_scalar(), None))
    };
    let i = |f: &dyn Fn(&tidepool_operators::WindowReport) -> i64| -> ArrayRef {
        let mut v = pool.vec::<i64>(rows.len());
        rows.iter().for_each(|(_, w)| v.push(f(w)));
        Arc::new(Int64Array::new(v.into_scalar(), None))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(v, _)| v.name.as_str()),
        )),
        i(&|w| w.start_ms),
        i(&|w| w.end_ms),
        u(&|q| q.events),
        u(&|q| q.scored),
        u(&|q| q.hits),
        x(&|q| q.recall()),
        x(&|q| q.ndcg()),
        x(&|q| q.mrr()),
        u(&|q| q.pairs),
        x(&|q| q.loss()),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(v, w)| weights_cell(v, w)),
        )),
    ];
    let fields: Vec<Field> = WINDOW_COLUMNS
        .iter()
        .zip(&columns)
        .map(|(name, c)| Field::new(*name, c.data_type().clone(), false))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Writes the per-window metrics: Parquet when the path ends in `.parquet`, CSV otherwise.
pub fn write_metrics(
    report: &BacktestReport,
    path: &Path,
    pool: &BufferPool,
) -> anyhow::Result<()> {
    let rows: Vec<(&VariantReport, &tidepool_operators::WindowReport)> = report
        .variants
        .iter()
        .flat_map(|v| v.windows.iter().map(move |w| (v, w)))
        .collect();
    if path.extension().is_some_and(|e| e == "parquet") {
        let batch = windows_batch(report, pool)?;
        let schema = batch.schema();
        let mut writer = tidepool_connector_parquet::EventWriter::create(path, schema, 1 << 20)?;
        writer.write(&batch)?;
        writer.finish()?;
    } else {
        let mut out = String::new();
        out.push_str(&WINDOW_COLUMNS.join(","));
        out.push('\n');
        for (v, w) in rows {
            let q = &w.quality;
            // The weights cell is JSON: quoted, with its quotes doubled (RFC 4180).
            let weights = weights_cell(v, w);
            let weights = if weights.is_empty() {
                weights
            } else {
                format!("\"{}\"", weights.replace('"', "\"\""))
            };
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{weights}\n",
                v.name,
                w.start_ms,
                w.end_ms,
                q.events,
                q.scored,
                q.hits,
                q.recall(),
                q.ndcg(),
                q.mrr(),
                q.pairs,
                q.loss()
            ));
        }
        let mut file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(out.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
