//! Checks of the settings against the machine they will run on. These are
//! warnings, never errors: a config is often written on one host for another.

use crate::diag::Diagnostic;
use crate::settings::Settings;
use crate::units::ByteSize;

/// What validation needs to know about the host, read once by the binary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Total RAM in bytes (`MemTotal` of /proc/meminfo), if known.
    pub mem_total: Option<u64>,
    // GPUs are not a fact read here: `/dev/nvidiaN` numbers are device
    // minors, not the indexes `gpus` names. The CLI resolves `gpus` through
    // the driver (`citadel-systemd`'s `gpu` module) and reports what it cannot.
}

impl HostFacts {
    /// Reads the facts of the running machine.
    pub fn detect() -> HostFacts {
        let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
        HostFacts { mem_total }
    }
}

/// Warnings about `settings` on a host with these `facts`.
pub fn check_host(settings: &Settings, facts: &HostFacts) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Some(total) = facts.mem_total {
        // Saturating: no number of models can make this overflow.
        let summed: u64 = settings
            .models
            .iter()
            .filter_map(|m| m.limits.memory_max)
            .chain(settings.gateway.limits.memory_max)
            .map(ByteSize::bytes)
            .fold(0u64, u64::saturating_add);
        if summed > total {
            out.push(
                Diagnostic::warning(
                    "models",
                    format!(
                        "the memory limits add up to {} but this host has {} of RAM",
                        ByteSize(summed),
                        format_args!("{:.1}G", total as f64 / ByteSize::GIB as f64)
                    ),
                )
                .help("lower some `memory_max` values, or run fewer models on this host; the kernel will otherwise OOM-kill engines under load"),
            );
        }
    }
    out
}
