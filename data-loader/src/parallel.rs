//! Data-parallel loops over index ranges on scoped threads, for the commands that read a
//! whole source (counting shards, `data stats`, `data pack`).

use std::ops::Range;

use crate::error::DataError;

/// `f` of every index of `range`, computed on up to `threads` scoped threads (contiguous
/// parts), returned in index order. A panicking `f` is an error, not a crash.
pub fn map_in_order<T: Send>(
    range: Range<usize>,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Result<Vec<T>, DataError> {
    let len = range.len();
    let part = len.div_ceil(threads.max(1)).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = range
            .clone()
            .step_by(part)
            .map(|lo| {
                let hi = (lo + part).min(range.end);
                scope.spawn(move || (lo..hi).map(f).collect::<Vec<T>>())
            })
            .collect();
        let mut out = Vec::with_capacity(len);
        for handle in handles {
            let values = handle
                .join()
                .map_err(|_| DataError::Pipeline("a sample-reading thread panicked".into()))?;
            out.extend(values);
        }
        Ok(out)
    })
}

/// Threads to read with: the machine's cores, at most 16.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}
