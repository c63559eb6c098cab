//! What the controller knows of its backends beyond the config: health verdicts, runtime drains
//! and which VIPs fail open (every backend that should take new flows is down).
//! Kept apart from the controller's I/O so that the effective config written to the maps is one
//! function of this state and the config, testable without a data plane.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use tracing::{error, warn};

use crate::{
    admin::{BackendRef, HandedVip},
    config::{Backend, Config, Forwarding, Vip},
    metrics::{BackendLabels, backend_label},
};

/// A backend's identity for health: its address and port (an L7 VIP may list one address on
/// several ports; an XDP VIP's backends carry the VIP's port).
pub(super) fn id(b: &Backend) -> SocketAddr {
    SocketAddr::new(b.address, b.port)
}

/// The health-checked backends of a config (a checked VIP's own backends, which
/// `health::Checker` probes), by VIP name and backend address and port. Every probe's event is
/// looked up here, thousands a second on a large config: a map, built once per config, in
/// place of a scan of the VIP's backends (and the backend's metric labels written anew) for
/// each event.
#[derive(Default)]
pub(super) struct Checked {
    vips: HashMap<String, HashMap<SocketAddr, CheckedBackend>>,
}

/// A health-checked backend, as [`Checked`] finds it.
pub(super) struct CheckedBackend {
    /// Its VIP is an L7 one (no ring: its proxy's pool places each request).
    pub(super) l7: bool,
    /// The labels of its health metrics ([`backend_label`]).
    pub(super) labels: BackendLabels,
}

impl Checked {
    /// The checked backends of `cfg`.
    pub(super) fn new(cfg: &Config) -> Checked {
        let vips = cfg
            .vips
            .iter()
            .filter(|v| v.health.is_some())
            .map(|v| {
                let backends = v.backends.iter().map(|b| {
                    let labels =
                        BackendLabels { vip: v.name.clone(), backend: backend_label(v, b) };
                    (id(b), CheckedBackend { l7: v.forwarding == Forwarding::L7, labels })
                });
                (v.name.clone(), backends.collect())
            })
            .collect();
        Checked { vips }
    }

    /// The backend `backend` (address and port) of `vip`, if a check of the config probes
    /// it: a check reconciled away may still report a probe that was in flight.
    pub(super) fn get(&self, vip: &str, backend: SocketAddr) -> Option<&CheckedBackend> {
        self.vips.get(vip)?.get(&backend)
    }
}

/// What [`Verdicts::carry_over`] did, for the log and the operator.
#[derive(Debug, Default)]
pub(super) struct CarriedOver {
    /// VIPs renamed, (old name, new name).
    pub(super) renamed: Vec<(String, String)>,
    /// Drains that followed their VIP to another port ([`Verdicts::follow_port`]).
    pub(super) moved: Vec<(Option<String>, String, BackendRef, BackendRef)>,
    /// Backends added, held down until their check passes.
    pub(super) held: Vec<(String, SocketAddr)>,
    /// Drains forgotten: (VIP, or none for every VIP, backend).
    pub(super) forgotten: Vec<(Option<String>, BackendRef)>,
}

/// When a VIP's drains and health verdicts follow it to a new config: said with the drains
/// forgotten because their VIP is gone, which may have been renamed and moved at once.
pub(super) const RENAME_RULE: &str = "a VIP keeps its drains and health verdicts through a rename only when its address, port and protocol stay, and through a move (another address or port) only when its name stays: rename and move it in two steps";

/// Why [`Verdicts::reconcile`] forgot the drain of `backend` in `vip` (none: every VIP) under
/// `cfg`: the VIP is gone, or no longer lists the backend.
pub(super) fn why_forgotten(cfg: &Config, vip: Option<&str>, backend: BackendRef) -> String {
    match vip {
        Some(v) if vip_gone(cfg, Some(v)) => {
            format!("VIP `{v}` is no longer in the config")
        }
        Some(v) => format!("VIP `{v}` no longer lists {backend}"),
        None => format!("no VIP lists {backend} any more"),
    }
}

/// Is `vip` (a drain's VIP; none for every VIP) a name `cfg` no longer has: the drain was
/// forgotten with its VIP, which a reload or takeover that renames and moves it at once does.
pub(super) fn vip_gone(cfg: &Config, vip: Option<&str>) -> bool {
    vip.is_some_and(|v| !cfg.vips.iter().any(|x| x.name == v))
}

/// The drains forgotten (`forgotten`, [`Verdicts::reconcile`] under `cfg`) for the reply to the
/// operator, each with its reason, and [`RENAME_RULE`] when a VIP went; none if there are none.
pub(super) fn forgotten_summary(
    cfg: &Config,
    forgotten: &[(Option<String>, BackendRef)],
) -> Option<String> {
    if forgotten.is_empty() {
        return None;
    }
    let list: Vec<String> = forgotten
        .iter()
        .map(|(vip, b)| {
            let why = why_forgotten(cfg, vip.as_deref(), *b);
            match vip {
                Some(v) => format!("{b} in VIP `{v}` ({why})"),
                None => format!("{b} in every VIP ({why})"),
            }
        })
        .collect();
    let gone = forgotten.iter().any(|(vip, _)| vip_gone(cfg, vip.as_deref()));
    let rule = if gone { format!("; {RENAME_RULE}") } else { String::new() };
    Some(format!("drains forgotten: {}{rule}", list.join(", ")))
}

/// The backends a reload (or takeover) added and holds down until their check passes
/// (`held`, [`Verdicts::hold_new_backends`]), for the reply to the operator, who may otherwise
/// take their absence from the traffic for a fault; none if there are none.
pub(super) fn held_summary(held: &[(String, SocketAddr)]) -> Option<String> {
    if held.is_empty() {
        return None;
    }
    // By VIP, in the order held (the config's).
    let mut per_vip: Vec<(&str, usize)> = Vec::new();
    for (vip, _) in held {
        match per_vip.iter_mut().find(|(v, _)| v == vip) {
            Some((_, n)) => *n += 1,
            None => per_vip.push((vip, 1)),
        }
    }
    let list: Vec<String> = per_vip.iter().map(|(vip, n)| format!("{n} in VIP `{vip}`")).collect();
    Some(format!(
        "{} backend(s) added take traffic once their health check has passed `rise` times: {}",
        held.len(),
        list.join(", ")
    ))
}

/// Health verdicts, drains and fail-open state, by VIP name and backend address.
#[derive(Default, Clone)]
pub(super) struct Verdicts {
    /// (VIP name, backend address and port) declared dead by its health check.
    down: HashSet<(String, SocketAddr)>,
    /// Runtime drains: (VIP name or all VIPs, backend address and port, or every port).
    drained: HashSet<(Option<String>, BackendRef)>,
    /// VIPs in fail-open mode.
    fail_open: HashSet<String>,
    /// `fail_open` has been worked out ([`Verdicts::effective`]) for the running config, so
    /// that [`Verdicts::handed_vips`] can state it (and not claim an empty set it never
    /// computed as "no VIP fails open").
    fail_open_known: bool,
}

impl Verdicts {
    /// Is backend `b` (address and port) dead in `vip` by its health check?
    pub(super) fn is_down(&self, vip: &str, b: SocketAddr) -> bool {
        self.down.contains(&(vip.to_owned(), b))
    }

    /// Is backend `b` (address and port) drained in `vip`, by a drain of that VIP or of every
    /// VIP, of its port or of every port of its address?
    pub(super) fn is_drained(&self, vip: &str, b: SocketAddr) -> bool {
        self.drained.iter().any(|(v, r)| v.as_deref().is_none_or(|v| v == vip) && r.matches(b))
    }

    /// Is `vip` serving all its backends because every one that should take new flows is down?
    pub(super) fn is_fail_open(&self, vip: &str) -> bool {
        self.fail_open.contains(vip)
    }

    /// The VIPs of `cfg` (the running config) as a reload passes the old config's to
    /// [`Verdicts::carry_over`] and a handover hands them to the next process: with the weights
    /// and each VIP's fail-open state now (none before [`Verdicts::effective`] has worked it
    /// out: then inferred, as from an older edgelb), so that both decide from the same facts.
    pub(super) fn handed_vips(&self, cfg: &Config) -> Vec<HandedVip> {
        let mut vips = HandedVip::all(cfg);
        for v in &mut vips {
            v.fail_open = self.fail_open_known.then(|| self.is_fail_open(&v.name));
        }
        vips
    }

