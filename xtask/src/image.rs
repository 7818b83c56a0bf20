//! `cargo xtask image`: the agent's container image, built on this machine
//! with buildah and no base image (no registry is reachable, and the agent
//! needs nothing but its binary): the release binary and the shared
//! libraries `ldd` names, copied from the build host into an empty root.
//! glibc ≥ 2.34 resolves names (files, DNS) without NSS modules, so the
//! API server may be named by host name. The image is then checked from
//! the inside: its root mounted, `lb-agent --version` run chrooted there,
//! the file list shown.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// Builds `lb-agent:VERSION` (and `:latest`) from `agent` (a release build).
pub fn run(agent: &Path) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let context = root.join("target/image");
    let _ = std::fs::remove_dir_all(&context);
    let rootfs = context.join("rootfs");
    copy_into(&rootfs, agent, Path::new("/usr/local/bin/lb-agent"))?;
    for library in shared_libraries(agent)? {
        copy_into(&rootfs, &library, &library)?;
    }
    std::fs::create_dir_all(rootfs.join("etc"))?;
    std::fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    std::fs::copy(
        root.join("deploy/Containerfile"),
        context.join("Containerfile"),
    )?;

    let version = env!("CARGO_PKG_VERSION");
    let revision = revision(&root);
    let tag = format!("lb-agent:{version}");
    let status = Command::new("buildah")
        .args(["build", "--quiet", "--layers=false", "--pull-never"])
        .args([
            "--label",
            &format!("org.opencontainers.image.version={version}"),
        ])
        .args([
            "--label",
            &format!("org.opencontainers.image.revision={revision}"),
        ])
        .args([
            "--label",
            "org.opencontainers.image.licenses=MIT OR Apache-2.0",
        ])
        .args(["-t", &tag, "-t", "lb-agent:latest", "-f"])
        .arg(context.join("Containerfile"))
        .arg(&context)
        .status()
        .context("running buildah (scripts/setup.sh installs it)")?;
    if !status.success() {
        bail!("buildah build failed ({status})");
    }
    check(&tag)?;
    println!("built {tag} (and lb-agent:latest), revision {revision}; push it with `buildah push {tag} REGISTRY/lb-agent:{version}`");
    Ok(())
}

/// The libraries the dynamic loader maps for `binary`, loader included.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x…)`; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    if libraries.is_empty() {
        bail!("ldd named no libraries for {}", binary.display());
    }
    Ok(libraries)
}

/// Copies `from` to `rootfs` + `to`, following symlinks (the image gets files).
fn copy_into(rootfs: &Path, from: &Path, to: &Path) -> anyhow::Result<()> {
    let target = rootfs.join(to.strip_prefix("/").unwrap_or(to));
    std::fs::create_dir_all(target.parent().context("a path with a parent")?)?;
    std::fs::copy(from, &target).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

fn revision(root: &Path) -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the binary inside the image's root alone, and lists what is there.
fn check(tag: &str) -> anyhow::Result<()> {
    let output = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("buildah").args(args).output()?;
        if !out.status.success() {
            bail!(
                "buildah {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let container = output(&["from", "--pull-never", "--quiet", tag])?;
    let result = (|| -> anyhow::Result<()> {
        let mount = output(&["mount", &container])?;
        let version = Command::new("chroot")
            .args([mount.as_str(), "/usr/local/bin/lb-agent", "--version"])
            .output()
            .context("chroot")?;
        let text = String::from_utf8_lossy(&version.stdout);
        if !version.status.success() || !text.starts_with("lb-agent ") {
            bail!(
                "lb-agent --version inside the image: {}{}",
                text,
                String::from_utf8_lossy(&version.stderr)
            );
        }
        println!("inside the image: {}", text.trim());
        let mut files = Vec::new();
        list(Path::new(&mount), Path::new(&mount), &mut files)?;
        println!("image files: {}", files.join(", "));
        if files.iter().any(|f| f == "/bin/sh") {
            bail!("the image has a shell: not the minimal root it should be");
        }
        Ok(())
    })();
    let _ = output(&["umount", &container]);
    let _ = output(&["rm", &container]);
    result
}

fn list(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            list(root, &path, out)?;
        } else {
            out.push(format!("/{}", path.strip_prefix(root)?.display()));
        }
    }
    out.sort();
    Ok(())
}
