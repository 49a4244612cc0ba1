//! The `<file>.md.structure` format (layout in the docs of
//! [`crate::store`]): a note's document, its sync time and the ids to
//! reconcile, written and parsed. Pure: the caller does the file I/O.

use std::collections::BTreeSet;
use std::path::Path;

use bytes::{Buf, BufMut, BytesMut};
use notesync_protocol::{DocName, FrameDecoder, Pid, ServerFrame, Time};

use super::StoreError;
use crate::doc::Doc;

/// Serializes a note's structure file.
pub fn write_structure(doc: &Doc, last_sync: Time, live_since: &BTreeSet<Pid>) -> BytesMut {
    let (atoms, deleted) = doc.to_parts();
    let mut out =
        BytesMut::with_capacity(40 + doc.len_chars() + 8 * atoms.len() + 8 * deleted.len());
    out.put_u128(doc.id);
    out.put_u64(last_sync);
    out.put_u64(atoms.len() as u64);
    for (pid, data) in &atoms {
        out.put_u8(data.len() as u8);
        out.put_slice(data.as_bytes());
        pid.write_wire(&mut out);
    }
    out.put_u64(deleted.len() as u64);
    for pid in &deleted {
        pid.write_wire(&mut out);
    }
    out.put_u64(live_since.len() as u64);
    for pid in live_since {
        pid.write_wire(&mut out);
    }
    out
}

/// Parses a structure file: (document, last sync time, ids to reconcile).
/// Its body has the layout of a 33's lists, so the protocol's decoder
/// validates it (counts are checked against the file's size before use, as
/// on the wire).
pub fn read_structure(
    path: &Path,
    b: &[u8],
    name: DocName,
) -> Result<(Doc, Time, Vec<Pid>), StoreError> {
    let bad = |why| StoreError::BadStructure {
        path: path.to_owned(),
        why,
    };
    if b.len() < 24 {
        return Err(bad("shorter than its 24-byte header"));
    }
    let mut head = &b[..24];
    let id = head.get_u128();
    let last_sync = head.get_u64();
    // Rebuild the lists as a 33 frame: header, id, empty name, lists.
    let as_33 = |lists: &[u8]| -> Result<(notesync_protocol::DocResponse, BytesMut), StoreError> {
        let mut frame = BytesMut::with_capacity(lists.len() + 18);
        frame.put_u8(33);
        frame.put_u128(id);
        frame.put_u8(b'\n');
        frame.put_slice(lists);
        let limits = notesync_protocol::Limits {
            max_frame_bytes: frame.len().max(1024),
            max_items_per_frame: u64::MAX,
            max_pid_depth: 255,
        };
        match FrameDecoder::<ServerFrame>::new(limits).decode(&mut frame) {
            Ok(Some(ServerFrame::DocResponse(r))) => Ok((r, frame)),
            Ok(Some(_)) => Err(bad("it is not a structure file")),
            Ok(None) => Err(bad("it is cut short")),
            Err(_) => Err(bad("an atom or id in it is malformed")),
        }
    };
    let (r, rest) = as_33(&b[24..])?;
    // The third list (ids to reconcile) is absent in files written before
    // it existed.
    let live_since = if rest.is_empty() {
        Vec::new()
    } else {
        let mut lists = BytesMut::with_capacity(rest.len() + 8);
        lists.put_u64(0);
        lists.put_slice(&rest);
        let (r2, rest2) = as_33(&lists)?;
        if !rest2.is_empty() {
            return Err(bad("it has bytes after its lists"));
        }
        r2.deletes.iter().map(|p| p.to_pid()).collect()
    };
    let atoms = r
        .inserts
        .iter()
        .map(|a| (a.pid.to_pid(), a.data.to_owned()))
        .collect();
    let deleted = r.deletes.iter().map(|p| p.to_pid()).collect();
    Ok((
        Doc::from_parts(id, name, atoms, deleted),
        last_sync,
        live_since,
    ))
}
