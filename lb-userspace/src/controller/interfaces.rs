//! Whether XDP is still on the attached interfaces, looked for every second
//! ([`Controller::look_for_lost_interfaces`]): a lost interface is attached again once it is
//! there, with a backoff after a failure ([`AttachFailed`]), a renamed one is said, and lookups
//! that fail (out of descriptors) are said once per episode ([`Lookups`]). What the kernel says
//! of the interfaces that the config must agree with (MTU, GRO, gateway) is `links.rs`'s.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::Controller;
use crate::{
    backoff::Backoff,
    dataplane::{DataplaneError, InterfaceState},
    error_chain,
};

/// How long the attached interfaces' lookups must work again, after they failed, before that is
/// said ([`Lookups`]).
const LOOKUPS_BACK_AFTER: Duration = Duration::from_secs(30);

/// Whether the attached interfaces' lookups work, as said in the log: a failure is said when an
/// episode starts, and its end once lookups have worked for [`LOOKUPS_BACK_AFTER`]. A process
/// near its descriptor limit fails and succeeds in turn from one second to the next, and each
/// change said made a warning and an "again" line a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookups {
    /// They work (or have since the last episode was said over).
    Fine,
    /// They fail.
    Failing,
    /// They work again since this moment, not yet for long enough to say so.
    Recovering(Instant),
}

impl Lookups {
    /// The state after a round whose lookups `failed` (or not) at `now`, and what to say: the
    /// start of an episode (`Failing`) or its end (`Fine`).
    fn step(self, failed: bool, now: Instant) -> (Lookups, Option<Lookups>) {
        match (self, failed) {
            (Lookups::Fine, true) => (Lookups::Failing, Some(Lookups::Failing)),
            (Lookups::Fine, false) => (Lookups::Fine, None),
            (Lookups::Failing | Lookups::Recovering(_), true) => (Lookups::Failing, None),
            (Lookups::Failing, false) => (Lookups::Recovering(now), None),
            (Lookups::Recovering(since), false)
                if now.duration_since(since) >= LOOKUPS_BACK_AFTER =>
            {
                (Lookups::Fine, Some(Lookups::Fine))
            }
            (Lookups::Recovering(since), false) => (Lookups::Recovering(since), None),
        }
    }
}

/// The waits before a lost interface that could not be attached again is tried again on the
/// same device: 30 s at first, since errors other than EPERM may pass (a driver still
/// initialising says EBUSY or EINVAL; ENOMEM), and the interface was otherwise LOST until a
/// restart; each further failure doubles the wait up to 5 minutes, so that an interface that
/// keeps failing logs rarely (a failure is said when its reason changes) yet is attached within
/// minutes of the cause going.
const REATTACH: Backoff = Backoff::new(Duration::from_secs(30), Duration::from_secs(300));

/// A lost interface that could not be attached again ([`Dataplane::reattach`]), and when it is
/// tried again ([`reattach_due`], [`AttachFailed::after`]).
///
/// [`Dataplane::reattach`]: crate::dataplane::Dataplane::reattach
#[derive(Debug)]
pub(super) struct AttachFailed {
    /// The interface, as node.interfaces names it.
    pub(super) interface: String,
    /// The index of the device tried.
    ifindex: u32,
    /// Why it failed (the error's chain, with the kernel's errno).
    pub(super) reason: String,
    /// When the same device is tried again; `None`: not (the kernel refused for want of a
    /// capability, EPERM, as before Linux 5.19: a restart attaches), until another device
    /// has the name or the interface is seen gone.
    pub(super) retry_at: Option<Instant>,
    /// The wait before that try; the next failure on the device waits twice as long
    /// ([`REATTACH`]).
    wait: Duration,
}

impl AttachFailed {
    /// The record of a failure `e` to attach `interface` again to device `ifindex` at `now`,
    /// after `previous` (the interface's last failure, if any): EPERM is not tried again on
    /// that device; anything else after [`REATTACH`]'s first wait, twice as long after each
    /// further failure on the same device, up to its longest.
    fn after(
        previous: Option<&AttachFailed>,
        interface: &str,
        ifindex: u32,
        e: &DataplaneError,
        now: Instant,
    ) -> AttachFailed {
        let wait = match previous.filter(|p| p.ifindex == ifindex) {
            Some(p) => REATTACH.after(p.wait),
            None => REATTACH.first(),
        };
        AttachFailed {
            interface: interface.to_owned(),
            ifindex,
            reason: error_chain(e),
            retry_at: (!needs_a_capability(e)).then(|| now + wait),
            wait,
        }
    }
}

