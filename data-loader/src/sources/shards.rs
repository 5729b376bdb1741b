//! The shard catalog: where each WebDataset shard lives (a local file or a `pipe:` command),
//! how many samples it holds, and how to read its samples. A part of a Parquet or Arrow
//! table (`table.rs`) is a shard here too, counted from its file's metadata: the stream
//! plan deals, shuffles and resumes both alike.
//!
//! The streaming loader plans an epoch from sample counts before it reads a byte, so every
//! shard needs one. They come, in order of preference, from an index beside the shards
//! (`index.json` written by `oxclip data pack` / `data synth`, webdataset's `sizes.json`, or
//! img2dataset's `NNNNN_stats.json`), from the count cache (`$OXCLIP_CACHE/shard-counts.json`),
//! or from reading the shard once (tar headers and members, no image decoding), after which
//! the count is cached. A sizes file the user names (`data.shard_sizes`, webdataset's
//! `sizes.json` format) comes first of all.
//!
//! Remote shards (`pipe:`) are not read once just to count them when the user gives the epoch
//! length (`data.samples_per_epoch`, open_clip's `--train-num-samples`): each shard without a
//! count is then taken to hold an equal share of it, as open_clip's `with_epoch` cuts an
//! epoch, and is marked [`Shard::estimated`].
//!
//! A count that turns out wrong is not fatal: a shard that ends early yields `truncated_shard`
//! skips for its missing samples, and samples past the count are ignored (see
//! `plan/stream.rs`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::ControlFlow;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::table::{CaptionDraw, TablePart};
use crate::error::DataError;
use crate::formats::index::ShardIndex;
use crate::formats::webdataset::{for_each_sample_in, write_atomic, RawSample};
use crate::parallel::{default_threads, map_in_order};
use crate::seed::mix;
use crate::skip::{SampleError, SkipCounts, SkipReason};

/// Read-buffer size for shard streams: large sequential reads.
const READ_BUFFER: usize = 1 << 20;

/// Seconds a shard read may wait for a byte before the shard counts as stalled
/// (`data.read_timeout_s`): generous, so that a slow store that still delivers is never cut
/// off; it only ends reads that would never finish (a `pipe:` command that hangs, a stalled
/// object store or NFS server).
pub const DEFAULT_READ_TIMEOUT_S: f64 = 300.0;

/// `data.read_timeout_s` (or `--read-timeout-s`) as a deadline: `None`, never, for `None` or
/// 0; an error saying what is wrong for a negative or non-finite number of seconds.
pub fn read_timeout(secs: Option<f64>) -> Result<Option<Duration>, String> {
    match secs {
        None => Ok(None),
        Some(0.0) => Ok(None),
        Some(s) => Duration::try_from_secs_f64(s)
            .map(Some)
            .map_err(|_| format!("{s} is not a number of seconds >= 0 (0 or null: wait for ever)")),
    }
}

/// The default deadline, [`DEFAULT_READ_TIMEOUT_S`].
pub fn default_read_timeout() -> Option<Duration> {
    Some(Duration::from_secs_f64(DEFAULT_READ_TIMEOUT_S))
}

/// Set by a shard stream when a read waited its whole deadline: why, in words. The stream
/// fails that read, and the caller reads the stall from here to tell it from a truncation.
type Stall = Arc<OnceLock<String>>;

/// Where one shard's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShardLocation {
    /// A local (or mounted) `.tar` file.
    File(PathBuf),
    /// `pipe:CMD`: the standard output of `sh -c CMD`, as webdataset runs it, e.g.
    /// `aws s3 cp s3://bucket/00012.tar -`.
    Pipe(String),
    /// A part of a Parquet or Arrow table (a row group, a record batch), streamed as a shard
    /// is (`sources/table.rs`).
    Table(TablePart),
}

impl fmt::Display for ShardLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardLocation::File(p) => write!(f, "{}", p.display()),
            ShardLocation::Pipe(cmd) => write!(f, "pipe:{cmd}"),
            ShardLocation::Table(part) => f.write_str(&part.describe()),
        }
    }
}

impl ShardLocation {
    /// The name log lines and skip reports use.
    pub fn name(&self) -> PathBuf {
        match self {
            ShardLocation::File(p) => p.clone(),
            ShardLocation::Pipe(cmd) => PathBuf::from(format!("pipe:{cmd}")),
            ShardLocation::Table(part) => PathBuf::from(part.describe()),
        }
    }

