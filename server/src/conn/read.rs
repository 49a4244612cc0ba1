//! The read path: a synclist answered from the index; a pull, an upsert's
//! reply and a session's first state answered from a read snapshot.
//!
//! Touches the tenant's index and database (snapshots, read in blocking
//! tasks), the reply builder `DocFrames`, and the writer only to
//! allocate a pull's site. Nothing here writes to the store.

use std::sync::Arc;

use bytes::Bytes;
use notesync_protocol::{DocId, ErrorCode, ServerFrame, Time, Upsert, VERSION_RESYNC};

use super::frames::{Frames, shutting_down, storage, write_error};
use crate::config::Config;
use crate::reply::DocFrames;
use crate::rooms::{deleted_bytes, error_bytes, resync_bytes};
use crate::store::{Rule, SentIds, Snapshot, StoreError};
use crate::tenants::Tenant;
use crate::writer::Request;

/// Bytes of list data per 33 (or 37) frame.
const DOC_CHUNK_BYTES: usize = 1 << 20;

/// What a read found for a request.
pub(super) enum Outcome<S = ()> {
    /// The 33s the client is owed, complete up to `sync_time` (the 34's or
    /// 68's time), and the site the answer names (a pull's; None: the
    /// writer allocates one).
    Owed {
        frames: Frames,
        sync_time: Time,
        site: S,
    },
    /// Refused: this one frame is the whole answer, no 34 or 68 follows
    /// (a deleted or unknown document, a sync time older than the
    /// tombstones).
    Refused(Bytes),
}

/// The limits of one 33 frame: list bytes and items.
fn chunk_limits(config: &Config) -> (usize, usize) {
    let frame = config.limits.max_frame_bytes;
    (
        DOC_CHUNK_BYTES.min(frame.saturating_sub(1024) / 2).max(1),
        usize::try_from(config.limits.max_items_per_frame).unwrap_or(usize::MAX),
    )
}

/// A 34 after `frames`.
fn with_doc_sync(mut frames: Frames, doc: DocId, sync_time: Time, site: u8) -> Frames {
    frames.push(
        ServerFrame::DocSync {
            doc,
            sync_time,
            site,
        }
        .to_bytes(),
    );
    frames
}

/// Runs a snapshot read in a blocking task. `Err`: the `storage` frame
/// that closes the connection.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Bytes> {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(storage(&e)),
        Err(e) => Err(storage(&e)),
    }
}

/// 32 for a synclist, from the index alone.
pub(super) fn synclist(config: &Config, tenant: &Tenant, since: Time) -> Frames {
    let list = tenant.index.synclist(since, config.max_synclist_entries);
    vec![ServerFrame::SynclistResponse(list).to_bytes()]
}

/// 33s then 34 for a pull, allocating the site if this replica has none.
pub(super) async fn pull(
    config: &Config,
    tenant: Arc<Tenant>,
    replica: Option<u128>,
    doc: DocId,
    since: Time,
    version: u8,
) -> Result<Frames, Bytes> {
    let db = tenant.db.clone();
    let (chunk, items) = chunk_limits(config);
    let read = blocking(move || -> Result<Outcome<Option<u8>>, StoreError> {
        let snap = Snapshot::begin(&db)?;
        let Some(rec) = snap.doc(doc)? else {
            return Ok(Outcome::Refused(error_bytes(
                ErrorCode::UNKNOWN_DOCUMENT,
                format!("document {doc:032x} does not exist on this server"),
            )));
        };
        if rec.deleted != 0 {
            // 35, or unknown_document for version 1 (PROTOCOL.md 3.5).
            return Ok(Outcome::Refused(deleted_bytes(version, doc, rec.deleted)));
        }
        if rec.needs_resync(since) && version < VERSION_RESYNC {
            return Ok(Outcome::Refused(resync_bytes(version, doc)));
        }
        let site = match replica {
            Some(r) => snap.site(doc, r)?,
            None => Some(0),
        };
        let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items, version);
        // A delta, or a 36 and the full state (PROTOCOL.md 3.6).
        snap.catch_up(doc, &rec, since, Rule::Pull, None, &mut out)?;
        Ok(Outcome::Owed {
            frames: out.finish(),
            sync_time: snap.clock()?,
            site,
        })
    })
    .await?;
    let (frames, sync_time, site) = match read {
        Outcome::Refused(frame) => return Ok(vec![frame]),
        Outcome::Owed {
            frames,
            sync_time,
            site,
        } => (frames, sync_time, site),
    };
    let site = match (site, replica) {
        (Some(s), _) => s,
        (None, Some(replica)) => {
            let (req, rx) = Request::alloc(doc, replica);
            if tenant.writer.send(req).await.is_err() {
                return Err(shutting_down());
            }
            match rx.await {
                Ok(Ok(site)) => site,
                Ok(Err(e)) => return write_error(e),
                Err(_) => return Err(shutting_down()),
            }
        }
        (None, None) => 0,
    };
    Ok(with_doc_sync(frames, doc, sync_time, site))
}

