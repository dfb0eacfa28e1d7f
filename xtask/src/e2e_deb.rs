//! `cargo xtask e2e-deb`: the Debian package, tested for real (issue 13, item 5).
//!
//! Builds two packages with [`crate::deb`] (the workspace's version V and
//! `V+e2e1`, release binaries), checks them with `lintian` (no errors; the
//! warnings are listed), boots a fresh systemd sandbox and, in it:
//!
//! * `dpkg -i` V: every binary's `--version` names V and the commit, the user
//!   and directories exist, nothing was started, `man -w citadel-systemd`
//!   and `man -w citadel-systemd-install` find the pages, bash completes
//!   subcommands;
//! * `citadel-systemd init --example sim`, `install`, `start`, `health`; bash
//!   completes model names for `restart`; `status` says every binary is current;
//! * `dpkg -i` `V+e2e1` under a steady load through the gateway: 0 failed
//!   requests, the model units and their engines keep their PIDs, the gateway
//!   restarted, `status` says the models wait for a restart ("restart to
//!   apply") and the gateway does not; `citadel-systemd restart MODEL`
//!   applies it to that model;
//! * `dpkg -r`: the stack is stopped and its units are gone; config, API
//!   keys, state, the user and a weights file under /opt/citadel/models remain;
//! * `dpkg -P`: config, keys, state, the install record, the user and group
//!   are gone; the weights file remains.
//!
//! Prints `PASS`/`FAIL` per check and a last line `e2e-deb: N passed, M
//! failed`; exits non-zero on any failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use citadel_sandbox::{Sandbox, SandboxOptions};

use crate::deb;
use crate::tier::{ensure_debian_packages, info, unit, Report, Tier, CITADEL_BINS};

const GATEWAY: &str = "http://127.0.0.1:8000";
const MODELS: [&str; 4] = ["mixtral", "hermes", "openchat", "phi3"];
/// Where the packages are put inside the sandbox.
const DEBS: &str = "/var/tmp/citadel-debs";
const WEIGHTS: &str = "/opt/citadel/models/mixtral/weights.safetensors";
/// The load's log and stop flag inside the sandbox.
const LOAD_LOG: &str = "/var/tmp/e2e-deb-load.log";
const LOAD_STOP: &str = "/var/tmp/e2e-deb-load.stop";

fn usage() -> &'static str {
    "usage: cargo xtask e2e-deb [--out DIR]\n\
     \n\
     --out DIR  where the two packages are built (default: target/deb)"
}

pub fn run(args: Vec<String>) -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(it.next().context(usage())?.into()),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    let t0 = Instant::now();
    ensure_debian_packages("e2e-deb", &["dpkg-dev", "binutils", "lintian", "man-db"])?;
    let out = out.unwrap_or_else(|| deb::target_dir().join("deb"));
    let v1 = env!("CARGO_PKG_VERSION").to_owned();
    let v2 = format!("{v1}+e2e1");
    let mut r = Report::default();
    let result = (|| -> Result<()> {
        let deb1 = deb::build(&v1, &out)?;
        let deb2 = deb::build(&v2, &out)?;
        lintian(&mut r, &deb1);
        scenario(&mut r, &deb1, &deb2, &v1, &v2)
    })();
    if let Err(e) = &result {
        r.check("scenario ran to the end", false, format!("{e:#}"));
    }
    println!(
        "e2e-deb: total wall time {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    println!("e2e-deb: {} passed, {} failed", r.passed, r.failed);
    if r.failed > 0 {
        bail!("{} check(s) failed", r.failed);
    }
    Ok(())
}

/// lintian: no errors; warnings (and overridden tags) listed.
fn lintian(r: &mut Report, deb: &Path) {
    let out = Command::new("lintian")
        .args(["--tag-display-limit", "0", "--show-overrides"])
        .arg(deb)
        .output();
    let text = match out {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            r.check("lintian runs", false, e);
            return;
        }
    };
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    for l in text.lines().filter(|l| !l.starts_with("E: ")) {
        info("lintian", l);
    }
    r.check(
        "lintian reports no errors",
        errors.is_empty(),
        if errors.is_empty() {
            "0 errors".to_owned()
        } else {
            errors.join("\n")
        },
    );
}

