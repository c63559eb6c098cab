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
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Condvar, Mutex, PoisonError, mpsc::Sender},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    backoff::Backoff,
    config::{Config, HealthCheck},
};

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
    /// True when this probe failed on this node's side (out of descriptors, memory, buffers or
    /// local ports): it says nothing of the backend, and left the state as it was. Counted in
    /// `edgelb_health_probe_local_errors_total`, so that a node starving its own probes shows.
    pub local_failure: bool,
    /// The check that probed: an event of a check since stopped (reconciled away, or restarted
    /// with new settings) is stale ([`Checker::is_current`]), and its verdict, sent just before
    /// the stop, must not overrule the check that replaced it.
    pub check: u64,
}

impl HealthEvent {
    /// True when this probe reached out to the backend and failed: counted in
    /// `edgelb_health_check_failures_total` every time, flip or not, so that a backend failing
    /// fewer than `fall` probes in a row (flapping, never taken down) shows. A probe that failed
    /// on this node's side ([`HealthEvent::local_failure`]) is not the backend's.
    pub fn failed(&self) -> bool {
        self.latency.is_none() && !self.local_failure
    }
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

/// Tells a check's thread to stop, waking it from its wait between probes at once (a thread
/// that polled a flag instead would wake every few ms: with thousands of backends, tens of
/// thousands of wake-ups a second for nothing).
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn raise(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    fn raised(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `until` unless raised first; false when raised.
    fn sleep_until(&self, until: Instant) -> bool {
        let mut stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *stopped {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            stopped = self
                .wake
                .wait_timeout(stopped, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

struct Running {
    stop: Arc<Stop>,
    /// Never joined once stopped: the thread ends within a [`probe::SLICE`] (a probe in flight
    /// gives up at its next look at the stop), and nothing waits on it. One that ends while it
    /// runs (a panic) is found by [`Checker::any_ended`], joined for its message and started
    /// again by [`Checker::reconcile`].
    thread: JoinHandle<()>,
    id: u64,
    /// When it started: a check that died after running a long while starts its restart
    /// backoff afresh ([`RESTART_FORGET`]).
    started: Instant,
}

/// The waits before a dead check is started again the second time in a row and after: 1 s,
/// doubling with each death after, up to a minute. The first restart is at once (within the
/// controller's second): one panic is a bug to report, not a reason to leave a backend
/// unprobed. A check that panics at every probe was started again every second, for good: an
/// error and a new thread each second, for each such check.
const RESTART: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// A check that ran this long before dying is started again at once, as after a first death.
const RESTART_FORGET: Duration = Duration::from_secs(600);

/// The wait before a check that has died `deaths` times in a row is started again.
fn restart_wait(deaths: u32) -> Duration {
    match deaths {
        0 | 1 => Duration::ZERO,
        n => RESTART.nth(n - 1),
    }
}

/// Every check `cfg` asks for: one per (VIP, backend).
fn targets(cfg: &Config) -> Vec<Target> {
    let mut wanted = Vec::new();
    for vip in &cfg.vips {
        let Some(check) = &vip.health else { continue };
        for b in &vip.backends {
            let mut t = Target {
                vip: vip.name.clone(),
                backend: SocketAddr::new(b.address, b.port),
                check: check.clone(),
            };
            // The PROXY header only where the backend's own port listens, which expects it (the
            // check's port may be that one, written out, or another).
            if t.probed() != t.backend {
                t.check.proxy_protocol = None;
            }
            wanted.push(t);
        }
    }
    wanted
}

/// The set of running checks, reconciled with the config on every (re)load.
pub struct Checker {
    running: HashMap<Target, Running>,
    /// The ids of the running checks.
    current: HashSet<u64>,
    /// The id the next check started gets.
    next_id: u64,
    /// How many checks the last reconcile could not start: an episode of them (the controller
    /// retries every second) is logged when it begins and when it ends, not at every try.
    missing: usize,
    events: Sender<HealthEvent>,
    /// The VIPs whose probes found no route, shared with the checks ([`say_no_route`]).
    no_route: Arc<NoRoute>,
    /// Checks whose thread died: how many times in a row, and when they may start again
    /// ([`restart_wait`]).
    died: HashMap<Target, (u32, Instant)>,
}

impl Checker {
    /// A checker that reports state changes on `events`.
    pub fn new(events: Sender<HealthEvent>) -> Checker {
        Checker {
            running: HashMap::new(),
            current: HashSet::new(),
            next_id: 0,
            missing: 0,
            events,
            no_route: Arc::default(),
            died: HashMap::new(),
        }
    }

    /// Starts checks for targets new in `cfg` and stops those gone from it. A target whose check
    /// changed restarts. A new check starts in the state the controller holds for its backend
    /// (`down(vip, backend)`): one the controller knows dead stays out until `rise` good probes,
    /// instead of rejoining the ring for `fall` probes because its check is new; a backend the
    /// controller has no verdict on starts healthy, so a restart never blackholes a pool.
    ///
    /// Returns how many checks could not start (no thread to be had: a process or cgroup task
    /// limit); calling it again starts them, and the rest run meanwhile. Such an episode is
    /// logged once when it begins (how many, and the first one's error) and once when every
    /// check runs, not at each try: the controller tries every second.
    ///
    /// The backends `cfg` no longer checks leave the "no route" set ([`NoRoute`]), so that a
    /// VIP removed and added back is told again.
    ///
    /// A check whose thread ended by itself (a panic: a running check's thread ends otherwise
    /// only once stopped, and a stopped one leaves the set at once) is said, with the panic's
    /// message, and started again as a new check, from the controller's verdict like any new
    /// one: its backend's verdict stayed frozen while no probe ran. The controller calls this
    /// within a second of such an end ([`Checker::any_ended`]). The first restart is at once;
    /// a check that keeps dying waits 1 s, doubling to 60 s, before each next one
    /// ([`restart_wait`]), and is counted with those that could not start meanwhile (the
    /// controller calls again every second while any are).
    pub fn reconcile(&mut self, cfg: &Config, down: impl Fn(&str, SocketAddr) -> bool) -> usize {
        let ended: Vec<Target> = self
            .running
            .iter()
            .filter(|(_, r)| r.thread.is_finished())
            .map(|(t, _)| t.clone())
            .collect();
        let now = Instant::now();
        for t in ended {
            let Some(r) = self.running.remove(&t) else { continue };
            self.current.remove(&r.id);
            let why = match r.thread.join() {
                Ok(()) => "its thread ended".to_owned(),
                Err(p) => format!("its thread panicked: {}", crate::panic_message(&*p)),
            };
            let before = self.died.get(&t).map_or(0, |&(n, _)| n);
            let deaths = if r.started.elapsed() >= RESTART_FORGET { 1 } else { before + 1 };
            let wait = restart_wait(deaths);
            self.died.insert(t.clone(), (deaths, now + wait));
            tracing::error!(vip = %t.vip, backend = %t.backend, reason = %why, deaths_in_a_row = deaths, "a health check stopped by itself; starting it again from the controller's verdict in {} s (at once after a first death, then waiting 1 s doubling to 60 s while it keeps dying)", wait.as_secs());
        }
        let wanted = targets(cfg);
        let keep: HashSet<&Target> = wanted.iter().collect();
        self.died.retain(|t, _| keep.contains(t));
        let checked: HashSet<(&str, SocketAddr)> =
            wanted.iter().map(|t| (t.vip.as_str(), t.backend)).collect();
        // Stopped checks are not waited for: a probe in flight gives up within a slice
        // (`probe::SLICE`), and the controller must not stall even on that. The thread reports
        // nothing once stopped.
        self.running.retain(|t, r| {
            let kept = keep.contains(t);
            if !kept {
                r.stop.raise();
                self.current.remove(&r.id);
            }
            kept
        });
        // After the stops: a stopped check's probe still in flight records nothing from now on
        // ([`NoRoute::found`] looks at its stop under the set's lock), so none of them puts back
        // a backend no longer checked, which would keep its VIP's error unsaid.
        self.no_route.retain(|vip, backend| checked.contains(&(vip, backend)));
        let mut failed = 0;
        let mut waiting = 0;
        let mut first_failure = None;
        for t in wanted {
            if self.running.contains_key(&t) {
                continue;
            }
            if self.died.get(&t).is_some_and(|&(_, not_before)| now < not_before) {
                waiting += 1;
                continue;
            }
            let stop = Arc::new(Stop::default());
            let state = Hysteresis::starting(!down(&t.vip, t.backend));
            let id = self.next_id;
            let spawned = {
                let (t, stop, events) = (t.clone(), stop.clone(), self.events.clone());
                let no_route = self.no_route.clone();
                std::thread::Builder::new()
                    .name(format!("health {}", t.backend))
                    .stack_size(256 * 1024)
                    .spawn(move || run(t, state, stop, events, id, &no_route))
            };
            match spawned {
                Ok(thread) => {
                    self.next_id += 1;
                    self.current.insert(id);
                    self.running.insert(t, Running { stop, thread, id, started: Instant::now() });
                }
                Err(e) => {
                    failed += 1;
                    first_failure.get_or_insert((t.vip, t.backend, e));
                }
            }
        }
        if let Some((vip, backend, e)) = first_failure.filter(|_| self.missing == 0) {
            tracing::error!(%vip, %backend, error = %e, "{failed} health checks could not start (no thread to be had: a process or cgroup task limit; the first one's error is given); retried every second, said again once all run; meanwhile their backends keep the controller's verdict (up unless known down), and edgelb_health_checks_missing counts them");
        } else if failed == 0 && self.missing > 0 {
            tracing::info!(
                started = self.missing,
                "every health check runs: those that could not start have started"
            );
        }
        self.missing = failed;
        failed + waiting
    }

    /// Whether `check` (a [`HealthEvent::check`]) still runs: false for a check stopped since.
    pub fn is_current(&self, check: u64) -> bool {
        self.current.contains(&check)
    }

    /// Whether the thread of a running check has ended (a panic: see [`Checker::reconcile`],
    /// which starts it again). The controller looks every second: a check found dead no
    /// longer probes, and its backend's verdict stays as it was, "up" maybe, for good.
    pub fn any_ended(&self) -> bool {
        self.running.values().any(|r| r.thread.is_finished())
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
    /// Stops every check without waiting: a probe in flight (to a blackholed backend, say) gives
    /// up within a [`probe::SLICE`], and a controller handing over or exiting must not stall
    /// even on that. A stopped check reports nothing more, and writes no map.
    fn drop(&mut self) {
        for r in self.running.values() {
            r.stop.raise();
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

/// Logs a probe that failed on this node's side, at most once every 10 s for the whole process
/// ([`crate::proxy::Throttle`]): one line says it (the error and one check it happened to),
/// where a flood of them, one per check and interval, would drown the log; the counter counts
/// every one.
fn say_local_failure(t: &Target, e: &str) {
    static SAID: crate::proxy::Throttle = crate::proxy::Throttle::new();
    if SAID.ready() {
        tracing::warn!(vip = %t.vip, backend = %t.backend, error = %e, "health probes cannot run: this node is out of descriptors, memory or local ports (the backends are not blamed: each keeps its state until its probes run again); said at most every 10 s");
    }
}

/// The backends whose last probe found no route on this node ([`probe::Failure::NoRoute`]),
/// by VIP: [`say_no_route`] logs a VIP's error when its first backend joins, and the VIP is
/// told again only once every backend has left, by a probe that got past this node's routing
/// table (the route was fixed) or by leaving the config ([`Checker::reconcile`]). A set kept
/// by VIP name for the life of the process never told of a VIP removed and added back, or of
/// a route fixed and broken again weeks later; one emptied at any probe's success would repeat
/// the error every interval on a node with routes to some of a VIP's backends only.
#[derive(Default)]
struct NoRoute(Mutex<HashMap<String, HashSet<SocketAddr>>>);

impl NoRoute {
    /// Records that a probe of `backend` in `vip` found no route; true when no backend of
    /// `vip` was known routeless yet (the error is to be said). Nothing is recorded for a check
    /// `stopped` already: looked at under the set's lock, which [`Checker::reconcile`] takes
    /// after raising the stops, so a check reconciled away cannot put its backend back.
    fn found(&self, vip: &str, backend: SocketAddr, stopped: impl Fn() -> bool) -> bool {
        let mut vips = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if stopped() {
            return false;
        }
        let said = vips.contains_key(vip);
        vips.entry(vip.to_owned()).or_default().insert(backend);
        !said
    }

    /// Records that a probe of `backend` in `vip` got past this node's routing table; a VIP
    /// with no routeless backend left is forgotten (told again when one is found).
    fn routed(&self, vip: &str, backend: SocketAddr) {
        let mut vips = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(backends) = vips.get_mut(vip)
            && backends.remove(&backend)
            && backends.is_empty()
        {
            vips.remove(vip);
        }
    }

    /// Keeps the (VIP, backend) pairs `keep` says, forgetting the VIPs left with none.
    fn retain(&self, keep: impl Fn(&str, SocketAddr) -> bool) {
        let mut vips = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        vips.retain(|vip, backends| {
            backends.retain(|b| keep(vip, *b));
            !backends.is_empty()
        });
    }
}

/// Logs, as an error once per VIP until it is forgotten ([`NoRoute`]), that a probe of its
/// backends found no route on this node ([`probe::Failure::NoRoute`]). XDP forwards an `ipip`
/// or `ip6ip6` VIP's packets through `gateway_mac` whatever the kernel's routes say, so a node
/// without a kernel route to the backends forwards well, yet every probe fails, every backend
/// goes down and the VIP fails open: the log says why, and what to add. Once per VIP, not per
/// probe: the flips' reasons say it again for each backend.
fn say_no_route(said: &NoRoute, t: &Target, why: &str, stop: &Stop) {
    if said.found(&t.vip, t.backend, || stop.raised()) {
        tracing::error!(vip = %t.vip, backend = %t.backend, "health probes of VIP `{}` fail: {why}. The probes are connections from this node, routed by its kernel, while XDP sends an ipip or ip6ip6 VIP's packets through node.gateway_mac whatever the routes say: without a kernel route to the backends (`ip route add <backends' prefix> via <gateway>`) every probe fails, the backends go down and the VIP fails open; said once per VIP until a probe of each backend that had no route gets through again, or the VIP leaves the config", t.vip);
    }
}

fn run(
    t: Target,
    mut state: Hysteresis,
    stop: Arc<Stop>,
    events: Sender<HealthEvent>,
    id: u64,
    no_route: &NoRoute,
) {
    let addr = t.probed();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    let interval = t.check.interval;
    let offset = Duration::from_nanos(h.finish() % interval.as_nanos().max(1) as u64);
    let mut next = Instant::now() + offset;
    while stop.sleep_until(next) {
        next += interval;
        #[cfg(test)]
        tests::fault(&t);
        let result = probe::probe(&t.check, addr, &|| stop.raised());
        if stop.raised() {
            return; // reconciled away during the probe: its result is for a check that is gone
        }
        // A probe this node could not make (out of descriptors, say) counts neither way: the
        // backend keeps its state and its streak, as the L7 proxy's passive health does.
        let local_failure = matches!(&result, Err(probe::Failure::Local(_)));
        if let Err(probe::Failure::Local(e)) = &result {
            say_local_failure(&t, e);
        }
        match &result {
            Err(probe::Failure::NoRoute(why)) => say_no_route(no_route, &t, why, &stop),
            // Past this node's routing table (`probe::failure` says a backend's failure only
            // with a route here).
            Ok(_) | Err(probe::Failure::Backend(_)) => no_route.routed(&t.vip, t.backend),
            Err(probe::Failure::Local(_) | probe::Failure::Stopped) => {}
        }
        let changed = !local_failure && state.record(result.is_ok(), t.check.rise, t.check.fall);
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
            local_failure,
            check: id,
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
    use crate::config::CheckKind;

    /// Test-only fault (compiled into unit tests only): the backends whose check panics at its
    /// next probe, once each.
    static PANIC_AT_NEXT_PROBE: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

    /// Test-only fault: the backends whose check panics at every probe.
    static PANIC_ALWAYS: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

    /// Panics if a fault is armed for `t`'s backend ([`PANIC_AT_NEXT_PROBE`], disarming it, or
    /// [`PANIC_ALWAYS`]).
    pub(super) fn fault(t: &Target) {
        if PANIC_ALWAYS.lock().unwrap_or_else(PoisonError::into_inner).contains(&t.backend) {
            panic!("test fault: the health check of {} panics every time", t.backend);
        }
        let mut armed = PANIC_AT_NEXT_PROBE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = armed.iter().position(|b| *b == t.backend) {
            armed.swap_remove(i);
            drop(armed);
            panic!("test fault: the health check of {} panics", t.backend);
        }
    }

    /// A listening backend on loopback and a config checking it every `ms` ms (`fall = 1`).
    fn one_checked_backend(ms: u32) -> (std::net::TcpListener, SocketAddr, Config) {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = backend.local_addr().unwrap();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n[vip.health]\ninterval_ms = {ms}\ntimeout_ms = {ms}\nfall = 1\n",
            addr.port()
        );
        (backend, addr, Config::parse(&text, "t.toml".as_ref()).unwrap())
    }

    /// A check whose thread dies (a panic) is found ([`Checker::any_ended`]) and started again
    /// by the next reconcile, under a new id, and probes again. It used to stay dead, leaving its
    /// backend's verdict as it was for good.
    #[test]
    fn a_check_that_panics_is_started_again() {
        let (_backend, addr, cfg) = one_checked_backend(30);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        assert_eq!(checker.reconcile(&cfg, |_, _| false), 0);
        let first = rx.recv_timeout(Duration::from_secs(2)).expect("a first probe").check;
        PANIC_AT_NEXT_PROBE.lock().unwrap().push(addr);
        let until = Instant::now() + Duration::from_secs(5);
        while !checker.any_ended() {
            assert!(Instant::now() < until, "the check never panicked");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(checker.reconcile(&cfg, |_, _| false), 0);
        assert_eq!(checker.len(), 1);
        assert!(!checker.is_current(first), "the dead check's events are stale");
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let ev = rx.recv_timeout(left).expect("the check probes again");
            if ev.check != first {
                assert!(checker.is_current(ev.check) && ev.healthy, "{ev:?}");
                break;
            }
        }
        assert!(!checker.any_ended());
    }

    /// A check that panics at every probe is started again at once the first time, then only
    /// after a wait that doubles (1 s, 2 s, ...), counted meanwhile among the checks not
    /// running: it was started again every second, for good.
    #[test]
    fn a_check_that_keeps_dying_is_started_again_ever_later() {
        assert_eq!(
            (1..=9).map(restart_wait).map(|d| d.as_secs()).collect::<Vec<_>>(),
            [0, 1, 2, 4, 8, 16, 32, 60, 60]
        );
        let (_backend, addr, cfg) = one_checked_backend(10);
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        PANIC_ALWAYS.lock().unwrap().push(addr);
        let mut starts = 0;
        let mut waited = false;
        assert_eq!(checker.reconcile(&cfg, |_, _| false), 0);
        // 2.5 s of the controller's loop (every 50 ms here): starts at 0, at once after the
        // first death, then 1 s and 2 s later at the most.
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            let was = checker.len();
            let not_running = checker.reconcile(&cfg, |_, _| false);
            starts += usize::from(was == 0 && checker.len() == 1);
            waited |= not_running == 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        PANIC_ALWAYS.lock().unwrap().retain(|b| *b != addr);
        assert!(waited, "a check waiting to start again is counted as not running");
        assert!((1..=3).contains(&starts), "started again {starts} times in 2.5 s");
    }

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

    /// A check restarted with new settings makes the old one's events stale, so a verdict the
    /// old one sent just before it stopped cannot overrule the new one's; and dropping the
    /// checker does not wait for a probe in flight.
    #[test]
    fn a_stopped_checks_events_are_stale_and_nothing_waits_for_it() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = open.local_addr().unwrap().port();
        let cfg = |interval: u32| {
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {port} }}]\n[vip.health]\ninterval_ms = {interval}\ntimeout_ms = 50\n"
            );
            Config::parse(&text, "t.toml".as_ref()).unwrap()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        checker.reconcile(&cfg(50), |_, _| false);
        let first = rx.recv_timeout(Duration::from_secs(2)).expect("a probe");
        assert!(checker.is_current(first.check));
        checker.reconcile(&cfg(60), |_, _| false);
        assert!(!checker.is_current(first.check), "the restarted check's old events are stale");
        let next = loop {
            let ev = rx.recv_timeout(Duration::from_secs(2)).expect("a probe");
            if ev.check != first.check {
                break ev;
            }
        };
        assert!(checker.is_current(next.check), "the new check's events count");
        drop(open);

        // A probe to a blackhole (a full accept queue drops SYNs) takes its whole timeout.
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        hole.listen(0).unwrap();
        let hole_port = hole.local_addr().unwrap().as_socket().unwrap().port();
        let _filler = std::net::TcpStream::connect(("127.0.0.1", hole_port)).unwrap();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {hole_port} }}]\n[vip.health]\ninterval_ms = 2000\ntimeout_ms = 1900\n"
        );
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        checker.reconcile(&Config::parse(&text, "t.toml".as_ref()).unwrap(), |_, _| false);
        // The first probe starts within its spread over the interval: wait until its SYN is out.
        let started = Instant::now();
        while !syn_sent_to(hole_port) {
            assert!(started.elapsed() < Duration::from_secs(3), "no probe started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let dropping = Instant::now();
        drop(checker);
        assert!(
            dropping.elapsed() < Duration::from_secs(1),
            "dropped after {:?}",
            dropping.elapsed()
        );
    }

    /// Whether a connection to 127.0.0.1:`port` is in SYN_SENT (in /proc/net/tcp): a probe's SYN
    /// is out, and a blackhole drops it.
    fn syn_sent_to(port: u16) -> bool {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[2].ends_with(&format!(":{port:04X}")) && f[3] == "02"
        })
    }

    /// A check stopped mid-probe ends its thread within a slice of the probe's waits, not at
    /// its timeout: a reload restarting the checks of backends that never answer (a blackhole
    /// dropping SYNs; a backend that accepts and never answers an HTTP probe) left a thread per
    /// check for the whole timeout (up to 600 s), thousands with a tool reloading every minute.
    #[test]
    fn a_check_stopped_mid_probe_ends_its_thread_within_a_slice() {
        // A full accept queue drops SYNs: the connect waits.
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        hole.listen(0).unwrap();
        let hole = hole.local_addr().unwrap().as_socket().unwrap();
        let _filler = std::net::TcpStream::connect(hole).unwrap();
        // The kernel completes the handshake; nobody reads the request: the read waits.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http =
            CheckKind::Http { path: "/".into(), host: None, expect_status: 200, expect_body: None };
        for (what, kind, backend) in
            [("connect", CheckKind::Tcp, hole), ("read", http, silent.local_addr().unwrap())]
        {
            // A short interval, so the first probe starts at once (the offset is within it),
            // and a timeout far past the test's patience.
            let check = HealthCheck {
                kind,
                port: 0,
                interval: Duration::from_millis(10),
                timeout: Duration::from_secs(60),
                rise: 1,
                fall: 1,
                proxy_protocol: None,
            };
            let t = Target { vip: "web".into(), backend, check };
            let stop = Arc::new(Stop::default());
            let (tx, _rx) = std::sync::mpsc::channel();
            let thread = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    run(t, Hysteresis::new(), stop, tx, 0, &NoRoute::default())
                })
            };
            let started = Instant::now();
            // The probe's connection, held open (unanswered) through the stop.
            let _held = if what == "connect" {
                while !syn_sent_to(hole.port()) {
                    assert!(started.elapsed() < Duration::from_secs(3), "no probe started");
                    std::thread::sleep(Duration::from_millis(10));
                }
                None
            } else {
                Some(silent.accept().unwrap())
            };
            // Well into the wait.
            std::thread::sleep(Duration::from_millis(100));
            let stopping = Instant::now();
            stop.raise();
            while !thread.is_finished() {
                assert!(
                    stopping.elapsed() < Duration::from_secs(5),
                    "{what}: the stopped check's thread still runs after {:?}",
                    stopping.elapsed()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            thread.join().unwrap();
        }
    }

    /// Backends behind the PROXY protocol get the header on their own port, whether the check
    /// leaves `port` unset or writes the same one out, and never on a health port set apart.
    #[test]
    fn the_proxy_header_goes_only_to_a_backends_own_port() {
        let cfg = |health_port: &str| {
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"w\"\naddress = \"198.18.1.6\"\nport = 80\nforwarding = \"l7\"\nbackends = [{{ address = \"198.18.0.11\", port = 8080 }}, {{ address = \"198.18.0.12\", port = 8081 }}]\n[vip.l7]\nproxy_protocol = 2\n[vip.health]\nkind = \"http\"\n{health_port}"
            );
            Config::parse(&text, "t.toml".as_ref()).unwrap()
        };
        let sent = |c: &Config| -> Vec<(u16, Option<u8>)> {
            targets(c).iter().map(|t| (t.probed().port(), t.check.proxy_protocol)).collect()
        };
        assert_eq!(sent(&cfg("")), [(8080, Some(2)), (8081, Some(2))]);
        assert_eq!(sent(&cfg("port = 8080\n")), [(8080, Some(2)), (8080, None)]);
        assert_eq!(sent(&cfg("port = 9000\n")), [(9000, None), (9000, None)]);
    }

