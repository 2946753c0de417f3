//! Session tokens across sites, on an `atoll dev` cluster: a client that wrote at one site and
//! is failed over to another sees its write, or is told it cannot (stale, or 503 for an app that
//! refuses stale reads); a site behind on a live site waits, then forwards.

use std::process::Command;
use std::time::Duration;

use crate::dev::{dev_act, start_dev_with};
use crate::{ATOLL, eventually, request};

const TOKEN: &str = "x-atoll-session";

struct Answer {
    status: u16,
    body: String,
    token: Option<String>,
    stale: bool,
    site: String,
    route: String,
}

fn call(method: &str, url: &str, region: &str, token: Option<&str>) -> Answer {
    let mut headers = vec![("x-atoll-region", region)];
    if let Some(t) = token {
        headers.push((TOKEN, t));
    }
    let r = request(method, url, &headers, (method == "POST").then_some(b"".as_slice()));
    let header = |name: &str| r.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    Answer {
        status: r.status,
        body: r.body.trim().to_owned(),
        token: header(TOKEN),
        stale: header("x-atoll-stale").as_deref() == Some("1"),
        site: header("x-atoll-site").unwrap_or_default(),
        route: header("x-atoll-route").unwrap_or_default(),
    }
}

#[test]
fn a_session_reads_its_writes_across_a_failover_or_is_told_it_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let args = ["--sites", "us-east,eu-west,ap-south", "--listen", "127.0.0.1:0", "--restart-after-s", "1"];
    let (mut dev, urls) = start_dev_with(&args, data, &[(atoll_test_guests::COUNTER, "counter")]);
    let url = |name: &str| urls.iter().find(|(n, _)| n == name).map(|(_, u)| u.clone()).expect(name);
    let (us, router) = (url("us-east-1"), url("router"));
    // The same counter, refusing stale reads; and one whose session is a cookie.
    for (name, flags) in
        [("strict", ["--stale-reads", "refuse"]), ("browser", ["--session-cookie", "--stale-reads=serve"])]
    {
        let out = Command::new(ATOLL)
            .args(["deploy", "--site", &us, "--app", name])
            .args(flags)
            .arg(atoll_test_guests::COUNTER)
            .env_remove("ATOLL_ADMIN_TOKEN")
            .output()
            .expect("atoll deploy");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let app = |name: &str, key: &str| format!("{router}/apps/{name}/{key}");
    eventually(Duration::from_secs(30), "both are served at eu-west-1", || {
        let served = |name| {
            let a = call("GET", &app(name, "x"), "eu-west", None);
            a.status == 200 && a.site == "eu-west-1"
        };
        (served("strict") && served("browser")).then_some(())
    });

    // Every response carries a token; a write's names the site that made it.
    let plain = call("GET", &app("counter", "x"), "us-east", None);
    assert!(plain.token.as_deref().is_some_and(|t| t.starts_with("v1.")), "every response has a token");

    // A write at eu-west-1 that cannot replicate (a partition), then eu-west-1 stops.
    dev_act(data, &["partition", "eu-west-1"]);
    let wrote = call("POST", &app("counter", "mine"), "eu-west", None);
    assert_eq!((wrote.status, wrote.body.as_str(), wrote.site.as_str()), (200, "1", "eu-west-1"));
    let token = wrote.token.expect("a token");
    let strict = call("POST", &app("strict", "mine"), "eu-west", Some(&token));
    assert_eq!((strict.status, strict.body.as_str()), (200, "1"));
    let strict_token = strict.token.expect("a token");
    // A browser gets the token as a cookie, and sends nothing else.
    let r = request("POST", &app("browser", "mine"), &[("x-atoll-region", "eu-west")], Some(b""));
    assert_eq!(r.status, 200, "{r:?}\n{}", std::fs::read_to_string(data.join("dev.log")).unwrap_or_default());
    let set = r.headers.get("set-cookie").and_then(|v| v.to_str().ok()).expect("a cookie").to_owned();
    assert!(set.starts_with("atoll-session=v1.") && set.contains("HttpOnly"), "{set}");
    let cookie = set.split(';').next().expect("name=value").to_owned();
    dev_act(data, &["stop", "eu-west-1"]);

    // Failed over to us-east-1: without the token the read is silently old; with it the
    // response says it is stale, and an app refusing stale reads answers 503.
    let without = eventually(Duration::from_secs(20), "eu-west fails over", || {
        let a = call("GET", &app("counter", "mine"), "eu-west", None);
        (a.site == "us-east-1").then_some(a)
    });
    assert_eq!((without.status, without.body.as_str(), without.stale), (200, "0", false));
    let with = call("GET", &app("counter", "mine"), "eu-west", Some(&token));
    assert_eq!((with.status, with.body.as_str(), with.stale), (200, "0", true), "flagged stale");
    let r =
        request("GET", &app("browser", "mine"), &[("x-atoll-region", "eu-west"), ("cookie", &cookie)], None);
    assert_eq!((r.status, r.body.trim()), (200, "0"));
    assert!(
        r.headers.get("x-atoll-stale").is_some_and(|v| v == "1"),
        "the cookie's session is checked: {r:?}"
    );
    let refused = call("GET", &app("strict", "mine"), "eu-west", Some(&strict_token));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.body.contains("eu-west-1"), "{}", refused.body);
    // The stale answer's token still asks for eu-west-1's write: monotonic, not forgotten.
    let carried = with.token.expect("a token");

    // eu-west-1 back and healed: the same session reads its write (and is not stale).
    dev_act(data, &["heal"]);
    dev_act(data, &["start", "eu-west-1"]);
    let fresh = eventually(Duration::from_secs(60), "the write reaches us-east-1", || {
        let a = call("GET", &format!("{us}/apps/counter/mine"), "us-east", Some(&carried));
        (a.status == 200 && !a.stale).then_some(a)
    });
    assert_eq!(fresh.body, "1", "read your write at another site");

    // Behind on a live site: latency on eu-west-1's replication (1.5 s) keeps its write from
    // us-east-1 past the wait; the read is forwarded to eu-west-1, which has it.
    dev_act(data, &["latency", "eu-west-1=1500"]);
    let eu = url("eu-west-1");
    let wrote = call("POST", &format!("{eu}/apps/counter/later"), "eu-west", None);
    assert_eq!((wrote.status, wrote.body.as_str()), (200, "1"));
    let read = call("GET", &format!("{us}/apps/counter/later"), "us-east", wrote.token.as_deref());
    assert_eq!(
        (read.status, read.body.as_str(), read.stale, read.site.as_str(), read.route.as_str()),
        (200, "1", false, "eu-west-1", "session"),
        "forwarded to the site that has the write"
    );
    dev_act(data, &["heal"]);

    // A token that is not one is a clear error; nothing is run.
    let bad = call("POST", &format!("{us}/apps/counter/mine"), "us-east", Some("v1.not-base64!"));
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("not a session token"), "{}", bad.body);
    assert_eq!(call("GET", &format!("{us}/apps/counter/mine"), "us-east", None).body, "1", "not run");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}

