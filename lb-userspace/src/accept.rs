//! What an accept loop does when an accept fails: the one policy of the L7 proxy's listeners,
//! the metrics endpoint and the admin socket.
//!
//! A failed accept (out of descriptors or memory, say) leaves its connection queued and the
//! socket readable, so a loop that tries again at once spins its core (and, for the proxy,
//! every connection on it) for as long as the cause lasts, and a loop that logs each try floods
//! the log. So each loop pauses before the next try, 10 ms doubling to 500 ms while accepts keep
//! failing (as nginx's and HAProxy's accept pauses do), and says a run of failures once when it
//! begins (again if the error changes) and once when accepting works again: when an accept
//! works [`RECOVERED_AFTER`] after the last failure. Short of descriptors, every connection
//! that closes lets one accept through before the next fails; a run ended by one success would
//! start again at the next failure, at a 10 ms pause and with two log lines per connection,
//! which is the flood the pause is for. An error that
//! belongs to the one connection taken (accept(2): the client left, or a network error pending
//! on it) is no failure of the listener: the next connection is taken at once.
//!
//! The policy decides; each loop logs what it is told to say, with its own fields (the proxy's
//! `vip`) and under its own target, so that log filters and pipelines keep matching. The L7
//! proxy runs a loop per thread on each VIP's listener, all failing at once when the process is
//! out of descriptors: each pauses by its own [`AcceptFailures`], and they say their runs
//! through one [`SharedAcceptFailures`] per VIP, so that a run is said once per VIP (not once per
//! thread), its end with the failures of every thread.

use std::{
    fmt,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::backoff::Backoff;

/// The pause after a failed accept: 10 ms after the first, doubling while they keep failing,
/// up to 500 ms.
pub(crate) const ACCEPT_PAUSE: Backoff =
    Backoff::new(Duration::from_millis(10), Duration::from_millis(500));

/// How long accepts must have gone without a failure before one that works ends a run of
/// failures (said once, and the pause starts afresh).
pub(crate) const RECOVERED_AFTER: Duration = Duration::from_secs(1);

/// Does `e` belong to the one connection accept took rather than to the listener? The client
/// left before it was taken (ECONNABORTED), or a network error was pending on it, which Linux
/// reports from accept and asks to be treated like EAGAIN (accept(2), "Error handling"; its
/// EOPNOTSUPP is left out, as it also says the socket is no stream listener, which lasts).
fn of_one_connection(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        )
    )
}

/// The accepts of one loop that failed in a row, and what was said of them.
#[derive(Debug, Default)]
pub(crate) struct AcceptFailures {
    /// Failed in a row.
    count: u64,
    /// The pause after the last failure (zero before the first).
    pause: Duration,
    /// The error last said in this run of failures (`Some`), as the OS numbers it (if it does).
    said: Option<Option<i32>>,
    /// When the last failure of this run was.
    last: Option<Instant>,
}

/// What a loop does after an accept failed ([`AcceptFailures::failed`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Failed {
    /// How long to wait before the next accept; `None`: take the next connection at once (the
    /// error was the connection's, not the listener's).
    pub(crate) pause: Option<Duration>,
    /// What to log, at warn, beside the error: only at the first failure of a run, or when the
    /// error changes.
    pub(crate) say: Option<Say>,
}

/// A run of failed accepts, as a loop logs it when it begins.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Say {
    /// Out of descriptors or memory ([`crate::proxy::out_of_resources`]).
    OutOfResources,
    /// Any other failure of the listener.
    Failing,
}

impl fmt::Display for Say {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let longest = ACCEPT_PAUSE.longest().as_millis();
        match self {
            Say::OutOfResources => write!(
                f,
                "cannot accept connections: out of descriptors or memory; pausing accepts (up to {longest} ms between tries) until it passes"
            ),
            Say::Failing => write!(
                f,
                "accepting failed; pausing accepts (up to {longest} ms between tries) until it works"
            ),
        }
    }
}

impl AcceptFailures {
    /// An accept failed with `e`: how long to pause, and what to say (see [`Failed`]).
    pub(crate) fn failed(&mut self, e: &std::io::Error) -> Failed {
        self.failed_at(e, Instant::now())
    }

    /// [`failed`](Self::failed), at `now`.
    fn failed_at(&mut self, e: &std::io::Error, now: Instant) -> Failed {
        if of_one_connection(e) {
            return Failed { pause: None, say: None };
        }
        // A failure long after the last one, with no accept since to end the run, begins a
        // run of its own.
        if self.last.is_some_and(|last| now.duration_since(last) >= RECOVERED_AFTER) {
            *self = AcceptFailures::default();
        }
        self.last = Some(now);
        self.count += 1;
        self.pause =
            if self.count == 1 { ACCEPT_PAUSE.first() } else { ACCEPT_PAUSE.after(self.pause) };
        let say = (self.said != Some(e.raw_os_error())).then(|| {
            self.said = Some(e.raw_os_error());
            if crate::proxy::out_of_resources(e) { Say::OutOfResources } else { Say::Failing }
        });
        Failed { pause: Some(self.pause), say }
    }

