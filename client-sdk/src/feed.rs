//! The background sync ([`Client::sync_loop`](crate::Client::sync_loop)):
//! one connection that follows the server's change feed (PROTOCOL.md 3.8)
//! and pulls each changed note as its entry arrives, or, on a server
//! without the feed (a version before 4), a sync every interval.
//!
//! On each connection: a full sync first (what changed while this device
//! was away, and every local edit), then a 5 from the store's cursor. Each
//! batch of entries is pulled on the same connection (pulls fall between
//! the feed's frames; [`Conn`] sets the feed aside while a reply is read),
//! and the cursor in the store's state moves to what the batch covered
//! once every note in it was pulled, so a reconnect, or a restart of the
//! app, resubscribes from there and misses nothing. Local edits are sent
//! when [`SyncLoop::sync_soon`] (or any edit through the [`Client`]) asks.
//!
//! May touch: the store (through the sync functions), one connection at a
//! time, its channels to the app. The rules it keeps:
//! - One task, one connection: syncs never run concurrently on a store.
//! - Never pulls a note a live session of this client holds: the session
//!   has every op already (it would be pulled again, op by op).
//! - A feed silent for [`FEED_SILENCE`] is a dead connection: heartbeats
//!   come at most 15 s apart (3.8).
//!
//! [`Client`]: crate::Client

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notesync_protocol::{DocId, Time};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::net::{Conn, FeedBatch, ServerConfig};
use crate::store::{Store, lock};
use crate::sync::{Listing, SyncError, SyncReport, sync_on};

/// A subscribed connection that hears nothing for this long is dropped and
/// made again: three times the longest heartbeat interval (PROTOCOL.md 3.8).
pub const FEED_SILENCE: Duration = Duration::from_secs(45);
/// The first retry after a failure; doubled per failure up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Events not yet read by the app; the loop waits when they are this many
/// (a reader that does not keep up slows syncing, it queues nothing).
const EVENTS: usize = 16;

/// What the background sync did.
#[derive(Debug)]
pub enum SyncEvent {
    /// Connected, first or again after a failure, or the way of learning
    /// of changes changed. `feed`: changes come from the server's change
    /// feed within a moment; else (a server before protocol version 4)
    /// from a sync every interval.
    Connected { feed: bool },
    /// A sync finished: the first one of a connection, one that sent local
    /// edits, or the pull of notes the feed listed.
    Synced(SyncReport),
    /// A sync or the connection failed; edits stay in the op logs and the
    /// loop tries again after `retry_in` (sooner when asked to sync).
    Failed {
        error: SyncError,
        retry_in: Duration,
    },
}

/// Notes with a live session open on this client (counted, as one note
/// may have several sessions).
#[derive(Clone, Default)]
pub(crate) struct LiveNotes(Arc<Mutex<HashMap<DocId, usize>>>);

impl LiveNotes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DocId, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn open(&self, doc: DocId) {
        *self.lock().entry(doc).or_default() += 1;
    }

    pub(crate) fn close(&self, doc: DocId) {
        let mut live = self.lock();
        if let Some(n) = live.get_mut(&doc) {
            *n -= 1;
            if *n == 0 {
                live.remove(&doc);
            }
        }
    }

    fn contains(&self, doc: DocId) -> bool {
        self.lock().contains_key(&doc)
    }
}

/// The background sync of a [`Client`](crate::Client); stops when dropped
/// or [`stop`](SyncLoop::stop)ped.
pub struct SyncLoop {
    wake: mpsc::Sender<()>,
    events: mpsc::Receiver<SyncEvent>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl SyncLoop {
    pub(crate) fn start(
        store: Arc<Mutex<Store>>,
        server: ServerConfig,
        live: LiveNotes,
        every: Duration,
        wake: (mpsc::Sender<()>, mpsc::Receiver<()>),
    ) -> SyncLoop {
        let (event_tx, events) = mpsc::channel(EVENTS);
        let cancel = CancellationToken::new();
        let task = run(Task {
            store,
            server,
            live,
            every,
            wake: wake.1,
            events: event_tx,
            connected: None,
            backoff: MIN_BACKOFF,
        });
        let stopped = cancel.clone();
        // Cancelling drops the loop wherever it waits, a sync included:
        // ops of an upsert not acknowledged stay in the log (marked sent,
        // sent again next time) and the cursor stays where it was.
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = stopped.cancelled() => {}
                _ = task => {}
            }
        });
        SyncLoop {
            wake: wake.0,
            events,
            cancel,
            task: Some(task),
        }
    }

    /// What stops this loop (its `Client` stops it when another starts).
    pub(crate) fn stopper(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Asks for a sync soon (local edits to send); many asks while one
    /// sync runs make one more sync.
    pub fn sync_soon(&self) {
        let _ = self.wake.try_send(());
    }

    /// The next thing the loop did; None once it has stopped.
    pub async fn next_event(&mut self) -> Option<SyncEvent> {
        self.events.recv().await
    }

    /// Stops the loop and waits until it has. A sync cut short leaves
    /// its ops in the log (they go at the next sync; upserts are
    /// idempotent) and the cursor where it was.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SyncLoop {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Task {
    store: Arc<Mutex<Store>>,
    server: ServerConfig,
    live: LiveNotes,
    every: Duration,
    wake: mpsc::Receiver<()>,
    events: mpsc::Sender<SyncEvent>,
    /// How the last connection learnt of changes (feed or not); None
    /// after a failure, so the next success is announced.
    connected: Option<bool>,
    backoff: Duration,
}

