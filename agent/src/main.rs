//! portcullis: a node agent that makes every cross-pod connection between enrolled workloads
//! prove mutual authentication, enforced by eBPF programs in the kernel.

mod admin;
mod agent;
mod auth;
mod cli;
mod cluster;
mod config;
mod datapath;
mod handshake;
mod identity;
mod input;
mod reason;
mod registry;
mod status;
mod tls;

fn main() -> std::process::ExitCode {
    cli::main()
}
