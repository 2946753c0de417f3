//! Trust boundaries, tried as an attacker would: each test is an attack that fails with a clear
//! status and nothing changed.

use std::process::Command;

use ed25519_dalek::{Signer, SigningKey};

use crate::replication::{FAST, WAIT, deploy_kv, get, introduce_intruder, mesh, now_ms, push_entries, put};
use crate::{ATOLL, PEER_SECRET, Site, TOKEN, atoll, eventually, json};

/// The seed of the key every e2e site holds (see `deploy_key_file`).
const SITE_SEED: [u8; 32] = [0x5a; 32];

/// A deploy record as sites replicate it, signed with `seed` (the statement's text is the wire
/// format of `crate::signing`, written out here so that a change to it shows).
fn record(seed: [u8; 32], app: &str, version: Option<&str>, size: u64, params: &str, at: u64) -> Vec<u8> {
    record_in("atoll", seed, app, version, size, params, at)
}

/// [`record`] signed for `cluster`.
fn record_in(
    cluster: &str,
    seed: [u8; 32],
    app: &str,
    version: Option<&str>,
    size: u64,
    params: &str,
    at: u64,
) -> Vec<u8> {
    let canonical: String = params.lines().map(|l| format!("{l}\n")).collect();
    let text = format!(
        "atoll-deploy-v2\ncluster={cluster}\napp={app}\nversion={}\nsize={size}\nsigned_at_ms={at}\n{canonical}",
        version.unwrap_or("deleted")
    );
    let key = SigningKey::from_bytes(&seed);
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut params_json = serde_json::Map::new();
    for line in params.lines() {
        let (k, v) = line.split_once('=').expect("name=value");
        let v = v.parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| v.into());
        params_json.insert(k.into(), v);
    }
    serde_json::to_vec(&serde_json::json!({
        "cluster": cluster,
        "version": version,
        "size": size,
        "params": params_json,
        "signed_at_ms": at,
        "key": hex(key.verifying_key().as_bytes()),
        "signature": hex(&key.sign(text.as_bytes()).to_bytes()),
    }))
    .expect("json")
}

/// An entry at `_atoll/apps/NAME` (or any namespace) stamped now by the intruder.
fn entry(app: &str, bucket: &str, key: &str, value: Option<Vec<u8>>) -> atoll_sync::message::WireEntry {
    use atoll_kv::{Entry, Hlc, Namespace, Stamp};
    let ns = Namespace::new(app, bucket, &atoll_kv::Bounds::default()).expect("ns");
    let stamp = Stamp { hlc: Hlc { physical_ms: now_ms(), logical: 0 }, site: "intruder~1".into() };
    let entry = match value {
        Some(v) => Entry::set(v, stamp),
        None => Entry::delete(stamp),
    };
    atoll_sync::message::WireEntry::new(ns.key(key.as_bytes()), &entry)
}

/// What a site serves and holds, to compare before and after an attack.
fn state(site: &Site) -> (String, Option<String>) {
    let apps = json(&site.admin("GET", "/_atoll/apps", None).body);
    let apps: Vec<String> = apps
        .as_array()
        .expect("apps")
        .iter()
        .map(|a| format!("{} {} {}", a["name"], a["version"], a["settings"]))
        .collect();
    (apps.join("\n"), get(site, "k"))
}

