//! How a controller lets go: a handover to `edgelb run --takeover` ([`Controller::hand_over`]),
//! and taking back over when the new process gives up or fails; the L7 drain
//! ([`Controller::drain_proxy`]) and the answers given while stopping or once handed over
//! ([`Controller::stopping_answer`]); the SIGHUPs passed on to the new process
//! ([`ReloadsForwarded`]); and what a stop that leaves the data plane running says of it. The
//! taking side is `run`'s (and `startup.rs`'s); the exchange is [`Request::Handover`]'s
//! (docs/ARCHITECTURE.md, "Takeover").

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use signal_hook::consts::SIGHUP;
use tracing::{error, info, warn};

use super::{
    Controller, HEALTH_EVENTS_PER_TURN,
    answers::{ADMIN_RETRY, Retry, SAMPLE_EVERY},
    startup::stop_requested,
};
use crate::{
    admin::{self, Answer, HandedSocket, HandoverEnd, Request, Response, SocketKind},
    dataplane::Dataplane,
    health::Checker,
    proxy::DrainKind,
};

/// A thread asking the edgelb that took over to reload (`edgelb reload` on the admin socket,
/// whose path is its now), one request for every SIGHUP, or for every burst of them that came
/// while one was asked: a reload reads the file as it is when it is made. Apart from the
/// controller, as the new process answers once its loop runs and a reload takes as long as it
/// takes, while this process drains; [`Controller::finish_forwarded_reloads`] waits for the
/// answers (at most [`RELOAD_FORWARD_WAIT`]) before it exits.
pub(super) struct ReloadsForwarded {
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

/// How the logs name the build of an edgelb at the other end of a handover that does not say
/// it ([`Response::build`], [`Request::Handover`]).
pub(super) const UNSAID_BUILD: &str = "an older edgelb (which does not say its build)";

/// Says, at a stop that leaves the data plane running (SIGTERM, `stop --detach`, a handover
/// cut short while this process still had the data plane), what goes on running: only pinned
/// XDP links outlive this process, and a link whose pin was removed is held by it alone. Such
/// pins are made again first, once more ([`unpinned_at_exit`]); the interfaces whose links
/// still are not pinned are named in a warning, as XDP leaves them when the process exits (it
/// used to say that the data plane kept running).
pub(super) fn say_detached(dp: &mut Dataplane, pin_dir: &Path) {
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
pub(super) fn unpinned_at_exit(dp: &mut Dataplane) -> Vec<String> {
    dp.repin_links(true);
    dp.unpinned_links()
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
    pub(super) fn hand_over(
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

    /// The answer to a handover request: every listening socket (each L7 thread's, the metrics
    /// endpoint's), duplicated. An error names the socket that could not be.
    pub(super) fn handover_answer(&self) -> Result<Answer, String> {
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
    /// lasts. (At a handover the checks were stopped first, and no verdict comes in: the
    /// requests the old process still serves, in flight or the next of a client connection a
    /// takeover's drain keeps, go by its pools as they were, with passive health and retries.)
    /// `teardown`:
    /// the exit that follows removes the data plane, as a refused `stop` is told. `kind`: a
    /// stop's drain closes the client connections idle between keep-alive requests at once, a
    /// takeover's keeps them for their next request ([`DrainKind`]).
    pub(super) fn drain_proxy(
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
}
