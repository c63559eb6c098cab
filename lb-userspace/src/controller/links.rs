//! What the kernel says of the attached interfaces that the config must agree with, looked at
//! at a start, at each reload and while edgelb runs: each interface's MTU against `node.mtu`
//! ([`super::mtu_mismatches`], every sample), and `node.gateway_mac` against the MAC the
//! kernel's neighbour table gives each interface's default-route gateway ([`gateway_macs`],
//! every [`GATEWAY_EVERY`]). Both can change under a running edgelb (`ip link set ... mtu`; a
//! router replaced, a failover without a virtual MAC), and nothing else would tell: the packets
//! are lost past the node (too big, or sent to a MAC nobody has) while the health checks,
//! through the kernel, stay green. Asked over netlink, in edgelb's own network namespace: sysfs
//! shows the namespace of whoever mounted it, which under `nsenter --net` is not edgelb's.

use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::{Controller, mtu_mismatches, same_warnings};
use crate::{
    config::{Config, Forwarding},
    dataplane::netlink::{self, Gateway, Neighbour},
};

/// How often `node.gateway_mac` is compared with the gateways' MACs: each look reads the
/// kernel's routes and neighbour entries whole, which on a busy router-facing node are many.
const GATEWAY_EVERY: Duration = Duration::from_secs(10);

/// What the controller last saw of the attached interfaces.
#[derive(Debug, Default)]
pub(super) struct LinkWatch {
    /// The GRO warnings of the last start or reload ([`super::gro_warnings`]): GRO is not
    /// looked at in between, and they are logged with the MTU ones.
    pub(super) gro: Vec<String>,
    /// (interface, MTU) as last read ([`link_mtus`]), for `edgelb_interface_mtu`.
    pub(super) mtus: Vec<(String, u32)>,
    /// Per interface, the MACs the neighbour table last gave its default-route gateways
    /// ([`gateway_macs`]). An interface whose gateways had none known (no default route on it,
    /// or an entry gone) keeps those of the last look that found some: an entry that expires
    /// says nothing of the gateway.
    gateway_seen: Vec<(String, Vec<[u8; 6]>)>,
    /// The mismatches last logged: (interface, `node.gateway_mac`, its gateways' MACs).
    gateway_reported: Vec<(String, [u8; 6], Vec<[u8; 6]>)>,
    /// When the gateways are next looked at; `None`: at the next sample (a start, a reload).
    gateway_due: Option<Instant>,
}

impl LinkWatch {
    /// What a start saw: the interfaces' MTUs (read before the controller exists, to warn
    /// before anything is attached); the gateways are looked at at the first sample.
    pub(super) fn new(mtus: Vec<(String, u32)>) -> LinkWatch {
        LinkWatch { mtus, ..Default::default() }
    }

    /// Has the gateways looked at again at the next sample: a reload may have changed
    /// `node.gateway_mac`, and the operator who fixed it waits for the error to clear.
    pub(super) fn look_at_gateways_now(&mut self) {
        self.gateway_due = None;
    }

    /// `edgelb_gateway_mac_mismatch`: (interface, whether `node.gateway_mac` is none of its
    /// gateways' MACs) for every interface of `cfg`, when its ipip VIPs use the gateway MAC
    /// ([`gateway_in_use`]); none otherwise.
    pub(super) fn gateway_mismatches(&self, cfg: &Config) -> Vec<(String, bool)> {
        if gateway_in_use(cfg).is_none() {
            return Vec::new();
        }
        let mismatched = |i: &String| self.gateway_reported.iter().any(|(r, ..)| r == i);
        cfg.node.interfaces.iter().map(|i| (i.clone(), mismatched(i))).collect()
    }
}

/// `node.gateway_mac`, when some packets go to it: those of an ipip VIP's backend without a
/// `mac` of its own.
fn gateway_in_use(cfg: &Config) -> Option<[u8; 6]> {
    let used = cfg
        .vips
        .iter()
        .any(|v| v.forwarding == Forwarding::Ipip && v.backends.iter().any(|b| b.mac.is_none()));
    cfg.node.gateway_mac.filter(|_| used)
}

/// The MACs the neighbour table gives the gateways of the default routes (`gateways`) that
/// leave by the interface of index `ifindex`, each once: the router XDP's encapsulated packets
/// go to when their backend has no `mac`. Empty when none is known.
pub(super) fn gateway_macs(
    ifindex: u32,
    gateways: &[Gateway],
    neighbours: &[Neighbour],
) -> Vec<[u8; 6]> {
    let mut macs: Vec<[u8; 6]> = gateways
        .iter()
        .filter(|g| g.ifindex == ifindex)
        .filter_map(|g| neighbours.iter().find(|n| n.ifindex == ifindex && n.address == g.address))
        .map(|n| n.lladdr)
        .collect();
    macs.sort_unstable();
    macs.dedup();
    macs
}

