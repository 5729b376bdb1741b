//! Device selection, and the start-up step that lets one CPU-built binary use CUDA: libtorch
//! registers its CUDA backend when `libtorch_cuda.so` is loaded, so we load it (globally)
//! when it is present before any tensor is made. `host_reads` counts the reads of tensor
//! values into host memory (each a wait for the GPU), for the tests that hold the step to none.

pub(crate) mod cudart;
pub mod host_reads;

use std::ffi::CString;

use tch::{Device, Tensor};

use oxclip_data_loader::Batch;

use crate::error::{Result, TrainError};

/// A device as written in a config: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

/// `spec` as written for `train.device` in a run config.
pub fn parse(spec: &str) -> Result<DeviceSpec> {
    parse_setting(spec, TRAIN_DEVICE)
}

/// The run config's device key, the setting [`parse`] and [`resolve`] speak of.
pub const TRAIN_DEVICE: &str = "train.device";

/// `spec` as given to `setting`: a config key (`train.device`) or a flag (`--device`), which
/// the error names.
pub fn parse_setting(spec: &str, setting: &str) -> Result<DeviceSpec> {
    match spec {
        "auto" => Ok(DeviceSpec::Auto),
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        s => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceSpec::Cuda).ok_or_else(
            || {
                let message =
                    format!("{} is not one of auto, cpu, cuda, cuda:N", written(setting, s));
                if setting.starts_with("--") {
                    TrainError::Device(message)
                } else {
                    TrainError::Config(message)
                }
            },
        ),
    }
}

/// The device a command's `--device` flag (or any `setting`) names, checked against the
/// hardware; errors suggest the value to give that same setting.
pub fn select(spec: &str, setting: &str) -> Result<Device> {
    resolve_setting(parse_setting(spec, setting)?, setting)
}

/// `value` given to `setting` as the user writes it: `--device cpu`, `train.device: cpu`.
fn written(setting: &str, value: &str) -> String {
    if setting.starts_with("--") {
        format!("{setting} {value}")
    } else {
        format!("{setting}: {value}")
    }
}

/// Loads `libtorch_cuda.so` if it can be found: `$OXCLIP_LIBTORCH_CUDA`, else the loader's
/// search path (the binary's rpath, `LD_LIBRARY_PATH`). Returns whether it is loaded.
pub fn load_cuda_backend() -> bool {
    let candidates: Vec<String> = std::env::var("OXCLIP_LIBTORCH_CUDA")
        .ok()
        .into_iter()
        .chain(std::iter::once("libtorch_cuda.so".to_string()))
        .collect();
    for name in candidates {
        let Ok(c_name) = CString::new(name.clone()) else { continue };
        // SAFETY: dlopen with a valid NUL-terminated name; loading runs libtorch_cuda's
        // initialisers (its CUDA backend registration, what this is for), and the handle is
        // never closed, so nothing is unloaded under libtorch.
        let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            tracing::debug!("loaded {name}");
            return true;
        }
    }
    false
}

/// Resolves a spec from `train.device` against the hardware that is there.
pub fn resolve(spec: DeviceSpec) -> Result<Device> {
    resolve_setting(spec, TRAIN_DEVICE)
}

/// Resolves a spec given to `setting` (a config key or a flag) against the hardware that is
/// there; the error's advice names that setting.
pub fn resolve_setting(spec: DeviceSpec, setting: &str) -> Result<Device> {
    let cuda_count = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    device_for(spec, cuda_count, setting)
}

fn device_for(spec: DeviceSpec, cuda_count: usize, setting: &str) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto if cuda_count > 0 => Ok(Device::Cuda(0)),
        DeviceSpec::Auto => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) if i < cuda_count => Ok(Device::Cuda(i)),
        DeviceSpec::Cuda(i) if cuda_count == 0 => Err(TrainError::Device(format!(
            "cuda:{i} requested but libtorch sees no CUDA device (is libtorch_cuda.so on the library path? \
             set OXCLIP_LIBTORCH_CUDA to its path); use {} to run on the CPU",
            written(setting, "cpu")
        ))),
        DeviceSpec::Cuda(i) => Err(TrainError::Device(format!(
            "cuda:{i} requested but only {cuda_count} CUDA device(s) exist (cuda:0 to cuda:{}); use {} or {}",
            cuda_count - 1,
            written(setting, "cuda:0"),
            written(setting, "cpu")
        ))),
    }
}