/// The sandbox as a [`Tier`] whose CLI is the packaged one on PATH.
fn boot() -> Result<Tier> {
    let t = Instant::now();
    let sb =
        Sandbox::boot(SandboxOptions::new("e2e-deb")).context("booting the systemd sandbox")?;
    println!(
        "e2e-deb: sandbox {} booted in {:.1} s",
        sb.name(),
        t.elapsed().as_secs_f64()
    );
    Ok(Tier {
        sb,
        cli: "/usr/bin/citadel-systemd".into(),
        bin_dir: "/opt/citadel/bin".into(),
    })
}

fn scenario(r: &mut Report, deb1: &Path, deb2: &Path, v1: &str, v2: &str) -> Result<()> {
    let tier = boot()?;
    let inside = tier.sb.root().join(&DEBS[1..]);
    std::fs::create_dir_all(&inside)?;
    let mut names = Vec::new();
    for deb in [deb1, deb2] {
        let name = deb.file_name().context("a package's name")?;
        std::fs::copy(deb, inside.join(name))?;
        names.push(format!("{DEBS}/{}", name.to_string_lossy()));
    }
    install_fresh(r, &tier, &names[0], v1);
    start_stack(r, &tier)?;
    upgrade_under_load(r, &tier, &names[1], v2)?;
    remove_and_purge(r, &tier);
    Ok(())
}

