//! Developer tasks for edgelb: `cargo xtask run | test | lint | bench | testbed up/down`.
//!
//! Run through `./x` (or `scripts/bootstrap.sh` first): the pinned toolchains and bpf-linker must
//! exist before cargo can even start this binary.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgelb::testbed::{self, Testbed, netns, servers};

#[derive(Parser)]
#[command(about = "edgelb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build edgelb, bring up the namespace testbed, start edgelb on the balancer node with the
    /// default config and show traffic flowing. Ctrl-C (or --duration) tears it all down.
    Run {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Run every test: unit, BPF_PROG_TEST_RUN fixtures, namespace end-to-end. Needs root for the
    /// privileged ones (they skip otherwise, or fail with EDGELB_REQUIRE_PRIVILEGED=1); the
    /// closing summary counts the skipped ones and repeats why each skipped.
    Test {
        /// Run only this integration test binary (tests/<NAME>.rs; repeatable), e.g. `cli`.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// Extra arguments for the test binaries (`cargo test -- <ARGS>`), e.g. a name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (docs/BENCHMARKS.md): `xdp` (ns/packet), `veth` (packet rate), `maglev`
    /// (table quality), `l7` (wrk through edgelb, HAProxy and nginx), all four by default; they
    /// print markdown tables and whether each target is met, and merge their figures into
    /// target/bench/results.json. `criterion` runs the criterion micro-benches (about two
    /// minutes, so not in the default set), or name one of them (`hotpaths`).
    /// EDGELB_BENCH_QUICK=1 makes every part short, to check the output. Needs root for xdp and
    /// veth (and to install the l7 peers from Debian); as root it first removes what an
    /// interrupted run left.
    Bench {
        /// Parts to run: xdp, veth, maglev, l7, criterion, or a criterion bench by name.
        parts: Vec<String>,
    },
    /// Lints: rustfmt, clippy on the host crates and (with the eBPF nightly) on lb-ebpf, all
    /// warnings as errors.
    Lint,
    /// Manage the standalone testbed (namespaces prefixed `edgelb`).
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Build it and leave it up (helper XDP links pinned under /sys/fs/bpf).
    Up,
    /// Tear it down (also what Ctrl-C does to `run`), and what a killed `run` left. Refuses
    /// while a live `run` uses it or a `testbed up` builds it.
    Down,
}

/// Prefix of the namespaces `run` and `testbed up` create.
const PREFIX: &str = "edgelb";

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Run { duration } => run(duration),
        Task::Test { tests, args } => test(&tests, &args),
        Task::Lint => lint(),
        Task::Bench { parts } => bench(&parts),
        Task::Testbed { action: TestbedAction::Up } => {
            require_root("testbed up")?;
            let _lock = refuse_testbed_in_use("testbed up")?;
            let tb = Testbed::up(PREFIX, true).context("building the testbed")?;
            std::mem::forget(tb); // keep it up; `cargo xtask testbed down` removes it
            println!("testbed `{PREFIX}` is up: namespaces {PREFIX}-{{sw,client,lb,b1,b2,b3}}");
            println!("tear down with: cargo xtask testbed down");
            Ok(())
        }
        Task::Testbed { action: TestbedAction::Down } => {
            require_root("testbed down")?;
            // A live `run` (of any clone: the namespaces, socket and pins are the machine's)
            // holds the lock: its edgelb and namespaces are not this task's to remove.
            let _lock = lock_testbed(Path::new(TESTBED_LOCK), "testbed down")?;
            stop_left_edgelb();
            Testbed::down(PREFIX);
            println!("testbed `{PREFIX}` removed");
            sweep_stale();
            Ok(())
        }
    }
}

/// The names of the network namespaces tests and benches make, `{pid}` standing for the PID
/// of the process that made them; `-*` after it for any text after a dash. tests/lifecycle.rs
/// (its testbed's, `LoBed`'s and a peer's), netns_e2e.rs, cli.rs, xdp_fixtures.rs, the veth
/// bench and the health and dataplane unit tests. Their veths (XDP attached to some) go with
/// them. `every_name_the_tests_make_is_swept` finds the names in the sources, and fails on one
/// no pattern here matches.
const TEST_NAMESPACES: &[&str] = &[
    "elbl{pid}-*",
    "elbt{pid}-*",
    "elbbench{pid}-*",
    "elbdecap{pid}",
    "elbdecapa{pid}",
    "elbdecapb{pid}",
    "elbdecapl{pid}",
    "elblbnsa{pid}",
    "elblbnsb{pid}",
    "elbstopel{pid}",
    "elbstart{pid}",
    "elbmnt{pid}",
    "elpl{pid}",
    "elgro{pid}",
    "elfd{pid}",
    "elrx{pid}",
    "elbig{pid}",
    "edgelb-noroute-{pid}",
    "edgelb-repin-{pid}",
];

/// The pin directories under /sys/fs/bpf tests make (pinned XDP links among them, which keep a
/// program attached), written as [`TEST_NAMESPACES`]; a `*-` before `{pid}` stands for any
/// text and a dash. cli.rs, lifecycle.rs, xdp_fixtures.rs and the dataplane unit tests.
const TEST_PIN_DIRS: &[&str] = &[
    "edgelb-t-cli-*-{pid}",
    "edgelb-t-{pid}-*",
    "edgelb-fixture-{pid}",
    "edgelb-fixture-*-{pid}",
    "edgelb-beside-{pid}",
    "edgelb-links-{pid}",
    "edgelb-decap-test-{pid}",
    "edgelb-decap-ns-test-{pid}",
    "edgelb-decap-lb-test-{pid}",
    "edgelb-lb-ns-test-{pid}",
    "edgelb-stop-away-{pid}",
    "edgelb-test-owner-{pid}",
    "edgelb-test-repin-{pid}",
];

/// The files and directories under `std::env::temp_dir()` tests and benches make, written as
/// [`TEST_NAMESPACES`]: the l7 bench's (its servers' configs inside), the admin unit tests' (a
/// socket inside), the config, dataplane and xtask unit tests'.
const TEST_TEMP: &[&str] = &[
    "edgelb-l7-bench-{pid}",
    "edgelb-admin-{pid}",
    "edgelb-admin-*-{pid}",
    "edgelb-secret-mode-{pid}",
    "edgelb-holders-{pid}",
    "edgelb-xtask-config-test-{pid}",
    "edgelb-xtask-lock-test-{pid}",
    "edgelb-pin-step-{pid}",
    "edgelb-cli-stop-{pid}",
    "edgelb-cli-check-{pid}",
    "edgelb-latin1-{pid}",
    "edgelb-build-git-{pid}",
];

