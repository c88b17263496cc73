//! Item embeddings shared by all workers of a process, updated Hogwild!-style.
//!
//! ## Consistency
//!
//! Users are partitioned over workers, items are not: any worker may train any item. The
//! table therefore lives once per process behind an `Arc`. A training step copies the
//! rows it needs out of the table, steps on the copies and copies them back; each copy
//! holds the row's word (a per-row spin lock, see below) for the few tens of nanoseconds
//! of a `memcpy`, never across the arithmetic, so workers do not wait for each other's
//! training. What can happen is that two workers train the same item at the same moment:
//! both copy it out, both step, and the later copy-back overwrites the earlier (a lost
//! update, Hogwild!'s trade-off (Recht et al. 2011) at row rather than coordinate
//! granularity). With sparse updates (each step touches one positive and a few negatives
//! out of thousands of items) such collisions are rare and SGD converges anyway. With
//! one worker there is no interleaving at all, which is why one worker and a fixed seed
//! give bit-identical results.
//!
//! Holding a row while copying, rather than reading and writing each value as a relaxed
//! atomic, is what lets the copies run as vector `memcpy`s: a loop of atomic accesses is
//! never vectorised, and the ten row copies of a step with four negatives were a third
//! of its time.
//!
//! ## The row word
//!
//! One `AtomicU32` per row, the first of the row's own memory, is lock, initialisation
//! state, dirty mark and version at once: `0` means never used; otherwise the word is
//! the row's version (advanced by every store), with one bit set while a worker holds
//! the row and one set from a store until the next delta publication reads the row. The
//! first worker to hold a row at `0` initialises it, from a generator seeded by the run
//! seed and the item's dense index (itself identical on every worker, see
//! [`crate::state`]), so rows are initialised exactly once and identically whichever
//! worker comes first. Scoring copies compare the word with the one they copied to find
//! the rows that changed.
//!
//! Each row starts on a cache line of its own and carries its word: taking a row
//! brings in the line its copy reads first, and two workers training neighbouring items
//! do not pass a shared line back and forth (rows are padded to whole lines: 576 bytes
//! instead of 520 for Adagrad at dim 64, 320 instead of 260 for SGD).
//!
//! Storage grows in chunks of [`CHUNK_ROWS`] rows that never move, so a worker caches
//! the chunk pointers it has seen and takes the table's lock only when the catalogue
//! outgrows its cache.
//!
//! ## Scoring
//!
//! Full-catalogue ranking does not read the shared rows: each scoring worker keeps a
//! plain copy of embeddings and biases laid out for vector loops ([`ScoringCopy`]),
//! refreshed from the row versions before each score.
//!
//! ## Expiry
//!
//! Expired items (see [`crate::state::ItemCatalogue`]) are never read or written again:
//! a returning item gets a new dense index. A chunk whose rows are all expired is
//! *released*: the table forgets it and each worker drops its cached pointer at its own
//! compaction, so the memory returns once the last worker has passed that compaction
//! (a worker lagging a round behind keeps using its pointer safely until then).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Rows per storage chunk.
pub(crate) const CHUNK_ROWS: usize = 1024;

/// Row word of a row never used.
const UNUSED: u32 = 0;
/// Row word bit set while a worker holds the row.
const HELD: u32 = 1;
/// Row word bit set by a store, cleared by the delta publication that reads the row.
const DIRTY: u32 = 2;
/// The row word's version part, advanced by every store.
const VERSION: u32 = !(HELD | DIRTY);
/// One version step: the lowest bit above `HELD` and `DIRTY`.
const VERSION_STEP: u32 = 4;

/// The version after the one in `word`: never [`UNUSED`] (after 2^30 stores it wraps to
/// the first version, which a scoring copy could mistake for its own only if it slept
/// through exactly that many stores of one row).
#[inline]
fn next_version(word: u32) -> u32 {
    match (word & VERSION).wrapping_add(VERSION_STEP) {
        UNUSED => VERSION_STEP,
        v => v,
    }
}

/// `u32`s per cache line: rows start on a line of their own, so two workers writing
/// neighbouring rows do not fight over a line they share.
const LINE: usize = 16;

/// Storage of a chunk, aligned to cache lines.
#[repr(C, align(64))]
struct Line([UnsafeCell<u32>; LINE]);

/// Initial value of Adagrad accumulators, as in TensorFlow's Adagrad: it bounds the very
/// first step to `lr * g / sqrt(0.1)` instead of `lr * sign(g)`.
pub(crate) const ADAGRAD_INIT_ACC: f32 = 0.1;

/// Where things sit in a row: `[embedding; dim] [bias] ([accumulators; dim] [bias acc])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowLayout {
    pub(crate) dim: usize,
    pub(crate) adagrad: bool,
}

