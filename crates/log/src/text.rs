//! The plain-text line format (issue 11, item 1): one line per event,
//!
//! ```text
//! 2026-11-30T19:55:47.123456Z  INFO span{a=1}: the message key=value key="two words"
//! ```
//!
//! the same layout as tracing-subscriber's default (`Full`, without the
//! target), written by hand because the default cost ~6% of the gateway's CPU
//! at saturation for one line per request: it formats the timestamp from
//! scratch on each event and escapes every string field through `Debug`
//! (`char::escape_debug`, one `write_char` per character).
//!
//! Here the timestamp's date and time are formatted once per second per
//! thread; integers are written without the formatting machinery; a string
//! value that is plain printable ASCII (no space, `"` or `\`) is written as
//! is, and any other is quoted and escaped through `Debug`. The message is
//! not quoted, but its control characters (newlines included) and Unicode
//! line separators and bidirectional controls are escaped (`\n`,
//! `\u{2028}`). So no value, client-controlled or not, can split a line or
//! forge a field: a line is exactly one event.

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format: timestamp, level, spans, then the fields
/// ([`TextFields`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFormat;

/// The field format (events' and spans'): the message first, unquoted, then
/// `key=value` separated by spaces.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str(match *event.metadata().level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        let mut spans = false;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                spans = true;
                writer.write_str(span.metadata().name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
        }
        if spans {
            writer.write_char(' ')?;
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

impl<'w> MakeVisitor<Writer<'w>> for TextFields {
    type Visitor = TextVisitor<'w>;
    fn make_visitor(&self, writer: Writer<'w>) -> TextVisitor<'w> {
        TextVisitor {
            writer,
            first: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's (or span's) fields; see the module docs.
pub struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Starts a field: the separator, then `name=` (nothing for the message).
    fn key(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        let name = field.name();
        if name != "message" {
            self.writer
                .write_str(name.strip_prefix("r#").unwrap_or(name))?;
            self.writer.write_char('=')?;
        }
        Ok(())
    }

    fn str_field(&mut self, field: &Field, value: &str) -> fmt::Result {
        self.key(field)?;
        if field.name() == "message" {
            write_escaped_message(&mut self.writer, value)
        } else {
            write_value(&mut self.writer, value)
        }
    }

    /// A `Debug` (or, through `%`, `Display`) value: formatted first, then
    /// written as is when bare or already a quoted string literal (`?s` of a
    /// string), else quoted and escaped.
    fn fmt_field(&mut self, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
        self.key(field)?;
        if field.name() == "message" {
            return write!(Escape(&mut self.writer), "{value:?}");
        }
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut s) => {
                s.clear();
                write!(s, "{value:?}")?;
                let r = write_formatted(&mut self.writer, &s);
                if s.capacity() > 4096 {
                    *s = String::new();
                }
                r
            }
            // Re-entered (a value's Debug logged something): no reuse.
            Err(_) => write_formatted(&mut self.writer, &format!("{value:?}")),
        })
    }

    fn record(&mut self, f: impl FnOnce(&mut Self) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = f(self);
        }
    }
}

thread_local! {
    /// Where a `Debug`/`Display` value is formatted before it is checked.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(|v| v.str_field(field, value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(|v| v.fmt_field(field, value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error and its sources, `: `-separated.
        struct Chain<'a>(&'a (dyn std::error::Error + 'static));
        impl fmt::Debug for Chain<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)?;
                let mut source = self.0.source();
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
        self.record(|v| v.fmt_field(field, &Chain(value)));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(|v| {
            v.key(field)?;
            write_u64(&mut v.writer, value)
        });
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(|v| {
            v.key(field)?;
            if value < 0 {
                v.writer.write_char('-')?;
            }
            write_u64(&mut v.writer, value.unsigned_abs())
        });
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(|v| {
            v.key(field)?;
            v.writer.write_str(if value { "true" } else { "false" })
        });
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // `Debug`, as tracing-subscriber's default (`1.0`, `2.345`, `NaN`).
        self.record(|v| {
            v.key(field)?;
            write!(v.writer, "{value:?}")
        });
    }
}

impl VisitOutput<fmt::Result> for TextVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for TextVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Whether `value` may be written as is: non-empty printable ASCII without
/// a space, `"` or `\` (so it ends at the next space and cannot be taken for
/// a quoted value).
pub fn is_bare(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| matches!(b, b'!'..=b'~') && b != b'"' && b != b'\\')
}

