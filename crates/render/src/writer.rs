//! The one gate between configured strings and the text of generated files.
//!
//! Nothing reaches a unit, drop-in, sysusers.d or tmpfiles.d line except
//! through a typed value of this module, and [`UnitWriter::set`] takes only
//! such values ([`UnitValue`]). A plain `&'static str` is accepted too, since
//! it can only be the renderer's own text: a configured string lives in
//! [`Settings`](citadel_config::Settings) and never has a `'static` lifetime.
//!
//! Each type encodes for the parser systemd uses for its directive (checked
//! against `src/core/load-fragment.c`, `src/basic/extract-word.c`,
//! `src/shared/conf-parser.c`, systemd.syntax(7), systemd.exec(5),
//! systemd.service(5), tmpfiles.d(5) and sysusers.d(5)):
//!
//! | type | directives | how systemd reads it | encoding |
//! |---|---|---|---|
//! | [`Literal`] | `Description=`, `SyslogIdentifier=` | whole value, specifiers (`unit_full_printf`), no unquoting | `%` -> `%%` |
//! | [`Account`] | `User=`, `Group=`, sysusers.d and tmpfiles.d owners | specifiers, then `valid_user_group_name` | only names sysusers.d can create (`[A-Za-z_][A-Za-z0-9_-]{0,30}`, not `root`) |
//! | [`EnvAssignment`] | `Environment=`, `LogExtraFields=` | `extract_first_word(EXTRACT_UNQUOTE\|EXTRACT_CUNESCAPE)`, specifiers; `$` is **not** expanded | one `"KEY=VALUE"` word, C escapes, `%%` |
//! | [`ExecLine`] | `ExecStart=` | words as above; the command: prefixes `-@:+!`, `string_is_safe`; arguments: `$VAR`/`${VAR}` expanded at exec time | absolute command path, arguments `$` -> `$$`, `%%`, quoted |
//! | [`UnitPath`] | `ReadWritePaths=`, `DeviceAllow=` | `extract_first_word(EXTRACT_UNQUOTE)` (no C escapes), then `-`/`+` prefixes, specifiers | `"-/srv/my models"`: prefix inside the quotes, only `\\` and `\"` escaped |
//! | [`Credential`] | `LoadCredential=` | name: `extract_first_word(":", 0)` (backslash escapes, no quotes); path: the raw rest of the line | name `\`-escaped, path verbatim, both `%%`; the path must be absolute |
//! | [`ServiceDir`] | `CacheDirectory=`, `StateDirectory=` | `extract_first_word(EXTRACT_UNQUOTE)`, specifiers, then a relative normalized path; `a:b` means `a` with symlink `b` | components of `[A-Za-z0-9._-]` only (no `:`, `.`, `..`) |
//! | [`UnitNames`] | `Wants=`, `After=` | `extract_first_word(EXTRACT_RETAIN_ESCAPE)`, unit name specifiers | names from the unit name alphabet only |
//! | [`Token`] | numbers, sizes, spans, addresses | literal | only characters no parser treats specially |
//! | [`TableField`] | tmpfiles.d, sysusers.d columns | `extract_many_words(EXTRACT_UNQUOTE)` (tmpfiles.d(5) promises C escapes, systemd 252 does not decode them in the path), specifiers in the path | quoted when needed, only `\\` and `\"` escaped (read alike with or without C escapes), `%%` |
//!
//! Rules that hold for every line: a line ends at `\n`, `\r` or NUL (systemd's
//! `read_line`), so no value may contain one raw; a line ending in an
//! unescaped backslash continues on the next line; leading and trailing
//! whitespace of a value is stripped; and a specifier `%x` is expanded in
//! almost every directive. A value that cannot be written so that systemd
//! reads back exactly what the configuration meant is [`Unwritable`]: the
//! directive is left out and a comment says so, or, for `User=`/`Group=` where
//! leaving it out would mean root, a name systemd refuses is written so the
//! unit fails to load (fail closed). The configuration is validated before
//! rendering, so these paths exist for defence in depth.

use std::fmt::Write as _;
use std::path::Path;

/// systemd's `WHITESPACE`: separators of `extract_first_word` and what
/// `strstrip` removes from both ends of a value.
const SYSTEMD_WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];

