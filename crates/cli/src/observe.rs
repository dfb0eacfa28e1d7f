//! `status`, `health` and `logs`: what systemd knows, what the services answer,
//! and what they wrote to the journal.

use std::net::SocketAddr;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use citadel_config::{unit_names, Settings};
use serde::Serialize;

use crate::services::{resolve, short_name};
use crate::systemd::{Systemd, UnitState};

#[derive(Debug, Serialize)]
struct ServiceStatus {
    /// The instance name (`phi3`, `phi3:2`) or `gateway`.
    service: String,
    /// The model a model unit runs (null for the gateway); issue 15.
    model: Option<String>,
    /// Its local instance number, 1 for the model's own unit (null for the gateway).
    instance: Option<usize>,
    port: u16,
    #[serde(flatten)]
    state: UnitState,
    /// Whether the main process runs the installed binary (issue 13, item 2);
    /// null when not running.
    binary: Option<crate::running::BinaryState>,
}

/// The installed binary a unit's main process should run.
fn binary_of(settings: &Settings, unit: &str) -> std::path::PathBuf {
    let name = if unit == unit_names::GATEWAY {
        "citadel-gateway"
    } else {
        "citadel-model"
    };
    settings.paths.bin().join(name)
}

fn port_of(settings: &Settings, unit: &str) -> u16 {
    if unit == unit_names::GATEWAY {
        return settings.gateway.port.get();
    }
    settings
        .instance(short_name(unit))
        .map_or(0, |(_, _, m)| m.port.get())
}

async fn collect(settings: &Settings, names: &[String]) -> Result<Vec<ServiceStatus>> {
    let systemd = Systemd::connect().await?;
    let mut out = Vec::new();
    for unit in resolve(settings, names)? {
        let state = systemd.unit_state(&unit).await?;
        let binary = crate::running::of_process(state.main_pid, &binary_of(settings, &unit));
        let instance = settings.instance(short_name(&unit));
        out.push(ServiceStatus {
            service: short_name(&unit).to_owned(),
            model: instance.as_ref().map(|(m, _, _)| m.name.to_string()),
            instance: instance.as_ref().map(|(_, n, _)| *n),
            port: port_of(settings, &unit),
            state,
            binary,
        });
    }
    Ok(out)
}

pub async fn status(settings: &Settings, names: &[String], json: bool) -> Result<ExitCode> {
    let started = Instant::now();
    let services = collect(settings, names).await?;
    let code = status_exit_code(&services);
    if json {
        outln!("{}", serde_json::to_string_pretty(&services)?)?;
        return Ok(code);
    }
    outln!(
        "{:<10} {:<28} {:<12} {:>7} {:>19} {:>8} {:>6}  {:<16}  STATUS",
        "SERVICE",
        "STATE",
        "SINCE",
        "PID",
        "MEMORY / MAX",
        "RESTARTS",
        "PORT",
        "BINARY"
    )?;
    for s in &services {
        let st = &s.state;
        let memory = match (st.memory_current, st.memory_max) {
            (Some(c), Some(m)) => format!("{} / {}", human(c), human(m)),
            (Some(c), None) => human(c),
            _ => "-".into(),
        };
        let pid = if st.main_pid == 0 {
            "-".to_owned()
        } else {
            st.main_pid.to_string()
        };
        // A model's further instances are indented below it (issue 15).
        let name = if s.instance.is_some_and(|n| n > 1) {
            format!("  {}", s.service)
        } else {
            s.service.clone()
        };
        outln!(
            "{:<10} {:<28} {:<12} {:>7} {:>19} {:>8} {:>6}  {:<16}  {}",
            name,
            format!("{} ({})", st.active_state, st.sub_state),
            since(st.since_usec),
            pid,
            memory,
            st.n_restarts,
            s.port,
            s.binary.map_or("-", |b| b.label()),
            st.status_text
        )?;
    }
    if std::env::var_os("CITADEL_TIMING").is_some() {
        errln!(
            "status took {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(code)
}

/// `systemctl status`'s exit status "program is not running" (LSB).
pub const EXIT_NOT_RUNNING: u8 = 3;

/// Issue 10, item 6: like `systemctl status UNIT...`, 0 when every listed unit
/// is active (or reloading), 3 when any is not (inactive, failed, activating:
/// a model still loading is not running yet). Without SERVICE arguments every
/// unit of the stack is listed, so a stopped or loading model also gives 3.
fn status_exit_code(services: &[ServiceStatus]) -> ExitCode {
    let running =
        |s: &ServiceStatus| matches!(s.state.active_state.as_str(), "active" | "reloading");
    if services.iter().all(running) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_RUNNING)
    }
}

