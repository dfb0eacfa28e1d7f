//! Stage 3: validated settings. Every value here has been checked; the types
//! say what was checked (a `ModelName` is a valid systemd instance name, a
//! `Port` is non-zero, sizes and spans are parsed).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::engine::{Engine, ReadyCheck};
use crate::gpu::GpuRef;
use crate::units::{ByteSize, Cpus, SizeLimit, Timespan};

/// A model's name: also its systemd instance name (`citadel-model@NAME.service`),
/// its served model name and its journal field value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelName(String);

impl ModelName {
    /// Names a model may not take (compared without regard to case), and why.
    pub const RESERVED: &'static [&'static str] = &[
        "gateway",
        "api-gateway",
        "all",
        "citadel",
        "failure",
        "unknown",
    ];

    /// Why each [`ModelName::RESERVED`] name is reserved.
    pub const RESERVED_BECAUSE: &'static [(&'static str, &'static str)] = &[
        ("gateway", "the CLI's SERVICE name for citadel-gateway.service, and its journal field CITADEL_SERVICE=gateway"),
        ("api-gateway", "the CLI's other SERVICE name for the gateway"),
        ("all", "reserved for the CLI's \"every service\""),
        ("citadel", "the stack's own name (citadel.target, the citadel user and group)"),
        ("failure", "the failure-report unit citadel-failure@.service and its journal field CITADEL_SERVICE=failure"),
        ("unknown", "the gateway's metrics label for requests naming a model it does not serve"),
    ];

    /// Unit type suffixes: a model named `x.service` or `citadel.target` would
    /// make the CLI's SERVICE argument ambiguous (it also accepts unit names).
    pub const UNIT_SUFFIXES: &'static [&'static str] = &[
        ".service",
        ".target",
        ".socket",
        ".timer",
        ".slice",
        ".scope",
        ".mount",
        ".path",
        ".device",
        ".swap",
        ".automount",
    ];

    /// Checks the name: 1-64 characters from `a-z A-Z 0-9 _ . -`, starting with
    /// a letter or digit (a valid systemd instance name that needs no escaping),
    /// not reserved ([`ModelName::RESERVED`], any case), not a unit name
    /// ([`ModelName::UNIT_SUFFIXES`]) and not `citadel-...` (Citadel's own units).
    pub fn new(name: &str) -> Result<ModelName, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        let shown = name.escape_debug();
        if name.is_empty() || name.len() > 64 {
            return Err(format!(
                "model name `{shown}` must be 1 to 64 characters long"
            ));
        }
        if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "model name `{shown}` is not a valid systemd instance name; use letters, digits, `-`, `_` and `.`, starting with a letter or digit"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if let Some((_, why)) = Self::RESERVED_BECAUSE.iter().find(|(r, _)| *r == lower) {
            return Err(format!(
                "model name `{name}` is reserved ({why}); choose another name"
            ));
        }
        if let Some(suffix) = Self::UNIT_SUFFIXES.iter().find(|s| lower.ends_with(*s)) {
            return Err(format!("model name `{name}` ends in `{suffix}` and looks like a unit name, which would make SERVICE arguments of the CLI ambiguous; choose another name"));
        }
        if lower.starts_with("citadel-") {
            return Err(format!("model name `{name}` starts with `citadel-`, the prefix of Citadel's own units (citadel-gateway, citadel-failure@...), which would make SERVICE arguments of the CLI ambiguous; choose another name"));
        }
        Ok(ModelName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A TCP port, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    pub fn new(port: i64) -> Result<Port, String> {
        match u16::try_from(port) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(format!(
                "port {port} is out of range; use a number from 1 to 65535 (1024 and up for the engines, which bind without capabilities)"
            )),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }

    pub fn is_privileged(self) -> bool {
        self.0 < 1024
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The whole validated stack.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The file this came from (named in rendered headers and error messages).
    pub source: PathBuf,
    pub paths: Paths,
    pub service: ServiceIdentity,
    pub gateway: Gateway,
    /// Models ordered by port.
    pub models: Vec<Model>,
}

impl Settings {
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.name.as_str() == name)
    }

    /// A local instance by its instance name (`phi3` or `phi3:2`, see
    /// [`Model::instance_name`]): the model it belongs to, its number and the
    /// model as that instance runs it ([`Model::local_instances`]).
    pub fn instance(&self, name: &str) -> Option<(&Model, usize, Model)> {
        let (model, n) = match name.split_once(INSTANCE_SEPARATOR) {
            None => (name, 1),
            Some((model, n)) => {
                // Only the canonical spelling: `phi3:02` or `phi3:1` are not names.
                let n: usize = n.parse().ok().filter(|n: &usize| *n >= 2)?;
                (model, n)
            }
        };
        if name.contains(INSTANCE_SEPARATOR) && self.model(model)?.instance_name(n) != name {
            return None;
        }
        let m = self.model(model)?;
        let (_, inst) = m.local_instances().into_iter().find(|(i, _)| *i == n)?;
        Some((m, n, inst))
    }

    /// The directories Citadel creates (tmpfiles.d `d` lines, which also chmod
    /// and chown an existing directory) and that `uninstall --purge` may remove,
    /// parents before children. Validation guarantees that none is a system
    /// directory, an ancestor of one or inside one (see `managed_dir` in the
    /// config's checks); whether one already existed before Citadel's install
    /// is for the installer to find out.
    pub fn managed_dirs(&self) -> Vec<PathBuf> {
        let p = &self.paths;
        vec![
            p.home.clone(),
            p.bin(),
            p.config_dir(),
            p.systemd_dir(),
            p.models.clone(),
            p.credentials.clone(),
            PathBuf::from(Paths::STATE_DIR),
            PathBuf::from(Paths::CACHE_DIR),
        ]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    /// Citadel's home, `/opt/citadel`.
    pub home: PathBuf,
    /// Model weights, `/opt/citadel/models`.
    pub models: PathBuf,
    /// Host files that systemd loads as credentials, `/etc/citadel/credentials`.
    pub credentials: PathBuf,
}

