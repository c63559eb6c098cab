//! The network-namespace testbed: a client, the balancer node and three backends on one bridge,
//! all addresses in 198.18.0.0/15 (IPv4 benchmarking range) and 2001:2::/48 (IPv6).
//!
//! ```text
//!   client (cl0)  198.18.0.1   2001:2::1        pool 198.18.4.0/22 (AnyIP sources)
//!   lb     (lb0)  198.18.0.2   2001:2::2        XDP balancer
//!                 L7 VIP 198.18.1.6 on lo (the proxy terminates it here)
//!   b1..b3 (be0)  198.18.0.11-13  2001:2::11-13 VIPs on lo, XDP decap on be0
//!                 all joined by br0 in the switch namespace
//! ```
//!
//! Backends hold the VIPs on `lo` and answer the client directly (DSR). XDP_TX on veth only
//! delivers when the peer runs an XDP program, so the switch-side peer of lb0 gets the pass
//! program. The client's veth has TX checksum offload off, or native XDP would see partial
//! checksums. Everything is torn down on drop (or by [`Testbed::down`] after a crash).

pub mod netns;
pub mod servers;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use aya::programs::links::PinnedLink;
use lb_common::programs;

use crate::{config::XdpAttachMode, dataplane::AuxPrograms};

/// Client address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Client IPv6 address.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// Extra client source addresses: 198.18.4.0/22, routed as local on the client (AnyIP).
pub const CLIENT_POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 4, 0), 22);
/// The `n`-th address of the client's AnyIP source pool (wraps within the /22).
pub fn pool_addr(n: u32) -> Ipv4Addr {
    let size = 1u32 << (32 - CLIENT_POOL.1);
    Ipv4Addr::from(u32::from(CLIENT_POOL.0) + n % size)
}

/// Balancer node address.
pub const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Balancer node IPv6 address.
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// Backend addresses.
pub const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(198, 18, 0, 11), Ipv4Addr::new(198, 18, 0, 12), Ipv4Addr::new(198, 18, 0, 13)];
/// Backend IPv6 addresses.
pub const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x13),
];
/// Backend MACs (also in docs/edgelb.example.toml).
pub const BACKEND_MACS: [[u8; 6]; 3] =
    [[2, 0xed, 0, 0, 0, 0x11], [2, 0xed, 0, 0, 0, 0x12], [2, 0xed, 0, 0, 0, 0x13]];
/// The IPv4 VIP the backends hold.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The L7 VIP: held by the balancer node itself (on its `lo`), where the proxy terminates it.
pub const VIP_L7: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 6);
/// The IPv6 VIP the backends hold.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
/// The balancer's interface inside its namespace.
pub const LB_IFACE: &str = "lb0";

/// Namespace names of one testbed.
#[derive(Clone, Debug)]
pub struct Names {
    /// Switch (bridge) namespace.
    pub sw: String,
    /// Client namespace.
    pub client: String,
    /// Balancer namespace.
    pub lb: String,
    /// Backend namespaces.
    pub backends: [String; 3],
}

impl Names {
    /// Names for testbed `prefix`.
    pub fn new(prefix: &str) -> Names {
        Names {
            sw: format!("{prefix}-sw"),
            client: format!("{prefix}-client"),
            lb: format!("{prefix}-lb"),
            backends: [1, 2, 3].map(|i| format!("{prefix}-b{i}")),
        }
    }

    fn all(&self) -> Vec<&str> {
        let mut v = vec![self.sw.as_str(), self.client.as_str(), self.lb.as_str()];
        v.extend(self.backends.iter().map(String::as_str));
        v
    }
}

/// A running testbed. Dropping it tears everything down.
pub struct Testbed {
    /// Namespace names.
    pub names: Names,
    prefix: String,
    _aux: Option<AuxPrograms>,
}

