//! What the kernel says of the attached interfaces that the config must agree with, looked at
//! at a start, at each reload and every sample while edgelb runs: each interface's MTU against
//! `node.mtu` ([`super::mtu_mismatches`]). It can change under a running edgelb (`ip link set
//! ... mtu`), and nothing else would tell: encapsulated packets between the two sizes are
//! dropped past the node without an ICMP error, while the health checks, through the kernel,
//! stay green. Asked over netlink, in edgelb's own network namespace: sysfs shows the
//! namespace of whoever mounted it, which under `nsenter --net` is not edgelb's.

use tracing::{info, warn};

use super::{Controller, mtu_mismatches, same_warnings};
use crate::{config::Config, dataplane::netlink};

/// What the controller last saw of the attached interfaces.
#[derive(Debug, Default)]
pub(super) struct LinkWatch {
    /// The GRO warnings of the last start or reload ([`super::gro_warnings`]): GRO is not
    /// looked at in between, and they are logged with the MTU ones.
    pub(super) gro: Vec<String>,
    /// (interface, MTU) as last read ([`link_mtus`]), for `edgelb_interface_mtu`.
    pub(super) mtus: Vec<(String, u32)>,
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
