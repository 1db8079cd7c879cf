//! Errors of loading a configuration.

use std::{fmt, io, path::PathBuf};

/// One thing wrong with a configuration: the key it is about (`service[0].backend[1].mac`)
/// and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Why a configuration was rejected. A configuration is accepted whole or not at all.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },

    /// Not TOML, or TOML that does not fit the schema (unknown key, wrong type, missing
    /// required key). The parser stops at the first such error.
    #[error("{}line {line}, column {column}: {message}", file_prefix(file))]
    Syntax {
        file: Option<PathBuf>,
        line: usize,
        column: usize,
        message: String,
    },

    /// Well-formed TOML with values that break the rules. Every problem found is listed, one
    /// per line, so an operator can fix them all in one go.
    #[error("{}", display_problems(file, problems))]
    Invalid {
        file: Option<PathBuf>,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The rule violations, empty for errors that are not about values.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }

    /// The same error, attributed to a file.
    pub(crate) fn in_file(self, path: PathBuf) -> ConfigError {
        match self {
            ConfigError::Syntax {
                line,
                column,
                message,
                ..
            } => ConfigError::Syntax {
                file: Some(path),
                line,
                column,
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                file: Some(path),
                problems,
            },
            other => other,
        }
    }

    /// Turns a TOML/serde error into one that names its line, computed from the byte span
    /// the parser reports, and the key it was reading (`path`, `.` for the document itself).
    pub(crate) fn from_toml(text: &str, path: &str, err: &toml::de::Error) -> ConfigError {
        let (line, column) = match err.span() {
            Some(span) => line_column(text, span.start),
            // Errors about the document as a whole (a missing top-level key) carry no span.
            None => (1, 1),
        };
        let message = err.message().trim_end();
        // A key the schema does not know is named by the message itself, at the table holding
        // it. An error of the TOML syntax itself (a number too large...) comes before any key
        // is read: the key is then the one written on its line.
        let key = match (path, err.span()) {
            (p, _) if p != "." && !p.is_empty() => Some(p.to_owned()),
            // A missing key is not the one written where it is reported.
            _ if message.starts_with("missing field") => None,
            (_, Some(_)) => key_on_line(text, line),
            (_, None) => None,
        };
        let message = match key {
            Some(key) if !message.starts_with("unknown field") => format!("{key}: {message}"),
            _ => message.to_owned(),
        };
        ConfigError::Syntax { file: None, line, column, message }
    }
}

/// The full name of the key written on 1-based line `line` (`service[0].backend[1].weight`),
/// from the table headers above it, if the line holds `key = value`.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let mut arrays: Vec<(String, usize)> = Vec::new();
    let mut table = String::new();
    for (n, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if n + 1 == line {
            let (key, _) = l.split_once('=')?;
            let key = key.trim().trim_matches('"');
            if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
                return None;
            }
            return Some(if table.is_empty() { key.to_owned() } else { format!("{table}.{key}") });
        }
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            // A new element of `name`: deeper arrays start again.
            arrays.retain(|(a, _)| !a.starts_with(&format!("{name}.")));
            match arrays.iter_mut().find(|(a, _)| *a == name) {
                Some((_, i)) => *i += 1,
                None => arrays.push((name.clone(), 0)),
            }
            table = indexed(&name, &arrays);
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = indexed(name.trim(), &arrays);
        }
    }
    None
}

/// `a.b.c` with the current index after each part that is an array of tables.
fn indexed(name: &str, arrays: &[(String, usize)]) -> String {
    let mut out = String::new();
    let mut prefix = String::new();
    for part in name.split('.') {
        prefix = if prefix.is_empty() { part.to_owned() } else { format!("{prefix}.{part}") };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(part);
        if let Some((_, i)) = arrays.iter().find(|(a, _)| *a == prefix) {
            out.push_str(&format!("[{i}]"));
        }
    }
    out
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    match file {
        Some(path) => format!("{}: ", path.display()),
        None => String::new(),
    }
}

fn display_problems(file: &Option<PathBuf>, problems: &[Problem]) -> String {
    let prefix = file_prefix(file);
    problems
        .iter()
        .map(|p| format!("{prefix}{p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = floor_char_boundary(text, at.min(text.len()));
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Collects problems while validating, so that one pass reports all of them.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn into_result<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError::Invalid {
                file: None,
                problems: self.0,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_key_on_a_line_is_named_from_the_tables_above_it() {
        let text = "interface = \"lo\"\n[[service]]\nport = 1\n[[service.backend]]\nweight = 1\n[[service.backend]]\nweight = 2\n\
                    [service.health]\nrise = 1\n[[service]]\n[[service.backend]]\n\"weight\" = 3\n";
        assert_eq!(key_on_line(text, 1).as_deref(), Some("interface"));
        assert_eq!(key_on_line(text, 3).as_deref(), Some("service[0].port"));
        assert_eq!(key_on_line(text, 7).as_deref(), Some("service[0].backend[1].weight"));
        assert_eq!(key_on_line(text, 9).as_deref(), Some("service[0].health.rise"));
        assert_eq!(key_on_line(text, 12).as_deref(), Some("service[1].backend[0].weight"));
        assert_eq!(key_on_line(text, 2), None);
    }

    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // The byte after the two-byte 'é' is the third character of the line.
        assert_eq!(line_column(text, 9), (2, 3));
        // Inside a multi-byte character: rounds down rather than panicking.
        assert_eq!(line_column(text, 8), (2, 2));
        assert_eq!(line_column(text, 1000), (3, 1));
    }
}
