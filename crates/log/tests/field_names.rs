//! Every `tracing` event and span in the workspace's sources uses field names
//! that reach the journal as written and collide with none of journald's,
//! systemd's, tracing-journald's or Citadel's own fields
//! (`citadel_log::check_field_name`). Events are stored without a prefix
//! (issue 10, item 4), so a field named `priority` or `unit` would be read by
//! `journalctl -p` / `-u` as theirs.

use std::path::{Path, PathBuf};

const EVENT_MACROS: &[&str] = &["trace!", "debug!", "info!", "warn!", "error!", "event!"];
const SPAN_MACROS: &[&str] = &[
    "trace_span!",
    "debug_span!",
    "info_span!",
    "warn_span!",
    "error_span!",
    "span!",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Skips the string literal starting at `b[i] == b'"'`; returns the index of
/// its closing quote.
fn skip_string(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() && b[i] != b'"' {
        if b[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    i
}

/// The text between the parenthesis at `open` and its match (strings
/// skipped), or `None` when unbalanced.
fn balanced(src: &str, open: usize) -> Option<&str> {
    let b = src.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&src[open + 1..i]);
                }
            }
            b'"' => i = skip_string(b, i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Splits macro arguments at top-level commas.
fn args(s: &str) -> Vec<&str> {
    let b = s.as_bytes();
    let (mut out, mut depth, mut start, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < b.len() {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'"' => i = skip_string(b, i),
            b',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(s[start.min(s.len())..].trim());
    out.retain(|a| !a.is_empty());
    out
}

fn is_field_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|c| c == b'_' || c.is_ascii_alphanumeric()))
}

/// The field names of one macro call: `name = value`, `%name`, `?name`,
/// `name` before the message (for spans, after the span's name).
fn fields(args: &[&str], span: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen_literal = false;
    for a in args {
        if a.starts_with('"') || a.starts_with("r#\"") {
            if span && !seen_literal {
                seen_literal = true;
                continue;
            }
            break; // the message: what follows are its format arguments
        }
        if ["target:", "parent:", "name:", "Level::", "tracing::Level::"]
            .iter()
            .any(|p| a.starts_with(p))
        {
            continue;
        }
        let a = a.trim_start_matches(['%', '?']);
        let name = match a.split_once('=') {
            Some((n, v)) if !v.starts_with('=') => n.trim(),
            _ => a,
        };
        if is_field_path(name) {
            out.push(name.to_owned());
        }
    }
    out
}

#[test]
fn event_fields_reach_the_journal_under_their_own_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("xtask"), &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap_or(f).display().to_string();
        // Test code logs nothing to the journal.
        if rel.contains("/tests/") || rel.contains("/benches/") {
            continue;
        }
        let Ok(src) = std::fs::read_to_string(f) else {
            continue;
        };
        for (macros, span) in [(EVENT_MACROS, false), (SPAN_MACROS, true)] {
            for m in macros {
                for (at, _) in src.match_indices(m) {
                    // `info!` but not `my_info!`; `span!` but not `info_span!`.
                    let before = src[..at].chars().next_back();
                    if before.is_some_and(|c| c == '_' || c.is_ascii_alphanumeric()) {
                        continue;
                    }
                    let open = at + m.len();
                    if src.as_bytes().get(open) != Some(&b'(') {
                        continue;
                    }
                    let Some(inner) = balanced(&src, open) else {
                        continue;
                    };
                    let line = src[..at].lines().count().max(1);
                    for name in fields(&args(inner), span) {
                        checked += 1;
                        if let Err(e) = citadel_log::check_field_name(&name) {
                            problems.push(format!("{rel}:{line}: {e}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        checked > 20,
        "the scan found only {checked} fields: it is broken"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn scanner_reads_the_macro_forms() {
    let a =
        args(r#"request_id = rid.to_str().unwrap_or("-"), model = %m, ?x, status, "done {}", y"#);
    assert_eq!(fields(&a, false), ["request_id", "model", "x", "status"]);
    let a = args(r#""supervisor", model = %model.name, port = p.get()"#);
    assert_eq!(fields(&a, true), ["model", "port"]);
    let a = args(r#"target: "x", priority = 3, "m""#);
    assert_eq!(fields(&a, false), ["priority"]);
    assert!(citadel_log::check_field_name("priority").is_err());
}
