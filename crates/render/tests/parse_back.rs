//! Issue 9, item 1 (unit-file injection): rendered files are read back the way
//! systemd reads them, and what systemd would read must be what the
//! configuration meant, or the renderer must have left the directive out (with
//! a comment saying so). No configured string may add a directive or a line.
//!
//! Settings are built from a valid config and then given hostile strings
//! directly, bypassing validation (which rejects most of them): the renderer
//! must be correct for any string it is given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use citadel_config::units::Timespan;
use citadel_config::{parse, Port, Settings};
use citadel_render::{instance_dropin, render, Host, Rendered, INVALID_ACCOUNT};
use proptest::prelude::*;

/// A small reader of systemd's file formats, written from the man pages and
/// the parsing code (`src/shared/conf-parser.c`, `src/basic/extract-word.c`,
/// `src/basic/escape.c`, `src/core/load-fragment.c`, `src/tmpfiles/tmpfiles.c`,
/// `src/sysusers/sysusers.c`). It is stricter than systemd where systemd's
/// behaviour differs between versions: a renderer that needs those corners is
/// wrong.
mod systemd_syntax {
    /// `read_line()`: a line ends at `\n`, `\r\n`, `\r` or NUL.
    pub fn physical_lines(text: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let mut cur = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' | '\0' => lines.push(std::mem::take(&mut cur)),
                '\r' => {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    lines.push(std::mem::take(&mut cur));
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        lines
    }

    /// systemd's `WHITESPACE`.
    pub const WHITESPACE: &str = " \t\n\r";

    fn strstrip(s: &str) -> &str {
        s.trim_matches(|c| WHITESPACE.contains(c))
    }

    /// An odd number of trailing backslashes (conf-parser.c pairs them from
    /// the start of the line; a character after a backslash is consumed).
    fn ends_escaped(s: &str) -> bool {
        s.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Directive {
        pub section: String,
        pub key: String,
        pub value: String,
    }

    #[derive(Debug, Default)]
    pub struct UnitFile {
        pub directives: Vec<Directive>,
        pub comments: Vec<String>,
        /// Lines joined by a trailing backslash (the renderer never writes one).
        pub continuations: usize,
    }

    /// systemd.syntax(7): `[Section]` headers, `Key=Value` with whitespace
    /// around `=` and at both ends ignored, lines starting with `#` or `;`
    /// ignored, a line ending in a backslash joined with the next (the
    /// backslash becomes a space; comment lines inside the continuation are
    /// skipped).
    pub fn parse_unit(text: &str) -> Result<UnitFile, String> {
        let mut file = UnitFile::default();
        let mut section = String::new();
        let mut continuation: Option<String> = None;
        for line in physical_lines(text) {
            let mut joined = match continuation.take() {
                Some(mut c) => {
                    if strstrip(&line).starts_with(['#', ';']) {
                        continuation = Some(c);
                        continue;
                    }
                    c.push_str(&line);
                    c
                }
                None => line,
            };
            if ends_escaped(&joined) {
                joined.pop();
                joined.push(' ');
                file.continuations += 1;
                continuation = Some(joined);
                continue;
            }
            let l = strstrip(&joined);
            if l.is_empty() {
                continue;
            }
            if l.starts_with(['#', ';']) {
                file.comments.push(l.to_owned());
                continue;
            }
            if let Some(rest) = l.strip_prefix('[') {
                let name = rest
                    .strip_suffix(']')
                    .ok_or_else(|| format!("invalid section header {l:?}"))?;
                section = name.to_owned();
                continue;
            }
            let (key, value) = l
                .split_once('=')
                .ok_or_else(|| format!("missing '=' in {l:?}"))?;
            file.directives.push(Directive {
                section: section.clone(),
                key: strstrip(key).to_owned(),
                value: strstrip(value).to_owned(),
            });
        }
        if let Some(c) = continuation {
            return Err(format!("file ends in a continuation: {c:?}"));
        }
        Ok(file)
    }

    #[derive(Debug, Clone, Copy, Default)]
    pub struct Flags {
        /// EXTRACT_UNQUOTE
        pub unquote: bool,
        /// EXTRACT_CUNESCAPE
        pub cunescape: bool,
        /// EXTRACT_RETAIN_ESCAPE
        pub retain_escape: bool,
        /// EXTRACT_DONT_COALESCE_SEPARATORS
        pub dont_coalesce: bool,
    }

    pub const UNQUOTE: Flags = Flags {
        unquote: true,
        cunescape: false,
        retain_escape: false,
        dont_coalesce: false,
    };
    pub const UNQUOTE_CUNESCAPE: Flags = Flags {
        unquote: true,
        cunescape: true,
        retain_escape: false,
        dont_coalesce: false,
    };

    /// `cunescape_one()` for the escapes of systemd.syntax(7)'s table; `chars`
    /// starts after the backslash. Returns the character and how many
    /// characters were used. NUL is refused, as systemd does.
    fn cunescape_one(chars: &[char]) -> Result<(char, usize), String> {
        let c = *chars.first().ok_or("backslash at the end")?;
        let simple = match c {
            'a' => Some('\u{7}'),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\u{b}'),
            '\\' => Some('\\'),
            '"' => Some('"'),
            '\'' => Some('\''),
            's' => Some(' '),
            _ => None,
        };
        if let Some(s) = simple {
            return Ok((s, 1));
        }
        let number = |digits: usize, radix: u32| -> Result<u32, String> {
            let s: String = chars
                .get(1..1 + digits)
                .ok_or("short escape")?
                .iter()
                .collect();
            u32::from_str_radix(&s, radix).map_err(|e| format!("bad escape {s:?}: {e}"))
        };
        let (value, used) = match c {
            'x' => (number(2, 16)?, 3),
            'u' => (number(4, 16)?, 5),
            'U' => (number(8, 16)?, 9),
            '0'..='7' => {
                let s: String = chars
                    .get(0..3)
                    .ok_or("short octal escape")?
                    .iter()
                    .collect();
                (
                    u32::from_str_radix(&s, 8).map_err(|e| format!("bad octal {s:?}: {e}"))?,
                    3,
                )
            }
            other => return Err(format!("unknown escape \\{other}")),
        };
        if value == 0 {
            return Err("escaped NUL".into());
        }
        if c == 'x' && value >= 0x80 {
            return Err("\\x above 0x7f gives a raw byte, not UTF-8".into());
        }
        let ch = char::from_u32(value).ok_or("escape is not a character")?;
        Ok((ch, used))
    }

    /// `extract_first_word()`. Returns the word (None at the end) and the
    /// rest. Stricter than systemd: a quote may only open a word and must be
    /// followed by a separator or the end (systemd.syntax(7), "Quoting"),
    /// unknown escapes and unbalanced quotes are errors.
    pub fn first_word<'a>(
        input: &'a str,
        separators: &str,
        flags: Flags,
    ) -> Result<(Option<String>, &'a str), String> {
        let chars: Vec<(usize, char)> = input.char_indices().collect();
        let rest_at = |i: usize| chars.get(i).map_or("", |(b, _)| &input[*b..]);
        let mut i = 0;
        if flags.dont_coalesce {
            if let Some((_, c)) = chars.first() {
                if separators.contains(*c) {
                    return Ok((Some(String::new()), rest_at(1)));
                }
            }
        } else {
            while chars.get(i).is_some_and(|(_, c)| separators.contains(*c)) {
                i += 1;
            }
        }
        if i >= chars.len() {
            return Ok((None, ""));
        }
        let plain: Vec<char> = chars.iter().map(|(_, c)| *c).collect();
        let start = i;
        let mut word = String::new();
        let mut quote: Option<char> = None;
        loop {
            let Some(&c) = plain.get(i) else {
                if quote.is_some() {
                    return Err(format!("unbalanced quote in {input:?}"));
                }
                return Ok((Some(word), ""));
            };
            if c == '\\' && !flags.retain_escape {
                let next = plain.get(i + 1..).unwrap_or(&[]);
                if next.is_empty() {
                    return Err(format!("trailing backslash in {input:?}"));
                }
                if flags.cunescape {
                    let (ch, used) = cunescape_one(next)?;
                    word.push(ch);
                    i += 1 + used;
                } else {
                    word.push(next[0]);
                    i += 2;
                }
                continue;
            }
            if let Some(q) = quote {
                if c == q {
                    quote = None;
                    i += 1;
                    if let Some(&n) = plain.get(i) {
                        if !separators.contains(n) {
                            return Err(format!(
                                "closing quote not followed by a separator in {input:?}"
                            ));
                        }
                    }
                } else {
                    word.push(c);
                    i += 1;
                }
                continue;
            }
            if flags.unquote && (c == '"' || c == '\'') {
                if i != start {
                    return Err(format!(
                        "quote inside a word in {input:?} (read differently by systemd versions)"
                    ));
                }
                quote = Some(c);
                i += 1;
                continue;
            }
            if separators.contains(c) {
                i += 1;
                if !flags.dont_coalesce {
                    while plain.get(i).is_some_and(|c| separators.contains(*c)) {
                        i += 1;
                    }
                }
                return Ok((Some(word), rest_at(i)));
            }
            word.push(c);
            i += 1;
        }
    }

    pub fn words(input: &str, flags: Flags) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            let (w, r) = first_word(rest, WHITESPACE, flags)?;
            match w {
                Some(w) => out.push(w),
                None => return Ok(out),
            }
            rest = r;
        }
    }

    /// Specifier expansion (systemd.unit(5), "Specifiers"): `%%` is `%`; any
    /// other `%x` is expanded, shown here as `{%x}`; a lone `%` is an error.
    pub fn unspecifier(s: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some(x) if x.is_ascii_alphanumeric() => {
                    out.push_str("{%");
                    out.push(x);
                    out.push('}');
                }
                other => return Err(format!("bad specifier %{other:?} in {s:?}")),
            }
        }
        Ok(out)
    }

    /// ExecStart= variable expansion (systemd.service(5), "Command lines"):
    /// `$$` is `$`. Any other `$` could expand, which is an error here.
    pub fn undollar(s: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '$' && chars.next() != Some('$') {
                return Err(format!("unescaped $ in {s:?}"));
            }
            out.push(c);
        }
        Ok(out)
    }

    /// tmpfiles.d(5)/sysusers.d(5): one entry per line, `#` lines and empty
    /// lines ignored (no continuation lines in these formats).
    pub fn table_lines(text: &str) -> (Vec<String>, Vec<String>) {
        let (mut entries, mut comments) = (Vec::new(), Vec::new());
        for line in physical_lines(text) {
            let l = strstrip(&line);
            if l.is_empty() {
                continue;
            }
            if l.starts_with('#') {
                comments.push(l.to_owned());
            } else {
                entries.push(l.to_owned());
            }
        }
        (entries, comments)
    }
}

