//! The `edgelb` command line: a thin layer over the `edgelb` library.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use edgelb::{
    admin::{AdminError, BackendRef, Request, Response},
    config::Config,
    dataplane::Dataplane,
};

/// edgelb: XDP edge load balancer.
#[derive(Parser)]
#[command(name = "edgelb", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config, fill the maps, attach XDP and balance. SIGHUP or `edgelb reload` re-reads
    /// the config; SIGTERM/SIGINT stop the controller and leave the data plane running for the
    /// next `edgelb run` to adopt; `edgelb stop` removes everything.
    Run {
        /// Config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Replace the edgelb running with the same admin socket without refusing a
        /// connection: it hands over its listening sockets (L7 VIPs, metrics) and the data
        /// plane, serves until this one does, then finishes its requests in flight and exits.
        /// If this one fails before it writes the maps, the running one takes back over.
        /// Without a running edgelb, starts as usual.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file: exit 0 if valid, 2 with file:line:column and the problem if not.
    Check {
        /// Config file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the backend a new flow from CLIENT to VIP gets: the running edgelb's answer (the
    /// ring XDP indexes, drains and health verdicts included), or, when none answers on the
    /// admin socket (or with --from-file), the hash and ring of the config file's weights.
    /// Which one answered is said on stderr.
    Route {
        #[command(flatten)]
        admin: AdminArgs,
        /// Client address.
        client: IpAddr,
        /// VIP name, address (IPv6 bare or in brackets), or address:port / [v6]:port
        /// (address:port for a VIP that serves any port and hashes the 5-tuple: the destination
        /// port is part of the hash).
        vip: String,
        /// Client source port: required for, and only used by, VIPs that hash the 5-tuple (no
        /// real flow has source port 0).
        #[arg(long)]
        sport: Option<u16>,
        /// The flow's protocol, when a TCP and a UDP VIP share the address and port.
        #[arg(long, value_parser = ["tcp", "udp"])]
        proto: Option<String>,
        /// Answer from the config file (-c) alone, without asking the running edgelb: where a
        /// candidate file would place the flow before it is reloaded, while edgelb runs.
        #[arg(long, conflicts_with = "socket")]
        from_file: bool,
    },
    /// Show VIPs, backends, weights, health, ring shares and counters of the running edgelb.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Drain a backend: weight 0, no new flows, established flows keep going.
    Drain {
        #[command(flatten)]
        admin: AdminArgs,
        /// Backend address (on every port a VIP lists it with), or address:port / [IPv6]:port
        /// for that backend alone (an L7 pool may list one address on several ports).
        backend: BackendRef,
        /// Only in this VIP (default: every VIP that lists the backend).
        #[arg(long)]
        vip: Option<String>,
    },
    /// Undo `edgelb drain`.
    Undrain {
        #[command(flatten)]
        admin: AdminArgs,
        /// Backend address (every drain of it), or address:port.
        backend: BackendRef,
        /// Only in this VIP.
        #[arg(long)]
        vip: Option<String>,
    },
    /// Re-read the config file edgelb runs with (another file given with -c is refused: switch
    /// files with `edgelb run -c NEW --takeover`); an invalid one is rejected and the running
    /// config stays.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop edgelb and remove its data plane (XDP detached, pins deleted). With --detach, stop
    /// only the controller and leave the data plane running for the next `edgelb run`.
    Stop {
        #[command(flatten)]
        admin: AdminArgs,
        /// Leave XDP attached and the maps pinned.
        #[arg(long)]
        detach: bool,
    },
    /// On a backend: attach (or detach) edgelb's XDP decapsulator, which strips the IPIP / IP6IP6
    /// / 4in6 header the balancer adds, for backend kernels without tunnel modules. Its link is
    /// pinned, so it stays attached after this command; `attach` again upgrades it in place.
    Decap {
        /// attach or detach.
        #[arg(value_parser = ["attach", "detach"])]
        action: String,
        /// The backend's interface the balancer's packets arrive on (it does not check the
        /// outer destination: attach it only on backend-facing interfaces).
        interface: String,
        /// XDP mode (attach only).
        #[arg(long, default_value = "auto", value_parser = ["auto", "native", "generic"])]
        mode: String,
        /// Where the link is pinned (under /sys/fs/bpf/). bpffs is shared by all network
        /// namespaces and pins are named by interface: give each namespace its own.
        #[arg(long, default_value = edgelb::dataplane::DECAP_PIN_DIR)]
        pin_dir: PathBuf,
        /// Strip only tunnels from this outer source prefix (repeatable; attach only): the
        /// balancers' node.encap_source_v4 / encap_source_v6. Without it, tunnels from any
        /// source are stripped, and anyone who can send IPIP to the backend can hand it packets
        /// with a source address of their choosing.
        #[arg(long = "allow-source", value_name = "PREFIX", value_parser = parse_prefix)]
        allow_source: Vec<(IpAddr, u8)>,
    },
}

/// Where to find the running controller.
#[derive(clap::Args)]
struct AdminArgs {
    /// Config file: its node.admin_socket is where the running edgelb is asked (`stop` with
    /// none answering also removes the data plane under its node.pin_dir, and `route` answers
    /// from the file; `reload` re-reads the file edgelb runs with, which this must name).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Admin socket, overriding the config's.
    #[arg(long)]
    socket: Option<PathBuf>,
}

const DEFAULT_CONFIG: &str = "/etc/edgelb/edgelb.toml";

impl AdminArgs {
    /// The socket to talk to: `--socket`, or the config's (exit 2 when the config is too broken
    /// to tell).
    fn socket(&self) -> Result<PathBuf, ExitCode> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        edgelb::config::admin_socket_of(&self.config).map_err(|e| {
            eprintln!("edgelb: {e}");
            ExitCode::from(2)
        })
    }
}

