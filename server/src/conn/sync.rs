//! Sync mode (PROTOCOL.md 3): pipelined requests, answered in arrival
//! order.
//!
//! Touches the connection (`Conn`: its reader and `direct` queue), the
//! writer (upserts and deletes are sent as soon as they are read, so one
//! connection's pipelined upserts share commits) and the read path, which
//! answers each request when it reaches the head of the queue, after every
//! earlier request is answered, so reads see earlier upserts.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use notesync_protocol::{
    ClientFrame, DocId, ErrorCode, FeedEntries, ServerFrame, Time, Upsert, VERSION_FEED,
};
use tokio::time::Instant;

use super::frames::{
    Frames, invalid_request_frame, read_only_frame, refusal, shutting_down, write_error, wrong_mode,
};
use super::{Conn, Event, Job, read};
use crate::feed::Subscription;
use crate::rooms::error_bytes;
use crate::writer::Request;

/// A connection's change feed (PROTOCOL.md 3.8): its subscription and
/// cursor. Nothing else: the entries it owes are the index's pages after
/// `cursor`, read when the connection can take a frame.
struct FeedState {
    sub: Subscription,
    /// Every change at or below it has been sent.
    cursor: Time,
    /// The number of the request (counted from 1) whose answer the feed
    /// follows: its first 38 goes after every earlier reply.
    after_request: u64,
    /// Whether the first listing is complete (and its 39 sent).
    caught_up: bool,
    /// When the feed last sent a frame (the heartbeat counts from it).
    last_sent: Instant,
}

/// Why the feed woke.
enum FeedWake {
    /// There may be entries to send.
    News,
    Heartbeat,
}

/// Waits until the feed has something to send.
async fn feed_wait(feed: &mut Option<FeedState>, heartbeat: std::time::Duration) -> FeedWake {
    let Some(st) = feed.as_mut() else {
        return std::future::pending().await;
    };
    if !st.caught_up {
        return FeedWake::News;
    }
    tokio::select! {
        _ = st.sub.changed_after(st.cursor) => FeedWake::News,
        _ = tokio::time::sleep_until(st.last_sent + heartbeat) => FeedWake::Heartbeat,
    }
}

/// Polls the job if there is one; never completes otherwise.
async fn poll_job(job: &mut Option<Job>) -> Result<Frames, Bytes> {
    match job.as_mut() {
        Some(j) => j.await,
        None => std::future::pending().await,
    }
}

impl Conn {
    pub(super) async fn sync_mode(&mut self, first: ClientFrame) -> Option<Bytes> {
        // Sync mode never uses the live queue.
        self.live = None;
        let max_pipeline = self.shared.config.max_pipeline.max(1);
        let idle = self.shared.config.idle_timeout;
        let heartbeat = self.shared.config.feed_heartbeat();
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut head: Option<Job> = None;
        let mut next = Some(first);
        let mut end: Option<Option<Bytes>> = None;
        // Requests queued and answered so far (the feed follows one).
        let (mut queued, mut answered) = (0u64, 0u64);
        let mut feed: Option<FeedState> = None;
        loop {
            if let Some(frame) = next.take() {
                let job = match frame {
                    ClientFrame::Subscribe { since } if self.version >= VERSION_FEED => {
                        Ok(self.subscribe(&mut feed, since, queued + 1))
                    }
                    frame => self.sync_job(frame).await,
                };
                match job {
                    Ok(job) => {
                        queue.push_back(job);
                        queued += 1;
                    }
                    Err(close) => end = Some(close),
                }
            }
            if head.is_none() {
                head = queue.pop_front();
            }
            if head.is_none()
                && let Some(close) = end.take()
            {
                return close;
            }
            let reading = end.is_none() && queue.len() < max_pipeline;
            let feeding = feed.as_ref().is_some_and(|f| answered >= f.after_request);
            // A subscribed connection is kept busy by its heartbeats.
            let idle = if feed.is_some() {
                std::time::Duration::ZERO
            } else {
                idle
            };
            tokio::select! {
                biased;
                r = poll_job(&mut head) => {
                    head = None;
                    answered += 1;
                    match r {
                        Ok(frames) => {
                            for f in frames {
                                if !self.send_direct(f).await {
                                    return None;
                                }
                            }
                        }
                        // Requests after a closing error get no answer.
                        Err(close) => return Some(close),
                    }
                }
                wake = feed_wait(&mut feed, heartbeat), if feeding => {
                    let st = feed.as_mut().expect("feeding");
                    if let Err(close) = self.feed_send(st, wake).await {
                        return close;
                    }
                }
                ev = self.next_frame(idle, "idle_timeout"), if reading => match ev {
                    Event::Frame(f) => next = Some(f),
                    Event::End(close) => end = Some(close),
                },
            }
        }
    }

