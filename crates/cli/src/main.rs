//! `citadel-systemd`: the operator's CLI for Citadel's systemd services.
//!
//! Exit codes:
//! - 0: success;
//! - 1: validation failed (the config, `systemd-analyze verify` or the security targets);
//!   `restart --rolling`/`--surge` also exit 1 when they refuse (one instance,
//!   not enough memory, the gateway or an instance not ready: nothing changed)
//!   or stop on the way (they say what state each instance is in);
//! - 2: usage or runtime error (bad arguments, unreadable files, a failing tool,
//!   systemd not running as PID 1), including a refusal that changed nothing: a
//!   file where Citadel renders its own that Citadel did not write, or an existing
//!   directory holding other files whose mode or owner install would change;
//! - 3: a service did not reach the requested state (`start`, `stop`, ...), or,
//!   for `status`, a listed service (default: the whole stack) is not running
//!   (systemctl's convention).
//!
//! `health` has its own: 0 healthy, 1 degraded, 2 down.

#[macro_use]
mod out;

mod admin;
mod analyze;
mod assets;
mod commands;
mod control;
mod fsutil;
mod gpu;
mod install;
mod observe;
mod owned;
mod rolling;
mod running;
mod services;
mod systemd;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Manage Citadel's LLM stack (models and API gateway) as systemd services.
#[derive(Debug, Parser)]
#[command(
    name = "citadel-systemd",
    version = env!("CITADEL_VERSION"),
    about,
    max_term_width = 100
)]
pub struct Cli {
    /// The stack config [default: /opt/citadel/config/citadel.toml, below --root]
    #[arg(long, global = true, env = "CITADEL_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    /// Operate on an alternate root directory instead of / (default paths are taken below it)
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a commented example config (the spec's four-model stack) to the config path
    Init {
        /// Which example: `spec` (vLLM, GPUs) or `sim` (engine simulators; runs anywhere)
        #[arg(long, default_value = "spec", value_parser = ["spec", "sim"])]
        example: String,
    },
    /// Render the units, sysusers.d and tmpfiles.d files into a directory
    Render {
        /// Output directory [default: /opt/citadel/config/systemd, below --root]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Check the config and the units it renders (systemd-analyze verify and security)
    Validate {
        /// Where citadel-model and citadel-gateway are [default: next to this program]
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Install the stack: users, directories, binaries, units; enable citadel.target
    Install {
        /// Show what would change, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Where the built binaries are [default: next to this program]
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Stop, disable and remove the units (keeps config, models, credentials, state)
    Uninstall {
        /// Also remove config, credentials, models, state, binaries and the user
        #[arg(long)]
        purge: bool,
    },
    /// Start services (default: the gateway and the enabled models); wait for the API
    /// and for the models that load within 10 s (a named service: until it is ready)
    Start {
        services: Vec<String>,
        /// Wait until every enabled model serves (up to its start_timeout), not only the API
        #[arg(long)]
        wait: bool,
    },
    /// Stop services (default: the whole stack; gateway and models stop in parallel, each drains)
    Stop { services: Vec<String> },
    /// Restart services (default: the gateway and the models that are enabled or running);
    /// `--rolling`/`--surge MODEL` restart a model without downtime
    Restart {
        #[arg(conflicts_with_all = ["rolling", "surge"])]
        services: Vec<String>,
        /// Restart MODEL's instances one at a time, each drained at the gateway first
        /// (needs 2+ instances); exit 1 when refused or stopped
        #[arg(long, value_name = "MODEL", conflicts_with = "surge")]
        rolling: Option<String>,
        /// Start a temporary instance of MODEL on a spare port, then roll MODEL's instances
        /// behind it and remove it (needs the memory of one more instance); exit 1 when
        /// refused or stopped
        #[arg(long, value_name = "MODEL")]
        surge: Option<String>,
    },
    /// Reload the gateway's config, API keys and limits without dropping connections
    Reload { services: Vec<String> },
    /// Enable services at boot (default: the whole stack)
    Enable { services: Vec<String> },
    /// Disable services at boot (default: the whole stack)
    Disable { services: Vec<String> },
    /// Show state, uptime, PID, memory, restarts, port, whether the process runs the
    /// installed binary ("restart to apply" after an upgrade; "?" when not root) and
    /// status text; exit 3 if any listed service (default: the whole stack) is not
    /// active, like `systemctl status`
    Status {
        services: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Combine systemd's state with the gateway's probes; exit 0 healthy, 1 loading or
    /// degraded, 2 down
    Health {
        #[arg(long)]
        json: bool,
        /// Keep watching; print when something changes
        #[arg(long)]
        watch: bool,
    },
    /// Show the journal of Citadel's services, interleaved (default: all); pages on a terminal
    Logs {
        services: Vec<String>,
        #[arg(short, long)]
        follow: bool,
        /// e.g. "10 min ago", "today", "2026-11-26 08:00"
        #[arg(long)]
        since: Option<String>,
        /// e.g. err, warning, info
        #[arg(short, long)]
        priority: Option<String>,
        /// Number of most recent lines [default: 1000, like `journalctl -e`; with --follow, 10]
        #[arg(short = 'n', long)]
        lines: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// A live view per model: state, requests/s, tokens/s, time to first token p50/p95,
    /// in flight, memory / max, restarts; plain lines every interval when not on a terminal
    Top {
        /// Time between refreshes (`1s`, `500ms`, `5s`; 100ms to 1h)
        #[arg(long, default_value = "1s", value_name = "SPAN", value_parser = top::parse_interval)]
        interval: std::time::Duration,
        /// Print one plain table (rates measured over one interval) and exit
        #[arg(long)]
        once: bool,
    },
    /// Log a critical, structured journal entry about a failed unit (used by OnFailure=)
    #[command(hide = true)]
    ReportFailure { unit: String },
    /// Write the man pages and shell completions into DIR (used to build the package)
    #[command(hide = true)]
    Assets {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print the stack's SERVICE names from the config, one per line (used by shell completion)
    #[command(hide = true)]
    Services,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logging = citadel_log::init("citadel-systemd");
    match commands::run(cli) {
        Ok(code) => code,
        // A closed stdout is a normal end (`citadel-systemd render | head -1`).
        Err(err) if out::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            errln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