/// Written for `User=`/`Group=` when the configured name cannot be the
/// service account: `valid_user_group_name()` refuses `:` and `/` in every
/// mode, so the unit fails to load instead of running as root or as someone else.
pub const INVALID_ACCOUNT: &str = "citadel:invalid/account";

/// Why a value cannot be written so that systemd reads exactly it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwritable {
    /// `\n`, `\r` or NUL: systemd ends the line there.
    LineBreak,
    /// Not valid UTF-8: systemd ignores the whole line.
    NotUtf8,
    /// Leading or trailing whitespace: systemd strips it.
    EdgeWhitespace,
    /// An unescaped trailing backslash joins the next line.
    TrailingBackslash,
    /// A relative path where systemd needs an absolute one.
    NotAbsolute,
    /// A name systemd or the tool reading the file would not accept.
    InvalidName,
}

impl Unwritable {
    pub fn reason(self) -> &'static str {
        match self {
            Unwritable::LineBreak => "the configured value contains a line break or NUL",
            Unwritable::NotUtf8 => "the configured value is not valid UTF-8",
            Unwritable::EdgeWhitespace => {
                "the configured value has leading or trailing whitespace, which systemd strips"
            }
            Unwritable::TrailingBackslash => {
                "the configured value ends in a backslash, which would continue the line"
            }
            Unwritable::NotAbsolute => "the configured path is not absolute",
            Unwritable::InvalidName => "the configured name is not valid here",
        }
    }
}

/// A value that may follow `KEY=` in a unit file. Implemented only by the
/// types of this module (and by `&'static str`, the renderer's own text).
pub trait UnitValue {
    /// The text after `=`, or why it cannot be written.
    fn encode(&self) -> Result<String, Unwritable>;
    /// What to write when [`UnitValue::encode`] fails, where leaving the
    /// directive out would be unsafe.
    fn fail_closed(&self) -> Option<&'static str> {
        None
    }
}

/// The renderer's own text, which may use specifiers on purpose (`%i`, `%N`).
impl UnitValue for &'static str {
    fn encode(&self) -> Result<String, Unwritable> {
        debug_assert!(
            !self.contains(['\n', '\r', '\0']) && !ends_continued(self),
            "fixed value {self:?} must be one line"
        );
        Ok((*self).to_owned())
    }
}

/// Text of a typed value (number, size, span, address) that no parser treats
/// specially: ASCII letters, digits, spaces and `._:/,+@=[]-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(text: impl Into<String>) -> Token {
        Token(text.into())
    }

    /// `800%` for `CPUQuota=`, which systemd parses without specifiers.
    pub fn percent(value: u64) -> Token {
        Token(format!("{value}%"))
    }
}

impl UnitValue for Token {
    fn encode(&self) -> Result<String, Unwritable> {
        let body = self.0.strip_suffix('%').unwrap_or(&self.0);
        let ok = |c: char| c.is_ascii_alphanumeric() || " ._:/,+@=[]-".contains(c);
        if self.0.is_empty() || !body.chars().all(ok) || self.0.trim() != self.0 {
            debug_assert!(false, "token {:?} has special characters", self.0);
            return Err(Unwritable::InvalidName);
        }
        Ok(self.0.clone())
    }
}

/// A whole value read verbatim after specifier expansion (`Description=`,
/// `SyslogIdentifier=`): systemd does no unquoting here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal(String);

impl Literal {
    pub fn new(text: impl Into<String>) -> Literal {
        Literal(text.into())
    }
}

impl UnitValue for Literal {
    fn encode(&self) -> Result<String, Unwritable> {
        literal(&self.0).map(|s| escape_specifiers(&s))
    }
}

/// A user or group name. Citadel creates its account with sysusers.d, which
/// accepts only `[A-Za-z_][A-Za-z0-9_-]{0,30}`; such a name needs no quoting or
/// escaping in any file. Anything else (and `root`) is refused: `User=` and
/// `Group=` then get [`INVALID_ACCOUNT`], because leaving them out runs the
/// service as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account(String);

impl Account {
    pub fn new(name: impl Into<String>) -> Account {
        Account(name.into())
    }

    pub fn is_valid(name: &str) -> bool {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        first_ok
            && name.len() <= 31
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && name != "root"
    }
}

