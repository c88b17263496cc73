//! Events produced into the embedded cluster come back out of the source, spread over
//! workers by partition, with bad records in the dead letters.

use std::sync::Arc;

use tidepool_connector_kafka::{
    produce, Embedded, JsonMapping, KafkaSettings, KafkaSource, Producer, StopAt,
};
use tidepool_pipeline::{DeadLetterSink, Event, EventSource, EventType, MemoryDeadLetters};

fn events(n: u64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            ts: 1_000 + i as i64,
            pos: i,
            user: i % 97,
            item: i % 13,
            weight: 1.0,
            kind: EventType::Click,
        })
        .collect()
}

fn read_all(source: &KafkaSource, workers: usize) -> Vec<Event> {
    let mut all = Vec::new();
    for w in 0..workers {
        for batch in source.open(w, workers).unwrap() {
            let batch = batch.unwrap();
            let mut out = Vec::new();
            batch.decode(&mut out, &mut |_| {}).unwrap();
            all.extend(out);
        }
    }
    all
}

#[test]
fn produce_then_read_back_on_two_workers_with_dead_letters() {
    let cluster = Embedded::start(1).unwrap();
    cluster.create_topic("events", 4).unwrap();
    let settings = KafkaSettings {
        brokers: cluster.bootstrap(),
        topic: "events".into(),
        group: "test".into(),
        ..KafkaSettings::default()
    };
    let report = produce(&settings, events(5_000), None, &|_| {}).unwrap();
    assert_eq!(report.messages, 5_000);
    let mut p = Producer::new(&settings).unwrap();
    for bad in [&b"{not json"[..], br#"{"user_id":1}"#, br#"[1]"#] {
        p.send(b"k", bad).unwrap();
    }
    p.flush(std::time::Duration::from_secs(10)).unwrap();

    let dead = Arc::new(MemoryDeadLetters::new(10));
    let source = KafkaSource::new(settings, JsonMapping::default(), Arc::clone(&dead) as _)
        .unwrap()
        .stop_at(StopAt::End);
    assert_eq!(source.partitions(), &[0, 1, 2, 3]);
    let mut got = read_all(&source, 2);
    assert_eq!(got.len(), 5_000);
    got.sort_by_key(|e| e.ts);
    let want = events(5_000);
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| (a.ts, a.user, a.item, a.kind) == (b.ts, b.user, b.item, b.kind)));
    assert_eq!(dead.count(), 3);
    let letters = dead.kept();
    assert!(letters
        .iter()
        .any(|l| l.reason.contains("malformed JSON") && l.raw.as_deref() == Some("{not json")));
    assert!(
        letters.iter().all(|l| l.location.starts_with("events/")),
        "{letters:?}"
    );
    let c = source.counters();
    assert_eq!(c.messages.load(std::sync::atomic::Ordering::Relaxed), 5_003);
}

/// Several producers one after the other (as `tidepool produce` runs do): the end
/// offsets add up to the messages, and what the broker's retention deleted before it was
/// read (the mock cluster keeps a bounded log per partition) is counted as lost.
#[test]
fn successive_producers_append_every_message() {
    let cluster = Embedded::start(1).unwrap();
    cluster.create_topic("grow", 4).unwrap();
    let settings = KafkaSettings {
        brokers: cluster.bootstrap(),
        topic: "grow".into(),
        group: "test".into(),
        ..KafkaSettings::default()
    };
    for _ in 0..5 {
        assert_eq!(
            produce(&settings, events(80_000), None, &|_| {})
                .unwrap()
                .messages,
            80_000
        );
    }
    let dead = Arc::new(MemoryDeadLetters::new(10));
    let source = KafkaSource::new(settings, JsonMapping::default(), Arc::clone(&dead) as _)
        .unwrap()
        .stop_at(StopAt::End);
    let mut read = 0;
    let mut ends = std::collections::BTreeMap::new();
    for w in 0..2 {
        for batch in source.open(w, 2).unwrap() {
            let batch = batch.unwrap();
            read += batch.rows();
            ends.extend(batch.positions);
        }
    }
    assert_eq!(ends.values().sum::<i64>(), 400_000, "{ends:?}");
    let lost = source
        .counters()
        .offsets_lost
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        lost > 0,
        "the mock cluster's bounded log should have dropped some"
    );
    assert_eq!(read as u64 + lost, 400_000, "{ends:?}");
}
