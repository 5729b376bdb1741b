//! The collective trace: NCCL itself cannot tell that two ranks called different
//! collectives, so each rank keeps a [`Trace`] of its own NCCL collectives (how many, and a
//! running hash of each one's operation, dtype and element count) and sends it along with
//! every host exchange ([`traced_exchange`]), where the ranks compare theirs and, when they
//! differ, all fail alike with one message saying which ranks took which path.

use tch::Kind;

use super::dist_err;
use crate::collectives::tcp::TcpGroup;
use crate::collectives::Collectives;
use crate::error::Result;

/// The NCCL collectives, as a [`Trace`] records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum CollOp {
    AllGather = 1,
    ReduceScatter = 2,
    AllReduce = 3,
    Broadcast = 4,
}

impl CollOp {
    pub(super) fn name(self) -> &'static str {
        match self {
            CollOp::AllGather => "all_gather",
            CollOp::ReduceScatter => "reduce_scatter",
            CollOp::AllReduce => "all_reduce",
            CollOp::Broadcast => "broadcast",
        }
    }

    fn from_u8(v: u8) -> Option<CollOp> {
        [CollOp::AllGather, CollOp::ReduceScatter, CollOp::AllReduce, CollOp::Broadcast]
            .into_iter()
            .find(|op| *op as u8 == v)
    }
}

/// The host exchange a rank is at when the traces are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum HostOp {
    Bytes = 1,
    Barrier = 2,
}

impl HostOp {
    fn describe(v: u8) -> &'static str {
        match v {
            1 => "a byte exchange (all_gather_bytes)",
            2 => "a barrier",
            _ => "an unknown host exchange",
        }
    }
}

const DTYPES: [(Kind, &str); 6] = [
    (Kind::Float, "float32"),
    (Kind::Double, "float64"),
    (Kind::Half, "float16"),
    (Kind::BFloat16, "bfloat16"),
    (Kind::Int, "int32"),
    (Kind::Int64, "int64"),
];

/// A small, stable code for a tensor kind (its index in [`DTYPES`], 255 for others).
fn kind_code(kind: Kind) -> u8 {
    DTYPES.iter().position(|(k, _)| *k == kind).map_or(u8::MAX, |i| i as u8)
}

/// One NCCL collective: its operation, dtype and element count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Call {
    op: u8,
    dtype: u8,
    elements: u64,
}

impl Call {
    pub(super) fn new(op: CollOp, kind: Kind, elements: usize) -> Call {
        Call { op: op as u8, dtype: kind_code(kind), elements: elements as u64 }
    }

    pub(super) fn describe_values(&self) -> String {
        let dtype = DTYPES.get(self.dtype as usize).map_or("?", |(_, name)| name);
        format!("{} {dtype} values", self.elements)
    }

    fn describe(&self) -> String {
        match CollOp::from_u8(self.op) {
            Some(op) => format!("{} of {}", op.name(), self.describe_values()),
            None => "none yet".into(),
        }
    }
}

/// The NCCL collectives a rank has made: how many, a running hash of every one's operation,
/// dtype and element count (FNV-1a, the same on every machine), and the last one. Updating it
/// costs nothing on the GPU; ranks compare theirs at each host exchange, which goes over TCP
/// anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Trace {
    pub(super) count: u64,
    hash: u64,
    pub(super) last: Call,
}

impl Default for Trace {
    fn default() -> Self {
        Self { count: 0, hash: 0xcbf2_9ce4_8422_2325, last: Call::default() }
    }
}

/// Bytes of [`Trace::header`]: host op, count, hash, last op, last dtype, last element count.
const HEADER_LEN: usize = 1 + 8 + 8 + 1 + 1 + 8;

impl Trace {
    pub(super) fn then(self, call: Call) -> Trace {
        let mut hash = self.hash;
        for byte in [call.op, call.dtype].into_iter().chain(call.elements.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        Trace { count: self.count + 1, hash, last: call }
    }

    fn header(&self, host: HostOp) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = host as u8;
        out[1..9].copy_from_slice(&self.count.to_le_bytes());
        out[9..17].copy_from_slice(&self.hash.to_le_bytes());
        out[17] = self.last.op;
        out[18] = self.last.dtype;
        out[19..27].copy_from_slice(&self.last.elements.to_le_bytes());
        out
    }

    /// A header and what follows it: ((host op, trace), body).
    fn parse(bytes: &[u8]) -> Option<((u8, Trace), &[u8])> {
        if bytes.len() < HEADER_LEN {
            return None;
        }
        let u64_at =
            |i: usize| bytes.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let trace = Trace {
            count: u64_at(1)?,
            hash: u64_at(9)?,
            last: Call { op: bytes[17], dtype: bytes[18], elements: u64_at(19)? },
        };
        Some(((bytes[0], trace), &bytes[HEADER_LEN..]))
    }
}

/// `bytes` from every rank over `bootstrap`, each rank's `trace` riding along in front; fails
/// on every rank alike when the traces differ.
pub(super) fn traced_exchange(
    bootstrap: &TcpGroup,
    trace: Trace,
    host: HostOp,
    bytes: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let mut payload = trace.header(host).to_vec();
    payload.extend_from_slice(bytes);
    let parts = bootstrap.all_gather_bytes(&payload)?;
    let mut headers = Vec::with_capacity(parts.len());
    let mut bodies = Vec::with_capacity(parts.len());
    for (r, part) in parts.into_iter().enumerate() {
        let (header, body) = Trace::parse(&part).ok_or_else(|| {
            dist_err(format!(
                "rank {r} sent a host exchange without its NCCL trace (another oxclip version?)"
            ))
        })?;
        headers.push(header);
        bodies.push(body.to_vec());
    }
    match diverged(&headers) {
        Some(message) => Err(dist_err(format!("rank {}: {message}", bootstrap.rank()))),
        None => Ok(bodies),
    }
}

