//! GPU resolution on the host (issue 10, item 5): what each entry of a model's
//! `gpus` is on this machine, asked of the NVIDIA driver.
//!
//! - `nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv,noheader`
//!   gives each GPU's index, UUID and PCI address;
//! - `/proc/driver/nvidia/gpus/<pci>/information` gives its device minor
//!   (`Device Minor: N`, the N of `/dev/nvidiaN`), which need not be the index;
//! - `nvidia-smi -L` lists MIG devices under their GPU (asked only when a
//!   model names a MIG UUID).
//!
//! The result is a [`citadel_render::Host`] (UUID and minor per entry) for
//! rendering, and a diagnostic for every entry that could not be resolved.
//!
//! Where the driver is looked for: `nvidia-smi` on PATH and `/proc` below
//! `--root`. Two environment variables override them, for tests and
//! diagnosis only: `CITADEL_NVIDIA_SMI` (the program) and `CITADEL_PROC_ROOT`
//! (the directory standing for `/proc`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use citadel_config::gpu::{gpu_memory_fraction, overcommit_warning, shared_gpus, SharedGpu};
use citadel_config::{Diagnostic, GpuRef, Model, Settings};
use citadel_render::{GpuBinding, Host};

/// Overrides the `nvidia-smi` program (tests, diagnosis).
pub const SMI_ENV: &str = "CITADEL_NVIDIA_SMI";
/// Overrides the directory read as `/proc` (tests, diagnosis).
pub const PROC_ENV: &str = "CITADEL_PROC_ROOT";

/// How long nvidia-smi may take (it can hang on a wedged driver; without
/// persistence mode it initialises every GPU first).
const SMI_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the driver's facts are read.
#[derive(Debug, Clone)]
pub struct Driver {
    pub nvidia_smi: OsString,
    /// The directory standing for `/proc`.
    pub proc_root: PathBuf,
}

impl Driver {
    /// The driver of the system below `root`: `nvidia-smi` from PATH and
    /// `ROOT/proc`, unless [`SMI_ENV`] or [`PROC_ENV`] say otherwise.
    pub fn for_root(root: &Path) -> Driver {
        Driver {
            nvidia_smi: std::env::var_os(SMI_ENV)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "nvidia-smi".into()),
            proc_root: std::env::var_os(PROC_ENV)
                .filter(|v| !v.is_empty())
                .map_or_else(|| root.join("proc"), PathBuf::from),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("`{0}` was not found (is the NVIDIA driver installed?)")]
    NoSmi(String),
    #[error("`{program} {args}` failed: {detail}")]
    Smi {
        program: String,
        args: String,
        detail: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A PCI address, compared by value (nvidia-smi writes `00000000:3B:00.0`,
/// /proc writes `0000:3b:00.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pci {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

impl Pci {
    /// `[DOMAIN:]BUS:DEVICE.FUNCTION` in hex, any case. Never panics.
    pub fn parse(s: &str) -> Option<Pci> {
        let s = s.trim();
        let (rest, function) = s.rsplit_once('.')?;
        let mut parts: Vec<&str> = rest.split(':').collect();
        let device = parts.pop()?;
        let bus = parts.pop()?;
        let domain = match parts.as_slice() {
            [] => "0",
            [d] => d,
            _ => return None,
        };
        let hex = |t: &str, max: usize| -> Option<u32> {
            if t.is_empty() || t.len() > max || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(t, 16).ok()
        };
        Some(Pci {
            domain: hex(domain, 8)?,
            bus: u8::try_from(hex(bus, 2)?).ok()?,
            device: u8::try_from(hex(device, 2)?).ok()?,
            function: u8::try_from(hex(function, 1)?).ok()?,
        })
    }
}

impl std::fmt::Display for Pci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// One line of `nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv,noheader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmiGpu {
    pub index: u32,
    pub uuid: String,
    pub pci: Pci,
}

/// Parses the query's output; lines that are not `index, GPU-uuid, pci` are
/// skipped (a GPU nvidia-smi cannot read shows `[N/A]` or an error text).
pub fn parse_query(text: &str) -> Vec<SmiGpu> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(',').map(str::trim);
            let index = f.next()?.parse().ok()?;
            let uuid = match GpuRef::parse(f.next()?).ok()? {
                GpuRef::Gpu(u) => u,
                _ => return None,
            };
            let pci = Pci::parse(f.next()?)?;
            f.next().is_none().then_some(SmiGpu { index, uuid, pci })
        })
        .collect()
}

