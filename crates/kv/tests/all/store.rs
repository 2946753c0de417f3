//! The redb store: namespaces, bounds, durability, group commit, digests.

use std::path::Path;

use atoll_kv::{Clock, KvError, Namespace, Store, StoreConfig, Write, Written};

fn open(path: &Path, site: &str) -> Store {
    Store::open(path, StoreConfig::new(site), Clock::system()).expect("store opens")
}

fn ns(store: &Store, app: &str, bucket: &str) -> Namespace {
    Namespace::new(app, bucket, store.bounds()).expect("valid namespace")
}

async fn incr(store: &Store, ns: &Namespace, key: &str, by: i64) {
    store.write(ns, key.as_bytes(), Write::Increment(by)).await.expect("increment");
}

async fn set(store: &Store, ns: &Namespace, key: &str, value: &str) {
    let written = store.write(ns, key.as_bytes(), Write::Set(value.as_bytes().to_vec())).await;
    assert_eq!(written, Ok(Written::Done));
}

#[tokio::test]
async fn set_get_delete_exists_and_the_default_bucket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("kv.redb"), "a");
    let default = ns(&store, "app", "");
    set(&store, &default, "k", "v").await;
    assert_eq!(
        store.get(&ns(&store, "app", "default"), b"k"),
        Ok(Some(b"v".to_vec())),
        "\"\" is \"default\""
    );
    assert_eq!(store.exists(&default, b"k"), Ok(true));
    assert_eq!(store.write(&default, b"k", Write::Delete).await, Ok(Written::Done));
    assert_eq!(store.get(&default, b"k"), Ok(None));
    assert_eq!(store.exists(&default, b"k"), Ok(false));
    assert_eq!(store.get(&default, b"never"), Ok(None));
}

#[tokio::test]
async fn apps_and_buckets_never_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("kv.redb"), "a");
    // Names that would collide if the key were a plain concatenation.
    let a = ns(&store, "ab", "c");
    let b = ns(&store, "a", "bc");
    let c = ns(&store, "ab", "c\u{1}");
    set(&store, &a, "k", "from-a").await;
    assert_eq!(store.get(&b, b"k"), Ok(None));
    assert_eq!(store.get(&c, b"k"), Ok(None));
    set(&store, &b, "k", "from-b").await;
    assert_eq!(store.get(&a, b"k"), Ok(Some(b"from-a".to_vec())));
    assert_eq!(store.list_keys(&b, None, 10), Ok((vec![b"k".to_vec()], None)));
    assert_eq!(store.list_keys(&ns(&store, "a", "b"), None, 10), Ok((vec![], None)));
}

#[tokio::test]
async fn listing_pages_with_a_cursor_and_skips_tombstones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("kv.redb"), "a");
    let n = ns(&store, "app", "list");
    for i in 0..25 {
        set(&store, &n, &format!("key{i:02}"), "v").await;
    }
    store.write(&n, b"key03", Write::Delete).await.expect("delete");
    let mut seen = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let (page, next) = store.list_keys(&n, cursor.as_deref(), 10).expect("list");
        assert!(page.len() <= 10);
        seen.extend(page);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<Vec<u8>> =
        (0..25).filter(|i| *i != 3).map(|i| format!("key{i:02}").into_bytes()).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_prefix_listing_pages_within_the_prefix_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("kv.redb"), "a");
    let n = ns(&store, "app", "list");
    for key in ["a", "user:1", "user:2", "user:3", "users", "v"] {
        set(&store, &n, key, "v").await;
    }
    let (page, next) = store.list_prefix(&n, b"user:", None, 2).expect("list");
    assert_eq!(
        (page, next.clone()),
        (vec![b"user:1".to_vec(), b"user:2".to_vec()], Some(b"user:2".to_vec()))
    );
    let (page, next) = store.list_prefix(&n, b"user:", next.as_deref(), 2).expect("list");
    assert_eq!((page, next), (vec![b"user:3".to_vec()], None));
    // A cursor before the prefix starts at the prefix.
    assert_eq!(store.list_prefix(&n, b"user", Some(b"a"), 10).expect("list").0.len(), 4);
    let entry = store.entry_of(&n, b"v").expect("read").expect("present");
    assert_eq!(entry.stamp.site.split('~').next(), Some("a"));
}

