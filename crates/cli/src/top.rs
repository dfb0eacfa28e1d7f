//! `top`: a live view of the stack for a terminal (issue 14, item 5).
//!
//! Per model: state, requests/s, tokens/s, time to first token p50/p95,
//! requests in flight, memory / MemoryMax and restarts. systemd (over D-Bus,
//! through `systemd.rs`) gives state, memory and restarts; the gateway's
//! `/metrics` on this host gives the rest: rates are the counters' increase
//! between two refreshes, the TTFT percentiles come from the histogram's
//! buckets (their increase between refreshes, or all of them when nothing was
//! observed in between). Anything a source does not give shows as `-`.
//!
//! On a terminal the view is redrawn in place on the alternate screen (plain
//! ANSI: cursor home, each line cleared to its end, the rest of the screen
//! cleared), with the terminal in non-canonical, no-echo mode so `q` quits at
//! once; the terminal is restored on `q`, Ctrl-C, SIGTERM/SIGHUP, an error or
//! a panic (a drop guard). When stdout is not a terminal, a header and then
//! one plain line per model every interval, without escape codes; a closed
//! pipe ends the command with exit 0. `--once` prints one plain table (rates
//! measured over one interval) and exits.
//!
//! Exit status: 0 on `q`, Ctrl-C, a closed stdout or after `--once`; 2 on
//! an error (no systemd, no config); 143 and 129 on SIGTERM and SIGHUP (the
//! terminal restored first). A gateway that does not answer is no error: its
//! figures show as `-` with the reason above the table.
//!
//! Why plain ANSI and `rustix` rather than ratatui or crossterm: measured on
//! the 2-core build machine, a fresh build of ratatui with only its crossterm
//! backend took 40 s (`-j1`), crossterm alone 9 s, `rustix` with `termios`
//! 3.7 s; and `rustix` is already in the dependency tree (through `tempfile`),
//! so the view costs no new crate. A table of fixed columns needs no layout
//! engine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use citadel_config::{unit_names, Settings};

use crate::observe;
use crate::systemd::{Systemd, UnitState};

/// The shortest and longest refresh intervals accepted.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// How long one scrape of `/metrics` may take, and how much of it is read.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const SCRAPE_MAX_BODY: usize = 8 * 1024 * 1024;

/// `--interval SPAN`: systemd's span syntax (`1s`, `500ms`, `2s`), 100 ms to 1 h.
pub fn parse_interval(text: &str) -> std::result::Result<Duration, String> {
    let span = citadel_config::units::Timespan::parse(text)?.duration();
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&span) {
        return Err(format!(
            "`{text}` is outside 100ms..1h; write e.g. `1s`, `500ms` or `5s`"
        ));
    }
    Ok(span)
}

pub struct TopOptions {
    pub interval: Duration,
    pub once: bool,
}

// ---------------------------------------------------------------------------
// The exposition format (outside input: whatever the text, a value, no panic)
// ---------------------------------------------------------------------------

/// One sample line of the Prometheus text or OpenMetrics format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Every well-formed sample line of `text` (the Prometheus text format or
/// OpenMetrics: `name{label="value",...} value [timestamp] [# exemplar]`);
/// comments, blank and malformed lines are skipped. Never panics.
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim_start_matches([' ', '\t']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c| !is_name_char(c)).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `key="value",...}` (after the `{`); returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut Vec<(String, String)>) -> Option<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix('}') {
            return Some(r);
        }
        let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        let (key, r) = s.split_at(end);
        if key.is_empty() {
            return None;
        }
        let r = r.trim_start().strip_prefix('=')?.trim_start();
        let r = r.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = r.char_indices();
        let close = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        // `close` indexes a one-byte `"`, so `close + 1` is a char boundary.
        s = r.get(close + 1..)?.trim_start();
        if !out.iter().any(|(k, _)| k == key) {
            out.push((key.to_owned(), value));
        }
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if v.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.')) => {
            v.parse().ok()
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Per-model figures, rates and percentiles
// ---------------------------------------------------------------------------

/// A cumulative histogram: (upper bound `le`, observations <= le), sorted by
/// `le`; the last bucket is normally `+Inf` (the total count).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Builds one from `(le, count)` pairs in any order; drops NaN bounds and
    /// counts, merges duplicate bounds, and makes the counts non-decreasing.
    pub fn new(mut buckets: Vec<(f64, f64)>) -> Histogram {
        buckets.retain(|(le, c)| !le.is_nan() && !c.is_nan());
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 = a.1.max(b.1);
                true
            } else {
                false
            }
        });
        let mut running = 0.0f64;
        for (_, c) in &mut buckets {
            running = running.max(c.max(0.0));
            *c = running;
        }
        Histogram { buckets }
    }

    /// Observations in all (the largest bucket's count).
    pub fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |b| b.1)
    }

    /// The observations made since `earlier` (bucket by bucket), or None
    /// when the buckets differ or a count went down (the gateway restarted).
    pub fn since(&self, earlier: &Histogram) -> Option<Histogram> {
        if self.buckets.len() != earlier.buckets.len() {
            return None;
        }
        let mut out = Vec::with_capacity(self.buckets.len());
        for (&(le, now), &(le0, then)) in self.buckets.iter().zip(&earlier.buckets) {
            if le != le0 || now < then {
                return None;
            }
            out.push((le, now - then));
        }
        Some(Histogram::new(out))
    }

    /// The `q`-quantile (0..=1) the way Prometheus' `histogram_quantile`
    /// estimates it: linear interpolation inside the bucket where the rank
    /// falls; the highest finite bound when it falls in the `+Inf` bucket.
    /// None without observations or for a `q` outside 0..=1.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) {
            return None;
        }
        let total = self.count();
        if total <= 0.0 || !total.is_finite() {
            return None;
        }
        let rank = q * total;
        let i = self.buckets.iter().position(|&(_, c)| c >= rank)?;
        let (le, count) = self.buckets[i];
        if le == f64::INFINITY {
            // Prometheus answers the highest finite bound; none: unknown.
            return i
                .checked_sub(1)
                .and_then(|j| self.buckets.get(j))
                .map(|b| b.0);
        }
        let (start, below) = match i.checked_sub(1).and_then(|j| self.buckets.get(j)) {
            Some(&(l, c)) => (l, c),
            None if le > 0.0 => (0.0, 0.0),
            None => return Some(le),
        };
        let in_bucket = count - below;
        // Counts are finite (the total is) and non-decreasing: never NaN.
        if in_bucket <= 0.0 || !start.is_finite() {
            return Some(le);
        }
        Some(start + (le - start) * ((rank - below) / in_bucket))
    }
}

