//! The admin socket: a root-only Unix socket (mode 0600, in a 0700 directory) through which
//! `edgelb status | drain | undrain | reload | stop` talk to the running controller.
//!
//! One JSON request per connection, one JSON response back. The listener thread only forwards
//! requests to the controller loop, which owns all state, so there is no locking. One request
//! carries more: `handover`, sent by `edgelb run --takeover`, is answered with the running
//! edgelb's listening sockets attached (SCM_RIGHTS, [`fdpass`]), and its connection stays open
//! until the new process says it is serving.

pub mod fdpass;

use std::{
    io::{BufRead, BufReader, Read as _, Write},
    net::SocketAddr,
    net::{IpAddr, Ipv6Addr},
    os::{
        fd::{AsFd, OwnedFd},
        unix::{
            fs::{FileTypeExt, PermissionsExt},
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Sender},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// A command for the controller.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Report VIPs, backends, health and counters.
    Status,
    /// Give `backend` weight 0 (in `vip`, or in every VIP listing it): no new flows.
    Drain {
        /// Backend address (every port it is listed on), or address and port.
        backend: BackendRef,
        /// Only in this VIP (name).
        vip: Option<String>,
    },
    /// Undo a drain.
    Undrain {
        /// Backend address (every port it is listed on), or address and port.
        backend: BackendRef,
        /// Only in this VIP (name).
        vip: Option<String>,
    },
    /// Which backend a new flow from `client` to `vip` gets now: answered from the running
    /// controller's state (the ring XDP indexes, drains and health verdicts included), where
    /// the config file alone cannot tell. A controller older than this request refuses it as a
    /// bad request ([`Response::unknown_request`]); `edgelb route` then answers from the file.
    Route {
        /// Client address.
        client: IpAddr,
        /// VIP name, address (IPv6 bare or in brackets), or address:port / [v6]:port.
        vip: String,
        /// Client source port (5-tuple VIPs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sport: Option<u16>,
        /// The flow's protocol, when a TCP and a UDP VIP share the address and port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proto: Option<crate::config::Protocol>,
    },
    /// Re-read the config file; a bad file is rejected and the running config stays.
    Reload {
        /// The file the operator named (absolute), when the CLI has one: a reload re-reads the
        /// file edgelb runs with, so another one is refused rather than silently not read.
        /// Absent from older clients.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<std::path::PathBuf>,
    },
    /// Stop the controller. `detach`: leave XDP attached and the maps pinned (a later `edgelb
    /// run` adopts them); otherwise tear the data plane down too.
    Stop {
        /// Leave the data plane running.
        detach: bool,
    },
    /// From `edgelb run --takeover`: stop the controller (health checks, map writes, this
    /// socket) but leave the data plane running, answer with the listening sockets (L7 VIPs,
    /// metrics) attached, and keep serving on them. The new process then writes [`COMMIT`]
    /// before it writes the maps (answered with [`GO`]) and [`READY`] once it serves; the old
    /// one then finishes the requests in flight and exits. If the new process hangs up, or
    /// goes quiet for [`HANDOVER_WAIT`], before its commit went through, the old one takes its
    /// controller back up and goes on; if it hangs up after, the old one also takes the data
    /// plane back (its program on the links, its config in the maps). The sockets stay open throughout, so no connection is
    /// refused in between. A stop signal to the old one shuts the connection down
    /// ([`HandoverCut`]): it exits, and a new process not yet told [`GO`] cannot commit.
    Handover {
        /// The process taking over binds its admin socket over the path ([`bind_over`]) while
        /// the old one still listens there, so the old one leaves the path as it is. Absent
        /// (false) from an older edgelb taking over (a rollback), which binds only where nobody
        /// answers ([`bind`]): for it the old one removes the path before it answers, as it
        /// always did, or it would find the old listener answering and give the takeover up.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        binds_over: bool,
        /// The build of the process taking over ([`crate::build::VERSION_LINE`]), for the old
        /// one to log whom it hands over to. Absent from an older edgelb taking over; an older
        /// running edgelb ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        build: Option<String>,
    },
}

/// What the process taking over writes on the handover connection before it first writes the
/// maps; it goes on only once it reads [`GO`].
pub const COMMIT: &[u8] = b"commit\n";
/// The handing-over process's answer to [`COMMIT`]: from here on it will not take back over.
pub const GO: &[u8] = b"go\n";
/// What the process taking over writes on the handover connection once it serves.
pub const READY: &[u8] = b"ready\n";

/// How a handover ended, as the handing-over process saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoverEnd {
    /// The new process serves.
    Ready,
    /// The new process gave up (or went quiet) before it touched the data plane: the old one
    /// may take back over.
    Abandoned,
    /// The new process hung up after it started writing the maps: it failed and is exiting
    /// (its handover connection closes only when its start fails), so the old one takes the
    /// data plane back.
    FailedAfterCommit,
    /// The new process went quiet (or said something else) after it started writing the maps:
    /// it may still be running, so the old one stops rather than run beside it.
    AbandonedAfterCommit,
}

/// What a handed-over socket is for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketKind {
    /// An L7 VIP's listener.
    L7,
    /// The Prometheus endpoint.
    Metrics,
    /// A kind a later edgelb hands over that this one does not know (rolling back to an older
    /// build, say): the answer is still read, and that socket closed with a warning, rather
    /// than the whole handover failing to parse and the takeover failing without a word why.
    #[serde(other)]
    Unknown,
}

/// One socket of a handover answer, in the order of the attached descriptors.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandedSocket {
    /// What it is for.
    pub kind: SocketKind,
    /// The address it listens on.
    pub addr: SocketAddr,
}

/// The controller's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What happened, or why not.
    pub message: String,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For `handover`: the attached sockets, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<HandedSocket>,
    /// For `handover`: the runtime drains (`edgelb drain`), which outlive the process that
    /// took them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drains: Vec<Drain>,
    /// For `handover`: the backends the health checks hold dead, which the next process keeps
    /// out until its own checks see them rise (rather than serving them for `fall` probes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<Down>,
    /// For `handover`: the VIPs of the running config, for the next process to carry the drains
    /// and verdicts over to its own config as a reload would (a VIP renamed, or moved to another
    /// port; a backend added held until its check passes). Absent from an older edgelb's
    /// handover (and read as absent when it does not parse: a newer edgelb's, with a protocol or
    /// forwarding mode this one does not know), which is then taken as before, without those
    /// steps; an older edgelb taking over ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient_vips")]
    pub vips: Option<Vec<HandedVip>>,
    /// For `handover`: the [`crate::config::content_hash`] of the config file as the running
    /// controller last applied it (at its start or its last reload), for the next process to
    /// tell whether the file it loaded is that one: a reload that reached the running edgelb
    /// while the next process started would otherwise be lost. Absent from an older edgelb
    /// (the next process then cannot tell, and says so); an older edgelb taking over ignores
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// For `handover`: the running edgelb's build ([`crate::build::VERSION_LINE`]), for the next
    /// process to log which build it took over from: whether an upgrade really swapped the
    /// binary. Absent from an older edgelb (said as such); an older edgelb taking over ignores
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The refusal is the config file's fault (a `reload` of an invalid file): the CLI exits 2,
    /// as `edgelb check` does for it, rather than 1, so scripts can tell it from a reload that
    /// needs a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bad_config: bool,
    /// The refusal is the request's fault (a `route` naming no VIP, say): the CLI exits 2, as
    /// for bad arguments.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bad_request: bool,
    /// For `route`: the backend a new flow gets now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteAnswer>,
    /// For `stop`: how long the controller may drain its L7 requests before it exits (its
    /// running `node.l7_drain_timeout_ms`), so that `edgelb stop` waits that long, not as long
    /// as the file on disk says now. Absent from older controllers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_ms: Option<u64>,
    /// A refusal because the controller is already stopping (a SIGTERM, or another `stop`,
    /// draining its L7 requests): `edgelb stop` then waits for it to exit, `drain_ms` at most,
    /// and goes on as with no controller running (removing the data plane it left), rather
    /// than fail for what it asked for anyway. Absent from older controllers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
    /// For `stop` (and a refusal while stopping): whether the controller's exit removes the data
    /// plane (an `edgelb stop` without `--detach` under way), so that a second `stop` says what
    /// will happen rather than guess.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub teardown: bool,
    /// For `stop` (and a refusal while stopping): the controller's process id, for `edgelb stop`
    /// to wait on its exit rather than on its socket's removal, which a controller killed
    /// meanwhile (SIGKILL after a long drain) never does. Absent from older controllers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// A refusal because this edgelb has handed over to a new process (`edgelb run
    /// --takeover`) and only finishes its requests in flight: the request reached it on its
    /// listener before the new process took the socket's path over, and was not carried out.
    /// [`request`] then asks again, and the new process answers (each request is carried out
    /// once, by whichever process took it). Absent from older controllers, which closed such
    /// connections unanswered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_over: bool,
}

/// The running controller's answer to [`Request::Route`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteAnswer {
    /// The VIP the flow reaches (its name).
    pub vip: String,
    /// The backend's address.
    pub backend: IpAddr,
    /// The VIP fails open (every backend that should take new flows is down, and all serve).
    #[serde(default)]
    pub fail_open: bool,
}

/// A health verdict handed over: `backend` (address and port) is dead in VIP `vip`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Down {
    /// The VIP's name.
    pub vip: String,
    /// The backend's address and port.
    pub backend: SocketAddr,
}

/// A VIP of the running config as a handover carries it: what the next process needs to carry
/// the drains and health verdicts over to its own config as a reload does (see
/// [`Response::vips`]). Not the whole config: the next process may be another edgelb version,
/// whose parser the old file need not pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedVip {
    /// The VIP's name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Its port.
    pub port: u16,
    /// Its transport protocol.
    pub protocol: crate::config::Protocol,
    /// How its packets reach the backends.
    pub forwarding: crate::config::Forwarding,
    /// Its backends, by address and port (an XDP VIP's carry the VIP's port).
    pub backends: Vec<SocketAddr>,
    /// Each backend's weight as the running config has it (drains aside), in the order of
    /// `backends`: a backend kept at weight 0 by the next file may have served before, and
    /// whether the VIP was failing open depends on it. Empty from an older edgelb (read as not
    /// handed: the next process then guesses the weights from its own file, as before); an
    /// older edgelb taking over ignores it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<u32>,
    /// Whether the VIP fails open now (every backend that should take new flows is down), as
    /// the running controller has it: a backend the next config adds waits for its check then
    /// (it must not end the fail-open and take the whole VIP unprobed), and starts up otherwise
    /// when no live backend stays. None from an older edgelb, or when built from a config
    /// alone ([`HandedVip::all`]): the next process then infers it from the verdicts and
    /// weights; an older edgelb taking over ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_open: Option<bool>,
}

impl HandedVip {
    /// The VIPs of `cfg`, in file order, with their weights but not their fail-open state,
    /// which is the controller's, not the config's (it fills that in).
    pub fn all(cfg: &crate::config::Config) -> Vec<HandedVip> {
        cfg.vips
            .iter()
            .map(|v| HandedVip {
                name: v.name.clone(),
                address: v.address,
                port: v.port,
                protocol: v.protocol,
                forwarding: v.forwarding,
                backends: v.backends.iter().map(|b| SocketAddr::new(b.address, b.port)).collect(),
                weights: v.backends.iter().map(|b| b.weight).collect(),
                fail_open: None,
            })
            .collect()
    }

    /// The weight `backend` (one of `backends`) had in the running config; none when the
    /// weights were not handed (an older edgelb), or do not match the backends.
    pub fn weight(&self, backend: SocketAddr) -> Option<u32> {
        if self.weights.len() != self.backends.len() {
            return None;
        }
        let i = self.backends.iter().position(|b| *b == backend)?;
        Some(self.weights[i])
    }
}

/// Reads [`Response::vips`], or none when they do not parse (a newer edgelb's, naming a protocol
/// or forwarding mode this one does not know): the takeover then goes on as from an edgelb that
/// sends none, rather than fail on a field that only refines it.
fn lenient_vips<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<HandedVip>>, D::Error> {
    let Some(value) = Option::<serde_json::Value>::deserialize(d)? else { return Ok(None) };
    Ok(serde_json::from_value(value)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "the VIPs the running edgelb handed over do not parse (a newer edgelb's?): taken as an older edgelb's handover, which has none");
        })
        .ok())
}

/// A runtime drain: a backend drained in one VIP, or in every VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// The backend's address.
    pub backend: IpAddr,
    /// The backend's port, for a drain of one `address:port` (an L7 pool may list an address on
    /// several ports); none for every port. Absent from an older edgelb's handover, whose drains
    /// are all of every port; an older edgelb taking over ignores it and drains every port of
    /// the address, more rather than less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The VIP, or none for every VIP.
    pub vip: Option<String>,
}

/// A backend as `drain` and `undrain` name it: an address (the backend on every port the VIP
/// lists it with) or an address and port (that backend alone: an L7 pool may list one address
/// on several ports; an XDP VIP's backends carry the VIP's port, as `status` shows them).
///
/// On the wire a string, `198.18.0.11`, `198.18.0.11:8080` or `[2001:db8::1]:8080`, not an
/// address and a port field: the plain address is what older edgelbs send and read, and an
/// older controller refuses an address with a port as a bad request instead of ignoring a port
/// field it does not know and draining every port of the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendRef {
    /// The backend's address.
    pub address: IpAddr,
    /// Its port; none for every port.
    pub port: Option<u16>,
}

impl BackendRef {
    /// Does this name the backend at `b` (address and port)?
    pub fn matches(&self, b: SocketAddr) -> bool {
        self.address == b.ip() && self.port.is_none_or(|p| p == b.port())
    }
}

