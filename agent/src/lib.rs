//! portcullis: a node agent that makes every cross-pod connection between enrolled workloads
//! prove mutual authentication, enforced by eBPF programs in the kernel.
//!
//! The crate is a library so that benchmarks and fuzz targets reach the same code as the
//! `portcullis` binary, which is a thin `main` over [`cli`].

pub mod admin;
pub mod agent;
pub mod auth;
pub mod caps;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod handshake;
pub mod identity;
pub mod input;
pub mod kubernetes;
pub mod metrics;
pub mod policy;
pub mod reason;
pub mod registry;
pub mod status;
pub mod tls;
