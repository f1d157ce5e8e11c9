//! Developer tasks: `cargo xtask <command>`.
//!
//! One module per command; a new command is a new module plus one variant in [`Command`] and
//! one arm in `main`.

mod bench;
mod cargo;
mod demo;
mod fuzz;
mod image;
mod soak;
mod test;
mod testbed;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "portcullis developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A simulated cluster on this machine: up, down, status, exec.
    Testbed(testbed::Args),
    /// Every test: unit tests, then the privileged integration tests (as root).
    Test(test::Args),
    /// Show enforcement on a two-node testbed, in plain words, then tear it down.
    Demo(demo::Args),
    /// Benchmarks against baselines measured in the same run (no enforcement, stunnel,
    /// nftables); `--quick` for a smoke run.
    Bench(bench::Args),
    /// Fuzz every parser of outside input (libFuzzer targets in fuzz/), each for a bounded
    /// time; fails when a target finds a crashing input.
    Fuzz(fuzz::Args),
    /// The restart loop of the fault suite for many rounds (default 20): an agent SIGKILLed
    /// and restarted under load, with counted outcomes.
    Soak(soak::Args),
    /// The container image from this checkout, with podman and no registry: release
    /// binaries, a local base of the libraries they link, deploy/Dockerfile's `prebuilt`
    /// stage; tagged localhost/portcullis:dev by default.
    Image(image::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Testbed(args) => testbed::run(args),
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Image(args) => image::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
