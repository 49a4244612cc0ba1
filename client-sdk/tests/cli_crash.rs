//! `notesync sync` killed (SIGKILL) after each of its durable steps in
//! turn, then run again: no edit is ever lost or taken twice, in the folder
//! or on the server. The steps are counted by the binary itself
//! (`NOTESYNC_CRASH_AT`, see `notesync_client::fsutil::crash_point`), which
//! stops at the k-th one for the test to kill it there.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use notesync_client::folder::Folder;
use notesync_client::fsutil::CRASH_AT_VAR;
use notesync_client::store::MAX_LOADED_VAR;
use notesync_client::{Client, ServerConfig};

#[path = "support/blocking_server.rs"]
mod blocking_server;
use blocking_server::BlockingServer as TestServer;
#[path = "support/cli.rs"]
mod cli_support;
use cli_support::{COMMAND_LIMIT, md_files, start, sync, sync_env};

const TRIP: &str = "# Trip\n\nDay one: the coast.\n\nDay two: the hills.\n";
/// Typed on the other device, after the title.
const PACKING: &str = "Packing: boots.\n\n";
/// The person's edit here: two changes in one file.
const TRIP_HERE: &str =
    "# Trip\n\nDay one: the rocky coast.\n\nDay two: the hills.\n\nDay three: home.\n";
const TRIP_AFTER: &str = "# Trip\n\nPacking: boots.\n\nDay one: the rocky coast.\n\nDay two: the hills.\n\nDay three: home.\n";
const LIST: &str = "alpha\nbeta\ngamma\n";
/// Deletes, inserts and a replacement.
const LIST_HERE: &str = "alpha\nBETA\ngamma\ndelta\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The id of the note named `name`.
fn note(client: &Client, name: &str) -> u128 {
    let notes = client.list();
    notes.iter().find(|n| n.name == name).unwrap().id
}

/// How a run that was told to stop at a crash point went.
enum Run {
    /// Stopped there, and was killed.
    Killed,
    /// Finished first: it has fewer durable steps.
    Finished,
}

/// `notesync sync DIR`, killed with SIGKILL at its `k`-th durable step.
fn sync_killed_at(dir: &Path, addr: &str, k: usize) -> Run {
    sync_killed_at_env(dir, addr, k, &[])
}

/// [`sync_killed_at`] with these environment variables set as well.
fn sync_killed_at_env(dir: &Path, addr: &str, k: usize, env: &[(&str, &str)]) -> Run {
    let args = [
        OsStr::new("sync"),
        dir.as_os_str(),
        OsStr::new("--server"),
        OsStr::new(addr),
    ];
    // (Its stdout stays piped, unread: a sync prints a few lines.)
    let k_var = k.to_string();
    let mut env = env.to_vec();
    env.push((CRASH_AT_VAR, &k_var));
    let mut g = start(&args, &env);
    let err = BufReader::new(g.0.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in err.lines() {
            let stopped = line.is_ok_and(|l| l == format!("crash point {k}"));
            if stopped {
                let _ = tx.send(true);
                return;
            }
        }
        let _ = tx.send(false);
    });
    let stopped = rx
        .recv_timeout(COMMAND_LIMIT)
        .unwrap_or_else(|_| panic!("the run to crash point {k} did not stop"));
    if stopped {
        g.0.kill().unwrap(); // SIGKILL
        g.0.wait().unwrap();
        return Run::Killed;
    }
    let status = g.0.wait().unwrap();
    assert!(status.success(), "the run to crash point {k}: {status}");
    Run::Finished
}

/// A take begun and not ended (see `folder/take.rs`).
fn take_in_progress(dir: &Path) -> bool {
    fs::read_dir(dir.join(".notesync/cli"))
        .unwrap()
        .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "take"))
}

