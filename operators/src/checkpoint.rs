//! Checkpoints: the model, the samplers, the metrics and the source positions, written
//! together at a consistent cut so that a restart trains every event exactly once
//! relative to the model.
//!
//! ## The cut
//!
//! A checkpoint is taken stop-the-world, between rounds:
//!
//! 1. Worker 0 decides (interval elapsed, or asked); every worker joins at its next batch
//!    boundary, having sent everything it read, and publishes its input time.
//! 2. All advance their inputs to `T` = one past the latest of those times and step the
//!    dataflow until the probe passes `T`: every round before `T` is trained, none after
//!    (nothing is sent at `T` or later until the checkpoint is done). The positions each
//!    worker read up to are exactly the events in the model.
//! 3. Each worker writes its users and metrics; worker 0 writes the shared state (item
//!    catalogue, item tables, samplers) and the manifest, then commits the directory.
//!
//! Workers wait for each other while stepping timely, never blocking it, so progress and
//! data keep flowing while some are still on their way to the cut. The decision, the
//! input times, the barriers and the counters travel over the coordination dataflow
//! (`operators/src/coord.rs`), so the same steps run across the processes of a cluster, writing
//! into one shared directory; there the cut lies one round further (see
//! `backtest::take_checkpoint`).
//!
//! ## On disk
//!
//! One directory per checkpoint, `ckpt-<id>/`: `manifest.json`, `shared.bin`,
//! `items-<variant>.bin` (raw little-endian `f32` rows), `worker-<w>.bin`. It is written as
//! `ckpt-<id>.tmp/`, every file and the directory fsynced, then renamed and the parent
//! fsynced, so a checkpoint directory is complete or absent; leftovers of a crash mid-write
//! (`*.tmp`) are removed at start-up. The newest `keep` checkpoints are kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tidepool_pipeline::{Error, Result};

use crate::item_table::ItemTable;
use crate::learner::{SharedPart, WorkerPart};

/// Version of the on-disk format.
///
/// 4: state files in postcard (a documented, stable wire format; format 3 used bincode 1,
/// which is unmaintained).
pub const FORMAT_VERSION: u32 = 4;

/// What a checkpoint holds besides the state files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Increasing checkpoint number.
    pub id: u64,
    /// Wall time of the commit.
    pub created_unix_ms: u64,
    /// Hash of the model-relevant configuration; a restart with a different one refuses
    /// the checkpoint unless forced.
    pub config_hash: String,
    /// Workers of the run that wrote it (any number may restore it).
    pub workers: usize,
    /// Next offset per partition: where a restart resumes.
    pub positions: BTreeMap<i32, i64>,
    /// Newest event time trained on.
    pub watermark_ms: Option<i64>,
    /// Events trained on, over every run that led to this checkpoint.
    pub events: u64,
    /// Records read (including dead letters), over every run.
    pub rows: u64,
    /// Dead letters, over every run.
    pub dead_letters: u64,
    /// Events processed late, over every run.
    pub reordered: u64,
    /// Records skipped by the event-type filter, over every run.
    #[serde(default)]
    pub skipped: u64,
    /// Offsets the broker no longer had when they were due (retention), over every run.
    /// Together: `events + dead_letters == rows` and `rows + skipped + offsets_lost` ==
    /// every offset consumed (the sum of `positions` from the partitions' first offsets).
    #[serde(default)]
    pub offsets_lost: u64,
    /// Bytes of the state files.
    pub bytes: u64,
    /// The configuration that wrote it (what `tidepool recommend` rebuilds the models
    /// from).
    #[serde(default)]
    pub config: Option<crate::config::BacktestConfig>,
    /// What was read (for Kafka: `topic`, `group`, `partitions`, `mapping`); a restart
    /// reading another topic or with another mapping refuses the checkpoint (see
    /// [`SOURCE_KEYS_CHECKED`]).
    #[serde(default)]
    pub source: BTreeMap<String, String>,
    /// CRC-32 (hex) of every state file, by name: a damaged or truncated file is found on
    /// load, and the previous complete checkpoint is used instead.
    #[serde(default)]
    pub checksums: BTreeMap<String, String>,
}

