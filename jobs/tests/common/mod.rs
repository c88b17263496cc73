//! Helpers shared by the binary's test files.
// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub(crate) mod broker;
pub(crate) mod kafka_broker;

/// Writes `dir/hosts` with `n` loopback addresses on free ports, for a test cluster that
/// must not collide with other tests (or timely's default ports).
pub(crate) fn loopback_hostfile(dir: &Path, n: usize) -> PathBuf {
    // Held together so that the ports differ; released before the cluster binds them.
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
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
