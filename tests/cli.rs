//! The `edgelb` binary's command line: exit codes and messages operators and scripts rely on.

mod common;

use std::process::Command;

fn edgelb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgelb")).args(args).output().expect("run edgelb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn example_file() -> tempfile_path::TempPath {
    tempfile_path::write("example.toml", edgelb::config::EXAMPLE)
}

/// A file under the target dir that is removed on drop.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    /// Each call gets a file of its own: tests run in parallel threads of one process, and two
    /// asking for the same name (every user of `example_file`) would otherwise share one path,
    /// which the first to finish removes under the other.
    pub fn write(name: &str, text: &str) -> TempPath {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        let p = dir.join(format!("{}-{n}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        TempPath(p)
    }
}

#[test]
fn check_accepts_the_example() {
    let f = example_file();
    let (code, out, _) = edgelb(&["check", "--config", f.0.to_str().unwrap()]);
    assert_eq!(code, 0);
    // Backend entries as the 4096 limit counts them: the XDP-forwarded VIPs' (3 + 2 + 1), not
    // the L7 VIP's.
    assert!(out.contains("ok (3 VIPs, 1 of them L7; 6 backend entries"), "{out}");
}

#[test]
fn check_reports_file_line_column_and_exits_2() {
    let bad = edgelb::config::EXAMPLE.replace("port = 53", "port = 99999");
    let f = tempfile_path::write("bad.toml", &bad);
    let (code, _, err) = edgelb(&["check", "--config", f.0.to_str().unwrap()]);
    assert_eq!(code, 2);
    let line = bad.lines().position(|l| l.contains("99999")).unwrap() + 1;
    let want = format!("{}:{line}:8: ", f.0.display());
    assert!(err.starts_with(&want), "stderr {err:?} should start with {want:?}");
    // `run` refuses the same file the same way, with the same exit code, before anything else.
    let (code, _, err) = edgelb(&["run", "--config", f.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&want), "{err}");
}

/// contrib/edgelb.service does not restart a bad config in a loop: its `ExecStart=` (`edgelb
/// run`) exits on a bad file with a status `RestartPreventExitStatus=` lists, and no
/// `ExecStartPre=` runs before it. systemd applies `RestartPreventExitStatus=` to the main
/// process's status only: the unit once ran `edgelb check` as `ExecStartPre=`, whose exit 2
/// `Restart=on-failure` restarted every second until the start limit.
#[test]
fn the_unit_does_not_restart_a_bad_config_in_a_loop() {
    let unit = include_str!("../contrib/edgelb.service");
    let values = |key: &str| -> Vec<&str> {
        unit.lines().filter_map(|l| l.strip_prefix(key)).map(str::trim).collect()
    };
    assert_eq!(values("ExecStartPre="), Vec::<&str>::new(), "RestartPreventExitStatus= ignores it");
    assert_eq!(values("Restart="), ["on-failure"]);
    let prevent: Vec<i32> = values("RestartPreventExitStatus=")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|s| s.parse().expect("a numeric status"))
        .collect();
    let start = values("ExecStart=");
    let [start] = start.as_slice() else { panic!("one ExecStart=: {start:?}") };
    let mut args: Vec<&str> = start.split_whitespace().collect();
    assert_eq!(args[..2], ["/usr/local/bin/edgelb", "run"], "{start}");
    let bad = edgelb::config::EXAMPLE.replace("port = 53", "port = 99999");
    let f = tempfile_path::write("bad.toml", &bad);
    let config = args.iter().position(|a| *a == "--config").expect("--config in ExecStart") + 1;
    args[config] = f.0.to_str().unwrap();
    let (code, _, err) = edgelb(&args[1..]);
    assert!(prevent.contains(&code), "ExecStart exits {code}, not in {prevent:?}: {err}");
}

/// contrib/edgelb.service retries a start that fails (an interface not there yet at boot) for
/// at least a minute before systemd gives up on it: its start limit, with the pause between
/// restarts, lasts that long. Without one, systemd's default (5 starts in 10 s) gave up after
/// some 5 s.
#[test]
fn the_unit_retries_a_failed_start_for_a_minute() {
    let unit = include_str!("../contrib/edgelb.service");
    let value = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    // systemd's time spans as the unit writes them: "1s", "10min".
    let seconds = |v: &str| -> u64 {
        let unit_at = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
        let n: u64 = v[..unit_at].parse().unwrap_or_else(|_| panic!("a number in {v:?}"));
        match &v[unit_at..] {
            "" | "s" => n,
            "min" => n * 60,
            other => panic!("unit {other:?} in {v:?}"),
        }
    };
    let restart = seconds(value("RestartSec=").unwrap_or("100ms"));
    let interval = seconds(value("StartLimitIntervalSec=").unwrap_or("10s"));
    let burst: u64 = value("StartLimitBurst=").unwrap_or("5").parse().expect("a count");
    let retried = restart * burst;
    assert!(retried >= 60, "{burst} starts {restart} s apart: retried for {retried} s only");
    assert!(interval >= retried, "a window of {interval} s never fills: retried for ever");
    assert_eq!(value("Restart="), Some("on-failure"));
}

/// contrib/edgelb.service lets edgelb have a thread per health-checked backend: without a
/// `TasksMax=`, systemd's default (15% of pid_max, 4915 tasks where pid_max is 32768) left the
/// checks of a large config unstarted. It holds, twice over for a takeover, every XDP entry
/// and as many L7 backends as a file has without a caution, each checked, and 256 L7 threads.
#[test]
fn the_unit_lets_every_health_check_have_its_thread() {
    let unit = include_str!("../contrib/edgelb.service");
    let value =
        |key: &str| unit.lines().filter_map(|l| l.strip_prefix(key)).map(str::trim).next_back();
    let tasks = value("TasksMax=").expect("TasksMax= in contrib/edgelb.service");
    let needed =
        2 * (lb_common::MAX_BACKENDS as u64 + edgelb::config::L7_BACKENDS_CAUTION as u64 + 256);
    if tasks != "infinity" {
        let n: u64 = tasks.parse().unwrap_or_else(|_| panic!("TasksMax={tasks}: a count"));
        assert!(n >= needed, "TasksMax={n}: fewer than the {needed} threads of a large config");
    }
}

/// contrib/edgelb.service keeps uid 0 without capabilities from reaching the kernel through files
/// and calls it needs none of: after setup edgelb keeps no capability but stays uid 0, which may
/// still write `kernel.*` sysctls (`kernel.core_pattern` = `|/path` runs a program as full root
/// at the next crash), so a bug in the proxy would otherwise escape the sandbox.
#[test]
fn the_unit_closes_what_uid_0_without_capabilities_could_still_change() {
    let unit = include_str!("../contrib/edgelb.service");
    let value = |key: &str| -> Option<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::trim)
            .next_back()
    };
    for key in [
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectKernelModules",
        "ProtectHostname",
        "ProtectClock",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "RestrictRealtime",
        "RestrictNamespaces",
        "NoNewPrivileges",
    ] {
        assert_eq!(value(key), Some("yes"), "{key}= in contrib/edgelb.service");
    }
    assert_eq!(value("UMask"), Some("0077"));
    assert_eq!(value("ProtectSystem"), Some("strict"));
    // The pins stay writable below the read-only /sys of ProtectKernelTunables=.
    let rw = value("ReadWritePaths").expect("ReadWritePaths=");
    assert!(rw.split_whitespace().any(|p| p == "/sys/fs/bpf"), "{rw}");
}

