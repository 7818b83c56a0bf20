//! Socket LB: the cgroup sock_addr programs attached at `--cgroup-path`
//! (the cgroup v2 root by default, so every process on the node, pods
//! included). Links are pinned like the tc ones (`links/cgroup-HOOK-RUN`):
//! a crashed agent leaves them working, the next run releases them once its
//! own are attached.

use std::path::{Path, PathBuf};

use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};

use super::{attach, SOCK_PROGRAMS};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("--cgroup-path {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("{program}: {error}")]
    Attach {
        program: &'static str,
        error: String,
    },
}

/// The cgroup v2 mount point, from /proc/mounts (`/sys/fs/cgroup` on most
/// nodes; `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .ok_or_else(|| std::io::Error::other("no cgroup2 file system is mounted"))
}

/// Attaches every socket LB program to `cgroup` (beside other programs
/// there) and pins the links in `link_dir`, named by `pin_name(hook)`.
/// Returns the pins: removing one detaches its program.
pub fn attach_socket_lb(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    link_dir: &Path,
    pin_name: impl Fn(&str) -> String,
) -> Result<Vec<PathBuf>, CgroupError> {
    let dir = std::fs::File::open(cgroup).map_err(|e| CgroupError::Open(cgroup.into(), e))?;
    let mut pins = Vec::new();
    for (name, hook) in SOCK_PROGRAMS {
        let attach_error = |error: String| CgroupError::Attach {
            program: name,
            error,
        };
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| attach_error("missing from the object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| attach_error(e.to_string()))?;
        // A bpf_link on a cgroup always runs beside other programs there;
        // the kernel wants no attach flags with it.
        let id = program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| attach_error(with_sources(&e)))?;
        let link = program
            .take_link(id)
            .map_err(|e| attach_error(e.to_string()))?;
        let link = FdLink::try_from(link).map_err(|e| attach_error(e.to_string()))?;
        pins.push(attach::pin_fd_link(link, link_dir, &pin_name(hook)).map_err(attach_error)?);
    }
    Ok(pins)
}

/// An error and its causes ("`bpf_link_create` failed: Invalid argument").
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
