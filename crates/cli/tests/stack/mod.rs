//! A Citadel stack inside a booted sandbox (systemd as PID 1): the CLI, systemctl
//! and curl run inside it; the built binaries are visible at the same paths
//! (the sandbox's root is an overlay of the host's).

#![allow(dead_code)]

use std::process::Output;
use std::time::{Duration, Instant};

use citadel_sandbox::{Sandbox, SandboxOptions};

pub struct Stack {
    pub sb: Sandbox,
    cli: String,
    pub bin_dir: String,
}

pub fn text(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Stack {
    /// Boots a sandbox and writes `config` as /opt/citadel/config/citadel.toml inside.
    pub fn boot(name: &str, config: &str) -> Stack {
        let cli = env!("CARGO_BIN_EXE_citadel-systemd").to_owned();
        let bin_dir = std::path::Path::new(&cli)
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        for b in ["citadel-model", "citadel-gateway", "citadel-engine-sim"] {
            assert!(
                std::path::Path::new(&bin_dir).join(b).exists(),
                "{b} is not built in {bin_dir}; run `cargo build --workspace` first"
            );
        }
        let sb = Sandbox::boot(SandboxOptions::new(name)).expect("boot the systemd sandbox");
        // The host's files are visible inside, except below /tmp (nspawn mounts a
        // fresh tmpfs there) where a clone may live: copy the binaries in.
        let inside = "/usr/local/lib/citadel-test/bin";
        let dest = sb.root().join(&inside[1..]);
        std::fs::create_dir_all(&dest).unwrap();
        for b in [
            "citadel-systemd",
            "citadel-model",
            "citadel-gateway",
            "citadel-engine-sim",
        ] {
            std::fs::copy(std::path::Path::new(&bin_dir).join(b), dest.join(b)).unwrap();
        }
        let stack = Stack {
            sb,
            cli: format!("{inside}/citadel-systemd"),
            bin_dir: inside.to_owned(),
        };
        stack.write("/opt/citadel/config/citadel.toml", config);
        stack
    }

    /// Writes a file inside the sandbox.
    pub fn write(&self, path: &str, contents: &str) {
        let p = self.sb.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    pub fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.sb.root().join(path.trim_start_matches('/'))).ok()
    }

    /// Runs `citadel-systemd ARGS` inside; prints the transcript.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut argv = vec![self.cli.as_str()];
        argv.extend_from_slice(args);
        let started = Instant::now();
        let out = self
            .sb
            .exec(&argv)
            .expect("run citadel-systemd in the sandbox");
        println!(
            "$ citadel-systemd {}  [{} in {} ms]\n{}{}",
            args.join(" "),
            out.status,
            started.elapsed().as_millis(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "citadel-systemd {args:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn install(&self) -> String {
        self.cli_ok(&["install", "--bin-dir", &self.bin_dir.clone()])
    }

    /// `systemctl show --value -p PROP UNIT` (tests check systemd's own view).
    pub fn show(&self, unit: &str, prop: &str) -> String {
        let out = self
            .sb
            .exec(&["systemctl", "show", "--value", "-p", prop, unit])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn show_u64(&self, unit: &str, prop: &str) -> u64 {
        self.show(unit, prop)
            .parse()
            .unwrap_or_else(|_| panic!("{unit} {prop} is not a number"))
    }

    /// Polls `cond` every 100 ms until true; panics naming `what` after `timeout`.
    #[track_caller]
    pub fn wait(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let started = Instant::now();
        self.sb
            .wait_until(what, timeout, &mut cond)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.journal_tail()));
        println!("  ({what}: {:.1} s)", started.elapsed().as_secs_f64());
    }

    pub fn journal_tail(&self) -> String {
        let out = self
            .sb
            .exec(&[
                "journalctl",
                "--no-pager",
                "-n",
                "60",
                "-o",
                "short-monotonic",
            ])
            .unwrap();
        format!("--- journal tail\n{}", String::from_utf8_lossy(&out.stdout))
    }

    /// GET or POST to the gateway (or an engine) inside: (status, body).
    pub fn http(
        &self,
        method: &str,
        url: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut argv = vec![
            "curl",
            "-s",
            "-m",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ];
        let auth;
        if let Some(k) = key {
            auth = format!("Authorization: Bearer {k}");
            argv.extend(["-H", auth.as_str()]);
        }
        if let Some(b) = body {
            argv.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        argv.push(url);
        let out = self.sb.exec(&argv).unwrap();
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The generated API key (first non-comment line of the credential file).
    pub fn api_key(&self) -> String {
        let text = self
            .read("/etc/citadel/credentials/api-keys")
            .expect("install generates an API key");
        text.lines()
            .find(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap()
            .trim()
            .to_owned()
    }

    /// The gateway's view of one model: ready, loading or down.
    /// The gateway's backends of `model` from its admin channel (issue 15:
    /// curl over the root-only Unix socket); empty when it does not answer.
    pub fn admin_backends(&self, model: &str) -> Vec<serde_json::Value> {
        let out = self
            .sb
            .exec(&[
                "curl",
                "-s",
                "-m",
                "5",
                "--unix-socket",
                citadel_config::unit_names::ADMIN_SOCKET_PATH,
                "http://localhost/admin/backends",
            ])
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["models"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["model"] == model))
            .and_then(|m| m["backends"].as_array())
            .cloned()
            .unwrap_or_default()
    }

    pub fn gateway_state(&self, model: &str) -> String {
        let (code, body) = self.http("GET", "http://127.0.0.1:8000/health/models", None, None);
        if code != 200 {
            return format!("gateway http {code}");
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["models"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == model))
            .and_then(|x| x["state"].as_str())
            .unwrap_or("absent")
            .to_owned()
    }

    pub fn chat(&self, model: &str) -> (u16, String) {
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":5}}"#
        );
        self.http(
            "POST",
            "http://127.0.0.1:8000/v1/chat/completions",
            Some(&self.api_key()),
            Some(&body),
        )
    }

    /// PIDs of processes whose command line matches `pattern` (pgrep -f).
    pub fn pids(&self, pattern: &str) -> Vec<u32> {
        let out = self.sb.exec(&["pgrep", "-f", pattern]).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

pub const MODELS: [&str; 4] = ["mixtral", "hermes", "openchat", "phi3"];

pub fn unit(model: &str) -> String {
    format!("citadel-model@{model}.service")
}

impl Stack {
    /// Sends `n` chat completions for `model` through the gateway at `rate`
    /// per second, one after another on a kept-alive connection (curl inside
    /// the sandbox, loopback only); returns the outcome of each request:
    /// `HTTP_CODE CURL_EXIT MESSAGE`.
    pub fn chat_load(&self, model: &str, key: &str, n: u32, rate: u32) -> Vec<String> {
        let auth = format!("Authorization: Bearer {key}");
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":2}}"#
        );
        let rate = format!("{rate}/s");
        // The glob makes `n` requests of one curl; the gateway ignores the query.
        let url = format!("http://127.0.0.1:8000/v1/chat/completions?n=[1-{n}]");
        let out = self
            .sb
            .exec(&[
                "curl",
                "-s",
                "--rate",
                &rate,
                "-m",
                "10",
                "-H",
                &auth,
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{exitcode} %{errormsg}\\n",
                &url,
            ])
            .expect("run curl in the sandbox");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// The demo stack cut down to `models` (name, port), each loading at once.
pub fn instant_models(models: &[(&str, u16)]) -> String {
    let c = citadel_config::SIM_EXAMPLE_CONFIG
        .replace("\"--load-time\", \"2s\"", "\"--load-time\", \"0s\"");
    let head = c
        .split("[models.mixtral]")
        .next()
        .expect("the sim example has models");
    let tables: Vec<String> = models
        .iter()
        .map(|(name, port)| format!("[models.{name}]\nport = {port}\n"))
        .collect();
    format!("{head}{}", tables.join("\n"))
}
