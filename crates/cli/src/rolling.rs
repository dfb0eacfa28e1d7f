//! `restart --rolling MODEL` and `restart --surge MODEL` (issue 15): restart
//! a model's instances one at a time so that the model keeps serving.
//!
//! Rolling: for each local instance in turn, the gateway drains it (no new
//! request goes there; what it has in flight finishes), systemd restarts its
//! unit (for `Type=notify` the job is done at `READY=1`, when the engine
//! serves), the gateway admits it again and the next one follows once the
//! gateway sees it ready. Instances that serve nothing anyway (down, loading,
//! drained) go first, so each serving instance is restarted only while every
//! other one serves.
//!
//! Surge, for a model whose instances cannot carry the load alone (one
//! instance): a temporary instance `NAME:surge` is started first on a spare
//! port (a runtime drop-in in `/run/systemd/system`), added to the gateway,
//! and carries the load while every configured instance rolls; then it is
//! drained, stopped and removed. Ports are not swapped: the configured
//! instances end where the config puts them, with its new settings.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use citadel_config::{unit_names, Model, Settings};

use crate::admin::{Admin, Backend};
use crate::commands::EXIT_INVALID;
use crate::systemd::Systemd;

/// How often the gateway's view is polled while waiting.
const POLL: Duration = Duration::from_millis(100);
/// How long an admitted instance may take to be `ready` at the gateway (its
/// unit is already `READY=1`: the gateway's probe follows the admit at once).
const READY_AT_GATEWAY: Duration = Duration::from_secs(30);
/// The instance suffix of the temporary surge instance (`citadel-model run NAME:surge`).
pub const SURGE: &str = "surge";
/// Where the surge instance's port reaches `citadel-model`.
pub const SURGE_PORT_ENV: &str = "CITADEL_SURGE_PORT";
/// Where the surge instance's runtime drop-ins go.
const RUNTIME_UNIT_DIR: &str = "/run/systemd/system";

/// One local instance of the model being restarted.
#[derive(Debug, Clone)]
struct Member {
    /// `phi3`, `phi3:2`
    name: String,
    unit: String,
    url: String,
}

fn members(model: &Model) -> Vec<Member> {
    (1..=model.instance_count())
        .zip(model.local_urls())
        .map(|(n, url)| Member {
            name: model.instance_name(n),
            unit: model.instance_unit(n),
            url,
        })
        .collect()
}

/// Why a rolling or surge restart stopped: printed, then exit 1.
struct Stopped(String);

impl From<crate::admin::AdminError> for Stopped {
    fn from(e: crate::admin::AdminError) -> Stopped {
        Stopped(e.to_string())
    }
}

impl From<std::io::Error> for Stopped {
    fn from(e: std::io::Error) -> Stopped {
        Stopped(e.to_string())
    }
}

impl From<anyhow::Error> for Stopped {
    fn from(e: anyhow::Error) -> Stopped {
        Stopped(format!("{e:#}"))
    }
}

