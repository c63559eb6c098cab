//! The `[vip.l7]` settings of an L7 VIP ([`l7_settings`]: the proxy's mode, algorithm,
//! timeouts and limits, its routes' pools, its sticky cookies), the port the proxy connects to
//! for each backend, and the links between L7 VIPs ([`L7Links`]): a backend of one may be
//! another's listener, a chain that is fine until it comes back round, which would have each
//! connection open another without end.

use std::{collections::HashSet, net::IpAddr, ops::Range, time::Duration};

use super::{
    Algorithm, Backend, Forwarding, L7, L7Mode, ROUTES_CAUTION, Route,
    address::{AddressOf, backend_address_ok, parse_ip},
    cookie::{CookieAttributes, cookie_attributes, cookie_prefix_ok, cookie_token},
    limits::{Tally, of_form, setting},
    message::{Invalid, bad, quoted},
    raw,
    ring::ring_shares_ok,
    routes::{EarlierRoutes, path_prefix_ok, route_host_ok, routes_past_caution},
};

/// The `tunnel_timeout_ms` of a VIP that sets none (unless its `idle_timeout_ms` says otherwise:
/// [`l7_settings`]):
/// ten minutes, nginx's `proxy_timeout` for its stream proxy. TCP relays (databases, SSH, MQTT)
/// and WebSockets often sit silent for more than the minute of the HTTP keep-alive idle
/// timeout, and a balancer that cuts them there is a trap (HAProxy has `timeout tunnel` apart
/// for it).
const TUNNEL_TIMEOUT_FLOOR: Duration = Duration::from_secs(600);