    /// The shard's file name (`00012.tar`): a file's, or for a command the file name of its
    /// last argument ending in `.tar` (`aws s3 cp s3://bucket/00012.tar -`).
    pub fn file_name(&self) -> Option<String> {
        let name =
            |path: &str| Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned());
        match self {
            ShardLocation::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            ShardLocation::Pipe(cmd) => cmd
                .split_whitespace()
                .map(|arg| arg.trim_matches(|c| c == '\'' || c == '"'))
                .rfind(|arg| arg.ends_with(".tar"))
                .and_then(name),
            ShardLocation::Table(part) => {
                part.path().file_name().map(|n| n.to_string_lossy().into_owned())
            }
        }
    }

    /// Opens a tar shard for one sequential read, each read waiting at most
    /// [`DEFAULT_READ_TIMEOUT_S`] for a byte. A table part is no byte stream: read it
    /// through [`for_each_sample`](Self::for_each_sample).
    pub fn open(&self) -> std::io::Result<Box<dyn Read + Send>> {
        self.open_within(default_read_timeout(), &Stall::default())
    }

    /// [`open`](Self::open) with reads that wait at most `timeout` for a byte (`None`: for
    /// ever); a read that waits that long fails with `TimedOut` and records why in `stall`.
    fn open_within(
        &self,
        timeout: Option<Duration>,
        stall: &Stall,
    ) -> std::io::Result<Box<dyn Read + Send>> {
        match (self, timeout) {
            (ShardLocation::File(p), None) => {
                Ok(Box::new(BufReader::with_capacity(READ_BUFFER, File::open(p)?)))
            }
            (ShardLocation::File(p), Some(timeout)) => {
                Ok(Box::new(ThreadedFile::open(p, timeout, Arc::clone(stall))?))
            }
            (ShardLocation::Pipe(cmd), _) => {
                Ok(Box::new(PipeReader::spawn(cmd, timeout, Arc::clone(stall))?))
            }
            (ShardLocation::Table(part), _) => Err(std::io::Error::other(format!(
                "{} is a table part, not a tar stream",
                part.describe()
            ))),
        }
    }

    /// Streams the shard's samples to `f` until it ends or `f` breaks: a tar's members
    /// grouped into samples (see `formats::webdataset`), or a table part's rows, a caption
    /// of each drawn by `draw` where a row has several. Each read waits at most
    /// [`DEFAULT_READ_TIMEOUT_S`]; see [`for_each_sample_within`](Self::for_each_sample_within).
    /// The error says why the shard cannot be read at all; `f` has then seen nothing.
    pub fn for_each_sample(
        &self,
        draw: CaptionDraw,
        f: impl FnMut(Result<RawSample, SampleError>) -> ControlFlow<()>,
    ) -> Result<(), String> {
        self.for_each_sample_within(draw, default_read_timeout(), f)
    }

    /// [`for_each_sample`](Self::for_each_sample) with reads that wait at most `timeout` for
    /// a byte (`None`: for ever). A tar stream that stalls that long ends with one
    /// [`SkipReason::StalledShard`] item for the sample being read (a `pipe:` command is
    /// killed first); table parts are read without a deadline.
    pub fn for_each_sample_within(
        &self,
        draw: CaptionDraw,
        timeout: Option<Duration>,
        mut f: impl FnMut(Result<RawSample, SampleError>) -> ControlFlow<()>,
    ) -> Result<(), String> {
        match self {
            ShardLocation::Table(part) => part.for_each_row(draw, f),
            _ => {
                let stall = Stall::default();
                let reader = self.open_within(timeout, &stall).map_err(|e| e.to_string())?;
                for_each_sample_in(reader, &self.name(), |item| {
                    // The tar reader sees a failed read, a truncation; the stream knows better.
                    let item = item.map_err(|mut e| {
                        if let Some(why) = stall.get() {
                            e.reason = SkipReason::StalledShard;
                            e.message = why.clone();
                        }
                        e
                    });
                    f(item)
                });
                Ok(())
            }
        }
    }
}

/// The output of a `pipe:` command. At the end of its output the command's exit status is
/// checked: a failed download reads as an I/O error (so a truncated shard), never as a
/// silently short one. Each read waits at most `timeout` for a byte (poll(2) on the pipe):
/// a command silent that long is killed, with everything it started (it runs in a process
/// group of its own), and reaped, and the read fails as stalled. Dropping the reader early
/// kills the command the same way.
struct PipeReader {
    cmd: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
    finished: bool,
    timeout: Option<Duration>,
    stall: Stall,
}

