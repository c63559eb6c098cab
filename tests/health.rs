//! Active health checks against real loopback sockets, under real shortages of this node's own
//! resources. Unprivileged: everything here runs on 127.0.0.0/8, each starved test in a
//! process of its own.

use std::{
    net::TcpListener,
    sync::mpsc,
    time::{Duration, Instant},
};

use edgelb::{config::Config, health::Checker};

mod common;

/// A config with one L7 VIP on 127.0.0.1 whose backends are 127.0.0.1 on `ports`, checked over
/// TCP every 30 ms, down after a single failure (`fall = 1`).
fn checked(ports: &[u16]) -> Config {
    let backends: Vec<String> =
        ports.iter().map(|p| format!("{{ address = \"127.0.0.1\", port = {p} }}")).collect();
    let text = format!(
        "[node]\ninterfaces = [\"lo\"]\n[[vip]]\nname = \"web\"\naddress = \"127.0.0.1\"\nport = 80\nforwarding = \"l7\"\nbackends = [{}]\n[vip.health]\ninterval_ms = 30\ntimeout_ms = 30\nrise = 1\nfall = 1\n",
        backends.join(", ")
    );
    Config::parse(&text, "t.toml".as_ref()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A probe that cannot even open its socket (this node is out of descriptors) says nothing of
/// the backend: a check with `fall = 1` must not take a healthy backend down for it, however
/// many such probes there are, and once descriptors are free again the probes go on from the
/// state the backend was in. (They did count as failures, and a descriptor spike on the node
/// took every healthy backend out of the ring.)
#[test]
fn a_probe_out_of_descriptors_blames_no_backend() {
    const NAME: &str = "a_probe_out_of_descriptors_blames_no_backend";
    if std::env::var_os("EDGELB_FD_CHILD").is_none() {
        return common::in_child(NAME);
    }
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = checked(&[backend.local_addr().unwrap().port()]);
    let (tx, rx) = mpsc::channel();
    let mut checker = Checker::new(tx);
    let events = |rx: &mpsc::Receiver<_>, ms| {
        let until = Instant::now() + Duration::from_millis(ms);
        let mut got = Vec::new();
        while let Ok(ev) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            got.push(ev);
        }
        got
    };
    let room = common::room_for(0);
    assert_eq!(checker.reconcile(&cfg, |_, _| false), 0, "the check started");
    let starved: Vec<edgelb::health::HealthEvent> = events(&rx, 300);
    drop(room);
    assert!(starved.len() >= 3, "probes ran: {starved:?}");
    assert!(starved.iter().all(|ev| ev.healthy && !ev.changed), "{starved:?}");
    assert!(starved.iter().all(|ev| ev.local_failure), "each said to be this node's: {starved:?}");
    // Descriptors are back: the probes reach the backend, which is still up.
    let fed = events(&rx, 200);
    assert!(
        !fed.is_empty() && fed.iter().all(|ev| ev.healthy && !ev.changed && !ev.local_failure),
        "{fed:?}"
    );
    drop(backend);
}
