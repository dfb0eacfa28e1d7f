//! The gates every config string passes before it can reach a unit file, a
//! drop-in, a `sysusers.d` or a `tmpfiles.d` line (issue 9, items 1, 13, 14, 15),
//! and the bounds of every span and size setting (item 11). Pure functions:
//! each returns why a value is refused, and validation turns that into a
//! diagnostic with the value's place.
//!
//! The contract with the renderer: no value in a `Settings` contains a control
//! character (so none can end a line or hide in one), and no path contains
//! whitespace, `%`, `\`, quotes or `$` (so a path is one word in every file
//! format systemd reads, with nothing to expand). The renderer still escapes
//! what free text (environment values, arguments) may contain.

use std::path::{Component, Path};

use crate::units::{ByteSize, Timespan};

/// Refuses control characters (below U+0020, and U+007F): a newline or carriage
/// return ends a line of a unit file, `sysusers.d` or `tmpfiles.d` entry or an
/// HTTP request line, NUL ends a C string, and none belongs in a setting.
pub fn no_control(value: &str) -> Result<(), String> {
    match value.chars().find(|c| c.is_control() && (*c as u32) < 0x80) {
        None => Ok(()),
        Some(c) => Err(format!(
            "contains the control character {}; systemd's files are line-based, so a control character could end or corrupt the line it is written into",
            describe(c)
        )),
    }
}

fn describe(c: char) -> String {
    let name = match c {
        '\n' => " (newline)",
        '\r' => " (carriage return)",
        '\t' => " (tab)",
        '\0' => " (NUL)",
        _ => "",
    };
    format!("U+{:04X}{name}", c as u32)
}

/// Characters a path may not contain, and why.
const PATH_FORBIDDEN: &[(char, &str)] = &[
    ('%', "systemd and tmpfiles.d expand `%` specifiers (`%t`, `%h`, ...); a literal `%` in a path is not worth supporting"),
    ('\\', "systemd and tmpfiles.d read `\\` as the start of an escape sequence"),
    ('"', "systemd and tmpfiles.d read quotes as quoting"),
    ('\'', "systemd and tmpfiles.d read quotes as quoting"),
    ('$', "systemd expands `$NAME` in command lines"),
];

/// A path Citadel writes into its files: absolute, no `..`, no control
/// characters, no whitespace (tmpfiles.d and most unit directives split on it),
/// and none of [`PATH_FORBIDDEN`].
pub fn path(value: &str) -> Result<(), String> {
    no_control(value)?;
    if !crate::settings::is_absolute_clean(value) {
        return Err("is not an absolute path".into());
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace()) {
        return Err(format!(
            "contains whitespace ({}); tmpfiles.d and systemd directives split on whitespace, so Citadel does not support paths with spaces: use e.g. `_` or `-` instead",
            describe(c)
        ));
    }
    for (c, why) in PATH_FORBIDDEN {
        if value.contains(*c) {
            return Err(format!("contains `{c}`: {why}"));
        }
    }
    Ok(())
}

/// A systemd credential name (`LoadCredential=NAME:PATH`): 1 to 255 characters
/// from `A-Z a-z 0-9 _ . -`, not `.` or `..` (systemd requires a valid file name:
/// the credential is a file in `$CREDENTIALS_DIRECTORY`; no `/`, no `:`).
pub fn credential_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || !name.chars().all(ok_char)
    {
        return Err(format!(
            "`{}` is not a valid credential name; use 1 to 255 letters, digits, `-`, `_` and `.` (the name is a file name in $CREDENTIALS_DIRECTORY)",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn env_name(name: &str) -> Result<(), String> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid environment variable name; use letters, digits and `_`, not starting with a digit",
            name.escape_debug()
        ))
    }
}

/// An HTTP path for the health probe: written into a request line, so it starts
/// with `/` and holds only visible ASCII (no space, no control character).
pub fn health_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!(
            "health_path `{}` must start with `/`",
            p.escape_debug()
        ));
    }
    if let Some(c) = p.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "health_path `{}` contains {}; it is written into an HTTP request line, so only visible ASCII without spaces is allowed (percent-encode the rest)",
            p.escape_debug(),
            if c == ' ' { "a space".to_owned() } else { format!("the character {}", describe(c)) }
        ));
    }
    Ok(())
}

