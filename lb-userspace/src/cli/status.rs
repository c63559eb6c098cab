//! `edgelb status`: the running controller's VIPs, backends, health and counters, as a table or
//! as JSON.

use std::fmt::{self, Write as _};

use super::{AdminTarget, Ending, call};
use crate::admin::{BackendStatus, Request, Status};

/// `edgelb status`: the running controller's status, as [`status_text`] writes it or (`json`)
/// as pretty JSON (its byte rate under both names, [`Status::renamed_fields`]), with a note on
/// stderr when the running build is not this one ([`build_line`]); or the ending of a failed
/// [`call`].
pub fn status(target: &AdminTarget, json: bool) -> Ending {
    let mine = crate::build::VERSION_LINE;
    match call(target, &Request::Status) {
        Ok(resp) => {
            let status = resp.status.unwrap_or_default().renamed_fields();
            if !json {
                return Ending::new(0).out(status_text(&status, mine));
            }
            let end = Ending::new(0)
                .out(serde_json::to_string_pretty(&status).expect("status serialises"));
            match status.build.as_deref() {
                Some(running) if running == mine => end,
                _ => end.err(format!("edgelb: {}", build_line(status.build.as_deref(), mine))),
            }
        }
        Err(end) => end,
    }
}

/// The line of `edgelb status` that says the running controller's build, and, when it is not
/// `mine` (this CLI's build, [`crate::build::VERSION_LINE`]), this one's too: after an upgrade
/// the old process may still be the one running (a takeover that did not happen, a restart not
/// made yet). An older controller, which does not say its build, is not this one.
pub fn build_line(running: Option<&str>, mine: &str) -> String {
    match running {
        Some(running) if running == mine => format!("build {running}"),
        Some(running) => format!("build {running}; this edgelb is {mine}, another build"),
        None => {
            format!("build unknown (an older edgelb, which does not say it); this edgelb is {mine}")
        }
    }
}

/// The table `edgelb status` prints (without a newline at the end): the config, the running
/// build ([`build_line`], `mine` being this CLI's), interfaces and connection table, then each
/// VIP with its counters and its backends' rows.
pub fn status_text(s: &Status, mine: &str) -> String {
    let mut out = String::new();
    write_status(&mut out, s, mine).expect("writing to a String");
    if out.ends_with('\n') {
        out.pop();
    }
    out
}

