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
            "error: bad.toml:5:1: invalid value 'svd' for '--model <MODEL>': invalid configuration: unknown model \"svd\"; valid: bpr, mostpop",
        ),
        (
            "[source]\nkind = \"files\"\n",
            "error: bad.toml:2:1: unknown source kind \"files\"; valid: generator, parquet, kafka",
        ),
        (
            "[source]\nkind = \"generator\"\n[gc]\ngc_percent = \"lots\"\n",
            "error: bad.toml:4:1: invalid value 'lots' for '--gc <off|PERCENT>': invalid configuration: gc percent \"lots\" must be off or a whole number, e.g. 100",
        ),
        (
            "[source]\nkind = \"generator\"\n\n[state]\nuser_ttl = \"7 fortnights\"\n",
            "error: bad.toml:5:1: invalid value '7 fortnights' for '--user-ttl <USER_TTL>': unknown time unit \"fortnights\"",
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
        let out = Command::new(env!("CARGO_BIN_EXE_tidepool"))
            .args(["run", "job.toml", "--quiet"])
            .args(flags)
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .output()
            .expect("tidepool runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
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