/// Where a rank sits: its global rank and its place among the ranks of its node (the
/// collectives' `WorldEnv` says it; the device needs only these three numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
}

/// The GPU one rank of a run trains on, from `train.device` as written (`spec`), this
/// process's place in the world (`None`: a single process), the CUDA devices it sees and
/// `CUDA_VISIBLE_DEVICES` when set (named in errors, as it decides what the count means).
///
/// Semantics are those of torchrun with DDP on `cuda:LOCAL_RANK`: every rank of a node sees
/// all of the node's GPUs and takes the one at its local rank, so `cuda` (and `auto` where
/// CUDA is there) means `cuda:LOCAL_RANK`. With several ranks on a node an explicit `cuda:N`
/// is accepted only where N is the rank's LOCAL_RANK: any other N puts two ranks on one GPU.
/// A node with more local ranks than GPUs is refused before any rank touches a GPU, and the
/// index is checked after the remap, not before.
pub fn for_rank(
    spec: &str,
    world: Option<&Placement>,
    cuda_count: usize,
    visible: Option<&str>,
) -> Result<Device> {
    let parsed = parse(spec)?;
    let Some(world) = world else { return device_for(parsed, cuda_count, TRAIN_DEVICE) };
    match parsed {
        DeviceSpec::Cpu => return Ok(Device::Cpu),
        DeviceSpec::Auto if cuda_count == 0 => return Ok(Device::Cpu),
        _ => {}
    }
    let who = format!(
        "rank {} (local rank {} of {})",
        world.rank, world.local_rank, world.local_world_size
    );
    let shown = match visible {
        Some(ids) => format!("{cuda_count} GPU(s) (CUDA_VISIBLE_DEVICES={ids})"),
        None => format!("{cuda_count} GPU(s)"),
    };
    if cuda_count == 0 {
        return Err(TrainError::Device(format!(
            "{who} asks for {} but libtorch sees no CUDA device (is libtorch_cuda.so on the library path? \
             set OXCLIP_LIBTORCH_CUDA to its path); use {} to run on the CPU",
            written(TRAIN_DEVICE, spec),
            written(TRAIN_DEVICE, "cpu")
        )));
    }
    let several = world.local_world_size > 1;
    if several && world.local_world_size > cuda_count {
        return Err(TrainError::Device(format!(
            "{who}: {} ranks run on this node but it shows {shown}; start one rank per GPU \
             (--nproc-per-node {cuda_count}, or under SLURM --ntasks-per-node equal to --gpus-per-node, \
             every task seeing all of the node's GPUs)",
            world.local_world_size
        )));
    }
    let explicit = spec.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok());
    let index = match explicit {
        Some(n) if several && n != world.local_rank => {
            return Err(TrainError::Config(format!(
                "{who}: {} would put several ranks of this node on one GPU; write {} and each rank \
                 takes cuda:LOCAL_RANK",
                written(TRAIN_DEVICE, spec),
                written(TRAIN_DEVICE, "cuda")
            )));
        }
        Some(n) => n,
        None => world.local_rank,
    };
    if index >= cuda_count {
        return Err(TrainError::Device(format!(
            "{who} needs cuda:{index} but this node shows {shown}"
        )));
    }
    Ok(Device::Cuda(index))
}

/// The device as users write it: `cpu`, `cuda:0`.
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

/// Bytes in use on `device` if it is a CUDA device (all processes, the CUDA context included),
/// from the runtime's `cudaMemGetInfo`; `None` off CUDA or when the runtime cannot be loaded.
/// libtorch's caching allocator keeps what it reserved, so after a workload this is close to
/// its peak. The runtime is the one the NCCL backend uses (libtorch's own copy, opened once and
/// kept), which needs no NCCL.
pub fn cuda_memory_in_use(device: Device) -> Option<u64> {
    let Device::Cuda(index) = device else { return None };
    // libtorch_cuda.so (and with it its cudart) is loaded when this says yes, so that copy is
    // the one found.
    if !tch::Cuda::is_available() {
        return None;
    }
    let cudart = cudart::Cudart::get().ok()?;
    let (free, total) = cudart.mem_info(i32::try_from(index).ok()?)?;
    Some(total.saturating_sub(free) as u64)
}