impl RowLayout {
    /// Values per row.
    #[inline]
    pub(crate) fn stride(&self) -> usize {
        if self.adagrad {
            2 * (self.dim + 1)
        } else {
            self.dim + 1
        }
    }

    /// Fills a fresh row: normal(0, std) embedding, zero bias, initial accumulators.
    pub(crate) fn init(&self, seed: u64, salt: u64, key: u64, std: f32, row: &mut [f32]) {
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(crate::state::splitmix64(
            seed ^ crate::state::splitmix64(salt ^ key),
        ));
        // A std of 0 is valid (all-zero start); Normal rejects only negative or NaN.
        let normal = Normal::new(0.0f32, std).unwrap_or_else(|_| {
            Normal::new(0.0, 0.0).unwrap_or_else(|_| unreachable!("std 0 is valid"))
        });
        for v in &mut row[..self.dim] {
            *v = normal.sample(&mut rng);
        }
        row[self.dim] = 0.0;
        if self.adagrad {
            row[self.dim + 1..].fill(ADAGRAD_INIT_ACC);
        }
    }
}

/// A chunk's rows lie one after another, each `[word, embedding, bias, accumulators]`
/// from the start of a cache line, so a training step that takes, reads and writes a row
/// touches one run of memory, the word in the row's first line. (Scoring, which needs
/// only embedding and bias, reads its own copy, see [`ScoringCopy`].)
struct Chunk {
    /// `CHUNK_ROWS` rows of `pitch` `u32`s: the row word, then `stride` values as `f32`
    /// bits (then padding to the line). A word is only ever accessed atomically, and a
    /// row's values only through a [`Held`] row.
    lines: Box<[Line]>,
    /// `u32`s per row: `1 + stride`, rounded up to whole lines.
    pitch: usize,
    stride: usize,
}

// SAFETY: the only shared mutable state is `lines`. Its row words are accessed only as
// `AtomicU32`s. Its values are read or written only through a `Held`, which exists only
// between a successful compare-exchange that sets its row's `HELD` bit and the release
// store that clears it; so at most one thread touches a row's values at a time, and the
// acquire of taking the row with the release of giving it back order each holder's
// accesses after the previous holder's.
#[allow(unsafe_code)]
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(stride: usize) -> Self {
        let pitch = (1 + stride).div_ceil(LINE) * LINE;
        Self {
            lines: (0..CHUNK_ROWS * pitch / LINE)
                .map(|_| Line([(); LINE].map(|_| UnsafeCell::new(0))))
                .collect(),
            pitch,
            stride,
        }
    }

    /// Heap bytes of a chunk for rows of `stride` values.
    fn bytes(stride: usize) -> usize {
        CHUNK_ROWS * (1 + stride).div_ceil(LINE) * LINE * 4
    }

    /// Where row `r` starts (its word), with the provenance of the whole storage.
    #[inline]
    fn row_ptr(&self, r: usize) -> *mut u32 {
        debug_assert!(r < CHUNK_ROWS);
        // `Line` is `repr(C)` over `UnsafeCell<u32>`s, so the storage is
        // `CHUNK_ROWS * pitch` contiguous `u32`s, which interior mutability lets a shared
        // reference's pointer write.
        UnsafeCell::raw_get(self.lines.as_ptr().cast::<UnsafeCell<u32>>())
            .wrapping_add(r * self.pitch)
    }

    /// Row `r`'s word.
    #[inline]
    #[allow(unsafe_code)]
    fn word(&self, r: usize) -> &AtomicU32 {
        // SAFETY: the pointer is in bounds (`r < CHUNK_ROWS`), aligned for `AtomicU32`
        // (which has `u32`'s alignment on every target with 32-bit atomics) and valid
        // for as long as `self`; a row's word is never accessed other than atomically.
        unsafe { AtomicU32::from_ptr(self.row_ptr(r)) }
    }

    /// Row `r`'s memory (word and values), for cache hints only.
    #[inline]
    fn span(&self, r: usize) -> &[Line] {
        let per_row = self.pitch / LINE;
        &self.lines[r * per_row..(r + 1) * per_row]
    }

    /// Takes row `r`, spinning while another worker holds it; a row never used is
    /// filled by `init` first.
    #[inline]
    fn hold(&self, r: usize, init: impl FnOnce(&mut [f32])) -> Held<'_> {
        let word = self.word(r);
        let mut spins = 0u32;
        loop {
            let w = word.load(Ordering::Relaxed);
            if w & HELD == 0
                && word
                    .compare_exchange_weak(w, w | HELD, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                let mut held = Held {
                    chunk: self,
                    r,
                    word: w,
                    wrote: false,
                    published: false,
                };
                if w == UNUSED {
                    init(&mut held);
                }
                return held;
            }
            // A holder copies for tens of nanoseconds; one that was descheduled while
            // holding needs the core back.
            spins += 1;
            if spins.is_multiple_of(128) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Takes row `r` if it was ever used (see [`Chunk::hold`]). A word never returns to
    /// `UNUSED`, so a row seen used here is still used when taken.
    #[inline]
    fn hold_used(&self, r: usize) -> Option<Held<'_>> {
        (self.word(r).load(Ordering::Relaxed) != UNUSED).then(|| self.hold(r, |_| {}))
    }
}

