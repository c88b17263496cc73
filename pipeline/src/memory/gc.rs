//! The heap-ratio trigger that decides when streaming state is compacted: Go's GOGC, for
//! streaming state.
//!
//! Pure logic: given the live heap, the time, the trigger's own memory of past cycles and
//! the configuration, [`GcState::decide`] says whether a cycle should run now, why, and
//! what the goal was. Measuring the heap and compacting state are other modules' work.
//!
//! ## Rules
//!
//! - **Ratio**: compact when `heap_live >= heap_marked * (1 + gc_percent / 100)`, where
//!   `heap_marked` is the live heap right after the last cycle. `gc_percent = None` (`off`)
//!   disables this rule.
//! - **Floor**: the ratio goal is never below `min_heap`, so small heaps do not thrash.
//! - **Soft limit**: with `memory_limit` set, the goal is `min(ratio goal, limit -
//!   headroom)`, so cycles come earlier as the heap approaches the limit; a cycle caused by
//!   the limit rather than the ratio is reported as `limit`.
//! - **Death-spiral guard**: when more than `max_gc_fraction` of the recent wall time went
//!   to compaction, a limit-triggered cycle is skipped and reported as throttled (the
//!   caller warns) instead of compacting back to back.
//! - **Forced**: a cycle when none ran for `force_interval`, also while input is idle.
//! - **Manual**: a requested cycle runs at the next decision, whatever the heap.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default value for [`GcConfig::gc_percent`].
pub const DEFAULT_GC_PERCENT: u32 = 100;
/// Default value for [`GcConfig::min_heap`]: 64 MiB.
pub const DEFAULT_MIN_HEAP: u64 = 64 << 20;
/// Default value for [`GcConfig::force_interval_ms`]: 2 minutes.
pub const DEFAULT_FORCE_INTERVAL_MS: u64 = 120_000;
/// Default value for [`GcConfig::limit_headroom`]: 5 % of the limit.
pub const DEFAULT_LIMIT_HEADROOM: f64 = 0.05;
/// Default value for [`GcConfig::max_gc_fraction`].
pub const DEFAULT_MAX_GC_FRACTION: f64 = 0.5;
/// Default value for [`GcConfig::fraction_window_ms`]: 10 seconds.
pub const DEFAULT_FRACTION_WINDOW_MS: u64 = 10_000;

/// `[gc]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GcConfig {
    /// Heap growth over the last marked heap, in percent, that triggers a cycle; `None`
    /// turns the ratio rule off.
    pub gc_percent: Option<u32>,
    /// No ratio-triggered cycle below this heap size (bytes).
    pub min_heap: u64,
    /// Soft memory limit (bytes); `None` for no limit.
    pub memory_limit: Option<u64>,
    /// Share of the limit kept free: the limit goal is `limit * (1 - headroom)`.
    pub limit_headroom: f64,
    /// A cycle runs when none ran for this long (ms).
    pub force_interval_ms: u64,
    /// Most of the recent wall time that compaction may take before limit cycles are
    /// throttled.
    pub max_gc_fraction: f64,
    /// The window over which that share is measured (ms).
    pub fraction_window_ms: u64,
    /// Print one line per cycle on stderr.
    pub trace: bool,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            gc_percent: Some(DEFAULT_GC_PERCENT),
            min_heap: DEFAULT_MIN_HEAP,
            memory_limit: None,
            limit_headroom: DEFAULT_LIMIT_HEADROOM,
            force_interval_ms: DEFAULT_FORCE_INTERVAL_MS,
            max_gc_fraction: DEFAULT_MAX_GC_FRACTION,
            fraction_window_ms: DEFAULT_FRACTION_WINDOW_MS,
            trace: false,
        }
    }
}

/// Parses `off` or a whole percentage, as `TIDEPOOL_GC` takes it.
pub fn parse_gc_percent(s: &str) -> Result<Option<u32>> {
    match s.trim() {
        "off" => Ok(None),
        n => n.parse().map(Some).map_err(|_| {
            Error::Config(format!(
                "gc percent {s:?} must be off or a whole number, e.g. 100"
            ))
        }),
    }
}