/// One model's health: systemd's view and the live probes.
#[derive(Debug, Serialize)]
struct ModelHealth {
    model: String,
    /// `ready`, `loading` or `down` (see [`model_state`]); for a model with
    /// several instances also `degraded` (see [`model_health`]).
    state: &'static str,
    unit_state: String,
    engine_probe: String,
    gateway_state: String,
    healthy: bool,
    /// Every local instance, the model's own first (issue 15).
    instances: Vec<InstanceHealth>,
}

/// One local instance's health (issue 15): the same as a model's.
#[derive(Debug, Serialize)]
struct InstanceHealth {
    /// `phi3`, `phi3:2`, ...
    instance: String,
    port: u16,
    /// `ready`, `loading` or `down` (see [`model_state`]).
    state: &'static str,
    unit_state: String,
    engine_probe: String,
    /// The gateway's view of this instance's backend (of the model, for a
    /// model with one instance).
    gateway_state: String,
    healthy: bool,
}

/// A model's health from its instances' (issue 15): one instance is the
/// model; with several, the model is `ready` when every instance is,
/// `loading` when each is ready or loading, `degraded` when some serve or
/// load and others are down, `down` when none does.
fn model_health(model: &citadel_config::Model, instances: Vec<InstanceHealth>) -> ModelHealth {
    let states: Vec<&str> = instances.iter().map(|i| i.state).collect();
    let state = instances_state(&states);
    // One value when the instances agree, else how many are `good`.
    let summary = |f: &dyn Fn(&InstanceHealth) -> &str, good: &str| {
        let mut values = instances.iter().map(f);
        let first = values.next().unwrap_or_default();
        if values.all(|v| v == first) {
            first.to_owned()
        } else {
            let n = instances.iter().filter(|i| f(i).starts_with(good)).count();
            format!("{n}/{} {good}", instances.len())
        }
    };
    let unit_state = summary(&|i| i.unit_state.as_str(), "active");
    let engine_probe = summary(&|i| i.engine_probe.as_str(), "ok");
    let gateway_state = summary(&|i| i.gateway_state.as_str(), "ready");
    ModelHealth {
        model: model.name.to_string(),
        state,
        unit_state,
        engine_probe,
        gateway_state,
        healthy: state == "ready",
        instances,
    }
}

/// The state of a model over its instances' states (see [`model_health`]).
fn instances_state(states: &[&str]) -> &'static str {
    let ready = states.iter().filter(|s| **s == "ready").count();
    let loading = states.iter().filter(|s| **s == "loading").count();
    if ready == states.len() {
        "ready"
    } else if ready + loading == states.len() {
        "loading"
    } else if states.len() > 1 && ready + loading > 0 {
        "degraded"
    } else {
        "down"
    }
}

#[derive(Debug, Serialize)]
struct Health {
    /// `healthy`, `loading`, `degraded` or `down` (see [`overall_state`]).
    overall: String,
    gateway_unit: String,
    gateway_ready: bool,
    /// Models still loading (their units are starting).
    loading: usize,
    models: Vec<ModelHealth>,
}

/// A model's state for `health` (issue 10, item 1): `ready` when its unit is
/// active, its engine answers and the gateway routes to it; `loading` while its
/// unit is starting (`activating (start)`: the engine loads and READY=1 has
/// not come yet), or just after, while the gateway has not admitted it yet
/// (its unit is active and the engine answers, but the gateway's next probe,
/// within `probe_interval`, has not seen it ready yet);
/// `down` otherwise (stopped, failed, restarting after a crash, unhealthy).
/// The gateway state shown when `/health/models` needs a key this user cannot
/// read: the unit's state (READY=1 from the supervisor) decides alone.
const NO_ACCESS: &str = "not visible without an API key (run as root)";

fn model_state(active: &str, sub: &str, probe_ok: bool, gateway_state: &str) -> &'static str {
    match (active, sub) {
        ("active", _) if probe_ok && (gateway_state == "ready" || gateway_state == NO_ACCESS) => {
            "ready"
        }
        ("active", _) if probe_ok => "loading",
        ("activating", "start" | "start-pre" | "start-post") => "loading",
        _ => "down",
    }
}