/// A row taken with [`Chunk::hold`]: its values, which no other thread touches until it
/// is dropped.
struct Held<'a> {
    chunk: &'a Chunk,
    r: usize,
    /// The row word when it was taken.
    word: u32,
    /// Whether the values were changed (then the version advances and the row is dirty).
    wrote: bool,
    /// Whether the delta publication read the row (then it is clean, unless written).
    published: bool,
}

impl Held<'_> {
    /// Marks the row changed: its version advances and it joins the next delta
    /// publication.
    #[inline]
    fn wrote(&mut self) {
        self.wrote = true;
    }

    /// Whether the row was stored since the last delta publication.
    fn is_dirty(&self) -> bool {
        self.word & DIRTY != 0
    }

    /// Marks the row published: no longer dirty, unless written in this hold.
    fn published(&mut self) {
        self.published = true;
    }

    /// The row word once this hold ends.
    #[inline]
    fn word_after(&self) -> u32 {
        let version = if self.wrote || self.word == UNUSED {
            next_version(self.word)
        } else {
            self.word & VERSION
        };
        let dirty = if self.wrote || (self.word & DIRTY != 0 && !self.published) {
            DIRTY
        } else {
            0
        };
        version | dirty
    }
}

impl std::ops::Deref for Held<'_> {
    type Target = [f32];

    #[inline]
    #[allow(unsafe_code)]
    fn deref(&self) -> &[f32] {
        // SAFETY: the row's values are the `stride` `u32`s after its word, in bounds of
        // the storage (`1 + stride <= pitch`), aligned for `f32`, which has `u32`'s size
        // and alignment, and any bits are a valid `f32`. This thread holds the row (see
        // `Chunk`'s `Sync`), so nothing writes them while the borrow, tied to `self`,
        // lives.
        unsafe {
            std::slice::from_raw_parts(
                self.chunk.row_ptr(self.r).add(1).cast::<f32>(),
                self.chunk.stride,
            )
        }
    }
}

impl std::ops::DerefMut for Held<'_> {
    #[inline]
    #[allow(unsafe_code)]
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and the borrow is exclusive: it is tied to `&mut self`,
        // and no other thread reads or writes the row while this thread holds it.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.chunk.row_ptr(self.r).add(1).cast::<f32>(),
                self.chunk.stride,
            )
        }
    }
}

impl Drop for Held<'_> {
    #[inline]
    fn drop(&mut self) {
        // The release pairs with the next holder's acquire: it sees these values.
        self.chunk
            .word(self.r)
            .store(self.word_after(), Ordering::Release);
    }
}

/// The process-wide item table of one model.
pub struct ItemTable {
    layout: RowLayout,
    seed: u64,
    init_std: f32,
    // Chunks are pushed and, once all their items expired, taken out; never moved, so a
    // poisoned lock still guards a consistent list.
    chunks: RwLock<Vec<Option<Arc<Chunk>>>>,
}

impl std::fmt::Debug for ItemTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemTable")
            .field("layout", &self.layout)
            .field("chunks", &self.chunk_list().len())
            .finish()
    }
}

/// Salt that keeps item initialisation independent of user initialisation.
pub(crate) const ITEM_SALT: u64 = 0x17e5;

impl ItemTable {
    pub(crate) fn new(layout: RowLayout, seed: u64, init_std: f32) -> Self {
        Self {
            layout,
            seed,
            init_std,
            chunks: RwLock::new(Vec::new()),
        }
    }