/// One crash at step `k` of a sync that takes edits of two files, one of
/// them into a note the store changed meanwhile; then a run to the end.
/// Returns how the killed run went and whether it left a take to finish.
fn crash_at(k: usize) -> (Run, bool) {
    let server = TestServer::start_temp();
    let cfg = ServerConfig::new(server.addr.clone());
    let rt = runtime();
    let root = tempfile::tempdir().unwrap();
    let (here, there) = (root.path().join("here"), root.path().join("there"));
    fs::create_dir(&here).unwrap();
    fs::write(here.join("trip.md"), TRIP).unwrap();
    fs::write(here.join("list.md"), LIST).unwrap();
    sync(&here, &server.addr);

    // Another device adds a paragraph; this folder's store gets it (a sync
    // that stopped before writing the files), its file does not.
    let other = Client::open(&there, cfg.clone()).unwrap();
    rt.block_on(other.sync_now()).unwrap();
    other.insert(note(&other, "trip"), 8, PACKING).unwrap();
    rt.block_on(other.sync_now()).unwrap();
    {
        let folder = Folder::open(&here, cfg.clone()).unwrap();
        rt.block_on(folder.client().sync_now()).unwrap();
        folder.client().flush().unwrap();
        let trip = note(folder.client(), "trip");
        assert!(folder.client().text(trip).unwrap().contains(PACKING));
    }
    assert_eq!(fs::read_to_string(here.join("trip.md")).unwrap(), TRIP);
    // Meanwhile the person edits both files.
    fs::write(here.join("trip.md"), TRIP_HERE).unwrap();
    fs::write(here.join("list.md"), LIST_HERE).unwrap();

    let run = sync_killed_at(&here, &server.addr, k);
    let taking = take_in_progress(&here);
    sync(&here, &server.addr);

    let want: BTreeMap<String, String> = [("list.md", LIST_HERE), ("trip.md", TRIP_AFTER)]
        .into_iter()
        .map(|(f, t)| (f.to_owned(), t.to_owned()))
        .collect();
    assert_eq!(
        md_files(&here),
        want,
        "the folder, after a crash at step {k}"
    );
    assert!(!take_in_progress(&here), "step {k}: a take was left");
    rt.block_on(other.sync_now()).unwrap();
    let on_server: HashMap<String, String> = other
        .list()
        .into_iter()
        .map(|n| (n.name, other.text(n.id).unwrap()))
        .collect();
    assert_eq!(on_server.len(), 2, "{on_server:?}");
    assert_eq!(
        on_server["trip"], TRIP_AFTER,
        "the server, crash at step {k}"
    );
    assert_eq!(
        on_server["list"], LIST_HERE,
        "the server, crash at step {k}"
    );
    let mine = Client::open(&here, cfg).unwrap();
    let pending: Vec<usize> = mine.list().iter().map(|n| n.pending_ops).collect();
    assert_eq!(pending, [0, 0], "step {k}: edits left unsent");
    (run, taking)
}

#[test]
fn a_sync_killed_at_any_step_loses_nothing_and_doubles_nothing() {
    let mut takes_finished = 0;
    let mut k = 1;
    loop {
        let (run, taking) = crash_at(k);
        takes_finished += usize::from(taking);
        if let Run::Finished = run {
            break;
        }
        k += 1;
    }
    // The binary really counts its steps, and the crashes hit the window
    // between taking a file's edits and saving its base, in both files.
    assert!(k > 10, "only {} durable steps", k - 1);
    assert!(takes_finished >= 6, "{takes_finished} crashes mid-take");
}

/// Notes in the import crash test: enough that a crash lands inside the
/// batches (the import's pick-up, the site allocations, the pipelined
/// upserts, the flush), few enough for one run per crash point tried.
const IMPORTED: usize = 24;

