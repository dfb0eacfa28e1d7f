//! Value types shared by the config and the renderers: byte sizes, time spans,
//! CPU shares. Each parses the operator's spelling and renders the literal
//! value systemd expects (systemd does not expand variables in these directives).
//!
//! Parsing is exact and never panics: numbers are read as decimals with checked
//! integer arithmetic (no floating point), so whatever text comes in, the result
//! is a value in range or an error message. Rendering is exact too: for every
//! value a parser accepts, `parse(to_systemd(v)) == v`.

use std::fmt;
use std::time::Duration;

/// A decimal number as written: the integer digits and the fraction digits.
/// `None` when the text is not `DIGITS`, `DIGITS.DIGITS`, `DIGITS.` or `.DIGITS`.
fn decimal(text: &str) -> Option<(&str, &str)> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    Some((int, frac))
}

/// `int.frac * unit` as an exact integer, `Err(None)` when out of range of `max`,
/// `Err(Some(()))` when the product is not a whole number.
fn scale(int: &str, frac: &str, unit: u128, max: u128) -> Result<u128, Option<()>> {
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    // More than 38 integer digits cannot fit a u128; the limit keeps the loop short.
    if int.len() > 38 {
        return Err(None);
    }
    // No unit has more than 38 factors of 2 and 5: such a fraction is not whole.
    if frac.len() > 38 {
        return Err(Some(()));
    }
    let mut whole: u128 = 0;
    for b in int.bytes() {
        whole = whole
            .checked_mul(10)
            .and_then(|w| w.checked_add(u128::from(b - b'0')))
            .ok_or(None)?;
    }
    let mut total = whole.checked_mul(unit).ok_or(None)?;
    if !frac.is_empty() {
        let mut num: u128 = 0;
        let mut den: u128 = 1;
        for b in frac.bytes() {
            num = num * 10 + u128::from(b - b'0');
            den *= 10;
        }
        // num < den <= 10^38; unit is at most ~2^50, so num * unit fits in u128
        // only for short fractions: check instead of assuming.
        let scaled = num.checked_mul(unit).ok_or(None)?;
        if scaled % den != 0 {
            return Err(Some(()));
        }
        total = total.checked_add(scaled / den).ok_or(None)?;
    }
    if total > max {
        return Err(None);
    }
    Ok(total)
}

/// A size in bytes. Suffixes follow systemd: `K`, `M`, `G`, `T` are powers of 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;
    pub const TIB: u64 = 1024 * 1024 * 1024 * 1024;
    /// The largest size any setting takes: 1024T (1 PiB). Larger numbers are
    /// mistakes, and keeping far below `u64::MAX` (systemd's "infinity") means
    /// sums of sizes cannot overflow.
    pub const MAX: ByteSize = ByteSize(1024 * Self::TIB);

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"90G"`, `"512M"`, `"1.5G"`, `"64K"`, `"1048576"`, `"8GiB"`: a
    /// whole, non-zero number of bytes up to [`ByteSize::MAX`] (`"1.5"` bytes and
    /// `"0.1K"` are errors, since they are not whole numbers of bytes).
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let not_a_size = || {
            format!("`{text}` is not a size; write a number with an optional unit, e.g. `90G` or `512M`")
        };
        if num.is_empty() {
            return Err(not_a_size());
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
        let (int, frac) = decimal(num).ok_or_else(not_a_size)?;
        match scale(int, frac, u128::from(mult), u128::from(Self::MAX.0)) {
            Ok(0) => Err(format!("`{text}` is zero; a size must be at least one byte")),
            // In range of u64 by the check against MAX.
            Ok(bytes) => Ok(ByteSize(u64::try_from(bytes).map_err(|_| not_a_size())?)),
            Err(Some(())) => Err(format!(
                "`{text}` is not a whole number of bytes; write e.g. `1536M` instead of a fraction that does not divide"
            )),
            Err(None) => Err(format!("`{text}` is out of range (at most {})", Self::MAX)),
        }
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

/// A time span in systemd's syntax: `90s`, `15min`, `1h 30min`, `500ms`, `2d`,
/// `250us`. systemd counts in microseconds, and so does a parsed `Timespan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespan(pub Duration);

impl Timespan {
    /// The longest span any setting takes: 365 days. Longer spans are
    /// mistakes (systemd's own "infinity" is `u64::MAX` microseconds, and a
    /// timeout near it means "none"); the bound also means that the renderer's
    /// sums (e.g. `stop_timeout + 15s`) cannot overflow.
    pub const MAX: Timespan = Timespan(Duration::from_secs(365 * 86_400));

    pub fn from_secs(secs: u64) -> Timespan {
        Timespan(Duration::from_secs(secs))
    }

    pub fn from_millis(ms: u64) -> Timespan {
        Timespan(Duration::from_millis(ms))
    }

