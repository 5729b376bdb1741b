//! Checkpoints: `<run_dir>/checkpoints/step_<N>/` holding `model.safetensors` (open_clip keys,
//! in the weights' precision: fp32, or bf16 under `pure_bf16`), `optimizer.safetensors` (AdamW
//! moments and step; under `dist.shard`, one `optimizer-<r>-of-<W>.safetensors` per rank
//! instead, each rank's pieces, written by that rank) and `trainer_state.json` (counters, loader position, seed, the loss scale
//! under `amp`, the resolved config). A checkpoint is written under a temporary name and
//! renamed into place, so a directory named `step_<N>` was complete when written. Last into the
//! temporary folder goes `manifest.json`, each file's size and CRC-32, so that resume can also
//! tell a checkpoint damaged since (truncated by a full disk, a partial copy, a flipped byte)
//! and fall back to an older one instead of failing on it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use oxclip_data_loader::LoaderState;
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use crate::error::{io_err, Result, TrainError};
use crate::interchange::safetensors::{read_safetensors, write_tensors_to};
use crate::interchange::weights;
use crate::optim::AdamW;
use crate::precision::GradScalerState;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const MANIFEST_FILE: &str = "manifest.json";

/// The files every checkpoint has, each listed in the manifest; the optimizer state is
/// [`OPTIMIZER_FILE`] or a whole set of [`shard_file`]s.
const FILES: [&str; 2] = [MODEL_FILE, STATE_FILE];

/// Rank `rank`'s optimizer shard of a `world`-rank run sharded with `dist.shard`.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-{rank:05}-of-{world:05}.safetensors")
}

/// The optimizer files of the checkpoint whose files are `names`: [`OPTIMIZER_FILE`], or every
/// shard of one world size, in rank order; `Err` names what is missing.
fn optimizer_files<'a>(
    names: impl Iterator<Item = &'a str>,
) -> std::result::Result<Vec<String>, String> {
    let mut world = None;
    let mut shards = Vec::new();
    for name in names {
        if name == OPTIMIZER_FILE {
            return Ok(vec![OPTIMIZER_FILE.into()]);
        }
        let Some((rank, of)) = name
            .strip_prefix("optimizer-")
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.split_once("-of-"))
        else {
            continue;
        };
        if let (Ok(rank), Ok(of)) = (rank.parse::<usize>(), of.parse::<usize>()) {
            if world.is_some_and(|w| w != of) {
                return Err(format!(
                    "optimizer shards of {} and of {of} ranks",
                    world.unwrap_or(0)
                ));
            }
            world = Some(of);
            shards.push(rank);
        }
    }
    let Some(world) = world else {
        return Err(format!("neither {OPTIMIZER_FILE} nor optimizer shards"));
    };
    shards.sort_unstable();
    shards.dedup();
    if let Some(&past) = shards.iter().find(|&&r| r >= world) {
        return Err(format!("optimizer shard {} of a world of {world}", shard_file(past, world)));
    }
    // The world size comes from a file name, or from a manifest that may be damaged: the
    // missing shards are counted and the first few named, never listed (or allocated) in full.
    if shards.len() != world {
        const NAMED: usize = 4;
        let missing: Vec<String> = (0..world)
            .filter(|r| shards.binary_search(r).is_err())
            .take(NAMED)
            .map(|r| shard_file(r, world))
            .collect();
        let count = world - shards.len();
        let more =
            if count > NAMED { format!(" and {} more", count - NAMED) } else { String::new() };
        return Err(format!("optimizer shards missing: {}{more}", missing.join(", ")));
    }
    Ok((0..world).map(|r| shard_file(r, world)).collect())
}

/// `manifest.json`: what each file was when written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, FileRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub bytes: u64,
    /// CRC-32 (IEEE) as 8 hex digits: crc32fast runs at several GB/s, so hashing a
    /// 600 MB model adds a small fraction of the time writing it takes.
    pub crc32: String,
}

/// What makes a checkpoint unusable: the file and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub file: String,
    pub problem: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.problem)
    }
}

impl Damage {
    fn new(file: &str, problem: impl Into<String>) -> Self {
        Self { file: file.into(), problem: problem.into() }
    }

    /// The damage as an error naming the file inside `dir`.
    pub fn into_error(self, dir: &Path) -> TrainError {
        TrainError::Checkpoint { path: dir.join(&self.file), message: self.problem }
    }
}

/// How far [`verify`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Sizes only: cheap enough to run over every kept checkpoint at each save.
    Sizes,
    /// Sizes and checksums: reads every byte, as resume does once.
    Checksums,
}

/// What [`verify`] found in a usable checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The manifest's sizes (and checksums, at [`Depth::Checksums`]) match.
    Manifest,
    /// Written before manifests existed: the safetensors files are as long as their headers
    /// say and the state parses, but there is nothing to compare contents with.
    NoManifest,
}

fn crc32_of(path: &Path) -> Result<(u64, u32)> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hasher.finalize()))
}

