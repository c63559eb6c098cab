//! Plain TCP relay: one backend per client connection, bytes copied both ways, half-close passed
//! on (when one side finishes sending, the other side's write half is shut down, and the relay
//! ends once both directions are done). The idle timeout counts silence in both directions: a
//! stream one side pushes while the other listens (server-sent events, a WebSocket feed) is not
//! idle.

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
    http::proxy_header,
    uring::Socket,
};

/// Relays bytes both ways between `client` and backend `up` until both directions are done,
/// with `up`'s member `state` counting the relay as in flight (least-connections sees it), then
/// shuts both sockets down. TCP mode and upgraded HTTP connections (WebSocket) end in this.
pub(super) async fn relay(client: &Socket, up: &Socket, idle: Duration, state: &BackendState) {
    let _counted = InFlight::new(state);
    let moved = Cell::new(Instant::now());
    tokio::join!(pump(client, up, idle, &moved), pump(up, client, idle, &moved));
    // Reads abandoned on an idle timeout stay pending until the sockets are shut down.
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
}

/// Copies `from` to `to` until `from` ends or fails, or nothing has `moved` either way for
/// `idle`, then shuts `to`'s write half (so the far end sees the end of what this side sends).
async fn pump(from: &Socket, to: &Socket, idle: Duration, moved: &Cell<Instant>) {
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        // One receive, waited for as long as either direction moves (it cannot be dropped and
        // issued again: the abandoned one would still take the next bytes).
        let recv = from.recv(buf, 16 * 1024);
        tokio::pin!(recv);
        let (r, b) = loop {
            let until = tokio::time::Instant::from_std(moved.get() + idle);
            match tokio::time::timeout_at(until, &mut recv).await {
                Ok(x) => break x,
                Err(_) if moved.get() + idle > Instant::now() => {}
                Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        };
        buf = b;
        match r {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        moved.set(Instant::now());
        match to.send_all(buf).await {
            Ok(b) => buf = b,
            Err(_) => break,
        }
        moved.set(Instant::now());
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Relays one client connection to a backend of `vip`.
pub async fn serve(client: Socket, peer: SocketAddr, listen: SocketAddr, vip: Arc<VipRuntime>) {
    let cfg = &vip.cfg;
    let pool = &vip.default;
    let mut tried = Vec::new();
    let mut up = None;
    for _ in 0..=cfg.retries {
        let Some(i) = pool.pick(client_ip(peer), &tried, None) else { break };
        tried.push(i);
        let addr = pool.members[i].state.addr;
        match tokio::time::timeout(cfg.connect_timeout, Socket::connect(addr, cfg.idle_timeout))
            .await
        {
            Ok(Ok(s)) => {
                pool.members[i].state.success();
                up = Some((i, s));
                break;
            }
            _ => {
                vip.failed(&pool.members[i].state);
            }
        }
    }
    let Some((i, up)) = up else { return };
    if let Some(v) = cfg.proxy_protocol
        && up.send_all(proxy_header(v, peer, listen)).await.is_err()
    {
        return;
    }
    let state = &pool.members[i].state;
    state.requests.fetch_add(1, Ordering::Relaxed);
    relay(&client, &up, cfg.idle_timeout, state).await;
}
