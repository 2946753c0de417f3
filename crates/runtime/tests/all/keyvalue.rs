//! wasi:keyvalue from real guests: both versions, isolation between apps, bounds, no store.

use super::*;
use atoll_kv::{Bounds, Clock, Store, StoreConfig};

fn runtime_with_store(dir: &std::path::Path, bounds: Bounds) -> Runtime {
    let store = Store::open(
        &dir.join("kv.redb"),
        StoreConfig { bounds, ..StoreConfig::new("test-site") },
        Clock::system(),
    )
    .expect("store");
    Runtime::new(RuntimeConfig { max_instances: 50, kv: Some(store), ..RuntimeConfig::default() })
        .expect("runtime")
}

async fn call(app: &App, method: &str, path: &str, body: &str) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://example.com{path}"))
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = app.handle(request, "kv-test").await.expect("served");
    (response.status().as_u16(), String::from_utf8_lossy(response.body()).into_owned())
}

fn load_as(rt: &Runtime, name: &str, path: &str) -> App {
    rt.load(name, &std::fs::read(path).expect("built"), AppSettings::default()).expect("loads")
}

#[tokio::test]
async fn counter_state_outlives_the_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds::default());
    let counter = load_as(&rt, "counter", atoll_test_guests::COUNTER);
    for expected in 1..=3 {
        assert_eq!(call(&counter, "POST", "/hits", "").await, (200, format!("{expected}\n")));
    }
    assert_eq!(call(&counter, "GET", "/hits", "").await, (200, "3\n".into()));
    assert_eq!(call(&counter, "GET", "/other", "").await, (200, "0\n".into()));
}

#[tokio::test]
async fn draft_and_draft2_guests_share_the_same_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds::default());
    // The same app name: the same namespace, whichever interface version the guest uses.
    let draft2 = load_as(&rt, "shared", atoll_test_guests::COUNTER);
    let draft = load_as(&rt, "shared", atoll_test_guests::KV_DRAFT);
    assert_eq!(call(&draft2, "POST", "/hits", "").await, (200, "1\n".into()));
    assert_eq!(call(&draft, "POST", "/default/hits?by=2", "").await, (200, "3".into()));
    assert_eq!(call(&draft2, "GET", "/hits", "").await, (200, "3\n".into()));
    assert_eq!(call(&draft, "GET", "/default/hits", "").await, (200, "3".into()));
    assert_eq!(call(&draft, "PUT", "/default/greeting", "hi").await.0, 200);
    assert_eq!(call(&draft, "GET", "/default/greeting", "").await, (200, "hi".into()));
}

#[tokio::test]
async fn apps_cannot_see_each_others_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds::default());
    let a = load_as(&rt, "app-a", atoll_test_guests::KV_DRAFT);
    let b = load_as(&rt, "app-b", atoll_test_guests::KV_DRAFT);
    assert_eq!(call(&a, "PUT", "/default/secret", "a-only").await.0, 200);
    assert_eq!(call(&b, "GET", "/default/secret", "").await.0, 404);
    assert_eq!(call(&b, "GET", "/default/", "").await, (200, String::new()), "b lists nothing");
    // Crafted bucket identifiers cannot reach another app's namespace either.
    for bucket in ["app-a", "..", "%00app-a", "default%00"] {
        assert_eq!(call(&b, "GET", &format!("/{bucket}/secret"), "").await.0, 404, "bucket {bucket}");
    }
    assert_eq!(call(&a, "GET", "/default/secret", "").await, (200, "a-only".into()));
}

#[tokio::test]
async fn listing_follows_the_cursor_across_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds { max_page: 3, ..Bounds::default() });
    let app = load_as(&rt, "lister", atoll_test_guests::KV_DRAFT);
    let mut expected = Vec::new();
    for i in 0..8 {
        let key = format!("k{i}");
        assert_eq!(call(&app, "PUT", &format!("/b/{key}"), "v").await.0, 200);
        expected.push(key);
    }
    assert_eq!(call(&app, "GET", "/b/", "").await, (200, expected.join("\n")));
}

