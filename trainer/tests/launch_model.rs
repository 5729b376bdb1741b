//! A `loom` model of the overlapped gradient reduction's launch protocol
//! (`grad_sync::reduce_overlapped`), run over every interleaving of its threads with up to three
//! preemptions (see `model`).
//!
//! The state machine is the production one, `src/grad_sync/launch.rs`, included as it is; the
//! shell around it is reduce_overlapped's, built from loom's primitives:
//! - two hook threads (libtorch may run the hooks on more than one thread), each reporting
//!   gradients ready through the one `Mutex<Countdown<Launcher>>`;
//! - the `Launcher` sink, which "flattens" a bucket (writes its buffer) and sends its index to
//!   the communication thread;
//! - the communication thread, which "sums" each bucket it receives (doubles its buffer, the
//!   sum of two ranks holding the same gradients), in the order received, until the sender is
//!   gone;
//! - the main thread, which joins the hooks (the backward pass returns), calls `finish()` (which
//!   lets the sink, and with it the sender, go), joins the communication thread, and only then
//!   reads every buffer (the copy-back).
//!
//! The buffers are loom `UnsafeCell`s, so loom also proves that no access to a bucket races
//! another: the flatten is ordered before the sum by the channel, the sum before the copy-back
//! by the join.
//!
//! Not modelled: the tensors and the backend (what a flatten or a sum computes, the device
//! streams and their marks, `InFlight`'s retirement of started buckets); a communication thread
//! that stops early on a failed start (a send then fails, a failed launch to the countdown like
//! the flatten failures modelled here; which error the step reports is reduce_overlapped's
//! choice, not the countdown's); a hook that panics halfway through `grad_ready` (loom's `Mutex`
//! does not poison; here `fail()` comes between two reports); more buckets, parameters or hook
//! threads than the few that keep the exploration to seconds.
//!
//! Each property was checked to catch its bug: `fail()` or `finish()` keeping the sink (a launch
//! after the failure; a deadlock joining the communication thread), the last failure replacing
//! the first, and a copy-back before the join (a causality violation on a buffer) each fail
//! these tests.
//!
//! Time, release build on a shared, loaded 2-core machine: about 6 s for the three models (each
//! test's own below).

// The production state machine itself, not a copy (it needs nothing but `std`). Its own unit
// tests come along and run here too.
#[path = "../src/grad_sync/launch.rs"]
mod launch;

use std::collections::{BTreeSet, VecDeque};

use launch::{Countdown, Sink};
use loom::cell::UnsafeCell;
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// Three buckets over four parameters: bucket 0 holds parameters 0 and 1, bucket 1 parameter 2,
/// bucket 2 parameter 3.
const SIZES: [usize; 3] = [2, 1, 1];
const BUCKETS: usize = SIZES.len();

/// What bucket `b`'s flatten writes into its buffer.
fn flat_value(b: usize) -> u32 {
    10 + b as u32
}

/// The channel to the communication thread, with `std::sync::mpsc`'s semantics for one sender:
/// first in, first out; `recv` returns `None` once the queue is empty and the sender gone; `send`
/// fails once the receiver is gone. loom 0.7's own `mpsc` does not model the hang-up (a `recv` on
/// an empty channel whose senders are gone blocks forever, a deadlock to loom), and
/// reduce_overlapped's communication thread ends exactly on that hang-up; so it is built here
/// from a loom `Mutex` and `Condvar`.
struct Channel {
    state: Mutex<ChannelState>,
    changed: Condvar,
}

struct ChannelState {
    queue: VecDeque<usize>,
    sender: bool,
    receiver: bool,
}

struct Sender(Arc<Channel>);
struct Receiver(Arc<Channel>);

fn channel() -> (Sender, Receiver) {
    let chan = Arc::new(Channel {
        state: Mutex::new(ChannelState { queue: VecDeque::new(), sender: true, receiver: true }),
        changed: Condvar::new(),
    });
    (Sender(chan.clone()), Receiver(chan))
}

impl Sender {
    fn send(&self, bucket: usize) -> Result<(), ()> {
        let mut state = self.0.state.lock().unwrap();
        if !state.receiver {
            return Err(());
        }
        state.queue.push_back(bucket);
        self.0.changed.notify_one();
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().sender = false;
        self.0.changed.notify_one();
    }
}

