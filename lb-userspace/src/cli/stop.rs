//! `edgelb stop`: stop the running controller and (without `--detach`) remove its data plane;
//! with none answering, remove the data plane a detached one left, unless a process still holds
//! it open.
//!
//! What to do with the controller's answer is decided first ([`StopPlan::of`]), then carried out
//! ([`stop`]), which ends in a [`StopOutcome`]: what to say and the exit code.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{AdminTarget, Ending};
use crate::{
    admin::{AdminError, Request, Response},
    config::Config,
    dataplane::{Dataplane, Holder},
};

/// How long `stop` waits for a controller to exit past its L7 drain: its teardown, and the
/// removal of its socket.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// What `edgelb stop` does with the admin socket's answer to its stop request.
#[derive(Debug)]
pub enum StopPlan {
    /// The controller is stopping already (a SIGTERM's drain, or another `stop`): wait up to
    /// `wait` for it to exit (its `pid`, when it gave one). Then, when `then_remove` (this stop
    /// is to remove the data plane, which that exit may leave), ask again, as with no
    /// controller running; otherwise say how it ended (`teardown`: its exit removes the data
    /// plane, an `edgelb stop` being under way).
    AwaitStopping {
        /// Its refusal, which says it is stopping.
        message: String,
        /// Its process id, when it gave one.
        pid: Option<u32>,
        /// How long to wait: its drain, and 30 s for its exit.
        wait: Duration,
        /// Its exit removes the data plane.
        teardown: bool,
        /// Asked again once it has exited: the data plane is this config's to remove.
        then_remove: bool,
    },
    /// Refused (a controller already stopping, asked again): said, exit 1.
    Refused(String),
    /// The controller is stopping: wait for it to finish its L7 requests (`drain_ms`, its
    /// running `node.l7_drain_timeout_ms`; the file's, from an older controller that does not
    /// say) and exit, then, when `check_pins`, check that what edgelb pinned is gone.
    AwaitExit {
        /// Its answer, said once it has exited.
        message: String,
        /// Its process id, when it gave one.
        pid: Option<u32>,
        /// Its L7 drain, when it said.
        drain_ms: Option<u64>,
        /// Its exit is to remove the data plane of the config's `pin_dir`.
        check_pins: bool,
    },
    /// No controller answers on a socket that is not the config's (`--socket` alone): the
    /// config's data plane may be another instance's, so nothing is removed (exit 3).
    NotTheConfigs,
    /// No controller answers on the config's socket: remove the data plane a detached one may
    /// have left, unless a process holds it open.
    RemoveLeftovers,
    /// The socket could not be asked, and nothing is removed: turned away (a user the
    /// root-only socket refuses: a controller may well run there), an exchange cut short, or
    /// `--detach` with none answering (exit 3).
    Unreachable(AdminError),
}

impl StopPlan {
    /// Decides from the `answer` to a stop request (`detach` given or not) on a socket that is
    /// the config's (`the_configs`) or not; `retry` false once a stopping controller was waited
    /// for already.
    pub fn of(
        answer: Result<Response, AdminError>,
        detach: bool,
        the_configs: bool,
        retry: bool,
    ) -> StopPlan {
        match answer {
            // Stopping already (a SIGTERM's drain, or another `stop`): wait for it to exit. If
            // its exit leaves the data plane (a SIGTERM) and this stop is to remove it, go on
            // as with no controller running, which removes it (unless a controller holds it by
            // then).
            Ok(resp) if !resp.ok && resp.stopping && retry => StopPlan::AwaitStopping {
                wait: Duration::from_millis(resp.drain_ms.unwrap_or(0)) + EXIT_GRACE,
                // The data plane is this config's to remove only through the config's socket.
                // Asked again once it has exited: what it leaves (all of it after a SIGTERM,
                // leftovers of a stop's teardown that was cut short) is removed as with no
                // controller running.
                then_remove: !detach && the_configs,
                pid: resp.pid,
                teardown: resp.teardown,
                message: resp.message,
            },
            Ok(resp) if !resp.ok => StopPlan::Refused(resp.message),
            Ok(resp) => StopPlan::AwaitExit {
                message: resp.message,
                pid: resp.pid,
                drain_ms: resp.drain_ms,
                check_pins: !detach && the_configs,
            },
            Err(e) if e.nobody_serves() && !detach && !the_configs => StopPlan::NotTheConfigs,
            Err(e) if e.nobody_serves() && !detach => StopPlan::RemoveLeftovers,
            Err(e) => StopPlan::Unreachable(e),
        }
    }
}

