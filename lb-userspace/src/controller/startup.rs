//! The steps of `run` before the controller exists, apart so that `run` reads as the order of a
//! start: what is checked and said of the config before anything is touched ([`start_checks`],
//! [`preflight`]), the resource limits raised, the config a takeover goes on with
//! ([`config_at_handover`]), the stop signals looked for while taking over, the test hook that
//! pauses a start, and the capabilities dropped once everything privileged is done.

use std::{path::Path, time::Duration};

use signal_hook::consts::SIGHUP;
use tracing::{info, warn};

use super::{
    RunError,
    links::{self, mtu_mismatches},
};
use crate::{config::Config, dataplane::DataplaneError, rlimit};

/// The interfaces' MTUs ([`links::link_mtus`]), and the MTU warnings said of them.
type MtusSaid = (Vec<(String, u32)>, Vec<String>);

/// What `run` checks of the config it starts with before it touches anything
/// ([`preflight`]), and says of it: the MTU and caution warnings. Returns the interfaces' MTUs
/// and the warnings said, for the controller to say only changes later.
pub(super) fn start_checks(cfg: &Config) -> Result<MtusSaid, RunError> {
    preflight(cfg)?;
    // Over netlink, in this network namespace: sysfs may show another's.
    let mtus = links::link_mtus(cfg, &[]);
    let link_warnings = mtu_mismatches(cfg, &mtus);
    for w in &link_warnings {
        warn!("{w}");
    }
    warn_of_cautions(cfg);
    Ok((mtus, link_warnings))
}

/// The config a takeover goes on with, once the running edgelb has handed over, telling the
/// file as it was last applied there (`running`, its [`crate::config::content_hash`]) from the
/// file this process loaded at its start (`loaded`, hash `loaded_sha256`): an `edgelb reload`
/// (or SIGHUP) that reached the running edgelb while this process loaded its program was
/// answered "reloaded", and running the file as read before that edit would undo it without a
/// word. When the two differ, the file is read again: unchanged since this process read it (it
/// was edited for this takeover), nothing changes (`None`); changed, it is what this process
/// runs, validated as at a start. A file that now fails, or that changes what this start has
/// already set up from the file as it was (`node.pin_dir`, `node.admin_socket`,
/// `node.conntrack_flows_per_cpu`: the program was loaded beside the running one with them),
/// gives the takeover up (an error) before the commit, so that the running edgelb takes back
/// over. An older edgelb says no hash (`running` none): this process goes on with the file as
/// it read it, and says that it could not check.
pub(super) fn config_at_handover(
    path: &Path,
    loaded: &Config,
    loaded_sha256: &str,
    running: Option<&str>,
) -> Result<Option<(Config, String)>, RunError> {
    let Some(running) = running else {
        info!(
            "--takeover: the running edgelb (an older one) does not say which config it runs: a reload it took while this process started cannot be told, and this process runs the file as it read it at its start"
        );
        return Ok(None);
    };
    if running == loaded_sha256 {
        return Ok(None);
    }
    let changed = "the config file changed while this process started (the running edgelb was reloaded meanwhile?)";
    let (now, sha256) = Config::load_hashed(path).map_err(|e| {
        RunError::TakeoverConfig(format!(
            "{changed}, and it now fails: {e}; fix it and take over again"
        ))
    })?;
    if sha256 == loaded_sha256 {
        return Ok(None);
    }
    let (a, b) = (&loaded.node, &now.node);
    let mut set_up = Vec::new();
    if a.pin_dir != b.pin_dir {
        set_up.push("node.pin_dir");
    }
    if a.admin_socket != b.admin_socket {
        set_up.push("node.admin_socket");
    }
    if a.conntrack_flows_per_cpu != b.conntrack_flows_per_cpu {
        set_up.push("node.conntrack_flows_per_cpu");
    }
    if !set_up.is_empty() {
        return Err(RunError::TakeoverConfig(format!(
            "{changed}, in {}, which this start had already set up from the file as it read it; take over again",
            set_up.join(", ")
        )));
    }
    warn!(
        path = %path.display(),
        "--takeover: {changed}: running the file as it is now, not as it was read at the start"
    );
    Ok(Some((now, sha256)))
}