/// Parses `2GiB`, `512MiB`, `64KiB`, `10MB`, `1048576` into bytes.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| Error::Config(format!("{s:?} is not a size (examples: 512MiB, 2GiB)")))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => {
            return Err(Error::Config(format!(
                "unknown size unit {other:?} in {s:?}; valid: B, KiB, MiB, GiB, TiB, KB, MB, GB"
            )))
        }
    };
    Ok((n * scale) as u64)
}

impl GcConfig {
    /// Applies `TIDEPOOL_GC=off|N`, `TIDEPOOL_MEMORY_LIMIT=SIZE` and `TIDEPOOL_GCTRACE=1`
    /// from `env` (a lookup, so tests need not touch the process environment).
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        if let Some(v) = env("TIDEPOOL_GC") {
            self.gc_percent =
                parse_gc_percent(&v).map_err(|e| Error::Config(format!("TIDEPOOL_GC: {e}")))?;
        }
        if let Some(v) = env("TIDEPOOL_MEMORY_LIMIT") {
            self.memory_limit = Some(
                parse_bytes(&v)
                    .map_err(|e| Error::Config(format!("TIDEPOOL_MEMORY_LIMIT: {e}")))?,
            );
        }
        if let Some(v) = env("TIDEPOOL_GCTRACE") {
            self.trace = v.trim() == "1";
        }
        Ok(self)
    }
}

/// Why a cycle runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// The heap grew by `gc_percent` over the last marked heap.
    Ratio,
    /// The heap reached the soft limit's goal before the ratio goal.
    Limit,
    /// No cycle ran for `force_interval`.
    Forced,
    /// Someone asked (API, admin endpoint, signal).
    Manual,
}

impl TriggerKind {
    /// The lowercase name used in traces and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TriggerKind::Ratio => "ratio",
            TriggerKind::Limit => "limit",
            TriggerKind::Forced => "forced",
            TriggerKind::Manual => "manual",
        }
    }
}

/// The outcome of one decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Run a cycle now, for this reason.
    pub trigger: Option<TriggerKind>,
    /// The heap size at which the next heap-driven cycle is due (`u64::MAX` for never).
    pub goal: u64,
    /// A limit cycle was due but skipped by the death-spiral guard.
    pub throttled: bool,
}

/// What the trigger remembers between decisions.
#[derive(Clone, Debug, Default)]
pub struct GcState {
    heap_marked: u64,
    last_cycle_ms: u64,
    manual: bool,
    /// `(end ms, pause ms)` of recent cycles, for the death-spiral guard.
    pauses: VecDeque<(u64, u64)>,
}

impl GcState {
    /// A trigger that starts at `now_ms` with nothing marked yet.
    pub fn new(now_ms: u64) -> Self {
        Self {
            last_cycle_ms: now_ms,
            ..Self::default()
        }
    }

    /// The live heap right after the last cycle.
    pub fn heap_marked(&self) -> u64 {
        self.heap_marked
    }

    /// Asks for a cycle at the next decision.
    pub fn request(&mut self) {
        self.manual = true;
    }

    /// The heap goal for the current marked heap: `(goal, kind of the binding rule)`.
    pub fn goal(&self, cfg: &GcConfig) -> (u64, TriggerKind) {
        let ratio = cfg.gc_percent.map_or(u64::MAX, |p| {
            let grown =
                (self.heap_marked as f64 * (1.0 + p as f64 / 100.0)).min(u64::MAX as f64) as u64;
            grown.max(cfg.min_heap)
        });
        let limit = cfg.memory_limit.map_or(u64::MAX, |l| {
            (l as f64 * (1.0 - cfg.limit_headroom.clamp(0.0, 1.0))) as u64
        });
        if limit < ratio {
            (limit, TriggerKind::Limit)
        } else {
            (ratio, TriggerKind::Ratio)
        }
    }

