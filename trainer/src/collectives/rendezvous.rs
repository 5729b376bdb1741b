//! The rendezvous: how the ranks of one job find rank 0, and how everything else is kept out.
//!
//! Rank 0 listens on `MASTER_PORT` at the address `MASTER_ADDR` names on its host (loopback
//! when it is local). It listens on every interface only where the others could not reach it
//! otherwise: when the job spans nodes and `MASTER_ADDR` resolves to loopback here (the
//! `127.0.1.1` hostname entry some distributions write), or when the address is not one of
//! this host's (a Kubernetes service's virtual IP); it warns, and the token still holds. Every other rank connects and sends one
//! fixed-size greeting: the protocol's name and version, its rank, the world size, and the
//! SHA-256 of the job token (`WorldEnv::job_token`). Rank 0 answers `OK` once every rank has
//! joined, or `NO` and a sentence saying why, to any connection that is not a rank of this
//! job still missing: another job's rank (another token), another world size, a rank that has
//! joined already or is out of range, another program or another protocol version. A refused
//! connection is logged with its address and never counted; the job goes on forming. A
//! connection that sends nothing is dropped after [`GREETING_WAIT`] without holding up the
//! others: each greeting is read on its own thread, at most [`MAX_PENDING`] at a time.
//!
//! The greeting has no length field, so nothing a stranger sends makes rank 0 allocate more
//! than [`GREETING_LEN`] bytes. Host names are resolved on a helper thread and given up on at
//! the deadline (`dist.timeout_s`), since the system resolver may block far longer.
//!
//! Why not libtorch's c10d `TCPStore`: it is a key-value store the ranks would still have to
//! build a rendezvous on, its handshake checks a protocol number but no job identity, it
//! listens on every interface, and the CPU backend's collectives run over the very
//! connections made here. A store would add a second server and a C++ boundary and keep the
//! strangers problem; docs/distributed.md gives the comparison.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::WorldEnv;
use crate::error::{Result, TrainError};

/// Protocol name and version; version 2 added the job token's digest.
const MAGIC: &[u8; 8] = b"OXCLIP\x00\x02";
/// Every greeting's size: the magic, rank and world size (`u32` little-endian), token digest.
pub const GREETING_LEN: usize = 8 + 4 + 4 + 32;
/// How long rank 0 waits for a new connection's greeting, which a rank sends as it connects.
pub const GREETING_WAIT: Duration = Duration::from_secs(2);
/// Greetings read at once; connections beyond this are closed unread, so a flood of silent
/// connections costs a bounded number of threads.
pub const MAX_PENDING: usize = 64;
/// The longest refusal sentence sent back (one length byte).
const MAX_REASON: usize = 255;

fn dist_err(message: String) -> TrainError {
    TrainError::Dist(message)
}

/// The SHA-256 of a job token, as greetings carry it: fixed in size whatever the token, and
/// the token itself never leaves the host.
pub fn token_digest(token: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"oxclip rendezvous token\0");
    hash.update(token.as_bytes());
    hash.finalize().into()
}

/// The greeting a rank of `world` sends.
pub fn greeting(rank: usize, world_size: usize, job_token: &str) -> [u8; GREETING_LEN] {
    let mut hello = [0u8; GREETING_LEN];
    hello[..8].copy_from_slice(MAGIC);
    hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    hello[12..16].copy_from_slice(&(world_size as u32).to_le_bytes());
    hello[16..].copy_from_slice(&token_digest(job_token));
    hello
}

