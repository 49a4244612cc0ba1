//! `notesync`: keeps a folder of markdown notes in sync through a
//! notesync server. The logic lives in `notesync_client::folder`; this is
//! the command line: arguments, opening and locking the folder, and the
//! `sync`, `ls` and `status` commands. `watch` is in [`watch`] (with the
//! live-session policy in [`live`]), what is printed in [`print`].

mod live;
mod print;
mod watch;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use notesync_client::folder::{FileState, Folder, FolderError};
use notesync_client::{ServerConfig, StoreError, SyncError, TlsSettings};

use crate::print::{
    count, file_of, print_pick_up, print_refused, print_remote_deletions, print_table,
    print_write_back, progress, server_time, sync_line,
};
use crate::watch::{LIVE_WINDOW, watch};

const EXIT_ERROR: u8 = 1;
const EXIT_SYNC_FAILED: u8 = 3;
const EXIT_REFUSED: u8 = 4;

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