impl PipeReader {
    fn spawn(cmd: &str, timeout: Option<Duration>, stall: Stall) -> std::io::Result<Self> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own group, so that killing it reaches what `sh` started (`curl`, `sleep`),
            // which would otherwise live on holding the pipe.
            .process_group(0)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the command's output could not be piped"))?;
        Ok(Self {
            cmd: cmd.to_owned(),
            child,
            stdout: BufReader::with_capacity(READ_BUFFER, stdout),
            finished: false,
            timeout,
            stall,
        })
    }

    /// Waits until the pipe has bytes (or is closed) for at most `timeout`; false if it never
    /// did.
    fn wait_readable(&self, timeout: Duration) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut fd = libc::pollfd {
            fd: self.stdout.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up, so that a deadline under a millisecond still waits.
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd, owned by this frame, for the call's duration.
            match unsafe { libc::poll(&mut fd, 1, ms) } {
                0 if left.is_zero() => return Ok(false),
                0 => continue,
                n if n > 0 => return Ok(true),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Kills the command's process group and reaps the command.
    fn kill(&mut self) {
        self.finished = true;
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signals the group the command leads (`process_group(0)`), which is
            // still ours: its leader is not reaped before the wait below.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(timeout) = self.timeout {
            if !self.finished && self.stdout.buffer().is_empty() && !self.wait_readable(timeout)? {
                self.kill();
                let why = format!(
                    "no byte for {} s (data.read_timeout_s): the command was killed",
                    timeout.as_secs_f64()
                );
                let _ = self.stall.set(why.clone());
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why));
            }
        }
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.finished {
            self.finished = true;
            let status = self.child.wait()?;
            if !status.success() {
                return Err(std::io::Error::other(format!("`{}` exited with {status}", self.cmd)));
            }
        }
        Ok(n)
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        if !self.finished {
            self.kill();
        }
    }
}

/// A shard file read on a thread of its own, a chunk ahead. A read that blocks in the kernel
/// (a hung NFS server, a stalled FUSE mount of an object store) cannot be interrupted; this
/// way the reader stops waiting for it after `timeout` and the shard counts as stalled, while
/// the thread stays blocked until the kernel gives up, then finds nobody listening and ends.
struct ThreadedFile {
    chunks: crossbeam_channel::Receiver<std::io::Result<Vec<u8>>>,
    /// Chunks read out, handed back to the thread to fill again.
    spare: crossbeam_channel::Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    /// The end of the file, or an error, was seen.
    ended: bool,
    timeout: Duration,
    stall: Stall,
}

impl ThreadedFile {
    fn open(path: &Path, timeout: Duration, stall: Stall) -> std::io::Result<Self> {
        let mut file = File::open(path)?;
        let (tx, chunks) = crossbeam_channel::bounded::<std::io::Result<Vec<u8>>>(2);
        let (spare, spares) = crossbeam_channel::bounded::<Vec<u8>>(4);
        std::thread::Builder::new().name("oxclip-shard-read".into()).spawn(move || loop {
            let mut buf = spares.try_recv().unwrap_or_default();
            buf.resize(READ_BUFFER, 0);
            let read = loop {
                match file.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let end = !matches!(read, Ok(n) if n > 0);
            let sent = tx.send(read.map(|n| {
                buf.truncate(n);
                buf
            }));
            if end || sent.is_err() {
                return;
            }
        })?;
        Ok(Self { chunks, spare, current: Vec::new(), pos: 0, ended: false, timeout, stall })
    }
}

impl Read for ThreadedFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            let chunk = match self.chunks.recv_timeout(self.timeout) {
                Ok(chunk) => chunk,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let why = format!(
                        "no byte for {} s (data.read_timeout_s)",
                        self.timeout.as_secs_f64()
                    );
                    let _ = self.stall.set(why.clone());
                    self.ended = true;
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why));
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(std::io::Error::other("the shard's reader thread ended"));
                }
            };
            let chunk = chunk.inspect_err(|_| self.ended = true)?;
            if chunk.is_empty() {
                self.ended = true;
            }
            let done = std::mem::replace(&mut self.current, chunk);
            let _ = self.spare.try_send(done);
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One `::`-separated part of a data spec: the text the user wrote and its shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSource {
    pub spec: String,
    pub shards: Vec<ShardLocation>,
}

/// One shard with its sample count and the source it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    pub location: ShardLocation,
    /// Samples (items the tar reader yields, good or bad) in the shard.
    pub samples: u64,
    /// Index of its source in [`ShardSet::sources`].
    pub source: usize,
    /// `samples` is a share of `samples_per_epoch`, not a count (see the module docs).
    pub estimated: bool,
}

