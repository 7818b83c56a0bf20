//! Errors in user input, each naming where it came from.

use std::{fmt, path::PathBuf};

/// A problem with one manifest object, reported and skipped; the rest of the
/// input still applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError {
    pub file: Option<PathBuf>,
    /// e.g. `Service default/web`, or `document 3` when the object has no name yet.
    pub object: String,
    /// Field path, e.g. `spec.ports[0].port`; empty for whole-object problems.
    pub field: String,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}", self.object)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InputError {}