use systemd_syntax::{
    first_word, parse_unit, table_lines, undollar, unspecifier, words, Directive, Flags, UNQUOTE,
    UNQUOTE_CUNESCAPE,
};

const CONFIG: &str = r#"
[gateway]
auth = true

[models.m]
port = 11400
engine = "ollama"
model = "llama3"
gpus = [0]

# Issue 15: a further instance, whose drop-in is checked like the model's.
[[models.m.instances]]
port = 11401
gpus = [1]
"#;

fn base_settings() -> Settings {
    match parse(CONFIG, Path::new("/opt/citadel/config/citadel.toml")) {
        Ok(l) => l.settings,
        Err(e) => panic!("{e}"),
    }
}

/// Every configured string that reaches a rendered file.
#[derive(Debug, Clone)]
struct Hostile {
    source: String,
    home: String,
    models: String,
    credentials_dir: String,
    api_keys_file: String,
    user: String,
    group: String,
    env: Vec<(String, String)>,
    credentials: Vec<(String, String)>,
}

impl Hostile {
    /// The same shape with harmless strings: what the directive list must look like.
    fn benign(&self) -> Hostile {
        let env: BTreeMap<String, String> = self.env.iter().cloned().collect();
        let creds: BTreeMap<String, String> = self.credentials.iter().cloned().collect();
        Hostile {
            env: (0..env.len())
                .map(|i| (format!("K{i}"), "v".into()))
                .collect(),
            credentials: (0..creds.len())
                .map(|i| (format!("c{i}"), format!("/etc/c{i}")))
                .collect(),
            ..benign_hostile()
        }
    }

