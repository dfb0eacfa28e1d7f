//! What the gateway reads from the kernel for `/metrics`, on each scrape
//! (never per request): its own process figures from `/proc/self` and the
//! memory of each model unit's cgroup (v2 `memory.current`/`memory.max`, v1
//! `memory.usage_in_bytes`/`memory.limit_in_bytes`). Anything unreadable is
//! `None`, and its series is left out.

use std::path::Path;

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc/*/stat` times. Linux exports
/// them in USER_HZ, which is 100 on every architecture Citadel runs on
/// (reading it with `sysconf` would need libc).
const USER_HZ: f64 = 100.0;

/// This process, as the standard `process_*` metrics report it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Reads `/proc/self/{stat,status,fd,limits}` and `/proc/stat`'s `btime`.
pub fn process() -> ProcessStats {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let stat = read("/proc/self/stat");
    let fields = stat.as_deref().map(stat_fields).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let status = read("/proc/self/status");
    let kb = |key: &str| {
        status
            .as_deref()
            .and_then(|s| status_kb(s, key))
            .and_then(|k| k.checked_mul(1024))
    };
    let btime = read("/proc/stat").and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    ProcessStats {
        // Fields 14 and 15 (utime, stime); index 0 is field 3 (state).
        cpu_seconds: ticks(11)
            .zip(ticks(12))
            .map(|(u, s)| u.saturating_add(s) as f64 / USER_HZ),
        resident_bytes: kb("VmRSS:"),
        virtual_bytes: kb("VmSize:"),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds: read("/proc/self/limits")
            .as_deref()
            .and_then(max_open_files),
        // Field 22 (starttime, ticks since boot).
        start_time_seconds: btime
            .zip(ticks(19))
            .map(|(b, t)| b as f64 + t as f64 / USER_HZ),
    }
}

/// The fields of `/proc/PID/stat` after the command name (which may hold
/// spaces and parentheses: everything up to the last `)`).
fn stat_fields(stat: &str) -> Vec<&str> {
    match stat.rfind(')') {
        Some(i) => stat[i + 1..].split_whitespace().collect(),
        None => Vec::new(),
    }
}

/// `KEY   N kB` in `/proc/PID/status`.
fn status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit of `Max open files` in `/proc/PID/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A cgroup v1 memory limit at or above this is "no limit" (the kernel
/// reports `PAGE_COUNTER_MAX` pages: 9223372036854771712 on 4 KiB pages).
const V1_UNLIMITED: u64 = 1 << 62;

/// Where a unit's cgroup is below a controller root: an instance of a template
/// (`citadel-model@NAME.service`) lives in the template's slice,
/// `system.slice/system-citadel\x2dmodel.slice/UNIT` (systemd escapes `-` in
/// the slice name as `\x2d`); any other unit in `system.slice/UNIT`.
fn unit_cgroup(unit: &str) -> std::path::PathBuf {
    let base = Path::new("system.slice");
    match unit.split_once('@') {
        Some((template, _)) => {
            let escaped = template.replace('-', "\\x2d");
            base.join(format!("system-{escaped}.slice")).join(unit)
        }
        None => base.join(unit),
    }
}

/// A unit's memory use and limit in bytes, from the cgroup hierarchy under
/// `root` (`/sys/fs/cgroup`): v2 `CGROUP/memory.current` and `memory.max`
/// (`max`: no limit), else v1 `memory/CGROUP/` `memory.usage_in_bytes` and
/// `memory.limit_in_bytes` (a huge value: no limit), where CGROUP is the
/// unit's place ([`unit_cgroup`]). Each is `None` when absent or unreadable.
pub fn unit_memory(root: &Path, unit: &str) -> (Option<u64>, Option<u64>) {
    let read_u64 = |p: &Path| -> Option<u64> {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let cgroup = unit_cgroup(unit);
    let v2 = root.join(&cgroup);
    if v2.join("memory.current").is_file() {
        return (
            read_u64(&v2.join("memory.current")),
            read_u64(&v2.join("memory.max")),
        );
    }
    let v1 = root.join("memory").join(&cgroup);
    (
        read_u64(&v1.join("memory.usage_in_bytes")),
        read_u64(&v1.join("memory.limit_in_bytes")).filter(|l| *l < V1_UNLIMITED),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let s = "42 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 9 0 12345 1000 200";
        let f = stat_fields(s);
        assert_eq!(f[0], "S");
        assert_eq!((f[11], f[12], f[19]), ("250", "150", "12345"));
    }

    #[test]
    fn own_process_figures_are_plausible() {
        let p = process();
        assert!(p.cpu_seconds.is_some_and(|c| c >= 0.0), "{p:?}");
        assert!(p.resident_bytes.is_some_and(|r| r > 1 << 20), "{p:?}");
        assert!(p.virtual_bytes >= p.resident_bytes, "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        assert!(p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = p.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{p:?}"
        );
    }

    /// Issue 14, item 1: the unit memory gauges read cgroup v2 and v1; `max`
    /// and a v1 "unlimited" leave the limit out; an absent unit gives nothing.
    #[test]
    fn issue14_unit_memory_reads_cgroup_v2_and_v1() {
        let d = tempfile::tempdir().unwrap();
        let unit = "citadel-model@phi3.service";
        let slice = "system.slice/system-citadel\\x2dmodel.slice";
        let v2 = d.path().join("v2").join(slice).join(unit);
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.current"), "123456\n").unwrap();
        std::fs::write(v2.join("memory.max"), "8589934592\n").unwrap();
        assert_eq!(
            unit_memory(&d.path().join("v2"), unit),
            (Some(123456), Some(8589934592))
        );
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(
            unit_memory(&d.path().join("v2"), unit),
            (Some(123456), None)
        );
        let v1 = d.path().join("v1/memory").join(slice).join(unit);
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "777\n").unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        assert_eq!(
            unit_memory(&d.path().join("v1"), unit),
            (Some(777), Some(1073741824))
        );
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(unit_memory(&d.path().join("v1"), unit), (Some(777), None));
        assert_eq!(
            unit_memory(d.path(), "citadel-model@nope.service"),
            (None, None)
        );
    }
}