/// Is a lost interface, now device `ifindex`, to be attached again at `now`, its last failure
/// being `failed`? Yes without one, or on another device; on the same device once its retry is
/// due (never after EPERM: [`AttachFailed::after`]).
fn reattach_due(failed: Option<&AttachFailed>, ifindex: u32, now: Instant) -> bool {
    match failed {
        Some(f) if f.ifindex == ifindex => f.retry_at.is_some_and(|at| now >= at),
        _ => true,
    }
}

/// Did the kernel refuse an attach for want of a capability (EPERM: `BPF_LINK_CREATE` after
/// the controller dropped its capabilities, on a kernel older than 5.19)? That stays so until a
/// restart; any other failure may pass.
fn needs_a_capability(e: &DataplaneError) -> bool {
    matches!(
        e,
        DataplaneError::Attach {
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }),
            ..
        } if io_error.raw_os_error() == Some(libc::EPERM)
    )
}

/// The attached interfaces lost and renamed, as a look for them finds them
/// ([`interfaces_seen`]), and those whose state could not be told.
#[derive(Debug)]
struct InterfacesSeen {
    /// XDP is no longer on them ([`InterfaceState::Lost`]).
    lost: Vec<String>,
    /// Renamed, each with its new name ([`InterfaceState::Renamed`]).
    renamed: Vec<(String, String)>,
    /// Not told this time ([`InterfaceState::Unknown`]), each with the lookup's error.
    untold: Vec<(String, std::io::Error)>,
}

/// The interfaces lost and renamed after a look at where each stands (`states`), the last
/// ones known being `lost` and `renamed`: one whose state could not be told keeps its last,
/// neither newly lost nor back. A failed lookup (out of descriptors: it opens a socket) said
/// nothing of the interface, and taken for "gone" had a healthy one said LOST.
fn interfaces_seen(
    states: Vec<(String, InterfaceState)>,
    lost: &[String],
    renamed: &[(String, String)],
) -> InterfacesSeen {
    let mut seen = InterfacesSeen { lost: Vec::new(), renamed: Vec::new(), untold: Vec::new() };
    for (interface, state) in states {
        match state {
            InterfaceState::Attached => {}
            InterfaceState::Lost => seen.lost.push(interface),
            InterfaceState::Renamed(now) => seen.renamed.push((interface, now)),
            InterfaceState::Unknown(e) => {
                if lost.contains(&interface) {
                    seen.lost.push(interface.clone());
                }
                seen.renamed.extend(renamed.iter().filter(|(was, _)| *was == interface).cloned());
                seen.untold.push((interface, e));
            }
        }
    }
    seen
}

