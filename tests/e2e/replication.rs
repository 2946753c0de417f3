//! Replication between real site processes: deploys, writes, conflicts, counters, a killed site
//! catching up, an empty site joining, and sync requests without the peer secret.

use std::time::Duration;

use crate::{PEER_SECRET, Site, eventually, json, request};

/// Anti-entropy every 300 ms, so that catching up after a kill takes well under a second.
pub(crate) const FAST: &str = "[sync]\nanti_entropy_ms = 300\n";
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Starts `names[0]` alone and every other site with `--peer` to it.
pub(crate) fn mesh(names: &[&str]) -> Vec<Site> {
    mesh_with(names, FAST)
}

/// [`mesh`] with another configuration file.
pub(crate) fn mesh_with(names: &[&str], config: &str) -> Vec<Site> {
    let first = Site::start_with(names[0], &[], Some(config));
    let mut sites = vec![];
    for name in &names[1..] {
        sites.push(Site::start_with(name, &["--peer", &first.url], Some(config)));
    }
    sites.insert(0, first);
    sites
}

pub(crate) fn put(site: &Site, key: &str, value: &str) {
    let r = request("PUT", &format!("{}/apps/kv/b/{key}", site.url), &[], Some(value.as_bytes()));
    assert_eq!(r.status, 200, "PUT {key} at {}: {}", site.name, r.body);
}

/// A key's value at `site`: `Ok(None)` only when the guest itself found no such key (its 404
/// has an empty body; the router's 404 for an app not deployed names the app), `Err` with the
/// status and body for any other answer (a 503 while the site resyncs, say).
pub(crate) fn try_get(site: &Site, key: &str) -> Result<Option<String>, (u16, String)> {
    let r = site.get(&format!("/apps/kv/b/{key}"));
    match r.status {
        200 => Ok(Some(r.body)),
        404 if r.body.is_empty() => Ok(None),
        other => Err((other, r.body)),
    }
}

pub(crate) fn get(site: &Site, key: &str) -> Option<String> {
    try_get(site, key).unwrap_or_else(|(status, body)| panic!("GET {key} at {}: {status} {body}", site.name))
}

pub(crate) fn increment(site: &Site, key: &str) {
    let r = request("POST", &format!("{}/apps/kv/b/{key}", site.url), &[], Some(b""));
    assert_eq!(r.status, 200, "increment {key} at {}: {}", site.name, r.body);
}

/// Deploys the kv-draft guest as `kv` at `sites[0]` and waits until every site serves it.
pub(crate) fn deploy_kv(sites: &[Site]) -> String {
    sites[0].deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    let version = json(&sites[0].admin("GET", "/_atoll/apps/kv", None).body)["version"].clone();
    for site in sites {
        eventually(WAIT, &format!("kv deployed at {}", site.name), || {
            let r = site.admin("GET", "/_atoll/apps/kv", None);
            (r.status == 200 && json(&r.body)["version"] == version).then_some(())
        });
    }
    version.as_str().unwrap_or_default().to_owned()
}

pub(crate) fn converge(sites: &[Site], key: &str, expected: Option<&str>) {
    for site in sites {
        // A site may refuse reads for a while (503 while it resyncs): only its guest's answer counts.
        eventually(WAIT, &format!("{key}={expected:?} at {}", site.name), || {
            (try_get(site, key).ok()?.as_deref() == expected).then_some(())
        });
    }
}

#[test]
fn a_deploy_at_one_site_is_served_everywhere_and_a_delete_replicates() {
    let sites = mesh(&["a", "b", "c"]);
    deploy_kv(&sites);
    // Served by the other sites, with their own names in x-atoll-site.
    put(&sites[0], "k", "v");
    for site in &sites[1..] {
        let r = eventually(WAIT, "k replicated", || {
            let r = site.get("/apps/kv/b/k");
            (r.status == 200).then_some(r)
        });
        assert_eq!(
            (r.body.as_str(), r.headers["x-atoll-site"].to_str().ok()),
            ("v", Some(site.name.as_str()))
        );
    }
    // Delete at another site than the one that deployed it: gone everywhere.
    assert_eq!(sites[1].admin("DELETE", "/_atoll/apps/kv", None).status, 204);
    for site in &sites {
        eventually(WAIT, &format!("kv deleted at {}", site.name), || {
            (site.admin("GET", "/_atoll/apps/kv", None).status == 404).then_some(())
        });
    }
}