    fn chunk_list(&self) -> Vec<Option<Arc<Chunk>>> {
        self.chunks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Bytes of one chunk's storage.
    fn chunk_bytes(&self) -> usize {
        Chunk::bytes(self.layout.stride())
    }

    /// Values per row.
    pub fn stride(&self) -> usize {
        self.layout.stride()
    }

    /// Fills row `item` the way its first use anywhere in the process does.
    fn init_row(&self, item: usize, row: &mut [f32]) {
        self.layout
            .init(self.seed, ITEM_SALT, item as u64, self.init_std, row);
    }

    /// The rows of items `0..n` (expired or never used rows as zeros), for checkpoints.
    /// Callers make sure no worker trains meanwhile.
    pub fn export(&self, n: usize) -> Vec<f32> {
        let stride = self.layout.stride();
        let chunks = self.chunk_list();
        let mut out = vec![0.0f32; n * stride];
        for item in 0..n {
            let (c, r) = (item / CHUNK_ROWS, item % CHUNK_ROWS);
            let Some(Some(chunk)) = chunks.get(c) else {
                continue;
            };
            if let Some(row) = chunk.hold_used(r) {
                out[item * stride..(item + 1) * stride].copy_from_slice(&row);
            }
        }
        out
    }

    /// The Frobenius norm of the embeddings and biases of every initialised row: one
    /// number that says whether two replicas of a table hold the same model.
    pub fn norm(&self) -> f64 {
        let dim = self.layout.dim;
        let mut sum = 0.0f64;
        for chunk in self.chunk_list().iter().flatten() {
            for r in 0..CHUNK_ROWS {
                if let Some(row) = chunk.hold_used(r) {
                    sum += row[..=dim]
                        .iter()
                        .map(|&v| f64::from(v) * f64::from(v))
                        .sum::<f64>();
                }
            }
        }
        sum.sqrt()
    }

    /// The embedding (and bias) of every row written since the last call, among items
    /// `0..n`, clearing the marks: `(dense item, dim values, bias)`.
    pub(crate) fn take_dirty(&self, n: usize) -> Vec<(u32, Vec<f32>, f32)> {
        let dim = self.layout.dim;
        let mut out = Vec::new();
        for (c, chunk) in self.chunk_list().iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            for r in 0..CHUNK_ROWS {
                let item = c * CHUNK_ROWS + r;
                if item >= n {
                    break;
                }
                if chunk.word(r).load(Ordering::Relaxed) & DIRTY == 0 {
                    continue;
                }
                if let Some(mut row) = chunk.hold_used(r).filter(Held::is_dirty) {
                    out.push((item as u32, row[..dim].to_vec(), row[dim]));
                    row.published();
                }
            }
        }
        out
    }

    /// Loads rows exported by [`ItemTable::export`] into a fresh table; rows marked
    /// dead in `alive` stay unallocated.
    pub fn import(&self, rows: &[f32], alive: &[bool]) {
        let stride = self.layout.stride();
        let n = rows.len() / stride.max(1);
        let mut list = self
            .chunks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for item in 0..n {
            if !alive.get(item).copied().unwrap_or(false) {
                continue;
            }
            let (c, r) = (item / CHUNK_ROWS, item % CHUNK_ROWS);
            while list.len() <= c {
                list.push(None);
            }
            let chunk = list[c].get_or_insert_with(|| Arc::new(Chunk::new(stride)));
            let values = &rows[item * stride..(item + 1) * stride];
            // The imported values are the row's first: clean, at the first version.
            chunk.hold(r, |_| {}).copy_from_slice(values);
        }
    }

    /// Bytes held by the table's storage.
    pub fn bytes(&self) -> usize {
        self.chunk_list().iter().flatten().count() * self.chunk_bytes()
    }
}

/// One worker's handle on an [`ItemTable`], with its cache of chunk pointers.
pub(crate) struct ItemRows {
    table: Arc<ItemTable>,
    chunks: Vec<Option<Arc<Chunk>>>,
    /// What this worker's stores changed, summed per item, for the other processes of a
    /// cluster (see [`crate::cluster`]); `None` when the table is not replicated.
    log: Option<rustc_hash::FxHashMap<u32, Vec<f32>>>,
    /// This worker's plain copy of embeddings and biases for full-catalogue scoring,
    /// made on the first score.
    copy: ScoringCopy,
}

impl ItemRows {
    pub(crate) fn new(table: Arc<ItemTable>) -> Self {
        let copy = ScoringCopy::new(table.layout.dim);
        Self {
            table,
            chunks: Vec::new(),
            log: None,
            copy,
        }
    }

    /// Heap bytes of this worker's scoring copy.
    pub(crate) fn copy_bytes(&self) -> u64 {
        self.copy.bytes()
    }

    /// Starts recording what stores change (the table is replicated in other processes).
    pub(crate) fn record_changes(&mut self) {
        self.log.get_or_insert_with(Default::default);
    }

    /// The changes recorded since the last call: `(item, row delta)`, stride values each.
    pub(crate) fn take_changes(&mut self) -> Vec<(u32, Vec<f32>)> {
        self.log
            .as_mut()
            .map(|log| log.drain().collect())
            .unwrap_or_default()
    }

    /// Adds another process's change to a row (not recorded: it is not this process's
    /// change to pass on).
    pub(crate) fn add(&mut self, item: u32, delta: &[f32]) {
        let mut row = self.hold(item);
        for (v, d) in row.iter_mut().zip(delta) {
            *v += d;
        }
        row.wrote();
    }

