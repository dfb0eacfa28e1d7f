//! Issue 10, items 1 to 3: how the rendered units relate to each other and
//! where the files go.

use std::path::Path;

use citadel_config::{parse, Settings, SIM_EXAMPLE_CONFIG};
use citadel_render::{render, FileKind, ADMIN_UNIT_DIR, VENDOR_UNIT_DIR};

fn sim() -> Settings {
    match parse(
        SIM_EXAMPLE_CONFIG,
        Path::new("/opt/citadel/config/citadel.toml"),
    ) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    }
}

/// The values of `key=` lines in `[section]` of a unit file.
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

/// Item 1: the gateway had `Wants=` and `After=` on every model, so the API
/// came up only once the slowest model was ready (or failed). Item 2: through
/// that `Wants=`, starting the gateway (or the target) started a disabled
/// model again. Now nothing of the gateway names a model.
#[test]
fn issue10_gateway_neither_waits_for_nor_pulls_in_models() {
    let rendered = render(&sim());
    let gw = &rendered.file("citadel-gateway.service").unwrap().contents;
    for key in [
        "Wants",
        "Requires",
        "BindsTo",
        "Requisite",
        "Upholds",
        "After",
        "Before",
    ] {
        for v in directive(gw, "Unit", key) {
            assert!(!v.contains("citadel-model@"), "gateway {key}={v}");
        }
    }
    // Issue 12, item 1: also after its socket and the network namespace;
    // issue 15: and its admin socket.
    assert_eq!(
        directive(gw, "Unit", "After"),
        [
            "network.target",
            "citadel-gateway.socket",
            "citadel-gateway-admin.socket",
            "citadel-netns.service"
        ]
    );
}

/// Item 2: models are pulled in only by citadel.target through their own
/// enablement (`WantedBy=` in the template's [Install], one `.wants/` link
/// per enabled instance): no unit names a model instance in a dependency.
#[test]
fn issue10_only_enablement_pulls_a_model_in() {
    let rendered = render(&sim());
    let template = &rendered.file("citadel-model@.service").unwrap().contents;
    assert_eq!(
        directive(template, "Install", "WantedBy"),
        ["citadel.target"]
    );
    let target = &rendered.file("citadel.target").unwrap().contents;
    assert!(directive(target, "Unit", "Wants").is_empty(), "{target}");
    for f in &rendered.files {
        for key in [
            "Wants",
            "Requires",
            "BindsTo",
            "Upholds",
            "WantedBy",
            "RequiredBy",
        ] {
            for section in ["Unit", "Install"] {
                for v in directive(&f.contents, section, key) {
                    assert!(
                        !v.contains("citadel-model@") || v.contains("citadel-model@%"),
                        "{}: {key}={v} pulls a model in",
                        f.path.display()
                    );
                }
            }
        }
    }
}

/// Item 3: generated files went into /etc, the administrator's layer, where
/// `systemctl revert` deletes drop-ins and an operator's `systemctl edit
/// --full` copy collides with them. They go into the vendor layer now.
#[test]
fn issue10_generated_files_install_into_the_vendor_layer() {
    let rendered = render(&sim());
    let root = Path::new("/r");
    for f in &rendered.files {
        let at = f.install_path(root);
        let expected = match f.kind {
            FileKind::Unit | FileKind::DropIn => Path::new("/r").join(&VENDOR_UNIT_DIR[1..]),
            _ => Path::new("/r/usr/local/lib").to_owned(),
        };
        assert!(at.starts_with(&expected), "{}", at.display());
        assert!(
            !at.starts_with(Path::new("/r").join(&ADMIN_UNIT_DIR[1..]))
                && !at.starts_with("/r/etc"),
            "{}",
            at.display()
        );
    }
    let drop_in = rendered
        .file("citadel-model@hermes.service.d/50-citadel.conf")
        .unwrap();
    assert_eq!(
        drop_in.install_path(root),
        Path::new("/r/usr/local/lib/systemd/system/citadel-model@hermes.service.d/50-citadel.conf")
    );
    assert_eq!(
        drop_in.legacy_install_path(root),
        Path::new("/r/etc/systemd/system/citadel-model@hermes.service.d/50-citadel.conf")
    );
    let sysusers = rendered.file("sysusers.d/citadel.conf").unwrap();
    assert_eq!(
        sysusers.install_path(root),
        Path::new("/r/usr/local/lib/sysusers.d/citadel.conf")
    );
    assert_eq!(
        sysusers.legacy_install_path(root),
        Path::new("/r/etc/sysusers.d/citadel.conf")
    );
}
