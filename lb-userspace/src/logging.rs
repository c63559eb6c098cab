//! Where the log goes: stderr, as text or JSON lines. `edgelb run` writes it through a bounded
//! queue and a thread of its own ([`init`] with `queued`), so that a log reader that stalls
//! (journald busy, a container log driver that blocks) cannot stall the balancer. Written in the
//! logging thread, a full stderr pipe blocked every thread that logged: the proxy threads on
//! their access-log lines, the others on the stderr lock behind them, then the controller, so
//! requests hung and `edgelb status` and `reload` got no answer. Queued, a line that finds the
//! queue full is dropped and counted (`edgelb_log_lines_dropped_total`), and once the writer has
//! emptied the queue again one warning says how many went.
//!
//! The queue's writer thread starts only once the controller has dropped its capabilities
//! ([`start_queue`], after `drop_capabilities`): capabilities are per thread, and a thread
//! started before the drop keeps them all for the process's life. Until then (the start:
//! loading, attaching, binding) lines go straight to stderr.
//!
//! The other commands (`status`, `check`...) log little, and end at once: they write straight to
//! stderr, in order with what they print.

use std::{
    fmt,
    io::{self, Write},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder},
    metrics::{MetricType, counter::ConstCounter},
};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    EnvFilter,
    fmt::{MakeWriter, writer::BoxMakeWriter},
};

/// Lines the queue of `edgelb run`'s log holds before it drops them: a few seconds of a busy
/// access log for a reader that pauses. Full of access-log lines, some 5 MiB of memory at their
/// usual few hundred bytes, 40 MiB at their longest (2.5 KiB: method and target cut at 1 KiB
/// each).
pub const QUEUE_LINES: usize = 16_384;

/// How long a flush ([`flush`]) waits for the queue to be written out: at a stop, the last lines
/// (the drain, "controller stopped") are written unless the reader is stalled or slow, in which
/// case the process still exits, its last lines lost, rather than hang. The writer itself gives
/// up sooner: tracing-appender's guard waits 100 ms for room for its stop message behind the
/// queue, then 1 s for the writer to reach it (saying so on stdout, not in the log, if it does
/// not), so behind a full queue a reader taking fewer than some 16 000 lines a second loses the
/// tail, the last lines among it.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The queue of this process's log, once [`init`] made one.
struct Queue {
    /// Lines dropped because the queue was full.
    dropped: ErrorCounter,
    /// Ends the writer thread, after it wrote what is queued; taken by the first [`flush`].
    guard: Mutex<Option<WorkerGuard>>,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

/// The queue's writer once [`start_queue`] made it; [`Switch`] writes straight to stderr before.
static QUEUED: OnceLock<NonBlocking> = OnceLock::new();

/// Whether [`init`] was asked for a queue, which [`start_queue`] then makes.
static WANT_QUEUE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The log's writer for `edgelb run`: stderr until [`start_queue`], the queue after.
#[derive(Clone, Copy)]
struct Switch;

/// A line's writer from [`Switch`].
enum SwitchWriter {
    /// Through the queue.
    Queued(NonBlocking),
    /// Straight to stderr (the start, before the queue's thread may exist).
    Direct(io::Stderr),
}

impl<'a> MakeWriter<'a> for Switch {
    type Writer = SwitchWriter;

    fn make_writer(&'a self) -> SwitchWriter {
        match QUEUED.get() {
            Some(q) => SwitchWriter::Queued(q.clone()),
            None => SwitchWriter::Direct(io::stderr()),
        }
    }
}

impl Write for SwitchWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            SwitchWriter::Queued(q) => q.write(b),
            SwitchWriter::Direct(e) => e.write(b),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            SwitchWriter::Queued(q) => q.write_all(b),
            SwitchWriter::Direct(e) => e.write_all(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SwitchWriter::Queued(q) => q.flush(),
            SwitchWriter::Direct(e) => e.flush(),
        }
    }
}

/// From here on, `edgelb run`'s log goes through its queue ([`QUEUE_LINES`]), written by a
/// thread started now: call it once the calling thread holds no capability, which the new
/// thread inherits. Does nothing unless [`init`] was asked for a queue, or after the first call.
pub fn start_queue() {
    if WANT_QUEUE.load(std::sync::atomic::Ordering::Relaxed) && QUEUED.get().is_none() {
        let _ = QUEUED.set(queue(io::stderr(), QUEUE_LINES));
    }
}

/// Sets up the process's log on stderr: `json` lines or text, filtered by `RUST_LOG` (`info` by
/// default), with colours only on a terminal; through a queue ([`QUEUE_LINES`]) when `queued`
/// (`edgelb run`), from [`start_queue`] on, written in the logging thread otherwise. Keep the
/// returned [`Flush`] for the process's life: dropping it writes out what is queued.
pub fn init(json: bool, queued: bool) -> Flush {
    let writer = if queued {
        WANT_QUEUE.store(true, std::sync::atomic::Ordering::Relaxed);
        BoxMakeWriter::new(Switch)
    } else {
        BoxMakeWriter::new(io::stderr)
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(writer);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    Flush(())
}

/// Makes this process's log queue, written to `sink` by a thread of its own, holding `lines`
/// lines at most; the writer to give the subscriber. (Once per process; a second queue would be
/// one nobody flushes.)
fn queue<W: Write + Send + 'static>(sink: W, lines: usize) -> NonBlocking {
    let counter = Arc::new(OnceLock::new());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(lines)
        .thread_name("log-writer")
        .finish(SaysDrops { sink, dropped: counter.clone(), said: 0 });
    let dropped = writer.error_counter();
    let _ = counter.set(dropped.clone());
    let _ = QUEUE.set(Queue { dropped, guard: Mutex::new(Some(guard)) });
    writer
}

