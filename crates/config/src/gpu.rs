//! GPUs as the config names them (`gpus = [...]`, issue 10, item 5).
//!
//! An entry is an nvidia-smi index (`2`), a GPU UUID
//! (`"GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77"`) or a MIG device UUID
//! (`"MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"`, or the legacy
//! `"MIG-GPU-<uuid>/<gi>/<ci>"` of drivers before R470), as `nvidia-smi -L`
//! prints them. An index is not a stable identity (nor is it the device
//! minor): the CLI resolves every entry through the driver on the host into a
//! device minor (`DeviceAllow=/dev/nvidiaN`) and a UUID
//! (`CUDA_VISIBLE_DEVICES=GPU-...`). This module only parses and compares; it
//! reads nothing.

use std::collections::BTreeMap;
use std::fmt;

use crate::diag::Diagnostic;
use crate::engine::Engine;
use crate::raw::{RawConfig, RawGpu, S};
use crate::settings::Model;

/// The highest GPU index accepted (exclusive): no host has more.
pub const MAX_INDEX: u32 = 64;

/// vLLM's default `--gpu-memory-utilization`.
pub const VLLM_DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// One entry of a model's `gpus`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GpuRef {
    /// An nvidia-smi index: resolved through the driver on the host.
    Index(u32),
    /// A whole GPU by UUID, canonical form `GPU-` and lowercase hex.
    Gpu(String),
    /// A MIG device by UUID, canonical form `MIG-` and lowercase hex (or the
    /// legacy `MIG-GPU-<uuid>/<gi>/<ci>`, which names its parent GPU).
    Mig(String),
}

const EXAMPLES: &str = "write a GPU index (`0`), a GPU UUID (`\"GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77\"`) or a MIG device UUID (`\"MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f\"`), as `nvidia-smi -L` prints them";

impl GpuRef {
    /// How to write an entry (the help of every `gpus` diagnostic).
    pub const HELP: &'static str = EXAMPLES;

    /// An index from the config: `0..MAX_INDEX`.
    pub fn index(i: i64) -> Result<GpuRef, String> {
        match u32::try_from(i) {
            Ok(n) if n < MAX_INDEX => Ok(GpuRef::Index(n)),
            _ => Err(format!(
                "GPU index {i} is out of range (0 to {})",
                MAX_INDEX - 1
            )),
        }
    }

    /// A string entry: a GPU UUID or a MIG UUID. Never panics.
    pub fn parse(s: &str) -> Result<GpuRef, String> {
        let shown = s.escape_debug();
        let bad = || format!("`{shown}` is not a GPU UUID or a MIG device UUID");
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "`{shown}` is a GPU index written as a string; write it without quotes"
            ));
        }
        let upper_prefix = |p: &str| {
            s.get(..p.len())
                .filter(|head| head.eq_ignore_ascii_case(p))
                .map(|_| &s[p.len()..])
        };
        if let Some(rest) = upper_prefix("MIG-GPU-") {
            // Legacy: MIG-GPU-<uuid>/<gi>/<ci>
            let mut parts = rest.split('/');
            let (Some(uuid), Some(gi), Some(ci), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let uuid = uuid_hex(uuid).ok_or_else(bad)?;
            let gi = small_number(gi).ok_or_else(bad)?;
            let ci = small_number(ci).ok_or_else(bad)?;
            return Ok(GpuRef::Mig(format!("MIG-GPU-{uuid}/{gi}/{ci}")));
        }
        if let Some(rest) = upper_prefix("MIG-") {
            return uuid_hex(rest)
                .map(|u| GpuRef::Mig(format!("MIG-{u}")))
                .ok_or_else(bad);
        }
        if let Some(rest) = upper_prefix("GPU-") {
            return uuid_hex(rest)
                .map(|u| GpuRef::Gpu(format!("GPU-{u}")))
                .ok_or_else(bad);
        }
        Err(bad())
    }

    /// For a legacy MIG reference, the parent GPU's UUID (`GPU-...`).
    pub fn mig_parent(&self) -> Option<String> {
        match self {
            GpuRef::Mig(s) => s
                .strip_prefix("MIG-")
                .filter(|r| r.starts_with("GPU-"))
                .and_then(|r| r.split('/').next())
                .map(str::to_owned),
            _ => None,
        }
    }

    pub fn is_mig(&self) -> bool {
        matches!(self, GpuRef::Mig(_))
    }

    /// The UUID CUDA accepts in `CUDA_VISIBLE_DEVICES`, when the entry is one.
    pub fn uuid(&self) -> Option<&str> {
        match self {
            GpuRef::Index(_) => None,
            GpuRef::Gpu(u) | GpuRef::Mig(u) => Some(u),
        }
    }
}

impl fmt::Display for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRef::Index(i) => write!(f, "GPU {i}"),
            GpuRef::Gpu(u) | GpuRef::Mig(u) => f.write_str(u),
        }
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (any case) in lowercase, or None.
fn uuid_hex(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| s.to_ascii_lowercase())
}