/// The rank a greeting claims, if it is one rank 0 of `world` (whose token hashes to
/// `digest`) is still waiting for (`joined[r - 1]` false); otherwise why not, as a sentence.
pub fn admit(
    hello: &[u8; GREETING_LEN],
    world: &WorldEnv,
    digest: &[u8; 32],
    joined: &[bool],
) -> std::result::Result<usize, String> {
    if hello[..8] != MAGIC[..] {
        return Err(if hello[..7] == MAGIC[..7] {
            format!(
                "an oxclip rank speaking rendezvous version {}, this one speaks {}: run the same \
                 oxclip build on every node",
                hello[7], MAGIC[7]
            )
        } else {
            "not an oxclip rank (it does not speak the rendezvous protocol)".into()
        });
    }
    if hello[16..] != digest[..] {
        return Err("a rank of another job (its job token differs: every rank of a job shares \
                    OXCLIP_RDZV_TOKEN, or the launcher's job id)"
            .into());
    }
    let rank = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
    let their_world = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
    if their_world != world.world_size {
        return Err(format!(
            "rank {rank} has world size {their_world}, this job {}",
            world.world_size
        ));
    }
    match rank.checked_sub(1).and_then(|i| joined.get(i)) {
        None => Err(format!(
            "it claims rank {rank}, which is not one of ranks 1..{} rank 0 waits for",
            world.world_size - 1
        )),
        Some(true) => Err(format!("it claims rank {rank}, which has already joined")),
        Some(false) => Ok(rank),
    }
}

