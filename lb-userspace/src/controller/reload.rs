//! Putting a config in force: `edgelb reload` and SIGHUP ([`Controller::reload`]), what a reload
//! cannot apply in place and is refused for ([`restart_needed`]), what it says it did
//! ([`reload_summary`], [`l7_backend_changes`], [`log_carried`]); and the effective config
//! written to the maps and the proxy's L7 pools after every change, a reload's or not
//! ([`Controller::apply`]).

use std::{collections::BTreeSet, path::Path};

use tracing::{error, info, warn};

use super::{
    Controller,
    startup::warn_of_cautions,
    verdicts::{self, Checked},
};
use crate::{admin::Response, config::Config, dataplane::DataplaneError};

/// Logs what carrying the drains and health verdicts over to `cfg` did ([`Verdicts::carry_over`])
/// at a reload or a takeover (`what`).
///
/// [`Verdicts::carry_over`]: verdicts::Verdicts::carry_over
pub(super) fn log_carried(what: &str, c: &verdicts::CarriedOver, cfg: &Config) {
    for (from, to) in &c.renamed {
        info!(vip = %to, was = %from, "{what}: VIP renamed: its drains and health verdicts carry over");
    }
    for (vip, backend) in &c.held {
        info!(%vip, %backend, "{what}: backend added: it joins the ring once its health check has passed `rise` times");
    }
    for (of, vip, from, to) in &c.moved {
        info!(%vip, was = %from, backend = %to, drain = of.as_deref().unwrap_or("every VIP"), "{what}: VIP moved to another port: its drain of the backend follows");
    }
    let mut vip_gone = false;
    for (vip, backend) in &c.forgotten {
        let reason = verdicts::why_forgotten(cfg, vip.as_deref(), *backend);
        vip_gone |= verdicts::vip_gone(cfg, vip.as_deref());
        warn!(%backend, vip = vip.as_deref().unwrap_or("every VIP"), "{what}: drain forgotten: {reason}");
    }
    if vip_gone {
        warn!("{what}: {}", verdicts::RENAME_RULE);
    }
}

/// Whether `a` and `b` name one file: the same inode when both exist (however spelled: a
/// symlink, `..`, another working directory), else the same absolute path.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// The refusal of a reload of `path`, the file edgelb runs with (absolute), whose `changes`
/// ([`restart_needed`]) only a restart applies. It names the file, as the takeover it suggests
/// must be given it: an operator who edited another copy, or runs edgelb with a file other than
/// the default, sees which one was read.
fn restart_refusal(path: &Path, changes: &[String]) -> String {
    format!(
        "reload rejected, running config kept: {} needs a restart for {} ({})",
        path.display(),
        changes.join("; "),
        restart_advice(path, changes)
    )
}

