//! notesync-client: see issue 4 (not yet built).
