//! The observability and control endpoint of a running job: Prometheus `/metrics`,
//! `/healthz`, and admin calls that set `gc_percent`, start a compaction cycle or a
//! checkpoint. Served by axum on a small tokio runtime in its own thread; bound to
//! 127.0.0.1 unless an explicit address says otherwise.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tidepool_operators::checkpoint::Checkpointer;
use tidepool_pipeline::memory::collector::GcController;
use tidepool_pipeline::{BufferPool, DeadLetterSink};

/// What the endpoint reads and controls.
#[derive(Clone)]
pub struct Telemetry {
    /// Events trained so far (the progress counter).
    pub trained: Arc<AtomicU64>,
    /// The GC controller.
    pub gc: Arc<GcController>,
    /// The checkpoint coordinator, when checkpointing.
    pub checkpoints: Option<Arc<Checkpointer>>,
    /// The dead-letter sink (its count).
    pub dead: Arc<dyn DeadLetterSink>,
    /// The buffer pool.
    pub pool: BufferPool,
    /// Kafka messages read, when the source is Kafka.
    pub messages: Option<Arc<AtomicU64>>,
    /// When the job started.
    pub started: Instant,
}

fn render(t: &Telemetry) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, lines: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let trained = t.trained.load(Ordering::Relaxed) as f64;
    let up = t.started.elapsed().as_secs_f64();
    metric(
        "tidepool_events_trained_total",
        "Events scored (when due) and trained.",
        "counter",
        &[(String::new(), trained)],
    );
    metric(
        "tidepool_events_per_second",
        "Events trained per second since start.",
        "gauge",
        &[(String::new(), trained / up.max(1e-9))],
    );
    metric(
        "tidepool_dead_letters_total",
        "Records sent to the dead letters.",
        "counter",
        &[(String::new(), t.dead.count() as f64)],
    );
    if let Some(m) = &t.messages {
        metric(
            "tidepool_kafka_messages_total",
            "Kafka messages read.",
            "counter",
            &[(String::new(), m.load(Ordering::Relaxed) as f64)],
        );
    }
    let gc = t.gc.stats();
    let cycles: Vec<(String, f64)> = ["ratio", "limit", "forced", "manual"]
        .iter()
        .map(|k| {
            (
                format!("{{trigger=\"{k}\"}}"),
                *gc.cycles.get(k).unwrap_or(&0) as f64,
            )
        })
        .collect();
    metric(
        "tidepool_gc_cycles_total",
        "Compaction cycles by trigger.",
        "counter",
        &cycles,
    );
    metric(
        "tidepool_gc_pause_seconds_total",
        "Time spent in compaction cycles.",
        "counter",
        &[(String::new(), gc.pause_total_ms / 1e3)],
    );
    metric(
        "tidepool_gc_pause_max_seconds",
        "Longest compaction pause.",
        "gauge",
        &[(String::new(), gc.pause_max_ms / 1e3)],
    );
    metric(
        "tidepool_gc_percent",
        "The ratio trigger's gc_percent (-1 when off).",
        "gauge",
        &[(
            String::new(),
            t.gc.config().gc_percent.map_or(-1.0, f64::from),
        )],
    );
    if let Some(live) = tidepool_pipeline::memory::heap::heap_live() {
        metric(
            "tidepool_heap_live_bytes",
            "Live heap (counting allocator).",
            "gauge",
            &[(String::new(), live as f64)],
        );
    }
    metric(
        "tidepool_heap_marked_bytes",
        "Live heap after the last cycle.",
        "gauge",
        &[(String::new(), gc.heap_marked as f64)],
    );
    let pool = t.pool.stats();
    metric(
        "tidepool_pool_hit_rate",
        "Buffer pool hit rate.",
        "gauge",
        &[(String::new(), pool.hit_rate)],
    );
    metric(
        "tidepool_pool_bytes_held",
        "Bytes held by the buffer pool.",
        "gauge",
        &[(String::new(), pool.bytes_held as f64)],
    );
    if let Some(cp) = &t.checkpoints {
        let s = cp.stats();
        metric(
            "tidepool_checkpoints_total",
            "Checkpoints written by this run.",
            "counter",
            &[(String::new(), s.written as f64)],
        );
        metric(
            "tidepool_checkpoint_last_id",
            "The newest checkpoint.",
            "gauge",
            &[(String::new(), s.last_id.unwrap_or(0) as f64)],
        );
        metric(
            "tidepool_checkpoint_age_seconds",
            "Seconds since the last checkpoint (or the start).",
            "gauge",
            &[(String::new(), cp.age().as_secs_f64())],
        );
    }
    metric(
        "tidepool_uptime_seconds",
        "Seconds since the job started.",
        "gauge",
        &[(String::new(), up)],
    );
    out
}

#[derive(serde::Deserialize)]
struct GcQuery {
    percent: String,
}

/// Starts the endpoint on `addr` (a bare port means 127.0.0.1) and returns the bound
/// address; the server lives as long as the process.
pub fn start(addr: &str, telemetry: Telemetry) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = if addr.contains(':') {
        addr.parse()?
    } else {
        SocketAddr::from(([127, 0, 0, 1], addr.parse::<u16>()?))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(t): State<Telemetry>| async move { render(&t) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/admin/gc",
            post(
                |State(t): State<Telemetry>, Query(q): Query<GcQuery>| async move {
                    match tidepool_pipeline::memory::gc::parse_gc_percent(&q.percent) {
                        Ok(p) => {
                            let old = t.gc.set_gc_percent(p);
                            (StatusCode::OK, format!("gc_percent {old:?} -> {p:?}\n"))
                        }
                        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
                    }
                },
            ),
        )
        .route(
            "/admin/compact",
            post(|State(t): State<Telemetry>| async move {
                t.gc.request();
                "compaction cycle requested\n"
            }),
        )
        .route(
            "/admin/checkpoint",
            post(|State(t): State<Telemetry>| async move {
                match &t.checkpoints {
                    Some(cp) => {
                        cp.request_flag().store(true, Ordering::Relaxed);
                        (StatusCode::OK, "checkpoint requested\n")
                    }
                    None => (
                        StatusCode::CONFLICT,
                        "this job does not checkpoint (no --checkpoint-dir)\n",
                    ),
                }
            }),
        )
        .with_state(telemetry);
    std::thread::Builder::new()
        .name("tidepool-http".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(async { axum::serve(listener, app).await }) {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        })?;
    Ok(bound)
}

/// Starts the endpoint when `addr` is given, announcing the bound address on stderr
/// (the line tests and scripts read).
pub fn start_if(addr: Option<&str>, telemetry: impl FnOnce() -> Telemetry) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let bound = start(addr, telemetry())?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    Ok(())
}
