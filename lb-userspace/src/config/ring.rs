//! The Maglev ring of a VIP: its size must be prime, and every backend of weight above 0 must
//! get a slot of it, or that backend would never get traffic while it is healthy; the size to
//! suggest when it is too small. For XDP VIPs' `ring_size` and the fixed ring of the L7
//! proxy's `hash` pools alike.

use lb_common::MAX_RING_SIZE;

use super::{
    message::{Invalid, bad},
    raw,
};

/// Is `n` prime? A Maglev ring's size must be, for every backend's walk to visit every slot.
pub(super) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Does every backend of weight above 0 get at least one slot of a Maglev ring of `m` slots?
/// Shares are proportional to weight and rounded (floor, then largest remainders): one below a
/// slot may round to none, and that backend would never get traffic while it is healthy.
/// `ring_key` names the setting that sizes the ring ("" when it is fixed).
pub(super) fn ring_shares_ok(
    backends: &[raw::Backend],
    m: u32,
    ring_key: &str,
) -> Result<(), Invalid> {
    let weight = |b: &raw::Backend| b.weight.as_ref().map_or(1, |w| *w.get_ref()) as u64;
    let total: u64 = backends.iter().map(weight).sum();
    let Some(b) = backends.iter().find(|b| weight(b) > 0 && weight(b) * (m as u64) < total) else {
        return Ok(());
    };
    let share = weight(b) as f64 * m as f64 / total as f64;
    let raise = if ring_key.is_empty() {
        format!(" (this ring's size is fixed: {m} slots)")
    } else {
        format!(", or raise {ring_key} (now {m}, at most {MAX_RING_SIZE})")
    };
    bad(
        b.weight.as_ref().map_or(b.address.span(), |w| w.span()),
        format!(
            "backend {} has weight {} of {total} in all, a share of {share:.2} of the ring's {m} slots, which may round to none: it would never get traffic; raise its weight to at least {}{raise}",
            b.address.get_ref(),
            weight(b),
            (total - weight(b)).div_ceil(m as u64 - 1),
        ),
    )
}

/// A ring size to suggest for `backends` backends: the smallest prime of at least 100 slots a
/// backend, within the largest ring.
pub(super) fn ring_size_for(backends: usize) -> u32 {
    let mut m = (backends.saturating_mul(100).min(MAX_RING_SIZE as usize) as u32).max(3);
    while !is_prime(m) {
        m += 1;
    }
    m.min(MAX_RING_SIZE)
}
