//! Issue 15, item 1: several local instances of one model. Each instance is
//! `citadel-model@NAME:N.service` (the template) with a drop-in of its own:
//! its port, its GPUs, its own cache and state directories (without `:`,
//! which systemd reads as "with symlink"), the model's limits (limits are per
//! unit), and journal fields naming the model and the instance. The CLI's
//! temporary surge instance (`NAME:surge`) gets its drop-in from
//! [`instance_dropin`].

use std::path::Path;

use citadel_config::{parse, GpuRef, Port, Settings};
use citadel_render::{instance_dropin, render, render_with, GpuBinding, Host, Rendered};

fn settings(text: &str) -> Settings {
    match parse(text, Path::new("/opt/citadel/config/citadel.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    }
}

/// phi3 on GPU 0 with every limit set; instance 2 on GPU 1, instance 3 on the
/// model's GPU 0. hermes has one instance and no GPU.
const STACK: &str = r#"
[gateway]
auth = false

[models.phi3]
port = 11403
engine = "llama-cpp"
model = "/opt/citadel/models/phi-3-mini.Q4_K_M.gguf"
gpus = [0]
memory_max = "8G"
memory_high = "7G"
cpus = 2
tasks_max = 512
nofile = 4096
memlock = "infinity"
env = { LLAMA_LOG = "info" }

[[models.phi3.instances]]
port = 11404
gpus = [1]

[[models.phi3.instances]]
port = 11405

[models.hermes]
port = 11406
engine = "sim"
"#;

/// The values of `key=` lines in `[section]` of a unit file, in order.
fn directive<'a>(text: &'a str, section: &str, key: &str) -> Vec<&'a str> {
    let mut current = "";
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s;
        } else if current == section {
            if let Some(v) = line.strip_prefix(key).and_then(|l| l.strip_prefix('=')) {
                out.push(v);
            }
        }
    }
    out
}

fn drop_in(rendered: &Rendered, instance: &str) -> String {
    rendered
        .file(&format!(
            "citadel-model@{instance}.service.d/50-citadel.conf"
        ))
        .unwrap_or_else(|| panic!("no drop-in for {instance}"))
        .contents
        .clone()
}

const LIMITS: [&str; 7] = [
    "MemoryMax",
    "MemorySwapMax",
    "MemoryHigh",
    "CPUQuota",
    "TasksMax",
    "LimitNOFILE",
    "LimitMEMLOCK",
];

/// One drop-in per local instance; instance N gets its own cache and state
/// directories `citadel/NAME/N` (the empty assignment first resets the
/// template's `citadel/%i`, which for `phi3:2` would be `citadel/phi3` with a
/// symlink `2`), its journal identity, and every limit of the model.
#[test]
fn issue15_instance_dropins_have_own_dirs_without_colon_and_the_models_limits() {
    let rendered = render(&settings(STACK));
    let drop_ins: Vec<String> = rendered
        .files
        .iter()
        .map(|f| f.path.display().to_string())
        .filter(|p| p.ends_with(".d/50-citadel.conf"))
        .collect();
    assert_eq!(
        drop_ins,
        [
            "citadel-model@hermes.service.d/50-citadel.conf",
            "citadel-model@phi3.service.d/50-citadel.conf",
            "citadel-model@phi3:2.service.d/50-citadel.conf",
            "citadel-model@phi3:3.service.d/50-citadel.conf",
        ]
    );
    let first = drop_in(&rendered, "phi3");
    // Instance 1 keeps the template's directories (citadel/phi3).
    assert!(directive(&first, "Service", "CacheDirectory").is_empty());
    assert!(directive(&first, "Service", "StateDirectory").is_empty());
    assert_eq!(
        directive(&first, "Service", "LogExtraFields"),
        [
            "CITADEL_SERVICE=phi3",
            "CITADEL_INSTANCE=phi3",
            "CITADEL_ENGINE=llama-cpp"
        ]
    );
    assert_eq!(
        directive(&first, "Service", "SyslogIdentifier"),
        ["citadel-phi3"]
    );
    for (n, port) in [(2, 11404), (3, 11405)] {
        let c = drop_in(&rendered, &format!("phi3:{n}"));
        let dir = format!("citadel/phi3/{n}");
        for key in ["CacheDirectory", "StateDirectory"] {
            let values = directive(&c, "Service", key);
            assert_eq!(values, ["", dir.as_str()], "{key} of phi3:{n}:\n{c}");
            assert!(
                values.iter().all(|v| !v.contains(':')),
                "{key}= with `:` is a symlink for systemd: {values:?}"
            );
        }
        assert_eq!(
            directive(&c, "Service", "SyslogIdentifier"),
            [format!("citadel-phi3-{n}")]
        );
        assert_eq!(
            directive(&c, "Service", "LogExtraFields"),
            [
                "CITADEL_SERVICE=phi3".to_owned(),
                format!("CITADEL_INSTANCE=phi3:{n}"),
                "CITADEL_ENGINE=llama-cpp".to_owned()
            ]
        );
        assert_eq!(
            directive(&c, "Unit", "Description"),
            [format!(
                "Citadel model phi3:{n} (llama-cpp on 127.0.0.1:{port})"
            )]
        );
        for key in LIMITS {
            let want = directive(&first, "Service", key);
            assert_eq!(want.len(), 1, "the model sets {key}");
            assert_eq!(
                directive(&c, "Service", key),
                want,
                "{key} of phi3:{n} is the model's"
            );
        }
        // Everything else but the port, GPUs, directories and names is the model's.
        for key in [
            "Environment",
            "TimeoutStartSec",
            "TimeoutStopSec",
            "WatchdogSec",
        ] {
            let want: Vec<&str> = directive(&first, "Service", key)
                .into_iter()
                .filter(|v| !v.starts_with("CUDA_VISIBLE_DEVICES="))
                .collect();
            let got: Vec<&str> = directive(&c, "Service", key)
                .into_iter()
                .filter(|v| !v.starts_with("CUDA_VISIBLE_DEVICES="))
                .collect();
            assert_eq!(got, want, "{key} of phi3:{n}");
        }
    }
    // A model without instances renders as before: no directories of its own.
    let hermes = drop_in(&rendered, "hermes");
    assert!(!hermes.contains("CacheDirectory"), "{hermes}");
}

