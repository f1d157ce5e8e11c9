//! The `portcullis-cni` plugin binary: see `portcullis_agent::cni`.

fn main() -> std::process::ExitCode {
    portcullis_agent::cni::plugin::main()
}