#[tokio::test]
async fn oversize_keys_values_and_buckets_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("kv.redb"), "a");
    let bounds = *store.bounds();
    let n = ns(&store, "app", "");
    let long_key = vec![b'k'; bounds.max_key + 1];
    assert!(matches!(
        store.write(&n, &long_key, Write::Set(vec![])).await,
        Err(KvError::TooLarge { what: "key", .. })
    ));
    assert!(matches!(store.get(&n, &long_key), Err(KvError::TooLarge { what: "key", .. })));
    let big = vec![0u8; bounds.max_value + 1];
    assert!(matches!(
        store.write(&n, b"k", Write::Set(big)).await,
        Err(KvError::TooLarge { what: "value", .. })
    ));
    let bucket = "b".repeat(bounds.max_bucket + 1);
    assert!(matches!(Namespace::new("app", &bucket, &bounds), Err(KvError::TooLarge { .. })));
    assert_eq!(store.get(&n, b"k"), Ok(None), "nothing was written");
}

#[tokio::test]
async fn concurrent_increments_are_all_counted_and_survive_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kv.redb");
    let before;
    {
        let store = open(&path, "a");
        let n = ns(&store, "app", "");
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (store, n) = (store.clone(), n.clone());
            tasks.push(tokio::spawn(async move { store.write(&n, b"hits", Write::Increment(1)).await }));
        }
        let mut totals = Vec::new();
        for t in tasks {
            match t.await.expect("join") {
                Ok(Written::Total(total)) => totals.push(total),
                other => panic!("unexpected {other:?}"),
            }
        }
        totals.sort();
        assert_eq!(totals, (1..=200).collect::<Vec<_>>(), "each increment saw a distinct total");
        assert_eq!(store.get(&n, b"hits"), Ok(Some(b"200".to_vec())));
        before = store.clock().last();
    }
    let store = open(&path, "a");
    assert_eq!(store.get(&ns(&store, "app", ""), b"hits"), Ok(Some(b"200".to_vec())));
    assert!(store.clock().now() > before, "the clock resumes after its persisted high-water mark");
}

#[tokio::test]
async fn increment_of_a_non_number_and_compare_and_swap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir.path().join("kv.redb"), "a");
    let n = ns(&store, "app", "");
    set(&store, &n, "word", "hello").await;
    assert!(matches!(store.write(&n, b"word", Write::Increment(1)).await, Err(KvError::Entry(_))));
    let cas = |expected: Option<&str>, new: &str| Write::CompareAndSwap {
        expected: expected.map(|e| e.as_bytes().to_vec()),
        new: new.as_bytes().to_vec(),
    };
    assert_eq!(store.write(&n, b"word", cas(Some("nope"), "x")).await, Ok(Written::Swapped(false)));
    assert_eq!(store.write(&n, b"word", cas(Some("hello"), "bye")).await, Ok(Written::Swapped(true)));
    assert_eq!(store.write(&n, b"fresh", cas(None, "new")).await, Ok(Written::Swapped(true)));
    assert_eq!(store.get(&n, b"word"), Ok(Some(b"bye".to_vec())));
    assert_eq!(store.get(&n, b"fresh"), Ok(Some(b"new".to_vec())));
    // A conditional delete takes only the value read: one written since stays.
    let delete_if = |expected: &str| Write::DeleteIf { expected: expected.as_bytes().to_vec() };
    assert_eq!(store.write(&n, b"word", delete_if("hello")).await, Ok(Written::Swapped(false)));
    assert_eq!(store.write(&n, b"absent", delete_if("x")).await, Ok(Written::Swapped(false)));
    assert_eq!(store.get(&n, b"word"), Ok(Some(b"bye".to_vec())));
    assert_eq!(store.write(&n, b"word", delete_if("bye")).await, Ok(Written::Swapped(true)));
    assert_eq!(store.get(&n, b"word"), Ok(None));
    assert!(
        store.entries_at(&[n.key(b"absent")]).expect("read").is_empty(),
        "a refused delete wrote nothing"
    );
}