/// The `[vip.l7]` settings and routes of L7 VIP `vip` (name, address, port); route backends
/// that are other L7 VIPs' listeners go to `links`, which refuses a loop of them, every
/// route backend is counted in `entries`, and a caution for very many routes goes to
/// `cautions`.
pub(super) fn l7_settings(
    l7: Option<&raw::Sp<raw::L7>>,
    routes: &[raw::Sp<raw::Route>],
    (vip_name, vip_addr, port): (&str, IpAddr, u16),
    links: &mut L7Links,
    entries: &mut Tally,
    cautions: &mut Vec<Invalid>,
) -> Result<L7, Invalid> {
    let empty = raw::L7 {
        mode: None,
        algorithm: None,
        retries: None,
        connect_timeout_ms: None,
        header_timeout_ms: None,
        response_timeout_ms: None,
        idle_timeout_ms: None,
        tunnel_timeout_ms: None,
        request_timeout_ms: None,
        max_header_bytes: None,
        max_headers: None,
        max_connections: None,
        upstream_keepalive: None,
        forwarded_for: None,
        normalize_path: None,
        access_log: None,
        proxy_protocol: None,
        cookie_name: None,
        cookie_secret: None,
        cookie_secret_previous: None,
        cookie_attributes: None,
        max_fails: None,
        fail_timeout_ms: None,
    };
    let l = l7.map_or(&empty, |l| l.get_ref());
    let algo = |a: &Option<raw::Sp<String>>, default: Algorithm| {
        match a {
        None => Ok(default),
        Some(s) => Algorithm::parse(s.get_ref()).ok_or(()).or_else(|()| {
            bad(s.span(), format!("algorithm `{}`: expected round_robin, weighted, random, p2c, least_conn, hash or cookie", quoted(s.get_ref())))
        }),
    }
    };
    let ms = |v: &Option<raw::Sp<u64>>, default: u64, key: &str| {
        setting(v, default, key).map(Duration::from_millis)
    };
    let mode = match l.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
        None | Some(("http", _)) => L7Mode::Http,
        Some(("tcp", _)) => L7Mode::Tcp,
        Some((other, span)) => {
            return bad(span, format!("l7 mode `{}`: expected http or tcp", quoted(other)));
        }
    };
    let algorithm = algo(&l.algorithm, Algorithm::RoundRobin)?;
    if mode == L7Mode::Tcp {
        if let Some(a) = &l.algorithm
            && algorithm == Algorithm::Cookie
        {
            return bad(a.span(), "cookie stickiness needs mode = \"http\"");
        }
        // Settings of the HTTP proxy, which the TCP relay (proxy::tcp) never reads.
        let span = |v: Option<Range<usize>>, key: &'static str| v.map(|s| (s, key));
        let http_only = [
            span(l.header_timeout_ms.as_ref().map(|v| v.span()), "header_timeout_ms"),
            span(l.response_timeout_ms.as_ref().map(|v| v.span()), "response_timeout_ms"),
            span(l.request_timeout_ms.as_ref().map(|v| v.span()), "request_timeout_ms"),
            span(l.max_header_bytes.as_ref().map(|v| v.span()), "max_header_bytes"),
            span(l.max_headers.as_ref().map(|v| v.span()), "max_headers"),
            span(l.upstream_keepalive.as_ref().map(|v| v.span()), "upstream_keepalive"),
            span(l.forwarded_for.as_ref().map(|v| v.span()), "forwarded_for"),
            span(l.normalize_path.as_ref().map(|v| v.span()), "normalize_path"),
            span(l.access_log.as_ref().map(|v| v.span()), "access_log"),
            span(l.cookie_name.as_ref().map(|v| v.span()), "cookie_name"),
            span(l.cookie_secret.as_ref().map(|v| v.span()), "cookie_secret"),
            span(l.cookie_secret_previous.as_ref().map(|v| v.span()), "cookie_secret_previous"),
            span(l.cookie_attributes.as_ref().map(|v| v.span()), "cookie_attributes"),
        ];
        if let Some((span, key)) = http_only.into_iter().flatten().next() {
            return bad(
                span,
                format!(
                    "`{key}` applies only to mode = \"http\": a TCP relay does not read HTTP; remove it, or set mode = \"http\""
                ),
            );
        }
        if let Some(r) = routes.first() {
            return bad(
                r.span(),
                "[[vip.route]] applies only to mode = \"http\": a TCP relay does not read the Host or path; put its backends in the VIP's own `backends`",
            );
        }
    }
    if let Some(c) = &l.cookie_name
        && !cookie_token(c.get_ref())
    {
        return bad(
            c.span(),
            format!(
                "cookie_name `{}` must be a cookie name token (it goes into Set-Cookie as it is): ASCII letters, digits and ! # $ % & ' * + - . ^ _ ` | ~, not empty, no spaces, `;`, `=`, `,` or quotes; e.g. cookie_name = \"edgelb_sticky\"",
                quoted(c.get_ref())
            ),
        );
    }
    // Not refused: files with more ran before this was said.
    let hosts = routes
        .iter()
        .map(|r| r.get_ref().host.as_ref().map(|h| crate::proxy::route_host(h.get_ref())));
    if let Some((i, host, reach)) = routes_past_caution(hosts) {
        let request = match &host {
            Some(h) => format!("a request for host `{}`", quoted(h)),
            None => "a request".to_owned(),
        };
        cautions.push(Invalid(
            routes[i].span(),
            format!(
                "VIP `{}`: {request} is matched against {reach} routes here (its host's and those for every host), more than {ROUTES_CAUTION} (this is route {}): each request is matched, in order, against the routes of its host and the routes for every host until one takes it, about 10 ns a route (some 12 µs past {ROUTES_CAUTION}); write fewer, wider routes (one path_prefix for a group of paths; routes of other hosts cost a request nothing)",
                quoted(vip_name),
                i + 1
            ),
        ));
    }
    let normalize_path = l.normalize_path.as_ref().is_none_or(|f| *f.get_ref());
    let mut out_routes: Vec<Route> = Vec::new();
    let mut earlier = EarlierRoutes::default();
    for r in routes {
        let span = r.span();
        let r = r.get_ref();
        if r.host.is_none() && r.path_prefix.is_none() {
            return bad(
                span,
                "a route without `host` or `path_prefix` takes every request, and no later route gets any: put its backends in the VIP's own `backends` (the default), or give it a `host` or `path_prefix`",
            );
        }
        if let Some(h) = &r.host
            && let Err(m) = route_host_ok(h.get_ref())
        {
            return bad(h.span(), m);
        }
        let mut backends: Vec<Backend> = Vec::new();
        let mut seen = HashSet::new();
        for b in &r.backends {
            let address = parse_ip(&b.address, AddressOf::L7Backend)?;
            let weight = setting(&b.weight, 1, "weight")?;
            if let Some(m) = &b.mac {
                return bad(m.span(), "`mac` applies to backends XDP forwards to, not to l7 ones");
            }
            let bport = l7_backend_port(b, port)?;
            let vip = (vip_addr, port);
            backend_address_ok(b.address.span(), address, bport, vip, Forwarding::L7)?;
            links.note(vip_name, address, bport, b.address.span());
            entries.add(b.address.span(), vip_name);
            if !seen.insert((address, bport)) {
                return bad(
                    b.address.span(),
                    format!("backend {address}:{bport} is listed twice in this route"),
                );
            }
            backends.push(Backend { address, weight, mac: None, port: bport });
        }
        if backends.is_empty() {
            return bad(span, "a route needs backends");
        }
        if let Some(p) = &r.path_prefix
            && let Err(m) = path_prefix_ok(p.get_ref(), normalize_path)
        {
            return bad(p.span(), m);
        }
        // Routes are tried in order: one that an earlier route takes every request of would
        // never get one, which is a mistake (usually the more specific route written second).
        let host = r.host.as_ref().map(|h| crate::proxy::route_host(h.get_ref()));
        let path = r.path_prefix.as_ref().map(|p| p.get_ref().as_str());
        if let Some(earlier) = earlier.hiding(host.as_deref(), path).map(|i| &out_routes[i]) {
            let matcher = |h: Option<&str>, p: Option<&str>| {
                [h.map(|h| format!("host = \"{h}\"")), p.map(|p| format!("path_prefix = \"{p}\""))]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return bad(
                span,
                format!(
                    "this route never gets a request: routes are tried in order, and an earlier one ({}) takes every request it would ({}); put the more specific route first",
                    matcher(earlier.host.as_deref(), earlier.path_prefix.as_deref()),
                    matcher(r.host.as_ref().map(|h| h.get_ref().as_str()), path),
                ),
            );
        }
        earlier.push(host, path);
        out_routes.push(Route {
            host: r.host.as_ref().map(|h| h.get_ref().to_ascii_lowercase()),
            path_prefix: r.path_prefix.as_ref().map(|p| p.get_ref().clone()),
            algorithm: algo(&r.algorithm, algorithm)?,
            backends,
        });
        if out_routes.last().is_some_and(|r| r.algorithm == Algorithm::Hash) {
            ring_shares_ok(&r.backends, crate::proxy::balance::L7_RING, "")?;
        }
    }
    let proxy_protocol =
        l.proxy_protocol.as_ref().map(|v| of_form(v, "proxy_protocol")).transpose()?;
    // Where cookie stickiness is asked for: the VIP's algorithm, or the first route's.
    let cookie_at = match &l.algorithm {
        Some(a) if algorithm == Algorithm::Cookie => Some(a.span()),
        _ => routes.iter().find_map(|r| {
            r.get_ref().algorithm.as_ref().filter(|a| a.get_ref() == "cookie").map(|a| a.span())
        }),
    };
    let long_enough = |s: &raw::Sp<String>, key: &str| {
        if s.get_ref().len() >= 16 {
            Ok(s.get_ref().clone())
        } else {
            bad(
                s.span(),
                format!(
                    "{key} must be at least 16 bytes (this one has {}): the secret's strength is its bytes",
                    s.get_ref().len()
                ),
            )
        }
    };
    let cookie_secret = match &l.cookie_secret {
        Some(s) => long_enough(s, "cookie_secret")?,
        None => match cookie_at {
            Some(span) => {
                return bad(
                    span,
                    "cookie stickiness needs [vip.l7] cookie_secret (at least 16 bytes, the same on every node)",
                );
            }
            None => String::new(),
        },
    };
    let cookie_secret_previous = match &l.cookie_secret_previous {
        None => None,
        Some(p) if l.cookie_secret.is_none() => {
            return bad(
                p.span(),
                "cookie_secret_previous needs cookie_secret: cookie_secret signs new cookies, cookie_secret_previous is a second secret whose cookies still count (during a rotation, see docs/CONFIG.md); write both",
            );
        }
        Some(p) if *p.get_ref() == cookie_secret => {
            return bad(
                p.span(),
                "cookie_secret_previous is cookie_secret itself: write there the other secret of the rotation (see docs/CONFIG.md), or remove cookie_secret_previous once every node signs with cookie_secret",
            );
        }
        Some(p) => Some(long_enough(p, "cookie_secret_previous")?),
    };
    let cookie_name = l.cookie_name.as_ref().map_or("edgelb", |c| c.get_ref().as_str());
    let attributes = match &l.cookie_attributes {
        None => CookieAttributes::default(),
        Some(a) => cookie_attributes(a.get_ref()).or_else(|m| bad(a.span(), m))?,
    };
    cookie_prefix_ok(cookie_name, &attributes, l, routes, algorithm)?;
    let idle_timeout = ms(&l.idle_timeout_ms, 60_000, "idle_timeout_ms")?;
    // Unset, it keeps what the file meant when the idle timeout was also the tunnels' silence:
    // in TCP mode, which has no other use for it, an `idle_timeout_ms` written is the tunnels'
    // timeout as before; in HTTP mode it is a floor (an operator who raised it for WebSockets
    // loses nothing, one who lowered it for keep-alive no longer cuts WebSockets with it).
    let tunnel_default = match (mode, &l.idle_timeout_ms) {
        (L7Mode::Tcp, Some(_)) => idle_timeout,
        _ => idle_timeout.max(TUNNEL_TIMEOUT_FLOOR),
    }
    .as_millis() as u64;
    Ok(L7 {
        mode,
        algorithm,
        routes: out_routes,
        retries: setting(&l.retries, 2, "retries")?,
        connect_timeout: ms(&l.connect_timeout_ms, 1_000, "connect_timeout_ms")?,
        header_timeout: ms(&l.header_timeout_ms, 10_000, "header_timeout_ms")?,
        response_timeout: ms(&l.response_timeout_ms, 30_000, "response_timeout_ms")?,
        idle_timeout,
        tunnel_timeout: ms(&l.tunnel_timeout_ms, tunnel_default, "tunnel_timeout_ms")?,
        request_timeout: ms(&l.request_timeout_ms, 120_000, "request_timeout_ms")?,
        max_header_bytes: setting(&l.max_header_bytes, 16_384, "max_header_bytes")? as usize,
        max_headers: setting(&l.max_headers, 100, "max_headers")? as usize,
        max_connections: setting(&l.max_connections, 10_000, "max_connections")? as usize,
        upstream_keepalive: setting(&l.upstream_keepalive, 1_024, "upstream_keepalive")? as usize,
        forwarded_for: l.forwarded_for.as_ref().is_none_or(|f| *f.get_ref()),
        normalize_path,
        access_log: l.access_log.as_ref().is_some_and(|f| *f.get_ref()),
        proxy_protocol,
        cookie_name: cookie_name.to_owned(),
        cookie_secret,
        cookie_secret_previous,
        cookie_attributes: attributes.text,
        cookie_domain: attributes.domain,
        cookie_max_age: attributes.max_age,
        max_fails: setting(&l.max_fails, 3, "max_fails")?,
        fail_timeout: ms(&l.fail_timeout_ms, 10_000, "fail_timeout_ms")?,
    })
}

