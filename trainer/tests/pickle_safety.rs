//! Issue 25's safety acceptance for the pickle reader: pickles that would run code (os.system,
//! builtins.eval, subprocess.Popen, a whole pickled class) are refused naming the global and
//! nothing of theirs runs; damaged and hostile files (a storage declared as 2^40 bytes, a
//! wrong storage size, a view past its storage, truncated zip and legacy files, zip bombs
//! with honest and forged sizes) are each a clear error, with no large allocation: this test
//! binary's allocator records the largest single allocation of each thread, and every hostile
//! case stays under a few megabytes. (libtorch allocates outside it, but a refused file never
//! reaches a tensor.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};

use oxclip_trainer::interchange::pickle::TorchFile;

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call is passed on to the system allocator unchanged; `note` only reads and
// writes a thread-local Cell, which allocates nothing.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// The largest single allocation `f` made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

const SMALL: usize = 4 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pickle")
}

/// The error opening `path` and reading its weights gives, and the largest allocation made.
fn refused(path: &Path) -> (String, usize) {
    let (result, largest) =
        largest_allocation(|| TorchFile::open(path).and_then(|f| f.state_dict().map(|_| ())));
    let err = result.expect_err("refused").to_string();
    (err, largest)
}

#[test]
fn pickles_that_run_code_are_refused_naming_the_global() {
    let cwd = std::env::current_dir().expect("cwd");
    for (file, global) in [
        ("os_system.pt", "os.system"),
        ("builtins_eval.pt", "builtins.eval"),
        ("subprocess_popen.pt", "subprocess.Popen"),
        ("unknown_class.pt", "torch.nn.modules.linear.Linear"),
    ] {
        let (err, largest) = refused(&fixtures().join("evil").join(file));
        assert!(err.contains(&format!("refuses the global {global}")), "{file}: {err}");
        assert!(largest < SMALL, "{file}: {largest} bytes allocated");
    }
    for name in ["os_system", "builtins_eval", "subprocess_popen"] {
        for dir in [&cwd, &fixtures(), &fixtures().join("evil")] {
            let marker = dir.join(format!("pwned_{name}"));
            assert!(!marker.exists(), "{} exists: the pickle ran", marker.display());
        }
    }
    let (err, _) = refused(&fixtures().join("evil/unknown_class.pt"));
    assert!(err.contains("state_dict()"), "says what to save instead: {err}");
}

#[test]
fn hostile_sizes_are_clear_errors_without_large_allocations() {
    for (file, needle) in [
        ("storage_2pow40.pt", "(1099511627776 bytes), and archive/data/0 holds 24 bytes"),
        ("wrong_size.pt", "declared as 7 FloatStorage elements (28 bytes)"),
        ("view_past_end.pt", "reaches past the end of its storage"),
        ("truncated.pt", "damaged or truncated zip"),
        ("legacy_truncated.pt", "truncated"),
        ("legacy_2pow40.pt", "past the end of the file"),
    ] {
        let (err, largest) = refused(&fixtures().join("hostile").join(file));
        assert!(err.contains(needle), "{file}: {err}");
        assert!(!err.contains("panicked"), "{file}: {err}");
        assert!(largest < SMALL, "{file}: {largest} bytes allocated");
    }
}

/// A zip of `archive/data.pkl` deflated from `size` zero bytes, written in pieces (so the
/// test itself allocates little).
fn deflated_zeros(path: &Path, member: &str, size: usize) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).expect("create"));
    let deflated =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file(member, deflated).expect("member");
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        zip.write_all(&chunk).expect("write");
    }
    zip.finish().expect("finish");
}

#[test]
fn zip_bombs_are_refused_before_they_inflate() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Honest: 300 MiB of zeros deflated to a few hundred kilobytes.
    let honest = dir.path().join("bomb.pt");
    deflated_zeros(&honest, "archive/data.pkl", 300 << 20);
    assert!(std::fs::metadata(&honest).expect("len").len() < 2 << 20);
    let (err, largest) = refused(&honest);
    assert!(err.contains("zip bomb"), "{err}");
    assert!(largest < SMALL, "{largest} bytes allocated");

    // Forged: a small member whose headers claim 2 GiB.
    let forged = dir.path().join("forged.pt");
    deflated_zeros(&forged, "archive/data.pkl", 1 << 20);
    let mut bytes = std::fs::read(&forged).expect("read");
    let claim = 0x7fff_ffffu32.to_le_bytes();
    for (signature, at) in [(b"PK\x03\x04", 22), (b"PK\x01\x02", 24)] {
        let start = bytes.windows(4).position(|w| w == signature).expect("header");
        bytes[start + at..start + at + 4].copy_from_slice(&claim);
    }
    std::fs::write(&forged, &bytes).expect("write");
    let (err, largest) = refused(&forged);
    assert!(err.contains("more than deflate can give"), "{err}");
    assert!(largest < SMALL, "{largest} bytes allocated");
}

/// The allocator sees the reader's allocations: reading real weights records their size.
#[test]
fn the_allocation_record_sees_storages_read() {
    let (weights, largest) = largest_allocation(|| {
        TorchFile::open(&fixtures().join("open_clip_zip.pt")).and_then(|f| f.state_dict())
    });
    let biggest: usize = weights
        .expect("reads")
        .values()
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .max()
        .expect("tensors");
    assert!(largest >= biggest, "{largest} < {biggest}");
}
