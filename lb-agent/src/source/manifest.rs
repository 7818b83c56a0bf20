//! Reads Kubernetes YAML (multi-document files) from a directory into
//! k8s-openapi `Service` and `EndpointSlice` objects.
//!
//! Errors name the file, the object and the field. An object with errors is
//! skipped; a file that is not valid YAML at all keeps its last good content,
//! so a half-saved edit never removes what the file used to program.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize as _;
use yaml_serde::Value;

use crate::{
    model::error::{InputError, InputErrorKind},
    model::ServiceName,
    source::objects::{Objects, Sourced},
    source::view::SERVICE_NAME_LABEL,
};

/// The objects as parsed, full k8s-openapi types.
#[derive(Clone, Debug, Default)]
pub struct Typed {
    pub services: Vec<Sourced<Service>>,
    pub slices: Vec<Sourced<EndpointSlice>>,
    /// Services named by objects that did not parse.
    pub unparsed: Vec<ServiceName>,
}

impl From<&Typed> for Objects {
    fn from(typed: &Typed) -> Self {
        Objects {
            services: typed.services.iter().map(Sourced::view).collect(),
            slices: typed.slices.iter().map(Sourced::view).collect(),
            unparsed: typed.unparsed.clone(),
        }
    }
}

/// Parses one YAML text into the views the agent keeps. `Err` means the text
/// is not YAML at all; object-level problems are returned alongside the
/// objects that did parse.
pub fn parse_str(
    text: &str,
    file: Option<&Path>,
) -> Result<(Objects, Vec<InputError>), InputError> {
    let (typed, errors) = parse_typed(text, file)?;
    Ok((Objects::from(&typed), errors))
}

/// Parses one YAML text into k8s-openapi objects.
pub fn parse_typed(
    text: &str,
    file: Option<&Path>,
) -> Result<(Typed, Vec<InputError>), InputError> {
    let mut objects = Typed::default();
    let mut errors = Vec::new();
    for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document).map_err(|e| InputError {
            kind: InputErrorKind::InvalidYaml,
            file: file.map(Path::to_path_buf),
            object: format!("document {}", index + 1),
            field: String::new(),
            message: format!("invalid YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        if let Err(e) = parse_document(value, index, file, &mut objects) {
            errors.push(e);
        }
    }
    Ok((objects, errors))
}

