//! The subcommands. Each returns the process exit code or an error (exit 2).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use citadel_config::{ConfigError, Diagnostic, HostFacts, Loaded, Report, Settings};

use crate::analyze;
use crate::control;
use crate::fsutil;
use crate::observe;
use crate::{Cli, Command};

use crate::gpu;

pub const EXIT_INVALID: u8 = 1;

/// Paths resolved against `--root`.
struct Ctx {
    root: PathBuf,
    config: PathBuf,
}

impl Ctx {
    fn new(cli: &Cli) -> Ctx {
        let root = cli.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let config = cli
            .config
            .clone()
            .unwrap_or_else(|| rooted(&root, Path::new(citadel_config::DEFAULT_CONFIG_PATH)));
        Ctx { root, config }
    }

    /// Loads the config; prints its report (errors and warnings) to stderr.
    fn load(&self) -> Result<std::result::Result<Loaded, Report>> {
        match citadel_config::load(&self.config) {
            Ok(loaded) => Ok(Ok(loaded)),
            Err(ConfigError::Invalid(report)) => Ok(Err(report)),
            // Only a missing file means "no config" (issue 10, item 6: a
            // permission error, e.g. a monitoring user before the config was
            // world-readable, was reported as a missing config).
            Err(ConfigError::Read { path, source }) => match source.kind() {
                std::io::ErrorKind::NotFound => bail!(
                    "no config at {}; create one with `citadel-systemd init` or pass --config PATH",
                    path.display()
                ),
                std::io::ErrorKind::PermissionDenied => bail!(
                    "cannot read {}: permission denied; run this as root, or make the config \
                     readable (it holds no secrets: `citadel-systemd install` makes it 0644 \
                     in a 0755 directory), or pass --config PATH",
                    path.display()
                ),
                _ => Err(ConfigError::Read { path, source }).context("cannot load the config"),
            },
        }
    }
}

pub fn rooted(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = Ctx::new(&cli);
    let changes_the_system = match &cli.command {
        Command::Install { dry_run, .. } => !dry_run,
        Command::Uninstall { .. }
        | Command::Start { .. }
        | Command::Stop { .. }
        | Command::Restart { .. }
        | Command::Reload { .. }
        | Command::Enable { .. }
        | Command::Disable { .. } => true,
        _ => false,
    };
    if changes_the_system {
        // Nobody reading the progress is no reason to leave a change half done.
        crate::out::finish_work_when_closed();
    }
    match cli.command {
        Command::Init { example } => init(&ctx, &example),
        Command::Render { out } => render(&ctx, out),
        Command::Validate { bin_dir } => validate(&ctx, bin_dir),
        Command::ReportFailure { unit } => report_failure(&unit),
        Command::Assets { out } => crate::assets::generate(&out),
        Command::Services => with_settings(&ctx, crate::assets::print_service_names),
        Command::Install { dry_run, bin_dir } => with_checked_settings(&ctx, |s| {
            // Units are installed only with every GPU bound to its device on
            // this host: an unresolved GPU model would start and see no GPU.
            let gpus = gpu::resolve_on(&ctx.root, s);
            if !gpus.unresolved.is_empty() || !gpus.errors.is_empty() {
                let errors = gpus
                    .errors
                    .iter()
                    .cloned()
                    .chain(gpus.unresolved_as_errors());
                err!("{}", gpu_report(&ctx, errors.collect()));
                return Ok(ExitCode::from(EXIT_INVALID));
            }
            if !gpus.warnings.is_empty() {
                errln!("{}", gpu_report(&ctx, gpus.warnings.clone()));
            }
            let bin_dir = bin_dir.map_or_else(own_dir, Ok)?;
            block_on(crate::install::install(
                &ctx.root,
                &ctx.config,
                s,
                &gpus.host,
                &bin_dir,
                dry_run,
            ))
        }),
        Command::Uninstall { purge } => {
            let settings = ctx.load()?.ok().map(|l| l.settings);
            block_on(crate::install::uninstall(
                &ctx.root,
                settings.as_ref(),
                purge,
            ))
        }
        Command::Start { services, wait } => with_checked_settings(&ctx, |s| {
            let wait = if wait {
                control::Wait::All
            } else {
                control::Wait::Api
            };
            block_on(control::jobs_with(s, "start", &services, wait))
        }),
        Command::Stop { services } => {
            with_settings(&ctx, |s| block_on(control::jobs(s, "stop", &services)))
        }
        Command::Restart {
            rolling: Some(model),
            ..
        } => with_checked_settings(&ctx, |s| {
            block_on(crate::rolling::rolling(s, &ctx.root, &model))
        }),
        Command::Restart {
            surge: Some(model), ..
        } => with_checked_settings(&ctx, |s| {
            block_on(crate::rolling::surge(s, &ctx.root, &model))
        }),
        Command::Restart { services, .. } => {
            with_checked_settings(&ctx, |s| block_on(control::jobs(s, "restart", &services)))
        }
        Command::Reload { services } => {
            let code =
                with_checked_settings(&ctx, |s| block_on(control::jobs(s, "reload", &services)))?;
            if code == ExitCode::from(EXIT_INVALID) {
                errln!(
                    "nothing was reloaded: the running services keep their current configuration"
                );
            }
            Ok(code)
        }
        Command::Enable { services } => {
            with_settings(&ctx, |s| block_on(control::enable(s, &services, true)))
        }
        Command::Disable { services } => {
            with_settings(&ctx, |s| block_on(control::enable(s, &services, false)))
        }
        Command::Status { services, json } => {
            with_settings(&ctx, |s| block_on(observe::status(s, &services, json)))
        }
        Command::Health { json, watch } => {
            with_settings(&ctx, |s| block_on(observe::health(s, json, watch)))
        }
        Command::Top { interval, once } => with_settings(&ctx, |s| {
            block_on(crate::top::top(
                s,
                &crate::top::TopOptions { interval, once },
            ))
        }),
        Command::Logs {
            services,
            follow,
            since,
            priority,
            lines,
            json,
        } => with_settings(&ctx, |s| {
            observe::logs(
                s,
                &services,
                &observe::LogOptions {
                    follow,
                    since,
                    priority,
                    json,
                    lines,
                },
            )
        }),
    }
}

