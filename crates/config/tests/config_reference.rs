//! Issue 10, item 7: `docs/configuration.md` is the reference for every config
//! key. These tests hold it to the schema in both directions: a key the reader
//! accepts ([`citadel_config::raw::schema_keys`]) but the document does not
//! list fails, and so does a documented key the schema no longer has. They also
//! check that every example in the key tables is a valid config and that
//! engine-specific keys are documented for the engines the code allows.
//!
//! The document is read as written: sections are `## \`[TABLE]\`` headings
//! (`[models.NAME]` is the key path `models.*`), and keys are the backticked
//! words in the first cell of a table whose header's first cell is `Key`.

use std::collections::BTreeMap;
use std::path::Path;

use citadel_config::raw::schema_keys;
use citadel_config::EngineKind;

const DOC: &str = include_str!("../../../docs/configuration.md");
const DOC_PATH: &str = "docs/configuration.md";

/// One row of a key table.
#[derive(Debug, Clone)]
struct Row {
    /// The section's key path prefix: `gateway`, `models.*`.
    prefix: String,
    /// The section heading as written: `[models.NAME]`.
    heading: String,
    /// 1-based line number in the document.
    line: usize,
    /// The keys named in the first cell.
    keys: Vec<String>,
    /// Column name -> cell text.
    cells: BTreeMap<String, String>,
}

fn split_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

/// The words between backticks in `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, w)| w.to_owned())
        .collect()
}

/// `## \`[models.NAME]\`` -> (`models.*`, `[models.NAME]`); other headings: None.
fn section_of(heading: &str) -> Option<(String, String)> {
    let words = backticked(heading);
    let table = words.first()?;
    let inner = table.strip_prefix('[')?.strip_suffix(']')?;
    let prefix = inner
        .split('.')
        .map(|part| if part == "NAME" { "*" } else { part })
        .collect::<Vec<_>>()
        .join(".");
    Some((prefix, table.clone()))
}

/// Every row of every key table, with its section.
fn key_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section: Option<(String, String)> = None;
    let mut header: Option<Vec<String>> = None;
    let mut in_code = false;
    for (i, line) in DOC.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(h) = t.strip_prefix("## ") {
            section = section_of(h);
            header = None;
            continue;
        }
        if !t.starts_with('|') {
            header = None;
            continue;
        }
        let cells = split_cells(t);
        let Some(head) = &header else {
            header = Some(cells);
            continue;
        };
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        if head.first().map(String::as_str) != Some("Key") {
            continue;
        }
        let Some((prefix, heading)) = &section else {
            panic!(
                "{DOC_PATH}:{}: a key table outside a `## `[TABLE]`` section; keys are documented under the heading of their table",
                i + 1
            );
        };
        assert_eq!(
            cells.len(),
            head.len(),
            "{DOC_PATH}:{}: the row has {} cells but its table has {} columns ({head:?})",
            i + 1,
            cells.len(),
            head.len()
        );
        rows.push(Row {
            prefix: prefix.clone(),
            heading: heading.clone(),
            line: i + 1,
            keys: backticked(&cells[0]),
            cells: head.iter().cloned().zip(cells).collect(),
        });
    }
    rows
}

/// Documented key path -> the row that documents it.
fn documented() -> BTreeMap<String, Row> {
    let mut out = BTreeMap::new();
    for row in key_rows() {
        for key in row.keys.clone() {
            let path = format!("{}.{key}", row.prefix);
            if let Some(first) = out.get(&path).map(|r: &Row| r.line) {
                panic!(
                    "{DOC_PATH}:{}: `{path}` is documented twice (also on line {first}); keep one row",
                    row.line
                );
            }
            out.insert(path, row.clone());
        }
    }
    out
}

/// The section heading a schema key belongs under: `models.*.port` -> `[models.NAME]`.
fn heading_for(path: &str) -> String {
    let table = path.rsplit_once('.').map_or(path, |(t, _)| t);
    format!("[{}]", table.replace('*', "NAME"))
}