    /// Records a health verdict; true if it changed the backend's state.
    pub(super) fn set_health(&mut self, vip: &str, backend: SocketAddr, healthy: bool) -> bool {
        let key = (vip.to_owned(), backend);
        if healthy { self.down.remove(&key) } else { self.down.insert(key) }
    }

    /// Carries the state from a config whose VIPs were `old` over to `new`, as a reload does
    /// (and a takeover, from the VIPs the running edgelb handed over): renames
    /// ([`Verdicts::rename`]), drains following a VIP to another port
    /// ([`Verdicts::follow_port`]), backends added held until their check passes
    /// ([`Verdicts::hold_new_backends`]), then what `new` no longer has forgotten
    /// ([`Verdicts::reconcile`]). One function, so that a takeover with a file ends in the state
    /// a reload to that file would.
    pub(super) fn carry_over(&mut self, old: &[HandedVip], new: &Config) -> CarriedOver {
        let renamed = self.rename(old, new);
        // Before the hold: whether a moved VIP keeps a backend serving depends on its drains.
        let moved = self.follow_port(old, new, &renamed);
        let held = self.hold_new_backends(old, new, &renamed);
        let forgotten = self.reconcile(new);
        CarriedOver { renamed, moved, held, forgotten }
    }

    /// Carries the verdicts, drains and fail-open state of a VIP that a reload from `old` to
    /// `new` only renamed (the same address, port and protocol under a new name, its old name
    /// gone) over to its new name, as the maps carry its counters: a rename must not lift a
    /// drain or put a dead backend back in the ring. Returns the renames, (old, new).
    ///
    /// A VIP renamed and moved (another address, port or protocol) in one reload is not
    /// recognised: the maps take it for a new VIP too (new counters), and a guess from
    /// overlapping backends could carry a drain onto a VIP the operator meant as a new one. Its
    /// drains are forgotten with a reason that says so ([`forgotten_summary`]).
    pub(super) fn rename(&mut self, old: &[HandedVip], new: &Config) -> Vec<(String, String)> {
        let mut renamed = Vec::new();
        for o in old {
            if new.vips.iter().any(|n| n.name == o.name) {
                continue;
            }
            let Some(n) = new.vips.iter().find(|n| {
                (n.address, n.port, n.protocol) == (o.address, o.port, o.protocol)
                    && !old.iter().any(|x| x.name == n.name)
            }) else {
                continue;
            };
            let (from, to) = (o.name.clone(), n.name.clone());
            let moved: Vec<_> = self.down.iter().filter(|(v, _)| *v == from).cloned().collect();
            for (v, b) in moved {
                self.down.remove(&(v, b));
                self.down.insert((to.clone(), b));
            }
            let moved: Vec<_> =
                self.drained.iter().filter(|(v, _)| v.as_ref() == Some(&from)).cloned().collect();
            for (v, a) in moved {
                self.drained.remove(&(v, a));
                self.drained.insert((Some(to.clone()), a));
            }
            if self.fail_open.remove(&from) {
                self.fail_open.insert(to.clone());
            }
            renamed.push((from, to));
        }
        renamed
    }

