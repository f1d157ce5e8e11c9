use which::which;

/// The crate's build has an undeclared dependency on the `bpf-linker` binary: rebuild when it
/// changes (a new bpf-linker may be built against another LLVM).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found on PATH: {e}"),
    }
}
