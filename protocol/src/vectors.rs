//! The golden vectors of PROTOCOL.md section 7 (`tests/vectors/frames.txt`)
//! and the one parser of their file format (described at the file's top).
//!
//! Shared by this crate's `tests/vectors.rs`, which checks the codec
//! against them, and the conformance kit (`notesync-tests`), which sends
//! them to a server. Only built with the non-default `vectors` feature.
//! Reads text only: nothing here decodes a frame.

use std::collections::HashSet;
use std::num::ParseIntError;

/// The vectors file, as built into this crate.
pub const FRAMES: &str = include_str!("../tests/vectors/frames.txt");

/// Which decoder a vector is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dir {
    /// Client to server: decoded as a client frame.
    C2s,
    /// Server to client: decoded as a server frame.
    S2c,
}

/// What decoding a vector's bytes gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Exactly one valid frame.
    Ok,
    /// An error: `kind` is `DecodeError::kind()`, `code` the name of the
    /// error code a server sends for it.
    Err { kind: String, code: String },
}

/// One record of the file.
#[derive(Debug, Clone)]
pub struct Vector {
    pub name: String,
    /// Line of the `@` record line, for messages.
    pub line: usize,
    pub dir: Dir,
    pub expect: Expect,
    pub bytes: Vec<u8>,
}

impl Vector {
    /// Names the vector and its line, for failure messages.
    pub fn at(&self) -> String {
        format!("vector {} (frames.txt line {})", self.name, self.line)
    }
}

/// Why the vectors file does not parse; each names the line at fault.
#[derive(Debug, thiserror::Error)]
pub enum VectorsError {
    #[error("frames.txt line {line}: missing {what}")]
    Missing { line: usize, what: &'static str },
    #[error("frames.txt line {line}: direction `{dir}` is not c2s or s2c")]
    Direction { line: usize, dir: String },
    #[error("frames.txt line {line}: `{word}` is not ok or err")]
    Outcome { line: usize, word: String },
    #[error("frames.txt line {line}: an ok vector needs a description")]
    NoDescription { line: usize },
    #[error("frames.txt line {line}: bytes before the first record")]
    BytesBeforeRecord { line: usize },
    #[error("frames.txt line {line}: `{token}` is not an even number of hex digits")]
    OddHex { line: usize, token: String },
    #[error("frames.txt line {line}: `{token}` is not hex")]
    NotHex { line: usize, token: String },
    #[error("frames.txt line {line}: bad repeat count in `{token}`")]
    RepeatCount {
        line: usize,
        token: String,
        #[source]
        source: ParseIntError,
    },
    #[error("frames.txt line {line}: repeat count 0")]
    RepeatZero { line: usize },
    #[error("vector {name} (frames.txt line {line}) has no bytes")]
    NoBytes { name: String, line: usize },
    #[error("vector {name} (frames.txt line {line}): name used twice")]
    NameTwice { name: String, line: usize },
}

fn parse_hex(token: &str, line: usize) -> Result<Vec<u8>, VectorsError> {
    if token.is_empty() || token.len() % 2 != 0 {
        return Err(VectorsError::OddHex {
            line,
            token: token.to_owned(),
        });
    }
    let not_hex = || VectorsError::NotHex {
        line,
        token: token.to_owned(),
    };
    token
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |b: u8| (b as char).to_digit(16).ok_or_else(not_hex);
            Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// Parses one `@` record line (without the `@`).
fn parse_record(record: &str, line: usize) -> Result<Vector, VectorsError> {
    let mut words = record.split_whitespace();
    let mut word = |what: &'static str| {
        words
            .next()
            .map(str::to_owned)
            .ok_or(VectorsError::Missing { line, what })
    };
    let name = word("name")?;
    let dir = match word("direction")?.as_str() {
        "c2s" => Dir::C2s,
        "s2c" => Dir::S2c,
        d => {
            return Err(VectorsError::Direction {
                line,
                dir: d.to_owned(),
            });
        }
    };
    let expect = match word("ok or err")?.as_str() {
        "ok" => Expect::Ok,
        "err" => Expect::Err {
            kind: word("error kind")?,
            code: word("error code")?,
        },
        w => {
            return Err(VectorsError::Outcome {
                line,
                word: w.to_owned(),
            });
        }
    };
    if expect == Expect::Ok && words.next().is_none() {
        return Err(VectorsError::NoDescription { line });
    }
    Ok(Vector {
        name,
        line,
        dir,
        expect,
        bytes: Vec::new(),
    })
}

/// Parses a vectors file: every record with its bytes, in file order.
/// Every record has bytes and a name of its own.
pub fn parse_vectors(text: &str) -> Result<Vec<Vector>, VectorsError> {
    let mut out: Vec<Vector> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(record) = content.strip_prefix('@') {
            out.push(parse_record(record, line)?);
            continue;
        }
        let v = out
            .last_mut()
            .ok_or(VectorsError::BytesBeforeRecord { line })?;
        for token in content.split_whitespace() {
            match token.split_once('*') {
                Some((hex, n)) => {
                    let n: usize = n.parse().map_err(|source| VectorsError::RepeatCount {
                        line,
                        token: token.to_owned(),
                        source,
                    })?;
                    if n == 0 {
                        return Err(VectorsError::RepeatZero { line });
                    }
                    v.bytes.extend(parse_hex(hex, line)?.repeat(n));
                }
                None => v.bytes.extend(parse_hex(token, line)?),
            }
        }
    }
    let mut names = HashSet::new();
    for v in &out {
        if v.bytes.is_empty() {
            return Err(VectorsError::NoBytes {
                name: v.name.clone(),
                line: v.line,
            });
        }
        if !names.insert(v.name.as_str()) {
            return Err(VectorsError::NameTwice {
                name: v.name.clone(),
                line: v.line,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_with_its_bytes_parses() {
        let v = parse_vectors("# c\n@ a c2s ok one frame\n 00 ff*2 # tail\n@ b s2c err k c\nAB\n")
            .expect("valid");
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].line, v[0].dir, &v[0].bytes),
            (2, Dir::C2s, &vec![0, 0xff, 0xff])
        );
        assert_eq!(
            v[1].expect,
            Expect::Err {
                kind: "k".into(),
                code: "c".into()
            }
        );
    }

    #[test]
    fn each_fault_is_named_with_its_line() {
        let cases = [
            ("@ a", "line 1: missing direction"),
            (
                "@ a up ok x\n00",
                "line 1: direction `up` is not c2s or s2c",
            ),
            ("@ a c2s maybe\n00", "line 1: `maybe` is not ok or err"),
            ("@ a c2s ok\n00", "line 1: an ok vector needs a description"),
            ("00", "line 1: bytes before the first record"),
            (
                "@ a c2s ok x\n0",
                "line 2: `0` is not an even number of hex digits",
            ),
            ("@ a c2s ok x\nzz", "line 2: `zz` is not hex"),
            ("@ a c2s ok x\n00*y", "line 2: bad repeat count in `00*y`"),
            ("@ a c2s ok x\n00*0", "line 2: repeat count 0"),
            (
                "@ a c2s ok x\n",
                "vector a (frames.txt line 1) has no bytes",
            ),
            (
                "@ a c2s ok x\n00\n@ a c2s ok y\n01",
                "line 3): name used twice",
            ),
        ];
        for (text, says) in cases {
            match parse_vectors(text) {
                Err(e) => assert!(e.to_string().ends_with(says), "{text:?}: got {e}"),
                Ok(v) => panic!("{text:?}: expected an error, got {v:?}"),
            }
        }
    }
}
