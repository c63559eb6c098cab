//! The TOML configuration: what the operator writes, and the validated form the rest of edgelb
//! uses.
//!
//! Parsing happens in two layers. [`raw`] mirrors the file with serde and keeps the byte span of
//! every value the validator may complain about; [`Config::parse`] then checks meaning (valid
//! addresses, prime ring sizes, modes that fit the backends...) and reports the first problem as
//! `file:line:column: what is wrong`, so an operator can jump straight to it.
//!
//! This file holds the validated types and `validate`, which goes through the file in order;
//! the checks it calls are in files by concern: `file` reads the file, `message` is the failure
//! type and the quoting of values in messages, `limits` the ranges of integer settings and the
//! limits of the whole file, `address`, `names`, `ring` and `health` check those parts of it,
//! `l7` an L7 VIP's settings (with `routes` and `cookie`), `hint` rewords the parser's errors,
//! `prefix` reads address prefixes, and `admin_socket` finds the admin socket in a file that may
//! not validate.

mod address;
mod admin_socket;
mod cookie;
mod file;
mod health;
mod hint;
mod l7;
mod limits;
mod message;
mod names;
mod prefix;
mod raw;
mod ring;
mod routes;

pub use admin_socket::admin_socket_of;
pub use file::{MAX_CONFIG_BYTES, content_hash};
pub use health::MAX_UDP_PROBE;
pub use prefix::{Length, Prefix};

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS};
use serde::Serialize;

use address::{AddressOf, backend_address_ok, ipv6_usable, parse_ip, parse_mac};
use cookie::cookies_shared_between_vips;
use file::{first_secret, line_col, read_bytes, utf8};
use health::{health_check, probe_rate_ok};
use l7::{L7Links, l7_backend_port, l7_listens, l7_settings};
use limits::{Tally, in_range, of_form, range, setting};
use message::{Invalid, bad, parser_message, quoted};
use names::{interface_name_ok, vip_name_caution, vip_name_ok};
use ring::{is_prime, ring_shares_ok, ring_size_for};

/// The default config `cargo xtask run` brings the testbed up with, also a worked example.
pub const EXAMPLE: &str = include_str!("../../../docs/edgelb.example.toml");

/// A configuration problem, located in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    // The reason is in the message, so it is not also the error's `source()`: a caller that
    // prints the source chain would say it twice.
    #[error("{path}: cannot read config: {error}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML, does not match the schema, or fails validation.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
}

/// Validated configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// Node-wide settings.
    pub node: Node,
    /// Where `/metrics` is served; None when disabled.
    pub metrics: Option<std::net::SocketAddr>,
    /// VIPs, in file order.
    pub vips: Vec<Vip>,
    /// Things the file says that are accepted but are likely not what was meant, each as
    /// `file:line:column: what and why`: `edgelb check` prints them and `edgelb run` and a
    /// reload log them, so that the operator hears of them without a working file being
    /// refused (a refused file keeps the service down after an upgrade).
    #[serde(skip)]
    pub cautions: Vec<String>,
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

/// Node-wide settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    /// Interfaces the balancer attaches to.
    pub interfaces: Vec<String>,
    /// XDP attach mode.
    pub xdp_mode: XdpAttachMode,
    /// Outer source prefix for IPv4 encapsulation (address, prefix length).
    pub encap_source_v4: Option<(Ipv4Addr, u8)>,
    /// Outer source prefix for IPv6 encapsulation; the last 32 bits vary per flow.
    pub encap_source_v6: Option<Ipv6Addr>,
    /// Next-hop MAC for encapsulated packets to backends without a `mac`.
    pub gateway_mac: Option<[u8; 6]>,
    /// Source MAC of frames we send; None keeps the interface's (the frame's destination).
    pub src_mac: Option<[u8; 6]>,
    /// Egress MTU for the too-big check (0 disables it, but for packets over 65 535 bytes once
    /// encapsulated, which cannot be sent at all and are refused all the same).
    pub mtu: u32,
    /// bpffs directory where maps and XDP links are pinned, so restarts are hitless.
    pub pin_dir: PathBuf,
    /// Unix socket the admin commands (`edgelb status`, `drain`, `reload`, `stop`) talk to.
    pub admin_socket: PathBuf,
    /// io_uring runtimes (threads) of the L7 proxy as the file writes them; None: one per CPU
    /// this process may run on, counted when the proxy starts ([`Node::l7_thread_count`]). Kept
    /// unresolved so that a reload compares what the file says: the CPU count changes under a
    /// running edgelb (`taskset`, a cgroup CPU quota), and a file that did not change must not
    /// read as one that did.
    pub l7_threads: Option<usize>,
    /// How long a stopping or handing-over edgelb lets the L7 requests in flight (downloads,
    /// WebSockets) finish before it closes the rest.
    pub l7_drain_timeout: Duration,
    /// Flows each CPU's connection table holds, per address family; None sizes the tables
    /// automatically (131 072 IPv4 and 65 536 IPv6 flows per CPU, fewer on machines with very
    /// many CPUs). A table that fits the CPU's cache is faster, one too small evicts flows.
    pub conntrack_flows_per_cpu: Option<u32>,
}

impl Node {
    /// The L7 proxy's thread count: `l7_threads` as written, else one per CPU this process may
    /// run on now ([`default_l7_threads`]).
    pub fn l7_thread_count(&self) -> usize {
        self.l7_threads.unwrap_or_else(|| {
            default_l7_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        })
    }
}

/// The L7 proxy's thread count for `cpus` usable CPUs when `node.l7_threads` is unset: one per
/// CPU, within the range the key allows (1..=256): a thread per CPU beyond that buys nothing
/// and costs a listening socket per L7 VIP each.
pub fn default_l7_threads(cpus: usize) -> usize {
    let r = range("l7_threads");
    cpus.clamp(*r.start() as usize, *r.end() as usize)
}

