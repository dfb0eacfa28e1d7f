//! `start` and `restart` of the whole stack (issue 10, items 1 and 2): what
//! they start and what they wait for.
//!
//! - `start` starts `citadel.target`, which pulls in the gateway and the
//!   *enabled* models (their `.wants/` links): a disabled model stays
//!   stopped. `restart` restarts the gateway and the models that are enabled
//!   or running, and starts the target; a stopped, disabled model stays
//!   stopped.
//! - The API must not wait for the slowest model, and neither does the
//!   command: it waits for the gateway's job (READY=1), and for each model's
//!   job to end (ready or failed) for at most [`LOADING_GRACE`] since the
//!   command began; models still loading then are reported with their
//!   STATUS= text (`loading mixtral: 45 s`), not waited for, and not failures.
//!   [`Wait::All`] (`start --wait`) waits for every model's job instead.
//! - Then, for the models that are ready, it waits (at most
//!   [`admission_bound`]) until the gateway has admitted them (its next probe
//!   after READY=1), so that `health` says healthy right after a `start` that
//!   found everything up.
//! - Exit 0 when the gateway is up (loading models included); 3 when the
//!   gateway or a model failed, with their last journal lines.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use citadel_config::{unit_names, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control::EXIT_FAILED;
use crate::services::short_name;
use crate::systemd::{JobOutcome, Systemd};

/// How long `start`/`restart` wait for models to finish loading before they
/// report the rest as loading and return (the gateway is waited for anyway).
/// Long enough for quick loaders (the simulators, small models) to be
/// reported as serving; far below a large model's load time.
pub const LOADING_GRACE: Duration = Duration::from_secs(10);

/// What `start`/`restart` of the whole stack wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wait {
    /// The gateway, and the models that become ready within [`LOADING_GRACE`].
    #[default]
    Api,
    /// Every model started, up to its own start timeout (`start --wait`).
    All,
}

/// Whether the command stops waiting for jobs: the gateway's job has ended
/// and either no model job is pending or (with [`Wait::Api`]) the grace is over.
fn done_waiting(wait: Wait, gateway_done: bool, models_pending: usize, grace_over: bool) -> bool {
    gateway_done && (models_pending == 0 || (wait == Wait::Api && grace_over))
}

/// How long to wait for the gateway to admit models that are ready: two of
/// its probe intervals and 5 s.
pub fn admission_bound(settings: &Settings) -> Duration {
    settings.gateway.probe_interval.duration() * 2 + Duration::from_secs(5)
}

/// A model's place in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelOutcome {
    /// Active and admitted by the gateway (or not checked: no answer).
    Serving,
    /// Active, but the gateway has not admitted it within the bound.
    NotAdmitted,
    /// Its job has not ended: still loading.
    Loading,
    /// Its job failed, or it is not active after a finished job.
    Failed,
    /// Not part of this start (disabled) and not running.
    Skipped,
}

/// A model's outcome from its job result (None: still pending) and unit state.
fn model_outcome(covered: bool, job: Option<&str>, active_state: &str) -> ModelOutcome {
    match (covered, job) {
        (false, _) if active_state == "active" => ModelOutcome::Serving,
        (false, _) => ModelOutcome::Skipped,
        (true, None) if active_state == "failed" => ModelOutcome::Failed,
        (true, None) => ModelOutcome::Loading,
        (true, Some("done")) if active_state == "active" => ModelOutcome::Serving,
        (true, Some(_)) => ModelOutcome::Failed,
    }
}

