//! When `notesync watch` opens and closes live sessions for notes that
//! keep changing: pure bookkeeping of when each note last changed.
//!
//! May touch: nothing but its own maps (the caller opens and closes).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use notesync_protocol::DocId;

/// When to open and close live sessions in `notesync watch`: a note whose
/// file changes twice within `window` gets a session (its edits then go
/// out as they are picked up); a session with no change either way for
/// `quiet` is closed.
#[derive(Debug)]
pub struct Liveness {
    pub window: Duration,
    pub quiet: Duration,
    last_change: HashMap<DocId, Instant>,
    last_activity: HashMap<DocId, Instant>,
}

impl Liveness {
    pub fn new(window: Duration, quiet: Duration) -> Self {
        Liveness {
            window,
            quiet,
            last_change: HashMap::new(),
            last_activity: HashMap::new(),
        }
    }

    /// A note's file changed at `now`; true when a session should open
    /// (it changed before, within the window).
    pub fn file_changed(&mut self, id: DocId, now: Instant) -> bool {
        self.last_activity.insert(id, now);
        let prev = self.last_change.insert(id, now);
        prev.is_some_and(|p| now.saturating_duration_since(p) <= self.window)
    }

    /// Something happened on a note's session (a remote edit).
    pub fn touched(&mut self, id: DocId, now: Instant) {
        self.last_activity.insert(id, now);
    }

    /// Of `open`, the notes quiet for `quiet` at `now`.
    pub fn quiet_ones(&self, open: impl IntoIterator<Item = DocId>, now: Instant) -> Vec<DocId> {
        open.into_iter()
            .filter(|id| {
                self.last_activity
                    .get(id)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= self.quiet)
            })
            .collect()
    }

    /// Forgets a closed session's note.
    pub fn closed(&mut self, id: DocId) {
        self.last_activity.remove(&id);
        self.last_change.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_opens_on_the_second_change_and_closes_when_quiet() {
        let mut l = Liveness::new(Duration::from_secs(10), Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(!l.file_changed(1, t0));
        assert!(!l.file_changed(2, t0));
        assert!(l.file_changed(1, t0 + Duration::from_secs(3)));
        assert!(!l.file_changed(2, t0 + Duration::from_secs(20)));
        l.touched(1, t0 + Duration::from_secs(25));
        assert_eq!(
            l.quiet_ones([1], t0 + Duration::from_secs(50)),
            Vec::<u128>::new()
        );
        assert_eq!(l.quiet_ones([1], t0 + Duration::from_secs(56)), vec![1]);
    }
}