#[tokio::test]
async fn oversized_keys_are_an_error_the_guest_handles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds { max_key: 8, ..Bounds::default() });
    let app = load_as(&rt, "bounded", atoll_test_guests::KV_DRAFT);
    let (status, body) = call(&app, "PUT", "/b/a-key-longer-than-eight", "v").await;
    assert_eq!(status, 500, "the guest's own error response, not a trap");
    assert!(body.contains("store error") && body.contains("over the limit"), "{body}");
}

#[tokio::test]
async fn without_a_store_open_fails_in_the_guest() {
    let rt = runtime();
    let counter = load_as(&rt, "counter", atoll_test_guests::COUNTER);
    let (status, body) = call(&counter, "POST", "/hits", "").await;
    assert_eq!(status, 500);
    assert!(body.contains("NoSuchStore"), "{body}");
}

/// A redb backend in memory whose writes and syncs fail once `fail` is set: a full or broken disk.
#[derive(Debug)]
struct FailingDisk {
    inner: redb::backends::InMemoryBackend,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FailingDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::other("injected: no space left on device"))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FailingDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

#[tokio::test]
async fn a_failing_disk_is_503_for_that_request_and_other_apps_carry_on() {
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let disk = FailingDisk { inner: redb::backends::InMemoryBackend::new(), fail: fail.clone() };
    let store =
        Store::open_with_backend(disk, StoreConfig::new("test-site"), Clock::system()).expect("store");
    let rt = Runtime::new(RuntimeConfig { max_instances: 50, kv: Some(store), ..RuntimeConfig::default() })
        .expect("runtime");
    let counter = load_as(&rt, "counter", atoll_test_guests::COUNTER);
    let hello = load_as(&rt, "hello", atoll_test_guests::HELLO);
    assert_eq!(call(&counter, "POST", "/hits", "").await, (200, "1\n".into()));

    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let request = http::Request::post("http://example.com/hits")
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let err = counter.handle(request, "kv-test").await.expect_err("the write cannot be made durable");
    assert!(matches!(err, HandleError::StoreUnavailable(_)), "{err:?}");
    assert_eq!(err.status(), 503);
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(call(&hello, "GET", "/", "").await.0, 200, "an app without state is still served");
}

#[tokio::test]
async fn spin_key_value_keeps_spins_rules_and_shares_the_data_of_wasi_keyvalue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds::default());
    let settings = AppSettings { kv_stores: vec!["extra".into()], ..AppSettings::default() };
    let wasm = std::fs::read(atoll_test_guests::SPIN_COUNTER).expect("built");
    let spin = rt.load("shared", &wasm, settings).expect("loads");
    let draft = load_as(&rt, "shared", atoll_test_guests::KV_DRAFT);
    let draft2 = load_as(&rt, "shared", atoll_test_guests::COUNTER);
    // Labels: `default` and those the app was deployed with; any other is access-denied.
    assert_eq!(call(&spin, "GET", "/_open/default", "").await, (200, "opened\n".into()));
    assert_eq!(call(&spin, "GET", "/_open/extra", "").await, (200, "opened\n".into()));
    assert_eq!(call(&spin, "GET", "/_open/other", "").await, (403, "Error::AccessDenied\n".into()));
    // Set, get, delete (a missing key too), get-keys: exactly the live keys.
    assert_eq!(call(&spin, "PUT", "/greeting", "hi").await, (200, "hi\n".into()));
    assert_eq!(call(&spin, "PUT", "/gone", "x").await.0, 200);
    assert_eq!(call(&spin, "DELETE", "/gone", "").await, (200, "deleted\n".into()));
    assert_eq!(call(&spin, "DELETE", "/never-there", "").await, (200, "deleted\n".into()));
    assert_eq!(call(&spin, "GET", "/gone", "").await, (200, "0\n".into()));
    // Written through Spin, read through wasi:keyvalue draft and draft2, and the other way.
    assert_eq!(call(&draft, "GET", "/default/greeting", "").await, (200, "hi".into()));
    assert_eq!(call(&draft2, "POST", "/hits", "").await, (200, "1\n".into()));
    assert_eq!(call(&spin, "POST", "/hits", "").await, (200, "2\n".into()));
    assert_eq!(call(&draft, "POST", "/default/hits?by=3", "").await, (200, "5".into()));
    assert_eq!(call(&spin, "GET", "/hits", "").await, (200, "5\n".into()));
    assert_eq!(call(&spin, "GET", "/", "").await, (200, "greeting=hi\nhits=5\n".into()));
}

