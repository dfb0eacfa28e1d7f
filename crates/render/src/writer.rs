//! A small writer for systemd's ini-like files with comments, and quoting.

use std::fmt::Write;

pub struct UnitWriter {
    out: String,
}

impl UnitWriter {
    pub fn new(header: &str) -> UnitWriter {
        UnitWriter {
            out: header.to_owned(),
        }
    }

    pub fn section(&mut self, name: &str) -> &mut Self {
        if !self.out.is_empty() && !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
        let _ = writeln!(self.out, "[{name}]");
        self
    }

    pub fn comment(&mut self, text: &str) -> &mut Self {
        for line in text.lines() {
            let _ = writeln!(self.out, "# {line}");
        }
        self
    }

    pub fn set(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        let _ = writeln!(self.out, "{key}={value}");
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Escapes `%` (systemd specifiers) in literal text.
pub fn no_specifiers(text: &str) -> String {
    text.replace('%', "%%")
}

/// One command-line word for ExecStart=: quoted when needed, `%` and `$` escaped
/// so systemd passes it through literally.
pub fn exec_word(word: &str) -> String {
    let escaped = no_specifiers(word).replace('$', "$$");
    if escaped.is_empty()
        || escaped
            .contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'' || c == ';')
    {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        escaped
    }
}

/// An `Environment=` value for `KEY=VALUE`, quoted and escaped.
pub fn env_assignment(key: &str, value: &str) -> String {
    let text = no_specifiers(&format!("{key}={value}"));
    if text.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(exec_word("/opt/citadel/bin/x"), "/opt/citadel/bin/x");
        assert_eq!(exec_word("a b"), "\"a b\"");
        assert_eq!(exec_word("50%"), "50%%");
        assert_eq!(exec_word("$HOME"), "$$HOME");
        assert_eq!(env_assignment("A", "b c"), "\"A=b c\"");
        assert_eq!(env_assignment("A", "say \"hi\""), "\"A=say \\\"hi\\\"\"");
        assert_eq!(env_assignment("PCT", "90%"), "PCT=90%%");
    }
}
