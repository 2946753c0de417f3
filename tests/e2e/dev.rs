//! `atoll dev`: sites and a router as separate processes, a deploy on start, routing by region,
//! and Ctrl-C stopping everything.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ATOLL, eventually, request};

#[test]
fn atoll_dev_runs_sites_and_a_router_and_ctrl_c_stops_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = Command::new(ATOLL)
        .args(["dev", "--sites", "us-east,eu-west", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .args(["--deploy", atoll_test_guests::HELLO, "--app", "hello"])
        .env_remove("ATOLL_ADMIN_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn atoll dev");
    let stdout = dev.stdout.take().expect("stdout");
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
        let line =
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("atoll dev got ready");
        let words: Vec<&str> = line.split_whitespace().collect();
        if let (Some(first), Some(url)) = (words.first(), words.last())
            && url.starts_with("http://")
            && !line.contains("curl")
            && words.len() <= 4
        {
            urls.push((first.to_string(), url.to_string()));
        }
        if line.contains("atoll dev is ready") {
            break;
        }
    }
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
