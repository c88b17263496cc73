//! Cache prefetch hints for the training loop.
//!
//! A training step touches rows scattered over tables much larger than the L2 cache
//! (the user's row, the item rows, the user's history slots). The learner hints the rows
//! of an event a few places ahead, so their misses overlap with the current event's
//! arithmetic instead of stalling it one after another.

/// Hints that `values` will be read soon: one prefetch per cache line. A no-op where the
/// target has no prefetch instruction.
#[inline(always)]
pub(crate) fn values<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(values);
        let start = values.as_ptr().cast::<i8>();
        let mut offset = 0;
        while offset < bytes {
            // SAFETY: a prefetch is a hint: it never faults and has no effect the program
            // can observe other than timing, and the address is inside `values` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}
