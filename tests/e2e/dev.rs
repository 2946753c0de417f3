//! `atoll dev`: sites and a router as separate processes, a deploy on start, routing by region,
//! and Ctrl-C stopping everything.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ATOLL, eventually, request};

/// `atoll dev` started with `args` (and `--data DIR`), read until it says it is ready: the child,
/// and the table's names and URLs.
/// A running `atoll dev`, SIGKILLed when dropped (a failing test leaves no cluster behind: its
/// sites die with it).
pub(crate) struct DevProc(std::process::Child);

impl std::ops::Deref for DevProc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for DevProc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for DevProc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub(crate) fn start_dev(args: &[&str], data: &std::path::Path) -> (DevProc, Vec<(String, String)>) {
    start_dev_with(args, data, &[])
}

/// [`start_dev`], deploying `apps` (component, name) besides `hello`.
pub(crate) fn start_dev_with(
    args: &[&str],
    data: &std::path::Path,
    apps: &[(&str, &str)],
) -> (DevProc, Vec<(String, String)>) {
    let mut command = Command::new(ATOLL);
    command.arg("dev").args(args).arg("--data").arg(data).args([
        "--deploy",
        atoll_test_guests::HELLO,
        "--app",
        "hello",
    ]);
    for (wasm, app) in apps {
        command.args(["--deploy", wasm, "--app", app]);
    }
    let mut dev = command
        .env_remove("ATOLL_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn atoll dev");
    let stdout = dev.stdout.take().expect("stdout");
    // Its log lines (and the sites' and router's, which it forwards), for a failure's message.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = dev.stderr.take().expect("stderr");
    let lines = log.clone();
    // Also kept in DATA/dev.log, for a failure later in a test.
    let mut file = std::fs::File::create(data.join("dev.log")).ok();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = file.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            let mut all = lines.lock().unwrap_or_else(|e| e.into_inner());
            all.push_str(&line);
            all.push('\n');
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The table: `  NAME  REGION  PID  URL` per site, then `  router  PID  URL`.
    let mut urls: Vec<(String, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(e) => {
                let _ = dev.kill();
                let _ = dev.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "atoll dev did not get ready ({e}):\n{}",
                    log.lock().unwrap_or_else(|e| e.into_inner())
                )
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(first), Some(url)) = (words.first(), words.last())
            && url.starts_with("http://")
            && !line.contains("curl")
            && words.len() <= 4
        {
            urls.push((first.to_string(), url.to_string()));
        }
        if line.contains("atoll dev is ready") {
            return (DevProc(dev), urls);
        }
    }
}

#[test]
fn atoll_dev_runs_sites_and_a_router_and_ctrl_c_stops_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut dev, urls) = start_dev(&["--sites", "us-east,eu-west", "--listen", "127.0.0.1:0"], dir.path());
    let url_of = |name: &str| urls.iter().find(|(n, _)| n == name).map(|(_, u)| u.clone()).expect(name);
    let (router, east, west) = (url_of("router"), url_of("us-east-1"), url_of("eu-west-1"));
    assert_eq!(urls.len(), 3, "two sites and a router: {urls:?}");
    // Deployed at the first site, served by both; each region reaches its own site.
    for (region, expected) in
        [("us-east", "us-east-1"), ("eu-west", "eu-west-1"), ("eu-central", "eu-west-1")]
    {
        let r = eventually(Duration::from_secs(30), &format!("{region} served by {expected}"), || {
            let r = request("GET", &format!("{router}/apps/hello/"), &[("x-atoll-region", region)], None);
            (r.status == 200 && r.headers.get("x-atoll-site").is_some_and(|v| v == expected)).then_some(r)
        });
        assert!(r.body.contains("Hello"), "{}", r.body);
    }

    // Ctrl-C (SIGINT to `atoll dev` only: the children are in their own process groups).
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
    for url in [router, east, west] {
        let agent = crate::agent(Duration::from_secs(2));
        assert!(
            agent.get(format!("{url}/_atoll/health")).call().is_err(),
            "{url} still answers after Ctrl-C"
        );
    }
}

/// Three free ports in a row on 127.0.0.1 (the router's, then one per site); the first one.
fn free_ports() -> u16 {
    loop {
        let first =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        if first < 65_000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", first + i)).is_ok()) {
            return first;
        }
    }
}

