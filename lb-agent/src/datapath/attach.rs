//! Keeps the tc ingress program attached to every interface whose name
//! matches one of the patterns, including interfaces that appear later.

use std::{collections::BTreeMap, ffi::CStr, path::Path};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLink},
    SchedClassifier, TcAttachType,
};

/// Interfaces of the current network namespace: (name, ifindex).
pub fn interfaces() -> std::io::Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            out.push((
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
                (*entry).if_index,
            ));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// Shell-style glob with `*` and `?`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[derive(Debug, Default)]
pub struct Changes {
    pub attached: Vec<String>,
    pub gone: Vec<String>,
    pub errors: Vec<String>,
}

pub struct Attacher {
    patterns: Vec<String>,
    /// name → (ifindex, link)
    links: BTreeMap<String, (u32, SchedClassifierLink)>,
}

impl Attacher {
    pub fn new(patterns: Vec<String>) -> Self {
        Self {
            patterns,
            links: BTreeMap::new(),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob_match(p, name))
    }

    /// Patterns that match no current interface.
    pub fn unmatched_patterns(&self) -> std::io::Result<Vec<String>> {
        let names = interfaces()?;
        Ok(self
            .patterns
            .iter()
            .filter(|p| !names.iter().any(|(n, _)| glob_match(p, n)))
            .cloned()
            .collect())
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Attaches to new matching interfaces and forgets vanished ones.
    pub fn sync(&mut self, program: &mut SchedClassifier) -> std::io::Result<Changes> {
        let current = interfaces()?;
        let mut changes = Changes::default();
        let stale: Vec<String> = self
            .links
            .iter()
            .filter(|(name, (index, _))| !current.iter().any(|(n, i)| n == *name && i == index))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            // The kernel already released the link with its interface.
            if let Some((_, link)) = self.links.remove(&name) {
                drop(link);
            }
            changes.gone.push(name);
        }
        for (name, index) in current {
            if self.links.contains_key(&name) || !self.matches(&name) {
                continue;
            }
            match attach(program, &name) {
                Ok(link) => {
                    self.links.insert(name.clone(), (index, link));
                    changes.attached.push(name);
                }
                Err(e) => changes.errors.push(format!("attaching to {name}: {e}")),
            }
        }
        Ok(changes)
    }

    /// Pins every link under `dir` so the program stays attached after exit.
    pub fn pin_all(&mut self, dir: &Path) -> Vec<String> {
        let mut errors = Vec::new();
        if let Err(e) = std::fs::create_dir_all(dir) {
            return vec![format!("{}: {e}", dir.display())];
        }
        for (name, (_, link)) in std::mem::take(&mut self.links) {
            let pinned = FdLink::try_from(link)
                .map_err(|e| e.to_string())
                .and_then(|l| l.pin(dir.join(&name)).map_err(|e| e.to_string()));
            match pinned {
                Ok(_pinned) => {} // dropping the PinnedLink keeps the pin
                Err(e) => errors.push(format!("pinning link on {name}: {e}")),
            }
        }
        errors
    }
}

fn attach(
    program: &mut SchedClassifier,
    name: &str,
) -> Result<SchedClassifierLink, aya::programs::ProgramError> {
    let id = match program.attach(name, TcAttachType::Ingress) {
        Ok(id) => id,
        // Kernels before 6.6 (no TCX) need a clsact qdisc first.
        Err(_) => {
            let _ = tc::qdisc_add_clsact(name);
            program.attach(name, TcAttachType::Ingress)?
        }
    };
    program.take_link(id)
}

/// Releases links pinned by an earlier agent run with `--keep-datapath`
/// (after this run attached its own, so there is no gap).
pub fn release_pinned_links(dir: &Path) -> Vec<String> {
    let mut released = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return released;
    };
    for entry in entries.flatten() {
        if let Ok(link) = PinnedLink::from_pin(entry.path()) {
            if link.unpin().is_ok() {
                released.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth0"));
        assert!(glob_match("veth*", "veth"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("eth?", "eth1"));
        assert!(!glob_match("eth?", "eth10"));
        assert!(glob_match("*-c", "lbd-c"));
        assert!(glob_match("lo", "lo"));
    }
}
