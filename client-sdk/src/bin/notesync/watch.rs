//! `notesync watch`: the event loop that keeps a folder in sync until
//! Ctrl-C. File changes (debounced) are picked up and handed to the
//! client's background sync ([`SyncLoop`]); remote changes come in by its
//! change feed (or its periodic syncs, on a server without one) and by the
//! live sessions that [`Liveness`] opens for busy notes.
//!
//! May touch: the folder (through [`Folder`] and its client), stdout and
//! stderr, the process's signal handlers.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::time::Duration;

use notesync_client::folder::{Folder, is_note_file};
use notesync_client::{Session, SessionEvent, SyncEvent, SyncLoop, SyncReport};
use notesync_protocol::DocId;
use notify::EventKind;
use notify::event::{AccessKind, AccessMode};
use tokio::time::Instant;

use crate::live::Liveness;
use crate::print::{
    count, note_label, print_pick_up, print_refused, print_remote_deletions, print_write_back,
    sync_line,
};
use crate::setup::{Fail, Resolved, ServerArgs, open_folder};

/// File changes are picked up once the folder was quiet this long.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// ... but no later than this after the first change of a batch.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// Remote edits from live sessions are written out in batches this far apart.
const REMOTE_BATCH: Duration = Duration::from_millis(100);
/// A note whose file changes twice within this window gets a live session.
pub(crate) const LIVE_WINDOW: Duration = Duration::from_secs(10);
/// A live session with no change either way for this long is closed.
const LIVE_QUIET: Duration = Duration::from_secs(30);

enum Wake {
    Quit,
    Fs(Option<notify::Result<notify::Event>>),
    Files,
    Remote,
    Sync(Option<SyncEvent>),
    Housekeeping,
    Session(DocId, Option<SessionEvent>),
}

struct Watcher {
    folder: Folder,
    addr: String,
    /// The connection, until a sync succeeds and the folder stores it.
    unremembered: Option<Resolved>,
    sessions: HashMap<DocId, Session>,
    live: Liveness,
    sync: SyncLoop,
    /// Whether the last sync failed (to report a failure streak once).
    failing: bool,
    /// Seconds between polls, for a server without the change feed.
    every: Duration,
}