/// What a reload from `old` to `new` cannot apply in place, each named with its change, for the
/// refusal to say what to undo or restart for. Order does not count: interfaces and L7 VIPs
/// listed in another order are the same set. An L7 VIP's listeners are bound, for its address,
/// port and mode, when edgelb starts (below port 1024 that takes a privilege it has dropped).
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    /// Says `key` changed from `a` to `b`, if it did, each value `shown` as an operator would
    /// write it (not Rust's debug output, `Some(..)` and quoted paths).
    fn changed<T: PartialEq>(
        out: &mut Vec<String>,
        key: &str,
        (a, b): (&T, &T),
        shown: impl Fn(&T) -> String,
    ) {
        if a != b {
            out.push(format!("{key} ({} → {})", shown(a), shown(b)));
        }
    }
    fn or_unset<T: ToString>(v: &Option<T>) -> String {
        v.as_ref().map_or("unset".to_owned(), ToString::to_string)
    }
    let (o, n) = (&old.node, &new.node);
    let mut out = Vec::new();
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    changed(&mut out, "node.interfaces", (&sorted(&o.interfaces), &sorted(&n.interfaces)), |v| {
        format!("[{}]", v.join(", "))
    });
    changed(&mut out, "node.xdp_mode", (&o.xdp_mode, &n.xdp_mode), |m| {
        format!("{m:?}").to_lowercase()
    });
    changed(&mut out, "node.pin_dir", (&o.pin_dir, &n.pin_dir), |p| p.display().to_string());
    changed(&mut out, "node.admin_socket", (&o.admin_socket, &n.admin_socket), |p| {
        p.display().to_string()
    });
    changed(
        &mut out,
        "node.conntrack_flows_per_cpu",
        (&o.conntrack_flows_per_cpu, &n.conntrack_flows_per_cpu),
        or_unset,
    );
    // As written: unset is one per CPU, counted at the start, and stays unset whatever the CPU
    // count has become since (a restart would count anew).
    changed(&mut out, "node.l7_threads", (&o.l7_threads, &n.l7_threads), or_unset);
    changed(&mut out, "[metrics] listen", (&old.metrics, &new.metrics), |m| {
        m.map_or("disabled".to_owned(), |a| a.to_string())
    });
    let l7 = |cfg: &Config| -> std::collections::BTreeMap<
        String,
        (std::net::SocketAddr, crate::config::L7Mode),
    > {
        cfg.vips
            .iter()
            .filter_map(|v| {
                Some((
                    v.name.clone(),
                    (std::net::SocketAddr::new(v.address, v.port), v.l7.as_ref()?.mode),
                ))
            })
            .collect()
    };
    let (before, after) = (l7(old), l7(new));
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    // A VIP of that name the other config forwards in XDP: the VIP changed forwarding.
    let xdp = |cfg: &Config, name: &str| {
        let v = cfg.vips.iter().find(|v| v.name == name && v.l7.is_none())?;
        Some(format!("{:?}", v.forwarding).to_lowercase())
    };
    let bound = "(L7 listeners are bound at start)";
    for name in names {
        match (before.get(name), after.get(name)) {
            (Some(_), None) => out.push(match xdp(new, name) {
                Some(f) => format!("VIP `{name}`: forwarding l7 → {f} {bound}"),
                None => format!("L7 VIP `{name}` removed"),
            }),
            (None, Some((addr, _))) => out.push(match xdp(old, name) {
                Some(f) => format!("VIP `{name}`: forwarding {f} → l7 {bound}"),
                None => format!("L7 VIP `{name}` on {addr} added"),
            }),
            (Some((a, am)), Some((b, bm))) if (a, am) != (b, bm) => {
                let mode = |m: &crate::config::L7Mode| format!("{m:?}").to_lowercase();
                out.push(format!("L7 VIP `{name}`: {a} {} → {b} {}", mode(am), mode(bm)))
            }
            _ => {}
        }
    }
    out
}

/// What to do about a reload of `path` refused for `restart` ([`restart_needed`]): a takeover restarts
/// without refusing a connection; with a new `node.conntrack_flows_per_cpu` it copies the
/// connection tables into tables of the new size, and what that may still cost is said;
/// a new `node.xdp_mode` or `node.pin_dir` (said only when among the changes) takes a stop,
/// which detaches XDP, then a start.
fn restart_advice(path: &Path, restart: &[String]) -> String {
    let mut advice = format!(
        "`edgelb run -c {} --takeover` restarts without refusing a new connection",
        path.display()
    );
    if restart.iter().any(|r| r.starts_with("node.conntrack_flows_per_cpu ")) {
        advice.push_str(&format!(", and {}", crate::dataplane::RESIZED_TABLES_COST));
    }
    if restart.iter().any(|r| r.starts_with("node.xdp_mode ")) {
        advice.push_str("; a new node.xdp_mode takes `edgelb stop`, which detaches, then a start");
    }
    // The new process would find the interfaces held through the old directory's links.
    if restart.iter().any(|r| r.starts_with("node.pin_dir ")) {
        advice.push_str(
            "; a new node.pin_dir takes `edgelb stop`, which removes the data plane pinned in the old one, then a start",
        );
    }
    advice
}

/// What a reload did, for the operator: the VIPs now served and what changed in the maps (the
/// L7 pools, timeouts and routes are re-published whole at every reload).
fn reload_summary(cfg: &Config, r: &crate::dataplane::ApplyReport) -> String {
    let l7 = cfg.vips.iter().filter(|v| v.l7.is_some()).count();
    let xdp = cfg.vips.len() - l7;
    let maps = if r.is_empty() {
        "the XDP maps needed no change".to_owned()
    } else {
        format!("XDP maps: {r}")
    };
    let pools = if l7 > 0 { "; L7 pools, routes and timeouts re-published" } else { "" };
    format!("{xdp} XDP VIP(s), {l7} L7 VIP(s); {maps}{pools}")
}