    pub(crate) fn layout(&self) -> RowLayout {
        self.table.layout
    }

    pub(crate) fn table(&self) -> &Arc<ItemTable> {
        &self.table
    }

    /// Chunk `c`, cached (and created in the table) if needed. A function of the fields
    /// it needs, so that a row held in the chunk leaves the handle's other fields free.
    #[inline]
    fn cached<'a>(
        chunks: &'a mut Vec<Option<Arc<Chunk>>>,
        table: &ItemTable,
        c: usize,
    ) -> &'a Chunk {
        if chunks.get(c).is_none_or(Option::is_none) {
            Self::grow(chunks, table, c);
        }
        match &chunks[c] {
            Some(chunk) => chunk,
            None => unreachable!("grow caches the chunk it returns"),
        }
    }

    /// Caches chunk `chunk`, creating it in the table if needed.
    #[cold]
    fn grow(chunks: &mut Vec<Option<Arc<Chunk>>>, table: &ItemTable, chunk: usize) {
        let stride = table.layout.stride();
        let mut list = table
            .chunks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while list.len() <= chunk {
            list.push(Some(Arc::new(Chunk::new(stride))));
        }
        // Only a chunk all of whose items expired is ever taken out, and expired items
        // are never addressed; recreating one keeps this path total all the same.
        let wanted = Arc::clone(list[chunk].get_or_insert_with(|| Arc::new(Chunk::new(stride))));
        if chunks.len() < list.len() {
            chunks.resize(list.len(), None);
        }
        // Keep this worker's own pointers: it may still be behind the compaction that
        // released a chunk.
        for (mine, shared) in chunks.iter_mut().zip(list.iter()) {
            if mine.is_none() {
                mine.clone_from(shared);
            }
        }
        chunks[chunk] = Some(wanted);
    }

    /// Takes the row of `item` out of `chunks`, initialised if this is its first use
    /// anywhere in the process.
    #[inline]
    fn hold_in<'a>(
        chunks: &'a mut Vec<Option<Arc<Chunk>>>,
        table: &ItemTable,
        item: u32,
    ) -> Held<'a> {
        let (c, r) = (item as usize / CHUNK_ROWS, item as usize % CHUNK_ROWS);
        let chunk = Self::cached(chunks, table, c);
        chunk.hold(r, |row| table.init_row(item as usize, row))
    }

    #[inline]
    fn hold(&mut self, item: u32) -> Held<'_> {
        Self::hold_in(&mut self.chunks, &self.table, item)
    }

    /// Releases the chunks all of whose rows are expired, given liveness by dense
    /// index (`alive.len()` items handed out). Returns the bytes this call took out of
    /// the table (each chunk is counted once, by the first worker to release it).
    pub(crate) fn release_expired(&mut self, alive: &[bool]) -> u64 {
        let full = alive.len() / CHUNK_ROWS;
        let mut freed = 0;
        for c in 0..full.min(self.chunks.len()) {
            if self.chunks[c].is_none() {
                continue;
            }
            if alive[c * CHUNK_ROWS..(c + 1) * CHUNK_ROWS]
                .iter()
                .any(|&a| a)
            {
                continue;
            }
            self.chunks[c] = None;
            self.copy.release(c);
            let mut list = self
                .table
                .chunks
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if list.get_mut(c).and_then(Option::take).is_some() {
                freed += self.table.chunk_bytes() as u64;
            }
        }
        freed
    }

    /// Hints that the row of `item` will be trained soon, if its chunk is cached.
    #[inline]
    pub(crate) fn prefetch(&self, item: u32) {
        let (c, r) = (item as usize / CHUNK_ROWS, item as usize % CHUNK_ROWS);
        if let Some(Some(chunk)) = self.chunks.get(c) {
            crate::prefetch::values(chunk.span(r));
        }
    }

    /// Copies the first `out.len()` values of a row into `out`: the whole row (stride
    /// values) to train, or only embedding and bias (`dim + 1`) to score, which leaves the
    /// optimiser's accumulators behind.
    #[inline]
    pub(crate) fn load(&mut self, item: u32, out: &mut [f32]) {
        let row = self.hold(item);
        out.copy_from_slice(&row[..out.len()]);
    }

    /// Writes a row back (length = stride).
    #[inline]
    pub(crate) fn store(&mut self, item: u32, values: &[f32]) {
        let mut row = Self::hold_in(&mut self.chunks, &self.table, item);
        if let Some(log) = &mut self.log {
            // What this store changes against the row as it is now, which includes
            // other workers' stores since this worker loaded it.
            let delta = log.entry(item).or_insert_with(|| vec![0.0; values.len()]);
            for ((d, old), new) in delta.iter_mut().zip(row.iter()).zip(values) {
                *d += new - old;
            }
        }
        row.copy_from_slice(values);
        row.wrote();
    }

    /// Changes a row where it lies, held for the length of `f` (which must be short:
    /// another worker wanting the row spins meanwhile). Saves the two copies of a load
    /// and store, and another worker's change to the row in between is kept rather than
    /// overwritten. `f` must not take another row: a worker holds one row at a time, so
    /// two workers can never wait on each other.
    #[inline]
    pub(crate) fn update<R>(&mut self, item: u32, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let mut row = Self::hold_in(&mut self.chunks, &self.table, item);
        // Replicated: the change is also recorded, as the difference it made.
        let mut delta = self
            .log
            .as_mut()
            .map(|log| log.entry(item).or_insert_with(|| vec![0.0; row.len()]));
        if let Some(delta) = &mut delta {
            delta
                .iter_mut()
                .zip(row.iter())
                .for_each(|(d, old)| *d -= old);
        }
        let out = f(&mut row);
        if let Some(delta) = delta {
            delta
                .iter_mut()
                .zip(row.iter())
                .for_each(|(d, new)| *d += new);
        }
        row.wrote();
        out
    }

    /// Scores `p` against items `0..alive.len()`: `out[i] = p · q_i (+ b_i)`, and
    /// negative infinity for expired items, which are never candidates.
    ///
    /// Reads this worker's [`ScoringCopy`], brought up to date first, so the loop runs
    /// over plain `f32`s the compiler vectorises. Each item's sum is taken in the same
    /// order as a row-by-row dot product (`0 + p0 q0 + p1 q1 + ... + b`), so scores are
    /// bit-identical to reading the shared table value by value.
    pub(crate) fn score_all(&mut self, p: &[f32], bias: bool, alive: &[bool], out: &mut Vec<f32>) {
        self.refresh_copy(alive);
        self.copy.score(p, bias, alive, out);
    }

    /// Copies every live row whose version moved since this worker copied it (and
    /// initialises rows never used before, as training would).
    fn refresh_copy(&mut self, alive: &[bool]) {
        let dim = self.table.layout.dim;
        let Self {
            table,
            chunks,
            copy,
            ..
        } = self;
        for (c, live) in alive.chunks(CHUNK_ROWS).enumerate() {
            if !live.iter().any(|&a| a) {
                continue;
            }
            let chunk = Self::cached(chunks, table, c);
            let copy = copy.chunk(c);
            for (r, _) in live.iter().enumerate().filter(|(_, &a)| a) {
                // A row's version is never `UNUSED`, which `seen` starts at: a row
                // never copied is copied, and initialised if never used.
                let word = chunk.word(r).load(Ordering::Relaxed);
                if word == copy.seen[r] && word != UNUSED {
                    continue;
                }
                let item = c * CHUNK_ROWS + r;
                let row = chunk.hold(r, |row| table.init_row(item, row));
                copy.seen[r] = row.word_after();
                let (block, lane) = (r / LANES, r % LANES);
                let base = block * (dim + 1) * LANES + lane;
                for (d, &v) in row[..=dim].iter().enumerate() {
                    copy.values[base + d * LANES] = v;
                }
            }
        }
    }
}