pub(crate) async fn watch(
    dir: &Path,
    server: &ServerArgs,
    every: Duration,
    live_window: Duration,
) -> Result<u8, Fail> {
    let quit = shutdown_signal()?;
    tokio::pin!(quit);
    let conn = server.resolve(dir)?;
    let (mut folder, _lock) = open_folder(dir, true, conn.config.clone())?;
    let dir = folder.dir().to_owned();
    // Watch before the first sync, so that no change slips between.
    let (tx, mut fs_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut fs_watch = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| Fail::new(format!("cannot watch {}: {e}", dir.display())))?;
    notify::Watcher::watch(&mut fs_watch, &dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| Fail::new(format!("cannot watch {}: {e}", dir.display())))?;
    // What changed while nothing watched goes out with the first sync.
    let picked = folder.pick_up(None, &HashMap::new())?;
    print_pick_up(&folder, &picked, false);
    let sync = folder.client().sync_loop(every);
    let mut w = Watcher {
        folder,
        addr: conn.conn.server.clone(),
        unremembered: Some(conn),
        sessions: HashMap::new(),
        live: Liveness::new(live_window, LIVE_QUIET),
        sync,
        failing: false,
        every,
    };
    println!(
        "watching {} (syncing with {}; Ctrl-C stops)",
        dir.display(),
        w.addr
    );

    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut changed: HashSet<String> = HashSet::new();
    let mut files_due = Instant::now();
    let mut first_change = Instant::now();
    let mut remote: HashSet<DocId> = HashSet::new();
    let mut remote_at = Instant::now();
    loop {
        let wake = tokio::select! {
            _ = &mut quit => Wake::Quit,
            ev = fs_rx.recv() => Wake::Fs(ev),
            _ = tokio::time::sleep_until(files_due), if !changed.is_empty() => Wake::Files,
            _ = tokio::time::sleep_until(remote_at + REMOTE_BATCH), if !remote.is_empty() => Wake::Remote,
            ev = w.sync.next_event() => Wake::Sync(ev),
            _ = housekeeping.tick() => Wake::Housekeeping,
            (id, ev) = next_session_event(&mut w.sessions) => Wake::Session(id, ev),
        };
        match wake {
            Wake::Quit => break,
            Wake::Fs(None) => {
                return Err(Fail::new("the file watcher stopped"));
            }
            Wake::Fs(Some(Err(e))) => {
                // Events may have been lost: read every file.
                eprintln!("warning: watching files: {e}");
                w.full_cycle().await?;
            }
            Wake::Fs(Some(Ok(ev))) => {
                if ev.need_rescan() {
                    w.full_cycle().await?;
                    continue;
                }
                // Opening or reading a file (we do, to compare it) is no change.
                if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
                {
                    continue;
                }
                let names = ev
                    .paths
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                    .filter(|n| is_note_file(n));
                let was_empty = changed.is_empty();
                let mut any = false;
                for n in names {
                    changed.insert(n);
                    any = true;
                }
                if any {
                    // Picked up once the folder is quiet for a moment, or
                    // a while after the first change if it never is.
                    let now = Instant::now();
                    if was_empty {
                        first_change = now;
                    }
                    files_due = (now + DEBOUNCE).min(first_change + DEBOUNCE_MAX);
                }
            }
            Wake::Files => {
                let names = std::mem::take(&mut changed);
                w.files_changed(&names).await?;
            }
            Wake::Remote => {
                let ids = std::mem::take(&mut remote);
                let wrote = w.folder.write_back(Some(&ids), &w.sessions)?;
                print_write_back(&wrote, true);
            }
            Wake::Sync(None) => return Err(Fail::new("the background sync stopped")),
            Wake::Sync(Some(ev)) => w.sync_event(ev).await?,
            Wake::Housekeeping => w.close_quiet_sessions().await,
            Wake::Session(id, None) => {
                w.sessions.remove(&id);
                w.live.closed(id);
            }
            Wake::Session(id, Some(ev)) => match ev {
                SessionEvent::Remote(_) | SessionEvent::Renamed(_) => {
                    w.live.touched(id, Instant::now().into_std());
                    if remote.is_empty() {
                        remote_at = Instant::now();
                    }
                    remote.insert(id);
                }
                SessionEvent::Refused { code, message } => {
                    eprintln!(
                        "warning: the server refused an edit of {}: error {code}: {message}",
                        note_label(&w.folder, id)
                    );
                }
                SessionEvent::Disconnected(why) => {
                    eprintln!(
                        "warning: live session for {} lost its connection ({why}); reconnecting",
                        note_label(&w.folder, id)
                    );
                }
                SessionEvent::Deleted(d) => {
                    w.sessions.remove(&id);
                    w.live.closed(id);
                    let gone = w.folder.apply_remote_deletions(&[d])?;
                    print_remote_deletions(&gone);
                }
                SessionEvent::Connected | SessionEvent::Acknowledged { .. } => {}
            },
        }
    }

    // Ctrl-C: pick up what is pending, close the sessions, save, write.
    if !changed.is_empty() {
        let picked = w.folder.pick_up(Some(&changed), &w.sessions)?;
        print_pick_up(&w.folder, &picked, false);
    }
    for (_, s) in w.sessions.drain() {
        s.close().await;
    }
    w.sync.stop().await;
    w.folder.client().flush()?;
    let wrote = w.folder.write_back(None, &HashMap::new())?;
    print_write_back(&wrote, true);
    let ops: usize = w.folder.client().list().iter().map(|n| n.pending_ops).sum();
    if ops > 0 {
        println!(
            "stopped; {} wait in the op logs for the next sync",
            count(ops, "op", "ops")
        );
    } else {
        println!("stopped; everything is synced");
    }
    drop(fs_watch);
    Ok(0)
}

impl Watcher {
    /// Reads every file and asks for a sync (its files are written when
    /// it is done).
    async fn full_cycle(&mut self) -> Result<(), Fail> {
        let picked = self.folder.pick_up(None, &self.sessions)?;
        print_pick_up(&self.folder, &picked, false);
        for (id, _) in &picked.deleted {
            if let Some(s) = self.sessions.remove(id) {
                s.close().await;
                self.live.closed(*id);
            }
        }
        self.sync.sync_soon();
        Ok(())
    }

