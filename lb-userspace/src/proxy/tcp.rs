//! Plain TCP relay: one backend per client connection, bytes copied both ways, half-close passed
//! on (when one side finishes sending, the other side's write half is shut down, and the relay
//! ends once both directions are done). A reset (or any failed receive) is passed on as a reset,
//! not as a half-close, which many protocols would read as "complete"; the one exception is a
//! reset that a send to the resetting side takes first (the kernel reports it once), which the
//! receive then sees as an end of stream, and which is indistinguishable on the wire from a
//! close with bytes unread, passed on as an end so the client keeps the last bytes (`relay`,
//! docs/ARCHITECTURE.md). A relay the proxy itself cuts, at the tunnel timeout
//! (`tunnel_timeout_ms`, not the HTTP idle timeout: relays sit silent far longer than keep-alive
//! connections should) or at a stop's drain deadline, ends with a reset on both sides too:
//! neither side ended its stream. The tunnel timeout counts silence in both directions: a
//! stream one side pushes while the other listens (server-sent events, a WebSocket feed) is not
//! idle, nor is one a slow reader drains from the kernel's buffers.

use std::{
    cell::Cell,
    net::{Shutdown, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;

use super::{
    VipRuntime,
    balance::{BackendState, InFlight},
    client_ip,
    http::linger,
    proxy_protocol::proxy_header,
    uring::Socket,
};

/// Relays bytes both ways between `client` and backend `up` until both directions are done,
/// or nothing moved either way for `tunnel` (the VIP's tunnel timeout, which both sockets take as
/// their stall time here too, the longest a send waits for a peer that takes nothing:
/// [`Socket::keep_stall`]), with `up`'s member `state`
/// counting the relay as in flight (least-connections sees it), then closes both sockets, each
/// once its peer has what the kernel still holds for it, or took none of it for `tunnel`
/// ([`Socket::close_when_delivered`]).
/// TCP mode and upgraded HTTP connections (WebSocket) end in this; the value is the one in
/// force when the relay started, which a reload does not change.
///
/// A relay dropped before it ends (the proxy's stop past its drain deadline drops the task of
/// every connection still open, or the runtime goes) resets both connections: neither side
/// ended its stream, and a clean close would pass an upload or a download cut there for a
/// whole one. Not once both directions are done and only the close is left (each side's
/// stream complete, the kernel still holding its end for a slow reader): each connection is
/// then handed to the kernel, which delivers the rest ([`Socket::end_at_deadline`]).
///
/// When the backend has ended its side cleanly and its connection can take no more (it closed
/// while the client was still sending), the client connection closes lingering ([`linger`]:
/// sending side shut, what the client still sends read and dropped, for a bounded time): closed
/// at once with bytes unread, it would be reset, and the reset can throw away the backend's last
/// bytes before the client has read them. Its download complete, that close has begun: a stop's
/// drain deadline hands the client connection to the kernel meanwhile, and resets the
/// backend's, which ended its side already.
pub(super) async fn relay(client: &Socket, up: &Socket, tunnel: Duration, state: &BackendState) {
    let mut unfinished = Unfinished(Some([client, up]));
    let counted = InFlight::new(state);
    // An upgraded connection had the HTTP idle timeout until now (a TCP-mode one has this
    // already: one comparison each).
    client.keep_stall(tunnel);
    up.keep_stall(tunnel);
    let clock = Clock { moved: Cell::new(Instant::now()), idle: tunnel, sockets: [client, up] };
    let (upload, download) = tokio::join!(pump(client, up, &clock), pump(up, client, &clock));
    drop(counted);
    if download == End::Eof && upload == End::Undeliverable {
        linger(client, tunnel).await;
    }
    // Reads abandoned on an idle timeout stay pending until the sockets are shut down; not
    // before each peer has what the kernel still holds for it, or took none of it for the
    // tunnel timeout ([`Socket::close_when_delivered`]): a client that half-closed and reads
    // nothing would otherwise keep an orphan socket in the kernel for minutes. A stop's drain
    // deadline meanwhile drops this, which hands both to the kernel (`Unfinished`).
    tokio::join!(client.close_when_delivered(), up.close_when_delivered());
    unfinished.0 = None;
}

/// The sockets of a relay under way, reset if it is dropped before it ends, or handed to the
/// kernel if only their close was left (see [`relay`]).
struct Unfinished<'a>(Option<[&'a Socket; 2]>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        for s in self.0.into_iter().flatten() {
            s.end_at_deadline();
        }
    }
}

