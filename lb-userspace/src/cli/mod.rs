//! The `edgelb` subcommands other than `run`, as library code: `main.rs` parses the arguments
//! and hands them here. Each command's decisions are values ([`Ending`], [`stop::StopPlan`],
//! [`stop::StopOutcome`]) that say what to print and which exit code to give, so that they are
//! unit-tested, and `main.rs` only prints them.
//!
//! Exit codes, for scripts: 0 done; 1 refused or failed (the reason on stderr); 2 a bad config
//! or argument; 3 the admin socket could not be asked (`route` and `stop` say when they answer
//! without it).

mod decap;
mod route;
mod status;
pub mod stop;

use std::path::{Path, PathBuf};

pub use decap::{AllowSource, allow_source, decap};
pub use route::{RouteQuestion, route};
pub use status::{build_line, status, status_text};

use crate::{
    admin::{AdminError, Request, Response},
    config::Config,
};

/// The config file the commands read when none is given (`-c`).
pub const DEFAULT_CONFIG: &str = "/etc/edgelb/edgelb.toml";

/// How a command ends: what it says, in order, and its exit code. `main.rs` prints each line
/// (stdout or stderr) and exits with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// The lines, in the order they are printed.
    pub said: Vec<Said>,
    /// The exit code.
    pub code: u8,
}

/// One line (or block of lines) a command prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    /// For stdout: the answer, which scripts read.
    Out(String),
    /// For stderr: warnings, notes, refusals.
    Err(String),
}

impl Ending {
    /// Nothing said yet, exit `code`.
    pub fn new(code: u8) -> Ending {
        Ending { said: Vec::new(), code }
    }

    /// Then `line` on stdout.
    pub fn out(mut self, line: impl Into<String>) -> Ending {
        self.said.push(Said::Out(line.into()));
        self
    }

    /// Then `line` on stderr.
    pub fn err(mut self, line: impl Into<String>) -> Ending {
        self.said.push(Said::Err(line.into()));
        self
    }
}

#[cfg(test)]
impl Ending {
    /// What it prints on stdout, a line each.
    fn stdout(&self) -> Vec<&str> {
        self.said
            .iter()
            .filter_map(|s| match s {
                Said::Out(l) => Some(l.as_str()),
                Said::Err(_) => None,
            })
            .collect()
    }

    /// What it prints on stderr, a line each.
    fn stderr(&self) -> Vec<&str> {
        self.said
            .iter()
            .filter_map(|s| match s {
                Said::Err(l) => Some(l.as_str()),
                Said::Out(_) => None,
            })
            .collect()
    }
}

/// Where to find the running controller: the `-c` and `--socket` of the admin commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTarget {
    /// Config file: its `node.admin_socket` is where the running edgelb is asked (`stop` with
    /// none answering also removes the data plane under its `node.pin_dir`, and `route`
    /// answers from it).
    pub config: PathBuf,
    /// Admin socket, overriding the config's.
    pub socket: Option<PathBuf>,
}

impl AdminTarget {
    /// The socket to talk to: `--socket`, or the config's; the ending (exit 2) when the config
    /// is too broken to tell.
    pub fn socket(&self) -> Result<PathBuf, Ending> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        crate::config::admin_socket_of(&self.config)
            .map_err(|e| Ending::new(2).err(format!("edgelb: {e}")))
    }
}

/// `edgelb check`: exit 0 with a summary if the file is valid (its cautions said as warnings),
/// 2 with file:line:column and the problem if not.
pub fn check(path: &Path) -> Ending {
    match Config::load(path) {
        Ok(cfg) => {
            // Accepted, so exit 0, but said: likely not what was meant.
            let mut end = Ending::new(0);
            for c in &cfg.cautions {
                end = end.err(format!("warning: {c}"));
            }
            // As the limit counts them: the backends of the VIPs XDP forwards.
            let entries: usize = cfg
                .vips
                .iter()
                .filter(|v| v.forwarding != crate::config::Forwarding::L7)
                .map(|v| v.backends.len())
                .sum();
            let l7: usize = cfg.vips.iter().filter(|v| v.l7.is_some()).count();
            end.out(format!(
                "{}: ok ({} VIPs, {l7} of them L7; {entries} backend entries in the data plane)",
                path.display(),
                cfg.vips.len(),
            ))
        }
        Err(e) => Ending::new(2).err(e.to_string()),
    }
}

/// Sends `req`; its response on success. Otherwise the ending: exit 1 when refused, 2 when
/// refused for a bad config or a request naming what the config does not have, 3 when
/// unreachable.
pub fn call(target: &AdminTarget, req: &Request) -> Result<Response, Ending> {
    let socket = target.socket()?;
    refused_or_answered(req, crate::admin::request(&socket, req))
}

