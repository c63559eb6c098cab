//! Log capture for unit tests that assert what is logged (one line per episode, a panic as one
//! JSON error): a writer a `tracing` subscriber writes into, read back as text.

use std::{
    io::Write,
    sync::{Arc, Mutex, PoisonError},
};

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
