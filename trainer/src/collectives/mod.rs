//! The collective operations the step needs, behind one trait. One process is a world of one,
//! so the step has no world-size branch; the multi-process backends implement the same trait:
//!
//! - [`SingleProcess`]: every collective is the identity.
//! - [`tcp::TcpGroup`] (`dist.backend: cpu`): processes joined through rank 0 over TCP, for
//!   CPU runs and for testing every distributed path without GPUs.
//! - [`nccl::NcclGroup`] (`dist.backend: nccl`): CUDA tensors through NCCL, opened at run
//!   time; its rendezvous goes through a `TcpGroup`.
//!
//! Both join through [`rendezvous`]: rank 0 admits only the ranks of this job.
//!
//! Reductions are summed in rank order on one rank and the result sent to all, so every rank
//! holds bit-identical parameters after every step.

pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use std::time::Duration;

use tch::Tensor;

use crate::config::{Backend, DistConfig};
use crate::error::{Result, TrainError};

/// The collectives a training step needs. Tensor collectives take tensors on the group's
/// device (NCCL reduces CUDA memory only); host values go through [`Collectives::all_gather_bytes`],
/// integers through [`all_gather_u64`].
pub trait Collectives {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Concatenates every rank's (n, ...) tensor along dim 0, in rank order: (W n, ...).
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;
    /// Sums (W n, ...) over ranks and returns this rank's (n, ...) rows.
    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor>;
    /// Sums in place over ranks.
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()>;
    /// Copies root's tensor into every rank's, in place.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()>;
    /// Every rank's bytes, in rank order (start-up checks, loader positions).
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    fn barrier(&self) -> Result<()>;
    /// This group as one that another thread may drive (one collective at a time, while the
    /// owner issues none): the gradient reducer's communication thread. `None`: it may not.
    fn as_sync(&self) -> Option<&(dyn Collectives + Sync)> {
        None
    }
    /// Marks how far the calling thread's queued compute has got, right after it produced a
    /// tensor that [`Collectives::all_reduce_start`] will read (on another thread). Backends
    /// whose collectives block until done need no mark.
    fn ready_mark(&self) -> Result<Mark> {
        Ok(Mark::none())
    }
    /// Starts summing `tensor` over ranks in place, once the work behind `ready` is done, and
    /// returns where the sum is done, for [`Collectives::wait_for`]. `tensor` must stay alive
    /// and untouched until the caller has waited for that mark. By default the blocking sum.
    fn all_reduce_start(&self, tensor: &mut Tensor, _ready: Mark) -> Result<Mark> {
        self.all_reduce_sum(tensor)?;
        Ok(Mark::none())
    }
    /// Starts summing `tensor`, W equal chunks, over ranks, and leaves this rank's chunk of the
    /// sum in place (chunk r of rank r; the other chunks are left undefined): a reduce-scatter
    /// in place, as NCCL runs one, for the sharded gradient reduction. The same contract as
    /// [`Collectives::all_reduce_start`]. By default the blocking reduce-scatter, copied into
    /// place.
    fn reduce_scatter_start(&self, tensor: &mut Tensor, _ready: Mark) -> Result<Mark> {
        let (world, rank) = (self.world_size() as i64, self.rank() as i64);
        let chunk = tensor.numel() as i64 / world;
        if chunk * world != tensor.numel() as i64 {
            return Err(TrainError::Dist(format!(
                "a reduce-scatter of {} values over {world} ranks: not a whole chunk each",
                tensor.numel()
            )));
        }
        let mine = self.reduce_scatter(&tensor.f_view([world, chunk])?)?;
        tensor.f_narrow(0, rank * chunk, chunk)?.f_copy_(&mine.f_view([chunk])?)?;
        Ok(Mark::none())
    }
    /// Orders the calling thread's later compute after `done` (from
    /// [`Collectives::all_reduce_start`]); the host does not wait for it.
    fn wait_for(&self, _done: &Mark) -> Result<()> {
        Ok(())
    }
    /// Lets go of `buffer`, which the collective behind `done` reads and writes, on a path that
    /// will not copy its result back (an error, a panic): it is freed only once that collective
    /// can no longer touch it, or never (leaked) where that cannot be known. Never fails and
    /// checks no health: it runs while unwinding, and after an abort. By default the
    /// collective is done already (it blocked).
    fn retire(&self, done: Mark, buffer: Tensor) {
        drop((done, buffer));
    }
    /// This rank stops: tells the other ranks why (`cause`), so that the collective they wait
    /// in ends with it rather than at `dist.timeout_s`, and fails every later collective here.
    /// Best effort and bounded in time: it runs on the way out of a failed run.
    fn abort(&self, _cause: &str) {}
}