/// Right after `atoll dev` prints its table, every region is answered by its own site, and says
/// `nearest`, even on a restart over existing data (when each site must first sync with its
/// peers). And an `atoll dev` SIGKILLed leaves no site behind: a second one comes up on the same
/// ports.
#[test]
fn atoll_dev_tells_the_truth_from_its_first_line_and_leaves_no_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_ports();
    let listen = format!("127.0.0.1:{port}");
    // Routing only: no hedge to the other site for a first request slower than usual on a busy
    // machine (hedging is tested in routing::a_hung_site...).
    let args = ["--sites", "us-east,eu-west", "--listen", listen.as_str(), "--set", "routing.hedging=false"];
    let (mut first, _) = start_dev(&args, dir.path());
    first.kill().expect("SIGKILL atoll dev");
    first.wait().expect("reaped");
    let (mut second, urls) = start_dev(&args, dir.path());
    let router = urls.iter().find(|(n, _)| n == "router").map(|(_, u)| u.clone()).expect("router");
    assert_eq!(router, format!("http://{listen}"), "the same ports");
    // No `eventually`: the first answer for each region must already be its own site's.
    for (region, expected) in [("us-east", "us-east-1"), ("eu-west", "eu-west-1"), ("us-east", "us-east-1")] {
        let r = request("GET", &format!("{router}/apps/hello/"), &[("x-atoll-region", region)], None);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.headers["x-atoll-site"], expected, "{region}: {r:?}");
        assert_eq!(r.headers["x-atoll-route"], "nearest", "{region}: {r:?}");
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(second.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || second.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}

/// `atoll dev kill|stop|start SITE` rehearse a site's failures on a running `atoll dev`: a kill
/// is a crash the dev restarts; a stop keeps the site down (its region failed over) until a start.
#[test]
fn atoll_dev_kill_stop_and_start_rehearse_a_sites_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--sites", "us-east,eu-west", "--listen", "127.0.0.1:0", "--restart-after-s", "1"];
    let (mut dev, urls) = start_dev(&args, dir.path());
    let router = urls.iter().find(|(n, _)| n == "router").map(|(_, u)| u.clone()).expect("router");
    let data = dir.path().to_str().expect("utf-8 path");
    let act = |what: &str, site: &str| {
        let out = Command::new(ATOLL).args(["dev", what, site, "--data", data]).output().expect("atoll dev");
        assert!(out.status.success(), "atoll dev {what} {site}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let served_by = |expected: &'static str, what: &str| {
        eventually(Duration::from_secs(30), what, || {
            let r = request("GET", &format!("{router}/apps/hello/"), &[("x-atoll-region", "eu-west")], None);
            (r.status == 200 && r.headers.get("x-atoll-site").is_some_and(|v| v == expected)).then_some(())
        });
    };
    let pid_of = |site: &str| -> u64 {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("dev.json")).expect("dev.json"))
                .expect("json");
        let sites = state["sites"].as_array().expect("sites").clone();
        sites.iter().find(|s| s["name"] == site).and_then(|s| s["pid"].as_u64()).expect("pid")
    };
    served_by("eu-west-1", "eu-west at eu-west-1");

    // Stopped: failed over, and still down after the restart delay.
    act("stop", "eu-west-1");
    served_by("us-east-1", "eu-west failed over to us-east-1");
    std::thread::sleep(Duration::from_secs(3));
    let r = request("GET", &format!("{router}/apps/hello/"), &[("x-atoll-region", "eu-west")], None);
    assert_eq!(r.headers["x-atoll-site"], "us-east-1", "a stopped site stays stopped: {r:?}");
    assert_eq!(r.headers["x-atoll-route"], "failover");
    act("start", "eu-west-1");
    served_by("eu-west-1", "eu-west back at eu-west-1 after start");

    // Killed: a crash, restarted by atoll dev (a new pid).
    let before = pid_of("eu-west-1");
    act("kill", "eu-west-1");
    served_by("us-east-1", "eu-west failed over after the kill");
    served_by("eu-west-1", "eu-west back at eu-west-1 after the restart");
    assert_ne!(pid_of("eu-west-1"), before, "restarted");

    // A bad site name, or no running atoll dev, is a clear error.
    let out =
        Command::new(ATOLL).args(["dev", "kill", "mars-1", "--data", data]).output().expect("atoll dev");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("us-east-1, eu-west-1"));
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let out = Command::new(ATOLL)
        .args(["dev", "kill", "eu-west-1", "--data"])
        .arg(elsewhere.path())
        .output()
        .expect("atoll dev");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no running atoll dev"));

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}