/// What `/proc/driver/nvidia/gpus/<pci>/information` says about one GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcGpu {
    pub minor: Option<u32>,
    pub pci: Option<Pci>,
    pub uuid: Option<String>,
}

/// Parses an `information` file (`Key: \t value` lines). Never panics.
pub fn parse_information(text: &str) -> ProcGpu {
    let mut out = ProcGpu::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Device Minor" => out.minor = value.parse().ok(),
            "Bus Location" => out.pci = Pci::parse(value),
            "GPU UUID" => {
                out.uuid = match GpuRef::parse(value) {
                    Ok(GpuRef::Gpu(u)) => Some(u),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    out
}

/// `nvidia-smi -L`: (GPU UUID, MIG UUIDs listed under it).
pub fn parse_list(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let Some(uuid) = line
            .split_once("(UUID: ")
            .and_then(|(_, rest)| rest.split(')').next())
        else {
            continue;
        };
        match GpuRef::parse(uuid.trim()) {
            Ok(GpuRef::Gpu(u)) if line.trim_start().starts_with("GPU ") => {
                out.push((u, Vec::new()))
            }
            Ok(GpuRef::Mig(m)) if line.trim_start().starts_with("MIG ") => {
                if let Some((_, migs)) = out.last_mut() {
                    migs.push(m);
                }
            }
            _ => {}
        }
    }
    out
}

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub index: u32,
    pub uuid: String,
    pub pci: Pci,
    /// `/dev/nvidia<minor>`; None when /proc has no entry for the GPU.
    pub minor: Option<u32>,
    pub migs: Vec<String>,
}