/// The stack's state: `down` when the API is not served or no model serves
/// or loads (a `degraded` model serves); `healthy` when every model serves; `loading` when every model
/// that does not serve yet is loading (a fresh start or boot: not down, the
/// API serves what is ready); `degraded` otherwise. Exit codes: 0, 1 (loading
/// and degraded), 2 (down).
fn overall_state(gateway_ready: bool, states: &[&str]) -> &'static str {
    let ready = states.iter().filter(|s| **s == "ready").count();
    let loading = states.iter().filter(|s| **s == "loading").count();
    // A degraded model (some of its instances down) still serves.
    let degraded = states.iter().filter(|s| **s == "degraded").count();
    if !gateway_ready || ready + loading + degraded == 0 {
        "down"
    } else if ready == states.len() {
        "healthy"
    } else if ready + loading == states.len() {
        "loading"
    } else {
        "degraded"
    }
}

async fn health_once(settings: &Settings) -> Result<Health> {
    let systemd = Systemd::connect().await?;
    let gw_state = systemd.unit_state(unit_names::GATEWAY).await?;
    let gw_addr = gateway_addr(settings);
    // Beyond loopback `/health/models` needs an API key (issue 12, item 5):
    // send the first one, as root can read it (a small local file).
    let g = &settings.gateway;
    let key = (g.auth && !g.listen.is_loopback())
        .then(|| std::fs::read_to_string(&g.api_keys_file).ok())
        .flatten()
        .and_then(|text| crate::top::first_api_key(&text));
    let answer = http_get_as(
        gw_addr,
        "/health/models",
        key.as_deref(),
        HTTP_TIMEOUT,
        HTTP_MAX_BODY,
    )
    .await
    .ok();
    // 401: the gateway listens beyond loopback and this user cannot read a
    // key (not root). Its per-model view is then unknown, which must not turn
    // a model the supervisor reports ready into "loading".
    let no_access = matches!(answer, Some((401, _)));
    let gw_models = answer
        .filter(|(code, _)| *code == 200)
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
    let mut models = Vec::new();
    let isolated = settings.engine_network().is_isolated();
    for model in &settings.models {
        let mut instances = Vec::new();
        for (n, m) in model.local_instances() {
            let st = systemd.unit_state(&model.instance_unit(n)).await?;
            let probe = if isolated {
                // Issue 12, item 1: the engine is reachable only inside Citadel's
                // network namespace; see it through the gateway and the supervisor.
                isolated_engine_probe(gw_models.as_ref(), &m, &st.active_state)
            } else {
                match http_get(
                    SocketAddr::from(([127, 0, 0, 1], m.port.get())),
                    &m.health_path,
                )
                .await
                {
                    Ok((200, _)) => "ok".to_owned(),
                    Ok((code, _)) => format!("http {code}"),
                    Err(e) => format!("unreachable ({e})"),
                }
            };
            let gateway_model = gw_models.as_ref().and_then(|v| {
                v["models"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == m.name.as_str())
                    .cloned()
            });
            // With several instances, each is judged by the gateway's view of
            // its own backend; a lone instance by the model's (as before).
            let gateway_state = if model.instance_count() > 1 {
                gateway_model.as_ref().and_then(|x| {
                    x["backends"]
                        .as_array()?
                        .iter()
                        .find(|b| b["url"] == m.local_url().as_str())?["state"]
                        .as_str()
                        .map(str::to_owned)
                })
            } else {
                gateway_model.and_then(|x| x["state"].as_str().map(str::to_owned))
            }
            .unwrap_or_else(|| {
                if no_access {
                    NO_ACCESS.into()
                } else {
                    "unknown".into()
                }
            });
            let state = model_state(
                &st.active_state,
                &st.sub_state,
                probe == "ok",
                &gateway_state,
            );
            instances.push(InstanceHealth {
                instance: model.instance_name(n),
                port: m.port.get(),
                state,
                healthy: state == "ready",
                unit_state: format!("{} ({})", st.active_state, st.sub_state),
                engine_probe: probe,
                gateway_state,
            });
        }
        models.push(model_health(model, instances));
    }
    let gateway_ready = gw_state.active_state == "active"
        && http_get(gw_addr, "/health/ready")
            .await
            .is_ok_and(|(code, _)| code == 200);
    let states: Vec<&str> = models.iter().map(|m| m.state).collect();
    let overall = overall_state(gateway_ready, &states);
    Ok(Health {
        overall: overall.into(),
        gateway_unit: format!("{} ({})", gw_state.active_state, gw_state.sub_state),
        gateway_ready,
        loading: states.iter().filter(|s| **s == "loading").count(),
        models,
    })
}

