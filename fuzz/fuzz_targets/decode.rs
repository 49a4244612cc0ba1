//! Feeds arbitrary bytes to the frame decoder, split at input-chosen
//! points, under input-chosen limits. The checks live in
//! `notesync_protocol::fuzzing::decode_target` so that a stable test can
//! replay the corpus (protocol/tests/fuzz_corpus.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    notesync_protocol::fuzzing::decode_target(data);
});
