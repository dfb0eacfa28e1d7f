//! Throwaway systemd containers for integration tests.
//!
//! [`Sandbox::boot`] overlays the live host `/` onto a scratch directory, boots
//! it with `systemd-nspawn -b` (systemd as PID 1) inside fresh cgroups, makes
//! the cgroup controllers writable inside so resource limits (`MemoryMax=`,
//! `CPUQuota=`, ...) are really enforced, and waits until the system is up.
//! Commands run inside through `nsenter`. Dropping the [`Sandbox`] (also while a
//! test panics) tears everything down; leftovers of a killed test run are
//! removed by the next [`Sandbox::boot`] (or [`cleanup_stale`]).
//!
//! Needs root, `systemd-nspawn` (Debian: `systemd-container`), `nsenter`
//! (`util-linux`) and overlayfs. See README.md for the recipe and why each
//! step exists.
//!
//! ```no_run
//! use citadel_sandbox::{Sandbox, SandboxOptions};
//! let sb = Sandbox::boot(SandboxOptions::new("mytest")).unwrap();
//! let state = sb.exec_ok(&["systemctl", "is-system-running"]).unwrap();
//! assert!(state.trim() == "running" || state.trim() == "degraded");
//! sb.shutdown().unwrap();
//! ```

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

mod host;

use host::{io_err, poll_until, POLL};

/// Directory holding one scratch directory per sandbox
/// (`BASE_DIR/NAME/{owner,nspawn.pid,console.log,upper,work,root}`).
pub const BASE_DIR: &str = "/var/tmp/citadel-sandbox";

/// Prefix of the per-sandbox cgroup created in every hierarchy
/// (`/sys/fs/cgroup/<hierarchy>/citadel-sandbox-NAME`).
pub const CGROUP_PREFIX: &str = "citadel-sandbox-";

/// How long a graceful container shutdown may take before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Options for [`Sandbox::boot`].
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Start of the sandbox name (sanitised to `[a-z0-9-]`, max 24 chars); the
    /// owner pid and a counter are appended to make it unique.
    pub name_prefix: String,
    /// Deadline for the whole boot, until `is-system-running` says
    /// running/degraded with writable cgroup controllers.
    pub boot_timeout: Duration,
    /// Give the container its own network namespace (loopback only) via
    /// `--private-network`. Default true: parallel sandboxes (and the host)
    /// then cannot collide on ports, e.g. two sandboxes both starting a
    /// host-enabled PostgreSQL. Set false to share the host network, e.g. to
    /// reach a service inside from a test running on the host.
    pub private_network: bool,
    /// Extra arguments for `systemd-nspawn` (e.g. `--bind=/some/dir`, `--setenv=..`).
    pub extra_nspawn_args: Vec<String>,
}

impl SandboxOptions {
    pub fn new(name_prefix: impl Into<String>) -> Self {
        SandboxOptions {
            name_prefix: name_prefix.into(),
            ..Default::default()
        }
    }
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            name_prefix: "sbx".into(),
            boot_timeout: Duration::from_secs(120),
            private_network: true,
            extra_nspawn_args: Vec::new(),
        }
    }
}

/// Everything that can go wrong. Messages are meant to be read by a human
/// looking at a failed test.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "the systemd sandbox cannot run on this machine:\n{0}\n\
         (these tests need root and systemd-nspawn; they are not skipped on purpose)"
    )]
    Prerequisites(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(
        "command {argv:?} failed ({status})\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}"
    )]
    Command {
        argv: Vec<String>,
        status: String,
        stdout: String,
        stderr: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("sandbox `{name}` failed to boot: {reason}\n--- last lines of its console log ---\n{log_tail}")]
    Boot {
        name: String,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },
    #[error("teardown of sandbox(es) incomplete:\n  {}", problems.join("\n  "))]
    Teardown { problems: Vec<String> },
}

/// A booted systemd container. Tear down with [`Sandbox::shutdown`] or by dropping it.
pub struct Sandbox {
    name: String,
    dir: PathBuf,
    root: PathBuf,
    nspawn: Option<Child>,
    leader: u32,
    failed_units: Vec<String>,
    boot_duration: Duration,
    boot_timeout: Duration,
    opts: SandboxOptions,
    torn_down: bool,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("name", &self.name)
            .field("root", &self.root)
            .field("leader", &self.leader)
            .field("nspawn", &self.nspawn.as_ref().map(Child::id))
            .finish()
    }
}

