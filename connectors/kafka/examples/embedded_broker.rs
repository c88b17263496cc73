//! Starts an embedded cluster with topic `events` (4 partitions) holding N synthetic
//! events, prints its bootstrap address and keeps it up until killed: a broker for
//! trying `tidepool train` by hand. `cargo run -p tidepool-connector-kafka --example
//! embedded_broker -- 100000`

use tidepool_connector_kafka::{produce, Embedded, KafkaSettings};
use tidepool_pipeline::{Event, EventType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args().nth(1).map_or(Ok(100_000), |s| s.parse())?;
    let cluster = Embedded::start(1)?;
    cluster.create_topic("events", 4)?;
    let settings = KafkaSettings {
        brokers: cluster.bootstrap(),
        topic: "events".into(),
        ..KafkaSettings::default()
    };
    let events = (0..n).map(|i| Event {
        ts: 1_700_000_000_000 + i as i64 * 50,
        pos: i,
        user: (i * 7919) % 5000,
        item: (i * 31 + i / 7) % 1000,
        weight: 1.0,
        kind: EventType::View,
    });
    produce(&settings, events, None, &|_| {})?;
    println!("{}", cluster.bootstrap());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