/// What may stand in for reading shards to count them, and how long a read may stall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountHints {
    /// A JSON file `{"00000.tar": n, ...}` (webdataset's `sizes.json`), keyed by a shard's
    /// file name (for `pipe:` shards, that of the command's last `.tar` argument) or by its
    /// whole location (`pipe:CMD`).
    pub sizes_file: Option<PathBuf>,
    /// Samples per epoch over all ranks: `pipe:` shards without a count get an equal share.
    pub samples_per_epoch: Option<u64>,
    /// How long a read of a shard may wait for a byte, while counting and whenever the set's
    /// shards are read ([`ShardSet::read_timeout`]); `None`: for ever.
    pub read_timeout: Option<Duration>,
}

impl Default for CountHints {
    fn default() -> Self {
        Self { sizes_file: None, samples_per_epoch: None, read_timeout: default_read_timeout() }
    }
}

/// Called while shards are counted at start-up with (shards counted, shards to count).
pub type CountProgress = dyn Fn(u64, u64) + Send + Sync;

static COUNT_PROGRESS: std::sync::OnceLock<Box<CountProgress>> = std::sync::OnceLock::new();

/// Installs the process's shard-counting progress report (the binary shows a bar); the first
/// call wins. Without one, counting reports through `tracing` only.
pub fn on_count_progress(report: impl Fn(u64, u64) + Send + Sync + 'static) {
    let _ = COUNT_PROGRESS.set(Box::new(report));
}

fn count_progress(done: u64, total: u64) {
    if let Some(report) = COUNT_PROGRESS.get() {
        report(done, total);
    }
}

/// Every shard of a spec, counted.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardSet {
    pub shards: Vec<Shard>,
    /// The spec text of each `::` source.
    pub sources: Vec<String>,
    /// Shards that could not be opened, or stalled, while counting: reported once, never
    /// read.
    pub open_skips: SkipCounts,
    /// How long each read of a shard may wait for a byte before the shard counts as stalled
    /// (`data.read_timeout_s`); `None`: for ever. Readers of the set pass it to
    /// [`ShardLocation::for_each_sample_within`].
    pub read_timeout: Option<Duration>,
}

impl ShardSet {
    /// Counts the shards of `sources` (see the module docs), caching new counts in
    /// [`default_cache_dir`].
    pub fn resolve(sources: &[ShardSource]) -> Result<Self, DataError> {
        Self::resolve_with(sources, &CountHints::default())
    }

    /// [`resolve`](Self::resolve), taking counts from `hints` where they give them.
    pub fn resolve_with(sources: &[ShardSource], hints: &CountHints) -> Result<Self, DataError> {
        Self::resolve_counted(sources, hints, default_cache_dir().as_deref())
    }

    /// [`resolve`](Self::resolve) with an explicit count cache directory (`None`: no cache).
    pub fn resolve_with_cache(
        sources: &[ShardSource],
        cache_dir: Option<&Path>,
    ) -> Result<Self, DataError> {
        Self::resolve_counted(sources, &CountHints::default(), cache_dir)
    }

