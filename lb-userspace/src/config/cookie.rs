//! Sticky cookies: what `cookie_name` and `cookie_attributes` may hold (a name and attributes
//! that go into `Set-Cookie` as they are, and that browsers would not drop, `__Host-` and
//! `__Secure-` prefixes included), and the caution for VIPs whose cookies are one to a browser
//! but that would each take the other's for nothing. Apart from the other `[vip.l7]` settings
//! because these follow the browsers' rules (RFC 6265 and its successor), not the proxy's.

use std::{net::IpAddr, ops::Range};

use super::{
    Algorithm, Backend, L7, L7Mode, Vip,
    message::{Invalid, bad, quoted},
    raw,
};

/// Browsers keep cookies by host, whatever the port (RFC 6265 8.5), and a cookie with `Domain`
/// for every host under that domain: the cookies of two cookie-sticky VIPs on one address
/// (neither with a `Domain`; on different ports), or of two with one `Domain` (whatever their
/// addresses: an IPv4 and an IPv6 VIP, say), are one to a browser where their pools give one
/// name and path ([`crate::proxy::balance::scoped_cookie_name`]). If one of such a pair of
/// pools sets cookies under a secret the other does not take (a rotation's two secrets, swapped
/// between them, are taken by both), or their backends differ (a cookie's tag names a backend
/// by its address and port), each takes the other's cookie for nothing, places its client
/// anew and sets its own over it: a client of both goes from backend to backend. Such files
/// worked before, and only the operator knows whether clients reach both VIPs by one host name
/// (VIPs on different addresses without `Domain` behind one host name, which the config cannot
/// see, are the same case: docs/CONFIG.md), so each such pair of VIPs adds a caution at the
/// later VIP's address, not an error.
pub(super) fn cookies_shared_between_vips(
    vips: &[Vip],
    addresses_at: &[Range<usize>],
    cautions: &mut Vec<Invalid>,
) {
    /// A cookie-sticky pool's cookie as a browser keys it (name and path), with the backends
    /// its cookies can name, and the host of its route if it has one: a browser sends a cookie
    /// set without `Domain` only to the host that set it, so pools of two routes of different
    /// hosts never share one (a pool without a host may be reached by any).
    struct Scoped {
        name: String,
        path: String,
        named: Vec<(IpAddr, u16)>,
        host: Option<String>,
    }
    let scoped = |l7: &L7, host: Option<&str>, prefix: Option<&str>, backends: &[Backend]| {
        let host = host.map(crate::proxy::route_host);
        // The host goes into the cookie's name under a Domain only (`Pool::scope_cookie`).
        let in_name = host.as_deref().filter(|_| l7.cookie_domain.is_some());
        let mut named: Vec<(IpAddr, u16)> = backends.iter().map(|b| (b.address, b.port)).collect();
        named.sort_unstable();
        named.dedup();
        Scoped {
            name: crate::proxy::balance::scoped_cookie_name(&l7.cookie_name, in_name, prefix),
            path: crate::proxy::balance::cookie_path(prefix).to_owned(),
            named,
            host,
        }
    };
    // Each cookie-sticky VIP with its cookie-sticky pools, in one order.
    let sticky: Vec<_> =
        vips.iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let l7 = v.l7.as_ref().filter(|l| l.mode == L7Mode::Http)?;
                let own = (l7.algorithm == Algorithm::Cookie)
                    .then(|| scoped(l7, None, None, &v.backends));
                let routes =
                    l7.routes.iter().filter(|r| r.algorithm == Algorithm::Cookie).map(|r| {
                        scoped(l7, r.host.as_deref(), r.path_prefix.as_deref(), &r.backends)
                    });
                let pools: Vec<Scoped> = own.into_iter().chain(routes).collect();
                (!pools.is_empty()).then_some((i, l7, pools))
            })
            .collect();
    // Whether a pool of `l7` takes the cookies `other` sets (signed with its cookie_secret).
    let takes = |l7: &L7, other: &L7| {
        l7.cookie_secret == other.cookie_secret
            || l7.cookie_secret_previous.as_ref() == Some(&other.cookie_secret)
    };
    for (k, (i, l7, pools)) in sticky.iter().enumerate() {
        for (j, other, other_pools) in &sticky[..k] {
            let (v, w) = (&vips[*i], &vips[*j]);
            let shared = match (&l7.cookie_domain, &other.cookie_domain) {
                (Some(d), Some(e)) if d == e => {
                    format!("if clients reach both by host names under {d} (both set Domain={d})")
                }
                (None, None) if v.address == w.address => format!(
                    "if clients reach both by one host name ({}, ports {} and {}: browsers keep cookies by host, whatever the port)",
                    v.address, w.port, v.port
                ),
                _ => continue,
            };
            let secrets = !(takes(l7, other) && takes(other, l7));
            let (mut names, mut backends) = (Vec::new(), false);
            for p in pools {
                let hosts = |q: &&Scoped| match (&p.host, &q.host) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                let same = other_pools
                    .iter()
                    .filter(|q| q.name == p.name && q.path == p.path)
                    .filter(hosts);
                for q in same {
                    if secrets || p.named != q.named {
                        backends |= p.named != q.named;
                        if !names.contains(&&p.name) {
                            names.push(&p.name);
                        }
                    }
                }
            }
            if names.is_empty() {
                continue;
            }
            let differ = match (secrets, backends) {
                (true, false) => "are signed with secrets the other does not take",
                (false, _) => "name different backends",
                (true, true) => {
                    "are signed with secrets the other does not take and name different backends"
                }
            };
            let names: Vec<String> = names.iter().map(|n| format!("`{}`", quoted(n))).collect();
            let cookies = if names.len() == 1 { "cookie" } else { "cookies" };
            cautions.push(Invalid(
                addresses_at[*i].clone(),
                format!(
                    "VIP `{}`: its sticky {cookies} {} and VIP `{}`'s are one to browsers {shared}, but {differ}: each VIP would take the other's cookie for nothing and set its own over it, so a client of both would go from backend to backend; give them the same cookie_secret (or one rotation's two secrets, swapped) and backends, or different cookie_name",
                    quoted(&v.name),
                    names.join(", "),
                    quoted(&w.name),
                ),
            ));
        }
    }
}