impl Sandbox {
    /// Boots a new sandbox with a unique name and waits until systemd inside
    /// reports `running` or `degraded`. Removes stale sandboxes first.
    pub fn boot(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let deadline = started + opts.boot_timeout;
        check_prerequisites()?;
        if let Err(e) = cleanup_stale() {
            eprintln!("citadel-sandbox: warning: {e}");
        }

        fs::create_dir_all(BASE_DIR).map_err(|e| io_err(format!("mkdir {BASE_DIR}"), e))?;
        let name = unique_name(&opts.name_prefix);
        let dir = Path::new(BASE_DIR).join(&name);
        fs::create_dir(&dir).map_err(|e| io_err(format!("mkdir {}", dir.display()), e))?;
        let mut sb = Sandbox {
            root: dir.join("root"),
            dir,
            name,
            nspawn: None,
            leader: 0,
            failed_units: Vec::new(),
            boot_duration: Duration::ZERO,
            boot_timeout: opts.boot_timeout,
            opts: opts.clone(),
            torn_down: false,
        };
        // From here on, any error drops `sb`, which tears down what was built.
        if let Err(e) = sb.start(&opts, deadline) {
            return Err(SandboxError::Boot {
                name: sb.name.clone(),
                reason: e.to_string(),
                log: sb.console_log(),
                log_tail: tail(&sb.console_log(), 30),
            });
        }
        sb.boot_duration = started.elapsed();
        if !sb.failed_units.is_empty() {
            eprintln!(
                "citadel-sandbox: `{}` booted degraded; failed units: {}",
                sb.name,
                sb.failed_units.join(", ")
            );
        }
        Ok(sb)
    }

    fn start(&mut self, opts: &SandboxOptions, deadline: Instant) -> Result<(), SandboxError> {
        // Ownership record first, so a cleaner can tell whether we are alive.
        let me = std::process::id();
        let owner = format!("{me} {}\n", host::start_time(me).unwrap_or(0));
        write(&self.dir.join("owner"), &owner)?;

        // 1. Copy-on-write view of the live host `/`.
        self.mount_overlay()?;

        // 2. Fresh machine id (journald, D-Bus and friends key on it) and hostname.
        for id in ["etc/machine-id", "var/lib/dbus/machine-id"] {
            match fs::remove_file(self.root.join(id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(format!("remove {id} in sandbox"), e))
                }
                _ => {}
            }
        }
        let root_arg = format!("--root={}", self.root.display());
        host::run_host("systemd-machine-id-setup", &[&root_arg])?;
        // Own hostname (= sandbox name) so journals and prompts say where they are.
        write(&self.root.join("etc/hostname"), &format!("{}\n", self.name))?;

