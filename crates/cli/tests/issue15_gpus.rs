//! Issue 15: every local instance of a model has GPUs of its own, resolved on
//! the host like the model's. Each test runs the real `citadel-systemd`
//! against a temporary root holding a fake driver tree, as in
//! `issue10_gpus.rs`: index 0 is GPU A (/dev/nvidia1), index 1 is GPU B
//! (/dev/nvidia0), and GPU A has one MIG device.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use harness::{bin_dir, Cli};

const UUID_A: &str = "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77";
const UUID_B: &str = "GPU-0a1b2c3d-4e5f-6789-abcd-ef0123456789";
const MIG: &str = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f";

/// The fake driver (see `issue10_gpus.rs`); returns the directory holding the
/// fake `nvidia-smi`.
fn fake_driver(cli: &Cli) -> PathBuf {
    for (pci, uuid, minor) in [("0000:3b:00.0", UUID_A, 1), ("0000:86:00.0", UUID_B, 0)] {
        let dir = cli.path(&format!("/proc/driver/nvidia/gpus/{pci}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("information"),
            format!(
                "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t {uuid}\n\
                 Bus Location: \t {pci}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n"
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

/// Model `phi3` on `gpus` (line 5 of the config) with instance 2 on port
/// 11404, whose `instance` lines follow (`gpus = ...` is line 8).
fn phi3(gpus: &str, instance: &str) -> String {
    format!(
        "[models.phi3]\nport = 11403\nengine = \"vllm\"\nmodel = \"/opt/citadel/models/phi3\"\ngpus = {gpus}\n\
         [[models.phi3.instances]]\nport = 11404\n{instance}"
    )
}

fn drop_in(cli: &Cli, instance: &str) -> String {
    let p = cli.path(&format!(
        "/opt/citadel/config/systemd/citadel-model@{instance}.service.d/50-citadel.conf"
    ));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// An instance on another GPU than its model's is bound to that GPU: its
/// UUID for CUDA, its device minor for the device cgroup, and it does not wait
/// for the model's first instance (they share no GPU).
#[test]
fn issue15_gpu_instance_on_another_gpu_is_bound_to_it() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(&phi3("[0]", "gpus = [1]\n"));
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    assert!(!out.stderr().contains("not resolved"), "{}", out.stderr());
    let first = drop_in(&cli, "phi3");
    assert!(first.contains("DeviceAllow=/dev/nvidia1 rw\n"), "{first}");
    assert!(
        first.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={UUID_A}\n")),
        "{first}"
    );
    let second = drop_in(&cli, "phi3:2");
    assert!(second.contains("DeviceAllow=/dev/nvidia0 rw\n"), "{second}");
    assert!(!second.contains("DeviceAllow=/dev/nvidia1 rw"), "{second}");
    assert!(
        second.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={UUID_B}\n")),
        "{second}"
    );
    assert!(!second.contains(UUID_A), "{second}");
    assert!(
        !second.contains("\nAfter=citadel-model@phi3.service"),
        "{second}"
    );
    // The MIG device of an instance resolves to its parent's minor.
    cli.write_config(&phi3("[1]", &format!("gpus = [\"{MIG}\"]\n")));
    cli.run_with_path(&smi, &["render"]).expect_code(0);
    let second = drop_in(&cli, "phi3:2");
    assert!(second.contains("DeviceAllow=/dev/nvidia1 rw\n"), "{second}");
    assert!(
        second.contains(&format!("Environment=CUDA_VISIBLE_DEVICES={MIG}\n")),
        "{second}"
    );
}

/// An instance on a GPU the driver does not list: render and validate warn,
/// install refuses, naming the instance, at its own `gpus`.
#[test]
fn issue15_gpu_install_refuses_an_instance_on_a_missing_gpu() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(&phi3("[0]", "gpus = [5]\n"));
    let want = "instance `phi3:2`: not resolved on this host: GPU 5 (no such index; the driver lists GPUs 0, 1)";
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    assert!(
        out.stderr().contains(&format!("warning: {want}")),
        "{}",
        out.stderr()
    );
    let dir = bin_dir();
    let out = cli.run_with_path(
        &smi,
        &["install", "--dry-run", "--bin-dir", dir.to_str().unwrap()],
    );
    out.expect_code(1);
    let err = out.stderr();
    assert!(err.contains(&format!("error: {want}")), "{err}");
    assert!(
        err.contains("citadel.toml:8:8  (models.phi3.instances[0].gpus)"),
        "{err}"
    );
    assert!(!err.contains("model `phi3`"), "{err}");
    assert!(!out.stdout().contains("install plan"), "{}", out.stdout());

    // An instance that takes the model's GPUs is reported once, as the model.
    cli.write_config(&phi3("[5]", ""));
    let out = cli.run_with_path(
        &smi,
        &["install", "--dry-run", "--bin-dir", dir.to_str().unwrap()],
    );
    out.expect_code(1);
    let err = out.stderr();
    assert_eq!(err.matches("not resolved on this host").count(), 1, "{err}");
    assert!(
        err.contains("error: model `phi3`: not resolved on this host: GPU 5"),
        "{err}"
    );
    assert!(
        err.contains("citadel.toml:5:8  (models.phi3.gpus)"),
        "{err}"
    );
}

/// Two instances on one GPU (the instance takes the model's, or names it by
/// UUID) start one after the other, and validate warns, naming both
/// instances, when their memory shares pass 1.0.
#[test]
fn issue15_gpu_instances_sharing_a_gpu_are_ordered_and_warned_by_name() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    let dir = bin_dir();
    for (instance, gpu) in [
        ("", format!("GPU 0 ({UUID_A})")),
        (
            &*format!("gpus = [\"{UUID_A}\"]\n"),
            format!("GPU 0 ({UUID_A})"),
        ),
    ] {
        cli.write_config(&phi3("[0]", instance));
        cli.run_with_path(&smi, &["render"]).expect_code(0);
        let second = drop_in(&cli, "phi3:2");
        assert!(
            second.contains("\nAfter=citadel-model@phi3.service\n"),
            "{second}"
        );
        assert!(!drop_in(&cli, "phi3").contains("\nAfter=citadel-model@phi3"));
        let out = cli.run_with_path(&smi, &["validate", "--bin-dir", dir.to_str().unwrap()]);
        out.expect_code(0);
        let err = out.stderr();
        assert!(
            err.contains(&format!(
                "warning: {gpu} is shared by `phi3` (0.9, vLLM's default) and `phi3:2` (0.9, vLLM's default), which claim 1.80 of its memory together"
            )),
            "{instance}: {err}"
        );
        assert_eq!(err.matches("is shared by").count(), 1, "{err}");
    }
    // Shares that fit: no warning.
    cli.write_config(&phi3("[0]", "").replace(
        "gpus = [0]\n",
        "gpus = [0]\ngpu_memory_utilization = 0.45\n",
    ));
    let out = cli.run_with_path(&smi, &["validate", "--bin-dir", dir.to_str().unwrap()]);
    out.expect_code(0);
    assert!(!out.stderr().contains("is shared by"), "{}", out.stderr());
}

/// One GPU twice in an instance's `gpus` is refused at that entry; a MIG
/// device of a GPU another instance uses whole is warned.
#[test]
fn issue15_gpu_instance_conflicts_are_named() {
    let cli = Cli::new();
    let smi = fake_driver(&cli);
    cli.write_config(&phi3("[1]", &format!("gpus = [0, \"{UUID_A}\"]\n")));
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(1);
    let err = out.stderr();
    assert!(
        err.contains(&format!(
            "error: instance `phi3:2` names one GPU twice: {UUID_A} is GPU 0 on this host"
        )),
        "{err}"
    );
    assert!(
        err.contains("citadel.toml:8:12  (models.phi3.instances[0].gpus[1])"),
        "{err}"
    );

    cli.write_config(&phi3("[0]", &format!("gpus = [\"{MIG}\"]\n")));
    let out = cli.run_with_path(&smi, &["render"]);
    out.expect_code(0);
    let err = out.stderr();
    assert!(
        err.contains(&format!(
            "warning: GPU 0 ({UUID_A}) is used whole by `phi3` while `phi3:2` uses its MIG device {MIG}"
        )),
        "{err}"
    );
    assert!(err.contains("(models.phi3.instances[0].gpus)"), "{err}");
}