/// Records the size and checksum of each checkpoint file in `dir`, writing the manifest under
/// a temporary name and renaming it, so a manifest is whole whenever it exists.
pub(crate) fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    let names = dir_names(dir)?;
    let optimizer = optimizer_files(names.iter().map(String::as_str))
        .map_err(|message| TrainError::Checkpoint { path: dir.into(), message })?;
    for file in FILES.iter().copied().chain(optimizer.iter().map(String::as_str)) {
        let (bytes, crc) = crc32_of(&dir.join(file))?;
        files.insert(file.to_string(), FileRecord { bytes, crc32: format!("{crc:08x}") });
    }
    let path = dir.join(MANIFEST_FILE);
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    let json = serde_json::to_string_pretty(&Manifest { files })
        .map_err(|e| TrainError::Checkpoint { path: path.clone(), message: e.to_string() })?;
    write_synced(&tmp, |out| out.write_all(json.as_bytes())).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Creates `path`, fills it with `fill`, and fsyncs it through the same handle, so that every
/// error comes back as the OS gave it (`No space left on device`, `File too large`): a full
/// disk or a quota can fail a write, and an error of the deferred writeback (EIO, or ENOSPC
/// on file systems that allocate late) only shows at fsync. Either way the caller learns of
/// it before it records the file as whole in a manifest.
fn write_synced(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    fill(&mut out)?;
    let file = out.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()
}

/// fsyncs the directory `dir`, making the names created, removed or renamed in it durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Checks that the checkpoint in `dir` is whole: every file the manifest lists is there with
/// its size (and checksum, at [`Depth::Checksums`]). A folder without a manifest but with a
/// trainer state is taken as written before manifests existed and checked as far as its
/// own files allow (see [`Verified::NoManifest`]); one with neither is incomplete.
pub fn verify(dir: &Path, depth: Depth) -> std::result::Result<Verified, Damage> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        if !dir.join(STATE_FILE).is_file() {
            return Err(Damage::new(
                MANIFEST_FILE,
                format!("missing, and so is {STATE_FILE}: the checkpoint was never completed"),
            ));
        }
        let names = dir_names(dir).map_err(|e| Damage::new(OPTIMIZER_FILE, e.to_string()))?;
        let optimizer = optimizer_files(names.iter().map(String::as_str))
            .map_err(|problem| Damage::new(OPTIMIZER_FILE, problem))?;
        for file in [MODEL_FILE].into_iter().chain(optimizer.iter().map(String::as_str)) {
            safetensors_length_matches(&dir.join(file))
                .map_err(|problem| Damage::new(file, problem))?;
        }
        read_state(dir).map_err(|e| Damage::new(STATE_FILE, e.to_string()))?;
        return Ok(Verified::NoManifest);
    }
    let text = fs::read_to_string(&manifest_path)
        .map_err(|e| Damage::new(MANIFEST_FILE, e.to_string()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Damage::new(MANIFEST_FILE, format!("unreadable: {e}")))?;
    for file in FILES {
        if !manifest.files.contains_key(file) {
            return Err(Damage::new(MANIFEST_FILE, format!("does not list {file}")));
        }
    }
    optimizer_files(manifest.files.keys().map(String::as_str))
        .map_err(|problem| Damage::new(MANIFEST_FILE, format!("lists {problem}")))?;
    for (file, record) in &manifest.files {
        let path = dir.join(file);
        let bytes = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(_) => return Err(Damage::new(file, "missing")),
        };
        if bytes != record.bytes {
            return Err(Damage::new(
                file,
                format!("size {bytes} of {} bytes written", record.bytes),
            ));
        }
        if depth == Depth::Checksums {
            let (_, crc) = crc32_of(&path).map_err(|e| Damage::new(file, e.to_string()))?;
            let crc = format!("{crc:08x}");
            if crc != record.crc32 {
                return Err(Damage::new(
                    file,
                    format!("checksum mismatch: crc32 {crc}, {} when written", record.crc32),
                ));
            }
        }
    }
    Ok(Verified::Manifest)
}