    /// VIP `v` of a reload's new config as the old config `old` had it: by its name, or by the
    /// one it had before `renamed` (the reload's renames, [`Verdicts::rename`]).
    fn before<'a>(
        old: &'a [HandedVip],
        v: &Vip,
        renamed: &[(String, String)],
    ) -> Option<&'a HandedVip> {
        let was_named = renamed.iter().find(|(_, to)| *to == v.name).map_or(&v.name, |(f, _)| f);
        old.iter().find(|o| o.name == *was_named)
    }

    /// Moves the `address:port` drains of an XDP VIP that a reload from `old` to `new` moves to
    /// another port along with it, as [`Verdicts::hold_new_backends`] carries its health
    /// verdicts: its backends carry the VIP's port, so a drain of A:80 names nothing once the
    /// VIP serves on 8080, and the reload would lift it unasked. A drain of that VIP moves to
    /// the new port; a drain of every VIP covers the moved backend as a drain of that VIP at its
    /// new port (a drain of A:8080 everywhere would take in backends it never covered), and
    /// goes once no VIP of `new` lists its old port. A drain by plain address covers every port
    /// and needs nothing. `renamed` are the renames of the same reload ([`Verdicts::rename`]).
    /// Returns the drains moved: (VIP the drain was of, or none for every VIP, the VIP, the
    /// backend before, after).
    pub(super) fn follow_port(
        &mut self,
        old: &[HandedVip],
        new: &Config,
        renamed: &[(String, String)],
    ) -> Vec<(Option<String>, String, BackendRef, BackendRef)> {
        let mut moved = Vec::new();
        let mut of_every_vip = Vec::new();
        for v in new.vips.iter().filter(|v| v.forwarding != Forwarding::L7) {
            let Some(before) =
                Self::before(old, v, renamed).filter(|o| o.forwarding != Forwarding::L7)
            else {
                continue;
            };
            for b in &v.backends {
                let Some(o) = before.backends.iter().find(|o| o.ip() == b.address) else {
                    continue;
                };
                if o.port() == b.port {
                    continue;
                }
                let from = BackendRef { address: o.ip(), port: Some(o.port()) };
                let to = BackendRef { address: b.address, port: Some(b.port) };
                let this = (Some(v.name.clone()), from);
                if self.drained.remove(&this) {
                    self.drained.insert((Some(v.name.clone()), to));
                    moved.push((Some(v.name.clone()), v.name.clone(), from, to));
                }
                if self.drained.contains(&(None, from)) {
                    self.drained.insert((Some(v.name.clone()), to));
                    moved.push((None, v.name.clone(), from, to));
                    of_every_vip.push(from);
                }
            }
        }
        for from in of_every_vip {
            if !new.vips.iter().any(|v| v.backends.iter().any(|b| from.matches(id(b)))) {
                self.drained.remove(&(None, from));
            }
        }
        moved.sort();
        moved
    }

    /// Holds a backend that a reload from `old` to `new` adds to a health-checked VIP that was
    /// already there down until its check has seen `rise` good probes: a new backend takes no
    /// flow before it has shown it can (it may not be ready yet), and one added to a VIP that
    /// fails open (every backend down) does not end that and take the whole VIP unprobed.
    /// Backends of a VIP new in the file start up, as at a start (a new VIP, or a restart, must
    /// not begin in fail-open), and so do those of a VIP whose pool the reload replaced whole
    /// (no backend that takes new flows stays) or of which it keeps only dead ones (while
    /// another was alive: the VIP was not failing open): held, they would all be down, the VIP
    /// would fail open unprobed (onto the dead backends too), and the first to pass would then
    /// take every flow from the others.
    ///
    /// An XDP VIP's backends carry the VIP's port: one that moves to another port keeps each
    /// backend's verdict by address (the same hosts), rather than holding them all as new.
    /// Returns the backends held.
    /// `renamed` are the renames of the same reload ([`Verdicts::rename`]): a renamed VIP is
    /// the one it was, and backends added to it wait as well.
    pub(super) fn hold_new_backends(
        &mut self,
        old: &[HandedVip],
        new: &Config,
        renamed: &[(String, String)],
    ) -> Vec<(String, SocketAddr)> {
        let mut held = Vec::new();
        for v in new.vips.iter().filter(|v| v.health.is_some()) {
            let Some(before) = Self::before(old, v, renamed) else { continue };
            let by_address = v.forwarding != Forwarding::L7 && before.forwarding != Forwarding::L7;
            let was = |b: &Backend| {
                before
                    .backends
                    .iter()
                    .copied()
                    .find(|o| if by_address { o.ip() == b.address } else { *o == id(b) })
            };
            for b in &v.backends {
                if let Some(o) = was(b)
                    && o != id(b)
                    && self.is_down(&v.name, o)
                {
                    self.down.insert((v.name.clone(), id(b)));
                }
            }
            let takes_flows = |b: &&Backend| b.weight > 0 && !self.is_drained(&v.name, id(b));
            let mut kept = v.backends.iter().filter(takes_flows).filter_map(was).peekable();
            if kept.peek().is_none() {
                continue; // the pool replaced whole
            }
            // A backend kept serves only alive (its verdict by the id it had). With none such,
            // new backends held would be down with every kept one, and the VIP would fail
            // open, onto the dead ones too: they start up, unless the VIP was failing open
            // already (one added must not end that and take the whole VIP unprobed).
            let alive = kept.any(|o| !self.is_down(&v.name, o));
            if !alive && !self.was_failing_open(before, v, &was) {
                continue;
            }
            for b in v.backends.iter().filter(|b| was(b).is_none()) {
                self.down.insert((v.name.clone(), id(b)));
                held.push((v.name.clone(), id(b)));
            }
        }
        held
    }

    /// Was VIP `v` of a new config failing open under the old one, `before` (the same VIP as
    /// [`Verdicts::before`] finds it; `was` finds a backend of `v` in it)? One answer for a
    /// reload and a takeover, from what `before` carries: the running controller's own state
    /// when it has it (a reload's [`Verdicts::handed_vips`], or a handover from an edgelb that
    /// sends it), read as it is. Otherwise (an older edgelb's handover) it is inferred, as
    /// [`Verdicts::effective`] decides it, from the verdicts and drains handed over: a VIP with
    /// backends taking flows (weight above 0, not drained), none of them alive, was failing
    /// open.
    /// A backend's weight then is the one handed over, or without those, the one the new file
    /// gives it (a backend kept at weight 0 taken as a standby then too, which is wrong for a
    /// live one the new file sets to 0 beside a dead one).
    fn was_failing_open(
        &self,
        before: &HandedVip,
        v: &Vip,
        was: &impl Fn(&Backend) -> Option<SocketAddr>,
    ) -> bool {
        if let Some(open) = before.fail_open {
            return open;
        }
        // Its entries in the new file: by the id it had (an XDP VIP moved to another port
        // carries its drains by the new one, `follow_port`).
        let now = |o: SocketAddr| v.backends.iter().filter(move |b| was(b) == Some(o));
        let took_no_flows = |o: SocketAddr| {
            self.is_drained(&v.name, o)
                || now(o).any(|b| self.is_drained(&v.name, id(b)))
                || match before.weight(o) {
                    Some(w) => w == 0,
                    None => now(o).any(|b| b.weight == 0),
                }
        };
        let mut wanted = before.backends.iter().filter(|&&o| !took_no_flows(o)).peekable();
        wanted.peek().is_some() && wanted.all(|&o| self.is_down(&v.name, o))
    }

    /// Forgets verdicts on checks `cfg` no longer has (after a reload), and drains of backends
    /// it no longer has in the drained VIP (or in any VIP, for a drain of all): such a drain
    /// shows nowhere and `undrain` could not name it, yet it would come back to life with the
    /// backend, which would then rejoin drained. Forgets the fail-open state of VIPs it no
    /// longer has too: kept by name, it would have a VIP added back later "end" a fail-open
    /// mode it never had (a false "backends are back" in the log, before the VIP is even in
    /// the maps). Returns the drains forgotten, for the log.
    pub(super) fn reconcile(&mut self, cfg: &Config) -> Vec<(Option<String>, BackendRef)> {
        let checked = Checked::new(cfg);
        self.down.retain(|(v, a)| checked.get(v, *a).is_some());
        self.fail_open.retain(|name| cfg.vips.iter().any(|v| v.name == *name));
        let listed = |vip: &Option<String>, r: &BackendRef| {
            cfg.vips.iter().any(|v| {
                vip.as_ref().is_none_or(|n| *n == v.name)
                    && v.backends.iter().any(|b| r.matches(id(b)))
            })
        };
        let mut gone: Vec<_> =
            self.drained.iter().filter(|(v, a)| !listed(v, a)).cloned().collect();
        gone.sort();
        for d in &gone {
            self.drained.remove(d);
        }
        gone
    }

    /// The runtime drains, for a process taking over.
    pub(super) fn drains(&self) -> Vec<crate::admin::Drain> {
        let mut d: Vec<_> = self
            .drained
            .iter()
            .map(|(vip, r)| crate::admin::Drain {
                backend: r.address,
                port: r.port,
                vip: vip.clone(),
            })
            .collect();
        d.sort_by(|a, b| (&a.vip, a.backend, a.port).cmp(&(&b.vip, b.backend, b.port)));
        d
    }

    /// The backends held dead, for a process taking over.
    pub(super) fn down(&self) -> Vec<crate::admin::Down> {
        let mut d: Vec<_> = self
            .down
            .iter()
            .map(|(vip, backend)| crate::admin::Down { vip: vip.clone(), backend: *backend })
            .collect();
        d.sort_by(|a, b| (&a.vip, a.backend).cmp(&(&b.vip, b.backend)));
        d
    }

    /// Drains `backend` (an address on every port, or one address:port) in `vip`, or in every
    /// VIP.
    pub(super) fn drain(&mut self, vip: Option<String>, backend: impl Into<BackendRef>) {
        self.drained.insert((vip, backend.into()));
    }

    /// Lifts a drain: of `backend` in `vip`, or every drain of `backend` (in every VIP; of an
    /// address without a port, on every port); Ok(false) when there was none to lift. A wider
    /// drain is not lifted in part (that would need an exception per VIP or port): a drain of
    /// every VIP for one of them, or of every port for one of them, is refused, naming the
    /// command that lifts it.
    ///
    /// A drain counts as wider only when it would stay after this lift and still cover a
    /// (VIP, backend) of `cfg` that the request names: a drain of the same address in another
    /// VIP, or on a port no VIP named lists, leaves what the operator asked for undrained, and
    /// must not refuse it (nor send them to a command that is refused in turn).
    pub(super) fn undrain(
        &mut self,
        cfg: &Config,
        vip: Option<String>,
        backend: impl Into<BackendRef>,
    ) -> Result<bool, String> {
        let backend = backend.into();
        let lifted = |v: &Option<String>, r: &BackendRef| {
            r.address == backend.address
                && vip.as_ref().is_none_or(|n| v.as_ref() == Some(n))
                && backend.port.is_none_or(|p| r.port == Some(p))
        };
        // The (VIP, backend) pairs of the config the request names.
        let targets: Vec<(&str, SocketAddr)> = cfg
            .vips
            .iter()
            .filter(|v| vip.as_deref().is_none_or(|n| n == v.name))
            .flat_map(|v| {
                v.backends.iter().map(id).filter(|b| backend.matches(*b)).map(|b| (&*v.name, b))
            })
            .collect();
        let covers = |v: &Option<String>, r: &BackendRef| {
            targets.iter().any(|(n, b)| v.as_deref().is_none_or(|v| v == *n) && r.matches(*b))
        };
        // The least, so that the answer does not depend on the set's order.
        let wider = self.drained.iter().filter(|(v, r)| !lifted(v, r) && covers(v, r)).min();
        if let Some((v, r)) = wider {
            let lift = match v {
                None => format!("`edgelb undrain {r}`"),
                Some(v) => format!("`edgelb undrain {r} --vip {v}`"),
            };
            return Err(match (v, &vip) {
                (None, Some(named)) => format!(
                    "{r} is drained on every VIP, `{named}` included: {lift} lifts that drain"
                ),
                _ => format!(
                    "{r} is drained on every port, {backend} included{}: {lift} lifts that drain",
                    v.as_ref().map_or(String::new(), |v| format!(" (in VIP `{v}`)"))
                ),
            });
        }
        let before = self.drained.len();
        self.drained.retain(|(v, r)| !lifted(v, r));
        Ok(self.drained.len() < before)
    }

    /// The config as the maps should have it: configured minus dead backends, drained ones at
    /// weight 0. A VIP none of whose backends that take new flows (weight above 0, not drained)
    /// is alive fails open: it serves every configured backend, the dead ones too, as the
    /// config lists them now. When every check fails at once, the checks (or what they depend
    /// on) are the likelier fault, and spreading the traffic over the whole pool beats both
    /// dropping it and piling it onto whichever backend happened to fail last.
    pub(super) fn effective(&mut self, cfg: &Config) -> Config {
        self.fail_open_known = true;
        let mut eff = cfg.clone();
        for vip in &mut eff.vips {
            let takes_flows = |b: &&Backend| b.weight > 0 && !self.is_drained(&vip.name, id(b));
            let wanted = vip.backends.iter().filter(takes_flows).count();
            let serving = vip
                .backends
                .iter()
                .filter(takes_flows)
                .filter(|b| !self.is_down(&vip.name, id(b)))
                .count();
            let open = wanted > 0 && serving == 0;
            if open {
                if self.fail_open.insert(vip.name.clone()) {
                    error!(vip = %vip, "every backend is down: serving all of them anyway (fail open)");
                }
            } else {
                if self.fail_open.remove(&vip.name) {
                    warn!(vip = %vip, "backends are back: fail-open mode ended");
                }
                vip.backends.retain(|b| !self.is_down(&vip.name, id(b)));
            }
            for b in &mut vip.backends {
                if self.is_drained(&vip.name, id(b)) {
                    b.weight = 0;
                }
            }
        }
        eff
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn cfg(backends: &[(&str, u32)], health: bool) -> Config {
        let list: Vec<String> = backends
            .iter()
            .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
            .collect();
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{}]\n{}",
            list.join(", "),
            if health { "[vip.health]\n" } else { "" }
        );
        Config::parse(&text, "t.toml".as_ref()).expect("valid")
    }

    /// `c`'s VIPs as the config alone gives them (with the weights, without the fail-open
    /// state, which the steps other than the hold do not read).
    fn vips(c: &Config) -> Vec<HandedVip> {
        HandedVip::all(c)
    }

    /// `c`'s VIPs as an older edgelb hands them over: neither the weights nor the fail-open
    /// state.
    fn older(c: &Config) -> Vec<HandedVip> {
        let mut vips = HandedVip::all(c);
        for v in &mut vips {
            (v.weights, v.fail_open) = (Vec::new(), None);
        }
        vips
    }

    /// What a takeover is handed by a running edgelb with `running` verdicts on config `old`
    /// (its drains, dead backends and VIPs), through JSON, taken into a fresh process. `vips`
    /// edits the VIPs handed over (to send them as an older edgelb would).
    fn handed_over(
        running: &Verdicts,
        old: &Config,
        vips: impl FnOnce(&mut Vec<HandedVip>),
    ) -> (Verdicts, Vec<HandedVip>) {
        let mut handed_vips = running.handed_vips(old);
        vips(&mut handed_vips);
        let answer = crate::admin::Response {
            drains: running.drains(),
            down: running.down(),
            vips: Some(handed_vips),
            ..crate::admin::Response::ok("handing over")
        };
        let wire = serde_json::to_string(&answer).unwrap();
        let handed: crate::admin::Response = serde_json::from_str(&wire).unwrap();
        let mut taken = Verdicts::default();
        for d in handed.drains {
            taken.drain(d.vip, BackendRef { address: d.backend, port: d.port });
        }
        for d in handed.down {
            taken.set_health(&d.vip, d.backend, false);
        }
        (taken, handed.vips.expect("VIPs handed over"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A backend of the test VIP (port 80) by its address.
    fn at(s: &str) -> SocketAddr {
        SocketAddr::new(ip(s), 80)
    }

    fn live(v: &mut Verdicts, c: &Config) -> Vec<(IpAddr, u32)> {
        v.effective(c).vips[0].backends.iter().map(|b| (b.address, b.weight)).collect()
    }

    const A: &str = "198.18.0.11";
    const B: &str = "198.18.0.12";
    const C: &str = "198.18.0.13";

    #[test]
    fn fail_open_serves_every_configured_backend_as_the_config_lists_it_now() {
        let mut v = Verdicts::default();
        let both = cfg(&[(A, 1), (B, 1)], true);
        assert!(v.set_health("web", at(A), false));
        assert_eq!(live(&mut v, &both), [(ip(B), 1)]);
        assert!(!v.is_fail_open("web"));
        // B, the last one alive, goes too: the whole pool serves, not B alone.
        assert!(v.set_health("web", at(B), false));
        assert_eq!(live(&mut v, &both), [(ip(A), 1), (ip(B), 1)], "fail open on every backend");
        assert!(v.is_fail_open("web"));
        // New weights count while the VIP is open.
        assert_eq!(live(&mut v, &cfg(&[(A, 1), (B, 7)], true)), [(ip(A), 1), (ip(B), 7)]);
        // B removed by a reload: not brought back; A, dead too, is all the config has left.
        let only_a = cfg(&[(A, 3)], true);
        v.reconcile(&only_a);
        assert_eq!(live(&mut v, &only_a), [(ip(A), 3)]);
        assert!(v.is_fail_open("web"));
        // A back: fail open ends.
        assert!(v.set_health("web", at(A), true));
        assert_eq!(live(&mut v, &only_a), [(ip(A), 3)]);
        assert!(!v.is_fail_open("web"));
    }

    /// A VIP a reload removes takes its fail-open state with it: added back by a later reload,
    /// it starts afresh, and does not "end" a fail-open mode of its old self (a false "backends
    /// are back" in the log).
    #[test]
    fn a_removed_vip_leaves_no_fail_open_state() {
        let mut v = Verdicts::default();
        let web = cfg(&[(A, 1)], true);
        assert!(v.set_health("web", at(A), false));
        assert_eq!(live(&mut v, &web), [(ip(A), 1)]);
        assert!(v.is_fail_open("web"));
        let mut other = cfg(&[(B, 1)], true);
        // Another address too: the same one under a new name would be a rename, which carries
        // the state over.
        (other.vips[0].name, other.vips[0].address) = ("other".to_owned(), ip("198.18.1.2"));
        v.carry_over(&v.handed_vips(&web), &other);
        assert!(!v.is_fail_open("web"), "the fail-open state of a VIP removed is forgotten");
        assert_eq!(v.handed_vips(&other)[0].fail_open, Some(false));
        // Added back: its backend (no verdict any more) serves, and the VIP never failed open.
        v.carry_over(&v.handed_vips(&other), &web);
        assert!(!v.is_fail_open("web"));
        assert_eq!(live(&mut v, &web), [(ip(A), 1)]);
        assert!(!v.is_fail_open("web"));
    }

    /// A reload that only renames a VIP keeps its drains and dead backends under the new name;
    /// one that also moves it (another port) is another VIP, and they go.
    #[test]
    fn a_renamed_vip_keeps_its_drains_and_verdicts() {
        let named = |name: &str, port: u16| {
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nbackends = [{{ address = \"{A}\" }}, {{ address = \"{B}\" }}, {{ address = \"{C}\" }}]\n[vip.health]\nport = 80\n"
            );
            Config::parse(&text, "t.toml".as_ref()).expect("valid")
        };
        let (web, www) = (named("web", 80), named("www", 80));
        let mut v = Verdicts::default();
        v.drain(Some("web".into()), ip(C));
        assert!(v.set_health("web", at(A), false));
        assert_eq!(v.rename(&vips(&web), &www), [("web".to_owned(), "www".to_owned())]);
        assert!(v.reconcile(&www).is_empty(), "no drain forgotten");
        assert!(v.is_drained("www", at(C)) && !v.is_drained("web", at(C)));
        assert!(v.is_down("www", at(A)));
        assert_eq!(live(&mut v, &www), [(ip(B), 1), (ip(C), 0)]);
        // Renamed and moved to another port: another VIP, whose drains and verdicts start anew.
        let moved = named("api", 81);
        assert!(v.rename(&vips(&www), &moved).is_empty());
        assert_eq!(v.reconcile(&moved), [(Some("www".to_owned()), ip(C).into())]);
        assert!(!v.is_down("api", at(A)));
    }

    /// A reload that renames a VIP and moves it at once forgets its drains, and says why truly:
    /// the VIP is gone (not "the config no longer lists the backend": it does, under the new
    /// name), and when a rename is recognised. A drain of a backend a VIP still there dropped,
    /// or of every VIP, says that instead.
    #[test]
    fn a_drain_forgotten_says_why() {
        let text = |name: &str, port: u16, backends: &[&str]| {
            let list: Vec<String> =
                backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"{name}\"\naddress = \"198.18.1.1\"\nport = {port}\nbackends = [{}]\n",
                list.join(", ")
            );
            Config::parse(&text, "t.toml".as_ref()).expect("valid")
        };
        let (web, www) = (text("web", 80, &[A, B]), text("www", 8080, &[A, B]));
        let mut v = Verdicts::default();
        v.drain(Some("web".into()), ip(A));
        let carried = v.carry_over(&vips(&web), &www);
        assert!(carried.renamed.is_empty(), "renamed and moved at once: not recognised");
        assert_eq!(carried.forgotten, [(Some("web".to_owned()), ip(A).into())]);
        let said = forgotten_summary(&www, &carried.forgotten).expect("a drain forgotten");
        assert!(
            said.contains("198.18.0.11 in VIP `web` (VIP `web` is no longer in the config)"),
            "{said}"
        );
        assert!(said.contains(RENAME_RULE), "{said}");
        assert!(!said.contains("no longer lists"), "{said}");
        // In two steps, the drain follows: renamed in place, then moved under its new name.
        let mut v = Verdicts::default();
        v.drain(Some("web".into()), ip(A));
        let renamed_only = text("www", 80, &[A, B]);
        assert!(v.carry_over(&vips(&web), &renamed_only).forgotten.is_empty());
        assert!(v.carry_over(&vips(&renamed_only), &www).forgotten.is_empty());
        assert!(v.is_drained("www", SocketAddr::new(ip(A), 8080)));
        // A backend gone from a VIP still there, and a drain of every VIP.
        let mut v = Verdicts::default();
        v.drain(Some("web".into()), ip(A));
        v.drain(None, ip(B));
        let none = text("web", 80, &[C]);
        let forgotten = v.reconcile(&none);
        let said = forgotten_summary(&none, &forgotten).expect("drains forgotten");
        assert_eq!(
            said,
            "drains forgotten: 198.18.0.12 in every VIP (no VIP lists 198.18.0.12 any more), 198.18.0.11 in VIP `web` (VIP `web` no longer lists 198.18.0.11)"
        );
        assert_eq!(forgotten_summary(&none, &[]), None);
    }

    /// A takeover carries the drains and verdicts handed over (by the old VIP names and backend
    /// ids) over to its config through the VIPs handed over, and ends as a reload to that config
    /// would: here a VIP renamed (a drain and a dead backend), another moved to another port (an
    /// `address:port` drain, a dead backend) and a backend added (held until its check passes).
    #[test]
    fn a_takeover_ends_as_a_reload_to_its_file_would() {
        let two = |web: &str, api_port: u16, extra: bool| {
            let more = if extra { format!(", {{ address = \"{C}\" }}") } else { String::new() };
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"{web}\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{{ address = \"{A}\" }}, {{ address = \"{B}\" }}{more}]\n[vip.health]\n[[vip]]\nname = \"api\"\naddress = \"198.18.1.2\"\nport = {api_port}\nbackends = [{{ address = \"{A}\" }}, {{ address = \"{B}\" }}]\n[vip.health]\n"
            );
            Config::parse(&text, "t.toml".as_ref()).expect("valid")
        };
        let (old, new) = (two("web", 443, false), two("www", 8443, true));
        let mut running = Verdicts::default();
        running.drain(Some("web".into()), ip(B));
        running.drain(Some("api".into()), "198.18.0.11:443".parse::<BackendRef>().unwrap());
        assert!(running.set_health("web", at(A), false));
        assert!(running.set_health("api", SocketAddr::new(ip(B), 443), false));
        running.effective(&old);
        // A reload from the old config to the new.
        let mut reloaded = running.clone();
        let by_reload = reloaded.carry_over(&reloaded.handed_vips(&old), &new);
        // A takeover: what the handover carries, through JSON, into a fresh process.
        let (mut taken, handed) = handed_over(&running, &old, |_| ());
        let by_takeover = taken.carry_over(&handed, &new);
        assert_eq!(by_takeover.renamed, [("web".to_owned(), "www".to_owned())]);
        assert_eq!(by_takeover.held, [("www".to_owned(), at(C))]);
        assert_eq!(by_takeover.moved.len(), 1, "{:?}", by_takeover.moved);
        assert!(by_takeover.forgotten.is_empty(), "{:?}", by_takeover.forgotten);
        assert_eq!(taken.drains(), reloaded.drains());
        assert_eq!(taken.down(), reloaded.down());
        assert_eq!(
            (by_takeover.renamed, by_takeover.held, by_takeover.moved),
            (by_reload.renamed, by_reload.held, by_reload.moved)
        );
        assert!(taken.is_drained("www", at(B)) && taken.is_down("www", at(A)));
        assert!(taken.is_drained("api", SocketAddr::new(ip(A), 8443)));
        assert!(taken.is_down("api", SocketAddr::new(ip(B), 8443)));
        assert!(taken.is_down("www", at(C)), "C waits for its check");
    }

    /// A reload that moves an XDP VIP to another port moves its `address:port` drains with it
    /// (the same hosts), rather than forget them and put the backend back into service; a
    /// drain of every VIP stays a drain of that VIP's backend; another VIP's are untouched.
    #[test]
    fn an_address_port_drain_follows_its_vip_to_another_port() {
        let web_on = |p: u16| {
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = {p}\nbackends = [{{ address = \"{A}\" }}, {{ address = \"{B}\" }}]\n[[vip]]\nname = \"api\"\naddress = \"198.18.1.2\"\nport = 8000\nforwarding = \"l7\"\nbackends = [{{ address = \"{B}\", port = 8080 }}]\n"
            );
            Config::parse(&text, "t.toml".as_ref()).expect("valid")
        };
        let r = |a: &str, p: u16| BackendRef { address: ip(a), port: Some(p) };
        let (old, new) = (web_on(80), web_on(8080));
        let mut v = Verdicts::default();
        v.drain(Some("web".into()), r(A, 80));
        v.drain(None, r(B, 80));
        let renamed = v.rename(&vips(&old), &new);
        assert_eq!(
            v.follow_port(&vips(&old), &new, &renamed),
            [
                (None, "web".to_owned(), r(B, 80), r(B, 8080)),
                (Some("web".to_owned()), "web".to_owned(), r(A, 80), r(A, 8080)),
            ]
        );
        v.hold_new_backends(&vips(&old), &new, &renamed);
        assert!(v.reconcile(&new).is_empty(), "no drain forgotten");
        assert!(v.is_drained("web", SocketAddr::new(ip(A), 8080)));
        assert!(v.is_drained("web", SocketAddr::new(ip(B), 8080)));
        assert!(!v.is_drained("api", SocketAddr::new(ip(B), 8080)), "api's B:8080 never was");
        assert_eq!(
            v.effective(&new).vips[0].backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [0, 0]
        );
        // And back: the drains, of web now, follow again.
        let renamed = v.rename(&vips(&new), &old);
        assert_eq!(v.follow_port(&vips(&new), &old, &renamed).len(), 2);
        assert!(v.reconcile(&old).is_empty());
        assert!(v.is_drained("web", at(A)) && v.is_drained("web", at(B)));
        // A drain by plain address covers every port: nothing to move.
        let mut w = Verdicts::default();
        w.drain(Some("web".into()), ip(A));
        assert!(w.follow_port(&vips(&old), &new, &[]).is_empty());
        assert!(w.is_drained("web", SocketAddr::new(ip(A), 8080)));
    }

    /// A backend a reload adds to a checked VIP takes no flow before its check passes, not even
    /// when the VIP fails open; the backends of a VIP new in the file start up.
    #[test]
    fn a_backend_added_by_a_reload_waits_for_its_check() {
        let (two, three) = (cfg(&[(A, 1), (B, 1)], true), cfg(&[(A, 1), (B, 1), (C, 1)], true));
        let mut v = Verdicts::default();
        assert_eq!(v.hold_new_backends(&vips(&two), &three, &[]), [("web".to_owned(), at(C))]);
        v.reconcile(&three);
        assert_eq!(live(&mut v, &three), [(ip(A), 1), (ip(B), 1)], "C waits for its check");
        assert!(v.set_health("web", at(C), true));
        assert_eq!(live(&mut v, &three), [(ip(A), 1), (ip(B), 1), (ip(C), 1)]);
        // A VIP failing open keeps failing open when a backend is added: C is served with the
        // others, not alone.
        let mut v = Verdicts::default();
        v.set_health("web", at(A), false);
        v.set_health("web", at(B), false);
        assert_eq!(live(&mut v, &two), [(ip(A), 1), (ip(B), 1)]);
        v.hold_new_backends(&vips(&two), &three, &[]);
        assert_eq!(live(&mut v, &three), [(ip(A), 1), (ip(B), 1), (ip(C), 1)]);
        assert!(v.is_fail_open("web"));
        // Without a check, or for a VIP new in the file, nothing is held.
        let mut v = Verdicts::default();
        assert!(
            v.hold_new_backends(&vips(&cfg(&[(A, 1)], false)), &cfg(&[(A, 1), (C, 1)], false), &[])
                .is_empty()
        );
        let mut other = cfg(&[(A, 1)], true);
        other.vips[0].name = "api".into();
        assert!(v.hold_new_backends(&vips(&other), &three, &[]).is_empty());
        // A VIP the same reload renames is the one it was: what it adds waits too.
        let mut renamed = three.clone();
        renamed.vips[0].name = "www".into();
        let mut v = Verdicts::default();
        let renames = v.rename(&vips(&two), &renamed);
        assert_eq!(renames, [("web".to_owned(), "www".to_owned())]);
        assert_eq!(
            v.hold_new_backends(&vips(&two), &renamed, &renames),
            [("www".to_owned(), at(C))]
        );
    }

    /// A reload that moves a checked XDP VIP to another port keeps its backends' verdicts (the
    /// same hosts), and one that replaces the whole pool starts the new backends up, as for a
    /// new VIP: neither fails open unprobed and then puts every flow on the first to pass.
    #[test]
    fn a_new_port_or_a_new_pool_does_not_fail_open() {
        let port = |p: u16, backends: &[&str]| {
            let list: Vec<String> =
                backends.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
            let text = format!(
                "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = {p}\nbackends = [{}]\n[vip.health]\n",
                list.join(", ")
            );
            Config::parse(&text, "t.toml".as_ref()).expect("valid")
        };
        let (old, moved) = (port(80, &[A, B, C]), port(8080, &[A, B, C]));
        let mut v = Verdicts::default();
        assert!(v.set_health("web", at(C), false));
        assert!(
            v.hold_new_backends(&vips(&old), &moved, &[]).is_empty(),
            "the same hosts: none held"
        );
        v.reconcile(&moved);
        assert!(!v.is_fail_open("web"));
        assert_eq!(live(&mut v, &moved), [(ip(A), 1), (ip(B), 1)], "C stays down");
        assert!(v.is_down("web", SocketAddr::new(ip(C), 8080)));
        // A whole new pool: up at once, as a new VIP's, not held into fail-open.
        let (d, e) = ("198.18.0.14", "198.18.0.15");
        let swapped = port(8080, &[d, e]);
        assert!(v.hold_new_backends(&vips(&moved), &swapped, &[]).is_empty());
        v.reconcile(&swapped);
        assert_eq!(live(&mut v, &swapped), [(ip(d), 1), (ip(e), 1)]);
        assert!(!v.is_fail_open("web"));
        // A pool with one backend kept: the new one waits for its check, as before.
        let grown = port(8080, &[d, e, A]);
        assert_eq!(
            v.hold_new_backends(&vips(&swapped), &grown, &[]),
            [("web".to_owned(), SocketAddr::new(ip(A), 8080))]
        );
    }

    /// The reply to a reload says which backends wait for their check, by VIP.
    #[test]
    fn the_backends_held_are_said() {
        assert_eq!(held_summary(&[]), None);
        let held = [
            ("web".to_owned(), at(A)),
            ("web".to_owned(), at(B)),
            ("web7".to_owned(), SocketAddr::new(ip(C), 8080)),
        ];
        assert_eq!(
            held_summary(&held).as_deref(),
            Some(
                "3 backend(s) added take traffic once their health check has passed `rise` times: 2 in VIP `web`, 1 in VIP `web7`"
            )
        );
    }

    /// A reload that replaces the one live backend while a dead one stays does not hold the new
    /// backend down: held, every backend that takes new flows would be down and the VIP would
    /// fail open, onto the dead one too. Only a VIP already failing open keeps holding.
    #[test]
    fn a_dead_backend_kept_does_not_hold_the_new_ones_into_fail_open() {
        let (old, new) = (cfg(&[(A, 1), (B, 1)], true), cfg(&[(A, 1), (C, 1)], true));
        let mut v = Verdicts::default();
        assert!(v.set_health("web", at(A), false));
        assert_eq!(live(&mut v, &old), [(ip(B), 1)]);
        let carried = v.carry_over(&v.handed_vips(&old), &new);
        assert!(carried.held.is_empty(), "C held: {:?}", carried.held);
        assert_eq!(live(&mut v, &new), [(ip(C), 1)], "C serves, dead A stays out");
        assert!(!v.is_fail_open("web"));
        assert!(v.is_down("web", at(A)), "A's verdict stays");
        // A kept drained (or at weight 0) while alive counts no more than a dead one.
        let mut v = Verdicts::default();
        v.drain(Some("web".into()), ip(A));
        live(&mut v, &old);
        assert!(v.carry_over(&v.handed_vips(&old), &new).held.is_empty());
        assert_eq!(live(&mut v, &new), [(ip(A), 0), (ip(C), 1)]);
        // A live one kept: C waits for its check, as any backend added.
        let mut v = Verdicts::default();
        assert!(v.set_health("web", at(B), false));
        live(&mut v, &old);
        assert_eq!(
            v.carry_over(&v.handed_vips(&old), &cfg(&[(B, 1), (A, 1), (C, 1)], true)).held,
            [("web".to_owned(), at(C))]
        );
        // The VIP failing open before (A and B dead): C is held, and served with A, not alone.
        let mut v = Verdicts::default();
        assert!(v.set_health("web", at(A), false));
        assert!(v.set_health("web", at(B), false));
        assert_eq!(live(&mut v, &old), [(ip(A), 1), (ip(B), 1)]);
        let before = v.clone();
        assert_eq!(v.carry_over(&v.handed_vips(&old), &new).held, [("web".to_owned(), at(C))]);
        assert_eq!(live(&mut v, &new), [(ip(A), 1), (ip(C), 1)]);
        assert!(v.is_fail_open("web"));
        // The same handed over to a takeover, by this edgelb or by an older one, which hands
        // the verdicts but not the fail-open state: every backend of the old VIP dead is
        // failing open too.
        let (mut t, handed) = handed_over(&before, &old, |_| ());
        assert_eq!(t.carry_over(&handed, &new).held, [("web".to_owned(), at(C))]);
        let mut t = Verdicts::default();
        assert!(t.set_health("web", at(A), false));
        assert!(t.set_health("web", at(B), false));
        assert_eq!(t.carry_over(&older(&old), &new).held, [("web".to_owned(), at(C))]);
        // A takeover from an older edgelb of a VIP failing open with a standby at weight 0
        // alive (A) and B dead: the weights are not handed over, but A's entry in the new file,
        // still at weight 0, counts as drained before, so C is held rather than taking the VIP
        // unprobed.
        let standby = cfg(&[(A, 0), (B, 1)], true);
        let mut w = Verdicts::default();
        assert!(w.set_health("web", at(B), false));
        assert_eq!(live(&mut w, &standby), [(ip(A), 0), (ip(B), 1)]);
        assert!(w.is_fail_open("web"), "the running edgelb fails open");
        let mut t = Verdicts::default();
        assert!(t.set_health("web", at(B), false));
        assert_eq!(
            t.carry_over(&older(&standby), &cfg(&[(A, 0), (B, 1), (C, 1)], true)).held,
            [("web".to_owned(), at(C))]
        );
        // A reload reads the state: A alive at weight 1 beside B dead serves, and the reload
        // that sets A to 0 and adds C starts C up (held, the VIP would fail open onto B).
        let mut r = Verdicts::default();
        assert!(r.set_health("web", at(B), false));
        let serving = cfg(&[(A, 1), (B, 1)], true);
        assert_eq!(live(&mut r, &serving), [(ip(A), 1)]);
        assert!(!r.is_fail_open("web"));
        let new = cfg(&[(A, 0), (B, 1), (C, 1)], true);
        assert!(r.carry_over(&r.handed_vips(&serving), &new).held.is_empty());
        assert!(!r.is_fail_open("web"));
    }

    /// A takeover is handed the running VIP's fail-open state and weights, and decides as a
    /// reload to its file does: a file that sets a live backend to weight 0 beside a dead one
    /// while adding another starts the new one up (the VIP was not failing open; held, it would
    /// fail open onto the dead one until the new one passes its check). Handed the weights
    /// alone, it works the state out from them; handed neither (an older edgelb), it can only
    /// guess from its own file, as before, and holds the new backend.
    #[test]
    fn a_takeover_is_handed_the_fail_open_state_and_the_weights() {
        let serving = cfg(&[(A, 1), (B, 1)], true);
        let new = cfg(&[(A, 0), (B, 1), (C, 1)], true);
        let mut running = Verdicts::default();
        assert!(running.set_health("web", at(B), false));
        assert_eq!(live(&mut running, &serving), [(ip(A), 1)]);
        assert!(!running.is_fail_open("web"));
        // The reload to the new file.
        let mut reloaded = running.clone();
        let by_reload = reloaded.carry_over(&reloaded.handed_vips(&serving), &new);
        assert!(by_reload.held.is_empty(), "{:?}", by_reload.held);
        assert_eq!(live(&mut reloaded, &new), [(ip(A), 0), (ip(C), 1)]);
        // A takeover with the new file: the same.
        let (mut taken, handed) = handed_over(&running, &serving, |_| ());
        assert_eq!(handed[0].fail_open, Some(false));
        assert_eq!(handed[0].weights, [1, 1]);
        let by_takeover = taken.carry_over(&handed, &new);
        assert!(by_takeover.held.is_empty(), "C held: {:?}", by_takeover.held);
        assert_eq!(live(&mut taken, &new), [(ip(A), 0), (ip(C), 1)], "C serves, not B");
        assert!(!taken.is_fail_open("web"));
        assert_eq!(taken.down(), reloaded.down());
        // The weights alone: the state worked out from them.
        let (mut taken, handed) =
            handed_over(&running, &serving, |v| v.iter_mut().for_each(|v| v.fail_open = None));
        assert!(taken.carry_over(&handed, &new).held.is_empty());
        // The state alone, against the weights: the state is what the running edgelb did.
        let (mut taken, handed) =
            handed_over(&running, &serving, |v| v.iter_mut().for_each(|v| v.weights = vec![0, 1]));
        assert!(taken.carry_over(&handed, &new).held.is_empty());
        // An older edgelb's handover, on the wire without either: parsed, and the state
        // inferred from the new file's weights (A at 0 taken as a standby then too): C held.
        let line = r#"{"ok":true,"message":"handing over","down":[{"vip":"web","backend":"198.18.0.12:80"}],"vips":[{"name":"web","address":"198.18.1.1","port":80,"protocol":"tcp","forwarding":"ipip","backends":["198.18.0.11:80","198.18.0.12:80"]}]}"#;
        let handed: crate::admin::Response = serde_json::from_str(line).unwrap();
        let mut taken = Verdicts::default();
        for d in handed.down {
            taken.set_health(&d.vip, d.backend, false);
        }
        let vips = handed.vips.expect("an older edgelb's VIPs parse");
        assert_eq!((vips[0].weights.len(), vips[0].fail_open), (0, None));
        assert_eq!(taken.carry_over(&vips, &new).held, [("web".to_owned(), at(C))]);
        assert_eq!(live(&mut taken, &new), [(ip(A), 0), (ip(B), 1), (ip(C), 1)]);
        assert!(taken.is_fail_open("web"), "fails open onto B until C passes its check");
    }

    #[test]
    fn a_drained_backend_alive_does_not_keep_a_dead_pool_from_failing_open() {
        let mut v = Verdicts::default();
        let c = cfg(&[(A, 1), (B, 1), (C, 1)], true);
        v.drain(Some("web".into()), ip(C));
        assert!(v.set_health("web", at(A), false));
        assert!(v.set_health("web", at(B), false));
        // C alone is alive, but drained: no backend would take a new flow.
        assert_eq!(live(&mut v, &c), [(ip(A), 1), (ip(B), 1), (ip(C), 0)]);
        assert!(v.is_fail_open("web"));
        // C dead as well: the same.
        assert!(v.set_health("web", at(C), false));
        assert_eq!(live(&mut v, &c), [(ip(A), 1), (ip(B), 1), (ip(C), 0)]);
        // A standby at weight 0 in the file, alive, counts no more than a drained one.
        let mut w = Verdicts::default();
        let standby = cfg(&[(A, 1), (C, 0)], true);
        assert!(w.set_health("web", at(A), false));
        assert_eq!(live(&mut w, &standby), [(ip(A), 1), (ip(C), 0)]);
        assert!(w.is_fail_open("web"));
        // Every backend drained by the operator: no new flows anywhere, and no fail open.
        let mut x = Verdicts::default();
        x.drain(None, ip(A));
        x.drain(None, ip(B));
        let two = cfg(&[(A, 1), (B, 1)], true);
        assert!(x.set_health("web", at(A), false));
        assert_eq!(live(&mut x, &two), [(ip(B), 0)]);
        assert!(!x.is_fail_open("web"));
    }

    #[test]
    fn verdicts_of_checks_reconciled_away_are_dropped_and_not_taken_again() {
        let mut v = Verdicts::default();
        let checked = cfg(&[(A, 1), (B, 1)], true);
        let is_checked =
            |c: &Config, vip: &str, b: SocketAddr| Checked::new(c).get(vip, b).is_some();
        assert!(is_checked(&checked, "web", at(A)));
        v.set_health("web", at(A), false);
        let unchecked = cfg(&[(A, 1), (B, 1)], false);
        v.reconcile(&unchecked);
        assert!(!v.is_down("web", at(A)));
        // The probe that was in flight when the check went must not count.
        assert!(!is_checked(&unchecked, "web", at(A)));
        assert!(!is_checked(&checked, "other", at(A)));
        assert!(!is_checked(&checked, "web", at("198.18.0.99")));
        assert!(!is_checked(&checked, "web", SocketAddr::new(ip(A), 81)), "another port");
    }

    /// Health events are looked up by VIP name and backend address and port: an L7 VIP's
    /// backends on one address apart, each with its health metrics' labels; nothing of a VIP
    /// without a check, of another VIP or of a route pool (which no check probes).
    #[test]
    fn checked_backends_are_found_by_vip_address_and_port() {
        let c = Config::parse(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web7\"\naddress = \"127.0.0.1\"\nport = 8000\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.1\", port = 8001 }, { address = \"127.0.0.1\", port = 8002 }]\n[vip.health]\n[[vip.route]]\npath_prefix = \"/r/\"\nbackends = [{ address = \"127.0.0.3\", port = 8001 }]\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{ address = \"198.18.0.11\" }]\n[[vip]]\nname = \"checked\"\naddress = \"198.18.1.2\"\nport = 80\nbackends = [{ address = \"198.18.0.11\" }]\n[vip.health]\n",
            "t.toml".as_ref(),
        )
        .expect("valid");
        let checked = Checked::new(&c);
        let found = |vip: &str, b: &str| {
            checked.get(vip, b.parse().unwrap()).map(|f| (f.l7, f.labels.backend.clone()))
        };
        assert_eq!(found("web7", "127.0.0.1:8001"), Some((true, "127.0.0.1:8001".into())));
        assert_eq!(found("web7", "127.0.0.1:8002"), Some((true, "127.0.0.1:8002".into())));
        assert_eq!(found("web7", "127.0.0.1:8003"), None, "another port");
        assert_eq!(found("web7", "127.0.0.3:8001"), None, "a route pool's");
        assert_eq!(found("checked", "198.18.0.11:80"), Some((false, "198.18.0.11".into())));
        assert_eq!(found("web", "198.18.0.11:80"), None, "a VIP without a check");
        assert_eq!(
            checked.get("web7", "127.0.0.1:8001".parse().unwrap()).unwrap().labels.vip,
            "web7"
        );
    }

    #[test]
    fn drains_of_one_vip_and_of_every_vip() {
        let mut v = Verdicts::default();
        let c = cfg(&[(A, 2), (B, 1)], false);
        v.drain(None, ip(A));
        assert_eq!(live(&mut v, &c), [(ip(A), 0), (ip(B), 1)]);
        let e = v.undrain(&c, Some("web".into()), ip(A)).expect_err("a drain of every VIP stays");
        assert!(e.contains("edgelb undrain 198.18.0.11"), "{e}");
        assert!(v.is_drained("web", at(A)));
        v.undrain(&c, None, ip(A)).unwrap();
        assert_eq!(live(&mut v, &c), [(ip(A), 2), (ip(B), 1)]);
        v.drain(Some("web".into()), ip(B));
        assert!(v.is_drained("web", at(B)) && !v.is_drained("other", at(B)));
        assert_eq!(v.undrain(&c, Some("web".into()), ip(B)), Ok(true));
        assert!(!v.is_drained("web", at(B)));
        assert_eq!(v.undrain(&c, Some("web".into()), ip(B)), Ok(false), "nothing left to lift");
        assert_eq!(v.undrain(&c, None, ip(B)), Ok(false));
    }

    /// A drain of a backend the config no longer lists (in that VIP, or anywhere for a drain of
    /// all) is forgotten at the reload, rather than live on invisible, out of `undrain`'s reach,
    /// until the backend comes back, drained.
    #[test]
    fn drains_of_backends_gone_from_the_config_are_forgotten() {
        let mut v = Verdicts::default();
        v.drain(None, ip(A));
        v.drain(Some("web".into()), ip(B));
        v.drain(Some("gone".into()), ip(A));
        assert_eq!(
            v.reconcile(&cfg(&[(A, 1), (B, 1)], false)),
            [(Some("gone".into()), ip(A).into())]
        );
        assert!(v.is_drained("web", at(A)) && v.is_drained("web", at(B)));
        let forgotten = v.reconcile(&cfg(&[(B, 1)], false));
        assert_eq!(forgotten, [(None, ip(A).into())]);
        assert!(v.is_drained("web", at(B)));
        // Back in the file, it is not drained any more.
        assert!(!v.is_drained("web", at(A)));
        assert!(v.reconcile(&cfg(&[(A, 1), (B, 1)], false)).is_empty());
        assert!(!v.is_drained("web", at(A)));
    }

    /// An XDP VIP `web` (port 80) and an L7 VIP `api` listing the same host on 8080.
    fn web_and_api() -> Config {
        let text = format!(
            "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\ngateway_mac = \"02:00:00:00:00:fe\"\n[[vip]]\nname = \"web\"\naddress = \"198.18.1.1\"\nport = 80\nbackends = [{{ address = \"{A}\" }}]\n[[vip]]\nname = \"api\"\naddress = \"198.18.1.2\"\nport = 8000\nforwarding = \"l7\"\nbackends = [{{ address = \"{A}\", port = 8080 }}]\n"
        );
        Config::parse(&text, "t.toml".as_ref()).expect("valid")
    }

    /// Two drains of one address that cover different backends: the one in another VIP (and
    /// on another port) is not wider than the `address:port` undrain, which lifts its own drain
    /// and leaves the other; one that does cover the backend named still refuses, pointing at a
    /// command that works.
    #[test]
    fn an_undrain_is_refused_only_for_a_drain_that_covers_what_it_names() {
        let c = web_and_api();
        let api: SocketAddr = SocketAddr::new(ip(A), 8080);
        let r = |s: &str| s.parse::<BackendRef>().unwrap();
        let a80 = format!("{A}:80");
        let mut v = Verdicts::default();
        v.drain(Some("api".into()), ip(A));
        v.drain(None, r(&a80));
        assert!(v.is_drained("web", at(A)) && v.is_drained("api", api));
        // `--vip web`: the drain of every VIP does cover web's A:80 and stays; the command it
        // names is the plain `undrain A:80`, which is not refused.
        let e = v.undrain(&c, Some("web".into()), r(&a80)).expect_err("a drain of every VIP");
        assert!(e.contains(&format!("`edgelb undrain {a80}`")), "{e}");
        assert_eq!(v.undrain(&c, None, r(&a80)), Ok(true));
        assert!(!v.is_drained("web", at(A)), "web's A:80 undrained");
        assert!(v.is_drained("api", api), "api's A:8080 still drained");
        // The api drain by plain address, for api's backend: a drain of every port, wider.
        let e = v
            .undrain(&c, Some("api".into()), r(&format!("{A}:8080")))
            .expect_err("a drain of every port of A in api");
        assert!(e.contains(&format!("`edgelb undrain {A} --vip api`")), "{e}");
        assert_eq!(v.undrain(&c, None, ip(A)), Ok(true));
        assert!(!v.is_drained("api", api));
    }

    /// An L7 pool listing one address on two ports: `address:port` drains and undrains that
    /// backend alone, the plain address every port of it, and a drain of every port is not
    /// lifted for one of them.
    #[test]
    fn a_drain_of_one_port_leaves_the_others() {
        let c = Config::parse(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web7\"\naddress = \"127.0.0.1\"\nport = 8000\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.1\", port = 8001 }, { address = \"127.0.0.1\", port = 8002 }, { address = \"127.0.0.2\", port = 8001 }]\n",
            "t.toml".as_ref(),
        )
        .expect("valid");
        let weights = |v: &mut Verdicts| -> Vec<(SocketAddr, u32)> {
            v.effective(&c).vips[0].backends.iter().map(|b| (id(b), b.weight)).collect()
        };
        let one: SocketAddr = "127.0.0.1:8001".parse().unwrap();
        let two: SocketAddr = "127.0.0.1:8002".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:8001".parse().unwrap();
        let r = |s: &str| s.parse::<BackendRef>().unwrap();
        let mut v = Verdicts::default();
        v.drain(None, r("127.0.0.1:8001"));
        assert_eq!(weights(&mut v), [(one, 0), (two, 1), (other, 1)]);
        assert!(v.is_drained("web7", one) && !v.is_drained("web7", two));
        assert_eq!(
            v.undrain(&c, None, r("127.0.0.1:8002")),
            Ok(false),
            "that port was not drained"
        );
        assert_eq!(v.undrain(&c, None, r("127.0.0.1:8001")), Ok(true));
        assert_eq!(weights(&mut v), [(one, 1), (two, 1), (other, 1)]);
        // The address alone: every port of it, and the port-wise undrain of it refused.
        v.drain(Some("web7".into()), r("127.0.0.1"));
        assert_eq!(weights(&mut v), [(one, 0), (two, 0), (other, 1)]);
        let e = v.undrain(&c, None, r("127.0.0.1:8002")).expect_err("a drain of every port stays");
        assert!(e.contains("edgelb undrain 127.0.0.1 --vip web7"), "{e}");
        assert_eq!(v.undrain(&c, Some("web7".into()), r("127.0.0.1")), Ok(true));
        // A plain undrain lifts the port-wise drains of the address too.
        v.drain(None, r("127.0.0.1:8001"));
        v.drain(Some("web7".into()), r("127.0.0.1:8002"));
        assert_eq!(v.undrain(&c, None, r("127.0.0.1")), Ok(true));
        assert_eq!(weights(&mut v), [(one, 1), (two, 1), (other, 1)]);
        // Handed over with its port, and forgotten once the config lists that port no more.
        v.drain(None, r("127.0.0.1:8002"));
        let d = v.drains();
        assert_eq!((d[0].backend, d[0].port), (one.ip(), Some(8002)));
        let without = Config::parse(
            "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web7\"\naddress = \"127.0.0.1\"\nport = 8000\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.1\", port = 8001 }]\n",
            "t.toml".as_ref(),
        )
        .expect("valid");
        assert_eq!(v.reconcile(&without), [(None, r("127.0.0.1:8002"))]);
    }
}