#[tokio::test]
async fn stores_with_the_same_entries_have_the_same_digests_whatever_the_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(&dir.path().join("a.redb"), "a");
    let b = open(&dir.path().join("b.redb"), "b");
    let n = ns(&a, "app", "");
    for i in 0..100 {
        set(&a, &n, &format!("k{i}"), &format!("v{i}")).await;
    }
    a.write(&n, b"k7", Write::Delete).await.expect("delete");
    a.write(&n, b"count", Write::Increment(3)).await.expect("increment");
    let mut entries = a.entries().expect("entries");
    entries.reverse();
    let mut doubled = entries.clone();
    doubled.extend(entries.iter().step_by(3).cloned());
    b.merge(doubled).await.expect("merge");
    assert_eq!(a.digests(), b.digests());
    assert_eq!(b.get(&n, b"k7"), Ok(None), "the tombstone came across");
    assert_eq!(b.get(&n, b"count"), Ok(Some(b"3".to_vec())));
    // One differing key changes exactly one range's digest.
    let before = b.digests().expect("digests");
    set(&b, &n, "k1", "changed").await;
    let after = b.digests().expect("digests");
    assert_eq!(before.iter().zip(&after).filter(|(x, y)| x != y).count(), 1);
    assert_ne!(a.digests(), b.digests());
}

/// Writes `format` into the store at `path`, behind its back.
fn set_format(path: &Path, format: u64) {
    set_meta_value(path, "format", &format.to_le_bytes());
}

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// Writes a meta value into the store at `path`, behind its back.
fn set_meta_value(path: &Path, key: &str, value: &[u8]) {
    let db = redb::Database::create(path).expect("db");
    let txn = db.begin_write().expect("txn");
    txn.open_table(META).expect("meta").insert(key, value).expect("insert");
    txn.commit().expect("commit");
}

/// A meta value of the (closed) store at `path`.
fn meta_value(path: &Path, key: &str) -> Option<Vec<u8>> {
    use redb::ReadableDatabase;
    let db = redb::Database::create(path).expect("db");
    let txn = db.begin_read().expect("txn");
    txn.open_table(META).expect("meta").get(key).expect("get").map(|v| v.value().to_vec())
}

#[tokio::test]
async fn an_unknown_store_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kv.redb");
    drop(open(&path, "a"));
    set_format(&path, 99);
    let err = Store::open(&path, StoreConfig::new("a"), Clock::system()).expect_err("refused");
    assert_eq!(err, KvError::UnknownFormat { found: 99 });
    assert!(err.to_string().contains("format version 99"));
}

#[tokio::test]
async fn tombstones_stay_until_collected_and_collection_keeps_digests_true() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(&dir.path().join("a.redb"), "a");
    let n = ns(&a, "app", "");
    set(&a, &n, "gone", "v").await;
    set(&a, &n, "kept", "v").await;
    a.write(&n, b"gone", Write::Delete).await.expect("delete");
    let deleted_at = a.clock().last();
    assert_eq!(a.entries().expect("entries").len(), 2, "the tombstone is kept");
    assert_eq!(a.collect_tombstones(deleted_at), Ok(0), "not older than the horizon yet");
    let horizon = a.clock().now();
    assert_eq!(a.collect_tombstones(horizon), Ok(1));
    assert_eq!(a.entries().expect("entries").len(), 1);
    assert_eq!(a.get(&n, b"gone"), Ok(None));
    // The digests equal those of a store that only ever held the live entry.
    let b = open(&dir.path().join("b.redb"), "b");
    b.merge(a.entries().expect("entries")).await.expect("merge");
    assert_eq!(a.digests(), b.digests());
}