impl UnitValue for Account {
    fn encode(&self) -> Result<String, Unwritable> {
        if Account::is_valid(&self.0) {
            Ok(self.0.clone())
        } else {
            Err(Unwritable::InvalidName)
        }
    }

    fn fail_closed(&self) -> Option<&'static str> {
        Some(INVALID_ACCOUNT)
    }
}

/// `KEY=VALUE` for `Environment=` (and `LogExtraFields=`): one word, quoted
/// when needed, C escapes for control characters, `%` doubled. systemd does
/// not expand `$` here, so `$` is written as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvAssignment {
    key: String,
    value: String,
}

impl EnvAssignment {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> EnvAssignment {
        EnvAssignment {
            key: key.into(),
            value: value.into(),
        }
    }

    /// systemd's `env_name_is_valid`, which `Environment=` enforces.
    /// (`LogExtraFields=` field names are a subset: upper case, digits, `_`.)
    fn key_is_valid(key: &str) -> bool {
        let mut chars = key.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }
}

impl UnitValue for EnvAssignment {
    fn encode(&self) -> Result<String, Unwritable> {
        if !EnvAssignment::key_is_valid(&self.key) {
            return Err(Unwritable::InvalidName);
        }
        let text = format!("{}={}", self.key, self.value);
        quote_word(&escape_specifiers(&text), Escapes::C)
    }
}

/// An absolute path for an executable, as the first word of `ExecStart=`.
/// systemd strips the prefixes `-@:+!` from this word and refuses control
/// characters, quotes and backslashes in it; the path is not subject to `$`
/// expansion, only to specifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecPath(Result<String, Unwritable>);

impl ExecPath {
    pub fn new(path: &Path) -> ExecPath {
        ExecPath(path_text(path).and_then(|p| {
            if !p.starts_with('/') {
                return Err(Unwritable::NotAbsolute);
            }
            // string_is_safe(): refused by systemd anyway; refuse here too.
            if p.chars()
                .any(|c| c.is_ascii_control() || "\"'\\".contains(c))
            {
                return Err(if p.contains(['\n', '\r', '\0']) {
                    Unwritable::LineBreak
                } else {
                    Unwritable::InvalidName
                });
            }
            quote_word(&escape_specifiers(p), Escapes::C)
        }))
    }
}

/// One argument of `ExecStart=`: `$` doubled (systemd expands `$VAR` and
/// `${VAR}` in arguments), `%` doubled, quoted when needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecArg(Result<String, Unwritable>);

impl ExecArg {
    pub fn new(arg: &str) -> ExecArg {
        ExecArg(quote_word(
            &escape_specifiers(&arg.replace('$', "$$")),
            Escapes::C,
        ))
    }

    pub fn path(path: &Path) -> ExecArg {
        match path_text(path) {
            Ok(p) => ExecArg::new(p),
            Err(e) => ExecArg(Err(e)),
        }
    }

    /// The renderer's own word, which may be a specifier on purpose (`%i`).
    pub fn fixed(word: &'static str) -> ExecArg {
        debug_assert!(
            !word.is_empty()
                && !word.contains(|c: char| c.is_whitespace() || "\"'\\;$".contains(c))
        );
        ExecArg(Ok(word.to_owned()))
    }
}

/// A whole `ExecStart=` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecLine {
    path: ExecPath,
    args: Vec<ExecArg>,
}

impl ExecLine {
    pub fn new(path: ExecPath) -> ExecLine {
        ExecLine {
            path,
            args: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: ExecArg) -> ExecLine {
        self.args.push(arg);
        self
    }
}

impl UnitValue for ExecLine {
    fn encode(&self) -> Result<String, Unwritable> {
        let mut out = self.path.0.clone()?;
        for a in &self.args {
            out.push(' ');
            out.push_str(a.0.as_ref().map_err(|e| *e)?);
        }
        Ok(out)
    }
}

/// A path in a space-separated list read with `EXTRACT_UNQUOTE` and no C
/// escapes (`ReadWritePaths=`, `DeviceAllow=`), with an optional prefix such
/// as `-` (ignore if missing). The prefix goes inside the quotes: systemd
/// strips it after unquoting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitPath {
    prefix: &'static str,
    path: Result<String, Unwritable>,
    suffix: &'static str,
}

impl UnitPath {
    pub fn new(prefix: &'static str, path: &Path) -> UnitPath {
        UnitPath {
            prefix,
            path: path_text(path).map(str::to_owned),
            suffix: "",
        }
    }

