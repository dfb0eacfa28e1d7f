//! Snapshot tests: the command line and environment of every engine profile.

use std::path::{Path, PathBuf};

use citadel_supervisor::profile::{engine_command, EngineDirs};

const CONFIG: &str = r#"
[models.mixtral]
port = 11400
python = "/opt/citadel/env/bin/python"
model = "/opt/citadel/models/mixtral-8x7b-instruct"
gpus = [0, 1]
gpu_memory_utilization = 0.9
max_model_len = 32768
args = ["--enforce-eager"]
env = { VLLM_LOGGING_LEVEL = "INFO" }

[models.hermes]
port = 11401
model = "/opt/citadel/models/nous-hermes-2-mistral-7b"
gpus = [2]
max_model_len = 8192

[models.phi3-gguf]
engine = "llama-cpp"
port = 11410
model = "/opt/citadel/models/phi3.gguf"
parallel = 4
gpus = [3]
args = ["--n-gpu-layers", "99"]

[models.llama3]
engine = "ollama"
port = 11411
model = "llama3:8b"

[models.zephyr]
engine = "tgi"
port = 11412
model = "/opt/citadel/models/zephyr-7b"
gpus = [4, 5]

[models.custom]
engine = "command"
port = 11413
command = ["/usr/local/bin/my-server", "--listen", "{host}:{port}", "--name", "{name}"]
health_path = "/ready"
args = ["--threads", "8"]
env = { MY_SERVER_LOG = "info,http=debug" }

[models.sim]
engine = "sim"
port = 11414
args = ["--load-time", "2s", "--tokens-per-second", "50"]
"#;

fn render(name: &str) -> String {
    let loaded =
        citadel_config::parse(CONFIG, Path::new("citadel.toml")).expect("test config is valid");
    let model = loaded.settings.model(name).expect("model in test config");
    let dirs = EngineDirs {
        cache: PathBuf::from(format!("/var/cache/citadel/{name}")),
        models: loaded.settings.paths.models.join("ollama"),
    };
    engine_command(model, &dirs).to_string()
}

#[test]
fn vllm_two_gpus() {
    insta::assert_snapshot!(render("mixtral"));
}

#[test]
fn vllm_one_gpu() {
    insta::assert_snapshot!(render("hermes"));
}

#[test]
fn llama_cpp() {
    insta::assert_snapshot!(render("phi3-gguf"));
}

#[test]
fn ollama() {
    insta::assert_snapshot!(render("llama3"));
}

#[test]
fn tgi() {
    insta::assert_snapshot!(render("zephyr"));
}

#[test]
fn command() {
    insta::assert_snapshot!(render("custom"));
}

#[test]
fn sim() {
    insta::assert_snapshot!(render("sim"));
}

/// Issue 10, item 5: the supervisor sets no CUDA_VISIBLE_DEVICES of its own
/// (it set the configured indexes, which inside the unit's device cgroup name
/// the wrong GPU or none): the unit's `Environment=` (UUIDs) is the one source.
/// A GPU named by UUID counts like an index for tensor parallelism.
#[test]
fn issue10_gpu_supervisor_leaves_cuda_visible_devices_to_the_unit() {
    for name in ["mixtral", "hermes", "phi3-gguf", "zephyr"] {
        assert!(!render(name).contains("CUDA_VISIBLE_DEVICES"), "{name}");
    }
    let text = CONFIG.replace(
        "gpus = [0, 1]",
        "gpus = [0, \"GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77\"]",
    );
    let loaded = citadel_config::parse(&text, Path::new("citadel.toml")).expect("valid");
    let dirs = EngineDirs {
        cache: PathBuf::from("/var/cache/citadel/mixtral"),
        models: PathBuf::from("/opt/citadel/models/ollama"),
    };
    let cmd = engine_command(loaded.settings.model("mixtral").unwrap(), &dirs);
    let tp = cmd.args.iter().position(|a| a == "--tensor-parallel-size");
    assert_eq!(tp.map(|i| cmd.args[i + 1].as_str()), Some("2"));
    assert!(!cmd.env.contains_key("CUDA_VISIBLE_DEVICES"));
}