/// How `edgelb stop` ended: what it says, and its exit code ([`StopOutcome::ending`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Which socket to ask cannot be told (the config is too broken): exit 2.
    NoSocket(Ending),
    /// Stopped: its message; exit 0.
    Stopped(String),
    /// It was stopping already, and has exited: exit 0. `teardown`: that stop was removing the
    /// data plane; otherwise the data plane keeps running (`detach`: as asked).
    StoppedAlready {
        /// Its exit removed the data plane.
        teardown: bool,
        /// `--detach` was given.
        detach: bool,
    },
    /// Refused: its message; exit 1.
    Refused(String),
    /// Still there after `wait`, its `socket` not gone: exit 1.
    StillStopping {
        /// Its admin socket.
        socket: PathBuf,
        /// How long it was waited for.
        wait: Duration,
    },
    /// Stopped, but edgelb's pins remain in `pin_dir`: exit 1.
    PinsRemain(PathBuf),
    /// No controller answers on `socket`, which is not `config`'s (`config_socket`, unreadable
    /// when None): nothing was removed; exit 3.
    NotTheConfigs {
        /// The socket asked.
        socket: PathBuf,
        /// The config file.
        config: PathBuf,
        /// The config's admin socket.
        config_socket: Option<PathBuf>,
    },
    /// No controller answers on `socket`, and the config, whose data plane is to go, does not
    /// load (`error`): exit 2.
    ConfigUnreadable {
        /// The socket asked.
        socket: PathBuf,
        /// Why the config does not load.
        error: String,
    },
    /// No controller answers on `socket`, but `holders` hold the data plane under `pin_dir`
    /// open (a controller mid-takeover): nothing was removed; exit 1.
    HeldOpen {
        /// The socket asked.
        socket: PathBuf,
        /// The processes holding it.
        holders: Vec<Holder>,
        /// Its pin directory.
        pin_dir: PathBuf,
    },
    /// No controller answers on `socket`, and whether a process holds the data plane under
    /// `pin_dir` open cannot be told (`error`): nothing was removed; exit 1.
    HoldersUnknown {
        /// The socket asked.
        socket: PathBuf,
        /// Its pin directory.
        pin_dir: PathBuf,
        /// Why not.
        error: String,
    },
    /// No controller running: the data plane under `pin_dir` removed (`pinned`: there was
    /// one), files not edgelb's (`others`) left. Exit 0, or 1 when a balancer of edgelb's runs
    /// on one of `config`'s interfaces from elsewhere (`elsewhere`: interface, program id, its
    /// link's pin if found).
    Removed {
        /// The config file.
        config: PathBuf,
        /// Its pin directory.
        pin_dir: PathBuf,
        /// Something of edgelb's was pinned there.
        pinned: bool,
        /// Files there that are not edgelb's, left alone.
        others: Vec<PathBuf>,
        /// Balancers of edgelb's still running on the config's interfaces.
        elsewhere: Vec<(String, u32, Option<PathBuf>)>,
    },
    /// Removing the data plane under `pin_dir` failed (`error`): exit 1.
    RemoveFailed {
        /// Its pin directory.
        pin_dir: PathBuf,
        /// Why.
        error: String,
    },
    /// The socket could not be asked (`error`): exit 3.
    Unreachable(String),
}