/// Default [`Node::l7_drain_timeout`]: long enough for most downloads in flight, short enough
/// to stay within a service manager's stop timeout (systemd's default is 90 s).
pub const DEFAULT_L7_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Fewest flows per CPU `node.conntrack_flows_per_cpu` may ask for (1024 buckets).
pub const MIN_CONNTRACK_FLOWS: u32 = 4096;
/// Most flows per CPU `node.conntrack_flows_per_cpu` may ask for: 16 MiB (IPv4) and 32 MiB
/// (IPv6) per CPU, and few enough that `CPUs x buckets` indexes a table in 32 bits on any
/// machine.
pub const MAX_CONNTRACK_FLOWS: u32 = 1 << 20;

/// Routes one request of an L7 VIP may be matched against (those of its host and those for
/// every host) above which the file is accepted with a caution. The proxy keeps a VIP's routes
/// by host (`proxy::Routes`), so a request is matched, in file order, only against the routes
/// of its own host and the routes for every host, until one takes it: each costs a comparison
/// of its path prefix, about 10 ns, some 12 µs for a request that goes past 1024. Routes of
/// other hosts cost it nothing, so a node serving many hosts (a route each: hosts have no
/// wildcards) is fine. Not a refusal: files with more ran before the caution was added; the
/// caution says to write fewer, wider routes.
pub const ROUTES_CAUTION: usize = 1024;

/// L7 backend entries in the whole file above which it is accepted with a caution: one per
/// backend of each L7 VIP's own pool and of each of its route pools (as [`Vip::l7_backends`]
/// lists them), as many as XDP VIPs may have ([`MAX_BACKENDS`], a limit of the data plane's
/// maps, which L7 VIPs do not use). Each request's pick goes over its pool, each proxy thread
/// keeps state per backend, and each of a health-checked VIP's own backends has a thread of its
/// own ([`crate::health`]). Not a refusal: nothing bounded L7 pools before, and files with more
/// ran.
pub const L7_BACKENDS_CAUTION: usize = 4096;

/// Health probes a second, over every check, above which the file is accepted with a caution:
/// each probe is a connection from this node (a thread woken, a socket) and an event the
/// controller takes in between its other work (reloads, scrapes, admin commands).
pub const PROBE_RATE_CAUTION: f64 = 10_000.0;

/// Health probes a second, over every check, above which the file is refused: as many
/// connections a second from this node, and as many threads woken, leave the controller, which
/// takes every probe's event in, no time for its other work (it fell behind and stopped
/// answering `stop` at 100 000 a second), and flood the backends. No pool needs it, and a file
/// with that many never ran well, so refusing it keeps no working service down (unlike the
/// other limits of this kind, which are cautions).
pub const PROBE_RATE_MAX: f64 = 50_000.0;

/// Default `[metrics] listen`: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9110";

/// Default [`Node::pin_dir`].
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/edgelb";
/// Default [`Node::admin_socket`].
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/edgelb/admin.sock";

/// An active health check, run from the balancer node against each backend's real address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct HealthCheck {
    /// What to probe.
    pub kind: CheckKind,
    /// Backend port to probe; 0: each backend's own (an L7 VIP's default).
    pub port: u16,
    /// Time between probes of one backend.
    pub interval: Duration,
    /// Probe timeout (at most the interval).
    pub timeout: Duration,
    /// Consecutive successes that bring a dead backend back.
    pub rise: u32,
    /// Consecutive failures that declare a backend dead.
    pub fall: u32,
    /// PROXY protocol version a TCP or HTTP probe opens with: an L7 VIP's `proxy_protocol`, sent
    /// when a backend is probed on its own port (`port` unset, or written out the same), which
    /// then expects the header first and would refuse a probe without it (every backend down,
    /// the VIP failing open for good); never to another port.
    pub proxy_protocol: Option<u8>,
}

/// The probe a health check sends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// The TCP handshake completes.
    Tcp,
    /// `GET path` answers `expect_status`, with `expect_body` in the body if set.
    Http {
        /// Request path.
        path: String,
        /// Host header (default: the backend address).
        host: Option<String>,
        /// Expected status code.
        expect_status: u16,
        /// Substring the body must contain.
        expect_body: Option<String>,
    },
    /// A datagram `send` is answered (containing `expect`, if set) within the timeout. Bytes,
    /// not text: binary protocols (DNS) need values a string cannot hold (`send_hex`).
    Udp {
        /// Payload sent.
        send: Vec<u8>,
        /// Bytes the answer must contain.
        expect: Option<Vec<u8>>,
    },
}

/// Transport protocol of a VIP (deserialised in admin requests and `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
        }
    }

    /// Its name as the config and the CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What a VIP's ring hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    /// The client address only: one client sticks to one backend (default).
    Client,
    /// The 5-tuple: one client's flows spread over backends.
    FiveTuple,
}

/// How a VIP's packets reach the backend (deserialised in a handover's VIPs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// IPIP / IP6IP6 / 4in6 encapsulation, direct server return (default).
    Ipip,
    /// Rewrite the destination MAC; backends on the same segment hold the VIP.
    L2,
    /// Not balanced in XDP: passed to the kernel stack for the L7 proxy.
    L7,
}

/// One VIP.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Vip {
    /// Operator's name for it, unique.
    pub name: String,
    /// VIP address.
    pub address: IpAddr,
    /// Port, 0 for any port.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Hash input.
    pub hash: HashMode,
    /// Forwarding mode.
    pub forwarding: Forwarding,
    /// Maglev ring size (prime).
    pub ring_size: u32,
    /// Whether flows are kept on their backend by the connection table. Without it every packet
    /// is placed by the ring alone (Katran's LRU bypass): for stateless services such as DNS,
    /// whose packets need no pinning, it saves the table's memory traffic and leaves the table
    /// to the flows that need it; a pool change then moves the flows its ring change remaps.
    pub conntrack: bool,
    /// Backends.
    pub backends: Vec<Backend>,
    /// Active health check of this VIP's backends; none means always healthy.
    pub health: Option<HealthCheck>,
    /// Proxy settings, for `forwarding = "l7"`.
    pub l7: Option<L7>,
}

