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

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

/// Installs the global subscriber for the binary `syslog_identifier`.
/// Returns where events go. Calling it twice is harmless (the second call does nothing).
pub fn init(syslog_identifier: &str) -> Sink {
    let filter = EnvFilter::try_from_env("CITADEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer.with_syslog_identifier(syslog_identifier.to_owned());
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init();
            return Sink::Journald;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    Sink::Stderr
}
