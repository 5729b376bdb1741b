//! The `cpu` backend: every rank connected to rank 0 over TCP, rank 0 doing each collective's
//! arithmetic. A star, not a ring: simple, deterministic (sums in rank order, the result sent
//! to all, so ranks never drift apart by a rounding), and fast enough for CPU training of small
//! models and for testing every distributed path without GPUs. GPU runs use NCCL.
//!
//! Every collective is one round: each rank sends rank 0 a frame `(op, seq, payload)`, rank 0
//! checks that all ranks are at the same collective (same op, same sequence number: a rank
//! that took another code path is named at once instead of deadlocking), combines, and sends
//! the result back. Sockets have read and write timeouts (`dist.timeout_s`): a peer that died
//! or stalls turns into an error naming the collective, not a hang. A rank that stops on an
//! error of its own sends rank 0 an abort frame with the cause ([`Collectives::abort`]), which
//! rank 0 passes on: every other rank's collective then fails at once with that cause, instead
//! of waiting out the timeout for a frame that will never come.
//!
//! A group may be used from another thread than the one that made it (the gradient reducer's
//! communication thread, grad_sync/), one collective at a time: the sequence counter is
//! atomic so the group is `Sync`, and the seq check above still catches a rank on another path.
//!
//! `OXCLIP_SIM_LINK_GBPS=<GB/s>` (read once, when the group is made) simulates a slower link
//! for the scaling model (docs/scaling.md): every rank holds each collective until the time a
//! ring collective of its bytes would take on a link of that many gigabytes (1e9 bytes) per
//! second has passed since the collective started. A ring all-reduce of `B` bytes over `W`
//! ranks sends `2 (W - 1) / W * B` bytes per rank, an all-gather of `W` parts of `B` bytes
//! `(W - 1) * B`, a broadcast `B`; a barrier is free. Unset: no delay.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tch::Tensor;

use super::{rendezvous, Collectives, WorldEnv};
use crate::error::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllGather = 1,
    AllReduce = 2,
    Broadcast = 3,
    GatherBytes = 4,
    Barrier = 5,
    /// A rank stops; the payload says why (UTF-8). Rank 0 passes it on to every other rank.
    Abort = 6,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        [Op::AllGather, Op::AllReduce, Op::Broadcast, Op::GatherBytes, Op::Barrier, Op::Abort]
            .into_iter()
            .find(|op| *op as u8 == v)
    }
}

/// Processes joined in a star around rank 0.
pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    /// Rank 0: the connection to rank r at index r - 1. Other ranks: the one to rank 0.
    streams: Vec<TcpStream>,
    /// Collectives so far, to check that all ranks are at the same one.
    seq: AtomicU64,
    timeout: Duration,
    /// The simulated link's bytes per second (`OXCLIP_SIM_LINK_GBPS`); `None`: no delay.
    sim_link: Option<f64>,
    /// Why the group stopped (this rank's abort, or one passed on from another rank); every
    /// collective after it fails with this.
    aborted: Mutex<Option<String>>,
}

/// How long an abort frame may take to leave: it is sent on the way out of a failed run, to
/// peers that may be gone.
const ABORT_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an aborted group waits for its peers to hang up ([`TcpGroup::linger`]): they do as
/// soon as they have read the abort and exited.
const ABORT_LINGER: Duration = Duration::from_secs(5);

/// The environment variable [`TcpGroup::connect`] reads the simulated link's speed from.
pub const SIM_LINK_ENV: &str = "OXCLIP_SIM_LINK_GBPS";

/// `OXCLIP_SIM_LINK_GBPS` in bytes per second; unset, empty, or not a positive number: none
/// (the latter with a warning).
fn sim_link_from_env() -> Option<f64> {
    let value = std::env::var(SIM_LINK_ENV).ok().filter(|v| !v.trim().is_empty())?;
    match value.trim().parse::<f64>() {
        Ok(gbps) if gbps > 0.0 && gbps.is_finite() => Some(gbps * 1e9),
        _ => {
            tracing::warn!(
                "{SIM_LINK_ENV}={value} is not a positive number of GB/s; no simulated link"
            );
            None
        }
    }
}