/// A field's value: as is when [`is_bare`], else quoted and escaped
/// (`Debug` of a `str`: `"`, `\`, control and non-printable characters).
fn write_value(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    if is_bare(value) {
        w.write_str(value)
    } else {
        write!(w, "{value:?}")
    }
}

/// A formatted `Debug`/`Display` value: as is when [`is_bare`] or a
/// string literal as `Debug` of a `str` writes it ([`is_str_literal`]),
/// else quoted and escaped.
fn write_formatted(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    if is_str_literal(value) {
        w.write_str(value)
    } else {
        write_value(w, value)
    }
}

/// Whether `s` is `"..."` with every inner `"` escaped and no character
/// [`escapes`] would escape: a value that cannot end early or break a line.
pub fn is_str_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            // An escape: the next character is taken as is (none: the
            // closing quote was escaped).
            '\\' if chars.next().is_none() => return false,
            '\\' => {}
            '"' => return false,
            c if escapes(c) => return false,
            _ => {}
        }
    }
    true
}

/// Whether a message character is escaped: control characters (`\n`, `\r`,
/// ESC, ...), Unicode line and paragraph separators and bidirectional
/// controls (which reorder what a terminal shows).
fn escapes(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
        || c == '\u{85}'
}

fn write_escaped_message(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // Fast path: printable ASCII (and tabs are control characters: escaped).
    if s.bytes().all(|b| matches!(b, b' '..=b'~')) {
        return w.write_str(s);
    }
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if escapes(c) {
            w.write_str(&s[start..i])?;
            for e in c.escape_default() {
                w.write_char(e)?;
            }
            start = i + c.len_utf8();
        }
    }
    w.write_str(&s[start..])
}

/// Escapes the message as it is formatted (no buffer in between).
struct Escape<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escape<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped_message(self.0, s)
    }
}

fn write_u64(w: &mut impl fmt::Write, mut n: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.write_str(std::str::from_utf8(&buf[i..]).map_err(|_| fmt::Error)?)
}

