//! Taking the datapath out: `lb-agent cleanup` (kube-proxy's `--cleanup`)
//! and a shutdown without `--keep-datapath`. Every link pin is released,
//! which detaches its program at once; every map pin of this and earlier
//! layouts is removed, then the directories. Only names lb makes are
//! touched: anything else found in the pin directory is reported and left,
//! so a mistyped `--pin-dir` cannot empty someone else's bpffs directory.

use std::path::{Path, PathBuf};

/// The subdirectory of the pin directory that holds the link pins.
pub const LINK_DIR: &str = "links";

/// What a cleanup removed and what it could not.
#[derive(Debug, Default)]
pub struct Removed {
    /// Link pins released (each detached one program).
    pub links: Vec<String>,
    /// Map pins removed.
    pub maps: Vec<String>,
    /// Entries lb did not make, left in place with their directory.
    pub foreign: Vec<PathBuf>,
    pub errors: Vec<String>,
}

impl Removed {
    /// Nothing of lb's is left, and nothing else was found.
    pub fn is_complete(&self) -> bool {
        self.foreign.is_empty() && self.errors.is_empty()
    }
}

/// Every map name lb has pinned: this layout's, the previous layout's (a
/// migration not finished leaves them), and retired ones.
fn map_names() -> impl Iterator<Item = &'static str> {
    super::loader::ALL_MAPS
        .into_iter()
        .chain(super::migrate::previous_names())
        .chain([lb_common::sock::SOCK_REVNAT_LRU_MAP])
}

/// Removes the datapath pinned under `pin_dir`. A directory that is not
/// there is already clean.
pub fn remove_datapath(pin_dir: &Path) -> Removed {
    let mut removed = Removed::default();
    let error = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    let links = pin_dir.join(LINK_DIR);
    for entry in entries(&links, &mut removed.errors) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if super::attach::release_pin(&entry.path()) {
            removed.links.push(name);
        } else {
            removed
                .errors
                .push(format!("{}: could not be removed", entry.path().display()));
        }
    }
    remove_dir(&links, &mut removed.errors);
    for name in map_names() {
        let path = pin_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.maps.push(name.to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => removed.errors.push(error(&path, e)),
        }
    }
    removed.foreign = entries(pin_dir, &mut removed.errors)
        .map(|e| e.path())
        .collect();
    removed.foreign.sort();
    if removed.foreign.is_empty() {
        remove_dir(pin_dir, &mut removed.errors);
    }
    removed.links.sort();
    removed
}

/// The entries of `dir`; none if it is not there.
fn entries(dir: &Path, errors: &mut Vec<String>) -> impl Iterator<Item = std::fs::DirEntry> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => Some(read),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            errors.push(format!("{}: {e}", dir.display()));
            None
        }
    };
    let mut list = Vec::new();
    for entry in read.into_iter().flatten() {
        match entry {
            Ok(entry) => list.push(entry),
            Err(e) => errors.push(format!("{}: {e}", dir.display())),
        }
    }
    list.into_iter()
}

fn remove_dir(dir: &Path, errors: &mut Vec<String>) {
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("{}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_clean_and_foreign_files_are_left() {
        let missing = std::env::temp_dir().join(format!("lb-cleanup-none-{}", std::process::id()));
        let removed = remove_datapath(&missing);
        assert!(removed.is_complete(), "{removed:?}");
        assert!(removed.maps.is_empty() && removed.links.is_empty());

        // A plain directory stands in for bpffs: map pins are files there.
        let dir = std::env::temp_dir().join(format!("lb-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(lb_common::svc::SVC_MAP), "").unwrap();
        std::fs::write(dir.join("someone-elses"), "").unwrap();
        let removed = remove_datapath(&dir);
        assert_eq!(removed.maps, [lb_common::svc::SVC_MAP]);
        assert_eq!(removed.foreign, [dir.join("someone-elses")]);
        assert!(!removed.is_complete());
        assert!(dir.is_dir(), "kept with what it still holds");
        std::fs::remove_file(dir.join("someone-elses")).unwrap();
        let removed = remove_datapath(&dir);
        assert!(removed.is_complete() && !dir.exists(), "{removed:?}");
    }
}