/// The folder a person starts with: `IMPORTED` notes of distinct text,
/// one with a name the store must make safe.
fn notes_to_import() -> BTreeMap<String, String> {
    (0..IMPORTED)
        .map(|i| {
            let name = if i == 7 {
                "CON.md".to_owned()
            } else {
                format!("note {i:02}.md")
            };
            let text = format!("# Note {i}\n\n{}\n", "words of this note ".repeat(20 + i));
            (name, text)
        })
        .collect()
}

/// At most this many notes in memory during the import crash test, far
/// below its notes: notes leave memory (saved, or with their logs alone) at
/// every stage, as in an import of thousands.
const LOADED: &str = "4";

/// A first sync of a folder of notes, killed at step `k`, then run again
/// to the end: every file is a note on the server exactly once, with its
/// text, and the folder is as it was.
fn import_crash_at(k: usize) -> Run {
    let server = TestServer::start_temp();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("notes");
    fs::create_dir(&dir).unwrap();
    let files = notes_to_import();
    for (name, text) in &files {
        fs::write(dir.join(name), text).unwrap();
    }
    let bound = [(MAX_LOADED_VAR, LOADED)];
    let run = sync_killed_at_env(&dir, &server.addr, k, &bound);
    sync_env(&dir, &server.addr, &bound);

    // The store made CON safe: its file moved to the note's name.
    let mut want = files.clone();
    let con = want.remove("CON.md").unwrap();
    want.insert("_CON.md".to_owned(), con);
    let folder = md_files(&dir);
    let wrong: Vec<&String> = want
        .iter()
        .filter(|(name, text)| folder.get(*name) != Some(*text))
        .map(|(name, _)| name)
        .collect();
    assert!(
        wrong.is_empty() && folder.len() == want.len(),
        "the folder, after a crash at step {k}: {} files, these wrong: {wrong:?}",
        folder.len()
    );
    let other = Client::open(
        root.path().join("other"),
        ServerConfig::new(server.addr.clone()),
    )
    .unwrap();
    runtime().block_on(other.sync_now()).unwrap();
    let mut on_server: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in other.list() {
        on_server
            .entry(format!("{}.md", n.name))
            .or_default()
            .push(other.text(n.id).unwrap());
    }
    let doubled: Vec<_> = on_server.iter().filter(|(_, t)| t.len() > 1).collect();
    assert!(doubled.is_empty(), "step {k}: notes doubled: {doubled:?}");
    let on_server: BTreeMap<String, String> = on_server
        .into_iter()
        .map(|(name, mut t)| (name, t.pop().unwrap()))
        .collect();
    let wrong: Vec<(&String, Option<usize>)> = files
        .iter()
        .filter(|(name, text)| on_server.get(*name) != Some(*text))
        .map(|(name, _)| (name, on_server.get(name).map(String::len)))
        .collect();
    assert!(
        wrong.is_empty() && on_server.len() == files.len(),
        "the server, after a crash at step {k}: {} notes, these wrong (name, length there): {wrong:?}",
        on_server.len()
    );
    let mine = Client::open(&dir, ServerConfig::new(server.addr.clone())).unwrap();
    let pending: usize = mine.list().iter().map(|n| n.pending_ops).sum();
    assert_eq!(pending, 0, "step {k}: edits left unsent");
    run
}

#[test]
fn an_import_killed_at_any_point_loses_no_note_and_doubles_none() {
    // Every step early on (the first notes, the first batch boundaries),
    // then steps spread over the rest by a seeded walk, to the end.
    let mut k = 1;
    let mut seed = 0x9e37_79b9_u64;
    let mut tried = 0;
    loop {
        if let Run::Finished = import_crash_at(k) {
            break;
        }
        tried += 1;
        let stride = if k < 12 {
            1
        } else {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + (seed >> 33) as usize % 20
        };
        k += stride;
    }
    eprintln!("import crash test: {tried} crash points, {k} steps");
    assert!(
        k > IMPORTED * 2,
        "only {k} durable steps for {IMPORTED} notes"
    );
    assert!(tried >= 12, "{tried} crash points tried");
}
