//! `Idempotency-Key`: a request that is not safe runs once per app and key, a retry (here or at
//! another site) gets the first response, and a retry after the serving site was SIGKILLed in
//! the middle of the request (through a router that retries it) does not run it again.

use std::time::Duration;

use crate::replication::{FAST, WAIT};
use crate::{RouterProc, Site, eventually, request};

const KEY: &str = "idempotency-key";

fn count(site: &Site, key: &str) -> String {
    let r = site.get(&format!("/apps/kv/b/{key}"));
    if r.status == 404 { "0".into() } else { r.body.trim().to_owned() }
}

#[test]
fn a_keyed_post_runs_once_and_a_retry_anywhere_gets_its_response() {
    let a = Site::start_with("a", &["--region", "us-east"], Some(FAST));
    let b = Site::start_with("b", &["--region", "eu-west", "--peer", &a.url], Some(FAST));
    a.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    eventually(WAIT, "kv deployed at b", || {
        let r = b.get("/apps/kv/b/x");
        (r.status == 404 && r.body.is_empty()).then_some(())
    });
    let post = |site: &Site, path: &str, key: Option<&str>| {
        let headers: Vec<(&str, &str)> = key.map(|k| (KEY, k)).into_iter().collect();
        request("POST", &format!("{}/apps/kv/b/{path}", site.url), &headers, Some(b""))
    };

    let first = post(&a, "once", Some("k-1"));
    assert_eq!((first.status, first.body.trim()), (200, "1"));
    assert!(first.headers.get("idempotent-replayed").is_none());
    let again = post(&a, "once", Some("k-1"));
    assert_eq!((again.status, again.body.trim()), (200, "1"), "replayed, not run");
    assert!(again.headers.get("idempotent-replayed").is_some_and(|v| v == "true"));
    // At the other site, once the record has replicated.
    let there = eventually(WAIT, "the retry at b is replayed", || {
        let r = post(&b, "once", Some("k-1"));
        r.headers.get("idempotent-replayed").is_some().then_some(r)
    });
    assert_eq!((there.status, there.body.trim()), (200, "1"));
    assert_eq!(count(&a, "once"), "1");
    eventually(WAIT, "b counts 1", || (count(&b, "once") == "1").then_some(()));

    // The same key for another request: 422; a bad key: 400; neither runs anything.
    let other = post(&a, "elsewhere", Some("k-1"));
    assert_eq!(other.status, 422, "{}", other.body);
    for bad in ["", &"x".repeat(300)] {
        let r = post(&a, "once", Some(bad));
        assert_eq!(r.status, 400, "{bad:?}: {}", r.body);
        assert!(r.body.contains("Idempotency-Key"), "{}", r.body);
    }
    assert_eq!((count(&a, "elsewhere"), count(&a, "once")), ("0".into(), "1".into()));
    // A GET ignores the header; without a key a POST runs every time.
    assert_eq!(post(&a, "free", None).body.trim(), "1");
    assert_eq!(post(&a, "free", None).body.trim(), "2");

    // A replay's session token asks for what the first attempt saw: here b's write, which the
    // first attempt's increment counted on.
    let put = request("PUT", &format!("{}/apps/kv/b/shared", b.url), &[], Some(b"10"));
    assert_eq!(put.status, 200);
    eventually(WAIT, "b's write reaches a", || (count(&a, "shared") == "10").then_some(()));
    let first = post(&a, "shared", Some("k-2"));
    assert_eq!(first.body.trim(), "11");
    let names = |r: &crate::Response| -> Vec<String> {
        let token = r.headers.get("x-atoll-session").and_then(|v| v.to_str().ok()).expect("a token");
        let json = base64_url(token.strip_prefix("v1.").expect("v1"));
        let list: Vec<(String, u64, u32)> = serde_json::from_slice(&json).expect("a token's list");
        list.into_iter().map(|(name, _, _)| name).collect()
    };
    assert!(names(&first).contains(&"b".to_owned()), "the first attempt read b's write: {:?}", names(&first));
    let replayed = post(&a, "shared", Some("k-2"));
    assert!(replayed.headers.get("idempotent-replayed").is_some());
    assert!(names(&replayed).contains(&"b".to_owned()), "the replay shows it too: {:?}", names(&replayed));
}

/// Decodes base64url without padding (what session tokens use).
fn base64_url(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let bits: Vec<u8> = text.bytes().map(value).collect();
    bits.chunks(4)
        .flat_map(|c| {
            let n = c.iter().enumerate().fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(c.len() - 1)
        })
        .collect()
}

