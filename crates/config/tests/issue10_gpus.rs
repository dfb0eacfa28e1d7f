//! Regression tests for issue 10, item 5 (GPU binding), the config's share:
//! `gpus` takes indexes, GPU UUIDs and MIG UUIDs, refuses anything else and
//! duplicates with a located hint, and warns when models sharing a GPU claim
//! more than all of its memory. Each failed before the fix (strings were a
//! type error; nothing summed `gpu_memory_utilization`).

use std::path::Path;

use citadel_config::{parse, ConfigError, GpuRef};
use proptest::prelude::*;

const FILE: &str = "/etc/citadel/citadel.toml";
const UUID: &str = "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77";
const MIG: &str = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f";

fn model(name: &str, port: u16, gpus: &str, extra: &str) -> String {
    format!(
        "[models.{name}]\nport = {port}\nengine = \"vllm\"\nmodel = \"/opt/citadel/models/{name}\"\ngpus = {gpus}\n{extra}"
    )
}

fn errors(text: &str) -> String {
    match parse(text, Path::new(FILE)) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(ConfigError::Invalid(r)) => r.to_string(),
        Err(e) => panic!("{e}"),
    }
}

fn warnings(text: &str) -> String {
    match parse(text, Path::new(FILE)) {
        Ok(l) => l.report.to_string(),
        Err(e) => panic!("config was refused:\n{text}\n{e}"),
    }
}

#[test]
fn issue10_gpu_accepts_index_gpu_uuid_and_mig_uuid() {
    let text = model("a", 11400, &format!("[0, \"{UUID}\"]"), "")
        + &model("b", 11401, &format!("[\"{MIG}\"]"), "")
        + &model(
            "c",
            11402,
            "[\"MIG-GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77/7/0\"]",
            "",
        )
        // Upper-case hex, as some tools print it: the same UUID, canonical.
        + &model("d", 11403, &format!("[\"{}\"]", UUID.to_uppercase()), "");
    let loaded = parse(&text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
    let gpus = |name: &str| loaded.settings.model(name).unwrap().gpus.clone();
    assert_eq!(
        gpus("a"),
        [GpuRef::Index(0), GpuRef::Gpu(UUID.into())],
        "{:?}",
        gpus("a")
    );
    assert_eq!(gpus("b"), [GpuRef::Mig(MIG.into())]);
    assert_eq!(
        gpus("c")[0].mig_parent().as_deref(),
        Some("GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77")
    );
    assert_eq!(gpus("d"), [GpuRef::Gpu(UUID.into())]);
}

#[test]
fn issue10_gpu_refuses_garbage_with_a_located_hint() {
    let text = model(
        "a",
        11400,
        "[\"GPU-nothex\", \"2\", 64, -1, \"/dev/nvidia0\", 1.5]",
        "",
    );
    let r = errors(&text);
    for needle in [
        "`GPU-nothex` is not a GPU UUID or a MIG device UUID",
        "`2` is a GPU index written as a string; write it without quotes",
        "GPU index 64 is out of range (0 to 63)",
        "GPU index -1 is out of range",
        "`/dev/nvidia0` is not a GPU UUID",
        "expected a GPU index (integer) or UUID (string) in the array, found a float",
        "as `nvidia-smi -L` prints them",
        // Located at the entry itself: line 5, the column of each value.
        "citadel.toml:5:9",
        "citadel.toml:5:23",
    ] {
        assert!(r.contains(needle), "missing {needle:?} in:\n{r}");
    }
}

#[test]
fn issue10_gpu_refuses_duplicates() {
    let r = errors(&model(
        "a",
        11400,
        &format!("[1, 1, \"{UUID}\", \"{}\"]", UUID.to_uppercase()),
        "",
    ));
    assert!(r.contains("GPU 1 is listed twice"), "{r}");
    assert!(r.contains(&format!("{UUID} is listed twice")), "{r}");
}

#[test]
fn issue10_gpu_shared_gpu_memory_over_one_warns() {
    // Two vLLM models on GPU 0, one with vLLM's default 0.9: 1.4 in total.
    let text = model("a", 11400, "[0]", "gpu_memory_utilization = 0.5\n")
        + &model("b", 11401, "[0, 1]", "");
    let w = warnings(&text);
    assert!(
        w.contains("GPU 0 is shared by `a` (0.5) and `b` (0.9, vLLM's default), which claim 1.40 of its memory together"),
        "{w}"
    );
    assert!(w.contains("(models.b.gpus)"), "{w}");
    assert!(w.contains("citadel.toml:11:8"), "{w}");
    // The same two models at 0.5 each fit: no warning.
    let fits = model("a", 11400, "[0]", "gpu_memory_utilization = 0.5\n")
        + &model("b", 11401, "[0, 1]", "gpu_memory_utilization = 0.5\n");
    assert_eq!(warnings(&fits), "");
    // The same UUID is the same GPU before any resolution.
    let by_uuid = model("a", 11400, &format!("[\"{UUID}\"]"), "")
        + &model("b", 11401, &format!("[\"{UUID}\"]"), "");
    assert!(warnings(&by_uuid).contains(&format!("{UUID} is shared by")));
}

#[test]
fn issue10_gpu_mig_with_other_devices_warns() {
    let w = warnings(&model("a", 11400, &format!("[\"{MIG}\", 1]"), ""));
    assert!(
        w.contains("CUDA uses only one MIG device per process"),
        "{w}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Parsing a `gpus` string never panics, and what it accepts prints back
    /// as a canonical form that parses to the same reference.
    #[test]
    fn issue10_gpu_parse_never_panics(s in "\\PC{0,60}|(GPU-|MIG-|MIG-GPU-|gpu-)[0-9a-fA-F/-]{0,50}") {
        if let Ok(r) = GpuRef::parse(&s) {
            let again = GpuRef::parse(r.uuid().unwrap_or_default());
            prop_assert_eq!(again, Ok(r));
        }
    }

    /// Any array of integers and strings in `gpus` gives a config or a report,
    /// never a panic.
    #[test]
    fn issue10_gpu_arbitrary_arrays_never_panic(
        entries in proptest::collection::vec(
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
                Just(format!("{UUID:?}")),
            ],
            0..6,
        )
    ) {
        let text = model("a", 11400, &format!("[{}]", entries.join(", ")), "");
        let _ = parse(&text, Path::new(FILE));
    }
}
