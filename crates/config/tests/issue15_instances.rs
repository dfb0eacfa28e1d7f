//! Issue 15, item 1: several local instances of one model, each with its own
//! port and GPUs; validation checks ports across every model and instance.

use std::path::Path;

use citadel_config::{parse, ConfigError, Settings};

const FILE: &str = "/etc/citadel/citadel.toml";

fn ok(text: &str) -> Settings {
    match parse(text, Path::new(FILE)) {
        Ok(l) => l.settings,
        Err(e) => panic!("config was refused:\n{text}\n{e}"),
    }
}

fn errors(text: &str) -> String {
    match parse(text, Path::new(FILE)) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(ConfigError::Invalid(report)) => report.to_string(),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[test]
fn issue15_instances_as_tables_or_inline_get_names_units_ports_and_gpus() {
    let tables = "[models.phi3]\nport = 11403\nengine = \"vllm\"\nmodel = \"/opt/citadel/models/phi3\"\ngpus = [2]\n\n[[models.phi3.instances]]\nport = 11404\ngpus = [3]\n\n[[models.phi3.instances]]\nport = 11405\n";
    let inline = "[models.phi3]\nport = 11403\nengine = \"vllm\"\nmodel = \"/opt/citadel/models/phi3\"\ngpus = [2]\ninstances = [{ port = 11404, gpus = [3] }, { port = 11405 }]\n";
    for text in [tables, inline] {
        let s = ok(text);
        let m = s.model("phi3").unwrap();
        assert_eq!(m.instance_count(), 3);
        assert_eq!(
            m.local_urls(),
            [
                "http://127.0.0.1:11403",
                "http://127.0.0.1:11404",
                "http://127.0.0.1:11405"
            ]
        );
        assert_eq!(m.instance_unit(1), "citadel-model@phi3.service");
        assert_eq!(m.instance_unit(2), "citadel-model@phi3:2.service");
        let (owner, n, two) = s.instance("phi3:2").unwrap();
        assert_eq!((owner.name.as_str(), n, two.port.get()), ("phi3", 2, 11404));
        assert_eq!(two.gpus.len(), 1);
        assert_eq!(two.gpus[0].to_string(), "GPU 3");
        assert!(two.instances.is_empty());
        // Instance 3 did not name GPUs: the model's.
        let (_, _, three) = s.instance("phi3:3").unwrap();
        assert_eq!(three.gpus, m.gpus);
        let (_, n, one) = s.instance("phi3").unwrap();
        assert_eq!((n, one.port.get()), (1, 11403));
        for bad in [
            "phi3:1", "phi3:02", "phi3:4", "phi3:", "phi3:x", "nope:2", ":2",
        ] {
            assert!(s.instance(bad).is_none(), "{bad} resolved");
        }
    }
}

#[test]
fn issue15_instance_ports_are_checked_against_every_model_and_instance() {
    let e = errors("[models.a]\nport = 11400\nengine = \"sim\"\ninstances = [{ port = 11401 }, { port = 11400 }]\n\n[models.b]\nport = 11401\nengine = \"sim\"\n");
    assert!(e.contains("port 11400 is already used by model `a`"), "{e}");
    assert!(
        e.contains("port 11401 is already used by instance `a:2`")
            || e.contains("port 11401 is already used by model `b`"),
        "{e}"
    );
    let e = errors("[models.a]\nport = 11400\nengine = \"sim\"\ninstances = [{ port = 8000 }]\n");
    assert!(e.contains("port 8000 is the gateway's port"), "{e}");
    let e = errors("[models.a]\nport = 11400\nengine = \"sim\"\ninstances = [{ gpus = [1] }]\n");
    assert!(e.contains("instance 2 has no port"), "{e}");
    let e = errors(
        "[models.a]\nport = 11400\nengine = \"sim\"\ninstances = [{ port = 11401, prot = 2 }]\n",
    );
    assert!(e.contains("did you mean `port`"), "{e}");
    let e = errors("[models.a]\nport = 11400\nengine = \"sim\"\ninstances = [11401]\n");
    assert!(e.contains("models.a.instances"), "{e}");
    let e = errors("[model_defaults]\ninstances = [{ port = 11401 }]\n\n[models.a]\nport = 11400\nengine = \"sim\"\n");
    assert!(e.contains("instances cannot be a default"), "{e}");
    let many: Vec<String> = (1..=16)
        .map(|i| format!("{{ port = {} }}", 11500 + i))
        .collect();
    let e = errors(&format!(
        "[models.a]\nport = 11400\nengine = \"sim\"\ninstances = [{}]\n",
        many.join(", ")
    ));
    assert!(e.contains("at most 16 local instances"), "{e}");
}