#[test]
fn a_keyed_post_retried_after_its_site_is_killed_mid_request_counts_once() {
    let mut a = Site::start_with("a", &["--region", "us-east"], Some(FAST));
    let b = Site::start_with("b", &["--region", "eu-west", "--peer", &a.url], Some(FAST));
    a.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    eventually(WAIT, "kv deployed at b", || {
        let r = b.get("/apps/kv/b/x");
        (r.status == 404 && r.body.is_empty()).then_some(())
    });
    let router = RouterProc::start(&[&a.url, &b.url], None);
    eventually(WAIT, "the router sends us-east to a", || {
        let r =
            request("GET", &format!("{}/apps/kv/b/x", router.url), &[("x-atoll-region", "us-east")], None);
        r.headers.get("x-atoll-site").is_some_and(|v| v == "a").then_some(())
    });

    // The handler increments, then takes 3 s to answer; a is killed once b holds the increment.
    let url = format!("{}/apps/kv/b/paid?wait_ms=3000", router.url);
    let client = std::thread::spawn(move || {
        request("POST", &url, &[("x-atoll-region", "us-east"), (KEY, "order-42")], Some(b""))
    });
    eventually(WAIT, "the increment reaches b", || (count(&b, "paid") == "1").then_some(()));
    a.kill();
    let answer = client.join().expect("client");
    // The router retried it at b (a keyed POST may be retried), which knows the first attempt
    // ran at a, now down: not run again.
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert!(answer.body.contains(" at a,"), "{}", answer.body);
    assert_eq!(count(&b, "paid"), "1", "counted once");
    // A retry by the client after a is back: a does not know whether its attempt finished (it
    // was killed in it), so it does not run it either; the count stays 1 everywhere.
    let a = a.kill_and_restart();
    let retry = request(
        "POST",
        &format!("{}/apps/kv/b/paid?wait_ms=3000", router.url),
        &[("x-atoll-region", "us-east"), (KEY, "order-42")],
        Some(b""),
    );
    assert_eq!(retry.status, 409, "{}", retry.body);
    eventually(WAIT, "both count 1", || (count(&a, "paid") == "1" && count(&b, "paid") == "1").then_some(()));
}

#[test]
fn before_replication_a_key_runs_once_per_site_unless_its_session_pins_it() {
    use crate::dev::{dev_act, start_dev_with};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let args = ["--sites", "us-east,eu-west,ap-south", "--listen", "127.0.0.1:0"];
    let (mut dev, urls) = start_dev_with(&args, data, &[(atoll_test_guests::KV_DRAFT, "kv")]);
    let url = |name: &str| urls.iter().find(|(n, _)| n == name).map(|(_, u)| u.clone()).expect(name);
    let (us, eu) = (url("us-east-1"), url("eu-west-1"));
    let post = |site: &str, path: &str, headers: &[(&str, &str)]| {
        request("POST", &format!("{site}/apps/kv/b/{path}"), headers, Some(b""))
    };
    let get = |site: &str, path: &str| request("GET", &format!("{site}/apps/kv/b/{path}"), &[], None).body;

    // Replication between them is cut: the same key at both sites before either record reaches
    // the other runs at each (at most once per site).
    dev_act(data, &["partition", "eu-west-1"]);
    assert_eq!(post(&eu, "twice", &[(KEY, "k")]).body.trim(), "1");
    assert_eq!(post(&us, "twice", &[(KEY, "k")]).body.trim(), "1");
    // With the session token of the first attempt, the second site knows it may lack it: 409.
    let first = post(&eu, "pinned", &[(KEY, "k2")]);
    let token = first.headers.get("x-atoll-session").and_then(|v| v.to_str().ok()).expect("token").to_owned();
    let pinned = post(&us, "pinned", &[(KEY, "k2"), ("x-atoll-session", &token)]);
    assert_eq!(pinned.status, 409, "{}", pinned.body);
    assert!(pinned.body.contains("eu-west-1"), "{}", pinned.body);

    // Through the router: a keyed POST runs at eu-west-1 (whose record cannot replicate), which
    // is killed before answering; the router's retry at another site names eu-west-1, and that
    // site, finding no record, does not run it again.
    let router = url("router");
    let url_retried = format!("{router}/apps/kv/b/retried?wait_ms=3000");
    let client = std::thread::spawn(move || {
        request("POST", &url_retried, &[("x-atoll-region", "eu-west"), (KEY, "k3")], Some(b""))
    });
    eventually(WAIT, "the increment runs at eu-west-1", || (get(&eu, "retried") == "1").then_some(()));
    dev_act(data, &["kill", "eu-west-1"]);
    let answer = client.join().expect("client");
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert!(answer.body.contains("sent to eu-west-1 first"), "{}", answer.body);
    assert_eq!(get(&us, "retried"), "", "not run at us-east-1");
    // (atoll dev restarts eu-west-1; its increment replicates after the heal.)

    dev_act(data, &["heal"]);
    eventually(WAIT, "converged", || (get(&us, "twice") == "2" && get(&eu, "twice") == "2").then_some(()));
    eventually(WAIT, "the retried increment counted once", || (get(&us, "retried") == "1").then_some(()));
    eventually(WAIT, "pinned ran once", || {
        (get(&us, "pinned") == "1" && get(&eu, "pinned") == "1").then_some(())
    });
    // Once the records have met, a retry anywhere is answered from a record, not run.
    let retry = post(&us, "pinned", &[(KEY, "k2")]);
    assert!(retry.headers.get("idempotent-replayed").is_some(), "{retry:?}");
    assert_eq!(get(&us, "pinned"), "1");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}
