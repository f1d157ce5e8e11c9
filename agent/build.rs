//! Compiles the kernel programs (`ebpf/`) for the BPF target with aya-build; the agent embeds
//! the object with `aya::include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "portcullis-ebpf")
        .ok_or_else(|| anyhow!("package portcullis-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // The kernel programs must be built by the pinned toolchain: bpf-linker links against one
    // LLVM major, and only the pinned rustc emits bitcode it reads.
    let toolchain_file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let text = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .ok_or_else(|| anyhow!("{}: no `channel = \"…\"` line", toolchain_file.display()))?
        .to_owned();
    // `-Z build-std=core` on a stable toolchain: aya-build passes it when RUSTC_BOOTSTRAP=1.
    // SAFETY: build scripts are single-threaded; the variable is read by the cargo that
    // aya-build spawns below.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf([package], Toolchain::Custom(&channel))
}