impl StopOutcome {
    /// What `edgelb stop` says, and its exit code.
    pub fn ending(&self) -> Ending {
        match self {
            StopOutcome::NoSocket(end) => end.clone(),
            StopOutcome::Stopped(message) => Ending::new(0).out(message.clone()),
            StopOutcome::StoppedAlready { teardown: true, .. } => Ending::new(0).out(
                "stopped; the stop under way was removing the data plane (its log says if anything was left)",
            ),
            StopOutcome::StoppedAlready { teardown: false, detach } => {
                Ending::new(0).out(format!(
                    "stopped (it was stopping already); the data plane keeps running{}",
                    if *detach { "" } else { " (`edgelb stop -c <its config>` removes it)" }
                ))
            }
            StopOutcome::Refused(message) => Ending::new(1).err(format!("edgelb: {message}")),
            StopOutcome::StillStopping { socket, wait } => Ending::new(1).err(format!(
                "edgelb: still stopping after {} s ({} remains)",
                wait.as_secs(),
                socket.display()
            )),
            StopOutcome::PinsRemain(pin_dir) => Ending::new(1).err(format!(
                "edgelb: stopped, but edgelb's pins remain in {} (see edgelb's log; `edgelb stop` again removes them)",
                pin_dir.display()
            )),
            StopOutcome::NotTheConfigs { socket, config, config_socket } => Ending::new(3).err(format!(
                "edgelb: no controller answers on {}, which is not the admin socket of {} ({}): nothing was removed. To remove the data plane a detached edgelb left, name its config: `edgelb stop -c <its config>`",
                socket.display(),
                config.display(),
                config_socket.as_ref().map_or("unreadable".to_owned(), |s| s.display().to_string())
            )),
            StopOutcome::ConfigUnreadable { socket, error } => Ending::new(2).err(format!(
                "edgelb: no controller answers on {}, and {error}",
                socket.display()
            )),
            StopOutcome::HeldOpen { socket, holders, pin_dir } => {
                let who: Vec<String> = holders.iter().map(ToString::to_string).collect();
                Ending::new(1).err(format!(
                    "edgelb: no controller answers on {}, but {} holds the data plane under {} open: \
                     a controller appears to be running (perhaps in the middle of a takeover) whose \
                     admin socket does not answer. Nothing was removed. Retry `edgelb stop` in a \
                     moment, or stop that process (SIGTERM leaves the data plane running) and then \
                     run `edgelb stop` again.",
                    socket.display(),
                    who.join(", "),
                    pin_dir.display()
                ))
            }
            StopOutcome::HoldersUnknown { socket, pin_dir, error } => Ending::new(1).err(format!(
                "edgelb: no controller answers on {}, and whether a process still holds the data plane under {} open cannot be told ({error}); nothing was removed",
                socket.display(),
                pin_dir.display()
            )),
            StopOutcome::Removed { config, pin_dir, pinned, others, elsewhere } => {
                let mut end = Ending::new(if elsewhere.is_empty() { 0 } else { 1 });
                end = end.out(if *pinned {
                    format!("no controller running; data plane under {} removed", pin_dir.display())
                } else {
                    format!(
                        "no controller running, and nothing of edgelb's pinned under {}",
                        pin_dir.display()
                    )
                });
                if !others.is_empty() {
                    end = end.out(left_alone(others));
                }
                for (interface, prog_id, pin) in elsewhere {
                    let pin = pin.as_ref().map_or_else(
                        || "pinned nowhere under /sys/fs/bpf (a running process holds it: stop it by PID)".to_owned(),
                        |p| format!("its link pinned at {} (removing that pin detaches it)", p.display()),
                    );
                    end = end.err(format!(
                        "edgelb: but edgelb's balancer still runs on `{interface}` (program id {prog_id}), {pin}: not the data plane of {}'s node.pin_dir ({}). Was node.pin_dir changed since it started? `edgelb stop -c <the config naming its pin directory>` removes it",
                        config.display(),
                        pin_dir.display()
                    ));
                }
                end
            }
            StopOutcome::RemoveFailed { pin_dir, error } => {
                Ending::new(1).err(format!("edgelb: removing {}: {error}", pin_dir.display()))
            }
            StopOutcome::Unreachable(error) => Ending::new(3).err(format!("edgelb: {error}")),
        }
    }
}

/// `edgelb stop` (`--detach`: the controller only); `progress` is told, as it happens, what is
/// being waited for (a line for stderr). A controller already stopping is waited for, and the
/// stop asked again.
pub fn stop(target: &AdminTarget, detach: bool, progress: &mut dyn FnMut(String)) -> StopOutcome {
    stop_once(target, detach, true, progress)
}

