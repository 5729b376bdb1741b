//! The fuzz machinery every parser target shares: a seeded mutation engine, a harness that
//! runs one parser over thousands of inputs under `catch_unwind` and a watchdog, and a counting
//! global allocator. It lives in this one test binary (`trainer/tests/fuzz.rs`), which reaches
//! the data loader's parsers through the trainer's own dependency on it: one allocator, one
//! engine, nothing copied between crates.
//!
//! Reproducing a failure: every input is a pure function of (seed, parser, iteration), so
//! `OXCLIP_FUZZ_SEED=S OXCLIP_FUZZ_ITER=I cargo test --release --locked -p oxclip-trainer
//! --test fuzz PARSER -- --nocapture` runs exactly the input that failed; the failure message
//! prints that line.
//!
//! Knobs (environment): `OXCLIP_FUZZ_SEED` (default 26), `OXCLIP_FUZZ_SCALE` (multiplies each
//! parser's default number of inputs; `scripts/fuzz.sh` raises it), `OXCLIP_FUZZ_ITER` (run only
//! that iteration), `OXCLIP_FUZZ_HANG_SECS` (the watchdog's limit per input, default 10).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::{Display, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// The counting allocator.

/// A parser that asks for more than this in one request fails the test: nothing oxclip reads
/// from a small file should need a quarter of a gigabyte at once, so such a request is a length
/// field taken at its word.
pub const ALLOCATION_BOUND: usize = 256 << 20;
/// Requests above this are refused outright (the process then aborts with the message below),
/// so a length-driven allocation cannot take the machine's memory before the test can fail.
const ALLOCATION_REFUSED: usize = 1 << 30;

thread_local! {
    /// The largest single request made on this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// What the fuzz worker on this thread is running, for the refusal message: the parser,
    /// the seed and the iteration (empty on other threads, which are never refused).
    static PARSER: Cell<&'static str> = const { Cell::new("") };
    static SEED: Cell<u64> = const { Cell::new(0) };
    static ITERATION: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

/// Writes `bytes` to stderr without allocating (this runs inside the allocator).
fn write_stderr(bytes: &[u8]) {
    // SAFETY: writes from a valid slice to file descriptor 2; a failed write is ignored.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
    }
}

/// `n` in decimal, into `buf`, without allocating.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Records a request; `false` when it is refused (a fuzz worker asking for more than
/// [`ALLOCATION_REFUSED`]).
fn note(size: usize) -> bool {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
    if size <= ALLOCATION_REFUSED {
        return true;
    }
    let parser = PARSER.try_with(Cell::get).unwrap_or("");
    if parser.is_empty() {
        return true;
    }
    let mut buf = [0u8; 20];
    write_stderr(b"\nfuzz: parser `");
    write_stderr(parser.as_bytes());
    write_stderr(b"` asked for one allocation of ");
    write_stderr(decimal(size as u64, &mut buf));
    write_stderr(b" bytes (refused); reproduce with OXCLIP_FUZZ_SEED=");
    write_stderr(decimal(SEED.try_with(Cell::get).unwrap_or(0), &mut buf));
    write_stderr(b" OXCLIP_FUZZ_ITER=");
    write_stderr(decimal(ITERATION.try_with(Cell::get).unwrap_or(0), &mut buf));
    write_stderr(b"\n");
    false
}

// SAFETY: every call is passed on to the system allocator unchanged, or refused with a null
// pointer (which the allocation API allows); `note` only touches thread-local Cells (const
// initialised, without destructors, so they never allocate) and writes to stderr.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Settings from the environment.

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={value:?} is not a whole number"),
    }
}

pub fn seed() -> u64 {
    env_u64("OXCLIP_FUZZ_SEED").unwrap_or(26)
}

fn scale() -> u64 {
    env_u64("OXCLIP_FUZZ_SCALE").unwrap_or(1).max(1)
}

fn hang_limit() -> Duration {
    Duration::from_secs(env_u64("OXCLIP_FUZZ_HANG_SECS").unwrap_or(10).max(1))
}

// ---------------------------------------------------------------------------------------------
// The mutation engine.

/// Values that break length and count fields: zero, one, the signed and unsigned edges of each
/// width, and sizes far beyond any file (1 TiB, 2^62).
const INTERESTING: [u64; 16] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 7,
];