/// The engine's health where the host cannot reach it (issue 12, item 1: it
/// listens in Citadel's private network namespace). `ok` when the gateway's
/// probe of the model's own backend (`/health/models`) passed; the gateway's
/// state and error when its probe failed; otherwise (not probed yet, or the
/// gateway does not answer) what the supervisor says: an `active` unit has
/// sent READY=1 after a real completion and keeps the watchdog fed only while
/// the engine is healthy.
fn isolated_engine_probe(
    gw_models: Option<&serde_json::Value>,
    m: &citadel_config::Model,
    active_state: &str,
) -> String {
    let backend = gw_models
        .and_then(|v| v["models"].as_array())
        .and_then(|ms| ms.iter().find(|x| x["name"] == m.name.as_str()))
        .and_then(|x| x["backends"].as_array())
        .and_then(|bs| bs.iter().find(|b| b["url"] == m.local_url().as_str()));
    let state = backend.and_then(|b| b["state"].as_str());
    let error = backend.and_then(|b| b["last_error"].as_str());
    match (state, error) {
        (Some("ready"), _) => "ok".to_owned(),
        (Some(state), Some(error)) => format!("{state} through the gateway ({error})"),
        _ if active_state == "active" => "ok".to_owned(),
        _ => format!("{active_state} (the engine is reachable only through the gateway)"),
    }
}

/// Where to reach the gateway from this host.
pub fn gateway_addr(settings: &Settings) -> SocketAddr {
    let listen = settings.gateway.listen;
    let ip = if listen.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen
    };
    SocketAddr::new(ip, settings.gateway.port.get())
}

/// The gateway's count of completed SIGHUP reloads and whether the last one
/// failed (from its `/health`), or None when it does not answer.
pub async fn gateway_reloads(settings: &Settings) -> Option<(u64, bool)> {
    let (code, body) = http_get(gateway_addr(settings), "/health").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .ok()
        .filter(|_| code == 200)?;
    Some((v["reloads"].as_u64()?, v["last_reload"] == "failed"))
}

