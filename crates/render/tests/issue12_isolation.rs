//! Issue 12, item 1: engines reachable only through the gateway. The gateway
//! and the models join Citadel's private network namespace, the gateway's
//! public socket comes from PID 1 (`citadel-gateway.socket`); a stack that
//! needs the host's network (replicas, Ollama) stays there and still gets
//! the socket.

use std::path::Path;

use citadel_config::{parse, Settings};
use citadel_render::render;

fn settings(text: &str) -> Settings {
    match parse(text, Path::new("/opt/citadel/config/citadel.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    }
}

const SIM: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n";

fn unit<'a>(r: &'a citadel_render::Rendered, name: &str) -> &'a str {
    &r.file(name)
        .unwrap_or_else(|| panic!("{name} is not rendered"))
        .contents
}

#[test]
fn issue12_gateway_and_models_share_a_private_network_namespace() {
    let r = render(&settings(SIM));
    for name in ["citadel-gateway.service", "citadel-model@.service"] {
        let u = unit(&r, name);
        for line in [
            "BindsTo=citadel-netns.service\n",
            "After=citadel-netns.service\n",
            "PrivateNetwork=yes\n",
            "NetworkNamespacePath=/run/netns/citadel\n",
        ] {
            assert!(u.contains(line), "{name} lacks {line}{u}");
        }
    }
    let netns = unit(&r, "citadel-netns.service");
    assert!(
        netns.contains("ExecStart=/bin/ip netns add citadel\n"),
        "{netns}"
    );
    assert!(
        netns.contains("ExecStart=/bin/ip -n citadel link set lo up\n"),
        "{netns}"
    );
    assert!(
        netns.contains("ExecStop=/bin/ip netns delete citadel\n"),
        "{netns}"
    );
    assert!(netns.contains("StopWhenUnneeded=yes\n"), "{netns}");
    assert_eq!(
        citadel_config::network::NETNS_PATH,
        format!("/run/netns/{}", citadel_config::network::NETNS_NAME)
    );
    assert!(r.verify.contains(&"citadel-netns.service".to_owned()));
    // Pulled in by BindsTo= only: not enabled.
    assert!(!r.enable.contains(&"citadel-netns.service".to_owned()));
}

#[test]
fn issue12_gateway_listens_on_a_socket_from_systemd() {
    let r = render(&settings(SIM));
    let gw = unit(&r, "citadel-gateway.service");
    assert!(
        gw.contains("Requires=citadel-gateway.socket\nAfter=citadel-gateway.socket\n"),
        "{gw}"
    );
    let socket = unit(&r, "citadel-gateway.socket");
    for line in [
        "ListenStream=127.0.0.1:8000\n",
        "NoDelay=yes\n",
        "Backlog=4096\n",
        "PartOf=citadel.target\n",
        "WantedBy=citadel.target\n",
    ] {
        assert!(socket.contains(line), "socket lacks {line}{socket}");
    }
    assert!(r.enable.contains(&"citadel-gateway.socket".to_owned()));
    let v6 = render(&settings(&format!("[gateway]\nlisten = \"::\"\n{SIM}")));
    assert!(unit(&v6, "citadel-gateway.socket").contains("ListenStream=[::]:8000\n"));
}

#[test]
fn issue12_replicas_keep_the_host_network() {
    let r = render(&settings(&format!(
        "{SIM}replicas = [\"http://10.0.0.9:11403\"]\n"
    )));
    assert!(r.file("citadel-netns.service").is_none());
    assert!(!r.verify.contains(&"citadel-netns.service".to_owned()));
    for name in ["citadel-gateway.service", "citadel-model@.service"] {
        let u = unit(&r, name);
        assert!(!u.contains("NetworkNamespacePath="), "{u}");
        assert!(!u.contains("citadel-netns"), "{u}");
        assert!(!u.contains("PrivateNetwork="), "{u}");
    }
    // The socket still comes from systemd.
    assert!(unit(&r, "citadel-gateway.service").contains("Requires=citadel-gateway.socket\n"));
    assert!(r.file("citadel-gateway.socket").is_some());
}