impl Paths {
    /// The services' state directory (the `citadel` user's home in sysusers.d).
    pub const STATE_DIR: &'static str = "/var/lib/citadel";
    /// The services' cache directory.
    pub const CACHE_DIR: &'static str = "/var/cache/citadel";

    pub fn bin(&self) -> PathBuf {
        self.home.join("bin")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.home.join("config")
    }
    /// Where rendered units are kept: `/opt/citadel/config/systemd`.
    pub fn systemd_dir(&self) -> PathBuf {
        self.config_dir().join("systemd")
    }
    pub fn env(&self) -> PathBuf {
        self.home.join("env")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIdentity {
    pub user: String,
    pub group: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub listen: IpAddr,
    pub port: Port,
    /// Require an API key (`Authorization: Bearer KEY`).
    pub auth: bool,
    /// Host file loaded as the `api-keys` credential (one key per line).
    pub api_keys_file: PathBuf,
    /// At most this many requests in any 60 s window per API key.
    pub rate_limit_per_minute: u32,
    /// How many of them may come at once (1 to `rate_limit_per_minute`); the
    /// rest are spread so that no 60 s window holds more than the limit.
    pub rate_limit_burst: u32,
    pub max_body: ByteSize,
    pub cors_origins: Vec<String>,
    pub header_timeout: Timespan,
    pub request_timeout: Timespan,
    pub probe_interval: Timespan,
    pub drain_timeout: Timespan,
    pub watchdog: Timespan,
    /// The listening socket's backlog (`listen(2)`, `Backlog=` of
    /// `citadel-gateway.socket`): connections the kernel queues until the
    /// gateway accepts them, during a burst or a restart (issue 11, item 3).
    pub listen_backlog: u32,
    /// How long a streamed request may wait for the engine's response head;
    /// a non-streamed one waits up to `request_timeout` (engines answer it
    /// only when generation ends). Either is cut short, and retried on
    /// another backend, when its backend is found down (issue 11, item 4).
    pub first_byte_timeout: Timespan,
    /// Consecutive failures (5xx answers, timeouts, broken connections) that
    /// eject a backend although its health check passes (issue 11, item 4).
    pub outlier_failures: u32,
    /// How long the first ejection lasts; each further one in a row doubles
    /// it, up to [`Gateway::MAX_EJECTION`] (or this, when longer).
    pub outlier_ejection: Timespan,
    pub limits: Limits,
}

impl Gateway {
    /// `listen_backlog` when the config sets none: nginx's `listen ... backlog`
    /// default is 511; Linux caps the value at `net.core.somaxconn` (4096).
    pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
    /// `outlier_failures` when the config sets none (Envoy's `consecutive_5xx`).
    pub const DEFAULT_OUTLIER_FAILURES: u32 = 5;
    /// The longest an ejection lasts, unless `outlier_ejection` is longer.
    pub const MAX_EJECTION: Timespan = Timespan(std::time::Duration::from_secs(300));
    /// Name of the systemd credential holding the API keys.
    pub const API_KEYS_CREDENTIAL: &'static str = "api-keys";
    /// `rate_limit_burst` when the config sets none (at most
    /// `rate_limit_per_minute`).
    pub const DEFAULT_RATE_LIMIT_BURST: u32 = 10;
}

/// Resource limits rendered into a unit (as literal values).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory_max: Option<ByteSize>,
    pub memory_high: Option<ByteSize>,
    pub cpus: Option<Cpus>,
    pub tasks_max: Option<u32>,
    pub nofile: Option<u32>,
    pub memlock: Option<SizeLimit>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub name: ModelName,
    /// The engine's port on loopback; the gateway is the public face.
    pub port: Port,
    pub engine: Engine,
    /// Extra engine arguments, appended to the profile's.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// systemd credentials: name -> host file (LoadCredential=NAME:PATH).
    pub credentials: BTreeMap<String, PathBuf>,
    /// The GPUs this model may use, as configured (indexes, GPU or MIG UUIDs;
    /// no duplicates). The CLI resolves them on the host into device minors
    /// and UUIDs for the unit (`citadel_render::Host`).
    pub gpus: Vec<GpuRef>,
    /// Other names clients may use for this model at the gateway.
    pub aliases: Vec<String>,
    /// Further upstreams serving the same model (`http://host:port`), balanced by the gateway.
    pub replicas: Vec<String>,
    /// Further local instances of this model (issue 15), numbered from 2: the
    /// model's own `port` and `gpus` are instance 1 (`citadel-model@NAME.service`),
    /// `instances[i]` is instance `i + 2` (`citadel-model@NAME:N.service`).
    pub instances: Vec<Instance>,
    pub health_path: String,
    pub ready_check: ReadyCheck,
    pub start_timeout: Timespan,
    pub stop_timeout: Timespan,
    pub watchdog: Timespan,
    pub probe_interval: Timespan,
    pub limits: Limits,
}

/// A further local instance of a model: its own port and GPUs, everything
/// else as the model's.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub port: Port,
    pub gpus: Vec<GpuRef>,
}

