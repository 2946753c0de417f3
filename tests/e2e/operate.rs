//! Operating a cluster: `atoll kv` (an app's data through the admin API, written as guests write
//! and replicated like any write).

use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::replication::{WAIT, mesh};
use crate::{ATOLL, TOKEN, atoll, eventually, json, request};

fn ok(args: &[&str]) -> Vec<u8> {
    let out = atoll(args);
    assert!(out.status.success(), "atoll {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn refused(args: &[&str]) -> String {
    let out = atoll(args);
    assert!(!out.status.success(), "atoll {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn atoll_kv_writes_as_a_guest_does_and_reads_say_where_and_how_fresh() {
    let sites = mesh(&["ops-a", "ops-b"]);
    let (a, b) = (&sites[0], &sites[1]);
    a.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    eventually(WAIT, "the deploy reaches ops-b", || (b.get("/apps/kv/b/x").status == 404).then_some(()));
    let at = |site: &crate::Site| site.url.clone();
    let kv = |site: &crate::Site, op: &str, rest: &[&str]| -> Vec<String> {
        let mut args = vec!["kv".to_owned(), op.to_owned(), "--site".to_owned(), at(site)];
        args.extend(["--app", "kv", "--bucket", "b"].map(str::to_owned));
        args.extend(rest.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Set at ops-a, read by the guest at ops-b.
    run(kv(a, "set", &["greeting", "hello"]));
    eventually(WAIT, "the tool's write reaches the guest at ops-b", || {
        (b.get("/apps/kv/b/greeting").body == "hello").then_some(())
    });
    // A file's bytes, exactly (not UTF-8), and stdin's.
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let file = dir.path().join("value.bin");
    std::fs::write(&file, &bytes).expect("write");
    run(kv(a, "set", &["blob", "--file", file.to_str().expect("utf-8")]));
    assert_eq!(run(kv(a, "get", &["blob"])), bytes, "raw bytes out as they went in");
    let mut child = Command::new(ATOLL)
        .args(kv(a, "set", &["piped"]))
        .env("ATOLL_ADMIN_TOKEN", TOKEN)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("atoll kv set");
    child.stdin.take().expect("stdin").write_all(b"from stdin").expect("write");
    assert!(child.wait().expect("wait").success());
    assert_eq!(a.get("/apps/kv/b/piped").body, "from stdin", "the guest reads what the tool wrote");

    // A counter: the tool's increments and a guest's at the other site add up; --json shows
    // both writers' parts, the answering site and its peer's lag.
    assert_eq!(String::from_utf8(run(kv(a, "incr", &["hits", "--by", "5"]))).expect("utf-8"), "5\n");
    eventually(WAIT, "the increment reaches ops-b", || (b.get("/apps/kv/b/hits").body == "5").then_some(()));
    assert_eq!(request("POST", &format!("{}/apps/kv/b/hits?by=2", b.url), &[], Some(b"")).body, "7");
    let shown = eventually(WAIT, "both parts at ops-a", || {
        let shown = json(&String::from_utf8(run(kv(a, "get", &["hits", "--json"]))).expect("utf-8"));
        (shown["value"] == "7").then_some(shown)
    });
    assert_eq!(shown["site"], "ops-a");
    let parts = shown["counter"].as_array().expect("parts");
    let writers: Vec<&str> = parts
        .iter()
        .map(|p| p["writer"].as_str().expect("writer").split('~').next().expect("name"))
        .collect();
    assert_eq!(writers, ["ops-a", "ops-b"], "{shown}");
    let ups: Vec<u64> = parts.iter().map(|p| p["up"].as_u64().expect("up")).collect();
    assert_eq!(ups, [5, 2]);
    let fresh = shown["freshness"].as_array().expect("freshness");
    assert!(fresh.iter().any(|p| p["site"] == "ops-b" && p["lag_ms"].is_u64()), "{shown}");
    assert!(shown["stamp"]["hlc"].as_str().is_some_and(|h| h.contains('.')), "{shown}");

    // Delete: a tombstone that replicates.
    run(kv(b, "delete", &["greeting"]));
    eventually(WAIT, "the delete reaches ops-a", || {
        (a.get("/apps/kv/b/greeting").status == 404).then_some(())
    });
    let gone = json(&String::from_utf8(run(kv(a, "get", &["greeting", "--json"]))).expect("utf-8"));
    assert_eq!(
        (gone["deleted"].as_bool(), gone["stamp"]["writer"].as_str().map(|w| w.starts_with("ops-b"))),
        (Some(true), Some(true))
    );

    // Every bad input is a clear error, and changes nothing.
    let e = refused(&["kv", "get", "--site", &at(a), "--app", "kv", "--bucket", "b", "nope"]);
    assert!(e.contains("no key \"nope\""), "{e}");
    let e = refused(&["kv", "get", "--site", &at(a), "--app", "ghost", "hits"]);
    assert!(e.contains("no app named \"ghost\""), "{e}");
    let e = refused(&["kv", "incr", "--site", &at(a), "--app", "kv", "--bucket", "b", "piped"]);
    assert!(e.contains("409") && e.contains("not a decimal integer"), "{e}");
    let e = refused(&["kv", "incr", "--site", &at(a), "--app", "kv", "--bucket", "b", "hits", "--by", "x"]);
    assert!(e.contains("invalid value 'x'"), "{e}");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; (1 << 20) + 1]).expect("write");
    let e = refused(&[
        "kv",
        "set",
        "--site",
        &at(a),
        "--app",
        "kv",
        "--bucket",
        "b",
        "piped",
        "--file",
        big.to_str().expect("utf-8"),
    ]);
    assert!(e.contains("413"), "{e}");
    let out = Command::new(ATOLL)
        .args(["kv", "set", "--site", &at(a), "--app", "kv", "--bucket", "b", "piped", "stolen"])
        .env_remove("ATOLL_ADMIN_TOKEN")
        .output()
        .expect("atoll kv");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing admin token"));
    // HEAD reads (never deletes); another method is refused.
    let auth = format!("Bearer {TOKEN}");
    let head = request(
        "HEAD",
        &format!("{}/_atoll/apps/kv/kv/piped?bucket=b", a.url),
        &[("authorization", &auth)],
        None,
    );
    assert_eq!(head.status, 200);
    let patch = request(
        "PATCH",
        &format!("{}/_atoll/apps/kv/kv/piped?bucket=b", a.url),
        &[("authorization", &auth)],
        Some(b"x"),
    );
    assert_eq!(patch.status, 405);
    assert_eq!(a.get("/apps/kv/b/piped").body, "from stdin", "nothing refused was written");
    assert_eq!(a.get("/apps/kv/b/hits").body, "7");
}

#[test]
fn atoll_kv_lists_ten_thousand_keys_in_pages() {
    let sites = mesh(&["list-a"]);
    let a = &sites[0];
    a.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    // 10,000 keys through the admin API, from four clients at once (group commit).
    let url = a.url.clone();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = crate::agent(std::time::Duration::from_secs(30));
                for i in (w..10_000).step_by(4) {
                    let r = agent
                        .put(format!("{url}/_atoll/apps/kv/kv/key{i:05}?bucket=b"))
                        .header("authorization", format!("Bearer {TOKEN}"))
                        .send(b"v".as_slice())
                        .expect("put");
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let base = ["kv", "list", "--site", &a.url, "--app", "kv", "--bucket", "b"];
    let all = String::from_utf8(ok(&base)).expect("utf-8");
    let expected: Vec<String> = (0..10_000).map(|i| format!("key{i:05}")).collect();
    assert_eq!(all.lines().collect::<Vec<_>>(), expected, "every key once, in order, across ten pages");
    // One page, and where the next begins.
    let out = atoll(&[&base[..], &["--limit", "250", "--after", "key00999"]].concat());
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(page.lines().collect::<Vec<_>>(), expected[1000..1250]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--after \"key01249\""));
    // A prefix, as JSON.
    let listed = json(
        &String::from_utf8(ok(&[&base[..], &["--prefix", "key099", "--json"]].concat())).expect("utf-8"),
    );
    assert_eq!(listed["keys"].as_array().map(Vec::len), Some(100));
    assert_eq!(listed["next"], serde_json::Value::Null);
    assert_eq!(listed["site"], "list-a");
}

/// What a site pulled from its peers so far (payload bytes received, all peers).
fn pulled(site: &crate::Site) -> u64 {
    let status = json(&site.get("/_atoll/sync/status").body);
    status["peers"].as_array().expect("peers").iter().filter_map(|p| p["bytes_received"].as_u64()).sum()
}

/// The acknowledged count of each writer's key, read at `site` (`None` until it holds them all).
fn holds(site: &crate::Site, acked: &[(String, u64)]) -> bool {
    acked.iter().all(|(key, n)| site.get(&format!("/apps/kv/b/{key}")).body == n.to_string())
}

#[test]
fn a_backup_taken_under_load_seeds_new_sites_and_restores_its_own_losing_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut sites = mesh(&["bk-a", "bk-b"]);
    let mut b = sites.pop().expect("bk-b");
    let a = sites.pop().expect("bk-a");
    a.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    eventually(WAIT, "the deploy reaches bk-b", || (b.get("/apps/kv/b/x").status == 404).then_some(()));
    // Bulk data: 2,000 values of 1 KiB, which a seeded site need not pull again.
    let value = vec![b'v'; 1024];
    for i in 0..2000 {
        let r = request("PUT", &format!("{}/apps/kv/bulk/k{i}", a.url), &[], Some(&value));
        assert_eq!(r.status, 200);
    }
    // A writer at each site counts its acknowledged increments.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let writers: Vec<_> = [a.url.clone(), b.url.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, url)| {
            let (stop, count) = (stop.clone(), counts[w].clone());
            std::thread::spawn(move || {
                let agent = crate::agent(std::time::Duration::from_secs(10));
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = agent.post(format!("{url}/apps/kv/b/w{w}")).send_empty()
                        && r.status() == 200
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    eventually(WAIT, "writes under way", || {
        counts.iter().all(|c| c.load(Ordering::Relaxed) > 50).then_some(())
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bk-b.backup");
    let out = ok(&["backup", "--site", &b.url, "--out", file.to_str().expect("utf-8")]);
    let said = String::from_utf8_lossy(&out).into_owned();
    assert!(said.contains("backup of bk-b") && said.contains("MiB/s"), "{said}");
    let at_backup: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    eventually(WAIT, "more writes after the backup", || {
        counts.iter().zip(&at_backup).all(|(c, at)| c.load(Ordering::Relaxed) > at + 50).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    let acked: Vec<(String, u64)> =
        counts.iter().enumerate().map(|(w, c)| (format!("w{w}"), c.load(Ordering::Relaxed))).collect();
    eventually(WAIT, "both sites hold every acknowledged increment", || {
        (holds(&a, &acked) && holds(&b, &acked)).then_some(())
    });

    // A new site seeded from the backup catches up by anti-entropy; an empty one pulls it all.
    let seed = file.to_str().expect("utf-8");
    let c =
        crate::Site::start_with("bk-c", &["--peer", &a.url, "--seed", seed], Some(crate::replication::FAST));
    eventually(WAIT, "bk-c holds every acknowledged write", || holds(&c, &acked).then_some(()));
    assert_eq!(c.get("/apps/kv/bulk/k1999").body.len(), 1024, "the backup's data is there");
    let d = crate::Site::start_with("bk-d", &["--peer", &a.url], Some(crate::replication::FAST));
    eventually(WAIT, "bk-d holds every acknowledged write", || {
        (holds(&d, &acked) && d.get("/apps/kv/bulk/k1999").status == 200).then_some(())
    });
    let (seeded, empty) = (pulled(&c), pulled(&d));
    eprintln!("bytes pulled to catch up: seeded {seeded}, empty join {empty}");
    assert!(seeded * 4 < empty, "a seeded site pulls far less: seeded {seeded}, empty {empty}");

    // bk-b loses its disk and is restored from its own (older) backup: a new incarnation, and
    // every increment it acknowledged after the backup comes back from its peers.
    b.kill();
    std::fs::remove_dir_all(&b.data).expect("wipe bk-b");
    let restored = crate::Site::spawn(
        "bk-b",
        &b.data,
        &["--peer".into(), a.url.clone(), "--seed".into(), seed.into(), "--config".into(), {
            let path = dir.path().join("fast.toml");
            std::fs::write(&path, crate::replication::FAST).expect("config");
            path.display().to_string()
        }],
        dir.path(),
        &[],
    );
    // Accepted by its peer once the old incarnation has been silent for 30 s, then ready; it
    // serves every acknowledged write itself (not forwarded).
    eventually(std::time::Duration::from_secs(120), "the restored bk-b is accepted and ready", || {
        let served_here =
            restored.get("/apps/kv/b/w0").headers.get("x-atoll-site").is_some_and(|s| s == "bk-b");
        (restored.get("/_atoll/health?ready=1").status == 200 && served_here).then_some(())
    });
    assert!(holds(&restored, &acked), "the restored bk-b holds every acknowledged write");
    // And its new increments count on top (a new incarnation: not absorbed by its old part).
    let after = eventually(WAIT, "a write at the restored bk-b", || {
        let r = request("POST", &format!("{}/apps/kv/b/w1", restored.url), &[], Some(b""));
        (r.status == 200).then_some(r.body)
    });
    assert_eq!(after, (acked[1].1 + 1).to_string());
    let shown = json(
        &String::from_utf8(ok(&[
            "kv",
            "get",
            "--site",
            &restored.url,
            "--app",
            "kv",
            "--bucket",
            "b",
            "w1",
            "--json",
        ]))
        .expect("utf-8"),
    );
    let writers: Vec<&str> =
        shown["counter"].as_array().expect("parts").iter().filter_map(|p| p["writer"].as_str()).collect();
    assert_eq!(writers.len(), 2, "the old and the new incarnation of bk-b each have a part: {shown}");
    // A second start with the same --seed does not seed again.
    let again = restored.kill_and_restart();
    assert!(holds(&again, &[("w0".into(), acked[0].1)]));
    assert!(
        std::fs::read_to_string(&again.stderr_path).expect("log").contains("--seed"),
        "seeded before: ignored"
    );

    // A cut or altered backup is refused whole, and starts nothing.
    let bytes = std::fs::read(&file).expect("read");
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let e = refused_seed("bk-e", &dir.path().join("e"), &cut);
    assert!(e.contains("cut short"), "{e}");
}

/// Starts a site named `name` on `data` with `--seed file`, which must refuse to start; its
/// standard error.
fn refused_seed(name: &str, data: &std::path::Path, file: &std::path::Path) -> String {
    let out = Command::new(ATOLL)
        .args(["site", "--name", name, "--region", "us-east", "--listen", "127.0.0.1:0", "--insecure-dev"])
        .arg("--data")
        .arg(data)
        .args(["--seed", file.to_str().expect("utf-8")])
        .output()
        .expect("atoll site");
    assert!(!out.status.success(), "the seed was taken");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn atoll_status_tells_the_story_in_a_terminal() {
    let a = crate::Site::start_with("st-us", &["--region", "us-east"], Some(crate::replication::FAST));
    let mut b = crate::Site::start_with(
        "st-eu",
        &["--region", "eu-west", "--peer", &a.url],
        Some(crate::replication::FAST),
    );
    let router = crate::RouterProc::start(&[&a.url, &b.url], None);
    eventually(WAIT, "the router sees both live", || {
        let sites = router.status()["sites"].as_array()?.clone();
        (sites.len() == 2 && sites.iter().all(|s| s["live"] == true)).then_some(())
    });
    let text = |args: &[&str]| String::from_utf8(ok(args)).expect("utf-8");
    let out = eventually(WAIT, "st-us reports its peer synced", || {
        let out = text(&["status", "--site", &a.url]);
        // Its history saw st-eu serve (so it can see it go).
        let routed = !out.contains("not served by their nearest site") && out.contains("served by st-eu");
        (out.contains("2 sites, 2 live") && !out.contains("never") && routed).then_some(out)
    });
    assert!(out.contains("Atoll site st-us (region us-east): 2 sites, 2 live, 0 down"), "{out}");
    assert!(out.contains("Replication") && out.contains("st-us started"), "{out}");

    b.kill();
    let deadline = std::time::Instant::now() + WAIT;
    let out = loop {
        let out = text(&["status", "--router", &router.url]);
        if out.contains("1 down") && out.contains("st-eu down") {
            break out;
        }
        if std::time::Instant::now() >= deadline {
            let raw = json(&text(&["status", "--site", &a.url, "--json"]));
            let raw = format!("sites {} events {}", raw["sites"], raw["history"]["events"]);
            panic!(
                "the router never reported st-eu down, and the event:\n{out}\nst-us says: {raw}\nits log: {}",
                a.stderr()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(out.contains("Atoll router"), "{out}");
    assert!(out.contains("eu-west -> st-us"), "the failed-over region: {out}");
    let json = json(&text(&["status", "--router", &router.url, "--json"]));
    assert!(json["history"]["samples"].as_array().is_some_and(|s| !s.is_empty()), "{json}");
    // Not a status page: a clear error.
    let e = refused(&["status", "--site", &format!("{}/nothing-here", a.url)]);
    assert!(e.contains("reading the status failed") || e.contains("did not answer"), "{e}");
}

/// A backup taken where the clock ran an hour fast (libfaketime) holds stamps a normal site's
/// replication would refuse: seeding from it is refused whole, before anything is merged.
#[test]
fn a_backup_stamped_past_the_clock_bound_seeds_nothing() {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists());
    let Some(lib) = lib else {
        assert!(std::env::var_os("CI").is_none(), "libfaketime is missing (apt-get install faketime)");
        eprintln!("skipped: libfaketime is missing (apt-get install faketime)");
        return;
    };
    let fast = crate::Site::start_with_env(
        "fast-alone",
        &[],
        None,
        &[("LD_PRELOAD", lib), ("FAKETIME", "+1h"), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")],
    );
    fast.deploy("kv", atoll_test_guests::KV_DRAFT, &[]);
    let put = request("PUT", &format!("{}/apps/kv/b/k", fast.url), &[], Some(b"from-the-future"));
    assert_eq!(put.status, 200, "{}", put.body);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fast.backup");
    ok(&["backup", "--site", &fast.url, "--out", file.to_str().expect("utf-8")]);
    let data = dir.path().join("seeded");
    let e = refused_seed("seeded", &data, &file);
    assert!(e.contains("ahead of this site's clock"), "{e}");
    // Nothing was merged: the store holds no seed row and no entry (a start without --seed runs).
    let site = crate::Site::spawn("seeded", &data, &["--insecure-dev".to_owned()], dir.path(), &[]);
    assert_eq!(site.get("/_atoll/health").status, 200);
}
