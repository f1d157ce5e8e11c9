//! portcullis: a node agent that makes every cross-pod connection between enrolled workloads
//! prove mutual authentication, enforced by eBPF programs in the kernel.
//!
//! The crate is a library so that benchmarks and fuzz targets reach the same code as the
//! `portcullis` binary, which is a thin `main` over [`cli`]. `docs/ARCHITECTURE.md` says which
//! module owns what.

pub mod admin;
pub mod auth;
pub mod caps;
pub mod cli;
pub mod cni;
pub mod config;
pub mod core;
pub mod creds;
pub mod datapath;
pub mod enforce;
pub mod handshake;
pub mod identity;
pub mod input;
pub mod inputs;
pub mod issuer;
pub mod journal;
pub mod metrics;
pub mod policy;
pub mod reason;
pub mod registry;
pub mod run;
pub mod status;
pub mod tls;