/// 33s then 34 for a committed upsert: what the client lacks since its `t`,
/// less what it sent.
pub(super) async fn upsert_reply(
    config: &Config,
    tenant: Arc<Tenant>,
    upsert: Arc<Upsert>,
    site: u8,
    version: u8,
) -> Result<Frames, Bytes> {
    let db = tenant.db.clone();
    let (chunk, items) = chunk_limits(config);
    let doc = upsert.doc;
    let read = blocking(move || -> Result<Outcome, StoreError> {
        // Any snapshot after the commit will do: its clock covers the upsert
        // and is exactly consistent with what it returns.
        let snap = Snapshot::begin(&db)?;
        let Some(rec) = snap.doc(doc)? else {
            return Err(StoreError::Corrupt {
                table: "documents",
                what: "an upserted document is missing",
            });
        };
        let sent = SentIds::from_upsert(&upsert);
        let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items, version);
        if rec.needs_resync(upsert.since) {
            // Applied, but no delta since its time exists (PROTOCOL.md
            // 3.6): a 36 and the full state, with the deletes of its own
            // inserts deleted here; version 1: invalid_request.
            if version < VERSION_RESYNC {
                return Ok(Outcome::Refused(resync_bytes(version, doc)));
            }
            out.resync();
            snap.delta(doc, 0, Rule::Pull, None, &mut out)?;
            snap.deleted_sent_inserts(doc, 0, &sent, &mut out)?;
        } else {
            snap.delta(doc, upsert.since, Rule::Pull, Some(&sent), &mut out)?;
            snap.deleted_sent_inserts(doc, upsert.since, &sent, &mut out)?;
        }
        Ok(Outcome::Owed {
            frames: out.finish(),
            sync_time: snap.clock()?,
            site: (),
        })
    })
    .await?;
    Ok(match read {
        // Version 1 and too old: the refusal alone (no 34).
        Outcome::Refused(frame) => vec![frame],
        Outcome::Owed {
            frames, sync_time, ..
        } => with_doc_sync(frames, doc, sync_time, site),
    })
}

/// A started session's first state, from the snapshot the writer opened
/// when it registered the session: 33s up to its time, or a refusal.
/// `Err`: the closing `storage` frame.
pub(super) async fn session_state(
    config: &Config,
    snapshot: Snapshot,
    doc: DocId,
    since: Time,
    version: u8,
) -> Result<Outcome, Bytes> {
    let (chunk, items) = chunk_limits(config);
    blocking(move || -> Result<Outcome, StoreError> {
        let snap = snapshot;
        let rec = match snap.doc(doc)? {
            Some(rec) => rec,
            None => {
                return Err(StoreError::Corrupt {
                    table: "documents",
                    what: "a started session's document is missing",
                });
            }
        };
        if rec.needs_resync(since) {
            // Refused with a 36 (PROTOCOL.md 3.6): the client catches
            // up in sync mode, then starts again.
            return Ok(Outcome::Refused(resync_bytes(version, doc)));
        }
        let mut out = DocFrames::new(doc, rec.doc_name()?, chunk, items, version);
        snap.delta(doc, since, Rule::Session, None, &mut out)?;
        Ok(Outcome::Owed {
            frames: out.finish(),
            sync_time: snap.clock()?,
            site: (),
        })
    })
    .await
}
