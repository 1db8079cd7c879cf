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
    /// the parser reports.
    pub(crate) fn from_toml(text: &str, err: &toml::de::Error) -> ConfigError {
        let (line, column) = match err.span() {
            Some(span) => line_column(text, span.start),
            // Errors about the document as a whole (a missing top-level key) carry no span.
            None => (1, 1),
        };
        ConfigError::Syntax {
            file: None,
            line,
            column,
            message: err.message().trim_end().to_owned(),
        }
    }
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