#[test]
fn a_deploy_record_forged_with_the_peer_secret_is_not_run() {
    let sites = mesh(&["a"]);
    let version = deploy_kv(&sites);
    let version = version.trim_matches('"').to_owned();
    let a = &sites[0];
    put(a, "k", "original");
    let before = state(a);
    assert_eq!(introduce_intruder(a).status, 200);

    // A compromised peer holds the peer secret, but not a trusted deploy key.
    let stranger = [7u8; 32];
    let at = now_ms() + 1;
    let attacks = vec![
        // Its own code as a new app, signed by its own key.
        entry("_atoll", "apps", "evil", Some(record(stranger, "evil", Some(&version), 1, "", at))),
        // The trusted app's record re-signed by its key with a wider allow-list.
        entry(
            "_atoll",
            "apps",
            "kv",
            Some(record(stranger, "kv", Some(&version), 1, "allow_hosts=169.254.169.254", at)),
        ),
        // A tombstone for the app (deletes are signed records).
        entry("_atoll", "apps", "kv", None),
        // A record with no signature at all.
        entry(
            "_atoll",
            "apps",
            "evil2",
            Some(br#"{"version":null,"size":0,"params":{},"signed_at_ms":9}"#.to_vec()),
        ),
        // Another reserved namespace, and one no app can have.
        entry("_atoll", "secrets", "x", Some(b"1".to_vec())),
        entry("Not_An_App", "b", "x", Some(b"1".to_vec())),
    ];
    for attack in attacks {
        let r = push_entries(a, vec![attack], Some(PEER_SECRET), |_| {});
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // A genuine record, signed by the trusted key but older than the one here (replayed to roll
    // the app back), and one with a deadline past the bound (a valid signature does not make
    // settings valid).
    let old = record(SITE_SEED, "kv", Some(&"0".repeat(64)), 1, "", 1);
    let out_of_range = record(SITE_SEED, "kv", Some(&version), 1, &format!("deadline_ms={}", u64::MAX), at);
    // Signed with the trusted key, newer, valid: but for another cluster (staging shares the key).
    let staging = record_in("staging", SITE_SEED, "kv", Some(&version), 1, "deadline_ms=4321", at);
    for attack in [old, out_of_range, staging] {
        let r = push_entries(a, vec![entry("_atoll", "apps", "kv", Some(attack))], Some(PEER_SECRET), |_| {});
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Nothing changed: the same apps with the same settings, the data, and no evil app.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(state(a), before);
    assert_eq!(a.get("/apps/evil/").status, 404);
    let log = a.stderr();
    for reason in [
        "not in this site's admin.deploy_public_keys",
        "is not a signed record",
        "is not signed",
        "_atoll/secrets is not replicated",
        "is not an app's",
        "before the one here",
        "deadline_ms must be between",
        "signed for cluster \"staging\"",
    ] {
        assert!(log.contains(reason), "no refusal saying {reason:?} in the log:\n{log}");
    }

    // The same door lets a genuine, newer record in: the refusals above were the rules.
    let newer = record(SITE_SEED, "kv", Some(&version), 1, "deadline_ms=1234", now_ms() + 5);
    let r = push_entries(a, vec![entry("_atoll", "apps", "kv", Some(newer))], Some(PEER_SECRET), |_| {});
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(WAIT, "the genuine record applied", || {
        let app = json(&a.admin("GET", "/_atoll/apps/kv", None).body);
        (app["settings"]["deadline_ms"] == 1234).then_some(())
    });

    // Deleted, the app stays deleted: that genuine record, replayed, is older than the delete.
    assert_eq!(a.admin("DELETE", "/_atoll/apps/kv", None).status, 204);
    let replayed = record(SITE_SEED, "kv", Some(&version), 1, "deadline_ms=1234", now_ms() - 60_000);
    let r = push_entries(a, vec![entry("_atoll", "apps", "kv", Some(replayed))], Some(PEER_SECRET), |_| {});
    assert_eq!(r.status, 200, "{}", r.body);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(a.admin("GET", "/_atoll/apps/kv", None).status, 404);
}

/// Starts a site that trusts `public` and holds no deploy key.
fn verifying_site(name: &str, public: &str, peer: Option<&str>) -> Site {
    let keys = format!("[\"{public}\"]");
    let mut extra = vec![];
    if let Some(p) = peer {
        extra = vec!["--peer", p];
    }
    Site::start_with_env(
        name,
        &extra,
        Some(crate::replication::FAST),
        &[("ATOLL_ADMIN__DEPLOY_KEY_FILE", ""), ("ATOLL_ADMIN__DEPLOY_PUBLIC_KEYS", &keys)],
    )
}

#[test]
fn sites_that_hold_only_public_keys_run_only_deploys_signed_by_a_trusted_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("deploy.key");
    let wrong = dir.path().join("wrong.key");
    let out = atoll(&["keygen", "--out", key.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(public.len(), 64, "{public}");
    assert!(atoll(&["keygen", "--out", wrong.to_str().expect("path")]).status.success());
    // keygen never overwrites a key.
    assert!(!atoll(&["keygen", "--out", key.to_str().expect("path")]).status.success());

    let a = verifying_site("a", &public, None);
    let b = verifying_site("b", &public, Some(&a.url));
    let deploy = |extra: &[&str]| {
        let mut args = vec!["deploy", "--site", &a.url, "--app", "hello", atoll_test_guests::HELLO];
        args.extend_from_slice(extra);
        atoll(&args)
    };
    let unsigned = deploy(&[]);
    assert!(!unsigned.status.success());
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("403"), "{unsigned:?}");
    assert!(String::from_utf8_lossy(&unsigned.stderr).contains("signed deploys only"), "{unsigned:?}");
    let wrongly = deploy(&["--deploy-key", wrong.to_str().expect("path")]);
    assert!(String::from_utf8_lossy(&wrongly.stderr).contains("not in this site's"), "{wrongly:?}");
    assert_eq!(a.get("/apps/hello/").status, 404);

    // Signed for another cluster: refused by the CLI before anything is sent.
    let elsewhere = deploy(&["--deploy-key", key.to_str().expect("path"), "--cluster", "staging"]);
    assert!(!elsewhere.status.success());
    assert!(String::from_utf8_lossy(&elsewhere.stderr).contains("not \"staging\""), "{elsewhere:?}");
    let signed = deploy(&["--deploy-key", key.to_str().expect("path")]);
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    // Replicated to the other site, which verifies the same signature.
    eventually(WAIT, "hello served at b", || (b.get("/apps/hello/").status == 200).then_some(()));

    // Deleting is signed too.
    let delete = |extra: &[&str]| {
        let mut args = vec!["delete", "--site", &b.url, "--app", "hello"];
        args.extend_from_slice(extra);
        atoll(&args)
    };
    assert!(!delete(&[]).status.success());
    assert_eq!(a.get("/apps/hello/").status, 200);
    assert!(delete(&["--deploy-key", key.to_str().expect("path")]).status.success());
    eventually(WAIT, "hello deleted at a", || (a.get("/apps/hello/").status == 404).then_some(()));
}

#[test]
fn a_replicating_site_without_a_deploy_key_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(ATOLL)
        .args(["site", "--name", "a", "--region", "us-east", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(["--peer", "http://127.0.0.1:9"])
        .env("ATOLL_ADMIN_TOKEN", TOKEN)
        .env("ATOLL_PEER_SECRET", PEER_SECRET)
        .output()
        .expect("run atoll site");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no deploy key") && stderr.contains("atoll keygen"), "{stderr}");
}

#[test]
fn settings_out_of_range_are_refused_at_deploy() {
    let site = Site::start("a");
    let wasm = crate::read(atoll_test_guests::HELLO);
    for (query, reason) in [
        (format!("deadline_ms={}", u64::MAX), "deadline_ms"),
        ("memory_mb=1000000".to_owned(), "memory_mb"),
        (format!("max_request_body_bytes={}", u64::MAX), "max_request_body_bytes"),
        ("allow_hosts=http://x/".to_owned(), "allow_hosts"),
    ] {
        let r = site.admin("PUT", &format!("/_atoll/apps/hello?{query}"), Some(&wasm));
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.body.contains(reason), "{query}: {}", r.body);
    }
    assert_eq!(site.admin("GET", "/_atoll/apps", None).body, "[]");
}

/// A local server that counts the connections it accepts (what a guest must not reach).
fn counting_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ =
                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecret");
        }
    });
    (port.to_string(), hits)
}

