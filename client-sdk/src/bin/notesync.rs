//! `notesync`: keeps a folder of markdown notes in sync through a
//! notesync server. The logic lives in `notesync_client::folder`; this is
//! the command line, output, file watching and live-session policy.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use notesync_client::folder::{
    FileDeletion, FileState, Folder, FolderError, Liveness, PickUp, WriteBack,
};
use notesync_client::{
    ServerConfig, Session, SessionEvent, StoreError, SyncError, SyncReport, TlsSettings,
};
use notesync_protocol::DocId;
use notify::EventKind;
use notify::event::{AccessKind, AccessMode};
use tokio::time::Instant;

const EXIT_ERROR: u8 = 1;
const EXIT_SYNC_FAILED: u8 = 3;
const EXIT_REFUSED: u8 = 4;

/// File changes are picked up once the folder was quiet this long.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// ... but no later than this after the first change of a batch.
const DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// Remote edits from live sessions are written out in batches this far apart.
const REMOTE_BATCH: Duration = Duration::from_millis(100);
/// A note whose file changes twice within this window gets a live session.
const LIVE_WINDOW: Duration = Duration::from_secs(10);
/// A live session with no change either way for this long is closed.
const LIVE_QUIET: Duration = Duration::from_secs(30);

const ABOUT: &str = "Keep a folder of markdown notes in sync through a notesync server";

const LONG_ABOUT: &str = "\
Keep a folder of markdown notes in sync through a notesync server.

The folder is the note store: each note is NAME.md, which you edit with any
editor, beside NAME.md.structure and NAME.md.latest_ops (notesync's own
files: leave them alone) and the .notesync/ folder. Notes made elsewhere
appear as new NAME.md files; note names are made into safe file names, and
nothing is ever written outside the folder.

Ignored: .notesync/, *.md.structure, *.md.latest_ops, dotfiles, names
starting with ~ or #, subfolders, and anything not ending in .md.

One notesync command at a time per folder: `ls` and `status` too need the
folder to themselves (stop `watch` first).";

const SYNC_HELP: &str = "\
One two-way sync of DIR with the server.

1. Every NAME.md you edited is diffed into edits of its note; a new NAME.md
   becomes a new note named NAME; a note whose file you renamed is renamed.
2. The edits go to the server; changes made elsewhere come back.
3. The files are written from the notes. A file you edit meanwhile is
   picked up first, never overwritten.

Deleting NAME.md deletes its note: on the server at this sync, and then on
every other device (their NAME.md files are removed at their next sync). A
device that has edits of the note that never reached the server keeps that
text in .notesync/trash/ and says so. A note that never synced is not
deleted: its file is written again, with a warning.

If the server cannot be reached, your edits stay in the op logs
(*.md.latest_ops) and go out with the next sync that reaches it.

Exit status: 0 done; 1 error (nothing was lost); 3 the server could not be
reached or the sync failed; 4 the server refused some notes (listed).";

const WATCH_HELP: &str = "\
Keep DIR in sync until Ctrl-C.

Edited and new files are picked up as they are saved (once the folder has
been quiet for 200 ms) and synced at once; changes made elsewhere are
fetched every --interval seconds and written into the files. A note whose
file changes twice within --live-window seconds (10) gets a live session: its edits go out as
they are picked up and edits made elsewhere arrive as they are made; the
session closes after 30 s without changes. A file you edited is never
overwritten before your edit is picked up.

Deleting a file deletes its note, here and on the server, and so on every
device; notes deleted elsewhere have their files removed here (text with
edits that never reached the server is kept in .notesync/trash/).

Ctrl-C (or SIGTERM) picks up pending changes, closes the sessions, saves
everything and exits 0; edits not yet sent stay in the op logs for the next
sync.";

