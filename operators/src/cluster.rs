//! Running one job as a timely cluster of several processes: the cluster's shape, its
//! host file, and how the item tables stay in step between processes.
//!
//! ## What is partitioned and what is replicated
//!
//! Workers are numbered globally (`process * workers + local`), and everything that is
//! partitioned by worker is partitioned over the whole cluster: users (a user's history
//! and embedding live on the worker `owner(user, peers)`), Kafka partitions and Parquet
//! row groups. The event stream is broadcast to every worker of every process, exactly as
//! within one process, so each worker keeps the same replay order, catalogue and
//! popularity counts: models without learned item state (`mostpop`) give the same
//! numbers on any cluster shape.
//!
//! ## Item rows between processes
//!
//! Within a process the item table is shared memory, updated Hogwild!-style (see
//! `item_table`). Between processes there is no shared memory, so each process
//! holds a replica and the replicas exchange *changes*: every store a worker makes is
//! also summed, per item, into a change log (the new row minus the row it replaced,
//! Adagrad accumulators included, which are sums and therefore add up too). After each
//! round a worker sends its log to the other processes; item `i`'s changes go to the
//! worker `i % workers` of each other process, which adds them to its replica. The
//! changes travel on a timely feedback edge that advances their time by one round, so the
//! learner's side input frontier makes round `t + 1` wait until every process has sent
//! its round-`t` changes: a replica is at most one round behind the others (bounded
//! staleness), and additive deltas mean no process's update overwrites another's. This is
//! the parameter-averaging-free variant of asynchronous SGD ("delta accumulation"); what
//! differs from one process is only the order in which concurrent updates land, which is
//! why a cluster's BPR metrics match one process's within a tolerance rather than
//! exactly.
//!
//! ## One job
//!
//! Timely connects whatever processes share a host file. Before the main dataflow, the
//! processes exchange a fingerprint of their job ([`job_fingerprint`]) on a dataflow of
//! its own and refuse to run together if any differs ([`check_same_job`]).
//!
//! ## Checkpoints
//!
//! Every process writes its workers' parts into one shared directory; the steps run
//! across processes over the coordination dataflow (`operators/src/coord.rs`). Because a round's
//! changes reach the other replicas one round later, the cut lies one round past the
//! newest input time: that round has no events, only the last changes, so at the cut
//! every replica is whole and global worker 0 writes process 0's.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tidepool_pipeline::{Error, Result};

/// First port of the default loopback addresses (timely's own default).
pub const DEFAULT_BASE_PORT: u16 = 2101;

/// How long a process waits for the others by default.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Ends the process if the cluster has not connected within `timeout`: timely's
/// connection set-up retries forever and cannot be interrupted, and a process waiting
/// for a peer that never comes (crashed, wrong hostfile) should fail visibly instead.
pub(crate) fn connect_watchdog(
    cluster: &Cluster,
    connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let (timeout, process, addresses) = (
        cluster.connect_timeout,
        cluster.process,
        cluster.addresses.join(", "),
    );
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while started.elapsed() < timeout {
            if connected.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !connected.load(std::sync::atomic::Ordering::Acquire) {
            eprintln!(
                "error: process {process} could not connect to the whole cluster ({addresses}) within {timeout:?}; is every process started with the same hostfile?"
            );
            std::process::exit(3);
        }
    });
}

/// Exit status of a process that lost a peer.
pub const EXIT_PEER_LOST: i32 = 4;

/// Ends the process with a clear message (status [`EXIT_PEER_LOST`]) when timely loses
/// the connection to another process. Timely's network threads panic then, and its
/// workers follow with panics of their own: the cluster cannot go on (timely has no way
/// to re-join a peer), and a screen of backtraces would hide why. Checkpoints are
/// complete or absent whatever moment this happens at, so restarting every process
/// resumes from the last one.
pub(crate) fn exit_when_a_peer_is_lost(process: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if payload.contains("timely communication error") || payload.contains("MergeQueue poisoned")
        {
            eprintln!(
                "error: process {process} lost its connection to another process of the cluster ({payload});                  the cluster cannot go on without it. Restart every process: a checkpointed job resumes from its last checkpoint."
            );
            std::process::exit(EXIT_PEER_LOST);
        }
        previous(info);
    }));
}