/// `device`'s compute capability (major, minor) when it is a CUDA device and the CUDA runtime
/// says; `None` otherwise.
pub fn cuda_compute_capability(device: Device) -> Option<(i32, i32)> {
    let Device::Cuda(index) = device else { return None };
    if !tch::Cuda::is_available() {
        return None;
    }
    cudart::Cudart::get().ok()?.compute_capability(i32::try_from(index).ok()?)
}

/// A loader batch as the towers take it: images `(b, 3, image_size, image_size)` and tokens
/// `(b, context_length)` on `device`, each through [`host_to_device`]. Training, evaluation,
/// `embed` and `index` all move their batches here.
pub fn batch_to_device(
    batch: &Batch,
    image_size: i64,
    context_length: i64,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let b = batch.batch_size as i64;
    let images = host_to_device(
        Tensor::from_slice(&batch.images).view([b, 3, image_size, image_size]),
        device,
    )?;
    let tokens =
        host_to_device(Tensor::from_slice(&batch.tokens).view([b, context_length]), device)?;
    Ok((images, tokens))
}

/// Moves a host tensor to `device`. On CUDA it goes through page-locked memory (libtorch's
/// caching host allocator) so the copy is asynchronous and overlaps the work queued before it.
pub fn host_to_device(host: Tensor, device: Device) -> Result<Tensor> {
    if !device.is_cuda() {
        return Ok(host);
    }
    let kind = host.kind();
    Ok(host.f_pin_memory(device)?.f_to_device_(device, kind, true, false)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!(parse("cpu").ok(), Some(DeviceSpec::Cpu));
        assert_eq!(parse("cuda").ok(), Some(DeviceSpec::Cuda(0)));
        assert_eq!(parse("cuda:3").ok(), Some(DeviceSpec::Cuda(3)));
        assert!(parse("gpu").is_err());
        assert!(parse("cuda:x").is_err());
    }

    #[test]
    fn errors_name_the_setting_they_came_from() {
        let flag = parse_setting("gpu", "--device").unwrap_err().to_string();
        assert!(
            flag.contains("--device gpu is not one of")
                && !flag.contains("train.device")
                && !flag.contains("training config"),
            "{flag}"
        );
        let key = parse("gpu").unwrap_err().to_string();
        assert!(key.contains("train.device: gpu"), "{key}");
        let none = device_for(DeviceSpec::Cuda(0), 0, "--device").unwrap_err().to_string();
        assert!(none.contains("use --device cpu") && !none.contains("train.device"), "{none}");
        let none = device_for(DeviceSpec::Cuda(0), 0, TRAIN_DEVICE).unwrap_err().to_string();
        assert!(none.contains("use train.device: cpu"), "{none}");
        let few = device_for(DeviceSpec::Cuda(2), 2, "--device").unwrap_err().to_string();
        assert!(few.contains("only 2 CUDA device(s)") && few.contains("--device cuda:0"), "{few}");
        assert_eq!(device_for(DeviceSpec::Auto, 0, "--device").ok(), Some(Device::Cpu));
        assert_eq!(device_for(DeviceSpec::Cuda(1), 2, "--device").ok(), Some(Device::Cuda(1)));
    }

    fn world(rank: usize, local_rank: usize, local_world_size: usize) -> Placement {
        Placement { rank, local_rank, local_world_size }
    }

    #[test]
    fn each_local_rank_takes_its_own_gpu() {
        let w = world(13, 5, 8);
        assert_eq!(for_rank("cuda", Some(&w), 8, None).ok(), Some(Device::Cuda(5)));
        assert_eq!(for_rank("auto", Some(&w), 8, None).ok(), Some(Device::Cuda(5)));
        // An explicit index that is the rank's own GPU is the same thing said twice.
        assert_eq!(for_rank("cuda:5", Some(&w), 8, None).ok(), Some(Device::Cuda(5)));
        assert_eq!(for_rank("cpu", Some(&w), 8, None).ok(), Some(Device::Cpu));
        assert_eq!(for_rank("auto", Some(&w), 0, None).ok(), Some(Device::Cpu));
        // cuda:0 is an explicit index like any other: the remap is for `cuda`, not for 0.
        assert_eq!(for_rank("cuda", Some(&world(1, 1, 2)), 2, None).ok(), Some(Device::Cuda(1)));
        assert!(for_rank("cuda:0", Some(&world(1, 1, 2)), 2, None).is_err());
        assert_eq!(for_rank("cuda:0", Some(&world(0, 0, 2)), 2, None).ok(), Some(Device::Cuda(0)));
    }

    #[test]
    fn one_rank_per_node_or_process_keeps_the_index_written() {
        // One rank on the node: no other rank to collide with, the index is the user's.
        let w = world(3, 0, 1);
        assert_eq!(for_rank("cuda", Some(&w), 4, None).ok(), Some(Device::Cuda(0)));
        assert_eq!(for_rank("cuda:3", Some(&w), 4, None).ok(), Some(Device::Cuda(3)));
        let few = for_rank("cuda:4", Some(&w), 4, Some("0,1,2,3")).unwrap_err().to_string();
        assert!(few.contains("rank 3 (local rank 0 of 1) needs cuda:4 but this node shows 4 GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3)"), "{few}");
        // A single process: as before.
        assert_eq!(for_rank("cuda:1", None, 2, None).ok(), Some(Device::Cuda(1)));
        assert_eq!(for_rank("cuda", None, 2, None).ok(), Some(Device::Cuda(0)));
        let none = for_rank("cuda:2", None, 2, None).unwrap_err().to_string();
        assert!(none.contains("only 2 CUDA device(s)"), "{none}");
    }

    #[test]
    fn an_explicit_other_gpu_on_a_shared_node_is_refused() {
        let err = for_rank("cuda:2", Some(&world(13, 5, 8)), 8, None).unwrap_err();
        assert!(matches!(err, TrainError::Config(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("rank 13 (local rank 5 of 8)")
                && msg.contains("train.device: cuda:2")
                && msg.contains("write train.device: cuda "),
            "{msg}"
        );
    }

    #[test]
    fn more_local_ranks_than_gpus_is_refused_naming_the_count() {
        let err = for_rank("cuda", Some(&world(5, 5, 8)), 4, Some("0,1,2,3")).unwrap_err();
        assert!(matches!(err, TrainError::Device(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("rank 5 (local rank 5 of 8): 8 ranks run on this node but it shows 4 GPU(s) (CUDA_VISIBLE_DEVICES=0,1,2,3)"), "{msg}");
        assert!(msg.contains("--nproc-per-node 4"), "{msg}");
        // Rank 0 of that node would fit on its GPU, and is refused all the same: every rank
        // stops at start-up, not only those past the count.
        assert!(for_rank("cuda", Some(&world(0, 0, 8)), 4, None).is_err());
        assert!(for_rank("auto", Some(&world(0, 0, 8)), 4, None).is_err());
        // Without CUDA_VISIBLE_DEVICES the message gives the count alone.
        let bare = for_rank("cuda", Some(&world(2, 2, 3)), 2, None).unwrap_err().to_string();
        assert!(
            bare.contains("shows 2 GPU(s);") && !bare.contains("CUDA_VISIBLE_DEVICES"),
            "{bare}"
        );
    }

    #[test]
    fn cuda_without_a_gpu_names_the_rank_and_the_cpu_setting() {
        let msg = for_rank("cuda", Some(&world(1, 1, 2)), 0, None).unwrap_err().to_string();
        assert!(
            msg.contains("rank 1 (local rank 1 of 2) asks for train.device: cuda")
                && msg.contains("use train.device: cpu"),
            "{msg}"
        );
        assert!(for_rank("gpu", Some(&world(1, 1, 2)), 2, None).is_err());
    }
}
