//! Hybrid logical clocks: physical milliseconds plus a logical counter.
//!
//! A stamp from [`Clock::now`] is greater than every stamp this clock issued or observed before,
//! whatever the wall clock does (including stepping backwards), so a site's own writes are
//! ordered, and a write that saw another is ordered after it. Restarts keep this property when the
//! store hands the clock its persisted high-water mark ([`Clock::observe`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

/// An offset added to the system clock ([`wall_ms`]); see [`set_dev_skew_ms`].
static DEV_SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Milliseconds since the Unix epoch from the system clock, moved by the injected skew (zero
/// unless `atoll dev skew` set one). Every clock of a site reads this.
pub fn wall_ms() -> u64 {
    let system = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    system.saturating_add_signed(DEV_SKEW_MS.load(Ordering::Relaxed))
}

/// Moves this process's clock ([`wall_ms`], so [`Clock::system`]) by `ms`: a clock fault that
/// `atoll dev skew` injects into a development site. Nothing else calls it.
pub fn set_dev_skew_ms(ms: i64) {
    DEV_SKEW_MS.store(ms, Ordering::Relaxed);
}

/// A hybrid logical clock reading. Ordered by physical time, then logical counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (at least; it may run ahead of the wall clock).
    pub physical_ms: u64,
    /// Orders readings within one millisecond.
    pub logical: u32,
}

impl Hlc {
    /// The zero reading, before every real one.
    pub const ZERO: Hlc = Hlc { physical_ms: 0, logical: 0 };

    /// The next reading after `self` at wall time `wall_ms`.
    fn tick(self, wall_ms: u64) -> Hlc {
        if wall_ms > self.physical_ms {
            Hlc { physical_ms: wall_ms, logical: 0 }
        } else if self.logical < u32::MAX {
            Hlc { physical_ms: self.physical_ms, logical: self.logical + 1 }
        } else {
            // Saturates: a reading at the very end of time stays there (it cannot wrap or panic,
            // and writes stamped with it still go through).
            Hlc {
                physical_ms: self.physical_ms.saturating_add(1),
                logical: if self.physical_ms == u64::MAX { u32::MAX } else { 0 },
            }
        }
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms, self.logical)
    }
}

/// Where physical time comes from; injected so tests and simulations control it.
pub type TimeSource = Box<dyn Fn() -> u64 + Send + Sync>;

/// A hybrid logical clock.
pub struct Clock {
    last: Mutex<Hlc>,
    wall_ms: TimeSource,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("last", &self.last()).finish_non_exhaustive()
    }
}

impl Clock {
    /// A clock reading the system wall clock ([`wall_ms`]).
    pub fn system() -> Clock {
        Clock::with_source(Box::new(wall_ms))
    }

    /// A clock reading `wall_ms` for physical time.
    pub fn with_source(wall_ms: TimeSource) -> Clock {
        Clock { last: Mutex::new(Hlc::ZERO), wall_ms }
    }

    /// A new reading, greater than every reading issued or observed so far.
    pub fn now(&self) -> Hlc {
        let wall = (self.wall_ms)();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = last.tick(wall);
        *last
    }

    /// Takes note of a reading made elsewhere (or persisted before a restart): later readings of
    /// this clock are greater than it.
    pub fn observe(&self, seen: Hlc) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(seen);
    }

    /// The wall clock this clock reads (unix ms).
    pub fn wall(&self) -> u64 {
        (self.wall_ms)()
    }

    /// The greatest reading issued or observed so far.
    pub fn last(&self) -> Hlc {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn manual(start: u64) -> (Clock, Arc<AtomicU64>) {
        let wall = Arc::new(AtomicU64::new(start));
        let source = wall.clone();
        (Clock::with_source(Box::new(move || source.load(Ordering::SeqCst))), wall)
    }

    #[test]
    fn readings_increase_even_when_the_wall_clock_steps_back() {
        let (clock, wall) = manual(1_000);
        let a = clock.now();
        assert_eq!(a, Hlc { physical_ms: 1_000, logical: 0 });
        let b = clock.now();
        assert_eq!(b, Hlc { physical_ms: 1_000, logical: 1 });
        wall.store(500, Ordering::SeqCst);
        let c = clock.now();
        assert!(c > b, "{c} > {b}");
        wall.store(2_000, Ordering::SeqCst);
        assert_eq!(clock.now(), Hlc { physical_ms: 2_000, logical: 0 });
    }

    #[test]
    fn observed_readings_order_later_ones() {
        let (clock, _) = manual(1_000);
        let remote = Hlc { physical_ms: 9_000, logical: 7 };
        clock.observe(remote);
        assert!(clock.now() > remote);
        // Observing an older reading changes nothing.
        clock.observe(Hlc::ZERO);
        assert!(clock.last() > remote);
    }

    #[test]
    fn a_reading_at_the_end_of_time_saturates_instead_of_wrapping() {
        let (clock, _) = manual(10);
        let end = Hlc { physical_ms: u64::MAX, logical: u32::MAX };
        clock.observe(end);
        assert_eq!(clock.now(), end);
        assert_eq!(clock.now(), end);
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let (clock, _) = manual(10);
        clock.observe(Hlc { physical_ms: 10, logical: u32::MAX });
        assert_eq!(clock.now(), Hlc { physical_ms: 11, logical: 0 });
    }
}