/// The separator of a model's name and an instance number in instance names
/// (`phi3:2`): not a character model names may contain, so an instance name
/// never reads as a model name; valid in systemd instance names.
pub const INSTANCE_SEPARATOR: char = ':';

/// The most local instances one model may have (its own included).
pub const MAX_INSTANCES: usize = 16;

impl Model {
    /// `citadel-model@NAME.service` (instance 1).
    pub fn unit_name(&self) -> String {
        format!("citadel-model@{}.service", self.name)
    }

    /// How many local instances this model runs (at least 1).
    pub fn instance_count(&self) -> usize {
        1 + self.instances.len()
    }

    /// The instance name of local instance `n` (1-based): `NAME` for 1,
    /// `NAME:N` after it. It is the unit's instance (`%i`) and what
    /// `citadel-model run` takes.
    pub fn instance_name(&self, n: usize) -> String {
        if n <= 1 {
            self.name.to_string()
        } else {
            format!("{}{INSTANCE_SEPARATOR}{n}", self.name)
        }
    }

    /// The unit of local instance `n` (1-based).
    pub fn instance_unit(&self, n: usize) -> String {
        format!("citadel-model@{}.service", self.instance_name(n))
    }

    /// Every local instance as a model of its own: instance 1 is `self`,
    /// instance `n` is `self` with that instance's port and GPUs and no further
    /// instances. Numbers are 1-based, in order.
    pub fn local_instances(&self) -> Vec<(usize, Model)> {
        let mut first = self.clone();
        first.instances = Vec::new();
        let mut out = vec![(1, first.clone())];
        for (i, inst) in self.instances.iter().enumerate() {
            let mut m = first.clone();
            m.port = inst.port;
            m.gpus = inst.gpus.clone();
            out.push((i + 2, m));
        }
        out
    }

    /// The ports of every local instance, instance 1 first.
    pub fn ports(&self) -> Vec<Port> {
        std::iter::once(self.port)
            .chain(self.instances.iter().map(|i| i.port))
            .collect()
    }

    /// The base URLs of every local instance, instance 1 first.
    pub fn local_urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect()
    }

    /// The engine's own base URL (on loopback).
    pub fn local_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Unit names that do not depend on the config.
pub mod units {
    pub const TARGET: &str = "citadel.target";
    pub const GATEWAY: &str = "citadel-gateway.service";
    /// The gateway's public listening socket, made by PID 1 in the host's
    /// network namespace and handed to the gateway (socket activation).
    pub const GATEWAY_SOCKET: &str = "citadel-gateway.socket";
    /// The gateway's admin channel (issue 15: drain, admit, temporary
    /// backends): a root-only Unix socket at [`ADMIN_SOCKET_PATH`].
    pub const GATEWAY_ADMIN_SOCKET: &str = "citadel-gateway-admin.socket";
    /// Where `citadel-gateway-admin.socket` listens.
    pub const ADMIN_SOCKET_PATH: &str = "/run/citadel-gateway-admin.sock";
    /// Makes and removes Citadel's private network namespace
    /// ([`crate::network::NETNS_PATH`]), which the gateway and the models join.
    pub const NETNS: &str = "citadel-netns.service";
    pub const MODEL_TEMPLATE: &str = "citadel-model@.service";
}

pub(crate) fn is_absolute_clean(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}
