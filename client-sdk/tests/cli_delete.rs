//! `notesync sync` and deleted notes (PROTOCOL.md 3.5): deleting a note's
//! `.md` deletes the note everywhere; a folder with edits of it that never
//! reached the server keeps them in `.notesync/trash/`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;

#[path = "support/blocking_server.rs"]
mod blocking_server;
use blocking_server::BlockingServer as TestServer;
#[path = "support/cli.rs"]
mod cli_support;
use cli_support::{md_files, notesync, sync};

fn files(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn deleting_a_file_deletes_the_note_on_every_device() {
    let server = TestServer::start_temp();
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    fs::write(a.path().join("list.md"), "milk\neggs\n").unwrap();
    fs::write(a.path().join("keep.md"), "stays").unwrap();
    sync(a.path(), &server.addr);
    sync(b.path(), &server.addr);
    sync(c.path(), &server.addr);
    let both = files(&[("keep.md", "stays"), ("list.md", "milk\neggs\n")]);
    assert_eq!(md_files(b.path()), both);
    assert_eq!(md_files(c.path()), both);

    // B and C are offline; C edits the note meanwhile. A deletes its file.
    fs::write(c.path().join("list.md"), "milk\neggs\nbread (from C)\n").unwrap();
    fs::remove_file(a.path().join("list.md")).unwrap();
    let (out, _) = sync(a.path(), &server.addr);
    assert!(out.contains("deleted note"), "{out}");
    assert!(out.contains("1 deleted on the server"), "{out}");
    assert_eq!(md_files(a.path()), files(&[("keep.md", "stays")]));
    assert!(!a.path().join("list.md.structure").exists());
    assert!(!a.path().join("list.md.latest_ops").exists());

    // B comes back: the file goes.
    let (out, _) = sync(b.path(), &server.addr);
    assert!(out.contains("removed list.md"), "{out}");
    assert_eq!(md_files(b.path()), files(&[("keep.md", "stays")]));
    assert!(!b.path().join("list.md.structure").exists());

    // C comes back: its edit never reached the server, so the text is kept
    // in the trash, said so, and the note stays deleted.
    let (out, _) = sync(c.path(), &server.addr);
    assert!(out.contains("kept unsynced edits of list.md"), "{out}");
    assert_eq!(md_files(c.path()), files(&[("keep.md", "stays")]));
    let trash: Vec<String> = fs::read_dir(c.path().join(".notesync/trash"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(trash, vec!["milk\neggs\nbread (from C)\n".to_owned()]);

    // Nothing brings it back.
    for d in [&a, &b, &c] {
        sync(d.path(), &server.addr);
        assert_eq!(md_files(d.path()), files(&[("keep.md", "stays")]));
    }
}

#[test]
fn a_note_that_never_synced_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("draft.md"), "draft").unwrap();
    // No server: the sync fails, the note never synced.
    let out = notesync(&[
        OsStr::new("sync"),
        dir.path().as_os_str(),
        OsStr::new("--server"),
        OsStr::new("127.0.0.1:1"),
    ]);
    assert!(!out.status.success());
    fs::remove_file(dir.path().join("draft.md")).unwrap();
    let server = TestServer::start_temp();
    let (_, err) = sync(dir.path(), &server.addr);
    assert!(err.contains("never synced"), "{err}");
    assert_eq!(md_files(dir.path()), files(&[("draft.md", "draft")]));
}