    fn apply(&self) -> Settings {
        let mut s = base_settings();
        s.source = PathBuf::from(&self.source);
        s.paths.home = PathBuf::from(&self.home);
        s.paths.models = PathBuf::from(&self.models);
        s.paths.credentials = PathBuf::from(&self.credentials_dir);
        s.gateway.api_keys_file = PathBuf::from(&self.api_keys_file);
        s.service.user = self.user.clone();
        s.service.group = self.group.clone();
        let m = &mut s.models[0];
        m.env = self.env.iter().cloned().collect();
        m.credentials = self
            .credentials
            .iter()
            .map(|(k, v)| (k.clone(), PathBuf::from(v)))
            .collect();
        s
    }
}

fn sysusers_name_ok(name: &str) -> bool {
    let mut c = name.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == '-')
        && name.len() <= 31
        && name != "root"
}

fn has_line_break(s: &str) -> bool {
    s.contains(['\n', '\r', '\0'])
}

/// `extract_first_word()`-style list values must be one word here.
fn one_word(value: &str, flags: Flags) -> Result<String, String> {
    let mut w = words(value, flags)?;
    if w.len() != 1 {
        return Err(format!("{value:?} is {} words, not one", w.len()));
    }
    Ok(w.remove(0))
}

/// `parsed` must be `expected` with some entries left out, in order.
fn is_subsequence<T: PartialEq + std::fmt::Debug>(
    parsed: &[T],
    expected: &[T],
) -> Result<(), String> {
    let mut it = expected.iter();
    for p in parsed {
        if !it.any(|e| e == p) {
            return Err(format!(
                "{p:?} is not among (or out of order in) {expected:?}"
            ));
        }
    }
    Ok(())
}

