//! Editing traces in the automerge-paper JSON format (gzipped):
//! `{startContent, endContent, txns: [{patches: [[pos, del, text], ...]}]}`,
//! positions in chars.

use std::io::Read;
use std::path::Path;

use super::Result;
use crate::bail;

/// One patch: delete `del` chars at `pos`, then insert `text` there.
#[derive(Debug, Clone)]
pub struct Edit {
    pub pos: usize,
    pub del: usize,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub start: String,
    /// The trace's endContent (meaningful only when `complete`).
    pub end: String,
    pub edits: Vec<Edit>,
    /// Whether every edit of the file is here (not cut by `limit`).
    pub complete: bool,
}

impl Trace {
    /// Loads the trace; `limit` keeps only its first edits.
    pub fn load(path: &Path, limit: Option<usize>) -> Result<Trace> {
        let file = std::fs::File::open(path).map_err(|e| {
            format!(
                "cannot open the trace {}: {e} (traces live in ../shared/traces; pass --trace)",
                path.display()
            )
        })?;
        let mut json = String::new();
        flate2::read::GzDecoder::new(file).read_to_string(&mut json)?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let start = v["startContent"].as_str().unwrap_or("").to_owned();
        let end = v["endContent"].as_str().unwrap_or("").to_owned();
        let Some(txns) = v["txns"].as_array() else {
            bail!("{}: no txns", path.display());
        };
        let mut edits = Vec::new();
        for txn in txns {
            for p in txn["patches"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let (Some(pos), Some(del), Some(text)) =
                    (p[0].as_u64(), p[1].as_u64(), p[2].as_str())
                else {
                    bail!("{}: malformed patch {p}", path.display());
                };
                edits.push(Edit {
                    pos: pos as usize,
                    del: del as usize,
                    text: text.to_owned(),
                });
            }
        }
        let total = edits.len();
        if let Some(n) = limit {
            edits.truncate(n);
        }
        Ok(Trace {
            start,
            end,
            complete: edits.len() == total,
            edits,
        })
    }
}