        self.launch(opts, deadline)
    }

    /// Steps 3 to 6: cgroups, nspawn, readiness, writable controllers. Run
    /// once per boot of the same root ([`Sandbox::reboot`] runs it again).
    fn launch(&mut self, opts: &SandboxOptions, deadline: Instant) -> Result<(), SandboxError> {
        // 3. Fresh cgroups in every hierarchy for the nspawn process.
        let procs = self.create_cgroups()?;

        // 4. Boot. A tiny sh wrapper joins the cgroups, then execs nspawn (no
        //    pre_exec: the workspace forbids unsafe code).
        let log =
            fs::File::create(self.console_log()).map_err(|e| io_err("create console log", e))?;
        let log2 = log.try_clone().map_err(|e| io_err("dup console log", e))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                r#"n=$1; shift
                   while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 97; shift; n=$((n-1)); done
                   exec "$@""#,
            )
            .arg("citadel-sandbox-launch")
            .arg(procs.len().to_string())
            .args(&procs)
            .arg("systemd-nspawn")
            .arg("-D")
            .arg(&self.root)
            .args(["-M", &self.name])
            .args([
                "-b",
                "--register=no",
                "--keep-unit",
                "--link-journal=no",
                "--console=passive",
            ]);
        if opts.private_network {
            cmd.arg("--private-network");
        }
        cmd.args(&opts.extra_nspawn_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Own process group: a Ctrl-C in the terminal must reach only us,
            // so we can tear down in order.
            .process_group(0);
        let child = cmd.spawn().map_err(|e| io_err("spawn systemd-nspawn", e))?;
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        write(&self.dir.join("nspawn.pid"), &format!("{nspawn_pid}\n"))?;

        // The container's PID 1 is the child of nspawn that is init of a new pid ns.
        let mut leader = None;
        self.poll_boot(deadline, "the container's PID 1 to appear", |_| {
            leader = host::children(nspawn_pid)
                .into_iter()
                .find(|&p| host::is_ns_init(p));
            Ok(leader.is_some())
        })?;
        self.leader = leader.unwrap_or_default();

        self.wait_running(deadline)?;

        // 5. nspawn mounts the v1 controllers read-only: systemd inside then
        //    silently skips MemoryMax=, CPUQuota=, ... Make them writable and
        //    let systemd re-detect its cgroup setup.
        let ro_controllers: Vec<PathBuf> = host::mounts(&format!("/proc/{}/mounts", self.leader))
            .into_iter()
            .filter(|m| {
                m.fstype == "cgroup"
                    && m.point.starts_with("/sys/fs/cgroup")
                    && m.options.iter().any(|o| o == "ro")
            })
            .map(|m| m.point)
            .collect();
        for point in &ro_controllers {
            let point = point.to_string_lossy();
            self.exec_ok(&["mount", "-o", "remount,bind,rw", &point])?;
        }
        self.exec_ok(&["systemctl", "daemon-reexec"])?;
        let state = self.wait_running(deadline)?;

        if state == "degraded" {
            let failed = self.exec_ok(&["systemctl", "--failed", "--plain", "--no-legend"])?;
            self.failed_units = failed
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect();
        }
        Ok(())
    }

    fn mount_overlay(&self) -> Result<(), SandboxError> {
        let try_mount = |scratch: &Path| -> Result<(), SandboxError> {
            let (upper, work) = (scratch.join("upper"), scratch.join("work"));
            for d in [&upper, &work, &self.root] {
                fs::create_dir_all(d).map_err(|e| io_err(format!("mkdir {}", d.display()), e))?;
            }
            let opts = format!(
                "lowerdir=/,upperdir={},workdir={}",
                upper.display(),
                work.display()
            );
            host::run_host(
                "mount",
                &[
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    &opts,
                    &self.root.to_string_lossy(),
                ],
            )
            .map(drop)
        };
        // Upper dir on disk (large writes are fine); if the filesystem under
        // BASE_DIR cannot be an overlay upper, fall back to a tmpfs.
        match try_mount(&self.dir) {
            Ok(()) => Ok(()),
            Err(disk_err) => {
                let tmp = self.dir.join("tmpfs");
                fs::create_dir_all(&tmp).map_err(|e| io_err("mkdir tmpfs", e))?;
                host::run_host("mount", &["-t", "tmpfs", "tmpfs", &tmp.to_string_lossy()])?;
                try_mount(&tmp).map_err(|tmpfs_err| SandboxError::Io {
                    context: format!(
                        "overlay mount failed with a disk upper dir ({disk_err}) and with a tmpfs one"
                    ),
                    source: io::Error::other(tmpfs_err.to_string()),
                })
            }
        }
    }

    /// Creates `citadel-sandbox-NAME` in every cgroup hierarchy; returns the
    /// `cgroup.procs` files the launcher must write its pid to.
    fn create_cgroups(&self) -> Result<Vec<PathBuf>, SandboxError> {
        let hierarchies = host::cgroup_hierarchies();
        if hierarchies.is_empty() {
            return Err(SandboxError::Prerequisites(
                "no cgroup hierarchies mounted under /sys/fs/cgroup".into(),
            ));
        }
        let mut procs = Vec::new();
        for h in hierarchies {
            let cg = h.mount_point.join(self.cgroup_name());
            fs::create_dir(&cg).map_err(|e| io_err(format!("mkdir {}", cg.display()), e))?;
            if h.is_cpuset {
                // A v1 cpuset cgroup starts with empty cpus/mems and refuses
                // tasks until they are set.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = fs::read_to_string(h.mount_point.join(f))
                        .map_err(|e| io_err(format!("read {f}"), e))?;
                    write(&cg.join(f), &v)?;
                }
            }
            procs.push(cg.join("cgroup.procs"));
        }
        Ok(procs)
    }

    /// Polls `is-system-running` until running/degraded; returns the state.
    fn wait_running(&mut self, deadline: Instant) -> Result<String, SandboxError> {
        let mut state = String::new();
        self.poll_boot(deadline, "systemd inside to finish booting", |sb| {
            let out = sb
                .exec(&["systemctl", "is-system-running"])
                .map_err(|e| io_err("run nsenter", e))?;
            state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" | "degraded" => Ok(true),
                "maintenance" | "stopping" => Err(SandboxError::Io {
                    context: format!("systemd inside entered state `{state}`"),
                    source: io::Error::other("boot failed"),
                }),
                // initializing, starting, offline (manager not reachable yet), ""
                _ => Ok(false),
            }
        })?;
        Ok(state)
    }

    /// Polls `f` until true, failing early if nspawn exits or at the deadline.
    fn poll_boot(
        &mut self,
        deadline: Instant,
        what: &str,
        mut f: impl FnMut(&Sandbox) -> Result<bool, SandboxError>,
    ) -> Result<(), SandboxError> {
        loop {
            if let Some(child) = self.nspawn.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(SandboxError::Io {
                        context: format!(
                            "systemd-nspawn exited ({status}) while waiting for {what}"
                        ),
                        source: io::Error::other("container gone"),
                    });
                }
            }
            if f(self)? {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SandboxError::Timeout {
                    what: what.into(),
                    timeout: self.boot_timeout,
                });
            }
            std::thread::sleep(POLL * 2);
        }
    }

    /// Unique sandbox (and machine/host) name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host-side path of the container's `/` (the merged overlay). Files
    /// written here are visible inside at the corresponding path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Host pid of the container's PID 1 (systemd).
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// Host pid of the `systemd-nspawn` process.
    pub fn nspawn_pid(&self) -> Option<u32> {
        self.nspawn.as_ref().map(Child::id)
    }

    /// Path of the nspawn console log (boot messages), handy in failure messages.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Wall time [`Sandbox::boot`] took.
    pub fn boot_duration(&self) -> Duration {
        self.boot_duration
    }

    /// Units that had failed when boot finished (non-empty iff the state was
    /// `degraded`). Informational.
    pub fn failed_units(&self) -> &[String] {
        &self.failed_units
    }

    fn cgroup_name(&self) -> String {
        format!("{CGROUP_PREFIX}{}", self.name)
    }

    /// A `Command` running `argv` inside the container (all its namespaces
    /// and root, via `nsenter -t LEADER -a`), for callers that want to stream
    /// output or set stdio themselves. The process is a member of the
    /// container's pid namespace (killed at teardown) but stays in the
    /// caller's cgroups: use `systemd-run` inside for resource limits.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("--")
            .args(argv);
        // Host service-manager plumbing must not leak into the container.
        for var in [
            "NOTIFY_SOCKET",
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "INVOCATION_ID",
            "JOURNAL_STREAM",
            "WATCHDOG_PID",
            "WATCHDOG_USEC",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Runs `argv` inside the container and collects its output (stdin closed).
    pub fn exec(&self, argv: &[&str]) -> io::Result<Output> {
        self.command(argv).output()
    }

    /// Runs `argv` inside; returns stdout on success, otherwise an error with
    /// the exit status, stderr and stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String, SandboxError> {
        let out = self
            .exec(argv)
            .map_err(|e| io_err(format!("run nsenter for {argv:?}"), e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(SandboxError::Command {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                status: out.status.to_string(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// Polls `f` (every 50 ms) until it returns true; `what` names the
    /// condition in the timeout error.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        f: impl FnMut() -> bool,
    ) -> Result<(), SandboxError> {
        if poll_until(timeout, f) {
            Ok(())
        } else {
            Err(SandboxError::Timeout {
                what: format!("{what} (in sandbox `{}`)", self.name),
                timeout,
            })
        }
    }

    /// Reboots the container over the same state: systemd inside shuts down
    /// in order (every unit stopped as on `poweroff`: nspawn turns SIGTERM
    /// into an orderly halt), the container's cgroups are removed, and the
    /// same root (the overlay and its upper layer, i.e. every file written
    /// inside, the machine id, enablement symlinks, the journal in
    /// /var/log/journal when persistent) boots again with a fresh PID 1, /run
    /// and /tmp, exactly as a host comes back from a reboot. Waits until
    /// systemd inside reports `running` or `degraded` again.
    pub fn reboot(&mut self) -> Result<(), SandboxError> {
        let started = Instant::now();
        let deadline = started + self.opts.boot_timeout;
        let mut child = self.nspawn.take().ok_or_else(|| SandboxError::Io {
            context: format!("reboot of sandbox `{}`", self.name),
            source: io::Error::other("the container is not running"),
        })?;
        if matches!(child.try_wait(), Ok(None)) {
            host::signal(&[child.id()], "TERM");
            if !poll_until(STOP_TIMEOUT, || !matches!(child.try_wait(), Ok(None))) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SandboxError::Timeout {
                    what: format!("sandbox `{}` to halt for a reboot", self.name),
                    timeout: STOP_TIMEOUT,
                });
            }
        }
        let _ = child.wait();
        let mut problems = Vec::new();
        remove_cgroups(&self.name, &mut problems);
        if !problems.is_empty() {
            return Err(SandboxError::Teardown { problems });
        }
        self.leader = 0;
        self.failed_units.clear();
        let opts = self.opts.clone();
        if let Err(e) = self.launch(&opts, deadline) {
            return Err(SandboxError::Boot {
                name: self.name.clone(),
                reason: format!("after a reboot: {e}"),
                log: self.console_log(),
                log_tail: tail(&self.console_log(), 30),
            });
        }
        self.boot_duration = started.elapsed();
        Ok(())
    }

    /// Stops the container and removes its overlay mount, cgroups and scratch
    /// directory. Also done (best effort, errors printed) on drop.
    pub fn shutdown(mut self) -> Result<(), SandboxError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), SandboxError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        let mut problems = Vec::new();
        if let Some(mut child) = self.nspawn.take() {
            // SIGTERM makes nspawn ask systemd inside for an orderly halt.
            if matches!(child.try_wait(), Ok(None)) {
                host::signal(&[child.id()], "TERM");
                let exited = poll_until(STOP_TIMEOUT, || !matches!(child.try_wait(), Ok(None)));
                if !exited {
                    problems.push(format!(
                        "{}: container did not stop within {STOP_TIMEOUT:?}, killed",
                        self.name
                    ));
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
        reap(&self.name, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SandboxError::Teardown { problems })
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("citadel-sandbox: {e}");
        }
    }
}

/// Checks everything [`Sandbox::boot`] needs; the error lists each missing
/// piece and the Debian package providing it.
pub fn check_prerequisites() -> Result<(), SandboxError> {
    let mut missing = Vec::new();
    if host::euid() != Some(0) {
        missing.push(
            "- must run as root (mounts an overlay, creates cgroups, runs systemd-nspawn); \
             e.g. `sudo -E cargo test -p citadel-sandbox`"
                .to_string(),
        );
    }
    for (program, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("systemd-machine-id-setup", "systemd"),
        ("kill", "procps"),
        ("sh", "dash"),
    ] {
        if host::which(program).is_none() {
            missing.push(format!(
                "- `{program}` not found: apt-get install {package}"
            ));
        }
    }
    if !["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        missing.push("- systemd (the init to boot) not found: apt-get install systemd".into());
    }
    let fs_list = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let overlay_listed = fs_list
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"));
    // Not listed may just mean the module is not loaded yet (mount autoloads it).
    if !overlay_listed && host::which("modprobe").is_none() {
        missing.push(
            "- kernel lacks overlayfs (enable CONFIG_OVERLAY_FS / `modprobe overlay`)".into(),
        );
    }
    if host::cgroup_hierarchies().is_empty() {
        missing.push("- no cgroup hierarchy mounted under /sys/fs/cgroup".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SandboxError::Prerequisites(missing.join("\n")))
    }
}

/// Removes leftovers of sandboxes whose owning process died (killed test
/// runs): stops their containers, unmounts their overlays, removes their
/// cgroups and scratch dirs. Returns the names of the sandboxes removed.
/// Sandboxes of live processes (including this one) are left alone.
pub fn cleanup_stale() -> Result<Vec<String>, SandboxError> {
    let mut problems = Vec::new();
    let mut removed = Vec::new();
    if let Ok(rd) = fs::read_dir(BASE_DIR) {
        for entry in rd.flatten() {
            let Some(name) = entry.file_name().to_str().map(String::from) else {
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) || owner_alive(&entry.path()) {
                continue;
            }
            if let Ok(pid) = read_pid(&entry.path().join("nspawn.pid")) {
                stop_foreign_nspawn(pid, &name, &mut problems);
            }
            reap(&name, &mut problems);
            removed.push(name);
        }
    }
    // Cgroups whose scratch dir is gone (a run killed mid-teardown). Boot
    // creates the dir before the cgroups and teardown removes it after them,
    // so a cgroup without its dir is always stale.
    for h in host::cgroup_hierarchies() {
        let Ok(rd) = fs::read_dir(&h.mount_point) else {
            continue;
        };
        for entry in rd.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(CGROUP_PREFIX))
            else {
                continue;
            };
            if !Path::new(BASE_DIR).join(name).exists() {
                reap(name, &mut problems);
                if !removed.iter().any(|r| r == name) {
                    removed.push(name.to_string());
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(removed)
    } else {
        Err(SandboxError::Teardown { problems })
    }
}

/// True if the scratch dir's owner process is still running (or the dir is
/// brand new and its owner record not written yet).
fn owner_alive(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("owner")) {
        Ok(s) => {
            let mut it = s.split_whitespace().map(|f| f.parse::<u64>().ok());
            match (it.next().flatten(), it.next().flatten()) {
                (Some(pid), Some(start)) => {
                    let pid = pid as u32;
                    host::alive(pid) && host::start_time(pid) == Some(start)
                }
                _ => false,
            }
        }
        Err(_) => fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(60)),
    }
}

fn read_pid(path: &Path) -> io::Result<u32> {
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(io::Error::other)
}

/// Orderly stop of a stale sandbox's nspawn (not our child), if that pid is
/// really its nspawn.
fn stop_foreign_nspawn(pid: u32, name: &str, problems: &mut Vec<String>) {
    let cmd = host::cmdline(pid);
    let is_ours = host::alive(pid)
        && cmd.first().is_some_and(|c| c.ends_with("systemd-nspawn"))
        && cmd.iter().any(|a| a == name);
    if !is_ours {
        return;
    }
    host::signal(&[pid], "TERM");
    if !poll_until(STOP_TIMEOUT, || !host::alive(pid)) {
        problems.push(format!("{name}: stale container did not stop, killed"));
        host::signal(&[pid], "KILL");
    }
}

/// Removes everything of sandbox `name` that is not a process we own:
/// remaining processes in its cgroups, its mounts, cgroups and scratch dir.
/// Idempotent and safe to race with another cleaner.
fn reap(name: &str, problems: &mut Vec<String>) {
    remove_cgroups(name, problems);

    let dir = Path::new(BASE_DIR).join(name);
    let mut mounts = host::mounts_under(&dir);
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    for m in &mounts {
        let m = m.to_string_lossy();
        if host::run_host("umount", &[&m]).is_err() {
            if let Err(e) = host::run_host("umount", &["-l", &m]) {
                problems.push(format!("{name}: cannot unmount {m}: {e}"));
            }
        }
    }

    // Never recurse into a still-mounted overlay.
    let left = host::mounts_under(&dir);
    if !left.is_empty() {
        problems.push(format!(
            "{name}: still mounted, keeping {}: {left:?}",
            dir.display()
        ));
    } else if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound && dir.exists() {
            problems.push(format!("{name}: cannot remove {}: {e}", dir.display()));
        }
    }
}

