//! The faults operators meet, with real processes: a site away past the horizon while the others
//! restart, a data dir restored from an older copy, a clock an hour fast, and kills at random
//! under load (chaos). Each test tries to break a promise of ALGORITHM.md and checks it held.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::replication::{
    FAST, WAIT, converge, deploy_kv, get, intruder_hello, mesh, mesh_with, put, sync_reply, try_get,
};
use crate::{Site, eventually, json, request};

/// An increment of `key` at `site`: `Some(total)` if acknowledged.
fn try_increment(site: &Site, key: &str) -> Option<i64> {
    let r = request("POST", &format!("{}/apps/kv/b/{key}", site.url), &[], Some(b""));
    (r.status == 200).then(|| r.body.trim().parse().ok()).flatten()
}

fn try_put(site: &Site, key: &str, value: &str) -> bool {
    request("PUT", &format!("{}/apps/kv/b/{key}", site.url), &[], Some(value.as_bytes())).status == 200
}

fn try_delete(site: &Site, key: &str) -> bool {
    request("DELETE", &format!("{}/apps/kv/b/{key}", site.url), &[], None).status == 200
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The scenario of issue 11: `k` deleted while C is away past the horizon, its tombstone
/// collected, A and B restarted (a rolling upgrade), C back on its old data dir. Before the fix
/// `k` read `v` again at all three sites; now C is told to resync, drops what it held from
/// before the watermark, and nothing deleted comes back anywhere, at any moment.
#[test]
fn a_deleted_key_stays_deleted_when_a_site_away_past_the_horizon_returns_after_a_rolling_restart() {
    let config = "[sync]\nanti_entropy_ms = 300\nhorizon_s = 4\ncollect_interval_s = 1\n";
    let mut sites = mesh_with(&["a", "b", "c"], config);
    deploy_kv(&sites);
    put(&sites[0], "k", "v");
    put(&sites[2], "written-at-c-before", "x");
    converge(&sites, "k", Some("v"));
    converge(&sites, "written-at-c-before", Some("x"));

    let mut c = sites.pop().expect("c");
    c.kill();
    let r = request("DELETE", &format!("{}/apps/kv/b/k", sites[0].url), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    converge(&sites, "k", None);
    // A and B cut C off and collect the tombstone (acknowledgements mature after the signature
    // window of 60 s).
    for site in &sites {
        eventually(Duration::from_secs(120), &format!("{} collected the tombstone", site.name), || {
            let log = site.stderr();
            (log.contains("cut off") && log.contains("collected tombstones")).then_some(())
        });
    }
    // A rolling restart of A and B, then C on its old data dir.
    let b = sites.pop().expect("b").kill_and_restart();
    let a = sites.pop().expect("a").kill_and_restart();
    let c = c.kill_and_restart();
    let all = [a, b, c];
    // For several seconds, no site ever serves the deleted value (C may refuse reads with 503
    // while it resyncs; any other answer is a failure).
    let until = Instant::now() + Duration::from_secs(8);
    let mut answered = [0; 3];
    while Instant::now() < until {
        for (site, n) in all.iter().zip(&mut answered) {
            match try_get(site, "k") {
                Ok(value) => {
                    assert_eq!(value, None, "k came back at {}", site.name);
                    *n += 1;
                }
                Err((503, _)) => {}
                Err((status, body)) => panic!("GET k at {}: {status} {body}", site.name),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answered[..2].iter().all(|&n| n > 0), "A and B answered: {answered:?}");
    converge(&all, "k", None);
    assert!(all[2].stderr().contains("resyncing"), "C resynced: {}", all[2].stderr());
    // The price, documented: C's writes older than the watermark were dropped at C, but this
    // one had reached the others before C left, so it is back everywhere.
    converge(&all, "written-at-c-before", Some("x"));
    // C is a full member again: its new writes replicate.
    eventually(WAIT, "a write at C", || try_put(&all[2], "after", "y").then_some(()));
    converge(&all, "after", Some("y"));
    // A and B still know C is the same site (by name and incarnation), whatever its URL.
    let status = json(&all[0].get("/_atoll/sync/status").body);
    let c_peer = status["peers"].as_array().expect("peers").iter().find(|p| p["site"] == "c").cloned();
    assert_eq!(c_peer.as_ref().map(|p| p["cut_off"].clone()), Some(false.into()), "{status}");
}

/// C's data dir restored from a copy taken mid-workload: every acknowledged increment and write,
/// at any site, before or after the copy, before or after the restore, is still counted.
#[test]
fn a_site_restored_from_an_older_copy_of_its_data_dir_loses_nothing_anywhere() {
    let mut sites = mesh(&["a", "b", "c"]);
    deploy_kv(&sites);
    let mut acked: i64 = 0;
    let mut keys = Vec::new();
    let work = |sites: &[Site], round: &str, acked: &mut i64, keys: &mut Vec<String>| {
        for (i, site) in sites.iter().enumerate() {
            for n in 0..5 {
                // Refused (503) while the site waits for its peers or resyncs: retried.
                eventually(WAIT, "an increment", || try_increment(site, "n"));
                *acked += 1;
                let key = format!("{round}-{i}-{n}");
                eventually(WAIT, "a write", || try_put(site, &key, "v").then_some(()));
                keys.push(key);
            }
        }
    };
    work(&sites, "first", &mut acked, &mut keys);
    // A copy of C's data dir, taken while the site is stopped at an arbitrary point.
    let mut c = sites.pop().expect("c");
    c.kill();
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(&c.data, copy.path());
    let c = c.kill_and_restart();
    sites.push(c);
    work(&sites, "second", &mut acked, &mut keys);
    // Everything replicated; C's disk goes back to the copy.
    for key in &keys {
        converge(&sites, key, Some("v"));
    }
    converge(&sites, "n", Some(&acked.to_string()));
    let mut c = sites.pop().expect("c");
    c.kill();
    std::fs::remove_dir_all(&c.data).expect("remove data dir");
    copy_dir(copy.path(), &c.data);
    let c = c.kill_and_restart();
    sites.push(c);
    work(&sites, "third", &mut acked, &mut keys);
    converge(&sites, "n", Some(&acked.to_string()));
    for key in &keys {
        converge(&sites, key, Some("v"));
    }
    let log = sites[2].stderr();
    assert!(log.contains("took a new incarnation"), "C learned it ran on an older copy: {log}");
}

/// A site whose clock is an hour fast (libfaketime, Debian's `faketime` package) is flagged by
/// its peers, takes no guest write (503 naming its clock) and cannot make a later write at
/// another site disappear.
#[test]
fn a_site_with_a_clock_an_hour_fast_is_flagged_and_cannot_override_later_writes() {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    let Some(lib) = lib else {
        assert!(std::env::var_os("CI").is_none(), "libfaketime is missing (apt-get install faketime)");
        eprintln!("skipped: libfaketime is missing (apt-get install faketime)");
        return;
    };
    let sites = mesh(&["a", "b"]);
    deploy_kv(&sites);
    put(&sites[0], "k", "before");
    let fast = Site::start_with_env(
        "fast",
        &["--peer", &sites[0].url, "--peer", &sites[1].url],
        Some(FAST),
        &[("LD_PRELOAD", lib), ("FAKETIME", "+1h"), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")],
    );
    // Its peers measure the offset and show it.
    for site in &sites {
        eventually(WAIT, "the offset measured", || {
            let status = json(&site.get("/_atoll/sync/status").body);
            let peer = status["peers"].as_array()?.iter().find(|p| p["site"] == "fast")?.clone();
            (peer["clock_offset_ms"].as_i64()? > 3_000_000 && peer["flag"].as_str()?.contains("clock"))
                .then_some(())
        });
    }
    // Nothing replicates to it (not even deploys): the app is deployed there by hand.
    fast.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    // It knows its clock is off and takes no write, saying why.
    let refused = eventually(WAIT, "the fast site refuses writes", || {
        let r = request("PUT", &format!("{}/apps/kv/b/k", fast.url), &[], Some(b"from-the-future"));
        (r.status == 503 && r.body.contains("clock")).then_some(r.body)
    });
    assert!(refused.contains("clock is off"), "{refused}");
    let health = json(&fast.get("/_atoll/health").body);
    assert_eq!(health["ready"], false, "{health}");
    // A later write at another site stands everywhere.
    put(&sites[1], "k", "after");
    converge(&sites, "k", Some("after"));
    std::thread::sleep(Duration::from_secs(1));
    converge(&sites, "k", Some("after"));
    assert_eq!(try_get(&fast, "k"), Ok(None), "nothing was exchanged with the fast site");
    // The offset is in /metrics too.
    let metrics = sites[0].get("/metrics").body;
    assert!(
        metrics.lines().any(|l| l.starts_with("atoll_sync_peer_clock_offset_ms") && l.contains("fast")),
        "{metrics}"
    );
}

/// Two live sites with the same name (a second data dir started by mistake): the newcomer is
/// refused and says so, the first keeps replicating, and nothing either wrote is confused.
#[test]
fn a_second_live_site_with_the_same_name_is_refused_and_logged() {
    let sites = mesh(&["a", "x"]);
    deploy_kv(&sites);
    put(&sites[1], "from-x", "1");
    converge(&sites, "from-x", Some("1"));
    let twin = Site::start_with("x", &["--peer", &sites[0].url], Some(FAST));
    twin.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    let refused = eventually(WAIT, "the twin refused", || {
        let r = request("PUT", &format!("{}/apps/kv/b/from-twin", twin.url), &[], Some(b"2"));
        (r.status == 503 && r.body.contains("refused")).then_some(r.body)
    });
    assert!(refused.contains("second live site"), "{refused}");
    assert!(sites[0].stderr().contains("second live site"), "{}", sites[0].stderr());
    // The first x is untouched.
    put(&sites[1], "from-x-after", "3");
    converge(&sites, "from-x-after", Some("3"));
}

/// Chaos: three sites, clients writing at random sites (increments, register writes, deletes),
/// a site SIGKILLed and restarted on its address and data dir every few seconds. At the end every
/// site holds the same state, each counter is within [acknowledged, attempted], no acknowledged
/// delete came back, and the last acknowledged write of each key is there. `ATOLL_CHAOS_SECS`
/// sets the length (default 15; `cargo xtask chaos` runs it for minutes).
#[test]
fn chaos_kills_under_load_lose_nothing_acknowledged() {
    let secs: u64 = std::env::var("ATOLL_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let mut sites = mesh(&["a", "b", "c"]);
    deploy_kv(&sites);
    let mut rng = fastrand::Rng::with_seed(
        std::env::var("ATOLL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7),
    );
    let (mut acked, mut attempted) = (BTreeMap::<String, i64>::new(), BTreeMap::<String, i64>::new());
    // Per register key: the last acknowledged state (Some(value) or None for a delete), and
    // whether a write to it failed since (then its outcome is unknown).
    let mut last: BTreeMap<String, (Option<String>, bool)> = BTreeMap::new();
    let (mut kills, mut ops) = (0, 0);
    let start = Instant::now();
    let mut next_kill = start + Duration::from_secs(2);
    while start.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_kill {
            let i = rng.usize(..sites.len());
            let site = sites.remove(i).kill_and_restart();
            sites.insert(i, site);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.u64(1_500..4_000));
        }
        let site = &sites[rng.usize(..sites.len())];
        ops += 1;
        match rng.u8(..10) {
            0..=4 => {
                let key = format!("n{}", rng.u8(..3));
                *attempted.entry(key.clone()).or_default() += 1;
                if try_increment(site, &key).is_some() {
                    *acked.entry(key).or_default() += 1;
                }
            }
            5..=7 => {
                let key = format!("r{}", rng.u8(..5));
                let value = format!("v{ops}");
                let ok = try_put(site, &key, &value);
                let entry = last.entry(key).or_insert((None, false));
                if ok {
                    *entry = (Some(value), false)
                } else {
                    entry.1 = true
                }
                // Sequential writes at different sites are ordered by their clocks: never two
                // in one millisecond.
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {
                let key = format!("r{}", rng.u8(..5));
                let ok = try_delete(site, &key);
                let entry = last.entry(key).or_insert((None, false));
                if ok {
                    *entry = (None, false)
                } else {
                    entry.1 = true
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    // Quiet: everyone converges.
    for (key, (value, unknown)) in &last {
        if !unknown {
            converge(&sites, key, value.as_deref());
        }
    }
    for (key, &n) in &acked {
        let max = attempted[key];
        for site in &sites {
            eventually(WAIT, &format!("{key} settled at {}", site.name), || {
                let got: i64 = try_get(site, key).ok()??.parse().ok()?;
                (n..=max).contains(&got).then_some(())
            });
        }
    }
    for key in last.keys().chain(acked.keys()) {
        let first = get(&sites[0], key);
        converge(&sites[1..], key, first.as_deref());
    }
    eprintln!("chaos: {secs} s, {kills} kills, {ops} operations; every check held");
}

/// A hello a site sent just before it was SIGKILLed that reaches a peer only after the restarted
/// site's own hello (held up on a slow link, or answered late by a busy peer) says nothing of the
/// site now: the peer must not take it for an older copy of the data dir, which would make the
/// live site reincarnate and resync, dropping its increments no peer holds yet (the long
/// simulation's seed 2252).
#[test]
fn a_hello_held_up_past_its_senders_restart_does_not_make_it_reincarnate() {
    use atoll_sync::message::{Reply, Request};
    let mut sites = mesh(&["a", "b"]);
    deploy_kv(&sites);
    // a's hello as it is now (its answer to a hello), held back.
    let Reply::Hello(held) = sync_reply(&sites[0], &Request::Hello(intruder_hello())) else {
        panic!("a did not answer a hello with its own")
    };
    let a = sites.remove(0).kill_and_restart();
    let b = &sites[0];
    // b has heard a's new boot: a write made at a since its restart reaches b. (a takes writes
    // once its peers confirmed it, or after the confirmation timeout: the intruder never will.)
    eventually(WAIT, "a takes writes again", || try_put(&a, "after-restart", "1").then_some(()));
    converge(std::slice::from_ref(b), "after-restart", Some("1"));
    // The held-up hello arrives now, within the signature window.
    let reply = sync_reply(b, &Request::Hello(held));
    assert_eq!(reply, Reply::Introduce, "b took a's previous boot's hello for an older copy");
    put(&a, "later", "1");
    converge(std::slice::from_ref(b), "later", Some("1"));
    assert!(!a.stderr().contains("took a new incarnation"), "a was made to reincarnate: {}", a.stderr());
}
