//! `citadel-model [--config PATH] run NAME`: supervise one model's engine as a
//! systemd notify service. `citadel-model [--config PATH] command NAME`: print
//! the engine command line and environment `run` would use. Exit statuses are
//! documented in the library (`citadel_supervisor`).
//!
//! A closed stdout (`citadel-model command NAME | head -1`) is a normal end
//! (exit 0), as in ripgrep: output is written with `writeln!` and a
//! `BrokenPipe` error ends quietly; other write errors exit 74. Config
//! loading maps every failure to 78, including a panic inside the loader
//! (a bug, caught with `catch_unwind` so a bad value cannot become a restart
//! loop of exit 101).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use citadel_config::{ConfigError, Settings};
use citadel_supervisor::notify::Notifier;
use citadel_supervisor::profile::{engine_command, EngineDirs};
use citadel_supervisor::{RunOptions, EXIT_CONFIG, EXIT_IOERR, EXIT_SOFTWARE};
use clap::{Parser, Subcommand};
use tracing::Instrument;

#[derive(Parser, Debug)]
#[command(
    name = "citadel-model",
    version = env!("CITADEL_VERSION"),
    about = "Runs one model's inference engine under systemd: readiness, watchdog, clean stop"
)]
struct Cli {
    /// The stack config.
    #[arg(long, env = "CITADEL_CONFIG", default_value = citadel_config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the model's engine until SIGTERM (the unit's ExecStart=).
    Run {
        /// The model, as named in `[models.NAME]`, or one of its further
        /// instances (`NAME:2`, `NAME:3`, ...).
        name: String,
        /// How often EXTEND_TIMEOUT_USEC is re-sent while loading.
        #[arg(long, hide = true, default_value = "20s", value_parser = parse_span)]
        extend_interval: Duration,
        /// How far each EXTEND_TIMEOUT_USEC reaches.
        #[arg(long, hide = true, default_value = "60s", value_parser = parse_span)]
        extend_by: Duration,
        /// How often STATUS= reports loading progress.
        #[arg(long, hide = true, default_value = "5s", value_parser = parse_span)]
        status_interval: Duration,
    },
    /// Print the engine command line and environment `run` would use.
    Command {
        /// The model (`NAME`) or instance (`NAME:N`).
        name: String,
    },
    /// Print this program's man page (roff); the package is built with it.
    #[command(hide = true)]
    ManPage,
}

fn parse_span(s: &str) -> Result<Duration, String> {
    let d = citadel_config::units::Timespan::parse(s).map(|t| t.duration())?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(d)
}

/// The instance suffix of the temporary surge instance (`NAME:surge`).
const SURGE: &str = "surge";
/// Where `citadel-systemd restart --surge` puts the surge instance's port
/// (its runtime drop-in's `Environment=`).
const SURGE_PORT_ENV: &str = "CITADEL_SURGE_PORT";

/// `NAME:surge`: model NAME as one more instance (its own GPUs, no further
/// instances) on the port in [`SURGE_PORT_ENV`]. `Ok(None)` for any other
/// name; a missing, invalid or configured port is a config failure (78).
fn surge_instance(
    settings: &Settings,
    name: &str,
) -> Result<Option<citadel_config::Model>, Failure> {
    let Some(model) = name
        .split_once(citadel_config::INSTANCE_SEPARATOR)
        .filter(|(_, n)| *n == SURGE)
        .map(|(m, _)| m)
    else {
        return Ok(None);
    };
    let fail = |msg: String| Failure(EXIT_CONFIG, anyhow::anyhow!(msg));
    let Some(m) = settings.model(model) else {
        return Err(fail(format!(
            "surge instance `{name}`: model `{model}` is not in {}",
            settings.source.display()
        )));
    };
    let raw = std::env::var(SURGE_PORT_ENV).map_err(|_| {
        fail(format!(
            "surge instance `{name}` needs its port in {SURGE_PORT_ENV} (set by the runtime \
             drop-in `citadel-systemd restart --surge {model}` writes); it is missing or not UTF-8"
        ))
    })?;
    let port = raw
        .trim()
        .parse::<i64>()
        .map_err(|_| format!("`{raw}` is not a number"))
        .and_then(citadel_config::Port::new)
        .map_err(|e| fail(format!("surge instance `{name}`: {SURGE_PORT_ENV}: {e}")))?;
    let taken = settings
        .models
        .iter()
        .flat_map(|m| m.ports())
        .chain(std::iter::once(settings.gateway.port));
    if let Some(p) = taken.into_iter().find(|p| *p == port) {
        return Err(fail(format!(
            "surge instance `{name}`: {SURGE_PORT_ENV}={p} is a port the config already uses"
        )));
    }
    let mut surge = m.clone();
    surge.instances = Vec::new();
    surge.port = port;
    Ok(Some(surge))
}

