//! File names: the stem a note's files get from its name (one safe path
//! component on every OS), and a free name in the trash. Pure functions
//! but for `free_trash_path`, which only looks at what exists.

use std::path::{Path, PathBuf};

use notesync_protocol::DocId;

/// `<trash>/<stem>.<id>.md`, or with ` (k)` before `.md` if taken.
pub(crate) fn free_trash_path(trash: &Path, stem: &str, id: DocId) -> PathBuf {
    let first = trash.join(format!("{stem}.{id:032x}.md"));
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|k| trash.join(format!("{stem}.{id:032x} ({k}).md")))
        .find(|p| !p.exists())
        .expect("some suffix is free")
}

const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// A file stem for a note name that is one plain path component on every
/// OS: no separators or `..`, no control or reserved characters, no
/// leading dot (hidden; and our own `.notesync`), no reserved device names,
/// at most 100 bytes.
pub fn safe_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    s = s
        .trim()
        .trim_start_matches('.')
        .trim_end_matches(['.', ' '])
        .to_owned();
    if s.len() > 100 {
        let mut cut = 100;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s = s.trim_end_matches(['.', ' ']).to_owned();
    }
    if s.is_empty() {
        s = "untitled".into();
    }
    let upper = s.split('.').next().unwrap_or("").to_ascii_uppercase();
    if RESERVED.contains(&upper.as_str()) {
        s.insert(0, '_');
    }
    s
}

pub(super) fn check_stem(stem: &str) -> Result<(), &'static str> {
    if stem.is_empty() || safe_stem(stem) != stem {
        return Err("not a safe file name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_safe_single_components() {
        for (name, want) in [
            ("../../x", "_.._x"),
            ("..", "untitled"),
            ("a/b\\c", "a_b_c"),
            ("CON", "_CON"),
            ("con.txt", "_con.txt"),
            (".notesync", "notesync"),
            ("  spaced. ", "spaced"),
            ("", "untitled"),
            ("ok name", "ok name"),
        ] {
            let s = safe_stem(name);
            assert_eq!(s, want, "{name:?}");
            assert!(!s.contains('/') && !s.contains('\\') && s != ".." && !s.starts_with('.'));
        }
        assert!(safe_stem(&"é".repeat(200)).len() <= 100);
    }
}
