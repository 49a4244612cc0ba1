//! Storage faults (test only): the store opened over a redb storage
//! backend that fails its k-th write, sync_data or set_len, once or from k
//! on (SQLite's recipe), for k = 1, 2, ... until a run injects nothing.
//! The writer thread is driven with upserts exactly as connections drive
//! it. Checked, for every k and both modes:
//! - a failed commit is reported as `storage` and never acknowledged; a
//!   fault inside the upserts' commits is always reported;
//! - "recovery": the bytes are reopened over a healthy backend, both as a
//!   process crash leaves them (every write made) and as a power loss does
//!   (only what was synced); the database opens, `check_integrity` passes,
//!   the store opens, and its content holds every acknowledged upsert,
//!   each upsert all or nothing;
//! - the recovered store takes writes again.
//!
//! A failed write is torn: the first half of its bytes lands.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use notesync_protocol::{Atom, AtomListBuilder, DocName, Level, Pid, PidListBuilder, Upsert};
use redb::{Database, StorageBackend};

use crate::index::Index;
use crate::store::{ServerClock, Snapshot, SystemClock, open_database};
use crate::writer::{self, Request, WriteError};

#[derive(Debug, Default)]
struct Plan {
    armed: AtomicBool,
    count: AtomicU64,
    fail_at: u64,
    persistent: bool,
    injected: AtomicU64,
}

