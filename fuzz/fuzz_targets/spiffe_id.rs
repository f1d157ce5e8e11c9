//! SPIFFE IDs, as they arrive in certificates' URI SANs, cluster state and policy files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_agent::identity::{SpiffeId, validate_trust_domain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = validate_trust_domain(text);
    if let Ok(id) = SpiffeId::parse(text) {
        // An accepted ID is exactly its text, its parts are consistent, and it parses again.
        assert_eq!(id.as_str(), text);
        assert!(!id.trust_domain().is_empty());
        assert!(validate_trust_domain(id.trust_domain()).is_ok());
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id));
    }
});
