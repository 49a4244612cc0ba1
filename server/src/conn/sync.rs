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
use notesync_protocol::{ClientFrame, DocId, ServerFrame, Upsert};

use super::frames::{Frames, read_only_frame, refusal, shutting_down, write_error, wrong_mode};
use super::{Conn, Event, Job, read};
use crate::writer::Request;

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
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut head: Option<Job> = None;
        let mut next = Some(first);
        let mut end: Option<Option<Bytes>> = None;
        loop {
            if let Some(frame) = next.take() {
                match self.sync_job(frame).await {
                    Ok(job) => queue.push_back(job),
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
            tokio::select! {
                biased;
                r = poll_job(&mut head) => {
                    head = None;
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
                ev = self.next_frame(idle, "idle_timeout"), if reading => match ev {
                    Event::Frame(f) => next = Some(f),
                    Event::End(close) => end = Some(close),
                },
            }
        }
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
            // Until the feed lands (issue 17): refused, the connection stays.
            ClientFrame::Subscribe { .. } => Ok(Box::pin(async move {
                Ok(vec![super::frames::invalid_request_frame(
                    "feed_subscribe is not served by this build yet",
                )])
            })),
            ClientFrame::Upsert(u) => self.upsert_job(u, replica).await,

            ClientFrame::SessionStart { .. }
            | ClientFrame::Insert(_)
            | ClientFrame::Delete(_)
            | ClientFrame::Rename(_)
            | ClientFrame::InsertRun(_)
            | ClientFrame::DeleteRange(_) => Err(Some(wrong_mode(
                "this connection is in sync mode (its first request was below 64): only 0, 1 and 2 \
                 are accepted, 3 on a connection whose hello announced version 2 or 3, and 4 on \
                 one that announced version 3",
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
