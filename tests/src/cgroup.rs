//! A cgroup v2 of a test's own, under the cgroup2 mount (never the root:
//! tests must not attach to the machine's root cgroup), and client
//! processes started inside it. Removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::netns::NetNs;

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let root = lb_agent::datapath::cgroup::cgroup2_mount()?;
        let path = root.join(format!("lb-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Runs `python3 -c CODE` inside `ns` as a process of this cgroup;
    /// returns its stdout (fails with its stderr).
    pub fn python(&self, ns: &NetNs, code: &str) -> anyhow::Result<String> {
        let out = self
            .python_command(ns, code)
            .output()
            .context("starting the client")?;
        if !out.status.success() {
            bail!(
                "client failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts `python3 -c CODE` inside `ns` as a process of this cgroup,
    /// with its stdin and stdout piped, for a conversation.
    pub fn spawn_python(&self, ns: &NetNs, code: &str) -> anyhow::Result<Child> {
        self.python_command(ns, code)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the client")
    }

    fn python_command(&self, ns: &NetNs, code: &str) -> Command {
        // The shell joins the cgroup, then becomes the client in the namespace.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="$2" python3 -c "$3""#)
            .arg("sh")
            .arg(&self.path)
            .arg(ns.path())
            .arg(code);
        command
    }
}

/// This process's membership of a test cgroup; it returns to its previous
/// cgroup on drop.
pub struct Membership {
    previous: PathBuf,
}

impl TestCgroup {
    /// Moves this whole process (every thread) into the cgroup.
    pub fn join_self(&self) -> anyhow::Result<Membership> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 membership in /proc/self/cgroup")?;
        let root = lb_agent::datapath::cgroup::cgroup2_mount()?;
        let previous = root.join(relative.trim_start_matches('/'));
        std::fs::write(
            self.path.join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining {}", self.path.display()))?;
        Ok(Membership { previous })
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.previous.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes have exited; the kernel may need a moment to free it.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A TCP client: connects to VIP:80, prints `getpeername()` and the
/// server's answer to an HTTP GET.
pub const TCP_CLIENT: &str = r#"
import socket
s = socket.create_connection(("198.19.0.10", 80), timeout=3)
peer = s.getpeername()
s.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print("%s:%d|%s" % (peer[0], peer[1], data.split(b"\r\n\r\n", 1)[1].decode().strip()))
"#;
