//! Loads a real editing trace (the trace tests).

use std::io::Read;
use std::path::PathBuf;

/// The trace `name` from ../shared/traces (never copied into the repo), or
/// from the folder `NOTESYNC_TRACES` names (a checkout elsewhere, e.g. a
/// git worktree). Outside CI a missing trace skips with a message; under
/// CI=true it fails.
pub fn load_trace(name: &str) -> Option<serde_json::Value> {
    let dir = std::env::var_os("NOTESYNC_TRACES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"),
        PathBuf::from,
    );
    let path = dir.join(name);
    let Ok(file) = std::fs::File::open(&path) else {
        assert!(
            std::env::var("CI").is_err(),
            "trace {} missing in CI",
            path.display()
        );
        eprintln!("skipping: trace {} not found", path.display());
        return None;
    };
    let mut json = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut json)
        .expect("gunzip trace");
    Some(serde_json::from_str(&json).expect("trace json"))
}