/// A token asks for what its client saw, not for all the serving site held: a client that never
/// read a cut-off site's writes is not held back by that site; one that read them is.
#[test]
fn a_session_waits_only_for_what_it_saw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let args = ["--sites", "us-east,eu-west,ap-south", "--listen", "127.0.0.1:0"];
    let (mut dev, urls) = start_dev_with(&args, data, &[(atoll_test_guests::COUNTER, "counter")]);
    let url = |name: &str| urls.iter().find(|(n, _)| n == name).map(|(_, u)| u.clone()).expect(name);
    let (us, eu, ap) = (url("us-east-1"), url("eu-west-1"), url("ap-south-1"));
    let at = |site: &str, key: &str| format!("{site}/apps/counter/{key}");

    // ap-south-1 cannot reach us-east-1 (nor it ap-south-1); eu-west-1 reaches both.
    dev_act(data, &["partition", "ap-south-1", "--from", "us-east-1"]);
    let theirs = call("POST", &at(&ap, "theirs"), "ap-south", None);
    assert_eq!((theirs.status, theirs.body.as_str()), (200, "1"));
    eventually(Duration::from_secs(20), "ap-south-1's write reaches eu-west-1", || {
        (call("GET", &at(&eu, "theirs"), "eu-west", None).body == "1").then_some(())
    });

    // A client writing its own key at eu-west-1 saw nothing of ap-south-1's: us-east-1 serves
    // it, fresh, although eu-west-1 held ap-south-1 writes that us-east-1 lacks.
    let mine = call("POST", &at(&eu, "mine"), "eu-west", None);
    assert_eq!((mine.status, mine.body.as_str()), (200, "1"));
    let read = call("GET", &at(&us, "mine"), "us-east", mine.token.as_deref());
    assert_eq!(
        (read.status, read.body.as_str(), read.stale, read.site.as_str()),
        (200, "1", false, "us-east-1"),
        "held only to eu-west-1's write"
    );

    // A client that read ap-south-1's write at eu-west-1 is held to it at us-east-1: flagged
    // stale there (us-east-1 may hold the value already, relayed by eu-west-1's anti-entropy,
    // but only ap-south-1 can tell it that it holds all of ap-south-1's writes).
    let saw = call("GET", &at(&eu, "theirs"), "eu-west", None);
    assert_eq!(saw.body, "1");
    let behind = call("GET", &at(&us, "theirs"), "us-east", saw.token.as_deref());
    assert_eq!((behind.status, behind.stale), (200, true), "flagged stale: {}", behind.body);

    dev_act(data, &["heal"]);
    let caught_up = eventually(Duration::from_secs(30), "us-east-1 catches up", || {
        let a = call("GET", &at(&us, "theirs"), "us-east", behind.token.as_deref());
        (!a.stale).then_some(a)
    });
    assert_eq!(caught_up.body, "1");

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}
