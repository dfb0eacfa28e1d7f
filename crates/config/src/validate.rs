//! Stage 3: raw (merged) values to validated settings. Every check records a
//! diagnostic and carries on with a placeholder, so one run reports every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::diag::Diagnostic;
use crate::engine::{Engine, EngineKind, ReadyCheck};
use crate::raw::{RawConfig, RawGateway, RawModel, S};
use crate::settings::{
    is_absolute_clean, Gateway, Limits, Model, ModelName, Paths, Port, ServiceIdentity, Settings,
};
use crate::units::{ByteSize, Cpus, SizeLimit, Timespan};

/// The raw resource-limit fields shared by the gateway and the models.
struct RawLimits<'a> {
    memory_max: &'a Option<S<String>>,
    memory_high: &'a Option<S<String>>,
    cpus: &'a Option<S<f64>>,
    tasks_max: &'a Option<S<i64>>,
    nofile: &'a Option<S<i64>>,
    memlock: Option<&'a S<String>>,
}

pub(crate) struct Validator {
    pub diags: Vec<Diagnostic>,
}

fn span<T>(v: &S<T>) -> Option<Range<usize>> {
    Some(v.span())
}

impl Validator {
    fn error(&mut self, key: &str, at: Option<Range<usize>>, message: String, help: Option<&str>) {
        let mut d = Diagnostic::error(key, message).at(at);
        if let Some(h) = help {
            d = d.help(h);
        }
        self.diags.push(d);
    }

    fn warn(&mut self, key: &str, at: Option<Range<usize>>, message: String, help: &str) {
        self.diags
            .push(Diagnostic::warning(key, message).at(at).help(help));
    }

    fn path(&mut self, key: &str, v: &Option<S<String>>, default: &Path) -> PathBuf {
        match v {
            None => default.to_owned(),
            Some(s) if is_absolute_clean(s.get_ref()) => PathBuf::from(s.get_ref()),
            Some(s) => {
                self.error(
                    key,
                    span(s),
                    format!("`{}` is not an absolute path", s.get_ref()),
                    Some("write the full path starting with `/` (no `..`); systemd units need absolute paths"),
                );
                default.to_owned()
            }
        }
    }

    fn timespan(&mut self, key: &str, v: &Option<S<String>>, default: Timespan) -> Timespan {
        let Some(s) = v else { return default };
        match Timespan::parse(s.get_ref()) {
            Ok(t) if t.0.is_zero() => {
                self.error(
                    key,
                    span(s),
                    format!("{key} must be longer than zero"),
                    Some("write e.g. `30s`"),
                );
                default
            }
            Ok(t) => t,
            Err(e) => {
                self.error(key, span(s), e, None);
                default
            }
        }
    }

    fn size(&mut self, key: &str, v: &Option<S<String>>) -> Option<ByteSize> {
        let s = v.as_ref()?;
        match ByteSize::parse(s.get_ref()) {
            Ok(b) => Some(b),
            Err(e) => {
                self.error(key, span(s), e, None);
                None
            }
        }
    }

    fn count(&mut self, key: &str, v: &Option<S<i64>>, min: i64, max: i64) -> Option<u32> {
        let s = v.as_ref()?;
        let n = *s.get_ref();
        if n < min || n > max {
            self.error(
                key,
                span(s),
                format!("{key} = {n} is out of range"),
                Some(&format!("use a whole number from {min} to {max}")),
            );
            return None;
        }
        Some(n as u32)
    }