#[tokio::test]
async fn a_resync_discards_every_register_older_than_the_watermark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(&dir.path().join("a.redb"), "a");
    let n = ns(&a, "app", "");
    set(&a, &n, "old", "v").await;
    set(&a, &n, "old-number", "10").await;
    a.write(&n, b"counter", Write::Increment(5)).await.expect("increment");
    a.write(&n, b"deleted", Write::Delete).await.expect("delete");
    let watermark = a.clock().now();
    // After the watermark: new increments on old registers (they cannot be told from those
    // before a delete elsewhere), and new registers.
    a.write(&n, b"old-number", Write::Increment(1)).await.expect("increment");
    a.write(&n, b"counter", Write::Increment(1)).await.expect("increment");
    set(&a, &n, "new", "w").await;
    a.write(&n, b"new-counter", Write::Delete).await.expect("delete");
    a.write(&n, b"new-counter", Write::Increment(2)).await.expect("increment");
    let writer = a.identity().writer();
    assert_eq!(a.resync_began(), Ok(None));
    let gone = ["old", "old-number", "counter", "deleted"];
    assert_eq!(a.discard_before(watermark, false), Ok(gone.len()));
    for key in gone {
        assert_eq!(a.entries_at(&[n.key(key.as_bytes())]).expect("read"), vec![], "{key} stayed");
    }
    assert_eq!(a.get(&n, b"new"), Ok(Some(b"w".to_vec())));
    assert_eq!(a.get(&n, b"new-counter"), Ok(Some(b"2".to_vec())));
    assert_eq!(a.identity().since, watermark, "the data now reaches back to the watermark");
    assert_ne!(a.identity().writer(), writer, "increments from now on go to a new slot");
    assert!(a.resync_began().expect("read").is_some(), "a resync is under way");
    // Digests follow: a store holding only the survivors has the same.
    let b = open(&dir.path().join("b.redb"), "b");
    b.merge(a.entries().expect("entries")).await.expect("merge");
    assert_eq!(a.digests(), b.digests());
    a.finish_resync().expect("finish");
    assert_eq!(a.resync_began(), Ok(None));
}

/// What a resync discards of this site's own increments comes back when a peer's entry shows
/// the register is still live, and only then: a counter deleted elsewhere stays deleted, a live
/// one loses none of this site's increments, even those no peer saw, copies of them arriving
/// from several peers count once, and increments made after the resync are not absorbed by a
/// peer's copy of this site's older total. A site cut off past the horizon gets nothing back.
#[tokio::test]
async fn increments_a_resync_set_aside_count_again_where_the_register_is_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, c] = ["a", "b", "c"].map(|site| open(&dir.path().join(format!("{site}.redb")), site));
    let n = ns(&a, "app", "");
    incr(&a, &n, "live", 3).await;
    incr(&a, &n, "deleted", 5).await;
    c.merge(a.entries().expect("entries")).await.expect("to c");
    incr(&a, &n, "live", 2).await;
    b.merge(a.entries().expect("entries")).await.expect("to b");
    let watermark = a.clock().now();
    // Since the watermark, at a only: 3 more on the live counter, 1 on the other, and a new
    // counter; at b only: the other counter is deleted.
    incr(&a, &n, "live", 3).await;
    incr(&a, &n, "deleted", 1).await;
    incr(&a, &n, "only-here", 7).await;
    b.write(&n, b"deleted", Write::Delete).await.expect("delete");
    assert_eq!(a.discard_before(watermark, false), Ok(3));
    // The resync pulls c's entries (a's total 3 on the live counter), then b's (5).
    a.merge(c.entries().expect("entries")).await.expect("from c");
    assert_eq!(a.get(&n, b"live"), Ok(Some(b"8".to_vec())), "3 held by c, and a's own 8 put back");
    a.merge(b.entries().expect("entries")).await.expect("from b");
    assert_eq!(a.get(&n, b"live"), Ok(Some(b"8".to_vec())), "counted once");
    assert_eq!(a.get(&n, b"deleted"), Ok(None), "the delete wins over the set-aside increments");
    assert_eq!(a.get(&n, b"only-here"), Ok(None), "no peer holds it: not put back (yet)");
    incr(&a, &n, "live", 1).await;
    for peer in [&b, &c] {
        peer.merge(a.entries().expect("entries")).await.expect("back");
        assert_eq!(peer.get(&n, b"live"), Ok(Some(b"9".to_vec())), "every acknowledged increment counts");
    }
    // Once collection passes the resync, what no peer claimed is gone for good.
    a.collect_tombstones(a.clock().now()).expect("collect");
    let stranger =
        atoll_kv::Entry::absent().increment(1, atoll_kv::Stamp { hlc: a.clock().now(), site: "x~1".into() });
    a.merge(vec![(n.key(b"only-here"), stranger.expect("increment").0)]).await.expect("late");
    assert_eq!(a.get(&n, b"only-here"), Ok(Some(b"1".to_vec())), "the expired row put nothing back");
}