/// Numbers written as text, for the formats that spell lengths and shapes in decimal.
const INTERESTING_TEXT: [&str; 14] = [
    "0",
    "-1",
    "1",
    "255",
    "65536",
    "2147483648",
    "4294967296",
    "1099511627776",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999",
    "1e308",
    "-9223372036854775808",
];

/// Bytes where a format's structure turns: JSON and YAML punctuation, line ends, NUL.
const STRUCTURAL: &[u8] = b"{}[],:\"'\n\r\t #-|>&*!%@`\\\0";

/// A position in `len` bytes, half the time within the first KiB, where headers are.
fn position(rng: &mut ChaCha8Rng, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    if rng.gen_bool(0.5) {
        rng.gen_range(0..len.min(1024))
    } else {
        rng.gen_range(0..len)
    }
}

/// A place to cut `data`: anywhere, at a structural byte, at a 512-byte tar block edge, just
/// before the end, or within the first bytes (a header cut short).
fn boundary(rng: &mut ChaCha8Rng, data: &[u8]) -> usize {
    let len = data.len();
    if len == 0 {
        return 0;
    }
    match rng.gen_range(0..5) {
        0 => rng.gen_range(0..=len),
        1 => {
            let start = rng.gen_range(0..len);
            data[start..]
                .iter()
                .position(|b| STRUCTURAL.contains(b))
                .map_or(len, |p| start + p + rng.gen_range(0..2).min(len - start - p))
        }
        2 => {
            let blocks = len / 512;
            (rng.gen_range(0..=blocks) * 512 + [0, 1, 100, 124, 148, 156, 257][rng.gen_range(0..7)])
                .min(len)
        }
        3 => len.saturating_sub(rng.gen_range(1..=16)),
        _ => rng.gen_range(0..=len.min(16)),
    }
}

