//! `cargo xtask image`: the container image, built on this machine from this checkout with
//! podman, where no registry can be reached. The release binaries are built here; the runtime
//! base is made from the libraries they link (once: it is found again by its tag); then
//! deploy/Dockerfile's `prebuilt` stage puts the binaries on it. The image tests build the
//! same way (testbed::container).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testbed::container::{self, IMAGE_BINARIES, ImageBuild};

use crate::cargo;

#[derive(clap::Args)]
pub struct Args {
    /// A binary of the agent crate to put in /usr/bin (repeat for several); default:
    /// portcullis and portcullis-cni.
    #[arg(long = "bin", value_name = "NAME")]
    bins: Vec<String>,
    /// The image's tag.
    #[arg(long, default_value = "localhost/portcullis:dev")]
    tag: String,
}

pub fn run(args: Args) -> Result<i32> {
    let started = Instant::now();
    if std::process::Command::new("podman")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("podman is missing: scripts/bootstrap.sh installs it (and runc)");
    }
    let bins: Vec<String> = if args.bins.is_empty() {
        IMAGE_BINARIES.iter().map(ToString::to_string).collect()
    } else {
        args.bins
    };

    eprintln!("== [1/2] the release binaries: {}", bins.join(", "));
    let t = Instant::now();
    let binaries = build_release(&bins)?;
    let cargo_time = t.elapsed();

    eprintln!("== [2/2] the image {}", args.tag);
    let built = container::build_image(&ImageBuild {
        dockerfile: cargo::workspace_root().join("deploy/Dockerfile"),
        binaries,
        tag: args.tag,
        work_dir: cargo::target_dir()?.join("image"),
        strip_debug: false,
        verbose: true,
    })?;

    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    println!("image     {} ({})", built.tag, short_id(&built.id));
    println!(
        "size      {:.1} MB (uncompressed, as `podman images` shows it)",
        built.size_bytes as f64 / 1e6
    );
    println!(
        "binaries  {}",
        bins.iter()
            .map(|b| format!("/usr/bin/{b}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "base      {} ({})",
        built.base,
        if built.base_created {
            "made now"
        } else {
            "cached"
        }
    );
    println!(
        "time      {} in all: cargo build {}, base {}, podman build {}",
        secs(started.elapsed()),
        secs(cargo_time),
        secs(built.base_time),
        secs(built.build_time)
    );
    Ok(0)
}

/// `cargo build --release -p portcullis-agent --bin NAME…`; the paths of the binaries. A name
/// the crate does not declare fails the build (cargo names it).
fn build_release(bins: &[String]) -> Result<Vec<PathBuf>> {
    let mut args = vec!["build", "--release", "-p", "portcullis-agent"];
    for b in bins {
        args.extend(["--bin", b.as_str()]);
    }
    let line = format!("cargo {}", args.join(" "));
    eprintln!("{line}");
    let status = cargo::cargo()
        .args(&args)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    let dir = cargo::target_dir()?.join("release");
    bins.iter()
        .map(|b| {
            let p = dir.join(b);
            if p.is_file() {
                Ok(p)
            } else {
                bail!("the build succeeded but {} does not exist", p.display())
            }
        })
        .collect()
}

/// The first 12 hex digits of an image id, as podman shows it.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}
