//! Panics made visible in production. Rust's default hook prints a panic as plain lines on
//! stderr: with `--log-format json` they were the only lines a log pipeline could not parse, a
//! connection task's panic (which the L7 proxy survives) was seen nowhere else, and nothing
//! counted them. `edgelb run` installs [`install_hook`]: each panic, in any thread, is one
//! error in the log (thread, place, message) and counts in `edgelb_panics_total`. A panic a
//! request can set off again and again is said at most once every [`SAID_EVERY`] per place in
//! the code ([`Said`]), with how many went unsaid meanwhile, so that it cannot flood the log
//! (and cost a backtrace each); the counter counts every one.
//!
//! A panic that ends a long-lived thread whose work nothing else takes up (an L7 proxy thread,
//! the metrics thread) ends the process ([`or_exit`]), for the service manager to restart it:
//! a process half alive (a proxy thread's listener left in the `SO_REUSEPORT` group with nobody
//! accepting on it) is worse than a restart, which keeps XDP forwarding from its pinned links.

use std::{
    any::Any,
    collections::HashMap,
    panic::Location,
    sync::{LazyLock, Mutex, Once, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;

/// Every panic of this process since it started: registered in each [`crate::metrics::Metrics`]
/// (the hook is one per process, the registry one per controller).
static PANICS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The process's panic counter, to register as `edgelb_panics_total`.
pub fn counter() -> Counter {
    PANICS.clone()
}

/// The exit status of `edgelb run` when a long-lived thread panicked ([`or_exit`]): failure,
/// and not 2 (a bad config, which the systemd unit does not restart), so that
/// `Restart=on-failure` restarts it. 70 is `EX_SOFTWARE`, an internal error.
pub const THREAD_PANICKED_EXIT: i32 = 70;

/// Runs `body`, the whole work of long-lived thread `thread` (an L7 proxy thread, the metrics
/// endpoint's); a panic escaping it ends the process with [`THREAD_PANICKED_EXIT`] after an
/// error saying so. The thread alone ending would leave the process half alive: a proxy thread's
/// listener stays in its `SO_REUSEPORT` group (the proxy keeps a descriptor of it to hand over),
/// so the kernel keeps completing handshakes on it that nobody accepts, and a drain waits its
/// whole grace for the thread's accept loops; a dead metrics thread leaves scrapes unanswered.
/// A restart by the service manager instead keeps XDP forwarding from the pinned links
/// meanwhile, and the next start adopts the data plane. (A connection task's panic is caught by
/// its runtime and ends that connection only; a health check's is started again by its
/// [`crate::health::Checker`].)
pub fn or_exit<T>(thread: &str, body: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(payload) => {
            let message = crate::panic_message(&*payload);
            tracing::error!(
                thread,
                panic = message,
                "thread `{thread}` panicked and nothing else does its work: edgelb exits (status {THREAD_PANICKED_EXIT}) for the service manager to restart it; XDP keeps forwarding from the pinned links meanwhile, and the next start adopts the data plane"
            );
            // `exit` runs no destructor: the log's queue, this error included, is written now.
            crate::logging::flush();
            std::process::exit(THREAD_PANICKED_EXIT)
        }
    }
}

/// Runs `task`, a task of long-lived thread `thread` without which the thread is half alive (an
/// L7 proxy thread's accept loops, its idle-connection sweeper and closers), under [`or_exit`]
/// at each poll: a task's panic is caught by its runtime and seen by nobody until its handle is
/// awaited (at the drain, for an accept loop), while the listener it no longer accepts on stays
/// in its `SO_REUSEPORT` group. The tasks a connection runs in are not such: their panics end
/// that connection only.
pub async fn or_exit_task<F: std::future::Future>(thread: String, task: F) -> F::Output {
    let mut task = std::pin::pin!(task);
    std::future::poll_fn(|cx| or_exit(&thread, || task.as_mut().poll(cx))).await
}

/// Installs the panic hook of `edgelb run` (once; later calls do nothing): each panic is logged
/// as an error through `tracing` ([`on_panic`]) and counted. The previous hook (Rust's, which
/// prints to stderr) runs only while no `tracing` subscriber is set up or the log's filter
/// drops this module's errors, so that a panic is never said twice, nor lost.
pub fn install_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            static SAID: LazyLock<Said> = LazyLock::new(Said::default);
            let said = on_panic(thread.name(), info.location(), info.payload(), &PANICS, &SAID);
            if info.location().is_some_and(|l| in_tokio_uring(l.file())) {
                crate::proxy::suspect_driver();
            }
            // Also when the log's filter drops this module's errors (a `RUST_LOG` naming other
            // targets only): the panic would otherwise be said nowhere. Not for one held back
            // by [`Said`], which would flood stderr instead.
            if said && unheard() {
                previous(info);
            }
        }));
    });
}