    fn port(&mut self, key: &str, v: &S<i64>) -> Option<Port> {
        match Port::new(*v.get_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                self.error(key, span(v), e, None);
                None
            }
        }
    }

    fn limits(&mut self, prefix: &str, raw: RawLimits<'_>) -> Limits {
        let RawLimits {
            memory_max,
            memory_high,
            cpus,
            tasks_max,
            nofile,
            memlock,
        } = raw;
        let max = self.size(&format!("{prefix}.memory_max"), memory_max);
        let high = self.size(&format!("{prefix}.memory_high"), memory_high);
        if let (Some(max), Some(high), Some(at)) = (max, high, memory_high) {
            if high > max {
                self.error(
                    &format!("{prefix}.memory_high"),
                    span(at),
                    format!("memory_high ({high}) is above memory_max ({max})"),
                    Some("memory_high is the soft limit where reclaim starts; set it below memory_max (e.g. 90% of it)"),
                );
            }
        }
        let cpus = cpus.as_ref().and_then(|c| {
            let n = *c.get_ref();
            if n > 0.0 && n <= 4096.0 {
                Some(Cpus(n))
            } else {
                self.error(
                    &format!("{prefix}.cpus"),
                    span(c),
                    format!("cpus = {n} is out of range"),
                    Some("give the number of cores, e.g. `cpus = 8` (renders CPUQuota=800%)"),
                );
                None
            }
        });
        let memlock = memlock.and_then(|m| match SizeLimit::parse(m.get_ref()) {
            Ok(l) => Some(l),
            Err(e) => {
                self.error(
                    &format!("{prefix}.memlock"),
                    span(m),
                    e,
                    Some("write a size such as `64M`, or `infinity`"),
                );
                None
            }
        });
        Limits {
            memory_max: max,
            memory_high: high,
            cpus,
            tasks_max: self.count(&format!("{prefix}.tasks_max"), tasks_max, 16, 4_194_304),
            nofile: self.count(&format!("{prefix}.nofile"), nofile, 64, 1_048_576),
            memlock,
        }
    }

    pub fn settings(&mut self, raw: &RawConfig, source: &Path) -> Settings {
        let home = self.path("paths.home", &raw.paths.home, Path::new("/opt/citadel"));
        let paths = Paths {
            models: self.path("paths.models", &raw.paths.models, &home.join("models")),
            credentials: self.path(
                "paths.credentials",
                &raw.paths.credentials,
                Path::new("/etc/citadel/credentials"),
            ),
            home,
        };
        let service = ServiceIdentity {
            user: self.identity("service.user", &raw.service.user),
            group: self.identity("service.group", &raw.service.group),
        };
        let gateway = self.gateway(&raw.gateway, &paths);
        if raw.model_defaults.port.is_some() {
            let at = raw.model_defaults.port.as_ref().map(|p| p.span());
            self.error(
                "model_defaults.port",
                at,
                "a port cannot be a default: every model needs its own".into(),
                Some("move `port` into each `[models.NAME]` table"),
            );
        }
        let mut models = Vec::new();
        for (name, model) in &raw.models {
            let merged = model
                .get_ref()
                .merged_over(&defaults_for(model.get_ref(), &raw.model_defaults));
            if let Some(m) = self.model(name, model.span(), &merged, &paths) {
                models.push(m);
            }
        }
        if raw.models.is_empty() {
            self.error("models", None, "no models are configured".into(), Some("add at least one `[models.NAME]` table with a `port` (see `citadel-systemd init`)"));
        }
        models.sort_by_key(|m| m.port);
        self.ports(raw, &gateway);
        Settings {
            source: source.to_owned(),
            paths,
            service,
            gateway,
            models,
        }
    }

    fn identity(&mut self, key: &str, v: &Option<S<String>>) -> String {
        let Some(s) = v else { return "citadel".into() };
        let name = s.get_ref();
        let valid = !name.is_empty()
            && name.len() <= 31
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid {
            self.error(key, span(s), format!("`{name}` is not a valid system user or group name"), Some("use lowercase letters, digits, `_` and `-`, starting with a letter (at most 31 characters)"));
        } else if name == "root" {
            self.error(
                key,
                span(s),
                "Citadel's services must not run as root".into(),
                Some("use the default `citadel` or another unprivileged account"),
            );
        }
        name.clone()
    }

    fn gateway(&mut self, g: &RawGateway, paths: &Paths) -> Gateway {
        let listen = match &g.listen {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
                self.error(
                    "gateway.listen",
                    span(s),
                    format!("`{}` is not an IP address", s.get_ref()),
                    Some("write an address such as `127.0.0.1`, `0.0.0.0` or `::`"),
                );
                IpAddr::from([127, 0, 0, 1])
            }),
        };
        let port = g
            .port
            .as_ref()
            .and_then(|p| self.port("gateway.port", p))
            .unwrap_or(Port::new(8000).expect("valid"));
        let auth = g.auth.as_ref().is_none_or(|a| *a.get_ref());
        let rate = match &g.rate_limit_per_minute {
            None => 100,
            Some(r) => self
                .count(
                    "gateway.rate_limit_per_minute",
                    &Some(r.clone()),
                    1,
                    1_000_000,
                )
                .unwrap_or(100),
        };
        let max_body = self
            .size("gateway.max_body", &g.max_body)
            .unwrap_or(ByteSize(ByteSize::MIB));
        let cors_origins = g
            .cors_origins
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_default();
        if let Some(c) = &g.cors_origins {
            for origin in c.get_ref() {
                if origin != "*"
                    && !(origin.starts_with("http://") || origin.starts_with("https://"))
                {
                    self.error(
                        "gateway.cors_origins",
                        span(c),
                        format!("CORS origin `{origin}` must start with http:// or https://"),
                        Some("write origins such as `https://chat.example.com`"),
                    );
                }
            }
        }
        let limits = self.limits(
            "gateway",
            RawLimits {
                memory_max: &g.memory_max,
                memory_high: &g.memory_high,
                cpus: &g.cpus,
                tasks_max: &g.tasks_max,
                nofile: &g.nofile,
                memlock: None,
            },
        );
        let gw = Gateway {
            listen,
            port,
            auth,
            api_keys_file: self.path(
                "gateway.api_keys_file",
                &g.api_keys_file,
                &paths.credentials.join("api-keys"),
            ),
            rate_limit_per_minute: rate,
            max_body,
            cors_origins,
            header_timeout: self.timespan(
                "gateway.header_timeout",
                &g.header_timeout,
                Timespan::from_secs(10),
            ),
            request_timeout: self.timespan(
                "gateway.request_timeout",
                &g.request_timeout,
                Timespan::from_secs(600),
            ),
            probe_interval: self.timespan(
                "gateway.probe_interval",
                &g.probe_interval,
                Timespan::from_secs(2),
            ),
            drain_timeout: self.timespan(
                "gateway.drain_timeout",
                &g.drain_timeout,
                Timespan::from_secs(30),
            ),
            watchdog: self.timespan("gateway.watchdog", &g.watchdog, Timespan::from_secs(30)),
            limits,
        };
        if !gw.listen.is_loopback() && !gw.auth {
            let at = g
                .auth
                .as_ref()
                .map(|a| a.span())
                .or(g.listen.as_ref().map(|l| l.span()));
            self.warn("gateway.auth", at, format!("the gateway listens on {} without authentication", gw.listen), "set `auth = true` and provide API keys, or listen on 127.0.0.1 behind a proxy that authenticates");
        }
        gw
    }

    fn model(
        &mut self,
        name: &S<String>,
        table: Range<usize>,
        m: &RawModel,
        paths: &Paths,
    ) -> Option<Model> {
        let key = format!("models.{}", name.get_ref());
        let k = |field: &str| format!("{key}.{field}");
        let name_ok = match ModelName::new(name.get_ref()) {
            Ok(n) => Some(n),
            Err(e) => {
                self.error(&key, span(name), e, None);
                None
            }
        };
        let port = match &m.port {
            Some(p) => self.port(&k("port"), p),
            None => {
                self.error(
                    &k("port"),
                    Some(table.clone()),
                    format!("model `{}` has no port", name.get_ref()),
                    Some("add `port = 11400` (each model needs its own port)"),
                );
                None
            }
        };
        let kind = match &m.engine {
            None => EngineKind::Vllm,
            Some(e) => EngineKind::parse(e.get_ref()).unwrap_or_else(|| {
                let names: Vec<_> = EngineKind::ALL.iter().map(|k| format!("\"{k}\"")).collect();
                self.error(
                    &k("engine"),
                    span(e),
                    format!("unknown engine `{}`", e.get_ref()),
                    Some(&format!("use one of {}", names.join(", "))),
                );
                EngineKind::Command
            }),
        };
        let engine = self.engine(&key, table.clone(), kind, m, paths);
        let env = self.env(&k("env"), &m.env);
        let credentials = self.credentials(&k("credentials"), &m.credentials);
        let gpus = self.gpus(&k("gpus"), &m.gpus);
        let health_path = match (&m.health_path, kind) {
            (Some(p), _) if !p.get_ref().starts_with('/') => {
                self.error(
                    &k("health_path"),
                    span(p),
                    format!("health_path `{}` must start with `/`", p.get_ref()),
                    Some("write e.g. `/health`"),
                );
                kind.default_health_path().to_owned()
            }
            (Some(p), _) => p.get_ref().clone(),
            (None, _) => kind.default_health_path().to_owned(),
        };
        let ready_check = match &m.ready_check {
            None => kind.default_ready_check(),
            Some(r) => ReadyCheck::parse(r.get_ref()).unwrap_or_else(|| {
                self.error(
                    &k("ready_check"),
                    span(r),
                    format!("unknown ready_check `{}`", r.get_ref()),
                    Some("use \"health\" or \"completion\""),
                );
                kind.default_ready_check()
            }),
        };
        let start_timeout = self.timespan(
            &k("start_timeout"),
            &m.start_timeout,
            Timespan::from_secs(kind.default_start_timeout_secs()),
        );
        let stop_timeout =
            self.timespan(&k("stop_timeout"), &m.stop_timeout, Timespan::from_secs(30));
        let watchdog = self.timespan(&k("watchdog"), &m.watchdog, Timespan::from_secs(30));
        let probe_interval = self.timespan(
            &k("probe_interval"),
            &m.probe_interval,
            Timespan::from_secs(1),
        );
        if probe_interval >= watchdog {
            let at = m
                .probe_interval
                .as_ref()
                .or(m.watchdog.as_ref())
                .map(|s| s.span());
            self.error(&k("probe_interval"), at, format!("probe_interval ({probe_interval}) must be shorter than watchdog ({watchdog})"), Some("the supervisor must probe several times per watchdog period; e.g. probe_interval = \"1s\", watchdog = \"30s\""));
        }
        let limits = self.limits(
            &key,
            RawLimits {
                memory_max: &m.memory_max,
                memory_high: &m.memory_high,
                cpus: &m.cpus,
                tasks_max: &m.tasks_max,
                nofile: &m.nofile,
                memlock: m.memlock.as_ref(),
            },
        );
        let aliases = m
            .aliases
            .as_ref()
            .map(|a| a.get_ref().clone())
            .unwrap_or_default();
        let replicas = m
            .replicas
            .as_ref()
            .map(|r| r.get_ref().clone())
            .unwrap_or_default();
        if let Some(r) = &m.replicas {
            for url in r.get_ref() {
                if !valid_upstream(url) {
                    self.error(
                        &k("replicas"),
                        span(r),
                        format!("replica `{url}` is not an upstream URL"),
                        Some("write `http://HOST:PORT`, e.g. `http://10.0.0.12:11400`"),
                    );
                }
            }
        }
        Some(Model {
            name: name_ok?,
            port: port?,
            engine: engine?,
            args: m
                .args
                .as_ref()
                .map(|a| a.get_ref().clone())
                .unwrap_or_default(),
            env,
            credentials,
            gpus,
            aliases,
            replicas,
            health_path,
            ready_check,
            start_timeout,
            stop_timeout,
            watchdog,
            probe_interval,
            limits,
        })
    }

    fn engine(
        &mut self,
        key: &str,
        table: Range<usize>,
        kind: EngineKind,
        m: &RawModel,
        paths: &Paths,
    ) -> Option<Engine> {
        let k = |field: &str| format!("{key}.{field}");
        // Settings that belong to one engine only: name the misplaced ones.
        let present = |field: &str| field_span(m, field).is_some();
        let mut misplaced = false;
        for &(field, engines) in EngineKind::ENGINE_SPECIFIC {
            if present(field) && !engines.contains(&kind) {
                misplaced = true;
                let names: Vec<_> = engines.iter().map(|e| format!("\"{e}\"")).collect();
                let at = field_span(m, field).or(Some(table.clone()));
                self.error(
                    &k(field),
                    at,
                    format!("`{field}` does not apply to engine \"{kind}\""),
                    Some(&format!(
                        "`{field}` is for engine {}; remove it or change `engine`",
                        names.join(" or ")
                    )),
                );
            }
        }
        let program = |v: &mut Validator, field: &str, raw: &Option<S<String>>| -> PathBuf {
            let default = kind.default_program();
            let default = if default.starts_with('/') {
                PathBuf::from(default)
            } else {
                paths.home.join(default)
            };
            v.path(&k(field), raw, &default)
        };
        let require_model = |v: &mut Validator, what: &str| -> Option<String> {
            match &m.model {
                Some(s) if !s.get_ref().trim().is_empty() => Some(s.get_ref().clone()),
                _ => {
                    v.error(
                        &k("model"),
                        Some(table.clone()),
                        format!("engine \"{kind}\" needs `model`"),
                        Some(what),
                    );
                    None
                }
            }
        };
        let engine = match kind {
            EngineKind::Vllm => {
                let model = require_model(self, "set `model` to the model directory (e.g. \"/opt/citadel/models/mixtral-8x7b\") or its id");
                let gmu = m.gpu_memory_utilization.as_ref().and_then(|g| {
                    let v = *g.get_ref();
                    if v > 0.0 && v <= 1.0 {
                        Some(v)
                    } else {
                        self.error(
                            &k("gpu_memory_utilization"),
                            span(g),
                            format!("gpu_memory_utilization = {v} is out of range"),
                            Some("use a fraction between 0 and 1, e.g. 0.9"),
                        );
                        None
                    }
                });
                Engine::Vllm {
                    python: program(self, "python", &m.python),
                    model: model?,
                    max_model_len: self.count(
                        &k("max_model_len"),
                        &m.max_model_len,
                        16,
                        10_000_000,
                    ),
                    gpu_memory_utilization: gmu,
                }
            }
            EngineKind::LlamaCpp => {
                let model = require_model(
                    self,
                    "set `model` to the GGUF file, e.g. \"/opt/citadel/models/phi3.gguf\"",
                );
                if let Some(s) = m.model.as_ref().filter(|s| !is_absolute_clean(s.get_ref())) {
                    self.error(
                        &k("model"),
                        span(s),
                        format!("`{}` is not an absolute path", s.get_ref()),
                        Some("llama-server loads a GGUF file: give its full path"),
                    );
                }
                Engine::LlamaCpp {
                    binary: program(self, "binary", &m.binary),
                    model: PathBuf::from(model?),
                    parallel: self.count(&k("parallel"), &m.parallel, 1, 1024),
                }
            }
            EngineKind::Ollama => Engine::Ollama {
                binary: program(self, "binary", &m.binary),
                model: require_model(
                    self,
                    "set `model` to the Ollama model name, e.g. \"phi3:mini\"",
                )?,
            },
            EngineKind::Tgi => Engine::Tgi {
                binary: program(self, "binary", &m.binary),
                model: require_model(self, "set `model` to the model directory or id")?,
            },
            EngineKind::Command => {
                let argv = match &m.command {
                    Some(c) if !c.get_ref().is_empty() => {
                        if !is_absolute_clean(&c.get_ref()[0]) {
                            self.error(&k("command"), span(c), format!("the program `{}` is not an absolute path", c.get_ref()[0]), Some("systemd runs engines without a shell or PATH search: give the full path"));
                        }
                        Some(c.get_ref().clone())
                    }
                    _ => {
                        if !misplaced {
                            self.error(&k("command"), Some(table.clone()), "engine \"command\" needs `command`".into(), Some("set `command = [\"/usr/local/bin/my-server\", \"--port\", \"11400\"]`"));
                        }
                        None
                    }
                };
                Engine::Command {
                    argv: argv?,
                    health_path: m
                        .health_path
                        .as_ref()
                        .map_or_else(|| "/health".to_owned(), |h| h.get_ref().clone()),
                }
            }
            EngineKind::Sim => Engine::Sim {
                binary: program(self, "binary", &m.binary),
            },
        };
        Some(engine)
    }

    fn env(
        &mut self,
        key: &str,
        v: &Option<S<std::collections::BTreeMap<String, String>>>,
    ) -> BTreeMap<String, String> {
        let Some(env) = v else { return BTreeMap::new() };
        for (name, value) in env.get_ref() {
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.error(
                    key,
                    span(env),
                    format!("`{name}` is not a valid environment variable name"),
                    Some("use letters, digits and `_`, not starting with a digit"),
                );
            }
            if value.contains('\n') {
                self.error(
                    key,
                    span(env),
                    format!("the value of `{name}` contains a newline"),
                    None,
                );
            }
            let upper = name.to_ascii_uppercase();
            // A path to a secret (HF_TOKEN_FILE, ..._PATH) is not a secret itself.
            let names_a_path = ["_FILE", "_PATH", "_DIR"]
                .iter()
                .any(|s| upper.ends_with(s));
            if !names_a_path
                && ["TOKEN", "SECRET", "PASSWORD", "API_KEY", "APIKEY"]
                    .iter()
                    .any(|s| upper.contains(s))
            {
                self.error(key, span(env), format!("`{name}` looks like a secret; secrets never go into unit files"), Some("put the secret in a file under /etc/citadel/credentials and add it as a credential: `credentials = { hf-token = \"/etc/citadel/credentials/hf-token\" }` (the engine reads it from $CREDENTIALS_DIRECTORY)"));
            }
        }
        env.get_ref().clone()
    }

    fn credentials(
        &mut self,
        key: &str,
        v: &Option<S<BTreeMap<String, String>>>,
    ) -> BTreeMap<String, PathBuf> {
        let Some(c) = v else { return BTreeMap::new() };
        let mut out = BTreeMap::new();
        for (name, path) in c.get_ref() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
            {
                self.error(
                    key,
                    span(c),
                    format!("`{name}` is not a valid credential name"),
                    Some("use letters, digits, `-`, `_` and `.`"),
                );
            }
            if !is_absolute_clean(path) {
                self.error(
                    key,
                    span(c),
                    format!("credential `{name}`: `{path}` is not an absolute path"),
                    Some("give the full path of the host file systemd loads"),
                );
            }
            out.insert(name.clone(), PathBuf::from(path));
        }
        out
    }

    fn gpus(&mut self, key: &str, v: &Option<S<Vec<i64>>>) -> Vec<u32> {
        let Some(g) = v else { return Vec::new() };
        let mut seen = BTreeSet::new();
        for &i in g.get_ref() {
            if !(0..64).contains(&i) {
                self.error(
                    key,
                    span(g),
                    format!("GPU index {i} is out of range"),
                    Some("GPU indexes count from 0, as in `nvidia-smi -L`"),
                );
            } else if !seen.insert(i as u32) {
                self.error(key, span(g), format!("GPU {i} is listed twice"), None);
            }
        }
        seen.into_iter().collect()
    }

    fn ports(&mut self, raw: &RawConfig, gateway: &Gateway) {
        let mut used: BTreeMap<u16, String> = BTreeMap::new();
        for (name, m) in &raw.models {
            let merged_port = m.get_ref().port.as_ref();
            let Some(p) = merged_port else { continue };
            let Ok(port) = Port::new(*p.get_ref()) else {
                continue;
            };
            let key = format!("models.{}.port", name.get_ref());
            if port == gateway.port {
                self.error(
                    &key,
                    span(p),
                    format!("port {port} is the gateway's port"),
                    Some("model engines need ports of their own; the spec uses 11400-11403"),
                );
            }
            if port.is_privileged() {
                self.error(&key, span(p), format!("port {port} is privileged"), Some("model engines run without capabilities; use a port from 1024 up (e.g. 11400)"));
            }
            if let Some(other) = used.insert(port.get(), name.get_ref().clone()) {
                self.error(
                    &key,
                    span(p),
                    format!("port {port} is already used by model `{other}`"),
                    Some("give every model its own port"),
                );
            }
        }
    }
}