/// The CLI commands write to stdout, often into a pipe (`edgelb status --json | head`): a reader
/// that leaves early should end them quietly, as it does any Unix tool, not make `println!`
/// panic on EPIPE (Rust starts programs with SIGPIPE ignored). Not for `run`, which must never
/// be killed by a peer that closed a socket.
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: sets the default disposition of SIGPIPE (no handler runs); called before any
    // other thread exists, so nothing races with the change.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        default_sigpipe();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    match cli.command {
        Command::Run { config, takeover } => match edgelb::controller::run(&config, takeover) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgelb: {}", edgelb::error_chain(&e));
                let bad_config = matches!(e, edgelb::controller::RunError::Config(_));
                ExitCode::from(if bad_config { 2 } else { 1 })
            }
        },
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                // Accepted, so exit 0, but said: likely not what was meant.
                for c in &cfg.cautions {
                    eprintln!("warning: {c}");
                }
                // As the limit counts them: the backends of the VIPs XDP forwards.
                let entries: usize = cfg
                    .vips
                    .iter()
                    .filter(|v| v.forwarding != edgelb::config::Forwarding::L7)
                    .map(|v| v.backends.len())
                    .sum();
                let l7: usize = cfg.vips.iter().filter(|v| v.l7.is_some()).count();
                println!(
                    "{}: ok ({} VIPs, {l7} of them L7; {entries} backend entries in the data plane)",
                    config.display(),
                    cfg.vips.len(),
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Route { admin, client, vip, sport, proto, from_file } => {
            let proto = proto.map(|p| {
                if p == "udp" {
                    edgelb::config::Protocol::Udp
                } else {
                    edgelb::config::Protocol::Tcp
                }
            });
            route(&admin, client, &vip, sport, proto, from_file)
        }
        Command::Status { admin, json } => admin_call(&admin, &Request::Status, |resp| {
            let status = resp.status.unwrap_or_default().renamed_fields();
            if json {
                println!("{}", serde_json::to_string_pretty(&status).expect("status serialises"));
            } else {
                print_status(&status);
            }
        }),
        Command::Drain { admin, backend, vip } => {
            admin_call(&admin, &Request::Drain { backend, vip }, |r| println!("{}", r.message))
        }
        Command::Undrain { admin, backend, vip } => {
            admin_call(&admin, &Request::Undrain { backend, vip }, |r| println!("{}", r.message))
        }
        Command::Reload { admin } => {
            // The file named, unless only the socket was (the default file then means nothing).
            let named = admin.socket.is_none() || admin.config != Path::new(DEFAULT_CONFIG);
            let config =
                named.then(|| std::path::absolute(&admin.config).unwrap_or(admin.config.clone()));
            admin_call(&admin, &Request::Reload { config }, |r| println!("{}", r.message))
        }
        Command::Stop { admin, detach } => stop(&admin, detach),
        Command::Decap { action, interface, mode, pin_dir, allow_source } => {
            decap(action == "attach", &interface, &mode, &pin_dir, &allow_source)
        }
    }
}