#[test]
fn an_allowed_name_that_resolves_to_loopback_reaches_nothing() {
    let (port, hits) = counting_server();
    let site = Site::start("egress");
    // `localhost` is allowed by name (with the port), but resolves to loopback: refused.
    site.deploy("byname", atoll_test_guests::PROBE, &["--allow-host", &format!("localhost:{port}")]);
    // An address entry without a port allows 80 and 443 only.
    site.deploy("noport", atoll_test_guests::PROBE, &["--allow-host", "127.0.0.1"]);
    // The address named with its port is allowed: the operator said so explicitly.
    site.deploy("named", atoll_test_guests::PROBE, &["--allow-host", &format!("127.0.0.1:{port}")]);

    let by_name = site.get(&format!("/apps/byname/fetch?url=http://localhost:{port}/"));
    assert_eq!(by_name.status, 502, "{by_name:?}");
    assert!(by_name.body.contains("DestinationIpProhibited"), "{}", by_name.body);
    let no_port = site.get(&format!("/apps/noport/fetch?url=http://127.0.0.1:{port}/"));
    assert_eq!(no_port.status, 502, "{no_port:?}");
    assert!(no_port.body.contains("HttpRequestDenied"), "{}", no_port.body);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "a refused request reached the server");

    let named = site.get(&format!("/apps/named/fetch?url=http://127.0.0.1:{port}/"));
    assert_eq!((named.status, named.body.as_str()), (200, "fetched: 200\n"));
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_captured_sync_request_is_refused_when_replayed_or_sent_to_another_site() {
    use atoll_sync::message::Request;
    let sites = mesh(&["a", "b"]);
    deploy_kv(&sites);
    let (a, b) = (&sites[0], &sites[1]);
    assert_eq!(introduce_intruder(a).status, 200);
    assert_eq!(introduce_intruder(b).status, 200);
    let from = crate::replication::intruder();
    let body = atoll_sync::message::encode(&Request::Push(
        from,
        vec![entry("kv", "b", "k", Some(b"pushed".to_vec()))],
    ));
    // Captured on its way to a: signed for a, with its nonce.
    let proof = atoll_sync::auth::Secret::new(PEER_SECRET).expect("secret").sign(
        now_ms(),
        "a",
        "/_atoll/sync",
        &body,
    );
    let send = |site: &Site| {
        crate::request(
            "POST",
            &format!("{}/_atoll/sync", site.url),
            &[("x-atoll-sync-auth", &proof)],
            Some(&body),
        )
    };
    assert_eq!(send(a).status, 200);
    assert_eq!(get(a, "k").as_deref(), Some("pushed"));
    // Delete it at a, then replay the captured push: refused, the delete stands.
    // (Retried while a takes no guest writes: a site that has just met a peer, the intruder
    // here, waits up to [sync] confirm_timeout_s for it to confirm who a is.)
    eventually(WAIT, "the delete at a", || {
        let r = crate::request("DELETE", &format!("{}/apps/kv/b/k", a.url), &[], None);
        assert!(r.status == 200 || r.status == 503, "{r:?}");
        (r.status == 200).then_some(())
    });
    let replayed = send(a);
    assert_eq!(replayed.status, 409, "{}", replayed.body);
    assert!(replayed.body.contains("replay"), "{}", replayed.body);
    // Sent to b instead: signed for another site.
    let elsewhere = send(b);
    assert_eq!(elsewhere.status, 401, "{}", elsewhere.body);
    assert!(elsewhere.body.contains("another site"), "{}", elsewhere.body);
    assert_eq!(get(a, "k"), None);
    crate::replication::converge(&sites, "k", None);
}