/// Exit 0 healthy, 1 loading or degraded, 2 down: usable from monitoring as it is.
pub async fn health(settings: &Settings, json: bool, watch: bool) -> Result<ExitCode> {
    let mut last = String::new();
    loop {
        let h = health_once(settings).await?;
        let text = if json {
            serde_json::to_string(&h)?
        } else {
            let mut t = format!(
                "{}: gateway {} ({}), {}/{} models healthy{}\n",
                h.overall.to_uppercase(),
                if h.gateway_ready {
                    "ready"
                } else {
                    "not ready"
                },
                h.gateway_unit,
                h.models.iter().filter(|m| m.healthy).count(),
                h.models.len(),
                if h.loading > 0 {
                    format!(", {} loading", h.loading)
                } else {
                    String::new()
                }
            );
            let word = |state: &str| match state {
                "ready" => "ok",
                "loading" => "loading",
                "degraded" => "DEGRADED",
                _ => "FAIL",
            };
            for m in &h.models {
                t.push_str(&format!(
                    "  {:<10} {:<7} unit {:<22} engine {:<14} gateway {}\n",
                    m.model,
                    word(m.state),
                    m.unit_state,
                    m.engine_probe,
                    m.gateway_state
                ));
                // Issue 15: each instance of a model with several, below it.
                if m.instances.len() > 1 {
                    for i in &m.instances {
                        t.push_str(&format!(
                            "    {:<8} {:<7} unit {:<22} engine {:<14} gateway {}\n",
                            i.instance,
                            word(i.state),
                            i.unit_state,
                            i.engine_probe,
                            i.gateway_state
                        ));
                    }
                }
            }
            t
        };
        if !watch {
            out!("{text}")?;
            if json {
                outln!()?;
            }
            return Ok(ExitCode::from(match h.overall.as_str() {
                "healthy" => 0,
                "loading" | "degraded" => 1,
                _ => 2,
            }));
        }
        if text != last {
            out!("{text}")?;
            if json {
                outln!()?;
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub struct LogOptions {
    pub follow: bool,
    pub since: Option<String>,
    pub priority: Option<String>,
    pub json: bool,
    pub lines: Option<u32>,
}

/// How many lines `logs` shows without `-n`: what `journalctl -e` shows.
pub const DEFAULT_LOG_LINES: u32 = 1000;

/// journalctl's arguments for `logs` (issue 10, item 6): like `journalctl -e`,
/// the last lines (`-n`, default 1000) and, on a terminal, journalctl's own
/// pager opened at the end. `--follow` and output that is not a terminal get
/// no pager; `--follow` without `-n` keeps journalctl's own default (10).
pub fn journalctl_args(units: &[String], o: &LogOptions, terminal: bool) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let pager = terminal && !o.follow;
    if !pager {
        args.push("--no-pager".into());
    }
    args.extend([
        "-o".into(),
        if o.json { "json" } else { "short-iso" }.into(),
    ]);
    for u in units {
        args.extend(["-u".into(), u.clone()]);
    }
    if let Some(s) = &o.since {
        args.extend(["--since".into(), s.clone()]);
    }
    if let Some(p) = &o.priority {
        args.extend(["--priority".into(), p.clone()]);
    }
    let lines = o
        .lines
        .or((!o.follow).then_some(DEFAULT_LOG_LINES))
        .map(|n| n.to_string());
    if let Some(n) = lines {
        args.extend(["--lines".into(), n]);
    }
    if pager {
        args.push("--pager-end".into());
    }
    if o.follow {
        args.push("--follow".into());
    }
    args
}

/// The journal of the chosen (default all) Citadel units, interleaved.
pub fn logs(settings: &Settings, names: &[String], o: &LogOptions) -> Result<ExitCode> {
    use std::io::IsTerminal;

    let units = if names.is_empty() {
        vec![
            "citadel-model@*".to_owned(),
            unit_names::GATEWAY.to_owned(),
            unit_names::TARGET.to_owned(),
            "citadel-failure@*".to_owned(),
        ]
    } else {
        log_units(settings, names)?
    };
    let mut cmd = Command::new("journalctl");
    cmd.args(journalctl_args(&units, o, std::io::stdout().is_terminal()));
    let status = run_in_foreground(cmd).context("cannot run journalctl")?;
    Ok(ExitCode::from(exit_code_of(status)))
}

/// The units `logs SERVICE...` shows (`journalctl -u` each): the resolved
/// units and, for a model named by its model name, every other unit of it
/// too (`citadel-model@NAME:*`: a surge instance, an instance since removed;
/// issue 15). A model's instances share `CITADEL_SERVICE=NAME` and each has
/// its own `CITADEL_INSTANCE=`; `-u` also shows what systemd itself logged
/// about each unit (started, failed, restarts).
fn log_units(settings: &Settings, names: &[String]) -> Result<Vec<String>> {
    let mut units = resolve(settings, names)?;
    for name in names {
        if let Some(m) = settings.model(name) {
            units.push(format!(
                "citadel-model@{}{}*",
                m.name,
                citadel_config::INSTANCE_SEPARATOR
            ));
        }
    }
    Ok(units)
}

/// Runs `cmd` and waits for it the way `system(3)` does: Ctrl-C goes to the
/// child (journalctl, its pager) and this process outlives it, so the shell gets
/// the terminal back only once the pager has restored it.
fn run_in_foreground(cmd: Command) -> std::io::Result<std::process::ExitStatus> {
    use tokio::signal::unix::{signal, SignalKind};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut interrupts = signal(SignalKind::interrupt())?;
        let mut child = tokio::process::Command::from(cmd).spawn()?;
        loop {
            tokio::select! {
                status = child.wait() => return status,
                _ = interrupts.recv() => {}
            }
        }
    })
}

/// A child's exit status as ours: its code, or 128 + the signal that ended it
/// (130 for Ctrl-C), as a shell reports it.
fn exit_code_of(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;

    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 2,
    }
}

/// How long one local probe may take, connect to last body byte.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response body read by a probe (health answers are small JSON).
const HTTP_MAX_BODY: usize = 1024 * 1024;

/// Why a local HTTP probe failed. The services answering are outside input:
/// whatever bytes they send, a probe ends with a value or one of these.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("`{0}` is not a valid request path")]
    BadPath(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("bad HTTP response: {0}")]
    Http(#[from] hyper::Error),
    #[error("response body larger than {0} bytes")]
    BodyTooLarge(usize),
}