/// `edgelb decap`: exit 0 done, 1 failed (the reason printed), 2 bad arguments.
/// An address prefix, `198.19.0.0/16` or `2001:db8:100::/96` (a bare address, without `/`, is
/// its own /32 or /128). A `/` with no length after it is an error, not a host: an unset shell
/// variable (`198.19.0.0/$LEN`) would otherwise allow one address where a range was meant, and
/// the tunnels from the rest would pass unstripped. An IPv4-mapped IPv6 prefix is refused: it
/// would go into the IPv6 table and never match an IPv4 tunnel's source.
fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an address prefix"))?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "`{s}` is an IPv4-mapped IPv6 prefix, which no IPv4 tunnel's source matches: write the IPv4 prefix"
        ));
    }
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => bits,
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse().map_err(|_| format!("`{s}`: bad prefix length"))?
        }
        Some(_) => return Err(format!("`{s}`: bad prefix length (the number of bits after `/`)")),
    };
    if len > bits {
        return Err(format!(
            "`{s}`: an IPv{} prefix is at most /{bits}",
            if bits == 32 { 4 } else { 6 }
        ));
    }
    Ok((addr, len))
}

fn decap(
    attach: bool,
    interface: &str,
    mode: &str,
    pin_dir: &std::path::Path,
    sources: &[(IpAddr, u8)],
) -> ExitCode {
    if !pin_dir.to_str().is_some_and(edgelb::config::below_bpffs) {
        eprintln!(
            "edgelb: --pin-dir must be a directory under /sys/fs/bpf/, named without `.` or `..`"
        );
        return ExitCode::from(2);
    }
    let result = if attach {
        let mode = match mode {
            "native" => edgelb::config::XdpAttachMode::Native,
            "generic" => edgelb::config::XdpAttachMode::Generic,
            _ => edgelb::config::XdpAttachMode::Auto,
        };
        if sources.is_empty() {
            eprintln!(
                "edgelb: warning: no --allow-source: tunnels from any source are stripped, so anyone who can send IPIP to this backend can hand it packets from a source of their choosing; give the balancers' encap_source prefixes"
            );
        }
        edgelb::dataplane::attach_decap(interface, mode, pin_dir, sources).map(|used| {
            let from = if sources.is_empty() {
                "any source".to_owned()
            } else {
                sources.iter().map(|(a, l)| format!("{a}/{l}")).collect::<Vec<_>>().join(", ")
            };
            format!(
                "decapsulator attached to {interface} ({used}), pinned in {}, taking tunnels from {from}",
                pin_dir.display()
            )
        })
    } else {
        edgelb::dataplane::detach_decap(interface, pin_dir).map(|was| {
            if was {
                format!("decapsulator detached from {interface}")
            } else {
                format!("no decapsulator of edgelb's on {interface} (under {})", pin_dir.display())
            }
        })
    };
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgelb: {}", edgelb::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Sends `req`; prints with `show` on success; exit 1 when refused, 2 when refused for a bad
/// config or a request naming what the config does not have, 3 when unreachable.
fn admin_call(admin: &AdminArgs, req: &Request, show: impl FnOnce(Response)) -> ExitCode {
    let socket = match admin.socket() {
        Ok(s) => s,
        Err(code) => return code,
    };
    match edgelb::admin::request(&socket, req) {
        Ok(resp) if resp.ok => {
            show(resp);
            ExitCode::SUCCESS
        }
        Ok(resp) => {
            eprintln!("edgelb: {}", resp.message);
            if let Request::Drain { backend, .. } | Request::Undrain { backend, .. } = req
                && backend.port.is_some()
                && resp.message.starts_with("bad request:")
                && resp.message != edgelb::admin::TOO_LONG
            {
                eprintln!(
                    "edgelb: the running edgelb predates drains of one address:port and refused it (nothing changed): name the address alone, which drains it on every port, or restart edgelb with this version (`edgelb run --takeover`)"
                );
            }
            ExitCode::from(if resp.bad_config || resp.bad_request { 2 } else { 1 })
        }
        Err(e) => {
            eprintln!("edgelb: {e}");
            ExitCode::from(3)
        }
    }
}

/// `edgelb route`: asks the running controller; answers from the config file when none answers
/// on the socket, or one too old to know the request does. Exit 0 with the backend's address
/// alone on stdout; 1 when the VIP places no new flow; 2 for a bad question (an L7 VIP, which
/// places requests, not flows, included) or config; 3 when
/// the socket turns this user away (an edgelb may run there: its answer is not the file's).
/// `from_file` skips the controller: the file's answer, for a file not (yet) running.
fn route(
    admin: &AdminArgs,
    client: IpAddr,
    vip: &str,
    sport: Option<u16>,
    proto: Option<edgelb::config::Protocol>,
    from_file: bool,
) -> ExitCode {
    let why_offline = if from_file {
        "--from-file asks for the file's answer".to_owned()
    } else {
        match ask_route(admin, client, vip, sport, proto) {
            Asked::Done(code) => return code,
            Asked::FileAnswers(why) => why,
        }
    };
    route_from_file(admin, client, vip, sport, proto, &why_offline)
}

/// How asking the running controller for `edgelb route`'s answer went.
enum Asked {
    /// Answered, or refused (said on stderr): the command ends with this code.
    Done(ExitCode),
    /// No controller answered (nobody serves the socket, or one too old to know the request):
    /// the file answers instead, and this says why.
    FileAnswers(String),
}

/// Asks the running controller for `edgelb route`'s answer.
fn ask_route(
    admin: &AdminArgs,
    client: IpAddr,
    vip: &str,
    sport: Option<u16>,
    proto: Option<edgelb::config::Protocol>,
) -> Asked {
    let socket = match admin.socket() {
        Ok(s) => s,
        Err(code) => return Asked::Done(code),
    };
    let req = Request::Route { client, vip: vip.to_owned(), sport, proto };
    match edgelb::admin::request(&socket, &req) {
        Ok(resp) if resp.ok && resp.route.is_some() => {
            let answer = resp.route.expect("checked");
            println!("{}", answer.backend);
            eprintln!("(answered by the running edgelb on {}: {})", socket.display(), resp.message);
            Asked::Done(ExitCode::SUCCESS)
        }
        Ok(resp) if resp.unknown_request() => Asked::FileAnswers(format!(
            "the edgelb answering on {} is older and does not answer `route`",
            socket.display()
        )),
        Ok(resp) => {
            eprintln!("edgelb: {}", resp.message);
            Asked::Done(ExitCode::from(if resp.bad_request || resp.bad_config { 2 } else { 1 }))
        }
        Err(e) if e.nobody_serves() => {
            Asked::FileAnswers(format!("no edgelb answers on {}", socket.display()))
        }
        // Turned away (a user the root-only socket refuses): an edgelb may run there, and the
        // file's answer, given as if none did, may not be its.
        Err(e @ AdminError::Connect { .. }) => {
            eprintln!(
                "edgelb: {e}; not answering from {} in its stead: the running edgelb's drains, health verdicts and config may place the flow elsewhere (`--from-file` asks for the file's answer)",
                admin.config.display()
            );
            Asked::Done(ExitCode::from(3))
        }
        Err(e) => Asked::FileAnswers(format!("{e}")),
    }
}

/// Completes `edgelb route`, from `admin.config`, with `why_offline` the reason it is the
/// file's answer (no controller's).
fn route_from_file(
    admin: &AdminArgs,
    client: IpAddr,
    vip: &str,
    sport: Option<u16>,
    proto: Option<edgelb::config::Protocol>,
    why_offline: &str,
) -> ExitCode {
    let cfg = match Config::load(&admin.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgelb: {why_offline}, and {e}");
            return ExitCode::from(2);
        }
    };
    let file = admin.config.display();
    let answer = edgelb::dataplane::RouteFlow::resolve(&cfg, vip, proto, client, sport)
        .and_then(|flow| flow.by_config());
    match answer {
        Ok(backend) => {
            println!("{backend}");
            eprintln!(
                "(computed from {file}, as {why_offline}: the ring of the file's weights; a drain, a health verdict or a reload not yet made can place new flows elsewhere, and an established flow stays where its connection table entry says)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgelb: {file}: {e} ({why_offline})");
            ExitCode::from(match e {
                edgelb::dataplane::RouteError::BadQuestion(_) => 2,
                edgelb::dataplane::RouteError::NoBackend(_) => 1,
            })
        }
    }
}