    /// Share of the last `fraction_window_ms` spent in cycles.
    pub fn gc_fraction(&self, now_ms: u64, cfg: &GcConfig) -> f64 {
        let window = cfg.fraction_window_ms.max(1);
        let since = now_ms.saturating_sub(window);
        let busy: u64 = self
            .pauses
            .iter()
            .filter(|(end, _)| *end > since)
            .map(|(_, pause)| *pause)
            .sum();
        busy as f64 / window as f64
    }

    /// Decides whether a cycle runs now.
    pub fn decide(&self, heap_live: u64, now_ms: u64, cfg: &GcConfig) -> Decision {
        let (goal, kind) = self.goal(cfg);
        if self.manual {
            return Decision {
                trigger: Some(TriggerKind::Manual),
                goal,
                throttled: false,
            };
        }
        if heap_live >= goal {
            if kind == TriggerKind::Limit && self.gc_fraction(now_ms, cfg) > cfg.max_gc_fraction {
                return Decision {
                    trigger: None,
                    goal,
                    throttled: true,
                };
            }
            return Decision {
                trigger: Some(kind),
                goal,
                throttled: false,
            };
        }
        let forced = now_ms.saturating_sub(self.last_cycle_ms) >= cfg.force_interval_ms;
        Decision {
            trigger: forced.then_some(TriggerKind::Forced),
            goal,
            throttled: false,
        }
    }

