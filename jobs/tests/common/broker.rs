//! The broker a Kafka test talks to, started by the test itself: librdkafka's mock
//! cluster in-process (the default), or, when `TIDEPOOL_TANSU` names a `tansu` binary, a
//! tansu broker process (a Kafka-compatible broker written in Rust, in-memory storage) on
//! a free loopback port, so the same tests run against a real broker implementation.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidepool_connector_kafka::Embedded;

pub(crate) enum TestBroker {
    Mock(Embedded),
    Tansu {
        child: Child,
        bin: String,
        bootstrap: String,
    },
}

impl TestBroker {
    pub(crate) fn start() -> Self {
        let Some(bin) = std::env::var("TIDEPOOL_TANSU")
            .ok()
            .filter(|b| !b.is_empty())
        else {
            return TestBroker::Mock(Embedded::start(1).expect("mock cluster"));
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
            TestBroker::Mock(m) => m.bootstrap(),
            TestBroker::Tansu { bootstrap, .. } => bootstrap.clone(),
        }
    }

    pub(crate) fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
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

    /// The mock cluster, for tests of what only it can do (take brokers down, bound a
    /// partition's size); `None` against tansu, and the test says so.
    pub(crate) fn mock(&self, test: &str) -> Option<&Embedded> {
        match self {
            TestBroker::Mock(m) => Some(m),
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