impl Controller {
    /// Logs an interface XDP is no longer on (once, when found) and one that is back. Nothing
    /// else would tell: health checks go through the kernel and stay green, and only the XDP
    /// counters stop. "On" is what the kernel reports: this process's program running on the
    /// device (not merely the name still naming the index it had). A lost interface that is
    /// there (re-created, under a new index or the old one; its link detached) is attached again
    /// at once, in `node.xdp_mode`, with the program this process holds ([`Dataplane::reattach`]:
    /// no capability needed since Linux 5.19); a failure is said with the kernel's error and
    /// tried again on that device with a backoff ([`AttachFailed`]), except EPERM (older
    /// kernels), which takes a restart. A link pin removed by hand is made again first
    /// ([`Dataplane::repin_links`]): the link itself stayed, held open by this process.
    /// A renamed interface is said apart (a warning): XDP stays on the device. One whose state
    /// cannot be told (out of descriptors or memory: the lookups open sockets) stays as it was
    /// last seen, neither newly lost nor back: it said nothing of the interface, and taken for
    /// "gone" it had a healthy interface said LOST (and back once descriptors were free).
    ///
    /// [`Dataplane::reattach`]: crate::dataplane::Dataplane::reattach
    /// [`Dataplane::repin_links`]: crate::dataplane::Dataplane::repin_links
    pub(super) fn look_for_lost_interfaces(&mut self) {
        self.dp.repin_links(false);
        let InterfacesSeen { lost, renamed, untold } =
            interfaces_seen(self.dp.interface_states(), &self.lost, &self.renamed);
        let (next, say) = self.interfaces_untold.step(!untold.is_empty(), Instant::now());
        self.interfaces_untold = next;
        match (say, untold.first()) {
            (Some(Lookups::Failing), Some((_, e))) => {
                let interfaces: Vec<&str> = untold.iter().map(|(i, _)| i.as_str()).collect();
                warn!(?interfaces, error = %e, "cannot tell whether XDP is still on these interfaces: looking them up fails (out of descriptors or memory?); each stays as last seen until it can be told again");
            }
            (Some(Lookups::Fine), _) => info!("the attached interfaces can be looked up again"),
            _ => {}
        }
        let mut lost = lost;
        for i in lost.iter().filter(|i| !self.lost.contains(i)) {
            error!(interface = %i, "XDP is no longer on this interface (deleted, deleted and re-created, or its link detached): its VIP traffic reaches the kernel unbalanced until XDP is attached again, which edgelb does as soon as the interface is there");
        }
        let mut reattached = Vec::new();
        for i in &lost {
            // Not there (yet), or not to be told now: looked at again in a second. Seen gone,
            // a failure is forgotten: the device that comes is tried at once.
            let now = match crate::dataplane::interface_index(i) {
                Ok(Some(now)) => now,
                Ok(None) => {
                    self.attach_failed.retain(|f| f.interface != *i);
                    continue;
                }
                Err(_) => continue,
            };
            let at = self.attach_failed.iter().position(|f| f.interface == *i);
            if !reattach_due(at.map(|a| &self.attach_failed[a]), now, Instant::now()) {
                continue;
            }
            let previous = at.map(|a| self.attach_failed.remove(a));
            match self.dp.reattach(i, now, self.cfg.node.xdp_mode) {
                Ok(mode) => {
                    info!(interface = %i, mode, ifindex = now, "XDP attached again to the interface, its link pinned: balancing again");
                    reattached.push(i.clone());
                }
                Err(e) => {
                    let failed = AttachFailed::after(previous.as_ref(), i, now, &e, Instant::now());
                    // Said when it is new: a first failure, another device, another reason.
                    let said =
                        previous.is_some_and(|p| p.ifindex == now && p.reason == failed.reason);
                    match failed.retry_at {
                        _ if said => {}
                        None => {
                            error!(interface = %i, ifindex = now, error = %failed.reason, "could not attach XDP again to the interface: its VIP traffic reaches the kernel unbalanced until edgelb restarts (`edgelb run --takeover`, or `systemctl restart edgelb`), which attaches with the capabilities this process dropped")
                        }
                        Some(_) => {
                            error!(interface = %i, ifindex = now, error = %failed.reason, retry_in_s = failed.wait.as_secs(), "could not attach XDP again to the interface: its VIP traffic reaches the kernel unbalanced meanwhile; tried again later (the wait doubling up to 5 minutes; said again if the error changes), or restart edgelb (`edgelb run --takeover`, or `systemctl restart edgelb`)")
                        }
                    }
                    self.attach_failed.push(failed);
                }
            }
        }
        lost.retain(|i| !reattached.contains(i));
        self.attach_failed.retain(|f| lost.contains(&f.interface));
        for i in self.lost.iter().filter(|i| !lost.contains(i) && !reattached.contains(i)) {
            info!(interface = %i, "the interface is back as it was attached: XDP is on it");
        }
        self.lost = lost;
        for (was, now) in renamed.iter().filter(|r| !self.renamed.contains(r)) {
            warn!(interface = %was, renamed_to = %now, "the interface was renamed: XDP goes on balancing on it, but node.interfaces names it `{was}`; put `{now}` there and restart (`edgelb run --takeover`: the pinned XDP link follows the rename, with the connection table)");
        }
        self.renamed = renamed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interface lookups that fail and work in turn (a process near its descriptor limit) say
    /// one warning and, once they have worked for 30 s, one "again": each change was said, a
    /// warning and an "again" line every second or two.
    #[test]
    fn flapping_lookups_are_said_once_per_episode() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut state = Lookups::Fine;
        let mut said = Vec::new();
        for (at, failed) in [(0, true), (1, false), (2, true), (3, false), (4, true), (5, false)] {
            let (next, say) = state.step(failed, s(at));
            state = next;
            said.extend(say);
        }
        assert_eq!(said, [Lookups::Failing], "one warning for the whole flapping");
        let (state, say) = state.step(false, s(34));
        assert_eq!((state, say), (Lookups::Recovering(s(5)), None), "29 s of working lookups");
        let (state, say) = state.step(false, s(35));
        assert_eq!((state, say), (Lookups::Fine, Some(Lookups::Fine)), "30 s: said over");
        let (state, say) = state.step(true, s(36));
        assert_eq!((state, say), (Lookups::Failing, Some(Lookups::Failing)), "a new episode");
        assert_eq!(Lookups::Fine.step(false, s(40)), (Lookups::Fine, None));
    }

