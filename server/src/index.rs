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
//! - The index is the change feed's one source (PROTOCOL.md 3.8): a feed
//!   reads pages of it, so a feed is coalesced per document by
//!   construction (the index holds only each document's latest time) and
//!   obeys visibility like synclist. `publish` only signals that it
//!   changed, O(1) and only while someone subscribes (`feed.rs` does the
//!   fan-out off the writer thread); whatever publishes commits (today the
//!   writer, later a message bus) feeds every subscriber by calling it.

use std::collections::{BTreeSet, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use notesync_protocol::{DocId, FeedEntry, SyncEntries, SyncEntriesBuilder, SyncEntry, Time};
use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    by_time: BTreeSet<(Time, DocId)>,
    /// Deleted documents: their `modified` is their deletion time, which
    /// never changes again (PROTOCOL.md 3.5).
    deleted: HashSet<DocId>,
    /// The clock value of the last published batch.
    clock: Time,
}

/// One published document: its `modified` before the batch (None: created
/// in it), after, and whether the batch deleted it.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub doc: DocId,
    pub old: Option<Time>,
    pub modified: Time,
    pub deleted: bool,
}

/// See the module docs.
#[derive(Default)]
pub struct Index {
    inner: RwLock<Inner>,
    /// Subscribed feeds; `publish` signals only while there are some.
    watchers: AtomicUsize,
    /// Signalled after each publish while `watchers > 0`.
    published: Notify,
}

impl Index {
    /// Builds the index from `(modified, document)` pairs in ascending order
    /// (as `doc_times` yields them), the deleted documents, and the stored
    /// clock.
    pub fn rebuild(sorted: Vec<(Time, DocId)>, deleted: Vec<DocId>, clock: Time) -> Self {
        // Collecting sorted input builds the tree in bulk, in linear time.
        let by_time = sorted.into_iter().collect();
        Index {
            inner: RwLock::new(Inner {
                by_time,
                deleted: deleted.into_iter().collect(),
                clock,
            }),
            ..Index::default()
        }
    }

    /// A page of the change feed: up to `cap` documents whose last change
    /// is after `since`, ascending, and `Some(clock)` when that is all of
    /// them (every change at or below `clock` is then listed: a valid
    /// cursor). One lock: the page and the clock are of the same state.
    pub fn feed_page(&self, since: Time, cap: usize) -> (Vec<FeedEntry>, Option<Time>) {
        let inner = self.read();
        let mut out = Vec::new();
        if since < Time::MAX {
            let from = (since + 1, 0u128);
            for &(time, doc) in inner.by_time.range(from..) {
                if out.len() == cap.max(1) {
                    return (out, None);
                }
                let deleted = inner.deleted.contains(&doc);
                out.push(FeedEntry { time, doc, deleted });
            }
        }
        (out, Some(inner.clock.max(since)))
    }

    /// Counts a subscribed feed (`publish` signals while there is one).
    pub fn watch(&self) {
        self.watchers.fetch_add(1, Ordering::AcqRel);
    }

    /// Undoes one `watch`.
    pub fn unwatch(&self) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
    }

    /// Waits for the next publish (one waiter: the namespace's fan-out).
    pub async fn published(&self) {
        self.published.notified().await;
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

    /// Publishes one committed batch, then signals the feed (O(1)) if it
    /// changed a document.
    pub fn publish(&self, updates: impl IntoIterator<Item = Update>, clock: Time) {
        let mut changed = false;
        {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            for u in updates {
                changed = true;
                if let Some(old) = u.old {
                    inner.by_time.remove(&(old, u.doc));
                }
                inner.by_time.insert((u.modified, u.doc));
                if u.deleted {
                    inner.deleted.insert(u.doc);
                }
            }
            inner.clock = inner.clock.max(clock);
        }
        // A batch that changed no document (a site for a pull) has nothing
        // to list: subscribers are not woken for it.
        if changed && self.watchers.load(Ordering::Acquire) > 0 {
            // A permit is kept if the fan-out is busy: no publish is lost.
            self.published.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(doc: DocId, old: Option<Time>, modified: Time, deleted: bool) -> Update {
        Update {
            doc,
            old,
            modified,
            deleted,
        }
    }

    #[test]
    fn feed_pages_are_coalesced_capped_and_say_deleted() {
        let idx = Index::rebuild(vec![(10, 1), (20, 2)], vec![2], 20);
        let e = |time, doc, deleted| FeedEntry { time, doc, deleted };
        assert_eq!(
            idx.feed_page(0, 10),
            (vec![e(10, 1, false), e(20, 2, true)], Some(20))
        );
        assert_eq!(idx.feed_page(0, 1), (vec![e(10, 1, false)], None));
        assert_eq!(idx.feed_page(20, 10), (vec![], Some(20)));
        // Doc 1 changes twice, doc 3 is created: one entry each, at the
        // latest time; the cursor is the clock.
        idx.publish([update(1, Some(10), 30, false)], 30);
        idx.publish(
            [update(1, Some(30), 40, false), update(3, None, 41, false)],
            45,
        );
        assert_eq!(
            idx.feed_page(20, 10),
            (vec![e(40, 1, false), e(41, 3, false)], Some(45))
        );
        idx.publish([update(3, Some(41), 50, true)], 50);
        assert_eq!(idx.feed_page(45, 10), (vec![e(50, 3, true)], Some(50)));
        // A cursor beyond the clock stays a valid cursor.
        assert_eq!(idx.feed_page(60, 10), (vec![], Some(60)));
    }

    fn entries(e: &SyncEntries) -> Vec<(Time, DocId)> {
        e.iter().map(|s| (s.modified, s.doc)).collect()
    }

    #[test]
    fn lists_after_t_in_order_with_a_cap() {
        let idx = Index::rebuild(vec![(10, 1), (20, 2), (30, 3)], vec![], 30);
        assert_eq!(
            entries(&idx.synclist(0, 10)),
            vec![(10, 1), (20, 2), (30, 3)]
        );
        assert_eq!(entries(&idx.synclist(10, 10)), vec![(20, 2), (30, 3)]);
        assert_eq!(entries(&idx.synclist(0, 2)), vec![(10, 1), (20, 2)]);
        assert_eq!(entries(&idx.synclist(30, 10)), vec![]);
        assert_eq!(entries(&idx.synclist(Time::MAX, 10)), vec![]);
        idx.publish([update(1, Some(10), 40, false)], 40);
        assert_eq!(
            entries(&idx.synclist(0, 10)),
            vec![(20, 2), (30, 3), (40, 1)]
        );
        assert_eq!(idx.clock(), 40);
        assert_eq!(idx.len(), 3);
    }
}