fn dist_err(message: String) -> TrainError {
    TrainError::Dist(message)
}

impl TcpGroup {
    /// Rank 0 listens on `master_port` and waits for the others; the others connect to
    /// `master_addr:master_port` (retrying while rank 0 starts). Fails after `timeout` with a
    /// message saying who never arrived.
    pub fn connect(world: &WorldEnv, timeout: Duration) -> Result<Self> {
        if world.rank >= world.world_size {
            return Err(dist_err(format!(
                "rank {} is not below the world size {}",
                world.rank, world.world_size
            )));
        }
        let deadline = Instant::now() + timeout;
        let streams = if world.rank == 0 {
            rendezvous::accept_peers(world, deadline)?
        } else {
            vec![rendezvous::join_rank0(world, deadline)?]
        };
        for s in &streams {
            s.set_read_timeout(Some(timeout))
                .and_then(|()| s.set_write_timeout(Some(timeout)))
                .map_err(|e| dist_err(format!("socket setup: {e}")))?;
            let _ = s.set_nodelay(true);
        }
        tracing::info!(
            "rank {} of {} joined through {}:{}",
            world.rank,
            world.world_size,
            world.master_addr,
            world.master_port
        );
        Ok(Self {
            rank: world.rank,
            world_size: world.world_size,
            streams,
            seq: AtomicU64::new(0),
            timeout,
            sim_link: sim_link_from_env(),
            aborted: Mutex::new(None),
        })
    }

    /// Sets (or, with `None`, removes) the simulated link, in GB/s, in place of what
    /// `OXCLIP_SIM_LINK_GBPS` said: for tests, which share one process environment.
    pub fn with_sim_link(mut self, gbps: Option<f64>) -> Self {
        self.sim_link = gbps.filter(|g| *g > 0.0).map(|g| g * 1e9);
        self
    }

    /// How long the simulated link needs for `op` with `payload_bytes` from each rank.
    fn sim_link_time(&self, op: Op, payload_bytes: usize) -> Option<Duration> {
        let rate = self.sim_link?;
        let (w, b) = (self.world_size as f64, payload_bytes as f64);
        let bytes = match op {
            Op::AllReduce => 2.0 * (w - 1.0) / w * b,
            Op::AllGather | Op::GatherBytes => (w - 1.0) * b,
            Op::Broadcast => b,
            Op::Barrier | Op::Abort => 0.0,
        };
        Some(Duration::from_secs_f64(bytes / rate))
    }

    /// One collective round: send `payload`, get back what rank 0's `combine` made of all
    /// ranks' payloads (in rank order).
    fn round(
        &self,
        op: Op,
        payload: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let started = Instant::now();
        let link_time = self.sim_link_time(op, payload.len());
        let result = self.exchange(op, payload, combine)?;
        if let Some(wait) =
            link_time.and_then(|t| (started + t).checked_duration_since(Instant::now()))
        {
            std::thread::sleep(wait);
        }
        Ok(result)
    }