/// [`call`]'s decision on the controller's `answer` to `req`.
fn refused_or_answered(
    req: &Request,
    answer: Result<Response, AdminError>,
) -> Result<Response, Ending> {
    match answer {
        Ok(resp) if resp.ok => Ok(resp),
        Ok(resp) => {
            let code = if resp.bad_config || resp.bad_request { 2 } else { 1 };
            let mut end = Ending::new(code).err(format!("edgelb: {}", resp.message));
            if let Request::Drain { backend, .. } | Request::Undrain { backend, .. } = req
                && backend.port.is_some()
                && resp.message.starts_with("bad request:")
                && resp.message != crate::admin::TOO_LONG
            {
                end = end.err(
                    "edgelb: the running edgelb predates drains of one address:port and refused it (nothing changed): name the address alone, which drains it on every port, or restart edgelb with this version (`edgelb run --takeover`)",
                );
            }
            Err(end)
        }
        Err(e) => Err(Ending::new(3).err(format!("edgelb: {e}"))),
    }
}

/// Sends `req` (`drain`, `undrain`, `reload`) and ends with the controller's message on stdout,
/// or as [`call`] does.
pub fn answered(target: &AdminTarget, req: &Request) -> Ending {
    call(target, req).map_or_else(|end| end, |r| Ending::new(0).out(r.message))
}

/// `edgelb reload`: asks the controller to re-read the file it runs with, naming the file given
/// with `-c`, which it refuses if it is another, unless only `--socket` was given (the default
/// file then means nothing).
pub fn reload(target: &AdminTarget) -> Ending {
    let named = target.socket.is_none() || target.config != Path::new(DEFAULT_CONFIG);
    let config =
        named.then(|| std::path::absolute(&target.config).unwrap_or(target.config.clone()));
    answered(target, &Request::Reload { config })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::BackendRef;

    #[test]
    fn a_refusal_exits_by_whose_fault_it_is() {
        let status = Request::Status;
        let refused = refused_or_answered(&status, Ok(Response::err("no"))).unwrap_err();
        assert_eq!((refused.code, refused.stderr()), (1, vec!["edgelb: no"]));
        let bad = Response { bad_config: true, ..Response::err("t.toml:1:1: bad") };
        assert_eq!(refused_or_answered(&status, Ok(bad)).unwrap_err().code, 2);
        let unknown = refused_or_answered(&status, Ok(Response::bad_request("no VIP `x`")));
        assert_eq!(unknown.unwrap_err().code, 2);
        let gone = AdminError::Connect {
            path: "/run/edgelb/x.sock".into(),
            error: std::io::ErrorKind::NotFound.into(),
        };
        let unreachable = refused_or_answered(&status, Err(gone)).unwrap_err();
        assert_eq!(unreachable.code, 3);
        assert!(
            unreachable.stderr()[0]
                .starts_with("edgelb: cannot reach edgelb at /run/edgelb/x.sock")
        );
        assert_eq!(refused_or_answered(&status, Ok(Response::ok("fine"))).unwrap().message, "fine");
    }

    /// A drain of one address:port refused as a bad request by an older controller says what to
    /// do instead; a refusal of the address alone, or for another reason, does not.
    #[test]
    fn an_older_controller_refusing_a_port_drain_is_explained() {
        let drain = |backend: &str| Request::Drain {
            backend: backend.parse::<BackendRef>().unwrap(),
            vip: None,
        };
        let old =
            || Ok(Response::bad_request("bad request: invalid type: string \"198.18.0.11:80\""));
        let end = refused_or_answered(&drain("198.18.0.11:80"), old()).unwrap_err();
        assert_eq!(end.code, 2);
        assert_eq!(end.stderr().len(), 2);
        assert!(end.stderr()[1].contains("predates drains of one address:port"), "{end:?}");
        let end = refused_or_answered(&drain("198.18.0.11"), old()).unwrap_err();
        assert_eq!(end.stderr().len(), 1);
        let end = refused_or_answered(
            &drain("198.18.0.11:80"),
            Ok(Response::bad_request("no VIP lists it")),
        )
        .unwrap_err();
        assert_eq!(end.stderr().len(), 1);
    }

    #[test]
    fn check_says_the_summary_and_the_cautions_or_the_error() {
        let dir = std::env::temp_dir().join(format!("edgelb-cli-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, crate::config::EXAMPLE).unwrap();
        let end = check(&good);
        assert_eq!(end.code, 0);
        assert_eq!(
            end.stdout(),
            [format!(
                "{}: ok (3 VIPs, 1 of them L7; 6 backend entries in the data plane)",
                good.display()
            )]
        );
        assert!(end.stderr().is_empty(), "{end:?}");
        let plus = dir.join("plus.toml");
        std::fs::write(&plus, crate::config::EXAMPLE.replace("198.19.0.0/16", "198.19.0.0/+16"))
            .unwrap();
        let end = check(&plus);
        assert_eq!(end.code, 0);
        assert_eq!(end.stderr().len(), 1);
        assert!(end.stderr()[0].starts_with(&format!("warning: {}:", plus.display())), "{end:?}");
        let end = check(&dir.join("missing.toml"));
        assert_eq!(end.code, 2);
        assert!(end.stdout().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
