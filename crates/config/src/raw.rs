//! Stage 1: the file as written. Every value keeps its byte span so that
//! validation can point at the exact line and column. Types are deliberately
//! loose (integers as i64, sizes as strings): range and format checks happen in
//! validation, where all problems are collected instead of stopping at the first.
//!
//! The text is parsed with `toml_edit` (which keeps spans) and read against the
//! schema below by hand rather than by serde: serde stops at the first unknown
//! key or wrong type, which hid every other problem of the file (issue 9, item 6).
//! Here an unknown key (with a "did you mean" hint) or a value of the wrong type
//! is one diagnostic with its key path and place, the value is left out, and
//! reading goes on, so validation still reports everything else. The schema is
//! as strict as serde's `deny_unknown_fields` was: any key not listed is an error.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;
use toml_edit::{Item, TableLike, Value};

use crate::diag::Diagnostic;

pub type S<T> = Spanned<T>;

/// The keys of the top level.
pub const ROOT_KEYS: &[&str] = &["paths", "service", "gateway", "model_defaults", "models"];
/// The keys of `[paths]`.
pub const PATHS_KEYS: &[&str] = &["home", "models", "credentials"];
/// The keys of `[service]`.
pub const SERVICE_KEYS: &[&str] = &["user", "group"];
/// The keys of `[gateway]`.
pub const GATEWAY_KEYS: &[&str] = &[
    "listen",
    "port",
    "auth",
    "api_keys_file",
    "rate_limit_per_minute",
    "rate_limit_burst",
    "max_body",
    "cors_origins",
    "header_timeout",
    "request_timeout",
    "probe_interval",
    "drain_timeout",
    "watchdog",
    "listen_backlog",
    "first_byte_timeout",
    "outlier_failures",
    "outlier_ejection",
    "memory_max",
    "memory_high",
    "cpus",
    "tasks_max",
    "nofile",
];
/// The keys of one entry of `[[models.NAME.instances]]`.
pub const INSTANCE_KEYS: &[&str] = &["port", "gpus"];
/// The keys of `[models.NAME]` and `[model_defaults]`.
pub const MODEL_KEYS: &[&str] = &[
    "port",
    "engine",
    "model",
    "args",
    "env",
    "credentials",
    "gpus",
    "aliases",
    "replicas",
    "instances",
    "python",
    "binary",
    "command",
    "max_model_len",
    "gpu_memory_utilization",
    "parallel",
    "health_path",
    "ready_check",
    "start_timeout",
    "stop_timeout",
    "watchdog",
    "probe_interval",
    "memory_max",
    "memory_high",
    "cpus",
    "tasks_max",
    "nofile",
    "memlock",
];

/// Every key path the schema accepts, from the key lists above: `paths.home`,
/// `gateway.port`, `model_defaults.memory_max`, `models.*.memory_max` (`*`
/// stands for a model's name). `env` and `credentials` are one key each (the
/// keys inside them are the operator's). docs/configuration.md documents each
/// of these, which a test checks.
pub fn schema_keys() -> Vec<String> {
    let mut out = Vec::new();
    for root in ROOT_KEYS {
        let (prefix, keys) = match *root {
            "paths" => ("paths", PATHS_KEYS),
            "service" => ("service", SERVICE_KEYS),
            "gateway" => ("gateway", GATEWAY_KEYS),
            "model_defaults" => ("model_defaults", MODEL_KEYS),
            "models" => {
                out.extend(MODEL_KEYS.iter().map(|k| format!("models.*.{k}")));
                out.extend(
                    INSTANCE_KEYS
                        .iter()
                        .map(|k| format!("models.*.instances.{k}")),
                );
                continue;
            }
            // A root key whose table is not listed here is reported as itself,
            // so that the documentation test names it.
            other => {
                out.push(other.to_owned());
                continue;
            }
        };
        out.extend(keys.iter().map(|k| format!("{prefix}.{k}")));
    }
    out
}

