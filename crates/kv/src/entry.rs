//! One key's replicated state and the merge rule that makes replicas converge.
//!
//! An [`Entry`] is a last-writer-wins **register** (a value or a tombstone, with the [`Stamp`] of
//! the `set`/`delete` that wrote it) plus a **counter**: per-site contributions (`up`, `down`) made by
//! `increment` on top of that register. The rules:
//!
//! - `set`/`delete` write the register with a new stamp and start the counter afresh: a `set` or
//!   `delete` wins over every increment made before it was seen (last writer wins, by stamp).
//! - `increment` at site S adds to S's own contribution on top of the current register; a register
//!   holding a value must hold a decimal integer (the counter's base), else the increment fails.
//! - Merge: the greater register stamp wins (stamps order by HLC, then site id; never by value,
//!   never by wall clock alone). For equal stamps the contributions merge per site by maximum, so
//!   concurrent increments at different sites are all kept. `changed` is the greatest stamp of any
//!   change either side saw. Merge is commutative, associative and idempotent.
//! - A read of a key with contributions returns base + Σup − Σdown as decimal ASCII; without, the
//!   register's bytes (or nothing, for a tombstone).
//!
//! Why merge converges: the register part is a max over a total order (stamps), the counter part
//! for the winning stamp is a per-site max of monotonic (`up`, `down`) pairs, and `changed` is a
//! max; each is a join of a semilattice, and contributions to a losing register are dropped by
//! every merge that sees the winner, so any order and any duplication of the same entries gives
//! the same result (checked by `tests/all/merge_properties.rs`).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::hlc::Hlc;

/// The identity of a site, as it appears in stamps and counter contributions.
pub type SiteId = String;

/// When and where a change was made. Ordered by HLC, then by site id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp {
    /// The hybrid logical clock reading of the change.
    pub hlc: Hlc,
    /// The site that made it.
    pub site: SiteId,
}

impl Stamp {
    /// The stamp before every real one (a key never `set`).
    pub fn zero() -> Stamp {
        Stamp::default()
    }
}

/// The last-writer-wins part of an entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Register {
    /// Deleted, or never set.
    Tombstone,
    /// A value.
    Value(Vec<u8>),
}

/// One site's increments on top of a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Contribution {
    /// Sum of this site's positive increments.
    pub up: u64,
    /// Sum of this site's negative increments (as a positive number).
    pub down: u64,
}

/// A key's replicated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stamp of the `set`/`delete` that wrote the register.
    pub stamp: Stamp,
    /// The register.
    pub register: Register,
    /// Increments made on top of this register, by site.
    pub counter: BTreeMap<SiteId, Contribution>,
    /// The greatest stamp of any change merged into this entry (register or increment).
    pub changed: Stamp,
}

/// Why an operation on an entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// `increment` on a key whose value is not a decimal integer.
    #[error("the key holds a value that is not a decimal integer, so it cannot be incremented")]
    NotANumber,
    /// The counter would leave the i64 range.
    #[error("the counter would overflow")]
    Overflow,
}

/// What a read of an entry sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<'a> {
    /// No value (deleted or never set).
    Absent,
    /// A plain value.
    Bytes(&'a [u8]),
    /// A counter's current total.
    Number(i64),
}

impl Read<'_> {
    /// The bytes a `get` returns: the value, or the counter as decimal ASCII.
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        match self {
            Read::Absent => None,
            Read::Bytes(b) => Some(b.to_vec()),
            Read::Number(n) => Some(n.to_string().into_bytes()),
        }
    }
}

impl Entry {
    /// The state written by `set(value)` at `stamp`.
    pub fn set(value: Vec<u8>, stamp: Stamp) -> Entry {
        Entry { register: Register::Value(value), counter: BTreeMap::new(), changed: stamp.clone(), stamp }
    }

    /// The state written by `delete` at `stamp`: a tombstone.
    pub fn delete(stamp: Stamp) -> Entry {
        Entry { register: Register::Tombstone, counter: BTreeMap::new(), changed: stamp.clone(), stamp }
    }

    /// The state of a key never written.
    pub fn absent() -> Entry {
        Entry::delete(Stamp::zero())
    }

    /// Whether this entry is a tombstone without increments (what collection may remove).
    pub fn is_tombstone(&self) -> bool {
        self.register == Register::Tombstone && self.counter.is_empty()
    }

    /// What a read sees.
    pub fn read(&self) -> Read<'_> {
        if self.counter.is_empty() {
            return match &self.register {
                Register::Tombstone => Read::Absent,
                Register::Value(v) => Read::Bytes(v),
            };
        }
        // A total outside i64 (possible only by merging many sites' increments) is clamped.
        Read::Number(self.total().clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }

    /// base + Σup − Σdown, exactly. Contributions exist only on a numeric base (`increment`
    /// checks it), so a non-numeric base cannot occur with contributions.
    fn total(&self) -> i128 {
        let base = self.base().unwrap_or(0) as i128;
        let up: i128 = self.counter.values().map(|c| c.up as i128).sum();
        let down: i128 = self.counter.values().map(|c| c.down as i128).sum();
        base + up - down
    }