/// Runs `start` or `restart` (the `verb`) of the whole stack; see the module docs.
pub async fn run(
    settings: &Settings,
    systemd: Systemd,
    verb: &str,
    wait: Wait,
) -> Result<ExitCode> {
    let started = Instant::now();
    let systemd = Arc::new(systemd);
    // Which models this command starts: the enabled ones (the target pulls
    // in exactly those), and for a restart also the running ones.
    let mut covered = Vec::new();
    // Every local instance of every model (issue 15), each on its own.
    for u in crate::services::model_units(settings) {
        let st = systemd.unit_state(&u).await?;
        let enabled = st.unit_file_state.starts_with("enabled");
        let running = matches!(
            st.active_state.as_str(),
            "active" | "activating" | "reloading"
        );
        if enabled || (verb == "restart" && running) {
            covered.push(u);
        }
    }
    let mut units = vec![unit_names::GATEWAY.to_owned()];
    units.extend(covered.iter().cloned());
    for u in &units {
        systemd.reset_failed(u).await;
    }
    outln!(
        "{verb}: {} (and {})",
        units
            .iter()
            .map(|u| short_name(u))
            .collect::<Vec<_>>()
            .join(" "),
        unit_names::TARGET
    )?;

    // One job per unit, each awaited by its own task; the target's job (it
    // is ordered after every model it pulls in) only makes it active.
    let mut tasks = tokio::task::JoinSet::new();
    let unit_verb = if verb == "restart" {
        "restart"
    } else {
        "start"
    };
    for (unit, job) in units
        .iter()
        .map(|u| (u.clone(), unit_verb))
        .chain(std::iter::once((unit_names::TARGET.to_owned(), "start")))
    {
        let systemd = systemd.clone();
        tasks.spawn(async move {
            let outcomes = systemd
                .run_jobs(
                    job,
                    std::slice::from_ref(&unit),
                    Duration::from_millis(250),
                    |unit, status| {
                        let _ = outln!("  {:<10} {status}", short_name(unit));
                    },
                )
                .await;
            (unit, outcomes)
        });
    }
    let grace_ends = started + LOADING_GRACE;
    let mut results: BTreeMap<String, JobOutcome> = BTreeMap::new();
    loop {
        let pending = covered.iter().filter(|u| !results.contains_key(*u)).count();
        let gateway_done = results.contains_key(unit_names::GATEWAY);
        if done_waiting(wait, gateway_done, pending, Instant::now() >= grace_ends) {
            break;
        }
        let next = if gateway_done && wait == Wait::Api {
            match tokio::time::timeout_at(grace_ends.into(), tasks.join_next()).await {
                Ok(next) => next,
                Err(_) => continue,
            }
        } else {
            tasks.join_next().await
        };
        let Some(joined) = next else { break };
        let (unit, outcomes) = joined.context("a job-waiting task failed")?;
        let outcomes = outcomes?;
        let result = outcomes.into_iter().next().unwrap_or(JobOutcome {
            unit: unit.clone(),
            result: "done".to_owned(),
        });
        results.insert(unit, result);
    }
    // Jobs still running go on in systemd; only the waiting stops.
    tasks.abort_all();

    // The gateway and the models, as systemd sees them now.
    let gw = systemd.unit_state(unit_names::GATEWAY).await?;
    let gateway_ok = gw.active_state == "active"
        && results
            .get(unit_names::GATEWAY)
            .is_some_and(|o| o.result == "done");
    let mut report = Vec::new();
    let mut targets = Vec::new();
    for m in &settings.models {
        for (n, url) in (1..).zip(m.local_urls()) {
            let u = m.instance_unit(n);
            let st = systemd.unit_state(&u).await?;
            let outcome = model_outcome(
                covered.contains(&u),
                results.get(&u).map(|o| o.result.as_str()),
                &st.active_state,
            );
            report.push((m.instance_name(n), u, outcome, st));
            targets.push(Admission {
                model: m.name.to_string(),
                url: (m.instance_count() > 1).then_some(url),
            });
        }
    }
    // Ready models (instances): wait until the gateway routes to them.
    if gateway_ok {
        let serving: Vec<usize> = (0..report.len())
            .filter(|i| report[*i].2 == ModelOutcome::Serving)
            .collect();
        let wanted: Vec<Admission> = serving.iter().map(|i| targets[*i].clone()).collect();
        let admitted = wait_admitted(settings, &wanted, admission_bound(settings)).await;
        for (i, ok) in serving.into_iter().zip(admitted) {
            if !ok {
                report[i].2 = ModelOutcome::NotAdmitted;
            }
        }
    }

    let status = |text: &str| {
        if text.is_empty() {
            String::new()
        } else {
            format!(" - {text}")
        }
    };
    outln!(
        "  {:<10} {} ({}){}",
        "gateway",
        gw.active_state,
        gw.sub_state,
        status(&gw.status_text)
    )?;
    for (name, _, outcome, st) in &report {
        let note = match outcome {
            ModelOutcome::Serving => "",
            ModelOutcome::NotAdmitted => "  [ready; the gateway has not admitted it yet]",
            ModelOutcome::Loading => "  [loading]",
            ModelOutcome::Failed => "  [FAILED]",
            ModelOutcome::Skipped => "  [disabled: not started]",
        };
        outln!(
            "  {name:<10} {} ({}){}{note}",
            st.active_state,
            st.sub_state,
            status(&st.status_text)
        )?;
    }
    let names = |o: ModelOutcome| -> Vec<&str> {
        report
            .iter()
            .filter(|r| r.2 == o)
            .map(|r| r.0.as_str())
            .collect()
    };
    let failed: Vec<&str> = names(ModelOutcome::Failed);
    let ok = gateway_ok && failed.is_empty();
    let serving = names(ModelOutcome::Serving);
    let mut summary = format!(
        "{verb}: {} in {:.1} s: the API {} {} of {} models{}",
        if ok { "done" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        if gateway_ok {
            "serves"
        } else {
            "is DOWN; it would serve"
        },
        serving.len(),
        report.len(),
        // Issue 15: counted per local instance.
        if report.len() > settings.models.len() {
            " (instances)"
        } else {
            ""
        }
    );
    for (what, o) in [
        ("still loading", ModelOutcome::Loading),
        ("ready, not admitted yet", ModelOutcome::NotAdmitted),
        ("failed", ModelOutcome::Failed),
        ("disabled, not started", ModelOutcome::Skipped),
    ] {
        let list = names(o);
        if !list.is_empty() {
            summary.push_str(&format!("; {what}: {}", list.join(" ")));
        }
    }
    outln!("{summary}")?;
    if !names(ModelOutcome::Loading).is_empty() || !names(ModelOutcome::NotAdmitted).is_empty() {
        outln!("  (`citadel-systemd health` says when every model serves; `status` shows their progress)")?;
    }
    if ok {
        return Ok(ExitCode::SUCCESS);
    }
    let mut units_failed: Vec<(&str, String)> = Vec::new();
    if !gateway_ok {
        units_failed.push((unit_names::GATEWAY, String::new()));
    }
    for r in report.iter().filter(|r| r.2 == ModelOutcome::Failed) {
        units_failed.push((r.1.as_str(), String::new()));
    }
    for (u, _) in &units_failed {
        let job = results.get(*u).map_or("-", |o| o.result.as_str());
        crate::control::report_failed_unit(&systemd, u, job).await?;
    }
    Ok(ExitCode::from(EXIT_FAILED))
}

/// What the gateway must route to for a model (instance) to count as
/// admitted: the model, or (issue 15, a model with several local instances)
/// that instance's backend.
#[derive(Debug, Clone, PartialEq)]
struct Admission {
    model: String,
    /// The instance's backend URL; None: the model as a whole.
    url: Option<String>,
}

/// Waits until the gateway's `/health/models` says `ready` for each of
/// `wanted`, for at most `bound`; returns whether it admitted each. When the
/// gateway does not answer `/health/models` (it wants a key when it listens
/// beyond loopback), its open `/health/ready` count stands in.
async fn wait_admitted(settings: &Settings, wanted: &[Admission], bound: Duration) -> Vec<bool> {
    if wanted.is_empty() {
        return Vec::new();
    }
    let addr = crate::observe::gateway_addr(settings);
    let deadline = Instant::now() + bound;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        let admitted = admitted_now(addr, wanted).await;
        if admitted.iter().all(|a| *a) || Instant::now() >= deadline {
            return admitted;
        }
    }
}