/// How the L7 proxy handles a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L7Mode {
    /// HTTP/1.1 reverse proxy.
    Http,
    /// Plain TCP relay.
    Tcp,
}

/// How the L7 proxy picks a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each backend in turn.
    RoundRobin,
    /// Smooth weighted round-robin (nginx).
    Weighted,
    /// Uniformly at random.
    Random,
    /// Power of two choices: the less loaded (in-flight / weight) of two random backends.
    P2c,
    /// Fewest in-flight requests per unit of weight.
    LeastConn,
    /// Consistent hash of the client address (the Maglev ring the XDP path uses).
    Hash,
    /// Sticky by a signed cookie naming the backend; new clients by weighted round-robin.
    Cookie,
}

impl Algorithm {
    fn parse(s: &str) -> Option<Algorithm> {
        Some(match s {
            "round_robin" => Algorithm::RoundRobin,
            "weighted" => Algorithm::Weighted,
            "random" => Algorithm::Random,
            "p2c" => Algorithm::P2c,
            "least_conn" => Algorithm::LeastConn,
            "hash" => Algorithm::Hash,
            "cookie" => Algorithm::Cookie,
            _ => return None,
        })
    }
}

/// A routing rule: requests whose Host and path match go to its own pool.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    /// Host header to match (case-insensitive, port ignored); none matches any.
    pub host: Option<String>,
    /// Path prefix to match; none matches any.
    pub path_prefix: Option<String>,
    /// Algorithm for this pool (default: the VIP's).
    pub algorithm: Algorithm,
    /// The pool.
    pub backends: Vec<Backend>,
}

/// L7 proxy settings of one VIP.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct L7 {
    /// HTTP or TCP.
    pub mode: L7Mode,
    /// Default algorithm.
    pub algorithm: Algorithm,
    /// Routes, tried in order before the VIP's own backends (HTTP only).
    pub routes: Vec<Route>,
    /// Further backends to try after a failure, for idempotent requests.
    pub retries: u32,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Time a client has to send a complete request head.
    pub header_timeout: Duration,
    /// Time a backend has to send its response head.
    pub response_timeout: Duration,
    /// Idle keep-alive time, both sides, the longest pause inside an HTTP exchange, and the
    /// longest a send on an HTTP connection waits for a peer that takes nothing.
    pub idle_timeout: Duration,
    /// The longest silence both ways of a TCP-mode connection or an upgraded one (WebSocket),
    /// and the longest their sends wait for a peer that takes nothing: such connections sit
    /// silent far longer than HTTP keep-alive ones should (default: ten minutes, or
    /// `idle_timeout` if longer; in TCP mode a written `idle_timeout`). A relay keeps the value
    /// it started with.
    pub tunnel_timeout: Duration,
    /// Whole-request deadline (client and backend together).
    pub request_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Most concurrent client connections (per VIP).
    pub max_connections: usize,
    /// Most idle keep-alive connections kept per backend and proxy thread; at least the
    /// concurrency a backend sees, or busy moments end with connections closed and reopened.
    pub upstream_keepalive: usize,
    /// Add X-Forwarded-For / X-Forwarded-Proto and Forwarded.
    pub forwarded_for: bool,
    /// Route and forward requests by their path in normal form (`proxy::path::normalize`), so
    /// that a path route cannot be walked around with `..`, escapes or doubled slashes; off
    /// only for backends that give those a meaning of their own.
    pub normalize_path: bool,
    /// Log every answered request (log target `edgelb::access`, at info): the proxy's
    /// counterpart of HAProxy's and nginx's access logs, off by default (a line per request).
    pub access_log: bool,
    /// Send a PROXY protocol header (1 or 2) to backends.
    pub proxy_protocol: Option<u8>,
    /// Sticky cookie name.
    pub cookie_name: String,
    /// Key that signs sticky cookies (the same on every node).
    pub cookie_secret: String,
    /// A second key whose cookies count, during a rotation: cookies it signed still name their
    /// backends, and are issued anew under `cookie_secret`. A node takes only its own two keys'
    /// cookies, so a rotation goes over the nodes in three rounds (docs/CONFIG.md): the new key
    /// here while `cookie_secret` is still the old one, then the two swapped, then this removed;
    /// within each round every node takes the cookies any node sets, and no client moves.
    pub cookie_secret_previous: Option<String>,
    /// Attributes sticky cookies carry after `Path` and `HttpOnly`, each as `; Name` or
    /// `; Name=value` (empty for none): `SameSite=None; Secure` for cross-site clients, which
    /// browsers otherwise do not send the cookie from, `Max-Age` for one that outlives the
    /// browser session, `Domain`, `Partitioned`.
    pub cookie_attributes: String,
    /// The `Domain` among [`cookie_attributes`](Self::cookie_attributes), lowercase (as
    /// browsers compare it), if there is one: such a cookie is one for every host under that
    /// domain, so host routes name theirs after their host (`proxy::balance::Pool::scope_cookie`),
    /// and VIPs with one `Domain` share their cookies whatever their addresses.
    pub cookie_domain: Option<String>,
    /// The `Max-Age` among [`cookie_attributes`](Self::cookie_attributes), in seconds, if there
    /// is one: browsers count it from when the cookie was last set, so the proxy sets such a
    /// cookie again with answers (`proxy::balance::Pool::cookie_refresh`).
    pub cookie_max_age: Option<u64>,
    /// Consecutive failures that take a backend out (passive health).
    pub max_fails: u32,
    /// How long a passively failed backend stays out.
    pub fail_timeout: Duration,
}

/// One backend of a VIP.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Backend {
    /// Real address (encapsulation target, health checks).
    pub address: IpAddr,
    /// Relative weight; 0 drains (no new flows, established ones stay).
    pub weight: u32,
    /// Next-hop MAC: the backend's own on this segment (required for L2 forwarding), otherwise
    /// the node's `gateway_mac` is used.
    pub mac: Option<[u8; 6]>,
    /// Port (L7 only; L4 keeps the client's destination port). Default: the VIP's port.
    pub port: u16,
}