/// The [`Manifest::source`] entries that must match for a restart to resume: its offsets
/// mean nothing for another topic, and its model was trained on other fields.
pub const SOURCE_KEYS_CHECKED: [&str; 2] = ["topic", "mapping"];

/// Where and how often to checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointSettings {
    /// Directory holding `ckpt-<id>/` directories.
    pub dir: PathBuf,
    /// Periodic checkpoints (wall time); `None`: only on request and at the end.
    pub interval: Option<Duration>,
    /// Checkpoints kept.
    pub keep: usize,
    /// See [`Manifest::config_hash`].
    pub config_hash: String,
    /// The run's configuration, stored in the manifest.
    pub config: Option<crate::config::BacktestConfig>,
    /// What the run reads, stored in the manifest (see [`Manifest::source`]).
    pub source: BTreeMap<String, String>,
}

/// Counters for the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CheckpointStats {
    /// Checkpoints committed by this run.
    pub written: u64,
    /// The newest checkpoint's id.
    pub last_id: Option<u64>,
    /// Its size.
    pub last_bytes: u64,
    /// How long the last one stopped the dataflow (ms).
    pub last_pause_ms: f64,
    /// Longest stop (ms).
    pub max_pause_ms: f64,
    /// The checkpoint this run started from, if any.
    pub restored_from: Option<u64>,
}

/// A checkpoint read back.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// Its manifest.
    pub manifest: Manifest,
    pub(crate) shared: SharedPart,
    pub(crate) parts: Vec<WorkerPart>,
    /// Per variant, the item rows (for learned models).
    pub(crate) items: Vec<Option<Vec<f32>>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn codec(path: &Path) -> impl Fn(postcard::Error) -> Error + '_ {
    move |e| Error::connector(format!("checkpoint file {}", path.display()), e)
}

fn write_file(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<u64> {
    let file = File::create(path).map_err(io(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    write(&mut w)?;
    w.flush().map_err(io(path))?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io(path))?;
    Ok(file.metadata().map_err(io(path))?.len())
}

/// CRC-32 of a file, streamed.
fn crc_file(path: &Path) -> Result<String> {
    let mut file = BufReader::with_capacity(1 << 20, File::open(path).map_err(io(path))?);
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:08x}", hasher.finalize()))
}

/// The checksums of every file of a checkpoint directory being committed (read back from
/// the page cache: the parts were written by every worker, this is one place that sees
/// them all).
fn checksums(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| n.ends_with(".bin")) {
            out.insert(name, crc_file(&path)?);
        }
    }
    Ok(out)
}

/// Checks every file the manifest lists against its checksum.
fn verify(path: &Path, manifest: &Manifest) -> Result<()> {
    for (name, want) in &manifest.checksums {
        let file = path.join(name);
        let got = crc_file(&file)?;
        if &got != want {
            return Err(Error::BadInput {
                location: file.display().to_string(),
                reason: format!(
                    "checksum {got} does not match the manifest's {want}: the file is damaged"
                ),
            });
        }
    }
    Ok(())
}

fn write_bin<T: Serialize>(path: &Path, value: &T) -> Result<u64> {
    write_file(path, |w| {
        postcard::to_io(value, w).map(drop).map_err(codec(path))
    })
}

fn read_bin<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    // Whole file, then decode: postcard's streaming reader needs a scratch buffer as
    // large as the longest string, which a checkpoint cannot bound.
    let bytes = std::fs::read(path).map_err(io(path))?;
    postcard::from_bytes(&bytes).map_err(codec(path))
}

fn write_rows(path: &Path, rows: &[f32]) -> Result<u64> {
    write_file(path, |w| {
        for v in rows {
            w.write_all(&v.to_le_bytes()).map_err(io(path))?;
        }
        Ok(())
    })
}

