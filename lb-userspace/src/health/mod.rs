//! Active health checks: one small thread per (VIP, backend, check), probing the backend's real
//! address from the balancer node.
//!
//! A backend flips state only after `fall` consecutive failures or `rise` consecutive successes
//! (it starts in the controller's verdict, or healthy without one, so a restart never blackholes
//! a pool), and each flip is reported once, with
//! the reason, on the controller's channel. First probes are spread over the interval by a hash of
//! the target, so a pool is not checked in bursts.

mod probe;

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::config::{Config, HealthCheck};

/// One probe's outcome; `changed` marks a state flip.
#[derive(Clone, Debug)]
pub struct HealthEvent {
    /// VIP name.
    pub vip: String,
    /// The backend: its address and port (an L7 VIP may list one address on several ports).
    pub backend: SocketAddr,
    /// State after this probe.
    pub healthy: bool,
    /// True when this probe flipped the state.
    pub changed: bool,
    /// Latency of a successful probe.
    pub latency: Option<Duration>,
    /// Why (the last probe's result), for flips.
    pub reason: String,
}

/// What to probe: one backend of one VIP with that VIP's check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Target {
    vip: String,
    /// The backend's address and port as the config lists it (its identity).
    backend: SocketAddr,
    check: HealthCheck,
}

