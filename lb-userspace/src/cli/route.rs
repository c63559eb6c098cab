//! `edgelb route`: the backend a new flow gets, from the running controller, or from the config
//! file when none answers.

use std::{net::IpAddr, path::Path};

use super::{AdminTarget, Ending};
use crate::{
    admin::{AdminError, Request, Response},
    config::{Config, Protocol},
    dataplane::{RouteError, RouteFlow},
};

/// A flow `edgelb route` is asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteQuestion {
    /// The client's address.
    pub client: IpAddr,
    /// The VIP: a name, an address, or address:port.
    pub vip: String,
    /// The client's source port (VIPs that hash the 5-tuple).
    pub sport: Option<u16>,
    /// The protocol, when a TCP and a UDP VIP share the address and port.
    pub proto: Option<Protocol>,
}

/// `edgelb route`: asks the running controller; answers from the config file when none answers
/// on the socket, or one too old to know the request does. Exit 0 with the backend's address
/// alone on stdout; 1 when the VIP places no new flow; 2 for a bad question (an L7 VIP, which
/// places requests, not flows, included) or config; 3 when the socket turns this user away (an
/// edgelb may run there: its answer is not the file's). `from_file` skips the controller: the
/// file's answer, for a file not (yet) running.
pub fn route(target: &AdminTarget, q: &RouteQuestion, from_file: bool) -> Ending {
    let why_offline = if from_file {
        "--from-file asks for the file's answer".to_owned()
    } else {
        let socket = match target.socket() {
            Ok(s) => s,
            Err(end) => return end,
        };
        let req =
            Request::Route { client: q.client, vip: q.vip.clone(), sport: q.sport, proto: q.proto };
        match asked(crate::admin::request(&socket, &req), &socket, &target.config) {
            Asked::Done(end) => return end,
            Asked::FileAnswers(why) => why,
        }
    };
    from_config(&target.config, q, &why_offline)
}

/// How asking the running controller for `edgelb route`'s answer went.
#[derive(Debug, PartialEq)]
enum Asked {
    /// Answered, or refused (said on stderr): the command ends so.
    Done(Ending),
    /// No controller answered (nobody serves the socket, or one too old to know the request):
    /// the file answers instead, and this says why.
    FileAnswers(String),
}

/// What the controller's `answer` on `socket` makes of `edgelb route` (`config` the file that
/// would answer in its stead).
fn asked(answer: Result<Response, AdminError>, socket: &Path, config: &Path) -> Asked {
    match answer {
        Ok(resp) if resp.ok && resp.route.is_some() => {
            let answer = resp.route.expect("checked");
            Asked::Done(Ending::new(0).out(answer.backend.to_string()).err(format!(
                "(answered by the running edgelb on {}: {})",
                socket.display(),
                resp.message
            )))
        }
        Ok(resp) if resp.unknown_request() => Asked::FileAnswers(format!(
            "the edgelb answering on {} is older and does not answer `route`",
            socket.display()
        )),
        Ok(resp) => {
            let code = if resp.bad_request || resp.bad_config { 2 } else { 1 };
            Asked::Done(Ending::new(code).err(format!("edgelb: {}", resp.message)))
        }
        Err(e) if e.nobody_serves() => {
            Asked::FileAnswers(format!("no edgelb answers on {}", socket.display()))
        }
        // Turned away (a user the root-only socket refuses): an edgelb may run there, and the
        // file's answer, given as if none did, may not be its.
        Err(e @ AdminError::Connect { .. }) => Asked::Done(Ending::new(3).err(format!(
            "edgelb: {e}; not answering from {} in its stead: the running edgelb's drains, health verdicts and config may place the flow elsewhere (`--from-file` asks for the file's answer)",
            config.display()
        ))),
        Err(e) => Asked::FileAnswers(format!("{e}")),
    }
}

/// Completes `edgelb route` from `config`, with `why_offline` the reason it is the file's
/// answer (no controller's).
fn from_config(config: &Path, q: &RouteQuestion, why_offline: &str) -> Ending {
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => return Ending::new(2).err(format!("edgelb: {why_offline}, and {e}")),
    };
    let file = config.display();
    let answer = RouteFlow::resolve(&cfg, &q.vip, q.proto, q.client, q.sport)
        .and_then(|flow| flow.by_config());
    match answer {
        Ok(backend) => Ending::new(0).out(backend.to_string()).err(format!(
            "(computed from {file}, as {why_offline}: the ring of the file's weights; a drain, a health verdict or a reload not yet made can place new flows elsewhere, and an established flow stays where its connection table entry says)"
        )),
        Err(e) => {
            let code = match e {
                RouteError::BadQuestion(_) => 2,
                RouteError::NoBackend(_) => 1,
            };
            Ending::new(code).err(format!("edgelb: {file}: {e} ({why_offline})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::RouteAnswer;

    fn connect_error(kind: std::io::ErrorKind) -> AdminError {
        AdminError::Connect { path: "/run/edgelb/t.sock".into(), error: kind.into() }
    }

    /// The controller's answer is taken, or its refusal; the file answers only when nobody
    /// serves the socket, or one too old to know `route` does; a socket that turns this user
    /// away is no reason to answer from the file (exit 3).
    #[test]
    fn the_file_answers_only_when_no_controller_can() {
        let socket = Path::new("/run/edgelb/t.sock");
        let config = Path::new("/etc/edgelb/t.toml");
        let answered = Response {
            route: Some(RouteAnswer {
                vip: "web".into(),
                backend: [198, 18, 0, 11].into(),
                fail_open: false,
            }),
            ..Response::ok("VIP web, backend 198.18.0.11")
        };
        assert_eq!(
            asked(Ok(answered), socket, config),
            Asked::Done(Ending::new(0).out("198.18.0.11").err(
                "(answered by the running edgelb on /run/edgelb/t.sock: VIP web, backend 198.18.0.11)"
            ))
        );
        let old =
            Response::bad_request("bad request: unknown variant `route`, expected one of ...");
        assert_eq!(
            asked(Ok(old), socket, config),
            Asked::FileAnswers(
                "the edgelb answering on /run/edgelb/t.sock is older and does not answer `route`"
                    .into()
            )
        );
        let no_vip = Response::bad_request("no VIP `x`");
        assert_eq!(
            asked(Ok(no_vip), socket, config),
            Asked::Done(Ending::new(2).err("edgelb: no VIP `x`"))
        );
        let nowhere = Response::err("VIP web has no backend with weight");
        assert!(matches!(asked(Ok(nowhere), socket, config), Asked::Done(Ending { code: 1, .. })));
        for kind in [std::io::ErrorKind::NotFound, std::io::ErrorKind::ConnectionRefused] {
            assert_eq!(
                asked(Err(connect_error(kind)), socket, config),
                Asked::FileAnswers("no edgelb answers on /run/edgelb/t.sock".into())
            );
        }
        let Asked::Done(end) =
            asked(Err(connect_error(std::io::ErrorKind::PermissionDenied)), socket, config)
        else {
            panic!("turned away, the file answered");
        };
        assert_eq!(end.code, 3);
        assert!(end.stderr()[0].contains("not answering from /etc/edgelb/t.toml in its stead"));
    }
}