impl Receiver {
    fn recv(&self) -> Option<usize> {
        let mut state = self.0.state.lock().unwrap();
        loop {
            if let Some(bucket) = state.queue.pop_front() {
                return Some(bucket);
            }
            if !state.sender {
                return None;
            }
            state = self.0.changed.wait(state).unwrap();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().receiver = false;
    }
}

/// Per bucket, its flat buffer: written by the flatten (on a hook thread), summed in place by
/// the communication thread, read by the copy-back (on the main thread).
struct Buffers([UnsafeCell<u32>; BUCKETS]);

// SAFETY: the protocol under test is what orders the accesses, and loom's `UnsafeCell` checks
// that it does: an access that is not ordered after a conflicting one fails the model.
unsafe impl Sync for Buffers {}

/// What happened under the countdown's lock, in its order (bookkeeping for the assertions,
/// outside the model: a `std` mutex, only ever taken while the countdown's lock is held or
/// after every other thread has ended, so it never blocks and adds no interleavings).
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// Bucket `b` flattened and sent.
    Launched(usize),
    /// Bucket `b`'s launch failed with this error.
    LaunchFailed(usize, String),
    /// A hook reported this failure through `fail()` (the panic path).
    Failed(String),
    /// The main thread is about to call `finish()`.
    Finish,
}

type Log = std::sync::Arc<std::sync::Mutex<Vec<Event>>>;

fn record(log: &Log, event: Event) {
    log.lock().unwrap().push(event);
}

/// The sink: reduce_overlapped's `Launcher` with the tensors taken out.
struct Launcher {
    buffers: Arc<Buffers>,
    tx: Sender,
    /// The bucket whose flatten fails (out of memory, say), if any.
    fail_at: Option<usize>,
    log: Log,
}

impl Sink for Launcher {
    type Error = String;

    fn launch(&mut self, bucket: usize) -> Result<(), String> {
        if self.fail_at == Some(bucket) {
            let e = format!("flattening bucket {bucket} failed");
            record(&self.log, Event::LaunchFailed(bucket, e.clone()));
            return Err(e);
        }
        // SAFETY: checked by loom (see `Buffers`).
        self.buffers.0[bucket].with_mut(|p| unsafe { *p = flat_value(bucket) });
        record(&self.log, Event::Launched(bucket));
        self.tx.send(bucket).map_err(|()| "the communication thread stopped".to_owned())
    }
}

/// One step of a hook thread.
#[derive(Debug, Clone, Copy)]
enum Hook {
    /// Parameter `i`'s gradient is ready.
    Ready(usize),
    /// A hook panicked: `fail()`, as `HookCtx::hook_panicked` does.
    Panics,
}

/// One scenario: what each of the two hook threads does, in order, and which launch fails.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    hooks: [&'static [Hook]; 2],
    fail_at: Option<usize>,
}

/// What one interleaving produced.
#[derive(Debug)]
struct Outcome {
    /// The buckets the communication thread received, in order.
    received: Vec<usize>,
    /// What `finish()` returned.
    finished: Result<(), String>,
    /// `launched_in_backward()` after `finish()`.
    in_backward: usize,
    /// The buffers as the copy-back read them.
    copied_back: [u32; BUCKETS],
    log: Vec<Event>,
}