/// The PID in `name` if it has the form of one of `patterns` (see [`TEST_NAMESPACES`]): the
/// sweep removes a name only when that process is gone. Matched whole, so that a name of
/// another pattern, or of someone else's, is never read as a test's.
fn test_made_pid(patterns: &[&str], name: &str) -> Option<u32> {
    patterns.iter().find_map(|pattern| {
        let (before, after) = pattern.split_once("{pid}")?;
        let digits = if let Some(fixed) = before.strip_suffix("*-") {
            // Any text, a dash, then the PID ends the name.
            let (text, digits) = name.strip_prefix(fixed)?.rsplit_once('-')?;
            (after.is_empty() && !text.is_empty()).then_some(digits)?
        } else {
            let rest = name.strip_prefix(before)?;
            let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            let (digits, tail) = rest.split_at(end);
            let fits = match after.strip_suffix('*') {
                Some(fixed) => tail.len() > fixed.len() && tail.starts_with(fixed),
                None => tail == after,
            };
            fits.then_some(digits)?
        };
        match digits.bytes().all(|b| b.is_ascii_digit()) {
            true => digits.parse().ok(),
            false => None,
        }
    })
}

/// Removes what test and bench runs that were killed (Ctrl-C on `./x test` or `./x bench`
/// reaches test and bench binaries without a handler, so their guards never run) left behind,
/// each named with the PID of the test or bench process that made it: namespaces
/// ([`TEST_NAMESPACES`], veths with XDP attached among them), pin directories
/// ([`TEST_PIN_DIRS`], pinned XDP links among them, which keep a program attached), admin
/// sockets, temporary files and directories ([`TEST_TEMP`]: the unit tests' with sockets
/// inside, the l7 bench's), and the edgelb, nginx and HAProxy processes those tests and benches
/// started. Only names of their own patterns whose PID is gone are touched.
///
/// A test or bench that makes a namespace, pin directory or temporary file of a new name adds
/// its pattern to [`TEST_NAMESPACES`], [`TEST_PIN_DIRS`] or [`TEST_TEMP`]:
/// `every_name_the_tests_make_is_swept` finds the names in the sources and fails until then.
fn sweep_stale() {
    // A zombie (exited, not yet reaped: a killed bench whose parent shell is gone) or a dead
    // process counts as gone: it runs nothing and guards nothing.
    let alive = edgelb::procfs::runs;
    let leading = |s: &str| s.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok();
    let trailing = |s: &str| s.rsplit('-').next()?.parse::<u32>().ok();
    let mut removed = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if test_made_pid(TEST_NAMESPACES, name).is_some_and(|pid| !alive(pid))
                && Command::new("ip")
                    .args(["netns", "del", name])
                    .status()
                    .is_ok_and(|s| s.success())
            {
                removed.push(format!("namespace {name}"));
            }
        }
    }
    for e in std::fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if test_made_pid(TEST_PIN_DIRS, &name).is_some_and(|pid| !alive(pid))
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed.push(e.path().display().to_string());
        }
    }
    // edgelb processes a lifecycle test started (config target/lifecycle-<pid>-<test>.toml),
    // then their admin sockets (/run/edgelb/t-<pid>-<test>.sock). And the l7 bench's servers:
    // its proxy (`<bench binary> l7-serve <dir>/edgelb.toml`), nginx and HAProxy, each started
    // with a config in its temp directory `edgelb-l7-bench-<pid>/`; one left running would
    // share its port with the next run's through SO_REUSEPORT and be measured with it.
    let kill =
        |pid: &str| Command::new("kill").args(["-TERM", pid]).status().is_ok_and(|s| s.success());
    const L7_DIR: &str = "edgelb-l7-bench-";
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let argv: Vec<String> =
            cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let cmd = argv.join(" ");
        let pid = e.file_name().to_string_lossy().into_owned();
        let owner = cmd.split("lifecycle-").nth(1).and_then(leading);
        if cmd.contains("edgelb") && cmd.contains(" run ") && owner.is_some_and(|pid| !alive(pid)) {
            if kill(&pid) {
                removed.push(format!("edgelb process {pid}"));
            }
            continue;
        }
        let program = argv[0].rsplit('/').next().unwrap_or_default();
        let l7_server =
            argv.get(1).is_some_and(|a| a == "l7-serve") || ["nginx", "haproxy"].contains(&program);
        let owner = cmd.split(L7_DIR).nth(1).and_then(leading);
        if l7_server
            && cmd.contains(&format!("/{L7_DIR}"))
            && owner.is_some_and(|o| !alive(o))
            && kill(&pid)
        {
            removed.push(format!("l7 bench server {pid} ({program})"));
        }
    }
    // The temporary files and directories ([`TEST_TEMP`]): a directory with what is in it,
    // anything else (a symlink too, not followed) by itself.
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if test_made_pid(TEST_TEMP, &name).is_some_and(|pid| !alive(pid)) {
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(e.path()),
                _ => std::fs::remove_file(e.path()),
            };
            if gone.is_ok() {
                removed.push(e.path().display().to_string());
            }
        }
    }
    // cli's admin sockets, <name>-<pid>.sock in the integration tests' CARGO_TARGET_TMPDIR.
    for e in std::fs::read_dir(target_dir().join("tmp")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_suffix(".sock").and_then(trailing);
        if pid.is_some_and(|pid| !alive(pid)) && std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path().display().to_string());
        }
    }
    for e in std::fs::read_dir("/run/edgelb").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("t-").and_then(leading);
        if name.ends_with(".sock") && pid.is_some_and(|pid| !alive(pid)) {
            let _ = std::fs::remove_file(e.path());
            removed.push(e.path().display().to_string());
        }
    }
    for r in removed {
        eprintln!("removed what a killed test or bench run left: {r}");
    }
}

/// The edgelb binary `cargo build` makes, which `run` starts.
fn edgelb_bin() -> PathBuf {
    target_dir().join("debug/edgelb")
}