    fn exchange(
        &self,
        op: Op,
        payload: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(cause) = self.aborted() {
            return Err(dist_err(format!("rank {} in {op:?} #{seq}: {cause}", self.rank)));
        }
        if self.rank != 0 {
            let stream = &self.streams[0];
            write_frame(stream, op, seq, &payload).map_err(|e| self.io_error(e, 0, op, seq))?;
            let (got_op, got_seq, result) =
                read_frame(stream).map_err(|e| self.io_error(e, 0, op, seq))?;
            if got_op == Op::Abort as u8 {
                return Err(self.aborted_by(None, &result, op, seq));
            }
            if (got_op, got_seq) != (op as u8, seq) {
                return Err(dist_err(format!(
                    "rank 0 answered collective {got_op} #{got_seq} to {op:?} #{seq}"
                )));
            }
            return Ok(result);
        }
        let mut parts = Vec::with_capacity(self.world_size);
        parts.push(payload);
        for (i, stream) in self.streams.iter().enumerate() {
            let peer = i + 1;
            let (got_op, got_seq, part) =
                read_frame(stream).map_err(|e| self.io_error(e, peer, op, seq))?;
            if got_op == Op::Abort as u8 {
                return Err(self.aborted_by(Some(peer), &part, op, seq));
            }
            if (got_op, got_seq) != (op as u8, seq) {
                let theirs =
                    Op::from_u8(got_op).map_or(format!("op {got_op}"), |o| format!("{o:?}"));
                return Err(dist_err(format!(
                    "rank {peer} is at collective {theirs} #{got_seq} while rank 0 is at {op:?} #{seq}: \
                     the ranks took different paths (different configs or data?)"
                )));
            }
            parts.push(part);
        }
        let result = combine(parts)?;
        for (i, stream) in self.streams.iter().enumerate() {
            write_frame(stream, op, seq, &result).map_err(|e| self.io_error(e, i + 1, op, seq))?;
        }
        Ok(result)
    }

    fn aborted(&self) -> Option<String> {
        self.aborted.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// An abort frame arrived (`from`: the peer that sent it to rank 0; `None`: from rank 0
    /// to this rank) while this rank was at `op` #`seq`: the group stops with its cause, which
    /// rank 0 passes on to every other rank.
    fn aborted_by(&self, from: Option<usize>, payload: &[u8], op: Op, seq: u64) -> TrainError {
        let cause = String::from_utf8_lossy(payload).into_owned();
        *self.aborted.lock().unwrap_or_else(PoisonError::into_inner) = Some(cause.clone());
        if let Some(from) = from {
            self.send_abort(&cause, Some(from));
        }
        dist_err(format!("rank {} in {op:?} #{seq}: {cause}", self.rank))
    }

    /// Sends `cause` in an abort frame: to rank 0, or from rank 0 to every rank but `skip`.
    /// Best effort: a peer may be gone.
    fn send_abort(&self, cause: &str, skip: Option<usize>) {
        let seq = self.seq.load(Ordering::SeqCst);
        for (i, stream) in self.streams.iter().enumerate() {
            let peer = if self.rank == 0 { i + 1 } else { 0 };
            if Some(peer) == skip {
                continue;
            }
            let _ = stream.set_write_timeout(Some(ABORT_SEND_TIMEOUT));
            if let Err(e) = write_frame(stream, Op::Abort, seq, cause.as_bytes()) {
                tracing::debug!("rank {}: the abort did not reach rank {peer}: {e}", self.rank);
            }
        }
        self.linger();
    }

    /// The end of a group that aborted: says it will send nothing more, then reads (and
    /// drops) what still comes until every peer hangs up, for at most [`ABORT_LINGER`]. A
    /// process that exits with unread bytes on a connection makes its kernel reset that
    /// connection, and a reset makes the peer's kernel drop what the peer has not read yet:
    /// the abort frame, when the peer was still writing its own frame for the collective.
    fn linger(&self) {
        for stream in &self.streams {
            let _ = stream.shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + ABORT_LINGER;
        let mut scratch = vec![0u8; 64 << 10];
        for mut stream in &self.streams {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                    break;
                }
                match stream.read(&mut scratch) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    fn io_error(&self, e: std::io::Error, peer: usize, op: Op, seq: u64) -> TrainError {
        let what = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                "nothing from rank {peer} for {}s: it died or stalls (raise dist.timeout_s if it is only slow)",
                self.timeout.as_secs()
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                format!("rank {peer} closed its connection: it exited")
            }
            _ => format!("connection to rank {peer}: {e}"),
        };
        dist_err(format!("rank {} in {op:?} #{seq}: {what}", self.rank))
    }
}

fn write_frame(mut stream: &TcpStream, op: Op, seq: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 17];
    header[0] = op as u8;
    header[1..9].copy_from_slice(&seq.to_le_bytes());
    header[9..17].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)
}