/// What the gateway's `/metrics` says about one model at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMetrics {
    /// `citadel_gateway_requests_total{model}`, all statuses.
    pub requests: Option<f64>,
    /// `citadel_gateway_completion_tokens_total{model}`.
    pub completion_tokens: Option<f64>,
    /// `citadel_gateway_in_flight_requests{model}`.
    pub in_flight: Option<f64>,
    /// `citadel_gateway_time_to_first_token_seconds{model}`.
    pub ttft: Option<Histogram>,
    /// Whether the gateway routes to it: `citadel_gateway_model_ready`, or
    /// else any `citadel_gateway_backend_up` of the model at 1.
    pub ready: Option<bool>,
    /// `citadel_gateway_backend_up{backend}` per backend URL (issue 15: an
    /// instance's own state).
    pub backends_up: BTreeMap<String, bool>,
}

const REQUESTS: &str = "citadel_gateway_requests_total";
const COMPLETION_TOKENS: &str = "citadel_gateway_completion_tokens_total";
const IN_FLIGHT: &str = "citadel_gateway_in_flight_requests";
const TTFT_BUCKET: &str = "citadel_gateway_time_to_first_token_seconds_bucket";
const MODEL_READY: &str = "citadel_gateway_model_ready";
const BACKEND_UP: &str = "citadel_gateway_backend_up";

/// The figures of every model named in `samples` (a `model` label, not empty).
pub fn by_model(samples: &[Sample]) -> BTreeMap<String, ModelMetrics> {
    let mut out: BTreeMap<String, ModelMetrics> = BTreeMap::new();
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut model_ready: BTreeMap<String, bool> = BTreeMap::new();
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    for s in samples {
        let Some(model) = s.label("model").filter(|m| !m.is_empty()) else {
            continue;
        };
        let entry = || model.to_owned();
        match s.name.as_str() {
            REQUESTS => add(&mut out.entry(entry()).or_default().requests, s.value),
            COMPLETION_TOKENS => add(
                &mut out.entry(entry()).or_default().completion_tokens,
                s.value,
            ),
            IN_FLIGHT => add(&mut out.entry(entry()).or_default().in_flight, s.value),
            TTFT_BUCKET => {
                if let Some(le) = s.label("le").and_then(parse_value) {
                    buckets.entry(entry()).or_default().push((le, s.value));
                }
            }
            MODEL_READY => {
                model_ready.insert(entry(), s.value > 0.0);
            }
            BACKEND_UP => {
                let m = out.entry(entry()).or_default();
                m.ready = Some(m.ready.unwrap_or(false) || s.value > 0.0);
                if let Some(backend) = s.label("backend") {
                    m.backends_up.insert(backend.to_owned(), s.value > 0.0);
                }
            }
            _ => {}
        }
    }
    for (model, b) in buckets {
        out.entry(model).or_default().ttft = Some(Histogram::new(b));
    }
    for (model, ready) in model_ready {
        out.entry(model).or_default().ready = Some(ready);
    }
    out
}

/// A counter's increase per second between two readings `dt` apart; a
/// counter that went down was reset (the gateway restarted): its new value
/// is the increase. None when a reading is missing or `dt` is zero.
pub fn rate(earlier: Option<f64>, now: Option<f64>, dt: Duration) -> Option<f64> {
    let (then, now) = (earlier?, now?);
    let secs = dt.as_secs_f64();
    if secs <= 0.0 || !then.is_finite() || !now.is_finite() {
        return None;
    }
    let increase = if now >= then { now - then } else { now };
    Some(increase.max(0.0) / secs)
}

/// The TTFT histogram to show: what was observed since the last refresh, or,
/// when nothing was (or there is no last refresh), every observation so far.
pub fn ttft_window(earlier: Option<&Histogram>, now: Option<&Histogram>) -> Option<Histogram> {
    let now = now?;
    earlier
        .and_then(|e| now.since(e))
        .filter(|d| d.count() > 0.0)
        .or_else(|| (now.count() > 0.0).then(|| now.clone()))
}

// ---------------------------------------------------------------------------
// One refresh: what the sources said, and the rows shown
// ---------------------------------------------------------------------------

/// What one refresh read.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub at: Instant,
    /// Per model, or why `/metrics` could not be read.
    pub metrics: std::result::Result<BTreeMap<String, ModelMetrics>, String>,
    /// systemd's view of each model's unit (None: could not be read).
    pub units: BTreeMap<String, UnitState>,
    pub gateway: Option<UnitState>,
}

/// One model's line, or (issue 15) one of its further local instances'
/// (indented, below its model's line: its own state, memory and restarts;
/// the gateway's figures are per model).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Whether this is an instance's line (`  phi3:2`), not a model's.
    pub instance: bool,
    pub model: String,
    pub state: String,
    pub requests_per_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub ttft_p50: Option<f64>,
    pub ttft_p95: Option<f64>,
    pub in_flight: Option<f64>,
    pub memory: Option<u64>,
    pub memory_max: Option<u64>,
    pub restarts: Option<u32>,
}