#[test]
fn writes_conflicting_sets_and_concurrent_increments_converge() {
    let sites = mesh(&["a", "b", "c"]);
    deploy_kv(&sites);
    put(&sites[0], "greeting", "hello from a");
    converge(&sites, "greeting", Some("hello from a"));

    // The same key set at a and b at the same time: one winner, the same everywhere.
    std::thread::scope(|s| {
        s.spawn(|| put(&sites[0], "contested", "from-a"));
        s.spawn(|| put(&sites[1], "contested", "from-b"));
    });
    let winner = eventually(WAIT, "one winner", || {
        let values: Vec<Option<String>> = sites.iter().map(|site| get(site, "contested")).collect();
        (values.iter().all(|v| *v == values[0]) && values[0].is_some()).then(|| values[0].clone())
    });
    assert!(matches!(winner.as_deref(), Some("from-a" | "from-b")), "{winner:?}");

    // 3 sites × 25 concurrent increments each: exactly 75 everywhere.
    std::thread::scope(|s| {
        for site in &sites {
            s.spawn(move || (0..25).for_each(|_| increment(site, "hits")));
        }
    });
    converge(&sites, "hits", Some("75"));

    // A delete replicates, and the deleted key stays deleted.
    let r = request("DELETE", &format!("{}/apps/kv/b/greeting", sites[2].url), &[], None);
    assert_eq!(r.status, 200);
    converge(&sites, "greeting", None);

    // Replication is visible: each site reports its peers, their last sync and what moved.
    let status = json(&sites[0].get("/_atoll/sync/status").body);
    let peers = status["peers"].as_array().expect("peers");
    for name in ["b", "c"] {
        let peer = peers.iter().find(|p| p["site"] == name).unwrap_or_else(|| panic!("{name} in {status}"));
        assert!(peer["last_sync_ms"].is_u64(), "{peer}");
        assert!(peer["entries_received"].as_u64() > Some(0), "{peer}");
        assert!(peer["bytes_sent"].as_u64() > Some(0), "{peer}");
    }
    assert!(sites[0].get("/apps/kv/b/hits").headers.contains_key("x-atoll-hlc"));
}

