//! The observability and control endpoint of a running job: Prometheus `/metrics`,
//! `/healthz`, and admin calls that set `gc_percent`, start a compaction cycle or a
//! checkpoint. Served by axum on a small tokio runtime in its own thread; bound to
//! 127.0.0.1 unless an explicit address says otherwise.
//!
//! Admin calls are guarded twice. Every admin POST must carry the header
//! [`ADMIN_HEADER`]: a browser sends a custom header cross-origin only after a CORS
//! preflight, which this server never approves, so a web page the operator visits cannot
//! trigger them (CSRF). Bound to anything but loopback, the endpoint also requires a
//! token (`--admin-token` or `TIDEPOOL_ADMIN_TOKEN`, sent as `Authorization: Bearer`) and
//! refuses to start without one.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tidepool_connector_kafka::KafkaCounters;
use tidepool_operators::checkpoint::Checkpointer;
use tidepool_operators::live::LiveMetrics;
use tidepool_pipeline::memory::collector::GcController;
use tidepool_pipeline::Quality;
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
    /// The Kafka source's counters (messages, lag per partition), when reading Kafka.
    pub kafka: Option<Arc<KafkaCounters>>,
    /// The run's live quality counters, event time and watermark.
    pub live: Option<Arc<LiveMetrics>>,
    /// When the job started.
    pub started: Instant,
}

/// Width of the "recent" quality window.
const RECENT: Duration = Duration::from_secs(60);

/// Snapshots of the live quality counters, one a second over the last [`RECENT`]: the
/// recent window's counters are the newest minus the oldest.
#[derive(Clone, Default)]
struct Recent(Arc<Mutex<VecDeque<Snapshot>>>);

/// When, and each variant's counters then.
type Snapshot = (Instant, Vec<Quality>);

impl Recent {
    fn sample(&self, live: &LiveMetrics) {
        let now = Instant::now();
        let snapshot = live.quality().into_iter().map(|(_, q)| q).collect();
        let mut ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        ring.push_back((now, snapshot));
        while ring
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RECENT)
        {
            ring.pop_front();
        }
    }

    /// Per variant, the counters added over the window, and the window's length.
    fn window(&self) -> Option<(Vec<Quality>, Duration)> {
        let ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ((t0, first), (t1, last)) = (ring.front()?, ring.back()?);
        let diff = first.iter().zip(last).map(|(a, b)| b.since(a)).collect();
        Some((diff, t1.duration_since(*t0)))
    }
}

#[derive(Clone)]
struct Served {
    telemetry: Telemetry,
    recent: Recent,
}

/// The header every admin call must carry (any value).
pub const ADMIN_HEADER: &str = "x-tidepool-admin";

/// Checks an admin call's headers: the CSRF header, then the token if one is set.
fn authorize(
    headers: &axum::http::HeaderMap,
    token: Option<&str>,
) -> Result<(), (StatusCode, String)> {
    if !headers.contains_key(ADMIN_HEADER) {
        return Err((
            StatusCode::FORBIDDEN,
            format!("admin calls need the header {ADMIN_HEADER} (it keeps web pages from sending them)\n"),
        ));
    }
    if let Some(token) = token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in constant time: the comparison must not say how much was right.
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err((
                StatusCode::UNAUTHORIZED,
                "admin calls need Authorization: Bearer <the admin token>\n".into(),
            ));
        }
    }
    Ok(())
}

/// Asks for a checkpoint unless one is already asked for: at most one in flight.
fn request_checkpoint(flag: &std::sync::atomic::AtomicBool) -> (StatusCode, &'static str) {
    if flag.swap(true, Ordering::AcqRel) {
        (
            StatusCode::TOO_MANY_REQUESTS,
            "a checkpoint is already requested and not yet taken\n",
        )
    } else {
        (StatusCode::OK, "checkpoint requested\n")
    }
}

