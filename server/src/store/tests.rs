//! Test support for the store's tests (and the reply builder's): a wall
//! clock set by hand, a scratch database, one-transaction writes, and a
//! pull decoded back from its frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use notesync_protocol::{ClientCodec, DocId, Level, Pid, ServerFrame, Time};
use redb::Database;
use tokio_util::codec::Decoder;

use super::schema::Opened;
use super::{DocRecord, Rule, ServerClock, Snapshot, SystemClock, WallClock, WriteTables, open};
use crate::reply::DocFrames;

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
        f(&mut t)
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

pub fn delta(db: &Database, since: Time, rule: Rule) -> (Vec<(String, Pid)>, Vec<Pid>) {
    let snap = Snapshot::begin(db).expect("snapshot");
    let name = snap
        .doc(DOC)
        .expect("doc")
        .expect("exists")
        .doc_name()
        .expect("name");
    let mut out = DocFrames::new(DOC, name, 1 << 20, 1 << 20);
    snap.delta(DOC, since, rule, None, &mut out).expect("delta");
    let mut ins = Vec::new();
    let mut del = Vec::new();
    for f in out.finish() {
        let mut b = bytes::BytesMut::from(&f[..]);
        match ClientCodec::default().decode(&mut b) {
            Ok(Some(ServerFrame::DocResponse(r))) => {
                ins.extend(
                    r.inserts
                        .iter()
                        .map(|a| (a.data.to_owned(), a.pid.to_pid())),
                );
                del.extend(r.deletes.iter().map(|p| p.to_pid()));
            }
            other => panic!("not a 33: {other:?}"),
        }
    }
    (ins, del)
}
