//! Engine profiles: the command line and environment each engine runs with.
//!
//! Everything here is pure (no environment reads): the caller passes the
//! directories the unit provides, so `citadel-model command NAME` and the
//! snapshot tests see exactly what `run` would spawn.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use citadel_config::{Engine, Model};

/// The engines listen on loopback only; the gateway is the public face.
pub const ENGINE_HOST: &str = "127.0.0.1";

/// Host directories the engine may write to (from the unit's `CacheDirectory=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineDirs {
    /// `$CACHE_DIRECTORY` (`/var/cache/citadel/NAME`), or a temp dir outside systemd.
    pub cache: PathBuf,
    /// Where Ollama keeps pulled models when the config does not say otherwise.
    pub models: PathBuf,
}

impl EngineDirs {
    /// The directories for `model` as found in this process's environment:
    /// the first entry of `$CACHE_DIRECTORY`, else `$TMPDIR/citadel-NAME-cache`.
    pub fn from_env(model: &Model, models_root: &Path) -> EngineDirs {
        let cache = std::env::var_os("CACHE_DIRECTORY")
            .and_then(|v| {
                v.to_str()
                    .and_then(|s| s.split(':').next())
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| std::env::temp_dir().join(format!("citadel-{}-cache", model.name)));
        EngineDirs {
            cache,
            models: models_root.join("ollama"),
        }
    }
}

/// What the supervisor spawns: program, arguments and the environment it adds
/// to (or overrides in) its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Variables set for the engine (profile defaults, then the config's `env`,
    /// which wins).
    pub env: BTreeMap<String, String>,
}

/// Variables never passed to the engine: the notify protocol belongs to the
/// supervisor (NotifyAccess=main ignores the engine anyway).
pub const ENV_REMOVED: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Builds the engine's command line for `model`.
pub fn engine_command(model: &Model, dirs: &EngineDirs) -> EngineCommand {
    let name = model.name.as_str();
    let port = model.port.get().to_string();
    let mut env = BTreeMap::new();
    let cache = |sub: &str| -> String {
        let p = if sub.is_empty() {
            dirs.cache.clone()
        } else {
            dirs.cache.join(sub)
        };
        p.display().to_string()
    };
    let (program, mut args): (PathBuf, Vec<String>) = match &model.engine {
        Engine::Vllm {
            python,
            model: weights,
            max_model_len,
            gpu_memory_utilization,
        } => {
            let mut a = vec![
                "-m".into(),
                "vllm.entrypoints.openai.api_server".into(),
                "--model".into(),
                weights.clone(),
                "--served-model-name".into(),
                name.into(),
                "--host".into(),
                ENGINE_HOST.into(),
                "--port".into(),
                port.clone(),
            ];
            if let Some(len) = max_model_len {
                a.extend(["--max-model-len".into(), len.to_string()]);
            }
            if let Some(gmu) = gpu_memory_utilization {
                a.extend(["--gpu-memory-utilization".into(), gmu.to_string()]);
            }
            if !model.gpus.is_empty() {
                a.extend([
                    "--tensor-parallel-size".into(),
                    model.gpus.len().to_string(),
                ]);
            }
            // Measured necessary for vLLM (CPU) under ProtectHome=yes and PrivateTmp=yes:
            // every cache it writes must live in the unit's CacheDirectory=.
            for (k, sub) in [
                ("VLLM_CACHE_ROOT", "vllm"),
                ("HF_HOME", "huggingface"),
                ("XDG_CACHE_HOME", ""),
                ("TRITON_CACHE_DIR", "triton"),
                ("TORCHINDUCTOR_CACHE_DIR", "torchinductor"),
                ("OUTLINES_CACHE_DIR", "outlines"),
            ] {
                env.insert(k.to_owned(), cache(sub));
            }
            for (k, v) in [
                ("HF_HUB_OFFLINE", "1"),
                ("VLLM_NO_USAGE_STATS", "1"),
                ("DO_NOT_TRACK", "1"),
            ] {
                env.insert(k.to_owned(), v.to_owned());
            }
            (python.clone(), a)
        }
        Engine::LlamaCpp {
            binary,
            model: weights,
            parallel,
        } => {
            let mut a = vec![
                "-m".into(),
                weights.display().to_string(),
                "--alias".into(),
                name.into(),
                "--host".into(),
                ENGINE_HOST.into(),
                "--port".into(),
                port.clone(),
                "--metrics".into(),
            ];
            if let Some(n) = parallel {
                a.extend(["--parallel".into(), n.to_string()]);
            }
            env.insert("XDG_CACHE_HOME".into(), cache(""));
            (binary.clone(), a)
        }
        Engine::Ollama { binary, .. } => {
            env.insert("OLLAMA_HOST".into(), format!("{ENGINE_HOST}:{port}"));
            env.insert("OLLAMA_MODELS".into(), dirs.models.display().to_string());
            // Ollama writes its key pair under $HOME/.ollama; HOME is read-only (ProtectHome=yes).
            env.insert("HOME".into(), cache("home"));
            (binary.clone(), vec!["serve".into()])
        }
        Engine::Tgi {
            binary,
            model: weights,
        } => {
            let mut a = vec![
                "--model-id".into(),
                weights.clone(),
                "--hostname".into(),
                ENGINE_HOST.into(),
                "--port".into(),
                port.clone(),
            ];
            if model.gpus.len() > 1 {
                a.extend(["--num-shard".into(), model.gpus.len().to_string()]);
            }
            env.insert("HF_HOME".into(), cache("huggingface"));
            env.insert("HUGGINGFACE_HUB_CACHE".into(), cache("huggingface/hub"));
            env.insert("XDG_CACHE_HOME".into(), cache(""));
            env.insert("HF_HUB_OFFLINE".into(), "1".into());
            env.insert("DO_NOT_TRACK".into(), "1".into());
            (binary.clone(), a)
        }
        Engine::Command { argv, .. } => {
            let subst = |s: &String| {
                s.replace("{host}", ENGINE_HOST)
                    .replace("{port}", &port)
                    .replace("{name}", name)
            };
            let program = argv.first().map(subst).unwrap_or_default();
            (
                PathBuf::from(program),
                argv.iter().skip(1).map(subst).collect(),
            )
        }
        Engine::Sim { binary } => (
            binary.clone(),
            vec![
                "--host".into(),
                ENGINE_HOST.into(),
                "--port".into(),
                port.clone(),
                "--model".into(),
                name.into(),
            ],
        ),
    };
    args.extend(model.args.iter().cloned());
    // No CUDA_VISIBLE_DEVICES here (issue 10, item 5): the unit's drop-in sets
    // it, from the GPUs' UUIDs resolved on the host, with CUDA_DEVICE_ORDER,
    // and the engine inherits it. An index set here would be wrong inside the
    // unit's device cgroup, where CUDA numbers the allowed GPUs from 0.
    // The operator's `env` wins over every profile default.
    env.extend(model.env.clone());
    EngineCommand { program, args, env }
}

/// Quotes a word for a POSIX shell when it needs quoting.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

impl fmt::Display for EngineCommand {
    /// A shell-pasteable rendering: one `VAR=value \` line per variable, then
    /// the program and its arguments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.env {
            writeln!(f, "{k}={} \\", shell_quote(v))?;
        }
        write!(f, "{}", shell_quote(&self.program.display().to_string()))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(a))?;
        }
        writeln!(f)
    }
}
