//! A VIP's `[vip.health]` check ([`health_check`]): its kind and the keys that kind reads
//! (a key of another kind's probe is refused, not silently ignored), a UDP probe's payload in
//! text or hex, the port probed, and a probe kind that cannot fit the VIP's protocol; and the
//! probes a second of every check together ([`probe_rate_ok`]), which each cost this node a
//! connection and the controller an event.

use std::{ops::Range, time::Duration};

use super::{
    CheckKind, HealthCheck, PROBE_RATE_CAUTION, PROBE_RATE_MAX, Protocol,
    limits::setting,
    message::{Invalid, bad, quoted},
    raw,
};

/// Adds a caution when the health checks of every VIP together probe more than
/// [`PROBE_RATE_CAUTION`] times a second, and refuses them over [`PROBE_RATE_MAX`]; `rates`
/// holds each checked VIP's probes a second, where its interval is written and its name. Either
/// is said at the VIP that probes most.
pub(super) fn probe_rate_ok(
    rates: &[(f64, Range<usize>, String)],
    cautions: &mut Vec<Invalid>,
) -> Result<(), Invalid> {
    let total: f64 = rates.iter().map(|(r, ..)| r).sum();
    if total <= PROBE_RATE_CAUTION {
        return Ok(());
    }
    // The first of those that probe most: `max_by` keeps the last of equals.
    let Some((rate, at, name)) = rates.iter().rev().max_by(|a, b| a.0.total_cmp(&b.0)) else {
        return Ok(());
    };
    let limit = if total > PROBE_RATE_MAX { PROBE_RATE_MAX } else { PROBE_RATE_CAUTION };
    let said = Invalid(
        at.clone(),
        format!(
            "VIP `{}`: the health checks of every VIP together make about {total:.0} probes a second, more than {limit:.0} (this VIP's, {rate:.0} a second, the most): each probe is a connection from this node and an event the controller takes in between reloads, scrapes and admin commands; raise interval_ms (2000 by default), or check fewer backends",
            quoted(name)
        ),
    );
    if total > PROBE_RATE_MAX {
        return Err(said);
    }
    cautions.push(said);
    Ok(())
}

