//! The `portcullis` binary: see the library crate.

fn main() -> std::process::ExitCode {
    portcullis_agent::cli::main()
}
