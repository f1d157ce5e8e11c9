//! The agent's configuration file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(Path::new("/etc/portcullis/agent.yaml"), text);
    }
});