    /// An accept worked: if it ends a run of failures (none for [`RECOVERED_AFTER`]), how many
    /// failed in it, to say at info that accepting works again; the next failure then starts a
    /// run afresh. Within a run, an accept that works between failures ends nothing.
    pub(crate) fn accepted(&mut self) -> Option<u64> {
        // No clock read in the common case: no run under way.
        if self.count == 0 {
            return None;
        }
        self.accepted_at(Instant::now())
    }

    /// [`accepted`](Self::accepted), at `now`.
    fn accepted_at(&mut self, now: Instant) -> Option<u64> {
        let quiet = self.last.is_none_or(|last| now.duration_since(last) >= RECOVERED_AFTER);
        if self.count == 0 || !quiet {
            return None;
        }
        let failed = self.count;
        *self = AcceptFailures::default();
        Some(failed)
    }
}

/// What the accept loops of one VIP (one per L7 thread) say of their failed accepts: the runs
/// of [`AcceptFailures`], of their failures taken together. Each loop still pauses by its own
/// [`AcceptFailures`]; out of descriptors, every loop fails at once, and they said the run once
/// each (20 lines for 4 threads and 5 VIPs), with no count of the others' failures at its end.
#[derive(Debug, Default)]
pub(crate) struct SharedAcceptFailures {
    /// Every loop's failures, as one run; only its `say` and its end are used.
    run: Mutex<AcceptFailures>,
    /// A run is under way: while not, an accept that works reads this flag and nothing else.
    under_way: AtomicBool,
}

impl SharedAcceptFailures {
    /// An accept of one of the loops failed with `e`: what to say of it, at warn, beside the
    /// error (only at the first failure of a run of all the loops', or when the error changes).
    pub(crate) fn failed(&self, e: &std::io::Error) -> Option<Say> {
        self.failed_at(e, Instant::now())
    }

    /// [`failed`](Self::failed), at `now`.
    fn failed_at(&self, e: &std::io::Error, now: Instant) -> Option<Say> {
        let mut run = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        let say = run.failed_at(e, now).say;
        self.under_way.store(run.count > 0, Ordering::Relaxed);
        say
    }

    /// An accept of one of the loops worked: if it ends the run (no loop failed for
    /// [`RECOVERED_AFTER`]), how many accepts failed in it, every loop's, to say at info.
    pub(crate) fn accepted(&self) -> Option<u64> {
        // No lock and no clock read in the common case: no run under way.
        if !self.under_way.load(Ordering::Relaxed) {
            return None;
        }
        self.accepted_at(Instant::now())
    }

