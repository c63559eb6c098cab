//! Tiny backend servers and clients for the testbed: each backend answers with its own name, so
//! the client can see where the balancer sent it. Std sockets only; every loop is bounded.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::netns;

/// Backend servers running in a namespace; stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// On a fresh server thread: enters `ns`, runs `open` and reports the outcome on `ready`, so
/// `spawn` returns only once every socket is bound (or with the first error).
fn open_in<T>(
    ns: &str,
    ready: &std::sync::mpsc::Sender<std::io::Result<()>>,
    open: impl FnOnce() -> std::io::Result<T>,
) -> Option<T> {
    match netns::enter(ns).and_then(|()| open()) {
        Ok(v) => {
            let _ = ready.send(Ok(()));
            Some(v)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            None
        }
    }
}

fn nonblocking_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Starts, inside namespace `ns`, an HTTP/1.0-style server on `tcp` and a UDP echo-name server
/// on `udp`; both answer with `name`.
pub fn spawn(ns: &str, name: &str, tcp: SocketAddr, udp: SocketAddr) -> std::io::Result<Servers> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let mut threads = Vec::new();
    {
        let (ns, name, stop, tx) = (ns.to_owned(), name.to_owned(), stop.clone(), tx.clone());
        threads.push(std::thread::spawn(move || {
            let Some(l) = open_in(&ns, &tx, || nonblocking_listener(tcp)) else { return };
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let body = format!("{name}\n");
                        let _ = write!(
                            s,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
    {
        let (ns, name, stop, tx) = (ns.to_owned(), name.to_owned(), stop.clone(), tx.clone());
        threads.push(std::thread::spawn(move || {
            let Some(s) = open_in(&ns, &tx, || {
                let s = UdpSocket::bind(udp)?;
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            }) else {
                return;
            };
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(name.as_bytes(), peer);
                }
            }
        }));
    }
    {
        // Long-lived echo on port 7: each line comes back prefixed with the backend's name.
        let (ns, name, stop, tx) = (ns.to_owned(), name.to_owned(), stop.clone(), tx.clone());
        let echo = SocketAddr::new(tcp.ip(), 7);
        threads.push(std::thread::spawn(move || {
            let Some(l) = open_in(&ns, &tx, || nonblocking_listener(echo)) else { return };
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (name, stop) = (name.clone(), stop.clone());
                        conns.push(std::thread::spawn(move || echo_conn(s, &name, &stop)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        }));
    }
    let servers = Servers { stop, threads };
    for _ in 0..3 {
        rx.recv().expect("server thread reports")?;
    }
    Ok(servers)
}

fn echo_conn(s: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut reader = std::io::BufReader::new(match s.try_clone() {
        Ok(r) => r,
        Err(_) => return,
    });
    let mut w = s;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match std::io::BufRead::read_line(&mut reader, &mut line) {
            Ok(0) => return,
            Ok(_) => {
                if write!(w, "{name}:{line}").is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A long-lived connection to the echo service on port 7.
pub struct EchoConn {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
}

impl EchoConn {
    /// Connects from `src` (port chosen by the kernel) to `vip` port 7. Call it inside the client
    /// namespace; the connection can be used from any thread afterwards.
    pub fn connect(
        src: SocketAddr,
        vip: std::net::IpAddr,
        timeout: Duration,
    ) -> std::io::Result<EchoConn> {
        let s = connect_from(src, SocketAddr::new(vip, 7), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(EchoConn { reader: std::io::BufReader::new(s.try_clone()?), writer: s })
    }

    /// Sends one line and returns the answer: `backend-N:line`.
    pub fn ask(&mut self, line: &str) -> std::io::Result<String> {
        writeln!(self.writer, "{line}")?;
        let mut answer = String::new();
        if std::io::BufRead::read_line(&mut self.reader, &mut answer)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        Ok(answer.trim_end().to_owned())
    }

    /// The backend that answers this connection.
    pub fn backend(&mut self) -> std::io::Result<String> {
        let a = self.ask("who")?;
        Ok(a.split(':').next().unwrap_or("").to_owned())
    }
}

/// One HTTP GET to `vip` from source address `src` (port chosen by the kernel); returns the body
/// (the backend's name). Call it from a thread inside the client namespace.
pub fn http_get(
    src: Option<SocketAddr>,
    vip: SocketAddr,
    timeout: Duration,
) -> std::io::Result<String> {
    let mut s = match src {
        None => TcpStream::connect_timeout(&vip, timeout)?,
        Some(src) => connect_from(src, vip, timeout)?,
    };
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: edgelb\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
    let ok = resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200");
    if !ok || body.is_empty() {
        return Err(std::io::Error::other(format!("bad response: {resp:?}")));
    }
    Ok(body)
}

/// How many segments carrying data `s` has received (TCP_INFO `tcpi_data_segs_in`, Linux 4.6),
/// or None from a kernel too old to say: what tests count a write's segments by, on the
/// receiving side (on loopback one read finds several segments' bytes there together). One
/// helper for the health probe's unit tests and the L7 proxy's integration tests alike.
///
/// # Panics
///
/// If `getsockopt` fails: `s` is a connected TCP socket, so only a bug makes it.
pub fn data_segments_in(s: &TcpStream) -> Option<u32> {
    let (info, len) =
        crate::tcp_info::get(s).unwrap_or_else(|e| panic!("getsockopt(TCP_INFO): {e}"));
    let field = std::mem::offset_of!(libc::tcp_info, tcpi_data_segs_in);
    (len >= field + 4).then_some(info.tcpi_data_segs_in)
}

/// Connects from a specific local address (std has no bind-before-connect).
fn connect_from(src: SocketAddr, dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let domain = if dst.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&src.into())?;
    sock.connect_timeout(&dst.into(), timeout)?;
    Ok(sock.into())
}

/// One UDP request to `vip` from `src`; returns the answering backend's name.
pub fn udp_ask(src: SocketAddr, vip: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let s = UdpSocket::bind(src)?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"who?", vip)?;
    let mut buf = [0u8; 256];
    let (n, _) = s.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