/// Runs `f` with the loaded settings; a config with errors prints its report and exits 1.
fn with_settings(ctx: &Ctx, f: impl FnOnce(&Settings) -> Result<ExitCode>) -> Result<ExitCode> {
    match ctx.load()? {
        Ok(loaded) => f(&loaded.settings),
        Err(report) => {
            err!("{report}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// Like [`with_settings`], for commands that write or apply the config
/// (`render`, `install`, `start`, `restart`, `reload`): runs [`checked`] first.
fn with_checked_settings(
    ctx: &Ctx,
    f: impl FnOnce(&Settings) -> Result<ExitCode>,
) -> Result<ExitCode> {
    match checked(ctx)? {
        Ok(loaded) => f(&loaded.settings),
        Err(code) => Ok(code),
    }
}

/// The checks every command that writes or applies anything runs before it
/// does (issue 9, item 14: `install` used to skip what `validate` caught):
/// the config's own validation, then the offline checks `validate` adds that
/// need neither systemd nor the built binaries ([`offline_problems`]).
/// Problems are printed as located diagnostics; the result is then exit 1.
fn checked(ctx: &Ctx) -> Result<std::result::Result<Loaded, ExitCode>> {
    let loaded = match ctx.load()? {
        Ok(l) => l,
        Err(report) => {
            err!("{report}");
            return Ok(Err(ExitCode::from(EXIT_INVALID)));
        }
    };
    let source = std::fs::read_to_string(&ctx.config).unwrap_or_default();
    let problems = offline_problems(&source, &loaded.settings);
    if !problems.is_empty() {
        let report = Report::new(
            &ctx.config,
            &source,
            problems
                .into_iter()
                .chain(loaded.report.diagnostics.iter().cloned())
                .collect(),
        );
        err!("{report}");
        return Ok(Err(ExitCode::from(EXIT_INVALID)));
    }
    Ok(Ok(loaded))
}

/// Problems the config crate's validation may let through but that must never
/// reach a unit file or a tmpfiles line: a control character (CR, LF, NUL, ...)
/// in any key or string of the config, located at its place in the file, and,
/// as a last line of defence, one in any rendered file (every line break there
/// must be one the renderer wrote).
pub fn offline_problems(source: &str, settings: &Settings) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Ok(doc) = toml_edit::ImDocument::parse(source) {
        control_chars_in_table(doc.as_table(), "", &mut out);
    }
    if out.is_empty() {
        for f in &citadel_render::render(settings).files {
            let bad = f
                .contents
                .split('\n')
                .position(|l| l.chars().any(char::is_control));
            if let Some(i) = bad {
                out.push(
                    Diagnostic::error(
                        f.path.display().to_string(),
                        format!(
                            "the rendered {} would have a control character on line {}",
                            f.path.display(),
                            i + 1
                        ),
                    )
                    .help(
                        "remove control characters (CR, NUL, tabs, ...) from the config's values",
                    ),
                );
            }
        }
    }
    out
}

fn control_char_diagnostic(
    key: &str,
    what: &str,
    span: Option<std::ops::Range<usize>>,
) -> Diagnostic {
    Diagnostic::error(
        key,
        format!("{what} contains a control character (such as a line break, CR or NUL), which would split or corrupt the generated unit and tmpfiles lines"),
    )
    .at(span)
    .help("remove it; values that reach systemd files must be one line of printable text")
}

fn control_chars_in_table(
    table: &dyn toml_edit::TableLike,
    prefix: &str,
    out: &mut Vec<Diagnostic>,
) {
    for (name, item) in table.iter() {
        let key = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        };
        if name.chars().any(char::is_control) {
            let span = table.get_key_value(name).and_then(|(k, _)| k.span());
            out.push(control_char_diagnostic(&key, "this key", span));
        }
        control_chars_in_item(item, &key, out);
    }
}

fn control_chars_in_item(item: &toml_edit::Item, key: &str, out: &mut Vec<Diagnostic>) {
    match item {
        toml_edit::Item::Value(v) => control_chars_in_value(v, key, out),
        toml_edit::Item::Table(t) => control_chars_in_table(t, key, out),
        toml_edit::Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                control_chars_in_table(t, &format!("{key}[{i}]"), out);
            }
        }
        toml_edit::Item::None => {}
    }
}