/// Each instance is bound to its own GPUs: instance 2 to GPU 1 only.
#[test]
fn issue15_instances_get_their_own_gpus() {
    let mut host = Host::default();
    for (i, minor) in [(0, 4), (1, 7)] {
        host.gpus.insert(
            GpuRef::Index(i),
            GpuBinding {
                uuid: format!("GPU-0000000{i}-0000-0000-0000-000000000000"),
                minor,
            },
        );
    }
    let rendered = render_with(&settings(STACK), &host);
    let devices = |c: &str| -> Vec<String> {
        directive(c, "Service", "DeviceAllow")
            .into_iter()
            .map(str::to_owned)
            .collect()
    };
    let two = drop_in(&rendered, "phi3:2");
    assert!(
        devices(&two).contains(&"/dev/nvidia7 rw".to_owned()),
        "{two}"
    );
    assert!(
        !devices(&two).contains(&"/dev/nvidia4 rw".to_owned()),
        "{two}"
    );
    assert!(
        directive(&two, "Service", "Environment")
            .contains(&"CUDA_VISIBLE_DEVICES=GPU-00000001-0000-0000-0000-000000000000"),
        "{two}"
    );
    let three = drop_in(&rendered, "phi3:3");
    assert!(
        devices(&three).contains(&"/dev/nvidia4 rw".to_owned()),
        "{three}"
    );
    assert!(
        !devices(&three).contains(&"/dev/nvidia7 rw".to_owned()),
        "{three}"
    );
}

/// Item 2: every instance is a GPU user. Instances on one GPU start one
/// after another (by port); instances on different GPUs are not ordered.
#[test]
fn issue15_instances_on_one_gpu_start_in_order_on_different_gpus_not() {
    let rendered = render(&settings(STACK));
    assert!(directive(&drop_in(&rendered, "phi3"), "Unit", "After").is_empty());
    assert!(
        directive(&drop_in(&rendered, "phi3:2"), "Unit", "After").is_empty(),
        "phi3:2 is alone on GPU 1"
    );
    assert_eq!(
        directive(&drop_in(&rendered, "phi3:3"), "Unit", "After"),
        ["citadel-model@phi3.service"]
    );
    // Two instances of one model on one GPU, and another model on it too.
    let shared = "[models.a]\nport = 11410\nengine = \"sim\"\ngpus = [0]\n\
                  [[models.a.instances]]\nport = 11400\n\
                  [models.b]\nport = 11405\nengine = \"sim\"\ngpus = [0]\n";
    let rendered = render(&settings(shared));
    // By port: a:2 (11400), b (11405), a (11410).
    assert!(directive(&drop_in(&rendered, "a:2"), "Unit", "After").is_empty());
    assert_eq!(
        directive(&drop_in(&rendered, "b"), "Unit", "After"),
        ["citadel-model@a:2.service"]
    );
    assert_eq!(
        directive(&drop_in(&rendered, "a"), "Unit", "After"),
        ["citadel-model@a:2.service citadel-model@b.service"]
    );
}