#[derive(Debug, Default)]
pub struct RawConfig {
    pub paths: RawPaths,
    pub service: RawService,
    pub gateway: RawGateway,
    /// Settings every model inherits unless it sets them itself.
    pub model_defaults: RawModel,
    pub models: BTreeMap<S<String>, S<RawModel>>,
}

#[derive(Debug, Default)]
pub struct RawPaths {
    pub home: Option<S<String>>,
    pub models: Option<S<String>>,
    pub credentials: Option<S<String>>,
}

#[derive(Debug, Default)]
pub struct RawService {
    pub user: Option<S<String>>,
    pub group: Option<S<String>>,
}

#[derive(Debug, Default)]
pub struct RawGateway {
    pub listen: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub auth: Option<S<bool>>,
    pub api_keys_file: Option<S<String>>,
    pub rate_limit_per_minute: Option<S<i64>>,
    pub rate_limit_burst: Option<S<i64>>,
    pub max_body: Option<S<String>>,
    pub cors_origins: Option<S<Vec<S<String>>>>,
    pub header_timeout: Option<S<String>>,
    pub request_timeout: Option<S<String>>,
    pub probe_interval: Option<S<String>>,
    pub drain_timeout: Option<S<String>>,
    pub watchdog: Option<S<String>>,
    pub listen_backlog: Option<S<i64>>,
    pub first_byte_timeout: Option<S<String>>,
    pub outlier_failures: Option<S<i64>>,
    pub outlier_ejection: Option<S<String>>,
    pub memory_max: Option<S<String>>,
    pub memory_high: Option<S<String>>,
    pub cpus: Option<S<f64>>,
    pub tasks_max: Option<S<i64>>,
    pub nofile: Option<S<i64>>,
}

/// One entry of `gpus`: an index or a UUID string, checked in validation.
#[derive(Debug, Clone, PartialEq)]
pub enum RawGpu {
    Index(i64),
    Text(String),
}

/// One further local instance of a model (`[[models.NAME.instances]]`).
#[derive(Debug, Default, Clone)]
pub struct RawInstance {
    pub port: Option<S<i64>>,
    pub gpus: Option<S<Vec<S<RawGpu>>>>,
}

/// A table of strings with the place of every key and value (`env`, `credentials`).
pub type StrMap = BTreeMap<S<String>, S<String>>;

#[derive(Debug, Default, Clone)]
pub struct RawModel {
    pub port: Option<S<i64>>,
    pub engine: Option<S<String>>,
    pub model: Option<S<String>>,
    pub args: Option<S<Vec<S<String>>>>,
    pub env: Option<S<StrMap>>,
    pub credentials: Option<S<StrMap>>,
    pub gpus: Option<S<Vec<S<RawGpu>>>>,
    pub aliases: Option<S<Vec<S<String>>>>,
    pub replicas: Option<S<Vec<S<String>>>>,
    /// Further local instances (issue 15); never taken from `[model_defaults]`.
    pub instances: Option<S<Vec<S<RawInstance>>>>,
    // engine programs
    pub python: Option<S<String>>,
    pub binary: Option<S<String>>,
    pub command: Option<S<Vec<S<String>>>>,
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
            instances,
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
        // Environment tables merge key by key; the model's own values (and places) win.
        if let (Some(own), Some(base)) = (&self.env, &defaults.env) {
            let mut env = base.get_ref().clone();
            for (k, v) in own.get_ref() {
                env.remove(k);
                env.insert(k.clone(), v.clone());
            }
            merged.env = Some(Spanned::new(own.span(), env));
        }
        merged
    }
}

