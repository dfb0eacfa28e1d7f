//! Everything the CLI prints goes through here, so that a closed stdout
//! (`citadel-systemd render | head -1`, `... | true`) is a normal end, as in
//! ripgrep, instead of the panic `println!` turns it into (exit 101).
//!
//! A write to a closed stdout returns an `io::Error` of kind `BrokenPipe`;
//! `main` finds it in the error chain and exits 0. Commands that change the
//! system (`install`, `uninstall`, `start`, ...) call [`finish_work_when_closed`]
//! first: for them a closed stdout only discards the rest of the output, and the
//! change runs to its end (stopping halfway because nobody reads the progress
//! would leave a half-applied install behind). Writes to stderr never fail the
//! program: a closed stderr just loses the message.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to stdout failed with `BrokenPipe`.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// Set by commands that must finish their work whether or not stdout is read.
static FINISH_WORK: AtomicBool = AtomicBool::new(false);

/// From now on a closed stdout discards output instead of ending the command.
pub fn finish_work_when_closed() {
    FINISH_WORK.store(true, Ordering::Relaxed);
}

fn closed() -> io::Result<()> {
    if FINISH_WORK.load(Ordering::Relaxed) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "stdout was closed by its reader",
        ))
    }
}

/// Writes to stdout and flushes, so a closed pipe is noticed at this write.
pub fn write_stdout(args: fmt::Arguments<'_>) -> io::Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return closed();
    }
    let mut out = io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            closed()
        }
        other => other,
    }
}

/// Writes to stderr; a failure is ignored (there is nowhere left to report it).
pub fn write_stderr(args: fmt::Arguments<'_>) {
    let _ = io::stderr().lock().write_fmt(args);
}

/// Whether `err` was caused by writing to a closed stdout (a normal end).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// `println!` that returns an `io::Result` instead of panicking.
macro_rules! outln {
    () => { $crate::out::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` that returns an `io::Result` instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::out::write_stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
macro_rules! errln {
    () => { $crate::out::write_stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write_stderr(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprint!` that never panics.
macro_rules! err {
    ($($arg:tt)*) => { $crate::out::write_stderr(format_args!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_is_found_in_the_chain() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe)).context("printing");
        assert!(is_broken_pipe(&e));
        let other = anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound));
        assert!(!is_broken_pipe(&other));
    }
}
