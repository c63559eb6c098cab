//! The L7 fallback: VIPs with `forwarding = "l7"` pass through XDP to the kernel stack, where this
//! proxy terminates them on io_uring (tokio-uring) and balances HTTP/1.1 requests or TCP
//! connections over their pools.
//!
//! Thread per core: every thread runs its own tokio-uring runtime with its own SO_REUSEPORT
//! listener per VIP, its own upstream keep-alive pool and its own weighted round-robin state, so
//! threads share nothing on the hot path but the pool snapshot (an `ArcSwap`, swapped by the
//! controller when health, drains or the config change) and atomic counters.
//!
//! Listeners are bound when the proxy starts, before edgelb drops its capabilities, so ports
//! below 1024 work; adding or removing L7 VIPs therefore needs a restart.

pub mod balance;
pub(crate) mod chunked;
mod http;
pub(crate) use http::is_tchar;
#[doc(hidden)]
pub use http::parse_request_for_bench;
pub mod inherited;
pub mod path;
mod proxy_protocol;
pub(crate) use proxy_protocol::proxy_header_local;
mod reuse;
mod tcp;
mod uring;

pub(crate) use uring::suspect_driver;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::Poll,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use tracing::{error, info, warn};

use crate::config::{Algorithm, Config, L7, L7Mode};
use crate::metrics::LatencyHistogram;
use balance::{BackendState, Ejection, Member, Pool, Rotation};

/// Labels for per-VIP L7 metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VipLabel {
    /// VIP name.
    pub vip: String,
}

/// Labels for per-backend L7 metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// VIP name.
    pub vip: String,
    /// Backend address and port.
    pub backend: String,
}

/// Labels for L7 request counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// VIP name.
    pub vip: String,
    /// Status class of the response that ended the request: 2xx to 5xx, or 1xx for a 101 that
    /// switched an upgrade request (a WebSocket, say) to another protocol. Interim responses
    /// (100 Continue and the like) do not end a request and are not counted.
    pub class: String,
}

/// Labels for counts of L7 responses (and request bodies) cut short.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    /// VIP name.
    pub vip: String,
    /// Who ended the body: `backend`, `client`, `deadline`, `idle` or `drain` (see `http::Cut`).
    pub side: String,
}

/// Labels for counts of TCP-mode connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// VIP name.
    pub vip: String,
    /// How the connection went: `relayed`, or `no_backend` (see `tcp::Outcome`).
    pub outcome: String,
}

/// The proxy's Prometheus metrics (shared by every proxy thread).
#[derive(Clone, Debug)]
pub struct L7Metrics {
    /// Requests by status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency, from a complete request head to the end of the response: observed by
    /// every proxy thread for each request, so without a lock ([`LatencyHistogram`]).
    pub duration: Family<VipLabel, LatencyHistogram, fn() -> LatencyHistogram>,
    /// Open client connections.
    pub active: Family<VipLabel, Gauge>,
    /// Retry attempts: each further backend a request (in TCP mode, a connection) was sent to
    /// after the one before failed, so one request tried on three backends counts 2 (HAProxy's
    /// `wretr`).
    pub retries: Family<VipLabel, Counter>,
    /// TCP-mode connections by outcome: one that no backend could be connected to is reset,
    /// and would otherwise show nowhere (its failures are logged only when they eject a
    /// backend, so not at all once the pool fails open).
    pub tcp_connections: Family<TcpLabels, Counter>,
    /// Requests (in TCP mode, connections) sent to a backend passive health ejected, because no
    /// other was left: the proxy failing open, which `edgelb_vip_fail_open` (active health)
    /// does not show.
    pub fail_open: Family<VipLabel, Counter>,
    /// Responses whose body was cut short after their head went to the client, by who ended
    /// them: counted apart, since such a response is counted and logged by its status (a 200,
    /// say), which alone would pass it for a whole one.
    pub responses_cut: Family<CutLabels, Counter>,
    /// Request bodies going on to a backend beside its early 2xx that did not go through, by
    /// who ended them: with the response already whole, its status and `responses_cut` show
    /// nothing of it.
    pub request_bodies_cut: Family<CutLabels, Counter>,
    /// Backends taken out by passive health (counted through [`L7Metrics::eject`]).
    pub ejections: Family<BackendLabel, Counter>,
    /// Response heads over the proxy's limits, by backend (counted through
    /// [`L7Metrics::head_too_large`]): the client gets a 502 that no other series tells from a
    /// broken backend's, and the backend is not blamed, so no ejection shows it either.
    pub heads_too_large: Family<BackendLabel, Counter>,
    /// Failed accepts on a VIP's listeners: out of descriptors or memory, mostly, which the
    /// log reports once per episode while this counts every one.
    pub accept_errors: Family<VipLabel, Counter>,
    /// Idle keep-alive client connections of an HTTP VIP closed to make room for a new one
    /// over `max_connections` ([`reuse`]): their clients see a closed connection (and
    /// reconnect), which no other series shows, and a steady rate says the limit is tight.
    pub closed_for_room: Family<VipLabel, Counter>,
    /// Backend connections of an HTTP VIP made private to their client connection (NTLM or
    /// Negotiate authentication binds them to their client, and so does a PROXY protocol
    /// header, see `http::upstream_pool::Private`): each is one connection the keep-alive pool
    /// does not share, which a busy rate makes visible.
    pub private_connections: Family<VipLabel, Counter>,
    /// Which per-backend series (`ejections`, `heads_too_large`) exist and which backends may
    /// have one.
    backend_series: Arc<Mutex<BackendSeries>>,
    /// The backends of the running config's L7 VIPs, for `edgelb_l7_backend_passive_down` and
    /// `edgelb_l7_backend_in_flight`.
    live: LiveGauges,
}

/// Renders `edgelb_l7_backend_passive_down{vip,backend}` and
/// `edgelb_l7_backend_in_flight{vip,backend}` at scrape time from the live state of the running
/// config's L7 backends, route pools' and those active health took out of the pools included
/// (set by [`Proxy::update_keeping`]): the controller's `up` and `weight` gauges know active
/// health and drains only, an ejection is otherwise seen only as its counter's increment, not as
/// how long it lasts, and the in-flight count least-connections and power-of-two choices
/// balance on (a backend that holds its requests, slow or stuck, shows there first) would be
/// seen nowhere.
#[derive(Clone, Debug, Default)]
struct LiveGauges(Arc<Mutex<Vec<PoolBackend>>>);

/// A backend of the running config's L7 VIPs: its VIP's name and its live state.
type PoolBackend = (String, Arc<BackendState>);

