//! `cargo xtask sandbox ...`: boot a throwaway systemd container (systemd as
//! PID 1, see crates/sandbox) for poking at units by hand.
//!
//! ```text
//! cargo xtask sandbox shell                 boot, print how to enter, Ctrl-C tears down
//! cargo xtask sandbox run -- CMD [ARGS...]  boot, run CMD inside, tear down, exit with CMD's status
//! cargo xtask sandbox cleanup               remove leftovers of killed runs
//! options: --name PREFIX (default "xtask"), --host-network (share the host's network)
//! ```

use std::env;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use citadel_sandbox::{cleanup_stale, Sandbox, SandboxOptions};

const USAGE: &str = "usage: cargo xtask sandbox [--name PREFIX] [--host-network] <command>

commands:
  shell              boot a sandbox, print how to enter it, tear it down on Ctrl-C
  run -- CMD [ARGS]  boot a sandbox, run CMD inside (output streamed), tear down,
                     exit with CMD's status
  cleanup            remove leftovers (containers, mounts, cgroups, dirs) of
                     sandboxes whose owner process died

Needs root and systemd-nspawn (apt-get install systemd-container).";

/// Set in the re-executed xtask that ignores SIGINT (see `ignore_ctrl_c`).
const SIGIGN_ENV: &str = "CITADEL_XTASK_SANDBOX_SIGINT_IGNORED";

pub fn run(args: Vec<String>) -> anyhow::Result<()> {
    let mut opts = SandboxOptions::new("xtask");
    let mut command = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--" => {
                rest.extend(it.by_ref().cloned());
            }
            "--name" => opts.name_prefix = it.next().context("--name needs a value")?.clone(),
            "--host-network" => opts.private_network = false,
            "-h" | "--help" | "help" if command.is_none() => {
                println!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with('-') && command.is_none() => {
                bail!("unknown option `{s}`\n\n{USAGE}")
            }
            s if command.is_none() => command = Some(s.to_string()),
            s => rest.push(s.to_string()),
        }
    }

    match command.as_deref() {
        Some("shell") if rest.is_empty() => shell(&args, opts),
        Some("run") if !rest.is_empty() => run_cmd(&args, opts, &rest),
        Some("run") => bail!("`run` needs a command: cargo xtask sandbox run -- CMD [ARGS...]"),
        Some("cleanup") if rest.is_empty() => {
            citadel_sandbox::check_prerequisites()?;
            let removed = cleanup_stale()?;
            if removed.is_empty() {
                println!("no stale sandboxes");
            } else {
                println!("removed stale sandboxes: {}", removed.join(", "));
            }
            Ok(())
        }
        Some(other) => bail!("unexpected `{other}` arguments\n\n{USAGE}"),
        None => bail!("missing command\n\n{USAGE}"),
    }
}

/// Ctrl-C must not kill us before we tore the sandbox down. std cannot set
/// signal dispositions (and the workspace forbids unsafe code), so re-execute
/// ourselves through `sh -c 'trap "" INT; exec ...'`: an ignored signal stays
/// ignored across exec. Children that should react to Ctrl-C are started
/// through `env --default-signal=INT`.
fn ignore_ctrl_c(args: &[String]) -> anyhow::Result<()> {
    if env::var_os(SIGIGN_ENV).is_some() {
        return Ok(());
    }
    citadel_sandbox::check_prerequisites()?;
    let exe = env::current_exe().context("locate xtask binary")?;
    let err = Command::new("sh")
        .arg("-c")
        .arg(r#"trap "" INT; exec "$0" "$@""#)
        .arg(exe)
        .arg("sandbox")
        .args(args)
        .env(SIGIGN_ENV, "1")
        .exec();
    Err(err).context("re-exec xtask with SIGINT ignored")
}

fn boot(opts: SandboxOptions) -> anyhow::Result<Sandbox> {
    eprintln!("booting sandbox...");
    let sb = Sandbox::boot(opts)?;
    eprintln!(
        "sandbox `{}` up in {:.1?} (container PID 1 = host pid {})",
        sb.name(),
        sb.boot_duration(),
        sb.leader()
    );
    Ok(sb)
}

fn shell(args: &[String], opts: SandboxOptions) -> anyhow::Result<()> {
    ignore_ctrl_c(args)?;
    // Started before booting so a Ctrl-C during boot is not lost: this child
    // dies of the terminal's SIGINT, which is how we notice it.
    let mut ctrl_c = Command::new("env")
        .args(["--default-signal=INT", "sleep", "infinity"])
        .stdin(Stdio::null())
        .spawn()
        .context("spawn Ctrl-C watcher")?;
    let sb = boot(opts);
    let sb = match sb {
        Ok(sb) => sb,
        Err(e) => {
            let _ = ctrl_c.kill();
            let _ = ctrl_c.wait();
            return Err(e);
        }
    };
    println!(
        "\nenter it:     nsenter -t {leader} -a bash\n\
         its / (host): {root}\n\
         console log:  {log}\n\n\
         Press Ctrl-C here to tear it down.",
        leader = sb.leader(),
        root = sb.root().display(),
        log = sb.console_log().display(),
    );
    ctrl_c.wait().context("wait for Ctrl-C")?;
    eprintln!("\ntearing down `{}`...", sb.name());
    sb.shutdown()?;
    eprintln!("done");
    Ok(())
}

fn run_cmd(args: &[String], opts: SandboxOptions, cmd: &[String]) -> anyhow::Result<()> {
    ignore_ctrl_c(args)?;
    let sb = boot(opts)?;
    let mut argv = vec!["env", "--default-signal=INT"];
    argv.extend(cmd.iter().map(String::as_str));
    let status = sb
        .command(&argv)
        .status()
        .with_context(|| format!("run {cmd:?} in the sandbox"));
    sb.shutdown()?;
    let status = status?;
    if status.success() {
        return Ok(());
    }
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    eprintln!("{cmd:?} exited with {status}");
    std::process::exit(code);
}