impl From<IpAddr> for BackendRef {
    fn from(address: IpAddr) -> BackendRef {
        BackendRef { address, port: None }
    }
}

impl std::str::FromStr for BackendRef {
    type Err = String;

    fn from_str(s: &str) -> Result<BackendRef, String> {
        if let Ok(address) = s.parse::<IpAddr>() {
            return Ok(address.into());
        }
        // `[v6]` without a port, as `[v6]:port` is written: the address alone.
        if let Some(Ok(address)) =
            s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).map(str::parse::<Ipv6Addr>)
        {
            return Ok(IpAddr::V6(address).into());
        }
        s.parse::<SocketAddr>()
            .map(|sa| BackendRef { address: sa.ip(), port: Some(sa.port()) })
            .map_err(|_| format!("`{s}` is not a backend: an address, address:port or [IPv6]:port"))
    }
}

impl TryFrom<String> for BackendRef {
    type Error = String;

    fn try_from(s: String) -> Result<BackendRef, String> {
        s.parse()
    }
}

impl std::fmt::Display for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            None => write!(f, "{}", self.address),
            Some(p) => write!(f, "{}", SocketAddr::new(self.address, p)),
        }
    }
}

impl From<BackendRef> for String {
    fn from(b: BackendRef) -> String {
        b.to_string()
    }
}

impl Response {
    /// A success.
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: message.into(),
            status: None,
            sockets: Vec::new(),
            drains: Vec::new(),
            down: Vec::new(),
            vips: None,
            config_sha256: None,
            build: None,
            bad_config: false,
            bad_request: false,
            route: None,
            drain_ms: None,
            stopping: false,
            teardown: false,
            pid: None,
            handed_over: false,
        }
    }

    /// The refusal of a request that reached an edgelb which has handed over
    /// ([`Response::handed_over`]).
    pub fn handed_over() -> Response {
        Response {
            handed_over: true,
            ..Response::err(
                "this edgelb has handed over to a new one (`edgelb run --takeover`) and only finishes its requests in flight: nothing was done; ask again, and the new one answers",
            )
        }
    }

    /// Is this a controller's refusal of a request it does not know (an edgelb older than the
    /// request), rather than an answer to it? Such a controller refuses the line as a bad
    /// request naming the unknown command.
    pub fn unknown_request(&self) -> bool {
        !self.ok && self.message.starts_with("bad request: unknown variant")
    }

    /// A refusal.
    pub fn err(message: impl Into<String>) -> Response {
        Response { ok: false, ..Response::ok(message) }
    }

    /// A refusal that is the request's fault ([`Response::bad_request`]): it names a VIP or a
    /// backend the config does not have.
    pub fn bad_request(message: impl Into<String>) -> Response {
        Response { bad_request: true, ..Response::err(message) }
    }
}

/// The controller's answer as the admin thread sends it: the response, and for `handover` the
/// descriptors of [`Response::sockets`] plus a channel told when the new process is ready (or
/// gone), which ends the exchange.
#[derive(Debug)]
pub struct Answer {
    /// The JSON part.
    pub response: Response,
    /// Descriptors to attach.
    pub fds: Vec<OwnedFd>,
    /// Told, after the answer is sent, how the handover ended.
    pub done: Option<Sender<HandoverEnd>>,
    /// For a handover: armed with its connection, for the controller to cut it short.
    pub cut: Option<HandoverCut>,
}

impl From<Response> for Answer {
    fn from(response: Response) -> Answer {
        Answer { response, fds: Vec::new(), done: None, cut: None }
    }
}

/// The handing-over controller's hold on the handover connection that the admin thread sends
/// the answer on and then follows: a stop signal to the old process must not wait out the new
/// one's start (up to twice [`HANDOVER_WAIT`]). [`HandoverCut::now`] shuts the connection
/// down: the admin thread's send or read ends at once, as on a hang-up, and the new process,
/// unless it has had its [`GO`], can no longer commit, so it stops before touching the data
/// plane.
#[derive(Clone, Debug, Default)]
pub struct HandoverCut(std::sync::Arc<std::sync::Mutex<CutState>>);

#[derive(Debug, Default)]
struct CutState {
    /// A descriptor of the connection while the admin thread follows it.
    conn: Option<UnixStream>,
    /// Cut: a connection armed from now on is shut down at once.
    cut: bool,
    /// The admin thread is done with the connection (the end it sends is the new process's).
    over: bool,
}

impl HandoverCut {
    fn state(&self) -> std::sync::MutexGuard<'_, CutState> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The admin thread is about to send the answer on `conn` and follow the handover.
    fn arm(&self, conn: &UnixStream) {
        let mut st = self.state();
        if st.cut {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        } else {
            st.conn = conn.try_clone().ok();
        }
    }

    /// The admin thread is done following: its end goes to the controller next.
    fn disarm(&self) {
        let mut st = self.state();
        st.conn = None;
        st.over = true;
    }

    /// Cuts the handover short. True when it was still under way, so that the end the
    /// controller gets next comes from this cut (after the commit: the new process had been
    /// told to go), not from the new process; false when that end was the new process's own.
    pub fn now(&self) -> bool {
        let mut st = self.state();
        st.cut = true;
        if let Some(conn) = st.conn.take() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        !st.over
    }
}

/// Snapshot of the balancer for `edgelb status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Status {
    /// The running controller's build ([`crate::build::VERSION_LINE`]): after an upgrade, the
    /// old process may still be the one running. Absent from an older controller's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Config file in use.
    pub config: PathBuf,
    /// Interfaces and attach modes.
    pub interfaces: Vec<(String, String)>,
    /// Per VIP.
    pub vips: Vec<VipStatus>,
    /// The XDP connection table (absent from an older daemon's answer).
    #[serde(default)]
    pub conntrack: ConntrackStatus,
}

impl Status {
    /// Fills the byte rate under both its names, whichever the daemon wrote: one older than
    /// `bytes_per_s` wrote only `bps`, and scripts written against it read `bps`.
    pub fn renamed_fields(mut self) -> Status {
        let both = |new: &mut f64, old: &mut f64| {
            if *new == 0.0 {
                *new = *old;
            }
            *old = *new;
        };
        for v in &mut self.vips {
            both(&mut v.bytes_per_s, &mut v.bps);
            for b in v.backends.iter_mut().chain(v.routes.iter_mut().flat_map(|r| &mut r.backends))
            {
                both(&mut b.bytes_per_s, &mut b.bps);
            }
        }
        self
    }
}

/// The XDP connection table, node-wide: its size and how it copes. A steadily rising `evicted`
/// means the table is too small for the traffic (or a flood of new flows is passing through):
/// flows pushed out re-hash onto the ring if they send again, which keeps them on their backend
/// only while the pool does not change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct ConntrackStatus {
    /// CPUs with a region of the table (every possible CPU).
    pub cpus: u32,
    /// IPv4 flows one CPU's region holds (buckets × ways).
    pub v4_flows_per_cpu: u64,
    /// IPv6 flows one CPU's region holds.
    pub v6_flows_per_cpu: u64,
    /// Flows pushed out of a full bucket by one entering the table (a TCP flow enters at its
    /// first packet after the SYN), since the maps were created.
    pub evicted: u64,
    /// Flows found in another CPU's region (their packets moved CPU), since the maps were
    /// created.
    pub found_on_other_cpu: u64,
    /// TCP segments without SYN whose flow no table held (pushed out before it ended: the
    /// table is small for the traffic; or a handshake whose slot another SYN took first), since
    /// the maps were created.
    #[serde(default)]
    pub missed_established: u64,
    /// Segments of unknown flows not looked for on the other CPUs, this CPU's budget of such
    /// searches being spent (a flood of spoofed ACKs), since the maps were created.
    #[serde(default)]
    pub search_skipped: u64,
}

/// Serde default for flags that are true unless said otherwise.
fn yes() -> bool {
    true
}

/// One VIP in [`Status`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct VipStatus {
    /// Name.
    pub name: String,
    /// `name (address:port/proto)`, for display; the parts are in `address`, `port` and
    /// `protocol`.
    pub listen: String,
    /// The VIP's address (absent from an older daemon's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// Its port; absent for a VIP that serves any port (and from an older daemon's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Its transport protocol, `tcp` or `udp` (absent from an older daemon's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<crate::config::Protocol>,
    /// Forwarding mode.
    pub forwarding: String,
    /// False when the VIP has no connection table (`conntrack = false`): every packet is placed
    /// by the ring.
    #[serde(default = "yes")]
    pub conntrack: bool,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// New flows placed by the ring.
    pub new_flows: u64,
    /// Packets per second over the last sampling period (about a second).
    pub pps: f64,
    /// Bytes per second over the last sampling period.
    #[serde(default)]
    pub bytes_per_s: f64,
    /// `bytes_per_s` under the name older releases gave it, which reads as bits per second:
    /// still written for scripts that read it (see [`Status::renamed_fields`]).
    #[serde(default)]
    pub bps: f64,
    /// True when every backend that should take new flows is down and all of them serve
    /// anyway (fail open).
    pub fail_open: bool,
    /// L7 only: requests (HTTP) or connections (TCP) the proxy sent to the VIP's backends, its
    /// route pools' ([`routes`](Self::routes)) included, each backend counted once however many
    /// of its pools list it. XDP passes an L7 VIP's traffic to the kernel uncounted, so its
    /// packet, byte and flow counters and rates stay 0: this is the number that moves.
    #[serde(default)]
    pub l7_requests: u64,
    /// Backends: the VIP's own pool.
    pub backends: Vec<BackendStatus>,
    /// L7 HTTP only: each route's pool, in the file's order, so that a route pool that passive
    /// health has taken out whole, or a backend of one holding its requests, shows as the
    /// VIP's own backends do. Empty (and absent from the JSON) without routes, and from an
    /// older daemon's answer, which did not list them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteStatus>,
}

/// One route of an L7 VIP in [`VipStatus`]: what it matches, and its pool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct RouteStatus {
    /// The Host it matches (none: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path prefix it matches (none: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Its pool's backends, with the L7 fields of the VIP's own: requests, in flight and
    /// `passive_down`, which a route's backend shares with the VIP's own pool where the two
    /// list one address and port (the proxy keeps one state for it). No health check probes a
    /// route pool and `edgelb drain` does not reach it, so `healthy` is always true and
    /// `drained` means `weight = 0` in the file; the XDP fields are 0, as for any L7 backend.
    pub backends: Vec<BackendStatus>,
}

/// One backend in [`VipStatus`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    /// Address.
    pub address: IpAddr,
    /// Port: where an L7 VIP's proxy connects (one address may be listed on several ports, each
    /// a backend of its own); for a VIP XDP forwards, the VIP's port (packets keep theirs).
    #[serde(default)]
    pub port: u16,
    /// Configured weight.
    pub weight: u32,
    /// Health-check verdict (true without a check).
    pub healthy: bool,
    /// L7 only: taken out by passive health (consecutive request failures) for a while.
    #[serde(default)]
    pub passive_down: bool,
    /// L7 only: requests (HTTP) or connections (TCP) sent to it by the proxy.
    #[serde(default)]
    pub l7_requests: u64,
    /// L7 only: requests (HTTP) or connections (TCP) it has in flight, what `least_conn` and
    /// `p2c` balance on, so that an operator can see it (and a backend that holds its requests).
    /// Absent for a VIP XDP forwards, and from an older daemon's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7_in_flight: Option<u64>,
    /// Drained by `edgelb drain` or weight 0.
    pub drained: bool,
    /// Fraction of the ring's slots it holds.
    pub ring_share: f64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// New flows sent to it.
    pub new_flows: u64,
    /// Packets per second over the last sampling period.
    pub pps: f64,
    /// Bytes per second over the last sampling period.
    #[serde(default)]
    pub bytes_per_s: f64,
    /// `bytes_per_s` under its older name (see [`VipStatus::bps`]).
    #[serde(default)]
    pub bps: f64,
}

impl BackendStatus {
    /// A backend up, not drained, with nothing counted: where a route pool's backend starts
    /// (no check probes it, no drain reaches it, XDP counts nothing of it), so that the dozen
    /// zero fields are written once.
    pub fn new(address: IpAddr, port: u16, weight: u32) -> BackendStatus {
        BackendStatus {
            address,
            port,
            weight,
            healthy: true,
            passive_down: false,
            l7_requests: 0,
            l7_in_flight: None,
            drained: false,
            ring_share: 0.0,
            packets: 0,
            bytes: 0,
            new_flows: 0,
            pps: 0.0,
            bytes_per_s: 0.0,
            bps: 0.0,
        }
    }
}

/// Why an admin request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No controller listens on the socket, or this user may not connect to it.
    // The cause is in the message, so it is not also the error's `source()`: a caller that
    // prints the source chain (`edgelb run --takeover`) would say it twice.
    #[error("cannot reach edgelb at {path}: {error} ({})", connect_hint(error))]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("admin socket {path}: {reason}")]
    Exchange {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl AdminError {
    /// Does the error say that no controller serves the socket: no file there (ENOENT), or one
    /// nobody listens on (ECONNREFUSED)? Only then may a command answer in its stead, from the
    /// file. Any other connect error (EACCES, EPERM: a user the root-only socket turns away)
    /// leaves a controller possibly running, whose answer the file's may not be.
    pub fn nobody_serves(&self) -> bool {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        matches!(self, AdminError::Connect { error, .. } if matches!(error.kind(), NotFound | ConnectionRefused))
    }
}

/// What to make of a failed connect: turned away (permission) says a controller may well run,
/// out of this user's reach; anything else, most likely that none runs.
fn connect_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        "the admin socket answers root and the user edgelb runs as: run this as one of them"
    } else {
        "is `edgelb run` running?"
    }
}

