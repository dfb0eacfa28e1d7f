//! The Prometheus exposition formats: content negotiation, a lenient parser
//! of both text formats (Prometheus text 0.0.4 and OpenMetrics 1.0) and a
//! writer of either, so that the gateway's own metrics and the engines'
//! (`/metrics/engines`) are served in the format the scraper asked for.
//!
//! The parser reads outside input (the engines' `/metrics`): it never panics,
//! skips what it cannot read (a malformed line, an invalid name, a value
//! that is not a number) and keeps the rest. Timestamps and exemplars are
//! dropped (the scraper stamps the samples); `# UNIT` lines are ignored.
//!
//! The two formats differ where `promtool check metrics` noticed: a counter
//! family is named `foo` in OpenMetrics (`# TYPE foo counter`, sample
//! `foo_total`) but `foo_total` in the text format, whose parser groups
//! samples by their exact name. Families are stored under their OpenMetrics
//! name and written the way each format wants.

use std::collections::HashMap;
use std::fmt::Write as _;

/// One of the two exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Text,
    /// OpenMetrics 1.0 (`application/openmetrics-text`), ends with `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header asks for: OpenMetrics when it
    /// names `application/openmetrics-text` with a quality above 0 and at
    /// least that of the text format (`text/plain`, else `text/*` or `*/*`);
    /// the text format otherwise (no header, `*/*`, `text/plain`).
    pub fn negotiate(accept: Option<&[u8]>) -> Format {
        let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
            return Format::Text;
        };
        let mut om: Option<f32> = None;
        let mut text: Option<f32> = None;
        let mut wildcard: Option<f32> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v
                            .trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|q| q.is_finite())
                            .unwrap_or(0.0);
                    }
                }
            }
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut om,
                "text/plain" => &mut text,
                "text/*" | "*/*" => &mut wildcard,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match om {
            Some(q) if q > 0.0 && q >= text.or(wildcard).unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    /// OpenMetrics `info` (samples `NAME_info`); a gauge in the text format.
    Info,
    /// Text `untyped`, OpenMetrics `unknown`.
    Untyped,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" | "stateset" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            "info" => Kind::Info,
            "untyped" | "unknown" => Kind::Untyped,
            // gaugehistogram and anything else: not representable in both formats.
            _ => return None,
        })
    }

    /// The suffixes a sample of this kind may add to the family's name.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Kind::Counter => &["_total", "", "_created"],
            Kind::Gauge | Kind::Untyped => &[""],
            Kind::Histogram => &["_bucket", "_sum", "_count", "_created"],
            Kind::Summary => &["", "_sum", "_count", "_created"],
            Kind::Info => &["_info"],
        }
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Label names and unescaped values, in order.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A metric family: its OpenMetrics name (a counter without `_total`), type,
/// help and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: Kind,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed exposition: families in the order they first appeared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub families: Vec<Family>,
    index: HashMap<String, usize>,
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
pub fn valid_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
pub fn valid_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// The family a `# TYPE`/`# HELP` name stands for: a text-format counter
/// `foo_total` is the family `foo`.
fn family_name(name: &str, kind: Kind) -> &str {
    match kind {
        Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

/// Unescapes a HELP text (`\\`, `\n`, `\"`); other escapes are kept as written.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Reads `{name="value",...}` at the start of `s`; returns the labels and
/// the rest after `}`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut rest = s.strip_prefix('{')?;
    let mut labels: Vec<(String, String)> = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(r) = rest.strip_prefix('}') {
            return Some((labels, r));
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        if !valid_label_name(name) || labels.iter().any(|(n, _)| n == name) {
            return None;
        }
        rest = rest[end..].trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('=')?.trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    other => {
                        value.push('\\');
                        value.push(other);
                    }
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_owned(), value));
        rest = rest[close + 1..].trim_start_matches([' ', '\t']);
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

/// A sample value: a float, `NaN`, `+Inf`, `-Inf` (and `Inf`).
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ if s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && !s.is_empty() =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

/// A sample line: `name{labels} value [timestamp] [# exemplar]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..end];
    if !valid_metric_name(name) {
        return None;
    }
    let rest = line[end..].trim_start_matches([' ', '\t']);
    let (labels, rest) = if rest.starts_with('{') {
        parse_labels(rest)?
    } else {
        (Vec::new(), rest)
    };
    let mut words = rest.split([' ', '\t']).filter(|w| !w.is_empty());
    let value = parse_value(words.next()?)?;
    // A timestamp, then maybe `# exemplar`: both dropped. Anything else is junk.
    match words.next() {
        None | Some("#") => {}
        Some(ts) if parse_value(ts).is_some_and(f64::is_finite) => {
            if !matches!(words.next(), None | Some("#")) {
                return None;
            }
        }
        Some(_) => return None,
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

impl Exposition {
    /// Parses either text format; never panics, skips what it cannot read.
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        // The family the last TYPE/HELP line named, and its HELP before TYPE.
        let mut current: Option<usize> = None;
        let mut pending_help: Option<(String, String)> = None;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim_start_matches([' ', '\t']);
                if comment == "EOF" {
                    break;
                }
                let mut w = comment.splitn(3, [' ', '\t']);
                let (Some(keyword), Some(name)) = (w.next(), w.next()) else {
                    continue;
                };
                if !valid_metric_name(name) {
                    continue;
                }
                let arg = w.next().unwrap_or("").trim_start_matches([' ', '\t']);
                match keyword {
                    "TYPE" => {
                        let Some(kind) = Kind::parse(arg.trim()) else {
                            current = None;
                            continue;
                        };
                        let fname = family_name(name, kind).to_owned();
                        let help = pending_help
                            .take()
                            .filter(|(n, _)| n == name || *n == fname)
                            .map(|(_, h)| h);
                        current = e.family_for_type(fname, kind, help);
                    }
                    "HELP" => {
                        let help = unescape(arg);
                        // HELP after TYPE (allowed) names the current family.
                        match current.map(|i| &mut e.families[i]) {
                            Some(f)
                                if f.name == name
                                    || (f.kind == Kind::Counter
                                        && family_name(name, f.kind) == f.name) =>
                            {
                                f.help.get_or_insert(help);
                            }
                            _ => pending_help = Some((name.to_owned(), help)),
                        }
                    }
                    _ => {}
                }
                continue;
            }
            let Some(sample) = parse_sample(line) else {
                continue;
            };
            let idx = match current.filter(|i| e.families[*i].owns(&sample.name)) {
                Some(i) => i,
                None => e.family_for_sample(&sample.name, pending_help.take()),
            };
            current = Some(idx);
            e.families[idx].samples.push(sample);
        }
        e
    }

    /// The family a TYPE line opens (an earlier one of the same name and
    /// type is continued); `None` when the name is taken by another type.
    fn family_for_type(&mut self, name: String, kind: Kind, help: Option<String>) -> Option<usize> {
        if let Some(&i) = self.index.get(&name) {
            let f = &mut self.families[i];
            if f.kind == kind {
                if f.help.is_none() {
                    f.help = help;
                }
                return Some(i);
            }
            if f.kind == Kind::Untyped && f.samples.iter().all(|s| s.name == name) {
                // HELP/samples seen before TYPE: now typed.
                f.kind = kind;
                return Some(i);
            }
            return None;
        }
        Some(self.push(Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }))
    }

    /// The family of a sample outside its TYPE block: a typed family it
    /// belongs to, else an untyped family of its own name.
    fn family_for_sample(&mut self, sample: &str, help: Option<(String, String)>) -> usize {
        for suffix in [
            "_total", "_bucket", "_sum", "_count", "_created", "_info", "",
        ] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if let Some(&i) = self.index.get(base) {
                    if self.families[i].owns(sample) {
                        return i;
                    }
                }
            }
        }
        let help = help.filter(|(n, _)| n == sample).map(|(_, h)| h);
        self.push(Family {
            name: sample.to_owned(),
            kind: Kind::Untyped,
            help,
            samples: Vec::new(),
        })
    }

    fn push(&mut self, f: Family) -> usize {
        let i = self.families.len();
        self.index.insert(f.name.clone(), i);
        self.families.push(f);
        i
    }

    /// Appends `other`'s families and samples, each sample with `extra`
    /// labels first (replacing labels of the same names). A family whose
    /// name is taken by another type here is left out; returns how many
    /// families were.
    pub fn merge(&mut self, other: Exposition, extra: &[(&str, &str)]) -> usize {
        let mut dropped = 0;
        for mut f in other.families {
            for s in &mut f.samples {
                s.labels.retain(|(n, _)| !extra.iter().any(|(e, _)| e == n));
                let mut labels: Vec<(String, String)> = extra
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                    .collect();
                labels.append(&mut s.labels);
                s.labels = labels;
            }
            match self.index.get(&f.name) {
                Some(&i) if self.families[i].kind == f.kind => {
                    let mine = &mut self.families[i];
                    if mine.help.is_none() {
                        mine.help = f.help;
                    }
                    mine.samples.append(&mut f.samples);
                }
                Some(_) => dropped += 1,
                None => {
                    self.push(f);
                }
            }
        }
        dropped
    }

    /// Writes the families in `format`.
    pub fn write(&self, format: Format) -> String {
        let mut out = String::with_capacity(64 * self.families.len() + 4096);
        for f in &self.families {
            f.write(format, &mut out);
        }
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

impl Family {
    /// Whether a sample of this name belongs to this family.
    fn owns(&self, sample: &str) -> bool {
        sample
            .strip_prefix(self.name.as_str())
            .is_some_and(|suffix| self.kind.suffixes().contains(&suffix))
    }

    /// Writes the family in `format`. A family whose samples cannot be
    /// written as its type in that format is written as untyped under its
    /// samples' name (e.g. a text counter without `_total` in OpenMetrics).
    fn write(&self, format: Format, out: &mut String) {
        let total = format!("{}_total", self.name);
        let (name, kind, keep): (&str, &str, SampleFilter) = match (self.kind, format) {
            (Kind::Counter, _)
                if !self.samples.is_empty() && self.samples.iter().all(|s| s.name == self.name) =>
            {
                (
                    &self.name,
                    match format {
                        Format::Text => "counter",
                        Format::OpenMetrics => "unknown",
                    },
                    &|_| true,
                )
            }
            (Kind::Counter, Format::Text) => (&total, "counter", &|s| s.name == total),
            (Kind::Counter, Format::OpenMetrics) => (&self.name, "counter", &|s| s.name == total),
            (Kind::Gauge, _) => (&self.name, "gauge", &|_| true),
            (Kind::Histogram, _) => (&self.name, "histogram", &|s| !s.name.ends_with("_created")),
            (Kind::Summary, _) => (&self.name, "summary", &|s| !s.name.ends_with("_created")),
            (Kind::Info, Format::OpenMetrics) => (&self.name, "info", &|_| true),
            (Kind::Info, Format::Text) => {
                // The text format has no info type: a gauge NAME_info.
                let info = format!("{}_info", self.name);
                let mut f = self.clone();
                f.name = info;
                f.kind = Kind::Gauge;
                f.write(format, out);
                return;
            }
            (Kind::Untyped, Format::Text) => (&self.name, "untyped", &|_| true),
            (Kind::Untyped, Format::OpenMetrics) => (&self.name, "unknown", &|_| true),
        };
        if let Some(help) = &self.help {
            let _ = write!(out, "# HELP {name} ");
            for c in help.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '"' if format == Format::OpenMetrics => out.push_str("\\\""),
                    c => out.push(c),
                }
            }
            out.push('\n');
        }
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in self.samples.iter().filter(|s| keep(s)) {
            write_sample(s, out);
        }
    }
}