    /// What the background sync did: said when it matters, and its
    /// changes written into the files.
    async fn sync_event(&mut self, ev: SyncEvent) -> Result<(), Fail> {
        match ev {
            SyncEvent::Connected { feed } => {
                if self.failing {
                    println!("reached {} again", self.addr);
                    self.failing = false;
                }
                if !feed {
                    println!(
                        "{} has no change feed (a server before protocol version 4): \
                         fetching changes every {}s",
                        self.addr,
                        self.every.as_secs()
                    );
                }
                Ok(())
            }
            SyncEvent::Synced(r) => self.synced(&r).await,
            SyncEvent::Failed { error, retry_in } => {
                if !self.failing {
                    eprintln!(
                        "warning: sync with {} failed: {error}; edits are kept in the op logs, \
                         retrying in {}s and at the next change",
                        self.addr,
                        retry_in.as_secs()
                    );
                    self.failing = true;
                }
                Ok(())
            }
        }
    }

    async fn synced(&mut self, r: &SyncReport) -> Result<(), Fail> {
        self.folder.client().flush()?;
        if let Some(conn) = self.unremembered.take() {
            conn.remember(self.folder.dir())?;
        }
        // (A success after a failure was said at its `Connected`, which
        // the loop sends first.)
        // Quiet unless something moved.
        if r.upserted
            + r.changes.len()
            + r.new_notes.len()
            + r.refused.len()
            + r.deleted.len()
            + r.deletes_sent.len()
            + r.resynced.len()
            > 0
        {
            println!("synced: {}", sync_line(r));
        }
        print_refused(&self.folder, r);
        for d in &r.deleted {
            if let Some(s) = self.sessions.remove(&d.id) {
                s.close().await;
                self.live.closed(d.id);
            }
        }
        let gone = self.folder.apply_remote_deletions(&r.deleted)?;
        print_remote_deletions(&gone);
        let wrote = self.folder.write_back(None, &self.sessions)?;
        print_write_back(&wrote, true);
        Ok(())
    }

    /// Files changed: pick them up; notes changing often get a session;
    /// the rest is synced at once.
    async fn files_changed(&mut self, names: &HashSet<String>) -> Result<(), Fail> {
        let picked = self.folder.pick_up(Some(names), &self.sessions)?;
        print_pick_up(&self.folder, &picked, false);
        let now = Instant::now().into_std();
        // A deleted note's session has nothing left to do; the deletion
        // goes out with the sync.
        let mut need_sync = !picked.deleted.is_empty();
        for (id, _) in &picked.deleted {
            if let Some(s) = self.sessions.remove(id) {
                s.close().await;
                self.live.closed(*id);
            }
        }
        let mut touched: HashSet<DocId> = picked.missing.iter().map(|m| m.0).collect();
        for id in picked.notes().collect::<Vec<_>>() {
            touched.insert(id);
            if self.sessions.contains_key(&id) {
                self.live.file_changed(id, now);
                continue;
            }
            if self.live.file_changed(id, now) {
                // Its pending edits go out as soon as the session is live.
                match self.folder.client().session(id) {
                    Ok(s) => {
                        println!("live session for {}", note_label(&self.folder, id));
                        self.sessions.insert(id, s);
                        continue;
                    }
                    Err(e) => eprintln!("warning: no live session: {e}"),
                }
            }
            need_sync = true;
        }
        if need_sync {
            // Its files are written when the sync is done.
            self.sync.sync_soon();
        } else if !touched.is_empty() {
            let wrote = self.folder.write_back(Some(&touched), &self.sessions)?;
            print_write_back(&wrote, true);
        }
        Ok(())
    }

    async fn close_quiet_sessions(&mut self) {
        let quiet = self
            .live
            .quiet_ones(self.sessions.keys().copied(), Instant::now().into_std());
        for id in quiet {
            if let Some(s) = self.sessions.remove(&id) {
                s.close().await;
                self.live.closed(id);
                println!(
                    "closed the live session for {}",
                    note_label(&self.folder, id)
                );
            }
        }
    }
}

/// The next event of any live session (never, when there is none).
async fn next_session_event(
    sessions: &mut HashMap<DocId, Session>,
) -> (DocId, Option<SessionEvent>) {
    if sessions.is_empty() {
        return std::future::pending().await;
    }
    let next = sessions.iter_mut().map(|(id, s)| {
        let id = *id;
        Box::pin(async move { (id, s.next_event().await) })
    });
    futures::future::select_all(next).await.0
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when it is first polled, so a signal during the first sync
/// is not fatal either.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl Future<Output = ()>, Fail> {
    use tokio::signal::unix::{SignalKind, signal};
    let fail = |e: io::Error| Fail::new(format!("cannot handle signals: {e}"));
    let mut int = signal(SignalKind::interrupt()).map_err(fail)?;
    let mut term = signal(SignalKind::terminate()).map_err(fail)?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl Future<Output = ()>, Fail> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