fn model_of<'a>(settings: &'a Settings, name: &str) -> Result<&'a Model> {
    if let Some(m) = settings.model(name) {
        return Ok(m);
    }
    if let Some((model, _)) = name.split_once(citadel_config::INSTANCE_SEPARATOR) {
        if settings.model(model).is_some() {
            anyhow::bail!(
                "`{name}` is one instance; --rolling and --surge take a model (`{model}`) and \
                 restart all its instances in turn (one instance alone: `citadel-systemd restart {name}`)"
            );
        }
    }
    let known: Vec<&str> = settings.models.iter().map(|m| m.name.as_str()).collect();
    anyhow::bail!(
        "no model `{name}` in {} (models: {})",
        settings.source.display(),
        if known.is_empty() {
            "none".into()
        } else {
            known.join(", ")
        }
    )
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// `restart --rolling MODEL`.
pub async fn rolling(settings: &Settings, root: &Path, name: &str) -> Result<ExitCode> {
    let model = model_of(settings, name)?;
    let admin = Admin::for_root(root)?;
    if model.instance_count() < 2 {
        return refuse_single(model).await;
    }
    let systemd = Systemd::connect().await?;
    let all = members(model);
    let order = match preflight(&admin, model, &all).await {
        Ok(order) => order,
        Err(Stopped(why)) => {
            errln!("restart --rolling {name}: refused, nothing was changed: {why}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    let started = Instant::now();
    outln!(
        "rolling restart of {name}: {} instances, one at a time ({})",
        all.len(),
        order
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    match roll(settings, &systemd, &admin, model, &order, &[]).await {
        Ok(()) => {
            outln!(
                "rolling restart of {name}: done in {}",
                secs(started.elapsed())
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(Stopped(why)) => {
            errln!("restart --rolling {name}: STOPPED: {why}");
            print_states(&systemd, &admin, &all, None).await;
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// One instance cannot roll: says what a plain restart costs and the ways out.
async fn refuse_single(model: &Model) -> Result<ExitCode> {
    let name = model.name.as_str();
    let last = match Systemd::connect().await {
        Ok(sd) => sd
            .last_start_duration(&model.unit_name())
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    let cost = match last {
        Some(d) => format!(
            "its last start took {} (start_timeout {})",
            secs(d),
            model.start_timeout
        ),
        None => format!("up to its start_timeout, {}", model.start_timeout),
    };
    errln!(
        "restart --rolling {name}: refused, nothing was changed: {name} has one instance, so it \
         cannot roll.\n\
         A plain `citadel-systemd restart {name}` makes {name} unavailable while it loads: {cost}.\n\
         To restart it without downtime, either add an instance (`[[models.{name}.instances]]` \
         with its own `port`, see docs/configuration.md; then `citadel-systemd install`) or use \
         `citadel-systemd restart --surge {name}`, which starts a temporary instance first \
         (it needs the memory of one more instance)."
    );
    Ok(ExitCode::from(EXIT_INVALID))
}

/// The checks before anything changes: the gateway answers on its admin
/// channel, knows every instance of the model and at least one backend of
/// the model serves. Returns the order to restart in: instances serving
/// nothing first (restarting them costs nothing), then the serving ones.
async fn preflight(admin: &Admin, model: &Model, all: &[Member]) -> Result<Vec<Member>, Stopped> {
    let name = model.name.as_str();
    let models = admin.backends().await.map_err(|e| {
        Stopped(format!(
            "the gateway's admin channel does not answer ({e}). A rolling restart moves traffic \
             through it: start the gateway (`citadel-systemd start gateway`); an install older \
             than this version has no `citadel-gateway-admin.socket` (`citadel-systemd install`, \
             then `citadel-systemd restart gateway`)"
        ))
    })?;
    let Some(entry) = models.iter().find(|m| m.model == name) else {
        return Err(Stopped(format!(
            "the running gateway does not serve {name}: install the config and reload the \
             gateway first (`citadel-systemd install && citadel-systemd reload gateway`)"
        )));
    };
    let mut idle = Vec::new();
    let mut serving = Vec::new();
    for m in all {
        match entry.backends.iter().find(|b| b.url == m.url) {
            None => {
                return Err(Stopped(format!(
                    "the running gateway does not know {} ({}): install the config and reload \
                     the gateway first (`citadel-systemd install && citadel-systemd reload gateway`)",
                    m.name, m.url
                )))
            }
            Some(b) if b.serves() => serving.push(m.clone()),
            Some(_) => idle.push(m.clone()),
        }
    }
    if !entry.backends.iter().any(Backend::serves) {
        return Err(Stopped(format!(
            "no backend of {name} serves at the gateway now ({}): there is no service to keep \
             while restarting; a plain `citadel-systemd restart {name}` does the same",
            describe_backends(&entry.backends)
        )));
    }
    idle.extend(serving);
    Ok(idle)
}

fn describe_backends(backends: &[Backend]) -> String {
    backends
        .iter()
        .map(|b| format!("{} {}", b.url, b.describe()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Restarts `order` one at a time. `also` are further backends that must
/// serve while a serving instance restarts (the surge instance).
async fn roll(
    settings: &Settings,
    systemd: &Systemd,
    admin: &Admin,
    model: &Model,
    order: &[Member],
    also: &[String],
) -> Result<(), Stopped> {
    for m in order {
        let was_serving = admin.backend(&m.url).await?.is_some_and(|b| b.serves());
        if was_serving {
            // Every other instance (and the surge instance) must serve while this one restarts.
            let others: Vec<&str> = order
                .iter()
                .filter(|o| o.url != m.url)
                .map(|o| o.url.as_str())
                .chain(also.iter().map(String::as_str))
                .collect();
            for url in others {
                let b = admin.backend(url).await?;
                if !b.as_ref().is_some_and(Backend::serves) {
                    let state =
                        b.map_or_else(|| "unknown to the gateway".to_owned(), |b| b.describe());
                    return Err(Stopped(format!(
                        "{url} does not serve ({state}): stopped before restarting {} so that {} \
                         stays available",
                        m.name, model.name
                    )));
                }
            }
        }
        let line = restart_one(settings, systemd, admin, m).await?;
        outln!("  {line}")?;
    }
    Ok(())
}

/// Drain, restart, admit, ready: one instance. Returns its line of durations.
async fn restart_one(
    settings: &Settings,
    systemd: &Systemd,
    admin: &Admin,
    m: &Member,
) -> Result<String, Stopped> {
    let (drained_in, at_drain) = drain(settings, admin, &m.name, &m.url).await?;
    let t = Instant::now();
    systemd.reset_failed(&m.unit).await;
    let outcomes = systemd
        .run_jobs(
            "restart",
            std::slice::from_ref(&m.unit),
            Duration::from_millis(250),
            |_, status| {
                let _ = outln!("    {:<12} {status}", m.name);
            },
        )
        .await?;
    let job = outcomes
        .first()
        .map_or_else(|| "-".to_owned(), |o| o.result.clone());
    let st = systemd.unit_state(&m.unit).await?;
    if job != "done" || st.active_state != "active" {
        crate::control::report_failed_unit(systemd, &m.unit, &job).await?;
        return Err(Stopped(format!(
            "{} did not start again (job {job}, unit {} ({})); it stays drained at the gateway. \
             Fix the cause, then `citadel-systemd restart --rolling {}` again (it restarts and \
             admits the instances that serve nothing first)",
            m.name,
            st.active_state,
            st.sub_state,
            m.name
                .split(citadel_config::INSTANCE_SEPARATOR)
                .next()
                .unwrap_or(&m.name)
        )));
    }
    let restarted_in = t.elapsed();
    let ready_in = admit(admin, &m.name, &m.url).await?;
    Ok(format!(
        "{}: drained in {} ({at_drain} in flight), restarted in {}, ready at the gateway in {}",
        m.name,
        secs(drained_in),
        secs(restarted_in),
        secs(ready_in)
    ))
}

/// Drains `url` and waits (bounded by the gateway's drain_timeout) until
/// nothing is in flight there: (how long, how many were in flight at the drain).
/// On timeout the backend is admitted again (it is ready) and the step fails.
async fn drain(
    settings: &Settings,
    admin: &Admin,
    name: &str,
    url: &str,
) -> Result<(Duration, u64), Stopped> {
    let t = Instant::now();
    let bound = settings.gateway.drain_timeout.duration();
    let at_drain = admin.drain(url).await?.in_flight;
    loop {
        let left = admin.backend(url).await?.map_or(0, |b| b.in_flight);
        if left == 0 {
            return Ok((t.elapsed(), at_drain));
        }
        if t.elapsed() >= bound {
            let readmitted = admin.admit(url).await.is_ok();
            return Err(Stopped(format!(
                "{name} still had {left} requests in flight after the gateway's drain_timeout ({}); \
                 {} and nothing was restarted",
                settings.gateway.drain_timeout,
                if readmitted {
                    "it was admitted again"
                } else {
                    "admitting it again failed too (it stays drained)"
                }
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Admits `url` and waits until the gateway sees it ready (bounded).
async fn admit(admin: &Admin, name: &str, url: &str) -> Result<Duration, Stopped> {
    let t = Instant::now();
    let mut b = admin.admit(url).await?;
    while !b.serves() {
        if t.elapsed() >= READY_AT_GATEWAY {
            return Err(Stopped(format!(
                "{name} is running but the gateway does not see it ready within {} ({}); it \
                 stays admitted (the gateway routes to it once its probe passes)",
                secs(READY_AT_GATEWAY),
                b.describe()
            )));
        }
        tokio::time::sleep(POLL).await;
        b = admin
            .backend(url)
            .await?
            .ok_or_else(|| Stopped(format!("the gateway no longer knows {name} ({url})")))?;
    }
    Ok(t.elapsed())
}

/// Each instance's unit state and the gateway's view of it.
async fn print_states(systemd: &Systemd, admin: &Admin, all: &[Member], surge: Option<&Member>) {
    errln!("state now:");
    for m in all.iter().chain(surge) {
        let unit = match systemd.unit_state(&m.unit).await {
            Ok(st) => format!("{} ({})", st.active_state, st.sub_state),
            Err(e) => format!("? ({e})"),
        };
        let gw = match admin.backend(&m.url).await {
            Ok(Some(b)) => format!("{}, {} in flight", b.describe(), b.in_flight),
            Ok(None) => "unknown to the gateway".to_owned(),
            Err(e) => format!("? ({e})"),
        };
        errln!("  {:<14} unit {unit:<32} gateway: {gw}", m.name);
    }
}

/// `restart --surge MODEL`.
pub async fn surge(settings: &Settings, root: &Path, name: &str) -> Result<ExitCode> {
    let model = model_of(settings, name)?;
    let admin = Admin::for_root(root)?;
    let systemd = Systemd::connect().await?;
    let refuse = |why: String| {
        errln!("restart --surge {name}: refused, nothing was changed: {why}");
        Ok(ExitCode::from(EXIT_INVALID))
    };
    let instance = format!("{name}{}{SURGE}", citadel_config::INSTANCE_SEPARATOR);
    let unit = format!("citadel-model@{instance}.service");
    let dropin_dir = PathBuf::from(RUNTIME_UNIT_DIR).join(format!("{unit}.d"));
    let st = systemd.unit_state(&unit).await?;
    if matches!(
        st.active_state.as_str(),
        "active" | "activating" | "reloading"
    ) || dropin_dir.exists()
    {
        return refuse(format!(
            "a surge instance of {name} is already there ({unit}: {}): an earlier surge restart \
             did not finish. {}",
            st.active_state,
            removal_help(&unit, &dropin_dir, None)
        ));
    }
    // The driver's answers (nvidia-smi runs its own runtime: not on this one).
    let gpus = off_runtime(|| crate::gpu::resolve_on(root, settings));
    if !gpus.errors.is_empty() || !gpus.unresolved.is_empty() {
        return refuse(format!(
            "the GPUs of the config do not resolve on this host (`citadel-systemd validate` says why): {}",
            gpus.errors
                .iter()
                .chain(&gpus.unresolved)
                .map(|d| d.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let driver = crate::gpu::Driver::for_root(root);
    if let Err(why) = check_resources(&systemd, &driver, &gpus.host, model).await? {
        return refuse(why);
    }
    let all = members(model);
    let order = match preflight(&admin, model, &all).await {
        Ok(order) => order,
        Err(Stopped(why)) => return refuse(why),
    };
    let gateway_pid = systemd.unit_state(unit_names::GATEWAY).await?.main_pid;
    let listening = listening_ports(gateway_pid);
    let Some(port) = spare_port(settings, &listening) else {
        return refuse("no spare port above the configured ones".into());
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut surge_model = model.clone();
    surge_model.instances.clear();
    surge_model.port = match citadel_config::Port::new(i64::from(port)) {
        Ok(p) => p,
        Err(e) => return refuse(format!("port {port}: {e}")),
    };
    let dropin = format!(
        "{}\n[Service]\n# The temporary instance's port (citadel-systemd restart --surge).\nEnvironment={SURGE_PORT_ENV}={port}\n",
        citadel_render::instance_dropin(settings, &gpus.host, &surge_model, &instance)
    );
    let started = Instant::now();
    let surge_member = Member {
        name: instance.clone(),
        unit: unit.clone(),
        url: url.clone(),
    };

    // From here on the system changes.
    outln!("surge restart of {name}: temporary instance {instance} on port {port}")?;
    let dropin_file = dropin_dir.join("50-citadel.conf");
    crate::fsutil::write_atomic(&dropin_file, dropin.as_bytes(), 0o644)?;
    systemd.daemon_reload().await?;
    let t = Instant::now();
    systemd.reset_failed(&unit).await;
    let outcomes = systemd
        .run_jobs(
            "start",
            std::slice::from_ref(&unit),
            Duration::from_millis(250),
            |_, status| {
                let _ = outln!("    {instance:<12} {status}");
            },
        )
        .await?;
    let job = outcomes
        .first()
        .map_or_else(|| "-".to_owned(), |o| o.result.clone());
    let active = systemd.unit_state(&unit).await?.active_state == "active";
    if job != "done" || !active {
        crate::control::report_failed_unit(&systemd, &unit, &job).await?;
        remove_surge(&systemd, &unit, &dropin_dir).await?;
        errln!(
            "restart --surge {name}: STOPPED: the temporary instance did not start (job {job}); \
             it was removed again and nothing else was changed"
        );
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    let started_in = t.elapsed();
    let t = Instant::now();
    let added = async {
        admin.add(name, &url).await?;
        admit_wait(&admin, &instance, &url).await
    }
    .await;
    if let Err(Stopped(why)) = added {
        let _ = admin.remove(&url).await;
        remove_surge(&systemd, &unit, &dropin_dir).await?;
        errln!(
            "restart --surge {name}: STOPPED: {why}; the temporary instance was removed again and \
             nothing else was changed"
        );
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    outln!(
        "  {instance}: started in {}, ready at the gateway in {}",
        secs(started_in),
        secs(t.elapsed())
    )?;

    // The surge instance serves: whatever fails now leaves it serving.
    let result = async {
        roll(settings, &systemd, &admin, model, &order, std::slice::from_ref(&url)).await?;
        let (drained_in, at_drain) = drain(settings, &admin, &instance, &url).await?;
        let t = Instant::now();
        let outcomes = systemd
            .run_jobs("stop", std::slice::from_ref(&unit), Duration::from_millis(250), |_, _| {})
            .await?;
        admin.remove(&url).await?;
        remove_dropin(&dropin_dir)?;
        systemd.daemon_reload().await?;
        systemd.reset_failed(&unit).await;
        let job = outcomes.first().map_or("-", |o| o.result.as_str());
        outln!(
            "  {instance}: drained in {} ({at_drain} in flight), stopped and removed in {} (job {job})",
            secs(drained_in),
            secs(t.elapsed())
        )?;
        Ok::<(), Stopped>(())
    }
    .await;
    match result {
        Ok(()) => {
            outln!(
                "surge restart of {name}: done in {}; the configured instances serve on their own ports",
                secs(started.elapsed())
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Err(Stopped(why)) => {
            errln!("restart --surge {name}: STOPPED: {why}");
            print_states(&systemd, &admin, &all, Some(&surge_member)).await;
            errln!(
                "The temporary instance {instance} is left as it is (serving, unless it was \
                 drained). {}",
                removal_help(&unit, &dropin_dir, Some(&url))
            );
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// Admit a just-added backend and wait until it is ready at the gateway.
async fn admit_wait(admin: &Admin, name: &str, url: &str) -> Result<Duration, Stopped> {
    admit(admin, name, url).await
}

/// How an operator removes a surge instance left behind.
fn removal_help(unit: &str, dropin_dir: &Path, url: Option<&str>) -> String {
    let url = url.map_or_else(
        || "its URL (see `GET /admin/backends`)".to_owned(),
        |u| format!("\"{u}\""),
    );
    let sock = crate::admin::SOCKET_PATH;
    format!(
        "To remove it once nothing depends on it (it is runtime state: a reboot removes it too):\n  \
         curl -s --unix-socket {sock} -d '{{\"url\":{url}}}' http://localhost/admin/drain\n  \
         (wait until its in_flight is 0: curl -s --unix-socket {sock} http://localhost/admin/backends)\n  \
         systemctl stop '{unit}'\n  \
         curl -s --unix-socket {sock} -d '{{\"url\":{url}}}' http://localhost/admin/remove\n  \
         rm -r '{}' && systemctl daemon-reload",
        dropin_dir.display()
    )
}

/// Stops the surge unit and removes its runtime drop-in (a start that failed).
async fn remove_surge(systemd: &Systemd, unit: &str, dropin_dir: &Path) -> Result<()> {
    systemd
        .run_jobs(
            "stop",
            &[unit.to_owned()],
            Duration::from_millis(250),
            |_, _| {},
        )
        .await?;
    remove_dropin(dropin_dir)?;
    systemd.daemon_reload().await?;
    systemd.reset_failed(unit).await;
    Ok(())
}

fn remove_dropin(dir: &Path) -> Result<()> {
    use anyhow::Context;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

/// The first port above the config's highest model or instance port that no
/// config entry uses and nothing listens on in the gateway's network namespace.
fn spare_port(settings: &Settings, listening: &HashSet<u16>) -> Option<u16> {
    let used: HashSet<u16> = settings
        .models
        .iter()
        .flat_map(|m| m.ports())
        .chain(std::iter::once(settings.gateway.port))
        .map(|p| p.get())
        .collect();
    let highest = settings
        .models
        .iter()
        .flat_map(|m| m.ports())
        .map(|p| p.get())
        .max()?;
    (highest.checked_add(1)?..=u16::MAX).find(|p| !used.contains(p) && !listening.contains(p))
}

/// Ports listening in the network namespace of `pid` (the gateway shares
/// Citadel's with the engines): `/proc/PID/net/tcp` and `tcp6`. Without a
/// PID, this process's namespace.
fn listening_ports(pid: u32) -> HashSet<u16> {
    let base = if pid == 0 {
        "/proc/self/net".to_owned()
    } else {
        format!("/proc/{pid}/net")
    };
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("{base}/{f}")).ok())
        .flat_map(|text| parse_listening(&text))
        .collect()
}

/// The local ports of the LISTEN (`0A`) lines of a `/proc/net/tcp` table.
fn parse_listening(text: &str) -> Vec<u16> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
        })
        .collect()
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn human(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if bytes >= 1 << 30 {
        format!("{:.1}G", bytes as f64 / GIB)
    } else {
        format!("{}M", bytes >> 20)
    }
}

/// Whether the host holds one more instance of `model`: memory (its
/// `memory_max`, else what its running instances use at most) and, with GPUs,
/// free GPU memory for what the running instance uses on each of its GPUs.
/// `Ok(Err(why))` is a refusal.
async fn check_resources(
    systemd: &Systemd,
    driver: &crate::gpu::Driver,
    host: &citadel_render::Host,
    model: &Model,
) -> Result<std::result::Result<(), String>> {
    let name = model.name.as_str();
    let (need, why) = match model.limits.memory_max {
        Some(max) => (max.bytes(), format!("its memory_max, {max}")),
        None => {
            let mut most = None;
            for (n, _) in model.local_instances() {
                let st = systemd.unit_state(&model.instance_unit(n)).await?;
                if let Some(c) = st.memory_current.filter(|_| st.active_state == "active") {
                    most = Some(most.map_or(c, |m: u64| m.max(c)));
                }
            }
            match most {
                Some(c) => (
                    c,
                    format!("what a running instance of {name} uses now, {}", human(c)),
                ),
                None => {
                    return Ok(Err(format!(
                        "{name} has no memory_max and no running instance to measure, so the \
                         memory one more instance needs is unknown: set memory_max, or start {name}"
                    )))
                }
            }
        }
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let Some(available) = mem_available(&meminfo) else {
        return Ok(Err("cannot read MemAvailable from /proc/meminfo".into()));
    };
    if need > available {
        return Ok(Err(format!(
            "not enough memory for one more instance of {name}: it needs {why}; the host has {} \
             available (MemAvailable). Free memory, lower memory_max if it is larger than the \
             engine needs, or add an instance and use `restart --rolling`",
            human(available)
        )));
    }
    if model.gpus.is_empty() {
        return Ok(Ok(()));
    }
    Ok(check_gpus(driver, host, model))
}

/// Runs `f` on a thread of its own: for code that starts its own runtime
/// (the `gpu` module's nvidia-smi calls), which must not run on this one.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The GPU half of [`check_resources`]: nvidia-smi's free memory on each of
/// the model's GPUs against what instance 1's processes use there.
fn check_gpus(
    driver: &crate::gpu::Driver,
    host: &citadel_render::Host,
    model: &Model,
) -> std::result::Result<(), String> {
    let name = model.name.as_str();
    let mut uuids = Vec::new();
    for r in &model.gpus {
        match host.gpus.get(r) {
            Some(b) => uuids.push(b.uuid.clone()),
            None => return Err(format!("GPU {r} of {name} does not resolve on this host")),
        }
    }
    let (apps, free) = off_runtime(|| {
        let apps = crate::gpu::run_smi(
            driver,
            &[
                "--query-compute-apps=gpu_uuid,pid,used_memory",
                "--format=csv,noheader,nounits",
            ],
        );
        let free = crate::gpu::run_smi(
            driver,
            &[
                "--query-gpu=uuid,memory.free",
                "--format=csv,noheader,nounits",
            ],
        );
        (apps, free)
    });
    let cannot = |e: crate::gpu::DriverError| {
        format!(
            "{name} uses GPUs and their free memory cannot be read ({e}): surge refuses rather \
             than start an instance that may not fit"
        )
    };
    let apps = apps.map_err(cannot)?;
    let free = free.map_err(cannot)?;
    let unit = model.unit_name();
    let in_unit = |pid: u32| {
        std::fs::read_to_string(driver.proc_root.join(format!("{pid}/cgroup"))).is_ok_and(|c| {
            c.lines()
                .any(|l| l.ends_with(&format!("/{unit}")) || l.contains(&format!("/{unit}/")))
        })
    };
    let used = parse_apps(&apps);
    let free = parse_free(&free);
    for uuid in uuids {
        let need: u64 = used
            .iter()
            .filter(|(g, pid, _)| *g == uuid && in_unit(*pid))
            .map(|(_, _, mib)| mib)
            .sum();
        let Some(&have) = free.iter().find(|(g, _)| *g == uuid).map(|(_, f)| f) else {
            return Err(format!(
                "nvidia-smi does not list the free memory of {uuid} (a MIG device is not listed \
                 by --query-gpu): surge cannot check that one more instance of {name} fits"
            ));
        };
        if need > have {
            return Err(format!(
                "not enough GPU memory for one more instance of {name} on {uuid}: the running \
                 instance uses {need} MiB there, {have} MiB are free"
            ));
        }
    }
    Ok(())
}

/// `gpu_uuid, pid, used_memory` lines (MiB; `[N/A]` lines skipped).
fn parse_apps(text: &str) -> Vec<(String, u32, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            Some((
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// `uuid, memory.free` lines (MiB).
fn parse_free(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (uuid, free) = l.split_once(',')?;
            Some((uuid.trim().to_owned(), free.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue15_listening_ports_come_from_listen_lines_only() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
             0: 0100007F:2C8B 00000000:0000 0A 00000000:00000000 00:00000000 00000000   998        0 1 1 0000000000000000 100 0 0 10 0\n   \
             1: 0100007F:2C8C 0100007F:A0B2 01 00000000:00000000 00:00000000 00000000   998        0 2 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(parse_listening(tcp), vec![0x2C8B]);
        let tcp6 = "  sl  local_address                         remote_address                        st\n   \
             0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(parse_listening(tcp6), vec![8000]);
        assert!(parse_listening("garbage\nmore garbage\n: : :\n").is_empty());
    }

    #[test]
    fn issue15_spare_port_skips_configured_and_listening_ports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[models.a]\nport = 11400\nengine = \"sim\"\n[[models.a.instances]]\nport = 11402\n\
             [models.b]\nport = 11403\nengine = \"sim\"\n",
        )
        .unwrap();
        let s = citadel_config::load(&path).unwrap().settings;
        assert_eq!(spare_port(&s, &HashSet::new()), Some(11404));
        assert_eq!(spare_port(&s, &HashSet::from([11404, 11405])), Some(11406));
    }

    /// The GPU check against a fake nvidia-smi and /proc, called where the
    /// surge calls it: inside the CLI's runtime (nvidia-smi's own runtime
    /// must not nest in it).
    #[test]
    fn issue15_surge_gpu_check_reads_free_memory_of_the_models_gpus() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        for (pid, unit) in [(100, "citadel-model@phi3.service"), (200, "other.service")] {
            let d = proc_root.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cgroup"), format!("0::/system.slice/{unit}\n")).unwrap();
        }
        let smi = |free: u64| {
            let path = dir.path().join(format!("smi-{free}"));
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\ncase \"$1\" in\n  --query-compute-apps=*) printf 'GPU-a, 100, 5000\\nGPU-a, 200, 9000\\n' ;;\n  --query-gpu=*) printf 'GPU-a, {free}\\nGPU-b, 99999\\n' ;;\nesac\n"
                ),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            crate::gpu::Driver {
                nvidia_smi: path.into_os_string(),
                proc_root: proc_root.clone(),
            }
        };
        let dir_c = tempfile::tempdir().unwrap();
        let path = dir_c.path().join("c.toml");
        std::fs::write(
            &path,
            "[models.phi3]\nport = 11400\nengine = \"sim\"\ngpus = [0]\n",
        )
        .unwrap();
        let s = citadel_config::load(&path).unwrap().settings;
        let model = s.model("phi3").unwrap();
        let mut host = citadel_render::Host::default();
        host.gpus.insert(
            model.gpus[0].clone(),
            citadel_render::GpuBinding {
                uuid: "GPU-a".into(),
                minor: 0,
            },
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // phi3's process uses 5000 MiB of GPU-a (pid 200 is another unit's).
            assert_eq!(check_gpus(&smi(5000), &host, model), Ok(()));
            let e = check_gpus(&smi(4999), &host, model).unwrap_err();
            assert!(
                e.contains("not enough GPU memory") && e.contains("5000 MiB"),
                "{e}"
            );
            let none = crate::gpu::Driver {
                nvidia_smi: dir.path().join("no-smi").into_os_string(),
                proc_root: proc_root.clone(),
            };
            let e = check_gpus(&none, &host, model).unwrap_err();
            assert!(e.contains("cannot be read"), "{e}");
            let e = check_gpus(&smi(5000), &citadel_render::Host::default(), model).unwrap_err();
            assert!(e.contains("does not resolve"), "{e}");
        });
    }

    #[test]
    fn issue15_mem_available_and_nvidia_smi_lines() {
        let meminfo =
            "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(mem_available(meminfo), Some(8_192_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(
            parse_apps("GPU-a, 1234, 5000\nGPU-b, [N/A], [N/A]\n"),
            vec![("GPU-a".to_owned(), 1234, 5000)]
        );
        assert_eq!(
            parse_free("GPU-a, 70000\nGPU-b, [N/A]\n"),
            vec![("GPU-a".to_owned(), 70000)]
        );
    }
}
