//! Concurrent paragraphs through the `notesync` binary (PROTOCOL.md 1.4):
//! two folders share a note, then, each without seeing the other, append a
//! paragraph to it and insert one at the same spot in its middle. After
//! both sync, each folder's file holds all four paragraphs whole (under the
//! old allocator one paragraph came out cut mid-word by the other).

use std::fs;

#[path = "support/blocking_server.rs"]
mod blocking_server;
use blocking_server::BlockingServer as TestServer;
#[path = "support/cli.rs"]
mod cli_support;
use cli_support::{md_files, sync};

/// A paragraph of about 480 bytes whose words all carry `tag`, so any cut
/// by another paragraph shows.
fn paragraph(tag: &str) -> String {
    let words = [
        "quietly", "the", "river", "carried", "lanterns", "past", "sleeping", "houses", "while",
        "someone", "counted", "stars", "aloud",
    ];
    let mut p = String::new();
    let mut k = 0;
    while p.len() < 470 {
        p.push_str(tag);
        p.push('-');
        p.push_str(words[k % words.len()]);
        p.push(' ');
        k += 1;
    }
    p.push_str("end.\n");
    p
}

#[test]
fn offline_paragraphs_at_one_spot_stay_whole_in_both_folders() {
    let server = TestServer::start_temp();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    fs::create_dir(&a).unwrap();
    let base = "# Shared\n\nintro line\n\nclosing line\n";
    fs::write(a.join("shared.md"), base).unwrap();
    sync(&a, &server.addr);
    sync(&b, &server.addr);
    assert_eq!(md_files(&b)["shared.md"], base);

    // Both offline: each appends at the end and inserts after the intro.
    let (pa, ma) = (paragraph("alice"), paragraph("amber"));
    let (pb, mb) = (paragraph("bob"), paragraph("brown"));
    let edited =
        |middle: &str, end: &str| format!("# Shared\n\nintro line\n{middle}\nclosing line\n{end}");
    fs::write(a.join("shared.md"), edited(&ma, &pa)).unwrap();
    fs::write(b.join("shared.md"), edited(&mb, &pb)).unwrap();

    sync(&a, &server.addr);
    sync(&b, &server.addr);
    sync(&a, &server.addr);
    let fa = md_files(&a)["shared.md"].clone();
    let fb = md_files(&b)["shared.md"].clone();
    assert_eq!(fa, fb, "the folders converge");
    for p in [&pa, &ma, &pb, &mb] {
        assert!(
            fa.contains(p.as_str()),
            "a paragraph was cut:\n{fa}\nmissing:\n{p}"
        );
    }
    assert!(fa.starts_with("# Shared\n\nintro line\n"), "{fa}");
    assert_eq!(
        fa.len(),
        base.len() + pa.len() + ma.len() + pb.len() + mb.len()
    );
}
