//! Properties of the replica document model.

use notesync_client::{Doc, LocalOp};
use notesync_protocol::{Allocator, DocName};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Edit {
    Insert {
        at: prop::sample::Index,
        text: String,
    },
    Delete {
        at: prop::sample::Index,
        len: usize,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), "[a-zé🎉 ]{1,6}").prop_map(|(at, text)| Edit::Insert { at, text }),
        1 => (any::<prop::sample::Index>(), 1usize..5).prop_map(|(at, len)| Edit::Delete { at, len }),
    ]
}

/// Applies `e` to both the doc and a plain-char model; returns the ops.
fn run(doc: &mut Doc, model: &mut Vec<char>, alloc: &mut Allocator, e: &Edit) -> Vec<LocalOp> {
    match e {
        Edit::Insert { at, text } => {
            let i = at.index(model.len() + 1);
            model.splice(i..i, text.chars());
            doc.insert(alloc, i, text).unwrap()
        }
        Edit::Delete { at, len } => {
            if model.is_empty() {
                return Vec::new();
            }
            let i = at.index(model.len());
            let j = (i + len).min(model.len());
            model.drain(i..j);
            doc.delete(alloc, i..j).unwrap()
        }
    }
}

fn apply(doc: &mut Doc, ops: &[LocalOp]) {
    for op in ops {
        match op {
            LocalOp::Insert(a) => {
                doc.apply_insert(a.data(), a.pid());
            }
            LocalOp::Delete(p) => {
                doc.apply_delete(p);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn local_edits_match_a_string_model(edits in prop::collection::vec(edit(), 1..60)) {
        let mut doc = Doc::new(9, DocName::default());
        let mut alloc = Allocator::new(3, 9, 1).unwrap();
        let mut model = Vec::new();
        for e in &edits {
            run(&mut doc, &mut model, &mut alloc, e);
            prop_assert_eq!(doc.text(), model.iter().collect::<String>());
            prop_assert_eq!(doc.len_chars(), model.len());
        }
    }

    /// Two replicas edit concurrently, then each receives the other's ops in
    /// a shuffled order, some twice: both end with the same text, holding
    /// every char each inserted that it did not delete itself.
    #[test]
    fn concurrent_replicas_converge(
        base in "[a-z]{0,20}",
        ea in prop::collection::vec(edit(), 0..30),
        eb in prop::collection::vec(edit(), 0..30),
        seed in any::<u64>(),
    ) {
        let mut a = Doc::new(9, DocName::default());
        let mut alloc_a = Allocator::new(1, 9, seed).unwrap();
        let mut alloc_b = Allocator::new(2, 9, seed ^ 7).unwrap();
        let base_ops = a.insert(&mut alloc_a, 0, &base).unwrap();
        let mut b = Doc::new(9, DocName::default());
        apply(&mut b, &base_ops);
        let (mut ma, mut mb): (Vec<char>, Vec<char>) = (base.chars().collect(), base.chars().collect());
        let ops_a: Vec<LocalOp> = ea.iter().flat_map(|e| run(&mut a, &mut ma, &mut alloc_a, e)).collect();
        let ops_b: Vec<LocalOp> = eb.iter().flat_map(|e| run(&mut b, &mut mb, &mut alloc_b, e)).collect();
        let shuffle = |ops: &[LocalOp], salt: u64| {
            let mut v: Vec<LocalOp> = ops.iter().chain(ops.iter().step_by(3)).cloned().collect();
            let mut x = seed ^ salt | 1;
            for i in (1..v.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                v.swap(i, (x % (i as u64 + 1)) as usize);
            }
            v
        };
        apply(&mut a, &shuffle(&ops_b, 1));
        apply(&mut b, &shuffle(&ops_a, 2));
        prop_assert_eq!(a.text(), b.text());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Rewriting never-sent atoms (coalescing before an upsert, or re-making
    /// provisional ids) never changes the text, and leaves no deleted char
    /// behind, whatever mix of pastes, typing inside them and deletes came
    /// first.
    #[test]
    fn coalescing_keeps_the_text(edits in prop::collection::vec(edit(), 1..60), force: bool) {
        let mut doc = Doc::new(9, DocName::default());
        let mut alloc = Allocator::new(3, 9, 1).unwrap();
        let mut model = Vec::new();
        for e in &edits {
            run(&mut doc, &mut model, &mut alloc, e);
        }
        let before = doc.text();
        let mut real = Allocator::new(4, 9, 2).unwrap();
        let (removed, added) = doc.coalesce(&mut real, |_| true, force).unwrap();
        prop_assert_eq!(doc.text(), before.clone());
        prop_assert_eq!(added.iter().map(|a| a.data()).collect::<String>().len() <= before.len(), true);
        if force {
            prop_assert!(added.iter().all(|a| a.pid().creator() == 4));
            prop_assert_eq!(added.iter().map(|a| a.data()).collect::<String>(), before);
        }
        let _ = removed;
    }
}
