//! The PROXY protocol (haproxy's proxy-protocol.txt, v1 and v2): the header that tells a
//! backend which client a connection carries. Its own module, beside `http` and `tcp`, because
//! both proxies (`http::serve_conn`, `tcp`) and the health checks (`health::probe`, the LOCAL
//! command) send it, and none of them owns it.

use std::net::{IpAddr, SocketAddr};

use super::client_ip;

/// The PROXY protocol header for a connection the proxy opens on its own account, such as a
/// health check's: the LOCAL command (haproxy's proxy-protocol.txt, 2.1 and 2.2), which says no
/// client is behind it, so the backend takes the connection's own addresses and logs no
/// made-up client. v1: `PROXY UNKNOWN\r\n`; v2: the signature, version 2 with command LOCAL
/// (0x20), family and transport unspecified (0x00), no address block.
pub(crate) fn proxy_header_local(version: u8) -> Vec<u8> {
    if version == 1 {
        return b"PROXY UNKNOWN\r\n".to_vec();
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x20, 0x00, 0, 0]);
    h
}

/// The PROXY protocol header for a connection from `peer` to `local`.
pub(super) fn proxy_header(version: u8, peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (peer, local) = (
        SocketAddr::new(client_ip(peer), peer.port()),
        SocketAddr::new(client_ip(local), local.port()),
    );
    if version == 1 {
        let fam = if peer.is_ipv4() && local.is_ipv4() { "TCP4" } else { "TCP6" };
        let ip = |a: SocketAddr| match (fam, a.ip()) {
            ("TCP6", IpAddr::V4(v4)) => v4.to_ipv6_mapped().to_string(),
            (_, ip) => ip.to_string(),
        };
        return format!(
            "PROXY {fam} {} {} {} {}\r\n",
            ip(peer),
            ip(local),
            peer.port(),
            local.port()
        )
        .into_bytes();
    }
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY command
    match (peer.ip(), local.ip()) {
        (IpAddr::V4(p), IpAddr::V4(l)) => {
            h.push(0x11);
            h.extend(12u16.to_be_bytes());
            h.extend(p.octets());
            h.extend(l.octets());
        }
        (p, l) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend(36u16.to_be_bytes());
            h.extend(v6(p).octets());
            h.extend(v6(l).octets());
        }
    }
    h.extend(peer.port().to_be_bytes());
    h.extend(local.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_protocol_headers() {
        let v1 =
            proxy_header(1, "198.18.4.1:5000".parse().unwrap(), "198.18.1.6:80".parse().unwrap());
        assert_eq!(v1, b"PROXY TCP4 198.18.4.1 198.18.1.6 5000 80\r\n");
        let v2 =
            proxy_header(2, "198.18.4.1:5000".parse().unwrap(), "198.18.1.6:80".parse().unwrap());
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..20], &[198, 18, 4, 1]);
        assert_eq!(&v2[24..28], &[0x13, 0x88, 0, 80]);
        assert_eq!(proxy_header_local(1), b"PROXY UNKNOWN\r\n");
        assert_eq!(proxy_header_local(2), b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    }
}