/// [`stop`]; with `retry`, a controller already stopping is waited for, and the stop asked
/// again.
fn stop_once(
    target: &AdminTarget,
    detach: bool,
    retry: bool,
    progress: &mut dyn FnMut(String),
) -> StopOutcome {
    let socket = match target.socket() {
        Ok(s) => s,
        Err(end) => return StopOutcome::NoSocket(end),
    };
    // The config's data plane (its pin_dir) is the socket's only when the socket is the
    // config's: `--socket` alone leaves the default file, which may be another instance's.
    let config_socket = crate::config::admin_socket_of(&target.config).ok();
    let the_configs = config_socket.as_deref() == Some(socket.as_path());
    let answer = crate::admin::request(&socket, &Request::Stop { detach });
    match StopPlan::of(answer, detach, the_configs, retry) {
        StopPlan::AwaitStopping { message, pid, wait, teardown, then_remove } => {
            progress(format!(
                "edgelb: {message}; waiting for it to exit (up to {} s){}",
                wait.as_secs(),
                if teardown {
                    ", which removes the data plane (an `edgelb stop` is under way)"
                } else if then_remove {
                    ", then removing the data plane it leaves"
                } else {
                    ", which leaves the data plane running"
                }
            ));
            if !gone_within(&socket, pid, wait, |_| ()) {
                return StopOutcome::StillStopping { socket, wait };
            }
            if then_remove {
                return stop_once(target, detach, false, progress);
            }
            StopOutcome::StoppedAlready { teardown, detach }
        }
        StopPlan::Refused(message) => StopOutcome::Refused(message),
        StopPlan::AwaitExit { message, pid, drain_ms, check_pins } => {
            // Wait for the controller to finish: it removes its socket last, once its L7
            // requests are done (node.l7_drain_timeout_ms at most: the running one, which the
            // answer carries; an older controller's, as the file says) and (without --detach)
            // the data plane is gone.
            let cfg = Config::load(&target.config).ok();
            let drain = drain_ms.map(Duration::from_millis).unwrap_or_else(|| {
                cfg.as_ref()
                    .map_or(crate::config::DEFAULT_L7_DRAIN_TIMEOUT, |c| c.node.l7_drain_timeout)
            });
            let wait = drain + EXIT_GRACE;
            let mut said = false;
            let gone = gone_within(&socket, pid, wait, |waited| {
                if !said && !drain.is_zero() && waited >= Duration::from_secs(1) {
                    progress(format!(
                        "edgelb: waiting for the L7 requests in flight to finish (up to {} ms, its running node.l7_drain_timeout_ms; SIGTERM to edgelb ends them now)",
                        drain.as_millis()
                    ));
                    said = true;
                }
            });
            if !gone {
                return StopOutcome::StillStopping { socket, wait };
            }
            // What edgelb pinned must be gone; other tools' pins in a shared pin_dir stay.
            if check_pins
                && let Some(cfg) = &cfg
                && Dataplane::pins_in(&cfg.node.pin_dir).is_ok_and(|(mine, _)| !mine.is_empty())
            {
                return StopOutcome::PinsRemain(cfg.node.pin_dir.clone());
            }
            StopOutcome::Stopped(message)
        }
        StopPlan::NotTheConfigs => {
            StopOutcome::NotTheConfigs { socket, config: target.config.clone(), config_socket }
        }
        StopPlan::RemoveLeftovers => remove_leftovers(&target.config, socket),
        StopPlan::Unreachable(e) => StopOutcome::Unreachable(e.to_string()),
    }
}

/// No controller answers on `socket`, `config`'s: removes a data plane a detached one may have
/// left, unless a controller still runs without its socket (mid-takeover, say), which removing
/// the pins would leave without XDP.
fn remove_leftovers(config: &Path, socket: PathBuf) -> StopOutcome {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return StopOutcome::ConfigUnreadable { socket, error: e.to_string() },
    };
    let pin_dir = cfg.node.pin_dir.clone();
    match crate::dataplane::pin_holders(&pin_dir) {
        Ok(holders) if holders.is_empty() => {}
        Ok(holders) => return StopOutcome::HeldOpen { socket, holders, pin_dir },
        Err(e) => return StopOutcome::HoldersUnknown { socket, pin_dir, error: e.to_string() },
    }
    // Asked before the pins go: a link just unpinned is let go of only after a while, and its
    // program would read as running elsewhere.
    let elsewhere = crate::dataplane::balancers_elsewhere(&cfg.node.interfaces, &pin_dir);
    let pinned = Dataplane::pins_in(&pin_dir).is_ok_and(|(mine, _)| !mine.is_empty());
    match Dataplane::teardown(&pin_dir) {
        Ok(others) => {
            StopOutcome::Removed { config: config.to_owned(), pin_dir, pinned, others, elsewhere }
        }
        Err(e) => StopOutcome::RemoveFailed { pin_dir, error: e.to_string() },
    }
}

