//! Dead letters: records that could not be used, with the reason, counted and kept.
//!
//! tidepool never drops an input record silently. A record that fails to parse or
//! validate becomes a [`DeadLetter`] and goes to a [`DeadLetterSink`]. Sinks are shared by
//! all workers of a process, so they take `&self` and synchronise inside.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};

/// A record that could not be used.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetter {
    /// Where it came from: `file line N`, `file row N`, `topic/partition@offset`.
    pub location: String,
    /// Why it was rejected.
    pub reason: String,
    /// The original bytes as text, when the source has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// Somewhere dead letters go. Implementations count every letter they receive.
pub trait DeadLetterSink: Send + Sync {
    /// Stores one dead letter.
    fn send(&self, letter: DeadLetter) -> Result<()>;
    /// How many letters this sink has received.
    fn count(&self) -> u64;
    /// Flushes buffered letters to durable storage.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Keeps a count and the first `keep` letters in memory, for reports and tests.
#[derive(Debug)]
pub struct MemoryDeadLetters {
    count: AtomicU64,
    keep: usize,
    // Invariant: holds at most `keep` letters, the first ones received.
    kept: Mutex<Vec<DeadLetter>>,
}

impl MemoryDeadLetters {
    /// A sink that keeps the first `keep` letters.
    pub fn new(keep: usize) -> Self {
        Self {
            count: AtomicU64::new(0),
            keep,
            kept: Mutex::new(Vec::new()),
        }
    }

    /// The letters kept so far.
    pub fn kept(&self) -> Vec<DeadLetter> {
        self.kept.lock().map(|k| k.clone()).unwrap_or_default()
    }
}

impl DeadLetterSink for MemoryDeadLetters {
    fn send(&self, letter: DeadLetter) -> Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut kept = self
            .kept
            .lock()
            .map_err(|_| Error::Internal("dead letter list poisoned".into()))?;
        if kept.len() < self.keep {
            kept.push(letter);
        }
        Ok(())
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Writes dead letters as JSON lines to a file (created on the first letter, so a clean
/// run leaves no empty file behind), and keeps the first few in memory for reports.
#[derive(Debug)]
pub struct JsonlDeadLetters {
    path: PathBuf,
    memory: MemoryDeadLetters,
    writer: Mutex<Option<BufWriter<File>>>,
}

impl JsonlDeadLetters {
    /// A sink writing to `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            memory: MemoryDeadLetters::new(5),
            writer: Mutex::new(None),
        }
    }

    /// The file letters go to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first letters received.
    pub fn samples(&self) -> Vec<DeadLetter> {
        self.memory.kept()
    }
}

impl DeadLetterSink for JsonlDeadLetters {
    fn send(&self, letter: DeadLetter) -> Result<()> {
        let line = serde_json::to_string(&letter)
            .map_err(|e| Error::Internal(format!("dead letter not serialisable: {e}")))?;
        self.memory.send(letter)?;
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| Error::Internal("dead letter writer poisoned".into()))?;
        if writer.is_none() {
            // Appended, never truncated: a restarted job keeps the letters of the runs
            // before it (their offsets are behind its checkpoint and not read again).
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(&self.path, e))?;
            *writer = Some(BufWriter::new(file));
        }
        if let Some(w) = writer.as_mut() {
            writeln!(w, "{line}").map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }

    fn count(&self) -> u64 {
        self.memory.count()
    }

    fn flush(&self) -> Result<()> {
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| Error::Internal("dead letter writer poisoned".into()))?;
        if let Some(w) = writer.as_mut() {
            w.flush().map_err(|e| Error::io(&self.path, e))?;
            w.get_ref()
                .sync_all()
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(i: u64) -> DeadLetter {
        DeadLetter {
            location: format!("f line {i}"),
            reason: "bad".into(),
            raw: Some("x,y".into()),
        }
    }

    #[test]
    fn memory_sink_counts_all_keeps_first() {
        let sink = MemoryDeadLetters::new(2);
        for i in 0..5 {
            sink.send(letter(i)).unwrap();
        }
        assert_eq!(sink.count(), 5);
        assert_eq!(sink.kept(), vec![letter(0), letter(1)]);
    }

    #[test]
    fn jsonl_sink_writes_one_line_per_letter_and_nothing_when_clean() {
        let dir = std::env::temp_dir().join(format!("tidepool-dl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dead.jsonl");
        let _ = std::fs::remove_file(&path);
        let sink = JsonlDeadLetters::new(&path);
        sink.flush().unwrap();
        assert!(!path.exists(), "a clean run leaves no file");
        sink.send(letter(1)).unwrap();
        sink.send(letter(2)).unwrap();
        sink.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            r#"{"location":"f line 1","reason":"bad","raw":"x,y"}"#
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
