//! The node's netfilter conntrack, sized as kube-proxy sizes it. lb's
//! service traffic still passes netfilter (its entries are the
//! translated flows'), so a node that loses kube-proxy would otherwise
//! fall back to the kernel's smaller table and shorter timeouts. Flags
//! and defaults are kube-proxy's; 0 leaves a value as it is. Unlike
//! kube-proxy, the table size and its hash buckets are only ever raised:
//! a node tuned larger keeps its own value.

use std::path::{Path, PathBuf};

/// The sysctls' directory in the agent's (the node's) network namespace.
pub const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";

/// What to set; 0 (or false) leaves a value alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfConntrack {
    /// `--conntrack-max-per-core`: the table holds this × CPUs ...
    pub max_per_core: u64,
    /// ... and at least `--conntrack-min`.
    pub min: u64,
    /// Seconds (`--conntrack-tcp-timeout-established`).
    pub tcp_established: u64,
    /// Seconds (`--conntrack-tcp-timeout-close-wait`).
    pub tcp_close_wait: u64,
    pub tcp_be_liberal: bool,
    /// Seconds (`--conntrack-udp-timeout-stream`).
    pub udp_stream: u64,
}

/// One value written, or found already right.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    pub sysctl: &'static str,
    pub from: u64,
    pub to: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{flag}: writing {} = {value}: {source}", path.display())]
pub struct SysctlError {
    pub flag: &'static str,
    pub path: PathBuf,
    pub value: u64,
    pub source: std::io::Error,
}

impl NfConntrack {
    /// The table size kube-proxy asks for on `cpus` CPUs (0: leave it).
    pub fn max(&self, cpus: u64) -> u64 {
        if self.max_per_core == 0 {
            return 0;
        }
        (self.max_per_core * cpus).max(self.min)
    }

    /// Writes the values under `dir` (`SYSCTL_DIR`). Without nf_conntrack
    /// loaded there is nothing to size: `Ok` with nothing written. Each
    /// value is tried; the writes that failed are returned.
    pub fn apply(&self, dir: &Path, cpus: u64) -> (Vec<Written>, Vec<SysctlError>) {
        let mut written = Vec::new();
        let mut errors = Vec::new();
        if !dir.is_dir() {
            // A mount that is missing (the DaemonSet's hostPath) is a setup
            // error, not a kernel without netfilter.
            errors.push(SysctlError {
                flag: "--conntrack-sysctl-dir",
                path: dir.to_owned(),
                value: 0,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            });
            return (written, errors);
        }
        if !dir.join("nf_conntrack_max").exists() {
            return (written, errors); // nf_conntrack not loaded: nothing to size
        }
        let max = self.max(cpus);
        // (sysctl, flag, value, only raise)
        let wanted: [(&'static str, &'static str, u64, bool); 6] = [
            ("nf_conntrack_max", "--conntrack-max-per-core", max, true),
            // kube-proxy's hashsize: a quarter of the table.
            (
                "nf_conntrack_buckets",
                "--conntrack-max-per-core",
                max / 4,
                true,
            ),
            (
                "nf_conntrack_tcp_timeout_established",
                "--conntrack-tcp-timeout-established",
                self.tcp_established,
                false,
            ),
            (
                "nf_conntrack_tcp_timeout_close_wait",
                "--conntrack-tcp-timeout-close-wait",
                self.tcp_close_wait,
                false,
            ),
            (
                "nf_conntrack_tcp_be_liberal",
                "--conntrack-tcp-be-liberal",
                u64::from(self.tcp_be_liberal),
                false,
            ),
            (
                "nf_conntrack_udp_timeout_stream",
                "--conntrack-udp-timeout-stream",
                self.udp_stream,
                false,
            ),
        ];
        for (sysctl, flag, value, raise_only) in wanted {
            if value == 0 {
                continue;
            }
            let path = dir.join(sysctl);
            let error = |source| SysctlError {
                flag,
                path: path.clone(),
                value,
                source,
            };
            let current = match read(&path) {
                Ok(current) => current,
                Err(e) => {
                    errors.push(error(e));
                    continue;
                }
            };
            if current == value || (raise_only && current > value) {
                continue;
            }
            match std::fs::write(&path, format!("{value}\n")) {
                Ok(()) => written.push(Written {
                    sysctl,
                    from: current,
                    to: value,
                }),
                Err(e) => errors.push(error(e)),
            }
        }
        (written, errors)
    }
}