impl Target {
    /// Where the probe goes: the check's port, or the backend's own.
    fn probed(&self) -> SocketAddr {
        match self.check.port {
            0 => self.backend,
            p => SocketAddr::new(self.backend.ip(), p),
        }
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The set of running checks, reconciled with the config on every (re)load.
pub struct Checker {
    running: HashMap<Target, Running>,
    events: Sender<HealthEvent>,
}

impl Checker {
    /// A checker that reports state changes on `events`.
    pub fn new(events: Sender<HealthEvent>) -> Checker {
        Checker { running: HashMap::new(), events }
    }

    /// Starts checks for targets new in `cfg` and stops those gone from it. A target whose check
    /// changed restarts. A new check starts in the state the controller holds for its backend
    /// (`down(vip, backend)`): one the controller knows dead stays out until `rise` good probes,
    /// instead of rejoining the ring for `fall` probes because its check is new; a backend the
    /// controller has no verdict on starts healthy, so a restart never blackholes a pool.
    pub fn reconcile(&mut self, cfg: &Config, down: impl Fn(&str, SocketAddr) -> bool) {
        let mut wanted = Vec::new();
        for vip in &cfg.vips {
            let Some(check) = &vip.health else { continue };
            for b in &vip.backends {
                wanted.push(Target {
                    vip: vip.name.clone(),
                    backend: SocketAddr::new(b.address, b.port),
                    check: check.clone(),
                });
            }
        }
        // Stopped checks are not waited for: a probe in flight may take its whole timeout, and
        // the controller must not stall on it. The thread reports nothing once stopped.
        self.running.retain(|t, r| {
            let keep = wanted.contains(t);
            if !keep {
                r.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        for t in wanted {
            if self.running.contains_key(&t) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let state = Hysteresis::starting(!down(&t.vip, t.backend));
            let thread = {
                let (t, stop, events) = (t.clone(), stop.clone(), self.events.clone());
                std::thread::Builder::new()
                    .name(format!("health {}", t.backend))
                    .stack_size(256 * 1024)
                    .spawn(move || run(t, state, stop, events))
                    .expect("spawning a health-check thread")
            };
            self.running.insert(t, Running { stop, thread });
        }
    }

    /// Number of running checks.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// True when no check runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
        for (_, r) in self.running.drain() {
            let _ = r.thread.join();
        }
    }
}

/// Rise/fall state of one target: flips only after enough consecutive opposite results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    healthy: bool,
    streak: u32,
}

impl Hysteresis {
    /// Starts healthy.
    pub fn new() -> Hysteresis {
        Hysteresis::starting(true)
    }

    /// Starts in state `healthy`.
    pub fn starting(healthy: bool) -> Hysteresis {
        Hysteresis { healthy, streak: 0 }
    }

    /// Current state.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one probe result; returns true when the state flipped.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        if self.streak >= if ok { rise } else { fall } {
            self.healthy = ok;
            self.streak = 0;
            return true;
        }
        false
    }
}

impl Default for Hysteresis {
    fn default() -> Self {
        Hysteresis::new()
    }
}

/// Sleeps until `until` unless `stop` is raised first; returns false when stopped.
fn sleep_until(until: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

fn run(t: Target, mut state: Hysteresis, stop: Arc<AtomicBool>, events: Sender<HealthEvent>) {
    let addr = t.probed();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    let interval = t.check.interval;
    let offset = Duration::from_nanos(h.finish() % interval.as_nanos().max(1) as u64);
    let mut next = Instant::now() + offset;
    while sleep_until(next, &stop) {
        next += interval;
        let result = probe::probe(&t.check, addr);
        if stop.load(Ordering::Relaxed) {
            return; // reconciled away during the probe: its result is for a check that is gone
        }
        let ok = result.is_ok();
        let changed = state.record(ok, t.check.rise, t.check.fall);
        let reason = match &result {
            Ok(d) if changed => {
                format!("{} consecutive successes (last in {} ms)", t.check.rise, d.as_millis())
            }
            Err(e) if changed => format!("{} consecutive failures (last: {e})", t.check.fall),
            _ => String::new(),
        };
        let ev = HealthEvent {
            vip: t.vip.clone(),
            backend: t.backend,
            healthy: state.healthy(),
            changed,
            latency: result.ok(),
            reason,
        };
        if events.send(ev).is_err() {
            return;
        }
        // A probe that overran the interval starts the next one at once, but never piles up.
        if next < Instant::now() {
            next = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An L7 VIP's backends are checked on their own ports, each on its own: one address on two
    /// ports, one of them closed, gives one verdict per port.
    #[test]
    fn l7_backends_are_probed_on_their_own_ports_each_alone() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (up, down) = (open.local_addr().unwrap(), closed.local_addr().unwrap());
        drop(closed);
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}, {{ address = \"127.0.0.1\", port = {} }}]\n[vip.health]\ninterval_ms = 50\ntimeout_ms = 50\nfall = 1\n",
            up.port(),
            down.port()
        );
        let cfg = Config::parse(&text, "t.toml".as_ref()).unwrap();
        assert_eq!(cfg.vips[0].health.as_ref().unwrap().port, 0, "each backend's own port");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        checker.reconcile(&cfg, |_, _| false);
        assert_eq!(checker.len(), 2, "one check per address and port");
        let mut verdicts = HashMap::new();
        let until = Instant::now() + Duration::from_millis(400);
        while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            verdicts.insert(ev.backend, ev.healthy);
        }
        drop(open);
        assert_eq!(verdicts.get(&up), Some(&true), "{verdicts:?}");
        assert_eq!(verdicts.get(&down), Some(&false), "{verdicts:?}");
    }

    /// A check started again (its settings changed in a reload, a takeover taken back) for a
    /// backend the controller holds dead keeps it dead until `rise` good probes: it does not
    /// report it alive, back in the ring, on its first answer.
    #[test]
    fn a_new_check_starts_from_the_controllers_verdict() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = open.local_addr().unwrap().port();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {port} }}]\n[vip.health]\ninterval_ms = 50\ntimeout_ms = 50\nrise = 3\n"
        );
        let cfg = Config::parse(&text, "t.toml".as_ref()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        checker.reconcile(&cfg, |vip, b| vip == "web" && b.port() == port);
        let states: Vec<(bool, bool)> = (0..3)
            .map(|_| {
                let ev = rx.recv_timeout(Duration::from_secs(2)).expect("a probe");
                (ev.healthy, ev.changed)
            })
            .collect();
        assert_eq!(states, [(false, false), (false, false), (true, true)]);
        drop(open);
    }

    #[test]
    fn flips_only_after_fall_failures_and_rise_successes() {
        let mut h = Hysteresis::new();
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(false, 2, 3));
        assert!(h.healthy());
        assert!(h.record(false, 2, 3));
        assert!(!h.healthy());
        assert!(!h.record(true, 2, 3));
        // A failure in between resets the streak.
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3));
        assert!(h.healthy());
    }
}