/// The listen address (canonical) and port of every L7 VIP in the file, by name, read before
/// the VIPs are checked one by one: a backend of one L7 VIP may be another's, written later.
/// A VIP whose address or port would be refused is left out (its own error comes first).
pub(super) fn l7_listens(vips: &[raw::Sp<raw::Vip>]) -> Vec<(String, std::net::SocketAddr)> {
    vips.iter()
        .map(|v| v.get_ref())
        .filter(|v| v.forwarding.as_ref().is_some_and(|f| f.get_ref() == "l7"))
        .filter_map(|v| {
            let address: IpAddr = v.address.get_ref().parse().ok()?;
            let port = *v.port.as_ref()?.get_ref();
            (port != 0).then(|| {
                (v.name.get_ref().clone(), std::net::SocketAddr::new(address.to_canonical(), port))
            })
        })
        .collect()
}

/// Which L7 VIPs proxy to which, gathered while the VIPs are checked. An L7 VIP whose backend
/// is another's listen address chains the two (a front VIP → 127.0.0.1:28081, where an inner
/// VIP listens → the real backend), which is fine; VIPs that come back round to one already
/// passed loop, each connection opening another until the proxy runs out of sockets. Every
/// listener is bound to its VIP's own address (a VIP is never the unspecified address, which
/// would take connections to every local one), so only the same address and port reaches it.
pub(super) struct L7Links {
    /// Every L7 VIP's name and listen address (canonical), in file order ([`l7_listens`]).
    pub(super) listens: Vec<(String, std::net::SocketAddr)>,
    /// (from, to, the backend as written, where): a backend of L7 VIP `from`, in its pool or a
    /// route's, is where L7 VIP `to` listens; the first such backend of each pair.
    pub(super) edges: Vec<(String, String, std::net::SocketAddr, Range<usize>)>,
}