/// A point in a backend's device work: under NCCL a recorded CUDA event (destroyed when the
/// mark is dropped); none where collectives block until done.
#[derive(Debug)]
pub struct Mark(Option<nccl::stream::Event>);

impl Mark {
    pub fn none() -> Self {
        Mark(None)
    }
}

/// A world of one process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.shallow_clone())
    }
    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.shallow_clone())
    }
    fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn as_sync(&self) -> Option<&(dyn Collectives + Sync)> {
        Some(self)
    }
}

/// Every rank's `value`, in rank order, over the host channel: counts need no device round trip.
pub fn all_gather_u64(comm: &dyn Collectives, value: u64) -> Result<Vec<u64>> {
    comm.all_gather_bytes(&value.to_le_bytes())?
        .iter()
        .map(|b| {
            let bytes: [u8; 8] = b.as_slice().try_into().map_err(|_| {
                TrainError::Dist(format!("a rank sent {} bytes for a u64", b.len()))
            })?;
            Ok(u64::from_le_bytes(bytes))
        })
        .collect()
}

/// This process's place in the world, as torchrun, SLURM or `oxclip launch` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Where rank 0 serves the rendezvous.
    pub master_addr: String,
    pub master_port: u16,
    /// What every rank of this job, and no other process, knows: rank 0 admits only greetings
    /// carrying it. Empty: an open rendezvous (any oxclip of the same world size may join).
    pub job_token: String,
}

impl WorldEnv {
    /// Rank `rank` of `world_size` on this host, rank 0 on loopback `port`, no job token: the
    /// worlds tests and benchmarks make inside one process.
    pub fn on_loopback(rank: usize, world_size: usize, port: u16) -> Self {
        WorldEnv {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            job_token: String::new(),
        }
    }
}

/// Joins `world` (`None`: a single process) as `dist:` says, for a run on `device`.
pub fn connect(
    world: Option<&WorldEnv>,
    dist: &DistConfig,
    device: tch::Device,
) -> Result<Box<dyn Collectives>> {
    // One rank needs no backend, unless one was asked for by name (to test it).
    let Some(world) = world.filter(|w| w.world_size > 1 || dist.backend != Backend::Auto) else {
        return Ok(Box::new(SingleProcess));
    };
    let timeout = Duration::from_secs(dist.timeout_s);
    let backend = match dist.backend {
        Backend::Auto if device.is_cuda() => Backend::Nccl,
        Backend::Auto => Backend::Cpu,
        other => other,
    };
    match backend {
        Backend::Cpu => Ok(Box::new(tcp::TcpGroup::connect(world, timeout)?)),
        _ => Ok(Box::new(nccl::NcclGroup::connect(world, device, timeout)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_collectives_are_the_identity() {
        let comm = SingleProcess;
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert_eq!(comm.all_gather(&t).unwrap(), t);
        assert_eq!(comm.all_gather_bytes(b"x").unwrap(), vec![b"x".to_vec()]);
        let mut sum = t.copy();
        comm.all_reduce_sum(&mut sum).unwrap();
        assert_eq!(sum, t);
    }
}