/// A model's state in one word: systemd's, refined by the gateway's view
/// (`serving`: the unit is active and the gateway routes to it).
pub fn state_word(unit: Option<&UnitState>, ready: Option<bool>) -> String {
    let Some(u) = unit else {
        return "?".into();
    };
    if u.load_state == "not-found" {
        return "not-found".into();
    }
    match (u.active_state.as_str(), u.sub_state.as_str()) {
        ("active", _) if ready == Some(true) => "serving".into(),
        ("activating", "auto-restart") => "restarting".into(),
        ("activating", _) => "loading".into(),
        ("deactivating", _) => "stopping".into(),
        ("", _) => "?".into(),
        (state, _) => state.into(),
    }
}

/// The rows for `now`, with rates against `earlier` (the previous refresh).
pub fn rows(models: &[String], earlier: Option<&Scrape>, now: &Scrape) -> Vec<Row> {
    let empty = BTreeMap::new();
    let metrics_now = now.metrics.as_ref().unwrap_or(&empty);
    let metrics_then = earlier.and_then(|e| e.metrics.as_ref().ok());
    let dt = earlier.map_or(Duration::ZERO, |e| now.at.saturating_duration_since(e.at));
    models
        .iter()
        .map(|name| {
            let m = metrics_now.get(name);
            let then = metrics_then.and_then(|t| t.get(name));
            let unit = now.units.get(name);
            let ttft = ttft_window(
                then.and_then(|t| t.ttft.as_ref()),
                m.and_then(|m| m.ttft.as_ref()),
            );
            Row {
                instance: false,
                model: name.clone(),
                state: state_word(unit, m.and_then(|m| m.ready)),
                requests_per_s: rate(
                    then.and_then(|t| t.requests),
                    m.and_then(|m| m.requests),
                    dt,
                ),
                tokens_per_s: rate(
                    then.and_then(|t| t.completion_tokens),
                    m.and_then(|m| m.completion_tokens),
                    dt,
                ),
                ttft_p50: ttft.as_ref().and_then(|h| h.quantile(0.5)),
                ttft_p95: ttft.as_ref().and_then(|h| h.quantile(0.95)),
                in_flight: m.and_then(|m| m.in_flight),
                memory: unit.and_then(|u| u.memory_current),
                memory_max: unit.and_then(|u| u.memory_max),
                restarts: unit
                    .filter(|u| u.load_state == "loaded")
                    .map(|u| u.n_restarts),
            }
        })
        .collect()
}

/// A further local instance of a model (issue 15): its model, its instance
/// name (`phi3:2`) and the URL the gateway knows its backend by.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRef {
    pub model: String,
    pub name: String,
    pub url: String,
}