/// Gives `child`, asked to stop, `grace` to exit, then kills it; reaps it either way (so its PID
/// is not signalled after it could be reused). For the guards of tests and `xtask run`.
pub fn reap_within(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> io::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Adds `cidr` to `dev` in namespace `ns` (IPv6 without duplicate-address detection).
fn add_addr(ns: &str, cidr: &str, dev: &str) -> io::Result<()> {
    if cidr.contains(':') {
        sh(&["ip", "-n", ns, "-6", "addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Where the testbed pins XDP links so they outlive the process that made them.
fn pin_dir(prefix: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("edgelb-testbed-{prefix}"))
}

impl Testbed {
    /// Builds the topology for `prefix` (after removing any leftover with the same prefix).
    ///
    /// With `persist`, the helper XDP programs' links are pinned, so the testbed survives this
    /// process (`cargo xtask testbed up`); otherwise they live as long as the returned value.
    pub fn up(prefix: &str, persist: bool) -> io::Result<Testbed> {
        Testbed::down(prefix);
        let names = Names::new(prefix);
        let mut tb = Testbed { names: names.clone(), prefix: prefix.to_owned(), _aux: None };
        for ns in names.all() {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            for (k, v) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ] {
                sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", &format!("{k}={v}")])?;
            }
        }
        let sw = names.sw.as_str();
        sh(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", sw, "link", "set", "br0", "up"])?;
        // (namespace, interface, switch-side peer, MAC, IPv4, IPv6)
        type Host<'a> = (&'a str, &'a str, &'a str, [u8; 6], String, String);
        let mut hosts: Vec<Host> = vec![
            (
                names.client.as_str(),
                "cl0",
                "s-cl",
                [2, 0xed, 0, 0, 0, 1],
                CLIENT.to_string(),
                CLIENT6.to_string(),
            ),
            (
                names.lb.as_str(),
                LB_IFACE,
                "s-lb",
                [2, 0xed, 0, 0, 0, 2],
                LB.to_string(),
                LB6.to_string(),
            ),
        ];
        for i in 0..3 {
            hosts.push((
                names.backends[i].as_str(),
                "be0",
                ["s-b1", "s-b2", "s-b3"][i],
                BACKEND_MACS[i],
                BACKENDS[i].to_string(),
                BACKENDS6[i].to_string(),
            ));
        }
        for (ns, ifname, peer, mac, v4, v6) in &hosts {
            sh(&[
                "ip", "-n", sw, "link", "add", peer, "type", "veth", "peer", "name", ifname,
                "netns", ns,
            ])?;
            sh(&["ip", "-n", sw, "link", "set", peer, "master", "br0", "up"])?;
            sh(&["ip", "-n", ns, "link", "set", ifname, "address", &mac_str(*mac), "up"])?;
            add_addr(ns, &format!("{v4}/24"), ifname)?;
            add_addr(ns, &format!("{v6}/64"), ifname)?;
        }
        let client = names.client.as_str();
        sh(&["ip", "-n", client, "route", "add", "198.18.1.0/24", "via", &LB.to_string()])?;
        sh(&[
            "ip",
            "-n",
            client,
            "-6",
            "route",
            "add",
            "2001:2:0:1::/64",
            "via",
            &LB6.to_string(),
        ])?;
        let pool = format!("{}/{}", CLIENT_POOL.0, CLIENT_POOL.1);
        sh(&["ip", "-n", client, "route", "add", "local", &pool, "dev", "lo"])?;
        sh(&["ip", "netns", "exec", client, "ethtool", "-K", "cl0", "tx", "off"])?;
        add_addr(&names.lb, &format!("{VIP_L7}/32"), "lo")?;
        sh(&["ip", "-n", &names.lb, "route", "add", &pool, "via", &CLIENT.to_string()])?;
        for ns in &names.backends {
            add_addr(ns, &format!("{VIP}/32"), "lo")?;
            add_addr(ns, &format!("{VIP6}/128"), "lo")?;
            sh(&["ip", "-n", ns, "route", "add", &pool, "via", &CLIENT.to_string()])?;
        }

        let mut aux = AuxPrograms::load().map_err(io::Error::other)?;
        // The backends take tunnels only from the balancer's sources (the testbed config's), as
        // a backend should be set up (`edgelb decap attach --allow-source`).
        let example =
            crate::config::Config::parse(crate::config::EXAMPLE, "edgelb.example.toml".as_ref())
                .map_err(io::Error::other)?;
        let mut sources = Vec::new();
        if let Some((a, len)) = example.node.encap_source_v4 {
            sources.push((IpAddr::V4(a), len));
        }
        if let Some(a) = example.node.encap_source_v6 {
            sources.push((IpAddr::V6(a), 96));
        }
        aux.allow_decap_sources(&sources).map_err(io::Error::other)?;
        let dir = pin_dir(prefix);
        if persist {
            crate::dataplane::ensure_bpffs().map_err(io::Error::other)?;
            std::fs::create_dir_all(&dir)?;
        }
        let pin = |file: &str| persist.then(|| dir.join(file));
        let mut attach =
            |ns: &str, prog: &'static str, iface: &str, file: &str| -> io::Result<()> {
                let pin = pin(file);
                netns::in_netns(ns, || {
                    aux.attach(prog, iface, XdpAttachMode::Native, pin.as_deref())
                })?
                .map(|_| ())
                .map_err(io::Error::other)
            };
        attach(sw, programs::PASS, "s-lb", "pass-s-lb")?;
        for (i, ns) in names.backends.iter().enumerate() {
            attach(ns, programs::DECAP, "be0", &format!("decap-b{}", i + 1))?;
        }
        tb._aux = Some(aux);
        Ok(tb)
    }

    /// Processes (PID, command name) running in a namespace of testbed `prefix`: a testbed
    /// still in use (an edgelb a `cargo xtask run` started in its balancer namespace), which
    /// [`Testbed::up`] would tear down under it. Empty when there is no such testbed, or only a
    /// leftover no process uses (or one `cargo xtask testbed up` made, which keeps none).
    pub fn processes_inside(prefix: &str) -> Vec<(u32, String)> {
        use std::os::unix::fs::MetadataExt;
        let names = Names::new(prefix);
        let spaces: Vec<(u64, u64)> = names
            .all()
            .iter()
            .filter_map(|ns| std::fs::metadata(netns::netns_path(ns)).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        if spaces.is_empty() {
            return Vec::new();
        }
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut inside: Vec<(u32, String)> = procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != std::process::id())
            // Every thread: a run's backend servers are threads that entered the backends'
            // namespaces, which the process's own (its main thread's) link does not show.
            .filter(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
                    tasks.flatten().any(|t| {
                        std::fs::metadata(t.path().join("ns/net"))
                            .is_ok_and(|m| spaces.contains(&(m.dev(), m.ino())))
                    })
                })
            })
            .map(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                (pid, comm.trim().to_owned())
            })
            .collect();
        inside.sort();
        inside
    }

    /// Removes every namespace and pin of testbed `prefix`. Idempotent; errors are ignored
    /// because a half-built testbed must still be torn down as far as possible.
    pub fn down(prefix: &str) {
        let names = Names::new(prefix);
        for ns in names.all() {
            if netns::netns_path(ns).exists() {
                let _ = sh(&["ip", "netns", "del", ns]);
            }
        }
        let dir = pin_dir(prefix);
        if dir.exists() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if let Ok(link) = PinnedLink::from_pin(e.path()) {
                        let _ = link.unpin();
                    } else {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }

    /// The prefix this testbed was built with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Starts the backend servers (HTTP on port 80, UDP on 53, on both VIPs) in every backend
    /// namespace; backend i answers `backend-{i+1}`.
    pub fn start_servers(&self) -> io::Result<Vec<servers::Servers>> {
        let mut all = Vec::new();
        for (i, ns) in self.names.backends.iter().enumerate() {
            let name = format!("backend-{}", i + 1);
            all.push(servers::spawn(
                ns,
                &name,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 80),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 53),
            )?);
        }
        Ok(all)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        Testbed::down(&self.prefix);
    }
}
