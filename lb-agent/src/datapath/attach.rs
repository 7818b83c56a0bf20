//! Keeps the tc programs (ingress and egress) attached to every interface whose name
//! matches one of the patterns, including interfaces that appear later.

use std::{collections::BTreeMap, ffi::CStr, path::PathBuf};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink},
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};

use super::{loader, EGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM};

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

/// A link this agent made: pinned from the moment it is attached (so a
/// crash leaves the datapath attached), or held in memory where the kernel
/// cannot pin it (legacy tc without TCX).
enum Held {
    Pinned(PathBuf),
    Owned(#[allow(dead_code)] SchedClassifierLink), // held: dropping it detaches
    /// Between the old link's release and the new one's hold (and after a
    /// hold that failed).
    Detached,
}

/// Which program on which hook.
#[derive(Clone, Copy)]
struct Hook {
    program: &'static str,
    hook: TcAttachType,
    name: &'static str,
}

impl Hook {
    const EGRESS: Self = Self {
        program: EGRESS_PROGRAM,
        hook: TcAttachType::Egress,
        name: "egress",
    };

    fn ingress(external: bool) -> Self {
        Self {
            program: if external {
                INGRESS_EXTERNAL_PROGRAM
            } else {
                INGRESS_PROGRAM
            },
            hook: TcAttachType::Ingress,
            name: "ingress",
        }
    }
}

/// A link just attached, not yet pinned or held.
struct Fresh {
    link: SchedClassifierLink,
    hook: Hook,
}

impl Held {
    /// Detaches now: the link is released with its last reference.
    fn detach(self) {
        if let Held::Pinned(path) = self {
            release_pin(&path);
        }
    }
}

struct Attached {
    ifindex: u32,
    /// Attached with the external ingress program.
    external: bool,
    ingress: Held,
    egress: Held,
}

impl Attached {
    fn detach(self) {
        self.ingress.detach();
        self.egress.detach();
    }
}

/// The `--interfaces` token for the default route's interface(s).
pub const UPLINK: &str = "@uplink";
/// The token for pods' interfaces: veth devices whose peer is in another
/// network namespace, whatever the CNI names them.
pub const PODS: &str = "@pods";

pub struct Attacher {
    patterns: Vec<String>,
    /// Interfaces facing outside the cluster (`--external-interfaces`):
    /// they get the external ingress program.
    external_patterns: Vec<String>,
    /// Ifindexes of the default route(s), for the `@uplink` token.
    uplinks: Vec<u32>,
    /// Ifindexes of pods' veths, for the `@pods` token.
    pods: Vec<u32>,
    /// Ifindexes of devices without an Ethernet header: never attached.
    not_ethernet: Vec<u32>,
    pins: LinkPins,
    attached: BTreeMap<String, Attached>,
}

/// Where and under which names this run pins its links.
struct LinkPins {
    /// `None`: links are held in memory only (tests).
    dir: Option<PathBuf>,
    /// Suffix of this run's pins, so a previous run's pins can be told apart.
    run_id: String,
}

impl LinkPins {
    /// `IFNAME-HOOK-RUN`; bpffs refuses '.' in names (VLAN interfaces have one).
    fn name(&self, name: &str, hook: &str) -> String {
        format!("{}-{hook}-{}", name.replace('.', "_"), self.run_id)
    }

    /// Pins a fresh link (it then outlives the agent), or holds it in
    /// memory where it cannot be pinned.
    fn hold(&self, ebpf: &mut Ebpf, name: &str, fresh: Fresh) -> Result<Held, String> {
        let Some(dir) = &self.dir else {
            return Ok(Held::Owned(fresh.link));
        };
        match pin(fresh.link, dir, &self.name(name, fresh.hook.name)) {
            Ok(path) => Ok(Held::Pinned(path)),
            Err(e) => {
                tracing::warn!(
                    interface = name,
                    "cannot pin the {} link ({e}): it detaches when the agent exits",
                    fresh.hook.name
                );
                // The failed conversion released the link: attach again, unpinned.
                Ok(Held::Owned(attach_fresh(ebpf, name, fresh.hook)?.link))
            }
        }
    }
}

impl Attacher {
    pub fn new(
        patterns: Vec<String>,
        external_patterns: Vec<String>,
        link_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            patterns,
            external_patterns,
            uplinks: Vec::new(),
            pods: Vec::new(),
            not_ethernet: Vec::new(),
            pins: LinkPins {
                dir: link_dir,
                run_id: format!("{}", crate::datapath::conntrack::monotonic_ns()),
            },
            attached: BTreeMap::new(),
        }
    }

