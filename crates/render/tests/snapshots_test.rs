//! Snapshot tests of every rendered file, for the stacks operators are likely to
//! run: the spec's default stack, one model, eight models and a GPU model.
//! Review changes with `cargo insta review` (or INSTA_UPDATE=always, then git diff).

use std::path::Path;

use citadel_config::{parse, Settings};
use citadel_render::render;

fn settings(text: &str) -> Settings {
    match parse(text, Path::new("/opt/citadel/config/citadel.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    }
}

fn snapshot_all(stack: &str, s: &Settings) {
    let rendered = render(s);
    for f in &rendered.files {
        let name = format!("{stack}__{}", f.path.display()).replace(['/', '@'], "_");
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

#[test]
fn gpu_model() {
    snapshot_all("gpu", &settings(GPU_MODEL));
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
        10,
        "target, gateway and 8 models: {:?}",
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

#[test]
fn gpu_model_gets_only_its_devices() {
    let rendered = render(&settings(GPU_MODEL));
    let c = &rendered
        .file("citadel-model@mixtral.service.d/50-citadel.conf")
        .unwrap()
        .contents;
    assert!(c.contains("PrivateDevices=no\nDevicePolicy=closed\n"));
    assert!(c.contains("DeviceAllow=/dev/nvidia0 rw\nDeviceAllow=/dev/nvidia1 rw\n"));
    assert!(!c.contains("/dev/nvidia2"));
    assert!(c.contains("Environment=CUDA_VISIBLE_DEVICES=0,1\n"));
}

#[test]
fn privileged_gateway_port_keeps_only_bind_capability() {
    let rendered = render(&settings(&eight_models()));
    let c = &rendered.file("citadel-gateway.service").unwrap().contents;
    assert!(c.contains(
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"
    ));
    assert!(c.contains("PrivateUsers=no"));
}