/// Writes [`status_text`]'s lines to `out`.
fn write_status(out: &mut String, s: &Status, mine: &str) -> fmt::Result {
    writeln!(out, "config {}", s.config.display())?;
    writeln!(out, "{}", build_line(s.build.as_deref(), mine))?;
    for (iface, mode) in &s.interfaces {
        writeln!(out, "interface {iface}: XDP {mode}")?;
    }
    let ct = &s.conntrack;
    writeln!(
        out,
        "connection table: {} CPUs × ({} IPv4 + {} IPv6 flows); {} evicted from full buckets, {} found on another CPU, {} established TCP flows missing (pushed out before they ended), {} searches of the other CPUs skipped (budget spent)",
        ct.cpus,
        ct.v4_flows_per_cpu,
        ct.v6_flows_per_cpu,
        ct.evicted,
        ct.found_on_other_cpu,
        ct.missed_established,
        ct.search_skipped
    )?;
    for v in &s.vips {
        writeln!(out)?;
        let head = format!(
            "VIP {} [{}{}]{}",
            v.listen,
            v.forwarding,
            if v.conntrack { "" } else { ", no connection table" },
            if v.fail_open { "  FAIL-OPEN (all backends down)" } else { "" },
        );
        let health = |b: &BackendStatus| match (b.healthy, b.passive_down) {
            (false, _) => "DOWN",
            (true, true) => "FAILING",
            (true, false) => "up",
        };
        let drained = |b: &BackendStatus| if b.drained { "yes" } else { "no" };
        if v.forwarding == "l7" {
            // XDP passes an L7 VIP's traffic to the kernel uncounted: its packet, byte and flow
            // counters, rates and ring shares are all 0. What moves is the proxy's count of
            // requests (TCP mode: connections), route pools' included (an older edgelb's answer
            // has no total of its own: the rows' sum, then).
            let rows: u64 = v.backends.iter().map(|b| b.l7_requests).sum();
            let requests = v.l7_requests.max(rows);
            writeln!(out, "{head}  requests {requests}")?;
            writeln!(
                out,
                "  {:<40} {:>6} {:>7} {:>8} {:>12} {:>9}",
                "BACKEND", "WEIGHT", "HEALTH", "DRAINED", "REQUESTS", "IN FLIGHT"
            )?;
            let write_rows = |out: &mut String, backends: &[BackendStatus]| -> fmt::Result {
                for b in backends {
                    writeln!(
                        out,
                        "  {:<40} {:>6} {:>7} {:>8} {:>12} {:>9}",
                        // Its address and port: one address may serve on several.
                        std::net::SocketAddr::new(b.address, b.port).to_string(),
                        b.weight,
                        health(b),
                        drained(b),
                        b.l7_requests,
                        // An older edgelb's answer has no count: unknown, not 0.
                        b.l7_in_flight.map_or_else(|| "-".to_owned(), |n| n.to_string())
                    )?;
                }
                Ok(())
            };
            write_rows(out, &v.backends)?;
            // Each route's pool under a line naming what it matches, in the same columns (a
            // route pool ejected by passive health shows FAILING, as the VIP's own would).
            for r in &v.routes {
                writeln!(
                    out,
                    "  route host {} path {}",
                    r.host.as_deref().unwrap_or("(any)"),
                    r.path_prefix.as_deref().unwrap_or("(any)")
                )?;
                write_rows(out, &r.backends)?;
            }
            continue;
        }
        writeln!(
            out,
            "{head}  packets {}  bytes {}  new flows {}  now {:.0} pkt/s {:.0} B/s",
            v.packets, v.bytes, v.new_flows, v.pps, v.bytes_per_s
        )?;
        writeln!(
            out,
            "  {:<40} {:>6} {:>7} {:>8} {:>7} {:>12} {:>14} {:>10} {:>10}",
            "BACKEND",
            "WEIGHT",
            "HEALTH",
            "DRAINED",
            "RING%",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "PKT/S"
        )?;
        for b in &v.backends {
            writeln!(
                out,
                "  {:<40} {:>6} {:>7} {:>8} {:>7.2} {:>12} {:>14} {:>10} {:>10.0}",
                b.address.to_string(),
                b.weight,
                health(b),
                drained(b),
                b.ring_share * 100.0,
                b.packets,
                b.bytes,
                b.new_flows,
                b.pps
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{ConntrackStatus, RouteStatus, VipStatus};

    fn backend(address: &str, port: u16) -> BackendStatus {
        BackendStatus::new(address.parse().unwrap(), port, 1)
    }

    /// The table for a fixed status: an XDP VIP's rows with ring shares and counters, an L7
    /// VIP's with requests and in-flight counts ("-" for an older edgelb's answer without
    /// them), then each route's pool under a line naming what it matches, health as up /
    /// FAILING / DOWN, and the VIP total at least its rows' sum.
    #[test]
    fn the_status_table_of_a_fixed_status() {
        let mine = "edgelb 0.1.0 (abc1234)";
        let s = Status {
            build: Some(mine.to_owned()),
            config: "/etc/edgelb/edgelb.toml".into(),
            interfaces: vec![("eth0".into(), "native".into())],
            conntrack: ConntrackStatus {
                cpus: 2,
                v4_flows_per_cpu: 131_072,
                v6_flows_per_cpu: 65_536,
                evicted: 3,
                found_on_other_cpu: 4,
                missed_established: 5,
                search_skipped: 6,
            },
            vips: vec![
                VipStatus {
                    listen: "web (198.18.1.1:80/tcp)".into(),
                    forwarding: "ipip".into(),
                    conntrack: true,
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                    pps: 1.4,
                    bytes_per_s: 140.6,
                    fail_open: true,
                    backends: vec![
                        BackendStatus {
                            ring_share: 0.5,
                            packets: 10,
                            bytes: 1000,
                            new_flows: 2,
                            pps: 1.4,
                            healthy: false,
                            ..backend("198.18.0.11", 80)
                        },
                        BackendStatus { drained: true, ..backend("198.18.0.12", 80) },
                    ],
                    ..VipStatus::default()
                },
                VipStatus {
                    listen: "api (198.18.1.2:80/tcp)".into(),
                    forwarding: "l7".into(),
                    conntrack: false,
                    l7_requests: 5,
                    backends: vec![
                        BackendStatus {
                            l7_requests: 7,
                            l7_in_flight: Some(2),
                            passive_down: true,
                            ..backend("198.18.0.21", 8080)
                        },
                        backend("198.18.0.21", 8081),
                    ],
                    routes: vec![
                        RouteStatus {
                            host: Some("api.example".into()),
                            path_prefix: Some("/v2/".into()),
                            backends: vec![BackendStatus {
                                l7_requests: 3,
                                l7_in_flight: Some(0),
                                passive_down: true,
                                ..backend("198.18.0.31", 8080)
                            }],
                        },
                        RouteStatus {
                            path_prefix: Some("/static/".into()),
                            backends: vec![backend("198.18.0.32", 80)],
                            ..RouteStatus::default()
                        },
                    ],
                    ..VipStatus::default()
                },
            ],
        };
        let want = [
            "config /etc/edgelb/edgelb.toml",
            "build edgelb 0.1.0 (abc1234)",
            "interface eth0: XDP native",
            "connection table: 2 CPUs × (131072 IPv4 + 65536 IPv6 flows); 3 evicted from full buckets, 4 found on another CPU, 5 established TCP flows missing (pushed out before they ended), 6 searches of the other CPUs skipped (budget spent)",
            "",
            "VIP web (198.18.1.1:80/tcp) [ipip]  FAIL-OPEN (all backends down)  packets 10  bytes 1000  new flows 2  now 1 pkt/s 141 B/s",
            "  BACKEND                                  WEIGHT  HEALTH  DRAINED   RING%      PACKETS          BYTES  NEW FLOWS      PKT/S",
            "  198.18.0.11                                   1    DOWN       no   50.00           10           1000          2          1",
            "  198.18.0.12                                   1      up      yes    0.00            0              0          0          0",
            "",
            "VIP api (198.18.1.2:80/tcp) [l7, no connection table]  requests 7",
            "  BACKEND                                  WEIGHT  HEALTH  DRAINED     REQUESTS IN FLIGHT",
            "  198.18.0.21:8080                              1 FAILING       no            7         2",
            "  198.18.0.21:8081                              1      up       no            0         -",
            "  route host api.example path /v2/",
            "  198.18.0.31:8080                              1 FAILING       no            3         0",
            "  route host (any) path /static/",
            "  198.18.0.32:80                                1      up       no            0         -",
        ]
        .join("\n");
        assert_eq!(status_text(&s, mine), want);
    }

    /// The build line says the running build, and this CLI's when it is another (or not said,
    /// by an older controller): after an upgrade, the old process may still run.
    #[test]
    fn the_status_says_when_the_running_build_is_not_this_one() {
        let mine = "edgelb 0.2.0 (def5678)";
        let line = |running| build_line(running, mine);
        assert_eq!(line(Some(mine)), "build edgelb 0.2.0 (def5678)");
        assert_eq!(
            line(Some("edgelb 0.1.0 (abc1234-dirty)")),
            "build edgelb 0.1.0 (abc1234-dirty); this edgelb is edgelb 0.2.0 (def5678), another build"
        );
        assert_eq!(
            line(None),
            "build unknown (an older edgelb, which does not say it); this edgelb is edgelb 0.2.0 (def5678)"
        );
        // An older controller's answer, without the field, reads as not said; this one's
        // carries it, and `--json` shows it only when said.
        let older: Status =
            serde_json::from_str(r#"{"config":"/e.toml","interfaces":[],"vips":[]}"#)
                .expect("an older answer parses");
        assert_eq!(older.build, None);
        assert!(!serde_json::to_string(&older).unwrap().contains("build"));
        let text = status_text(&older, mine);
        assert_eq!(text.lines().nth(1), Some(line(None).as_str()), "{text}");
        let ours = Status { build: Some(mine.to_owned()), ..older };
        let json = serde_json::to_string(&ours).unwrap();
        assert!(json.starts_with(r#"{"build":"edgelb 0.2.0 (def5678)","config""#), "{json}");
    }
}
