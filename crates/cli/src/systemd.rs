//! systemd over D-Bus (zbus_systemd): jobs, unit files, properties.
//! The only module that talks to the service manager.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use zbus_systemd::systemd1::ManagerProxy;
use zbus_systemd::zbus::{self, OwnedVariant as OwnedValue};

/// Refuses clearly when systemd is not the init system (sd_booted()).
pub fn ensure_booted() -> Result<()> {
    if Path::new("/run/systemd/system").is_dir() {
        return Ok(());
    }
    bail!(
        "systemd is not running as PID 1 on this machine, so there is nothing to install into or control.\n\
         To try Citadel here, use the sandbox, which boots systemd in a throw-away container:\n  \
         cargo xtask sandbox shell     (then run citadel-systemd inside it)\n  \
         bash scripts/demo.sh          (installs and starts the demo stack inside it)"
    )
}

pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

/// How a job ended (`done`, `failed`, `timeout`, `canceled`, `dependency`, `skipped`).
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub unit: String,
    pub result: String,
}

/// The state of one unit, as `status` shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnitState {
    pub unit: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub unit_file_state: String,
    /// Realtime of the last state change, microseconds since the epoch (0: never).
    pub since_usec: u64,
    /// Monotonic time the unit last became active (0: never).
    pub active_enter_monotonic_usec: u64,
    pub inactive_enter_monotonic_usec: u64,
    /// Monotonic time the unit last left the active state (began stopping).
    pub active_exit_monotonic_usec: u64,
    pub main_pid: u32,
    pub memory_current: Option<u64>,
    pub memory_max: Option<u64>,
    pub n_restarts: u32,
    pub status_text: String,
    pub result: String,
}

impl Systemd {
    pub async fn connect() -> Result<Systemd> {
        ensure_booted()?;
        let conn = zbus::Connection::system().await.context(
            "cannot reach systemd over the D-Bus system bus (is the `dbus` package installed and dbus.socket running?)",
        )?;
        let manager = ManagerProxy::new(&conn).await?;
        Ok(Systemd { conn, manager })
    }

    pub async fn daemon_reload(&self) -> Result<()> {
        self.manager.reload().await.context("daemon-reload failed")
    }

    pub async fn enable(&self, units: &[String]) -> Result<Vec<(String, String, String)>> {
        let (_, changes) = self
            .manager
            .enable_unit_files(units.to_vec(), false, true)
            .await
            .with_context(|| format!("cannot enable {}", units.join(" ")))?;
        Ok(changes)
    }

    pub async fn disable(&self, units: &[String]) -> Result<Vec<(String, String, String)>> {
        self.manager
            .disable_unit_files(units.to_vec(), false)
            .await
            .with_context(|| format!("cannot disable {}", units.join(" ")))
    }

    pub async fn reset_failed(&self, unit: &str) {
        let _ = self.manager.reset_failed_unit(unit.to_owned()).await;
    }

    /// Queues one job per unit (`verb`: start, stop, restart, reload, try-restart)
    /// and waits until all have finished. Every `tick` meanwhile, the STATUS= text
    /// of each unit still waiting is read, and `progress(unit, text)` is called
    /// when it changed (a loading model's "loading mixtral: 45 s").
    pub async fn run_jobs(
        &self,
        verb: &str,
        units: &[String],
        tick: Duration,
        mut progress: impl FnMut(&str, &str),
    ) -> Result<Vec<JobOutcome>> {
        use futures_lite::StreamExt;
        self.manager.subscribe().await.ok();
        // Listen before queueing, so no JobRemoved can be missed.
        let mut removed = self.manager.receive_job_removed().await?;
        let mut pending: HashMap<String, String> = HashMap::new();
        let mut outcomes = Vec::new();
        for unit in units {
            let mode = "replace".to_owned();
            let name = unit.clone();
            let job = match verb {
                "start" => self.manager.start_unit(name, mode).await,
                "stop" => self.manager.stop_unit(name, mode).await,
                "restart" => self.manager.restart_unit(name, mode).await,
                "reload" => self.manager.reload_unit(name, mode).await,
                "try-restart" => self.manager.try_restart_unit(name, mode).await,
                other => bail!("unknown job type {other}"),
            };
            match job {
                Ok(path) => {
                    pending.insert(path.to_string(), unit.clone());
                }
                Err(e) => outcomes.push(JobOutcome {
                    unit: unit.clone(),
                    result: format!("refused: {}", dbus_message(&e)),
                }),
            }
        }
        let mut ticker = tokio::time::interval(tick);
        let mut last_status: HashMap<String, String> = HashMap::new();
        while !pending.is_empty() {
            tokio::select! {
                signal = removed.next() => {
                    let Some(signal) = signal else { bail!("lost the connection to systemd") };
                    let args = signal.args()?;
                    if let Some(unit) = pending.remove(&args.job.to_string()) {
                        outcomes.push(JobOutcome { unit, result: args.result.to_string() });
                    }
                }
                _ = ticker.tick() => {
                    let waiting: Vec<String> = pending.values().filter(|u| u.ends_with(".service")).cloned().collect();
                    for unit in waiting {
                        if let Ok(st) = self.unit_state(&unit).await {
                            if !st.status_text.is_empty() && last_status.get(&unit) != Some(&st.status_text) {
                                progress(&unit, &st.status_text);
                                last_status.insert(unit, st.status_text);
                            }
                        }
                    }
                }
            }
        }
        Ok(outcomes)
    }