/// `GET path` on `addr` with HTTP/1.1 (hyper's connection-level client):
/// (status, body as lossy UTF-8). Everything, connecting included, happens
/// within `timeout`; the body is read up to `max_body` bytes.
async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, String), HttpError> {
    http_get_as(addr, path, None, timeout, max_body).await
}

/// [`http_get_with`] with `Authorization: Bearer KEY` when `bearer` is given
/// (`top` reads `/metrics`, which needs a key beyond loopback). A key that
/// cannot be a header value is refused like a bad path, never echoed.
pub(crate) async fn http_get_as(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, String), HttpError> {
    use http_body_util::Empty;

    let mut request = hyper::Request::builder()
        .method(hyper::Method::GET)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONNECTION, "close");
    if let Some(key) = bearer {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = request
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|_| HttpError::BadPath(path.escape_debug().to_string()))?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(HttpError::Connect)?;
        stream.set_nodelay(true).map_err(HttpError::Connect)?;
        exchange(stream, request, max_body)
            .await
            .map_err(|e| match e {
                Exchange::Http(e) => HttpError::Http(e),
                Exchange::TooLarge(n) => HttpError::BodyTooLarge(n),
            })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// How one HTTP/1.1 exchange failed ([`exchange`]).
#[derive(Debug)]
pub(crate) enum Exchange {
    Http(hyper::Error),
    TooLarge(usize),
}

/// Sends `request` on the connected `stream` with hyper's connection-level
/// HTTP/1.1 client and reads the answer: (status, body as lossy UTF-8, at
/// most `max_body` bytes). Shared by the local probes (TCP) and the gateway's
/// admin client (Unix socket); the caller bounds it in time.
pub(crate) async fn exchange<S, B>(
    stream: S,
    request: hyper::Request<B>,
    max_body: usize,
) -> Result<(u16, String), Exchange>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::{BodyExt, Limited};

    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(Exchange::Http)?;
    let response = async {
        let response = sender.send_request(request).await.map_err(Exchange::Http)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => Exchange::Http(*e),
                Err(_) => Exchange::TooLarge(max_body),
            })?
            .to_bytes();
        Ok::<_, Exchange>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    // The connection future does the I/O; it may end (Connection: close)
    // before the body has been collected, so then wait for the response.
    tokio::pin!(response, conn);
    tokio::select! {
        biased;
        r = &mut response => r,
        c = &mut conn => {
            c.map_err(Exchange::Http)?;
            response.await
        }
    }
}

/// A local probe: `GET path` with the default timeout and body limit.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), HttpError> {
    http_get_with(addr, path, HTTP_TIMEOUT, HTTP_MAX_BODY).await
}