/// This process's place in a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Number of processes.
    pub processes: usize,
    /// This process's index, `0..processes`.
    pub process: usize,
    /// `host:port` of every process, in process order.
    pub addresses: Vec<String>,
    /// How long to wait for every process to connect before giving up.
    pub connect_timeout: std::time::Duration,
}

impl Cluster {
    /// A cluster of `processes` processes; `hostfile` lists one `host:port` per line
    /// (blank lines and `#` comments ignored), and without one every process listens on
    /// loopback at `DEFAULT_BASE_PORT + index`.
    pub fn new(processes: usize, process: usize, hostfile: Option<&Path>) -> Result<Self> {
        if processes == 0 {
            return Err(Error::Config("--processes must be at least 1".into()));
        }
        if process >= processes {
            return Err(Error::Config(format!(
                "--process {process} is out of range: a cluster of {processes} processes has indices 0..={}",
                processes - 1
            )));
        }
        let addresses = match hostfile {
            Some(path) => read_hostfile(path, processes)?,
            None => (0..processes)
                .map(|i| format!("127.0.0.1:{}", DEFAULT_BASE_PORT as usize + i))
                .collect(),
        };
        if let Some(range) = ephemeral_ports() {
            let risky = in_port_range(&addresses, range);
            if !risky.is_empty() {
                tracing::warn!(
                    addresses = %risky.join(", "),
                    "these cluster ports lie in the kernel's ephemeral range ({}-{}, /proc/sys/net/ipv4/ip_local_port_range): an outgoing connection may take one before its process binds it, and on one machine a process retrying a peer's port can be given that port and connect to itself; ports below {} avoid both",
                    range.0,
                    range.1,
                    range.0
                );
            }
        }
        Ok(Self {
            processes,
            process,
            addresses,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        })
    }
}

/// The ports the kernel hands out for outgoing connections and for binding port 0
/// (Linux); `None` where that is not known.
fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Some((lo, hi)),
        _ => None,
    }
}

/// The `host:port` addresses whose port lies in `lo..=hi`.
fn in_port_range(addresses: &[String], (lo, hi): (u16, u16)) -> Vec<String> {
    addresses
        .iter()
        .filter(|a| {
            a.rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_some_and(|port| (lo..=hi).contains(&port))
        })
        .cloned()
        .collect()
}

fn read_hostfile(path: &Path, processes: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut addresses = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let valid = line
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(Error::Config(format!(
                "{}:{}: expected host:port, found {line:?}",
                path.display(),
                n + 1
            )));
        }
        addresses.push(line.to_string());
    }
    if addresses.len() < processes {
        return Err(Error::Config(format!(
            "{} lists {} address(es) but the cluster has {processes} processes",
            path.display(),
            addresses.len()
        )));
    }
    addresses.truncate(processes);
    Ok(addresses)
}

/// Where a worker's item-row changes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Replication {
    pub(crate) process: usize,
    pub(crate) processes: usize,
    /// Workers per process.
    pub(crate) workers: usize,
}

impl Replication {
    /// The worker of each *other* process that applies `item`'s changes.
    pub(crate) fn targets(self, item: u32) -> impl Iterator<Item = usize> {
        let local = item as usize % self.workers;
        (0..self.processes)
            .filter(move |&p| p != self.process)
            .map(move |p| p * self.workers + local)
    }
}

/// Item-row changes of one variant for one worker: `values` holds `stride` values per
/// item in `items` order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RowBatch {
    pub(crate) target: u64,
    pub(crate) variant: u32,
    pub(crate) items: Vec<u32>,
    pub(crate) values: Vec<f32>,
}

/// What every process of a cluster must agree on, as JSON text: the job's configuration
/// with the round width actually used (`tick_ms`, derived from the source when not set),
/// without `gc`, whose limits may follow each host's memory.
pub(crate) fn job_fingerprint(config: &crate::config::BacktestConfig, tick_ms: i64) -> String {
    let mut job = serde_json::to_value(config).unwrap_or_default();
    if let Some(fields) = job.as_object_mut() {
        fields.remove("gc");
        fields.insert("tick_ms".into(), tick_ms.into());
    }
    job.to_string()
}