    /// Records a finished cycle: the heap right after it becomes the marked heap.
    pub fn finished(&mut self, heap_after: u64, end_ms: u64, pause_ms: u64, cfg: &GcConfig) {
        self.heap_marked = heap_after;
        self.last_cycle_ms = end_ms;
        self.manual = false;
        self.pauses.push_back((end_ms, pause_ms));
        let since = end_ms.saturating_sub(cfg.fraction_window_ms);
        while self.pauses.front().is_some_and(|(end, _)| *end <= since) {
            self.pauses.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn cfg() -> GcConfig {
        GcConfig {
            min_heap: 64 * MIB,
            ..GcConfig::default()
        }
    }

    fn marked(heap: u64) -> GcState {
        let mut s = GcState::new(0);
        s.finished(heap, 0, 0, &cfg());
        s
    }

    #[test]
    fn trigger_table() {
        use TriggerKind::*;
        let limited = |limit: u64| GcConfig {
            memory_limit: Some(limit),
            ..cfg()
        };
        let off = GcConfig {
            gc_percent: None,
            ..cfg()
        };
        let gc50 = GcConfig {
            gc_percent: Some(50),
            ..cfg()
        };
        // (case, config, marked heap, live heap, now ms, expected trigger, expected goal)
        type Case = (
            &'static str,
            GcConfig,
            u64,
            u64,
            u64,
            Option<TriggerKind>,
            u64,
        );
        let cases: Vec<Case> = vec![
            (
                "below the ratio goal",
                cfg(),
                100 * MIB,
                199 * MIB,
                1,
                None,
                200 * MIB,
            ),
            (
                "at the ratio goal",
                cfg(),
                100 * MIB,
                200 * MIB,
                1,
                Some(Ratio),
                200 * MIB,
            ),
            (
                "gc_percent 50",
                gc50.clone(),
                100 * MIB,
                150 * MIB,
                1,
                Some(Ratio),
                150 * MIB,
            ),
            (
                "below the floor",
                cfg(),
                10 * MIB,
                63 * MIB,
                1,
                None,
                64 * MIB,
            ),
            (
                "at the floor",
                cfg(),
                10 * MIB,
                64 * MIB,
                1,
                Some(Ratio),
                64 * MIB,
            ),
            (
                "off never triggers on growth",
                off.clone(),
                100 * MIB,
                10_000 * MIB,
                1,
                None,
                u64::MAX,
            ),
            (
                "limit comes first",
                limited(1000 * MIB),
                600 * MIB,
                950 * MIB,
                1,
                Some(Limit),
                950 * MIB,
            ),
            (
                "under the limit goal",
                limited(1000 * MIB),
                600 * MIB,
                900 * MIB,
                1,
                None,
                950 * MIB,
            ),
            (
                "ratio below the limit",
                limited(1000 * MIB),
                100 * MIB,
                200 * MIB,
                1,
                Some(Ratio),
                200 * MIB,
            ),
            (
                "off with a limit still honours the limit",
                GcConfig {
                    memory_limit: Some(1000 * MIB),
                    ..off
                },
                100 * MIB,
                960 * MIB,
                1,
                Some(Limit),
                950 * MIB,
            ),
            (
                "forced after the interval",
                cfg(),
                100 * MIB,
                101 * MIB,
                120_000,
                Some(Forced),
                200 * MIB,
            ),
            (
                "not yet forced",
                cfg(),
                100 * MIB,
                101 * MIB,
                119_999,
                None,
                200 * MIB,
            ),
        ];
        for (case, config, heap_marked, live, now, trigger, goal) in cases {
            let mut state = GcState::new(0);
            state.finished(heap_marked, 0, 0, &config);
            let d = state.decide(live, now, &config);
            assert_eq!(d.trigger, trigger, "{case}");
            assert_eq!(d.goal, goal, "{case}");
            assert!(!d.throttled, "{case}");
        }
    }

    #[test]
    fn manual_runs_whatever_the_heap_and_clears() {
        let mut s = marked(100 * MIB);
        s.request();
        assert_eq!(s.decide(1, 1, &cfg()).trigger, Some(TriggerKind::Manual));
        s.finished(50 * MIB, 2, 1, &cfg());
        assert_eq!(s.decide(1, 3, &cfg()).trigger, None);
        assert_eq!(s.heap_marked(), 50 * MIB);
    }

    #[test]
    fn the_death_spiral_guard_throttles_limit_cycles() {
        let config = GcConfig {
            memory_limit: Some(1000 * MIB),
            fraction_window_ms: 10_000,
            max_gc_fraction: 0.5,
            ..cfg()
        };
        let mut s = GcState::new(0);
        // Six cycles of 1 s each within the last 10 s: 60 % of the time compacting.
        for end in [4_000, 5_000, 6_000, 7_000, 8_000, 9_000] {
            s.finished(960 * MIB, end, 1_000, &config);
        }
        assert!((s.gc_fraction(9_000, &config) - 0.6).abs() < 1e-9);
        let d = s.decide(990 * MIB, 9_001, &config);
        assert_eq!(d.trigger, None);
        assert!(d.throttled);
        // Long after, the window has emptied and limit cycles run again.
        let d = s.decide(990 * MIB, 30_000, &config);
        assert_eq!(d.trigger, Some(TriggerKind::Limit));
    }

    #[test]
    fn environment_overrides() {
        let env = |k: &str| match k {
            "TIDEPOOL_GC" => Some("off".to_string()),
            "TIDEPOOL_MEMORY_LIMIT" => Some("2GiB".to_string()),
            "TIDEPOOL_GCTRACE" => Some("1".to_string()),
            _ => None,
        };
        let c = GcConfig::default().with_env(env).unwrap();
        assert_eq!(c.gc_percent, None);
        assert_eq!(c.memory_limit, Some(2 << 30));
        assert!(c.trace);
        let c = GcConfig::default()
            .with_env(|k| (k == "TIDEPOOL_GC").then(|| "75".to_string()))
            .unwrap();
        assert_eq!(c.gc_percent, Some(75));
        let err = GcConfig::default()
            .with_env(|k| (k == "TIDEPOOL_GC").then(|| "lots".to_string()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TIDEPOOL_GC") && err.contains("off or a whole number"),
            "{err}"
        );
        assert!(parse_bytes("3 parsecs").is_err());
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
    }
}
