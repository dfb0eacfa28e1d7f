//! What the real-engine tiers (`e2e-vllm`, `e2e-llama-cpp`) share: a booted
//! sandbox holding Citadel's binaries, commands run inside it (the CLI,
//! systemctl, journalctl, curl), and the PASS/FAIL report.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use citadel_sandbox::{Sandbox, SandboxOptions};

/// Citadel's binaries a tier installs.
pub const CITADEL_BINS: [&str; 4] = [
    "citadel-systemd",
    "citadel-model",
    "citadel-gateway",
    "citadel-engine-sim",
];

/// apt-get install what an engine tier needs unless present. `scripts/setup-dev.sh` installs them too.
pub fn ensure_debian_packages(tier: &str, pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("{tier}: apt-get install {}", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// `cargo build` of the four binaries (debug); returns the directory.
pub fn build_binaries(tier: &str) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace dir")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Instant::now();
    let status = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "--quiet", "--bins"])
        .args(["-p", "citadel-systemd", "-p", "citadel-supervisor"])
        .args(["-p", "citadel-gateway", "-p", "citadel-engine-sim"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed: {status}");
    }
    println!(
        "{tier}: binaries built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    Ok(target.join("debug"))
}

#[derive(Default)]
pub struct Report {
    pub passed: u32,
    pub failed: u32,
}

impl Report {
    pub fn check(&mut self, what: &str, ok: bool, detail: impl Display) -> bool {
        if ok {
            self.passed += 1;
            println!("PASS {what}: {detail}");
        } else {
            self.failed += 1;
            println!("FAIL {what}: {detail}");
        }
        ok
    }
}

pub fn info(what: &str, detail: impl Display) {
    println!("INFO {what}: {detail}");
}

/// Citadel's network namespace, where the engines listen (issue 12, item 1).
const ENGINE_NETNS: &str = "/run/netns/citadel";

pub fn unit(model: &str) -> String {
    format!("citadel-model@{model}.service")
}

pub struct Tier {
    pub sb: Sandbox,
    pub cli: String,
    pub bin_dir: String,
}

impl Tier {
    pub fn exec(&self, argv: &[&str]) -> (bool, String) {
        match self.sb.exec(argv) {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, format!("nsenter: {e}")),
        }
    }

    pub fn cli(&self, args: &[&str]) -> (Option<i32>, String) {
        let mut argv = vec![self.cli.as_str()];
        argv.extend_from_slice(args);
        let t = Instant::now();
        match self.sb.exec(&argv) {
            Ok(out) => {
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                println!(
                    "$ citadel-systemd {}  [{} in {:.1} s]\n{}{}",
                    args.join(" "),
                    out.status,
                    t.elapsed().as_secs_f64(),
                    stdout,
                    String::from_utf8_lossy(&out.stderr)
                );
                (out.status.code(), stdout)
            }
            Err(e) => (None, format!("nsenter: {e}")),
        }
    }

    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.exec(&["systemctl", "show", "--value", "-p", prop, unit])
            .1
            .trim()
            .to_owned()
    }

    /// curl inside: (status, body, seconds).
    pub fn http(
        &self,
        method: &str,
        url: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, f64) {
        self.curl(&[], method, url, key, body)
    }

    /// curl inside, straight to an engine on `127.0.0.1:port` (no gateway).
    /// Engines listen in Citadel's network namespace (issue 12, item 1), which
    /// the host's network cannot reach: curl runs in it when it exists.
    pub fn engine_http(
        &self,
        method: &str,
        port: u16,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String, f64) {
        let url = format!("http://127.0.0.1:{port}{path}");
        if self.exec(&["test", "-e", ENGINE_NETNS]).0 {
            let net = format!("--net={ENGINE_NETNS}");
            self.curl(&["nsenter", &net, "--"], method, &url, None, body)
        } else {
            self.curl(&[], method, &url, None, body)
        }
    }

    fn curl(
        &self,
        prefix: &[&str],
        method: &str,
        url: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String, f64) {
        let mut argv = prefix.to_vec();
        argv.extend([
            "curl",
            "-s",
            "-N",
            "-m",
            "60",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{time_total}",
            "-X",
            method,
        ]);
        let auth;
        if let Some(k) = key {
            auth = format!("Authorization: Bearer {k}");
            argv.extend(["-H", auth.as_str()]);
        }
        if let Some(b) = body {
            argv.extend(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        argv.push(url);
        let out = self.exec(&argv).1;
        let (body, tail) = out.rsplit_once('\n').unwrap_or(("", "0 0"));
        let mut tail = tail.split_whitespace();
        let code = tail.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let secs = tail.next().and_then(|c| c.parse().ok()).unwrap_or(0.0);
        (code, body.to_owned(), secs)
    }

    pub fn api_key(&self) -> String {
        std::fs::read_to_string(self.sb.root().join("etc/citadel/credentials/api-keys"))
            .unwrap_or_default()
            .lines()
            .find(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned()
    }

    /// A completion straight against an engine (no gateway).
    pub fn engine_completion(&self, model: &str, port: u16) -> (u16, String, f64) {
        let body = format!(r#"{{"model":"{model}","prompt":"hello","max_tokens":4}}"#);
        self.engine_http("POST", port, "/v1/completions", Some(&body))
    }

    pub fn pgrep(&self, pattern: &str) -> Vec<u32> {
        self.exec(&["pgrep", "-f", pattern])
            .1
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// PIDs in a unit's cgroup (systemd's own hierarchy on this cgroup v1 host,
    /// the unified one on v2).
    pub fn cgroup_pids(&self, unit: &str) -> Vec<u32> {
        let cg = self.show(unit, "ControlGroup");
        if cg.is_empty() {
            return Vec::new();
        }
        let script = r#"for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
  if [ -r "$h$1/cgroup.procs" ]; then find "$h$1" -name cgroup.procs -exec cat {} +; exit 0; fi
done"#;
        self.exec(&["sh", "-c", script, "sh", &cg])
            .1
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// (processes, PSS MiB, RSS MiB) of a unit's cgroup.
    pub fn unit_memory_mib(&self, unit: &str) -> (usize, u64, u64) {
        let pids = self.cgroup_pids(unit);
        let mut argv: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            "for p in \"$@\"; do grep -e '^Pss:' -e '^Rss:' /proc/$p/smaps_rollup 2>/dev/null; done"
                .into(),
            "sh".into(),
        ];
        argv.extend(pids.iter().map(u32::to_string));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.exec(&argv).1;
        let sum = |key: &str| -> u64 {
            out.lines()
                .filter(|l| l.starts_with(key))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
                / 1024
        };
        (pids.len(), sum("Pss:"), sum("Rss:"))
    }

    pub fn journal(&self, unit: &str) -> String {
        self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
            .1
    }

    pub fn journal_tail(&self, unit: &str, n: usize) -> String {
        let j = self.journal(unit);
        let lines: Vec<&str> = j.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The model ids the gateway at `gateway` lists in `/v1/models` (empty
    /// when it does not answer 200).
    pub fn listed_models(&self, gateway: &str, key: &str) -> Vec<String> {
        let (code, body, _) = self.http("GET", &format!("{gateway}/v1/models"), Some(key), None);
        if code != 200 {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Issue 10, item 1: the gateway no longer starts after the models; it
    /// admits each one at its first probe after the model's READY=1, and
    /// lists in `/v1/models` only the models it serves (503 `model_not_ready`
    /// for the others). Waits until it lists every one of `models`, for at
    /// most `timeout`: the time it took, or what was still missing (and what
    /// `/health/models` says about it).
    pub fn wait_listed(
        &self,
        gateway: &str,
        key: &str,
        models: &[&str],
        timeout: Duration,
    ) -> std::result::Result<Duration, String> {
        let missing = |listed: &[String]| -> Vec<String> {
            models
                .iter()
                .filter(|m| !listed.iter().any(|l| l == *m))
                .map(|m| (*m).to_owned())
                .collect()
        };
        if let Some(took) = self.poll(timeout, || {
            missing(&self.listed_models(gateway, key)).is_empty()
        }) {
            return Ok(took);
        }
        let listed = self.listed_models(gateway, key);
        let (code, health, _) =
            self.http("GET", &format!("{gateway}/health/models"), Some(key), None);
        Err(format!(
            "after {:.0} s the gateway lists {listed:?}, not {:?} (/health/models: http {code} {})",
            timeout.as_secs_f64(),
            missing(&listed),
            health.chars().take(600).collect::<String>()
        ))
    }

    /// Polls `f` every 100 ms until it is true or `timeout` passes; the time it took.
    pub fn poll(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
        let t = Instant::now();
        loop {
            if f() {
                return Some(t.elapsed());
            }
            if t.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Tier {
    /// Boots a sandbox and copies Citadel's binaries from `bin_dir` into it: the
    /// host's files are visible inside, except below /tmp (nspawn mounts a fresh
    /// tmpfs there), where a clone may live.
    pub fn boot(tier: &str, opts: SandboxOptions, bin_dir: &Path) -> Result<Tier> {
        let t = Instant::now();
        let sb = Sandbox::boot(opts).context("booting the systemd sandbox")?;
        println!(
            "{tier}: sandbox {} booted in {:.1} s",
            sb.name(),
            t.elapsed().as_secs_f64()
        );
        let inside = "/usr/local/lib/citadel-test/bin";
        let dest = sb.root().join(&inside[1..]);
        std::fs::create_dir_all(&dest)?;
        for b in CITADEL_BINS {
            std::fs::copy(bin_dir.join(b), dest.join(b))
                .with_context(|| format!("copying {b} into the sandbox"))?;
        }
        Ok(Tier {
            cli: format!("{inside}/citadel-systemd"),
            bin_dir: inside.to_owned(),
            sb,
        })
    }
}