fn stop(admin: &AdminArgs, detach: bool) -> ExitCode {
    stop_once(admin, detach, true)
}

/// Waits up to `wait` for a stopping controller to exit, calling `tick` with the time waited so
/// far every 50 ms; says so and returns false if it is still there then. Gone: its admin
/// `socket` is removed (the last thing it does), or, left behind by a controller killed before
/// it could remove it (a SIGKILL after a long drain), refuses connections while its process
/// (`pid`, when its answer gave one and this process can see it) is not running.
fn gone_within(
    socket: &std::path::Path,
    pid: Option<u32>,
    wait: std::time::Duration,
    mut tick: impl FnMut(std::time::Duration),
) -> bool {
    let gone = || {
        // Running, not a zombie its parent has yet to reap (its state after the command name in
        // /proc/<pid>/stat). A controller in another pid namespace gives a pid that names
        // another process here, or none: only a socket left behind asks.
        let running = |p: u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
                !state.is_some_and(|s| s.starts_with('Z') || s.starts_with('X'))
            })
        };
        // Its socket removed is enough; one left behind counts once nobody accepts on it and
        // the process is not running (where this process can see it).
        !socket.exists()
            || !pid.is_some_and(running)
                && std::os::unix::net::UnixStream::connect(socket)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    let started = std::time::Instant::now();
    while !gone() && started.elapsed() < wait {
        tick(started.elapsed());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if !gone() {
        eprintln!(
            "edgelb: still stopping after {} s ({} remains)",
            wait.as_secs(),
            socket.display()
        );
        return false;
    }
    true
}