impl L7Links {
    /// Notes backend `address`:`port` (written at `span`) of L7 VIP `from`, if another L7 VIP
    /// listens there (its own listen address is refused by [`backend_address_ok`]).
    pub(super) fn note(&mut self, from: &str, address: IpAddr, port: u16, span: Range<usize>) {
        let at = std::net::SocketAddr::new(address.to_canonical(), port);
        let Some((to, _)) = self.listens.iter().find(|(n, l)| *l == at && n != from) else {
            return;
        };
        if !self.edges.iter().any(|(f, t, ..)| f == from && t == to) {
            let written = std::net::SocketAddr::new(address, port);
            self.edges.push((from.to_owned(), to.clone(), written, span));
        }
    }

    /// Refuses a loop of L7 VIPs, named in order from the one first in the file
    /// (`a → b → a`), at the backend of that first one that leads on.
    pub(super) fn no_loop(&self) -> Result<(), Invalid> {
        let mut state = std::collections::HashMap::new();
        for (name, _) in &self.listens {
            let Some(mut cycle) = self.cycle_from(name, &mut state, &mut Vec::new()) else {
                continue;
            };
            // From the VIP of the loop that is first in the file, whichever the search met first.
            let order = |e: usize| self.listens.iter().position(|(n, _)| *n == self.edges[e].0);
            if let Some(at) = (0..cycle.len()).min_by_key(|&i| order(cycle[i])) {
                cycle.rotate_left(at);
            }
            let (from, to, backend, span) = &self.edges[cycle[0]];
            let names: Vec<String> = cycle.iter().map(|&e| quoted(&self.edges[e].0)).collect();
            return bad(
                span.clone(),
                format!(
                    "L7 VIPs proxy to each other in a loop, {} → {from}: backend {backend} of VIP `{from}` is the listen address of L7 VIP `{to}`, and the loop comes back, each connection opening another without end; break it: write the real backends of one of them (a chain of L7 VIPs that ends at real backends is fine)",
                    names.join(" → "),
                    from = quoted(from),
                    to = quoted(to)
                ),
            );
        }
        Ok(())
    }