    pub(crate) fn resolve_counted(
        sources: &[ShardSource],
        hints: &CountHints,
        cache_dir: Option<&Path>,
    ) -> Result<Self, DataError> {
        let sizes = match &hints.sizes_file {
            Some(path) => read_sizes_file(path)?,
            None => HashMap::new(),
        };
        let mut indexes = DirIndexes::default();
        let cache_path = cache_dir.map(|d| d.join("shard-counts.json"));
        let mut cache = cache_path.as_deref().map(CountCache::read).unwrap_or_default();
        let mut shards = Vec::new();
        let mut uncounted = Vec::new();
        for (source, part) in sources.iter().enumerate() {
            for location in &part.shards {
                let given = sizes
                    .get(&location.to_string())
                    .or_else(|| location.file_name().and_then(|name| sizes.get(&name)))
                    .copied();
                let known = given.or_else(|| match location {
                    ShardLocation::File(path) => {
                        indexes.count(path).or_else(|| cache.get(&CountCache::key(location)))
                    }
                    ShardLocation::Pipe(_) => cache.get(&CountCache::key(location)),
                    ShardLocation::Table(part) => Some(part.rows()),
                });
                if known.is_none() {
                    uncounted.push(shards.len());
                }
                shards.push(Shard {
                    location: location.clone(),
                    samples: known.unwrap_or(0),
                    source,
                    estimated: false,
                });
            }
        }
        if let Some(per_epoch) = hints.samples_per_epoch {
            estimate_pipe_shards(&mut shards, &mut uncounted, per_epoch);
        }
        let mut open_skips = SkipCounts::new();
        if !uncounted.is_empty() {
            tracing::info!(
                "counting the samples of {} shard(s) without an index (read once, no decoding; \
                 the counts are cached{})",
                uncounted.len(),
                cache_path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
            );
            // A batch of shards per thread at a time, so that progress can be reported.
            let threads = default_threads();
            let total = uncounted.len() as u64;
            let mut counted = Vec::with_capacity(uncounted.len());
            count_progress(0, total);
            for batch in uncounted.chunks(threads) {
                counted.extend(map_in_order(0..batch.len(), threads, |i| {
                    count_samples(&shards[batch[i]].location, hints.read_timeout)
                })?);
                count_progress(counted.len() as u64, total);
            }
            let mut unreadable = Vec::new();
            for (&i, result) in uncounted.iter().zip(counted) {
                match result {
                    Ok(n) => {
                        shards[i].samples = n;
                        cache.insert(CountCache::key(&shards[i].location), n);
                    }
                    Err((reason, message)) => {
                        tracing::warn!("skipping shard {}: {message}", shards[i].location);
                        open_skips.add(reason);
                        unreadable.push(i);
                    }
                }
            }
            // Counted once here, so never read again: reading would count it a second time.
            let mut position = 0;
            shards.retain(|_| {
                let keep = !unreadable.contains(&position);
                position += 1;
                keep
            });
            if let Some(path) = &cache_path {
                if let Err(e) = cache.write(path) {
                    tracing::warn!("could not cache shard counts: {e}");
                }
            }
        }
        Ok(Self {
            shards,
            sources: sources.iter().map(|s| s.spec.clone()).collect(),
            open_skips,
            read_timeout: hints.read_timeout,
        })
    }

    /// Samples in all shards.
    pub fn total_samples(&self) -> u64 {
        self.shards.iter().map(|s| s.samples).sum()
    }

    /// Index of each shard's first sample when all shards are laid end to end: a sample's
    /// global index is `offsets[shard] + ordinal`.
    pub fn offsets(&self) -> Vec<u64> {
        let mut acc = 0;
        self.shards
            .iter()
            .map(|s| {
                let start = acc;
                acc += s.samples;
                start
            })
            .collect()
    }

    /// Identifies the shard list and counts, so a saved loader position is only applied to
    /// the data it was saved for.
    pub fn fingerprint(&self) -> u64 {
        let mut h = mix(&[self.shards.len() as u64]);
        for shard in &self.shards {
            let name = shard.location.to_string();
            let name_hash = name.bytes().fold(0u64, |acc, b| mix(&[acc, u64::from(b)]));
            h = mix(&[h, name_hash, shard.samples]);
        }
        h
    }
}

/// Gives each `pipe:` shard of `uncounted` an equal share of `per_epoch` (shard `k` of `n`
/// gets `per_epoch / n`, plus one for the first `per_epoch % n`), marks it estimated and
/// takes it off `uncounted`: it is not read to count it.
fn estimate_pipe_shards(shards: &mut [Shard], uncounted: &mut Vec<usize>, per_epoch: u64) {
    let n = shards.len() as u64;
    let mut estimated = 0;
    uncounted.retain(|&i| {
        if !matches!(shards[i].location, ShardLocation::Pipe(_)) {
            return true;
        }
        shards[i].samples = per_epoch / n + u64::from((i as u64) < per_epoch % n);
        shards[i].estimated = true;
        estimated += 1;
        false
    });
    if estimated > 0 {
        tracing::info!(
            "{estimated} pipe: shard(s) without a count are not read to count them: with \
             samples_per_epoch {per_epoch}, each is taken to hold {} samples",
            per_epoch / n
        );
    }
}

/// A sizes file (`{"00000.tar": n}`), as a map from shard name to count.
fn read_sizes_file(path: &Path) -> Result<HashMap<String, u64>, DataError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| DataError::Read { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|source| DataError::Json { path: path.to_owned(), source })
}

