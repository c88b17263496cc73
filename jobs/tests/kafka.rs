//! `tidepool train` against a Kafka broker each test starts: a real Apache Kafka broker
//! (KRaft, from the jars `scripts/setup` fetches) unless a test says why it needs
//! librdkafka's mock cluster, with the binary as users run it.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::broker::TestBroker;
use tidepool_connector_generator::{Generator, GeneratorConfig};
use tidepool_connector_kafka::{produce, KafkaSettings, Producer};
use tidepool_pipeline::event::decode_events;
use tidepool_pipeline::{BatchOrigin, Event};

fn events(n: u64) -> Vec<Event> {
    let cfg = GeneratorConfig {
        events: n,
        ..GeneratorConfig::default()
    };
    let origin = BatchOrigin {
        source: "gen".into(),
        first_row: 0,
        first_pos: 0,
    };
    let mut out = Vec::new();
    for batch in Generator::new(cfg).unwrap() {
        decode_events(&batch, &origin, &mut out, &mut |_| {
            panic!("generated rows decode")
        })
        .unwrap();
    }
    out
}

fn cluster(topic: &str) -> (TestBroker, KafkaSettings) {
    cluster_with(topic, 4)
}

fn cluster_with(topic: &str, partitions: i32) -> (TestBroker, KafkaSettings) {
    with_broker(TestBroker::start(), topic, partitions)
}

fn with_broker(cluster: TestBroker, topic: &str, partitions: i32) -> (TestBroker, KafkaSettings) {
    cluster.create_topic(topic, partitions);
    let settings = KafkaSettings {
        brokers: cluster.bootstrap(),
        topic: topic.into(),
        group: "tests".into(),
        ..KafkaSettings::default()
    };
    (cluster, settings)
}

fn train(brokers: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
    cmd.args(["train", "--quiet", "--brokers", brokers, "--stop-at", "end"])
        .args(extra)
        .current_dir(dir);
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn summary(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

/// Trains `all` in one run (checkpoints in `one`, summary `one.json`), then, on a fresh
/// broker, the first `cut` events and, after producing the rest, a second run resuming
/// from the first one's checkpoint (checkpoints in `two`; `first.json`, `second.json`).
/// `args(checkpoint_dir, summary)` gives the train arguments. Returns the directory and
/// the three summaries.
fn whole_and_resumed(
    topic: &str,
    partitions: i32,
    all: &[Event],
    cut: usize,
    args: impl Fn(&str, &str) -> Vec<String>,
) -> (
    tempfile::TempDir,
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
) {
    let run = |brokers: &str, dir: &Path, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(finish(
            &mut train(brokers, dir, &args),
            Duration::from_secs(120),
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let (whole, settings) = cluster_with(topic, partitions);
    produce(&settings, all.to_vec(), None, &|_| {}).unwrap();
    run(&settings.brokers, dir.path(), &args("one", "one.json"));
    drop(whole);

    let (parts, settings) = cluster_with(topic, partitions);
    produce(&settings, all[..cut].to_vec(), None, &|_| {}).unwrap();
    run(&settings.brokers, dir.path(), &args("two", "first.json"));
    produce(&settings, all[cut..].to_vec(), None, &|_| {}).unwrap();
    run(&settings.brokers, dir.path(), &args("two", "second.json"));
    drop(parts);
    let (one, first, second) = (
        summary(dir.path(), "one.json"),
        summary(dir.path(), "first.json"),
        summary(dir.path(), "second.json"),
    );
    (dir, one, first, second)
}

/// Runs to completion, failing (and killing it) after `limit`: a hung run must fail the
/// test, not hang it.
fn finish(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("no exit within {limit:?}; stderr: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    out
}

/// Produce N, train: all N trained and counted, and BPR beats most-popular on the
/// stream's prequential recall.
#[test]
fn train_follows_the_topic_and_beats_mostpop() {
    let (cluster, settings) = cluster("events");
    cluster.create_topic("deltas", 2);
    let n = 60_000;
    produce(&settings, events(n), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--variant",
                "bpr=uniform",
                "--variant",
                "pop=,model=mostpop",
                "--summary-json",
                "s.json",
                "--report",
                "rep",
                "--metrics-out",
                "m.csv",
            ],
        ),
        Duration::from_secs(120),
    ));
    // The per-window metrics, as backtest writes them: every event in some window.
    let csv = std::fs::read_to_string(dir.path().join("m.csv")).unwrap();
    let windowed: u64 = csv
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("bpr,"))
        .map(|l| l.split(',').nth(3).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(windowed, n, "{csv}");
    let page = std::fs::read_to_string(dir.path().join("rep/report.html")).unwrap();
    assert!(page.contains("<td>bpr</td>") && page.contains("<td>pop</td>"));
    // The same outputs as a backtest: every summary key a backtest writes (train adds
    // its Kafka and checkpoint objects), the same metrics columns, the same report files.
    let bt = tempfile::tempdir().unwrap();
    let backtest = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "backtest",
            "--events",
            "5000",
            "--quiet",
            "--variant",
            "bpr=uniform",
        ])
        .args([
            "--summary-json",
            "s.json",
            "--report",
            "rep",
            "--metrics-out",
            "m.csv",
        ])
        .current_dir(bt.path())
        .output()
        .unwrap();
    ok(backtest);
    let (trained, replayed) = (summary(dir.path(), "s.json"), summary(bt.path(), "s.json"));
    let keys = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    let missing: Vec<_> = keys(&replayed)
        .difference(&keys(&trained))
        .cloned()
        .collect();
    assert!(missing.is_empty(), "train's summary lacks {missing:?}");
    let header = |d: &std::path::Path| {
        let csv = std::fs::read_to_string(d.join("m.csv")).unwrap();
        csv.lines().next().unwrap().to_string()
    };
    assert_eq!(header(dir.path()), header(bt.path()));
    let files = |d: &std::path::Path| -> std::collections::BTreeSet<_> {
        std::fs::read_dir(d.join("rep"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    assert_eq!(files(dir.path()), files(bt.path()));
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["events"], n, "{s}");
    assert_eq!(s["kafka"]["messages"], n, "{s}");
    // The consumer's batches and the dataflow's are pooled, and every block came back.
    let pool = &s["pool"];
    let gets = pool["gets"].as_u64().unwrap();
    // The consumer's batches take the class of the dataflow's, and the reading workers
    // reserve their blocks in flight: gets find recycled blocks (docs/memory.md).
    eprintln!("kafka pool: {pool}");
    assert!(
        gets > 0 && pool["hit_rate"].as_f64().unwrap() >= 0.99,
        "{pool}"
    );
    assert_eq!(
        pool["puts"].as_u64().unwrap() + pool["drops"].as_u64().unwrap(),
        gets,
        "{pool}"
    );
    let variants = s["variants"].as_array().expect("variants");
    let recall = |name: &str| {
        variants
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["recall@10"].as_f64())
            .unwrap()
    };
    assert!(
        recall("bpr") > recall("pop") * 1.2,
        "{} vs {}",
        recall("bpr"),
        recall("pop")
    );
}

/// Malformed, truncated, wrong-typed and oversized records among good ones: every good
/// one trained, every bad one a dead letter with its reason, counters exact.
#[test]
fn bad_records_become_dead_letters_and_good_ones_train() {
    let (cluster, settings) = cluster("mixed");
    let good = events(5_000);
    let big = format!(
        r#"{{"user_id":1,"item_id":2,"ts":3,"pad":"{}"}}"#,
        "x".repeat(100_000)
    );
    let bad: Vec<(&[u8], &str)> = vec![
        (b"{\"user_id\": 1, \"item_id\"", "malformed JSON"),
        (b"\x00\x01\x02", "malformed JSON"),
        (
            br#"{"user_id":"alice","item_id":2,"ts":3}"#,
            "user_id must be an unsigned integer",
        ),
        (
            br#"{"user_id":1,"item_id":2,"ts":"noon"}"#,
            "ts must be an integer time",
        ),
        (br#"{"user_id":1,"ts":3}"#, "missing item_id"),
        (
            br#"{"user_id":1,"item_id":2,"ts":3,"event_type":"like"}"#,
            "unknown event_type",
        ),
        (big.as_bytes(), "oversized"),
    ];
    let mut p = Producer::new(&settings).unwrap();
    for (i, e) in good.iter().enumerate() {
        p.send_event(e).unwrap();
        if i % 700 == 0 {
            let (payload, _) = bad[(i / 700) % bad.len()];
            p.send(b"bad", payload).unwrap();
        }
    }
    let bad_sent = good.len().div_ceil(700) as u64;
    p.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--topic",
                "mixed",
                "--model",
                "mostpop",
                "--dead-letters",
                "dead.jsonl",
                "--summary-json",
                "s.json",
            ],
        ),
        Duration::from_secs(120),
    ));
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["events"], good.len() as u64, "{s}");
    assert_eq!(s["kafka"]["dead_letters"], bad_sent, "{s}");
    assert_eq!(s["dead_letters"], bad_sent, "{s}");
    let letters = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    let mut letters: Vec<serde_json::Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len() as u64, bad_sent);

    // The same run with the dead letters on a topic.
    cluster.create_topic("dlq", 1);
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--topic",
                "mixed",
                "--model",
                "mostpop",
                "--dead-letter-topic",
                "dlq",
            ],
        ),
        Duration::from_secs(120),
    ));
    let on_topic = tidepool_connector_kafka::read_topic(&KafkaSettings {
        topic: "dlq".into(),
        ..settings.clone()
    })
    .unwrap();
    assert_eq!(on_topic.len() as u64, bad_sent);
    letters.extend(
        on_topic
            .iter()
            .map(|(_, v)| serde_json::from_slice(v).unwrap()),
    );
    for l in &letters {
        let reason = l["reason"].as_str().unwrap();
        assert!(
            bad.iter().any(|(_, r)| reason.contains(r)),
            "unexpected reason {reason}"
        );
        assert!(l["location"].as_str().unwrap().starts_with("mixed/"), "{l}");
    }
}

