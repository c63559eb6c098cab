//! Per-CPU token buckets (`SearchBudget` elements of a per-CPU array): how the program keeps
//! work that a flood could drive (searches of the other CPUs' tables, ICMP answers) to a rate.

use lb_common::SearchBudget;

/// Refills `b` by the whole `interval_ns` periods since it was last refilled, up to `burst`,
/// and says whether a token is left. The time of a period not yet whole is kept for the next
/// call: calls closer together than one period still refill at the rate, where moving the
/// clock to every call would let a steady stream starve the bucket.
#[inline(always)]
pub fn refill(b: &mut SearchBudget, now: u64, interval_ns: u64, burst: i64) -> bool {
    let periods = now.saturating_sub(b.last_ns) / interval_ns;
    if periods > 0 {
        let tokens = b.tokens.saturating_add(periods.min(burst as u64) as i64);
        if tokens >= burst {
            b.tokens = burst;
            b.last_ns = now;
        } else {
            b.tokens = tokens;
            b.last_ns += periods * interval_ns;
        }
    }
    b.tokens > 0
}
