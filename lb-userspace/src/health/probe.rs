//! The probes themselves: blocking std sockets, each bounded by the check's timeout.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use crate::config::{CheckKind, HealthCheck};

/// Runs one probe; Ok with its latency, or why it failed.
pub fn probe(check: &HealthCheck, addr: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let deadline = start + check.timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    match &check.kind {
        CheckKind::Tcp => {
            TcpStream::connect_timeout(&addr, check.timeout)
                .map_err(|e| format!("connect: {e}"))?;
        }
        CheckKind::Http { path, host, expect_status, expect_body } => {
            let mut s = TcpStream::connect_timeout(&addr, check.timeout)
                .map_err(|e| format!("connect: {e}"))?;
            let host = host.clone().unwrap_or_else(|| addr.ip().to_string());
            s.set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
            write!(
                s,
                "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: edgelb-health\r\nConnection: close\r\n\r\n"
            )
            .map_err(|e| format!("send: {e}"))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                s.set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("read: {e}")),
                }
                if buf.len() > 64 * 1024 {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&buf);
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| "no HTTP status line".to_owned())?;
            if status != *expect_status {
                return Err(format!("status {status}, expected {expect_status}"));
            }
            if let Some(want) = expect_body {
                let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
                if !body.contains(want.as_str()) {
                    return Err(format!("body lacks {want:?}"));
                }
            }
        }
        CheckKind::Udp { send, expect } => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
            s.connect(addr).map_err(|e| format!("connect: {e}"))?;
            s.send(send.as_bytes()).map_err(|e| format!("send: {e}"))?;
            s.set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2048];
            let n = s.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
            if let Some(want) = expect
                && !String::from_utf8_lossy(&buf[..n]).contains(want.as_str())
            {
                return Err(format!("answer lacks {want:?}"));
            }
        }
    }
    Ok(start.elapsed())
}
