//! Ranking a held-out item among the candidates: the prequential evaluator's core.
//!
//! Candidates for an event (u, i) at time t are the items seen before t minus the items u
//! interacted with before t. The rank of i is
//! `#{c : s_c > s_i} + #{c : s_c = s_i and c first appeared before i}`, with dense
//! indices standing for order of first appearance. Counting over *all* items and then
//! taking back the user's history costs O(items + history) instead of a hash lookup per
//! candidate.

/// 0-based rank of `target` among items `0..scores.len()` minus `history`.
///
/// `history` may contain `target` (a repeated interaction); the target is never counted
/// against itself. A target with a NaN score ranks last: a diverged model must not
/// score hits because NaN compares false.
pub(crate) fn rank_of<T: PartialOrd + Copy>(
    scores: &[T],
    target: u32,
    history: impl IntoIterator<Item = u32>,
) -> u64 {
    let t = target as usize;
    let st = scores[t];
    #[allow(clippy::eq_op)]
    if st != st {
        return scores.len() as u64;
    }
    // Items that first appeared before the target win ties, later ones must beat it.
    let earlier = scores[..t].iter().filter(|&&s| s >= st).count();
    let later = scores[t + 1..].iter().filter(|&&s| s > st).count();
    let mut rank = (earlier + later) as u64;
    for h in history {
        let hs = h as usize;
        if hs != t && hs < scores.len() {
            let s = scores[hs];
            if s > st || (s == st && hs < t) {
                rank -= 1;
            }
        }
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, literally: every candidate compared one by one.
    fn brute_force(scores: &[u32], target: u32, history: &[u32]) -> u64 {
        let st = scores[target as usize];
        (0..scores.len() as u32)
            .filter(|&c| c != target && !history.contains(&c))
            .filter(|&c| {
                let s = scores[c as usize];
                s > st || (s == st && c < target)
            })
            .count() as u64
    }

    #[test]
    fn ties_go_to_the_item_that_appeared_first() {
        let scores = [5u32, 7, 5, 5, 1];
        assert_eq!(rank_of(&scores, 2, []), 2); // item 1 beats, item 0 ties earlier
        assert_eq!(rank_of(&scores, 0, []), 1);
        assert_eq!(rank_of(&scores, 3, [0]), 2);
        assert_eq!(
            rank_of(&scores, 3, [3]),
            3,
            "a repeat never counts against itself"
        );
    }

    #[test]
    fn nan_target_ranks_last() {
        assert_eq!(rank_of(&[1.0f32, f32::NAN, 0.5], 1, []), 3);
    }

    proptest! {
        #[test]
        fn matches_brute_force(
            scores in prop::collection::vec(0u32..6, 1..60),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
            target in any::<prop::sample::Index>(),
        ) {
            let target = target.index(scores.len()) as u32;
            let mut history: Vec<u32> = picks.iter().map(|p| p.index(scores.len()) as u32).collect();
            history.sort_unstable();
            history.dedup();
            prop_assert_eq!(
                rank_of(&scores, target, history.iter().copied()),
                brute_force(&scores, target, &history)
            );
        }
    }
}
