//! Snapshot tests of every rendered file, for the stacks operators are likely to
//! run: the spec's default stack, one model, eight models and a GPU model.
//! Review changes with `cargo insta review` (or INSTA_UPDATE=always, then git diff).

use std::path::Path;

use citadel_config::{parse, GpuRef, Settings};
use citadel_render::{render, render_with, GpuBinding, Host};

fn settings(text: &str) -> Settings {
    match parse(text, Path::new("/opt/citadel/config/citadel.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    }
}

fn snapshot_all(stack: &str, s: &Settings) {
    snapshot_all_on(stack, s, &Host::default());
}

fn snapshot_all_on(stack: &str, s: &Settings, host: &Host) {
    let rendered = render_with(s, host);
    for f in &rendered.files {
        let name = format!("{stack}__{}", f.path.display()).replace(['/', '@', ':'], "_");
        insta::assert_snapshot!(name, &f.contents);
    }
}

const ONE_MODEL: &str = r#"
[gateway]
auth = false

[models.phi3]
port = 11403
engine = "llama-cpp"
model = "/opt/citadel/models/phi-3-mini.Q4_K_M.gguf"
parallel = 4
memory_max = "8G"
cpus = 2
"#;

const GPU_MODEL: &str = r#"
[models.mixtral]
port = 11400
engine = "vllm"
model = "/opt/citadel/models/mixtral-8x7b-instruct"
gpus = [0, 1]
gpu_memory_utilization = 0.9
env = { VLLM_ATTENTION_BACKEND = "FLASHINFER", "NCCL_DEBUG" = "WARN 50%" }
credentials = { hf-token = "/etc/citadel/credentials/hf-token" }
memory_max = "90G"
memory_high = "85G"
cpus = 8
memlock = "infinity"
start_timeout = "45min"
"#;

fn eight_models() -> String {
    let engines = [
        "vllm",
        "llama-cpp",
        "ollama",
        "tgi",
        "command",
        "sim",
        "vllm",
        "sim",
    ];
    let mut text = String::from("[gateway]\nlisten = \"0.0.0.0\"\nport = 443\n");
    for (i, engine) in engines.iter().enumerate() {
        text.push_str(&format!(
            "\n[models.m{i}]\nport = {}\nengine = \"{engine}\"\n",
            11400 + i
        ));
        match *engine {
            "vllm" | "ollama" | "tgi" => text.push_str(&format!("model = \"/opt/citadel/models/m{i}\"\n")),
            "llama-cpp" => text.push_str(&format!("model = \"/opt/citadel/models/m{i}.gguf\"\n")),
            "command" => text.push_str("command = [\"/usr/local/bin/my-engine\", \"--listen\", \"127.0.0.1:11404\"]\nhealth_path = \"/ready\"\n"),
            _ => {}
        }
    }
    text
}

#[test]
fn default_stack() {
    snapshot_all("default", &settings(citadel_config::EXAMPLE_CONFIG));
}

#[test]
fn sim_stack() {
    snapshot_all("sim", &settings(citadel_config::SIM_EXAMPLE_CONFIG));
}

#[test]
fn one_model() {
    snapshot_all("one", &settings(ONE_MODEL));
}

const UUID_A: &str = "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77";
const UUID_B: &str = "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789";

/// A host whose driver numbers the devices differently from nvidia-smi:
/// index 0 is /dev/nvidia1, index 1 is /dev/nvidia0.
fn swapped_minors() -> Host {
    let mut host = Host::default();
    host.gpus.insert(
        GpuRef::Index(0),
        GpuBinding {
            uuid: UUID_A.into(),
            minor: 1,
        },
    );
    host.gpus.insert(
        GpuRef::Index(1),
        GpuBinding {
            uuid: UUID_B.into(),
            minor: 0,
        },
    );
    host
}

/// The GPU model as `install` renders it on its host (indexes resolved).
#[test]
fn gpu_model() {
    snapshot_all_on("gpu", &settings(GPU_MODEL), &swapped_minors());
}

/// Issue 15: a model with further local instances, on the swapped-minors
/// host: instance 2 on its own GPU, instance 3 on the model's (so it starts
/// after instance 1).
const INSTANCES: &str = r#"
[gateway]
auth = false

[models.phi3]
port = 11403
engine = "vllm"
model = "/opt/citadel/models/phi-3-mini"
gpus = [0]
gpu_memory_utilization = 0.45
memory_max = "16G"
cpus = 4

[[models.phi3.instances]]
port = 11404
gpus = [1]

[[models.phi3.instances]]
port = 11405
"#;

#[test]
fn issue15_instances_stack() {
    snapshot_all_on("instances", &settings(INSTANCES), &swapped_minors());
}

#[test]
fn eight_models_render_one_drop_in_each() {
    let s = settings(&eight_models());
    let rendered = render(&s);
    let drop_ins = rendered
        .files
        .iter()
        .filter(|f| f.path.to_string_lossy().ends_with(".d/50-citadel.conf"))
        .count();
    assert_eq!(drop_ins, 8);
    assert_eq!(
        rendered.enable.len(),
        12,
        "target, gateway sockets (API, admin), gateway and 8 models: {:?}",
        rendered.enable
    );
    snapshot_all("eight", &s);
}

#[test]
fn rendering_is_deterministic() {
    let s = settings(&eight_models());
    assert_eq!(render(&s), render(&s));
}

#[test]
fn every_file_has_the_header() {
    for f in render(&settings(citadel_config::EXAMPLE_CONFIG)).files {
        assert!(
            f.contents.starts_with(citadel_render::GENERATED_MARK),
            "{}",
            f.path.display()
        );
        assert!(
            f.contents.contains("systemctl edit"),
            "{}",
            f.path.display()
        );
    }
}

#[test]
fn resource_values_are_literal() {
    let rendered = render(&settings(GPU_MODEL));
    let drop_in = rendered
        .file("citadel-model@mixtral.service.d/50-citadel.conf")
        .unwrap();
    for line in drop_in
        .contents
        .lines()
        .filter(|l| l.starts_with("Memory") || l.starts_with("CPUQuota") || l.starts_with("Limit"))
    {
        assert!(
            !line.contains('$'),
            "systemd does not expand variables in {line}"
        );
    }
    assert!(drop_in.contents.contains("MemoryMax=90G\n"));
    assert!(drop_in.contents.contains("CPUQuota=800%\n"));
    assert!(
        drop_in
            .contents
            .contains("\"Environment=NCCL_DEBUG=WARN 50%%\"")
            || drop_in
                .contents
                .contains("Environment=\"NCCL_DEBUG=WARN 50%%\"")
    );
}

fn drop_in(rendered: &citadel_render::Rendered, model: &str) -> String {
    rendered
        .file(&format!("citadel-model@{model}.service.d/50-citadel.conf"))
        .unwrap_or_else(|| panic!("no drop-in for {model}"))
        .contents
        .clone()
}

fn device_lines(c: &str) -> Vec<&str> {
    c.lines()
        .filter(|l| l.starts_with("DeviceAllow="))
        .collect()
}

#[test]
fn gpu_model_gets_only_its_devices() {
    let c = drop_in(&render(&settings(GPU_MODEL)), "mixtral");
    assert!(c.contains("PrivateDevices=no\nDevicePolicy=closed\n"));
    assert_eq!(
        device_lines(&c),
        [
            "DeviceAllow=/dev/nvidiactl rw",
            "DeviceAllow=/dev/nvidia0 rw",
            "DeviceAllow=/dev/nvidia1 rw",
            "DeviceAllow=char-nvidia-uvm rw",
            "DeviceAllow=char-nvidia-caps r",
        ]
    );
}

/// Issue 10, item 5: a resolved GPU is allowed by its device minor and named
/// to CUDA by its UUID (inside the device cgroup CUDA renumbers from 0, so an
/// index in CUDA_VISIBLE_DEVICES would name no GPU or the wrong one).
#[test]
fn issue10_gpu_binds_by_uuid_and_minor() {
    let c = drop_in(
        &render_with(&settings(GPU_MODEL), &swapped_minors()),
        "mixtral",
    );
    assert!(
        c.contains("Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\n"),
        "{c}"
    );
    assert!(
        c.contains(&format!(
            "Environment=CUDA_VISIBLE_DEVICES={UUID_A},{UUID_B}\n"
        )),
        "{c}"
    );
    assert_eq!(
        device_lines(&c),
        [
            "DeviceAllow=/dev/nvidiactl rw",
            "DeviceAllow=/dev/nvidia1 rw",
            "DeviceAllow=/dev/nvidia0 rw",
            "DeviceAllow=char-nvidia-uvm rw",
            "DeviceAllow=char-nvidia-caps r",
        ]
    );
    assert!(
        c.contains(&format!("# GPU 0: {UUID_A} is /dev/nvidia1\n")),
        "{c}"
    );
}

/// Issue 10, item 5: rendered without the driver (a build machine), an index
/// is not put into CUDA_VISIBLE_DEVICES, where it would mean another GPU;
/// the device cgroup alone decides, and a comment says why.
#[test]
fn issue10_gpu_unresolved_index_sets_no_cuda_visible_devices() {
    let c = drop_in(&render(&settings(GPU_MODEL)), "mixtral");
    assert!(!c.contains("CUDA_VISIBLE_DEVICES="), "{c}");
    assert!(c.contains("# CUDA_VISIBLE_DEVICES is not set"), "{c}");
    assert!(c.contains("# GPU 1: not resolved where this was rendered; assumed to be /dev/nvidia1"));
    // A UUID needs no driver to be named to CUDA.
    let by_uuid = GPU_MODEL.replace("gpus = [0, 1]", &format!("gpus = [\"{UUID_A}\"]"));
    let c = drop_in(&render(&settings(&by_uuid)), "mixtral");
    assert!(
        c.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={UUID_A}\n")),
        "{c}"
    );
    assert_eq!(
        device_lines(&c)[1..],
        [
            "DeviceAllow=char-nvidia-uvm rw",
            "DeviceAllow=char-nvidia-caps r"
        ],
        "an unresolved UUID allows no GPU device: {c}"
    );
}

/// Issue 10, item 5: a MIG device is allowed through its parent GPU's minor
/// and the capability devices, and named by its MIG UUID.
#[test]
fn issue10_gpu_mig_device_uses_its_parents_minor() {
    let mig = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f";
    let text = GPU_MODEL.replace("gpus = [0, 1]", &format!("gpus = [\"{mig}\"]"));
    let s = settings(&text);
    let mut host = Host::default();
    host.gpus.insert(
        GpuRef::Mig(mig.into()),
        GpuBinding {
            uuid: mig.into(),
            minor: 2,
        },
    );
    let c = drop_in(&render_with(&s, &host), "mixtral");
    assert!(
        c.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={mig}\n")),
        "{c}"
    );
    assert!(c.contains("DeviceAllow=/dev/nvidia2 rw\n"), "{c}");
    assert!(c.contains("DeviceAllow=char-nvidia-caps r\n"), "{c}");
}

/// Issue 10, item 5: models that share a GPU start one after another (the
/// later by port `After=` the earlier), also when one names the GPU by index
/// and the other by UUID (found once the index is resolved).
#[test]
fn issue10_gpu_models_sharing_a_gpu_start_one_after_another() {
    let rendered = render(&settings(citadel_config::EXAMPLE_CONFIG));
    let phi3 = drop_in(&rendered, "phi3");
    assert!(
        phi3.contains("\nAfter=citadel-model@openchat.service\n"),
        "{phi3}"
    );
    for other in ["mixtral", "hermes", "openchat"] {
        assert!(!drop_in(&rendered, other).contains("\nAfter="), "{other}");
    }
    let mixed = format!(
        "[models.a]\nport = 11401\nengine = \"sim\"\ngpus = [0]\n\
         [models.b]\nport = 11400\nengine = \"sim\"\ngpus = [\"{UUID_A}\"]\n"
    );
    let s = settings(&mixed);
    assert!(!drop_in(&render(&s), "a").contains("After="));
    let mut host = swapped_minors();
    host.gpus.insert(
        GpuRef::Gpu(UUID_A.into()),
        GpuBinding {
            uuid: UUID_A.into(),
            minor: 1,
        },
    );
    let rendered = render_with(&s, &host);
    // b has the lower port: a starts after it.
    assert!(drop_in(&rendered, "a").contains("\nAfter=citadel-model@b.service\n"));
    assert!(!drop_in(&rendered, "b").contains("After="));
}

/// Issue 10, item 5: the NVIDIA modules are loaded at boot when a model has
/// GPUs (a unit cannot load them: NoNewPrivileges=yes), and only then.
#[test]
fn issue10_gpu_modules_load_ships_with_gpu_models_only() {
    let gpu = render(&settings(GPU_MODEL));
    let f = gpu
        .file(citadel_render::MODULES_LOAD_FILE)
        .expect("modules-load.d file");
    assert_eq!(f.kind, citadel_render::FileKind::ModulesLoad);
    let modules: Vec<&str> = f.contents.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(modules, ["nvidia", "nvidia-uvm"]);
    assert_eq!(
        f.install_path(Path::new("/")),
        Path::new("/usr/local/lib/modules-load.d/citadel-nvidia.conf")
    );
    let none = render(&settings(ONE_MODEL));
    assert!(none.file(citadel_render::MODULES_LOAD_FILE).is_none());
}

/// Issue 12, item 1: PID 1 binds the gateway's socket (`citadel-gateway.socket`),
/// a privileged port too, so the gateway keeps no capability at all (it had
/// CAP_NET_BIND_SERVICE and no user namespace for port 443).
#[test]
fn privileged_gateway_port_needs_no_capability() {
    let rendered = render(&settings(&eight_models()));
    let c = &rendered.file("citadel-gateway.service").unwrap().contents;
    assert!(!c.contains("CAP_NET_BIND_SERVICE"), "{c}");
    assert!(
        c.contains(
            "CapabilityBoundingSet=
"
        ),
        "{c}"
    );
    assert!(
        c.contains(
            "PrivateUsers=yes
"
        ),
        "{c}"
    );
    let socket = &rendered.file("citadel-gateway.socket").unwrap().contents;
    assert!(
        socket.contains(
            "ListenStream=0.0.0.0:443
"
        ),
        "{socket}"
    );
}
