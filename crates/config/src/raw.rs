//! Stage 1: the file as written. Every value keeps its byte span so that
//! validation can point at the exact line and column. Types are deliberately
//! loose (integers as i64, sizes as strings): range and format checks happen in
//! validation, where all problems are collected instead of stopping at the first.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub paths: RawPaths,
    #[serde(default)]
    pub service: RawService,
    #[serde(default)]
    pub gateway: RawGateway,
    /// Settings every model inherits unless it sets them itself.
    #[serde(default)]
    pub model_defaults: RawModel,
    #[serde(default)]
    pub models: BTreeMap<S<String>, S<RawModel>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    pub home: Option<S<String>>,
    pub models: Option<S<String>>,
    pub credentials: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub user: Option<S<String>>,
    pub group: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub listen: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub auth: Option<S<bool>>,
    pub api_keys_file: Option<S<String>>,
    pub rate_limit_per_minute: Option<S<i64>>,
    pub max_body: Option<S<String>>,
    pub cors_origins: Option<S<Vec<String>>>,
    pub header_timeout: Option<S<String>>,
    pub request_timeout: Option<S<String>>,
    pub probe_interval: Option<S<String>>,
    pub drain_timeout: Option<S<String>>,
    pub watchdog: Option<S<String>>,
    pub memory_max: Option<S<String>>,
    pub memory_high: Option<S<String>>,
    pub cpus: Option<S<f64>>,
    pub tasks_max: Option<S<i64>>,
    pub nofile: Option<S<i64>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub port: Option<S<i64>>,
    pub engine: Option<S<String>>,
    pub model: Option<S<String>>,
    pub args: Option<S<Vec<String>>>,
    pub env: Option<S<BTreeMap<String, String>>>,
    pub credentials: Option<S<BTreeMap<String, String>>>,
    pub gpus: Option<S<Vec<i64>>>,
    pub aliases: Option<S<Vec<String>>>,
    pub replicas: Option<S<Vec<String>>>,
    // engine programs
    pub python: Option<S<String>>,
    pub binary: Option<S<String>>,
    pub command: Option<S<Vec<String>>>,
    // engine knobs
    pub max_model_len: Option<S<i64>>,
    pub gpu_memory_utilization: Option<S<f64>>,
    pub parallel: Option<S<i64>>,
    pub health_path: Option<S<String>>,
    pub ready_check: Option<S<String>>,
    // lifecycle
    pub start_timeout: Option<S<String>>,
    pub stop_timeout: Option<S<String>>,
    pub watchdog: Option<S<String>>,
    pub probe_interval: Option<S<String>>,
    // resource limits
    pub memory_max: Option<S<String>>,
    pub memory_high: Option<S<String>>,
    pub cpus: Option<S<f64>>,
    pub tasks_max: Option<S<i64>>,
    pub nofile: Option<S<i64>>,
    pub memlock: Option<S<String>>,
}

impl RawModel {
    /// Stage 2: a model's own settings over `[model_defaults]`.
    pub fn merged_over(&self, defaults: &RawModel) -> RawModel {
        macro_rules! pick {
            ($($field:ident),* $(,)?) => {
                RawModel { $($field: self.$field.clone().or_else(|| defaults.$field.clone()),)* }
            };
        }
        let mut merged = pick!(
            port,
            engine,
            model,
            args,
            env,
            credentials,
            gpus,
            aliases,
            replicas,
            python,
            binary,
            command,
            max_model_len,
            gpu_memory_utilization,
            parallel,
            health_path,
            ready_check,
            start_timeout,
            stop_timeout,
            watchdog,
            probe_interval,
            memory_max,
            memory_high,
            cpus,
            tasks_max,
            nofile,
            memlock,
        );
        // Environment tables merge key by key; the model's own values win.
        if let (Some(own), Some(base)) = (&self.env, &defaults.env) {
            let mut env = base.get_ref().clone();
            env.extend(own.get_ref().clone());
            merged.env = Some(Spanned::new(own.span(), env));
        }
        merged
    }
}