#[test]
fn issue10_every_config_key_is_documented() {
    let schema = schema_keys();
    assert!(schema.len() > 50, "schema_keys() lists only {schema:?}");
    let docs = documented();
    let mut problems = Vec::new();
    for key in &schema {
        if !docs.contains_key(key) {
            let (_, field) = key.rsplit_once('.').unwrap_or(("", key));
            problems.push(format!(
                "`{key}` is in the schema (crates/config/src/raw.rs) but not in {DOC_PATH}: add a row for `{field}` \
                 to the key table under the heading `{}` (type, default, range, what it becomes, example)",
                heading_for(key)
            ));
        }
    }
    for (key, row) in &docs {
        if !schema.contains(key) {
            problems.push(format!(
                "{DOC_PATH}:{}: `{key}` is documented under `{}` but the schema (crates/config/src/raw.rs) has no such key: remove the row or correct the key",
                row.line, row.heading
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every cell of a key table is filled in: a row without its type, default,
/// range, directive or example is not a reference.
#[test]
fn issue10_every_documented_key_row_is_complete() {
    let mut problems = Vec::new();
    for row in key_rows() {
        for (column, text) in &row.cells {
            if text.is_empty() {
                problems.push(format!(
                    "{DOC_PATH}:{}: the `{column}` cell of {:?} is empty",
                    row.line, row.keys
                ));
            }
        }
    }
    let documented = documented();
    for table in ["paths", "service", "gateway", "models.*"] {
        for (key, row) in documented.iter().filter(|(_, r)| r.prefix == table) {
            for column in ["Type", "Default", "Range / format", "Becomes", "Example"] {
                if !row.cells.contains_key(column) {
                    problems.push(format!(
                        "{DOC_PATH}:{}: `{key}` has no `{column}` column",
                        row.line
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A minimal valid model table for `engine`, leaving out what `example` sets.
fn model_table(engine: EngineKind, example: &str, field: &str) -> String {
    let mut lines = Vec::new();
    if field != "port" {
        lines.push("port = 11400".to_owned());
    }
    if field != "engine" {
        lines.push(format!("engine = \"{engine}\""));
    }
    let required = match engine {
        EngineKind::Vllm => Some(("model", "model = \"/opt/citadel/models/m\"")),
        EngineKind::LlamaCpp => Some(("model", "model = \"/opt/citadel/models/m.gguf\"")),
        EngineKind::Ollama | EngineKind::Tgi => Some(("model", "model = \"m\"")),
        EngineKind::Command => Some(("command", "command = [\"/usr/local/bin/server\"]")),
        EngineKind::Sim => None,
    };
    if let Some((key, line)) = required {
        if field != key {
            lines.push(line.to_owned());
        }
    }
    lines.push(example.to_owned());
    format!("[models.a]\n{}\n", lines.join("\n"))
}

/// Every example in a key table is `KEY = VALUE` for its own key, and a config
/// holding it is valid (so the document cannot show a spelling the code refuses).
#[test]
fn issue10_config_reference_examples_are_valid() {
    let mut problems = Vec::new();
    for row in key_rows() {
        let Some(cell) = row.cells.get("Example") else {
            continue;
        };
        let [field] = row.keys.as_slice() else {
            problems.push(format!(
                "{DOC_PATH}:{}: a row with an example documents one key, not {:?}",
                row.line, row.keys
            ));
            continue;
        };
        let examples = backticked(cell);
        let Some(example) = examples.first() else {
            problems.push(format!(
                "{DOC_PATH}:{}: the example of `{field}` is not written as `{field} = VALUE` in backticks",
                row.line
            ));
            continue;
        };
        let named = example.split('=').next().unwrap_or("").trim();
        if named != field {
            problems.push(format!(
                "{DOC_PATH}:{}: the example of `{field}` sets `{named}`",
                row.line
            ));
            continue;
        }
        let text = match row.prefix.as_str() {
            "models.*" => {
                let engine = if field == "engine" {
                    EngineKind::ALL
                        .iter()
                        .copied()
                        .find(|k| example.contains(&format!("\"{k}\"")))
                        .unwrap_or(EngineKind::Sim)
                } else {
                    EngineKind::ENGINE_SPECIFIC
                        .iter()
                        .find(|(f, _)| f == field)
                        .map_or(EngineKind::Sim, |(_, engines)| engines[0])
                };
                model_table(engine, example, field)
            }
            "models.*.instances" => format!(
                "{}\n[[models.a.instances]]\n{}\n",
                model_table(EngineKind::Sim, "", ""),
                if field == "port" {
                    example.to_owned()
                } else {
                    format!("port = 11401\n{example}")
                }
            ),
            table => format!(
                "[{table}]\n{example}\n{}",
                model_table(EngineKind::Sim, "", "")
            ),
        };
        if let Err(e) = citadel_config::parse(&text, Path::new("example.toml")) {
            problems.push(format!(
                "{DOC_PATH}:{}: the example `{example}` of `{}.{field}` is refused:\n{text}\n{e}",
                row.line, row.prefix
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The keys only some engines take are documented with exactly those engines,
/// in `[models.NAME]` and in `[model_defaults]` (where the others leave them out).
#[test]
fn issue10_engine_specific_keys_are_documented_with_their_engines() {
    let documented = documented();
    let mut problems = Vec::new();
    for &(field, engines) in EngineKind::ENGINE_SPECIFIC {
        for (path, column) in [
            (format!("models.*.{field}"), "Range / format"),
            (format!("model_defaults.{field}"), "As a default"),
        ] {
            let Some(row) = documented.get(&path) else {
                continue; // issue10_every_config_key_is_documented names it
            };
            let text = row.cells.get(column).cloned().unwrap_or_default();
            let named: Vec<String> = backticked(&text);
            for kind in EngineKind::ALL {
                let listed = named.iter().any(|w| w == kind.as_str());
                if listed != engines.contains(kind) {
                    problems.push(format!(
                        "{DOC_PATH}:{}: the `{column}` cell of `{path}` {} engine `{kind}`, but the code (EngineKind::ENGINE_SPECIFIC) {}",
                        row.line,
                        if listed { "names" } else { "does not name" },
                        if engines.contains(kind) { "allows it" } else { "does not" }
                    ));
                }
            }
            if !text.contains("only") {
                problems.push(format!(
                    "{DOC_PATH}:{}: `{path}` is engine-specific: say \"only\" for which engines in its `{column}` cell",
                    row.line
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The default a row documents: its `Default` cell.
fn default_cell(documented: &BTreeMap<String, Row>, path: &str) -> String {
    documented
        .get(path)
        .and_then(|r| r.cells.get("Default"))
        .cloned()
        .unwrap_or_default()
}

/// The documented defaults are the ones validation fills in: a config that
/// sets nothing is compared with the `Default` cells.
#[test]
fn issue10_documented_defaults_match_the_code() {
    let documented = documented();
    let minimal = "[models.a]\nport = 11400\nengine = \"sim\"\n";
    let loaded = match citadel_config::parse(minimal, Path::new("minimal.toml")) {
        Ok(l) => l,
        Err(e) => panic!("the minimal config is refused: {e}"),
    };
    let s = &loaded.settings;
    let g = &s.gateway;
    let m = &s.models[0];
    let quoted = |v: &dyn std::fmt::Display| format!("`\"{v}\"`");
    let plain = |v: &dyn std::fmt::Display| format!("`{v}`");
    let limit = |v: Option<String>| v.map_or_else(|| "none".to_owned(), |v| format!("`{v}`"));
    let mut expected: Vec<(String, String)> = [
        ("paths.home", quoted(&s.paths.home.display())),
        ("paths.credentials", quoted(&s.paths.credentials.display())),
        ("service.user", quoted(&s.service.user)),
        ("service.group", quoted(&s.service.group)),
        ("gateway.listen", quoted(&g.listen)),
        ("gateway.port", plain(&g.port)),
        ("gateway.auth", plain(&g.auth)),
        (
            "gateway.rate_limit_per_minute",
            plain(&g.rate_limit_per_minute),
        ),
        ("gateway.rate_limit_burst", plain(&g.rate_limit_burst)),
        ("gateway.max_body", quoted(&g.max_body)),
        ("gateway.header_timeout", quoted(&g.header_timeout)),
        ("gateway.request_timeout", quoted(&g.request_timeout)),
        ("gateway.probe_interval", quoted(&g.probe_interval)),
        ("gateway.drain_timeout", quoted(&g.drain_timeout)),
        ("gateway.watchdog", quoted(&g.watchdog)),
        ("gateway.listen_backlog", plain(&g.listen_backlog)),
        ("gateway.first_byte_timeout", quoted(&g.first_byte_timeout)),
        ("gateway.outlier_failures", plain(&g.outlier_failures)),
        ("gateway.outlier_ejection", quoted(&g.outlier_ejection)),
        ("models.*.stop_timeout", quoted(&m.stop_timeout)),
        ("models.*.watchdog", quoted(&m.watchdog)),
        ("models.*.probe_interval", quoted(&m.probe_interval)),
        ("models.*.health_path", quoted(&m.health_path)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (prefix, limits) in [("gateway", &g.limits), ("models.*", &m.limits)] {
        let key = |k: &str| format!("{prefix}.{k}");
        expected.extend([
            (
                key("memory_max"),
                limit(limits.memory_max.map(|v| format!("\"{v}\""))),
            ),
            (
                key("memory_high"),
                limit(limits.memory_high.map(|v| format!("\"{v}\""))),
            ),
            (key("cpus"), limit(limits.cpus.map(|v| v.0.to_string()))),
            (
                key("tasks_max"),
                limit(limits.tasks_max.map(|v| v.to_string())),
            ),
            (key("nofile"), limit(limits.nofile.map(|v| v.to_string()))),
        ]);
    }
    // Engine-dependent defaults: each engine's value is named in the cell.
    for kind in EngineKind::ALL {
        let start = citadel_config::units::Timespan::from_secs(kind.default_start_timeout_secs());
        for (key, value) in [
            ("start_timeout", quoted(&start)),
            ("ready_check", quoted(&kind.default_ready_check().as_str())),
            ("health_path", quoted(&kind.default_health_path())),
        ] {
            expected.push((format!("models.*.{key}"), value));
        }
    }
    let mut problems = Vec::new();
    for (path, want) in &expected {
        let cell = default_cell(&documented, path);
        let ok = if want == "none" {
            cell.starts_with("none")
        } else {
            cell.contains(want.as_str())
        };
        if !ok {
            problems.push(format!(
                "the Default cell of `{path}` in {DOC_PATH} says {cell}, but validation fills in {want}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
