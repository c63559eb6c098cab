//! What the controller answers, and the counters behind the answers: the admin socket's
//! requests ([`Controller::on_admin`]: `status`, `drain`, `undrain`, `route`, `reload`, `stop`),
//! the socket kept served ([`Controller::keep_admin_served`]), the metrics scrapes
//! ([`Controller::answer_scrapes`]), and the counters sampled every [`SAMPLE_EVERY`] for the
//! rates both give ([`Rates`]). The serving loop (`mod.rs`) only hands each request here.

use std::{
    collections::HashMap,
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use super::{Controller, handover::unpinned_at_exit, verdicts};
use crate::{
    admin::{
        self, BackendStatus, ConntrackStatus, Request, Response, RouteStatus, Status, VipStatus,
    },
    backoff::Backoff,
    config::{Config, Forwarding},
    metrics::{BackendSample, KernelSnapshot, Scrape, backend_label},
};

/// How often counters are sampled for rates (and logged at debug level when they changed).
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Packet and byte rates from the last two counter samples.
#[derive(Default)]
pub(super) struct Rates {
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
    pub(super) fn retain(&mut self, cfg: &Config) {
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

/// The waits before the admin socket, not served, is bound again: the controller's periodic
/// work ([`Controller::keep_admin_served`]) tries it a second after it was lost, then doubling
/// the wait after each failure up to 8 s: once whatever kept it from binding (the lock beside
/// it held, its directory gone) passes, `edgelb status` answers again within seconds, and a
/// cause that stays costs a try every few seconds, each bounded by [`ADMIN_RETRY_LOCK_WAIT`].
pub(super) const ADMIN_RETRY: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(8));

/// How long a try from the controller's loop waits for the lock beside the admin socket:
/// briefly (another start holds it microseconds), as the loop also applies health verdicts and
/// answers scrapes and signals.
const ADMIN_RETRY_LOCK_WAIT: Duration = Duration::from_millis(50);

/// When something that failed is tried again, and the wait before that try (doubled by each
/// further failure).
#[derive(Debug, Clone, Copy)]
pub(super) struct Retry {
    at: Instant,
    wait: Duration,
}

impl Retry {
    /// The first try, [`ADMIN_RETRY`]'s first wait from now.
    pub(super) fn first() -> Retry {
        let wait = ADMIN_RETRY.first();
        Retry { at: Instant::now() + wait, wait }
    }

    /// The next try after one that failed: twice the wait, up to [`ADMIN_RETRY`]'s longest.
    fn again(self) -> Retry {
        let wait = ADMIN_RETRY.after(self.wait);
        Retry { at: Instant::now() + wait, wait }
    }
}

impl Controller {
    /// Binds the admin socket (waiting at most `lock_wait` for the lock beside it) and serves
    /// it from a fresh thread, whose requests this controller takes from now on. The error
    /// names the step that failed.
    pub(super) fn serve_admin(&mut self, lock_wait: Duration) -> std::io::Result<()> {
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
    pub(super) fn keep_admin_served(&mut self) {
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

    /// Answers the metrics scrapes waiting.
    ///
    /// One rendering serves every scrape waiting (the loop comes here after each wait for admin
    /// requests, so a few dozen times a second at most), and scrapes whose client gave up are
    /// dropped unrendered. Rendering reads every counter map: scrapes rendered one by one
    /// (clients pipelining requests on several connections) would keep the controller from
    /// health changes, admin commands and signals for as long as they came.
    pub(super) fn answer_scrapes(&mut self) {
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
    pub(super) fn answer_scrapes_until<T>(
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

    pub(super) fn on_admin(&mut self, req: Request) -> Response {
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
    ///
    /// [`Verdicts`]: verdicts::Verdicts
    fn routes_with(&self, vip: Option<&str>, backend: crate::admin::BackendRef) -> Vec<String> {
        let in_routes = |v: &crate::config::Vip| {
            v.l7.iter()
                .flat_map(|l| &l.routes)
                .flat_map(|r| &r.backends)
                .any(|b| backend.matches(verdicts::id(b)))
        };
        self.vips_where(vip, in_routes).into_iter().map(|n| format!("VIP `{n}`")).collect()
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
    pub(super) fn sample_when_due(&mut self) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