/// A MAC as `ip` and the config write it.
fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The error logged when `node.gateway_mac` (`configured`) is none of the MACs (`seen`) the
/// kernel gives the default-route gateways on `interface`.
pub(super) fn gateway_mismatch_message(
    interface: &str,
    configured: &[u8; 6],
    seen: &[[u8; 6]],
) -> String {
    let seen: Vec<String> = seen.iter().map(mac_text).collect();
    let fix = match seen.as_slice() {
        [one] => format!("node.gateway_mac = \"{one}\""),
        _ => "node.gateway_mac to the gateway's MAC".to_owned(),
    };
    format!(
        "node.gateway_mac is {}, but the kernel's neighbour table gives the default-route gateway on {interface} {}: ipip packets to backends without a `mac` of their own go to a MAC that is not the gateway's (a router replaced, a failover without a virtual MAC?) and are lost past the node, while the health checks, which go through the kernel, stay up. If the gateway is right, set {fix} and `edgelb reload` (edgelb does not rewrite it itself)",
        mac_text(configured),
        seen.join(", ")
    )
}

/// The MTU of each interface of `node.interfaces`, as the kernel gives it in this network
/// namespace ([`netlink::link_info`]). One that is not there (deleted, renamed) is left out;
/// one that could not be asked (out of descriptors) keeps its MTU in `last`: a failed lookup
/// says nothing of the interface, and the warnings must not come and go with it.
pub(super) fn link_mtus(cfg: &Config, last: &[(String, u32)]) -> Vec<(String, u32)> {
    cfg.node
        .interfaces
        .iter()
        .filter_map(|i| match netlink::link_info(i) {
            Ok(info) => Some((i.clone(), info?.mtu)),
            Err(_) => last.iter().find(|(l, _)| l == i).cloned(),
        })
        .collect()
}

impl Controller {
    /// At each sample (and at a reload): reads the interfaces' MTUs again, and logs the MTU
    /// and GRO warnings when they differ from those last logged ([`Controller::log_link_warnings`]):
    /// an MTU lowered under a running edgelb below `node.mtu` is said within a second.
    pub(super) fn watch_links(&mut self) {
        self.links.mtus = link_mtus(&self.cfg, &self.links.mtus);
        let mut now = mtu_mismatches(&self.cfg, &self.links.mtus);
        now.extend(self.links.gro.iter().cloned());
        self.log_link_warnings(now);
        let at = Instant::now();
        if self.links.gateway_due.is_none_or(|due| at >= due) {
            self.links.gateway_due = Some(at + GATEWAY_EVERY);
            self.watch_gateway();
        }
    }

    /// Compares `node.gateway_mac`, when it is used ([`gateway_in_use`]), with the MACs the
    /// kernel gives each interface's default-route gateways ([`gateway_macs`]): logs an error
    /// once when it is none of them (and again when they change), and that it is again when it
    /// is. Nothing is rewritten: the MAC in the file is the operator's to fix (a neighbour
    /// entry can be spoofed; a rewrite would follow it).
    fn watch_gateway(&mut self) {
        let Some(configured) = gateway_in_use(&self.cfg) else {
            self.links.gateway_seen.clear();
            self.links.gateway_reported.clear();
            return;
        };
        let tables = netlink::default_gateways().and_then(|g| Ok((g, netlink::neighbours()?)));
        let (gateways, neighbours) = match tables {
            Ok(t) => t,
            Err(e) => {
                // Out of descriptors, most likely: said where that is; the last look stands.
                debug!(error = %e, "reading the routes and neighbours to check node.gateway_mac");
                return;
            }
        };
        for interface in &self.cfg.node.interfaces {
            let Ok(Some(link)) = netlink::link_info(interface) else { continue };
            let macs = gateway_macs(link.index, &gateways, &neighbours);
            if macs.is_empty() {
                continue;
            }
            let seen = &mut self.links.gateway_seen;
            match seen.iter_mut().find(|(i, _)| i == interface) {
                Some((_, m)) => *m = macs,
                None => seen.push((interface.clone(), macs)),
            }
        }
        let now: Vec<(String, [u8; 6], Vec<[u8; 6]>)> = self
            .links
            .gateway_seen
            .iter()
            .filter(|(i, macs)| self.cfg.node.interfaces.contains(i) && !macs.contains(&configured))
            .map(|(i, macs)| (i.clone(), configured, macs.clone()))
            .collect();
        for (interface, configured, seen) in
            now.iter().filter(|m| !self.links.gateway_reported.contains(m))
        {
            error!(%interface, "{}", gateway_mismatch_message(interface, configured, seen));
        }
        for (interface, ..) in &self.links.gateway_reported {
            if !now.iter().any(|(i, ..)| i == interface) {
                info!(%interface, gateway_mac = %mac_text(&configured), "node.gateway_mac is the MAC the kernel gives the default-route gateway on this interface again");
            }
        }
        self.links.gateway_reported = now;
    }