/// Items the tar reader yields for `location` (good and bad samples), or why it cannot be
/// read at all: `unreadable_shard`, or `stalled_shard` when a read waited `timeout` (its
/// count is then unknown, so it is neither cached nor read again).
fn count_samples(
    location: &ShardLocation,
    timeout: Option<Duration>,
) -> Result<u64, (SkipReason, String)> {
    let unreadable = |message| (SkipReason::UnreadableShard, message);
    let mut n = 0u64;
    let mut first_error = None;
    let mut stalled = None;
    location
        .for_each_sample_within(CaptionDraw::default(), timeout, |item| {
            if let Err(e) = &item {
                if e.reason == SkipReason::StalledShard {
                    stalled = Some(e.message.clone());
                } else if n == 0 && (e.reason == SkipReason::UnreadableShard || e.key.is_none()) {
                    first_error = Some(e.message.clone());
                }
            }
            n += 1;
            ControlFlow::Continue(())
        })
        .map_err(unreadable)?;
    if let Some(message) = stalled {
        return Err((SkipReason::StalledShard, message));
    }
    // Failing before the first member header: not a shard at all.
    match first_error {
        Some(message) if n == 1 => Err(unreadable(message)),
        _ => Ok(n),
    }
}

/// Where counts of unindexed shards are cached: `$OXCLIP_CACHE`, else
/// `$XDG_CACHE_HOME/oxclip`, else `~/.cache/oxclip`; `None` when none can be found.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("OXCLIP_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("oxclip"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cache").join("oxclip"))
}

/// Per-directory sample counts from the index files shard writers leave beside shards.
#[derive(Default)]
struct DirIndexes {
    dirs: HashMap<PathBuf, HashMap<String, u64>>,
}

impl DirIndexes {
    fn count(&mut self, shard: &Path) -> Option<u64> {
        let dir = shard.parent().unwrap_or(Path::new("."));
        let name = shard.file_name()?.to_string_lossy().into_owned();
        let counts = self.dirs.entry(dir.to_owned()).or_insert_with(|| read_dir_index(dir));
        if let Some(&n) = counts.get(&name) {
            return Some(n);
        }
        // img2dataset: `00012_stats.json` beside `00012.tar`, with `"successes": n`.
        let stem = name.strip_suffix(".tar")?;
        let stats = std::fs::read_to_string(dir.join(format!("{stem}_stats.json"))).ok()?;
        let value: serde_json::Value = serde_json::from_str(&stats).ok()?;
        value.get("successes")?.as_u64()
    }
}

/// `index.json` (ours: `{"shards": [{"name", "samples"}]}`) and `sizes.json` (webdataset:
/// `{"00000.tar": n}`) of `dir`, merged; unreadable or malformed files are ignored.
fn read_dir_index(dir: &Path) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok();
    if let Some(sizes) = read("sizes.json") {
        if let Ok(map) = serde_json::from_str::<HashMap<String, u64>>(&sizes) {
            counts.extend(map);
        }
    }
    if let Some(index) = read("index.json") {
        if let Ok(index) = serde_json::from_str::<ShardIndex>(&index) {
            counts.extend(index.shards.into_iter().map(|e| (e.name, e.samples)));
        }
    }
    counts
}

/// Counts of shards that had no index, keyed by what identifies their content: a file's
/// absolute path, size and modification time (so a rewritten shard is counted again), or a
/// pipe's command.
#[derive(Default, Serialize, Deserialize)]
struct CountCache {
    counts: BTreeMap<String, u64>,
}

impl CountCache {
    fn key(location: &ShardLocation) -> String {
        match location {
            ShardLocation::File(path) => {
                let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
                let meta = std::fs::metadata(path).ok();
                let size = meta.as_ref().map_or(0, |m| m.len());
                let mtime = meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("file:{}:{size}:{mtime}", abs.display())
            }
            ShardLocation::Pipe(cmd) => format!("pipe:{cmd}"),
            // Never cached: a table's parts are counted from its metadata.
            ShardLocation::Table(part) => format!("table:{}", part.describe()),
        }
    }