/// A test's pause at `point` of a start, `EDGELB_TEST_PAUSE=<point>:<ms>` (a test-only hook,
/// as the other `EDGELB_TEST_*` variables are): said in the log, then `ms` asleep, so that a
/// lifecycle test can act within a window otherwise too short to hit (a reload while a
/// takeover starts). The points: `takeover-loaded` (a takeover's config loaded, its program not
/// yet), `takeover-handed` (the running edgelb has handed over; the admin socket is not yet
/// bound). Unset, or naming another point, nothing happens.
pub(super) fn test_pause(point: &str) {
    let Some(value) = std::env::var_os("EDGELB_TEST_PAUSE") else { return };
    let Some((at, ms)) = value.to_str().and_then(|v| v.split_once(':')) else { return };
    let Ok(ms) = ms.parse::<u64>() else { return };
    if at == point {
        info!(point, ms, "test hook (EDGELB_TEST_PAUSE): pausing");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Whether SIGINT or SIGTERM has arrived (consuming the pending signals). A SIGHUP is raised
/// again for the loop, which reloads.
pub(super) fn stop_requested(signals: &mut signal_hook::iterator::Signals) -> bool {
    // Collected first: raised while the iterator runs, SIGHUP would come round again.
    let pending: Vec<i32> = signals.pending().collect();
    let mut stop = false;
    for sig in pending {
        if sig == SIGHUP {
            let _ = signal_hook::low_level::raise(SIGHUP);
        } else {
            info!(signal = sig, "signal received during the takeover");
            stop = true;
        }
    }
    stop
}

/// What would otherwise fail only after the data plane was touched (or, with `--takeover`, after
/// the running edgelb stopped for good): an interface that is not there (a typo would leave the
/// maps written and nothing attached), an io_uring the kernel refuses (the L7 proxy's listeners
/// would be left unanswered), a bpffs that would not outlive this process
/// ([`crate::dataplane::ensure_bpffs`]). Checked before anything else, privileged or not.
fn preflight(cfg: &Config) -> Result<(), RunError> {
    if !crate::proxy::l7_listeners(cfg).is_empty() {
        crate::proxy::probe_io_uring(cfg.node.l7_thread_count()).map_err(RunError::Proxy)?;
    }
    for name in &cfg.node.interfaces {
        if !crate::dataplane::interface_exists(name)? {
            return Err(RunError::Interface(name.clone()));
        }
    }
    // Before the admin socket and a takeover's handover: a bpffs this process could not keep
    // (one it would mount in a mount namespace of its own) stops the start with nothing touched.
    crate::dataplane::ensure_bpffs().map_err(|reason| DataplaneError::Pin {
        step: "preparing the pin directory",
        path: cfg.node.pin_dir.clone(),
        reason,
    })?;
    Ok(())
}

/// Logs what the file says that is accepted but likely not what was meant ([`Config::cautions`]),
/// at each start and reload, so that it is heard where edgelb's log is read.
pub(super) fn warn_of_cautions(cfg: &Config) {
    for c in &cfg.cautions {
        warn!("{c}");
    }
}

/// Raises the soft limits edgelb outgrows to the hard ones. Open files: every L7 connection
/// holds two descriptors, and the default soft limit (1024 under systemd) would refuse accepts
/// (and the metrics endpoint's) long before `max_connections`. Locked memory: each L7 thread's
/// io_uring is charged to it once the capabilities are dropped (about
/// [`crate::proxy::RING_BYTES`]), and the usual soft limit (8 MiB, 64 KiB in containers) does not
/// hold a thread per CPU on a large host.
pub(super) fn raise_limits() {
    raise_limit(libc::RLIMIT_NOFILE, "open-file");
    raise_limit(libc::RLIMIT_MEMLOCK, "locked-memory");
}

/// Raises the soft limit of `resource` (`what`, for the log) to its hard limit.
fn raise_limit(resource: rlimit::Resource, what: &str) {
    let Ok(mut lim) = rlimit::get(resource) else { return };
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let from = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    match rlimit::set(resource, &lim) {
        Ok(()) => info!(from, to = lim.rlim_cur, "{what} limit raised"),
        Err(error) => {
            warn!(soft = from, hard = lim.rlim_max, %error, "raising the {what} limit failed")
        }
    }
}

/// Everything privileged is done by now (programs loaded, links attached and pinned, sockets
/// bound), and the maps are used through open fds, which needs no capability. Give them all up,
/// bounding set included, so that a bug in the long-running loop cannot load programs, attach,
/// or use a capability. (The process stays uid 0, and so keeps an owner's access to root's
/// files that are writable where it runs: /proc/sys among them unless the service manager
/// makes them read-only. ARCHITECTURE.md, "Metrics", says what that leaves.)
/// Capabilities are per thread: this must run before any helper thread is started.
pub(super) fn drop_capabilities() {
    use caps::CapSet;
    let mut result = Ok(());
    for cap in caps::all() {
        if let Err(e) = caps::drop(None, CapSet::Bounding, cap) {
            result = Err(e);
        }
    }
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        if let Err(e) = caps::clear(None, set) {
            result = Err(e);
        }
    }
    match result {
        Ok(()) => info!("all capabilities dropped"),
        Err(e) => warn!(error = %e, "could not drop every capability"),
    }
}