    /// Logs the MTU and GRO warnings `now`, when they are not those last logged
    /// ([`same_warnings`]): all of them, so that the last ones in the log are those in force,
    /// or that none is left. Hundreds of reloads, or a sample every second, do not fill the log
    /// with the same lines.
    pub(super) fn log_link_warnings(&mut self, now: Vec<String>) {
        if same_warnings(&self.link_warnings, &now) {
            return;
        }
        for w in &now {
            warn!("{w}");
        }
        if now.is_empty() {
            info!("the MTU and GRO warnings logged before no longer apply");
        }
        self.link_warnings = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("t.toml")).expect("valid test config")
    }

    /// The gateways' MACs are those of the neighbour entries of the default routes' gateways
    /// on that interface, each once; another interface's gateway, or an entry of the same
    /// address on another interface, is not this one's.
    #[test]
    fn the_gateway_macs_are_those_of_the_default_routes_on_the_interface() {
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
        let gateways = [
            Gateway { ifindex: 7, address: ip("198.18.64.1") },
            Gateway { ifindex: 7, address: ip("fe80::1") },
            Gateway { ifindex: 8, address: ip("198.18.65.1") },
        ];
        let (a, b, c) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb], [2, 0, 0, 0, 0, 0xc]);
        let n =
            |ifindex, address: &str, lladdr| Neighbour { ifindex, address: ip(address), lladdr };
        let neighbours = [
            n(7, "198.18.64.1", b),
            n(7, "fe80::1", b),
            n(7, "198.18.64.9", c),
            n(8, "198.18.64.1", c),
            n(8, "198.18.65.1", a),
        ];
        assert_eq!(gateway_macs(7, &gateways, &neighbours), [b]);
        assert_eq!(gateway_macs(8, &gateways, &neighbours), [a]);
        assert_eq!(gateway_macs(9, &gateways, &neighbours), Vec::<[u8; 6]>::new());
        let other = [n(7, "fe80::1", a), n(7, "198.18.64.1", b)];
        assert_eq!(gateway_macs(7, &gateways, &other), [a, b]);
    }

    /// The gateway MAC is checked only while some ipip backend goes to it; the error names
    /// both MACs, the interface, and the line to write when there is one gateway MAC.
    #[test]
    fn the_gateway_mac_is_checked_when_used_and_the_error_names_both() {
        let node = "[node]\ninterfaces = [\"eth0\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:01\"\n";
        let vip = |backend: &str| {
            format!("[[vip]]\nname = \"v\"\naddress = \"198.18.1.1\"\nbackends = [{backend}]\n")
        };
        let used = parse(&format!("{node}{}", vip("{ address = \"198.18.0.11\" }")));
        assert_eq!(gateway_in_use(&used), Some([2, 0, 0, 0, 0, 1]));
        let own = "{ address = \"198.18.0.11\", mac = \"02:00:00:00:00:11\" }";
        assert_eq!(gateway_in_use(&parse(&format!("{node}{}", vip(own)))), None);
        let watch = LinkWatch::default();
        assert_eq!(watch.gateway_mismatches(&used), [("eth0".to_owned(), false)]);
        let m = gateway_mismatch_message("eth0", &[2, 0, 0, 0, 0, 1], &[[2, 0xab, 0, 0, 0, 0xfe]]);
        assert!(
            m.starts_with("node.gateway_mac is 02:00:00:00:00:01")
                && m.contains("default-route gateway on eth0 02:ab:00:00:00:fe")
                && m.contains("set node.gateway_mac = \"02:ab:00:00:00:fe\" and `edgelb reload`"),
            "{m}"
        );
        let m = gateway_mismatch_message(
            "eth0",
            &[2, 0, 0, 0, 0, 1],
            &[[2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]],
        );
        assert!(
            m.contains("02:00:00:00:00:02, 02:00:00:00:00:03")
                && m.contains("to the gateway's MAC"),
            "{m}"
        );
    }
}