#[test]
fn a_killed_site_catches_up_and_an_empty_site_joins_with_everything() {
    let mut sites = mesh(&["a", "b", "c"]);
    deploy_kv(&sites);
    put(&sites[0], "before", "1");
    converge(&sites, "before", Some("1"));

    sites[1].kill();
    for i in 0..20 {
        put(&sites[0], &format!("from-a-{i}"), "a");
        put(&sites[2], &format!("from-c-{i}"), "c");
    }
    let b = sites.remove(1).kill_and_restart();
    for i in 0..20 {
        converge(std::slice::from_ref(&b), &format!("from-a-{i}"), Some("a"));
        converge(std::slice::from_ref(&b), &format!("from-c-{i}"), Some("c"));
    }

    // A new site with an empty data dir, knowing only c, gets the app and every key.
    let d = Site::start_with("d", &["--peer", &sites[1].url], Some(FAST));
    eventually(WAIT, "kv deployed at d", || {
        (d.admin("GET", "/_atoll/apps/kv", None).status == 200).then_some(())
    });
    converge(std::slice::from_ref(&d), "before", Some("1"));
    for i in 0..20 {
        converge(std::slice::from_ref(&d), &format!("from-a-{i}"), Some("a"));
        converge(std::slice::from_ref(&d), &format!("from-c-{i}"), Some("c"));
    }
    // d learned a and b through c.
    let status = json(&d.get("/_atoll/sync/status").body);
    for name in ["a", "b", "c"] {
        assert!(
            status["peers"].as_array().expect("peers").iter().any(|p| p["site"] == name),
            "{name}: {status}"
        );
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as u64
}

/// A push of `key`=`value` for app `kv` from site "intruder", stamped `at` (unix ms), signed with
/// `secret` (None: unsigned).
fn push(
    site: &Site,
    key: &str,
    value: &str,
    secret: Option<&str>,
    mangle: impl Fn(&mut Vec<u8>),
) -> crate::Response {
    push_at(site, key, value, u64::MAX / 2, secret, mangle)
}

fn push_at(
    site: &Site,
    key: &str,
    value: &str,
    at: u64,
    secret: Option<&str>,
    mangle: impl Fn(&mut Vec<u8>),
) -> crate::Response {
    use atoll_kv::{Entry, Hlc, Namespace, Stamp};
    use atoll_sync::message::WireEntry;
    let ns = Namespace::new("kv", "b", &atoll_kv::Bounds::default()).expect("ns");
    let stamp = Stamp { hlc: Hlc { physical_ms: at, logical: 0 }, site: "intruder~1".into() };
    let entry = Entry::set(value.as_bytes().to_vec(), stamp);
    push_entries(site, vec![WireEntry::new(ns.key(key.as_bytes()), &entry)], secret, mangle)
}

/// Pushes `entries` as the site "intruder" (see [`introduce_intruder`]).
pub(crate) fn push_entries(
    site: &Site,
    entries: Vec<atoll_sync::message::WireEntry>,
    secret: Option<&str>,
    mangle: impl Fn(&mut Vec<u8>),
) -> crate::Response {
    let request = atoll_sync::message::Request::Push(intruder(), entries);
    send_sync(site, &request, secret, mangle)
}

/// The site "intruder" as a push names it.
pub(crate) fn intruder() -> atoll_sync::message::Sender {
    atoll_sync::message::Sender {
        site: "intruder".into(),
        incarnation: 1,
        boot: 1,
        boot_nonce: 1,
        durable: (now_ms(), 0),
        resyncing: false,
        // How far back its data reaches: what its hello below says too.
        since: (1, 0),
    }
}

/// Says hello as the site "intruder", which holds the peer secret (a compromised peer).
pub(crate) fn introduce_intruder(site: &Site) -> crate::Response {
    send_sync(site, &atoll_sync::message::Request::Hello(intruder_hello()), Some(PEER_SECRET), |_| {})
}

/// The hello of the site "intruder" (see [`introduce_intruder`]).
pub(crate) fn intruder_hello() -> atoll_sync::message::Hello {
    use atoll_sync::message::{Hello, PeerInfo};
    let now = now_ms();
    Hello {
        me: PeerInfo { site: "intruder".into(), region: "us-east".into(), url: "http://127.0.0.1:9".into() },
        peers: vec![],
        wall_ms: now,
        incarnation: 1,
        previous_incarnation: 0,
        boot: 1,
        boot_nonce: 1,
        opened_at: (now, 0),
        boots: vec![],
        durable: (now, 0),
        since: (1, 0),
        resyncing: false,
        seen: vec![],
    }
}

/// Sends `message` to `site` signed with the peer secret, as a peer would, and decodes the reply.
pub(crate) fn sync_reply(site: &Site, message: &atoll_sync::message::Request) -> atoll_sync::message::Reply {
    let body = atoll_sync::message::encode(message);
    let proof = atoll_sync::auth::Secret::new(PEER_SECRET).expect("secret").sign(
        now_ms(),
        &site.name,
        "/_atoll/sync",
        &body,
    );
    let call = http::Request::builder()
        .method("POST")
        .uri(format!("{}/_atoll/sync", site.url))
        .header("x-atoll-sync-auth", proof)
        .body(body)
        .expect("request");
    let mut response = crate::agent(Duration::from_secs(30)).run(call).expect("sync request");
    assert_eq!(response.status(), 200, "a sync request to {}", site.name);
    let bytes = response.body_mut().read_to_vec().expect("the reply");
    atoll_sync::message::decode(&bytes).expect("a reply")
}

/// Sends a sync request signed with `secret` (None: unsigned), its encoding changed by `mangle`.
fn send_sync(
    site: &Site,
    message: &atoll_sync::message::Request,
    secret: Option<&str>,
    mangle: impl Fn(&mut Vec<u8>),
) -> crate::Response {
    let mut body = atoll_sync::message::encode(message);
    mangle(&mut body);
    let proof = secret.map(|s| {
        atoll_sync::auth::Secret::new(s).expect("secret").sign(now_ms(), &site.name, "/_atoll/sync", &body)
    });
    let mut headers = vec![];
    if let Some(p) = &proof {
        headers.push(("x-atoll-sync-auth", p.as_str()));
    }
    if body.len() > atoll_sync::message::MAX_MESSAGE {
        // The site refuses it by the length its proof signs, before reading it: the refusal
        // arrives before the body is sent.
        headers.push(("expect", "100-continue"));
    }
    request("POST", &format!("{}/_atoll/sync", site.url), &headers, Some(&body))
}

/// What a reply looks like in a (lossily decoded) response body.
fn reply_body(reply: &atoll_sync::message::Reply) -> String {
    String::from_utf8_lossy(&atoll_sync::message::encode(reply)).into_owned()
}

#[test]
fn sync_requests_without_valid_proof_or_well_formed_body_are_refused_and_change_nothing() {
    let sites = mesh(&["a"]);
    deploy_kv(&sites);
    let a = &sites[0];
    put(a, "k", "original");

    let unsigned = push(a, "k", "forged", None, |_| {});
    assert_eq!(unsigned.status, 401, "{}", unsigned.body);
    assert!(unsigned.body.contains("missing"), "{}", unsigned.body);
    let wrong = push(a, "k", "forged", Some("not-the-peer-secret-at-all"), |_| {});
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(wrong.body.contains("signature"), "{}", wrong.body);
    assert_eq!(get(a, "k").as_deref(), Some("original"));

    // Properly signed but not a valid message: 400 with the reason.
    let version = push(a, "k", "forged", Some(PEER_SECRET), |b| b[0] = 99);
    assert_eq!(version.status, 400, "{}", version.body);
    assert!(version.body.contains("version 99"), "{}", version.body);
    let truncated = push(a, "k", "forged", Some(PEER_SECRET), |b| b.truncate(b.len() - 3));
    assert_eq!(truncated.status, 400, "{}", truncated.body);
    let oversized = push(a, "k", "forged", Some(PEER_SECRET), |b| b.resize(33 << 20, 0));
    assert_eq!(oversized.status, 413, "{}", oversized.body);
    assert!(oversized.body.contains("over the limit"), "{}", oversized.body);
    assert_eq!(get(a, "k").as_deref(), Some("original"));

    // Properly signed, but from a site never introduced: it must say hello first.
    use atoll_sync::message::Reply;
    let stranger = push_at(a, "k", "pushed", now_ms(), Some(PEER_SECRET), |_| {});
    assert_eq!((stranger.status, stranger.body), (200, reply_body(&Reply::Introduce)));
    assert_eq!(get(a, "k").as_deref(), Some("original"));
    let introduced = introduce_intruder(a);
    assert_eq!(introduced.status, 200, "{}", introduced.body);
    // Introduced, but stamped far past this site's clock: not merged, and the reason is given.
    let ahead = push(a, "k", "forged", Some(PEER_SECRET), |_| {});
    assert_eq!(ahead.status, 200, "{}", ahead.body);
    assert!(ahead.body.contains("clock bound"), "{}", ahead.body);
    assert_eq!(get(a, "k").as_deref(), Some("original"));

    // The same push, introduced, stamped now and signed right, is taken: the refusals above
    // were the proof, not luck.
    let signed = push_at(a, "k", "pushed", now_ms(), Some(PEER_SECRET), |_| {});
    assert_eq!(signed.status, 200, "{}", signed.body);
    assert_eq!(get(a, "k").as_deref(), Some("pushed"));
}