#[tokio::test]
async fn a_wasi_0_3_guest_gets_at_most_16_spin_key_value_calls_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds::default());
    let probe = load_as(&rt, "burst", atoll_test_guests::PROBE3);
    // 16 at once are all served; of 64 started at once, the ones past 16 in flight are refused
    // (how many depends on how many finished meanwhile), and the request itself is served.
    assert_eq!(call(&probe, "GET", "/kv-burst?n=16", "").await, (200, "ok 16 refused 0\n".into()));
    let (status, body) = call(&probe, "GET", "/kv-burst?n=64", "").await;
    assert_eq!(status, 200, "{body}");
    let counts: Vec<usize> = body.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(counts.len(), 2, "{body}");
    assert_eq!(counts[0] + counts[1], 64, "{body}");
    assert!(counts[0] >= 16 && counts[1] > 0, "some were refused past 16 in flight: {body}");
}

#[tokio::test]
async fn fermyon_spin_key_value_from_a_wasi_0_2_guest_keeps_spins_rules_and_shares_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime_with_store(dir.path(), Bounds::default());
    let settings = AppSettings { kv_stores: vec!["extra".into()], ..AppSettings::default() };
    let wasm = std::fs::read(atoll_test_guests::SPIN2).expect("built");
    let spin2 = rt.load("shared", &wasm, settings.clone()).expect("loads");
    assert_eq!(spin2.world(), atoll_runtime::World::Http02);
    let spin3 = rt
        .load("shared", &std::fs::read(atoll_test_guests::SPIN_COUNTER).expect("built"), settings)
        .expect("loads");
    let draft = load_as(&rt, "shared", atoll_test_guests::KV_DRAFT);
    // Labels: `default` and those deployed with; any other is access-denied.
    assert_eq!(call(&spin2, "GET", "/kv/extra/k", "").await.0, 404);
    assert_eq!(call(&spin2, "GET", "/kv/other/k", "").await, (409, "Error::AccessDenied".into()));
    // Set, get, exists, delete (a missing key too), get-keys: exactly the live keys.
    assert_eq!(call(&spin2, "PUT", "/kv/default/greeting", "hi").await, (200, "set".into()));
    assert_eq!(call(&spin2, "PUT", "/kv/default/gone", "x").await.0, 200);
    assert_eq!(call(&spin2, "DELETE", "/kv/default/gone", "").await, (200, "deleted".into()));
    assert_eq!(call(&spin2, "DELETE", "/kv/default/never-there", "").await, (200, "deleted".into()));
    assert_eq!(call(&spin2, "GET", "/exists/default/greeting", "").await, (200, "true".into()));
    assert_eq!(call(&spin2, "GET", "/exists/default/gone", "").await, (200, "false".into()));
    assert_eq!(call(&spin2, "GET", "/kv/default/gone", "").await.0, 404);
    // One data set, whichever interface: Spin 2's, Spin 4's, wasi:keyvalue draft.
    assert_eq!(call(&spin3, "GET", "/greeting", "").await, (200, "hi\n".into()));
    assert_eq!(call(&spin3, "POST", "/hits", "").await, (200, "1\n".into()));
    assert_eq!(call(&draft, "PUT", "/extra/label", "own bucket").await.0, 200);
    assert_eq!(call(&spin2, "GET", "/kv/default/hits", "").await, (200, "1".into()));
    assert_eq!(call(&spin2, "GET", "/kv/extra/label", "").await, (200, "own bucket".into()));
    assert_eq!(call(&spin2, "GET", "/kv/default/", "").await, (200, "greeting\nhits\n".into()));
}

