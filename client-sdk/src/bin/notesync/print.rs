//! What `notesync` prints: the reports of syncs, pick-ups and write-backs,
//! tables, times, and the progress display. Output only; no decisions.
//!
//! May touch: stdout and stderr; reads note names through the folder.

use std::io::{self, IsTerminal};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use notesync_client::SyncReport;
use notesync_client::folder::{FileDeletion, Folder, PickUp, WriteBack};
use notesync_protocol::DocId;

/// A progress display for long operations: drawn on stdout when it is a
/// terminal, hidden otherwise.
pub(crate) fn progress() -> ProgressBar {
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

pub(crate) fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(crate) fn sync_line(r: &SyncReport) -> String {
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

pub(crate) fn note_label(folder: &Folder, id: DocId) -> String {
    match folder.client().name(id) {
        Ok(name) => format!("{:?} ({id:032x})", name),
        Err(_) => format!("{id:032x}"),
    }
}

pub(crate) fn print_refused(folder: &Folder, r: &SyncReport) {
    for (id, code, msg) in &r.refused {
        println!(
            "refused: {}: error {code}: {msg}; its edits stay in the op log",
            note_label(folder, *id)
        );
    }
}

pub(crate) fn print_pick_up(folder: &Folder, p: &PickUp, summary: bool) {
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

pub(crate) fn print_remote_deletions(gone: &[FileDeletion]) {
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

pub(crate) fn print_write_back(w: &WriteBack, each: bool) {
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

pub(crate) fn file_of(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(crate) fn print_table<const N: usize>(head: [&str; N], rows: &[[String; N]]) {
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
pub(crate) fn server_time(us: u64) -> String {
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
