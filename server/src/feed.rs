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
//! - Nothing is queued per subscriber: the watch holds one clock, and each
//!   connection reads its own page of the index from its own cursor
//!   (`conn/sync.rs`). A slow subscriber therefore costs a cursor, and its
//!   pages are coalesced per document by the index itself.
//! - The announced clock is the index's, read after the publish it
//!   follows, so a subscriber that reads the index after the wake-up sees
//!   at least what was announced (visibility, 3.4, is the index's).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use notesync_protocol::Time;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::index::Index;

/// Least time between two wake-ups of the subscribers. Tens of
/// milliseconds: well inside the feed's one-second promise, and it bounds
/// the wake-ups of a namespace with many subscribers and many commits.
pub const WINDOW: Duration = Duration::from_millis(25);

/// A namespace's feed. See the module docs.
pub struct Feed {
    index: Arc<Index>,
    /// Cloned for each subscriber.
    rx: watch::Receiver<Time>,
    /// Taken by the fan-out task when the first subscriber comes.
    tx: Mutex<Option<watch::Sender<Time>>>,
}

impl Feed {
    pub fn new(index: Arc<Index>) -> Self {
        let (tx, rx) = watch::channel(index.clock());
        Feed {
            index,
            rx,
            tx: Mutex::new(Some(tx)),
        }
    }

    /// A subscription; starts the fan-out task at the first one (so a
    /// namespace nobody watches has none). Call inside the runtime.
    pub fn subscribe(&self) -> Subscription {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(tx) = tx {
            tokio::spawn(fan_out(self.index.clone(), tx));
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
    rx: watch::Receiver<Time>,
}

impl Subscription {
    /// Waits until the announced clock is past `cursor`.
    pub async fn changed_after(&mut self, cursor: Time) {
        if self.rx.wait_for(|&t| t > cursor).await.is_err() {
            // The fan-out ended (the runtime is stopping): nothing more
            // will be announced.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.index.unwatch();
    }
}

async fn fan_out(index: Arc<Index>, tx: watch::Sender<Time>) {
    let mut last = Instant::now() - WINDOW;
    loop {
        index.published().await;
        let due = last + WINDOW;
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        last = Instant::now();
        tx.send_replace(index.clock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Update;

    #[tokio::test]
    async fn subscribers_wake_after_a_publish_and_unwatched_feeds_cost_nothing() {
        let index = Arc::new(Index::rebuild(vec![(10, 1)], vec![], 10));
        let feed = Feed::new(index.clone());
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
