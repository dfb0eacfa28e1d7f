//! Issue 11, item 3: the gateway socket's backlog is `gateway.listen_backlog`,
//! the same value the gateway gives `listen(2)` when it binds itself.

use std::path::Path;

use citadel_config::parse;
use citadel_render::render;

const SIM: &str = "[models.phi3]\nport = 11403\nengine = \"sim\"\n";

fn socket(text: &str) -> String {
    let settings = match parse(text, Path::new("/opt/citadel/config/citadel.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    };
    render(&settings)
        .file("citadel-gateway.socket")
        .expect("the gateway socket is rendered")
        .contents
        .clone()
}

#[test]
fn issue11_socket_backlog_is_the_configured_listen_backlog() {
    assert!(socket(SIM).contains("\nBacklog=4096\n"), "{}", socket(SIM));
    let s = socket(&format!("[gateway]\nlisten_backlog = 16384\n{SIM}"));
    assert!(s.contains("\nBacklog=16384\n"), "{s}");
}
