//! The broker a Kafka test talks to, started by the test itself: a real Apache Kafka
//! broker (one KRaft node, see [`super::kafka_broker`]) by default; librdkafka's mock
//! cluster in-process for the tests that still need its fault injection
//! ([`TestBroker::start_mock`], each saying why); or, when `TIDEPOOL_TANSU` names a
//! `tansu` binary, a tansu broker process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_connector_kafka::Embedded;

use super::kafka_broker::KafkaBroker;

pub(crate) enum TestBroker {
    Kafka(KafkaBroker),
    Mock(Embedded),
    Tansu {
        child: Child,
        bin: String,
        bootstrap: String,
    },
}

impl TestBroker {
    /// librdkafka's in-process mock cluster.
    pub(crate) fn start_mock() -> Self {
        TestBroker::Mock(Embedded::start(1).expect("mock cluster"))
    }

    pub(crate) fn start() -> Self {
        let Some(bin) = std::env::var("TIDEPOOL_TANSU")
            .ok()
            .filter(|b| !b.is_empty())
        else {
            return TestBroker::Kafka(KafkaBroker::start());
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("TIDEPOOL_TANSU={bin} does not start: {e}"));
        let bootstrap = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&bootstrap).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {bootstrap}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("tansu broker at {bootstrap}");
        TestBroker::Tansu {
            child,
            bin,
            bootstrap,
        }
    }

    pub(crate) fn bootstrap(&self) -> String {
        match self {
            TestBroker::Kafka(k) => k.bootstrap(),
            TestBroker::Mock(m) => m.bootstrap(),
            TestBroker::Tansu { bootstrap, .. } => bootstrap.clone(),
        }
    }

    pub(crate) fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            TestBroker::Kafka(k) => k.create_topic_with(topic, partitions, &[]),
            TestBroker::Mock(m) => m.create_topic(topic, partitions).expect("create topic"),
            TestBroker::Tansu { bin, bootstrap, .. } => {
                let out = Command::new(bin)
                    .args(["topic", "create", topic, "--partitions"])
                    .arg(partitions.to_string())
                    .args(["--broker", &format!("tcp://{bootstrap}")])
                    .output()
                    .expect("tansu topic create runs");
                assert!(
                    out.status.success(),
                    "tansu topic create {topic}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// The broker is unreachable for `down`, then back: `kill -9` of a real broker and a
    /// restart on its log directory, or the mock cluster's broker down and up.
    pub(crate) fn outage(&mut self, down: Duration) {
        match self {
            TestBroker::Kafka(k) => {
                k.kill();
                std::thread::sleep(down);
                k.restart();
            }
            TestBroker::Mock(m) => {
                m.broker_down(1).expect("broker down");
                std::thread::sleep(down);
                m.broker_up(1).expect("broker up");
            }
            TestBroker::Tansu { .. } => panic!("outages are not supported against tansu"),
        }
    }

    /// The real broker, for what only it can do.
    pub(crate) fn kafka(&self) -> Option<&KafkaBroker> {
        match self {
            TestBroker::Kafka(k) => Some(k),
            _ => None,
        }
    }

    /// The mock cluster, for tests of what only it can do (bound a partition's size);
    /// `None` against tansu, and the test says so.
    pub(crate) fn mock(&self, test: &str) -> Option<&Embedded> {
        match self {
            TestBroker::Mock(m) => Some(m),
            TestBroker::Kafka(_) => {
                panic!("{test} needs the mock cluster: start it with TestBroker::start_mock")
            }
            TestBroker::Tansu { .. } => {
                eprintln!(
                    "NOT RUN against tansu: {test} needs the mock cluster's fault injection; it runs against the mock cluster in the main test pass"
                );
                None
            }
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let TestBroker::Tansu { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
