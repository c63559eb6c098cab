//! Plain TCP relay: one backend per client connection, bytes copied both ways, half-close passed
//! on (when one side finishes sending, the other side's write half is shut down, and the relay
//! ends once both directions are done).

use std::{
    net::{Shutdown, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use bytes::BytesMut;

use super::{VipRuntime, balance::BackendState, client_ip, http::proxy_header, uring::Socket};

/// Relays bytes both ways between `client` and backend `up` until both directions are done,
/// with `up`'s member `state` counting the relay as in flight (least-connections sees it), then
/// shuts both sockets down. TCP mode and upgraded HTTP connections (WebSocket) end in this.
pub(super) async fn relay(
    client: &Socket,
    up: &Socket,
    idle: std::time::Duration,
    state: &BackendState,
) {
    state.in_flight.fetch_add(1, Ordering::Relaxed);
    tokio::join!(pump(client, up, idle), pump(up, client, idle));
    // Reads abandoned on an idle timeout stay pending until the sockets are shut down.
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
    state.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// Copies `from` to `to` until `from` ends, fails or is idle for `idle`, then shuts `to`'s
/// write half (so the far end sees the end of what this side sends).
async fn pump(from: &Socket, to: &Socket, idle: std::time::Duration) {
    let mut buf = BytesMut::new();
    loop {
        buf.clear();
        let (r, b) = match tokio::time::timeout(idle, from.recv(buf, 16 * 1024)).await {
            Ok(x) => x,
            Err(_) => break,
        };
        buf = b;
        match r {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let (w, b) = to.send_all(buf).await;
        buf = b;
        if w.is_err() {
            break;
        }
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
        match tokio::time::timeout(cfg.connect_timeout, Socket::connect(addr)).await {
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
    if let Some(v) = cfg.proxy_protocol {
        let (r, _) = up.send_all(proxy_header(v, peer, listen)).await;
        if r.is_err() {
            return;
        }
    }
    let state = &pool.members[i].state;
    state.requests.fetch_add(1, Ordering::Relaxed);
    relay(&client, &up, cfg.idle_timeout, state).await;
}