fn left_out_count(comments: &[String]) -> usize {
    comments
        .iter()
        .filter(|c| c.contains("was left out"))
        .count()
}

/// Checks every rendered file of `h` against what it means; Err says what systemd would misread.
fn check(h: &Hostile) -> Result<(), String> {
    let settings = h.apply();
    let rendered = render(&settings);
    let baseline = render(&h.benign().apply());
    if rendered.files.iter().map(|f| &f.path).collect::<Vec<_>>()
        != baseline.files.iter().map(|f| &f.path).collect::<Vec<_>>()
    {
        return Err("the set of files depends on configured strings".into());
    }
    for (f, b) in rendered.files.iter().zip(&baseline.files) {
        let name = f.path.display().to_string();
        let first = systemd_syntax::physical_lines(&f.contents);
        if !f.contents.starts_with(citadel_render::GENERATED_MARK)
            || first.iter().take(3).any(|l| !l.starts_with('#'))
        {
            return Err(format!("{name}: the header is not three comment lines"));
        }
        let r = if name.ends_with(".service")
            || name.ends_with(".target")
            || name.ends_with(".socket")
            || name.ends_with(".conf") && name.contains(".service.d/")
        {
            check_unit(h, &settings, &name, &f.contents, &b.contents)
        } else if name.starts_with("tmpfiles.d/") {
            check_tmpfiles(h, &f.contents)
        } else if name.starts_with("sysusers.d/") {
            check_sysusers(h, &f.contents)
        } else if name == citadel_render::MODULES_LOAD_FILE {
            // Module names only, one per line (systemd-modules-load reads the
            // rest as comments): nothing configured reaches this file.
            let names: Vec<&str> = first
                .iter()
                .map(|l| l.trim())
                .filter(|l| !l.is_empty() && !l.starts_with(['#', ';']))
                .collect();
            if names == ["nvidia", "nvidia-uvm"] {
                Ok(())
            } else {
                Err(format!("modules-load.d lists {names:?}"))
            }
        } else {
            Err("unknown file".into())
        };
        r.map_err(|e| format!("{name}: {e}\n--- rendered ---\n{}", f.contents))?;
    }
    // Issue 15: the surge instance's drop-in, which the CLI writes itself.
    let surge = |s: &Settings| {
        let (_, _, mut m) = s.instance("m").ok_or("no instance m")?;
        m.port = Port::new(11499)?;
        Ok::<_, String>(instance_dropin(s, &Host::default(), &m, "m:surge"))
    };
    let (text, base) = (surge(&settings)?, surge(&h.benign().apply())?);
    let name = "citadel-model@m:surge.service.d/50-citadel.conf";
    check_unit(h, &settings, name, &text, &base)
        .map_err(|e| format!("{name}: {e}\n--- rendered ---\n{text}"))?;
    Ok(())
}

