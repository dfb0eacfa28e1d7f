//! Stage 3: validated settings. Every value here has been checked; the types
//! say what was checked (a `ModelName` is a valid systemd instance name, a
//! `Port` is non-zero, sizes and spans are parsed).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::engine::{Engine, ReadyCheck};
use crate::units::{ByteSize, Cpus, SizeLimit, Timespan};

/// A model's name: also its systemd instance name (`citadel-model@NAME.service`),
/// its served model name and its journal field value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelName(String);

impl ModelName {
    /// Names the CLI uses for the gateway; a model may not take them.
    pub const RESERVED: &'static [&'static str] = &["gateway", "api-gateway", "all", "citadel"];

    /// Checks the name: 1-64 characters from `a-z A-Z 0-9 _ . -`, starting with
    /// a letter or digit (a valid systemd instance name that needs no escaping).
    pub fn new(name: &str) -> Result<ModelName, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if name.is_empty() || name.len() > 64 {
            return Err(format!(
                "model name `{name}` must be 1 to 64 characters long"
            ));
        }
        if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "model name `{name}` is not a valid systemd instance name; use letters, digits, `-`, `_` and `.`, starting with a letter or digit"
            ));
        }
        if Self::RESERVED.contains(&name) {
            return Err(format!("model name `{name}` is reserved for the gateway or the whole stack; choose another name"));
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
                "port {port} is out of range; use a number from 1024 to 65535"
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
    pub rate_limit_per_minute: u32,
    pub max_body: ByteSize,
    pub cors_origins: Vec<String>,
    pub header_timeout: Timespan,
    pub request_timeout: Timespan,
    pub probe_interval: Timespan,
    pub drain_timeout: Timespan,
    pub watchdog: Timespan,
    pub limits: Limits,
}

impl Gateway {
    /// Name of the systemd credential holding the API keys.
    pub const API_KEYS_CREDENTIAL: &'static str = "api-keys";
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
    /// GPU indexes this model may use (devices and CUDA_VISIBLE_DEVICES).
    pub gpus: Vec<u32>,
    /// Other names clients may use for this model at the gateway.
    pub aliases: Vec<String>,
    /// Further upstreams serving the same model (`http://host:port`), balanced by the gateway.
    pub replicas: Vec<String>,
    pub health_path: String,
    pub ready_check: ReadyCheck,
    pub start_timeout: Timespan,
    pub stop_timeout: Timespan,
    pub watchdog: Timespan,
    pub probe_interval: Timespan,
    pub limits: Limits,
}

impl Model {
    /// `citadel-model@NAME.service`.
    pub fn unit_name(&self) -> String {
        format!("citadel-model@{}.service", self.name)
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
    pub const MODEL_TEMPLATE: &str = "citadel-model@.service";
}

pub(crate) fn is_absolute_clean(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
}