    /// Depth first from `node` (`state`: true on the path, false done): the edges of the first
    /// cycle found, in order, if any. `path` holds the edges taken to reach `node`.
    fn cycle_from<'a>(
        &'a self,
        node: &'a str,
        state: &mut std::collections::HashMap<&'a str, bool>,
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        if state.contains_key(node) {
            return None;
        }
        state.insert(node, true);
        for (i, (_, to, ..)) in self.edges.iter().enumerate().filter(|(_, e)| e.0 == node) {
            path.push(i);
            match state.get(to.as_str()) {
                // Back to a VIP on the path: the cycle is the edges since it.
                Some(true) => {
                    let start = path.iter().position(|&e| self.edges[e].0 == *to)?;
                    return Some(path[start..].to_vec());
                }
                Some(false) => {}
                None => {
                    if let Some(cycle) = self.cycle_from(to, state, path) {
                        return Some(cycle);
                    }
                }
            }
            path.pop();
        }
        state.insert(node, false);
        None
    }
}

/// The port the proxy connects to for an L7 backend: its own, or the VIP's.
pub(super) fn l7_backend_port(b: &raw::Backend, vip_port: u16) -> Result<u16, Invalid> {
    match &b.port {
        None => Ok(vip_port),
        Some(p) if *p.get_ref() == 0 => bad(p.span(), "a backend port must be 1..=65535"),
        Some(p) => Ok(*p.get_ref()),
    }
}