/// Is the other end of `s` root or this process's own user? Anyone else who got to bind or
/// connect to the admin socket (a path in a shared directory, bound first by a local user) must
/// not be answered, nor obeyed: `stop`, or a takeover that hands over the listening sockets.
fn trusted(s: &UnixStream) -> Result<(), String> {
    let uid = fdpass::peer_uid(s).map_err(|e| format!("whose socket it is: {e}"))?;
    if uid == 0 || uid == fdpass::euid() {
        Ok(())
    } else {
        Err(format!("its other end is user {uid}, neither root nor this one: not edgelb's"))
    }
}

/// Sends one request and waits for the answer. A request longer than the controller reads
/// ([`MAX_REQUEST`]) is not sent: it gets the refusal the controller would give it
/// ([`too_long`]), here, as the controller having read its first 64 KiB would answer and
/// close, and the write of the rest (past the socket's buffer) would fail instead.
///
/// An edgelb that has handed over to a new one refuses what still reaches it
/// ([`Response::handed_over`]): the request, not carried out, is sent again (to the new one,
/// which has the socket's path by then; a connect that finds none there is tried again too),
/// for [`HANDED_OVER_RETRY`] at most. A `stop` goes on to the new process as well: it asks
/// for the edgelb on this socket to stop, and the old one, already on its way out, did nothing.
pub fn request(socket: &Path, req: &Request) -> Result<Response, AdminError> {
    let until = std::time::Instant::now() + HANDED_OVER_RETRY;
    let mut handed_over = false;
    loop {
        let answer = request_once(socket, req);
        let again = match &answer {
            Ok(r) => r.handed_over,
            Err(e) => handed_over && e.nobody_serves(),
        };
        if !again || std::time::Instant::now() >= until {
            return answer;
        }
        handed_over = true;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long [`request`] goes on asking again after an edgelb that handed over refused the
/// request: the new process has the socket's path before the old one answers so, and it answers
/// once it serves (a connection waits in its queue meanwhile, for [`ANSWER_WAIT`]).
pub const HANDED_OVER_RETRY: Duration = Duration::from_secs(5);

/// One exchange of [`request`].
fn request_once(socket: &Path, req: &Request) -> Result<Response, AdminError> {
    let fail = |reason: String| AdminError::Exchange { path: socket.to_owned(), reason };
    let line = line_of(req).map_err(|e| fail(e.to_string()))?;
    if line.len() > MAX_REQUEST {
        return Ok(too_long());
    }
    let s = UnixStream::connect(socket)
        .map_err(|error| AdminError::Connect { path: socket.to_owned(), error })?;
    trusted(&s).map_err(fail)?;
    send_line(&s, &line).map_err(|e| fail(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(|e| {
        fail(match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "no answer within {} s: the controller is busy or hung (see its log)",
                ANSWER_WAIT.as_secs()
            ),
            _ => e.to_string(),
        })
    })?;
    if answer.is_empty() {
        return Err(fail(
            "closed without answering: did the controller exit? (see its log)".into(),
        ));
    }
    serde_json::from_str(&answer).map_err(|e| fail(bad_answer(&answer, &e)))
}

/// The most of an answer that cannot be read that [`bad_answer`] quotes: enough to see what
/// answered, while a handover answer may be 64 MiB ([`MAX_HANDOVER_ANSWER`]) and the error is
/// one line of a log or a terminal.
const BAD_ANSWER_QUOTED: usize = 1024;

/// Why an answer could not be read, quoting its first [`BAD_ANSWER_QUOTED`] bytes (cut on a
/// character boundary) and giving its length.
fn bad_answer(answer: &str, e: &serde_json::Error) -> String {
    let mut end = answer.len().min(BAD_ANSWER_QUOTED);
    while !answer.is_char_boundary(end) {
        end -= 1;
    }
    if end == answer.len() {
        format!("bad answer {answer:?}: {e}")
    } else {
        format!("bad answer of {} bytes, starting {:?}…: {e}", answer.len(), &answer[..end])
    }
}

/// How long a CLI command waits for the controller's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// The most the controller reads of one request, its newline included: a client sending more
/// (a VIP name of 100 000 characters) must not hold the admin thread, nor grow its buffer.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The message refusing a request longer than [`MAX_REQUEST`] (64 KiB): said as such, rather
/// than as the JSON error of the cut line ("EOF while parsing a string at line 1 column
/// 65536"). Public so that the CLI can tell it from a bad request of another kind.
pub const TOO_LONG: &str = "bad request: request longer than 64 KiB (the admin socket's limit)";

/// The refusal of a request longer than [`MAX_REQUEST`], a bad request ([`TOO_LONG`]).
fn too_long() -> Response {
    Response::bad_request(TOO_LONG)
}

/// The refusal of a request whose newline did not come within [`CLIENT_WAIT`], a bad request:
/// the admin thread answers one client at a time and cannot wait longer for it.
fn no_newline() -> Response {
    Response::bad_request(format!(
        "bad request: no newline within {} s (a request is one JSON line, ended by a newline)",
        CLIENT_WAIT.as_secs()
    ))
}

/// `req` as the JSON line sent for it.
fn line_of(req: &Request) -> std::io::Result<String> {
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    Ok(line)
}

/// Writes `line` (from [`line_of`]) on `s`, and bounds the wait for the answer.
fn send_line(mut s: &UnixStream, line: &str) -> std::io::Result<()> {
    s.set_read_timeout(Some(ANSWER_WAIT))?;
    s.write_all(line.as_bytes())
}

/// A request waiting for the controller, with the way back.
pub type Pending = (Request, Sender<Answer>);

/// Sockets handed over by the running edgelb, and the connection to tell it when this process
/// is about to write the maps ([`commit`]) and when it serves (write [`READY`]); dropping it
/// unsaid tells it this process failed.
#[derive(Debug)]
pub struct Handover {
    /// Each socket with what it is for.
    pub sockets: Vec<(HandedSocket, OwnedFd)>,
    /// The running edgelb's runtime drains, to keep.
    pub drains: Vec<Drain>,
    /// The running edgelb's health verdicts of dead backends, to start from.
    pub down: Vec<Down>,
    /// The running edgelb's VIPs, to carry the drains and verdicts over as a reload would; none
    /// from an older edgelb.
    pub vips: Option<Vec<HandedVip>>,
    /// The hash of the config file as the running edgelb last applied it
    /// ([`Response::config_sha256`]); none from an older edgelb.
    pub config_sha256: Option<String>,
    /// The running edgelb's build ([`Response::build`]); none from an older edgelb.
    pub build: Option<String>,
    /// The open handover connection.
    pub conn: UnixStream,
}

/// The longest handover answer [`handover`] reads, its newline included: against a running
/// edgelb that sends without end, not a bound on any config. The answer lists every backend of
/// every VIP, each down one again with its VIP's name, and the drains, so it grows with the
/// config and most during an outage, when the takeover matters most: 8192 IPv6 backends with
/// 64-byte VIP names, all down, take more than the 1 MiB this once was, which failed such
/// takeovers. 64 MiB holds about 200 000 backends down and drained with such names, 50 times
/// the L7 backends a file has without a caution ([`crate::config::L7_BACKENDS_CAUTION`]) plus
/// every XDP one; the memory is held only while the answer is read.
pub const MAX_HANDOVER_ANSWER: usize = 64 << 20;

/// Asks the edgelb on `socket` to hand over (`edgelb run --takeover`). `Ok(None)` when no edgelb
/// answers there (nothing to take over).
pub fn handover(socket: &Path) -> Result<Option<Handover>, AdminError> {
    let fail = |reason: String| AdminError::Exchange { path: socket.to_owned(), reason };
    let Ok(s) = UnixStream::connect(socket) else { return Ok(None) };
    trusted(&s).map_err(fail)?;
    let build = Some(crate::build::VERSION_LINE.to_owned());
    line_of(&Request::Handover { binds_over: true, build })
        .and_then(|line| send_line(&s, &line))
        .map_err(|e| fail(e.to_string()))?;
    // One line back, the descriptors on its first bytes; read byte runs until the newline.
    let (mut answer, mut fds) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 64 * 1024];
    while !answer.ends_with(b"\n") {
        let (n, more) = fdpass::recv(&s, &mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            return Err(fail("the running edgelb hung up before answering".into()));
        }
        answer.extend_from_slice(&buf[..n]);
        fds.extend(more);
        if answer.len() > MAX_HANDOVER_ANSWER {
            return Err(fail(format!(
                "its handover answer is longer than {} MiB ({} bytes read without its end), the most a takeover reads",
                MAX_HANDOVER_ANSWER >> 20,
                answer.len()
            )));
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| fail(bad_answer(&answer, &e)))?;
    if !resp.ok {
        return Err(fail(format!("handover refused: {}", resp.message)));
    }
    if resp.sockets.len() != fds.len() {
        return Err(fail(format!(
            "the answer lists {} sockets but carries {} descriptors",
            resp.sockets.len(),
            fds.len()
        )));
    }
    s.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;
    Ok(Some(Handover {
        sockets: resp.sockets.into_iter().zip(fds).collect(),
        drains: resp.drains,
        down: resp.down,
        vips: resp.vips,
        config_sha256: resp.config_sha256,
        build: resp.build,
        conn: s,
    }))
}

/// Binds the socket, replacing a stale one, but refusing when another controller answers on it.
/// Binding is separate from serving so that the serving thread starts after edgelb has dropped
/// its capabilities (they are per thread).
///
/// A missing directory is created root-only; one that exists keeps its mode (the socket itself
/// is root-only), since it may be shared, like `/run` or `/tmp`. Only a socket is ever replaced:
/// any other file at the path (a mistyped `admin_socket` naming the config, say) is refused.
///
/// The check, the removal of a stale socket and the bind are made under [`BindLock`]: two
/// starts racing through them unlocked could both find nobody answering, and the second then
/// removed the first's fresh socket and bound its own, and both ran on one data plane.
///
/// Each error names the step that failed (creating the directory, binding...); the caller
/// names the socket.
pub fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    bind_within(socket, BIND_LOCK_WAIT)
}

/// Like [`bind`], waiting at most `lock_wait` (rather than [`BIND_LOCK_WAIT`]) for the lock
/// beside the socket: the controller, trying again from its loop to serve an admin socket it
/// lost, must not stop balancing health verdicts and scrapes for seconds at each try.
pub fn bind_within(socket: &Path, lock_wait: Duration) -> std::io::Result<UnixListener> {
    make_dir(socket)?;
    let _lock = BindLock::take(socket, lock_wait)?;
    only_a_socket(socket)?;
    if answers(socket).map_err(step("looking for a process answering on it".into()))? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another edgelb answers on {} (stop it first, or replace it without refusing a connection: `edgelb run --takeover`)",
                socket.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(step("binding it".into()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(step("making it root-only (mode 0600)".into()))?;
    Ok(listener)
}

/// Binds the socket in place of the running edgelb's, which has just handed over to this process
/// (`edgelb run --takeover`) and still listens on it: bound under a name of its own beside it,
/// made root-only, then renamed over the path, so that a client finds one process or the other
/// listening there, never none (it used to be removed first, and a command in between was told
/// that no edgelb runs). Connections the old process took before are answered by it
/// ([`Response::handed_over`]). This process failing afterwards (before its start is through)
/// closes the listener with the connections queued on it, and leaves the path refusing (or, its
/// start failed, missing) until the old process has bound it again. As [`bind`], under [`BindLock`], and only a socket is replaced.
///
/// The name of its own is `<path>.<pid>.new`, or `.<pid>` in the same directory when that is
/// too long for a socket address ([`SUN_PATH_MAX`]: a path a plain start binds could not be
/// taken over). When neither fits (or both are taken by something else), the path is removed
/// and bound again, as a start replaces a stale socket, and the log says so: a command sent in
/// that instant finds no socket there.
pub fn bind_over(socket: &Path) -> std::io::Result<UnixListener> {
    make_dir(socket)?;
    let _lock = BindLock::take(socket, BIND_LOCK_WAIT)?;
    only_a_socket(socket)?;
    let Some((fresh, listener)) = bind_beside(socket)? else {
        tracing::info!(
            admin = %socket.display(),
            "no name beside the admin socket is free and short enough to bind first ({SUN_PATH_MAX} bytes at most): the running edgelb's socket is removed and this one bound in its place (a command sent in that instant is told that no edgelb runs)"
        );
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(step("binding it".into()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(step("making it root-only (mode 0600)".into()))?;
        return Ok(listener);
    };
    let placed = std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600))
        .map_err(step("making it root-only (mode 0600)".into()))
        .and_then(|()| {
            std::fs::rename(&fresh, socket)
                .map_err(step(format!("renaming {} over it", fresh.display())))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&fresh);
        return Err(e);
    }
    Ok(listener)
}

/// The longest path a Unix socket can be bound at, in bytes: `sun_path` holds 108 on Linux,
/// its NUL included (a longer one is refused, "path must be shorter than SUN_LEN").
pub const SUN_PATH_MAX: usize = 107;

/// Binds the listener [`bind_over`] renames over `socket`, beside it: at `<socket>.<pid>.new`,
/// or `.<pid>` in its directory when that is too long for a socket address ([`SUN_PATH_MAX`]).
/// Nothing already at a name is removed (it may be another program's socket, live, in a shared
/// directory): a name taken (EADDRINUSE) is passed over for the next. None when no name fits
/// or is free.
fn bind_beside(socket: &Path) -> std::io::Result<Option<(PathBuf, UnixListener)>> {
    let pid = std::process::id();
    let mut long = socket.as_os_str().to_owned();
    long.push(format!(".{pid}.new"));
    let short = socket.parent().map(|dir| dir.join(format!(".{pid}")));
    for name in [Some(PathBuf::from(long)), short].into_iter().flatten() {
        if name.as_os_str().len() > SUN_PATH_MAX {
            continue;
        }
        match UnixListener::bind(&name) {
            Ok(listener) => return Ok(Some((name, listener))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(step(format!("binding it (as {} first)", name.display()))(e)),
        }
    }
    Ok(None)
}

/// Makes the directory of `socket` if it is missing, root-only; one that exists keeps its mode.
fn make_dir(socket: &Path) -> std::io::Result<()> {
    if let Some(dir) = socket.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .map_err(step(format!("creating its directory {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(step(format!("making its directory {} root-only", dir.display())))?;
    }
    Ok(())
}

/// Refuses anything but a socket (or nothing) at `socket`: only a stale admin socket is ever
/// replaced.
fn only_a_socket(socket: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(socket) {
        Ok(m) if !m.file_type().is_socket() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket: edgelb replaces only a stale admin socket (check node.admin_socket)",
                socket.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether a process listens on `socket`: a connect that is taken, or that finds its queue full
/// (EAGAIN), says one does; a refused one (a stale socket file, ECONNREFUSED) or a missing path,
/// that none does. The connect does not wait: a blocking one to a listener that never accepts
/// (a hung or stopped process, its queue full) waited for good, and the controller, trying again
/// from its loop to serve an admin socket it lost, stopped balancing health verdicts, answering
/// scrapes and heeding SIGTERM.
///
/// An error when it cannot tell (no socket to be had: out of descriptors): taken for "none",
/// the stale-socket removal that follows would unlink a live process's socket.
/// Does a process answer on the socket at `socket`? `true` when it cannot tell, so that a caller
/// that would bind over a dead socket leaves a live one alone.
pub fn anyone_answers(socket: &Path) -> bool {
    answers(socket).unwrap_or(true)
}

/// The file at `path` as (device, inode), without following a symlink: what the controller
/// bound there, to tell later whether the path still names its socket.
pub fn path_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn answers(socket: &Path) -> std::io::Result<bool> {
    let addr = socket2::SockAddr::unix(socket)?;
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    match s.connect(&addr) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINPROGRESS)) => Ok(true),
        Err(e) if crate::proxy::out_of_resources(&e) => Err(e),
        Err(_) => Ok(false),
    }
}

/// Says `what` was being done when an error came, keeping its kind (callers tell "another
/// edgelb answers" and the like by it).
fn step(what: String) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// An exclusive lock (flock) on `<admin socket>.lock`, held by [`bind`] from its check that
/// nobody answers until its socket listens, so that of two starts the second finds the first
/// answering. Held only that long: `run --takeover` binds while the old process still runs.
///
/// The file is removed before the lock is let go, so nothing is left beside the socket; whoever
/// waited on it then holds a lock on a file no longer at the path, sees so, and starts over
/// with a new one. It is opened without following a symbolic link, and one of another user's
/// (planted in a shared directory) is refused.
struct BindLock {
    file: std::fs::File,
    path: PathBuf,
}

/// How long [`bind`] waits for another start to finish binding (microseconds, unless that
/// process is stopped or hung).
pub const BIND_LOCK_WAIT: Duration = Duration::from_secs(5);

impl BindLock {
    /// Takes the lock, waiting at most `wait` for another holder to let it go.
    fn take(socket: &Path, wait: Duration) -> std::io::Result<BindLock> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut name = socket.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let until = std::time::Instant::now() + wait;
        loop {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| lock_err(&path, e.to_string()))?;
            let held = file.metadata().map_err(|e| lock_err(&path, e.to_string()))?;
            if !held.is_file() || (held.uid() != 0 && held.uid() != fdpass::euid()) {
                return Err(lock_err(&path, format!("user {}'s, not edgelb's", held.uid())));
            }
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let held = if wait.is_zero() {
                        "holds it".to_owned()
                    } else {
                        format!("has held it for {} ms", wait.as_millis())
                    };
                    return Err(lock_err(
                        &path,
                        format!(
                            "another edgelb {held}, binding the admin socket (stopped or hung?)"
                        ),
                    ));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(&path, e.to_string())),
            }
            // Its holder before this process removed it: only the file at the path counts.
            match std::fs::symlink_metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                    return Ok(BindLock { file, path });
                }
                _ => continue,
            }
        }
    }
}

