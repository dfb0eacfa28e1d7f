//! A batching, lossy writer for plain-text logs (issue 11, item 1).
//!
//! Profiled under load (`perf record` of the gateway at saturation),
//! tracing-appender's non-blocking writer cost ~19% of the gateway's CPU for
//! one line per request: every line woke its writer thread through a futex
//! (`crossbeam_channel` notify) and was written with its own `write(2)`.
//! Here a line is appended to a shared buffer under a mutex; only a line that
//! finds the buffer empty wakes the writer thread, which then lets lines
//! gather for [`BATCH_WINDOW`] and writes them all with one `write(2)`. At
//! 20,000 lines/s that is ~200 wake-ups and writes a second instead of
//! 20,000 of each.
//!
//! A slow sink never stalls a caller: past [`MAX_BUFFERED`] bytes, lines are
//! dropped and counted, and the count is written once the sink catches up.
//! Dropping the [`Guard`] writes what is buffered and stops the thread.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather after the first one of a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Bytes buffered at most; further lines are dropped (and counted) until the
/// writer has caught up.
pub const MAX_BUFFERED: usize = 1 << 20;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    dropped: u64,
    closed: bool,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the buffer invalid
        // (bytes are only appended or swapped out): keep logging.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` half: cheap to clone, one per subscriber.
#[derive(Clone)]
pub struct BatchWriter {
    inner: Arc<Inner>,
}

/// Keeps the writer thread; dropping it flushes what is buffered.
pub struct Guard {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `sink`. Without a thread (it could not be
/// started) lines are written by the caller, unbatched.
pub fn spawn<W: Write + Send + 'static>(sink: W) -> (BatchWriter, Guard) {
    let inner = Arc::new(Inner {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    });
    let shared = inner.clone();
    let thread = std::thread::Builder::new()
        .name("citadel-log".into())
        .spawn(move || run(&shared, sink))
        .ok();
    if thread.is_none() {
        inner.lock().closed = true;
    }
    (
        BatchWriter {
            inner: inner.clone(),
        },
        Guard { inner, thread },
    )
}

fn run<W: Write>(inner: &Inner, mut sink: W) {
    let mut out = Vec::new();
    loop {
        let mut st = inner.lock();
        while st.buf.is_empty() && st.dropped == 0 && !st.closed {
            st = inner.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if !st.closed {
            // Let the lines of this batch gather (a close ends the wait).
            st = inner
                .wake
                .wait_timeout_while(st, BATCH_WINDOW, |s| !s.closed)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        std::mem::swap(&mut st.buf, &mut out);
        let dropped = std::mem::take(&mut st.dropped);
        let closed = st.closed;
        drop(st);
        let _ = sink.write_all(&out);
        if dropped > 0 {
            let _ = writeln!(
                sink,
                "citadel-log: {dropped} log lines dropped (the log output could not keep up)"
            );
        }
        let _ = sink.flush();
        out.clear();
        if out.capacity() > MAX_BUFFERED {
            out = Vec::new();
        }
        if closed {
            // Lines written after the close went straight to stderr.
            return;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One event's writer (the fmt layer writes a whole line with one `write_all`).
pub struct Line<'a> {
    inner: &'a Inner,
}

impl Write for Line<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut st = self.inner.lock();
        if st.closed {
            drop(st);
            return std::io::stderr().write(b);
        }
        if st.buf.len() + b.len() > MAX_BUFFERED {
            st.dropped += 1;
            return Ok(b.len());
        }
        let first = st.buf.is_empty() && st.dropped == 0;
        st.buf.extend_from_slice(b);
        drop(st);
        if first {
            self.inner.wake.notify_one();
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = Line<'a>;
    fn make_writer(&'a self) -> Line<'a> {
        Line { inner: &self.inner }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each `write` call.
    #[derive(Clone, Default)]
    struct Rec(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Rec {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 11, item 1: request lines reach the sink in order and whole,
    /// batched (far fewer writes than lines), and everything buffered is
    /// written when the guard drops.
    #[test]
    fn issue11_log_lines_are_batched_in_order_and_flushed_on_drop() {
        let rec = Rec::default();
        let (w, guard) = spawn(rec.clone());
        let n = 2000;
        for i in 0..n {
            use tracing_subscriber::fmt::MakeWriter;
            w.make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let writes = rec.0.lock().unwrap().clone();
        let all: Vec<u8> = writes.concat();
        let want: String = (0..n).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(all).unwrap(), want);
        assert!(
            writes.len() < n / 10,
            "{} writes for {n} lines: not batched",
            writes.len()
        );
    }

    /// Past MAX_BUFFERED the caller is not blocked: lines are dropped and
    /// counted, and the count is written.
    #[test]
    fn issue11_a_stalled_sink_drops_lines_and_says_how_many() {
        struct Stall(Arc<(Mutex<bool>, Condvar)>, Rec);
        impl Write for Stall {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (m, cv) = &*self.0;
                let _open = cv.wait_while(m.lock().unwrap(), |open| !*open).unwrap();
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let rec = Rec::default();
        let (w, guard) = spawn(Stall(gate.clone(), rec.clone()));
        let line = vec![b'x'; 1023];
        use tracing_subscriber::fmt::MakeWriter;
        // Far more than MAX_BUFFERED while the sink is stalled: never blocks.
        for _ in 0..(3 * MAX_BUFFERED / 1024) {
            w.make_writer().write_all(&line).unwrap();
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8_lossy(&rec.0.lock().unwrap().concat()).into_owned();
        assert!(text.contains("log lines dropped"), "no drop count");
        assert!(text.len() <= 2 * MAX_BUFFERED + 200, "{}", text.len());
    }
}
