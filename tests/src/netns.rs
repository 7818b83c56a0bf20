//! Network namespaces owned by a test or the demo; deleted on drop, even when
//! the test panics.

use std::{fs::File, os::fd::AsFd, path::PathBuf, process::Command};

use anyhow::{bail, Context as _};
use nix::sched::{setns, CloneFlags};

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates the namespace (replacing a stale one of the same name) with `lo` up.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Whether any IPv6 address here is still tentative (duplicate address
    /// detection running).
    pub fn has_tentative_ipv6(&self) -> anyhow::Result<bool> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-6", "addr", "show", "tentative"])
            .output()
            .context("running ip")?;
        anyhow::ensure!(out.status.success(), "ip -6 addr show tentative failed");
        Ok(!out.stdout.is_empty())
    }

    /// `ip route get DST` in the namespace: the route, with any learned MTU.
    pub fn route_get(&self, dst: impl Into<std::net::IpAddr>) -> String {
        let dst: std::net::IpAddr = dst.into();
        let out = Command::new("ip")
            .args(["-n", &self.name, "route", "get", &dst.to_string()])
            .output()
            .expect("ip route get");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
    }

    /// `ethtool -K DEV tx off` in the namespace: the device computes no
    /// checksums, so the kernel computes the ones still owed at transmit
    /// (`skb_checksum_help`), as for a VM NIC without checksum offload.
    pub fn tx_checksum_off(&self, dev: &str) -> anyhow::Result<()> {
        sh(&[
            "ip", "netns", "exec", &self.name, "ethtool", "-K", dev, "tx", "off",
        ])
    }

    /// Runs `f` on a thread inside the namespace. Sockets created there stay
    /// in the namespace and may be returned and used from any thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path)
                        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
                    f()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Spawns a long-lived thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it (and their peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