/// A site that was not counted (cut off past the horizon) cannot tell its increments on a
/// counter never set from those before a delete collected meanwhile: they go. On a register
/// with a real stamp (a number set), a peer holding the same register shows no delete won, so
/// they come back. And the writer epoch keeps increments made after the resync from falling
/// into a slot a peer holds higher.
#[tokio::test]
async fn an_uncounted_resync_puts_back_only_what_a_real_register_proves_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [a, b, c] = ["a", "b", "c"].map(|site| open(&dir.path().join(format!("{site}.redb")), site));
    let n = ns(&a, "app", "");
    set(&a, &n, "number", "100").await;
    incr(&a, &n, "counter", 4).await;
    incr(&a, &n, "number", 4).await;
    c.merge(a.entries().expect("entries")).await.expect("to c");
    incr(&a, &n, "counter", 1).await;
    b.merge(a.entries().expect("entries")).await.expect("to b");
    let watermark = a.clock().now();
    incr(&a, &n, "counter", 2).await;
    incr(&a, &n, "number", 2).await;
    assert_eq!(a.discard_before(watermark, true), Ok(2));
    a.merge(c.entries().expect("entries")).await.expect("from c");
    assert_eq!(a.get(&n, b"number"), Ok(Some(b"106".to_vec())), "the set register is live: all put back");
    assert_eq!(a.get(&n, b"counter"), Ok(Some(b"4".to_vec())), "on the zero register: only what c holds");
    // Counted on after the resync: a new slot, so b's copy of a's older total absorbs nothing.
    incr(&a, &n, "counter", 1).await;
    b.merge(a.entries().expect("entries")).await.expect("to b");
    assert_eq!(b.get(&n, b"counter"), Ok(Some(b"6".to_vec())), "4 + 1 held by b, + 1 after");
}