/// The L7 backends a reload from `old` to `new` added and removed, each as `VIP address:port`
/// (a VIP's own pool and its routes' pools together; the backends of an L7 VIP added or
/// removed whole included), at most [`CHANGES_SAID`] of each named: `None` if none. The XDP
/// maps' report counts XDP backends only, and a reload that changed only L7 pools said nothing
/// of them.
fn l7_backend_changes(old: &Config, new: &Config) -> Option<String> {
    fn pools(cfg: &Config) -> BTreeSet<(String, std::net::SocketAddr)> {
        cfg.vips
            .iter()
            .filter_map(|v| Some((v, v.l7.as_ref()?)))
            .flat_map(|(v, l7)| {
                v.backends
                    .iter()
                    .chain(l7.routes.iter().flat_map(|r| &r.backends))
                    .map(|b| (v.name.clone(), std::net::SocketAddr::new(b.address, b.port)))
            })
            .collect()
    }
    let (before, after) = (pools(old), pools(new));
    let list = |what: &str, set: Vec<&(String, std::net::SocketAddr)>| {
        let mut said: Vec<String> =
            set.iter().take(CHANGES_SAID).map(|(vip, b)| format!("{vip} {b}")).collect();
        if set.len() > CHANGES_SAID {
            said.push(format!("and {} more", set.len() - CHANGES_SAID));
        }
        (!set.is_empty()).then(|| format!("{what}: {}", said.join(", ")))
    };
    let added = list("L7 backends added", after.difference(&before).collect());
    let removed = list("L7 backends removed", before.difference(&after).collect());
    let both: Vec<String> = added.into_iter().chain(removed).collect();
    (!both.is_empty()).then(|| both.join("; "))
}

/// How many added (and removed) L7 backends a reload's summary names ([`l7_backend_changes`]).
const CHANGES_SAID: usize = 8;

impl Controller {
    /// The config as the maps should have it (see [`Verdicts::effective`]).
    ///
    /// [`Verdicts::effective`]: verdicts::Verdicts::effective
    pub(super) fn effective(&mut self) -> Config {
        self.verdicts.effective(&self.cfg)
    }

    /// Writes the effective config to the maps, then, once they took it, publishes the
    /// proxy's L7 pools from it: a reload the maps refuse is rolled back ([`Controller::reload`])
    /// without the proxy ever serving the refused file's pools, or forgetting the live state
    /// (passive health, request counts) of the L7 backends that file dropped.
    pub(super) fn apply(&mut self) -> Result<crate::dataplane::ApplyReport, DataplaneError> {
        let eff = self.effective();
        let report = self.dp.apply_keeping(&eff, &self.cfg)?;
        self.publish_pools(&eff);
        Ok(report)
    }

    /// Publishes the proxy's L7 pools from the effective config `eff`.
    fn publish_pools(&mut self, eff: &Config) {
        if let Some(p) = &mut self.proxy {
            p.update_keeping(eff, &self.cfg);
        }
    }