#[tokio::test]
async fn spins_get_keys_stops_at_10000_keys_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("kv.redb"), StoreConfig::new("test-site"), Clock::system())
        .expect("store");
    let ns = atoll_kv::Namespace::new("many", "default", store.bounds()).expect("namespace");
    for chunk in 0..11 {
        let writes = (chunk * 1000..(chunk + 1) * 1000)
            .take_while(|i| *i <= 10_000)
            .map(|i| (format!("k{i:05}").into_bytes(), atoll_kv::Write::Set(b"v".to_vec())))
            .collect();
        store.write_many(&ns, writes).await.expect("written");
    }
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 50,
        kv: Some(store.clone()),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let spin2 = load_as(&rt, "many", atoll_test_guests::SPIN2);
    let (status, body) = call(&spin2, "GET", "/kv/default/", "").await;
    assert_eq!(status, 409, "10,001 keys: an error, not a list cut short");
    assert!(body.contains("more than 10000 keys"), "{body}");
    // One key fewer: every key listed.
    store.write(&ns, b"k10000", atoll_kv::Write::Delete).await.expect("deleted");
    let (status, body) = call(&spin2, "GET", "/kv/default/", "").await;
    assert_eq!((status, body.lines().count()), (200, 10_000));
    assert_eq!(body.lines().last(), Some("k09999"));
}

/// Calls `app` with an `atoll_kv::Touched` in the request: what it noted.
async fn noting(app: &App, method: &str, path: &str) -> Vec<(String, atoll_kv::Hlc)> {
    let touched = std::sync::Arc::new(atoll_kv::Touched::default());
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://example.com{path}"))
        .body(http_body_util::Full::new(Bytes::from_static(b"1")))
        .expect("request");
    request.extensions_mut().insert(touched.clone());
    let response = app.handle(request, "touched").await.expect("served");
    assert_eq!(response.status(), 200, "{method} {path}: {:?}", response.body());
    touched.clocks()
}

/// A request given an `atoll_kv::Touched` learns what it read and wrote, whatever the interface:
/// a read, the writer of the entry read (another site's); a write, this site; a listing, all.
#[tokio::test]
async fn every_interface_notes_what_a_request_read_and_wrote() {
    use atoll_kv::{Entry, Hlc, Namespace, Stamp};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("kv.redb"), StoreConfig::new("test-site"), Clock::system())
        .expect("store");
    let rt =
        Runtime::new(RuntimeConfig { kv: Some(store.clone()), ..RuntimeConfig::default() }).expect("runtime");
    let far = Hlc { physical_ms: atoll_kv::hlc::wall_ms() - 60_000, logical: 7 };
    let ns = Namespace::new("shared", "default", store.bounds()).expect("namespace");
    let entry = Entry::set(b"from afar".to_vec(), Stamp { hlc: far, site: "far-site~1".into() });
    assert_eq!(store.merge(vec![(ns.key(b"far"), entry)]).await.expect("merged"), 1);
    let settings = AppSettings::default();
    let load = |path: &str| {
        rt.load("shared", &std::fs::read(path).expect("built"), settings.clone()).expect("loads")
    };
    let guests = [
        (load(atoll_test_guests::KV_DRAFT), "/default/far", "/default/mine"),
        (load(atoll_test_guests::SPIN_COUNTER), "/far", "/mine"),
        (load(atoll_test_guests::SPIN2), "/kv/default/far", "/kv/default/mine"),
    ];
    for (app, read, write) in &guests {
        assert_eq!(noting(app, "GET", read).await, vec![("far-site".to_owned(), far)], "{read}");
        let wrote = noting(app, "PUT", write).await;
        assert_eq!(wrote.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["test-site"], "{write}");
        assert!(wrote[0].1 > far, "at this site's clock, after its write");
    }
    // A listing is held to everything the store holds.
    assert_eq!(noting(&guests[1].0, "GET", "/").await, *store.seen());
}
