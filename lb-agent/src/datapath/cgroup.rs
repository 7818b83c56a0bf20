//! Socket LB: the cgroup programs attached at `--cgroup-path`
//! (the cgroup v2 root by default, so every process on the node, pods
//! included). Links are pinned like the tc ones (`links/cgroup-HOOK-RUN`):
//! a crashed agent leaves them working, the next run releases them once its
//! own are attached.

use std::path::{Path, PathBuf};

use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr},
    Ebpf,
};

use super::{attach, SOCK_PROGRAMS, SOCK_RELEASE_PROGRAM};

/// Attaches a cgroup program to `$dir` and takes its bpf_link as an
/// `FdLink` (the same three calls for each cgroup program type, each
/// with link types of its own). A bpf_link on a cgroup always runs beside
/// other programs there; the kernel wants no attach flags with it.
macro_rules! link {
    ($program:expr, $dir:expr) => {{
        let program = $program;
        program
            .attach($dir, CgroupAttachMode::Single)
            .map_err(|e| with_sources(&e))
            .and_then(|id| program.take_link(id).map_err(|e| e.to_string()))
            .and_then(|link| FdLink::try_from(link).map_err(|e| e.to_string()))
    }};
}

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
    let mut pin = |(program, hook): (&'static str, &str), link: Result<FdLink, String>| {
        let attach_error = |error| CgroupError::Attach { program, error };
        let link = link.map_err(attach_error)?;
        pins.push(attach::pin_fd_link(link, link_dir, &pin_name(hook)).map_err(attach_error)?);
        Ok::<_, CgroupError>(())
    };
    // The release hook first: no socket gets an entry it would not delete.
    let release = program::<CgroupSock>(ebpf, SOCK_RELEASE_PROGRAM.0);
    pin(SOCK_RELEASE_PROGRAM, release.and_then(|p| link!(p, &dir)))?;
    for (name, hook) in SOCK_PROGRAMS {
        let sock_addr = program::<CgroupSockAddr>(ebpf, name);
        pin((name, hook), sock_addr.and_then(|p| link!(p, &dir)))?;
    }
    Ok(pins)
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, String>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    super::loader::program_as(ebpf, name).map_err(|e| e.to_string())
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

/// The cookie of the caller's network namespace, as `bpf_get_netns_cookie`
/// reports it for a socket there (SO_NETNS_COOKIE, kernel ≥ 5.14).
pub fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
