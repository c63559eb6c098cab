//! Checks of an L7 VIP's `[[vip.route]]`s: a route's `host` and `path_prefix` must be what the
//! proxy compares requests with (a host without port or scheme, a path in normal form), no
//! route may be hidden by an earlier one that takes every request it would ([`EarlierRoutes`],
//! in time proportional to the routes, not their square: a file of thousands of routes is
//! checked on the controller's thread during a reload), and a request that would be matched
//! against very many routes gets a caution.

use std::{collections::HashMap, net::Ipv6Addr};

use super::{
    ROUTES_CAUTION,
    message::{quoted, toml_string},
};

/// Where a VIP's routes, given by their hosts (as `proxy::route_host` spells them; none for a
/// route for every host) in file order, first let one request be matched against more than
/// [`ROUTES_CAUTION`] routes: (the route's index, the host of such a request, or none when it
/// is any host's, how many routes). A request of host `h` is matched against the routes of
/// `h` and those for every host.
pub(super) fn routes_past_caution(
    hosts: impl IntoIterator<Item = Option<String>>,
) -> Option<(usize, Option<String>, usize)> {
    let mut any_host = 0;
    let mut of_host: HashMap<String, usize> = HashMap::new();
    // The host with the most routes of its own so far, and how many.
    let mut busiest: Option<(String, usize)> = None;
    for (i, host) in hosts.into_iter().enumerate() {
        let (host, reach) = match host {
            Some(h) => {
                let n = of_host.entry(h.clone()).or_default();
                *n += 1;
                let n = *n;
                if busiest.as_ref().is_none_or(|(_, m)| n > *m) {
                    busiest = Some((h.clone(), n));
                }
                (Some(h), n + any_host)
            }
            None => {
                any_host += 1;
                match &busiest {
                    Some((h, n)) => (Some(h.clone()), n + any_host),
                    None => (None, any_host),
                }
            }
        };
        if reach > ROUTES_CAUTION {
            return Some((i, host, reach));
        }
    }
    None
}

/// Can a route's `path_prefix` match a request path? It must start with `/` and hold no query
/// or fragment, as a request's path does; and with `normalize` (requests are matched by their
/// path in normal form) it must be in normal form itself, or it would match nothing or not
/// what it seems to, and spelled as the reading with every escape decoded spells it
/// (`proxy::path::escapes_decoded`: `/v1:admin/`, not `/v1%3Aadmin/`), which backends do not
/// tell apart: the proxy refuses a request whose readings take different routes, so a prefix
/// spelled otherwise would take the requests spelled its way only, and the others would be
/// refused, or walk around it. The error names the form to write.
pub(super) fn path_prefix_ok(p: &str, normalize: bool) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(['?', '#']) || p.contains(char::is_whitespace) {
        return Err(format!(
            "path_prefix `{}` must be a path: start with `/`, without query, fragment or spaces",
            quoted(p)
        ));
    }
    // Clients send other characters percent-encoded (browsers, curl), and escapes of them stay
    // as they are in the normal form: a prefix spelled raw would never match.
    if !p.bytes().all(|b| b.is_ascii_graphic()) {
        let encoded: String =
            p.bytes()
                .map(|b| {
                    if b.is_ascii_graphic() { (b as char).to_string() } else { format!("%{b:02X}") }
                })
                .collect();
        // In the form requests are matched in, or pasting it would meet the next error.
        let write = normalize.then(|| matched_form(&encoded)).flatten().unwrap_or(encoded);
        // Advice that pastes back: the encoded form, if it passes; else what it would meet next.
        return Err(match path_prefix_ok(&write, normalize) {
            Ok(()) => format!(
                "path_prefix `{}` holds characters clients send percent-encoded: write path_prefix = {}",
                quoted(p),
                toml_string(&write)
            ),
            Err(next) => format!(
                "path_prefix `{}` holds characters clients send percent-encoded (as {}), and then: {next}",
                quoted(p),
                toml_string(&write)
            ),
        });
    }
    if normalize {
        let Some(matched) = matched_form(p) else {
            return Err(format!(
                "path_prefix `{}` has a malformed escape (`%` needs two hex digits)",
                quoted(p)
            ));
        };
        if crate::proxy::path::normalize(p).is_some_and(|n| n != p) {
            return Err(format!(
                "path_prefix `{}` is not in normal form, and requests are matched by their normalized path (`normalize_path`): write path_prefix = {}",
                quoted(p),
                toml_string(&matched)
            ));
        }
        // A request path that matches such a prefix reads, with its `;` parameters dropped as
        // Tomcat, Jetty and Spring drop them, as one that does not: refused as ambiguous, the
        // route would take no request at all.
        if p.contains(';') {
            return Err(format!(
                "path_prefix `{}` holds a `;` parameter, which backends that drop them read as another path, so requests for it are refused (`normalize_path`): route by the path without it, or write `%3B` for a `;` that is data",
                quoted(p)
            ));
        }
        if matched != p {
            return Err(format!(
                "path_prefix `{}` is not spelled as requests are matched (`normalize_path`): backends decode every escape (`%3A` and `:` are one character to them), so a request is matched with its escapes decoded too, spelled each character raw but controls, space, bytes past ASCII, `%?#;\"<>{{}}` and the backquote (escaped, as browsers send them) and escaped slashes, and one that reading routes elsewhere is refused, so a prefix spelled otherwise would take no request: write path_prefix = {}",
                quoted(p),
                toml_string(&matched)
            ));
        }
    }
    Ok(())
}