impl Plan {
    fn fails(&self) -> bool {
        if !self.armed.load(Ordering::SeqCst) {
            return false;
        }
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = n == self.fail_at || (self.persistent && n > self.fail_at);
        if fail {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }
}

fn injected() -> io::Error {
    io::Error::other("injected storage fault")
}

/// An in-memory file: `bytes` as written, `synced` as of the last sync.
#[derive(Debug, Clone, Default)]
struct Faulty {
    bytes: Arc<Mutex<Vec<u8>>>,
    synced: Arc<Mutex<Vec<u8>>>,
    plan: Arc<Plan>,
}

impl StorageBackend for Faulty {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.bytes.lock().expect("lock").len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let b = self.bytes.lock().expect("lock");
        let start = offset as usize;
        let end = start + out.len();
        if end > b.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        out.copy_from_slice(&b[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        if self.plan.fails() {
            return Err(injected());
        }
        self.bytes.lock().expect("lock").resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        if self.plan.fails() {
            return Err(injected());
        }
        let b = self.bytes.lock().expect("lock").clone();
        *self.synced.lock().expect("lock") = b;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let fail = self.plan.fails();
        let data = if fail { &data[..data.len() / 2] } else { data };
        let mut b = self.bytes.lock().expect("lock");
        let start = offset as usize;
        if b.len() < start + data.len() {
            b.resize(start + data.len(), 0);
        }
        b[start..start + data.len()].copy_from_slice(data);
        if fail { Err(injected()) } else { Ok(()) }
    }
}

const DOC: u128 = 0xFA17;
const REPLICA: u128 = 7;
const UPSERTS: u32 = 10;

fn pid(ident: u32) -> Pid {
    Pid::from_levels(&[Level::new(ident, 1)])
}

/// The ops of upsert `u`: three inserts, and a delete of an earlier atom.
fn ops(u: u32) -> (Vec<Atom>, Vec<Pid>) {
    let inserts = (0..3)
        .map(|j| Atom::new(format!("u{u}.{j}"), pid(u * 10 + j)).expect("atom"))
        .collect();
    let deletes = if u > 0 {
        vec![pid((u - 1) * 10 + 1)]
    } else {
        Vec::new()
    };
    (inserts, deletes)
}

fn upsert(u: u32) -> Upsert {
    let (ins, dels) = ops(u);
    let mut a = AtomListBuilder::new();
    for x in &ins {
        a.push(x);
    }
    let mut d = PidListBuilder::new();
    for p in &dels {
        d.push(p).expect("pid");
    }
    Upsert {
        doc: DOC,
        name: DocName::new("faults").expect("name"),
        since: 0,
        inserts: a.finish(),
        deletes: d.finish(),
    }
}

/// Opens the store over `backend`, runs `upserts` through a writer thread,
/// stops it (closing the database). Returns each upsert's outcome (true:
/// acknowledged) and the faults injected before the stop.
fn drive(backend: Faulty, upserts: std::ops::Range<u32>, arm: bool) -> (Vec<(u32, bool)>, u64) {
    let db = Database::builder()
        .create_with_backend(backend.clone())
        .expect("create over a healthy backend");
    let opened = open_database(db, PathBuf::from("faulty.redb")).expect("open the store");
    backend.plan.armed.store(arm, Ordering::SeqCst);
    let db = Arc::new(opened.db);
    let clock = ServerClock::new(Arc::new(SystemClock), opened.clock);
    let index = Arc::new(Index::rebuild(
        opened.doc_times,
        opened.deleted,
        opened.clock,
    ));
    let (tx, thread, _) = writer::spawn(db.clone(), clock, index, 16, 8).expect("writer");
    let mut out = Vec::new();
    for u in upserts {
        let (req, rx) = Request::upsert(Some(REPLICA), Arc::new(upsert(u)));
        tx.blocking_send(req).expect("writer takes requests");
        match rx.blocking_recv().expect("the writer answers") {
            Ok(site) => {
                assert_eq!(site, 1, "the only replica has site 1");
                out.push((u, true));
            }
            Err(WriteError::Storage(_)) => out.push((u, false)),
            Err(e) => panic!("upsert {u}: unexpected {e:?}"),
        }
    }
    let during = backend.plan.injected.load(Ordering::SeqCst);
    let _ = tx.blocking_send(Request::Stop);
    drop(tx);
    thread.join().expect("the writer thread does not panic");
    drop(db);
    (out, during)
}

/// Reopens `bytes` over a healthy backend and checks it against what was
/// acknowledged. Returns the number of unacknowledged upserts found stored.
fn recover(bytes: Vec<u8>, outcomes: &[(u32, bool)], what: &str) -> usize {
    let healthy = Faulty {
        bytes: Arc::new(Mutex::new(bytes)),
        ..Faulty::default()
    };
    let mut db = Database::builder()
        .create_with_backend(healthy.clone())
        .unwrap_or_else(|e| panic!("{what}: the database does not reopen: {e}"));
    db.check_integrity()
        .unwrap_or_else(|e| panic!("{what}: integrity check fails: {e}"));
    let opened = open_database(db, PathBuf::from("recovered.redb"))
        .unwrap_or_else(|e| panic!("{what}: the store does not reopen: {e}"));
    let snap = Snapshot::begin(&opened.db).expect("snapshot");
    let mut stored_unacked = 0;
    for &(u, acked) in outcomes {
        let (ins, dels) = ops(u);
        let mut present = 0;
        for a in &ins {
            let rec = snap.atom(DOC, a.pid()).expect("read");
            // A deleted id keeps no text (schema 4): its insert time says
            // it was stored.
            if rec
                .is_some_and(|r| r.insert != 0 && (r.delete != 0 || r.data == a.data().as_bytes()))
            {
                present += 1;
            }
        }
        for p in &dels {
            if snap
                .atom(DOC, p)
                .expect("read")
                .is_some_and(|r| r.delete != 0)
            {
                present += 1;
            }
        }
        let total = ins.len() + dels.len();
        assert!(
            present == 0 || present == total,
            "{what}: upsert {u} is stored in part ({present} of {total} ops)"
        );
        if acked {
            assert_eq!(
                present, total,
                "{what}: acknowledged upsert {u} is missing after recovery"
            );
        } else if present == total {
            stored_unacked += 1;
        }
    }
    drop(snap);
    drop(opened);
    // The recovered store takes writes again.
    let (more, _) = drive(healthy, 100..101, false);
    assert_eq!(more, vec![(100, true)], "{what}: writes after recovery");
    stored_unacked
}

fn run_mode(persistent: bool) {
    let mode = if persistent { "from k on" } else { "once" };
    let mut faults = 0;
    let mut storage_replies = 0;
    let mut stored_unacked = 0;
    let mut close_faults = 0;
    let mut k = 1;
    loop {
        let plan = Arc::new(Plan {
            fail_at: k,
            persistent,
            ..Plan::default()
        });
        let backend = Faulty {
            plan: plan.clone(),
            ..Faulty::default()
        };
        let (outcomes, during) = drive(backend.clone(), 0..UPSERTS, true);
        let n = plan.injected.load(Ordering::SeqCst);
        if n == 0 {
            assert!(
                outcomes.iter().all(|&(_, ok)| ok),
                "no fault, yet a storage error"
            );
            break;
        }
        faults += n;
        let refused = outcomes.iter().filter(|&&(_, ok)| !ok).count();
        storage_replies += refused;
        if during > 0 {
            assert!(
                refused > 0,
                "k={k} ({mode}): a fault was injected into the commits but no upsert got `storage`"
            );
        } else {
            // The fault hit the close: everything was acknowledged.
            assert_eq!(refused, 0, "k={k} ({mode}): `storage` without a fault");
            close_faults += 1;
        }
        let what = format!("k={k} ({mode})");
        let crash = backend.bytes.lock().expect("lock").clone();
        let power = backend.synced.lock().expect("lock").clone();
        stored_unacked += recover(crash, &outcomes, &format!("{what}, crash view"));
        stored_unacked += recover(power, &outcomes, &format!("{what}, power-loss view"));
        k += 1;
    }
    eprintln!(
        "storage faults ({mode}): k = 1..{}, {faults} faults injected, {storage_replies} upserts \
         answered `storage`, {close_faults} runs faulted only while closing, {stored_unacked} \
         unacknowledged upserts found stored after recovery",
        k - 1
    );
    assert!(k > 10, "too few fault points: {k}");
}

#[test]
fn a_fault_at_each_storage_op_once_is_reported_and_loses_nothing_acknowledged() {
    run_mode(false);
}

#[test]
fn persistent_faults_from_each_storage_op_are_reported_and_lose_nothing_acknowledged() {
    run_mode(true);
}