/// Which samples of a family a format keeps.
type SampleFilter<'a> = &'a dyn Fn(&Sample) -> bool;

fn write_sample(s: &Sample, out: &mut String) {
    out.push_str(&s.name);
    if !s.labels.is_empty() {
        out.push('{');
        for (i, (n, v)) in s.labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(n);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '"' => out.push_str("\\\""),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    if s.value.is_nan() {
        out.push_str("NaN");
    } else if s.value == f64::INFINITY {
        out.push_str("+Inf");
    } else if s.value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{}", s.value);
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIM: &str = "# HELP vllm:num_requests_running Number of requests running.\n\
        # TYPE vllm:num_requests_running gauge\n\
        vllm:num_requests_running{model_name=\"phi3\"} 2\n\
        # HELP vllm:prompt_tokens_total Prefill tokens.\n\
        # TYPE vllm:prompt_tokens_total counter\n\
        vllm:prompt_tokens_total{model_name=\"phi3\"} 17\n\
        # HELP vllm:ttft Histogram.\n\
        # TYPE vllm:ttft histogram\n\
        vllm:ttft_bucket{model_name=\"phi3\",le=\"0.1\"} 1\n\
        vllm:ttft_bucket{model_name=\"phi3\",le=\"+Inf\"} 2\n\
        vllm:ttft_sum{model_name=\"phi3\"} 0.5\n\
        vllm:ttft_count{model_name=\"phi3\"} 2\n";

    #[test]
    fn negotiation() {
        let f = |a: &str| Format::negotiate(Some(a.as_bytes()));
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(f("*/*"), Format::Text);
        assert_eq!(f("text/plain; version=0.0.4"), Format::Text);
        assert_eq!(f("application/openmetrics-text"), Format::OpenMetrics);
        // What Prometheus sends.
        assert_eq!(
            f("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
            Format::OpenMetrics
        );
        assert_eq!(
            f("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"),
            Format::Text
        );
        assert_eq!(f("application/openmetrics-text;q=0"), Format::Text);
    }

    #[test]
    fn text_counter_is_the_openmetrics_family_without_total() {
        let e = Exposition::parse(SIM);
        let names: Vec<_> = e.families.iter().map(|f| (&*f.name, f.kind)).collect();
        assert_eq!(
            names,
            [
                ("vllm:num_requests_running", Kind::Gauge),
                ("vllm:prompt_tokens", Kind::Counter),
                ("vllm:ttft", Kind::Histogram),
            ]
        );
        let om = e.write(Format::OpenMetrics);
        assert!(om.contains("# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total{"));
        assert!(om.ends_with("# EOF\n"));
        let text = e.write(Format::Text);
        assert!(text.contains("# HELP vllm:prompt_tokens_total Prefill tokens.\n# TYPE vllm:prompt_tokens_total counter\n"));
        assert!(!text.contains("EOF"));
        // Both round-trip.
        assert_eq!(Exposition::parse(&om).families, e.families);
        assert_eq!(Exposition::parse(&text).families, e.families);
    }

    #[test]
    fn merge_adds_labels_and_keeps_one_header_per_family() {
        let mut all = Exposition::default();
        all.merge(Exposition::parse(SIM), &[("citadel_model", "a")]);
        all.merge(Exposition::parse(SIM), &[("citadel_model", "b\"x")]);
        let text = all.write(Format::Text);
        assert_eq!(
            text.matches("# TYPE vllm:ttft histogram").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("vllm:num_requests_running{citadel_model=\"a\",model_name=\"phi3\"} 2\n")
        );
        assert!(text.contains(
            "vllm:num_requests_running{citadel_model=\"b\\\"x\",model_name=\"phi3\"} 2\n"
        ));
        // A family named like another of a different type is left out.
        let clash = Exposition::parse("# TYPE vllm:ttft gauge\nvllm:ttft 1\n");
        assert_eq!(all.merge(clash, &[("citadel_model", "c")]), 1);
        assert!(!all.write(Format::Text).contains("citadel_model=\"c\""));
    }

    #[test]
    fn junk_is_skipped_and_the_rest_kept() {
        let e = Exposition::parse(
            "# TYPE g gauge\ng{a=\"1\"} 1 1700000000000\ng{a=\"2\" 2\ng{a=\"3\"} x\n9bad 1\ng{a=\"4\",a=\"5\"} 1\ng 3 # {} 1\n# EOF\nafter 1\n",
        );
        assert_eq!(e.families.len(), 1);
        let vals: Vec<f64> = e.families[0].samples.iter().map(|s| s.value).collect();
        assert_eq!(vals, [1.0, 3.0]);
    }

    fn arb_exposition() -> impl Strategy<Value = Exposition> {
        let name = "[a-z_:][a-z0-9_:]{0,8}";
        let label = ("[a-z_][a-z0-9_]{0,4}", "\\PC{0,6}");
        let sample = (prop::collection::vec(label, 0..3), any::<f64>());
        let kind = prop::sample::select(vec![
            Kind::Counter,
            Kind::Gauge,
            Kind::Histogram,
            Kind::Summary,
            Kind::Untyped,
        ]);
        prop::collection::vec(
            (
                name,
                kind,
                prop::option::of("\\PC{0,12}"),
                prop::collection::vec(sample, 0..4),
            ),
            0..5,
        )
        .prop_map(|fams| {
            let mut e = Exposition::default();
            for (name, kind, help, samples) in fams {
                let name = format!("f_{name}");
                if e.index.contains_key(&name)
                    || e.families
                        .iter()
                        .any(|f| name.starts_with(&f.name) || f.name.starts_with(&name))
                {
                    continue;
                }
                let sname = match kind {
                    Kind::Counter => format!("{name}_total"),
                    Kind::Histogram | Kind::Summary => format!("{name}_count"),
                    _ => name.clone(),
                };
                let samples = samples
                    .into_iter()
                    .map(|(labels, value)| {
                        let mut l: Vec<(String, String)> = Vec::new();
                        for (n, v) in labels {
                            if !l.iter().any(|(m, _)| *m == n) {
                                l.push((n, v));
                            }
                        }
                        Sample {
                            name: sname.clone(),
                            labels: l,
                            value,
                        }
                    })
                    .collect();
                e.push(Family {
                    name,
                    kind,
                    help: help.map(|h| h.trim().to_owned()),
                    samples,
                });
            }
            e
        })
    }

    /// Values compared as written (NaN equals NaN).
    fn canon(e: &Exposition) -> String {
        e.write(Format::OpenMetrics)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        /// Issue 14, item 2: the engines' exposition is outside input; the
        /// parser never panics, whatever the bytes.
        #[test]
        fn issue14_engine_metrics_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let e = Exposition::parse(&text);
            let _ = e.write(Format::Text);
            let _ = e.write(Format::OpenMetrics);
        }

        /// ... nor on exposition-shaped noise.
        #[test]
        fn issue14_engine_metrics_parser_never_panics_on_exposition_like_text(
            text in prop::collection::vec(
                prop::sample::select(vec!["# TYPE ", "# HELP ", "# EOF", "x", "_total", "_bucket", "{", "}", "=", "\"", "\\", ",", " ", "\n", "1", "+Inf", "counter", "histogram", "le"]),
                0..64,
            )
        ) {
            let _ = Exposition::parse(&text.concat());
        }

        /// Whatever is written in one format reads back as the same families,
        /// from either format.
        #[test]
        fn issue14_exposition_round_trips_in_both_formats(e in arb_exposition()) {
            for format in [Format::Text, Format::OpenMetrics] {
                let back = Exposition::parse(&e.write(format));
                prop_assert_eq!(canon(&back), canon(&e), "{:?}", format);
            }
        }
    }
}
