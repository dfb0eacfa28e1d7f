//! Tidy: ARCHITECTURE.md's rules, checked mechanically over the source tree
//! (as rust-analyzer's `xtask/src/tidy.rs`).
//!
//! Each rule is one `#[test]`, so `cargo test --workspace` (and with it
//! `scripts/test-all.sh`, what CI runs) enforces them. A failing rule lists
//! every violation as `path:line: reason`. Run just these with
//! `cargo test -p xtask tidy -- --nocapture` (the notes printed with
//! `--nocapture` include what the FIXME allowlists below still let through).
//!
//! The scanner reads Rust source after blanking comments and string literals,
//! so a rule's patterns mentioned in docs or messages (like here) never count,
//! and it skips test code: the item after `#[cfg(test)]`, `#[test]` or
//! `#[tokio::test]` (a `mod tests { .. }` block, a test function).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

// --- FIXME allowlists -------------------------------------------------------
//
// Files that still break a rule when the rule was introduced (issue 9). They
// are exempt from that rule only; every other file is held to it. Fix the file,
// then delete its line here: an entry whose file no longer breaks the rule
// makes tidy fail, so these lists only shrink. Do not add to them.

/// FIXME(issue 9): `.unwrap()`/`.expect(` outside tests without a
/// `// tidy: <why it cannot fail>` justification.
const UNWRAP_FIXME: &[&str] = &[];

/// FIXME(issue 9): modules that do not start with a `//!` doc comment.
const MODULE_DOC_FIXME: &[&str] = &[];

// --- Permanent exceptions ---------------------------------------------------

/// The only file that speaks D-Bus (ARCHITECTURE.md, `crates/cli`).
const DBUS_FILE: &str = "crates/cli/src/systemd.rs";

/// Functions of `crates/config` and `crates/render` allowed to do I/O or read
/// the environment: (file, fn, why).
const IO_ALLOWED: &[(&str, &str, &str)] = &[
    (
        "crates/config/src/lib.rs",
        "load",
        "the one entry point that reads the config file; parsing and validation after it are pure",
    ),
    (
        "crates/config/src/host.rs",
        "detect",
        "reads the host's facts once for the binary; validation receives them as `HostFacts` and reads nothing",
    ),
];

/// What counts as I/O, environment or other global state in the pure crates.
/// Each is matched as a token (not preceded by an identifier character) in
/// code, outside comments, strings and tests.
const IO_PATTERNS: &[(&str, &str)] = &[
    ("fs::", "file system access"),
    ("File::", "file system access"),
    ("OpenOptions", "file system access"),
    ("read_to_string", "reads a file or stream"),
    ("read_dir", "lists a directory"),
    ("env::", "reads the environment or the process's arguments"),
    ("var_os", "reads the environment"),
    ("process::", "spawns or controls processes"),
    ("Command::new", "spawns a process"),
    ("TcpStream", "network I/O"),
    ("TcpListener", "network I/O"),
    ("UdpSocket", "network I/O"),
    ("UnixStream", "socket I/O"),
    ("UnixListener", "socket I/O"),
    ("UnixDatagram", "socket I/O"),
    ("ToSocketAddrs", "name resolution"),
    ("tokio::", "async I/O runtime"),
    ("stdin(", "reads standard input"),
    ("stdout(", "writes standard output"),
    ("stderr(", "writes standard error"),
    ("println!", "writes standard output"),
    ("print!", "writes standard output"),
    ("eprintln!", "writes standard error"),
    ("eprint!", "writes standard error"),
    ("dbg!", "writes standard error"),
    (
        "SystemTime::now",
        "reads the clock (output would not be deterministic)",
    ),
    (
        "Instant::now",
        "reads the clock (output would not be deterministic)",
    ),
    ("rand::", "randomness (output would not be deterministic)"),
];

// --- Rules ------------------------------------------------------------------

