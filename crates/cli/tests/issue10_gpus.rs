//! Issue 10, item 5: GPUs are bound by identity, resolved through the driver.
//! Each test runs the real `citadel-systemd` against a temporary root holding
//! a fake driver tree (`ROOT/proc/driver/nvidia/gpus/<pci>/information`, whose
//! device minors differ from the nvidia-smi indexes, as they may on a real
//! host) and a fake `nvidia-smi` first on PATH.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use harness::{bin_dir, Cli, Run};

const UUID_A: &str = "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77";
const UUID_B: &str = "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const MIG: &str = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f";

/// Index 0 is GPU A at 0000:3b:00.0, /dev/nvidia1; index 1 is GPU B at
/// 0000:86:00.0, /dev/nvidia0. GPU A has one MIG device. Returns the
/// directory holding the fake `nvidia-smi` (to put first on PATH).
fn fake_driver(cli: &Cli) -> PathBuf {
    for (pci, uuid, minor) in [("0000:3b:00.0", UUID_A, 1), ("0000:86:00.0", UUID_B, 0)] {
        let dir = cli.path(&format!("/proc/driver/nvidia/gpus/{pci}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("information"),
            format!(
                "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 150\nGPU UUID: \t {uuid}\n\
                 Video BIOS: \t 96.00.74.00.0d\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n\
                 DMA Mask: \t 0xfffffffffffff\nBus Location: \t {pci}\nDevice Minor: \t {minor}\n\
                 GPU Excluded:\t No\n"
            ),
        )
        .unwrap();
    }
    let bin = cli.path("/fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let smi = bin.join("nvidia-smi");
    std::fs::write(
        &smi,
        format!(
            "#!/bin/sh\n\
             echo \"$@\" >> \"$(dirname \"$0\")/nvidia-smi.log\"\n\
             case \"$1 $2\" in\n\
             '--query-gpu=index,uuid,pci.bus_id --format=csv,noheader')\n\
               printf '0, {UUID_A}, 00000000:3B:00.0\\n1, {UUID_B}, 00000000:86:00.0\\n' ;;\n\
             '-L ')\n\
               printf 'GPU 0: NVIDIA H100 (UUID: {UUID_A})\\n  MIG 1g.10gb     Device  0: (UUID: {MIG})\\nGPU 1: NVIDIA H100 (UUID: {UUID_B})\\n' ;;\n\
             *) echo \"unexpected arguments: $*\" >&2; exit 2 ;;\n\
             esac\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn model(name: &str, port: u16, gpus: &str, extra: &str) -> String {
    format!(
        "[models.{name}]\nport = {port}\nengine = \"vllm\"\nmodel = \"/opt/citadel/models/{name}\"\ngpus = {gpus}\n{extra}"
    )
}

fn drop_in(cli: &Cli, name: &str) -> String {
    let p = cli.path(&format!(
        "/opt/citadel/config/systemd/citadel-model@{name}.service.d/50-citadel.conf"
    ));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs the CLI with `env` added to its scrubbed environment.
fn run_env(cli: &Cli, path: Option<&Path>, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = cli.command(args);
    if let Some(dir) = path {
        cmd.env(
            "PATH",
            format!("{}:{}", dir.display(), harness::SYSTEM_PATH),
        );
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run(cmd.output().expect("run citadel-systemd"))
}

#[test]
fn issue10_gpu_render_binds_indexes_by_uuid_and_minor() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(
        &(model("a", 11400, "[1]", "") + &model("b", 11401, &format!("[\"{UUID_A}\"]"), "")),
    );
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    assert!(!out.stderr().contains("not resolved"), "{}", out.stderr());
    let a = drop_in(&cli, "a");
    // Index 1 is /dev/nvidia0 on this host, and CUDA gets its UUID.
    assert!(a.contains("DeviceAllow=/dev/nvidia0 rw\n"), "{a}");
    assert!(!a.contains("DeviceAllow=/dev/nvidia1 rw"), "{a}");
    assert!(
        a.contains("Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\n"),
        "{a}"
    );
    assert!(
        a.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={UUID_B}\n")),
        "{a}"
    );
    let b = drop_in(&cli, "b");
    assert!(b.contains("DeviceAllow=/dev/nvidia1 rw\n"), "{b}");
    assert!(
        b.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={UUID_A}\n")),
        "{b}"
    );
    // No MIG device named: `nvidia-smi -L` was not needed.
    let log = std::fs::read_to_string(smi.join("nvidia-smi.log")).unwrap();
    assert_eq!(
        log,
        "--query-gpu=index,uuid,pci.bus_id --format=csv,noheader\n"
    );
    // The NVIDIA modules are loaded at boot.
    assert!(cli
        .path("/opt/citadel/config/systemd/modules-load.d/citadel-nvidia.conf")
        .is_file());
}

#[test]
fn issue10_gpu_mig_device_resolves_to_its_parents_minor() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(&model("a", 11400, &format!("[\"{MIG}\"]"), ""));
    cli.run_with_path(&smi, &["render"]).expect_code(0);
    let a = drop_in(&cli, "a");
    assert!(a.contains("DeviceAllow=/dev/nvidia1 rw\n"), "{a}");
    assert!(a.contains("DeviceAllow=char-nvidia-caps r\n"), "{a}");
    assert!(
        a.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={MIG}\n")),
        "{a}"
    );
}

/// An index and a UUID of the same GPU are found to be one GPU once resolved:
/// the models start one after another, and validate warns that their memory
/// shares add up past 1.0.
#[test]
fn issue10_gpu_shared_gpu_found_by_resolution_is_ordered_and_warned() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(
        &(model("a", 11400, "[0]", "")
            + &model(
                "b",
                11401,
                &format!("[\"{UUID_A}\"]"),
                "gpu_memory_utilization = 0.5\n",
            )),
    );
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    let b = drop_in(&cli, "b");
    assert!(b.contains("\nAfter=citadel-model@a.service\n"), "{b}");
    assert!(!drop_in(&cli, "a").contains("\nAfter="));
    let dir = bin_dir();
    let out = cli.run_with_path(&smi, &["validate", "--bin-dir", dir.to_str().unwrap()]);
    out.expect_code(0);
    let err = out.stderr();
    assert!(
        err.contains(&format!(
            "warning: GPU 0 ({UUID_A}) is shared by `a` (0.9, vLLM's default) and `b` (0.5), which claim 1.40 of its memory together"
        )),
        "{err}"
    );
    assert!(err.contains("citadel.toml:10:8  (models.b.gpus)"), "{err}");
}

/// Without the driver, `render` and `validate` warn and render a fallback;
/// `install` refuses, naming each GPU and why, at its place in the config.
#[test]
fn issue10_gpu_install_refuses_gpus_the_driver_does_not_resolve() {
    let cli = Cli::new();
    cli.write_config(&(model("a", 11400, "[0]", "") + &model("b", 11401, "[5]", "")));
    let no_driver = [("CITADEL_NVIDIA_SMI", "/nonexistent/nvidia-smi")];
    let out = run_env(&cli, None, &no_driver, &["render"]);
    out.expect_code(0);
    assert!(
        out.stderr().contains("warning: model `a`: not resolved on this host: GPU 0 (`/nonexistent/nvidia-smi` was not found (is the NVIDIA driver installed?))"),
        "{}",
        out.stderr()
    );
    assert!(!drop_in(&cli, "a").contains("CUDA_VISIBLE_DEVICES="));
    let bin = harness::bin();
    let bin_dir = Path::new(bin).parent().unwrap().to_str().unwrap();
    let out = run_env(
        &cli,
        None,
        &no_driver,
        &["install", "--dry-run", "--bin-dir", bin_dir],
    );
    out.expect_code(1);
    let err = out.stderr();
    assert!(
        err.contains("error: model `a`: not resolved on this host: GPU 0"),
        "{err}"
    );
    assert!(err.contains("citadel.toml:5:8  (models.a.gpus)"), "{err}");
    assert!(err.contains("docs/gpus.md"), "{err}");
    assert!(!out.stdout().contains("install plan"), "{}", out.stdout());

    // With the driver, an index it does not list is refused too.
    let smi = fake_driver(&cli);
    let out = cli.run_with_path(&smi, &["install", "--dry-run", "--bin-dir", bin_dir]);
    out.expect_code(1);
    let err = out.stderr();
    assert!(
        err.contains("error: model `b`: not resolved on this host: GPU 5 (no such index; the driver lists GPUs 0, 1)"),
        "{err}"
    );
    assert!(!err.contains("model `a`"), "{err}");
}

/// The proc root can be pointed elsewhere (a diagnostic override), like the
/// program: `CITADEL_PROC_ROOT` and `CITADEL_NVIDIA_SMI`.
#[test]
fn issue10_gpu_driver_locations_can_be_overridden() {
    let elsewhere = Cli::new();
    let smi = fake_driver(&elsewhere);
    let cli = Cli::new();
    cli.write_config(&model("a", 11400, "[0]", ""));
    let proc_root = elsewhere.path("/proc");
    let smi_path = smi.join("nvidia-smi");
    let out = run_env(
        &cli,
        None,
        &[
            ("CITADEL_PROC_ROOT", proc_root.to_str().unwrap()),
            ("CITADEL_NVIDIA_SMI", smi_path.to_str().unwrap()),
        ],
        &["render"],
    );
    out.expect_code(0);
    assert!(
        drop_in(&cli, "a").contains("DeviceAllow=/dev/nvidia1 rw\n"),
        "{}",
        out.stderr()
    );
}

/// Review of issue 10, item 5: one model could name one GPU twice
/// (`gpus = [0, "GPU-<uuid of 0>"]`): it passed validate, rendered
/// `CUDA_VISIBLE_DEVICES=UUID,UUID` (the engine counted two GPUs) and the
/// shared-memory warning was printed twice. Now every command refuses it,
/// at the entry, and the warning is printed once.
#[test]
fn review_gpu_same_gpu_twice_in_one_model_is_refused() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(
        &(model("a", 11400, &format!("[0, \"{UUID_A}\"]"), "")
            + &model(
                "b",
                11401,
                &format!("[\"{UUID_A}\"]"),
                "gpu_memory_utilization = 0.5\n",
            )),
    );
    let dir = bin_dir();
    let want = format!("error: model `a` names one GPU twice: {UUID_A} is GPU 0 on this host ({UUID_A}, /dev/nvidia1)");
    for args in [
        vec!["validate", "--bin-dir", dir.to_str().unwrap()],
        vec!["render"],
        vec!["install", "--dry-run", "--bin-dir", dir.to_str().unwrap()],
    ] {
        let out = cli.run_with_path(&smi, &args);
        out.expect_code(1);
        let err = out.stderr();
        assert!(err.contains(&want), "{args:?}: {err}");
        // At the second entry of line 5, `gpus = [0, "GPU-..."]`.
        assert!(
            err.contains("citadel.toml:5:12  (models.a.gpus[1])"),
            "{args:?}: {err}"
        );
        assert_eq!(
            err.matches("is shared by").count(),
            usize::from(args[0] != "install"),
            "{args:?}: {err}"
        );
    }
    assert!(!cli
        .path("/opt/citadel/config/systemd/citadel-model@a.service.d/50-citadel.conf")
        .exists());

    // The same minor through a MIG device and its whole GPU, and the same
    // GPU by index and UUID in the other order: refused too.
    cli.write_config(&model("a", 11400, &format!("[\"{MIG}\", 0]"), ""));
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(1);
    assert!(
        out.stderr()
            .contains("model `a` names one GPU twice: GPU 0 is"),
        "{}",
        out.stderr()
    );
    cli.write_config(&model("a", 11400, &format!("[\"{UUID_B}\", 1]"), ""));
    cli.run_with_path(&smi, &["render"]).expect_code(1);
    // Two different GPUs are fine.
    cli.write_config(&model("a", 11400, &format!("[0, \"{UUID_B}\"]"), ""));
    cli.run_with_path(&smi, &["render"]).expect_code(0);
}

/// Review of issue 10, item 5: a MIG device of a GPU that another model uses
/// whole got no warning; now validate and render warn, naming both.
#[test]
fn review_gpu_mig_device_of_a_gpu_used_whole_is_warned() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(
        &(model("a", 11400, "[0]", "") + &model("b", 11401, &format!("[\"{MIG}\"]"), "")),
    );
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    let err = out.stderr();
    assert!(
        err.contains(&format!(
            "warning: GPU 0 ({UUID_A}) is used whole by `a` while `b` uses its MIG device {MIG}"
        )),
        "{err}"
    );
    assert_eq!(err.matches("is used whole by").count(), 1, "{err}");
    assert!(err.contains("(models.b.gpus)"), "{err}");
    // Another GPU whole: no warning.
    cli.write_config(
        &(model("a", 11400, "[1]", "") + &model("b", 11401, &format!("[\"{MIG}\"]"), "")),
    );
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    assert!(!out.stderr().contains("used whole"), "{}", out.stderr());
}