struct DebugDir(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);
impl DebugDir {
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for DebugDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("cp")
                .arg("-r")
                .arg(&self.0)
                .arg("/tmp/killtest")
                .status();
        }
    }
}

/// A small xorshift, seeded from the clock (and printed), for kill times.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn wait_or_kill(child: &mut Child, after: Duration) -> bool {
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// The checkpoint lines of the trial logs next to `dir`, for a failure message.
fn checkpoint_log(dir: &Path) -> String {
    let mut lines = Vec::new();
    let Some(parent) = dir.parent() else {
        return String::new();
    };
    let mut logs: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    // trial-N.log, in trial order.
    logs.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.rsplit('-').next())
            .and_then(|n| n.parse::<u32>().ok())
    });
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let interesting = |l: &&str| {
            l.contains("checkpoint")
                && !l.contains("events=0 read=0")
                && !l.contains("events=0 bytes")
        };
        for line in text.lines().filter(interesting) {
            lines.push(format!("{}: {line}", log.display()));
        }
    }
    let start = lines.len().saturating_sub(60);
    lines[start..].join("\n")
}

/// A manifest accounts for every offset it records as consumed: each is a row or was
/// skipped by the type filter or lost upstream, and each row is an event in the model or
/// a dead letter.
fn assert_accounts(manifest: &serde_json::Value, context: &str) {
    let n = |key: &str| {
        manifest[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {manifest}"))
    };
    let read: u64 = manifest["positions"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        n("events") + n("dead_letters"),
        n("rows"),
        "{context}: {manifest}"
    );
    assert_eq!(
        n("rows") + n("skipped") + n("offsets_lost"),
        read,
        "{context}: {manifest}"
    );
}

fn assert_checkpoints_complete(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            continue; // a crash mid-write leaves these; the next start removes them
        }
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path.join("manifest.json")).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        for w in 0..manifest["workers"].as_u64().unwrap() {
            assert!(path.join(format!("worker-{w}.bin")).exists(), "{name}");
        }
        // The cut is consistent: every offset read is accounted for (here, with neither
        // dead letters nor skipped or lost offsets, as an event in the model), no more.
        assert_accounts(&manifest, &format!("{name}\n{}", checkpoint_log(dir)));
        assert_eq!(manifest["dead_letters"], 0, "{name}: {manifest}");
        assert!(path.join("shared.bin").exists(), "{name}");
    }
}