/// Which ranks' traces (index = rank) differ from rank 0's, said as tcp.rs says a diverged
/// collective; `None` when all agree.
fn diverged(traces: &[(u8, Trace)]) -> Option<String> {
    let (host0, t0) = traces.first()?;
    let mut found = Vec::new();
    for (r, (host, t)) in traces.iter().enumerate().skip(1) {
        if t != t0 {
            found.push(if t.count == t0.count {
                format!(
                    "rank {r}'s {} NCCL collectives differ from rank 0's (the last: {} on rank \
                     {r}, {} on rank 0)",
                    t.count,
                    t.last.describe(),
                    t0.last.describe()
                )
            } else {
                format!(
                    "rank {r} has made {} NCCL collectives (the last: {}) while rank 0 has made {} \
                     (the last: {})",
                    t.count,
                    t.last.describe(),
                    t0.count,
                    t0.last.describe()
                )
            });
        } else if host != host0 {
            found.push(format!(
                "rank {r} is at {} while rank 0 is at {}",
                HostOp::describe(*host),
                HostOp::describe(*host0)
            ));
        }
    }
    if found.is_empty() {
        return None;
    }
    let more = found.len().saturating_sub(3);
    found.truncate(3);
    let mut message = found.join("; ");
    if more > 0 {
        message.push_str(&format!("; and {more} more rank(s)"));
    }
    Some(format!(
        "{message}: the ranks took different paths (different configs or data?); found at a host \
         exchange"
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::collectives::WorldEnv;

    fn trace(calls: &[(CollOp, Kind, u64)]) -> Trace {
        calls.iter().fold(Trace::default(), |t, &(op, kind, n)| {
            t.then(Call { op: op as u8, dtype: kind_code(kind), elements: n })
        })
    }

    #[test]
    fn diverged_nccl_collectives_are_named_at_the_next_host_exchange() {
        let common = [(CollOp::Broadcast, Kind::Float, 8), (CollOp::AllGather, Kind::BFloat16, 64)];
        let t0 = trace(&common);
        // The header survives the trip through the byte exchange, with the body after it.
        let mut wire = t0.header(HostOp::Bytes).to_vec();
        wire.extend_from_slice(b"body");
        let ((host, back), body) = Trace::parse(&wire).unwrap();
        assert_eq!((host, back, body), (HostOp::Bytes as u8, t0, &b"body"[..]));
        assert!(Trace::parse(&wire[..HEADER_LEN - 1]).is_none());

        // All ranks on the same path: nothing to say.
        assert_eq!(diverged(&[(1, t0), (1, t0), (1, t0)]), None);

        // Rank 2 made one all-reduce more.
        let extra = trace(&[common[0], common[1], (CollOp::AllReduce, Kind::Float, 1024)]);
        let msg = diverged(&[(1, t0), (1, t0), (1, extra)]).unwrap();
        assert!(
            msg.starts_with(
                "rank 2 has made 3 NCCL collectives (the last: all_reduce of 1024 float32 values) \
                 while rank 0 has made 2 (the last: all_gather of 64 bfloat16 values)"
            ),
            "{msg}"
        );
        assert!(!msg.contains("rank 1"), "{msg}");

        // Same count, another size earlier on: the running hash tells them apart.
        let other = trace(&[(CollOp::Broadcast, Kind::Float, 9), common[1]]);
        let msg = diverged(&[(1, t0), (1, other)]).unwrap();
        assert!(msg.starts_with("rank 1's 2 NCCL collectives differ from rank 0's"), "{msg}");
        // The same ops in another order differ too.
        let swapped = trace(&[common[1], common[0]]);
        assert!(diverged(&[(1, t0), (1, swapped)]).is_some());

        // Same collectives, different host exchange.
        let msg = diverged(&[(HostOp::Bytes as u8, t0), (HostOp::Barrier as u8, t0)]).unwrap();
        assert!(
            msg.starts_with("rank 1 is at a barrier while rank 0 is at a byte exchange"),
            "{msg}"
        );
        assert!(msg.ends_with("found at a host exchange"), "{msg}");
    }

    #[test]
    fn traces_ride_along_the_host_exchange_between_real_ranks() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let on_ranks = |traces: [Trace; 2], hosts: [HostOp; 2]| {
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    std::thread::spawn(move || {
                        let world = WorldEnv::on_loopback(r, 2, port);
                        let group = TcpGroup::connect(&world, Duration::from_secs(20)).unwrap();
                        traced_exchange(&group, traces[r], hosts[r], format!("rank{r}").as_bytes())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        };
        let same = trace(&[(CollOp::AllReduce, Kind::Float, 100)]);
        // Same path: every rank gets every rank's bytes, without the headers.
        for got in on_ranks([same, same], [HostOp::Bytes, HostOp::Bytes]) {
            assert_eq!(got.unwrap(), vec![b"rank0".to_vec(), b"rank1".to_vec()]);
        }
        // Rank 1 made one NCCL collective more: both ranks fail, naming it.
        let more =
            trace(&[(CollOp::AllReduce, Kind::Float, 100), (CollOp::AllGather, Kind::Half, 6)]);
        for (r, got) in
            on_ranks([same, more], [HostOp::Barrier, HostOp::Barrier]).into_iter().enumerate()
        {
            let err = got.unwrap_err();
            assert!(
                err.contains(&format!(
                    "rank {r}: rank 1 has made 2 NCCL collectives (the last: all_gather of 6 \
                     float16 values) while rank 0 has made 1"
                )),
                "{err}"
            );
        }
    }
}
