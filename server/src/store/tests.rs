//! Test support for the store's tests (and the reply builder's): a wall
//! clock set by hand, a scratch database, one-transaction writes, and
//! what a pull hands over, collected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use notesync_protocol::{DocId, Level, Pid, Time};
use redb::Database;

use super::schema::Opened;
use super::{
    DeltaSink, DocRecord, Rule, ServerClock, Snapshot, StoreError, SystemClock, WallClock,
    WriteTables, open,
};

/// A wall clock the test sets by hand.
pub struct FakeClock(pub AtomicU64);

impl WallClock for FakeClock {
    fn now_micros(&self) -> Time {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn pid(ident: u32, site: u8) -> Pid {
    Pid::from_levels(&[Level::new(ident, site)])
}

pub const DOC: DocId = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;

pub fn open_tmp() -> (tempfile::TempDir, Opened) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = open(dir.path()).expect("open");
    (dir, opened)
}

/// Runs `f` in one committed write transaction.
pub fn write<R>(db: &Database, f: impl FnOnce(&mut WriteTables<'_>) -> R) -> R {
    let txn = db.begin_write().expect("begin");
    let r = {
        let mut t = WriteTables::open(&txn).expect("tables");
        let r = f(&mut t);
        t.flush().expect("flush");
        r
    };
    txn.commit().expect("commit");
    r
}

/// A scratch database holding DOC, and a server clock on the system
/// clock.
pub fn with_doc() -> (tempfile::TempDir, Opened, ServerClock) {
    let (dir, o) = open_tmp();
    let mut clock = ServerClock::new(Arc::new(SystemClock), o.clock);
    create_doc(&o.db, &mut clock);
    (dir, o, clock)
}

pub fn create_doc(db: &Database, clock: &mut ServerClock) {
    write(db, |t| {
        let rec = DocRecord {
            modified: clock.next(),
            name_time: 0,
            next_site: 1,
            deleted: 0,
            swept: 0,
            compacted: 0,
            name: "n".into(),
        };
        t.put_doc(DOC, &rec, None).expect("put");
        t.set_clock(clock.last()).expect("clock");
    });
}

/// (inserted data, deleted pids) a pull since `since` sends.
pub fn pull(db: &Database, since: Time) -> (Vec<(String, Pid)>, Vec<Pid>) {
    delta(db, since, Rule::Pull)
}

/// What a delta hands over, as the store hands it over.
#[derive(Default)]
pub struct Collected {
    pub inserts: Vec<(String, Pid)>,
    pub deletes: Vec<Pid>,
    pub resync: bool,
}

impl DeltaSink for Collected {
    fn insert(&mut self, data: &str, pid: &Pid) -> Result<(), StoreError> {
        self.inserts.push((data.to_owned(), pid.clone()));
        Ok(())
    }

    fn delete(&mut self, pid: &Pid) -> Result<(), StoreError> {
        self.deletes.push(pid.clone());
        Ok(())
    }

    fn resync(&mut self) {
        self.resync = true;
    }
}

pub fn delta(db: &Database, since: Time, rule: Rule) -> (Vec<(String, Pid)>, Vec<Pid>) {
    let snap = Snapshot::begin(db).expect("snapshot");
    let mut out = Collected::default();
    snap.delta(DOC, since, rule, None, &mut out).expect("delta");
    assert!(!out.resync, "a delta is never a resync");
    (out.inserts, out.deletes)
}

/// Every chunk decodes, holds only ids between its key and the next
/// chunk's, has its `chunk_times` entry at a `changed` at least every time
/// it holds, and `chunk_times` names nothing else (what `check` checks of
/// the layout, without the operations layer).
pub fn assert_layout_ok(txn: &redb::ReadTransaction) {
    let db = super::Inspect::new(txn);
    for row in db.chunks().expect("chunks") {
        let row = row.expect("row");
        assert!(row.problems.is_empty(), "{:?}", row.problems);
        let changed = row.changed.expect("decodes");
        assert!(row.max_time <= changed, "{} > {changed}", row.max_time);
    }
    for row in db.chunk_times().expect("chunk_times") {
        let (doc, t, ok) = row.expect("row");
        assert!(
            ok,
            "document {doc:x}: chunk_times entry at {t} names no chunk"
        );
    }
}