/// Is `file` (a panic's place) tokio-uring's own source? Such a panic may leave an L7
/// thread's io_uring driver holding an operation the kernel never saw, whose drop would then
/// wait for ever (`proxy::suspect_driver`).
fn in_tokio_uring(file: &str) -> bool {
    file.contains("/tokio-uring-")
}

/// Whether [`on_panic`]'s error goes nowhere: no `tracing` subscriber is set up yet, or the
/// log's filter drops this module's errors (a `RUST_LOG` naming other targets only).
fn unheard() -> bool {
    !tracing::dispatcher::has_been_set() || !tracing::enabled!(tracing::Level::ERROR)
}

/// How often the panics at one place in the code are said at most ([`Said`]).
pub const SAID_EVERY: Duration = Duration::from_secs(10);

/// When the panics at each place in the code were last said, and how many there were since:
/// a panic in a connection task (which the proxy survives) that every request of some shape
/// sets off would otherwise be one error line, and one backtrace captured, per request. Places
/// are the code's, so few; should a bug ever make thousands, the record starts over.
#[derive(Default)]
struct Said(Mutex<HashMap<String, Place>>);

/// One place's record in [`Said`].
struct Place {
    /// When its last line was said.
    last: Instant,
    /// Its panics since then, counted but not said.
    unsaid: u64,
}

impl Said {
    /// The most places remembered before the record starts over.
    const PLACES: usize = 1024;

    /// Whether a panic at `location` may be said now, and if so, how many there were at that
    /// place since its last line; if not, it is counted for that next line.
    fn admit(&self, location: &str, now: Instant) -> Option<u64> {
        let mut places = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = places.get_mut(location) {
            if now.saturating_duration_since(p.last) < SAID_EVERY {
                p.unsaid += 1;
                return None;
            }
            let unsaid = std::mem::take(&mut p.unsaid);
            p.last = now;
            return Some(unsaid);
        }
        if places.len() >= Self::PLACES {
            places.clear();
        }
        places.insert(location.to_owned(), Place { last: now, unsaid: 0 });
        Some(0)
    }
}