/// Checks every process's fingerprint (`(process, fingerprint)`, see
/// [`job_fingerprint`]) against the lowest-numbered process's, naming the settings that
/// differ. Timely connects any processes that share a host file, so a process started
/// with another job's settings (or one of another job that happened to get the same
/// ports) would otherwise train as part of this cluster on a different plan.
pub(crate) fn check_same_job(prints: &[(usize, String)]) -> Result<()> {
    let Some((first, reference)) = prints.iter().min_by_key(|(p, _)| *p) else {
        return Ok(());
    };
    let Some((process, print)) = prints
        .iter()
        .filter(|(_, f)| f != reference)
        .min_by_key(|(p, _)| *p)
    else {
        return Ok(());
    };
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let (expected, got) = (parse(reference), parse(print));
    let keys: Vec<&str> = match (expected.as_object(), got.as_object()) {
        (Some(e), Some(g)) => e
            .keys()
            .chain(g.keys().filter(|k| !e.contains_key(*k)))
            .filter(|k| e.get(*k) != g.get(*k))
            .map(String::as_str)
            .collect(),
        _ => Vec::new(),
    };
    let hint = if keys.contains(&"tick_ms") {
        " (tick_ms follows the source's time span and size: do they read the same data?)"
    } else {
        ""
    };
    Err(Error::Config(format!(
        "process {process} runs a different job than process {first}: {} differ{hint}; every process of a cluster must run the same configuration (only [gc] may differ between hosts)",
        keys.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_of_one_job_agree_and_others_are_named() {
        let config = crate::config::BacktestConfig::default();
        let same = job_fingerprint(&config, 1000);
        assert_eq!(
            check_same_job(&[(1, same.clone()), (0, same.clone())]).ok(),
            Some(())
        );

        // Memory limits may differ per host.
        let mut other_gc = config.clone();
        other_gc.gc.gc_percent = Some(25);
        let gc = job_fingerprint(&other_gc, 1000);
        assert_eq!(gc, same);

        let mut seeded = config.clone();
        seeded.seed += 1;
        let err = check_same_job(&[
            (0, same.clone()),
            (1, same.clone()),
            (2, job_fingerprint(&seeded, 2000)),
        ])
        .expect_err("another seed and tick");
        let text = err.to_string();
        assert!(
            text.contains("process 2 runs a different job than process 0: seed, tick_ms differ"),
            "{text}"
        );
        assert!(text.contains("do they read the same data?"), "{text}");
    }

    #[test]
    fn ports_in_the_ephemeral_range_are_found() {
        let addresses: Vec<String> = ["10.0.0.1:2101", "127.0.0.1:40000", "[::1]:60999", "h:61000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            in_port_range(&addresses, (32768, 60999)),
            vec!["127.0.0.1:40000".to_string(), "[::1]:60999".to_string()]
        );
        assert!(in_port_range(&addresses[..1], (32768, 60999)).is_empty());
    }

    #[test]
    fn hostfile_is_read_with_comments_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hosts");
        std::fs::write(
            &path,
            "# cluster\n10.0.0.1:2101\n\n10.0.0.2:2101 # second\n",
        )
        .expect("write");
        let c = Cluster::new(2, 1, Some(&path)).expect("valid");
        assert_eq!(c.addresses, ["10.0.0.1:2101", "10.0.0.2:2101"]);
        let err = Cluster::new(3, 0, Some(&path)).expect_err("too few");
        assert!(err.to_string().contains("lists 2 address(es)"), "{err}");
        std::fs::write(&path, "10.0.0.1\n").expect("write");
        let err = Cluster::new(1, 0, Some(&path)).expect_err("no port");
        assert!(err.to_string().contains(":1: expected host:port"), "{err}");
        let err = Cluster::new(2, 2, None).expect_err("index");
        assert!(err.to_string().contains("out of range"), "{err}");
        assert_eq!(
            Cluster::new(2, 0, None).expect("default").addresses,
            ["127.0.0.1:2101", "127.0.0.1:2102"]
        );
    }

    #[test]
    fn changes_go_to_one_worker_of_every_other_process() {
        let r = Replication {
            process: 1,
            processes: 3,
            workers: 2,
        };
        assert_eq!(r.targets(5).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(r.targets(4).collect::<Vec<_>>(), [0, 4]);
    }
}