fn control_chars_in_value(value: &toml_edit::Value, key: &str, out: &mut Vec<Diagnostic>) {
    match value {
        toml_edit::Value::String(s) if s.value().chars().any(char::is_control) => {
            out.push(control_char_diagnostic(key, "this value", value.span()));
        }
        toml_edit::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                control_chars_in_value(v, &format!("{key}[{i}]"), out);
            }
        }
        toml_edit::Value::InlineTable(t) => control_chars_in_table(t, key, out),
        _ => {}
    }
}

fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(fut)
}

fn own_dir() -> Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("cannot find this program's directory")?
        .parent()
        .context("this program has no directory")?
        .to_owned())
}

fn init(ctx: &Ctx, example: &str) -> Result<ExitCode> {
    if ctx.config.exists() {
        bail!(
            "{} already exists; edit it, or remove it first to start from the example",
            ctx.config.display()
        );
    }
    let text = match example {
        "sim" => citadel_config::SIM_EXAMPLE_CONFIG,
        _ => citadel_config::EXAMPLE_CONFIG,
    };
    // World-readable like the installed copy: it holds no secrets.
    fsutil::write_atomic(&ctx.config, text.as_bytes(), 0o644)?;
    outln!("wrote {} (the {example} example)", ctx.config.display())?;
    outln!("next: edit it, then `citadel-systemd validate` and `citadel-systemd install`")?;
    Ok(ExitCode::SUCCESS)
}