fn human(bytes: u64) -> String {
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (suffix, size) in units {
        if bytes >= size {
            return format!("{:.1}{suffix}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes}B")
}

fn since(usec: u64) -> String {
    if usec == 0 {
        return "-".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    let ago = Duration::from_micros(now.saturating_sub(usec)).as_secs();
    match ago {
        0..=119 => format!("{ago} s ago"),
        120..=7199 => format!("{} min ago", ago / 60),
        7200..=172_799 => format!("{} h ago", ago / 3600),
        _ => format!("{} days ago", ago / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A one-connection server: reads the request, sends `response`, closes
    /// (or, with `hold`, keeps the connection open without a word).
    async fn serve_once(response: Vec<u8>, hold: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&response).await;
            if hold {
                let _ = s.read(&mut buf).await;
            }
            let _ = s.shutdown().await;
        });
        addr
    }

    async fn get(response: &[u8]) -> Result<(u16, String), HttpError> {
        let addr = serve_once(response.to_vec(), false).await;
        http_get_with(addr, "/health", Duration::from_secs(2), 64).await
    }

    #[test]
    fn a_plain_and_a_chunked_answer_are_read() {
        let rt = runtime();
        let (code, body) = rt
            .block_on(get(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
            .unwrap();
        assert_eq!((code, body.as_str()), (200, "{}"));
        let (code, body) = rt
            .block_on(get(
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ))
            .unwrap();
        assert_eq!((code, body.as_str()), (503, "abc"));
    }

    /// Issue 9, item 2: the old helper dropped every body line that was all hex
    /// digits, taking it for a chunk size.
    #[test]
    fn issue9_http_probe_keeps_an_all_hex_body_line() {
        let body = "cafe\n{\"a\":1}\nbeef";
        let response = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let (code, got) = runtime().block_on(get(response.as_bytes())).unwrap();
        assert_eq!((code, got.as_str()), (200, body));
    }

    /// Issue 9, item 2: a chunk size `ffffffffffffffff` (the supervisor's probe
    /// panicked on it), a truncated body and an oversized one are errors.
    #[test]
    fn issue9_http_probe_refuses_hostile_responses() {
        let rt = runtime();
        let huge_chunk =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc\r\n";
        assert!(rt.block_on(get(huge_chunk)).is_err());
        let overflow =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nabc\r\n";
        assert!(rt.block_on(get(overflow)).is_err());
        let truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort";
        assert!(rt.block_on(get(truncated)).is_err());
        let truncated_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        assert!(rt.block_on(get(truncated_chunked)).is_err());
        let too_large = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n{}",
            "x".repeat(65)
        );
        assert!(matches!(
            rt.block_on(get(too_large.as_bytes())),
            Err(HttpError::BodyTooLarge(64))
        ));
        assert!(rt.block_on(get(b"SSH-2.0-OpenSSH_9.2\r\n")).is_err());
        assert!(rt.block_on(get(b"")).is_err());
    }

    /// Issue 9, item 2: the old helper did blocking I/O inside async functions;
    /// a server that never answers now costs the timeout and no more, and a
    /// path that would inject a header line is refused before anything is sent.
    #[test]
    fn issue9_http_probe_times_out_and_refuses_bad_paths() {
        let rt = runtime();
        let started = Instant::now();
        let r = rt.block_on(async {
            let addr = serve_once(Vec::new(), true).await;
            http_get_with(addr, "/health", Duration::from_millis(200), 64).await
        });
        assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let r = rt.block_on(async {
            let addr = serve_once(b"HTTP/1.1 200 OK\r\n\r\n".to_vec(), false).await;
            http_get_with(addr, "/h\r\nX-Evil: 1", Duration::from_secs(1), 64).await
        });
        assert!(matches!(r, Err(HttpError::BadPath(_))), "{r:?}");
    }

    /// Issue 10, item 1: with an 8 s loader `health` said DOWN while 2 of 3
    /// models served. A model whose unit is starting is loading, and a stack
    /// whose models serve or load is not down.
    #[test]
    fn issue10_health_says_loading_not_down() {
        assert_eq!(model_state("activating", "start", false, "down"), "loading");
        assert_eq!(
            model_state("activating", "start", true, "loading"),
            "loading"
        );
        assert_eq!(model_state("active", "running", true, "loading"), "loading");
        assert_eq!(model_state("active", "running", true, "ready"), "ready");
        // A crashed engine waiting to be restarted is down, not loading.
        assert_eq!(
            model_state("activating", "auto-restart", false, "down"),
            "down"
        );
        assert_eq!(model_state("failed", "failed", false, "down"), "down");
        assert_eq!(model_state("inactive", "dead", false, "down"), "down");
        assert_eq!(model_state("active", "running", false, "ready"), "down");
        // Ready in systemd, not admitted by the gateway yet: loading.
        assert_eq!(model_state("active", "running", true, "down"), "loading");
        // The gateway's view needs a key this user cannot read: systemd's
        // READY decides, never "loading" forever (review of issue 10 item 6).
        assert_eq!(model_state("active", "running", true, NO_ACCESS), "ready");
        assert_eq!(model_state("failed", "failed", false, NO_ACCESS), "down");

        assert_eq!(
            overall_state(true, &["ready", "ready", "loading"]),
            "loading"
        );
        assert_eq!(overall_state(true, &["loading", "loading"]), "loading");
        assert_eq!(overall_state(true, &["ready", "ready"]), "healthy");
        assert_eq!(
            overall_state(true, &["ready", "loading", "down"]),
            "degraded"
        );
        assert_eq!(overall_state(true, &["down", "down"]), "down");
        assert_eq!(overall_state(false, &["ready", "loading"]), "down");
    }

    fn response_bytes() -> impl Strategy<Value = Vec<u8>> {
        let head = prop_oneof![
            Just(Vec::new()),
            Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
            Just(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()),
            Just(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec()),
        ];
        let tail = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            "[0-9a-fA-F;\r\n xz=-]{0,64}".prop_map(String::into_bytes),
        ];
        (head, tail).prop_map(|(mut h, t)| {
            h.extend(t);
            h
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Issue 9, item 2: no byte sequence makes the probe panic or hang.
        #[test]
        fn issue9_http_probe_never_panics_on_arbitrary_responses(bytes in response_bytes()) {
            let started = Instant::now();
            let timeout = Duration::from_secs(1);
            let _ = runtime().block_on(async {
                let addr = serve_once(bytes, false).await;
                http_get_with(addr, "/health", timeout, 64).await
            });
            prop_assert!(started.elapsed() < timeout + Duration::from_millis(500));
        }
    }

    /// Issue 15: a model with several instances is ready only when every
    /// instance is, degraded (still serving) when some are down; the stack
    /// with a degraded model is degraded, not down.
    #[test]
    fn issue15_health_of_a_model_over_its_instances() {
        assert_eq!(instances_state(&["ready"]), "ready");
        assert_eq!(instances_state(&["down"]), "down");
        assert_eq!(instances_state(&["ready", "ready"]), "ready");
        assert_eq!(instances_state(&["ready", "loading"]), "loading");
        assert_eq!(instances_state(&["ready", "down"]), "degraded");
        assert_eq!(instances_state(&["loading", "down"]), "degraded");
        assert_eq!(instances_state(&["down", "down"]), "down");
        assert_eq!(overall_state(true, &["ready", "degraded"]), "degraded");
        assert_eq!(overall_state(true, &["degraded"]), "degraded");
        assert_eq!(overall_state(true, &["down", "down"]), "down");
        assert_eq!(overall_state(false, &["ready"]), "down");

        let s = citadel_config::parse(
            "[models.phi3]\nport = 11403\nengine = \"sim\"\n[[models.phi3.instances]]\nport = 11413\n",
            std::path::Path::new("c.toml"),
        )
        .unwrap()
        .settings;
        let m = &s.models[0];
        let inst = |name: &str, port: u16, state: &'static str, unit: &str| InstanceHealth {
            instance: name.into(),
            port,
            state,
            unit_state: unit.into(),
            engine_probe: if state == "ready" {
                "ok"
            } else {
                "unreachable"
            }
            .into(),
            gateway_state: if state == "ready" { "ready" } else { "down" }.into(),
            healthy: state == "ready",
        };
        let h = model_health(
            m,
            vec![
                inst("phi3", 11403, "ready", "active (running)"),
                inst("phi3:2", 11413, "down", "inactive (dead)"),
            ],
        );
        assert_eq!(h.state, "degraded");
        assert!(!h.healthy);
        assert_eq!(h.unit_state, "1/2 active");
        assert_eq!(h.engine_probe, "1/2 ok");
        assert_eq!(h.gateway_state, "1/2 ready");
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(json["instances"][1]["instance"], "phi3:2");
        assert_eq!(json["instances"][1]["port"], 11413);
        let h = model_health(
            m,
            vec![
                inst("phi3", 11403, "ready", "active (running)"),
                inst("phi3:2", 11413, "ready", "active (running)"),
            ],
        );
        assert_eq!((h.state, h.healthy), ("ready", true));
        assert_eq!(h.unit_state, "active (running)");
    }

    /// Issue 15: `logs phi3` covers every unit of the model (its instances,
    /// a surge instance, one since removed); `logs phi3:2` that instance only.
    #[test]
    fn issue15_logs_of_a_model_cover_every_instance() {
        let s = citadel_config::parse(
            "[models.phi3]\nport = 11403\nengine = \"sim\"\n[[models.phi3.instances]]\nport = 11413\n\
             [models.tiny]\nport = 11404\nengine = \"sim\"\n",
            std::path::Path::new("c.toml"),
        )
        .unwrap()
        .settings;
        let names = |n: &[&str]| n.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            log_units(&s, &names(&["phi3"])).unwrap(),
            [
                "citadel-model@phi3.service",
                "citadel-model@phi3:2.service",
                "citadel-model@phi3:*"
            ]
        );
        assert_eq!(
            log_units(&s, &names(&["phi3:2"])).unwrap(),
            ["citadel-model@phi3:2.service"]
        );
        assert_eq!(
            log_units(&s, &names(&["tiny", "gateway"])).unwrap(),
            [
                "citadel-model@tiny.service",
                "citadel-gateway.service",
                "citadel-model@tiny:*"
            ]
        );
    }
}