/// Parses `text` and reads it against the schema. A TOML syntax error (the file
/// cannot be read at all) is the `Err`; otherwise the diagnostics are the unknown
/// keys and wrong types found, each with its key path and place.
pub fn read(text: &str) -> Result<(RawConfig, Vec<Diagnostic>), Diagnostic> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let message = e.message().trim().to_owned();
        let help = if message.contains("duplicate key") {
            "each key and each [models.NAME] table may appear only once"
        } else {
            "fix the TOML syntax at this place"
        };
        Diagnostic::error("", message)
            .at(Some(e.span().unwrap_or(0..0)))
            .help(help)
    })?;
    let mut r = Reader { diags: Vec::new() };
    let root = doc.as_table();
    let mut raw = RawConfig::default();
    for (key, item, at) in r.entries("", "the top level", root, ROOT_KEYS) {
        match key {
            "paths" => {
                if let Some(t) = r.table(key, item, &at) {
                    raw.paths = r.paths(t);
                }
            }
            "service" => {
                if let Some(t) = r.table(key, item, &at) {
                    raw.service = r.service(t);
                }
            }
            "gateway" => {
                if let Some(t) = r.table(key, item, &at) {
                    raw.gateway = r.gateway(t);
                }
            }
            "model_defaults" => {
                if let Some(t) = r.table(key, item, &at) {
                    raw.model_defaults = r.model(key, t);
                }
            }
            "models" => {
                if let Some(t) = r.table(key, item, &at) {
                    raw.models = r.models(t);
                }
            }
            _ => unreachable!("entries() yields only keys from ROOT_KEYS"),
        }
    }
    Ok((raw, r.diags))
}

struct Reader {
    diags: Vec<Diagnostic>,
}

