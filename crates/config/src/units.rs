//! Value types shared by the config and the renderers: byte sizes, time spans,
//! CPU shares. Each parses the operator's spelling and renders the literal
//! value systemd expects (systemd does not expand variables in these directives).

use std::fmt;
use std::time::Duration;

/// A size in bytes. Suffixes follow systemd: `K`, `M`, `G`, `T` are powers of 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;
    pub const TIB: u64 = 1024 * 1024 * 1024 * 1024;

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"90G"`, `"512M"`, `"1.5G"`, `"64K"`, `"1048576"`, `"8GiB"`.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(format!("`{text}` is not a size; write a number with an optional unit, e.g. `90G` or `512M`"));
        }
        let mult = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => Self::KIB,
            "M" | "MiB" => Self::MIB,
            "G" | "GiB" => Self::GIB,
            "T" | "TiB" => Self::TIB,
            "KB" | "MB" | "GB" | "TB" | "k" | "m" | "g" | "t" => {
                return Err(format!(
                    "`{text}` is ambiguous; Citadel follows systemd, where K, M, G and T are powers of 1024: write e.g. `{}{}`",
                    num,
                    unit.trim().chars().next().unwrap_or('G').to_ascii_uppercase()
                ))
            }
            other => return Err(format!("unknown size unit `{other}` in `{text}`; use K, M, G or T (powers of 1024)")),
        };
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size; write e.g. `90G` or `512M`"))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
            return Err(format!("`{text}` is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }

    /// The systemd spelling: the largest unit that divides the value exactly.
    pub fn to_systemd(self) -> String {
        for (unit, suffix) in [
            (Self::TIB, "T"),
            (Self::GIB, "G"),
            (Self::MIB, "M"),
            (Self::KIB, "K"),
        ] {
            if self.0 >= unit && self.0 % unit == 0 {
                return format!("{}{}", self.0 / unit, suffix);
            }
        }
        self.0.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_systemd())
    }
}

/// A limit that may be unlimited (`"infinity"`), as for LimitMEMLOCK=.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeLimit {
    Infinity,
    Bytes(ByteSize),
}

impl SizeLimit {
    pub fn parse(text: &str) -> Result<SizeLimit, String> {
        if text.trim() == "infinity" {
            Ok(SizeLimit::Infinity)
        } else {
            ByteSize::parse(text).map(SizeLimit::Bytes)
        }
    }
}

impl fmt::Display for SizeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeLimit::Infinity => f.write_str("infinity"),
            SizeLimit::Bytes(b) => b.fmt(f),
        }
    }
}

/// A time span in systemd's syntax: `90s`, `15min`, `1h 30min`, `500ms`, `2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespan(pub Duration);

impl Timespan {
    pub fn from_secs(secs: u64) -> Timespan {
        Timespan(Duration::from_secs(secs))
    }

    pub fn duration(self) -> Duration {
        self.0
    }

    pub fn parse(text: &str) -> Result<Timespan, String> {
        let hint = || {
            format!("`{text}` is not a time span; write e.g. `90s`, `15min`, `1h 30min` or `500ms`")
        };
        let mut total = Duration::ZERO;
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(hint());
        }
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            if num_end == 0 {
                return Err(hint());
            }
            let value: f64 = rest[..num_end].parse().map_err(|_| hint())?;
            rest = rest[num_end..].trim_start();
            let unit_end = rest
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_end];
            rest = rest[unit_end..].trim_start();
            let secs = match unit {
                "us" | "usec" => 1e-6,
                "ms" | "msec" => 1e-3,
                "" | "s" | "sec" | "second" | "seconds" => 1.0,
                "m" | "min" | "minute" | "minutes" => 60.0,
                "h" | "hr" | "hour" | "hours" => 3600.0,
                "d" | "day" | "days" => 86400.0,
                _ => {
                    return Err(format!(
                        "unknown time unit `{unit}` in `{text}`; use ms, s, min, h or d"
                    ))
                }
            };
            total += Duration::from_secs_f64(value * secs);
        }
        Ok(Timespan(total))
    }

    /// The systemd spelling, e.g. `15min`, `90s`, `1h 30min`, `500ms`.
    pub fn to_systemd(self) -> String {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return "0".into();
        }
        let mut parts = Vec::new();
        for (unit, suffix) in [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "min"),
            (1_000, "s"),
            (1, "ms"),
        ] {
            if ms >= unit {
                parts.push(format!("{}{}", ms / unit, suffix));
                ms %= unit;
            }
        }
        parts.join(" ")
    }
}

impl fmt::Display for Timespan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_systemd())
    }
}

/// CPU allowance in cores (`cpus = 8` renders `CPUQuota=800%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cpus(pub f64);

impl Cpus {
    pub fn quota_percent(self) -> u64 {
        (self.0 * 100.0).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_systemd() {
        assert_eq!(ByteSize::parse("90G").unwrap().bytes(), 90 * ByteSize::GIB);
        assert_eq!(ByteSize::parse("1.5G").unwrap().to_systemd(), "1536M");
        assert_eq!(ByteSize::parse("8GiB").unwrap().to_systemd(), "8G");
        assert_eq!(ByteSize::parse("1000").unwrap().to_systemd(), "1000");
        assert!(ByteSize::parse("90GB")
            .unwrap_err()
            .contains("powers of 1024"));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("0").is_err());
        assert_eq!(
            SizeLimit::parse("infinity").unwrap().to_string(),
            "infinity"
        );
    }

    #[test]
    fn timespans_round_trip() {
        for (text, secs, out) in [
            ("15min", 900.0, "15min"),
            ("90s", 90.0, "1min 30s"),
            ("1h 30min", 5400.0, "1h 30min"),
            ("500ms", 0.5, "500ms"),
            ("2", 2.0, "2s"),
        ] {
            let t = Timespan::parse(text).unwrap();
            assert_eq!(t.0.as_secs_f64(), secs, "{text}");
            assert_eq!(t.to_systemd(), out, "{text}");
        }
        assert!(Timespan::parse("soon").is_err());
        assert!(Timespan::parse("5 parsecs")
            .unwrap_err()
            .contains("unknown time unit"));
    }
}
