//! A small harness for CLI tests: a temporary root directory, a scrubbed
//! environment, and the real `citadel-systemd` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Cli {
    pub root: tempfile::TempDir,
}

impl Cli {
    pub fn new() -> Cli {
        Cli {
            root: tempfile::Builder::new()
                .prefix("citadel-cli-test-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// `path` (absolute, as on a real system) below the test root.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    pub fn config_path(&self) -> PathBuf {
        self.path(citadel_config::DEFAULT_CONFIG_PATH)
    }

    pub fn write_config(&self, text: &str) {
        let p = self.config_path();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// `citadel-systemd --root ROOT ARGS...` with only PATH in the environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.env_clear()
            .env("PATH", SYSTEM_PATH)
            .arg("--root")
            .arg(self.root())
            .args(args);
        cmd
    }

    /// Runs `citadel-systemd --root ROOT ARGS...` with only PATH in the environment.
    pub fn run(&self, args: &[&str]) -> Run {
        Run(self.command(args).output().expect("run citadel-systemd"))
    }

    /// Like [`Cli::run`], with `dir` first on PATH (fakes of host tools).
    pub fn run_with_path(&self, dir: &Path, args: &[&str]) -> Run {
        let out = self
            .command(args)
            .env("PATH", format!("{}:{SYSTEM_PATH}", dir.display()))
            .output()
            .expect("run citadel-systemd");
        Run(out)
    }
}

/// The PATH of the scrubbed environment.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_citadel-systemd")
}

/// The directory holding the workspace's built binaries (citadel-model, citadel-gateway).
pub fn bin_dir() -> PathBuf {
    let dir = Path::new(bin()).parent().unwrap().to_owned();
    for b in ["citadel-model", "citadel-gateway"] {
        assert!(
            dir.join(b).exists(),
            "{b} is not built in {}; run `cargo build --workspace` first",
            dir.display()
        );
    }
    dir
}

pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}
