//! Event field names as they reach the journal, and the names Citadel's events
//! must not use.
//!
//! tracing-journald stores an event field under its name sanitised: dots
//! become `_`, leading `_` and characters other than ASCII letters, digits and
//! `_` are dropped, the rest is upper-cased (`model` -> `MODEL`). Citadel sends
//! no prefix (tracing-journald's default is `F_`), so the documented
//! `journalctl MODEL=phi3` works; in exchange a field must not take a name that
//! journald, systemd, tracing-journald or Citadel's units already give a
//! meaning: a second `PRIORITY=` or `UNIT=` on an entry would be read by
//! `journalctl -p` or `-u` as if it were theirs. [`check_field_name`] says which
//! names are free; a test holds every event in the workspace to it.

/// Journal fields an event field must not become (exact names).
pub const RESERVED_FIELDS: &[(&str, &str)] = &[
    ("MESSAGE_ID", "journald: the message catalog id"),
    (
        "PRIORITY",
        "journald: the level (set from the event's level)",
    ),
    ("CODE_FILE", "tracing-journald: the event's source file"),
    ("CODE_LINE", "tracing-journald: the event's source line"),
    ("CODE_FUNC", "journald: the source function"),
    (
        "TARGET",
        "tracing-journald: the event's target (module path)",
    ),
    ("ERRNO", "journald: the errno of a failure"),
    ("INVOCATION_ID", "systemd: the unit's invocation"),
    ("USER_INVOCATION_ID", "systemd: the user unit's invocation"),
    ("SYSLOG_FACILITY", "journald: the syslog facility"),
    (
        "SYSLOG_IDENTIFIER",
        "journald: the program (`journalctl -t`)",
    ),
    ("SYSLOG_PID", "journald: the syslog PID"),
    ("SYSLOG_TIMESTAMP", "journald: the syslog timestamp"),
    ("SYSLOG_RAW", "journald: the raw syslog line"),
    ("DOCUMENTATION", "journald: a documentation URL"),
    ("TID", "journald: the thread id"),
    (
        "UNIT",
        "systemd: the unit a PID 1 message is about (`journalctl -u` matches it)",
    ),
    (
        "USER_UNIT",
        "systemd: the user unit a message is about (`journalctl --user-unit` matches it)",
    ),
];

/// Prefixes of journal fields an event field must not take.
pub const RESERVED_PREFIXES: &[(&str, &str)] = &[
    ("SPAN_", "tracing-journald: the enclosing spans' names and metadata"),
    ("OBJECT_", "journald: the process a privileged message is about"),
    ("COREDUMP_", "systemd-coredump"),
    ("CITADEL_", "Citadel's units and failure notifier (LogExtraFields=CITADEL_SERVICE=NAME, CITADEL_FAILED_UNIT, CITADEL_EVENT)"),
];

/// Why an event field's name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldNameError {
    /// The name becomes a journal field that already has a meaning.
    #[error("event field `{field}` would be stored as {journal}=, which belongs to {owner}; pick another name")]
    Reserved {
        field: String,
        journal: String,
        owner: &'static str,
    },
    /// The name is not stored as written (characters dropped, a leading
    /// digit or underscore, too long): `journalctl NAME=` would not find it.
    #[error("event field `{field}` {why}; use lower-case ASCII letters, digits and `_`, starting with a letter")]
    Invalid { field: String, why: &'static str },
}

/// The journal field tracing-journald stores an event field named `name`
/// under (without a prefix, as [`crate::init`] configures it).
pub fn journal_field_name(name: &str) -> String {
    name.bytes()
        .map(|c| if c == b'.' { b'_' } else { c })
        .skip_while(|&c| c == b'_')
        .filter(|&c| c == b'_' || c.is_ascii_alphanumeric())
        .map(|c| char::from(c.to_ascii_uppercase()))
        .collect()
}

/// Checks that an event field named `name` reaches the journal under a name
/// of its own, and returns that name. `message` (the event's message, which
/// becomes `MESSAGE=`) is the one journal field an event may set by name.
pub fn check_field_name(name: &str) -> Result<String, FieldNameError> {
    let invalid = |why| FieldNameError::Invalid {
        field: name.to_owned(),
        why,
    };
    if name == "message" {
        return Ok("MESSAGE".to_owned());
    }
    let journal = journal_field_name(name);
    if name.starts_with('_') {
        return Err(invalid(
            "starts with `_` (journald keeps those for trusted fields; tracing-journald drops it)",
        ));
    }
    if journal.len() != name.len() {
        return Err(invalid("loses characters on its way to the journal"));
    }
    if journal.is_empty() || journal.as_bytes()[0].is_ascii_digit() {
        return Err(invalid("does not start with a letter"));
    }
    if journal.len() > 64 {
        return Err(invalid("is longer than journald's 64 characters"));
    }
    let owner = RESERVED_FIELDS
        .iter()
        .find(|(f, _)| *f == journal)
        .or_else(|| {
            RESERVED_PREFIXES
                .iter()
                .find(|(p, _)| journal.starts_with(p))
        })
        .map(|(_, owner)| *owner);
    match (journal.as_str(), owner) {
        ("MESSAGE", _) => Err(FieldNameError::Reserved {
            field: name.to_owned(),
            journal,
            owner: "journald: the event's message",
        }),
        (_, Some(owner)) => Err(FieldNameError::Reserved {
            field: name.to_owned(),
            journal,
            owner,
        }),
        (_, None) => Ok(journal),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn plain_names_are_upper_cased() {
        assert_eq!(check_field_name("model").unwrap(), "MODEL");
        assert_eq!(check_field_name("request_id").unwrap(), "REQUEST_ID");
        assert_eq!(check_field_name("prompt_tokens").unwrap(), "PROMPT_TOKENS");
        assert_eq!(check_field_name("message").unwrap(), "MESSAGE");
        assert_eq!(journal_field_name("a.b"), "A_B");
    }

    /// Without tracing-journald's `F_` prefix, these would
    /// overwrite or double journald's own fields.
    #[test]
    fn journal_field_names_cannot_collide() {
        for name in [
            "priority",
            "unit",
            "target",
            "code_file",
            "code_line",
            "syslog_identifier",
            "errno",
            "invocation_id",
            "span_name",
            "citadel_service",
            "object_pid",
            "Message",
        ] {
            assert!(
                matches!(check_field_name(name), Err(FieldNameError::Reserved { .. })),
                "{name}: {:?}",
                check_field_name(name)
            );
        }
        for name in ["_pid", "_systemd_unit", "2xx", "model-name", "modèle", ""] {
            assert!(
                matches!(check_field_name(name), Err(FieldNameError::Invalid { .. })),
                "{name}: {:?}",
                check_field_name(name)
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the name, the check never panics, and a name it accepts
        /// is a valid journal field name (journald drops the others).
        #[test]
        fn check_field_name_never_panics(name in any::<String>()) {
            if let Ok(j) = check_field_name(&name) {
                prop_assert!(!j.is_empty() && j.len() <= 64);
                prop_assert!(j.bytes().all(|c| c == b'_' || c.is_ascii_uppercase() || c.is_ascii_digit()));
                prop_assert!(!j.as_bytes()[0].is_ascii_digit() && !j.starts_with('_'));
            }
        }
    }
}
