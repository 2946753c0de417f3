//! The writer thread: group commit. It takes every write waiting into one transaction, commits it
//! durably, and only then answers each writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableTable};

use super::derived::Derived;
use super::horizon::decode_aside;
use super::{Change, KvError, Origin, Write, Written, storage};
use crate::codec;
use crate::entry::{Entry, Stamp};
use crate::hlc::{Clock, Hlc};
use crate::identity::Identity;
use crate::tables::{META, SET_ASIDE, Tables, encode_hlc};

type Reply = tokio::sync::oneshot::Sender<Vec<Result<Written, KvError>>>;

/// What the writer applies to one composite key.
pub(super) enum Op {
    /// A write made here.
    Local(Write),
    /// An entry received from another site, merged in.
    Merge(Entry),
}

pub(super) struct Job {
    pub(super) writes: Vec<(Vec<u8>, Op)>,
    pub(super) reply: Reply,
    /// A guest's writes: refused if the gate is closed when they are committed.
    pub(super) guest: bool,
}

/// Each job's results, in order.
type BatchResults = Vec<Vec<Result<Written, KvError>>>;

/// What the writer thread shares with the store.
pub(super) struct Shared {
    /// The store's gate (see [`Store::set_gate`]).
    pub(super) gate: Arc<RwLock<Option<(String, bool)>>>,
    /// The writer id to stamp local writes with.
    pub(super) site: Arc<RwLock<String>>,
    /// The clock as of the last durable commit.
    pub(super) durable: Arc<Mutex<Hlc>>,
    /// See [`Store::set_tombstone_floor`].
    pub(super) floor: Arc<Mutex<Hlc>>,
    /// The set-aside table may hold rows (see [`Store::discard_before`]).
    pub(super) aside: Arc<AtomicBool>,
    /// The range digests and pending index changes (see `derived`).
    pub(super) derived: Arc<RwLock<Derived>>,
    /// What the store holds of each site's writes (see `seen`).
    pub(super) seen: Arc<RwLock<super::seen::SeenVector>>,
}

/// How long a batch may wait for more writes, at most, when the last one held several.
const LINGER: std::time::Duration = std::time::Duration::from_micros(300);
/// A batch stops waiting when no write came for this long.
const LINGER_GAP: std::time::Duration = std::time::Duration::from_micros(50);

pub(super) fn write_loop(
    db: &Database,
    clock: &Clock,
    shared: &Shared,
    max_batch: usize,
    queue: &std::sync::mpsc::Receiver<Job>,
    feed: &tokio::sync::broadcast::Sender<Arc<Vec<Change>>>,
) {
    // Jobs in the last batch: when several writers are waiting on each commit, the batch waits
    // a moment for those just answered to send their next write (see `LINGER`).
    let mut last = 1;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let mut pending: usize = batch[0].writes.len();
        let linger = (last > 1).then(|| std::time::Instant::now() + LINGER);
        while pending < max_batch {
            let job = match queue.try_recv() {
                Ok(job) => job,
                Err(_) => match linger {
                    Some(until) if std::time::Instant::now() < until => {
                        match queue.recv_timeout(LINGER_GAP) {
                            Ok(job) => job,
                            Err(_) => break,
                        }
                    }
                    _ => break,
                },
            };
            pending += job.writes.len();
            batch.push(job);
        }
        last = batch.len();
        match commit_batch(db, clock, shared, &batch) {
            Ok((results, changes, persisted)) => {
                *shared.durable.lock().unwrap_or_else(|e| e.into_inner()) = persisted;
                if !changes.is_empty() {
                    // No receiver is fine; a lagging one is told by the channel.
                    let _ = feed.send(Arc::new(changes));
                }
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!("kv commit failed: {e}");
                for job in batch {
                    let n = job.writes.len();
                    let _ = job.reply.send(vec![Err(e.clone()); n]);
                }
            }
        }
    }
}