fn render(served: &Served) -> String {
    let t = &served.telemetry;
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
    if let Some(k) = &t.kafka {
        metric(
            "tidepool_kafka_messages_total",
            "Kafka messages read.",
            "counter",
            &[(String::new(), k.messages.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "tidepool_kafka_offsets_rewound_total",
            "Times a partition handed back an offset below the next one expected (topic recreated, offsets reset).",
            "counter",
            &[(String::new(), k.offsets_rewound.load(Ordering::Relaxed) as f64)],
        );
        let lag: Vec<(String, f64)> = k
            .lag()
            .into_iter()
            .map(|(p, lag)| (format!("{{partition=\"{p}\"}}"), lag as f64))
            .collect();
        metric(
            "tidepool_kafka_consumer_lag",
            "Messages between what this process has read and the partition's end (librdkafka statistics, every second).",
            "gauge",
            &lag,
        );
    }
    if let Some(live) = &t.live {
        render_live(live, &served.recent, &mut metric);
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

fn render_live(
    live: &LiveMetrics,
    recent: &Recent,
    metric: &mut impl FnMut(&str, &str, &str, &[(String, f64)]),
) {
    metric(
        "tidepool_events_read_total",
        "Rows read from the source (events and rejected records).",
        "counter",
        &[(String::new(), live.rows_read() as f64)],
    );
    let k = live.k();
    let quality = live.quality();
    let label = |name: &str| format!("{{variant=\"{}\"}}", name.replace('"', "'"));
    let each = |f: &dyn Fn(&Quality) -> f64| -> Vec<(String, f64)> {
        quality.iter().map(|(n, q)| (label(n), f(q))).collect()
    };
    metric(
        "tidepool_events_scored_total",
        "Events ranked before training (prequential evaluation).",
        "counter",
        &each(&|q| q.scored as f64),
    );
    metric(
        "tidepool_hits_total",
        &format!("Scored events whose item ranked in the top {k}."),
        "counter",
        &each(&|q| q.hits as f64),
    );
    let weights: Vec<(String, f64)> = live
        .weights()
        .into_iter()
        .flat_map(|(name, components, w)| {
            components.into_iter().zip(w).map(move |(c, w)| {
                (
                    format!(
                        "{{variant=\"{}\",component=\"{}\"}}",
                        name.replace('"', "'"),
                        c.replace('"', "'")
                    ),
                    w as f64,
                )
            })
        })
        .collect();
    if !weights.is_empty() {
        metric(
            "tidepool_ensemble_weight",
            "An ensemble's current mixing weight of each component (one worker's).",
            "gauge",
            &weights,
        );
    }
    if live.cooccurrence_bytes() > 0 {
        metric(
            "tidepool_cooccurrence_bytes",
            "Bytes of one worker's replica of the itemknn co-occurrence state.",
            "gauge",
            &[(String::new(), live.cooccurrence_bytes() as f64)],
        );
    }
    if let Some((window, span)) = recent.window() {
        let names = quality.iter().map(|(n, _)| label(n));
        let recall: Vec<_> = names
            .clone()
            .zip(&window)
            .map(|(l, q)| (l, q.recall()))
            .collect();
        let loss: Vec<_> = names.zip(&window).map(|(l, q)| (l, q.loss())).collect();
        metric(
            &format!("tidepool_recall_at_{k}_recent"),
            &format!("recall@{k} over the last minute's scored events (0 when none)."),
            "gauge",
            &recall,
        );
        metric(
            "tidepool_loss_recent",
            "Mean training loss per pair over the last minute.",
            "gauge",
            &loss,
        );
        metric(
            "tidepool_recent_window_seconds",
            "Length of the window the recent gauges cover.",
            "gauge",
            &[(String::new(), span.as_secs_f64())],
        );
    }
    if let Some(newest) = live.newest_event_ms() {
        metric(
            "tidepool_event_time_newest_seconds",
            "The newest event time read (Unix seconds).",
            "gauge",
            &[(String::new(), newest as f64 / 1e3)],
        );
        // The frontier can be past the newest event (its round closed); everything read
        // is trained then, and the watermark is the newest event time.
        if let Some(mark) = live.watermark_ms().map(|m| m.min(newest)) {
            metric(
                "tidepool_watermark_seconds",
                "Event time before which every event read is scored and trained (Unix seconds).",
                "gauge",
                &[(String::new(), mark as f64 / 1e3)],
            );
            metric(
                "tidepool_watermark_lag_seconds",
                "Event time read but not yet trained: newest event time minus the watermark.",
                "gauge",
                &[(String::new(), (newest - mark).max(0) as f64 / 1e3)],
            );
        }
    }
}

#[derive(serde::Deserialize)]
struct GcQuery {
    percent: String,
}

/// Starts the endpoint on `addr` (a bare port means 127.0.0.1) and returns the bound
/// address; the server lives as long as the process. `token` guards the admin calls; an
/// address other than loopback needs one.
pub fn start(addr: &str, token: Option<&str>, telemetry: Telemetry) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = if addr.contains(':') {
        addr.parse()?
    } else {
        SocketAddr::from(([127, 0, 0, 1], addr.parse::<u16>()?))
    };
    let token = token.filter(|t| !t.is_empty());
    if !addr.ip().is_loopback() && token.is_none() {
        anyhow::bail!(
            "the admin endpoint on {addr} is reachable from other machines: give it a token \
             (--admin-token or TIDEPOOL_ADMIN_TOKEN), or bind it to 127.0.0.1"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let bound = listener.local_addr()?;
    let served = Served {
        recent: Recent::default(),
        telemetry,
    };
    if let Some(live) = served.telemetry.live.clone() {
        let recent = served.recent.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                recent.sample(&live);
            }
        });
    }
    // One guard for every admin route (see the module docs), not a check per handler.
    let admin =
        Router::new()
            .route(
                "/admin/gc",
                post(
                    |State(Served { telemetry: t, .. }): State<Served>,
                     Query(q): Query<GcQuery>| async move {
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
                post(
                    |State(Served { telemetry: t, .. }): State<Served>| async move {
                        t.gc.request();
                        "compaction cycle requested\n"
                    },
                ),
            )
            .route(
                "/admin/checkpoint",
                post(
                    |State(Served { telemetry: t, .. }): State<Served>| async move {
                        match &t.checkpoints {
                            Some(cp) => request_checkpoint(&cp.request_flag()),
                            None => (
                                StatusCode::CONFLICT,
                                "this job does not checkpoint (no --checkpoint-dir)\n",
                            ),
                        }
                    },
                ),
            )
            .route_layer(axum::middleware::from_fn_with_state(
                token.map(Arc::<str>::from),
                |State(token): State<Option<Arc<str>>>,
                 request: axum::extract::Request,
                 next: axum::middleware::Next| async move {
                    match authorize(request.headers(), token.as_deref()) {
                        Ok(()) => next.run(request).await,
                        Err(refused) => axum::response::IntoResponse::into_response(refused),
                    }
                },
            ));
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Served>| async move { render(&s) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(admin)
        .with_state(served);
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
pub fn start_if(
    addr: Option<&str>,
    token: Option<&str>,
    telemetry: impl FnOnce() -> Telemetry,
) -> anyhow::Result<()> {
    if let Some(addr) = addr {
        let env = std::env::var("TIDEPOOL_ADMIN_TOKEN").ok();
        let bound = start(addr, token.or(env.as_deref()), telemetry())?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    #[test]
    fn admin_calls_need_the_header_and_the_token() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            authorize(&headers, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        headers.insert(ADMIN_HEADER, "1".parse().unwrap());
        assert!(
            authorize(&headers, None).is_ok(),
            "loopback without a token"
        );
        assert_eq!(
            authorize(&headers, Some("t0ken")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        headers.insert("authorization", "Bearer t0ke".parse().unwrap());
        assert!(
            authorize(&headers, Some("t0ken")).is_err(),
            "a prefix is not the token"
        );
        headers.insert("authorization", "Bearer t0ken".parse().unwrap());
        assert!(authorize(&headers, Some("t0ken")).is_ok());
    }

    #[test]
    fn one_checkpoint_request_at_a_time() {
        let flag = std::sync::atomic::AtomicBool::new(false);
        assert_eq!(request_checkpoint(&flag).0, StatusCode::OK);
        assert_eq!(request_checkpoint(&flag).0, StatusCode::TOO_MANY_REQUESTS);
        // Taken by the job: the next request is accepted again.
        flag.store(false, Ordering::Relaxed);
        assert_eq!(request_checkpoint(&flag).0, StatusCode::OK);
    }
}