/// How one direction of a relay ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    /// Its sender ended its side (end of stream), passed on as a half-close.
    Eof,
    /// Nothing moved either way for the tunnel timeout: both connections are reset.
    Idle,
    /// Receiving failed (the sender reset its connection, or the proxy aborted it: a send to
    /// that side whose peer took nothing for the tunnel timeout, [`Socket::send_all_with`]),
    /// passed on as a reset.
    Reset,
    /// Sending failed: the receiver's connection can take nothing more.
    Undeliverable,
}

/// The relay's idle clock, shared by both directions.
struct Clock<'a> {
    /// When bytes last moved through the relay either way (a receive, or any part of a send).
    moved: Cell<Instant>,
    /// The tunnel timeout: how long nothing may move before the relay is cut.
    idle: Duration,
    /// Both sides' sockets, whose kernel send queues count as movement too.
    sockets: [&'a Socket; 2],
}

impl Clock<'_> {
    /// Bytes moved now.
    fn tick(&self) {
        self.moved.set(Instant::now());
    }

    /// When the relay is idle if nothing moves before.
    fn deadline(&self) -> Instant {
        self.moved.get() + self.idle
    }

    /// Has the relay been idle for the tunnel timeout? Not while a peer on either side drains
    /// bytes the relay sent it ([`Socket::draining`]: bytes still queued for it, and more of
    /// them acknowledged since the last look): the relay's own sends end as soon as the kernel
    /// has queued them, and a slow reader can take far longer than the tunnel timeout to drain
    /// those buffers while it keeps reading; the clock then restarts. A peer that took nothing
    /// since the last look (it stopped reading, or went away, bytes still queued for it) does
    /// not hold the relay: it is cut at the next look, within two tunnel timeouts of its last
    /// progress. Looked at only when the clock runs out: no system call while bytes move.
    fn expired(&self) -> bool {
        if Instant::now() < self.deadline() {
            return false;
        }
        // Both looked at: each look is the next one's baseline.
        let [a, b] = self.sockets.map(Socket::draining);
        if a || b {
            self.tick();
            return false;
        }
        true
    }
}

/// Copies `from` to `to` until `from` ends or fails, sending to `to` fails, or the relay is idle
/// (`clock`). A clean end of `from` shuts `to`'s write half, so the far end sees the end of what
/// this side sends; a failed receive aborts `to` ([`Socket::abort`]), so the far end sees a
/// reset as its peer's did. Idleness aborts both: the proxy cuts the relay there, and a
/// half-close would tell a side that waits for the other's end (an upload delimited by it, a
/// feed) that the stream was whole. Nothing is lost to the reset: nothing is in flight then.
async fn pump(from: &Socket, to: &Socket, clock: &Clock<'_>) -> End {
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        // One receive, waited for as long as the relay is not idle (it cannot be dropped and
        // issued again: the abandoned one would still take the next bytes).
        let recv = from.recv(buf, 16 * 1024);
        tokio::pin!(recv);
        let (r, b) = loop {
            let until = tokio::time::Instant::from_std(clock.deadline());
            match tokio::time::timeout_at(until, &mut recv).await {
                Ok(x) => break x,
                Err(_) if !clock.expired() => {}
                Err(_) => {
                    for s in clock.sockets {
                        s.abort();
                    }
                    return End::Idle;
                }
            }
        };
        buf = b;
        match r {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return End::Eof;
            }
            Ok(_) => {}
            Err(_) => {
                to.abort();
                return End::Reset;
            }
        }
        clock.tick();
        match to.send_all_with(buf, || clock.tick()).await {
            Ok(b) => buf = b,
            Err(_) => return End::Undeliverable,
        }
    }
}

/// How a TCP-mode connection went: counted in `edgelb_l7_tcp_connections_total{outcome}`
/// (indexed by this in [`VipRuntime::tcp_connections`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A backend was connected, and the connection relayed to it.
    Relayed = 0,
    /// No backend could be connected (every attempt failed, or the pool had none to pick): the
    /// client's connection was reset.
    NoBackend = 1,
    /// The VIP was at its `max_connections`: the client's connection was reset at once.
    OverLimit = 2,
}

impl Outcome {
    /// Every outcome, in the order of their index.
    pub(super) const ALL: [Outcome; 3] = [Outcome::Relayed, Outcome::NoBackend, Outcome::OverLimit];

    /// Its name as the metric's `outcome` label.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::NoBackend => "no_backend",
            Outcome::OverLimit => "over_limit",
        }
    }
}