impl Config {
    /// Reads and validates a config file. A file holding a `cookie_secret` that others than its
    /// owner may read gets a caution: whoever reads the secret can make cookies that send
    /// clients to the backend of their choice.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_hashed(path).map(|(cfg, _)| cfg)
    }

    /// [`Config::load`], with the [`content_hash`] of the bytes it read: what the controller
    /// runs is told by it, as a takeover compares the file it loaded with the one the running
    /// edgelb last applied (a reload may have come in between). Read once, so that the hash is
    /// that of the very bytes parsed.
    pub fn load_hashed(path: &Path) -> Result<(Config, String), ConfigError> {
        let (bytes, mode) =
            read_bytes(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        let hash = content_hash(&bytes);
        let text = utf8(bytes).map_err(|(line, column, message)| ConfigError::Invalid {
            path: path.to_owned(),
            line,
            column,
            message,
        })?;
        let mut cfg = Config::parse(&text, path)?;
        if mode & 0o077 != 0
            && let Some((at, vip)) = first_secret(&text)
        {
            let (line, column) = line_col(&text, at);
            cfg.cautions.push(format!(
                "{}:{line}:{column}: VIP `{vip}`: cookie_secret is in a file others may read (mode {:04o}): whoever reads it can make cookies that send clients to the backend of their choice; chmod 600 {0}",
                path.display(),
                mode & 0o7777,
            ));
        }
        Ok((cfg, hash))
    }

    /// Validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let fail = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid { path: path.to_owned(), line, column, message }
        };
        let raw: raw::File = toml::from_str(text).map_err(|e| {
            // A common mistake gets a message that says what to write. Others say the parser's
            // message again with the key, the value and the form to write, if it is a form the
            // hints know, or keep it as it is.
            match hint::for_mistake(text, e.span().map(|s| s.start)) {
                Some((span, message)) => fail(Some(span), message),
                None => {
                    let message = e.message().trim();
                    let reworded = e.span().and_then(|s| hint::reworded(text, s, message));
                    fail(e.span(), reworded.unwrap_or_else(|| parser_message(message)))
                }
            }
        })?;
        let mut cautions = Vec::new();
        let mut cfg = validate(raw, &mut cautions)
            .map_err(|Invalid(span, message)| fail(Some(span), message))?;
        cfg.cautions = cautions
            .into_iter()
            .map(|Invalid(span, message)| fail(Some(span), message).to_string())
            .collect();
        Ok(cfg)
    }

    /// Finds a VIP by name, by address (an IPv6 one bare or in brackets, as `drain` takes it),
    /// or by `address:port` / `[v6]:port`, of protocol `proto` if given, as the XDP program
    /// does: a VIP of that exact port first, then one of any port. An address (and port) more than one VIP answers to is an error naming them,
    /// not the first in file order; so is one no VIP answers to.
    pub fn find_vip(&self, spec: &str, proto: Option<Protocol>) -> Result<&Vip, String> {
        if let Some(v) = self.vips.iter().find(|v| v.name == spec) {
            // A name is one VIP, but not of another protocol: its answer would be for flows
            // that never reach it.
            return match proto {
                Some(p) if p != v.protocol => Err(format!(
                    "VIP `{}` is {}, not {}",
                    quoted(spec),
                    v.protocol.as_str(),
                    p.as_str()
                )),
                _ => Ok(v),
            };
        }
        // `[v6]` without a port is the address alone, as `[v6]:port` is written and as `drain`
        // takes it.
        let bracketed = spec
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.parse::<Ipv6Addr>().ok());
        let (addr, port) = match (spec.parse::<IpAddr>(), spec.parse::<std::net::SocketAddr>()) {
            (Ok(a), _) => (a, None),
            (_, Ok(sa)) => (sa.ip(), Some(sa.port())),
            _ => match bracketed {
                Some(a) => (IpAddr::V6(a), None),
                None => return Err(format!("no VIP named `{}`", quoted(spec))),
            },
        };
        let of = |p: Option<u16>| -> Vec<&Vip> {
            self.vips
                .iter()
                .filter(|v| v.address == addr && proto.is_none_or(|pr| v.protocol == pr))
                .filter(|v| p.is_none_or(|p| v.port == p))
                .collect()
        };
        let found = match port {
            None => of(None),
            Some(p) => Some(of(Some(p))).filter(|e| !e.is_empty()).unwrap_or_else(|| of(Some(0))),
        };
        match found.as_slice() {
            [v] => Ok(v),
            [] => Err(format!("no VIP answers to {spec}")),
            many => Err(format!(
                "{spec} is more than one VIP: {} (give its name{})",
                many.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "),
                if port.is_none() { ", or address:port" } else { ", or --proto" }
            )),
        }
    }
}

impl Vip {
    /// An L7 VIP's backends, its own and its route pools' (a backend listed in several comes
    /// as often as it is listed); none for a VIP XDP forwards: every backend the proxy may send
    /// this VIP's requests to, which its live state and per-backend series follow.
    pub fn l7_backends(&self) -> impl Iterator<Item = &Backend> {
        self.l7.iter().flat_map(move |l7| {
            self.backends.iter().chain(l7.routes.iter().flat_map(|r| &r.backends))
        })
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol.as_str();
        match (self.address, self.port) {
            (IpAddr::V6(a), 0) => write!(f, "{} ([{a}]:*/{proto})", self.name),
            (IpAddr::V6(a), p) => write!(f, "{} ([{a}]:{p}/{proto})", self.name),
            (a, 0) => write!(f, "{} ({a}:*/{proto})", self.name),
            (a, p) => write!(f, "{} ({a}:{p}/{proto})", self.name),
        }
    }
}