    /// A `DeviceAllow=` rule: the device path, then its access (`rw`).
    pub fn device(path: &Path, access: &'static str) -> UnitPath {
        UnitPath {
            prefix: "",
            path: path_text(path).map(str::to_owned),
            suffix: access,
        }
    }
}

impl UnitValue for UnitPath {
    fn encode(&self) -> Result<String, Unwritable> {
        let path = self.path.clone()?;
        if !path.starts_with('/') {
            return Err(Unwritable::NotAbsolute);
        }
        let word = quote_word(
            &format!("{}{}", self.prefix, escape_specifiers(&path)),
            Escapes::QuotesOnly,
        )?;
        Ok(if self.suffix.is_empty() {
            word
        } else {
            format!("{word} {}", self.suffix)
        })
    }
}

/// `LoadCredential=NAME:PATH`. systemd splits off the name with
/// `extract_first_word(":", EXTRACT_DONT_COALESCE_SEPARATORS)` (a backslash
/// escapes the next character, quotes are literal) and takes the rest of the
/// line verbatim as the path; both get specifiers. The path must be absolute:
/// a relative one would name a credential to inherit instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    name: String,
    path: Result<String, Unwritable>,
}

impl Credential {
    pub fn new(name: &str, path: &Path) -> Credential {
        Credential {
            name: name.to_owned(),
            path: path_text(path).map(str::to_owned),
        }
    }
}

impl UnitValue for Credential {
    fn encode(&self) -> Result<String, Unwritable> {
        let path = self.path.clone()?;
        if !path.starts_with('/') {
            return Err(Unwritable::NotAbsolute);
        }
        let path = literal(&path)?;
        if self.name.contains(['\n', '\r', '\0']) {
            return Err(Unwritable::LineBreak);
        }
        if self.name.is_empty() || self.name.starts_with(SYSTEMD_WHITESPACE) {
            return Err(Unwritable::InvalidName);
        }
        let mut name = String::new();
        for c in escape_specifiers(&self.name).chars() {
            if c == '\\' || c == ':' {
                name.push('\\');
            }
            name.push(c);
        }
        Ok(format!("{name}:{}", escape_specifiers(&path)))
    }
}

/// Unit names for `Wants=`/`After=` (read with `EXTRACT_RETAIN_ESCAPE`, no
/// unquoting): a name outside the unit name alphabet is left out of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitNames(Vec<String>);

impl UnitNames {
    pub fn new(names: impl IntoIterator<Item = String>) -> UnitNames {
        UnitNames(names.into_iter().collect())
    }
}

impl UnitValue for UnitNames {
    fn encode(&self) -> Result<String, Unwritable> {
        let ok = |n: &String| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.@:-".contains(c))
        };
        let names: Vec<&str> = self
            .0
            .iter()
            .filter(|n| ok(n))
            .map(String::as_str)
            .collect();
        if names.is_empty() {
            return Err(Unwritable::InvalidName);
        }
        Ok(names.join(" "))
    }
}

/// A directory below `/var/cache` or `/var/lib` for `CacheDirectory=` and
/// `StateDirectory=` (issue 15): a relative path of components made of
/// `[A-Za-z0-9._-]`, none `.` or `..`. Such a path needs no quoting or
/// escaping; `:` is refused, since systemd reads `a:b` as directory `a` with a
/// symlink `b` (an instance name `phi3:2` must become `phi3/2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDir(String);

impl ServiceDir {
    pub fn new(components: &[&str]) -> ServiceDir {
        ServiceDir(components.join("/"))
    }
}

impl UnitValue for ServiceDir {
    fn encode(&self) -> Result<String, Unwritable> {
        let component_ok = |c: &str| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|x| x.is_ascii_alphanumeric() || "._-".contains(x))
        };
        if self.0.split('/').all(component_ok) {
            Ok(self.0.clone())
        } else {
            Err(Unwritable::InvalidName)
        }
    }
}

