//! Stage 3: raw (merged) values to validated settings. Every check records a
//! diagnostic and carries on with a placeholder, so one run reports every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::checks::{self, SpanBounds};
use crate::diag::Diagnostic;
use crate::engine::{Engine, EngineKind, ReadyCheck};
use crate::gpu::GpuRef;
use crate::raw::{RawConfig, RawGateway, RawGpu, RawModel, StrMap, S};
use crate::settings::{
    Gateway, Instance, Limits, Model, ModelName, Paths, Port, ServiceIdentity, Settings,
    INSTANCE_SEPARATOR, MAX_INSTANCES,
};
use crate::units::{ByteSize, Cpus, SizeLimit, Timespan};

/// The gateway's `nofile` (LimitNOFILE=) when the config sets none: every
/// client connection and every upstream connection is a file descriptor, and
/// systemd's default soft limit of 1024 refused connections (`accept failed`)
/// well below the 1,000 concurrent clients the gateway is benchmarked with.
pub const GATEWAY_NOFILE: u32 = 65_536;
/// The gateway's `tasks_max` (TasksMax=) when the config sets none: tokio's
/// workers (one per core) and its blocking pool (up to 512 threads) fit with
/// room to spare; a runaway thread leak is stopped long before the host's limit.
pub const GATEWAY_TASKS_MAX: u32 = 4096;
/// A model's `nofile` when neither it nor `[model_defaults]` sets one: engines
/// open many files (vLLM: weight shards, shared memory, one socket per client
/// and per worker; its own docs ask for 65536), and systemd's default soft
/// limit is 1024.
pub const MODEL_NOFILE: u32 = 65_536;

