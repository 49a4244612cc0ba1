//! The 3-way merge behind [`crate::folder`]: char diffs of two texts and
//! the edits that bring a person's changes to a file (base → file) into a
//! note's text that may have moved on meanwhile (base → store).
//!
//! Pure functions on strings: no I/O, no store. Indices are chars, not
//! bytes, as in the store's own text edits.

use std::ops::Range;
use std::time::{Duration, Instant};

use similar::{Algorithm, DiffTag, capture_diff_slices_deadline};

/// Longest time one diff may take; past it the diff is coarser, never wrong.
const DIFF_TIME: Duration = Duration::from_millis(500);
/// Two char-level changes closer than this many unchanged chars become one
/// (fewer, more readable edits; the chars between are re-typed).
const MIN_GAP: usize = 4;

/// One changed region: `old` chars were replaced by `new` chars (char
/// indices into the old and the new text; either may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    pub old: Range<usize>,
    pub new: Range<usize>,
}

/// The changed regions from `old` to `new`, in order, by char index. Lines
/// are compared first, then the chars of changed lines, so a small edit in
/// a big file is a small diff and the work is proportional to what changed.
pub fn diff(old: &str, new: &str) -> Vec<Hunk> {
    if old == new {
        return Vec::new();
    }
    let deadline = Some(Instant::now() + DIFF_TIME);
    let old_lines: Vec<&str> = old.split_inclusive('\n').collect();
    let new_lines: Vec<&str> = new.split_inclusive('\n').collect();
    let (old_at, new_at) = (line_starts(&old_lines), line_starts(&new_lines));
    let mut out: Vec<Hunk> = Vec::new();
    let mut push = |h: Hunk| match out.last_mut() {
        Some(last) if h.old.start - last.old.end < MIN_GAP => {
            last.old.end = h.old.end;
            last.new.end = h.new.end;
        }
        _ => out.push(h),
    };
    for op in capture_diff_slices_deadline(Algorithm::Myers, &old_lines, &new_lines, deadline) {
        let (tag, o, n) = op.as_tag_tuple();
        let (oc, nc) = (
            old_at[o.start]..old_at[o.end],
            new_at[n.start]..new_at[n.end],
        );
        match tag {
            DiffTag::Equal => {}
            DiffTag::Delete | DiffTag::Insert => push(Hunk { old: oc, new: nc }),
            DiffTag::Replace => {
                let a: Vec<char> = old_lines[o].iter().flat_map(|l| l.chars()).collect();
                let b: Vec<char> = new_lines[n].iter().flat_map(|l| l.chars()).collect();
                for op in capture_diff_slices_deadline(Algorithm::Myers, &a, &b, deadline) {
                    let (tag, o, n) = op.as_tag_tuple();
                    if tag != DiffTag::Equal {
                        push(Hunk {
                            old: oc.start + o.start..oc.start + o.end,
                            new: nc.start + n.start..nc.start + n.end,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The char index at which each line starts, plus the total.
fn line_starts(lines: &[&str]) -> Vec<usize> {
    let mut at = Vec::with_capacity(lines.len() + 1);
    let mut n = 0;
    at.push(0);
    for l in lines {
        n += l.chars().count();
        at.push(n);
    }
    at
}

/// An edit of a note's text, at char indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Insert { at: usize, text: String },
    Delete(Range<usize>),
}

/// The edits that bring a person's changes to a file (`base` → `file`)
/// into the store's text `store` (which is `base` plus changes from
/// elsewhere), at `store`'s char indices, in the order to apply them one
/// after the other (from the end backwards, so no index shifts).
///
/// Text the person deleted is deleted where the store still has it; text
/// the store gained meanwhile is kept; text the person typed goes where
/// they typed it, after anything the store gained at that same spot. With
/// `store == base` this is simply the diff from the store's text to the
/// file's.
pub fn merge(base: &str, file: &str, store: &str) -> Vec<Edit> {
    let user = diff(base, file);
    if user.is_empty() {
        return Vec::new();
    }
    let kept = kept_runs(base, store);
    let store_len = store.chars().count();
    let file_at: Vec<usize> = file
        .char_indices()
        .map(|(i, _)| i)
        .chain([file.len()])
        .collect();
    // (position, deletes before inserts at a position, later hunks first)
    let mut edits: Vec<(usize, u8, usize, Edit)> = Vec::new();
    for (k, h) in user.iter().enumerate() {
        for r in map_range(&kept, h.old.clone()) {
            edits.push((r.start, 1, k, Edit::Delete(r)));
        }
        if !h.new.is_empty() {
            let text = file[file_at[h.new.start]..file_at[h.new.end]].to_owned();
            let at = map_pos(&kept, h.old.start, store_len);
            edits.push((at, 0, k, Edit::Insert { at, text }));
        }
    }
    edits.sort_by_key(|e| std::cmp::Reverse((e.0, e.1, e.2)));
    edits.into_iter().map(|e| e.3).collect()
}

/// Runs of `base` chars that `store` still has: (base index, store index,
/// length), in order.
fn kept_runs(base: &str, store: &str) -> Vec<(usize, usize, usize)> {
    let base_len = base.chars().count();
    let mut runs = Vec::new();
    let (mut o, mut n) = (0, 0);
    for h in diff(base, store) {
        if h.old.start > o {
            runs.push((o, n, h.old.start - o));
        }
        o = h.old.end;
        n = h.new.end;
    }
    if base_len > o {
        runs.push((o, n, base_len - o));
    }
    runs
}

/// Where, in the store's text, to put what was typed before base char `p`.
fn map_pos(kept: &[(usize, usize, usize)], p: usize, store_len: usize) -> usize {
    let i = kept.partition_point(|r| r.0 + r.2 <= p);
    match kept.get(i) {
        Some(&(o, n, _)) if o <= p => n + (p - o),
        Some(&(_, n, _)) => n,
        None => store_len,
    }
}

/// The store ranges of the base chars in `r` that the store still has.
fn map_range(kept: &[(usize, usize, usize)], r: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let first = kept.partition_point(|k| k.0 + k.2 <= r.start);
    for &(o, n, len) in &kept[first..] {
        if o >= r.end {
            break;
        }
        let (s, e) = (r.start.max(o), r.end.min(o + len));
        if s < e {
            out.push(n + (s - o)..n + (e - o));
        }
    }
    out
}

/// Applies edits from [`merge`] to a string: what the store does to a
/// note's text (the folder records the result before it takes the edits).
pub fn apply_to(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Insert { at, text } => {
                chars.splice(*at..*at, text.chars());
            }
            Edit::Delete(r) => {
                chars.drain(r.clone());
            }
        }
    }
    chars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_small_edit_in_a_big_file_is_a_small_diff() {
        let old: String = (0..5000)
            .map(|i| format!("line {i}: some text\n"))
            .collect();
        let new = old.replacen("line 2500: some text", "line 2500: some more text", 1);
        let hunks = diff(&old, &new);
        assert_eq!(hunks.len(), 1, "{hunks:?}");
        assert_eq!(hunks[0].old.len(), 0);
        assert_eq!(hunks[0].new.len(), 5);
        let edits = merge(&old, &new, &old);
        assert_eq!(edits.len(), 1, "{edits:?}");
        assert_eq!(apply_to(&old, &edits), new);
    }

    #[test]
    fn char_indices_not_bytes() {
        let (old, new) = ("héllo wörld ✓", "héllo, wörld ✓✓");
        assert_eq!(apply_to(old, &merge(old, new, old)), new);
    }

    #[test]
    fn edits_merge_with_the_stores_changes() {
        let base = "alpha beta gamma\ndelta\n";
        let file = "alpha BETA gamma\ndelta epsilon\n"; // the person
        let store = "zero alpha beta gamma\ndelta\nomega\n"; // remote
        let out = apply_to(store, &merge(base, file, store));
        assert_eq!(out, "zero alpha BETA gamma\ndelta epsilon\nomega\n");
        // Deleting text the store also deleted, around text it added.
        let base = "one two three";
        let file = "one three";
        let store = "one t[x]wo three";
        let out = apply_to(store, &merge(base, file, store));
        assert!(out.contains("[x]"), "{out:?}");
        assert_eq!(out.replace("[x]", ""), "one three");
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof!["a", "b", "\n", "é", "xy"], 0..40)
            .prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn the_diff_turns_old_into_new(old in text(), new in text()) {
            prop_assert_eq!(apply_to(&old, &merge(&old, &new, &old)), new);
        }

        #[test]
        fn merged_edits_keep_what_both_sides_added(
            base in text(), a in "[PQZ]{0,6}", b in "[PQZ]{0,6}", pa in 0usize..50, pb in 0usize..50
        ) {
            // Both sides insert one marked piece into the base.
            let at = |p: usize| base.char_indices().map(|(i, _)| i).chain([base.len()]).nth(p % (base.chars().count() + 1)).unwrap();
            let (ia, ib) = (at(pa), at(pb));
            let file = format!("{}[A{a}]{}", &base[..ia], &base[ia..]);
            let store = format!("{}[B{b}]{}", &base[..ib], &base[ib..]);
            let out = apply_to(&store, &merge(&base, &file, &store));
            let a_mark = format!("[A{a}]");
            let b_mark = format!("[B{b}]");
            prop_assert!(out.contains(&a_mark), "{:?}", out);
            prop_assert!(out.contains(&b_mark), "{:?}", out);
            prop_assert_eq!(out.chars().count(), store.chars().count() + a.chars().count() + 3);
        }
    }
}
