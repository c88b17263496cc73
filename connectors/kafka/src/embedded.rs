//! An in-process Kafka cluster: librdkafka's mock cluster, which speaks the real Kafka
//! protocol on a loopback port, so any client (this process's, another process's,
//! `kcat`) can produce to and consume from it. Used by `--brokers embedded` and the
//! tests; it keeps data in memory and lives as long as the value.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tidepool_pipeline::Result;

use crate::source::kafka_error;

/// A running in-process cluster.
pub struct Embedded {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("bootstrap", &self.bootstrap())
            .finish()
    }
}

impl Embedded {
    /// Starts a cluster of `brokers` brokers on loopback.
    pub fn start(brokers: i32) -> Result<Self> {
        let cluster = MockCluster::new(brokers)
            .map_err(|e| kafka_error("starting the embedded cluster", e))?;
        Ok(Self { cluster })
    }

    /// The `bootstrap.servers` string to give clients.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates a topic (the mock cluster does not serve the CreateTopics admin call).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(|e| kafka_error(&format!("creating topic {topic}"), e))
    }

    /// Takes broker `id` (1-based) down: its connections drop and it refuses new ones.
    pub fn broker_down(&self, id: i32) -> Result<()> {
        self.cluster
            .broker_down(id)
            .map_err(|e| kafka_error(&format!("taking broker {id} down"), e))
    }

    /// Brings broker `id` back.
    pub fn broker_up(&self, id: i32) -> Result<()> {
        self.cluster
            .broker_up(id)
            .map_err(|e| kafka_error(&format!("bringing broker {id} up"), e))
    }
}