#[derive(Parser)]
#[command(name = "notesync", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One two-way sync of a folder of .md notes
    #[command(long_about = SYNC_HELP)]
    Sync {
        /// The notes folder (created if missing)
        dir: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Keep a folder in sync: file changes go out, remote changes come in
    #[command(long_about = WATCH_HELP)]
    Watch {
        /// The notes folder (created if missing)
        dir: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        /// Seconds between syncs that fetch changes made elsewhere
        #[arg(long, value_name = "SECS", default_value_t = 30,
              value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Two changes of one note within this many seconds open a live
        /// session for it
        #[arg(long, value_name = "SECS", default_value_t = LIVE_WINDOW.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..))]
        live_window: u64,
    },
    /// List the notes: id, name, file, pending ops
    Ls {
        /// The notes folder
        dir: PathBuf,
    },
    /// Replica id, last sync, per-note pending ops and files not yet picked up
    Status {
        /// The notes folder
        dir: PathBuf,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// The server's address
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// Longest wait for any one reply from the server, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// File holding the access token (from `notesync-server token add`);
    /// without it, the NOTESYNC_TOKEN environment variable, if set. (Not
    /// a flag value: command lines are visible to other users.)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Connect with TLS (the server runs with --tls-cert/--tls-key)
    #[arg(long)]
    tls: bool,
    /// PEM file of the certificate authority to trust (a self-signed
    /// server); default: the public web roots. Implies --tls
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Name the server's certificate must carry, if not the host of
    /// --server. Implies --tls
    #[arg(long, value_name = "NAME")]
    tls_name: Option<String>,
}

impl ServerArgs {
    fn config(&self) -> Result<ServerConfig, Fail> {
        let mut c = ServerConfig::new(self.server.clone());
        c.reply_timeout = Duration::from_secs(self.timeout);
        c.token = match &self.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| {
                    Fail::new(format!(
                        "cannot read the token file {}: {e}",
                        path.display()
                    ))
                })?
                .trim()
                .as_bytes()
                .to_vec(),
            None => std::env::var("NOTESYNC_TOKEN")
                .map(|t| t.trim().as_bytes().to_vec())
                .unwrap_or_default(),
        };
        if c.token.len() > 255 {
            return Err(Fail::new(
                "the token is longer than 255 bytes: is it the right file?",
            ));
        }
        if self.tls || self.tls_ca.is_some() || self.tls_name.is_some() {
            c.tls = Some(TlsSettings {
                ca_file: self.tls_ca.clone(),
                server_name: self.tls_name.clone(),
            });
        }
        Ok(c)
    }
}

/// A failure, with the exit status it gives.
struct Fail {
    code: u8,
    msg: String,
}

impl Fail {
    fn new(msg: impl Into<String>) -> Fail {
        Fail {
            code: EXIT_ERROR,
            msg: msg.into(),
        }
    }
}

impl From<FolderError> for Fail {
    fn from(e: FolderError) -> Fail {
        Fail::new(e.to_string())
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::new(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Sync { dir, server } => sync(&dir, &server).await,
            Cmd::Watch {
                dir,
                server,
                interval,
                live_window,
            } => {
                let (every, window) = (
                    Duration::from_secs(interval),
                    Duration::from_secs(live_window),
                );
                watch(&dir, &server, every, window).await
            }
            Cmd::Ls { dir } => ls(&dir),
            Cmd::Status { dir } => status(&dir),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

// ---------------------------------------------------------------------------
// Opening a folder

/// Holds the folder's lock until dropped (the process exits).
struct Lock(#[allow(dead_code)] File);

/// The folder, created if asked; one notesync command at a time.
fn open_folder(dir: &Path, create: bool, server: ServerConfig) -> Result<(Folder, Lock), Fail> {
    if create && !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| Fail::new(format!("{}: {e}", dir.display())))?;
        println!("created {}", dir.display());
    }
    if !dir.is_dir() {
        return Err(Fail::new(format!("{} is not a folder", dir.display())));
    }
    if !create && !dir.join(".notesync").join("state.json").is_file() {
        return Err(Fail::new(format!(
            "{} is not a notesync folder (no .notesync/state.json); \
             `notesync sync {} --server HOST:PORT` makes it one",
            dir.display(),
            dir.display()
        )));
    }
    let lock = lock(dir)?;
    let folder = Folder::open(dir, server)?;
    Ok((folder, lock))
}

fn lock(dir: &Path) -> Result<Lock, Fail> {
    let state = dir.join(".notesync");
    let path = state.join("cli.lock");
    let fail = |e: io::Error| Fail::new(format!("{}: {e}", path.display()));
    fs::create_dir_all(&state).map_err(fail)?;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                let pid = fs::read_to_string(&path).unwrap_or_default();
                return Err(Fail::new(format!(
                    "{} is in use by another notesync command (pid {}); stop it first",
                    dir.display(),
                    pid.trim()
                )));
            }
            return Err(fail(e));
        }
        f.set_len(0).map_err(fail)?;
        write!(f, "{}", std::process::id()).map_err(fail)?;
    }
    Ok(Lock(f))
}