    /// 5 feed_subscribe (PROTOCOL.md 3.8): the feed starts once every
    /// earlier request is answered; its job answers nothing itself. A
    /// second one is `invalid_request` and the first goes on.
    fn subscribe(&mut self, feed: &mut Option<FeedState>, since: Time, request: u64) -> Job {
        if feed.is_some() {
            return Box::pin(async move {
                Ok(vec![invalid_request_frame(
                    "this connection is subscribed to the change feed already (one feed_subscribe \
                     per connection, PROTOCOL.md 3.8); its feed goes on from where it was",
                )])
            });
        }
        *feed = Some(FeedState {
            sub: self.tenant.feed.subscribe(),
            cursor: since,
            after_request: request,
            caught_up: false,
            last_sent: Instant::now(),
        });
        Box::pin(async move { Ok(vec![]) })
    }

    /// Sends what the feed owes: the index's next page after the cursor
    /// (a 38), a 39 when the first listing completes, or a heartbeat. The
    /// page is read only once the queue has room, so a slow reader is
    /// coalesced; a queue full for `feed_max_lag` closes the connection.
    async fn feed_send(&mut self, st: &mut FeedState, wake: FeedWake) -> Result<(), Option<Bytes>> {
        let Some(tx) = self.direct.clone() else {
            return Err(None);
        };
        let lag = self.shared.config.feed_max_lag();
        let permit = match tokio::time::timeout(lag, tx.reserve_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(None),
            Err(_) => {
                return Err(Some(error_bytes(
                    ErrorCode::SLOW_READER,
                    format!(
                        "the change feed could not be sent: this connection's outbound queue \
                         stayed full for feed_max_lag ({}s); subscribe again from your cursor",
                        lag.as_secs_f64()
                    ),
                )));
            }
        };
        let cap = self.shared.config.max_synclist_entries.max(1);
        let (page, complete) = st.sub.index.feed_page(st.cursor, cap);
        let mut frames: Vec<Bytes> = Vec::with_capacity(2);
        if let Some(last) = page.last() {
            st.cursor = last.time;
            frames.push(
                ServerFrame::FeedChanges(page.into_iter().collect::<FeedEntries>()).to_bytes(),
            );
        }
        if let Some(clock) = complete {
            st.cursor = st.cursor.max(clock);
        }
        let listing_done = complete.is_some() && !st.caught_up;
        if listing_done || (frames.is_empty() && matches!(wake, FeedWake::Heartbeat)) {
            st.caught_up |= listing_done;
            frames.push(ServerFrame::FeedHeartbeat { time: st.cursor }.to_bytes());
        }
        let mut frames = frames.into_iter();
        match frames.next() {
            Some(f) => {
                permit.send(f);
                st.last_sent = Instant::now();
            }
            None => return Ok(()),
        }
        for f in frames {
            if !self.send_direct(f).await {
                return Err(None);
            }
        }
        Ok(())
    }

