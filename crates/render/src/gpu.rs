//! GPU binding in the model drop-ins (issue 10, item 5).
//!
//! Inside a unit's device cgroup (`DevicePolicy=closed` + `DeviceAllow=`), CUDA
//! and NVML enumerate only the devices the process may open, renumbered from
//! 0; and an nvidia-smi index need not be the device minor. So a configured GPU
//! is bound by identity: the CLI resolves each entry of `gpus` through the
//! driver into a [`GpuBinding`] (UUID and minor) and passes them in a [`Host`];
//! the drop-in allows `/dev/nvidia<minor>` and sets
//! `CUDA_VISIBLE_DEVICES=<uuid>,...` with `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
//!
//! Rendering stays pure and cannot fail: an entry the host did not resolve
//! (rendering on a machine without the driver) is rendered as well as it can
//! be, with a comment: an index as `/dev/nvidia<index>` (the common case, not
//! a guarantee) and no `CUDA_VISIBLE_DEVICES` unless every entry is a UUID, so
//! that the device cgroup alone decides what CUDA sees. `install` refuses
//! unresolved entries, so such a unit is never installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use citadel_config::{GpuRef, Model, Settings};

use crate::writer::{EnvAssignment, UnitNames, UnitPath, UnitWriter};
use crate::{FileKind, RenderedFile};

/// What one configured GPU is on the host, as the driver says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuBinding {
    /// What `CUDA_VISIBLE_DEVICES` names: `GPU-<uuid>`, or the `MIG-...` UUID
    /// of a MIG device.
    pub uuid: String,
    /// The device minor, `/dev/nvidia<minor>` (of the parent GPU for a MIG device).
    pub minor: u32,
}

/// Facts about the host the units are rendered for, found outside rendering
/// (the CLI's `gpu` module reads the driver). The default knows nothing:
/// [`crate::render`] renders with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    /// The configured GPU entries the driver resolved.
    pub gpus: BTreeMap<GpuRef, GpuBinding>,
}

impl Host {
    /// Which device an entry is, for finding models that share one: the
    /// resolved UUID, else the entry as written.
    pub fn identity(&self, r: &GpuRef) -> String {
        match self.gpus.get(r) {
            Some(b) => b.uuid.clone(),
            None => r.to_string(),
        }
    }
}

/// The name of the modules-load.d file (below `modules-load.d/`).
pub const MODULES_LOAD_FILE: &str = "modules-load.d/citadel-nvidia.conf";

/// `modules-load.d/citadel-nvidia.conf` when any model (or instance) has GPUs: the driver and
/// `nvidia-uvm` loaded at boot. The units cannot load them on demand:
/// `NoNewPrivileges=yes` and the empty capability set stop the setuid
/// `nvidia-modprobe` that CUDA would run, and `/dev/nvidia-uvm` must exist
/// before a model starts.
pub fn modules_load(settings: &Settings, header: &str) -> Option<RenderedFile> {
    let no_gpus = |m: &Model| m.gpus.is_empty() && m.instances.iter().all(|i| i.gpus.is_empty());
    if settings.models.iter().all(no_gpus) {
        return None;
    }
    let mut contents = header.to_owned();
    contents.push_str(
        "# NVIDIA kernel modules the model units need from boot on (docs/gpus.md): a unit\n\
         # cannot load them itself (NoNewPrivileges=yes stops nvidia-modprobe).\n\
         nvidia\n\
         nvidia-uvm\n",
    );
    Some(RenderedFile {
        path: PathBuf::from(MODULES_LOAD_FILE),
        kind: FileKind::ModulesLoad,
        contents,
    })
}