/// Relays one client connection to a backend of `vip`: tries up to `retries` further backends
/// when a connect (with its PROXY header, if any) fails, as the HTTP side does, counting each
/// retry. A connection no backend could be connected to is reset ([`Socket::abort`]: a FIN
/// would pass for an empty but complete stream), counted ([`Outcome::NoBackend`]) and logged
/// ([`say_no_backend`]).
pub async fn serve(client: Socket, peer: SocketAddr, listen: SocketAddr, vip: Arc<VipRuntime>) {
    let cfg = &vip.cfg;
    let pool = &vip.default;
    let mut tried = Vec::new();
    let mut up = None;
    let mut last = None;
    for attempt in 0..=cfg.retries {
        let Some(i) = vip.pick(pool, client_ip(peer), &tried, None, attempt) else { break };
        tried.push(i);
        let state = &pool.members[i].state;
        let addr = state.addr;
        // In flight from the pick on, as an HTTP request is: least-connections and
        // power-of-two choices must see the connects a backend keeps waiting.
        let counted = InFlight::new(state);
        let connected = match Socket::connect(addr, cfg.connect_timeout, cfg.tunnel_timeout).await {
            // A PROXY header that cannot be sent fails the connect, as on the HTTP side.
            Ok(s) => match cfg.proxy_protocol {
                Some(v) => s.send_all(proxy_header(v, peer, listen)).await.map(|_| s),
                None => Ok(s),
            },
            Err(e) => Err(e),
        };
        match connected {
            Ok(s) => {
                vip.succeeded(state);
                up = Some((i, s, counted));
                break;
            }
            Err(e) if super::local_failure(&e) => {
                super::say_local_failure(&vip, addr, &e);
                last = Some(e);
            }
            Err(e) => {
                vip.failed(state, super::Failure::Connect);
                last = Some(e);
            }
        }
    }
    let Some((i, up, counted)) = up else {
        vip.tcp_connections[Outcome::NoBackend as usize].inc();
        say_no_backend(&vip, peer, tried.len(), last.as_ref());
        // Reset, not closed: to a plain TCP client a FIN reads as a backend that accepted and
        // closed at once, an empty stream passed for complete.
        client.abort();
        return;
    };
    vip.tcp_connections[Outcome::Relayed as usize].inc();
    let state = &pool.members[i].state;
    state.requests.fetch_add(1, Ordering::Relaxed);
    // The relay counts itself.
    drop(counted);
    relay(&client, &up, cfg.tunnel_timeout, state).await;
}

/// Logs a connection of `vip` from `peer` that no backend could be connected to (after `tried`
/// backends, the last failing with `last`), at most once every 10 s for the VIP
/// ([`super::Throttle`]): a VIP whose backends are all down would log a line per connection,
/// and `edgelb_l7_tcp_connections_total{outcome="no_backend"}` counts every one. Without it,
/// such connections were logged only when their failures ejected a backend, so not at all once
/// the pool failed open.
fn say_no_backend(vip: &VipRuntime, peer: SocketAddr, tried: usize, last: Option<&std::io::Error>) {
    if vip.said.no_backend.ready() {
        let error = last.map_or_else(|| "no backend to pick".to_owned(), ToString::to_string);
        tracing::warn!(vip = vip.name, client = %client_ip(peer), tried, error = %error, "no backend could be connected for a TCP-mode connection; the client's connection is reset (said at most every 10 s; edgelb_l7_tcp_connections_total counts every one)");
    }
}

/// Refuses a TCP-mode connection over the VIP's `max_connections`: reset (a FIN would read as a
/// backend that accepted and closed at once, an empty stream passed for complete, as with no
/// backend), counted ([`Outcome::OverLimit`]) and said at most every 10 s for the VIP. It was
/// closed with a FIN, counted nowhere and logged nowhere: a full database VIP dropped clients
/// while every counter looked healthy.
pub(super) fn refuse(client: &Socket, vip: &VipRuntime, peer: SocketAddr) {
    vip.tcp_connections[Outcome::OverLimit as usize].inc();
    if vip.said.over_limit.ready() {
        tracing::warn!(vip = vip.name, client = %client_ip(peer), max_connections = vip.cfg.max_connections, "a TCP-mode VIP is at its max_connections: the client's connection is reset (said at most every 10 s; edgelb_l7_tcp_connections_total with outcome over_limit counts every one)");
    }
    client.abort();
}
