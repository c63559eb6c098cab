//! `edgelb run`: the controller loop.
//!
//! It owns the configured state (the config file), the observed state (health verdicts, runtime
//! drains) and the data plane, and after every change writes the *effective* config, configured
//! minus dead backends with drained ones at weight 0, to the maps. `Dataplane::apply` only
//! rewrites what changed, so this is cheap and safe to do on every event.
//!
//! Lifecycle: maps and XDP links are pinned under `node.pin_dir`. SIGTERM, SIGINT and
//! `edgelb stop --detach` end the controller but leave the data plane running, so a restart or
//! upgrade adopts it without dropping a packet; `edgelb stop` tears everything down. SIGHUP and
//! `edgelb reload` re-read the config; a bad file is rejected and the running config stays.

mod links;
mod verdicts;

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info, warn};

use self::verdicts::{Checked, Verdicts};
use crate::{
    admin::{
        self, AdminError, Answer, BackendStatus, ConntrackStatus, HandedSocket, HandoverEnd,
        Pending, Request, Response, RouteStatus, SocketKind, Status, VipStatus,
    },
    backoff::Backoff,
    config::{Config, Forwarding},
    dataplane::{Dataplane, DataplaneError, InterfaceState, TableShape},
    error_chain,
    health::{Checker, HealthEvent},
    metrics::{BackendSample, KernelSnapshot, Metrics, Scrape, backend_label},
    proxy::DrainKind,
    rlimit,
};

/// Why `run` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config could not be loaded.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data path failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    // Causes are in the messages, so they are not also the errors' `source()`: `edgelb run`
    // prints the source chain, which would say them twice.
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// The metrics endpoint could not be served.
    #[error("metrics endpoint {addr}: {error}")]
    Metrics {
        /// Listen address.
        addr: std::net::SocketAddr,
        /// Cause.
        error: std::io::Error,
    },
    /// The L7 proxy could not start (typed, so that a caller can tell a ring that does not fit
    /// the locked-memory limit from a listener that cannot bind).
    #[error("L7 proxy: {0}")]
    Proxy(crate::proxy::ProxyError),
    /// An interface of `node.interfaces` is not there.
    #[error(
        "interface `{0}` (node.interfaces) does not exist in this network namespace; nothing was changed"
    )]
    Interface(String),
    /// The listening sockets passed by the service manager are unusable.
    #[error(transparent)]
    Inherited(#[from] crate::proxy::inherited::InheritError),
    /// `--takeover`: the running edgelb could not hand over.
    #[error("taking over: {0}")]
    Takeover(AdminError),
    /// `--takeover`: the config file changed while this process started (the running edgelb
    /// was reloaded meanwhile) in a way this start cannot follow: the file now fails, or
    /// changes what was already set up from it. Given up before the commit, so the running
    /// edgelb takes back over.
    #[error("taking over: {0}; the running edgelb keeps serving")]
    TakeoverConfig(String),
    /// `--takeover`: SIGINT or SIGTERM arrived before this process served; it gives up and the
    /// running edgelb goes on (a Ctrl-C on a takeover that seems stuck must not leave the node
    /// with neither).
    #[error(
        "taking over: stopped by a signal before serving; the running edgelb keeps serving (or takes back over)"
    )]
    TakeoverInterrupted,
    /// The admin socket could not be served: the step that failed, and why.
    #[error("admin socket {path}: {error}")]
    Admin {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// Another process holds the pinned data plane though no controller answers on the admin
    /// socket: a controller whose socket is gone. Two controllers writing one set of maps would
    /// corrupt each other's rings and backend ids.
    #[error(
        "{holders} holds the data plane pinned under {pin_dir} open, though no controller answers on {admin}: a controller appears to be running without its admin socket (deleted, or another config's). Two controllers on one data plane corrupt each other's maps, so this one does not start. Stop that process (SIGTERM leaves the data plane running), then start again"
    )]
    DataplaneHeld {
        /// The processes, as `PID n (comm)`.
        holders: String,
        /// The pin directory.
        pin_dir: PathBuf,
        /// The admin socket.
        admin: PathBuf,
    },
}

/// How often counters are sampled for rates (and logged at debug level when they changed).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Most health events the loop takes in at a turn before it goes on to signals, scrapes and
/// admin requests: every probe's result is an event (thousands a second on a large config),
/// and a backlog of them must not hold the rest up. Events left wait for the next turn, which
/// comes without waiting; none is dropped.
const HEALTH_EVENTS_PER_TURN: usize = 1024;

/// Takes at most `max` of the messages waiting on `rx`, each to `on`, without waiting for
/// more; true when it took `max` (more may be waiting, for the next call: none is dropped).
fn take_some<T>(rx: &Receiver<T>, max: usize, mut on: impl FnMut(T)) -> bool {
    let mut taken = 0;
    while taken < max {
        let Ok(m) = rx.try_recv() else { return false };
        on(m);
        taken += 1;
    }
    true
}

/// Packet and byte rates from the last two counter samples.
#[derive(Default)]
struct Rates {
    samples: HashMap<String, [(Instant, u64, u64); 2]>,
}

impl Rates {
    /// The key of a VIP's backend (a VIP's own key is its name).
    fn backend_key(vip: &str, backend: std::net::IpAddr) -> String {
        format!("{vip}/{backend}")
    }

    fn record(&mut self, key: String, now: Instant, c: lb_common::Counters) {
        let e = self.samples.entry(key).or_insert([(now, c.packets, c.bytes); 2]);
        e[0] = e[1];
        e[1] = (now, c.packets, c.bytes);
    }

    /// (packets/s, bytes/s) for `key` at `now`: 0 (no figure, as before the first samples) when
    /// the last sample is older than two sampling periods. The rate of a loop that stopped
    /// sampling would otherwise be given as "now" for as long as it stopped, as the L7 drain
    /// once did while XDP went on forwarding.
    fn get(&self, key: &str, now: Instant) -> (f64, f64) {
        let Some([(t0, p0, b0), (t1, p1, b1)]) = self.samples.get(key) else { return (0.0, 0.0) };
        if now.saturating_duration_since(*t1) > 2 * SAMPLE_EVERY {
            return (0.0, 0.0);
        }
        let dt = t1.duration_since(*t0).as_secs_f64();
        if dt <= 0.0 {
            return (0.0, 0.0);
        }
        ((p1.saturating_sub(*p0)) as f64 / dt, (b1.saturating_sub(*b0)) as f64 / dt)
    }

    /// Forgets the VIPs and backends `cfg` no longer has.
    fn retain(&mut self, cfg: &Config) {
        let keep: std::collections::HashSet<String> = cfg
            .vips
            .iter()
            .flat_map(|v| {
                let backends = v.backends.iter().map(|b| Self::backend_key(&v.name, b.address));
                std::iter::once(v.name.clone()).chain(backends)
            })
            .collect();
        self.samples.retain(|k, _| keep.contains(k));
    }
}

/// How the loop ended.
enum Exit {
    /// Leave XDP attached and maps pinned.
    Detach,
    /// Remove the data plane too.
    Teardown,
    /// `edgelb run --takeover` asked for the listening sockets: hand them over on this channel
    /// and leave the data plane to the new process, which binds its admin socket over the path
    /// when the bool says so, and whose build is the string, when it says it
    /// ([`Request::Handover`]).
    Handover(mpsc::Sender<Answer>, Box<Answer>, bool, Option<String>),
}

struct Controller {
    path: PathBuf,
    cfg: Config,
    /// The [`crate::config::content_hash`] of the file `cfg` was read from, handed to a
    /// takeover ([`Response::config_sha256`]).
    cfg_sha256: String,
    dp: Dataplane,
    checker: Checker,
    health_rx: Receiver<HealthEvent>,
    /// The health-checked backends of `cfg`, by VIP and backend, for the health events: made
    /// anew with `cfg` ([`Controller::set_config`]).
    checked: Checked,
    /// What admin threads send requests on: each thread this controller serves its socket
    /// with (another after a take-back, [`Controller::serve_admin`]) gets a clone, so that the
    /// requests a thread still takes from a listener being replaced reach `admin_rx` too.
    admin_tx: mpsc::Sender<Pending>,
    admin_rx: Receiver<Pending>,
    scrape_rx: Receiver<Scrape>,
    metrics: Metrics,
    rates: Rates,
    /// Each VIP's packet count at the last sample, to log only the counters that changed
    /// ([`Controller::sample`]).
    last_packets: HashMap<String, u64>,
    /// When the counters are next sampled ([`Controller::sample_when_due`]).
    next_sample: Instant,
    proxy: Option<crate::proxy::Proxy>,
    /// Health verdicts, drains and fail-open state.
    verdicts: Verdicts,
    /// The admin socket's serving thread.
    admin: Option<admin::Serving>,
    /// When the admin socket is not served though it should be (its thread ended, or binding
    /// it again after an abandoned handover failed): when it is tried next
    /// ([`Controller::keep_admin_served`]).
    admin_retry: Option<Retry>,
    /// The admin socket's path as this process bound it ([`admin::path_identity`]): a path
    /// removed, or replaced by a socket nobody serves (a takeover that stalled past its wait,
    /// woke after this process took back over and renamed its own socket there before it
    /// failed), is bound again ([`Controller::keep_admin_served`]).
    admin_path_id: Option<(u64, u64)>,
    /// The metrics endpoint's listening socket, to hand over to `edgelb run --takeover`.
    metrics_socket: Option<(std::net::SocketAddr, std::net::TcpListener)>,
    /// The metrics endpoint being served: stopped once a takeover's new process serves, so
    /// that scrapes reach only one process (two would make every counter jump between them).
    metrics_serving: Option<crate::metrics::Serving>,
    /// Health checks that could not start (no thread to be had); retried every second.
    checks_missing: usize,
    /// Attached interfaces XDP is no longer on (see [`Dataplane::lost_interfaces`]), looked
    /// for every second.
    lost: Vec<String>,
    /// Attached interfaces renamed since, with their new names (see
    /// [`Dataplane::renamed_interfaces`]): still balancing, under a name the config does not give.
    renamed: Vec<(String, String)>,
    /// Whether the looks for lost interfaces could not tell where some stand
    /// ([`InterfaceState::Unknown`]): said once when it begins, and once when it has ended for
    /// a while ([`Lookups`]).
    interfaces_untold: Lookups,
    /// The MTU and GRO warnings last logged ([`mtu_mismatches`], [`gro_warnings`]): a reload
    /// or a sample logs them again only when they change ([`same_warnings`]), or hundreds of
    /// reloads fill the log with the same lines.
    link_warnings: Vec<String>,
    /// Lost interfaces that could not be attached again ([`Dataplane::reattach`]): tried again
    /// on the same device with a backoff ([`AttachFailed`]), or, refused for want of a
    /// capability, only once the interface is another device (`status` says it until then).
    attach_failed: Vec<AttachFailed>,
    /// What the kernel last said of the interfaces' MTUs, GRO and gateways
    /// ([`links::LinkWatch`]).
    links: links::LinkWatch,
    /// A takeover's new process has the data plane ([`Controller::hand_over`]): this one only
    /// finishes its requests in flight, and what an operator asks of it (a reload, a SIGHUP)
    /// is the new one's to do.
    handed_over: bool,
    /// The SIGHUPs that reached this edgelb after it handed over, passed on to the new one
    /// ([`Controller::forward_reload`]); none until the first.
    reloads_forwarded: Option<ReloadsForwarded>,
}

/// A thread asking the edgelb that took over to reload (`edgelb reload` on the admin socket,
/// whose path is its now), one request for every SIGHUP, or for every burst of them that came
/// while one was asked: a reload reads the file as it is when it is made. Apart from the
/// controller, as the new process answers once its loop runs and a reload takes as long as it
/// takes, while this process drains; [`Controller::finish_forwarded_reloads`] waits for the
/// answers (at most [`RELOAD_FORWARD_WAIT`]) before it exits.
struct ReloadsForwarded {
    /// Each SIGHUP's number, counted from 1.
    tx: mpsc::Sender<u64>,
    /// SIGHUPs passed on so far.
    asked: u64,
    /// The number of the last SIGHUP whose reload the new process has answered (or that could
    /// not be asked: the answer or the failure is logged).
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ReloadsForwarded {
    /// Starts the thread, asking the edgelb on `socket`.
    fn start(socket: PathBuf) -> std::io::Result<ReloadsForwarded> {
        let (tx, rx) = mpsc::channel::<u64>();
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = answered.clone();
        let thread = std::thread::Builder::new().name("reload-forward".into()).spawn(move || {
            while let Ok(mut last) = rx.recv() {
                // The SIGHUPs that came while the last reload was asked: one reload, made
                // after all of them, reads the file as they meant.
                while let Ok(n) = rx.try_recv() {
                    last = n;
                }
                match admin::request(&socket, &Request::Reload { config: None }) {
                    Ok(r) if r.ok => {
                        info!(answer = %r.message, "SIGHUP after the handover: the new edgelb reloaded")
                    }
                    // Turned away by an edgelb that handed over in its turn, past the retries:
                    // nothing was reloaded anywhere.
                    Ok(r) if r.handed_over => error!(
                        answer = %r.message,
                        "SIGHUP after the handover: no reload was made (the edgelb asked handed over in its turn); reload the one serving now (`edgelb reload`)"
                    ),
                    Ok(r) => error!(
                        answer = %r.message,
                        "SIGHUP after the handover: the new edgelb refused to reload (its log says why); it runs the config as before"
                    ),
                    Err(e) => error!(
                        error = %e,
                        "SIGHUP after the handover: asking the new edgelb to reload failed (if none serves, as after a takeover that failed once this one let go, start one); else reload it (`edgelb reload`)"
                    ),
                }
                done.store(last, std::sync::atomic::Ordering::Release);
            }
        });
        thread.map(|_| ReloadsForwarded { tx, asked: 0, answered })
    }
}

/// How long a handed-over edgelb waits, before it exits, for the new one to answer the reloads
/// it asked of it for SIGHUPs ([`ReloadsForwarded`]): [`admin::request`] asks again for
/// [`admin::HANDED_OVER_RETRY`] at most, and a reload takes well under a second, but the new
/// process may be stalled (its 60 s at the commit); its exit is not held for that.
const RELOAD_FORWARD_WAIT: Duration = Duration::from_secs(10);

/// The waits before the admin socket, not served, is bound again: the controller's periodic
/// work ([`Controller::keep_admin_served`]) tries it a second after it was lost, then doubling
/// the wait after each failure up to 8 s: once whatever kept it from binding (the lock beside
/// it held, its directory gone) passes, `edgelb status` answers again within seconds, and a
/// cause that stays costs a try every few seconds, each bounded by [`ADMIN_RETRY_LOCK_WAIT`].
const ADMIN_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));

/// How long the attached interfaces' lookups must work again, after they failed, before that is
/// said ([`Lookups`]).
const LOOKUPS_BACK_AFTER: Duration = Duration::from_secs(30);

/// Whether the attached interfaces' lookups work, as said in the log: a failure is said when an
/// episode starts, and its end once lookups have worked for [`LOOKUPS_BACK_AFTER`]. A process
/// near its descriptor limit fails and succeeds in turn from one second to the next, and each
/// change said made a warning and an "again" line a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookups {
    /// They work (or have since the last episode was said over).
    Fine,
    /// They fail.
    Failing,
    /// They work again since this moment, not yet for long enough to say so.
    Recovering(Instant),
}

impl Lookups {
    /// The state after a round whose lookups `failed` (or not) at `now`, and what to say: the
    /// start of an episode (`Failing`) or its end (`Fine`).
    fn step(self, failed: bool, now: Instant) -> (Lookups, Option<Lookups>) {
        match (self, failed) {
            (Lookups::Fine, true) => (Lookups::Failing, Some(Lookups::Failing)),
            (Lookups::Fine, false) => (Lookups::Fine, None),
            (Lookups::Failing | Lookups::Recovering(_), true) => (Lookups::Failing, None),
            (Lookups::Failing, false) => (Lookups::Recovering(now), None),
            (Lookups::Recovering(since), false)
                if now.duration_since(since) >= LOOKUPS_BACK_AFTER =>
            {
                (Lookups::Fine, Some(Lookups::Fine))
            }
            (Lookups::Recovering(since), false) => (Lookups::Recovering(since), None),
        }
    }
}

/// How long a try from the controller's loop waits for the lock beside the admin socket:
/// briefly (another start holds it microseconds), as the loop also applies health verdicts and
/// answers scrapes and signals.
const ADMIN_RETRY_LOCK_WAIT: Duration = Duration::from_millis(50);

/// When something that failed is tried again, and the wait before that try (doubled by each
/// further failure).
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    wait: Duration,
}

impl Retry {
    /// The first try, [`ADMIN_RETRY`]'s first wait from now.
    fn first() -> Retry {
        let wait = ADMIN_RETRY.first();
        Retry { at: Instant::now() + wait, wait }
    }

    /// The next try after one that failed: twice the wait, up to [`ADMIN_RETRY`]'s longest.
    fn again(self) -> Retry {
        let wait = ADMIN_RETRY.after(self.wait);
        Retry { at: Instant::now() + wait, wait }
    }
}

/// The waits before a lost interface that could not be attached again is tried again on the
/// same device: 30 s at first, since errors other than EPERM may pass (a driver still
/// initialising says EBUSY or EINVAL; ENOMEM), and the interface was otherwise LOST until a
/// restart; each further failure doubles the wait up to 5 minutes, so that an interface that
/// keeps failing logs rarely (a failure is said when its reason changes) yet is attached within
/// minutes of the cause going.
const REATTACH: Backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(300));