impl Drop for BindLock {
    fn drop(&mut self) {
        // Removed while still locked (the descriptor closes after this): see the type's doc.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// An error of the lock file `path` beside the admin socket.
fn lock_err(path: &Path, reason: String) -> std::io::Error {
    std::io::Error::other(format!("lock file {}: {reason}", path.display()))
}

/// The admin thread, and its listener to stop it by: once the socket's path belongs to another
/// process (a takeover), this one must not keep a thread waiting on a socket nobody can reach.
pub struct Serving {
    listener: UnixListener,
    thread: std::thread::JoinHandle<()>,
    /// Set while the thread has a request with the controller or writes its answer
    /// ([`Serving::finish`] waits for those, not for a client still sending its request).
    answering: Arc<AtomicBool>,
}

impl Serving {
    /// Makes the thread end once it has answered the connection it is on, if any (the listener
    /// is shut down, which fails its next accept).
    pub fn stop(&self) {
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
    }

    /// Has the thread ended?
    pub fn stopped(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the thread and waits, up to `within`, while it answers a request it took to the
    /// controller: an answer the controller has handed it (the `stop` command's own, say) is
    /// written before the process exits, which would otherwise cut it off, and `edgelb stop` saw
    /// "closed without answering" after a stop that went well. A client still sending its
    /// request (or connected and silent) is not waited for: the process exiting gave it no
    /// answer to lose, and waiting for its deadline kept a stopping edgelb up for seconds after
    /// its listeners had closed. Requests still waiting for the controller must be answered
    /// first, or their channel dropped, or they hold the wait until `within` has passed.
    /// Returns whether no answer was left unwritten.
    pub fn finish(self, within: Duration) -> bool {
        self.stop();
        let until = std::time::Instant::now() + within;
        while self.answering.load(Ordering::Acquire) && !self.thread.is_finished() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Why the thread ended, once it has ([`Serving::stopped`]): it ends by itself only if it
    /// panicked, and the controller says so with the panic's message when it finds it gone.
    pub fn ended(self) -> String {
        match self.thread.join() {
            Ok(()) => "its thread ended".into(),
            Err(payload) => format!("its thread panicked: {}", crate::panic_message(&*payload)),
        }
    }
}

/// Forwards requests arriving on `listener` to `to_controller`, from a background thread.
///
/// An accept that fails (for want of descriptors or memory, say) leaves its connection queued and
/// the socket readable: the thread pauses before the next try ([`crate::accept`], as the L7
/// proxy's and the metrics endpoint's accept loops do) rather than spin a core while the node
/// is short, and says so once when it begins and once when accepts succeed again.
pub fn serve(listener: UnixListener, to_controller: Sender<Pending>) -> std::io::Result<Serving> {
    let own = listener.try_clone().map_err(step("duplicating its descriptor".into()))?;
    let answering = Arc::new(AtomicBool::new(false));
    let busy = answering.clone();
    let thread = std::thread::Builder::new().name("admin".into()).spawn(move || {
        let mut failures = crate::accept::AcceptFailures::default();
        for conn in own.incoming() {
            match conn {
                Ok(conn) => {
                    if let Some(failed) = failures.accepted() {
                        tracing::info!(failed, "admin socket: accepting connections again");
                    }
                    let _ = handle(conn, &to_controller, &busy);
                }
                // Shut down by `Serving::stop`.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return,
                Err(e) => {
                    let failed = failures.failed(&e);
                    if let Some(say) = failed.say {
                        tracing::warn!(error = %e, "admin socket: {say}");
                    }
                    if let Some(pause) = failed.pause {
                        std::thread::sleep(pause);
                    }
                }
            }
        }
    });
    let thread = thread.map_err(step("starting its thread".into()))?;
    Ok(Serving { listener, thread, answering })
}

/// How long an admin client has to send its request, and each write of the answer may wait for
/// it to read. The admin thread answers one client at a time: a client that trickles its
/// request or never reads a long answer must not hold every later command (a reload, a stop, a
/// takeover) behind it.
pub(crate) const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// A reader (and writer) that fails once `until` has passed, however the bytes trickle.
struct Deadline<'a> {
    conn: &'a UnixStream,
    until: std::time::Instant,
}

impl Deadline<'_> {
    /// The time left, or TimedOut once there is none.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() { Err(std::io::ErrorKind::TimedOut.into()) } else { Ok(left) }
    }

    /// Lets the next write on the connection wait only for the time left (TimedOut once there
    /// is none): a write that times out having sent part returns that part, and the next finds
    /// no time left. [`fdpass::send`] arms its `sendmsg` calls with it too.
    fn arm_write(&self) -> std::io::Result<()> {
        self.conn.set_write_timeout(Some(self.left()?))
    }
}

impl std::io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.conn.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.conn).read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm_write()?;
        (&mut &*self.conn).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Answers one admin client. `answering` is set from the moment its request goes to the
/// controller until its answer is written ([`Serving::finish`]).
fn handle(
    conn: UnixStream,
    to_controller: &Sender<Pending>,
    answering: &AtomicBool,
) -> std::io::Result<()> {
    if let Err(e) = trusted(&conn) {
        tracing::warn!("admin socket: a connection refused: {e}");
        return Ok(());
    }
    let until = std::time::Instant::now() + CLIENT_WAIT;
    // Bytes, not a String: a line that is not UTF-8 (cut inside a character at the cap, say)
    // is answered as any bad request, not closed unanswered as a failed read_line closed it.
    let mut line = Vec::new();
    let read = BufReader::new(Deadline { conn: &conn, until })
        .take(MAX_REQUEST as u64)
        .read_until(b'\n', &mut line);
    // Out of time with part of a request read (no newline came: `nc -U` waiting for more, a
    // client that forgot it): refused as such, rather than closed without a word. A client
    // that sent nothing gets nothing. A request whose sender closed without its newline is
    // read as it came (an EOF ends the line).
    let unended = match read {
        Ok(_) => false,
        // A read timeout says WouldBlock; the deadline already passed, TimedOut.
        Err(e) if is_timeout(&e) && !line.is_empty() => true,
        Err(e) => return Err(e),
    };
    /// Clears `answering` however [`handle`] returns.
    struct Answered<'a>(&'a AtomicBool);
    impl Drop for Answered<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _answered = Answered(answering);
    let answer = match serde_json::from_slice::<Request>(&line) {
        _ if unended => no_newline().into(),
        Err(_) if line.len() == MAX_REQUEST && !line.ends_with(b"\n") => too_long().into(),
        Err(e) => Response::err(format!("bad request: {e}")).into(),
        Ok(req) => {
            let (tx, rx) = mpsc::channel();
            answering.store(true, Ordering::Release);
            if to_controller.send((req, tx)).is_err() {
                Response::err("controller is shutting down").into()
            } else {
                rx.recv().unwrap_or_else(|_| Response::err("controller is shutting down").into())
            }
        }
    };
    let mut out = serde_json::to_string(&answer.response).map_err(std::io::Error::other)?;
    out.push('\n');
    let fds: Vec<_> = answer.fds.iter().map(|f| f.as_fd()).collect();
    if let Some(cut) = &answer.cut {
        cut.arm(&conn);
    }
    // Every answer has CLIENT_WAIT to be read, sockets attached or not: a process taking over
    // that stops reading must not hold this thread (and the handover) for good.
    let until = std::time::Instant::now() + CLIENT_WAIT;
    let sent = if fds.is_empty() {
        Deadline { conn: &conn, until }.write_all(out.as_bytes())
    } else {
        fdpass::send(&conn, out.as_bytes(), &fds, until)
    };
    drop(answer.fds);
    if let Some(done) = answer.done {
        let end = if sent.is_ok() { follow_handover(&conn) } else { HandoverEnd::Abandoned };
        if let Some(cut) = &answer.cut {
            cut.disarm();
        }
        let _ = done.send(end);
    }
    sent
}

/// Is `e` a read or write that ran out of time ([`Deadline`])?
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

/// Follows the process taking over through its start: [`COMMIT`] (answered with [`GO`]) then
/// [`READY`], each within [`HANDOVER_WAIT`].
fn follow_handover(conn: &UnixStream) -> HandoverEnd {
    let mut committed = false;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        let word = conn
            .set_read_timeout(Some(HANDOVER_WAIT))
            .and_then(|()| (&mut reader).take(64).read_until(b'\n', &mut line));
        match word {
            Ok(_) if line == COMMIT && !committed => {
                // Answered before it counts: if this write fails, the new process stops
                // before touching the maps, and this one takes back over.
                let until = std::time::Instant::now() + CLIENT_WAIT;
                if (Deadline { conn, until }).write_all(GO).is_err() {
                    return HandoverEnd::Abandoned;
                }
                committed = true;
            }
            Ok(_) if line == READY => return HandoverEnd::Ready,
            // End of stream: the new process failed, and its connection closed as it exits.
            Ok(0) if committed => return HandoverEnd::FailedAfterCommit,
            // A timeout, or anything else: the new process may be hung, not gone.
            _ if committed => return HandoverEnd::AbandonedAfterCommit,
            _ => return HandoverEnd::Abandoned,
        }
    }
}