/// Text that may go into a request line or header as it is: visible ASCII only (no spaces, no
/// CR or LF that would end the line early).
fn request_text(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// The bytes `text` spells in hex: two digits a byte, either case, spaces between bytes allowed
/// (`"ab12 0100"`); the error says what is wrong and where.
fn hex_bytes(text: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(text.len() / 2);
    let mut chars = text.char_indices();
    let digit = |c: char| {
        c.to_digit(16)
            .ok_or_else(|| format!("`{}` is not a hex digit (0-9, a-f)", quoted(&c.to_string())))
    };
    while let Some((at, high)) = chars.next() {
        // Spaces between bytes, not within one: `a b` is a typo, not the byte 0xab.
        if high.is_ascii_whitespace() {
            continue;
        }
        match chars.next() {
            Some((_, low)) if !low.is_ascii_whitespace() => {
                bytes.push((digit(high)? * 16 + digit(low)?) as u8);
            }
            _ => {
                return Err(format!(
                    "`{}` at {at} has no second digit: two digits a byte",
                    quoted(&high.to_string())
                ));
            }
        }
    }
    if bytes.is_empty() {
        return Err("no bytes".to_owned());
    }
    Ok(bytes)
}

/// The largest UDP payload one IPv4 datagram carries: the bound on a udp probe's `send` and
/// `expect` (the checker reads answers of up to this size whole).
pub const MAX_UDP_PROBE: usize = 65_507;

/// The check a `[vip.health]` table describes, of VIP `vip_name`; without health.port, probes go
/// to `vip_port` (an XDP VIP's), or with None to each backend's own port (an L7 VIP's). A check
/// that is accepted but likely fails every probe adds to `cautions`.
pub(super) fn health_check(
    h: &raw::Sp<raw::Health>,
    vip_name: &str,
    vip_port: Option<u16>,
    protocol: Protocol,
    cautions: &mut Vec<Invalid>,
) -> Result<HealthCheck, Invalid> {
    let span = h.span();
    let h = h.get_ref();
    let get = |v: &Option<raw::Sp<String>>| v.as_ref().map(|s| s.get_ref().clone());
    let kind = match h.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
        None if protocol == Protocol::Udp => "udp",
        None => "tcp",
        Some((k @ ("tcp" | "http" | "udp"), _)) => k,
        Some((other, span)) => {
            return bad(
                span,
                format!("health kind `{}`: expected tcp, http or udp", quoted(other)),
            );
        }
    };
    // Keys of another kind's probe would be silently ignored.
    let key = |v: Option<Range<usize>>, key: &'static str, of: &'static str| {
        v.filter(|_| kind != of).map(|s| (s, key, of))
    };
    let other_kind = [
        key(h.path.as_ref().map(|v| v.span()), "path", "http"),
        key(h.host.as_ref().map(|v| v.span()), "host", "http"),
        key(h.expect_status.as_ref().map(|v| v.span()), "expect_status", "http"),
        key(h.expect_body.as_ref().map(|v| v.span()), "expect_body", "http"),
        key(h.send.as_ref().map(|v| v.span()), "send", "udp"),
        key(h.expect.as_ref().map(|v| v.span()), "expect", "udp"),
        key(h.send_hex.as_ref().map(|v| v.span()), "send_hex", "udp"),
        key(h.expect_hex.as_ref().map(|v| v.span()), "expect_hex", "udp"),
    ];
    if let Some((span, key, of)) = other_kind.into_iter().flatten().next() {
        return bad(
            span,
            format!(
                "health `{key}` applies only to kind = \"{of}\", and this check is kind = \"{kind}\"{}: remove it, or set kind = \"{of}\"",
                match (&h.kind, protocol) {
                    (Some(_), _) => "",
                    (None, Protocol::Tcp) => " (the default for a TCP VIP)",
                    (None, Protocol::Udp) => " (the default for a UDP VIP)",
                }
            ),
        );
    }
    let kind = match kind {
        "tcp" => CheckKind::Tcp,
        "http" => CheckKind::Http {
            path: match &h.path {
                None => "/".to_owned(),
                Some(p) if p.get_ref().starts_with('/') && request_text(p.get_ref()) => {
                    p.get_ref().clone()
                }
                Some(p) => {
                    return bad(
                        p.span(),
                        "health.path must be a path starting with `/`, without spaces or control characters",
                    );
                }
            },
            host: match &h.host {
                Some(v) if !request_text(v.get_ref()) || v.get_ref().is_empty() => {
                    return bad(
                        v.span(),
                        "health.host must be a host name, without spaces or control characters",
                    );
                }
                v => v.as_ref().map(|v| v.get_ref().clone()),
            },
            expect_status: setting(&h.expect_status, 200, "expect_status")?,
            expect_body: get(&h.expect_body),
        },
        _ => {
            // One datagram each way: what IPv4 carries in one (65 535 − 20 − 8 bytes). Text
            // (`send`) or bytes in hex (`send_hex`), one of the two.
            let datagram = |text: &Option<raw::Sp<String>>,
                            hex: &Option<raw::Sp<String>>,
                            key: &str,
                            why: &str|
             -> Result<Option<Vec<u8>>, Invalid> {
                let (v, bytes) = match (text, hex) {
                    (Some(_), Some(h)) => {
                        return bad(
                            h.span(),
                            format!(
                                "health.{key} and health.{key}_hex both given: write the payload once"
                            ),
                        );
                    }
                    (Some(t), None) => (t, t.get_ref().as_bytes().to_vec()),
                    (None, Some(h)) => (
                        h,
                        hex_bytes(h.get_ref())
                            .or_else(|e| bad(h.span(), format!("health.{key}_hex: {e}")))?,
                    ),
                    (None, None) => return Ok(None),
                };
                if bytes.len() > MAX_UDP_PROBE {
                    return bad(
                        v.span(),
                        format!(
                            "health.{key} is {} bytes, more than one UDP datagram carries ({MAX_UDP_PROBE}): {why}",
                            bytes.len()
                        ),
                    );
                }
                Ok(Some(bytes))
            };
            match datagram(&h.send, &h.send_hex, "send", "every probe would fail")? {
                Some(send) => CheckKind::Udp {
                    send,
                    expect: datagram(
                        &h.expect,
                        &h.expect_hex,
                        "expect",
                        "no answer could hold it",
                    )?,
                },
                None => {
                    return bad(
                        span,
                        "a udp health check needs `send` or `send_hex` (the probe payload)",
                    );
                }
            }
        }
    };
    // A UDP probe of a TCP VIP's own port finds no UDP service there: every probe fails, and
    // the VIP fails open. A `port` written is the operator's word that a UDP responder answers
    // there, even one the backends serve TCP on: DNS answers UDP and TCP on 53, and QUIC answers
    // UDP on 443 beside HTTPS.
    let written = h.port.as_ref().map(|p| *p.get_ref());
    if matches!(kind, CheckKind::Udp { .. }) && protocol == Protocol::Tcp && written.is_none() {
        return bad(
            h.kind.as_ref().map_or(span.clone(), |k| k.span()),
            "health kind = \"udp\" on a tcp VIP probes its backends' TCP port with UDP, which nothing answers: use kind = \"tcp\" or \"http\", or set `port` to where a UDP responder answers",
        );
    }
    // The reverse: a TCP (or HTTP) probe of a UDP VIP goes to its UDP port, where a UDP-only
    // service (QUIC, syslog, WireGuard) refuses it: every probe fails, and the VIP fails open
    // without a word. Only the operator knows whether a TCP service answers there too (DNS's
    // does, on 53), and such files worked before this was noticed: a caution, not a refusal.
    if !matches!(kind, CheckKind::Udp { .. }) && protocol == Protocol::Udp && written.is_none() {
        let k = if matches!(kind, CheckKind::Tcp) { "tcp" } else { "http" };
        cautions.push(Invalid(
            h.kind.as_ref().map_or(span.clone(), |k| k.span()),
            format!(
                "VIP `{}`: health kind = \"{k}\" on a udp VIP has no `port`: it probes the VIP's UDP port over TCP, which a UDP-only service (QUIC, syslog, WireGuard) never answers, so every backend would fail and the VIP fail open; set `port` to where the backends answer {} (port = 53 for DNS over TCP), or use kind = \"udp\"",
                quoted(vip_name),
                k.to_uppercase()
            ),
        ));
    }
    let port = match (&h.port, vip_port) {
        (Some(p), _) if *p.get_ref() == 0 => return bad(p.span(), "health.port must be 1..=65535"),
        (Some(p), _) => *p.get_ref(),
        (None, Some(0)) => {
            return bad(span, "health.port is required when the VIP serves any port");
        }
        (None, Some(p)) => p,
        // Each backend's own port.
        (None, None) => 0,
    };
    let interval = setting(&h.interval_ms, 2_000, "interval_ms")?;
    let timeout = setting(&h.timeout_ms, interval.min(1_000), "timeout_ms")?;
    if timeout > interval {
        return bad(
            h.timeout_ms.as_ref().map_or(span.clone(), |t| t.span()),
            "timeout_ms must not exceed interval_ms",
        );
    }
    Ok(HealthCheck {
        kind,
        port,
        interval: Duration::from_millis(interval),
        timeout: Duration::from_millis(timeout),
        rise: setting(&h.rise, 2, "rise")?,
        fall: setting(&h.fall, 3, "fall")?,
        proxy_protocol: None,
    })
}
