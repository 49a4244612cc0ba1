//! Tombstone compaction (PROTOCOL.md 3.6): the timer that asks for passes
//! and the bounded steps the writer runs between batches.
//!
//! Touches the store's write tables (one short transaction per step) and
//! the writer's queue (the timer only sends `Request::Compact`). A step
//! runs only when nothing is queued, so compaction never delays a batch
//! by more than one step.

use std::time::Duration;

use notesync_protocol::{DocId, Time};
use tokio::sync::mpsc;

use super::{Request, Writer};
use crate::store::{StoreError, WriteTables};

/// Tombstone compaction (PROTOCOL.md 3.6): atoms deleted longer than
/// `horizon` ago are dropped, in passes started every `interval`, each
/// pass in bounded steps (one short write transaction each) that run when
/// the writer has nothing else queued. A zero horizon never compacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    pub horizon: Duration,
    pub interval: Duration,
}

impl Compaction {
    #[cfg(test)]
    pub const OFF: Compaction = Compaction {
        horizon: Duration::ZERO,
        interval: Duration::ZERO,
    };

    pub(super) fn is_on(&self) -> bool {
        !self.horizon.is_zero()
    }
}

/// Chunks one compaction step looks at, at most.
const COMPACT_ENTRIES: usize = 256;
/// Documents one compaction step looks at, at most.
const COMPACT_DOCS: usize = 1024;

/// Starts the thread that asks for a pass every `interval`. It stops when
/// `stop` is dropped (the writer has ended) or the queue is closed.
pub(super) fn start_timer(
    compaction: Compaction,
    tx: &mpsc::Sender<Request>,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::io::Result<()> {
    // Weak: the writer stops once every connection's sender is gone,
    // whatever the timer does.
    let weak = tx.downgrade();
    let every = compaction.interval.max(Duration::from_millis(1));
    std::thread::Builder::new()
        .name("notesync-compaction-timer".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
                let Some(tx) = weak.upgrade() else { break };
                // A full queue skips a round; a closed one ends the timer.
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Request::Compact) {
                    break;
                }
            }
        })?;
    Ok(())
}

impl Writer {
    /// One bounded step of the compaction pass: its own short write
    /// transaction. A failure ends the pass (the next one retries).
    pub(super) fn compact_step(&mut self) {
        let Some(from) = self.sweep else { return };
        let horizon = self.compaction.horizon.as_micros().min(u64::MAX as u128) as u64;
        let cutoff = self.clock.wall_now().saturating_sub(horizon);
        match self.compact_docs(from, cutoff) {
            Ok(next) => self.sweep = next,
            Err(e) => {
                tracing::error!(error = %e, "tombstone compaction step failed; retried at the next pass");
                self.sweep = None;
            }
        }
    }

    /// Compacts documents from `from` on (in id order) until a budget runs
    /// out; returns where the pass goes on (None: it is done).
    fn compact_docs(&mut self, from: DocId, cutoff: Time) -> Result<Option<DocId>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut entries = COMPACT_ENTRIES;
        let mut wrote = false;
        let mut dropped = 0;
        let next = {
            let mut t = WriteTables::open(&txn)?;
            let mut cursor = from;
            let mut docs = 0;
            let next = loop {
                let Some((doc, mut rec)) = t.doc_from(cursor)? else {
                    break None;
                };
                docs += 1;
                if rec.deleted == 0 && rec.swept < cutoff {
                    let step = t.compact_doc(doc, rec.swept, cutoff, entries)?;
                    entries = entries.saturating_sub(step.visited);
                    dropped += step.dropped;
                    // A document with no change since its last sweep is
                    // not rewritten: an idle pass over many documents
                    // writes nothing (its next sweep starts where this one
                    // would have, and finds the same nothing).
                    if step.visited > 0 {
                        rec.swept = step.swept;
                        rec.compacted = rec.compacted.max(step.compacted);
                        t.put_doc(doc, &rec, Some(rec.modified))?;
                        wrote = true;
                    }
                    if !step.done {
                        break Some(doc);
                    }
                }
                let Some(n) = doc.checked_add(1) else {
                    break None;
                };
                cursor = n;
                if entries == 0 || docs >= COMPACT_DOCS {
                    break Some(cursor);
                }
            };
            t.flush()?;
            next
        };
        if wrote {
            txn.commit()?;
            if dropped > 0 {
                tracing::debug!(dropped, cutoff, "tombstone compaction step");
            }
        } else {
            txn.abort()?;
        }
        Ok(next)
    }
}