    pub fn wants_uplinks(&self) -> bool {
        self.all_patterns().any(|p| p == UPLINK)
    }

    fn all_patterns(&self) -> impl Iterator<Item = &String> {
        self.patterns.iter().chain(&self.external_patterns)
    }

    /// Whether an interface gets the external ingress program.
    pub fn is_external(&self, name: &str, ifindex: u32) -> bool {
        self.external_patterns
            .iter()
            .any(|p| self.pattern_matches(p, name, ifindex))
    }

    /// The ifindexes attached as external, in name order.
    pub fn external_ifindexes(&self) -> Vec<u32> {
        self.attached
            .values()
            .filter(|a| a.external)
            .map(|a| a.ifindex)
            .collect()
    }

    pub fn set_uplinks(&mut self, ifindexes: Vec<u32>) {
        self.uplinks = ifindexes;
    }

    /// The pods' veths (`@pods`) and the devices never to attach.
    pub fn set_link_kinds(&mut self, pods: Vec<u32>, not_ethernet: Vec<u32>) {
        self.pods = pods;
        self.not_ethernet = not_ethernet;
    }

    fn pattern_matches(&self, pattern: &str, name: &str, ifindex: u32) -> bool {
        if self.not_ethernet.contains(&ifindex) {
            return false;
        }
        match pattern {
            UPLINK => self.uplinks.contains(&ifindex),
            PODS => self.pods.contains(&ifindex),
            _ => glob_match(pattern, name),
        }
    }

    /// Interfaces a pattern names that are left alone because their packets
    /// have no Ethernet header.
    pub fn not_ethernet_matches(&self) -> std::io::Result<Vec<String>> {
        Ok(interfaces()?
            .into_iter()
            .filter(|(name, ifindex)| {
                self.not_ethernet.contains(ifindex)
                    && self.all_patterns().any(|p| glob_match(p, name))
            })
            .map(|(name, _)| name)
            .collect())
    }

    pub fn matches(&self, name: &str, ifindex: u32) -> bool {
        self.all_patterns()
            .any(|p| self.pattern_matches(p, name, ifindex))
    }

    /// Patterns that match no current interface.
    pub fn unmatched_patterns(&self) -> std::io::Result<Vec<String>> {
        let names = interfaces()?;
        Ok(self
            .all_patterns()
            .filter(|p| !names.iter().any(|(n, i)| self.pattern_matches(p, n, *i)))
            .cloned()
            .collect())
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Attaches both programs to new matching interfaces, forgets vanished
    /// ones, and swaps the ingress program of an interface whose role
    /// (external or not) changed.
    pub fn sync(&mut self, ebpf: &mut Ebpf) -> std::io::Result<Changes> {
        let current = interfaces()?;
        let mut changes = Changes::default();
        let vanished: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| !current.iter().any(|(n, i)| n == *name && *i == a.ifindex))
            .map(|(name, _)| name.clone())
            .collect();
        for name in vanished {
            // The kernel released the links with the interface; drop the pins.
            if let Some(gone) = self.attached.remove(&name) {
                gone.detach();
            }
            changes.gone.push(name);
        }
        for (name, ifindex) in current {
            let external = self.is_external(&name, ifindex);
            if self
                .attached
                .get(&name)
                .is_some_and(|a| a.external == external)
            {
                continue;
            }
            if !self.matches(&name, ifindex) {
                // An attached interface that no longer matches (the default
                // route moved away) keeps its programs until it disappears.
                continue;
            }
            let result = match self.attached.get_mut(&name) {
                Some(attached) => swap_ingress(ebpf, &self.pins, &name, attached, external),
                None => self.attach_new(ebpf, &name, ifindex, external),
            };
            match result {
                Ok(()) => changes.attached.push(name),
                // Tried again on the next pass.
                Err(e) => changes.errors.push(format!("attaching to {name}: {e}")),
            }
        }
        Ok(changes)
    }

    /// Both programs on a new interface: both links or neither (a link
    /// dropped unpinned detaches).
    fn attach_new(
        &mut self,
        ebpf: &mut Ebpf,
        name: &str,
        ifindex: u32,
        external: bool,
    ) -> Result<(), String> {
        let ingress = attach_fresh(ebpf, name, Hook::ingress(external))?;
        let egress = attach_fresh(ebpf, name, Hook::EGRESS)?;
        let ingress = self.pins.hold(ebpf, name, ingress)?;
        let egress = match self.pins.hold(ebpf, name, egress) {
            Ok(egress) => egress,
            Err(e) => {
                ingress.detach();
                return Err(e);
            }
        };
        self.attached.insert(
            name.to_owned(),
            Attached {
                ifindex,
                external,
                ingress,
                egress,
            },
        );
        Ok(())
    }