/// `kill -9` at random moments while the topic keeps growing, restart, repeat: at the
/// end every produced event was trained exactly once (the final checkpoint counts them
/// and has consumed every offset once), and every checkpoint directory is complete or
/// absent.
#[test]
fn kill_9_and_restart_trains_every_event_exactly_once() {
    let (_cluster, settings) = cluster_with("crash", 12);
    // librdkafka's mock cluster keeps at most 5 MiB per partition and drops the oldest
    // message sets beyond it (small producer batches on a loaded machine carry more
    // overhead per message). With 4 partitions the busiest one (30 % of the keys, about
    // 56 k messages at the end) came close to that bound; with 12 each stays far below
    // it (25 chunks of 7,500), and the summary shows nothing was lost to retention.
    // Trials go on until 12 runs were killed (runs that finish first do not count), each
    // after a new chunk was produced.
    let max_trials = 24;
    let chunk = 7_500;
    let all = events(chunk * (max_trials as u64 + 1));
    let n = all.len() as u64;
    let dir = tempfile::tempdir().unwrap();
    let dir = DebugDir(dir.path().to_path_buf(), dir);
    eprintln!("working in {}", dir.path().display());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed {seed}");
    let mut rng = Rng(seed);
    let args = [
        "--topic",
        "crash",
        "--checkpoint-dir",
        "ckpt",
        "--checkpoint-interval",
        "100ms",
        "--eval-every",
        "1",
        "-w",
        "2",
        "--summary-json",
        "s.json",
    ];
    let mut kills = 0;
    let mut chunks = all.chunks(chunk as usize);
    for trial in 0..max_trials {
        if kills >= 12 {
            break;
        }
        produce(&settings, chunks.next().unwrap().to_vec(), None, &|_| {}).unwrap();
        let log = std::fs::File::create(dir.path().join(format!("trial-{trial}.log"))).unwrap();
        let mut child = train(&settings.brokers, dir.path(), &args)
            .env(
                "RUST_LOG",
                "tidepool_operators=debug,tidepool_connector_kafka=warn",
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let after = Duration::from_millis(100 + rng.next() % 700);
        if wait_or_kill(&mut child, after) {
            kills += 1;
        } else {
            eprintln!("trial {trial}: the run finished before the kill");
        }
        assert_checkpoints_complete(&dir.path().join("ckpt"));
    }
    assert!(kills >= 10, "only {kills} of {max_trials} runs were killed");
    for rest in chunks {
        produce(&settings, rest.to_vec(), None, &|_| {}).unwrap();
    }
    let out = ok(finish(
        &mut train(&settings.brokers, dir.path(), &args),
        Duration::from_secs(300),
    ));
    let stdout = text(&out.stdout);
    assert_checkpoints_complete(&dir.path().join("ckpt"));
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["kafka"]["offsets_lost_to_retention"], 0, "{s}");
    assert_eq!(s["events"], n, "{stdout}");
    let last = s["checkpoints"]["last_id"].as_u64().unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("ckpt/ckpt-{last}/manifest.json")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["events"], n, "{manifest}");
    let read: i64 = manifest["positions"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(read, n as i64, "every offset consumed once: {manifest}");
}