/// `stop`; with `retry`, a controller already stopping is waited for, and the stop asked again.
fn stop_once(admin: &AdminArgs, detach: bool, retry: bool) -> ExitCode {
    let socket = match admin.socket() {
        Ok(s) => s,
        Err(code) => return code,
    };
    // The config's data plane (its pin_dir) is the socket's only when the socket is the
    // config's: `--socket` alone leaves the default file, which may be another instance's.
    let config_socket = edgelb::config::admin_socket_of(&admin.config).ok();
    let the_configs = config_socket.as_deref() == Some(socket.as_path());
    match edgelb::admin::request(&socket, &Request::Stop { detach }) {
        // Stopping already (a SIGTERM's drain, or another `stop`): wait for it to exit. If its
        // exit leaves the data plane (a SIGTERM) and this stop is to remove it, go on as with no
        // controller running, which removes it (unless a controller holds it by then).
        Ok(resp) if !resp.ok && resp.stopping && retry => {
            let wait = std::time::Duration::from_millis(resp.drain_ms.unwrap_or(0))
                + std::time::Duration::from_secs(30);
            // The data plane is this config's to remove only through the config's socket. Asked
            // again once it has exited: what it leaves (all of it after a SIGTERM, leftovers of
            // a stop's teardown that was cut short) is removed as with no controller running.
            let removes_after = !detach && the_configs;
            eprintln!(
                "edgelb: {}; waiting for it to exit (up to {} s){}",
                resp.message,
                wait.as_secs(),
                if resp.teardown {
                    ", which removes the data plane (an `edgelb stop` is under way)"
                } else if removes_after {
                    ", then removing the data plane it leaves"
                } else {
                    ", which leaves the data plane running"
                }
            );
            if !gone_within(&socket, resp.pid, wait, |_| ()) {
                return ExitCode::from(1);
            }
            if removes_after {
                return stop_once(admin, detach, false);
            }
            if resp.teardown {
                println!(
                    "stopped; the stop under way was removing the data plane (its log says if anything was left)"
                );
            } else {
                println!(
                    "stopped (it was stopping already); the data plane keeps running{}",
                    if detach { "" } else { " (`edgelb stop -c <its config>` removes it)" }
                );
            }
            ExitCode::SUCCESS
        }
        Ok(resp) if !resp.ok => {
            eprintln!("edgelb: {}", resp.message);
            ExitCode::from(1)
        }
        Ok(resp) => {
            // Wait for the controller to finish: it removes its socket last, once its L7
            // requests are done (node.l7_drain_timeout_ms at most: the running one, which the
            // answer carries; an older controller's, as the file says) and (without --detach)
            // the data plane is gone.
            let cfg = Config::load(&admin.config).ok();
            let drain = resp.drain_ms.map(std::time::Duration::from_millis).unwrap_or_else(|| {
                cfg.as_ref()
                    .map_or(edgelb::config::DEFAULT_L7_DRAIN_TIMEOUT, |c| c.node.l7_drain_timeout)
            });
            let wait = drain + std::time::Duration::from_secs(30);
            let mut said = false;
            let gone = gone_within(&socket, resp.pid, wait, |waited| {
                if !said && !drain.is_zero() && waited >= std::time::Duration::from_secs(1) {
                    eprintln!(
                        "edgelb: waiting for the L7 requests in flight to finish (up to {} ms, its running node.l7_drain_timeout_ms; SIGTERM to edgelb ends them now)",
                        drain.as_millis()
                    );
                    said = true;
                }
            });
            if !gone {
                return ExitCode::from(1);
            }
            // What edgelb pinned must be gone; other tools' pins in a shared pin_dir stay.
            if !detach
                && the_configs
                && let Some(cfg) = &cfg
                && Dataplane::pins_in(&cfg.node.pin_dir).is_ok_and(|(mine, _)| !mine.is_empty())
            {
                eprintln!(
                    "edgelb: stopped, but edgelb's pins remain in {} (see edgelb's log; `edgelb stop` again removes them)",
                    cfg.node.pin_dir.display()
                );
                return ExitCode::from(1);
            }
            println!("{}", resp.message);
            ExitCode::SUCCESS
        }
        // Turned away (a user the root-only socket refuses): a controller may well run there,
        // and nothing is touched; the error below says so.
        Err(e @ AdminError::Connect { .. }) if e.nobody_serves() && !detach && !the_configs => {
            eprintln!(
                "edgelb: no controller answers on {}, which is not the admin socket of {} ({}): nothing was removed. To remove the data plane a detached edgelb left, name its config: `edgelb stop -c <its config>`",
                socket.display(),
                admin.config.display(),
                config_socket.map_or("unreadable".to_owned(), |s| s.display().to_string())
            );
            ExitCode::from(3)
        }
        Err(e @ AdminError::Connect { .. }) if e.nobody_serves() && !detach => {
            // No controller answers: remove a data plane a detached one may have left, unless a
            // controller still runs without its socket (mid-takeover, say), which removing the
            // pins would leave without XDP.
            let cfg = match Config::load(&admin.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("edgelb: no controller answers on {}, and {e}", socket.display());
                    return ExitCode::from(2);
                }
            };
            match edgelb::dataplane::pin_holders(&cfg.node.pin_dir) {
                Ok(holders) if holders.is_empty() => {}
                Ok(holders) => {
                    let who: Vec<String> = holders.iter().map(ToString::to_string).collect();
                    eprintln!(
                        "edgelb: no controller answers on {}, but {} holds the data plane under {} open: \
                         a controller appears to be running (perhaps in the middle of a takeover) whose \
                         admin socket does not answer. Nothing was removed. Retry `edgelb stop` in a \
                         moment, or stop that process (SIGTERM leaves the data plane running) and then \
                         run `edgelb stop` again.",
                        socket.display(),
                        who.join(", "),
                        cfg.node.pin_dir.display()
                    );
                    return ExitCode::from(1);
                }
                Err(e) => {
                    eprintln!(
                        "edgelb: no controller answers on {}, and whether a process still holds the data plane under {} open cannot be told ({e}); nothing was removed",
                        socket.display(),
                        cfg.node.pin_dir.display()
                    );
                    return ExitCode::from(1);
                }
            }
            // Asked before the pins go: a link just unpinned is let go of only after a while,
            // and its program would read as running elsewhere.
            let elsewhere =
                edgelb::dataplane::balancers_elsewhere(&cfg.node.interfaces, &cfg.node.pin_dir);
            let pinned =
                Dataplane::pins_in(&cfg.node.pin_dir).is_ok_and(|(mine, _)| !mine.is_empty());
            match Dataplane::teardown(&cfg.node.pin_dir) {
                Ok(others) => {
                    if pinned {
                        println!(
                            "no controller running; data plane under {} removed",
                            cfg.node.pin_dir.display()
                        );
                    } else {
                        println!(
                            "no controller running, and nothing of edgelb's pinned under {}",
                            cfg.node.pin_dir.display()
                        );
                    }
                    if !others.is_empty() {
                        println!("{}", left_alone(&others));
                    }
                    if elsewhere.is_empty() {
                        return ExitCode::SUCCESS;
                    }
                    for (interface, prog_id, pin) in &elsewhere {
                        let pin = pin.as_ref().map_or_else(
                            || "pinned nowhere under /sys/fs/bpf (a running process holds it: stop it by PID)".to_owned(),
                            |p| format!("its link pinned at {} (removing that pin detaches it)", p.display()),
                        );
                        eprintln!(
                            "edgelb: but edgelb's balancer still runs on `{interface}` (program id {prog_id}), {pin}: not the data plane of {}'s node.pin_dir ({}). Was node.pin_dir changed since it started? `edgelb stop -c <the config naming its pin directory>` removes it",
                            admin.config.display(),
                            cfg.node.pin_dir.display()
                        );
                    }
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("edgelb: removing {}: {e}", cfg.node.pin_dir.display());
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            eprintln!("edgelb: {e}");
            ExitCode::from(3)
        }
    }
}

fn print_status(s: &edgelb::admin::Status) {
    println!("config {}", s.config.display());
    for (iface, mode) in &s.interfaces {
        println!("interface {iface}: XDP {mode}");
    }
    let ct = &s.conntrack;
    println!(
        "connection table: {} CPUs × ({} IPv4 + {} IPv6 flows); {} evicted from full buckets, {} found on another CPU, {} established TCP flows missing (pushed out before they ended), {} searches of the other CPUs skipped (budget spent)",
        ct.cpus,
        ct.v4_flows_per_cpu,
        ct.v6_flows_per_cpu,
        ct.evicted,
        ct.found_on_other_cpu,
        ct.missed_established,
        ct.search_skipped
    );
    for v in &s.vips {
        println!();
        let head = format!(
            "VIP {} [{}{}]{}",
            v.listen,
            v.forwarding,
            if v.conntrack { "" } else { ", no connection table" },
            if v.fail_open { "  FAIL-OPEN (all backends down)" } else { "" },
        );
        let health = |b: &edgelb::admin::BackendStatus| match (b.healthy, b.passive_down) {
            (false, _) => "DOWN",
            (true, true) => "FAILING",
            (true, false) => "up",
        };
        let drained = |b: &edgelb::admin::BackendStatus| if b.drained { "yes" } else { "no" };
        if v.forwarding == "l7" {
            // XDP passes an L7 VIP's traffic to the kernel uncounted: its packet, byte and flow
            // counters, rates and ring shares are all 0. What moves is the proxy's count of
            // requests (TCP mode: connections), route pools' included (an older edgelb's answer
            // has no total of its own: the rows' sum, then).
            let rows: u64 = v.backends.iter().map(|b| b.l7_requests).sum();
            let requests = v.l7_requests.max(rows);
            println!("{head}  requests {requests}");
            println!(
                "  {:<40} {:>6} {:>7} {:>8} {:>12} {:>9}",
                "BACKEND", "WEIGHT", "HEALTH", "DRAINED", "REQUESTS", "IN FLIGHT"
            );
            for b in &v.backends {
                println!(
                    "  {:<40} {:>6} {:>7} {:>8} {:>12} {:>9}",
                    // Its address and port: one address may serve on several.
                    std::net::SocketAddr::new(b.address, b.port).to_string(),
                    b.weight,
                    health(b),
                    drained(b),
                    b.l7_requests,
                    // An older edgelb's answer has no count: unknown, not 0.
                    b.l7_in_flight.map_or_else(|| "-".to_owned(), |n| n.to_string())
                );
            }
            continue;
        }
        println!(
            "{head}  packets {}  bytes {}  new flows {}  now {:.0} pkt/s {:.0} B/s",
            v.packets, v.bytes, v.new_flows, v.pps, v.bytes_per_s
        );
        println!(
            "  {:<40} {:>6} {:>7} {:>8} {:>7} {:>12} {:>14} {:>10} {:>10}",
            "BACKEND",
            "WEIGHT",
            "HEALTH",
            "DRAINED",
            "RING%",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "PKT/S"
        );
        for b in &v.backends {
            println!(
                "  {:<40} {:>6} {:>7} {:>8} {:>7.2} {:>12} {:>14} {:>10} {:>10.0}",
                b.address.to_string(),
                b.weight,
                health(b),
                drained(b),
                b.ring_share * 100.0,
                b.packets,
                b.bytes,
                b.new_flows,
                b.pps
            );
        }
    }
}

/// What `stop` says of files in the pin directory that edgelb did not pin and so left there.
fn left_alone(others: &[std::path::PathBuf]) -> String {
    let names: Vec<String> = others.iter().map(|p| p.display().to_string()).collect();
    format!("left in place, not edgelb's: {}", names.join(", "))
}
