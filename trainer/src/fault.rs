//! Faults injected on purpose, for the tests that show how a failure on one rank ends a run
//! (launch/tests/faults.rs, launch/tests/preempt.rs). Compiled in only with the
//! `fault-injection` feature, which only the test builds turn on: any other build never reads
//! these variables, and every function here is a constant "no fault".
//!
//! - `OXCLIP_FAULT=KIND:rank=R:step=S:bucket=B`: on rank `R`, in the `S`-th gradient reduction
//!   of this process (1-based), when bucket `B` is launched during the backward pass. `KIND`:
//!   - `flatten-fails`: flattening the bucket fails, as it does when the device runs out of
//!     memory at the backward pass's peak;
//!   - `hook-panics`: the gradient hook panics;
//!   - `undefined-grads`: the bucket's gradients are taken away first, as for parameters the
//!     rank's graph did not reach;
//!   - `collective-fails`: the bucket's sum fails to start on the communication thread, as a
//!     collective does when the link goes down;
//!   - `vanish`: the process is killed (SIGKILL) on the spot, a peer lost mid-backward;
//!   - `inf-grad`: one element of the bucket's first gradient becomes +inf, as an fp16
//!     overflow leaves it (`train.precision: amp` skips that step, launch/tests/amp.rs).
//! - `OXCLIP_TEST_CHECKPOINT_DELAY_MS=N`: the checkpoint writer sleeps `N` ms before each file,
//!   so that a test can kill a process in the middle of a write.

/// What happens at a bucket's launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    FlattenFails,
    HookPanics,
    UndefinedGrads,
    CollectiveFails,
    Vanish,
    InfGrad,
}

/// The fault `OXCLIP_FAULT` asks for at bucket `bucket` of reduction `reduction` on `rank`.
#[cfg(feature = "fault-injection")]
pub fn in_bucket(rank: usize, reduction: u64, bucket: usize) -> Option<Fault> {
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(Fault, usize, u64, usize)>> = OnceLock::new();
    let spec = SPEC.get_or_init(|| {
        let text = std::env::var("OXCLIP_FAULT").ok()?;
        let parsed = parse(&text);
        if parsed.is_none() {
            tracing::error!("OXCLIP_FAULT={text}: not KIND:rank=R:step=S:bucket=B; no fault");
        }
        parsed
    });
    spec.filter(|&(_, r, s, b)| (r, s, b) == (rank, reduction, bucket)).map(|(f, ..)| f)
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn in_bucket(_rank: usize, _reduction: u64, _bucket: usize) -> Option<Fault> {
    None
}

#[cfg(feature = "fault-injection")]
fn parse(text: &str) -> Option<(Fault, usize, u64, usize)> {
    let mut parts = text.trim().split(':');
    let fault = match parts.next()? {
        "flatten-fails" => Fault::FlattenFails,
        "hook-panics" => Fault::HookPanics,
        "undefined-grads" => Fault::UndefinedGrads,
        "collective-fails" => Fault::CollectiveFails,
        "vanish" => Fault::Vanish,
        "inf-grad" => Fault::InfGrad,
        _ => return None,
    };
    let (mut rank, mut step, mut bucket) = (None, None, None);
    for part in parts {
        match part.split_once('=')? {
            ("rank", v) => rank = v.parse().ok(),
            ("step", v) => step = v.parse().ok(),
            ("bucket", v) => bucket = v.parse().ok(),
            _ => return None,
        }
    }
    Some((fault, rank?, step?, bucket?))
}

/// Ends this process at once, as `kill -9` from outside would.
pub fn vanish() -> ! {
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so it does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

/// How long the checkpoint writer sleeps before each file (`OXCLIP_TEST_CHECKPOINT_DELAY_MS`).
#[cfg(feature = "fault-injection")]
pub fn checkpoint_delay() -> Option<std::time::Duration> {
    let ms = std::env::var("OXCLIP_TEST_CHECKPOINT_DELAY_MS").ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn checkpoint_delay() -> Option<std::time::Duration> {
    None
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_none() {
        assert_eq!(parse("hook-panics:rank=2:step=3:bucket=1"), Some((Fault::HookPanics, 2, 3, 1)));
        assert_eq!(parse("vanish:step=3:rank=0:bucket=0"), Some((Fault::Vanish, 0, 3, 0)));
        assert_eq!(parse("inf-grad:rank=1:step=3:bucket=0"), Some((Fault::InfGrad, 1, 3, 0)));
        assert_eq!(parse("hook-panics:rank=2:step=3"), None);
        assert_eq!(parse("melt:rank=2:step=3:bucket=1"), None);
        assert_eq!(parse("flatten-fails:rank=x:step=3:bucket=1"), None);
    }
}
