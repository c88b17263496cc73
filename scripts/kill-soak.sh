#!/usr/bin/env bash
# Crash-recovery soak: runs the kill -9 test (12 kills of `tidepool train` at random
# moments while the topic grows, then an exactly-once check) ROUNDS times, each with a
# new random kill schedule. Usage: scripts/kill-soak.sh [ROUNDS]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tidepool-target}"
rounds="${1:-20}"
cargo test -q -p tidepool-jobs --test kafka --no-run
for i in $(seq 1 "$rounds"); do
  echo "== round $i of $rounds"
  cargo test -q -p tidepool-jobs --test kafka kill_9_and_restart -- --nocapture 2>&1 \
    | grep -E "seed|trial|test result|panicked|left|right"
done
echo "all $rounds rounds passed"