/// reduce_overlapped's threads for one interleaving.
fn reduce(scenario: Scenario) -> Outcome {
    let buffers = Arc::new(Buffers([UnsafeCell::new(0), UnsafeCell::new(0), UnsafeCell::new(0)]));
    let log = Log::default();
    let (tx, rx) = channel();

    let communicator = {
        let buffers = buffers.clone();
        thread::spawn(move || {
            let mut received = Vec::new();
            while let Some(b) = rx.recv() {
                // SAFETY: checked by loom (see `Buffers`).
                buffers.0[b].with_mut(|p| unsafe {
                    assert_eq!(*p, flat_value(b), "bucket {b} summed before its flatten");
                    *p *= 2;
                });
                received.push(b);
            }
            received
        })
    };

    let launcher =
        Launcher { buffers: buffers.clone(), tx, fail_at: scenario.fail_at, log: log.clone() };
    let countdown = Arc::new(Mutex::new(Countdown::new(&SIZES, launcher)));
    let hooks: Vec<_> = scenario
        .hooks
        .into_iter()
        .map(|steps| {
            let (countdown, log) = (countdown.clone(), log.clone());
            thread::spawn(move || {
                for &step in steps {
                    let mut c = countdown.lock().unwrap();
                    match step {
                        Hook::Ready(i) => c.grad_ready(i),
                        Hook::Panics => {
                            let e = "a gradient hook panicked".to_owned();
                            record(&log, Event::Failed(e.clone()));
                            c.fail(e);
                        }
                    }
                }
            })
        })
        .collect();

    // The backward pass returns once its hooks have run.
    for hook in hooks {
        hook.join().unwrap();
    }
    let (finished, in_backward) = {
        let mut c = countdown.lock().unwrap();
        record(&log, Event::Finish);
        let finished = c.finish();
        (finished, c.launched_in_backward())
    };
    // The countdown stays alive, as in reduce_overlapped: the communication thread ends only
    // because `finish()` let the sink (the sender) go. Had it not, this join would deadlock,
    // which loom reports.
    let received = communicator.join().unwrap();
    // SAFETY: checked by loom (see `Buffers`).
    let copied_back = std::array::from_fn(|b| buffers.0[b].with(|p| unsafe { *p }));
    let log = log.lock().unwrap().clone();
    Outcome { received, finished, in_backward, copied_back, log }
}