impl prometheus_client::collector::Collector for LiveGauges {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let backends = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut m = encoder.encode_descriptor(
            "edgelb_l7_backend_passive_down",
            "1 while an L7 backend is out of rotation by passive health (max_fails failures in \
             a row, for fail_timeout; then while its one trial request is out), else 0",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (vip, b) in backends.iter() {
            let label = BackendLabel { vip: vip.clone(), backend: b.addr.to_string() };
            prometheus_client::metrics::gauge::ConstGauge::new(i64::from(b.passive_down()))
                .encode(m.encode_family(&label)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgelb_l7_backend_in_flight",
            "L7 requests (TCP mode: connections) in flight on a backend, from its pick (the \
             connect included) to the end of the response body (of the relay): what least_conn \
             and p2c balance on",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (vip, b) in backends.iter() {
            let label = BackendLabel { vip: vip.clone(), backend: b.addr.to_string() };
            let n = i64::try_from(b.in_flight.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
            prometheus_client::metrics::gauge::ConstGauge::new(n)
                .encode(m.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// The label sets of the per-backend counters ([`L7Metrics::ejections`],
/// [`L7Metrics::heads_too_large`]), which both have a series for the same backends:
/// prometheus-client cannot list them, and [`L7Metrics::retain`] needs them.
#[derive(Debug, Default)]
struct BackendSeries {
    /// The series that exist (in either family).
    series: HashSet<BackendLabel>,
    /// The backends of the config the last reload put in force (none before the first): a
    /// request still running on a pool snapshot older than that reload must not bring back the
    /// series of a backend it removed.
    configured: Option<HashSet<BackendLabel>>,
}

/// The buckets' upper bounds of [`L7Metrics::duration`], in seconds: from 0.5 ms, for requests
/// answered from a backend next door, to 300 s, past the default `response_timeout_ms` (30 s,
/// whose 504s land at it) and `request_timeout_ms` (120 s, which long downloads run up to).
/// They stopped at 10 s, so such requests went to +Inf alone and `histogram_quantile` said
/// 10 s. Public for the benchmark and the histogram's tests, which measure with these.
pub const LATENCY_BOUNDS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// A histogram of [`L7Metrics::duration`]'s ([`LATENCY_BOUNDS`]).
fn latency_histogram() -> LatencyHistogram {
    LatencyHistogram::new(LATENCY_BOUNDS)
}

impl L7Metrics {
    /// Fresh metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<L7Metrics> {
        let m = L7Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            active: Family::default(),
            retries: Family::default(),
            tcp_connections: Family::default(),
            fail_open: Family::default(),
            responses_cut: Family::default(),
            request_bodies_cut: Family::default(),
            ejections: Family::default(),
            heads_too_large: Family::default(),
            accept_errors: Family::default(),
            closed_for_room: Family::default(),
            private_connections: Family::default(),
            backend_series: Arc::default(),
            live: LiveGauges::default(),
        };
        registry.register_collector(Box::new(m.live.clone()));
        registry.register(
            "edgelb_l7_accept_errors",
            "Failed accepts on L7 listeners (out of descriptors or memory, mostly)",
            m.accept_errors.clone(),
        );
        registry.register(
            "edgelb_l7_requests",
            "L7 requests by response status class",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "edgelb_l7_request_duration",
            "L7 request latency, from the complete request head to the end of the response",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "edgelb_l7_active_connections",
            "Open L7 client connections",
            m.active.clone(),
        );
        registry.register(
            "edgelb_l7_retries",
            "L7 retry attempts: each further backend a request (in TCP mode, a connection) was \
             tried on after a failure, so a request tried on three backends counts 2",
            m.retries.clone(),
        );
        registry.register(
            "edgelb_l7_tcp_connections",
            "TCP-mode L7 connections by outcome: relayed to a backend, reset because no \
             backend could be connected (no_backend), or reset because the VIP was at its \
             max_connections (over_limit)",
            m.tcp_connections.clone(),
        );
        registry.register(
            "edgelb_l7_fail_open",
            "L7 requests (in TCP mode, connections) sent to a backend passive health ejected, \
             because no other was left (all ejected, or the others already tried): the proxy \
             failing open",
            m.fail_open.clone(),
        );
        registry.register(
            "edgelb_l7_responses_cut",
            "L7 responses whose body was cut short after the head went to the client, by what \
             ended it (the backend, the client, the request deadline, the idle timeout, or the \
             drain deadline of a stop)",
            m.responses_cut.clone(),
        );
        registry.register(
            "edgelb_l7_request_bodies_cut",
            "L7 request bodies going on to a backend that answered 2xx before they were \
             through, which did not go through, by what ended them (the backend taking no more, \
             the client, the request deadline, the idle timeout, or the drain deadline of a \
             stop)",
            m.request_bodies_cut.clone(),
        );
        registry.register(
            "edgelb_l7_connections_closed_for_room",
            "Idle keep-alive L7 client connections (HTTP mode) closed to make room for a new \
             connection over max_connections",
            m.closed_for_room.clone(),
        );
        registry.register(
            "edgelb_l7_private_connections",
            "Backend connections of L7 HTTP VIPs made private to one client connection (NTLM or \
             Negotiate authentication, or a PROXY protocol header): never shared with other \
             clients",
            m.private_connections.clone(),
        );
        registry.register(
            "edgelb_l7_backend_ejections",
            "L7 backends taken out by passive health (max_fails failures in a row)",
            m.ejections.clone(),
        );
        registry.register(
            "edgelb_l7_response_heads_too_large",
            "L7 backend response heads over the proxy's limits (more headers or bytes than it \
             takes): the client gets 502, and the backend is not blamed",
            m.heads_too_large.clone(),
        );
        Arc::new(m)
    }

    /// Counts an ejection of `backend` of `vip`, unless a reload has removed it.
    pub fn eject(&self, vip: &str, backend: SocketAddr) {
        self.count(&self.ejections, vip, backend);
    }

    /// Counts a response head of `backend` of `vip` over the proxy's limits, unless a reload
    /// has removed the backend.
    pub fn head_too_large(&self, vip: &str, backend: SocketAddr) {
        self.count(&self.heads_too_large, vip, backend);
    }

    /// Counts one in `family`, a per-backend family, for `backend` of `vip`, unless a reload
    /// has removed it.
    fn count(&self, family: &Family<BackendLabel, Counter>, vip: &str, backend: SocketAddr) {
        let label = BackendLabel { vip: vip.to_owned(), backend: backend.to_string() };
        let mut e = self.backend_series.lock().unwrap_or_else(PoisonError::into_inner);
        if e.configured.as_ref().is_some_and(|c| !c.contains(&label)) {
            return;
        }
        family.get_or_create(&label).inc();
        e.series.insert(label);
    }

    /// Removes the per-backend series of the backends (VIP's own and routes') that `cfg`, the
    /// configured config a reload just put in force, no longer has; the others keep counting
    /// from where they were. Every backend kept has its series, at 0 if it had none (see
    /// [`crate::metrics::Metrics::retain`]). (The per-VIP series need nothing: a reload cannot
    /// change the set of L7 VIPs, which takes a restart.)
    pub fn retain(&self, cfg: &Config) {
        let mut keep = HashSet::new();
        for vip in &cfg.vips {
            for b in vip.l7_backends() {
                let backend = crate::metrics::backend_label(vip, b);
                keep.insert(BackendLabel { vip: vip.name.clone(), backend });
            }
        }
        let mut e = self.backend_series.lock().unwrap_or_else(PoisonError::into_inner);
        e.series.retain(|l| {
            let kept = keep.contains(l);
            if !kept {
                self.ejections.remove(l);
                self.heads_too_large.remove(l);
            }
            kept
        });
        for l in &keep {
            // Both families, even when one series exists already (counted before the first
            // reload).
            let _ = self.ejections.get_or_create(l);
            let _ = self.heads_too_large.get_or_create(l);
            e.series.insert(l.clone());
        }
        e.configured = Some(keep);
    }
}

/// One L7 VIP as the proxy threads see it: settings and pools.
#[derive(Debug)]
pub struct VipRuntime {
    /// VIP name.
    pub name: String,
    /// Settings.
    pub cfg: L7,
    /// The routes, found by host ([`Routes`]).
    pub routes: Routes,
    /// The VIP's own backends.
    pub default: Arc<Pool>,
    /// Request counters by status class (index 0 = 1xx ... 4 = 5xx), resolved once per
    /// snapshot so the hot path does not hash label sets.
    pub requests: [Counter; 5],
    /// Latency histogram of this VIP.
    pub duration: LatencyHistogram,
    /// Retry attempts of this VIP ([`L7Metrics::retries`]).
    pub retries: Counter,
    /// Connections of this VIP by outcome, indexed by `tcp::Outcome` (relayed, no backend,
    /// over the limit):
    /// for a TCP-mode VIP; an HTTP VIP's count nowhere (it has no such series).
    pub tcp_connections: [Counter; 3],
    /// Picks of this VIP that failed open ([`L7Metrics::fail_open`]).
    pub fail_open: Counter,
    /// Backend connections of this VIP made private ([`L7Metrics::private_connections`]).
    pub private_connections: Counter,
    /// Responses of this VIP cut short, indexed by `http::Cut` (backend, client, deadline,
    /// idle, drain).
    pub responses_cut: [Counter; 5],
    /// Request bodies of this VIP going beside an early 2xx cut short, indexed by `http::Cut`.
    pub request_bodies_cut: [Counter; 5],
    /// The proxy's metrics (passive-health ejections, by backend).
    pub metrics: Arc<L7Metrics>,
    /// The throttles of this VIP's log lines that can come in floods, per VIP (one VIP's must
    /// not hide another's) and carried over every update by VIP name (health changes and drains
    /// make them too), so that each holds its 10 s across them.
    pub(crate) said: Arc<VipLines>,
}

/// How a backend failed a request or connection, as passive health charges it
/// ([`VipRuntime::failed`]): the `reason` of an ejection's log line, which said none, so that a
/// backend refusing connections, one too slow and one answering 503 read alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Could not be connected to (refused, unreachable, no answer), or the connection broke
    /// before the request went.
    Connect,
    /// No response head within the response timeout.
    Timeout,
    /// The request's deadline passed while it had the request.
    Deadline,
    /// Closed, reset or sent garbage before a response head.
    Broken,
    /// Answered with this status: 502, 503 or 504.
    Status(u16),
    /// Cut its response's body short after the head (closed, reset, or broke the chunked
    /// coding).
    CutBody,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect => f.write_str("connect failed"),
            Failure::Timeout => f.write_str("no response head within the response timeout"),
            Failure::Deadline => f.write_str("request deadline passed"),
            Failure::Broken => f.write_str("closed, reset or garbled before a response head"),
            Failure::Status(status) => write!(f, "answered {status}"),
            Failure::CutBody => f.write_str("response body cut short"),
        }
    }
}

/// The throttles of an L7 VIP's log lines that can come in floods ([`VipRuntime::said`]).
#[derive(Debug, Default)]
pub(crate) struct VipLines {
    /// "No backend could be connected" (TCP mode).
    pub(crate) no_backend: Throttle,
    /// "A TCP-mode VIP is at its max_connections" ([`tcp::refuse`]).
    pub(crate) over_limit: Throttle,
    /// "Sent to one anyway (fail open)" ([`VipRuntime::pick`]).
    pub(crate) fail_open: Throttle,
    /// "A backend's response head is too large" (HTTP mode).
    pub(crate) head_too_large: Throttle,
    /// "Cannot connect to backends: this node is out of..." ([`say_local_failure`]).
    pub(crate) local_failure: Throttle,
}

impl VipRuntime {
    /// Picks a member of `pool` for attempt `attempt` (0 the first) of a request or TCP-mode
    /// connection from `client` ([`Pool::pick_open`]), counting it as a retry after the first,
    /// and counting and saying (at most every 10 s for the VIP) a pick that failed open: one of
    /// a backend passive health ejected.
    pub(crate) fn pick(
        &self,
        pool: &Pool,
        client: IpAddr,
        tried: &[usize],
        sticky: Option<usize>,
        attempt: u32,
    ) -> Option<usize> {
        let (i, open) = pool.pick_open(client, tried, sticky)?;
        if open {
            self.fail_open.inc();
            if self.said.fail_open.ready() {
                let backend = pool.members[i].state.addr;
                warn!(vip = self.name, %backend, "every backend left for this request is passively ejected: sent to one anyway (fail open; said at most every 10 s; edgelb_l7_fail_open_total counts every one)");
            }
        }
        if attempt > 0 {
            self.retries.inc();
        }
        Some(i)
    }

    /// Records a failed request or connection on backend `state`, failed as `why` (said as the
    /// `reason` of an ejection, the failure that made it). After `max_fails` in a row it
    /// is out of rotation for `fail_timeout`, and so is one whose trial request after that
    /// failed; taking it out is counted, once per ejection (failures while it is out, as when a
    /// pool fails open, are not). Only the first ejection is a warning, the change of state: a
    /// failed trial leaves the backend out, as it was, and is said at debug level. It was a
    /// warning too, so a dead backend under traffic, which only passive health watches in a
    /// route pool, logged one every `fail_timeout` (8640 a day at the default 10 s) for as
    /// long as it stayed dead.
    pub fn failed(&self, state: &BackendState, why: Failure) {
        let ejection = state.failure(self.cfg.max_fails, self.cfg.fail_timeout);
        // The window in force, which a reload since this request began may have changed.
        let out_ms = state.fail_timeout().as_millis() as u64;
        match ejection {
            Ejection::None => return,
            Ejection::Streak => warn!(
                vip = %self.name,
                backend = %state.addr,
                failures = self.cfg.max_fails,
                out_ms,
                reason = %why,
                "L7 backend failed too often in a row; out of rotation, with one trial request every out_ms until one succeeds (passive health; failed trials are not logged above debug, edgelb_l7_backend_ejections_total counts them)"
            ),
            Ejection::Trial => tracing::debug!(
                vip = %self.name,
                backend = %state.addr,
                out_ms,
                reason = %why,
                "L7 backend failed its trial request after an ejection; out of rotation again (passive health)"
            ),
        }
        self.metrics.eject(&self.name, state.addr);
    }

    /// Records a successful request or connection on backend `state`
    /// ([`BackendState::success`]), and says at info level when that put it back in rotation
    /// after an ejection: once per ejection, the end of what its warning began. Without it a
    /// backend back after 10 s and one dead for a day left the same single warning, and
    /// nothing said the first had come back.
    pub fn succeeded(&self, state: &BackendState) {
        if state.success() {
            info!(
                vip = %self.name,
                backend = %state.addr,
                "L7 backend answered its trial request after an ejection; back in rotation (passive health)"
            );
        }
    }

    /// Counts a finished request by its status.
    pub fn count(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].inc();
    }
}

impl VipRuntime {
    /// The pool for a request with `host` and `path`. The host is matched without its port
    /// and without one trailing dot: `api.example.` is the fully qualified spelling of
    /// `api.example` (RFC 1034 3.1), which clients may send and backends serve alike.
    pub fn pool_for(&self, host: Option<&str>, path: &str) -> &Arc<Pool> {
        if self.routes.is_empty() {
            return &self.default;
        }
        let host = host.map(|h| {
            let h = h
                .rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(h, |(h, _)| h);
            route_host_cow(h)
        });
        self.routes.find(host.as_deref(), path).unwrap_or(&self.default)
    }
}

/// One route of an L7 VIP: its place in the file, its path prefix and its pool.
#[derive(Debug)]
struct Route {
    /// Its index among the VIP's routes: of two that match, the earlier in the file wins.
    order: usize,
    /// The path prefix it matches, or every path.
    prefix: Option<String>,
    /// Where its requests go.
    pool: Arc<Pool>,
}

/// An L7 VIP's routes, kept by host, so that a request looks only at the routes of its own
/// host and at those for every host, not at every route of the VIP (about 10 ns a route, per
/// request: a VIP with a thousand hosts would spend 10 µs a request finding its pool). The
/// first route in file order that matches still wins, as when they were tried one by one.
#[derive(Debug, Default)]
pub struct Routes {
    /// Routes with a host, by host as [`route_host`] spells it, each list in file order.
    by_host: HashMap<String, Vec<Route>>,
    /// Routes for every host, in file order.
    any_host: Vec<Route>,
}

impl Routes {
    /// The routes `routes`, each (host as [`route_host`] spells it, path prefix, pool), in
    /// file order.
    pub fn new(
        routes: impl IntoIterator<Item = (Option<String>, Option<String>, Arc<Pool>)>,
    ) -> Self {
        let mut out = Routes::default();
        for (order, (host, prefix, pool)) in routes.into_iter().enumerate() {
            let route = Route { order, prefix, pool };
            match host {
                Some(h) => out.by_host.entry(h).or_default().push(route),
                None => out.any_host.push(route),
            }
        }
        out
    }

