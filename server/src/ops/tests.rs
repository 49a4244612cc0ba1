//! Test support for the operations commands' tests: a small healthy
//! namespace database, written through the store's API.

use std::sync::Arc;

use notesync_protocol::{DocId, Level, Pid};
use redb::{Database, ReadableDatabase};

use super::{CheckReport, check_namespace};
use crate::store::{self, DocRecord, ServerClock, SystemClock, WriteTables};

pub const DOC: DocId = 0xfeed_0000_0000_0000_0000_0000_0000_0001;

pub fn pid(levels: &[(u32, u8)]) -> Pid {
    let l: Vec<Level> = levels.iter().map(|&(i, s)| Level::new(i, s)).collect();
    Pid::from_levels(&l)
}

/// A namespace database (in a scratch folder) holding DOC: "hello"
/// (deleted 'e' at its virtual id), " ", "world" (deleted whole), "!" and
/// a bare tombstone.
pub fn healthy() -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = store::open(dir.path()).expect("open");
    let db = opened.db;
    let mut clock = ServerClock::new(Arc::new(SystemClock), opened.clock);
    let txn = db.begin_write().expect("write");
    {
        let mut t = WriteTables::open(&txn).expect("tables");
        let rec = DocRecord {
            modified: clock.next(),
            name_time: 0,
            next_site: 2,
            deleted: 0,
            swept: 0,
            compacted: 0,
            name: "greeting".into(),
        };
        t.put_doc(DOC, &rec, None).expect("doc");
        t.put_site(DOC, 7, 1).expect("site");
        for (p, data) in [
            (pid(&[(10, 1)]), "hello"),
            (pid(&[(20, 1)]), " "),
            (pid(&[(30, 1)]), "world"),
            (pid(&[(40, 1)]), "!"),
        ] {
            t.insert_atom(DOC, p.key(), data.as_bytes(), &mut clock)
                .expect("insert");
        }
        // 'e' of "hello": its virtual id; the whole of "world"; an id
        // never inserted.
        for p in [pid(&[(10, 1), (1, 1)]), pid(&[(30, 1)]), pid(&[(50, 1)])] {
            t.delete_atom(DOC, p.key(), 1, &mut clock).expect("delete");
        }
        let mut rec = t.doc(DOC).expect("doc").expect("exists");
        let old = rec.modified;
        rec.modified = clock.next();
        t.put_doc(DOC, &rec, Some(old)).expect("doc");
        t.set_clock(clock.last()).expect("clock");
        t.flush().expect("flush");
    }
    txn.commit().expect("commit");
    (dir, db)
}

pub fn check(db: &Database) -> CheckReport {
    check_namespace("default", &db.begin_read().expect("read")).expect("check runs")
}
