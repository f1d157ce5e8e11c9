//! Developer tasks: `cargo xtask <command>`.
//!
//! One module per command; a new command is a new module plus one variant in [`Command`] and
//! one arm in `main`.

mod cargo;
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Testbed(args) => testbed::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