/// `[model_defaults]` as it applies to one model: defaults that only some engines
/// take (`python`, `max_model_len`, ...) are left out for a model whose engine
/// does not take them, so one defaults table can serve a mixed stack. A model's
/// own misplaced settings are still errors.
fn defaults_for(model: &RawModel, defaults: &RawModel) -> RawModel {
    let engine = model
        .engine
        .as_ref()
        .or(defaults.engine.as_ref())
        .and_then(|e| EngineKind::parse(e.get_ref()));
    let Some(kind) = engine else {
        return defaults.clone();
    };
    let mut d = defaults.clone();
    for &(field, engines) in EngineKind::ENGINE_SPECIFIC {
        if !engines.contains(&kind) {
            clear_field(&mut d, field);
        }
    }
    d
}

fn valid_upstream(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

fn clear_field(m: &mut RawModel, field: &str) {
    match field {
        "python" => m.python = None,
        "binary" => m.binary = None,
        "command" => m.command = None,
        "max_model_len" => m.max_model_len = None,
        "gpu_memory_utilization" => m.gpu_memory_utilization = None,
        "parallel" => m.parallel = None,
        "model" => m.model = None,
        other => unreachable!("{other} is not in EngineKind::ENGINE_SPECIFIC"),
    }
}

fn field_span(m: &RawModel, field: &str) -> Option<Range<usize>> {
    match field {
        "python" => m.python.as_ref().map(|s| s.span()),
        "binary" => m.binary.as_ref().map(|s| s.span()),
        "command" => m.command.as_ref().map(|s| s.span()),
        "max_model_len" => m.max_model_len.as_ref().map(|s| s.span()),
        "gpu_memory_utilization" => m.gpu_memory_utilization.as_ref().map(|s| s.span()),
        "parallel" => m.parallel.as_ref().map(|s| s.span()),
        "model" => m.model.as_ref().map(|s| s.span()),
        _ => None,
    }
}