/// `p` in the form requests are matched in ([`path_prefix_ok`]): in normal form
/// (`proxy::path::normalize`), spelled as the reading with every escape decoded spells it
/// (`proxy::path::escapes_decoded`), unless it holds a `;`, which that spells `%3B` and
/// [`path_prefix_ok`] refuses with advice of its own. `None` for a malformed escape.
fn matched_form(p: &str) -> Option<String> {
    let n = crate::proxy::path::normalize(p)?;
    match crate::proxy::path::escapes_decoded(&n) {
        Some(Ok(decoded)) if !n.contains(';') => Some(decoded),
        _ => Some(n.into_owned()),
    }
}

/// The routes of one VIP checked so far, for the check that none is hidden by an earlier one
/// (which takes every request it would). Only a route of the same host, or of any host, can
/// hide a route with a host, and only one of any host a route without: each route is compared
/// with those alone, found by its host in a map, rather than with every route before it (a
/// VIP with a route per host costs a map lookup a route, not a comparison with every earlier
/// route: thousands of routes took seconds, on the controller's thread during a reload). Within
/// a host's routes (or those of any host), a route is compared only with the earlier paths that
/// are prefixes of its own, found by walking its path through a trie of theirs ([`Prefixes`]):
/// 20 000 routes without a host, each compared with every earlier one, took 3.7 s.
#[derive(Default)]
pub(super) struct EarlierRoutes<'a> {
    /// The routes so far: the next one's index.
    count: usize,
    /// The routes of each host (as routes compare it: `proxy::route_host`).
    of_host: std::collections::HashMap<String, Prefixes<'a>>,
    /// The routes without a host.
    any_host: Prefixes<'a>,
    /// Earlier routes' paths compared with a later one's (those found to be prefixes of it),
    /// all routes together: what a test measures to see that routes of different hosts, and
    /// paths that are not prefixes of the route's, are not compared with it.
    pub(super) compared: usize,
}

impl<'a> EarlierRoutes<'a> {
    /// The first earlier route (its index) that takes every request a route of `host` (as
    /// routes compare it) and `path` would, if one does.
    pub(super) fn hiding(&mut self, host: Option<&str>, path: Option<&str>) -> Option<usize> {
        let any = self.any_host.covering(path, &mut self.compared);
        let same = host
            .and_then(|h| self.of_host.get(h))
            .and_then(|routes| routes.covering(path, &mut self.compared));
        any.into_iter().chain(same).min()
    }

    /// Adds the next route: of `host` (as routes compare it), with `path`.
    pub(super) fn push(&mut self, host: Option<String>, path: Option<&'a str>) {
        let routes = match host {
            Some(h) => self.of_host.entry(h).or_default(),
            None => &mut self.any_host,
        };
        routes.add(path, self.count);
        self.count += 1;
    }
}

/// The earlier routes of one host (or of any host) by path prefix, for [`EarlierRoutes`]: a
/// route takes every request of a later one when it has no path, or its path is a prefix of the
/// later one's (requests are matched by `starts_with`, at any byte, not at `/` only). The paths
/// are kept in a byte trie (a radix tree: a node per path and per point where two paths part),
/// and a path's stored prefixes are the nodes its walk from the root passes: each byte of the
/// path is read once, whatever the other paths. Stepping back through sorted paths instead took
/// a step per byte for paths like `/zzz...zy` (each a search and a scan of the path): 3000 such
/// routes took minutes to check.
#[derive(Default)]
struct Prefixes<'a> {
    /// The first route without a path, which takes every path.
    pathless: Option<usize>,
    /// The trie of the paths; the first node (once there is one) is the root, the empty path.
    nodes: Vec<PrefixNode<'a>>,
}

