//! Plain TCP relay: one backend per client connection, bytes copied both ways, half-close passed
//! on (when one side finishes sending, the other side's write half is shut down, and the relay
//! ends once both directions are done).

use std::{
    net::{Shutdown, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use tokio_uring::net::TcpStream;

use super::{VipRuntime, client_ip, http::proxy_header};

/// Copies `from` to `to` until `from` ends, fails or is idle for `idle`, then shuts `to`'s
/// write half (so the far end sees the end of what this side sends). Also relays upgraded
/// HTTP connections (WebSocket).
pub(super) async fn pump(from: &TcpStream, to: &TcpStream, idle: std::time::Duration) {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        buf.clear();
        let (r, b) = match tokio::time::timeout(idle, from.read(buf)).await {
            Ok(x) => x,
            Err(_) => break,
        };
        buf = b;
        match r {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let (w, b) = to.write_all(buf).await;
        buf = b;
        if w.is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Relays one client connection to a backend of `vip`.
pub async fn serve(client: TcpStream, peer: SocketAddr, listen: SocketAddr, vip: Arc<VipRuntime>) {
    let cfg = &vip.cfg;
    let pool = &vip.default;
    let mut tried = Vec::new();
    let mut up = None;
    for _ in 0..=cfg.retries {
        let Some(i) = pool.pick(client_ip(peer), &tried, None) else { break };
        tried.push(i);
        let addr = pool.members[i].state.addr;
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                pool.members[i].state.success();
                up = Some((i, s));
                break;
            }
            _ => {
                pool.members[i].state.failure(cfg.max_fails, cfg.fail_timeout);
            }
        }
    }
    let Some((i, up)) = up else { return };
    if let Some(v) = cfg.proxy_protocol {
        let (r, _) = up.write_all(proxy_header(v, peer, listen)).await;
        if r.is_err() {
            return;
        }
    }
    let member = &pool.members[i];
    member.state.in_flight.fetch_add(1, Ordering::Relaxed);
    member.state.requests.fetch_add(1, Ordering::Relaxed);
    tokio::join!(pump(&client, &up, cfg.idle_timeout), pump(&up, &client, cfg.idle_timeout));
    // Reads abandoned on an idle timeout stay pending until the sockets are shut down.
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
    member.state.in_flight.fetch_sub(1, Ordering::Relaxed);
}