/// ARCHITECTURE.md, `crates/cli`: only `systemd.rs` speaks D-Bus.
#[test]
fn only_systemd_rs_speaks_dbus() {
    let mut v = Violations::default();
    for file in sources(&["crates/*/src", "crates/*/tests", "xtask/src"]) {
        if file.rel == DBUS_FILE {
            continue;
        }
        for token in ["zbus", "zbus_systemd", "zbus_macros", "zvariant"] {
            for at in file.find_token(token, false) {
                v.add(
                    &file.rel,
                    file.line_of(at),
                    format!("uses `{token}`: only {DBUS_FILE} speaks D-Bus"),
                );
            }
        }
    }
    // And no other crate can reach for it: only the CLI depends on zbus.
    for manifest in manifests() {
        if manifest == "crates/cli/Cargo.toml" {
            continue;
        }
        let text = read(&manifest);
        for (i, line) in text.lines().enumerate() {
            let key = line.trim_start();
            if key.starts_with("zbus") || key.starts_with("zvariant") {
                v.add(
                    &manifest,
                    i + 1,
                    format!(
                        "depends on `{}`: only crates/cli (its systemd.rs) speaks D-Bus",
                        key.split(['=', '.', ' ']).next().unwrap_or(key)
                    ),
                );
            }
        }
    }
    v.check("only_systemd_rs_speaks_dbus", &[]);
}

/// ARCHITECTURE.md, `crates/config` ("nothing reads global state") and
/// `crates/render` ("a pure function of the settings"): no I/O, no
/// environment, no clock, outside the allowlisted entry points.
#[test]
fn render_and_config_do_no_io() {
    let mut v = Violations::default();
    let mut used = BTreeSet::new();
    for file in sources(&["crates/render/src", "crates/config/src"]) {
        for &(pattern, what) in IO_PATTERNS {
            for at in file.find_token(pattern, true) {
                let item = file.enclosing_fn(at);
                let allowed = IO_ALLOWED
                    .iter()
                    .position(|&(f, i, _)| f == file.rel && item.as_deref() == Some(i));
                if let Some(idx) = allowed {
                    used.insert(idx);
                    continue;
                }
                let place = item.map_or(String::new(), |i| format!(" in `fn {i}`"));
                v.add(
                    &file.rel,
                    file.line_of(at),
                    format!(
                        "`{pattern}`{place}: {what}; {} must do no I/O and read no environment \
                         (take what is needed as an argument, as `HostFacts`)",
                        crate_of(&file.rel)
                    ),
                );
            }
        }
    }
    for (idx, &(file, item, _)) in IO_ALLOWED.iter().enumerate() {
        if !used.contains(&idx) {
            v.add(
                "xtask/src/tidy.rs",
                0,
                format!(
                    "IO_ALLOWED lists `{item}` in {file}, which does no I/O any more: remove the entry"
                ),
            );
        }
    }
    v.check("render_and_config_do_no_io", &[]);
}

/// "Every module has a `//!` doc": each `.rs` file of the crates (sources and
/// tests, helper modules included) and of xtask starts with one.
#[test]
fn every_module_has_a_doc_comment() {
    let mut v = Violations::default();
    for file in sources(&["crates/*/src", "crates/*/tests", "xtask/src"]) {
        let first = file.text.lines().position(|l| !l.trim().is_empty());
        let ok = first.is_some_and(|i| file.text.lines().nth(i).unwrap_or("").starts_with("//!"));
        if !ok {
            v.add(
                &file.rel,
                first.map_or(1, |i| i + 1),
                "the module does not start with a `//!` doc comment saying what it is for"
                    .to_string(),
            );
        }
    }
    v.check("every_module_has_a_doc_comment", MODULE_DOC_FIXME);
}