/// A failure with the exit status it maps to.
struct Failure(u8, anyhow::Error);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logging = citadel_log::init("citadel-model");
    match real_main(cli) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, e)) => {
            tracing::error!("{e:#}");
            ExitCode::from(code)
        }
    }
}

/// Writes `text` and a newline to stderr; a closed stderr is ignored
/// (there is nowhere left to report it).
fn to_stderr(text: &dyn std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Writes `text` to stdout; a closed pipe is a normal end (`Ok`).
fn to_stdout(text: &dyn std::fmt::Display) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match write!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure(
            EXIT_IOERR,
            anyhow::Error::new(e).context("cannot write to stdout"),
        )),
    }
}

fn load(cli: &Cli) -> Result<Settings, Failure> {
    let path = cli.config.as_path();
    // The loader must not panic on any input; if it does (a bug), the cause
    // is still the config, so this is a config failure (78), not a crash (101).
    let loaded = std::panic::catch_unwind(|| citadel_config::load(path)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Failure(
            EXIT_CONFIG,
            anyhow::anyhow!(
                "{}: loading the config panicked (a bug in citadel-config; a value is likely out of range): {msg}",
                path.display()
            ),
        )
    })?;
    match loaded {
        Ok(loaded) => {
            if !loaded.report.is_empty() {
                to_stderr(&loaded.report);
            }
            Ok(loaded.settings)
        }
        Err(ConfigError::Invalid(report)) => {
            to_stderr(&report);
            Err(Failure(
                EXIT_CONFIG,
                anyhow::anyhow!("{} is invalid", cli.config.display()),
            ))
        }
        Err(e) => Err(Failure(EXIT_CONFIG, anyhow::Error::new(e))),
    }
}

fn real_main(cli: Cli) -> Result<u8, Failure> {
    let name = match &cli.command {
        Cmd::Run { name, .. } | Cmd::Command { name } => name,
        Cmd::ManPage => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut page)
                .map_err(|e| Failure(EXIT_IOERR, e.into()))?;
            to_stdout(&String::from_utf8_lossy(&page))?;
            return Ok(0);
        }
    };
    let settings = load(&cli)?;
    // `NAME:surge`: the temporary instance of `citadel-systemd restart
    // --surge` (issue 15), the model on the port the CLI chose.
    let surge = surge_instance(&settings, name)?;
    // `NAME` or `NAME:N` (a further local instance: the model with that
    // instance's port and GPUs).
    let Some(instance) = surge.or_else(|| settings.instance(name).map(|(_, _, m)| m)) else {
        let known: Vec<&str> = settings.models.iter().map(|m| m.name.as_str()).collect();
        return Err(Failure(
            EXIT_CONFIG,
            anyhow::anyhow!(
                "model `{name}` is not in {} (models: {}; an instance is `NAME:N`, the temporary surge instance `NAME:surge`)",
                cli.config.display(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ),
        ));
    };
    let model = &instance;
    let dirs = EngineDirs::from_env(model, &settings.paths.models);
    let cmd = engine_command(model, &dirs);
    match cli.command {
        Cmd::Command { .. } => {
            to_stdout(&cmd)?;
            Ok(0)
        }
        // Answered above, before the config was loaded.
        Cmd::ManPage => Ok(0),
        Cmd::Run {
            extend_interval,
            extend_by,
            status_interval,
            ..
        } => {
            let opts = RunOptions {
                extend_interval,
                extend_by,
                status_interval,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")
                .map_err(|e| Failure(EXIT_SOFTWARE, e))?;
            let notifier = Notifier::from_env();
            let span = tracing::info_span!(
                "supervisor",
                model = %model.name,
                engine = %model.engine.kind(),
                port = model.port.get()
            );
            let outcome = rt
                .block_on(citadel_supervisor::run(model, &cmd, &notifier, &opts).instrument(span))
                .context("supervisor failed")
                .map_err(|e| Failure(EXIT_SOFTWARE, e))?;
            Ok(outcome.exit_code())
        }
    }
}
