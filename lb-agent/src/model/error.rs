//! Errors in user input, each naming where it came from and of which kind,
//! so they can be counted by kind and told apart: some stop a Service from
//! being updated (it keeps its last good state), some only skip a part.

use std::{fmt, path::PathBuf};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputErrorKind {
    /// The file is not YAML (or not readable): its last good content is kept.
    InvalidYaml,
    /// The file turned empty: its last good content is kept until it is deleted.
    EmptyFile,
    /// Not a Kubernetes object we read (no apiVersion/kind/name, another apiVersion).
    UnsupportedObject,
    /// The object does not parse into its Kubernetes type (wrong field type, …).
    Schema,
    /// A field holds a value the proxy cannot program.
    InvalidField,
    /// Two objects or ports claim the same thing.
    Conflict,
    /// Past a per-Service budget (`--max-backends-per-service`,
    /// `--max-frontends-per-service`, `--max-slots-per-service`).
    OverLimit,
    /// One endpoint or slice port was skipped; the rest of the Service applies.
    Skipped,
}

impl InputErrorKind {
    /// Whether the Service stays at its last good state (otherwise only the
    /// named part is left out).
    pub const fn keeps_last_good(self) -> bool {
        !matches!(self, InputErrorKind::Skipped)
    }

    pub const fn name(self) -> &'static str {
        match self {
            InputErrorKind::InvalidYaml => "invalid_yaml",
            InputErrorKind::EmptyFile => "empty_file",
            InputErrorKind::UnsupportedObject => "unsupported_object",
            InputErrorKind::Schema => "schema",
            InputErrorKind::InvalidField => "invalid_field",
            InputErrorKind::Conflict => "conflict",
            InputErrorKind::OverLimit => "over_limit",
            InputErrorKind::Skipped => "skipped",
        }
    }
}

/// A problem with one manifest object, reported; the rest of the input
/// still applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputError {
    pub kind: InputErrorKind,
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