/// A free port on 127.0.0.1 (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A request as `atoll deploy` sends it: with a body, `expect: 100-continue`, so that a refusal
/// arrives before the body is sent (a refused body is not read).
fn send_admin(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> crate::Response {
    let mut headers = headers.to_vec();
    if body.is_some() {
        headers.push(("expect", "100-continue"));
    }
    crate::request(method, url, &headers, body)
}

/// What a site serves of `app`s and records: compared before and after an attack.
fn apps_of(site_admin_url: &str) -> serde_json::Value {
    let r = crate::request(
        "GET",
        &format!("{site_admin_url}/_atoll/apps"),
        &[("authorization", &format!("Bearer {}", crate::TOKEN))],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    json(&r.body)
}

#[test]
fn the_admin_api_and_replication_are_never_reached_through_a_router() {
    let site = Site::start("behind");
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    let before = apps_of(&site.url);
    let router = crate::RouterProc::start(&[&site.url], None);
    eventually(WAIT, "the router to see the site live", || {
        (router.get("/apps/hello/", None).status == 200).then_some(())
    });
    let auth = format!("Bearer {TOKEN}");
    let wasm = std::fs::read(atoll_test_guests::PROBE).expect("guest");
    let attempts: [(&str, &str, Option<&[u8]>); 6] = [
        ("GET", "/_atoll/apps", None),
        ("PUT", "/_atoll/apps/evil", Some(&wasm)),
        ("DELETE", "/_atoll/apps/hello", None),
        ("POST", "/_atoll/sync", Some(b"anything")),
        ("GET", "/_atoll/sync/status", None),
        ("GET", "/_atoll/sync/blobs/00", None),
    ];
    for (method, path, body) in attempts {
        for host in [None, Some("hello.localhost")] {
            let mut headers = vec![("authorization", auth.as_str())];
            headers.extend(host.map(|h| ("host", h)));
            let r = send_admin(method, &format!("{}{path}", router.url), &headers, body);
            assert_eq!(r.status, 404, "{method} {path} via the router (host {host:?}): {r:?}");
            assert!(r.body.contains("never forwarded"), "{}", r.body);
            assert!(!r.headers.contains_key("x-atoll-site"), "no site answered {method} {path}");
        }
    }
    assert_eq!(apps_of(&site.url), before, "nothing changed at the site");
    assert_eq!(router.get("/apps/hello/", None).status, 200, "apps are still served through the router");
}

#[test]
fn with_an_admin_listener_the_public_one_serves_apps_and_nothing_of_the_admin_api() {
    let (a_admin, b_admin) = (free_port(), free_port());
    let a_admin_url = format!("http://127.0.0.1:{a_admin}");
    let a = Site::start_with("pub-a", &["--admin-listen", &format!("127.0.0.1:{a_admin}")], Some(FAST));
    let b = Site::start_with(
        "pub-b",
        &["--admin-listen", &format!("127.0.0.1:{b_admin}"), "--peer", &a_admin_url],
        Some(FAST),
    );
    // Deploys go to the admin listener, and replicate between the admin listeners.
    let out = atoll(&["deploy", "--site", &a_admin_url, "--app", "hello", atoll_test_guests::HELLO]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually(WAIT, "the deploy to replicate to pub-b", || {
        (b.get("/apps/hello/").status == 200).then_some(())
    });
    assert_eq!(a.get("/apps/hello/").status, 200, "apps are served on the public listener");
    assert_eq!(a.get("/_atoll/health").status, 200, "health too");
    let before = apps_of(&a_admin_url);
    // The public listener has no admin API and no replication, token or not.
    let auth = format!("Bearer {TOKEN}");
    let wasm = std::fs::read(atoll_test_guests::PROBE).expect("guest");
    for (method, path, body) in [
        ("GET", "/_atoll/apps", None),
        ("PUT", "/_atoll/apps/evil", Some(&wasm[..])),
        ("DELETE", "/_atoll/apps/hello", None),
        ("POST", "/_atoll/sync", Some(&b"anything"[..])),
        ("GET", "/_atoll/sync/blobs/00", None),
    ] {
        let r = send_admin(method, &format!("{}{path}", a.url), &[("authorization", auth.as_str())], body);
        assert_eq!(r.status, 404, "{method} {path} on the public listener: {r:?}");
        assert!(r.body.contains("admin listener"), "{}", r.body);
    }
    let out = atoll(&["deploy", "--site", &a.url, "--app", "evil", atoll_test_guests::PROBE]);
    assert!(!out.status.success(), "a deploy to the public listener fails");
    assert_eq!(apps_of(&a_admin_url), before, "nothing changed");
    assert_eq!(b.get("/apps/hello/").status, 200);
}

#[test]
fn protected_status_needs_the_token_and_wrong_tokens_are_locked_out() {
    let site = Site::start_with("guarded", &[], Some("[admin]\nprotect_status = true\n"));
    site.deploy("hello", atoll_test_guests::HELLO, &[]);
    let auth = format!("Bearer {TOKEN}");
    for path in ["/metrics", "/_atoll/ui/state", "/_atoll/sync/status", "/_atoll/router/status"] {
        let r = site.get(path);
        assert_eq!(r.status, 401, "{path} without the token: {r:?}");
        let r = crate::request("GET", &format!("{}{path}", site.url), &[("authorization", &auth)], None);
        assert_eq!(r.status, 200, "{path} with the token: {r:?}");
    }
    for path in ["/_atoll/ui/state", "/_atoll/sync/status", "/_atoll/router/status"] {
        let r = site.get_with_host("hello.localhost", path);
        assert_eq!(r.status, 401, "{path} on an app's host, without the token: {r:?}");
    }
    assert_eq!(
        site.get_with_host("hello.localhost", "/metrics").body,
        site.get("/apps/hello/metrics").body,
        "/metrics on an app's host is the app's"
    );
    assert_eq!(site.get("/_atoll/health").status, 200, "health stays open (load balancers use it)");
    assert_eq!(site.get("/_atoll/ui").status, 200, "the page itself asks for the token");
    assert_eq!(site.get("/apps/hello/").status, 200);
    // A guesser: ten wrong tokens, then even the right one is refused for a while.
    for i in 0..10 {
        let wrong = format!("Bearer guess-{i}");
        let r =
            crate::request("GET", &format!("{}/_atoll/apps", site.url), &[("authorization", &wrong)], None);
        assert_eq!(r.status, 401, "{r:?}");
    }
    let locked =
        crate::request("GET", &format!("{}/_atoll/apps", site.url), &[("authorization", &auth)], None);
    assert_eq!(locked.status, 429, "{locked:?}");
    assert!(locked.headers.contains_key("retry-after"), "{locked:?}");
    let locked = send_admin(
        "PUT",
        &format!("{}/_atoll/apps/evil", site.url),
        &[("authorization", &auth)],
        Some(&std::fs::read(atoll_test_guests::PROBE).expect("guest")),
    );
    assert_eq!(locked.status, 429, "{locked:?}");
    assert!(site.stderr().contains("locked out"), "the lockout is logged");
    assert_eq!(site.get("/apps/hello/").status, 200, "apps are served meanwhile");
    let evil = site.get("/apps/evil/");
    assert_eq!(evil.status, 404, "nothing was deployed: {evil:?}");
}

#[test]
fn forwarding_headers_from_clients_are_replaced_and_only_atoll_hops_are_believed() {
    let spoofed = [("x-forwarded-for", "6.6.6.6"), ("x-atoll-forwarded-by", "evil-router")];
    // A site that trusts no forwarder: whatever a client says, the guest sees the peer address.
    let site = Site::start_with("hops", &[], Some("[routing]\ntrusted_forwarders = []\n"));
    site.deploy("probe", atoll_test_guests::PROBE, &[]);
    let r = crate::request("GET", &format!("{}/apps/probe/headers", site.url), &spoofed, None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("x-forwarded-for: 127.0.0.1\n"), "{}", r.body);
    assert!(!r.body.contains("6.6.6.6") && !r.body.contains("evil-router"), "{}", r.body);
    assert_eq!(r.headers["x-atoll-route"], "nearest", "a client's hop header does not pin the request here");
    // Through a router the site trusts (loopback, the default): the router is the first hop. The
    // site listens on another loopback address, so that the client (127.0.0.1) is not taken
    // for it by the router (a router believes the sites it routes to).
    let behind = Site::start_with("behind-router", &["--listen", "127.0.0.2:0"], None);
    behind.deploy("probe", atoll_test_guests::PROBE, &[]);
    let router = crate::RouterProc::start(&[&behind.url], Some("[routing]\ntrusted_forwarders = []\n"));
    let r = eventually(WAIT, "the router to serve the probe", || {
        let r = crate::request("GET", &format!("{}/apps/probe/headers", router.url), &spoofed, None);
        (r.status == 200).then_some(r)
    });
    assert!(r.body.contains("x-forwarded-for: 127.0.0.1, 127.0.0.1\n"), "{}", r.body);
    assert!(r.body.contains("x-atoll-forwarded-by: router\n"), "{}", r.body);
    assert!(!r.body.contains("6.6.6.6") && !r.body.contains("evil-router"), "{}", r.body);
}

/// A hostile relay holding the peer secret between a site and its peer: it passes the site's
/// sync requests to `target` and relays the answers, until `forge` is set; from then on it
/// answers every sync request itself with `ResyncRequired` from the present moment, signed for
/// that very request (what a compromised peer, or one with a wrong view, can send).
struct HostileRelay {
    url: String,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    forge: std::sync::Arc<std::sync::atomic::AtomicBool>,
    forged: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl HostileRelay {
    fn start() -> HostileRelay {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;

        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let target = Arc::new(std::sync::Mutex::new(String::new()));
        let (forge, forged) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http::<Full<Bytes>>();
        let (t, f, n) = (target.clone(), forge.clone(), forged.clone());
        let i = Arc::new(std::sync::atomic::AtomicU64::new(0));
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (t, f, n, i, client) = (t.clone(), f.clone(), n.clone(), i.clone(), client.clone());
                let service =
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let (t, f, n, i, client) =
                            (t.clone(), f.clone(), n.clone(), i.clone(), client.clone());
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            if f.load(Ordering::SeqCst) && parts.uri.path() == "/_atoll/sync" {
                                n.fetch_add(1, Ordering::SeqCst);
                                let proof =
                                    parts.headers.get("x-atoll-sync-auth").and_then(|v| v.to_str().ok());
                                // Signed as the site it relays for, as that site's hellos name it.
                                let reply = atoll_sync::message::Reply::ResyncRequired {
                                    watermark: (now_ms(), 0),
                                    uncounted: true,
                                    site: "a".into(),
                                    incarnation: i.load(Ordering::SeqCst),
                                    horizon_ms: 7 * 24 * 3600 * 1000,
                                };
                                let bytes = atoll_sync::message::encode(&reply);
                                let secret = atoll_sync::auth::Secret::new(PEER_SECRET).expect("secret");
                                let purpose = atoll_sync::auth::Secret::reply_purpose(proof.unwrap_or(""));
                                let signed = secret.sign(now_ms(), "", &purpose, &bytes);
                                let response = hyper::Response::builder()
                                    .header("x-atoll-sync-auth", signed)
                                    .body(Full::new(Bytes::from(bytes)))
                                    .expect("response");
                                return Ok::<_, std::convert::Infallible>(response);
                            }
                            let uri = format!("{}{}", t.lock().expect("target"), parts.uri.path());
                            let mut forward = hyper::Request::builder().method(parts.method).uri(uri);
                            for (name, value) in &parts.headers {
                                forward = forward.header(name, value);
                            }
                            let forward = forward.body(Full::new(body)).expect("request");
                            let response = match client.request(forward).await {
                                Ok(response) => {
                                    let (parts, body) = response.into_parts();
                                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                    let reply =
                                        atoll_sync::message::decode::<atoll_sync::message::Reply>(&body);
                                    if let Ok(atoll_sync::message::Reply::Hello(hello)) = reply {
                                        i.store(hello.incarnation, Ordering::SeqCst);
                                    }
                                    hyper::Response::from_parts(parts, Full::new(body))
                                }
                                Err(e) => {
                                    let mut r = hyper::Response::new(Full::new(Bytes::from(e.to_string())));
                                    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                                    r
                                }
                            };
                            Ok(response)
                        }
                    });
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                });
            }
        });
        HostileRelay { url, target, forge, forged, _runtime: runtime }
    }
}

