//! `status`, `health` and `logs`: what systemd knows, what the services answer,
//! and what they wrote to the journal.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use citadel_config::{unit_names, Settings};
use serde::Serialize;

use crate::services::{resolve, short_name};
use crate::systemd::{Systemd, UnitState};

#[derive(Debug, Serialize)]
struct ServiceStatus {
    service: String,
    port: u16,
    #[serde(flatten)]
    state: UnitState,
}

fn port_of(settings: &Settings, unit: &str) -> u16 {
    if unit == unit_names::GATEWAY {
        return settings.gateway.port.get();
    }
    settings.model(short_name(unit)).map_or(0, |m| m.port.get())
}

async fn collect(settings: &Settings, names: &[String]) -> Result<Vec<ServiceStatus>> {
    let systemd = Systemd::connect().await?;
    let mut out = Vec::new();
    for unit in resolve(settings, names)? {
        let state = systemd.unit_state(&unit).await?;
        out.push(ServiceStatus {
            service: short_name(&unit).to_owned(),
            port: port_of(settings, &unit),
            state,
        });
    }
    Ok(out)
}

pub async fn status(settings: &Settings, names: &[String], json: bool) -> Result<ExitCode> {
    let started = Instant::now();
    let services = collect(settings, names).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&services)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<10} {:<28} {:<12} {:>7} {:>19} {:>8} {:>6}  STATUS",
        "SERVICE",
        "STATE",
        "SINCE",
        "PID",
        "MEMORY / MAX",
        "RESTARTS",
        "PORT"
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
        outln!(
            "{:<10} {:<28} {:<12} {:>7} {:>19} {:>8} {:>6}  {}",
            s.service,
            format!("{} ({})", st.active_state, st.sub_state),
            since(st.since_usec),
            pid,
            memory,
            st.n_restarts,
            s.port,
            st.status_text
        )?;
    }
    if std::env::var_os("CITADEL_TIMING").is_some() {
        errln!(
            "status took {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One model's health: systemd's view and the live probes.
#[derive(Debug, Serialize)]
struct ModelHealth {
    model: String,
    unit_state: String,
    engine_probe: String,
    gateway_state: String,
    healthy: bool,
}

#[derive(Debug, Serialize)]
struct Health {
    /// `healthy`, `degraded` or `down`.
    overall: String,
    gateway_unit: String,
    gateway_ready: bool,
    models: Vec<ModelHealth>,
}

async fn health_once(settings: &Settings) -> Result<Health> {
    let systemd = Systemd::connect().await?;
    let gw_state = systemd.unit_state(unit_names::GATEWAY).await?;
    let gw_addr = gateway_addr(settings);
    let gw_models = http_get(gw_addr, "/health/models")
        .ok()
        .filter(|(code, _)| *code == 200)
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
    let mut models = Vec::new();
    for m in &settings.models {
        let st = systemd.unit_state(&m.unit_name()).await?;
        let probe = match http_get(
            SocketAddr::from(([127, 0, 0, 1], m.port.get())),
            &m.health_path,
        ) {
            Ok((200, _)) => "ok".to_owned(),
            Ok((code, _)) => format!("http {code}"),
            Err(e) => format!("unreachable ({e})"),
        };
        let gateway_state = gw_models
            .as_ref()
            .and_then(|v| {
                v["models"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == m.name.as_str())
                    .cloned()
            })
            .and_then(|x| x["state"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        let healthy = st.active_state == "active" && probe == "ok" && gateway_state == "ready";
        models.push(ModelHealth {
            model: m.name.to_string(),
            unit_state: format!("{} ({})", st.active_state, st.sub_state),
            engine_probe: probe,
            gateway_state,
            healthy,
        });
    }
    let gateway_ready = gw_state.active_state == "active"
        && http_get(gw_addr, "/health/ready").is_ok_and(|(code, _)| code == 200);
    let ready = models.iter().filter(|m| m.healthy).count();
    let overall = if !gateway_ready || ready == 0 {
        "down"
    } else if ready < models.len() {
        "degraded"
    } else {
        "healthy"
    };
    Ok(Health {
        overall: overall.into(),
        gateway_unit: format!("{} ({})", gw_state.active_state, gw_state.sub_state),
        gateway_ready,
        models,
    })
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
pub fn gateway_reloads(settings: &Settings) -> Option<(u64, bool)> {
    let (code, body) = http_get(gateway_addr(settings), "/health").ok()?;
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .ok()
        .filter(|_| code == 200)?;
    Some((v["reloads"].as_u64()?, v["last_reload"] == "failed"))
}

/// Exit 0 healthy, 1 degraded, 2 down: usable from monitoring as it is.
pub async fn health(settings: &Settings, json: bool, watch: bool) -> Result<ExitCode> {
    let mut last = String::new();
    loop {
        let h = health_once(settings).await?;
        let text = if json {
            serde_json::to_string(&h)?
        } else {
            let mut t = format!(
                "{}: gateway {} ({}), {}/{} models healthy\n",
                h.overall.to_uppercase(),
                if h.gateway_ready {
                    "ready"
                } else {
                    "not ready"
                },
                h.gateway_unit,
                h.models.iter().filter(|m| m.healthy).count(),
                h.models.len()
            );
            for m in &h.models {
                t.push_str(&format!(
                    "  {:<10} {:<4} unit {:<22} engine {:<14} gateway {}\n",
                    m.model,
                    if m.healthy { "ok" } else { "FAIL" },
                    m.unit_state,
                    m.engine_probe,
                    m.gateway_state
                ));
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
                "degraded" => 1,
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

/// The journal of the chosen (default all) Citadel units, interleaved.
pub fn logs(settings: &Settings, names: &[String], o: &LogOptions) -> Result<ExitCode> {
    let mut cmd = Command::new("journalctl");
    cmd.arg("--no-pager")
        .arg("-o")
        .arg(if o.json { "json" } else { "short-iso" });
    if names.is_empty() {
        cmd.args([
            "-u",
            "citadel-model@*",
            "-u",
            unit_names::GATEWAY,
            "-u",
            unit_names::TARGET,
            "-u",
            "citadel-failure@*",
        ]);
    } else {
        for u in resolve(settings, names)? {
            cmd.arg("-u").arg(u);
        }
    }
    if let Some(s) = &o.since {
        cmd.arg("--since").arg(s);
    }
    if let Some(p) = &o.priority {
        cmd.arg("--priority").arg(p);
    }
    if let Some(n) = o.lines {
        cmd.arg("--lines").arg(n.to_string());
    }
    if o.follow {
        cmd.arg("--follow");
    }
    let status = cmd.status().context("cannot run journalctl")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(2).clamp(0, 255) as u8
    ))
}

/// A minimal HTTP/1.1 GET for local probes: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Chunked bodies: good enough for JSON probes to strip the size lines.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .filter(|l| !l.chars().all(|c| c.is_ascii_hexdigit()))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        body.to_owned()
    };
    Ok((code, body))
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