/// A file that is accepted but likely not what was meant (a tcp check of a udp VIP without a
/// `port`) is a warning, not a refusal: `check` names the VIP and the place, and exits 0, as a
/// start would go ahead with it.
#[test]
fn check_warns_of_a_caution_and_exits_0() {
    let udp = "kind = \"udp\"\nsend = \"health?\"\nexpect = \"backend\"\n";
    assert!(edgelb::config::EXAMPLE.contains(udp), "the example's dns check changed");
    let text = edgelb::config::EXAMPLE.replace(udp, "kind = \"tcp\"\n");
    let f = tempfile_path::write("caution.toml", &text);
    let (code, out, err) = edgelb(&["check", "--config", f.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok ("), "{out}");
    let line = text.lines().position(|l| l == "kind = \"tcp\"").unwrap() + 1;
    let want = format!(
        "warning: {}:{line}:8: VIP `dns`: health kind = \"tcp\" on a udp VIP has no `port`",
        f.0.display()
    );
    assert!(err.starts_with(&want), "stderr {err:?} should start with {want:?}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // The example itself says nothing on stderr.
    let f = example_file();
    let (code, _, err) = edgelb(&["check", "--config", f.0.to_str().unwrap()]);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[test]
fn check_on_missing_file_exits_2() {
    let (code, _, err) = edgelb(&["check", "--config", "/nonexistent/edgelb.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/edgelb.toml: cannot read config"), "{err}");
}

/// An any-port VIP hashed on the 5-tuple places flows by their destination port too: `route`
/// takes it from the VIP given as address:port, and asks for it otherwise.
/// Runs edgelb with `args` as [`edgelb`] does, but fails the test (and stops it) if it has not
/// exited within 5 s: for what once waited without end.
fn edgelb_within_5s(args: &[&str]) -> (i32, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run edgelb");
    let mut child = Stopped(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "edgelb {args:?} still runs after 5 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code().unwrap_or(-1), out, err)
}

/// A config path that names no regular file is refused at once, naming it: a FIFO (opening one
/// waits for a writer: `edgelb reload`, and the controller's reload behind it, waited without
/// end) or a device (`check -c /dev/zero` read until memory ran out). A symbolic link to a
/// regular file, as config management makes them, is read.
#[test]
fn a_config_that_is_no_regular_file_is_refused_at_once() {
    let f = example_file();
    let fifo = tempfile_path::TempPath(f.0.with_extension("fifo"));
    let _ = std::fs::remove_file(&fifo.0);
    let made = Command::new("mkfifo").arg(&fifo.0).status().expect("mkfifo");
    assert!(made.success());
    let fifo_s = fifo.0.to_str().unwrap();
    for args in [["check", "--config", fifo_s], ["reload", "--config", fifo_s]] {
        let (code, _, err) = edgelb_within_5s(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(fifo_s) && err.contains("not a regular file"), "{args:?}: {err}");
    }
    let (code, _, err) = edgelb_within_5s(&["check", "--config", "/dev/zero"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/dev/zero") && err.contains("not a regular file"), "{err}");
    let link = tempfile_path::TempPath(f.0.with_extension("link.toml"));
    let _ = std::fs::remove_file(&link.0);
    std::os::unix::fs::symlink(&f.0, &link.0).unwrap();
    let (code, out, err) = edgelb_within_5s(&["check", "--config", link.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok ("), "{out}");
}

/// A config file larger than any config (16 MiB) is refused with the limit, not read whole.
#[test]
fn a_config_too_large_is_refused() {
    let mut text = edgelb::config::EXAMPLE.to_owned();
    let comment = format!("# {}\n", "x".repeat(1021));
    while text.len() <= 16 << 20 {
        text += &comment;
    }
    let f = tempfile_path::write("large.toml", &text);
    let path = f.0.to_str().unwrap();
    let (code, _, err) = edgelb_within_5s(&["check", "--config", path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(path) && err.contains("larger than 16 MiB"), "{err}");
    // Just below the limit it is read (and a comment is no error).
    text.truncate(16 << 20);
    text.truncate(text.rfind('\n').unwrap() + 1);
    std::fs::write(&f.0, &text).unwrap();
    let (code, _, err) = edgelb_within_5s(&["check", "--config", path]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn route_on_an_any_port_five_tuple_vip_uses_the_destination_port() {
    let text = edgelb::config::EXAMPLE.to_owned()
        + "\n[[vip]]\nname = \"any5\"\naddress = \"198.18.1.9\"\nhash = \"5tuple\"\nbackends = [{ address = \"198.18.0.11\", mac = \"02:ed:00:00:00:11\" }, { address = \"198.18.0.12\", mac = \"02:ed:00:00:00:12\" }, { address = \"198.18.0.13\", mac = \"02:ed:00:00:00:13\" }]\n";
    let cfg = edgelb::config::Config::parse(&text, "x".as_ref()).unwrap();
    let f = tempfile_path::write("any5.toml", &text);
    let path = f.0.to_str().unwrap();
    let (code, _, err) =
        edgelb(&["route", "--config", path, "198.18.4.1", "any5", "--sport", "4000"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("address:port"), "{err}");
    let mut differs = false;
    for (client, port) in
        [("198.18.4.1", 443u16), ("198.18.4.2", 8443), ("198.18.4.3", 25), ("198.18.4.4", 80)]
    {
        let spec = format!("198.18.1.9:{port}");
        let (code, out, err) =
            edgelb(&["route", "--config", path, client, &spec, "--sport", "4000"]);
        assert_eq!(code, 0, "{err}");
        let mut v = cfg.find_vip("any5", None).unwrap().clone();
        let at_zero = edgelb::dataplane::route(&v, client.parse().unwrap(), 4000).unwrap().address;
        v.port = port;
        let want = edgelb::dataplane::route(&v, client.parse().unwrap(), 4000).unwrap().address;
        assert_eq!(out.trim(), want.to_string());
        differs |= want != at_zero;
    }
    assert!(differs, "the port changes some placement (else this test shows nothing)");
}

/// A CLI command whose reader left (`edgelb status --json | head`) ends quietly, killed by
/// SIGPIPE as any Unix tool is, rather than panicking on EPIPE.
#[test]
fn a_closed_pipe_on_stdout_ends_a_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let f = example_file();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(["check", "--config"])
        .arg(&f.0)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}

#[test]
fn route_prints_the_backend_the_library_computes() {
    let f = example_file();
    let cfg = edgelb::config::Config::parse(edgelb::config::EXAMPLE, "x".as_ref()).unwrap();
    let web = cfg.find_vip("web", None).unwrap();
    for client in ["198.18.4.1", "198.18.4.2", "198.18.4.3", "198.18.7.200"] {
        let (code, out, err) = edgelb(&["route", "--config", f.0.to_str().unwrap(), client, "web"]);
        assert_eq!(code, 0, "{err}");
        let want = edgelb::dataplane::route(web, client.parse().unwrap(), 0).unwrap().address;
        assert_eq!(out.trim(), want.to_string());
    }
    let (code, _, err) =
        edgelb(&["route", "--config", f.0.to_str().unwrap(), "198.18.4.1", "nope"]);
    assert_eq!(code, 2);
    assert!(err.contains("no VIP named `nope`"), "{err}");
    // A client written IPv4-mapped is the IPv4 client XDP sees; one of the other family is
    // refused, as its packets never reach the VIP.
    let path = f.0.to_str().unwrap();
    for client in ["198.18.4.1", "198.18.4.2", "198.18.4.3", "198.18.7.200"] {
        let mapped = format!("::ffff:{client}");
        let (code, out, err) = edgelb(&["route", "--config", path, &mapped, "web"]);
        let want = edgelb::dataplane::route(web, client.parse().unwrap(), 0).unwrap().address;
        assert_eq!((code, out.trim()), (0, want.to_string().as_str()), "{mapped}: {err}");
    }
    let (code, _, err) = edgelb(&["route", "--config", path, "2001:db8::1", "web"]);
    assert_eq!(code, 2);
    assert!(err.contains("different address families"), "{err}");
    // An address two VIPs share (web, tcp/80, and dns, udp/53) names both, not the first.
    let (code, _, err) = edgelb(&["route", "--config", path, "198.18.4.1", "198.18.1.1"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("web (") && err.contains("dns (") && err.contains("address:port"),
        "{err}"
    );
    let dns = cfg.find_vip("dns", None).unwrap();
    let want = edgelb::dataplane::route(dns, "198.18.4.1".parse().unwrap(), 0).unwrap().address;
    for spec in [&["198.18.1.1:53"][..], &["198.18.1.1:53", "--proto", "udp"], &["dns"]] {
        let mut args = vec!["route", "--config", path, "198.18.4.1"];
        args.extend_from_slice(spec);
        let (code, out, err) = edgelb(&args);
        assert_eq!((code, out.trim()), (0, want.to_string().as_str()), "{spec:?}: {err}");
    }
    let (code, _, err) =
        edgelb(&["route", "--config", path, "198.18.4.1", "198.18.1.1:53", "--proto", "tcp"]);
    assert_eq!(code, 2, "no TCP VIP on port 53: {err}");
}

/// An L7 VIP's proxy picks a backend per request: `route` has no answer for one of its flows,
/// and says so as a question it cannot answer (exit 2), not as a VIP without a backend for new
/// flows (exit 1), which scripts alert on.
#[test]
fn route_on_an_l7_vip_is_a_question_without_an_answer() {
    let f = example_file();
    let path = f.0.to_str().unwrap();
    for extra in [&[][..], &["--from-file"]] {
        let mut args = vec!["route", "--config", path];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["198.18.4.1", "web7"]);
        let (code, out, err) = edgelb(&args);
        assert_eq!((code, out.as_str()), (2, ""), "{extra:?}: {err}");
        assert!(err.contains("is L7: its proxy picks a backend per request"), "{err}");
    }
}

/// The admin commands' help says what of the config file each uses: the admin socket, and
/// `node.pin_dir` only for `stop` (it once said every command used it).
#[test]
fn admin_help_says_only_stop_uses_the_pin_dir() {
    for cmd in ["status", "drain", "undrain", "route", "reload", "stop"] {
        let (code, out, err) = edgelb(&[cmd, "--help"]);
        assert_eq!(code, 0, "{cmd}: {err}");
        let help = out.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            help.contains("its node.admin_socket is where the running edgelb is asked"),
            "{cmd}: {help}"
        );
        assert!(!help.contains("node.pin_dir are used"), "{cmd}: {help}");
        assert!(
            help.contains(
                "`stop` with none answering also removes the data plane under its node.pin_dir"
            ),
            "{cmd}: {help}"
        );
    }
}

#[test]
fn run_refuses_a_passed_descriptor_that_is_not_a_listening_socket() {
    // As systemd would pass sockets (LISTEN_PID is the shell's PID, which edgelb inherits by
    // exec), but descriptor 3 is a file. Refused before anything else happens.
    let f = tempfile_path::write("passed-fd.toml", edgelb::config::EXAMPLE);
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" run --config "$1" 3</dev/null"#)
        .arg(env!("CARGO_BIN_EXE_edgelb"))
        .arg(&f.0)
        .output()
        .expect("run edgelb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("descriptor 3 passed by the service manager"), "{err}");
}

/// The example config with its interface, pin directory and admin socket replaced, for a `run`
/// that must stop before it touches anything.
fn run_config(name: &str, interface: &str) -> (tempfile_path::TempPath, String, String) {
    let pins = format!("/sys/fs/bpf/edgelb-t-cli-{name}-{}", std::process::id());
    let admin = format!("{}/{name}-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let text = edgelb::config::EXAMPLE.replace(
        "interfaces = [\"lb0\"]",
        &format!(
            "interfaces = [\"{interface}\"]\npin_dir = \"{pins}\"\nadmin_socket = \"{admin}\""
        ),
    );
    assert!(text.contains(&pins), "the example's interfaces line moved");
    (tempfile_path::write(&format!("{name}.toml"), &text), pins, admin)
}

#[test]
fn run_stops_before_touching_anything_when_an_interface_is_missing() {
    let (f, pins, admin) = run_config("no-iface", "edgelb-nosuch0");
    let (code, _, err) = edgelb(&["run", "--config", f.0.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("interface `edgelb-nosuch0` (node.interfaces) does not exist"), "{err}");
    assert!(!std::path::Path::new(&pins).exists(), "nothing pinned");
    assert!(!std::path::Path::new(&admin).exists(), "no admin socket");
}

/// An admin socket that cannot be made says the step that failed and its cause once: it said
/// "admin socket X: Permission denied (os error 13): Permission denied (os error 13)", the
/// message and then the chain repeating its source. Here its directory would be below a
/// regular file (which root cannot get around either). A `--takeover` whose handover fails
/// says why once too: it said the whole admin error twice.
#[test]
fn an_admin_socket_that_cannot_be_made_says_the_step_and_the_cause_once() {
    let (f, pins, admin) = run_config("admin-notdir", "lo");
    let file = tempfile_path::write("admin-notdir.file", "");
    let dir = format!("{}/sub", file.0.display());
    let socket = format!("{dir}/admin.sock");
    let good = std::fs::read_to_string(&f.0).unwrap();
    std::fs::write(&f.0, good.replace(&admin, &socket)).unwrap();
    let (code, _, err) = edgelb(&["run", "--config", f.0.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let cause = "Not a directory (os error 20)";
    assert_eq!(err.matches(cause).count(), 1, "{err}");
    let want = format!("edgelb: admin socket {socket}: creating its directory {dir}: {cause}\n");
    assert!(err.ends_with(&want), "{err}");
    assert!(!std::path::Path::new(&pins).exists(), "nothing pinned");

    if !edgelb::testbed::netns::require_privileged("an_admin_socket_that_cannot_be_made") {
        return;
    }
    // Something that hangs up once it has the request listens where the running edgelb would.
    std::fs::write(&f.0, &good).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&admin).unwrap();
    let _socket = tempfile_path::TempPath(admin.clone().into());
    let hang_up = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut request = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&conn), &mut request).unwrap();
    });
    let (code, _, err) = edgelb(&["run", "--takeover", "--config", f.0.to_str().unwrap()]);
    hang_up.join().unwrap();
    // The takeover loads its programs beside the running ones before it asks: their directory
    // may be left, empty.
    let _ = std::fs::remove_dir(&pins);
    assert_eq!(code, 1, "{err}");
    let reason = "hung up before answering";
    assert_eq!(err.matches(reason).count(), 1, "{err}");
    let want = format!("edgelb: taking over: admin socket {admin}: the running edgelb {reason}\n");
    assert!(err.ends_with(&want), "{err}");
}

#[test]
fn run_stops_when_the_kernel_refuses_io_uring_to_the_l7_proxy() {
    use std::os::unix::process::CommandExt;
    // The example has an L7 VIP. edgelb runs under a seccomp filter that fails io_uring_setup
    // with EPERM, as `kernel.io_uring_disabled` or a container's profile would; the interface is
    // missing too, so a run that got past the io_uring check would stop there instead.
    let (f, pins, _) = run_config("no-uring", "edgelb-nosuch0");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgelb"));
    cmd.args(["run", "--config"]).arg(&f.0);
    // SAFETY: between fork and exec the closure only makes two prctl calls on a filter that
    // lives on the parent's stack, copied into the child's address space by fork; no allocation.
    unsafe { cmd.pre_exec(common::deny_io_uring_setup) };
    let out = cmd.output().expect("run edgelb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("L7 proxy: io_uring is unavailable"), "{err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(!std::path::Path::new(&pins).exists(), "nothing pinned");
}

/// `edgelb run` of the example (an L7 VIP, a thread per CPU) under the locked-memory limit
/// `soft`/`hard` (bytes): its exit code and stderr. The interface is missing, so a run whose
/// io_uring check passed stops there, with nothing touched.
fn run_under_memlock(name: &str, soft: u64, hard: u64) -> (Option<i32>, String, String) {
    use std::os::unix::process::CommandExt;
    let (f, pins, _) = run_config(name, "edgelb-nosuch0");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgelb"));
    cmd.args(["run", "--config"]).arg(&f.0);
    // SAFETY: between fork and exec only setrlimit runs, async-signal-safe, on a struct on the
    // child's stack.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run edgelb");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into(), pins)
}

/// Each L7 thread's io_uring is charged to the locked-memory limit once edgelb has dropped its
/// capabilities (about 256 KiB each): under a container's default soft limit of 64 KiB not one
/// thread started ("Cannot allocate memory"). edgelb raises the soft limit to the hard one, as
/// for open files, and its check of the rings, made as the proxy threads will run, passes.
/// The hard limit is this process's (raising it needs CAP_SYS_RESOURCE), if it holds the rings.
#[test]
fn run_raises_a_small_soft_memlock_limit_to_the_hard_one_for_the_l7_rings() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limit into `lim`, a valid rlimit on this stack.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) }, 0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(256) as u64;
    // Twice the rings, for those of other edgelb processes of this user (other tests').
    if lim.rlim_max < 2 * threads * edgelb::proxy::RING_BYTES as u64 {
        eprintln!(
            "skipped: the hard RLIMIT_MEMLOCK ({} bytes) cannot hold the rings",
            lim.rlim_max
        );
        return;
    }
    let (code, err, pins) = run_under_memlock("memlock-soft", 64 << 10, lim.rlim_max);
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("io_uring is unavailable"), "{err}");
    assert!(err.contains("interface `edgelb-nosuch0` (node.interfaces) does not exist"), "{err}");
    assert!(!std::path::Path::new(&pins).exists(), "nothing pinned");
}

/// A hard locked-memory limit too small for the L7 threads' rings stops the start before
/// anything is touched, saying it is the limit, what it is, what the threads need and how to
/// raise it, instead of a bare "Cannot allocate memory" once the data plane was taken over.
#[test]
fn run_says_when_the_memlock_limit_cannot_hold_the_l7_rings() {
    let (code, err, pins) = run_under_memlock("memlock-hard", 64 << 10, 64 << 10);
    assert_eq!(code, Some(1), "{err}");
    for want in [
        "L7 proxy: io_uring is unavailable (Cannot allocate memory",
        "RLIMIT_MEMLOCK, now 64 KiB",
        "about 256 KiB each",
        "twice that during a takeover",
        "LimitMEMLOCK=infinity",
        "ulimit -l",
    ] {
        assert!(err.contains(want), "no {want:?} in: {err}");
    }
    assert!(!std::path::Path::new(&pins).exists(), "nothing pinned");
}

/// `--allow-source` refuses what would not allow what was meant, before anything is attached
/// (exit 2): a `/` with no length (an unset `$LEN`) used to be read as a single host, and an
/// IPv4-mapped IPv6 prefix never matches an IPv4 tunnel. The interface does not exist, so a
/// prefix taken by mistake fails at the attach (exit 1), touching nothing either.
#[test]
fn decap_refuses_prefixes_that_would_not_allow_what_was_meant() {
    for (bad, says) in [
        ("198.19.0.0/", "bad prefix length"),
        ("2001:db8::/", "bad prefix length"),
        ("198.19.0.0/-16", "bad prefix length"),
        ("::ffff:198.19.0.0/112", "IPv4-mapped"),
        ("198.19.0.0/33", "at most /32"),
    ] {
        let (code, _, err) = edgelb(&["decap", "attach", "nosuch0", "--allow-source", bad]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// `decap --allow-source` is given the balancers' `encap_source_v4`, and reads a prefix as
/// `edgelb check` (and `run`) read that key, with one parser: a length is digits, and a `+`
/// before them, which the config took before (a file that ran must run after an upgrade), is
/// taken by both with a warning that says how to write it. An IPv4 length the config refuses
/// for its own reasons (past 16..=32) is not in this table: `--allow-source` may name any range.
#[test]
fn check_and_decap_read_a_prefix_alike() {
    #[derive(Debug, PartialEq)]
    enum Verdict {
        Taken,
        Cautioned,
        Refused,
    }
    use Verdict::*;
    for (prefix, want) in [
        ("198.19.0.0/16", Taken),
        ("198.19.0.0/016", Taken),
        ("198.19.0.0", Taken),
        ("198.19.0.0/+16", Cautioned),
        ("198.19.0.0/+016", Cautioned),
        ("198.19.0.0/", Refused),
        ("198.19.0.0/+", Refused),
        ("198.19.0.0/++16", Refused),
        ("198.19.0.0/-16", Refused),
        ("198.19.0.0/ 16", Refused),
        ("198.19.0.0/0x10", Refused),
        ("198.19.0.0/33", Refused),
        ("198.19.0.0/272", Refused),
        ("198.19.0/16", Refused),
    ] {
        let text = edgelb::config::EXAMPLE.replace(
            "encap_source_v4 = \"198.19.0.0/16\"",
            &format!("encap_source_v4 = \"{prefix}\""),
        );
        assert!(text.contains(prefix), "the example's encap_source_v4 changed");
        let f = tempfile_path::write("prefix.toml", &text);
        let (code, _, err) = edgelb(&["check", "--config", f.0.to_str().unwrap()]);
        let caution = "a prefix length is digits alone, without a `+`: read as 198.19.0.0/16";
        let checked = match code {
            0 if err.contains(&format!("encap_source_v4 `{prefix}`: {caution}")) => Cautioned,
            0 if err.is_empty() => Taken,
            2 => Refused,
            _ => panic!("check {prefix}: exit {code}: {err}"),
        };
        assert_eq!(checked, want, "check {prefix}: {err}");
        // No such interface: a prefix taken fails at the attach (exit 1), touching nothing.
        let (code, _, err) = edgelb(&["decap", "attach", "nosuch0", "--allow-source", prefix]);
        let warning = format!("edgelb: warning: --allow-source `{prefix}`: {caution}");
        let decap = match code {
            1 if err.contains(&warning) => Cautioned,
            1 if !err.contains("warning") => Taken,
            2 => Refused,
            _ => panic!("decap {prefix}: exit {code}: {err}"),
        };
        assert_eq!(decap, want, "decap {prefix}: {err}");
    }
}

/// `edgelb decap` on a backend: the decapsulator stays attached after the command exits (its
/// link is pinned), a second `attach` upgrades it in place, `detach` removes it and its pins.
#[test]
fn decap_attaches_a_pinned_decapsulator_and_detaches_it() {
    if !edgelb::testbed::netns::require_privileged("decap_attaches_a_pinned_decapsulator") {
        return;
    }
    let pid = std::process::id();
    let ns = format!("elbdecap{pid}");
    let pins = format!("/sys/fs/bpf/edgelb-decap-test-{pid}");
    let _ns = TestNs::new(&ns, &pins);
    ip(&["-n", &ns, "link", "add", "vd0", "type", "veth", "peer", "name", "vd1"]);
    ip(&["-n", &ns, "link", "set", "vd0", "up"]);
    let run = |args: &[&str]| edgelb_in(&ns, args);
    let attached = || ip(&["-n", &ns, "-d", "link", "show", "vd0"]).contains("edgelb_decap");

    let (code, out, err) = run(&["decap", "attach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("attached to vd0"), "{out}");
    assert!(attached(), "attached after the command exited");
    let (code, out, err) = run(&["decap", "attach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(replaced)"), "{out}");
    assert!(attached());
    let (code, _, err) = run(&["decap", "attach", "nosuch0", "--pin-dir", &pins]);
    assert_eq!(code, 1);
    assert!(err.contains("no network interface `nosuch0`"), "{err}");

    let (code, out, err) = run(&["decap", "detach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("detached from vd0"), "{out}");
    assert!(!attached(), "detached");
    assert!(!std::path::Path::new(&pins).exists(), "its pin directory removed");
    let (code, out, _) = run(&["decap", "detach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0);
    assert!(out.contains("no decapsulator"), "{out}");
    let (code, _, _) = run(&["decap", "attach", "vd0", "--pin-dir", "/tmp/x"]);
    assert_eq!(code, 2, "pins only under /sys/fs/bpf");
}

/// Runs the edgelb binary with `args` inside network namespace `ns`, but with the root's
/// /sys/fs/bpf (`ip netns exec` would hide it): exit code, stdout, stderr.
fn edgelb_in(ns: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(env!("CARGO_BIN_EXE_edgelb"))
        .args(args)
        .output()
        .expect("nsenter edgelb");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The id and name of the XDP program on `dev` in namespace `ns` (`ip -d link` shows them as
/// `prog/xdp id N name NAME`); `None` when it runs none.
fn xdp_prog_in(ns: &str, dev: &str) -> Option<(u32, String)> {
    let text = ip(&["-n", ns, "-d", "link", "show", dev]);
    let rest = &text[text.find("prog/xdp id ")? + "prog/xdp id ".len()..];
    let mut words = rest.split_whitespace();
    let id = words.next()?.parse().ok()?;
    let name = if words.next() == Some("name") { words.next()?.to_owned() } else { String::new() };
    Some((id, name))
}

/// Loads the balancer with its pins in `pins` and attaches it to `dev` in namespace `ns`, and
/// leaves it there (its link pinned), as `edgelb stop --detach` leaves a data plane.
fn leave_balancer_attached(ns: &str, pins: &str, dev: &str) {
    edgelb::testbed::netns::in_netns(ns, || {
        let shape =
            edgelb::dataplane::TableShape::for_flows(Some(edgelb::config::MIN_CONNTRACK_FLOWS));
        let mut dp = edgelb::dataplane::Dataplane::load_with_table(Some(pins.as_ref()), shape)
            .expect("load the balancer");
        dp.attach(dev, edgelb::config::XdpAttachMode::Generic).expect("attach the balancer");
    })
    .unwrap();
}

/// A namespace of the test's own with a veth pair `vd0`/`vd1`, `vd0` up.
fn ns_with_vd0(name: &str, pins: &str) -> TestNs {
    let ns = TestNs::new(name, pins);
    ip(&["-n", name, "link", "add", "vd0", "type", "veth", "peer", "name", "vd1"]);
    ip(&["-n", name, "link", "set", "vd0", "up"]);
    ns
}

/// bpffs is one for every network namespace, and a decapsulator's pin is named by its
/// interface's name only: with one pin directory, namespace B's `decap attach vd0` found
/// namespace A's pin, replaced A's program (A took B's allowed sources), said "(replaced)",
/// and left B's vd0 without a decapsulator; B's `detach` then removed A's. Both are refused now,
/// and A keeps its decapsulator, program and allowed sources.
#[test]
fn decap_leaves_another_namespaces_pin_alone() {
    if !edgelb::testbed::netns::require_privileged("decap_leaves_another_namespaces_pin_alone") {
        return;
    }
    let pid = std::process::id();
    let (a, b) = (format!("elbdecapa{pid}"), format!("elbdecapb{pid}"));
    let pins = format!("/sys/fs/bpf/edgelb-decap-ns-test-{pid}");
    let _a = ns_with_vd0(&a, &pins);
    let _b = ns_with_vd0(&b, &pins);

    let (code, _, err) = edgelb_in(
        &a,
        &["decap", "attach", "vd0", "--pin-dir", &pins, "--allow-source", "198.19.0.0/16"],
    );
    assert_eq!(code, 0, "{err}");
    let (a_prog, name) = xdp_prog_in(&a, "vd0").expect("A's vd0 runs the decapsulator");
    assert_eq!(name, "edgelb_decap");

    let (code, out, err) = edgelb_in(
        &b,
        &["decap", "attach", "vd0", "--pin-dir", &pins, "--allow-source", "198.18.9.0/24"],
    );
    assert_eq!(code, 1, "B's attach is refused: {out}{err}");
    assert!(err.contains("another network namespace") && err.contains("--pin-dir"), "{err}");
    assert!(!out.contains("attached"), "{out}");
    assert_eq!(xdp_prog_in(&b, "vd0"), None, "nothing on B's vd0");
    // The same program on A's vd0: its maps, the allowed sources, are the ones A gave.
    assert_eq!(xdp_prog_in(&a, "vd0"), Some((a_prog, name.clone())), "A's untouched");

    let (code, out, err) = edgelb_in(&b, &["decap", "detach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 1, "B's detach is refused: {out}{err}");
    assert!(err.contains("another network namespace"), "{err}");
    assert_eq!(xdp_prog_in(&a, "vd0"), Some((a_prog, name)), "A still attached");

    // A's own re-attach replaces its program in place, and its detach removes it.
    let (code, out, err) = edgelb_in(&a, &["decap", "attach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(replaced)"), "{out}");
    let (again, _) = xdp_prog_in(&a, "vd0").expect("A's vd0 runs the decapsulator");
    assert_ne!(again, a_prog, "the new program");
    // A pin whose interface was deleted holds nothing: the next attach replaces it afresh.
    ip(&["-n", &a, "link", "del", "vd0"]);
    ip(&["-n", &a, "link", "add", "vd0", "type", "veth", "peer", "name", "vd1"]);
    ip(&["-n", &a, "link", "set", "vd0", "up"]);
    let (code, out, err) = edgelb_in(&a, &["decap", "attach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("attached to vd0") && !out.contains("(replaced)"), "{out}");
    assert!(xdp_prog_in(&a, "vd0").is_some_and(|(_, n)| n == "edgelb_decap"));
    let (code, out, err) = edgelb_in(&a, &["decap", "detach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("detached from vd0"), "{out}");
    assert_eq!(xdp_prog_in(&a, "vd0"), None);
}

/// `decap` with --pin-dir at a balancer's pin directory finds the balancer's link pinned under
/// the interface's name: `attach` turned the balancer into a decapsulator and `detach` removed
/// it. Both are refused now, and the balancer stays.
#[test]
fn decap_leaves_a_balancers_link_pin_alone() {
    if !edgelb::testbed::netns::require_privileged("decap_leaves_a_balancers_link_pin_alone") {
        return;
    }
    let pid = std::process::id();
    let ns = format!("elbdecapl{pid}");
    let pins = format!("/sys/fs/bpf/edgelb-decap-lb-test-{pid}");
    let _ns = ns_with_vd0(&ns, &pins);
    leave_balancer_attached(&ns, &pins, "vd0");
    let (lb_prog, name) = xdp_prog_in(&ns, "vd0").expect("the balancer runs on vd0");
    assert!(name.starts_with("edgelb_balance"), "{name}");

    let (code, out, err) = edgelb_in(&ns, &["decap", "attach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 1, "attach is refused: {out}{err}");
    assert!(err.contains("not edgelb's decapsulator") && err.contains("edgelb_balance"), "{err}");
    assert_eq!(xdp_prog_in(&ns, "vd0"), Some((lb_prog, name.clone())), "the balancer stays");
    let (code, out, err) = edgelb_in(&ns, &["decap", "detach", "vd0", "--pin-dir", &pins]);
    assert_eq!(code, 1, "detach is refused: {out}{err}");
    assert!(err.contains("not edgelb's decapsulator"), "{err}");
    assert_eq!(xdp_prog_in(&ns, "vd0"), Some((lb_prog, name)), "the balancer stays");
    assert!(std::path::Path::new(&pins).join("link-vd0").exists(), "its pin stays");
}

/// bpffs is one for every network namespace, and the balancer's link pin is named by its
/// interface's name only: with one node.pin_dir, namespace B's start adopted namespace A's maps
/// (its flows, rings and counters, to be overwritten with B's config), put B's program on A's
/// `vd0` through A's pinned link, reported B's `vd0` as attached, and left it without XDP. It is
/// refused now, before any map is adopted, and A's data plane keeps running.
///
/// Within one namespace the pins follow interface renames: a start naming the interface by its
/// new name took nothing over (its attach was refused, the device running edgelb's program
/// already), and one naming a new interface made under the old name put its program on the
/// renamed device through the old pin, leaving the new one without XDP.
#[test]
fn a_balancers_pins_stay_in_their_namespace_and_follow_renames() {
    if !edgelb::testbed::netns::require_privileged(
        "a_balancers_pins_stay_in_their_namespace_and_follow_renames",
    ) {
        return;
    }
    let pid = std::process::id();
    let (a, b) = (format!("elblbnsa{pid}"), format!("elblbnsb{pid}"));
    let pins = format!("/sys/fs/bpf/edgelb-lb-ns-test-{pid}");
    let _a = ns_with_vd0(&a, &pins);
    let _b = ns_with_vd0(&b, &pins);
    let shape = edgelb::dataplane::TableShape::for_flows(Some(edgelb::config::MIN_CONNTRACK_FLOWS));
    let load = |ns: &str, dev: &str| {
        edgelb::testbed::netns::in_netns(ns, || {
            edgelb::dataplane::Dataplane::load_with_table(Some(pins.as_ref()), shape)
                .map(|mut dp| dp.attach(dev, edgelb::config::XdpAttachMode::Generic).map(|_| ()))
        })
        .unwrap()
    };
    let pin = |dev: &str| std::path::Path::new(&pins).join(format!("link-{dev}"));
    let link_id = |dev: &str| {
        aya::programs::links::PinnedLink::from_pin(pin(dev))
            .ok()
            .and_then(|l| aya::programs::links::FdLink::from(l).info().ok())
            .map(|i| i.id())
    };
    // A's data plane, left pinned as a stop with --detach leaves it.
    load(&a, "vd0").expect("A loads").expect("A attaches");
    let (a_prog, name) = xdp_prog_in(&a, "vd0").expect("A's vd0 runs the balancer");
    assert!(name.starts_with("edgelb_balance"), "{name}");
    let pinned = || {
        let mut names: Vec<String> = std::fs::read_dir(&pins)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let p = std::path::Path::new(&pins).join(&n);
                let id = aya::maps::MapInfo::from_pin(&p).map(|m| m.id()).unwrap_or(0);
                (n, id)
            })
            .collect::<Vec<_>>()
    };
    let before = pinned();

    let err = match load(&b, "vd0") {
        Ok(_) => panic!("B's start in A's pin directory is refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("another network namespace") && err.contains("node.pin_dir of its own"),
        "{err}"
    );
    assert_eq!(xdp_prog_in(&b, "vd0"), None, "nothing on B's vd0");
    assert_eq!(xdp_prog_in(&a, "vd0"), Some((a_prog, name)), "A's program stays");
    assert_eq!(pinned(), before, "A's maps stay pinned, none replaced");

    // A's vd0 renamed vd9: a start naming vd9 takes its link over, under the new name.
    let link = link_id("vd0").expect("A's link");
    ip(&["-n", &a, "link", "set", "vd0", "down"]);
    ip(&["-n", &a, "link", "set", "vd0", "name", "vd9"]);
    ip(&["-n", &a, "link", "set", "vd9", "up"]);
    load(&a, "vd9").expect("A loads").expect("A attaches vd9");
    assert_eq!(link_id("vd9"), Some(link), "the same link, its pin renamed");
    assert!(!pin("vd0").exists(), "no pin left under the old name");
    let (now, _) = xdp_prog_in(&a, "vd9").expect("vd9 runs the balancer");
    assert_ne!(now, a_prog, "the new program, put on the link in place");

    // vd9 renamed vd5 and a new vd9 made: a start naming vd9 attaches the new one, and vd5's
    // link moves to vd5's name (where a start's removal of unused links would find it).
    ip(&["-n", &a, "link", "set", "vd9", "down"]);
    ip(&["-n", &a, "link", "set", "vd9", "name", "vd5"]);
    ip(&["-n", &a, "link", "set", "vd5", "up"]);
    ip(&["-n", &a, "link", "add", "vd9", "type", "veth", "peer", "name", "vd2"]);
    ip(&["-n", &a, "link", "set", "vd9", "up"]);
    load(&a, "vd9").expect("A loads").expect("A attaches the new vd9");
    assert_eq!(link_id("vd5"), Some(link), "vd5's link, pinned under its name");
    let fresh = link_id("vd9").expect("the new vd9's link");
    assert_ne!(fresh, link);
    assert!(xdp_prog_in(&a, "vd9").is_some(), "the new vd9 runs the balancer");
    assert_eq!(xdp_prog_in(&a, "vd5").map(|(id, _)| id), Some(now), "vd5 keeps its program");
}

/// `edgelb stop` with no controller, for a config whose node.pin_dir holds nothing (changed
/// since the data plane was started, which runs on from another pin directory): it said "data
/// plane removed" and exited 0 while the balancer ran on, unwatched. It now says nothing was
/// pinned there, names the balancer still running and where its link is pinned, and exits 1;
/// the config naming that pin directory removes it.
#[test]
fn stop_says_when_the_balancer_runs_from_another_pin_directory() {
    if !edgelb::testbed::netns::require_privileged(
        "stop_says_when_the_balancer_runs_from_another_pin_directory",
    ) {
        return;
    }
    let pid = std::process::id();
    let ns = format!("elbstopel{pid}");
    let (old, old_pins, _) = run_config("stop-old-pins", "vd0");
    let (new, new_pins, _) = run_config("stop-new-pins", "vd0");
    let _ns = ns_with_vd0(&ns, &old_pins);
    leave_balancer_attached(&ns, &old_pins, "vd0");
    let (prog, _) = xdp_prog_in(&ns, "vd0").expect("the balancer runs on vd0");

    let (code, out, err) = edgelb_in(&ns, &["stop", "-c", new.0.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("nothing of edgelb's pinned under {new_pins}")), "{out}");
    assert!(!out.contains("removed"), "{out}");
    assert!(
        err.contains("still runs on `vd0`") && err.contains(&format!("{old_pins}/link-vd0")),
        "{err}"
    );
    assert_eq!(xdp_prog_in(&ns, "vd0").map(|(id, _)| id), Some(prog), "left running");

    // vd0 renamed vd9, and the config naming vd9 with the data plane's pin directory, whose
    // link is still pinned under the old name: that is this config's data plane, removed
    // (`stop` tore it down, then said it still ran, "pinned nowhere", and exited 1).
    ip(&["-n", &ns, "link", "set", "vd0", "down"]);
    ip(&["-n", &ns, "link", "set", "vd0", "name", "vd9"]);
    ip(&["-n", &ns, "link", "set", "vd9", "up"]);
    let text = std::fs::read_to_string(&old.0).unwrap();
    assert!(text.contains("interfaces = [\"vd0\"]"));
    let renamed =
        tempfile_path::write("stop-renamed.toml", &text.replace("[\"vd0\"]", "[\"vd9\"]"));
    let (code, out, err) = edgelb_in(&ns, &["stop", "-c", renamed.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed") && !err.contains("still runs"), "{out}{err}");
    let gone = std::time::Instant::now();
    while xdp_prog_in(&ns, "vd9").is_some() {
        assert!(gone.elapsed() < std::time::Duration::from_secs(5), "still attached");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A second stop right after: nothing pinned, nothing running, no false alarm.
    let (code, out, err) = edgelb_in(&ns, &["stop", "-c", old.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("nothing of edgelb's pinned"), "{out}");
    // A pin directory deeper under bpffs than the search for pins elsewhere goes: its own
    // links are still its own (it said "still runs ... pinned nowhere" and exited 1).
    let deep = format!("{old_pins}/a/b/c/d");
    leave_balancer_attached(&ns, &deep, "vd9");
    let deep_cfg = tempfile_path::write(
        "stop-deep.toml",
        &std::fs::read_to_string(&renamed.0).unwrap().replace(&old_pins, &deep),
    );
    let (code, out, err) = edgelb_in(&ns, &["stop", "-c", deep_cfg.0.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed") && !err.contains("still runs"), "{out}{err}");
}

/// Out of descriptors, the admin socket's thread pauses between accepts. An accept fails with
/// EMFILE at once, connection or not (the kernel takes the new connection's descriptor before
/// it waits), and a thread that tried again at once spun a core for as long as the node was
/// short of descriptors. Once there are some again, a connection is taken and answered.
#[test]
fn out_of_descriptors_the_admin_socket_pauses_its_accepts() {
    const NAME: &str = "out_of_descriptors_the_admin_socket_pauses_its_accepts";
    if std::env::var_os("EDGELB_FD_CHILD").is_none() {
        return common::in_child(NAME);
    }
    use edgelb::admin::{self, Request, Response};
    use std::time::{Duration, Instant};
    let dir = format!("{}/fds-admin-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let path = std::path::PathBuf::from(&dir).join("admin.sock");
    let (tx, rx) = std::sync::mpsc::channel::<admin::Pending>();
    std::thread::spawn(move || {
        for (_, reply) in rx {
            let _ = reply.send(Response::ok("here").into());
        }
    });
    let listener = admin::bind(&path).unwrap();
    // The CPU time this process has used, in clock ticks (user and system): read from /proc,
    // which takes a descriptor, so before and after the shortage.
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu_ticks();
    let room = common::room_for(1);
    // The admin thread's own descriptor of the socket takes the one left: every accept it
    // tries fails.
    let serving = admin::serve(listener, tx).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    drop(room);
    let freed = Instant::now();
    let spent = cpu_ticks() - before;
    let answer = admin::request(&path, &Request::Status);
    let waited = freed.elapsed();
    serving.stop();
    let _ = std::fs::remove_dir_all(&dir);
    // A thread that spins uses about 100 ticks of the second; one that pauses, next to none.
    assert!(spent < 20, "{spent} clock ticks of CPU in the second without descriptors");
    assert_eq!(answer.expect("an answer once descriptors are free").message, "here");
    assert!(waited < Duration::from_secs(2), "answered {waited:?} after descriptors were free");
}

/// `--version` and `-V` say the build, version and git commit, the line `status` and the logs
/// name it by: an operator tells two builds of one version apart (it once said the version
/// alone).
#[test]
fn version_names_the_binary() {
    for flag in ["--version", "-V"] {
        let (code, out, err) = edgelb(&[flag]);
        assert_eq!(code, 0, "{flag}: {err}");
        let want = format!("edgelb {} ({})\n", env!("CARGO_PKG_VERSION"), edgelb::build::COMMIT);
        assert_eq!(out, want, "{flag}");
        assert_eq!(out.trim_end(), edgelb::build::VERSION_LINE);
    }
}

/// A start that fails after it attached to some interfaces (here the second one refuses native
/// XDP) leaves nothing behind: no program balancing without a controller, no pins, no socket.
#[test]
fn a_start_that_fails_after_attaching_removes_what_it_set_up() {
    if !edgelb::testbed::netns::require_privileged("a_start_that_fails_after_attaching") {
        return;
    }
    let pid = std::process::id();
    let ns = format!("elbstart{pid}");
    let (f, pins, admin) = run_config("half", "vx0\", \"lo");
    let text = std::fs::read_to_string(&f.0).unwrap();
    let text = text
        .lines()
        .map(|l| if l.starts_with("xdp_mode") { "xdp_mode = \"native\"" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("xdp_mode = \"native\""), "the example sets xdp_mode");
    std::fs::write(&f.0, text).unwrap();
    let _ns = TestNs::new(&ns, &pins);
    ip(&["-n", &ns, "link", "add", "vx0", "type", "veth", "peer", "name", "vx1"]);
    for dev in ["lo", "vx0", "vx1"] {
        ip(&["-n", &ns, "link", "set", dev, "up"]);
    }
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(env!("CARGO_BIN_EXE_edgelb"))
        .args(["run", "--config"])
        .arg(&f.0)
        .output()
        .expect("nsenter edgelb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`lo`") && err.contains("the data plane it had set up is removed"),
        "{err}"
    );
    let link = ip(&["-n", &ns, "-d", "link", "show", "vx0"]);
    assert!(!link.contains("prog/xdp"), "still attached: {link}");
    assert!(!std::path::Path::new(&pins).exists(), "pins left");
    assert!(!std::path::Path::new(&admin).exists(), "admin socket left");
}

/// `ip netns exec` runs its command in a mount namespace of its own, with /sys mounted afresh:
/// no bpffs on /sys/fs/bpf. edgelb used to mount one there, which went with that namespace when
/// edgelb exited, taking its pins and XDP with it: SIGTERM took the data plane down, and every
/// restart lost the connection table. It refuses now, saying why and what to do, having
/// attached and pinned nothing.
#[test]
fn run_in_a_mount_namespace_of_its_own_without_bpffs_refuses_to_mount_one() {
    if !edgelb::testbed::netns::require_privileged("run_in_a_mount_namespace_of_its_own") {
        return;
    }
    let ns = format!("elbmnt{}", std::process::id());
    let (f, pins, admin) = run_config("own-mnt", "vd0");
    let _ns = ns_with_vd0(&ns, &pins);
    // Exit 99 if bpffs is there after all (then this test would show nothing); `exec` keeps
    // edgelb's PID the child's (`ip netns exec` execs too), so that it can be stopped by it.
    let child = Command::new("ip")
        .args(["netns", "exec", &ns, "sh", "-c"])
        .arg(r#"grep -q " /sys/fs/bpf bpf " /proc/mounts && exit 99; exec "$0" run --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_edgelb"))
        .arg(&f.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ip netns exec edgelb");
    let mut child = Stopped(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        // Still running: it started, on a bpffs of its own (the link of vd0 says whether it
        // attached).
        if std::time::Instant::now() > deadline {
            panic!(
                "edgelb still runs under `ip netns exec`; vd0: {}",
                ip(&["-n", &ns, "-d", "link", "show", "vd0"])
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_ne!(status.code(), Some(99), "bpffs is mounted under `ip netns exec` here");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("bpffs is not mounted on /sys/fs/bpf")
            && err.contains("mount namespace of its own")
            && err.contains("mount -t bpf bpf /sys/fs/bpf")
            && err.contains("nsenter --net="),
        "{err}"
    );
    assert_eq!(xdp_prog_in(&ns, "vd0"), None, "attached");
    assert!(!std::path::Path::new(&pins).exists(), "pins left");
    assert!(!std::path::Path::new(&admin).exists(), "admin socket left");
}

/// A child process stopped by its PID (SIGTERM, then SIGKILL after 5 s) and reaped when
/// dropped, a failed assertion included.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) with a PID and a signal number touches no memory of ours; the
            // child is not reaped yet (try_wait found it running), so the PID is still its own.
            unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
            edgelb::testbed::reap_within(&mut self.0, std::time::Duration::from_secs(5));
        }
    }
}

/// Runs `ip` with `args`; its output. Fails the test if `ip` does.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of a test's own and the pin directory it may leave, both removed when
/// this is dropped, on failure too.
struct TestNs {
    name: String,
    pins: String,
}

impl TestNs {
    fn new(name: &str, pins: &str) -> TestNs {
        ip(&["netns", "add", name]);
        TestNs { name: name.to_owned(), pins: pins.to_owned() }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = edgelb::dataplane::Dataplane::teardown(std::path::Path::new(&self.pins));
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// `stop --socket` naming a socket nothing answers on, and not the config's, removes nothing:
/// the config's data plane is not that socket's (it removed the default config's data plane,
/// another instance's, and said so with exit 0).
#[test]
fn stop_on_another_socket_removes_nothing() {
    let (f, pins, _admin) = run_config("other-sock", "lo");
    let other = format!("{}/nobody-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let (code, out, err) =
        edgelb(&["stop", "--config", &f.0.to_string_lossy(), "--socket", &other]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("nothing was removed") && err.contains("-c <its config>"), "{err}");
    assert!(!out.contains("removed"), "{out}");
    let _ = pins;
}

/// An admin command whose config sets `admin_socket` to something other than a path names the
/// problem and exits 2, rather than talking to the default socket (another edgelb's, perhaps).
#[test]
fn an_admin_socket_that_is_not_a_string_is_no_default() {
    let f = tempfile_path::write(
        "socket-number.toml",
        "[node]\ninterfaces = [\"lo\"]\nadmin_socket = 5\n",
    );
    for cmd in ["status", "reload", "stop"] {
        let (code, out, err) = edgelb(&[cmd, "--config", &f.0.to_string_lossy()]);
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(
            err.contains(":3:16: node.admin_socket is integer 5") && err.contains("--socket"),
            "{cmd}: {err}"
        );
    }
}

/// No real flow has source port 0: `route` on a 5-tuple VIP asks for `--sport` instead of
/// answering for port 0 (it did, and named a backend few flows would go to).
#[test]
fn route_on_a_five_tuple_vip_needs_the_source_port() {
    let text = edgelb::config::EXAMPLE.to_owned()
        + "\n[[vip]]\nname = \"five\"\naddress = \"198.18.1.9\"\nport = 80\nhash = \"5tuple\"\nbackends = [{ address = \"198.18.0.11\", mac = \"02:ed:00:00:00:11\" }]\n";
    let f = tempfile_path::write("five.toml", &text);
    let path = f.0.to_str().unwrap();
    let (code, _, err) = edgelb(&["route", "--config", path, "198.18.4.1", "five"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--sport"), "{err}");
    let (code, out, err) =
        edgelb(&["route", "--config", path, "198.18.4.1", "five", "--sport", "40000"]);
    assert_eq!((code, out.trim()), (0, "198.18.0.11"), "{err}");
}

/// A controller played by a Unix socket bound at `sock`: it takes one connection (for at most
/// 10 s: a CLI that never connects must fail the test, not hang it), reads one request line,
/// answers `answer` and a newline, and gives back the request it read ("(never asked)" if none).
fn played_controller(sock: &str, answer: &'static str) -> std::thread::JoinHandle<String> {
    use std::io::{BufRead, Write};
    let _ = std::fs::remove_file(sock);
    let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(_) => return String::from("(never asked)"),
            }
        };
        s.set_nonblocking(false).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(format!("{answer}\n").as_bytes()).unwrap();
        line
    })
}

/// An edgelb older than the `route` request refuses it as a bad request (it names the unknown
/// command): `route` then answers from the file, saying why, rather than failing on the refusal.
/// The old controller is played by a socket answering what one answers, word for word.
#[test]
fn route_falls_back_to_the_file_when_the_controller_is_too_old() {
    let f = example_file();
    let sock = format!("{}/old-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let old = played_controller(
        &sock,
        r#"{"ok":false,"message":"bad request: unknown variant `route`, expected one of `status`, `drain`, `undrain`, `reload`, `stop`, `handover` at line 1 column 14"}"#,
    );
    let path = f.0.to_str().unwrap();
    let (code, out, err) =
        edgelb(&["route", "--config", path, "--socket", &sock, "198.18.4.1", "web"]);
    let asked = old.join().unwrap();
    let _ = std::fs::remove_file(&sock);
    assert!(asked.contains("\"cmd\":\"route\""), "{asked}");
    let cfg = edgelb::config::Config::parse(edgelb::config::EXAMPLE, "x".as_ref()).unwrap();
    let web = cfg.find_vip("web", None).unwrap();
    let want = edgelb::dataplane::route(web, "198.18.4.1".parse().unwrap(), 0).unwrap().address;
    assert_eq!((code, out.trim()), (0, want.to_string().as_str()), "{err}");
    assert!(err.contains("older") && err.contains("computed from"), "{err}");
}

/// A user the root-only admin socket turns away (EACCES on connect) is told so, and `route`
/// does not answer from the file as though no edgelb ran (it did, with exit 0 and "no edgelb
/// answers"): the running one's drains and verdicts may place the flow elsewhere. Played by a
/// socket root listens on, mode 0600, and the CLI run as `nobody`.
#[test]
fn route_turned_away_by_the_socket_says_so_and_does_not_answer_from_the_file() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    if !edgelb::testbed::netns::require_privileged("route_turned_away_by_the_socket") {
        return;
    }
    let f = tempfile_path::write("turned-away.toml", edgelb::config::EXAMPLE);
    let sock = format!("{}/root-only-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_file(&sock);
    let _listening = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = f.0.to_str().unwrap();
    let run = |uid: u32| {
        let out = Command::new(env!("CARGO_BIN_EXE_edgelb"))
            .args(["route", "--config", path, "--socket", &sock, "198.18.4.1", "web"])
            .uid(uid)
            .gid(uid)
            .output()
            .expect("run edgelb");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(65534);
    let _ = std::fs::remove_file(&sock);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("Permission denied"), "the connect was refused: {err}");
    assert!(err.contains("run this as one of them"), "{err}");
    assert!(!err.contains("computed from") && !err.contains("no edgelb answers"), "{err}");
    // Nothing there at all: the file answers, as before.
    let (code, err) = run(65534);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("no edgelb answers") && err.contains("computed from"), "{err}");
}

/// `stop` turned away by the admin socket (a user the root-only socket refuses) says so and
/// touches nothing: it used to take that for "no controller answers" and go on to remove the
/// data plane a detached edgelb may have left (which, as that user, it then failed to do).
#[test]
fn stop_turned_away_by_the_socket_says_so_and_removes_nothing() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    if !edgelb::testbed::netns::require_privileged("stop_turned_away_by_the_socket") {
        return;
    }
    let dir = env!("CARGO_TARGET_TMPDIR");
    let sock = format!("{dir}/stop-root-only-{}.sock", std::process::id());
    let pins = format!("/sys/fs/bpf/edgelb-stop-away-{}", std::process::id());
    let text = edgelb::config::EXAMPLE
        .replace(
            "# admin_socket = \"/run/edgelb/admin.sock\"",
            &format!("admin_socket = \"{sock}\""),
        )
        .replace("# pin_dir = \"/sys/fs/bpf/edgelb\"", &format!("pin_dir = \"{pins}\""));
    let f = tempfile_path::write("stop-turned-away.toml", &text);
    let _ = std::fs::remove_file(&sock);
    let _listening = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgelb"))
        .args(["stop", "--config", f.0.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run edgelb");
    let _ = std::fs::remove_file(&sock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("Permission denied") && err.contains("run this as one of them"), "{err}");
    assert!(!err.contains("no controller answers") && !err.contains(&pins), "{err}");
}

/// `route --from-file` answers for the file named, not asking the running edgelb (played by a
/// socket the file names that accepts no request: a connection to it would sit in its backlog),
/// so that a candidate file can be checked before it is reloaded.
#[test]
fn route_from_file_answers_for_a_candidate_file_while_edgelb_runs() {
    use std::os::unix::net::UnixListener;
    let sock = format!("{}/running-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_file(&sock);
    let running = UnixListener::bind(&sock).unwrap();
    running.set_nonblocking(true).unwrap();
    let text = edgelb::config::EXAMPLE.replace(
        "# admin_socket = \"/run/edgelb/admin.sock\"",
        &format!("admin_socket = \"{sock}\""),
    ) + "\n[[vip]]\nname = \"cand\"\naddress = \"198.18.1.9\"\nport = 80\nbackends = [{ address = \"198.18.0.13\", mac = \"02:ed:00:00:00:13\" }]\n";
    let f = tempfile_path::write("candidate.toml", &text);
    let named = edgelb::config::admin_socket_of(&f.0).unwrap();
    assert_eq!(named.to_str(), Some(sock.as_str()), "the file names the running edgelb's socket");
    let path = f.0.to_str().unwrap();
    let (code, out, err) = edgelb(&["route", "-c", path, "--from-file", "198.18.4.1", "cand"]);
    let asked = running.accept().is_ok();
    let _ = std::fs::remove_file(&sock);
    assert!(!asked, "the running edgelb was asked: {err}");
    assert_eq!((code, out.trim()), (0, "198.18.0.13"), "{err}");
    assert!(err.contains("computed from") && err.contains("--from-file"), "{err}");
    // With --socket it makes no sense: refused as a bad invocation.
    let (code, _, err) =
        edgelb(&["route", "-c", path, "--socket", &sock, "--from-file", "198.18.4.1", "cand"]);
    assert_eq!(code, 2, "{err}");
}

/// A config that is not all UTF-8 (a comment saved as Latin-1): `check` says where, by line and
/// column, and the admin commands still reach the controller on the socket it names (they
/// exited 2, "cannot read", without asking it). The controller is played by a socket answering
/// one request.
#[test]
fn a_latin1_comment_is_told_by_line_and_keeps_the_admin_socket() {
    let sock = format!("{}/latin1-{}.sock", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let played = played_controller(&sock, r#"{"ok":false,"message":"played controller"}"#);
    let text = edgelb::config::EXAMPLE.replace(
        "# admin_socket = \"/run/edgelb/admin.sock\"",
        &format!("admin_socket = \"{sock}\""),
    );
    let f = tempfile_path::write("latin1.toml", &text);
    let mut bytes = b"# caf\xe9\n".to_vec();
    bytes.extend_from_slice(text.as_bytes());
    std::fs::write(&f.0, bytes).unwrap();
    let path = f.0.to_str().unwrap();
    let (code, _, err) = edgelb(&["check", "-c", path]);
    assert_eq!(code, 2, "{err}");
    assert!(err.starts_with(&format!("{path}:1:6: byte 0xE9 is not UTF-8")), "{err}");
    let (code, out, err) = edgelb(&["status", "-c", path]);
    let asked = played.join().unwrap();
    let _ = std::fs::remove_file(&sock);
    assert!(asked.contains("\"cmd\":\"status\""), "the controller was not asked: {asked}");
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("played controller"), "{err}");
}

/// A value of 70 000 bytes makes no 70 KB line: `check` quotes the first 80 characters and the
/// length, whether the file is refused (a backend's address) or accepted with a warning (a VIP
/// name that long).
#[test]
fn check_quotes_a_long_value_in_part() {
    let big = "x".repeat(70_000);
    for (text, code) in [
        (edgelb::config::EXAMPLE.replacen("198.18.0.11", &big, 1), 2),
        (edgelb::config::EXAMPLE.replace("name = \"web7\"", &format!("name = \"{big}\"")), 0),
    ] {
        let f = tempfile_path::write("long-value.toml", &text);
        let (got, out, err) = edgelb(&["check", "-c", f.0.to_str().unwrap()]);
        assert_eq!(got, code, "{}", &err[..err.len().min(300)]);
        assert!(err.len() < 1024, "{} bytes: {}", err.len(), &err[..err.len().min(300)]);
        assert!(err.contains("… (70000 bytes)`"), "{err}");
        assert!(out.len() < 1024, "{out}");
    }
}

/// A key the file spells with an escape and a newline in it (`"x\u001b[31m...\nfake.toml:1:1:
/// ok"`) is shown escaped by `check`: its error is one line, without the escape character that
/// would color the terminal or the second line that would pass for another message.
#[test]
fn check_shows_a_key_with_control_characters_escaped() {
    let text = edgelb::config::EXAMPLE.replacen(
        "[node]\n",
        "[node]\n\"x\\u001b[31mRED\\nfake.toml:1:1: ok\" = 1\n",
        1,
    );
    let f = tempfile_path::write("control-key.toml", &text);
    let (code, out, err) = edgelb(&["check", "-c", f.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(out, "");
    let line = err.strip_suffix('\n').unwrap_or(&err);
    assert!(!line.contains(['\n', '\u{1b}']), "{err:?}");
    assert!(line.contains("unknown field `x\\u{1b}[31mRED\\nfake.toml:1:1: ok`"), "{err:?}");
}