/// Applies one random mutation to `data`; `other` is another seed, for splicing.
fn mutate_once(rng: &mut ChaCha8Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.gen_range(0..12) {
        // A flipped bit.
        0 if len > 0 => {
            let i = position(rng, len);
            data[i] ^= 1 << rng.gen_range(0..8);
        }
        // A byte replaced by an edge value or a random one.
        1 if len > 0 => {
            let i = position(rng, len);
            data[i] = [0, 0xff, 0x7f, 0x80, 0x01, rng.gen()][rng.gen_range(0..6)];
        }
        // A 1-, 2-, 4- or 8-byte word replaced by an interesting value, little or big endian.
        2 if len > 0 => {
            let width = [1usize, 2, 4, 8][rng.gen_range(0..4)];
            let i = position(rng, len);
            let value = INTERESTING[rng.gen_range(0..INTERESTING.len())];
            let bytes = if rng.gen() { value.to_le_bytes() } else { value.to_be_bytes() };
            let bytes = if rng.gen() { &bytes[..width] } else { &bytes[8 - width..] };
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = data.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        // A decimal number in the text replaced by an interesting one.
        3 if len > 0 => {
            let start = position(rng, len);
            if let Some(p) = data[start..].iter().position(u8::is_ascii_digit) {
                let a = start + p;
                let b = data[a..].iter().position(|c| !c.is_ascii_digit()).map_or(len, |q| a + q);
                let text = INTERESTING_TEXT[rng.gen_range(0..INTERESTING_TEXT.len())];
                data.splice(a..b, text.bytes());
            }
        }
        // Random bytes inserted.
        4 => {
            let i = rng.gen_range(0..=len);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            data.splice(i..i, bytes);
        }
        // A structural byte inserted.
        5 => {
            let i = rng.gen_range(0..=len);
            data.insert(i, STRUCTURAL[rng.gen_range(0..STRUCTURAL.len())]);
        }
        // A range deleted.
        6 if len > 0 => {
            let a = position(rng, len);
            let b = (a + rng.gen_range(1..=64.min(len - a).max(1))).min(len);
            data.drain(a..b);
        }
        // A range duplicated in place (repeated members, keys, brackets).
        7 if len > 0 => {
            let a = position(rng, len);
            let b = (a + rng.gen_range(1..=600)).min(len);
            let copy = data[a..b].to_vec();
            let at = rng.gen_range(0..=len);
            data.splice(at..at, copy);
        }
        // A range copied over another.
        8 if len > 1 => {
            let a = position(rng, len);
            let b = (a + rng.gen_range(1..=64)).min(len);
            let copy = data[a..b].to_vec();
            let at = position(rng, len);
            for (k, byte) in copy.into_iter().enumerate() {
                if let Some(slot) = data.get_mut(at + k) {
                    *slot = byte;
                }
            }
        }
        // Spliced with another seed: our head, its tail.
        9 if !other.is_empty() => {
            let cut = boundary(rng, data);
            let from = boundary(rng, other).min(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Truncated at a boundary.
        _ => {
            let cut = boundary(rng, data);
            data.truncate(cut);
        }
    }
}

/// The systematic truncations of one seed: every length up to 64 bytes, 128 evenly spread
/// lengths, and each of the last 16.
fn truncations(len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..len.min(64)).collect();
    cuts.extend((0..128).map(|j| len * j / 128));
    cuts.extend((1..=16).map(|k| len.saturating_sub(k)));
    cuts.sort_unstable();
    cuts.dedup();
    cuts.retain(|&c| c < len);
    cuts
}

/// The inputs of one target, each a pure function of its iteration number.
struct Inputs {
    seeds: Vec<Vec<u8>>,
    /// (seed index, cut) for the first iterations: the systematic truncations.
    cuts: Vec<(usize, usize)>,
    run_seed: u64,
    name_hash: u64,
    max_len: usize,
}

impl Inputs {
    fn new(name: &str, seeds: Vec<Vec<u8>>, run_seed: u64) -> Self {
        let cuts = seeds
            .iter()
            .enumerate()
            .flat_map(|(s, seed)| truncations(seed.len()).into_iter().map(move |c| (s, c)))
            .collect();
        // FNV-1a: stable across Rust versions, unlike the std hasher.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let max_len = seeds.iter().map(Vec::len).max().unwrap_or(0) * 2 + 4096;
        Inputs { seeds, cuts, run_seed, name_hash, max_len }
    }

    fn get(&self, iteration: u64) -> Vec<u8> {
        if let Some(&(s, cut)) = usize::try_from(iteration).ok().and_then(|i| self.cuts.get(i)) {
            return self.seeds[s][..cut].to_vec();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.run_seed ^ self.name_hash.rotate_left(17) ^ iteration.wrapping_mul(0x9e37_79b9),
        );
        rng.set_stream(iteration);
        let s = rng.gen_range(0..self.seeds.len());
        let o = rng.gen_range(0..self.seeds.len());
        let mut data = self.seeds[s].clone();
        let rounds = [1, 1, 1, 2, 2, 3, 4, 8][rng.gen_range(0..8)];
        for _ in 0..rounds {
            mutate_once(&mut rng, &mut data, &self.seeds[o]);
        }
        data.truncate(self.max_len);
        data
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// One parser's results.
#[derive(Debug)]
pub struct Report {
    pub parser: &'static str,
    pub inputs: u64,
    /// Inputs the parser accepted, and inputs it refused with an error value.
    pub accepted: u64,
    pub refused: u64,
    pub panics: Vec<String>,
    pub largest_allocation: usize,
    pub secs: f64,
}

impl Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz {:<22} inputs {:>7}  accepted {:>6}  refused {:>7}  panics {}  hangs 0  \
             largest allocation {:>9} bytes  {:.1} s",
            self.parser,
            self.inputs,
            self.accepted,
            self.refused,
            self.panics.len(),
            self.largest_allocation,
            self.secs
        )
    }
}

fn hex_prefix(data: &[u8]) -> String {
    let mut out = String::new();
    for b in data.iter().take(64) {
        let _ = write!(out, "{b:02x}");
    }
    if data.len() > 64 {
        let _ = write!(out, "... ({} bytes)", data.len());
    }
    out
}

/// Feeds `parser` the seeds themselves (each must be accepted: a seed the parser refuses
/// would make every mutation of it test nothing), then `iterations` x `OXCLIP_FUZZ_SCALE`
/// inputs derived from them, and checks that none panics, hangs or allocates past
/// [`ALLOCATION_BOUND`]. `parser` returns `Ok` for an accepted input and `Err` for a refused
/// one. Prints the report line; panics (failing the test) on any failure, naming the parser,
/// seed and iteration.
pub fn fuzz<E, F>(parser: &'static str, seeds: Vec<Vec<u8>>, iterations: u64, run: F) -> Report
where
    E: Display,
    F: FnMut(&[u8]) -> Result<(), E> + Send + 'static,
{
    assert!(!seeds.is_empty(), "{parser}: no seeds");
    let run_seed = seed();
    let only = env_u64("OXCLIP_FUZZ_ITER");
    let total = iterations * scale();
    let inputs = Inputs::new(parser, seeds, run_seed);
    // What the watchdog reads: inputs finished, and the one being parsed.
    let done = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new((0u64, Vec::new())));
    let worker = {
        let (done, current) = (done.clone(), current.clone());
        let mut run = run;
        std::thread::Builder::new()
            .name(format!("fuzz-{parser}"))
            .spawn(move || {
                PARSER.with(|p| p.set(parser));
                SEED.with(|s| s.set(run_seed));
                for (i, seed) in inputs.seeds.iter().enumerate() {
                    if let Err(e) = run(seed) {
                        panic!("{parser}: seed {i} is refused ({e}); fix the seed first");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                LARGEST.with(|c| c.set(0));
                let start = Instant::now();
                let (mut accepted, mut refused, mut panics) = (0u64, 0u64, Vec::new());
                let range = match only {
                    Some(i) => i..i + 1,
                    None => 0..total,
                };
                for iteration in range {
                    ITERATION.with(|c| c.set(iteration));
                    let input = inputs.get(iteration);
                    *current.lock().unwrap_or_else(|e| e.into_inner()) = (iteration, input.clone());
                    match catch_unwind(AssertUnwindSafe(|| run(&input))) {
                        Ok(Ok(())) => accepted += 1,
                        Ok(Err(_)) => refused += 1,
                        Err(payload) => {
                            let message = payload
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            panics.push(format!(
                                "{parser} panicked ({message}) on OXCLIP_FUZZ_SEED={run_seed} \
                                 OXCLIP_FUZZ_ITER={iteration}; input {}",
                                hex_prefix(&input)
                            ));
                            if panics.len() >= 10 {
                                break;
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                let largest = LARGEST.with(Cell::get);
                PARSER.with(|p| p.set(""));
                (accepted, refused, panics, largest, start.elapsed().as_secs_f64())
            })
            .expect("spawns the fuzz worker")
    };
    // The watchdog: an input that takes longer than the limit fails the test here (the worker,
    // stuck, is left behind; the test binary ends without it).
    let limit = hang_limit();
    let (mut seen, mut since) = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let now = done.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > limit {
            let (iteration, input) = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            panic!(
                "{parser} hung: one input took over {} s (OXCLIP_FUZZ_SEED={run_seed} \
                 OXCLIP_FUZZ_ITER={iteration}); input {}",
                limit.as_secs(),
                hex_prefix(&input)
            );
        }
    }
    let (accepted, refused, panics, largest_allocation, secs) = match worker.join() {
        Ok(out) => out,
        Err(payload) => std::panic::resume_unwind(payload),
    };
    let report = Report {
        parser,
        inputs: accepted + refused + panics.len() as u64,
        accepted,
        refused,
        panics,
        largest_allocation,
        secs,
    };
    println!("{report}");
    assert!(report.panics.is_empty(), "{}", report.panics.join("\n"));
    assert!(
        report.largest_allocation < ALLOCATION_BOUND,
        "{parser} made a single allocation of {} bytes, over the {ALLOCATION_BOUND}-byte bound",
        report.largest_allocation
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_a_function_of_seed_parser_and_iteration() {
        let seeds = vec![b"{\"a\": [1, 2, 3]}".to_vec(), b"key: 12\nother: [x]\n".to_vec()];
        let a = Inputs::new("p", seeds.clone(), 7);
        let b = Inputs::new("p", seeds.clone(), 7);
        let c = Inputs::new("q", seeds, 7);
        let range = 0..2000;
        let xs: Vec<_> = range.clone().map(|i| a.get(i)).collect();
        assert_eq!(xs, range.clone().map(|i| b.get(i)).collect::<Vec<_>>());
        assert_ne!(xs, range.clone().map(|i| c.get(i)).collect::<Vec<_>>());
        // The mutations reach far from the seeds: many distinct inputs, some longer, some empty.
        let distinct: std::collections::BTreeSet<_> = xs.iter().collect();
        assert!(distinct.len() > 1000, "{} distinct inputs", distinct.len());
        assert!(xs.iter().any(Vec::is_empty));
        assert!(xs.iter().any(|x| x.len() > 20));
    }
}
