//! A latency histogram whose [`LatencyHistogram::observe`] takes no lock and, thread by thread,
//! shares no cache line.
//!
//! prometheus-client's `Histogram` is an `Arc<Mutex<..>>`: the L7 request-latency series of a VIP
//! is observed once per answered request by every proxy thread, so on an edge node with dozens
//! of proxy threads (one a core by default) and one hot VIP, every request took that one lock
//! and pulled that one cache line from whichever core had it last. Here the counters are
//! atomics in shards, one per thread as far as the shards go (a thread takes the next shard at
//! its first observation, round robin), each shard on cache lines of its own; a scrape adds
//! them up. It encodes as prometheus-client's `Histogram` does, through the same encoder:
//! cumulative `_bucket` series by `le` (`+Inf` last), `_sum` in seconds, `_count`.

use std::{
    fmt,
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// Counters on one [`Line`].
const PER_LINE: usize = 16;

/// At most this many shards: past it, threads share shards (still without a lock).
const MAX_SHARDS: usize = 64;

/// 128 bytes of counters, aligned to 128 bytes: a cache line, and the line beside it that
/// x86's adjacent-line prefetcher pulls in with it (crossbeam's `CachePadded` pads to 128 on
/// x86_64 and aarch64 for the same reason), so that no two shards share either.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Line([AtomicU64; PER_LINE]);

/// A histogram of durations for the hot path: see the module's doc. Clones share the counters,
/// as a `Family` needs (its `get_or_create` hands out a clone for the caller to keep).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The finite upper bounds, in seconds, ascending: the `le` labels.
    bounds: Box<[f64]>,
    /// The same bounds in nanoseconds: the largest duration each takes, as prometheus-client
    /// would place it (`d.as_secs_f64() <= bound`), so that observing compares integers.
    limits: Box<[u64]>,
    /// The shards, [`Inner::lines_per_shard`] lines each. A shard's counters: one per bucket
    /// (not cumulative), `+Inf`'s last, then the sum of the durations in microseconds (a u64 of
    /// them overflows after 580,000 years of summed latency: 5 years at 100,000 requests in
    /// flight all the time). The count is the buckets' total.
    lines: Box<[Line]>,
    /// Lines a shard takes.
    lines_per_shard: usize,
    /// Shards - 1 (a power of two): a thread's shard is its number masked with it.
    mask: usize,
}

/// The next thread's shard number (masked by each histogram to its own shard count).
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard number, taken at its first observation.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl LatencyHistogram {
    /// A histogram with these finite upper bounds in seconds (`+Inf` is implicit, as with
    /// prometheus-client's `Histogram::new`), with a shard for each CPU this process may run
    /// on, up to 64: the proxy runs a thread per core by default.
    ///
    /// # Panics
    ///
    /// If the bounds are not finite, non-negative and strictly ascending: they are constants.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> LatencyHistogram {
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        LatencyHistogram::with_shards(bounds, cpus)
    }

    /// As [`LatencyHistogram::new`], with `shards` shards (rounded up to a power of two, at
    /// most 64).
    fn with_shards(bounds: impl IntoIterator<Item = f64>, shards: usize) -> LatencyHistogram {
        let bounds: Box<[f64]> = bounds.into_iter().collect();
        assert!(
            bounds.iter().all(|b| b.is_finite() && *b >= 0.0)
                && bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must be finite, non-negative and ascending: {bounds:?}"
        );
        let limits = bounds.iter().map(|b| nanos_within(*b)).collect();
        let shards = shards.clamp(1, MAX_SHARDS).next_power_of_two();
        // The buckets, +Inf's, and the sum.
        let lines_per_shard = (bounds.len() + 2).div_ceil(PER_LINE);
        let lines = (0..shards * lines_per_shard).map(|_| Line::default()).collect();
        let inner = Inner { bounds, limits, lines, lines_per_shard, mask: shards - 1 };
        LatencyHistogram { inner: Arc::new(inner) }
    }

    /// Counts one duration: two relaxed atomic adds on this thread's shard.
    pub fn observe(&self, d: Duration) {
        let inner = &*self.inner;
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound takes it; past them all, +Inf's.
        let bucket = inner.limits.partition_point(|limit| *limit < nanos);
        // To the nearest microsecond.
        let micros = nanos.saturating_add(500) / 1000;
        let shard = SHARD.with(|s| *s) & inner.mask;
        inner.counter(shard, bucket).fetch_add(1, Ordering::Relaxed);
        inner.counter(shard, inner.bounds.len() + 1).fetch_add(micros, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts by upper bound, `+Inf` last), as
    /// prometheus-client's encoder takes them. Not one instant's: observations landing during
    /// the reading may show in a bucket and not yet in the sum. The count is the buckets' total,
    /// so it always equals `+Inf`'s cumulative count.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let total = |slot: usize| {
            (0..=inner.mask).fold(0u64, |n, shard| {
                n.wrapping_add(inner.counter(shard, slot).load(Ordering::Relaxed))
            })
        };
        let upper = inner.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = upper.enumerate().map(|(i, le)| (le, total(i))).collect();
        let count = buckets.iter().fold(0u64, |n, (_, c)| n.wrapping_add(*c));
        // Exact to the microsecond below 2^53 of them (285 years).
        let sum = total(inner.bounds.len() + 1) as f64 / 1e6;
        (sum, count, buckets)
    }
}