/// The names of the files in `dir`.
fn dir_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        names.push(entry.map_err(io_err(dir))?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// A safetensors file is 8 bytes of header length, the JSON header, then the data, which ends
/// where the furthest tensor's `data_offsets` says: a truncated file is shorter than that.
fn safetensors_length_matches(path: &Path) -> std::result::Result<(), String> {
    let mut file = fs::File::open(path).map_err(|_| "missing".to_string())?;
    let bytes = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| format!("size {bytes}: shorter than a safetensors header"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > bytes.saturating_sub(8) {
        return Err(format!("size {bytes}: shorter than its {header_len}-byte safetensors header"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| format!("unreadable safetensors header: {e}"))?;
    let data_end = header
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let expected = 8 + header_len + data_end;
    if bytes != expected {
        return Err(format!("size {bytes} of {expected} bytes its header describes"));
    }
    Ok(())
}

/// Everything besides tensors that a resumed run needs to continue as if never stopped.
/// There is no global RNG state to save: after initialisation nothing draws from it, and the
/// loader derives every random choice from (seed, epoch, sample index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Samples consumed over all ranks.
    pub samples_seen: u64,
    pub seed: u64,
    /// Position of the next training batch (rank 0's).
    pub loader: LoaderState,
    /// Every rank's position, in rank order, when the run had several ranks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_loaders: Vec<LoaderState>,
    /// The loss scale of a `precision: amp` run (the same on every rank); absent otherwise,
    /// and in checkpoints written before amp existed, which resume at the initial scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<GradScalerState>,
    /// The resolved run config, as written to `<run_dir>/config.yaml`.
    pub config: String,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// A checkpoint copied to host memory: what the writer needs, and nothing the training loop
/// goes on changing.
pub struct Snapshot {
    weights: Vec<(String, Tensor)>,
    /// `None` under `dist.shard`: every rank wrote its shard ([`write_shard`]) already.
    optimizer: Option<Vec<(String, Tensor)>>,
    state: TrainerState,
}

/// A copy of `t` on the host, as `kind`, sharing no storage with `t`: the optimizer updates
/// parameters and moments in place while the writer reads the copy.
fn host_copy(t: &Tensor, kind: tch::Kind) -> Result<Tensor> {
    Ok(t.f_detach()?.f_to_device_(tch::Device::Cpu, kind, false, true)?.f_contiguous()?)
}

/// Copies the weights (in their own kind: fp32, as [`weights::save_weights`] writes them, or
/// bf16 under `pure_bf16`, as open_clip's checkpoint of such a run holds them), the optimizer
/// state and `state` to host memory. This is the part of a save the training loop waits for.
/// `optimizer`: `None` under `dist.shard`, whose ranks write their shards themselves.
pub fn snapshot(
    vs: &nn::VarStore,
    optimizer: Option<&AdamW>,
    state: &TrainerState,
) -> Result<Snapshot> {
    let _no_grad = tch::no_grad_guard();
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let weights =
        vars.into_iter().map(|(k, v)| Ok((k, host_copy(&v, v.kind())?))).collect::<Result<_>>()?;
    let optimizer = optimizer.map(optimizer_on_host).transpose()?;
    Ok(Snapshot { weights, optimizer, state: state.clone() })
}

fn optimizer_on_host(optimizer: &AdamW) -> Result<Vec<(String, Tensor)>> {
    optimizer.state_tensors().into_iter().map(|(k, t)| Ok((k, host_copy(&t, t.kind())?))).collect()
}

/// The folder a checkpoint of `step` is written in before it is renamed into place.
fn tmp_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".step_{step}.tmp"))
}

/// Under `dist.shard`, on rank 0 before any rank writes its shard of `step`: a fresh
/// temporary folder for the checkpoint (one left by a run that died mid-write goes).
pub fn start_sharded(run_dir: &Path, step: u64) -> Result<()> {
    let tmp = tmp_dir(run_dir, step);
    let failed = |action| {
        let path = tmp.clone();
        move |source| TrainError::CheckpointWrite { step, action, path, source }
    };
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(failed("removing the leftover"))?;
    }
    fs::create_dir_all(&tmp).map_err(failed("creating"))
}

/// Under `dist.shard`, on every rank once rank 0 has run [`start_sharded`]: this rank's
/// optimizer shard of `step`, written and fsynced into the checkpoint's temporary folder.
/// A write that fails removes what it wrote (space a full disk needs back) and fails this
/// rank, whose error then ends every rank's next collective: rank 0 never gets to write a
/// manifest for a checkpoint missing a shard.
pub fn write_shard(
    run_dir: &Path,
    step: u64,
    rank: usize,
    world: usize,
    optimizer: &AdamW,
) -> Result<()> {
    let path = tmp_dir(run_dir, step).join(shard_file(rank, world));
    let state = optimizer_on_host(optimizer)?;
    test_delay();
    write_synced(&path, |out| write_tensors_to(&state, out)).map_err(|source| {
        let _ = fs::remove_file(&path);
        TrainError::CheckpointWrite { step, action: "writing", path: path.clone(), source }
    })
}

/// Where the checkpoint of `step` lands.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step_{step}"))
}

/// A test build's pause before each file (`crate::fault::checkpoint_delay`); none otherwise.
fn test_delay() {
    if let Some(delay) = crate::fault::checkpoint_delay() {
        std::thread::sleep(delay);
    }
}

/// Writes a checkpoint for `state.step` and keeps only the newest `keep`, all before
/// returning (the training loop uses [`Writer`], which does the writing in the background).
pub fn save(
    run_dir: &Path,
    vs: &nn::VarStore,
    optimizer: &AdamW,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    write(run_dir, snapshot(vs, Some(optimizer), state)?, keep)
}

/// Writes `snap` under a temporary name, fsyncs each file, writes the manifest, renames the
/// folder into place, then prunes to the newest `keep` complete checkpoints. A write that
/// fails before the rename (a full disk, a quota, a size limit, an I/O error) is a
/// [`TrainError::CheckpointWrite`] naming the file and the OS's cause; the temporary folder
/// is removed (a full disk wants the space back), and the checkpoints before it are as they
/// were, since nothing but the rename ever makes a `step_<N>` folder.
pub fn write(run_dir: &Path, snap: Snapshot, keep: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let step = snap.state.step;
    let tmp = tmp_dir(run_dir, step);
    let dst = root.join(format!("step_{step}"));
    if let Err(e) = write_tmp(&root, &tmp, &snap) {
        if let Err(cleanup) = fs::remove_dir_all(&tmp) {
            if cleanup.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "could not remove the failed checkpoint {}: {cleanup}",
                    tmp.display()
                );
            }
        }
        return Err(e);
    }
    let failed = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::CheckpointWrite { step, action, path, source }
    };
    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(failed("removing the older copy", &dst))?;
    }
    fs::rename(&tmp, &dst).map_err(failed("renaming into place", &dst))?;
    sync_dir(&root).map_err(io_err(&root))?;
    prune(&root, keep)?;
    Ok(dst)
}