/// "No `unwrap()`/`expect()` on input-derived values outside tests": outside
/// test code, every `.unwrap()` and `.expect(` in the crates' sources either
/// goes (handle the error) or carries a `// tidy: <why it cannot fail>`
/// comment on the same line or the line above.
#[test]
fn no_unwrap_or_expect_outside_tests() {
    let mut v = Violations::default();
    for file in sources(&["crates/*/src"]) {
        let lines: Vec<&str> = file.text.lines().collect();
        for (pattern, name) in [(".unwrap()", "unwrap()"), (".expect(", "expect()")] {
            for at in file.find(pattern) {
                if file.in_test(at) {
                    continue;
                }
                let line = file.line_of(at);
                let justified =
                    |n: usize| n >= 1 && lines.get(n - 1).is_some_and(|l| has_justification(l));
                if justified(line) || justified(line - 1) {
                    continue;
                }
                v.add(
                    &file.rel,
                    line,
                    format!(
                        "`{name}` outside tests: return or report the error, or say why it cannot \
                         fail with `// tidy: <reason>` on this line or the one above"
                    ),
                );
            }
        }
    }
    v.check("no_unwrap_or_expect_outside_tests", UNWRAP_FIXME);
}

/// ARCHITECTURE.md's `## Invariants` table names, for each invariant, what
/// enforces it: every named test must exist (and be a test), every named
/// check must exist, and no invariant may go without one.
#[test]
fn architecture_invariants_are_enforced() {
    let arch = read("ARCHITECTURE.md");
    let Some(rows) = invariants_table(&arch) else {
        println!(
            "tidy note: ARCHITECTURE.md has no `## Invariants` table yet; \
             architecture_invariants_are_enforced checks it once it exists"
        );
        return;
    };
    let tests = TestIndex::build();
    let test_all = read("scripts/test-all.sh");
    let xtask_main = read("xtask/src/main.rs");
    let mut v = Violations::default();
    for row in &rows {
        let refs = backticked(&row.enforced_by);
        if refs.is_empty() {
            v.add(
                "ARCHITECTURE.md",
                row.line,
                format!(
                    "invariant {:?} names no test or check (`crate::path::test_name`, \
                     `tidy::rule`, `scripts/test-all.sh: step`): give it one or remove it",
                    row.invariant
                ),
            );
        }
        for r in refs {
            if let Err(why) = check_enforcer(&r, &tests, &test_all, &xtask_main) {
                v.add("ARCHITECTURE.md", row.line, format!("`{r}`: {why}"));
            }
        }
    }
    v.check("architecture_invariants_are_enforced", &[]);
}

// --- The invariants table ---------------------------------------------------

#[derive(Debug, PartialEq)]
struct InvariantRow {
    line: usize,
    invariant: String,
    enforced_by: String,
}

/// The rows of the tables under `## Invariants` (up to the next `## `
/// heading; `###` sub-sections may each have their own table), or `None`
/// without any. Each table's header names the columns: the invariant is the
/// first, what enforces it the one whose header says "enforced" (else the
/// second).
fn invariants_table(markdown: &str) -> Option<Vec<InvariantRow>> {
    let mut in_section = false;
    let mut saw_table = false;
    let mut rows = Vec::new();
    // The column of "enforced by" in the current table; `None` between tables.
    let mut enforced_col: Option<usize> = None;
    for (i, line) in markdown.lines().enumerate() {
        let t = line.trim();
        if let Some(heading) = t.strip_prefix("## ") {
            if in_section {
                break;
            }
            in_section = heading.trim().eq_ignore_ascii_case("invariants");
            continue;
        }
        if !in_section {
            continue;
        }
        if !t.starts_with('|') {
            enforced_col = None; // a table ends here
            continue;
        }
        saw_table = true;
        let cells = split_row(t);
        let Some(col) = enforced_col else {
            // The header: `| invariant | enforced by |`.
            let col = cells
                .iter()
                .position(|c| c.to_ascii_lowercase().contains("enforced"))
                .unwrap_or(1);
            enforced_col = Some(col);
            continue;
        };
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':' | ' ')))
        {
            continue; // the separator row
        }
        rows.push(InvariantRow {
            line: i + 1,
            invariant: cells.first().cloned().unwrap_or_default(),
            enforced_by: cells.get(col).cloned().unwrap_or_default(),
        });
    }
    saw_table.then_some(rows)
}