/// Site b reaches a through a relay that holds the peer secret. Once a has merged b's data, the
/// relay answers b's every sync request with `ResyncRequired` from the present moment (with the
/// old code, b dropped everything it held and stopped serving while it resynced): b refuses,
/// names the peer, keeps every key and keeps serving; when the relay stops, they converge.
#[test]
fn a_resync_demanded_by_a_peer_that_took_this_sites_data_is_refused() {
    use std::sync::atomic::Ordering;
    let relay = HostileRelay::start();
    let a = Site::start_with("a", &["--advertise", &relay.url], Some(FAST));
    *relay.target.lock().expect("target") = a.url.clone();
    let b = Site::start_with("b", &["--peer", &relay.url], Some(FAST));
    let sites = [a, b];
    deploy_kv(&sites);
    let b = &sites[1];
    put(b, "k", "v");
    crate::replication::converge(&sites, "k", Some("v"));
    // a has merged a whole anti-entropy session from b (through the relay).
    eventually(WAIT, "b's session with a", || {
        let status = json(&b.admin("GET", "/_atoll/sync/status", None).body);
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        peers.iter().any(|p| p["url"] == relay.url.as_str() && p["last_sync_ms"].is_u64()).then_some(())
    });
    relay.forge.store(true, Ordering::SeqCst);
    // b has read two forged answers (and acted on them, whatever it did).
    eventually(WAIT, "forged answers read by b", || {
        let answered =
            b.stderr().contains("within the horizon: refused") || b.stderr().contains("requires a resync");
        (answered && relay.forged.load(Ordering::SeqCst) >= 2).then_some(())
    });
    // Nothing dropped, still serving, not resyncing; the peer is flagged in the status.
    assert_eq!(get(b, "k").as_deref(), Some("v"));
    put(b, "after", "w");
    assert!(b.stderr().contains("within the horizon: refused"), "{}", b.stderr());
    assert!(!b.stderr().contains("dropped"), "{}", b.stderr());
    let status = b.admin("GET", "/_atoll/sync/status", None).body;
    assert!(status.contains("demands a resync"), "{status}");
    // What a merged is durable: b restarted (SIGKILL) still refuses, and still holds everything.
    let [a, b] = sites;
    let b = b.kill_and_restart();
    let forged = relay.forged.load(Ordering::SeqCst);
    eventually(WAIT, "the restarted b's refusal", || {
        let refused = b.stderr().contains("within the horizon: refused");
        (refused && relay.forged.load(Ordering::SeqCst) > forged).then_some(())
    });
    let held = eventually(WAIT, "k at the restarted b", || match crate::replication::try_get(&b, "k") {
        Ok(v) => Some(v),
        Err((503, body)) if !body.contains("resyncing") => None,
        Err(other) => panic!("{other:?}"),
    });
    assert_eq!(held.as_deref(), Some("v"));
    assert!(!b.stderr().contains("dropped"), "{}", b.stderr());
    let sites = [a, b];
    relay.forge.store(false, Ordering::SeqCst);
    crate::replication::converge(&sites, "after", Some("w"));
}