    /// True when the VIP has no route: every request goes to its own backends.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty() && self.any_host.is_empty()
    }

    /// The pool of the first route (in file order) that matches `host` (as [`route_host`]
    /// spells it) and `path`, if any does.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Pool>> {
        fn first<'r>(routes: &'r [Route], path: &str) -> Option<&'r Route> {
            routes.iter().find(|r| r.prefix.as_deref().is_none_or(|p| path.starts_with(p)))
        }
        let of_host = host.and_then(|h| self.by_host.get(h)).and_then(|r| first(r, path));
        let of_any = first(&self.any_host, path);
        match (of_host, of_any) {
            (Some(h), Some(a)) => Some(if h.order < a.order { h } else { a }),
            (h, a) => h.or(a),
        }
        .map(|r| &r.pool)
    }
}

/// A host as routes compare it: lowercase, without one trailing (root) dot, and an IPv6 literal
/// in its one canonical spelling (RFC 5952, as browsers send it), so that `[2001:0db8::1]` in the
/// config matches a request for `[2001:db8::1]`.
pub(crate) fn route_host(h: &str) -> String {
    route_host_cow(h).into_owned()
}

/// [`route_host`], borrowing `h` when it is already spelled so (the common case: a request's
/// lowercase host name), since the proxy spells every request's host this way.
fn route_host_cow(h: &str) -> std::borrow::Cow<'_, str> {
    let plain =
        !h.ends_with('.') && !h.starts_with('[') && !h.bytes().any(|b| b.is_ascii_uppercase());
    if plain {
        return std::borrow::Cow::Borrowed(h);
    }
    let h = h.strip_suffix('.').unwrap_or(h);
    let literal = h.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    std::borrow::Cow::Owned(match literal.and_then(|a| a.parse::<std::net::Ipv6Addr>().ok()) {
        Some(a) => format!("[{a}]"),
        None => h.to_ascii_lowercase(),
    })
}

/// What every proxy thread reads.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// By VIP name.
    pub vips: HashMap<String, Arc<VipRuntime>>,
}

/// Everything the threads share.
pub(crate) struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// How many snapshots were published, counted after each is stored: a connection looks
    /// its VIP up again only when this moved since its last look.
    pub generation: Generation,
    pub metrics: Arc<L7Metrics>,
    pub stopping: AtomicBool,
    /// Set with `stopping` (before it) by a takeover's drain ([`DrainKind::Takeover`]): the
    /// connections idle between keep-alive requests stay open for their next request rather
    /// than close at once ([`Shared::closes_idle`]).
    pub keep_idle: AtomicBool,
    /// Wakes everything waiting in [`wait_stopping`] when `stopping` is set.
    pub stop: tokio::sync::Notify,
    /// Set when the grace period is over: the connections still open are reset, and the
    /// threads end. Each thread wakes its own connections waiting in [`wait_forced`].
    pub force: AtomicBool,
    /// Open client connections, all threads.
    pub open: AtomicUsize,
    /// Accept loops not finished yet, all threads. The drain at stop waits for them before it
    /// trusts `open`: a connection an accept loop took just as the stop began is counted only
    /// after the accept returns, and finding `open` at zero before that would drop it unserved.
    pub accepting: AtomicUsize,
    /// Refusals over `max_connections` under way that read the request head and linger, all
    /// threads: bounded by [`MAX_GRACEFUL_REFUSALS`].
    pub refusing: AtomicUsize,
    /// Open client connections, all threads, whose close has begun and waits for their peer to
    /// take what the kernel still holds for it (the end of a complete answer or relayed
    /// stream, `uring::Socket::close_when_delivered`), or lingers after it (`http::linger`):
    /// handed to the kernel at the drain deadline, not reset ([`Closing`]).
    pub closing: AtomicUsize,
    /// Every thread's count of its connections idle between keep-alive requests, by VIP name:
    /// where room is made for a connection over `max_connections` ([`reuse`]).
    pub idle: HashMap<String, Arc<[reuse::Shelf]>>,
    /// What the accept loops of each VIP (one per thread) say of their failed accepts, by VIP
    /// name: a run said once per VIP, not once per thread.
    pub accept_failures: HashMap<String, Arc<crate::accept::SharedAcceptFailures>>,
}

impl Shared {
    /// Ends the grace period: the connections still open are reset, or handed to the kernel
    /// if only their close is left (see [`wait_forced`]), and the threads stop.
    fn end_now(&self) {
        self.force.store(true, Ordering::SeqCst);
    }

    /// Client connections idle between keep-alive requests now, all VIPs and threads (see
    /// [`Proxy::idle_clients`]).
    fn idle_clients(&self) -> usize {
        self.idle.values().map(|shelves| reuse::idle_in(shelves)).sum()
    }

    /// Is a keep-alive connection that waits for its next request to close now rather than
    /// wait: the proxy stops, and not for a takeover ([`DrainKind`]). Read by every connection
    /// as it goes idle: one relaxed load while the proxy runs.
    pub(crate) fn closes_idle(&self) -> bool {
        self.stopping.load(Ordering::Relaxed) && {
            // With the load above, synchronizes with the drain's store of `stopping`, made
            // after that of `keep_idle`: the kind of the drain is seen with its start.
            std::sync::atomic::fence(Ordering::Acquire);
            !self.keep_idle.load(Ordering::Relaxed)
        }
    }
}

/// Why the proxy drains ([`Proxy::drain`]), which decides what becomes of the client
/// connections idle between keep-alive requests at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainKind {
    /// The process stops (SIGTERM, `edgelb stop`, a stop signal during a handover): idle
    /// connections close at once (as nginx and HAProxy close theirs), since the drain need not
    /// wait for clients that may never send another request, and nothing serves them after.
    Stop,
    /// The old process of a takeover: a new process serves the listeners already. An idle
    /// connection stays open until its next request, which is answered with `Connection:
    /// close` (its client then reconnects, to the new process); its client's close; its idle
    /// timeout; or the drain's deadline, where it closes (plainly, not with a reset). Closed at
    /// once, each cost a client that sent its next request without noticing the close (a bare
    /// `http.client` loop, or one racing the FIN) a failed request, and every idle client
    /// reconnected in the same instant.
    Takeover,
}

/// A count of published snapshots ([`Shared::generation`]), read by every request of every
/// thread: on a cache line of its own, which the connection counts beside it in [`Shared`],
/// written by every thread at each connection, would otherwise take from it.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Generation(AtomicU64);

impl Generation {
    /// The count now (Acquire: the snapshots counted are stored).
    pub(crate) fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
}

