//! Job files: the shipped examples validate and run; bad files fail with golden
//! messages naming file:line:column and the valid choices.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tidepool(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("tidepool runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of an example in a scratch directory (outputs land next to the job file).
fn example(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let dst = dir.path().join(name);
    std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    (dir, dst)
}

#[test]
fn the_backtest_example_validates_and_runs() {
    let (dir, job) = example("backtest-generated.toml");
    let job = job.to_str().unwrap();
    let out = tidepool(&["validate", job], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (a backtest with 2 variant(s) on 2 worker(s))"));
    let out = tidepool(&["run", job], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("backtest-summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["events"], 100_000);
    assert_eq!(summary["variants"].as_array().unwrap().len(), 2);
    assert_eq!(summary["config"]["workers"], 2);
    assert_eq!(summary["config"]["state"]["user_ttl_ms"], 7 * 86_400_000u64);
}

#[test]
fn the_kafka_example_runs_against_its_embedded_cluster() {
    let (dir, job) = example("kafka-embedded.toml");
    let out = tidepool(&["run", job.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("kafka-summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["events"], 50_000);
    assert!(summary["checkpoints"]["written"].as_u64().unwrap() >= 1);
    assert!(dir.path().join("kafka-checkpoints").is_dir());
    let deltas = tidepool_connector_parquet::read_deltas(&dir.path().join("model-deltas")).unwrap();
    assert!(
        deltas.iter().any(|d| d.key().starts_with("bpr/user/")),
        "the job's delta files hold user rows"
    );
}

#[test]
fn the_cluster_example_runs_as_two_processes_with_flags_over_the_file() {
    let (dir, job) = example("cluster-loopback.toml");
    let job = job.to_str().unwrap();
    let out = tidepool(&["validate", job, "--process", "1"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "process 1 of a 2-process cluster (127.0.0.1:2101, 127.0.0.1:2102), 1 worker(s) each"
        ),
        "{stdout}"
    );
    // Free ports instead of the example's defaults, so parallel tests cannot collide.
    common::loopback_hostfile(dir.path(), 2);
    let spawn = |p: &str, summary: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["run", job, "--process", p, "--hostfile", "hosts"])
            .args(["--summary-json", summary])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let second = spawn("1", "p1.json");
    let first = spawn("0", "p0.json");
    for child in [first, second] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    for name in ["p0.json", "p1.json"] {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap();
        assert_eq!(summary["events"], 50_000, "{name}");
        assert_eq!(summary["processes"], 2, "{name}");
    }
    // The file's own summary path was overridden by the flag.
    assert!(!dir.path().join("cluster-summary.json").exists());
}

/// A job with the sequence model and an ensemble over it, from `[[variants]]` keys.
#[test]
fn a_job_mixes_itemknn_and_mostpop() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("knn.toml"),
        "[source]\nkind = \"generator\"\nevents = 20000\n\n\
         [[variants]]\nname = \"knn\"\nkind = \"itemknn\"\nhistory = 12\ndecay = 0.8\nneighbours = 40\nhalf_life = \"off\"\n\n\
         [[variants]]\nname = \"pop\"\nkind = \"mostpop\"\n\n\
         [[variants]]\nname = \"mix\"\nkind = \"ensemble\"\ncomponents = [\"knn\", \"pop\"]\nmix_lr = 0.1\n\n\
         [run]\nquiet = true\n[output]\nsummary_json = \"s.json\"\n",
    )
    .unwrap();
    let out = tidepool(&["run", "knn.toml"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap();
    let knn = &s["variants"][0]["model_config"]["knn"];
    assert_eq!(knn["history"], 12);
    assert_eq!(knn["neighbours"], 40);
    assert_eq!(knn["half_life_ms"], serde_json::Value::Null);
    let mix = &s["variants"][2];
    assert_eq!(
        mix["model_config"]["ensemble"]["components"],
        serde_json::json!(["knn", "pop"])
    );
    assert!(mix["weights"]["knn"].as_f64().unwrap() > 0.5, "{mix}");
}

#[test]
fn bad_job_files_get_golden_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[source]\nkind = \"generator\"\n\n[model]\ndim = 32\ncolour = \"red\"\n",
            "error: bad.toml:6:1: unknown field `colour`, expected one of `name`, `kind`, `dim`, `lr`, `reg`, `optimizer`, `negatives`, `init_std`, `item_bias`, `sampler`",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[model]\ndim = \"big\"\n",
            "error: bad.toml:5:7: invalid type: string \"big\", expected usize",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[model]\nkind = \"svd\"\n",
            "error: bad.toml:5:1: invalid value \"svd\" for `kind`: unknown model \"svd\"; valid: bpr, mostpop",
        ),
        (
            "[source]\nkind = \"files\"\n",
            "error: bad.toml:2:1: unknown source kind \"files\"; valid: generator, parquet, kafka",
        ),
        (
            "[source]\nkind = \"generator\"\n[gc]\ngc_percent = \"lots\"\n",
            "error: bad.toml:4:1: invalid value \"lots\" for `gc_percent`: gc percent \"lots\" must be off or a whole number, e.g. 100",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[state]\nuser_ttl = \"7 fortnights\"\n",
            "error: bad.toml:5:1: invalid value \"7 fortnights\" for `user_ttl`: unknown time unit \"fortnights\"",
        ),
        (
            "[source]\nkind = \"parquet\"\n",
            "error: bad.toml:2:1: a parquet source needs inputs",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[model]\nkind = \"itemknn\"\ndecay = -0.5\n",
            "error: bad.toml:6:1: variant itemknn: decay must be in (0, 1], got -0.5",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[[variants]]\nname = \"a\"\nkind = \"mostpop\"\n\n[[variants]]\nname = \"knn\"\nkind = \"itemknn\"\nalpha = 1.5\n",
            "error: bad.toml:11:1: variant knn: alpha must be in [0, 1], got 1.5",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[[variants]]\nname = \"knn\"\nkind = \"itemknn\"\n\n[[variants]]\nname = \"mix\"\nkind = \"ensemble\"\ncomponents = [\"knn\", \"pop\"]\n",
            "error: bad.toml:11:1: variant mix: component \"pop\" is not a variant of this run; variants to mix: knn",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[model]\ncomponents = [\"a\", \"b\"]\n",
            "error: bad.toml:5:1: components describes one ensemble and belongs in a [[variants]] entry",
        ),
        (
            "[source]\nkind = \"generator\"\ntopic = \"events\"\n",
            "error: bad.toml:3:1: `topic` does not apply to a generator source: it configures a Kafka source (kind = \"kafka\")",
        ),
        (
            "[source]\nkind = \"parquet\"\ninputs = [\"x.parquet\"]\nevents = 5\n",
            "error: bad.toml:4:1: `events` does not apply to a parquet source: it sizes a generated stream",
        ),
        (
            "[source]\nkind = \"kafka\"\nbrokers = \"localhost:9092\"\nusers = 5\n",
            "error: bad.toml:4:1: `users` does not apply to a kafka source: it sizes a generated stream",
        ),
        (
            "[source]\nkind = \"kafka\"\nbrokers = \"embedded\"\nuser_col = \"u\"\n",
            "error: bad.toml:4:1: `user_col` does not apply to a kafka source: it maps Parquet columns",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[checkpoint]\ndir = \"ckpt\"\n",
            "error: bad.toml:5:1: `dir` does not apply to a generator source: checkpoints are tied to Kafka offsets",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[output]\npublish_topic = \"deltas\"\n",
            "error: bad.toml:5:1: `publish_topic` does not apply to a generator source",
        ),
        (
            "[source]\nkind = \"kafka\"\nbrokers = \"embedded\"\n\n[output]\nsave_model = \"m\"\n",
            "error: bad.toml:6:1: `save_model` does not apply to a kafka source: a Kafka job checkpoints with [checkpoint] dir",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[eval]\nk = 10\nwarmup = 1.5\n",
            "error: bad.toml:6:1: invalid value 1.5 for `warmup`: must be in [0, 1), got 1.5",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[pool]\nretain = \"lots\"\n",
            "error: bad.toml:5:1: invalid value \"lots\" for `retain`:",
        ),
        (
            "[source]\nkind = \"kafka\"\nbrokers = \"embedded\"\nstop_at = \"later\"\n",
            "error: bad.toml:4:1: invalid value \"later\" for `stop_at`: \"later\": valid: never, end, idle:DURATION",
        ),
        (
            "[source]\nkind = \"kafka\"\nbrokers = \"embedded\"\ntypes = [\"view\", \"like\"]\n",
            "error: bad.toml:4:1: invalid value [\"view\", \"like\"] for `types`: unknown event type \"like\"",
        ),
        (
            "[source]\nkind = \"kafka\"\ntopic = \"t\"\n",
            "error: bad.toml:2:1: a kafka source needs brokers",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[model]\nname = \"a\"\n",
            "error: bad.toml:5:1: name belongs in a [[variants]] entry",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[[variants]]\nname = \"a\"\nkind = \"mostpop\"\n\n[[variants]]\nname = \"mix\"\nkind = \"ensemble\"\ncomponents = [\"a\"]\n  norm = \"max\"\n",
            "error: bad.toml:12:3: variant mix: norm = \"max\": unknown norm \"max\"; valid: rank, z",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[[variants]]\nkind = \"mostpop\"\n",
            "error: bad.toml:4:1: variant 1 needs a name",
        ),
        (
            "[sauce]\nkind = 1\n",
            "error: bad.toml:1:2: unknown field `sauce`, expected one of `source`, `model`, `variants`, `eval`, `run`, `cluster`, `pool`, `gc`, `state`, `checkpoint`, `output`",
        ),
    ];
    for (job, golden) in cases {
        std::fs::write(dir.path().join("bad.toml"), job).unwrap();
        let out = tidepool(&["validate", "bad.toml"], dir.path());
        assert!(!out.status.success(), "{job}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with(golden),
            "{job}\ngot:  {stderr}\nwant: {golden}"
        );
    }
}

/// Runs `dir/job.toml` with `env` and `flags`, and reads the summary it writes.
fn run_job(dir: &Path, env: &[(&str, &str)], flags: &[&str], summary: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["run", "job.toml"])
        .args(flags)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("tidepool runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(dir.join(summary)).unwrap()).unwrap()
}

/// Configuration layers: defaults < job file < `TIDEPOOL_*` environment < flags.
#[test]
fn settings_layer_defaults_file_environment_flags() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.toml"),
        "[source]\nkind = \"generator\"\nevents = 3000\n\n[model]\nkind = \"bpr\"\ndim = 16\n\n[output]\nsummary_json = \"summary.json\"\n",
    )
    .unwrap();
    let dim_of = |env: &[(&str, &str)], flags: &[&str]| -> u64 {
        let flags = [&["--quiet"], flags].concat();
        let summary = run_job(dir.path(), env, &flags, "summary.json");
        summary["variants"][0]["model_config"]["dim"]
            .as_u64()
            .unwrap()
    };
    // Default 64 < file 16 < environment 24 < flag 32.
    assert_eq!(dim_of(&[], &[]), 16);
    assert_eq!(dim_of(&[("TIDEPOOL_DIM", "24")], &[]), 24);
    assert_eq!(dim_of(&[("TIDEPOOL_DIM", "24")], &["--dim", "32"]), 32);
    // Without the file's key, the environment beats the default.
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args([
            "backtest",
            "--events",
            "3000",
            "--model",
            "bpr",
            "--quiet",
            "--summary-json",
            "s.json",
        ])
        .env("TIDEPOOL_DIM", "8")
        .current_dir(dir.path())
        .output()
        .expect("tidepool runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap();
    assert_eq!(s["variants"][0]["model_config"]["dim"], 8);
    // A bad value in the environment is an error naming the flag, like a bad flag.
    let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
        .args(["backtest", "--events", "3000"])
        .env("TIDEPOOL_DIM", "wide")
        .current_dir(dir.path())
        .output()
        .expect("tidepool runs");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid value 'wide' for '--dim <DIM>'"),
        "{}",
        text(&out.stderr)
    );
}

/// The pool's reserve comes from `[pool] reserve`, a flag beats it, and 0 turns it off;
/// the summary counts the blocks laid in.
#[test]
fn the_pool_reserve_is_set_by_the_job_or_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.toml"),
        "[source]\nkind = \"generator\"\nevents = 100000\n\n[model]\nkind = \"mostpop\"\n\n\
         [pool]\nreserve = 3\n\n[output]\nsummary_json = \"s.json\"\n",
    )
    .unwrap();
    let reserved = |flags: &[&str]| -> u64 {
        let flags = [&["--quiet"], flags].concat();
        run_job(dir.path(), &[], &flags, "s.json")["pool"]["reserved"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(reserved(&[]), 3);
    assert_eq!(reserved(&["--pool-reserve", "0"]), 0);
    // The generator's second worker reads nothing, and reserves nothing.
    assert_eq!(reserved(&["--pool-reserve", "2", "--workers", "2"]), 2);
}

/// Every key that sizes, maps or publishes for one source kind is refused, at its line,
/// in a job of another kind, and accepted where it applies.
#[test]
fn every_key_is_refused_where_it_does_not_apply() {
    let dir = tempfile::tempdir().unwrap();
    let kinds = [
        ("generator", "kind = \"generator\"\n"),
        ("parquet", "kind = \"parquet\"\ninputs = [\"x.parquet\"]\n"),
        ("kafka", "kind = \"kafka\"\nbrokers = \"localhost:9092\"\n"),
        ("embedded", "kind = \"kafka\"\nbrokers = \"embedded\"\n"),
    ];
    let generated: &[&str] = &["generator", "embedded"];
    let kafka: &[&str] = &["kafka", "embedded"];
    let keys: &[(&str, &str, &str, &[&str])] = &[
        ("source", "events", "5", generated),
        ("source", "users", "5", generated),
        ("source", "items", "5", generated),
        ("source", "user_churn", "1", generated),
        ("source", "inputs", "[\"y.parquet\"]", &["parquet"]),
        ("source", "user_col", "\"u\"", &["parquet"]),
        ("source", "item_col", "\"i\"", &["parquet"]),
        ("source", "time_col", "\"t\"", &["parquet"]),
        ("source", "time_unit", "\"s\"", &["parquet"]),
        ("source", "topic", "\"t\"", kafka),
        ("source", "group", "\"g\"", kafka),
        ("source", "partitions", "2", kafka),
        ("source", "stop_at", "\"end\"", kafka),
        ("source", "on_rewind", "\"continue\"", kafka),
        ("source", "user_field", "\"u\"", kafka),
        ("source", "item_field", "\"i\"", kafka),
        ("source", "time_field", "\"t\"", kafka),
        ("source", "type_field", "\"e\"", kafka),
        ("source", "types", "[\"view\"]", kafka),
        ("source", "config", "{ \"client.id\" = \"x\" }", kafka),
        ("checkpoint", "dir", "\"ckpt\"", kafka),
        ("checkpoint", "interval", "\"10s\"", kafka),
        ("checkpoint", "keep", "3", kafka),
        ("output", "dead_letter_topic", "\"dead\"", kafka),
        ("output", "publish_topic", "\"deltas\"", kafka),
        ("output", "publish_dir", "\"deltas\"", kafka),
        ("output", "publish_interval", "\"5s\"", kafka),
        (
            "output",
            "save_model",
            "\"model\"",
            &["generator", "parquet"],
        ),
    ];
    for (kind, source) in kinds {
        for (section, key, value, applies) in keys {
            if source.contains(&format!("{key} =")) {
                continue;
            }
            let mut job = format!("[source]\n{source}");
            let line = if *section == "source" {
                job.lines().count() + 1
            } else {
                job.push_str(&format!("\n[{section}]\n"));
                job.lines().count() + 1
            };
            job.push_str(&format!("{key} = {value}\n"));
            if *key == "publish_interval" && applies.contains(&kind) {
                job.push_str("publish_dir = \"deltas\"\n");
            }
            if key.starts_with("publish") && applies.contains(&kind) {
                // Publishing needs checkpoints, where it applies at all.
                job.push_str("\n[checkpoint]\ndir = \"ckpt\"\n");
            }
            std::fs::write(dir.path().join("job.toml"), &job).unwrap();
            let out = tidepool(&["validate", "job.toml"], dir.path());
            let stderr = text(&out.stderr);
            if applies.contains(&kind) {
                assert!(out.status.success(), "{kind}: {key}\n{job}\n{stderr}");
            } else {
                let want = format!("error: job.toml:{line}:1: `{key}` does not apply to a");
                assert!(
                    stderr.starts_with(&want),
                    "{kind}: {key}\ngot:  {stderr}\nwant: {want}"
                );
            }
        }
    }
}

/// Flags after the file replace the file's list settings as a whole (variants), and an
/// option that reads its variable itself (`TIDEPOOL_GC`) still beats the file.
#[test]
fn flags_replace_the_files_variants_and_the_environment_beats_its_gc() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.toml"),
        "[source]\nkind = \"generator\"\nevents = 2000\n\n\
         [[variants]]\nname = \"pop\"\nkind = \"mostpop\"\n\n\
         [[variants]]\nname = \"bpr\"\nkind = \"bpr\"\ndim = 8\n\n\
         [gc]\ngc_percent = 50\n\n[run]\nquiet = true\n[output]\nsummary_json = \"s.json\"\n",
    )
    .unwrap();
    let summary = |env: &[(&str, &str)], flags: &[&str]| run_job(dir.path(), env, flags, "s.json");
    let names = |s: &serde_json::Value| -> Vec<String> {
        s["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    let s = summary(&[], &[]);
    assert_eq!(names(&s), ["pop", "bpr"]);
    assert_eq!(s["variants"][1]["model_config"]["dim"], 8);
    assert_eq!(s["config"]["gc"]["gc_percent"], 50);
    let s = summary(
        &[("TIDEPOOL_GC", "off")],
        &["--variant", "solo=uniform,dim=4"],
    );
    assert_eq!(names(&s), ["solo"]);
    assert_eq!(s["variants"][0]["model_config"]["dim"], 4);
    assert_eq!(s["config"]["gc"]["gc_percent"], serde_json::Value::Null);
}

/// The library side of job files: a `Job` built in code becomes the command it
/// describes, flags layered over it, and runs through `api::backtest`.
#[test]
fn a_job_built_in_code_runs_through_the_library() {
    use tidepool_jobs::api::{self, Control, Input};
    use tidepool_jobs::cli::{Command as Cmd, ModelTable};
    use tidepool_jobs::job::{Job, SourceSection, StateSection};
    let job = Job {
        source: SourceSection {
            kind: "generator".into(),
            events: Some(3000),
            ..Default::default()
        },
        model: ModelTable {
            kind: Some("mostpop".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let flags = ["--workers".to_string(), "2".into(), "--quiet".into()];
    let Cmd::Backtest(args) = job.command(Path::new("."), &flags).unwrap() else {
        panic!("a generator job is a backtest");
    };
    assert_eq!(args.workers, 2);
    assert_eq!(args.events, 3000);
    let outcome = api::backtest(&args, Input::FromArgs, Control::library()).unwrap();
    assert_eq!(outcome.summary["events"], 3000);
    assert_eq!(outcome.summary["variants"][0]["name"], "mostpop");
    let bad = Job {
        state: StateSection {
            user_ttl: Some("soon".into()),
            ..Default::default()
        },
        ..job
    };
    let err = bad.command(Path::new("."), &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("[state] user_ttl: invalid value \"soon\" for `user_ttl`"),
        "{err}"
    );
}