/// What holds in every interleaving of every scenario.
fn check_invariants(scenario: Scenario, out: &Outcome) {
    let ctx = || format!("{scenario:?}: {out:?}");
    // Launches are attempted in bucket order, each at most once.
    let attempts: Vec<usize> = out
        .log
        .iter()
        .filter_map(|e| match e {
            Event::Launched(b) | Event::LaunchFailed(b, _) => Some(*b),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, (0..attempts.len()).collect::<Vec<_>>(), "{}", ctx());
    // Nothing is launched after the first failure, which `finish()` returns.
    let first_failure =
        out.log.iter().position(|e| matches!(e, Event::LaunchFailed(..) | Event::Failed(_)));
    if let Some(at) = first_failure {
        assert!(
            !out.log[at + 1..]
                .iter()
                .any(|e| matches!(e, Event::Launched(_) | Event::LaunchFailed(..))),
            "{}",
            ctx()
        );
        let (Event::LaunchFailed(_, e) | Event::Failed(e)) = &out.log[at] else { unreachable!() };
        assert_eq!(out.finished, Err(e.clone()), "{}", ctx());
    } else {
        assert_eq!(out.finished, Ok(()), "{}", ctx());
    }
    // The communication thread received exactly the buckets sent, in the order sent: a prefix
    // of the buckets.
    let sent: Vec<usize> = out
        .log
        .iter()
        .filter_map(|e| if let Event::Launched(b) = e { Some(*b) } else { None })
        .collect();
    assert_eq!(out.received, sent, "{}", ctx());
    assert_eq!(out.received, (0..out.received.len()).collect::<Vec<_>>(), "{}", ctx());
    // `launched_in_backward` counts the attempts made before `finish()`.
    let finish_at = out.log.iter().position(|e| *e == Event::Finish).unwrap();
    let before_finish = out.log[..finish_at]
        .iter()
        .filter(|e| matches!(e, Event::Launched(_) | Event::LaunchFailed(..)))
        .count();
    assert_eq!(out.in_backward, before_finish, "{}", ctx());
    // The copy-back sees every received bucket summed, and no other bucket touched.
    for b in 0..BUCKETS {
        let want = if out.received.contains(&b) { 2 * flat_value(b) } else { 0 };
        assert_eq!(out.copied_back[b], want, "bucket {b}: {}", ctx());
    }
}

/// What an interleaving ended with, as the tests compare it: the buckets received, what
/// `finish()` returned, and `launched_in_backward()`.
type Summary = (Vec<usize>, Result<(), String>, usize);

/// Explores every interleaving of `scenario` (up to the preemption bound), checking the
/// invariants on each outcome; returns the distinct outcomes seen, so that a test can also
/// check that the races it means to explore were explored.
fn model(scenario: Scenario) -> BTreeSet<Summary> {
    let mut builder = loom::model::Builder::new();
    // Every interleaving with up to 3 preemptions (switches away from a thread that could go
    // on). Bounded, because the exploration grows about sevenfold per preemption: all three
    // tests take about 1 s with 2, 6 s with 3, 45 s with 4. 2 already reaches every outcome the
    // tests expect and catches every bug listed at the top; 3 is the margin.
    // LOOM_MAX_PREEMPTIONS overrides it.
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    // Outside the model (a `std` mutex taken once an interleaving is over).
    let seen = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    builder.check(move || {
        let out = reduce(scenario);
        check_invariants(scenario, &out);
        seen_in.lock().unwrap().insert((out.received, out.finished, out.in_backward));
    });
    let seen = seen.lock().unwrap().clone();
    seen
}

fn summary(received: &[usize], finished: Result<(), &str>, in_backward: usize) -> Summary {
    (received.to_vec(), finished.map_err(str::to_owned), in_backward)
}

use Hook::{Panics, Ready};

/// Without a failure, the communication thread receives 0, 1, 2 in that order, each once,
/// whatever order the two hook threads report in, however the threads interleave, with
/// parameters reported twice or never.
///
/// About 3.7 s (release build, shared loaded 2-core machine).
#[test]
fn without_a_failure_every_bucket_is_received_once_in_order() {
    // Each with the buckets launched during the backward pass (before `finish()`).
    let scenarios: [([&'static [Hook]; 2], usize); 4] = [
        // The last bucket's gradient first (the backward pass's usual order), split over hooks.
        ([&[Ready(3), Ready(1)], &[Ready(2), Ready(0)]], 3),
        // The first bucket's first.
        ([&[Ready(0), Ready(1)], &[Ready(3), Ready(2)]], 3),
        // A parameter reported by both hooks (counted once).
        ([&[Ready(3), Ready(0), Ready(2)], &[Ready(0), Ready(1)]], 3),
        // Parameter 2 never reported: bucket 0 goes during the backward pass, 1 and 2 (whose
        // gradient did come) at `finish()`.
        ([&[Ready(3), Ready(1)], &[Ready(0)]], 1),
    ];
    for (hooks, in_backward) in scenarios {
        let seen = model(Scenario { hooks, fail_at: None });
        assert_eq!(seen, BTreeSet::from([summary(&[0, 1, 2], Ok(()), in_backward)]), "{hooks:?}");
    }
}

/// A failing launch (bucket k's flatten): the communication thread receives exactly 0..k, and
/// `finish()` returns that failure.
///
/// About 0.7 s (release build, shared loaded 2-core machine).
#[test]
fn after_a_failed_launch_nothing_more_is_launched() {
    let hooks: [&'static [Hook]; 2] = [&[Ready(3), Ready(1)], &[Ready(2), Ready(0)]];
    for k in 0..BUCKETS {
        let seen = model(Scenario { hooks, fail_at: Some(k) });
        let e = format!("flattening bucket {k} failed");
        // Every gradient comes, so the failed launch is tried during the backward pass.
        let received: Vec<usize> = (0..k).collect();
        assert_eq!(seen, BTreeSet::from([summary(&received, Err(&e), k + 1)]), "bucket {k} fails");
    }
}

/// A hook that panics (`fail()`) while the other hook goes on reporting, and the panicking
/// one's thread too: nothing is launched after the failure, the buckets received are a prefix
/// in order, and `finish()` returns the first failure, the panic's or a failed launch's,
/// whichever came first.
///
/// About 1.3 s (release build, shared loaded 2-core machine).
#[test]
fn a_hook_failure_stops_the_launches_whatever_it_races_with() {
    // Parameter 2's gradient comes on both threads, once before the panic, once after it,
    // where it could complete bucket 1 but must not launch it.
    let hooks: [&'static [Hook]; 2] =
        [&[Ready(0), Ready(1), Ready(2)], &[Ready(3), Panics, Ready(2)]];
    let panicked = Err("a gradient hook panicked");
    // The panic before bucket 0 is complete, after it alone, or after all three.
    let seen = model(Scenario { hooks, fail_at: None });
    let want =
        [summary(&[], panicked, 0), summary(&[0], panicked, 1), summary(&[0, 1, 2], panicked, 3)];
    assert_eq!(seen, BTreeSet::from(want));
    // Racing a failed launch of bucket 1: whichever failure comes first is the one returned.
    let seen = model(Scenario { hooks, fail_at: Some(1) });
    let want = [
        summary(&[], panicked, 0),
        summary(&[0], panicked, 1),
        summary(&[0], Err("flattening bucket 1 failed"), 2),
    ];
    assert_eq!(seen, BTreeSet::from(want));
}