/// Is `s` an RFC 6265 cookie name: an RFC 9110 token (tchar only), which goes into `Set-Cookie`
/// as it is?
pub(super) fn cookie_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(crate::proxy::is_tchar)
}

/// `cookie_attributes` as checked: the text `Set-Cookie` gets after `HttpOnly`, and what the
/// rules of the cookie name's prefix need to know.
#[derive(Default)]
pub(super) struct CookieAttributes {
    /// Each attribute as `; Name` or `; Name=value`, names and SameSite values in their usual
    /// spelling.
    pub(super) text: String,
    /// `Secure` is set.
    secure: bool,
    /// The `Domain`, lowercase, if it is set.
    pub(super) domain: Option<String>,
    /// The `Max-Age`, in seconds, if it is set.
    pub(super) max_age: Option<u64>,
}

/// What `cookie_attributes` may hold, for errors.
const COOKIE_ATTRIBUTES: &str = "Secure, SameSite=Strict|Lax|None, Max-Age=<seconds>, Domain=<host> and Partitioned, separated by `;`, e.g. cookie_attributes = \"Secure; SameSite=None; Max-Age=86400\"";

/// Checks `cookie_attributes`: `;`-separated attributes among [`COOKIE_ATTRIBUTES`], each at
/// most once (names and SameSite values in any case, as browsers read them). Refused, with
/// what to write: what the proxy sets itself (`Path`, per pool; `HttpOnly`, always), `Expires`
/// (a fixed date, which every cookie would outlive once it has passed: `Max-Age` instead),
/// what a browser would ignore or drop the cookie for (`SameSite=None` or `Partitioned`
/// without `Secure`, `Max-Age=0`, a malformed value), and anything else.
pub(super) fn cookie_attributes(s: &str) -> Result<CookieAttributes, String> {
    let mut out = CookieAttributes::default();
    if s.trim_matches([' ', '\t']).is_empty() {
        return Ok(out);
    }
    let err = |m: String| Err(format!("cookie_attributes `{}`: {m}", quoted(s)));
    let mut seen: Vec<&str> = Vec::new();
    let (mut same_site_none, mut partitioned) = (false, false);
    for part in s.split(';') {
        let part = part.trim_matches([' ', '\t']);
        if part.is_empty() {
            return err(format!(
                "an empty attribute (a doubled or trailing `;`); write attributes among {COOKIE_ATTRIBUTES}"
            ));
        }
        let (name, value) = match part.split_once('=') {
            Some((n, v)) => (n.trim_matches([' ', '\t']), Some(v.trim_matches([' ', '\t']))),
            None => (part, None),
        };
        let name = match name.to_ascii_lowercase().as_str() {
            "secure" => "Secure",
            "samesite" => "SameSite",
            "max-age" => "Max-Age",
            "domain" => "Domain",
            "partitioned" => "Partitioned",
            "path" => {
                return err("`Path` is set by the proxy, for each pool the path its route takes (see cookie_name in docs/CONFIG.md); remove it".to_owned());
            }
            "expires" => {
                return err("`Expires` is a fixed date, which every cookie set after it would outlive; write Max-Age=<seconds> instead (e.g. Max-Age=86400 for a day)".to_owned());
            }
            "httponly" => {
                return err(
                    "`HttpOnly` is always set (scripts have no use for the cookie); remove it"
                        .to_owned(),
                );
            }
            _ => {
                return err(format!(
                    "unknown attribute `{}`; write attributes among {COOKIE_ATTRIBUTES}",
                    quoted(name)
                ));
            }
        };
        if seen.contains(&name) {
            return err(format!("`{name}` is given twice; write it once"));
        }
        seen.push(name);
        let value = match (name, value) {
            ("Secure" | "Partitioned", None) => None,
            ("Secure" | "Partitioned", Some(_)) => {
                return err(format!("`{name}` takes no value; write `{name}` alone"));
            }
            ("SameSite", v) => match v.map(str::to_ascii_lowercase).as_deref() {
                Some("strict") => Some("Strict".to_owned()),
                Some("lax") => Some("Lax".to_owned()),
                Some("none") => {
                    same_site_none = true;
                    Some("None".to_owned())
                }
                _ => {
                    return err(
                        "SameSite takes Strict, Lax or None; write e.g. `SameSite=Lax`".to_owned()
                    );
                }
            },
            ("Max-Age", v) => {
                let v = v.unwrap_or_default();
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return err(format!(
                        "Max-Age takes a whole number of seconds, not `{}`; write e.g. `Max-Age=86400` for a day",
                        quoted(v)
                    ));
                }
                match v.parse::<u64>() {
                    Ok(0) => {
                        return err("Max-Age=0 has browsers drop the cookie at once, so no client would stay; write the seconds it should last (e.g. `Max-Age=86400`), or leave Max-Age out for a cookie that lasts the browser session".to_owned());
                    }
                    Ok(n) => {
                        out.max_age = Some(n);
                        Some(n.to_string())
                    }
                    Err(_) => {
                        return err(format!(
                            "Max-Age={v} is too large; browsers keep a cookie 400 days at most (`Max-Age=34560000`)"
                        ));
                    }
                }
            }
            ("Domain", v) => {
                let v = v.unwrap_or_default();
                let host = v.strip_prefix('.').unwrap_or(v);
                let label_ok = |l: &str| {
                    (1..=63).contains(&l.len())
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                };
                if host.len() > 253 || !host.split('.').all(label_ok) {
                    return err(format!(
                        "Domain takes a host name (letters, digits, `-` and `.`; no scheme, port or path), not `{}`; write e.g. `Domain=example.com`",
                        quoted(v)
                    ));
                }
                out.domain = Some(host.to_ascii_lowercase());
                Some(host.to_owned())
            }
            _ => unreachable!("every name is matched above"),
        };
        match value {
            None => out.text.push_str(&format!("; {name}")),
            Some(v) => out.text.push_str(&format!("; {name}={v}")),
        }
        if name == "Secure" {
            out.secure = true;
        }
        partitioned |= name == "Partitioned";
    }
    if same_site_none && !out.secure {
        return err("browsers drop a SameSite=None cookie that is not Secure; write `Secure; SameSite=None` (the cookie then comes back only over HTTPS, which a proxy in front of edgelb ends)".to_owned());
    }
    if partitioned && !out.secure {
        return err(
            "browsers drop a Partitioned cookie that is not Secure; write `Secure; Partitioned`"
                .to_owned(),
        );
    }
    Ok(out)
}

