//! Large documents: a reply bigger than `max_frame_bytes` (32 MiB) is split
//! over several 33s (PROTOCOL.md 3.1, 5), each within the limit, and the
//! parts add up to the whole document.

use notesync_protocol::{Atom, DocResponse, Level, Pid};
use notesync_tests::{ServerProcess, SessionClient, model_of};

/// Two upserts of 30,000 atoms of 255 bytes at 64-level ids (577 bytes on
/// the wire each): about 34.6 MB, more than one 32 MiB frame can carry.
const PER_UPSERT: u32 = 30_000;
const UPSERTS: u32 = 2;

fn total_bytes(rs: &[DocResponse]) -> usize {
    rs.iter()
        .map(|r| r.inserts.byte_len() + r.deletes.byte_len())
        .sum()
}

/// Atom number `i`: 255 bytes at a 64-level id of `site`, in order of `i`.
fn big_atom(i: u32, site: u8) -> Atom {
    let mut levels = vec![Level::new(i, site)];
    levels.extend((0..63).map(|d| Level::new(d, site)));
    let head = format!("{i}:");
    let data = format!("{head}{}", "x".repeat(255 - head.len()));
    Atom::new(data, Pid::from_levels(&levels)).expect("valid atom")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_a_frame_is_pulled_in_several_33s() {
    let server = ServerProcess::start();
    let doc = 0x1A26E;
    let mut c = server.connect().await;
    c.set_wait(std::time::Duration::from_secs(20));
    c.hello(0xB16).await;
    let (_, s) = c.upsert(doc, "big", 0, &[], &[]).await;
    let mut since = s.sync_time;
    let mut expected = Vec::new();
    for u in 0..UPSERTS {
        let atoms: Vec<Atom> = (u * PER_UPSERT..(u + 1) * PER_UPSERT)
            .map(|i| big_atom(i, s.site))
            .collect();
        let (_, s) = c.upsert(doc, "big", since, &atoms, &[]).await;
        since = s.sync_time;
        expected.extend(atoms.into_iter().map(|a| {
            let (d, p) = a.into_parts();
            (p, d)
        }));
    }
    let (rs, _) = c.pull(doc, 0).await;
    assert!(
        rs.len() >= 2,
        "{} bytes of atoms cannot fit one 32 MiB frame: expected several 33s, got {}",
        total_bytes(&rs),
        rs.len()
    );
    assert_eq!(
        model_of(doc, &rs).live(),
        expected,
        "the parts add up to the whole document"
    );

    let mut sc = SessionClient::start(server.addr(), "session", Some(0xB17), doc, 0, 2).await;
    assert_eq!(
        sc.model.live(),
        expected,
        "a session_start since 0 gets the whole document too"
    );
    sc.rename("still works").await;
    sc.wait_acked().await;
}