/// Checks the file read into `raw`; what it accepts but that is likely not what was meant goes
/// to `cautions` (where, and what), which become [`Config::cautions`].
fn validate(raw: raw::File, cautions: &mut Vec<Invalid>) -> Result<Config, Invalid> {
    let n = raw.node;
    if n.interfaces.get_ref().is_empty() {
        return bad(n.interfaces.span(), "node.interfaces must name at least one interface");
    }
    let mut seen_interfaces = HashSet::new();
    for i in n.interfaces.get_ref() {
        if let Err(why) = interface_name_ok(i) {
            return bad(n.interfaces.span(), format!("node.interfaces: {why}"));
        }
        if !seen_interfaces.insert(i.as_str()) {
            return bad(
                n.interfaces.span(),
                format!(
                    "node.interfaces names `{}` twice: XDP goes on an interface once",
                    quoted(i)
                ),
            );
        }
    }
    let xdp_mode = match n.xdp_mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("auto", _)) => XdpAttachMode::Auto,
        Some(("native", _)) => XdpAttachMode::Native,
        Some(("generic", _)) => XdpAttachMode::Generic,
        Some((other, span)) => {
            return bad(
                span,
                format!("xdp_mode `{}`: expected auto, native or generic", quoted(other)),
            );
        }
    };
    let encap_source_v4 = match &n.encap_source_v4 {
        None => None,
        Some(s) => {
            let Some(prefix @ Prefix { addr: IpAddr::V4(addr), .. }) = Prefix::parse(s.get_ref())
            else {
                return bad(
                    s.span(),
                    format!("encap_source_v4 `{}` is not an IPv4 prefix", quoted(s.get_ref())),
                );
            };
            // A bare address is a /32.
            let len = match prefix.bits() {
                Some(l @ 16..=32) => l,
                _ => return bad(s.span(), "encap_source_v4 prefix length must be 16..=32"),
            };
            // Every address of the prefix shares its first 16 bits, which decide all of these.
            // Backends drop packets from such sources as martians (ip_route_input), and
            // routers do not forward link-local ones.
            let [a, b, ..] = addr.octets();
            let unusable = match (a, b) {
                (0, _) => Some("in 0.0.0.0/8 (this network)"),
                (127, _) => Some("a loopback prefix"),
                (169, 254) => Some("a link-local prefix"),
                (224..=239, _) => Some("a multicast prefix"),
                (240..=255, _) => Some("reserved (240.0.0.0/4, the broadcast address)"),
                _ => None,
            };
            if let Some(what) = unusable {
                return bad(
                    s.span(),
                    format!(
                        "encap_source_v4 {} is {what}: backends drop packets from such sources; write a prefix routed to this node (e.g. \"198.19.0.0/16\")",
                        s.get_ref()
                    ),
                );
            }
            if let Some(why) = prefix.caution() {
                cautions
                    .push(Invalid(s.span(), format!("encap_source_v4 `{}`: {why}", s.get_ref())));
            }
            Some((addr, len))
        }
    };
    let encap_source_v6 = match &n.encap_source_v6 {
        None => None,
        Some(s) => {
            let Some(Prefix { addr: IpAddr::V6(addr), len }) = Prefix::parse(s.get_ref()) else {
                return bad(
                    s.span(),
                    format!("encap_source_v6 `{}` is not an IPv6 prefix", quoted(s.get_ref())),
                );
            };
            // A bare address is the /96; the length is written `96` and nothing else.
            if !matches!(len, Length::Omitted | Length::Plain(96)) {
                return bad(
                    s.span(),
                    "encap_source_v6 must be a /96: the last 32 bits vary per flow",
                );
            }
            // Backends drop packets from such sources (ip6_rcv: multicast, loopback, mapped),
            // and routers do not forward link-local ones.
            if ipv6_usable(addr).is_err()
                || addr.is_unspecified()
                || addr.is_loopback()
                || addr.is_multicast()
            {
                return bad(
                    s.span(),
                    format!(
                        "encap_source_v6 {addr} is not a source backends take packets from (an IPv4-mapped, IPv4-compatible, link-local, loopback, multicast or unspecified prefix): write a /96 routed to this node (e.g. \"2001:db8:100::/96\")"
                    ),
                );
            }
            Some(addr)
        }
    };
    let mtu_span = n.mtu.as_ref().map_or(0..0, |m| m.span());
    let node = Node {
        interfaces: n.interfaces.into_inner(),
        xdp_mode,
        encap_source_v4,
        encap_source_v6,
        gateway_mac: n.gateway_mac.as_ref().map(parse_mac).transpose()?,
        src_mac: n.src_mac.as_ref().map(parse_mac).transpose()?,
        mtu: n.mtu.as_ref().map_or(Ok(1500), |m| of_form(m, "mtu"))?,
        pin_dir: match &n.pin_dir {
            None => PathBuf::from(DEFAULT_PIN_DIR),
            Some(p) if below_bpffs(p.get_ref()) => PathBuf::from(p.get_ref()),
            Some(p) => {
                return bad(
                    p.span(),
                    "pin_dir must be a directory under /sys/fs/bpf/, named without `.` or `..` (e.g. /sys/fs/bpf/edgelb)",
                );
            }
        },
        admin_socket: match &n.admin_socket {
            None => PathBuf::from(DEFAULT_ADMIN_SOCKET),
            Some(p) if p.get_ref().starts_with('/') => PathBuf::from(p.get_ref()),
            Some(p) => return bad(p.span(), "admin_socket must be an absolute path"),
        },
        l7_threads: n
            .l7_threads
            .as_ref()
            .map(|t| in_range(t, "l7_threads").map(|t| t as usize))
            .transpose()?,
        l7_drain_timeout: match &n.l7_drain_timeout_ms {
            None => DEFAULT_L7_DRAIN_TIMEOUT,
            Some(t) if range("l7_drain_timeout_ms").contains(t.get_ref()) => {
                Duration::from_millis(*t.get_ref())
            }
            Some(t) => {
                let r = range("l7_drain_timeout_ms");
                return bad(
                    t.span(),
                    format!(
                        "l7_drain_timeout_ms must be {}..={} (ms; 0 closes at once)",
                        r.start(),
                        r.end()
                    ),
                );
            }
        },
        conntrack_flows_per_cpu: n
            .conntrack_flows_per_cpu
            .as_ref()
            .map(|f| of_form(f, "conntrack_flows_per_cpu"))
            .transpose()?,
    };
    if let (Some(at), Some(flows)) = (&n.conntrack_flows_per_cpu, node.conntrack_flows_per_cpu)
        && let Some(said) = conntrack_memory_caution(flows, crate::dataplane::possible_cpus())
    {
        cautions.push(Invalid(at.span(), said));
    }

    if raw.vip.len() > MAX_VIPS as usize {
        return bad(
            raw.vip[MAX_VIPS as usize].span(),
            format!("at most {MAX_VIPS} VIPs are supported"),
        );
    }
    let mut links = L7Links { listens: l7_listens(&raw.vip), edges: Vec::new() };
    let mut names = HashSet::new();
    // The VIP of each (address, port, protocol), by name.
    let mut keys = std::collections::HashMap::new();
    let mut vips = Vec::new();
    // Where each VIP's address is written, in the order of `vips`.
    let mut addresses_at = Vec::new();
    // The data plane keeps one entry per (VIP, backend address) of the VIPs XDP forwards: their
    // count, and the first backend past the limit; and the L7 VIPs' backends, their own pools'
    // and their routes', which a caution counts alike.
    let mut xdp_entries = Tally::new(MAX_BACKENDS as usize);
    let mut l7_entries = Tally::new(L7_BACKENDS_CAUTION);
    // The probes a second of each health-checked VIP, with where its check's interval is
    // written (or the check, for the default) and its name.
    let mut probe_rates: Vec<(f64, Range<usize>, String)> = Vec::new();
    for v in raw.vip {
        let vspan = v.span();
        let v = v.into_inner();
        vip_name_ok(&v.name)?;
        if let Some(why) = vip_name_caution(v.name.get_ref()) {
            cautions.push(Invalid(v.name.span(), why));
        }
        if !names.insert(v.name.get_ref().clone()) {
            return bad(
                v.name.span(),
                format!("duplicate VIP name `{}`", quoted(v.name.get_ref())),
            );
        }
        let forwarding = match v.forwarding.as_ref().map(|h| (h.get_ref().as_str(), h.span())) {
            None | Some(("ipip", _)) => Forwarding::Ipip,
            Some(("l2", _)) => Forwarding::L2,
            Some(("l7", _)) => Forwarding::L7,
            Some((other, span)) => {
                return bad(
                    span,
                    format!("forwarding `{}`: expected ipip, l2 or l7", quoted(other)),
                );
            }
        };
        // The forwarding is read before the address: a VIP XDP forwards cannot be on loopback,
        // and the advice for a misspelt address must not lead there.
        let vip_addr = parse_ip(&v.address, AddressOf::Vip(forwarding))?;
        addresses_at.push(v.address.span());
        if let Some(why) = AddressOf::Vip(forwarding).refusal(vip_addr) {
            return bad(v.address.span(), format!("VIP address {why}"));
        }
        let port = v.port.as_ref().map_or(0, |p| *p.get_ref());
        let protocol = match v.protocol.as_ref().map(|p| (p.get_ref().as_str(), p.span())) {
            None | Some(("tcp", _)) => Protocol::Tcp,
            Some(("udp", _)) => Protocol::Udp,
            Some((other, span)) => {
                return bad(span, format!("protocol `{}`: expected tcp or udp", quoted(other)));
            }
        };
        if let Some(first) = keys.insert((vip_addr, port, protocol), v.name.get_ref().clone()) {
            let port = if port == 0 { "any port".to_owned() } else { format!("port {port}") };
            let proto = if protocol == Protocol::Tcp { "tcp" } else { "udp" };
            return bad(
                v.address.span(),
                format!(
                    "VIP `{}` has the address, port and protocol of VIP `{}` ({vip_addr} {port} {proto}): a packet can go to only one; change its port or protocol, or merge their backends",
                    quoted(v.name.get_ref()),
                    quoted(&first)
                ),
            );
        }
        let hash = match v.hash.as_ref().map(|h| (h.get_ref().as_str(), h.span())) {
            None | Some(("client", _)) => HashMode::Client,
            Some(("5tuple", _)) => HashMode::FiveTuple,
            Some((other, span)) => {
                return bad(span, format!("hash `{}`: expected client or 5tuple", quoted(other)));
            }
        };
        // The L7 proxy places requests by its own algorithm; its `hash` pools have a ring of
        // their own (proxy::balance), so these would be silently ignored.
        if forwarding == Forwarding::L7 {
            if let Some(h) = &v.hash {
                return bad(
                    h.span(),
                    "`hash` applies only to VIPs XDP forwards: remove it; an l7 VIP balances by its [vip.l7] algorithm (algorithm = \"hash\" places clients by their address)",
                );
            }
            if let Some(m) = &v.ring_size {
                return bad(
                    m.span(),
                    "`ring_size` applies only to VIPs XDP forwards: an l7 VIP's algorithm = \"hash\" uses a ring of its own; remove it",
                );
            }
        }
        let ring_size = match &v.ring_size {
            None => DEFAULT_RING_SIZE,
            Some(m)
                if is_prime(*m.get_ref())
                    && range("ring_size").contains(&(*m.get_ref()).into()) =>
            {
                *m.get_ref()
            }
            Some(m) => {
                return bad(
                    m.span(),
                    format!("ring_size must be a prime between 3 and {MAX_RING_SIZE}"),
                );
            }
        };
        let mut seen = HashSet::new();
        let mut backends = Vec::new();
        for b in &v.backends {
            let address = parse_ip(&b.address, AddressOf::backend(forwarding))?;
            if forwarding == Forwarding::L7 {
                l7_entries.add(b.address.span(), v.name.get_ref());
            } else {
                xdp_entries.add(b.address.span(), v.name.get_ref());
            }
            // L4 backends are addresses (the client's port is kept); L7 ones are address:port.
            let port_key = if forwarding == Forwarding::L7 {
                b.port.as_ref().map_or(port, |p| *p.get_ref())
            } else {
                0
            };
            if !seen.insert((address, port_key)) {
                return bad(
                    b.address.span(),
                    format!("backend {address} is listed twice in this VIP"),
                );
            }
            let weight = setting(&b.weight, 1, "weight")?;
            let mac = b.mac.as_ref().map(parse_mac).transpose()?;
            if forwarding == Forwarding::L7 {
                if let Some(m) = &b.mac {
                    return bad(
                        m.span(),
                        "`mac` applies to backends XDP forwards to, not to l7 ones",
                    );
                }
                l7_backend_port(b, port)?;
            } else if let Some(p) = &b.port {
                return bad(
                    p.span(),
                    "a backend `port` applies to l7 VIPs: XDP forwarding keeps the client's destination port",
                );
            }
            match forwarding {
                Forwarding::L2 if mac.is_none() => {
                    return bad(b.address.span(), "l2 forwarding needs a `mac` for every backend");
                }
                Forwarding::Ipip => {
                    if address.is_ipv4() && vip_addr.is_ipv6() {
                        return bad(
                            b.address.span(),
                            "an IPv6 VIP needs IPv6 backends (6in4 is not supported)",
                        );
                    }
                    if mac.is_none() && node.gateway_mac.is_none() {
                        return bad(
                            b.address.span(),
                            "backend has no `mac` and node.gateway_mac is not set: no next hop",
                        );
                    }
                    if address.is_ipv4() && node.encap_source_v4.is_none() {
                        return bad(
                            b.address.span(),
                            "IPv4 backends need node.encap_source_v4 for the outer source",
                        );
                    }
                    if address.is_ipv6() && node.encap_source_v6.is_none() {
                        return bad(
                            b.address.span(),
                            "IPv6 backends need node.encap_source_v6 for the outer source",
                        );
                    }
                }
                _ => {}
            }
            let bport = b.port.as_ref().map_or(port, |p| *p.get_ref());
            backend_address_ok(b.address.span(), address, bport, (vip_addr, port), forwarding)?;
            if forwarding == Forwarding::L7 {
                links.note(v.name.get_ref(), address, bport, b.address.span());
            }
            backends.push(Backend { address, weight, mac, port: bport });
        }
        // Maglev gives each backend a share of the ring's slots: with fewer slots than backends
        // some get none, and never any traffic.
        if let Some(m) = &v.ring_size
            && (*m.get_ref() as usize) < backends.len()
        {
            return bad(
                m.span(),
                format!(
                    "ring_size {} is smaller than this VIP's {} backends, so some would never get traffic: write a prime of at least 100 × backends, e.g. ring_size = {} (or leave ring_size out: {DEFAULT_RING_SIZE})",
                    m.get_ref(),
                    backends.len(),
                    ring_size_for(backends.len())
                ),
            );
        }
        if forwarding != Forwarding::L7 {
            ring_shares_ok(&v.backends, ring_size, "ring_size")?;
        }
        // An L7 VIP's backends are probed on their own ports unless health.port says otherwise
        // (0 below); an XDP VIP's on the VIP's port, the one its traffic keeps.
        let default_port = if forwarding == Forwarding::L7 { None } else { Some(port) };
        let health = v
            .health
            .as_ref()
            .map(|h| health_check(h, v.name.get_ref(), default_port, protocol, cautions))
            .transpose()?;
        let conntrack = match &v.conntrack {
            Some(c) if forwarding == Forwarding::L7 => {
                return bad(c.span(), "conntrack applies to VIPs XDP forwards, not to l7 ones");
            }
            Some(c) => *c.get_ref(),
            None => true,
        };
        let l7 = match (forwarding, &v.l7) {
            (Forwarding::L7, l7) => {
                if port == 0 {
                    return bad(vspan, "an l7 VIP needs a port (the proxy listens on it)");
                }
                if protocol != Protocol::Tcp {
                    return bad(vspan, "an l7 VIP must be tcp");
                }
                let vip = (v.name.get_ref().as_str(), vip_addr, port);
                let l7 =
                    l7_settings(l7.as_ref(), &v.route, vip, &mut links, &mut l7_entries, cautions)?;
                if l7.algorithm == Algorithm::Hash {
                    ring_shares_ok(&v.backends, crate::proxy::balance::L7_RING, "")?;
                }
                Some(l7)
            }
            (_, Some(l7)) => return bad(l7.span(), "[vip.l7] needs forwarding = \"l7\""),
            (_, None) => {
                if let Some(r) = v.route.first() {
                    return bad(r.span(), "routes need forwarding = \"l7\"");
                }
                None
            }
        };
        // Probes of an L7 VIP's backends on their own ports speak the PROXY protocol the
        // proxy speaks to them (the checker leaves it out for a backend probed on another port).
        let mut health = health;
        if let (Some(h), Some(l7)) = (health.as_mut(), l7.as_ref()) {
            h.proxy_protocol = l7.proxy_protocol;
        }
        // A check probes each of the VIP's own backends once an interval (`health::targets`).
        if let (Some(h), Some(raw)) = (&health, &v.health) {
            let at = raw.get_ref().interval_ms.as_ref().map_or(raw.span(), |i| i.span());
            let rate = backends.len() as f64 / h.interval.as_secs_f64();
            probe_rates.push((rate, at, v.name.get_ref().clone()));
        }
        vips.push(Vip {
            name: v.name.into_inner(),
            address: vip_addr,
            port,
            protocol,
            hash,
            forwarding,
            ring_size,
            conntrack,
            backends,
            health,
            l7,
        });
    }
    links.no_loop()?;
    cookies_shared_between_vips(&vips, &addresses_at, cautions);
    xdp_entries.check("backend entries", "one per backend of each VIP that XDP forwards")?;
    // Not refused: nothing bounded L7 pools before, and files with more ran.
    l7_entries.caution(
        "L7 backend entries",
        "one per backend of each l7 VIP's own pool and of each of its route pools",
        "each request's pick goes over its pool, each proxy thread keeps state per backend, and each backend of a VIP's own pool with a [vip.health] check has a probing thread; edgelb is sized for at most as many as XDP VIPs may have, so spread the pools over more nodes, or list fewer backends",
        cautions,
    );
    probe_rate_ok(&probe_rates, cautions)?;
    mtu_fits_ipv6(node.mtu, mtu_span, &vips)?;
    let metrics = match raw.metrics {
        None => Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        Some(m) => {
            let m = m.into_inner();
            if m.enabled.as_ref().is_some_and(|e| !*e.get_ref()) {
                None
            } else {
                let addr: std::net::SocketAddr = match &m.listen {
                    None => DEFAULT_METRICS_LISTEN.parse().expect("valid default"),
                    Some(l) => l.get_ref().parse().or_else(|_| {
                        bad(
                            l.span(),
                            format!(
                                "metrics.listen `{}` is not an address:port",
                                quoted(l.get_ref())
                            ),
                        )
                    })?,
                };
                // Port 0 has the kernel pick one at random, which no scraper would know.
                if addr.port() == 0 {
                    return bad(
                        m.listen.as_ref().map_or(0..0, |l| l.span()),
                        format!(
                            "metrics.listen {addr} has port 0, which has the kernel pick a random port no scraper knows: write the port to serve /metrics on (e.g. {DEFAULT_METRICS_LISTEN})"
                        ),
                    );
                }
                let remote_ok = m.allow_remote.as_ref().is_some_and(|a| *a.get_ref());
                if !addr.ip().is_loopback() && !remote_ok {
                    let span = m.listen.as_ref().map_or(0..0, |l| l.span());
                    return bad(
                        span,
                        format!(
                            "metrics.listen {addr} is reachable from other hosts: set metrics.allow_remote = true to allow it"
                        ),
                    );
                }
                Some(addr)
            }
        }
    };
    Ok(Config { node, metrics, vips, cautions: Vec::new() })
}

