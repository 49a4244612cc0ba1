//! The change feed's fan-out (PROTOCOL.md 3.8): one task per namespace,
//! off the writer thread, that tells subscribed connections the index
//! changed.
//!
//! Touches only the index. Invariants:
//! - The writer's cost per commit is `Index::publish`'s O(1) signal, and
//!   only while someone subscribes; this task (started at the first
//!   subscription) turns signals into at most one wake-up of every
//!   subscriber per `WINDOW`, so a burst of commits costs each subscriber
//!   one page, not one per commit.
//! - Nothing is queued per subscriber: the watch holds one `Round`, and a
//!   connection whose cursor is not the round's `start` reads its own page
//!   of the index from its own cursor (`conn/sync.rs`). A slow subscriber
//!   therefore costs a cursor, and its pages are coalesced per document by
//!   the index itself.
//! - Each round's listing is read once: the page of the index after the
//!   last round's clock, read with the new clock under one lock and
//!   encoded once as a 38 (`Listing::Frame`), which every subscriber whose
//!   cursor is the round's `start` sends as it is (the same bytes it would
//!   have read and encoded itself). Rounds are contiguous (each `start`
//!   is the last `end`), so a subscriber that took one round's listing is
//!   at the next one's start. The watch holds only the latest round.
//! - The announced clock is the index's, read after the publish it
//!   follows, so a subscriber that reads the index after the wake-up sees
//!   at least what was announced (visibility, 3.4, is the index's).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use notesync_protocol::{FeedEntries, ServerFrame, Time};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::index::Index;

/// Least time between two wake-ups of the subscribers. Tens of
/// milliseconds: well inside the feed's one-second promise, and it bounds
/// the wake-ups of a namespace with many subscribers and many commits.
pub const WINDOW: Duration = Duration::from_millis(25);

/// One announcement of the fan-out: the index changed up to `end`.
#[derive(Clone)]
pub struct Round {
    /// The last round's `end`.
    pub start: Time,
    /// The index's clock when the round was read: every change at or below
    /// it is visible.
    pub end: Time,
    /// What the index listed after `start`, up to `end`.
    pub listing: Listing,
}

/// A round's listing, for a subscriber whose cursor is the round's start.
#[derive(Clone)]
pub enum Listing {
    /// Nothing after `start`.
    Empty,
    /// The 38 that lists every document whose last change is after
    /// `start`, ascending (at most the page cap).
    Frame(Bytes),
    /// More than a page: each subscriber reads its own.
    Unshared,
}

/// A namespace's feed. See the module docs.
pub struct Feed {
    index: Arc<Index>,
    /// Cloned for each subscriber.
    rx: watch::Receiver<Round>,
    /// Taken by the fan-out task when the first subscriber comes.
    tx: Mutex<Option<watch::Sender<Round>>>,
    /// Most entries in a round's shared 38 (the connections' page cap).
    cap: usize,
}

impl Feed {
    /// `cap`: most entries per 38 (`max_synclist_entries`).
    pub fn new(index: Arc<Index>, cap: usize) -> Self {
        let clock = index.clock();
        let (tx, rx) = watch::channel(Round {
            start: clock,
            end: clock,
            listing: Listing::Empty,
        });
        Feed {
            index,
            rx,
            tx: Mutex::new(Some(tx)),
            cap: cap.max(1),
        }
    }

    /// A subscription; starts the fan-out task at the first one (so a
    /// namespace nobody watches has none). Call inside the runtime.
    pub fn subscribe(&self) -> Subscription {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            tokio::spawn(fan_out(self.index.clone(), tx, self.cap));
        }
        self.index.watch();
        Subscription {
            index: self.index.clone(),
            rx: self.rx.clone(),
        }
    }
}

/// One connection's subscription: where it learns that the index changed,
/// and the index it reads its pages from.
pub struct Subscription {
    pub index: Arc<Index>,
    rx: watch::Receiver<Round>,
}

impl Subscription {
    /// Waits until the announced clock is past `cursor`.
    pub async fn changed_after(&mut self, cursor: Time) {
        if self.rx.wait_for(|r| r.end > cursor).await.is_err() {
            // The fan-out ended (the runtime is stopping): nothing more
            // will be announced.
            std::future::pending::<()>().await;
        }
    }

    /// The latest round (its listing is shared, not copied).
    pub fn round(&self) -> Round {
        self.rx.borrow().clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.index.unwatch();
    }
}

/// The round after `start`: the index's page after it and its clock, read
/// under one lock, the page encoded once.
fn read_round(index: &Index, start: Time, cap: usize) -> Round {
    let (page, complete) = index.feed_page(start, cap);
    let (end, listing) = match complete {
        // More than a page: the clock is read after it (at least what the
        // page saw).
        None => (index.clock(), Listing::Unshared),
        Some(end) if page.is_empty() => (end, Listing::Empty),
        Some(end) => {
            let entries = page.into_iter().collect::<FeedEntries>();
            (
                end,
                Listing::Frame(ServerFrame::FeedChanges(entries).to_bytes()),
            )
        }
    };
    Round {
        start,
        end,
        listing,
    }
}

async fn fan_out(index: Arc<Index>, tx: watch::Sender<Round>, cap: usize) {
    let mut last = Instant::now() - WINDOW;
    loop {
        index.published().await;
        let due = last + WINDOW;
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        let start = tx.borrow().end;
        let round = read_round(&index, start, cap);
        // A publish the last round already covered wakes nobody.
        if round.end > start {
            last = Instant::now();
            tx.send_replace(round);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Update;

    #[tokio::test]
    async fn subscribers_wake_after_a_publish_and_unwatched_feeds_cost_nothing() {
        let index = Arc::new(Index::rebuild(vec![(10, 1)], vec![], 10));
        let feed = Feed::new(index.clone(), 100);
        // No subscriber: no fan-out task, and publish signals nobody.
        index.publish([], 11);
        assert!(feed.tx.lock().unwrap().is_some());
        let mut a = feed.subscribe();
        let mut b = feed.subscribe();
        let update = Update {
            doc: 2,
            old: None,
            modified: 20,
            deleted: false,
        };
        index.publish([update], 20);
        for s in [&mut a, &mut b] {
            tokio::time::timeout(Duration::from_secs(5), s.changed_after(11))
                .await
                .expect("woken");
        }
        let (page, clock) = a.index.feed_page(11, 100);
        assert_eq!(page.len(), 1);
        assert_eq!(clock, Some(20));
    }
}
