//! A real Apache Kafka broker for the tests: one KRaft node (broker and controller in one
//! JVM) on free loopback ports, from the jars `scripts/setup` fetches with Maven into
//! `$TIDEPOOL_KAFKA_JARS` (default `~/.cache/tidepool-kafka/jars`). The log directory is
//! formatted with `kafka.tools.StorageTool`, the broker is `kafka.Kafka`, as Apache
//! Kafka's own harnesses start one. It can be killed (`kill -9`) and restarted on the
//! same log directory, and it is stopped and its directory removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Where `scripts/setup` puts the broker's jars.
pub(crate) fn jars_dir() -> PathBuf {
    std::env::var_os("TIDEPOOL_KAFKA_JARS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            home.join(".cache/tidepool-kafka/jars")
        })
}

pub(crate) struct KafkaBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn java(jars: &Path) -> Command {
    let mut cmd = Command::new("java");
    cmd.arg("-cp").arg(format!("{}/*", jars.display()));
    cmd
}

impl KafkaBroker {
    /// Formats a log directory and starts the broker; returns once it answers metadata.
    pub(crate) fn start() -> Self {
        let jars = jars_dir();
        let has_broker = std::fs::read_dir(&jars).is_ok_and(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("kafka_2.13-"))
        });
        assert!(
            has_broker,
            "no Apache Kafka broker jars in {}: run scripts/setup (it fetches them with Maven), \
             or set TIDEPOOL_KAFKA_JARS",
            jars.display()
        );
        let dir = tempfile::tempdir().expect("a broker directory");
        let (port, controller) = (free_port(), free_port());
        let logs = dir.path().join("logs");
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={}\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             num.partitions=1\n",
            logs.display()
        );
        std::fs::write(dir.path().join("server.properties"), props).expect("server.properties");
        // A cluster id is 16 bytes in URL-safe base64 without padding: 22 characters.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut x = (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ u64::from(port);
        let id: String = (0..22)
            .map(|_| {
                // SplitMix64 steps: any 22 characters of the alphabet are a valid id.
                x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                alphabet[((z ^ (z >> 31)) >> 58) as usize] as char
            })
            .collect();
        let out = java(&jars)
            // `=`: an id may start with '-', which would read as an option.
            .args(["kafka.tools.StorageTool", "format"])
            .arg(format!("--cluster-id={id}"))
            .arg("-c")
            .arg(dir.path().join("server.properties"))
            .output()
            .expect("java runs kafka.tools.StorageTool");
        assert!(
            out.status.success(),
            "formatting the broker's log directory: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut broker = Self {
            child: None,
            dir,
            port,
        };
        broker.restart();
        broker
    }

    /// `host:port` of the broker's listener.
    pub(crate) fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process on the existing log directory and waits for metadata.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let log = std::fs::File::create(self.dir.path().join("broker.log")).expect("broker log");
        let child = java(&jars_dir())
            // Published harnesses pin the heap (KAFKA-19890); half a GiB is plenty here.
            .args([
                "-Xms512m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
            ])
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("java runs kafka.Kafka");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("a metadata client");
        loop {
            if consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok_and(|m| !m.brokers().is_empty())
            {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the Kafka broker exited ({status}) while starting: {}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not answer metadata at {} within 90 s: {}",
                self.bootstrap(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("Apache Kafka broker at {}", self.bootstrap());
    }

    /// `kill -9` of the broker; its log directory stays for [`KafkaBroker::restart`].
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn admin(&self) -> (AdminClient<DefaultClientContext>, tokio::runtime::Runtime) {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("an admin client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the admin calls");
        (admin, rt)
    }

    /// Creates a topic (replication 1) with topic-level `config`, and waits until its
    /// metadata shows every partition with a leader.
    pub(crate) fn create_topic_with(&self, topic: &str, partitions: i32, config: &[(&str, &str)]) {
        let (admin, rt) = self.admin();
        let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            new = new.set(k, v);
        }
        let results = rt
            .block_on(admin.create_topics([&new], &AdminOptions::new()))
            .expect("CreateTopics answers");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
        self.wait_for_partitions(topic, partitions);
    }

    /// Deletes a topic and creates it anew (empty, offsets from 0), retrying while the
    /// broker still finishes the deletion.
    pub(crate) fn recreate_topic(&self, topic: &str, partitions: i32) {
        let (admin, rt) = self.admin();
        let results = rt
            .block_on(admin.delete_topics(&[topic], &AdminOptions::new()))
            .expect("DeleteTopics answers");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("deleting topic {t}: {e}"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
            let created = rt
                .block_on(admin.create_topics([&new], &AdminOptions::new()))
                .expect("CreateTopics answers");
            if created.iter().all(Result::is_ok) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} not recreated: {created:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.wait_for_partitions(topic, partitions);
    }

    /// Deletes a partition's records before `offset`, as retention does to its head.
    pub(crate) fn delete_records_before(&self, topic: &str, partition: i32, offset: i64) {
        let (admin, rt) = self.admin();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))
            .expect("a partition offset");
        let result = rt
            .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
            .expect("DeleteRecords answers");
        for e in result.elements() {
            if let Err(err) = e.error() {
                panic!("deleting records of {topic}/{partition}: {err}");
            }
        }
    }

    /// Grows a topic to `partitions` partitions.
    pub(crate) fn add_partitions(&self, topic: &str, partitions: usize) {
        let (admin, rt) = self.admin();
        let results = rt
            .block_on(admin.create_partitions(
                [&NewPartitions::new(topic, partitions)],
                &AdminOptions::new(),
            ))
            .expect("CreatePartitions answers");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("adding partitions to {t}: {e}"));
        }
        self.wait_for_partitions(topic, partitions as i32);
    }

    fn wait_for_partitions(&self, topic: &str, partitions: i32) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("a metadata client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(2))
                .is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == topic
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "topic {topic} has no leaders after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