    /// Turns a request into its response job. Upserts go to the writer now.
    async fn sync_job(&mut self, frame: ClientFrame) -> Result<Job, Option<Bytes>> {
        if let Some(close) = self.later_version_frame(&frame) {
            return Err(Some(close));
        }
        let shared = self.shared.clone();
        let tenant = self.tenant.clone();
        // A read-only connection gets no site: it never inserts.
        let replica = if self.read_only() { None } else { self.replica };
        match frame {
            ClientFrame::Synclist { since } => Ok(Box::pin(async move {
                Ok(read::synclist(&shared.config, &tenant, since))
            })),
            ClientFrame::Pull { doc, since } => {
                let version = self.version;
                Ok(Box::pin(async move {
                    read::pull(&shared.config, tenant, replica, doc, since, version).await
                }))
            }
            // A write (PROTOCOL.md 3.5): every check goes in `delete_doc`.
            ClientFrame::DeleteDoc { doc } => self.delete_doc(doc).await,
            ClientFrame::Upsert(_) | ClientFrame::UpsertRuns(_) if self.read_only() => {
                Ok(Box::pin(async move {
                    Ok(vec![read_only_frame("sync_doc_upsert")])
                }))
            }
            // A 4 is the 2 it stands for (PROTOCOL.md 3.1); the reply is 37s
            // either way on a version-3 connection. Bounded: the decoder held
            // its atoms and run chars, and its range ids, to
            // max_items_per_frame per list.
            ClientFrame::UpsertRuns(u) => self.upsert_job(u.expand(), replica).await,
            // `sync_mode` takes a 5 on a version-4 connection, and
            // `later_version_frame` above closes any other.
            ClientFrame::Subscribe { .. } => Err(Some(wrong_mode(
                "feed_subscribe (5) needs a connection whose hello announced version 4",
            ))),
            ClientFrame::Upsert(u) => self.upsert_job(u, replica).await,

            ClientFrame::SessionStart { .. }
            | ClientFrame::Insert(_)
            | ClientFrame::Delete(_)
            | ClientFrame::Rename(_)
            | ClientFrame::InsertRun(_)
            | ClientFrame::DeleteRange(_) => Err(Some(wrong_mode(
                "this connection is in sync mode (its first request was below 64): only 0, 1 and 2 \
                 are accepted, 3 on a connection whose hello announced version 2 or later, 4 on \
                 one that announced version 3 or later, and 5 on one that announced version 4",
            ))),
            ClientFrame::Hello(_) => Err(Some(wrong_mode(
                "hello is accepted only as the first frame of a connection",
            ))),
        }
    }

    /// An upsert (a 2, or a 4 expanded): handed to the writer now,
    /// answered when it is committed.
    async fn upsert_job(&mut self, u: Upsert, replica: Option<u128>) -> Result<Job, Option<Bytes>> {
        let shared = self.shared.clone();
        let tenant = self.tenant.clone();
        let upsert = Arc::new(u);
        let (req, rx) = Request::upsert(replica, upsert.clone());
        if tenant.writer.send(req).await.is_err() {
            return Err(Some(shutting_down()));
        }
        let version = self.version;
        Ok(Box::pin(async move {
            match rx.await {
                Ok(Ok(site)) => {
                    read::upsert_reply(&shared.config, tenant, upsert, site, version).await
                }
                Ok(Err(e)) => refusal(version, e),
                Err(_) => Err(shutting_down()),
            }
        }))
    }

    /// 3 doc_delete (PROTOCOL.md 3.5): answered with 35. A version 2
    /// frame: a connection that did not announce version 2 gets
    /// `unknown_frame`.
    async fn delete_doc(&mut self, doc: DocId) -> Result<Job, Option<Bytes>> {
        // The version was checked in `sync_job` (`later_version_frame`).
        if self.read_only() {
            return Ok(Box::pin(
                async move { Ok(vec![read_only_frame("doc_delete")]) },
            ));
        }
        let tenant = self.tenant.clone();
        let (req, rx) = Request::delete_doc(doc);
        if tenant.writer.send(req).await.is_err() {
            return Err(Some(shutting_down()));
        }
        Ok(Box::pin(async move {
            match rx.await {
                Ok(Ok(at)) => Ok(vec![
                    ServerFrame::DocDeleted {
                        doc,
                        deleted_time: at,
                    }
                    .to_bytes(),
                ]),
                Ok(Err(e)) => write_error(e),
                Err(_) => Err(shutting_down()),
            }
        }))
    }
}