/// A node of the trie of [`Prefixes`]: the path from the root to it is its ancestors' labels
/// and its own.
struct PrefixNode<'a> {
    /// The bytes from its parent to it (none at the root): part of the path that added it.
    label: &'a [u8],
    /// The first route whose path ends here, if one does (not where two paths only part).
    route: Option<usize>,
    /// Its children by the first byte of their label, sorted by that byte (labels of one
    /// node's children start with different bytes).
    children: Vec<(u8, usize)>,
}

impl<'a> Prefixes<'a> {
    /// Adds route `i`, with `path`.
    fn add(&mut self, path: Option<&'a str>, i: usize) {
        let Some(path) = path else {
            self.pathless.get_or_insert(i);
            return;
        };
        if self.nodes.is_empty() {
            self.nodes.push(PrefixNode { label: &[], route: None, children: Vec::new() });
        }
        let (mut node, mut rest) = (0, path.as_bytes());
        while let Some(&b) = rest.first() {
            let at = match self.nodes[node].children.binary_search_by_key(&b, |&(b, _)| b) {
                Ok(at) => at,
                Err(place) => {
                    // No path goes on from here with this byte: the rest is a new leaf.
                    let leaf = self.nodes.len();
                    let new = PrefixNode { label: rest, route: Some(i), children: Vec::new() };
                    self.nodes.push(new);
                    self.nodes[node].children.insert(place, (b, leaf));
                    return;
                }
            };
            let child = self.nodes[node].children[at].1;
            let label = self.nodes[child].label;
            let common = rest.iter().zip(label).take_while(|(a, b)| a == b).count();
            if common < label.len() {
                // The path parts from the child's label within it: a node where they part
                // takes the child's place, with the child's label's rest below it.
                let (head, tail) = label.split_at(common);
                let fork = self.nodes.len();
                let children = vec![(tail[0], child)];
                self.nodes.push(PrefixNode { label: head, route: None, children });
                self.nodes[child].label = tail;
                self.nodes[node].children[at].1 = fork;
                node = fork;
            } else {
                node = child;
            }
            rest = &rest[common..];
        }
        self.nodes[node].route.get_or_insert(i);
    }

    /// The first of these routes that takes every request of a route with `path` (none: any
    /// path), if one does; each stored path found to be a prefix of `path` is counted in
    /// `compared` (the walk itself reads each byte of `path` once).
    fn covering(&self, path: Option<&str>, compared: &mut usize) -> Option<usize> {
        let mut first = self.pathless;
        let Some(path) = path else { return first };
        let (mut node, mut rest) = (0, path.as_bytes());
        while let Some(n) = self.nodes.get(node) {
            if let Some(i) = n.route {
                *compared += 1;
                first = Some(first.map_or(i, |f| f.min(i)));
            }
            let Some(&b) = rest.first() else { break };
            let Ok(at) = n.children.binary_search_by_key(&b, |&(b, _)| b) else { break };
            let child = n.children[at].1;
            let Some(after) = rest.strip_prefix(self.nodes[child].label) else { break };
            (node, rest) = (child, after);
        }
        first
    }
}

/// A route's `host` must be what the proxy compares it with: a request's host, lowercased, its
/// port removed. The error says what to write.
pub(super) fn route_host_ok(h: &str) -> Result<(), String> {
    // A route's host is compared whole: `*.example.com` would match only a request whose Host
    // is those very characters, which no client sends.
    if h.contains('*') {
        return Err(format!(
            "route host `{}`: wildcards are not supported (a route's host is compared whole); write one route per host name",
            quoted(h)
        ));
    }
    let reg_name = |h: &str| {
        !h.is_empty()
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
    };
    let ip_literal = |h: &str| {
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|a| a.parse::<Ipv6Addr>().is_ok())
    };
    if reg_name(h) || ip_literal(h) {
        return Ok(());
    }
    let what = format!(
        "route host `{}` must be a plain host name (no scheme, port, path or spaces): the request's port is removed before it is compared",
        quoted(h)
    );
    // What was probably meant: the host of a URL or of host:port.
    let mut meant = h.trim();
    if let Some((_, rest)) = meant.split_once("://") {
        meant = rest;
    }
    meant = meant.split(['/', '?', '#']).next().unwrap_or("");
    if meant.parse::<Ipv6Addr>().is_ok() {
        return Err(format!("{what}; write host = {}", toml_string(&format!("[{meant}]"))));
    }
    if let Some((host, port)) = meant.rsplit_once(':')
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        meant = host;
    }
    if reg_name(meant) || ip_literal(meant) {
        Err(format!("{what}; write host = {}", toml_string(meant)))
    } else {
        Err(what)
    }
}
