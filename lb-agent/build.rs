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