impl Inner {
    /// Counter `slot` of shard `shard`.
    fn counter(&self, shard: usize, slot: usize) -> &AtomicU64 {
        &self.lines[shard * self.lines_per_shard + slot / PER_LINE].0[slot % PER_LINE]
    }
}

/// The largest number of nanoseconds whose duration prometheus-client would put in the bucket
/// of `bound` seconds (`as_secs_f64() <= bound`): the nearest to `bound`, moved a step or two
/// if the float of it lands on the other side.
fn nanos_within(bound: f64) -> u64 {
    let secs = |n: u64| Duration::from_nanos(n).as_secs_f64();
    // Saturating, for a bound past u64::MAX nanoseconds (584 years).
    let mut n = (bound * 1e9).round() as u64;
    while n > 0 && secs(n) > bound {
        n -= 1;
    }
    while n < u64::MAX && secs(n + 1) <= bound {
        n += 1;
    }
    n
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::{
        encoding::text::encode,
        metrics::histogram::Histogram,
        registry::{Registry, Unit},
    };

    /// The L7 request-latency bounds.
    const BOUNDS: [f64; 18] = crate::proxy::LATENCY_BOUNDS;

    /// `metric`, registered as the proxy registers its latency, encoded.
    fn text(metric: impl EncodeMetric + Send + Sync + fmt::Debug + 'static) -> String {
        let mut registry = Registry::default();
        registry.register_with_unit("d", "latency", Unit::Seconds, metric);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encoded");
        text
    }

    /// Both histograms fed `durations`, encoded: (ours, prometheus-client's).
    fn both(durations: &[Duration]) -> (String, String) {
        let (ours, theirs) = (LatencyHistogram::with_shards(BOUNDS, 4), Histogram::new(BOUNDS));
        for d in durations {
            ours.observe(*d);
            theirs.observe(d.as_secs_f64());
        }
        (text(ours), text(theirs))
    }

    /// Durations of whole 64ths of a second (whole microseconds, the finest such) add up
    /// exactly in floats and in microseconds alike: the text is prometheus-client's to the byte,
    /// through the buckets, `+Inf` (400 s) included, and with nothing observed.
    #[test]
    fn it_encodes_as_prometheus_client_does() {
        let sixty_fourths = |n: u64| Duration::from_micros(n * 15_625);
        let mut durations = [1, 3, 6, 16, 32, 64, 100, 160].map(sixty_fourths).to_vec();
        durations.extend([1, 1, 7, 35, 70, 299, 300, 301, 400].map(Duration::from_secs));
        let (ours, theirs) = both(&durations);
        assert_eq!(ours, theirs);
        assert!(ours.contains("d_seconds_bucket{le=\"+Inf\"} 17\n"), "{ours}");
        assert!(ours.contains("d_seconds_bucket{le=\"300.0\"} 15\n"), "{ours}");
        assert!(ours.contains("d_seconds_count 17\n"), "{ours}");
        let (ours, theirs) = both(&[]);
        assert_eq!(ours, theirs);
        assert!(ours.contains("# TYPE d_seconds histogram\n"), "{ours}");
    }

    /// A duration on a bound goes in its bucket, a nanosecond more in the next, as with
    /// prometheus-client; only the sum may differ, rounded to the microsecond.
    #[test]
    fn it_places_durations_on_and_past_the_bounds_as_prometheus_client_does() {
        let mut durations = vec![Duration::ZERO, Duration::from_nanos(1)];
        for b in BOUNDS {
            let on = Duration::from_nanos((b * 1e9).round() as u64);
            durations.extend([on - Duration::from_nanos(1), on, on + Duration::from_nanos(1)]);
        }
        let (ours, theirs) = both(&durations);
        let not_sum = |t: &str| -> Vec<String> {
            t.lines().filter(|l| !l.starts_with("d_seconds_sum ")).map(str::to_owned).collect()
        };
        assert_eq!(not_sum(&ours), not_sum(&theirs), "{ours}\n{theirs}");
        let sum = |t: &str| -> f64 {
            let line = t.lines().find_map(|l| l.strip_prefix("d_seconds_sum "));
            line.expect("a sum").parse().expect("a number")
        };
        let (a, b) = (sum(&ours), sum(&theirs));
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        // Duration::MAX (saturated to 584 years) lands in +Inf.
        let h = LatencyHistogram::with_shards(BOUNDS, 1);
        h.observe(Duration::MAX);
        let (_, count, buckets) = h.snapshot();
        assert_eq!((count, buckets.last().copied()), (1, Some((f64::INFINITY, 1))));
    }

    /// Observations from several threads at once, all on one shard (as threads past the
    /// shards share them), are all counted: in their buckets, the count and the sum.
    #[test]
    fn concurrent_observations_all_count() {
        let h = LatencyHistogram::with_shards(BOUNDS, 1);
        const THREADS: u64 = 8;
        const EACH: u64 = 20_000;
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    for i in 0..EACH {
                        let d = if i % 2 == 0 { 1 } else { 2000 };
                        h.observe(Duration::from_millis(d));
                    }
                });
            }
        });
        let (sum, count, buckets) = h.snapshot();
        let n = THREADS * EACH;
        assert_eq!(count, n);
        assert_eq!(buckets[1], (0.001, n / 2), "{buckets:?}");
        assert_eq!(buckets[11], (2.5, n / 2), "{buckets:?}");
        // 80,000 × 2.001 s, exactly.
        assert_eq!(sum, 160_080.0);
    }

    /// Each shard is on lines of its own, and a shard's counters fit them.
    #[test]
    fn shards_share_no_line() {
        assert_eq!(std::mem::align_of::<Line>(), 128);
        let h = LatencyHistogram::with_shards(BOUNDS, 3);
        let inner = &*h.inner;
        assert_eq!((inner.mask, inner.lines_per_shard), (3, 2));
        assert_eq!(inner.lines.len(), 8);
        let line = |a: &AtomicU64| std::ptr::from_ref(a).addr() / 128;
        let last = BOUNDS.len() + 1;
        assert!(line(inner.counter(0, last)) < line(inner.counter(1, 0)));
        assert_eq!(LatencyHistogram::with_shards(BOUNDS, 1000).inner.mask, MAX_SHARDS - 1);
    }
}
