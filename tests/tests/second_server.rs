//! A second server on a data folder that one is already using must refuse
//! to start, clearly, and leave the first one serving.

use notesync_tests::{ServerProcess, atom, model_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_folder_fails_clearly_and_the_first_keeps_working() {
    let first = ServerProcess::start();
    let doc = 0x2D;
    let mut c = first.connect().await;
    c.hello(0x1).await;
    let (_, s) = c.upsert(doc, "first", 0, &[], &[]).await;
    c.upsert(doc, "first", s.sync_time, &[atom("kept", 1, s.site)], &[])
        .await;

    let failure = match ServerProcess::try_start_in(first.data_dir()) {
        Ok(second) => panic!(
            "a second server started on {} (listening on {}): two writers on one \
             data folder",
            first.data_dir().display(),
            second.addr()
        ),
        Err(f) => f,
    };
    let status = failure
        .status
        .unwrap_or_else(|| panic!("the second server neither started nor exited: {failure}"));
    assert!(
        !status.success(),
        "the second server must exit non-zero: {failure}"
    );
    assert!(
        !failure.stderr.trim().is_empty(),
        "the second server says why on stderr: {failure}"
    );
    assert!(
        !failure.stderr.contains("panicked at"),
        "a clear error, not a panic: {failure}"
    );

    // The first one still serves the old connection and new ones.
    let (rs, s2) = c.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "kept");
    c.upsert(
        doc,
        "first",
        s2.sync_time,
        &[atom(" still", 2, s.site)],
        &[],
    )
    .await;
    let mut c2 = first.connect().await;
    let (rs, _) = c2.pull(doc, 0).await;
    assert_eq!(model_of(doc, &rs).text(), "kept still");
}
