//! Client check of PROTOCOL.md 3.8 (the change feed's cursors): a client
//! that follows the feed and loses its connection subscribes again from
//! its cursor, so it neither starts over nor skips what it had not yet
//! pulled.
//!
//! A child module of `client_checks`, for its `Setup`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use notesync_protocol::{Atom, ClientFrame, DocId, Level, Pid, Time};

use super::super::fake_server::{World, serve_sync};
use super::super::{Outcome, Skipped};
use super::{ClientCtx, setup};

/// Makes `doc` in the world with `text` by site 2; the time of its change.
fn remote_note(world: &Mutex<World>, doc: DocId, text: &str) -> Time {
    let mut w = world.lock().expect("world lock");
    w.create(doc, "fed");
    let atom = Atom::new(text, Pid::from_levels(&[Level::new(1, 2)])).expect("atom");
    w.remote_insert(doc, &[atom])
}

pub(super) async fn resubscribes_from_cursor(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    if !s.client.follow_feed() {
        return Err(Skipped(
            "the client under test has no background sync that follows the feed \
             (ClientUnderTest::follow_feed)"
                .into(),
        ));
    }
    let (b, c) = (s.rng.next_u128() | 1, s.rng.next_u128() | 1);
    let mut c1 = s.server.accept("the background sync").await;
    let now = s.world().now;
    c1.handshake(now).await;
    // The script, on the requests as they come: after the 5, a note B
    // appears (pushed in a 38 at tb); after the client's pull of B, a note
    // C (a 38 at tc); the pull of C is never answered: the connection is
    // lost with C listed and not yet pulled.
    let world = s.world.clone();
    let (mut stage, mut tb, mut tc) = (0, 0, 0);
    serve_sync(&mut c1, &s.world, |f| match (stage, f) {
        (0, ClientFrame::Subscribe { .. }) => {
            stage = 1;
            tb = remote_note(&world, b, "b");
            false
        }
        (1, ClientFrame::Pull { doc, .. }) if *doc == b => {
            stage = 2;
            tc = remote_note(&world, c, "c");
            false
        }
        (2, ClientFrame::Pull { doc, .. }) if *doc == c => {
            stage = 3;
            true
        }
        _ => false,
    })
    .await;
    assert_eq!(
        stage, 3,
        "following the feed, the client subscribes (5) and pulls each note a 38 lists (3.8): \
         it closed the connection at step {stage} of 3 (subscribe, pull B, pull C)"
    );
    drop(c1);

    let mut c2 = s
        .server
        .accept("the background sync, after its connection was lost")
        .await;
    let now = s.world().now;
    c2.handshake(now).await;
    let id = c2.id;
    let world = s.world.clone();
    let mut serving = tokio::spawn(async move { serve_sync(&mut c2, &world, |_| false).await });
    let deadline = Instant::now() + s.server.wait;
    let since = loop {
        let found = s
            .server
            .traffic()
            .received
            .iter()
            .find_map(|(n, f)| match f {
                ClientFrame::Subscribe { since } if *n == id => Some(*since),
                _ => None,
            });
        if let Some(since) = found {
            break since;
        }
        if serving.is_finished() {
            // The fake server's own checks panicked, or the client closed.
            match (&mut serving).await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                _ => panic!(
                    "after a reconnect the client subscribes to the feed again (3.8): it closed \
                     the connection without a 5"
                ),
            }
        }
        assert!(
            Instant::now() < deadline,
            "after a reconnect the client subscribes to the feed again (3.8): no 5 within {:?}",
            s.server.wait
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let given: Vec<Time> = s
        .server
        .traffic()
        .feed_times
        .iter()
        .filter(|(n, _)| *n != id)
        .map(|(_, t)| *t)
        .collect();
    // tc is the largest time the client got (3.8: "a client keeps the
    // largest time it got in a 38 or 39"); tb is the cursor of the last
    // entries it finished pulling, which a client that moves its cursor
    // only then may resume from. Nothing changed while it was away, so no
    // later cursor exists; an earlier one lists again what it had.
    assert!(
        since == tc || since == tb,
        "after a reconnect the client subscribes from its cursor (3.8): the lost connection gave \
         it feed times {given:?}, the last {tc} (C listed, not pulled) after {tb} (B, pulled); \
         it subscribed from {since}"
    );
    // And misses nothing: C comes, by its catch-up or its feed.
    s.eventually_text(
        c,
        "c",
        "the note listed but not pulled before the connection was lost",
    )
    .await;
    serving.abort();
    Ok(())
}
