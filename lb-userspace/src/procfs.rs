//! `/proc/<pid>/stat`, read in one place: `edgelb stop` asks whether a stopping controller's
//! process still runs, the data plane walks up its parents to find its mount namespace, and
//! `cargo xtask` asks whether the test that named a leftover is still alive. Each parsed the
//! line on its own before, and they disagreed on which states mean the process is gone.

use std::io;

/// What edgelb reads of a process's `/proc/<pid>/stat` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Its state, the field after the command (`R`, `S`, `D`, `Z`, `X`, ...).
    pub state: char,
    /// Its parent's PID (0 for PID 1 and kernel threads' root).
    pub ppid: u32,
}

impl Stat {
    /// Reads process `pid`'s stat line (in this process's PID namespace). `NotFound` when no
    /// such process is there; `InvalidData` for a line not of the form below.
    pub fn of(pid: u32) -> io::Result<Stat> {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path)?;
        Stat::parse(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{path}: not a stat line"))
        })
    }

    /// Parses a stat line: `pid (comm) state ppid ...`. The command is found from the last `)`,
    /// since it may itself hold spaces and parentheses (a process may name itself `a) Z 1 (`).
    pub fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace();
        let mut state = fields.next()?.chars();
        let (Some(c), None) = (state.next(), state.next()) else {
            return None;
        };
        Some(Stat { state: c, ppid: fields.next()?.parse().ok()? })
    }

    /// Does the process still run: not a zombie (`Z`, exited, its parent yet to reap it), nor
    /// dead (`X`, or `x` as kernels 2.6.33 to 3.13 wrote it), which run nothing and hold
    /// nothing open?
    pub fn runs(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Does process `pid` run, as this process can see it ([`Stat::runs`])? One gone from `/proc`,
/// or whose stat cannot be read, does not.
pub fn runs(pid: u32) -> bool {
    Stat::of(pid).is_ok_and(|s| s.runs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_and_parent_follow_the_last_parenthesis() {
        let line = "1234 (a) Z 1 (x) S 77 1234 1234 0 -1 4194560 101 0 0 0 0 0 0 0 20 0 1 0\n";
        assert_eq!(Stat::parse(line), Some(Stat { state: 'S', ppid: 77 }));
        let line = "42 (edgelb) R 1 42 42 0 -1\n";
        assert_eq!(Stat::parse(line), Some(Stat { state: 'R', ppid: 1 }));
        for bad in ["", "42 edgelb R 1", "42 (edgelb)", "42 (edgelb) R", "42 (edgelb) RS 1 2"] {
            assert_eq!(Stat::parse(bad), None, "{bad:?}");
        }
    }

    /// A zombie and a dead process (`X`, which `cargo xtask` took for alive) are gone; every
    /// other state runs.
    #[test]
    fn zombies_and_dead_processes_do_not_run() {
        for (state, runs) in [
            ('R', true),
            ('S', true),
            ('D', true),
            ('T', true),
            ('t', true),
            ('I', true),
            ('Z', false),
            ('X', false),
            ('x', false),
        ] {
            let s = Stat::parse(&format!("9 (p) {state} 1 9 9\n")).unwrap();
            assert_eq!(s.runs(), runs, "state {state}");
        }
    }

    #[test]
    fn this_process_runs_and_its_parent_is_found() {
        let me = Stat::of(std::process::id()).unwrap();
        assert!(me.runs());
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(runs(std::process::id()));
        assert!(!runs(u32::MAX));
    }
}