/// Waits up to `wait` for a stopping controller to exit, calling `tick` with the time waited so
/// far every 50 ms; false if it is still there then. Gone: its admin `socket` is removed (the
/// last thing it does), or, left behind by a controller killed before it could remove it (a
/// SIGKILL after a long drain), refuses connections while its process (`pid`, when its answer
/// gave one and this process can see it) is not running.
fn gone_within(
    socket: &Path,
    pid: Option<u32>,
    wait: Duration,
    mut tick: impl FnMut(Duration),
) -> bool {
    let gone = || {
        // Its socket removed is enough; one left behind counts once nobody accepts on it and
        // the process is not running (where this process can see it; not a zombie its parent
        // has yet to reap). A controller in another pid namespace gives a pid that names
        // another process here, or none: only a socket left behind asks.
        !socket.exists()
            || !pid.is_some_and(crate::procfs::runs)
                && std::os::unix::net::UnixStream::connect(socket)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    let started = std::time::Instant::now();
    while !gone() && started.elapsed() < wait {
        tick(started.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    gone()
}

/// What `stop` says of files in the pin directory that edgelb did not pin and so left there.
fn left_alone(others: &[PathBuf]) -> String {
    let names: Vec<String> = others.iter().map(|p| p.display().to_string()).collect();
    format!("left in place, not edgelb's: {}", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(kind: std::io::ErrorKind) -> AdminError {
        AdminError::Connect { path: "/run/edgelb/t.sock".into(), error: kind.into() }
    }

    fn stopping(drain_ms: Option<u64>, teardown: bool) -> Response {
        Response {
            stopping: true,
            teardown,
            drain_ms,
            pid: Some(42),
            ..Response::err("edgelb is stopping already")
        }
    }

    /// A controller stopping already is waited for (its drain and 30 s); the data plane it
    /// leaves is removed after only through the config's socket and without `--detach`; asked
    /// again after the wait, its refusal is one.
    #[test]
    fn a_controller_stopping_already_is_waited_for_then_asked_again() {
        for (detach, the_configs, then_remove) in
            [(false, true, true), (true, true, false), (false, false, false)]
        {
            match StopPlan::of(Ok(stopping(Some(1500), false)), detach, the_configs, true) {
                StopPlan::AwaitStopping { wait, pid, teardown, then_remove: t, message } => {
                    assert_eq!(wait, Duration::from_millis(31_500));
                    assert_eq!((pid, teardown, t), (Some(42), false, then_remove));
                    assert_eq!(message, "edgelb is stopping already");
                }
                other => panic!("detach {detach}, the config's {the_configs}: {other:?}"),
            }
        }
        // An older controller gives no drain: 30 s.
        let StopPlan::AwaitStopping { wait, .. } =
            StopPlan::of(Ok(stopping(None, true)), false, true, true)
        else {
            panic!("not waited for");
        };
        assert_eq!(wait, EXIT_GRACE);
        let again = StopPlan::of(Ok(stopping(Some(1500), false)), false, true, false);
        assert!(matches!(again, StopPlan::Refused(m) if m == "edgelb is stopping already"));
        let refused = StopPlan::of(Ok(Response::err("no")), false, true, true);
        assert!(matches!(refused, StopPlan::Refused(m) if m == "no"));
    }

    #[test]
    fn a_stopping_controller_is_waited_for_and_its_pins_checked_when_they_are_to_go() {
        let ok = || Response { drain_ms: Some(200), pid: Some(7), ..Response::ok("stopping") };
        for (detach, the_configs, check_pins) in
            [(false, true, true), (true, true, false), (false, false, false)]
        {
            match StopPlan::of(Ok(ok()), detach, the_configs, true) {
                StopPlan::AwaitExit { message, pid, drain_ms, check_pins: c } => {
                    assert_eq!(
                        (message.as_str(), pid, drain_ms, c),
                        ("stopping", Some(7), Some(200), check_pins)
                    );
                }
                other => panic!("detach {detach}, the config's {the_configs}: {other:?}"),
            }
        }
    }

    /// With none answering, the data plane is removed only when the socket is the config's and
    /// `--detach` was not given; a socket that turns this user away removes nothing.
    #[test]
    fn with_none_answering_only_the_configs_data_plane_is_removed() {
        use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
        for kind in [NotFound, ConnectionRefused] {
            let plan = |detach, the_configs| {
                StopPlan::of(Err(connect_error(kind)), detach, the_configs, true)
            };
            assert!(matches!(plan(false, true), StopPlan::RemoveLeftovers));
            assert!(matches!(plan(false, false), StopPlan::NotTheConfigs));
            assert!(matches!(plan(true, true), StopPlan::Unreachable(_)));
            assert!(matches!(plan(true, false), StopPlan::Unreachable(_)));
        }
        let turned_away = StopPlan::of(Err(connect_error(PermissionDenied)), false, true, true);
        assert!(matches!(turned_away, StopPlan::Unreachable(_)));
        let cut = AdminError::Exchange { path: "/run/edgelb/t.sock".into(), reason: "eof".into() };
        assert!(matches!(StopPlan::of(Err(cut), false, true, true), StopPlan::Unreachable(_)));
    }

    #[test]
    fn each_outcome_says_what_happened_with_its_exit_code() {
        let socket = PathBuf::from("/run/edgelb/t.sock");
        let pin_dir = PathBuf::from("/sys/fs/bpf/t");
        let ended = |o: StopOutcome| o.ending();
        assert_eq!(
            ended(StopOutcome::Stopped("stopped; data plane removed".into())),
            Ending::new(0).out("stopped; data plane removed")
        );
        assert_eq!(
            ended(StopOutcome::StoppedAlready { teardown: false, detach: false }),
            Ending::new(0).out("stopped (it was stopping already); the data plane keeps running (`edgelb stop -c <its config>` removes it)")
        );
        assert_eq!(
            ended(StopOutcome::StoppedAlready { teardown: false, detach: true }),
            Ending::new(0).out("stopped (it was stopping already); the data plane keeps running")
        );
        assert_eq!(
            ended(StopOutcome::StillStopping {
                socket: socket.clone(),
                wait: Duration::from_millis(31_500)
            }),
            Ending::new(1).err("edgelb: still stopping after 31 s (/run/edgelb/t.sock remains)")
        );
        let not_the_configs = ended(StopOutcome::NotTheConfigs {
            socket: socket.clone(),
            config: "/etc/edgelb/edgelb.toml".into(),
            config_socket: None,
        });
        assert_eq!(not_the_configs.code, 3);
        assert!(not_the_configs.stderr()[0].starts_with("edgelb: no controller answers on /run/edgelb/t.sock, which is not the admin socket of /etc/edgelb/edgelb.toml (unreadable): nothing was removed."));
        let held = ended(StopOutcome::HeldOpen {
            socket: socket.clone(),
            holders: vec![Holder { pid: 9, comm: "edgelb".into() }],
            pin_dir: pin_dir.clone(),
        });
        assert_eq!(held.code, 1);
        assert!(
            held.stderr()[0]
                .contains("but PID 9 (edgelb) holds the data plane under /sys/fs/bpf/t open")
        );
        let removed = |elsewhere| {
            ended(StopOutcome::Removed {
                config: "t.toml".into(),
                pin_dir: pin_dir.clone(),
                pinned: true,
                others: vec![pin_dir.join("theirs")],
                elsewhere,
            })
        };
        assert_eq!(
            removed(Vec::new()),
            Ending::new(0)
                .out("no controller running; data plane under /sys/fs/bpf/t removed")
                .out("left in place, not edgelb's: /sys/fs/bpf/t/theirs")
        );
        let still = removed(vec![("eth0".into(), 12, None)]);
        assert_eq!(still.code, 1);
        assert_eq!(still.stdout().len(), 2);
        assert!(still.stderr()[0].starts_with("edgelb: but edgelb's balancer still runs on `eth0` (program id 12), pinned nowhere under /sys/fs/bpf"));
        assert_eq!(
            ended(StopOutcome::ConfigUnreadable { socket, error: "t.toml: no".into() }).code,
            2
        );
        assert_eq!(ended(StopOutcome::Unreachable("cannot reach".into())).code, 3);
    }

    /// A socket nobody accepts on, left by a process that is gone (a PID no process has), is a
    /// controller gone; one whose process runs (this one) is not, within the wait.
    #[test]
    fn a_socket_left_behind_is_gone_once_its_process_is() {
        let dir = std::env::temp_dir().join(format!("edgelb-cli-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("left.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        assert!(gone_within(&socket, Some(u32::MAX), Duration::ZERO, |_| ()));
        assert!(gone_within(&socket, None, Duration::ZERO, |_| ()));
        let mut ticks = 0;
        assert!(!gone_within(
            &socket,
            Some(std::process::id()),
            Duration::from_millis(120),
            |_| ticks += 1
        ));
        assert!(ticks >= 2, "{ticks}");
        assert!(gone_within(
            &dir.join("none.sock"),
            Some(std::process::id()),
            Duration::ZERO,
            |_| ()
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