thread_local! {
    /// The second last formatted on this thread and its
    /// `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// `2026-11-30T19:55:47.123456Z` (UTC, microseconds, as
/// tracing-subscriber's default).
fn write_timestamp(w: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let mut buf = [0u8; 27];
    let (cached, text) = SECOND.get();
    let text = if cached == secs {
        text
    } else {
        let text = date_time(secs);
        SECOND.set((secs, text));
        text
    };
    buf[..19].copy_from_slice(&text);
    buf[19] = b'.';
    let mut us = since.subsec_micros();
    for i in (20..26).rev() {
        buf[i] = b'0' + (us % 10) as u8;
        us /= 10;
    }
    buf[26] = b'Z';
    w.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (UTC; years past 9999 wrap).
fn date_time(secs: u64) -> [u8; 19] {
    let days = secs / 86_400;
    let sod = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, sod / 3600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    out
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use proptest::prelude::*;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// The text `f` logs through the formatter, `init`'s configuration.
    fn capture(f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(buf.clone())
            .with_ansi(false)
            .event_format(TextFormat)
            .fmt_fields(TextFields);
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, f);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    /// Drops the timestamp (checked on its own).
    fn body(line: &str) -> &str {
        assert_eq!(line.as_bytes()[26], b'Z', "{line}");
        &line[27..]
    }

    #[test]
    fn the_layout_of_a_line() {
        let out = capture(|| {
            tracing::info!(
                model = "phi3",
                status = 200u64,
                latency_ms = 2.345,
                delta = -3i64,
                stream = false,
                backend = "http://127.0.0.1:8001",
                "POST /v1/chat/completions status=200"
            );
            tracing::warn!(error = %"connection refused (os error 111)", "backend request failed");
            let span = tracing::info_span!("supervisor", model = "phi3", port = 8001u64);
            let _e = span.enter();
            tracing::error!("engine exited");
            tracing::debug!(x = 1.0, "a debug line");
        });
        let lines: Vec<&str> = out.lines().map(body).collect();
        assert_eq!(
            lines,
            [
                "  INFO POST /v1/chat/completions status=200 model=phi3 status=200 \
                 latency_ms=2.345 delta=-3 stream=false backend=http://127.0.0.1:8001",
                "  WARN backend request failed error=\"connection refused (os error 111)\"",
                " ERROR supervisor{model=phi3 port=8001}: engine exited",
                " DEBUG supervisor{model=phi3 port=8001}: a debug line x=1.0",
            ]
        );
    }

    /// Issue 11, item 1: a client-controlled value cannot split a line or
    /// forge a field: anything but plain printable ASCII is quoted and
    /// escaped, in the message too (unquoted there, but its newlines and
    /// other control characters escaped).
    #[test]
    fn issue11_values_cannot_split_a_line_or_forge_a_field() {
        let out = capture(|| {
            tracing::info!(
                model = "a\n2026-01-01T00:00:00.000000Z  INFO forged",
                path = "/x\" outcome=\"ok",
                key = "two words",
                empty = "",
                back = "a\\b",
                esc = "\u{1b}[31mred",
                sep = "a\u{2028}b\u{202e}c",
                uni = "café",
                "msg\r\nwith\u{2028}breaks\u{1b}[0m {}",
                "and\nargs"
            );
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert_eq!(
            body(out.trim_end_matches('\n')),
            "  INFO msg\\r\\nwith\\u{2028}breaks\\u{1b}[0m and\\nargs \
             model=\"a\\n2026-01-01T00:00:00.000000Z  INFO forged\" \
             path=\"/x\\\" outcome=\\\"ok\" key=\"two words\" empty=\"\" back=\"a\\\\b\" \
             esc=\"\\u{1b}[31mred\" sep=\"a\\u{2028}b\\u{202e}c\" uni=\"café\""
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut s = String::new();
        write_timestamp(&mut s, UNIX_EPOCH).unwrap();
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        for (secs, us, want) in [
            (951_782_400, 7, "2000-02-29T00:00:00.000007Z"),
            (1_796_067_947, 123_456, "2026-11-30T19:45:47.123456Z"),
            (4_107_542_399, 999_999, "2100-02-28T23:59:59.999999Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000Z"),
        ] {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(us);
            // Twice: the second from the per-thread cache.
            for _ in 0..2 {
                let mut s = String::new();
                write_timestamp(&mut s, t).unwrap();
                assert_eq!(s, want);
            }
        }
        let mut s = String::new();
        write_timestamp(&mut s, SystemTime::now()).unwrap();
        let t: Vec<u8> = s.bytes().collect();
        assert_eq!(
            (t.len(), t[4], t[10], t[19], t[26]),
            (27, b'-', b'T', b'.', b'Z')
        );
    }

    #[test]
    fn integers() {
        for n in [0, 7, 10, 99, 12_345, u64::MAX] {
            let mut s = String::new();
            write_u64(&mut s, n).unwrap();
            assert_eq!(s, n.to_string());
        }
    }

    /// The text a value is expected as (the rule, restated).
    fn expected(v: &str, formatted: bool) -> String {
        if is_bare(v) || (formatted && is_str_literal(v)) {
            v.to_owned()
        } else {
            format!("{v:?}")
        }
    }

    proptest! {
        /// The formatter never panics and writes exactly one line per event,
        /// whatever the message and the field values: a bare value is plain
        /// printable ASCII, any other is quoted (reading back, as a Rust
        /// string literal, to what was logged); the message has no control
        /// character left.
        #[test]
        fn one_line_per_event(
            msg in any::<String>(),
            a in any::<String>(),
            b in "[ -~\n\r\t\"\\\\\u{2028}]{0,12}",
            c in any::<String>(),
        ) {
            let out = capture(|| {
                tracing::info!(a = a.as_str(), b = %b, "{msg}");
                tracing::warn!(c = ?c, a = a.as_str());
            });
            prop_assert!(out.ends_with('\n'));
            let lines: Vec<&str> = out.lines().collect();
            prop_assert_eq!(lines.len(), 2, "{:?}", out);
            let first = body(lines[0]);
            let fields = format!(" a={} b={}", expected(&a, false), expected(&b, true));
            prop_assert!(first.ends_with(&fields), "{:?} {:?}", first, fields);
            let message = first[..first.len() - fields.len()].strip_prefix("  INFO ");
            prop_assert!(message.is_some(), "{:?}", first);
            let message = message.unwrap_or_default();
            prop_assert!(!message.chars().any(escapes), "{:?}", message);
            if !msg.chars().any(escapes) {
                prop_assert_eq!(message, msg.as_str());
            }
            prop_assert_eq!(
                body(lines[1]),
                format!("  WARN c={:?} a={}", c, expected(&a, false))
            );
        }
    }
}