    pub(super) fn apply_logged(&mut self, why: &str) {
        match self.apply() {
            Ok(r) if !r.is_empty() => info!(maps = %r, "{why}: maps updated"),
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "{why}: updating the maps failed");
                // The running config's own change (a verdict, a drain) still reaches the L7
                // pools, which do not depend on the maps.
                let eff = self.effective();
                self.publish_pools(&eff);
            }
        }
    }

    /// Puts `cfg` in force (the health-checked backends with it), returning the config it
    /// replaces.
    fn set_config(&mut self, cfg: Config) -> Config {
        self.checked = Checked::new(&cfg);
        std::mem::replace(&mut self.cfg, cfg)
    }

    /// [`Controller::reload`], asked for `via` (SIGHUP, `edgelb reload`), a refusal logged as
    /// an error whichever way it came: the CLI's message goes to whoever ran it (a deploy
    /// script, say), and edgelb's log is where a refused reload must be found afterwards.
    pub(super) fn reload_logged(&mut self, named: Option<&Path>, via: &str) -> Response {
        let r = self.reload(named);
        if !r.ok {
            error!(via, "{}", r.message);
        }
        r
    }

    /// Re-reads the file edgelb runs with; `named`, the file the operator's command named, must
    /// be that file.
    fn reload(&mut self, named: Option<&Path>) -> Response {
        if let Some(named) = named
            && !same_file(named, &self.path)
        {
            return Response::err(format!(
                "reload refused: edgelb runs with {}, and a reload re-reads that file, not {}; edit {0} and reload, or switch files with `edgelb run -c {1} --takeover`",
                self.path.display(),
                named.display()
            ));
        }
        let (new, sha256) = match Config::load_hashed(&self.path) {
            Ok(c) => c,
            Err(e) => {
                return Response {
                    bad_config: true,
                    ..Response::err(format!("reload rejected, running config kept: {e}"))
                };
            }
        };
        let restart = restart_needed(&self.cfg, &new);
        if !restart.is_empty() {
            return Response::err(restart_refusal(&self.path, &restart));
        }
        // Health flips the running checks sent before this reload are taken in under the config
        // they were sent for: checked against the new one, a flip from a VIP it renames, or
        // from an XDP VIP whose port it changes (another backend id), would be dropped, and the
        // restarted check would start from the verdict before it.
        self.apply_pending_health(usize::MAX);
        let old = self.set_config(new);
        let old_verdicts = self.verdicts.clone();
        let carried = self.verdicts.carry_over(&self.verdicts.handed_vips(&old), &self.cfg);
        match self.apply() {
            Ok(r) => {
                self.cfg_sha256 = sha256;
                log_carried("reload", &carried, &self.cfg);
                self.reconcile_checks();
                self.metrics.retain(&self.cfg);
                self.rates.retain(&self.cfg);
                let mut msg =
                    format!("reloaded {}: {}", self.path.display(), reload_summary(&self.cfg, &r));
                if let Some(l7) = l7_backend_changes(&old, &self.cfg) {
                    msg.push_str(&format!("; {l7}"));
                }
                if self.checks_missing > 0 {
                    msg.push_str(&format!(
                        "; {} health checks could not start yet (no thread to be had; see the log), retried every second",
                        self.checks_missing
                    ));
                }
                if let Some(held) = verdicts::held_summary(&carried.held) {
                    msg.push_str(&format!("; {held}"));
                }
                if let Some(forgotten) = verdicts::forgotten_summary(&self.cfg, &carried.forgotten)
                {
                    msg.push_str(&format!("; {forgotten}"));
                }
                self.warn_of_links();
                warn_of_cautions(&self.cfg);
                // Said to the one reloading too, who may not read the log.
                for c in &self.cfg.cautions {
                    msg.push_str(&format!("; warning: {c}"));
                }
                // What the one reloading was told, with which file's content, for the log.
                info!(config = %self.path.display(), sha256 = %self.cfg_sha256, "{msg}");
                Response::ok(msg)
            }
            Err(e) => {
                // The maps are brought back to the running config, which stays: nothing of the
                // rejected file is left half-written, and later health changes still apply.
                self.set_config(old);
                self.verdicts = old_verdicts;
                error!(error = %e, "reload rejected: updating the maps failed");
                if let Err(back) = self.apply() {
                    error!(error = %back, "reload: restoring the running config in the maps failed");
                    // Not "kept": the maps may hold parts of both files until a write succeeds.
                    return Response::err(format!(
                        "reload rejected: updating the maps failed: {e}; writing the running config back failed too: {back}. The maps may hold parts of both files: fix the cause and reload (or restart)"
                    ));
                }
                Response::err(format!(
                    "reload rejected, running config kept: updating the maps failed: {e}"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::tests::{NODE, l7, parse};

    /// A reload is refused only for what it cannot apply, and says which keys those are; the
    /// same interfaces or L7 VIPs in another order are no change.
    #[test]
    fn a_reload_needs_a_restart_only_for_what_changed_and_names_it() {
        let base = parse(&format!("{NODE}{}{}", l7("a", 8001, "http"), l7("b", 8002, "tcp")));
        let reordered = parse(
            &format!("{NODE}{}{}", l7("b", 8002, "tcp"), l7("a", 8001, "http"))
                .replace("[\"eth0\", \"eth1\"]", "[\"eth1\", \"eth0\"]"),
        );
        assert_eq!(restart_needed(&base, &reordered), Vec::<String>::new());
        let changed = parse(
            &format!("{NODE}l7_threads = 3\n{}{}", l7("a", 8001, "tcp"), l7("c", 8003, "http"))
                .replace("[\"eth0\", \"eth1\"]", "[\"eth0\"]"),
        );
        let why = restart_needed(&base, &changed).join("; ");
        for says in [
            "node.interfaces ([eth0, eth1] → [eth0])",
            "node.l7_threads (",
            "L7 VIP `a`: 127.0.0.1:8001 http → 127.0.0.1:8001 tcp",
            "L7 VIP `b` removed",
            "L7 VIP `c` on 127.0.0.1:8003 added",
        ] {
            assert!(why.contains(says), "want {says:?} in {why}");
        }
        assert!(!why.contains("xdp_mode") && !why.contains("metrics"), "{why}");
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &changed));
        assert!(
            advice.contains("edgelb run -c /etc/e.toml --takeover") && !advice.contains("xdp_mode"),
            "{advice}"
        );
        let native = parse(&format!(
            "{NODE}xdp_mode = \"native\"\n{}{}",
            l7("a", 8001, "http"),
            l7("b", 8002, "tcp")
        ));
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &native));
        assert!(advice.contains("a new node.xdp_mode takes `edgelb stop`"), "{advice}");
        assert!(!advice.contains("connection tables") && !advice.contains("pin_dir"), "{advice}");
        // Another table size: the takeover copies the connection tables into the new size, and
        // the advice says what that may still cost rather than promise that nothing is lost.
        let sized = parse(&format!(
            "{NODE}conntrack_flows_per_cpu = 8192
{}{}",
            l7("a", 8001, "http"),
            l7("b", 8002, "tcp")
        ));
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &sized));
        assert!(
            advice.contains("copies the connection tables into tables of the new size")
                && advice.contains("most recently used flows")
                && advice.contains("on a drained backend, move to another backend"),
            "{advice}"
        );
        let moved = parse(&format!(
            "{NODE}pin_dir = \"/sys/fs/bpf/other\"\n{}{}",
            l7("a", 8001, "http"),
            l7("b", 8002, "tcp")
        ));
        let advice = restart_advice(Path::new("/etc/e.toml"), &restart_needed(&base, &moved));
        assert!(advice.contains("a new node.pin_dir takes `edgelb stop`"), "{advice}");
        // A VIP XDP forwarded that becomes L7 (or back) is not an L7 VIP added (or removed).
        let xdp = |rest: &str| {
            parse(&format!(
                "{NODE}gateway_mac = \"02:00:00:00:00:01\"\n[[vip]]\nname = \"x\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{{ address = \"198.18.0.11\" }}]\n{rest}"
            ))
        };
        let (before, after) = (
            xdp(&l7("a", 8001, "http")),
            parse(&format!("{NODE}{}{}", l7("x", 8005, "http"), l7("a", 8001, "http"))),
        );
        assert_eq!(
            restart_needed(&before, &after),
            ["VIP `x`: forwarding ipip → l7 (L7 listeners are bound at start)"]
        );
        assert_eq!(
            restart_needed(&after, &before),
            ["VIP `x`: forwarding l7 → ipip (L7 listeners are bound at start)"]
        );
    }

    /// A refused reload names each value as the file writes it, without Rust's debug output
    /// (`Some(127.0.0.1:9110)`, quoted paths, `Native`): an unset one says so.
    #[test]
    fn a_reload_refused_for_a_restart_names_values_as_written() {
        let base = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        let other = parse(&format!(
            "{NODE}xdp_mode = \"native\"\npin_dir = \"/sys/fs/bpf/other\"\nconntrack_flows_per_cpu = 8192\n[metrics]\nlisten = \"127.0.0.1:29111\"\n{}",
            l7("a", 8001, "http")
        ));
        let why = restart_needed(&base, &other).join("; ");
        for says in [
            "node.xdp_mode (auto → native)",
            "node.pin_dir (/sys/fs/bpf/edgelb → /sys/fs/bpf/other)",
            "node.conntrack_flows_per_cpu (unset → 8192)",
            "[metrics] listen (127.0.0.1:9110 → 127.0.0.1:29111)",
        ] {
            assert!(why.contains(says), "want {says:?} in {why}");
        }
        assert!(!why.contains("Some(") && !why.contains('"'), "{why}");
        let off = parse(&format!("{NODE}[metrics]\nenabled = false\n{}", l7("a", 8001, "http")));
        let why = restart_needed(&base, &off).join("; ");
        assert_eq!(why, "[metrics] listen (127.0.0.1:9110 → disabled)");
    }

    /// An unset `node.l7_threads` is the file's, not the CPU count's: two parses of one file
    /// need no restart however many CPUs each one saw (`taskset`, a cgroup CPU quota changed
    /// between them), while the proxy still gets one thread per CPU. The second parse runs on
    /// a thread pinned to one CPU, so on a machine of several it sees fewer than the first.
    #[test]
    fn an_unset_l7_thread_count_needs_no_restart_whatever_the_cpus() {
        let text = format!("{NODE}{}", l7("a", 8001, "http"));
        let wide = parse(&text);
        let cpus = crate::testbed::netns::runnable_cpus().expect("sched_getaffinity");
        let (narrow_threads, narrow) = std::thread::scope(|s| {
            s.spawn(|| {
                crate::testbed::netns::pin_current_thread(Some(cpus[0])).expect("pin to one CPU");
                let cfg = parse(&text);
                (cfg.node.l7_thread_count(), cfg)
            })
            .join()
            .unwrap()
        });
        assert_eq!(narrow_threads, 1, "pinned to one CPU");
        assert_eq!(restart_needed(&wide, &narrow), Vec::<String>::new());
        assert_eq!(wide.node.l7_threads, None);
        // Written, it is compared as written.
        let three = parse(&text.replace("[[vip]]", "l7_threads = 3\n[[vip]]"));
        assert_eq!(three.node.l7_thread_count(), 3);
        assert_eq!(restart_needed(&wide, &three), ["node.l7_threads (unset → 3)"]);
    }

    /// A reload's summary names the L7 backends it added and removed, own pools and route pools
    /// alike, by VIP, a few of each, and says nothing of L7 pools it left alone. It said `maps=no
    /// change` of a reload that changed only L7 pools.
    #[test]
    fn a_reload_summary_names_the_l7_backends_it_added_and_removed() {
        let old = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        assert_eq!(l7_backend_changes(&old, &old), None);
        let mut new = old.clone();
        let was = &old.vips[0].backends[0];
        let added = crate::config::Backend { port: 9009, ..was.clone() };
        new.vips[0].backends = vec![added.clone()];
        let removed = std::net::SocketAddr::new(was.address, was.port);
        let said = l7_backend_changes(&old, &new).expect("changes");
        assert_eq!(
            said,
            format!(
                "L7 backends added: a {}:9009; L7 backends removed: a {removed}",
                added.address
            )
        );
        let l7 = new.vips[0].l7.as_mut().unwrap();
        let route = crate::config::Route {
            host: None,
            path_prefix: Some("/api".into()),
            algorithm: l7.algorithm,
            backends: (1..=10)
                .map(|p| crate::config::Backend { port: p, ..added.clone() })
                .collect(),
        };
        l7.routes.push(route);
        let said = l7_backend_changes(&old, &new).expect("changes");
        assert!(said.contains(&format!("a {}:1, ", added.address)), "{said}");
        assert!(said.contains("and 3 more; L7 backends removed"), "{said}");
    }

    /// The reply to a reload says what changed, not a debug dump.
    #[test]
    fn a_reload_summary_names_what_it_did() {
        let cfg = parse(&format!("{NODE}{}", l7("a", 8001, "http")));
        let none = crate::dataplane::ApplyReport::default();
        assert_eq!(
            reload_summary(&cfg, &none),
            "0 XDP VIP(s), 1 L7 VIP(s); the XDP maps needed no change; L7 pools, routes and timeouts re-published"
        );
        let r = crate::dataplane::ApplyReport {
            backends_added: 1,
            ring_slots_written: 300,
            ..Default::default()
        };
        assert!(
            reload_summary(&cfg, &r).contains("XDP maps: 1 backend added, 300 ring slots written"),
            "{}",
            reload_summary(&cfg, &r)
        );
        // A reload near the backend-entry limit says it was applied in two passes.
        let r = crate::dataplane::ApplyReport { two_passes: true, vips_updated: 1, ..r };
        assert!(
            reload_summary(&cfg, &r).ends_with(
                "1 VIP entry rewritten, 1 backend added, 300 ring slots written (applied in two passes; the counts cover both); L7 pools, routes and timeouts re-published"
            ),
            "{}",
            reload_summary(&cfg, &r)
        );
    }
}
