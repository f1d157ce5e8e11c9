//! The authorization policy file (or the `policy.yaml` key of its ConfigMap).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis_agent::policy::Policy;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Policy::parse(Path::new("policy.yaml"), text);
    }
});
