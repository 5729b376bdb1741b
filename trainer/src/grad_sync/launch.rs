//! When each gradient bucket is launched: the countdown that turns gradients becoming ready,
//! in whatever order the backward pass produces them, into launches strictly in bucket order,
//! the same on every rank, or into no launch at all after a failure.
//!
//! Every rank must issue the same collectives in the same order, or the sums pair one rank's
//! bucket with another's: equal sizes are added silently, other sizes hang. So bucket `i` is
//! launched only once buckets `0..i` are, a failure (a flatten that ran out of memory, a hook
//! that panicked) stops all launching for the rest of the step (the rank then fails the step,
//! and tells the others why), and a bucket is never skipped: one whose gradients never arrive
//! is launched when the backward pass is over, its missing gradients summed as zeros.
//!
//! This file needs nothing but `std`, so that its tests and the `loom` model of the reducer
//! (trainer/tests/launch_model.rs) run the code itself, not a copy.

/// The countdown over one backward pass, with what it launches (`S`, the sink).
pub struct Countdown<S: Sink> {
    /// Per bucket, its parameters whose gradients are not ready yet.
    waiting: Vec<usize>,
    /// Per parameter, its bucket.
    bucket_of: Vec<usize>,
    /// Per parameter, whether its gradient was reported ready (a parameter reached twice
    /// counts once).
    fired: Vec<bool>,
    /// The next bucket to launch; all before it are launched.
    next: usize,
    /// The backward pass is over: every bucket left is due.
    finished: bool,
    /// Where launched buckets go; `None` once finished or failed.
    sink: Option<S>,
    /// The first failure; nothing is launched after it.
    failure: Option<S::Error>,
    /// Buckets launched while the backward pass ran.
    launched_in_backward: usize,
}

/// What a launch does with bucket `b`: flatten it and hand it to the communication thread.
pub trait Sink {
    type Error;
    fn launch(&mut self, bucket: usize) -> Result<(), Self::Error>;
}

impl<S: Sink> Countdown<S> {
    /// `bucket_sizes[b]`: how many parameters bucket `b` holds; parameters are numbered
    /// bucket after bucket.
    pub fn new(bucket_sizes: &[usize], sink: S) -> Self {
        let bucket_of =
            bucket_sizes.iter().enumerate().flat_map(|(b, &n)| std::iter::repeat_n(b, n)).collect();
        Countdown {
            waiting: bucket_sizes.to_vec(),
            fired: vec![false; bucket_sizes.iter().sum()],
            bucket_of,
            next: 0,
            finished: false,
            sink: Some(sink),
            failure: None,
            launched_in_backward: 0,
        }
    }

    /// Parameter `index`'s gradient is ready (a hook, during the backward pass): launches every
    /// bucket that is now complete and next in order.
    pub fn grad_ready(&mut self, index: usize) {
        if index >= self.fired.len() || std::mem::replace(&mut self.fired[index], true) {
            return;
        }
        self.waiting[self.bucket_of[index]] -= 1;
        self.launch_due();
    }

    /// Records `error` as the step's failure, unless one came first, and stops launching.
    pub fn fail(&mut self, error: S::Error) {
        self.failure.get_or_insert(error);
        self.sink = None;
    }

    /// The backward pass is over: launches every bucket left, in order (their gradients that
    /// never arrived count as zeros), then lets the sink go, which tells the communication
    /// thread that no more will come. Returns the first failure, if any.
    pub fn finish(&mut self) -> Result<(), S::Error> {
        if !self.finished {
            self.launched_in_backward = self.next;
            self.finished = true;
        }
        self.launch_due();
        self.sink = None;
        self.failure.take().map_or(Ok(()), Err)
    }

    /// Buckets launched before [`Countdown::finish`] (during the backward pass).
    pub fn launched_in_backward(&self) -> usize {
        if self.finished {
            self.launched_in_backward
        } else {
            self.next
        }
    }

    fn launch_due(&mut self) {
        while self.next < self.waiting.len() && (self.finished || self.waiting[self.next] == 0) {
            let Some(sink) = self.sink.as_mut() else { return };
            let b = self.next;
            // Counted as launched before the attempt: a bucket is tried once, never twice.
            self.next += 1;
            if let Err(e) = sink.launch(b) {
                self.fail(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records launches; fails the launch of `fail_at`.
    struct Log {
        launched: Vec<usize>,
        fail_at: Option<usize>,
    }

    impl Sink for &mut Log {
        type Error = String;
        fn launch(&mut self, bucket: usize) -> Result<(), String> {
            if self.fail_at == Some(bucket) {
                return Err(format!("bucket {bucket} failed"));
            }
            self.launched.push(bucket);
            Ok(())
        }
    }

    #[test]
    fn buckets_launch_in_order_whatever_order_their_gradients_come_in() {
        let mut log = Log { launched: Vec::new(), fail_at: None };
        let mut c = Countdown::new(&[2, 1, 1], &mut log);
        c.grad_ready(3); // bucket 2 complete, waits for 0 and 1
        c.grad_ready(2); // bucket 1 complete, waits for 0
        c.grad_ready(0);
        c.grad_ready(0); // twice counts once
        assert_eq!(c.launched_in_backward(), 0);
        c.grad_ready(1); // bucket 0 complete: 0, 1, 2 go
        assert_eq!(c.launched_in_backward(), 3);
        assert_eq!(c.finish(), Ok(()));
        assert_eq!(log.launched, [0, 1, 2]);
    }

    #[test]
    fn buckets_whose_gradients_never_come_are_launched_when_the_backward_pass_ends() {
        let mut log = Log { launched: Vec::new(), fail_at: None };
        let mut c = Countdown::new(&[1, 1, 1], &mut log);
        c.grad_ready(0);
        c.grad_ready(2);
        c.grad_ready(7); // not a parameter of these buckets: ignored
        assert_eq!(c.finish(), Ok(()));
        assert_eq!(c.launched_in_backward(), 1);
        assert_eq!(log.launched, [0, 1, 2]);
    }

    #[test]
    fn a_failure_stops_every_later_launch_and_is_reported_once() {
        let mut log = Log { launched: Vec::new(), fail_at: Some(1) };
        let mut c = Countdown::new(&[1, 1, 1], &mut log);
        c.grad_ready(0);
        c.grad_ready(1); // fails
        c.grad_ready(2);
        c.fail("later".into()); // the first failure is the one reported
        assert_eq!(c.finish(), Err("bucket 1 failed".to_owned()));
        assert_eq!(log.launched, [0]);
    }
}