    /// This run's pin name for a link of `name` (an interface, or `cgroup`).
    pub fn pin_name(&self, name: &str, hook: &str) -> String {
        self.pins.name(name, hook)
    }

    /// Releases links pinned by earlier runs (after this run attached its
    /// own, so there is no gap). Returns the pins released.
    pub fn release_previous(&self) -> Vec<String> {
        let Some(dir) = &self.pins.dir else {
            return Vec::new();
        };
        let suffix = format!("-{}", self.pins.run_id);
        let mut released = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(&suffix) {
                continue;
            }
            if release_pin(&entry.path()) {
                released.push(name);
            }
        }
        released.sort();
        released
    }

    /// Detaches everything this run attached.
    pub fn detach_all(&mut self) {
        for (_, a) in std::mem::take(&mut self.attached) {
            a.detach();
        }
    }
}

/// Removes a link pin while holding the link open, so closing it is the
/// last reference and detaches at once (an unlinked pin alone releases the
/// link later, from a kernel work queue).
pub fn release_pin(path: &std::path::Path) -> bool {
    match PinnedLink::from_pin(path) {
        Ok(link) => link.unpin().is_ok(),
        Err(_) => std::fs::remove_file(path).is_ok(),
    }
}

/// Pins `link` as `dir/file`.
fn pin(link: SchedClassifierLink, dir: &std::path::Path, file: &str) -> Result<PathBuf, String> {
    pin_fd_link(
        FdLink::try_from(link).map_err(|e| e.to_string())?,
        dir,
        file,
    )
}

/// Pins a bpf_link as `dir/file`: it stays attached while the pin exists.
pub fn pin_fd_link(link: FdLink, dir: &std::path::Path, file: &str) -> Result<PathBuf, String> {
    let path = dir.join(file);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    super::loader::restrict(dir, super::loader::PIN_DIR_MODE)?;
    // Dropping the PinnedLink keeps the pin, and with it the link.
    link.pin(&path).map_err(|e| e.to_string())?;
    super::loader::restrict(&path, super::loader::PIN_MODE)?;
    Ok(path)
}

fn attach_fresh(ebpf: &mut Ebpf, name: &str, hook: Hook) -> Result<Fresh, String> {
    let program = loader::program(ebpf, hook.program).map_err(|e| format!("{}: {e}", hook.name))?;
    let link = attach(program, name, hook.hook).map_err(|e| format!("{}: {e}", hook.name))?;
    Ok(Fresh { link, hook })
}

/// The other ingress program goes on before the old one comes off: for a
/// moment both see each packet (each passes what the other translated),
/// never neither. The egress program stays. If the new link cannot be held,
/// the interface is left without ingress and its old role: the next pass
/// swaps again.
fn swap_ingress(
    ebpf: &mut Ebpf,
    pins: &LinkPins,
    name: &str,
    attached: &mut Attached,
    external: bool,
) -> Result<(), String> {
    let fresh = attach_fresh(ebpf, name, Hook::ingress(external))?;
    // The new link takes the old one's pin name.
    std::mem::replace(&mut attached.ingress, Held::Detached).detach();
    attached.ingress = pins.hold(ebpf, name, fresh)?;
    attached.external = external;
    Ok(())
}

fn attach(
    program: &mut SchedClassifier,
    name: &str,
    hook: TcAttachType,
) -> Result<SchedClassifierLink, aya::programs::ProgramError> {
    let id = match program.attach(name, hook) {
        Ok(id) => id,
        // Kernels before 6.6 (no TCX) need a clsact qdisc first.
        Err(_) => {
            let _ = tc::qdisc_add_clsact(name);
            program.attach(name, hook)?
        }
    };
    program.take_link(id)
}

#[cfg(test)]
mod tests {
    use super::{glob_match, Attacher, PODS};

    #[test]
    fn pods_by_kind_and_never_a_device_without_ethernet() {
        let mut a = Attacher::new(vec![PODS.into(), "tun*".into()], vec![], None);
        a.set_link_kinds(vec![5], vec![7]);
        assert!(a.matches("eni3f2a", 5), "a pod's veth, whatever its name");
        assert!(!a.matches("veth1", 6), "not a pod's");
        assert!(
            !a.matches("tun0", 7),
            "no Ethernet header, though the glob matches"
        );
    }

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