/// Stops an edgelb a killed `run` left behind (or its data plane): by its own admin socket and
/// pin dir (see `run_config`), so nothing else on the machine is touched. With nothing left to
/// stop (neither `run`'s admin socket nor its pins), it does nothing. Otherwise the config is
/// written afresh first (one an older `run` left has the default socket), whether or not one
/// was there (a fresh clone, or after `cargo clean`): the socket and pin dir are the same for
/// every `run`, and the edgelb to stop may be another clone's; and with no edgelb built (after
/// `cargo clean`), it builds edgelb first: the left edgelb would otherwise keep running, and
/// the next `run` be refused.
fn stop_left_edgelb() {
    let (config, bin) = (testbed_config(), edgelb_bin());
    if !Path::new(RUN_SOCKET).exists() && !Path::new(RUN_PINS).exists() {
        return; // nothing a `run` left
    }
    if !bin.exists() {
        eprintln!(
            "an edgelb of `run` (or its data plane) is left ({RUN_SOCKET}, {RUN_PINS}) and {} is \
             not built: building it to stop them",
            bin.display()
        );
        if let Err(e) = cargo(&["build", "--locked", "--bin", "edgelb"]) {
            eprintln!("cannot stop the left edgelb: {e:#}");
            return;
        }
    }
    if write_run_config(&config).is_ok() {
        let _ = edgelb_command(&bin, "stop", &config).status();
    }
}

/// `edgelb <what> --config <config>`, in a process group of its own as `run`'s edgelb is: Ctrl-C
/// on the terminal is for `run`, whose handler then stops edgelb in order, not for a `status`
/// or `stop` it runs meanwhile, which it would kill halfway and turn the stop into a failure.
fn edgelb_command(bin: &Path, what: &str, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg(what).arg("--config").arg(config).process_group(0);
    cmd
}

/// Writes [`run_config`] to `config`, making its directory first.
fn write_run_config(config: &Path) -> std::io::Result<()> {
    if let Some(dir) = config.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(config, run_config())
}

/// Where `run` writes the config of the edgelb it starts.
fn testbed_config() -> PathBuf {
    target_dir().join("testbed/edgelb.toml")
}

/// The example config with an admin socket and pin dir of its own: `run` and `testbed down` must
/// never reach an edgelb the machine runs for real (on the default socket and pins).
fn run_config() -> String {
    edgelb::config::EXAMPLE.replacen(
        "[node]\n",
        &format!("[node]\npin_dir = \"{RUN_PINS}\"\nadmin_socket = \"{RUN_SOCKET}\"\n"),
        1,
    )
}

/// The pin directory of `run`'s edgelb.
const RUN_PINS: &str = "/sys/fs/bpf/edgelb-xtask-run";
/// The admin socket of `run`'s edgelb.
const RUN_SOCKET: &str = "/run/edgelb/xtask-run.sock";

/// Cargo's target directory, where this xtask was built (`<target>/debug/xtask`): the one
/// `cargo build` writes edgelb to as well, whether it is `target/`, `CARGO_TARGET_DIR` or a
/// config's `build.target-dir`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_owned()))
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_owned()
}

fn require_root(what: &str) -> Result<()> {
    if netns::euid() != 0 {
        bail!("{what} needs root (network namespaces, XDP): run it as root");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO")).args(args).current_dir(workspace_root()).status()?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn test(only: &[String], extra: &[String]) -> Result<()> {
    if netns::euid() != 0 {
        eprintln!("note: not root: privileged tests (XDP, namespaces) will skip with a reason");
    }
    cargo(&["build", "--locked", "--bins"])?;
    if netns::euid() == 0 {
        sweep_stale();
    }
    // Cargo colours its output only on a terminal, and its stderr is piped here.
    let color =
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) { "always" } else { "auto" };
    // Tests share kernel state (namespaces, XDP attachments), so one at a time, as aya does.
    let mut args = vec!["test", "--locked", "--color", color, "--no-fail-fast"];
    for t in only {
        args.extend(["--test", t]);
    }
    args.push("--");
    // Unless given: libtest refuses an option given twice.
    if !extra.iter().any(|a| a.starts_with("--test-threads")) {
        args.push("--test-threads=1");
    }
    args.extend(extra.iter().map(String::as_str));
    eprintln!("+ cargo {}", args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Echo both streams and add up every binary's "test result:" line (stdout) and the tests'
    // SKIPPED lines (stderr, where the skip gate writes them) into one closing tally. Stderr is
    // read on a thread of its own so that neither pipe fills while the other is read.
    let stderr = child.stderr.take().expect("piped");
    let skips = std::thread::spawn(move || -> std::io::Result<Vec<String>> {
        let mut tally = Tally::default();
        echo_lines(stderr, &mut std::io::stderr(), |line| tally.stderr_line(line))?;
        Ok(tally.skips)
    });
    let mut tally = Tally::default();
    let stdout = child.stdout.take().expect("piped");
    let echoed = echo_lines(stdout, &mut std::io::stdout(), |line| tally.stdout_line(line));
    let status = child.wait()?;
    tally.skips = skips.join().expect("the stderr reader does not panic")?;
    echoed?;
    print!("{}", tally.summary());
    if !status.success() {
        bail!("cargo test failed");
    }
    Ok(())
}

/// Copies `from` to `to` line by line as it comes, handing each line (without its newline, any
/// bytes that are not UTF-8 replaced) to `each`.
fn echo_lines(
    from: impl std::io::Read,
    to: &mut impl std::io::Write,
    mut each: impl FnMut(&str),
) -> std::io::Result<()> {
    use std::io::BufRead;
    let mut from = std::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        if from.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        to.write_all(&line)?;
        to.flush()?;
        let text = String::from_utf8_lossy(&line);
        each(text.trim_end_matches(['\n', '\r']));
    }
}

/// What `test` reports at the end: libtest's counts over every test binary, and the tests that
/// skipped through the skip gate ([`netns::require`]: no root, no second CPU), which libtest
/// counts as passed.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// The SKIPPED lines the tests printed, one per skipped test.
    skips: Vec<String>,
}

impl Tally {
    /// Adds a test binary's "test result:" line; other lines are ignored.
    fn stdout_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else { return };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
            let n: u64 = n.parse().unwrap_or(0);
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// Keeps a SKIPPED line (see [`netns::require`]); other lines are ignored.
    fn stderr_line(&mut self, line: &str) {
        if line.starts_with(netns::SKIPPED) {
            self.skips.push(line.to_owned());
        }
    }