fn check_unit(
    h: &Hostile,
    s: &Settings,
    name: &str,
    text: &str,
    baseline: &str,
) -> Result<(), String> {
    let file = parse_unit(text)?;
    let base = parse_unit(baseline)?;
    if file.continuations != 0 {
        return Err("a line continues on the next one".into());
    }
    // No injected directive: the (section, key) list is the baseline's, with
    // only left-out directives missing, each announced by a comment.
    let keys = |d: &[Directive]| {
        d.iter()
            .map(|d| (d.section.clone(), d.key.clone()))
            .collect::<Vec<_>>()
    };
    let (got, want) = (keys(&file.directives), keys(&base.directives));
    is_subsequence(&got, &want)?;
    let fail_closed = file
        .directives
        .iter()
        .filter(|d| d.value == INVALID_ACCOUNT)
        .count();
    if want.len() - got.len() != left_out_count(&file.comments) - fail_closed {
        return Err(format!(
            "{} directives missing but {} announced as left out",
            want.len() - got.len(),
            left_out_count(&file.comments) - fail_closed
        ));
    }
    let model = &s.models[0];
    let mut env = Vec::new();
    let mut creds = Vec::new();
    for d in &file.directives {
        match d.key.as_str() {
            "User" | "Group" => {
                let intended = if d.key == "User" { &h.user } else { &h.group };
                let v = unspecifier(&d.value)?;
                let refused = v == INVALID_ACCOUNT && !sysusers_name_ok(intended);
                if v != *intended && !refused {
                    return Err(format!("{}={v:?}, meant {intended:?}", d.key));
                }
                if sysusers_name_ok(intended) && v != *intended {
                    return Err(format!("valid {} {intended:?} was refused", d.key));
                }
            }
            "Environment" => env.push(unspecifier(&one_word(&d.value, UNQUOTE_CUNESCAPE)?)?),
            "LoadCredential" => {
                // load-fragment.c: name = extract_first_word(":", DONT_COALESCE), no
                // quotes, backslash escapes; path = the rest, verbatim.
                let flags = Flags {
                    dont_coalesce: true,
                    ..Flags::default()
                };
                let (cred, path) = first_word(&d.value, ":", flags)?;
                let cred = cred.ok_or("LoadCredential= without a name")?;
                creds.push((unspecifier(&cred)?, unspecifier(path)?));
            }
            "ReadWritePaths" => {
                let w = unspecifier(&one_word(&d.value, UNQUOTE)?)?;
                let want = s.paths.models.join("ollama");
                if w.strip_prefix('-') != want.to_str() {
                    return Err(format!("ReadWritePaths={w:?}, meant -{}", want.display()));
                }
            }
            "ExecStart" => check_exec(s, name, &d.value)?,
            _ => {}
        }
    }
    if name.contains(".service.d/") {
        // GPU 0 unresolved (no host facts): the order, and no CUDA_VISIBLE_DEVICES.
        let mut want_env = vec!["CUDA_DEVICE_ORDER=PCI_BUS_ID".to_owned()];
        want_env.extend(model.env.iter().map(|(k, v)| format!("{k}={v}")));
        is_subsequence(&env, &want_env)?;
        for (k, v) in &model.env {
            let writable = !v.contains('\0')
                && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if writable && !env.contains(&format!("{k}={v}")) {
                return Err(format!("writable Environment {k:?}={v:?} was left out"));
            }
        }
        let want_creds: Vec<(String, String)> = model
            .credentials
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string_lossy().into_owned()))
            .collect();
        is_subsequence(&creds, &want_creds)?;
        let rw = s.paths.models.join("ollama");
        let rw = rw.to_string_lossy();
        if rw.starts_with('/')
            && !has_line_break(&rw)
            && !file.directives.iter().any(|d| d.key == "ReadWritePaths")
        {
            return Err("writable ReadWritePaths= was left out".into());
        }
    }
    if name == "citadel-gateway.service" {
        is_subsequence(&creds, &[("api-keys".to_owned(), h.api_keys_file.clone())])?;
    }
    Ok(())
}

fn check_exec(s: &Settings, name: &str, value: &str) -> Result<(), String> {
    let w = words(value, UNQUOTE_CUNESCAPE)?;
    if w.iter().any(|w| w == ";") {
        return Err(format!("ExecStart= holds a command separator: {value:?}"));
    }
    let (cmd, args) = w.split_first().ok_or("empty ExecStart=")?;
    if name == "citadel-netns.service" {
        // Issue 12, item 1: fixed `ip netns` commands; nothing configured.
        let line = w.join(" ");
        return match line.as_str() {
            "/bin/ip netns add citadel" | "/bin/ip -n citadel link set lo up" => Ok(()),
            _ => Err(format!("citadel-netns.service runs {line:?}")),
        };
    }
    if cmd.starts_with(['-', '@', ':', '+', '!']) {
        return Err(format!("ExecStart= command has a prefix: {cmd:?}"));
    }
    let (bin, want_args): (&str, Vec<String>) = match name {
        "citadel-model@.service" => (
            "citadel-model",
            vec!["--config".into(), config(s), "run".into(), "{%i}".into()],
        ),
        "citadel-gateway.service" => ("citadel-gateway", vec!["--config".into(), config(s)]),
        _ => (
            "citadel-systemd",
            vec!["report-failure".into(), "{%i}.service".into()],
        ),
    };
    let want_cmd = s.paths.bin().join(bin);
    if Some(unspecifier(cmd)?.as_str()) != want_cmd.to_str() {
        return Err(format!(
            "ExecStart= runs {cmd:?}, meant {}",
            want_cmd.display()
        ));
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| unspecifier(a).and_then(|a| undollar(&a)))
        .collect::<Result<_, _>>()?;
    if args != want_args {
        return Err(format!(
            "ExecStart= arguments {args:?}, meant {want_args:?}"
        ));
    }
    Ok(())
}

fn config(s: &Settings) -> String {
    s.paths
        .config_dir()
        .join("citadel.toml")
        .to_string_lossy()
        .into_owned()
}

