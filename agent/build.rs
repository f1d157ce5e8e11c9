//! Compiles the kernel programs (`ebpf/`) for the BPF target; the agent embeds the object with
//! `aya::include_bytes_aligned!`.
//!
//! The eBPF crate is built by a cargo of its own (the pinned toolchain, `-Z build-std=core`,
//! the BPF target), as aya-build does it. Unlike aya-build, its output is kept and shown only
//! when that build fails: every line a build script prints reaches the user as a
//! `warning: portcullis-agent@…` line, dozens of them on a fresh build, for nothing wrong.
use std::{
    env,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::{Artifact, Message};

/// Set to anything to make cargo run this script again (the tests use it).
const REBUILD: &str = "PORTCULLIS_EBPF_REBUILD";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed={REBUILD}");
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
    // We build-depend on the crate, so cargo reruns us when its library changes; its binary
    // (what we embed) lives under src/ too.
    println!("cargo::rerun-if-changed={root_dir}");
    // The kernel programs must be built by the pinned toolchain: bpf-linker links against one
    // LLVM major, and only the pinned rustc emits bitcode it reads.
    let toolchain_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let text = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .ok_or_else(|| anyhow!("{}: no `channel = \"…\"` line", toolchain_file.display()))?
        .to_owned();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &channel,
        "cargo",
        "build",
        "--package",
        ebpf.name.as_str(),
    ])
    .args([
        "--bins",
        "--message-format=json",
        "--release",
        "--target",
        target,
    ])
    .args(["-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(out_dir.join("ebpf-target"))
    // `-Z build-std` on a stable toolchain.
    .env("RUSTC_BOOTSTRAP", "1")
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    )
    // The outer build's compiler is not the pinned one.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {cmd:?} (is rustup installed?)"))?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut executables = Vec::new();
    let mut messages = Vec::new();
    for message in Message::parse_stream(stdout) {
        match message.context("the eBPF build's output is not cargo's JSON")? {
            Message::CompilerArtifact(Artifact {
                executable: Some(exe),
                target,
                ..
            }) => executables.push((target.name, exe.into_std_path_buf())),
            Message::CompilerMessage(m) => {
                messages.push(m.message.rendered.unwrap_or_default());
            }
            Message::TextLine(line) => messages.push(line),
            _ => {}
        }
    }
    let status = child.wait().context("waiting for the eBPF build")?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        for line in messages
            .iter()
            .flat_map(|m| m.lines())
            .chain(stderr.lines())
        {
            println!("cargo::warning={line}");
        }
        bail!("building the kernel programs failed ({status}); its output is above");
    }
    for (name, exe) in executables {
        let dst = out_dir.join(name);
        std::fs::copy(&exe, &dst)
            .with_context(|| format!("copying {} to {}", exe.display(), dst.display()))?;
    }
    Ok(())
}