/// Items scored side by side: one `f32` lane each.
const LANES: usize = 16;

/// One worker's copy of the table's embeddings and biases, laid out for scoring.
///
/// Scoring the whole catalogue for every evaluated event is the hottest loop of a
/// backtest, and taking each row of the shared table in turn would cost a locked
/// instruction per item. The copy is plain `f32`, blocked by [`LANES`] items with values
/// dimension-major inside a block, so one vector instruction advances sixteen items'
/// dot products. A row is copied again only when its version (advanced by every store)
/// moved, which between two scored events is a handful of rows. Costs one more
/// `(dim + 1) * 4` bytes per item per scoring worker; chunks the table releases are
/// released here too.
struct ScoringCopy {
    dim: usize,
    chunks: Vec<Option<CopyChunk>>,
}

struct CopyChunk {
    /// Block `b`, dimension `d`, lane `l` at `(b * (dim + 1) + d) * LANES + l`; the
    /// bias is dimension `dim`.
    values: Box<[f32]>,
    /// Per row, the row word it was copied at (`UNUSED`: never copied).
    seen: Box<[u32]>,
}

impl ScoringCopy {
    fn new(dim: usize) -> Self {
        Self {
            dim,
            chunks: Vec::new(),
        }
    }

    fn chunk(&mut self, c: usize) -> &mut CopyChunk {
        if self.chunks.len() <= c {
            self.chunks.resize_with(c + 1, || None);
        }
        let values = CHUNK_ROWS * (self.dim + 1);
        self.chunks[c].get_or_insert_with(|| CopyChunk {
            values: vec![0.0; values].into_boxed_slice(),
            seen: vec![0; CHUNK_ROWS].into_boxed_slice(),
        })
    }