/// Every file of `snap` into the temporary folder `tmp`, each fsynced, then the manifest,
/// then `tmp` itself fsynced. Each file is fsynced before the manifest names it, and the
/// folder before it is renamed, so a `step_<N>` folder never points at data still only in
/// the page cache: after a crash or power cut it could otherwise hold empty or short files,
/// and a late writeback error would only be found by resume.
fn write_tmp(root: &Path, tmp: &Path, snap: &Snapshot) -> Result<()> {
    let step = snap.state.step;
    let failed = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::CheckpointWrite { step, action, path, source }
    };
    fs::create_dir_all(root).map_err(failed("creating", root))?;
    // Under dist.shard the ranks' shards are in the folder already (`start_sharded`).
    if snap.optimizer.is_some() {
        if tmp.exists() {
            fs::remove_dir_all(tmp).map_err(failed("removing the leftover", tmp))?;
        }
        fs::create_dir_all(tmp).map_err(failed("creating", tmp))?;
    }
    let model_path = tmp.join(MODEL_FILE);
    test_delay();
    write_synced(&model_path, |out| write_tensors_to(&snap.weights, out))
        .map_err(failed("writing", &model_path))?;
    if let Some(optimizer) = &snap.optimizer {
        let opt_path = tmp.join(OPTIMIZER_FILE);
        test_delay();
        write_synced(&opt_path, |out| write_tensors_to(optimizer, out))
            .map_err(failed("writing", &opt_path))?;
    }
    let state_path = tmp.join(STATE_FILE);
    let json = serde_json::to_string_pretty(&snap.state)
        .map_err(|e| TrainError::Checkpoint { path: state_path.clone(), message: e.to_string() })?;
    test_delay();
    write_synced(&state_path, |out| out.write_all(json.as_bytes()))
        .map_err(failed("writing", &state_path))?;
    // Hashed from the files just written (from the page cache, not the disk), so the manifest
    // holds exactly what `verify` will compute.
    write_manifest(tmp).map_err(|e| match e {
        TrainError::Io { path, source } => {
            // It reads each file back to hash it, then writes itself.
            let manifest = path.ends_with(format!(".{MANIFEST_FILE}.tmp"));
            let action = if manifest { "writing" } else { "reading back" };
            TrainError::CheckpointWrite { step, action, path, source }
        }
        other => other,
    })?;
    sync_dir(tmp).map_err(failed("syncing", tmp))
}

/// Writes checkpoints on a thread of its own, one at a time, so training goes on while a
/// checkpoint of several gigabytes reaches the disk. [`Writer::start`] and [`Writer::wait`]
/// first wait for the write in flight and return its error, if it failed: a failed write
/// fails the run at the next save or at the end, never silently.
#[derive(Default)]
pub struct Writer {
    in_flight: Option<std::thread::JoinHandle<Result<PathBuf>>>,
}

impl Writer {
    /// Waits for the previous write, then starts writing `snap`; returns the directory the
    /// checkpoint will have once written.
    pub fn start(&mut self, run_dir: &Path, snap: Snapshot, keep: usize) -> Result<PathBuf> {
        self.wait()?;
        let dst = step_dir(run_dir, snap.state.step);
        let run_dir = run_dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || write(&run_dir, snap, keep))
            .map_err(io_err(&dst))?;
        self.in_flight = Some(handle);
        Ok(dst)
    }

    /// The error of a write that has failed since the last call, without waiting for one
    /// still going. The training loop asks at every step, so that a failed write (a full
    /// disk) stops the run at once rather than `checkpoint_every` steps later.
    pub fn check(&mut self) -> Result<()> {
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait()?;
        }
        Ok(())
    }

    /// Waits until the write in flight (if any) is on disk, fsynced, with its manifest;
    /// returns its directory.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        let Some(handle) = self.in_flight.take() else { return Ok(None) };
        match handle.join() {
            Ok(written) => written.map(Some),
            Err(_) => Err(TrainError::Checkpoint {
                path: PathBuf::from("checkpoints"),
                message: "the checkpoint writer thread panicked".into(),
            }),
        }
    }
}

impl Drop for Writer {
    /// A run that fails elsewhere still lets the checkpoint in flight finish.
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("writing a checkpoint failed: {e}");
        }
    }
}

/// The complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_in(&checkpoints_dir(run_dir))
}