/// A data dir restored from an older copy, told by a peer to reincarnate, with its clock behind
/// the writes the copy lost: it never issues a stamp it issued before, and its new increments
/// are not absorbed by its own older contributions (still held by peers).
#[tokio::test]
async fn a_reincarnated_copy_never_reuses_a_stamp_or_a_contribution() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.redb");
    let wall = Arc::new(AtomicU64::new(1_000));
    let open_at = |path: &Path| {
        let wall = wall.clone();
        let clock = Clock::with_source(Box::new(move || wall.load(Ordering::Relaxed)));
        Store::open(path, StoreConfig::new("a"), clock).expect("store opens")
    };
    let a = open_at(&path);
    let n = ns(&a, "app", "");
    a.write(&n, b"c", Write::Increment(5)).await.expect("increment");
    drop(a);
    let copy = dir.path().join("copy.redb");
    std::fs::copy(&path, &copy).expect("copy");
    // After the copy: writes that reach a peer, then the data dir is lost.
    wall.store(2_000, Ordering::Relaxed);
    let a = open_at(&path);
    set(&a, &n, "k", "lost-here").await;
    a.write(&n, b"c", Write::Increment(3)).await.expect("increment");
    let peer_holds = a.entries().expect("entries");
    drop(a);
    // Restored, with the wall clock back where it was when those writes were stamped.
    std::fs::rename(&copy, &path).expect("restore");
    wall.store(1_500, Ordering::Relaxed);
    let a = open_at(&path);
    a.reincarnate().expect("reincarnate");
    a.finish_resync().expect("finish");
    wall.store(2_000, Ordering::Relaxed);
    set(&a, &n, "k", "written-after").await;
    a.write(&n, b"c", Write::Increment(1)).await.expect("increment");
    for (key, entry) in a.entries().expect("entries") {
        for (_, old) in peer_holds.iter().filter(|(k, _)| *k == key) {
            if entry.stamp != atoll_kv::Stamp::zero() {
                assert_ne!(entry.stamp, old.stamp, "a register stamp was issued twice");
            }
            assert_ne!(entry.changed, old.changed, "a stamp was issued twice");
        }
    }
    // The peer's entries arrive: every acknowledged increment counts (5 + 3 + 1).
    a.merge(peer_holds).await.expect("merge");
    assert_eq!(a.get(&n, b"c"), Ok(Some(b"9".to_vec())));
}

/// A guest's write is refused when the gate is closed as the writer commits it (a resync may
/// begin between the guest's check and the commit); the host's own writes pass.
#[tokio::test]
async fn a_guests_write_meets_the_gate_when_it_is_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = open(&dir.path().join("a.redb"), "a");
    let n = ns(&a, "app", "");
    assert_eq!(a.guest_write(&n, b"k", Write::Set(b"1".to_vec())).await, Ok(Written::Done));
    a.set_gate(Some("resyncing".into()), false);
    assert_eq!(
        a.guest_write(&n, b"k", Write::Increment(1)).await,
        Err(KvError::Unavailable("resyncing".into()))
    );
    let many = a.guest_write_many(&n, vec![(b"x".to_vec(), Write::Delete)]).await;
    assert_eq!(many, Ok(vec![Err(KvError::Unavailable("resyncing".into()))]));
    assert_eq!(a.get(&n, b"k"), Ok(Some(b"1".to_vec())), "nothing was written");
    assert_eq!(a.write(&n, b"host", Write::Set(b"h".to_vec())).await, Ok(Written::Done));
    a.set_gate(None, false);
    assert_eq!(a.guest_write(&n, b"k", Write::Increment(1)).await, Ok(Written::Total(2)));
}

/// The range digests and the index are kept in memory and written lazily (the index journal is
/// folded every `fold_at` changes, stale digest rows written every `flush_at` ranges). With
/// both tiny, random writes, merges, collection, a resync's discard and reopenings at every
/// step (what a SIGKILL leaves: the last commit) keep them equal to what the entries say, and
/// to those of a store that never folded.
#[tokio::test]
async fn digests_and_index_stay_true_through_folds_flushes_and_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.redb");
    // Dropped without writing anything at close, as a crash leaves it.
    let tiny =
        |site: &str| StoreConfig { fold_at: 5, flush_at: 3, flush_at_close: false, ..StoreConfig::new(site) };
    let mut a = Store::open(&path, tiny("a"), Clock::system()).expect("store");
    let n = ns(&a, "app", "");
    let mut seed = 7u64;
    let mut next = move |m: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % m
    };
    for round in 0..12 {
        for _ in 0..40 {
            let key = format!("k{}", next(150));
            let write = match next(4) {
                0 => Write::Delete,
                1 => Write::Increment(1),
                _ => Write::Set(format!("v{}", next(1000)).into_bytes()),
            };
            let _ = a.write(&n, key.as_bytes(), write).await;
        }
        if round % 3 == 1 {
            a.collect_tombstones(a.clock().now()).expect("collect");
        }
        if round == 7 {
            a.discard_before(a.clock().now(), false).expect("discard");
        }
        a.check().expect("derived state true before reopening");
        drop(a);
        a = Store::open(&path, tiny("a"), Clock::system()).expect("reopen");
        a.check().expect("derived state true after reopening");
    }
    let b = open(&dir.path().join("b.redb"), "b");
    b.merge(a.entries().expect("entries")).await.expect("merge");
    b.check().expect("b");
    assert_eq!(a.digests(), b.digests());
    for range in 0..atoll_kv::DIGEST_RANGES {
        assert_eq!(a.range_items(range), b.range_items(range), "range {range}");
    }
}