/// The broker goes down in the middle of training and comes back: training pauses,
/// resumes, and nothing is lost.
#[test]
fn broker_outage_pauses_and_resumes() {
    let (mut cluster, settings) = cluster("outage");
    let n = 100_000;
    produce(&settings, events(n), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let brokers = settings.brokers.clone();
    let path = dir.path().to_path_buf();
    let run = std::thread::spawn(move || {
        finish(
            &mut train(
                &brokers,
                &path,
                &[
                    "--topic",
                    "outage",
                    "--model",
                    "mostpop",
                    "--summary-json",
                    "s.json",
                ],
            ),
            Duration::from_secs(120),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    cluster.outage(Duration::from_secs(2));
    let out = ok(run.join().unwrap());
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["events"], n, "{}\n{s}", text(&out.stdout));
}

/// Two `train` processes as one timely cluster: the topic's partitions are spread over
/// both, each process reads only its own, and both report every event trained.
#[test]
fn a_two_process_cluster_shares_the_partitions() {
    let (cluster, settings) = cluster("shared");
    let n = 20_000;
    produce(&settings, events(n), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::loopback_hostfile(dir.path(), 2);
    let children: Vec<_> = (0..2)
        .map(|p| {
            let summary = format!("p{p}.json");
            let process = p.to_string();
            std::thread::spawn({
                let brokers = settings.brokers.clone();
                let dir = dir.path().to_path_buf();
                move || {
                    finish(
                        &mut train(
                            &brokers,
                            &dir,
                            &[
                                "--topic",
                                "shared",
                                "--model",
                                "mostpop",
                                "--processes",
                                "2",
                                "--process",
                                &process,
                                "--hostfile",
                                "hosts",
                                "--summary-json",
                                &summary,
                            ],
                        ),
                        Duration::from_secs(120),
                    )
                }
            })
        })
        .collect();
    for child in children {
        ok(child.join().unwrap());
    }
    let (s0, s1) = (
        summary(dir.path(), "p0.json"),
        summary(dir.path(), "p1.json"),
    );
    for s in [&s0, &s1] {
        assert_eq!(s["events"], n, "{s}");
        assert_eq!(s["processes"], 2, "{s}");
    }
    let (m0, m1) = (
        s0["kafka"]["messages"].as_u64().unwrap(),
        s1["kafka"]["messages"].as_u64().unwrap(),
    );
    assert_eq!(m0 + m1, n, "each message read by exactly one process");
    assert!(
        m0 > 0 && m1 > 0,
        "both processes read partitions: {m0} {m1}"
    );
    assert_eq!(s0["recall@10"], s1["recall@10"]);
    drop(cluster);
}

/// A popularity sampler's window survives a restart: the checkpoint carries the events
/// still inside the window and the restored run replays them into the differential
/// count, so after resuming, the window holds exactly what one uninterrupted run holds.
#[test]
fn the_popularity_window_survives_a_restart() {
    let all = events(40_000);
    let n = all.len() as u64;
    // A three-minute window over a stream of about half an hour, cut at 95 %: the end
    // of the run still counts events of the first part (read before the restart), while
    // most of the first part's events have been retracted.
    let args = |ckpt: &str, summary: &str| -> Vec<String> {
        [
            "--topic",
            "pop",
            "--sampler",
            "pop",
            "--pop-window",
            "3min",
            "--tick",
            "10s",
            "--checkpoint-dir",
            ckpt,
            "--summary-json",
            summary,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let cut = all.len() * 19 / 20;
    let (_dir, one, first, second) = whole_and_resumed("pop", 4, &all, cut, args);
    assert_eq!(one["events"], n);
    assert_eq!(first["events"], cut as u64);
    assert_eq!(
        second["events"], n,
        "the restored run carries the first part"
    );
    let window = one["popularity_window_events"].as_u64().unwrap();
    assert!(
        window > 0 && window < n / 2,
        "the window retracted most events: {window}"
    );
    assert_eq!(
        second["popularity_window_events"], one["popularity_window_events"],
        "the window after a restart equals the uninterrupted one"
    );
}

/// Checkpoints of a two-process cluster: both processes are killed (`kill -9`) at random
/// moments, or only one of them (the other must then fail rather than hang), and
/// restarted while the topic grows. Every checkpoint directory, written by both
/// processes into their shared directory, is complete and consistent (events in the
/// model equal offsets read, over the whole cluster); at the end every event was trained
/// exactly once. A single process then resumes from the cluster's checkpoint.
#[test]
fn a_two_process_cluster_checkpoints_and_survives_kill_9() {
    let (_cluster, settings) = cluster_with("cc", 8);
    let (trials, chunk) = (8, 10_000u64);
    let all = events(chunk * (trials as u64 + 2));
    let n = chunk * (trials as u64 + 1);
    let dir = tempfile::tempdir().unwrap();
    let dir = DebugDir(dir.path().to_path_buf(), dir);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed {seed}");
    let mut rng = Rng(seed);
    let args = |p: usize| -> Vec<String> {
        [
            "--topic",
            "cc",
            "--checkpoint-dir",
            "ckpt",
            "--checkpoint-interval",
            "100ms",
            "--eval-every",
            "1",
            "-w",
            "2",
            "--processes",
            "2",
            "--process",
            &p.to_string(),
            "--hostfile",
            "hosts",
            "--connect-timeout",
            "30s",
            "--summary-json",
            &format!("p{p}.json"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let spawn = |p: usize, log: Stdio| {
        let args = args(p);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        train(&settings.brokers, dir.path(), &args)
            .env("RUST_LOG", "tidepool_operators=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut chunks = all.chunks(chunk as usize);
    let mut killed = 0;
    for trial in 0..trials {
        produce(&settings, chunks.next().unwrap().to_vec(), None, &|_| {}).unwrap();
        common::loopback_hostfile(dir.path(), 2);
        let mut children: Vec<Child> = (0..2)
            .map(|p| {
                let log = std::fs::File::create(dir.path().join(format!("trial-p{p}-{trial}.log")))
                    .unwrap();
                spawn(p, log.into())
            })
            .collect();
        // Kill times count from the moment both processes are connected (timely retries a
        // connection once a second, so that moment varies by more than a run's length).
        let connected = Instant::now() + Duration::from_secs(30);
        for p in 0..2 {
            let log = dir.path().join(format!("trial-p{p}-{trial}.log"));
            while !std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("connected to every process")
            {
                assert!(
                    Instant::now() < connected,
                    "trial {trial}: process {p} never connected"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let after = Duration::from_millis(100 + rng.next() % 1_500);
        if trial % 2 == 0 {
            // The whole cluster crashes.
            let first = wait_or_kill(&mut children[0], after);
            let second = wait_or_kill(&mut children[1], Duration::ZERO);
            killed += usize::from(first || second);
        } else {
            // One process crashes: its peer must notice and fail, not wait forever.
            if wait_or_kill(&mut children[1], after) {
                killed += 1;
                let deadline = Instant::now() + Duration::from_secs(60);
                let status = loop {
                    if let Some(status) = children[0].try_wait().unwrap() {
                        break status;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "trial {trial}: process 0 still runs 60 s after its peer was killed"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                };
                let log = std::fs::read_to_string(dir.path().join(format!("trial-p0-{trial}.log")))
                    .unwrap_or_default();
                if status.success() {
                    // The peer died after the cluster had finished (both had gathered
                    // the outcome): then everything produced so far was trained.
                    let s = summary(dir.path(), "p0.json");
                    assert_eq!(
                        s["events"],
                        chunk * (trial as u64 + 1),
                        "trial {trial}: {log}"
                    );
                } else {
                    assert_eq!(
                        status.code(),
                        Some(4),
                        "trial {trial}: process 0 without its peer: {log}"
                    );
                    assert!(
                        log.contains("lost its connection to another process"),
                        "{log}"
                    );
                }
            } else {
                children[0].wait().unwrap();
            }
        }
        let log = std::fs::read_to_string(dir.path().join(format!("trial-p0-{trial}.log")))
            .unwrap_or_default();
        eprintln!(
            "trial {trial}: {} checkpoints committed, {} killed so far",
            log.matches("checkpoint committed").count(),
            killed
        );
        if trial == 2 {
            eprintln!("{log}");
            eprintln!(
                "{}",
                std::fs::read_to_string(dir.path().join("trial-p1-2.log")).unwrap_or_default()
            );
        }
        assert_checkpoints_complete(&dir.path().join("ckpt"));
    }
    assert!(killed >= 4, "only {killed} of {trials} trials were killed");
    produce(&settings, chunks.next().unwrap().to_vec(), None, &|_| {}).unwrap();
    common::loopback_hostfile(dir.path(), 2);
    let runs: Vec<_> = (0..2)
        .map(|p| {
            let args = args(p);
            let brokers = settings.brokers.clone();
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                finish(&mut train(&brokers, &path, &args), Duration::from_secs(300))
            })
        })
        .collect();
    for run in runs {
        ok(run.join().unwrap());
    }
    assert_checkpoints_complete(&dir.path().join("ckpt"));
    for p in 0..2 {
        let s = summary(dir.path(), &format!("p{p}.json"));
        assert_eq!(s["events"], n, "process {p}: {s}");
    }
    let last = summary(dir.path(), "p0.json")["checkpoints"]["last_id"]
        .as_u64()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("ckpt/ckpt-{last}/manifest.json")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["workers"], 4, "{manifest}");
    assert_eq!(manifest["events"], n, "{manifest}");

    // One process with one worker picks up where the cluster stopped.
    produce(&settings, chunks.next().unwrap().to_vec(), None, &|_| {}).unwrap();
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--topic",
                "cc",
                "--checkpoint-dir",
                "ckpt",
                "--eval-every",
                "1",
                "-w",
                "1",
                "--summary-json",
                "single.json",
            ],
        ),
        Duration::from_secs(120),
    ));
    let s = summary(dir.path(), "single.json");
    assert_eq!(s["events"], n + chunk, "{s}");
    assert_checkpoints_complete(&dir.path().join("ckpt"));
}

/// SIGUSR2 (a checkpoint) and SIGUSR1 (a GC cycle) sent to process 1 of a cluster reach
/// global worker 0, the only place either can start: with an hour's checkpoint interval
/// a checkpoint appears only through the forwarded request, and process 0's controller
/// counts a manual cycle. SIGTERM to both then drains and writes the final checkpoint.
#[test]
fn requests_to_any_process_of_a_cluster_take_effect() {
    let (_cluster, settings) = cluster("ask");
    produce(&settings, events(20_000), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::loopback_hostfile(dir.path(), 2);
    let mut children: Vec<Child> = (0..2)
        .map(|p| {
            let log = std::fs::File::create(dir.path().join(format!("p{p}.log"))).unwrap();
            train(
                &settings.brokers,
                dir.path(),
                &[
                    "--topic",
                    "ask",
                    "--model",
                    "mostpop",
                    "--stop-at",
                    "never",
                    "--checkpoint-dir",
                    "ckpt",
                    "--checkpoint-interval",
                    "1h",
                    "--gc-force-interval",
                    "1h",
                    "--gctrace",
                    "--processes",
                    "2",
                    "--process",
                    &p.to_string(),
                    "--hostfile",
                    "hosts",
                    "--summary-json",
                    &format!("p{p}.json"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
        })
        .collect();
    let ckpt = dir.path().join("ckpt");
    let committed = || {
        tidepool_operators::checkpoint::list(&ckpt)
            .map(|l| l.len())
            .unwrap_or(0)
    };
    // The handlers are installed before the cluster connects; give it time to read.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(committed(), 0, "nothing asked for a checkpoint yet");
    let signal = |child: &Child, sig: &str| {
        let status = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal(&children[1], "-USR2");
    signal(&children[1], "-USR1");
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed() == 0 {
        assert!(
            Instant::now() < deadline,
            "no checkpoint 60 s after SIGUSR2 to process 1: {}",
            std::fs::read_to_string(dir.path().join("p1.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Process 0 traces the cycle it ran (as does process 1, whose workers take part).
    let manual = || {
        std::fs::read_to_string(dir.path().join("p0.log"))
            .unwrap_or_default()
            .contains(" manual: ")
    };
    while !manual() {
        assert!(
            Instant::now() < deadline,
            "no GC cycle 60 s after SIGUSR1 to process 1: {}",
            std::fs::read_to_string(dir.path().join("p0.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in &children {
        common::sigterm(child);
    }
    for (p, child) in children.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "process {p} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "process {p}: {}",
            std::fs::read_to_string(dir.path().join(format!("p{p}.log"))).unwrap_or_default()
        );
    }
    let s0 = summary(dir.path(), "p0.json");
    assert_eq!(s0["events"], 20_000, "{s0}");
    assert!(
        s0["gc"]["cycles"]["manual"].as_u64().unwrap_or(0) >= 1,
        "process 0 ran the cycle process 1 was asked for: {}",
        s0["gc"]
    );
    assert!(
        s0["checkpoints"]["written"].as_u64().unwrap_or(0) >= 2,
        "the requested and the final checkpoint: {}",
        s0["checkpoints"]
    );
}

/// Every offset ends up accounted for in the manifest: a topic whose head was deleted by
/// retention (the mock cluster keeps 5 MiB per partition), with events of a type the job
/// filters out and malformed records among the good ones. Trained events plus dead
/// letters are the rows, and rows plus skipped plus lost offsets are every offset
/// consumed; the lost ones match what the consumer reported.
#[test]
fn the_manifest_accounts_for_every_offset() {
    // The head of the partition is deleted as retention deletes it (DeleteRecords).
    let (cluster, settings) = cluster_with("acct", 1);
    let pad = "x".repeat(600);
    let mut p = Producer::new(&settings).unwrap();
    let total = 12_000u64;
    for i in 0..total {
        let payload = if i % 97 == 0 {
            "{\"user_id\": 1, \"item_id\"".to_string()
        } else {
            let kind = if i % 5 == 0 { "view" } else { "click" };
            format!(
                r#"{{"user_id":{},"item_id":{},"ts":{},"event_type":"{kind}","pad":"{pad}"}}"#,
                i % 300,
                i % 50,
                1_700_000_000_000u64 + i * 1_000
            )
        };
        p.send(b"k", payload.as_bytes()).unwrap();
    }
    p.flush(Duration::from_secs(60)).unwrap();
    drop(p);
    cluster
        .kafka()
        .expect("a real broker")
        .delete_records_before("acct", 0, 3_000);
    let dir = tempfile::tempdir().unwrap();
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--topic",
                "acct",
                "--model",
                "mostpop",
                "--type",
                "click",
                "--checkpoint-dir",
                "ckpt",
                "--summary-json",
                "s.json",
            ],
        ),
        Duration::from_secs(120),
    ));
    let s = summary(dir.path(), "s.json");
    let last = s["checkpoints"]["last_id"].as_u64().unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("ckpt/ckpt-{last}/manifest.json")))
            .unwrap(),
    )
    .unwrap();
    assert_accounts(&manifest, "final checkpoint");
    assert_eq!(manifest["positions"]["0"], total, "{manifest}");
    let lost = manifest["offsets_lost"].as_u64().unwrap();
    assert_eq!(
        lost, 3_000,
        "the head of the partition was deleted: {manifest}"
    );
    assert_eq!(s["kafka"]["offsets_lost_to_retention"], lost, "{s}");
    assert!(manifest["skipped"].as_u64().unwrap() > 0, "{manifest}");
    assert!(manifest["dead_letters"].as_u64().unwrap() > 0, "{manifest}");
    drop(cluster);
}

/// The last value per key of everything published (every 10 ms, and at the one final
/// checkpoint), on the topic and in the Parquet files alike, is the trained model: exactly the users and items the run holds at the
/// end. Users evicted past their TTL and items expired past theirs are tombstoned (a key
/// without a value on the topic, `deleted` in the files), so the published model shrinks
/// with the trained one.
#[test]
fn published_deltas_follow_the_model_with_tombstones() {
    use std::collections::BTreeMap;
    // One input partition: its events reach the learner as they are read, so the GC
    // cycles (every 50 ms) run while it trains. With several partitions read one after
    // another, the merge by event time holds them back until every partition has
    // delivered, and the whole backlog would train after the last cycle.
    let (cluster, settings) = cluster_with("ttl", 1);
    // About 1 kB per delta and many publications: 8 partitions keep each far below the
    // mock cluster's 5 MiB per partition, beyond which it drops the oldest messages.
    cluster.create_topic("deltas", 8);
    let n = 30_000;
    produce(&settings, events(n), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--topic",
                "ttl",
                "-w",
                "2",
                "--user-ttl",
                "2min",
                "--item-ttl",
                "5min",
                "--gc-force-interval",
                "50ms",
                "--checkpoint-dir",
                "ckpt",
                "--checkpoint-interval",
                "1h",
                "--publish-topic",
                "deltas",
                "--publish-dir",
                "published",
                "--publish-interval",
                "10ms",
                "--summary-json",
                "s.json",
            ],
        ),
        Duration::from_secs(120),
    ));
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["events"], n, "{s}");
    assert!(
        s["gc"]["users_evicted"].as_u64().unwrap() > 0,
        "{}",
        s["gc"]
    );
    assert!(
        s["gc"]["items_expired"].as_u64().unwrap() > 0,
        "{}",
        s["gc"]
    );

    // Only the final checkpoint was written: everything before it was published by
    // the interval, every worker at least once before the end.
    assert_eq!(s["checkpoints"]["written"], 1, "{}", s["checkpoints"]);
    let files = std::fs::read_dir(dir.path().join("published"))
        .unwrap()
        .count();
    // (The final checkpoint writes one file per worker.)
    assert!(files > 2, "publications between checkpoints: {files} files");

    // From the files: last value per key.
    let rows = tidepool_connector_parquet::read_deltas(&dir.path().join("published")).unwrap();
    let tombstones = rows.iter().filter(|d| d.deleted).count();
    assert!(tombstones > 0, "evictions were published");
    let mut files: BTreeMap<String, bool> = BTreeMap::new();
    for d in &rows {
        // An itemknn list may be empty once its entries faded or expired.
        if d.variant != "itemknn" {
            assert_eq!(d.deleted, d.vector.is_empty(), "{d:?}");
        }
        assert_eq!(
            d.neighbours.len(),
            if d.variant == "itemknn" {
                d.vector.len()
            } else {
                0
            }
        );
        files.insert(d.key(), d.deleted);
    }
    let live = |m: &BTreeMap<String, bool>, variant: &str, entity: &str| {
        m.iter()
            .filter(|(k, deleted)| {
                let mut key = k.split('/');
                !**deleted && key.next() == Some(variant) && key.next() == Some(entity)
            })
            .count() as u64
    };
    // The default configuration runs: bpr publishes embeddings, itemknn its neighbour
    // lists (of the items that have any), the others nothing.
    assert_eq!(s["model"], "ensemble");
    assert_eq!(
        live(&files, "bpr", "user"),
        s["users"].as_u64().unwrap(),
        "{s}"
    );
    assert_eq!(
        live(&files, "bpr", "item"),
        s["items"].as_u64().unwrap(),
        "{s}"
    );
    let lists = live(&files, "itemknn", "item");
    assert!(
        lists > 0 && lists <= s["items"].as_u64().unwrap(),
        "{lists}"
    );
    assert!(files
        .keys()
        .all(|k| k.starts_with("bpr/") || k.starts_with("itemknn/")));
    // A published neighbour is an item the model holds, or one tombstoned later.
    let items: std::collections::BTreeSet<u64> = rows
        .iter()
        .filter(|d| d.variant == "bpr" && d.key().contains("/item/"))
        .map(|d| d.id)
        .collect();
    for d in rows.iter().filter(|d| d.variant == "itemknn" && !d.deleted) {
        assert!(d.neighbours.iter().all(|j| items.contains(j)), "{d:?}");
        assert!(d.vector.iter().all(|w| *w > 0.0), "{d:?}");
    }

    // The topic says the same; a tombstone is a key without a value.
    let on_topic = tidepool_connector_kafka::read_topic(&KafkaSettings {
        topic: "deltas".into(),
        ..settings.clone()
    })
    .unwrap();
    let mut topic: BTreeMap<String, bool> = BTreeMap::new();
    for (key, value) in &on_topic {
        topic.insert(text(key), value.is_empty());
    }
    assert_eq!(on_topic.len(), rows.len(), "the same publications");
    assert_eq!(topic, files);

    // `recommend` serves from the final checkpoint with the model that was published:
    // each score is the user row times the item row plus its bias, from the files.
    let mut latest: BTreeMap<String, &tidepool_pipeline::delta::ModelDelta> = BTreeMap::new();
    for d in &rows {
        latest.insert(d.key(), d);
    }
    let users: Vec<u64> = latest
        .values()
        .filter(|d| !d.deleted && d.key().contains("/user/"))
        .map(|d| d.id)
        .take(3)
        .collect();
    assert_eq!(users.len(), 3);
    for user in users {
        let out = ok(Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["recommend", "--checkpoint", "ckpt", "-k", "10", "--json"])
            .args(["--variant", "bpr"])
            .args(["--user", &user.to_string()])
            .current_dir(dir.path())
            .output()
            .unwrap());
        let recs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(recs.len(), 10, "{}", text(&out.stdout));
        let row = &latest[&format!("bpr/user/{user}")].vector;
        let mut last = f64::INFINITY;
        for r in &recs {
            let (item, score) = (r["item"].as_u64().unwrap(), r["score"].as_f64().unwrap());
            let published = latest[&format!("bpr/item/{item}")];
            assert!(
                !published.deleted,
                "an expired item was recommended: {item}"
            );
            let expected: f64 = row
                .iter()
                .zip(&published.vector)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                + f64::from(published.bias.unwrap_or(0.0));
            assert!((score - expected).abs() < 1e-4, "{score} vs {expected}");
            assert!(score <= last, "ranked best first");
            last = score;
        }
    }
}

/// `itemknn` and an ensemble over it are restored whole from a checkpoint: a run stopped
/// at 60 % of a one-partition topic and resumed ends with exactly the metrics of an
/// uninterrupted run (counting models and a 1-worker ensemble are deterministic), and
/// `recommend` serves the restored model.
#[test]
fn itemknn_resumes_from_a_checkpoint_exactly() {
    let all = events(30_000);
    let args = |ckpt: &str, summary: &str| -> Vec<String> {
        [
            "--topic",
            "knn",
            "--variant",
            "knn=,model=itemknn,history=20,neighbours=40,half_life=1h",
            "--variant",
            "pop=,model=mostpop",
            "--variant",
            "mix=,model=ensemble,components=knn+pop",
            "--checkpoint-dir",
            ckpt,
            "--summary-json",
            summary,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // One partition: the replay order is the offset order, the same in both runs.
    let cut = all.len() * 3 / 5;
    let (dir, one, first, second) = whole_and_resumed("knn", 1, &all, cut, args);
    assert_eq!(first["events"], cut as u64);
    assert_eq!(
        second["checkpoints"]["restored_from"],
        first["checkpoints"]["last_id"]
    );
    for v in 0..3 {
        let (a, b) = (&one["variants"][v], &second["variants"][v]);
        for key in ["events", "events_scored", "hits", "ndcg@10", "mrr"] {
            assert_eq!(a[key], b[key], "{} {key}", a["name"]);
        }
    }
    assert!(one["variants"][0]["hits"].as_u64().unwrap() > 0);
    assert_eq!(one["weights"], second["weights"], "the ensemble's weights");

    // recommend from the restored model: the best items for a user, none of them seen.
    let user = all[all.len() - 1].user;
    let seen: std::collections::BTreeSet<u64> = all
        .iter()
        .filter(|e| e.user == user)
        .map(|e| e.item)
        .collect();
    for variant in ["knn", "mix"] {
        let out = ok(Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["recommend", "--checkpoint", "two", "-k", "5", "--json"])
            .args(["--variant", variant, "--user", &user.to_string()])
            .current_dir(dir.path())
            .output()
            .unwrap());
        let recs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(recs.len(), 5, "{}", text(&out.stdout));
        let scores: Vec<f64> = recs.iter().map(|r| r["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        for r in &recs {
            assert!(!seen.contains(&r["item"].as_u64().unwrap()), "{r}");
        }
        if variant == "knn" {
            assert!(
                scores[0] > 0.0,
                "a user with history has neighbours: {scores:?}"
            );
        }
    }
}

/// The replay order is (event time, partition, offset), carried from the consumer
/// through the Arrow batch to the learner: the same topic replayed by one worker, by two,
/// and by a two-process cluster, twice each, gives identical counting-model metrics.
#[test]
fn replays_of_a_topic_agree_on_any_cluster_shape() {
    let (_cluster, settings) = cluster_with("order", 4);
    // Coarse timestamps: many events share one, so their order comes from the position.
    let mut all = events(40_000);
    for e in &mut all {
        e.ts -= e.ts % 60_000;
    }
    produce(&settings, all, None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    let spec = [
        "--topic",
        "order",
        "--variant",
        "pop=,model=mostpop",
        "--variant",
        "knn=,model=itemknn",
    ];
    for (name, workers) in [("w1a", "1"), ("w1b", "1"), ("w2a", "2"), ("w2b", "2")] {
        let mut args = spec.to_vec();
        let summary_file = format!("{name}.json");
        args.extend([
            "-w",
            workers,
            "--group",
            name,
            "--summary-json",
            &summary_file,
        ]);
        ok(finish(
            &mut train(&settings.brokers, dir.path(), &args),
            Duration::from_secs(120),
        ));
        runs.push((name.to_string(), summary(dir.path(), &summary_file)));
    }
    for round in ["a", "b"] {
        let hosts = common::loopback_hostfile(dir.path(), 2);
        let procs: Vec<Child> = (0..2)
            .map(|p| {
                let summary_file = format!("p{p}{round}.json");
                let group = format!("cluster{round}");
                let mut args = spec.to_vec();
                let p = p.to_string();
                args.extend(["--processes", "2", "--process", &p, "--group", &group]);
                args.extend(["--summary-json", &summary_file]);
                args.extend(["--hostfile", hosts.to_str().unwrap()]);
                train(&settings.brokers, dir.path(), &args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in procs {
            ok(child.wait_with_output().unwrap());
        }
        runs.push((
            format!("p0{round}"),
            summary(dir.path(), &format!("p0{round}.json")),
        ));
    }
    let (first, base) = &runs[0];
    assert_eq!(base["events"], 40_000);
    // Partitions read one after another are merged in event time: nothing is late.
    for (name, s) in &runs {
        assert_eq!(s["reordered"], 0, "{name}");
    }
    for (name, s) in &runs[1..] {
        for v in 0..2 {
            for key in ["events", "events_scored", "hits", "ndcg@10", "mrr"] {
                assert_eq!(
                    s["variants"][v][key], base["variants"][v][key],
                    "{name} vs {first}: {} {key}",
                    base["variants"][v]["name"]
                );
            }
        }
    }
}

/// Dead letters are durable before the checkpoint that covers their offsets commits, and
/// the file sink appends: after `kill -9` the letters of every malformed offset up to the
/// newest checkpoint are in the file, and after the restart finishes every malformed
/// offset of the topic is there (at least once: offsets after the checkpoint are read
/// again).
#[test]
fn dead_letters_are_durable_before_their_checkpoint() {
    let (_cluster, settings) = cluster_with("dlq", 1);
    let good = events(60_000);
    let mut p = Producer::new(&settings).unwrap();
    let mut malformed = Vec::new();
    let mut offset = 0i64;
    for (i, e) in good.iter().enumerate() {
        p.send_event(e).unwrap();
        offset += 1;
        if i % 250 == 0 {
            p.send(b"bad", b"{\"user_id\": 1, \"item_id\"").unwrap();
            malformed.push(offset);
            offset += 1;
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--topic",
        "dlq",
        "--model",
        "mostpop",
        "--tick",
        "5s",
        "--checkpoint-dir",
        "ckpt",
        "--checkpoint-interval",
        "20ms",
        "--dead-letters",
        "dead.jsonl",
    ];
    let letters = |dir: &Path| -> std::collections::BTreeMap<i64, usize> {
        let mut seen = std::collections::BTreeMap::new();
        let text = std::fs::read_to_string(dir.join("dead.jsonl")).unwrap_or_default();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let location = v["location"].as_str().unwrap();
            let offset: i64 = location.rsplit('@').next().unwrap().parse().unwrap();
            *seen.entry(offset).or_insert(0) += 1;
        }
        seen
    };
    let newest_checkpoint = |dir: &Path| -> Option<i64> {
        std::fs::read_dir(dir.join("ckpt"))
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
            .filter_map(|e| std::fs::read_to_string(e.path().join("manifest.json")).ok())
            .filter_map(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
            .filter_map(|m| m["positions"]["0"].as_i64())
            .max()
    };
    // Kill once a checkpoint well into the topic exists.
    let mut child = train(&settings.brokers, dir.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while newest_checkpoint(dir.path()).unwrap_or(0) < 5_000 {
        assert!(Instant::now() < deadline, "no checkpoint past offset 5000");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let covered = newest_checkpoint(dir.path()).expect("a checkpoint");
    let seen = letters(dir.path());
    let due: Vec<i64> = malformed.iter().copied().filter(|&o| o < covered).collect();
    assert!(!due.is_empty());
    for o in &due {
        assert!(
            seen.contains_key(o),
            "offset {o} is behind checkpoint {covered} but its letter is gone"
        );
    }
    // The restart appends: the earlier letters stay, and the topic's every one is there.
    ok(finish(
        &mut train(&settings.brokers, dir.path(), &args),
        Duration::from_secs(120),
    ));
    let seen = letters(dir.path());
    for o in &malformed {
        assert!(seen.contains_key(o), "offset {o} has no dead letter");
    }
    for o in &due {
        assert_eq!(
            seen[o], 1,
            "offset {o}, behind the checkpoint, is not read again"
        );
    }
}

/// A topic recreated under a job's checkpoints hands back offsets below the ones the
/// checkpoint resumes from: the job stops with an error naming the partition and both
/// offsets instead of retraining silently, and `--on-rewind continue` trains on, counted.
#[test]
fn offsets_going_backwards_stop_the_job() {
    let (cluster, settings) = cluster_with("rw", 1);
    let all = events(6_000);
    produce(&settings, all[..3_000].to_vec(), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--topic",
        "rw",
        "--model",
        "mostpop",
        "--checkpoint-dir",
        "ckpt",
        "--summary-json",
        "s.json",
    ];
    ok(finish(
        &mut train(&settings.brokers, dir.path(), &args),
        Duration::from_secs(60),
    ));
    cluster
        .kafka()
        .expect("a real broker")
        .recreate_topic("rw", 1);
    produce(&settings, all[3_000..4_000].to_vec(), None, &|_| {}).unwrap();
    // `--stop-at never` with an idle limit: the run must not wait for offsets that the
    // recreated topic will never reach.
    let follow = |extra: &[&str]| {
        let mut a = args.to_vec();
        a.extend(extra);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
        cmd.args([
            "train",
            "--quiet",
            "--brokers",
            &settings.brokers,
            "--stop-at",
            "idle:3s",
        ])
        .args(&a)
        .current_dir(dir.path());
        finish(&mut cmd, Duration::from_secs(60))
    };
    let out = follow(&[]);
    assert!(!out.status.success(), "a rewind must fail the job");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("offsets of rw/0 went backwards: expected 3000 or later, got 0"),
        "{stderr}"
    );
    let out = ok(follow(&["--on-rewind", "continue"]));
    let s = summary(dir.path(), "s.json");
    assert!(
        s["kafka"]["offsets_rewound"].as_u64().unwrap() >= 1,
        "{s}\n{}",
        text(&out.stderr)
    );
    assert_eq!(
        s["events"], 4_000,
        "the checkpoint's 3000 and the new topic's 1000"
    );
}

/// A checkpoint records its source (topic, group, partitions, field mapping); resuming it
/// with another topic or mapping is refused with a message that names the difference,
/// unless forced.
#[test]
fn a_checkpoint_refuses_another_topic_or_mapping() {
    let (cluster, settings) = cluster_with("first", 1);
    cluster.create_topic("second", 1);
    produce(&settings, events(2_000), None, &|_| {}).unwrap();
    let second = KafkaSettings {
        topic: "second".into(),
        ..settings.clone()
    };
    produce(&second, events(1_000), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["--model", "mostpop", "--checkpoint-dir", "ckpt"];
        args.extend(extra);
        finish(
            &mut train(&settings.brokers, dir.path(), &args),
            Duration::from_secs(60),
        )
    };
    ok(run(&["--topic", "first"]));
    let manifest = std::fs::read_dir(dir.path().join("ckpt"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("ckpt-"))
        .map(|e| std::fs::read_to_string(e.path().join("manifest.json")).unwrap())
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["source"]["topic"], "first");
    assert_eq!(manifest["source"]["partitions"], "0");
    assert!(manifest["source"]["mapping"]
        .as_str()
        .unwrap()
        .starts_with("user=user_id item=item_id"));

    let out = run(&["--topic", "second"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("topic \"first\", now \"second\""),
        "{stderr}"
    );
    let out = run(&["--topic", "first", "--user-field", "uid"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("mapping \"user=user_id"), "{stderr}");
    assert!(stderr.contains("now \"user=uid"), "{stderr}");
    ok(run(&["--topic", "second", "--force-checkpoint"]));
}

/// Every state file's checksum is in the manifest: a checkpoint with a corrupted byte is
/// detected on load, and the previous complete one is used instead, with a warning; the
/// run still trains every event exactly once.
#[test]
fn a_damaged_checkpoint_falls_back_to_the_previous_one() {
    let (_cluster, settings) = cluster_with("crc", 1);
    let all = events(20_000);
    produce(&settings, all[..10_000].to_vec(), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--topic",
        "crc",
        "--model",
        "mostpop",
        "--checkpoint-dir",
        "ckpt",
        "--checkpoint-interval",
        "1h",
        "--summary-json",
        "s.json",
    ];
    // Two runs over the first half leave two checkpoints (each run writes its final one).
    ok(finish(
        &mut train(&settings.brokers, dir.path(), &args),
        Duration::from_secs(60),
    ));
    ok(finish(
        &mut train(&settings.brokers, dir.path(), &args),
        Duration::from_secs(60),
    ));
    let mut ckpts: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir.path().join("ckpt"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("ckpt-")?.parse().ok()?;
            Some((id, e.path()))
        })
        .collect();
    ckpts.sort();
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpts[1].1.join("manifest.json")).unwrap())
            .unwrap();
    assert!(
        manifest["checksums"]["shared.bin"].is_string(),
        "{manifest}"
    );
    // One flipped byte in the newest checkpoint's worker part.
    let part = ckpts[1].1.join("worker-0.bin");
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&part, bytes).unwrap();

    produce(&settings, all[10_000..].to_vec(), None, &|_| {}).unwrap();
    let out = ok(finish(
        &mut train(&settings.brokers, dir.path(), &args),
        Duration::from_secs(60),
    ));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(stderr.contains("checksum"), "{stderr}");
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["checkpoints"]["restored_from"], ckpts[0].0, "{s}");
    assert_eq!(s["events"], 20_000, "every event exactly once: {s}");
}

/// Event times far ahead of the wall clock (a broken producer clock, seconds read as
/// milliseconds) go to the dead letters with reason `skew` instead of dragging the
/// watermark and the metric windows years ahead.
#[test]
fn events_from_the_future_are_dead_letters() {
    let (_cluster, settings) = cluster_with("skew", 1);
    let mut all = events(3_000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for e in all.iter_mut().skip(100).step_by(500) {
        e.ts = now + 30 * 86_400_000; // a month ahead
    }
    produce(&settings, all, None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ok(finish(
        &mut train(
            &settings.brokers,
            dir.path(),
            &[
                "--topic",
                "skew",
                "--model",
                "mostpop",
                "--dead-letters",
                "dead.jsonl",
                "--summary-json",
                "s.json",
            ],
        ),
        Duration::from_secs(60),
    ));
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["dead_letters"], 6, "{s}");
    assert_eq!(s["events"], 2_994, "{s}");
    let letters = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
    assert_eq!(letters.lines().count(), 6);
    assert!(letters.contains("skew: event time"), "{letters}");
    assert!(
        letters.contains("ahead of the wall clock (at most 3600000 ms allowed)"),
        "{letters}"
    );
}

/// The broker is killed (`kill -9`) while a checkpointing job trains, and restarted on
/// its log directory: training pauses, resumes, every checkpoint stays consistent, and
/// at the end every event was trained exactly once.
#[test]
fn kill_9_of_the_broker_trains_every_event_exactly_once() {
    let (mut cluster, settings) = cluster_with("bk", 2);
    // Long enough to train that the outage falls in the middle of it.
    let n = 400_000u64;
    produce(&settings, events(n), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = train(
        &settings.brokers,
        dir.path(),
        &[
            "--topic",
            "bk",
            "--model",
            "bpr",
            "--checkpoint-dir",
            "ckpt",
            "--checkpoint-interval",
            "50ms",
            "--summary-json",
            "s.json",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Once the job has checkpointed part of the topic, take the broker away.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir
        .path()
        .join("ckpt")
        .read_dir()
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy() == "ckpt-2")))
    {
        assert!(Instant::now() < deadline, "no second checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job finished before the broker went away"
    );
    cluster.outage(Duration::from_secs(3));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["events"], n, "{s}");
    assert_checkpoints_complete(&dir.path().join("ckpt"));
}

/// Partitions added to a followed topic are picked up (from their beginning) within
/// about a second, and their events trained.
#[test]
fn partitions_added_while_training_are_read() {
    let (cluster, settings) = cluster_with("grow", 2);
    let all = events(12_000);
    produce(&settings, all[..6_000].to_vec(), None, &|_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidepool"));
    cmd.args([
        "train",
        "--quiet",
        "--brokers",
        &settings.brokers,
        "--stop-at",
        "idle:6s",
    ])
    .args([
        "--topic",
        "grow",
        "--model",
        "mostpop",
        "--summary-json",
        "s.json",
    ])
    .current_dir(dir.path())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    cluster
        .kafka()
        .expect("a real broker")
        .add_partitions("grow", 5);
    // Keyed by user: most of these land in the new partitions.
    produce(&settings, all[6_000..].to_vec(), None, &|_| {}).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("kafka: reading partitions [2, 3, 4] added to grow"),
        "{stderr}"
    );
    let s = summary(dir.path(), "s.json");
    assert_eq!(s["events"], 12_000, "{s}");
}