/// Resolves `host:port`, retrying until `deadline` (cluster DNS may lag the job's start);
/// each lookup runs on its own thread so a resolver that hangs cannot hold us past it.
fn resolve(
    host: &str,
    port: u16,
    deadline: Instant,
) -> std::result::Result<Vec<SocketAddr>, String> {
    loop {
        let (tx, rx) = mpsc::channel();
        let name = host.to_owned();
        std::thread::spawn(move || {
            let found = (name.as_str(), port).to_socket_addrs().map(|a| a.collect::<Vec<_>>());
            let _ = tx.send(found);
        });
        let error = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(found)) if !found.is_empty() => return Ok(found),
            Ok(Ok(_)) => format!("{host} resolves to no address"),
            Ok(Err(e)) => format!("cannot resolve {host}: {e}"),
            Err(_) => format!("resolving {host} did not finish within dist.timeout_s"),
        };
        if Instant::now() >= deadline {
            return Err(error);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where rank 0 listens: the address `MASTER_ADDR` names (its first IPv4 one, as the others
/// try them all), or every interface when the job spans nodes and that address is loopback.
fn listen_addr(world: &WorldEnv, resolved: &[SocketAddr]) -> SocketAddr {
    let first = resolved.iter().find(|a| a.is_ipv4()).or(resolved.first()).copied();
    let Some(addr) = first else {
        return SocketAddr::from((Ipv4Addr::LOCALHOST, world.master_port));
    };
    let spans_nodes = world.local_world_size < world.world_size;
    if addr.ip().is_loopback() && spans_nodes {
        tracing::warn!(
            "MASTER_ADDR={} resolves to {} on rank 0's host, which the other nodes cannot \
             reach; rank 0 listens on every interface (the job token keeps other jobs out). \
             Set MASTER_ADDR to an address of this host the other nodes can reach.",
            world.master_addr,
            addr.ip()
        );
        return every_interface(addr);
    }
    addr
}

fn every_interface(like: SocketAddr) -> SocketAddr {
    let any = if like.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    SocketAddr::new(any, like.port())
}

/// Rank 0's listener at [`listen_addr`]. An address that is not this host's own (a
/// Kubernetes service's virtual IP, a NAT'd name) is answered by listening on every
/// interface instead, with a warning: the peers reach rank 0 through it all the same.
fn listen(world: &WorldEnv, resolved: &[SocketAddr]) -> Result<(TcpListener, SocketAddr)> {
    let addr = listen_addr(world, resolved);
    let bound = match TcpListener::bind(addr) {
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
            tracing::warn!(
                "MASTER_ADDR={} resolves to {addr}, which is not an address of rank 0's host \
                 ({e}); rank 0 listens on every interface (the job token keeps other jobs out)",
                world.master_addr
            );
            let any = every_interface(addr);
            TcpListener::bind(any).map(|l| (l, any))
        }
        other => other.map(|l| (l, addr)),
    };
    bound.map_err(|e| {
        dist_err(format!(
            "rank 0 cannot listen on {addr} (MASTER_ADDR={}): {e} (is MASTER_PORT in use?)",
            world.master_addr
        ))
    })
}

/// What a greeting thread hands back: the connection, where from, and the greeting read or
/// what went wrong reading it.
type Arrival = (TcpStream, SocketAddr, std::io::Result<[u8; GREETING_LEN]>);

/// Rank 0: listens and takes ranks 1..W until all have joined or `deadline` passes; the
/// connections in rank order.
pub fn accept_peers(world: &WorldEnv, deadline: Instant) -> Result<Vec<TcpStream>> {
    let resolved = resolve(&world.master_addr, world.master_port, deadline)
        .map_err(|e| dist_err(format!("rank 0 cannot find where to listen (MASTER_ADDR): {e}")))?;
    let (listener, addr) = listen(world, &resolved)?;
    listener.set_nonblocking(true).map_err(|e| dist_err(format!("listener: {e}")))?;
    tracing::debug!("rank 0 listens on {addr}");

    let digest = token_digest(&world.job_token);
    let mut peers: Vec<Option<TcpStream>> = (1..world.world_size).map(|_| None).collect();
    let (arrivals, arrived) = mpsc::channel::<Arrival>();
    let pending = Arc::new(AtomicUsize::new(0));
    let mut refused = 0usize;
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((stream, from)) => {
                if pending.load(Ordering::SeqCst) >= MAX_PENDING {
                    tracing::warn!(
                        "rank 0: {MAX_PENDING} connections are already greeting; the one from \
                         {from} is closed unread"
                    );
                    refused += 1;
                    continue;
                }
                pending.fetch_add(1, Ordering::SeqCst);
                let (arrivals, pending) = (arrivals.clone(), Arc::clone(&pending));
                std::thread::spawn(move || {
                    let hello = read_greeting(&stream);
                    pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = arrivals.send((stream, from, hello));
                });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // A connection reset before it was taken is the peer's business, not the job's.
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(dist_err(format!("rank 0 accepting peers: {e}"))),
        }
        while let Ok((stream, from, hello)) = arrived.try_recv() {
            let joined: Vec<bool> = peers.iter().map(Option::is_some).collect();
            let verdict = match hello {
                Ok(hello) => admit(&hello, world, &digest, &joined),
                Err(e) => Err(format!("sent no greeting ({e})")),
            };
            match verdict {
                Ok(rank) => {
                    tracing::info!(
                        "rank 0: rank {rank} joined from {from} ({} of {} ranks)",
                        joined.iter().filter(|j| **j).count() + 2,
                        world.world_size
                    );
                    peers[rank - 1] = Some(stream);
                }
                Err(reason) => {
                    tracing::warn!("rank 0: refused a connection from {from}: {reason}");
                    refuse(&stream, &reason);
                    refused += 1;
                }
            }
        }
        if peers.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                let missing: Vec<String> = peers
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_none())
                    .map(|(i, _)| (i + 1).to_string())
                    .collect();
                let strangers = match refused {
                    0 => String::new(),
                    n => format!("; {n} other connection(s) were refused meanwhile (see above)"),
                };
                return Err(dist_err(format!(
                    "rank(s) {} never joined rank 0 on {addr} (dist.timeout_s){strangers}",
                    missing.join(", "),
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let streams: Vec<TcpStream> = peers.into_iter().flatten().collect();
    for s in &streams {
        (&*s).write_all(b"OK").map_err(|e| dist_err(format!("welcoming a peer: {e}")))?;
    }
    Ok(streams)
}

/// Reads one greeting, waiting at most [`GREETING_WAIT`].
fn read_greeting(stream: &TcpStream) -> std::io::Result<[u8; GREETING_LEN]> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(GREETING_WAIT))?;
    let mut hello = [0u8; GREETING_LEN];
    let mut got = 0;
    let started = Instant::now();
    while got < GREETING_LEN {
        match (&*stream).read(&mut hello[got..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("closed after {got} of {GREETING_LEN} bytes"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{got} of {GREETING_LEN} bytes in {:.1?}: {e}", started.elapsed()),
                ))
            }
        }
        // A sender trickling a byte at a time gets no more than the wait in all.
        if got < GREETING_LEN && started.elapsed() >= GREETING_WAIT {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("{got} of {GREETING_LEN} bytes in {GREETING_WAIT:?}"),
            ));
        }
    }
    Ok(hello)
}

