//! Log lines that a flood cannot turn into a flood of log lines: each kind
//! of line (a refusal reason, an accept error) gets a small burst and then
//! one line every five seconds, which says how many like it were left out. The
//! counters are never limited: every event is still counted in `/metrics`.
use std::{cell::RefCell, collections::HashMap, time::Instant};

/// Lines of one kind let through at once.
const BURST: f64 = 3.0;
/// Lines of one kind a second, after the burst.
const PER_SECOND: f64 = 0.2;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    left_out: u64,
}

/// One executor's log limiter, by kind of line.
#[derive(Debug, Default)]
pub struct Quiet {
    kinds: RefCell<HashMap<&'static str, Bucket>>,
}

impl Quiet {
    /// Whether a line of `kind` may be logged now; if so, how many of its
    /// kind were left out since the last one.
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut kinds = self.kinds.borrow_mut();
        let b = kinds.entry(kind).or_insert(Bucket { tokens: BURST, at: now, left_out: 0 });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * PER_SECOND).min(BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.left_out))
        } else {
            b.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count() {
        let q = Quiet::default();
        let allowed = (0..100).filter(|_| q.allow("x").is_some()).count();
        assert_eq!(allowed, BURST as usize, "a burst, then nothing within the same instant");
        assert_eq!(q.allow("y"), Some(0), "kinds are limited apart");
        std::thread::sleep(std::time::Duration::from_millis(5100));
        assert_eq!(q.allow("x"), Some(97), "the next line counts what was left out");
    }
}