/// A lost interface that could not be attached again ([`Dataplane::reattach`]), and when it is
/// tried again ([`reattach_due`], [`AttachFailed::after`]).
#[derive(Debug)]
struct AttachFailed {
    /// The interface, as node.interfaces names it.
    interface: String,
    /// The index of the device tried.
    ifindex: u32,
    /// Why it failed (the error's chain, with the kernel's errno).
    reason: String,
    /// When the same device is tried again; `None`: not (the kernel refused for want of a
    /// capability, EPERM, as before Linux 5.19: a restart attaches), until another device
    /// has the name or the interface is seen gone.
    retry_at: Option<Instant>,
    /// The wait before that try; the next failure on the device waits twice as long
    /// ([`REATTACH`]).
    wait: Duration,
}

impl AttachFailed {
    /// The record of a failure `e` to attach `interface` again to device `ifindex` at `now`,
    /// after `previous` (the interface's last failure, if any): EPERM is not tried again on
    /// that device; anything else after [`REATTACH`]'s first wait, twice as long after each
    /// further failure on the same device, up to its longest.
    fn after(
        previous: Option<&AttachFailed>,
        interface: &str,
        ifindex: u32,
        e: &DataplaneError,
        now: Instant,
    ) -> AttachFailed {
        let wait = match previous.filter(|p| p.ifindex == ifindex) {
            Some(p) => REATTACH.after(p.wait),
            None => REATTACH.first(),
        };
        AttachFailed {
            interface: interface.to_owned(),
            ifindex,
            reason: error_chain(e),
            retry_at: (!needs_a_capability(e)).then(|| now + wait),
            wait,
        }
    }
}

/// Is a lost interface, now device `ifindex`, to be attached again at `now`, its last failure
/// being `failed`? Yes without one, or on another device; on the same device once its retry is
/// due (never after EPERM: [`AttachFailed::after`]).
fn reattach_due(failed: Option<&AttachFailed>, ifindex: u32, now: Instant) -> bool {
    match failed {
        Some(f) if f.ifindex == ifindex => f.retry_at.is_some_and(|at| now >= at),
        _ => true,
    }
}

/// Did the kernel refuse an attach for want of a capability (EPERM: `BPF_LINK_CREATE` after
/// the controller dropped its capabilities, on a kernel older than 5.19)? That stays so until a
/// restart; any other failure may pass.
fn needs_a_capability(e: &DataplaneError) -> bool {
    matches!(
        e,
        DataplaneError::Attach {
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }),
            ..
        } if io_error.raw_os_error() == Some(libc::EPERM)
    )
}

/// How the logs name the build of an edgelb at the other end of a handover that does not say
/// it ([`Response::build`], [`Request::Handover`]).
const UNSAID_BUILD: &str = "an older edgelb (which does not say its build)";

/// Runs the balancer with the config at `path` until SIGINT/SIGTERM, `edgelb stop` or a
/// takeover. With `takeover`, an edgelb already running with the same admin socket hands over
/// its listening sockets and the data plane first (see [`Request::Handover`]).
pub fn run(path: &Path, takeover: bool) -> Result<(), RunError> {
    // Before any thread starts: a panic anywhere is logged (in the log's format) and counted.
    crate::panics::install_hook();
    // Sockets from the service manager (socket activation) are taken first, so that they have an
    // owner whatever happens next.
    let mut inherited = crate::proxy::inherited::Inherited::from_env()?;
    // Signal handlers next: a SIGHUP (a reload) or SIGTERM arriving while edgelb starts (loading
    // the program, a takeover's handover) waits for the loop instead of killing the process by
    // the default action.
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(RunError::Signals)?;
    let (mut cfg, mut cfg_sha256) = Config::load_hashed(path)?;
    if takeover {
        test_pause("takeover-loaded");
    }
    raise_limits();
    let (mut mtus, mut link_warnings) = start_checks(&cfg)?;
    // Only a valid config takes over, and only once the kernel has taken this binary's program
    // (it is loaded here, beside the running one): a bad file or a refused program leaves the
    // running edgelb alone.
    let (pin_dir, shape) =
        (cfg.node.pin_dir.clone(), TableShape::for_flows(cfg.node.conntrack_flows_per_cpu));
    // Beside the running edgelb, no pin changes until it has handed over for good: until the
    // commit it may take back over, and its next restart must find its own maps pinned.
    let early = if takeover { Some(Dataplane::load_beside(Some(&pin_dir), shape)?) } else { None };
    // Stopped while loading: give up before the running edgelb pauses for a handover.
    if takeover && stop_requested(&mut signals) {
        return Err(RunError::TakeoverInterrupted);
    }
    let mut handed_metrics = None;
    let mut drains = Vec::new();
    let mut down = Vec::new();
    // The running edgelb's VIPs, to carry its drains and verdicts over as a reload would; none
    // from an older edgelb (or when nothing was handed over).
    let mut handed_vips = None;
    let mut without_vips = false;
    // The build of the edgelb that handed over (none from an older one), for the log.
    let mut handed_build: Option<String> = None;
    let mut handover = if takeover {
        match admin::handover(&cfg.node.admin_socket).map_err(RunError::Takeover)? {
            None => {
                info!(admin = %cfg.node.admin_socket.display(), "--takeover: no edgelb answers there; starting afresh");
                None
            }
            Some(h) => {
                info!(
                    sockets = h.sockets.len(),
                    from = h.build.as_deref().unwrap_or(UNSAID_BUILD),
                    "--takeover: the running edgelb handed over its listening sockets and stopped its controller"
                );
                handed_build = h.build.clone();
                // Returning an error drops the connection uncommitted: the running edgelb
                // takes back over.
                if let Some((newer, sha256)) =
                    config_at_handover(path, &cfg, &cfg_sha256, h.config_sha256.as_deref())?
                {
                    (cfg, cfg_sha256) = (newer, sha256);
                    (mtus, link_warnings) = start_checks(&cfg)?;
                }
                test_pause("takeover-handed");
                drains = h.drains;
                down = h.down;
                without_vips = h.vips.is_none();
                handed_vips = h.vips;
                for (s, fd) in h.sockets {
                    match s.kind {
                        SocketKind::L7 => inherited.adopt(fd)?,
                        SocketKind::Metrics => handed_metrics = Some((s.addr, fd)),
                        SocketKind::Unknown => warn!(
                            addr = %s.addr,
                            "the running edgelb handed over a socket of a kind this edgelb does not know (a later build's?): closed"
                        ),
                    }
                }
                Some(h.conn)
            }
        }
    } else {
        None
    };
    // The admin socket first: if another controller already runs, stop before touching anything.
    // Capabilities are per thread, so everything privileged happens on this thread first (binding
    // sockets, loading and attaching programs), then capabilities are dropped, and only then are
    // the helper threads started: they inherit nothing.
    // Taking over, in place of the running edgelb's socket, which still listens: commands
    // reach one process or the other throughout, unless this start fails (docs/ARCHITECTURE.md,
    // "Takeover").
    let admin_listener = match &handover {
        Some(_) => admin::bind_over(&cfg.node.admin_socket),
        None => admin::bind(&cfg.node.admin_socket),
    }
    .map_err(|error| RunError::Admin { path: cfg.node.admin_socket.clone(), error })?;
    // The socket was free, but a controller may run without it: its descriptors of the pinned
    // maps tell (the one that handed over holds them too, and is on its way out).
    if handover.is_none()
        && let Ok(holders) = crate::dataplane::pin_holders(&cfg.node.pin_dir)
        && !holders.is_empty()
    {
        let _ = std::fs::remove_file(&cfg.node.admin_socket);
        let holders: Vec<String> = holders.iter().map(ToString::to_string).collect();
        return Err(RunError::DataplaneHeld {
            holders: holders.join(", "),
            pin_dir: cfg.node.pin_dir.clone(),
            admin: cfg.node.admin_socket.clone(),
        });
    }
    let metrics_listener = match cfg.metrics {
        Some(addr) => Some((
            addr,
            match handed_metrics.take() {
                // The very socket the previous process served: no scrape is refused.
                Some((a, fd)) if a == addr => std::net::TcpListener::from(fd),
                _ => {
                    crate::metrics::bind(addr).map_err(|error| RunError::Metrics { addr, error })?
                }
            },
        )),
        None => None,
    };
    // A metrics socket handed over that this config has no use for is closed now: kept, it
    // would complete scrapers' handshakes that nobody answers.
    drop(handed_metrics);
    // Kept to hand over to a later `--takeover`.
    let metrics_socket: Option<(std::net::SocketAddr, std::net::TcpListener)> =
        match &metrics_listener {
            Some((addr, l)) => Some((
                *addr,
                l.try_clone().map_err(|error| RunError::Metrics { addr: *addr, error })?,
            )),
            None => None,
        };
    // Listeners before the maps: an address that cannot be bound stops edgelb before it touches
    // the data plane.
    let l7 = if crate::proxy::l7_listeners(&cfg).is_empty() {
        if !inherited.is_empty() {
            warn!(
                "listening sockets were passed (service manager or previous edgelb) but no VIP is L7; unused"
            );
        }
        None
    } else {
        Some(
            crate::proxy::Proxy::bind(&cfg, cfg.node.l7_thread_count(), &inherited)
                .map_err(RunError::Proxy)?,
        )
    };
    // The proxy threads hold their own descriptors of inherited sockets.
    drop(inherited);
    if let Some(conn) = &mut handover {
        if stop_requested(&mut signals) {
            // Dropping the connection uncommitted hands everything back.
            return Err(RunError::TakeoverInterrupted);
        }
        // Past this point the previous edgelb will not take back over if this one fails, so
        // everything that can fail without touching the data plane is done by now.
        admin::commit(conn).map_err(|e| {
            RunError::Takeover(AdminError::Exchange {
                path: cfg.node.admin_socket.clone(),
                reason: format!("the running edgelb took back over: {e}"),
            })
        })?;
    }
    let (admin_tx, admin_rx) = mpsc::channel();
    let (scrape_tx, scrape_rx) = mpsc::channel();

    let dp = match early {
        // Loaded before the handover, while the previous controller still wrote the maps (a
        // health change, a drain): read them again now that it has stopped. Committed, this
        // process's maps take the pins (those of another layout, replacing the old ones).
        Some(mut dp) if handover.is_some() => {
            dp.publish_pins()?;
            dp.refresh()?;
            dp
        }
        Some(mut dp) => {
            dp.publish_pins()?;
            dp
        }
        None => Dataplane::load_with_table(Some(&pin_dir), shape)?,
    };
    if dp.adopted() {
        info!(pin_dir = %cfg.node.pin_dir.display(), "a previous edgelb left the data plane running: adopting it");
    }
    let (health_tx, health_rx) = mpsc::channel();
    let checked = Checked::new(&cfg);
    let mut ctl = Controller {
        // Absolute, as the operator's commands name it from wherever they run: `status` says
        // which file runs, and a refused reload which file to edit.
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        cfg,
        cfg_sha256,
        dp,
        checker: Checker::new(health_tx),
        health_rx,
        checked,
        admin_tx: admin_tx.clone(),
        admin_rx,
        scrape_rx,
        metrics: Metrics::new(),
        rates: Rates::default(),
        last_packets: HashMap::new(),
        next_sample: Instant::now(),
        proxy: None,
        verdicts: Verdicts::default(),
        admin: None,
        admin_retry: None,
        admin_path_id: None,
        metrics_socket,
        metrics_serving: None,
        checks_missing: 0,
        lost: Vec::new(),
        renamed: Vec::new(),
        interfaces_untold: Lookups::Fine,
        link_warnings: Vec::new(),
        attach_failed: Vec::new(),
        links: links::LinkWatch::new(mtus),
        handed_over: false,
        reloads_forwarded: None,
    };
    // The counters of every configured backend exist from the start, at 0.
    ctl.metrics.retain(&ctl.cfg);
    // The previous edgelb's runtime drains stay: an upgrade must not put a backend taken out
    // for maintenance back into service. Its dead backends stay out too, until this process's
    // checks (which start from these verdicts) see them rise. From its VIPs, they are carried
    // over to this config as a reload to it would carry them (a VIP renamed, or moved to
    // another port; backends added held until their check passes); then what this config no
    // longer has is dropped.
    let handed_state = !drains.is_empty() || !down.is_empty();
    if handed_state {
        info!(
            drains = drains.len(),
            down = down.len(),
            "--takeover: keeping the running edgelb's drains and health verdicts"
        );
    }
    for d in drains {
        ctl.verdicts.drain(d.vip, crate::admin::BackendRef { address: d.backend, port: d.port });
    }
    for d in down {
        ctl.verdicts.set_health(&d.vip, d.backend, false);
    }
    let carried = match &handed_vips {
        Some(old) => ctl.verdicts.carry_over(old, &ctl.cfg),
        None => verdicts::CarriedOver {
            forgotten: ctl.verdicts.reconcile(&ctl.cfg),
            ..Default::default()
        },
    };
    // Said as a warning only when there were drains or verdicts it may have lost.
    if without_vips && handed_state {
        warn!(
            "--takeover: the running edgelb (an older one) handed over no VIPs: the drains and health verdicts of a VIP this config renames or moves to another port are not kept, and a backend this config adds takes flows before its first probe"
        );
    } else if without_vips {
        info!(
            "--takeover: the running edgelb (an older one) handed over no VIPs: a backend this config adds takes flows before its first probe"
        );
    } else if handed_vips.iter().flatten().any(|v| v.fail_open.is_none()) {
        info!(
            "--takeover: the running edgelb (an older one) handed over no fail-open state: a VIP none of whose backends was alive and taking flows (by this config's weights, unless it handed its own) is taken to have been failing open, and a backend this config adds to it waits for its check"
        );
    }
    log_carried("--takeover", &carried, &ctl.cfg);
    // A data plane ran here before this process: its maps adopted, or its links pinned even
    // when the maps were not (another layout or table size makes fresh ones). A start that
    // fails must leave it forwarding, not remove links that were balancing before it began.
    let adopted = ctl.dp.adopted() || ctl.dp.links_pinned();
    let taking_over = handover.is_some();
    let start = || -> Result<(), RunError> {
        // Maps first, then attach: the first packet already sees the whole config.
        let report = ctl.apply()?;
        info!(maps = %report, "maps in line with the config");
        for iface in ctl.cfg.node.interfaces.clone() {
            let mode = ctl.dp.attach(&iface, ctl.cfg.node.xdp_mode)?;
            info!(interface = %iface, mode, "XDP balancer attached");
        }
        let gro = gro_warnings_now(&ctl.cfg, ctl.dp.attached());
        for w in &gro {
            warn!("{w}");
        }
        link_warnings.extend(gro.iter().cloned());
        ctl.links.gro = gro;
        ctl.link_warnings = std::mem::take(&mut link_warnings);
        // An interface the previous process balanced on that this config no longer lists:
        // its link goes (and the program with it), rather than run on with maps nobody keeps.
        for iface in ctl.dp.remove_unused_links()? {
            info!(interface = %iface, "not in node.interfaces any more: XDP detached");
        }
        // A stop signal during a takeover's start: fail as a start does, before this process
        // serves anything (its proxy would accept on the shared sockets, its metrics answer),
        // so that the previous edgelb takes the data plane back instead of handing over to a
        // process about to stop.
        if taking_over && stop_requested(&mut signals) {
            return Err(RunError::TakeoverInterrupted);
        }
        drop_capabilities();
        // Its writer thread started now, unprivileged as well.
        crate::logging::start_queue();

        // Unprivileged from here on, helper threads included.
        let admin_path = ctl.cfg.node.admin_socket.clone();
        ctl.admin_path_id = admin::path_identity(&admin_path);
        ctl.admin = Some(
            admin::serve(admin_listener, admin_tx)
                .map_err(|error| RunError::Admin { path: admin_path, error })?,
        );
        if let Some((addr, l)) = metrics_listener {
            ctl.metrics_serving = Some(
                crate::metrics::serve(l, scrape_tx)
                    .map_err(|error| RunError::Metrics { addr, error })?,
            );
            info!(%addr, "metrics on http://{addr}/metrics");
        }
        if let Some(bound) = l7 {
            let eff = ctl.effective();
            let proxy =
                crate::proxy::Proxy::start_bound(&eff, &ctl.cfg, bound, ctl.metrics.l7.clone())
                    .map_err(RunError::Proxy)?;
            ctl.proxy = Some(proxy);
        }
        Ok(())
    };
    if let Err(e) = start() {
        // No controller will run: what this start attached must not balance on without one
        // (no health checks, no admin socket), unless it was running before this process.
        if let Some(admin) = ctl.admin.take() {
            admin.stop();
        }
        let _ = std::fs::remove_file(&ctl.cfg.node.admin_socket);
        if handover.is_none() && !adopted {
            let pin_dir = ctl.cfg.node.pin_dir.clone();
            drop(ctl);
            match Dataplane::teardown(&pin_dir) {
                Ok(_) => error!("start failed: the data plane it had set up is removed"),
                Err(t) => {
                    error!(error = %t, pin_dir = %pin_dir.display(), "start failed, and removing the data plane it had set up failed too: `edgelb stop` removes it")
                }
            }
        } else if handover.is_none() {
            error!(pin_dir = %ctl.cfg.node.pin_dir.display(), "start failed after taking over the data plane a previous edgelb left: it keeps forwarding, with this config's maps but no controller (no health checks); fix the cause and `edgelb run` again, or `edgelb stop`");
        }
        return Err(e);
    }
    ctl.reconcile_checks();
    info!(checks = ctl.checker.len(), admin = %ctl.cfg.node.admin_socket.display(), build = crate::build::VERSION_LINE, "edgelb running");
    if let Some(mut conn) = handover {
        // The previous process stops accepting and drains once it reads this.
        if let Err(e) = std::io::Write::write_all(&mut conn, admin::READY) {
            warn!(error = %e, "--takeover: telling the previous edgelb that this one serves");
        } else {
            // Both builds, for the operator to see that an upgrade swapped the binary.
            info!(
                "--takeover: took over from {}; this is {}",
                handed_build.as_deref().unwrap_or(UNSAID_BUILD),
                crate::build::VERSION_LINE
            );
        }
    }

    let exit = loop {
        match ctl.serve(&mut signals) {
            Exit::Handover(reply, answer, binds_over, build) => {
                if ctl.hand_over(reply, answer, binds_over, build.as_deref(), &mut signals) {
                    return Ok(());
                }
            }
            exit => break exit,
        }
    };
    let socket = ctl.cfg.node.admin_socket.clone();
    let pin_dir = ctl.cfg.node.pin_dir.clone();
    ctl.drain_proxy(Some(&mut signals), matches!(exit, Exit::Teardown), DrainKind::Stop);
    drop(ctl.checker);
    let result = match exit {
        Exit::Handover(..) => unreachable!("returned above"),
        Exit::Detach => {
            say_detached(&mut ctl.dp, &pin_dir);
            Ok(())
        }
        // The links this process holds open first: with their pins removed, those descriptors
        // alone would keep XDP on the interfaces until the process is gone, after `edgelb
        // stop` (which waits for the admin socket to go) has returned.
        Exit::Teardown => {
            ctl.dp.release_links();
            match Dataplane::teardown(&pin_dir) {
                Ok(others) => {
                    info!("data plane removed: XDP detached, pins deleted");
                    for path in others {
                        warn!(path = %path.display(), "left in the pin directory: not edgelb's");
                    }
                    Ok(())
                }
                Err(e) => Err(DataplaneError::Pin {
                    step: "tearing down the data plane pinned in",
                    path: pin_dir,
                    reason: e.to_string(),
                }),
            }
        }
    };
    // The admin thread writes the answers the controller gave it, `stop`'s included, before
    // the process exits: requests it still holds for the controller are turned away (their
    // channel dropped), and what it is writing gets the client's own deadline to be read.
    ctl.admin_rx = mpsc::channel().1;
    if let Some(admin) = ctl.admin.take()
        && !admin.finish(admin::CLIENT_WAIT + Duration::from_secs(1))
    {
        warn!("exiting with an admin client still being answered (it stopped reading)");
    }
    // Last: `edgelb stop` waits for the socket to go, so it returns once everything is done.
    let _ = std::fs::remove_file(&socket);
    Ok(result?)
}