/// How a connection ended without an error.
enum Ended {
    /// The server has no feed: the poll round is done.
    Polled,
    /// Every handle on the loop is gone.
    Abandoned,
}

async fn run(mut t: Task) {
    loop {
        let wait = match connection(&mut t).await {
            Ok(Ended::Abandoned) => return,
            Ok(Ended::Polled) => t.every,
            Err(error) => {
                t.connected = None;
                let retry_in = t.backoff;
                t.backoff = (t.backoff * 2).min(MAX_BACKOFF);
                if !error.is_transient() {
                    tracing::warn!(%error, "sync failed; will retry");
                }
                if t.events
                    .send(SyncEvent::Failed { error, retry_in })
                    .await
                    .is_err()
                {
                    return;
                }
                retry_in
            }
        };
        tokio::select! {
            w = t.wake.recv() => if w.is_none() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One connection's life: connect, sync, then follow the feed until the
/// connection fails (or, without a feed, return after the sync).
async fn connection(t: &mut Task) -> Result<Ended, SyncError> {
    let replica = lock(&t.store).replica_id();
    let mut conn = Conn::connect(&t.server, replica).await?;
    let feed = conn.speaks_feed();
    // Asks that came before this sync are answered by it.
    while t.wake.try_recv().is_ok() {}
    let (report, _) = sync_on(&mut conn, &t.store, Listing::Synclist).await?;
    if t.connected != Some(feed) {
        t.connected = Some(feed);
        if !t.emit(SyncEvent::Connected { feed }).await {
            return Ok(Ended::Abandoned);
        }
    }
    if !t.emit(SyncEvent::Synced(report)).await {
        return Ok(Ended::Abandoned);
    }
    if !feed {
        t.backoff = MIN_BACKOFF;
        return Ok(Ended::Polled);
    }
    let since = lock(&t.store).last_sync_time();
    conn.subscribe(since).await?;
    // A note the feed listed that could not be pulled keeps the cursor
    // where it was for the rest of this connection: the next subscription
    // lists it again.
    let mut held = false;
    loop {
        let wake = tokio::select! {
            w = t.wake.recv() => if w.is_some() { Wake::Edits } else { Wake::Abandoned },
            r = conn.next_feed(FEED_SILENCE) => r.map(|()| Wake::Feed)?,
        };
        let listing = match wake {
            Wake::Abandoned => return Ok(Ended::Abandoned),
            Wake::Edits => Listing::Given(BTreeMap::new()),
            Wake::Feed => {
                // The subscription works: failures start counting again.
                t.backoff = MIN_BACKOFF;
                let batch = conn.take_feed();
                let covered = batch.covered;
                let docs = t.to_pull(batch);
                if docs.is_empty() {
                    if !held {
                        lock(&t.store).set_last_sync_time(covered)?;
                    }
                    continue;
                }
                let (report, all_pulled) =
                    sync_on(&mut conn, &t.store, Listing::Given(docs)).await?;
                held |= !all_pulled;
                if !held {
                    lock(&t.store).set_last_sync_time(covered)?;
                }
                if !t.emit(SyncEvent::Synced(report)).await {
                    return Ok(Ended::Abandoned);
                }
                continue;
            }
        };
        let (report, _) = sync_on(&mut conn, &t.store, listing).await?;
        if !t.emit(SyncEvent::Synced(report)).await {
            return Ok(Ended::Abandoned);
        }
    }
}

/// Why the feed loop woke.
enum Wake {
    Feed,
    Edits,
    Abandoned,
}

impl Task {
    /// Sends an event; false once the app has dropped the loop.
    async fn emit(&self, ev: SyncEvent) -> bool {
        self.events.send(ev).await.is_ok()
    }

    /// The batch's notes worth a pull: not held by a live session, and
    /// not a deletion of a note this device never had.
    fn to_pull(&self, batch: FeedBatch) -> BTreeMap<DocId, Time> {
        let s = lock(&self.store);
        batch
            .changed
            .into_iter()
            .filter(|(doc, c)| !self.live.contains(*doc) && (!c.deleted || s.contains(*doc)))
            .map(|(doc, c)| (doc, c.time))
            .collect()
    }
}