    /// A check's thread waits for its next probe without waking in between (thousands of checks
    /// polling a flag would wake the node tens of thousands of times a second), and a stop still
    /// ends the wait at once.
    #[test]
    fn a_waiting_check_sleeps_until_its_probe_or_its_stop() {
        let switches = || -> u64 {
            std::fs::read_to_string("/proc/thread-self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap()
        };
        let stop = Arc::new(Stop::default());
        let (waited, first_done) = std::sync::mpsc::channel();
        let waiter = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let before = switches();
                let slept = stop.sleep_until(Instant::now() + Duration::from_millis(600));
                let woke = switches() - before;
                waited.send(()).unwrap();
                let start = Instant::now();
                let stopped = !stop.sleep_until(Instant::now() + Duration::from_secs(60));
                (slept, woke, stopped, start.elapsed())
            })
        };
        // Raised once the first wait is over (however late the thread ran), during the second.
        first_done.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        stop.raise();
        let (slept, woke, stopped, stopped_after) = waiter.join().unwrap();
        assert!(slept && stopped, "the first wait ran out, the second was stopped");
        assert!(woke <= 3, "woke {woke} times in 600 ms of waiting");
        assert!(stopped_after < Duration::from_secs(1), "stopped after {stopped_after:?}");
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

    /// The "no route" error is said once per VIP, and again only once the VIP was forgotten:
    /// when every backend that had no route got a probe through (the route was fixed), or left
    /// the config (a VIP removed and added back later is told again). A backend that was
    /// always routed does not make it forget the others.
    #[test]
    fn no_route_is_said_again_once_the_route_was_fixed_or_the_vip_removed() {
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "198.18.0.11:80".parse().unwrap(),
            "198.18.0.12:80".parse().unwrap(),
            "198.18.0.13:80".parse().unwrap(),
        );
        let said = NoRoute::default();
        assert!(said.found("web", a, || false), "the first is said");
        assert!(!said.found("web", a, || false), "once per VIP");
        assert!(!said.found("web", b, || false), "once per VIP, not per backend");
        assert!(said.found("api", a, || false), "another VIP is said apart");
        said.routed("web", c);
        assert!(!said.found("web", a, || false), "C, always routed, does not forget A and B");
        said.routed("web", a);
        assert!(!said.found("web", b, || false), "B has no route yet");
        said.routed("web", a);
        said.routed("web", b);
        assert!(said.found("web", a, || false), "routed again, then broken again: said again");
        // A backend the config no longer checks leaves; a VIP left with none is forgotten.
        said.retain(|vip, backend| vip == "web" && backend == a);
        assert!(!said.found("web", b, || false));
        assert!(said.found("api", a, || false), "api was reconciled away");

        // The checker forgets the VIPs a reload removes (a config without checks: no thread).
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut checker = Checker::new(tx);
        assert!(checker.no_route.found("web", a, || false));
        let text = "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.2\" }]\n";
        let unchecked = Config::parse(text, "t.toml".as_ref()).unwrap();
        assert_eq!(checker.reconcile(&unchecked, |_, _| false), 0);
        assert!(checker.is_empty());
        assert!(checker.no_route.found("web", a, || false), "removed and added back: said again");
    }

    /// A probe of a check reconciled away while it was in flight records nothing: it would put
    /// back a backend no longer checked, and its VIP's error would go unsaid until the next
    /// reload.
    #[test]
    fn a_stopped_checks_late_no_route_is_not_recorded() {
        let a: SocketAddr = "198.18.0.11:80".parse().unwrap();
        let said = NoRoute::default();
        assert!(!said.found("web", a, || true), "stopped: nothing said");
        assert!(said.found("web", a, || false), "nothing was recorded by the stopped one");
    }
}