fn render(ctx: &Ctx, out: Option<PathBuf>) -> Result<ExitCode> {
    let loaded = match checked(ctx)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if !loaded.report.is_empty() {
        err!("{}", loaded.report);
    }
    let out = out.unwrap_or_else(|| rooted(&ctx.root, &loaded.settings.paths.systemd_dir()));
    let gpus = gpu::resolve_on(&ctx.root, &loaded.settings);
    if !gpus.diagnostics().is_empty() {
        errln!("{}", gpu_report(ctx, gpus.diagnostics()));
    }
    if !gpus.errors.is_empty() {
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let rendered = citadel_render::render_with(&loaded.settings, &gpus.host);
    let files: Vec<(PathBuf, String)> = rendered
        .files
        .iter()
        .map(|f| (out.join(&f.path), f.contents.clone()))
        .collect();
    let mut changes = fsutil::plan(&files);
    // An operator's file where a rendered one goes: refuse before writing anything.
    fsutil::refuse_conflicts(&changes)?;
    // Files Citadel rendered before that the config no longer produces (a removed model).
    changes.removed = fsutil::generated_files(&out, 2)
        .into_iter()
        .filter(|p| !files.iter().any(|(f, _)| f == p))
        .collect();
    fsutil::apply(&files, &changes)?;
    for p in &changes.added {
        outln!("added    {}", p.display())?;
    }
    for p in &changes.changed {
        outln!("changed  {}", p.display())?;
    }
    for p in &changes.removed {
        outln!("removed  {}", p.display())?;
    }
    outln!(
        "rendered {} files into {} ({} unchanged)",
        files.len(),
        out.display(),
        changes.unchanged
    )?;
    Ok(ExitCode::SUCCESS)
}

/// GPU diagnostics placed at the `gpus` values of the config.
fn gpu_report(ctx: &Ctx, diags: Vec<Diagnostic>) -> Report {
    let source = std::fs::read_to_string(&ctx.config).unwrap_or_default();
    Report::new(&ctx.config, &source, gpu::locate(&source, diags))
}

fn validate(ctx: &Ctx, bin_dir: Option<PathBuf>) -> Result<ExitCode> {
    let loaded = match checked(ctx)? {
        Ok(l) => l,
        Err(code) => {
            outln!("config   {}: invalid", ctx.config.display())?;
            outln!("validate: FAILED")?;
            return Ok(code);
        }
    };
    let s = &loaded.settings;
    let host = citadel_config::check_host(s, &HostFacts::detect());
    let source = std::fs::read_to_string(&ctx.config).unwrap_or_default();
    let gpus = gpu::resolve_on(&ctx.root, s);
    let warnings = Report::new(
        &ctx.config,
        &source,
        loaded
            .report
            .diagnostics
            .iter()
            .cloned()
            .chain(host)
            .chain(gpu::locate(&source, gpus.diagnostics()))
            .collect(),
    );
    if !warnings.is_empty() {
        errln!("{warnings}");
    }
    if !gpus.errors.is_empty() {
        outln!("config   {}: invalid", ctx.config.display())?;
        outln!("validate: FAILED")?;
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    outln!(
        "config   {}: ok ({} models, gateway on {}:{})",
        ctx.config.display(),
        s.models.len(),
        s.gateway.listen,
        s.gateway.port
    )?;
    let rendered = citadel_render::render_with(s, &gpus.host);
    let bin_dir = bin_dir.map_or_else(own_dir, Ok)?;
    let analysis = analyze::analyze(s, &rendered, &bin_dir)?;
    if analysis.verify_ok {
        outln!(
            "verify   systemd-analyze verify: ok ({} units)",
            rendered.verify.len() + 1
        )?;
    } else {
        outln!("verify   systemd-analyze verify: FAILED")?;
        for line in analysis.verify_output.lines() {
            outln!("         {line}")?;
        }
    }
    for (i, e) in analysis.exposures.iter().enumerate() {
        let label = if i == 0 { "security" } else { "" };
        let verdict = if e.score <= e.target {
            "ok"
        } else {
            "TOO EXPOSED"
        };
        outln!(
            "{label:<8} {:<40} exposure {:.1} (target <= {:.1}) {verdict}",
            e.unit,
            e.score,
            e.target
        )?;
    }
    if analysis.ok() {
        outln!("validate: ok")?;
        Ok(ExitCode::SUCCESS)
    } else {
        outln!("validate: FAILED")?;
        Ok(ExitCode::from(EXIT_INVALID))
    }
}

/// Sends one entry with PRIORITY=2 (critical) to journald's native socket.
fn report_failure(unit: &str) -> Result<ExitCode> {
    let message = format!(
        "MESSAGE=Citadel unit {unit} failed; see `citadel-systemd status` and `journalctl -u {unit}`\nPRIORITY=2\nSYSLOG_IDENTIFIER=citadel-failure\nCITADEL_FAILED_UNIT={unit}\nCITADEL_EVENT=unit-failed\n"
    );
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    match sock.send_to(message.as_bytes(), "/run/systemd/journal/socket") {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            errln!("CRITICAL: Citadel unit {unit} failed (journal unavailable: {e})");
            Ok(ExitCode::from(2))
        }
    }
}
