//! Builds `lb-ebpf` for the BPF target and leaves the object in OUT_DIR, where
//! `datapath::loader` embeds it.
//!
//! The toolchain comes from `LB_EBPF_TOOLCHAIN` (set in .cargo/config.toml to
//! Debian's rustc linked by scripts/setup.sh); `nightly` with rust-src also works.
//! `AYA_BUILD_SKIP=1` (aya-build's switch) embeds an empty object instead:
//! the agent builds and its unprivileged tests run without the eBPF
//! toolchain, and loading the datapath fails saying why.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    revision();
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        std::fs::write(std::path::Path::new(&out_dir).join("lb-ebpf"), [])
            .context("writing the empty eBPF object")?;
        println!("cargo:warning=AYA_BUILD_SKIP: no datapath embedded; `run` cannot load one");
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let package = Package {
        name: "lb-ebpf",
        root_dir: &root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
}

/// `LB_REVISION` for `--version` and `lb_build_info`: the commit, `-dirty`
/// with uncommitted changes; `LB_REVISION` from the environment wins (an
/// image built from a tarball).
fn revision() {
    println!("cargo:rerun-if-env-changed=LB_REVISION");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let revision = std::env::var("LB_REVISION")
        .ok()
        .or_else(|| git(&["describe", "--always", "--dirty", "--abbrev=12"]))
        .unwrap_or_else(|| "unknown".into());
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        // A new commit or checkout moves HEAD or the branch it names.
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head}");
        }
    }
    println!("cargo:rustc-env=LB_REVISION={revision}");
}
