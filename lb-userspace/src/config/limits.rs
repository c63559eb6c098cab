//! What integer settings may be, and limits of the whole file. Each integer setting narrower
//! than its type has its range ([`RANGES`]) or its form ([`FORMS`]) in one table, which the
//! checks ([`in_range`], [`of_form`], [`setting`]) and the hint for a mistyped value
//! (`hint::reworded`) both read, so the two never say different bounds; [`Tally`] counts
//! entries against a limit of the whole file (backend entries) and says where it is passed.

use std::ops::Range;

use lb_common::MAX_RING_SIZE;

use super::{
    MAX_CONNTRACK_FLOWS, MIN_CONNTRACK_FLOWS,
    message::{Invalid, bad, quoted},
    raw,
};

/// Integer settings whose range is narrower than their type's, by key: validation checks
/// these, and the hint for a mistyped value quotes them (`hint::reworded`), from this one table.
/// Keys are unique across tables: health's `interval_ms`/`timeout_ms` and `[vip.l7]`'s
/// `*_timeout_ms` have names of their own.
pub(super) const RANGES: &[(&str, u64, u64)] = &[
    ("weight", 0, 10_000),
    ("ring_size", 3, MAX_RING_SIZE as u64),
    ("l7_threads", 1, 256),
    ("l7_drain_timeout_ms", 0, 3_600_000),
    ("retries", 0, 10),
    ("max_header_bytes", 1_024, 1_048_576),
    ("max_headers", 1, 1_000),
    ("max_connections", 1, 1_000_000),
    ("upstream_keepalive", 0, 100_000),
    ("max_fails", 1, 100),
    ("connect_timeout_ms", 1, 3_600_000),
    ("header_timeout_ms", 1, 3_600_000),
    ("response_timeout_ms", 1, 3_600_000),
    ("idle_timeout_ms", 1, 3_600_000),
    ("tunnel_timeout_ms", 1, 86_400_000),
    ("request_timeout_ms", 1, 3_600_000),
    ("fail_timeout_ms", 1, 3_600_000),
    ("interval_ms", 10, 600_000),
    ("timeout_ms", 10, 600_000),
    ("rise", 1, 100),
    ("fall", 1, 100),
    ("expect_status", 100, 599),
];

/// An entry of [`FORMS`]: the key, its values in words, and the test of a value.
pub(super) type Form = (&'static str, &'static str, fn(u64) -> bool);

/// Integer settings whose valid values are not one range, by key: how to say them, and the test
/// of a value. Validation's errors and the hint for a mistyped value (`hint::reworded`) both
/// say them in these words, which would otherwise quote the type's range (`mtu` as
/// 0..=4294967295).
pub(super) const FORMS: &[Form] = &[
    ("mtu", "0 (no check) or 576..=65535", |n| n == 0 || (576..=65535).contains(&n)),
    ("proxy_protocol", "1 or 2", |n| matches!(n, 1 | 2)),
    ("conntrack_flows_per_cpu", "a power of two from 4096 to 1048576", |n| {
        n.is_power_of_two()
            && (MIN_CONNTRACK_FLOWS as u64..=MAX_CONNTRACK_FLOWS as u64).contains(&n)
    }),
];

/// The words and the test of `key` in [`FORMS`].
pub(super) fn form(key: &str) -> (&'static str, fn(u64) -> bool) {
    let &(_, words, ok) =
        FORMS.iter().find(|(k, ..)| *k == key).expect("every checked key is in FORMS");
    (words, ok)
}

/// `v` if it is of `key`'s form in [`FORMS`]; if not, the error says so: "`key` must be ...".
pub(super) fn of_form<T: Copy + Into<u64>>(v: &raw::Sp<T>, key: &str) -> Result<T, Invalid> {
    let (words, ok) = form(key);
    if ok((*v.get_ref()).into()) {
        Ok(*v.get_ref())
    } else {
        bad(v.span(), format!("{key} must be {words} (got {})", (*v.get_ref()).into()))
    }
}

/// The range of `key` in [`RANGES`].
pub(super) fn range(key: &str) -> std::ops::RangeInclusive<u64> {
    let &(_, min, max) =
        RANGES.iter().find(|(k, ..)| *k == key).expect("every checked key is in RANGES");
    min..=max
}

/// Is `v` in `key`'s range? If not, the error says so: "`key` must be min..=max".
pub(super) fn in_range<T: Copy + Into<u64>>(v: &raw::Sp<T>, key: &str) -> Result<T, Invalid> {
    let r = range(key);
    if r.contains(&(*v.get_ref()).into()) {
        Ok(*v.get_ref())
    } else {
        bad(v.span(), format!("{key} must be {}..={}", r.start(), r.end()))
    }
}

/// The value of an integer setting checked by [`in_range`], or `default` when it is not set.
pub(super) fn setting<T: Copy + Into<u64>>(
    v: &Option<raw::Sp<T>>,
    default: T,
    key: &str,
) -> Result<T, Invalid> {
    v.as_ref().map_or(Ok(default), |v| in_range(v, key))
}

/// Entries counted against a limit of the whole file (backend entries), and where the first
/// one past it is written, and in which VIP: the error or caution gives the total and points
/// there.
pub(super) struct Tally {
    limit: usize,
    count: usize,
    first_over: Range<usize>,
    first_over_vip: String,
}

impl Tally {
    pub(super) fn new(limit: usize) -> Tally {
        Tally { limit, count: 0, first_over: 0..0, first_over_vip: String::new() }
    }

    /// Counts one entry, written at `at` in VIP `vip`.
    pub(super) fn add(&mut self, at: Range<usize>, vip: &str) {
        self.count += 1;
        if self.count == self.limit + 1 {
            self.first_over = at;
            self.first_over_vip = vip.to_string();
        }
    }

    /// A caution for a file past the limit, at the first entry past it: "the file has `count`
    /// `what` (`which`), more than ..., the first past it in VIP `name`: `why`".
    pub(super) fn caution(&self, what: &str, which: &str, why: &str, cautions: &mut Vec<Invalid>) {
        if self.count <= self.limit {
            return;
        }
        cautions.push(Invalid(
            self.first_over.clone(),
            format!(
                "the file has {} {what} ({which}), more than {}, the first past them in VIP `{}`: {why}",
                self.count,
                self.limit,
                quoted(&self.first_over_vip),
            ),
        ));
    }

    /// The error for a file past the limit: "`count` `what` (`which`); at most ...".
    pub(super) fn check(&self, what: &str, which: &str) -> Result<(), Invalid> {
        if self.count <= self.limit {
            return Ok(());
        }
        bad(
            self.first_over.clone(),
            format!(
                "{} {what} ({which}); at most {} are supported, and this one is entry {}",
                self.count,
                self.limit,
                self.limit + 1
            ),
        )
    }
}
