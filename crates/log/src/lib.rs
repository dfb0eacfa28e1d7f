//! Logging set-up shared by Citadel's binaries. Libraries only emit `tracing`
//! events; a binary calls [`init`] once at start.
//!
//! Under systemd (`JOURNAL_STREAM` is set, so stderr goes to the journal) events
//! are sent to journald natively: the level becomes `PRIORITY=`, the message
//! `MESSAGE=`, and each event field becomes a journal field of the same name in
//! upper case, with no prefix (`model = "mixtral"` -> `MODEL=mixtral`; not
//! tracing-journald's default `F_MODEL`), so the journal can be filtered on them:
//!
//! ```text
//! journalctl CITADEL_SERVICE=gateway MODEL=mixtral OUTCOME=aborted
//! journalctl -o json MODEL=mixtral
//! ```
//!
//! Fields of an enclosing span are added to every event inside it (the
//! supervisor's `MODEL=`, `ENGINE=`, `PORT=`), with `SPAN_NAME=`.
//! tracing-journald also sets `SYSLOG_IDENTIFIER=` (the binary), `TARGET=`
//! (the module), `CODE_FILE=` and `CODE_LINE=`; units add
//! `CITADEL_SERVICE=NAME` (`LogExtraFields=`). Event fields never take one of
//! those names, nor another name journald or systemd give a meaning
//! ([`check_field_name`]; a test holds every event in the workspace to it).
//! The fields Citadel's events carry:
//!
//! | field | set by | meaning |
//! |---|---|---|
//! | `REQUEST_ID` | gateway | the request's `X-Request-Id` (the client's, or generated) |
//! | `MODEL` | gateway, supervisor | the model's name (not an alias); absent when a request named none |
//! | `METHOD`, `PATH` | gateway | the API request (`POST`, `/v1/chat/completions`) |
//! | `STATUS` | gateway | the HTTP status sent to the client |
//! | `LATENCY_MS` | gateway | from request to the end of the response body, in milliseconds |
//! | `STREAM` | gateway | `true` for a streamed (SSE) request |
//! | `BACKEND` | gateway | the engine or replica that answered (its base URL) |
//! | `PROMPT_TOKENS`, `COMPLETION_TOKENS`, `TOTAL_TOKENS` | gateway | from the response's `usage`, when it has one |
//! | `OUTCOME` | gateway | `ok` (the whole body was sent), `aborted` (the client went away first), `upstream_aborted` (the engine's body broke off; a stream gets an SSE error event and no `[DONE]`), or the error code of a refused request (`model_not_ready`, `invalid_api_key`, ...) |
//! | `STATE` | gateway | a backend's health when it stops serving (`loading`, `down`) |
//! | `AVAILABILITY` | gateway | how many models serve, when that changes (`serving 2/3 models`) |
//! | `ENGINE`, `PORT` | supervisor | the model's engine kind and port |
//! | `ENGINE_PID` | supervisor | the engine's PID |
//! | `ERROR` | all | the error, one line |
//!
//! Prompts, completions and API keys are never logged.
//!
//! The filter comes from `CITADEL_LOG` (e.g. `debug`, `citadel_gateway=trace`),
//! defaulting to `info`.
//!
//! Plain-text output goes through a batching writer ([`batch`]: a dedicated
//! thread writes the lines gathered over a few milliseconds with one
//! `write(2)`): a slow stderr (a file, a full pipe) must not stall a request,
//! and a line must not cost a thread wake-up and a system call of its own.
//! Under overload lines are dropped (and counted) rather than waited for.
//! Measured with `cargo xtask bench-gateway`: with one synchronous log line
//! per request written to a file, the gateway added 1.0 ms at p99; with a
//! writer thread 0.1 ms; per-line wake-ups and writes still cost ~19% of the
//! gateway's CPU at saturation, which batching removes (issue 11, item 1).
//! The lines are formatted by hand ([`text`]: one line per event, plain ASCII
//! values as is, anything else quoted and escaped), at about half the
//! logging cost of tracing-subscriber's default format.

pub mod batch;
mod fields;
pub mod text;

pub use fields::{
    check_field_name, journal_field_name, FieldNameError, RESERVED_FIELDS, RESERVED_PREFIXES,
};

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
    _guard: Option<batch::Guard>,
}

/// Installs the global subscriber for the binary `syslog_identifier`.
/// Calling it twice is harmless (the second call does nothing).
pub fn init(syslog_identifier: &str) -> Logging {
    let filter = EnvFilter::try_from_env("CITADEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(layer) = tracing_journald::layer() {
            // No `F_` prefix: fields are stored under the names the docs
            // give (`MODEL=`); `check_field_name` keeps them clear of
            // journald's own.
            let layer = layer
                .with_field_prefix(None)
                .with_syslog_identifier(syslog_identifier.to_owned());
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
    let (writer, guard) = batch::spawn(std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .event_format(text::TextFormat)
        .fmt_fields(text::TextFields);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    Logging {
        sink: Sink::Stderr,
        _guard: Some(guard),
    }
}
