//! Citadel's stack description.
//!
//! `citadel.toml` is loaded in three stages:
//! 1. [`raw`]: the TOML as written, read against the schema by hand (every
//!    unknown key and wrong type is a diagnostic, not the end), every value with its span;
//! 2. merged: each `[models.NAME]` over `[model_defaults]`;
//! 3. [`Settings`]: validated, typed values (newtypes such as [`ModelName`] and [`Port`]).
//!
//! Validation collects every problem it finds, each with file, line, column and
//! a hint, instead of stopping at the first. Nothing here reads global state:
//! host facts for warnings are passed in ([`HostFacts`]).

mod checks;
mod diag;
mod engine;
pub mod gpu;
mod host;
pub mod network;
pub mod raw;
mod settings;
pub mod units;
pub mod upstream;
mod validate;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Report, Severity};
pub use engine::{Engine, EngineKind, ReadyCheck};
pub use gpu::GpuRef;
pub use host::{check_host, HostFacts};
pub use network::{EngineNetwork, HostNetworkReason};
pub use settings::{
    units as unit_names, Gateway, Instance, Limits, Model, ModelName, Paths, Port, ServiceIdentity,
    Settings, INSTANCE_SEPARATOR, MAX_INSTANCES,
};

/// Where `citadel.toml` lives unless `--config` or `CITADEL_CONFIG` say otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/opt/citadel/config/citadel.toml";

/// The commented example config: the spec's stack (mixtral, hermes, openchat and
/// phi3 on 11400-11403 under vLLM, the gateway on 8000).
pub const EXAMPLE_CONFIG: &str = include_str!("../citadel.example.toml");

/// The same stack served by engine simulators: runs on any machine.
pub const SIM_EXAMPLE_CONFIG: &str = include_str!("../citadel.sim.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config has errors; the report lists all of them (and any warnings).
    #[error("{0}")]
    Invalid(Report),
}

/// A validated config and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    /// Warnings only (errors make loading fail).
    pub report: Report,
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Validates config text; `source` names the file in messages and rendered headers.
///
/// Never panics, whatever the text. Every diagnostic has a place in the file
/// (a span) except the whole-file ones: "no models are configured" (the problem
/// is something missing, and there is nowhere to point).
pub fn parse(text: &str, source: &Path) -> Result<Loaded, ConfigError> {
    let (raw, read_diags) = match raw::read(text) {
        Ok(read) => read,
        Err(d) => return Err(ConfigError::Invalid(Report::new(source, text, vec![d]))),
    };
    let broken = read_diags
        .iter()
        .filter(|d| d.message.starts_with("invalid type"))
        .map(|d| d.key.clone())
        .collect();
    let mut v = validate::Validator::new(broken);
    let settings = v.settings(&raw, source);
    let mut diags = read_diags;
    diags.append(&mut v.diags);
    let report = Report::new(source, text, diags);
    if report.has_errors() {
        return Err(ConfigError::Invalid(report));
    }
    Ok(Loaded { settings, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_is_valid() {
        let loaded = parse(EXAMPLE_CONFIG, Path::new("citadel.toml")).unwrap();
        let names: Vec<_> = loaded
            .settings
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.port.get()))
            .collect();
        assert_eq!(
            names,
            [
                ("mixtral", 11400),
                ("hermes", 11401),
                ("openchat", 11402),
                ("phi3", 11403)
            ]
        );
        assert_eq!(loaded.settings.gateway.port.get(), 8000);
        assert_eq!(loaded.settings.gateway.rate_limit_per_minute, 100);
        assert!(loaded.report.is_empty(), "{}", loaded.report);
    }

    #[test]
    fn sim_example_config_is_valid() {
        let loaded = parse(SIM_EXAMPLE_CONFIG, Path::new("citadel.toml")).unwrap();
        assert_eq!(loaded.settings.models.len(), 4);
        assert!(loaded
            .settings
            .models
            .iter()
            .all(|m| m.engine.kind() == EngineKind::Sim));
        assert!(loaded.report.is_empty(), "{}", loaded.report);
    }
}