/// Says, at a stop that leaves the data plane running (SIGTERM, `stop --detach`, a handover
/// cut short while this process still had the data plane), what goes on running: only pinned
/// XDP links outlive this process, and a link whose pin was removed is held by it alone. Such
/// pins are made again first, once more ([`unpinned_at_exit`]); the interfaces whose links
/// still are not pinned are named in a warning, as XDP leaves them when the process exits (it
/// used to say that the data plane kept running).
fn say_detached(dp: &mut Dataplane, pin_dir: &Path) {
    let unpinned = unpinned_at_exit(dp);
    if unpinned.is_empty() {
        info!(pin_dir = %pin_dir.display(), "controller stopped; the data plane keeps running (`edgelb stop` removes it)");
    } else {
        warn!(pin_dir = %pin_dir.display(), interfaces = ?unpinned, "controller stopped; the data plane keeps running, except on the interfaces named: their XDP links were held open by this process alone (their pins removed, and not made again), so XDP leaves them as it exits; the next start attaches them afresh (`edgelb stop` removes the data plane)");
    }
}

/// The interfaces XDP leaves when this process exits, a stop leaving the data plane running:
/// those whose links it holds open but are not pinned ([`Dataplane::unpinned_links`]), after
/// one more try to pin them again ([`Dataplane::repin_links`], those that failed before too).
fn unpinned_at_exit(dp: &mut Dataplane) -> Vec<String> {
    dp.repin_links(true);
    dp.unpinned_links()
}

/// Logs what carrying the drains and health verdicts over to `cfg` did ([`Verdicts::carry_over`])
/// at a reload or a takeover (`what`).
fn log_carried(what: &str, c: &verdicts::CarriedOver, cfg: &Config) {
    for (from, to) in &c.renamed {
        info!(vip = %to, was = %from, "{what}: VIP renamed: its drains and health verdicts carry over");
    }
    for (vip, backend) in &c.held {
        info!(%vip, %backend, "{what}: backend added: it joins the ring once its health check has passed `rise` times");
    }
    for (of, vip, from, to) in &c.moved {
        info!(%vip, was = %from, backend = %to, drain = of.as_deref().unwrap_or("every VIP"), "{what}: VIP moved to another port: its drain of the backend follows");
    }
    let mut vip_gone = false;
    for (vip, backend) in &c.forgotten {
        let reason = verdicts::why_forgotten(cfg, vip.as_deref(), *backend);
        vip_gone |= verdicts::vip_gone(cfg, vip.as_deref());
        warn!(%backend, vip = vip.as_deref().unwrap_or("every VIP"), "{what}: drain forgotten: {reason}");
    }
    if vip_gone {
        warn!("{what}: {}", verdicts::RENAME_RULE);
    }
}

/// The interfaces' MTUs ([`links::link_mtus`]), and the MTU warnings said of them.
type MtusSaid = (Vec<(String, u32)>, Vec<String>);

/// What `run` checks of the config it starts with before it touches anything
/// ([`preflight`]), and says of it: the MTU and caution warnings. Returns the interfaces' MTUs
/// and the warnings said, for the controller to say only changes later.
fn start_checks(cfg: &Config) -> Result<MtusSaid, RunError> {
    preflight(cfg)?;
    // Over netlink, in this network namespace: sysfs may show another's.
    let mtus = links::link_mtus(cfg, &[]);
    let link_warnings = mtu_mismatches(cfg, &mtus);
    for w in &link_warnings {
        warn!("{w}");
    }
    warn_of_cautions(cfg);
    Ok((mtus, link_warnings))
}

/// The config a takeover goes on with, once the running edgelb has handed over, telling the
/// file as it was last applied there (`running`, its [`crate::config::content_hash`]) from the
/// file this process loaded at its start (`loaded`, hash `loaded_sha256`): an `edgelb reload`
/// (or SIGHUP) that reached the running edgelb while this process loaded its program was
/// answered "reloaded", and running the file as read before that edit would undo it without a
/// word. When the two differ, the file is read again: unchanged since this process read it (it
/// was edited for this takeover), nothing changes (`None`); changed, it is what this process
/// runs, validated as at a start. A file that now fails, or that changes what this start has
/// already set up from the file as it was (`node.pin_dir`, `node.admin_socket`,
/// `node.conntrack_flows_per_cpu`: the program was loaded beside the running one with them),
/// gives the takeover up (an error) before the commit, so that the running edgelb takes back
/// over. An older edgelb says no hash (`running` none): this process goes on with the file as
/// it read it, and says that it could not check.
fn config_at_handover(
    path: &Path,
    loaded: &Config,
    loaded_sha256: &str,
    running: Option<&str>,
) -> Result<Option<(Config, String)>, RunError> {
    let Some(running) = running else {
        info!(
            "--takeover: the running edgelb (an older one) does not say which config it runs: a reload it took while this process started cannot be told, and this process runs the file as it read it at its start"
        );
        return Ok(None);
    };
    if running == loaded_sha256 {
        return Ok(None);
    }
    let changed = "the config file changed while this process started (the running edgelb was reloaded meanwhile?)";
    let (now, sha256) = Config::load_hashed(path).map_err(|e| {
        RunError::TakeoverConfig(format!(
            "{changed}, and it now fails: {e}; fix it and take over again"
        ))
    })?;
    if sha256 == loaded_sha256 {
        return Ok(None);
    }
    let (a, b) = (&loaded.node, &now.node);
    let mut set_up = Vec::new();
    if a.pin_dir != b.pin_dir {
        set_up.push("node.pin_dir");
    }
    if a.admin_socket != b.admin_socket {
        set_up.push("node.admin_socket");
    }
    if a.conntrack_flows_per_cpu != b.conntrack_flows_per_cpu {
        set_up.push("node.conntrack_flows_per_cpu");
    }
    if !set_up.is_empty() {
        return Err(RunError::TakeoverConfig(format!(
            "{changed}, in {}, which this start had already set up from the file as it read it; take over again",
            set_up.join(", ")
        )));
    }
    warn!(
        path = %path.display(),
        "--takeover: {changed}: running the file as it is now, not as it was read at the start"
    );
    Ok(Some((now, sha256)))
}