/// Kills whatever still runs in sandbox `name`'s cgroups and removes them
/// (teardown, and between the two boots of a reboot).
fn remove_cgroups(name: &str, problems: &mut Vec<String>) {
    let cgroups: Vec<PathBuf> = host::cgroup_hierarchies()
        .into_iter()
        .map(|h| h.mount_point.join(format!("{CGROUP_PREFIX}{name}")))
        .filter(|p| p.exists())
        .collect();

    // Anything still running in the sandbox's cgroups (normally nothing: the
    // pid namespace dies with the container's PID 1).
    let emptied = poll_until(Duration::from_secs(10), || {
        let pids: Vec<u32> = cgroups
            .iter()
            .flat_map(|c| host::cgroup_tree_pids(c))
            .collect();
        let live: Vec<u32> = pids.into_iter().filter(|&p| host::alive(p)).collect();
        host::signal(&live, "KILL");
        live.is_empty()
    });
    if !emptied {
        problems.push(format!("{name}: processes in its cgroups survived SIGKILL"));
    }

    for c in &cgroups {
        if let Err(e) = host::remove_cgroup_tree(c, Duration::from_secs(5)) {
            problems.push(format!("{name}: cannot remove cgroup {}: {e}", c.display()));
        }
    }
}

fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let mut p: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    p = p.trim_matches('-').to_string();
    if p.is_empty() {
        p = "sbx".into();
    }
    format!(
        "{p}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn write(path: &Path, contents: &str) -> Result<(), SandboxError> {
    fs::write(path, contents).map_err(|e| io_err(format!("write {}", path.display()), e))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read: {e})\n"));
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}
