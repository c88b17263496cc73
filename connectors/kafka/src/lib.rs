//! tidepool's Kafka connector (rdkafka, librdkafka bundled).
//!
//! - [`KafkaSource`]: a topic as an [`EventSource`](tidepool_pipeline::EventSource), JSON
//!   payloads mapped by [`JsonMapping`], bad records to the dead letters.
//! - [`produce`]: loads events into a topic (for demos, tests and load).
//! - [`Embedded`]: an in-process cluster (librdkafka's mock cluster, which speaks the real
//!   protocol on a loopback port), for `--brokers embedded` and the tests.
//! - [`KafkaSettings`]: brokers, topic, group and librdkafka settings passed through
//!   (`[kafka.config]`), so SASL/SSL work as in any librdkafka client; their `Debug`
//!   output redacts secrets.

#![deny(missing_docs)]

mod embedded;
mod json;
mod produce;
mod source;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tidepool_pipeline::{Error, Result};

pub use embedded::Embedded;
pub use json::{encode, Decoded, JsonMapping, TimeUnit, DEFAULT_MAX_BYTES};
pub use produce::{produce, KafkaDeadLetters, KafkaDeltaSink, ProduceReport, Producer};
pub use source::{consume_baseline, KafkaCounters, KafkaSource, Rewind, StopAt};

/// Where to connect and how.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// Consumer group (offsets are committed there for monitoring).
    pub group: String,
    /// librdkafka settings passed through unchanged.
    pub config: BTreeMap<String, String>,
}

/// Setting names whose values never appear in logs or `Debug` output.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "ssl.key",
        "sasl.oauthbearer.config",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config: BTreeMap<&str, &str> = self
            .config
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("config", &config)
            .finish()
    }
}

impl KafkaSettings {
    /// A librdkafka configuration with the brokers and the pass-through settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.config {
            c.set(k, v);
        }
        c
    }

    /// The topic's partitions, in order; an error when the topic does not exist.
    pub fn partitions(&self) -> Result<Vec<i32>> {
        let consumer: BaseConsumer = self
            .client_config()
            .create()
            .map_err(|e| source::kafka_error("creating a metadata client", e))?;
        let metadata = source::patiently(&format!("reading metadata of {}", self.topic), || {
            consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(10))
        })?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| Error::Config(format!("topic {:?} does not exist", self.topic)))?;
        if let Some(e) = topic.error() {
            return Err(Error::Config(format!(
                "topic {:?} is not available: {:?}",
                self.topic, e
            )));
        }
        let mut parts: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        parts.sort_unstable();
        if parts.is_empty() {
            return Err(Error::Config(format!(
                "topic {:?} has no partitions",
                self.topic
            )));
        }
        Ok(parts)
    }
}

/// Commits `positions` (next offset per partition) to the settings' consumer group, for
/// monitoring tools that read consumer lag.
pub fn commit_offsets(settings: &KafkaSettings, positions: &BTreeMap<i32, i64>) -> Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| source::kafka_error("creating a committer", e))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, o) in positions {
        tpl.add_partition_offset(&settings.topic, *p, rdkafka::Offset::Offset(*o))
            .map_err(|e| source::kafka_error("committing offsets", e))?;
    }
    consumer
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .map_err(|e| source::kafka_error("committing offsets", e))
}

/// Every message of a topic, from the beginning to the end offsets it has now, as
/// `(key, payload)`: for tools and tests that inspect a small topic (model deltas).
pub fn read_topic(settings: &KafkaSettings) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rdkafka::message::Message;
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "tidepool-read-topic")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| source::kafka_error("creating a reader", e))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut end = BTreeMap::new();
    for p in settings.partitions()? {
        let (low, high) = consumer
            .fetch_watermarks(&settings.topic, p, Duration::from_secs(10))
            .map_err(|e| source::kafka_error("reading offsets", e))?;
        if high > low {
            end.insert(p, high);
            tpl.add_partition_offset(&settings.topic, p, rdkafka::Offset::Offset(low))
                .map_err(|e| source::kafka_error("assigning", e))?;
        }
    }
    consumer
        .assign(&tpl)
        .map_err(|e| source::kafka_error("assigning", e))?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !end.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(Error::connector("kafka: reading a topic", "timed out"));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push((
                    m.key().unwrap_or_default().to_vec(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
                if end
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    end.remove(&m.partition());
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka read error; retrying"),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let s = KafkaSettings {
            brokers: "b:9092".into(),
            topic: "t".into(),
            group: "g".into(),
            config: [
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
            ]
            .into_iter()
            .collect(),
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(shown.contains("SASL_SSL"));
    }
}