fn read(path: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{text:?}: {e}")))
}

/// The CPUs this process may run on (Go's `runtime.NumCPU`, which
/// kube-proxy multiplies by).
pub fn cpus() -> u64 {
    // SAFETY: a zeroed set filled in by the kernel for this process.
    let count = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        libc::CPU_COUNT(&set)
    };
    u64::try_from(count).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kube_proxy_defaults() -> NfConntrack {
        NfConntrack {
            max_per_core: 32768,
            min: 131072,
            tcp_established: 24 * 3600,
            tcp_close_wait: 3600,
            tcp_be_liberal: false,
            udp_stream: 0,
        }
    }

    /// A stand-in for /proc/sys/net/netfilter.
    fn sysctls(values: &[(&str, u64)]) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-nf-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, value) in values {
            std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn the_table_is_kube_proxys_size_and_only_raised() {
        let nf = kube_proxy_defaults();
        assert_eq!(nf.max(2), 131072, "the floor");
        assert_eq!(nf.max(8), 262144, "per core");
        let dir = sysctls(&[
            ("nf_conntrack_max", 65536),
            ("nf_conntrack_buckets", 16384),
            ("nf_conntrack_tcp_timeout_established", 432000),
            ("nf_conntrack_tcp_timeout_close_wait", 60),
            ("nf_conntrack_tcp_be_liberal", 0),
            ("nf_conntrack_udp_timeout_stream", 120),
        ]);
        let (written, errors) = nf.apply(&dir, 8);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            written,
            [
                Written {
                    sysctl: "nf_conntrack_max",
                    from: 65536,
                    to: 262144
                },
                Written {
                    sysctl: "nf_conntrack_buckets",
                    from: 16384,
                    to: 65536
                },
                Written {
                    sysctl: "nf_conntrack_tcp_timeout_established",
                    from: 432000,
                    to: 86400
                },
                Written {
                    sysctl: "nf_conntrack_tcp_timeout_close_wait",
                    from: 60,
                    to: 3600
                },
            ]
        );
        assert_eq!(read(&dir.join("nf_conntrack_max")).unwrap(), 262144);
        assert_eq!(
            read(&dir.join("nf_conntrack_udp_timeout_stream")).unwrap(),
            120,
            "0: left"
        );

        // A node tuned larger keeps its size; the rest is already right.
        std::fs::write(dir.join("nf_conntrack_max"), "1048576\n").unwrap();
        let (written, errors) = nf.apply(&dir, 8);
        assert!(
            written.is_empty() && errors.is_empty(),
            "{written:?} {errors:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_nf_conntrack_nothing_is_written_and_a_failed_write_names_its_flag() {
        let (_, errors) = kube_proxy_defaults().apply(Path::new("/nonexistent/netfilter"), 4);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].flag, "--conntrack-sysctl-dir");
        let empty = sysctls(&[]);
        let (written, errors) = kube_proxy_defaults().apply(&empty, 4);
        assert!(written.is_empty() && errors.is_empty());
        std::fs::remove_dir_all(&empty).unwrap();

        let dir = sysctls(&[("nf_conntrack_max", 1000)]);
        // The rest are missing: each is an error naming its flag.
        let (written, errors) = kube_proxy_defaults().apply(&dir, 4);
        assert_eq!(written.len(), 1);
        let flags: Vec<&str> = errors.iter().map(|e| e.flag).collect();
        assert_eq!(
            flags,
            [
                "--conntrack-max-per-core",
                "--conntrack-tcp-timeout-established",
                "--conntrack-tcp-timeout-close-wait"
            ]
        );
        assert!(
            errors[0].to_string().contains("nf_conntrack_buckets"),
            "{}",
            errors[0]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