fn dpkg(tier: &Tier, args: &[&str]) -> (bool, String) {
    let t = Instant::now();
    let mut argv = vec!["dpkg"];
    argv.extend_from_slice(args);
    let (ok, out) = tier.exec(&argv);
    println!(
        "$ dpkg {}  [{} in {:.1} s]\n{out}",
        args.join(" "),
        if ok { "ok" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    (ok, out)
}

fn exists(tier: &Tier, path: &str) -> bool {
    tier.exec(&["test", "-e", path]).0
}

/// Bash completion as a shell does it: COMPREPLY for `words` with the cursor
/// on the last one.
fn complete(tier: &Tier, words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let script = format!(
        "source /usr/share/bash-completion/completions/citadel-systemd\n\
         COMP_WORDS=({}); COMP_CWORD={cword}\n\
         _citadel_systemd_services citadel-systemd '{}' '{}'\n\
         echo \"${{COMPREPLY[@]}}\"",
        quoted.join(" "),
        words[cword],
        words[cword.saturating_sub(1)],
    );
    tier.exec(&["bash", "-c", &script]).1.trim().to_owned()
}

fn citadel_units_running(tier: &Tier) -> String {
    tier.exec(&[
        "systemctl",
        "list-units",
        "--no-legend",
        "--plain",
        "--state=active,activating,reloading",
        "citadel*",
    ])
    .1
    .trim()
    .to_owned()
}

fn install_fresh(r: &mut Report, tier: &Tier, deb: &str, v1: &str) {
    let (ok, out) = dpkg(tier, &["-i", deb]);
    r.check("dpkg -i installs the package", ok, out.trim());
    for b in CITADEL_BINS {
        let (_, v) = tier.exec(&[&format!("/opt/citadel/bin/{b}"), "--version"]);
        let v = v.trim();
        r.check(
            &format!("{b} --version names the package version and the commit"),
            v.starts_with(&format!("{b} {v1} (commit ")) && v.ends_with(')'),
            v,
        );
    }
    let (_, v) = tier.exec(&["citadel-systemd", "--version"]);
    r.check("citadel-systemd is on PATH", v.contains(v1), v.trim());
    let user = tier.exec(&["getent", "passwd", "citadel"]);
    r.check(
        "the package created the citadel user",
        user.0,
        user.1.trim(),
    );
    let dirs = [
        "/etc/citadel/credentials",
        "/var/lib/citadel",
        "/opt/citadel/config",
    ];
    let missing: Vec<&str> = dirs.iter().copied().filter(|d| !exists(tier, d)).collect();
    r.check(
        "the package created the base directories",
        missing.is_empty(),
        format!("missing: {missing:?}"),
    );
    let running = citadel_units_running(tier);
    r.check(
        "a fresh install starts nothing",
        running.is_empty(),
        format!("running: {running:?}"),
    );
    for page in [
        "citadel-systemd",
        "citadel-systemd-install",
        "citadel-model",
        "citadel-gateway",
    ] {
        let (ok, path) = tier.exec(&["man", "-w", page]);
        let (zok, text) = tier.exec(&["sh", "-c", &format!("zcat {} | head -c 300", path.trim())]);
        r.check(
            &format!("man -w {page} finds the page"),
            ok && zok && text.contains(".TH"),
            path.trim(),
        );
    }
    let subs = complete(tier, &["citadel-systemd", "re"]);
    r.check(
        "bash completes subcommands",
        ["restart", "reload", "render"]
            .iter()
            .all(|s| subs.split_whitespace().any(|w| w == *s)),
        format!("citadel-systemd re<TAB>: {subs}"),
    );
}

fn start_stack(r: &mut Report, tier: &Tier) -> Result<()> {
    let (code, _) = tier.cli(&["init", "--example", "sim"]);
    r.check(
        "citadel-systemd init --example sim",
        code == Some(0),
        format!("exit {code:?}"),
    );
    let (code, _) = tier.cli(&["install"]);
    if !r.check(
        "citadel-systemd install",
        code == Some(0),
        format!("exit {code:?}"),
    ) {
        bail!("install failed; nothing to go on with");
    }
    let (code, _) = tier.cli(&["start"]);
    r.check(
        "citadel-systemd start",
        code == Some(0),
        format!("exit {code:?}"),
    );
    let key = tier.api_key();
    match tier.wait_listed(GATEWAY, &key, &MODELS, Duration::from_secs(60)) {
        Ok(took) => r.check("the gateway admits every model", true, format!("{took:?}")),
        Err(e) => r.check("the gateway admits every model", false, e),
    };
    let (code, _) = tier.cli(&["health"]);
    r.check(
        "citadel-systemd health is healthy",
        code == Some(0),
        format!("exit {code:?}"),
    );
    let names = complete(tier, &["citadel-systemd", "restart", ""]);
    r.check(
        "bash completes model names for SERVICE arguments",
        MODELS
            .iter()
            .all(|m| names.split_whitespace().any(|w| w == *m)),
        format!("citadel-systemd restart <TAB>: {names}"),
    );
    let states = binary_states(tier);
    r.check(
        "status: every unit runs the installed binary",
        states.len() == MODELS.len() + 1 && states.iter().all(|(_, b)| b == "current"),
        format!("{states:?}"),
    );
    Ok(())
}

/// (service, binary) from `status --json`.
fn binary_states(tier: &Tier) -> Vec<(String, String)> {
    let (_, out) = tier.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["service"].as_str().unwrap_or("").to_owned(),
                        s["binary"].as_str().unwrap_or("null").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The PIDs of a model: its main process and everything in its cgroup.
fn model_pids(tier: &Tier, model: &str) -> (String, Vec<u32>) {
    let main = tier.show(&unit(model), "MainPID");
    let mut all = tier.cgroup_pids(&unit(model));
    all.sort_unstable();
    (main, all)
}

fn upgrade_under_load(r: &mut Report, tier: &Tier, deb: &str, v2: &str) -> Result<()> {
    let before: Vec<(String, Vec<u32>)> = MODELS.iter().map(|m| model_pids(tier, m)).collect();
    let gateway_before = tier.show("citadel-gateway.service", "MainPID");
    let key = tier.api_key();
    // A steady load: one client in a loop, each model in turn, for at most
    // 120 s or 20,000 requests, until the stop flag appears.
    let load = format!(
        r#"rm -f {LOAD_STOP} {LOAD_LOG}; n=0
models="{models}"
while [ ! -e {LOAD_STOP} ] && [ $n -lt 20000 ] && [ $SECONDS -lt 120 ]; do
  for m in $models; do
    curl -s -o /dev/null -m 30 -w '%{{http_code}}\n' -H 'Authorization: Bearer {key}' \
      -H 'Content-Type: application/json' \
      --data-binary "{{\"model\":\"$m\",\"prompt\":\"hi\",\"max_tokens\":4}}" \
      {GATEWAY}/v1/completions >> {LOAD_LOG}
    n=$((n + 1))
  done
done"#,
        models = MODELS.join(" ")
    );
    let (ok, out) = tier.exec(&[
        "systemd-run",
        "--unit=citadel-e2e-load",
        "--collect",
        "--quiet",
        "bash",
        "-c",
        &load,
    ]);
    if !r.check("the load starts", ok, out.trim()) {
        bail!("no load, no upgrade test");
    }
    let lines = |tier: &Tier| -> Vec<String> {
        std::fs::read_to_string(tier.sb.root().join(&LOAD_LOG[1..]))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    tier.poll(Duration::from_secs(30), || lines(tier).len() >= 40);
    let during_start = lines(tier).len();
    let (ok, out) = dpkg(tier, &["-i", deb]);
    r.check(
        "dpkg -i upgrades to the second version",
        ok,
        out.lines().last().unwrap_or(""),
    );
    let after_upgrade = lines(tier).len();
    // Keep the load on a little longer, through the gateway's restart.
    tier.poll(Duration::from_secs(30), || {
        lines(tier).len() >= after_upgrade + 100
    });
    tier.exec(&["touch", LOAD_STOP]);
    tier.poll(Duration::from_secs(60), || {
        !tier
            .exec(&[
                "systemctl",
                "is-active",
                "--quiet",
                "citadel-e2e-load.service",
            ])
            .0
    });
    let all = lines(tier);
    let failed: Vec<&String> = all.iter().filter(|c| c.as_str() != "200").collect();
    r.check(
        "no request failed during the upgrade",
        failed.is_empty() && all.len() > during_start,
        format!(
            "failed requests: {} of {} ({} sent before the upgrade, {} while dpkg ran, {} after); non-200: {:?}",
            failed.len(),
            all.len(),
            during_start,
            after_upgrade - during_start,
            all.len() - after_upgrade,
            failed.iter().take(10).collect::<Vec<_>>()
        ),
    );
    let after: Vec<(String, Vec<u32>)> = MODELS.iter().map(|m| model_pids(tier, m)).collect();
    for ((m, b), a) in MODELS.iter().zip(&before).zip(&after) {
        r.check(
            &format!("{m} keeps serving: same supervisor and engine PIDs"),
            b == a && !b.1.is_empty(),
            format!("before {b:?}, after {a:?}"),
        );
    }
    let gateway_after = tier.show("citadel-gateway.service", "MainPID");
    r.check(
        "the upgrade restarted the gateway",
        gateway_after != gateway_before && gateway_after != "0",
        format!("MainPID {gateway_before} -> {gateway_after}"),
    );
    let (_, v) = tier.exec(&["citadel-systemd", "--version"]);
    r.check("the new version is installed", v.contains(v2), v.trim());
    let states = binary_states(tier);
    let state = |s: &str| {
        states
            .iter()
            .find(|(n, _)| n == s)
            .map_or("missing", |(_, b)| b.as_str())
            .to_owned()
    };
    r.check(
        "status: the models wait for a restart, the gateway runs the new binary",
        MODELS.iter().all(|m| state(m) == "restart-to-apply") && state("gateway") == "current",
        format!("{states:?}"),
    );
    let (_, table) = tier.cli(&["status"]);
    r.check(
        "status says \"restart to apply\"",
        table.contains("restart to apply"),
        "see the table above",
    );
    let (code, _) = tier.cli(&["restart", MODELS[0]]);
    r.check(
        &format!("citadel-systemd restart {}", MODELS[0]),
        code == Some(0),
        format!("exit {code:?}"),
    );
    let states = binary_states(tier);
    let state = |s: &str| {
        states
            .iter()
            .find(|(n, _)| n == s)
            .map_or("missing", |(_, b)| b.as_str())
            .to_owned()
    };
    r.check(
        "after restart MODEL it runs the new binary, the others still wait",
        state(MODELS[0]) == "current" && MODELS[1..].iter().all(|m| state(m) == "restart-to-apply"),
        format!("{states:?}"),
    );
    Ok(())
}

fn remove_and_purge(r: &mut Report, tier: &Tier) {
    tier.exec(&[
        "sh",
        "-c",
        &format!(
            "mkdir -p {dir} && head -c 1048576 /dev/urandom > {WEIGHTS}",
            dir = Path::new(WEIGHTS)
                .parent()
                .map_or(String::new(), |p| p.display().to_string())
        ),
    ]);
    let (ok, out) = dpkg(tier, &["-r", "citadel"]);
    r.check(
        "dpkg -r removes the package",
        ok,
        out.lines().last().unwrap_or(""),
    );
    let running = citadel_units_running(tier);
    r.check(
        "dpkg -r stopped the stack",
        running.is_empty() && tier.pgrep("citadel-").is_empty(),
        format!(
            "running units: {running:?}, processes: {:?}",
            tier.pgrep("citadel-")
        ),
    );
    let units_left = tier
        .exec(&[
            "sh",
            "-c",
            "ls /usr/local/lib/systemd/system/ | grep citadel",
        ])
        .1;
    r.check(
        "dpkg -r removed the units",
        units_left.trim().is_empty(),
        format!("left: {units_left:?}"),
    );
    let kept = [
        "/opt/citadel/config/citadel.toml",
        "/etc/citadel/credentials/api-keys",
        "/var/lib/citadel",
        WEIGHTS,
    ];
    let missing: Vec<&str> = kept.iter().copied().filter(|p| !exists(tier, p)).collect();
    let user = tier.exec(&["getent", "passwd", "citadel"]).0;
    r.check(
        "dpkg -r keeps config, keys, state, models and the user",
        missing.is_empty() && user,
        format!("missing: {missing:?}, user: {user}"),
    );
    let gone = [
        "/opt/citadel/bin/citadel-systemd",
        "/usr/bin/citadel-systemd",
    ];
    let left: Vec<&str> = gone.iter().copied().filter(|p| exists(tier, p)).collect();
    r.check(
        "dpkg -r removes the binaries",
        left.is_empty(),
        format!("left: {left:?}"),
    );

    let (ok, out) = dpkg(tier, &["-P", "citadel"]);
    r.check(
        "dpkg -P purges the package",
        ok,
        out.lines().last().unwrap_or(""),
    );
    let purged = [
        "/opt/citadel/config/citadel.toml",
        "/etc/citadel/credentials",
        "/var/lib/citadel",
        "/var/cache/citadel",
        "/var/lib/citadel-systemd/installed.json",
        "/usr/local/lib/sysusers.d/citadel.conf",
        "/usr/local/lib/tmpfiles.d/citadel.conf",
    ];
    let left: Vec<&str> = purged.iter().copied().filter(|p| exists(tier, p)).collect();
    let user = tier.exec(&["getent", "passwd", "citadel"]).0;
    let group = tier.exec(&["getent", "group", "citadel"]).0;
    r.check(
        "dpkg -P removes config, keys, state, the install record, the user and group",
        left.is_empty() && !user && !group,
        format!("left: {left:?}, user: {user}, group: {group}"),
    );
    r.check(
        "dpkg -P keeps the model weights",
        exists(tier, WEIGHTS),
        WEIGHTS,
    );
    let status = tier
        .exec(&["dpkg-query", "-W", "-f=${Status}", "citadel"])
        .1;
    r.check(
        "the package is gone",
        !status.contains("installed") || status.contains("not-installed"),
        status.trim(),
    );
}
