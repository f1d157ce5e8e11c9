//! Building workspace binaries and finding them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), else the one on PATH.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// The target directory, as cargo resolves it (CARGO_TARGET_DIR, config, or `<root>/target`).
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// The agent binary: `explicit`, else env PORTCULLIS_BIN, else built now with
/// `cargo build -p portcullis-agent` (debug profile).
pub fn agent_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("PORTCULLIS_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    build_agent()
}

/// Builds the agent from this checkout with the release profile (what users run; for
/// control-plane measurements) and returns its path.
pub fn build_agent_release() -> Result<PathBuf> {
    build_agent_profile(true)
}

/// Builds the agent from this checkout (debug profile) and returns its path.
pub fn build_agent() -> Result<PathBuf> {
    build_agent_profile(false)
}

fn build_agent_profile(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    args.extend(["-p", "portcullis-agent"]);
    let line = format!("cargo {}", args.join(" "));
    eprintln!("building the agent: {line}");
    let status = cargo()
        .args(&args)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    let bin = target_dir()?
        .join(if release { "release" } else { "debug" })
        .join("portcullis");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// The `probe` traffic tool (from the tests crate), built now.
pub fn probe_bin() -> Result<PathBuf> {
    let status = cargo()
        .args(["build", "-q", "-p", "portcullis-tests", "--bin", "probe"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build -p portcullis-tests --bin probe failed ({status})");
    }
    Ok(target_dir()?.join("debug").join("probe"))
}