/// Writes out what the log queue holds, waiting [`FLUSH_WAIT`] at most, and ends its writer:
/// before the process exits (a [`Flush`] dropped at the end of `main`, or
/// [`crate::panics::or_exit`]), whose last lines would otherwise be lost. Lines logged after it
/// are dropped (and counted). Does nothing without a queue, or after the first call.
pub fn flush() {
    let Some(guard) =
        QUEUE.get().and_then(|q| q.guard.lock().unwrap_or_else(PoisonError::into_inner).take())
    else {
        return;
    };
    // Dropped on a thread of its own, waited for a bounded time: the guard's drop can print to
    // stdout, which a stalled reader may block too.
    let (done, wait) = std::sync::mpsc::channel();
    let dropper = std::thread::Builder::new().name("log-flush".into()).spawn(move || {
        drop(guard);
        let _ = done.send(());
    });
    if dropper.is_ok() {
        let _ = wait.recv_timeout(FLUSH_WAIT);
    }
}

/// Writes out the log's queue when dropped ([`flush`]): returned by [`init`], kept by `main`.
#[must_use = "dropping it at once ends the log's writer"]
pub struct Flush(());

impl Drop for Flush {
    fn drop(&mut self) {
        flush();
    }
}

/// Log lines dropped so far because the queue was full (0 without a queue).
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.dropped_lines() as u64)
}

/// `edgelb_log_lines_dropped_total`: [`dropped_lines`] at each scrape, so that it shows while the
/// reader is still stalled (the log's own warning comes only once the queue is written out).
#[derive(Debug)]
pub struct DroppedLines;

impl EncodeMetric for DroppedLines {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), fmt::Error> {
        ConstCounter::new(dropped_lines()).encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// The queue's writer: the lines to `sink`, and after each batch, once the queue is empty, a
/// warning (logged again, so it comes in the log's format) if lines were dropped since the last.
struct SaysDrops<W> {
    sink: W,
    /// The queue's drop count, set once the queue exists.
    dropped: Arc<OnceLock<ErrorCounter>>,
    /// The count the last warning said.
    said: usize,
}

impl<W: Write> Write for SaysDrops<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.sink.write(b)
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.sink.write_all(b)
    }

    /// Called by the writer thread each time it has emptied the queue.
    fn flush(&mut self) -> io::Result<()> {
        let flushed = self.sink.flush();
        let total = self.dropped.get().map_or(0, ErrorCounter::dropped_lines);
        if total > self.said {
            let dropped = total - self.said;
            self.said = total;
            tracing::warn!(
                dropped,
                total,
                "log lines dropped: the log's reader (journald, the container's log driver) did not take them as fast as they came, and the queue was full; edgelb_log_lines_dropped_total counts them"
            );
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Condvar, Mutex},
        time::Instant,
    };

    use super::*;

    /// A sink that takes nothing until opened, as a stderr pipe whose reader stalls.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        log: crate::testlog::Log,
    }

    impl Gate {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let _open = cv.wait_while(lock.lock().unwrap(), |open| !*open).unwrap();
            self.log.write(b)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// With the sink stalled, logging neither blocks nor grows the queue past its bound: the
    /// lines past it are dropped and counted; once the sink takes lines again, one warning says
    /// how many were dropped; and a flush writes out the lines still queued. Run in a child (this
    /// test binary again, this test only): the queue is the process's, its warning goes through
    /// the global subscriber.
    #[test]
    fn a_stalled_sink_drops_and_counts_lines_and_a_flush_writes_the_rest() {
        const CHILD: &str = "EDGELB_TEST_LOG_QUEUE";
        if std::env::var_os(CHILD).is_none() {
            let name =
                "logging::tests::a_stalled_sink_drops_and_counts_lines_and_a_flush_writes_the_rest";
            let (status, said) = crate::testlog::in_child(name, CHILD, "1");
            assert!(status.success() && said.contains("1 passed"), "{said}");
            return;
        }
        let gate = Gate::default();
        let writer = queue(gate.clone(), 4);
        tracing_subscriber::fmt().with_ansi(false).with_writer(writer).init();
        let start = Instant::now();
        for i in 0..100 {
            tracing::info!("line {i}");
        }
        assert!(start.elapsed() < Duration::from_secs(5), "logging waited for the sink");
        // The writer thread holds one line (blocked writing it) or none yet; the queue 4.
        let dropped = dropped_lines();
        assert!((95..=96).contains(&dropped), "{dropped} dropped");
        gate.open();
        let said = format!("dropped={dropped} total={dropped}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gate.log.text().contains(&said) {
            assert!(Instant::now() < deadline, "no warning with {said}:\n{}", gate.log.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gate.log.text().contains("log lines dropped"), "{}", gate.log.text());
        assert!(gate.log.text().contains("line 3"), "{}", gate.log.text());
        // Said once, not again at the next batch.
        tracing::info!("the last line");
        flush();
        let log = gate.log.text();
        assert!(log.contains("the last line"), "{log}");
        assert_eq!(log.matches("log lines dropped").count(), 1, "{log}");
        assert_eq!(dropped_lines(), dropped, "{log}");
    }

    /// The count is exported from the start, at 0 without a queue (lib tests make none but in
    /// the child above).
    #[test]
    fn dropped_lines_are_exported_at_zero() {
        let text = crate::metrics::Metrics::new().encode();
        assert!(text.lines().any(|l| l == "edgelb_log_lines_dropped_total 0"), "{text}");
    }
}