/// A column of a tmpfiles.d or sysusers.d line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableField {
    /// The renderer's own text (`d`, `0750`, `-`, `"Citadel LLM services"`).
    Fixed(&'static str),
    /// An absolute path: quoted when needed, `%` doubled (specifiers expand in
    /// tmpfiles.d paths), only `\` and `"` escaped: a line break cannot be
    /// written (tmpfiles.d has no continuation lines).
    Path(Result<String, Unwritable>),
    /// A user or group name ([`Account`] rules).
    Account(String),
    /// `-:GROUP`, sysusers.d's ID column naming the primary group.
    AutoIdWithGroup(String),
}

impl TableField {
    pub fn path(path: &Path) -> TableField {
        TableField::Path(path_text(path).map(str::to_owned))
    }

    fn encode(&self) -> Result<String, Unwritable> {
        match self {
            TableField::Fixed(s) => Ok((*s).to_owned()),
            TableField::Path(p) => {
                let p = p.clone()?;
                if !p.starts_with('/') {
                    return Err(Unwritable::NotAbsolute);
                }
                // systemd 252's tmpfiles reads this column with EXTRACT_UNQUOTE
                // alone (measured: `\x01` became `x01`); tmpfiles.d(5) speaks of C
                // escapes. Only `\\` and `\"` read the same either way.
                quote_word(&escape_specifiers(&p), Escapes::QuotesOnly)
            }
            TableField::Account(name) => Account::new(name.clone()).encode(),
            TableField::AutoIdWithGroup(group) => Account::new(group.clone())
                .encode()
                .map(|g| format!("-:{g}")),
        }
    }
}

/// Writes a tmpfiles.d or sysusers.d line, or a comment saying why it was left out.
pub fn table_line(out: &mut String, fields: &[TableField]) {
    let encoded: Result<Vec<String>, Unwritable> = fields.iter().map(TableField::encode).collect();
    match encoded {
        Ok(words) => {
            let line = words.join(" ");
            if line_is_safe(&line) {
                let _ = writeln!(out, "{line}");
            } else {
                debug_assert!(false, "table line {line:?} is not one line");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "# A line was left out: {}.", e.reason());
        }
    }
}

/// Writer for systemd's ini-like files.
pub struct UnitWriter {
    out: String,
}

impl UnitWriter {
    pub fn new(header: &str) -> UnitWriter {
        debug_assert!(header.lines().all(|l| l.starts_with('#')));
        UnitWriter {
            out: header.to_owned(),
        }
    }

    pub fn section(&mut self, name: &'static str) -> &mut Self {
        debug_assert!(is_directive_name(name), "section {name:?}");
        if !self.out.is_empty() && !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
        let _ = writeln!(self.out, "[{name}]");
        self
    }

    /// A comment; each line of `text` becomes one `# ` line, whatever the text holds.
    pub fn comment(&mut self, text: &str) -> &mut Self {
        for line in text.lines() {
            let _ = writeln!(self.out, "# {}", comment_text(line));
        }
        self
    }

