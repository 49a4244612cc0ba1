//! The client op log's fuzz target as a plain function, shared by the
//! cargo-fuzz target `oplog` (fuzz/fuzz_targets/oplog.rs) and a stable test
//! that replays the checked-in corpus (`fuzz/corpus/oplog/`, in
//! tests/tests/simulation.rs). Both include this file by path, so it is not
//! a module of the notesync-tests library.
//!
//! # Input layout
//!
//! ```text
//! byte 0      bit 0 = 1: the rest is a log file as is;
//!             bit 0 = 0: the rest is a list of payloads (u8 len, then len
//!             bytes), each framed as the log frames it (u32 len, payload,
//!             u32 crc32), so that inputs get past the checksum; bit 1 adds
//!             a corrupt tail.
//! byte 1      where to cut the log for the torn-write check
//! ```
//!
//! # What is checked
//!
//! - `decode_records` never panics, returns a valid prefix length, and
//!   decoding that prefix alone gives the same records; a log cut anywhere
//!   inside decodes to a prefix of the records (a torn last write drops the
//!   tail, never misreads it).
//! - Records re-encode (`encode_records`) to a log that decodes back to
//!   them, whole.
//! - Replaying the records into `Pending` never panics; every pending op
//!   is listed exactly once by `ops_since(0)`; the state's own records
//!   (`to_records`) rebuild the same pending ops; acknowledging the
//!   snapshot's ops empties it.

use notesync_client::oplog::{Pending, PendingOp, Record, decode_records, encode_records};

pub fn oplog_target(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&cut, rest)) = rest.split_first() else {
        return;
    };
    let log: Vec<u8> = if flags & 1 == 1 {
        rest.to_vec()
    } else {
        let mut log = Vec::new();
        let mut r = rest;
        while let Some((&len, tail)) = r.split_first() {
            let len = (len as usize).min(tail.len());
            let payload = &tail[..len];
            log.extend_from_slice(&(len as u32).to_be_bytes());
            log.extend_from_slice(payload);
            log.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
            r = &tail[len..];
        }
        if flags & 2 == 2 {
            log.extend_from_slice(&[0, 0, 0, 9, 1, 2, 3]);
        }
        log
    };

    let (records, used) = decode_records(&log);
    assert!(used <= log.len(), "valid prefix {used} past the end");
    let (again, used2) = decode_records(&log[..used]);
    assert_eq!(
        (&again, used2),
        (&records, used),
        "the valid prefix alone decodes the same"
    );
    if used > 0 {
        let c = cut as usize % used;
        let (part, n) = decode_records(&log[..c]);
        assert!(n <= c);
        assert!(
            records.starts_with(&part),
            "a torn log decodes to a prefix of the records"
        );
    }
    let encoded = encode_records(&records);
    let (round, n) = decode_records(&encoded);
    assert_eq!(n, encoded.len(), "re-encoded records decode whole");
    assert_eq!(round, records, "records round-trip");

    let mut p = Pending::default();
    for r in &records {
        p.replay(r);
    }
    check_pending(&p);

    // The state's own records rebuild it.
    let mut q = Pending::default();
    for r in &p.to_records() {
        q.replay(r);
    }
    assert_eq!(q.snapshot(), p.snapshot(), "to_records rebuilds the state");
    assert_eq!(q.len(), p.len());
    check_pending(&q);

    // Acknowledging everything empties it.
    let (ins, dels, name) = p.snapshot();
    let ins: Vec<_> = ins.iter().map(|a| a.pid().clone()).collect();
    p.acknowledge(&ins, &dels, name.as_ref());
    assert!(p.is_empty(), "acknowledging every op empties the log");
    assert!(p.ops_since(0).is_empty(), "nothing left to send");
    assert!(
        p.to_records()
            .iter()
            .all(|r| matches!(r, Record::Cancel { .. }))
    );
}

/// Every pending op is listed once by `ops_since(0)`, in increasing order.
fn check_pending(p: &Pending) {
    let ops = p.ops_since(0);
    assert!(
        ops.windows(2).all(|w| w[0].0 < w[1].0),
        "ops_since is in sequence order"
    );
    assert_eq!(
        ops.len(),
        p.len(),
        "every pending op is listed once: {ops:?}"
    );
    let (ins, dels, name) = p.snapshot();
    for (_, op) in &ops {
        match op {
            PendingOp::Insert(a) => assert!(ins.contains(a)),
            PendingOp::Delete(d) => assert!(dels.contains(d)),
            PendingOp::Rename(n) => assert_eq!(Some(n), name.as_ref()),
        }
    }
}