/// System accounts and groups a service identity may not be: Citadel's
/// services must run as a dedicated account of their own. Sharing `nobody` or
/// `daemon` shares every file and process of those accounts with the engines;
/// a privileged group (`shadow`, `disk`, `sudo`, `adm`, `docker`, ...) hands the
/// sandboxed engines its powers (read password hashes, raw disks, logs, root
/// through the docker socket). `video` and `render` are not listed: GPU access
/// legitimately goes through them.
pub(crate) const SYSTEM_IDENTITIES: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "nogroup",
    "adm",
    "tty",
    "disk",
    "kmem",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "sudo",
    "wheel",
    "audio",
    "dip",
    "operator",
    "src",
    "shadow",
    "utmp",
    "plugdev",
    "staff",
    "users",
    "input",
    "kvm",
    "docker",
    "lxd",
    "libvirt",
    "ssl-cert",
    "messagebus",
    "sshd",
    "syslog",
    "polkitd",
    "systemd-journal",
    "systemd-network",
    "systemd-resolve",
    "systemd-timesync",
    "systemd-coredump",
    "systemd-oom",
    "_apt",
];

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
    /// Key paths whose value was refused while reading (wrong type): a check
    /// that would report them as missing stays quiet, the type error says it.
    pub broken: BTreeSet<String>,
    /// (model, alias) pairs, checked against each other once all models are read.
    aliases: Vec<(String, S<String>)>,
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

    pub fn new(broken: BTreeSet<String>) -> Validator {
        Validator {
            diags: Vec::new(),
            broken,
            aliases: Vec::new(),
        }
    }

    /// Whether a value at `key` (or the `[model_defaults]` one it would inherit)
    /// was refused while reading.
    fn is_broken(&self, key: &str) -> bool {
        if self.broken.contains(key) {
            return true;
        }
        let field = key.rsplit('.').next().unwrap_or(key);
        self.broken.contains(&format!("model_defaults.{field}"))
    }

    /// Free text that reaches a unit or the engine (arguments, ids, env values):
    /// no control characters.
    fn text(&mut self, key: &str, s: &S<String>) -> bool {
        match checks::no_control(s.get_ref()) {
            Ok(()) => true,
            Err(e) => {
                self.error(
                    key,
                    span(s),
                    format!("{key} {e}"),
                    Some("remove the character; write the value on one line"),
                );
                false
            }
        }
    }

    fn path(&mut self, key: &str, v: &Option<S<String>>, default: &Path) -> PathBuf {
        match v {
            None => default.to_owned(),
            Some(s) => match checks::path(s.get_ref()) {
                Ok(()) => PathBuf::from(s.get_ref()),
                Err(e) => {
                    self.error(
                        key,
                        span(s),
                        format!("`{}` {e}", s.get_ref().escape_debug()),
                        Some("write the full path starting with `/` (no `..`); systemd units need absolute paths that are one word"),
                    );
                    default.to_owned()
                }
            },
        }
    }

    /// A directory Citadel creates, chmods and purges (see [`checks::managed_dir`]).
    fn managed_dir(&mut self, key: &str, v: &Option<S<String>>, p: &Path) {
        if let Err(e) = checks::managed_dir(p) {
            self.error(
                key,
                v.as_ref().and_then(span),
                format!("{key} `{}` {e}", p.display()),
                Some("Citadel creates this directory with tmpfiles.d (mode and owner are set even if it exists) and `uninstall --purge` removes it: give it a directory of its own"),
            );
        }
    }

    fn timespan(
        &mut self,
        key: &str,
        v: &Option<S<String>>,
        default: Timespan,
        bounds: SpanBounds,
    ) -> Timespan {
        let Some(s) = v else { return default };
        match Timespan::parse(s.get_ref()) {
            Ok(t) if t.0.is_zero() => {
                self.error(
                    key,
                    span(s),
                    format!("{key} must be longer than zero"),
                    Some(&format!(
                        "write a span from {} to {}, e.g. `{default}`",
                        bounds.min, bounds.max
                    )),
                );
                default
            }
            Ok(t) => match bounds.check(t) {
                Ok(()) => t,
                Err(e) => {
                    self.error(
                        key,
                        span(s),
                        format!("{key} = {e}"),
                        Some(&format!(
                            "write a span from {} to {}, e.g. `{default}`",
                            bounds.min, bounds.max
                        )),
                    );
                    default
                }
            },
            Err(e) => {
                self.error(
                    key,
                    span(s),
                    e,
                    Some("write e.g. `90s`, `15min`, `1h 30min` or `500ms`"),
                );
                default
            }
        }
    }

    fn size(
        &mut self,
        key: &str,
        v: &Option<S<String>>,
        min: ByteSize,
        max: ByteSize,
        why: &str,
    ) -> Option<ByteSize> {
        let s = v.as_ref()?;
        match ByteSize::parse(s.get_ref()) {
            Ok(b) if b < min || b > max => {
                self.error(
                    key,
                    span(s),
                    format!("{key} = {b} is out of range ({min} to {max})"),
                    Some(why),
                );
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                self.error(
                    key,
                    span(s),
                    e,
                    Some("write a whole number of bytes with a unit, e.g. `512M` or `90G`"),
                );
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
        let why = "a unit needs at least 1M to start its process at all (and `memory_max = \"1\"` is one byte); write e.g. `512M` or `90G`";
        let max = self.size(
            &format!("{prefix}.memory_max"),
            memory_max,
            checks::MEMORY_MIN,
            ByteSize::MAX,
            why,
        );
        let high = self.size(
            &format!("{prefix}.memory_high"),
            memory_high,
            checks::MEMORY_MIN,
            ByteSize::MAX,
            why,
        );
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
        let cpus = cpus.as_ref().and_then(|c| match Cpus::new(*c.get_ref()) {
            Ok(cpus) => Some(cpus),
            Err(e) => {
                self.error(
                    &format!("{prefix}.cpus"),
                    span(c),
                    e,
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
        self.paths(raw, &paths);
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
        if let Some(i) = &raw.model_defaults.instances {
            self.error(
                "model_defaults.instances",
                span(i),
                "instances cannot be a default: each needs its own port".into(),
                Some("move `instances` into the `[models.NAME]` table of the model they run"),
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
        if raw.models.is_empty() && !self.broken.contains("models") {
            // A whole-file problem: it has no place to point at.
            self.error("models", None, "no models are configured".into(), Some("add at least one `[models.NAME]` table with a `port` (see `citadel-systemd init`)"));
        }
        models.sort_by_key(|m| m.port);
        self.ports(raw, &gateway);
        self.replica_loops(raw, &gateway);
        self.alias_collisions(raw);
        self.diags
            .extend(crate::gpu::shared_gpu_warnings(raw, &models));
        let settings = Settings {
            source: source.to_owned(),
            paths,
            service,
            gateway,
            models,
        };
        // Issue 12, item 1: replicas or an engine that needs the network keep
        // the stack in the host's network namespace; say what that costs.
        self.diags.extend(crate::network::warnings(raw, &settings));
        settings
    }

    /// Issue 9, item 13: the directories Citadel creates, chmods and purges are
    /// its own, and they do not overlap in ways that break or expose them.
    fn paths(&mut self, raw: &RawConfig, paths: &Paths) {
        let p = &raw.paths;
        self.managed_dir("paths.home", &p.home, &paths.home);
        self.managed_dir("paths.models", &p.models, &paths.models);
        self.managed_dir("paths.credentials", &p.credentials, &paths.credentials);
        let at = |v: &Option<S<String>>| v.as_ref().and_then(span);
        // Two tmpfiles.d lines for one directory with different modes: one loses.
        for (key, v, dir, other_key, other) in [
            (
                "paths.models",
                &p.models,
                &paths.models,
                "paths.home",
                &paths.home,
            ),
            (
                "paths.credentials",
                &p.credentials,
                &paths.credentials,
                "paths.home",
                &paths.home,
            ),
            (
                "paths.credentials",
                &p.credentials,
                &paths.credentials,
                "paths.models",
                &paths.models,
            ),
        ] {
            if dir == other {
                self.error(key, at(v), format!("{key} is the same directory as {other_key} (`{}`)", dir.display()), Some("each gets its own owner and mode (credentials are root-only, models readable by the service group): give each its own directory"));
            }
        }
        // Credentials are 0700 root: whatever lies inside is out of the services' reach.
        for (key, v, dir) in [
            ("paths.home", &p.home, &paths.home),
            ("paths.models", &p.models, &paths.models),
        ] {
            if dir != &paths.credentials && dir.starts_with(&paths.credentials) {
                self.error(key, at(v), format!("{key} `{}` is inside paths.credentials `{}`", dir.display(), paths.credentials.display()), Some("the credentials directory is root-only (0700), so the services could not reach anything inside it: move one of them"));
            }
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
            self.error(key, span(s), format!("`{}` is not a valid system user or group name", name.escape_debug()), Some("use lowercase letters, digits, `_` and `-`, starting with a letter (at most 31 characters)"));
        } else if name == "root" {
            self.error(
                key,
                span(s),
                "Citadel's services must not run as root".into(),
                Some("use the default `citadel` or another unprivileged account"),
            );
        } else if SYSTEM_IDENTITIES.contains(&name.as_str()) {
            self.error(
                key,
                span(s),
                format!("`{name}` is a system account or group; Citadel's services must run as a dedicated account of their own"),
                Some("sharing `nobody` or `daemon` shares their files and processes with the engines, and a privileged group (shadow, disk, sudo, adm, docker, ...) hands its powers to them: use the default `citadel`"),
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
                    format!("`{}` is not an IP address", s.get_ref().escape_debug()),
                    Some("write an address such as `127.0.0.1`, `0.0.0.0` or `::`"),
                );
                IpAddr::from([127, 0, 0, 1])
            }),
        };
        let default_port = Port::new(8000).unwrap_or_else(|_| unreachable!("8000 is a valid port"));
        let port = g
            .port
            .as_ref()
            .and_then(|p| self.port("gateway.port", p))
            .unwrap_or(default_port);
        if let (Some(p), true) = (
            &g.port,
            port.is_privileged() && ![80, 443].contains(&port.get()),
        ) {
            self.warn(
                "gateway.port",
                span(p),
                format!("gateway port {port} is privileged and not an HTTP port"),
                "the gateway then keeps CAP_NET_BIND_SERVICE to bind it; 80 and 443 are the usual privileged choices, otherwise use a port from 1024 up (the default is 8000)",
            );
        }
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
        // Issue 12, item 2: the burst is its own setting (it was the whole
        // per-minute budget, on top of the refill: 199 answers in a minute).
        let burst = match &g.rate_limit_burst {
            None => Gateway::DEFAULT_RATE_LIMIT_BURST.min(rate),
            Some(b) => self
                .count(
                    "gateway.rate_limit_burst",
                    &Some(b.clone()),
                    1,
                    i64::from(rate),
                )
                .unwrap_or(rate.min(Gateway::DEFAULT_RATE_LIMIT_BURST)),
        };
        let max_body = self
            .size(
                "gateway.max_body",
                &g.max_body,
                checks::MAX_BODY_MIN,
                checks::MAX_BODY_MAX,
                "the gateway buffers a whole request body in memory; 1M fits long chat prompts",
            )
            .unwrap_or(ByteSize(ByteSize::MIB));
        let mut cors_origins = Vec::new();
        if let Some(c) = &g.cors_origins {
            for origin in c.get_ref() {
                let o = origin.get_ref();
                if !self.text("gateway.cors_origins", origin) {
                    continue;
                }
                if o != "*"
                    && (!(o.starts_with("http://") || o.starts_with("https://"))
                        || o.contains(char::is_whitespace))
                {
                    self.error(
                        "gateway.cors_origins",
                        span(origin),
                        format!("CORS origin `{o}` must start with http:// or https:// and contain no spaces"),
                        Some("write origins such as `https://chat.example.com`"),
                    );
                }
                cors_origins.push(o.clone());
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
        // Issue 10, item 6: one connection is one file; systemd's default soft
        // limit (1024) left 2,000 concurrent clients unanswered.
        let limits = Limits {
            nofile: limits.nofile.or(Some(GATEWAY_NOFILE)),
            tasks_max: limits.tasks_max.or(Some(GATEWAY_TASKS_MAX)),
            ..limits
        };
        let api_keys_file = self.path(
            "gateway.api_keys_file",
            &g.api_keys_file,
            &paths.credentials.join("api-keys"),
        );
        // `install` writes a new key file there when there is none: its directory
        // must not be a system directory (a file in /etc/sudoers.d breaks sudo).
        if let (Some(raw), Some(dir)) = (&g.api_keys_file, api_keys_file.parent()) {
            if dir != paths.credentials {
                if let Err(e) = checks::managed_dir(dir) {
                    self.error(
                        "gateway.api_keys_file",
                        span(raw),
                        format!("the directory of api_keys_file, `{}`, {e}", dir.display()),
                        Some("`install` creates the key file when it is missing: keep it in Citadel's credentials directory, e.g. `/etc/citadel/credentials/api-keys`"),
                    );
                }
            }
        }
        let gw = Gateway {
            listen,
            port,
            auth,
            api_keys_file,
            rate_limit_per_minute: rate,
            rate_limit_burst: burst,
            max_body,
            cors_origins,
            header_timeout: self.timespan(
                "gateway.header_timeout",
                &g.header_timeout,
                Timespan::from_secs(10),
                checks::HEADER_TIMEOUT,
            ),
            request_timeout: self.timespan(
                "gateway.request_timeout",
                &g.request_timeout,
                Timespan::from_secs(600),
                checks::REQUEST_TIMEOUT,
            ),
            probe_interval: self.timespan(
                "gateway.probe_interval",
                &g.probe_interval,
                Timespan::from_secs(2),
                checks::PROBE_INTERVAL,
            ),
            drain_timeout: self.timespan(
                "gateway.drain_timeout",
                &g.drain_timeout,
                Timespan::from_secs(30),
                checks::DRAIN_TIMEOUT,
            ),
            watchdog: self.timespan(
                "gateway.watchdog",
                &g.watchdog,
                Timespan::from_secs(30),
                checks::WATCHDOG,
            ),
            // Issue 11, items 3 and 4.
            listen_backlog: self
                .count("gateway.listen_backlog", &g.listen_backlog, 16, 65_535)
                .unwrap_or(Gateway::DEFAULT_LISTEN_BACKLOG),
            first_byte_timeout: self.timespan(
                "gateway.first_byte_timeout",
                &g.first_byte_timeout,
                Timespan::from_secs(60),
                checks::FIRST_BYTE_TIMEOUT,
            ),
            outlier_failures: self
                .count("gateway.outlier_failures", &g.outlier_failures, 1, 1000)
                .unwrap_or(Gateway::DEFAULT_OUTLIER_FAILURES),
            outlier_ejection: self.timespan(
                "gateway.outlier_ejection",
                &g.outlier_ejection,
                Timespan::from_secs(10),
                checks::OUTLIER_EJECTION,
            ),
            limits,
        };
        if let (Some(raw), true) = (
            &g.first_byte_timeout,
            gw.first_byte_timeout > gw.request_timeout,
        ) {
            self.warn(
                "gateway.first_byte_timeout",
                span(raw),
                format!(
                    "first_byte_timeout ({}) is longer than request_timeout ({}): request_timeout ends the wait first",
                    gw.first_byte_timeout, gw.request_timeout
                ),
                "make first_byte_timeout shorter than request_timeout, or leave it out (1min)",
            );
        }
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
            None if self.is_broken(&k("port")) => None,
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
        let health_path = match &m.health_path {
            Some(p) => match checks::health_path(p.get_ref()) {
                Ok(()) => p.get_ref().clone(),
                Err(e) => {
                    self.error(&k("health_path"), span(p), e, Some("write e.g. `/health`"));
                    kind.default_health_path().to_owned()
                }
            },
            None => kind.default_health_path().to_owned(),
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
            checks::START_TIMEOUT,
        );
        let stop_timeout = self.timespan(
            &k("stop_timeout"),
            &m.stop_timeout,
            Timespan::from_secs(30),
            checks::STOP_TIMEOUT,
        );
        let watchdog = self.timespan(
            &k("watchdog"),
            &m.watchdog,
            Timespan::from_secs(30),
            checks::WATCHDOG,
        );
        let probe_interval = self.timespan(
            &k("probe_interval"),
            &m.probe_interval,
            Timespan::from_secs(1),
            checks::PROBE_INTERVAL,
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
        let limits = Limits {
            nofile: limits.nofile.or(Some(MODEL_NOFILE)),
            ..limits
        };
        let mut aliases = Vec::new();
        for alias in m.aliases.iter().flat_map(|a| a.get_ref()) {
            if !self.text(&k("aliases"), alias) {
                continue;
            }
            let a = alias.get_ref();
            if a.is_empty() || a.contains(char::is_whitespace) {
                self.error(
                    &k("aliases"),
                    span(alias),
                    format!("alias `{a}` is empty or contains whitespace"),
                    Some("an alias is a model name clients send, e.g. `gpt-4`"),
                );
                continue;
            }
            if a.eq_ignore_ascii_case("unknown") {
                self.error(
                    &k("aliases"),
                    span(alias),
                    format!("alias `{a}` is reserved"),
                    Some("`unknown` is the gateway's metrics label for requests naming a model it does not serve; choose another alias"),
                );
                continue;
            }
            if aliases.contains(a) {
                self.warn(
                    &k("aliases"),
                    span(alias),
                    format!("alias `{a}` is listed twice"),
                    "remove the second one",
                );
                continue;
            }
            aliases.push(a.clone());
            self.aliases.push((name.get_ref().clone(), alias.clone()));
        }
        let mut replicas = Vec::new();
        for url in m.replicas.iter().flat_map(|r| r.get_ref()) {
            if !valid_upstream(url.get_ref()) {
                self.error(
                    &k("replicas"),
                    span(url),
                    format!(
                        "replica `{}` is not an upstream URL",
                        url.get_ref().escape_debug()
                    ),
                    Some("write `http://HOST:PORT`, e.g. `http://10.0.0.12:11400`"),
                );
            }
            replicas.push(url.get_ref().clone());
        }
        let instances = self.instances(&k("instances"), m, &gpus);
        let mut args = Vec::new();
        for arg in m.args.iter().flat_map(|a| a.get_ref()) {
            self.text(&k("args"), arg);
            args.push(arg.get_ref().clone());
        }
        Some(Model {
            name: name_ok?,
            port: port?,
            engine: engine?,
            args,
            env,
            credentials,
            gpus,
            aliases,
            replicas,
            instances,
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
                Some(s) if !s.get_ref().trim().is_empty() => {
                    v.text(&k("model"), s);
                    Some(s.get_ref().clone())
                }
                _ if v.is_broken(&k("model")) => None,
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
                if let Some(s) = &m.model {
                    if let Err(e) = checks::path(s.get_ref()) {
                        self.error(
                            &k("model"),
                            span(s),
                            format!("`{}` {e}", s.get_ref().escape_debug()),
                            Some("llama-server loads a GGUF file: give its full path"),
                        );
                    }
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
                let argv = match m.command.as_ref().map(|c| c.get_ref().as_slice()) {
                    Some([program, rest @ ..]) => {
                        if let Err(e) = checks::path(program.get_ref()) {
                            self.error(&k("command"), span(program), format!("the program `{}` {e}", program.get_ref().escape_debug()), Some("systemd runs engines without a shell or PATH search: give the full path"));
                        }
                        for word in rest {
                            self.text(&k("command"), word);
                        }
                        Some(
                            m.command
                                .iter()
                                .flat_map(|c| c.get_ref())
                                .map(|w| w.get_ref().clone())
                                .collect(),
                        )
                    }
                    _ if self.is_broken(&k("command")) => None,
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

    fn env(&mut self, key: &str, v: &Option<S<StrMap>>) -> BTreeMap<String, String> {
        let Some(env) = v else { return BTreeMap::new() };
        let mut out = BTreeMap::new();
        for (name_s, value_s) in env.get_ref() {
            let (name, value) = (name_s.get_ref(), value_s.get_ref());
            if let Err(e) = checks::env_name(name) {
                self.error(key, span(name_s), e, None);
            }
            if let Err(e) = checks::no_control(value) {
                self.error(
                    key,
                    span(value_s),
                    format!("the value of `{}` {e}", name.escape_debug()),
                    Some("environment values are written into the unit as `Environment=` lines: keep them on one line"),
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
                self.error(key, span(name_s), format!("`{name}` looks like a secret; secrets never go into unit files"), Some("put the secret in a file under /etc/citadel/credentials and add it as a credential: `credentials = { hf-token = \"/etc/citadel/credentials/hf-token\" }` (the engine reads it from $CREDENTIALS_DIRECTORY)"));
            }
            out.insert(name.clone(), value.clone());
        }
        out
    }

    fn credentials(&mut self, key: &str, v: &Option<S<StrMap>>) -> BTreeMap<String, PathBuf> {
        let Some(c) = v else { return BTreeMap::new() };
        let mut out = BTreeMap::new();
        for (name_s, path_s) in c.get_ref() {
            let (name, path) = (name_s.get_ref(), path_s.get_ref());
            if let Err(e) = checks::credential_name(name) {
                self.error(key, span(name_s), e, None);
            }
            if let Err(e) = checks::path(path) {
                self.error(
                    key,
                    span(path_s),
                    format!("credential `{}`: `{}` {e}", name.escape_debug(), path.escape_debug()),
                    Some("give the full path of the host file systemd loads (LoadCredential=NAME:PATH)"),
                );
            }
            out.insert(name.clone(), PathBuf::from(path));
        }
        out
    }

    /// Issue 15, item 1: further local instances, each with its own port (checked
    /// with every other port in `ports`) and its GPUs (the model's when not given).
    fn instances(&mut self, key: &str, m: &RawModel, model_gpus: &[GpuRef]) -> Vec<Instance> {
        let Some(list) = &m.instances else {
            return Vec::new();
        };
        if list.get_ref().len() + 1 > MAX_INSTANCES {
            self.error(
                key,
                span(list),
                format!(
                    "{} instances: a model may run at most {MAX_INSTANCES} local instances, its own included",
                    list.get_ref().len() + 1
                ),
                Some("balance further engines as `replicas`, or split the model"),
            );
        }
        let mut out = Vec::new();
        for (i, inst) in list.get_ref().iter().enumerate() {
            let n = i + 2;
            let port_key = format!("{key}.port");
            let port = match &inst.get_ref().port {
                Some(p) => self.port(&port_key, p),
                None => {
                    self.error(
                        &port_key,
                        span(inst),
                        format!("instance {n} has no port"),
                        Some("add `port = 11404` (each instance needs its own port)"),
                    );
                    None
                }
            };
            let gpus = match &inst.get_ref().gpus {
                Some(_) => self.gpus(&format!("{key}.gpus"), &inst.get_ref().gpus),
                None => model_gpus.to_vec(),
            };
            if let Some(port) = port {
                out.push(Instance { port, gpus });
            }
        }
        out
    }

    /// Issue 10, item 5: `gpus` entries are indexes, GPU UUIDs or MIG UUIDs,
    /// each checked for its format; one listed twice is refused.
    fn gpus(&mut self, key: &str, v: &Option<S<Vec<S<RawGpu>>>>) -> Vec<GpuRef> {
        let Some(g) = v else { return Vec::new() };
        let mut out: Vec<GpuRef> = Vec::new();
        for entry in g.get_ref() {
            match crate::gpu::from_raw(entry.get_ref()) {
                Err(e) => self.error(key, span(entry), e, Some(GpuRef::HELP)),
                Ok(r) if out.contains(&r) => self.error(
                    key,
                    span(entry),
                    format!("{r} is listed twice"),
                    Some("list each GPU once"),
                ),
                Ok(r) => out.push(r),
            }
        }
        if out.len() > 1 && out.iter().any(GpuRef::is_mig) {
            self.warn(
                key,
                span(g),
                "a MIG device is listed with other devices, but CUDA uses only one MIG device per process".into(),
                "give a model one MIG device, or whole GPUs",
            );
        }
        out
    }

    /// Issue 9, item 5: an alias names exactly one model. Two models sharing an
    /// alias, or an alias equal to another model's name, would route a client's
    /// requests to whichever the gateway happened to find first.
    fn alias_collisions(&mut self, raw: &RawConfig) {
        let names: Vec<&String> = raw.models.keys().map(|n| n.get_ref()).collect();
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        let aliases = std::mem::take(&mut self.aliases);
        for (model, alias) in &aliases {
            let key = format!("models.{model}.aliases");
            let a = alias.get_ref().as_str();
            if a == model {
                self.warn(
                    &key,
                    span(alias),
                    format!("alias `{a}` of model `{model}` is its own name"),
                    "a model is always reachable by its name; remove the alias",
                );
            } else if names.iter().any(|n| n.as_str() == a) {
                self.error(
                    &key,
                    span(alias),
                    format!("alias `{a}` of model `{model}` is the name of model `{a}`"),
                    Some("a name may route to one model only: rename the alias or the model"),
                );
            } else if let Some(other) = seen.insert(a, model) {
                self.error(&key, span(alias), format!("alias `{a}` of model `{model}` is also an alias of model `{other}`"), Some("a name may route to one model only: give each model its own aliases (use `replicas` to balance one model over several engines)"));
            }
        }
    }

    /// Issue 12, item 3: a replica that is the gateway itself (by its text:
    /// loopback or the listen address, with the gateway's port) is a loop.
    fn replica_loops(&mut self, raw: &RawConfig, gateway: &Gateway) {
        let tables = std::iter::once(("model_defaults".to_owned(), &raw.model_defaults)).chain(
            raw.models
                .iter()
                .map(|(n, m)| (format!("models.{}", n.get_ref()), m.get_ref())),
        );
        for (prefix, m) in tables {
            for url in m.replicas.iter().flat_map(|r| r.get_ref()) {
                self.replica_ipv4_spelling(&prefix, url);
                if crate::upstream::points_at_gateway(
                    url.get_ref(),
                    gateway.listen,
                    gateway.port.get(),
                ) {
                    self.error(
                        &format!("{prefix}.replicas"),
                        span(url),
                        format!(
                            "replica `{}` is the gateway itself ({}:{}): every request would be forwarded back to the gateway",
                            url.get_ref().escape_debug(),
                            gateway.listen,
                            gateway.port
                        ),
                        Some("a replica is another engine serving the same model, e.g. `http://10.0.0.12:11400`; the model's own engine is already a backend"),
                    );
                }
            }
        }
    }

    /// A replica's IPv4 address must be a canonical dotted quad: resolvers
    /// read `127.1` or `2130706433` as 127.0.0.1, which hid loops.
    fn replica_ipv4_spelling(&mut self, prefix: &str, url: &S<String>) {
        use crate::upstream::{ipv4_spelling, Ipv4Spelling};
        let text = url.get_ref();
        let (message, help) = match ipv4_spelling(text) {
            Ipv4Spelling::Fine => return,
            Ipv4Spelling::Means(ip) => (
                format!(
                    "replica `{}` writes the IPv4 address {ip} other than as a dotted quad",
                    text.escape_debug()
                ),
                format!("write the address as a dotted quad of four decimal numbers: `{ip}`"),
            ),
            Ipv4Spelling::Invalid => (
                format!(
                    "replica `{}` has a numeric host that is no IPv4 address",
                    text.escape_debug()
                ),
                "write the address as a dotted quad of four decimal numbers from 0 to 255, e.g. `10.0.0.12`".to_owned(),
            ),
        };
        self.error(
            &format!("{prefix}.replicas"),
            span(url),
            message,
            Some(&help),
        );
    }

    fn ports(&mut self, raw: &RawConfig, gateway: &Gateway) {
        let mut used: BTreeMap<u16, String> = BTreeMap::new();
        for (name, m) in &raw.models {
            // The model's own port (instance 1), then its further instances'.
            let own = m.get_ref().port.as_ref().map(|p| {
                (
                    format!("models.{}.port", name.get_ref()),
                    format!("model `{}`", name.get_ref()),
                    p,
                )
            });
            let further = m
                .get_ref()
                .instances
                .iter()
                .flat_map(|l| l.get_ref().iter())
                .enumerate()
                .filter_map(|(i, inst)| {
                    inst.get_ref().port.as_ref().map(|p| {
                        (
                            format!("models.{}.instances.port", name.get_ref()),
                            format!("instance `{}{INSTANCE_SEPARATOR}{}`", name.get_ref(), i + 2),
                            p,
                        )
                    })
                });
            for (key, owner, p) in own.into_iter().chain(further) {
                self.port_in_use(&key, &owner, p, gateway, &mut used);
            }
        }
    }

    fn port_in_use(
        &mut self,
        key: &str,
        owner: &str,
        p: &S<i64>,
        gateway: &Gateway,
        used: &mut BTreeMap<u16, String>,
    ) {
        {
            let Ok(port) = Port::new(*p.get_ref()) else {
                return;
            };
            let key = key.to_owned();
            if port == gateway.port {
                self.error(
                    &key,
                    span(p),
                    format!("port {port} is the gateway's port"),
                    Some("model engines need ports of their own; the spec uses 11400-11403"),
                );
            }
            if port.get() < checks::MODEL_PORT_MIN {
                self.error(&key, span(p), format!("port {port} is privileged"), Some("model engines run without capabilities; use a port from 1024 up (e.g. 11400)"));
            }
            if let Some(other) = used.insert(port.get(), owner.to_owned()) {
                self.error(
                    &key,
                    span(p),
                    format!("port {port} is already used by {other}"),
                    Some("give every model and every instance its own port"),
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

/// `http://HOST:PORT[/]`, HOST a name, an IPv4 address or a bracketed IPv6 one.
fn valid_upstream(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let host_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']');
    match rest.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && host.chars().all(host_char)
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
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