/// How many refusals over `max_connections` may read their request head and linger at once
/// (each holds a socket and a 4 KiB buffer for about 2 s at most): beyond that, in a flood, a
/// refusal answers 503 at once and closes, as cheap as a refusal can be.
pub(crate) const MAX_GRACEFUL_REFUSALS: usize = 1024;

/// A place among the [`MAX_GRACEFUL_REFUSALS`], given back on drop.
struct Refusal<'a>(&'a AtomicUsize);

impl<'a> Refusal<'a> {
    /// Takes a place, if one is free.
    fn enter(count: &'a AtomicUsize) -> Option<Refusal<'a>> {
        if count.fetch_add(1, Ordering::SeqCst) >= MAX_GRACEFUL_REFUSALS {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Refusal(count))
    }
}

impl Drop for Refusal<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pool's place in the config: its VIP and, for a route, the route's host and path prefix.
type PoolKey = (String, Option<(Option<String>, Option<String>)>);

/// The running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Live state of every backend of the running config's L7 VIPs (their own and their
    /// routes'), by VIP and address: those active health took out of the pools included
    /// ([`Proxy::update_keeping`]).
    states: HashMap<(String, SocketAddr), Arc<BackendState>>,
    /// States of backends the last updates dropped (the running config no longer lists them),
    /// for as long as requests or relays still running on them hold them: a backend that comes
    /// back meanwhile takes its state up again, in-flight count included, instead of looking
    /// idle to `least_conn` and `p2c` while its old connections still run.
    retired: HashMap<(String, SocketAddr), std::sync::Weak<BackendState>>,
    /// Where each pool's rotation stands, by VIP and route (host, path prefix; none for the
    /// VIP's own backends), carried over every update.
    rotations: HashMap<PoolKey, Arc<Rotation>>,
    /// Each VIP's log-line throttles, by name, carried over every update ([`VipRuntime::said`]).
    said: HashMap<String, Arc<VipLines>>,
    listeners: Vec<(String, SocketAddr)>,
    /// A descriptor of every thread's listening socket, to hand over to `edgelb run
    /// --takeover`; closed when the drain starts ([`Proxy::drain`]).
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
}

/// Why the proxy could not start. A cause is in the message, so it is not also the error's
/// `source()`: a caller that prints the source chain would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("L7 VIP `{vip}`: binding {addr}: {error}")]
    Bind {
        /// VIP name.
        vip: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        error: std::io::Error,
    },
    /// A thread could not be started.
    #[error("starting an L7 thread: {0}")]
    Thread(std::io::Error),
    /// The kernel refused an io_uring instance.
    #[error(
        "io_uring is unavailable ({0}): the L7 proxy needs it; the kernel may deny it (sysctl kernel.io_uring_disabled, a seccomp profile, the memory limit)"
    )]
    IoUring(std::io::Error),
    /// The kernel refused an io_uring instance its memory (ENOMEM): most likely the
    /// locked-memory limit, which every ring is charged to once edgelb has dropped its
    /// capabilities (CAP_IPC_LOCK among them). Said as such, with the limit and what the
    /// threads need, rather than as a bare "Cannot allocate memory" on a host with plenty.
    #[error(
        "io_uring is unavailable ({error}): most likely the locked-memory limit (RLIMIT_MEMLOCK, now {limit}), which each L7 thread's io_uring is charged to once edgelb has dropped its capabilities: about {} KiB each, {} KiB for the {threads} thread(s) (node.l7_threads), twice that during a takeover (both processes count against one user's limit); raise it (`LimitMEMLOCK=infinity` in the systemd unit, `ulimit -l unlimited`, `--ulimit memlock=-1` for a container) or lower node.l7_threads",
        RING_BYTES >> 10,
        (RING_BYTES >> 10) * threads,
    )]
    RingMemory {
        /// The kernel's refusal.
        error: std::io::Error,
        /// The proxy threads, one ring each.
        threads: usize,
        /// The soft RLIMIT_MEMLOCK when refused, as said ("64 KiB", "unlimited").
        limit: String,
    },
}

/// About what one proxy thread's io_uring takes of the locked-memory limit: its completion
/// queue ([`URING_CQ_ENTRIES`] entries of 16 bytes) is nearly all of it.
pub const RING_BYTES: usize = URING_CQ_ENTRIES as usize * 16;

/// The error for a ring the kernel refused to one of `threads` proxy threads: its memory
/// ([`ProxyError::RingMemory`]), or anything else ([`ProxyError::IoUring`]).
fn ring_refused(error: std::io::Error, threads: usize) -> ProxyError {
    if error.raw_os_error() == Some(libc::ENOMEM) {
        ProxyError::RingMemory { error, threads, limit: memlock_limit() }
    } else {
        ProxyError::IoUring(error)
    }
}

/// The name of the proxy's thread `t`, as `ps`, the log and a panic's report say it.
fn thread_name(t: usize) -> String {
    format!("l7-{t}")
}

/// The soft locked-memory limit, as a person reads it ("64 KiB", "unlimited").
fn memlock_limit() -> String {
    let lim = match crate::rlimit::get(libc::RLIMIT_MEMLOCK) {
        Ok(lim) => lim,
        Err(e) => return format!("unknown: {e}"),
    };
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_owned()
    } else {
        format!("{} KiB", lim.rlim_cur >> 10)
    }
}

/// Creates, all at once, the io_uring of each of the proxy's `threads`, then drops them: an
/// edgelb that cannot run its L7 proxy says so before it starts rather than leaving its
/// listeners unanswered, or failing once it has taken the data plane over. They are made on a
/// thread without CAP_IPC_LOCK, as the proxy's threads run once edgelb has dropped its
/// capabilities: each ring is then charged to the locked-memory limit, which a default of
/// 64 KiB (containers) or 8 MiB (many distributions) does not hold for every CPU's thread. During
/// a takeover, the running edgelb's rings count too (one user's limit), as they will when this
/// one's proxy starts.
pub fn probe_io_uring(threads: usize) -> Result<(), ProxyError> {
    std::thread::Builder::new()
        .name("io_uring-probe".into())
        .spawn(move || {
            // Not held (edgelb not run as root): the rings are charged anyway.
            let _ = caps::drop(None, caps::CapSet::Effective, caps::Capability::CAP_IPC_LOCK);
            let mut rings = Vec::with_capacity(threads);
            for _ in 0..threads {
                rings.push(
                    uring_ring().build(URING_SQ_ENTRIES).map_err(|e| ring_refused(e, threads))?,
                );
            }
            Ok(())
        })
        .map_err(ProxyError::Thread)?
        .join()
        .unwrap_or_else(|_| {
            Err(ProxyError::Thread(std::io::Error::other("the io_uring probe panicked")))
        })
}

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // The VIP may not be configured on a local interface yet (XDP passes its packets up).
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_freebind_v6(true)?;
    }
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// The L7 VIPs of `cfg`: (name, listen address).
pub fn l7_listeners(cfg: &Config) -> Vec<(String, SocketAddr)> {
    cfg.vips
        .iter()
        .filter(|v| v.l7.is_some())
        .map(|v| (v.name.clone(), SocketAddr::new(v.address, v.port)))
        .collect()
}

/// Listening sockets for every proxy thread, bound (with the privileges that may need) before
/// any thread starts.
pub struct Bound {
    per_thread: Vec<Vec<(String, SocketAddr, L7Mode, std::net::TcpListener)>>,
}

impl Proxy {
    /// Binds one SO_REUSEPORT listener per L7 VIP for each of `threads` threads; a VIP whose
    /// address has sockets in `inherited` (passed by the service manager, or handed over by the
    /// edgelb this one takes over from) uses those instead, spread over the threads, so it
    /// keeps listening across restarts.
    pub fn bind(
        cfg: &Config,
        threads: usize,
        inherited: &inherited::Inherited,
    ) -> Result<Bound, ProxyError> {
        let listeners = l7_listeners(cfg);
        for (vip, addr) in &listeners {
            if inherited.contains(*addr) {
                info!(vip, %addr, "L7 VIP listens on the socket {}", inherited.origin(*addr));
            }
        }
        for addr in inherited.addrs() {
            if !listeners.iter().any(|(_, a)| *a == addr) {
                warn!(%addr, "a listening socket {} matches no L7 VIP; unused", inherited.origin(addr));
            }
        }
        let mut per_thread = Vec::new();
        let threads = threads.max(1);
        for t in 0..threads {
            let mut socks = Vec::new();
            for (vip, addr) in listeners.iter().cloned() {
                let mode = cfg
                    .vips
                    .iter()
                    .find(|v| v.name == vip)
                    .and_then(|v| v.l7.as_ref())
                    .map_or(L7Mode::Http, |l| l.mode);
                let mut passed = inherited.for_thread(addr, t, threads);
                if passed.is_empty() {
                    passed.push(listener(addr));
                }
                for l in passed {
                    let l =
                        l.map_err(|error| ProxyError::Bind { vip: vip.clone(), addr, error })?;
                    socks.push((vip.clone(), addr, mode, l));
                }
            }
            per_thread.push(socks);
        }
        Ok(Bound { per_thread })
    }

    /// Binds every L7 VIP on `threads` threads and starts serving `cfg`, every backend of it in
    /// the pools (as [`Proxy::update`]).
    pub fn start(
        cfg: &Config,
        threads: usize,
        metrics: Arc<L7Metrics>,
    ) -> Result<Proxy, ProxyError> {
        let bound = Proxy::bind(cfg, threads, &inherited::Inherited::default())?;
        Proxy::start_bound(cfg, cfg, bound, metrics)
    }