/// System directories Citadel must never own: it creates its directories with
/// tmpfiles.d (`d PATH MODE USER GROUP`, which also chmods/chowns an existing
/// one) and `uninstall --purge` removes them. A managed directory may be neither
/// one of these nor an ancestor of one (`home = "/srv"` made purge delete all
/// of `/srv`; `credentials = "/etc/ssl"` made CA certificates root-only).
/// Top-level directories are listed for the message; the "two levels deep"
/// rule ([`managed_dir`]) already covers them.
pub const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/var/cache",
    "/var/log",
    "/var/tmp",
    "/var/spool",
    "/var/mail",
    "/var/opt",
    "/var/backups",
    "/var/lib/systemd",
    "/etc/ssl",
    "/etc/pki",
    "/etc/systemd",
    "/etc/ssh",
    "/etc/pam.d",
    "/etc/sudoers.d",
    "/etc/security",
    "/etc/default",
    "/etc/apt",
    "/etc/cron.d",
    "/etc/sysusers.d",
    "/etc/tmpfiles.d",
    "/usr/local",
    "/usr/local/bin",
    "/opt/local",
];

/// Trees in which Citadel may not own anything, not even a subdirectory: virtual
/// or volatile file systems (`/proc`, `/sys`, `/dev`, `/run`, `/tmp`: not real
/// or emptied at boot), trees of the package manager (`/usr`, `/bin`, `/lib*`,
/// `/boot`), root's home, and configuration that is security-sensitive (a
/// subdirectory of `/etc/ssl` such as `/etc/ssl/private` holds other programs'
/// keys).
pub const SYSTEM_TREES: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/var/tmp",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/root",
    "/etc/ssl",
    "/etc/pki",
    "/etc/systemd",
    "/etc/ssh",
    "/etc/pam.d",
    "/etc/sudoers.d",
    "/etc/security",
    "/var/lib/systemd",
    "/var/log",
];

/// A directory Citadel creates, chmods and may purge: at least two levels deep
/// (`/data` alone would make purge remove all of it), not a [`SYSTEM_DIRS`]
/// entry or an ancestor of one, not inside a [`SYSTEM_TREES`] entry, and not a
/// user's home (`/home/NAME`). Static checks only: whether the directory
/// already exists and was made by someone else is for `install` to find out.
pub fn managed_dir(p: &Path) -> Result<(), String> {
    let depth = p
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    if let Some(sys) = SYSTEM_DIRS.iter().map(Path::new).find(|s| s.starts_with(p)) {
        let what = if sys == p {
            "is".to_owned()
        } else {
            format!("contains {}", sys.display())
        };
        return Err(format!(
            "{what} a system directory; Citadel creates, chmods and purges this directory, so it must be Citadel's own, e.g. `/opt/citadel` or `/etc/citadel/credentials`"
        ));
    }
    if let Some(tree) = SYSTEM_TREES
        .iter()
        .map(Path::new)
        .find(|t| p.starts_with(t))
    {
        return Err(format!(
            "is inside {}, which belongs to the system; Citadel creates, chmods and purges this directory, so it must be Citadel's own, e.g. under `/opt/citadel`",
            tree.display()
        ));
    }
    if depth < 2 {
        return Err("is a top-level directory; Citadel creates, chmods and purges this directory, so it must be at least two levels deep and Citadel's own, e.g. `/opt/citadel`".into());
    }
    if depth == 2 && p.starts_with("/home") {
        return Err("is a user's home directory; use a directory of Citadel's own, e.g. `/opt/citadel` or `/home/NAME/citadel`".into());
    }
    Ok(())
}

/// A setting's accepted range of spans, with the reason for each bound.
#[derive(Debug, Clone, Copy)]
pub struct SpanBounds {
    pub min: Timespan,
    pub max: Timespan,
    pub why: &'static str,
}

const fn secs(s: u64) -> Timespan {
    Timespan(std::time::Duration::from_secs(s))
}
const fn millis(ms: u64) -> Timespan {
    Timespan(std::time::Duration::from_millis(ms))
}
const DAY: u64 = 86_400;