/// "a string", "an integer", ... for messages.
fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(Value::String(_)) => "a string",
        Item::Value(Value::Integer(_)) => "an integer",
        Item::Value(Value::Float(_)) => "a float",
        Item::Value(Value::Boolean(_)) => "a boolean",
        Item::Value(Value::Datetime(_)) => "a date-time",
        Item::Value(Value::Array(_)) => "an array",
        Item::Value(Value::InlineTable(_)) | Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Reader {
    /// The known entries of a table as (key, item, place of the value); one
    /// diagnostic for each unknown key, which is left out.
    fn entries<'t>(
        &mut self,
        prefix: &str,
        table_name: &str,
        t: &'t dyn TableLike,
        known: &[&'static str],
    ) -> Vec<(&'static str, &'t Item, Range<usize>)> {
        let mut out = Vec::new();
        for (name, item) in t.iter() {
            let key_span = t.key(name).and_then(|k| k.span());
            let at = item.span().or_else(|| key_span.clone()).unwrap_or(0..0);
            match known.iter().find(|k| **k == name) {
                Some(k) => out.push((*k, item, at)),
                None => {
                    let path = join_key(prefix, name);
                    let listed: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                    let expected = format!("expected one of {}", listed.join(", "));
                    let help = match did_you_mean(name, known) {
                        Some(s) => format!("did you mean `{s}`? ({expected})"),
                        None => format!("remove or rename the key ({expected})"),
                    };
                    self.diags.push(
                        Diagnostic::error(path, format!("unknown field `{name}` in {table_name}"))
                            .at(Some(key_span.unwrap_or(at)))
                            .help(help),
                    );
                }
            }
        }
        out
    }

    fn wrong_type(&mut self, key: &str, item: &Item, at: &Range<usize>, expected: &str) {
        let help = "check the value's type: strings need quotes (\"90G\", \"15min\"), numbers and booleans do not";
        self.diags.push(
            Diagnostic::error(
                key,
                format!(
                    "invalid type for `{key}`: expected {expected}, found {}",
                    type_name(item)
                ),
            )
            .at(Some(at.clone()))
            .help(help),
        );
    }

    fn table<'t>(
        &mut self,
        key: &str,
        item: &'t Item,
        at: &Range<usize>,
    ) -> Option<&'t dyn TableLike> {
        let t = item.as_table_like();
        if t.is_none() {
            self.wrong_type(key, item, at, "a table");
        }
        t
    }

    fn string(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<String>> {
        match item.as_str() {
            Some(s) => Some(Spanned::new(at.clone(), s.to_owned())),
            None => {
                self.wrong_type(key, item, at, "a string");
                None
            }
        }
    }

    fn int(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<i64>> {
        match item.as_integer() {
            Some(n) => Some(Spanned::new(at.clone(), n)),
            None => {
                self.wrong_type(key, item, at, "an integer");
                None
            }
        }
    }

    /// A number: a float or an integer (`cpus = 2`).
    fn float(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<f64>> {
        match item
            .as_float()
            .or_else(|| item.as_integer().map(|n| n as f64))
        {
            Some(n) => Some(Spanned::new(at.clone(), n)),
            None => {
                self.wrong_type(key, item, at, "a number");
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<bool>> {
        match item.as_bool() {
            Some(b) => Some(Spanned::new(at.clone(), b)),
            None => {
                self.wrong_type(key, item, at, "`true` or `false`");
                None
            }
        }
    }

    fn strings(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<Vec<S<String>>>> {
        let Some(array) = item.as_array() else {
            self.wrong_type(key, item, at, "an array of strings");
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for v in array.iter() {
            let vat = v.span().unwrap_or_else(|| at.clone());
            match v.as_str() {
                Some(s) => out.push(Spanned::new(vat, s.to_owned())),
                None => {
                    ok = false;
                    self.wrong_type(key, &Item::Value(v.clone()), &vat, "a string in the array");
                }
            }
        }
        ok.then(|| Spanned::new(at.clone(), out))
    }

    /// `gpus`: an array of integers (indexes) and strings (UUIDs), each with its place.
    fn gpus(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<Vec<S<RawGpu>>>> {
        let Some(array) = item.as_array() else {
            self.wrong_type(key, item, at, "an array of GPU indexes and UUIDs");
            return None;
        };
        let mut out = Vec::new();
        for v in array.iter() {
            let vat = v.span().unwrap_or_else(|| at.clone());
            match (v.as_integer(), v.as_str()) {
                (Some(n), _) => out.push(Spanned::new(vat, RawGpu::Index(n))),
                (None, Some(s)) => out.push(Spanned::new(vat, RawGpu::Text(s.to_owned()))),
                (None, None) => {
                    self.wrong_type(
                        key,
                        &Item::Value(v.clone()),
                        &vat,
                        "a GPU index (integer) or UUID (string) in the array",
                    );
                }
            }
        }
        Some(Spanned::new(at.clone(), out))
    }

    /// `instances`: `[[models.NAME.instances]]` tables or an array of inline
    /// tables, each with `port` and `gpus`.
    fn instances(
        &mut self,
        key: &str,
        item: &Item,
        at: &Range<usize>,
    ) -> Option<S<Vec<S<RawInstance>>>> {
        let tables: Vec<(&dyn TableLike, Range<usize>)> =
            if let Some(aot) = item.as_array_of_tables() {
                aot.iter()
                    .map(|t| (t as &dyn TableLike, t.span().unwrap_or_else(|| at.clone())))
                    .collect()
            } else if let Some(array) = item.as_array() {
                let mut out = Vec::new();
                for v in array.iter() {
                    let vat = v.span().unwrap_or_else(|| at.clone());
                    match v.as_inline_table() {
                        Some(t) => out.push((t as &dyn TableLike, vat)),
                        None => self.wrong_type(
                            key,
                            &Item::Value(v.clone()),
                            &vat,
                            "a table with `port` (and `gpus`) in the array",
                        ),
                    }
                }
                out
            } else {
                self.wrong_type(
                    key,
                    item,
                    at,
                    "an array of tables (`[[models.NAME.instances]]`)",
                );
                return None;
            };
        let mut out = Vec::new();
        for (t, tat) in tables {
            let mut inst = RawInstance::default();
            for (k, v, vat) in self.entries(key, &format!("[[{key}]]"), t, INSTANCE_KEYS) {
                let path = join_key(key, k);
                match k {
                    "port" => inst.port = self.int(&path, v, &vat),
                    "gpus" => inst.gpus = self.gpus(&path, v, &vat),
                    _ => unreachable!("entries() yields only keys from INSTANCE_KEYS"),
                }
            }
            out.push(Spanned::new(tat, inst));
        }
        Some(Spanned::new(at.clone(), out))
    }

    /// A table of strings whose keys are free (`env`, `credentials`).
    fn str_map(&mut self, key: &str, item: &Item, at: &Range<usize>) -> Option<S<StrMap>> {
        let t = self.table(key, item, at)?;
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (name, v) in t.iter() {
            let key_span = t.key(name).and_then(|k| k.span());
            let vat = v
                .span()
                .or_else(|| key_span.clone())
                .unwrap_or_else(|| at.clone());
            let path = join_key(key, name);
            match v.as_str() {
                Some(s) => {
                    out.insert(
                        Spanned::new(key_span.unwrap_or_else(|| vat.clone()), name.to_owned()),
                        Spanned::new(vat, s.to_owned()),
                    );
                }
                None => {
                    ok = false;
                    self.wrong_type(&path, v, &vat, "a string");
                }
            }
        }
        ok.then(|| Spanned::new(at.clone(), out))
    }

    fn paths(&mut self, t: &dyn TableLike) -> RawPaths {
        let mut p = RawPaths::default();
        for (key, item, at) in self.entries("paths", "[paths]", t, PATHS_KEYS) {
            let k = join_key("paths", key);
            let v = self.string(&k, item, &at);
            match key {
                "home" => p.home = v,
                "models" => p.models = v,
                "credentials" => p.credentials = v,
                _ => unreachable!("entries() yields only keys from PATHS_KEYS"),
            }
        }
        p
    }

    fn service(&mut self, t: &dyn TableLike) -> RawService {
        let mut s = RawService::default();
        for (key, item, at) in self.entries("service", "[service]", t, SERVICE_KEYS) {
            let k = join_key("service", key);
            let v = self.string(&k, item, &at);
            match key {
                "user" => s.user = v,
                "group" => s.group = v,
                _ => unreachable!("entries() yields only keys from SERVICE_KEYS"),
            }
        }
        s
    }

    fn gateway(&mut self, t: &dyn TableLike) -> RawGateway {
        let mut g = RawGateway::default();
        for (key, item, at) in self.entries("gateway", "[gateway]", t, GATEWAY_KEYS) {
            let k = join_key("gateway", key);
            let k = k.as_str();
            match key {
                "listen" => g.listen = self.string(k, item, &at),
                "port" => g.port = self.int(k, item, &at),
                "auth" => g.auth = self.boolean(k, item, &at),
                "api_keys_file" => g.api_keys_file = self.string(k, item, &at),
                "rate_limit_per_minute" => g.rate_limit_per_minute = self.int(k, item, &at),
                "rate_limit_burst" => g.rate_limit_burst = self.int(k, item, &at),
                "max_body" => g.max_body = self.string(k, item, &at),
                "cors_origins" => g.cors_origins = self.strings(k, item, &at),
                "header_timeout" => g.header_timeout = self.string(k, item, &at),
                "request_timeout" => g.request_timeout = self.string(k, item, &at),
                "probe_interval" => g.probe_interval = self.string(k, item, &at),
                "drain_timeout" => g.drain_timeout = self.string(k, item, &at),
                "watchdog" => g.watchdog = self.string(k, item, &at),
                "listen_backlog" => g.listen_backlog = self.int(k, item, &at),
                "first_byte_timeout" => g.first_byte_timeout = self.string(k, item, &at),
                "outlier_failures" => g.outlier_failures = self.int(k, item, &at),
                "outlier_ejection" => g.outlier_ejection = self.string(k, item, &at),
                "memory_max" => g.memory_max = self.string(k, item, &at),
                "memory_high" => g.memory_high = self.string(k, item, &at),
                "cpus" => g.cpus = self.float(k, item, &at),
                "tasks_max" => g.tasks_max = self.int(k, item, &at),
                "nofile" => g.nofile = self.int(k, item, &at),
                _ => unreachable!("entries() yields only keys from GATEWAY_KEYS"),
            }
        }
        g
    }

    fn models(&mut self, t: &dyn TableLike) -> BTreeMap<S<String>, S<RawModel>> {
        let mut out = BTreeMap::new();
        for (name, item) in t.iter() {
            let key_span = t.key(name).and_then(|k| k.span()).unwrap_or(0..0);
            let at = item.span().unwrap_or_else(|| key_span.clone());
            let path = join_key("models", name);
            if let Some(table) = self.table(&path, item, &at) {
                let model = self.model(&path, table);
                out.insert(
                    Spanned::new(key_span, name.to_owned()),
                    Spanned::new(at, model),
                );
            }
        }
        out
    }

    fn model(&mut self, prefix: &str, t: &dyn TableLike) -> RawModel {
        let mut m = RawModel::default();
        let table_name = format!("[{prefix}]");
        for (key, item, at) in self.entries(prefix, &table_name, t, MODEL_KEYS) {
            let k = join_key(prefix, key);
            let k = k.as_str();
            match key {
                "port" => m.port = self.int(k, item, &at),
                "engine" => m.engine = self.string(k, item, &at),
                "model" => m.model = self.string(k, item, &at),
                "args" => m.args = self.strings(k, item, &at),
                "env" => m.env = self.str_map(k, item, &at),
                "credentials" => m.credentials = self.str_map(k, item, &at),
                "gpus" => m.gpus = self.gpus(k, item, &at),
                "aliases" => m.aliases = self.strings(k, item, &at),
                "replicas" => m.replicas = self.strings(k, item, &at),
                "instances" => m.instances = self.instances(k, item, &at),
                "python" => m.python = self.string(k, item, &at),
                "binary" => m.binary = self.string(k, item, &at),
                "command" => m.command = self.strings(k, item, &at),
                "max_model_len" => m.max_model_len = self.int(k, item, &at),
                "gpu_memory_utilization" => m.gpu_memory_utilization = self.float(k, item, &at),
                "parallel" => m.parallel = self.int(k, item, &at),
                "health_path" => m.health_path = self.string(k, item, &at),
                "ready_check" => m.ready_check = self.string(k, item, &at),
                "start_timeout" => m.start_timeout = self.string(k, item, &at),
                "stop_timeout" => m.stop_timeout = self.string(k, item, &at),
                "watchdog" => m.watchdog = self.string(k, item, &at),
                "probe_interval" => m.probe_interval = self.string(k, item, &at),
                "memory_max" => m.memory_max = self.string(k, item, &at),
                "memory_high" => m.memory_high = self.string(k, item, &at),
                "cpus" => m.cpus = self.float(k, item, &at),
                "tasks_max" => m.tasks_max = self.int(k, item, &at),
                "nofile" => m.nofile = self.int(k, item, &at),
                "memlock" => m.memlock = self.string(k, item, &at),
                _ => unreachable!("entries() yields only keys from MODEL_KEYS"),
            }
        }
        m
    }
}

/// The known key closest to `key` (optimal string alignment distance, where a
/// swap of two neighbours counts once), if it is close enough to be a typo.
fn did_you_mean(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let (best, d) = known
        .iter()
        .map(|k| (*k, edit_distance(key, k)))
        .min_by_key(|&(_, d)| d)?;
    let limit = (key.chars().count() / 3).max(2);
    (d <= limit).then_some(best)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_only() {
        assert_eq!(did_you_mean("memroy_max", MODEL_KEYS), Some("memory_max"));
        assert_eq!(did_you_mean("prot", GATEWAY_KEYS), Some("port"));
        assert_eq!(did_you_mean("memory_maxx", MODEL_KEYS), Some("memory_max"));
        assert_eq!(did_you_mean("frobnicate", MODEL_KEYS), None);
    }

    /// Every key the schema lists is read (none falls through to "unknown").
    #[test]
    fn every_listed_key_is_read() {
        let model: String = MODEL_KEYS.iter().map(|k| format!("{k} = 1\n")).collect();
        let gateway: String = GATEWAY_KEYS.iter().map(|k| format!("{k} = 1\n")).collect();
        let text = format!("[paths]\nhome = 1\nmodels = 1\ncredentials = 1\n[service]\nuser = 1\ngroup = 1\n[gateway]\n{gateway}[model_defaults]\n{model}[models.a]\n{model}");
        let (_, diags) = read(&text).unwrap();
        assert!(
            diags.iter().all(|d| d.message.contains("invalid type")),
            "{diags:#?}"
        );
    }
}