/// `atoll dev` runs `args` against the cluster in `data`; its stdout, or a panic with its stderr.
pub(crate) fn dev_act(data: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(ATOLL).arg("dev").args(args).arg("--data").arg(data).output().expect("atoll dev");
    assert!(out.status.success(), "atoll dev {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `atoll dev` refuses `args` with a message containing `expected`.
fn dev_refuses(data: &std::path::Path, args: &[&str], expected: &str) {
    let out = Command::new(ATOLL).arg("dev").args(args).arg("--data").arg(data).output().expect("atoll dev");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(expected), "atoll dev {args:?}: {stderr}");
}

fn json(url: &str) -> serde_json::Value {
    let r = request("GET", url, &[], None);
    assert_eq!(r.status, 200, "{url}: {r:?}");
    serde_json::from_str(&r.body).expect("json")
}

/// The counter `name` at the site at `url`, read there.
fn count_at(url: &str, name: &str) -> u64 {
    let r = request("GET", &format!("{url}/apps/counter/{name}"), &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    r.body.trim().parse().expect("a number")
}

#[test]
fn atoll_dev_injects_partitions_latency_and_skew_into_the_sites_transports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    // Three sites: a clock is judged off against most of at least two peers.
    let args = ["--sites", "us-east,eu-west,ap-south", "--listen", "127.0.0.1:0"];
    let (mut dev, urls) = start_dev_with(&args, data, &[(atoll_test_guests::COUNTER, "counter")]);
    let url = |name: &str| urls.iter().find(|(n, _)| n == name).map(|(_, u)| u.clone()).expect(name);
    let (us, eu, ap, router) = (url("us-east-1"), url("eu-west-1"), url("ap-south-1"), url("router"));
    let post = |site: &str| {
        let r = request("POST", &format!("{site}/apps/counter/hits"), &[], Some(b""));
        assert_eq!(r.status, 200, "{r:?}");
    };

    // A partition: each side takes writes, neither sees the other's, and each side's router
    // takes the other for down; the front-door router still reaches both.
    let said = dev_act(data, &["partition", "eu-west-1"]);
    assert!(said.contains("partitioned eu-west-1 from us-east-1, ap-south-1"), "{said}");
    let health = json(&format!("{eu}/_atoll/health"));
    assert_eq!(health["dev_faults"]["cut_from"][1]["site"], "us-east-1", "{health}");
    post(&eu);
    post(&us);
    post(&us);
    let status = json(&format!("{eu}/_atoll/router/status"));
    let us_seen =
        status["sites"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "us-east-1").cloned());
    assert_eq!(
        us_seen.as_ref().map(|s| (&s["live"], &s["cut"])),
        Some((&false.into(), &true.into())),
        "{status}"
    );
    let r = request("GET", &format!("{router}/apps/hello/"), &[("x-atoll-region", "eu-west")], None);
    assert!(r.headers.get("x-atoll-site").is_some_and(|v| v == "eu-west-1"), "{r:?}");
    // Replication would have carried them within milliseconds; a second and a half shows it did not.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count_at(&eu, "hits"), 1, "eu-west-1 sees only its own write");
    eventually(Duration::from_secs(10), "ap-south-1, on us-east-1's side, has its writes", || {
        (count_at(&ap, "hits") == 2).then_some(())
    });
    assert_eq!(count_at(&us, "hits"), 2, "us-east-1 sees only its side's writes");
    let page = json(&format!("{router}/_atoll/ui/state"));
    let eu_row = page["sites"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "eu-west-1").cloned());
    assert_eq!(
        eu_row.map(|s| s["faults"]["cut_from"][0]["site"].clone()),
        Some("ap-south-1".into()),
        "{page}"
    );

    // Healed: both sides converge, every increment counted once.
    assert!(dev_act(data, &["heal"]).contains("healed"));
    eventually(Duration::from_secs(20), "both sides converge after heal", || {
        [&eu, &us, &ap].iter().all(|site| count_at(site, "hits") == 3).then_some(())
    });

    // Latency: the replication lag us-east-1 measures from eu-west-1 grows by it, and the
    // router hedges eu-west's GETs to us-east-1.
    dev_act(data, &["latency", "eu-west-1=400"]);
    post(&eu);
    eventually(Duration::from_secs(20), "the lag shows the latency", || {
        let sync = json(&format!("{us}/_atoll/sync/status"));
        let lag = sync["peers"].as_array()?.iter().find(|p| p["site"] == "eu-west-1")?["lag_ms"].as_u64()?;
        (lag >= 400).then_some(())
    });
    eventually(Duration::from_secs(20), "a GET for eu-west is hedged to us-east-1", || {
        let r = request("GET", &format!("{router}/apps/hello/"), &[("x-atoll-region", "eu-west")], None);
        (r.headers.get("x-atoll-route").is_some_and(|v| v == "hedged")
            && r.headers.get("x-atoll-site").is_some_and(|v| v == "us-east-1"))
        .then_some(())
    });
    dev_act(data, &["latency", "eu-west-1=0"]);

    // Skew past the clock bound: flagged by its peer, and the skewed site refuses guest writes.
    dev_act(data, &["skew", "eu-west-1=+3000"]);
    eventually(Duration::from_secs(30), "us-east-1 measures and flags eu-west-1's clock", || {
        let sync = json(&format!("{us}/_atoll/sync/status"));
        let peer = sync["peers"].as_array()?.iter().find(|p| p["site"] == "eu-west-1")?.clone();
        (peer["clock_offset_ms"].as_i64()? >= 2500).then_some(())
    });
    eventually(Duration::from_secs(30), "eu-west-1 refuses guest writes", || {
        let r = request("POST", &format!("{eu}/apps/counter/hits"), &[], Some(b""));
        (r.status == 503).then_some(r.body.clone())
    });
    assert!(dev_act(data, &["skew", "eu-west-1=0"]).contains("no skew any more"));
    eventually(Duration::from_secs(30), "eu-west-1 takes writes again", || {
        let r = request("POST", &format!("{eu}/apps/counter/hits"), &[], Some(b""));
        (r.status == 200).then_some(())
    });

    // Bad input: clear errors, nothing changed.
    dev_refuses(data, &["partition", "mars-1"], "us-east-1, eu-west-1, ap-south-1");
    dev_refuses(data, &["partition", "eu-west-1", "--from", "eu-west-1"], "both sides");
    dev_refuses(data, &["latency", "eu-west-1"], "SITE=MS");
    dev_refuses(data, &["skew", "eu-west-1=soon"], "whole number");
    assert_eq!(json(&format!("{eu}/_atoll/health")).get("dev_faults"), None);

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}

