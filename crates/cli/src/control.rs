//! `start`, `stop`, `restart`, `reload`, `enable`, `disable`: jobs over D-Bus,
//! waited for, with live progress while models load.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use citadel_config::{unit_names, Settings};

use crate::services::{resolve, short_name};
use crate::systemd::Systemd;

// `start`/`restart` of the whole stack (issue 10, items 1 and 2).
#[path = "start_stack.rs"]
mod start_stack;
pub use start_stack::Wait;

/// Exit status when a unit did not reach the requested state.
pub const EXIT_FAILED: u8 = 3;

pub async fn jobs(settings: &Settings, verb: &str, names: &[String]) -> Result<ExitCode> {
    jobs_with(settings, verb, names, Wait::default()).await
}

/// [`jobs`], with what `start`/`restart` of the whole stack wait for
/// ([`Wait`]; `start --wait` is [`Wait::All`]).
pub async fn jobs_with(
    settings: &Settings,
    verb: &str,
    names: &[String],
    wait: Wait,
) -> Result<ExitCode> {
    let systemd = Systemd::connect().await?;
    let whole_stack = names.is_empty();
    if whole_stack && matches!(verb, "start" | "restart") {
        // The target pulls in the enabled models only; the command waits
        // for the API, not for the slowest model.
        return start_stack::run(settings, systemd, verb, wait).await;
    }
    let mut units = resolve(settings, names)?;
    if verb == "restart" {
        // Issue 15: `restart MODEL` restarts every instance at once.
        for model in crate::services::multi_instance_models(settings, names) {
            errln!("hint: this restarts every instance of {model} at once; `citadel-systemd restart --rolling {model}` restarts them one at a time and keeps {model} serving");
        }
    }
    match verb {
        "reload" => {
            if let Some(model) = units.iter().find(|u| *u != unit_names::GATEWAY) {
                if !whole_stack {
                    bail!("{} cannot reload (an engine reloads by restarting): use `citadel-systemd restart {}`", short_name(model), short_name(model));
                }
            }
            units.retain(|u| u == unit_names::GATEWAY);
        }
        // Stopping the target first stops everything PartOf it in one
        // transaction. The gateway is not ordered against the models (issue
        // 10, item 1), so they stop in parallel and each drains what it has
        // in flight (the gateway within its TimeoutStopSec, each engine
        // within its stop_timeout). Asking for each unit's stop afterwards
        // returns those same jobs to wait for.
        "stop" => {
            // Issue 12, item 1: the gateway's socket would start it again on
            // the next connection; a stopped gateway stops listening too.
            if units.iter().any(|u| u == unit_names::GATEWAY) {
                units.push(unit_names::GATEWAY_SOCKET.to_owned());
                // Its admin socket too (issue 15): a connection would start it.
                units.push(unit_names::GATEWAY_ADMIN_SOCKET.to_owned());
            }
            units.sort_by_key(|u| u != unit_names::GATEWAY);
            if whole_stack {
                units.insert(0, unit_names::TARGET.to_owned());
            }
        }
        _ => {}
    }
    if matches!(verb, "start" | "restart") {
        for u in &units {
            systemd.reset_failed(u).await;
        }
    }
    let started = Instant::now();
    outln!(
        "{verb}: {}",
        units
            .iter()
            .map(|u| short_name(u))
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    // systemd 252's reload job ends when `kill -HUP` exits, before the gateway
    // has reloaded: count the gateway's completed reloads to wait for this one.
    let reloads_before = if verb == "reload" && units.iter().any(|u| u == unit_names::GATEWAY) {
        crate::observe::gateway_reloads(settings).await
    } else {
        None
    };
    let outcomes = systemd
        .run_jobs(verb, &units, Duration::from_millis(250), |unit, status| {
            let _ = outln!("  {:<10} {status}", short_name(unit));
        })
        .await?;
    let mut failed = Vec::new();
    if let Some((before, _)) = reloads_before {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut done = None;
        while Instant::now() < deadline {
            match crate::observe::gateway_reloads(settings).await {
                Some((n, last_failed)) if n > before => {
                    done = Some(last_failed);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        match done {
            Some(false) => {}
            Some(true) => {
                errln!("gateway: the new configuration was rejected; it keeps serving the previous one (see `citadel-systemd logs gateway`)");
                failed.push(unit_names::GATEWAY.to_owned());
            }
            None => {
                errln!("gateway: did not report the reload within 15 s");
                failed.push(unit_names::GATEWAY.to_owned());
            }
        }
        // READY=1 follows the reload: wait for the unit to leave `reloading`.
        while Instant::now() < deadline
            && systemd.unit_state(unit_names::GATEWAY).await?.active_state == "reloading"
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for o in &outcomes {
        if o.result == "done" {
            continue;
        }
        failed.push(o.unit.clone());
    }
    // After the jobs, the units' own view (a job can be `done` while the unit failed later).
    let mut lines = Vec::new();
    for u in units.iter().filter(|u| u.ends_with(".service")) {
        let st = systemd.unit_state(u).await?;
        let want_active = verb != "stop";
        let ok = if want_active {
            st.active_state == "active"
        } else {
            st.active_state != "active" && st.active_state != "deactivating"
        };
        if !ok && !failed.contains(u) {
            failed.push(u.clone());
        }
        let status = if st.status_text.is_empty() {
            String::new()
        } else {
            format!(" - {}", st.status_text)
        };
        lines.push(format!(
            "  {:<10} {} ({}){status}",
            short_name(u),
            st.active_state,
            st.sub_state
        ));
    }
    for l in &lines {
        outln!("{l}")?;
    }
    outln!(
        "{verb}: {} in {:.1} s",
        if failed.is_empty() { "done" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    )?;
    if failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for u in &failed {
        let job = outcomes
            .iter()
            .find(|o| &o.unit == u)
            .map_or("-", |o| o.result.as_str());
        report_failed_unit(&systemd, u, job).await?;
    }
    Ok(ExitCode::from(EXIT_FAILED))
}

/// Prints why `unit` did not reach its state: the job's result, the unit's
/// state and result, and its last journal lines.
pub(crate) async fn report_failed_unit(systemd: &Systemd, unit: &str, job: &str) -> Result<()> {
    let st = systemd.unit_state(unit).await?;
    errln!(
        "\n{unit}: job {job}, unit {} ({}), result {}",
        st.active_state,
        st.sub_state,
        st.result
    );
    errln!("last journal lines:");
    let out = Command::new("journalctl")
        .args(["--no-pager", "-o", "short-iso", "-n", "15", "-u", unit])
        .output();
    if let Ok(out) = out {
        err!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

pub async fn enable(settings: &Settings, names: &[String], on: bool) -> Result<ExitCode> {
    let systemd = Systemd::connect().await?;
    let mut units = resolve(settings, names)?;
    if names.is_empty() {
        units.push(unit_names::TARGET.to_owned());
    }
    if units.iter().any(|u| u == unit_names::GATEWAY) {
        // The socket is enabled with its gateway (issue 12, item 1), and
        // its admin socket (issue 15).
        units.push(unit_names::GATEWAY_SOCKET.to_owned());
        units.push(unit_names::GATEWAY_ADMIN_SOCKET.to_owned());
    }
    let changes = if on {
        systemd.enable(&units).await?
    } else {
        systemd.disable(&units).await?
    };
    for (kind, from, to) in &changes {
        if to.is_empty() {
            outln!("  {kind} {from}")?;
        } else {
            outln!("  {kind} {from} -> {to}")?;
        }
    }
    systemd.daemon_reload().await?;
    outln!(
        "{}: {}",
        if on { "enabled" } else { "disabled" },
        units
            .iter()
            .map(|u| short_name(u))
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    Ok(ExitCode::SUCCESS)
}
