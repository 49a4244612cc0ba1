//! The synclist index: documents ordered by last-modified time.
//!
//! Invariants:
//! - Only the writer publishes, once per committed batch, under one lock
//!   acquisition and after the commit: a reader sees a batch entirely or not
//!   at all, and batches in commit order. So a listed time `T` never
//!   precedes an invisible change at or below `T` (PROTOCOL.md 3.4).
//! - Every assigned time is unique, so two documents never share a
//!   `modified` and paging by "greater than the last time seen" never skips.
//! - The index holds exactly the stored `modified` of every document (the
//!   writer publishes each commit), so the writer, which read a document's
//!   stored `modified` in the batch, names the entry to replace: no map
//!   from document to time is kept (it cost 1,000,000 hash inserts at
//!   start and ~50 MB per million documents).

use std::collections::BTreeSet;
use std::sync::RwLock;

use notesync_protocol::{DocId, SyncEntries, SyncEntriesBuilder, SyncEntry, Time};

#[derive(Default)]
struct Inner {
    by_time: BTreeSet<(Time, DocId)>,
    /// The clock value of the last published batch.
    clock: Time,
}

/// See the module docs.
#[derive(Default)]
pub struct Index {
    inner: RwLock<Inner>,
}

impl Index {
    /// Builds the index from `(modified, document)` pairs in ascending order
    /// (as `doc_times` yields them); `clock` is the stored clock.
    pub fn rebuild(sorted: Vec<(Time, DocId)>, clock: Time) -> Self {
        // Collecting sorted input builds the tree in bulk, in linear time.
        let by_time = sorted.into_iter().collect();
        Index {
            inner: RwLock::new(Inner { by_time, clock }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than refusing all reads would.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `cap` documents modified after `since`, ascending by time.
    pub fn synclist(&self, since: Time, cap: usize) -> SyncEntries {
        let inner = self.read();
        let mut b = SyncEntriesBuilder::new();
        let from = (since.saturating_add(1), 0u128);
        if since < Time::MAX {
            for &(modified, doc) in inner.by_time.range(from..).take(cap) {
                b.push(SyncEntry { modified, doc });
            }
        }
        b.finish()
    }

    /// The clock of the last published batch: every change at or below it
    /// is visible.
    pub fn clock(&self) -> Time {
        self.read().clock
    }

    /// Documents in the index (the metrics' `documents`).
    pub fn len(&self) -> usize {
        self.read().by_time.len()
    }

    /// Publishes one committed batch: each document's `modified` before the
    /// batch (None: created in it) and after.
    pub fn publish(
        &self,
        updates: impl IntoIterator<Item = (DocId, Option<Time>, Time)>,
        clock: Time,
    ) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (doc, old, modified) in updates {
            if let Some(old) = old {
                inner.by_time.remove(&(old, doc));
            }
            inner.by_time.insert((modified, doc));
        }
        inner.clock = inner.clock.max(clock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(e: &SyncEntries) -> Vec<(Time, DocId)> {
        e.iter().map(|s| (s.modified, s.doc)).collect()
    }

    #[test]
    fn lists_after_t_in_order_with_a_cap() {
        let idx = Index::rebuild(vec![(10, 1), (20, 2), (30, 3)], 30);
        assert_eq!(
            entries(&idx.synclist(0, 10)),
            vec![(10, 1), (20, 2), (30, 3)]
        );
        assert_eq!(entries(&idx.synclist(10, 10)), vec![(20, 2), (30, 3)]);
        assert_eq!(entries(&idx.synclist(0, 2)), vec![(10, 1), (20, 2)]);
        assert_eq!(entries(&idx.synclist(30, 10)), vec![]);
        assert_eq!(entries(&idx.synclist(Time::MAX, 10)), vec![]);
        idx.publish([(1, Some(10), 40)], 40);
        assert_eq!(
            entries(&idx.synclist(0, 10)),
            vec![(20, 2), (30, 3), (40, 1)]
        );
        assert_eq!(idx.clock(), 40);
        assert_eq!(idx.len(), 3);
    }
}
