//! The `edgelb` command line: a thin layer over the `edgelb` library. The arguments are
//! defined and parsed here; what each command does, and says, is in [`edgelb::cli`] (and
//! [`edgelb::controller`] for `run`), which gives back an [`Ending`] printed here.
#![deny(unsafe_code)]

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use edgelb::{
    admin::{BackendRef, Request},
    cli::{AdminTarget, AllowSource, DEFAULT_CONFIG, Ending, RouteQuestion, Said},
};

/// edgelb: XDP edge load balancer.
#[derive(Parser)]
// `--version` names the commit too: two builds of one version are told apart.
#[command(name = "edgelb", version = edgelb::build::VERSION_AND_COMMIT, about)]
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
        #[arg(long = "allow-source", value_name = "PREFIX", value_parser = edgelb::cli::allow_source)]
        allow_source: Vec<AllowSource>,
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

impl AdminArgs {
    /// The controller these name, for [`edgelb::cli`].
    fn target(self) -> AdminTarget {
        AdminTarget { config: self.config, socket: self.socket }
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
    // `run` logs through a queue: a stalled log reader must not stall the balancer.
    let queued = matches!(cli.command, Command::Run { .. });
    let _log = edgelb::logging::init(cli.log_format == "json", queued);
    let end = match cli.command {
        Command::Run { config, takeover } => {
            return match edgelb::controller::run(&config, takeover) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // After the log's last lines, not before them.
                    edgelb::logging::flush();
                    eprintln!("edgelb: {}", edgelb::error_chain(&e));
                    let bad_config = matches!(e, edgelb::controller::RunError::Config(_));
                    ExitCode::from(if bad_config { 2 } else { 1 })
                }
            };
        }
        Command::Check { config } => edgelb::cli::check(&config),
        Command::Route { admin, client, vip, sport, proto, from_file } => {
            let proto = proto.map(|p| {
                if p == "udp" {
                    edgelb::config::Protocol::Udp
                } else {
                    edgelb::config::Protocol::Tcp
                }
            });
            let question = RouteQuestion { client, vip, sport, proto };
            edgelb::cli::route(&admin.target(), &question, from_file)
        }
        Command::Status { admin, json } => edgelb::cli::status(&admin.target(), json),
        Command::Drain { admin, backend, vip } => {
            edgelb::cli::answered(&admin.target(), &Request::Drain { backend, vip })
        }
        Command::Undrain { admin, backend, vip } => {
            edgelb::cli::answered(&admin.target(), &Request::Undrain { backend, vip })
        }
        Command::Reload { admin } => edgelb::cli::reload(&admin.target()),
        Command::Stop { admin, detach } => {
            edgelb::cli::stop::stop(&admin.target(), detach, &mut |line| eprintln!("{line}"))
                .ending()
        }
        Command::Decap { action, interface, mode, pin_dir, allow_source } => {
            edgelb::cli::decap(action == "attach", &interface, &mode, &pin_dir, &allow_source)
        }
    };
    finish(end)
}

/// Prints what a command says, in order, and gives its exit code.
fn finish(end: Ending) -> ExitCode {
    for said in end.said {
        match said {
            Said::Out(line) => println!("{line}"),
            Said::Err(line) => eprintln!("{line}"),
        }
    }
    ExitCode::from(end.code)
}
