//! Log capture for unit tests that assert what is logged (one line per episode, a panic as one
//! JSON error): a writer a `tracing` subscriber writes into, read back as text. And
//! [`in_child`], for tests of what a whole process does.

use std::{
    io::Write,
    sync::{Arc, Mutex, PoisonError},
};

/// Runs unit test `name` (its full path) again, alone, in a child (this test binary), with
/// `var` set to `case`: for a test of what a whole process does (its panic hook, its exit),
/// which must not change the test binary's own process. The child's exit status and all it
/// printed (stdout, then stderr).
pub(crate) fn in_child(name: &str, var: &str, case: &str) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(var, case)
        .output()
        .expect("run the test binary again");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status, said.into_owned())
}

/// What a test's subscriber wrote; clones share it (the subscriber's writer is one).
#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .expect("log lines are UTF-8")
    }
}

impl Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
