//! Shared helpers for the integration tests: a packet builder and the fixture config.
#![allow(dead_code)]

pub mod packet;

/// Config for the packet-fixture tests: one VIP per forwarding case. Not attached anywhere.
pub const FIXTURE_CONFIG: &str = r#"
[node]
interfaces = ["lo"]
encap_source_v4 = "198.19.0.0/16"
encap_source_v6 = "2001:2:0:ff::/96"
mtu = 1500

[[vip]]
name = "v4tcp"
address = "198.18.1.1"
port = 80
backends = [
    { address = "198.18.0.11", mac = "02:ed:00:00:00:11" },
    { address = "198.18.0.12", mac = "02:ed:00:00:00:12" },
    { address = "198.18.0.13", mac = "02:ed:00:00:00:13" },
]

[[vip]]
name = "v4udp"
address = "198.18.1.1"
port = 53
protocol = "udp"
backends = [
    { address = "198.18.0.11", mac = "02:ed:00:00:00:11" },
    { address = "198.18.0.12", mac = "02:ed:00:00:00:12" },
    { address = "198.18.0.13", mac = "02:ed:00:00:00:13" },
]

[[vip]]
name = "v6"
address = "2001:2:0:1::1"
port = 80
backends = [
    { address = "2001:2::11", mac = "02:ed:00:00:00:11" },
    { address = "2001:2::12", mac = "02:ed:00:00:00:12" },
    { address = "2001:2::13", mac = "02:ed:00:00:00:13" },
]

[[vip]]
name = "v6udp"
address = "2001:2:0:1::1"
port = 53
protocol = "udp"
backends = [
    { address = "2001:2::11", mac = "02:ed:00:00:00:11" },
    { address = "2001:2::12", mac = "02:ed:00:00:00:12" },
]

[[vip]]
name = "v4to6"
address = "198.18.1.2"
port = 80
backends = [
    { address = "2001:2::11", mac = "02:ed:00:00:00:11" },
    { address = "2001:2::12", mac = "02:ed:00:00:00:12" },
]

[[vip]]
name = "anyport"
address = "198.18.1.3"
backends = [
    { address = "198.18.0.11", mac = "02:ed:00:00:00:11" },
    { address = "198.18.0.12", mac = "02:ed:00:00:00:12" },
]

[[vip]]
name = "five"
address = "198.18.1.4"
port = 80
hash = "5tuple"
backends = [
    { address = "198.18.0.11", mac = "02:ed:00:00:00:11" },
    { address = "198.18.0.12", mac = "02:ed:00:00:00:12" },
    { address = "198.18.0.13", mac = "02:ed:00:00:00:13" },
]

[[vip]]
name = "l2"
address = "198.18.1.5"
port = 80
forwarding = "l2"
backends = [
    { address = "198.18.0.11", mac = "02:ed:00:00:00:11" },
    { address = "198.18.0.12", mac = "02:ed:00:00:00:12" },
]

[[vip]]
name = "l7"
address = "198.18.1.6"
port = 80
forwarding = "l7"
backends = [{ address = "198.18.0.11" }]
"#;

/// The seed of a damage test: FUZZ_SEED when set (to explore other cases), else `default`, so a
/// failure reproduces.
pub fn fuzz_seed(default: u64) -> u64 {
    std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// The one case of `count` a damage test runs alone, to replay a failure: EDGELB_CASE=<index>;
/// every case when unset. Named for this project: a generic `CASE` that a CI environment
/// happened to set would skip most cases without a word. A value that names no case (not a
/// number, or `count` or more) fails the test rather than letting it pass having run nothing.
pub fn only_case(count: usize) -> Option<usize> {
    let text = std::env::var("EDGELB_CASE").ok()?;
    match text.parse::<usize>() {
        Ok(i) if i < count => Some(i),
        _ => panic!(
            "EDGELB_CASE={text} names no case of this test: it has {count}, 0..{count} (replay a case with the test's name as the filter: the other damage tests read it too)"
        ),
    }
}

/// A small deterministic generator (xorshift64) for damage tests: `rnd(n)` is in `0..n`.
pub fn rng(seed: u64) -> impl FnMut(usize) -> usize {
    let mut seed = seed.max(1);
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}

/// Installs, on the calling thread (and the threads and processes it starts later), a seccomp
/// filter that fails `io_uring_setup` with EPERM and allows everything else: the kernel refusing
/// io_uring (`kernel.io_uring_disabled`, a container's profile) without changing the machine.
pub fn deny_io_uring_setup() -> std::io::Result<()> {
    const IO_URING_SETUP: u32 = 425;
    let filter = [
        // Load the system call number (seccomp_data.nr, offset 0).
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: IO_URING_SETUP,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: plain prctl calls; `prog` points at `filter`, both alive for the call.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) == 0
    };
    if ok { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Runs this test binary again for `test` alone, with `EDGELB_FD_CHILD` set, and asserts that
/// it passed there: for a test that lowers a limit of the whole process (its descriptors, its
/// address space), which would starve the tests running beside it. Bounded: the child is killed after 60 s.
pub fn in_child(test: &str) {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("EDGELB_FD_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the test binary again");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{test} did not finish in 60 s in its own process");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        status.success() && out.contains("1 passed"),
        "{test} in its own process: {status}\n{out}"
    );
}

/// Waits (10 s at most) until this process holds no TCP connection, only listeners: every
/// connection made so far closed on every side. A backend thread closes its side only once it
/// reads the proxy's close, and the proxy closes a connection it accepted (a readiness probe's
/// too) only once it reads the client's, which on a busy machine can take a while: counting
/// descriptors with [`room_for`] before then would leave more room than counted.
pub fn tcp_connections_closed() {
    let start = std::time::Instant::now();
    loop {
        let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_str()?;
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        // /proc/net/tcp{,6}: "sl local rem st ... uid timeout inode ...", st 0A is LISTEN.
        let open: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .skip(1)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 9 && f[3] != "0A" && ours.contains(f[9])
            })
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "TCP connections still open after 10 s:\n{}",
            open.join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Lowers this process's descriptor limit so that exactly `n` more descriptors can be opened,
/// until the returned guard is dropped. Descriptors are numbered from the lowest free one and
/// the limit bounds their numbers, so every free number below the limit is filled first.
pub fn room_for(n: usize) -> impl Drop {
    // The fillers hold the free numbers below the limit until the limit is back.
    struct Room {
        _fillers: Vec<std::fs::File>,
        limit: libc::rlimit,
    }
    impl Drop for Room {
        fn drop(&mut self) {
            // SAFETY: setrlimit reads the struct it is given.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.limit) }, 0);
        }
    }
    use std::os::fd::AsRawFd;
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .max()
        .unwrap();
    let mut fillers = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        if fd > highest {
            // Every number up to `fd` is taken now; `fd` goes back, to be the first free.
            drop(f);
            let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit and setrlimit read and write the structs they are given.
            unsafe {
                assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
                let low = libc::rlimit { rlim_cur: (fd as usize + n) as libc::rlim_t, ..old };
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
            }
            return Room { _fillers: fillers, limit: old };
        }
        fillers.push(f);
    }
}
