//! Active health checks against real loopback sockets, under real shortages of this node's own
//! resources. Unprivileged: everything here runs on 127.0.0.0/8, each starved test in a
//! process of its own.

use std::{
    net::TcpListener,
    sync::mpsc,
    time::{Duration, Instant},
};

use edgelb::{
    config::Config,
    health::Checker,
    metrics::{BackendLabels, Metrics},
};

mod common;

/// A config with one L7 VIP on 127.0.0.1 whose backends are 127.0.0.1 on `ports`, checked over
/// TCP every 30 ms, down after a single failure (`fall = 1`).
fn checked(ports: &[u16]) -> Config {
    checked_falling(ports, 1)
}

/// [`checked`], down after `fall` failures in a row.
fn checked_falling(ports: &[u16], fall: u32) -> Config {
    let backends: Vec<String> =
        ports.iter().map(|p| format!("{{ address = \"127.0.0.1\", port = {p} }}")).collect();
    let text = format!(
        "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{}]\n[vip.health]\ninterval_ms = 30\ntimeout_ms = 30\nrise = 1\nfall = {fall}\n",
        backends.join(", ")
    );
    Config::parse(&text, "t.toml".as_ref()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A probe that cannot even open its socket (this node is out of descriptors) says nothing of
/// the backend: a check with `fall = 1` must not take a healthy backend down for it, however
/// many such probes there are, and once descriptors are free again the probes go on from the
/// state the backend was in. (They did count as failures, and a descriptor spike on the node
/// took every healthy backend out of the ring.)
#[test]
fn a_probe_out_of_descriptors_blames_no_backend() {
    const NAME: &str = "a_probe_out_of_descriptors_blames_no_backend";
    if std::env::var_os("EDGELB_FD_CHILD").is_none() {
        return common::in_child(NAME);
    }
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = checked(&[backend.local_addr().unwrap().port()]);
    let (tx, rx) = mpsc::channel();
    let mut checker = Checker::new(tx);
    let events = |rx: &mpsc::Receiver<_>, ms| {
        let until = Instant::now() + Duration::from_millis(ms);
        let mut got = Vec::new();
        while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            got.push(ev);
        }
        got
    };
    let room = common::room_for(0);
    assert_eq!(checker.reconcile(&cfg, |_, _| false), 0, "the check started");
    let starved: Vec<edgelb::health::HealthEvent> = events(&rx, 300);
    drop(room);
    assert!(starved.len() >= 3, "probes ran: {starved:?}");
    assert!(starved.iter().all(|ev| ev.healthy && !ev.changed), "{starved:?}");
    assert!(starved.iter().all(|ev| ev.local_failure), "each said to be this node's: {starved:?}");
    // Descriptors are back: the probes reach the backend, which is still up.
    let fed = events(&rx, 200);
    assert!(
        !fed.is_empty() && fed.iter().all(|ev| ev.healthy && !ev.changed && !ev.local_failure),
        "{fed:?}"
    );
    drop(backend);
}

/// A backend that refuses every probe, checked with a `fall` it never reaches here, stays up,
/// and each of its failed probes is counted in `edgelb_health_check_failures_total` as the
/// controller records probes ([`Metrics::probed`]): flapping below `fall` shows there alone.
#[test]
fn every_failed_probe_is_counted_below_fall() {
    // A port nothing listens on: bound, then let go.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = checked_falling(&[port], 100);
    let metrics = Metrics::new();
    metrics.retain(&cfg);
    let (tx, rx) = mpsc::channel();
    let mut checker = Checker::new(tx);
    assert_eq!(checker.reconcile(&cfg, |_, _| false), 0, "the check started");
    let until = Instant::now() + Duration::from_millis(400);
    let mut failed = 0;
    let labels = BackendLabels { vip: "web".into(), backend: format!("127.0.0.1:{port}") };
    while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        assert!(ev.healthy && !ev.changed && !ev.local_failure, "{ev:?}");
        failed += u32::from(ev.failed());
        metrics.probed(&ev, &labels);
    }
    drop(checker);
    assert!(failed >= 3, "probes ran: {failed}");
    let series =
        format!("edgelb_health_check_failures_total{{vip=\"web\",backend=\"127.0.0.1:{port}\"}} ");
    let text = metrics.encode();
    let counted = text.lines().find_map(|l| l.strip_prefix(&series)?.parse::<u32>().ok());
    assert_eq!(counted, Some(failed), "{text}");
}

/// Lowers this process's address-space limit to what it maps now and `room` bytes more, until
/// the returned guard is dropped: too little for a health check's thread (its 256 KiB stack),
/// as a process or cgroup task limit would refuse it.
fn address_space_for(room: u64) -> impl Drop {
    struct Limit(libc::rlimit);
    impl Drop for Limit {
        fn drop(&mut self) {
            // SAFETY: setrlimit reads the struct it is given.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &self.0) }, 0);
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/self/status");
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the structs they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0);
        let low = libc::rlimit { rlim_cur: (kib * 1024 + room) as libc::rlim_t, ..old };
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &low), 0);
    }
    Limit(old)
}

/// What a closure logged, as text lines (the `tracing` events of this thread only).
fn logged(f: impl FnOnce()) -> Vec<String> {
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_owned).collect()
}

/// Checks that cannot start (no thread to be had) are retried every second by the controller:
/// each retry must not log a line per check (one a second per check flooded the log), but one
/// summary when the episode begins and one when every check runs again.
#[test]
fn checks_that_cannot_start_are_logged_once_per_episode() {
    const NAME: &str = "checks_that_cannot_start_are_logged_once_per_episode";
    if std::env::var_os("EDGELB_FD_CHILD").is_none() {
        return common::in_child(NAME);
    }
    let backends: Vec<TcpListener> =
        (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports: Vec<u16> = backends.iter().map(|l| l.local_addr().unwrap().port()).collect();
    let cfg = checked(&ports);
    let (tx, _rx) = mpsc::channel();
    let mut checker = Checker::new(tx);
    let mut missing = Vec::new();
    let starved = logged(|| {
        let limit = address_space_for(64 * 1024);
        for _ in 0..3 {
            missing.push(checker.reconcile(&cfg, |_, _| false));
        }
        drop(limit);
    });
    assert_eq!(missing, [3, 3, 3], "no check could start");
    assert_eq!(checker.len(), 0);
    let errors: Vec<&String> = starved.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one summary for three tries of three checks: {starved:#?}");
    assert!(errors[0].contains("3 health checks could not start"), "{errors:?}");
    let fed = logged(|| missing.push(checker.reconcile(&cfg, |_, _| false)));
    assert_eq!(missing[3], 0, "every check runs once threads can be had");
    assert_eq!(checker.len(), 3);
    assert!(
        fed.len() == 1 && fed[0].contains("INFO") && fed[0].contains("every health check runs"),
        "{fed:#?}"
    );
    // A later episode is said again: a check added while threads are short.
    let mut more = ports.clone();
    more.push(TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let again = logged(|| {
        let limit = address_space_for(64 * 1024);
        missing.push(checker.reconcile(&checked(&more), |_, _| false));
        missing.push(checker.reconcile(&checked(&more), |_, _| false));
        drop(limit);
    });
    assert_eq!(missing[4..], [1, 1]);
    assert!(again.len() == 1 && again[0].contains("1 health checks could not start"), "{again:#?}");
    drop(backends);
}
