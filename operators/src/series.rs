//! Per-window series the learner adds to on every event: quality counters and ensemble
//! weight traces by metrics window.
//!
//! Events come in event-time order, so a new window is nearly always after every window
//! so far. A sorted vector appends it without an allocator call once its capacity is
//! there; a `BTreeMap` allocated a node every few windows, which on a generated stream
//! of 1 M events was a quarter of the default's steady-state allocator calls. Windows
//! that arrive out of order (late events) are inserted in place.

use std::collections::BTreeMap;

/// Windows a series makes room for up front: the automatic window cuts a replay into at
/// most 200.
const WINDOWS: usize = 256;

/// Where window `w` is in `entries` (sorted by window), or where it goes. The last is
/// checked first: a new window is nearly always after every other.
fn locate<V>(entries: &[(i64, V)], w: i64) -> Result<usize, usize> {
    match entries.last() {
        Some((last, _)) if *last == w => Ok(entries.len() - 1),
        Some((last, _)) if *last > w => entries.binary_search_by_key(&w, |(k, _)| *k),
        _ => Err(entries.len()),
    }
}

/// Values by window, sorted by window.
#[derive(Clone, Debug)]
pub(crate) struct Series<V> {
    entries: Vec<(i64, V)>,
}

impl<V> Default for Series<V> {
    fn default() -> Self {
        Self {
            entries: Vec::with_capacity(WINDOWS),
        }
    }
}

impl<V: Default> Series<V> {
    /// The value of window `w`, a default one if the window is new.
    #[inline]
    pub(crate) fn entry(&mut self, w: i64) -> &mut V {
        let at = locate(&self.entries, w).unwrap_or_else(|i| {
            self.entries.insert(i, (w, V::default()));
            i
        });
        &mut self.entries[at].1
    }
}

impl<V: Clone> Series<V> {
    /// The windows as a map.
    pub(crate) fn to_map(&self) -> BTreeMap<i64, V> {
        self.entries.iter().cloned().collect()
    }
}

impl<V> Series<V> {
    /// The values in window order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// The windows as a map.
    pub(crate) fn into_map(self) -> BTreeMap<i64, V> {
        self.entries.into_iter().collect()
    }
}

/// An ensemble's weights by window: learning steps and the sum of the weights after
/// each, the sums of every window in one vector.
#[derive(Clone, Debug)]
pub(crate) struct WeightTrace {
    keys: Vec<(i64, u64)>,
    sums: Vec<f64>,
    /// Weights per step (the ensemble's components); set by the first step.
    width: usize,
}

impl Default for WeightTrace {
    fn default() -> Self {
        Self {
            keys: Vec::with_capacity(WINDOWS),
            sums: Vec::new(),
            width: 0,
        }
    }
}

impl WeightTrace {
    /// Adds `steps` learning steps whose weights sum to `sums` to window `w`.
    pub(crate) fn add(&mut self, w: i64, steps: u64, sums: impl ExactSizeIterator<Item = f64>) {
        if self.keys.is_empty() {
            self.width = sums.len();
            self.sums.reserve(WINDOWS * self.width);
        }
        let width = self.width;
        let at = locate(&self.keys, w).unwrap_or_else(|i| {
            self.keys.insert(i, (w, 0));
            self.sums
                .splice(i * width..i * width, std::iter::repeat_n(0.0, width));
            i
        });
        self.keys[at].1 += steps;
        for (s, v) in self.sums[at * width..(at + 1) * width].iter_mut().zip(sums) {
            *s += v;
        }
    }

    /// Adds one learning step's weights to window `w`.
    #[inline]
    pub(crate) fn step(&mut self, w: i64, weights: &[f32]) {
        self.add(w, 1, weights.iter().map(|&v| v as f64));
    }

    /// Adds every window of `map` (another worker's or a checkpoint's trace).
    pub(crate) fn merge(&mut self, map: &BTreeMap<i64, (u64, Vec<f64>)>) {
        for (w, (steps, sums)) in map {
            self.add(*w, *steps, sums.iter().copied());
        }
    }

    /// The trace as a map from window to `(steps, sums)`.
    pub(crate) fn to_map(&self) -> BTreeMap<i64, (u64, Vec<f64>)> {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, &(w, steps))| {
                let sums = self.sums[i * self.width..(i + 1) * self.width].to_vec();
                (w, (steps, sums))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_in_any_order_end_up_sorted_and_summed() {
        let mut s: Series<u64> = Series::default();
        for w in [3, 3, 5, 1, 5, 4, 9, 1] {
            *s.entry(w) += 1;
        }
        let map = s.to_map();
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            [(1, 2), (3, 2), (4, 1), (5, 2), (9, 1)]
        );
        assert_eq!(s.values().sum::<u64>(), 8);
    }

    #[test]
    fn appending_windows_allocates_nothing_after_the_first() {
        let mut s: Series<[u64; 8]> = Series::default();
        let before = s.entries.as_ptr();
        for w in 0..WINDOWS as i64 {
            s.entry(w)[0] += 1;
        }
        assert_eq!(s.entries.as_ptr(), before, "no reallocation");
    }

    #[test]
    fn weight_traces_match_a_map_built_step_by_step() {
        let mut t = WeightTrace::default();
        let mut expected: BTreeMap<i64, (u64, Vec<f64>)> = BTreeMap::new();
        for (w, weights) in [
            (2, [0.5, 0.5]),
            (2, [0.25, 0.75]),
            (0, [1.0, 0.0]),
            (7, [0.1, 0.9]),
        ] {
            t.step(w, &weights);
            let e = expected.entry(w).or_insert((0, vec![0.0; 2]));
            e.0 += 1;
            e.1.iter_mut()
                .zip(weights)
                .for_each(|(s, v)| *s += v as f64);
        }
        assert_eq!(t.to_map(), expected);
        let mut merged = WeightTrace::default();
        merged.merge(&expected);
        merged.merge(&expected);
        let doubled: BTreeMap<_, _> = expected
            .iter()
            .map(|(w, (n, s))| (*w, (2 * n, s.iter().map(|v| 2.0 * v).collect::<Vec<_>>())))
            .collect();
        assert_eq!(merged.to_map(), doubled);
    }
}
