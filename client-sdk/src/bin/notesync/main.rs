//! `notesync`: keeps a folder of markdown notes in sync through a
//! notesync server. The logic lives in `notesync_client::folder`; this is
//! the command line: the arguments, and the `sync`, `ls` and `status`
//! commands. Opening the folder is in [`setup`] (with the stored connection
//! in [`connection`]), `watch` in [`watch`] (with the live-session policy in
//! [`live`]), what is printed in [`print`]. Modules depend one way:
//! main → watch → live; main, watch → setup, print; main, setup → connection.

mod connection;
mod live;
mod print;
mod setup;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use notesync_client::ServerConfig;
use notesync_client::SyncError;
use notesync_client::folder::{FileState, Folder};

use crate::connection::Connection;
use crate::print::{
    count, file_of, print_pick_up, print_refused, print_remote_deletions, print_table,
    print_write_back, progress, server_time, sync_line,
};
use crate::setup::{EXIT_ERROR, EXIT_REFUSED, EXIT_SYNC_FAILED, Fail, ServerArgs, open_folder};
use crate::watch::{LIVE_WINDOW, watch};

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

The first successful sync (or watch) stores the connection (--server, the
TLS flags, the token file's path; never the token) in
.notesync/connection.json, so later commands may omit them; flags given
override the stored values and are stored once a sync succeeds.

Exit status: 0 done; 1 error (nothing was lost); 3 the server could not be
reached or the sync failed; 4 the server refused some notes (listed).";

const WATCH_HELP: &str = "\
Keep DIR in sync until Ctrl-C.

Edited and new files are picked up as they are saved (once the folder has
been quiet for 200 ms) and synced at once; changes made elsewhere arrive
through the server's change feed within a moment and are written into the
files (a server older than protocol version 4 has no feed: then they are
fetched every --interval seconds). A note whose
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
        /// Seconds between syncs that fetch changes made elsewhere, when
        /// the server has no change feed (before protocol version 4)
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
// sync

async fn sync(dir: &Path, server: &ServerArgs) -> Result<u8, Fail> {
    let conn = server.resolve(dir)?;
    let addr = &conn.conn.server;
    let (mut folder, _lock) = open_folder(dir, true, conn.config.clone())?;
    let bar = progress();
    bar.set_message("reading files");
    let b = bar.clone();
    folder.set_progress(Some(Box::new(move |done, total| {
        b.set_message(format!("files {done}/{total}"));
    })));
    let none = HashMap::new();
    let picked = folder.pick_up_for_sync()?;
    bar.set_message(format!("syncing with {addr}"));
    let b = bar.clone();
    let shown = addr.clone();
    let synced = folder
        .sync_reporting(move |p| {
            let what = if p.new_notes { "new notes" } else { "notes" };
            b.set_message(format!(
                "syncing with {shown}: {what} {}/{}",
                p.done, p.total
            ));
        })
        .await?;
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
            conn.remember(dir)?;
            let gone = folder.apply_remote_deletions(&report.deleted)?;
            print_remote_deletions(&gone);
            println!("synced with {addr}: {}", sync_line(&report));
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
        Err(e) => Err(sync_failed(&folder, addr, &e)),
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
    match Connection::load(dir)? {
        Some(c) => {
            println!("server:     {}", c.describe());
            let token = match &c.token_file {
                Some(f) => f.display().to_string(),
                None => "none (NOTESYNC_TOKEN, if set)".to_owned(),
            };
            println!("token file: {token}");
        }
        None => println!("server:     none stored (give --server at the next sync)"),
    }
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
