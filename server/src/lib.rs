//! notesync-server: see issue 3 (not yet built).