    fn release(&mut self, c: usize) {
        if let Some(slot) = self.chunks.get_mut(c) {
            *slot = None;
        }
    }

    fn bytes(&self) -> u64 {
        let per_chunk = CHUNK_ROWS * ((self.dim + 1) * 4 + 4);
        (self.chunks.iter().flatten().count() * per_chunk) as u64
    }

    fn score(&self, p: &[f32], bias: bool, alive: &[bool], out: &mut Vec<f32>) {
        out.clear();
        out.reserve(alive.len());
        let dim = self.dim;
        let block_len = (dim + 1) * LANES;
        for (c, live) in alive.chunks(CHUNK_ROWS).enumerate() {
            let Some(Some(chunk)) = self.chunks.get(c) else {
                // Never refreshed: every item in it is expired.
                out.extend(live.iter().map(|_| f32::NEG_INFINITY));
                continue;
            };
            for (block, live) in chunk.values.chunks_exact(block_len).zip(live.chunks(LANES)) {
                let mut acc = [0.0f32; LANES];
                for (a, column) in p.iter().zip(block.chunks_exact(LANES)) {
                    for (s, q) in acc.iter_mut().zip(column) {
                        *s += a * q;
                    }
                }
                if bias {
                    for (s, b) in acc.iter_mut().zip(&block[dim * LANES..]) {
                        *s += b;
                    }
                }
                out.extend(
                    acc.iter()
                        .zip(live)
                        .map(|(&s, &a)| if a { s } else { f32::NEG_INFINITY }),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(adagrad: bool) -> Arc<ItemTable> {
        Arc::new(ItemTable::new(RowLayout { dim: 4, adagrad }, 9, 0.1))
    }

    #[test]
    fn rows_are_initialised_once_and_identically_across_handles() {
        let t = table(true);
        let mut a = ItemRows::new(Arc::clone(&t));
        let mut b = ItemRows::new(Arc::clone(&t));
        let mut ra = vec![0.0; 10];
        let mut rb = vec![0.0; 10];
        a.load(3000, &mut ra);
        b.load(3000, &mut rb);
        assert_eq!(ra, rb);
        assert!(ra[..4].iter().any(|&v| v != 0.0));
        assert_eq!(ra[4], 0.0);
        assert_eq!(&ra[5..], &[ADAGRAD_INIT_ACC; 5]);
        // A store through one handle is seen by the other, and not re-initialised.
        ra[0] = 42.0;
        a.store(3000, &ra);
        b.load(3000, &mut rb);
        assert_eq!(rb[0], 42.0);
        // Different items get different rows.
        b.load(3001, &mut rb);
        assert_ne!(rb[..4], ra[..4]);
    }

    #[test]
    fn concurrent_first_use_initialises_exactly_once() {
        let t = table(false);
        let rows: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let t = Arc::clone(&t);
                    s.spawn(move || {
                        let mut h = ItemRows::new(t);
                        let mut out = vec![0.0; 5];
                        for item in 0..5000 {
                            h.load(item, &mut out);
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(rows.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn fully_expired_chunks_are_released_once() {
        let t = table(false);
        let mut a = ItemRows::new(Arc::clone(&t));
        let mut b = ItemRows::new(Arc::clone(&t));
        let mut row = vec![0.0; 5];
        let n = 3 * CHUNK_ROWS + 10;
        for item in 0..n as u32 {
            a.load(item, &mut row);
        }
        b.load(0, &mut row);
        assert_eq!(t.bytes(), 4 * t.chunk_bytes());
        let mut alive = vec![true; n];
        // Chunk 1 entirely expired, chunk 0 all but one, the partial last chunk entirely.
        alive[CHUNK_ROWS..2 * CHUNK_ROWS].fill(false);
        alive[..CHUNK_ROWS - 1].fill(false);
        alive[3 * CHUNK_ROWS..].fill(false);
        assert_eq!(a.release_expired(&alive), t.chunk_bytes() as u64);
        assert_eq!(b.release_expired(&alive), 0, "counted once");
        assert_eq!(t.bytes(), 3 * t.chunk_bytes());
        // Live rows on either side are untouched and new items still get rows.
        b.load(2 * CHUNK_ROWS as u32, &mut row);
        b.load(n as u32 + 5, &mut row);
        let mut scores = Vec::new();
        a.score_all(&[1.0; 4], false, &alive, &mut scores);
        assert_eq!(scores.len(), n);
        assert!(scores[CHUNK_ROWS + 3].is_infinite());
    }

    #[test]
    fn scoring_copy_follows_stores_from_any_handle() {
        let t = table(true);
        let (mut a, mut b) = (ItemRows::new(Arc::clone(&t)), ItemRows::new(t));
        // More than a chunk, and not a multiple of the lane count.
        let n = CHUNK_ROWS + 37;
        let mut alive = vec![true; n];
        alive[5] = false;
        let p = [0.5, -1.0, 0.25, 2.0];
        let sequential = |rows: &mut ItemRows, item: u32| {
            let mut row = vec![0.0; 10];
            rows.load(item, &mut row);
            let mut s = 0.0f32;
            for (x, q) in p.iter().zip(&row[..4]) {
                s += x * q;
            }
            s + row[4]
        };
        let mut scores = Vec::new();
        a.score_all(&p, true, &alive, &mut scores);
        assert_eq!(scores.len(), n);
        assert_eq!(scores[5], f32::NEG_INFINITY);
        // Another worker trains two items, one in each chunk.
        for item in [7u32, CHUNK_ROWS as u32 + 30] {
            let mut row = vec![0.0; 10];
            b.load(item, &mut row);
            row[0] += 3.0;
            row[4] = -1.5;
            b.store(item, &row);
        }
        let before = a.copy_bytes();
        a.score_all(&p, true, &alive, &mut scores);
        for item in (0..n as u32).filter(|&i| i != 5) {
            assert_eq!(
                scores[item as usize],
                sequential(&mut a, item),
                "item {item}"
            );
        }
        assert_eq!(
            a.copy_bytes(),
            before,
            "a refresh copies rows, it does not grow"
        );
        assert_eq!(
            b.copy_bytes(),
            0,
            "a worker that never scores holds no copy"
        );
    }

    #[test]
    fn stores_are_published_once_and_loads_not_at_all() {
        let t = table(true);
        let mut h = ItemRows::new(Arc::clone(&t));
        let mut row = vec![0.0; 10];
        for item in [1u32, 2, CHUNK_ROWS as u32 + 1] {
            h.load(item, &mut row);
        }
        assert!(
            t.take_dirty(2 * CHUNK_ROWS).is_empty(),
            "a load is no change"
        );
        row[2] = 7.0;
        row[4] = -1.0;
        h.store(CHUNK_ROWS as u32 + 1, &row);
        h.store(2, &row);
        let published = t.take_dirty(2 * CHUNK_ROWS);
        assert_eq!(
            published,
            vec![
                (2, row[..4].to_vec(), -1.0),
                (CHUNK_ROWS as u32 + 1, row[..4].to_vec(), -1.0)
            ]
        );
        assert!(t.take_dirty(2 * CHUNK_ROWS).is_empty(), "published once");
        // Rows stay readable, initialised and versioned after publication.
        let mut again = vec![0.0; 10];
        h.load(2, &mut again);
        assert_eq!(again, row);
        assert_eq!(t.bytes(), 2 * Chunk::bytes(10));
        assert_eq!(Chunk::bytes(10) % 64, 0);
    }

    #[test]
    fn updates_in_place_keep_other_changes_and_record_deltas_as_stores_do() {
        let t = table(true);
        let (mut a, mut b) = (ItemRows::new(Arc::clone(&t)), ItemRows::new(Arc::clone(&t)));
        a.record_changes();
        let mut before = vec![0.0; 10];
        a.load(5, &mut before);
        // Another handle's change between this handle's read and its update is kept.
        b.update(5, |row| row[1] += 2.0);
        let seen = a.update(5, |row| {
            row[0] += 1.0;
            row[1]
        });
        assert_eq!(seen, before[1] + 2.0, "an update sees the row as it is");
        let mut after = vec![0.0; 10];
        b.load(5, &mut after);
        assert_eq!(after[0], before[0] + 1.0);
        assert_eq!(after[1], before[1] + 2.0);
        // Only this handle's own change is recorded for other processes.
        let changes = a.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, 5);
        let mut expected = vec![0.0; 10];
        expected[0] = after[0] - before[0];
        assert_eq!(changes[0].1, expected);
        assert_eq!(t.take_dirty(CHUNK_ROWS).len(), 1, "an update is published");
    }

    #[test]
    fn score_all_matches_dot_products() {
        let t = table(false);
        let mut h = ItemRows::new(t);
        let p = [1.0, -2.0, 0.5, 0.25];
        let mut scores = Vec::new();
        h.score_all(&p, true, &[true, true, true, false], &mut scores);
        assert_eq!(scores[3], f32::NEG_INFINITY);
        for item in 0..3 {
            let mut row = vec![0.0; 5];
            h.load(item, &mut row);
            let dot: f32 = p.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>() + row[4];
            assert_eq!(scores[item as usize], dot);
        }
    }
}