/// Tells the handing-over process, on the handover connection, that this process is about to
/// write the maps, and waits for its [`GO`]. An error means it has taken back over (or is
/// gone): this process must not touch the data plane.
pub fn commit(conn: &mut UnixStream) -> std::io::Result<()> {
    conn.write_all(COMMIT)?;
    conn.set_read_timeout(Some(HANDOVER_WAIT))?;
    let mut word = Vec::new();
    (&*conn).take(GO.len() as u64).read_to_end(&mut word)?;
    if word != GO {
        return Err(std::io::Error::other("the running edgelb did not confirm"));
    }
    Ok(())
}

/// How long a handing-over edgelb waits for the new process to say it serves.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    /// Only "nothing there" (no file, nobody listening) lets a command answer for the
    /// controller; a permission error is no sign that none runs, and says what to do.
    #[test]
    fn only_a_socket_nobody_serves_counts_as_no_controller() {
        let err = |code| AdminError::Connect {
            path: "/run/edgelb.sock".into(),
            error: std::io::Error::from_raw_os_error(code),
        };
        // ENOENT, ECONNREFUSED; EACCES, EPERM.
        assert!(err(2).nobody_serves() && err(111).nobody_serves());
        assert!(!err(13).nobody_serves() && !err(1).nobody_serves());
        assert!(err(13).to_string().contains("run this as one of them"), "{}", err(13));
        assert!(err(2).to_string().contains("is `edgelb run` running?"), "{}", err(2));
        let other = AdminError::Exchange { path: "/x".into(), reason: "cut".into() };
        assert!(!other.nobody_serves());
    }

    /// A stand-in controller answering each admin request with `answer`.
    fn controller(answer: impl Fn(&Request) -> Response + Send + 'static) -> Sender<Pending> {
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::spawn(move || {
            for (req, reply) in rx {
                let _ = reply.send(answer(&req).into());
            }
        });
        tx
    }

    /// The admin thread answers until stopped, then ends (a takeover hands its path on; a
    /// thread left waiting on the old socket would be one more for every takeover).
    #[test]
    fn the_admin_thread_serves_until_stopped() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let serving = serve(bind(&path).unwrap(), controller(|_| Response::ok("here"))).unwrap();
        assert_eq!(request(&path, &Request::Status).unwrap().message, "here");
        assert!(!serving.stopped());
        serving.stop();
        let start = std::time::Instant::now();
        while !serving.stopped() {
            assert!(start.elapsed() < Duration::from_secs(2), "the admin thread still runs");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A controller older than a request (here `route`) refuses it as a bad request naming the
    /// unknown command, which the CLI must tell from a refusal of the request itself.
    #[test]
    fn an_older_controllers_refusal_of_a_new_request_is_recognised() {
        /// The requests an edgelb before `route` knew.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "cmd", rename_all = "lowercase")]
        #[allow(dead_code)]
        enum Old {
            Status,
            Drain { backend: IpAddr, vip: Option<String> },
            Undrain { backend: IpAddr, vip: Option<String> },
            Reload,
            Stop { detach: bool },
            Handover,
        }
        let line = serde_json::to_string(&Request::Route {
            client: "198.18.4.1".parse().unwrap(),
            vip: "web".into(),
            sport: None,
            proto: None,
        })
        .unwrap();
        let e = serde_json::from_str::<Old>(&line).unwrap_err();
        // As `handle` answers it.
        let refusal = Response::err(format!("bad request: {e}"));
        assert!(refusal.unknown_request(), "{refusal:?}");
        let bad_vip = Response::err("no VIP named `web`");
        assert!(!bad_vip.unknown_request());
        let bad_line = Response::err(format!(
            "bad request: {}",
            serde_json::from_str::<Request>("{\"cmd\":\"route\"}").unwrap_err()
        ));
        assert!(!bad_line.unknown_request(), "{bad_line:?}");
    }

    /// Drains by address:port keep the wire format: an older client's drain (a plain address)
    /// reads as a drain of every port, a drain of one port is written as older edgelbs write a
    /// plain one but with the port, so an older controller refuses it (a bad address) rather
    /// than drain every port; an older handover's drains read as drains of every port.
    #[test]
    fn drains_by_address_and_port_keep_the_wire_format() {
        let old_line = r#"{"cmd":"drain","backend":"198.18.0.11","vip":null}"#;
        let a: IpAddr = "198.18.0.11".parse().unwrap();
        assert_eq!(
            serde_json::from_str::<Request>(old_line).unwrap(),
            Request::Drain { backend: a.into(), vip: None }
        );
        let plain = Request::Undrain { backend: a.into(), vip: Some("web".into()) };
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"cmd":"undrain","backend":"198.18.0.11","vip":"web"}"#
        );
        let v6: BackendRef = "[2001:db8::1]:8080".parse().unwrap();
        assert_eq!((v6.address.to_string().as_str(), v6.port), ("2001:db8::1", Some(8080)));
        let line = serde_json::to_string(&Request::Drain { backend: v6, vip: None }).unwrap();
        assert_eq!(line, r#"{"cmd":"drain","backend":"[2001:db8::1]:8080","vip":null}"#);
        assert_eq!(
            serde_json::from_str::<Request>(&line).unwrap(),
            Request::Drain { backend: v6, vip: None }
        );
        /// A drain as edgelbs before address:port read it.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct OldDrain {
            backend: IpAddr,
            vip: Option<String>,
        }
        assert!(serde_json::from_str::<OldDrain>(&line).is_err(), "an older one refuses it");
        assert!("198.18.0.11:http".parse::<BackendRef>().is_err());
        // `[v6]` alone, bracketed as with a port, is the address on every port.
        let bare: BackendRef = "[2001:db8::1]".parse().unwrap();
        assert_eq!((bare.address, bare.port), (v6.address, None));
        assert!("[198.18.0.11]".parse::<BackendRef>().is_err());
        let handed: Drain =
            serde_json::from_str(r#"{"backend":"198.18.0.11","vip":null}"#).unwrap();
        assert_eq!(handed, Drain { backend: a, port: None, vip: None });
    }

    /// `handover` both ways: an older edgelb taking over (a rollback) sends it bare, read as
    /// a peer that does not bind over the path (the path is freed for it); this edgelb's says
    /// it does, and an older running edgelb, whose `handover` has no fields, still reads it.
    #[test]
    fn a_handovers_binds_over_is_optional_both_ways() {
        let bare: Request = serde_json::from_str(r#"{"cmd":"handover"}"#).unwrap();
        assert_eq!(bare, Request::Handover { binds_over: false, build: None });
        let ours = line_of(&Request::Handover { binds_over: true, build: None }).unwrap();
        assert_eq!(ours, "{\"cmd\":\"handover\",\"binds_over\":true}\n");
        /// The requests of an edgelb older than `binds_over`.
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "cmd", rename_all = "lowercase")]
        enum Older {
            Status,
            Handover,
        }
        assert_eq!(serde_json::from_str::<Older>(&ours).unwrap(), Older::Handover);
        assert_eq!(serde_json::from_str::<Older>(r#"{"cmd":"status"}"#).unwrap(), Older::Status);
    }

    /// A handover's VIPs: an older edgelb's answer, without them, reads as before (none); a
    /// newer one's that this edgelb cannot read (an unknown forwarding mode) reads as none too
    /// instead of failing the takeover; this edgelb's own go through whole.
    #[test]
    fn a_handovers_vips_are_optional_on_the_wire() {
        let older = r#"{"ok":true,"message":"handing over","drains":[{"backend":"198.18.0.11","vip":"web"}],"down":[{"vip":"web","backend":"198.18.0.12:80"}]}"#;
        let r: Response = serde_json::from_str(older).unwrap();
        assert_eq!(r.config_sha256, None, "an older edgelb does not say which file it runs");
        // A socket of a kind a later edgelb added is read as one this edgelb does not know.
        let later: HandedSocket =
            serde_json::from_str(r#"{"kind":"quic","addr":"198.18.0.1:443"}"#).unwrap();
        assert_eq!(later.kind, SocketKind::Unknown);
        assert_eq!((r.vips, r.drains.len(), r.down.len()), (None, 1, 1));
        let newer = r#"{"ok":true,"message":"handing over","vips":[{"name":"web","address":"198.18.1.1","port":80,"protocol":"tcp","forwarding":"gre","backends":["198.18.0.11:80"]}],"down":[{"vip":"web","backend":"198.18.0.12:80"}]}"#;
        let r: Response = serde_json::from_str(newer).unwrap();
        assert_eq!((r.vips, r.down.len()), (None, 1));
        let cfg = crate::config::Config::parse(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web7\"\naddress = \"127.0.0.1\"\nport = 8000\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.1\", port = 8001 }]\n",
            "t.toml".as_ref(),
        )
        .unwrap();
        let ours = Response {
            vips: Some(HandedVip::all(&cfg)),
            config_sha256: Some(crate::config::content_hash(b"x")),
            ..Response::ok("handing over")
        };
        let line = serde_json::to_string(&ours).unwrap();
        assert!(line.contains(r#""forwarding":"l7""#), "{line}");
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back, ours);
        assert_eq!(back.vips.unwrap()[0].backends, ["127.0.0.1:8001".parse().unwrap()]);
        // Without VIPs (any other answer), the fields are left out.
        let other = serde_json::to_string(&Response::ok("x")).unwrap();
        assert!(!other.contains("vips") && !other.contains("config_sha256"), "{other}");
    }

    /// The builds a handover carries, both ways: an older edgelb's request and answer, without
    /// them, read as not said (none); this edgelb's go through whole; and an older edgelb reads
    /// this one's request and answer as before, the field ignored: a rollback and an upgrade
    /// across the change both take over.
    #[test]
    fn a_handovers_builds_are_optional_both_ways() {
        let build = Some("edgelb 0.1.0 (abc1234-dirty)".to_owned());
        let bare: Request =
            serde_json::from_str(r#"{"cmd":"handover","binds_over":true}"#).unwrap();
        assert_eq!(bare, Request::Handover { binds_over: true, build: None });
        let ours = Request::Handover { binds_over: true, build: build.clone() };
        let line = line_of(&ours).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), ours);
        /// The handover request of an edgelb older than `build`.
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "cmd", rename_all = "lowercase")]
        enum Older {
            Handover {
                #[serde(default)]
                binds_over: bool,
            },
        }
        assert_eq!(
            serde_json::from_str::<Older>(&line).unwrap(),
            Older::Handover { binds_over: true }
        );
        let older = r#"{"ok":true,"message":"handing over","config_sha256":"00"}"#;
        assert_eq!(serde_json::from_str::<Response>(older).unwrap().build, None);
        let ours = Response { build: build.clone(), ..Response::ok("handing over") };
        let line = serde_json::to_string(&ours).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), ours);
        /// The handover answer of an edgelb older than `build`, as far as it goes.
        #[derive(Deserialize, Debug, PartialEq)]
        struct OlderAnswer {
            ok: bool,
            message: String,
        }
        let read: OlderAnswer = serde_json::from_str(&line).unwrap();
        assert_eq!(read, OlderAnswer { ok: true, message: "handing over".into() });
        assert!(!serde_json::to_string(&Response::ok("x")).unwrap().contains("build"));
    }

    /// A handed VIP's weights and fail-open state, both ways: an older edgelb's VIPs, without
    /// them, read as not handed (no weights, no state: the takeover infers it); this edgelb's
    /// go through whole; an older edgelb reads a newer one's VIPs, ignoring the fields.
    #[test]
    fn a_handed_vips_weights_and_fail_open_are_optional_both_ways() {
        let older = r#"{"ok":true,"message":"handing over","vips":[{"name":"web","address":"198.18.1.1","port":80,"protocol":"tcp","forwarding":"ipip","backends":["198.18.0.11:80","198.18.0.12:80"]}]}"#;
        let r: Response = serde_json::from_str(older).unwrap();
        let vips = r.vips.expect("an older edgelb's VIPs parse");
        assert_eq!((vips[0].weights.len(), vips[0].fail_open), (0, None));
        assert_eq!(vips[0].weight("198.18.0.11:80".parse().unwrap()), None);
        let cfg = crate::config::Config::parse(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{ address = \"198.18.0.11\", weight = 0 }, { address = \"198.18.0.12\", weight = 3 }]\n",
            "t.toml".as_ref(),
        )
        .unwrap();
        // From the config alone: the weights, not the state (the controller's).
        let line = serde_json::to_string(&HandedVip::all(&cfg)).unwrap();
        assert!(line.contains(r#""weights":[0,3]"#), "{line}");
        assert!(!line.contains("fail_open"), "{line}");
        let mut ours = HandedVip::all(&cfg);
        ours[0].fail_open = Some(true);
        let answer = Response { vips: Some(ours.clone()), ..Response::ok("handing over") };
        let line = serde_json::to_string(&answer).unwrap();
        assert!(line.contains(r#""fail_open":true"#), "{line}");
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.vips.as_deref(), Some(&ours[..]));
        assert_eq!(ours[0].weight("198.18.0.12:80".parse().unwrap()), Some(3));
        assert_eq!(ours[0].weight("198.18.0.13:80".parse().unwrap()), None, "not a backend");
        // Weights that do not match the backends count as not handed.
        let mut odd = ours[0].clone();
        odd.weights.pop();
        assert_eq!(odd.weight("198.18.0.11:80".parse().unwrap()), None);
        // An older edgelb's `HandedVip`, which has neither field and does not deny unknown
        // ones, reads this one's.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct OldHandedVip {
            name: String,
            address: IpAddr,
            port: u16,
            protocol: crate::config::Protocol,
            forwarding: crate::config::Forwarding,
            backends: Vec<SocketAddr>,
        }
        let vips = serde_json::to_value(&ours).unwrap();
        let old: Vec<OldHandedVip> =
            serde_json::from_value(vips).expect("an older edgelb reads it");
        assert_eq!((old[0].name.as_str(), old[0].backends.len()), ("web", 2));
    }

    /// A process that listens on the admin socket but never accepts (hung or stopped, its queue
    /// full) is taken as answering, at once: the blocking connect that looked for it waited for
    /// good, and the controller, re-binding from its loop an admin socket it had lost, hung.
    #[test]
    fn a_listener_that_never_accepts_answers_without_a_wait() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let hung =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        hung.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
        hung.listen(0).unwrap();
        // Its queue takes one connection; the next would wait.
        let _queued = UnixStream::connect(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        {
            let path = path.clone();
            std::thread::spawn(move || {
                let _ = tx.send(bind_within(&path, Duration::from_millis(50)).map(|_| ()));
            });
        }
        let got = rx.recv_timeout(Duration::from_secs(3)).expect("bind gave up at once");
        let e = got.expect_err("another process listens there");
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        assert!(path.exists(), "its socket is left alone");
        drop(hung);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `Serving::finish` returns once the answer the controller handed the admin thread is
    /// written (the process may exit then: `edgelb stop` used to see "closed without answering"
    /// about one stop in six), and a request the controller will never take (its receiver
    /// dropped at exit) is answered as such rather than holding the thread.
    #[test]
    fn finish_waits_for_the_answer_given_and_turns_away_the_rest() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-finish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        for answered in [true, false] {
            let (tx, rx) = mpsc::channel::<Pending>();
            let serving = serve(UnixListener::bind(&path).unwrap(), tx).unwrap();
            let client = {
                let path = path.clone();
                std::thread::spawn(move || request(&path, &Request::Status))
            };
            let (_req, reply) = rx.recv_timeout(Duration::from_secs(10)).expect("a request");
            if answered {
                let _ = reply.send(Response::ok("stopping").into());
                drop(rx);
            } else {
                // The controller exits without taking what is queued: its channel goes.
                drop(reply);
                drop(rx);
            }
            let started = std::time::Instant::now();
            assert!(serving.finish(Duration::from_secs(10)), "the admin thread ends");
            assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
            let got = client.join().unwrap();
            let _ = std::fs::remove_file(&path);
            if answered {
                let r = got.expect("answered");
                assert!(r.ok && r.message == "stopping", "{r:?}");
            } else {
                let r = got.expect("answered");
                assert!(!r.ok && r.message.contains("shutting down"), "{r:?}");
            }
        }
        // A client connected but silent (still to send its request) is not waited for: its
        // read deadline kept a stopping edgelb up for seconds after its listeners had closed.
        let (tx, _rx) = mpsc::channel::<Pending>();
        let serving = serve(UnixListener::bind(&path).unwrap(), tx).unwrap();
        let _silent = UnixStream::connect(&path).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = std::time::Instant::now();
        assert!(serving.finish(Duration::from_secs(10)), "no answer was left unwritten");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A socket that closes without answering (a controller that exits) is said as such, not
    /// as a JSON parse error of an empty line.
    #[test]
    fn a_close_without_an_answer_is_said_plainly() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-eof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let closer = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            drop(s);
        });
        let e = request(&path, &Request::Status).unwrap_err().to_string();
        closer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains("closed without answering"), "{e}");
    }

    /// A request longer than the admin socket reads (a 70 KB VIP name) is refused as such, a
    /// bad request (the CLI exits 2), not as the JSON error of the line cut at 64 KiB, and
    /// answered even where the cut falls inside a UTF-8 character; the CLI's side refuses it
    /// without sending it.
    #[test]
    fn an_over_long_request_is_refused_as_such() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-long-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let serving = serve(bind(&path).unwrap(), controller(|_| Response::ok("here"))).unwrap();
        let route = |vip: String| Request::Route {
            client: "198.18.4.1".parse().unwrap(),
            vip,
            sport: None,
            proto: None,
        };
        // Two-byte characters, at both parities: one of the cuts splits one.
        for vip in ["a".repeat(70_000), "é".repeat(35_000), format!("x{}", "é".repeat(35_000))] {
            let line = line_of(&route(vip)).unwrap();
            let mut s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(line.as_bytes()).unwrap();
            let mut answer = String::new();
            BufReader::new(&s).read_line(&mut answer).unwrap();
            let r: Response =
                serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
            assert!(!r.ok && r.bad_request, "{r:?}");
            assert_eq!(r.message, TOO_LONG);
        }
        // One that fits is read whole.
        let r = request(&path, &route("a".repeat(60_000))).unwrap();
        assert_eq!(r.message, "here");
        serving.stop();
        // The CLI does not send one: no controller is asked (none serves this path).
        let r = request(&dir.join("nobody.sock"), &route("a".repeat(100_000))).unwrap();
        assert!(!r.ok && r.bad_request && r.message == TOO_LONG, "{r:?}");
        assert_eq!(MAX_REQUEST, 64 << 10, "TOO_LONG says 64 KiB");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request refused by an edgelb that has handed over ([`Response::handed_over`]) is
    /// asked again, of the process that took the socket's path over ([`bind_over`], which
    /// replaces it while the old one still listens): carried out once, by the new one. Another
    /// refusal is final.
    #[test]
    fn a_request_an_edgelb_that_handed_over_refuses_is_asked_of_the_new_one() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-over-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let asked_new = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let new_serving = Arc::new(std::sync::Mutex::new(None));
        let old = {
            let (path, asked_new, new_serving) =
                (path.clone(), asked_new.clone(), new_serving.clone());
            // The old one's first request: the new process takes the path over meanwhile.
            controller(move |_| {
                let mut new = new_serving.lock().unwrap();
                if new.is_none() {
                    let asked = asked_new.clone();
                    let answer = move |_: &Request| {
                        asked.fetch_add(1, Ordering::Relaxed);
                        Response::ok("the new one")
                    };
                    *new = Some(serve(bind_over(&path).unwrap(), controller(answer)).unwrap());
                }
                Response::handed_over()
            })
        };
        let old = serve(bind(&path).unwrap(), old).unwrap();
        let r = request(&path, &Request::Reload { config: None }).unwrap();
        assert_eq!((r.ok, r.message.as_str()), (true, "the new one"), "{r:?}");
        assert_eq!(asked_new.load(Ordering::Relaxed), 1, "carried out once");
        // The path is the new one's socket, root-only; nothing else is left beside it.
        let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["admin.sock"], "{left:?}");
        old.stop();
        new_serving.lock().unwrap().take().unwrap().stop();

        // A refusal of another kind is the answer.
        let _ = std::fs::remove_dir_all(&dir);
        let refusing = serve(bind(&path).unwrap(), controller(|_| Response::err("no"))).unwrap();
        let start = std::time::Instant::now();
        let r = request(&path, &Request::Status).unwrap();
        assert!(!r.ok && r.message == "no" && start.elapsed() < Duration::from_secs(1), "{r:?}");
        refusing.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A takeover binds over an admin socket whose path is near the longest a socket can have
    /// (96 to 107 bytes), which a plain start binds: `<path>.<pid>.new` being too long for a
    /// socket address, the name bound first is `.<pid>` beside it; when even that is too long,
    /// or is taken by a file not edgelb's (left alone), the path is removed and bound again.
    /// Either way the new listener has the path, root-only, and nothing of its own is left
    /// beside it. Every takeover of such a path used to fail: "path must be shorter than
    /// SUN_LEN".
    #[test]
    fn bind_over_a_path_near_the_longest_a_socket_has() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-long-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A path of `len` bytes: the directory, a subdirectory of the length that makes it,
        // and `name`.
        let at = |len: usize, name: &str| {
            let sub = "d".repeat(len - dir.as_os_str().len() - name.len() - 2);
            dir.join(sub).join(name)
        };
        let over = |path: &Path| {
            let old = bind(path).unwrap();
            let new =
                bind_over(path).unwrap_or_else(|e| panic!("{} bytes: {e}", path.as_os_str().len()));
            new.set_nonblocking(true).unwrap();
            old.set_nonblocking(true).unwrap();
            let _client = UnixStream::connect(path).unwrap();
            new.accept().expect("the new listener has the path");
            assert!(old.accept().is_err(), "the old listener has no new connection");
            let mode = std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let mut left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        let pid = std::process::id();
        let hundred = at(100, "admin.sock");
        assert_eq!(hundred.as_os_str().len(), 100);
        assert_eq!(over(&hundred), ["admin.sock"]);
        let longest = at(SUN_PATH_MAX, "s");
        assert_eq!(longest.as_os_str().len(), SUN_PATH_MAX);
        assert_eq!(over(&longest), ["s"]);
        // `.<pid>` beside it someone else's file: left as it is.
        let theirs = hundred.parent().unwrap().join(format!(".{pid}"));
        std::fs::write(&theirs, "not edgelb's").unwrap();
        assert_eq!(over(&hundred), [format!(".{pid}"), "admin.sock".into()]);
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "not edgelb's");
        std::fs::remove_file(&theirs).unwrap();
        // ... or another program's live socket, which answers no stream connect (a datagram
        // socket: EPROTOTYPE): left as it is, bound and answering.
        let live = std::os::unix::net::UnixDatagram::bind(&theirs).unwrap();
        assert_eq!(over(&hundred), [format!(".{pid}"), "admin.sock".into()]);
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"still here", &theirs).expect("their socket's file is still there");
        let mut got = [0u8; 16];
        assert_eq!(live.recv(&mut got).unwrap(), 10);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request whose newline never comes (`nc -U` left open after typing it, a client that
    /// forgot it) is refused as such once the client's time is up, a bad request, rather than
    /// closed without a word; one whose sender closes without the newline is read as it came;
    /// a client that sends nothing gets nothing; and the next command is answered.
    #[test]
    fn a_request_without_its_newline_is_refused_once_its_time_is_up() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-nonl-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let serving = serve(bind(&path).unwrap(), controller(|_| Response::ok("here"))).unwrap();
        let wait = Some(CLIENT_WAIT + Duration::from_secs(3));
        let answer_of = |s: &UnixStream| {
            let mut answer = String::new();
            BufReader::new(s).read_line(&mut answer).unwrap();
            answer
        };

        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(wait).unwrap();
        (&s).write_all(br#"{"cmd":"status"}"#).unwrap();
        let start = std::time::Instant::now();
        let answer = answer_of(&s);
        let took = start.elapsed();
        let r: Response =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
        assert!(!r.ok && r.bad_request, "{r:?}");
        assert!(r.message.starts_with("bad request: no newline within 5 s"), "{r:?}");
        assert!(took < CLIENT_WAIT + Duration::from_secs(1), "answered after {took:?}");

        // Closed without its newline: the request as it came.
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(wait).unwrap();
        (&s).write_all(br#"{"cmd":"status"}"#).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(answer_of(&s).contains(r#""message":"here""#));

        // Nothing sent: closed, unanswered.
        let s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(wait).unwrap();
        assert_eq!(answer_of(&s), "");

        assert_eq!(request(&path, &Request::Status).unwrap().message, "here");
        serving.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The handover of a large config in an outage goes through: 16 XDP and 16 L7 VIPs of 256
    /// IPv6 backends each, 64-byte names, every backend down and drained (about 2 MiB, past the
    /// 1 MiB cap that failed such takeovers). An answer past [`MAX_HANDOVER_ANSWER`] is refused,
    /// saying how long it was and the limit.
    #[test]
    fn a_handover_of_a_large_config_all_down_goes_through() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-large-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let name = |v: usize| format!("{v:02}-{}", "v".repeat(61));
        let backend = |v: usize, b: usize| -> SocketAddr {
            format!("[2001:db8:{v:x}::{b:x}]:8080").parse().unwrap()
        };
        let vips: Vec<HandedVip> = (0..32)
            .map(|v| HandedVip {
                name: name(v),
                address: format!("2001:db8:ffff::{v:x}").parse().unwrap(),
                port: 8080,
                protocol: crate::config::Protocol::Tcp,
                forwarding: if v < 16 {
                    crate::config::Forwarding::Ipip
                } else {
                    crate::config::Forwarding::L7
                },
                backends: (0..256).map(|b| backend(v, b)).collect(),
                weights: vec![1; 256],
                fail_open: Some(true),
            })
            .collect();
        let down: Vec<Down> = (0..32)
            .flat_map(|v| (0..256).map(move |b| (v, b)))
            .map(|(v, b)| Down { vip: name(v), backend: backend(v, b) })
            .collect();
        let drains: Vec<Drain> = down
            .iter()
            .map(|d| Drain {
                backend: d.backend.ip(),
                port: Some(d.backend.port()),
                vip: Some(d.vip.clone()),
            })
            .collect();
        let response = Response {
            sockets: vec![HandedSocket {
                kind: SocketKind::Metrics,
                addr: "127.0.0.1:9".parse().unwrap(),
            }],
            drains: drains.clone(),
            down: down.clone(),
            vips: Some(vips.clone()),
            ..Response::ok("handing over")
        };
        let size = serde_json::to_string(&response).unwrap().len();
        assert!(size > 1 << 20, "the answer is {size} bytes: not past the old cap");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = mpsc::channel::<Pending>();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (_, reply) in rx {
                let _ = reply.send(Answer {
                    fds: vec![OwnedFd::from(listener.try_clone().unwrap())],
                    done: Some(done_tx.clone()),
                    ..response.clone().into()
                });
            }
        });
        let serving = serve(bind(&path).unwrap(), tx).unwrap();
        let h = handover(&path).unwrap().expect("an edgelb answers");
        assert_eq!(h.sockets.len(), 1);
        assert_eq!((h.down.len(), h.drains.len()), (8192, 8192));
        assert!(h.down == down && h.drains == drains, "the verdicts and drains come whole");
        assert_eq!(h.vips, Some(vips));
        drop(h);
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)), Ok(HandoverEnd::Abandoned));
        serving.stop();

        // A running edgelb sending without end is cut at the limit, which the error names.
        let endless = dir.join("endless.sock");
        let l = UnixListener::bind(&endless).unwrap();
        let writer = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let chunk = vec![b'x'; 1 << 20];
            while c.write_all(&chunk).is_ok() {}
        });
        let e = handover(&endless).unwrap_err().to_string();
        assert!(e.contains("longer than 64 MiB") && e.contains("bytes read"), "{e}");
        writer.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An answer that cannot be read (2 MiB of anything but JSON, as a confused or hostile
    /// peer might send, up to the 64 MiB a handover reads) is quoted in the error only in
    /// part, with its length: the error stays one readable line. A short one is quoted whole.
    #[test]
    fn a_long_bad_answer_is_quoted_only_in_part() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        // 2 MiB; the 1 KiB cut falls inside an "é", and is made before it.
        let long = format!("abc{}\n", "é<not json>".repeat((2 << 20) / 12));
        let answers = [long.clone(), long.clone(), "nope\n".to_string()];
        let server = std::thread::spawn(move || {
            for answer in answers {
                let (mut s, _) = l.accept().unwrap();
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        let handed = handover(&path).unwrap_err().to_string();
        let asked = request(&path, &Request::Status).unwrap_err().to_string();
        let short = request(&path, &Request::Status).unwrap_err().to_string();
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        for e in [&handed, &asked] {
            let head: String = e.chars().take(200).collect();
            assert!(e.len() < 4096, "{} bytes: {head}", e.len());
            assert!(e.contains(&format!("bad answer of {} bytes", long.len())), "{e}");
            assert!(e.contains("starting \"abcé<not json>"), "{e}");
            assert!(e.contains("<not json>\"…"), "cut before the \"é\" it falls in: {e}");
        }
        assert!(short.contains("bad answer \"nope\\n\""), "{short}");
    }

    /// A client that trickles its request, or sends one and never reads the (long) answer,
    /// holds the admin thread for [`CLIENT_WAIT`] at most: the next command is answered. So
    /// does a process taking over that never reads its handover answer (sockets attached).
    #[test]
    fn a_stuck_admin_client_does_not_hold_the_next_command() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-stuck-{}", std::process::id()));
        let path = dir.join("admin.sock");
        // The answers to a reload and a handover far larger than the socket's buffer, the
        // handover's with a socket attached.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::spawn(move || {
            for (req, reply) in rx {
                let answer = match req {
                    Request::Reload { .. } => Response::ok("x".repeat(8 << 20)).into(),
                    Request::Handover { .. } => Answer {
                        fds: vec![OwnedFd::from(listener.try_clone().unwrap())],
                        ..Response::ok("x".repeat(8 << 20)).into()
                    },
                    _ => Response::ok("here").into(),
                };
                let _ = reply.send(answer);
            }
        });
        let _serving = serve(bind(&path).unwrap(), tx).unwrap();
        let bound = CLIENT_WAIT + Duration::from_secs(3);

        // A request trickled a byte a second, without end.
        let trickler = UnixStream::connect(&path).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let drip = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if (&trickler).write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let start = std::time::Instant::now();
        assert_eq!(request(&path, &Request::Status).unwrap().message, "here");
        assert!(start.elapsed() < bound, "held {:?} by a trickling client", start.elapsed());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drip.join().unwrap();

        // A request whose long answer is never read.
        let mut sleeper = UnixStream::connect(&path).unwrap();
        let mut line = serde_json::to_string(&Request::Reload { config: None }).unwrap();
        line.push('\n');
        sleeper.write_all(line.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let start = std::time::Instant::now();
        assert_eq!(request(&path, &Request::Status).unwrap().message, "here");
        assert!(start.elapsed() < bound, "held {:?} by a client not reading", start.elapsed());
        drop(sleeper);

        // A handover whose answer, sockets attached, is never read.
        let mut taker = UnixStream::connect(&path).unwrap();
        let mut line =
            serde_json::to_string(&Request::Handover { binds_over: true, build: None }).unwrap();
        line.push('\n');
        taker.write_all(line.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let start = std::time::Instant::now();
        let answered = request(&path, &Request::Status);
        let took = start.elapsed();
        drop(taker);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(answered.unwrap().message, "here");
        assert!(took < bound, "held {took:?} by a process taking over not reading");
    }

    /// Only a stale socket is replaced: a mistyped `admin_socket` naming another file leaves it
    /// alone, and an existing directory keeps its mode (it may be `/run` or `/tmp`).
    #[test]
    fn bind_replaces_only_a_socket_and_leaves_an_existing_directory_as_it_is() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("edgelb.toml");
        std::fs::write(&file, "[node]\n").unwrap();
        let e = bind(&file).expect_err("a regular file is not replaced");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "[node]\n");
        // A stale socket (no one answers) is replaced; the directory keeps its mode.
        let path = dir.join("admin.sock");
        drop(bind(&path).unwrap());
        let listener = bind(&path).expect("a stale socket is replaced");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "an existing directory keeps its mode");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the socket is root-only");
        drop(listener);
        // A directory that is not there is made root-only.
        let fresh = dir.join("fresh").join("admin.sock");
        drop(bind(&fresh).unwrap());
        let mode = std::fs::metadata(dir.join("fresh")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Starts at the same moment bind one at a time: of eight binding at once, one gets the
    /// socket and the others find it answering. Unlocked, two could both find nobody there,
    /// the second removing the first's fresh socket and binding its own: both then ran.
    #[test]
    fn of_binds_at_once_exactly_one_gets_the_socket() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-race-{}", std::process::id()));
        let path = dir.join("admin.sock");
        for round in 0..40 {
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let binds: Vec<_> = (0..8)
                .map(|_| {
                    let (start, path) = (start.clone(), path.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        bind(&path)
                    })
                })
                .collect();
            let mut bound = Vec::new();
            for b in binds {
                match b.join().unwrap() {
                    Ok(l) => bound.push(l),
                    Err(e) => {
                        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "round {round}: {e}");
                    }
                }
            }
            assert_eq!(bound.len(), 1, "round {round}: {} binds got the socket", bound.len());
            // The one that got it is the one answering at the path.
            bound[0].set_nonblocking(true).unwrap();
            let _client = UnixStream::connect(&path).unwrap();
            assert!(bound[0].accept().is_ok(), "round {round}: the path is another socket's");
            // Dropped: a stale socket for the next round to replace.
        }
        let left: Vec<_> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["admin.sock"], "nothing left beside the socket");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The lock file beside the socket is never one planted by another user, nor reached
    /// through a symbolic link.
    #[test]
    fn the_bind_lock_is_edgelbs_own_file() {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-lockf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.sock");
        let lock = dir.join("admin.sock.lock");
        std::os::unix::fs::symlink(dir.join("elsewhere"), &lock).unwrap();
        let e = bind(&path).expect_err("a symbolic link is not followed").to_string();
        assert!(e.contains("admin.sock.lock"), "{e}");
        assert!(!dir.join("elsewhere").exists(), "created through the link");
        std::fs::remove_file(&lock).unwrap();
        drop(bind(&path).expect("bound once the link is gone"));
        assert!(!lock.exists(), "the lock file is removed after the bind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Neither end of the admin socket deals with a process of another user: a socket a local
    /// user bound first at the path (in a shared directory) is not asked to hand over or to
    /// stop, and such a user's connection to edgelb's socket is not answered.
    #[test]
    #[allow(unsafe_code)]
    fn the_admin_socket_deals_only_with_root_or_its_own_user() {
        use crate::testbed::netns::{euid, require};
        if !require(
            euid() == 0,
            "the_admin_socket_deals_only_with_root_or_its_own_user: needs root to act as another user",
        ) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("edgelb-admin-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // In a thread of its own, as user 65534 (the raw system call changes this thread only,
        // where libc's setresuid would change every thread of the test process).
        let as_nobody = |f: Box<dyn FnOnce() + Send>| {
            std::thread::spawn(move || {
                // SAFETY: setresuid on this thread alone; the thread ends with the closure.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
                assert_eq!(rc, 0, "setresuid");
                f();
            })
        };
        // A socket bound by another user: edgelb's CLI and takeover refuse it.
        let squatted = dir.join("squatted.sock");
        let (tx, rx) = mpsc::channel();
        let path = squatted.clone();
        let squatter = as_nobody(Box::new(move || {
            let l = UnixListener::bind(&path).unwrap();
            tx.send(()).unwrap();
            for c in l.incoming().take(2) {
                let mut c = c.unwrap();
                let _ = c.write_all(b"{\"ok\":true,\"message\":\"stopping\"}\n");
            }
        }));
        rx.recv().unwrap();
        let e = request(&squatted, &Request::Stop { detach: false }).unwrap_err();
        assert!(e.to_string().contains("neither root nor this one"), "{e}");
        let e = handover(&squatted).unwrap_err();
        assert!(e.to_string().contains("neither root nor this one"), "{e}");
        squatter.join().unwrap();
        // edgelb's own socket, made reachable to the other user: no answer for it.
        let own = dir.join("own.sock");
        let serving = serve(bind(&own).unwrap(), controller(|_| Response::ok("done"))).unwrap();
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o666)).unwrap();
        let path = own.clone();
        let (tx, rx) = mpsc::channel();
        as_nobody(Box::new(move || {
            let mut c = UnixStream::connect(&path).unwrap();
            // Refused at once: the write may already find the connection closed.
            let _ = c.write_all(b"\"Status\"\n");
            let mut got = String::new();
            let _ = c.read_to_string(&mut got);
            tx.send(got).unwrap();
        }))
        .join()
        .unwrap();
        assert_eq!(rx.recv().unwrap(), "", "answered another user");
        assert!(request(&own, &Request::Status).unwrap().ok, "root is answered");
        serving.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Randomized property tests of the admin socket: valid requests damaged, random bytes, lines
    // over the 64 KiB cap, many lines, no newline, invalid UTF-8. Each connection gets one JSON
    // answer line (the one its request asks for, or a refusal: a line not UTF-8 too), within the
    // client deadline, and the admin thread serves on. Deterministic: a fixed seed unless FUZZ_SEED=<n> is set; the
    // seed is printed, and a failure names its case.

    /// The most of a request line the admin thread reads (the `take` in [`handle`]).
    const PROP_CAP: usize = MAX_REQUEST;

    use crate::fuzz::{PropRng, prop_seed};

    /// A temporary socket path and the admin thread serving it, answering each request with
    /// its `Debug` form (so an answer shows what was understood). In `edgelb-admin-<name>-<pid>`,
    /// a name xtask's sweep of killed runs knows.
    fn prop_serve(name: &str) -> (PathBuf, PathBuf, Serving) {
        let dir = std::env::temp_dir().join(format!("edgelb-admin-{name}-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let echo = controller(|req| Response::ok(format!("{req:?}")));
        let serving = serve(bind(&path).unwrap(), echo).unwrap();
        (dir, path, serving)
    }

    /// Valid request lines, without their newline.
    fn prop_requests() -> Vec<String> {
        let v4: IpAddr = "198.18.0.11".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let mut out: Vec<String> = [
            Request::Status,
            Request::Reload { config: None },
            Request::Handover { binds_over: false, build: None },
            Request::Handover { binds_over: true, build: Some("edgelb 0.1.0 (abc1234)".into()) },
            Request::Stop { detach: true },
            Request::Stop { detach: false },
            Request::Drain { backend: v4.into(), vip: None },
            Request::Drain { backend: v6.into(), vip: Some("web".into()) },
            Request::Drain {
                backend: BackendRef { address: v6, port: Some(8080) },
                vip: Some("web".into()),
            },
            Request::Undrain { backend: v6.into(), vip: Some("é😀\u{0}\"\\".into()) },
            Request::Undrain { backend: BackendRef { address: v4, port: Some(80) }, vip: None },
            Request::Route { client: v4, vip: "web".into(), sport: Some(4000), proto: None },
        ]
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
        out.extend(
            [
                r#" { "vip" : null , "backend" : "::1" , "cmd" : "drain" } "#,
                r#"{"cmd":"st\u0061tus"}"#,
                r#"{"cmd":"status","extra":[1,{"a":null}]}"#,
                "{\"cmd\":\"reload\"}\r",
            ]
            .map(String::from),
        );
        out
    }

    /// A request line damaged 1 to 3 times, as bytes.
    fn prop_damage(line: &str, r: &mut PropRng) -> Vec<u8> {
        let mut b = line.as_bytes().to_vec();
        let inserts: [&[u8]; 18] = [
            b"\"",
            b"{",
            b"}",
            b"[",
            b"]",
            b":",
            b",",
            b"\\",
            b"\\u0000",
            b"\\ud800",
            b"\0",
            b"\n",
            b"\r",
            b"\xff",
            b"\xc3",
            b"\xe2\x80\xa8",
            "😀".as_bytes(),
            b"null",
        ];
        let swaps = [
            ("\"status\"", "\"Status\""),
            ("\"cmd\"", "\"CMD\""),
            ("{", "{\"cmd\":\"reload\","),
            ("true", "1"),
            ("false", "\"false\""),
            ("\"198.18.0.11\"", "\"198.18.0.256\""),
            ("\"2001:db8::1\"", "\"fe80::1%eth0\""),
            ("\"web\"", "[\"web\"]"),
            ("\"web\"", "1e999"),
            ("null", "18446744073709551616"),
            ("\"drain\"", "\"drain\",\"cmd\":\"stop\""),
            ("\"vip\"", "\"backend\""),
        ];
        for _ in 0..1 + r.below(3) {
            let at = r.below(b.len() + 1);
            match r.below(6) {
                0 if at < b.len() => b[at] ^= 1 << r.below(8),
                1 => {
                    let end = (at + 1 + r.below(8)).min(b.len());
                    b.drain(at..end);
                }
                2 => b.truncate(at),
                3 => {
                    let (from, to) = swaps[r.below(swaps.len())];
                    let text = String::from_utf8_lossy(&b).replacen(from, to, 1);
                    b = text.into_bytes();
                }
                _ => {
                    let what = inserts[r.below(inserts.len())];
                    b.splice(at..at, what.iter().copied());
                }
            }
        }
        b
    }

    /// One payload a client might send: see the comment above.
    fn prop_payload(r: &mut PropRng, requests: &[String]) -> Vec<u8> {
        let request = |r: &mut PropRng| requests[r.below(requests.len())].clone();
        let nl = |r: &mut PropRng| if r.below(4) == 0 { "" } else { "\n" };
        match r.below(12) {
            // Valid requests damaged.
            0..=3 => {
                let mut b = prop_damage(&request(r), r);
                b.extend_from_slice(nl(r).as_bytes());
                b
            }
            // Valid, with or without their newline (the connection then closed).
            4 => format!("{}{}", request(r), nl(r)).into_bytes(),
            // Random bytes.
            5 => (0..r.below(512)).map(|_| r.below(256) as u8).collect(),
            // Many lines, the first valid or not.
            6 => {
                let mut b = Vec::new();
                for _ in 0..2 + r.below(50) {
                    match r.below(3) {
                        0 => b.extend(prop_damage(&request(r), r)),
                        _ => b.extend_from_slice(request(r).as_bytes()),
                    }
                    b.push(b'\n');
                }
                b
            }
            // Lines at and over the cap.
            7 | 8 => {
                let around = (PROP_CAP + r.below(5)).saturating_sub(2);
                match r.below(6) {
                    0 => [vec![b'x'; around - 1], b"\n".to_vec()].concat(),
                    // A valid request padded with spaces (JSON lets a value end in them).
                    1 => {
                        let req = request(r);
                        let pad = around.saturating_sub(req.len() + 1);
                        format!("{req}{}\n", " ".repeat(pad)).into_bytes()
                    }
                    // A string value running past the cap, in ASCII or cut inside a character.
                    2 | 3 => {
                        let fill = r.pick(&["a", "é", "😀", "\\\""]);
                        let n = (PROP_CAP + r.below(PROP_CAP)) / fill.len();
                        format!(r#"{{"cmd":"drain","backend":"::1","vip":"{}"}}"#, fill.repeat(n))
                            .into_bytes()
                    }
                    // Megabytes, without a newline.
                    _ => {
                        let byte = b"x {\""[r.below(4)];
                        vec![byte; (1 + r.below(4)) << 20]
                    }
                }
            }
            // Deep nesting.
            9 => {
                let most = if r.below(2) == 0 { 200 } else { 100_000 };
                let depth = 1 + r.below(most);
                let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                let nested = match r.below(3) {
                    0 => format!(r#"{{"cmd":"drain","backend":{nested}}}"#),
                    1 => format!(r#"{{"cmd":"status","x":{nested}}}"#),
                    _ => {
                        format!(r#"{}"cmd":"status"{}"#, "{\"a\":".repeat(depth), "}".repeat(depth))
                    }
                };
                format!("{nested}{}", nl(r)).into_bytes()
            }
            // Invalid UTF-8, in the request or after it.
            _ => {
                let mut b = format!("{}\n", request(r)).into_bytes();
                let bad: [&[u8]; 7] = [
                    b"\x80",
                    b"\xc0\xaf",
                    b"\xc3",
                    b"\xe2\x82",
                    b"\xed\xa0\x80",
                    b"\xf4\x90\x80\x80",
                    b"\xff\xfe",
                ];
                let at = r.below(b.len() + 1);
                b.splice(at..at, bad[r.below(bad.len())].iter().copied());
                b
            }
        }
    }

    /// What the admin thread must make of `payload`, read as it reads it: its first line, at
    /// most [`PROP_CAP`] bytes.
    #[derive(Debug)]
    enum PropExpect {
        /// A request: answered with what the controller says.
        Answer(Request),
        /// No request (not UTF-8 included: the line is read as bytes, and JSON refuses it):
        /// refused with `bad request`.
        Refusal,
    }

    fn prop_expected(payload: &[u8]) -> PropExpect {
        let head = &payload[..payload.len().min(PROP_CAP)];
        let line = head.iter().position(|&b| b == b'\n').map_or(head, |i| &head[..=i]);
        match serde_json::from_slice::<Request>(line) {
            Ok(req) => PropExpect::Answer(req),
            Err(_) => PropExpect::Refusal,
        }
    }

    /// Connects, writes `payload` (as much as the admin thread takes: it stops reading at the
    /// cap and closes), closes the writing side, and reads until the thread closes: the bytes
    /// it sent, and how long the exchange took. An error when the thread neither took the
    /// bytes nor closed, or did not answer nor close, within the client deadline (and more).
    fn prop_exchange(path: &Path, payload: &[u8]) -> Result<(Vec<u8>, Duration), String> {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        let start = std::time::Instant::now();
        let mut s = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
        let wait = Some(CLIENT_WAIT + Duration::from_secs(2));
        s.set_write_timeout(wait).and_then(|()| s.set_read_timeout(wait)).unwrap();
        match s.write_all(payload) {
            Err(e) if !matches!(e.kind(), BrokenPipe | ConnectionReset) => {
                return Err(format!("write: {e} after {:?}", start.elapsed()));
            }
            _ => {}
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        match s.read_to_end(&mut reply) {
            Err(e) if e.kind() != ConnectionReset => {
                Err(format!("read: {e} after {:?}, {} bytes", start.elapsed(), reply.len()))
            }
            _ => Ok((reply, start.elapsed())),
        }
    }

    /// The properties of one exchange: at most one answer line, JSON, the one `payload` asks
    /// for, within the client deadline. What happened, or what went wrong.
    fn prop_check(payload: &[u8], reply: &[u8], took: Duration) -> Result<&'static str, String> {
        if took >= CLIENT_WAIT {
            return Err(format!("took {took:?}"));
        }
        let answer = match reply.iter().position(|&b| b == b'\n') {
            _ if reply.is_empty() => None,
            Some(end) if end + 1 == reply.len() => Some(
                serde_json::from_slice::<Response>(&reply[..end])
                    .map_err(|e| format!("answer not a response ({e})"))?,
            ),
            Some(_) => return Err("more than one answer line".into()),
            None => return Err("an answer without its newline".into()),
        };
        let refusal = |a: &Response| !a.ok && a.message.starts_with("bad request");
        match (prop_expected(payload), answer) {
            (PropExpect::Answer(req), Some(a)) if a.ok && a.message == format!("{req:?}") => {
                Ok("answered")
            }
            (PropExpect::Refusal, Some(a)) if refusal(&a) => Ok("refused"),
            (want, got) => Err(format!(
                "wanted {want:?}, got {}",
                got.map_or("no answer".to_owned(), |a| format!("{a:?}")
                    .chars()
                    .take(300)
                    .collect())
            )),
        }
    }

    /// Still serving: a valid `status` is answered, by a thread that has not ended.
    fn prop_still_serves(path: &Path, serving: &Serving) -> Result<(), String> {
        let (reply, took) = prop_exchange(path, b"{\"cmd\":\"status\"}\n")?;
        match prop_check(b"{\"cmd\":\"status\"}\n", &reply, took) {
            Ok("answered") if !serving.stopped() => Ok(()),
            other => Err(format!("status no longer answered: {other:?}")),
        }
    }

    /// Damaged and random requests, a few hundred connections: see [`prop_check`]; after them
    /// (and every 50) the thread still answers `status`.
    #[test]
    fn damaged_admin_requests_get_their_answer_or_a_close_and_the_thread_serves_on() {
        let seed = prop_seed(0xad31_7e57_5eed_0001);
        let mut r = PropRng::new(seed);
        let (dir, path, serving) = prop_serve("prop");
        let requests = prop_requests();
        let start = std::time::Instant::now();
        let mut seen = std::collections::BTreeMap::<&str, usize>::new();
        let mut failures = Vec::new();
        let cases = 2_000;
        for case in 0..cases {
            let payload = prop_payload(&mut r, &requests);
            let outcome = prop_exchange(&path, &payload)
                .and_then(|(reply, took)| prop_check(&payload, &reply, took));
            match outcome {
                Ok(what) => *seen.entry(what).or_default() += 1,
                Err(e) => failures.push(format!(
                    "case {case}: {e}\n  payload ({} bytes): {:?}",
                    payload.len(),
                    String::from_utf8_lossy(&payload[..payload.len().min(300)])
                )),
            }
            if case % 50 == 49 || !failures.is_empty() {
                if let Err(e) = prop_still_serves(&path, &serving) {
                    failures.push(format!("after case {case}: {e}"));
                }
                if failures.len() >= 5 || serving.stopped() {
                    break;
                }
            }
        }
        eprintln!("{cases} connections in {:?}: {seen:?}", start.elapsed());
        serving.stop();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(failures.is_empty(), "FUZZ_SEED={seed}:\n{}", failures.join("\n"));
        assert!(
            seen.len() == 2 && seen.values().all(|&n| n >= 10),
            "every outcome should occur: {seen:?}"
        );
    }

    /// A request that never ends (64 MiB offered, no newline, the connection left open) is
    /// cut at the cap: the admin thread takes no more than the cap and the socket's buffers,
    /// refuses it within the client deadline, and serves the next command.
    #[test]
    fn an_endless_admin_request_is_cut_at_the_cap() {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        let (dir, path, serving) = prop_serve("endless");
        let s = UnixStream::connect(&path).unwrap();
        let wait = Some(CLIENT_WAIT + Duration::from_secs(2));
        s.set_write_timeout(wait).and_then(|()| s.set_read_timeout(wait)).unwrap();
        let buffers = socket2::SockRef::from(&s).send_buffer_size().unwrap()
            + socket2::SockRef::from(&s).recv_buffer_size().unwrap();
        let most = PROP_CAP + 2 * buffers + (64 << 10);
        assert!(most < 16 << 20, "socket buffers too large for the test: {buffers}");
        let chunk = vec![b'x'; 1 << 20];
        let start = std::time::Instant::now();
        let mut taken = 0;
        while taken < 64 << 20 {
            match (&s).write(&chunk) {
                Ok(n) => taken += n,
                Err(e) if matches!(e.kind(), BrokenPipe | ConnectionReset) => break,
                Err(e) => panic!("write after {taken} bytes, {:?}: {e}", start.elapsed()),
            }
        }
        assert!(
            taken <= most,
            "the admin thread took {taken} bytes of one request (cap {PROP_CAP})"
        );
        let mut reply = Vec::new();
        let read = (&s).read_to_end(&mut reply);
        let took = start.elapsed();
        assert!(
            read.is_ok() || read.as_ref().is_err_and(|e| e.kind() == ConnectionReset),
            "{read:?} after {took:?}"
        );
        assert_eq!(prop_check(&chunk, &reply, took), Ok("refused"), "{took:?}");
        assert_eq!(prop_still_serves(&path, &serving), Ok(()));
        serving.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A backend's in-flight count is optional in `status --json`: an older daemon's answer
    /// has none (read as unknown, not as 0), and a backend of a VIP XDP forwards gets none
    /// written, while an L7 backend's 0 is.
    #[test]
    fn a_backends_in_flight_count_is_optional_in_status_json() {
        let older = r#"{"address":"198.18.0.11","port":80,"weight":1,"healthy":true,
            "passive_down":false,"l7_requests":3,"drained":false,"ring_share":0.0,"packets":0,
            "bytes":0,"new_flows":0,"pps":0.0}"#;
        let mut b: BackendStatus = serde_json::from_str(older).unwrap();
        assert_eq!(b.l7_in_flight, None);
        assert!(!serde_json::to_string(&b).unwrap().contains("l7_in_flight"));
        b.l7_in_flight = Some(0);
        let written = serde_json::to_string(&b).unwrap();
        assert!(written.contains(r#""l7_in_flight":0"#), "{written}");
        let read: BackendStatus = serde_json::from_str(&written).unwrap();
        assert_eq!(read, b);
    }

    /// A VIP's route pools are optional in `status --json`: an older daemon's answer has none,
    /// a VIP without routes gets none written, and one with routes round-trips.
    #[test]
    fn route_pools_are_optional_in_status_json() {
        let older = r#"{"name":"app","listen":"app (198.18.1.6:80/tcp)","forwarding":"l7",
            "packets":0,"bytes":0,"new_flows":0,"pps":0.0,"fail_open":false,"backends":[]}"#;
        let mut v: VipStatus = serde_json::from_str(older).unwrap();
        assert!(v.routes.is_empty());
        assert!(!serde_json::to_string(&v).unwrap().contains("routes"));
        v.routes.push(RouteStatus { path_prefix: Some("/api/".into()), ..Default::default() });
        let written = serde_json::to_string(&v).unwrap();
        assert!(
            written.contains(r#""routes":[{"path_prefix":"/api/","backends":[]}]"#),
            "{written}"
        );
        let read: VipStatus = serde_json::from_str(&written).unwrap();
        assert_eq!(read, v);
    }
}
