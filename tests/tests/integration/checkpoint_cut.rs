//! The checkpoint cut when one worker's input has closed while another still reads.

use std::sync::Arc;
use std::time::Duration;

use tidepool_operators::checkpoint::{list, read_manifest, CheckpointSettings, Checkpointer};
use tidepool_operators::{run_dataflow, BacktestConfig, LatePolicy, RunOptions};
use tidepool_pipeline::event::events_batch;
use tidepool_pipeline::memory::collector::GcController;
use tidepool_pipeline::{
    BatchOrigin, BufferPool, Event, EventReader, EventSource, EventType, MemoryDeadLetters,
    PoolConfig, SourceBatch, SourceInfo,
};

const BASE_MS: i64 = 1_700_000_000_000;

/// Worker 1 reads a few events far ahead in event time and is done at once; worker 0
/// reads many early events slowly, so periodic checkpoints happen after worker 1's
/// input has closed.
struct AheadAndBehind;

fn batch(events: &[Event], first: u64) -> tidepool_pipeline::Result<SourceBatch> {
    let records = events_batch(events, &BufferPool::new(PoolConfig::default()))?;
    Ok(SourceBatch::new(
        records,
        BatchOrigin {
            source: "test".into(),
            first_row: first,
            first_pos: first,
        },
    ))
}

fn event(i: u64, ts: i64) -> Event {
    Event {
        ts,
        pos: i,
        user: i % 97,
        item: i % 31,
        weight: 1.0,
        kind: EventType::View,
    }
}

impl EventSource for AheadAndBehind {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            description: "ahead and behind".into(),
            rows: None,
            min_ts: None,
            max_ts: None,
        }
    }

    fn open(&self, worker: usize, _workers: usize) -> tidepool_pipeline::Result<EventReader> {
        if worker == 1 {
            // Ten days ahead of everything worker 0 reads.
            let ahead: Vec<Event> = (0..100)
                .map(|i| event(1_000_000 + i, BASE_MS + 10 * 86_400_000 + i as i64))
                .collect();
            return Ok(Box::new(std::iter::once(batch(&ahead, 1_000_000))));
        }
        Ok(Box::new((0..40u64).map(|b| {
            std::thread::sleep(Duration::from_millis(10));
            let events: Vec<Event> = (0..250)
                .map(|i| {
                    let n = b * 250 + i;
                    event(n, BASE_MS + n as i64 * 1_000)
                })
                .collect();
            batch(&events, b * 250)
        })))
    }
}

#[test]
fn a_closed_input_still_bounds_the_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = BacktestConfig {
        workers: 2,
        tick_ms: Some(60_000),
        allowed_lateness_ms: 300_000,
        late: LatePolicy::Train,
        ..BacktestConfig::default()
    };
    let cp = Arc::new(
        Checkpointer::new(CheckpointSettings {
            dir: dir.path().to_path_buf(),
            interval: Some(Duration::from_millis(5)),
            keep: 10_000,
            config_hash: "test".into(),
            config: None,
            source: Default::default(),
        })
        .expect("checkpointer"),
    );
    let options = RunOptions {
        gc: Arc::new(GcController::new(config.gc.clone(), 2)),
        checkpoints: Some(Arc::clone(&cp)),
        restore: None,
        deltas: None,
        publish_every: None,
        cluster: None,
        live: None,
    };
    let report = run_dataflow(
        Arc::new(AheadAndBehind),
        &config,
        Arc::new(MemoryDeadLetters::new(0)),
        options,
        &|_| {},
    )
    .expect("run");
    assert_eq!(report.events, 10_100);
    let all = list(dir.path()).expect("list");
    assert!(all.len() >= 5, "only {} checkpoints", all.len());
    for (id, path) in all {
        let m = read_manifest(&path).expect("manifest");
        // Every row read before the cut is an event in the model, no more, no fewer:
        // worker 1's far-ahead events count as soon as it has read them.
        assert_eq!(m.events, m.rows, "checkpoint {id}: {m:?}");
    }
}