/// `After=` the model instances that share a GPU with `m` and come before it
/// (by port): engines on one GPU start one after another (vLLM's concurrent
/// start on one GPU is a known failure). Every local instance is a GPU user of
/// its own (issue 15): two instances on one GPU are ordered, instances on
/// different GPUs are not. `m` is the model as instance `instance` runs it; an
/// instance the config does not name (the CLI's temporary `NAME:surge`) starts
/// after every configured instance it shares a GPU with. Goes into the
/// drop-in's `[Unit]` section.
pub(crate) fn start_order(
    w: &mut UnitWriter,
    settings: &Settings,
    m: &Model,
    instance: &str,
    host: &Host,
) {
    let mut units = Vec::new();
    let mut users = Vec::new();
    for model in &settings.models {
        for (n, inst) in model.local_instances() {
            units.push(model.instance_unit(n));
            users.push(inst);
        }
    }
    let unit = crate::units::instance_unit_name(instance);
    let configured = units.iter().position(|u| *u == unit);
    let me = match configured {
        Some(i) => {
            users[i] = m.clone();
            i
        }
        None => {
            units.push(unit);
            users.push(m.clone());
            users.len() - 1
        }
    };
    let index = |o: &Model| users.iter().position(|u| std::ptr::eq(u, o));
    let before: BTreeSet<String> = citadel_config::gpu::shared_gpus(&users, |r| host.identity(r))
        .iter()
        .filter(|s| s.models.iter().any(|o| index(o) == Some(me)))
        .flat_map(|s| {
            let others = s.models.iter().filter_map(|o| index(o));
            if configured.is_some() {
                others.take_while(|i| *i != me).collect::<Vec<_>>()
            } else {
                others.filter(|i| *i != me).collect()
            }
        })
        .map(|i| units[i].clone())
        .collect();
    if before.is_empty() {
        return;
    }
    w.comment("Shares a GPU with these models: start after them (two engines loading onto one")
        .comment("GPU at once can fail), so their memory is taken before this one sizes its own.")
        .set("After", UnitNames::new(before));
}

/// `CUDA_DEVICE_ORDER` and `CUDA_VISIBLE_DEVICES` for `m`.
pub(crate) fn environment(w: &mut UnitWriter, m: &Model, host: &Host) {
    if m.gpus.is_empty() {
        return;
    }
    w.set(
        "Environment",
        EnvAssignment::new("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    );
    let uuids: Option<Vec<String>> = m
        .gpus
        .iter()
        .map(|g| {
            host.gpus
                .get(g)
                .map(|b| b.uuid.clone())
                .or_else(|| g.uuid().map(str::to_owned))
        })
        .collect();
    match uuids {
        Some(uuids) => {
            w.set(
                "Environment",
                EnvAssignment::new("CUDA_VISIBLE_DEVICES", uuids.join(",")),
            );
        }
        None => {
            w.comment(
                "CUDA_VISIBLE_DEVICES is not set: a GPU index was not resolved where this was",
            )
            .comment("rendered (no NVIDIA driver); the device cgroup below decides what CUDA sees.")
            .comment("`citadel-systemd install` resolves indexes to UUIDs on the GPU host.");
        }
    }
}

/// The device cgroup for `m`: its GPUs' device nodes, the control, UVM and
/// MIG capability devices, nothing else.
pub(crate) fn devices(w: &mut UnitWriter, m: &Model, host: &Host) {
    if m.gpus.is_empty() {
        return;
    }
    w.comment("GPU access: only this model's GPUs, the control and UVM devices.")
        .set("PrivateDevices", "no")
        .set("DevicePolicy", "closed")
        .set("DeviceAllow", "/dev/nvidiactl rw");
    let mut minors = BTreeSet::new();
    for g in &m.gpus {
        let minor = match (host.gpus.get(g), g) {
            (Some(b), _) => {
                w.comment(&format!("{g}: {} is /dev/nvidia{}", b.uuid, b.minor));
                Some(b.minor)
            }
            (None, GpuRef::Index(i)) => {
                w.comment(&format!(
                    "{g}: not resolved where this was rendered; assumed to be /dev/nvidia{i}"
                ));
                Some(*i)
            }
            (None, _) => {
                w.comment(&format!(
                    "{g}: not resolved where this was rendered; no device allowed for it"
                ));
                None
            }
        };
        if let Some(minor) = minor.filter(|n| minors.insert(*n)) {
            let device = PathBuf::from(format!("/dev/nvidia{minor}"));
            w.set("DeviceAllow", UnitPath::device(&device, "rw"));
        }
    }
    if m.gpus.iter().any(GpuRef::is_mig) {
        w.comment("MIG devices are opened through their capability devices (/dev/nvidia-caps).");
    }
    w.set("DeviceAllow", "char-nvidia-uvm rw")
        .set("DeviceAllow", "char-nvidia-caps r");
}
