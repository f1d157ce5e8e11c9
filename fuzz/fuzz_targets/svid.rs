//! Certificates a peer presents: the SVID checks run on DER that has not been verified yet.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use portcullis_agent::identity::svid;

fuzz_target!(|data: &[u8]| {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    if let Ok(leaf) = svid::check_leaf(data, now) {
        // A leaf that passes names a SPIFFE ID and is valid at `now`.
        assert!(!leaf.id.trust_domain().is_empty());
    }
    let _ = svid::ca_info(data);
});