    /// How long the unit's last start took, from its main process's start
    /// (`ExecMainStartTimestamp`) to active (`ActiveEnterTimestamp`), both
    /// monotonic; `None` when it has not become active since that process
    /// started (issue 15: what a plain restart of a model costs).
    pub async fn last_start_duration(&self, unit: &str) -> Result<Option<Duration>> {
        let path = self
            .manager
            .load_unit(unit.to_owned())
            .await
            .with_context(|| format!("cannot load {unit}"))?;
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let get = |iface: &'static str, name: &'static str| {
            let props = &props;
            async move {
                props
                    .get(
                        zbus::names::InterfaceName::from_static_str_unchecked(iface),
                        name,
                    )
                    .await
                    .ok()
                    .and_then(|v| u64::try_from(&v).ok())
                    .unwrap_or(0)
            }
        };
        let started = get(
            "org.freedesktop.systemd1.Service",
            "ExecMainStartTimestampMonotonic",
        )
        .await;
        let active = get(
            "org.freedesktop.systemd1.Unit",
            "ActiveEnterTimestampMonotonic",
        )
        .await;
        Ok((started > 0 && active >= started).then(|| Duration::from_micros(active - started)))
    }

    /// The state of `unit` (loaded on demand; unknown units have load_state `not-found`).
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState> {
        let path = self
            .manager
            .load_unit(unit.to_owned())
            .await
            .with_context(|| format!("cannot load {unit}"))?;
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination("org.freedesktop.systemd1")
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let u = props
            .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                "org.freedesktop.systemd1.Unit",
            ))
            .await?;
        let mut st = UnitState {
            unit: unit.to_owned(),
            load_state: string(&u, "LoadState"),
            active_state: string(&u, "ActiveState"),
            sub_state: string(&u, "SubState"),
            unit_file_state: string(&u, "UnitFileState"),
            since_usec: number(&u, "StateChangeTimestamp"),
            active_enter_monotonic_usec: number(&u, "ActiveEnterTimestampMonotonic"),
            inactive_enter_monotonic_usec: number(&u, "InactiveEnterTimestampMonotonic"),
            active_exit_monotonic_usec: number(&u, "ActiveExitTimestampMonotonic"),
            ..UnitState::default()
        };
        if unit.ends_with(".service") && st.load_state == "loaded" {
            let s = props
                .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                    "org.freedesktop.systemd1.Service",
                ))
                .await?;
            st.main_pid = number(&s, "MainPID") as u32;
            st.n_restarts = number(&s, "NRestarts") as u32;
            st.status_text = string(&s, "StatusText");
            st.result = string(&s, "Result");
            st.memory_current = Some(number(&s, "MemoryCurrent")).filter(|&v| v != u64::MAX);
            st.memory_max = Some(number(&s, "MemoryMax")).filter(|&v| v != u64::MAX);
        }
        Ok(st)
    }
}

fn string(map: &HashMap<String, OwnedValue>, key: &str) -> String {
    map.get(key)
        .and_then(|v| <&str>::try_from(v).ok().map(str::to_owned))
        .unwrap_or_default()
}

fn number(map: &HashMap<String, OwnedValue>, key: &str) -> u64 {
    map.get(key)
        .and_then(|v| {
            u64::try_from(v)
                .ok()
                .or_else(|| u32::try_from(v).ok().map(u64::from))
        })
        .unwrap_or(0)
}

fn dbus_message(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(msg), _) => msg.clone(),
        other => other.to_string(),
    }
}
