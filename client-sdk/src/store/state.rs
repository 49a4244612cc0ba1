//! `.notesync/state.json`: the store's own state (format in the docs of
//! [`crate::store`]), read and checked on open, written atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use notesync_protocol::{DocId, DocName, Time};
use serde::{Deserialize, Serialize};

use super::names::check_stem;
use super::slots::Slot;
use super::{Store, StoreError, io_err, random_u128};
use crate::fsutil::write_atomic;

pub(super) const STATE_DIR: &str = ".notesync";
const STATE_FILE: &str = "state.json";
const STATE_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NoteState {
    file: String,
    name: String,
    /// 0: none yet.
    site: u8,
    provisional: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    replica_id: String,
    last_sync_time: Time,
    notes: BTreeMap<String, NoteState>,
    /// Notes deleted here; the server is told at the next sync.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pending_deletes: BTreeSet<String>,
    /// Notes known to be deleted on the server: never adopted again.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    deleted: BTreeSet<String>,
}

/// A note state.json lists, checked.
pub(super) struct KnownNote {
    pub id: DocId,
    pub name: DocName,
    /// File name without the `.md` (a safe one).
    pub stem: String,
    pub site: u8,
    pub provisional: bool,
}

/// What state.json holds, checked (a fresh state when there is none yet).
pub(super) struct State {
    pub replica_id: u128,
    pub last_sync_time: Time,
    pub notes: Vec<KnownNote>,
    pub pending_deletes: BTreeSet<DocId>,
    pub deleted: BTreeSet<DocId>,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR).join(STATE_FILE)
}

/// Reads the state of the store in `dir`.
pub(super) fn read(dir: &Path) -> Result<State, StoreError> {
    let state_path = state_path(dir);
    let state: StateFile = match fs::read(&state_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::BadStateJson {
            path: state_path.clone(),
            source: e,
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => StateFile {
            format: STATE_FORMAT,
            replica_id: format!("{:032x}", random_u128()),
            last_sync_time: 0,
            notes: BTreeMap::new(),
            pending_deletes: BTreeSet::new(),
            deleted: BTreeSet::new(),
        },
        Err(e) => return Err(io_err(&state_path)(e)),
    };
    if state.format != STATE_FORMAT {
        return Err(StoreError::BadState {
            path: state_path,
            why: format!(
                "state format {} is not the supported {}",
                state.format, STATE_FORMAT
            ),
        });
    }
    let replica_id =
        u128::from_str_radix(&state.replica_id, 16).map_err(|_| StoreError::BadState {
            path: state_path.clone(),
            why: "replica_id is not 32 hex digits".into(),
        })?;
    let ids = |set: &BTreeSet<String>| -> Result<BTreeSet<DocId>, StoreError> {
        set.iter()
            .map(|h| {
                u128::from_str_radix(h, 16).map_err(|_| StoreError::BadState {
                    path: state_path.clone(),
                    why: format!("deleted note id {h:?} is not hex"),
                })
            })
            .collect()
    };
    let pending_deletes = ids(&state.pending_deletes)?;
    let deleted = ids(&state.deleted)?;
    let mut notes = Vec::with_capacity(state.notes.len());
    for (id_hex, ns) in state.notes {
        let id = u128::from_str_radix(&id_hex, 16).map_err(|_| StoreError::BadState {
            path: state_path.clone(),
            why: format!("note id {id_hex:?} is not hex"),
        })?;
        let stem = ns.file.strip_suffix(".md").unwrap_or(&ns.file).to_owned();
        check_stem(&stem).map_err(|why| StoreError::BadState {
            path: state_path.clone(),
            why: format!("note file {:?}: {why}", ns.file),
        })?;
        notes.push(KnownNote {
            id,
            name: DocName::new(ns.name)?,
            stem,
            site: ns.site,
            provisional: ns.provisional,
        });
    }
    Ok(State {
        replica_id,
        last_sync_time: state.last_sync_time,
        notes,
        pending_deletes,
        deleted,
    })
}

impl Store {
    /// Writes state.json (atomically) from the store as it is.
    pub(super) fn save_state(&self) -> Result<(), StoreError> {
        if self.dir_unsynced.get() {
            self.sync_dir()?;
        }
        // A site's swap is logged unsynced; state.json must not call a note
        // sited while its log may still hold the provisional ids.
        if self.logs_unsynced.get() {
            for n in self.notes.values().filter_map(Slot::loaded) {
                n.sync_log()?;
            }
            self.logs_unsynced.set(false);
        }
        let hex = |id: &DocId| format!("{id:032x}");
        let state = StateFile {
            format: STATE_FORMAT,
            replica_id: format!("{:032x}", self.replica_id),
            last_sync_time: self.last_sync_time,
            notes: self
                .notes
                .iter()
                .map(|(id, n)| {
                    (
                        hex(id),
                        NoteState {
                            file: format!("{}.md", n.stem()),
                            name: n.name().as_str().to_owned(),
                            site: n.site(),
                            provisional: n.provisional(),
                        },
                    )
                })
                .collect(),
            pending_deletes: self.pending_deletes.iter().map(hex).collect(),
            deleted: self.deleted.iter().map(hex).collect(),
        };
        let path = state_path(&self.dir);
        let json = serde_json::to_vec_pretty(&state).expect("state serializes");
        write_atomic(&path, &json).map_err(io_err(&path))?;
        self.state_dirty.set(false);
        Ok(())
    }
}