// ---------------------------------------------------------------------------
// sync

/// A progress display for long operations: drawn on stdout when it is a
/// terminal, hidden otherwise.
fn progress() -> ProgressBar {
    if !io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

async fn sync(dir: &Path, server: &ServerArgs) -> Result<u8, Fail> {
    let (mut folder, _lock) = open_folder(dir, true, server.config()?)?;
    let bar = progress();
    bar.set_message("reading files");
    let b = bar.clone();
    folder.set_progress(Some(Box::new(move |done, total| {
        b.set_message(format!("files {done}/{total}"));
    })));
    let none = HashMap::new();
    let picked = folder.pick_up(None, &none)?;
    bar.set_message(format!("syncing with {}", server.server));
    let synced = folder.client().sync_now().await;
    // What came back is saved before the files show it.
    let flushed = folder.client().flush();
    // Files of notes deleted elsewhere go before the write-back (which only
    // writes the notes the store still has).
    bar.set_message("writing files");
    let wrote = folder.write_back(None, &none);
    bar.finish_and_clear();
    flushed?;
    let wrote = wrote?;
    print_pick_up(&folder, &picked, true);
    print_write_back(&wrote, false);
    match synced {
        Ok(report) => {
            let gone = folder.apply_remote_deletions(&report.deleted)?;
            print_remote_deletions(&gone);
            println!("synced with {}: {}", server.server, sync_line(&report));
            if !wrote.written.is_empty() {
                println!("wrote {}", count(wrote.written.len(), "file", "files"));
            }
            print_refused(&folder, &report);
            Ok(if report.refused.is_empty() {
                0
            } else {
                EXIT_REFUSED
            })
        }
        Err(e) => Err(sync_failed(&folder, &server.server, &e)),
    }
}

fn sync_failed(folder: &Folder, addr: &str, e: &SyncError) -> Fail {
    let notes = folder.client().list();
    let ops: usize = notes.iter().map(|n| n.pending_ops).sum();
    let with = notes.iter().filter(|n| n.pending_ops > 0).count();
    let kept = if ops == 0 {
        "There were no local edits to send.".to_owned()
    } else {
        format!(
            "Your local edits are kept: {} in {} wait in the op logs (*.md.latest_ops) \
             and go out with the next sync that reaches the server.",
            count(ops, "op", "ops"),
            count(with, "note", "notes"),
        )
    };
    Fail {
        code: EXIT_SYNC_FAILED,
        msg: format!("sync with {addr} failed: {e}\n{kept}"),
    }
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn sync_line(r: &SyncReport) -> String {
    let mut parts = vec![
        format!("{} upserted", r.upserted),
        format!("{} pulled", r.pulled),
        format!("{} new from the server", r.new_notes.len()),
        format!("{} acknowledged", count(r.acknowledged_ops, "op", "ops")),
    ];
    if !r.deletes_sent.is_empty() {
        parts.push(format!("{} deleted on the server", r.deletes_sent.len()));
    }
    if !r.deleted.is_empty() {
        parts.push(format!("{} deleted elsewhere", r.deleted.len()));
    }
    if !r.resynced.is_empty() {
        // PROTOCOL.md 3.6: offline longer than the server keeps tombstones.
        parts.push(format!("{} resynced in full", r.resynced.len()));
    }
    if !r.refused.is_empty() {
        parts.push(format!("{} refused", r.refused.len()));
    }
    parts.join(", ")
}

fn note_label(folder: &Folder, id: DocId) -> String {
    match folder.client().name(id) {
        Ok(name) => format!("{:?} ({id:032x})", name),
        Err(_) => format!("{id:032x}"),
    }
}

fn print_refused(folder: &Folder, r: &SyncReport) {
    for (id, code, msg) in &r.refused {
        println!(
            "refused: {}: error {code}: {msg}; its edits stay in the op log",
            note_label(folder, *id)
        );
    }
}

fn print_pick_up(folder: &Folder, p: &PickUp, summary: bool) {
    for (_, f) in &p.missing {
        eprintln!(
            "warning: {f} was deleted, but its note never synced, so it is not deleted: \
             it is written again from its note"
        );
    }
    for (id, f) in &p.deleted {
        println!(
            "deleted note {id:032x} ({f} was deleted); the server and other devices follow at the sync"
        );
    }
    for (f, why) in &p.skipped {
        eprintln!("warning: {f} left alone: {why}");
    }
    for (from, to) in &p.moved {
        println!("{from} is now {to} (the file name of its note)");
    }
    for (id, name) in &p.renamed {
        println!(
            "renamed {} to {name:?} (its file was renamed)",
            note_label(folder, *id)
        );
    }
    if summary {
        if !p.edited.is_empty() || !p.created.is_empty() {
            println!(
                "picked up: {}, {}",
                count(p.edited.len(), "edited note", "edited notes"),
                count(p.created.len(), "new note", "new notes")
            );
        }
    } else {
        for id in &p.edited {
            println!("picked up {}", note_label(folder, *id));
        }
        for (_, f) in &p.created {
            println!("new note from {f}");
        }
    }
}

fn print_remote_deletions(gone: &[FileDeletion]) {
    for d in gone {
        let file = if d.file.is_empty() {
            format!("{:?}", d.name)
        } else {
            d.file.clone()
        };
        if d.removed {
            println!("removed {file}: its note was deleted on another device");
        } else {
            println!("its note was deleted on another device: {file}");
        }
        for k in &d.kept {
            println!(
                "kept unsynced edits of {file} in {} (the note stays deleted)",
                k.display()
            );
        }
        if let Some(why) = &d.left {
            eprintln!("warning: {file} left as it is: {why}");
        }
    }
}

fn print_write_back(w: &WriteBack, each: bool) {
    for (from, to) in &w.moved_aside {
        eprintln!("warning: {from} was in the way of a renamed note: moved to {to}");
    }
    for (f, why) in &w.skipped {
        eprintln!("warning: {f} not written: {why}");
    }
    if each {
        for f in &w.written {
            println!("wrote {f}");
        }
    }
}

// ---------------------------------------------------------------------------
// watch

enum Wake {
    Quit,
    Fs(Option<notify::Result<notify::Event>>),
    Files,
    Remote,
    Tick,
    Housekeeping,
    Session(DocId, Option<SessionEvent>),
}

struct Watcher {
    folder: Folder,
    addr: String,
    sessions: HashMap<DocId, Session>,
    live: Liveness,
    /// Whether the last sync failed (to report a failure streak once).
    failing: bool,
}

async fn watch(
    dir: &Path,
    server: &ServerArgs,
    every: Duration,
    live_window: Duration,
) -> Result<u8, Fail> {
    let quit = shutdown_signal()?;
    tokio::pin!(quit);
    let (folder, _lock) = open_folder(dir, true, server.config()?)?;
    let dir = folder.dir().to_owned();
    // Watch before the first sync, so that no change slips between.
    let (tx, mut fs_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut fs_watch = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .map_err(|e| Fail::new(format!("cannot watch {}: {e}", dir.display())))?;
    notify::Watcher::watch(&mut fs_watch, &dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| Fail::new(format!("cannot watch {}: {e}", dir.display())))?;
    let mut w = Watcher {
        folder,
        addr: server.server.clone(),
        sessions: HashMap::new(),
        live: Liveness::new(live_window, LIVE_QUIET),
        failing: false,
    };
    w.full_cycle().await?;
    println!(
        "watching {} (syncing with {} every {}s; Ctrl-C stops)",
        dir.display(),
        server.server,
        every.as_secs()
    );

    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = tick.tick() => Wake::Tick,
            _ = housekeeping.tick() => Wake::Housekeeping,
            (id, ev) = next_session_event(&mut w.sessions) => Wake::Session(id, ev),
        };
        match wake {
            Wake::Quit => break,
            Wake::Fs(None) => {
                return Err(Fail::new("the file watcher stopped"));
            }
            Wake::Fs(Some(Err(e))) => {
                // Events may have been lost: the next periodic sync reads
                // every file anyway.
                eprintln!("warning: watching files: {e}");
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
                    .filter(|n| notesync_client::folder::is_note_file(n));
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
            Wake::Tick => w.full_cycle().await?,
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
    /// Reads every file, syncs, writes every file.
    async fn full_cycle(&mut self) -> Result<(), Fail> {
        let picked = self.folder.pick_up(None, &self.sessions)?;
        print_pick_up(&self.folder, &picked, false);
        for (id, _) in &picked.deleted {
            if let Some(s) = self.sessions.remove(id) {
                s.close().await;
                self.live.closed(*id);
            }
        }
        self.sync_and_write().await
    }

    async fn sync_and_write(&mut self) -> Result<(), Fail> {
        let synced = self.folder.client().sync_now().await;
        self.folder.client().flush()?;
        match &synced {
            Ok(r) => {
                if self.failing {
                    println!("reached {} again", self.addr);
                    self.failing = false;
                }
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
            }
            Err(e) => {
                if !self.failing {
                    eprintln!(
                        "warning: sync with {} failed: {e}; edits are kept in the op logs, \
                         retrying at the next change or interval",
                        self.addr
                    );
                    self.failing = true;
                }
            }
        }
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
            self.sync_and_write().await
        } else if !touched.is_empty() {
            let wrote = self.folder.write_back(Some(&touched), &self.sessions)?;
            print_write_back(&wrote, true);
            Ok(())
        } else {
            Ok(())
        }
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

// ---------------------------------------------------------------------------
// ls and status

fn offline() -> ServerConfig {
    ServerConfig::new("")
}

fn ls(dir: &Path) -> Result<u8, Fail> {
    let (folder, _lock) = open_folder(dir, false, offline())?;
    let notes = folder.client().list();
    let rows: Vec<[String; 4]> = notes
        .iter()
        .map(|n| {
            [
                format!("{:032x}", n.id),
                n.name.escape_debug().to_string(),
                file_of(&n.file),
                n.pending_ops.to_string(),
            ]
        })
        .collect();
    print_table(["ID", "NAME", "FILE", "PENDING"], &rows);
    Ok(0)
}

fn status(dir: &Path) -> Result<u8, Fail> {
    let (folder, _lock) = open_folder(dir, false, offline())?;
    let (notes, new_files) = folder.status()?;
    let store = folder.client().store().clone();
    let (replica, last_sync) = {
        let s = store.lock().unwrap_or_else(|e| e.into_inner());
        (s.replica_id(), s.last_sync_time())
    };
    let ops: usize = notes.iter().map(|n| n.info.pending_ops).sum();
    println!("folder:     {}", folder.dir().display());
    println!("replica:    {replica:032x}");
    println!("last sync:  {}", server_time(last_sync));
    println!(
        "notes:      {} ({} pending)",
        notes.len(),
        count(ops, "op", "ops")
    );
    if !notes.is_empty() {
        println!();
        let rows: Vec<[String; 5]> = notes
            .iter()
            .map(|n| {
                [
                    n.info.name.escape_debug().to_string(),
                    file_of(&n.info.file),
                    n.info.pending_ops.to_string(),
                    server_time(n.info.last_sync),
                    match &n.state {
                        FileState::InStep => "in step".to_owned(),
                        FileState::Edited => "edited, not picked up yet".to_owned(),
                        FileState::Behind => {
                            "behind its note (written at the next sync)".to_owned()
                        }
                        FileState::Missing => "deleted (written again at the next sync)".to_owned(),
                        FileState::Unusable(why) => format!("left alone: {why}"),
                    },
                ]
            })
            .collect();
        print_table(["NAME", "FILE", "PENDING", "LAST SYNC", "FILE"], &rows);
    }
    let edited: Vec<&str> = notes
        .iter()
        .filter(|n| n.state == FileState::Edited)
        .map(|n| n.info.name.as_str())
        .collect();
    if !edited.is_empty() || !new_files.is_empty() {
        println!();
        println!("local edits not picked up yet (the next sync does):");
        for n in notes.iter().filter(|n| n.state == FileState::Edited) {
            println!("  {} (edited)", file_of(&n.info.file));
        }
        for f in &new_files {
            println!("  {f} (new)");
        }
    }
    Ok(0)
}

fn file_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn print_table<const N: usize>(head: [&str; N], rows: &[[String; N]]) {
    let mut width = head.map(|h| h.chars().count());
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A server time (microseconds since the Unix epoch) as UTC.
fn server_time(us: u64) -> String {
    if us == 0 {
        return "never".into();
    }
    let secs = us / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm), from 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
