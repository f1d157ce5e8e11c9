//! What a newcomer sees when building: the agent's build script compiles the kernel programs
//! with a cargo of its own, and that build's progress lines used to reach the user as dozens
//! of `warning: portcullis-agent@…` lines. It now shows that output only when the build fails.

use std::{path::Path, process::Command};

#[test]
fn building_the_agent_prints_nothing_of_the_inner_ebpf_build() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    // A new value makes cargo run the build script, and so the eBPF build, again.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let out = Command::new(cargo)
        .args(["build", "-p", "portcullis-agent"])
        .current_dir(&root)
        .env("PORTCULLIS_EBPF_REBUILD", nonce.to_string())
        .output()
        .expect("running cargo build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the build failed:\n{stderr}");
    let noise: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: portcullis-agent@"))
        .collect();
    assert!(
        noise.is_empty(),
        "the inner eBPF build's output reached the user ({} lines):\n{}",
        noise.len(),
        noise.join("\n")
    );
}
