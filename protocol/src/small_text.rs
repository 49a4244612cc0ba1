//! [`SmallText`]: an atom's data without a heap allocation when it is short.
//!
//! Why: nearly every atom is one char (runs are one-char atoms, PROTOCOL.md
//! 1.4), and a replica holds, clones and drops one per char: as a `String`
//! each is a malloc and a free, which profiles of a folder import showed as
//! a third of the client's CPU. Up to [`INLINE`] bytes live in the value
//! itself; longer data (multi-char atoms of older clients, at most 255
//! bytes) is one boxed `str`.

use std::fmt;
use std::ops::Deref;

/// The most bytes held without a heap allocation (the value stays the size
/// of a `String`).
pub const INLINE: usize = 22;

/// Immutable UTF-8 text, inline when short. Derefs to `str`.
#[derive(Clone)]
pub struct SmallText(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl SmallText {
    pub fn new(s: &str) -> Self {
        if s.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            SmallText(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            SmallText(Repr::Heap(s.into()))
        }
    }

    /// One char, never on the heap.
    pub fn from_char(ch: char) -> Self {
        let mut bytes = [0; INLINE];
        let len = ch.encode_utf8(&mut bytes).len() as u8;
        SmallText(Repr::Inline { len, bytes })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only `new` and `from_char` fill these bytes, from a `str` or
            // a `char`; checked again (a few bytes) because the crate
            // forbids unsafe code.
            Repr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("built from a str")
            }
            Repr::Heap(s) => s,
        }
    }
}

impl Default for SmallText {
    fn default() -> Self {
        SmallText::new("")
    }
}

impl Deref for SmallText {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for SmallText {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for SmallText {
    fn from(s: &str) -> Self {
        SmallText::new(s)
    }
}

impl From<String> for SmallText {
    fn from(s: String) -> Self {
        SmallText::new(&s)
    }
}

impl From<&String> for SmallText {
    fn from(s: &String) -> Self {
        SmallText::new(s)
    }
}

impl PartialEq for SmallText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SmallText {}

impl std::hash::Hash for SmallText {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl fmt::Debug for SmallText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SmallText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_text_read_back_as_written() {
        for s in [
            "",
            "a",
            "é",
            "😀",
            &"x".repeat(INLINE),
            &"y".repeat(INLINE + 1),
            &"é".repeat(127),
        ] {
            let t = SmallText::new(s);
            assert_eq!(&*t, s);
            assert_eq!(t.clone(), t);
        }
        for ch in ['a', 'é', '€', '😀'] {
            assert_eq!(&*SmallText::from_char(ch), ch.to_string());
        }
        assert_eq!(
            std::mem::size_of::<SmallText>(),
            std::mem::size_of::<String>()
        );
    }
}
