//! Panics made visible in production. Rust's default hook prints a panic as plain lines on
//! stderr: with `--log-format json` they were the only lines a log pipeline could not parse, a
//! connection task's panic (which the L7 proxy survives) was seen nowhere else, and nothing
//! counted them. `edgelb run` installs [`install_hook`]: each panic, in any thread, is one
//! error in the log (thread, place, message) and counts in `edgelb_panics_total`.

use std::{
    any::Any,
    panic::Location,
    sync::{LazyLock, Once},
};

use prometheus_client::metrics::counter::Counter;

/// Every panic of this process since it started: registered in each [`crate::metrics::Metrics`]
/// (the hook is one per process, the registry one per controller).
static PANICS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The process's panic counter, to register as `edgelb_panics_total`.
pub fn counter() -> Counter {
    PANICS.clone()
}

/// Installs the panic hook of `edgelb run` (once; later calls do nothing): each panic is logged
/// as an error through `tracing` ([`on_panic`]) and counted. The previous hook (Rust's, which
/// prints to stderr) runs only while no `tracing` subscriber is set up, so that a panic is never
/// said twice, nor lost.
pub fn install_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            on_panic(thread.name(), info.location(), info.payload(), &PANICS);
            if !tracing::dispatcher::has_been_set() {
                previous(info);
            }
        }));
    });
}

/// Counts a panic of thread `thread` (its name, if it has one) at `location` in `counter` and
/// logs it as one error with the panic's message (and a backtrace when `RUST_BACKTRACE` asks
/// for one, as Rust's own hook would print).
fn on_panic(
    thread: Option<&str>,
    location: Option<&Location<'_>>,
    payload: &(dyn Any + Send),
    counter: &Counter,
) {
    counter.inc();
    let thread = thread.unwrap_or("<unnamed>");
    let location = location.map(|l| l.to_string()).unwrap_or_else(|| "<unknown>".to_owned());
    let message = crate::panic_message(payload);
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        tracing::error!(thread, location, panic = message, %backtrace, "a thread panicked (a bug: please report it)");
    } else {
        tracing::error!(
            thread,
            location,
            panic = message,
            "a thread panicked (a bug: please report it)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// A panic is one error line naming the thread, the place and the message, in JSON too
    /// (the format a log pipeline parses), and it counts.
    #[test]
    fn a_panic_is_logged_as_one_error_and_counted() {
        #[derive(Clone, Default)]
        struct Log(Arc<Mutex<Vec<u8>>>);
        impl Write for Log {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let counter = Counter::default();
        let payload = std::panic::catch_unwind(|| panic!("boom {}", 42)).unwrap_err();
        let location = Location::caller();
        tracing::subscriber::with_default(subscriber, || {
            on_panic(Some("l7-0"), Some(location), &*payload, &counter);
        });
        assert_eq!(counter.get(), 1);
        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
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
}