    fn read(path: &Path) -> Self {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    fn get(&self, key: &str) -> Option<u64> {
        self.counts.get(key).copied()
    }

    fn insert(&mut self, key: String, n: u64) {
        self.counts.insert(key, n);
    }

    fn write(&self, path: &Path) -> Result<(), DataError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| DataError::Write { path: dir.to_owned(), source })?;
        }
        // Re-read and merge, so ranks or runs counting other shards at the same time keep
        // each other's entries.
        let mut merged = Self::read(path);
        merged.counts.extend(self.counts.clone());
        // Forget shards that are gone (temporary datasets), so the cache stays small.
        merged.counts.retain(|key, _| match key.strip_prefix("file:") {
            Some(rest) => rest.rsplitn(3, ':').nth(2).is_some_and(|file| Path::new(file).exists()),
            None => true,
        });
        let json = serde_json::to_vec_pretty(&merged)
            .map_err(|source| DataError::Json { path: path.to_owned(), source })?;
        write_atomic(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::webdataset::ShardWriter;

    fn shard(path: &Path, n: usize) {
        let mut w = ShardWriter::create(path).unwrap();
        for i in 0..n {
            w.write_sample(&format!("{i:05}"), &[("jpg", b"x"), ("txt", b"y")]).unwrap();
        }
        w.finish().unwrap();
    }

    fn source(locations: Vec<ShardLocation>) -> Vec<ShardSource> {
        vec![ShardSource { spec: "test".into(), shards: locations }]
    }

    #[test]
    fn counts_come_from_indexes_then_the_cache_then_reading() {
        let data = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            data.path().join("00000.tar"),
            data.path().join("00001.tar"),
            data.path().join("00002.tar"),
        );
        shard(&a, 3);
        shard(&b, 4);
        shard(&c, 5);
        // sizes.json knows a (with a deliberately different number, to see which is used);
        // img2dataset stats know b; c is counted.
        std::fs::write(data.path().join("sizes.json"), r#"{"00000.tar": 30}"#).unwrap();
        std::fs::write(data.path().join("00001_stats.json"), r#"{"successes": 40}"#).unwrap();
        let locations: Vec<_> =
            [&a, &b, &c].iter().map(|p| ShardLocation::File((*p).clone())).collect();
        let set =
            ShardSet::resolve_with_cache(&source(locations.clone()), Some(cache.path())).unwrap();
        let counts: Vec<u64> = set.shards.iter().map(|s| s.samples).collect();
        assert_eq!(counts, [30, 40, 5]);
        assert_eq!(set.offsets(), [0, 30, 70]);
        let cached = std::fs::read_to_string(cache.path().join("shard-counts.json")).unwrap();
        assert!(cached.contains("00002.tar") && !cached.contains("00000.tar"), "{cached}");

        // The cache answers next time; a rewritten shard is counted again.
        let again =
            ShardSet::resolve_with_cache(&source(locations.clone()), Some(cache.path())).unwrap();
        assert_eq!(again.fingerprint(), set.fingerprint());
        std::thread::sleep(std::time::Duration::from_millis(20));
        shard(&c, 2);
        let rewritten =
            ShardSet::resolve_with_cache(&source(locations), Some(cache.path())).unwrap();
        assert_eq!(rewritten.shards[2].samples, 2);
        assert_ne!(rewritten.fingerprint(), set.fingerprint());
    }

    #[test]
    fn pipe_shards_stream_and_count_and_failures_are_errors() {
        let data = tempfile::tempdir().unwrap();
        let a = data.path().join("00000.tar");
        shard(&a, 6);
        let ok = ShardLocation::Pipe(format!("cat '{}'", a.display()));
        let set = ShardSet::resolve_with_cache(&source(vec![ok.clone()]), None).unwrap();
        assert_eq!(set.shards[0].samples, 6);
        assert_eq!(ok.to_string(), format!("pipe:cat '{}'", a.display()));

        // A command that fails after part of its output: the read ends in an error.
        let failing = ShardLocation::Pipe(format!("head -c 1500 '{}'; exit 3", a.display()));
        let mut bytes = Vec::new();
        let err = failing.open().unwrap().read_to_end(&mut bytes).unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
        assert_eq!(bytes.len(), 1500);

        // A command with no output at all is an unreadable shard: skipped and counted.
        let empty = ShardLocation::Pipe("exit 1".into());
        // It is dropped from the set, so nothing reads it again and counts it twice.
        let set = ShardSet::resolve_with_cache(&source(vec![empty, ok]), None).unwrap();
        assert_eq!(set.shards.len(), 1);
        assert_eq!(set.shards[0].samples, 6);
        assert_eq!(set.open_skips.total(), 1);
        assert_eq!(set.open_skips.get("unreadable_shard"), Some(&1));
    }

    /// A command that writes part of a shard, then hangs (in a process it started): after
    /// the deadline the samples delivered are read, then one `stalled_shard` item; the hung
    /// process is killed. Counting such a shard skips it as stalled, never caching a count.
    #[test]
    fn a_pipe_that_stalls_is_killed_and_ends_as_a_stalled_shard() {
        let data = tempfile::tempdir().unwrap();
        let a = data.path().join("00000.tar");
        shard(&a, 40);
        let pid_file = data.path().join("sleep.pid");
        let cmd = format!(
            "head -c 5000 '{}'; sleep 100000 & echo $! > '{}'; wait",
            a.display(),
            pid_file.display()
        );
        let stalled = ShardLocation::Pipe(cmd);
        let timeout = Duration::from_millis(500);
        let mut items = Vec::new();
        let started = Instant::now();
        stalled
            .for_each_sample_within(CaptionDraw::default(), Some(timeout), |item| {
                items.push(item);
                ControlFlow::Continue(())
            })
            .unwrap();
        eprintln!("stall to skip: {:?} with data.read_timeout_s 0.5", started.elapsed());
        let (last, delivered) = items.split_last().unwrap();
        assert!(!delivered.is_empty() && delivered.iter().all(Result::is_ok), "{items:?}");
        let err = last.as_ref().unwrap_err();
        assert_eq!(err.reason, SkipReason::StalledShard);
        assert_eq!(err.message, "no byte for 0.5 s (data.read_timeout_s): the command was killed");
        // The `sleep` the command started is gone too (or a zombie waiting for its reaper).
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|s| !s.starts_with(" Z")))
        };
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "the command's sleep {pid} lives on");

        // Counted at start-up: skipped as stalled, and nothing cached for it.
        let cache = tempfile::tempdir().unwrap();
        let ok = ShardLocation::File(a.clone());
        let hints = CountHints { read_timeout: Some(timeout), ..CountHints::default() };
        let set = ShardSet::resolve_counted(
            &source(vec![ShardLocation::Pipe("sleep 100000".into()), ok]),
            &hints,
            Some(cache.path()),
        )
        .unwrap();
        assert_eq!(set.shards.len(), 1);
        assert_eq!(set.open_skips.get("stalled_shard"), Some(&1));
        assert_eq!(set.read_timeout, Some(timeout));
        let cached = std::fs::read_to_string(cache.path().join("shard-counts.json")).unwrap();
        assert!(!cached.contains("sleep"), "{cached}");
    }

    /// Files are read on a thread a chunk ahead when there is a deadline: the same bytes.
    #[test]
    fn a_file_read_with_a_deadline_reads_the_same_bytes() {
        let data = tempfile::tempdir().unwrap();
        let a = data.path().join("00000.tar");
        // Large enough for several chunks.
        let big = vec![7u8; 3 * READ_BUFFER + 123];
        let mut w = crate::formats::webdataset::ShardWriter::create(&a).unwrap();
        w.write_sample("00000", &[("jpg", &big), ("txt", b"y")]).unwrap();
        w.finish().unwrap();
        let location = ShardLocation::File(a.clone());
        let mut read = Vec::new();
        location
            .open_within(Some(Duration::from_secs(60)), &Stall::default())
            .unwrap()
            .read_to_end(&mut read)
            .unwrap();
        assert!(read == std::fs::read(&a).unwrap());
        assert_eq!(read_timeout(Some(0.0)), Ok(None));
        assert_eq!(read_timeout(None), Ok(None));
        assert_eq!(read_timeout(Some(1.5)), Ok(Some(Duration::from_millis(1500))));
        assert!(read_timeout(Some(-1.0)).unwrap_err().contains("-1 is not a number of seconds"));
        assert!(read_timeout(Some(f64::NAN)).is_err());
    }

    #[test]
    fn counting_reports_progress_to_the_installed_hook() {
        use std::collections::BTreeSet;
        static CALLS: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());
        on_count_progress(|done, total| CALLS.lock().unwrap().push((done, total)));
        let data = tempfile::tempdir().unwrap();
        // More shards than threads, so that counting goes in several rounds.
        let n = default_threads() as u64 + 3;
        let locations: Vec<_> = (0..n)
            .map(|i| {
                let path = data.path().join(format!("{i:05}.tar"));
                shard(&path, 2);
                ShardLocation::File(path)
            })
            .collect();
        let set = ShardSet::resolve_with_cache(&source(locations), None).unwrap();
        assert_eq!(set.total_samples(), 2 * n);
        let calls = CALLS.lock().unwrap().clone();
        // Other tests count shards at the same time; ours are the calls with our total.
        let ours: BTreeSet<u64> = calls.iter().filter(|c| c.1 == n).map(|c| c.0).collect();
        assert!(ours.contains(&0) && ours.contains(&n) && ours.len() >= 3, "{calls:?}");
    }
}
