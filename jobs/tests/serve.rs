//! The metrics and admin endpoint of a running job, scraped over HTTP, and graceful
//! shutdown on SIGTERM with a final checkpoint.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, "")
}

/// An admin call as a script sends it: the CSRF header and the token.
fn admin(addr: &str, path: &str) -> (u16, String) {
    http_with(
        addr,
        "POST",
        path,
        "X-Tidepool-Admin: 1\r\nAuthorization: Bearer s3cret\r\n",
    )
}

fn http_with(addr: &str, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("the endpoint accepts connections");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http(addr, "GET", "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_admin_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "train",
            "--quiet",
            "--brokers",
            "embedded",
            "--events",
            "30000",
            "--stop-at",
            "idle:60s",
            "--metrics-addr",
            "0",
            "--admin-token",
            "s3cret",
            "--checkpoint-dir",
            "ckpt",
            "--checkpoint-interval",
            "1h",
            "--gc-force-interval",
            "1h",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("metrics on http://") {
                let _ = tx.send(url.trim_end_matches("/metrics").to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the endpoint address is printed");
    assert!(addr.starts_with("127.0.0.1:"), "bound to loopback: {addr}");

    assert_eq!(http(&addr, "GET", "/healthz"), (200, "ok\n".to_string()));
    wait_for("every event trained", || {
        metric(&addr, "tidepool_events_trained_total") == Some(30_000.0)
    });
    assert_eq!(metric(&addr, "tidepool_events_read_total"), Some(30_000.0));
    let (_, body) = http(&addr, "GET", "/metrics");
    for name in [
        "tidepool_events_per_second",
        "tidepool_dead_letters_total",
        "tidepool_kafka_messages_total",
        "tidepool_gc_cycles_total{trigger=\"manual\"}",
        "tidepool_heap_live_bytes",
        "tidepool_pool_hit_rate",
        "tidepool_checkpoint_age_seconds",
    ] {
        assert!(body.contains(name), "{name} missing from\n{body}");
    }

    // Lag per partition (librdkafka statistics, every second): all read, so zero.
    wait_for("the lag of every partition", || {
        (0..4).all(|p| {
            metric(
                &addr,
                &format!("tidepool_kafka_consumer_lag{{partition=\"{p}\"}}"),
            ) == Some(0.0)
        })
    });
    // Quality as it grows, and over the last minute (which covers this whole run).
    wait_for("a recent window of at least two seconds", || {
        metric(&addr, "tidepool_recent_window_seconds").unwrap_or(0.0) >= 2.0
    });
    let scored = metric(&addr, "tidepool_events_scored_total{variant=\"bpr\"}").unwrap();
    let hits = metric(&addr, "tidepool_hits_total{variant=\"bpr\"}").unwrap();
    assert!(
        scored > 1000.0 && hits > 0.0 && hits <= scored,
        "{hits}/{scored}"
    );
    let recall = metric(&addr, "tidepool_recall_at_10_recent{variant=\"bpr\"}").unwrap();
    assert!(recall > 0.0 && recall <= 1.0, "recent recall {recall}");
    let loss = metric(&addr, "tidepool_loss_recent{variant=\"bpr\"}").unwrap();
    assert!(loss > 0.05 && loss < 1.0, "recent loss {loss}");
    // The default configuration's ensemble reports its weights, itemknn its state.
    let weights: f64 = ["itemknn", "bpr", "mostpop"]
        .iter()
        .map(|c| {
            metric(
                &addr,
                &format!("tidepool_ensemble_weight{{variant=\"ensemble\",component=\"{c}\"}}"),
            )
            .unwrap_or_else(|| panic!("no weight for {c}"))
        })
        .sum();
    assert!((weights - 1.0).abs() < 1e-3, "weights sum to {weights}");
    assert!(metric(&addr, "tidepool_cooccurrence_bytes").unwrap() > 0.0);
    // Everything read is trained: the watermark has reached the newest event's round.
    let newest = metric(&addr, "tidepool_event_time_newest_seconds").unwrap();
    let mark = metric(&addr, "tidepool_watermark_seconds").unwrap();
    assert!(
        mark <= newest && newest - mark < 86_400.0,
        "{mark} vs {newest}"
    );

    // gc_percent set at run time shows in the metrics and the next cycle's settings.
    assert_eq!(metric(&addr, "tidepool_gc_percent"), Some(100.0));
    // Admin calls without the CSRF header (what a web page could send) or without the
    // token are refused and change nothing.
    let (status, body) = http(&addr, "POST", "/admin/gc?percent=50");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("X-Tidepool-Admin") || body.contains("x-tidepool-admin"),
        "{body}"
    );
    let (status, _) = http_with(
        &addr,
        "POST",
        "/admin/gc?percent=50",
        "X-Tidepool-Admin: 1\r\n",
    );
    assert_eq!(status, 401);
    let wrong = "X-Tidepool-Admin: 1\r\nAuthorization: Bearer s3creT\r\n";
    assert_eq!(http_with(&addr, "POST", "/admin/checkpoint", wrong).0, 401);
    assert_eq!(metric(&addr, "tidepool_gc_percent"), Some(100.0));
    assert_eq!(admin(&addr, "/admin/gc?percent=50").0, 200);
    assert_eq!(metric(&addr, "tidepool_gc_percent"), Some(50.0));
    assert_eq!(admin(&addr, "/admin/gc?percent=lots").0, 400);
    assert_eq!(admin(&addr, "/admin/compact").0, 200);
    wait_for("a manual cycle", || {
        metric(&addr, "tidepool_gc_cycles_total{trigger=\"manual\"}").unwrap_or(0.0) >= 1.0
    });
    assert_eq!(admin(&addr, "/admin/checkpoint").0, 200);
    wait_for("the requested checkpoint", || {
        metric(&addr, "tidepool_checkpoints_total").unwrap_or(0.0) >= 1.0
    });

    // SIGTERM: stop the readers, drain, final checkpoint, exit 0.
    common::sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("checkpoints: 2 written"), "{stdout}");
    let ckpts: Vec<_> = std::fs::read_dir(dir.path().join("ckpt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ckpts.iter().any(|n| n == "ckpt-2"), "{ckpts:?}");
}

/// Bound to anything but loopback, the endpoint needs a token, and says so.
#[test]
fn an_exposed_endpoint_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        cmd.args([
            "backtest",
            "--quiet",
            "--events",
            "1000",
            "--metrics-addr",
            "0.0.0.0:0",
        ])
        .current_dir(dir.path());
        match token {
            Some(t) => cmd.env("TIDEPOOL_ADMIN_TOKEN", t),
            None => cmd.env_remove("TIDEPOOL_ADMIN_TOKEN"),
        };
        cmd.output().unwrap()
    };
    let out = run(None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reachable from other machines: give it a token (--admin-token or TIDEPOOL_ADMIN_TOKEN)"),
        "{stderr}"
    );
    let out = run(Some("from-the-environment"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