    /// `KEY=VALUE`. The key must be a plain directive name and the encoded value
    /// one line; otherwise nothing is written (and debug builds panic). A value
    /// that cannot be written exactly is left out with a comment saying why,
    /// or replaced by its fail-closed value.
    pub fn set(&mut self, key: &'static str, value: impl UnitValue) -> &mut Self {
        if !is_directive_name(key) {
            debug_assert!(false, "{key:?} is not a directive name");
            return self;
        }
        match value.encode() {
            Ok(text) => {
                if line_is_safe(&text) && text.trim_matches(SYSTEMD_WHITESPACE) == text {
                    let _ = writeln!(self.out, "{key}={text}");
                } else {
                    debug_assert!(false, "{key}= value {text:?} is not exactly one line");
                    let _ = writeln!(
                        self.out,
                        "# {key}= was left out: its value is not one line."
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(self.out, "# {key}= was left out: {}.", e.reason());
                if let Some(v) = value.fail_closed() {
                    let _ = writeln!(
                        self.out,
                        "# systemd refuses the following value, so the unit does not start."
                    );
                    let _ = writeln!(self.out, "{key}={v}");
                }
            }
        }
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Text for a comment line: backslashes doubled (so a comment never ends in a
/// continuation), control characters written as escapes (so it stays one line).
pub fn comment_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `%` -> `%%`: systemd expands specifiers (`%i`, `%t`, ...) in nearly every
/// directive and in tmpfiles.d/sysusers.d paths and names; `%%` is a literal `%`.
fn escape_specifiers(text: &str) -> String {
    text.replace('%', "%%")
}

fn path_text(path: &Path) -> Result<&str, Unwritable> {
    path.to_str().ok_or(Unwritable::NotUtf8)
}

/// A value that systemd takes verbatim (no unquoting): it must be one line,
/// without edge whitespace and without a trailing unescaped backslash.
fn literal(text: &str) -> Result<String, Unwritable> {
    if text.contains(['\n', '\r', '\0']) {
        return Err(Unwritable::LineBreak);
    }
    if text.trim_matches(SYSTEMD_WHITESPACE) != text {
        return Err(Unwritable::EdgeWhitespace);
    }
    if ends_continued(text) {
        return Err(Unwritable::TrailingBackslash);
    }
    Ok(text.to_owned())
}

/// Which escapes the reading side decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escapes {
    /// `EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE`: C escapes such as `\n`, `\x01`.
    C,
    /// `EXTRACT_UNQUOTE` alone: a backslash takes the next character literally.
    QuotesOnly,
}

/// One word for `extract_first_word`: bare when it has nothing special,
/// otherwise wrapped in double quotes from its first character to its last
/// (systemd.syntax(7): a quote opens only at the start of a word), with `\`
/// and `"` escaped and, where C escapes are decoded, control characters too.
fn quote_word(word: &str, escapes: Escapes) -> Result<String, Unwritable> {
    if word.contains('\0') {
        return Err(Unwritable::LineBreak);
    }
    if escapes == Escapes::QuotesOnly && word.contains(['\n', '\r']) {
        return Err(Unwritable::LineBreak);
    }
    let special = |c: char| c.is_whitespace() || c.is_control() || "\"'\\;".contains(c);
    if !word.is_empty() && !word.contains(special) {
        return Ok(word.to_owned());
    }
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c if escapes == Escapes::C && c.is_ascii_control() => match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
            },
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// Whether systemd would join the line after this one: an odd run of
/// trailing backslashes.
fn ends_continued(text: &str) -> bool {
    text.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

fn line_is_safe(text: &str) -> bool {
    !text.contains(['\n', '\r', '\0']) && !ends_continued(text)
}

fn is_directive_name(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic())
        && key.chars().all(|c| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let exec = |p: &str| ExecLine::new(ExecPath::new(Path::new(p))).encode();
        assert_eq!(exec("/opt/citadel/bin/x").unwrap(), "/opt/citadel/bin/x");
        assert_eq!(exec("/opt/my dir/x").unwrap(), "\"/opt/my dir/x\"");
        assert_eq!(exec("/opt/50%/x").unwrap(), "/opt/50%%/x");
        assert_eq!(
            exec("/opt/$HOME/x").unwrap(),
            "/opt/$HOME/x",
            "the command is not $-expanded"
        );
        assert_eq!(exec("relative/x"), Err(Unwritable::NotAbsolute));
        assert_eq!(exec("+/usr/bin/x"), Err(Unwritable::NotAbsolute));
        assert_eq!(ExecArg::new("a b").0.unwrap(), "\"a b\"");
        assert_eq!(ExecArg::new("50%").0.unwrap(), "50%%");
        assert_eq!(ExecArg::new("$HOME").0.unwrap(), "$$HOME");
        assert_eq!(ExecArg::new(";").0.unwrap(), "\";\"");
        assert_eq!(ExecArg::new("").0.unwrap(), "\"\"");
        assert_eq!(
            EnvAssignment::new("A", "b c").encode().unwrap(),
            "\"A=b c\""
        );
        assert_eq!(
            EnvAssignment::new("A", "say \"hi\"").encode().unwrap(),
            "\"A=say \\\"hi\\\"\""
        );
        assert_eq!(
            EnvAssignment::new("PCT", "90%").encode().unwrap(),
            "PCT=90%%"
        );
        assert_eq!(EnvAssignment::new("D", "$X").encode().unwrap(), "D=$X");
        assert_eq!(
            EnvAssignment::new("NL", "a\nb\u{1}").encode().unwrap(),
            "\"NL=a\\nb\\x01\""
        );
        assert_eq!(
            EnvAssignment::new("A=B", "c").encode(),
            Err(Unwritable::InvalidName)
        );
        assert_eq!(
            EnvAssignment::new("Z", "a\0").encode(),
            Err(Unwritable::LineBreak)
        );
    }

    #[test]
    fn paths_and_credentials() {
        let rw = |p: &str| UnitPath::new("-", Path::new(p)).encode();
        assert_eq!(rw("/srv/models/ollama").unwrap(), "-/srv/models/ollama");
        assert_eq!(
            rw("/srv/my models/ollama").unwrap(),
            "\"-/srv/my models/ollama\""
        );
        assert_eq!(rw("/srv/a\\b\"c").unwrap(), "\"-/srv/a\\\\b\\\"c\"");
        assert_eq!(rw("/srv/%t").unwrap(), "-/srv/%%t");
        assert_eq!(rw("/srv/a\nb"), Err(Unwritable::LineBreak));
        assert_eq!(rw("srv"), Err(Unwritable::NotAbsolute));
        let cred = |n: &str, p: &str| Credential::new(n, Path::new(p)).encode();
        assert_eq!(cred("hf-token", "/etc/x").unwrap(), "hf-token:/etc/x");
        assert_eq!(cred("t", "/etc/my x:y%").unwrap(), "t:/etc/my x:y%%");
        assert_eq!(cred("a\\b:c", "/x").unwrap(), "a\\\\b\\:c:/x");
        assert_eq!(
            cred("t", "/etc/x\nExecStartPre=/bin/sh -c id"),
            Err(Unwritable::LineBreak)
        );
        assert_eq!(cred("t", "/etc/x "), Err(Unwritable::EdgeWhitespace));
        assert_eq!(cred("t", "/etc/x\\"), Err(Unwritable::TrailingBackslash));
        assert_eq!(cred("t", "x"), Err(Unwritable::NotAbsolute));
        assert_eq!(cred("t", ""), Err(Unwritable::NotAbsolute));
    }

    #[test]
    fn accounts_and_literals() {
        assert!(Account::is_valid("citadel"));
        for bad in [
            "",
            "root",
            "0",
            "a b",
            "a%b",
            "a\nb",
            "-x",
            "a:b",
            &"x".repeat(32),
        ] {
            assert!(!Account::is_valid(bad), "{bad:?}");
        }
        assert_eq!(Literal::new("50% of x").encode().unwrap(), "50%% of x");
        assert_eq!(Literal::new(" x").encode(), Err(Unwritable::EdgeWhitespace));
        assert_eq!(
            Literal::new("x\\").encode(),
            Err(Unwritable::TrailingBackslash)
        );
        assert_eq!(Literal::new("x\\\\").encode().unwrap(), "x\\\\");
    }

    /// Issue 15: an instance's cache and state directories are plain relative
    /// paths; `:` (systemd's "with symlink"), `%`, quotes, `..` are refused.
    #[test]
    fn issue15_service_dirs_refuse_colon_and_dot_dot() {
        assert_eq!(
            ServiceDir::new(&["citadel", "phi3", "2"]).encode().unwrap(),
            "citadel/phi3/2"
        );
        assert_eq!(
            ServiceDir::new(&["citadel", "m-1_x.y", "surge"])
                .encode()
                .unwrap(),
            "citadel/m-1_x.y/surge"
        );
        for bad in [
            &["citadel", "phi3:2"][..],
            &["citadel", ".."],
            &["citadel", "."],
            &["citadel", ""],
            &["/citadel"],
            &["citadel", "a b"],
            &["citadel", "50%i"],
            &["citadel", "a\nb"],
        ] {
            assert_eq!(
                ServiceDir::new(bad).encode(),
                Err(Unwritable::InvalidName),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn writer_never_splits_a_line() {
        let mut w = UnitWriter::new("# h\n");
        w.section("Service")
            .comment("model a\nExecStartPre=/bin/sh\r\\")
            .set("User", Account::new("x\ny"))
            .set(
                "Environment",
                EnvAssignment::new("A", "1\nExecStartPre=/bin/sh"),
            );
        let out = w.finish();
        assert!(
            out.lines().all(|l| l.is_empty()
                || l.starts_with(['#', '['])
                || l.starts_with("User=")
                || l.starts_with("Environment=")),
            "{out}"
        );
        assert!(out.contains(&format!("User={INVALID_ACCOUNT}\n")), "{out}");
        assert_eq!(comment_text("a\\"), "a\\\\");
    }
}