/// The cells of a Markdown table row; `|` inside backticks or escaped as `\|`
/// does not split.
fn split_row(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut in_code = false;
    let mut chars = inner.chars().peekable();
    let push = |cells: &mut Vec<String>, c: char| {
        if let Some(cell) = cells.last_mut() {
            cell.push(c);
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                push(&mut cells, '|');
            }
            '`' => {
                in_code = !in_code;
                push(&mut cells, c);
            }
            '|' if !in_code => cells.push(String::new()),
            _ => push(&mut cells, c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_string()).collect()
}

/// The `backticked` spans of a cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Checks one enforcer named in the table.
fn check_enforcer(
    r: &str,
    tests: &TestIndex,
    test_all: &str,
    xtask_main: &str,
) -> Result<(), String> {
    if let Some(step) = r.strip_prefix("scripts/test-all.sh:") {
        let step = step.trim();
        let steps = test_all_steps(test_all);
        return if steps.iter().any(|s| s == step) {
            Ok(())
        } else {
            Err(format!(
                "scripts/test-all.sh has no step `run \"{step}\" ...` (its steps: {})",
                steps.join(", ")
            ))
        };
    }
    if let Some(task) = r.strip_prefix("cargo xtask ") {
        let task = task.split_whitespace().next().unwrap_or("");
        return if xtask_main.contains(&format!("\"{task}\",")) {
            Ok(())
        } else {
            Err(format!(
                "xtask has no task `{task}` (xtask/src/main.rs, TASKS)"
            ))
        };
    }
    if r.contains(char::is_whitespace) || r.is_empty() {
        return Err("not a test path (`crate::path::test_name`, `tidy::rule`, \
                    `scripts/test-all.sh: step` or `cargo xtask TASK`)"
            .to_string());
    }
    let segments: Vec<&str> = r.split("::").collect();
    let name = segments.last().copied().unwrap_or(r);
    let scope = match segments.first() {
        Some(&"tidy") if segments.len() > 1 => Some("xtask/src/tidy.rs".to_string()),
        Some(first) if segments.len() > 1 => crate_dir(first),
        _ => None,
    };
    let found = tests.find(name, scope.as_deref());
    if found.iter().any(|t| t.is_test) {
        return Ok(());
    }
    let place = scope.map_or("the workspace".to_string(), |s| s);
    if let Some(t) = found.first() {
        Err(format!(
            "`fn {name}` ({}:{}) is not a test (no #[test], #[tokio::test] or proptest!)",
            t.file, t.line
        ))
    } else {
        Err(format!(
            "no test `fn {name}` in {place}: renamed or deleted? update the table"
        ))
    }
}

/// The step names of test-all's `run NAME CMD...` calls.
fn test_all_steps(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("run "))
        .filter_map(|rest| {
            let rest = rest.trim_start();
            if let Some(q) = rest.strip_prefix('"') {
                q.split('"').next().map(str::to_string)
            } else {
                rest.split_whitespace().next().map(str::to_string)
            }
        })
        .collect()
}

/// The directory of the crate a path's first segment names: its directory
/// (`config`), its package (`citadel-config`) or library (`citadel_config`)
/// name, or `xtask`; `None` when it names no crate.
fn crate_dir(segment: &str) -> Option<String> {
    if segment == "xtask" {
        return Some("xtask".to_string());
    }
    let root = workspace_root();
    let norm = |s: &str| s.replace('-', "_");
    expand(&root, "crates/*").into_iter().find_map(|dir| {
        let name = dir.file_name()?.to_str()?.to_string();
        let package = fs::read_to_string(dir.join("Cargo.toml"))
            .ok()
            .and_then(|m| package_name(&m))
            .unwrap_or_default();
        (norm(&name) == norm(segment) || norm(&package) == norm(segment))
            .then(|| format!("crates/{name}"))
    })
}