fn parse_document(
    value: Value,
    index: usize,
    file: Option<&Path>,
    out: &mut Typed,
) -> Result<(), InputError> {
    let str_at = |v: &Value, path: &[&str]| -> Option<String> {
        path.iter()
            .try_fold(v, |v, k| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let api_version = str_at(&value, &["apiVersion"]).unwrap_or_default();
    let kind = str_at(&value, &["kind"]).unwrap_or_default();
    let name = str_at(&value, &["metadata", "name"]);
    let namespace = str_at(&value, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
    let object = match (&name, kind.as_str()) {
        (Some(name), _) => format!("{kind} {namespace}/{name}"),
        (None, "") => format!("document {}", index + 1),
        (None, _) => format!("document {} ({kind})", index + 1),
    };
    // The Service an object speaks for, when it can be told even from an
    // object that does not parse: that Service keeps its last good state.
    let service = match kind.as_str() {
        "Service" => name.clone(),
        "EndpointSlice" => value
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
    .map(|name| ServiceName {
        namespace: namespace.as_str().into(),
        name: name.into(),
    });
    let mut error = |kind: InputErrorKind, field: String, message: String| {
        if let Some(service) = &service {
            out.unparsed.push(service.clone());
        }
        InputError {
            kind,
            file: file.map(Path::to_path_buf),
            object: object.clone(),
            field,
            message,
        }
    };
    if !value.is_mapping() {
        return Err(error(
            InputErrorKind::UnsupportedObject,
            String::new(),
            "not a Kubernetes object (expected a mapping)".into(),
        ));
    }
    match (api_version.as_str(), kind.as_str()) {
        ("", _) => {
            return Err(error(
                InputErrorKind::UnsupportedObject,
                "apiVersion".into(),
                "missing".into(),
            ))
        }
        (_, "") => {
            return Err(error(
                InputErrorKind::UnsupportedObject,
                "kind".into(),
                "missing".into(),
            ))
        }
        ("v1", "Service") | ("discovery.k8s.io/v1", "EndpointSlice") => {}
        (_, "Service") | (_, "EndpointSlice") => {
            return Err(error(
                InputErrorKind::UnsupportedObject,
                "apiVersion".into(),
                format!("unsupported apiVersion {api_version:?} for {kind}"),
            ));
        }
        _ => {
            tracing::debug!(file = ?file, %object, "ignoring object of another kind");
            return Ok(());
        }
    }
    if name.is_none() {
        return Err(error(
            InputErrorKind::UnsupportedObject,
            "metadata.name".into(),
            "missing".into(),
        ));
    }
    let path = file.map(Path::to_path_buf);
    if kind == "Service" {
        let mut object: Service =
            typed(value).map_err(|(f, m)| error(InputErrorKind::Schema, f, m))?;
        object.metadata.namespace.get_or_insert(namespace);
        out.services.push(Sourced { file: path, object });
    } else {
        let mut object: EndpointSlice =
            typed(value).map_err(|(f, m)| error(InputErrorKind::Schema, f, m))?;
        object.metadata.namespace.get_or_insert(namespace);
        out.slices.push(Sourced { file: path, object });
    }
    Ok(())
}

/// Deserializes into a k8s-openapi type, reporting the failing field's path.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        (field, e.into_inner().to_string())
    })
}

/// Identity of a file's content without reading it.
type Fingerprint = (Option<SystemTime>, u64);

struct FileState {
    fingerprint: Fingerprint,
    objects: Objects,
    errors: Vec<InputError>,
}

/// `.yaml`, `.yml` or `.json`, and not hidden (editors' temporary files are).
fn is_manifest(path: &Path) -> bool {
    let extension = path
        .extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    extension && !hidden
}

/// A directory of manifests, re-read when its files change.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads every changed file (a full scan). Returns `None` when
    /// nothing changed since the last call, otherwise what the changed files
    /// held before and hold now, and every current error.
    pub fn poll(&mut self) -> std::io::Result<Option<DirChanges>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut changes = DirChanges::default();
        let mut changed = false;
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_manifest(&path) || !path.is_file() {
                continue;
            }
            seen.insert(path.clone());
            changed |= self.refresh(path, &mut changes)?;
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|path| !seen.contains(*path))
            .cloned()
            .collect();
        for path in gone {
            changed |= self.forget(&path, &mut changes);
        }
        Ok(self.finish(changed, changes))
    }

    /// Re-reads just `paths` (those a file watch reported): the cost of a
    /// change is the changed files', not the directory's.
    pub fn poll_paths(
        &mut self,
        paths: &std::collections::BTreeSet<PathBuf>,
    ) -> std::io::Result<Option<DirChanges>> {
        let mut changes = DirChanges::default();
        let mut changed = false;
        for path in paths {
            if path.parent() != Some(self.dir.as_path()) || !is_manifest(path) {
                continue;
            }
            if path.is_file() {
                changed |= self.refresh(path.clone(), &mut changes)?;
            } else {
                changed |= self.forget(path, &mut changes);
            }
        }
        Ok(self.finish(changed, changes))
    }

    fn finish(&self, changed: bool, mut changes: DirChanges) -> Option<DirChanges> {
        if !changed {
            return None;
        }
        changes.errors = self
            .files
            .values()
            .flat_map(|state| state.errors.iter().cloned())
            .collect();
        Some(changes)
    }

    /// A file that is gone: its objects go with it.
    fn forget(&mut self, path: &Path, changes: &mut DirChanges) -> bool {
        match self.files.remove(path) {
            Some(state) => {
                changes.removed.extend(&state.objects);
                true
            }
            None => false,
        }
    }

    /// Re-reads `path` if its size or modification time changed; whether it did.
    fn refresh(&mut self, path: PathBuf, changes: &mut DirChanges) -> std::io::Result<bool> {
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(self.forget(&path, changes));
            }
            Err(e) => return Err(e),
        };
        let fingerprint = (meta.modified().ok(), meta.len());
        if self
            .files
            .get(&path)
            .is_some_and(|s| s.fingerprint == fingerprint)
        {
            return Ok(false);
        }
        let text = fs::read_to_string(&path);
        let previous = self.files.remove(&path);
        if let Some(previous) = &previous {
            changes.removed.extend(&previous.objects);
        }
        let parsed = text
            .map_err(|e| (InputErrorKind::InvalidYaml, e.to_string()))
            .and_then(|t| {
                parse_str(&t, Some(&path)).map_err(|e| (InputErrorKind::InvalidYaml, e.to_string()))
            })
            .and_then(|(objects, errors)| {
                // A file being rewritten in place is empty for a moment
                // (truncate, then write): that is not "delete everything".
                let had_objects = previous.as_ref().is_some_and(|p| !p.objects.is_empty());
                if objects.is_empty() && errors.is_empty() && had_objects {
                    Err((
                        InputErrorKind::EmptyFile,
                        "the file is empty (delete it to remove its objects)".to_owned(),
                    ))
                } else {
                    Ok((objects, errors))
                }
            });
        let state = match parsed {
            Ok((objects, errors)) => FileState {
                fingerprint,
                objects,
                errors,
            },
            Err((kind, message)) => {
                let kept = previous.map(|p| p.objects).unwrap_or_default();
                let error = InputError {
                    kind,
                    file: Some(path.clone()),
                    object: "file".into(),
                    field: String::new(),
                    message: format!(
                        "{message}; keeping its last good content ({} objects)",
                        kept.services.len() + kept.slices.len()
                    ),
                };
                FileState {
                    fingerprint,
                    objects: kept,
                    errors: vec![error],
                }
            }
        };
        changes.added.extend(&state.objects);
        self.files.insert(path, state);
        Ok(true)
    }

    /// Every object the directory holds now (as of the last `poll`).
    pub fn objects(&self) -> Objects {
        let mut objects = Objects::default();
        for state in self.files.values() {
            objects.extend(&state.objects);
        }
        objects
    }
}

/// What one `poll` found.
#[derive(Debug, Default)]
pub struct DirChanges {
    /// The objects of changed or deleted files, as they were.
    pub removed: Objects,
    /// The objects of changed or new files, as they are now.
    pub added: Objects,
    /// Every current problem, in every file.
    pub errors: Vec<InputError>,
}
