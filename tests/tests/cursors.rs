//! Synclist paging at scale (PROTOCOL.md 3.1): more documents than one
//! response may hold, so a capped server must page and the pages must join
//! exactly. The cursor rules themselves (listers following their cursors
//! while others write never miss a change) are the conformance kit's
//! `cursors-never-miss-with-concurrent-writers`; this is the volume the kit
//! does not create on a server it may share.

use std::collections::BTreeSet;

use notesync_tests::{ServerProcess, upsert_frame};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_synclist_from_the_largest_time_lists_every_document_once() {
    // More documents than the default cap of one synclist response (10,000),
    // so a capped server must page, and the pages must join exactly.
    const N: u128 = 10_050;
    let server = ServerProcess::start();
    let mut w = server.connect().await.with_label("creator");
    let mut created_at = Vec::new();
    for chunk in (1..=N).collect::<Vec<_>>().chunks(500) {
        w.send_many(chunk.iter().map(|&d| upsert_frame(d, "", 0, &[], &[])))
            .await;
        for &d in chunk {
            let (_, s) = w.recv_doc_reply(d, "create").await.expect("created");
            created_at.push((d, s.sync_time));
        }
    }
    let mut r = server.connect().await.with_label("lister");
    let all = r.synclist_all(0).await;
    assert_eq!(all.len(), N as usize, "every document listed once");
    assert!(
        all.windows(2).all(|w| w[0].modified < w[1].modified),
        "pages join in strictly ascending time"
    );
    assert_eq!(
        all.iter().map(|e| e.doc).collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>(),
        "in creation order"
    );
    // From the middle: exactly the documents created later.
    let (mid_doc, mid_time) = created_at[4_999];
    let rest = r.synclist_all(mid_time).await;
    let first_listed = rest.first().map(|e| e.doc);
    assert!(
        rest.iter().all(|e| e.doc > mid_doc) || first_listed.is_none(),
        "nothing at or before the cursor's document"
    );
    let listed: BTreeSet<u128> = rest.iter().map(|e| e.doc).collect();
    let later: BTreeSet<u128> = created_at
        .iter()
        .filter(|(_, t)| *t > mid_time)
        .map(|(d, _)| *d)
        .collect();
    assert!(
        later.is_subset(&listed),
        "every document created after the cursor's 34 is listed"
    );
}
