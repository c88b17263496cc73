//! Helpers shared by the binary's test files.
// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub(crate) mod broker;
pub(crate) mod kafka_broker;

/// Writes `dir/hosts` with `n` loopback addresses on free ports, for a test cluster that
/// must not collide with other tests (or timely's default ports).
///
/// The ports come from below the kernel's ephemeral range (32768 and up on Linux) and
/// from one counter per test process. A port from the ephemeral range (what binding port
/// 0 gives) is unsafe twice over: a test running in parallel can be handed the same port
/// once it is released, so one test's process joins another test's cluster; and a process
/// that keeps retrying a connection to a port nobody listens on yet can be given that very
/// port as its source port, and TCP then connects the socket to itself. A CI run failed
/// with a process of one test joining the cluster of another.
pub(crate) fn loopback_hostfile(dir: &Path, n: usize) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const HIGH: u32 = 32_000;
    // Test binaries run one after another, but a second checkout's tests may run beside
    // these: each process starts at its own place in the range.
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 240 * 50;
    // Held together until all are chosen, and checked free by binding them; released
    // before the cluster binds them.
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..(HIGH - LOW) {
        if listeners.len() == n {
            break;
        }
        let k = TAKEN.fetch_add(1, Ordering::SeqCst);
        let port = (LOW + (start + k) % (HIGH - LOW)) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    assert_eq!(listeners.len(), n, "no free loopback ports below {HIGH}");
    let hosts: String = listeners
        .iter()
        .map(|l| format!("{}\n", l.local_addr().expect("addr")))
        .collect();
    drop(listeners);
    let path = dir.join("hosts");
    std::fs::write(&path, hosts).expect("hostfile");
    path
}

/// Sends SIGTERM to `child`.
pub(crate) fn sigterm(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM failed");
}