/// The `step_<N>` directories of a `checkpoints/` folder, oldest first.
pub fn list_in(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step_").and_then(|s| s.parse::<u64>().ok()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes what is older than the newest `keep` complete checkpoints. Only complete ones count
/// towards `keep`, so damaged newer ones never push the last good one out; those damaged ones
/// are left in place (resume skips them, and they may be worth a look) until `keep` complete
/// checkpoints are newer than them. "Complete" here is the size check: hashing every kept
/// checkpoint at every save would re-read gigabytes; resume checks the checksums.
fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list_in(root)?;
    let mut complete = 0;
    let mut cut = None;
    for (i, (_, dir)) in all.iter().enumerate().rev() {
        if complete == keep {
            cut = Some(i + 1);
            break;
        }
        if verify(dir, Depth::Sizes).is_ok() {
            complete += 1;
        }
    }
    for (_, path) in all.iter().take(cut.unwrap_or(0)) {
        fs::remove_dir_all(path).map_err(io_err(path))?;
    }
    // The temporary folders of writes killed or failed before (`.step_<N>.tmp`): never
    // checkpoints, and only space taken. Nothing else writes now: the next checkpoint's
    // folder is only made once this write is over.
    for entry in fs::read_dir(root).map_err(io_err(root))? {
        let path = entry.map_err(io_err(root))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with(".step_") && name.ends_with(".tmp") && path.is_dir() {
            fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint's trainer state without touching tensors.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint { path, message: e.to_string() })
}

/// The newest checkpoint that [`verify`] finds whole, checksums included; older ones are tried
/// when a newer one is damaged or incomplete (each skip is logged with the file and the fault).
pub fn latest_valid(run_dir: &Path) -> Result<Option<PathBuf>> {
    latest_valid_in(&checkpoints_dir(run_dir))
}

/// [`latest_valid`] among the `step_<N>` directories of a `checkpoints/` folder.
pub fn latest_valid_in(root: &Path) -> Result<Option<PathBuf>> {
    for (_, dir) in list_in(root)?.into_iter().rev() {
        match check(&dir) {
            Ok(()) => return Ok(Some(dir)),
            Err(damage) => tracing::warn!("skipping checkpoint {}: {damage}", dir.display()),
        }
    }
    Ok(None)
}

/// Verifies `dir` fully (sizes and checksums) and parses its state; a checkpoint without a
/// manifest passes with a warning, as runs from before manifests must still resume.
pub fn check(dir: &Path) -> std::result::Result<(), Damage> {
    if verify(dir, Depth::Checksums)? == Verified::NoManifest {
        tracing::warn!("checkpoint {} has no {MANIFEST_FILE} (written before oxclip recorded checksums): checked by size only", dir.display());
    }
    read_state(dir).map_err(|e| Damage::new(STATE_FILE, e.to_string()))?;
    Ok(())
}

/// Restores weights and optimizer state from `dir`; returns the trainer state. The optimizer
/// state may be whole or in shards of any world size, and `optimizer` either: each rank
/// takes what it holds from each file in turn (one file in memory at a time).
pub fn load(dir: &Path, vs: &nn::VarStore, optimizer: &mut AdamW) -> Result<TrainerState> {
    let state = read_state(dir)?;
    let names = dir_names(dir)?;
    let optimizer_files = optimizer_files(names.iter().map(String::as_str));
    let missing: Vec<&str> = [
        (!dir.join(MODEL_FILE).is_file()).then_some(MODEL_FILE),
        optimizer_files.is_err().then_some(OPTIMIZER_FILE),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        // Weights alone (an export, or a copy without the optimizer) can start a fresh run, not continue one.
        return Err(TrainError::Checkpoint {
            path: dir.into(),
            message: format!("has no {}, so training cannot continue from it; --init starts a fresh run from its weights", missing.join(" or ")),
        });
    }
    weights::load_weights(vs, &dir.join(MODEL_FILE))?;
    let mut loading = optimizer.start_loading();
    let files =
        optimizer_files.map_err(|message| TrainError::Checkpoint { path: dir.into(), message })?;
    for file in &files {
        let path = dir.join(file);
        let part: BTreeMap<String, Tensor> = read_safetensors(&path)?;
        loading
            .take(optimizer, &part)
            .map_err(|e| TrainError::Checkpoint { path: path.clone(), message: e.to_string() })?;
    }
    loading.finish(optimizer).map_err(|e| TrainError::Checkpoint {
        path: dir.join(&files[0]),
        message: e.to_string(),
    })?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Clip, ModelConfig};
    use crate::optim::AdamWConfig;
    use tch::{Device, Kind};

    fn setup(seed: i64) -> (nn::VarStore, Clip, AdamW) {
        tch::manual_seed(seed);
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml")).expect("parses");
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).expect("builds");
        let opt = AdamW::new(
            vs.variables().into_iter().collect(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 },
        );
        (vs, model, opt)
    }

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            samples_seen: step * 4,
            seed: 3,
            loader: LoaderState::at(1, 2),
            rank_loaders: Vec::new(),
            grad_scaler: None,
            config: "x: 1\n".into(),
        }
    }

    #[test]
    fn round_trip_restores_weights_moments_and_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, model, mut opt) = setup(0);
        // One real update so the moments are non-zero.
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        model.encode_image(&images).sum(Kind::Float).backward();
        opt.step(1e-3, None).expect("steps");
        let saved = save(dir.path(), &vs, &opt, &state(5), 3).expect("saves");
        assert_eq!(saved, dir.path().join("checkpoints/step_5"));

        let (vs2, _, mut opt2) = setup(9);
        let restored = load(&saved, &vs2, &mut opt2).expect("loads");
        assert_eq!(restored, state(5));
        assert_eq!(opt2.steps_taken(), 1);
        let a = vs.variables();
        for (name, t) in vs2.variables() {
            assert!(t.equal(&a[&name]), "{name}");
        }
        let (s1, s2) = (opt.state_tensors(), opt2.state_tensors());
        for ((k1, t1), (k2, t2)) in s1.iter().zip(&s2) {
            assert_eq!(k1, k2);
            assert!(t1.equal(t2), "{k1}");
        }
    }

    /// amp's loss scale travels in trainer_state.json; a state written before it existed (or by
    /// a run without amp) reads as none, which resumes at the initial scale.
    #[test]
    fn the_loss_scale_round_trips_and_older_states_have_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, _, mut opt) = setup(0);
        let scaler = GradScalerState { scale: 32768.0, growth_tracker: 17, skipped_steps: 3 };
        let with = TrainerState { grad_scaler: Some(scaler), ..state(4) };
        let saved = save(dir.path(), &vs, &opt, &with, 3).expect("saves");
        assert_eq!(load(&saved, &vs, &mut opt).expect("loads").grad_scaler, Some(scaler));
        let text = fs::read_to_string(saved.join(STATE_FILE)).expect("reads");
        assert!(text.contains("\"grad_scaler\""), "{text}");
        let without = serde_json::to_string(&state(4)).expect("json");
        assert!(!without.contains("grad_scaler"), "{without}");
        let old: TrainerState = serde_json::from_str(&without).expect("parses");
        assert_eq!(old.grad_scaler, None);
    }

    /// pure_bf16: the checkpoint holds the weights as they are, bf16, and loads back exactly.
    #[test]
    fn bf16_weights_are_saved_as_bf16() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut vs, _, opt) = setup(0);
        vs.bfloat16();
        let saved = save(dir.path(), &vs, &opt, &state(2), 3).expect("saves");
        let file = read_safetensors(&saved.join(MODEL_FILE)).expect("reads");
        assert!(file.values().all(|t| t.kind() == Kind::BFloat16));
        let (mut vs2, _, mut opt2) = setup(9);
        vs2.bfloat16();
        load(&saved, &vs2, &mut opt2).expect("loads");
        let a = vs.variables();
        for (name, t) in vs2.variables() {
            assert!(t.equal(&a[&name]), "{name}");
        }
    }

    #[test]
    fn keeps_the_newest_and_skips_damaged_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, _, opt) = setup(0);
        for step in [2, 4, 6] {
            save(dir.path(), &vs, &opt, &state(step), 2).expect("saves");
        }
        let steps: Vec<u64> =
            list(dir.path()).expect("lists").into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![4, 6]);
        // A damaged newest checkpoint (as a crash mid-copy by hand could leave) is passed over.
        fs::remove_file(dir.path().join("checkpoints/step_6").join(OPTIMIZER_FILE)).expect("rm");
        assert_eq!(
            latest_valid(dir.path()).expect("ok"),
            Some(dir.path().join("checkpoints/step_4"))
        );
        fs::write(dir.path().join("checkpoints/step_4").join(STATE_FILE), "{").expect("write");
        assert_eq!(latest_valid(dir.path()).expect("ok"), None);
        // Leftover temporary directories are not checkpoints.
        fs::create_dir_all(dir.path().join("checkpoints/.step_8.tmp")).expect("mkdir");
        assert!(list(dir.path()).expect("lists").iter().all(|(s, _)| *s != 8));
    }

    fn three_checkpoints(keep: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, _, opt) = setup(0);
        for step in [2, 4, 6] {
            save(dir.path(), &vs, &opt, &state(step), keep).expect("saves");
        }
        let root = dir.path().join("checkpoints");
        (dir, root)
    }

    fn truncate(path: &Path, by: u64) {
        let file = fs::OpenOptions::new().write(true).open(path).expect("opens");
        let len = file.metadata().expect("meta").len();
        file.set_len(len - by).expect("truncates");
    }

    #[test]
    fn the_manifest_records_each_files_size_and_crc32() {
        let (_dir, root) = three_checkpoints(3);
        let step = root.join("step_6");
        let manifest: Manifest =
            serde_json::from_str(&fs::read_to_string(step.join(MANIFEST_FILE)).expect("reads"))
                .expect("parses");
        assert_eq!(
            manifest.files.keys().map(String::as_str).collect::<Vec<_>>(),
            vec![MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
        );
        for (file, record) in &manifest.files {
            let bytes = fs::read(step.join(file)).expect("reads");
            assert_eq!(record.bytes, bytes.len() as u64, "{file}");
            assert_eq!(record.crc32, format!("{:08x}", crc32fast::hash(&bytes)), "{file}");
        }
        // No temporary manifest is left behind.
        assert!(!step.join(format!(".{MANIFEST_FILE}.tmp")).exists());
        assert_eq!(verify(&step, Depth::Checksums), Ok(Verified::Manifest));
    }

    #[test]
    fn a_truncated_latest_model_falls_back_to_the_previous_checkpoint() {
        let (dir, root) = three_checkpoints(3);
        truncate(&root.join("step_6").join(MODEL_FILE), 100);
        let damage = verify(&root.join("step_6"), Depth::Sizes).expect_err("damaged");
        assert_eq!(damage.file, MODEL_FILE);
        let written = fs::metadata(root.join("step_4").join(MODEL_FILE)).expect("meta").len();
        assert_eq!(damage.problem, format!("size {} of {written} bytes written", written - 100));
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(root.join("step_4")));
    }

    #[test]
    fn a_flipped_byte_is_caught_by_the_checksum() {
        let (dir, root) = three_checkpoints(3);
        let path = root.join("step_6").join(MODEL_FILE);
        let mut bytes = fs::read(&path).expect("reads");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        fs::write(&path, &bytes).expect("writes");
        // Same size: only the checksum tells.
        assert_eq!(verify(&root.join("step_6"), Depth::Sizes), Ok(Verified::Manifest));
        let damage = verify(&root.join("step_6"), Depth::Checksums).expect_err("damaged");
        assert_eq!(damage.file, MODEL_FILE);
        assert!(damage.problem.starts_with("checksum mismatch"), "{damage}");
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(root.join("step_4")));
    }

    #[test]
    fn a_checkpoint_without_manifest_or_state_is_incomplete() {
        let (dir, root) = three_checkpoints(3);
        // As a writer killed before its last two files would leave it in place.
        fs::remove_file(root.join("step_6").join(MANIFEST_FILE)).expect("rm");
        fs::remove_file(root.join("step_6").join(STATE_FILE)).expect("rm");
        let damage = verify(&root.join("step_6"), Depth::Checksums).expect_err("incomplete");
        assert_eq!(damage.file, MANIFEST_FILE);
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(root.join("step_4")));
        // A temporary folder holding everything but the manifest is never a checkpoint.
        let tmp = root.join(".step_8.tmp");
        fs::create_dir_all(&tmp).expect("mkdir");
        for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            fs::copy(root.join("step_4").join(file), tmp.join(file)).expect("copies");
        }
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(root.join("step_4")));
    }

    #[test]
    fn checkpoints_from_before_manifests_resume_by_size() {
        let (dir, root) = three_checkpoints(3);
        for step in [4, 6] {
            fs::remove_file(root.join(format!("step_{step}")).join(MANIFEST_FILE)).expect("rm");
        }
        assert_eq!(verify(&root.join("step_6"), Depth::Checksums), Ok(Verified::NoManifest));
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(root.join("step_6")));
        // Their safetensors headers still tell a truncated file.
        truncate(&root.join("step_6").join(OPTIMIZER_FILE), 1);
        let damage = verify(&root.join("step_6"), Depth::Sizes).expect_err("damaged");
        assert_eq!(damage.file, OPTIMIZER_FILE);
        assert!(damage.problem.contains("bytes its header describes"), "{damage}");
        assert_eq!(latest_valid(dir.path()).expect("ok"), Some(root.join("step_4")));
    }

    #[test]
    fn an_explicit_damaged_checkpoint_is_an_error_naming_the_file() {
        let (_dir, root) = three_checkpoints(3);
        let step = root.join("step_6");
        fs::remove_file(step.join(OPTIMIZER_FILE)).expect("rm");
        let err = check(&step).expect_err("damaged").into_error(&step);
        let text = err.to_string();
        assert!(
            text.contains(&step.join(OPTIMIZER_FILE).display().to_string())
                && text.contains("missing"),
            "{text}"
        );
    }

    #[test]
    fn the_background_writer_writes_what_the_synchronous_one_does_as_of_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, model, mut opt) = setup(0);
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        model.encode_image(&images).sum(Kind::Float).backward();
        opt.step(1e-3, None).expect("steps");
        // The reference: what the synchronous path (weights::save_weights for the weights) writes.
        let sync = tempfile::tempdir().expect("tempdir");
        let sync_dir = save(sync.path(), &vs, &opt, &state(5), 3).expect("saves");
        let weights_ref = sync.path().join("weights.safetensors");
        weights::save_weights(&vs, &weights_ref).expect("saves weights");

        let mut writer = Writer::default();
        let dst = writer
            .start(dir.path(), snapshot(&vs, Some(&opt), &state(5)).expect("copies"), 3)
            .expect("starts");
        // Training goes on, changing weights and moments in place while the writer writes.
        model.encode_image(&images).sum(Kind::Float).backward();
        opt.step(1e-3, None).expect("steps");
        assert_eq!(writer.wait().expect("writes"), Some(dst.clone()));
        assert_eq!(dst, dir.path().join("checkpoints/step_5"));
        assert_eq!(writer.wait().expect("nothing in flight"), None);
        let read = |p: &Path| fs::read(p).expect("reads");
        assert!(
            read(&dst.join(MODEL_FILE)) == read(&weights_ref),
            "model.safetensors differs from weights::save_weights'"
        );
        for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE] {
            assert!(
                read(&dst.join(file)) == read(&sync_dir.join(file)),
                "{file} differs from the synchronous writer's"
            );
        }
        assert_eq!(verify(&dst, Depth::Checksums), Ok(Verified::Manifest));
        // The snapshot shares nothing with the live weights: they have moved on since.
        let (vs2, _, mut opt2) = setup(9);
        load(&dst, &vs2, &mut opt2).expect("loads");
        let live = vs.variables();
        assert!(
            vs2.variables().iter().any(|(name, t)| !t.equal(&live[name])),
            "the checkpoint followed the live weights"
        );
    }

    #[test]
    fn a_failed_background_write_surfaces_at_the_next_save_and_at_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, _, opt) = setup(0);
        // `checkpoints` is a file, so the writer cannot make its folder.
        fs::write(dir.path().join("checkpoints"), b"").expect("writes");
        let mut writer = Writer::default();
        writer
            .start(dir.path(), snapshot(&vs, Some(&opt), &state(2)).expect("copies"), 3)
            .expect("starts: the write fails later");
        let err = writer
            .start(dir.path(), snapshot(&vs, Some(&opt), &state(4)).expect("copies"), 3)
            .expect_err("the first write failed");
        assert!(
            err.to_string().contains(&dir.path().join("checkpoints").display().to_string()),
            "{err}"
        );
        // The failed save did not start another write; a failing last write fails the wait.
        assert_eq!(writer.wait().expect("nothing in flight"), None);
        writer
            .start(dir.path(), snapshot(&vs, Some(&opt), &state(6)).expect("copies"), 3)
            .expect("starts");
        assert!(writer.wait().is_err());
    }

    /// A rank's shard written to a full device (`/dev/full` answers every write with ENOSPC):
    /// an error naming the file and the OS's cause, and the partial file gone.
    #[test]
    fn a_shard_write_on_a_full_disk_names_the_file_and_the_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, _, opt) = setup(0);
        start_sharded(dir.path(), 8).expect("starts");
        let path = tmp_dir(dir.path(), 8).join(shard_file(1, 2));
        std::os::unix::fs::symlink("/dev/full", &path).expect("links");
        let err = write_shard(dir.path(), 8, 1, 2, &opt).expect_err("the disk is full");
        let text = err.to_string();
        assert_eq!(
            text,
            format!(
                "checkpoint step 8: writing {} failed: No space left on device (os error 28); \
                 earlier checkpoints are intact, free space and resume with --resume auto",
                path.display()
            )
        );
        assert!(!path.exists() && fs::symlink_metadata(&path).is_err(), "left behind");
    }

    #[test]
    fn prune_keeps_complete_checkpoints_behind_damaged_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vs, _, opt) = setup(0);
        save(dir.path(), &vs, &opt, &state(2), 2).expect("saves");
        save(dir.path(), &vs, &opt, &state(4), 2).expect("saves");
        let root = dir.path().join("checkpoints");
        truncate(&root.join("step_4").join(MODEL_FILE), 10);
        // step_4 is damaged, so step_2 stays the one complete checkpoint kept.
        save(dir.path(), &vs, &opt, &state(5), 2).expect("saves");
        let steps =
            |d: &Path| list(d).expect("lists").into_iter().map(|(s, _)| s).collect::<Vec<u64>>();
        assert_eq!(steps(dir.path()), vec![2, 4, 5]);
        truncate(&root.join("step_5").join(MODEL_FILE), 10);
        save(dir.path(), &vs, &opt, &state(6), 1).expect("saves");
        assert_eq!(steps(dir.path()), vec![6]);
    }

    #[test]
    fn optimizer_state_is_one_file_or_every_shard_of_one_world() {
        let files = |names: &[&str]| optimizer_files(names.iter().copied());
        assert_eq!(files(&[MODEL_FILE, OPTIMIZER_FILE]), Ok(vec![OPTIMIZER_FILE.to_string()]));
        let two = [shard_file(1, 2), shard_file(0, 2)];
        assert_eq!(
            files(&[two[0].as_str(), two[1].as_str(), STATE_FILE]),
            Ok(vec![shard_file(0, 2), shard_file(1, 2)])
        );
        let err = files(&[shard_file(0, 3).as_str(), shard_file(2, 3).as_str()]).unwrap_err();
        assert!(err.contains("missing: optimizer-00001-of-00003.safetensors"), "{err}");
        let err = files(&[shard_file(0, 2).as_str(), shard_file(1, 3).as_str()]).unwrap_err();
        assert!(err.contains("of 2 and of 3 ranks"), "{err}");
        assert!(files(&[MODEL_FILE]).unwrap_err().contains("neither"));
    }

    /// Issue 26 (fuzzing): a damaged manifest naming a shard of a world of 10^11 ranks made
    /// `verify` ask for 16 GiB to list the missing ones (and panic on capacity overflow for
    /// larger worlds); the missing shards are now counted and the first few named.
    #[test]
    fn issue_26_a_huge_world_in_a_shard_name_is_refused_without_listing_it() {
        let files = |names: &[&str]| optimizer_files(names.iter().copied());
        for world in ["99999999999", "18446744073709551615"] {
            let name = format!("optimizer-00000-of-{world}.safetensors");
            let err = files(&[name.as_str()]).unwrap_err();
            let more = world.parse::<usize>().unwrap() - 5;
            assert!(
                err.starts_with("optimizer shards missing: optimizer-00001-of-")
                    && err.ends_with(&format!(" and {more} more")),
                "{err}"
            );
        }
        let err = files(&[shard_file(0, 2).as_str(), shard_file(5, 2).as_str()]).unwrap_err();
        assert_eq!(err, "optimizer shard optimizer-00005-of-00002.safetensors of a world of 2");
        let err = files(&["optimizer-00000-of-00000.safetensors"]).unwrap_err();
        assert!(err.contains("of a world of 0"), "{err}");

        // Through the manifest, as resume reads it.
        let dir = tempfile::tempdir().expect("tempdir");
        for file in [MODEL_FILE, STATE_FILE] {
            fs::write(dir.path().join(file), b"x").expect("writes");
        }
        let record = r#"{"bytes": 1, "crc32": "8cdc1683"}"#;
        let manifest = format!(
            r#"{{"files": {{"{MODEL_FILE}": {record}, "{STATE_FILE}": {record},
                "optimizer-00000-of-99999999999.safetensors": {record}}}}}"#
        );
        fs::write(dir.path().join(MANIFEST_FILE), manifest).expect("writes");
        let damage = verify(dir.path(), Depth::Sizes).unwrap_err();
        assert_eq!(damage.file, MANIFEST_FILE);
        assert!(damage.problem.starts_with("lists optimizer shards missing"), "{damage}");
    }
}