pub(crate) fn run_smi(driver: &Driver, args: &[&str]) -> Result<String, DriverError> {
    let shown = driver.nvidia_smi.to_string_lossy().into_owned();
    let smi_error = |detail: String| DriverError::Smi {
        program: shown.clone(),
        args: args.join(" "),
        detail,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| smi_error(format!("cannot start the async runtime: {e}")))?;
    let out = runtime.block_on(async {
        let child = tokio::process::Command::new(&driver.nvidia_smi)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(SMI_TIMEOUT, child).await
    });
    match out {
        Err(_) => Err(smi_error(format!(
            "no answer within {}s",
            SMI_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(DriverError::NoSmi(shown)),
        Ok(Err(e)) => Err(smi_error(e.to_string())),
        Ok(Ok(o)) if !o.status.success() => {
            let text = String::from_utf8_lossy(&o.stderr);
            let text = if text.trim().is_empty() {
                String::from_utf8_lossy(&o.stdout)
            } else {
                text
            };
            Err(smi_error(format!("{}: {}", o.status, text.trim())))
        }
        Ok(Ok(o)) => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
    }
}

/// Asks the driver about every GPU (and their MIG devices when `with_mig`).
pub fn query(driver: &Driver, with_mig: bool) -> Result<Vec<DeviceInfo>, DriverError> {
    let listed = parse_query(&run_smi(
        driver,
        &["--query-gpu=index,uuid,pci.bus_id", "--format=csv,noheader"],
    )?);
    let dir = driver.proc_root.join("driver/nvidia/gpus");
    let mut procs = Vec::new();
    let entries = std::fs::read_dir(&dir).map_err(|source| DriverError::Read {
        path: dir.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path().join("information");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut info = parse_information(&text);
        if info.pci.is_none() {
            info.pci = entry.file_name().to_str().and_then(Pci::parse);
        }
        procs.push(info);
    }
    let migs = if with_mig {
        parse_list(&run_smi(driver, &["-L"])?)
    } else {
        Vec::new()
    };
    Ok(listed
        .into_iter()
        .map(|g| {
            let minor = procs
                .iter()
                .find(|p| p.pci == Some(g.pci))
                .or_else(|| procs.iter().find(|p| p.uuid.as_deref() == Some(&g.uuid)))
                .and_then(|p| p.minor);
            let migs = migs
                .iter()
                .find(|(u, _)| *u == g.uuid)
                .map(|(_, m)| m.clone())
                .unwrap_or_default();
            DeviceInfo {
                index: g.index,
                uuid: g.uuid,
                pci: g.pci,
                minor,
                migs,
            }
        })
        .collect())
}

/// The GPUs of a stack on this host.
#[derive(Debug, Default)]
pub struct Resolution {
    /// What to render with.
    pub host: Host,
    /// One warning per model with entries that were not resolved (for
    /// `install`, errors: see [`Resolution::unresolved_as_errors`]).
    pub unresolved: Vec<Diagnostic>,
    /// Models sharing a GPU that only resolution shows (an index and a UUID of
    /// one GPU) whose memory shares add up past 1.0, and GPUs used whole by
    /// one model while another uses a MIG device on them.
    pub warnings: Vec<Diagnostic>,
    /// Models naming one physical GPU twice (`gpus = [0, "GPU-<uuid of 0>"]`):
    /// errors for every command, at the entry (key `models.NAME.gpus[I]`).
    pub errors: Vec<Diagnostic>,
}

impl Resolution {
    pub fn unresolved_as_errors(&self) -> Vec<Diagnostic> {
        self.unresolved
            .iter()
            .map(|d| Diagnostic {
                severity: citadel_config::Severity::Error,
                ..d.clone()
            })
            .collect()
    }

    /// Every diagnostic: unresolved GPUs as warnings (for `render` and
    /// `validate`), duplicate GPUs as errors.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        self.errors
            .iter()
            .chain(&self.unresolved)
            .chain(&self.warnings)
            .cloned()
            .collect()
    }
}

/// Resolves the stack's GPUs on the system below `root` (asks the driver
/// only when a model has GPUs).
pub fn resolve_on(root: &Path, settings: &Settings) -> Resolution {
    let refs: BTreeSet<&GpuRef> = settings
        .models
        .iter()
        .flat_map(|m| {
            m.gpus
                .iter()
                .chain(m.instances.iter().flat_map(|i| &i.gpus))
        })
        .collect();
    if refs.is_empty() {
        return Resolution::default();
    }
    let with_mig = refs.iter().any(|r| r.is_mig() && r.mig_parent().is_none());
    resolve(settings, &query(&Driver::for_root(root), with_mig))
}

/// A GPU user: one local instance of a model (issue 15: each instance is a
/// GPU user of its own, with its own `gpus`).
struct User {
    /// `phi3`, `phi3:2`.
    name: String,
    /// Instance number (1-based).
    n: usize,
    /// The model as this instance runs it.
    model: Model,
    /// Instance 2 and later whose `gpus` are the model's (not given, or the
    /// same): its problems are the model's and are reported there once.
    inherits: bool,
}

impl User {
    /// `model `phi3``, or `instance `phi3:2`` for a further instance.
    fn who(&self) -> String {
        if self.n == 1 {
            format!("model `{}`", self.name)
        } else {
            format!("instance `{}`", self.name)
        }
    }

    /// The config key of its GPUs: `models.NAME.gpus`, or
    /// `models.NAME.instances[I].gpus` (I counts from 0: instance I + 2).
    fn key(&self) -> String {
        if self.n == 1 {
            format!("models.{}.gpus", self.model.name)
        } else {
            format!("models.{}.instances[{}].gpus", self.model.name, self.n - 2)
        }
    }
}

/// Every local instance of every model, models in port order, each model's
/// instances in order.
fn users(settings: &Settings) -> Vec<User> {
    settings
        .models
        .iter()
        .flat_map(|m| {
            m.local_instances().into_iter().map(move |(n, inst)| User {
                name: m.instance_name(n),
                n,
                inherits: n > 1 && inst.gpus == m.gpus,
                model: inst,
            })
        })
        .collect()
}

/// Resolves every entry against what the driver said (pure; the tests'
/// entry point). Every local instance's GPUs are resolved and checked.
pub fn resolve(settings: &Settings, devices: &Result<Vec<DeviceInfo>, DriverError>) -> Resolution {
    let mut out = Resolution::default();
    let users = users(settings);
    for u in &users {
        let mut missing = Vec::new();
        for r in &u.model.gpus {
            let found = match devices {
                Ok(devices) => find(devices, r),
                Err(e) => Err(e.to_string()),
            };
            match found {
                Ok(binding) => {
                    out.host.gpus.insert(r.clone(), binding);
                }
                Err(why) => missing.push(format!("{r} ({why})")),
            }
        }
        if !missing.is_empty() && !u.inherits {
            out.unresolved.push(
                Diagnostic::warning(
                    u.key(),
                    format!(
                        "{}: not resolved on this host: {}",
                        u.who(),
                        missing.join("; ")
                    ),
                )
                .help("Citadel binds a GPU by its UUID and device minor, which it asks the NVIDIA driver for (`nvidia-smi -L` lists the GPUs); see docs/gpus.md. `install` refuses until every GPU resolves"),
            );
        }
    }
    out.errors = duplicate_gpus(&users, &out.host);
    let host = &out.host;
    // Shared by the same models under the same text: the config's check
    // reported it already (it was printed twice). The config checks each
    // model's own `gpus` (instance 1); a set with a further instance in it is
    // this check's to report.
    let by_text: BTreeSet<Vec<&str>> = shared_gpus(&settings.models, GpuRef::to_string)
        .iter()
        .map(|s| s.models.iter().map(|m| m.name.as_str()).collect())
        .collect();
    let models: Vec<Model> = users.iter().map(|u| u.model.clone()).collect();
    for shared in shared_gpus(&models, |r| host.identity(r)) {
        let who: Vec<&User> = shared
            .models
            .iter()
            .filter_map(|m| models.iter().position(|o| std::ptr::eq(o, *m)))
            .map(|i| &users[i])
            .collect();
        let names: BTreeSet<String> = shared
            .models
            .iter()
            .flat_map(|m| &m.gpus)
            .filter(|r| host.identity(r) == shared.gpu)
            .map(ToString::to_string)
            .collect();
        let only_firsts = who.iter().all(|u| u.n == 1);
        let model_names: Vec<&str> = who.iter().map(|u| u.name.as_str()).collect();
        if only_firsts && (names.len() < 2 || by_text.contains(&model_names)) {
            continue;
        }
        // "GPU 0 (GPU-5d5b...)": the other names of the GPU, then its UUID.
        let others: Vec<String> = names.into_iter().filter(|n| *n != shared.gpu).collect();
        let gpu = if others.is_empty() {
            shared.gpu.clone()
        } else {
            format!("{} ({})", others.join(", "), shared.gpu)
        };
        let Some(mut d) = overcommit_warning(&shared, &gpu) else {
            continue;
        };
        if !only_firsts {
            name_instances(&mut d, &shared, &who);
        }
        out.warnings.push(d);
    }
    out.warnings.extend(mig_and_whole(&users, &out.host));
    out
}

/// The config's overcommit warning names each user by its model's name
/// (`` `phi3` (0.9) and `phi3` (0.9) ``): name the instances (`phi3:2`) and
/// place the warning at the last one's `gpus`.
fn name_instances(d: &mut Diagnostic, shared: &SharedGpu<'_>, who: &[&User]) {
    let mut at = d.message.find(" is shared by ").unwrap_or(0);
    for (m, u) in shared.models.iter().zip(who) {
        if gpu_memory_fraction(&m.engine).is_none() {
            continue;
        }
        let old = format!("`{}` (", m.name);
        let Some(i) = d.message[at..].find(&old).map(|i| i + at) else {
            break;
        };
        let new = format!("`{}` (", u.name);
        d.message.replace_range(i..i + old.len(), &new);
        at = i + new.len();
    }
    if let Some(last) = who.last() {
        d.key = last.key();
    }
}

/// The entries of one instance that name one physical GPU twice: the same
/// UUID, or the same device minor where one of them is the whole GPU (two MIG
/// devices of one GPU are two devices).
fn duplicate_gpus(users: &[User], host: &Host) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for u in users.iter().filter(|u| !u.inherits) {
        let mut seen: Vec<(&GpuRef, &GpuBinding)> = Vec::new();
        for (i, r) in u.model.gpus.iter().enumerate() {
            let Some(b) = host.gpus.get(r) else { continue };
            let same = seen.iter().find(|(o, ob)| {
                ob.uuid == b.uuid || (ob.minor == b.minor && (!o.is_mig() || !r.is_mig()))
            });
            if let Some((other, _)) = same {
                out.push(
                    Diagnostic::error(
                        format!("{}[{i}]", u.key()),
                        format!(
                            "{} names one GPU twice: {r} is {other} on this host ({}, /dev/nvidia{})",
                            u.who(), b.uuid, b.minor
                        ),
                    )
                    .help("list every GPU once: the engine would count it twice (e.g. `--tensor-parallel-size 2` on one GPU)"),
                );
            } else {
                seen.push((r, b));
            }
        }
    }
    out
}

/// A GPU that one instance uses whole while another uses a MIG device on it:
/// with MIG mode on, CUDA cannot use the GPU whole, and without it the MIG
/// device does not exist; either way the two compete for one GPU.
fn mig_and_whole(users: &[User], host: &Host) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (wi, whole) in users.iter().enumerate() {
        for r in whole.model.gpus.iter().filter(|r| !r.is_mig()) {
            let Some(b) = host.gpus.get(r) else { continue };
            for (mi, m) in users.iter().enumerate() {
                if mi == wi {
                    continue;
                }
                for mig in m.model.gpus.iter().filter(|g| g.is_mig()) {
                    let on_it = host.gpus.get(mig).is_some_and(|mb| mb.minor == b.minor);
                    if on_it && seen.insert((wi, mi, b.minor)) {
                        out.push(
                            Diagnostic::warning(
                                m.key(),
                                format!(
                                    "{r} ({}) is used whole by `{}` while `{}` uses its MIG device {mig}: with MIG mode on, CUDA cannot use the GPU whole",
                                    b.uuid, whole.name, m.name
                                ),
                            )
                            .help("give the whole-GPU model another GPU, or a MIG device of its own (docs/gpus.md)"),
                        );
                    }
                }
            }
        }
    }
    out
}

/// The binding of one entry, or why there is none.
fn find(devices: &[DeviceInfo], r: &GpuRef) -> Result<GpuBinding, String> {
    let have = || {
        let indexes: Vec<String> = devices.iter().map(|d| d.index.to_string()).collect();
        if indexes.is_empty() {
            "the driver lists no GPU".to_owned()
        } else {
            format!("the driver lists GPUs {}", indexes.join(", "))
        }
    };
    let (device, uuid) = match r {
        GpuRef::Index(i) => {
            let d = devices
                .iter()
                .find(|d| d.index == *i)
                .ok_or_else(|| format!("no such index; {}", have()))?;
            (d, d.uuid.clone())
        }
        GpuRef::Gpu(u) => {
            let d = devices
                .iter()
                .find(|d| d.uuid == *u)
                .ok_or_else(|| format!("no GPU has this UUID; {}", have()))?;
            (d, u.clone())
        }
        GpuRef::Mig(u) => {
            let d = match r.mig_parent() {
                Some(parent) => devices.iter().find(|d| d.uuid == parent),
                None => devices.iter().find(|d| d.migs.contains(u)),
            }
            .ok_or("no GPU lists this MIG device (`nvidia-smi -L`)")?;
            (d, u.clone())
        }
    };
    let minor = device.minor.ok_or_else(|| {
        format!(
            "no device minor for {} in /proc/driver/nvidia/gpus/{}/information",
            device.uuid, device.pci
        )
    })?;
    Ok(GpuBinding { uuid, minor })
}

/// Places `diags` at their `gpus` values in the config `source`, so that
/// reports show file:line:col (the model's own `gpus`, else the default's).
pub fn locate(source: &str, diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
    let Ok(doc) = toml_edit::ImDocument::parse(source) else {
        return diags;
    };
    // `models.NAME.gpus`, or `models.NAME.gpus[I]` for entry I; an instance's
    // `models.NAME.instances[J].gpus[I]` (its own, else the model's).
    let span_of = |key: &str| -> Option<std::ops::Range<usize>> {
        let (key, entry) = match key.strip_suffix(']').and_then(|k| k.rsplit_once("[")) {
            Some((k, i)) => (k, i.parse::<usize>().ok()),
            None => (key, None),
        };
        let owner = key.strip_prefix("models.")?.strip_suffix(".gpus")?;
        let (model, instance) = match owner
            .strip_suffix(']')
            .and_then(|o| o.rsplit_once(".instances["))
        {
            Some((m, j)) => (m, Some(j.parse::<usize>().ok()?)),
            None => (owner, None),
        };
        let table = doc.get("models").and_then(|m| m.get(model));
        let item = instance
            .and_then(|j| table?.get("instances")?.get(j)?.get("gpus"))
            .or_else(|| table.and_then(|m| m.get("gpus")))
            .or_else(|| doc.get("model_defaults").and_then(|m| m.get("gpus")))?;
        let at = entry.and_then(|i| item.as_array()?.get(i)?.span());
        at.or_else(|| item.span())
    };
    diags
        .into_iter()
        .map(|d| {
            if d.span.is_some() {
                return d;
            }
            let at = span_of(&d.key);
            d.at(at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const QUERY: &str = "0, GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77, 00000000:3B:00.0\n\
                         1, GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789, 00000000:86:00.0\n\
                         2, [N/A], 00000000:AF:00.0\n";

    #[test]
    fn query_lines_are_parsed_and_bad_ones_skipped() {
        let gpus = parse_query(QUERY);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].index, 0);
        assert_eq!(gpus[0].pci.to_string(), "0000:3b:00.0");
        assert_eq!(gpus[1].uuid, "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789");
    }

    #[test]
    fn information_file_gives_the_minor() {
        let text = "Model: \t\t NVIDIA A100-SXM4-40GB\nIRQ:   \t\t 150\nGPU UUID: \t GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77\nVideo BIOS: \t 92.00.19.00.01\nBus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\nBus Location: \t 0000:3b:00.0\nDevice Minor: \t 1\nGPU Excluded:\t No\n";
        let info = parse_information(text);
        assert_eq!(info.minor, Some(1));
        assert_eq!(info.pci, Pci::parse("00000000:3B:00.0"));
        assert_eq!(
            info.uuid.as_deref(),
            Some("GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77")
        );
    }

    #[test]
    fn list_gives_mig_devices_under_their_gpu() {
        let text = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)\n  MIG 1g.5gb      Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)\nGPU 1: NVIDIA A100 (UUID: GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789)\n";
        let list = parse_list(text);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].1, ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"]);
        assert!(list[1].1.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The driver's output is outside input: its parsers never panic.
        #[test]
        fn issue10_gpu_driver_parsers_never_panic(text in "\\PC{0,300}") {
            let _ = parse_query(&text);
            let _ = parse_information(&text);
            let _ = parse_list(&text);
            let _ = Pci::parse(&text);
        }

        #[test]
        fn issue10_gpu_driver_parsers_never_panic_on_near_misses(
            index in "[0-9N/A\\[\\] ]{0,4}",
            uuid in "(GPU-|MIG-)?[0-9a-fA-F-]{0,40}",
            pci in "[0-9a-fA-F:.]{0,20}",
            minor in "[0-9 -]{0,12}",
        ) {
            let _ = parse_query(&format!("{index}, {uuid}, {pci}\n"));
            let _ = parse_information(&format!("Bus Location: {pci}\nDevice Minor: {minor}\nGPU UUID: {uuid}\n"));
            let _ = parse_list(&format!("GPU {index}: X (UUID: {uuid})\n  MIG 1g Device 0: (UUID: {uuid}\n"));
        }
    }
}
