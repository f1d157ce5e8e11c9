//! Reading YAML input files with errors that name the file, the line and the field.
//!
//! Every file the agent reads (its configuration, cluster state) goes through [`parse`], and
//! every semantic check after parsing reports through [`InputError::at`], using the span that
//! `marked_yaml::Spanned` kept for the offending value.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use marked_yaml::{Span, Spanned};
use serde::de::DeserializeOwned;

/// A defect in an input file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InputError {
    pub file: PathBuf,
    /// 1-based, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field's path, such as `workloads[2].addresses[0]`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        // The message quotes the input: control characters in it must not reach a terminal
        // raw (a value could otherwise rewrite what the operator sees).
        f.write_str(": ")?;
        for c in self.message.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl InputError {
    /// An error about the value at `span`, in field `field`.
    pub fn at(
        file: &Path,
        span: &Span,
        field: impl Into<String>,
        message: impl fmt::Display,
    ) -> Self {
        let start = span.start();
        Self {
            file: file.to_owned(),
            line: start.map(marked_yaml::Marker::line),
            column: start.map(marked_yaml::Marker::column),
            field: Some(field.into()),
            message: message.to_string(),
        }
    }

    /// An error about a value, at its position when the decoder kept one.
    pub fn value(
        file: &Path,
        v: &impl Located,
        field: impl Into<String>,
        message: impl fmt::Display,
    ) -> Self {
        match v.location() {
            Some(span) => Self::at(file, span, field, message),
            None => Self {
                field: Some(field.into()),
                ..Self::file(file, message)
            },
        }
    }

    /// An error about the file as a whole.
    pub fn file(file: &Path, message: impl fmt::Display) -> Self {
        Self {
            file: file.to_owned(),
            line: None,
            column: None,
            field: None,
            message: message.to_string(),
        }
    }
}

/// A value read from an input file that may know where in the file it was.
pub trait Located {
    fn location(&self) -> Option<&Span>;
}

impl<T> Located for Spanned<T> {
    fn location(&self) -> Option<&Span> {
        Some(self.span())
    }
}

impl Located for String {
    fn location(&self) -> Option<&Span> {
        None
    }
}

/// A string field of an input file: [`Spanned`] when decoded by [`parse`], a plain `String`
/// when decoded by a faster decoder that keeps no positions.
pub trait Text: Located + DeserializeOwned {
    fn text(&self) -> &str;
}

impl Text for Spanned<String> {
    fn text(&self) -> &str {
        self.as_str()
    }
}

impl Text for String {
    fn text(&self) -> &str {
        self
    }
}

/// Parses YAML text into `T`, mapping syntax and type errors to [`InputError`]s.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, InputError> {
    let options = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true);
    marked_yaml::from_yaml_with_options(0, text, options).map_err(|e| match e {
        marked_yaml::FromYamlError::ParseYaml(load) => {
            let message = load.to_string();
            // The loader's messages carry their own position ("... at 3:7"); keep them whole.
            InputError::file(file, message)
        }
        marked_yaml::FromYamlError::FromNode(node) => {
            let field = node.path().map(str::to_owned);
            let inner = node.into_inner();
            let mark = inner.start_mark();
            InputError {
                file: file.to_owned(),
                line: mark.map(|m| m.line()),
                column: mark.map(|m| m.column()),
                field,
                message: inner.to_string(),
            }
        }
    })
}

/// Reads and parses a file.
pub fn read<T: DeserializeOwned>(file: &Path) -> Result<T, InputError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| InputError::file(file, format!("cannot read: {e}")))?;
    parse(file, &text)
}
