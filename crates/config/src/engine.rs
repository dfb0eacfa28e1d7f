//! Engine profiles: what Citadel knows about each inference engine that the
//! config, the unit renderer and the supervisor all need to agree on.

use std::fmt;
use std::path::PathBuf;

/// The engine a model runs under, with the settings only that engine takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Engine {
    /// vLLM's OpenAI server, `python -m vllm.entrypoints.openai.api_server`.
    Vllm {
        python: PathBuf,
        model: String,
        max_model_len: Option<u32>,
        gpu_memory_utilization: Option<f64>,
    },
    /// llama.cpp's `llama-server`.
    LlamaCpp {
        binary: PathBuf,
        model: PathBuf,
        parallel: Option<u32>,
    },
    /// `ollama serve`, then the model is preloaded through its API.
    Ollama { binary: PathBuf, model: String },
    /// Hugging Face text-generation-inference, `text-generation-launcher`.
    Tgi { binary: PathBuf, model: String },
    /// Any command that serves an HTTP API on the model's port.
    Command {
        argv: Vec<String>,
        health_path: String,
    },
    /// `citadel-engine-sim`: a simulator of a GPU engine, for tests and demos.
    Sim { binary: PathBuf },
}

/// The engine kinds, as spelled in `engine = "..."`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineKind {
    Vllm,
    LlamaCpp,
    Ollama,
    Tgi,
    Command,
    Sim,
}

/// How the supervisor decides that a model can really serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyCheck {
    /// The health endpoint answers 200.
    Health,
    /// The health endpoint answers 200 and one tiny completion succeeds
    /// (for engines whose health can pass while the model cannot run).
    Completion,
}

impl ReadyCheck {
    pub const NAMES: &'static [&'static str] = &["health", "completion"];

    pub fn parse(s: &str) -> Option<ReadyCheck> {
        match s {
            "health" => Some(ReadyCheck::Health),
            "completion" => Some(ReadyCheck::Completion),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReadyCheck::Health => "health",
            ReadyCheck::Completion => "completion",
        }
    }
}

impl EngineKind {
    pub const ALL: &'static [EngineKind] = &[
        EngineKind::Vllm,
        EngineKind::LlamaCpp,
        EngineKind::Ollama,
        EngineKind::Tgi,
        EngineKind::Command,
        EngineKind::Sim,
    ];

    /// Model settings only some engines take, and which.
    pub const ENGINE_SPECIFIC: &'static [(&'static str, &'static [EngineKind])] = &[
        ("python", &[EngineKind::Vllm]),
        ("max_model_len", &[EngineKind::Vllm]),
        ("gpu_memory_utilization", &[EngineKind::Vllm]),
        (
            "binary",
            &[
                EngineKind::LlamaCpp,
                EngineKind::Ollama,
                EngineKind::Tgi,
                EngineKind::Sim,
            ],
        ),
        ("command", &[EngineKind::Command]),
        ("parallel", &[EngineKind::LlamaCpp]),
        (
            "model",
            &[
                EngineKind::Vllm,
                EngineKind::LlamaCpp,
                EngineKind::Ollama,
                EngineKind::Tgi,
            ],
        ),
    ];

    pub fn parse(s: &str) -> Option<EngineKind> {
        EngineKind::ALL.iter().copied().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::LlamaCpp => "llama-cpp",
            EngineKind::Ollama => "ollama",
            EngineKind::Tgi => "tgi",
            EngineKind::Command => "command",
            EngineKind::Sim => "sim",
        }
    }

    /// The program run when the config names none (`binary`/`python`),
    /// relative to Citadel's home where it is Citadel's own.
    pub fn default_program(self) -> &'static str {
        match self {
            EngineKind::Vllm => "env/bin/python",
            EngineKind::LlamaCpp => "/usr/local/bin/llama-server",
            EngineKind::Ollama => "/usr/local/bin/ollama",
            EngineKind::Tgi => "/usr/local/bin/text-generation-launcher",
            EngineKind::Command => "",
            EngineKind::Sim => "bin/citadel-engine-sim",
        }
    }

    /// The health endpoint the supervisor probes.
    pub fn default_health_path(self) -> &'static str {
        match self {
            EngineKind::Ollama => "/api/version",
            _ => "/health",
        }
    }

    /// vLLM's /health answers 200 while the model cannot run (measured:
    /// a model that crashes on its first request passes /health), so vLLM
    /// is only ready once a completion works.
    pub fn default_ready_check(self) -> ReadyCheck {
        match self {
            EngineKind::Vllm | EngineKind::Tgi => ReadyCheck::Completion,
            _ => ReadyCheck::Health,
        }
    }

    /// Whether the engine can run under `MemoryDenyWriteExecute=yes`; if not, why.
    pub fn write_execute_memory(self) -> Result<(), &'static str> {
        match self {
            EngineKind::Vllm => Err("vLLM's PyTorch compiles kernels at run time (torch.compile/oneDNN JIT) and maps them executable"),
            EngineKind::LlamaCpp => Ok(()),
            EngineKind::Ollama => Err("Ollama's Go runtime and its llama runners map JIT-compiled code"),
            EngineKind::Tgi => Err("TGI's Python server runs PyTorch, which JIT-compiles kernels"),
            EngineKind::Command => Err("an arbitrary command may need writable executable memory"),
            EngineKind::Sim => Ok(()),
        }
    }

    /// Default time allowed to load the model before systemd gives up
    /// (the supervisor extends it while the engine makes progress, up to this cap).
    pub fn default_start_timeout_secs(self) -> u64 {
        match self {
            EngineKind::Vllm | EngineKind::Tgi => 30 * 60,
            EngineKind::Ollama | EngineKind::LlamaCpp => 10 * 60,
            EngineKind::Command => 10 * 60,
            EngineKind::Sim => 60,
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Engine {
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Vllm { .. } => EngineKind::Vllm,
            Engine::LlamaCpp { .. } => EngineKind::LlamaCpp,
            Engine::Ollama { .. } => EngineKind::Ollama,
            Engine::Tgi { .. } => EngineKind::Tgi,
            Engine::Command { .. } => EngineKind::Command,
            Engine::Sim { .. } => EngineKind::Sim,
        }
    }
}