/// IPv6 needs a larger `mtu` than IPv4's 576. A packet of an IPv6 VIP that does not fit once
/// encapsulated is answered with packet-too-big advertising `mtu - 40`, and IPv6 hosts never
/// take a path MTU below 1280 (RFC 8201): below 1320 they would send the same packet, too big,
/// again and again, and the VIP's large packets would be black-holed. Any other IPv6 the link
/// carries (an IPv6 VIP XDP does not encapsulate, IPv6 backends an IPv4 VIP is encapsulated to)
/// needs the 1280 every IPv6 link carries (RFC 8200). `mtu = 0` (no check) is not refused.
fn mtu_fits_ipv6(mtu: u32, span: Range<usize>, vips: &[Vip]) -> Result<(), Invalid> {
    const IPV6_MIN_MTU: u32 = 1280;
    const IPV6_ENCAP: u32 = 40;
    if mtu == 0 || mtu >= IPV6_MIN_MTU + IPV6_ENCAP {
        return Ok(());
    }
    if let Some(v) = vips.iter().find(|v| v.address.is_ipv6() && v.forwarding == Forwarding::Ipip) {
        return bad(
            span,
            format!(
                "mtu {mtu} is too small for IPv6 VIP `{}`: a packet of it that does not fit once encapsulated is answered with packet-too-big advertising mtu - 40 = {}, below the 1280 IPv6 hosts never go under (RFC 8201), so they would send it too big again and its large packets would be lost; write the egress link's MTU, at least {} (1280 + 40 for the encapsulation)",
                quoted(&v.name),
                mtu - IPV6_ENCAP,
                IPV6_MIN_MTU + IPV6_ENCAP
            ),
        );
    }
    if mtu >= IPV6_MIN_MTU {
        return Ok(());
    }
    for v in vips {
        let v6_backend = match v.forwarding {
            Forwarding::Ipip => v.backends.iter().find(|b| b.address.is_ipv6()),
            _ => None,
        };
        let what = match (v.address.is_ipv6(), v6_backend) {
            (true, _) => "is IPv6".to_owned(),
            (false, Some(b)) => format!("is encapsulated to IPv6 backend {}", b.address),
            (false, None) => continue,
        };
        return bad(
            span,
            format!(
                "mtu {mtu} is below 1280, the least every IPv6 link carries (RFC 8200), and VIP `{}` {what}: write the egress link's MTU, at least 1280",
                quoted(&v.name)
            ),
        );
    }
    Ok(())
}