/// `rows` with a line for each instance in `instances` after its model's:
/// systemd's view of its unit (`now.units`, by instance name) and whether the
/// gateway's probe of its backend passed.
pub fn with_instances(rows: Vec<Row>, instances: &[InstanceRef], now: &Scrape) -> Vec<Row> {
    let mut out = Vec::with_capacity(rows.len() + instances.len());
    for row in rows {
        let model = row.model.clone();
        out.push(row);
        for i in instances.iter().filter(|i| i.model == model) {
            let unit = now.units.get(&i.name);
            let up = now
                .metrics
                .as_ref()
                .ok()
                .and_then(|m| m.get(&i.model))
                .and_then(|m| m.backends_up.get(&i.url).copied());
            out.push(Row {
                instance: true,
                model: format!("  {}", i.name),
                state: state_word(unit, up),
                requests_per_s: None,
                tokens_per_s: None,
                ttft_p50: None,
                ttft_p95: None,
                in_flight: None,
                memory: unit.and_then(|u| u.memory_current),
                memory_max: unit.and_then(|u| u.memory_max),
                restarts: unit
                    .filter(|u| u.load_state == "loaded")
                    .map(|u| u.n_restarts),
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

const COLUMNS: [(&str, usize); 9] = [
    ("MODEL", 14),
    ("STATE", 10),
    ("REQ/S", 7),
    ("TOK/S", 7),
    ("TTFT P50", 8),
    ("TTFT P95", 8),
    ("IN FLIGHT", 9),
    ("MEMORY / MAX", 15),
    ("RESTARTS", 8),
];

fn dash_or<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn per_second(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn seconds(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v < 1.0 {
        format!("{:.0}ms", v * 1000.0)
    } else {
        format!("{v:.2}s")
    }
}

fn bytes(v: u64) -> String {
    let units = [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (suffix, size) in units {
        if v >= size {
            return format!("{:.1}{suffix}", v as f64 / size as f64);
        }
    }
    format!("{v}B")
}

fn cells(r: &Row) -> [String; 9] {
    let memory = match (r.memory, r.memory_max) {
        (None, None) => "-".to_owned(),
        (c, m) => format!("{} / {}", dash_or(c, bytes), dash_or(m, bytes)),
    };
    [
        r.model.clone(),
        r.state.clone(),
        dash_or(r.requests_per_s, per_second),
        dash_or(r.tokens_per_s, per_second),
        dash_or(r.ttft_p50, seconds),
        dash_or(r.ttft_p95, seconds),
        dash_or(r.in_flight, |v| format!("{v:.0}")),
        memory,
        dash_or(r.restarts, |v| v.to_string()),
    ]
}

/// One line of the table: the model and state left-aligned, figures right.
fn line(cells: &[String; 9]) -> String {
    let mut out = String::new();
    for (i, (cell, (_, width))) in cells.iter().zip(COLUMNS).enumerate() {
        if i > 0 {
            out.push_str("  ");
        }
        if i < 2 {
            let _ = write!(out, "{cell:<width$}");
        } else {
            let _ = write!(out, "{cell:>width$}");
        }
    }
    out.trim_end().to_owned()
}

fn header() -> String {
    line(&COLUMNS.map(|(h, _)| h.to_owned()))
}

/// The clock, UTC (`HH:MM:SS`).
fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The lines above the table: the gateway and what could not be read.
fn summary(settings: &Settings, scrape: &Scrape, rows: &[Row], note: Option<&str>) -> Vec<String> {
    let gateway = scrape
        .gateway
        .as_ref()
        .map_or("?".to_owned(), |g| g.active_state.clone());
    let models = rows.iter().filter(|r| !r.instance);
    let serving = models.clone().filter(|r| r.state == "serving").count();
    let mut out = vec![format!(
        "citadel top  {} UTC  gateway {gateway} on {}  {serving}/{} models serving",
        clock(),
        observe::gateway_addr(settings),
        models.count()
    )];
    if let Err(e) = &scrape.metrics {
        out.push(format!("gateway metrics: {e}"));
    }
    if let Some(n) = note {
        out.push(n.to_owned());
    }
    out
}

// ---------------------------------------------------------------------------
// Reading the sources
// ---------------------------------------------------------------------------

/// Where and how `/metrics` is read.
struct MetricsSource {
    addr: SocketAddr,
    key: Option<String>,
    /// Why no key could be used although one is needed.
    note: Option<String>,
}

/// The first API key of an `api-keys` file that can be sent in a header,
/// read the way the gateway reads the file: one key per line, `KEY` or
/// `NAME: KEY` (a colon followed by a blank), `#` comments and blank lines
/// ignored.
pub fn first_api_key(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let colon = l
                .char_indices()
                .find(|&(i, c)| c == ':' && l[i + 1..].starts_with([' ', '\t']));
            // `i` indexes a one-byte `:`, so `i + 1` is a char boundary.
            colon.map_or(l, |(i, _)| l[i + 1..].trim())
        })
        .find(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
}

impl MetricsSource {
    fn new(settings: &Settings) -> MetricsSource {
        let g = &settings.gateway;
        let mut source = MetricsSource {
            addr: observe::gateway_addr(settings),
            key: None,
            note: None,
        };
        // Issue 12, item 5: beyond loopback `/metrics` needs a key.
        if g.auth && !g.listen.is_loopback() {
            let file = g.api_keys_file.display();
            match std::fs::read_to_string(&g.api_keys_file) {
                Ok(text) => match first_api_key(&text) {
                    Some(k) => source.key = Some(k),
                    None => {
                        source.note = Some(format!(
                        "note: {file} holds no usable API key, which the gateway's /metrics needs \
                             (it listens on {})",
                        g.listen
                    ))
                    }
                },
                Err(e) => {
                    source.note = Some(format!(
                    "note: the gateway listens on {} with auth on, so /metrics needs an API key; \
                         cannot read {file} ({e}): run as root for rates, TTFT and in flight",
                    g.listen
                ))
                }
            }
        }
        source
    }

    async fn read(&self) -> std::result::Result<BTreeMap<String, ModelMetrics>, String> {
        match observe::http_get_as(
            self.addr,
            "/metrics",
            self.key.as_deref(),
            SCRAPE_TIMEOUT,
            SCRAPE_MAX_BODY,
        )
        .await
        {
            Ok((200, body)) => Ok(by_model(&parse_metrics(&body))),
            Ok((401, _)) => Err("401: /metrics needs an API key".into()),
            Ok((code, _)) => Err(format!("http {code}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct Sources<'a> {
    settings: &'a Settings,
    systemd: Systemd,
    metrics: MetricsSource,
    models: Vec<String>,
    /// The further local instances (issue 15), shown under their models.
    instances: Vec<InstanceRef>,
}

impl Sources<'_> {
    async fn scrape(&self) -> Scrape {
        let metrics = self.metrics.read().await;
        let mut units = BTreeMap::new();
        for m in &self.settings.models {
            for n in 1..=m.instance_count() {
                if let Ok(st) = self.systemd.unit_state(&m.instance_unit(n)).await {
                    units.insert(m.instance_name(n), st);
                }
            }
        }
        let gateway = self.systemd.unit_state(unit_names::GATEWAY).await.ok();
        Scrape {
            at: Instant::now(),
            metrics,
            units,
            gateway,
        }
    }

    fn frame(&self, earlier: Option<&Scrape>, now: &Scrape) -> (Vec<String>, Vec<Row>) {
        let rows = with_instances(rows(&self.models, earlier, now), &self.instances, now);
        (
            summary(self.settings, now, &rows, self.metrics.note.as_deref()),
            rows,
        )
    }
}

// ---------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------

pub async fn top(settings: &Settings, opts: &TopOptions) -> Result<ExitCode> {
    use std::io::IsTerminal;

    let sources = Sources {
        settings,
        systemd: Systemd::connect().await?,
        metrics: MetricsSource::new(settings),
        models: settings.models.iter().map(|m| m.name.to_string()).collect(),
        instances: settings
            .models
            .iter()
            .flat_map(|m| {
                // local_urls() is instance 1, 2, ... in order.
                (1..)
                    .zip(m.local_urls())
                    .skip(1)
                    .map(|(n, url)| InstanceRef {
                        model: m.name.to_string(),
                        name: m.instance_name(n),
                        url,
                    })
            })
            .collect(),
    };
    if opts.once {
        let first = sources.scrape().await;
        tokio::time::sleep(opts.interval).await;
        let now = sources.scrape().await;
        let (summary, rows) = sources.frame(Some(&first), &now);
        for l in summary {
            outln!("{l}")?;
        }
        outln!("{}", header())?;
        for r in &rows {
            outln!("{}", line(&cells(r)))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if std::io::stdout().is_terminal() {
        terminal::run(&sources, opts.interval).await
    } else {
        plain(&sources, opts.interval).await
    }
}

/// Not a terminal: the header once, then a line per model every interval
/// (prefixed with the time); notes go to stderr. Ends when stdout closes.
async fn plain(sources: &Sources<'_>, interval: Duration) -> Result<ExitCode> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut earlier = sources.scrape().await;
    outln!("{:<8}  {}", "TIME", header())?;
    let mut last_problem = None;
    loop {
        ticker.tick().await;
        let now = sources.scrape().await;
        let (summary, rows) = sources.frame(Some(&earlier), &now);
        // What could not be read, once per change (not every interval).
        let problem = summary.get(1..).map(|p| p.join("; ")).unwrap_or_default();
        if !problem.is_empty() && last_problem.as_ref() != Some(&problem) {
            errln!("{problem}");
        }
        last_problem = Some(problem);
        let time = clock();
        for r in &rows {
            outln!("{time:<8}  {}", line(&cells(r)))?;
        }
        earlier = now;
    }
}

/// The live view on a terminal.
mod terminal {
    use std::io::IsTerminal;
    use std::os::fd::AsFd;

    use rustix::termios::{self, LocalModes, OptionalActions, SpecialCodeIndex, Termios};
    use tokio::signal::unix::{signal, SignalKind};

    use super::*;

    /// Enter: alternate screen, cursor hidden. Leave: the reverse.
    const ENTER: &str = "\x1b[?1049h\x1b[?25l";
    const LEAVE: &str = "\x1b[?25h\x1b[?1049l";

    /// Puts the terminal back as it was when dropped (also on an error or a panic).
    struct Guard {
        saved: Option<Termios>,
    }

    impl Guard {
        fn enter() -> Result<Guard> {
            // Non-canonical, no echo: `q` arrives at once and is not shown.
            // Signals stay on, so Ctrl-C is a SIGINT this process handles.
            let stdin = std::io::stdin();
            let saved = if stdin.is_terminal() {
                termios::tcgetattr(stdin.as_fd()).ok()
            } else {
                None
            };
            if let Some(saved) = &saved {
                let mut t = saved.clone();
                t.local_modes &= !(LocalModes::ICANON | LocalModes::ECHO);
                t.special_codes[SpecialCodeIndex::VMIN] = 1;
                t.special_codes[SpecialCodeIndex::VTIME] = 0;
                termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &t)?;
            }
            let guard = Guard { saved };
            out!("{ENTER}")?;
            Ok(guard)
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = crate::out::write_stdout(format_args!("{LEAVE}"));
            if let Some(saved) = &self.saved {
                let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, saved);
            }
        }
    }

    /// The terminal's size (columns, rows), 80x24 when unknown.
    fn size() -> (usize, usize) {
        match termios::tcgetwinsize(std::io::stdout().as_fd()) {
            Ok(w) if w.ws_col > 0 && w.ws_row > 0 => (w.ws_col.into(), w.ws_row.into()),
            _ => (80, 24),
        }
    }

    /// The whole screen: each line cut to the width and cleared to its end,
    /// then the rest of the screen cleared.
    pub(super) fn screen(lines: &[String], width: usize, height: usize) -> String {
        let mut s = String::from("\x1b[H");
        for l in lines.iter().take(height) {
            s.extend(l.chars().take(width));
            s.push_str("\x1b[K\r\n");
        }
        s.push_str("\x1b[J");
        s
    }

    /// Keys typed, read by a thread (a read of a terminal cannot be
    /// cancelled; the thread ends with the process).
    fn keys() -> tokio::sync::mpsc::UnboundedReceiver<u8> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if std::io::stdin().is_terminal() {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while let Ok(n @ 1..) = stdin.read(&mut buf) {
                    if buf[..n].iter().any(|b| tx.send(*b).is_err()) {
                        return;
                    }
                }
            });
        }
        rx
    }

    pub(super) async fn run(sources: &Sources<'_>, interval: Duration) -> Result<ExitCode> {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut resize = signal(SignalKind::window_change())?;
        let mut keys = keys();
        let _guard = Guard::enter()?;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut earlier: Option<Scrape> = None;
        let mut now: Option<Scrape> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let fresh = sources.scrape().await;
                    earlier = now.replace(fresh);
                }
                _ = resize.recv() => {}
                key = keys.recv() => match key {
                    Some(b'q' | b'Q' | 0x03) => return Ok(ExitCode::SUCCESS),
                    _ => continue,
                },
                _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
                _ = terminate.recv() => return Ok(ExitCode::from(128 + 15)),
                _ = hangup.recv() => return Ok(ExitCode::from(128 + 1)),
            }
            let Some(now) = &now else { continue };
            let (mut lines, rows) = sources.frame(earlier.as_ref(), now);
            lines.push(String::new());
            lines.push(header());
            lines.extend(rows.iter().map(|r| line(&cells(r))));
            lines.push(String::new());
            lines.push(format!(
                "every {}  q: quit",
                citadel_config::units::Timespan(interval).to_systemd()
            ));
            let (width, height) = size();
            out!("{}", screen(&lines, width, height))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GATEWAY_METRICS: &str = r#"# HELP citadel_gateway_requests Requests answered, by model and HTTP status.
# TYPE citadel_gateway_requests counter
citadel_gateway_requests_total{model="phi3",status="200"} 10
citadel_gateway_requests_total{model="phi3",status="503"} 2
citadel_gateway_requests_total{model="mixtral",status="200"} 4
citadel_gateway_requests_total{model="",status="404"} 7
citadel_gateway_requests_created{model="phi3",status="200"} 1700000000.0
# TYPE citadel_gateway_in_flight_requests gauge
citadel_gateway_in_flight_requests{model="phi3"} 3
citadel_gateway_backend_up{model="phi3",backend="http://127.0.0.1:11403"} 1
citadel_gateway_backend_up{model="mixtral",backend="http://127.0.0.1:11400"} 0
citadel_gateway_completion_tokens_total{model="phi3"} 500
citadel_gateway_time_to_first_token_seconds_bucket{model="phi3",le="0.1"} 5
citadel_gateway_time_to_first_token_seconds_bucket{model="phi3",le="0.2"} 9
citadel_gateway_time_to_first_token_seconds_bucket{model="phi3",le="+Inf"} 10 # {trace_id="x"} 0.15
citadel_gateway_time_to_first_token_seconds_sum{model="phi3"} 1.2
citadel_gateway_time_to_first_token_seconds_count{model="phi3"} 10
# EOF
"#;

    fn h(b: &[(f64, f64)]) -> Histogram {
        Histogram::new(b.to_vec())
    }

    #[test]
    fn issue14_top_parses_the_gateway_metrics() {
        let samples = parse_metrics(GATEWAY_METRICS);
        assert_eq!(samples.len(), 14, "{samples:#?}");
        assert_eq!(samples[0].label("status"), Some("200"));
        let m = by_model(&samples);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["mixtral", "phi3"]);
        let phi3 = &m["phi3"];
        assert_eq!(phi3.requests, Some(12.0));
        assert_eq!(phi3.in_flight, Some(3.0));
        assert_eq!(phi3.completion_tokens, Some(500.0));
        assert_eq!(phi3.ready, Some(true));
        assert_eq!(
            phi3.ttft,
            Some(h(&[(0.1, 5.0), (0.2, 9.0), (f64::INFINITY, 10.0)]))
        );
        let mixtral = &m["mixtral"];
        assert_eq!(mixtral.requests, Some(4.0));
        assert_eq!(mixtral.ready, Some(false));
        // Absent metrics stay absent (shown as `-`), not zero.
        assert_eq!(mixtral.completion_tokens, None);
        assert_eq!(mixtral.in_flight, None);
        assert_eq!(mixtral.ttft, None);
    }

    #[test]
    fn issue14_top_model_ready_wins_over_backend_up() {
        let m = by_model(&parse_metrics(
            "citadel_gateway_backend_up{model=\"a\",backend=\"x\"} 1\n\
             citadel_gateway_model_ready{model=\"a\"} 0\n",
        ));
        assert_eq!(m["a"].ready, Some(false));
    }

    #[test]
    fn issue14_top_parses_labels_with_escapes_and_odd_spacing() {
        let s = parse_metrics(
            "x{a=\"q\\\"uo\\\\te\\nnl\" , b = \"{}, #\",} 1.5e3 1700000000\n\
             y 0\n  z{} -Inf\nw{a=\"1\"}+Inf\nbad{a=1} 2\n9bad 1\nnovalue\nv NaN\n",
        );
        assert_eq!(s.len(), 4, "{s:#?}");
        assert_eq!(s[0].label("a"), Some("q\"uo\\te\nnl"));
        assert_eq!(s[0].label("b"), Some("{}, #"));
        assert_eq!(s[0].value, 1500.0);
        assert_eq!((s[1].name.as_str(), s[1].value), ("y", 0.0));
        assert_eq!(s[2].value, f64::NEG_INFINITY);
        assert!(s[3].value.is_nan());
    }

    #[test]
    fn issue14_top_rates_are_deltas_per_second() {
        let s = Duration::from_secs;
        assert_eq!(rate(Some(10.0), Some(15.0), s(1)), Some(5.0));
        assert_eq!(rate(Some(10.0), Some(30.0), s(2)), Some(10.0));
        assert_eq!(rate(Some(10.0), Some(10.0), s(1)), Some(0.0));
        // The gateway restarted: its counter starts again from 0.
        assert_eq!(rate(Some(100.0), Some(4.0), s(2)), Some(2.0));
        assert_eq!(rate(None, Some(4.0), s(1)), None);
        assert_eq!(rate(Some(1.0), None, s(1)), None);
        assert_eq!(rate(Some(1.0), Some(2.0), Duration::ZERO), None);
        assert_eq!(rate(Some(f64::NAN), Some(2.0), s(1)), None);
    }

    #[test]
    fn issue14_top_ttft_percentiles_like_prometheus() {
        // 10 observations: 5 <= 0.1 s, 4 in (0.1, 0.2], 1 above.
        let hist = h(&[(0.1, 5.0), (0.2, 9.0), (f64::INFINITY, 10.0)]);
        // p50: rank 5 falls at the top of the first bucket.
        assert_eq!(hist.quantile(0.5), Some(0.1));
        // p95: rank 9.5 falls in +Inf: the highest finite bound.
        assert_eq!(hist.quantile(0.95), Some(0.2));
        // Rank 7 is 2 of 4 into (0.1, 0.2]: halfway.
        let p70 = hist.quantile(0.7).unwrap();
        assert!((p70 - 0.15).abs() < 1e-9, "{p70}");
        // The first bucket interpolates from 0.
        let p25 = hist.quantile(0.25).unwrap();
        assert!((p25 - 0.05).abs() < 1e-9, "{p25}");
        assert_eq!(h(&[(0.1, 0.0), (f64::INFINITY, 0.0)]).quantile(0.5), None);
        assert_eq!(h(&[(f64::INFINITY, 3.0)]).quantile(0.5), None);
        assert_eq!(hist.quantile(1.5), None);
    }

    #[test]
    fn issue14_top_ttft_uses_the_delta_or_else_everything() {
        let before = h(&[(0.1, 100.0), (1.0, 100.0), (f64::INFINITY, 100.0)]);
        let after = h(&[(0.1, 100.0), (1.0, 104.0), (f64::INFINITY, 104.0)]);
        // Since the last refresh: 4 slow ones only, not 100 fast ones.
        let w = ttft_window(Some(&before), Some(&after)).unwrap();
        assert_eq!(w.count(), 4.0);
        assert!(w.quantile(0.5).unwrap() > 0.1);
        // Nothing new: every observation so far.
        assert_eq!(ttft_window(Some(&after), Some(&after)), Some(after.clone()));
        // No earlier refresh (--once's first scrape, the first frame).
        assert_eq!(ttft_window(None, Some(&after)), Some(after.clone()));
        // A reset (a count went down): everything the new process saw.
        assert_eq!(ttft_window(Some(&after), Some(&before)), Some(before));
        assert_eq!(ttft_window(Some(&after), None), None);
    }

    fn unit(active: &str, sub: &str) -> UnitState {
        UnitState {
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            memory_current: Some(50 << 20),
            memory_max: Some(4 << 30),
            n_restarts: 2,
            ..UnitState::default()
        }
    }

    /// Issue 15: each further instance of a model gets its own indented
    /// line below its model's: its unit's state, memory and restarts and the
    /// gateway's probe of its own backend; the summary counts models only.
    #[test]
    fn issue15_top_shows_instances_under_their_model() {
        let text = format!(
            "{GATEWAY_METRICS}citadel_gateway_backend_up{{model=\"phi3\",backend=\"http://127.0.0.1:11413\"}} 0\n"
        );
        let mut down = unit("failed", "failed");
        down.n_restarts = 5;
        let now = Scrape {
            at: Instant::now(),
            metrics: Ok(by_model(&parse_metrics(&text))),
            units: [
                ("phi3".to_owned(), unit("active", "running")),
                ("phi3:2".to_owned(), down),
                ("mixtral".to_owned(), unit("active", "running")),
            ]
            .into(),
            gateway: Some(unit("active", "running")),
        };
        let instances = [InstanceRef {
            model: "phi3".into(),
            name: "phi3:2".into(),
            url: "http://127.0.0.1:11413".into(),
        }];
        let models = ["phi3".to_owned(), "mixtral".to_owned()];
        let r = with_instances(rows(&models, None, &now), &instances, &now);
        let labels: Vec<&str> = r.iter().map(|r| r.model.as_str()).collect();
        assert_eq!(labels, ["phi3", "  phi3:2", "mixtral"]);
        assert_eq!(r[0].state, "serving");
        assert!(r[1].instance && !r[0].instance);
        assert_eq!(r[1].state, "failed");
        assert_eq!(r[1].restarts, Some(5));
        assert_eq!(r[1].requests_per_s, None);
        // Active and its backend up: serving; active but down at the gateway: active.
        let mut up = now.clone();
        up.units.insert("phi3:2".into(), unit("active", "running"));
        let r = with_instances(rows(&models, None, &up), &instances, &up);
        assert_eq!(r[1].state, "active");
        let text = text.replace("11413\"} 0", "11413\"} 1");
        up.metrics = Ok(by_model(&parse_metrics(&text)));
        let r = with_instances(rows(&models, None, &up), &instances, &up);
        assert_eq!(r[1].state, "serving");
        let s = citadel_config::parse(
            "[models.phi3]\nport = 11403\nengine = \"sim\"\n",
            std::path::Path::new("c.toml"),
        )
        .unwrap()
        .settings;
        assert!(
            summary(&s, &up, &r, None)[0].contains("1/2 models serving"),
            "{:?}",
            summary(&s, &up, &r, None)
        );
    }

    #[test]
    fn issue14_top_rows_show_state_rates_and_dashes() {
        let t0 = Instant::now();
        let models = vec!["phi3".to_owned(), "mixtral".to_owned(), "gone".to_owned()];
        let scrape = |at: Instant, text: &str| Scrape {
            at,
            metrics: Ok(by_model(&parse_metrics(text))),
            units: [
                ("phi3".to_owned(), unit("active", "running")),
                ("mixtral".to_owned(), unit("activating", "start")),
            ]
            .into(),
            gateway: Some(unit("active", "running")),
        };
        let earlier = scrape(t0, GATEWAY_METRICS);
        let later_text = GATEWAY_METRICS
            .replace("status=\"200\"} 10", "status=\"200\"} 30")
            .replace("{model=\"phi3\"} 500", "{model=\"phi3\"} 900");
        let now = scrape(t0 + Duration::from_secs(2), &later_text);
        let r = rows(&models, Some(&earlier), &now);
        assert_eq!(r[0].state, "serving");
        assert_eq!(r[0].requests_per_s, Some(10.0));
        assert_eq!(r[0].tokens_per_s, Some(200.0));
        assert_eq!(r[0].in_flight, Some(3.0));
        assert_eq!(r[0].ttft_p50, Some(0.1));
        assert_eq!(r[0].ttft_p95, Some(0.2));
        assert_eq!(r[0].memory, Some(50 << 20));
        assert_eq!(r[0].restarts, Some(2));
        assert_eq!(
            line(&cells(&r[0])),
            "phi3            serving        10.0      200     100ms     200ms          3     50.0M / 4.0G         2"
        );
        assert_eq!(r[1].state, "loading");
        assert_eq!(r[1].requests_per_s, Some(0.0));
        assert_eq!(r[2].state, "?");
        assert_eq!(
            line(&cells(&r[2])),
            "gone            ?                 -        -         -         -          -                -         -"
        );
        // The first frame has no rates yet; a failed scrape shows dashes.
        let first = rows(&models, None, &earlier);
        assert_eq!(first[0].requests_per_s, None);
        let failed = Scrape {
            metrics: Err("cannot connect".into()),
            ..now.clone()
        };
        let r = rows(&models, Some(&earlier), &failed);
        assert_eq!(r[0].state, "active");
        assert_eq!(r[0].in_flight, None);
        assert_eq!(r[0].requests_per_s, None);
    }

    #[test]
    fn issue14_top_state_words() {
        assert_eq!(state_word(Some(&unit("active", "running")), None), "active");
        assert_eq!(
            state_word(Some(&unit("active", "running")), Some(false)),
            "active"
        );
        assert_eq!(
            state_word(Some(&unit("activating", "auto-restart")), None),
            "restarting"
        );
        assert_eq!(
            state_word(Some(&unit("deactivating", "stop-sigterm")), None),
            "stopping"
        );
        assert_eq!(state_word(Some(&unit("failed", "failed")), None), "failed");
        assert_eq!(
            state_word(Some(&unit("inactive", "dead")), Some(true)),
            "inactive"
        );
        let missing = UnitState {
            load_state: "not-found".into(),
            ..UnitState::default()
        };
        assert_eq!(state_word(Some(&missing), None), "not-found");
    }

    #[test]
    fn issue14_top_first_api_key() {
        let k = "k".repeat(40);
        assert_eq!(
            first_api_key(&format!("# keys\n\n  {k}  \nother")),
            Some(k.clone())
        );
        // Named keys (issue 14, item 1): `NAME: KEY`.
        assert_eq!(first_api_key(&format!("ci: {k}\nx")), Some(k.clone()));
        assert_eq!(first_api_key(&format!("ci:\t{k}")), Some(k.clone()));
        // A colon without a blank after it is part of the key.
        let colons = format!("a:{k}:b");
        assert_eq!(first_api_key(&colons), Some(colons.clone()));
        // A key that cannot be a header value is skipped for the next one.
        assert_eq!(first_api_key(&format!("bad\u{7}key\n{k}")), Some(k.clone()));
        assert_eq!(first_api_key("# only comments\n\n"), None);
    }

    #[test]
    fn issue14_top_interval() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("10ms").is_err());
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn issue14_top_screen_is_cut_to_the_terminal() {
        let lines = vec!["abcdef".to_owned(), "ü".repeat(10), "third".to_owned()];
        let s = terminal::screen(&lines, 4, 2);
        assert_eq!(s, "\x1b[Habcd\x1b[K\r\nüüüü\x1b[K\r\n\x1b[J");
    }

    fn label_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_.+-]{0,12}",
            any::<String>(),
            "[\"\\\\\n{},= #]{0,8}",
        ]
    }

    fn escape(v: &str) -> String {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the gateway (or something else on its port) sends, the
        /// parser returns samples and never panics.
        #[test]
        fn issue14_top_parser_never_panics(text in any::<String>()) {
            let _ = by_model(&parse_metrics(&text));
        }

        #[test]
        fn issue14_top_parser_never_panics_on_metric_like_text(
            text in "[a-z_{}=\",\\\\ \n#.0-9+-]{0,200}"
        ) {
            let _ = by_model(&parse_metrics(&text));
        }

        /// A sample written with the format's escaping reads back as it was.
        #[test]
        fn issue14_top_parser_round_trips(
            name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}",
            labels in proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,8}", label_value(), 0..4),
            value in any::<f64>().prop_filter("finite", |v| v.is_finite()),
        ) {
            let body: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let text = format!("# HELP x y\n{name}{{{}}} {value:e}\n", body.join(","));
            let samples = parse_metrics(&text);
            prop_assert_eq!(samples.len(), 1, "{}", text);
            prop_assert_eq!(&samples[0].name, &name);
            prop_assert_eq!(samples[0].value, value);
            let want: Vec<(String, String)> = labels.into_iter().collect();
            prop_assert_eq!(&samples[0].labels, &want);
        }

        /// Quantiles of any buckets: no panic; when defined, monotone in q and
        /// within the finite bounds.
        #[test]
        fn issue14_top_quantiles_are_monotone_and_bounded(
            buckets in proptest::collection::vec(
                (prop_oneof![0.0f64..100.0, Just(f64::INFINITY), Just(f64::NAN), -1.0f64..0.0],
                 prop_oneof![0.0f64..1000.0, Just(f64::NAN), -5.0f64..0.0]),
                0..12,
            ),
        ) {
            let hist = Histogram::new(buckets);
            let finite: Vec<f64> = hist.buckets.iter().map(|b| b.0).filter(|l| l.is_finite()).collect();
            let lo = finite.iter().copied().fold(0.0f64, f64::min);
            let hi = finite.iter().copied().fold(0.0f64, f64::max);
            let mut last = f64::NEG_INFINITY;
            for q in [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0] {
                if let Some(v) = hist.quantile(q) {
                    prop_assert!(v >= lo - 1e-9 && v <= hi + 1e-9, "{v} outside {lo}..{hi}");
                    prop_assert!(v >= last - 1e-9, "q={q}: {v} < {last}");
                    last = v;
                }
            }
        }

        /// Rates are never negative and never panic; a delta is never larger
        /// than the counts it came from.
        #[test]
        fn issue14_top_rates_and_deltas_are_sane(
            a in proptest::option::of(any::<f64>()),
            b in proptest::option::of(any::<f64>()),
            ms in 0u64..10_000,
            counts in proptest::collection::vec((0.0f64..1000.0, 0.0f64..1000.0), 1..8),
        ) {
            if let Some(r) = rate(a, b, Duration::from_millis(ms)) {
                prop_assert!(r >= 0.0);
            }
            let les: Vec<f64> = (0..counts.len()).map(|i| i as f64).collect();
            let then = Histogram::new(les.iter().copied().zip(counts.iter().map(|c| c.0)).collect());
            let now = Histogram::new(les.iter().copied().zip(counts.iter().map(|c| c.0 + c.1)).collect());
            if let Some(d) = now.since(&then) {
                prop_assert!(d.count() <= now.count() + 1e-9);
            }
            let _ = ttft_window(Some(&then), Some(&now));
        }
    }
}