#[test]
fn a_production_site_refuses_dev_faults() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [vec!["--listen", "127.0.0.1:0"], vec!["--listen", "0.0.0.0:0", "--insecure-dev"]] {
        let out = Command::new(ATOLL)
            .args(["site", "--name", "a", "--region", "us-east", "--data"])
            .arg(dir.path())
            .args(["--dev-faults", "faults.json"])
            .args(&args)
            .env("ATOLL_ADMIN_TOKEN", "a-token-for-this-test")
            .output()
            .expect("atoll site");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--insecure-dev and loopback"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_drill_reports_what_happened_and_it_matches_what_the_sites_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path();
    let args = ["--sites", "us-east,eu-west,ap-south", "--listen", "127.0.0.1:0", "--restart-after-s", "2"];
    let (mut dev, urls) = start_dev_with(&args, data, &[(atoll_test_guests::COUNTER, "counter")]);
    let router = urls.iter().find(|(n, _)| n == "router").map(|(_, u)| u.clone()).expect("router");
    let scenario = data.join("drill.scenario");
    std::fs::write(&scenario, "2s kill eu-west-1\n7s partition ap-south-1\n10s heal\n").expect("write");
    let out = Command::new(ATOLL)
        .args(["drill", "--router", &router, "--duration", "13", "--json", "--scenario"])
        .arg(&scenario)
        .arg("--data")
        .arg(data)
        .output()
        .expect("atoll drill");
    assert!(out.status.success(), "atoll drill: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let phases = report["phases"].as_array().expect("phases").clone();
    let events: Vec<&str> = phases.iter().filter_map(|p| p["event"].as_str()).collect();
    assert_eq!(events, ["(start)", "kill eu-west-1", "partition ap-south-1", "heal"], "{report}");
    assert!(phases.iter().all(|p| p["requests"].as_u64() > Some(0)), "every phase has traffic: {report}");
    // The kill was failed over, and the heal converged.
    let failover = report["failovers"].as_array().and_then(|f| f.iter().find(|f| f[1] == "eu-west").cloned());
    let after =
        failover.as_ref().and_then(|f| f[2].as_f64()).unwrap_or_else(|| panic!("no failover: {report}"));
    assert!(after < 5.0, "eu-west answered elsewhere after {after} s");
    assert!(report["convergence_s"][0][1].as_f64().is_some(), "converged after heal: {report}");
    // Consistency: no silent stale read, nothing counted twice.
    let c = &report["consistency"];
    assert_eq!((c["stale_silent"].as_u64(), c["duplicates"].as_u64()), (Some(0), Some(0)), "{report}");
    assert!(c["increments_acknowledged"].as_u64() > Some(0));
    // What the test reads at every site itself agrees with what the drill counted.
    let sites: Vec<&(String, String)> = urls.iter().filter(|(n, _)| n != "router").collect();
    let keys = report["keys"].as_object().expect("keys").clone();
    eventually(Duration::from_secs(30), "every site holds every acknowledged increment", || {
        keys.iter()
            .all(|(key, counts)| {
                let (acked, unknown) = (counts[0].as_u64().unwrap_or(0), counts[1].as_u64().unwrap_or(0));
                sites.iter().all(|(_, url)| {
                    let r = request("GET", &format!("{url}/apps/counter/{key}"), &[], None);
                    r.body.trim().parse::<u64>().is_ok_and(|n| n >= acked && n <= acked + unknown)
                })
            })
            .then_some(())
    });
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGINT) };
    let status = eventually(Duration::from_secs(30), "atoll dev exits", || dev.try_wait().expect("wait"));
    assert!(status.success(), "atoll dev exit status {status}");
}
