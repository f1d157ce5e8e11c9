//! Records read from the programs' ring buffer, decoded and turned into status events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_agent::status::{EventRecord, decode_event};

fuzz_target!(|data: &[u8]| {
    if let Some(ev) = decode_event(data) {
        let record = EventRecord::new(&ev, |kind, n| format!("{kind:?}#{n}"));
        assert!(!record.reason.is_empty());
    }
});
