//! The client op log: `decode_records` on arbitrary (and checksum-framed)
//! logs, replay into `Pending`, round trips. The checks live in
//! tests/src/oplog_fuzz.rs so that a stable test replays the corpus
//! (tests/tests/simulation.rs, `oplog_fuzz_corpus_replays`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/src/oplog_fuzz.rs"]
mod oplog_fuzz;

fuzz_target!(|data: &[u8]| {
    oplog_fuzz::oplog_target(data);
});