/// A test's pause at `point` of a start, `EDGELB_TEST_PAUSE=<point>:<ms>` (a test-only hook,
/// as the other `EDGELB_TEST_*` variables are): said in the log, then `ms` asleep, so that a
/// lifecycle test can act within a window otherwise too short to hit (a reload while a
/// takeover starts). The points: `takeover-loaded` (a takeover's config loaded, its program not
/// yet), `takeover-handed` (the running edgelb has handed over; the admin socket is not yet
/// bound). Unset, or naming another point, nothing happens.
fn test_pause(point: &str) {
    let Some(value) = std::env::var_os("EDGELB_TEST_PAUSE") else { return };
    let Some((at, ms)) = value.to_str().and_then(|v| v.split_once(':')) else { return };
    let Ok(ms) = ms.parse::<u64>() else { return };
    if at == point {
        info!(point, ms, "test hook (EDGELB_TEST_PAUSE): pausing");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Whether SIGINT or SIGTERM has arrived (consuming the pending signals). A SIGHUP is raised
/// again for the loop, which reloads.
fn stop_requested(signals: &mut signal_hook::iterator::Signals) -> bool {
    // Collected first: raised while the iterator runs, SIGHUP would come round again.
    let pending: Vec<i32> = signals.pending().collect();
    let mut stop = false;
    for sig in pending {
        if sig == SIGHUP {
            let _ = signal_hook::low_level::raise(SIGHUP);
        } else {
            info!(signal = sig, "signal received during the takeover");
            stop = true;
        }
    }
    stop
}

/// What would otherwise fail only after the data plane was touched (or, with `--takeover`, after
/// the running edgelb stopped for good): an interface that is not there (a typo would leave the
/// maps written and nothing attached), an io_uring the kernel refuses (the L7 proxy's listeners
/// would be left unanswered), a bpffs that would not outlive this process
/// ([`crate::dataplane::ensure_bpffs`]). Checked before anything else, privileged or not.
fn preflight(cfg: &Config) -> Result<(), RunError> {
    if !crate::proxy::l7_listeners(cfg).is_empty() {
        crate::proxy::probe_io_uring(cfg.node.l7_thread_count()).map_err(RunError::Proxy)?;
    }
    for name in &cfg.node.interfaces {
        if !crate::dataplane::interface_exists(name)? {
            return Err(RunError::Interface(name.clone()));
        }
    }
    // Before the admin socket and a takeover's handover: a bpffs this process could not keep
    // (one it would mount in a mount namespace of its own) stops the start with nothing touched.
    crate::dataplane::ensure_bpffs().map_err(|reason| DataplaneError::Pin {
        step: "preparing the pin directory",
        path: cfg.node.pin_dir.clone(),
        reason,
    })?;
    Ok(())
}

/// The attached interfaces lost and renamed, as a look for them finds them
/// ([`interfaces_seen`]), and those whose state could not be told.
#[derive(Debug)]
struct InterfacesSeen {
    /// XDP is no longer on them ([`InterfaceState::Lost`]).
    lost: Vec<String>,
    /// Renamed, each with its new name ([`InterfaceState::Renamed`]).
    renamed: Vec<(String, String)>,
    /// Not told this time ([`InterfaceState::Unknown`]), each with the lookup's error.
    untold: Vec<(String, std::io::Error)>,
}

/// The interfaces lost and renamed after a look at where each stands (`states`), the last
/// ones known being `lost` and `renamed`: one whose state could not be told keeps its last,
/// neither newly lost nor back. A failed lookup (out of descriptors: it opens a socket) said
/// nothing of the interface, and taken for "gone" had a healthy one said LOST.
fn interfaces_seen(
    states: Vec<(String, InterfaceState)>,
    lost: &[String],
    renamed: &[(String, String)],
) -> InterfacesSeen {
    let mut seen = InterfacesSeen { lost: Vec::new(), renamed: Vec::new(), untold: Vec::new() };
    for (interface, state) in states {
        match state {
            InterfaceState::Attached => {}
            InterfaceState::Lost => seen.lost.push(interface),
            InterfaceState::Renamed(now) => seen.renamed.push((interface, now)),
            InterfaceState::Unknown(e) => {
                if lost.contains(&interface) {
                    seen.lost.push(interface.clone());
                }
                seen.renamed.extend(renamed.iter().filter(|(was, _)| *was == interface).cloned());
                seen.untold.push((interface, e));
            }
        }
    }
    seen
}

/// Logs what the file says that is accepted but likely not what was meant ([`Config::cautions`]),
/// at each start and reload, so that it is heard where edgelb's log is read.
fn warn_of_cautions(cfg: &Config) {
    for c in &cfg.cautions {
        warn!("{c}");
    }
}

/// The interfaces where GRO on stalls uploads (see [`gro_warnings`]), from their GRO now.
fn gro_warnings_now(cfg: &Config, attached: &[(String, &'static str)]) -> Vec<String> {
    let gro_on = |i: &str| crate::dataplane::netlink::gro_on(i).unwrap_or(false);
    gro_warnings(cfg, attached, gro_on)
}

/// Whether the warnings `new` are those `last` logged, in whatever order: a reload then logs
/// nothing again (a start logs them all).
fn same_warnings(last: &[String], new: &[String]) -> bool {
    last.iter().collect::<BTreeSet<_>>() == new.iter().collect::<BTreeSet<_>>()
}

/// The interfaces where XDP runs in generic mode with GRO on, when some VIP encapsulates, each
/// with what to do. Generic XDP runs after the kernel's software GRO, which the kernel leaves on
/// when it installs a generic program: TCP segments merged into one packet larger than the MTU
/// no longer fit the path once encapsulated, and each merged upload is refused again. Without an
/// encapsulating VIP nothing grows past the MTU, and turning GRO off would only cost the L7
/// proxy (whose sockets take merged segments whole) throughput.
fn gro_warnings(
    cfg: &Config,
    attached: &[(String, &'static str)],
    gro_on: impl Fn(&str) -> bool,
) -> Vec<String> {
    if !cfg.vips.iter().any(|v| v.forwarding == Forwarding::Ipip) {
        return Vec::new();
    }
    attached
        .iter()
        .filter(|(interface, mode)| *mode == "generic" && gro_on(interface))
        .map(|(interface, _)| {
            format!(
                "XDP runs in generic mode on {interface}, after the kernel merges received TCP segments (GRO): merged packets pass node.mtu once encapsulated and are refused, which stalls uploads through ipip VIPs; turn GRO off: `ethtool -K {interface} gro off`"
            )
        })
        .collect()
}

/// Why `node.mtu` is wrong for the interfaces' own MTUs (`links`), if it is, when some VIP
/// encapsulates (which makes packets larger): above an interface's MTU, or 0 (no check), a
/// full-size client packet is encapsulated past what the NIC sends, and it is dropped
/// silently (by the driver, or the next hop) instead of answered with frag-needed /
/// packet-too-big so that the client sends smaller ones.
fn mtu_mismatches(cfg: &Config, links: &[(String, u32)]) -> Vec<String> {
    if !cfg.vips.iter().any(|v| v.forwarding == Forwarding::Ipip) {
        return Vec::new();
    }
    let mtu = cfg.node.mtu;
    links
        .iter()
        .filter(|&&(_, link)| mtu == 0 || mtu > link)
        .map(|(name, link)| {
            let now = if mtu == 0 { "0 (no check)".to_owned() } else { mtu.to_string() };
            format!(
                "node.mtu is {now}, and interface {name} carries at most {link} bytes: an encapsulated packet above {link} bytes is dropped without an ICMP error, so clients never learn to send smaller ones; set node.mtu = {link} (or the smaller path MTU towards the backends)"
            )
        })
        .collect()
}

/// Whether `a` and `b` name one file: the same inode when both exist (however spelled: a
/// symlink, `..`, another working directory), else the same absolute path.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// The refusal of a reload of `path`, the file edgelb runs with (absolute), whose `changes`
/// ([`restart_needed`]) only a restart applies. It names the file, as the takeover it suggests
/// must be given it: an operator who edited another copy, or runs edgelb with a file other than
/// the default, sees which one was read.
fn restart_refusal(path: &Path, changes: &[String]) -> String {
    format!(
        "reload rejected, running config kept: {} needs a restart for {} ({})",
        path.display(),
        changes.join("; "),
        restart_advice(path, changes)
    )
}

/// What a reload from `old` to `new` cannot apply in place, each named with its change, for the
/// refusal to say what to undo or restart for. Order does not count: interfaces and L7 VIPs
/// listed in another order are the same set. An L7 VIP's listeners are bound, for its address,
/// port and mode, when edgelb starts (below port 1024 that takes a privilege it has dropped).
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    /// Says `key` changed from `a` to `b`, if it did, each value `shown` as an operator would
    /// write it (not Rust's debug output, `Some(..)` and quoted paths).
    fn changed<T: PartialEq>(
        out: &mut Vec<String>,
        key: &str,
        (a, b): (&T, &T),
        shown: impl Fn(&T) -> String,
    ) {
        if a != b {
            out.push(format!("{key} ({} → {})", shown(a), shown(b)));
        }
    }
    fn or_unset<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map_or("unset".to_owned(), ToString::to_string)
    }
    let (o, n) = (&old.node, &new.node);
    let mut out = Vec::new();
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    changed(&mut out, "node.interfaces", (&sorted(&o.interfaces), &sorted(&n.interfaces)), |v| {
        format!("[{}]", v.join(", "))
    });
    changed(&mut out, "node.xdp_mode", (&o.xdp_mode, &n.xdp_mode), |m| {
        format!("{m:?}").to_lowercase()
    });
    changed(&mut out, "node.pin_dir", (&o.pin_dir, &n.pin_dir), |p| p.display().to_string());
    changed(&mut out, "node.admin_socket", (&o.admin_socket, &n.admin_socket), |p| {
        p.display().to_string()
    });
    changed(
        &mut out,
        "node.conntrack_flows_per_cpu",
        (&o.conntrack_flows_per_cpu, &n.conntrack_flows_per_cpu),
        or_unset,
    );
    // As written: unset is one per CPU, counted at the start, and stays unset whatever the CPU
    // count has become since (a restart would count anew).
    changed(&mut out, "node.l7_threads", (&o.l7_threads, &n.l7_threads), or_unset);
    changed(&mut out, "[metrics] listen", (&old.metrics, &new.metrics), |m| {
        m.map_or("disabled".to_owned(), |a| a.to_string())
    });
    let l7 = |cfg: &Config| -> std::collections::BTreeMap<
        String,
        (std::net::SocketAddr, crate::config::L7Mode),
    > {
        cfg.vips
            .iter()
            .filter_map(|v| {
                Some((
                    v.name.clone(),
                    (std::net::SocketAddr::new(v.address, v.port), v.l7.as_ref()?.mode),
                ))
            })
            .collect()
    };
    let (before, after) = (l7(old), l7(new));
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    // A VIP of that name the other config forwards in XDP: the VIP changed forwarding.
    let xdp = |cfg: &Config, name: &str| {
        let v = cfg.vips.iter().find(|v| v.name == name && v.l7.is_none())?;
        Some(format!("{:?}", v.forwarding).to_lowercase())
    };
    let bound = "(L7 listeners are bound at start)";
    for name in names {
        match (before.get(name), after.get(name)) {
            (Some(_), None) => out.push(match xdp(new, name) {
                Some(f) => format!("VIP `{name}`: forwarding l7 → {f} {bound}"),
                None => format!("L7 VIP `{name}` removed"),
            }),
            (None, Some((addr, _))) => out.push(match xdp(old, name) {
                Some(f) => format!("VIP `{name}`: forwarding {f} → l7 {bound}"),
                None => format!("L7 VIP `{name}` on {addr} added"),
            }),
            (Some((a, am)), Some((b, bm))) if (a, am) != (b, bm) => {
                let mode = |m: &crate::config::L7Mode| format!("{m:?}").to_lowercase();
                out.push(format!("L7 VIP `{name}`: {a} {} → {b} {}", mode(am), mode(bm)))
            }
            _ => {}
        }
    }
    out
}

/// What to do about a reload of `path` refused for `restart` ([`restart_needed`]): a takeover restarts
/// without refusing a connection; with a new `node.conntrack_flows_per_cpu` it cannot carry
/// the connection tables over (their size is the maps' layout), and what that costs is said;
/// a new `node.xdp_mode` or `node.pin_dir` (said only when among the changes) takes a stop,
/// which detaches XDP, then a start.
fn restart_advice(path: &Path, restart: &[String]) -> String {
    let mut advice = format!(
        "`edgelb run -c {} --takeover` restarts without refusing a new connection",
        path.display()
    );
    if restart.iter().any(|r| r.starts_with("node.conntrack_flows_per_cpu ")) {
        advice.push_str(&format!(
            ", but it cannot carry the connection tables over to another size: every map starts fresh, and {}",
            crate::dataplane::FRESH_TABLES_COST
        ));
    }
    if restart.iter().any(|r| r.starts_with("node.xdp_mode ")) {
        advice.push_str("; a new node.xdp_mode takes `edgelb stop`, which detaches, then a start");
    }
    // The new process would find the interfaces held through the old directory's links.
    if restart.iter().any(|r| r.starts_with("node.pin_dir ")) {
        advice.push_str(
            "; a new node.pin_dir takes `edgelb stop`, which removes the data plane pinned in the old one, then a start",
        );
    }
    advice
}

/// What a reload did, for the operator: the VIPs now served and what changed in the maps (the
/// L7 pools, timeouts and routes are re-published whole at every reload).
fn reload_summary(cfg: &Config, r: &crate::dataplane::ApplyReport) -> String {
    let l7 = cfg.vips.iter().filter(|v| v.l7.is_some()).count();
    let xdp = cfg.vips.len() - l7;
    let maps = if r.is_empty() {
        "the XDP maps needed no change".to_owned()
    } else {
        format!("XDP maps: {r}")
    };
    let pools = if l7 > 0 { "; L7 pools, routes and timeouts re-published" } else { "" };
    format!("{xdp} XDP VIP(s), {l7} L7 VIP(s); {maps}{pools}")
}

/// The L7 backends a reload from `old` to `new` added and removed, each as `VIP address:port`
/// (a VIP's own pool and its routes' pools together; the backends of an L7 VIP added or
/// removed whole included), at most [`CHANGES_SAID`] of each named: `None` if none. The XDP
/// maps' report counts XDP backends only, and a reload that changed only L7 pools said nothing
/// of them.
fn l7_backend_changes(old: &Config, new: &Config) -> Option<String> {
    fn pools(cfg: &Config) -> BTreeSet<(String, std::net::SocketAddr)> {
        cfg.vips
            .iter()
            .filter_map(|v| Some((v, v.l7.as_ref()?)))
            .flat_map(|(v, l7)| {
                v.backends
                    .iter()
                    .chain(l7.routes.iter().flat_map(|r| &r.backends))
                    .map(|b| (v.name.clone(), std::net::SocketAddr::new(b.address, b.port)))
            })
            .collect()
    }
    let (before, after) = (pools(old), pools(new));
    let list = |what: &str, set: Vec<&(String, std::net::SocketAddr)>| {
        let mut said: Vec<String> =
            set.iter().take(CHANGES_SAID).map(|(vip, b)| format!("{vip} {b}")).collect();
        if set.len() > CHANGES_SAID {
            said.push(format!("and {} more", set.len() - CHANGES_SAID));
        }
        (!set.is_empty()).then(|| format!("{what}: {}", said.join(", ")))
    };
    let added = list("L7 backends added", after.difference(&before).collect());
    let removed = list("L7 backends removed", before.difference(&after).collect());
    let both: Vec<String> = added.into_iter().chain(removed).collect();
    (!both.is_empty()).then(|| both.join("; "))
}

/// How many added (and removed) L7 backends a reload's summary names ([`l7_backend_changes`]).
const CHANGES_SAID: usize = 8;

/// Raises the soft limits edgelb outgrows to the hard ones. Open files: every L7 connection
/// holds two descriptors, and the default soft limit (1024 under systemd) would refuse accepts
/// (and the metrics endpoint's) long before `max_connections`. Locked memory: each L7 thread's
/// io_uring is charged to it once the capabilities are dropped (about
/// [`crate::proxy::RING_BYTES`]), and the usual soft limit (8 MiB, 64 KiB in containers) does not
/// hold a thread per CPU on a large host.
fn raise_limits() {
    raise_limit(libc::RLIMIT_NOFILE, "open-file");
    raise_limit(libc::RLIMIT_MEMLOCK, "locked-memory");
}

/// Raises the soft limit of `resource` (`what`, for the log) to its hard limit.
fn raise_limit(resource: rlimit::Resource, what: &str) {
    let Ok(mut lim) = rlimit::get(resource) else { return };
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let from = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    match rlimit::set(resource, &lim) {
        Ok(()) => info!(from, to = lim.rlim_cur, "{what} limit raised"),
        Err(error) => {
            warn!(soft = from, hard = lim.rlim_max, %error, "raising the {what} limit failed")
        }
    }
}

/// Everything privileged is done by now (programs loaded, links attached and pinned, sockets
/// bound), and the maps are used through open fds, which needs no capability. Give them all up,
/// bounding set included, so that a bug in the long-running loop cannot load programs, attach,
/// or use a capability. (The process stays uid 0, and so keeps an owner's access to root's
/// files that are writable where it runs: /proc/sys among them unless the service manager
/// makes them read-only. ARCHITECTURE.md, "Metrics", says what that leaves.)
/// Capabilities are per thread: this must run before any helper thread is started.
fn drop_capabilities() {
    use caps::CapSet;
    let mut result = Ok(());
    for cap in caps::all() {
        if let Err(e) = caps::drop(None, CapSet::Bounding, cap) {
            result = Err(e);
        }
    }
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        if let Err(e) = caps::clear(None, set) {
            result = Err(e);
        }
    }
    match result {
        Ok(()) => info!("all capabilities dropped"),
        Err(e) => warn!(error = %e, "could not drop every capability"),
    }
}

impl Controller {
    /// Hands the listening sockets to the `edgelb run --takeover` that asked (`reply`) and
    /// leaves the data plane to it; returns true when this process is done. The controller
    /// stops first: health checks end (joined) and no map is written any more; the admin
    /// socket keeps listening until the new process binds its own over the path
    /// ([`admin::bind_over`]), and the commands it took meanwhile are answered once the
    /// handover ends ([`Controller::turn_away_queued`], or by this controller after a
    /// take-back). An older edgelb taking over (`binds_over` false: a rollback) binds only where
    /// nobody answers, so for it the path is removed first, as it was before `bind_over`; the
    /// listener still turns away what it took. The sockets stay open in both processes, and
    /// this one keeps accepting and answering scrapes while the new one starts. Once it serves
    /// (or goes quiet after it began writing the maps), this one's L7 proxy stops accepting and
    /// finishes what is in flight, scrapes still answered, and true is returned. If the new one
    /// gives up before touching the data plane, this one takes its controller back up (admin
    /// socket, health checks) and returns false: nothing was lost. If it fails after it began
    /// writing the maps, this one first takes the data plane back ([`Dataplane::reclaim`], then
    /// its config written again) and goes on the same way.
    ///
    /// A stop signal (SIGTERM, SIGINT) while the new one starts cuts the handover short
    /// ([`admin::HandoverCut`]) rather than wait it out (up to twice `HANDOVER_WAIT`): before
    /// the new one's commit, it can no longer commit and this one exits leaving the data plane
    /// as it wrote it; after, the data plane is the new one's and this one exits without
    /// touching it (unless the new one had already failed: then it is taken back first). Either
    /// way the L7 proxy drains as at a stop, and true is returned.
    fn hand_over(
        &mut self,
        reply: mpsc::Sender<Answer>,
        mut answer: Box<Answer>,
        binds_over: bool,
        build: Option<&str>,
        signals: &mut signal_hook::iterator::Signals,
    ) -> bool {
        let (health_tx, health_rx) = mpsc::channel();
        self.checker = Checker::new(health_tx);
        self.health_rx = health_rx;
        // The admin socket stays as it is: the new process binds its own over the path
        // ([`admin::bind_over`]), so that commands meanwhile wait on this listener (its thread
        // follows the handover) rather than find no socket. What they asked is answered once
        // the handover ends: by this controller again after a take-back, or else with a
        // refusal to ask the new process ([`Controller::turn_away_queued`]). An older edgelb
        // taking over would find this listener answering and give up: the path is freed for
        // it before it has the answer, as it always was.
        if !binds_over {
            let _ = std::fs::remove_file(&self.cfg.node.admin_socket);
        }
        let (done_tx, done_rx) = mpsc::channel();
        answer.done = Some(done_tx);
        let cut = admin::HandoverCut::default();
        answer.cut = Some(cut.clone());
        let _ = reply.send(*answer);
        info!(
            to = build.unwrap_or(UNSAID_BUILD),
            build = crate::build::VERSION_LINE,
            "handover: the new edgelb got the listening sockets; serving until it says it serves"
        );
        // The admin thread follows the exchange, each step bounded by HANDOVER_WAIT. A stop
        // signal meanwhile cuts it short (the admin thread then reports at once): `stopped`
        // holds whether the end then comes from the cut rather than from the new process.
        let mut stopped = None;
        let end = self
            .answer_scrapes_until(&done_rx, 2 * admin::HANDOVER_WAIT + SAMPLE_EVERY, |_| {
                if stopped.is_none() && stop_requested(signals) {
                    warn!("handover: a stop signal; cutting the handover short");
                    stopped = Some(cut.now());
                }
                false
            })
            .unwrap_or(HandoverEnd::AbandonedAfterCommit);
        let cut_short = stopped == Some(true);
        match end {
            HandoverEnd::Ready => {
                // The data plane is the new process's: a link it unpinned (an interface its
                // config drops) must not stay attached while this one drains.
                self.dp.release_links();
                // Scrapes go to the new process only: it holds the same listening socket (and
                // this one's copy, kept to hand over, is not needed any more).
                if let Some(m) = self.metrics_serving.take() {
                    m.stop();
                }
                self.metrics_socket = None;
                info!("handover: the new edgelb serves; this one finishes its requests in flight");
            }
            // Cut after the new process was told to go: the data plane is its, whether it is
            // still starting or not.
            HandoverEnd::AbandonedAfterCommit | HandoverEnd::FailedAfterCommit if cut_short => {
                self.dp.release_links();
                warn!(
                    "handover: stopped by a signal after the new edgelb began writing the maps: the data plane is its; this one exits without touching it"
                )
            }
            HandoverEnd::AbandonedAfterCommit => {
                self.dp.release_links();
                warn!(
                    "handover: the new edgelb went quiet after it took the data plane; stopping anyway (the data plane keeps running)"
                )
            }
            HandoverEnd::FailedAfterCommit => {
                warn!(
                    "handover: the new edgelb failed after it began writing the maps; this one takes the data plane back"
                );
                match self.dp.reclaim() {
                    Ok(()) => info!("handover: this edgelb's program is back on its interfaces"),
                    Err(e) => error!(
                        error = %e,
                        "taking the data plane back failed: XDP may run the failed edgelb's program; restart edgelb"
                    ),
                }
                self.apply_logged("taking the data plane back");
                if stopped.is_none() {
                    self.take_back();
                    return false;
                }
            }
            HandoverEnd::Abandoned if stopped.is_some() => warn!(
                "handover: stopped by a signal before the new edgelb touched the data plane (it can no longer commit): this one exits, leaving the data plane running as it wrote it"
            ),
            HandoverEnd::Abandoned => {
                warn!(
                    "handover: the new edgelb gave up before it touched the data plane; this one takes back over"
                );
                self.take_back();
                return false;
            }
        }
        // Still this process's: stopped before the new one touched it, or taken back.
        let kept = stopped.is_some()
            && (end == HandoverEnd::Abandoned
                || end == HandoverEnd::FailedAfterCommit && !cut_short);
        self.handed_over = !kept;
        // No command is this process's to carry out any more: its listener stops taking new
        // ones (the path is the new process's, or left to the next start), and those it took
        // are turned away, during the drain and after it.
        if let Some(a) = &self.admin {
            a.stop();
        }
        // Done here: the new process serves, or a stop signal ended the handover. A (further)
        // stop signal ends the drain, as at a stop. The admin socket's path is left alone: it
        // may be the new process's. Client connections idle between keep-alive requests are
        // kept for their next request while the new process serves the listeners (it has
        // the data plane, and no stop signal came); a stop signal makes it a stop's drain,
        // which closes them at once.
        let kind = if stopped.is_none() { DrainKind::Takeover } else { DrainKind::Stop };
        self.drain_proxy(Some(signals), false, kind);
        self.turn_away_queued();
        self.finish_forwarded_reloads(signals);
        if kept {
            say_detached(&mut self.dp, &self.cfg.node.pin_dir);
        } else {
            info!("handover done: the data plane and the sockets are the new edgelb's");
        }
        true
    }

    /// After an abandoned handover: the admin socket again (a fresh listener and thread; the
    /// old one was stopped when the path was handed on) and the health checks. The maps were
    /// not touched, so what this controller wrote is still what they hold. An admin socket
    /// that cannot be bound now is tried again from the serving loop
    /// ([`Controller::keep_admin_served`]), and the log says it is not served meanwhile.
    fn take_back(&mut self) {
        let path = self.cfg.node.admin_socket.clone();
        // The listener of before the handover is let go of (its path may be the failed
        // process's by now): the commands it took are still answered, by this controller, as
        // its thread passes them on the same channel as the new listener's.
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        let served = match self.serve_admin(admin::BIND_LOCK_WAIT) {
            Ok(()) => true,
            Err(e) => {
                error!(admin = %path.display(), error = %e, "taking the admin socket back failed; trying again every {} s to {} s (meanwhile SIGHUP reloads and SIGTERM stops this edgelb)", ADMIN_RETRY.first().as_secs(), ADMIN_RETRY.longest().as_secs());
                self.admin_retry = Some(Retry::first());
                false
            }
        };
        self.reconcile_checks();
        if served {
            info!(checks = self.checker.len(), admin = %path.display(), "edgelb running again");
        } else {
            warn!(checks = self.checker.len(), admin = %path.display(), "edgelb running again, but its admin socket is not served yet: `edgelb status`, `reload` and `stop` cannot reach it until it is");
        }
    }

    /// Binds the admin socket (waiting at most `lock_wait` for the lock beside it) and serves
    /// it from a fresh thread, whose requests this controller takes from now on. The error
    /// names the step that failed.
    fn serve_admin(&mut self, lock_wait: Duration) -> std::io::Result<()> {
        let serving = admin::bind_within(&self.cfg.node.admin_socket, lock_wait)
            .and_then(|l| admin::serve(l, self.admin_tx.clone()))?;
        self.admin_path_id = admin::path_identity(&self.cfg.node.admin_socket);
        self.admin = Some(serving);
        Ok(())
    }

    /// Keeps the admin socket served, from the serving loop's periodic work. An admin thread
    /// found ended is said once, with why (it ends by itself only by a panic: a thread stopped
    /// on purpose, at a handover, is taken away first); then, as after a take-back that could
    /// not bind it, the socket is bound and served again, tried [`ADMIN_RETRY`]'s first wait later,
    /// then at waits doubling up to [`ADMIN_RETRY`]'s longest, and said once when it is served
    /// again. Without it `edgelb status`, `reload` and `stop` could not reach this process
    /// until a restart (signals still could).
    fn keep_admin_served(&mut self) {
        let path = self.cfg.node.admin_socket.clone();
        if self.admin.as_ref().is_some_and(admin::Serving::stopped) {
            let why = self.admin.take().map(admin::Serving::ended).unwrap_or_default();
            error!(admin = %path.display(), reason = %why, "the admin socket is no longer served: `edgelb status`, `reload` and `stop` cannot reach this edgelb until it is bound again (tried every {} s to {} s; meanwhile SIGHUP reloads and SIGTERM stops it)", ADMIN_RETRY.first().as_secs(), ADMIN_RETRY.longest().as_secs());
            self.admin_retry = Some(Retry::first());
        }
        // The path no longer names the socket this process serves, and nobody answers there:
        // no command could reach this edgelb (one that answers is another edgelb's, a takeover
        // under way: left alone).
        if self.admin.is_some()
            && admin::path_identity(&path) != self.admin_path_id
            && !admin::anyone_answers(&path)
        {
            warn!(admin = %path.display(), "the admin socket's path no longer names this edgelb's socket (removed, or replaced by one nobody serves): binding it again");
            if let Some(serving) = self.admin.take() {
                serving.stop();
            }
            self.admin_retry = Some(Retry { at: Instant::now(), wait: ADMIN_RETRY.first() });
        }
        let Some(retry) = self.admin_retry else { return };
        if Instant::now() < retry.at {
            return;
        }
        match self.serve_admin(ADMIN_RETRY_LOCK_WAIT) {
            Ok(()) => {
                info!(admin = %path.display(), "the admin socket is served again");
                self.admin_retry = None;
            }
            Err(e) => {
                let next = retry.again();
                tracing::debug!(admin = %path.display(), error = %e, "binding the admin socket again failed; next try in {} s", next.wait.as_secs());
                self.admin_retry = Some(next);
            }
        }
    }

    /// Takes in at most `max` of the health events waiting (and writes the maps if one changed
    /// a verdict); true when it took `max`, and more may wait for the next call. The loops take
    /// [`HEALTH_EVENTS_PER_TURN`] at a turn; before a handover, a reload or a restart of
    /// checks every event waiting is taken in (`usize::MAX`: until none waits), so that a
    /// backend found dead just before it is handed over dead, and a check restarted starts
    /// from the latest verdict. That ends: each check sends one event an interval.
    fn apply_pending_health(&mut self, max: usize) -> bool {
        let mut changed = false;
        let Self { health_rx, checker, checked, metrics, verdicts, .. } = self;
        let more = take_some(health_rx, max, |ev| {
            changed |= on_health(ev, checker, checked, metrics, verdicts);
        });
        if changed {
            self.apply_logged("health change");
        }
        more
    }

    /// The answer to a handover request: every listening socket (each L7 thread's, the metrics
    /// endpoint's), duplicated. An error names the socket that could not be.
    fn handover_answer(&self) -> Result<Answer, String> {
        let l7 = self.proxy.as_ref().map(|p| p.sockets()).unwrap_or_default();
        let metrics = self.metrics_socket.as_ref().map(|(addr, l)| (*addr, l.try_clone()));
        let mut sockets = Vec::new();
        let mut fds = Vec::new();
        let all = l7.into_iter().map(|(a, l)| (SocketKind::L7, a, l));
        for (kind, addr, sock) in all.chain(metrics.map(|(a, l)| (SocketKind::Metrics, a, l))) {
            let sock = sock.map_err(|e| format!("duplicating the socket of {addr}: {e}"))?;
            sockets.push(HandedSocket { kind, addr });
            fds.push(std::os::fd::OwnedFd::from(sock));
        }
        Ok(Answer {
            response: Response {
                sockets,
                drains: self.verdicts.drains(),
                down: self.verdicts.down(),
                vips: Some(self.verdicts.handed_vips(&self.cfg)),
                config_sha256: Some(self.cfg_sha256.clone()),
                build: Some(crate::build::VERSION_LINE.to_owned()),
                ..Response::ok("handing over")
            },
            fds,
            done: None,
            cut: None,
        })
    }

    /// Answers the metrics scrapes waiting.
    ///
    /// One rendering serves every scrape waiting (the loop comes here after each wait for admin
    /// requests, so a few dozen times a second at most), and scrapes whose client gave up are
    /// dropped unrendered. Rendering reads every counter map: scrapes rendered one by one
    /// (clients pipelining requests on several connections) would keep the controller from
    /// health changes, admin commands and signals for as long as they came.
    fn answer_scrapes(&mut self) {
        let waiting: Vec<Scrape> = std::iter::from_fn(|| self.scrape_rx.try_recv().ok())
            .filter(|r| !r.is_closed())
            .collect();
        if waiting.is_empty() {
            return;
        }
        let text: std::sync::Arc<str> = self.scrape().into();
        for reply in waiting {
            let _ = reply.send(text.clone());
        }
    }

    /// Answers metrics scrapes until `done` gives a value (returned) or hangs up, at most `max`,
    /// running `tick` between scrapes (every 20 ms at most; at once again while `tick` says it
    /// left work for the next one).
    fn answer_scrapes_until<T>(
        &mut self,
        done: &mpsc::Receiver<T>,
        max: Duration,
        mut tick: impl FnMut(&mut Self) -> bool,
    ) -> Option<T> {
        let end = Instant::now() + max;
        let mut busy = false;
        while Instant::now() < end {
            let wait = if busy { Duration::ZERO } else { Duration::from_millis(20) };
            match done.recv_timeout(wait) {
                Ok(v) => return Some(v),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.answer_scrapes();
            busy = tick(self);
        }
        None
    }

    /// Stops the L7 proxy, letting requests in flight finish for up to
    /// `node.l7_drain_timeout_ms`, and answers metrics scrapes meanwhile (a drain can last as
    /// long as a download). With `signals`, a second SIGINT or SIGTERM ends the drain at once,
    /// as it does for nginx and HAProxy, and a SIGHUP is said to be ignored
    /// ([`Controller::stop_signalled`]); admin requests are answered throughout: `status`
    /// as ever (the proxy stays here, so its request counts and passive health show; only the
    /// wait for its threads runs elsewhere), the others refused with the reason (they used to
    /// wait for the drain's end). Health verdicts still apply until the drain ends: the checks
    /// run until then, and the maps (and the draining proxy's pools) follow them, as they
    /// would in the serving loop, instead of keeping a dead backend for as long as the drain
    /// lasts. (At a handover the checks were stopped first, and nothing comes in.) `teardown`:
    /// the exit that follows removes the data plane, as a refused `stop` is told. `kind`: a
    /// stop's drain closes the client connections idle between keep-alive requests at once, a
    /// takeover's keeps them for their next request ([`DrainKind`]).
    fn drain_proxy(
        &mut self,
        mut signals: Option<&mut signal_hook::iterator::Signals>,
        teardown: bool,
        kind: DrainKind,
    ) {
        let Some(proxy) = self.proxy.as_mut() else {
            // Nothing to drain: a SIGHUP that came meanwhile is still said.
            if let Some(s) = signals {
                self.stop_signalled(s);
            }
            return;
        };
        let grace = self.cfg.node.l7_drain_timeout;
        match kind {
            DrainKind::Stop => info!(
                "L7 proxy: draining (up to {} ms, node.l7_drain_timeout_ms; a second SIGTERM or SIGINT ends it now)",
                grace.as_millis()
            ),
            // Counted just before the drain starts: one that goes idle in between is kept too.
            DrainKind::Takeover => info!(
                idle_kept = proxy.idle_clients(),
                "L7 proxy: draining (up to {} ms, node.l7_drain_timeout_ms; a SIGTERM or SIGINT ends it now); client keep-alive connections idle now stay open for their next request, answered with `Connection: close`",
                grace.as_millis()
            ),
        }
        let cut = proxy.cut_short();
        let draining = proxy.drain(kind);
        let deadline = Instant::now() + grace;
        let (tx, rx) = mpsc::channel();
        let drain = std::thread::spawn(move || {
            draining.wait(grace);
            let _ = tx.send(());
        });
        self.answer_scrapes_until(&rx, grace + Duration::from_secs(5), |ctl| {
            let more = ctl.apply_pending_health(HEALTH_EVENTS_PER_TURN);
            // XDP forwards throughout the drain: `status` gives its rates as they are now.
            ctl.sample_when_due();
            if let Some(s) = signals.as_deref_mut()
                && ctl.stop_signalled(s)
            {
                warn!(
                    connections = cut.open(),
                    "stop signal during the L7 drain: closing the rest now"
                );
                cut.now();
            }
            while let Ok((req, reply)) = ctl.admin_rx.try_recv() {
                let resp = ctl.stopping_answer(req, teardown, Some((deadline, cut.open())));
                let _ = reply.send(resp.into());
            }
            more
        });
        let _ = drain.join();
        // Its threads have ended.
        self.proxy = None;
        // A SIGHUP after the last look is said too (a stop signal has nothing left to end).
        if let Some(s) = signals {
            self.stop_signalled(s);
        }
    }

    /// The answer to admin request `req` once this controller is stopping (`teardown`: its exit
    /// removes the data plane) or has handed over; `drain`, while its L7 proxy drains: until
    /// when, and the connections still open. After a handover every request is refused as
    /// [`Response::handed_over`], which the CLI asks the new process again; otherwise `status`
    /// is answered as ever, `stop` is told of the stop under way (it waits for the exit and
    /// goes on from there) and the rest are refused, saying why.
    fn stopping_answer(
        &mut self,
        req: Request,
        teardown: bool,
        drain: Option<(Instant, usize)>,
    ) -> Response {
        let draining = match drain {
            Some((_, open)) => {
                format!(": it is draining {open} L7 connection(s) (up to node.l7_drain_timeout_ms)")
            }
            None => String::new(),
        };
        match req {
            _ if self.handed_over => Response::handed_over(),
            Request::Status => self.on_admin(req),
            Request::Stop { .. } => Response {
                stopping: true,
                teardown,
                pid: Some(std::process::id()),
                drain_ms: Some(drain.map_or(0, |(until, _)| {
                    until.saturating_duration_since(Instant::now()).as_millis() as u64
                })),
                ..Response::err(format!("edgelb is already stopping{draining}"))
            },
            _ => {
                Response::err(format!("edgelb is stopping{draining}; try again once it has exited"))
            }
        }
    }

    /// At the end of a handover that this process does not take back from: answers the admin
    /// requests its listener (stopped: [`admin::Serving::stop`]) had taken or still holds
    /// queued, with [`Controller::stopping_answer`], until its thread has passed them all on
    /// and ended (at most twice a client's time to send its request), then lets the thread go.
    /// They came before the new process had the socket's path, and would otherwise be closed
    /// unanswered as this process exits: `edgelb reload` said "closed without answering: did the
    /// controller exit?" about one reload in 80 across a takeover.
    fn turn_away_queued(&mut self) {
        let Some(admin) = self.admin.take() else { return };
        admin.stop();
        let until = Instant::now() + 2 * admin::CLIENT_WAIT;
        while !admin.stopped() && Instant::now() < until {
            if let Ok((req, reply)) = self.admin_rx.recv_timeout(Duration::from_millis(10)) {
                let resp = self.stopping_answer(req, false, None);
                let _ = reply.send(resp.into());
            }
            // Still this process's after a handover cut short by a stop signal.
            self.answer_scrapes();
        }
        if !admin.stopped() {
            warn!(
                "handover: exiting with admin clients still queued on this process's socket (they sent no request in time); they are closed unanswered"
            );
        }
    }

    /// Whether a stop signal (SIGINT, SIGTERM) is among the pending `signals`, once this
    /// controller is stopping or has handed over, consuming them. A SIGHUP can no longer reload
    /// anything here: after a handover it is passed on to the new process, whose reload it is
    /// ([`Controller::forward_reload`]; `systemctl reload` signals the old process until it
    /// exits, and the new one may have read the file before the edit); at a stop it is said in
    /// the log rather than dropped without a word (the reload the operator meant did not
    /// happen).
    fn stop_signalled(&mut self, signals: &mut signal_hook::iterator::Signals) -> bool {
        let mut stop = false;
        let pending: Vec<i32> = signals.pending().collect();
        for sig in pending {
            if sig != SIGHUP {
                stop = true;
            } else if self.handed_over {
                self.forward_reload();
            } else {
                warn!(
                    "SIGHUP ignored: edgelb is stopping; the config is read again at the next start"
                );
            }
        }
        stop
    }

    /// A SIGHUP once this edgelb has handed over: the new process is asked to reload, from a
    /// thread ([`ReloadsForwarded`]), over the admin socket's path, which is its own by now
    /// (bound over this process's before its commit, or, an older edgelb taking over, bound
    /// anew once this one freed it); the answer is logged. A request reaching this process
    /// instead (its listener is stopped by then) would be refused as handed over, and asked
    /// again for [`admin::HANDED_OVER_RETRY`] at most: nothing loops.
    fn forward_reload(&mut self) {
        if self.reloads_forwarded.is_none() {
            match ReloadsForwarded::start(self.cfg.node.admin_socket.clone()) {
                Ok(f) => self.reloads_forwarded = Some(f),
                Err(e) => {
                    error!(error = %e, "SIGHUP after the handover: starting the thread that asks the new edgelb to reload failed; reload the new one (`edgelb reload`)");
                    return;
                }
            }
        }
        let Some(f) = &mut self.reloads_forwarded else { return };
        info!(
            "SIGHUP after the handover: asking the new edgelb to reload (the config file is its to run now)"
        );
        f.asked += 1;
        let _ = f.tx.send(f.asked);
    }

    /// Before a handed-over edgelb exits: waits, at most [`RELOAD_FORWARD_WAIT`], for the new
    /// one to answer the reloads asked of it for SIGHUPs ([`Controller::forward_reload`]),
    /// passing on a SIGHUP that comes meanwhile (or came after the drain's last look) too;
    /// says so when one is still unanswered as this process exits.
    fn finish_forwarded_reloads(&mut self, signals: &mut signal_hook::iterator::Signals) {
        if !self.handed_over {
            return;
        }
        let until = Instant::now() + RELOAD_FORWARD_WAIT;
        loop {
            // A stop signal has nothing left to end here; it cuts the wait short.
            let stop = self.stop_signalled(signals);
            let Some(f) = &self.reloads_forwarded else { return };
            let answered = f.answered.load(std::sync::atomic::Ordering::Acquire);
            if answered >= f.asked {
                // Its thread ends once the channel is gone.
                self.reloads_forwarded = None;
                return;
            }
            if stop || Instant::now() >= until {
                warn!(
                    "exiting before the new edgelb answered the reload asked of it for a SIGHUP: it may not have been made; `edgelb reload` to be sure"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
            self.answer_scrapes();
        }
    }

    /// Starts and stops health checks to match the config, each new one from the controller's
    /// verdict; counts those that could not start, for the serving loop to retry.
    fn reconcile_checks(&mut self) {
        // What the running checks sent and the loop has not taken in yet comes first: a check
        // restarted below starts from the controller's verdict, which must be up to date (a
        // flip left queued would arrive from a stopped check, and be dropped as stale).
        self.apply_pending_health(usize::MAX);
        self.checks_missing = self.checker.reconcile(&self.cfg, |v, b| self.verdicts.is_down(v, b));
        self.metrics.checks_missing(self.checks_missing);
    }

    /// The config as the maps should have it (see [`Verdicts::effective`]).
    fn effective(&mut self) -> Config {
        self.verdicts.effective(&self.cfg)
    }

    /// Writes the effective config to the maps, then, once they took it, publishes the
    /// proxy's L7 pools from it: a reload the maps refuse is rolled back ([`Controller::reload`])
    /// without the proxy ever serving the refused file's pools, or forgetting the live state
    /// (passive health, request counts) of the L7 backends that file dropped.
    fn apply(&mut self) -> Result<crate::dataplane::ApplyReport, DataplaneError> {
        let eff = self.effective();
        let report = self.dp.apply_keeping(&eff, &self.cfg)?;
        self.publish_pools(&eff);
        Ok(report)
    }

    /// Publishes the proxy's L7 pools from the effective config `eff`.
    fn publish_pools(&mut self, eff: &Config) {
        if let Some(p) = &mut self.proxy {
            p.update_keeping(eff, &self.cfg);
        }
    }

    fn apply_logged(&mut self, why: &str) {
        match self.apply() {
            Ok(r) if !r.is_empty() => info!(maps = %r, "{why}: maps updated"),
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "{why}: updating the maps failed");
                // The running config's own change (a verdict, a drain) still reaches the L7
                // pools, which do not depend on the maps.
                let eff = self.effective();
                self.publish_pools(&eff);
            }
        }
    }

    fn serve(&mut self, signals: &mut signal_hook::iterator::Signals) -> Exit {
        loop {
            for sig in signals.pending() {
                if sig == SIGHUP {
                    self.reload_logged(None, "SIGHUP");
                } else {
                    info!(signal = sig, "signal received");
                    return Exit::Detach;
                }
            }
            // With events left for the next turn, the admin socket is looked at without
            // waiting: they are taken in again right after the scrapes and admin requests.
            let more = self.apply_pending_health(HEALTH_EVENTS_PER_TURN);
            let wait = if more { Duration::ZERO } else { Duration::from_millis(50) };
            match self.admin_rx.recv_timeout(wait) {
                Ok((Request::Handover { binds_over, build }, reply)) => {
                    self.apply_pending_health(usize::MAX);
                    // A link pin removed since the last look (each second) is made again now:
                    // the new process takes the links over through their pins, and its fresh
                    // attach to an interface whose link this one holds open would be refused.
                    self.dp.repin_links(true);
                    match self.handover_answer() {
                        Ok(answer) => {
                            return Exit::Handover(reply, Box::new(answer), binds_over, build);
                        }
                        Err(reason) => {
                            error!(%reason, "handover refused; this edgelb keeps running");
                            let _ = reply.send(Response::err(reason).into());
                        }
                    }
                }
                Ok((req, reply)) => {
                    let stop = match &req {
                        Request::Stop { detach } => {
                            Some(if *detach { Exit::Detach } else { Exit::Teardown })
                        }
                        _ => None,
                    };
                    let resp = self.on_admin(req);
                    let _ = reply.send(resp.into());
                    if let Some(exit) = stop {
                        return exit;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // No sender left (none while this controller holds `admin_tx`; kept so that
                // the loop cannot spin a core should that change): the wait is taken here, as
                // `recv_timeout` returns at once on a channel without senders.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
            self.answer_scrapes();
            if self.sample_when_due() {
                self.keep_admin_served();
                self.watch_links();
                // Checks that could not start, and checks whose thread died (a panic), are
                // started (again).
                if self.checks_missing > 0 || self.checker.any_ended() {
                    self.reconcile_checks();
                }
                self.look_for_lost_interfaces();
            }
        }
    }

    /// Logs an interface XDP is no longer on (once, when found) and one that is back. Nothing
    /// else would tell: health checks go through the kernel and stay green, and only the XDP
    /// counters stop. "On" is what the kernel reports: this process's program running on the
    /// device (not merely the name still naming the index it had). A lost interface that is
    /// there (re-created, under a new index or the old one; its link detached) is attached again
    /// at once, in `node.xdp_mode`, with the program this process holds ([`Dataplane::reattach`]:
    /// no capability needed since Linux 5.19); a failure is said with the kernel's error and
    /// tried again on that device with a backoff ([`AttachFailed`]), except EPERM (older
    /// kernels), which takes a restart. A link pin removed by hand is made again first
    /// ([`Dataplane::repin_links`]): the link itself stayed, held open by this process.
    /// A renamed interface is said apart (a warning): XDP stays on the device. One whose state
    /// cannot be told (out of descriptors or memory: the lookups open sockets) stays as it was
    /// last seen, neither newly lost nor back: it said nothing of the interface, and taken for
    /// "gone" it had a healthy interface said LOST (and back once descriptors were free).
    fn look_for_lost_interfaces(&mut self) {
        self.dp.repin_links(false);
        let InterfacesSeen { lost, renamed, untold } =
            interfaces_seen(self.dp.interface_states(), &self.lost, &self.renamed);
        let (next, say) = self.interfaces_untold.step(!untold.is_empty(), Instant::now());
        self.interfaces_untold = next;
        match (say, untold.first()) {
            (Some(Lookups::Failing), Some((_, e))) => {
                let interfaces: Vec<&str> = untold.iter().map(|(i, _)| i.as_str()).collect();
                warn!(?interfaces, error = %e, "cannot tell whether XDP is still on these interfaces: looking them up fails (out of descriptors or memory?); each stays as last seen until it can be told again");
            }
            (Some(Lookups::Fine), _) => info!("the attached interfaces can be looked up again"),
            _ => {}
        }
        let mut lost = lost;
        for i in lost.iter().filter(|i| !self.lost.contains(i)) {
            error!(interface = %i, "XDP is no longer on this interface (deleted, deleted and re-created, or its link detached): its VIP traffic reaches the kernel unbalanced until XDP is attached again, which edgelb does as soon as the interface is there");
        }
        let mut reattached = Vec::new();
        for i in &lost {
            // Not there (yet), or not to be told now: looked at again in a second. Seen gone,
            // a failure is forgotten: the device that comes is tried at once.
            let now = match crate::dataplane::interface_index(i) {
                Ok(Some(now)) => now,
                Ok(None) => {
                    self.attach_failed.retain(|f| f.interface != *i);
                    continue;
                }
                Err(_) => continue,
            };
            let at = self.attach_failed.iter().position(|f| f.interface == *i);
            if !reattach_due(at.map(|a| &self.attach_failed[a]), now, Instant::now()) {
                continue;
            }
            let previous = at.map(|a| self.attach_failed.remove(a));
            match self.dp.reattach(i, now, self.cfg.node.xdp_mode) {
                Ok(mode) => {
                    info!(interface = %i, mode, ifindex = now, "XDP attached again to the interface, its link pinned: balancing again");
                    reattached.push(i.clone());
                }
                Err(e) => {
                    let failed = AttachFailed::after(previous.as_ref(), i, now, &e, Instant::now());
                    // Said when it is new: a first failure, another device, another reason.
                    let said =
                        previous.is_some_and(|p| p.ifindex == now && p.reason == failed.reason);
                    match failed.retry_at {
                        _ if said => {}
                        None => {
                            error!(interface = %i, ifindex = now, error = %failed.reason, "could not attach XDP again to the interface: its VIP traffic reaches the kernel unbalanced until edgelb restarts (`edgelb run --takeover`, or `systemctl restart edgelb`), which attaches with the capabilities this process dropped")
                        }
                        Some(_) => {
                            error!(interface = %i, ifindex = now, error = %failed.reason, retry_in_s = failed.wait.as_secs(), "could not attach XDP again to the interface: its VIP traffic reaches the kernel unbalanced meanwhile; tried again later (the wait doubling up to 5 minutes; said again if the error changes), or restart edgelb (`edgelb run --takeover`, or `systemctl restart edgelb`)")
                        }
                    }
                    self.attach_failed.push(failed);
                }
            }
        }
        lost.retain(|i| !reattached.contains(i));
        self.attach_failed.retain(|f| lost.contains(&f.interface));
        for i in self.lost.iter().filter(|i| !lost.contains(i) && !reattached.contains(i)) {
            info!(interface = %i, "the interface is back as it was attached: XDP is on it");
        }
        self.lost = lost;
        for (was, now) in renamed.iter().filter(|r| !self.renamed.contains(r)) {
            warn!(interface = %was, renamed_to = %now, "the interface was renamed: XDP goes on balancing on it, but node.interfaces names it `{was}`; put `{now}` there and restart (`edgelb run --takeover`: the pinned XDP link follows the rename, with the connection table)");
        }
        self.renamed = renamed;
    }

    /// Logs the MTU and GRO warnings of a reload (GRO looked at again, the MTUs read again),
    /// when they are not those last logged, and compares `node.gateway_mac` with the gateways'
    /// MACs again ([`Controller::watch_links`]).
    fn warn_of_links(&mut self) {
        self.links.gro = gro_warnings_now(&self.cfg, self.dp.attached());
        self.links.look_at_gateways_now();
        self.watch_links();
    }

    /// Puts `cfg` in force (the health-checked backends with it), returning the config it
    /// replaces.
    fn set_config(&mut self, cfg: Config) -> Config {
        self.checked = Checked::new(&cfg);
        std::mem::replace(&mut self.cfg, cfg)
    }

    fn on_admin(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response { status: Some(self.status()), ..Response::ok("status") },
            Request::Drain { vip: Some(v), .. } | Request::Undrain { vip: Some(v), .. }
                if !self.cfg.vips.iter().any(|x| x.name == v) =>
            {
                Response::bad_request(format!("no VIP named `{v}`"))
            }
            Request::Drain { backend, vip } | Request::Undrain { backend, vip }
                if self.vips_with(vip.as_deref(), backend).is_empty() =>
            {
                let routes = self.routes_with(vip.as_deref(), backend);
                Response::bad_request(format!(
                    "backend {backend} is not in {}{}",
                    vip.map_or("any VIP".to_owned(), |v| format!("VIP `{v}`")),
                    if routes.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (it is in a route pool of {}: route pools are drained with `weight = 0` in the config file)",
                            routes.join(", ")
                        )
                    }
                ))
            }
            Request::Drain { backend, vip } => {
                let affected = self.vips_with(vip.as_deref(), backend);
                let names = affected.join(", ");
                // A drain takes it out of the VIPs' own backends only.
                let routes = self.routes_with(vip.as_deref(), backend);
                info!(%backend, vip = vip.as_deref().unwrap_or("every VIP"), "drain: no new flows, established flows stay");
                self.verdicts.drain(vip, backend);
                self.apply_logged("drain");
                let mut msg =
                    format!("{backend} drained in {names}: no new flows, established flows stay");
                if !routes.is_empty() {
                    warn!(%backend, "drain: the backend is also in route pools, which still send it requests");
                    msg.push_str(&format!(
                        "; WARNING: it is also in a route pool of {}, which still sends it requests (route pools are drained with `weight = 0` in the config file)",
                        routes.join(", ")
                    ));
                }
                // The last backend taking new flows drained: say what that means, as the
                // operator may not have meant it.
                let eff = self.effective();
                for v in eff.vips.iter().filter(|v| affected.contains(&v.name)) {
                    if !v.backends.iter().any(|b| b.weight > 0) {
                        warn!(vip = %v.name, "drain: no backend of this VIP takes new flows");
                        msg.push_str(&format!(
                            "; WARNING: VIP `{}` has no backend left for new flows: they fail until one is undrained",
                            v.name
                        ));
                    } else if self.verdicts.is_fail_open(&v.name) {
                        msg.push_str(&format!(
                            "; WARNING: VIP `{}` fails open: the backends left for new flows are all down, and it serves them anyway",
                            v.name
                        ));
                    }
                }
                Response::ok(msg)
            }
            Request::Undrain { backend, vip } => {
                let names = self.vips_with(vip.as_deref(), backend).join(", ");
                // VIPs whose file gives the backend `weight = 0`: drained by the config, as
                // `status` shows, which no undrain lifts.
                let by_weight = self.vips_where(vip.as_deref(), |v| {
                    v.backends.iter().any(|b| b.weight == 0 && backend.matches(verdicts::id(b)))
                });
                let weight_zero = || {
                    format!(
                        "{backend} is drained by `weight = 0` in the config file in {}: give it a weight there and `edgelb reload`",
                        by_weight.join(", ")
                    )
                };
                match self.verdicts.undrain(&self.cfg, vip.clone(), backend) {
                    Err(e) => Response::err(e),
                    Ok(false) if !by_weight.is_empty() => Response::err(weight_zero()),
                    Ok(false) => Response::ok(format!("{backend} was not drained in {names}")),
                    Ok(true) => {
                        info!(%backend, vip = vip.as_deref().unwrap_or("every VIP"), "undrain");
                        self.apply_logged("undrain");
                        let mut msg = format!("{backend} undrained in {names}");
                        if !by_weight.is_empty() {
                            msg.push_str(&format!("; but {}", weight_zero()));
                        }
                        Response::ok(msg)
                    }
                }
            }
            Request::Reload { config } => self.reload_logged(config.as_deref(), "edgelb reload"),
            Request::Route { client, vip, sport, proto } => self.route(client, &vip, sport, proto),
            // No proxy, no drain: `stop` then waits only for the data plane.
            Request::Stop { detach } => {
                let unpinned = if detach { unpinned_at_exit(&mut self.dp) } else { Vec::new() };
                Response {
                    teardown: !detach,
                    pid: Some(std::process::id()),
                    drain_ms: Some(
                        self.proxy
                            .as_ref()
                            .map_or(0, |_| self.cfg.node.l7_drain_timeout.as_millis())
                            as u64,
                    ),
                    ..Response::ok(if !detach {
                        "stopping and removing the data plane".to_owned()
                    } else if unpinned.is_empty() {
                        "stopping; the data plane keeps running".to_owned()
                    } else {
                        format!(
                            "stopping; the data plane keeps running, except on {}: their XDP links are held open by this edgelb alone (their pins removed, and not made again), so XDP leaves them as it exits (its log says more)",
                            unpinned.join(", ")
                        )
                    })
                }
            }
            // Taken by `serve`, which leaves the loop for it.
            Request::Handover { .. } => {
                Response::err("handover is answered by the controller loop")
            }
        }
    }

    /// `edgelb route`: the backend the live ring gives a new flow (the VIP resolved against
    /// the running config, the ring slot read from the maps XDP indexes).
    fn route(
        &mut self,
        client: std::net::IpAddr,
        vip: &str,
        sport: Option<u16>,
        proto: Option<crate::config::Protocol>,
    ) -> Response {
        let answer = crate::dataplane::RouteFlow::resolve(&self.cfg, vip, proto, client, sport)
            .and_then(|flow| Ok((flow.vip.name.clone(), self.dp.live_route(&flow)?)));
        match answer {
            Ok((vip, backend)) => {
                let fail_open = self.verdicts.is_fail_open(&vip);
                let mut msg = format!("{backend}: the live ring of VIP `{vip}`");
                if fail_open {
                    msg.push_str(" (failing open: every backend for new flows is down)");
                }
                Response {
                    route: Some(crate::admin::RouteAnswer { vip, backend, fail_open }),
                    ..Response::ok(msg)
                }
            }
            Err(e @ crate::dataplane::RouteError::BadQuestion(_)) => Response {
                bad_request: true,
                ..Response::err(format!("{e} (in the running config, {})", self.path.display()))
            },
            Err(e) => Response::err(e.to_string()),
        }
    }

    /// The names of the VIPs (`vip`, or all) for which `pick` holds, in file order.
    fn vips_where(
        &self,
        vip: Option<&str>,
        pick: impl Fn(&crate::config::Vip) -> bool,
    ) -> Vec<String> {
        self.cfg
            .vips
            .iter()
            .filter(|v| vip.is_none_or(|n| n == v.name) && pick(v))
            .map(|v| v.name.clone())
            .collect()
    }

    /// The names of the VIPs (`vip`, or all) that list `backend` (at its port, if it has one).
    fn vips_with(&self, vip: Option<&str>, backend: crate::admin::BackendRef) -> Vec<String> {
        self.vips_where(vip, |v| v.backends.iter().any(|b| backend.matches(verdicts::id(b))))
    }

    /// The L7 VIPs (of the one named, if any) with `backend` in one of their route pools,
    /// which drains and health checks do not reach ([`Verdicts`] cover a VIP's own backends).
    fn routes_with(&self, vip: Option<&str>, backend: crate::admin::BackendRef) -> Vec<String> {
        let in_routes = |v: &crate::config::Vip| {
            v.l7.iter()
                .flat_map(|l| &l.routes)
                .flat_map(|r| &r.backends)
                .any(|b| backend.matches(verdicts::id(b)))
        };
        self.vips_where(vip, in_routes).into_iter().map(|n| format!("VIP `{n}`")).collect()
    }

    /// [`Controller::reload`], asked for `via` (SIGHUP, `edgelb reload`), a refusal logged as
    /// an error whichever way it came: the CLI's message goes to whoever ran it (a deploy
    /// script, say), and edgelb's log is where a refused reload must be found afterwards.
    fn reload_logged(&mut self, named: Option<&Path>, via: &str) -> Response {
        let r = self.reload(named);
        if !r.ok {
            error!(via, "{}", r.message);
        }
        r
    }

    /// Re-reads the file edgelb runs with; `named`, the file the operator's command named, must
    /// be that file.
    fn reload(&mut self, named: Option<&Path>) -> Response {
        if let Some(named) = named
            && !same_file(named, &self.path)
        {
            return Response::err(format!(
                "reload refused: edgelb runs with {}, and a reload re-reads that file, not {}; edit {0} and reload, or switch files with `edgelb run -c {1} --takeover`",
                self.path.display(),
                named.display()
            ));
        }
        let (new, sha256) = match Config::load_hashed(&self.path) {
            Ok(c) => c,
            Err(e) => {
                return Response {
                    bad_config: true,
                    ..Response::err(format!("reload rejected, running config kept: {e}"))
                };
            }
        };
        let restart = restart_needed(&self.cfg, &new);
        if !restart.is_empty() {
            return Response::err(restart_refusal(&self.path, &restart));
        }
        // Health flips the running checks sent before this reload are taken in under the config
        // they were sent for: checked against the new one, a flip from a VIP it renames, or
        // from an XDP VIP whose port it changes (another backend id), would be dropped, and the
        // restarted check would start from the verdict before it.
        self.apply_pending_health(usize::MAX);
        let old = self.set_config(new);
        let old_verdicts = self.verdicts.clone();
        let carried = self.verdicts.carry_over(&self.verdicts.handed_vips(&old), &self.cfg);
        match self.apply() {
            Ok(r) => {
                self.cfg_sha256 = sha256;
                log_carried("reload", &carried, &self.cfg);
                self.reconcile_checks();
                self.metrics.retain(&self.cfg);
                self.rates.retain(&self.cfg);
                let mut msg =
                    format!("reloaded {}: {}", self.path.display(), reload_summary(&self.cfg, &r));
                if let Some(l7) = l7_backend_changes(&old, &self.cfg) {
                    msg.push_str(&format!("; {l7}"));
                }
                if self.checks_missing > 0 {
                    msg.push_str(&format!(
                        "; {} health checks could not start yet (no thread to be had; see the log), retried every second",
                        self.checks_missing
                    ));
                }
                if let Some(held) = verdicts::held_summary(&carried.held) {
                    msg.push_str(&format!("; {held}"));
                }
                if let Some(forgotten) = verdicts::forgotten_summary(&self.cfg, &carried.forgotten)
                {
                    msg.push_str(&format!("; {forgotten}"));
                }
                self.warn_of_links();
                warn_of_cautions(&self.cfg);
                // Said to the one reloading too, who may not read the log.
                for c in &self.cfg.cautions {
                    msg.push_str(&format!("; warning: {c}"));
                }
                // What the one reloading was told, with which file's content, for the log.
                info!(config = %self.path.display(), sha256 = %self.cfg_sha256, "{msg}");
                Response::ok(msg)
            }
            Err(e) => {
                // The maps are brought back to the running config, which stays: nothing of the
                // rejected file is left half-written, and later health changes still apply.
                self.set_config(old);
                self.verdicts = old_verdicts;
                error!(error = %e, "reload rejected: updating the maps failed");
                if let Err(back) = self.apply() {
                    error!(error = %back, "reload: restoring the running config in the maps failed");
                    // Not "kept": the maps may hold parts of both files until a write succeeds.
                    return Response::err(format!(
                        "reload rejected: updating the maps failed: {e}; writing the running config back failed too: {back}. The maps may hold parts of both files: fix the cause and reload (or restart)"
                    ));
                }
                Response::err(format!(
                    "reload rejected, running config kept: updating the maps failed: {e}"
                ))
            }
        }
    }

    /// Refreshes the kernel snapshot and renders the exposition text.
    fn scrape(&mut self) -> String {
        let eff = self.effective();
        let mut snap = KernelSnapshot::default();
        for (vip, evip) in self.cfg.vips.iter().zip(&eff.vips) {
            // XDP passes an L7 VIP's traffic to the kernel without counting it: its XDP counters
            // would only ever read 0, so they are left out (the edgelb_l7_* families count it).
            let xdp = vip.forwarding != Forwarding::L7;
            if xdp {
                snap.vips.push((vip.name.clone(), self.dp.vip_counters(vip).unwrap_or_default()));
            }
            // By backend: a search of the VIP's backends for each took O(backends²).
            let weights: HashMap<std::net::SocketAddr, u32> =
                evip.backends.iter().map(|e| (verdicts::id(e), e.weight)).collect();
            for b in &vip.backends {
                let weight = weights.get(&verdicts::id(b)).copied().unwrap_or(0);
                snap.backends.push(BackendSample {
                    vip: vip.name.clone(),
                    backend: backend_label(vip, b),
                    counters: xdp
                        .then(|| self.dp.backend_counters(vip, b.address).unwrap_or_default()),
                    up: !self.verdicts.is_down(&vip.name, verdicts::id(b)),
                    weight,
                });
            }
        }
        snap.reasons = self.dp.maps().reasons().map(|r| r.to_vec()).unwrap_or_default();
        snap.conntrack = self.dp.maps().ct_stats().map(|r| r.to_vec()).unwrap_or_default();
        snap.interfaces =
            self.dp.attached().iter().map(|(i, _)| (i.clone(), !self.lost.contains(i))).collect();
        snap.fail_open = self
            .cfg
            .vips
            .iter()
            .map(|v| (v.name.clone(), self.verdicts.is_fail_open(&v.name)))
            .collect();
        snap.interface_mtus = self.links.mtus.clone();
        snap.gateway_mac_mismatch = self.links.gateway_mismatches(&self.cfg);
        if let Ok(mut k) = self.metrics.kernel.lock() {
            *k = snap;
        }
        self.metrics.encode()
    }

    /// What `status` shows of the proxy's live state of L7 backend `addr` of `vip`, a VIP's own
    /// or a route pool's (one state where both list it): whether passive health has it out,
    /// the requests sent it, and those in flight; (false, 0, None) without a proxy or such a
    /// backend.
    fn l7_live(&self, vip: &str, addr: std::net::SocketAddr) -> (bool, u64, Option<u64>) {
        let state = self.proxy.as_ref().and_then(|p| p.backend_state(vip, addr));
        (
            state.as_ref().is_some_and(|s| s.passive_down()),
            state.as_ref().map_or(0, |s| s.requests.load(std::sync::atomic::Ordering::Relaxed)),
            state.as_ref().map(|s| s.in_flight.load(std::sync::atomic::Ordering::Relaxed) as u64),
        )
    }

    fn status(&mut self) -> Status {
        let now = Instant::now();
        let mut vips = Vec::new();
        for vip in &self.cfg.vips {
            let c = self.dp.vip_counters(vip).unwrap_or_default();
            // The ring the maps hold, counted in one pass (not built again, nor scanned once
            // per backend: seconds on the controller thread at 4096 backends).
            let ring = self.dp.ring_slots(vip);
            let mut backends = Vec::new();
            for b in &vip.backends {
                let share = match (&ring, self.dp.backend_id(vip, b.address)) {
                    (Some((slots, size)), Some(id)) => {
                        slots.get(&id).copied().unwrap_or(0) as f64 / *size as f64
                    }
                    _ => 0.0,
                };
                let bc = self.dp.backend_counters(vip, b.address).unwrap_or_default();
                let (pps, bytes_per_s) =
                    self.rates.get(&Rates::backend_key(&vip.name, b.address), now);
                let (passive_down, l7_requests, l7_in_flight) =
                    self.l7_live(&vip.name, std::net::SocketAddr::new(b.address, b.port));
                backends.push(BackendStatus {
                    pps,
                    bytes_per_s,
                    bps: bytes_per_s,
                    address: b.address,
                    port: b.port,
                    weight: b.weight,
                    healthy: !self.verdicts.is_down(&vip.name, verdicts::id(b)),
                    passive_down,
                    l7_requests,
                    l7_in_flight,
                    drained: b.weight == 0 || self.verdicts.is_drained(&vip.name, verdicts::id(b)),
                    ring_share: share,
                    packets: bc.packets,
                    bytes: bc.bytes,
                    new_flows: bc.new_flows,
                });
            }
            // Route pools: the proxy's live state of each backend, as for the VIP's own; no
            // check probes them, and drains do not reach them (weight 0 in the file does).
            let routes = vip
                .l7
                .iter()
                .flat_map(|l7| &l7.routes)
                .map(|r| RouteStatus {
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    backends: r
                        .backends
                        .iter()
                        .map(|b| {
                            let (passive_down, l7_requests, l7_in_flight) = self
                                .l7_live(&vip.name, std::net::SocketAddr::new(b.address, b.port));
                            BackendStatus {
                                passive_down,
                                l7_requests,
                                l7_in_flight,
                                drained: b.weight == 0,
                                ..BackendStatus::new(b.address, b.port, b.weight)
                            }
                        })
                        .collect(),
                })
                .collect();
            let (pps, bytes_per_s) = self.rates.get(&vip.name, now);
            // The proxy's total, route pools' backends included.
            let l7_requests = self.proxy.as_ref().map_or(0, |p| p.vip_requests(&vip.name));
            vips.push(VipStatus {
                pps,
                bytes_per_s,
                bps: bytes_per_s,
                name: vip.name.clone(),
                listen: vip.to_string(),
                address: Some(vip.address),
                port: (vip.port != 0).then_some(vip.port),
                protocol: Some(vip.protocol),
                forwarding: match vip.forwarding {
                    Forwarding::Ipip => "ipip",
                    Forwarding::L2 => "l2",
                    Forwarding::L7 => "l7",
                }
                .to_owned(),
                conntrack: vip.conntrack,
                packets: c.packets,
                bytes: c.bytes,
                new_flows: c.new_flows,
                fail_open: self.verdicts.is_fail_open(&vip.name),
                l7_requests,
                backends,
                routes,
            });
        }
        let events = self.dp.maps().ct_stats().unwrap_or_default();
        let shape = self.dp.table_shape();
        Status {
            build: Some(crate::build::VERSION_LINE.to_owned()),
            conntrack: ConntrackStatus {
                cpus: shape.cpus,
                v4_flows_per_cpu: shape.v4_flows_per_cpu(),
                v6_flows_per_cpu: shape.v6_flows_per_cpu(),
                evicted: events[lb_common::ct_stats::EVICTED as usize],
                found_on_other_cpu: events[lb_common::ct_stats::FOUND_ON_OTHER_CPU as usize],
                missed_established: events[lb_common::ct_stats::MISSED_ESTABLISHED as usize],
                search_skipped: events[lb_common::ct_stats::SEARCH_SKIPPED as usize],
            },
            config: self.path.clone(),
            interfaces: self
                .dp
                .attached()
                .iter()
                .map(|(i, m)| {
                    let renamed = self.renamed.iter().find(|(was, _)| was == i);
                    let failed = self.attach_failed.iter().find(|f| f.interface == *i);
                    let mode = if let Some(f) = failed.filter(|_| self.lost.contains(i)) {
                        let next = match f.retry_at {
                            Some(at) => format!(
                                "tried again in {} s, or restart edgelb",
                                at.saturating_duration_since(Instant::now()).as_secs()
                            ),
                            None => "restart edgelb to attach".to_owned(),
                        };
                        format!("LOST (was {m}; attaching again failed: {}; {next})", f.reason)
                    } else if self.lost.contains(i) {
                        format!("LOST (was {m}; attached again once the interface is back)")
                    } else if let Some((_, now)) = renamed {
                        format!(
                            "{m}, renamed to {now} (still balancing; name it in node.interfaces)"
                        )
                    } else {
                        (*m).to_owned()
                    };
                    (i.clone(), mode)
                })
                .collect(),
            vips,
        }
    }

    /// Samples the counters ([`Controller::sample`]) once [`SAMPLE_EVERY`] has passed since
    /// the last sample; true when it did, for the serving loop's other once-a-second work. The
    /// serving loop and the L7 drain both call it: XDP forwards during a drain too, and
    /// `status` must not give the rates of its start for as long as it lasts.
    fn sample_when_due(&mut self) -> bool {
        if Instant::now() < self.next_sample {
            return false;
        }
        self.sample();
        self.next_sample = Instant::now() + SAMPLE_EVERY;
        true
    }

    /// Samples counters for rates; logs changed ones at debug level (never per packet).
    fn sample(&mut self) {
        let now = Instant::now();
        let last = &mut self.last_packets;
        last.retain(|name, _| self.cfg.vips.iter().any(|v| v.name == *name));
        for vip in &self.cfg.vips {
            let Ok(c) = self.dp.vip_counters(vip) else { continue };
            self.rates.record(vip.name.clone(), now, c);
            for b in &vip.backends {
                let bc = self.dp.backend_counters(vip, b.address).unwrap_or_default();
                self.rates.record(Rates::backend_key(&vip.name, b.address), now, bc);
            }
            let before = last.insert(vip.name.clone(), c.packets).unwrap_or(0);
            if c.packets == before {
                continue;
            }
            let per_backend: Vec<String> = vip
                .backends
                .iter()
                .map(|b| {
                    let bc = self.dp.backend_counters(vip, b.address).unwrap_or_default();
                    format!("{}={}", b.address, bc.packets)
                })
                .collect();
            tracing::debug!(
                vip = %vip,
                packets = c.packets,
                bytes = c.bytes,
                new_flows = c.new_flows,
                backends = %per_backend.join(" "),
                "traffic"
            );
        }
    }
}

/// Takes in one health event: counts it, and records the verdict it brings if that changes
/// the backend's state (true then: the maps are to be written). An event of a check stopped
/// since, or of a backend `checked` no longer has, is only counted as a local failure, if it is
/// one. Apart from the controller (the pieces of it that it uses) so that the loop can take
/// events from its channel while it holds them.
fn on_health(
    ev: HealthEvent,
    checker: &Checker,
    checked: &Checked,
    metrics: &Metrics,
    verdicts: &mut Verdicts,
) -> bool {
    if ev.local_failure {
        metrics.probe_local_error();
    }
    if !checker.is_current(ev.check) {
        return false; // from a check stopped since: the one that replaced it speaks now
    }
    let Some(backend) = checked.get(&ev.vip, ev.backend) else {
        return false; // a check that was just reconciled away
    };
    metrics.probed(&ev, &backend.labels);
    // Every probe reports the checker's verdict, so a restarted check (which starts healthy)
    // also corrects the controller's view.
    if ev.healthy != verdicts.is_down(&ev.vip, ev.backend) {
        return false;
    }
    metrics.transition(&ev.vip, backend.labels.backend.clone(), ev.healthy);
    // What the verdict does: an L7 VIP has no ring, its proxy's pool places each request.
    match (ev.healthy, backend.l7) {
        (true, false) => {
            info!(vip = %ev.vip, backend = %ev.backend, reason = %ev.reason, "backend UP: back in the ring")
        }
        (true, true) => {
            info!(vip = %ev.vip, backend = %ev.backend, reason = %ev.reason, "backend UP: back in the L7 pool")
        }
        (false, false) => {
            warn!(vip = %ev.vip, backend = %ev.backend, reason = %ev.reason, "backend DOWN: leaves the ring, its flows re-hash")
        }
        (false, true) => {
            warn!(vip = %ev.vip, backend = %ev.backend, reason = %ev.reason, "backend DOWN: leaves the L7 pool, new requests go to the others (those under way finish)")
        }
    }
    verdicts.set_health(&ev.vip, ev.backend, ev.healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interface lookups that fail and work in turn (a process near its descriptor limit) say
    /// one warning and, once they have worked for 30 s, one "again": each change was said, a
    /// warning and an "again" line every second or two.
    #[test]
    fn flapping_lookups_are_said_once_per_episode() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut state = Lookups::Fine;
        let mut said = Vec::new();
        for (at, failed) in [(0, true), (1, false), (2, true), (3, false), (4, true), (5, false)] {
            let (next, say) = state.step(failed, s(at));
            state = next;
            said.extend(say);
        }
        assert_eq!(said, [Lookups::Failing], "one warning for the whole flapping");
        let (state, say) = state.step(false, s(34));
        assert_eq!((state, say), (Lookups::Recovering(s(5)), None), "29 s of working lookups");
        let (state, say) = state.step(false, s(35));
        assert_eq!((state, say), (Lookups::Fine, Some(Lookups::Fine)), "30 s: said over");
        let (state, say) = state.step(true, s(36));
        assert_eq!((state, say), (Lookups::Failing, Some(Lookups::Failing)), "a new episode");
        assert_eq!(Lookups::Fine.step(false, s(40)), (Lookups::Fine, None));
    }

    /// A rate comes from the last two samples only while the last is recent: one older than
    /// two sampling periods (a loop that stopped sampling, as the L7 drain once did) gives no
    /// figure, not the rate of back then as "now".
    #[test]
    fn an_old_sample_gives_no_rate() {
        let mut rates = Rates::default();
        let t0 = Instant::now();
        let at = |packets, bytes| lb_common::Counters { packets, bytes, new_flows: 0 };
        rates.record("web".to_owned(), t0, at(1000, 100_000));
        rates.record("web".to_owned(), t0 + SAMPLE_EVERY, at(1859, 185_900));
        assert_eq!(rates.get("web", t0 + SAMPLE_EVERY), (859.0, 85_900.0));
        assert_eq!(rates.get("web", t0 + 2 * SAMPLE_EVERY), (859.0, 85_900.0));
        assert_eq!(rates.get("web", t0 + 10 * SAMPLE_EVERY), (0.0, 0.0), "8 s old");
        assert_eq!(rates.get("none", t0), (0.0, 0.0));
        // Sampled again: a figure again.
        rates.record("web".to_owned(), t0 + 10 * SAMPLE_EVERY, at(1859, 185_900));
        rates.record("web".to_owned(), t0 + 11 * SAMPLE_EVERY, at(1869, 186_900));
        assert_eq!(rates.get("web", t0 + 11 * SAMPLE_EVERY), (10.0, 1000.0));
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).expect("valid test config")
    }

    const NODE: &str =
        "[node]\ninterfaces = [\"eth0\", \"eth1\"]\nencap_source_v4 = \"198.19.0.0/16\"\n";

    fn l7(name: &str, port: u16, mode: &str) -> String {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.2\" }}]\n[vip.l7]\nmode = \"{mode}\"\n"
        )
    }

    /// A failed attach is logged and shown in `status` with the kernel's errno: aya's error
    /// names only the call, its source the errno, which says whether the kernel refused for want
    /// of a capability (EPERM, before Linux 5.19) or because another program holds the device.
    #[test]
    fn a_failed_attach_names_the_errno() {
        let e = DataplaneError::Attach {
            interface: "eth0".to_owned(),
            mode: "native",
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(libc::EPERM),
            }),
        };
        let text = error_chain(&e);
        assert!(text.starts_with("attaching XDP to `eth0` (native) failed"), "{text}");
        assert!(text.contains("bpf_link_create"), "{text}");
        assert!(text.contains("os error 1"), "{text}");
        assert_eq!(text.matches("bpf_link_create").count(), 1, "said once: {text}");
    }

    /// A lost interface whose attach failed is tried again on the same device after 30 s, then
    /// after twice as long each time, up to 5 minutes: EBUSY or EINVAL from a driver still
    /// initialising, or ENOMEM, pass, and it used to stay LOST until a restart. EPERM (no
    /// capability, before Linux 5.19) is not tried again on that device; another device is
    /// tried at once, and so is one after the interface was seen gone (its failure forgotten).
    #[test]
    fn a_failed_reattach_is_tried_again_with_a_backoff_unless_it_needs_a_capability() {
        let failure = |errno| DataplaneError::Attach {
            interface: "eth0".to_owned(),
            mode: "native",
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(errno),
            }),
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let busy = AttachFailed::after(None, "eth0", 7, &failure(libc::EBUSY), t0);
        assert!(busy.reason.contains("os error 16"), "{}", busy.reason);
        assert!(!reattach_due(Some(&busy), 7, t0 + s(29)));
        assert!(reattach_due(Some(&busy), 7, t0 + s(30)));
        assert!(reattach_due(Some(&busy), 8, t0), "another device: at once");
        assert!(reattach_due(None, 7, t0), "no failure (forgotten once seen gone): at once");
        // Each further failure on the device waits twice as long, up to 5 minutes.
        let mut last = busy;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let at = last.retry_at.unwrap();
            last = AttachFailed::after(Some(&last), "eth0", 7, &failure(libc::EINVAL), at);
            waits.push(last.wait.as_secs());
            assert!(!reattach_due(Some(&last), 7, at + last.wait - s(1)));
            assert!(reattach_due(Some(&last), 7, at + last.wait));
        }
        assert_eq!(waits, [60, 120, 240, 300, 300, 300]);
        // Another device starts over.
        let other = AttachFailed::after(Some(&last), "eth0", 8, &failure(libc::ENOMEM), t0);
        assert_eq!(other.wait, s(30));
        // EPERM: not on that device, whenever; another device, at once.
        let perm = AttachFailed::after(None, "eth0", 7, &failure(libc::EPERM), t0);
        assert_eq!(perm.retry_at, None);
        assert!(!reattach_due(Some(&perm), 7, t0 + s(3600)));
        assert!(reattach_due(Some(&perm), 8, t0));
    }

    /// An interface whose state could not be told (a lookup failed out of descriptors) keeps
    /// the one last seen: a healthy one is not said lost, a lost one not back, a renamed one
    /// not renamed back. (Taken for "gone", it had a healthy interface said LOST.)
    #[test]
    fn an_interface_that_cannot_be_told_stays_as_last_seen() {
        let untold = || InterfaceState::Unknown(std::io::Error::from_raw_os_error(libc::EMFILE));
        let names = |v: &[(String, std::io::Error)]| -> Vec<String> {
            v.iter().map(|(i, _)| i.clone()).collect()
        };
        let states = |s: Vec<(&str, InterfaceState)>| -> Vec<(String, InterfaceState)> {
            s.into_iter().map(|(i, s)| (i.to_owned(), s)).collect()
        };
        let (lost, renamed) = (["b".to_owned()], [("c".to_owned(), "z".to_owned())]);
        let seen = interfaces_seen(
            states(vec![("a", untold()), ("b", untold()), ("c", untold()), ("d", untold())]),
            &lost,
            &renamed,
        );
        assert_eq!(seen.lost, ["b"], "{seen:?}");
        assert_eq!(seen.renamed, renamed, "{seen:?}");
        assert_eq!(names(&seen.untold), ["a", "b", "c", "d"]);
        // Told again: as they are.
        let seen = interfaces_seen(
            states(vec![
                ("a", InterfaceState::Lost),
                ("b", InterfaceState::Attached),
                ("c", InterfaceState::Attached),
                ("d", InterfaceState::Renamed("y".to_owned())),
            ]),
            &lost,
            &renamed,
        );
        assert_eq!(seen.lost, ["a"], "{seen:?}");
        assert_eq!(seen.renamed, [("d".to_owned(), "y".to_owned())], "{seen:?}");
        assert!(seen.untold.is_empty());
    }

    /// One turn of the loop takes at most its share of the health events waiting and says
    /// that more may wait; the next turns take the rest, in order, none lost; a take of
    /// everything (before a reload) goes on until none waits.
    #[test]
    fn a_turn_takes_a_bounded_share_of_the_events_waiting() {
        let (tx, rx) = mpsc::channel();
        for i in 0..(2 * HEALTH_EVENTS_PER_TURN + 5) {
            tx.send(i).unwrap();
        }
        let mut taken = Vec::new();
        assert!(take_some(&rx, HEALTH_EVENTS_PER_TURN, |i| taken.push(i)), "more may wait");
        assert_eq!(taken.len(), HEALTH_EVENTS_PER_TURN);
        assert!(take_some(&rx, HEALTH_EVENTS_PER_TURN, |i| taken.push(i)));
        assert_eq!(taken.len(), 2 * HEALTH_EVENTS_PER_TURN);
        assert!(!take_some(&rx, HEALTH_EVENTS_PER_TURN, |i| taken.push(i)), "none left");
        assert_eq!(taken, (0..2 * HEALTH_EVENTS_PER_TURN + 5).collect::<Vec<_>>());
        assert!(!take_some(&rx, HEALTH_EVENTS_PER_TURN, |i| taken.push(i)));
        for i in 0..3 * HEALTH_EVENTS_PER_TURN {
            tx.send(i).unwrap();
        }
        let mut all = 0;
        assert!(!take_some(&rx, usize::MAX, |_| all += 1));
        assert_eq!(all, 3 * HEALTH_EVENTS_PER_TURN);
    }

    /// A reload is refused only for what it cannot apply, and says which keys those are; the
    /// same interfaces or L7 VIPs in another order are no change.
    #[test]
    fn a_reload_needs_a_restart_only_for_what_changed_and_names_it() {
        let base = parse(&format!("{NODE}{}{}", l7("a", 8001, "http"), l7("b", 8002, "tcp")));
        let reordered = parse(
            &format!("{NODE}{}{}", l7("b", 8002, "tcp"), l7("a", 8001, "http"))
                .replace("[\"eth0\", \"eth1\"]", "[\"eth1\", \"eth0\"]"),
        );
        assert_eq!(restart_needed(&base, &reordered), Vec::<String>::new());
        let changed = parse(
            &format!("{NODE}l7_threads = 3\n{}{}", l7("a", 8001, "tcp"), l7("c", 8003, "http"))
                .replace("[\"eth0\", \"eth1\"]", "[\"eth0\"]"),
        );
        let why = restart_needed(&base, &changed).join("; ");
        for says in [
            "node.interfaces ([eth0, eth1] → [eth0])",
            "node.l7_threads (",
            "L7 VIP `a`: 127.0.0.1:8001 http → 127.0.0.1:8001 tcp",
            "L7 VIP `b` removed",
            "L7 VIP `c` on 127.0.0.1:8003 added",
        ] {
            assert!(why.contains(says), "want {says:?} in {why}");
        }
        assert!(!why.contains("xdp_mode") && !why.contains("metrics"), "{why}");
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &changed));
        assert!(
            advice.contains("edgelb run -c /etc/e.toml --takeover") && !advice.contains("xdp_mode"),
            "{advice}"
        );
        let native = parse(&format!(
            "{NODE}xdp_mode = \"native\"\n{}{}",
            l7("a", 8001, "http"),
            l7("b", 8002, "tcp")
        ));
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &native));
        assert!(advice.contains("a new node.xdp_mode takes `edgelb stop`"), "{advice}");
        assert!(!advice.contains("connection tables") && !advice.contains("pin_dir"), "{advice}");
        // Another table size: the takeover cannot carry the connection tables over, and the
        // advice says what that costs rather than promise that nothing is lost.
        let sized = parse(&format!(
            "{NODE}conntrack_flows_per_cpu = 8192
{}{}",
            l7("a", 8001, "http"),
            l7("b", 8002, "tcp")
        ));
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &sized));
        assert!(
            advice.contains("cannot carry the connection tables over")
                && advice.contains("on drained backends move to another backend"),
            "{advice}"
        );
        let moved = parse(&format!(
            "{NODE}pin_dir = \"/sys/fs/bpf/other\"\n{}{}",
            l7("a", 8001, "http"),
            l7("b", 8002, "tcp")
        ));
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &moved));
        assert!(advice.contains("a new node.pin_dir takes `edgelb stop`"), "{advice}");
        // A VIP XDP forwarded that becomes L7 (or back) is not an L7 VIP added (or removed).
        let xdp = |rest: &str| {
            parse(&format!(
                "{NODE}gateway_mac = \"02:00:00:00:00:01\"\n[[vip]]\nname = \"x\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{{ address = \"198.18.0.11\" }}]\n{rest}"
            ))
        };
        let (before, after) = (
            xdp(&l7("a", 8001, "http")),
            parse(&format!("{NODE}{}{}", l7("x", 8005, "http"), l7("a", 8001, "http"))),
        );
        assert_eq!(
            restart_needed(&before, &after),
            ["VIP `x`: forwarding ipip → l7 (L7 listeners are bound at start)"]
        );
        assert_eq!(
            restart_needed(&after, &before),
            ["VIP `x`: forwarding l7 → ipip (L7 listeners are bound at start)"]
        );
    }

    /// A refused reload names each value as the file writes it, without Rust's debug output
    /// (`Some(127.0.0.1:9110)`, quoted paths, `Native`): an unset one says so.
    #[test]
    fn a_reload_refused_for_a_restart_names_values_as_written() {
        let base = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        let other = parse(&format!(
            "{NODE}xdp_mode = \"native\"\npin_dir = \"/sys/fs/bpf/other\"\nconntrack_flows_per_cpu = 8192\n[metrics]\nlisten = \"127.0.0.1:29111\"\n{}",
            l7("a", 8001, "http")
        ));
        let why = restart_needed(&base, &other).join("; ");
        for says in [
            "node.xdp_mode (auto → native)",
            "node.pin_dir (/sys/fs/bpf/edgelb → /sys/fs/bpf/other)",
            "node.conntrack_flows_per_cpu (unset → 8192)",
            "[metrics] listen (127.0.0.1:9110 → 127.0.0.1:29111)",
        ] {
            assert!(why.contains(says), "want {says:?} in {why}");
        }
        assert!(!why.contains("Some(") && !why.contains('"'), "{why}");
        let off = parse(&format!("{NODE}[metrics]\nenabled = false\n{}", l7("a", 8001, "http")));
        let why = restart_needed(&base, &off).join("; ");
        assert_eq!(why, "[metrics] listen (127.0.0.1:9110 → disabled)");
    }

    /// An unset `node.l7_threads` is the file's, not the CPU count's: two parses of one file
    /// need no restart however many CPUs each one saw (`taskset`, a cgroup CPU quota changed
    /// between them), while the proxy still gets one thread per CPU. The second parse runs on
    /// a thread pinned to one CPU, so on a machine of several it sees fewer than the first.
    #[test]
    fn an_unset_l7_thread_count_needs_no_restart_whatever_the_cpus() {
        let text = format!("{NODE}{}", l7("a", 8001, "http"));
        let wide = parse(&text);
        let cpus = crate::testbed::netns::runnable_cpus().expect("sched_getaffinity");
        let (narrow_threads, narrow) = std::thread::scope(|s| {
            s.spawn(|| {
                crate::testbed::netns::pin_current_thread(Some(cpus[0])).expect("pin to one CPU");
                let cfg = parse(&text);
                (cfg.node.l7_thread_count(), cfg)
            })
            .join()
            .unwrap()
        });
        assert_eq!(narrow_threads, 1, "pinned to one CPU");
        assert_eq!(restart_needed(&wide, &narrow), Vec::<String>::new());
        assert_eq!(wide.node.l7_threads, None);
        // Written, it is compared as written.
        let three = parse(&text.replace("[[vip]]", "l7_threads = 3\n[[vip]]"));
        assert_eq!(three.node.l7_thread_count(), 3);
        assert_eq!(restart_needed(&wide, &three), ["node.l7_threads (unset → 3)"]);
    }

    /// A `node.mtu` above an interface's MTU, or 0, is said, naming the interface and the
    /// value to set; only when some VIP encapsulates (nothing else grows packets).
    #[test]
    fn an_mtu_the_interfaces_cannot_carry_is_said() {
        let ipip = |mtu: u32| {
            parse(&format!(
                "{NODE}mtu = {mtu}\ngateway_mac = \"02:00:00:00:00:01\"\n[[vip]]\nname = \"v\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n"
            ))
        };
        let links = [("eth0".to_owned(), 1500), ("eth1".to_owned(), 9000)];
        assert!(mtu_mismatches(&ipip(1500), &links).is_empty());
        let w = mtu_mismatches(&ipip(9000), &links);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("interface eth0 carries at most 1500")
                && w[0].contains("node.mtu = 1500"),
            "{w:?}"
        );
        assert_eq!(mtu_mismatches(&ipip(0), &links).len(), 2);
        // Without encapsulation, packets leave no larger than they came.
        let l7_only = parse(&format!("{NODE}mtu = 9000\n{}", l7("a", 8001, "http")));
        assert!(mtu_mismatches(&l7_only, &links).is_empty());
    }

    /// Generic mode with GRO on is said only where it hurts: on a generic-mode interface with
    /// GRO on, when some VIP encapsulates. A node of L7 VIPs only is not told to turn GRO off,
    /// which would cost its proxy throughput for nothing.
    #[test]
    fn gro_is_said_only_when_some_vip_encapsulates() {
        let ipip = parse(&format!(
            "{NODE}gateway_mac = \"02:00:00:00:00:01\"\n[[vip]]\nname = \"v\"\naddress = \"198.18.1.1\"\nbackends = [{{ address = \"198.18.0.11\" }}]\n{}",
            l7("a", 8001, "http")
        ));
        let l7_only = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        let attached = [("eth0".to_owned(), "generic"), ("eth1".to_owned(), "native")];
        let w = gro_warnings(&ipip, &attached, |_| true);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("generic mode on eth0") && w[0].contains("ethtool -K eth0 gro off"));
        assert!(gro_warnings(&ipip, &attached, |_| false).is_empty(), "GRO off: nothing to say");
        assert_eq!(gro_warnings(&l7_only, &attached, |_| true), Vec::<String>::new());
    }

    /// A reload logs the MTU and GRO warnings again only when they change: the same ones (in
    /// whatever order) are not logged at each of hundreds of reloads; one more, one fewer, one
    /// reworded (another MTU) or none left are.
    #[test]
    fn a_reload_logs_link_warnings_only_when_they_change() {
        let w = |ws: &[&str]| ws.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let (mtu, gro) = ("node.mtu is 9000, and interface eth0", "generic mode on eth1");
        assert!(same_warnings(&w(&[mtu, gro]), &w(&[mtu, gro])));
        assert!(same_warnings(&w(&[mtu, gro]), &w(&[gro, mtu])), "order says nothing");
        assert!(same_warnings(&[], &[]));
        assert!(!same_warnings(&w(&[mtu]), &w(&[mtu, gro])), "one more");
        assert!(!same_warnings(&w(&[mtu, gro]), &w(&[gro])), "one fewer");
        assert!(!same_warnings(&w(&[mtu]), &[]), "none left");
        assert!(!same_warnings(&[], &w(&[gro])), "a first one");
        let other = "node.mtu is 0 (no check), and interface eth0";
        assert!(!same_warnings(&w(&[mtu]), &w(&[other])), "another value");
    }

    /// A reload's summary names the L7 backends it added and removed, own pools and route pools
    /// alike, by VIP, a few of each, and says nothing of L7 pools it left alone. It said `maps=no
    /// change` of a reload that changed only L7 pools.
    #[test]
    fn a_reload_summary_names_the_l7_backends_it_added_and_removed() {
        let old = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        assert_eq!(l7_backend_changes(&old, &old), None);
        let mut new = old.clone();
        let was = &old.vips[0].backends[0];
        let added = crate::config::Backend { port: 9009, ..was.clone() };
        new.vips[0].backends = vec![added.clone()];
        let removed = std::net::SocketAddr::new(was.address, was.port);
        let said = l7_backend_changes(&old, &new).expect("changes");
        assert_eq!(
            said,
            format!(
                "L7 backends added: a {}:9009; L7 backends removed: a {removed}",
                added.address
            )
        );
        let l7 = new.vips[0].l7.as_mut().unwrap();
        let route = crate::config::Route {
            host: None,
            path_prefix: Some("/api".into()),
            algorithm: l7.algorithm,
            backends: (1..=10)
                .map(|p| crate::config::Backend { port: p, ..added.clone() })
                .collect(),
        };
        l7.routes.push(route);
        let said = l7_backend_changes(&old, &new).expect("changes");
        assert!(said.contains(&format!("a {}:1, ", added.address)), "{said}");
        assert!(said.contains("and 3 more; L7 backends removed"), "{said}");
    }

    /// The reply to a reload says what changed, not a debug dump.
    #[test]
    fn a_reload_summary_names_what_it_did() {
        let cfg = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        let none = crate::dataplane::ApplyReport::default();
        assert_eq!(
            reload_summary(&cfg, &none),
            "0 XDP VIP(s), 1 L7 VIP(s); the XDP maps needed no change; L7 pools, routes and timeouts re-published"
        );
        let r = crate::dataplane::ApplyReport {
            backends_added: 1,
            ring_slots_written: 300,
            ..Default::default()
        };
        assert!(
            reload_summary(&cfg, &r).contains("XDP maps: 1 backend added, 300 ring slots written"),
            "{}",
            reload_summary(&cfg, &r)
        );
        // A reload near the backend-entry limit says it was applied in two passes.
        let r = crate::dataplane::ApplyReport { two_passes: true, vips_updated: 1, ..r };
        assert!(
            reload_summary(&cfg, &r).ends_with(
                "1 VIP entry rewritten, 1 backend added, 300 ring slots written (applied in two passes; the counts cover both); L7 pools, routes and timeouts re-published"
            ),
            "{}",
            reload_summary(&cfg, &r)
        );
    }
}