/// Tells a refused connection why, as far as it listens, and closes it.
fn refuse(stream: &TcpStream, reason: &str) {
    let mut reply = b"NO".to_vec();
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reply.push(end as u8);
    reply.extend_from_slice(&reason.as_bytes()[..end]);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    let _ = (&*stream).write_all(&reply);
}

/// Every other rank: connects to rank 0 (retrying while it starts) and greets it; returns
/// once rank 0 says every rank has joined, or fails at once if rank 0 refuses this one.
pub fn join_rank0(world: &WorldEnv, deadline: Instant) -> Result<TcpStream> {
    let addr = format!("{}:{}", world.master_addr, world.master_port);
    let hello = greeting(world.rank, world.world_size, &world.job_token);
    let mut last_error = String::new();
    loop {
        let resolved = match resolve(&world.master_addr, world.master_port, deadline) {
            Ok(found) => found,
            Err(e) => {
                last_error = e;
                Vec::new()
            }
        };
        for sa in &resolved {
            // Never past the deadline by more than a moment, however slow the network.
            let patience = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let stream = match TcpStream::connect_timeout(sa, patience) {
                Ok(stream) => stream,
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            match greet(&stream, &hello, deadline) {
                Ok(Answer::Joined) => return Ok(stream),
                Ok(Answer::Refused(reason)) => {
                    return Err(dist_err(format!(
                        "rank 0 at {addr} refused rank {}: {reason}",
                        world.rank
                    )))
                }
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    last_error = "rank 0 took this rank's greeting, then closed the connection \
                                  before every rank had joined (see rank 0's log for the ranks \
                                  it missed)"
                        .into()
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        if Instant::now() >= deadline {
            return Err(dist_err(format!(
                "rank {} could not join rank 0 at {addr} within dist.timeout_s: {last_error}",
                world.rank
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

enum Answer {
    Joined,
    Refused(String),
}

/// Sends the greeting and waits for rank 0's answer.
fn greet(stream: &TcpStream, hello: &[u8], deadline: Instant) -> std::io::Result<Answer> {
    (&*stream).write_all(hello)?;
    stream.set_read_timeout(Some(
        deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1)),
    ))?;
    let mut answer = [0u8; 2];
    (&*stream).read_exact(&mut answer)?;
    match &answer {
        b"OK" => Ok(Answer::Joined),
        b"NO" => {
            let mut len = [0u8; 1];
            (&*stream).read_exact(&mut len)?;
            let mut reason = vec![0u8; len[0] as usize];
            (&*stream).read_exact(&mut reason)?;
            Ok(Answer::Refused(String::from_utf8_lossy(&reason).into_owned()))
        }
        _ => Ok(Answer::Refused(
            "its answer is not oxclip's rendezvous (is another program on MASTER_PORT?)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(rank: usize, world_size: usize, token: &str) -> WorldEnv {
        WorldEnv { job_token: token.into(), ..WorldEnv::on_loopback(rank, world_size, 1) }
    }

    #[test]
    fn only_a_missing_rank_of_this_job_is_admitted() {
        let w = world(0, 3, "job-a");
        let digest = token_digest("job-a");
        let ok = greeting(2, 3, "job-a");
        assert_eq!(admit(&ok, &w, &digest, &[false, false]), Ok(2));
        let refusal = |hello: [u8; GREETING_LEN], joined: &[bool]| {
            admit(&hello, &w, &digest, joined).expect_err("refused")
        };
        assert!(refusal(ok, &[false, true]).contains("already joined"));
        assert!(refusal(greeting(2, 3, "job-b"), &[false, false]).contains("another job"));
        assert!(refusal(greeting(2, 4, "job-a"), &[false, false]).contains("world size 4"));
        assert!(refusal(greeting(0, 3, "job-a"), &[false, false]).contains("rank 0,"));
        assert!(refusal(greeting(3, 3, "job-a"), &[false, false]).contains("rank 3,"));
        let mut old = ok;
        old[7] = 1;
        assert!(refusal(old, &[false, false]).contains("version 1"));
        let garbage = [b'G'; GREETING_LEN];
        assert!(refusal(garbage, &[false, false]).contains("not an oxclip rank"));
    }

    /// Every greeting rank 0 can be sent, but the one valid one, is refused without a panic:
    /// all single-byte changes and truncations of a valid greeting, and seeded random bytes.
    #[test]
    fn mutated_greetings_are_refused() {
        let w = world(0, 4, "tok");
        let digest = token_digest("tok");
        let valid = greeting(3, 4, "tok");
        let mut tried = 0;
        for i in 0..GREETING_LEN {
            for v in [0u8, 1, 0x7f, 0x80, 0xff, valid[i] ^ 1] {
                let mut hello = valid;
                hello[i] = v;
                if hello == valid {
                    continue;
                }
                let verdict = admit(&hello, &w, &digest, &[false, false, false]);
                // A change in the rank's bytes may name another missing rank; nothing else
                // may pass.
                if let Ok(rank) = verdict {
                    assert!((8..12).contains(&i) && (1..4).contains(&rank), "byte {i} = {v}");
                }
                tried += 1;
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut hello = [0u8; GREETING_LEN];
            for b in hello.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            assert!(admit(&hello, &w, &digest, &[false, false, false]).is_err());
            tried += 1;
        }
        assert!(tried > 10_000);
    }

    #[test]
    fn refusals_are_read_back_by_the_joiner() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let hello = read_greeting(&stream).expect("greeting");
            assert_eq!(hello, greeting(1, 2, "x"));
            refuse(&stream, &"é".repeat(200)); // cut at a character boundary under 255 bytes
        });
        let stream = TcpStream::connect(addr).expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        match greet(&stream, &greeting(1, 2, "x"), deadline).expect("answer") {
            Answer::Refused(reason) => assert_eq!(reason, "é".repeat(127)),
            Answer::Joined => panic!("joined"),
        }
        server.join().expect("server");
    }

    #[test]
    fn a_silent_connection_is_given_up_on() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let _quiet = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (stream, _) = listener.accept().expect("accept");
        let started = Instant::now();
        let err = read_greeting(&stream).expect_err("no greeting");
        assert!(started.elapsed() < GREETING_WAIT * 2, "{:?}", started.elapsed());
        assert!(err.to_string().contains("0 of 48 bytes"), "{err}");
    }

    #[test]
    fn a_name_that_does_not_resolve_fails_by_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(300);
        let err = resolve("no-such-host.invalid", 1, deadline).expect_err("unresolvable");
        assert!(err.contains("no-such-host.invalid"), "{err}");
        assert!(Instant::now() < deadline + Duration::from_secs(5));
    }

    #[test]
    fn an_address_of_another_host_is_served_on_every_interface() {
        // 192.0.2.0/24 is reserved for documentation: never this host's.
        let elsewhere: Vec<SocketAddr> = vec!["192.0.2.1:0".parse().expect("addr")];
        let w = world(0, 2, "");
        let (_listener, addr) = listen(&w, &elsewhere).expect("listens");
        assert!(addr.ip().is_unspecified(), "{addr}");
    }

    #[test]
    fn rank_0_listens_where_master_addr_points() {
        let local: Vec<SocketAddr> = vec!["127.0.0.1:5".parse().expect("addr")];
        let one_node = WorldEnv { master_port: 5, ..world(0, 2, "") };
        assert_eq!(listen_addr(&one_node, &local), local[0]);
        // Two nodes, and MASTER_ADDR is loopback here: every interface, or the others never
        // reach rank 0.
        let two_nodes = WorldEnv { local_world_size: 1, ..one_node.clone() };
        assert!(listen_addr(&two_nodes, &local).ip().is_unspecified());
        let lan: Vec<SocketAddr> = vec!["10.1.2.3:5".parse().expect("addr")];
        assert_eq!(listen_addr(&two_nodes, &lan), lan[0]);
    }
}