/// Counts a panic of thread `thread` (its name, if it has one) at `location` in `counter` and,
/// unless `said` holds it back (one line per place every [`SAID_EVERY`]), logs it as one error
/// with the panic's message, the panics at that place held back since its last line, and a
/// backtrace when `RUST_BACKTRACE` asks for one, as Rust's own hook would print. Whether it
/// was said.
fn on_panic(
    thread: Option<&str>,
    location: Option<&Location<'_>>,
    payload: &(dyn Any + Send),
    counter: &Counter,
    said: &Said,
) -> bool {
    counter.inc();
    let thread = thread.unwrap_or("<unnamed>");
    let location = location.map(|l| l.to_string()).unwrap_or_else(|| "<unknown>".to_owned());
    let Some(unsaid) = said.admit(&location, Instant::now()) else { return false };
    let message = crate::panic_message(payload);
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(thread, location, panic = message, unsaid, %backtrace, "a thread panicked (a bug: please report it); `unsaid` panics at this place since its last line were counted, not logged (one line per place every 10 s)");
    } else {
        tracing::error!(
            thread,
            location,
            panic = message,
            unsaid,
            "a thread panicked (a bug: please report it); `unsaid` panics at this place since its last line were counted, not logged (one line per place every 10 s)"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A long-lived thread whose body panics ends the process with [`THREAD_PANICKED_EXIT`],
    /// saying so, instead of leaving it half alive; so does a task such a thread cannot do
    /// without ([`or_exit_task`]: an L7 accept loop), whose panic its runtime would otherwise
    /// catch and keep until the drain. Run in a child (this test binary again, this test only),
    /// which the panic ends.
    #[test]
    fn a_long_lived_thread_that_panics_ends_the_process() {
        const CHILD: &str = "EDGELB_TEST_THREAD_PANIC";
        let Some(case) = std::env::var_os(CHILD) else {
            let name = "panics::tests::a_long_lived_thread_that_panics_ends_the_process";
            for case in ["thread", "task"] {
                let (status, said) = crate::testlog::in_child(name, CHILD, case);
                assert_eq!(status.code(), Some(THREAD_PANICKED_EXIT), "{case}: {said}");
                assert!(
                    said.contains("thread `l7-0` panicked and nothing else does its work"),
                    "{case}: {said}"
                );
                assert!(said.contains("test fault"), "{case}: {said}");
            }
            return;
        };
        let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).try_init();
        let task = case == "task";
        let thread = std::thread::Builder::new()
            .name("l7-0".into())
            .spawn(move || {
                if task {
                    // The task polled as its runtime would, which catches what escapes a poll.
                    let fut = or_exit_task("l7-0".into(), async { panic!("test fault") });
                    let mut fut = std::pin::pin!(fut);
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        fut.as_mut().poll(&mut cx)
                    }));
                } else {
                    or_exit("l7-0", || panic!("test fault"))
                }
            })
            .unwrap();
        let _ = thread.join();
        // Only without the policy: the process lives on, half alive, and the test ends well,
        // which the parent sees as a failure.
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Rust's own hook prints a panic where the log's filter would drop the hook's error (a
    /// `RUST_LOG` naming other targets only), and only there.
    #[test]
    fn a_panic_the_log_filter_drops_is_printed_by_rusts_hook() {
        let only_proxy = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("edgelb::proxy=debug"))
            .with_writer(std::io::sink)
            .finish();
        assert!(tracing::subscriber::with_default(only_proxy, unheard));
        let errors = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::sink)
            .finish();
        assert!(!tracing::subscriber::with_default(errors, unheard));
    }

    /// A JSON log (the format a log pipeline parses) kept in memory, and the subscriber that
    /// writes it, for a test to set as its default.
    fn json_log() -> (crate::testlog::Log, impl tracing::Subscriber) {
        let log = crate::testlog::Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        (log, subscriber)
    }

    /// A panic is one error line naming the thread, the place and the message, in JSON too
    /// (the format a log pipeline parses), and it counts.
    #[test]
    fn a_panic_is_logged_as_one_error_and_counted() {
        let (log, subscriber) = json_log();
        let counter = Counter::default();
        let payload = std::panic::catch_unwind(|| panic!("boom {}", 42)).unwrap_err();
        let location = Location::caller();
        tracing::subscriber::with_default(subscriber, || {
            assert!(on_panic(Some("l7-0"), Some(location), &*payload, &counter, &Said::default()));
        });
        assert_eq!(counter.get(), 1);
        let log = log.text();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "{log}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(line["level"], "ERROR", "{log}");
        assert_eq!(line["fields"]["thread"], "l7-0", "{log}");
        assert_eq!(line["fields"]["panic"], "boom 42", "{log}");
        assert!(line["fields"]["message"].as_str().unwrap_or_default().contains("panicked"));
        let at = line["fields"]["location"].as_str().unwrap_or_default();
        assert!(at.starts_with("lb-userspace/src/panics.rs:"), "{log}");
    }

    /// A panic that comes again and again at one place is said once per [`SAID_EVERY`] there,
    /// the next line carrying how many were held back meanwhile; another place is said at once;
    /// every one counts.
    #[test]
    fn a_panic_repeated_at_one_place_is_said_once_per_period() {
        let (log, subscriber) = json_log();
        let counter = Counter::default();
        let said = Said::default();
        let payload = std::panic::catch_unwind(|| panic!("again")).unwrap_err();
        let here = Location::caller();
        let elsewhere = Location::caller();
        tracing::subscriber::with_default(subscriber, || {
            let mut told = Vec::new();
            for _ in 0..50 {
                told.push(on_panic(Some("l7-0"), Some(here), &*payload, &counter, &said));
            }
            assert_eq!(told.iter().filter(|t| **t).count(), 1, "{told:?}");
            assert!(told[0]);
            assert_ne!(here, elsewhere);
            assert!(on_panic(Some("l7-1"), Some(elsewhere), &*payload, &counter, &said));
        });
        assert_eq!(counter.get(), 51);
        let text = log.text();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        assert_eq!(lines[0]["fields"]["unsaid"], 0, "{text}");
        // A period later, the place is said again, with the 49 held back.
        let later = Instant::now() + SAID_EVERY;
        assert_eq!(said.admit(&here.to_string(), later), Some(49));
        assert_eq!(said.admit(&here.to_string(), later), None);
    }
}