    /// The closing lines: the skipped tests' reasons again (they are scattered through the
    /// output above), then the counts, a skipped test counted as skipped and not as passed.
    fn summary(&self) -> String {
        let mut out = String::new();
        let skipped = self.skips.len() as u64;
        if skipped > 0 {
            out.push_str(&format!(
                "{skipped} skipped by the skip gate, each line naming the test and what it \
                 lacks (EDGELB_REQUIRE_PRIVILEGED=1 makes each a failure):\n"
            ));
            for s in &self.skips {
                out.push_str(&format!("  {s}\n"));
            }
        }
        out.push_str(&format!(
            "{} passed, {} failed, {} skipped ({skipped} by the skip gate, {} ignored)\n",
            self.passed.saturating_sub(skipped),
            self.failed,
            self.ignored + skipped,
            self.ignored
        ));
        out
    }
}

/// The parts of benches/dataplane.rs, all run by a bare `bench`.
const DATAPLANE_PARTS: [&str; 4] = ["xdp", "veth", "maglev", "l7"];

/// Set (and not "0"): every part runs a small fraction of its rounds, frames and seconds, to
/// check the output and the plumbing rather than to measure (the dataplane bench reads it too).
const QUICK_ENV: &str = "EDGELB_BENCH_QUICK";

fn bench(parts: &[String]) -> Result<()> {
    let criterion = criterion_benches()?;
    // Every name is checked before anything is built or run.
    for p in parts {
        let p = p.as_str();
        if !DATAPLANE_PARTS.contains(&p) && p != "criterion" && !criterion.iter().any(|c| c == p) {
            bail!(
                "unknown bench part `{p}`: xdp, veth, maglev, l7 (the default set), criterion (the \
                 criterion benches: {}), or one criterion bench by name",
                criterion.join(", ")
            );
        }
    }
    // What an interrupted run left (namespaces with XDP attached, the l7 part's temp dirs and
    // servers) would get in the way of this one, or be measured with it.
    if netns::euid() == 0 {
        sweep_stale();
    }
    let dataplane: Vec<&str> = if parts.is_empty() {
        DATAPLANE_PARTS.to_vec()
    } else {
        DATAPLANE_PARTS.into_iter().filter(|d| parts.iter().any(|p| p == d)).collect()
    };
    let criterion: Vec<&str> = if parts.iter().any(|p| p == "criterion") {
        criterion.iter().map(String::as_str).collect()
    } else {
        criterion.iter().map(String::as_str).filter(|c| parts.iter().any(|p| p == c)).collect()
    };
    if !dataplane.is_empty() {
        if dataplane.contains(&"l7") {
            bench_tools()?;
        }
        let mut args =
            vec!["bench", "--locked", "-p", "lb-userspace", "--bench", "dataplane", "--"];
        args.extend(dataplane);
        cargo(&args)?;
    }
    let quick = std::env::var_os(QUICK_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    for name in criterion {
        let mut args = vec!["bench", "--locked", "-p", "lb-userspace", "--bench", name];
        if quick {
            args.extend(["--", "--warm-up-time", "0.1", "--measurement-time", "0.2"]);
        }
        cargo(&args)?;
    }
    Ok(())
}

/// The criterion benches: every `[[bench]]` of lb-userspace/Cargo.toml but `dataplane`, which
/// has parts of its own. Read from the manifest, so that a bench declared there joins
/// `bench criterion` without a change here.
fn criterion_benches() -> Result<Vec<String>> {
    let path = workspace_root().join("lb-userspace/Cargo.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut names = Vec::new();
    let mut in_bench = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bench = line == "[[bench]]";
        } else if in_bench
            && let Some(value) = line.strip_prefix("name").map(str::trim_start)
            && let Some(value) = value.strip_prefix('=')
        {
            let name = value.trim().trim_matches('"');
            if name != "dataplane" {
                names.push(name.to_owned());
            }
        }
    }
    Ok(names)
}

