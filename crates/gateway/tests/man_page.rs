//! `citadel-gateway --man-page` (the page the Debian package ships) into a
//! closed stdout is a normal end (exit 0), as for every Citadel binary
//! (issue 9, item 7).

use std::process::{Command, Stdio};

#[test]
fn issue9_man_page_into_a_closed_stdout_exits_0() {
    // A real pipe whose read end is closed before the binary writes a byte.
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    let out = Command::new(env!("CARGO_BIN_EXE_citadel-gateway"))
        .arg("--man-page")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .expect("run citadel-gateway");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
