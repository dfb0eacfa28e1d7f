//! `citadel-systemd`: the operator's CLI for Citadel's systemd services.
//!
//! Exit codes:
//! - 0: success;
//! - 1: validation failed (the config, `systemd-analyze verify` or the security targets);
//! - 2: usage or runtime error (bad arguments, unreadable files, a failing tool).

mod analyze;
mod commands;
mod fsutil;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Manage Citadel's LLM stack (models and API gateway) as systemd services.
#[derive(Debug, Parser)]
#[command(name = "citadel-systemd", version, about, max_term_width = 100)]
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
    /// Log a critical, structured journal entry about a failed unit (used by OnFailure=)
    #[command(hide = true)]
    ReportFailure { unit: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    citadel_log::init("citadel-systemd");
    match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
