//! The `edgelb` command line: a thin layer over the `edgelb` library.
use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use edgelb::config::Config;

/// edgelb: XDP edge load balancer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config, fill the maps, attach XDP and balance until SIGINT/SIGTERM (SIGHUP
    /// reloads the config).
    Run {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 if valid, 2 with file:line:column and the problem if not.
    Check {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the backend a new flow from CLIENT to VIP gets (the hash and ring the kernel uses).
    Route {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Client address.
        client: IpAddr,
        /// VIP name, address, or address:port.
        vip: String,
        /// Client source port (only used by 5tuple VIPs).
        #[arg(long, default_value_t = 0)]
        sport: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Run { config } => match edgelb::controller::run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edgelb: {}", error_chain(&e));
                ExitCode::from(1)
            }
        },
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                let backends: usize = cfg.vips.iter().map(|v| v.backends.len()).sum();
                println!(
                    "{}: ok ({} VIPs, {} backend entries)",
                    config.display(),
                    cfg.vips.len(),
                    backends
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Route { config, client, vip, sport } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let Some(v) = cfg.find_vip(&vip) else {
                eprintln!("edgelb: no VIP `{vip}` in {}", config.display());
                return ExitCode::from(2);
            };
            match edgelb::dataplane::route(v, client, sport) {
                Some(b) => {
                    println!("{}", b.address);
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("edgelb: VIP {v} has no backend with weight (or is L7)");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