    pub fn duration(self) -> Duration {
        self.0
    }

    /// `self + other`, saturating at `Duration::MAX` (never panics).
    pub fn saturating_add(self, other: Timespan) -> Timespan {
        Timespan(self.0.saturating_add(other.0))
    }

    /// Parses systemd's spelling: one or more `NUMBER[UNIT]` parts that add up,
    /// with units `us`, `ms`, `s` (the default), `min`/`m`, `h`, `d`, `w` and
    /// their long forms. The result is a whole number of microseconds up to
    /// [`Timespan::MAX`]; anything else is an error, never a panic.
    pub fn parse(text: &str) -> Result<Timespan, String> {
        let hint = || {
            format!("`{text}` is not a time span; write e.g. `90s`, `15min`, `1h 30min` or `500ms`")
        };
        let max_us = Self::MAX.0.as_micros();
        let mut total_us: u128 = 0;
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(hint());
        }
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (int, frac) = decimal(&rest[..num_end]).ok_or_else(hint)?;
            rest = rest[num_end..].trim_start();
            let unit_end = rest
                .find(|c: char| !(c.is_alphabetic()))
                .unwrap_or(rest.len());
            let unit = &rest[..unit_end];
            rest = rest[unit_end..].trim_start();
            let unit_us: u128 = match unit {
                "us" | "usec" | "µs" => 1,
                "ms" | "msec" => 1_000,
                "" | "s" | "sec" | "second" | "seconds" => 1_000_000,
                "m" | "min" | "minute" | "minutes" => 60_000_000,
                "h" | "hr" | "hour" | "hours" => 3_600_000_000,
                "d" | "day" | "days" => 86_400_000_000,
                "w" | "week" | "weeks" => 7 * 86_400_000_000,
                _ => {
                    return Err(format!(
                        "unknown time unit `{unit}` in `{text}`; use us, ms, s, min, h or d"
                    ))
                }
            };
            let out_of_range = || format!("`{text}` is out of range (at most {})", Self::MAX);
            let part = match scale(int, frac, unit_us, max_us) {
                Ok(us) => us,
                Err(Some(())) => {
                    return Err(format!(
                    "`{text}` is finer than a microsecond, the resolution of systemd's time spans"
                ))
                }
                Err(None) => return Err(out_of_range()),
            };
            total_us = total_us
                .checked_add(part)
                .filter(|&t| t <= max_us)
                .ok_or_else(out_of_range)?;
        }
        // total_us <= MAX (one year), far inside u64.
        let us = u64::try_from(total_us).map_err(|_| hint())?;
        Ok(Timespan(Duration::from_micros(us)))
    }

    /// The systemd spelling, e.g. `15min`, `1min 30s`, `1h 30min`, `500ms`,
    /// `1s 500us`: exact to the microsecond, so a non-zero span never renders
    /// as `0` (a sub-microsecond rest, which `parse` never produces, rounds up
    /// to `1us`).
    pub fn to_systemd(self) -> String {
        let mut us = self.0.as_micros();
        if self.0.subsec_nanos() % 1_000 != 0 {
            us += 1;
        }
        if us == 0 {
            return "0".into();
        }
        let mut parts = Vec::new();
        for (unit, suffix) in [
            (86_400_000_000, "d"),
            (3_600_000_000, "h"),
            (60_000_000, "min"),
            (1_000_000, "s"),
            (1_000, "ms"),
            (1, "us"),
        ] {
            if us >= unit {
                parts.push(format!("{}{}", us / unit, suffix));
                us %= unit;
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
    /// The smallest allowance: 1% of one core (`CPUQuota=1%`); less would render 0%.
    pub const MIN: f64 = 0.01;
    /// The largest allowance: 4096 cores.
    pub const MAX: f64 = 4096.0;

    /// A finite number of cores from [`Cpus::MIN`] to [`Cpus::MAX`].
    pub fn new(cores: f64) -> Result<Cpus, String> {
        if cores.is_finite() && (Self::MIN..=Self::MAX).contains(&cores) {
            Ok(Cpus(cores))
        } else {
            Err(format!(
                "cpus = {cores} is out of range; give a number of cores from {} to {}",
                Self::MIN,
                Self::MAX
            ))
        }
    }

    /// `CPUQuota=` in percent of one core, at least 1 (never `0%`).
    pub fn quota_percent(self) -> u64 {
        let p = (self.0 * 100.0).round();
        if p.is_finite() && p >= 1.0 {
            // In range: Cpus::MAX * 100 is far below u64::MAX.
            p.min(Self::MAX * 100.0) as u64
        } else {
            1
        }
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

    /// Issue 9, item 3: these panicked (`Duration::from_secs_f64`) or overflowed later.
    #[test]
    fn issue9_timespan_parse_never_panics_on_huge_or_odd_numbers() {
        for text in [
            "99999999999999999999s",
            "18446744073709549568s 2047s",
            "18446744073709551615us",
            "NaN",
            "nan",
            "inf",
            "infinity",
            "1e400",
            "1e400s",
            "340282366920938463463374607431768211456s",
            "0.00000000000000000000000000000000000000000001s",
            "366d",
            "53w",
            "1..5s",
            ".",
            "-5s",
            "",
        ] {
            assert!(Timespan::parse(text).is_err(), "{text:?} was accepted");
        }
        assert!(Timespan::parse("99999999999999999999s")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(Timespan::parse("365d").unwrap(), Timespan::MAX);
        assert_eq!(
            Timespan::parse("1.5s").unwrap(),
            Timespan::from_millis(1500)
        );
        assert_eq!(
            Timespan::parse(".5us").unwrap_err(),
            "`.5us` is finer than a microsecond, the resolution of systemd's time spans"
        );
    }

    /// Issue 9, item 4: `500us` rendered `0`, which systemd reads as "off".
    #[test]
    fn issue9_sub_millisecond_spans_render_exactly() {
        let t = Timespan::parse("500us").unwrap();
        assert_eq!(t.to_systemd(), "500us");
        assert_eq!(Timespan::parse("1.0005s").unwrap().to_systemd(), "1s 500us");
        assert_eq!(Timespan(Duration::from_nanos(1)).to_systemd(), "1us");
        assert_eq!(Timespan(Duration::ZERO).to_systemd(), "0");
    }

    /// Issue 9, items 3 and 11: sizes are exact integers, fractions of a byte are errors.
    #[test]
    fn issue9_sizes_are_whole_bytes_and_in_range() {
        assert!(ByteSize::parse("1.5")
            .unwrap_err()
            .contains("not a whole number of bytes"));
        assert!(ByteSize::parse("0.1K").is_err());
        assert_eq!(ByteSize::parse("0.5K").unwrap().bytes(), 512);
        assert_eq!(ByteSize::parse("1024T").unwrap(), ByteSize::MAX);
        for text in [
            "8000000T",
            "1025T",
            "99999999999999999999999999",
            "NaN",
            "inf",
            "1e3",
            ".",
            "1.2.3",
        ] {
            assert!(ByteSize::parse(text).is_err(), "{text:?} was accepted");
        }
        assert!(ByteSize::parse("8000000T")
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn issue9_cpus_are_finite_and_in_range() {
        for bad in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -1.0,
            0.001,
            5000.0,
        ] {
            assert!(Cpus::new(bad).is_err(), "{bad}");
        }
        assert_eq!(Cpus::new(0.01).unwrap().quota_percent(), 1);
        assert_eq!(Cpus::new(8.0).unwrap().quota_percent(), 800);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn timespan() -> impl Strategy<Value = Timespan> {
            (0..=Timespan::MAX.0.as_micros() as u64)
                .prop_map(|us| Timespan(Duration::from_micros(us)))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Issue 9, item 4: every span round-trips through its rendering, and
            /// a non-zero span never renders as `0`.
            #[test]
            fn issue9_timespan_round_trips(t in timespan()) {
                let text = t.to_systemd();
                prop_assert_eq!(Timespan::parse(&text), Ok(t));
                prop_assert!(t.0.is_zero() || text != "0");
            }

            #[test]
            fn issue9_byte_size_round_trips(b in 1..=ByteSize::MAX.0) {
                let b = ByteSize(b);
                prop_assert_eq!(ByteSize::parse(&b.to_systemd()), Ok(b));
            }

            /// Issue 9, item 3: no text makes the parsers panic.
            #[test]
            fn issue9_unit_parsers_never_panic(text in "\\PC{0,40}") {
                let _ = Timespan::parse(&text);
                let _ = ByteSize::parse(&text);
                let _ = SizeLimit::parse(&text);
            }

            #[test]
            fn issue9_unit_parsers_never_panic_on_numbers(
                parts in proptest::collection::vec(("[0-9]{0,30}(\\.[0-9]{0,30})?", "(|us|ms|s|min|m|h|d|w|K|M|G|T|B)"), 1..4)
            ) {
                let text: String = parts.iter().map(|(n, u)| format!("{n}{u} ")).collect();
                if let Ok(t) = Timespan::parse(&text) {
                    prop_assert!(t <= Timespan::MAX);
                    prop_assert_eq!(Timespan::parse(&t.to_systemd()), Ok(t));
                }
                if let Ok(b) = ByteSize::parse(text.trim()) {
                    prop_assert!(b <= ByteSize::MAX && b.0 > 0);
                    prop_assert_eq!(ByteSize::parse(&b.to_systemd()), Ok(b));
                }
            }
        }
    }
}
