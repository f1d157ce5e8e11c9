//! Node session frames from a peer (after the TLS handshake, before any trust in their content).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_agent::handshake::wire::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = Message::decode(data) {
        // What decodes re-encodes to a frame that decodes to the same message.
        let frame = msg.encode();
        let again = Message::decode(&frame[4..]).expect("a re-encoded message decodes");
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
});