fn read_rows(path: &Path) -> Result<Vec<f32>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(path))?;
    if bytes.len() % 4 != 0 {
        return Err(Error::BadInput {
            location: path.display().to_string(),
            reason: "truncated row file".into(),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

fn checkpoint_id(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// Complete checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(id) = checkpoint_id(&name) {
            if entry.path().join("manifest.json").exists() {
                found.push((id, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Removes directories left by a crash in the middle of writing or removing a checkpoint:
/// `*.tmp`, and (from versions that removed in place) a `ckpt-N` without its manifest.
pub fn remove_partial(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let torn = name.starts_with("ckpt-") && name.ends_with(".tmp")
            || checkpoint_id(&name).is_some() && !entry.path().join("manifest.json").exists();
        if torn {
            std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Reads the manifest of the checkpoint in `path`.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let file = path.join("manifest.json");
    let text = std::fs::read_to_string(&file).map_err(io(&file))?;
    serde_json::from_str(&text).map_err(|e| Error::BadInput {
        location: file.display().to_string(),
        reason: format!("not a tidepool checkpoint manifest: {e}"),
    })
}

/// Refuses a checkpoint whose source differs from the run's in a checked key, naming
/// every difference. A checkpoint that recorded no source (or a run that has none) is
/// not checked.
fn check_source(
    path: &Path,
    written: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Result<()> {
    let differences: Vec<String> = SOURCE_KEYS_CHECKED
        .iter()
        .filter_map(|&k| match (written.get(k), now.get(k)) {
            (Some(a), Some(b)) if a != b => Some(format!("{k} {a:?}, now {b:?}")),
            _ => None,
        })
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "checkpoint {} was written reading another source ({}); its offsets and model do not \
         apply: start from an empty checkpoint directory, or force it with --force-checkpoint",
        path.display(),
        differences.join("; ")
    )))
}

/// Loads the checkpoint in `path`; refuses one from another configuration unless
/// `force`.
pub fn load(path: &Path, config_hash: &str, force: bool) -> Result<Loaded> {
    let manifest = read_manifest(path)?;
    if manifest.version != FORMAT_VERSION {
        return Err(Error::Config(format!(
            "checkpoint {} has format {}, this build reads {FORMAT_VERSION}{}",
            path.display(),
            manifest.version,
            if manifest.version < FORMAT_VERSION {
                " (older formats are not converted: retrain into an empty checkpoint \
                 directory, or resume with the tidepool release that wrote it)"
            } else {
                " (written by a newer tidepool)"
            }
        )));
    }
    if manifest.config_hash != config_hash && !force {
        return Err(Error::Config(format!(
            "checkpoint {} was written by a different model configuration (hash {} vs {}); \
             start from an empty checkpoint directory, or force it with --force-checkpoint",
            path.display(),
            manifest.config_hash,
            config_hash
        )));
    }
    verify(path, &manifest)?;
    let shared: SharedPart = read_bin(&path.join("shared.bin"))?;
    let mut parts = Vec::new();
    for w in 0..manifest.workers {
        parts.push(read_bin(&path.join(format!("worker-{w}.bin")))?);
    }
    let mut items = Vec::new();
    for v in 0..shared.samplers.len() {
        let file = path.join(format!("items-{v}.bin"));
        items.push(if file.exists() {
            Some(read_rows(&file)?)
        } else {
            None
        });
    }
    Ok(Loaded {
        manifest,
        shared,
        parts,
        items,
    })
}

/// What one worker adds to a checkpoint's manifest.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Deposit {
    pub(crate) positions: BTreeMap<i32, i64>,
    pub(crate) events: u64,
    pub(crate) rows: u64,
    pub(crate) dead: u64,
    pub(crate) reordered: u64,
    pub(crate) skipped: u64,
    pub(crate) lost: u64,
    pub(crate) bytes: u64,
}

/// What was already counted before this run, from the restored checkpoint.
#[derive(Clone, Debug, Default)]
pub(crate) struct Carried {
    pub(crate) rows: u64,
    pub(crate) dead: u64,
    pub(crate) reordered: u64,
    pub(crate) skipped: u64,
    pub(crate) lost: u64,
    /// Where the restored checkpoint left every partition: a partition this run reads
    /// nothing from keeps its position.
    pub(crate) positions: BTreeMap<i32, i64>,
}

/// Called with each committed manifest (e.g. to commit offsets to the consumer group).
pub type OnCommit = Box<dyn Fn(&Manifest) + Send + Sync>;

/// The process's checkpoint coordinator, shared by its workers. The rendezvous between
/// workers (of this process and of the others in a cluster) go through
/// `operators/src/coord.rs`; this holds what a process knows: settings, which checkpoint is due,
/// what the restored one carried, and the counters.
pub struct Checkpointer {
    settings: CheckpointSettings,
    requested: Arc<AtomicBool>,
    /// The newest checkpoint id started (by worker 0's decision); pending while it is at
    /// least `next_id`.
    started_id: AtomicU64,
    last: Mutex<Instant>,
    next_id: AtomicU64,
    started: Mutex<Option<Instant>>,
    stats: Mutex<CheckpointStats>,
    carried: Mutex<Carried>,
    on_commit: Option<OnCommit>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Checkpointer {
    /// A coordinator writing into `settings.dir`; creates the directory and clears
    /// partial checkpoints left by a crash. In a cluster every process has one, on a
    /// directory they share.
    pub fn new(settings: CheckpointSettings) -> Result<Self> {
        std::fs::create_dir_all(&settings.dir).map_err(io(&settings.dir))?;
        let removed = remove_partial(&settings.dir)?;
        if removed > 0 {
            tracing::warn!(removed, dir = %settings.dir.display(), "removed partial checkpoints of an earlier crash");
        }
        let next_id = list(&settings.dir)?.last().map_or(1, |(id, _)| id + 1);
        Ok(Self {
            requested: Arc::new(AtomicBool::new(false)),
            started_id: AtomicU64::new(0),
            last: Mutex::new(Instant::now()),
            next_id: AtomicU64::new(next_id),
            started: Mutex::new(None),
            stats: Mutex::default(),
            carried: Mutex::default(),
            on_commit: None,
            settings,
        })
    }

    /// Calls `f` with every committed manifest.
    pub fn on_commit(mut self, f: OnCommit) -> Self {
        self.on_commit = Some(f);
        self
    }

    /// The newest complete checkpoint in the directory, loaded.
    pub fn latest(&self, force: bool) -> Result<Option<Loaded>> {
        let all = list(&self.settings.dir)?;
        let mut damaged = Vec::new();
        // Newest first. A checkpoint from another configuration or source is an error
        // (resuming an older one would be as wrong); a damaged one is skipped, loudly.
        for (_, path) in all.iter().rev() {
            match load(path, &self.settings.config_hash, force) {
                Ok(loaded) => {
                    if !force {
                        check_source(path, &loaded.manifest.source, &self.settings.source)?;
                    }
                    return Ok(Some(loaded));
                }
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(checkpoint = %path.display(), error = %e, "a damaged checkpoint; trying the previous one");
                    eprintln!(
                        "warning: checkpoint {} is damaged ({e}); falling back to the previous one",
                        path.display()
                    );
                    damaged.push(format!("{}: {e}", path.display()));
                }
            }
        }
        if damaged.is_empty() {
            Ok(None)
        } else {
            Err(Error::BadInput {
                location: self.settings.dir.display().to_string(),
                reason: format!("no checkpoint is readable: {}", damaged.join("; ")),
            })
        }
    }

    /// The flag a signal handler or admin endpoint sets to ask for a checkpoint.
    pub fn request_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.requested)
    }

    /// Time since the last checkpoint committed (or since the coordinator started).
    pub fn age(&self) -> Duration {
        lock(&self.last).elapsed()
    }

    /// Counters so far.
    pub fn stats(&self) -> CheckpointStats {
        lock(&self.stats).clone()
    }

    pub(crate) fn restored(&self, manifest: &Manifest) {
        lock(&self.stats).restored_from = Some(manifest.id);
        *lock(&self.carried) = Carried {
            rows: manifest.rows,
            dead: manifest.dead_letters,
            reordered: manifest.reordered,
            skipped: manifest.skipped,
            lost: manifest.offsets_lost,
            positions: manifest.positions.clone(),
        };
    }

    /// The id the next checkpoint will get.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Acquire)
    }

    pub(crate) fn carried(&self) -> Carried {
        lock(&self.carried).clone()
    }

    /// Global worker 0, between batches: the id of a checkpoint to start everywhere, if
    /// one is due (interval elapsed, or asked) and none is under way. This process
    /// starts it at once; the others learn it through [`Self::start`].
    pub(crate) fn poll(&self) -> Option<u64> {
        if self.pending() {
            return None;
        }
        let due = self
            .settings
            .interval
            .is_some_and(|i| lock(&self.last).elapsed() >= i);
        if due || self.requested.swap(false, Ordering::AcqRel) {
            let id = self.next_id();
            self.start(id);
            return Some(id);
        }
        None
    }

    /// Worker 0 has started checkpoint `id`.
    pub(crate) fn start(&self, id: u64) {
        self.started_id.fetch_max(id, Ordering::AcqRel);
    }

    /// Whether workers must join a checkpoint.
    pub(crate) fn pending(&self) -> bool {
        self.started_id.load(Ordering::Acquire) >= self.next_id()
    }

    /// A worker joins a checkpoint: the pause is measured from the first one.
    pub(crate) fn begin(&self) {
        lock(&self.started).get_or_insert_with(Instant::now);
    }

    /// Checkpoint `id` is committed (by this process or another): the next one gets
    /// `id + 1`, and the interval counts from now. A start for a later id that arrived
    /// meanwhile stays pending.
    pub(crate) fn finished(&self, id: u64) {
        self.next_id.fetch_max(id + 1, Ordering::AcqRel);
        *lock(&self.last) = Instant::now();
        lock(&self.started).take();
    }

    fn tmp_dir(&self, id: u64) -> PathBuf {
        self.settings.dir.join(format!("ckpt-{id}.tmp"))
    }

    /// Writes worker `worker`'s part of checkpoint `id` into its (shared) temporary
    /// directory; returns its size.
    pub(crate) fn write_part(&self, id: u64, worker: usize, part: &WorkerPart) -> Result<u64> {
        let tmp = self.tmp_dir(id);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let bytes = write_bin(&tmp.join(format!("worker-{worker}.bin")), part)?;
        tracing::debug!(
            worker,
            events = part_events(part),
            "checkpoint part written"
        );
        Ok(bytes)
    }

    /// Global worker 0, once every worker's part is written: writes the shared state and
    /// the manifest from everyone's `deposits`, and commits the directory.
    pub(crate) fn commit(
        &self,
        id: u64,
        shared: &SharedPart,
        tables: &[Option<Arc<ItemTable>>],
        deposits: &[Deposit],
    ) -> Result<()> {
        let tmp = self.tmp_dir(id);
        let mut bytes = write_bin(&tmp.join("shared.bin"), shared)?;
        for (v, table) in tables.iter().enumerate() {
            if let Some(table) = table {
                let rows = table.export(shared.catalogue.len());
                bytes += write_rows(&tmp.join(format!("items-{v}.bin")), &rows)?;
            }
        }
        let carried = self.carried();
        let mut positions = carried.positions.clone();
        let mut total = Deposit::default();
        for d in deposits {
            positions.extend(d.positions.iter().map(|(p, o)| (*p, *o)));
            total.events += d.events;
            total.rows += d.rows;
            total.dead += d.dead;
            total.reordered += d.reordered;
            total.skipped += d.skipped;
            total.lost += d.lost;
            total.bytes += d.bytes;
        }
        let manifest = Manifest {
            version: FORMAT_VERSION,
            id,
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            config_hash: self.settings.config_hash.clone(),
            workers: deposits.len(),
            positions,
            watermark_ms: (shared.now_ms != i64::MIN).then_some(shared.now_ms),
            events: total.events,
            rows: carried.rows + total.rows,
            dead_letters: carried.dead + total.dead,
            reordered: carried.reordered + total.reordered,
            skipped: carried.skipped + total.skipped,
            offsets_lost: carried.lost + total.lost,
            bytes: bytes + total.bytes,
            config: self.settings.config.clone(),
            source: self.settings.source.clone(),
            checksums: checksums(&tmp)?,
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::Internal(format!("manifest: {e}")))?;
        let manifest_path = tmp.join("manifest.json");
        write_file(&manifest_path, |w| {
            w.write_all(text.as_bytes()).map_err(io(&manifest_path))
        })?;
        sync_dir(&tmp)?;
        let done = self.settings.dir.join(format!("ckpt-{id}"));
        std::fs::rename(&tmp, &done).map_err(io(&done))?;
        sync_dir(&self.settings.dir)?;
        // Older checkpoints beyond `keep` go; the newest is never touched.
        let all = list(&self.settings.dir)?;
        let keep = self.settings.keep.max(1);
        if all.len() > keep {
            for (old, path) in &all[..all.len() - keep] {
                // Renamed first, so a crash during the removal leaves a `*.tmp` directory
                // (cleared at the next start), never a `ckpt-N` missing some files.
                let doomed = self.tmp_dir(*old);
                std::fs::rename(path, &doomed).map_err(io(path))?;
                std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
            }
        }
        let pause = lock(&self.started)
            .as_ref()
            .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0);
        {
            let mut stats = lock(&self.stats);
            stats.written += 1;
            stats.last_id = Some(id);
            stats.last_bytes = manifest.bytes;
            stats.last_pause_ms = pause;
            stats.max_pause_ms = stats.max_pause_ms.max(pause);
        }
        tracing::info!(
            id,
            events = manifest.events,
            bytes = manifest.bytes,
            pause_ms = pause,
            "checkpoint committed"
        );
        if let Some(f) = &self.on_commit {
            f(&manifest);
        }
        Ok(())
    }
}

pub(crate) fn part_events(part: &WorkerPart) -> u64 {
    part.variants
        .first()
        .map_or(0, |(_, w)| w.values().map(|q| q.events).sum::<u64>())
}

/// Writes (and fsyncs) the user part a worker holding `users` users with `dim`-dimensional
/// Adagrad rows and a one-item history each would write, into `dir`; returns `(seconds,
/// bytes)`. For the benchmark of what a checkpoint costs at scale.
pub fn bench_user_part(dir: &Path, users: usize, dim: usize) -> Result<(f64, u64)> {
    let mut part_users = crate::state::Users::default();
    for u in 0..users as u64 {
        let d = part_users.get_or_insert(u, 0);
        part_users.remember(d, (u % 1000) as u32);
    }
    let stride = 2 * (dim + 1);
    let rows: Vec<f32> = (0..users * stride)
        .map(|i| (i % 97) as f32 * 0.01)
        .collect();
    let part = WorkerPart {
        worker: 0,
        users: part_users,
        variants: vec![(rows, BTreeMap::new())],
        sampler_shortfalls: 0,
        ensembles: vec![Default::default()],
    };
    let started = Instant::now();
    let bytes = write_bin(&dir.join("worker-0.bin"), &part)?;
    sync_dir(dir)?;
    Ok((started.elapsed().as_secs_f64(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_skips_partial_and_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ckpt-3", "ckpt-12", "ckpt-5.tmp", "ckpt-2", "other"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("ckpt-3/manifest.json"), "{}").unwrap();
        std::fs::write(dir.path().join("ckpt-12/manifest.json"), "{}").unwrap();
        let ids: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![3, 12]);
        // A half-removed checkpoint (no manifest) goes with the half-written one.
        assert_eq!(remove_partial(dir.path()).unwrap(), 2);
        assert!(!dir.path().join("ckpt-5.tmp").exists());
        assert!(!dir.path().join("ckpt-2").exists());
        assert!(dir.path().join("other").exists());
        let err = read_manifest(&dir.path().join("ckpt-3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a tidepool checkpoint manifest"), "{err}");
    }

    #[test]
    fn rows_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.bin");
        let rows = vec![1.5f32, -0.0, f32::MAX, 3.25];
        assert_eq!(write_rows(&path, &rows).unwrap(), 16);
        assert_eq!(read_rows(&path).unwrap(), rows);
    }
}