/// The most bytes a frame may announce: far above anything the CPU backend carries (a
/// gradient bucket, a gathered feature block), and a bound on what a corrupt stream or a
/// stranger on the port can make a rank allocate (issue 23).
const MAX_FRAME_BYTES: u64 = 16 << 30;

/// Bytes of a payload allocated before any of it has arrived: larger payloads grow as they
/// come, so a header alone never buys more memory than this.
const PAYLOAD_PREALLOC_BYTES: u64 = 64 << 20;

fn read_frame(mut stream: &TcpStream) -> std::io::Result<(u8, u64, Vec<u8>)> {
    let mut header = [0u8; 17];
    stream.read_exact(&mut header)?;
    let seq = u64::from_le_bytes(header[1..9].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(header[9..17].try_into().unwrap_or_default());
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "a frame announces {len} bytes, over the limit of {MAX_FRAME_BYTES}: \
                 not an oxclip peer, or a corrupt stream"
            ),
        ));
    }
    // ok: both bounds are below 2^35, which a 64-bit usize holds.
    let mut payload = Vec::with_capacity(len.min(PAYLOAD_PREALLOC_BYTES) as usize);
    stream.take(len).read_to_end(&mut payload)?;
    if payload.len() as u64 != len {
        return Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("the stream ended {} bytes into a frame of {len}", payload.len()),
        ));
    }
    Ok((header[0], seq, payload))
}

/// A tensor's values as little-endian fp32 bytes (every collective here runs in fp32).
fn to_floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// `values` as a tensor shaped `shape`, of `like`'s kind and device.
fn to_tensor(values: &[f32], shape: &[i64], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(values).f_view(shape)?.to_kind(like.kind()).to_device(like.device()))
}

