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
//!
//! A file per concern, each an `impl Controller` block of its own where it needs the
//! controller: `startup.rs` (the steps of `run` before the controller exists), `answers.rs`
//! (admin requests, metrics scrapes, the counters sampled for both), `reload.rs` (a config put
//! in force, and the maps written after every change), `handover.rs` (a takeover's handover,
//! the L7 drain and the end of a stop), `interfaces.rs` (XDP lost from an interface, and
//! attached again), `links.rs` (the interfaces' MTU, GRO and gateway against the config) and
//! `verdicts.rs` (health verdicts and drains, without I/O). This file holds the controller's
//! state, `run` and the serving loop.

mod answers;
mod handover;
mod interfaces;
mod links;
mod reload;
mod startup;
mod verdicts;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info, warn};

use self::{
    answers::{Rates, Retry},
    handover::{ReloadsForwarded, UNSAID_BUILD, say_detached},
    interfaces::{AttachFailed, Lookups},
    links::gro_warnings_now,
    reload::log_carried,
    startup::{
        config_at_handover, drop_capabilities, raise_limits, start_checks, stop_requested,
        test_pause,
    },
    verdicts::{Checked, Verdicts},
};
use crate::{
    admin::{self, AdminError, Answer, Pending, Request, Response, SocketKind},
    config::Config,
    dataplane::{Dataplane, DataplaneError, TableShape},
    health::{Checker, HealthEvent},
    metrics::{Metrics, Scrape},
    proxy::DrainKind,
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
    ///
    /// [`InterfaceState::Unknown`]: crate::dataplane::InterfaceState::Unknown
    interfaces_untold: Lookups,
    /// The MTU and GRO warnings last logged ([`mtu_mismatches`], `gro_warnings`): a reload
    /// or a sample logs them again only when they change (`same_warnings`), or hundreds of
    /// reloads fill the log with the same lines.
    ///
    /// [`mtu_mismatches`]: links::mtu_mismatches
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
    // when the maps were not (another layout makes fresh ones). A start that
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

impl Controller {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    // Configs for the tests of the other files (`reload.rs`, `links.rs`).

    pub(super) fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).expect("valid test config")
    }

    pub(super) const NODE: &str =
        "[node]\ninterfaces = [\"eth0\", \"eth1\"]\nencap_source_v4 = \"198.19.0.0/16\"\n";

    pub(super) fn l7(name: &str, port: u16, mode: &str) -> String {
        format!(
            "[[vip]]\nname = \"{name}\"\naddress = \"127.0.0.1\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.2\" }}]\n[vip.l7]\nmode = \"{mode}\"\n"
        )
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
}