fn package_name(manifest: &str) -> Option<String> {
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("name"))
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_string)
}

struct TestFn {
    file: String,
    line: usize,
    name: String,
    is_test: bool,
}

/// Every `fn` in the workspace's Rust sources and whether it is a test.
struct TestIndex(Vec<TestFn>);

impl TestIndex {
    fn build() -> TestIndex {
        let mut fns = Vec::new();
        for file in sources(&["crates/*/src", "crates/*/tests", "xtask/src"]) {
            for f in file.fns() {
                fns.push(TestFn {
                    file: file.rel.clone(),
                    line: file.line_of(f.start),
                    is_test: file.is_test_fn(&f),
                    name: f.name,
                });
            }
        }
        TestIndex(fns)
    }

    fn find(&self, name: &str, scope: Option<&str>) -> Vec<&TestFn> {
        self.0
            .iter()
            .filter(|t| t.name == name)
            .filter(|t| scope.is_none_or(|s| t.file == s || t.file.starts_with(&format!("{s}/"))))
            .collect()
    }
}

// --- Reporting --------------------------------------------------------------

#[derive(Default)]
struct Violations(Vec<(String, usize, String)>);

impl Violations {
    fn add(&mut self, file: &str, line: usize, reason: String) {
        self.0.push((file.to_string(), line, reason));
    }

    /// Fails with every violation not covered by `fixme` (files exempt for now),
    /// and with every `fixme` entry that no longer covers anything.
    fn check(self, rule: &str, fixme: &[&str]) {
        let mut failures = String::new();
        let mut exempt = String::new();
        let mut exempt_files = BTreeSet::new();
        for (file, line, reason) in &self.0 {
            let entry = if *line == 0 {
                format!("{file}: {reason}\n")
            } else {
                format!("{file}:{line}: {reason}\n")
            };
            if fixme.contains(&file.as_str()) {
                exempt_files.insert(file.as_str());
                exempt.push_str(&entry);
            } else {
                failures.push_str(&entry);
            }
        }
        for stale in fixme.iter().filter(|f| !exempt_files.contains(**f)) {
            let _ = writeln!(
                failures,
                "xtask/src/tidy.rs: {stale} is in the FIXME allowlist of `{rule}` but no longer \
                 breaks it: remove the entry"
            );
        }
        if !exempt.is_empty() {
            println!("tidy note: `{rule}` still lets through (FIXME allowlist):\n{exempt}");
        }
        assert!(
            failures.is_empty(),
            "tidy: rule `{rule}` is broken:\n{failures}"
        );
    }
}

// --- Source files -----------------------------------------------------------

fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

fn read(rel: &str) -> String {
    let path = workspace_root().join(rel);
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("tidy: cannot read {}: {e}", path.display()))
}

/// The Rust files under `dirs` (relative, `*` matches one directory level),
/// sorted, as workspace-relative paths with `/`.
fn sources(dirs: &[&str]) -> Vec<SourceFile> {
    let root = workspace_root();
    let mut files = Vec::new();
    for pattern in dirs {
        for dir in expand(&root, pattern) {
            walk(&dir, &mut files);
        }
    }
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("tidy: cannot read {}: {e}", path.display()));
            SourceFile::new(rel, text)
        })
        .collect()
}

/// The Cargo.toml files of the crates and of xtask.
fn manifests() -> Vec<String> {
    let root = workspace_root();
    let mut out: Vec<String> = expand(&root, "crates/*")
        .into_iter()
        .chain([root.join("xtask")])
        .map(|d| d.join("Cargo.toml"))
        .filter(|m| m.is_file())
        .filter_map(|m| {
            Some(
                m.strip_prefix(&root)
                    .ok()?
                    .to_string_lossy()
                    .replace('\\', "/"),
            )
        })
        .collect();
    out.sort();
    out
}