fn commit_batch(
    db: &Database,
    clock: &Clock,
    shared: &Shared,
    batch: &[Job],
) -> Result<(BatchResults, Vec<Change>, Hlc), KvError> {
    let txn = db.begin_write().map_err(storage)?;
    // Read once this batch holds the write lock: a resync's discard committed just before
    // changed them.
    let site = shared.site.read().unwrap_or_else(|e| e.into_inner()).clone();
    let floor = *shared.floor.lock().unwrap_or_else(|e| e.into_inner());
    let aside = shared.aside.load(Ordering::Relaxed);
    let closed =
        shared.gate.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(reason, _)| reason.clone());
    // A barrier (an empty job) moves the clock, so the durable clock passes everything before it.
    if batch.iter().any(|job| job.writes.is_empty()) {
        clock.now();
    }
    let persisted;
    let derived;
    let mut results = Vec::with_capacity(batch.len());
    let mut changes = Vec::new();
    let mut seen = super::seen::Batch::default();
    let next_seen;
    {
        let mut tables = {
            let d = shared.derived.read().unwrap_or_else(|e| e.into_inner());
            Tables::open(&txn, &d, d.should_fold())?
        };
        let mut aside = if aside { Some(txn.open_table(SET_ASIDE).map_err(storage)?) } else { None };
        for job in batch {
            if job.guest
                && let Some(reason) = &closed
            {
                results.push(vec![Err(KvError::Unavailable(reason.clone())); job.writes.len()]);
                continue;
            }
            let mut job_results = Vec::with_capacity(job.writes.len());
            for (composite, write) in &job.writes {
                let old =
                    tables.entries.get(composite.as_slice()).map_err(storage)?.map(|v| v.value().to_vec());
                let current = match &old {
                    Some(bytes) => codec::decode(bytes).map_err(storage)?,
                    None => Entry::absent(),
                };
                // The incoming entry's greatest stamp, for a merge.
                let mut incoming = None;
                let mut origin = match write {
                    Op::Local(_) => Origin::Local,
                    Op::Merge(_) => Origin::Merged,
                };
                let change = match write {
                    Op::Local(write) => {
                        apply(&current, write, Stamp { hlc: clock.now(), site: site.clone() })
                    }
                    // A tombstone every site held, for a key collected here: nothing to store
                    // (unless this site set increments on that very register aside).
                    Op::Merge(remote)
                        if old.is_none()
                            && remote.is_tombstone()
                            && remote.changed.hlc < floor
                            && !aside_on(aside.as_ref(), composite, &remote.stamp)? =>
                    {
                        Ok(None)
                    }
                    Op::Merge(remote) => {
                        clock.observe(remote.changed.hlc);
                        incoming = Some(remote.changed.hlc);
                        let mut merged = current.merge(remote);
                        if let Some(aside) = aside.as_mut()
                            && let Some(rescued) = rescue(aside, composite, &merged, clock, &site)?
                        {
                            merged = rescued;
                            origin = Origin::Local;
                        }
                        Ok((merged != current).then_some((merged, Written::Done)))
                    }
                };
                let (next, written) = match change {
                    Ok(Some(change)) => change,
                    // Nothing to write: a compare-and-swap that did not match, or a merge that
                    // brought nothing new.
                    Ok(None) => {
                        job_results.push(Ok(Written::Swapped(false)));
                        continue;
                    }
                    Err(e) => {
                        job_results.push(Err(e));
                        continue;
                    }
                };
                let encoded = codec::encode(&next);
                tables.replace(composite, old.as_deref(), Some(&encoded))?;
                if next.is_tombstone() {
                    // Arrival here, on this site's clock: after every session already started.
                    let arrived = encode_hlc(clock.now());
                    tables.tombstones.insert(composite.as_slice(), arrived.as_slice()).map_err(storage)?;
                } else if old.is_some() && current.is_tombstone() {
                    tables.tombstones.remove(composite.as_slice()).map_err(storage)?;
                }
                // A rescued increment is both: what the merge brought, and a write of this site's.
                if let Some(incoming) = incoming {
                    seen.merged(&current, &next, incoming);
                }
                if origin == Origin::Local {
                    seen.local(&next);
                }
                changes.push(Change { key: composite.clone(), entry: next, origin });
                job_results.push(Ok(written));
            }
            results.push(job_results);
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        persisted = clock.last();
        meta.insert("hlc", encode_hlc(persisted).as_slice()).map_err(storage)?;
        // Only the writer thread changes it: read here, published after the commit.
        let current = shared.seen.read().unwrap_or_else(|e| e.into_inner()).clone();
        next_seen = seen.next(&current);
        if let Some(next) = &next_seen {
            meta.insert("seen", super::seen::encode(next).as_slice()).map_err(storage)?;
        }
        derived =
            tables.finish(&mut meta, &shared.derived.read().unwrap_or_else(|e| e.into_inner()).digests)?;
    }
    // Published before the commit: a reader that sees a value of this batch (on any thread, as
    // soon as it is committed) finds it in the vector; if the commit fails, the vector says a
    // little too much, which costs a session a wait, never a stale read.
    if let Some(next) = next_seen {
        *shared.seen.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
    super::derived::commit(&shared.derived, derived, move || txn.commit().map_err(storage))?;
    Ok((results, changes, persisted))
}

/// Whether a set-aside row for `composite` is on the register stamped `stamp`.
fn aside_on(
    aside: Option<&redb::Table<&'static [u8], &'static [u8]>>,
    composite: &[u8],
    stamp: &Stamp,
) -> Result<bool, KvError> {
    match aside.map(|a| a.get(composite)).transpose().map_err(storage)?.flatten() {
        Some(row) => Ok(decode_aside(row.value())?.entry.stamp == *stamp),
        None => Ok(false),
    }
}

/// When `merged`, just merged from a peer, is on the register of an entry a resync set aside
/// ([`Store::discard_before`]), the register is live: this site's contributions to it are put
/// back, each into its own slot by maximum (so putting them back twice, or merging another copy
/// of them later, changes nothing), and the row goes. A newer register (set or deleted since)
/// won over them: the row goes. An older one says nothing yet: the row stays (until collection
/// passes it).
fn rescue(
    aside: &mut redb::Table<&'static [u8], &'static [u8]>,
    composite: &[u8],
    merged: &Entry,
    clock: &Clock,
    site: &str,
) -> Result<Option<Entry>, KvError> {
    let saved = match aside.get(composite).map_err(storage)? {
        Some(row) => decode_aside(row.value())?.entry,
        None => return Ok(None),
    };
    if merged.stamp < saved.stamp {
        return Ok(None);
    }
    let mine = |writer: &str| Identity::same_site(writer, site);
    // The same register, and the same counter on it: every other site's contribution this site
    // had seen is there. A lower one is a peer behind on it, or a counter made afresh on the
    // zero register after a delete: wait for another peer (or for collection).
    if merged.stamp == saved.stamp
        && !saved.counter.iter().filter(|(w, _)| !mine(w)).all(|(w, seen)| {
            merged.counter.get(w).is_some_and(|held| held.up >= seen.up && held.down >= seen.down)
        })
    {
        return Ok(None);
    }
    aside.remove(composite).map_err(storage)?;
    if merged.stamp > saved.stamp {
        return Ok(None);
    }
    let mut next = merged.clone();
    for (writer, kept) in saved.counter.iter().filter(|(w, _)| mine(w)) {
        let slot = next.counter.entry(writer.clone()).or_default();
        slot.up = slot.up.max(kept.up);
        slot.down = slot.down.max(kept.down);
    }
    if next == *merged {
        return Ok(None);
    }
    next.changed = next.changed.clone().max(Stamp { hlc: clock.now(), site: site.to_owned() });
    Ok(Some(next))
}

/// The entry after `write`; `None` when a compare-and-swap does not match.
fn apply(current: &Entry, write: &Write, stamp: Stamp) -> Result<Option<(Entry, Written)>, KvError> {
    Ok(Some(match write {
        Write::Set(v) => (Entry::set(v.clone(), stamp), Written::Done),
        Write::Delete => (Entry::delete(stamp), Written::Done),
        Write::Increment(delta) => {
            let (next, total) = current.increment(*delta, stamp)?;
            (next, Written::Total(total))
        }
        Write::CompareAndSwap { expected, new } => {
            if current.read().into_bytes() != *expected {
                return Ok(None);
            }
            (Entry::set(new.clone(), stamp), Written::Swapped(true))
        }
        Write::DeleteIf { expected } => {
            if current.read().into_bytes().as_ref() != Some(expected) {
                return Ok(None);
            }
            (Entry::delete(stamp), Written::Swapped(true))
        }
    }))
}
