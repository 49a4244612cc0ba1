//! Client check of PROTOCOL.md 1.4 (making ids, version 3): a run the
//! client types at the spot where another site typed a run concurrently
//! stays whole, and so does the other run, in the merged text (by id
//! order). The other site's run is made by the reference allocator, which
//! follows the rule; a client that takes its ids from a shared ident range
//! at that spot (the version 1/2 random step) interleaves with it.
//!
//! A child module of `client_checks`, for its `Setup`.

use notesync_protocol::{Allocator, Atom, DocId, Level, Pid};

use super::super::Outcome;
use super::{ClientCtx, Setup, full_sequence, setup};

/// A run of `text` by `alloc`, typed forwards after the `at`-th entry of
/// the world's full sequence (`None`: at the start), or backwards before
/// it, without seeing what the client typed.
fn remote_run(
    s: &Setup,
    doc: DocId,
    alloc: &mut Allocator,
    at: usize,
    text: &str,
    forward: bool,
) -> Vec<Atom> {
    let seq = full_sequence(&s.world(), doc);
    let (left, right) = (
        at.checked_sub(1).map(|i| seq[i].clone()),
        seq.get(at).cloned(),
    );
    let mut atoms: Vec<Atom> = Vec::new();
    let mut bounds = (left, right);
    let chars: Vec<char> = if forward {
        text.chars().collect()
    } else {
        text.chars().rev().collect()
    };
    for ch in chars {
        let p = alloc
            .between(bounds.0.as_ref(), bounds.1.as_ref())
            .expect("room");
        atoms.push(Atom::new(ch.to_string(), p.clone()).expect("one char"));
        bounds = if forward {
            (Some(p), bounds.1)
        } else {
            (bounds.0, Some(p))
        };
    }
    atoms
}

/// Both runs whole in the world's text, which the client's equals.
fn assert_whole(s: &Setup, doc: DocId, runs: &[&str], what: &str) {
    s.assert_converged(doc, what);
    let text = s.world().text(doc);
    for r in runs {
        assert!(
            text.contains(r),
            "{what}: the run {r:?} is split in the merged text {text:?}: a version-3 client makes \
             ids by the rule of 1.4 (regions, extensions), so concurrent runs never interleave"
        );
    }
}

pub(super) async fn runs_stay_whole(ctx: ClientCtx) -> Outcome {
    let mut s = setup(&ctx).await;
    // Another site's note "# Notes\n\nend\n", one-char atoms with wide
    // gaps between their idents (as an old-rule client makes them), so
    // every spot has room at depth 1 for a shared range.
    let doc = s.rng.next_u128() | 1;
    s.world().create(doc, "runs");
    let base: Vec<Atom> = "# Notes\n\nend\n"
        .chars()
        .enumerate()
        .map(|(k, ch)| {
            let p = Pid::from_levels(&[Level::new(k as u32 * 0x1000_0000 + 0x100, 5)]);
            Atom::new(ch.to_string(), p).expect("one char")
        })
        .collect();
    s.world().remote_insert(doc, &base);
    s.sync_ok("first sync").await;
    s.assert_converged(doc, "after the first sync");

    // Forwards, after "# Notes\n" (char 8): the client types one char at a
    // time; sites 3 and 200 (below and above the client's) typed there too.
    let mut low = Allocator::new(3, doc, 0).expect("site 3");
    let mut high = Allocator::new(200, doc, 0).expect("site 200");
    let mine = "hello from the client";
    for (k, ch) in mine.chars().enumerate() {
        s.client.insert(doc, 8 + k, &ch.to_string());
    }
    let ra = remote_run(&s, doc, &mut low, 8, "greetings from three", true);
    let rb = remote_run(&s, doc, &mut high, 8, "and two hundred", true);
    s.world().remote_insert(doc, &ra);
    s.world().remote_insert(doc, &rb);
    s.sync_ok("sync after typing forwards").await;
    assert_whole(
        &s,
        doc,
        &[mine, "greetings from three", "and two hundred"],
        "forward runs at one spot",
    );

    // Backwards, before "end" (typing each char before the previous one,
    // as at the start of a line), against a remote backward run there.
    let text: Vec<char> = s.text(doc).chars().collect();
    let at = text.len() - 4;
    let back = "typed backwards";
    for ch in back.chars().rev() {
        s.client.insert(doc, at, &ch.to_string());
    }
    let seq = full_sequence(&s.world(), doc);
    let end_id: Pid = seq
        .iter()
        .find(|p| base.iter().any(|a| a.pid() == *p && a.data() == "e"))
        .cloned()
        .expect("the base's 'e'");
    let before_end = seq
        .iter()
        .position(|p| *p == end_id)
        .expect("in the sequence");
    let rc = remote_run(&s, doc, &mut low, before_end, "also backwards", false);
    s.world().remote_insert(doc, &rc);
    s.sync_ok("sync after typing backwards").await;
    assert_whole(
        &s,
        doc,
        &[back, "also backwards", mine],
        "backward runs at one spot",
    );
    Ok(())
}
