//! The authorization policy: the policy file (or the `policy.yaml` key of its ConfigMap), and
//! a manifest of PortcullisPolicy / PortcullisClusterPolicy objects as `check-policy` and the
//! issuer check them.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis_agent::policy::{Policy, manifest};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Policy::parse(Path::new("policy.yaml"), text);
        if manifest::is_manifest(text) {
            let _ = manifest::check_manifest(text, "default", "cluster.local");
        }
    }
});