    /// The counter's base: 0 for a tombstone, the register parsed as a decimal integer.
    fn base(&self) -> Result<i64, EntryError> {
        match &self.register {
            Register::Tombstone => Ok(0),
            Register::Value(v) => {
                std::str::from_utf8(v).ok().and_then(|s| s.trim().parse().ok()).ok_or(EntryError::NotANumber)
            }
        }
    }

    /// This entry after `increment(delta)` by `stamp.site`; returns the new total.
    pub fn increment(&self, delta: i64, stamp: Stamp) -> Result<(Entry, i64), EntryError> {
        self.base()?;
        let mut next = self.clone();
        let mine = next.counter.entry(stamp.site.clone()).or_default();
        if delta >= 0 {
            mine.up = mine.up.checked_add(delta as u64).ok_or(EntryError::Overflow)?;
        } else {
            mine.down = mine.down.checked_add(delta.unsigned_abs()).ok_or(EntryError::Overflow)?;
        }
        next.changed = next.changed.max(stamp);
        let total = i64::try_from(next.total()).map_err(|_| EntryError::Overflow)?;
        Ok((next, total))
    }

    /// The merge of two replicas of the same key: commutative, associative, idempotent.
    pub fn merge(&self, other: &Entry) -> Entry {
        let changed = self.changed.clone().max(other.changed.clone());
        let mut merged = match self.stamp.cmp(&other.stamp) {
            Ordering::Greater => self.clone(),
            Ordering::Less => other.clone(),
            Ordering::Equal => {
                // One stamp is one write, so the registers are equal; should they ever differ,
                // the choice must still be deterministic.
                let mut merged = if self.register >= other.register { self.clone() } else { other.clone() };
                for (site, c) in &other.counter {
                    let mine = merged.counter.entry(site.clone()).or_default();
                    mine.up = mine.up.max(c.up);
                    mine.down = mine.down.max(c.down);
                }
                for (site, c) in &self.counter {
                    let mine = merged.counter.entry(site.clone()).or_default();
                    mine.up = mine.up.max(c.up);
                    mine.down = mine.down.max(c.down);
                }
                merged
            }
        };
        merged.changed = changed;
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, site: &str) -> Stamp {
        Stamp { hlc: Hlc { physical_ms: ms, logical: 0 }, site: site.into() }
    }

    #[test]
    fn later_set_wins_and_ties_break_by_site() {
        let a = Entry::set(b"a".to_vec(), at(1, "x"));
        let b = Entry::set(b"b".to_vec(), at(2, "a"));
        assert_eq!(a.merge(&b).read(), Read::Bytes(b"b"));
        let c = Entry::set(b"c".to_vec(), at(2, "z"));
        assert_eq!(b.merge(&c).read(), Read::Bytes(b"c"), "same HLC: greater site id wins");
        assert_eq!(c.merge(&b), b.merge(&c));
    }

    #[test]
    fn delete_is_a_tombstone_that_wins_over_older_sets() {
        let set = Entry::set(b"v".to_vec(), at(1, "a"));
        let del = Entry::delete(at(2, "b"));
        assert_eq!(set.merge(&del).read(), Read::Absent);
        assert!(set.merge(&del).is_tombstone());
        let newer = Entry::set(b"w".to_vec(), at(3, "a"));
        assert_eq!(del.merge(&newer).read(), Read::Bytes(b"w"));
    }

    #[test]
    fn concurrent_increments_at_different_sites_add_up() -> Result<(), EntryError> {
        let base = Entry::absent();
        let (a, _) = base.increment(5, at(1, "a"))?;
        let (b, _) = base.increment(7, at(1, "b"))?;
        let (b, _) = b.increment(-2, at(2, "b"))?;
        let merged = a.merge(&b);
        assert_eq!(merged.read(), Read::Number(10));
        assert_eq!(merged.read().into_bytes(), Some(b"10".to_vec()));
        Ok(())
    }

    #[test]
    fn increment_builds_on_a_numeric_value_and_refuses_others() -> Result<(), EntryError> {
        let (e, total) = Entry::set(b"40".to_vec(), at(1, "a")).increment(2, at(2, "a"))?;
        assert_eq!(total, 42);
        assert_eq!(e.read(), Read::Number(42));
        let err =
            Entry::set(b"hello".to_vec(), at(1, "a")).increment(1, at(2, "a")).expect_err("not a number");
        assert_eq!(err, EntryError::NotANumber);
        Ok(())
    }

    #[test]
    fn set_after_increments_restarts_the_counter() -> Result<(), EntryError> {
        let (counted, _) = Entry::absent().increment(3, at(1, "a"))?;
        let reset = Entry::set(b"0".to_vec(), at(2, "b"));
        assert_eq!(counted.merge(&reset).read(), Read::Bytes(b"0"));
        let (again, total) = counted.merge(&reset).increment(1, at(3, "a"))?;
        assert_eq!((total, again.read()), (1, Read::Number(1)));
        Ok(())
    }

    #[test]
    fn counter_overflow_is_an_error_not_a_wrap() {
        let e = Entry::set(i64::MAX.to_string().into_bytes(), at(1, "a"));
        assert_eq!(e.increment(1, at(2, "a")).expect_err("overflow"), EntryError::Overflow);
    }
}