    /// [`accepted`](Self::accepted), at `now`.
    fn accepted_at(&self, now: Instant) -> Option<u64> {
        let mut run = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        let ended = run.accepted_at(now);
        self.under_way.store(run.count > 0, Ordering::Relaxed);
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four loops of one VIP out of descriptors at once (one per L7 thread), each pausing by
    /// its own run: the VIP's run is said once, not once per loop, and its end once, with every
    /// loop's failures; each loop's pause grows as if it failed alone. Another error is said
    /// again, and a later run afresh.
    #[test]
    fn the_loops_of_one_vip_say_a_run_once_with_all_their_failures() {
        let os = std::io::Error::from_raw_os_error;
        let ms = Duration::from_millis;
        let shared = SharedAcceptFailures::default();
        let mut loops: Vec<AcceptFailures> = (0..4).map(|_| AcceptFailures::default()).collect();
        let mut now = Instant::now();
        let mut said = Vec::new();
        assert_eq!(shared.accepted(), None, "no run");
        for _ in 0..5 {
            for l in &mut loops {
                let pause = l.failed_at(&os(libc::EMFILE), now).pause;
                said.extend(shared.failed_at(&os(libc::EMFILE), now));
                assert_eq!(l.accepted_at(now), None);
                assert_eq!(shared.accepted_at(now), None, "within the run");
                assert!(pause.is_some());
            }
            now += ms(100);
        }
        assert_eq!(said, [Say::OutOfResources], "one line for the VIP's four loops");
        assert_eq!(loops[3].pause, ms(160), "each loop's pause is its own");
        now += RECOVERED_AFTER;
        assert_eq!(shared.accepted_at(now), Some(20), "every loop's failures");
        assert_eq!(shared.accepted_at(now), None);
        assert_eq!(shared.accepted(), None);
        assert_eq!(shared.failed_at(&os(libc::EMFILE), now), Some(Say::OutOfResources));
        assert_eq!(shared.failed_at(&os(libc::EMFILE), now), None);
        assert_eq!(shared.failed_at(&os(libc::EPERM), now), Some(Say::Failing));
        assert_eq!(shared.failed_at(&os(libc::ECONNABORTED), now), None);
    }

    /// Accepts failing for want of descriptors are said once per run, not once per try, and
    /// the end of the run once; the pause doubles from 10 ms to 500 ms and starts afresh after
    /// an accept that worked; another error in a run is said too.
    #[test]
    fn failed_accepts_pause_ever_longer_and_are_said_once_per_run() {
        let os = std::io::Error::from_raw_os_error;
        let ms = Duration::from_millis;
        let mut failures = AcceptFailures::default();
        let mut now = Instant::now();
        for _ in 0..2 {
            // 41 tries, as in some 20 s out of descriptors.
            let runs: Vec<Failed> = (0..41)
                .map(|_| {
                    let f = failures.failed_at(&os(libc::EMFILE), now);
                    now += f.pause.unwrap();
                    f
                })
                .collect();
            let pauses: Vec<Duration> = runs.iter().map(|f| f.pause.unwrap()).collect();
            assert_eq!(pauses[..7], [ms(10), ms(20), ms(40), ms(80), ms(160), ms(320), ms(500)]);
            assert!(pauses[7..].iter().all(|p| *p == ms(500)));
            assert_eq!(runs[0].say, Some(Say::OutOfResources));
            assert!(runs[1..].iter().all(|f| f.say.is_none()));
            // Accepting works again: said once, a second after the last failure.
            assert_eq!(failures.accepted_at(now), None, "within a second of a failure");
            now += RECOVERED_AFTER;
            assert_eq!(failures.accepted_at(now), Some(41));
            assert_eq!(failures.accepted_at(now), None);
        }
        assert_eq!(failures.failed_at(&os(libc::EMFILE), now).say, Some(Say::OutOfResources));
        let other = failures.failed_at(&os(libc::EPERM), now + ms(10));
        assert_eq!(other, Failed { pause: Some(ms(20)), say: Some(Say::Failing) });
        assert!(Say::OutOfResources.to_string().contains("up to 500 ms"));
    }

    /// Short of descriptors, each connection that closes lets one accept through before the
    /// next fails: that is one run, said once, its pause still growing, not a run per
    /// connection (two log lines each, the pause back at 10 ms). A failure long after the last,
    /// with no accept between, begins a new run.
    #[test]
    fn accepts_that_work_between_failures_do_not_end_the_run() {
        let os = std::io::Error::from_raw_os_error;
        let ms = Duration::from_millis;
        let mut failures = AcceptFailures::default();
        let mut now = Instant::now();
        let mut said = 0;
        let mut pauses = Vec::new();
        for _ in 0..100 {
            let f = failures.failed_at(&os(libc::EMFILE), now);
            said += usize::from(f.say.is_some());
            pauses.push(f.pause.unwrap());
            now += f.pause.unwrap();
            assert_eq!(failures.accepted_at(now), None);
        }
        assert_eq!(said, 1);
        assert_eq!(pauses[..3], [ms(10), ms(20), ms(40)]);
        assert_eq!(pauses[99], ms(500));
        let later = failures.failed_at(&os(libc::EMFILE), now + RECOVERED_AFTER);
        assert_eq!(later, Failed { pause: Some(ms(10)), say: Some(Say::OutOfResources) });
    }

    /// A client that left before it was taken, or a network error pending on its connection
    /// (accept(2) asks these to be treated like EAGAIN), is no failure of the listener: no pause,
    /// nothing said, and a run of real failures is not interrupted by it. EOPNOTSUPP, which
    /// also says the socket is no stream listener, pauses.
    #[test]
    fn an_error_of_the_one_connection_taken_costs_no_pause() {
        let os = std::io::Error::from_raw_os_error;
        let ms = Duration::from_millis;
        let mut failures = AcceptFailures::default();
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::ENETUNREACH, libc::EHOSTUNREACH] {
            assert_eq!(failures.failed(&os(errno)), Failed { pause: None, say: None }, "{errno}");
        }
        assert_eq!(failures.accepted(), None);
        let now = Instant::now();
        assert_eq!(failures.failed_at(&os(libc::EMFILE), now).pause, Some(ms(10)));
        assert_eq!(failures.failed_at(&os(libc::EPROTO), now).pause, None);
        let again = failures.failed_at(&os(libc::EMFILE), now + ms(10));
        assert_eq!(again, Failed { pause: Some(ms(20)), say: None }, "the run goes on");
        assert_eq!(failures.failed_at(&os(libc::EOPNOTSUPP), now + ms(30)).pause, Some(ms(40)));
    }
}
