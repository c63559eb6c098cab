//! edgelb: an XDP + io_uring edge load balancer. This crate is the controller (`edgelb` binary):
//! it turns a TOML config into the XDP balancer's maps and keeps them in step.
//!
//! The binary's `main.rs` is a thin CLI over this library, so tests and benches drive the same
//! code. Subsystems, one module each:
//! - [`config`]: the TOML schema and its validation (errors point at file:line:column);
//! - [`maglev`]: the consistent-hash ring builder;
//! - [`dataplane`]: loading, attaching and incrementally updating the eBPF maps;
//! - [`controller`]: the `edgelb run` loop: effective config from health and drains, reload,
//!   hitless stop/start, counters in the log;
//! - [`health`]: active TCP/HTTP/UDP health checks with rise/fall;
//! - [`accept`]: what the accept loops (L7, metrics, admin) do when an accept fails;
//! - [`backoff`]: the doubling wait of whatever the controller tries again after a failure;
//! - [`build`]: which build this is (version and git commit), as `--version`, `status`,
//!   `/metrics` and a takeover's log say it;
//! - [`admin`]: the root-only Unix socket behind `edgelb status | drain | reload | stop`;
//! - [`cli`]: the `edgelb` subcommands other than `run` (`check`, `route`, `status`, `stop`,
//!   `decap`...): what each decides and says, which `main.rs` prints;
//! - [`metrics`]: Prometheus `/metrics` (kernel counters, health, transitions, L7);
//! - [`logging`]: the log on stderr, through a queue that drops lines rather than stall;
//! - [`panics`]: the panic hook of `edgelb run` (each panic logged and counted);
//! - [`rlimit`]: the process's resource limits (one wrapper over getrlimit/setrlimit);
//! - [`tcp_info`]: a TCP socket's kernel state (one wrapper over getsockopt(TCP_INFO));
//! - [`procfs`]: `/proc/<pid>/stat` (whether a process runs, its parent);
//! - [`proxy`]: the io_uring L7 proxy (HTTP/1.1 and TCP) for VIPs marked `l7`;
//! - [`testbed`]: network-namespace topologies for `cargo xtask run` and the end-to-end tests.
#![deny(unsafe_code)]
#![deny(missing_docs)]

/// `e` and each of its causes after a colon ("`bpf_link_create` failed: Operation not supported
/// (os error 95)"), as `edgelb` prints an error. This crate's errors put their causes in their
/// messages, not in `source()`, so that a chain says each once; other crates' (aya's) keep
/// theirs in `source()` (a syscall's error code), and a message naming one renders it with this.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        // A cause the message already ends with (a thiserror `{source}`) is not said twice.
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// A panic's message, from its payload (`panic!` gives a `&str` or a `String`; anything else
/// is said as such): a thread found dead is logged with why, not with a type-erased box.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

pub mod accept;
pub mod admin;
pub mod backoff;
pub mod build;
pub mod cli;
pub mod config;
pub mod controller;
pub mod dataplane;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod panics;
pub mod procfs;
pub mod proxy;
pub mod rlimit;
pub mod tcp_info;
pub mod testbed;
#[cfg(test)]
mod testlog;