/// A store whose journal was never folded (and whose digest rows all lag) opens with every key
/// listed and every digest right; and the check finds an entry changed behind the store's back.
#[tokio::test]
async fn an_unfolded_journal_is_read_back_and_the_check_finds_a_changed_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.redb");
    let never = || StoreConfig { fold_at: usize::MAX, flush_at: usize::MAX, ..StoreConfig::new("a") };
    let a = Store::open(&path, never(), Clock::system()).expect("store");
    let n = ns(&a, "app", "");
    for i in 0..300 {
        set(&a, &n, &format!("k{i}"), "v").await;
    }
    a.write(&n, b"k3", Write::Delete).await.expect("delete");
    let digests = a.digests().expect("digests");
    let listed: usize = (0..atoll_kv::DIGEST_RANGES).map(|r| a.range_items(r).expect("items").len()).sum();
    assert_eq!(listed, 300, "299 values and one tombstone");
    drop(a);
    assert_eq!(meta_value(&path, "stale_digests"), None, "a clean close writes the digests");
    let a = Store::open(&path, never(), Clock::system()).expect("reopen");
    a.check().expect("true after reopening");
    assert_eq!(a.digests(), Ok(digests.clone()));
    drop(a);
    // An unreadable stale set: every range is recomputed.
    set_meta_value(&path, "stale_digests", b"garbage");
    let a = Store::open(&path, never(), Clock::system()).expect("reopen");
    a.check().expect("true after recomputing");
    assert_eq!(a.digests(), Ok(digests));
    drop(a);
    {
        let db = redb::Database::create(&path).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            use redb::ReadableTable;
            let def: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("entries");
            let mut entries = txn.open_table(def).expect("entries");
            let key = n.key(b"k5");
            let mut value = entries.get(key.as_slice()).expect("get").expect("k5").value().to_vec();
            *value.last_mut().expect("bytes") ^= 1;
            entries.insert(key.as_slice(), value.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let a = Store::open(&path, never(), Clock::system()).expect("reopen");
    let err = a.check().expect_err("a changed entry is found");
    assert!(err.to_string().contains("digest is not the sum"), "{err}");
}

/// A store of format 3 (before the journal) opens and is upgraded in place.
#[tokio::test]
async fn a_format_3_store_is_upgraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kv.redb");
    {
        // Folding and flushing at every write leaves what format 3 had: index and digest rows
        // for every key, no journal row, no stale digest.
        let config = StoreConfig { fold_at: 1, flush_at: 1, ..StoreConfig::new("a") };
        let a = Store::open(&path, config, Clock::system()).expect("store");
        set(&a, &ns(&a, "app", ""), "k", "v").await;
        set(&a, &ns(&a, "app", ""), "j", "w").await;
    }
    set_format(&path, 3);
    let a = open(&path, "a");
    a.check().expect("true");
    assert_eq!(a.get(&ns(&a, "app", ""), b"k"), Ok(Some(b"v".to_vec())));
}