/// The caution for `node.conntrack_flows_per_cpu = flows` on a machine of `cpus` possible CPUs
/// when either connection table passes [`lb_common::CONNTRACK_BUDGET`], which bounds the default
/// shape (`dataplane::buckets_for`): a count written out is taken as written, for every possible
/// CPU, and 1048576 on a VM with 64 possible CPUs asks the kernel for 3 GiB. Not a refusal: the
/// machine may have the memory, and files with such counts ran before the caution was added.
fn conntrack_memory_caution(flows: u32, cpus: u32) -> Option<String> {
    let shape = crate::dataplane::TableShape::of_flows(flows, cpus);
    let (v4, v6) = (shape.v4_bytes(), shape.v6_bytes());
    let budget = lb_common::CONNTRACK_BUDGET;
    (v4 > budget || v6 > budget).then(|| {
        let mib = |b: u64| b >> 20;
        format!(
            "conntrack_flows_per_cpu = {flows} makes connection tables of {} MiB of kernel memory ({} MiB IPv4, {} MiB IPv6): each table holds that many flows per possible CPU, and this machine has {cpus} possible CPUs (/sys/devices/system/cpu/possible, CPUs that may be brought online included, not only those online); the default keeps each table within {} MiB: write fewer flows per CPU, or leave it unset",
            mib(v4 + v6),
            mib(v4),
            mib(v6),
            mib(budget)
        )
    })
}

/// Is `path` a directory strictly below the bpffs mount, by plain names (`edgelb stop` removes
/// what edgelb pinned there: `..` could lead it out)? For `node.pin_dir` and `edgelb decap
/// --pin-dir`.
pub fn below_bpffs(path: &str) -> bool {
    path.strip_prefix("/sys/fs/bpf/").is_some_and(|rest| {
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        !rest.is_empty() && rest.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
    })
}

#[cfg(test)]
mod tests;