/// Whether the gateway routes to each of `wanted` right now.
async fn admitted_now(addr: SocketAddr, wanted: &[Admission]) -> Vec<bool> {
    if let Some((200, body)) = local_get(addr, "/health/models").await {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        return wanted.iter().map(|w| admitted_in(&v, w)).collect();
    }
    let models: std::collections::BTreeSet<&str> =
        wanted.iter().map(|w| w.model.as_str()).collect();
    let all = match local_get(addr, "/health/ready").await {
        Some((_, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["models_ready"].as_u64().unwrap_or(0) >= models.len() as u64
        }
        None => false,
    };
    vec![all; wanted.len()]
}

/// Whether the gateway's `/health/models` answer `v` routes to `w`.
fn admitted_in(v: &serde_json::Value, w: &Admission) -> bool {
    let Some(model) = v["models"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["name"] == w.model.as_str()))
    else {
        return false;
    };
    match &w.url {
        None => model["state"] == "ready",
        Some(url) => model["backends"].as_array().is_some_and(|bs| {
            bs.iter()
                .any(|b| b["url"] == url.as_str() && b["state"] == "ready")
        }),
    }
}

/// Largest answer read from the gateway's health endpoints.
const MAX_ANSWER: u64 = 1 << 20;
/// How long one request to the gateway may take, connect to last byte.
const GET_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET path` on the gateway over loopback, as HTTP/1.0 (no chunking, the
/// answer ends with the connection): (status, body), or None when it does
/// not answer in time or the answer is not HTTP.
async fn local_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
            .ok()?;
        parse_answer(&answer)
    };
    tokio::time::timeout(GET_TIMEOUT, exchange).await.ok()?
}

/// An HTTP/1.x answer whose body ends with the connection: the status code
/// and the body (lossy UTF-8). None for anything else. Never panics.
fn parse_answer(bytes: &[u8]) -> Option<(u16, String)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    let body = bytes.get(end + 4..).unwrap_or_default();
    Some((code, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Issue 10, item 1: `start` waited for every job it queued, so it took
    /// as long as the slowest model (30 min for a large one). It stops
    /// waiting once the gateway is up and either every model's job ended
    /// or the loading grace is over; `--wait` (Wait::All) waits for all.
    #[test]
    fn issue10_start_stops_waiting_once_the_api_serves() {
        // The gateway is always waited for.
        assert!(!done_waiting(Wait::Api, false, 0, true));
        assert!(!done_waiting(Wait::All, false, 0, true));
        // Every model done: both return.
        assert!(done_waiting(Wait::Api, true, 0, false));
        assert!(done_waiting(Wait::All, true, 0, false));
        // A slow model: within the grace it is waited for, then reported.
        assert!(!done_waiting(Wait::Api, true, 1, false));
        assert!(done_waiting(Wait::Api, true, 1, true));
        // --wait waits for it.
        assert!(!done_waiting(Wait::All, true, 1, true));
    }

    /// Issue 10, items 1 and 2: a model still loading is reported, not a
    /// failure; a disabled model that is not running was not started.
    #[test]
    fn issue10_start_reports_loading_and_disabled_models() {
        use ModelOutcome::*;
        assert_eq!(model_outcome(true, None, "activating"), Loading);
        assert_eq!(model_outcome(true, None, "failed"), Failed);
        assert_eq!(model_outcome(true, Some("done"), "active"), Serving);
        assert_eq!(model_outcome(true, Some("failed"), "activating"), Failed);
        assert_eq!(model_outcome(true, Some("done"), "failed"), Failed);
        assert_eq!(model_outcome(false, None, "inactive"), Skipped);
        // Disabled but started by hand earlier: it serves.
        assert_eq!(model_outcome(false, None, "active"), Serving);
    }

    #[test]
    fn answers_are_parsed() {
        assert_eq!(
            parse_answer(b"HTTP/1.0 200 OK\r\nContent-Type: x\r\n\r\n{\"a\":1}"),
            Some((200, "{\"a\":1}".to_owned()))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 401 Unauthorized\r\n\r\n"),
            Some((401, String::new()))
        );
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
        assert_eq!(parse_answer(b"HTTP/1.1 2000 OK\r\n\r\n"), None);
        assert_eq!(parse_answer(b"HTTP/1.1 +20 OK\r\n\r\n"), None);
    }

    /// Issue 15: an instance of a model with several counts as admitted
    /// only once the gateway routes to its own backend.
    #[test]
    fn issue15_an_instance_is_admitted_by_its_own_backend() {
        let v = serde_json::json!({"models": [{"name": "phi3", "state": "ready", "backends": [
            {"url": "http://127.0.0.1:11403", "state": "ready"},
            {"url": "http://127.0.0.1:11413", "state": "loading"},
        ]}]});
        let w = |url: Option<&str>| Admission {
            model: "phi3".into(),
            url: url.map(str::to_owned),
        };
        assert!(admitted_in(&v, &w(None)));
        assert!(admitted_in(&v, &w(Some("http://127.0.0.1:11403"))));
        assert!(!admitted_in(&v, &w(Some("http://127.0.0.1:11413"))));
        assert!(!admitted_in(&v, &w(Some("http://127.0.0.1:9"))));
        let other = Admission {
            model: "tiny".into(),
            url: None,
        };
        assert!(!admitted_in(&v, &other));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The gateway's answer is outside input: no bytes make the parser panic.
        #[test]
        fn issue10_answer_parser_never_panics(
            head in prop_oneof![
                Just(Vec::new()),
                Just(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()),
                Just(b"HTTP/1.0 ".to_vec()),
                "[ -~\r\n]{0,40}".prop_map(String::into_bytes),
            ],
            tail in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut bytes = head;
            bytes.extend(tail);
            if let Some((code, _)) = parse_answer(&bytes) {
                prop_assert!(code <= 999);
            }
        }
    }
}