impl Collectives for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let gathered = self.round(Op::AllGather, crate::bytes::f32_le_bytes(tensor)?, |parts| {
            Ok(parts.concat())
        })?;
        let values = to_floats(&gathered);
        let mut shape = tensor.size();
        let row: i64 = shape.iter().skip(1).product::<i64>().max(1);
        if shape.is_empty() || values.len() as i64 % row != 0 {
            return Err(dist_err(format!(
                "all_gather of {:?}: ranks sent tensors of other shapes",
                tensor.size()
            )));
        }
        shape[0] = values.len() as i64 / row;
        to_tensor(&values, &shape, tensor)
    }

    fn reduce_scatter(&self, tensor: &Tensor) -> Result<Tensor> {
        let mut summed = tensor.shallow_clone().copy();
        self.all_reduce_sum(&mut summed)?;
        let n = tensor.size()[0] / self.world_size as i64;
        Ok(summed.narrow(0, self.rank as i64 * n, n))
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let summed = self.round(Op::AllReduce, crate::bytes::f32_le_bytes(tensor)?, |parts| {
            let mut acc = to_floats(&parts[0]);
            for (r, part) in parts.iter().enumerate().skip(1) {
                if part.len() != parts[0].len() {
                    return Err(dist_err(format!(
                        "all_reduce: rank {r} sent {} values, rank 0 {}",
                        part.len() / 4,
                        parts[0].len() / 4
                    )));
                }
                for (a, b) in acc.iter_mut().zip(to_floats(part)) {
                    *a += b;
                }
            }
            let mut out = Vec::with_capacity(acc.len() * 4);
            for v in acc {
                out.extend_from_slice(&v.to_le_bytes());
            }
            Ok(out)
        })?;
        let result = to_tensor(&to_floats(&summed), &tensor.size(), tensor)?;
        tensor.copy_(&result);
        Ok(())
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(dist_err(format!(
                "broadcast from rank {root} in a world of {}",
                self.world_size
            )));
        }
        let value =
            self.round(Op::Broadcast, crate::bytes::f32_le_bytes(tensor)?, |mut parts| {
                Ok(parts.swap_remove(root))
            })?;
        let result = to_tensor(&to_floats(&value), &tensor.size(), tensor)?;
        tensor.copy_(&result);
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let packed = self.round(Op::GatherBytes, bytes.to_vec(), |parts| {
            let mut out = Vec::new();
            for p in parts {
                out.extend_from_slice(&(p.len() as u64).to_le_bytes());
                out.extend_from_slice(&p);
            }
            Ok(out)
        })?;
        let mut parts = Vec::with_capacity(self.world_size);
        let mut rest = packed.as_slice();
        while rest.len() >= 8 {
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default()) as usize;
            if rest.len() < 8 + len {
                break;
            }
            parts.push(rest[8..8 + len].to_vec());
            rest = &rest[8 + len..];
        }
        if parts.len() != self.world_size {
            return Err(dist_err("all_gather_bytes: a malformed answer from rank 0".into()));
        }
        Ok(parts)
    }

    fn barrier(&self) -> Result<()> {
        self.round(Op::Barrier, Vec::new(), |_| Ok(Vec::new())).map(|_| ())
    }

    /// Sends the cause to rank 0, which passes it to every rank: their collective in flight,
    /// or their next one, fails with it. Once per group: an abort that arrived from another
    /// rank is not sent back.
    fn abort(&self, cause: &str) {
        let cause = format!("rank {} stopped: {cause}", self.rank);
        {
            let mut aborted = self.aborted.lock().unwrap_or_else(PoisonError::into_inner);
            if aborted.is_some() {
                return;
            }
            *aborted = Some(cause.clone());
        }
        self.send_abort(&cause, None);
    }

    fn as_sync(&self) -> Option<&(dyn Collectives + Sync)> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair of sockets on loopback: (writer, reader).
    fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let writer = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (reader, _) = listener.accept().expect("accept");
        (writer, reader)
    }

    /// Issue 23: a frame's length comes from the wire, so it is capped and its payload is
    /// allocated as it arrives, never from the header alone.
    #[test]
    fn frames_round_trip_and_a_length_from_the_wire_is_not_trusted() {
        let (writer, reader) = socket_pair();
        write_frame(&writer, Op::AllReduce, 7, b"abcdef").expect("write");
        let (op, seq, payload) = read_frame(&reader).expect("read");
        assert_eq!((op, seq, payload.as_slice()), (Op::AllReduce as u8, 7, &b"abcdef"[..]));

        // A header announcing more than the limit: refused before any allocation.
        let mut header = [0u8; 17];
        header[9..17].copy_from_slice(&u64::MAX.to_le_bytes());
        (&writer).write_all(&header).expect("write");
        let err = read_frame(&reader).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidData);
        assert!(err.to_string().contains("over the limit"), "{err}");

        // A header announcing 1 GiB, then 4 bytes and the end of the stream: an error naming
        // how far it got, with only the bytes that came held.
        let (writer, reader) = socket_pair();
        header[9..17].copy_from_slice(&(1u64 << 30).to_le_bytes());
        (&writer).write_all(&header).expect("write");
        (&writer).write_all(b"abcd").expect("write");
        drop(writer);
        let err = read_frame(&reader).expect_err("truncated");
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("4 bytes into a frame of 1073741824"), "{err}");
    }

    fn world(rank: usize, world_size: usize, port: u16) -> WorldEnv {
        WorldEnv::on_loopback(rank, world_size, port)
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `f` on `n` ranks in threads, each with its own group.
    fn on_ranks<T: Send + 'static>(
        n: usize,
        f: impl Fn(TcpGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let f = std::sync::Arc::clone(&f);
                std::thread::spawn(move || {
                    f(TcpGroup::connect(&world(r, n, port), Duration::from_secs(20)).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_over_three_ranks() {
        let results = on_ranks(3, |g| {
            let r = g.rank() as f32;
            let mine = Tensor::from_slice(&[r, r + 0.5]).view([1, 2]);
            let gathered = g.all_gather(&mine).unwrap();
            let mut sum = Tensor::from_slice(&[r, 1.0, 2.0 * r]);
            g.all_reduce_sum(&mut sum).unwrap();
            let scattered = g
                .reduce_scatter(
                    &Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([3, 2]),
                )
                .unwrap();
            let mut b = Tensor::from_slice(&[r * 10.0]);
            g.broadcast(&mut b, 2).unwrap();
            let bytes = g.all_gather_bytes(format!("rank{}", g.rank()).as_bytes()).unwrap();
            g.barrier().unwrap();
            (
                Vec::<f32>::try_from(gathered.view([-1])).unwrap(),
                Vec::<f32>::try_from(&sum).unwrap(),
                Vec::<f32>::try_from(scattered.view([-1])).unwrap(),
                b.double_value(&[0]),
                bytes,
            )
        });
        for (r, (gathered, sum, scattered, b, bytes)) in results.into_iter().enumerate() {
            assert_eq!(gathered, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
            assert_eq!(sum, [3.0, 3.0, 6.0]);
            let rf = r as f32;
            assert_eq!(scattered, [3.0 * (2.0 * rf + 1.0), 3.0 * (2.0 * rf + 2.0)]);
            assert_eq!(b, 20.0);
            assert_eq!(bytes, vec![b"rank0".to_vec(), b"rank1".to_vec(), b"rank2".to_vec()]);
        }
    }

    #[test]
    fn mismatched_collectives_and_missing_peers_are_errors() {
        let results = on_ranks(2, |g| {
            if g.rank() == 0 {
                g.barrier().map_err(|e| e.to_string())
            } else {
                g.all_gather_bytes(b"x").map(|_| ()).map_err(|e| e.to_string())
            }
        });
        let err = results[0].as_ref().unwrap_err();
        assert!(
            err.contains("rank 1 is at collective GatherBytes #1 while rank 0 is at Barrier #1"),
            "{err}"
        );

        // Rank 1 never comes: rank 0 says so after the timeout.
        let port = free_port();
        let err = TcpGroup::connect(&world(0, 2, port), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("rank(s) 1 never joined"), "{err}");

        // A rank that exits: its peer's next collective fails, naming it.
        let results = on_ranks(2, |g| {
            if g.rank() == 1 {
                drop(g);
                return String::new();
            }
            g.barrier().unwrap_err().to_string()
        });
        assert!(results[0].contains("rank 1 closed its connection"), "{}", results[0]);
    }

    /// A rank that aborts ends every other rank's collective at once with its cause, whether
    /// it is rank 0 or not and whether the others are already waiting or come later; and the
    /// cause is not sent around again when they abort in turn.
    #[test]
    fn an_abort_reaches_every_rank_with_its_cause() {
        for quitter in [0, 2] {
            let results = on_ranks(4, move |g| {
                let started = std::time::Instant::now();
                let mut t = Tensor::from_slice(&[1.0f32]);
                if g.rank() == quitter {
                    // The others are (or will be) waiting in their all-reduce.
                    std::thread::sleep(Duration::from_millis(200));
                    g.abort("flattening gradient bucket 3 failed");
                    return (String::new(), started.elapsed());
                }
                let err = g.all_reduce_sum(&mut t).unwrap_err().to_string();
                // As the training loop does on any error: not sent back again.
                g.abort(&err);
                let later = g.barrier().unwrap_err().to_string();
                assert!(later.contains("flattening gradient bucket 3 failed"), "{later}");
                (err, started.elapsed())
            });
            for (rank, (err, took)) in results.iter().enumerate() {
                if rank == quitter {
                    continue;
                }
                assert!(
                    err.contains(&format!(
                        "rank {rank} in AllReduce #1: rank {quitter} stopped: flattening \
                         gradient bucket 3 failed"
                    )),
                    "rank {rank}: {err}"
                );
                // Not the 20 s read timeout.
                assert!(*took < Duration::from_secs(10), "rank {rank} took {took:?}");
            }
        }
    }
}