fn check_tmpfiles(h: &Hostile, text: &str) -> Result<(), String> {
    let (entries, comments) = table_lines(text);
    let s = h.apply();
    let p = &s.paths;
    let (u, g) = (h.user.as_str(), h.group.as_str());
    let want: Vec<(PathBuf, &str, &str, &str)> = vec![
        (p.home.clone(), "0755", "root", "root"),
        (p.bin(), "0755", "root", "root"),
        (p.config_dir(), "0755", "root", g),
        (p.systemd_dir(), "0755", "root", g),
        (p.models.clone(), "0750", "root", g),
        (p.credentials.clone(), "0700", "root", "root"),
        (PathBuf::from("/var/lib/citadel"), "0750", u, g),
        (PathBuf::from("/var/cache/citadel"), "0750", u, g),
    ];
    let want_fields: Vec<Vec<String>> = want
        .iter()
        .map(|(path, mode, o, gr)| {
            vec![
                "d".into(),
                path.to_string_lossy().into_owned(),
                mode.to_string(),
                o.to_string(),
                gr.to_string(),
                "-".into(),
            ]
        })
        .collect();
    // tmpfiles.d(5) says fields may hold C escapes, but systemd 252 reads them
    // with EXTRACT_UNQUOTE alone (`systemd-tmpfiles --root` made `\x01` into
    // `x01`): the line must read the same both ways. Specifiers in the path.
    let mut got = Vec::new();
    for e in &entries {
        let mut f = words(e, UNQUOTE)?;
        if f != words(e, UNQUOTE_CUNESCAPE)? {
            return Err(format!("tmpfiles line {e:?} depends on C escape decoding"));
        }
        if f.len() != 6 {
            return Err(format!("tmpfiles line {e:?} has {} fields", f.len()));
        }
        f[1] = unspecifier(&f[1])?;
        got.push(f);
    }
    is_subsequence(&got, &want_fields)?;
    let left_out = comments.iter().filter(|c| c.contains("left out")).count();
    if got.len() + left_out != want.len() {
        return Err(format!(
            "{} lines, {left_out} left out, {} meant",
            got.len(),
            want.len()
        ));
    }
    for (w, (path, _, o, gr)) in want_fields.iter().zip(&want) {
        let path = path.to_string_lossy();
        let ok_name = |n: &str| n == "root" || sysusers_name_ok(n);
        let writable = path.starts_with('/') && !has_line_break(&path) && ok_name(o) && ok_name(gr);
        if writable && !got.contains(w) {
            return Err(format!("writable tmpfiles line {w:?} was left out"));
        }
    }
    Ok(())
}

fn check_sysusers(h: &Hostile, text: &str) -> Result<(), String> {
    let (entries, comments) = table_lines(text);
    // sysusers.c: extract_many_words(EXTRACT_UNQUOTE); specifiers in the names.
    let mut got = Vec::new();
    for e in &entries {
        if words(e, UNQUOTE)? != words(e, UNQUOTE_CUNESCAPE)? {
            return Err(format!("sysusers line {e:?} depends on C escape decoding"));
        }
        let f: Vec<String> = words(e, UNQUOTE)?
            .iter()
            .map(|w| unspecifier(w))
            .collect::<Result<_, _>>()?;
        got.push(f);
    }
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let group_col = format!("-:{}", h.group);
    let want = vec![
        v(&["g", &h.group, "-"]),
        v(&[
            "u",
            &h.user,
            &group_col,
            "Citadel LLM services",
            "/var/lib/citadel",
            "-",
        ]),
    ];
    is_subsequence(&got, &want)?;
    let left_out = comments.iter().filter(|c| c.contains("left out")).count();
    if got.len() + left_out != 2 {
        return Err(format!(
            "{} sysusers lines and {left_out} left out",
            got.len()
        ));
    }
    if sysusers_name_ok(&h.group) && !got.contains(&want[0]) {
        return Err("valid group line left out".into());
    }
    if sysusers_name_ok(&h.user) && sysusers_name_ok(&h.group) && !got.contains(&want[1]) {
        return Err("valid user line left out".into());
    }
    Ok(())
}

/// The normal stack, as `citadel.example.toml` would give it.
fn benign_hostile() -> Hostile {
    Hostile {
        source: "/opt/citadel/config/citadel.toml".into(),
        home: "/opt/citadel".into(),
        models: "/opt/citadel/models".into(),
        credentials_dir: "/etc/citadel/credentials".into(),
        api_keys_file: "/etc/citadel/credentials/api-keys".into(),
        user: "citadel".into(),
        group: "citadel".into(),
        env: vec![],
        credentials: vec![],
    }
}

fn all_lines(r: &Rendered) -> Vec<String> {
    r.files
        .iter()
        .flat_map(|f| systemd_syntax::physical_lines(&f.contents))
        .collect()
}

#[test]
fn issue9_unit_file_injection_parse_back_of_the_normal_stack() {
    check(&benign_hostile()).unwrap();
}