/// `probe_interval` (gateway and models): 100ms to 1h. Below 100ms the probes
/// become a busy loop against the engine.
pub const PROBE_INTERVAL: SpanBounds = SpanBounds {
    min: millis(100),
    max: secs(3600),
    why: "probes run this often; below 100ms they busy-loop against the engine",
};
/// `watchdog` (gateway and models): 1s to 1 day. systemd restarts a service that
/// misses a ping; below a second a busy host restarts healthy services.
pub const WATCHDOG: SpanBounds = SpanBounds {
    min: secs(1),
    max: secs(DAY),
    why: "systemd restarts a service that does not ping within this time; below 1s a loaded host restarts healthy services",
};
/// `start_timeout`: 1s to 1 day (the supervisor extends systemd's timeout while
/// a model loads, up to this cap; a load longer than a day is a hang).
pub const START_TIMEOUT: SpanBounds = SpanBounds {
    min: secs(1),
    max: secs(DAY),
    why:
        "the cap for loading a model; below 1s nothing can start, above a day a hang goes unnoticed",
};
/// `stop_timeout`: 1s to 1h (the engine's grace period before SIGKILL).
pub const STOP_TIMEOUT: SpanBounds = SpanBounds {
    min: secs(1),
    max: secs(3600),
    why: "the engine's grace period before SIGKILL; below 1s it cannot drain, above an hour a stuck stop blocks every restart",
};
/// `header_timeout`: 1s to 5min: the slowloris protection (a client that sends
/// its headers slowly holds a connection this long).
pub const HEADER_TIMEOUT: SpanBounds = SpanBounds {
    min: secs(1),
    max: secs(300),
    why: "a client that trickles its request headers holds a connection this long (slowloris); keep it short",
};
/// `request_timeout`: 1s to 1 day (a whole request, generation included).
pub const REQUEST_TIMEOUT: SpanBounds = SpanBounds {
    min: secs(1),
    max: secs(DAY),
    why: "the longest a request may take, generation included",
};
/// `first_byte_timeout`: 100ms to 1 day (until a streamed answer begins).
pub const FIRST_BYTE_TIMEOUT: SpanBounds = SpanBounds {
    min: millis(100),
    max: secs(DAY),
    why: "how long a streamed request waits for the engine to begin its answer; a long prompt's prefill can take seconds on a real engine",
};
/// `outlier_ejection`: 100ms to 1h (the first ejection of a failing backend).
pub const OUTLIER_EJECTION: SpanBounds = SpanBounds {
    min: millis(100),
    max: secs(3600),
    why: "a backend that keeps failing is left out this long, doubling each time; below 100ms it is never really out, above an hour a recovered replica idles",
};
/// `drain_timeout`: up to 1h (in-flight requests finish during a stop or reload).
pub const DRAIN_TIMEOUT: SpanBounds = SpanBounds {
    min: millis(1),
    max: secs(3600),
    why: "in-flight requests may finish this long on stop; above an hour a stop never seems to end",
};

/// `gateway.max_body`: 1K to 1G; the gateway buffers a whole request body.
pub const MAX_BODY_MIN: ByteSize = ByteSize(ByteSize::KIB);
pub const MAX_BODY_MAX: ByteSize = ByteSize(ByteSize::GIB);
/// `memory_max` and `memory_high`: at least 1M (a unit with less cannot even
/// start its process; `memory_max = "1"` is one byte).
pub const MEMORY_MIN: ByteSize = ByteSize(ByteSize::MIB);
/// The lowest port a model may use: its engine runs without capabilities.
pub const MODEL_PORT_MIN: u16 = 1024;

impl SpanBounds {
    pub fn check(&self, t: Timespan) -> Result<(), String> {
        if t < self.min {
            Err(format!(
                "{t} is too short (at least {}): {}",
                self.min, self.why
            ))
        } else if t > self.max {
            Err(format!(
                "{t} is out of range (at most {}): {}",
                self.max, self.why
            ))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_dirs_refuse_system_directories() {
        for bad in [
            "/",
            "/srv",
            "/etc",
            "/etc/ssl",
            "/etc/ssl/private",
            "/var/lib",
            "/usr/local/x",
            "/data",
            "/home/alice",
            "/run/citadel",
            "/tmp/x",
            "/var",
        ] {
            assert!(managed_dir(Path::new(bad)).is_err(), "{bad}");
        }
        for good in [
            "/opt/citadel",
            "/etc/citadel/credentials",
            "/srv/citadel",
            "/var/lib/citadel-models",
            "/mnt/data/models",
            "/home/alice/citadel",
        ] {
            assert_eq!(managed_dir(Path::new(good)), Ok(()), "{good}");
        }
    }

    #[test]
    fn paths_refuse_what_systemd_would_read_differently() {
        for bad in [
            "/srv/my models",
            "/x/%t",
            "/x\ny",
            "/x/a\\b",
            "/x/\"a\"",
            "/x/$HOME",
            "/x\0",
            "/x\u{a0}y",
            "rel/x",
            "/x/../y",
        ] {
            assert!(path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(path("/opt/citadel/models-1_2.x"), Ok(()));
    }
}