/// The L7 benchmark's peers and load generator, from Debian (installed when running as root),
/// and oha for its fixed-rate p99 (see `bench_oha`).
fn bench_tools() -> Result<()> {
    bench_oha();
    let missing: Vec<&str> = [("wrk", "wrk"), ("haproxy", "haproxy"), ("nginx", "nginx-light")]
        .into_iter()
        .filter(|(bin, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if netns::euid() != 0 {
        eprintln!(
            "note: the l7 benchmark needs {}, and skips without them: apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        );
        return Ok(());
    }
    eprintln!("+ apt-get update && apt-get install {}", missing.join(" "));
    // A fresh machine's package lists may be empty or stale (as bootstrap.sh does too).
    if !Command::new("apt-get").args(["update", "-qq"]).status()?.success() {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// oha on PATH, or where `cargo install` puts it (the dataplane bench looks in the same places).
/// Another version than [`OHA_VERSION`] is used too, with a note: its output may differ.
fn oha_installed() -> bool {
    let home = |var: &str, sub: &str| std::env::var_os(var).map(|h| PathBuf::from(h).join(sub));
    let version =
        [Some(PathBuf::from("oha")), home("CARGO_HOME", "bin/oha"), home("HOME", ".cargo/bin/oha")]
            .into_iter()
            .flatten()
            .find_map(|o| {
                let out = Command::new(o).arg("--version").output().ok()?;
                out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            });
    if let Some(v) = &version
        && !v.ends_with(OHA_VERSION)
    {
        eprintln!(
            "note: {v} is installed; the l7 part is written against oha {OHA_VERSION} (`cargo install oha@{OHA_VERSION} --locked`), and reads another version's output as best it can"
        );
    }
    version.is_some()
}

/// The oha the l7 part is written against (its flags and JSON output): a version of its own,
/// not whatever crates.io has newest on the day.
const OHA_VERSION: &str = "1.16.0";

/// oha measures the l7 part's p99 at a fixed rate (wrk's closed loop understates tails). It is
/// not a Debian package, so it comes from crates.io: installed with `cargo install` when
/// missing. The bench runs without that table when this fails, so a failure is a note with the
/// command to run, not an error.
fn bench_oha() {
    if oha_installed() {
        return;
    }
    let cmd = format!("cargo install oha@{OHA_VERSION} --locked");
    eprintln!(
        "oha is missing (the l7 part measures its fixed-rate p99 with it): installing it; this \
         compiles it, a few minutes\n+ {cmd}"
    );
    let ok = Command::new(env!("CARGO"))
        .args(["install", &format!("oha@{OHA_VERSION}"), "--locked"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !oha_installed() {
        eprintln!(
            "note: oha could not be installed{}; the l7 part runs without its fixed-rate p99. To \
             install it yourself: `{cmd}` (it goes to ~/.cargo/bin, or $CARGO_HOME/bin)",
            if ok { " where the bench looks for it" } else { "" }
        );
    }
}

/// Must match lb-userspace/build.rs.
const EBPF_TOOLCHAIN: &str = "+nightly-2026-08-05";

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--locked", "--all-targets", "--", "-D", "warnings"])?;
    let ebpf = [
        EBPF_TOOLCHAIN,
        "clippy",
        "--locked",
        "-p",
        "lb-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ];
    eprintln!("+ cargo {}", ebpf.join(" "));
    // `cargo` here must be rustup's proxy so that +toolchain works, not the toolchain's cargo.
    let status = Command::new("cargo").args(ebpf).current_dir(workspace_root()).status()?;
    if !status.success() {
        bail!("clippy on lb-ebpf failed");
    }
    Ok(())
}

/// The edgelb child process. `stop` stops it and checks it all went; on drop (an early error):
/// `edgelb stop` (controller exits and removes the data plane), then SIGTERM and SIGKILL by PID
/// if it is still there.
struct Edgelb {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    stopped: bool,
}

impl Edgelb {
    /// `edgelb stop`, and a failure unless it said so, edgelb exited cleanly, and the data
    /// plane is gone: the teardown is part of what `run` shows working.
    fn stop(mut self) -> Result<()> {
        self.stopped = true;
        let st = edgelb_command(&self.bin, "stop", &self.config).status()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(exit) = self.child.try_wait()? {
                break exit;
            }
            if Instant::now() > deadline {
                bail!("edgelb still runs 60 s after `edgelb stop`");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if !st.success() {
            bail!("`edgelb stop` failed: {st}");
        }
        if !exit.success() {
            bail!("edgelb exited with {exit}");
        }
        if Path::new(RUN_PINS).exists() {
            bail!("edgelb stopped, but {RUN_PINS} remains");
        }
        Ok(())
    }
}

impl Drop for Edgelb {
    fn drop(&mut self) {
        if self.stopped {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            return;
        }
        let _ = edgelb_command(&self.bin, "stop", &self.config).status();
        let pid = self.child.id() as i32;
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        testbed::reap_within(&mut self.child, Duration::from_secs(5));
    }
}

/// Up to `n` HTTP requests to `vip` from `n` client addresses; prints which backend answered how
/// often, and fails if any request did. Once `stop` is set (Ctrl-C) it ends early, and its
/// failures are the caller's to report after the teardown. Returns how many requests were sent
/// and how many of them failed.
fn show_spread(
    tb: &Testbed,
    vip: SocketAddr,
    n: u32,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<(u32, u32)> {
    let spread = netns::in_netns(&tb.names.client, || {
        tally_spread(n, stop, |i| {
            let src = SocketAddr::new(IpAddr::V4(testbed::pool_addr(i)), 0);
            servers::http_get(Some(src), vip, timeout)
        })
    })?;
    for (who, count) in &spread {
        eprintln!("   {who:<12} {count:>4} responses");
    }
    let sent = spread.values().sum();
    let failed = spread.iter().filter(|(who, _)| who.starts_with("error")).map(|(_, n)| n).sum();
    if sent < n {
        eprintln!("   interrupted after {sent} of {n} requests");
    }
    if failed > 0 && !stop.load(Ordering::Relaxed) {
        bail!("some requests to {vip} failed: {spread:?}");
    }
    Ok((sent, failed))
}

/// Sends up to `n` requests, the i-th with `get(i)`, and counts the answers by who gave them
/// (`error: ...` for a failed request). It stops before the next request once `stop` is set: a
/// backend or path that does not answer costs a whole timeout per request, and Ctrl-C must not
/// wait for hundreds of them.
fn tally_spread(
    n: u32,
    stop: &AtomicBool,
    mut get: impl FnMut(u32) -> std::io::Result<String>,
) -> BTreeMap<String, u32> {
    let mut per = BTreeMap::new();
    for i in 0..n {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let who = get(i).unwrap_or_else(|e| format!("error: {e}"));
        *per.entry(who).or_default() += 1;
    }
    per
}

/// The lock `run` and `testbed up` hold while they build and use the testbed, and `testbed
/// down` while it removes it. One for the machine, as the testbed's namespaces are: a `run` of
/// another clone uses them too. Root-only, like the tasks that take it.
const TESTBED_LOCK: &str = "/run/lock/edgelb-testbed.lock";

/// Takes the testbed lock at `path` for `task` without waiting, or fails naming the task that
/// holds it. The holder writes who it is into the file; a lock held by an older xtask writes
/// nothing (and leaves what an earlier holder wrote, whose PID is then gone), and the refusal
/// then names no one.
fn lock_testbed(path: &Path, task: &str) -> Result<std::fs::File> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            let holder = holder.trim();
            let pid = holder.split("(PID ").nth(1).and_then(|p| p.split(',').next());
            if !pid.is_some_and(|pid| Path::new("/proc").join(pid).exists()) {
                bail!(
                    "{task}: another `cargo xtask run` or `testbed up` is building or using the \
                     testbed `{PREFIX}` ({} is locked): stop that one first (Ctrl-C where it runs)",
                    path.display()
                );
            }
            bail!(
                "{task}: the testbed `{PREFIX}` is in use by {holder} ({} is locked): stop that \
                 one first (Ctrl-C where it runs)",
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    let me = format!(
        "`cargo xtask {task}` (PID {}, in {})",
        std::process::id(),
        workspace_root().display()
    );
    lock.set_len(0)
        .and_then(|()| lock.write_all(me.as_bytes()))
        .with_context(|| format!("writing to {}", path.display()))?;
    Ok(lock)
}

/// Refuses to build the testbed while processes run in its namespaces: building it starts by
/// removing the old one, which would pull the network out from under another `cargo xtask run`
/// (whose edgelb then fails, while this one fails to create namespaces the other's teardown
/// removes, with errors that name neither).
///
/// Returns a lock held while the caller builds and uses the testbed: two tasks started at the
/// same instant would both find it unused, and the second then waits for nothing but fails here.
fn refuse_testbed_in_use(task: &str) -> Result<std::fs::File> {
    let lock = lock_testbed(Path::new(TESTBED_LOCK), task)?;
    let mut inside = Testbed::processes_inside(PREFIX);
    // With the lock free, no `run` is alive: an edgelb alone in the testbed is one a `run`
    // killed or hung up on left behind (it runs in a process group of its own). It is stopped
    // as `testbed down` would, rather than block every later run until someone does.
    if !inside.is_empty() && inside.iter().all(|(_, comm)| comm == "edgelb") {
        eprintln!("{task}: stopping the edgelb a killed `cargo xtask run` left in the testbed");
        stop_left_edgelb();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Testbed::processes_inside(PREFIX).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        inside = Testbed::processes_inside(PREFIX);
    }
    if !inside.is_empty() {
        let who: Vec<String> = inside.iter().map(|(pid, comm)| format!("{comm} ({pid})")).collect();
        bail!(
            "{task}: the testbed `{PREFIX}` is in use by {} (another `cargo xtask run`?): stop \
             that one first (Ctrl-C where it runs), or remove the testbed with `cargo xtask \
             testbed down`",
            who.join(", ")
        );
    }
    Ok(lock)
}

fn run(duration: Option<u64>) -> Result<()> {
    require_root("xtask run")?;
    cargo(&["build", "--locked", "--bin", "edgelb"])?;
    let edgelb_bin = edgelb_bin();
    let config = testbed_config();
    write_run_config(&config).with_context(|| format!("writing {}", config.display()))?;

    let stop = Arc::new(AtomicBool::new(false));
    // SIGHUP too: a terminal that goes away (ssh dropped) must not leave edgelb running in
    // its own process group, out of reach of the teardown.
    for sig in
        [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP]
    {
        signal_hook::flag::register(sig, stop.clone())?;
    }

    let _lock = refuse_testbed_in_use("run")?;
    eprintln!("== testbed: client, balancer node, 3 backends in namespaces `{PREFIX}-*`");
    let tb = match Testbed::up(PREFIX, false) {
        Ok(tb) => tb,
        // Ctrl-C reaches the `ip` commands that build it as well (they run in the terminal's
        // process group), and the one it kills fails the build: a stop, not a failure. What was
        // built is removed already.
        Err(e) if stop.load(Ordering::Relaxed) => {
            eprintln!("== interrupted while building the testbed ({e}); it is removed");
            return Ok(());
        }
        Err(e) => return Err(e).context("building the testbed"),
    };
    let _servers = tb.start_servers().context("starting backend servers")?;
    eprintln!(
        "== starting edgelb on the balancer node: {} run --config {}",
        edgelb_bin.display(),
        config.display()
    );
    // In a process group of its own: Ctrl-C on the terminal is for this process, which then
    // stops edgelb in order (`edgelb stop`), not for edgelb, which would detach on its own.
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns::netns_path(&tb.names.lb).display()))
        .arg(&edgelb_bin)
        .args(["run", "--config"])
        .arg(&config)
        .process_group(0)
        .spawn()
        .context("starting edgelb")?;
    let mut edgelb =
        Edgelb { child, bin: edgelb_bin.clone(), config: config.clone(), stopped: false };

    let vip = SocketAddr::new(IpAddr::V4(testbed::VIP), 80);
    let timeout = Duration::from_secs(2);
    // Wait for edgelb to attach: the VIP answers once XDP forwards.
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = edgelb.child.try_wait() {
            bail!("edgelb exited early: {status}");
        }
        let ok =
            netns::in_netns(&tb.names.client, || servers::http_get(None, vip, timeout).is_ok())?;
        if ok {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the VIP did not answer within 20 s");
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!("== interrupted: stopping edgelb and removing the testbed");
            edgelb.stop()?;
            drop(tb);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // From here on a stop signal skips what is left and goes to the teardown at the end, within
    // one request's timeout; requests that failed meanwhile are reported after it.
    let interrupted = || stop.load(Ordering::Relaxed);
    eprintln!("== 300 HTTP requests from 300 client addresses to {vip}:");
    let (mut n, mut failed) = show_spread(&tb, vip, 300, timeout, &stop)?;
    let vip7 = SocketAddr::new(IpAddr::V4(testbed::VIP_L7), 80);
    if !interrupted() {
        eprintln!(
            "== 30 HTTP requests to the L7 VIP {vip7} (XDP passes them to edgelb's io_uring \
             proxy):"
        );
        let (sent, bad) = show_spread(&tb, vip7, 30, timeout, &stop)?;
        (n, failed) = (n + sent, failed + bad);
    }
    if !interrupted() {
        eprintln!("== edgelb status:");
        let st = edgelb_command(&edgelb_bin, "status", &config).status()?;
        if !st.success() {
            bail!("`edgelb status` failed: {st}");
        }
    }
    if !interrupted() {
        eprintln!("== edgelb is balancing. One request per second from a rotating client follows;");
        match duration {
            Some(d) => eprintln!("   stopping in {d} s."),
            None => eprintln!("   Ctrl-C stops edgelb and removes the testbed."),
        }
    }
    let until = duration.map(|d| Instant::now() + Duration::from_secs(d));
    while !interrupted() && until.is_none_or(|u| Instant::now() < u) {
        if let Ok(Some(status)) = edgelb.child.try_wait() {
            bail!("edgelb exited: {status}");
        }
        let src = SocketAddr::new(IpAddr::V4(testbed::pool_addr(n % 1000)), 0);
        let who = netns::in_netns(&tb.names.client, || servers::http_get(Some(src), vip, timeout))?;
        match who {
            Ok(b) => eprintln!("   {} -> {vip} answered by {b}", src.ip()),
            Err(e) => {
                failed += 1;
                eprintln!("   {} -> {vip} FAILED: {e}", src.ip());
            }
        }
        n += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("== stopping edgelb and removing the testbed");
    let stopped = edgelb.stop();
    drop(tb);
    stopped?;
    if failed > 0 {
        bail!("{failed} of {n} requests failed");
    }
    eprintln!("== edgelb stopped, its data plane and the testbed are gone");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };

    use edgelb::testbed::servers;

    use super::{
        TEST_NAMESPACES, TEST_PIN_DIRS, TEST_TEMP, Tally, lock_testbed, run_config, tally_spread,
        test_made_pid, write_run_config,
    };

    /// Where a name a test makes goes, and so which of the sweep's lists must know it.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Kind {
        Namespace,
        PinDir,
        Temp,
    }

    /// Every namespace, pin directory and temporary file or directory that the tests, benches
    /// and unit tests name with their process's PID, read from their sources, as (kind, the
    /// name PID 4242 makes, where): each `format!` whose text starts with `el` or `edgelb-`
    /// (all of theirs do: `elb...`, `elgro...`, `edgelb-...`) or names a directory under
    /// /sys/fs/bpf/, and carries the PID: a `{}` given `std::process::id()`, a `{pid}` after a
    /// `let pid = std::process::id()`, or lifecycle.rs's `tag` (`<pid>-<test>`). Other fields
    /// read `x`.
    /// A temporary one when the statement joins it to `temp_dir()`, a pin directory under
    /// /sys/fs/bpf/, a namespace otherwise; a testbed's prefix (given to `Testbed::up`, or
    /// bound to `prefix`) gets a node's name after it (`-sw`), as the testbed's namespaces do.
    fn names_the_tests_make() -> Vec<(Kind, String, String)> {
        let root = super::workspace_root();
        let mut dirs: Vec<_> =
            ["tests", "benches", "lb-userspace/src", "lb-common/src", "xtask/src"]
                .iter()
                .map(|d| root.join(d))
                .collect();
        let mut files = Vec::new();
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
                let path = e.expect("a directory entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    files.push(path);
                }
            }
        }
        let mut names = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("a source file");
            let shown = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
            for (at, _) in text.match_indices("format!(") {
                let rest = text[at + "format!(".len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else { continue };
                let Some((template, args)) = format_parts(rest) else { continue };
                // The statement so far, and whether `pid` is this process's here.
                let before = &text[..at];
                let statement = &before[before.rfind([';', '{', '}']).map_or(0, |i| i + 1)..];
                let own_pid = before.rfind("let pid =").is_some_and(|i| {
                    text[i..].lines().next().is_some_and(|l| l.contains("process::id()"))
                });
                let Some((name, true)) = fill(template, args, own_pid) else { continue };
                let place = format!("{shown}:{}", before.lines().count());
                let (kind, name) = if let Some((_, pins)) = name.split_once("/sys/fs/bpf/") {
                    let pins = pins.split(['"', '\\', '/', ' ']).next().unwrap_or_default();
                    (Kind::PinDir, pins.to_owned())
                } else if !name.starts_with("el") && !name.starts_with("edgelb-") {
                    continue;
                } else if statement.contains("temp_dir()") {
                    (Kind::Temp, name)
                } else if statement.contains("Testbed::up(") || statement.contains("let prefix") {
                    (Kind::Namespace, format!("{name}-sw"))
                } else {
                    (Kind::Namespace, name)
                };
                names.push((kind, name, place));
            }
        }
        names
    }

    /// A `format!`'s text (`rest` starts after its opening quote) and its arguments after it, up
    /// to the closing parenthesis; None if the text has no end.
    fn format_parts(rest: &str) -> Option<(&str, Vec<String>)> {
        let mut escaped = false;
        let end = rest.bytes().position(|b| {
            let end = b == b'"' && !escaped;
            escaped = b == b'\\' && !escaped;
            end
        })?;
        let (mut depth, mut quoted, mut args, mut arg) = (0, false, Vec::new(), String::new());
        for c in rest[end + 1..].chars() {
            match c {
                '"' => quoted = !quoted,
                '(' | '[' if !quoted => depth += 1,
                ')' | ']' if !quoted && depth == 0 => break,
                ')' | ']' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    args.push(std::mem::take(&mut arg));
                    continue;
                }
                _ => {}
            }
            arg.push(c);
        }
        args.push(arg);
        // What came before the first comma is the text's own tail (nothing).
        Some((&rest[..end], args.into_iter().skip(1).collect()))
    }

    /// `template` with its fields filled in as [`names_the_tests_make`] says (each `{}` from
    /// `args` in turn), and whether one was the PID; None if it is no format string.
    fn fill(template: &str, args: Vec<String>, own_pid: bool) -> Option<(String, bool)> {
        let mut args = args.into_iter();
        let (mut name, mut carries_pid, mut rest) = (String::new(), false, template);
        while let Some(open) = rest.find('{') {
            name.push_str(&rest[..open]);
            if rest[open..].starts_with("{{") {
                name.push('{');
                rest = &rest[open + 2..];
                continue;
            }
            let close = open + rest[open..].find('}')?;
            let field = rest[open + 1..close].split(':').next().unwrap_or_default();
            let value = match field {
                "" => args.next().unwrap_or_default(),
                "pid" if own_pid => "std::process::id()".to_owned(),
                _ => field.to_owned(),
            };
            let value = value.trim();
            if value.ends_with("process::id()") {
                name.push_str("4242");
                carries_pid = true;
            } else if value == "tag" || value.ends_with(".tag") {
                name.push_str("4242-x");
                carries_pid = true;
            } else {
                name.push('x');
            }
            rest = &rest[close + 1..];
        }
        name.push_str(rest);
        Some((name, carries_pid))
    }

    /// Every namespace, pin directory and temporary file or directory the tests and benches
    /// make, found in their sources ([`names_the_tests_make`]), is recognised by the sweep with
    /// its PID: examples listed by hand here went stale as tests added names (`elfd<pid>`,
    /// `edgelb-repin-<pid>`, `edgelb-holders-<pid>`, ...), which a killed run then left for
    /// good. Matched whole: the sweep used to strip a prefix and read leading digits, so
    /// `elblbnsa<pid>` (`elbl` + `bnsa...`) and more were never removed. And names that are not
    /// a test's are left alone.
    #[test]
    fn every_name_the_tests_make_is_swept() {
        let names = names_the_tests_make();
        for kind in [Kind::Namespace, Kind::PinDir, Kind::Temp] {
            let n = names.iter().filter(|(k, ..)| *k == kind).count();
            assert!(n >= 5, "only {n} names of {kind:?} found in the sources: {names:?}");
        }
        let unswept: Vec<String> = names
            .iter()
            .filter(|(kind, name, _)| {
                let patterns = match kind {
                    Kind::Namespace => TEST_NAMESPACES,
                    Kind::PinDir => TEST_PIN_DIRS,
                    Kind::Temp => TEST_TEMP,
                };
                test_made_pid(patterns, name) != Some(4242)
            })
            .map(|(kind, name, place)| format!("{kind:?} {name} ({place})"))
            .collect();
        assert!(
            unswept.is_empty(),
            "names the tests make that the sweep does not know (a pattern for each belongs in \
             TEST_NAMESPACES, TEST_PIN_DIRS or TEST_TEMP):\n{}",
            unswept.join("\n")
        );
        for name in [
            "edgelb",
            "edgelb-decap",
            "elbl",
            "elbl-sw",
            "elbl4242",
            "elblbnsa",
            "elblbnsa4242x",
            "elbdecapz4242",
            "elgro4242-x",
            "testbed-sw",
            "elbt4242-",
        ] {
            assert_eq!(test_made_pid(TEST_NAMESPACES, name), None, "namespace {name}");
        }
        for name in [
            "edgelb",
            "edgelb-decap",
            "edgelb-t-cli-4242",
            "edgelb-t-cli--4242",
            "edgelb-t-4242",
            "edgelb-fixture-",
            "edgelb-links-4242-x",
            "edgelb-fixture-ct-x",
        ] {
            assert_eq!(test_made_pid(TEST_PIN_DIRS, name), None, "pin directory {name}");
        }
        for name in [
            "edgelb-build.lock",
            "edgelb-l7-bench-",
            "edgelb-admin",
            "edgelb-admin-4242-x",
            "edgelb-holders-4242.d",
            "edgelb-latin9-4242",
        ] {
            assert_eq!(test_made_pid(TEST_TEMP, name), None, "temporary {name}");
        }
    }

    /// `./x` starts with `cargo xtask`, whose build of xtask must take Cargo.lock as it is, as
    /// every cargo command xtask runs does (README): the alias had no `--locked`, and rewrote
    /// a stale Cargo.lock on a fresh node instead of failing there.
    #[test]
    fn the_xtask_alias_builds_locked() {
        let path = super::workspace_root().join(".cargo/config.toml");
        let text = std::fs::read_to_string(&path).expect("reading .cargo/config.toml");
        let alias = text
            .lines()
            .find(|l| l.trim_start().starts_with("xtask ") || l.trim_start().starts_with("xtask="))
            .expect("an xtask alias in .cargo/config.toml");
        assert!(alias.split(['"', ' ']).any(|w| w == "--locked"), "{alias}");
    }

    /// Ctrl-C during `run`'s spread of requests ends it before the next request: it used to
    /// send them all, each waiting out its timeout where nothing answered (300 of 2 s each
    /// before the teardown could start).
    #[test]
    fn a_spread_stops_before_the_next_request_once_asked() {
        // Takes connections (the kernel completes them into its backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("binding on loopback");
        let addr = silent.local_addr().expect("its address");
        let (stop, timeout) = (AtomicBool::new(false), Duration::from_millis(200));
        let started = Instant::now();
        let spread = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(500));
                stop.store(true, Ordering::Relaxed);
            });
            tally_spread(100, &stop, |_| servers::http_get(None, addr, timeout))
        });
        let took = started.elapsed();
        let sent: u32 = spread.values().sum();
        assert!(spread.keys().all(|who| who.starts_with("error: ")), "{spread:?}");
        assert!((1..100).contains(&sent), "{sent} sent: {spread:?}");
        // All 100 take 20 s; a stop costs the request in flight.
        assert!(took < Duration::from_secs(3), "took {took:?}: {spread:?}");
    }

    /// `testbed down` stops a left edgelb with the config `run` writes, written afresh even where
    /// there was none (a fresh clone, or after `cargo clean`, removed target/testbed/ too): it
    /// used to do nothing then.
    #[test]
    fn the_run_config_is_written_where_its_directory_is_missing() {
        let dir =
            std::env::temp_dir().join(format!("edgelb-xtask-config-test-{}", std::process::id()));
        let config = dir.join("testbed/edgelb.toml");
        let written = write_run_config(&config);
        let read = std::fs::read_to_string(&config);
        let _ = std::fs::remove_dir_all(&dir);
        written.expect("written with its directory made");
        let read = read.expect("there");
        assert_eq!(read, run_config());
        assert!(read.contains(&format!("admin_socket = \"{}\"", super::RUN_SOCKET)), "{read}");
    }

    /// `testbed down` takes the lock a live `run` holds, and is refused naming that run: it
    /// used to stop the run's edgelb and remove its namespaces under it. On a file of the
    /// test's own, not the machine's lock, which a real `run` may hold.
    #[test]
    fn a_held_testbed_lock_refuses_naming_its_holder() {
        struct Remove(std::path::PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path =
            std::env::temp_dir().join(format!("edgelb-xtask-lock-test-{}", std::process::id()));
        let _remove = Remove(path.clone());
        let held = lock_testbed(&path, "run").expect("a free lock is taken");
        let refused = lock_testbed(&path, "testbed down").expect_err("a held lock refuses");
        let msg = refused.to_string();
        assert!(msg.starts_with("testbed down: "), "{msg}");
        let holder = format!("`cargo xtask run` (PID {}, in ", std::process::id());
        assert!(msg.contains(&holder), "{msg}");
        drop(held);
        drop(lock_testbed(&path, "testbed down").expect("a lock let go of is taken again"));
    }

    /// `./x test`'s closing tally: a test that skipped through the gate (it printed `SKIPPED
    /// <reason>` on stderr, and libtest counted it as passed) is counted as skipped, not passed,
    /// and its reason is shown again; libtest's ignored tests are skipped too. Without this an
    /// unprivileged run reported "0 skipped" while most privileged tests had checked nothing.
    #[test]
    fn skipped_tests_are_counted_as_skipped_not_passed() {
        let mut t = Tally::default();
        for line in [
            "running 4 tests",
            "test a ... ok",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
             finished in 0.01s",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; \
             finished in 1.00s",
        ] {
            t.stdout_line(line);
        }
        for line in [
            "   Compiling lb-userspace v0.1.0",
            "SKIPPED x: needs root (CAP_BPF + CAP_NET_ADMIN) to load XDP programs",
            "note: a SKIPPED inside a line is no skip",
            "SKIPPED y: needs a second CPU to move a flow to",
        ] {
            t.stderr_line(line);
        }
        let s = t.summary();
        assert!(
            s.ends_with("3 passed, 1 failed, 3 skipped (2 by the skip gate, 1 ignored)\n"),
            "{s}"
        );
        assert!(s.contains("\n  SKIPPED x: needs root (CAP_BPF"), "{s}");
        assert!(s.contains("\n  SKIPPED y: needs a second CPU"), "{s}");
        assert!(!s.contains("inside"), "{s}");

        let mut clean = Tally::default();
        clean.stdout_line("test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured");
        assert_eq!(
            clean.summary(),
            "5 passed, 0 failed, 0 skipped (0 by the skip gate, 0 ignored)\n"
        );
    }
}