/// Browsers keep a cookie whose name starts with `__Secure-` only if it is `Secure`, and one
/// starting with `__Host-` only if it is `Secure`, without `Domain` and with `Path=/` (RFC
/// 6265bis 4.1.3, prefixes in any case): a name the attributes or a route's cookie path would
/// have every such cookie dropped is refused, saying what to write.
pub(super) fn cookie_prefix_ok(
    name: &str,
    attributes: &CookieAttributes,
    l: &raw::L7,
    routes: &[raw::Sp<raw::Route>],
    algorithm: Algorithm,
) -> Result<(), Invalid> {
    let lower = name.to_ascii_lowercase();
    let host = lower.starts_with("__host-");
    if !host && !lower.starts_with("__secure-") {
        return Ok(());
    }
    let prefix = &name[..name.find('-').map_or(0, |i| i + 1)];
    // A prefixed name is never the default: cookie_name is written.
    let name_at = l.cookie_name.as_ref().map_or(0..0, |c| c.span());
    let attributes_at = l.cookie_attributes.as_ref().map(|a| a.span());
    if !attributes.secure {
        return bad(
            attributes_at.unwrap_or(name_at),
            format!(
                "cookie_name `{}`: browsers keep a cookie named `{prefix}...` only if it is Secure; add Secure to cookie_attributes (e.g. cookie_attributes = \"Secure\"), or name it without `{prefix}`",
                quoted(name)
            ),
        );
    }
    if host && attributes.domain.is_some() {
        return bad(
            attributes_at.unwrap_or(name_at),
            format!(
                "cookie_name `{}`: browsers keep a cookie named `{prefix}...` only without Domain; remove Domain from cookie_attributes, or name it `__Secure-...`",
                quoted(name)
            ),
        );
    }
    if host {
        for r in routes {
            let r = r.get_ref();
            let cookie = r
                .algorithm
                .as_ref()
                .map_or(algorithm == Algorithm::Cookie, |a| a.get_ref() == "cookie");
            let Some(p) = r.path_prefix.as_ref().filter(|_| cookie) else { continue };
            let path = crate::proxy::balance::cookie_path(Some(p.get_ref()));
            if path != "/" {
                return bad(
                    p.span(),
                    format!(
                        "cookie_name `{}`: browsers keep a cookie named `{prefix}...` only with Path=/, and this route's cookie has Path={} (its path_prefix cut back to the last `/`); name the cookies `__Secure-...`, which has no such rule",
                        quoted(name),
                        quoted(path)
                    ),
                );
            }
        }
    }
    Ok(())
}
