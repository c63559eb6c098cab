//! The doubling backoff of everything the controller tries again after a failure: binding the
//! admin socket again, attaching XDP again to a lost interface, starting a dead health check
//! again. One type, so that the three agree on what "doubling up to a ceiling" means.

use std::time::Duration;

/// A wait that starts at `first` and doubles with each further failure in a row, up to
/// `longest`: something that keeps failing is tried (and logged) rarely, yet is tried again
/// within `longest` of its cause going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    longest: Duration,
}

impl Backoff {
    /// A backoff from `first` to `longest`; `first` must not exceed `longest` (checked when a
    /// `const` is built from it, so a wrong pair does not compile).
    pub const fn new(first: Duration, longest: Duration) -> Backoff {
        assert!(
            first.as_nanos() <= longest.as_nanos(),
            "a backoff's first wait exceeds its longest"
        );
        Backoff { first, longest }
    }

    /// The wait after a first failure.
    pub const fn first(&self) -> Duration {
        self.first
    }

    /// The longest wait, reached after enough failures in a row.
    pub const fn longest(&self) -> Duration {
        self.longest
    }

    /// The wait after one more failure, the last wait having been `wait`: twice as long, kept
    /// within [`first`](Self::first) and [`longest`](Self::longest).
    pub fn after(&self, wait: Duration) -> Duration {
        wait.saturating_mul(2).clamp(self.first, self.longest)
    }

    /// The wait after `failures` failures in a row (counting from 1; 0 is taken as 1):
    /// `first` × 2^(failures − 1), up to `longest`.
    pub fn nth(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first.saturating_mul(1 << doublings).min(self.longest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

    #[test]
    fn doubles_from_first_up_to_longest() {
        let waits: Vec<u64> = (1..=9).map(|n| B.nth(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(B.nth(0), B.first());
        assert_eq!(B.nth(u32::MAX), B.longest());
    }

    #[test]
    fn after_agrees_with_nth() {
        let mut wait = B.first();
        for n in 2..=40 {
            wait = B.after(wait);
            assert_eq!(wait, B.nth(n), "after {n} failures");
        }
        // A wait from outside the range (a backoff changed between runs) is brought into it.
        assert_eq!(B.after(Duration::ZERO), B.first());
        assert_eq!(B.after(Duration::MAX), B.longest());
    }
}