#[test]
fn issue9_unit_file_injection_credential_newline_never_becomes_a_directive() {
    let mut h = benign_hostile();
    h.credentials = vec![("t".into(), "/etc/x\nExecStartPre=/bin/sh -c id".into())];
    let rendered = render(&h.apply());
    for line in all_lines(&rendered) {
        assert!(
            !line.trim_start().starts_with("ExecStartPre") && !line.trim_start().starts_with("+"),
            "injected line: {line:?}"
        );
    }
    let drop_in = rendered
        .file("citadel-model@m.service.d/50-citadel.conf")
        .unwrap();
    let parsed = parse_unit(&drop_in.contents).unwrap();
    assert!(parsed
        .directives
        .iter()
        .all(|d| d.key != "ExecStartPre" && d.key != "LoadCredential"));
    assert!(
        drop_in
            .contents
            .contains("# LoadCredential= was left out: the configured value contains a line break"),
        "{}",
        drop_in.contents
    );
    check(&h).unwrap();
}

#[test]
fn issue9_unit_file_injection_models_path_with_space_stays_one_path() {
    let mut h = benign_hostile();
    h.models = "/srv/my models".into();
    let rendered = render(&h.apply());
    let drop_in = &rendered
        .file("citadel-model@m.service.d/50-citadel.conf")
        .unwrap()
        .contents;
    let parsed = parse_unit(drop_in).unwrap();
    let rw: Vec<_> = parsed
        .directives
        .iter()
        .filter(|d| d.key == "ReadWritePaths")
        .collect();
    assert_eq!(rw.len(), 1);
    assert_eq!(
        words(&rw[0].value, UNQUOTE).unwrap(),
        ["-/srv/my models/ollama"]
    );
    let tmpfiles = &rendered.file("tmpfiles.d/citadel.conf").unwrap().contents;
    let (entries, _) = table_lines(tmpfiles);
    let models_line: Vec<Vec<String>> = entries
        .iter()
        .map(|e| words(e, UNQUOTE).unwrap())
        .filter(|w| w.get(1).is_some_and(|p| p.starts_with("/srv/")))
        .collect();
    assert_eq!(
        models_line,
        [["d", "/srv/my models", "0750", "root", "citadel", "-"]]
    );
    check(&h).unwrap();
}

#[test]
fn issue9_unit_file_injection_percent_is_not_a_specifier() {
    let mut h = benign_hostile();
    h.home = "/srv/50%t".into();
    h.models = "/srv/%h".into();
    h.env = vec![("PCT".into(), "90% of $HOME and %i".into())];
    h.credentials = vec![("tok".into(), "/etc/%n".into())];
    let rendered = render(&h.apply());
    let tmpfiles = &rendered.file("tmpfiles.d/citadel.conf").unwrap().contents;
    let (entries, _) = table_lines(tmpfiles);
    let first = words(&entries[0], UNQUOTE).unwrap();
    assert_eq!(unspecifier(&first[1]).unwrap(), "/srv/50%t");
    let drop_in = &rendered
        .file("citadel-model@m.service.d/50-citadel.conf")
        .unwrap()
        .contents;
    assert!(
        drop_in.contains("Environment=\"PCT=90%% of $HOME and %%i\"\n"),
        "{drop_in}"
    );
    assert!(
        drop_in.contains("LoadCredential=tok:/etc/%%n\n"),
        "{drop_in}"
    );
    assert!(
        drop_in.contains("ReadWritePaths=-/srv/%%h/ollama\n"),
        "{drop_in}"
    );
    check(&h).unwrap();
}

#[test]
fn issue9_unit_file_injection_source_path_stays_in_the_header_comment() {
    let mut h = benign_hostile();
    h.source = "/x\n[Service]\nExecStartPre=+/bin/sh\\".into();
    check(&h).unwrap();
}

#[test]
fn issue9_unit_file_injection_invalid_service_account_fails_closed() {
    let mut h = benign_hostile();
    h.user = "citadel\nUser=root".into();
    h.group = String::new();
    let rendered = render(&h.apply());
    let gw = parse_unit(&rendered.file("citadel-gateway.service").unwrap().contents).unwrap();
    let users: Vec<_> = gw
        .directives
        .iter()
        .filter(|d| d.key == "User" || d.key == "Group")
        .collect();
    assert_eq!(users.len(), 2);
    assert!(
        users.iter().all(|d| d.value == INVALID_ACCOUNT),
        "{users:?}"
    );
    check(&h).unwrap();
}

#[test]
fn issue9_render_overflow_huge_stop_and_drain_timeouts_do_not_panic() {
    let mut s = benign_hostile().apply();
    s.models[0].stop_timeout = Timespan(Duration::MAX);
    s.models[0].watchdog = Timespan(Duration::MAX);
    s.gateway.drain_timeout = Timespan(Duration::from_secs(
        18_446_744_073_709_549_568 / 1000 * 1000,
    ));
    let rendered = render(&s);
    let drop_in = &rendered
        .file("citadel-model@m.service.d/50-citadel.conf")
        .unwrap()
        .contents;
    assert!(drop_in.contains("TimeoutStopSec=infinity\n"), "{drop_in}");
    let gw = &rendered.file("citadel-gateway.service").unwrap().contents;
    assert!(gw.contains("TimeoutStopSec=infinity\n"), "{gw}");
    // Just below the limit, the sum is rendered as a span.
    s.models[0].stop_timeout = Timespan::from_secs(60);
    let drop_in = render(&s)
        .files
        .into_iter()
        .find(|f| f.path.ends_with("50-citadel.conf"))
        .unwrap();
    assert!(
        drop_in.contents.contains("TimeoutStopSec=1min 15s\n"),
        "{}",
        drop_in.contents
    );
}