fn small_number(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The share of a GPU's memory the engine takes at start: vLLM's
/// `gpu_memory_utilization` (0.9 when unset), TGI's `--cuda-memory-fraction`
/// default (1.0). None where the engine allocates what it needs (llama.cpp,
/// Ollama, a command, the simulator).
pub fn gpu_memory_fraction(engine: &Engine) -> Option<f64> {
    match engine {
        Engine::Vllm {
            gpu_memory_utilization,
            ..
        } => Some(gpu_memory_utilization.unwrap_or(VLLM_DEFAULT_GPU_MEMORY_UTILIZATION)),
        Engine::Tgi { .. } => Some(1.0),
        _ => None,
    }
}

/// A GPU used by more than one model.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedGpu<'a> {
    /// The GPU's identity, as `identity` gave it.
    pub gpu: String,
    /// The models on it, ordered by port (the order they start in).
    pub models: Vec<&'a Model>,
}

/// The GPUs that several entries of `models` use (a model, or a local instance
/// as [`Model::local_instances`] gives it), where `identity` says which GPU entries are
/// the same device (the entry's text before resolution, the UUID after).
/// Ordered by identity; deterministic.
pub fn shared_gpus<'a>(
    models: &'a [Model],
    identity: impl Fn(&GpuRef) -> String,
) -> Vec<SharedGpu<'a>> {
    let mut by_gpu: BTreeMap<String, Vec<&'a Model>> = BTreeMap::new();
    for m in models {
        for g in &m.gpus {
            let users = by_gpu.entry(identity(g)).or_default();
            // The same entry of `models` once per GPU (two of its entries may be
            // one device); entries are distinct users even under one name (the
            // local instances of a model, issue 15).
            if !users.iter().any(|u| std::ptr::eq(*u, m)) {
                users.push(m);
            }
        }
    }
    by_gpu
        .into_iter()
        .filter(|(_, ms)| ms.len() > 1)
        .map(|(gpu, mut models)| {
            models.sort_by_key(|m| m.port);
            SharedGpu { gpu, models }
        })
        .collect()
}

/// The warning for a shared GPU whose models together claim more than all of
/// its memory (None when they fit, or no engine says what it takes).
pub fn overcommit_warning(shared: &SharedGpu<'_>, gpu: &str) -> Option<Diagnostic> {
    let claims: Vec<(&Model, f64)> = shared
        .models
        .iter()
        .filter_map(|m| gpu_memory_fraction(&m.engine).map(|f| (*m, f)))
        .collect();
    let total: f64 = claims.iter().map(|(_, f)| f).sum();
    if total <= 1.0 + 1e-9 {
        return None;
    }
    let parts: Vec<String> = claims
        .iter()
        .map(|(m, f)| {
            let default = match &m.engine {
                Engine::Vllm {
                    gpu_memory_utilization: None,
                    ..
                } => ", vLLM's default",
                Engine::Tgi { .. } => ", TGI's default",
                _ => "",
            };
            format!("`{}` ({f}{default})", m.name)
        })
        .collect();
    let last = shared.models.last()?;
    Some(
        Diagnostic::warning(
            format!("models.{}.gpus", last.name),
            format!(
                "{gpu} is shared by {}, which claim {:.2} of its memory together (more than 1.0)",
                parts.join(" and "),
                total
            ),
        )
        .help("set `gpu_memory_utilization` so that the models on one GPU add up to at most 1.0 (e.g. 0.45 each): vLLM allocates its share at start, and the model that starts second fails to get its KV cache"),
    )
}

/// The shared-GPU warnings validation can give without the driver: models
/// that name the same GPU the same way (`gpus = [0]` twice, or one UUID
/// twice). An index and a UUID of one GPU are found only after resolution.
pub(crate) fn shared_gpu_warnings(raw: &RawConfig, models: &[Model]) -> Vec<Diagnostic> {
    shared_gpus(models, GpuRef::to_string)
        .iter()
        .filter_map(|shared| {
            let d = overcommit_warning(shared, &shared.gpu)?;
            let last = shared.models.last()?;
            Some(d.at(gpus_span(raw, last.name.as_str())))
        })
        .collect()
}

/// The place of a model's `gpus` (its own, else `[model_defaults]`'s).
fn gpus_span(raw: &RawConfig, name: &str) -> Option<std::ops::Range<usize>> {
    let own = raw
        .models
        .iter()
        .find(|(n, _)| n.get_ref() == name)
        .and_then(|(_, m)| m.get_ref().gpus.as_ref().map(S::span));
    own.or_else(|| raw.model_defaults.gpus.as_ref().map(S::span))
}

/// Reads one raw entry (shared by validation and tests).
pub(crate) fn from_raw(g: &RawGpu) -> Result<GpuRef, String> {
    match g {
        RawGpu::Index(i) => GpuRef::index(*i),
        RawGpu::Text(s) => GpuRef::parse(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_canonical() {
        assert_eq!(
            GpuRef::parse("gpu-5D5BA0D6-d33d-2b2c-524d-9e3d8d2b8a77"),
            Ok(GpuRef::Gpu(
                "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77".into()
            ))
        );
        let legacy = GpuRef::parse("MIG-GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77/7/0").unwrap();
        assert_eq!(
            legacy.mig_parent().as_deref(),
            Some("GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77")
        );
        assert!(GpuRef::parse("MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f")
            .unwrap()
            .mig_parent()
            .is_none());
        for bad in [
            "",
            "GPU-",
            "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a7",
            "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77x",
            "GPU-zd5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77",
            "MIG-GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77/7",
            "MIG-GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77/7/0/1",
            "/dev/nvidia0",
            "é",
        ] {
            assert!(GpuRef::parse(bad).is_err(), "{bad}");
        }
    }
}