    /// A failed attach is logged and shown in `status` with the kernel's errno: aya's error
    /// names only the call, its source the errno, which says whether the kernel refused for want
    /// of a capability (EPERM, before Linux 5.19) or because another program holds the device.
    #[test]
    fn a_failed_attach_names_the_errno() {
        let e = DataplaneError::Attach {
            interface: "eth0".to_owned(),
            mode: "native",
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(libc::EPERM),
            }),
        };
        let text = error_chain(&e);
        assert!(text.starts_with("attaching XDP to `eth0` (native) failed"), "{text}");
        assert!(text.contains("bpf_link_create"), "{text}");
        assert!(text.contains("os error 1"), "{text}");
        assert_eq!(text.matches("bpf_link_create").count(), 1, "said once: {text}");
    }

    /// A lost interface whose attach failed is tried again on the same device after 30 s, then
    /// after twice as long each time, up to 5 minutes: EBUSY or EINVAL from a driver still
    /// initialising, or ENOMEM, pass, and it used to stay LOST until a restart. EPERM (no
    /// capability, before Linux 5.19) is not tried again on that device; another device is
    /// tried at once, and so is one after the interface was seen gone (its failure forgotten).
    #[test]
    fn a_failed_reattach_is_tried_again_with_a_backoff_unless_it_needs_a_capability() {
        let failure = |errno| DataplaneError::Attach {
            interface: "eth0".to_owned(),
            mode: "native",
            error: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(errno),
            }),
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let busy = AttachFailed::after(None, "eth0", 7, &failure(libc::EBUSY), t0);
        assert!(busy.reason.contains("os error 16"), "{}", busy.reason);
        assert!(!reattach_due(Some(&busy), 7, t0 + s(29)));
        assert!(reattach_due(Some(&busy), 7, t0 + s(30)));
        assert!(reattach_due(Some(&busy), 8, t0), "another device: at once");
        assert!(reattach_due(None, 7, t0), "no failure (forgotten once seen gone): at once");
        // Each further failure on the device waits twice as long, up to 5 minutes.
        let mut last = busy;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let at = last.retry_at.unwrap();
            last = AttachFailed::after(Some(&last), "eth0", 7, &failure(libc::EINVAL), at);
            waits.push(last.wait.as_secs());
            assert!(!reattach_due(Some(&last), 7, at + last.wait - s(1)));
            assert!(reattach_due(Some(&last), 7, at + last.wait));
        }
        assert_eq!(waits, [60, 120, 240, 300, 300, 300]);
        // Another device starts over.
        let other = AttachFailed::after(Some(&last), "eth0", 8, &failure(libc::ENOMEM), t0);
        assert_eq!(other.wait, s(30));
        // EPERM: not on that device, whenever; another device, at once.
        let perm = AttachFailed::after(None, "eth0", 7, &failure(libc::EPERM), t0);
        assert_eq!(perm.retry_at, None);
        assert!(!reattach_due(Some(&perm), 7, t0 + s(3600)));
        assert!(reattach_due(Some(&perm), 8, t0));
    }

    /// An interface whose state could not be told (a lookup failed out of descriptors) keeps
    /// the one last seen: a healthy one is not said lost, a lost one not back, a renamed one
    /// not renamed back. (Taken for "gone", it had a healthy interface said LOST.)
    #[test]
    fn an_interface_that_cannot_be_told_stays_as_last_seen() {
        let untold = || InterfaceState::Unknown(std::io::Error::from_raw_os_error(libc::EMFILE));
        let names = |v: &[(String, std::io::Error)]| -> Vec<String> {
            v.iter().map(|(i, _)| i.clone()).collect()
        };
        let states = |s: Vec<(&str, InterfaceState)>| -> Vec<(String, InterfaceState)> {
            s.into_iter().map(|(i, s)| (i.to_owned(), s)).collect()
        };
        let (lost, renamed) = (["b".to_owned()], [("c".to_owned(), "z".to_owned())]);
        let seen = interfaces_seen(
            states(vec![("a", untold()), ("b", untold()), ("c", untold()), ("d", untold())]),
            &lost,
            &renamed,
        );
        assert_eq!(seen.lost, ["b"], "{seen:?}");
        assert_eq!(seen.renamed, renamed, "{seen:?}");
        assert_eq!(names(&seen.untold), ["a", "b", "c", "d"]);
        // Told again: as they are.
        let seen = interfaces_seen(
            states(vec![
                ("a", InterfaceState::Lost),
                ("b", InterfaceState::Attached),
                ("c", InterfaceState::Attached),
                ("d", InterfaceState::Renamed("y".to_owned())),
            ]),
            &lost,
            &renamed,
        );
        assert_eq!(seen.lost, ["a"], "{seen:?}");
        assert_eq!(seen.renamed, [("d".to_owned(), "y".to_owned())], "{seen:?}");
        assert!(seen.untold.is_empty());
    }
}
