//! Diagnostics: what is wrong, where (file, line, column) and how to fix it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Dotted key the problem is about, e.g. `models.mixtral.port`.
    pub key: String,
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
    /// Byte range in the source, when the problem has a place.
    pub span: Option<Range<usize>>,
}

impl Diagnostic {
    pub fn error(key: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            key: key.into(),
            message: message.into(),
            help: None,
            span: None,
        }
    }

    pub fn warning(key: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(key, message)
        }
    }

    pub fn at(mut self, span: Option<Range<usize>>) -> Diagnostic {
        self.span = span;
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

/// A set of diagnostics about one source file, displayed with locations and snippets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub file: PathBuf,
    source: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn new(file: &Path, source: &str, mut diagnostics: Vec<Diagnostic>) -> Report {
        // Errors first, then in file order: stable and readable.
        diagnostics.sort_by_key(|d| (d.severity, d.span.as_ref().map_or(usize::MAX, |s| s.start)));
        Report {
            file: file.to_owned(),
            source: source.to_owned(),
            diagnostics,
        }
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }

    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.diagnostics.is_empty()
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = self.floor_boundary(offset);
        let before = &self.source[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    /// `offset` moved back to a character boundary inside the source, so that a
    /// span from anywhere never makes slicing panic.
    fn floor_boundary(&self, offset: usize) -> usize {
        let mut offset = offset.min(self.source.len());
        while !self.source.is_char_boundary(offset) {
            offset -= 1;
        }
        offset
    }

    fn write_one(&self, f: &mut fmt::Formatter<'_>, d: &Diagnostic) -> fmt::Result {
        let label = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        writeln!(f, "{label}: {}", d.message)?;
        match &d.span {
            Some(span) => {
                let (line, col) = self.line_col(span.start);
                writeln!(f, "  --> {}:{line}:{col}  ({})", self.file.display(), d.key)?;
                let text = self.source.lines().nth(line - 1).unwrap_or("");
                let width = line.to_string().len();
                let (start, end) = (
                    self.floor_boundary(span.start),
                    self.floor_boundary(span.end.max(span.start)),
                );
                let span_len = self.source[start..end]
                    .lines()
                    .next()
                    .map_or(1, |l| l.chars().count().max(1));
                writeln!(f, "{:width$} |", "")?;
                writeln!(f, "{line} | {text}")?;
                writeln!(
                    f,
                    "{:width$} | {}{}",
                    "",
                    " ".repeat(col - 1),
                    "^".repeat(span_len)
                )?;
            }
            None => writeln!(f, "  --> {}  ({})", self.file.display(), d.key)?,
        }
        if let Some(help) = &d.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            self.write_one(f, d)?;
        }
        let errors = self.errors().count();
        let warnings = self.warnings().count();
        if errors > 0 {
            write!(f, "\n{}: {errors} error(s)", self.file.display())?;
            if warnings > 0 {
                write!(f, ", {warnings} warning(s)")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
