//! Loading events into a topic: JSON payloads keyed by user (so a user's events stay in
//! one partition, in order), optionally at a fixed rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;
use tidepool_pipeline::{Error, Event, Result};

use crate::json::encode;
use crate::source::kafka_error;
use crate::KafkaSettings;

/// What a produce run did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProduceReport {
    /// Messages acknowledged by the brokers.
    pub messages: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Counts deliveries the brokers refused after librdkafka's retries.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// A JSON event producer for one topic.
pub struct Producer {
    producer: BaseProducer<Deliveries>,
    topic: String,
    sent: u64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Producer {
    /// A producer for `settings.topic`, with idempotence on so retries after a broker
    /// hiccup do not duplicate messages.
    pub fn new(settings: &KafkaSettings) -> Result<Self> {
        let mut config = settings.client_config();
        if config.get("enable.idempotence").is_none() {
            config.set("enable.idempotence", "true");
        }
        if config.get("linger.ms").is_none() {
            config.set("linger.ms", "5");
        }
        let producer: BaseProducer<Deliveries> = config
            .create_with_context(Deliveries::default())
            .map_err(|e| kafka_error("creating a producer", e))?;
        Ok(Self {
            producer,
            topic: settings.topic.clone(),
            sent: 0,
        })
    }

    /// Queues one message, waiting while the local queue is full.
    pub fn send(&mut self, key: &[u8], payload: &[u8]) -> Result<()> {
        self.send_opt(key, Some(payload))
    }

    /// Queues a tombstone: the key without a value, which log compaction removes the
    /// key for.
    pub fn send_tombstone(&mut self, key: &[u8]) -> Result<()> {
        self.send_opt(key, None)
    }

    fn send_opt(&mut self, key: &[u8], payload: Option<&[u8]>) -> Result<()> {
        loop {
            let mut record = BaseRecord::<[u8], [u8]>::to(&self.topic).key(key);
            if let Some(payload) = payload {
                record = record.payload(payload);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(kafka_error("producing", e)),
            }
        }
    }

    /// Queues one event as JSON, keyed by its user.
    pub fn send_event(&mut self, e: &Event) -> Result<()> {
        self.send(&e.user.to_be_bytes(), &encode(e))
    }

    /// Serves delivery callbacks; call now and then while sending.
    pub fn poll(&self) {
        self.producer.poll(Duration::ZERO);
    }

    /// Waits until every queued message is acknowledged; fails if any was refused.
    pub fn flush(&mut self, timeout: Duration) -> Result<u64> {
        self.producer
            .flush(timeout)
            .map_err(|e| kafka_error("flushing the producer", e))?;
        let ctx = self.producer.context();
        let failed = ctx.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = ctx
                .first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            return Err(Error::connector(
                "kafka: producing",
                format!(
                    "{failed} of {} messages were not delivered (first: {first})",
                    self.sent
                ),
            ));
        }
        Ok(self.sent)
    }
}

/// Produces `events` to `settings.topic`, at most `rate` events per second if given,
/// calling `progress` with the count now and then. Returns when all are acknowledged.
pub fn produce(
    settings: &KafkaSettings,
    events: impl IntoIterator<Item = Event>,
    rate: Option<f64>,
    progress: &dyn Fn(u64),
) -> Result<ProduceReport> {
    let mut producer = Producer::new(settings)?;
    let started = Instant::now();
    let mut n = 0u64;
    for e in events {
        if let Some(rate) = rate.filter(|r| *r > 0.0) {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        producer.send_event(&e)?;
        n += 1;
        if n.is_multiple_of(10_000) {
            producer.poll();
            progress(n);
        }
    }
    let messages = producer.flush(Duration::from_secs(60))?;
    progress(n);
    Ok(ProduceReport {
        messages,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Model deltas to a topic: key `variant/entity/id`, value the delta as JSON (see
/// [`tidepool_pipeline::delta::ModelDelta`]); on a compacted topic the last value per key
/// is the current model. Each publication waits for the brokers' acknowledgements.
#[derive(Debug)]
pub struct KafkaDeltaSink {
    producer: Mutex<Producer>,
}

impl KafkaDeltaSink {
    /// A sink producing to `settings.topic`.
    pub fn new(settings: &KafkaSettings) -> Result<Self> {
        Ok(Self {
            producer: Mutex::new(Producer::new(settings)?),
        })
    }
}

impl tidepool_pipeline::delta::DeltaSink for KafkaDeltaSink {
    fn publish(&self, deltas: &[tidepool_pipeline::delta::ModelDelta]) -> Result<()> {
        let mut producer = self
            .producer
            .lock()
            .map_err(|_| Error::Internal("delta producer lock poisoned".into()))?;
        for d in deltas {
            if d.deleted {
                producer.send_tombstone(d.key().as_bytes())?;
                continue;
            }
            let value = serde_json::to_vec(d)
                .map_err(|e| Error::Internal(format!("encoding a delta: {e}")))?;
            producer.send(d.key().as_bytes(), &value)?;
        }
        producer.flush(Duration::from_secs(60)).map(drop)
    }
}

/// Dead letters to a topic: key the record's location (`topic/partition@offset`), value
/// the dead letter as JSON (`location`, `reason`, `raw`). Counted like every sink.
#[derive(Debug)]
pub struct KafkaDeadLetters {
    producer: Mutex<Producer>,
    count: AtomicU64,
}

impl KafkaDeadLetters {
    /// A sink producing to `settings.topic`.
    pub fn new(settings: &KafkaSettings) -> Result<Self> {
        Ok(Self {
            producer: Mutex::new(Producer::new(settings)?),
            count: AtomicU64::new(0),
        })
    }
}

impl tidepool_pipeline::DeadLetterSink for KafkaDeadLetters {
    fn send(&self, letter: tidepool_pipeline::DeadLetter) -> Result<()> {
        let value = serde_json::to_vec(&letter)
            .map_err(|e| Error::Internal(format!("encoding a dead letter: {e}")))?;
        self.producer
            .lock()
            .map_err(|_| Error::Internal("dead-letter producer lock poisoned".into()))?
            .send(letter.location.as_bytes(), &value)?;
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Result<()> {
        self.producer
            .lock()
            .map_err(|_| Error::Internal("dead-letter producer lock poisoned".into()))?
            .flush(Duration::from_secs(60))
            .map(drop)
    }
}