/// Issue 15: the instance drop-ins read back the way systemd reads them: one
/// relative directory without `:` (systemd's "with symlink") after the reset,
/// the instance's journal fields, the model's name in `CITADEL_SERVICE`.
#[test]
fn issue15_instance_dropins_parse_back() {
    let s = base_settings();
    let (_, _, mut surge) = s.instance("m").unwrap();
    surge.port = Port::new(11499).unwrap();
    let rendered = render(&s);
    let two = rendered
        .file("citadel-model@m:2.service.d/50-citadel.conf")
        .expect("instance 2's drop-in")
        .contents
        .clone();
    let surge_text = instance_dropin(&s, &Host::default(), &surge, "m:surge");
    for (text, instance, suffix) in [(two, "m:2", "2"), (surge_text, "m:surge", "surge")] {
        let parsed = parse_unit(&text).unwrap();
        let values = |key: &str, flags: Flags| -> Vec<String> {
            parsed
                .directives
                .iter()
                .filter(|d| d.section == "Service" && d.key == key)
                .map(|d| {
                    words(&d.value, flags)
                        .unwrap()
                        .iter()
                        .map(|w| unspecifier(w).unwrap())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        };
        for key in ["CacheDirectory", "StateDirectory"] {
            let dirs = values(key, UNQUOTE);
            assert_eq!(
                dirs,
                ["".to_owned(), format!("citadel/m/{suffix}")],
                "{key}"
            );
            assert!(dirs.iter().all(|d| !d.contains(':')), "{dirs:?}");
        }
        assert_eq!(
            values("LogExtraFields", UNQUOTE_CUNESCAPE),
            [
                "CITADEL_SERVICE=m".to_owned(),
                format!("CITADEL_INSTANCE={instance}"),
                "CITADEL_ENGINE=ollama".to_owned()
            ]
        );
        let syslog: Vec<&str> = parsed
            .directives
            .iter()
            .filter(|d| d.key == "SyslogIdentifier")
            .map(|d| d.value.as_str())
            .collect();
        assert_eq!(syslog, [format!("citadel-m-{suffix}")]);
    }
}

/// Characters that mean something to some systemd parser, and some that do not.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::sample::select(vec![
            '\n', '\r', '\0', '"', '\'', '\\', '%', '$', ' ', '\t', ';', ':', '/', '=', '#',
            '[', ']', '-', '+', '@', '!', '{', '}', 'i', 'é', '€', '\u{1}', '\u{7f}',
            '\u{85}', '\u{a0}', '\u{2028}', '\u{1F600}',
        ]),
        3 => prop::char::range('a', 'z'),
        1 => any::<char>(),
    ]
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 0..10).prop_map(|v| v.into_iter().collect())
}

/// Mostly absolute paths (the interesting case), sometimes anything.
fn hostile_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => hostile_string().prop_map(|s| format!("/{s}")),
        1 => hostile_string(),
    ]
}

fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just("citadel".to_owned()),
        1 => "[a-z_][a-z0-9_-]{0,8}",
        3 => hostile_string(),
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (
        (
            hostile_path(),
            hostile_path(),
            hostile_path(),
            hostile_path(),
            hostile_path(),
        ),
        (hostile_name(), hostile_name()),
        prop::collection::vec(
            (
                prop_oneof![2 => "[A-Z_][A-Z0-9_]{0,6}", 1 => hostile_string()],
                hostile_string(),
            ),
            0..4,
        ),
        prop::collection::vec(
            (
                prop_oneof![2 => "[a-z][a-z0-9-]{0,6}", 1 => hostile_string()],
                hostile_path(),
            ),
            0..4,
        ),
    )
        .prop_map(
            |((source, home, models, creds, keys), (user, group), env, credentials)| Hostile {
                source,
                home,
                models,
                credentials_dir: creds,
                api_keys_file: keys,
                user,
                group,
                env,
                credentials,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever strings the settings hold, systemd reads back exactly what
    /// they meant, or the directive was left out (and said so); never an
    /// extra directive, line or file.
    #[test]
    fn issue9_unit_file_injection_rendered_files_read_back_as_meant(h in hostile()) {
        if let Err(e) = check(&h) {
            return Err(TestCaseError::fail(format!("{e}\nsettings: {h:?}")));
        }
    }
}