    /// Starts the threads on listeners from [`Proxy::bind`], serving the effective config `cfg`
    /// made from `configured` (as [`Proxy::update_keeping`]).
    pub fn start_bound(
        cfg: &Config,
        configured: &Config,
        bound: Bound,
        metrics: Arc<L7Metrics>,
    ) -> Result<Proxy, ProxyError> {
        let listeners = l7_listeners(cfg);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            generation: Generation::default(),
            metrics,
            stopping: AtomicBool::new(false),
            keep_idle: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            force: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            // Every accept loop counts from the start, so none can be missed by an early stop.
            accepting: AtomicUsize::new(bound.per_thread.iter().map(Vec::len).sum()),
            refusing: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            idle: listeners
                .iter()
                .map(|(vip, _)| (vip.clone(), reuse::shelves(bound.per_thread.len())))
                .collect(),
            accept_failures: listeners
                .iter()
                .map(|(vip, _)| (vip.clone(), Arc::default()))
                .collect(),
        });
        let sockets = bound
            .per_thread
            .iter()
            .flatten()
            .map(|(vip, addr, _, l)| {
                let dup = l.try_clone();
                Ok((
                    *addr,
                    dup.map_err(|error| ProxyError::Bind { vip: vip.clone(), addr: *addr, error })?,
                ))
            })
            .collect::<Result<Vec<_>, ProxyError>>()?;
        let mut proxy = Proxy {
            shared,
            threads: Vec::new(),
            states: HashMap::new(),
            retired: HashMap::new(),
            rotations: HashMap::new(),
            said: HashMap::new(),
            listeners: listeners.clone(),
            sockets,
        };
        proxy.update_keeping(cfg, configured);
        let threads = bound.per_thread.len();
        // Each thread says whether its runtime (its io_uring) came up: a proxy that cannot
        // serve fails here, not with listeners nobody accepts on.
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        for (t, socks) in bound.per_thread.into_iter().enumerate() {
            let shared = proxy.shared.clone();
            let up = up_tx.clone();
            let name = thread_name(t);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || match tokio_uring::Runtime::new(&uring_runtime()) {
                    Ok(rt) => {
                        let _ = up.send(Ok(()));
                        // A panic outside the connection tasks (their runtime catches theirs)
                        // ends the process: see `panics::or_exit`.
                        crate::panics::or_exit(&name, || rt.block_on(run_thread(socks, shared, t)));
                        // Dropped, unless a panic in tokio-uring may have left its driver
                        // waiting for ever for an operation the kernel never saw.
                        uring::end_runtime(rt, &name);
                    }
                    Err(e) => {
                        // Its sockets close with it; the proxy is shut down below.
                        shared.accepting.fetch_sub(socks.len(), Ordering::SeqCst);
                        let _ = up.send(Err(e));
                    }
                })
                .map_err(ProxyError::Thread)?;
            proxy.threads.push(handle);
        }
        drop(up_tx);
        for _ in 0..threads {
            let failed = match up_rx.recv() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => ring_refused(e, threads),
                Err(_) => ProxyError::Thread(std::io::Error::other("an L7 thread ended at start")),
            };
            proxy.shutdown(Duration::ZERO);
            return Err(failed);
        }
        info!(vips = listeners.len(), threads, "L7 proxy listening");
        Ok(proxy)
    }

    /// New descriptors of every thread's listening socket, with their addresses: what a
    /// handover passes on (none once the proxy drains).
    pub fn sockets(&self) -> Vec<(SocketAddr, std::io::Result<std::net::TcpListener>)> {
        self.sockets.iter().map(|(a, l)| (*a, l.try_clone())).collect()
    }

    /// The (name, address) of every listener.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// Publishes a new pool snapshot from `cfg`, a config every backend of which is to be in
    /// the pools (see [`Proxy::update_keeping`]). Per-backend live state (in-flight counts,
    /// passive failures, request counts) carries over.
    pub fn update(&mut self, cfg: &Config) {
        self.update_keeping(cfg, cfg);
    }

    /// Publishes a new pool snapshot from the effective config `cfg` (dead backends removed,
    /// drained ones at weight 0), where `configured` is the config it was made from. Every
    /// backend `configured` lists keeps its live state (in-flight count, passive failures or
    /// ejection, request count), those `cfg` leaves out of the pools included: active and
    /// passive health are one view of a backend, so one that passive health ejected (it
    /// accepts and never answers, say) is still ejected when its active check passes again,
    /// and gets its one trial request rather than its full share, and `status` counts its
    /// requests on across health flaps. A backend `configured` no longer lists loses its
    /// state, once nothing in flight holds it.
    pub fn update_keeping(&mut self, cfg: &Config, configured: &Config) {
        let mut vips = HashMap::new();
        let mut keep = HashMap::new();
        let mut rotations = HashMap::new();
        let mut said = HashMap::new();
        let mut rotation = |key: PoolKey| {
            let r = self.rotations.get(&key).cloned().unwrap_or_else(Rotation::new);
            rotations.insert(key, r.clone());
            r
        };
        for vip in &cfg.vips {
            let Some(l7) = &vip.l7 else { continue };
            let mut member = |b: &crate::config::Backend| {
                let addr = SocketAddr::new(b.address, b.port);
                // One state per address however many of the VIP's pools list it: the one an
                // earlier pool of this update took, not a fresh one (at a start `states` is empty).
                let key = (vip.name.clone(), addr);
                let state = keep.entry(key).or_insert_with_key(|k| self.live_state(k)).clone();
                Member { state, weight: b.weight, up: true }
            };
            // A cookie with a Domain is shared by every host under it: a host route's then has
            // a name of its own (see `Pool::scope_cookie`).
            let domain = l7.cookie_domain.is_some();
            let signed = |mut pool: Pool, host: Option<&str>, prefix: Option<&str>| {
                if pool.algorithm == Algorithm::Cookie {
                    pool.sign_cookies(&l7.cookie_secret, l7.cookie_secret_previous.as_deref());
                    pool.scope_cookie(&l7.cookie_name, host.filter(|_| domain), prefix);
                    pool.set_cookie_attributes(&l7.cookie_attributes, l7.cookie_max_age.is_some());
                }
                pool
            };
            let default = Arc::new(signed(
                Pool::continuing(
                    vip.backends.iter().map(&mut member).collect(),
                    l7.algorithm,
                    rotation((vip.name.clone(), None)),
                ),
                None,
                None,
            ));
            let routes = Routes::new(l7.routes.iter().map(|r| {
                let key = (vip.name.clone(), Some((r.host.clone(), r.path_prefix.clone())));
                let pool = Pool::continuing(
                    r.backends.iter().map(&mut member).collect(),
                    r.algorithm,
                    rotation(key),
                );
                // A route written with the root dot matches requests with or without it.
                let host = r.host.as_deref().map(route_host);
                let pool = signed(pool, host.as_deref(), r.path_prefix.as_deref());
                (host, r.path_prefix.clone(), Arc::new(pool))
            }));
            let m = &self.shared.metrics;
            let class = |c: &str| {
                m.requests
                    .get_or_create(&RequestLabels { vip: vip.name.clone(), class: c.to_owned() })
                    .clone()
            };
            let label = VipLabel { vip: vip.name.clone() };
            // Made here at 0, not at the first connection: an idle VIP is shown too.
            let _ = m.active.get_or_create(&label);
            // Only HTTP VIPs close idle connections for room (a TCP-mode one has none idle).
            if l7.mode == L7Mode::Http {
                let _ = m.closed_for_room.get_or_create(&label);
            }
            vips.insert(
                vip.name.clone(),
                Arc::new(VipRuntime {
                    name: vip.name.clone(),
                    cfg: l7.clone(),
                    routes,
                    default,
                    requests: [
                        class("1xx"),
                        class("2xx"),
                        class("3xx"),
                        class("4xx"),
                        class("5xx"),
                    ],
                    duration: m.duration.get_or_create(&label).clone(),
                    retries: m.retries.get_or_create(&label).clone(),
                    fail_open: m.fail_open.get_or_create(&label).clone(),
                    // Only an HTTP VIP's connections can be made private (a TCP-mode one relays
                    // its client's own connection).
                    private_connections: match l7.mode {
                        L7Mode::Http => m.private_connections.get_or_create(&label).clone(),
                        L7Mode::Tcp => Counter::default(),
                    },
                    tcp_connections: tcp::Outcome::ALL.map(|o| {
                        if l7.mode != L7Mode::Tcp {
                            return Counter::default();
                        }
                        let outcome = o.as_str().to_owned();
                        m.tcp_connections
                            .get_or_create(&TcpLabels { vip: vip.name.clone(), outcome })
                            .clone()
                    }),
                    responses_cut: http::Cut::ALL.map(|c| {
                        let side = c.as_str().to_owned();
                        m.responses_cut
                            .get_or_create(&CutLabels { vip: vip.name.clone(), side })
                            .clone()
                    }),
                    request_bodies_cut: http::Cut::ALL.map(|c| {
                        let side = c.as_str().to_owned();
                        m.request_bodies_cut
                            .get_or_create(&CutLabels { vip: vip.name.clone(), side })
                            .clone()
                    }),
                    metrics: m.clone(),
                    said: said
                        .entry(vip.name.clone())
                        .or_insert_with(|| self.said.get(&vip.name).cloned().unwrap_or_default())
                        .clone(),
                }),
            );
        }
        // Backends out of the pools but still configured (down by active health) keep their
        // state: one VIP's own backends and its routes' alike, one state per address. Every
        // kept state takes the VIP's `fail_timeout` now in force, for an ejection running too
        // (`BackendState::retime`).
        for vip in &configured.vips {
            let Some(l7) = &vip.l7 else { continue };
            for b in vip.l7_backends() {
                let key = (vip.name.clone(), SocketAddr::new(b.address, b.port));
                let state = keep.entry(key).or_insert_with_key(|k| self.live_state(k));
                state.retime(l7.fail_timeout);
            }
        }
        let left: Vec<_> = self.states.drain().filter(|(k, _)| !keep.contains_key(k)).collect();
        self.retired.retain(|k, w| w.strong_count() > 0 && !keep.contains_key(k));
        for (k, s) in left {
            self.retired.insert(k, Arc::downgrade(&s));
        }
        let mut live: Vec<_> = keep.iter().map(|((v, _), s)| (v.clone(), s.clone())).collect();
        live.sort_by(|a, b| (&a.0, a.1.addr).cmp(&(&b.0, b.1.addr)));
        *self.shared.metrics.live.0.lock().unwrap_or_else(PoisonError::into_inner) = live;
        self.states = keep;
        self.rotations = rotations;
        self.said = said;
        self.shared.snapshot.store(Arc::new(Snapshot { vips }));
        // After the store: a connection that sees the new count finds the new snapshot.
        self.shared.generation.0.fetch_add(1, Ordering::Release);
    }

    /// The live state of backend `key` (VIP name, address): the one it has; or the one it had
    /// when the last updates left it out, if something still holds that (a request in flight,
    /// whose end must count down the in-flight figure the balancer reads; or an idle thread's
    /// old snapshot), with its history forgotten (`BackendState::forget_history`: a backend
    /// added back starts from zero, as a reload that removes it forgets it); else a fresh one.
    fn live_state(&self, key: &(String, SocketAddr)) -> Arc<BackendState> {
        if let Some(s) = self.states.get(key) {
            return s.clone();
        }
        match self.retired.get(key).and_then(std::sync::Weak::upgrade) {
            Some(s) => {
                s.forget_history();
                s
            }
            None => Arc::new(BackendState::new(key.1)),
        }
    }

    /// Live state of a backend of an L7 VIP (for tests and status): of every configured one,
    /// those active health took out of the pools included.
    pub fn backend_state(&self, vip: &str, addr: SocketAddr) -> Option<Arc<BackendState>> {
        self.states.get(&(vip.to_owned(), addr)).cloned()
    }

    /// Requests (TCP mode: connections) sent to the backends of L7 VIP `vip`, its route pools'
    /// included (which `status` lists apart), each backend counted once however many of the
    /// VIP's pools list it: the VIP's total for `status`.
    pub fn vip_requests(&self, vip: &str) -> u64 {
        self.states
            .iter()
            .filter(|((v, _), _)| v == vip)
            .map(|(_, s)| s.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// A handle that ends a [`Proxy::shutdown`] before its deadline, from another thread (a
    /// second stop signal: an operator who will not wait for the drain).
    pub fn cut_short(&self) -> CutShort {
        CutShort(self.shared.clone())
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace` (or until
    /// [`CutShort::now`]), then resets the connections still open ([`wait_forced`]) and stops
    /// the threads.
    pub fn shutdown(mut self, grace: Duration) {
        self.drain(DrainKind::Stop).wait(grace);
    }

    /// Client connections idle between keep-alive requests now, all VIPs and threads (as
    /// `max_connections` room-making counts them, [`reuse`]): those a takeover's drain keeps,
    /// for its log line.
    pub fn idle_clients(&self) -> usize {
        self.shared.idle_clients()
    }

    /// Stops accepting and hands back the drain to wait for ([`Draining::wait`], on a thread of
    /// its own if need be); `kind` says what becomes of the connections idle between keep-alive
    /// requests ([`DrainKind`]): the caller knows whether a new process serves after this one.
    /// The proxy itself stays with its owner meanwhile: its live state (request counts, passive
    /// health) can still be read for `status`, and pool updates still reach the connections
    /// that are finishing (a backend found dead during a stop's drain is sent none of their
    /// further requests). Once the wait returns its threads have ended: it is only dropped.
    ///
    /// The descriptors kept to hand over ([`Proxy::sockets`]) close here, at the start, as the
    /// accept loops' own do once they see the stop: a draining proxy hands nothing over any
    /// more, and kept to the drain's end they held every listener open, so that the kernel went
    /// on completing handshakes into a backlog nobody read, and a new client hung until the
    /// drain deadline reset it (30 s by default) instead of being refused at once and trying
    /// elsewhere. Only this process's descriptors close (never `shutdown`, which would act on
    /// the socket itself): a socket another holds stays listening, its connections queued for
    /// the next process: systemd's (socket activation), or that of a takeover's new process,
    /// which has its own descriptors.
    pub fn drain(&mut self, kind: DrainKind) -> Draining {
        self.sockets.clear();
        // Before `stopping`, which is what the connections and accept loops look at first.
        self.shared.keep_idle.store(kind == DrainKind::Takeover, Ordering::SeqCst);
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.stop.notify_waiters();
        Draining { shared: self.shared.clone(), threads: std::mem::take(&mut self.threads) }
    }
}

/// A proxy's drain under way ([`Proxy::drain`]): what waiting for it needs, apart from the
/// proxy's live state, which its owner keeps reading meanwhile.
pub struct Draining {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Draining {
    /// Lets in-flight requests finish for up to `grace` (or until [`CutShort::now`]), then
    /// resets the connections still open ([`wait_forced`]) and stops the threads. Returns as
    /// soon as no connection is left: those a takeover's drain keeps idle included, once each
    /// has been used, closed by its client or timed out.
    pub fn wait(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while (self.shared.accepting.load(Ordering::SeqCst) > 0
            || self.shared.open.load(Ordering::SeqCst) > 0)
            && Instant::now() < deadline
            && !self.shared.force.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self.shared.open.load(Ordering::SeqCst);
        // Those idle between keep-alive requests (a takeover's drain keeps them) close as
        // their idle timeout closes them, with a FIN (`http::serve`); those whose close waits
        // for their peer to take the end of a complete answer (or lingers after it) are handed
        // to the kernel, which delivers it; the others, in the middle of an exchange, are
        // reset (`accept_loop`).
        let idle = self.shared.idle_clients().min(left);
        let handed = self.shared.closing.load(Ordering::SeqCst).min(left - idle);
        let reset = left - idle - handed;
        let said = [
            (idle, "closing the idle connections left"),
            (handed, "handing those still delivering a complete answer to the kernel"),
            (reset, "resetting the rest"),
        ];
        let said: Vec<&str> = said.iter().filter(|(n, _)| *n > 0).map(|(_, s)| *s).collect();
        let said = said.join(", ");
        if reset > 0 {
            warn!(idle, handed, reset, "L7 drain deadline passed; {said}");
        } else if left > 0 {
            info!(idle, handed, "L7 drain deadline passed; {said}");
        }
        self.shared.end_now();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Ends a proxy's drain at once: see [`Proxy::cut_short`].
pub struct CutShort(Arc<Shared>);

impl CutShort {
    /// Resets the connections still open; [`Proxy::shutdown`] returns once its threads end.
    pub fn now(&self) {
        self.0.end_now();
    }

    /// L7 client connections still open.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::SeqCst)
    }
}

/// Submission-queue size of each proxy thread's io_uring. tokio-uring hands queued operations to
/// the kernel only when the thread goes idle or the queue is full, so under sustained load this
/// bounds how long an operation can wait before it starts: small, for latency (a queue of 4096
/// gave a p99 of 30-90 ms at 20 000 req/s here, against 10-25 ms at 64).
const URING_SQ_ENTRIES: u32 = 64;
/// Completion-queue size: every operation in flight needs room (an idle read per client
/// connection and per pooled backend connection, a read and a write per request upstream), or
/// completions overflow into the kernel's slow path and submissions fail with EBUSY until they
/// are reaped.
const URING_CQ_ENTRIES: u32 = 16_384;

/// The io_uring of one proxy thread, but for its submission-queue size.
fn uring_ring() -> io_uring::Builder {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_cqsize(URING_CQ_ENTRIES);
    // Completions arriving while the thread runs are handled at its next system call instead of
    // interrupting it with an IPI to run io_uring's task work (perf at 20 000 req/s: a quarter of
    // the thread's time went to that interrupt path). A thread asleep in epoll_wait is still
    // woken at once.
    ring.setup_coop_taskrun();
    ring
}

/// The runtime of one proxy thread.
fn uring_runtime() -> tokio_uring::Builder {
    let mut b = tokio_uring::builder();
    b.entries(URING_SQ_ENTRIES).uring_builder(&uring_ring());
    b
}

/// One proxy thread: accept loops until the proxy stops, then this thread's connections finish
/// until the grace period ends (dropping the runtime then closes whatever is left, unless
/// tokio-uring panicked on the thread: `uring::end_runtime`).
async fn run_thread(
    socks: Vec<(String, SocketAddr, L7Mode, std::net::TcpListener)>,
    shared: Arc<Shared>,
    thread: usize,
) {
    // Dropped last, as this ends: what the runtime still has in flight then is not freed
    // under the kernel (`uring::Held`).
    let _end = uring::RuntimeEnd::arm();
    let upstream = http::UpstreamPool::default();
    // Idle backend connections past their time are closed even if no request asks for their
    // backend again.
    // Each of this thread's own tasks ends the process if it panics (`panics::or_exit_task`).
    let name = thread_name(thread);
    let sweeping = tokio_uring::spawn(crate::panics::or_exit_task(
        name.clone(),
        upstream.clone().sweep_every(),
    ));
    // This thread's idle client connections, one set per VIP (a VIP may have several
    // listeners here), each closing those other threads claim.
    let mut idle: HashMap<String, reuse::Idle> = HashMap::new();
    let mut closers = Vec::new();
    let mut accepts = Vec::new();
    for (vip, addr, mode, l) in socks {
        let shared = shared.clone();
        let upstream = upstream.clone();
        let idle = idle
            .entry(vip.clone())
            .or_insert_with(|| {
                // Every listener's VIP has its shelves (`Proxy::start_bound`).
                let shelves =
                    shared.idle.get(&vip).cloned().unwrap_or_else(|| reuse::shelves(thread + 1));
                // Only an HTTP VIP's has a series ([`Proxy::update_keeping`]); a TCP-mode one
                // never makes room.
                let closed = match mode {
                    L7Mode::Http => shared
                        .metrics
                        .closed_for_room
                        .get_or_create(&VipLabel { vip: vip.clone() })
                        .clone(),
                    L7Mode::Tcp => Counter::default(),
                };
                let i = reuse::Idle::new(shelves, thread, closed);
                closers.push(tokio_uring::spawn(crate::panics::or_exit_task(
                    name.clone(),
                    i.clone().close_claimed(),
                )));
                i
            })
            .clone();
        accepts.push(tokio_uring::spawn(crate::panics::or_exit_task(name.clone(), async move {
            accept_loop(l, vip, addr, mode, shared.clone(), upstream, idle).await;
            // Every connection this loop took is counted in `open` by now.
            shared.accepting.fetch_sub(1, Ordering::SeqCst);
        })));
    }
    for a in accepts {
        let _ = a.await;
    }
    while shared.open.load(Ordering::SeqCst) > 0 && !shared.force.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not when it ends as every connection closed: the grace period is not over then.
    if shared.force.load(Ordering::SeqCst) {
        FORCED.with(Forced::end);
    }
    // Past the grace period, every connection's task resets its connections as soon as it runs
    // (`accept_loop`): it gets the turn to, before the runtime goes with whatever is left.
    let until = tokio::time::Instant::now() + FORCED_END;
    while shared.open.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sweeping.abort();
    // Idle: closed with a reset, which leaves no TIME_WAIT here (`close_idle`).
    upstream.close_all();
    for c in &closers {
        c.abort();
    }
}

/// How long a proxy thread waits, past the grace period, for its connections' tasks to reset
/// them (each does at its next turn: a bound, not a wait one should meet).
const FORCED_END: Duration = Duration::from_millis(200);

/// Did a call fail for want of this process's or the system's resources (descriptors,
/// buffers, memory), not because of the peer? Such a failure says nothing of the other end.
pub(crate) fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Did connecting to a backend fail on this node's side: out of resources
/// ([`out_of_resources`]), or of local ports towards that backend (EADDRNOTAVAIL)? Such a
/// failure says nothing of the backend, and is not charged to it.
pub(crate) fn local_failure(e: &std::io::Error) -> bool {
    out_of_resources(e) || e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
}

/// At most one log line per [`Throttle::EVERY`] (process-wide in a static, or per owner), for
/// an event that can come in floods (one per connection, or per probe): the line says it, and a
/// counter counts every one.
#[derive(Debug, Default)]
pub(crate) struct Throttle(std::sync::Mutex<Option<Instant>>);

impl Throttle {
    /// How often a throttled line may be said.
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// A throttle that lets the first line through.
    pub(crate) const fn new() -> Throttle {
        Throttle(std::sync::Mutex::new(None))
    }

    /// Whether a line may be logged now; if so, the next one waits [`Throttle::EVERY`].
    pub(crate) fn ready(&self) -> bool {
        let mut last = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ready = last.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if ready {
            *last = Some(Instant::now());
        }
        ready
    }
}

/// Logs a [`local_failure`] of VIP `vip`, at most once every 10 s for the VIP ([`VipLines`]):
/// one line says it (the error and one backend it happened with), where a flood of them would
/// drown the log. The throttle was the whole process's, so that one VIP's line hid another's.
pub(crate) fn say_local_failure(vip: &VipRuntime, backend: SocketAddr, e: &std::io::Error) {
    if vip.said.local_failure.ready() {
        warn!(vip = vip.name, %backend, error = %e, "cannot connect to backends: this node is out of descriptors, memory or local ports (the backends are not blamed; clients get 503); said at most every 10 s");
    }
}

/// Accepts connections on `l` until the proxy stops, and then closes this thread's connections
/// of the VIP idle between keep-alive requests (`idle`, [`reuse::Idle::close_all`]), unless
/// the drain is a takeover's ([`DrainKind::Takeover`]), which leaves them to their next request.
///
/// Accepting goes through tokio's readiness reactor (which tokio-uring's runtime also runs), not
/// an io_uring accept: an io_uring accept abandoned at stop stays armed in the kernel and would
/// take (and lose) connections after the proxy stopped accepting, and keep the listener open. A
/// readiness wait is dropped cleanly, so once stopping, this thread's descriptor closes at once;
/// connections still queued on a socket the service manager holds, or that was handed to the
/// edgelb taking over, wait for the next process.
async fn accept_loop(
    l: std::net::TcpListener,
    vip: String,
    listen: SocketAddr,
    mode: L7Mode,
    shared: Arc<Shared>,
    upstream: http::UpstreamPool,
    idle: reuse::Idle,
) {
    let l = match l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l)) {
        Ok(l) => l,
        Err(e) => {
            error!(vip, error = %e, "cannot accept on the L7 listener");
            return;
        }
    };
    let label = VipLabel { vip: vip.clone() };
    // This loop's pause; what is said, the VIP's loops' together.
    let mut failures = crate::accept::AcceptFailures::default();
    let said = shared.accept_failures.get(&vip).cloned().unwrap_or_default();
    loop {
        // Stopping first: once it is set, no further connection is taken off the socket (one
        // the service manager holds keeps it for the next process).
        let accepted = tokio::select! {
            biased;
            _ = wait_stopping(&shared) => return leave_idle(&shared, &idle),
            r = l.accept() => r,
        };
        // io_uring honours O_NONBLOCK (an operation that would wait fails with EAGAIN instead),
        // so the accepted socket goes back to blocking mode for tokio-uring.
        let accepted = accepted.and_then(|(s, peer)| {
            let s = s.into_std()?;
            s.set_nonblocking(false)?;
            Ok((tokio_uring::net::TcpStream::from_std(s), peer))
        });
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                shared.metrics.accept_errors.get_or_create(&label).inc();
                // The connection stays queued and the listener readable: without a pause this
                // would spin the core (and every connection on it) and flood the log.
                let failed = failures.failed(&e);
                if let Some(say) = said.failed(&e) {
                    warn!(vip, error = %e, "{say}");
                }
                let Some(pause) = failed.pause else {
                    tracing::debug!(vip, error = %e, "a connection failed as it was accepted");
                    continue;
                };
                tokio::select! {
                    biased;
                    _ = wait_stopping(&shared) => return leave_idle(&shared, &idle),
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        // Ends this loop's run, if one is under way (its next pause starts afresh); the VIP's
        // is said here once every loop's has gone quiet.
        let _ = failures.accepted();
        if let Some(failed) = said.accepted() {
            info!(vip, failed, "accepting connections again");
        }
        let Some(rt) = shared.snapshot.load().vips.get(&vip).cloned() else { continue };
        // A TCP-mode connection is a relay from the start: its silences are the tunnel's.
        let stall = match mode {
            L7Mode::Http => rt.cfg.idle_timeout,
            L7Mode::Tcp => rt.cfg.tunnel_timeout,
        };
        let stream = uring::Socket::new(stream, stall);
        let counted = Counted::new(&shared, &label);
        let (shared2, upstream2, idle2) = (shared.clone(), upstream.clone(), idle.clone());
        tokio_uring::spawn(async move {
            let client = stream.clone();
            // A refusal's close lingers, handed to the kernel at the deadline like any other
            // (its answer is complete), but is not counted open, nor so in `closing`.
            let refused = std::cell::Cell::new(false);
            let work = async {
                // Moved in whole, so the connection stays counted until this task ends.
                let counted = counted;
                // Over the limit, an HTTP connection idle between requests (of any thread) is
                // closed to make room if there is one: its client reconnects when it has
                // another request, where this one would be refused now.
                let over = counted.open > rt.cfg.max_connections as i64;
                if over && !(mode == L7Mode::Http && idle2.make_room()) {
                    // A refused connection holds no place under the limit while it is answered:
                    // a burst of them must not keep the VIP refusing once its own connections
                    // end.
                    drop(counted);
                    refused.set(true);
                    if mode == L7Mode::Tcp {
                        tcp::refuse(&stream, &rt, peer);
                        return;
                    }
                    let graceful = Refusal::enter(&shared2.refusing);
                    http::refuse(&stream, &rt, peer, graceful.is_some()).await;
                    // A read given up on a timeout stays pending, and keeps the socket open,
                    // until it is shut down (as `http::serve` does).
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                } else {
                    match mode {
                        L7Mode::Http => {
                            http::serve(stream, peer, listen, rt, shared2.clone(), upstream2, idle2)
                                .await
                        }
                        L7Mode::Tcp => tcp::serve(stream, peer, listen, rt).await,
                    }
                }
            };
            // Counted in `closing` from the first time the task waits in its close, for the
            // drain deadline's log line: one Cell read a wake-up.
            let mut work = std::pin::pin!(work);
            let mut closing = None;
            let work = std::future::poll_fn(|cx| {
                let done = work.as_mut().poll(cx);
                if done.is_pending() && closing.is_none() && client.closing() && !refused.get() {
                    closing = Some(Closing::new(&shared2.closing));
                }
                done
            });
            // Past the grace period the connection is reset, not closed: a close would end a
            // response delimited by it, or a relayed stream, as if whole. Not one whose close
            // has begun, its answer or stream complete, waiting for its peer to take the end
            // of it: that one is handed to the kernel, which delivers the rest on its own
            // (`uring::Socket::end_at_deadline`; reset, a slow reader lost it). Its work goes
            // first, so that a response cut here is counted and logged (`http::Cut::Drain`);
            // dropping the work ends a relay's backend connection alike (`tcp::relay`).
            tokio::select! {
                biased;
                () = work => {}
                () = wait_forced(&shared2) => client.end_at_deadline(),
            }
        });
    }
}

/// What an accept loop does, once the proxy stops, with its thread's connections of the VIP
/// idle between keep-alive requests: closes them at a stop ([`reuse::Idle::close_all`]), leaves
/// them at a takeover's drain, each to end at its next request, its close, its idle timeout or
/// the drain's deadline (`http::serve`). Nothing new is accepted after this, so none of them is
/// closed to make room for a new connection but for a claim made before.
fn leave_idle(shared: &Shared, idle: &reuse::Idle) {
    if shared.closes_idle() {
        idle.close_all();
    }
}

/// One accepted connection, counted in its VIP's active-connections gauge (its connection
/// count over all threads, which `max_connections` is checked against) and in the proxy's open
/// count (which a stop waits on) for as long as this lives. Released on drop, so that a
/// connection task that ends in any way, a panic included, gives its place back.
struct Counted {
    gauge: Gauge,
    shared: Arc<Shared>,
    /// The VIP's connection count with this one.
    open: i64,
}

impl Counted {
    fn new(shared: &Arc<Shared>, label: &VipLabel) -> Counted {
        shared.open.fetch_add(1, Ordering::SeqCst);
        let gauge = shared.metrics.active.get_or_create(label).clone();
        let open = gauge.inc() + 1;
        Counted { gauge, shared: shared.clone(), open }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A client connection counted in [`Shared::closing`] while this lives: its close has begun, and
/// waits for its peer to take what the kernel holds for it. Given back on drop, as the task
/// ends.
struct Closing<'a>(&'a AtomicUsize);

impl<'a> Closing<'a> {
    /// Counts one more in `count`.
    fn new(count: &'a AtomicUsize) -> Closing<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Closing(count)
    }
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Returns once the proxy is stopping. A notification, not a poll: every accept loop waits
/// here. Connections idle between keep-alive requests do not: the accept loops close them
/// ([`reuse::Idle::close_all`]; a takeover's drain leaves them be, [`leave_idle`]), as a wait
/// each, registered and dropped per request, took the `Notify`'s lock, shared by every thread,
/// two or three times a request.
pub(crate) async fn wait_stopping(shared: &Shared) {
    wait_set(&shared.stopping, &shared.stop).await;
}

thread_local! {
    /// This proxy thread's view of the end of a stop's grace period ([`wait_forced`]).
    static FORCED: Forced = Forced::default();
}

/// The end of a stop's grace period as one proxy thread sees it: `over` set, and the tasks
/// waiting for it woken, by [`run_thread`] once it sees [`Shared::force`] (within 20 ms). Of
/// the thread, with no lock nor atomic operation: a connection's task polls its wait at every
/// wake-up, and a `Notify` (one per thread before) takes its lock at every poll.
#[derive(Default)]
struct Forced {
    /// The grace period is over.
    over: std::cell::Cell<bool>,
    /// The waiting tasks' wakers, by slot ([`WaitForced::slot`]), which a wait keeps until it
    /// is dropped (emptied, not freed, as [`Forced::end`] wakes it).
    wakers: std::cell::RefCell<slab::Slab<Option<std::task::Waker>>>,
}

impl Forced {
    /// The grace period is over: every wait returns, and the tasks waiting are woken.
    fn end(&self) {
        self.over.set(true);
        let woken: Vec<_> =
            self.wakers.borrow_mut().iter_mut().filter_map(|(_, w)| w.take()).collect();
        woken.into_iter().for_each(std::task::Waker::wake);
    }

    /// Keeps `waker` in `slot` (taking a free one if it has none yet) to be woken by
    /// [`Forced::end`]; cloned only when it is not the one kept already.
    fn register(&self, slot: &mut Option<usize>, waker: &std::task::Waker) {
        let mut slots = self.wakers.borrow_mut();
        let k = *slot.get_or_insert_with(|| slots.insert(None));
        let kept = &mut slots[k];
        if !kept.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *kept = Some(waker.clone());
        }
    }

    /// Frees slot `k`.
    fn release(&self, k: usize) {
        self.wakers.borrow_mut().try_remove(k);
    }
}

/// A wait for the end of a stop's grace period ([`wait_forced`], [`wait_forced_in_task`]).
pub(crate) struct WaitForced<'a> {
    shared: &'a Shared,
    /// Whether it wakes its task at the end (else another wait of the same task does).
    wakes: bool,
    /// Polled before: [`Shared::force`] is looked at only the first time.
    polled: bool,
    /// Its task's waker's slot in [`Forced`], once it has one.
    slot: Option<usize>,
}

impl std::future::Future for WaitForced<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        // A wait begun after the grace period ended returns at once; one begun before returns
        // once its thread has seen it (`run_thread`).
        let first = !self.polled;
        if FORCED.with(|f| f.over.get()) || (first && self.shared.force.load(Ordering::SeqCst)) {
            return Poll::Ready(());
        }
        self.polled = true;
        if self.wakes {
            let w = &mut *self;
            FORCED.with(|f| f.register(&mut w.slot, cx.waker()));
        }
        Poll::Pending
    }
}

impl Drop for WaitForced<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.slot {
            // Not while the thread's locals go: nothing is woken then.
            let _ = FORCED.try_with(|f| f.release(k));
        }
    }
}

/// Returns once the grace period of a stop is over (at its deadline, or cut short): every
/// connection's task waits here, once (its client connection is then reset, or handed to the
/// kernel if its close has begun: `uring::Socket::end_at_deadline`). Called on a proxy
/// thread only.
pub(crate) fn wait_forced(shared: &Shared) -> WaitForced<'_> {
    WaitForced { shared, wakes: true, polled: false, slot: None }
}

/// [`wait_forced`] within a connection's task that waits there already (`accept_loop`), whose
/// wait wakes the task: this one only looks, at each poll, with nothing registered (the
/// response streamed by each request of the connection waits here, to count and log its cut).
pub(crate) fn wait_forced_in_task(shared: &Shared) -> WaitForced<'_> {
    WaitForced { shared, wakes: false, polled: false, slot: None }
}

/// [`wait_forced_in_task`] as this thread sees it alone ([`Forced::over`], set when its
/// [`run_thread`] has seen [`Shared::force`]): for the wait of a keep-alive connection for its
/// next request, which every request makes, without an atomic load of a line other threads
/// write. The task's own [`wait_forced`] wakes it once the thread has seen the end.
pub(crate) fn wait_forced_seen(shared: &Shared) -> WaitForced<'_> {
    WaitForced { shared, wakes: false, polled: true, slot: None }
}

/// Returns once `flag` is set, woken by `notify` (which the setter notifies after setting it).
async fn wait_set(flag: &AtomicBool, notify: &tokio::sync::Notify) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is checked, so a notification in between is not missed.
        notified.as_mut().enable();
        if flag.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// The client address as the proxy reports it (IPv4-mapped IPv6 shown as IPv4).
pub(crate) fn client_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routes kept by host still match as when tried one by one in file order: the first
    /// route that matches wins, whether it names the host or not, and a host's routes never
    /// answer another host (or a request without one).
    #[test]
    fn routes_by_host_keep_file_order() {
        let pools: Vec<Arc<Pool>> = (0..5)
            .map(|_| Arc::new(Pool::new(Vec::new(), crate::config::Algorithm::RoundRobin)))
            .collect();
        let host = |h: &str| Some(h.to_owned());
        let prefix = |p: &str| Some(p.to_owned());
        let routes = Routes::new([
            (host("a.example"), prefix("/api"), pools[0].clone()),
            (None, prefix("/static"), pools[1].clone()),
            (host("a.example"), None, pools[2].clone()),
            (host("b.example"), prefix("/static"), pools[3].clone()),
            (None, None, pools[4].clone()),
        ]);
        // The index of the pool found, if any.
        let found = |host: Option<&str>, path: &str| {
            routes.find(host, path).map(|f| pools.iter().position(|p| Arc::ptr_eq(p, f)).unwrap())
        };
        assert_eq!(found(Some("a.example"), "/api/x"), Some(0));
        assert_eq!(
            found(Some("a.example"), "/static/x"),
            Some(1),
            "an earlier route for every host wins"
        );
        assert_eq!(found(Some("a.example"), "/other"), Some(2));
        assert_eq!(
            found(Some("b.example"), "/static/x"),
            Some(1),
            "an earlier route for every host wins"
        );
        assert_eq!(found(Some("b.example"), "/other"), Some(4));
        assert_eq!(
            found(Some("c.example"), "/api"),
            Some(4),
            "a.example's routes answer no other host"
        );
        assert_eq!(found(None, "/api"), Some(4));
        assert!(!routes.is_empty() && Routes::default().is_empty());
        assert_eq!(Routes::default().find(Some("a.example"), "/").map(|_| ()), None);
    }

    /// A request's host is spelled as routes compare it without a copy when it already is
    /// (lowercase, no root dot, no IPv6 literal), and canonicalised when not.
    #[test]
    fn route_hosts_are_spelled_as_routes_compare_them() {
        for (h, want, borrowed) in [
            ("api.example", "api.example", true),
            ("API.Example", "api.example", false),
            ("api.example.", "api.example", false),
            ("[2001:0db8::1]", "[2001:db8::1]", false),
            ("198.18.0.1", "198.18.0.1", true),
        ] {
            let got = route_host_cow(h);
            assert_eq!(got, want, "{h}");
            assert_eq!(matches!(got, std::borrow::Cow::Borrowed(_)), borrowed, "{h}");
            assert_eq!(route_host(h), want, "{h}");
        }
    }

    /// A request of 35 s, a 504 after the default response timeout (30 s) say, lands in a finite
    /// bucket of the latency histogram, as do those up to 300 s: it stopped at 10 s.
    #[test]
    fn the_latency_histogram_reaches_past_the_default_timeouts() {
        let mut registry = Registry::default();
        let h = latency_histogram();
        registry.register("d", "d", h.clone());
        h.observe(Duration::from_secs(35));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        let bucket = |le: &str| {
            let start = format!("d_bucket{{le=\"{le}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(&start)).map(str::to_owned)
        };
        assert_eq!(bucket("30.0").as_deref(), Some("0"), "{text}");
        assert_eq!(bucket("60.0").as_deref(), Some("1"), "{text}");
        assert_eq!(bucket("120.0").as_deref(), Some("1"), "{text}");
        assert_eq!(bucket("300.0").as_deref(), Some("1"), "{text}");
    }

    /// A TCP-mode VIP's "no backend" line is said at most every 10 s: its throttle is carried
    /// over the updates every health change, drain and reload make. It was made anew at each,
    /// so a dead pool's line came back after any flip anywhere.
    #[test]
    fn the_no_backend_throttle_holds_across_updates() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\n\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = {port}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = 9 }}]\n[vip.l7]\nmode = \"tcp\"\n"
        );
        let cfg = Config::parse(&text, "t.toml".as_ref()).expect("a valid config");
        let mut proxy =
            Proxy::start(&cfg, 1, crate::metrics::Metrics::new().l7.clone()).expect("proxy starts");
        let said = |p: &Proxy| p.shared.snapshot.load().vips["web"].said.clone();
        assert!(said(&proxy).no_backend.ready(), "the first line is said");
        proxy.update(&cfg);
        assert!(!said(&proxy).no_backend.ready(), "and not again within 10 s, across an update");
        proxy.shutdown(Duration::ZERO);
    }
}
