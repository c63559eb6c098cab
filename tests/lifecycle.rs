//! Health checks, drain, reload and hitless restart, with the real `edgelb` binary running on the
//! balancer node of a namespace testbed and real backends that die and come back.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use edgelb::{
    admin::Status,
    config::{self, Config},
    dataplane::route,
    testbed::{self, Testbed, netns, servers},
};

const TIMEOUT: Duration = Duration::from_secs(1);
/// Health-check settings of the test config.
const INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
const RISE: u32 = 2;
/// Flows per CPU the test beds size their connection tables to (`node.conntrack_flows_per_cpu`).
const CT_FLOWS: u64 = 8192;

/// The testbed config with fast health checks, an echo VIP on port 7 and per-test pin dir and
/// admin socket. `echo_backends` picks which backends (1-based) the echo VIP lists.
fn config_text(tag: &str, echo_backends: &[usize]) -> String {
    let mac = |i: usize| format!("02:ed:00:00:00:{:02x}", 0x10 + i);
    let backends = |list: &[usize]| {
        list.iter()
            .map(|&i| format!("{{ address = \"198.18.0.{}\", mac = \"{}\" }}", 10 + i, mac(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"[node]
interfaces = ["lb0"]
encap_source_v4 = "198.19.0.0/16"
pin_dir = "/sys/fs/bpf/edgelb-t-{tag}"
admin_socket = "/run/edgelb/t-{tag}.sock"
conntrack_flows_per_cpu = {CT_FLOWS}

[[vip]]
name = "web"
address = "198.18.1.1"
port = 80
backends = [{}]
[vip.health]
kind = "http"
interval_ms = {}
timeout_ms = 150
rise = {RISE}
fall = {FALL}

[[vip]]
name = "echo"
address = "198.18.1.1"
port = 7
backends = [{}]

[[vip]]
name = "dns"
address = "198.18.1.1"
port = 53
protocol = "udp"
backends = [{}]

[[vip]]
name = "web7"
address = "198.18.1.6"
port = 80
forwarding = "l7"
backends = [{}]
[vip.l7]
algorithm = "round_robin"
[vip.health]
kind = "http"
interval_ms = {}
timeout_ms = 150
rise = {RISE}
fall = {FALL}
"#,
        backends(&[1, 2, 3]),
        INTERVAL.as_millis(),
        backends(echo_backends),
        backends(&[1, 2, 3]),
        (1..=3)
            .map(|i| format!("{{ address = \"198.18.0.{}\", port = 80 }}", 10 + i))
            .collect::<Vec<_>>()
            .join(", "),
        INTERVAL.as_millis()
    )
}

/// `edgelb run --takeover --config <config>` in namespace `ns`.
fn takeover_command(ns: &str, config: &PathBuf) -> Command {
    run_command(ns, config, &["--takeover"])
}

/// `edgelb run` with `extra` arguments and `config`, in namespace `ns`.
fn run_command(ns: &str, config: &PathBuf, extra: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns::netns_path(ns).display()))
        .arg(env!("CARGO_BIN_EXE_edgelb"))
        .arg("run")
        .args(extra)
        .arg("--config")
        .arg(config);
    c
}

/// Runs `cmd` (`what`, for messages) to its end, at most `limit`, and returns its output.
fn output_within(mut cmd: Command, what: &'static str, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    Guarded::new(child, what).wait_with_output(limit)
}

/// A spawned process that cannot outlive its test (`Child` neither kills nor waits on drop).
/// Dropped while it still runs (a failed assertion, a test done with it), it gets SIGTERM by its
/// own PID, then SIGKILL if it has not exited within 5 s, and is reaped. Its waits are bounded:
/// libtest has no per-test timeout, so a process that never exits must fail the test, not hang
/// the suite.
struct Guarded {
    child: Child,
    /// What it is, for messages ("edgelb --takeover").
    what: &'static str,
}

impl Guarded {
    fn new(child: Child, what: &'static str) -> Guarded {
        Guarded { child, what }
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited (it is then reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap_or_else(|e| panic!("waiting on {}: {e}", self.what))
    }

    /// Sends `sig` to it by its PID, unless it has been reaped (its PID could then be another's).
    fn signal(&mut self, sig: libc::c_int) {
        if self.exited().is_none() {
            // SAFETY: kill(2) with a PID and a signal number touches no memory of ours. The
            // process is not reaped before the next `try_wait`, so the PID is still its own.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Waits at most `limit` for it to exit; panics naming it if it has not (the guard then
    /// stops it).
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} (PID {}) did not exit within {limit:?}",
                self.what,
                self.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Guarded::wait`], with its piped stdout and stderr read meanwhile (on threads, so a
    /// full pipe cannot hold it up).
    fn wait_with_output(mut self, limit: Duration) -> Output {
        fn drain<R: std::io::Read + Send + 'static>(
            pipe: Option<R>,
        ) -> std::sync::mpsc::Receiver<Vec<u8>> {
            let (tx, rx) = std::sync::mpsc::channel();
            if let Some(mut pipe) = pipe {
                std::thread::spawn(move || {
                    let mut bytes = Vec::new();
                    let _ = pipe.read_to_end(&mut bytes);
                    let _ = tx.send(bytes);
                });
            }
            rx
        }
        let (stdout, stderr) = (drain(self.child.stdout.take()), drain(self.child.stderr.take()));
        let status = self.wait(limit);
        // Exited: its pipes end now (unless something it started still holds them).
        let deadline = Instant::now() + Duration::from_secs(5);
        let read = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_default()
        };
        Output { status, stdout: read(stdout), stderr: read(stderr) }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        eprintln!("stopping {} (PID {}), still running", self.what, self.id());
        // SAFETY: as in `signal`: not reaped (the `try_wait` above found it running).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        testbed::reap_within(&mut self.child, Duration::from_secs(5));
    }
}

/// A running `edgelb run` in the balancer namespace.
struct Edgelb {
    child: Option<Guarded>,
    config: PathBuf,
    ns: String,
    log: PathBuf,
}

impl Edgelb {
    fn start(ns: &str, config: &PathBuf, log: &PathBuf) -> Edgelb {
        Edgelb::start_with(ns, config, log, None)
    }

    /// Starts edgelb, with `listener` passed as systemd's socket activation does: as descriptor
    /// 3, with LISTEN_FDS=1 and LISTEN_PID naming the edgelb process.
    fn start_with(ns: &str, config: &PathBuf, log: &PathBuf, listener: Option<&OwnedFd>) -> Edgelb {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let netns = format!("--net={}", netns::netns_path(ns).display());
        let mut cmd = match listener {
            None => {
                let mut c = Command::new("nsenter");
                c.arg(netns).arg(env!("CARGO_BIN_EXE_edgelb")).args(["run", "--config"]);
                // The open-file limit systemd gives a service by default (soft 1024), which
                // edgelb raises to the hard limit.
                // SAFETY: between fork and exec only getrlimit and setrlimit run, both
                // async-signal-safe, on a struct on the child's stack.
                unsafe {
                    c.pre_exec(|| {
                        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                        lim.rlim_cur = lim.rlim_cur.min(1024);
                        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                        Ok(())
                    });
                }
                c
            }
            Some(fd) => {
                // The shell's PID is edgelb's: nsenter and then edgelb replace it by exec.
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec nsenter "$1" "$2" run --config "$3""#)
                    .args(["sh", &netns, env!("CARGO_BIN_EXE_edgelb")]);
                let raw = fd.as_raw_fd();
                // SAFETY: between fork and exec only dup2 and fcntl run, both async-signal-safe;
                // `raw` stays open in the parent until spawn returns.
                unsafe {
                    c.pre_exec(move || {
                        let rc = if raw == 3 {
                            libc::fcntl(3, libc::F_SETFD, 0)
                        } else {
                            libc::dup2(raw, 3)
                        };
                        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
                    });
                }
                c
            }
        };
        Edgelb::spawned(cmd.arg(config).stderr(out), ns, config, log)
    }

    /// Starts edgelb with only the capabilities contrib/edgelb.service gives it ([`unit_caps`]):
    /// as root, but without CAP_SYS_ADMIN, as the unit runs it.
    fn start_under_unit_caps(ns: &str, config: &PathBuf, log: &PathBuf) -> Edgelb {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let caps = unit_caps();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", netns::netns_path(ns).display()))
            .arg("setpriv")
            .arg(format!("--bounding-set={caps}"))
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(env!("CARGO_BIN_EXE_edgelb"))
            .args(["run", "--config"])
            .arg(config)
            .stderr(out);
        Edgelb::spawned(&mut cmd, ns, config, log)
    }

    /// Spawns `cmd` (an `edgelb run`) and returns once it answers on its admin socket.
    fn spawned(cmd: &mut Command, ns: &str, config: &Path, log: &Path) -> Edgelb {
        let child = Guarded::new(cmd.spawn().expect("start edgelb"), "edgelb");
        let mut e = Edgelb {
            child: Some(child),
            config: config.to_owned(),
            ns: ns.to_owned(),
            log: log.to_owned(),
        };
        e.wait_answering();
        e
    }

    /// Waits until this edgelb answers on its admin socket (panics if it exits first).
    fn wait_answering(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["status", "--json"]).status.code() != Some(0) {
            if let Some(st) = self.child.as_mut().unwrap().exited() {
                panic!("edgelb exited: {st}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "edgelb never answered on its admin socket");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `edgelb run --takeover` with `config` in `ns`, its log appended to `log`; does not
    /// wait for it.
    fn spawn_takeover(ns: &str, config: &PathBuf, log: &PathBuf) -> Edgelb {
        Edgelb::spawn_takeover_with(ns, config, log, &[])
    }

    /// [`Edgelb::spawn_takeover`] with `env` set for it (a test hook, `EDGELB_TEST_PAUSE`).
    fn spawn_takeover_with(
        ns: &str,
        config: &PathBuf,
        log: &PathBuf,
        env: &[(&str, &str)],
    ) -> Edgelb {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = takeover_command(ns, config)
            .envs(env.iter().copied())
            .stderr(out)
            .spawn()
            .expect("start edgelb --takeover");
        let child = Guarded::new(child, "edgelb --takeover");
        Edgelb { child: Some(child), config: config.clone(), ns: ns.to_owned(), log: log.clone() }
    }

    /// Starts `edgelb run --takeover` beside this one (same config, namespace and log) and
    /// returns it once this one has handed over and exited, and the new one answers.
    fn take_over(self) -> Edgelb {
        let new = Edgelb::spawn_takeover(&self.ns, &self.config, &self.log);
        self.handed_to(new)
    }

    /// Waits until this edgelb has handed over to `new` (an `edgelb run --takeover`) and exited,
    /// and `new` answers; returns `new`.
    fn handed_to(mut self, mut new: Edgelb) -> Edgelb {
        // The old process exits by itself once the new one serves and its requests are done.
        // (Guarded: if it does not, the failed assertion stops it.)
        let mut old = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = old.exited() {
                break st;
            }
            if let Some(st) = new.child.as_mut().unwrap().exited() {
                panic!("edgelb --takeover exited: {st}; log:\n{}", new.log());
            }
            assert!(Instant::now() < deadline, "the old edgelb never exited; log:\n{}", new.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(st.success(), "old edgelb exit status {st}; log:\n{}", new.log());
        assert!(new.cli(&["status", "--json"]).status.success(), "the new edgelb answers");
        new
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_edgelb"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run edgelb CLI")
    }

    fn status(&self) -> Status {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn healthy(&self, vip: &str, backend: &str) -> bool {
        let st = self.status();
        let v = st.vips.iter().find(|v| v.name == vip).expect("vip in status");
        v.backends.iter().find(|b| b.address.to_string() == backend).expect("backend").healthy
    }

    /// SIGTERM by PID: the controller exits and leaves the data plane running.
    fn terminate(mut self) {
        let mut child = self.child.take().unwrap();
        child.signal(libc::SIGTERM);
        let st = child.wait(Duration::from_secs(30));
        assert!(st.success(), "edgelb exit status {st}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Edgelb {
    fn drop(&mut self) {
        // A running controller: full teardown through the admin socket, then make sure the
        // process is gone: if `stop` is refused (no controller answers on the socket) or the
        // process has not exited within 5 s, its guard stops it by PID. (After `terminate`
        // there is none, and the pins stay for the next.)
        if let Some(mut c) = self.child.take()
            && self.cli(&["stop"]).status.success()
        {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !matches!(c.child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Everything one test needs; torn down in reverse order on drop.
struct Bed {
    edgelb: Option<Edgelb>,
    servers: Vec<Option<servers::Servers>>,
    tb: Testbed,
    cfg_path: PathBuf,
    tag: String,
}

impl Bed {
    fn up(name: &str, echo_backends: &[usize]) -> Option<Bed> {
        if !netns::require_privileged(name) {
            return None;
        }
        let tag = format!("{}-{name}", std::process::id());
        let tb = Testbed::up(&format!("elbl{}", std::process::id()), false).expect("testbed");
        let servers = tb.start_servers().expect("servers").into_iter().map(Some).collect();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let cfg_path = dir.join(format!("lifecycle-{tag}.toml"));
        std::fs::write(&cfg_path, config_text(&tag, echo_backends)).unwrap();
        let log = dir.join(format!("lifecycle-{tag}.log"));
        let _ = std::fs::remove_file(&log);
        let edgelb = Edgelb::start(&tb.names.lb, &cfg_path, &log);
        let bed = Bed { edgelb: Some(edgelb), servers, tb, cfg_path, tag };
        bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
        Some(bed)
    }

    fn e(&self) -> &Edgelb {
        self.edgelb.as_ref().unwrap()
    }

    fn cfg(&self) -> Config {
        Config::load(&self.cfg_path).unwrap()
    }

    /// Waits until HTTP to `vip` from the client namespace answers.
    fn wait_for(&self, vip: SocketAddr) {
        netns::in_netns(&self.tb.names.client, || {
            let start = Instant::now();
            while servers::http_get(None, vip, TIMEOUT).is_err() {
                assert!(start.elapsed() < Duration::from_secs(10), "{vip} never answered");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .unwrap();
    }

    fn kill_backend(&mut self, i: usize) {
        self.servers[i - 1] = None;
    }

    fn revive_backend(&mut self, i: usize) {
        let ns = &self.tb.names.backends[i - 1];
        let any = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
        self.servers[i - 1] = Some(
            servers::spawn(
                ns,
                &format!("backend-{i}"),
                SocketAddr::new(any, 80),
                SocketAddr::new(any, 53),
            )
            .expect("restart servers"),
        );
    }

    /// Runs HTTP requests from rotating client addresses on a background thread until stopped
    /// (at most `max` long); returns the log of (time, client, result).
    fn load(&self, max: Duration) -> Load {
        self.load_to(SocketAddr::new(IpAddr::V4(testbed::VIP), 80), TIMEOUT, max)
    }

    /// Like `load`, to `vip`, each request given `timeout`.
    fn load_to(&self, vip: SocketAddr, timeout: Duration, max: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = self.tb.names.client.clone();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            netns::enter(&ns).expect("client netns");
            let mut log = Vec::new();
            let start = Instant::now();
            let mut n = 0u32;
            while !flag.load(Ordering::Relaxed) && start.elapsed() < max {
                let src = IpAddr::V4(testbed::pool_addr(n % 300));
                let r = servers::http_get(Some(SocketAddr::new(src, 0)), vip, timeout);
                log.push((Instant::now(), src, r.map_err(|e| e.to_string())));
                n += 1;
            }
            log
        });
        Load { stop, handle }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.edgelb = None;
        let dir = format!("/sys/fs/bpf/edgelb-t-{}", self.tag);
        let _ = edgelb::dataplane::Dataplane::teardown(dir.as_ref());
        let _ = std::fs::remove_file(format!("/run/edgelb/t-{}.sock", self.tag));
        let _ = std::fs::remove_file(&self.cfg_path);
    }
}

/// One request of a load run: when it ended, from which client, and the backend or the error.
type Sample = (Instant, IpAddr, Result<String, String>);

struct Load {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Load {
    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn backend_name(cfg: &Config, vip: &str, client: IpAddr) -> String {
    let v = cfg.find_vip(vip, None).unwrap();
    let addr = route(v, client, 0).unwrap().address;
    let i = v.backends.iter().position(|b| b.address == addr).unwrap();
    format!("backend-{}", i + 1)
}

/// Active health checks take a dead backend out of an XDP VIP within `interval * (fall + 1)`
/// (checked with 2 s of slack for a slow machine, the times printed; speed is the benchmarks'):
/// only its own clients fail meanwhile, then they are served by the others and XDP sends it
/// nothing more; it comes back after `rise` good probes, and with every backend down the VIP
/// fails open over the whole pool.
#[test]
fn dead_backend_leaves_the_ring_and_returns() {
    let Some(mut bed) = Bed::up("failover", &[1, 2, 3]) else { return };
    let cfg = bed.cfg();
    let load = bed.load(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    bed.kill_backend(2);
    let bound = INTERVAL * (FALL + 1);
    // How late past a bound this test lets a slow machine be (each status poll starts a
    // process); how fast failover is belongs to the benchmarks. The times are printed.
    let slack = Duration::from_secs(2);
    // `edgelb status` shows the change once the backend is declared dead.
    while bed.e().healthy("web", "198.18.0.12") {
        assert!(
            killed_at.elapsed() < bound + INTERVAL + slack,
            "status never showed DOWN ({:?} after the kill)",
            killed_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let down_at = Instant::now();
    eprintln!(
        "status shows backend-2 DOWN {} ms after the kill (bound interval*fall + interval = {} ms)",
        (down_at - killed_at).as_millis(),
        bound.as_millis()
    );
    // From the failover bound on (or once status shows it down, if that came later: the ring is
    // rewritten as the verdict changes), XDP sends backend-2 nothing more: its packet counter
    // stands still while its clients go on being served (by the others, counted below).
    let failed_over = (killed_at + bound).max(down_at) + Duration::from_millis(300);
    std::thread::sleep(failed_over.saturating_duration_since(Instant::now()));
    let dead = "vip=\"web\",backend=\"198.18.0.12\"";
    let sent_to_dead = || metric(&scrape(&bed), "edgelb_backend_packets_total", dead);
    let (watched_from, sent_before) = (Instant::now(), sent_to_dead());
    assert!(sent_before > 0.0, "backend-2 was sent packets before the kill (its series exists)");
    // One backend down is no fail-open.
    let text = scrape(&bed);
    assert!(text.contains("\nedgelb_vip_fail_open{vip=\"web\"} 0\n"), "{text}");
    std::thread::sleep(bound + Duration::from_millis(1500));
    let sent_after = sent_to_dead();
    let watched_to = Instant::now();
    let log = load.finish();

    let mut last_failure = None;
    let mut after = HashMap::<String, u32>::new();
    // Requests of backend-2's clients answered while its counter was watched.
    let mut rehomed = 0u32;
    for (t, client, r) in &log {
        let home = backend_name(&cfg, "web", *client);
        match r {
            Err(e) => {
                assert_eq!(home, "backend-2", "a client of a live backend failed: {client}: {e}");
                assert!(*t > killed_at, "failure before the kill: {e}");
                last_failure = Some(*t);
            }
            Ok(b) if *t > failed_over => {
                *after.entry(b.clone()).or_default() += 1;
                if home == "backend-2" && *t > watched_from && *t < watched_to {
                    rehomed += 1;
                }
            }
            Ok(_) => {}
        }
    }
    let failover = last_failure.map_or(Duration::ZERO, |t| t - killed_at);
    eprintln!(
        "failover: last failed connection {} ms after the kill (bound interval*fall + interval = {} ms); {} requests, after failover: {after:?}",
        failover.as_millis(),
        bound.as_millis(),
        log.len()
    );
    assert!(failover <= bound + slack, "failover took {failover:?}");
    eprintln!("backend-2's clients served while its counter was watched: {rehomed}");
    assert!(rehomed > 10, "backend-2's clients were served after failover ({rehomed})");
    assert_eq!(sent_after, sent_before, "XDP sent packets to the dead backend after failover");
    assert!(after.contains_key("backend-1") && after.contains_key("backend-3"));
    assert!(!bed.e().healthy("web", "198.18.0.12"));
    assert!(bed.e().log().contains("backend DOWN"), "state change logged");

    // Back: healthy again after `rise` good probes, and its clients return to it.
    let revived = Instant::now();
    bed.revive_backend(2);
    while !bed.e().healthy("web", "198.18.0.12") {
        assert!(revived.elapsed() < INTERVAL * (RISE + 2) + slack, "backend-2 never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("recovery: healthy {} ms after the restart", revived.elapsed().as_millis());
    let client = (0..300)
        .map(|n| IpAddr::V4(testbed::pool_addr(n)))
        .find(|c| backend_name(&cfg, "web", *c) == "backend-2")
        .unwrap();
    let got = netns::in_netns(&bed.tb.names.client, || {
        servers::http_get(
            Some(SocketAddr::new(client, 0)),
            SocketAddr::new(IpAddr::V4(testbed::VIP), 80),
            TIMEOUT,
        )
    })
    .unwrap()
    .unwrap();
    assert_eq!(got, "backend-2");

    // Every backend down: the VIP serves all of them anyway (fail open) and says so.
    for i in 1..=3 {
        bed.kill_backend(i);
    }
    let all_down = Instant::now();
    loop {
        let st = bed.e().status();
        let web = st.vips.iter().find(|v| v.name == "web").unwrap();
        if web.fail_open {
            assert_eq!(metric(&scrape(&bed), "edgelb_vip_fail_open", "vip=\"web\""), 1.0);
            assert!(web.backends.iter().all(|b| !b.healthy));
            let share: f64 = web.backends.iter().map(|b| b.ring_share).sum();
            assert!((share - 1.0).abs() < 1e-9, "the ring stays populated: {share}");
            // The whole pool, not the backend that happened to fail last.
            assert!(
                web.backends.iter().all(|b| b.ring_share > 0.2),
                "every backend serves: {:?}",
                web.backends.iter().map(|b| (b.address, b.ring_share)).collect::<Vec<_>>()
            );
            break;
        }
        assert!(all_down.elapsed() < bound + slack, "fail-open never reported");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bed.e().log().contains("every backend is down"), "fail open is logged loudly");
}

/// Opens one long-lived echo connection to the VIP from each of `clients`.
fn echo_conns(bed: &Bed, clients: &[IpAddr]) -> Vec<servers::EchoConn> {
    netns::in_netns(&bed.tb.names.client, || {
        clients
            .iter()
            .map(|c| {
                servers::EchoConn::connect(
                    SocketAddr::new(*c, 0),
                    IpAddr::V4(testbed::VIP),
                    TIMEOUT,
                )
                .expect("echo connection")
            })
            .collect()
    })
    .unwrap()
}

/// Sources whose echo flows the config sends to backend `want`.
fn clients_of(cfg: &Config, want: &str, n: usize) -> Vec<IpAddr> {
    (0..1000)
        .map(|i| IpAddr::V4(testbed::pool_addr(i)))
        .filter(|c| backend_name(cfg, "echo", *c) == want)
        .take(n)
        .collect()
}

#[test]
fn drained_backend_keeps_its_connections() {
    let Some(bed) = Bed::up("drain", &[1, 2, 3]) else { return };
    let cfg = bed.cfg();
    let clients = clients_of(&cfg, "backend-1", 10);
    let mut conns = echo_conns(&bed, &clients);
    for c in &mut conns {
        assert_eq!(c.backend().unwrap(), "backend-1");
    }
    let out = bed.e().cli(&["drain", "198.18.0.11"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The reply names the VIPs it drained the backend in.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("198.18.0.11 drained in ") && said.contains("echo"), "{said}");
    // The log names the VIPs drained in, not Rust's debug form (`vip=None`).
    let log = bed.e().log();
    let said = log.lines().find(|l| l.contains("drain: no new flows")).unwrap_or_default();
    assert!(said.contains("vip=\"every VIP\""), "{said}");
    // A VIP the config does not have is a bad argument (exit 2), as for `route`.
    let out = bed.e().cli(&["drain", "198.18.0.11", "--vip", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no VIP named `nosuch`"), "{said}");
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(
            c.ask(&format!("still there {i}")).unwrap(),
            format!("backend-1:still there {i}")
        );
    }
    let fresh =
        echo_conns(&bed, &clients).iter_mut().map(|c| c.backend().unwrap()).collect::<Vec<_>>();
    assert!(
        fresh.iter().all(|b| b != "backend-1"),
        "new flows avoid the drained backend: {fresh:?}"
    );
    let st = bed.e().status();
    let echo = st.vips.iter().find(|v| v.name == "echo").unwrap();
    assert!(echo.backends[0].drained && echo.backends[0].ring_share == 0.0);
    // An L7 VIP's backends show with their ports (one address may serve on several).
    let web7 = st.vips.iter().find(|v| v.name == "web7").unwrap();
    assert!(web7.backends.iter().all(|b| b.port == 80), "{:?}", web7.backends);
    let text = String::from_utf8_lossy(&bed.e().cli(&["status"]).stdout).into_owned();
    let web7 = text.split("\n\n").find(|s| s.contains("VIP web7 ")).expect("web7 in status");
    assert!(web7.contains("198.18.0.11:80 "), "{web7}");
    // Undrain: its clients come back for new flows.
    assert!(bed.e().cli(&["undrain", "198.18.0.11"]).status.success());
    // Again: nothing left to lift, and it says so.
    let out = bed.e().cli(&["undrain", "198.18.0.11"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("198.18.0.11 was not drained in "), "{said}");
    // Draining the last backend of a VIP that takes new flows is said plainly: they fail.
    for (b, last) in [("198.18.0.11", false), ("198.18.0.12", false), ("198.18.0.13", true)] {
        let out = bed.e().cli(&["drain", b, "--vip", "echo"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}");
        assert_eq!(said.contains("no backend left for new flows"), last, "{said}");
    }
    for b in ["198.18.0.11", "198.18.0.12", "198.18.0.13"] {
        assert!(bed.e().cli(&["undrain", b, "--vip", "echo"]).status.success());
    }
    let log = bed.e().log();
    for what in ["drain: no new flows", "undrain"] {
        let named = |l: &&str| l.contains(what) && l.contains("vip=\"echo\"");
        assert_eq!(log.lines().filter(named).count(), 3, "{what}:\n{log}");
    }
    let back = netns::in_netns(&bed.tb.names.client, || {
        servers::EchoConn::connect(
            SocketAddr::new(clients[0], 0),
            IpAddr::V4(testbed::VIP),
            TIMEOUT,
        )
        .unwrap()
        .backend()
        .unwrap()
    })
    .unwrap();
    assert_eq!(back, "backend-1");
}

/// `edgelb route` answers from the running controller: once a backend is drained, a client the
/// file's ring sends to it is named another backend, the one its new flow then reaches (the
/// file alone would still name the drained one). Without a controller on the socket it answers
/// from the file and says so.
#[test]
fn route_answers_from_the_running_controller() {
    let Some(bed) = Bed::up("route", &[1, 2, 3]) else { return };
    let cfg = bed.cfg();
    let clients = clients_of(&cfg, "backend-1", 6);
    assert_eq!(clients.len(), 6);
    let ask = |c: &IpAddr, extra: &[&str]| {
        let c = c.to_string();
        let mut args = vec!["route"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&c, "echo"]);
        let out = bed.e().cli(&args);
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let name_of = |addr: &str| {
        let i = cfg
            .find_vip("echo", None)
            .unwrap()
            .backends
            .iter()
            .position(|b| b.address.to_string() == addr);
        format!("backend-{}", i.expect("a backend of echo") + 1)
    };
    for c in &clients {
        let (code, out, err) = ask(c, &[]);
        assert_eq!((code, out.as_str()), (Some(0), "198.18.0.11"), "{c}: {err}");
        assert!(err.contains("answered by the running edgelb"), "{err}");
    }
    let out = bed.e().cli(&["drain", "198.18.0.11", "--vip", "echo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for c in &clients {
        let (code, live, err) = ask(c, &[]);
        assert_eq!(code, Some(0), "{c}: {err}");
        assert!(err.contains("answered by the running edgelb"), "{err}");
        assert_ne!(live, "198.18.0.11", "{c}: the drained backend named");
        // The file alone still names the drained one; the live answer is where the flow goes.
        let file = route(cfg.find_vip("echo", None).unwrap(), *c, 0).unwrap().address;
        assert_eq!(file.to_string(), "198.18.0.11");
        let went = echo_conns(&bed, &[*c])[0].backend().unwrap();
        assert_eq!(went, name_of(&live), "{c}: route said {live}");
    }
    // A question the running config cannot answer is refused as a bad one (exit 2).
    let out = bed.e().cli(&["route", "198.18.4.1", "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VIP named `nosuch`"));
    // Nobody on the socket: the file's answer, said to be one.
    let nobody =
        format!("{}/route-nobody-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let (code, out, err) = ask(&clients[0], &["--socket", &nobody]);
    assert_eq!((code, out.as_str()), (Some(0), "198.18.0.11"), "{err}");
    assert!(err.contains("computed from") && err.contains("no edgelb answers"), "{err}");
}

/// An HTTP server on `addr` inside namespace `ns` answering every request with `name`, until
/// dropped.
struct NamedServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NamedServer {
    fn start(ns: &str, name: &'static str, addr: SocketAddr) -> NamedServer {
        use std::io::{Read, Write};
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, ns) = (stop.clone(), ns.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&ns).expect("enter the namespace");
            let l = std::net::TcpListener::bind(addr).expect("bind a backend");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(TIMEOUT));
                        let _ = s.read(&mut [0u8; 1024]);
                        let body = format!("{name}\n");
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("backend bound");
        NamedServer { stop, thread: Some(thread) }
    }
}

impl Drop for NamedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A namespace of a test's own with only `lo` up, and the pins, admin socket and config its
/// edgelb leaves: all removed on drop (after the edgelb, dropped first by its owner).
struct LoBed {
    ns: String,
    tag: String,
    config: PathBuf,
}

impl LoBed {
    fn new(name: &str, vips: &str) -> LoBed {
        let pid = std::process::id();
        let (ns, tag) = (format!("elbl{pid}-{name}"), format!("{pid}-{name}"));
        testbed::sh(&["ip", "netns", "add", &ns]).expect("ip netns add");
        testbed::sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]).expect("lo up");
        let config =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{tag}.toml"));
        std::fs::write(&config, config_of(&tag, vips)).unwrap();
        LoBed { ns, tag, config }
    }
}

/// The `[node]` of a [`LoBed`] config (pins and admin socket by `tag`), then `vips`.
fn config_of(tag: &str, vips: &str) -> String {
    format!(
        "[node]\ninterfaces = [\"lo\"]\nencap_source_v4 = \"198.19.0.0/16\"\npin_dir = \"/sys/fs/bpf/edgelb-t-{tag}\"\nadmin_socket = \"/run/edgelb/t-{tag}.sock\"\nconntrack_flows_per_cpu = {CT_FLOWS}\n\n{vips}"
    )
}

impl Drop for LoBed {
    fn drop(&mut self) {
        let _ = testbed::sh(&["ip", "netns", "del", &self.ns]);
        let dir = format!("/sys/fs/bpf/edgelb-t-{}", self.tag);
        let _ = edgelb::dataplane::Dataplane::teardown(dir.as_ref());
        let _ = std::fs::remove_file(format!("/run/edgelb/t-{}.sock", self.tag));
        let _ = std::fs::remove_file(&self.config);
    }
}

/// An L7 pool listing one address on two ports: `edgelb drain 127.0.0.1:PORT_A` takes that
/// backend alone out (127.0.0.1:PORT_B serves every new request, and status shows only A
/// drained), `undrain` of it brings it back, and the address alone drains both ports.
#[test]
fn draining_an_l7_backend_by_address_and_port_leaves_its_other_port_serving() {
    if !netns::require_privileged("draining_an_l7_backend_by_address_and_port") {
        return;
    }
    let vip = SocketAddr::from(([127, 0, 0, 1], 8080));
    let (a, b) =
        (SocketAddr::from(([127, 0, 0, 1], 8081)), SocketAddr::from(([127, 0, 0, 1], 8082)));
    let bed = LoBed::new(
        "dport",
        &format!(
            "[[vip]]\nname = \"two\"\naddress = \"{}\"\nport = {}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}, {{ address = \"127.0.0.1\", port = {} }}]\n[vip.l7]\nalgorithm = \"round_robin\"\n[[vip.route]]\npath_prefix = \"/r/\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}, {{ address = \"127.0.0.1\", port = 8083 }}]\n\n[[vip]]\nname = \"zero\"\naddress = \"{}\"\nport = 8090\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {}, weight = 0 }}, {{ address = \"127.0.0.1\", port = {} }}]\n",
            vip.ip(),
            vip.port(),
            a.port(),
            b.port(),
            a.port(),
            vip.ip(),
            a.port(),
            b.port()
        ),
    );
    let _servers =
        [NamedServer::start(&bed.ns, "port-a", a), NamedServer::start(&bed.ns, "port-b", b)];
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}.log", bed.tag));
    let _ = std::fs::remove_file(&log);
    let e = Edgelb::start(&bed.ns, &bed.config, &log);
    let ask = |n: usize| -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        netns::in_netns(&bed.ns, || {
            for _ in 0..n {
                let got =
                    servers::http_get(None, vip, TIMEOUT).expect("a request through the proxy");
                *seen.entry(got).or_default() += 1;
            }
        })
        .unwrap();
        seen
    };
    let both = ask(10);
    assert_eq!(both.len(), 2, "round-robin over both ports: {both:?}");
    let run = |args: &[&str]| {
        let out = e.cli(args);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, out, err) = run(&["drain", &a.to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("127.0.0.1:8081 drained in two"), "{out}");
    // A drain reaches a VIP's own backends, not its route pools: the reply says the route
    // pool that lists A still sends it requests.
    assert!(out.contains("WARNING: it is also in a route pool of VIP `two`"), "{out}");
    let seen = ask(10);
    assert_eq!(seen.get("port-b"), Some(&10), "only port B serves once A is drained: {seen:?}");
    let st = e.status();
    let drained: Vec<(u16, bool)> =
        st.vips[0].backends.iter().map(|b| (b.port, b.drained)).collect();
    assert_eq!(drained, [(8081, true), (8082, false)]);
    // Undrained by address and port; then the address alone drains every port of it.
    let (code, out, err) = run(&["undrain", &a.to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("127.0.0.1:8081 undrained in two"), "{out}");
    assert_eq!(ask(10).len(), 2, "both ports serve again");
    let (code, _, err) = run(&["drain", "127.0.0.1", "--vip", "two"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(e.status().vips[0].backends.iter().all(|b| b.drained));
    // A port the pool does not list drains nothing, and says so: a bad argument (exit 2).
    let (code, _, err) = run(&["undrain", "127.0.0.1:9999"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("backend 127.0.0.1:9999 is not in any VIP"), "{err}");
    // One in a route pool only: refused, saying where it is and how such a pool is drained.
    let (code, _, err) = run(&["drain", "127.0.0.1:8083"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("it is in a route pool of VIP `two`: route pools are drained"), "{err}");
    // A backend the file gives `weight = 0` is drained by the file, as status shows: undrain
    // cannot lift that, and says so rather than "was not drained" (exit 1, refused).
    let (code, _, err) = run(&["undrain", &a.to_string(), "--vip", "zero"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("drained by `weight = 0` in the config file in zero"), "{err}");
    assert!(e.status().vips[1].backends[0].drained);
    drop(e);
}

/// `status` of an L7 VIP counts what its proxy does: XDP passes its traffic uncounted, so its
/// VIP line shows the requests its backends were sent (not packets, bytes and rates that XDP
/// never counts and that read 0 whatever the traffic), and `--json` has that sum too.
#[test]
fn status_of_an_l7_vip_counts_its_requests() {
    if !netns::require_privileged("status_of_an_l7_vip_counts_its_requests") {
        return;
    }
    let vip = SocketAddr::from(([127, 0, 0, 1], 8080));
    let (a, b) =
        (SocketAddr::from(([127, 0, 0, 1], 8081)), SocketAddr::from(([127, 0, 0, 1], 8082)));
    let bed = LoBed::new(
        "l7status",
        &format!(
            "[[vip]]\nname = \"app\"\naddress = \"{}\"\nport = {}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}, {{ address = \"127.0.0.1\", port = {} }}]\n[vip.l7]\nalgorithm = \"round_robin\"\n",
            vip.ip(),
            vip.port(),
            a.port(),
            b.port(),
        ),
    );
    let _servers =
        [NamedServer::start(&bed.ns, "port-a", a), NamedServer::start(&bed.ns, "port-b", b)];
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}.log", bed.tag));
    let _ = std::fs::remove_file(&log);
    let e = Edgelb::start(&bed.ns, &bed.config, &log);
    netns::in_netns(&bed.ns, || {
        for _ in 0..6 {
            servers::http_get(None, vip, TIMEOUT).expect("a request through the proxy");
        }
    })
    .unwrap();
    let out = e.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.starts_with("VIP app ")).expect("the VIP's line");
    assert!(line.ends_with("[l7]  requests 6"), "{line}\n{text}");
    assert!(!line.contains("packets") && !line.contains("pkt/s"), "XDP never counts it: {line}");
    for backend in [a, b] {
        let row = text.lines().find(|l| l.trim_start().starts_with(&backend.to_string()));
        let row = row.expect("a row per backend");
        // Its REQUESTS column (IN FLIGHT follows).
        let requests = row.split_whitespace().nth(4);
        assert_eq!(requests, Some("3"), "round robin, 3 each: {row}\n{text}");
    }
    let st = e.status();
    assert_eq!(st.vips[0].l7_requests, 6, "{:?}", st.vips[0]);
    // `route` has no flow to place on it: the running edgelb calls that a bad question (exit 2),
    // not a VIP without a backend (1).
    let out = e.cli(&["route", "127.0.0.1", "app"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("picks a backend per request") && err.contains("running config"), "{err}");
    drop(e);
}

/// `status --json` lists an L7 VIP's route pools, each with what it matches and its backends'
/// live state as the VIP's own show it: requests, in flight, and passive health. A route pool
/// passive health had taken out whole was not listed at all, so it looked healthy.
#[test]
fn status_lists_route_pools_with_their_live_state() {
    use std::io::{Read, Write};
    if !netns::require_privileged("status_lists_route_pools_with_their_live_state") {
        return;
    }
    let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let (vip, own, routed, dead) = (port(8080), port(8081), port(8084), port(8085));
    let bed = LoBed::new(
        "routestatus",
        &format!(
            "[[vip]]\nname = \"app\"\naddress = \"127.0.0.1\"\nport = {}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n[vip.l7]\nmax_fails = 1\nfail_timeout_ms = 600000\n[[vip.route]]\npath_prefix = \"/r/\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n[[vip.route]]\nhost = \"dead.example\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n",
            vip.port(),
            own.port(),
            routed.port(),
            dead.port(),
        ),
    );
    // Nothing listens on `dead`: its one request fails, which takes it out (max_fails = 1).
    let _servers =
        [NamedServer::start(&bed.ns, "own", own), NamedServer::start(&bed.ns, "routed", routed)];
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}.log", bed.tag));
    let _ = std::fs::remove_file(&log);
    let e = Edgelb::start(&bed.ns, &bed.config, &log);
    let answer = |host: &str, path: &str| {
        let mut s = std::net::TcpStream::connect_timeout(&vip, TIMEOUT).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    netns::in_netns(&bed.ns, || {
        for _ in 0..2 {
            let resp = answer("t", "/r/x");
            assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("routed\n"), "{resp:?}");
        }
        let resp = answer("dead.example", "/");
        assert!(resp.starts_with("HTTP/1.1 5"), "{resp:?}");
    })
    .unwrap();
    let st = e.status();
    let v = st.vips.iter().find(|v| v.name == "app").expect("the VIP");
    assert_eq!(v.backends.len(), 1, "{v:?}");
    assert!(!v.backends[0].passive_down, "{v:?}");
    assert_eq!(v.routes.len(), 2, "{v:?}");
    let (r, d) = (&v.routes[0], &v.routes[1]);
    assert_eq!((r.host.as_deref(), r.path_prefix.as_deref()), (None, Some("/r/")), "{r:?}");
    assert_eq!((d.host.as_deref(), d.path_prefix.as_deref()), (Some("dead.example"), None));
    let row = |b: &edgelb::admin::BackendStatus| {
        (b.port, b.healthy, b.passive_down, b.l7_requests, b.l7_in_flight)
    };
    assert_eq!(
        r.backends.iter().map(row).collect::<Vec<_>>(),
        [(routed.port(), true, false, 2, Some(0))]
    );
    let dead_row = d.backends.iter().map(row).collect::<Vec<_>>();
    assert_eq!(dead_row.len(), 1, "{d:?}");
    assert_eq!(
        (dead_row[0].0, dead_row[0].2, dead_row[0].4),
        (dead.port(), true, Some(0)),
        "{d:?}"
    );
    drop(e);
}

/// An HTTP server on `addr` inside namespace `ns` that holds every request it gets: it reads
/// the request head, says `name` on `seen`, and answers (200, body `name`, then closes) only
/// once `release` is set, so a request stays in flight on its backend as long as a test wants.
struct HeldServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeldServer {
    fn start(
        ns: &str,
        name: &'static str,
        addr: SocketAddr,
        release: &Arc<AtomicBool>,
        seen: &std::sync::mpsc::Sender<&'static str>,
    ) -> HeldServer {
        use std::io::{Read, Write};
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, ns, release, seen) =
            (stop.clone(), ns.to_owned(), release.clone(), seen.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netns::enter(&ns).expect("enter the namespace");
            let l = std::net::TcpListener::bind(addr).expect("bind a backend");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (flag, release, seen) = (flag.clone(), release.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(TIMEOUT));
                    let _ = s.read(&mut [0u8; 1024]);
                    let _ = seen.send(name);
                    while !release.load(Ordering::Relaxed) && !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let body = format!("{name}\n");
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("backend bound");
        HeldServer { stop, thread: Some(thread) }
    }
}

impl Drop for HeldServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sets its flag when dropped: a [`HeldServer`]'s `release`, so that a failed test does not
/// leave its held requests to stall the edgelb's stop for the whole drain timeout.
struct ReleaseOnDrop(Arc<AtomicBool>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One GET to `vip` from inside namespace `ns`, on a thread of its own that waits (up to 30 s)
/// for the answer however long its backend holds it; the thread returns the body.
fn held_get(ns: &str, vip: SocketAddr) -> std::thread::JoinHandle<std::io::Result<String>> {
    use std::io::{Read, Write};
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        netns::enter(&ns)?;
        let mut s = std::net::TcpStream::connect_timeout(&vip, TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: edgelb\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned())
    })
}

/// The requests (TCP mode: relays) the proxy has in flight on each L7 backend, what
/// least-connections and power-of-two choices balance on, show in
/// `edgelb_l7_backend_in_flight{vip,backend}` (route pools' backends too) and in `status`, text
/// and `--json`: 1 on the backend holding a slow request (or relay), 0 on the others, and 0 on
/// all once it is answered.
#[test]
fn in_flight_requests_show_per_backend_in_metrics_and_status() {
    if !netns::require_privileged("in_flight_requests_show_per_backend_in_metrics_and_status") {
        return;
    }
    let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let (vip, tcp_vip) = (port(8080), port(8090));
    let own = [("a", port(8081)), ("b", port(8082)), ("c", port(8083))];
    let (routed, relayed) = (port(8084), port(8091));
    let bed = LoBed::new(
        "inflight",
        &format!(
            "[[vip]]\nname = \"app\"\naddress = \"127.0.0.1\"\nport = {}\nforwarding = \"l7\"\nbackends = [{}]\n[vip.l7]\nalgorithm = \"least_conn\"\n[[vip.route]]\npath_prefix = \"/r/\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n\n[[vip]]\nname = \"raw\"\naddress = \"127.0.0.1\"\nport = {}\nforwarding = \"l7\"\nbackends = [{{ address = \"127.0.0.1\", port = {} }}]\n[vip.l7]\nmode = \"tcp\"\n",
            vip.port(),
            own.iter()
                .map(|(_, a)| format!("{{ address = \"127.0.0.1\", port = {} }}", a.port()))
                .collect::<Vec<_>>()
                .join(", "),
            routed.port(),
            tcp_vip.port(),
            relayed.port(),
        ),
    );
    let release = Arc::new(AtomicBool::new(false));
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let mut servers: Vec<_> = own
        .iter()
        .map(|&(name, addr)| HeldServer::start(&bed.ns, name, addr, &release, &seen_tx))
        .collect();
    servers.push(HeldServer::start(&bed.ns, "t", relayed, &release, &seen_tx));
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}.log", bed.tag));
    let _ = std::fs::remove_file(&log);
    let e = Edgelb::start(&bed.ns, &bed.config, &log);
    // Dropped before `e`, on a failure too.
    let _released = ReleaseOnDrop(release.clone());
    // Every L7 backend's count, route pool's and TCP mode's included, by (VIP, backend).
    let every: Vec<(&str, SocketAddr)> =
        own.iter().map(|&(_, a)| ("app", a)).chain([("app", routed), ("raw", relayed)]).collect();
    let gauge = |text: &str, vip: &str, b: SocketAddr| {
        let want = format!("edgelb_l7_backend_in_flight{{vip=\"{vip}\",backend=\"{b}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&want)).map(|v| v.trim().to_owned())
    };
    // `status`: the JSON field and the text column of each of the VIP's own backends (route
    // pools' are under `routes`: status_lists_route_pools_with_their_live_state).
    let status_counts = |vip: &str, b: SocketAddr| {
        let out = e.cli(&["status", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let v = j["vips"].as_array().unwrap().iter().find(|v| v["name"] == vip).unwrap().clone();
        let row = v["backends"].as_array().unwrap().iter().find(|r| r["port"] == b.port());
        let json = row.expect("the backend in --json")["l7_in_flight"].as_u64();
        let out = e.cli(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let head = text.lines().find(|l| l.trim_start().starts_with("BACKEND")).unwrap();
        assert!(head.trim_end().ends_with("REQUESTS IN FLIGHT"), "{text}");
        let row = text.lines().find(|l| l.trim_start().starts_with(&format!("{b} ")));
        let column = row.expect("the backend's row").split_whitespace().nth(5).map(str::to_owned);
        (json, column, text)
    };
    let idle = scrape_in(&bed.ns);
    for &(v, b) in &every {
        assert_eq!(gauge(&idle, v, b).as_deref(), Some("0"), "{v} {b}, idle:\n{idle}");
    }
    let client = held_get(&bed.ns, vip);
    let held = seen.recv_timeout(Duration::from_secs(10)).expect("the request reaches a backend");
    let held = own.iter().find(|(n, _)| *n == held).unwrap().1;
    let text = scrape_in(&bed.ns);
    for &(v, b) in &every {
        let want = if b == held { "1" } else { "0" };
        assert_eq!(gauge(&text, v, b).as_deref(), Some(want), "{v} {b}, {held} held:\n{text}");
    }
    for &(_, b) in &own {
        let want = u64::from(b == held);
        let (json, column, text) = status_counts("app", b);
        assert_eq!(json, Some(want), "{b}, {held} held");
        assert_eq!(column, Some(want.to_string()), "{b}, {held} held:\n{text}");
    }
    // A TCP-mode relay counts from its pick to its end.
    let relay = held_get(&bed.ns, tcp_vip);
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(10)),
        Ok("t"),
        "the relay reaches its backend"
    );
    let text = scrape_in(&bed.ns);
    assert_eq!(gauge(&text, "raw", relayed).as_deref(), Some("1"), "{text}");
    assert_eq!(status_counts("raw", relayed).0, Some(1));
    release.store(true, Ordering::Relaxed);
    let name = own.iter().find(|(_, a)| *a == held).unwrap().0;
    assert_eq!(client.join().unwrap().expect("the held request's answer"), name);
    assert_eq!(relay.join().unwrap().expect("the relayed answer"), "t");
    // The count drops once the proxy is through with the response (just after the client has
    // it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape_in(&bed.ns);
        if every.iter().all(|&(v, b)| gauge(&text, v, b).as_deref() == Some("0")) {
            break;
        }
        assert!(Instant::now() < deadline, "still counted in flight:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for &(v, b) in &[("app", held), ("raw", relayed)] {
        let (json, column, text) = status_counts(v, b);
        assert_eq!((json, column.as_deref()), (Some(0), Some("0")), "{v} {b}:\n{text}");
    }
    drop(e);
    drop(servers);
}

/// `edgelb run -c FILE` with a path relative to its working directory names the file by its
/// absolute path: `status` says which file runs, and a reload naming another file is refused
/// with the file to edit, both for an operator in another directory.
#[test]
fn a_config_named_relative_is_shown_by_its_absolute_path() {
    if !netns::require_privileged("a_config_named_relative_is_shown_by_its_absolute_path") {
        return;
    }
    let bed = LoBed::new(
        "relcfg",
        "[[vip]]\nname = \"app\"\naddress = \"127.0.0.1\"\nport = 8080\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.1\", port = 8081 }]\n[vip.l7]\n",
    );
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}.log", bed.tag));
    let _ = std::fs::remove_file(&log);
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let (dir, name) = (bed.config.parent().unwrap(), bed.config.file_name().unwrap());
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns::netns_path(&bed.ns).display()))
        .arg(env!("CARGO_BIN_EXE_edgelb"))
        .args(["run", "--config"])
        .arg(name)
        .current_dir(dir)
        .stderr(out);
    // The CLI runs from this test's directory, with the absolute path.
    let e = Edgelb::spawned(&mut cmd, &bed.ns, &bed.config, &log);
    assert_eq!(e.status().config, bed.config);
    let text = String::from_utf8_lossy(&e.cli(&["status"]).stdout).into_owned();
    assert!(text.starts_with(&format!("config {}\n", bed.config.display())), "{text}");
    // Then the running build, this one: no note of another.
    let build = format!("build {}", edgelb::build::VERSION_LINE);
    assert_eq!(text.lines().nth(1), Some(build.as_str()), "{text}");
    let other = bed.config.with_extension("other.toml");
    std::fs::copy(&bed.config, &other).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(["reload", "--config"])
        .arg(&other)
        .output()
        .expect("run edgelb CLI");
    let _ = std::fs::remove_file(&other);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    let says = format!("edgelb runs with {}, and", bed.config.display());
    assert!(err.contains(&says), "{err}");
    // Its log says what it wrote to the maps in words, not as a debug dump.
    let log = e.log();
    let line = log.lines().find(|l| l.contains("maps in line with the config")).expect("said");
    assert!(line.contains("maps=") && !line.contains("ApplyReport"), "{line}");
    drop(e);
}

/// A reload is logged as the one reloading is told it, with the file and its content's hash
/// (what a running config is identified by): an L7 backend added names it. The log said only
/// `config reloaded maps=no change` of a reload that changed an L7 pool, and no file.
#[test]
fn a_reload_is_logged_with_its_file_its_hash_and_the_l7_backends_it_added() {
    if !netns::require_privileged(
        "a_reload_is_logged_with_its_file_its_hash_and_the_l7_backends_it_added",
    ) {
        return;
    }
    let vip = |backends: &str| {
        format!(
            "[[vip]]\nname = \"app\"\naddress = \"127.0.0.1\"\nport = 8080\nforwarding = \"l7\"\nbackends = [{backends}]\n[vip.l7]\n"
        )
    };
    let bed = LoBed::new("reloadlog", &vip("{ address = \"127.0.0.1\", port = 8081 }"));
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lifecycle-{}.log", bed.tag));
    let _ = std::fs::remove_file(&log);
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let mut cmd = run_command(&bed.ns, &bed.config, &[]);
    let e = Edgelb::spawned(cmd.stderr(out), &bed.ns, &bed.config, &log);
    let text = config_of(
        &bed.tag,
        &vip("{ address = \"127.0.0.1\", port = 8081 }, { address = \"127.0.0.1\", port = 8082 }"),
    );
    std::fs::write(&bed.config, &text).unwrap();
    let out = e.cli(&["reload"]);
    let told = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{told}{}", String::from_utf8_lossy(&out.stderr));
    assert!(told.contains("L7 backends added: app 127.0.0.1:8082"), "{told}");
    let sha256 = config::content_hash(text.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = e.log().lines().find(|l| l.contains("reloaded ")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no reload logged:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains(told.trim()), "{line}\n{told}");
    assert!(line.contains(&format!("config={}", bed.config.display())), "{line}");
    assert!(line.contains(&format!("sha256={sha256}")), "{line}");
    drop(e);
}

/// A log reader that stalls (journald busy, a container log driver that blocks) does not stall
/// the balancer: with edgelb's stderr a pipe that nobody reads and the access log on, every one
/// of many requests is answered (far more than the pipe holds lines of), `edgelb status` answers
/// after them, and a stop ends the process in bounded time. Its log used to be written by the
/// thread that logged: the pipe full, the proxy threads blocked writing their access-log lines,
/// the controller behind them, and requests and the admin socket hung after a few hundred.
#[test]
fn a_stalled_log_reader_does_not_stall_the_balancer() {
    const REQUESTS: usize = 1500;
    if !netns::require_privileged("a_stalled_log_reader_does_not_stall_the_balancer") {
        return;
    }
    let bed = LoBed::new(
        "stalledlog",
        "[[vip]]\nname = \"app\"\naddress = \"127.0.0.1\"\nport = 8080\nforwarding = \"l7\"\nbackends = [{ address = \"127.0.0.1\", port = 8081 }]\n[vip.l7]\naccess_log = true\n",
    );
    let _backend = NamedServer::start(&bed.ns, "backend", "127.0.0.1:8081".parse().unwrap());
    // The read end stays open in this process, unread: writes block once the pipe (64 KiB, a
    // few hundred access-log lines) is full.
    let child = run_command(&bed.ns, &bed.config, &[])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edgelb");
    let mut edgelb = Guarded::new(child, "edgelb");
    let status = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgelb"));
        cmd.args(["status", "--config"]).arg(&bed.config);
        output_within(cmd, "edgelb status", Duration::from_secs(10))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !status().status.success() {
        assert!(edgelb.exited().is_none(), "edgelb exited");
        assert!(Instant::now() < deadline, "edgelb never answered on its admin socket");
        std::thread::sleep(Duration::from_millis(100));
    }
    let vip: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let (served, error) = netns::in_netns(&bed.ns, || {
        // The first, once the proxy listens.
        let start = Instant::now();
        while servers::http_get(None, vip, TIMEOUT).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "{vip} never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        for i in 0..REQUESTS {
            if let Err(e) = servers::http_get(None, vip, Duration::from_secs(2)) {
                return (i, Some(e.to_string()));
            }
        }
        (REQUESTS, None)
    })
    .unwrap();
    assert_eq!(served, REQUESTS, "request {served} failed: {error:?}");
    let out = status();
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("requests {}", REQUESTS + 1)), "{text}");
    let scraped = scrape_in(&bed.ns);
    assert!(scraped.lines().any(|l| l.starts_with("edgelb_log_lines_dropped_total ")), "{scraped}");
    edgelb.signal(libc::SIGTERM);
    let st = edgelb.wait(Duration::from_secs(15));
    assert!(st.success(), "edgelb exit status {st}");
}

/// `status --json` gives each VIP its address, port and protocol as fields of their own, and
/// each backend its address and port; the byte rate is named for what it holds, bytes per
/// second: under load its ratio to the packet rate is the average packet size the counters
/// show (a rate in bits would be eight times that).
#[test]
fn status_json_has_structured_fields_and_a_byte_rate_in_bytes() {
    let Some(bed) = Bed::up("statusjson", &[1, 2, 3]) else { return };
    let load = bed.load(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(2500));
    let out = bed.e().cli(&["status", "--json"]);
    let served = load.finish().iter().filter(|(_, _, r)| r.is_ok()).count();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(served > 20, "the load ran ({served} requests)");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let vip = |name: &str| {
        j["vips"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap().clone()
    };
    let vips = [
        ("web", "198.18.1.1", 80, "tcp"),
        ("dns", "198.18.1.1", 53, "udp"),
        ("web7", "198.18.1.6", 80, "tcp"),
    ];
    for (name, address, port, proto) in vips {
        let v = vip(name);
        assert_eq!(v["address"], address, "{v}");
        assert_eq!((v["port"].as_u64(), v["protocol"].as_str()), (Some(port), Some(proto)), "{v}");
        assert_eq!(v.get("bps"), v.get("bytes_per_s"), "the old name kept for scripts: {v}");
        assert!(v.get("bytes_per_s").is_some_and(|r| r.is_f64()), "{v}");
        for b in v["backends"].as_array().unwrap() {
            assert!(b["address"].as_str().unwrap().starts_with("198.18.0.1"), "{b}");
            assert_eq!(b["port"].as_u64(), Some(port), "{b}");
            assert_eq!(b.get("bps"), b.get("bytes_per_s"), "{b}");
            assert!(b.get("bytes_per_s").is_some_and(|r| r.is_f64()), "{b}");
        }
    }
    let web = vip("web");
    let (pps, rate) = (web["pps"].as_f64().unwrap(), web["bytes_per_s"].as_f64().unwrap());
    let average = web["bytes"].as_f64().unwrap() / web["packets"].as_f64().unwrap();
    assert!(pps > 5.0, "{web}");
    let per_packet = rate / pps;
    assert!(
        per_packet > average / 2.0 && per_packet < average * 2.0,
        "bytes_per_s / pps = {per_packet:.0} B, the counters' average packet {average:.0} B: {web}"
    );
}

#[test]
fn restart_under_load_loses_nothing() {
    let Some(mut bed) = Bed::up("restart", &[1, 2, 3]) else { return };
    let load = bed.load(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1000));
    let old = bed.edgelb.take().unwrap();
    let (config, ns, log_path) = (old.config.clone(), old.ns.clone(), old.log.clone());
    old.terminate();
    // The data plane runs on without a controller for a moment...
    std::thread::sleep(Duration::from_millis(500));
    // ...and the new process adopts it.
    bed.edgelb = Some(Edgelb::start(&ns, &config, &log_path));
    std::thread::sleep(Duration::from_millis(1500));
    let log = load.finish();
    let failed: Vec<_> = log.iter().filter(|(_, _, r)| r.is_err()).collect();
    eprintln!("restart under load: {} requests, {} failed", log.len(), failed.len());
    assert!(log.len() > 100, "load ran");
    assert!(failed.is_empty(), "requests failed across the restart: {failed:?}");
    let text = bed.e().log();
    assert!(text.contains("adopting it"), "second process adopted the pinned state:\n{text}");
    assert!(text.contains("took over the pinned XDP link"), "{text}");
}

/// The capabilities contrib/edgelb.service gives edgelb (its CapabilityBoundingSet, which its
/// AmbientCapabilities repeats), as `setpriv` takes them: `-all,+bpf,+perfmon,...`.
fn unit_caps() -> String {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/edgelb.service"))
            .expect("contrib/edgelb.service");
    let set = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .to_owned()
    };
    let bounding = set("CapabilityBoundingSet=");
    assert_eq!(bounding, set("AmbientCapabilities="), "the unit's two sets differ");
    let caps: Vec<String> = bounding
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert!(
        !caps.contains(&"+sys_admin".to_owned()),
        "the unit gives CAP_SYS_ADMIN now: test nothing"
    );
    format!("-all,{}", caps.join(","))
}

/// Restarts as the shipped systemd unit runs edgelb: as root, with only its capabilities (no
/// CAP_SYS_ADMIN). A start that found a data plane pinned checked its links by their programs'
/// names, which only CAP_SYS_ADMIN may read (the kernel's program-id iteration): every restart
/// under the unit was refused ("not edgelb's balancer"), and systemd's retries ended with no
/// controller. Two restarts under the unit's capabilities now adopt the data plane, as at once
/// with all of them.
#[test]
fn restarts_under_the_units_capabilities_adopt_the_data_plane() {
    let Some(mut bed) = Bed::up("unitcaps", &[1, 2, 3]) else { return };
    for round in 0..2 {
        let old = bed.edgelb.take().unwrap();
        let (config, ns, log) = (old.config.clone(), old.ns.clone(), old.log.clone());
        old.terminate();
        let new = Edgelb::start_under_unit_caps(&ns, &config, &log);
        let text = new.log();
        assert_eq!(
            text.matches("left the data plane running: adopting it").count(),
            round + 1,
            "{text}"
        );
        assert_eq!(text.matches("took over the pinned XDP link").count(), round + 1, "{text}");
        bed.edgelb = Some(new);
        bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
    }
    // And a first start, with nothing pinned: `edgelb stop` removes the data plane first.
    let mut old = bed.edgelb.take().unwrap();
    let (config, ns, log) = (old.config.clone(), old.ns.clone(), old.log.clone());
    assert!(old.cli(&["stop"]).status.success(), "{}", old.log());
    old.child.take().unwrap().wait(Duration::from_secs(30));
    assert!(!bed.cfg().node.pin_dir.exists(), "the data plane is gone");
    bed.edgelb = Some(Edgelb::start_under_unit_caps(&ns, &config, &log));
    bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
    assert!(bed.cfg().node.pin_dir.join("link-lb0").exists(), "{}", bed.e().log());
}

#[test]
fn reload_rejects_bad_files_and_keeps_connections() {
    let Some(bed) = Bed::up("reload", &[1, 2]) else { return };
    let cfg = bed.cfg();
    let clients: Vec<IpAddr> = (0..30).map(|i| IpAddr::V4(testbed::pool_addr(i))).collect();
    let mut conns = echo_conns(&bed, &clients);
    let before: Vec<String> = conns.iter_mut().map(|c| c.backend().unwrap()).collect();
    for (c, b) in clients.iter().zip(&before) {
        assert_eq!(*b, backend_name(&cfg, "echo", *c));
    }
    let status_before = bed.e().status();
    // The echo VIP's backends as status shows them, but for the rates, which a sample taken
    // between two statuses changes with nothing else changed.
    let echo_backends = |st: &Status| {
        let mut b = st.vips[1].backends.clone();
        for b in &mut b {
            (b.pps, b.bytes_per_s, b.bps) = (0.0, 0.0, 0.0);
        }
        b
    };

    // An invalid file: rejected with the reason, nothing changes.
    let good = std::fs::read_to_string(&bed.cfg_path).unwrap();
    std::fs::write(&bed.cfg_path, good.replace("port = 7", "port = 70000")).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "a bad file exits 2, as `edgelb check` does");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reload rejected") && err.contains(":"), "{err}");
    // Said in edgelb's log too, as a SIGHUP's refusal is: the one reloading may not read it.
    let log = bed.e().log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("edgelb reload")
            && l.contains("reload rejected, running config kept")
            && l.contains("70000")),
        "{log}"
    );
    assert_eq!(bed.e().status().vips.len(), status_before.vips.len());
    assert_eq!(echo_backends(&bed.e().status()), echo_backends(&status_before));

    // A FIFO in the file's place: the controller refuses it at once, naming it. Opening it
    // waited for a writer, and the controller with it: the reload, status and scrapes.
    std::fs::remove_file(&bed.cfg_path).unwrap();
    let made = Command::new("mkfifo").arg(&bed.cfg_path).status().expect("mkfifo");
    assert!(made.success());
    let mut reload = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .arg("reload")
        .arg("--socket")
        .arg(&cfg.node.admin_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run edgelb reload");
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(st) = reload.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            // Let the controller's open return (a writer came), so the test does not hang.
            drop(std::fs::OpenOptions::new().write(true).open(&bed.cfg_path));
            let _ = reload.wait();
            panic!("a reload of a FIFO still waits after 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(reload.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a regular file but a FIFO"), "{err}");
    let path = std::path::absolute(&bed.cfg_path).unwrap();
    assert!(err.contains(&format!("{}: cannot read config", path.display())), "{err}");
    std::fs::remove_file(&bed.cfg_path).unwrap();
    std::fs::write(&bed.cfg_path, &good).unwrap();

    // Another connection-table size: the maps are sized at load, so it waits for a restart.
    let resized = good.replace(
        &format!("conntrack_flows_per_cpu = {CT_FLOWS}"),
        &format!("conntrack_flows_per_cpu = {}", CT_FLOWS * 2),
    );
    assert_ne!(resized, good);
    std::fs::write(&bed.cfg_path, resized).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("conntrack_flows_per_cpu") && err.contains("restart"), "{err}");
    // It names the file by its absolute path (docs/CONFIG.md), in the takeover it suggests too.
    let path = std::path::absolute(&bed.cfg_path).unwrap();
    assert!(err.contains(&format!("kept: {} needs a restart", path.display())), "{err}");
    assert!(err.contains(&format!("`edgelb run -c {} --takeover`", path.display())), "{err}");
    assert_eq!(bed.e().status().conntrack.v4_flows_per_cpu, CT_FLOWS);

    // Another file named: a reload re-reads the file edgelb runs with, so it is refused, naming
    // that file, rather than answered "reloaded" with the other file never read.
    let other = bed.cfg_path.with_extension("other.toml");
    std::fs::write(&other, config_text(&bed.tag, &[1, 2, 3])).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(["reload", "--config"])
        .arg(&other)
        .stdin(Stdio::null())
        .output()
        .expect("run edgelb CLI");
    let _ = std::fs::remove_file(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("runs with {}", bed.cfg_path.display())), "{err}");
    assert_eq!(echo_backends(&bed.e().status()), echo_backends(&status_before));

    // Adding a backend: every established connection stays where it was.
    std::fs::write(&bed.cfg_path, config_text(&bed.tag, &[1, 2, 3])).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with(&format!("reloaded {}: ", bed.cfg_path.display())), "{said}");
    let new_cfg = bed.cfg();
    for (c, b) in conns.iter_mut().zip(&before) {
        assert_eq!(&c.backend().unwrap(), b, "established connection moved");
    }
    // New connections follow the new ring, some to the new backend.
    let fresh: Vec<String> =
        echo_conns(&bed, &clients).iter_mut().map(|c| c.backend().unwrap()).collect::<Vec<_>>();
    for (c, b) in clients.iter().zip(&fresh) {
        assert_eq!(*b, backend_name(&new_cfg, "echo", *c));
    }
    assert!(fresh.iter().any(|b| b == "backend-3"));

    // A changed attach mode needs a restart too, and so does an L7 VIP's mode.
    let grown = config_text(&bed.tag, &[1, 2, 3]);
    let web7_tcp = grown.replace("algorithm = \"round_robin\"", "mode = \"tcp\"");
    assert_ne!(web7_tcp, grown);
    for (changed, what) in [
        (grown.replace("[node]\n", "[node]\nxdp_mode = \"generic\"\n"), "xdp_mode"),
        (web7_tcp, "L7 VIP `web7`: 198.18.1.6:80 http → 198.18.1.6:80 tcp"),
    ] {
        std::fs::write(&bed.cfg_path, changed).unwrap();
        let out = bed.e().cli(&["reload"]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what) && err.contains("restart"), "{err}");
    }

    // A valid file the maps have no room for: swapping a pool of 4087 backends needs the old
    // and the new entries at once, over the 4096 the maps hold. The reload is refused, the
    // running config stays, and the maps are whole: the next reload works.
    let big = |base: u32| {
        let list: Vec<String> = (0..4087u32)
            .map(|i| {
                let b = i / 250;
                format!(
                    "{{ address = \"198.18.{}.{}\", mac = \"02:ed:00:00:00:10\" }}",
                    base + b,
                    1 + i % 250
                )
            })
            .collect();
        format!(
            "{grown}\n[[vip]]\nname = \"big\"\naddress = \"198.18.1.1\"\nport = 8080\nbackends = [{}]\n",
            list.join(", ")
        )
    };
    std::fs::write(&bed.cfg_path, big(100)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Requests to the L7 VIP, whose backend 3 the refused file drops: the proxy must not see
    // that file either, and backend 3 keeps its live state (here its request count).
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    netns::in_netns(&bed.tb.names.client, || {
        for _ in 0..6 {
            servers::http_get(None, l7, TIMEOUT).expect("L7 request");
        }
    })
    .unwrap();
    let l7_requests = |bed: &Bed| {
        let st = bed.e().status();
        let v = st.vips.iter().find(|v| v.name == "web7").expect("web7 in status");
        v.backends.iter().find(|b| b.address.to_string() == "198.18.0.13").unwrap().l7_requests
    };
    let served = l7_requests(&bed);
    assert!(served > 0, "backend 3 took no L7 request");
    let third7 = ", { address = \"198.18.0.13\", port = 80 }";
    assert!(big(150).contains(third7));
    std::fs::write(&bed.cfg_path, big(150).replacen(third7, "", 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("running config kept") && err.contains("4096 backend entries"), "{err}");
    let status = bed.e().status();
    let kept = status.vips.iter().find(|v| v.name == "big").expect("big VIP kept");
    assert_eq!(kept.backends[0].address.to_string(), "198.18.100.1");
    assert!((kept.backends.iter().map(|b| b.ring_share).sum::<f64>() - 1.0).abs() < 1e-6);
    assert_eq!(l7_requests(&bed), served, "backend 3's L7 state was lost to the refused file");
    std::fs::write(&bed.cfg_path, &grown).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (c, b) in conns.iter_mut().zip(&before) {
        assert_eq!(&c.backend().unwrap(), b, "established connection moved");
    }
    // A file accepted with a caution (a TCP check of the UDP VIP on its own port): the reply
    // says it, for whoever reloads without reading the log.
    let cautioned = grown.replacen(
        "protocol = \"udp\"\n",
        "protocol = \"udp\"\nhealth = { kind = \"tcp\" }\n",
        1,
    );
    assert_ne!(cautioned, grown);
    std::fs::write(&bed.cfg_path, &cautioned).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("warning: ") && said.contains("VIP `dns`"), "{said}");
    std::fs::write(&bed.cfg_path, &grown).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("warning"));
    let _ = config::EXAMPLE;
}

/// One GET /metrics from inside the balancer namespace (the endpoint is on its loopback).
fn scrape(bed: &Bed) -> String {
    scrape_in(&bed.tb.names.lb)
}

/// One GET /metrics from inside namespace `ns`, on its loopback (the default endpoint).
fn scrape_in(ns: &str) -> String {
    use std::io::{Read, Write};
    netns::in_netns(ns, || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 9110)).expect("metrics endpoint");
        // A hung endpoint fails the test rather than hanging the suite.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"), "{out}");
        out
    })
    .unwrap()
}

/// The value of the sample `name{labels}` (labels as written in the exposition), or 0.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let want = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0.0, |v| v.trim().parse().expect("numeric sample"))
}

#[test]
fn metrics_match_the_traffic_sent_and_capabilities_are_dropped() {
    let Some(bed) = Bed::up("metrics", &[1, 2, 3]) else { return };
    let cfg = bed.cfg();
    let before = scrape(&bed);
    let clients: Vec<IpAddr> = (0..100).map(|i| IpAddr::V4(testbed::pool_addr(500 + i))).collect();
    netns::in_netns(&bed.tb.names.client, || {
        for c in &clients {
            let got = servers::udp_ask(
                SocketAddr::new(*c, 0),
                SocketAddr::new(IpAddr::V4(testbed::VIP), 53),
                TIMEOUT,
            )
            .expect("UDP answer");
            assert_eq!(got, backend_name(&cfg, "dns", *c));
        }
    })
    .unwrap();
    let after = scrape(&bed);
    let delta =
        |name: &str, labels: &str| metric(&after, name, labels) - metric(&before, name, labels);
    assert_eq!(delta("edgelb_vip_packets_total", "vip=\"dns\""), 100.0, "{after}");
    assert_eq!(delta("edgelb_vip_new_flows_total", "vip=\"dns\""), 100.0);
    // Each query is one 46-byte frame: Ethernet 14 + IPv4 20 + UDP 8 + "who?".
    assert_eq!(delta("edgelb_vip_bytes_total", "vip=\"dns\""), 100.0 * 46.0);
    for i in 1..=3 {
        let addr = format!("198.18.0.{}", 10 + i);
        let sent = clients
            .iter()
            .filter(|c| backend_name(&cfg, "dns", **c) == format!("backend-{i}"))
            .count();
        let labels = format!("vip=\"dns\",backend=\"{addr}\"");
        assert_eq!(delta("edgelb_backend_packets_total", &labels), sent as f64, "backend {addr}");
        let web = format!("vip=\"web\",backend=\"{addr}\"");
        assert_eq!(metric(&after, "edgelb_backend_up", &web), 1.0);
        // Each check's first probe comes at an offset within its interval: wait for it.
        let probed = || metric(&scrape(&bed), "edgelb_health_check_duration_seconds_count", &web);
        let start = Instant::now();
        while probed() == 0.0 {
            assert!(start.elapsed() < INTERVAL * 5, "{web} never probed:\n{}", scrape(&bed));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(delta("edgelb_xdp_verdicts_total", "action=\"tx\",reason=\"encap\"") >= 100.0);
    assert!(after.contains("# TYPE edgelb_health_check_duration_seconds histogram"), "{after}");
    // 100 flows in a table of 8192 per CPU: none pushed out.
    assert_eq!(delta("edgelb_conntrack_events_total", "event=\"evicted\""), 0.0, "{after}");
    for event in lb_common::ct_stats::NAMES {
        assert!(after.contains(&format!("edgelb_conntrack_events_total{{event=\"{event}\"}}")));
    }
    // `edgelb status` gives the table's shape (as configured) and the same event counts.
    let ct = bed.e().status().conntrack;
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let last_cpu: u32 = cpus.trim().rsplit(['-', ',']).next().unwrap().parse().unwrap();
    assert_eq!(ct.cpus, last_cpu + 1);
    assert_eq!((ct.v4_flows_per_cpu, ct.v6_flows_per_cpu), (CT_FLOWS, CT_FLOWS));
    let events = scrape(&bed);
    assert_eq!(
        ct.evicted as f64,
        metric(&events, "edgelb_conntrack_events_total", "event=\"evicted\"")
    );
    assert_eq!(
        ct.found_on_other_cpu as f64,
        metric(&events, "edgelb_conntrack_events_total", "event=\"found_on_other_cpu\"")
    );
    assert_eq!(
        ct.missed_established as f64,
        metric(&events, "edgelb_conntrack_events_total", "event=\"missed_established\"")
    );

    // The long-running controller holds no capability at all.
    let pid = bed.e().child.as_ref().expect("running").id();
    // Capabilities are per thread: check every thread (admin, metrics, L7, health checks...).
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let name = status.lines().next().unwrap_or("").to_owned();
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let line = status.lines().find(|l| l.starts_with(set)).unwrap();
            assert!(line.ends_with("0000000000000000"), "thread {name}: {line}");
        }
        threads += 1;
    }
    assert!(threads > 3, "helper threads exist and were checked ({threads})");

    // Started with a soft open-file limit of 1024, it raised it to the hard limit.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let nums: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit raised to the hard one: {files}");
    assert_ne!(nums[0], "1024", "{files}");

    // A reload that takes backend 3 out of `web`: its series go, those of the backends kept
    // (and of backend 3 in the other VIPs) stay and go on counting from where they were.
    let count = "edgelb_health_check_duration_seconds_count";
    let (kept, gone) =
        ("vip=\"web\",backend=\"198.18.0.11\"", "vip=\"web\",backend=\"198.18.0.13\"");
    let before = scrape(&bed);
    assert!(metric(&before, count, gone) > 0.0, "{before}");
    let text = config_text(&bed.tag, &[1, 2, 3]);
    let third = ", { address = \"198.18.0.13\", mac = \"02:ed:00:00:00:13\" }]";
    std::fs::write(&bed.cfg_path, text.replacen(third, "]", 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = scrape(&bed);
    assert!(!after.contains(gone), "{after}");
    assert!(metric(&after, count, kept) >= metric(&before, count, kept), "{after}");
    assert!(after.contains("vip=\"dns\",backend=\"198.18.0.13\""), "{after}");
    let l7 = "vip=\"web7\",backend=\"198.18.0.13:80\"";
    assert!(metric(&after, count, l7) >= metric(&before, count, l7), "{after}");
}

#[test]
fn l7_vip_passes_xdp_to_the_proxy_which_follows_health() {
    let Some(mut bed) = Bed::up("l7", &[1, 2, 3]) else { return };
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    let ask = |bed: &Bed, n: u32| {
        netns::in_netns(&bed.tb.names.client, || {
            (0..n)
                .map(|i| {
                    servers::http_get(
                        Some(SocketAddr::new(IpAddr::V4(testbed::pool_addr(i)), 0)),
                        vip,
                        TIMEOUT,
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap()
    };
    let before = scrape(&bed);
    // The transition counters exist from the start, at 0, so that `increase()` sees the first
    // flap below (a series born at 1 has no increase).
    let to_down = "vip=\"web7\",backend=\"198.18.0.12:80\",to=\"down\"";
    let zero = format!("edgelb_backend_transitions_total{{{to_down}}} 0");
    assert!(before.lines().any(|l| l == zero), "{zero} missing:\n{before}");
    // Every health check runs.
    assert!(before.lines().any(|l| l == "edgelb_health_checks_missing 0"), "{before}");
    let answers = ask(&bed, 30);
    let mut seen = HashMap::<String, u32>::new();
    for a in answers {
        *seen.entry(a.expect("L7 request through the proxy")).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "round-robin over three backends: {seen:?}");
    let after = scrape(&bed);
    let delta =
        |name: &str, labels: &str| metric(&after, name, labels) - metric(&before, name, labels);
    assert!(
        delta("edgelb_xdp_verdicts_total", "action=\"pass\",reason=\"l7\"") >= 30.0 * 3.0,
        "{after}"
    );
    assert_eq!(delta("edgelb_l7_requests_total", "vip=\"web7\",class=\"2xx\""), 30.0, "{after}");
    // XDP passes an L7 VIP's traffic to the kernel uncounted: no XDP counter series for it or
    // its backends (they would only ever read 0), while the XDP VIPs keep theirs.
    for what in ["packets", "bytes", "new_flows"] {
        let vip = format!("edgelb_vip_{what}_total{{vip=\"web7\"}}");
        assert!(!after.contains(&vip), "{vip} exported:\n{after}");
        let backends = format!("edgelb_backend_{what}_total{{vip=\"web7\",");
        assert!(!after.contains(&backends), "{backends} exported:\n{after}");
        assert!(after.contains(&format!("edgelb_vip_{what}_total{{vip=\"web\"}}")), "{after}");
    }

    // A dead backend leaves the L7 pool through the same active health view as L4.
    bed.kill_backend(2);
    let t = Instant::now();
    while bed.e().healthy("web7", "198.18.0.12") {
        assert!(t.elapsed() < INTERVAL * (FALL + 2) + Duration::from_secs(1), "never marked down");
        std::thread::sleep(Duration::from_millis(20));
    }
    for a in ask(&bed, 30) {
        assert_ne!(a.expect("no failure once the backend is out"), "backend-2");
    }
    // The log says what DOWN does to each: the XDP VIP's ring, the L7 VIP's pool (no ring).
    let down_line = |vip: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = bed.e().log();
            let found = log
                .lines()
                .find(|l| l.contains("backend DOWN") && l.contains(&format!("vip={vip} ")));
            if let Some(line) = found {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no DOWN logged for {vip}:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (xdp, l7) = (down_line("web"), down_line("web7"));
    assert!(xdp.contains("leaves the ring"), "{xdp}");
    assert!(l7.contains("leaves the L7 pool") && !l7.contains("ring"), "{l7}");
    // Out of the pool, it keeps its L7 live state (one view of its health, active and
    // passive): `status` still counts the requests it served, and its passive-down gauge goes
    // on, once. Both were lost at an active DOWN.
    let st = bed.e().status();
    let web7 = st.vips.iter().find(|v| v.name == "web7").expect("web7 in status");
    let b2 = web7.backends.iter().find(|b| b.address.to_string() == "198.18.0.12").unwrap();
    assert_eq!(b2.l7_requests, u64::from(seen["backend-2"]), "{b2:?}");
    let now = scrape(&bed);
    let gauge = "edgelb_l7_backend_passive_down{vip=\"web7\",backend=\"198.18.0.12:80\"}";
    assert_eq!(now.lines().filter(|l| l.starts_with(gauge)).count(), 1, "{now}");
    // An L7 VIP's backends are named address:port in the metrics, as the proxy's own are.
    assert_eq!(metric(&now, "edgelb_backend_up", "vip=\"web7\",backend=\"198.18.0.12:80\""), 0.0);
    assert_eq!(metric(&now, "edgelb_backend_up", "vip=\"web7\",backend=\"198.18.0.11:80\""), 1.0);
    assert_eq!(metric(&now, "edgelb_backend_transitions_total", to_down), 1.0, "{now}");
}

#[test]
fn l7_listener_from_the_service_manager_keeps_connections_across_a_restart() {
    let Some(mut bed) = Bed::up("socketact", &[1, 2, 3]) else { return };
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    let first = bed.edgelb.take().unwrap();
    let (config, ns, log_path) = (first.config.clone(), first.ns.clone(), first.log.clone());
    first.terminate();
    // The test plays systemd: it binds the L7 VIP's socket (ListenStream= with ReusePort= and
    // FreeBind=) in the balancer's namespace and keeps it open across edgelb restarts.
    let listener: OwnedFd = netns::in_netns(&ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_reuse_port(true).unwrap();
        s.set_freebind_v4(true).unwrap();
        s.bind(&vip.into()).unwrap();
        s.listen(4096).unwrap();
        OwnedFd::from(s)
    })
    .unwrap();
    bed.edgelb = Some(Edgelb::start_with(&ns, &config, &log_path, Some(&listener)));
    bed.wait_for(vip);
    assert!(
        bed.e().log().contains("L7 VIP listens on the socket passed by the service manager"),
        "{}",
        bed.e().log()
    );

    // New connections all along, while one process stops and, after a pause with none, the
    // next starts: those arriving in between wait in the socket's backlog.
    let load = bed.load_to(vip, Duration::from_secs(15), Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1000));
    bed.edgelb.take().unwrap().terminate();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(700));
    bed.edgelb = Some(Edgelb::start_with(&ns, &config, &log_path, Some(&listener)));
    std::thread::sleep(Duration::from_millis(1500));
    let log = load.finish();
    let failed: Vec<_> = log.iter().filter(|(_, _, r)| r.is_err()).collect();
    let after = log.iter().filter(|(t, _, _)| *t > stopped).count();
    eprintln!(
        "L7 restart on an inherited socket: {} requests ({after} finished after the stop), {} failed",
        log.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "requests failed across the restart: {failed:?}");
    assert!(after > 20, "the new process served the VIP");
}

/// Asserts that no request of a load run failed and that it went on being served after `event`
/// (more than 20 requests finished after it); prints the counts under `what`.
fn served_throughout(what: &str, log: &[Sample], event: Instant) {
    let failed: Vec<_> = log.iter().filter(|(_, _, r)| r.is_err()).collect();
    let after = log.iter().filter(|(t, _, _)| *t > event).count();
    eprintln!("{what}: {} requests ({after} after it), {} failed", log.len(), failed.len());
    assert!(failed.is_empty(), "{what}: requests failed: {failed:?}");
    assert!(after > 20, "{what}: served afterwards");
}

#[test]
fn takeover_replaces_a_running_edgelb_without_refusing_a_connection() {
    let Some(mut bed) = Bed::up("takeover", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let scraped = scrape(&bed);
    // A dead backend stays out through the upgrade: the new controller starts from the old
    // one's verdicts rather than serving it again until its own checks fail it.
    bed.kill_backend(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.e().healthy("web", "198.18.0.11") || bed.e().healthy("web7", "198.18.0.11") {
        assert!(Instant::now() < deadline, "backend 1 never seen dead");
        std::thread::sleep(Duration::from_millis(50));
    }
    let downs = |log: &str| {
        log.lines().filter(|l| l.contains("backend DOWN") && l.contains("198.18.0.11")).count()
    };
    let downs_before = downs(&bed.e().log());
    // A backend drained for maintenance stays drained through the upgrade.
    let out = bed.e().cli(&["drain", "198.18.0.13", "--vip", "echo"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // New connections all along to the L7 VIP (edgelb's own listeners, no service manager) and
    // to the XDP VIP, while a second edgelb takes over from the first.
    let l7_load = bed.load_to(l7, Duration::from_secs(15), Duration::from_secs(30));
    let l4_load = bed.load(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    let old_pid = bed.e().child.as_ref().unwrap().id();
    let first = bed.edgelb.take().unwrap();
    let started = Instant::now();
    bed.edgelb = Some(first.take_over());
    let handed = Instant::now();
    eprintln!(
        "takeover: the old edgelb exited {} ms after the new one started",
        started.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_millis(1500));
    served_throughout("takeover, L7 VIP", &l7_load.finish(), handed);
    served_throughout("takeover, XDP VIP", &l4_load.finish(), handed);
    let log = bed.e().log();
    assert!(log.contains("handed over its listening sockets"), "{log}");
    // On the very sockets the old one listened on (its own SO_REUSEPORT binds would lose the
    // connections queued on the old sockets when those close).
    assert!(
        log.contains("L7 VIP listens on the socket handed over by the previous edgelb"),
        "{log}"
    );
    assert!(log.contains("the new edgelb serves"), "{log}");
    assert!(log.contains("handover done"), "{log}");
    // Each side logs the other's build (here both this one), for an operator to see that an
    // upgrade swapped the binary.
    let build = edgelb::build::VERSION_LINE;
    let took = format!("--takeover: took over from {build}; this is {build}");
    assert!(log.contains(&took), "{log}");
    let handed = log.lines().find(|l| l.contains("the new edgelb got the listening sockets"));
    assert!(handed.is_some_and(|l| l.contains(&format!("to=\"{build}\""))), "{log}");
    // The new process serves metrics on the same socket, and its controller works: health
    // checks run (a dead backend leaves) and the admin socket is its own. Both say its build.
    let now = scrape(&bed);
    assert!(now.contains("edgelb_vip_packets_total"), "{scraped}\n{now}");
    let build_info = format!(
        "edgelb_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION"),
        edgelb::build::COMMIT
    );
    assert!(now.contains(&build_info), "{now}");
    assert_ne!(bed.e().child.as_ref().unwrap().id(), old_pid);
    let status = bed.e().status();
    assert_eq!(status.build.as_deref(), Some(build));
    let echo = status.vips.iter().find(|v| v.name == "echo").unwrap();
    let b3 = echo.backends.iter().find(|b| b.address.to_string() == "198.18.0.13").unwrap();
    assert!(b3.drained && b3.ring_share == 0.0, "the drain was kept: {b3:?}");
    let web = status.vips.iter().find(|v| v.name == "web").unwrap();
    assert!(web.backends.iter().all(|b| !b.drained), "a drain of one VIP only");
    assert!(log.contains("keeping the running edgelb's drains and health verdicts"), "{log}");
    assert!(!bed.e().healthy("web", "198.18.0.11") && !bed.e().healthy("web7", "198.18.0.11"));
    assert_eq!(downs(&log), downs_before, "backend 1 never served again, so never failed again");
    sees_backend_2_die(&mut bed, "the new controller");
}

/// A takeover with another file ends in the state a reload to that file would: a VIP the file
/// renames keeps its drain and its dead backend (never served again, so never failed again), a
/// VIP it moves to another port keeps its `address:port` drain, and a backend it adds to a
/// checked VIP waits for its check before it takes a flow.
#[test]
fn a_takeover_with_another_file_carries_state_as_a_reload_would() {
    let Some(mut bed) = Bed::up("takeover-file", &[1, 2, 3]) else { return };
    let full = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let third = ", { address = \"198.18.0.13\", mac = \"02:ed:00:00:00:13\" }";
    assert!(full.contains(third));
    // The first VIP listed is web: without backend 3, so that the new file adds it.
    std::fs::write(&bed.cfg_path, full.replacen(third, "", 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    bed.kill_backend(1);
    // Dead for every VIP it serves (web7 too, whose own check says so in its own time) before
    // its DOWN lines are counted, as the takeover test above waits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.e().healthy("web", "198.18.0.11") || bed.e().healthy("web7", "198.18.0.11") {
        assert!(Instant::now() < deadline, "backend 1 never seen dead");
        std::thread::sleep(Duration::from_millis(50));
    }
    let downs = |log: &str| {
        log.lines().filter(|l| l.contains("backend DOWN") && l.contains("198.18.0.11")).count()
    };
    let downs_before = downs(&bed.e().log());
    for args in
        [["drain", "198.18.0.12", "--vip", "web"], ["drain", "198.18.0.12:7", "--vip", "echo"]]
    {
        let out = bed.e().cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The new file: web renamed www (same address and port), with backend 3 again; echo moved
    // from port 7 to 8.
    let text = full.replacen("name = \"web\"", "name = \"www\"", 1).replacen(
        "port = 7\n",
        "port = 8\n",
        1,
    );
    assert!(text.contains("name = \"www\"") && text.contains("port = 8\n"));
    std::fs::write(&bed.cfg_path, text).unwrap();
    let first = bed.edgelb.take().unwrap();
    bed.edgelb = Some(first.take_over());
    let status = bed.e().status();
    let backend = |vip: &str, addr: &str| {
        let v = status.vips.iter().find(|v| v.name == vip).expect("VIP in status");
        v.backends.iter().find(|b| b.address.to_string() == addr).expect("backend").clone()
    };
    let log = bed.e().log();
    assert!(backend("www", "198.18.0.12").drained, "the drain of the renamed VIP was kept: {log}");
    let echo2 = backend("echo", "198.18.0.12");
    assert!(
        echo2.drained && echo2.port == 8,
        "the drain followed echo to port 8: {echo2:?}\n{log}"
    );
    assert!(!backend("echo", "198.18.0.11").drained, "a drain of that backend only");
    assert!(!backend("www", "198.18.0.11").healthy, "still dead under its new VIP name");
    assert!(log.contains("--takeover: VIP renamed"), "{log}");
    assert!(
        log.lines().any(|l| l.contains("--takeover: backend added") && l.contains("198.18.0.13")),
        "backend 3 waits for its check: {log}"
    );
    assert!(!log.contains("drain forgotten"), "{log}");
    // Backend 1 is never served again, so its check never fails it again; backend 3 joins once
    // its check passes.
    let taken = Instant::now();
    while !bed.e().healthy("www", "198.18.0.13") {
        assert!(taken.elapsed() < Duration::from_secs(5), "backend 3 never joined");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep((INTERVAL * (FALL + 3)).saturating_sub(taken.elapsed()));
    assert!(!bed.e().healthy("www", "198.18.0.11"));
    assert_eq!(downs(&bed.e().log()), downs_before, "backend 1 never served again");
}

/// The addresses of VIP `vip`'s backends as `status` shows them.
fn backends_of(e: &Edgelb, vip: &str) -> Vec<String> {
    let st = e.status();
    let v = st.vips.iter().find(|v| v.name == vip).expect("vip in status");
    v.backends.iter().map(|b| b.address.to_string()).collect()
}

/// Waits (at most 10 s) until `log` says `line` more than `seen` times; panics with the log
/// if it does not, or if `child` exits first.
fn wait_logged(log: &Path, line: &str, seen: usize, child: &mut Guarded) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(line).count() > seen {
            return;
        }
        if let Some(st) = child.exited() {
            panic!("{} exited ({st}) before it logged {line:?}; log:\n{text}", child.what);
        }
        assert!(Instant::now() < deadline, "never logged {line:?}; log:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An `edgelb reload` that reaches the running edgelb while a takeover starts (after the new
/// process read the file, before it asked for the handover: the program load takes seconds) is
/// not lost: the handover says which file the running edgelb last applied, and the new process,
/// having read another, reads the file again and runs it as it is now. It used to run the file
/// as read before the edit, and a backend the reload had removed came back, with nothing said.
/// A file that fails by then gives the takeover up before the commit: the running edgelb keeps
/// serving what it was reloaded with. The window is held open by a test hook
/// (`EDGELB_TEST_PAUSE`) after the new process loaded its config.
#[test]
fn a_reload_while_a_takeover_starts_is_not_lost() {
    let Some(mut bed) = Bed::up("takeover-reload", &[1, 2, 3]) else { return };
    let all = config_text(&bed.tag, &[1, 2, 3]);
    let fewer = config_text(&bed.tag, &[1, 2]);
    let pause = [("EDGELB_TEST_PAUSE", "takeover-loaded:3000")];
    let hook = "test hook (EDGELB_TEST_PAUSE): pausing";
    let reload = |bed: &Bed, text: &str| {
        std::fs::write(&bed.cfg_path, text).unwrap();
        let out = bed.e().cli(&["reload"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let (log, ns) = (bed.e().log.clone(), bed.e().ns.clone());

    // The file is reloaded, then broken, while the new process is paused: it gives up before
    // the commit, saying why, and the running edgelb goes on with what it was reloaded with.
    let mut new = Edgelb::spawn_takeover_with(&ns, &bed.cfg_path, &log, &pause);
    wait_logged(&log, hook, 0, new.child.as_mut().unwrap());
    reload(&bed, &fewer);
    std::fs::write(&bed.cfg_path, all.replace("port = 7", "port = 70000")).unwrap();
    let st = new.child.as_mut().unwrap().wait(Duration::from_secs(30));
    new.child = None;
    assert_eq!(st.code(), Some(1), "log:\n{}", bed.e().log());
    let text = bed.e().log();
    assert!(
        text.contains("the config file changed while this process started")
            && text.contains("and it now fails")
            && text.contains("the running edgelb keeps serving"),
        "{text}"
    );
    bed.edgelb.as_mut().unwrap().wait_answering();
    assert_eq!(backends_of(bed.e(), "echo"), ["198.18.0.11", "198.18.0.12"]);

    // The file as at the start again; then reloaded to drop backend 3 while the new process is
    // paused: the new process runs the file as reloaded.
    reload(&bed, &all);
    assert_eq!(backends_of(bed.e(), "echo").len(), 3);
    let mut new = Edgelb::spawn_takeover_with(&ns, &bed.cfg_path, &log, &pause);
    wait_logged(&log, hook, 1, new.child.as_mut().unwrap());
    reload(&bed, &fewer);
    let old = bed.edgelb.take().unwrap();
    bed.edgelb = Some(old.handed_to(new));
    assert_eq!(
        backends_of(bed.e(), "echo"),
        ["198.18.0.11", "198.18.0.12"],
        "the new edgelb runs the file as reloaded; log:\n{}",
        bed.e().log()
    );
    assert!(
        bed.e().log().contains("running the file as it is now, not as it was read at the start"),
        "{}",
        bed.e().log()
    );
}

/// Commands sent while a takeover is under way are answered, each carried out once: between
/// the handover and the new process binding the admin socket (held open by a test hook,
/// `EDGELB_TEST_PAUSE`), they reach the old process's listener, which still has the path, and
/// once the new one serves the old one refuses them as handed over, and the CLI asks the new
/// one. The old process used to unlink the path first: `edgelb reload` then said that no
/// edgelb runs (exit 3), or, taken by the old listener, "closed without answering".
#[test]
fn commands_during_a_takeover_are_answered() {
    let Some(mut bed) = Bed::up("takeover-cmds", &[1, 2, 3]) else { return };
    let (log, ns) = (bed.e().log.clone(), bed.e().ns.clone());
    let pause = [("EDGELB_TEST_PAUSE", "takeover-handed:2000")];
    let mut new = Edgelb::spawn_takeover_with(&ns, &bed.cfg_path, &log, &pause);
    wait_logged(&log, "test hook (EDGELB_TEST_PAUSE): pausing", 0, new.child.as_mut().unwrap());
    let commands: Vec<(&str, std::thread::JoinHandle<Output>)> =
        [vec!["reload"], vec!["status", "--json"], vec!["drain", "198.18.0.13", "--vip", "echo"]]
            .into_iter()
            .map(|args| {
                let config = bed.cfg_path.clone();
                let what = args[0];
                let run = std::thread::spawn(move || {
                    Command::new(env!("CARGO_BIN_EXE_edgelb"))
                        .args(&args)
                        .arg("--config")
                        .arg(config)
                        .stdin(Stdio::null())
                        .output()
                        .expect("run edgelb CLI")
                });
                (what, run)
            })
            .collect();
    let old = bed.edgelb.take().unwrap();
    bed.edgelb = Some(old.handed_to(new));
    for (what, run) in commands {
        let out = run.join().unwrap();
        assert!(
            out.status.success(),
            "{what} during the takeover: {:?}: {}; log:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            bed.e().log()
        );
    }
    // The drain was carried out by the new process (the old one's state was handed before it).
    let st = bed.e().status();
    let echo = st.vips.iter().find(|v| v.name == "echo").unwrap();
    let b3 = echo.backends.iter().find(|b| b.address.to_string() == "198.18.0.13").unwrap();
    assert!(b3.drained, "{b3:?}");
}

/// A SIGHUP to the old process once it has handed over, while the new one starts (a `kill -HUP`
/// of its pid, or a unit whose ExecReload signals `$MAINPID`), is not lost: the old one
/// asks the new one to reload (`edgelb reload` over the admin socket) and logs the answer. It
/// used to log "SIGHUP ignored", and the new process, having compared the file with the hash
/// handed over before the edit, ran the file as it was: a backend the edit removed stayed.
/// The window is held open by a test hook (`EDGELB_TEST_PAUSE`) after the handover.
#[test]
fn a_sighup_to_the_old_process_during_a_takeover_is_not_lost() {
    let Some(mut bed) = Bed::up("takeover-hup", &[1, 2, 3]) else { return };
    let (log, ns) = (bed.e().log.clone(), bed.e().ns.clone());
    let pause = [("EDGELB_TEST_PAUSE", "takeover-handed:3000")];
    let mut new = Edgelb::spawn_takeover_with(&ns, &bed.cfg_path, &log, &pause);
    wait_logged(&log, "test hook (EDGELB_TEST_PAUSE): pausing", 0, new.child.as_mut().unwrap());
    std::fs::write(&bed.cfg_path, config_text(&bed.tag, &[1, 2])).unwrap();
    bed.edgelb.as_mut().unwrap().child.as_mut().unwrap().signal(libc::SIGHUP);
    let old = bed.edgelb.take().unwrap();
    bed.edgelb = Some(old.handed_to(new));
    let text = bed.e().log();
    assert_eq!(
        backends_of(bed.e(), "echo"),
        ["198.18.0.11", "198.18.0.12"],
        "the new edgelb runs the file as the SIGHUP asked; log:\n{text}"
    );
    assert!(text.contains("SIGHUP after the handover: the new edgelb reloaded"), "{text}");
}

/// An older edgelb taking over (a rollback to a build without `admin::bind_over`) asks for the
/// handover without `binds_over` and then binds the admin socket the way a start does, only
/// where nobody answers (`admin::bind`): the running edgelb frees the path for it before it
/// answers, as it always did. Keeping its listener there made every rollback fail ("another
/// edgelb answers") and the old process take back over. The older edgelb is played by the
/// test: the bare `handover`, the bind, `commit` and `ready`; the old process then exits.
#[test]
fn an_older_edgelb_taking_over_binds_the_admin_socket() {
    use std::io::{BufRead, Write};
    let Some(mut bed) = Bed::up("takeover-older", &[1, 2, 3]) else { return };
    let socket = bed.cfg().node.admin_socket;
    let mut e = bed.edgelb.take().unwrap();
    let mut old = e.child.take().unwrap();
    let conn = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (&conn).write_all(b"{\"cmd\":\"handover\"}\n").unwrap();
    // The sockets attached are dropped by a plain read: this test serves nothing.
    let mut reader = std::io::BufReader::new(&conn);
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    let resp: edgelb::admin::Response = serde_json::from_str(&answer).expect("handover answer");
    assert!(resp.ok, "{resp:?}");
    let bound = edgelb::admin::bind(&socket);
    let listener = bound.unwrap_or_else(|err| {
        panic!(
            "an older edgelb binding the admin socket after the handover: {err}; log:\n{}",
            e.log()
        )
    });
    (&conn).write_all(edgelb::admin::COMMIT).unwrap();
    let mut go = Vec::new();
    reader.read_until(b'\n', &mut go).unwrap();
    assert_eq!(go, edgelb::admin::GO, "log:\n{}", e.log());
    (&conn).write_all(edgelb::admin::READY).unwrap();
    let st = old.wait(Duration::from_secs(30));
    assert!(st.success(), "exit status {st}; log:\n{}", e.log());
    assert!(e.log().contains("handover done"), "{}", e.log());
    drop(listener);
    let _ = std::fs::remove_file(&socket);
}

/// Kills backend 2 and waits (at most 5 s) for the running controller (`who`) to report it
/// unhealthy on the L7 VIP: its health checks run.
fn sees_backend_2_die(bed: &mut Bed, who: &str) {
    bed.kill_backend(2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.e().healthy("web7", "198.18.0.12") {
        assert!(Instant::now() < deadline, "{who} never saw backend 2 die");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `edgelb run --takeover` with config `text` while new connections go to the L7 and the
/// XDP VIP, asserts that it exits 1 and that no connection failed, and returns its stderr.
fn failed_takeover(bed: &Bed, what: &str, text: &str) -> String {
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    let alt = bed.cfg_path.with_extension(format!("{}.toml", bed.tag));
    std::fs::write(&alt, text).unwrap();
    let l7_load = bed.load_to(l7, Duration::from_secs(15), Duration::from_secs(30));
    let l4_load = bed.load(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    let out = output_within(
        takeover_command(&bed.e().ns, &alt),
        "edgelb --takeover",
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(&alt);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    served_throughout(&format!("{what}, L7 VIP"), &l7_load.finish(), failed_at);
    served_throughout(&format!("{what}, XDP VIP"), &l4_load.finish(), failed_at);
    stderr
}

#[test]
fn takeover_without_a_running_edgelb_starts_afresh() {
    let Some(mut bed) = Bed::up("takeover-none", &[1, 2, 3]) else { return };
    let first = bed.edgelb.take().unwrap();
    let (config, ns, log_path) = (first.config.clone(), first.ns.clone(), first.log.clone());
    first.terminate();
    let mut e = Edgelb::spawn_takeover(&ns, &config, &log_path);
    e.wait_answering();
    bed.edgelb = Some(e);
    bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80));
    assert!(
        bed.e().log().contains("no edgelb answers there; starting afresh"),
        "{}",
        bed.e().log()
    );
}

#[test]
fn a_takeover_that_fails_before_the_maps_leaves_the_running_edgelb_in_charge() {
    let Some(mut bed) = Bed::up("takeover-fail", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    // The new config wants its metrics on a port something else holds: binding it fails after
    // the handover, before the new process writes the maps.
    let squatter = netns::in_netns(&bed.tb.names.lb, || {
        std::net::TcpListener::bind("127.0.0.1:9111").expect("squat the port")
    })
    .unwrap();
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let text = format!("{text}\n[metrics]\nlisten = \"127.0.0.1:9111\"\n");
    let stderr = failed_takeover(&bed, "failed takeover", &text);
    drop(squatter);
    assert!(stderr.contains("metrics endpoint 127.0.0.1:9111"), "{stderr}");
    assert!(bed.e().log().contains("this one takes back over"), "{}", bed.e().log());
    in_charge_again(&mut bed);
}

/// The CPU time process `pid` has used so far (user and system, from /proc/<pid>/stat).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/<pid>/stat");
    // After the command's name (in parentheses, which may hold spaces): field 3 onwards, of
    // which utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("a /proc/<pid>/stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf reads a constant of the system; it touches no memory of ours.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// An exclusive flock on a file, as `edgelb run` takes one beside the admin socket while it
/// binds: held by the test to keep every edgelb from binding. Let go (the file removed first,
/// as edgelb does) when dropped.
struct HeldLock(std::fs::File, PathBuf);

impl HeldLock {
    fn take(path: PathBuf) -> HeldLock {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        file.lock().unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
        HeldLock(file, path)
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.1);
        let _ = self.0.unlock();
    }
}

/// A takeover abandoned because the new edgelb cannot bind the admin socket (the lock beside it
/// held) leaves the old one unable to take the socket back either: it goes on without spinning a
/// core on its admin channel, and binds the socket again by itself soon after the lock is let
/// go (it used to spin until a restart, its socket gone), its checks running throughout.
#[test]
fn an_admin_socket_that_cannot_be_taken_back_is_bound_again_later() {
    let Some(mut bed) = Bed::up("admin-back", &[1, 2, 3]) else { return };
    let lock = HeldLock::take(PathBuf::from(format!("/run/edgelb/t-{}.sock.lock", bed.tag)));
    let out = output_within(
        takeover_command(&bed.e().ns, &bed.cfg_path),
        "edgelb --takeover",
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("binding the admin socket"), "{stderr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !bed.e().log().contains("taking the admin socket back failed") {
        assert!(Instant::now() < deadline, "no failed take-back; log:\n{}", bed.e().log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bed.e().log().contains("its admin socket is not served yet"), "{}", bed.e().log());
    let pid = bed.e().child.as_ref().unwrap().id();
    let (cpu, start) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (used, took) = (cpu_time(pid) - cpu, start.elapsed());
    assert!(used < took / 4, "the controller used {used:?} of CPU in {took:?}");
    assert!(!bed.e().cli(&["status"]).status.success(), "answers though the lock is held");
    drop(lock);
    let released = Instant::now();
    while !bed.e().cli(&["status"]).status.success() {
        let log = bed.e().log();
        assert!(released.elapsed() < Duration::from_secs(12), "never answered again; log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bed.e().log().contains("the admin socket is served again"), "{}", bed.e().log());
    sees_backend_2_die(&mut bed, "the controller");
}

/// The admin socket's path removed (a cleanup of /run) or replaced by a socket nobody serves (a
/// takeover that stalled past its wait, woke after this edgelb took back over and renamed its
/// own socket over the path before it failed): the controller binds the path again within
/// seconds. Every command had failed with "Connection refused" until a restart, though the
/// controller ran on.
#[test]
fn an_admin_socket_path_removed_or_replaced_is_bound_again() {
    let Some(bed) = Bed::up("admin-path", &[1, 2, 3]) else { return };
    let path = bed.cfg().node.admin_socket;
    for replace in [false, true] {
        std::fs::remove_file(&path).unwrap();
        if replace {
            // A socket bound, then closed: its file stays, and nobody answers on it.
            let dead = path.with_extension("dead");
            drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
            std::fs::rename(&dead, &path).unwrap();
        }
        assert!(!bed.e().cli(&["status"]).status.success(), "answers with its path gone");
        let gone = Instant::now();
        while !bed.e().cli(&["status"]).status.success() {
            let log = bed.e().log();
            assert!(gone.elapsed() < Duration::from_secs(10), "never answered again; log:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let log = bed.e().log();
    assert_eq!(log.matches("no longer names this edgelb's socket").count(), 2, "{log}");
}

/// A takeover stopped by SIGTERM while it starts (a Ctrl-C on one that seems stuck) gives up
/// rather than take over and then stop: the running edgelb stays in charge, and no connection
/// fails meanwhile.
#[test]
fn a_takeover_stopped_while_it_starts_leaves_the_running_edgelb_in_charge() {
    let Some(mut bed) = Bed::up("takeover-sig", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let l7_load = bed.load_to(l7, Duration::from_secs(15), Duration::from_secs(30));
    let l4_load = bed.load(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    let child = takeover_command(&bed.e().ns, &bed.cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run edgelb --takeover");
    // Guarded: if it is not stopped below, the failed assertion stops it before it takes over.
    let mut child = Guarded::new(child, "edgelb --takeover");
    // As soon as its handlers are in place (before them, SIGTERM just kills it): the signal
    // then arrives while it loads its program or takes the sockets over.
    let pid = child.id();
    let caught = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (15 - 1)) != 0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !caught() {
        assert!(Instant::now() < deadline, "edgelb --takeover never set up its signal handlers");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.signal(libc::SIGTERM);
    let out = child.wait_with_output(Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped by a signal before serving"), "{stderr}");
    let stopped_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    served_throughout("stopped takeover, L7 VIP", &l7_load.finish(), stopped_at);
    served_throughout("stopped takeover, XDP VIP", &l4_load.finish(), stopped_at);
    assert!(bed.e().cli(&["status"]).status.success(), "the old edgelb answers");
    assert!(scrape(&bed).contains("edgelb_vip_packets_total"));
    sees_backend_2_die(&mut bed, "the controller");
}

/// Waits (at most 10 s) until the edgelb answering scrapes counts `n` client connections open
/// on the L7 VIP web7 (`edgelb_l7_active_connections`, counted from accept to close).
fn wait_l7_connections(bed: &Bed, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(bed);
        if metric(&text, "edgelb_l7_active_connections", "vip=\"web7\"") == f64::from(n) {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} connections open on web7:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An L7 request from the client namespace with half its head sent: it keeps the process that
/// accepted it draining until [`BegunRequest::finish`] sends the rest (and checks the answer).
struct BegunRequest(std::net::TcpStream);

impl BegunRequest {
    fn to(bed: &Bed, l7: SocketAddr) -> BegunRequest {
        use std::io::Write;
        netns::in_netns(&bed.tb.names.client, || {
            let mut s = std::net::TcpStream::connect(l7).expect("connect to the L7 VIP");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /pending HTTP/1.1\r\nHost: t\r\n").unwrap();
            BegunRequest(s)
        })
        .unwrap()
    }

    fn finish(mut self) {
        use std::io::{Read, Write};
        self.0.write_all(b"\r\n").unwrap();
        let mut got = String::new();
        let _ = self.0.read_to_string(&mut got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    }
}

/// Hands the bed's edgelb over to a new `edgelb run --takeover` while a request the old one
/// accepted is pending (half its head sent), and returns once the old process's log says
/// `until`: the old edgelb, its process (guarded: a failed assertion stops it) and the request.
/// The earlier connections are given back first, so that the one counted next is this one.
fn take_over_with_a_request_pending(
    bed: &mut Bed,
    l7: SocketAddr,
    until: &str,
) -> (Edgelb, Guarded, BegunRequest) {
    wait_l7_connections(bed, 0);
    let pending = BegunRequest::to(bed, l7);
    wait_l7_connections(bed, 1);
    let mut old = bed.edgelb.take().unwrap();
    let mut new = Edgelb::spawn_takeover(&old.ns, &old.config, &old.log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !old.log().contains(until) {
        assert!(Instant::now() < deadline, "no handover; log:\n{}", old.log());
        if let Some(st) = new.child.as_mut().unwrap().exited() {
            panic!("edgelb --takeover exited: {st}; log:\n{}", new.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bed.edgelb = Some(new);
    let child = old.child.take().unwrap();
    (old, child, pending)
}

/// SIGTERMs the bed's edgelb while a request it accepted is pending, and returns once it
/// drains: the edgelb, its process (guarded) and the request.
fn stop_with_a_request_pending(bed: &mut Bed, l7: SocketAddr) -> (Edgelb, Guarded, BegunRequest) {
    wait_l7_connections(bed, 0);
    let pending = BegunRequest::to(bed, l7);
    wait_l7_connections(bed, 1);
    let mut e = bed.edgelb.take().unwrap();
    let mut child = e.child.take().unwrap();
    child.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !e.log().contains("L7 proxy: draining") {
        assert!(Instant::now() < deadline, "no drain; log:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    (e, child, pending)
}

/// While the old process of a takeover finishes its requests in flight, scrapes reach only the
/// new one: both hold the same listening socket, and if both answered, every counter would jump
/// between two values (Prometheus reads each drop as a counter reset).
#[test]
fn after_a_takeover_only_the_new_edgelb_answers_scrapes() {
    let Some(mut bed) = Bed::up("takeover-scrape", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    // The old process's count of answered L7 requests; the new one starts from zero.
    let answered = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("edgelb_l7_requests_total{"))
            .filter(|l| l.contains("vip=\"web7\"") && l.contains("class=\"2xx\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = answered(&scrape(&bed));
    assert!(before > 0, "the old edgelb answered the L7 VIP");
    // A request that has begun (half its head sent) keeps the old process draining after the
    // handover: it is answered by the process that accepted it.
    let (_old, mut old_child, pending) =
        take_over_with_a_request_pending(&mut bed, l7, "the new edgelb serves");
    // The old process is still there, draining: every scrape is the new one's.
    for i in 0..30 {
        let text = scrape(&bed);
        assert!(answered(&text) < before, "scrape {i} answered by the old edgelb:\n{text}");
    }
    assert!(old_child.exited().is_none(), "the old edgelb was still draining");
    // Its request in flight is answered, then it exits.
    pending.finish();
    old_child.wait(Duration::from_secs(10));
}

/// While a stopping edgelb finishes its L7 requests in flight, it still answers scrapes (the
/// controller thread used to wait for the drain, and every scrape timed out into a 503).
#[test]
fn a_stopping_edgelb_answers_scrapes_while_it_drains() {
    let Some(mut bed) = Bed::up("stop-scrape", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    // A request that has begun keeps the proxy draining.
    let (e, mut child, pending) = stop_with_a_request_pending(&mut bed, l7);
    for _ in 0..3 {
        let t = Instant::now();
        assert!(scrape(&bed).contains("edgelb_vip_packets_total"));
        assert!(t.elapsed() < Duration::from_secs(2), "a scrape took {:?}", t.elapsed());
    }
    assert!(child.exited().is_none(), "still draining");
    pending.finish();
    let st = child.wait(Duration::from_secs(30));
    assert!(st.success(), "edgelb exit status {st}");
    drop(e);
}

/// A stopping edgelb closes its L7 listeners as its drain starts: a new connection to the VIP is
/// refused (or, taken into the backlog at that very moment, reset) at once, so that its client
/// fails fast and tries elsewhere, while the request in flight is still answered. The proxy kept
/// a descriptor of every listener (to hand over to a takeover) until the drain ended, so the
/// kernel went on completing handshakes nobody accepted: a new client connected at once and
/// then hung until the drain deadline reset it (`node.l7_drain_timeout_ms`, 30 s).
#[test]
fn a_stopping_edgelb_refuses_new_l7_connections_at_once() {
    use std::io::{ErrorKind, Read, Write};
    let Some(mut bed) = Bed::up("stop-refuse", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let (e, mut child, pending) = stop_with_a_request_pending(&mut bed, l7);
    let t = Instant::now();
    // What a new client gets: refused, or connected and then closed on, within the second it
    // is given; never a connection left waiting. (One the proxy took just as the drain began,
    // the log line a moment before the accept loops see the stop, is served: the next is not.)
    let new_client = || -> Result<String, String> {
        let mut s = match std::net::TcpStream::connect_timeout(&l7, TIMEOUT) {
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => return Ok("refused".into()),
            Err(err) => return Err(format!("connect: {err}")),
            Ok(s) => s,
        };
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(format!("connected, and no answer nor close within {TIMEOUT:?}"))
            }
            Err(err) => Ok(format!("connected, then {err}")),
            Ok(_) if got.is_empty() => Ok("connected, then closed".into()),
            Ok(_) => Ok(format!("served: {:?}", String::from_utf8_lossy(&got))),
        }
    };
    let outcome = loop {
        let outcome = netns::in_netns(&bed.tb.names.client, new_client).unwrap();
        match &outcome {
            Ok(o) if o.starts_with("served") && t.elapsed() < Duration::from_millis(500) => {
                eprintln!("a new connection as the drain began: {o}");
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => break outcome,
        }
    };
    let took = t.elapsed();
    eprintln!("a new connection during the drain: {outcome:?} in {} ms", took.as_millis());
    let outcome = outcome.unwrap_or_else(|err| panic!("{err}; log:\n{}", e.log()));
    assert!(!outcome.starts_with("served"), "{outcome} {took:?} into the drain");
    assert!(took < Duration::from_secs(2), "{outcome} only after {took:?}");
    // The drain goes on for the request in flight, which is answered; then the process exits.
    assert!(child.exited().is_none(), "still draining:\n{}", e.log());
    pending.finish();
    let st = child.wait(Duration::from_secs(10));
    assert!(st.success(), "edgelb exit status {st}");
    drop(e);
}

/// The old process of a takeover, draining its requests in flight, ends the drain on a stop
/// signal, as a stopping edgelb does (it used to take no signal, and only SIGKILL ended a drain
/// of up to node.l7_drain_timeout_ms).
#[test]
fn a_stop_signal_ends_the_drain_of_a_takeovers_old_process() {
    let Some(mut bed) = Bed::up("takeover-stop", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let (old, mut old_child, pending) =
        take_over_with_a_request_pending(&mut bed, l7, "L7 proxy: draining");
    assert!(old_child.exited().is_none(), "the old edgelb drains its request");
    // A SIGHUP (a reload meant for the edgelb in charge) no longer reloads anything here: it
    // is passed on to the new one, whose answer is logged.
    old_child.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !old.log().contains("SIGHUP after the handover: the new edgelb reloaded") {
        assert!(Instant::now() < deadline, "the SIGHUP was not passed on; log:\n{}", old.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(old_child.exited().is_none(), "a SIGHUP does not end the drain");
    old_child.signal(libc::SIGTERM);
    // Not the 30 s of node.l7_drain_timeout_ms.
    let st = old_child.wait(Duration::from_secs(5));
    assert!(st.success(), "old edgelb exit status {st}");
    assert!(old.log().contains("closing the rest now"), "{}", old.log());
    // The new one serves on.
    drop(pending);
    bed.wait_for(l7);
}

/// Reads one HTTP response with a Content-Length from `s`: its status line and headers (names
/// lowercase), and its body.
fn read_one_response(s: &mut std::net::TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            let got = String::from_utf8_lossy(&head).into_owned();
            return Err(std::io::Error::other(format!("the end of the stream after {got:?}")));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok((head, body))
}

/// The old process of a takeover keeps a client keep-alive connection idle at the handover
/// open: the client's next request on that same connection (a bare `http.client` loop sends it
/// without looking for a close) is answered, 200 with `Connection: close`, and the connection
/// closes after it. The old process then exits at once, its drain over, far from its 20 s
/// deadline. It closed the connection as its drain began, and that request got an end of
/// stream.
#[test]
fn a_takeovers_old_process_answers_the_next_request_of_an_idle_keep_alive_connection() {
    use std::io::{Read, Write};
    let Some(mut bed) = Bed::up("takeover-idle", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    // A drain deadline far beyond what the test waits for.
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let text = text.replacen("[node]\n", "[node]\nl7_drain_timeout_ms = 20000\n", 1);
    std::fs::write(&bed.cfg_path, text).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(bed.cfg().node.l7_drain_timeout, Duration::from_secs(20));
    wait_l7_connections(&bed, 0);
    // One request on a keep-alive connection, which then stays idle.
    let mut conn = netns::in_netns(&bed.tb.names.client, || {
        let s = std::net::TcpStream::connect(l7).expect("connect to the L7 VIP");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    })
    .unwrap();
    conn.write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let (head, _) = read_one_response(&mut conn).expect("the first answer");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: keep-alive"), "{head}");
    wait_l7_connections(&bed, 1);
    let mut old = bed.edgelb.take().unwrap();
    let mut new = Edgelb::spawn_takeover(&old.ns, &old.config, &old.log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !old.log().contains("L7 proxy: draining") {
        assert!(Instant::now() < deadline, "no handover; log:\n{}", old.log());
        if let Some(st) = new.child.as_mut().unwrap().exited() {
            panic!("edgelb --takeover exited: {st}; log:\n{}", new.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bed.edgelb = Some(new);
    let mut old_child = old.child.take().unwrap();
    let log = old.log();
    let draining = log.lines().find(|l| l.contains("L7 proxy: draining")).unwrap();
    assert!(draining.contains("idle_kept=1"), "{draining}");
    // Well into the drain: a close at its start would have reached the client by now.
    std::thread::sleep(Duration::from_millis(500));
    let waited = old_child.exited().is_none();
    conn.write_all(b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let (head, body) = read_one_response(&mut conn)
        .unwrap_or_else(|e| panic!("the second request on the same connection: {e}"));
    let answered = Instant::now();
    assert!(waited, "the old edgelb waited for the idle connection");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(String::from_utf8_lossy(&body).starts_with("backend-"), "{body:?}");
    let mut rest = Vec::new();
    let end = conn.read_to_end(&mut rest).map_err(|e| e.kind());
    assert_eq!(end, Ok(0), "the connection closes after the answer");
    // Its last connection gone, the old process exits: not at the drain's deadline.
    let st = old_child.wait(Duration::from_secs(3));
    assert!(st.success(), "old edgelb exit status {st}");
    eprintln!("the old edgelb exited {} ms after the answer", answered.elapsed().as_millis());
    assert!(!old.log().contains("L7 drain deadline passed"), "{}", old.log());
    // The new one serves.
    bed.wait_for(l7);
    drop(old);
}

/// A stop signal to an edgelb handing over ends it within moments, whatever the process taking
/// over does: it used to go unheeded while the old process waited for the new one's start (up
/// to 2 min). Before the new one's commit, the old one exits leaving the data plane as it wrote
/// it, and the new one can no longer commit; after, it exits leaving the data plane to the new
/// one. Either way XDP balances throughout, and the next edgelb adopts the data plane. The
/// process taking over is played by the test: it asks for the handover, commits or not, and
/// then goes quiet, as a start that hangs would.
#[test]
fn a_stop_signal_ends_a_stalled_handover() {
    let Some(mut bed) = Bed::up("handover-stall", &[1, 2, 3]) else { return };
    let socket = bed.cfg().node.admin_socket;
    for (round, committed) in [false, true].into_iter().enumerate() {
        let load = bed.load(Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(500));
        let mut e = bed.edgelb.take().unwrap();
        let mut old = e.child.take().unwrap();
        let mut taking =
            edgelb::admin::handover(&socket).expect("handover").expect("the edgelb answers");
        if committed {
            edgelb::admin::commit(&mut taking.conn).expect("the running edgelb says go");
        }
        let signalled = Instant::now();
        old.signal(libc::SIGTERM);
        let st = old.wait(Duration::from_secs(10));
        eprintln!(
            "committed: {committed}: exited {} ms after SIGTERM",
            signalled.elapsed().as_millis()
        );
        assert!(st.success(), "exit status {st}; log:\n{}", e.log());
        let log = e.log();
        if committed {
            assert!(log.contains("the data plane is its"), "{log}");
        } else {
            assert!(log.contains("it can no longer commit"), "{log}");
            assert!(
                edgelb::admin::commit(&mut taking.conn).is_err(),
                "the stalled process could still commit"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        served_throughout(
            &format!("stop during a handover (committed: {committed})"),
            &load.finish(),
            signalled,
        );
        // Its sockets closed, as a process taking over that gives up would.
        drop(taking);
        bed.edgelb = Some(Edgelb::start(&e.ns, &e.config, &e.log));
        let adopted = bed.e().log().matches("left the data plane running: adopting it").count();
        assert_eq!(adopted, round + 1, "{}", bed.e().log());
    }
}

/// A stopping edgelb answers `status` while it drains and refuses other commands with the
/// reason (both used to wait for the drain's end), and a second SIGTERM ends the drain at once
/// (the operator who will not wait for a long download), as with nginx and HAProxy.
#[test]
fn a_second_stop_signal_ends_the_drain() {
    let Some(mut bed) = Bed::up("stop-twice", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let (e, mut child, pending) = stop_with_a_request_pending(&mut bed, l7);
    // A SIGHUP neither ends the drain nor goes unsaid.
    child.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !e.log().contains("SIGHUP ignored: edgelb is stopping") {
        assert!(Instant::now() < deadline, "the SIGHUP was not said; log:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let out = e.cli(&["status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = e.cli(&["drain", "198.18.0.11"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("stopping"), "{said}");
    assert!(t.elapsed() < Duration::from_secs(5), "commands waited {:?}", t.elapsed());
    assert!(child.exited().is_none(), "still draining");
    child.signal(libc::SIGTERM);
    // Not the 30 s of node.l7_drain_timeout_ms.
    let st = child.wait(Duration::from_secs(5));
    assert!(st.success(), "edgelb exit status {st}");
    assert!(e.log().contains("closing the rest now"), "{}", e.log());
    drop(pending);
    drop(e);
}

/// `edgelb stop` sent while a SIGTERM's drain runs (`systemctl stop`, then `edgelb stop` to
/// take the balancer off the node) waits for the process to exit and then removes the data
/// plane it leaves, as it does once the process is gone: it used to be refused at once ("try
/// again once it has exited"), failing the operator's script.
#[test]
fn stop_during_a_stop_signals_drain_waits_and_removes_the_data_plane() {
    let Some(mut bed) = Bed::up("stop-in-drain", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let (e, mut child, pending) = stop_with_a_request_pending(&mut bed, l7);
    let (mut stop, rx) = stop_in_background(&bed);
    let said = rx.recv_timeout(Duration::from_secs(10)).expect("stop says it waits");
    assert!(
        said.contains("already stopping") && said.contains("removing the data plane"),
        "{said}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(stop.try_wait().unwrap().is_none(), "edgelb stop waits for the drain");
    assert!(bed.cfg().node.pin_dir.exists(), "nothing removed while the process runs");
    // The request ends, the drain with it; stop sees the process gone and removes its pins.
    pending.finish();
    let st = child.wait(Duration::from_secs(10));
    assert!(st.success(), "edgelb exit status {st}");
    let status = stop_exits_within(&mut stop, Duration::from_secs(15), "edgelb stop still waits");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "edgelb stop: {status}; {rest:?}");
    assert!(!bed.cfg().node.pin_dir.exists(), "the data plane is gone; {rest:?}");
    drop(e);
}

/// A stopping edgelb goes on following health while its L7 proxy drains: a backend that dies
/// meanwhile is logged DOWN, shows unhealthy and leaves the XDP VIP's ring (a new flow of one of
/// its clients reaches another backend), and `status` shows the L7 VIP's requests. The drain used
/// to take no health verdict in (a dead backend kept its flows for as long as the drain lasted,
/// up to `node.l7_drain_timeout_ms`) and `status` to show 0 requests for every L7 VIP.
#[test]
fn health_verdicts_and_l7_status_go_on_while_a_stop_drains() {
    let Some(mut bed) = Bed::up("drain-health", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    netns::in_netns(&bed.tb.names.client, || {
        for _ in 0..5 {
            servers::http_get(None, l7, TIMEOUT).expect("a request through the proxy");
        }
    })
    .unwrap();
    let web7 = |st: &Status| st.vips.iter().find(|v| v.name == "web7").expect("web7").clone();
    let before = web7(&bed.e().status()).l7_requests;
    assert!(before >= 5, "the proxy counted the requests: {before}");
    let cfg = bed.cfg();
    let client = (0..300)
        .map(|n| IpAddr::V4(testbed::pool_addr(n)))
        .find(|c| backend_name(&cfg, "web", *c) == "backend-2")
        .expect("a client of backend-2");
    let (e, mut child, pending) = stop_with_a_request_pending(&mut bed, l7);
    let draining = web7(&e.status());
    assert_eq!(draining.l7_requests, before, "status while draining: {draining:?}");
    let per_backend: u64 = draining.backends.iter().map(|b| b.l7_requests).sum();
    assert_eq!(per_backend, before, "status while draining: {draining:?}");

    let killed = Instant::now();
    bed.kill_backend(2);
    // The failover bound, with slack for a slow machine (each status poll starts a process).
    let limit = INTERVAL * (FALL + 1) + Duration::from_secs(3);
    while e.healthy("web", "198.18.0.12") {
        assert!(
            killed.elapsed() < limit,
            "no health verdict taken in during the drain ({:?} after the kill); log:\n{}",
            killed.elapsed(),
            e.log()
        );
        assert!(child.exited().is_none(), "edgelb exited before its drain ended:\n{}", e.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "backend-2 shown DOWN {} ms after the kill, during the drain",
        killed.elapsed().as_millis()
    );
    let log = e.log();
    let during = &log[log.find("L7 proxy: draining").expect("the drain is logged")..];
    assert!(
        during.lines().any(|l| l.contains("backend DOWN") && l.contains("198.18.0.12")),
        "{during}"
    );
    let web = e.status().vips.into_iter().find(|v| v.name == "web").expect("web");
    let dead = web.backends.iter().find(|b| b.address.to_string() == "198.18.0.12").unwrap();
    assert_eq!(dead.ring_share, 0.0, "{web:?}");
    // The maps follow: a new flow of backend-2's client reaches another backend.
    let got = netns::in_netns(&bed.tb.names.client, || {
        servers::http_get(
            Some(SocketAddr::new(client, 0)),
            SocketAddr::new(IpAddr::V4(testbed::VIP), 80),
            TIMEOUT,
        )
    })
    .unwrap();
    assert!(got.as_ref().is_ok_and(|b| b != "backend-2"), "{client}: {got:?}");
    // XDP forwards on during the drain, and `status` gives that flow's packet rate: the counters
    // are sampled as in the serving loop (sampling used to stop at the drain's start, and
    // `status` gave the rates of then for as long as the drain lasted).
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let web = e.status().vips.into_iter().find(|v| v.name == "web").expect("web");
        if web.pps > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no packet rate during the drain: {web:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(child.exited().is_none(), "still draining");
    // The request in flight is answered, and the drain ends with it.
    pending.finish();
    let st = child.wait(Duration::from_secs(10));
    assert!(st.success(), "edgelb exit status {st}");
    drop(e);
}

/// `edgelb stop --config` of `bed`, started in the background, with its stderr's lines as they
/// come.
fn stop_in_background(bed: &Bed) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let mut stop = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(["stop", "--config"])
        .arg(&bed.cfg_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("edgelb stop");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = stop.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (stop, rx)
}

/// A controller killed while it drains (a SIGKILL after a drain longer than the service
/// manager's stop timeout) never removes its admin socket: an `edgelb stop` waiting for it
/// sees the process gone and the socket refusing, and goes on to remove the data plane, rather
/// than wait for its whole timeout and fail with the data plane left.
#[test]
fn stop_sees_a_controller_killed_in_its_drain_gone() {
    let Some(mut bed) = Bed::up("stop-killed", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let (e, mut child, pending) = stop_with_a_request_pending(&mut bed, l7);
    let (mut stop, rx) = stop_in_background(&bed);
    let said = rx.recv_timeout(Duration::from_secs(10)).expect("stop says it waits");
    assert!(said.contains("already stopping"), "{said}");
    child.signal(libc::SIGKILL);
    child.wait(Duration::from_secs(10));
    assert!(bed.cfg().node.admin_socket.exists(), "a killed controller leaves its socket");
    let status = stop_exits_within(
        &mut stop,
        Duration::from_secs(10),
        "edgelb stop still waits for a killed controller",
    );
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "edgelb stop: {status}; {rest:?}");
    assert!(!bed.cfg().node.pin_dir.exists(), "the data plane is gone; {rest:?}");
    drop(pending);
    drop(e);
}

/// The exit status of a background `edgelb stop` ([`stop_in_background`]) once it exits;
/// panics with `still` if it has not within `limit`.
fn stop_exits_within(
    stop: &mut std::process::Child,
    limit: Duration,
    still: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = stop.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "{still}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `edgelb stop` waits as long as the running controller may drain its L7 requests (its answer
/// says how long), not as long as the file on disk says by then: with the file edited to a short
/// drain, it used to give up while the controller still drained, and say it was still stopping.
#[test]
fn stop_waits_for_the_running_drain_not_the_files() {
    let Some(mut bed) = Bed::up("stop-drain", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    // The running controller keeps its 30 s default; the file now says 1 s.
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let edited = text.replace("[node]\n", "[node]\nl7_drain_timeout_ms = 1000\n");
    assert_ne!(edited, text);
    std::fs::write(&bed.cfg_path, edited).unwrap();
    wait_l7_connections(&bed, 0);
    let pending = BegunRequest::to(&bed, l7);
    wait_l7_connections(&bed, 1);
    let mut e = bed.edgelb.take().unwrap();
    let mut child = e.child.take().unwrap();
    let (mut stop, rx) = stop_in_background(&bed);
    let said = rx.recv_timeout(Duration::from_secs(10)).expect("stop says why it waits");
    assert!(said.contains("up to 30000 ms"), "{said}");
    // The request ends, the drain with it, and stop sees the controller gone.
    pending.finish();
    let status = stop_exits_within(&mut stop, Duration::from_secs(15), "edgelb stop still waits");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "edgelb stop: {status}; {rest:?}");
    let st = child.wait(Duration::from_secs(5));
    assert!(st.success(), "edgelb exit status {st}");
    drop(e);
}

/// Clients pipelining scrapes on several connections do not hold the controller: admin
/// commands are still answered (scrapes waiting together share one rendering).
#[test]
fn a_flood_of_scrapes_does_not_hold_the_controller() {
    use std::io::{BufRead, BufReader, Read, Write};
    let Some(bed) = Bed::up("scrape-flood", &[1, 2, 3]) else { return };
    // A VIP of 2000 backends makes each rendering read thousands of counters, as on a big node.
    let list: Vec<String> = (0..2000u32)
        .map(|i| {
            format!(
                "{{ address = \"198.18.{}.{}\", mac = \"02:ed:00:00:00:10\" }}",
                100 + i / 250,
                1 + i % 250
            )
        })
        .collect();
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let big = format!(
        "{text}\n[[vip]]\nname = \"big\"\naddress = \"198.18.1.1\"\nport = 8080\nbackends = [{}]\n",
        list.join(", ")
    );
    std::fs::write(&bed.cfg_path, big).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stop = Arc::new(AtomicBool::new(false));
    let scrapers: Vec<_> = (0..8)
        .map(|_| {
            let (ns, stop) = (bed.tb.names.lb.clone(), stop.clone());
            std::thread::spawn(move || {
                netns::enter(&ns).expect("balancer netns");
                let s = std::net::TcpStream::connect(("127.0.0.1", 9110)).expect("metrics");
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut answered = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if w.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").is_err() {
                        break;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return answered;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        break;
                    }
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let t = Instant::now();
        let out = bed.e().cli(&["status"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // Held, it would wait as long as the flood lasts (the client's limit is 60 s).
        assert!(t.elapsed() < Duration::from_secs(10), "status took {:?}", t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let answered: u32 = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(answered > 8, "the scrapers were answered too ({answered})");
}

/// After a failed takeover, the old process is in charge again: it answers on its admin
/// socket, serves metrics, and its health checks run (a dead backend leaves).
fn in_charge_again(bed: &mut Bed) {
    let log = bed.e().log();
    assert!(log.contains("edgelb running again"), "{log}");
    assert!(bed.e().cli(&["status"]).status.success(), "the old edgelb answers");
    assert!(scrape(bed).contains("edgelb_vip_packets_total"));
    sees_backend_2_die(bed, "the controller");
}

#[test]
fn a_takeover_that_fails_after_writing_the_maps_gives_the_data_plane_back() {
    let Some(mut bed) = Bed::up("takeover-late", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    // A second interface on the balancer node that another XDP program holds: the new process
    // gets past every check, writes the maps, moves the XDP link of lb0 to its program, and
    // only then fails to attach there.
    let lb = bed.tb.names.lb.clone();
    testbed::sh(&["ip", "-n", &lb, "link", "add", "eltl0", "type", "veth", "peer", "eltl1"])
        .expect("add a veth pair");
    testbed::sh(&["ip", "-n", &lb, "link", "set", "eltl0", "up"]).unwrap();
    let _holder = netns::in_netns(&lb, || {
        let mut aux = edgelb::dataplane::AuxPrograms::load().expect("aux programs");
        let mode = config::XdpAttachMode::Native;
        aux.attach(lb_common::programs::PASS, "eltl0", mode, None).expect("attach");
        aux
    })
    .unwrap();
    // Its config also drops the echo VIP, which the new process removes from the maps.
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let echo_at = text.find("[[vip]]\nname = \"echo\"").expect("the echo VIP");
    let echo_len = text[echo_at + 1..].find("[[vip]]").expect("a VIP after the echo VIP") + 1;
    let text = format!("{}{}", &text[..echo_at], &text[echo_at + echo_len..])
        .replace("interfaces = [\"lb0\"]", "interfaces = [\"lb0\", \"eltl0\"]");
    let stderr = failed_takeover(&bed, "takeover failed late", &text);
    assert!(stderr.contains("`eltl0` already has an XDP program that is not this"), "{stderr}");
    // It did write the maps first.
    assert!(stderr.contains("maps in line with the config"), "{stderr}");
    let log = bed.e().log();
    assert!(log.contains("this one takes the data plane back"), "{log}");
    assert!(log.contains("this edgelb's program is back on its interfaces"), "{log}");
    // The maps hold this process's config again: the echo VIP the new one removed forwards.
    let clients = clients_of(&bed.cfg(), "backend-1", 2);
    for mut conn in echo_conns(&bed, &clients) {
        assert_eq!(conn.backend().expect("echo answer"), "backend-1", "the echo VIP forwards");
    }
    in_charge_again(&mut bed);
}

/// The id of every map pinned in `dir`, by pin name: which maps a restart would adopt.
fn pinned_map_ids(dir: &std::path::Path) -> Vec<(String, u32)> {
    let (mine, _) = edgelb::dataplane::Dataplane::pins_in(dir).expect("pin directory");
    let mut ids: Vec<(String, u32)> = mine
        .iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("link-"))
        .map(|p| {
            let info = aya::maps::MapInfo::from_pin(p).expect("pinned map");
            (p.file_name().unwrap().to_string_lossy().into_owned(), info.id())
        })
        .collect();
    ids.sort();
    ids
}

/// The test config with another connection-table size: maps of another layout, which a process
/// running it cannot adopt.
fn with_other_table_size(text: &str) -> String {
    let from = format!("conntrack_flows_per_cpu = {CT_FLOWS}");
    assert!(text.contains(&from), "the test config sizes its table");
    text.replace(&from, &format!("conntrack_flows_per_cpu = {}", CT_FLOWS * 2))
}

/// A takeover whose config needs maps the running edgelb does not have (connection tables of
/// another size, which it makes anew and fills from the pinned ones), and that fails before it
/// commits (its metrics port taken): the running edgelb stays in charge, and its maps stay
/// pinned (the same map ids), so its next restart adopts them. The new process used to replace
/// the pins with its own maps while it loaded, and the restart then started cold.
#[test]
fn a_takeover_with_another_layout_that_fails_before_the_commit_leaves_the_pins() {
    let Some(mut bed) = Bed::up("takeover-layout", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let pins = bed.cfg().node.pin_dir;
    let before = pinned_map_ids(&pins);
    assert_eq!(before.len(), 13, "{before:?}");
    let squatter = netns::in_netns(&bed.tb.names.lb, || {
        std::net::TcpListener::bind("127.0.0.1:9112").expect("squat the port")
    })
    .unwrap();
    let text = with_other_table_size(&std::fs::read_to_string(&bed.cfg_path).unwrap());
    let text = format!("{text}\n[metrics]\nlisten = \"127.0.0.1:9112\"\n");
    let stderr = failed_takeover(&bed, "failed takeover, other layout", &text);
    drop(squatter);
    assert!(stderr.contains("metrics endpoint 127.0.0.1:9112"), "{stderr}");
    assert!(
        stderr.contains("copying the connection tables pinned at another size"),
        "it saw another size: {stderr}"
    );
    // Copied, but never the running data plane's: no line says the tables were.
    assert!(!stderr.contains("connection tables copied into the new size"), "{stderr}");
    assert_eq!(pinned_map_ids(&pins), before, "the running edgelb's maps stay pinned");
    in_charge_again(&mut bed);
    // Its next restart adopts them.
    let old = bed.edgelb.take().unwrap();
    let (config, ns, log) = (old.config.clone(), old.ns.clone(), old.log.clone());
    old.terminate();
    bed.edgelb = Some(Edgelb::start(&ns, &config, &log));
    assert!(
        bed.e().log().contains("left the data plane running: adopting it"),
        "{}",
        bed.e().log()
    );
    assert_eq!(pinned_map_ids(&pins), before, "the restart adopted the same maps");
    bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
}

/// A takeover whose config needs maps the running edgelb does not have (connection tables of
/// another size), that fails after it committed (and pinned its own maps): the running edgelb
/// takes the data plane back and pins its own maps again, so a restart adopts the maps that
/// were forwarding.
#[test]
fn a_takeover_with_another_layout_that_fails_late_gives_the_pins_back() {
    let Some(mut bed) = Bed::up("takeover-layout-late", &[1, 2, 3]) else { return };
    let l7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    bed.wait_for(l7);
    let pins = bed.cfg().node.pin_dir;
    let before = pinned_map_ids(&pins);
    assert_eq!(before.len(), 13, "{before:?}");
    // A second interface that another XDP program holds: the new process commits, pins its
    // maps, writes them and moves lb0's link to its program, then fails to attach there.
    let lb = bed.tb.names.lb.clone();
    testbed::sh(&["ip", "-n", &lb, "link", "add", "elpl0", "type", "veth", "peer", "elpl1"])
        .expect("add a veth pair");
    testbed::sh(&["ip", "-n", &lb, "link", "set", "elpl0", "up"]).unwrap();
    let _holder = netns::in_netns(&lb, || {
        let mut aux = edgelb::dataplane::AuxPrograms::load().expect("aux programs");
        aux.attach(lb_common::programs::PASS, "elpl0", config::XdpAttachMode::Native, None)
            .expect("attach");
        aux
    })
    .unwrap();
    let text = with_other_table_size(&std::fs::read_to_string(&bed.cfg_path).unwrap())
        .replace("interfaces = [\"lb0\"]", "interfaces = [\"lb0\", \"elpl0\"]");
    let stderr = failed_takeover(&bed, "takeover failed late, other layout", &text);
    assert_eq!(pinned_map_ids(&pins), before, "the running edgelb's maps are pinned again");
    assert!(stderr.contains("`elpl0` already has an XDP program"), "{stderr}");
    assert!(stderr.contains("map pins now name this edgelb's maps"), "it pinned its own: {stderr}");
    let log = bed.e().log();
    assert!(log.contains("this edgelb's program is back on its interfaces"), "{log}");
    in_charge_again(&mut bed);
}

/// The flows the log says a takeover carried over from connection tables of `from` to `to`
/// flows per CPU, and those it dropped (the "connection tables copied into the new size" line).
fn carried_over(log: &str, from: u64, to: u64) -> (u64, u64) {
    let said =
        format!("connection tables copied into the new size, from {from} to {to} flows per CPU: ");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&said)).collect();
    assert_eq!(lines.len(), 1, "one line for the resize: {log}");
    let rest = &lines[0][lines[0].find(&said).unwrap() + said.len()..];
    let count = |after: &str| -> u64 {
        let at = rest.find(after).unwrap_or_else(|| panic!("{after:?} in {rest}"));
        rest[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    (count(" entries carried over"), count(" dropped (new buckets full)"))
}

/// A takeover at another `node.conntrack_flows_per_cpu` carries the connection tables over
/// into tables of the new size: connections that the new file's ring sends elsewhere (a
/// backend added to their VIP) keep their backend through a larger table, and those of a
/// backend the next file drains (only the table keeps a drained backend's flows) through a
/// smaller one; the log says how many flows each copy carried. Such a takeover used to make
/// every map fresh, and those connections broke.
#[test]
fn a_takeover_at_another_table_size_keeps_established_connections() {
    let Some(mut bed) = Bed::up("takeover-resize", &[1, 2]) else { return };
    let grown = with_other_table_size(&config_text(&bed.tag, &[1, 2, 3]));
    let next = Config::parse(&grown, &bed.cfg_path).unwrap();
    let cfg = bed.cfg();
    // Clients of backend 1 whose new flows backend 3 takes once it joins the echo VIP.
    let clients: Vec<IpAddr> = (0..1000)
        .map(|i| IpAddr::V4(testbed::pool_addr(i)))
        .filter(|&c| {
            backend_name(&cfg, "echo", c) == "backend-1"
                && backend_name(&next, "echo", c) == "backend-3"
        })
        .take(6)
        .collect();
    assert_eq!(clients.len(), 6, "clients that backend 3 would take");
    let mut conns = echo_conns(&bed, &clients);
    for c in &mut conns {
        assert_eq!(c.backend().unwrap(), "backend-1");
    }
    std::fs::write(&bed.cfg_path, &grown).unwrap();
    let first = bed.edgelb.take().unwrap();
    bed.edgelb = Some(first.take_over());
    for (i, c) in conns.iter_mut().enumerate() {
        let said = c.ask(&format!("grown {i}")).expect("the connection lives on");
        assert_eq!(said, format!("backend-1:grown {i}"), "connection {i}");
    }
    let (carried, dropped) = carried_over(&bed.e().log(), CT_FLOWS, CT_FLOWS * 2);
    assert!(carried >= clients.len() as u64 && dropped == 0, "{carried} {dropped}");

    // Back to the first size, and backend 1 drained in the echo VIP.
    let text = config_text(&bed.tag, &[1, 2, 3]);
    let echo = text.find("name = \"echo\"").expect("the echo VIP");
    let one = "{ address = \"198.18.0.11\", ";
    let at = echo + text[echo..].find(one).expect("backend 1 in echo") + one.len();
    std::fs::write(&bed.cfg_path, format!("{}weight = 0, {}", &text[..at], &text[at..])).unwrap();
    let second = bed.edgelb.take().unwrap();
    bed.edgelb = Some(second.take_over());
    for (i, c) in conns.iter_mut().enumerate() {
        let said = c.ask(&format!("shrunk {i}")).expect("the connection lives on");
        assert_eq!(said, format!("backend-1:shrunk {i}"), "connection {i}");
    }
    let (carried, dropped) = carried_over(&bed.e().log(), CT_FLOWS * 2, CT_FLOWS);
    assert!(carried >= clients.len() as u64 && dropped == 0, "{carried} {dropped}");
    // New connections of those clients avoid the drained backend: only the table kept them.
    let fresh = echo_conns(&bed, &clients[..1]).pop().unwrap().backend().unwrap();
    assert_ne!(fresh, "backend-1");
}

/// `node.pin_dir` changed while a detached data plane runs: the next start finds the interface
/// held by edgelb's own program, and says so, naming where its link is pinned and what to do,
/// rather than blaming another tool's program. The running data plane is left alone.
#[test]
fn a_changed_pin_dir_is_named_when_the_interface_is_held() {
    let Some(mut bed) = Bed::up("pin-moved", &[1, 2, 3]) else { return };
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
    let old = bed.edgelb.take().unwrap();
    let ns = old.ns.clone();
    old.terminate();
    let old_pins = bed.cfg().node.pin_dir;
    let new_pins = PathBuf::from(format!("{}-moved", old_pins.display()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = edgelb::dataplane::Dataplane::teardown(&self.0);
        }
    }
    let _cleanup = Cleanup(new_pins.clone());
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let from = format!("pin_dir = \"{}\"", old_pins.display());
    assert!(text.contains(&from));
    let text = text.replace(&from, &format!("pin_dir = \"{}\"", new_pins.display()));
    let alt = bed.cfg_path.with_extension(format!("{}.toml", bed.tag));
    std::fs::write(&alt, text).unwrap();
    let out = output_within(run_command(&ns, &alt, &[]), "edgelb run", Duration::from_secs(60));
    let _ = std::fs::remove_file(&alt);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`lb0` already runs edgelb's own XDP balancer"), "{stderr}");
    let link = old_pins.join("link-lb0");
    assert!(stderr.contains(&format!("its link pinned at {}", link.display())), "{stderr}");
    assert!(stderr.contains("node.pin_dir was changed"), "{stderr}");
    assert!(!stderr.contains("is not this edgelb's"), "{stderr}");
    // The detached data plane still balances, and its link is where it was.
    assert!(link.exists());
    bed.wait_for(vip);
}

/// After a restart that took the pinned XDP link over, `status` says the mode XDP runs in as
/// the kernel reports it (native on the testbed's veth), as it does after a fresh attach: it
/// used to say only "adopted".
#[test]
fn status_says_the_attach_mode_after_a_restart() {
    let Some(mut bed) = Bed::up("mode", &[1, 2, 3]) else { return };
    let mode = |bed: &Bed| {
        let st = bed.e().status();
        st.interfaces.iter().find(|(i, _)| i == "lb0").map(|(_, m)| m.clone()).expect("listed")
    };
    assert_eq!(mode(&bed), "native", "a fresh attach on a veth");
    let mut old = bed.edgelb.take().unwrap();
    let (config, ns, log) = (old.config.clone(), old.ns.clone(), old.log.clone());
    let out = old.cli(&["stop", "--detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(old.child.take().unwrap().wait(Duration::from_secs(30)).success());
    bed.edgelb = Some(Edgelb::start(&ns, &config, &log));
    let log = bed.e().log();
    assert!(log.contains("took over the pinned XDP link"), "{log}");
    assert_eq!(mode(&bed), "native", "after the restart took the link over");
    // What the kernel says (`ip -d link`: `xdp` for native, `xdpgeneric` for generic).
    let link = Command::new("ip")
        .args(["-n", &bed.tb.names.lb, "-d", "link", "show", "lb0"])
        .output()
        .expect("ip link show");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("xdp ") && !link.contains("xdpgeneric"), "{link}");
    bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
}

/// A start that fails after attaching, on a node where a detached edgelb left its data plane,
/// leaves that data plane forwarding even when it could not adopt its maps (another binary's
/// layout makes fresh ones; here maps stamped with another layout version, as a rollback
/// finds them): it used to remove every link, the one it had just taken over included, and the
/// VIP went unbalanced.
#[test]
fn a_failed_start_keeps_a_running_data_plane_it_could_not_adopt() {
    let Some(mut bed) = Bed::up("start-late", &[1, 2, 3]) else { return };
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
    bed.wait_for(vip);
    // Detached: the controller exits, its data plane forwards on.
    let mut old = bed.edgelb.take().unwrap();
    let mut child = old.child.take().unwrap();
    child.signal(libc::SIGTERM);
    assert!(child.wait(Duration::from_secs(30)).success());
    // A second interface another XDP program holds: the new process attaches lb0, then fails.
    let lb = bed.tb.names.lb.clone();
    testbed::sh(&["ip", "-n", &lb, "link", "add", "elsl0", "type", "veth", "peer", "elsl1"])
        .expect("add a veth pair");
    testbed::sh(&["ip", "-n", &lb, "link", "set", "elsl0", "up"]).unwrap();
    let _holder = netns::in_netns(&lb, || {
        let mut aux = edgelb::dataplane::AuxPrograms::load().expect("aux programs");
        aux.attach(lb_common::programs::PASS, "elsl0", config::XdpAttachMode::Native, None)
            .expect("attach");
        aux
    })
    .unwrap();
    // Maps written under another map layout version: this build adopts none of them.
    {
        let config = bed.cfg().node.pin_dir.join(lb_common::maps::CONFIG);
        let data = aya::maps::MapData::from_pin(config).expect("the CONFIG pin");
        let mut config: aya::maps::Array<_, lb_common::GlobalConfig> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        let mut c = config.get(&0, 0).unwrap();
        c.maps_version = lb_common::MAPS_VERSION + 1;
        config.set(0, &c, 0).unwrap();
    }
    let text = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let text = text.replace("interfaces = [\"lb0\"]", "interfaces = [\"lb0\", \"elsl0\"]");
    let alt = bed.cfg_path.with_extension(format!("{}.toml", bed.tag));
    std::fs::write(&alt, text).unwrap();
    let out = output_within(run_command(&old.ns, &alt, &[]), "edgelb run", Duration::from_secs(60));
    let _ = std::fs::remove_file(&alt);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("pinned map not re-used"), "the maps were not adopted: {stderr}");
    assert!(stderr.contains("it keeps forwarding"), "{stderr}");
    let pins = bed.cfg().node.pin_dir;
    assert!(pins.join("link-lb0").exists(), "the link of lb0 was removed");
    // The VIP is still balanced.
    bed.wait_for(vip);
    drop(old);
}

/// A backend a reload adds to a health-checked VIP takes no new flow before its check has passed
/// `rise` times: it may not be ready yet (and, were its VIP failing open, it would otherwise take
/// all of it unprobed).
#[test]
fn a_backend_added_by_a_reload_joins_once_its_check_passes() {
    let Some(bed) = Bed::up("joins", &[1, 2, 3]) else { return };
    let full = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let third = ", { address = \"198.18.0.13\", mac = \"02:ed:00:00:00:13\" }";
    assert!(full.contains(third));
    // The first VIP listed is web: without backend-3, then with it again; web7 (L7) likewise.
    let third7 = ", { address = \"198.18.0.13\", port = 80 }";
    assert!(full.contains(third7));
    std::fs::write(&bed.cfg_path, full.replacen(third, "", 1).replacen(third7, "", 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&bed.cfg_path, &full).unwrap();
    // Clients whose flows the ring with backend-3 in it sends to backend-3 (a live server that
    // answers with its name): while its check has not passed, XDP must send them elsewhere.
    let cfg = bed.cfg();
    let homed: Vec<IpAddr> = (0..300)
        .map(|n| IpAddr::V4(testbed::pool_addr(n)))
        .filter(|c| backend_name(&cfg, "web", *c) == "backend-3")
        .take(8)
        .collect();
    assert_eq!(homed.len(), 8, "clients of backend-3");
    let ask = |bed: &Bed| {
        netns::in_netns(&bed.tb.names.client, || {
            let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
            homed
                .iter()
                .map(|c| servers::http_get(Some(SocketAddr::new(*c, 0)), vip, TIMEOUT))
                .collect::<Vec<_>>()
        })
        .unwrap()
    };
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added = Instant::now();
    // The reply says so, for web and for web7 (an L7 VIP, whose backend-3 is held too).
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 backend(s) added take traffic once their health check has passed `rise` times: 1 in VIP `web`, 1 in VIP `web7`"),
        "{said}"
    );
    // Each round of requests is followed by a status: a status that still shows backend-3 down
    // came after every answer of the round, so none of them may be backend-3's (its verdict only
    // goes from down to up here). The ring, not status alone, is what is checked.
    let mut asked_while_out = 0;
    loop {
        let answers = ask(&bed);
        if bed.e().healthy("web", "198.18.0.13") {
            break;
        }
        for (client, r) in homed.iter().zip(&answers) {
            match r {
                Ok(b) => {
                    assert_ne!(b, "backend-3", "{client} reached backend-3 before its check passed")
                }
                Err(e) => panic!("{client} was not served while backend-3 was out: {e}"),
            }
        }
        asked_while_out += answers.len();
        assert!(added.elapsed() < INTERVAL * (RISE + 3), "not back after {:?}", added.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let joined = added.elapsed();
    eprintln!(
        "backend-3 healthy {} ms after the reload; {asked_while_out} requests of its clients served by the others meanwhile",
        joined.as_millis()
    );
    assert!(asked_while_out > 0, "no request was sent while backend-3 was out of the ring");
    assert!(joined >= INTERVAL * (RISE - 1), "joined after {joined:?}");
    // In the ring now: its clients reach it.
    for (client, r) in homed.iter().zip(ask(&bed)) {
        assert_eq!(r.as_deref().ok(), Some("backend-3"), "{client} after the check passed: {r:?}");
    }
    let log = bed.e().log();
    assert!(
        log.contains("backend added: it joins the ring once its health check has passed"),
        "{log}"
    );
}

/// A reload that replaces the live backend of a health-checked VIP while a dead one stays does
/// not hold the new backend down: held, every backend that takes new flows would be down, and the
/// VIP would fail open, onto the dead one too, until the new one passed its check.
#[test]
fn a_reload_that_swaps_the_live_backend_beside_a_dead_one_does_not_fail_open() {
    let Some(mut bed) = Bed::up("swap", &[1, 2, 3]) else { return };
    let full = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let backend = |i: usize| {
        format!(
            "{{ address = \"198.18.0.{}\", mac = \"02:ed:00:00:00:{:02x}\" }}",
            10 + i,
            0x10 + i
        )
    };
    let web = |list: &[usize]| {
        format!("backends = [{}]", list.iter().map(|&i| backend(i)).collect::<Vec<_>>().join(", "))
    };
    // The first VIP listed is web: backends 1 and 2, then 2 and 3.
    assert!(full.contains(&web(&[1, 2, 3])));
    std::fs::write(&bed.cfg_path, full.replacen(&web(&[1, 2, 3]), &web(&[1, 2]), 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    bed.kill_backend(2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.e().healthy("web", "198.18.0.12") {
        assert!(Instant::now() < deadline, "backend 2 never seen dead");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&bed.cfg_path, full.replacen(&web(&[1, 2, 3]), &web(&[2, 3]), 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reloaded = Instant::now();
    // Until well past the time backend 3's check would take to pass: never failing open.
    while reloaded.elapsed() < INTERVAL * (RISE + 2) {
        let status = bed.e().status();
        let v = status.vips.iter().find(|v| v.name == "web").expect("web in status");
        let up = |a: &str| v.backends.iter().find(|b| b.address.to_string() == a).unwrap().healthy;
        assert!(!v.fail_open, "web failed open after the swap: {v:?}\n{}", bed.e().log());
        assert!(up("198.18.0.13") && !up("198.18.0.12"), "{v:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = bed.e().log();
    assert!(!log.contains("every backend is down"), "{log}");
}

/// A takeover is handed whether the VIP fails open and the weights, and decides as a reload to
/// its file does: a file that sets the live backend to weight 0 beside a dead one while adding
/// another starts the new one up. Inferring, as before, it held the new one and failed open
/// onto the dead one until the new one passed its check.
#[test]
fn a_takeover_that_sets_the_live_backend_to_0_beside_a_dead_one_does_not_fail_open() {
    let Some(mut bed) = Bed::up("zero", &[1, 2, 3]) else { return };
    let full = std::fs::read_to_string(&bed.cfg_path).unwrap();
    let backend = |i: usize, weight: &str| {
        format!(
            "{{ address = \"198.18.0.{}\", mac = \"02:ed:00:00:00:{:02x}\"{weight} }}",
            10 + i,
            0x10 + i
        )
    };
    let all = [1, 2, 3].map(|i| backend(i, "")).join(", ");
    // The first VIP listed is web: backends 1 and 2, then 1 at weight 0, 2 and 3.
    assert!(full.contains(&all));
    let two = [1, 2].map(|i| backend(i, "")).join(", ");
    std::fs::write(&bed.cfg_path, full.replacen(&all, &two, 1)).unwrap();
    let out = bed.e().cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    bed.kill_backend(2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.e().healthy("web", "198.18.0.12") {
        assert!(Instant::now() < deadline, "backend 2 never seen dead");
        std::thread::sleep(Duration::from_millis(50));
    }
    let zero = format!("{}, {}, {}", backend(1, ", weight = 0"), backend(2, ""), backend(3, ""));
    std::fs::write(&bed.cfg_path, full.replacen(&all, &zero, 1)).unwrap();
    let first = bed.edgelb.take().unwrap();
    bed.edgelb = Some(first.take_over());
    let taken = Instant::now();
    // Until well past the time backend 3's check would take to pass: never failing open.
    while taken.elapsed() < INTERVAL * (RISE + 2) {
        let status = bed.e().status();
        let v = status.vips.iter().find(|v| v.name == "web").expect("web in status");
        let up = |a: &str| v.backends.iter().find(|b| b.address.to_string() == a).unwrap().healthy;
        assert!(!v.fail_open, "web failed open after the takeover: {v:?}\n{}", bed.e().log());
        assert!(up("198.18.0.13") && !up("198.18.0.12"), "{v:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = bed.e().log();
    assert!(!log.contains("--takeover: backend added"), "{log}");
    assert!(!log.contains("every backend is down"), "{log}");
}

/// An interface deleted under a running edgelb takes XDP with it: the controller notices within
/// a few seconds and says so in the log, in `status` and in `edgelb_xdp_attached`, where
/// everything else (health checks through the kernel) stays green.
#[test]
fn an_interface_lost_under_a_running_edgelb_is_reported() {
    let Some(mut bed) = Bed::up("lost", &[1, 2, 3]) else { return };
    let lb = bed.tb.names.lb.clone();
    testbed::sh(&[
        "ip", "-n", &lb, "link", "add", "elost0", "type", "veth", "peer", "name", "elost1",
    ])
    .unwrap();
    testbed::sh(&["ip", "-n", &lb, "link", "set", "elost0", "up"]).unwrap();
    let text = std::fs::read_to_string(&bed.cfg_path)
        .unwrap()
        .replace("interfaces = [\"lb0\"]", "interfaces = [\"lb0\", \"elost0\"]");
    std::fs::write(&bed.cfg_path, text).unwrap();
    // A restart (without refusing a connection) attaches to both.
    let first = bed.edgelb.take().unwrap();
    bed.edgelb = Some(first.take_over());
    let mode = |bed: &Bed| {
        let st = bed.e().status();
        st.interfaces.iter().find(|(i, _)| i == "elost0").map(|(_, m)| m.clone()).expect("listed")
    };
    let attached = |bed: &Bed| metric(&scrape(bed), "edgelb_xdp_attached", "interface=\"elost0\"");
    assert!(!mode(&bed).starts_with("LOST"), "{}", mode(&bed));
    assert_eq!(attached(&bed), 1.0);
    // Renamed, XDP stays on the device: said as such, not as lost.
    let link = |args: &[&str]| {
        let mut cmd = vec!["ip", "-n", &lb, "link", "set"];
        cmd.extend_from_slice(args);
        testbed::sh(&cmd).unwrap();
    };
    link(&["elost0", "down"]);
    link(&["elost0", "name", "elren0"]);
    let renamed = Instant::now();
    while !mode(&bed).contains("renamed to elren0") {
        assert!(renamed.elapsed() < Duration::from_secs(5), "status still says {}", mode(&bed));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(attached(&bed), 1.0, "still balancing on the device");
    assert!(bed.e().log().contains("the interface was renamed"), "{}", bed.e().log());
    link(&["elren0", "name", "elost0"]);
    link(&["elost0", "up"]);
    while mode(&bed).contains("renamed") {
        assert!(renamed.elapsed() < Duration::from_secs(10), "status still says {}", mode(&bed));
        std::thread::sleep(Duration::from_millis(100));
    }
    testbed::sh(&["ip", "-n", &lb, "link", "del", "elost0"]).unwrap();
    let deleted = Instant::now();
    while !mode(&bed).starts_with("LOST") {
        assert!(deleted.elapsed() < Duration::from_secs(5), "status still says {}", mode(&bed));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(attached(&bed), 0.0);
    assert_eq!(metric(&scrape(&bed), "edgelb_xdp_attached", "interface=\"lb0\""), 1.0);
    let log = bed.e().log();
    assert!(log.contains("XDP is no longer on this interface"), "{log}");
    assert!(mode(&bed).contains("attached again once the interface is back"), "{}", mode(&bed));
    // Made again (another device, another index): attached again, by the running controller.
    testbed::sh(&[
        "ip", "-n", &lb, "link", "add", "elost0", "type", "veth", "peer", "name", "elost1",
    ])
    .unwrap();
    testbed::sh(&["ip", "-n", &lb, "link", "set", "elost0", "up"]).unwrap();
    let made = Instant::now();
    while attached(&bed) != 1.0 {
        assert!(made.elapsed() < Duration::from_secs(5), "status says {}", mode(&bed));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mode(&bed), "native");
    assert!(xdp_prog_on(&lb, "elost0").is_some(), "the program is on the new device");
    assert!(bed.e().log().contains("XDP attached again"), "{}", bed.e().log());
}

/// The id of the XDP program `dev` in namespace `ns` runs, as `ip -d link` shows it
/// (`prog/xdp id N`); `None` when it runs none.
fn xdp_prog_on(ns: &str, dev: &str) -> Option<u32> {
    let out = Command::new("ip").args(["-n", ns, "-d", "link", "show", dev]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = &text[text.find("prog/xdp id ")? + "prog/xdp id ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The XDP link's pin removed by hand (`rm <pin_dir>/link-lb0`) under a running edgelb: the
/// link stays attached, as the process holds it open, and the pin is made again within seconds
/// (with a warning), so that the next start takes the link over. The pin alone used to keep the
/// link: XDP left the interface with it, while `edgelb_xdp_attached` stayed 1 and `status`
/// said "native", and a reload said "no change".
#[test]
fn a_removed_link_pin_neither_detaches_xdp_nor_stays_removed() {
    let Some(mut bed) = Bed::up("repin", &[1, 2, 3]) else { return };
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
    let lb = bed.tb.names.lb.clone();
    let pin = bed.cfg().node.pin_dir.join("link-lb0");
    let prog = xdp_prog_on(&lb, "lb0").expect("lb0 runs the balancer");
    std::fs::remove_file(&pin).expect("remove the link pin");
    let removed = Instant::now();
    while !pin.exists() {
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "the pin was not made again; lb0 runs {:?}; log:\n{}",
            xdp_prog_on(&lb, "lb0"),
            bed.e().log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(bed.e().log().contains("pinned it again"), "{}", bed.e().log());
    assert_eq!(xdp_prog_on(&lb, "lb0"), Some(prog), "XDP stayed on lb0");
    assert_eq!(metric(&scrape(&bed), "edgelb_xdp_attached", "interface=\"lb0\""), 1.0);
    bed.wait_for(vip);
    // The pin made again is the link's: a restart takes it over.
    let old = bed.edgelb.take().unwrap();
    bed.edgelb = Some(old.take_over());
    let log = bed.e().log();
    assert!(log.contains("took over the pinned XDP link"), "{log}");
    assert!(!log.contains("attaching afresh"), "{log}");
    bed.wait_for(vip);
}

/// The XDP link's pin removed by hand, and a takeover at once, before the running edgelb's
/// next look (each second) pins it again: the running edgelb pins it again before it answers
/// the handover, and the new one takes the link over. Held open by the running edgelb, the
/// link kept the interface, and the new one's fresh attach was refused (the device held): the
/// takeover failed, and the old one took back over. (Before links were held, removing the pin
/// detached XDP and the takeover attached afresh.)
#[test]
fn a_takeover_right_after_a_link_pin_is_removed_takes_the_link_over() {
    let Some(mut bed) = Bed::up("repin-take", &[1, 2, 3]) else { return };
    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
    let pin = bed.cfg().node.pin_dir.join("link-lb0");
    let repinned = |bed: &Bed| bed.e().log().matches("pinned it again").count();
    // Just after a look has pinned it again, so that the takeover comes well before the next.
    std::fs::remove_file(&pin).expect("remove the link pin");
    let removed = Instant::now();
    while repinned(&bed) == 0 {
        assert!(removed.elapsed() < Duration::from_secs(5), "not pinned again: {}", bed.e().log());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_file(&pin).expect("remove the link pin again");
    let old = bed.edgelb.take().unwrap();
    bed.edgelb = Some(old.take_over());
    let log = bed.e().log();
    assert!(log.contains("took over the pinned XDP link"), "{log}");
    assert!(!log.contains("attaching afresh"), "{log}");
    assert_eq!(repinned(&bed), 2, "pinned again before the handover: {log}");
    assert!(pin.exists(), "the link pinned");
    assert_eq!(metric(&scrape(&bed), "edgelb_xdp_attached", "interface=\"lb0\""), 1.0);
    bed.wait_for(vip);
}

/// A link pin that cannot be made again (the pin directory made read-only: the controller has
/// dropped the capability that let root write there anyway), then `stop --detach` (as
/// SIGTERM): the stop names the interface, in its answer and its log, as XDP leaves it with the
/// process (only a pin keeps a link after it), rather than say that the data plane keeps
/// running, as it did.
#[test]
fn a_detached_stop_names_the_interfaces_whose_links_are_not_pinned() {
    use std::os::unix::fs::PermissionsExt;
    let Some(bed) = Bed::up("unpinned", &[1, 2, 3]) else { return };
    let lb = bed.tb.names.lb.clone();
    let dir = bed.cfg().node.pin_dir.clone();
    /// Makes the pin directory writable again (for the bed's cleanup), however the test ends.
    struct Writable(std::path::PathBuf);
    impl Drop for Writable {
        fn drop(&mut self) {
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        }
    }
    let _writable = Writable(dir.clone());
    assert!(xdp_prog_on(&lb, "lb0").is_some(), "lb0 runs the balancer");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::remove_file(dir.join("link-lb0")).expect("remove the link pin");
    let removed = Instant::now();
    while !bed.e().log().contains("could not be made again") {
        assert!(removed.elapsed() < Duration::from_secs(5), "no failure said: {}", bed.e().log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = bed.e().cli(&["stop", "--detach"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("except on lb0"), "{stdout}");
    let log = bed.e().log();
    let stop = log.lines().find(|l| l.contains("controller stopped")).expect("the stop said");
    assert!(stop.contains("WARN") && stop.contains("lb0"), "{stop}");
    assert!(stop.contains("XDP leaves them as it exits"), "{stop}");
    // As said: XDP left lb0 with the process.
    let stopped = Instant::now();
    while xdp_prog_on(&lb, "lb0").is_some() {
        assert!(stopped.elapsed() < Duration::from_secs(5), "XDP stayed on lb0");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An interface deleted and made again at the index it had (`ip link add ... index N`): its
/// name names that index again, but the program went with the old device. The index alone used
/// to decide, and it was said attached; then a re-created interface, whatever its index, needed
/// a restart. It is found lost (logged) and attached again within seconds, by the running
/// controller, its capabilities dropped: the program on the new device, its link pinned (a
/// restart takes it over), `edgelb_xdp_attached` 1, and traffic through it balanced.
#[test]
fn an_interface_made_again_at_its_index_is_attached_again() {
    let Some(mut bed) = Bed::up("reindex", &[1, 2, 3]) else { return };
    let lb = bed.tb.names.lb.clone();
    let ip = |args: &[&str]| {
        let mut cmd = vec!["ip"];
        cmd.extend_from_slice(args);
        testbed::sh(&cmd).unwrap();
    };
    ip(&["-n", &lb, "link", "add", "eidx0", "type", "veth", "peer", "name", "eidx1"]);
    ip(&["-n", &lb, "link", "set", "eidx0", "up"]);
    let text = std::fs::read_to_string(&bed.cfg_path)
        .unwrap()
        .replace("interfaces = [\"lb0\"]", "interfaces = [\"lb0\", \"eidx0\"]");
    std::fs::write(&bed.cfg_path, text).unwrap();
    let first = bed.edgelb.take().unwrap();
    bed.edgelb = Some(first.take_over());
    let mode = |bed: &Bed| {
        let st = bed.e().status();
        st.interfaces.iter().find(|(i, _)| i == "eidx0").map(|(_, m)| m.clone()).expect("listed")
    };
    let attached = |bed: &Bed| metric(&scrape(bed), "edgelb_xdp_attached", "interface=\"eidx0\"");
    assert_eq!(attached(&bed), 1.0);
    let prog = xdp_prog_on(&lb, "eidx0").expect("eidx0 runs the balancer");
    let out = Command::new("ip").args(["-n", &lb, "-o", "link", "show", "eidx0"]).output().unwrap();
    let index = String::from_utf8_lossy(&out.stdout).split(':').next().unwrap().trim().to_owned();
    index.parse::<u32>().expect("the interface's index");
    ip(&["-n", &lb, "link", "del", "eidx0"]);
    ip(&[
        "-n", &lb, "link", "add", "eidx0", "index", &index, "type", "veth", "peer", "name", "eidx1",
    ]);
    ip(&["-n", &lb, "link", "set", "eidx0", "up"]);
    let made = Instant::now();
    while !bed.e().log().contains("XDP attached again") {
        assert!(
            made.elapsed() < Duration::from_secs(5),
            "not attached again; log:\n{}",
            bed.e().log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = bed.e().log();
    assert!(log.contains("XDP is no longer on this interface"), "{log}");
    assert!(log.contains("all capabilities dropped"), "{log}");
    assert_eq!(xdp_prog_on(&lb, "eidx0"), Some(prog), "the same program, on the new device");
    assert_eq!(mode(&bed), "native");
    assert_eq!(attached(&bed), 1.0);
    assert!(bed.cfg().node.pin_dir.join("link-eidx0").exists());
    // Traffic through the new device is balanced: datagrams to the dns VIP from a namespace
    // behind eidx1 are forwarded (counted) by the program on eidx0.
    struct PeerNs(String);
    impl Drop for PeerNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let peer = PeerNs(format!("elrx{}", std::process::id()));
    ip(&["netns", "add", &peer.0]);
    ip(&["-n", &lb, "link", "set", "eidx1", "netns", &peer.0]);
    ip(&["-n", &peer.0, "addr", "add", "198.18.9.1/24", "dev", "eidx1"]);
    ip(&["-n", &peer.0, "link", "set", "eidx1", "up"]);
    ip(&["-n", &peer.0, "route", "add", "198.18.1.1/32", "dev", "eidx1"]);
    let out = Command::new("ip").args(["-n", &lb, "-o", "link", "show", "eidx0"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = out.split("link/ether ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    ip(&[
        "-n",
        &peer.0,
        "neigh",
        "add",
        "198.18.1.1",
        "lladdr",
        mac,
        "dev",
        "eidx1",
        "nud",
        "permanent",
    ]);
    let dns = || metric(&scrape(&bed), "edgelb_vip_packets_total", "vip=\"dns\"");
    let before = dns();
    let sent = Instant::now();
    while dns() <= before {
        assert!(sent.elapsed() < Duration::from_secs(10), "no datagram through eidx0 forwarded");
        netns::in_netns(&peer.0, || {
            let s = std::net::UdpSocket::bind("198.18.9.1:0").unwrap();
            s.send_to(b"who?", "198.18.1.1:53").unwrap();
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    // The pin made for it is the new link's: a restart takes it over.
    let old = bed.edgelb.take().unwrap();
    bed.edgelb = Some(old.take_over());
    let log = bed.e().log();
    assert!(!log.contains("attaching afresh"), "{log}");
    assert!(xdp_prog_on(&lb, "eidx0").is_some_and(|p| p != prog), "the new edgelb's program");
}

/// `edgelb stop` while no controller answers on the admin socket but one still runs (its socket
/// gone, as during a takeover or after a failed take-back): it refuses, naming the process, and
/// removes nothing, so XDP stays attached under the running controller.
#[test]
fn stop_leaves_the_data_plane_of_a_controller_whose_socket_is_gone() {
    let Some(mut bed) = Bed::up("stop-nosock", &[1, 2, 3]) else { return };
    // A failed assertion stops the controller too: with its socket gone `stop` is refused, and
    // its guard SIGTERMs it by PID (before the bed's own cleanup removes the data plane).
    let pid = bed.e().child.as_ref().unwrap().id();
    let cfg = bed.cfg();
    std::fs::remove_file(&cfg.node.admin_socket).expect("remove the admin socket");
    let out = bed.e().cli(&["stop"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains(&format!("PID {pid} (edgelb)")), "{stderr}");
    assert!(stderr.contains("a controller appears to be running"), "{stderr}");
    assert!(stderr.contains("Nothing was removed"), "{stderr}");
    // The data plane is still there: its pins, XDP on the interface, traffic forwarded.
    let (pins, _) = edgelb::dataplane::Dataplane::pins_in(&cfg.node.pin_dir).unwrap();
    for name in ["link-lb0", "VIPS"] {
        assert!(pins.iter().any(|p| p.ends_with(name)), "pin {name} gone: {pins:?}");
    }
    let link = Command::new("ip")
        .args(["-n", &bed.tb.names.lb, "-d", "link", "show", "lb0"])
        .output()
        .expect("ip link show");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("prog/xdp"), "XDP no longer attached: {link}");
    bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
    // A second controller is refused too: the free socket path does not mean none runs, and two
    // on one data plane would overwrite each other's rings.
    let out = output_within(
        run_command(&bed.e().ns, &bed.cfg_path, &[]),
        "a second edgelb run",
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("PID {pid} (edgelb) holds the data plane")), "{stderr}");
    assert!(!cfg.node.admin_socket.exists(), "the refused one left no admin socket behind");
    bed.wait_for(SocketAddr::new(IpAddr::V4(testbed::VIP), 80));
    bed.edgelb.take().unwrap().terminate();
    // With the controller gone, nothing holds the data plane: `stop` removes it.
    let out = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(["stop", "--config"])
        .arg(&bed.cfg_path)
        .output()
        .expect("run edgelb stop");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (pins, _) = edgelb::dataplane::Dataplane::pins_in(&cfg.node.pin_dir).unwrap();
    assert!(pins.is_empty(), "pins left: {pins:?}");
}

/// A namespace of a test's own with a veth pair: `xa0`, the balancer's interface
/// (198.18.64.2/24, its default route via 198.18.64.1, whose neighbour entry is
/// [`VethBed::GATEWAY_MAC`]), and its peer `xa1`; and a config of one ipip VIP whose backend
/// takes `node.gateway_mac` (`node` is added to the `[node]` table). The interface and its
/// gateway are what the tests change under a running edgelb. All removed on drop (after the
/// edgelb, dropped first by its owner).
struct VethBed {
    ns: String,
    tag: String,
    config: PathBuf,
    log: PathBuf,
}

impl VethBed {
    /// The MAC the kernel's neighbour table gives the default-route gateway at first.
    const GATEWAY_MAC: &'static str = "02:ed:00:00:64:01";

    fn new(name: &str, node: &str) -> VethBed {
        let pid = std::process::id();
        let (ns, tag) = (format!("elbl{pid}-{name}"), format!("{pid}-{name}"));
        testbed::sh(&["ip", "netns", "add", &ns]).expect("ip netns add");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let bed = VethBed {
            ns,
            tag: tag.clone(),
            config: dir.join(format!("lifecycle-{tag}.toml")),
            log: dir.join(format!("lifecycle-{tag}.log")),
        };
        bed.ip(&["link", "set", "lo", "up"]);
        bed.ip(&["link", "add", "xa0", "type", "veth", "peer", "name", "xa1"]);
        bed.ip(&["link", "set", "xa1", "up"]);
        bed.ip(&["link", "set", "xa0", "up"]);
        bed.ip(&["addr", "add", "198.18.64.2/24", "dev", "xa0"]);
        bed.ip(&["route", "add", "default", "via", "198.18.64.1", "dev", "xa0"]);
        bed.set_gateway_mac(Self::GATEWAY_MAC);
        let text = format!(
            "[node]\ninterfaces = [\"xa0\"]\nencap_source_v4 = \"198.19.0.0/16\"\npin_dir = \"/sys/fs/bpf/edgelb-t-{tag}\"\nadmin_socket = \"/run/edgelb/t-{tag}.sock\"\nconntrack_flows_per_cpu = {CT_FLOWS}\n{node}\n\n[[vip]]\nname = \"tun\"\naddress = \"198.18.65.1\"\nport = 80\nbackends = [{{ address = \"198.18.66.11\" }}]\n"
        );
        std::fs::write(&bed.config, text).unwrap();
        let _ = std::fs::remove_file(&bed.log);
        bed
    }

    /// Gives the default-route gateway (198.18.64.1) MAC `mac` in the kernel's neighbour table.
    fn set_gateway_mac(&self, mac: &str) {
        let gw = "198.18.64.1";
        self.ip(&["neigh", "replace", gw, "lladdr", mac, "dev", "xa0", "nud", "permanent"]);
    }

    /// `ip -n <ns> args...`.
    fn ip(&self, args: &[&str]) {
        let mut cmd = vec!["ip", "-n", &self.ns];
        cmd.extend_from_slice(args);
        testbed::sh(&cmd).unwrap_or_else(|e| panic!("{e}"));
    }

    fn start(&self) -> Edgelb {
        Edgelb::start(&self.ns, &self.config, &self.log)
    }

    /// Waits up to `limit` for `edgelb`'s log to hold `text` `count` times; panics with the log
    /// if it does not.
    fn wait_log(&self, edgelb: &Edgelb, text: &str, count: usize, limit: Duration) {
        let start = Instant::now();
        while edgelb.log().matches(text).count() < count {
            assert!(start.elapsed() < limit, "no {count}× {text:?} in:\n{}", edgelb.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for VethBed {
    fn drop(&mut self) {
        let _ = testbed::sh(&["ip", "netns", "del", &self.ns]);
        let dir = format!("/sys/fs/bpf/edgelb-t-{}", self.tag);
        let _ = edgelb::dataplane::Dataplane::teardown(dir.as_ref());
        let _ = std::fs::remove_file(format!("/run/edgelb/t-{}.sock", self.tag));
        let _ = std::fs::remove_file(&self.config);
    }
}

/// `node.mtu` above the MTU of an attached interface, with an ipip VIP, is said at the start
/// from the MTU edgelb's own network namespace gives (it was read from sysfs, which under
/// `nsenter --net` shows the host's interfaces: a veth of MTU 1400 went unsaid), and an MTU
/// lowered under the running edgelb is said within a sample, as is one raised back; the MTU
/// is exported.
#[test]
fn an_interface_mtu_below_node_mtu_is_said_at_start_and_while_running() {
    if !netns::require_privileged("an_interface_mtu_below_node_mtu_is_said") {
        return;
    }
    let bed =
        VethBed::new("mtu", &format!("mtu = 1500\ngateway_mac = \"{}\"", VethBed::GATEWAY_MAC));
    bed.ip(&["link", "set", "xa0", "mtu", "1400"]);
    let e = bed.start();
    let said = |mtu: u32| format!("interface xa0 carries at most {mtu} bytes");
    assert!(e.log().contains(&said(1400)), "{}", e.log());
    let exported = |mtu: u32| {
        let text = scrape_in(&bed.ns);
        metric(&text, "edgelb_interface_mtu", "interface=\"xa0\"") == f64::from(mtu)
    };
    assert!(exported(1400), "{}", scrape_in(&bed.ns));
    // Lowered while it runs: said within about a sample.
    bed.ip(&["link", "set", "xa0", "mtu", "1300"]);
    bed.wait_log(&e, &said(1300), 1, Duration::from_secs(3));
    assert!(exported(1300), "{}", scrape_in(&bed.ns));
    // Back to what node.mtu is: said to apply no more, once.
    bed.ip(&["link", "set", "xa0", "mtu", "1500"]);
    let gone = "warnings logged before no longer apply";
    bed.wait_log(&e, gone, 1, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(2500));
    let log = e.log();
    assert_eq!(log.matches(&said(1300)).count(), 1, "{log}");
    assert_eq!(log.matches(gone).count(), 1, "{log}");
    assert!(exported(1500));
}

/// A `node.gateway_mac` that is not the MAC the kernel's neighbour table gives the gateway of
/// the route to the backends out of the interface (a router replaced, a failover without a
/// virtual MAC: the kernel follows, the config does not) is logged as an error naming both,
/// and exported, within a look (every 10 s); the neighbour entry back at the configured MAC clears it, and so does a
/// reload of a file that names the gateway's new MAC, at once. Nothing was said before: every
/// ipip packet went to a stale MAC while the health checks stayed green.
#[test]
fn a_gateway_mac_the_kernel_does_not_give_the_gateway_is_said() {
    if !netns::require_privileged("a_gateway_mac_the_kernel_does_not_give_the_gateway") {
        return;
    }
    let configured = "02:ed:00:00:64:99";
    let bed = VethBed::new("gwmac", &format!("mtu = 1500\ngateway_mac = \"{configured}\""));
    let e = bed.start();
    let mismatch = || {
        let text = scrape_in(&bed.ns);
        let series = "edgelb_gateway_mac_mismatch{interface=\"xa0\"} ";
        assert!(text.contains(series), "{text}");
        metric(&text, "edgelb_gateway_mac_mismatch", "interface=\"xa0\"") == 1.0
    };
    let wait_gauge = |want: bool, limit: Duration| {
        let start = Instant::now();
        while mismatch() != want {
            assert!(start.elapsed() < limit, "the gauge is not {want}; log:\n{}", e.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let said = format!(
        "node.gateway_mac is {configured}, but the kernel's neighbour table gives the gateway of the route to the backends on xa0 {}",
        VethBed::GATEWAY_MAC
    );
    bed.wait_log(&e, &said, 1, Duration::from_secs(3));
    wait_gauge(true, Duration::from_secs(3));
    // The kernel's entry at the configured MAC: cleared within a look.
    bed.set_gateway_mac(configured);
    let again =
        "node.gateway_mac is the MAC the kernel gives the gateway of the route to the backends";
    bed.wait_log(&e, again, 1, Duration::from_secs(12));
    wait_gauge(false, Duration::from_secs(2));
    // The gateway moves to another MAC: said again, once, naming it.
    let moved = "02:ed:00:00:64:02";
    bed.set_gateway_mac(moved);
    let said_moved = format!("route to the backends on xa0 {moved}");
    bed.wait_log(&e, &said_moved, 1, Duration::from_secs(12));
    wait_gauge(true, Duration::from_secs(2));
    // A reload naming the new MAC clears it at once, not at the next look.
    let text = std::fs::read_to_string(&bed.config).unwrap().replace(configured, moved);
    std::fs::write(&bed.config, text).unwrap();
    let out = e.cli(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    bed.wait_log(&e, again, 2, Duration::from_secs(3));
    wait_gauge(false, Duration::from_secs(2));
    assert_eq!(e.log().matches("but the kernel's neighbour table gives").count(), 2, "{}", e.log());
}

/// A restart that adopts a data plane one of whose map pins was removed says that it made that
/// map fresh, and what that costs: with the IPv4 connection table's pin gone, it used to log
/// only that it adopted the pinned state, and placed every established flow anew without a
/// word. The maps still pinned are adopted as ever, and said no more of.
#[test]
fn a_restart_names_the_maps_it_made_fresh() {
    if !netns::require_privileged("a_restart_names_the_maps_it_made_fresh") {
        return;
    }
    let bed = VethBed::new("fresh", &format!("gateway_mac = \"{}\"", VethBed::GATEWAY_MAC));
    bed.start().terminate();
    let pin_dir = Config::load(&bed.config).unwrap().node.pin_dir;
    std::fs::remove_file(pin_dir.join("CT_V4")).expect("remove the CT_V4 pin");
    let e = bed.start();
    let log = e.log();
    assert!(log.contains("left the data plane running: adopting it"), "{log}");
    let said = "CT_V4 was not pinned with the rest of the data plane";
    assert_eq!(log.matches(said).count(), 1, "{log}");
    assert!(log.contains("established IPv4 flows are placed anew"), "{log}");
    assert_eq!(log.matches("was not pinned with the rest").count(), 1, "only CT_V4: {log}");
    assert!(pin_dir.join("CT_V4").exists(), "pinned again");
    // Everything pinned: nothing to say.
    e.terminate();
    let e = bed.start();
    assert_eq!(e.log().matches("was not pinned with the rest").count(), 1, "{}", e.log());
}
