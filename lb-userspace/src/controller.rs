//! `edgelb run`: load, fill the maps, attach, then serve until told to stop.
//!
//! SIGHUP reloads the config file: the new file is validated first, and a bad one is logged and
//! ignored, so the running config stays. SIGINT/SIGTERM stop the process (detaching XDP).

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{error, info};

use crate::{
    config::Config,
    dataplane::{Dataplane, DataplaneError},
};

/// Why `run` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config could not be loaded.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data path failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// How often the counters are logged (only when they changed).
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Runs the balancer with the config at `path` until SIGINT or SIGTERM.
pub fn run(path: &Path) -> Result<(), RunError> {
    let mut cfg = Config::load(path)?;
    let mut dp = Dataplane::load()?;
    // Maps first, then attach: the first packet already sees the whole config.
    let report = dp.apply(&cfg)?;
    info!(?report, "maps filled");
    for iface in cfg.node.interfaces.clone() {
        let mode = dp.attach(&iface, cfg.node.xdp_mode)?;
        info!(interface = %iface, mode, "XDP balancer attached");
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(RunError::Signals)?;
    let mut last = HashMap::new();
    let mut next_report = Instant::now() + REPORT_EVERY;
    loop {
        for sig in signals.pending() {
            match sig {
                SIGHUP => match Config::load(path) {
                    Ok(new) if new.node.interfaces != cfg.node.interfaces => {
                        error!(
                            "reload rejected: node.interfaces changed (restart to change them); running config kept"
                        );
                    }
                    Ok(new) => match dp.apply(&new) {
                        Ok(report) => {
                            info!(?report, "config reloaded");
                            cfg = new;
                        }
                        Err(e) => {
                            error!(error = %e, "applying the new config failed; maps may be partly updated, retry the reload")
                        }
                    },
                    Err(e) => error!(error = %e, "reload rejected, running config kept"),
                },
                _ => {
                    info!(signal = sig, "stopping; XDP detached");
                    return Ok(());
                }
            }
        }
        if Instant::now() >= next_report {
            log_counters(&dp, &cfg, &mut last);
            next_report = Instant::now() + REPORT_EVERY;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_counters(dp: &Dataplane, cfg: &Config, last: &mut HashMap<String, u64>) {
    for vip in &cfg.vips {
        let Ok(c) = dp.vip_counters(vip) else { continue };
        let before = last.insert(vip.name.clone(), c.packets).unwrap_or(0);
        if c.packets == before {
            continue;
        }
        let per_backend: Vec<String> = vip
            .backends
            .iter()
            .map(|b| {
                let bc = dp.backend_counters(b.address).unwrap_or_default();
                format!("{}={}", b.address, bc.packets)
            })
            .collect();
        info!(
            vip = %vip,
            packets = c.packets,
            bytes = c.bytes,
            new_flows = c.new_flows,
            backends = %per_backend.join(" "),
            "traffic"
        );
    }
}