fn expand(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    for part in pattern.split('/') {
        let mut next = Vec::new();
        for d in dirs {
            if part == "*" {
                let Ok(entries) = fs::read_dir(&d) else {
                    continue;
                };
                let mut subs: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                    .collect();
                subs.sort();
                next.extend(subs);
            } else if d.join(part).is_dir() {
                next.push(d.join(part));
            }
        }
        dirs = next;
    }
    dirs
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn crate_of(rel: &str) -> &str {
    match rel.split('/').nth(1) {
        Some("render") => "crates/render",
        Some("config") => "crates/config",
        _ => "this crate",
    }
}

/// `// tidy: <reason>` with a non-empty reason.
fn has_justification(line: &str) -> bool {
    line.find("// tidy:")
        .is_some_and(|i| !line[i + "// tidy:".len()..].trim().is_empty())
}

/// A function item: its name and the byte range from `fn` to the end of its
/// body (or its `;`).
struct FnItem {
    name: String,
    start: usize,
    end: usize,
}

/// One Rust source file, with a copy (`code`) in which comments and the
/// contents of string and character literals are blanked (same byte offsets),
/// and the byte ranges of test code.
struct SourceFile {
    rel: String,
    text: String,
    code: String,
    line_starts: Vec<usize>,
    tests: Vec<(usize, usize)>,
}

impl SourceFile {
    fn new(rel: String, text: String) -> SourceFile {
        let code = blank_comments_and_strings(&text);
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let mut file = SourceFile {
            rel,
            text,
            code,
            line_starts,
            tests: Vec::new(),
        };
        file.tests = file.test_ranges();
        file
    }

    /// 1-based line of a byte offset.
    fn line_of(&self, at: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= at)
    }

    /// Offsets of `pattern` in code.
    fn find(&self, pattern: &str) -> Vec<usize> {
        self.code.match_indices(pattern).map(|(i, _)| i).collect()
    }

    /// Offsets of `pattern` in code where it starts a token (not preceded by
    /// an identifier character) and, for a pattern ending in an identifier
    /// character, ends one; `skip_tests` leaves out test code.
    fn find_token(&self, pattern: &str, skip_tests: bool) -> Vec<usize> {
        let bytes = self.code.as_bytes();
        let ends_ident = pattern.bytes().last().is_some_and(is_ident);
        self.find(pattern)
            .into_iter()
            .filter(|&i| i == 0 || !is_ident(bytes[i - 1]))
            .filter(|&i| !ends_ident || bytes.get(i + pattern.len()).is_none_or(|&b| !is_ident(b)))
            .filter(|&i| !skip_tests || !self.in_test(i))
            .collect()
    }

    fn in_test(&self, at: usize) -> bool {
        self.tests.iter().any(|&(s, e)| s <= at && at <= e)
    }

    /// The item after each `#[cfg(test)]`, `#[test]` or `#[tokio::test..]`:
    /// from the attribute to the end of the item's body or its `;`.
    fn test_ranges(&self) -> Vec<(usize, usize)> {
        let mut ranges = Vec::new();
        for attr in ["#[cfg(test)]", "#[test]", "#[tokio::test"] {
            for (start, _) in self.code.match_indices(attr) {
                if let Some(end) = self.item_end(start + attr.len()) {
                    ranges.push((start, end));
                }
            }
        }
        ranges
    }

    /// The end of the item starting at `from`: its matching `}` or its `;`.
    fn item_end(&self, from: usize) -> Option<usize> {
        let bytes = self.code.as_bytes();
        let mut i = from;
        let mut depth = 0i32; // brackets of further attributes and signatures
        while i < bytes.len() {
            match bytes[i] {
                b'[' | b'(' => depth += 1,
                b']' | b')' => depth -= 1,
                b';' if depth <= 0 => return Some(i),
                b'{' if depth <= 0 => return self.matching_brace(i),
                _ => {}
            }
            i += 1;
        }
        None
    }

    fn matching_brace(&self, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for (i, b) in self.code.bytes().enumerate().skip(open) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Every `fn` item in code.
    fn fns(&self) -> Vec<FnItem> {
        let bytes = self.code.as_bytes();
        let mut out = Vec::new();
        for start in self.find_token("fn", false) {
            let rest = &self.code[start + 2..];
            if !rest.starts_with(char::is_whitespace) {
                continue;
            }
            let rest = rest.trim_start();
            let name: String = rest
                .bytes()
                .take_while(|&b| is_ident(b))
                .map(char::from)
                .collect();
            if name.is_empty() {
                continue; // `fn(u8)` pointer types
            }
            let name_end = bytes.len() - rest.len() + name.len();
            let end = self.item_end(name_end).unwrap_or(bytes.len());
            out.push(FnItem { name, start, end });
        }
        out
    }

    /// The name of the innermost `fn` whose body contains `at`.
    fn enclosing_fn(&self, at: usize) -> Option<String> {
        self.fns()
            .into_iter()
            .filter(|f| f.start <= at && at <= f.end)
            .max_by_key(|f| f.start)
            .map(|f| f.name)
    }

    /// Whether `f` is a test: its attributes (the lines right above it) hold
    /// `#[test]` or `#[tokio::test..]`, or it is inside a `proptest! { .. }`.
    fn is_test_fn(&self, f: &FnItem) -> bool {
        let line = self.line_of(f.start);
        let mut n = line - 1; // lines above, 1-based
        while n >= 1 {
            let above = &self.code[self.line_starts[n - 1]..self.line_starts[n]];
            let t = above.trim();
            if t.starts_with("#[test]") || t.starts_with("#[tokio::test") {
                return true;
            }
            if !(t.starts_with("#[") || t.is_empty() || t.ends_with(")]") || t.ends_with(']')) {
                break;
            }
            n -= 1;
        }
        self.find_token("proptest!", false).into_iter().any(|p| {
            self.code[p..]
                .find('{')
                .map(|o| p + o)
                .and_then(|open| Some((open, self.matching_brace(open)?)))
                .is_some_and(|(open, close)| open < f.start && f.start < close)
        })
    }
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// `text` with comments and the contents of string, byte-string, raw-string
/// and char literals replaced by spaces; newlines and every byte offset kept.
fn blank_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                let mut j = i;
                while j < b.len() {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            b'r' if !prev_ident
                || (i >= 1
                    && matches!(b[i - 1], b'b' | b'c')
                    && (i < 2 || !is_ident(b[i - 2]))) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) == Some(&b'"') {
                    let open = i + 1 + hashes + 1;
                    let closing: Vec<u8> = std::iter::once(b'"')
                        .chain(std::iter::repeat_n(b'#', hashes))
                        .collect();
                    let end = b[open..]
                        .windows(closing.len())
                        .position(|w| w == closing.as_slice())
                        .map_or(b.len(), |p| open + p);
                    blank(&mut out, open, end);
                    i = end + closing.len();
                } else {
                    i += 1;
                }
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i + 1, j);
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\'', 'é') or a lifetime ('a).
                let rest = &text[i + 1..];
                let mut chars = rest.char_indices();
                match chars.next() {
                    Some((_, '\\')) => {
                        let end = rest[1..].find('\'').map_or(b.len(), |p| i + 2 + p);
                        // `'\''`: the quote right after the backslash is escaped.
                        let end = if rest[1..].starts_with('\'') {
                            rest[2..].find('\'').map_or(b.len(), |p| i + 3 + p)
                        } else {
                            end
                        };
                        blank(&mut out, i + 1, end);
                        i = end + 1;
                    }
                    Some((_, c)) if rest[c.len_utf8()..].starts_with('\'') => {
                        blank(&mut out, i + 1, i + 1 + c.len_utf8());
                        i += 2 + c.len_utf8();
                    }
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// --- Tests of tidy itself ---------------------------------------------------

#[test]
fn tidy_scanner_ignores_comments_strings_and_tests() {
    let src = "//! Doc.\n\
               fn load() { std::fs::read(\"x\"); }\n\
               fn other() { let s = \"std::fs and .unwrap()\"; let c = '\"'; /* env::var */ }\n\
               fn r() { let _ = r#\"fs::read \"quoted\" \"#; x.unwrap(); // tidy: checked above\n}\n\
               fn life<'a>(x: &'a str) -> &'a str { x.expect(\"m\") }\n\
               #[cfg(test)]\nmod tests { fn t() { std::env::var(\"X\").unwrap(); } }\n";
    let f = SourceFile::new("crates/config/src/lib.rs".into(), src.into());
    let fs_hits = f.find_token("fs::", true);
    assert_eq!(fs_hits.len(), 1, "{}", f.code);
    assert_eq!(f.enclosing_fn(fs_hits[0]).as_deref(), Some("load"));
    assert!(f.find_token("env::", true).is_empty(), "{}", f.code);
    assert_eq!(f.find_token("env::", false).len(), 1);
    let unwraps: Vec<usize> = f
        .find(".unwrap()")
        .into_iter()
        .filter(|&a| !f.in_test(a))
        .collect();
    assert_eq!(
        unwraps.iter().map(|&a| f.line_of(a)).collect::<Vec<_>>(),
        [4]
    );
    assert!(has_justification(src.lines().nth(3).unwrap_or("")));
    let expects: Vec<usize> = f
        .find(".expect(")
        .into_iter()
        .filter(|&a| !f.in_test(a))
        .collect();
    assert_eq!(
        expects.iter().map(|&a| f.line_of(a)).collect::<Vec<_>>(),
        [6]
    );
}

#[test]
fn tidy_invariants_table_is_parsed() {
    let md = "# A\n\n## Invariants\n\nText.\n\n\
              | invariant | enforced by |\n|---|---|\n\
              | writes are atomic | `cli::install::writes_are_atomic`, `tidy::render_and_config_do_no_io` |\n\
              | a \\| b | `scripts/test-all.sh: clippy` |\n| orphan | nothing yet |\n\n## Next\n| x | y |\n";
    let rows = invariants_table(md).unwrap_or_default();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].line, 9);
    assert_eq!(
        backticked(&rows[0].enforced_by),
        [
            "cli::install::writes_are_atomic",
            "tidy::render_and_config_do_no_io"
        ]
    );
    assert_eq!(rows[1].invariant, "a | b");
    assert!(backticked(&rows[2].enforced_by).is_empty());
    assert!(invariants_table("# A\n## Code map\n| a | b |\n").is_none());
    let md = "## Invariants\n### config\n| enforced by | invariant | notes |\n|--|--|--|\n\
              | `tidy::x` | pure | `not a ref` |\n\n### render\n| invariant | enforced by |\n\
              |--|--|\n| total | `tidy::y` |\n";
    let rows = invariants_table(md).unwrap_or_default();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].line, rows[0].enforced_by.as_str()),
        (5, "`tidy::x`")
    );
    assert_eq!(
        (rows[1].line, rows[1].enforced_by.as_str()),
        (10, "`tidy::y`")
    );

    let tests = TestIndex::build();
    let script = "run \"clippy\" cargo clippy\n";
    assert!(check_enforcer("tidy::render_and_config_do_no_io", &tests, script, "").is_ok());
    assert!(check_enforcer(
        "xtask::tidy::tidy_invariants_table_is_parsed",
        &tests,
        script,
        ""
    )
    .is_ok());
    assert!(check_enforcer("tidy::no_such_rule", &tests, script, "").is_err());
    assert!(
        check_enforcer("tidy::read", &tests, script, "").is_err(),
        "not a test"
    );
    assert!(check_enforcer("scripts/test-all.sh: clippy", &tests, script, "").is_ok());
    assert!(check_enforcer("scripts/test-all.sh: fmt", &tests, script, "").is_err());
    assert!(check_enforcer("cargo xtask e2e-vllm", &tests, script, "(\"e2e-vllm\",").is_ok());
}
