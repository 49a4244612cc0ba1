//! Time: the wall clock the server reads ([`WallClock`], [`SystemClock`])
//! and the server clock the writer stamps changes with ([`ServerClock`]).
//! Touches no storage: the writer persists [`ServerClock::last`] with each
//! commit and resumes from it at start.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use notesync_protocol::Time;

/// A source of wall-clock time in microseconds since the Unix epoch.
pub trait WallClock: Send + Sync + 'static {
    fn now_micros(&self) -> Time;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_micros(&self) -> Time {
        // A clock before 1970 reads as 0; the server clock still advances.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as Time)
            .unwrap_or(0)
    }
}

/// The server clock: every time it hands out is `max(wall, last + 1)`, so
/// times are unique and never go back, whatever the wall clock does. Only
/// the writer owns one; `last` is persisted with every commit. Within a
/// batch the wall clock is read once, at its start ([`begin_batch`]): the
/// batch's changes get consecutive times, so chars typed in one batch are
/// one segment in storage (`runs`), not one per microsecond of work.
///
/// [`begin_batch`]: ServerClock::begin_batch
pub struct ServerClock {
    wall: Arc<dyn WallClock>,
    last: Time,
    /// The wall clock at the start of the batch under way.
    batch_wall: Option<Time>,
}

impl ServerClock {
    pub fn new(wall: Arc<dyn WallClock>, last: Time) -> Self {
        ServerClock {
            wall,
            last,
            batch_wall: None,
        }
    }

    /// A new, unique time.
    pub fn next(&mut self) -> Time {
        let wall = match self.batch_wall {
            Some(w) => w,
            None => self.wall.now_micros(),
        };
        let t = wall.max(self.last.saturating_add(1));
        self.last = t;
        t
    }

    /// From now until [`end_batch`](Self::end_batch), `next` reads no wall
    /// clock: it goes on from this reading.
    pub fn begin_batch(&mut self) {
        self.batch_wall = Some(self.wall.now_micros());
    }

    pub fn end_batch(&mut self) {
        self.batch_wall = None;
    }

    /// The last time handed out.
    pub fn last(&self) -> Time {
        self.last
    }

    /// The wall clock now (for compaction's horizon; not a change time).
    pub fn wall_now(&self) -> Time {
        self.wall.now_micros()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::store::open;
    use crate::store::tests::{FakeClock, write};

    #[test]
    fn a_batch_takes_consecutive_times_from_one_wall_reading() {
        let wall = Arc::new(FakeClock(AtomicU64::new(1_000)));
        let mut c = ServerClock::new(wall.clone(), 0);
        c.begin_batch();
        wall.0.store(5_000, Ordering::SeqCst);
        assert_eq!((c.next(), c.next(), c.next()), (1_000, 1_001, 1_002));
        c.end_batch();
        assert_eq!(c.next(), 5_000);
        // A batch never goes back either.
        wall.0.store(10, Ordering::SeqCst);
        c.begin_batch();
        assert_eq!(c.next(), 5_001);
    }

    #[test]
    fn clock_is_monotonic_with_a_wall_clock_going_back_and_across_reopen() {
        let wall = Arc::new(FakeClock(AtomicU64::new(1_000_000)));
        let mut clock = ServerClock::new(wall.clone(), 0);
        let a = clock.next();
        assert_eq!(a, 1_000_000);
        // Same wall time: still unique.
        let b = clock.next();
        assert_eq!(b, 1_000_001);
        // Wall clock jumps back an hour: times keep increasing.
        wall.0.store(1, Ordering::SeqCst);
        let c = clock.next();
        assert_eq!(c, 1_000_002);
        // Wall clock ahead again: it is used.
        wall.0.store(5_000_000, Ordering::SeqCst);
        assert_eq!(clock.next(), 5_000_000);

        // Across a reopen: the persisted last value wins over a clock that
        // went back.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let o = open(dir.path()).expect("open");
            write(&o.db, |t| t.set_clock(clock.last()).expect("clock"));
        }
        wall.0.store(10, Ordering::SeqCst);
        let o = open(dir.path()).expect("reopen");
        assert_eq!(o.clock, 5_000_000);
        let mut clock = ServerClock::new(wall, o.clock);
        assert_eq!(clock.next(), 5_000_001);
    }
}