/// `install` enables and `validate` verifies every instance's unit.
#[test]
fn issue15_every_instance_is_enabled_and_verified() {
    let rendered = render(&settings(STACK));
    for unit in [
        "citadel-model@phi3.service",
        "citadel-model@phi3:2.service",
        "citadel-model@phi3:3.service",
        "citadel-model@hermes.service",
    ] {
        assert!(rendered.enable.iter().any(|u| u == unit), "{unit}");
        assert!(rendered.verify.iter().any(|u| u == unit), "{unit}");
    }
    let models: Vec<&String> = rendered
        .enable
        .iter()
        .filter(|u| u.starts_with("citadel-model@"))
        .collect();
    assert_eq!(models.len(), 4, "{:?}", rendered.enable);
}

/// The NVIDIA modules are loaded at boot when only an instance has a GPU.
#[test]
fn issue15_an_instance_gpu_alone_ships_the_modules() {
    let text = "[models.a]\nport = 11400\nengine = \"sim\"\n\
                [[models.a.instances]]\nport = 11401\ngpus = [0]\n";
    let rendered = render(&settings(text));
    assert!(rendered.file(citadel_render::MODULES_LOAD_FILE).is_some());
    assert!(directive(&drop_in(&rendered, "a"), "Service", "DeviceAllow").is_empty());
    assert!(!directive(&drop_in(&rendered, "a:2"), "Service", "DeviceAllow").is_empty());
}

/// Item 3: the surge instance's drop-in (`instance_dropin`): its port, its own
/// directories `citadel/NAME/surge`, its journal identity; after every
/// configured instance on its GPU; the text ends in `[Service]`, so the CLI
/// can append `Environment=CITADEL_SURGE_PORT=P`. For a configured instance
/// the text is the rendered drop-in's.
#[test]
fn issue15_surge_dropin_has_own_dirs_and_ends_in_service() {
    let s = settings(STACK);
    let host = Host::default();
    let (_, _, mut surge) = s.instance("phi3").expect("instance 1");
    surge.port = Port::new(11499).unwrap();
    let c = instance_dropin(&s, &host, &surge, "phi3:surge");
    assert_eq!(
        directive(&c, "Unit", "Description"),
        ["Citadel model phi3:surge (llama-cpp on 127.0.0.1:11499)"]
    );
    for key in ["CacheDirectory", "StateDirectory"] {
        assert_eq!(directive(&c, "Service", key), ["", "citadel/phi3/surge"]);
    }
    assert_eq!(
        directive(&c, "Service", "SyslogIdentifier"),
        ["citadel-phi3-surge"]
    );
    assert!(directive(&c, "Service", "LogExtraFields").contains(&"CITADEL_INSTANCE=phi3:surge"));
    // On GPU 0 with phi3 and phi3:3, whatever its port: after both.
    assert_eq!(
        directive(&c, "Unit", "After"),
        ["citadel-model@phi3.service citadel-model@phi3:3.service"]
    );
    let last_section = c.lines().rfind(|l| l.starts_with('[')).unwrap();
    assert_eq!(last_section, "[Service]");
    assert!(c.ends_with('\n'));
    let appended = format!("{c}Environment=CITADEL_SURGE_PORT=11499\n");
    assert!(directive(&appended, "Service", "Environment").contains(&"CITADEL_SURGE_PORT=11499"));
    // The limits are the model's.
    let first = drop_in(&render(&s), "phi3");
    for key in LIMITS {
        assert_eq!(
            directive(&c, "Service", key),
            directive(&first, "Service", key)
        );
    }

    // A configured instance: the same text as `render` gives.
    let rendered = render_with(&s, &host);
    for name in ["phi3", "phi3:2", "phi3:3", "hermes"] {
        let (_, _, m) = s.instance(name).unwrap();
        assert_eq!(
            instance_dropin(&s, &host, &m, name),
            drop_in(&rendered, name),
            "{name}"
        );
    }
}

/// A suffix that cannot be a directory name gets no directories of its own
/// (left out with a comment), never a value systemd would read otherwise.
#[test]
fn issue15_unusable_instance_suffix_is_left_out() {
    let s = settings(STACK);
    let (_, _, m) = s.instance("phi3").unwrap();
    let c = instance_dropin(&s, &Host::default(), &m, "phi3:a b/..");
    assert!(directive(&c, "Service", "CacheDirectory").is_empty(), "{c}");
    assert!(directive(&c, "Service", "StateDirectory").is_empty(), "{c}");
    assert!(c.contains("# CacheDirectory= was left out"), "{c}");
}
